//! Per-lock-class statistics: acquisitions, contended acquisitions, cycles spent
//! spinning. The benchmark reads them to show where a fault storm waits.
//!
//! Counters are sharded per CPU (each shard on its own cache line) and updated
//! with `this_cpu_add`, so counting does not itself become the contended
//! cache line the split locks exist to avoid, nor cost a locked instruction
//! per acquisition. A read sums the shards; it is exact once the counted work
//! has finished.

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use super::LockClass;
use crate::config::NR_CPUS;
use crate::percpu::this_cpu_add;

/// One shard per CPU: `this_cpu_add` needs each shard to have one writer.
const SHARDS: usize = NR_CPUS;
const N: usize = LockClass::COUNT;

#[repr(align(64))]
struct Shard {
    acquisitions: [AtomicU64; N],
    contended: [AtomicU64; N],
    spin_cycles: [AtomicU64; N],
}

impl Shard {
    const fn new() -> Self {
        Self {
            acquisitions: [const { AtomicU64::new(0) }; N],
            contended: [const { AtomicU64::new(0) }; N],
            spin_cycles: [const { AtomicU64::new(0) }; N],
        }
    }
}

static STATS: [Shard; SHARDS] = [const { Shard::new() }; SHARDS];

/// Totals for one lock class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockStats {
    /// Times a lock of the class was taken.
    pub acquisitions: u64,
    /// Of those, how many found it held and had to spin.
    pub contended: u64,
    /// Cycles (HAL cycle counter) spent spinning.
    pub spin_cycles: u64,
}

#[inline]
pub(crate) fn record(class: u8, contended: bool, cycles: u64) {
    let c = (class as usize).min(N - 1);
    let s = &STATS[crate::hal::cpu_id() % SHARDS];
    this_cpu_add(&s.acquisitions[c], 1);
    if contended {
        this_cpu_add(&s.contended[c], 1);
        this_cpu_add(&s.spin_cycles[c], cycles);
    }
}

/// The totals for `class`, summed over CPUs.
pub fn lock_stats(class: LockClass) -> LockStats {
    let c = class as usize;
    STATS.iter().fold(LockStats::default(), |acc, s| LockStats {
        acquisitions: acc.acquisitions + s.acquisitions[c].load(Relaxed),
        contended: acc.contended + s.contended[c].load(Relaxed),
        spin_cycles: acc.spin_cycles + s.spin_cycles[c].load(Relaxed),
    })
}

/// Zeroes every counter (between benchmark runs).
pub fn reset_lock_stats() {
    for s in &STATS {
        for c in 0..N {
            s.acquisitions[c].store(0, Relaxed);
            s.contended[c].store(0, Relaxed);
            s.spin_cycles[c].store(0, Relaxed);
        }
    }
}
