//! Per-CPU page-fault statistics: how many faults each CPU resolved and how
//! many TSC cycles `handle_mm_fault` took, as a histogram precise enough for
//! a p99 (16 buckets per power of two, ~4% wide).
//!
//! Everything is per CPU and written only by its CPU, so recording a fault
//! touches no shared cache line (a global counter would itself serialise the
//! storms this kernel exists to scale).

use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU32, AtomicU64};

use arch::percpu::NR_CPUS;

const SUB: usize = 16;
const BUCKETS: usize = 40 * SUB; // up to 2^40 cycles

/// One CPU's histogram; cache-line aligned so neighbours never share a line.
#[repr(align(64))]
struct CpuFaults {
    count: AtomicU64,
    cycles: AtomicU64,
    hist: [AtomicU32; BUCKETS],
}

static CPUS: [CpuFaults; NR_CPUS] = [const {
    CpuFaults { count: AtomicU64::new(0), cycles: AtomicU64::new(0), hist: [const { AtomicU32::new(0) }; BUCKETS] }
}; NR_CPUS];

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

/// Records one resolved fault on this CPU.
#[inline]
pub fn record(cycles: u64) {
    let c = &CPUS[arch::percpu::cpu_id()];
    c.count.store(c.count.load(Relaxed) + 1, Relaxed);
    c.cycles.store(c.cycles.load(Relaxed) + cycles, Relaxed);
    let h = &c.hist[bucket(cycles)];
    h.store(h.load(Relaxed) + 1, Relaxed);
}

/// A snapshot of the counters (all CPUs, or one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Faults resolved.
    pub faults: u64,
    /// Mean cycles per fault.
    pub mean_cycles: u64,
    /// 99th percentile (bucket floor).
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
    let cycles: u64 = cpus.clone().map(|c| CPUS[c].cycles.load(Relaxed)).sum();
    let mut p99 = 0;
    if faults > 0 {
        let target = faults - faults / 100;
        let mut seen = 0u64;
        for b in 0..BUCKETS {
            seen += cpus.clone().map(|c| CPUS[c].hist[b].load(Relaxed) as u64).sum::<u64>();
            if seen >= target {
                p99 = bucket_floor(b);
                break;
            }
        }
    }
    Summary { faults, mean_cycles: cycles.checked_div(faults).unwrap_or(0), p99_cycles: p99 }
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

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
