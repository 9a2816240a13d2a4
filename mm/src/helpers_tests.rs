//! Tests of the documented helpers on real x86_64 tables in a simulated
//! machine. Assertions follow the configuration in force, so the same tests
//! exercise the split-lock build and the single-lock build
//! (`SPLIT_PTLOCK_CPUS=1000000 cargo test -p mm`).

extern crate std;

use std::vec::Vec;

use super::*;
use crate::lock::lockdep::held_locks;
use crate::pgtable::walk::{
    p4d_alloc, p4d_offset, pgd_offset, pmd_alloc, pmd_offset, pud_alloc, pud_offset, set_pmd, set_pud, walk_alloc_pmd,
};
use crate::ptlock::AllocError;
use crate::testing::{TestMachine, bad_pmd_value, capture_logs, rcu_depth, take_logs};
use crate::{PAGE_SIZE, PteFlags, Pud};

const A: VirtAddr = VirtAddr::new(0x4000_0000); // PGD 0, PUD 1, PMD 0, PTE 0
const A_NEXT: VirtAddr = VirtAddr::new(0x4000_1000); // same PTE table
const B_OTHER_PTE: VirtAddr = VirtAddr::new(0x4020_0000); // same PMD table, next PTE table
const C_OTHER_PMD: VirtAddr = VirtAddr::new(0x8000_0000); // next PUD entry: another PMD table

fn data_pte(m: &TestMachine) -> Pte {
    // Any frame address will do: the tests never dereference mapped pages.
    let _ = m;
    Pte::page(crate::PhysAddr::new(0x123_4000), PteFlags::WRITABLE | PteFlags::USER)
}

/// A PMD entry with a PTE table installed.
fn pmd_with_table<'a>(mm: &'a Mm<'_>, addr: VirtAddr) -> PmdRef<'a> {
    let pmd = walk_alloc_pmd(mm, addr).expect("walk");
    pte_alloc(mm, pmd).expect("pte table");
    pmd
}

#[test]
fn pte_offset_map_maps_a_table_inside_a_read_side_section() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    assert_eq!(rcu_depth(), 0);
    let map = pte_offset_map(&mm, pmd, A).unwrap();
    assert_eq!(rcu_depth(), 1, "pte_offset_map enters the read-side section");
    assert_eq!(map.ptep_get(), Pte::NONE);
    assert_eq!(map.table_pa(), pmd.get().phys());
    assert_eq!(map.pmdval(), pmd.get());
    assert_eq!(held_locks(), 0, "no lock taken");
    pte_unmap(map);
    assert_eq!(rcu_depth(), 0, "pte_unmap leaves it");
}

