//! Collapsing 512 small pages into a transparent huge page
//! (`madvise(MADV_COLLAPSE)`; Linux `collapse_huge_page` in
//! `mm/khugepaged.c`, for anonymous memory).
//!
//! # Protocol
//!
//! For each 2 MiB-aligned block of the range that a PTE table maps (found
//! under `mmap_lock` shared first, so holes and empty blocks cost nothing):
//!
//! 1. A zeroed 2 MiB frame is allocated before any exclusive lock.
//! 2. `mmap_lock` exclusive, and the block's VMA write-locked: no fault runs
//!    in it, `madvise` and munmap wait.
//! 3. `pmdp_collapse_flush`: under the PMD lock the PMD is cleared, and the
//!    2 MiB are shot down (paging-structure caches too) before the lock is
//!    dropped. The shoot-down is an IPI every CPU of the address space
//!    answers with interrupts on, so every lockless walk
//!    ([`crate::gup`], interrupts off) that could have seen the old table has
//!    finished: it either pinned a page (which makes the block refuse below)
//!    or will find the PMD none and fall back to the slow path, which waits
//!    for `mmap_lock`.
//! 4. The detached table is ours now. Under its PTE lock each entry is looked
//!    at: none or the zero page is a hole (zero-filled), an anonymous page
//!    must be this mapping's alone (one reference: not shared by fork, not
//!    pinned), else the PMD is put back as it was and the block is refused.
//! 5. The pages are copied into the huge page, the old entries cleared and
//!    the old pages freed (no TLB maps them since step 3).
//! 6. Under the PMD lock the emptied table is deposited with the huge PMD
//!    (so a later split needs no allocation) and the huge entry is set.
//!
//! Blocks with holes are collapsed (holes read as zero, as Linux's
//! `MADV_COLLAPSE` does); a block with no page at all, a THP already, or a
//! block not wholly inside a suitable VMA is left alone; a block with shared
//! or pinned pages is refused and the call reports `EAGAIN` (`Busy`) after
//! doing the rest.

use crate::addr::{PMD_SIZE, PTRS_PER_TABLE, PUD_SIZE, VirtAddr};
use crate::counters::Counter;
use crate::huge_memory::{HPAGE_PMD_ORDER, pgtable_trans_huge_deposit, set_pmd_huge};
use crate::memmap::PageKind;
use crate::memory::vm_huge_flags;
use crate::mm_struct::Mm;
use crate::mmap::MmapError;
use crate::pgtable::entry::{Pmd, Pte};
use crate::pgtable::walk::{set_pmd, walk_pmd};
use crate::ptdesc::{PtPage, page_ptdesc};
use crate::tlb::{FlushRange, flush_tlb_range};
use crate::vma::Vma;
use crate::{pmd_lock, pte_lockptr};

/// What one block's collapse did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Collapse {
    /// Now a THP.
    Done,
    /// Nothing to do (already huge, nothing mapped, not eligible).
    Skipped,
    /// A page is shared or pinned: left as it was.
    Refused,
}

