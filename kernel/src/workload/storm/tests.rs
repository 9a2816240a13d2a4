//! The fault-storm tests of issue 6: ring-3 threads of one address space on
//! every CPU, each storm checked for data (every tag reads back), mappings
//! (no lost or doubled entries) and frame accounting (the free-frame count
//! returns to where it started once the address space is gone). All of them
//! run with split locks and with the single-lock build
//! (`cargo xtask test --split-ptlock-cpus 1000000 storm`).

use abi::storm::{self, Params};
use ktest::ktest;
use mm::MapFlags;

use super::*;

/// Runs `spec` and checks what every storm must satisfy: threads exit 0,
/// no mismatches, and the frames all come back.
fn storm(spec: Spec) -> Outcome {
    settle();
    let before = mm::nr_free_pages();
    let out = run(&spec).expect("storm set-up failed");
    let after = settle_frames(before);
    for (i, code) in out.exit_codes.iter().enumerate() {
        assert_eq!(*code, 0, "thread {i} on CPU {} exited with {code} (mismatches or killed)", out.cpus[i]);
    }
    assert_eq!(out.mismatches(), 0, "data corruption");
    assert!(out.reports.iter().all(|r| r.done == 1), "a thread did not finish its report");
    assert_eq!(out.stats.rss_pages, out.mapped_pages, "the address space's RSS counter disagrees with its page tables");
    assert_eq!(after, before, "frames leaked: {} before, {} after the address space was freed", before, after);
    out
}

fn params(mode: u64, pattern: u64, len: u64, threads: usize) -> Params {
    super::params(mode, pattern, len, threads as u64, 1)
}

/// Every 4 KiB mapping in the region maps a distinct frame: no page is
/// mapped twice, none lost.
fn assert_distinct_frames(out: &Outcome, expected_pages: u64) {
    let mut pas: Vec<u64> = out.mappings.iter().filter(|m| m.size == PAGE).map(|m| m.pa.as_u64()).collect();
    let n = pas.len() as u64;
    pas.sort_unstable();
    pas.dedup();
    assert_eq!(pas.len() as u64, n, "a frame is mapped twice");
    assert_eq!(n, expected_pages, "mapped 4 KiB pages");
}

/// As [`assert_distinct_frames`], for whatever is mapped, except that any
/// number of mappings may share the zero page.
fn assert_distinct_frames_but_zero(out: &Outcome) {
    let zero = mm::phys().zero_pfn();
    let mut pas: Vec<u64> =
        out.mappings.iter().filter(|m| m.size == PAGE && m.pa.pfn() != zero).map(|m| m.pa.as_u64()).collect();
    let n = pas.len();
    pas.sort_unstable();
    pas.dedup();
    assert_eq!(pas.len(), n, "a frame is mapped twice");
}

/// (a) Each CPU faults its own 2 MiB-aligned region (its own PTE table).
#[ktest]
fn storm_disjoint_regions() {
    let cpus = online();
    let n = cpus.len();
    let out = storm(Spec {
        params: params(storm::MODE_TOUCH, storm::PATTERN_BLOCKS, n as u64 * HUGE, n),
        premap: Some(MapFlags::empty()),
        cpus,
    });
    let pages = n as u64 * HUGE / PAGE;
    assert_eq!(out.touched(), pages);
    assert!(out.stats.anon_faults >= pages, "one first-touch fault per page at least");
    assert_distinct_frames(&out, pages);
    // Nothing changes the region's VMA while the threads fault: every fault
    // in it ran under that VMA's lock. The few that took mmap_lock are the
    // threads' first stack faults racing the set-up's mappings (a merge
    // write-locks the neighbour VMA, or replaces the node a lookup found),
    // and each has its fallback counted.
    if mm::memory::fault_locking() == mm::memory::FaultLocking::PerVma {
        let s = out.stats;
        assert!(s.vma_lock_faults >= pages, "faults in the region took mmap_lock: {s:?}");
        let explained = s.vma_fallback_locked + s.vma_fallback_detached + s.vma_fallback_not_found;
        assert!(
            s.mmap_lock_faults == explained && s.mmap_lock_faults <= 4 * n as u64,
            "faults took mmap_lock beyond the set-up's races: {s:?}"
        );
    }
}

