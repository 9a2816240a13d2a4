//! Bringing every CPU online, and the kernel's side of what CPUs do to each
//! other: interrupt vectors, the timer tick, IPIs, the cross-CPU barrier.
//!
//! The mechanism lives in `arch` (ACPI, local APIC, trampoline, cross-call
//! channels, TLB shoot-down); this module decides the policy: which CPUs to
//! start and in what order, how long to wait for them, how logical CPU
//! numbers are assigned (boot CPU = 0, then MADT order), what the boot
//! summary says, and what each vector does.
//!
//! Boot order ([`init`], on the boot CPU, interrupts off): kernel window
//! (`kvmap`), MADT, local APIC (x2APIC if the CPU has it), timer calibration,
//! then each AP in turn: INIT-SIPI-SIPI, wait until it runs on its own stack,
//! next. Each AP finishes its own set-up in parallel ([`ap_main`]) and marks
//! itself online. Finally the boot CPU's timer starts and one IPI round trip
//! to every CPU proves the IPI path before anything relies on it.
//!
//! # Public API
//!
//! * IPIs: [`kick`] (reschedule), `arch::ipi::{send_to, send_fixed,
//!   send_all_but_self}` for raw vectors.
//! * Cross calls: [`on_each_cpu`], [`on_cpus`] (wait for completion).
//! * TLB: [`shootdown`] with a [`CpuMask`] and a [`TlbRange`];
//!   `arch::tlb::flush_page` / `flush_local` for this CPU only.
//! * Timer: [`TICK_HZ`], [`set_tick_handler`], [`ticks`].
//! * Tests: [`Barrier`].

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arch::acpi::MadtCpu;
use arch::apic::{self, ApicMode, vectors};
// AtomicCpuMask is for address spaces (the CPUs that may cache their TLB
// entries); re-exported here with the rest of the SMP API.
#[allow(unused_imports)]
pub use arch::cpumask::{AtomicCpuMask, CpuMask};
use arch::gdt::CpuTables;
pub use arch::ipi::{on_cpus, on_each_cpu};
use arch::percpu::{self, NR_CPUS};
use arch::smp::{ApStart, StartError, TRAMPOLINE_PAGES, Trampoline};
pub use arch::tlb::{PendingFlush, TlbRange, shootdown};
use arch::trap::TrapFrame;
use bootloader_api::info::MemoryRegions;
use spin::Once;

/// Timer interrupts per second on every CPU.
pub const TICK_HZ: u32 = 100;

/// How long the boot CPU waits for one AP to reach the kernel after its
/// start-up IPIs. Generous for TCG with many vCPUs on few host cores.
const AP_START_TIMEOUT_US: u64 = 2_000_000;
/// How long it waits, after the last start, for all APs to finish bring-up.
const AP_ONLINE_TIMEOUT_US: u64 = 10_000_000;
/// Boot stack of an AP: it runs the AP's bring-up, then is given up when the
/// boot context hands the CPU to the scheduler.
const AP_BOOT_STACK: usize = 32 * 1024;

/// What bring-up found, for the boot summary and the tests.
#[derive(Debug)]
pub struct SmpInfo {
    /// Enabled processors in the MADT (0 if there was no usable MADT).
    pub madt_enabled: usize,
    /// Enabled processors left offline because they exceed `NR_CPUS`.
    pub beyond_nr_cpus: usize,
    /// APs that were started and did not come online.
    pub failed: usize,
    /// The APIC mode in use.
    pub mode: ApicMode,
    /// Non-existent CPUs added by `smp_phantom=` (a testing aid).
    pub phantoms: usize,
}

static INFO: Once<SmpInfo> = Once::new();

/// What bring-up found (`None` before [`init`]).
pub fn info() -> Option<&'static SmpInfo> {
    INFO.get()
}

/// Finds the low memory for the trampoline: the lowest run of
/// [`TRAMPOLINE_PAGES`] pages below 1 MiB (skipping page 0) that the boot
/// memory map reports usable. The frame allocator never hands out the first
/// MiB (see `memory.rs`), so these pages stay ours for good, which an AP that
/// wakes up late relies on.
fn trampoline_phys(regions: &MemoryRegions) -> Option<u64> {
    let size = (TRAMPOLINE_PAGES * 4096) as u64;
    (1..0x100u64)
        .map(|page| page * 4096)
        .filter(|&p| p + size <= crate::memory::LOW_MEMORY_END)
        .find(|&p| crate::memory::is_usable(regions, p, p + size))
}