#[test]
fn pte_offset_map_none_cases() {
    capture_logs();
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = walk_alloc_pmd(&mm, A).unwrap();

    // pmd none: nothing to map, nothing logged.
    take_logs();
    assert!(pte_offset_map(&mm, pmd, A).is_none());
    assert!(pte_offset_map_lock(&mm, pmd, A).is_none());
    assert!(pte_offset_map_ro_nolock(&mm, pmd, A).is_none());
    assert!(pte_offset_map_rw_nolock(&mm, pmd, A).is_none());
    assert_eq!(rcu_depth(), 0, "a failed map leaves the read-side section");

    // pmd huge: not a PTE table; left alone.
    let huge = Pmd::huge(crate::PhysAddr::new(0x20_0000), PteFlags::WRITABLE | PteFlags::USER);
    set_pmd(&mm, pmd, huge, &pmd_lock(&mm, pmd));
    assert!(pte_offset_map(&mm, pmd, A).is_none());
    assert!(pte_offset_map_lock(&mm, pmd, A).is_none());
    assert!(pte_offset_map_ro_nolock(&mm, pmd, A).is_none());
    assert!(pte_offset_map_rw_nolock(&mm, pmd, A).is_none());
    assert_eq!(pmd.get(), huge, "a huge pmd is not cleared");
    assert!(take_logs().is_empty());

    // pmd not present but not none (a swap-like entry): no table, not bad.
    let swapish = Pmd::from_raw(0x4000);
    set_pmd(&mm, pmd, swapish, &pmd_lock(&mm, pmd));
    assert!(pte_offset_map(&mm, pmd, A).is_none());
    assert_eq!(pmd.get(), swapish);

    // pmd bad: reported and cleared, by each helper.
    for helper in 0..4 {
        set_pmd(&mm, pmd, bad_pmd_value(), &pmd_lock(&mm, pmd));
        let mapped = match helper {
            0 => pte_offset_map(&mm, pmd, A).is_some(),
            1 => pte_offset_map_lock(&mm, pmd, A).is_some(),
            2 => pte_offset_map_ro_nolock(&mm, pmd, A).is_some(),
            _ => pte_offset_map_rw_nolock(&mm, pmd, A).is_some(),
        };
        assert!(!mapped);
        assert!(pmd.get().is_none(), "bad pmd cleared by helper {helper}");
        let logs = take_logs();
        assert!(logs.iter().any(|l| l.starts_with("ERROR") && l.contains("bad pmd")), "not reported: {logs:?}");
    }

    // A well-formed pmd pointing at a frame that is not a PTE table: bad too.
    let not_a_table = m.phys.alloc_pages(0).unwrap();
    set_pmd(&mm, pmd, Pmd::table(not_a_table.phys_addr(), true), &pmd_lock(&mm, pmd));
    assert!(pte_offset_map(&mm, pmd, A).is_none());
    assert!(pmd.get().is_none());
    assert_eq!(rcu_depth(), 0);
    drop(not_a_table);
}

#[test]
fn pte_offset_map_lock_takes_the_table_lock_and_unlocks_on_drop() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    // SAFETY: the table stays attached: nothing else runs in this test.
    let expected = unsafe { pte_lockptr(&mm, pmd.get()) };
    let mut g = pte_offset_map_lock(&mm, pmd, A).unwrap();
    assert!(expected.is_held_by(g.ptl()));
    assert!(expected.raw().is_locked());
    assert_eq!(rcu_depth(), 1);
    g.set_pte(data_pte(&m));
    g.set_pte_at(A_NEXT, data_pte(&m));
    assert_eq!(g.ptep_get(), data_pte(&m));
    pte_unmap_unlock(g);
    assert!(!expected.raw().is_locked());
    assert_eq!((rcu_depth(), held_locks()), (0, 0));
    // The write is in the real table: read it back locklessly.
    let map = pte_offset_map(&mm, pmd, A_NEXT).unwrap();
    assert_eq!(map.ptep_get(), data_pte(&m));
    assert_eq!(map.get_at(A), data_pte(&m));
    drop(map);
    let mut g = pte_offset_map_lock(&mm, pmd, A).unwrap();
    assert_eq!(g.ptep_get_and_clear(A), data_pte(&m));
    g.pte_clear(A_NEXT);
    assert_eq!(g.get_at(A_NEXT), Pte::NONE);
}

#[test]
#[should_panic(expected = "outside this PTE table")]
fn a_guard_refuses_entries_of_other_tables() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    let g = pte_offset_map_lock(&mm, pmd, A).unwrap();
    let _ = g.get_at(B_OTHER_PTE);
}

#[test]
fn ro_nolock_returns_the_lock_untaken() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    let nl = pte_offset_map_ro_nolock(&mm, pmd, A).unwrap();
    // SAFETY: inside `nl`'s read-side section, used at once.
    assert_eq!(nl.ptl(), unsafe { pte_lockptr(&mm, pmd.get()) });
    assert!(!nl.ptl().raw().is_locked(), "nolock: not taken");
    assert_eq!(rcu_depth(), 1);
    let g = nl.lock();
    assert!(g.ptl().lock().is_locked());
    assert_eq!(g.ptep_get(), Pte::NONE);
    let again = pte_offset_map_ro_nolock(&mm, pmd, A).unwrap();
    drop(g);
    assert!(!again.ptl().raw().is_locked());
    pte_unmap(again);
    let nl = pte_offset_map_ro_nolock(&mm, pmd, A).unwrap();
    pte_unmap(nl);
    assert_eq!(rcu_depth(), 0);
}