/// (b) All CPUs interleave 4 KiB pages inside one 2 MiB region: every
/// fault contends for the same PTE table's lock.
#[ktest]
fn storm_same_pte_table() {
    let cpus = online();
    let n = cpus.len();
    let out = storm(Spec {
        params: params(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, HUGE, n),
        premap: Some(MapFlags::empty()),
        cpus,
    });
    assert_eq!(out.touched(), HUGE / PAGE);
    assert_distinct_frames(&out, HUGE / PAGE);
}

/// (c) All CPUs fault the same pages at once, in the same order: exactly
/// one frame gets installed for each page, the losers find it under the
/// lock (a lost race: their frame goes back) or find it mapped when they
/// look (a spurious fault). The threads that do not fault catch up with
/// the one that does, so they meet at its frontier; four rounds per storm,
/// each after a remap and a barrier; rerun until a race was counted (it
/// needs two CPUs).
#[ktest]
fn storm_same_page() {
    let cpus = online();
    let n = cpus.len();
    let pages = 64;
    let (mut races, mut storms) = (0, 0);
    while storms < 20 && (races == 0 || storms < 2) {
        // Four rounds, the region re-mapped between them: all threads leave
        // the barrier after each remap and fault the same fresh pages.
        let p = Params {
            rounds: 4,
            remap_between_rounds: 1,
            ..params(storm::MODE_TOUCH, storm::PATTERN_SAME, pages * PAGE, n)
        };
        let out = storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() });
        // One entry maps each page (a second frame would be a second entry
        // or a leak, which `storm` checks through the free-frame count).
        assert_distinct_frames(&out, pages);
        races += out.stats.lost_races + out.stats.spurious_faults;
        storms += 1;
    }
    log::info!("storm_same_page: {races} lost races / spurious faults in {storms} storms on {n} CPUs");
    if n >= 2 {
        assert!(races > 0, "no two CPUs ever faulted one page at once in {storms} storms");
    }
}

fn rounds_made(out: &Outcome) -> Vec<u64> {
    out.reports.iter().map(|r| r.rounds).collect()
}

/// `same-table` windows of rounds until the time is up (the bench's
/// default): thread 0 ends the storm after the round in which its time ran
/// out, every thread stops after that same round (or the barriers would
/// never fill), the region is unmapped, and thread 0 worked its whole time.
#[ktest]
fn storm_same_table_rounds_end_together_when_thread_0s_time_is_up() {
    let cpus = online();
    let n = cpus.len() as u64;
    let tsc_per_ms = arch::time::tsc_per_us().expect("TSC calibrated") * 1000;
    let p = Params {
        rounds: u64::MAX,
        unmap_each_round: 1,
        duration_cycles: 30 * tsc_per_ms,
        ..params(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, n * 96 * PAGE, n as usize)
    };
    let out = storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus });
    let rounds = out.reports[0].rounds;
    assert!(rounds >= 1 && out.reports.iter().all(|r| r.rounds == rounds), "rounds made: {:?}", rounds_made(&out));
    assert_eq!(out.reports[0].last_round, 1, "thread 0 ended the storm");
    assert!(out.mappings.is_empty(), "{} entries left after the last round", out.mappings.len());
    assert_eq!(out.region_made_present(), out.touched(), "every page touched was made present once per round");
    let r0 = &out.reports[0];
    assert!(r0.end_cycles - r0.start_cycles >= p.duration_cycles, "thread 0 stopped before its time was up");
    log::info!("storm_same_table_rounds_end_together: {rounds} rounds in 30 ms on {n} CPUs");
}

