//! Tests of huge pages (THP with deposit and split, hugetlb 2 MiB and 1 GiB)
//! and of deferred page-table freeing (grace periods, lockless walkers).

extern crate std;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, VirtAddr};
use crate::fault_tests::{RW, big, check_consistent as check, fault, on_cpu, read_u64, write_u64};
use crate::memory::{FaultLock, fault_locked};
use crate::testing::{TestMachine, rcu_depth};
use crate::vma::Vma;
use crate::{
    Access, FaultError, FaultResult, MapFlags, Mm, MmapError, PageKind, Prot, PteFlags, VmFlags, pmd_lock,
    pte_offset_map_ro_nolock,
};

/// Mapped bytes by entry size: (4 KiB count, 2 MiB count, 1 GiB count).
fn sizes(mm: &Mm<'_>) -> (usize, usize, usize) {
    let maps = mm.mappings();
    let n = |s| maps.iter().filter(|m| m.size == s).count();
    (n(PAGE_SIZE), n(PMD_SIZE), n(PUD_SIZE))
}

#[test]
fn thp_fault_maps_2m_with_a_deposited_table() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    assert_eq!(fault(&mm, a + 0x1234, Access::WRITE), Ok(FaultResult::Thp));
    assert_eq!(fault(&mm, a + PMD_SIZE - 8, Access::READ), Ok(FaultResult::Spurious));
    assert_eq!(fault(&mm, a + PMD_SIZE, Access::READ), Ok(FaultResult::Thp), "read faults take a THP too");
    assert_eq!(sizes(&mm), (0, 2, 0));
    // One deposited PTE table per huge PMD, counted like Linux does.
    assert_eq!(mm.nr_ptes(), 2);
    assert_eq!(mm.stats().rss_pages, 1024);
    write_u64(&mm, a + PMD_SIZE - 8, 42);
    assert_eq!(read_u64(&mm, a + PMD_SIZE - 8), 42);
    let maps = mm.mappings();
    assert!(maps[0].flags.contains(PteFlags::HUGE | PteFlags::WRITABLE));
    assert_eq!(m.phys.page(maps[0].pa.pfn()).unwrap().kind(), PageKind::Anon);
    check(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start, "THP frames and deposited tables freed");
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

#[test]
fn partial_munmap_splits_a_thp_using_its_deposited_table() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Thp));
    for i in 0..512 {
        write_u64(&mm, a + i * PAGE_SIZE, i + 1);
    }
    let ptes = mm.nr_ptes();
    // The split must not allocate: exhaust memory first.
    let mut hog = Vec::new();
    while let Some(f) = m.phys.alloc_pages(0) {
        hog.push(f);
    }
    mm.munmap(VirtAddr::new(a + 100 * PAGE_SIZE), 3 * PAGE_SIZE).unwrap();
    assert_eq!(mm.nr_ptes(), ptes, "the deposited table became the PTE table");
    assert_eq!(mm.stats().thp_splits, 1);
    assert_eq!(sizes(&mm), (509, 0, 0));
    assert_eq!(mm.stats().rss_pages, 509);
    drop(hog);
    for i in (0..512).filter(|i| !(100..103).contains(i)) {
        assert_eq!(read_u64(&mm, a + i * PAGE_SIZE), i + 1, "subpage {i} kept its data");
    }
    assert_eq!(fault(&mm, a + 100 * PAGE_SIZE, Access::READ), Err(FaultError::MapErr));
    check(&mm);
    // The freed subpages are individually back in the allocator.
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn partial_mprotect_splits_a_thp_and_whole_mprotect_does_not() {
    let m = big();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    on_cpu(&mm);
    let a = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    fault(&mm, a, Access::WRITE).unwrap();
    fault(&mm, a + PMD_SIZE, Access::WRITE).unwrap();
    write_u64(&mm, a + PMD_SIZE + 8, 5);
    mm.mprotect(VirtAddr::new(a + PMD_SIZE), PMD_SIZE, Prot::READ).unwrap();
    assert_eq!(sizes(&mm), (0, 2, 0), "a whole huge PMD changes in place");
    assert_eq!(fault(&mm, a + PMD_SIZE, Access::WRITE), Err(FaultError::AccErr));
    mm.mprotect(VirtAddr::new(a + 4 * PAGE_SIZE), PAGE_SIZE, Prot::NONE).unwrap();
    assert_eq!(sizes(&mm), (512, 1, 0));
    assert_eq!(mm.stats().thp_splits, 1);
    let maps = mm.mappings();
    let none = maps.iter().find(|x| x.va.as_u64() == a + 4 * PAGE_SIZE).unwrap();
    assert!(!none.flags.contains(PteFlags::PRESENT) && none.flags.contains(crate::PROTNONE));
    assert_eq!(fault(&mm, a + 4 * PAGE_SIZE, Access::READ), Err(FaultError::AccErr));
    assert_eq!(fault(&mm, a + 5 * PAGE_SIZE, Access::WRITE), Ok(FaultResult::Spurious));
    assert_eq!(read_u64(&mm, a + PMD_SIZE + 8), 5);
    mm.mprotect(VirtAddr::new(a), 2 * PMD_SIZE, RW).unwrap();
    assert_eq!(mm.vmas().len(), 1);
    check(&mm);
}

