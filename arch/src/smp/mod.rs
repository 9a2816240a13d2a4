//! Starting application processors: INIT, then two start-up IPIs into the
//! real-mode trampoline (see `trampoline.rs`), one AP at a time.
//!
//! The boot CPU prepares an [`ApStart`] for each AP (its logical number,
//! APIC ID, its own GDT/TSS/IST block and a boot stack, allocated by the
//! kernel) and calls [`Trampoline::start_ap`], which returns once the AP has
//! reached Rust code on its own stack, or reports a timeout. The AP then
//! sets up the rest of its state on its own (`ap_rust_entry`): per-CPU
//! base (GS), GDT/TSS, the shared IDT, protection features, its local APIC,
//! and finally calls the kernel's `main(cpu)`, which never returns.

mod trampoline;

use core::sync::atomic::{AtomicU32, Ordering, fence};

pub use trampoline::TRAMPOLINE_PAGES;
use trampoline::TrampolineData;
use x86_64::PhysAddr;
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::{Efer, EferFlags};
use x86_64::structures::paging::{PageTable, PageTableFlags};

use crate::apic::{self, DeliveryMode, Destination, Ipi};
use crate::gdt::CpuTables;

const PAGE: u64 = 4096;

/// Where an AP is in its start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum State {
    /// Not sent yet.
    Idle = 0,
    /// INIT/SIPI sent; the boot CPU is waiting.
    Sent = 1,
    /// The AP runs Rust code on its own stack; the trampoline is free again.
    Arrived = 2,
    /// A CPU with a different APIC ID picked up this start (a late AP).
    WrongCpu = 3,
    /// The boot CPU gave up waiting; an AP that arrives now must park.
    Abandoned = 4,
}

/// Everything one AP needs to come up, shared between the boot CPU and it.
/// Must live forever (the AP keeps a reference).
pub struct ApStart {
    cpu: usize,
    apic_id: u32,
    /// The AP's GDT/TSS/IST block; only the AP touches it after the start.
    tables: *mut CpuTables,
    stack_top: u64,
    main: fn(usize) -> !,
    state: AtomicU32,
    /// The APIC ID of the CPU that actually arrived, if it was the wrong one.
    seen_apic_id: AtomicU32,
}

// SAFETY: `tables` is handed to exactly one AP, which becomes its only user;
// all other fields are immutable or atomic.
unsafe impl Sync for ApStart {}

impl ApStart {
    /// Start parameters for logical CPU `cpu` with APIC ID `apic_id`, which
    /// will run on `stack_top` (16-byte aligned, the top of a stack it owns
    /// for good) and call `main(cpu)` once its hardware state is set up.
    pub fn new(cpu: usize, apic_id: u32, tables: &'static mut CpuTables, stack_top: u64, main: fn(usize) -> !) -> Self {
        assert!(stack_top.is_multiple_of(16), "AP stack top must be 16-byte aligned");
        Self {
            cpu,
            apic_id,
            tables,
            stack_top,
            main,
            state: AtomicU32::new(State::Idle as u32),
            seen_apic_id: AtomicU32::new(u32::MAX),
        }
    }

    /// The logical CPU number this start is for.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The APIC ID this start is for.
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }
}

/// Why an AP did not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// It did not reach the kernel within the timeout.
    Timeout,
    /// A different CPU (this APIC ID) took the start instead.
    WrongCpu(u32),
}

/// The trampoline, installed in low memory.
pub struct Trampoline {
    /// Physical address of its first page.
    phys: u64,
    /// The same, through the direct map.
    virt: *mut u8,
    data_offset: usize,
}

