//! The test runner's own failure paths, exercised by `cargo xtask test`'s
//! self-test: these run only when the command line says `selftests` (xtask
//! boots them with a filter and expects the run to FAIL, or to time out).

use ktest::ktest;

/// An assertion that fails: the run must be reported as failed.
#[ktest]
fn deliberate_failure() {
    let answer = 6 * 7;
    assert_eq!(answer, 43, "deliberate failure (runner self-test)");
}

/// A test that never finishes: xtask's timeout must name it.
#[ktest]
fn deliberate_hang() {
    loop {
        core::hint::spin_loop();
    }
}

/// A wild kernel page fault inside a test: reported as an oops and FAILED.
#[ktest]
fn deliberate_oops() {
    // SAFETY: deliberately unsound: reads an unmapped address to prove an
    // oops inside a test fails the run with registers and a backtrace.
    let v = unsafe { core::ptr::read_volatile(0xffff_e000_0bad_0000 as *const u64) };
    core::hint::black_box(v);
}

/// A kernel task that recurses without end runs into the guard page
/// below its stack: a double fault whose oops says "kernel stack
/// overflow" (instead of the stack silently overwriting memory).
#[ktest]
fn deliberate_stack_overflow() {
    #[inline(never)]
    #[allow(unconditional_recursion)] // the point: it only ends in the guard page
    fn recurse(depth: u64) -> u64 {
        // 512 bytes of live locals per frame: the 32 KiB stack is gone
        // after ~60 frames.
        let frame = core::hint::black_box([depth; 64]);
        recurse(depth + 1).wrapping_add(frame[(depth % 64) as usize])
    }
    extern "C" fn overflow(_: usize) -> ! {
        let v = recurse(0);
        crate::sched::exit_current(v as i64)
    }
    let cpu = arch::percpu::cpu_id();
    let t = crate::sched::Task::new_kernel("overflow".into(), cpu, overflow, 0).expect("task");
    let code = crate::sched::spawn(t).join();
    panic!("the overflowing task exited with {code} instead of hitting its guard page");
}
