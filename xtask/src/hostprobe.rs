//! How much of the host's CPUs the bench is getting right now.
//!
//! The 1 -> 2 vCPU ratios need both host cores. On a shared machine (these
//! machines are themselves VMs) a neighbour can take part of a core for
//! minutes; the 2-vCPU runs then lose 10-15% while the 1-vCPU runs, which
//! leave a core free, do not. The probe runs the same fixed integer work on
//! `n` threads at once and compares each thread's time with one thread's
//! alone: 1.0 means every thread ran at full speed. The bench probes around
//! every boot and flags target ratios whose runs saw a busy host.

use std::time::{Duration, Instant};

/// Rounds of the work loop per thread: about 0.1 s on these machines.
const WORK: u64 = 40_000_000;

fn work() -> Duration {
    let start = Instant::now();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..WORK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    start.elapsed()
}

/// One thread's time for the work on an otherwise idle host.
pub struct HostProbe {
    solo: Duration,
    host_cpus: usize,
}

impl HostProbe {
    /// Times the work alone (the best of three runs).
    pub fn calibrate(host_cpus: usize) -> Self {
        let solo = (0..3).map(|_| work()).min().unwrap_or(Duration::from_millis(1));
        Self { solo, host_cpus: host_cpus.max(1) }
    }

    /// Mean speed of `threads` threads running the work at once, relative to
    /// one thread alone (capped at the host's CPU count: more threads than
    /// CPUs would measure sharing, not the host).
    pub fn capacity(&self, threads: usize) -> f64 {
        let n = threads.clamp(1, self.host_cpus);
        let times: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|_| s.spawn(work)).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Duration::MAX)).collect()
        });
        let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / n as f64;
        (self.solo.as_secs_f64() / mean).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_solo_time_over_mean_thread_time() {
        // A baseline far faster than any real run: the host looks busy.
        let busy = HostProbe { solo: Duration::from_nanos(1), host_cpus: 1 };
        assert!(busy.capacity(1) < 0.01);
        // A baseline far slower: full speed, capped at 1.
        let idle = HostProbe { solo: Duration::from_secs(1000), host_cpus: 2 };
        assert_eq!(idle.capacity(8), 1.0);
    }

    #[test]
    fn one_thread_on_an_idle_host_is_near_full_speed() {
        let p = HostProbe::calibrate(1);
        let c = p.capacity(1);
        // Generous bounds: the test host may be busy (cargo runs tests in
        // parallel); the point is the scale (a fraction of 1, not 0 or 100).
        assert!(c > 0.2 && c <= 1.0, "capacity {c}");
    }
}
