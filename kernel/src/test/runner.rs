//! The in-kernel test runner.
//!
//! Output protocol (parsed by xtask, shaped like libtest):
//!
//! ```text
//! running 12 tests
//! test kernel::boot::heap::tests::alloc_free_stress ... ok
//! test mm::frame::tests::exhaust ... FAILED
//!     panicked at mm/src/frame.rs:88: free count 10 != 12
//! not run: mm::frame::tests::merge, kernel::smp::tests::ipi
//! 11 passed, 1 failed
//! ```
//!
//! `test NAME ... ` is written before the test runs, so a hang is attributed
//! to the right test; if anything is logged meanwhile, the finished line is
//! printed again in full. A panic ends the run (there is no unwinding in this
//! kernel): the panicking test is reported FAILED with its message and the
//! remaining tests are listed as not run. The summary line `N passed, M
//! failed` always stands alone on the last line.

use alloc::vec::Vec;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicUsize, Ordering};

use arch::qemu::ExitCode;
use arch::{print, println};
use ktest::KTest;
use spin::Once;

use crate::boot::cmdline::Cmdline;

/// Tests selected for this run, in order.
static SELECTED: Once<Vec<&'static KTest>> = Once::new();
/// 1 + index of the running test, or 0 when none is running.
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PASSED: AtomicUsize = AtomicUsize::new(0);

/// Marker in a test's path for the runner's own deliberately failing tests;
/// they run only when the command line says `selftests`.
const SELFTEST_MODULE: &str = "::selftest::";

/// Runs the tests the command line selects and returns the run's status.
pub fn run(cmdline: &Cmdline) -> ExitCode {
    let filter = cmdline.value("filter").unwrap_or("");
    let selftests = cmdline.flag("selftests");
    let tests = SELECTED.call_once(|| {
        ktest::all()
            .iter()
            // Several substrings may be given, comma-separated: any match selects.
            .filter(|t| filter.split(',').any(|f| t.name.contains(f)))
            .filter(|t| selftests || !t.name.contains(SELFTEST_MODULE))
            .collect()
    });
    println!("running {} test{}", tests.len(), if tests.len() == 1 { "" } else { "s" });
    for (i, test) in tests.iter().enumerate() {
        CURRENT.store(i + 1, Ordering::SeqCst);
        let generation = arch::serial::write_fmt_tracked(format_args!("test {} ... ", test.name));
        (test.func)();
        CURRENT.store(0, Ordering::SeqCst);
        PASSED.fetch_add(1, Ordering::SeqCst);
        if !arch::serial::write_fmt_if_unchanged(generation, format_args!("ok\n")) {
            println!("test {} ... ok", test.name);
        }
    }
    summary(0);
    ExitCode::Success
}

fn summary(failed: usize) {
    println!("{} passed, {} failed", PASSED.load(Ordering::SeqCst), failed);
}

/// Reports the running test (if any) as failed with the panic's message, lists
/// the tests that will not run, and prints the summary.
pub fn on_panic(info: &PanicInfo) {
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    fail_current(format_args!("panicked at {file}:{line}: {}", info.message()));
}

/// Same as [`on_panic`] for an oops (the details are already printed).
pub fn on_fatal() {
    fail_current(format_args!("kernel oops (see above)"));
}

/// Same as [`on_panic`] for a lockup the watchdog reported (above).
pub fn on_lockup() {
    fail_current(format_args!("lockup: the watchdog stopped every CPU (see above)"));
}

fn fail_current(why: core::fmt::Arguments) {
    let current = CURRENT.swap(0, Ordering::SeqCst);
    let Some(tests) = SELECTED.get() else { return };
    if current == 0 {
        return; // Not inside a test: the panic output speaks for itself.
    }
    let index = current - 1;
    arch::serial::write_fmt_forced(format_args!("test {} ... FAILED\n    {why}\n", tests[index].name));
    let rest = &tests[index + 1..];
    if !rest.is_empty() {
        print!("not run ({}): ", rest.len());
        for (i, t) in rest.iter().enumerate() {
            print!("{}{}", if i == 0 { "" } else { ", " }, t.name);
        }
        println!();
    }
    summary(1);
}