#[test]
fn rw_nolock_returns_the_pmd_value_to_check() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    let (nl, pmdval) = pte_offset_map_rw_nolock(&mm, pmd, A).unwrap();
    assert_eq!(pmdval, pmd.get());
    assert!(!nl.ptl().raw().is_locked());
    let mut g = nl.lock_if_pmd_same(pmd).expect("pmd unchanged");
    g.set_pte(data_pte(&m));
    drop(g);

    // The PMD changes between map and lock (the table is detached): the
    // pmd_same check refuses the write.
    let (nl, pmdval) = pte_offset_map_rw_nolock(&mm, pmd, A).unwrap();
    let table = {
        let pl = pmd_lock(&mm, pmd);
        let old = pmd.get();
        // SAFETY: under the PMD lock `old` was read with.
        let ptl = unsafe { pte_lockptr(&mm, old) };
        // Linux: `if (ptl != pml) spin_lock_nested(ptl)`; with split locks off
        // both are page_table_lock, already held.
        let _pte_lock = (!ptl.is_held_by(&pl)).then(|| ptl.lock());
        set_pmd(&mm, pmd, Pmd::NONE, &pl);
        old
    };
    assert!(!pmd_same(pmdval, pmd.get()));
    assert!(nl.lock_if_pmd_same(pmd).is_none(), "changed pmd must fail the check");
    assert_eq!((rcu_depth(), held_locks()), (0, 0));

    // Put the table back; now the PTE changes instead.
    set_pmd(&mm, pmd, table, &pmd_lock(&mm, pmd));
    let (nl, _) = pte_offset_map_rw_nolock(&mm, pmd, A).unwrap();
    let seen = nl.ptep_get();
    pte_offset_map_lock(&mm, pmd, A).unwrap().set_pte(Pte::NONE);
    assert!(nl.lock_if_pte_same(seen).is_none(), "changed pte must fail the check");
    // A none expectation proves nothing (every entry of a detached table
    // reads none): refused.
    let (nl, _) = pte_offset_map_rw_nolock(&mm, pmd, A).unwrap();
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| nl.lock_if_pte_same(Pte::NONE).is_some()));
    assert!(refused.is_err(), "lock_if_pte_same(NONE) must be refused");
    assert_eq!((rcu_depth(), held_locks()), (0, 0));
}

#[test]
fn pte_alloc_map_lock_allocates_once() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = walk_alloc_pmd(&mm, A).unwrap();
    let before = m.phys.nr_free_pages();
    let g = pte_alloc_map_lock(&mm, pmd, A).unwrap();
    assert_eq!(m.phys.nr_free_pages(), before - 1);
    assert_eq!(mm.nr_ptes(), 1);
    let pt = page_ptdesc(&m.phys, pmd.get().pfn()).unwrap();
    assert_eq!(pt.level(), Some(PtLevel::Pte));
    assert_eq!(pt.page().kind(), crate::PageKind::PageTable);
    assert_eq!(pt.has_ptl(), crate::config::USE_SPLIT_PTE_PTLOCKS);
    drop(g);
    let g = pte_alloc_map_lock(&mm, pmd, A_NEXT).unwrap();
    assert_eq!(m.phys.nr_free_pages(), before - 1, "second call reuses the table");
    assert_eq!(g.pmdval(), pmd.get());
    drop(g);
    // A huge pmd: pte_alloc succeeds (something is there) but there is no table.
    let pmd2 = walk_alloc_pmd(&mm, B_OTHER_PTE).unwrap();
    set_pmd(&mm, pmd2, Pmd::huge(crate::PhysAddr::new(0x20_0000), PteFlags::USER), &pmd_lock(&mm, pmd2));
    assert!(pte_alloc(&mm, pmd2).is_ok());
    assert!(pte_alloc_map_lock(&mm, pmd2, B_OTHER_PTE).is_none());
}

