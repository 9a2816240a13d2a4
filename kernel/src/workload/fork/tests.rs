//! The fork storm (issue 18's storm (i)): writer threads of one process
//! fault and write on every CPU while another thread of it forks over and
//! over; every child checks that its memory is one instant of its parent's
//! (see `abi::fork::StormPage`), writes its own copy, and exits. Runs with
//! split locks and with the single-lock build
//! (`cargo xtask test --split-ptlock-cpus 1000000 fork`).

use core::sync::atomic::Ordering;

use ktest::ktest;

use super::*;
use crate::uspace::process::LIVE_PROCESSES;

/// What the storms counted, summed over reruns.
#[derive(Default, Debug)]
struct Totals {
    storms: u64,
    forks: u64,
    /// Forks during which the writers stored tags.
    forks_overlapped: u64,
    /// Children that found a writer in the middle of a round.
    children_mid_round: u64,
    /// Faults that found their VMA write-locked by a fork and waited for it
    /// under `mmap_lock` (nothing else write-locks a VMA in this storm).
    faults_waited_for_fork: u64,
    /// Pages fork shared, the parent's copy-on-write copies, and its
    /// reuses of pages no child held any more.
    fork_shared: u64,
    cow_faults: u64,
    wp_reuses: u64,
    writer_rounds: u64,
}

impl Totals {
    fn raced(&self) -> bool {
        self.forks_overlapped > 0
            && self.children_mid_round > 0
            && self.faults_waited_for_fork > 0
            && self.cow_faults > 0
            && self.wp_reuses > 0
    }
}

/// (i) Writers on every CPU, a forker beside them: every child sees a
/// consistent snapshot, forks happened while the writers wrote and faulted
/// (and faults waited for forks), pages were copied and reused after
/// forks, and free frames (page tables included), processes and address
/// spaces come back. Rerun (up to 4 storms) until all of that happened.
#[ktest]
fn storm_fork_children_see_consistent_snapshots_while_faults_run() {
    let cpus = online();
    // A writer on every CPU but the forker's (see `StormSpec::cpus`).
    let n = (cpus.len() - 1).max(1);
    let per_vma = mm::memory::fault_locking() == mm::memory::FaultLocking::PerVma;
    settle();
    let before =
        (mm::nr_free_pages(), LIVE_PROCESSES.load(Ordering::SeqCst), crate::uspace::process::PROCESSES.lock().len());
    let mut t = Totals::default();
    for _ in 0..4 {
        let spec = StormSpec { writers: n, pages_per_writer: 128, forks: 16, cpus: cpus.clone() };
        let out = storm(&spec).expect("fork storm set-up");
        for (i, code) in out.exit_codes.iter().enumerate() {
            let who = if i < n { "writer" } else { "forker" };
            assert_eq!(*code, 0, "{who} {i} exited with {code}: {out:?}");
        }
        assert_eq!(
            out.children_bad,
            0,
            "{} children saw a torn or mixed snapshot; the first one's status {} = 2 x {} violations (+1 if it found a writer mid-round)",
            out.children_bad,
            out.first_bad_status,
            out.first_bad_status >> 1
        );
        assert_eq!(out.errors, 0, "fork or wait failed: {out:?}");
        assert_eq!((out.forks_done, out.children_ok), (spec.forks, spec.forks), "{out:?}");
        assert!(out.rounds.iter().all(|&r| r > 0), "a writer never finished a round: {out:?}");
        let s = &out.stats;
        t.storms += 1;
        t.forks += out.forks_done;
        t.forks_overlapped += out.forks_overlapped;
        t.children_mid_round += out.children_mid_round;
        t.faults_waited_for_fork += if per_vma { s.vma_fallback_locked } else { s.mmap_lock_faults };
        t.fork_shared += s.fork_shared;
        t.cow_faults += s.cow_faults;
        t.wp_reuses += s.wp_reuses;
        t.writer_rounds += out.rounds.iter().sum::<u64>();
        if t.raced() {
            break;
        }
    }
    log::info!("storm_fork: {t:?}");
    assert!(t.forks_overlapped > 0, "no fork ran while the writers stored tags: {t:?}");
    assert!(t.children_mid_round > 0, "no child caught a writer in the middle of a round: {t:?}");
    assert!(t.faults_waited_for_fork > 0, "no fault ran into a fork (VMA write-locked): {t:?}");
    assert!(t.fork_shared >= t.forks * n as u64 * 128, "fork shared fewer pages than the writers own: {t:?}");
    assert!(t.cow_faults > 0 && t.wp_reuses > 0, "after forks, pages were not both copied and reused: {t:?}");
    settle();
    let after =
        (mm::nr_free_pages(), LIVE_PROCESSES.load(Ordering::SeqCst), crate::uspace::process::PROCESSES.lock().len());
    assert_eq!(after, before, "(free frames, processes, process-table entries) did not come back");
}
