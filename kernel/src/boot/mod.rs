//! The boot sequence: the bootloader's entry point, [`kernel_main`], and the
//! set-up it runs in order (memory, heap, command line, self-checks).
//!
//! Boot order (`kernel_main`): the boot CPU's own state (per-CPU base,
//! console, GDT/TSS, IDT, TSC), logging, trap policy, the heap, CPU
//! protection features, the other CPUs (`smp::init`: ACPI, local APIC, AP
//! start-up, timer), the scheduler with its tick and kick, then the command
//! line decides between the default workload and the in-kernel test runner.
//! The machine powers off at the end with a status QEMU reports to the host
//! (see `arch::qemu`).

pub mod cmdline;
pub mod heap;
pub mod mem_init;
pub mod selfcheck;

use arch::qemu::{self, ExitCode};
use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{BootInfo, entry_point};

use crate::diag::logger;
use crate::test::runner;
use crate::workload::{self, bench};
use crate::{kstack, mmhal, sched, smp, traps, uspace};

/// Where the bootloader maps all of physical memory (the direct map): PML4
/// slot 256, the first upper-half slot. Fixed so addresses read the same in
/// every boot and in gdb.
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;

/// Bootloader settings, embedded in the kernel ELF.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::FixedAddress(PHYS_OFFSET));
    // Keep everything the bootloader places dynamically (stack, boot info,
    // framebuffer) in the upper half: slots 0..256 belong to user space.
    config.mappings.dynamic_range_start = Some(0xffff_c000_0000_0000);
    config.mappings.dynamic_range_end = Some(0xffff_d000_0000_0000);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    arch::init_boot_cpu();
    logger::init();
    traps::install();
    let phys_offset = boot_info.physical_memory_offset.into_option().expect("bootloader did not map physical memory");
    assert_eq!(phys_offset, PHYS_OFFSET, "direct map is not where the config asked");

    mmhal::install();
    let mem = mem_init::init(&boot_info.memory_regions, phys_offset);
    kstack::init(phys_offset);

    let features = arch::cpu::features();
    let enabled = arch::cpu::enable_protection(features);
    let cmdline = cmdline::read();
    smp::init(boot_info.rsdp_addr.into_option(), &boot_info.memory_regions, phys_offset);
    let pcp = mem_init::size_pcp_caches(arch::percpu::online_count());

    let mut brand = [0u8; 48];
    let memmap = mm::memmap_stats();
    log::info!(
        "boot: {} MiB usable RAM in {} regions; heap {} MiB at phys {:#x}; {} free frames; memmap {} KiB ({} B per page, {}.{:04}% of RAM)",
        mem.usable >> 20,
        mem.regions,
        mem.heap_size >> 20,
        mem.heap_phys,
        mm::nr_free_pages(),
        memmap.overhead_bytes >> 10,
        memmap.page_descriptor_bytes,
        memmap.overhead_ppm / 10_000,
        memmap.overhead_ppm % 10_000,
    );
    // Linux `virt_spin_lock` trades FIFO fairness for test-and-set in a guest,
    // so a descheduled vCPU next in line does not hold up every CPU behind it
    // (mm/src/lock/spinlock.rs: a waiter starved for a millisecond queues
    // for a ticket, which bounds the unfairness). On bare metal, FIFO.
    let hypervisor = features.contains(arch::cpu::Features::HYPERVISOR);
    // Under a hypervisor, a waiter that spun for a while also halts its vCPU
    // until the unlocker kicks it, giving the host core to the holder
    // (mm/src/lock/halt.rs; spinlocks and mmap_lock).
    let (test_and_set, halt) = match cmdline.value("spinlock") {
        None | Some("auto") => (hypervisor, hypervisor),
        Some("ticket") => (false, false),
        Some("tas") => (true, false),
        Some("tas-halt") => (true, true),
        Some(other) => panic!("spinlock={other:?}: expected auto, ticket, tas or tas-halt"),
    };
    mm::lock::set_virt_spinlocks(test_and_set);
    mm::lock::set_halting_waiters(halt);
    match cmdline.value("fault_lock") {
        None | Some("vma") => mm::memory::set_fault_locking(mm::memory::FaultLocking::PerVma),
        Some("mmap") => mm::memory::set_fault_locking(mm::memory::FaultLocking::MmapLock),
        Some(other) => panic!("fault_lock={other:?}: expected vma or mmap"),
    }
    if let Some(v) = cmdline.value("fault_time_every") {
        match v.parse::<u64>() {
            Ok(n) if n.is_power_of_two() => crate::diag::faultstat::set_time_every(n),
            _ => panic!("fault_time_every={v:?}: expected a power of two (1, 2, 4, 8, ...)"),
        }
    }
    log::info!(
        "boot: page-table locks: {}; spinlocks {}; faults lock {}",
        mm::describe_config(),
        if mm::lock::virt_spinlocks() && mm::lock::halting_waiters() {
            "test-and-set, a ticket after 1 ms of losing, waiters (mmap_lock's too) halt after 25 µs until kicked (under a hypervisor: a descheduled vCPU does not hold up the line, and waiters give the host core back)"
        } else if mm::lock::virt_spinlocks() {
            "test-and-set, a ticket after 1 ms of losing (under a hypervisor: a descheduled vCPU does not hold up the line)"
        } else {
            "FIFO tickets"
        },
        match mm::memory::fault_locking() {
            mm::memory::FaultLocking::PerVma => "their VMA (per-VMA locks, mmap_lock only as a fallback)",
            mm::memory::FaultLocking::MmapLock => "mmap_lock shared (fault_lock=mmap)",
        }
    );
    log::info!(
        "boot: kernel stacks {} KiB + {} KiB guard (up to {}); per-CPU frame caches of {} frames ({} MiB) each, growing to {} ({} MiB) for a CPU that recycles more",
        kstack::STACK_SIZE >> 10,
        kstack::GUARD_SIZE >> 10,
        kstack::MAX_STACKS,
        pcp.high,
        pcp.high >> 8,
        pcp.high_max,
        pcp.high_max >> 8,
    );
    log::info!(
        "boot: CPU \"{}\", TSC {} MHz, features {:?}, enabled {:?}",
        arch::cpu::brand(&mut brand),
        arch::time::tsc_per_us().unwrap_or(0),
        features,
        enabled,
    );
    log::info!(
        "boot: {} CPU{} online; build {}; command line \"{}\"",
        arch::percpu::online_count(),
        if arch::percpu::online_count() == 1 { "" } else { "s" },
        if cfg!(debug_assertions) { "debug" } else { "release" },
        cmdline.raw(),
    );

    sched::init_cpu("init");
    uspace::init_cpu();
    sched::set_kick(smp::kick);
    smp::set_tick_handler(tick);
    let watchdog = crate::diag::watchdog::init(cmdline);
    if watchdog == 0 {
        log::info!("boot: lockup watchdog off");
    } else {
        log::info!(
            "boot: lockup watchdog: {watchdog} s spinning on one lock, or {} s without a timer tick, stops every CPU and reports",
            watchdog * crate::diag::watchdog::TICK_LIMIT_SECS / crate::diag::watchdog::SPIN_LIMIT_SECS
        );
    }
    // Kernel code is not preempted (the tick only preempts ring 3), so the
    // boot task can take interrupts from here on: ticks, IPIs.
    arch::irq::enable();
    // Failure injection: armed now (boot itself runs without), except for
    // the test runner, whose injection test arms it for itself, and the
    // soak, which arms it for some phases.
    if !matches!(cmdline.mode(), cmdline::Mode::Test | cmdline::Mode::Soak) {
        arm_failure_injection(cmdline);
    }
    let status = match cmdline.mode() {
        cmdline::Mode::Test => runner::run(cmdline),
        cmdline::Mode::Run => workload::run(),
        cmdline::Mode::Bench => bench::run(cmdline),
        cmdline::Mode::Soak => workload::soak::run(cmdline),
    };
    log::info!("powering off ({})", if status == ExitCode::Success { "success" } else { "failure" });
    qemu::exit(status)
}