/// The bench's `same-table` shape (will-it-scale's shared case): threads
/// touch interleaved pages of one region of `threads x len`, and every round
/// ends with a barrier, thread 0's munmap of the region (and its re-mmap
/// before the next round) and another barrier. Every round faults every page
/// afresh, the region is gone at the end, every thread's end time comes
/// after the last munmap, the pages made present in the region are exactly
/// the pages touched (so `same-page`'s count of them is right too), and
/// every thread's time at the round barriers is counted as waiting.
#[ktest]
fn storm_bench_same_table_unmaps_each_round() {
    let cpus = online();
    let n = cpus.len() as u64;
    let (per_thread, rounds) = (96, 3);
    let p = Params {
        rounds,
        unmap_each_round: 1,
        ..params(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, n * per_thread * PAGE, n as usize)
    };
    let out = storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() });
    assert_eq!(out.touched(), n * per_thread * rounds, "pages touched");
    assert!(out.reports.iter().all(|r| r.touched == per_thread * rounds), "each thread its share every round");
    assert!(
        out.mappings.is_empty(),
        "thread 0 unmapped the region after the last round: {} entries left",
        out.mappings.len()
    );
    assert_eq!(out.region_made_present(), out.touched(), "every page touched was made present once per round");
    for (i, r) in out.reports.iter().enumerate() {
        let timed = r.end_cycles - r.start_cycles;
        assert!(
            r.waited_cycles > 0 && r.waited_cycles < timed,
            "thread {i} waited {} of {timed} cycles",
            r.waited_cycles
        );
    }
    let waited: u64 = out.reports.iter().map(|r| r.waited_cycles).sum();
    assert!(out.waiting_cycles() >= waited, "{} waiting cycles, {waited} at barriers", out.waiting_cycles());
    assert!(out.reports.iter().all(|r| r.rounds == rounds), "rounds made: {:?}", rounds_made(&out));
    // Same pages, every thread: each page made present once per round, however
    // many threads raced for it.
    let pages = 40;
    let p = Params {
        rounds: 2,
        remap_between_rounds: 1,
        ..params(storm::MODE_TOUCH, storm::PATTERN_SAME, pages * PAGE, n as usize)
    };
    let out = storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus });
    assert_eq!(out.region_made_present(), 2 * pages, "{:?}", out.stats);
}

/// (d) Faults race MAP_FIXED re-mapping (unmap + map) of the same range:
/// touchers may lose a tag to a remap (it reads back zero) but never read a
/// wrong value, nobody is killed, and nothing leaks. Rerun until a remap
/// overlapped the touchers: a tag lost between its write (a fault) and its
/// read-back. (Faults that found their VMA being replaced and fell back to
/// `mmap_lock` are counted too, but threads whose stacks are mapped next to
/// each other's cause those without any remap.)
#[ktest]
fn storm_faults_race_remap() {
    let cpus = online();
    let n = cpus.len().max(2);
    let (mut lost, mut fell_back, mut storms) = (0, 0, 0);
    while storms < 10 && lost == 0 {
        let mut p = params(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, HUGE / 2, n);
        p.rounds = 30;
        p.tolerate_loss = 1;
        p.special_threads = 1;
        p.special_mode = storm::MODE_REMAPPER;
        let out = storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() });
        lost += out.reports.iter().map(|r| r.lost).sum::<u64>();
        fell_back += out.stats.vma_fallback_locked + out.stats.vma_fallback_detached;
        storms += 1;
        // Whatever is still mapped is mapped once, but for the zero page: a
        // remap between a toucher's write and its read-back makes the
        // read-back a read fault in the new VMA, which maps the zero page
        // (as often as that happened).
        assert_distinct_frames_but_zero(&out);
    }
    log::info!(
        "storm_faults_race_remap: {storms} storms: {lost} tags lost to remaps, {fell_back} faults found their VMA being replaced"
    );
    if cpus.len() >= 2 {
        assert!(lost > 0, "no remap took a tag between its write and its read-back in {storms} storms");
    }
}