#[test]
fn ctor_failure_reaches_the_caller_and_leaks_nothing() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let start = m.phys.nr_free_pages();

    // PMD ctor fails: pmd_alloc says None, the PUD table stays, nothing else.
    m.phys.fault_inject().fail_nth_ctor(1);
    assert!(walk_alloc_pmd(&mm, A).is_none());
    assert_eq!(m.phys.fault_inject().injected(), 1);
    assert_eq!(m.settled_free_pages(), start - 1, "only the PUD table is kept");
    assert_eq!((mm.nr_puds(), mm.nr_pmds()), (1, 0));
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);

    // PTE ctor fails: pte_alloc reports the error, pte_alloc_map_lock None.
    let pmd = walk_alloc_pmd(&mm, A).unwrap();
    let mid = m.phys.nr_free_pages();
    m.phys.fault_inject().fail_nth_ctor(1);
    assert_eq!(pte_alloc(&mm, pmd), Err(AllocError));
    m.phys.fault_inject().fail_nth_ctor(1);
    assert!(pte_alloc_map_lock(&mm, pmd, A).is_none());
    assert_eq!(m.phys.nr_free_pages(), mid, "the failed table was freed");
    assert!(pmd.get().is_none());
    assert_eq!(mm.nr_ptes(), 0);
    assert_eq!((rcu_depth(), held_locks()), (0, 0));

    // The injector fires once: the next attempt succeeds.
    assert!(pte_alloc_map_lock(&mm, pmd, A).is_some());
    drop(mm);
    assert_eq!(m.settled_free_pages(), start + 1, "the PGD is back too");
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
}

#[test]
fn out_of_frames_reaches_the_caller() {
    let m = TestMachine::with_regions(&[(0x10_0000, 0x14_0000)]);
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let start = m.phys.nr_free_pages();
    let mut hog = Vec::new();
    while let Some(f) = m.phys.alloc_pages(0) {
        hog.push(f);
    }
    assert!(walk_alloc_pmd(&mm, A).is_none());
    // Leave exactly two frames: PUD + PMD tables fit, the PTE table does not.
    drop(hog.pop());
    drop(hog.pop());
    let pmd = walk_alloc_pmd(&mm, A).unwrap();
    assert_eq!(pte_alloc(&mm, pmd), Err(AllocError));
    assert!(pte_alloc_map_lock(&mm, pmd, A).is_none());
    drop(hog);
    drop(mm);
    assert_eq!(m.settled_free_pages(), start + 1);
}

#[test]
fn lock_identity_follows_the_configuration() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let ptl = mm.page_table_lock();
    let pa = pmd_with_table(&mm, A);
    let pb = pmd_with_table(&mm, B_OTHER_PTE);
    let pc = pmd_with_table(&mm, C_OTHER_PMD);

    // PTE locks: through the guards each helper hands out.
    let la = pte_offset_map_lock(&mm, pa, A).unwrap().ptl().lock() as *const PtLock;
    let la2 = pte_offset_map_lock(&mm, pa, A_NEXT).unwrap().ptl().lock() as *const PtLock;
    let lb = pte_offset_map_lock(&mm, pb, B_OTHER_PTE).unwrap().ptl().lock() as *const PtLock;
    let (ro_map, (rw_map, _)) =
        (pte_offset_map_ro_nolock(&mm, pa, A).unwrap(), pte_offset_map_rw_nolock(&mm, pa, A).unwrap());
    let (ro, rw) = (ro_map.ptl(), rw_map.ptl());
    assert_eq!(la, la2, "one PTE table, one lock");
    assert!(core::ptr::eq(ro.raw(), la) && core::ptr::eq(rw.raw(), la));
    // PMD locks.
    assert_eq!(pmd_lockptr(&mm, pa), pmd_lockptr(&mm, pb), "one PMD table, one lock");
    if crate::config::USE_SPLIT_PTE_PTLOCKS {
        assert_ne!(la, lb, "different PTE tables, different locks");
        assert!(!core::ptr::eq(la, ptl.raw()));
    } else {
        assert!(core::ptr::eq(la, ptl.raw()) && core::ptr::eq(lb, ptl.raw()));
    }
    if crate::config::USE_SPLIT_PMD_PTLOCKS {
        assert_ne!(pmd_lockptr(&mm, pa), pmd_lockptr(&mm, pc), "different PMD tables, different locks");
        assert_ne!(pmd_lockptr(&mm, pa), ptl);
        let pt = page_ptdesc(&m.phys, pa.table_pa().pfn()).unwrap();
        assert!(core::ptr::eq(pmd_lockptr(&mm, pa).raw(), pt.ptlock_ptr()), "rounded down to the table");
    } else {
        assert_eq!(pmd_lockptr(&mm, pa), ptl);
        assert_eq!(pmd_lockptr(&mm, pc), ptl);
    }
    // Upper levels always use page_table_lock.
    let pud = pud_offset(&mm, p4d_offset(&mm, pgd_offset(&mm, A), A), A).unwrap();
    assert_eq!(pud_lockptr(&mm, pud), ptl);
    assert_eq!(pmd_lockptr(&mm, pa).level(), LockLevel::Pmd);
    // SAFETY: the table stays attached: nothing else runs in this test.
    assert_eq!(unsafe { pte_lockptr(&mm, pa.get()) }.level(), LockLevel::Pte);
}