#[test]
fn thp_falls_back_to_4k_without_a_2m_frame_or_a_whole_2m_range() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 2 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    // Take every block of order >= 9, leaving only small ones.
    let mut hog = Vec::new();
    while let Some(f) = m.phys.alloc_pages(crate::HPAGE_PMD_ORDER) {
        hog.push(f);
    }
    assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Anon));
    assert_eq!(mm.stats().thp_fallbacks, 1);
    drop(hog);
    assert_eq!(fault(&mm, a + PMD_SIZE, Access::WRITE), Ok(FaultResult::Thp));
    assert_eq!(fault(&mm, a + 8 * PAGE_SIZE, Access::WRITE), Ok(FaultResult::Anon), "a PTE table is there now");
    // A HUGEPAGE VMA that does not cover a whole aligned 2 MiB block.
    let b = mm.mmap(None, PMD_SIZE + 8 * PAGE_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    let tail = (b & !(PMD_SIZE - 1)) + PMD_SIZE;
    assert_eq!(fault(&mm, tail + PAGE_SIZE, Access::WRITE), Ok(FaultResult::Anon));
    check(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn thp_allocation_failures_in_a_fault_are_oom_and_leak_nothing() {
    let m = big();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    fault(&mm, a + PMD_SIZE - PAGE_SIZE, Access::READ).unwrap_err_or_thp();
    mm.munmap(VirtAddr::new(a), PMD_SIZE).unwrap();
    mm.mmap(Some(VirtAddr::new(a)), PMD_SIZE, RW, MapFlags::HUGEPAGE | MapFlags::FIXED).unwrap();
    // Walk once so the upper tables exist, then fail the deposit table's ctor.
    let pud = crate::pud_alloc(&mm, crate::pgd_offset(&mm, VirtAddr::new(a)), VirtAddr::new(a)).unwrap();
    let _ = crate::pmd_alloc(&mm, pud, VirtAddr::new(a)).unwrap();
    let before = m.phys.nr_free_pages();
    m.phys.fault_inject().fail_nth_ctor(1);
    assert_eq!(fault(&mm, a, Access::WRITE), Err(FaultError::Oom));
    assert_eq!(m.phys.nr_free_pages(), before, "the 2 MiB frame and the table went back");
    assert_eq!(mm.stats().oom, 1);
    assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Thp));
}

trait ThpOk {
    fn unwrap_err_or_thp(self);
}
impl ThpOk for Result<FaultResult, FaultError> {
    fn unwrap_err_or_thp(self) {
        assert_eq!(self, Ok(FaultResult::Thp));
    }
}