/// (e) 2 MiB (THP) faults race 4 KiB faults and splits in the same PMD
/// range: data survives splits, and the counters account for every page.
/// Rerun until both THP faults and splits happened.
#[ktest]
fn storm_thp_races_4k_and_splits() {
    let cpus = online();
    let n = cpus.len().max(3);
    let (mut thp_faults, mut splits, mut storms) = (0, 0, 0);
    while storms < 10 && (thp_faults == 0 || splits == 0) {
        let mut p = params(storm::MODE_TOUCH, storm::PATTERN_HUGE_MIX, 4 * HUGE, n);
        p.rounds = 5;
        p.special_threads = 1;
        p.special_mode = storm::MODE_SPLITTER;
        let out = storm(Spec { params: p, premap: Some(MapFlags::HUGEPAGE), cpus: cpus.clone() });
        let s = out.stats;
        // Every page some thread touched is mapped (by a 4 KiB or a 2 MiB
        // entry). The even threads share their pages (the first of each 2
        // MiB region), so the pages are a union, not a sum.
        let mut touched = alloc::collections::BTreeSet::new();
        for i in p.special_threads..p.threads {
            storm::for_each_page(&p, i, |page| {
                touched.insert(page);
            });
        }
        let unmapped: Vec<u64> = touched
            .iter()
            .copied()
            .filter(|&a| !out.mappings.iter().any(|m| (m.va.as_u64()..m.va.as_u64() + m.size).contains(&a)))
            .collect();
        assert!(
            unmapped.is_empty(),
            "{} of {} touched pages are not mapped (first {:x?}); {} entries ({} huge), stats {s:?}",
            unmapped.len(),
            touched.len(),
            &unmapped[..unmapped.len().min(4)],
            out.mappings.len(),
            out.mappings.iter().filter(|m| m.size > PAGE).count(),
        );
        log::info!(
            "storm_thp_races_4k_and_splits: {} THP faults, {} 4K faults, {} splits, {} fallbacks",
            s.thp_faults,
            s.anon_faults,
            s.thp_splits,
            s.thp_fallbacks
        );
        thp_faults += s.thp_faults;
        splits += s.thp_splits;
        storms += 1;
    }
    assert!(thp_faults > 0, "no THP fault in {storms} storms");
    assert!(splits > 0, "no THP was split under the faults in {storms} storms");
}

/// (f) A COW storm: every CPU reads a region (shared zero page), then every
/// CPU writes every page: each page is copied exactly once.
#[ktest]
fn storm_cow_on_zero_page() {
    let cpus = online();
    let n = cpus.len();
    let out = storm(Spec {
        params: params(storm::MODE_COW, storm::PATTERN_SAME, 64 * PAGE, n),
        premap: Some(MapFlags::empty()),
        cpus,
    });
    assert!(out.stats.zero_page_faults >= 1, "reads must map the zero page");
    assert_eq!(out.stats.cow_faults, 64, "each page copied exactly once");
    assert_distinct_frames(&out, 64);
}

/// `MODE_CYCLE` on `threads` threads: `rounds` times a region of `pages`
/// mapped, written (every page checked to read zero but for its tag) and
/// unmapped.
fn cycle(threads: usize, pages: u64, rounds: u64) -> Params {
    Params {
        mode: storm::MODE_CYCLE,
        len: pages * PAGE,
        threads: threads as u64,
        rounds,
        verify: 1,
        ..Params::default()
    }
}

/// The benchmark's map/touch/unmap cycle (`MODE_CYCLE`, will-it-scale's
/// `page_fault1`) on every CPU: each thread maps its own region anywhere,
/// writes a tag into every page and checks that the other 4088 bytes read
/// zero (a frame its last round freed comes straight back through the
/// per-CPU cache, still holding that round's tag, unless the fault zeroed
/// it), reads every tag back, unmaps (its result checked) and goes again.
/// Every round faults every page again, and all frames come back.
#[ktest]
fn storm_cycle_map_touch_unmap() {
    let cpus = online();
    let n = cpus.len();
    let (pages, rounds) = (128, 4);
    let p = cycle(n, pages, rounds);
    let out = storm(Spec { params: p, premap: None, cpus });
    assert_eq!(out.touched(), n as u64 * rounds * pages, "pages touched");
    assert!(
        out.stats.anon_faults >= out.touched(),
        "every round faults every page again: {} faults for {} pages",
        out.stats.anon_faults,
        out.touched()
    );
}

