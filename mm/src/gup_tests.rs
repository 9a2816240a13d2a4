//! Tests of the lockless user-page walker and pinning.

extern crate std;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent, fault, on_cpu, read_u64, write_u64};
use crate::gup::{get_user_pages, get_user_pages_fast};
use crate::madvise_tests::StopOnDrop;
use crate::{Access, Advice, FaultError, FaultResult, MapFlags, Mm, PageKind, Prot};

fn tag(p: u64) -> u64 {
    (p << 32) | 0xabcd
}

fn read_pinned(pins: &crate::gup::Pins<'_>, page: u64) -> u64 {
    let mut b = [0u8; 8];
    pins.read(page * PAGE_SIZE, &mut b);
    u64::from_le_bytes(b)
}

/// Mapped pages are pinned by the lockless walk, the rest by the slow path
/// (which faults them in); reads and writes through the pins see the
/// user's memory; unpinning leaves everything as it was.
#[test]
fn gup_fast_pins_mapped_pages_and_falls_back_for_the_rest() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 8 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    for p in 0..4 {
        write_u64(&mm, a + p * PAGE_SIZE, tag(p));
    }
    let pins = get_user_pages_fast(&mm, VirtAddr::new(a), 8, false).unwrap();
    assert_eq!(pins.pages().len(), 8);
    let st = mm.stats();
    assert_eq!((st.gup_fast_pages, st.gup_slow_pages), (4, 4), "4 mapped, 4 faulted in by the slow path");
    for p in 0..8 {
        assert_eq!(read_pinned(&pins, p), if p < 4 { tag(p) } else { 0 });
    }
    assert!(pins.pages()[..4].iter().all(|p| m.phys.page(p.head).unwrap().refcount() == 2), "mapping + pin");
    drop(pins);
    // A write pin: the zero pages mapped by the read above are copied first.
    let pins = get_user_pages_fast(&mm, VirtAddr::new(a + 4 * PAGE_SIZE), 2, true).unwrap();
    pins.write(8, &mut 77u64.to_le_bytes());
    drop(pins);
    assert_eq!(read_u64(&mm, a + 4 * PAGE_SIZE + 8), 77);
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// The slow path's errors: no VMA, a VMA that forbids the access.
#[test]
fn gup_errors_follow_the_vma() {
    let m = big();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let ro = mm.mmap(None, PAGE_SIZE, Prot::READ, MapFlags::empty()).unwrap();
    let none = mm.mmap(None, PAGE_SIZE, Prot::NONE, MapFlags::empty()).unwrap();
    assert_eq!(get_user_pages_fast(&mm, VirtAddr::new(0x1000), 1, false).unwrap_err(), FaultError::MapErr);
    assert_eq!(get_user_pages_fast(&mm, ro, 1, true).unwrap_err(), FaultError::AccErr);
    assert_eq!(get_user_pages_fast(&mm, none, 1, false).unwrap_err(), FaultError::AccErr);
    assert_eq!(
        get_user_pages_fast(&mm, VirtAddr::new(0xffff_8000_0000_0000), 1, false).unwrap_err(),
        FaultError::MapErr
    );
    // Two pages of which the second is unmapped: nothing stays pinned.
    let before = m.phys.page(m.phys.zero_pfn()).unwrap().refcount();
    assert!(get_user_pages(&mm, ro, 2, false).is_err());
    assert_eq!(m.phys.page(m.phys.zero_pfn()).unwrap().refcount(), before, "the first page was unpinned");
}

