//! `mode=soak`: a seeded random mix on every CPU for a set time, checked
//! after every phase (`cargo xtask soak`, and a short one in `cargo xtask
//! test`).
//!
//! Command line: `soak_secs=N` (default 30), `soak_seed=S` (default 1),
//! `soak_phase_ms=M` (about how long a phase runs, default 3000).
//!
//! A phase draws, from the seed and its number, what runs at once:
//! * fault storms of every kind in turn (disjoint, one shared PTE table,
//!   one shared page, the map/touch/unmap cycle with its zero check, faults
//!   racing DONTNEED with table reclaim, MAP_FIXED remaps, THP splits,
//!   the lockless walker, mremap moves, MADV_COLLAPSE), on random CPUs and
//!   sizes, one after another for the phase's time;
//! * system-call fuzzers (which also fork, mmap, munmap, mprotect, madvise
//!   and mremap at random) on some CPUs meanwhile;
//! * process and thread churn: short processes that touch memory and exit,
//!   and threads joining and leaving one address space;
//! * now and then out-of-memory pressure: random frame, page-table and
//!   `ptl` failures (failure injection), under which storm threads may get
//!   `-ENOMEM` or be killed with their process.
//!
//! After every phase, with everything joined and injection off, the
//! invariants: free frames and allocated `ptl`s back to their baseline
//! (after detached page tables' grace periods: `storm::settle`), the heap
//! back to its baseline, every storm's address space's RSS counter equal
//! to the pages its page tables map, no lock held on any CPU (the lock-order
//! checker's records; it panics on an order violation itself), no storm
//! thread with a wrong tag, no fuzzer call that succeeded where it must
//! fail. A failure prints the seed and the phase (`SOAK FAILED: seed S,
//! phase P: ...`); a panic follows the phase's `soak: phase P` line. Once a
//! minute a progress line; at the end one `SOAK-RESULT {json}` line.

use alloc::format;
use alloc::sync::Arc;
use alloc::vec::Vec;

use abi::rng::Rng;
use abi::storm::{self, Params};
use arch::qemu::ExitCode;
use mm::MapFlags;
use mm::ptlock::FailSite;

use super::fuzz;
use super::storm::{
    BASE, HUGE, PAGE, Spec, StormError, online, params as storm_params, run as run_storm, settle, settle_frames,
    settle_heap,
};
use crate::boot::cmdline::Cmdline;
use crate::sched::Task;
use crate::uspace::{AddressSpace, KILLED, spawn_user};

/// What the soak has done so far.
#[derive(Default, Debug)]
struct Totals {
    phases: u64,
    storms: u64,
    storm_threads: u64,
    storm_kills: u64,
    storms_not_started: u64,
    fuzz_calls: u64,
    fuzzers: u64,
    processes: u64,
    threads: u64,
    injected: u64,
    injected_phases: u64,
}

/// The invariants' baseline.
struct Baseline {
    frames: u64,
    ptls: u64,
    heap: usize,
}

fn baseline() -> Baseline {
    settle();
    Baseline { frames: mm::nr_free_pages(), ptls: mm::phys().nr_allocated_ptlocks(), heap: crate::boot::heap::used() }
}

