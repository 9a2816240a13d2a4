//! The test runner's own failure paths, exercised by `cargo xtask test`'s
//! self-test: these run only when the command line says `selftests` (xtask
//! boots them with a filter and expects the run to FAIL, or to time out).

#[cfg(target_os = "none")]
mod selftest {
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
}
