//! Tests of `mremap`: growing, shrinking, moving (entry by entry, whole PTE
//! tables, THPs), its errors, and faults racing a move.

extern crate std;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent, fault, on_cpu, read_u64, write_u64};
use crate::madvise_tests::StopOnDrop;
use crate::mremap::MremapFlags;
use crate::{Access, FaultResult, MapFlags, Mm, MmapError};

fn remap(
    mm: &Mm<'_>,
    old: u64,
    old_len: u64,
    new_len: u64,
    flags: MremapFlags,
    new: Option<u64>,
) -> Result<u64, MmapError> {
    mm.mremap(VirtAddr::new(old), old_len, new_len, flags, new.map(VirtAddr::new)).map(|a| a.as_u64())
}

fn fill(mm: &Mm<'_>, a: u64, pages: u64, tag: u64) {
    for p in 0..pages {
        write_u64(mm, a + p * PAGE_SIZE, tag + p);
    }
}

fn check(mm: &Mm<'_>, a: u64, pages: u64, tag: u64) {
    for p in 0..pages {
        assert_eq!(read_u64(mm, a + p * PAGE_SIZE), tag + p, "page {p} at {:#x}", a + p * PAGE_SIZE);
    }
}

/// Shrink and grow in place; a move keeps the data and the frames (entries
/// move, pages do not), RSS is unchanged, the old range is gone.
#[test]
fn mremap_shrinks_grows_and_moves_entries_not_pages() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 8 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    fill(&mm, a, 8, 100);
    // Shrink in place.
    assert_eq!(remap(&mm, a, 8 * PAGE_SIZE, 4 * PAGE_SIZE, MremapFlags::empty(), None), Ok(a));
    assert_eq!(mm.stats().rss_pages, 4);
    // Grow in place (nothing after it).
    assert_eq!(remap(&mm, a, 4 * PAGE_SIZE, 6 * PAGE_SIZE, MremapFlags::empty(), None), Ok(a));
    check(&mm, a, 4, 100);
    assert_eq!(read_u64(&mm, a + 5 * PAGE_SIZE), 0);
    // Something right after: growing must move.
    let blocker = mm.mmap(Some(VirtAddr::new(a + 6 * PAGE_SIZE)), PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    assert_eq!(remap(&mm, a, 6 * PAGE_SIZE, 12 * PAGE_SIZE, MremapFlags::empty(), None), Err(MmapError::NoMemory));
    let frames: std::vec::Vec<_> =
        (0..4).map(|p| mm.follow_pte_lockless(VirtAddr::new(a + p * PAGE_SIZE)).unwrap().pa).collect();
    let rss = mm.stats().rss_pages;
    let b = remap(&mm, a, 6 * PAGE_SIZE, 12 * PAGE_SIZE, MremapFlags::MAYMOVE, None).unwrap();
    assert_ne!(b, a);
    check(&mm, b, 4, 100);
    for (p, f) in frames.iter().enumerate() {
        assert_eq!(
            mm.follow_pte_lockless(VirtAddr::new(b + p as u64 * PAGE_SIZE)).unwrap().pa,
            *f,
            "the page moved, not copied"
        );
    }
    assert_eq!(mm.stats().rss_pages, rss, "RSS unchanged by a move");
    assert!(
        mm.follow_pte_lockless(VirtAddr::new(a)).is_none() && mm.vmas().iter().all(|v| !v.contains(VirtAddr::new(a)))
    );
    assert!(mm.vmas().iter().any(|v| v.start == blocker));
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// 2 MiB-aligned moves take whole PTE tables (no new table allocated) and
/// THPs with their deposited tables; an unaligned move goes entry by entry
/// across two destination tables.
#[test]
fn mremap_moves_whole_tables_thps_and_unaligned_ranges() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 3 * PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let a = (a + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    mm.munmap(VirtAddr::new(a + PMD_SIZE), 2 * PMD_SIZE).ok();
    fill(&mm, a, 512, 7000);
    let ptes = mm.nr_ptes();
    let table = crate::walk_pmd(&mm, VirtAddr::new(a)).unwrap().get().phys();
    let b =
        remap(&mm, a, PMD_SIZE, PMD_SIZE, MremapFlags::MAYMOVE | MremapFlags::FIXED, Some(a + 64 * PMD_SIZE)).unwrap();
    assert_eq!(b, a + 64 * PMD_SIZE);
    check(&mm, b, 512, 7000);
    assert_eq!(mm.nr_ptes(), ptes);
    assert_eq!(crate::walk_pmd(&mm, VirtAddr::new(b)).unwrap().get().phys(), table, "the PTE table moved whole");
    // A THP moves whole too.
    let t = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    let t = (t + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    assert_eq!(fault(&mm, t, Access::WRITE), Ok(FaultResult::Thp));
    write_u64(&mm, t + 9 * PAGE_SIZE, 99);
    let u =
        remap(&mm, t, PMD_SIZE, PMD_SIZE, MremapFlags::MAYMOVE | MremapFlags::FIXED, Some(a + 80 * PMD_SIZE)).unwrap();
    let mp = mm.follow_pte_lockless(VirtAddr::new(u)).unwrap();
    assert_eq!((mp.size, read_u64(&mm, u + 9 * PAGE_SIZE)), (PMD_SIZE, 99));
    assert_eq!(mm.stats().thp_splits, 0);
    // Unaligned: 3 pages from the middle of one table to straddle two.
    let c = b + 10 * PAGE_SIZE;
    let d = remap(
        &mm,
        c,
        3 * PAGE_SIZE,
        3 * PAGE_SIZE,
        MremapFlags::MAYMOVE | MremapFlags::FIXED,
        Some(a + 96 * PMD_SIZE - PAGE_SIZE),
    )
    .unwrap();
    check(&mm, d, 3, 7010);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Linux's errors.
#[test]
fn mremap_errors() {
    let m = big();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 4 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let none = MremapFlags::empty();
    assert_eq!(remap(&mm, a + 1, PAGE_SIZE, PAGE_SIZE, none, None), Err(MmapError::Invalid));
    assert_eq!(remap(&mm, a, PAGE_SIZE, 0, none, None), Err(MmapError::Invalid));
    assert_eq!(remap(&mm, a, 0, PAGE_SIZE, MremapFlags::MAYMOVE, None), Err(MmapError::Invalid), "empty old range");
    assert_eq!(remap(&mm, a, PAGE_SIZE, PAGE_SIZE, MremapFlags::FIXED, Some(0x5000_0000)), Err(MmapError::Invalid));
    assert_eq!(remap(&mm, a, 8 * PAGE_SIZE, PAGE_SIZE, none, None), Err(MmapError::BadAddress), "beyond the VMA");
    assert_eq!(remap(&mm, 0x7000_0000, PAGE_SIZE, PAGE_SIZE, none, None), Err(MmapError::BadAddress), "no VMA");
    let overlap = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    assert_eq!(remap(&mm, a, 2 * PAGE_SIZE, 2 * PAGE_SIZE, overlap, Some(a + PAGE_SIZE)), Err(MmapError::Invalid));
    let h = mm.mmap(None, PMD_SIZE, RW, MapFlags::HUGETLB_2M).unwrap().as_u64();
    assert_eq!(remap(&mm, h, PMD_SIZE, 2 * PMD_SIZE, MremapFlags::MAYMOVE, None), Err(MmapError::Invalid));
}

/// Faults on other VMAs that share the source and destination PTE tables
/// run while pages move back and forth between them (two PTE locks at once,
/// the destination nested); the moved data stays intact, every fault
/// resolves, and nothing leaks.
#[test]
fn storm_faults_race_mremap_moves() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    // Two PTE tables; in each, pages 0..8 move between them, 16.. belong to
    // neighbours that the faulting threads touch.
    let base = mm.mmap(None, 3 * PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let base = (base + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    let (src, dst) = (base, base + PMD_SIZE);
    mm.munmap(VirtAddr::new(dst), 8 * PAGE_SIZE).unwrap();
    fill(&mm, src, 8, 500);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (mm, stop) = (&mm, &stop);
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                on_cpu(mm);
                let mut i = t;
                while !stop.load(SeqCst) {
                    let table = if i % 2 == 0 { src } else { dst };
                    let va = table + (16 + (i * 7) % 400) * PAGE_SIZE;
                    assert!(fault(mm, va, Access::WRITE).is_ok());
                    i += 1;
                }
            });
        }
        let (mm, stop) = (&mm, &stop);
        s.spawn(move || {
            let _stop = StopOnDrop(stop);
            on_cpu(mm);
            let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
            for round in 0..200 {
                let (from, to) = if round % 2 == 0 { (src, dst) } else { (dst, src) };
                assert_eq!(remap(mm, from, 8 * PAGE_SIZE, 8 * PAGE_SIZE, flags, Some(to)), Ok(to));
                check(mm, to, 8, 500);
            }
        });
    });
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}
