//! Freeing page tables no VMA needs any more (Linux `free_pgtables`,
//! `free_pgd_range` and the `free_p?d_range` helpers of `mm/memory.c`).
//!
//! After munmap has zapped a range and taken its VMAs out of the set, every
//! table whose whole span lies in the gap between the remaining VMAs is
//! detached, under its parent's lock (a PTE table also under its own, so a
//! concurrent `pte_offset_map_lock` either sees the old PMD and re-checks,
//! or fails), and handed to the gather, which frees it after the shoot-down
//! and a grace period ([`crate::table_rcu`]). A table is judged by its span
//! alone: no entry maps anything outside a VMA, so a table in a gap is empty
//! (checked, and reported if not). PTE tables *inside* a VMA are freed by
//! `madvise`'s reclaim instead ([`crate::zap`]).
//!
//! Locks: `mmap_lock` exclusive or downgraded to shared after the VMAs left
//! the set (no fault can walk into a gap: it would need a VMA there).

use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{
    PAGE_SIZE, PGDIR_SIZE, PMD_SIZE, PTRS_PER_TABLE, PUD_SIZE, Pfn, PhysAddr, USER_PGTABLES_CEILING, VirtAddr,
};
use crate::mm_struct::Mm;
use crate::pagewalk::addr_end;
use crate::pgtable::entry::{Pmd, Pud};
use crate::pgtable::walk::{
    P4dRef, PmdRef, PudRef, p4d_clear, p4d_offset, pgd_offset, pmd_offset, pud_offset, set_pmd, set_pud,
};
use crate::ptdesc::{PtLevel, page_ptdesc};
use crate::tlb::MmuGather;
use crate::{pmd_lock, pte_lockptr};

/// A PTE table found in a PMD table being freed, with the PMD entry it was in.
struct ChildTable {
    index: u64,
    pfn: Pfn,
}

/// Linux `free_pgtables` / `free_pgd_range`: detaches and gathers every
/// page table whose whole span lies inside the free gap `[floor, ceiling)`
/// and meets the just-unmapped `[start, end)`. Tables are detached under
/// their parent's lock (a PTE table also under its own, so a concurrent
/// `pte_offset_map_lock` either sees the old PMD and re-checks, or fails);
/// they are freed by the gather after the shoot-down and a grace period.
pub(crate) fn free_pgtables(tlb: &mut MmuGather<'_, '_>, floor: u64, ceiling: u64, start: u64, end: u64) {
    let mm = tlb.mm();
    let end = end.min(USER_PGTABLES_CEILING);
    let inside = |s: u64, size: u64| floor <= s && s.checked_add(size).is_some_and(|e| e <= ceiling);
    let mut a = start;
    while a < end {
        let next = addr_end(a, PGDIR_SIZE, end);
        let span = a & !(PGDIR_SIZE - 1);
        let p4d = p4d_offset(mm, pgd_offset(mm, VirtAddr::new(a)), VirtAddr::new(a));
        let v = p4d.get();
        if v.is_table() {
            if inside(span, PGDIR_SIZE) {
                let ptl = mm.lock_page_table();
                p4d_clear(mm, p4d, &ptl);
                drop(ptl);
                gather_pud_table(tlb, v.phys(), span);
            } else {
                free_pud_range(tlb, p4d, a, next, &inside);
            }
        }
        a = next;
    }
}

fn free_pud_range(
    tlb: &mut MmuGather<'_, '_>,
    p4d: P4dRef<'_>,
    start: u64,
    end: u64,
    inside: &dyn Fn(u64, u64) -> bool,
) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PUD_SIZE, end);
        let span = a & !(PUD_SIZE - 1);
        let Some(pud) = pud_offset(mm, p4d, VirtAddr::new(a)) else { return };
        let v = pud.get();
        if v.is_table() {
            if inside(span, PUD_SIZE) {
                let ptl = mm.lock_page_table();
                set_pud(mm, pud, Pud::NONE, &ptl);
                drop(ptl);
                gather_pmd_table(tlb, v.phys(), span);
            } else {
                free_pmd_range(tlb, pud, a, next, inside);
            }
        }
        a = next;
    }
}

fn free_pmd_range(
    tlb: &mut MmuGather<'_, '_>,
    pud: PudRef<'_>,
    start: u64,
    end: u64,
    inside: &dyn Fn(u64, u64) -> bool,
) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PMD_SIZE, end);
        let span = a & !(PMD_SIZE - 1);
        let Some(pmd) = pmd_offset(mm, pud, VirtAddr::new(a)) else { return };
        if pmd.get().is_table() && inside(span, PMD_SIZE) {
            free_pte_table(tlb, pmd, span);
        }
        a = next;
    }
}

