//! `mode=bench`: the fault-storm benchmark run by `cargo xtask bench`.
//!
//! One QEMU boot measures one workload on every online CPU (xtask boots with
//! `-smp` equal to the CPU count): a warm-up storm, then `windows` timed
//! storms. Each window is one storm in a fresh address space; its time is
//! the span from the first thread passing the start barrier to the last
//! thread finishing (TSC), so thread creation and teardown are not counted.
//! The result is one line for xtask to parse:
//!
//! `BENCH-RESULT {json}` with the windows' fault counts and cycles, the TSC
//! rate, mean and p99 cycles per fault (from `faultstat`), and per lock class
//! the acquisitions, contended acquisitions and cycles spent spinning, with
//! the TSC span those counters cover (`stats_cycles`).
//!
//! Workloads (modelled on will-it-scale's page_fault1, threads variant):
//! * `disjoint`: each thread repeatedly maps its own region (`mib` MiB),
//!   writes one byte per 4 KiB page, unmaps it; `rounds` times, or with
//!   `rounds=0` (xtask's default) until the window's time is up, so that a
//!   thread the host runs faster does not wait for a slower one;
//! * `populate`: as `disjoint`, but each thread makes each 64 pages
//!   present with `MADV_POPULATE_WRITE` just before writing them: the same
//!   work per page (a frame, zeroed, its PTE set under the PTE lock) done
//!   by the kernel in a loop, without the exception a fault costs; its
//!   rate counts pages written;
//! * `same-table` (will-it-scale's shared case): one region of `threads x
//!   mib` MiB; thread `t` of `n` writes pages `t, t + n, t + 2n, ...` (`mib`
//!   MiB worth), so all of them fault into the same PTE tables; every round
//!   ends with a barrier, thread 0's munmap of the region (and its re-mmap
//!   for the next round) and another barrier, all inside the timed span;
//!   with `rounds=0`, rounds go on until the one in which thread 0's time
//!   is up, every thread's last; with `chunk=N` the threads take turns in
//!   runs of `N` pages instead (8: each has whole lines of PTEs; 512: whole
//!   PTE tables), which tells what sharing the tables costs;
//! * `same-page`: all threads first-touch the same pages at once; its work
//!   is the pages made present, not the faults (a lost race or a spurious
//!   fault makes nothing present);
//! * `madvise`: each thread writes its own block (`mib` MiB, 2 MiB aligned)
//!   of one mapping, then `MADV_DONTNEED`s it in whole 2 MiB regions, which
//!   frees the frames and reclaims the emptied PTE tables, and repeats;
//! * `madvise-same-table`: as `same-table` (interleaved pages of one shared
//!   region), and between two barriers each thread `MADV_DONTNEED`s every
//!   n-th 2 MiB region of it.
//!
//! Each window also reports the CPU time its threads spent waiting (at the
//! barriers of `same-table`'s rounds, while thread 0 unmaps, or before the
//! last thread finished; `Outcome::waiting_cycles`): the part of a 1 -> 2
//! CPU ratio lost to the workload's serial parts rather than to slower
//! faults.
//!
//! Each window also reports the pages its threads touched and the faults
//! that needs at least, so xtask can check the fault count against them,
//! and from its address space's counters the pages its faults made present
//! (fresh anonymous pages, copies, THPs in 4 KiB pages), the faults that
//! lost a race to another CPU and the spurious ones.
//!
//! After each window, on two CPUs or more, the benchmark measures a cache
//! line's round trip between its CPU and another of the storm's
//! (`super::roundtrip`, not timed): where the host had the vCPUs then, so a
//! slow window can be told from a slow kernel.
//!
//! With `profile=HZ` on the command line the sampling profiler
//! (`diag::profile`) runs during the timed windows and its samples follow
//! the result line (`cargo xtask profile`); the round trips are then not
//! measured, so their spinning is not sampled as the storm's.
//!
//! * `fork`: each thread populates its share of `mib` MiB, one forks
//!   (timed), and all write their shares again while the child still maps
//!   them (copy-on-write faults that copy); see [`super::fork::bench`].
//! * `traps`: no storm; every CPU takes exception round trips in the
//!   kernel, the part of a fault no memory manager can make cheaper; see
//!   [`super::traps`].
//!
//! The result also carries the fault-locking mode the kernel runs
//! (`fault_lock=vma|mmap`) and the address spaces' counters summed over the
//! timed windows (faults under a VMA lock or `mmap_lock`, fallbacks, pages
//! zapped and PTE tables reclaimed by `madvise`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use abi::storm::{self, Params};
use arch::qemu::ExitCode;
use mm::MmStats;
use mm::lock::{LockClass, lock_stats, reset_lock_stats};