/// A random storm on a random subset of `cpus`.
fn random_storm(r: &mut Rng, cpus: &[usize], pressure: bool) -> (&'static str, Spec) {
    let mut use_cpus: Vec<usize> = cpus.iter().copied().filter(|_| !r.chance(3)).collect();
    if use_cpus.is_empty() {
        use_cpus.push(cpus[r.below(cpus.len() as u64) as usize]);
    }
    let n = (use_cpus.len() as u64).max(2);
    let rounds = 1 + r.below(3);
    let base =
        |mode, pattern, len| Params { tolerate_oom: pressure as u64, ..storm_params(mode, pattern, len, n, rounds) };
    let special = |mode| Params { special_threads: 1, special_mode: mode, tolerate_loss: 1, ..Params::default() };
    let pages = 16 + r.below(256);
    // The mremap mover expects each move to work: not under pressure. (Its
    // back-to-back mmap_lock write holds once starved the faults' read
    // holds for seconds; the lock now lets waiting readers in between two
    // writers, mm/src/lock/rwlock.rs.)
    let kind = match r.below(10) {
        8 if pressure => 0,
        k => k,
    };
    let (name, params, premap) = match kind {
        0 => ("disjoint", base(storm::MODE_TOUCH, storm::PATTERN_BLOCKS, n * pages * PAGE), Some(MapFlags::empty())),
        1 => ("same-table", base(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, HUGE), Some(MapFlags::empty())),
        2 => ("same-page", base(storm::MODE_TOUCH, storm::PATTERN_SAME, 64 * PAGE), Some(MapFlags::empty())),
        3 => ("cycle", Params { base: 0, verify: 1, ..base(storm::MODE_CYCLE, 0, pages * PAGE) }, None),
        4 => (
            "dontneed",
            Params {
                rounds: 4,
                ..merge(base(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, 2 * HUGE), special(storm::MODE_DONTNEED))
            },
            Some(MapFlags::empty()),
        ),
        5 => (
            "remap",
            Params {
                rounds: 10,
                ..merge(base(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, 64 * PAGE), special(storm::MODE_REMAPPER))
            },
            Some(MapFlags::empty()),
        ),
        6 => (
            "thp-split",
            merge(
                base(storm::MODE_TOUCH, storm::PATTERN_HUGE_MIX, 2 * HUGE),
                Params { tolerate_loss: 0, ..special(storm::MODE_SPLITTER) },
            ),
            Some(MapFlags::HUGEPAGE),
        ),
        7 => (
            "gup",
            merge(base(storm::MODE_GUP, storm::PATTERN_INTERLEAVED, 2 * HUGE), special(storm::MODE_DONTNEED)),
            Some(MapFlags::empty()),
        ),
        8 => (
            "mremap",
            Params {
                aux: BASE + 2 * HUGE - 32 * PAGE,
                ..merge(
                    base(storm::MODE_TOUCH, storm::PATTERN_BLOCKS, 2 * HUGE - 64 * PAGE),
                    Params { tolerate_loss: 0, ..special(storm::MODE_MREMAP) },
                )
            },
            Some(MapFlags::empty()),
        ),
        _ => (
            "collapse",
            merge(base(storm::MODE_GUP, storm::PATTERN_INTERLEAVED, 2 * HUGE), special(storm::MODE_COLLAPSE)),
            Some(MapFlags::empty()),
        ),
    };
    (name, Spec { params, premap, cpus: use_cpus })
}

/// `p` with the special-thread fields (and loss tolerance) of `s`.
fn merge(p: Params, s: Params) -> Params {
    Params { special_threads: s.special_threads, special_mode: s.special_mode, tolerate_loss: s.tolerate_loss, ..p }
}

/// Short processes (touch some memory, exit) and a churn of threads
/// joining and leaving one address space, on `cpus`.
fn churn(r: &mut Rng, cpus: &[usize], t: &mut Totals) -> Result<(), alloc::string::String> {
    let mut tasks: Vec<Arc<Task>> = Vec::new();
    let mut spaces = Vec::new();
    for _ in 0..1 + r.below(4) {
        let Ok(space) = AddressSpace::with_programs() else { continue };
        let len = (1 + r.below(64)) * PAGE;
        if space.mm.mmap(Some(mm::VirtAddr::new(BASE)), len, mm::Prot::READ | mm::Prot::WRITE, MapFlags::FIXED).is_err()
        {
            continue;
        }
        let cpu = cpus[r.below(cpus.len() as u64) as usize];
        if let Ok(task) = spawn_user(&space, cpu, abi::program::TOUCH_RANGE, [BASE, len]) {
            tasks.push(task);
            t.processes += 1;
        }
        spaces.push(space);
    }
    if let Ok(space) = AddressSpace::with_programs() {
        for _ in 0..2 + r.below(8) {
            let cpu = cpus[r.below(cpus.len() as u64) as usize];
            if let Ok(task) = spawn_user(&space, cpu, abi::program::EXIT_WITH, [cpu as u64, 0]) {
                let code = task.join();
                if code != cpu as i64 && code != KILLED {
                    return Err(format!("a churn thread on CPU {cpu} exited with {code}"));
                }
                t.threads += 1;
            }
        }
    }
    for task in tasks {
        let code = task.join();
        if code != 0 && code != KILLED {
            return Err(format!("a churn process saw {code} wrong values in its memory"));
        }
    }
    drop(spaces);
    Ok(())
}