/// Detaches the PTE table `pmd` points to (Linux `free_pte_range` +
/// `pte_free_tlb`), under the PMD lock and the table's own lock.
fn free_pte_table(tlb: &mut MmuGather<'_, '_>, pmd: PmdRef<'_>, span: u64) {
    let mm = tlb.mm();
    let pl = pmd_lock(mm, pmd);
    let old = pmd.get();
    if !old.is_table() {
        return;
    }
    // SAFETY: we hold the lock of the PMD entry `old` came from, so the
    // table cannot be detached (and its lock freed) by anyone else while
    // `pl` is held; the reference is used only under it.
    let ptl = unsafe { pte_lockptr(mm, old) };
    // With split locks off both are page_table_lock, already held.
    let pte_lock = (!ptl.is_held_by(&pl)).then(|| ptl.lock());
    set_pmd(mm, pmd, Pmd::NONE, &pl);
    drop(pte_lock);
    drop(pl);
    check_table_empty(mm, old.phys(), "PTE");
    mm.dec_nr(PtLevel::Pte);
    tlb.remove_table(old.pfn(), VirtAddr::new(span), VirtAddr::new(span + PMD_SIZE));
}

/// Reads a detached table's entries (lockless: only walkers that found it
/// before the detach can still read it, and nobody writes it). A table
/// outside managed RAM (a corrupted entry) reads as empty.
fn table_entries<'a>(mm: &'a Mm<'_>, table: PhysAddr) -> impl Iterator<Item = (usize, u64)> + 'a {
    // One check for the whole frame, not one per entry (the serial part of
    // an munmap scans every table it frees): a table is one page-aligned
    // frame, so if its first word is managed RAM, all 512 are.
    let managed = table.is_aligned(PAGE_SIZE) && mm.phys().slot(table).is_some();
    let n = if managed { PTRS_PER_TABLE } else { 0 };
    (0..n).filter_map(move |i| {
        // SAFETY: `managed`: the word is 8-byte aligned and lies in the same
        // page-aligned frame of managed RAM as `table`, which the window
        // maps for the life of `mm.phys()`; table entries are only ever
        // accessed atomically.
        let v = unsafe { mm.phys().slot_unchecked(table.add(8 * i as u64)) }.load(Relaxed);
        (v != 0).then_some((i, v))
    })
}

fn check_table_empty(mm: &Mm<'_>, table: PhysAddr, what: &str) {
    if let Some((i, v)) = table_entries(mm, table).next() {
        log::error!("mm: freeing a {what} table {table:?} whose entry {i} is {v:#x}");
        debug_assert!(false, "freeing a non-empty {what} table");
    }
}

/// Gathers a detached PMD table and the PTE tables under it.
fn gather_pmd_table(tlb: &mut MmuGather<'_, '_>, table: PhysAddr, span: u64) {
    let mm = tlb.mm();
    let mut children: Vec<ChildTable> = Vec::new();
    for (i, raw) in table_entries(mm, table) {
        let v = Pmd::from_raw(raw);
        if v.is_table() {
            children.push(ChildTable { index: i as u64, pfn: v.pfn() });
        } else {
            log::error!("mm: freeing a PMD table {table:?} with {v} in entry {i}");
            debug_assert!(false, "freeing a PMD table that still maps something");
        }
    }
    for ChildTable { index: i, pfn } in children {
        check_table_empty(mm, pfn.phys(), "PTE");
        mm.dec_nr(PtLevel::Pte);
        let s = span + i * PMD_SIZE;
        tlb.remove_table(pfn, VirtAddr::new(s), VirtAddr::new(s + PMD_SIZE));
    }
    if crate::config::USE_SPLIT_PMD_PTLOCKS {
        let page = page_ptdesc(mm.phys(), table.pfn()).expect("PMD table is managed").page();
        debug_assert_eq!(page.link.load(Relaxed), 0, "PMD table freed with deposited PTE tables");
    }
    mm.dec_nr(PtLevel::Pmd);
    tlb.remove_table(table.pfn(), VirtAddr::new(span), VirtAddr::new(span + PUD_SIZE));
}

/// Gathers a detached PUD table and everything under it.
fn gather_pud_table(tlb: &mut MmuGather<'_, '_>, table: PhysAddr, span: u64) {
    let mm = tlb.mm();
    let entries: alloc::vec::Vec<(usize, u64)> = table_entries(mm, table).collect();
    for (i, raw) in entries {
        let v = Pud::from_raw(raw);
        if v.is_table() {
            gather_pmd_table(tlb, v.phys(), span + i as u64 * PUD_SIZE);
        } else {
            log::error!("mm: freeing a PUD table {table:?} with {v} in entry {i}");
            debug_assert!(false, "freeing a PUD table that still maps something");
        }
    }
    mm.dec_nr(PtLevel::Pud);
    tlb.remove_table(table.pfn(), VirtAddr::new(span), VirtAddr::new(span + PGDIR_SIZE));
}
