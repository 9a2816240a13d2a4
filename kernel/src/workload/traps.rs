//! `mode=bench workload=traps`: exception round trips, the floor under every
//! fault storm (`cargo xtask bench --workloads traps`).
//!
//! Each page a storm makes present costs the CPU one exception: the `#PF`,
//! its entry, the handler and `iretq`. This workload measures that part
//! alone. Every online CPU, in a cross-call with interrupts off, loads from a
//! non-canonical address through the exception table's probe
//! (`arch::trap::extable::probe_read_u64`) until its time is up. Each load
//! raises `#GP`, the trap entry saves the registers, the dispatcher finds
//! the fixup, and `iretq` resumes there. No memory manager, no lock, and no
//! cache line is shared between the CPUs, so on hardware the rate per CPU
//! is the same at any CPU count.
//!
//! Under QEMU's TCG it is not. QEMU takes its global lock (the BQL) around
//! the delivery of every guest exception (`cpu_handle_exception` in
//! accel/tcg/cpu-exec.c), so the vCPUs of one VM deliver their exceptions
//! one at a time, and this workload's 1 -> 2 ratio is about 1x. A storm
//! holds that lock for a small part of each fault, so it loses much less
//! (README, "Performance", with the `populate` workload, which does a
//! fault's work without the exception).
//!
//! The result has the storms' format: a window's `faults` are its
//! exceptions, its time the span from the first CPU's start to the last
//! CPU's end, and `waiting_cycles` the CPUs' time in that span outside
//! their own loops.

use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use arch::percpu::NR_CPUS;
use arch::qemu::ExitCode;

use super::storm::online;
use crate::smp::Barrier;

/// Canonical addresses have bits 63:47 all equal; this one does not, so a
/// load from it raises `#GP` without a page-table walk or a page fault.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;

/// Exceptions between two looks at the clock and the watchdog.
const BATCH: u64 = 64;

/// One CPU's part of a window.
#[derive(Clone, Copy, Debug, Default)]
struct Lap {
    /// Loads tried.
    tries: u64,
    /// Of those, the ones that raised the exception (all of them, unless
    /// the address is not what this module says).
    traps: u64,
    /// TSC when it started and ended.
    start: u64,
    end: u64,
}

/// A window: every online CPU takes exceptions for `cycles` of its own TSC.
fn window(cycles: u64) -> Vec<Lap> {
    let n = online().len();
    let laps: [[AtomicU64; 4]; NR_CPUS] = [const { [const { AtomicU64::new(0) }; 4] }; NR_CPUS];
    let barrier = Barrier::new(n);
    arch::ipi::on_each_cpu(|| {
        barrier.wait();
        let start = arch::time::rdtsc();
        let (mut tries, mut traps) = (0, 0);
        let mut now = start;
        while now.wrapping_sub(start) < cycles {
            for _ in 0..BATCH {
                traps += u64::from(arch::trap::extable::probe_read_u64(NON_CANONICAL).is_err());
            }
            tries += BATCH;
            // Interrupts stay off for the whole window: say it progresses.
            crate::diag::watchdog::touch();
            now = arch::time::rdtsc();
        }
        for (slot, v) in laps[arch::percpu::cpu_id()].iter().zip([tries, traps, start, now]) {
            slot.store(v, Relaxed);
        }
    });
    online()
        .into_iter()
        .map(|c| {
            let [tries, traps, start, end] = laps[c].each_ref().map(|a| a.load(Relaxed));
            Lap { tries, traps, start, end }
        })
        .collect()
}

/// Runs a warm-up and `windows` timed windows of `window_ms` each, and
/// prints the `BENCH-RESULT` line.
pub fn bench(windows: u64, window_ms: u64) -> ExitCode {
    let n = online().len() as u64;
    let Some(per_us) = arch::time::tsc_per_us() else {
        log::error!("bench: traps needs a calibrated TSC");
        return ExitCode::Failure;
    };
    if window_ms == 0 {
        log::error!("bench: traps needs window_ms > 0 (its windows are a time, not passes)");
        return ExitCode::Failure;
    }
    log::info!("bench: traps on {n} CPUs, 1 warm-up + {windows} windows of {window_ms} ms");
    let mut json_windows = Vec::new();
    let (mut all_traps, mut busy) = (0u64, 0u64);
    for w in 0..=windows {
        let laps = window(window_ms * 1000 * per_us);
        if let Some(l) = laps.iter().find(|l| l.traps != l.tries) {
            log::error!("bench: traps: {} of {} loads did not raise an exception", l.tries - l.traps, l.tries);
            return ExitCode::Failure;
        }
        let traps: u64 = laps.iter().map(|l| l.traps).sum();
        let first = laps.iter().map(|l| l.start).min().unwrap_or(0);
        let last = laps.iter().map(|l| l.end).max().unwrap_or(0);
        let span = last.wrapping_sub(first).max(1);
        let own: u64 = laps.iter().map(|l| l.end.wrapping_sub(l.start)).sum();
        let waiting = (span * n).saturating_sub(own);
        let label = if w == 0 { "warm-up".into() } else { format!("window {w}/{windows}") };
        let each: Vec<_> = laps.iter().map(|l| format!("{}", l.traps)).collect();
        log::info!(
            "bench: {label}: {traps} exception round trips in {} us ({} per CPU: {}), {} cycles each",
            arch::time::cycles_to_ns(span) / 1000,
            traps / n,
            each.join(" "),
            own / traps.max(1)
        );
        if w > 0 {
            all_traps += traps;
            busy += own;
            json_windows.push(format!(
                "{{\"faults\":{traps},\"cycles\":{span},\"touched\":{traps},\"min_faults\":{traps},\"present\":0,\"lost_races\":0,\"spurious_faults\":0,\"waiting_cycles\":{waiting}}}"
            ));
        }
    }
    let mean = busy / all_traps.max(1);
    arch::println!(
        "BENCH-RESULT {{\"workload\":\"traps\",\"cpus\":{n},\"tsc_per_us\":{per_us},\"split_pte_ptlocks\":{},\"fault_lock\":\"{}\",\"stats_cycles\":0,\"windows\":[{}],\"lock_halts\":0,\"lock_kicks\":0,\"cycles_per_fault_mean\":{mean},\"cycles_per_fault_p99\":0,\"locks\":{{}},\"mm\":{{}}}}",
        mm::config::USE_SPLIT_PTE_PTLOCKS,
        super::bench::fault_lock_name(),
        json_windows.join(",")
    );
    ExitCode::Success
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    use super::*;

    /// Every CPU takes exceptions for the whole window, and every load it
    /// tried raised one: the workload measures exception round trips, not
    /// loads that succeed.
    #[ktest]
    fn every_cpu_takes_an_exception_per_load_for_its_window() {
        let cycles = 20_000 * arch::time::tsc_per_us().expect("TSC calibrated");
        let laps = window(cycles);
        assert_eq!(laps.len(), online().len());
        for (cpu, lap) in online().into_iter().zip(&laps) {
            assert!(lap.tries > 0, "CPU {cpu} tried no load: {lap:?}");
            assert_eq!(lap.traps, lap.tries, "CPU {cpu}: loads that did not raise an exception: {lap:?}");
            assert!(lap.end.wrapping_sub(lap.start) >= cycles, "CPU {cpu} stopped before its time: {lap:?}");
        }
    }
}
