//! The local APIC: x2APIC mode (MSRs) when the CPU has it, xAPIC mode
//! (uncached MMIO) otherwise. One mode for all CPUs, chosen on the boot CPU.
//!
//! What the kernel uses it for: inter-processor interrupts (fixed, NMI, INIT
//! and start-up), end-of-interrupt, and the per-CPU timer. The legacy PICs
//! are remapped and masked (`pic.rs`); no I/O APIC routing is set up because
//! no device interrupt is used yet.
//!
//! Register access differs by mode: xAPIC registers are 32-bit words at
//! `base + offset`; in x2APIC mode the same register is MSR
//! `0x800 + offset / 16`, and the interrupt command register is one 64-bit
//! MSR instead of two words.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use bitflags::bitflags;
use x86_64::registers::model_specific::{ApicBase, ApicBaseFlags, Msr};
use x86_64::{PhysAddr, VirtAddr};

use crate::cpu::Features;

/// Interrupt vectors of the local APIC's sources and of the IPIs. All sit in
/// the highest priority class (0xe/0xf) so that a raised task priority for
/// device interrupts never holds back a TLB shoot-down.
pub mod vectors {
    /// The periodic local-APIC timer.
    pub const TIMER: u8 = 0xec;
    /// "Look at your run queue" (scheduler kick).
    pub const RESCHEDULE: u8 = 0xfb;
    /// Cross-CPU function calls (`ipi::on_each_cpu`).
    pub const CALL_FUNCTION: u8 = 0xfc;
    /// TLB shoot-down requests.
    pub const TLB_SHOOTDOWN: u8 = 0xfd;
    /// The APIC's own error interrupt.
    pub const ERROR: u8 = 0xfe;
    /// Spurious interrupts (no EOI, by definition).
    pub const SPURIOUS: u8 = 0xff;
}

/// Local APIC registers, by xAPIC MMIO offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Reg {
    Id = 0x20,
    Version = 0x30,
    TaskPriority = 0x80,
    Eoi = 0xb0,
    SpuriousVector = 0xf0,
    ErrorStatus = 0x280,
    IcrLow = 0x300,
    IcrHigh = 0x310,
    LvtTimer = 0x320,
    LvtLint0 = 0x350,
    LvtError = 0x370,
    TimerInitialCount = 0x380,
    TimerCurrentCount = 0x390,
    TimerDivide = 0x3e0,
}

impl Reg {
    fn msr(self) -> u32 {
        0x800 + (self as u32 >> 4)
    }
}

bitflags! {
    /// Spurious-interrupt vector register, above the vector byte.
    #[derive(Clone, Copy, Debug)]
    struct Svr: u32 {
        /// APIC software enable.
        const APIC_ENABLE = 1 << 8;
    }

    /// Local vector table entry bits, above the vector byte.
    #[derive(Clone, Copy, Debug)]
    struct Lvt: u32 {
        /// The source is masked.
        const MASKED = 1 << 16;
        /// Timer only: periodic instead of one-shot.
        const TIMER_PERIODIC = 1 << 17;
    }

    /// Interrupt command register bits (low word), besides vector and mode.
    #[derive(Clone, Copy, Debug)]
    struct IcrFlags: u32 {
        /// xAPIC only: the previous IPI has not been accepted yet.
        const DELIVERY_PENDING = 1 << 12;
        /// Level assert (required for everything except INIT de-assert).
        const ASSERT = 1 << 14;
    }
}

/// Divide configuration register value for "divide by 16".
const TIMER_DIVIDE_BY_16: u32 = 0b0011;

/// How the IPI is delivered (ICR bits 8..=10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DeliveryMode {
    /// An ordinary interrupt on the vector.
    Fixed = 0b000,
    /// A non-maskable interrupt (vector ignored).
    Nmi = 0b100,
    /// INIT: reset the target into wait-for-SIPI.
    Init = 0b101,
    /// Start-up IPI: begin real-mode execution at `vector << 12`.
    StartUp = 0b110,
}

/// Whom the IPI goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// One CPU, by APIC ID (physical destination mode).
    Apic(u32),
    /// Every CPU except the sender (destination shorthand 0b11).
    AllExcludingSelf,
}