/// `MODE_CYCLE` with `populate_pages` (the bench's `populate`): every run
/// of pages is made present by `MADV_POPULATE_WRITE` before it is written,
/// so the writes take no fault, yet each page is a fresh zeroed one
/// (`verify`), every round again, and all frames come back.
#[ktest]
fn storm_cycle_populated_by_madvise_takes_no_fault_per_page() {
    let cpus = online();
    let n = cpus.len();
    let (pages, rounds) = (256, 4);
    let p = Params { populate_pages: 64, ..cycle(n, pages, rounds) };
    let out = storm(Spec { params: p, premap: None, cpus });
    assert_eq!(out.touched(), n as u64 * rounds * pages, "pages touched");
    let faults = out.stats.anon_faults - out.stats_before.anon_faults;
    assert!(faults >= out.touched(), "madvise made each page present through the fault path: {faults} anonymous pages");
    let exceptions = out.stats.vma_lock_faults + out.stats.mmap_lock_faults;
    assert!(
        exceptions < out.touched() / 16,
        "{exceptions} page-fault exceptions for {} pages made present by madvise first",
        out.touched()
    );
}

/// `MODE_CYCLE` with a deadline (how the benchmark bounds a window): the
/// threads would cycle for minutes, stop touching at the deadline, still
/// unmap the region they were in (nothing leaks) and check the pages they
/// touched.
#[ktest]
fn storm_cycle_stops_at_its_deadline() {
    let cpus = online();
    let n = cpus.len();
    let (pages, rounds) = (64, 100_000);
    let tsc_per_ms = arch::time::tsc_per_us().expect("TSC calibrated") * 1000;
    let p = Params { duration_cycles: 100 * tsc_per_ms, ..cycle(n, pages, rounds) };
    let out = storm(Spec { params: p, premap: None, cpus });
    for (i, r) in out.reports.iter().enumerate() {
        assert!(r.touched > 0, "thread {i} touched nothing before its deadline");
        assert!(r.touched < rounds * pages, "thread {i} ran all {rounds} rounds: the deadline did not stop it");
    }
    log::info!("storm_cycle_stops_at_its_deadline: {} pages touched in 100 ms windows on {n} CPUs", out.touched());
}

/// A constructor failure in a fault (the PTE table's lock allocation in the
/// debug-lock build, the table itself otherwise) kills the faulting task;
/// nothing leaks.
#[ktest]
fn storm_oom_in_a_fault_kills_and_leaks_nothing() {
    settle();
    let before = mm::nr_free_pages();
    let space = crate::uspace::AddressSpace::with_programs().unwrap();
    space.mm.mmap(Some(mm::VirtAddr::new(BASE)), HUGE, mm::Prot::READ | mm::Prot::WRITE, MapFlags::FIXED).unwrap();
    // The thread (and its kernel stack) first; then take every free frame,
    // so the thread's first fault on the region finds none.
    let t = crate::uspace::new_user_thread(&space, online()[0], abi::program::TOUCH_RANGE, [BASE, HUGE]).unwrap();
    let mut hog = Vec::new();
    while let Some(f) = mm::alloc_pages(0) {
        hog.push(f);
    }
    let t = crate::sched::spawn(t);
    let code = t.join();
    drop(hog);
    assert_eq!(code, crate::uspace::KILLED, "a fault with no frames must kill the task");
    assert!(space.mm.stats().oom >= 1, "the task was killed, but not by an out-of-memory fault");
    drop(t);
    drop(space);
    assert_eq!(settle_frames(before), before, "frames leaked after an OOM kill");
}

/// Reruns `one` (a storm) until `happened` says its race occurred, at most
/// `tries` times; returns every outcome's stats summed.
fn until_raced(tries: usize, mut one: impl FnMut(usize) -> Outcome, happened: impl Fn(&Totals) -> bool) -> Totals {
    let mut t = Totals::default();
    for attempt in 0..tries {
        let out = one(attempt);
        t.add(&out);
        if happened(&t) {
            break;
        }
    }
    t
}