#[test]
fn hugetlb_2m_pages_map_under_the_pmd_lock_and_refuse_partial_unmap() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, 3 * PMD_SIZE - PAGE_SIZE, RW, MapFlags::HUGETLB_2M).unwrap().as_u64();
    assert_eq!(a % PMD_SIZE, 0);
    assert_eq!(mm.vmas()[0].len(), 3 * PMD_SIZE, "length rounded up to the huge page size");
    assert_eq!(fault(&mm, a + 5, Access::READ), Ok(FaultResult::HugeTlb));
    assert_eq!(fault(&mm, a + PMD_SIZE + 5, Access::WRITE), Ok(FaultResult::HugeTlb));
    assert_eq!(fault(&mm, a + 8, Access::WRITE), Ok(FaultResult::Spurious));
    assert_eq!(sizes(&mm), (0, 2, 0));
    assert_eq!(mm.stats().hugetlb_pages, 1024);
    assert_eq!(mm.stats().rss_pages, 0);
    assert_eq!(mm.nr_ptes(), 0, "hugetlb deposits nothing");
    write_u64(&mm, a + PMD_SIZE + 64, 77);
    assert_eq!(mm.munmap(VirtAddr::new(a + PAGE_SIZE), PAGE_SIZE), Err(MmapError::Invalid));
    assert_eq!(mm.mprotect(VirtAddr::new(a), PAGE_SIZE, Prot::READ), Err(MmapError::Invalid));
    mm.mprotect(VirtAddr::new(a + PMD_SIZE), PMD_SIZE, Prot::READ).unwrap();
    assert_eq!(fault(&mm, a + PMD_SIZE, Access::WRITE), Err(FaultError::AccErr));
    assert_eq!(read_u64(&mm, a + PMD_SIZE + 64), 77);
    mm.munmap(VirtAddr::new(a), PMD_SIZE).unwrap();
    assert_eq!(sizes(&mm), (0, 1, 0));
    check(&mm);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn hugetlb_1g_pages_come_from_the_gigantic_pool() {
    // 31 MiB of ordinary RAM plus one GiB at 1 GiB for the pool. The buffer
    // is 2 GiB of address space; only what is touched becomes resident.
    let m = TestMachine::build(&[(0x10_0000, 0x200_0000), (0x4000_0000, 0x8000_0000)], |boot| {
        assert_eq!(boot.reserve_gigantic(2), 1, "one aligned GiB exists");
    });
    let pool = m.phys.gigantic_pool();
    assert_eq!((pool.nr_total(), pool.nr_free()), (1, 1));
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    assert_eq!(mm.mmap(None, 2 * PUD_SIZE, RW, MapFlags::HUGETLB_1G), Err(MmapError::NoMemory));
    let a = mm.mmap(None, PUD_SIZE, RW, MapFlags::HUGETLB_1G).unwrap().as_u64();
    assert_eq!(a % PUD_SIZE, 0);
    assert_eq!(fault(&mm, a + PUD_SIZE - 8, Access::WRITE), Ok(FaultResult::HugeTlb));
    assert_eq!(pool.nr_free(), 0);
    assert_eq!(sizes(&mm), (0, 0, 1));
    assert_eq!(mm.nr_pmds(), 0, "a 1 GiB page needs no PMD table");
    assert_eq!(mm.stats().hugetlb_pages, PUD_SIZE / PAGE_SIZE);
    assert_eq!(read_u64(&mm, a + 0x1234_5678), 0, "zeroed");
    write_u64(&mm, a + 0x1234_5678, 0xabc);
    assert_eq!(read_u64(&mm, a + 0x1234_5678), 0xabc);
    let t = mm.follow_pte_lockless(VirtAddr::new(a + 0x1234_5678)).unwrap();
    assert_eq!((t.size, t.va.as_u64()), (PUD_SIZE, a));
    assert_eq!(m.phys.page(t.pa.pfn()).unwrap().kind(), PageKind::Gigantic);
    assert_eq!(mm.munmap(VirtAddr::new(a), PMD_SIZE), Err(MmapError::Invalid));
    check(&mm);
    mm.munmap(VirtAddr::new(a), PUD_SIZE).unwrap();
    assert_eq!(pool.nr_free(), 1, "back in the pool");
    assert_eq!(sizes(&mm), (0, 0, 0));
    // And again, through teardown this time.
    let b = mm.mmap(None, PUD_SIZE, Prot::READ, MapFlags::HUGETLB_1G).unwrap().as_u64();
    assert_eq!(fault(&mm, b, Access::READ), Ok(FaultResult::HugeTlb));
    assert_eq!(pool.nr_free(), 0);
    drop(mm);
    assert_eq!(pool.nr_free(), 1);
    assert_eq!(m.settled_free_pages(), start);
}

