//! How long a cache line takes to go from one vCPU to another and back: the
//! benchmark's measure of where the host has placed its vCPUs.
//!
//! Every fault of a storm on two CPUs moves lines between them (the PTE
//! table's lock, the entries beside each other in one table line, the VMA's
//! lock; under TCG also the emulator's own locks). What one such move costs
//! is not the kernel's doing: on the machines this project measures on (two
//! vCPUs of a cloud VM) the round trip between the two host CPUs changes from
//! about 100 ns to about 500 ns, and back, as the hypervisor below moves them
//! between cores that share a cache and cores that do not. The benchmark
//! measures the round trip after each timed window, so a slow window can be
//! told apart from a slow kernel.
//!
//! The measure is a ping-pong on one line: this CPU writes an odd number, a
//! task on the other CPU answers with the next even one, and so on. Neither
//! side executes `pause` while it waits: under TCG `pause` leaves the
//! translated code for QEMU's main loop, and the loop would then time the
//! emulator, not the line. The waits are bounded (a few microseconds each on
//! any machine that runs both vCPUs), and a deadline ends a measurement the
//! other CPU never answers.

use alloc::string::String;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::sync::atomic::{AtomicBool, AtomicU64};

/// The line the two CPUs pass between them, alone on its cache line.
#[repr(align(64))]
struct Line(AtomicU64);

/// Odd: the pinging CPU's turn is over, the answering task's has come;
/// even: the reverse. Written by the two sides of one measurement; held by
/// `MEASURING` for its whole length.
static LINE: Line = Line(AtomicU64::new(0));

/// Taken by a measurement (a try-lock: a second one at the same time gets
/// `None`). Protects `LINE` and `DEADLINE`.
static MEASURING: AtomicBool = AtomicBool::new(false);

/// Loads between two deadline checks: under TCG `rdtsc` is a call into the
/// emulator, which would add to every pass if made on every load.
const SPINS_PER_CHECK: u32 = 256;

/// Ends the answering task's loop.
const DONE: u64 = u64::MAX;

/// The TSC value at which the answering task gives up if it never sees
/// `DONE` (set before the task is spawned).
static DEADLINE: AtomicU64 = AtomicU64::new(0);

/// The answering side: runs on the other CPU until `DONE` or the deadline.
extern "C" fn answer(_: usize) -> ! {
    let deadline = DEADLINE.load(Relaxed);
    let mut spins = 0u32;
    loop {
        let v = LINE.0.load(Acquire);
        if v == DONE {
            break;
        }
        if v % 2 == 1 {
            LINE.0.store(v + 1, Release);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CHECK) && arch::time::rdtsc() > deadline {
            break;
        }
    }
    crate::sched::exit_current(0)
}

/// The mean round trip, in nanoseconds, of `trips` passes of one cache line
/// from this CPU to `other` and back; `None` if `other` did not answer within
/// a second (it is not running, or the host kept its vCPU off a core), or
/// if another measurement is under way.
pub fn round_trip_ns(other: usize, trips: u64) -> Option<u64> {
    debug_assert_ne!(other, arch::percpu::cpu_id(), "a round trip needs two CPUs");
    if MEASURING.swap(true, Acquire) {
        return None;
    }
    let r = measure(other, trips);
    MEASURING.store(false, Release);
    r
}

/// [`round_trip_ns`] with `MEASURING` held.
fn measure(other: usize, trips: u64) -> Option<u64> {
    let tsc_per_ms = arch::time::tsc_per_us().unwrap_or(1000) * 1000;
    let deadline = arch::time::rdtsc() + 1000 * tsc_per_ms;
    LINE.0.store(0, Relaxed);
    DEADLINE.store(deadline, Relaxed);
    let task = crate::sched::Task::new_kernel(String::from("round-trip"), other, answer, 0)?;
    let task = crate::sched::spawn(task);
    // The first pass also waits for the task to start: not timed.
    let mut ok = pass(1, deadline);
    let start = arch::time::rdtsc();
    let mut v = 3;
    while ok && v < 2 * trips + 3 {
        ok = pass(v, deadline);
        v += 2;
    }
    let cycles = arch::time::rdtsc() - start;
    LINE.0.store(DONE, Release);
    task.join();
    ok.then(|| arch::time::cycles_to_ns(cycles) / trips.max(1))
}

/// Sends `v` (odd) and waits for `v + 1`; false at the deadline.
fn pass(v: u64, deadline: u64) -> bool {
    LINE.0.store(v, Release);
    let mut spins = 0u32;
    while LINE.0.load(Acquire) != v + 1 {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CHECK) && arch::time::rdtsc() > deadline {
            return false;
        }
    }
    true
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    use super::*;

    /// With two CPUs or more, the line goes to every other CPU and back, and
    /// each round trip takes a time a machine can have (more than nothing,
    /// less than the deadline's second); a second measurement while one is
    /// under way gets none, and the line is free again after it.
    #[ktest]
    fn the_line_goes_to_every_other_cpu_and_back() {
        let me = arch::percpu::cpu_id();
        for other in crate::workload::storm::online().into_iter().filter(|&c| c != me) {
            let ns = round_trip_ns(other, 200).unwrap_or_else(|| panic!("CPU {other} did not answer"));
            assert!(ns > 0 && ns < 1_000_000_000 / 200, "CPU {me} <-> {other}: {ns} ns a round trip");
        }
        let Some(other) = crate::workload::storm::online().into_iter().find(|&c| c != me) else { return };
        MEASURING.store(true, Relaxed);
        assert_eq!(round_trip_ns(other, 10), None, "a measurement ran beside another");
        MEASURING.store(false, Relaxed);
        assert!(round_trip_ns(other, 10).is_some(), "the line stayed taken after a measurement");
    }
}