use super::roundtrip;
use super::storm::{Spec, online, run as run_storm, settle};
use crate::boot::cmdline::Cmdline;
use crate::diag::faultstat;

const BASE: u64 = 0x1_0000_0000;

struct Window {
    faults: u64,
    cycles: u64,
    /// Pages the threads touched, summed (a page every thread touches
    /// counts once per thread).
    touched: u64,
    /// Faults the window needs at least: every page touched was faulted in
    /// by some thread (with `PATTERN_SAME`, every thread touches the same
    /// pages, so the most any thread touched).
    min_faults: u64,
    /// Pages of the region the window's faults made present: were not
    /// mapped, and became mapped (4 KiB units; the useful work of
    /// `same-page`; see `Outcome::region_made_present`).
    present: u64,
    /// Faults that prepared a page and found another CPU had installed one.
    lost_races: u64,
    /// Faults that found the access already allowed.
    spurious_faults: u64,
    /// CPU time (TSC cycles over all threads) the threads spent not working
    /// (`Outcome::waiting_cycles`).
    waiting: u64,
    /// Measured right after the window: a cache line's round trip between
    /// two of its CPUs, in ns (`super::roundtrip`); `None` with one CPU.
    round_trip_ns: Option<u64>,
}

/// Round trips per measurement after a window: under a millisecond under TCG.
const ROUND_TRIPS: u64 = 2000;

fn spec(workload: &str, cpus: &[usize], mib: u64, rounds: u64) -> Option<Spec> {
    let n = cpus.len();
    let len = mib << 20;
    let params = match workload {
        "disjoint" => Params { mode: storm::MODE_CYCLE, len, threads: n as u64, rounds, ..Params::default() },
        // As `disjoint`, each 64 pages made present by madvise before they
        // are written: no exception per page.
        "populate" => {
            Params { mode: storm::MODE_CYCLE, len, threads: n as u64, rounds, populate_pages: 64, ..Params::default() }
        }
        "same-table" => Params {
            mode: storm::MODE_TOUCH,
            pattern: storm::PATTERN_INTERLEAVED,
            base: BASE,
            len: len * n as u64,
            threads: n as u64,
            rounds,
            unmap_each_round: 1,
            ..Params::default()
        },
        "same-page" => Params {
            mode: storm::MODE_TOUCH,
            pattern: storm::PATTERN_SAME,
            base: BASE,
            len: len.min(256 * 4096),
            threads: n as u64,
            rounds,
            remap_between_rounds: 1,
            ..Params::default()
        },
        "madvise" => Params {
            mode: storm::MODE_TOUCH_DONTNEED,
            pattern: storm::PATTERN_BLOCKS,
            base: BASE,
            len: len * n as u64,
            threads: n as u64,
            rounds,
            ..Params::default()
        },
        "madvise-same-table" => Params {
            mode: storm::MODE_TOUCH_DONTNEED,
            pattern: storm::PATTERN_INTERLEAVED,
            base: BASE,
            len,
            threads: n as u64,
            rounds,
            ..Params::default()
        },
        _ => return None,
    };
    // `MODE_CYCLE`'s threads map their own regions.
    let premap = (params.mode != storm::MODE_CYCLE).then_some(mm::MapFlags::empty());
    Some(Spec { params, premap, cpus: cpus.to_vec() })
}

