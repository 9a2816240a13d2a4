//! Tests of `MADV_COLLAPSE`.

extern crate std;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent, on_cpu, read_u64, write_u64};
use crate::gup::get_user_pages_fast;
use crate::madvise_tests::StopOnDrop;
use crate::{Advice, MapFlags, Mm, MmapError};

fn collapse(mm: &Mm<'_>, a: u64, len: u64) -> Result<(), MmapError> {
    mm.madvise(VirtAddr::new(a), len, Advice::Collapse)
}

fn block(mm: &Mm<'_>) -> u64 {
    let a = mm.mmap(None, 3 * PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    (a + PMD_SIZE - 1) & !(PMD_SIZE - 1)
}

/// A block of small pages with holes becomes one THP: the data stays, holes
/// read zero, the old pages go back, the emptied PTE table is deposited (a
/// later partial munmap splits without allocating); a block already huge or
/// with nothing mapped is left alone.
#[test]
fn collapse_turns_a_block_with_holes_into_a_thp() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let h = block(&mm);
    for p in (0..512).step_by(3) {
        write_u64(&mm, h + p * PAGE_SIZE, 1000 + p);
    }
    let ptes = mm.nr_ptes();
    collapse(&mm, h, PMD_SIZE).unwrap();
    let map = mm.follow_pte_lockless(VirtAddr::new(h)).unwrap();
    assert_eq!(map.size, PMD_SIZE);
    for p in 0..512 {
        assert_eq!(read_u64(&mm, h + p * PAGE_SIZE), if p % 3 == 0 { 1000 + p } else { 0 }, "page {p}");
    }
    let st = mm.stats();
    assert_eq!((st.thp_collapses, st.rss_pages), (1, 512));
    assert_eq!(mm.nr_ptes(), ptes, "the old table is the THP's deposited one");
    // Collapsing again, or an empty block, does nothing.
    collapse(&mm, h, 2 * PMD_SIZE).unwrap();
    assert_eq!(mm.stats().thp_collapses, 1);
    // A partial munmap splits it (with the deposited table).
    let free = m.phys.nr_free_pages();
    mm.munmap(VirtAddr::new(h), PAGE_SIZE).unwrap();
    assert_eq!(mm.stats().thp_splits, 1);
    assert_eq!(m.phys.nr_free_pages(), free + 1, "one page freed, no table allocated");
    assert_eq!(read_u64(&mm, h + 3 * PAGE_SIZE), 1003);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Blocks with nothing mapped cost no 2 MiB frame: with no free 2 MiB
/// block left anywhere, collapsing a large empty mapping (and one populated
/// block in it) still succeeds for the empty part and reports `ENOMEM` only
/// because the populated block needed a frame.
#[test]
fn collapse_allocates_nothing_for_empty_blocks() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let len = 64 * PMD_SIZE;
    let a = mm.mmap(None, len + PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64().next_multiple_of(PMD_SIZE);
    let mut hog = std::vec::Vec::new();
    while let Some(f) = m.phys.alloc_pages(9) {
        hog.push(f);
    }
    assert_eq!(collapse(&mm, a, len), Ok(()), "no block is populated: nothing to allocate");
    assert_eq!(collapse(&mm, a + PAGE_SIZE, PAGE_SIZE), Ok(()), "a range inside one block holds no whole block");
    write_u64(&mm, a + 7 * PMD_SIZE, 5);
    assert_eq!(collapse(&mm, a, len), Err(MmapError::NoMemory), "the one populated block needs a frame");
    drop(hog);
    collapse(&mm, a, len).unwrap();
    assert_eq!(mm.stats().thp_collapses, 1);
    assert_eq!(read_u64(&mm, a + 7 * PMD_SIZE), 5);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// A block with a page shared by fork, or pinned, is refused (`EAGAIN`) and
/// left exactly as it was; unpinned, it collapses.
#[test]
fn collapse_refuses_shared_and_pinned_pages() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let h = block(&mm);
    write_u64(&mm, h, 1);
    write_u64(&mm, h + 8 * PAGE_SIZE, 2);
    let pins = get_user_pages_fast(&mm, VirtAddr::new(h + 8 * PAGE_SIZE), 1, false).unwrap();
    assert_eq!(collapse(&mm, h, PMD_SIZE), Err(MmapError::Busy));
    assert_eq!(mm.follow_pte_lockless(VirtAddr::new(h)).unwrap().size, PAGE_SIZE, "left as it was");
    assert_eq!((read_u64(&mm, h), read_u64(&mm, h + 8 * PAGE_SIZE)), (1, 2));
    drop(pins);
    let child = mm.fork().unwrap();
    assert_eq!(collapse(&mm, h, PMD_SIZE), Err(MmapError::Busy), "shared with the child");
    drop(child);
    collapse(&mm, h, PMD_SIZE).unwrap();
    assert_eq!(mm.follow_pte_lockless(VirtAddr::new(h)).unwrap().size, PMD_SIZE);
    assert_eq!(mm.stats().thp_collapse_refused, 2);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Collapse racing faults and the lockless walker: one thread keeps
/// dropping and collapsing two blocks, others write their tags in them and
/// read them back, and others pin pages of them with `get_user_pages_fast`
/// and check each pinned page holds its tag or zero. Runs until blocks were
/// collapsed and a pin made a collapse refuse.
#[test]
fn storm_collapse_races_faults_and_the_lockless_walker() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let h = block(&mm);
    let stop = AtomicBool::new(false);
    let pinned = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let tag = |p: u64| (p << 32) | 0x5a;
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (mm, stop) = (&mm, &stop);
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                on_cpu(mm);
                while !stop.load(SeqCst) {
                    for p in (w..1024).step_by(37) {
                        let va = h + p * PAGE_SIZE;
                        write_u64(mm, va, tag(p));
                        let v = read_u64(mm, va);
                        assert!(v == tag(p) || v == 0, "page {p}: {v:#x}");
                    }
                }
            });
        }
        {
            let (mm, stop, pinned) = (&mm, &stop, &pinned);
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                on_cpu(mm);
                let mut p = 0u64;
                while !stop.load(SeqCst) {
                    p = (p + 37) % 1024;
                    let Ok(pins) = get_user_pages_fast(mm, VirtAddr::new(h + p * PAGE_SIZE), 2, false) else {
                        continue;
                    };
                    for i in 0..2u64 {
                        let mut b = [0u8; 8];
                        pins.read(i * PAGE_SIZE, &mut b);
                        let v = u64::from_le_bytes(b);
                        assert!(v == tag(p + i) || v == 0, "pinned page {}: {v:#x}", p + i);
                    }
                    pinned.fetch_add(1, SeqCst);
                    std::thread::yield_now();
                }
            });
        }
        let (mm, stop) = (&mm, &stop);
        s.spawn(move || {
            let _stop = StopOnDrop(stop);
            on_cpu(mm);
            let mut i = 0u64;
            while !stop.load(SeqCst) {
                let b = h + (i % 2) * PMD_SIZE;
                match collapse(mm, b, PMD_SIZE) {
                    Ok(()) | Err(MmapError::Busy) => {}
                    Err(e) => panic!("collapse: {e:?}"),
                }
                if i % 3 == 2 {
                    mm.madvise(VirtAddr::new(b), PMD_SIZE, Advice::DontNeed).unwrap();
                }
                i += 1;
            }
        });
        let _stop = StopOnDrop(stop);
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let st = mm.stats();
            if st.thp_collapses > 2 && st.thp_collapse_refused > 0 && pinned.load(SeqCst) > 20 {
                break;
            }
            assert!(Instant::now() < deadline, "the races never happened: {st:?}");
        }
    });
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}
