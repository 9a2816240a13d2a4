//! Bringing every CPU online, and the kernel's side of what CPUs do to each
//! other: interrupt vectors, the timer tick, IPIs, the cross-CPU barrier.
//!
//! The mechanism lives in `arch` (ACPI, local APIC, trampoline, cross-call
//! channels, TLB shoot-down); this module decides the policy: which CPUs to
//! start and in what order, how long to wait for them, how logical CPU
//! numbers are assigned (boot CPU = 0, then MADT order), what the boot
//! summary says, and what each vector does.
//!
//! * [`init`] (here): the boot order, on the boot CPU with interrupts off:
//!   kernel window (`kvmap`), MADT, local APIC (x2APIC if the CPU has it),
//!   timer calibration, the APs, the boot CPU's timer, then one IPI round
//!   trip to every CPU proves the IPI path before anything relies on it.
//! * `bringup`: which APs to start, and starting them one at a time:
//!   INIT-SIPI-SIPI, wait until it runs on its own stack, next. Each AP
//!   finishes its own set-up in parallel (`ap_main`) and marks itself online.
//! * `irq`: what each vector does, and the per-CPU interrupt counts.
//! * `barrier`: [`Barrier`], for lining CPUs up.
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

mod barrier;
mod bringup;
mod irq;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use arch::apic::{self, ApicMode};
pub use arch::cpumask::CpuMask;
pub use arch::ipi::{on_cpus, on_each_cpu};
use arch::percpu;
pub use arch::tlb::{PendingFlush, TlbRange, shootdown};
pub use barrier::Barrier;
use bootloader_api::info::MemoryRegions;
pub use irq::{handle_irq, kick, reschedules, set_tick_handler, ticks};
use spin::Once;

/// Timer interrupts per second on every CPU.
pub const TICK_HZ: u32 = 100;

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

/// Brings up every CPU the firmware lists (up to `NR_CPUS`). Call once on
/// the boot CPU, after the heap and before anything uses IPIs.
pub fn init(rsdp: Option<u64>, regions: &MemoryRegions, phys_offset: u64) {
    arch::kvmap::init(phys_offset);
    let madt = bringup::read_madt(rsdp, phys_offset);

    let mode = apic::init_boot_cpu(arch::cpu::features(), madt.local_apic_phys);
    let bsp_apic = apic::id();
    percpu::set_apic_id(bsp_apic);
    let ticks_per_sec = apic::timer_calibrate();
    arch::ipi::set_present_cpus(madt.enabled.len().max(1));
    percpu::mark_online();

    let plan = bringup::plan(&madt.enabled, bsp_apic, mode);
    let failed = bringup::start_aps(&plan.aps, regions);

    apic::timer_start_periodic(TICK_HZ);
    INFO.call_once(|| SmpInfo {
        madt_enabled: madt.enabled.len(),
        beyond_nr_cpus: plan.beyond_nr_cpus,
        failed,
        mode,
        phantoms: plan.phantoms,
    });
    prove_ipi_path();
    report(mode, ticks_per_sec);
}

/// One cross call to every online CPU, each answering once: the IPI path
/// works end to end.
fn prove_ipi_path() {
    let answered = AtomicUsize::new(0);
    on_each_cpu(|| {
        answered.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(answered.load(Ordering::Relaxed), percpu::online_count(), "IPI round trip lost CPUs");
}

/// The boot summary's SMP line.
fn report(mode: ApicMode, ticks_per_sec: u64) {
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

#[cfg(target_os = "none")]
mod tests;
