//! Changing the protection of a range (Linux `mm/mprotect.c`):
//! `Mm::mprotect` and `change_protection`.
//!
//! # Locks
//!
//! `mprotect` takes `mmap_lock` exclusive through [`Mm::mmap_write_lock`]:
//! every VMA it splits, re-flags or merges is replaced by new nodes, which
//! write-locks the old ones first (faults inside them finish, later ones
//! fall back to `mmap_lock` and wait), so no fault sees the old protection
//! on a VMA whose entries already have the new one. Each entry is rewritten
//! under its own lock (PTE lock, PMD lock, `page_table_lock` for 1 GiB
//! pages); the whole range is shot down before `mmap_lock` is dropped.

use alloc::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, VirtAddr};
use crate::huge_memory::change_huge_pmd;
use crate::memory::{mk_pte, vm_huge_flags};
use crate::mm_struct::Mm;
use crate::mmap::{MmapError, check_hugetlb_cuts, user_range};
use crate::pagewalk::{RangeOps, walk_page_range};
use crate::pgtable::entry::Pud;
use crate::pgtable::walk::{PmdRef, PudRef, set_pud};
use crate::tlb::MmuGather;
use crate::vma::{Prot, Vma};
use crate::{HugePte, huge_pte_lock, pte_offset_map_lock};

/// Rewrites entries with the protection of the VMA passed to each call
/// (already the new flags).
struct ChangeProt;

impl RangeOps for ChangeProt {
    /// Linux `change_huge_pud` (hugetlb): the 1 GiB entry under
    /// `page_table_lock`.
    fn huge_pud(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pud: PudRef<'_>, haddr: VirtAddr) {
        let mm = tlb.mm();
        let ptl = huge_pte_lock(mm, PUD_SIZE, HugePte::Pud(pud));
        let old = pud.get();
        if old.is_leaf() {
            set_pud(mm, pud, Pud::new(old.phys(), vm_huge_flags(vma.flags)), &ptl);
            tlb.flush_range(haddr, haddr.add(PUD_SIZE));
        }
    }
    fn huge_pmd(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, haddr: VirtAddr) {
        change_huge_pmd(tlb, vma, pmd, haddr);
    }
    /// Linux `change_pte_range`.
    fn pte_range(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, start: u64, end: u64) {
        let mm = tlb.mm();
        let Some(mut pte) = pte_offset_map_lock(mm, pmd, VirtAddr::new(start)) else { return };
        let mut a = start;
        while a < end {
            let va = VirtAddr::new(a);
            let old = pte.get_at(va);
            if old.maps_frame() {
                let new = mk_pte(mm, old.pfn(), vma.flags);
                if new != old {
                    pte.set_pte_at(va, new);
                    tlb.flush_range(va, va.add(PAGE_SIZE));
                }
            }
            a += PAGE_SIZE;
        }
    }
}

/// Linux `change_protection`: rewrites every entry of `[start, end)` with
/// the protection of `vma.flags` (already the new flags), under each
/// entry's lock, and widens the gather's flush range for each change. Huge
/// PMDs only partly inside are split first. `mmap_lock` exclusive.
pub(crate) fn change_protection(tlb: &mut MmuGather<'_, '_>, vma: &Vma, start: u64, end: u64) {
    debug_assert!(start.is_multiple_of(PAGE_SIZE) && (end - start).is_multiple_of(PAGE_SIZE));
    debug_assert!(!vma.flags.is_hugetlb() || start.is_multiple_of(PMD_SIZE));
    walk_page_range(tlb, vma, start, end, &mut ChangeProt);
}

impl Mm<'_> {
    /// Linux `mprotect`: sets the protection of `[addr, addr + len)`, which
    /// must be fully mapped (`NoMemory` otherwise). Entries are rewritten
    /// under their locks and shot down before the lock is dropped; the zero
    /// page never becomes writable (a later write copies it).
    pub fn mprotect(&self, addr: VirtAddr, len: u64, prot: Prot) -> Result<(), MmapError> {
        let (start, end) = user_range(addr, len)?;
        let mut tlb = MmuGather::new(self);
        let mut vmas = self.mmap_write_lock();
        if !vmas.covers(start, end) {
            return Err(MmapError::NoMemory);
        }
        check_hugetlb_cuts(&vmas, start, end)?;
        vmas.split_at_bounds(start, end);
        let pieces: Vec<Vma> = vmas.overlapping(start, end).copied().collect();
        for v in pieces {
            let flags = v.flags.with_prot(prot);
            if flags != v.flags {
                vmas.set_flags(v.start.as_u64(), flags);
                let nv = Vma { flags, ..v };
                change_protection(&mut tlb, &nv, v.start.as_u64(), v.end.as_u64());
            }
        }
        vmas.merge_around(start, end);
        tlb.flush_mmu();
        drop(vmas);
        tlb.finish();
        Ok(())
    }
}