#[test]
fn huge_pte_lockptr_uses_pmd_lock_for_2m_and_page_table_lock_for_1g() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = walk_alloc_pmd(&mm, A).unwrap();
    let huge2m = Pmd::huge(crate::PhysAddr::new(0x20_0000), PteFlags::WRITABLE | PteFlags::USER);
    let g = huge_pte_lock(&mm, PMD_SIZE, HugePte::Pmd(pmd));
    assert!(pmd_lockptr(&mm, pmd).is_held_by(&g));
    set_pmd(&mm, pmd, huge2m, &g);
    drop(g);
    assert_eq!(huge_pte_lockptr(&mm, PMD_SIZE, HugePte::Pmd(pmd)), pmd_lockptr(&mm, pmd));

    let gaddr = C_OTHER_PMD;
    let pud = pud_alloc(&mm, pgd_offset(&mm, gaddr), gaddr).unwrap();
    let g = huge_pte_lock(&mm, PUD_SIZE, HugePte::Pud(pud));
    assert!(mm.page_table_lock().is_held_by(&g));
    set_pud(&mm, pud, Pud::huge(crate::PhysAddr::new(0x4000_0000), PteFlags::USER), &g);
    drop(g);
    assert_eq!(huge_pte_lockptr(&mm, PUD_SIZE, HugePte::Pud(pud)), mm.page_table_lock());
    assert!(pmd_offset(&mm, pud, gaddr).is_none(), "a 1 GiB page has no PMD table");
    assert!(pmd_alloc(&mm, pud, gaddr).is_none());
    // Teardown does not follow huge leaves.
    let before = m.phys.nr_free_pages();
    drop(mm);
    // PGD, PUD and A's PMD table; C's PUD entry maps 1 GiB, nothing below it.
    assert_eq!(m.phys.nr_free_pages(), before + 3);
}

#[cfg(debug_assertions)]
#[test]
fn pte_lock_under_pmd_lock_is_in_order_or_recursion_when_they_are_one_lock() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _pl = pmd_lock(&mm, pmd);
        let _pte = pte_offset_map_lock(&mm, pmd, A).unwrap();
        assert_eq!(held_locks(), 2);
    }));
    if crate::config::USE_SPLIT_PMD_PTLOCKS {
        assert!(r.is_ok(), "PMD lock -> PTE lock is the documented order");
    } else {
        let msg = r.expect_err("both are page_table_lock: must be caught, not deadlock");
        assert!(msg.downcast_ref::<std::string::String>().unwrap().contains("recursive locking"));
    }
    assert_eq!(held_locks(), 0);
}