/// THP faults and 4 KiB faults race on one PMD (as when one CPU's 2 MiB
/// allocation fails and it falls back while another's succeeds). Exactly
/// one wins the PMD; the other retries and ends up in the winner's mapping.
#[test]
fn thp_fault_races_4k_fault_on_one_pmd() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let base = mm.mmap(None, 8 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    let (mut thp, mut table) = (0, 0);
    for round in 0..40u64 {
        let a = base + (round % 8) * PMD_SIZE;
        let vma = mm.vmas()[0];
        let plain = Vma { flags: vma.flags.difference(VmFlags::HUGEPAGE), ..vma };
        let go = AtomicBool::new(false);
        let (r1, r2) = std::thread::scope(|s| {
            let (mm, go, vma, plain) = (&mm, &go, &vma, &plain);
            let h1 = s.spawn(move || {
                let _l = mm.mmap_lock().read();
                while !go.load(SeqCst) {}
                fault_locked(mm, vma, VirtAddr::new(a + 3 * PAGE_SIZE), Access::WRITE, false, FaultLock::Mmap)
            });
            let h2 = s.spawn(move || {
                let _l = mm.mmap_lock().read();
                while !go.load(SeqCst) {}
                fault_locked(mm, plain, VirtAddr::new(a + 7 * PAGE_SIZE), Access::WRITE, false, FaultLock::Mmap)
            });
            go.store(true, SeqCst);
            (h1.join().unwrap().unwrap(), h2.join().unwrap().unwrap())
        });
        match sizes_in(&mm, a) {
            (0, 1) => {
                thp += 1;
                assert_eq!(r1, FaultResult::Thp);
                assert_eq!(r2, FaultResult::Spurious, "the 4 KiB fault found the huge page");
            }
            (2, 0) => {
                table += 1;
                assert_eq!(r2, FaultResult::Anon);
                assert_eq!(r1, FaultResult::Anon, "the THP fault lost the PMD and fell to 4 KiB");
            }
            other => panic!("round {round}: {other:?} {r1:?} {r2:?}"),
        }
        check(&mm);
        mm.munmap(VirtAddr::new(a), PMD_SIZE).unwrap();
        mm.mmap(Some(VirtAddr::new(a)), PMD_SIZE, RW, MapFlags::HUGEPAGE | MapFlags::FIXED).unwrap();
    }
    assert!(thp + table == 40);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Sets the flag when dropped, also when the owning thread panics, so the
/// threads that wait for it stop and the panic is reported.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

fn sizes_in(mm: &Mm<'_>, a: u64) -> (usize, usize) {
    let maps: Vec<_> =
        mm.mappings().into_iter().filter(|m| m.va.as_u64() >= a && m.va.as_u64() < a + PMD_SIZE).collect();
    (maps.iter().filter(|m| m.size == PAGE_SIZE).count(), maps.iter().filter(|m| m.size == PMD_SIZE).count())
}

/// THP faults, 4 KiB faults (in a neighbouring non-THP mapping of the same
/// PMD table), and splits (partial mprotect/munmap, FIXED remaps) all at
/// once. Afterwards every page reads back what its last writer wrote.
#[test]
fn thp_and_4k_faults_race_splits_in_one_pmd_table() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let base = mm.mmap(None, 4 * PMD_SIZE, RW, MapFlags::HUGEPAGE).unwrap().as_u64();
    // The first 2 MiB are plain 4 KiB memory sharing the PMD table.
    mm.mmap(Some(VirtAddr::new(base)), PMD_SIZE, RW, MapFlags::FIXED).unwrap();
    let stop = AtomicBool::new(false);
    let ok = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (mm, stop, ok) = (&mm, &stop, &ok);
            s.spawn(move || {
                on_cpu(mm);
                let mut i = t * 17;
                while !stop.load(SeqCst) {
                    let va = (base + (i * 4099 % (4 * PMD_SIZE))) & !7;
                    match fault(mm, va, if i % 4 == 0 { Access::READ } else { Access::WRITE }) {
                        Ok(_) => {
                            ok.fetch_add(1, SeqCst);
                        }
                        Err(FaultError::MapErr | FaultError::AccErr) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                    i += 1;
                }
            });
        }
        let (mm, stop) = (&mm, &stop);
        s.spawn(move || {
            let _stop = StopOnDrop(stop);
            on_cpu(mm);
            // At least 60 rounds, and on until a THP was split (the faulters
            // must have mapped one in a block before a round cut it).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            for round in 0u64.. {
                if round >= 60 && (mm.stats().thp_splits > 0 || std::time::Instant::now() > deadline) {
                    break;
                }
                let blk = base + (1 + round % 3) * PMD_SIZE;
                match round % 4 {
                    0 => {
                        // NoMemory if a hole was punched in this block earlier.
                        let r = mm.mprotect(VirtAddr::new(blk + (round % 7) * PAGE_SIZE), 3 * PAGE_SIZE, Prot::READ);
                        assert!(matches!(r, Ok(()) | Err(MmapError::NoMemory)));
                    }
                    1 => mm.munmap(VirtAddr::new(blk + 64 * PAGE_SIZE), PAGE_SIZE).unwrap(),
                    2 => {
                        mm.mmap(Some(VirtAddr::new(blk)), PMD_SIZE, RW, MapFlags::HUGEPAGE | MapFlags::FIXED).unwrap();
                    }
                    _ => {
                        let r = mm.mprotect(VirtAddr::new(blk), PMD_SIZE, RW);
                        assert!(matches!(r, Ok(()) | Err(MmapError::NoMemory)));
                    }
                }
                std::thread::yield_now();
            }
        });
    });
    assert!(ok.load(SeqCst) > 0);
    check(&mm);
    // Every writable page takes a write and reads it back.
    mm.mprotect(VirtAddr::new(base), 4 * PMD_SIZE, RW).unwrap_or(());
    let maps = mm.mappings();
    for (k, mp) in maps.iter().enumerate() {
        write_u64(&mm, mp.va.as_u64() + 16, k as u64);
    }
    for (k, mp) in maps.iter().enumerate() {
        assert_eq!(read_u64(&mm, mp.va.as_u64() + 16), k as u64);
    }
    check(&mm);
    assert!(mm.stats().thp_splits > 0);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