impl Trampoline {
    /// Copies the trampoline to `phys` (page aligned, below 1 MiB, the first
    /// of [`TRAMPOLINE_PAGES`] pages) and builds its temporary page tables
    /// from the current (kernel) CR3.
    ///
    /// # Safety
    ///
    /// The pages are RAM that nothing else uses, now or later (the kernel
    /// lists them as reserved), and the direct map is set up (`kvmap::init`).
    pub unsafe fn install(phys: u64) -> Trampoline {
        let pages = TRAMPOLINE_PAGES as u64;
        assert!(
            phys.is_multiple_of(PAGE) && phys >= PAGE && phys + pages * PAGE <= 0x10_0000,
            "trampoline at {phys:#x} is not usable"
        );
        let off = crate::kvmap::direct_map_offset();
        assert!(off != 0, "kvmap::init has not run");
        let virt = (off + phys) as *mut u8;
        let blob = trampoline::blob();
        assert!(blob.data_offset + core::mem::size_of::<TrampolineData>() <= PAGE as usize);
        // SAFETY: the caller gives us these pages; the blob is in .rodata and
        // fits in the first page (checked above).
        unsafe {
            core::ptr::write_bytes(virt, 0, (pages * PAGE) as usize);
            core::ptr::copy_nonoverlapping(blob.bytes.as_ptr(), virt, blob.bytes.len());
        }
        // Temporary tables: PML4 (page 1) -> PDPT (page 2) -> PD (page 3),
        // PD[0] identity-maps 0..2 MiB with a large page.
        let table = |i: u64| (off + phys + i * PAGE) as *mut PageTable;
        let (kernel_pml4, _) = Cr3::read();
        let kernel_pml4 = (off + kernel_pml4.start_address().as_u64()) as *const PageTable;
        let rw = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        // SAFETY: pages 1..=3 are ours (zeroed above); the kernel PML4 is
        // only read, and its upper half never changes after boot.
        unsafe {
            let pml4 = &mut *table(1);
            for slot in 256..512 {
                pml4[slot] = (&*kernel_pml4)[slot].clone();
            }
            pml4[0].set_addr(PhysAddr::new(phys + 2 * PAGE), rw);
            (&mut *table(2))[0].set_addr(PhysAddr::new(phys + 3 * PAGE), rw);
            (&mut *table(3))[0].set_addr(PhysAddr::new(0), rw | PageTableFlags::HUGE_PAGE);
        }
        let efer = Efer::read() & (EferFlags::NO_EXECUTE_ENABLE | EferFlags::SYSTEM_CALL_EXTENSIONS)
            | EferFlags::LONG_MODE_ENABLE;
        let data = TrampolineData {
            claim: 1, // Nobody may start until start_ap opens it.
            temp_cr3: (phys + PAGE) as u32,
            efer: efer.bits() as u32,
            far_offset: (phys + blob.long_offset as u64) as u32,
            far_selector: trampoline::TRAMPOLINE_CS,
            gdtr_limit: (core::mem::size_of_val(&trampoline::TRAMPOLINE_GDT) - 1) as u16,
            gdtr_base: (phys + (blob.data_offset + core::mem::offset_of!(TrampolineData, gdt)) as u64) as u32,
            kernel_cr3: Cr3::read_raw().0.start_address().as_u64() | u64::from(Cr3::read_raw().1),
            cr4: Cr4::read_raw(),
            cr0: Cr0::read_raw(),
            stack_top: 0,
            arg: 0,
            entry: trampoline::entry64(),
            gdt: trampoline::TRAMPOLINE_GDT,
        };
        // SAFETY: the data block lies inside the first page (checked above)
        // at the offset the blob's code expects; it is 8-byte aligned there
        // (`.p2align 3` in the blob, page-aligned base).
        unsafe { core::ptr::write_volatile(virt.add(blob.data_offset) as *mut TrampolineData, data) };
        Trampoline { phys, virt, data_offset: blob.data_offset }
    }