/// `fail=SITE:1/N,...` and `fail_seed=S` (`mm::FaultInject::configure`):
/// frame, page-table, allocated-`ptl` and (fallible) heap allocations fail
/// at those rates from now on. Returns whether anything was armed.
pub fn arm_failure_injection(cmdline: &cmdline::Cmdline) -> bool {
    let Some(spec) = cmdline.value("fail") else { return false };
    let inject = mm::phys().fault_inject();
    let seed = cmdline.value("fail_seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    inject.set_seed(seed);
    if let Err(e) = inject.configure(spec) {
        panic!("fail={spec}: {}", e.0);
    }
    log::info!("boot: failure injection armed: fail={spec} fail_seed={seed}");
    true
}

/// Every CPU's timer tick: the lockup watchdog's stamp, then the scheduler.
fn tick(from_user: bool) {
    crate::diag::watchdog::tick();
    sched::tick(from_user);
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    /// The machine came up the way the boot summary claims: running on CPU 0
    /// in ring 0 with our GDT, a calibrated TSC, a working heap, and the
    /// protection features on that the CPU offers.
    #[ktest]
    fn boot_smoke() {
        use x86_64::instructions::segmentation::{CS, Segment};
        assert_eq!(CS::get_reg(), arch::gdt::KERNEL_CS);
        assert!(arch::time::tsc_per_us().is_some_and(|t| t > 10), "TSC not calibrated");
        let v = alloc::vec![1u32; 1000];
        assert_eq!(v.iter().sum::<u32>(), 1000);
        let f = arch::cpu::features();
        let cr4 = x86_64::registers::control::Cr4::read();
        use x86_64::registers::control::Cr4Flags;
        if f.contains(arch::cpu::Features::SMEP) {
            assert!(cr4.contains(Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION));
        }
        if f.contains(arch::cpu::Features::SMAP) {
            assert!(cr4.contains(Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION));
        }
        let kernel_fn = boot_smoke as *const () as u64;
        assert!(kernel_fn >= 0xffff_ffff_8000_0000, "kernel not linked in the upper half");
    }
}
