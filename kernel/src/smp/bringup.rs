//! Starting the application processors: reading the MADT, deciding which
//! CPUs to start and their logical numbers (boot CPU = 0, then MADT order),
//! and starting them one at a time through the trampoline: INIT-SIPI-SIPI,
//! wait until it runs on its own stack, next. Each AP finishes its own set-up
//! in parallel ([`ap_main`]) and marks itself online.

use alloc::boxed::Box;
use alloc::vec::Vec;

use arch::acpi::MadtCpu;
use arch::apic::{self, ApicMode};
use arch::gdt::CpuTables;
use arch::percpu::{self, NR_CPUS};
use arch::smp::{ApStart, StartError, TRAMPOLINE_PAGES, Trampoline};
use bootloader_api::info::MemoryRegions;

use super::TICK_HZ;

/// How long the boot CPU waits for one AP to reach the kernel after its
/// start-up IPIs. Generous for TCG with many vCPUs on few host cores.
const AP_START_TIMEOUT_US: u64 = 2_000_000;
/// How long it waits, after the last start, for all APs to finish bring-up.
const AP_ONLINE_TIMEOUT_US: u64 = 10_000_000;
/// Boot stack of an AP: it runs the AP's bring-up, then is given up when the
/// boot context hands the CPU to the scheduler.
const AP_BOOT_STACK: usize = 32 * 1024;

/// What the firmware's MADT says about the CPUs.
pub struct Madt {
    /// The local APIC's physical address (`None` without a usable MADT).
    pub local_apic_phys: Option<u64>,
    /// Enabled processors, each APIC ID once (firmware may list a CPU in
    /// both an xAPIC and an x2APIC entry).
    pub enabled: Vec<MadtCpu>,
}

/// Reads the MADT; without a usable one the machine runs on the boot CPU.
pub fn read_madt(rsdp: Option<u64>, phys_offset: u64) -> Madt {
    let mut cpus: Vec<MadtCpu> = Vec::new();
    // SAFETY: `rsdp` comes from the bootloader, and physical memory is
    // mapped at `phys_offset` (checked by the caller).
    let summary = unsafe { arch::acpi::enumerate_cpus(rsdp, phys_offset, |c| cpus.push(c)) };
    let local_apic_phys = match summary {
        Ok(m) => Some(m.local_apic_phys),
        Err(e) => {
            log::warn!("smp: no usable MADT ({e:?}); running on the boot CPU only");
            None
        }
    };
    let mut enabled: Vec<MadtCpu> = Vec::new();
    for c in cpus.iter().filter(|c| c.is_enabled()) {
        if !enabled.iter().any(|e| e.apic_id == c.apic_id) {
            enabled.push(*c);
        }
    }
    Madt { local_apic_phys, enabled }
}

/// The APs to start, in logical-number order (the first is CPU 1).
pub struct Plan {
    /// The APs to start.
    pub aps: Vec<MadtCpu>,
    /// Enabled processors left offline because they exceed `NR_CPUS`.
    pub beyond_nr_cpus: usize,
    /// Non-existent CPUs added by `smp_phantom=` (0 or 1).
    pub phantoms: usize,
}

/// Numbers the enabled CPUs other than the boot CPU in MADT order, leaving
/// out those beyond `NR_CPUS` and, in xAPIC mode, those whose APIC ID needs
/// x2APIC, and adds the `smp_phantom=` CPU if the command line asks.
pub fn plan(enabled: &[MadtCpu], bsp_apic: u32, mode: ApicMode) -> Plan {
    let mut aps: Vec<MadtCpu> = enabled.iter().filter(|c| c.apic_id != bsp_apic).copied().collect();
    if !enabled.is_empty() && aps.len() == enabled.len() {
        log::warn!("smp: the boot CPU's APIC ID {bsp_apic} is not in the MADT");
    }
    let mut beyond_nr_cpus = 0;
    if aps.len() > NR_CPUS - 1 {
        let dropped: Vec<u32> = aps[NR_CPUS - 1..].iter().map(|c| c.apic_id).collect();
        beyond_nr_cpus = dropped.len();
        log::warn!("smp: {beyond_nr_cpus} CPUs beyond NR_CPUS={NR_CPUS} stay offline (APIC IDs {dropped:?})");
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
    if let Some(id) = crate::boot::cmdline::read().value("smp_phantom").and_then(|v| v.parse::<u32>().ok())
        && aps.len() < NR_CPUS - 1
        && id != bsp_apic
        && !enabled.iter().any(|c| c.apic_id == id)
    {
        log::info!("smp: adding phantom CPU with APIC ID {id} (smp_phantom): it must time out");
        aps.push(MadtCpu {
            apic_id: id,
            acpi_uid: u32::MAX,
            flags: arch::acpi::LocalApicFlags::ENABLED,
            x2apic_entry: false,
        });
        phantoms = 1;
    }
    Plan { aps, beyond_nr_cpus, phantoms }
}

/// Finds the low memory for the trampoline: the lowest run of
/// [`TRAMPOLINE_PAGES`] pages below 1 MiB (skipping page 0) that the boot
/// memory map reports usable. The frame allocator never hands out the first
/// MiB (see `boot/mem_init.rs`), so these pages stay ours for good, which an
/// AP that wakes up late relies on.
fn trampoline_phys(regions: &MemoryRegions) -> Option<u64> {
    let size = (TRAMPOLINE_PAGES * 4096) as u64;
    (1..0x100u64)
        .map(|page| page * 4096)
        .filter(|&p| p + size <= crate::boot::mem_init::LOW_MEMORY_END)
        .find(|&p| crate::boot::mem_init::is_usable(regions, p, p + size))
}

/// Starts `aps` as CPUs 1, 2, ... one at a time, then waits for all of them
/// to come online. Returns how many did not.
pub fn start_aps(aps: &[MadtCpu], regions: &MemoryRegions) -> usize {
    if aps.is_empty() {
        return 0;
    }
    let Some(phys) = trampoline_phys(regions) else {
        log::warn!("smp: no usable low memory for the AP trampoline; running on the boot CPU only");
        return aps.len();
    };
    // SAFETY: the pages are usable RAM below 1 MiB, which nothing else uses
    // (the frame allocator excludes the first MiB), and `smp::init` ran
    // `kvmap::init` before calling us.
    let tramp = unsafe { Trampoline::install(phys) };
    log::debug!("smp: trampoline at {phys:#x}");
    let mut failed = 0;
    let mut started: Vec<(usize, u32)> = Vec::new();
    for (i, c) in aps.iter().enumerate() {
        let cpu = i + 1;
        match start_one(&tramp, cpu, c.apic_id) {
            Ok(()) => started.push((cpu, c.apic_id)),
            Err(e) => {
                failed += 1;
                log::error!("smp: CPU {cpu} (APIC ID {}) did not start: {e:?}; continuing without it", c.apic_id);
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
    failed
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