#[test]
fn deposit_requires_the_pmd_lock() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let va = VirtAddr::new(0x4000_0000);
    let pmd = crate::walk_alloc_pmd(&mm, va).unwrap();
    let mut t = crate::pagetable_alloc(&m.phys).unwrap();
    crate::pagetable_pte_ctor(&mm, &mut t).unwrap();
    let pl = pmd_lock(&mm, pmd);
    crate::pgtable_trans_huge_deposit(&mm, pmd, t, &pl);
    let back = crate::pgtable_trans_huge_withdraw(&mm, pmd, &pl);
    drop(pl);
    assert_eq!(back.ptdesc().level(), Some(crate::PtLevel::Pte));
    drop(back);
    // A guard of another PMD table's lock is refused (with split locks off
    // both are page_table_lock, which is then the right lock).
    let mut t = crate::pagetable_alloc(&m.phys).unwrap();
    crate::pagetable_pte_ctor(&mm, &mut t).unwrap();
    crate::pgtable_trans_huge_deposit(&mm, pmd, t, &pmd_lock(&mm, pmd));
    let other = crate::walk_alloc_pmd(&mm, VirtAddr::new(0x8000_0000)).unwrap();
    let wrong = pmd_lock(&mm, other);
    let r =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::pgtable_trans_huge_withdraw(&mm, pmd, &wrong)));
    drop(wrong);
    assert_eq!(r.is_err(), crate::config::USE_SPLIT_PMD_PTLOCKS);
    match r {
        Ok(t) => drop(t),
        Err(_) => drop(crate::pgtable_trans_huge_withdraw(&mm, pmd, &pmd_lock(&mm, pmd))),
    }
}