/// What the shared-lock storms count, summed over reruns.
#[derive(Default, Debug)]
struct Totals {
    storms: u64,
    vma_lock_faults: u64,
    mmap_lock_faults: u64,
    retries: u64,
    pt_reclaimed: u64,
    madvise_zapped: u64,
    gup_fast_pages: u64,
    gup_slow_pages: u64,
    gup_checks: u64,
    lost: u64,
    thp_collapses: u64,
    thp_collapse_refused: u64,
    /// Storms whose special thread (thread 0) ran while another thread did.
    overlapped: u64,
}

impl Totals {
    fn add(&mut self, out: &Outcome) {
        let s = &out.stats;
        self.storms += 1;
        self.vma_lock_faults += s.vma_lock_faults;
        self.mmap_lock_faults += s.mmap_lock_faults;
        self.retries += s.retries;
        self.pt_reclaimed += s.pt_reclaimed;
        self.madvise_zapped += s.madvise_zapped;
        self.gup_fast_pages += s.gup_fast_pages;
        self.gup_slow_pages += s.gup_slow_pages;
        self.gup_checks += out.reports.iter().map(|r| r.gup_checks).sum::<u64>();
        self.lost += out.reports.iter().map(|r| r.lost).sum::<u64>();
        self.thp_collapses += s.thp_collapses;
        self.thp_collapse_refused += s.thp_collapse_refused;
        self.overlapped += u64::from(overlap_with_special(out) > 0);
    }
}

/// (g) Faults race `madvise(MADV_DONTNEED)` on shared PTE tables: every CPU
/// but one touches interleaved pages of four PTE tables, one CPU drops each
/// 2 MiB over and over, which also reclaims the tables it empties while the
/// others fault in them. Tags may be lost to a DONTNEED (they read back
/// zero), never corrupted; nothing leaks. Rerun until tables were reclaimed
/// under faulting CPUs and faults found their PMD changed and walked again.
#[ktest]
fn storm_madvise_dontneed_races_faults_and_reclaims_tables() {
    let cpus = online();
    let n = cpus.len().max(2);
    let t = until_raced(
        20,
        |_| {
            let mut p = params(storm::MODE_TOUCH, storm::PATTERN_INTERLEAVED, 4 * HUGE, n);
            p.rounds = 8;
            p.tolerate_loss = 1;
            p.special_threads = 1;
            p.special_mode = storm::MODE_DONTNEED;
            storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() })
        },
        |t| t.pt_reclaimed > 0 && t.retries > 0,
    );
    log::info!("storm_madvise_dontneed_races_faults_and_reclaims_tables: {t:?}");
    assert!(t.pt_reclaimed > 0, "no PTE table was reclaimed: {t:?}");
    assert!(t.retries > 0, "no fault ever found its PMD changed (pte_offset_map failure or pmd_same retry): {t:?}");
    assert!(t.madvise_zapped > 0 && t.vma_lock_faults > 0, "{t:?}");
}

/// (h) The lockless walker in production (`checksum` reads user memory
/// through pages `get_user_pages_fast` pinned) against munmap (MAP_FIXED
/// remaps) and DONTNEED with table reclaim: every CPU but one writes its
/// tags and reads each back through the kernel's pinned view, which must
/// show the tag, or zero where a remap or DONTNEED took it. Alternating
/// remap and DONTNEED storms, rerun until pages were pinned locklessly and
/// tables reclaimed under the walkers.
#[ktest]
fn storm_gup_races_munmap_and_reclaim() {
    let cpus = online();
    let n = cpus.len().max(2);
    let t = until_raced(
        20,
        |attempt| {
            let mut p = params(storm::MODE_GUP, storm::PATTERN_INTERLEAVED, 4 * HUGE, n);
            p.rounds = 4;
            p.tolerate_loss = 1;
            p.special_threads = 1;
            p.special_mode = if attempt % 2 == 0 { storm::MODE_DONTNEED } else { storm::MODE_REMAPPER };
            storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() })
        },
        |t| t.storms >= 2 && t.gup_fast_pages > 0 && t.pt_reclaimed > 0,
    );
    log::info!("storm_gup_races_munmap_and_reclaim: {t:?}");
    assert!(t.gup_checks > 0 && t.gup_fast_pages > 0, "the lockless walker pinned nothing: {t:?}");
    assert!(t.pt_reclaimed > 0, "no table was reclaimed under the walkers: {t:?}");
}