impl Mm<'_> {
    /// `madvise(MADV_COLLAPSE)` on the page-aligned `[start, end)`: collapses
    /// every 2 MiB-aligned block inside it that lies wholly inside an
    /// anonymous, non-hugetlb VMA (module comment). `Busy` if some block was
    /// refused, `NoMemory` if no 2 MiB frame could be had, `NoMemory` also
    /// for a range with unmapped parts (as every `madvise`).
    pub(crate) fn madvise_collapse(&self, start: u64, end: u64) -> Result<(), MmapError> {
        let mut refused = false;
        let mut hole = false;
        let mut a = start & !(PMD_SIZE - 1);
        if a < start {
            a += PMD_SIZE;
        }
        {
            let vmas = self.mmap_lock.read();
            hole |= !vmas.covers(start, end);
        }
        while let Some(block) = self.next_collapse_candidate(a, end) {
            match self.collapse_block(block)? {
                Collapse::Refused => refused = true,
                Collapse::Done | Collapse::Skipped => {}
            }
            a = block + PMD_SIZE;
        }
        if hole {
            Err(MmapError::NoMemory)
        } else if refused {
            Err(MmapError::Busy)
        } else {
            Ok(())
        }
    }

    /// The first 2 MiB block at or after the aligned `from` that ends by
    /// `end`, lies in an eligible VMA and is mapped by a PTE table: the only
    /// blocks worth a 2 MiB frame. Looked up under `mmap_lock` shared, so
    /// holes between VMAs and unpopulated gigabytes cost no allocation and no
    /// exclusive lock; [`Self::collapse_block`] checks it all again.
    fn next_collapse_candidate(&self, from: u64, end: u64) -> Option<u64> {
        if from >= end {
            return None;
        }
        let vmas = self.mmap_lock.read();
        for vma in vmas.overlapping(from, end) {
            let first = from.max(vma.start.as_u64().next_multiple_of(PMD_SIZE));
            let mut block = first;
            while block.checked_add(PMD_SIZE).is_some_and(|e| e <= end.min(vma.end.as_u64())) {
                if !eligible(vma, block) {
                    break;
                }
                // The PMD table cannot be freed under `mmap_lock` (only
                // munmap frees it, exclusive); its entry is read once, as a
                // hint.
                match walk_pmd(self, VirtAddr::new(block)) {
                    Some(pmd) if pmd.get().is_table() => return Some(block),
                    Some(_) => block += PMD_SIZE,
                    // No PMD table: nothing mapped up to the next PUD.
                    None => block = (block + 1).next_multiple_of(PUD_SIZE),
                }
            }
        }
        None
    }

    /// Linux `collapse_huge_page` for the block at `haddr` (module comment).
    fn collapse_block(&self, haddr: u64) -> Result<Collapse, MmapError> {
        let phys = self.phys();
        // 1. The huge page, before any lock.
        let Some(folio) = phys.alloc_pages_zeroed(HPAGE_PMD_ORDER) else { return Err(MmapError::NoMemory) };
        // 2. Faults in the block's VMA wait for us.
        let vmas = self.mmap_write_lock();
        let Some(&vma) = vmas.find(VirtAddr::new(haddr)) else { return Ok(Collapse::Skipped) };
        if !eligible(&vma, haddr) {
            return Ok(Collapse::Skipped);
        }
        vmas.write_lock_range(haddr, haddr + PMD_SIZE);
        let Some(pmd) = walk_pmd(self, VirtAddr::new(haddr)) else { return Ok(Collapse::Skipped) };
        // 3. pmdp_collapse_flush.
        let pl = pmd_lock(self, pmd);
        let old = pmd.get();
        if !old.is_table() {
            return Ok(Collapse::Skipped);
        }
        set_pmd(self, pmd, Pmd::NONE, &pl);
        drop(pl);
        let range =
            FlushRange { freed_tables: true, ..FlushRange::new(VirtAddr::new(haddr), VirtAddr::new(haddr + PMD_SIZE)) };
        flush_tlb_range(self, range);
        // 4. The detached table is ours; look at its entries under its lock.
        // SAFETY: `old` points to the PTE table we just detached under the
        // PMD lock; nothing can free it (it is ours until we put it back or
        // deposit it), so its lock lives while we use the reference.
        let ptl = unsafe { pte_lockptr(self, old) };
        let table = old.phys();
        let entry = |i: usize| phys.slot(table.add(8 * i as u64)).expect("own table is managed");
        let zero = phys.zero_pfn();
        let guard = ptl.lock();
        let mut pages = 0;
        for i in 0..PTRS_PER_TABLE {
            let pte = Pte::from_raw(entry(i).load(core::sync::atomic::Ordering::Acquire));
            if pte.is_none() || (pte.is_present() && pte.pfn() == zero) {
                continue;
            }
            let alone = pte.is_present()
                && phys.page(pte.pfn()).is_some_and(|p| p.kind() == PageKind::Anon && p.refcount() == 1);
            if !alone {
                // Shared by fork, pinned, or PROT_NONE: put it back.
                drop(guard);
                let pl = pmd_lock(self, pmd);
                set_pmd(self, pmd, old, &pl);
                drop(pl);
                self.counters.inc(Counter::ThpCollapseRefused);
                return Ok(Collapse::Refused);
            }
            pages += 1;
        }
        if pages == 0 {
            drop(guard);
            let pl = pmd_lock(self, pmd);
            set_pmd(self, pmd, old, &pl);
            return Ok(Collapse::Skipped);
        }
        // 5. Copy, clear, free (no TLB maps the old pages since step 3).
        for i in 0..PTRS_PER_TABLE {
            let pte = Pte::from_raw(entry(i).swap(0, core::sync::atomic::Ordering::AcqRel));
            if pte.is_none() || pte.pfn() == zero {
                continue;
            }
            // SAFETY: the huge page is fresh and ours; the old page is this
            // mapping's alone (checked above), unmapped and shot down, so
            // nothing writes it while we copy.
            unsafe { phys.copy_frames(folio.pfn().add(i as u64), pte.pfn(), 0) };
            phys.put_folio(pte.pfn(), 0);
        }
        drop(guard);
        for i in 0..1u64 << HPAGE_PMD_ORDER {
            phys.page(folio.pfn().add(i)).expect("allocated").set_kind(PageKind::Anon);
        }
        // 6. Deposit the emptied table, set the huge entry.
        let pt = page_ptdesc(phys, old.pfn()).expect("own table is managed");
        // SAFETY: the table is detached (step 3), empty, and ours alone: no
        // entry points to it and every walker that found it is gone (the
        // shoot-down waited for the lockless ones; the others need locks we
        // held).
        let pgtable = unsafe { PtPage::from_published(phys, pt) };
        let pl = pmd_lock(self, pmd);
        pgtable_trans_huge_deposit(self, pmd, pgtable, &pl);
        set_pmd_huge(self, pmd, folio, vm_huge_flags(vma.flags), &pl);
        drop(pl);
        drop(vmas);
        self.counters.add(Counter::Rss, (1 << HPAGE_PMD_ORDER) - pages as i64);
        self.counters.inc(Counter::ThpCollapses);
        Ok(Collapse::Done)
    }
}

/// Linux `thp_vma_allowable_order` for `MADV_COLLAPSE`: anonymous, not
/// hugetlb, accessible, and the whole block inside the VMA (the `HUGEPAGE`
/// hint is not needed: the call is the request).
fn eligible(vma: &Vma, haddr: u64) -> bool {
    !vma.flags.is_hugetlb()
        && vma.flags.is_accessible()
        && haddr >= vma.start.as_u64()
        && haddr + PMD_SIZE <= vma.end.as_u64()
}