/// The host `synchronize_rcu` waits for a reader that was inside before the
/// call, and not for one that starts later.
#[test]
fn synchronize_rcu_waits_for_earlier_readers_only() {
    let hal = crate::hal::get();
    let inside = AtomicBool::new(false);
    let release = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::hal::get().rcu_read_lock();
            inside.store(true, SeqCst);
            while !release.load(SeqCst) {
                std::thread::yield_now();
            }
            assert!(!done.load(SeqCst), "synchronize_rcu returned while a reader was inside");
            crate::hal::get().rcu_read_unlock();
        });
        while !inside.load(SeqCst) {
            std::thread::yield_now();
        }
        s.spawn(|| {
            crate::hal::get().synchronize_rcu();
            done.store(true, SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!done.load(SeqCst));
        release.store(true, SeqCst);
    });
    assert!(done.load(SeqCst));
    hal.synchronize_rcu(); // nobody inside: returns at once
}

/// A walker inside its read-side section holds a PTE table that munmap
/// detaches: munmap returns at once (the table waits in a grace-period
/// batch), the table and its split lock survive until the walker leaves
/// (an `rcu_barrier` started meanwhile waits for it), and the walker can
/// still take the lock.
#[test]
fn a_detached_table_and_its_lock_outlive_a_walker_in_its_read_section() {
    let m = TestMachine::new();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = 0x4000_0000u64;
    mm.mmap(Some(VirtAddr::new(a)), PAGE_SIZE, RW, MapFlags::FIXED).unwrap();
    write_u64(&mm, a, 3);
    let walker_in = AtomicBool::new(false);
    let unmapped = AtomicBool::new(false);
    let barrier_done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (mm, walker_in, unmapped, phys, barrier_done) = (&mm, &walker_in, &unmapped, &m.phys, &barrier_done);
        s.spawn(move || {
            let pmd = crate::walk_pmd(mm, VirtAddr::new(a)).unwrap();
            let nl = pte_offset_map_ro_nolock(mm, pmd, VirtAddr::new(a)).unwrap();
            let table = nl.map().table_pa();
            walker_in.store(true, SeqCst);
            // munmap detaches the table (with its whole subtree: the walk
            // from the PGD no longer reaches it) and returns without
            // waiting for us.
            while !unmapped.load(SeqCst) {
                std::thread::yield_now();
            }
            assert!(crate::walk_pmd(mm, VirtAddr::new(a)).is_none_or(|p| p.get().is_none()));
            assert!(phys.table_rcu_stats().waiting >= 1, "the detached table waits for a grace period");
            phys.rcu_reap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!barrier_done.load(SeqCst), "rcu_barrier finished while a walker was inside");
            let page = phys.page(table.pfn()).unwrap();
            assert_eq!(page.kind(), PageKind::PageTable, "detached table freed under a walker");
            assert_eq!(
                crate::page_ptdesc(phys, table.pfn()).unwrap().has_ptl(),
                crate::config::USE_SPLIT_PTE_PTLOCKS,
                "dtor ran early"
            );
            // The lock is still a lock: take it, read (the entry was cleared).
            let g = nl.lock();
            assert!(g.ptep_get().is_none());
            assert_eq!(rcu_depth(), 1, "still inside the read-side section");
            drop(g);
            assert_eq!(rcu_depth(), 0);
        });
        s.spawn(move || {
            while !walker_in.load(SeqCst) {
                std::thread::yield_now();
            }
            mm.munmap(VirtAddr::new(a), PAGE_SIZE).unwrap();
            unmapped.store(true, SeqCst);
            phys.rcu_barrier();
            barrier_done.store(true, SeqCst);
        });
    });
    assert_eq!(m.phys.table_rcu_stats().waiting, 0);
    assert_eq!(mm.nr_ptes(), 0);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