/// Cycles during which thread 0 (the special thread) and at least one other
/// thread were both running their timed part: the race window a storm with
/// a special thread exists for.
fn overlap_with_special(out: &Outcome) -> u64 {
    let Some((s, others)) = out.reports.split_first() else { return 0 };
    others
        .iter()
        .map(|r| s.end_cycles.min(r.end_cycles).saturating_sub(s.start_cycles.max(r.start_cycles)))
        .max()
        .unwrap_or(0)
}

/// (j) mremap moves racing faults on the source and destination tables:
/// thread 0 moves its 16 pages back and forth between the first PTE table
/// and the second (two PTE locks at once, the destination's nested, the old
/// range shot down before the old lock goes) and checks every page after
/// every move; the others fault and write their blocks, which share both
/// tables. Nothing is lost, corrupted or leaked; the moves overlapped the
/// faults. Rerun until they did: with more vCPUs than host cores, the
/// mover can be descheduled between the start barrier and its first move
/// for as long as the others take to finish (seen once in a fresh-clone
/// run at -smp 8).
#[ktest]
fn storm_mremap_moves_race_faults_on_both_tables() {
    let cpus = online();
    let n = cpus.len().max(3);
    let mut p = params(storm::MODE_TOUCH, storm::PATTERN_BLOCKS, 2 * HUGE - 64 * PAGE, n);
    p.rounds = 4;
    p.special_threads = 1;
    p.special_mode = storm::MODE_MREMAP;
    p.aux = BASE + 2 * HUGE - 32 * PAGE;
    let (mut overlap, mut storms) = (0, 0);
    while storms < 10 && overlap == 0 {
        let out = storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() });
        let moved = out.reports[0].touched / storm::MOVER_PAGES;
        overlap = overlap_with_special(&out);
        storms += 1;
        log::info!(
            "storm_mremap_moves_race_faults_on_both_tables: {moved} moves, {} pages faulted by the others, overlap {overlap} cycles",
            out.touched() - out.reports[0].touched
        );
        assert!(moved >= 40, "the mover did not move: {moved}");
    }
    assert!(overlap > 0, "the moves never overlapped the faults in {storms} storms");
}

/// (k) MADV_COLLAPSE racing faults and the lockless walker: thread 0
/// collapses both 2 MiB blocks over and over (and drops one now and then),
/// the others write their tags and read each back through the kernel's
/// pinned view (`checksum`, `get_user_pages_fast`), which must show the tag
/// or zero. Rerun until blocks were collapsed while the walkers pinned, in a
/// storm where the collapser ran while the others did: like the mover of (j),
/// it can be descheduled past the others' whole run.
#[ktest]
fn storm_collapse_races_faults_and_the_lockless_walker() {
    let cpus = online();
    let n = cpus.len().max(2);
    let t = until_raced(
        10,
        |_| {
            let mut p = params(storm::MODE_GUP, storm::PATTERN_INTERLEAVED, 2 * HUGE, n);
            p.rounds = 4;
            p.tolerate_loss = 1;
            p.special_threads = 1;
            p.special_mode = storm::MODE_COLLAPSE;
            storm(Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() })
        },
        |t| t.thp_collapses > 0 && t.gup_fast_pages > 0 && t.overlapped > 0,
    );
    log::info!("storm_collapse_races_faults_and_the_lockless_walker: {t:?}");
    assert!(t.overlapped > 0, "the collapses never overlapped the faults in {} storms", t.storms);
    assert!(t.thp_collapses > 0 && t.gup_checks > 0 && t.gup_fast_pages > 0, "{t:?}");
}
