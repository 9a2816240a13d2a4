//! Tests of fork and copy-on-write.

extern crate std;

use std::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent, fault, on_cpu, read_u64, write_u64};
use crate::{Access, FaultError, FaultResult, MapFlags, Mm, Prot};

fn frame_of(mm: &Mm<'_>, va: u64) -> crate::Pfn {
    mm.follow_pte_lockless(VirtAddr::new(va)).expect("mapped").pa.pfn()
}

/// After fork both see the same data; a write in either is invisible to the
/// other; shared frames carry one reference per mapping and the first writer
/// copies while the last one reuses; everything comes back when both go.
#[test]
fn fork_shares_pages_copy_on_write() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let parent = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&parent);
    let a = parent.mmap(None, 8 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for p in 0..8 {
        write_u64(&parent, a + p * PAGE_SIZE, 100 + p);
    }
    // A read-only zero-page mapping too.
    let z = parent.mmap(None, PAGE_SIZE, Prot::READ, MapFlags::empty()).unwrap().as_u64();
    assert_eq!(fault(&parent, z, Access::READ), Ok(FaultResult::ZeroPage));
    let child = parent.fork().unwrap();
    on_cpu(&child);
    assert_eq!(child.vmas(), parent.vmas());
    for p in 0..8 {
        assert_eq!(read_u64(&child, a + p * PAGE_SIZE), 100 + p);
        let f = frame_of(&parent, a + p * PAGE_SIZE);
        assert_eq!(frame_of(&child, a + p * PAGE_SIZE), f, "shared");
        assert_eq!(m.phys.page(f).unwrap().refcount(), 2, "one reference per mapping");
    }
    assert_eq!(parent.stats().fork_shared, 8);
    assert_eq!(child.stats().rss_pages, 8);
    // Writes on both sides: each gets its own copy (the first writer copies,
    // then the other owns the old frame alone and reuses it).
    assert_eq!(fault(&parent, a, Access::WRITE), Ok(FaultResult::Cow));
    assert_eq!(fault(&child, a, Access::WRITE), Ok(FaultResult::Reuse));
    write_u64(&parent, a, 1);
    write_u64(&child, a, 2);
    write_u64(&child, a + PAGE_SIZE, 3);
    assert_eq!((read_u64(&parent, a), read_u64(&child, a)), (1, 2));
    assert_eq!((read_u64(&parent, a + PAGE_SIZE), read_u64(&child, a + PAGE_SIZE)), (101, 3));
    check_consistent(&parent);
    check_consistent(&child);
    drop(child);
    // The parent owns its pages alone again: writes reuse them.
    assert_eq!(fault(&parent, a + 2 * PAGE_SIZE, Access::WRITE), Ok(FaultResult::Reuse));
    assert_eq!(read_u64(&parent, a + 2 * PAGE_SIZE), 102);
    drop(parent);
    assert_eq!(m.settled_free_pages(), start);
}

/// A THP and a hugetlb page are copied at fork, never shared: the child's
/// are its own; the parent's come back writable in place on its next write.
#[test]
fn fork_copies_huge_pages() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let parent = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&parent);
    let t = parent.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    let t = (t + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    assert_eq!(fault(&parent, t, Access::WRITE), Ok(FaultResult::Thp));
    write_u64(&parent, t + 5 * PAGE_SIZE, 55);
    let h = parent.mmap(None, PMD_SIZE, RW, MapFlags::HUGETLB_2M).unwrap().as_u64();
    write_u64(&parent, h + 8, 88);
    let child = parent.fork().unwrap();
    on_cpu(&child);
    for va in [t, h] {
        let (pm, cm) = (
            parent.follow_pte_lockless(VirtAddr::new(va)).unwrap(),
            child.follow_pte_lockless(VirtAddr::new(va)).unwrap(),
        );
        assert_eq!((pm.size, cm.size), (PMD_SIZE, PMD_SIZE));
        assert_ne!(pm.pa, cm.pa, "huge pages are copied, not shared");
    }
    assert_eq!((read_u64(&child, t + 5 * PAGE_SIZE), read_u64(&child, h + 8)), (55, 88));
    assert_eq!(fault(&parent, t, Access::WRITE), Ok(FaultResult::Reuse));
    assert_eq!(fault(&parent, h, Access::WRITE), Ok(FaultResult::Reuse));
    write_u64(&parent, t + 5 * PAGE_SIZE, 1);
    write_u64(&child, h + 8, 2);
    assert_eq!((read_u64(&child, t + 5 * PAGE_SIZE), read_u64(&parent, h + 8)), (55, 88));
    check_consistent(&parent);
    check_consistent(&child);
    drop((parent, child));
    assert_eq!(m.settled_free_pages(), start);
}