/// Adds the counters the JSON reports of one window's address space.
fn add_counters(sum: &mut MmStats, s: &MmStats) {
    sum.vma_lock_faults += s.vma_lock_faults;
    sum.mmap_lock_faults += s.mmap_lock_faults;
    sum.vma_fallback_not_found += s.vma_fallback_not_found;
    sum.vma_fallback_locked += s.vma_fallback_locked;
    sum.vma_fallback_detached += s.vma_fallback_detached;
    sum.madvise_zapped += s.madvise_zapped;
    sum.pt_reclaimed += s.pt_reclaimed;
}

fn parse(c: &Cmdline, key: &str, default: u64) -> u64 {
    c.value(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The fault-locking mode the kernel runs, as the result names it.
pub(super) fn fault_lock_name() -> &'static str {
    match mm::memory::fault_locking() {
        mm::memory::FaultLocking::PerVma => "vma",
        mm::memory::FaultLocking::MmapLock => "mmap",
    }
}

/// Runs the benchmark the command line describes.
pub fn run(c: &Cmdline) -> ExitCode {
    let workload = c.value("workload").unwrap_or("disjoint");
    let windows = parse(c, "windows", 5).max(1);
    let mib = parse(c, "mib", 128);
    if workload == "fork" {
        // Its own driver: a fork and copy-on-write after it (`super::fork`).
        let profile_rate = c.value("profile").map(|v| v.parse::<u32>().unwrap_or(0));
        return super::fork::bench(windows, mib, profile_rate);
    }
    if workload == "traps" {
        // Exception round trips in the kernel, no storm (`super::traps`).
        return super::traps::bench(windows, parse(c, "window_ms", 2000));
    }
    // Passes per window; 0: passes until the window's time is up
    // (will-it-scale counts a fixed time's work): `disjoint`'s threads each
    // stop when their time is up, `same-table`'s after the round in which
    // thread 0's is (`Params::unmap_each_round`). The other workloads'
    // threads meet at barriers with no such agreement.
    let rounds = parse(c, "rounds", 1);
    // A window ends after this long even if the threads have not made their
    // passes; fast runs finish them well before it.
    let window_ms = parse(c, "window_ms", 2000);
    if rounds == 0 && (!matches!(workload, "disjoint" | "populate" | "same-table") || window_ms == 0) {
        log::error!(
            "bench: rounds=0 (passes until the window's time is up) needs workload=disjoint, populate or same-table, and window_ms > 0"
        );
        return ExitCode::Failure;
    }
    // `profile=HZ` (`cargo xtask profile`): sample the timed windows on every
    // CPU, and dump the samples after the result.
    let profile_rate = c.value("profile").map(|v| v.parse::<u32>().unwrap_or(0));
    let tsc_per_ms = arch::time::tsc_per_us().unwrap_or(1000) * 1000;
    // `threads=N`: run on the first N online CPUs only, the others idle
    // (an experiment: one working vCPU in a 2-vCPU QEMU against a 1-vCPU
    // one separates what a second vCPU costs by being there from what it
    // costs by working).
    let mut cpus = online();
    cpus.truncate(parse(c, "threads", cpus.len() as u64).clamp(1, cpus.len() as u64) as usize);
    let n = cpus.len();
    let Some(mut spec) = spec(workload, &cpus, mib, if rounds == 0 { u64::MAX } else { rounds }) else {
        log::error!(
            "bench: unknown workload {workload:?} (disjoint, populate, same-table, same-page, madvise, madvise-same-table, fork, traps)"
        );
        return ExitCode::Failure;
    };
    // `chunk=N`: the shared-table workloads' threads take turns in runs of N
    // pages instead of page by page (`Params::chunk_pages`), a diagnostic
    // that separates what the threads share: the PTE lines (N = 8 shares
    // none), the PTE tables and their locks (N = 512 shares none), the VMA.
    let chunk = parse(c, "chunk", 1);
    if chunk != 1 {
        if spec.params.pattern != storm::PATTERN_INTERLEAVED || chunk == 0 {
            log::error!("bench: chunk={chunk}: needs workload=same-table or madvise-same-table, and at least 1 page");
            return ExitCode::Failure;
        }
        spec.params.chunk_pages = chunk;
    }
    log::info!(
        "bench: {workload} on {n} CPUs, {mib} MiB per {}{}, 1 warm-up + {windows} windows{}",
        if matches!(workload, "disjoint" | "populate" | "madvise" | "same-table") { "thread" } else { "region" },
        if chunk > 1 { format!(", threads taking turns in runs of {chunk} pages") } else { String::new() },
        match (rounds, window_ms) {
            (0, _) => format!(" of passes for {window_ms} ms"),
            (_, 0) => format!(" of {rounds} passes"),
            _ => format!(" of {rounds} passes, at most {window_ms} ms"),
        }
    );
    let mut results = Vec::new();
    // The address spaces' counters, summed over the timed windows.
    let mut mm_sum = MmStats::default();
    // When the counters were last reset: lock spinning is reported as a share
    // of the CPU time since then (windows, and the set-up and teardown
    // between them, when the counters also run).
    let mut stats_start = 0;
    for w in 0..=windows {
        settle();
        if w == 1 {
            faultstat::reset();
            reset_lock_stats();
            stats_start = arch::time::rdtsc();
            if let Some(rate) = profile_rate
                && let Err(e) = crate::diag::profile::start(rate)
            {
                log::error!("bench: profile={rate}: cannot start the profiler: {e:?}");
                return ExitCode::Failure;
            }
        }
        let before = faultstat::summary(cpus.iter().copied()).faults;
        let mut spec = spec.clone();
        if window_ms > 0 {
            spec.params.duration_cycles = window_ms * tsc_per_ms;
        }
        let out = match run_storm(&spec) {
            Ok(o) => o,
            Err(e) => {
                log::error!("bench: storm failed to start: {e:?}");
                return ExitCode::Failure;
            }
        };
        if out.mismatches() != 0 || out.exit_codes.iter().any(|&c| c != 0) {
            log::error!("bench: storm reported mismatches or killed threads: {:?}", out.exit_codes);
            return ExitCode::Failure;
        }
        let faults = faultstat::summary(cpus.iter().copied()).faults - before;
        let cycles = out.span_cycles();
        let touched = out.touched();
        let min_faults = if spec.params.pattern == storm::PATTERN_SAME {
            out.reports.iter().map(|r| r.touched).max().unwrap_or(0)
        } else if spec.params.populate_pages != 0 {
            // madvise made the pages present: their writes need no fault.
            0
        } else {
            touched
        };
        let label = if w == 0 { String::from("warm-up") } else { format!("window {w}/{windows}") };
        let (present, lost_races, spurious_faults) = (
            out.region_made_present(),
            out.stats.lost_races - out.stats_before.lost_races,
            out.stats.spurious_faults - out.stats_before.spurious_faults,
        );
        let waiting = out.waiting_cycles();
        let permille = |part: u64, whole: u64| {
            let p = part * 1000 / whole.max(1);
            format!("{}.{}%", p / 10, p % 10)
        };
        // Each thread's waiting, at barriers (`same-table`: thread 0's is
        // for the slowest toucher, the others' also for its munmap).
        let each: Vec<String> = out.reports.iter().map(|r| permille(r.waited_cycles, cycles)).collect();
        // Between this CPU and another of the storm's: where the host has
        // its vCPUs now (not timed; the next window starts after it). Not
        // while profiling: the ping-pong would be sampled as the storm's
        // time, and on a busy host it spins for up to its second a window
        // (a loaded fresh-clone run's profile was 77% ping-pong).
        let other = cpus.iter().copied().find(|&c| c != arch::percpu::cpu_id()).filter(|_| profile_rate.is_none());
        let round_trip_ns = other.and_then(|o| roundtrip::round_trip_ns(o, ROUND_TRIPS));
        let round_trip = match (other, round_trip_ns) {
            (None, _) => String::new(),
            (Some(_), Some(ns)) => format!("; vCPU round trip {ns} ns"),
            (Some(o), None) => format!("; vCPU round trip unmeasured (CPU {o} did not answer)"),
        };
        log::info!(
            "bench: {label}: {faults} faults ({present} pages made present, {lost_races} lost races, {spurious_faults} spurious) in {} us, threads waiting {} of it (at barriers, by thread: {}; thread 0 unmapping {}){round_trip}",
            arch::time::cycles_to_ns(cycles) / 1000,
            permille(waiting, cycles * out.reports.len() as u64),
            each.join(" "),
            permille(out.reports.first().map_or(0, |r| r.unmap_cycles), cycles)
        );
        if w > 0 {
            results.push(Window {
                faults,
                cycles,
                touched,
                min_faults,
                present,
                lost_races,
                spurious_faults,
                waiting,
                round_trip_ns,
            });
            add_counters(&mut mm_sum, &out.stats);
        }
    }
    let recording = profile_rate.and_then(|_| crate::diag::profile::stop());
    let s = faultstat::summary(cpus.iter().copied());
    let stats_cycles = arch::time::rdtsc().wrapping_sub(stats_start);
    let mut json = format!(
        "{{\"workload\":\"{workload}\",\"cpus\":{n},\"tsc_per_us\":{},\"split_pte_ptlocks\":{},\"fault_lock\":\"{}\",\"chunk\":{},\"stats_cycles\":{stats_cycles},\"windows\":[",
        arch::time::tsc_per_us().unwrap_or(0),
        mm::config::USE_SPLIT_PTE_PTLOCKS,
        fault_lock_name(),
        spec.params.chunk_pages.max(1)
    );
    for (i, w) in results.iter().enumerate() {
        json += &format!(
            "{}{{\"faults\":{},\"cycles\":{},\"touched\":{},\"min_faults\":{},\"present\":{},\"lost_races\":{},\"spurious_faults\":{},\"waiting_cycles\":{},\"round_trip_ns\":{}}}",
            if i == 0 { "" } else { "," },
            w.faults,
            w.cycles,
            w.touched,
            w.min_faults,
            w.present,
            w.lost_races,
            w.spurious_faults,
            w.waiting,
            w.round_trip_ns.map_or(String::from("null"), |ns| format!("{ns}"))
        );
    }
    let (halts, kicks) = mm::lock::halt_counts();
    json += &format!(
        "],\"lock_halts\":{halts},\"lock_kicks\":{kicks},\"cycles_per_fault_mean\":{},\"cycles_per_fault_p99\":{},\"locks\":{{",
        s.mean_cycles, s.p99_cycles
    );
    for (i, class) in [
        LockClass::PageTableLock,
        LockClass::PmdLock,
        LockClass::PteLock,
        LockClass::FrameAllocator,
        LockClass::MmapLock,
    ]
    .into_iter()
    .enumerate()
    {
        let l = lock_stats(class);
        json += &format!(
            "{}\"{}\":{{\"acquisitions\":{},\"contended\":{},\"spin_cycles\":{}}}",
            if i == 0 { "" } else { "," },
            class.name(),
            l.acquisitions,
            l.contended,
            l.spin_cycles
        );
    }
    let m = &mm_sum;
    json += &format!(
        "}},\"mm\":{{\"vma_lock_faults\":{},\"mmap_lock_faults\":{},\"vma_fallback_not_found\":{},\"vma_fallback_locked\":{},\"vma_fallback_detached\":{},\"madvise_zapped\":{},\"pt_reclaimed\":{}}}}}",
        m.vma_lock_faults,
        m.mmap_lock_faults,
        m.vma_fallback_not_found,
        m.vma_fallback_locked,
        m.vma_fallback_detached,
        m.madvise_zapped,
        m.pt_reclaimed
    );
    arch::println!("BENCH-RESULT {json}");
    if let Some(r) = recording {
        r.dump();
    }
    ExitCode::Success
}
