//! What the kernel runs when it is not testing: the fault storms ([`storm`]),
//! the system-call fuzzer ([`fuzz`]), the soak (`mode=soak`, [`soak`]),
//! the benchmark built on them (`mode=bench`, [`bench`](mod@bench)), and here the
//! default workload of `cargo xtask run` (`mode=run`): the self-checks, then
//! a short fault storm on every CPU with one line per CPU and the totals.

pub mod bench;
pub mod fork;
pub mod fuzz;
mod roundtrip;
pub mod soak;
pub mod storm;
pub mod traps;

use abi::storm::{MODE_TOUCH, PATTERN_BLOCKS, Params};
use arch::qemu::ExitCode;

use self::storm::{BASE, Spec, online, run as run_storm};
use crate::boot::selfcheck;
use crate::diag::faultstat;

/// Per CPU and round: 4 MiB (1024 first-touch faults).
const PER_CPU: u64 = 4 << 20;
const ROUNDS: u64 = 4;

/// Runs everything; success only if every part succeeded.
pub fn run() -> ExitCode {
    let mut status = selfcheck::run();
    let cpus = online();
    let n = cpus.len();
    faultstat::reset();
    let before = mm::nr_free_pages();
    let params = Params {
        mode: MODE_TOUCH,
        pattern: PATTERN_BLOCKS,
        base: BASE,
        len: n as u64 * PER_CPU,
        threads: n as u64,
        rounds: ROUNDS,
        remap_between_rounds: 1,
        ..Params::default()
    };
    log::info!(
        "storm: {n} ring-3 threads of one address space, {} MiB each, {ROUNDS} rounds (the region is re-mapped between rounds, so every round faults again)",
        PER_CPU >> 20
    );
    let out = match run_storm(&Spec { params, premap: Some(mm::MapFlags::empty()), cpus: cpus.clone() }) {
        Ok(o) => o,
        Err(e) => {
            log::error!("storm: could not start: {e:?}");
            return ExitCode::Failure;
        }
    };
    let per_us = arch::time::tsc_per_us().unwrap_or(1);
    for (i, r) in out.reports.iter().enumerate() {
        let cpu = out.cpus[i];
        let s = faultstat::summary(core::iter::once(cpu));
        let us = (r.end_cycles - r.start_cycles) / per_us;
        log::info!(
            "storm cpu{cpu}: {} pages touched, {} faults in {}.{:03} ms ({} faults/s), fault cost mean {} / p99 {} cycles, {} mismatches, exit {}",
            r.touched,
            s.faults,
            us / 1000,
            us % 1000,
            (s.faults * 1_000_000).checked_div(us).unwrap_or(0),
            s.mean_cycles,
            s.p99_cycles,
            r.mismatches,
            out.exit_codes[i],
        );
    }
    let all = faultstat::summary(cpus.iter().copied());
    let span_us = out.span_cycles() / per_us;
    storm::settle();
    let leaked = before as i64 - mm::nr_free_pages() as i64;
    log::info!(
        "storm total: {} faults on {n} CPUs in {}.{:03} ms = {} faults/s; mean {} cycles ({} ns), p99 {} cycles; {} mismatches; {} lost races; frames leaked: {leaked}",
        all.faults,
        span_us / 1000,
        span_us % 1000,
        (all.faults * 1_000_000).checked_div(span_us).unwrap_or(0),
        all.mean_cycles,
        arch::time::cycles_to_ns(all.mean_cycles),
        all.p99_cycles,
        out.mismatches(),
        out.stats.lost_races,
    );
    let s = out.stats;
    let tables = mm::phys().table_rcu_stats();
    log::info!(
        "storm locks: {} faults under their VMA's lock, {} under mmap_lock ({} fell back: {} VMA write-locked, {} not found, {} detached); {} walks restarted; {} page tables freed after a grace period ({} grace periods)",
        s.vma_lock_faults,
        s.mmap_lock_faults,
        s.vma_fallback_locked + s.vma_fallback_not_found + s.vma_fallback_detached,
        s.vma_fallback_locked,
        s.vma_fallback_not_found,
        s.vma_fallback_detached,
        s.retries,
        tables.freed,
        crate::rcu::grace_periods(),
    );
    if out.mismatches() != 0 || out.exit_codes.iter().any(|&c| c != 0) || leaked != 0 {
        log::error!("storm: FAILED");
        status = ExitCode::Failure;
    }
    status
}