/// One interrupt command.
#[derive(Clone, Copy, Debug)]
pub struct Ipi {
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Vector (or start page for start-up IPIs; ignored for NMI and INIT).
    pub vector: u8,
    /// Target.
    pub dest: Destination,
}

impl Ipi {
    /// (low word, destination field) of the interrupt command register.
    fn encode(self, mode: ApicMode) -> (u32, u32) {
        let shorthand = match self.dest {
            Destination::Apic(_) => 0b00,
            Destination::AllExcludingSelf => 0b11,
        };
        let low = u32::from(self.vector) | (self.mode as u32) << 8 | IcrFlags::ASSERT.bits() | shorthand << 18;
        let dest = match (self.dest, mode) {
            (Destination::Apic(id), ApicMode::X2Apic) => id,
            (Destination::Apic(id), ApicMode::XApic) => {
                assert!(id < 0xff, "APIC ID {id} needs x2APIC mode");
                id << 24
            }
            (Destination::AllExcludingSelf, _) => 0,
        };
        (low, dest)
    }
}

/// The register interface in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicMode {
    /// Memory-mapped registers, 8-bit APIC IDs.
    XApic,
    /// MSR registers, 32-bit APIC IDs.
    X2Apic,
}

/// 0 = not initialised, 1 = xAPIC, 2 = x2APIC.
static MODE: AtomicU8 = AtomicU8::new(0);
/// Virtual address of the xAPIC registers (xAPIC mode only).
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0);
/// Timer input ticks per second at divide-by-16 (0 until calibrated).
static TIMER_TICKS_PER_SEC: AtomicU64 = AtomicU64::new(0);

/// The mode, or `None` before [`init_boot_cpu`].
pub fn mode() -> Option<ApicMode> {
    match MODE.load(Ordering::Acquire) {
        1 => Some(ApicMode::XApic),
        2 => Some(ApicMode::X2Apic),
        _ => None,
    }
}

fn read(reg: Reg) -> u32 {
    match mode() {
        // SAFETY: x2APIC mode is enabled on this CPU (`enable_this_cpu`
        // runs before any register access), so the MSR exists; reading an
        // APIC register has no side effects.
        Some(ApicMode::X2Apic) => unsafe { Msr::new(reg.msr()).read() as u32 },
        Some(ApicMode::XApic) => {
            let addr = XAPIC_BASE.load(Ordering::Relaxed) + reg as u64;
            // SAFETY: XAPIC_BASE maps the APIC page uncached (kvmap), and
            // `reg` is a valid, aligned register offset within it.
            unsafe { core::ptr::read_volatile(addr as *const u32) }
        }
        None => panic!("local APIC used before init"),
    }
}

fn write(reg: Reg, value: u32) {
    match mode() {
        // SAFETY: x2APIC mode is enabled on this CPU (`enable_this_cpu` runs
        // before any register access), so the MSR exists; writes to these
        // registers only configure this CPU's APIC (ICR writes go through
        // `send`).
        Some(ApicMode::X2Apic) => unsafe { Msr::new(reg.msr()).write(u64::from(value)) },
        Some(ApicMode::XApic) => {
            let addr = XAPIC_BASE.load(Ordering::Relaxed) + reg as u64;
            // SAFETY: XAPIC_BASE maps the APIC page uncached (kvmap), and
            // `reg` is a valid, aligned register offset within it; the write
            // only configures this CPU's APIC.
            unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
        }
        None => panic!("local APIC used before init"),
    }
}

/// Chooses the mode (x2APIC if `features` has it), maps the xAPIC registers
/// if needed, and enables this (the boot) CPU's APIC. `madt_phys` is the
/// MADT's local APIC address, used only to cross-check the MSR.
pub fn init_boot_cpu(features: Features, madt_phys: Option<u64>) -> ApicMode {
    let mode = if features.contains(Features::X2APIC) { ApicMode::X2Apic } else { ApicMode::XApic };
    if mode == ApicMode::XApic {
        let (frame, _) = ApicBase::read();
        let phys = frame.start_address();
        if let Some(m) = madt_phys.filter(|&m| m != phys.as_u64()) {
            log::warn!(
                "apic: MADT says the local APIC is at {m:#x}, IA32_APIC_BASE says {:#x}; using the MSR",
                phys.as_u64()
            );
        }
        let virt: VirtAddr = crate::kvmap::map_mmio(PhysAddr::new(phys.as_u64()), 1);
        XAPIC_BASE.store(virt.as_u64(), Ordering::Relaxed);
    }
    MODE.store(if mode == ApicMode::XApic { 1 } else { 2 }, Ordering::Release);
    init_this_cpu();
    mode
}

