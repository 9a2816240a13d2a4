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
//! back. The fault holds its VMA's lock (or `mmap_lock` shared).
//!
//! # fork
//!
//! Private hugetlb pages are never shared between address spaces: fork
//! copies each into a fresh huge page for the child (`copy_hugetlb_page`;
//! Linux shares them and copies on the first write instead). The parent's
//! entry is write-protected and shot down first, so no thread writes the page
//! while it is copied; the parent's next write finds its page read-only and
//! owned by it alone, and makes it writable again in place
//! (`hugetlb_fault`'s write-protect path, Linux `hugetlb_wp`'s reuse).

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Pfn, VirtAddr};
use crate::counters::Counter;
use crate::gigantic::GIGANTIC_ORDER;
use crate::huge_memory::HPAGE_PMD_ORDER;
use crate::memmap::PageKind;
use crate::memory::{FaultError, FaultResult, vm_huge_flags};
use crate::mm_struct::Mm;
use crate::pgtable::entry::{Pmd, PteFlags, Pud};
use crate::pgtable::walk::{set_pmd, set_pud};
use crate::tlb::{FlushRange, flush_tlb_range};
use crate::vma::Vma;
use crate::{HugePte, huge_pte_lock};

/// A hugetlb frame not yet mapped; dropping it gives it back.
pub(crate) struct HugeFrame<'a, 'p> {
    mm: &'a Mm<'p>,
    pfn: Pfn,
    size: u64,
}

impl<'a, 'p> HugeFrame<'a, 'p> {
    /// Linux `alloc_hugetlb_folio`: a huge frame of `size`, zeroed if
    /// `zeroed` (a copy fills it instead).
    pub(crate) fn alloc(mm: &'a Mm<'p>, size: u64, zeroed: bool) -> Option<Self> {
        let phys = mm.phys();
        let pfn = if size == PUD_SIZE {
            let pfn = phys.gigantic_pool().alloc()?;
            if zeroed {
                phys.zero_frames(pfn, GIGANTIC_ORDER);
            }
            // The mapping's reference (the buddy sets it for its blocks):
            // the gather's put at unmap returns the page to the pool.
            phys.page(pfn).expect("pool page is managed").refcount.store(1, core::sync::atomic::Ordering::Relaxed);
            pfn
        } else {
            let block =
                if zeroed { phys.alloc_pages_zeroed(HPAGE_PMD_ORDER)? } else { phys.alloc_pages(HPAGE_PMD_ORDER)? };
            let (pfn, _) = block.into_raw();
            for i in 0..PMD_SIZE / PAGE_SIZE {
                phys.page(pfn.add(i)).expect("allocated").set_kind(PageKind::Anon);
            }
            pfn
        };
        Some(Self { mm, pfn, size })
    }

    /// The frame.
    pub(crate) fn pfn(&self) -> Pfn {
        self.pfn
    }

