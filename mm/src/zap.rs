//! Unmapping: clearing the entries of a range and gathering what they mapped
//! (Linux `unmap_page_range`, `zap_pte_range` & co. in `mm/memory.c`), and
//! reclaiming the PTE tables a zap leaves empty (Linux `mm/pt_reclaim.c`).
//!
//! # Locks
//!
//! | step | lock held |
//! | --- | --- |
//! | the walk | `mmap_lock` exclusive (munmap, teardown) or shared (`madvise`) |
//! | 4 KiB entries | the PTE lock (`pte_offset_map_lock`) |
//! | 2 MiB entries, splitting a partly covered THP | the PMD lock |
//! | 1 GiB entries | `page_table_lock` (`huge_pte_lock`) |
//! | reclaiming an empty PTE table | the PMD lock, then the PTE lock (nested only if it is another lock) |
//!
//! Frames go to the gather and are freed after the shoot-down; a reclaimed
//! table goes to the gather's table list and waits for a grace period.
//!
//! # Reclaiming PTE tables under a shared lock
//!
//! `madvise(MADV_DONTNEED)` runs with faults going on in the same VMA (they
//! hold its VMA lock or `mmap_lock` shared, as `madvise` does). A table it
//! empties may be freed while the VMA stays, so a fault may have read the
//! PMD just before the table was detached. `try_to_free_pte` follows
//! Linux 6.14: take the PMD lock; map the table with
//! `pte_offset_map_rw_nolock` (which hands back the PMD value it saw); take
//! the table's PTE lock if that is a different lock; re-check `pmd_same`;
//! check that all 512 entries are none; clear the PMD; queue the table for
//! the grace period. A fault that read the old PMD value then either:
//!
//! * maps the table after the clear: `pte_offset_map` sees the PMD none and
//!   fails, and the fault walks again (allocating a fresh table); or
//! * mapped it before: its `pte_offset_map_lock` takes the PTE lock, and
//!   either gets it before reclaim does (reclaim then sees the entry the
//!   fault installs, or waits for it and sees it, and keeps the table) or
//!   after the clear (its `pmd_same` re-check fails, and it walks again).
//!
//! Either way no entry is ever written into a detached table, and the read
//! side section the map helpers hold keeps the table (and its lock) alive
//! until the fault lets go.

use crate::addr::{PAGE_SIZE, PMD_SIZE, PTRS_PER_TABLE, PUD_SIZE, VirtAddr};
use crate::counters::Counter;
use crate::gigantic::GIGANTIC_ORDER;
use crate::huge_memory::zap_huge_pmd;
use crate::mm_struct::Mm;
use crate::pagewalk::{RangeOps, walk_page_range};
use crate::pgtable::entry::{Pmd, Pud, pmd_same};
use crate::pgtable::walk::{PmdRef, PudRef, set_pmd, set_pud};
use crate::ptdesc::PtLevel;
use crate::tlb::MmuGather;
use crate::vma::Vma;
use crate::{HugePte, huge_pte_lock, pmd_lock, pte_offset_map_lock, pte_offset_map_rw_nolock};

/// Linux `struct zap_details`: what a zap does beyond clearing entries.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ZapDetails {
    /// Free the PTE tables the zap leaves empty (Linux `reclaim_pt`; only
    /// `madvise(MADV_DONTNEED)` asks, and only for ranges of at least 2 MiB).
    pub(crate) reclaim_pt: bool,
}

/// What a zap did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Zapped {
    /// 4 KiB pages unmapped (a 2 MiB page counts 512; the zero page counts).
    pub(crate) pages: u64,
    /// Empty PTE tables reclaimed.
    pub(crate) tables: u64,
}

struct Zap {
    details: ZapDetails,
    done: Zapped,
}

impl RangeOps for Zap {
    fn huge_pud(&mut self, tlb: &mut MmuGather<'_, '_>, _vma: &Vma, pud: PudRef<'_>, haddr: VirtAddr) {
        self.done.pages += zap_huge_pud(tlb, pud, haddr);
    }
    fn huge_pmd(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, haddr: VirtAddr) {
        self.done.pages += zap_huge_pmd(tlb, vma, pmd, haddr);
    }
    fn pte_range(&mut self, tlb: &mut MmuGather<'_, '_>, _vma: &Vma, pmd: PmdRef<'_>, start: u64, end: u64) {
        self.done.pages += zap_pte_range(tlb, pmd, start, end);
        if self.details.reclaim_pt && try_to_free_pte(tlb, pmd, VirtAddr::new(start)) {
            self.done.tables += 1;
        }
    }
}