    /// Physical address of the first trampoline page.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    fn data(&self) -> *mut TrampolineData {
        // SAFETY: inside the installed first page (see `install`).
        unsafe { self.virt.add(self.data_offset) as *mut TrampolineData }
    }

    /// Starts the AP described by `ap` and waits up to `timeout_us` for it to
    /// reach Rust code. On success the AP continues its bring-up (and calls
    /// `main`) concurrently; the trampoline is free for the next AP.
    pub fn start_ap(&self, ap: &'static ApStart, timeout_us: u64) -> Result<(), StartError> {
        let data = self.data();
        // SAFETY: `data` points into the installed page; no AP reads the
        // fields below while `claim` is set (the previous AP claimed it, or
        // `install` set it), so plain volatile stores cannot race a reader.
        unsafe {
            (&raw mut (*data).stack_top).write_volatile(ap.stack_top);
            (&raw mut (*data).arg).write_volatile(ap as *const ApStart as u64);
        }
        ap.state.store(State::Sent as u32, Ordering::Release);
        fence(Ordering::SeqCst);
        // SAFETY: `data` points into the installed page, which stays ours;
        // an aligned volatile store of `claim` cannot tear against an AP's
        // `lock bts` on it, and opening the claim is the last store before
        // the IPIs (the fields it guards are written above).
        unsafe { (&raw mut (*data).claim).write_volatile(0) };
        fence(Ordering::SeqCst);

        let dest = Destination::Apic(ap.apic_id);
        let sipi = Ipi { mode: DeliveryMode::StartUp, vector: (self.phys >> 12) as u8, dest };
        // Intel's MP start-up sequence (SDM vol. 3, 9.4.4.1): INIT, 10 ms,
        // SIPI, 200 us, SIPI if the AP has not shown up.
        apic::send(Ipi { mode: DeliveryMode::Init, vector: 0, dest });
        crate::time::delay_us(10_000);
        apic::send(sipi);
        crate::time::delay_us(200);
        if ap.state.load(Ordering::Acquire) == State::Sent as u32 {
            apic::send(sipi);
        }
        let per_us = crate::time::tsc_per_us().unwrap_or(3000);
        let deadline = crate::time::rdtsc() + timeout_us * per_us;
        loop {
            match ap.state.load(Ordering::Acquire) {
                s if s == State::Arrived as u32 => return Ok(()),
                s if s == State::WrongCpu as u32 => {
                    return Err(StartError::WrongCpu(ap.seen_apic_id.load(Ordering::Relaxed)));
                }
                _ => {}
            }
            if crate::time::rdtsc() > deadline {
                break;
            }
            core::hint::spin_loop();
        }
        // Give up, unless it arrives this very moment.
        if ap
            .state
            .compare_exchange(State::Sent as u32, State::Abandoned as u32, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return match ap.state.load(Ordering::Acquire) {
                s if s == State::Arrived as u32 => Ok(()),
                _ => Err(StartError::WrongCpu(ap.seen_apic_id.load(Ordering::Relaxed))),
            };
        }
        // Put it back into wait-for-SIPI so it cannot wake up late, and
        // close the trampoline for anyone who still does.
        apic::send(Ipi { mode: DeliveryMode::Init, vector: 0, dest });
        // SAFETY: `data` points into the installed page, which stays ours;
        // an aligned volatile store of `claim` cannot tear against a late
        // AP's `lock bts` on it, and whichever comes first wins: a late AP
        // that claimed first finds its start abandoned and parks.
        unsafe { (&raw mut (*data).claim).write_volatile(1) };
        Err(StartError::Timeout)
    }
}

/// Parks a CPU that must not run kernel code (interrupts off, halted).
fn park_quietly() -> ! {
    loop {
        crate::irq::disable();
        crate::irq::halt();
    }
}

/// First Rust code of every AP, entered from `arch_ap_entry64` on the AP's
/// boot stack, with the kernel's page tables and the trampoline's GDT.
extern "C" fn ap_rust_entry(start: &'static ApStart) -> ! {
    // Nothing here may log before `init_this_cpu`: the logger reads GS.
    let real = apic::id_from_cpuid();
    if real != start.apic_id {
        start.seen_apic_id.store(real, Ordering::Relaxed);
        start.state.store(State::WrongCpu as u32, Ordering::Release);
        park_quietly();
    }
    crate::percpu::init_this_cpu(start.cpu, start.apic_id);
    if start
        .state
        .compare_exchange(State::Sent as u32, State::Arrived as u32, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        park_quietly(); // The boot CPU gave up on us and moved on.
    }
    // SAFETY: the boot CPU handed this block to this AP alone (ApStart) and
    // leaked it, so the reference is unique and 'static.
    crate::gdt::load(unsafe { &mut *start.tables });
    crate::trap::load_idt();
    crate::cpu::enable_protection(crate::cpu::features());
    apic::init_this_cpu();
    (start.main)(start.cpu)
}
