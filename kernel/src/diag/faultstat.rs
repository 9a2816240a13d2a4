//! Per-CPU page-fault statistics: how many faults each CPU resolved and how
//! many TSC cycles `handle_mm_fault` took, as a histogram precise enough for
//! a p99 (16 buckets per power of two, ~4% wide).
//!
//! Everything is per CPU and written only by its CPU, so recording a fault
//! touches no shared cache line (a global counter would itself serialise the
//! storms this kernel exists to scale).
//!
//! Every fault is counted, but only one in [`time_every`] is timed (the
//! `fault_time_every=N` command-line option, a power of two so the choice
//! is a mask, not a division, on the fault path; 1 times them all). Reading the
//! TSC is not free where it matters most here: under QEMU's TCG each guest
//! `rdtsc` takes one global spin lock inside QEMU (`cpu_get_ticks`) and
//! writes a variable every vCPU shares, so two reads per fault made the
//! measurement a cache line that every vCPU's faults bounce between host
//! cores. The mean and the p99 of a one-in-eight sample of a storm's
//! hundreds of thousands of faults are as good as those of all of them.

use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU32, AtomicU64};

use arch::percpu::NR_CPUS;

const SUB: usize = 16;
const BUCKETS: usize = 40 * SUB; // up to 2^40 cycles

/// One CPU's counters; cache-line aligned so neighbours never share a line.
#[repr(align(64))]
struct CpuFaults {
    /// Faults resolved.
    count: AtomicU64,
    /// The timed faults' cycles in all, and their histogram (whose sum is
    /// how many were timed).
    cycles: AtomicU64,
    hist: [AtomicU32; BUCKETS],
}

static CPUS: [CpuFaults; NR_CPUS] = [const {
    CpuFaults { count: AtomicU64::new(0), cycles: AtomicU64::new(0), hist: [const { AtomicU32::new(0) }; BUCKETS] }
}; NR_CPUS];

/// The default of [`time_every`].
pub const DEFAULT_TIME_EVERY: u64 = 8;

/// One fault in this many is timed (set once at boot).
static TIME_EVERY: AtomicU64 = AtomicU64::new(DEFAULT_TIME_EVERY);

/// One fault in how many is timed.
pub fn time_every() -> u64 {
    TIME_EVERY.load(Relaxed)
}

/// Sets [`time_every`] (`fault_time_every=N` at boot): a power of two.
pub fn set_time_every(n: u64) {
    assert!(n.is_power_of_two(), "fault_time_every={n}: not a power of two");
    TIME_EVERY.store(n, Relaxed);
}

fn bucket(cycles: u64) -> usize {
    if cycles < SUB as u64 {
        return cycles as usize;
    }
    let log = 63 - cycles.leading_zeros() as usize; // >= 4
    let frac = ((cycles >> (log - 4)) & (SUB as u64 - 1)) as usize;
    ((log - 3) * SUB + frac).min(BUCKETS - 1)
}

/// Lower bound of a bucket, in cycles.
fn bucket_floor(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let log = b / SUB + 3;
    let frac = (b % SUB) as u64;
    (1u64 << log) | (frac << (log - 4))
}

/// Called as a fault starts: the TSC if this CPU's next fault is one of the
/// timed ones, else `None` (no `rdtsc`). Pass the result to [`record`].
#[inline]
pub fn start() -> Option<u64> {
    let c = &CPUS[arch::percpu::cpu_id()];
    (c.count.load(Relaxed) & (time_every() - 1) == 0).then(arch::time::rdtsc)
}

/// Records one resolved fault on this CPU, and its cycles if [`start`]
/// timed it. (A task that moved to another CPU in between is counted
/// there; the sample stays a sample.)
#[inline]
pub fn record(start: Option<u64>) {
    let c = &CPUS[arch::percpu::cpu_id()];
    c.count.store(c.count.load(Relaxed) + 1, Relaxed);
    if let Some(start) = start {
        let cycles = arch::time::rdtsc().wrapping_sub(start);
        c.cycles.store(c.cycles.load(Relaxed) + cycles, Relaxed);
        let h = &c.hist[bucket(cycles)];
        h.store(h.load(Relaxed) + 1, Relaxed);
    }
}

/// A snapshot of the counters (all CPUs, or one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Faults resolved.
    pub faults: u64,
    /// Mean cycles per fault (of the timed ones).
    pub mean_cycles: u64,
    /// 99th percentile of the timed faults (bucket floor).
    pub p99_cycles: u64,
}

/// Clears every CPU's counters (call while no storm runs).
pub fn reset() {
    for c in &CPUS {
        c.count.store(0, Relaxed);
        c.cycles.store(0, Relaxed);
        for h in &c.hist {
            h.store(0, Relaxed);
        }
    }
}

/// Summary over `cpus`.
pub fn summary(cpus: impl Iterator<Item = usize> + Clone) -> Summary {
    let faults: u64 = cpus.clone().map(|c| CPUS[c].count.load(Relaxed)).sum();
    let in_bucket = |b: usize| cpus.clone().map(|c| CPUS[c].hist[b].load(Relaxed) as u64).sum::<u64>();
    let timed: u64 = (0..BUCKETS).map(in_bucket).sum();
    let cycles: u64 = cpus.clone().map(|c| CPUS[c].cycles.load(Relaxed)).sum();
    let mut p99 = 0;
    if timed > 0 {
        let target = timed - timed / 100;
        let mut seen = 0u64;
        for b in 0..BUCKETS {
            seen += in_bucket(b);
            if seen >= target {
                p99 = bucket_floor(b);
                break;
            }
        }
    }
    Summary { faults, mean_cycles: cycles.checked_div(timed).unwrap_or(0), p99_cycles: p99 }
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    /// Every fault is counted; one in `time_every` is timed, and only the
    /// timed ones reach the mean and the histogram.
    #[ktest]
    fn one_fault_in_n_is_timed() {
        use core::sync::atomic::Ordering::Relaxed;
        let was = super::time_every();
        // Interrupts off: no fault or migration between the reads below.
        x86_64::instructions::interrupts::without_interrupts(|| {
            let c = &super::CPUS[arch::percpu::cpu_id()];
            let timed_of = || c.hist.iter().map(|h| h.load(Relaxed) as u64).sum::<u64>();
            let (count, timed) = (c.count.load(Relaxed), timed_of());
            super::set_time_every(4);
            let starts = (0..16).filter(|_| {
                let s = super::start();
                super::record(s);
                s.is_some()
            });
            assert_eq!(starts.count(), 4, "one of every four faults timed");
            assert_eq!(c.count.load(Relaxed) - count, 16, "every fault counted");
            assert_eq!(timed_of() - timed, 4);
            super::set_time_every(1);
            assert!(super::start().is_some(), "time_every 1 times every fault");
        });
        super::set_time_every(was);
    }

    /// Buckets are monotonic, contain their values and are ~6% wide.
    #[ktest]
    fn histogram_buckets_are_tight() {
        let mut last = 0;
        for c in [1u64, 15, 16, 17, 100, 1000, 1234, 5000, 65_535, 1 << 20, (1 << 33) + 7] {
            let b = super::bucket(c);
            assert!(b >= last, "bucket order at {c}");
            last = b;
            let floor = super::bucket_floor(b);
            assert!(floor <= c, "floor {floor} above {c}");
            assert!(c - floor <= c / 16 + 1, "bucket of {c} too wide (floor {floor})");
        }
    }
}