/// Enables this CPU's APIC in the chosen mode and programs the vectors it
/// raises by itself. Call on every CPU after [`init_boot_cpu`] ran on the
/// boot CPU; the timer stays off until [`timer_start_periodic`].
pub fn init_this_cpu() {
    let mode = mode().expect("apic::init_boot_cpu has not run");
    let (frame, mut flags) = ApicBase::read();
    flags |= ApicBaseFlags::LAPIC_ENABLE;
    if mode == ApicMode::X2Apic {
        flags |= ApicBaseFlags::X2APIC_ENABLE;
    }
    // SAFETY: keeps the firmware's base address; enabling the APIC (and
    // x2APIC mode, which the CPU reported) only changes how this CPU's own
    // APIC is reached.
    unsafe { ApicBase::write(frame, flags) };
    write(Reg::TaskPriority, 0);
    // The PICs are masked, so LINT0's ExtINT would only ever deliver junk.
    write(Reg::LvtLint0, Lvt::MASKED.bits());
    write(Reg::LvtError, u32::from(vectors::ERROR));
    write(Reg::LvtTimer, Lvt::MASKED.bits() | u32::from(vectors::TIMER));
    write(Reg::SpuriousVector, Svr::APIC_ENABLE.bits() | u32::from(vectors::SPURIOUS));
    // The error status register latches on a write; clear stale errors.
    write(Reg::ErrorStatus, 0);
    write(Reg::ErrorStatus, 0);
}

/// This CPU's APIC ID as the APIC reports it.
pub fn id() -> u32 {
    match mode() {
        Some(ApicMode::X2Apic) => read(Reg::Id),
        Some(ApicMode::XApic) => read(Reg::Id) >> 24,
        None => panic!("local APIC used before init"),
    }
}

/// This CPU's APIC ID as CPUID reports it (x2APIC ID from leaf 0xB when the
/// CPU has that leaf, else the 8-bit initial ID from leaf 1). Usable before
/// the APIC is enabled, which the AP start-up path needs.
pub fn id_from_cpuid() -> u32 {
    use core::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    let (max, leaf1) = unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(1, 0)) };
    if max >= 0xb {
        // SAFETY: CPUID exists on every x86_64 CPU and has no side effects;
        // leaf 0xB exists (max >= 0xB).
        #[allow(unused_unsafe)]
        let b = unsafe { __cpuid_count(0xb, 0) };
        if b.ebx != 0 {
            return b.edx;
        }
    }
    leaf1.ebx >> 24
}

/// Version register: (version, max LVT entry).
pub fn version() -> (u8, u8) {
    let v = read(Reg::Version);
    (v as u8, (v >> 16) as u8)
}

/// Signals end of interrupt for the interrupt being serviced.
#[inline]
pub fn eoi() {
    write(Reg::Eoi, 0);
}

/// Reads and clears the error status register.
pub fn take_errors() -> u32 {
    write(Reg::ErrorStatus, 0);
    read(Reg::ErrorStatus)
}

/// Sends one IPI.
pub fn send(ipi: Ipi) {
    let mode = mode().expect("IPI before the APIC was initialised");
    let (low, dest) = ipi.encode(mode);
    crate::irq::without_interrupts(|| match mode {
        ApicMode::X2Apic => {
            // A WRMSR to the x2APIC ICR is not serialising: without a fence
            // the target could take the interrupt before it can see the
            // request this CPU wrote just before (Intel SDM 11.12.3; Linux's
            // weak_wrmsr_fence).
            // SAFETY: fences have no other effect; the ICR write sends the
            // IPI encoded above in x2APIC mode, which is enabled.
            unsafe {
                core::arch::asm!("mfence; lfence", options(nostack, preserves_flags));
                Msr::new(0x830).write(u64::from(dest) << 32 | u64::from(low));
            }
        }
        ApicMode::XApic => {
            // One command at a time: wait until the previous one was accepted.
            // Interrupts are off so nothing on this CPU can interleave its
            // own two-word command with ours.
            while read(Reg::IcrLow) & IcrFlags::DELIVERY_PENDING.bits() != 0 {
                core::hint::spin_loop();
            }
            write(Reg::IcrHigh, dest);
            write(Reg::IcrLow, low);
        }
    });
}