/// A fork that runs out of memory part way fails cleanly: nothing leaks and
/// the parent keeps its data (its write-protected pages turn writable on
/// their next write).
#[test]
fn fork_out_of_memory_leaks_nothing() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let parent = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&parent);
    // Pages in many PTE tables, so the child needs many tables.
    let a = parent.mmap(None, 16 * PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for i in 0..16 {
        write_u64(&parent, a + i * PMD_SIZE, i);
    }
    let mut hog = Vec::new();
    for keep in [0usize, 3, 8] {
        while m.phys.nr_free_pages() > keep as u64 {
            hog.push(m.phys.alloc_pages(0).unwrap());
        }
        assert!(matches!(parent.fork(), Err(FaultError::Oom)), "fork with {keep} free frames");
        hog.clear();
    }
    for i in 0..16 {
        assert_eq!(read_u64(&parent, a + i * PMD_SIZE), i);
        assert!(matches!(
            fault(&parent, a + i * PMD_SIZE, Access::WRITE),
            Ok(FaultResult::Reuse | FaultResult::Spurious)
        ));
    }
    check_consistent(&parent);
    drop(parent);
    assert_eq!(m.settled_free_pages(), start);
}

/// Two address spaces that share frames since a fork can unmap them at the
/// same time, each gathering the same frames for its own shoot-down (the
/// parent's munmap and the child's exit on two CPUs). Each gather must drop
/// its own mapping's reference, once: the frames come back when both are
/// done, not before, and nothing else is freed.
#[test]
fn two_gathers_holding_the_same_shared_frames_each_drop_their_reference() {
    use crate::tlb::MmuGather;
    use crate::zap::{ZapDetails, unmap_page_range};
    let m = big();
    let start = m.phys.nr_free_pages();
    let parent = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&parent);
    const PAGES: u64 = 8;
    let a = parent.mmap(None, PAGES * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for p in 0..PAGES {
        write_u64(&parent, a + p * PAGE_SIZE, 100 + p);
    }
    let child = parent.fork().unwrap();
    on_cpu(&child);
    let frames: Vec<_> = (0..PAGES).map(|p| frame_of(&parent, a + p * PAGE_SIZE)).collect();
    let vma_of = |mm: &Mm<'_>| *mm.vmas().iter().find(|v| v.contains(VirtAddr::new(a))).unwrap();
    let (pv, cv) = (vma_of(&parent), vma_of(&child));
    // Both zap before either flushes: the frames sit in two gathers at once.
    let mut in_parent = MmuGather::new(&parent);
    let mut in_child = MmuGather::new(&child);
    for (mm, tlb, vma) in [(&parent, &mut in_parent, &pv), (&child, &mut in_child, &cv)] {
        let _zapping = mm.mmap_lock().read();
        unmap_page_range(tlb, vma, a, a + PAGES * PAGE_SIZE, ZapDetails::default());
    }
    for f in &frames {
        assert_eq!(m.phys.page(*f).unwrap().refcount(), 2, "a gathered frame keeps its reference until the flush");
    }
    in_parent.finish();
    for f in &frames {
        assert_eq!(m.phys.page(*f).unwrap().refcount(), 1, "the parent's gather dropped its reference, once");
    }
    in_child.finish();
    let free_now = m.settled_free_pages();
    drop(child);
    drop(parent);
    let end = m.settled_free_pages();
    assert_eq!(end, start, "every frame came back");
    assert!(end - free_now < PAGES + 16, "the shared frames were freed by the gathers, not left for the teardown");
}

