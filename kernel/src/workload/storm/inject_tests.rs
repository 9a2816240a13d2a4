//! Storms under failure injection (`fail=...`, see `mm::FaultInject`):
//! frame allocations, page-table constructors, allocated `ptl`s and
//! fallible heap allocations fail at random while storms of every kind run
//! on every CPU. What may happen: a storm cannot be set up (its address
//! space or a thread cannot be made: retried), a system call returns
//! `-ENOMEM` (counted by the threads, which tolerate it), a fault finds no
//! memory and the kernel kills the faulting process (every thread exits
//! `KILLED`). What must not: a wrong tag (data corruption), any other exit
//! code, a kernel oops, a frame, page table, `ptl` or heap byte that does
//! not come back once injection stops.

use abi::storm::{self, Params};
use ktest::ktest;
use mm::MapFlags;
use mm::ptlock::FailSite;

use super::*;

/// What the storms under injection ended in.
#[derive(Default, Debug)]
struct Ends {
    storms: u64,
    setup_failed: u64,
    threads_done: u64,
    threads_killed: u64,
    syscalls_enomem: u64,
    faults_oom: u64,
}

/// The storms: disjoint regions, one shared PTE table, the map/touch/unmap
/// cycle with its zero check, faults racing DONTNEED, THP faults racing
/// splits.
fn specs(cpus: &[usize]) -> Vec<Spec> {
    let n = cpus.len().max(2) as u64;
    let base = |mode, pattern, len| Params { tolerate_oom: 1, ..params(mode, pattern, len, n, 2) };
    let spec = |params, premap| Spec { params, premap, cpus: cpus.to_vec() };
    alloc::vec![
        spec(base(storm::MODE_TOUCH, storm::PATTERN_BLOCKS, n * 64 * PAGE), Some(MapFlags::empty())),
        spec(base(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, HUGE), Some(MapFlags::empty())),
        spec(Params { base: 0, verify: 1, ..base(storm::MODE_CYCLE, 0, 32 * PAGE) }, None),
        spec(
            Params {
                tolerate_loss: 1,
                special_threads: 1,
                special_mode: storm::MODE_DONTNEED,
                ..base(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, 2 * HUGE)
            },
            Some(MapFlags::empty()),
        ),
        spec(
            Params {
                special_threads: 1,
                special_mode: storm::MODE_SPLITTER,
                ..base(storm::MODE_TOUCH, storm::PATTERN_HUGE_MIX, 2 * HUGE)
            },
            Some(MapFlags::HUGEPAGE),
        ),
    ]
}

/// Runs `spec` under injection and checks each thread's end.
fn run_one(spec: &Spec, ends: &mut Ends) {
    ends.storms += 1;
    let out = match run(spec) {
        Ok(out) => out,
        Err(StormError::NoMemory) => {
            ends.setup_failed += 1;
            return;
        }
        Err(e) => panic!("storm could not start: {e:?}"),
    };
    ends.faults_oom += out.stats.oom;
    for (i, (&code, r)) in out.exit_codes.iter().zip(&out.reports).enumerate() {
        match code {
            0 => {
                assert_eq!(r.mismatches, 0);
                ends.threads_done += 1;
                ends.syscalls_enomem += r.oom;
            }
            crate::uspace::KILLED => ends.threads_killed += 1,
            _ => panic!(
                "storm thread {i} (mode {}) exited with {code}: mismatches (data corruption) or an error other than ENOMEM",
                if (i as u64) < spec.params.special_threads { spec.params.special_mode } else { spec.params.mode }
            ),
        }
    }
}

/// Every kind of storm, four times over (or until every site has failed),
/// on every CPU with
/// `fail=frame:1/200,table:1/50,ptl:1/20,heap:1/1000` (or the command
/// line's `fail=` and `fail_seed=`): storms end in completed threads, OOM
/// kills and tolerated `-ENOMEM`s, never in corruption or another error;
/// once injection stops, every frame, `ptl` and heap byte is back.
#[ktest]
fn storms_under_failure_injection_end_in_oom_kills_and_leak_nothing() {
    let cmdline = crate::boot::cmdline::read();
    let spec = cmdline.value("fail").unwrap_or("frame:1/200,table:1/50,ptl:1/20,heap:1/1000");
    let seed = cmdline.value("fail_seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let inject = mm::phys().fault_inject();
    let cpus = online();
    // One round without injection first: structures that grow once and
    // stay (the process table's nodes, per-CPU caches) are not leaks.
    let mut warm_up = Ends::default();
    for s in specs(&cpus) {
        run_one(&s, &mut warm_up);
    }
    assert_eq!(warm_up.threads_killed + warm_up.setup_failed, 0, "storms fail without injection: {warm_up:?}");
    let heap = crate::workload::storm::settled_heap_usage();
    let (frames, ptls) = (mm::nr_free_pages(), mm::phys().nr_allocated_ptlocks());
    let injected_before = FailSite::ALL.map(|s| inject.injected_at(s));
    inject.set_seed(seed);
    inject.configure(spec).expect("a valid fail= spec");
    let mut ends = Ends::default();
    // Four rounds, more (up to 16) until every site failed at least once:
    // few page tables are made per storm, and storms die early.
    let sites_hit = || {
        let hit = |s: FailSite| inject.injected_at(s) > injected_before[s as usize];
        hit(FailSite::Frame) && hit(FailSite::Table) && (!mm::ALLOC_SPLIT_PTLOCKS || hit(FailSite::Ptl))
    };
    for round in 0..16 {
        if round >= 4 && sites_hit() {
            break;
        }
        for s in specs(&cpus) {
            run_one(&s, &mut ends);
        }
    }
    inject.clear_rates();
    settle();
    let injected = FailSite::ALL.map(|s| (s.name(), inject.injected_at(s) - injected_before[s as usize]));
    log::info!("storms under fail={spec} fail_seed={seed}: injected {injected:?}; {ends:?}");
    assert_eq!(mm::nr_free_pages(), frames, "frames leaked under failure injection");
    assert_eq!(mm::phys().nr_allocated_ptlocks(), ptls, "allocated ptls leaked");
    assert_eq!(settle_heap(heap), heap, "heap bytes leaked");
    let count = |site: FailSite| injected[site as usize].1;
    assert!(count(FailSite::Frame) > 0 && count(FailSite::Table) > 0, "nothing was injected: {injected:?}");
    if mm::ALLOC_SPLIT_PTLOCKS {
        assert!(count(FailSite::Ptl) > 0, "no ptl allocation failed in the allocated-ptl build: {injected:?}");
    }
    assert!(
        ends.threads_killed + ends.syscalls_enomem + ends.setup_failed > 0,
        "the injected failures had no visible effect: {ends:?}"
    );
    assert!(ends.threads_done > 0, "no storm thread ever finished under injection: {ends:?}");
}