/// One phase; `Err` names what broke.
fn phase(r: &mut Rng, cpus: &[usize], phase_ms: u64, t: &mut Totals) -> Result<(), alloc::string::String> {
    let inject = mm::phys().fault_inject();
    let pressure = r.chance(4);
    let injected_before: u64 = FailSite::ALL.iter().map(|&s| inject.injected_at(s)).sum();
    if pressure {
        inject.set_rate(FailSite::Frame, 100 + r.below(400) as u32);
        inject.set_rate(FailSite::Table, 20 + r.below(60) as u32);
        inject.set_rate(FailSite::Ptl, 10 + r.below(40) as u32);
        t.injected_phases += 1;
    }
    // Fuzzers in the background on some CPUs.
    let mut fuzzers: Vec<fuzz::Fuzzer> = Vec::new();
    for &c in cpus {
        if r.chance(3)
            && let Some(f) = fuzz::start(c, r.next_u64() | 1, 100 + r.below(400))
        {
            fuzzers.push(f);
        }
    }
    t.fuzzers += fuzzers.len() as u64;
    let tsc_per_ms = arch::time::tsc_per_us().unwrap_or(1000) * 1000;
    let end = arch::time::rdtsc() + phase_ms * tsc_per_ms;
    let mut result = Ok(());
    while result.is_ok() && arch::time::rdtsc() < end {
        if r.chance(4) {
            result = churn(r, cpus, t);
            continue;
        }
        let (name, spec) = random_storm(r, cpus, pressure);
        t.storms += 1;
        match run_storm(&spec) {
            Err(StormError::NoMemory) if pressure => t.storms_not_started += 1,
            Err(e) => result = Err(format!("storm {name} could not start: {e:?}")),
            Ok(out) => {
                t.storm_threads += out.exit_codes.len() as u64;
                for (i, (&code, rep)) in out.exit_codes.iter().zip(&out.reports).enumerate() {
                    match code {
                        0 if rep.mismatches == 0 => {}
                        KILLED if pressure => t.storm_kills += 1,
                        _ => {
                            result = Err(format!(
                                "storm {name}: thread {i} exited with {code} ({} mismatches)",
                                rep.mismatches
                            ));
                        }
                    }
                }
                if result.is_ok() && out.stats.rss_pages != out.mapped_pages {
                    result = Err(format!(
                        "storm {name}: RSS counter {} pages, page tables map {}",
                        out.stats.rss_pages, out.mapped_pages
                    ));
                }
            }
        }
    }
    inject.clear_rates();
    for f in fuzzers {
        let e = f.join();
        t.fuzz_calls += e.report.calls;
        if e.report.unexpected_ok != 0 && result.is_ok() {
            result = Err(format!(
                "a fuzzer's call succeeded where it must fail: nr {} args {:x?}",
                e.report.first_unexpected[0],
                &e.report.first_unexpected[1..]
            ));
        }
        let killed_ok = pressure && e.exit == KILLED;
        if e.exit != 0 && !killed_ok && result.is_ok() {
            result = Err(format!("a fuzzer ended with {} in system call {}", e.exit, e.report.last_nr));
        }
    }
    t.injected += FailSite::ALL.iter().map(|&s| inject.injected_at(s)).sum::<u64>() - injected_before;
    result
}

/// The invariants after a phase (module comment).
fn check(base: &Baseline) -> Result<(), alloc::string::String> {
    settle();
    let heap = settle_heap(base.heap);
    let frames = settle_frames(base.frames);
    if frames != base.frames {
        return Err(format!(
            "free frames {frames}, baseline {}: {} lost",
            base.frames,
            base.frames as i64 - frames as i64
        ));
    }
    let ptls = mm::phys().nr_allocated_ptlocks();
    if ptls != base.ptls {
        return Err(format!("allocated ptls {ptls}, baseline {}", base.ptls));
    }
    if heap != base.heap {
        return Err(format!("heap {heap} bytes in use, baseline {}", base.heap));
    }
    for cpu in online() {
        if let Some(l) = crate::mmhal::lockdep_of(cpu)
            && let Some(h) = l.held().next()
        {
            return Err(format!("CPU {cpu} still holds lock {:#x} ({:?}) taken at {:?}", h.addr, h.level, h.site));
        }
    }
    Ok(())
}