/// A munmap of more frames shared since a fork than a gather holds outside
/// its list flushes as it goes (dropping the PTE lock), and every frame
/// comes back once both sides are gone.
#[test]
fn a_munmap_of_more_shared_frames_than_a_batch_flushes_as_it_goes() {
    use crate::tlb::SHARED_BATCH;
    let m = big();
    let start = m.phys.nr_free_pages();
    let parent = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&parent);
    let pages = 3 * SHARED_BATCH as u64 + 5;
    let a = parent.mmap(None, pages * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for p in 0..pages {
        write_u64(&parent, a + p * PAGE_SIZE, 7 * p);
    }
    let child = parent.fork().unwrap();
    on_cpu(&child);
    let frames: Vec<_> = (0..pages).map(|p| frame_of(&parent, a + p * PAGE_SIZE)).collect();
    parent.munmap(VirtAddr::new(a), pages * PAGE_SIZE).unwrap();
    for (p, f) in frames.iter().enumerate() {
        assert_eq!(m.phys.page(*f).unwrap().refcount(), 1, "the parent dropped its reference to page {p}");
        assert_eq!(read_u64(&child, a + p as u64 * PAGE_SIZE), 7 * p as u64);
    }
    check_consistent(&child);
    drop(child);
    drop(parent);
    assert_eq!(m.settled_free_pages(), start);
}

/// Random sequences of fork, write, munmap and exit against a page model:
/// every address space reads what the model says, and nothing leaks.
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Fork { from: usize },
        Write { mm: usize, page: u64, v: u64 },
        Unmap { mm: usize, page: u64 },
        Exit { mm: usize },
    }

    const PAGES: u64 = 24;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..4usize).prop_map(|from| Op::Fork { from }),
            4 => (0..4usize, 0..PAGES, 1..1000u64).prop_map(|(mm, page, v)| Op::Write { mm, page, v }),
            1 => (0..4usize, 0..PAGES).prop_map(|(mm, page)| Op::Unmap { mm, page }),
            1 => (0..4usize).prop_map(|mm| Op::Exit { mm }),
        ]
    }

    fn run(ops: Vec<Op>) {
        let m = big();
        let start = m.phys.nr_free_pages();
        let base = 0x4000_0000u64;
        {
            let first = Mm::new_in(&m.phys, m.kernel).unwrap();
            first.mmap(Some(VirtAddr::new(base)), PAGES * PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
            // (address space, model: page -> Some(value) mapped, None unmapped)
            let mut spaces: Vec<(Mm<'_>, BTreeMap<u64, Option<u64>>)> =
                std::vec![(first, (0..PAGES).map(|p| (p, Some(0))).collect())];
            for op in ops {
                let n = spaces.len();
                match op {
                    Op::Fork { from } if n > 0 && n < 4 => {
                        let (mm, model) = &spaces[from % n];
                        let child = mm.fork().unwrap();
                        let model = model.clone();
                        spaces.push((child, model));
                    }
                    Op::Write { mm, page, v } if n > 0 => {
                        let (mm, model) = &mut spaces[mm % n];
                        if model[&page].is_some() {
                            write_u64(mm, base + page * PAGE_SIZE, v);
                            model.insert(page, Some(v));
                        }
                    }
                    Op::Unmap { mm, page } if n > 0 => {
                        let (mm, model) = &mut spaces[mm % n];
                        mm.munmap(VirtAddr::new(base + page * PAGE_SIZE), PAGE_SIZE).unwrap();
                        model.insert(page, None);
                    }
                    Op::Exit { mm } if n > 0 => {
                        spaces.remove(mm % n);
                    }
                    _ => {}
                }
                for (mm, model) in &spaces {
                    for (&p, v) in model {
                        if let Some(v) = v {
                            assert_eq!(read_u64(mm, base + p * PAGE_SIZE), *v, "page {p}");
                        }
                    }
                    check_consistent(mm);
                }
            }
        }
        assert_eq!(m.settled_free_pages(), start, "everything freed once every address space is gone");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_fork_write_unmap_exit_sequences_match_the_model(ops in proptest::collection::vec(op(), 1..30)) {
            run(ops);
        }
    }
}
