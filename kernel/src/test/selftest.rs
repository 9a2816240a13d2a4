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

/// A write into a frame after it was freed (what a stale TLB entry or a
/// kept pointer does): debug builds' page poisoning reports it when the
/// frame is handed out again, naming the frame and its last owner.
#[ktest]
fn deliberate_use_after_free() {
    let frame = mm::alloc_pages(0).expect("a frame");
    let (pfn, virt) = (frame.pfn(), frame.virt());
    drop(frame);
    // SAFETY: deliberately unsound: writes into a frame this test freed, to
    // prove the allocator notices. The frame is free RAM mapped by the
    // direct map, so the store itself cannot fault.
    unsafe { virt.add(0x40).cast::<u64>().write_volatile(0xbad) };
    // The frame sits at the head of this CPU's cache: the next allocation
    // here takes it and must report the write.
    let again = mm::alloc_pages(0).expect("a frame");
    panic!("the write after free went unnoticed (freed {pfn:?}, got {:?} back)", again.pfn());
}

/// Two CPUs take two locks in opposite orders (ABBA) and wait for each
/// other for good: the lockup watchdog must stop every CPU and name, for
/// each, the lock it waits for, its holder and where the holder took it.
/// The locks are of the untracked level, so the lock-order checker lets
/// the inversion happen (it only orders the memory manager's levels).
#[ktest]
fn deliberate_abba_deadlock() {
    use core::sync::atomic::{AtomicUsize, Ordering};

    use mm::lock::{LockClass, LockLevel, RawSpinLock};
    static A: RawSpinLock = RawSpinLock::new(LockClass::Other);
    static B: RawSpinLock = RawSpinLock::new(LockClass::Other);
    /// How many of the two CPUs hold their first lock.
    static HOLDING: AtomicUsize = AtomicUsize::new(0);

    #[track_caller]
    fn take_both(first: &'static RawSpinLock, second: &'static RawSpinLock) -> ! {
        let _first = first.lock(LockLevel::Untracked);
        HOLDING.fetch_add(1, Ordering::SeqCst);
        while HOLDING.load(Ordering::SeqCst) < 2 {
            core::hint::spin_loop();
        }
        let _second = second.lock(LockLevel::Untracked);
        panic!("took both locks of an ABBA pair: the other CPU did not hold its first");
    }
    extern "C" fn b_then_a(_: usize) -> ! {
        take_both(&B, &A)
    }
    let me = arch::percpu::cpu_id();
    let other = crate::workload::storm::online().into_iter().find(|&c| c != me).expect("needs two CPUs");
    let t = crate::sched::Task::new_kernel("abba".into(), other, b_then_a, 0).expect("task");
    crate::sched::spawn(t);
    take_both(&A, &B)
}
