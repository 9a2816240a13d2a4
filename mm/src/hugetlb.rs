//! hugetlb faults (Linux `mm/hugetlb.c` `hugetlb_fault` / `hugetlb_no_page`):
//! 2 MiB pages from the buddy (order 9) and 1 GiB pages from the gigantic
//! pool, each mapped by one leaf entry.
//!
//! # Locks
//!
//! | entry | lock (`huge_pte_lock`) |
//! | --- | --- |
//! | 2 MiB page: a PMD entry | the PMD table's split lock |
//! | 1 GiB page: a PUD entry | `mm.page_table_lock` (no split lock at PUD level) |
//!
//! As everywhere, the frame is allocated and zeroed before the lock; under it
//! the entry must still be none, else another CPU won and the frame goes
//! back. `mmap_lock` is held shared by the fault.

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Pfn, VirtAddr};
use crate::counters::Counter;
use crate::gigantic::GIGANTIC_ORDER;
use crate::huge_memory::HPAGE_PMD_ORDER;
use crate::memmap::PageKind;
use crate::memory::{FaultError, FaultResult, vm_huge_flags};
use crate::mm_struct::Mm;
use crate::pgtable::entry::{Pmd, Pud};
use crate::pgtable::walk::{set_pmd, set_pud};
use crate::vma::Vma;
use crate::{HugePte, huge_pte_lock};

/// A hugetlb frame not yet mapped; dropping it gives it back.
struct HugeFrame<'a, 'p> {
    mm: &'a Mm<'p>,
    pfn: Pfn,
    size: u64,
}

impl<'a, 'p> HugeFrame<'a, 'p> {
    /// Linux `alloc_hugetlb_folio`: a zeroed huge frame of `size`.
    fn alloc(mm: &'a Mm<'p>, size: u64) -> Option<Self> {
        let phys = mm.phys();
        let pfn = if size == PUD_SIZE {
            let pfn = phys.gigantic_pool().alloc()?;
            phys.zero_frames(pfn, GIGANTIC_ORDER);
            // The mapping's reference (the buddy sets it for its blocks):
            // the gather's put at unmap returns the page to the pool.
            phys.page(pfn).expect("pool page is managed").refcount.store(1, core::sync::atomic::Ordering::Relaxed);
            pfn
        } else {
            let (pfn, _) = phys.alloc_pages_zeroed(HPAGE_PMD_ORDER)?.into_raw();
            for i in 0..PMD_SIZE / PAGE_SIZE {
                phys.page(pfn.add(i)).expect("allocated").set_kind(PageKind::Anon);
            }
            pfn
        };
        Some(Self { mm, pfn, size })
    }

    /// The entry owns the frame now.
    fn into_mapped(self) -> Pfn {
        let pfn = self.pfn;
        core::mem::forget(self);
        pfn
    }
}

impl Drop for HugeFrame<'_, '_> {
    fn drop(&mut self) {
        let phys = self.mm.phys();
        if self.size == PUD_SIZE {
            phys.gigantic_pool().free(self.pfn);
        } else {
            // SAFETY: allocated above as an order-9 block, never mapped.
            drop(unsafe { crate::Frames::from_raw(phys, self.pfn, HPAGE_PMD_ORDER) });
        }
    }
}

/// Linux `hugetlb_fault`: maps the huge page containing `addr` at `hpte`
/// (the PMD entry for 2 MiB VMAs, the PUD entry for 1 GiB ones).
pub(crate) fn hugetlb_fault(
    mm: &Mm<'_>,
    vma: &Vma,
    hpte: HugePte<'_>,
    addr: VirtAddr,
) -> Result<FaultResult, FaultError> {
    let size = vma.flags.page_size();
    let read = |h: HugePte<'_>| match h {
        HugePte::Pmd(p) => (p.get().is_none(), p.get().is_leaf()),
        HugePte::Pud(p) => (p.get().is_none(), p.get().is_leaf()),
    };
    let (none, leaf) = read(hpte);
    if leaf {
        mm.counters.inc(Counter::SpuriousFaults);
        return Ok(FaultResult::Spurious);
    }
    if !none {
        // A table where a huge page belongs: the VMA invariants say this
        // cannot happen (tables are freed with the mapping that needed them).
        log::error!("mm: hugetlb fault at {addr:?} found a page table in the way");
        return Err(FaultError::MapErr);
    }
    let frame = HugeFrame::alloc(mm, size).ok_or(FaultError::Oom)?;
    let flags = vm_huge_flags(vma.flags);
    let ptl = huge_pte_lock(mm, size, hpte);
    if !read(hpte).0 {
        drop(ptl);
        drop(frame);
        mm.counters.inc(Counter::LostRaces);
        return Ok(FaultResult::LostRace);
    }
    let pfn = frame.into_mapped();
    match hpte {
        HugePte::Pmd(p) => set_pmd(mm, p, Pmd::new(pfn.phys(), flags), &ptl),
        HugePte::Pud(p) => set_pud(mm, p, Pud::new(pfn.phys(), flags), &ptl),
    }
    drop(ptl);
    mm.counters.add(Counter::HugetlbPages, (size / PAGE_SIZE) as i64);
    mm.counters.inc(Counter::HugetlbFaults);
    Ok(FaultResult::HugeTlb)
}