/// Linux `unmap_page_range`: clears every entry mapping `[start, end)` of
/// `vma` and gathers what they mapped. Huge PMDs only partly inside are
/// split first. The caller holds `mmap_lock` (exclusive for munmap, shared
/// for `madvise`) or owns the dying address space.
pub(crate) fn unmap_page_range(
    tlb: &mut MmuGather<'_, '_>,
    vma: &Vma,
    start: u64,
    end: u64,
    details: ZapDetails,
) -> Zapped {
    let mut zap = Zap { details, done: Zapped::default() };
    walk_page_range(tlb, vma, start, end, &mut zap);
    zap.done
}

/// Clears a 1 GiB hugetlb entry under `huge_pte_lock` (= `page_table_lock`);
/// returns the 4 KiB pages unmapped.
fn zap_huge_pud(tlb: &mut MmuGather<'_, '_>, pud: PudRef<'_>, haddr: VirtAddr) -> u64 {
    let mm = tlb.mm();
    let ptl = huge_pte_lock(mm, PUD_SIZE, HugePte::Pud(pud));
    let old = pud.get();
    if !old.is_leaf() {
        return 0;
    }
    set_pud(mm, pud, Pud::NONE, &ptl);
    tlb.remove_page(old.pfn(), GIGANTIC_ORDER, haddr);
    drop(ptl);
    let pages = PUD_SIZE / PAGE_SIZE;
    mm.counters.add(Counter::HugetlbPages, -(pages as i64));
    pages
}

/// Linux `zap_pte_range`: under the PTE lock, clears each entry and gathers
/// its frame (the zero page is only flushed, never freed). When the gather
/// fills up (frames shared since a fork, see [`crate::tlb`]), it drops the
/// lock, flushes the gather, and goes on from the next entry, as Linux's
/// `force_flush` does. Returns the pages unmapped.
fn zap_pte_range(tlb: &mut MmuGather<'_, '_>, pmd: PmdRef<'_>, start: u64, end: u64) -> u64 {
    let mm = tlb.mm();
    let zero = mm.phys().zero_pfn();
    let mut unmapped = 0;
    let mut a = start;
    while a < end {
        let Some(mut pte) = pte_offset_map_lock(mm, pmd, VirtAddr::new(a)) else { break };
        let mut freed = 0i64;
        let mut full = false;
        while a < end && !full {
            let va = VirtAddr::new(a);
            let old = pte.ptep_get_and_clear(va);
            if old.maps_frame() {
                unmapped += 1;
                if old.pfn() == zero {
                    tlb.flush_range(va, va.add(PAGE_SIZE));
                } else {
                    full = tlb.remove_pte_page(old.pfn(), va);
                    freed += 1;
                }
            } else if !old.is_none() {
                log::error!("mm: zap of unexpected {old} at {va:?}");
            }
            a += PAGE_SIZE;
        }
        drop(pte);
        mm.counters.add(Counter::Rss, -freed);
        if full {
            tlb.flush_mmu();
        }
    }
    unmapped
}

/// Linux `try_to_free_pte` (6.14 PT_RECLAIM): detaches the PTE table
/// mapping `addr` if all its entries are none, under the PMD lock and the
/// table's own lock, re-checking the PMD (module comment). The table goes
/// to `tlb` and is freed after the shoot-down and a grace period. Returns
/// whether it was reclaimed. Runs under `mmap_lock` or the VMA lock, shared.
pub(crate) fn try_to_free_pte(tlb: &mut MmuGather<'_, '_>, pmd: PmdRef<'_>, addr: VirtAddr) -> bool {
    let mm = tlb.mm();
    let pml = pmd_lock(mm, pmd);
    let Some((map, pmdval)) = pte_offset_map_rw_nolock(mm, pmd, addr) else { return false };
    // Without split locks both are `page_table_lock`, already held.
    let ptl = map.ptl();
    let _pte_lock = (!ptl.is_held_by(&pml)).then(|| ptl.lock());
    if !pmd_same(pmdval, pmd.get()) {
        return false;
    }
    let base = addr.as_u64() & !(PMD_SIZE - 1);
    if (0..PTRS_PER_TABLE as u64).any(|i| !map.map().get_at(VirtAddr::new(base + i * PAGE_SIZE)).is_none()) {
        return false;
    }
    set_pmd(mm, pmd, Pmd::NONE, &pml);
    drop(_pte_lock);
    drop(map);
    drop(pml);
    free_pte(mm, tlb, pmdval, base);
    mm.counters.inc(Counter::PtReclaimed);
    true
}

/// Linux `free_pte`: hands a detached PTE table to the gather.
fn free_pte(mm: &Mm<'_>, tlb: &mut MmuGather<'_, '_>, pmdval: Pmd, span: u64) {
    mm.dec_nr(PtLevel::Pte);
    tlb.remove_table(pmdval.pfn(), VirtAddr::new(span), VirtAddr::new(span + PMD_SIZE));
}
