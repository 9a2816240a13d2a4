//! Tests of `madvise(MADV_DONTNEED)` and page-table reclaim: semantics and
//! errors, then storms of faults racing DONTNEED on shared PTE tables.

extern crate std;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent, fault, on_cpu, read_u64, write_u64};
use crate::{Access, Advice, FaultResult, MapFlags, Mm, MmapError};

/// Sets the flag when dropped, also while unwinding: one thread's failed
/// assertion stops the storm instead of leaving the others spinning.
pub(crate) struct StopOnDrop<'a>(pub(crate) &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

fn dontneed(mm: &Mm<'_>, a: u64, len: u64) -> Result<(), MmapError> {
    mm.madvise(VirtAddr::new(a), len, Advice::DontNeed)
}

/// DONTNEED drops the pages (they read as zero afterwards, RSS falls, the
/// frames come back), keeps the mapping (a later write faults a fresh page
/// in), and reclaims the PTE tables it empties while the VMA stays.
#[test]
fn dontneed_zeroes_the_range_frees_frames_and_reclaims_empty_tables() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let len = 4 * PMD_SIZE;
    let a = mm.mmap(None, len + PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let a = (a + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    for p in (0..len).step_by(PAGE_SIZE as usize) {
        write_u64(&mm, a + p, a + p);
    }
    assert_eq!(mm.nr_ptes(), 4);
    let rss = mm.stats().rss_pages;
    // The middle two tables' worth, plus one page of the first.
    let (z0, z1) = (a + PMD_SIZE - PAGE_SIZE, a + 3 * PMD_SIZE);
    dontneed(&mm, z0, z1 - z0).unwrap();
    let zapped = (z1 - z0) / PAGE_SIZE;
    assert_eq!(mm.stats().rss_pages, rss - zapped);
    assert_eq!(mm.stats().madvise_zapped, zapped);
    assert_eq!(mm.nr_ptes(), 2, "the two emptied tables were reclaimed");
    assert_eq!(mm.stats().pt_reclaimed, 2);
    for p in (0..len).step_by(PAGE_SIZE as usize) {
        let want = if (z0..z1).contains(&(a + p)) { 0 } else { a + p };
        assert_eq!(read_u64(&mm, a + p), want, "page at {:#x}", a + p);
    }
    check_consistent(&mm);
    // The mapping stays: the range faults pages (and tables) in again (the
    // reads above mapped the zero page, so a write copies it).
    assert_eq!(fault(&mm, a + 2 * PMD_SIZE, Access::WRITE), Ok(FaultResult::Cow));
    assert_eq!(mm.vmas().len(), 1);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

/// Linux's errors: an unaligned start is `EINVAL`, unknown ranges `ENOMEM`
/// after the mapped parts were done, zero length is a no-op, a THP cut by
/// the range is split, and hugetlb ranges go in whole huge pages.
/// POPULATE_WRITE makes every page of the range present and writable (a
/// write then finds nothing to do), one fresh page each, and refuses a
/// range with a hole (`ENOMEM`) or a read-only part (`EFAULT`) before
/// populating any of it.
#[test]
fn populate_write_makes_the_range_present_and_writable_without_faults() {
    let m = big();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let len = 64 * PAGE_SIZE;
    let a = mm.mmap(None, len, RW, MapFlags::empty()).unwrap().as_u64();
    let populate = |a: u64, len: u64| mm.madvise(VirtAddr::new(a), len, Advice::PopulateWrite);
    // One page less than the mapping: the last stays absent.
    populate(a, len - PAGE_SIZE).unwrap();
    assert_eq!(mm.stats().rss_pages, 63);
    for p in (0..len - PAGE_SIZE).step_by(PAGE_SIZE as usize) {
        assert_eq!(fault(&mm, a + p, Access::WRITE), Ok(FaultResult::Spurious), "page {:#x}", a + p);
        assert_eq!(read_u64(&mm, a + p), 0, "a populated page reads zero");
    }
    assert_eq!(fault(&mm, a + len - PAGE_SIZE, Access::WRITE), Ok(FaultResult::Anon));
    check_consistent(&mm);
    // A hole after the mapping, a read-only mapping: refused, nothing done.
    assert_eq!(populate(a, len + PAGE_SIZE), Err(MmapError::NoMemory));
    let ro = mm.mmap(None, 4 * PAGE_SIZE, crate::Prot::READ, MapFlags::empty()).unwrap().as_u64();
    assert_eq!(populate(ro, 4 * PAGE_SIZE), Err(MmapError::BadAddress));
    assert_eq!(mm.stats().rss_pages, 64);
}

#[test]
fn dontneed_errors_thp_splits_and_hugetlb_rules() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 4 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    write_u64(&mm, a, 7);
    write_u64(&mm, a + 3 * PAGE_SIZE, 9);
    assert_eq!(dontneed(&mm, a + 1, PAGE_SIZE), Err(MmapError::Invalid));
    assert_eq!(dontneed(&mm, a, 0), Ok(()));
    assert_eq!(dontneed(&mm, !(PAGE_SIZE - 1), 2 * PAGE_SIZE), Err(MmapError::Invalid));
    // A hole after the mapping: ENOMEM, but the mapped page was dropped.
    assert_eq!(dontneed(&mm, a + 3 * PAGE_SIZE, 4 * PAGE_SIZE), Err(MmapError::NoMemory));
    assert_eq!((read_u64(&mm, a), read_u64(&mm, a + 3 * PAGE_SIZE)), (7, 0));

    // A THP partly inside: split, only the covered part dropped.
    let t = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    let t = (t + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    assert_eq!(fault(&mm, t, Access::WRITE), Ok(FaultResult::Thp));
    write_u64(&mm, t + 5 * PAGE_SIZE, 55);
    dontneed(&mm, t, 4 * PAGE_SIZE).unwrap();
    assert_eq!(mm.stats().thp_splits, 1);
    assert_eq!((read_u64(&mm, t), read_u64(&mm, t + 5 * PAGE_SIZE)), (0, 55));
    check_consistent(&mm);

    // hugetlb: the start must be huge-page aligned; the end rounds down.
    let h = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGETLB_2M).unwrap().as_u64();
    write_u64(&mm, h, 1);
    write_u64(&mm, h + PMD_SIZE, 2);
    assert_eq!(dontneed(&mm, h + PAGE_SIZE, PAGE_SIZE), Err(MmapError::Invalid));
    dontneed(&mm, h, PMD_SIZE + PAGE_SIZE).unwrap();
    assert_eq!((read_u64(&mm, h), read_u64(&mm, h + PMD_SIZE)), (0, 2));
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Threads fault and write their pages (interleaved over four PTE tables, so
/// every table is shared) while others DONTNEED 2 MiB ranges of the same
/// region over and over, reclaiming the tables they empty. Every read is
/// checked against the writer's own last write: a page reads back what its
/// owner last wrote, or zero after a DONTNEED, never another page's data.
/// The storm runs until the races it exists for have happened: tables
/// reclaimed under faulting threads, and faults that found their PMD
/// changed and walked again.
#[test]
fn storm_faults_race_dontneed_and_table_reclaim() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    const WRITERS: u64 = 4;
    const TABLES: u64 = 4;
    let a = mm.mmap(None, (TABLES + 1) * PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let a = (a + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    let pages = TABLES * PMD_SIZE / PAGE_SIZE;
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (mm, stop) = (&mm, &stop);
            s.spawn(move || {
                let _stop_all = StopOnDrop(stop);
                on_cpu(mm);
                let mut round = 1u64;
                while !stop.load(SeqCst) {
                    // Sparse: every 16th page of each table that is ours.
                    for p in (w..pages).step_by((WRITERS * 16) as usize) {
                        let va = a + p * PAGE_SIZE;
                        let v = (p << 32) | round;
                        write_u64(mm, va, v);
                        let got = read_u64(mm, va);
                        assert!(got == v || got == 0, "page {p}: wrote {v:#x}, read {got:#x}");
                    }
                    round += 1;
                }
            });
        }
        for z in 0..2 {
            let (mm, stop) = (&mm, &stop);
            s.spawn(move || {
                let _stop_all = StopOnDrop(stop);
                on_cpu(mm);
                let mut i = z;
                while !stop.load(SeqCst) {
                    let t = i % TABLES;
                    dontneed(mm, a + t * PMD_SIZE, PMD_SIZE).unwrap();
                    i += 1;
                }
            });
        }
        let _stop_all = StopOnDrop(&stop);
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let st = mm.stats();
            if st.pt_reclaimed > 0 && st.retries > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the races never happened: {st:?}");
        }
        stop.store(true, SeqCst);
    });
    let st = mm.stats();
    assert!(st.pt_reclaimed > 0 && st.retries > 0 && st.madvise_zapped > 0, "{st:?}");
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}