/// Runs the soak the command line describes.
pub fn run(c: &Cmdline) -> ExitCode {
    let parse = |k: &str, d: u64| c.value(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let secs = parse("soak_secs", 30);
    let seed = parse("soak_seed", 1);
    let phase_ms = parse("soak_phase_ms", 3000);
    let cpus = online();
    let tsc_per_s = arch::time::tsc_per_us().unwrap_or(1000) * 1_000_000;
    log::info!("soak: {secs} s on {} CPUs, seed {seed}, phases of about {phase_ms} ms", cpus.len());
    // A short phase first, not counted: what the kernel allocates once, on
    // first use, is not a leak.
    let mut warm = Totals::default();
    if let Err(e) = phase(&mut Rng::new(!seed), &cpus, 300, &mut warm) {
        log::error!("SOAK FAILED: seed {seed}, warm-up phase: {e}");
        return ExitCode::Failure;
    }
    let base = baseline();
    let start = arch::time::rdtsc();
    let faults_before = crate::diag::faultstat::summary(cpus.iter().copied()).faults;
    let mut t = Totals::default();
    let mut next_minute = 1;
    let mut failure = None;
    while arch::time::rdtsc() - start < secs * tsc_per_s {
        t.phases += 1;
        log::info!("soak: phase {} (seed {seed})", t.phases);
        // Each phase draws from a stream of its own (seed, phase): what
        // phase P runs is the same whatever earlier phases fitted in their
        // time, so `seed S, phase P` names it on any machine.
        let mut r = Rng::new((seed ^ t.phases.wrapping_mul(0xd1b5_4a32_d192_ed03)).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if let Err(e) = phase(&mut r, &cpus, phase_ms, &mut t).and_then(|()| check(&base)) {
            failure = Some(e);
            break;
        }
        let elapsed = (arch::time::rdtsc() - start) / tsc_per_s;
        if elapsed >= next_minute * 60 {
            next_minute = elapsed / 60 + 1;
            log::info!(
                "soak: {} min: {} phases, {} storms ({} threads, {} killed), {} syscalls fuzzed, {} processes, {} threads churned, {} failures injected, {} faults; frames in use {} (baseline {})",
                elapsed / 60,
                t.phases,
                t.storms,
                t.storm_threads,
                t.storm_kills,
                t.fuzz_calls,
                t.processes,
                t.threads,
                t.injected,
                crate::diag::faultstat::summary(cpus.iter().copied()).faults - faults_before,
                mm::memmap_stats().frames.saturating_sub(mm::nr_free_pages()),
                mm::memmap_stats().frames.saturating_sub(base.frames),
            );
        }
    }
    let faults = crate::diag::faultstat::summary(cpus.iter().copied()).faults - faults_before;
    let secs_run = (arch::time::rdtsc() - start) / tsc_per_s;
    let lost = base.frames as i64 - mm::nr_free_pages() as i64;
    if let Some(e) = &failure {
        log::error!("SOAK FAILED: seed {seed}, phase {}: {e}", t.phases);
    }
    arch::println!(
        "SOAK-RESULT {{\"ok\":{},\"seed\":{seed},\"cpus\":{},\"seconds\":{secs_run},\"phases\":{},\"storms\":{},\"storm_threads\":{},\"storm_kills\":{},\"storms_not_started\":{},\"syscalls_fuzzed\":{},\"fuzzers\":{},\"processes\":{},\"threads\":{},\"injected_failures\":{},\"injected_phases\":{},\"faults\":{faults},\"frames_lost\":{lost}}}",
        failure.is_none(),
        cpus.len(),
        t.phases,
        t.storms,
        t.storm_threads,
        t.storm_kills,
        t.storms_not_started,
        t.fuzz_calls,
        t.fuzzers,
        t.processes,
        t.threads,
        t.injected,
        t.injected_phases,
    );
    if failure.is_some() { ExitCode::Failure } else { ExitCode::Success }
}