/// A pinned frame survives munmap and DONTNEED of its page: it goes back to
/// the allocator with the pin, not with the mapping.
#[test]
fn a_pinned_frame_outlives_its_mapping() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 2 * PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    write_u64(&mm, a, tag(0));
    write_u64(&mm, a + PAGE_SIZE, tag(1));
    let pins = get_user_pages_fast(&mm, VirtAddr::new(a), 2, false).unwrap();
    let frames: std::vec::Vec<_> = pins.pages().iter().map(|p| p.head).collect();
    mm.madvise(VirtAddr::new(a), PAGE_SIZE, Advice::DontNeed).unwrap();
    mm.munmap(VirtAddr::new(a + PAGE_SIZE), PAGE_SIZE).unwrap();
    m.phys.rcu_barrier();
    for (i, f) in frames.iter().enumerate() {
        let page = m.phys.page(*f).unwrap();
        assert_eq!((page.kind(), page.refcount()), (PageKind::Anon, 1), "frame {i} held by the pin alone");
        assert_eq!(read_pinned(&pins, i as u64), tag(i as u64), "its data is intact");
    }
    assert_eq!(read_u64(&mm, a), 0, "the mapping itself reads zero");
    drop(pins);
    assert!(frames.iter().all(|f| m.phys.page(*f).unwrap().kind() == PageKind::Free), "the last put freed them");
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// A pinned THP is not split into separately owned frames until the pin is
/// dropped: a partial munmap waits for it.
#[test]
fn a_pinned_thp_is_split_only_after_the_pin_goes() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let t = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    let t = (t + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    assert_eq!(fault(&mm, t, Access::WRITE), Ok(FaultResult::Thp));
    write_u64(&mm, t + 7 * PAGE_SIZE, tag(7));
    let pins = get_user_pages_fast(&mm, VirtAddr::new(t + 7 * PAGE_SIZE), 1, false).unwrap();
    assert_eq!(pins.pages()[0].order, crate::HPAGE_PMD_ORDER);
    let split_done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            mm.munmap(VirtAddr::new(t), PAGE_SIZE).unwrap();
            split_done.store(true, SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!split_done.load(SeqCst), "the THP was split under a pin");
        assert_eq!(read_pinned(&pins, 0), tag(7));
        drop(pins);
    });
    assert!(split_done.load(SeqCst));
    assert_eq!(mm.stats().thp_splits, 1);
    assert_eq!(read_u64(&mm, t + 7 * PAGE_SIZE), tag(7));
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// The lockless walker against munmap, remap and table reclaim: threads pin
/// pages of a region over and over and check each pinned page holds its own
/// tag or zero, never another page's data or a freed frame's, while others
/// unmap and remap parts of it and DONTNEED others. Runs until pages were
/// pinned both ways and tables were reclaimed under the walkers.
#[test]
fn storm_gup_fast_races_munmap_and_reclaim() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    const TABLES: u64 = 4;
    let len = TABLES * PMD_SIZE;
    let a = mm.mmap(None, len + PMD_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let a = (a + PMD_SIZE - 1) & !(PMD_SIZE - 1);
    let pages = len / PAGE_SIZE;
    let stop = AtomicBool::new(false);
    let checked = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        // Writers keep (sparse) tags in place.
        {
            let (mm, stop) = (&mm, &stop);
            s.spawn(move || {
                let _stop_all = StopOnDrop(stop);
                on_cpu(mm);
                while !stop.load(SeqCst) {
                    for p in (0..pages).step_by(32) {
                        // The range may be unmapped right now (remapper).
                        let _ = mm.access_remote(VirtAddr::new(a + p * PAGE_SIZE), &mut tag(p).to_le_bytes(), true);
                    }
                }
            });
        }
        for w in 0..2u64 {
            let (mm, stop, checked) = (&mm, &stop, &checked);
            s.spawn(move || {
                let _stop_all = StopOnDrop(stop);
                on_cpu(mm);
                let mut p = w * 64;
                while !stop.load(SeqCst) {
                    p = (p + 32 * 7) % pages;
                    let Ok(pins) = get_user_pages_fast(mm, VirtAddr::new(a + p * PAGE_SIZE), 4, false) else {
                        continue;
                    };
                    for (i, pin) in pins.pages().iter().enumerate() {
                        let v = read_pinned(&pins, i as u64);
                        let want = tag(p + i as u64);
                        assert!(v == 0 || v == want, "page {}: pinned frame reads {v:#x}", p + i as u64);
                        assert_ne!(mm.phys().page(pin.head).unwrap().kind(), PageKind::Free, "pinned a free frame");
                    }
                    checked.fetch_add(1, SeqCst);
                }
            });
        }
        {
            let (mm, stop) = (&mm, &stop);
            s.spawn(move || {
                let _stop_all = StopOnDrop(stop);
                on_cpu(mm);
                let mut i = 0u64;
                while !stop.load(SeqCst) {
                    let t = a + (i % TABLES) * PMD_SIZE;
                    if i.is_multiple_of(3) {
                        mm.munmap(VirtAddr::new(t), PMD_SIZE).unwrap();
                        mm.mmap(Some(VirtAddr::new(t)), PMD_SIZE, RW, MapFlags::FIXED).unwrap();
                    } else {
                        mm.madvise(VirtAddr::new(t), PMD_SIZE, Advice::DontNeed).unwrap();
                    }
                    i += 1;
                }
            });
        }
        let _stop_all = StopOnDrop(&stop);
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let st = mm.stats();
            if st.gup_fast_pages > 0 && st.gup_slow_pages > 0 && st.pt_reclaimed > 0 && checked.load(SeqCst) > 100 {
                break;
            }
            assert!(Instant::now() < deadline, "the races never happened: {st:?}");
        }
    });
    check_consistent(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}