    /// The entry owns the frame now.
    pub(crate) fn into_mapped(self) -> Pfn {
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

/// The huge entry `hpte` as (raw value, leaf?, writable?).
fn read_huge(h: HugePte<'_>) -> (u64, bool, bool) {
    match h {
        HugePte::Pmd(p) => {
            let v = p.get();
            (v.raw(), v.is_leaf(), v.flags().contains(PteFlags::WRITABLE))
        }
        HugePte::Pud(p) => {
            let v = p.get();
            (v.raw(), v.is_leaf(), v.flags().contains(PteFlags::WRITABLE))
        }
    }
}

/// Writes the huge entry `hpte` (its lock held).
fn set_huge(mm: &Mm<'_>, hpte: HugePte<'_>, pfn: Pfn, flags: PteFlags, ptl: &crate::PtlGuard<'_>) {
    match hpte {
        HugePte::Pmd(p) => set_pmd(mm, p, Pmd::new(pfn.phys(), flags), ptl),
        HugePte::Pud(p) => set_pud(mm, p, Pud::new(pfn.phys(), flags), ptl),
    }
}

/// Linux `hugetlb_fault`: maps the huge page containing `addr` at `hpte`
/// (the PMD entry for 2 MiB VMAs, the PUD entry for 1 GiB ones), or makes a
/// read-only one writable for a write (module comment: after fork).
pub(crate) fn hugetlb_fault(
    mm: &Mm<'_>,
    vma: &Vma,
    hpte: HugePte<'_>,
    addr: VirtAddr,
    access: crate::Access,
) -> Result<FaultResult, FaultError> {
    let size = vma.flags.page_size();
    let (raw, leaf, writable) = read_huge(hpte);
    let none = raw == 0;
    if leaf {
        if access.write && !writable && vma.flags.contains(crate::VmFlags::WRITE) {
            // Linux `hugetlb_wp`, reuse: the page is this mapping's alone.
            let ptl = huge_pte_lock(mm, size, hpte);
            if read_huge(hpte).0 != raw {
                mm.counters.inc(Counter::LostRaces);
                return Ok(FaultResult::LostRace);
            }
            let pfn = crate::PhysAddr::new(raw & crate::pgtable::entry::ENTRY_ADDR_MASK).pfn();
            set_huge(mm, hpte, pfn, vm_huge_flags(vma.flags), &ptl);
            drop(ptl);
            mm.counters.inc(Counter::WpReuses);
            return Ok(FaultResult::Reuse);
        }
        mm.counters.inc(Counter::SpuriousFaults);
        return Ok(FaultResult::Spurious);
    }
    if !none {
        // A table where a huge page belongs: the VMA invariants say this
        // cannot happen (tables are freed with the mapping that needed them).
        log::error!("mm: hugetlb fault at {addr:?} found a page table in the way");
        return Err(FaultError::MapErr);
    }
    let frame = HugeFrame::alloc(mm, size, true).ok_or(FaultError::Oom)?;
    let ptl = huge_pte_lock(mm, size, hpte);
    if read_huge(hpte).0 != 0 {
        drop(ptl);
        drop(frame);
        mm.counters.inc(Counter::LostRaces);
        return Ok(FaultResult::LostRace);
    }
    set_huge(mm, hpte, frame.into_mapped(), vm_huge_flags(vma.flags), &ptl);
    drop(ptl);
    mm.counters.add(Counter::HugetlbPages, (size / PAGE_SIZE) as i64);
    mm.counters.inc(Counter::HugetlbFaults);
    Ok(FaultResult::HugeTlb)
}

/// Fork's copy of one private hugetlb page (module comment): write-protect
/// the parent's entry `src` and shoot it down, copy the page into a fresh one,
/// and map that at the child's entry `dst` with the VMA's protection. Both
/// address spaces hold `mmap_lock` exclusive (the child nested).
pub(crate) fn copy_hugetlb_page(
    dst: &Mm<'_>,
    src: &Mm<'_>,
    vma: &Vma,
    dst_entry: HugePte<'_>,
    src_entry: HugePte<'_>,
    haddr: VirtAddr,
) -> Result<(), FaultError> {
    let size = vma.flags.page_size();
    let ptl = huge_pte_lock(src, size, src_entry);
    let (raw, leaf, writable) = read_huge(src_entry);
    if !leaf {
        return Ok(());
    }
    let pfn = crate::PhysAddr::new(raw & crate::pgtable::entry::ENTRY_ADDR_MASK).pfn();
    if writable {
        let flags = vm_huge_flags(vma.flags).difference(PteFlags::WRITABLE);
        set_huge(src, src_entry, pfn, flags, &ptl);
    }
    drop(ptl);
    if writable {
        flush_tlb_range(src, FlushRange::new(haddr, haddr.add(size)));
    }
    let frame = HugeFrame::alloc(dst, size, false).ok_or(FaultError::Oom)?;
    let order = if size == PUD_SIZE { GIGANTIC_ORDER } else { HPAGE_PMD_ORDER };
    // SAFETY: `frame` is fresh and ours; the parent's page stays mapped
    // read-only (its entry's lock is not needed: both address spaces are
    // locked exclusive, so nothing unmaps it) and no CPU can write it since
    // the shoot-down above.
    unsafe { src.phys().copy_frames(frame.pfn(), pfn, order) };
    let ptl = huge_pte_lock(dst, size, dst_entry);
    debug_assert_eq!(read_huge(dst_entry).0, 0, "the child's entry is new");
    set_huge(dst, dst_entry, frame.into_mapped(), vm_huge_flags(vma.flags), &ptl);
    drop(ptl);
    dst.counters.add(Counter::HugetlbPages, (size / PAGE_SIZE) as i64);
    Ok(())
}
