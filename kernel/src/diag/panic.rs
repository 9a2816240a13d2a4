//! The panic handler: message, location, CPU and a backtrace, then the test
//! runner's verdict and a failure exit through `isa-debug-exit`.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

/// Set by the first panic; a panic while printing one exits at once.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    arch::irq::disable();
    // Stop the other CPUs (NMI) before printing, so the report is not
    // interleaved with their output and they stop changing state. If another
    // CPU is already dying, let its report stand and stop here.
    if !arch::ipi::stop_other_cpus() {
        arch::ipi::park();
    }
    if PANICKING.swap(true, Ordering::SeqCst) {
        arch::serial::write_fmt_forced(format_args!(
            "\nnested panic on CPU {}: {}\n",
            arch::percpu::cpu_id(),
            info.message()
        ));
        arch::qemu::exit(arch::qemu::ExitCode::Failure);
    }
    let cpu = arch::percpu::cpu_id();
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    arch::serial::write_fmt_forced(format_args!(
        "\nKERNEL PANIC on CPU {cpu}: {}\n  at {file}:{line}\n",
        info.message()
    ));
    let others = arch::percpu::online_count().saturating_sub(1);
    if others > 0 {
        arch::serial::write_fmt_forced(format_args!(
            "  stopped {} of {others} other CPUs (NMI)\n",
            arch::ipi::stopped_count()
        ));
    }
    let rip = panic as *const () as u64;
    arch::trap::backtrace::print(rip, arch::trap::backtrace::current_rbp());
    crate::test::runner::on_panic(info);
    arch::qemu::exit(arch::qemu::ExitCode::Failure)
}