#[cfg(debug_assertions)]
#[test]
// An order violation with split locks, a recursion on page_table_lock without.
#[should_panic(expected = "lockdep:")]
fn pmd_lock_under_a_pte_lock_is_caught() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pa = pmd_with_table(&mm, A);
    let pc = pmd_with_table(&mm, C_OTHER_PMD);
    let _pte = pte_offset_map_lock(&mm, pa, A).unwrap();
    let _pmd = pmd_lock(&mm, pc);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "under their table's pmd_lock")]
fn writing_a_pmd_under_the_wrong_lock_is_caught() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let other = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = walk_alloc_pmd(&mm, A).unwrap();
    let wrong = other.lock_page_table();
    set_pmd(&mm, pmd, Pmd::NONE, &wrong);
}

#[test]
fn offsets_refuse_missing_or_huge_upper_levels() {
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pgd = pgd_offset(&mm, A);
    assert_eq!(p4d_offset(&mm, pgd, A), pgd, "P4D is folded");
    assert_eq!(p4d_alloc(&mm, pgd, A), Some(pgd));
    assert!(pud_offset(&mm, pgd, A).is_none(), "p4d none");
    let pud = pud_alloc(&mm, pgd, A).unwrap();
    assert_eq!(pud_alloc(&mm, pgd, A).unwrap(), pud, "second pud_alloc reuses");
    assert!(pmd_offset(&mm, pud, A).is_none(), "pud none");
    let pmd = pmd_alloc(&mm, pud, A).unwrap();
    assert_eq!(pmd_alloc(&mm, pud, A).unwrap(), pmd);
    assert_eq!(crate::pgtable::walk::walk_pmd(&mm, A).unwrap(), pmd);
    assert_eq!((mm.nr_puds(), mm.nr_pmds()), (1, 1));
    assert_eq!(pmd.pa(), pud.get().phys().add(8 * A.pmd_index() as u64));
    assert_eq!(page_ptdesc(&m.phys, pmd.table_pa().pfn()).unwrap().level(), Some(PtLevel::Pmd));
    assert_eq!(page_ptdesc(&m.phys, pud.table_pa().pfn()).unwrap().level(), Some(PtLevel::Pud));
}

#[test]
fn kernel_tables_get_no_split_lock() {
    let m = TestMachine::new();
    let kmm = Mm::new_init_mm(&m.phys, m.kernel);
    assert!(kmm.is_init_mm());
    let kaddr = VirtAddr::new(0xffff_c000_0000_0000);
    let before = m.phys.nr_free_pages();
    let pmd = walk_alloc_pmd(&kmm, kaddr).unwrap();
    let g = pte_alloc_map_lock(&kmm, pmd, kaddr).unwrap();
    assert!(kmm.page_table_lock().is_held_by(g.ptl()), "init_mm: page_table_lock");
    drop(g);
    assert_eq!(pmd_lockptr(&kmm, pmd), kmm.page_table_lock());
    // SAFETY: the table stays attached: nothing else runs in this test.
    assert_eq!(unsafe { pte_lockptr(&kmm, pmd.get()) }, kmm.page_table_lock());
    let pte_table = page_ptdesc(&m.phys, pmd.get().pfn()).unwrap();
    let pmd_table = page_ptdesc(&m.phys, pmd.table_pa().pfn()).unwrap();
    assert!(!pte_table.has_ptl() && !pmd_table.has_ptl());
    assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
    assert!(!pgd_offset(&kmm, kaddr).get().flags().contains(PteFlags::USER), "kernel tables are not user");
    // A kernel PMD pointing at a table we do not manage (the bootloader's) is
    // reported, not mapped, and not destroyed.
    capture_logs();
    take_logs();
    let foreign = Pmd::table(crate::PhysAddr::new(0x7f0_0000), false);
    set_pmd(&kmm, pmd, foreign, &pmd_lock(&kmm, pmd));
    assert!(pte_offset_map(&kmm, pmd, kaddr).is_none());
    assert_eq!(pmd.get(), foreign, "kernel entry left alone");
    assert!(take_logs().iter().any(|l| l.contains("outside managed memory")));
    // init_mm never frees the kernel's tables.
    drop(kmm);
    assert_eq!(m.phys.nr_free_pages(), before - 3);
}