/// Lockless walkers (GUP-fast style) run while another thread maps,
/// touches and unmaps the range over and over, freeing the tables each
/// time: no walker ever reads a freed table (debug-asserted inside the
/// walk), and every translation it returns pointed at a user frame.
#[test]
fn lockless_walkers_race_munmap_that_frees_tables() {
    let m = big();
    let start = m.phys.nr_free_pages();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = 0x4000_0000u64 - 4 * PAGE_SIZE;
    let stop = AtomicBool::new(false);
    let seen = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (mm, stop, seen) = (&mm, &stop, &seen);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(SeqCst) {
                    if let Some(x) = mm.follow_pte_lockless(VirtAddr::new(a + (i % 8) * PAGE_SIZE)) {
                        assert_eq!(x.size, PAGE_SIZE);
                        seen.fetch_add(1, SeqCst);
                    }
                    i += 1;
                }
            });
        }
        let (mm, stop, seen) = (&mm, &stop, &seen);
        s.spawn(move || {
            let _stop = StopOnDrop(stop);
            on_cpu(mm);
            for round in 0..300 {
                mm.mmap(Some(VirtAddr::new(a)), 8 * PAGE_SIZE, RW, MapFlags::FIXED | MapFlags::POPULATE).unwrap();
                // Leave the walkers time to find the tables (on the first
                // round until they have, so the test cannot pass vacuously).
                let t0 = std::time::Instant::now();
                while (round == 0 && seen.load(SeqCst) == 0) || t0.elapsed() < std::time::Duration::from_micros(50) {
                    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "walkers never ran");
                    std::thread::yield_now();
                }
                mm.munmap(VirtAddr::new(a), 8 * PAGE_SIZE).unwrap();
                assert_eq!((mm.nr_ptes(), mm.nr_pmds()), (0, 0));
            }
        });
    });
    assert!(seen.load(SeqCst) > 0, "the walkers saw some mappings");
    drop(mm);
    assert_eq!(m.settled_free_pages(), start);
}

/// Per-VMA locks: a fault takes no `mmap_lock` at all, so it completes while
/// another CPU holds `mmap_lock` *exclusive* (a writer busy elsewhere); but a
/// fault on a VMA that writer is changing waits for it (falls back to
/// `mmap_lock`), and resolves once the write session ends.
#[test]
fn faults_take_no_mmap_lock_but_wait_for_writers_of_their_vma() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let a = mm.mmap(None, PAGE_SIZE, RW, MapFlags::empty()).unwrap().as_u64();
    let b = mm.mmap(Some(VirtAddr::new(a - 0x10_0000)), PAGE_SIZE, Prot::READ, MapFlags::FIXED).unwrap().as_u64();
    let before = mm.stats();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut w = mm.mmap_write_lock();
        // Unrelated VMA: the fault runs under its own VMA lock meanwhile.
        s.spawn(|| assert_eq!(fault(&mm, a, Access::WRITE), Ok(FaultResult::Anon))).join().unwrap();
        // The writer extends `b` (a merge replaces its node, write-locked
        // for this session): a fault on `b` must wait for the writer.
        w.insert(Vma {
            start: VirtAddr::new(b + PAGE_SIZE),
            end: VirtAddr::new(b + 2 * PAGE_SIZE),
            flags: VmFlags::READ,
        });
        let t = s.spawn(|| {
            let r = fault(&mm, b, Access::READ);
            done.store(true, SeqCst);
            r
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!done.load(SeqCst), "a fault on a VMA under change ran while the writer held it");
        drop(w);
        assert_eq!(t.join().unwrap(), Ok(FaultResult::ZeroPage));
    });
    let after = mm.stats();
    assert_eq!(after.vma_lock_faults - before.vma_lock_faults, 1, "the first fault used its VMA lock");
    assert_eq!(after.mmap_lock_faults - before.mmap_lock_faults, 1, "the second fell back to mmap_lock");
    assert_eq!(after.vma_fallback_locked - before.vma_fallback_locked, 1, "because its VMA was write-locked");
    assert_eq!(mm.vmas().iter().filter(|v| v.start.as_u64() == b).count(), 1);
    // After the session the merged VMA is published: faults use its lock again.
    assert_eq!(fault(&mm, b + PAGE_SIZE, Access::READ), Ok(FaultResult::ZeroPage));
    assert_eq!(mm.stats().vma_lock_faults - after.vma_lock_faults, 1);
}