/// Sends a fixed interrupt on `vector` to the CPU with APIC ID `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) {
    send(Ipi { mode: DeliveryMode::Fixed, vector, dest: Destination::Apic(apic_id) });
}

/// Sends an NMI to the CPU with APIC ID `apic_id`.
pub fn send_nmi(apic_id: u32) {
    send(Ipi { mode: DeliveryMode::Nmi, vector: 0, dest: Destination::Apic(apic_id) });
}

/// Measures the timer's input rate against the TSC (10 ms, timer masked,
/// divide by 16). Call once, on the boot CPU, with interrupts off; every
/// CPU's timer runs from the same clock. Returns ticks per second.
///
/// Under a hypervisor the vCPU can be descheduled at any instruction. A
/// pause in the middle of the window is harmless (both clocks keep running),
/// but a pause between starting the APIC count and reading the TSC (or
/// between the final TSC read and the count read) skews the result. So each
/// register access is bracketed by TSC reads, the rate is taken over the
/// bracket, and the first round whose brackets are tight (under 0.5% of the
/// window) wins, or else the tightest of them all.
pub fn timer_calibrate() -> u64 {
    const ROUNDS: usize = 50;
    const WINDOW_US: u64 = 10_000;
    let per_us = crate::time::tsc_per_us().expect("TSC not calibrated");
    write(Reg::TimerDivide, TIMER_DIVIDE_BY_16);
    write(Reg::LvtTimer, Lvt::MASKED.bits() | u32::from(vectors::TIMER));
    let mut best: Option<(u64, u64)> = None; // (bracket slack, ticks per second)
    for _ in 0..ROUNDS {
        let t0 = crate::time::rdtsc();
        write(Reg::TimerInitialCount, u32::MAX);
        let t1 = crate::time::rdtsc();
        while crate::time::rdtsc() < t1 + WINDOW_US * per_us {
            core::hint::spin_loop();
        }
        let t2 = crate::time::rdtsc();
        let count = read(Reg::TimerCurrentCount);
        let t3 = crate::time::rdtsc();
        write(Reg::TimerInitialCount, 0);
        let elapsed = u64::from(u32::MAX - count);
        // The count ran from somewhere in [t0, t1] to somewhere in [t2, t3];
        // take the middles, and remember how uncertain they are.
        let tsc = ((t2 + t3) - (t0 + t1)) / 2;
        let slack = (t1 - t0) + (t3 - t2);
        let rate = (u128::from(elapsed) * u128::from(per_us) * 1_000_000 / u128::from(tsc.max(1))) as u64;
        if best.is_none_or(|(s, _)| slack < s) {
            best = Some((slack, rate));
        }
        if slack * 200 < tsc {
            break;
        }
    }
    let per_sec = best.map_or(0, |(_, r)| r);
    TIMER_TICKS_PER_SEC.store(per_sec, Ordering::Relaxed);
    per_sec
}

/// Timer input ticks per second (divide by 16), 0 before calibration.
pub fn timer_ticks_per_sec() -> u64 {
    TIMER_TICKS_PER_SEC.load(Ordering::Relaxed)
}

/// Starts this CPU's timer firing [`vectors::TIMER`] `hz` times a second.
pub fn timer_start_periodic(hz: u32) {
    let per_sec = timer_ticks_per_sec();
    assert!(per_sec > 0, "APIC timer not calibrated");
    let count = (per_sec / u64::from(hz)).clamp(1, u64::from(u32::MAX)) as u32;
    write(Reg::TimerDivide, TIMER_DIVIDE_BY_16);
    write(Reg::LvtTimer, Lvt::TIMER_PERIODIC.bits() | u32::from(vectors::TIMER));
    write(Reg::TimerInitialCount, count);
}

/// Stops this CPU's timer.
pub fn timer_stop() {
    write(Reg::LvtTimer, Lvt::MASKED.bits() | u32::from(vectors::TIMER));
    write(Reg::TimerInitialCount, 0);
}