/// Brings up every CPU the firmware lists (up to `NR_CPUS`). Call once on
/// the boot CPU, after the heap and before anything uses IPIs.
pub fn init(rsdp: Option<u64>, regions: &MemoryRegions, phys_offset: u64) {
    arch::kvmap::init(phys_offset);

    let mut cpus: Vec<MadtCpu> = Vec::new();
    // SAFETY: `rsdp` comes from the bootloader, and physical memory is
    // mapped at `phys_offset` (checked by the caller).
    let madt = unsafe { arch::acpi::enumerate_cpus(rsdp, phys_offset, |c| cpus.push(c)) };
    let madt = match madt {
        Ok(m) => Some(m),
        Err(e) => {
            log::warn!("smp: no usable MADT ({e:?}); running on the boot CPU only");
            None
        }
    };
    // Enabled processors, each APIC ID once (firmware may list a CPU in
    // both an xAPIC and an x2APIC entry).
    let mut enabled: Vec<MadtCpu> = Vec::new();
    for c in cpus.iter().filter(|c| c.is_enabled()) {
        if !enabled.iter().any(|e| e.apic_id == c.apic_id) {
            enabled.push(*c);
        }
    }

    let mode = apic::init_boot_cpu(arch::cpu::features(), madt.map(|m| m.local_apic_phys));
    let bsp_apic = apic::id();
    percpu::set_apic_id(bsp_apic);
    let ticks_per_sec = apic::timer_calibrate();
    arch::ipi::set_present_cpus(enabled.len().max(1));
    percpu::mark_online();

    // Logical numbers: the boot CPU is 0, the others follow in MADT order.
    let mut aps: Vec<MadtCpu> = enabled.iter().filter(|c| c.apic_id != bsp_apic).copied().collect();
    if !enabled.is_empty() && aps.len() == enabled.len() {
        log::warn!("smp: the boot CPU's APIC ID {bsp_apic} is not in the MADT");
    }
    let mut beyond = 0;
    if aps.len() > NR_CPUS - 1 {
        let dropped: Vec<u32> = aps[NR_CPUS - 1..].iter().map(|c| c.apic_id).collect();
        beyond = dropped.len();
        log::warn!("smp: {beyond} CPUs beyond NR_CPUS={NR_CPUS} stay offline (APIC IDs {dropped:?})");
        aps.truncate(NR_CPUS - 1);
    }
    if mode == ApicMode::XApic {
        aps.retain(|c| {
            let ok = c.apic_id < 0xff;
            if !ok {
                log::warn!("smp: CPU with APIC ID {} needs x2APIC, which this CPU lacks; left offline", c.apic_id);
            }
            ok
        });
    }

    // Testing aid: `smp_phantom=ID` adds a CPU that does not exist, so the
    // start-up timeout path runs (`cargo xtask test` does this at -smp 3).
    let mut phantoms = 0;
    if let Some(id) = crate::cmdline::read().value("smp_phantom").and_then(|v| v.parse::<u32>().ok()) {
        if aps.len() < NR_CPUS - 1 && id != bsp_apic && !enabled.iter().any(|c| c.apic_id == id) {
            log::info!("smp: adding phantom CPU with APIC ID {id} (smp_phantom): it must time out");
            aps.push(MadtCpu {
                apic_id: id,
                acpi_uid: u32::MAX,
                flags: arch::acpi::LocalApicFlags::ENABLED,
                x2apic_entry: false,
            });
            phantoms = 1;
        }
    }

    let mut failed = 0;
    let mut started: Vec<(usize, u32)> = Vec::new();
    if !aps.is_empty() {
        match trampoline_phys(regions) {
            None => {
                log::warn!("smp: no usable low memory for the AP trampoline; running on the boot CPU only");
                failed = aps.len();
            }
            Some(phys) => {
                // SAFETY: the pages are usable RAM below 1 MiB, which nothing
                // else uses (the frame allocator excludes the first MiB), and
                // kvmap::init ran above.
                let tramp = unsafe { Trampoline::install(phys) };
                log::debug!("smp: trampoline at {phys:#x}");
                for (i, c) in aps.iter().enumerate() {
                    let cpu = i + 1;
                    match start_one(&tramp, cpu, c.apic_id) {
                        Ok(()) => started.push((cpu, c.apic_id)),
                        Err(e) => {
                            failed += 1;
                            log::error!(
                                "smp: CPU {cpu} (APIC ID {}) did not start: {e:?}; continuing without it",
                                c.apic_id
                            );
                        }
                    }
                }
            }
        }
    }

    // Wait for the started APs to finish their own bring-up.
    let deadline = arch::time::now_ns() + AP_ONLINE_TIMEOUT_US * 1000;
    while started.iter().any(|&(cpu, _)| !percpu::cpu(cpu).is_online()) && arch::time::now_ns() < deadline {
        core::hint::spin_loop();
    }
    for &(cpu, apic_id) in started.iter().filter(|&&(cpu, _)| !percpu::cpu(cpu).is_online()) {
        failed += 1;
        log::error!("smp: CPU {cpu} (APIC ID {apic_id}) started but did not come online");
    }

    apic::timer_start_periodic(TICK_HZ);
    INFO.call_once(|| SmpInfo { madt_enabled: enabled.len(), beyond_nr_cpus: beyond, failed, mode, phantoms });

    // Prove the IPI path end to end before anybody relies on it.
    let answered = AtomicUsize::new(0);
    on_each_cpu(|| {
        answered.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(answered.load(Ordering::Relaxed), percpu::online_count(), "IPI round trip lost CPUs");

    let ids: Vec<u32> = percpu::online_cpus().map(|c| percpu::cpu(c).apic_id()).collect();
    log::info!(
        "smp: {} CPU{} online: APIC IDs {:?}; {} mode; timer {} Hz from a {} kHz APIC clock (/16)",
        ids.len(),
        if ids.len() == 1 { "" } else { "s" },
        ids,
        match mode {
            ApicMode::X2Apic => "x2APIC",
            ApicMode::XApic => "xAPIC",
        },
        TICK_HZ,
        ticks_per_sec / 1000,
    );
}

/// Allocates what AP `cpu` needs and starts it.
fn start_one(tramp: &Trampoline, cpu: usize, apic_id: u32) -> Result<(), StartError> {
    // Both blocks are handed to the AP for good: leak them.
    let tables: &'static mut CpuTables = Box::leak(Box::new(CpuTables::new()));
    let stack = Box::leak(alloc::vec![0u8; AP_BOOT_STACK].into_boxed_slice());
    let stack_top = (stack.as_mut_ptr() as u64 + AP_BOOT_STACK as u64) & !0xf;
    let start: &'static ApStart = Box::leak(Box::new(ApStart::new(cpu, apic_id, tables, stack_top, ap_main)));
    tramp.start_ap(start, AP_START_TIMEOUT_US)
}

/// The rest of an AP's life, once `arch` has set up its GS base, GDT/TSS,
/// IDT, protection features and local APIC: its timer, its scheduler, and
/// then it becomes the scheduler's (its boot context exits and the idle task
/// takes over).
fn ap_main(cpu: usize) -> ! {
    apic::timer_start_periodic(TICK_HZ);
    crate::sched::init_cpu(&alloc::format!("ap-boot/{cpu}"));
    crate::uspace::init_cpu();
    percpu::mark_online();
    log::debug!("smp: CPU {cpu} (APIC ID {}) online", percpu::this_cpu().apic_id());
    crate::sched::exit_current(0)
}

// ---------------------------------------------------------------------------
// Interrupt vectors.

/// Per CPU: timer interrupts taken.
static TICKS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// Per CPU: reschedule IPIs taken.
static RESCHEDULES: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// Spurious interrupts (APIC spurious vector, stray legacy-PIC IRQ 7/15).
static SPURIOUS: AtomicU64 = AtomicU64::new(0);

/// The per-tick callback: `fn(from_user)`, stored as an address (0 = none).
static TICK_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Registers `handler` to run on every timer tick on every CPU, after the
/// EOI (so it may switch tasks), with interrupts disabled; its argument says
/// whether the tick interrupted ring 3. Replaces any earlier handler.
pub fn set_tick_handler(handler: fn(bool)) {
    TICK_HANDLER.store(handler as usize, Ordering::Release);
}

/// Timer ticks taken by `cpu` since it came up.
pub fn ticks(cpu: usize) -> u64 {
    TICKS[cpu].load(Ordering::Relaxed)
}

/// Reschedule IPIs taken by `cpu`.
pub fn reschedules(cpu: usize) -> u64 {
    RESCHEDULES[cpu].load(Ordering::Relaxed)
}

/// Makes `cpu` look at its run queue (a reschedule IPI): wakes it from the
/// idle `hlt`. Does nothing for this CPU or an offline one.
pub fn kick(cpu: usize) {
    if cpu != percpu::cpu_id() && percpu::cpu(cpu).is_online() {
        arch::ipi::send_to(cpu, vectors::RESCHEDULE);
    }
}

/// Dispatches vectors >= 32 (called from the trap policy). Returns `false`
/// for a vector nobody owns.
pub fn handle_irq(vector: u8, frame: &mut TrapFrame) -> bool {
    let cpu = percpu::cpu_id();
    match vector {
        vectors::TIMER => {
            // EOI first: the handler may switch to another task and not
            // come back here for a long time.
            apic::eoi();
            TICKS[cpu].fetch_add(1, Ordering::Relaxed);
            let h = TICK_HANDLER.load(Ordering::Acquire);
            if h != 0 {
                // SAFETY: TICK_HANDLER only ever holds a `fn(bool)` (see
                // `set_tick_handler`).
                let h: fn(bool) = unsafe { core::mem::transmute(h) };
                h(frame.from_user());
            }
        }
        vectors::RESCHEDULE => {
            // Waking the CPU is the whole job: the idle loop re-checks its
            // run queue after every interrupt.
            apic::eoi();
            RESCHEDULES[cpu].fetch_add(1, Ordering::Relaxed);
        }
        vectors::CALL_FUNCTION => {
            arch::ipi::handle_call_function_ipi();
            apic::eoi();
        }
        vectors::TLB_SHOOTDOWN => {
            arch::ipi::handle_tlb_ipi();
            apic::eoi();
        }
        vectors::ERROR => {
            let esr = apic::take_errors();
            apic::eoi();
            log::warn!("local APIC error on CPU {cpu}: ESR {esr:#x}");
        }
        // Spurious: by definition no EOI. 0x27/0x2f are the masked legacy
        // PICs' spurious IRQ 7/15, which can still appear after remapping.
        vectors::SPURIOUS | 0x27 | 0x2f => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        _ => return false,
    }
    true
}

// ---------------------------------------------------------------------------
// Barrier.

/// A reusable spinning barrier for `n` CPUs. Waiters service TLB
/// shoot-downs while they spin, so CPUs may wait in it with interrupts off
/// (as cross-called functions do) while others shoot down.
pub struct Barrier {
    n: usize,
    /// Arrivals in the current round.
    count: AtomicUsize,
    /// Rounds completed; waiters spin until it moves.
    generation: AtomicUsize,
}

/// A barrier that has not opened after this long is a bug in its user.
const BARRIER_TIMEOUT_NS: u64 = 60_000_000_000;

impl Barrier {
    /// A barrier for `n` participants.
    pub const fn new(n: usize) -> Self {
        Self { n, count: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    /// Waits until all `n` participants have called `wait` in this round.
    pub fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            // Last one in: reset for the next round, then open (Release:
            // the reset is visible before anybody can start the next round).
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let start = arch::time::now_ns();
        let mut turns = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            arch::tlb::service_pending();
            core::hint::spin_loop();
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(4096) && arch::time::now_ns() - start > BARRIER_TIMEOUT_NS {
                panic!("barrier: {} of {} CPUs arrived after 60 s", self.count.load(Ordering::Relaxed), self.n);
            }
        }
    }
}

#[cfg(target_os = "none")]
mod tests;
