//! A reusable spinning barrier for CPUs (the tests line CPUs up with it).

use core::sync::atomic::{AtomicUsize, Ordering};

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
        // A round passed: progress, even with interrupts off for many rounds
        // (the barrier has its own timeout for a CPU that never arrives).
        crate::diag::watchdog::touch();
    }
}