#[test]
fn lock_statistics_count_acquisitions_per_class() {
    use crate::lock::{LockClass, lock_stats};
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    let pte_class = if crate::config::USE_SPLIT_PTE_PTLOCKS { LockClass::PteLock } else { LockClass::PageTableLock };
    let before = lock_stats(pte_class).acquisitions;
    for _ in 0..10 {
        drop(pte_offset_map_lock(&mm, pmd, A).unwrap());
    }
    assert!(lock_stats(pte_class).acquisitions >= before + 10);
    assert!(lock_stats(LockClass::FrameAllocator).acquisitions > 0);
}

#[test]
fn every_pte_lock_in_a_table_serialises_writers() {
    // Many threads increment a counter kept in one PTE's software-available
    // bits under pte_offset_map_lock: any lost update means the lock did not
    // exclude.
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd = pmd_with_table(&mm, A);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2000 {
                    let mut g = pte_offset_map_lock(&mm, pmd, A).unwrap();
                    let v = g.ptep_get().raw();
                    std::hint::black_box(());
                    g.set_pte(Pte::from_raw(v + PAGE_SIZE));
                }
            });
        }
    });
    let map = pte_offset_map(&mm, pmd, A).unwrap();
    assert_eq!(map.ptep_get().raw(), 8000 * PAGE_SIZE);
}

/// `pte_offset_map_lock` re-reads the pmd after taking the lock and retries
/// when it changed: a reader that reached table T1 through pmd(A) and waits
/// for T1's lock while a writer swaps pmd(A) to T2 must come back holding
/// T2's lock, with pmd(A) pointing at T2. (The loom model of the same race
/// is in loom_tests.rs; this is its host-thread twin.)
#[test]
fn pte_offset_map_lock_retries_when_the_pmd_changes_under_it() {
    use core::sync::atomic::{AtomicBool, Ordering};
    let m = TestMachine::new();
    let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
    let pmd_a = pmd_with_table(&mm, A);
    let pmd_b = pmd_with_table(&mm, B_OTHER_PTE);
    let (t1, t2) = (pmd_a.get(), pmd_b.get());
    let reader_started = AtomicBool::new(false);
    std::thread::scope(|s| {
        let pl = pmd_lock(&mm, pmd_a);
        // SAFETY: under the PMD lock of both entries (one PMD table), and
        // both tables are freed only after the scope.
        let (l1, l2) = unsafe { (pte_lockptr(&mm, t1), pte_lockptr(&mm, t2)) };
        // Tables' frame order, as in the loom twin (lock addresses of
        // allocated locks are not a reproducible order).
        let (first, second) = if t1.pfn() < t2.pfn() { (l1, l2) } else { (l2, l1) };
        let g1 = (!first.is_held_by(&pl)).then(|| first.lock());
        let g2 = (!second.is_held_by(&pl) && first != second).then(|| second.lock_nested());
        let reader = s.spawn(|| {
            reader_started.store(true, Ordering::SeqCst);
            let g = pte_offset_map_lock(&mm, pmd_a, A).expect("pmd(A) always has a table");
            let seen = g.pmdval();
            // SAFETY: `g` holds that table's lock inside its read-side section.
            assert!(unsafe { pte_lockptr(&mm, seen) }.is_held_by(g.ptl()));
            assert_eq!(pmd_a.get(), seen, "locked a table the pmd no longer points to");
            pte_unmap_unlock(g);
            seen
        });
        while !reader_started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Let the reader read pmd(A) = T1 and queue on T1's lock.
        std::thread::sleep(std::time::Duration::from_millis(20));
        set_pmd(&mm, pmd_a, t2, &pl);
        set_pmd(&mm, pmd_b, t1, &pl);
        drop((g2, g1, pl));
        assert_eq!(reader.join().unwrap(), t2, "the reader must end up on the table pmd(A) points to now");
    });
    assert_eq!((pmd_a.get(), pmd_b.get()), (t2, t1));
}
