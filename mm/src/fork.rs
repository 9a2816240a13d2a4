//! Copying an address space for `fork` (Linux `dup_mmap` in `kernel/fork.c`;
//! `copy_page_range`, `copy_pte_range`, `copy_huge_pmd` in `mm/`).
//!
//! # Two tables at once
//!
//! The child's tables are built while the parent's are read and changed:
//!
//! | step | locks |
//! | --- | --- |
//! | the whole copy | parent's `mmap_lock` exclusive, every parent VMA write-locked (no fault runs in them), then the child's `mmap_lock` exclusive, *nested* |
//! | child's upper tables | `pud_alloc`/`pmd_alloc` on the child (its `page_table_lock`) |
//! | 4 KiB entries (`copy_pte_range`) | the child's PTE table from `pte_alloc_map_lock` (its PTE lock, plain), the parent's through `pte_offset_map_rw_nolock` with its lock taken *nested* (lockdep subclass 1) and `pmd_same` re-checked |
//! | a THP (`copy_huge_pmd`) | the child's PMD lock, then the parent's nested |
//! | a hugetlb page | each entry's `huge_pte_lock`, one at a time |
//!
//! The child's locks are the outer ones of each level: the child is new, so
//! nothing else takes them, and a CPU that holds a parent lock never waits for
//! a child's.
//!
//! # What is shared and what is copied
//!
//! * 4 KiB anonymous pages are shared copy-on-write: each gains a reference
//!   (one per mapping), and a writable entry is write-protected in both
//!   address spaces (atomically in the parent: its CPUs may set accessed or
//!   dirty bits meanwhile). The parent's range is shot down once the copy is
//!   done. A later write fault copies the page unless the faulting mapping
//!   holds the only reference (`do_wp_page`: reuse, or copy).
//! * The zero page stays shared, read-only, with no reference counting.
//! * Transparent huge pages are copied at fork, never shared: the parent's
//!   entry is write-protected and shot down, the 2 MiB are copied into a
//!   fresh THP for the child (with its own deposited PTE table), and the
//!   parent's next write finds its THP read-only and its own and makes it
//!   writable in place. So nothing ever splits or copies a *shared* THP. With
//!   no 2 MiB block free, the parent's THP is split and its 4 KiB pages are
//!   shared as above.
//! * Private hugetlb pages are copied the same way ([`crate::hugetlb`]).
//!
//! A copy that runs out of memory stops; the partly built child is dropped,
//! which unmaps what it got (dropping the references it took) and frees its
//! tables; the parent's write-protected entries turn writable again on their
//! next write fault (their pages are unshared again).

use alloc::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, VirtAddr};
use crate::counters::Counter;
use crate::huge_memory::{__split_huge_pmd, HPAGE_PMD_ORDER, pgtable_trans_huge_deposit, set_pmd_huge};
use crate::hugetlb::copy_hugetlb_page;
use crate::memmap::PageKind;
use crate::memory::{FaultError, vm_huge_flags};
use crate::mm_struct::Mm;
use crate::pagewalk::addr_end;
use crate::pgtable::entry::{Pmd, Pte, PteFlags};
use crate::pgtable::walk::{
    PmdRef, PudRef, p4d_alloc, p4d_offset, pgd_offset, pmd_alloc, pmd_offset, pud_alloc, pud_offset, set_pmd,
};
use crate::ptdesc::{PtLevel, pagetable_alloc, pagetable_pte_ctor};
use crate::tlb::{FlushRange, MmuGather, flush_tlb_range};
use crate::vma::Vma;
use crate::{HugePte, pmd_lock, pmd_lockptr, pte_alloc_map_lock, pte_offset_map_rw_nolock};

impl<'p> Mm<'p> {
    /// Linux `dup_mm`: a new address space with the same VMAs, whose pages
    /// are the parent's shared copy-on-write (module comment). `Oom` if a
    /// table, a copied huge page or the child itself cannot be allocated
    /// (the parent is unchanged but for write-protected entries).
    pub fn fork(&self) -> Result<Mm<'p>, FaultError> {
        let child = self.new_child_of().ok_or(FaultError::Oom)?;
        let mut tlb = MmuGather::new(self);
        let vmas = self.mmap_write_lock();
        // Linux 6.4+ `vma_start_write` in `dup_mmap`: faults in the parent
        // wait (under mmap_lock) until the copy is done.
        vmas.write_lock_all();
        let list: Vec<Vma> = vmas.iter().copied().collect();
        let mut cvmas = child.mmap_write_lock_nested();
        let mut result = Ok(());
        for v in &list {
            cvmas.insert(*v);
            result = copy_page_range(&child, self, v, &mut tlb);
            if result.is_err() {
                break;
            }
        }
        drop(cvmas);
        // The parent's write-protected entries, before its threads run again.
        tlb.flush_tlb_only();
        drop(vmas);
        tlb.finish();
        result.map(|()| child)
    }
}

/// Linux `copy_page_range`: copies the entries of `vma` from `src` to `dst`.
fn copy_page_range(dst: &Mm<'_>, src: &Mm<'_>, vma: &Vma, tlb: &mut MmuGather<'_, '_>) -> Result<(), FaultError> {
    let (start, end) = (vma.start.as_u64(), vma.end.as_u64());
    let mut a = start;
    while a < end {
        let next = addr_end(a, PUD_SIZE, end);
        let va = VirtAddr::new(a);
        if let Some(spud) = pud_offset(src, p4d_offset(src, pgd_offset(src, va), va), va) {
            let v = spud.get();
            if v.is_leaf() || v.is_table() {
                let p4d = p4d_alloc(dst, pgd_offset(dst, va), va).ok_or(FaultError::Oom)?;
                let dpud = pud_alloc(dst, p4d, va).ok_or(FaultError::Oom)?;
                if v.is_leaf() {
                    copy_hugetlb_page(dst, src, vma, HugePte::Pud(dpud), HugePte::Pud(spud), va)?;
                } else {
                    copy_pmd_range(dst, src, vma, dpud, spud, a, next, tlb)?;
                }
            }
        }
        a = next;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy_pmd_range(
    dst: &Mm<'_>,
    src: &Mm<'_>,
    vma: &Vma,
    dpud: PudRef<'_>,
    spud: PudRef<'_>,
    start: u64,
    end: u64,
    tlb: &mut MmuGather<'_, '_>,
) -> Result<(), FaultError> {
    let mut a = start;
    while a < end {
        let next = addr_end(a, PMD_SIZE, end);
        let va = VirtAddr::new(a);
        let Some(spmd) = pmd_offset(src, spud, va) else { return Ok(()) };
        let v = spmd.get();
        if !v.is_none() {
            let dpmd = pmd_alloc(dst, dpud, va).ok_or(FaultError::Oom)?;
            if v.is_leaf() {
                let haddr = VirtAddr::new(a & !(PMD_SIZE - 1));
                // Linux `VM_BUG_ON_VMA(next-addr != HPAGE_PMD_SIZE)`: a huge
                // PMD is copied whole, so it must lie inside this one VMA
                // (else the next VMA meets it again). Whoever cuts a VMA
                // inside a THP splits the THP first.
                debug_assert!(
                    haddr >= vma.start && haddr.add(PMD_SIZE) <= vma.end,
                    "a huge PMD at {haddr:?} crosses the bounds of {vma:?}"
                );
                if vma.flags.is_hugetlb() {
                    copy_hugetlb_page(dst, src, vma, HugePte::Pmd(dpmd), HugePte::Pmd(spmd), haddr)?;
                } else if !copy_huge_pmd(dst, src, vma, dpmd, spmd, haddr)? {
                    // No 2 MiB block for the child: share the parent's
                    // pages as 4 KiB ones.
                    __split_huge_pmd(src, vma, spmd, haddr);
                }
            }
            if spmd.get().is_table() {
                copy_pte_range(dst, src, dpmd, spmd, a, next, tlb)?;
            }
        }
        a = next;
    }
    Ok(())
}

/// Linux `copy_pte_range`: the child's table through `pte_alloc_map_lock`,
/// the parent's through `pte_offset_map_rw_nolock` with its lock nested
/// (module comment); anonymous pages shared and write-protected in both.
fn copy_pte_range(
    dst: &Mm<'_>,
    src: &Mm<'_>,
    dpmd: PmdRef<'_>,
    spmd: PmdRef<'_>,
    start: u64,
    end: u64,
    tlb: &mut MmuGather<'_, '_>,
) -> Result<(), FaultError> {
    let va = VirtAddr::new(start);
    let mut dg = pte_alloc_map_lock(dst, dpmd, va).ok_or(FaultError::Oom)?;
    let Some((smap, _)) = pte_offset_map_rw_nolock(src, spmd, va) else { return Ok(()) };
    // Two address spaces, so two locks (even without split locks: each
    // has its own `page_table_lock`): the parent's is the nested one.
    let Some(mut sg) = smap.lock_nested_if_pmd_same(spmd) else {
        // Nothing changes a parent PMD while its mmap_lock is exclusive.
        debug_assert!(false, "the parent's PMD changed during fork");
        return Ok(());
    };
    let phys = src.phys();
    let zero = phys.zero_pfn();
    let mut shared = 0i64;
    let mut a = start;
    while a < end {
        let va = VirtAddr::new(a);
        let pte = sg.get_at(va);
        if pte.maps_frame() {
            let mut child = pte;
            if pte.pfn() != zero {
                // The child's mapping holds a reference of its own.
                phys.get_folio(pte.pfn());
                shared += 1;
                if pte.is_writable() {
                    sg.ptep_set_wrprotect(va);
                    tlb.flush_range(va, va.add(PAGE_SIZE));
                    child = Pte::from_raw(pte.raw() & !PteFlags::WRITABLE.bits());
                }
            }
            dg.set_pte_at(va, child);
        } else if !pte.is_none() {
            log::error!("mm: fork found unexpected {pte} at {va:?}");
        }
        a += PAGE_SIZE;
    }
    drop(sg);
    drop(dg);
    dst.counters.add(Counter::Rss, shared);
    src.counters.add(Counter::ForkShared, shared);
    Ok(())
}

/// Linux `copy_huge_pmd`, here a copy (module comment): write-protect the
/// parent's THP and shoot it down, copy it into a fresh THP, and map that in
/// the child with a deposited table, under the child's PMD lock and the
/// parent's nested. `Ok(false)`: no 2 MiB block (the caller splits instead).
fn copy_huge_pmd(
    dst: &Mm<'_>,
    src: &Mm<'_>,
    vma: &Vma,
    dpmd: PmdRef<'_>,
    spmd: PmdRef<'_>,
    haddr: VirtAddr,
) -> Result<bool, FaultError> {
    let phys = src.phys();
    let Some(folio) = phys.alloc_pages(HPAGE_PMD_ORDER) else { return Ok(false) };
    let mut pgtable = pagetable_alloc(phys).ok_or(FaultError::Oom)?;
    pagetable_pte_ctor(dst, &mut pgtable).map_err(|_| FaultError::Oom)?;
    // The parent's page must not change while it is copied.
    let spl = pmd_lock(src, spmd);
    let old = spmd.get();
    if !old.is_leaf() {
        return Ok(true);
    }
    let wprotected = Pmd::new(old.phys(), old.flags().difference(PteFlags::WRITABLE));
    set_pmd(src, spmd, wprotected, &spl);
    drop(spl);
    flush_tlb_range(src, FlushRange::new(haddr, haddr.add(PMD_SIZE)));
    for i in 0..1u64 << HPAGE_PMD_ORDER {
        phys.page(folio.pfn().add(i)).expect("allocated").set_kind(PageKind::Anon);
    }
    // SAFETY: `folio` is fresh and ours; the parent's THP stays mapped (both
    // address spaces are locked exclusive) and read-only since the shoot-down.
    unsafe { phys.copy_frames(folio.pfn(), old.pfn(), HPAGE_PMD_ORDER) };
    let dpl = pmd_lock(dst, dpmd);
    let sptl = pmd_lockptr(src, spmd).lock_nested();
    debug_assert_eq!(spmd.get(), wprotected, "the parent's THP changed during fork");
    debug_assert!(dpmd.get().is_none(), "the child's PMD is new");
    pgtable_trans_huge_deposit(dst, dpmd, pgtable, &dpl);
    dst.inc_nr(PtLevel::Pte);
    set_pmd_huge(dst, dpmd, folio, vm_huge_flags(vma.flags), &dpl);
    drop(sptl);
    drop(dpl);
    dst.counters.add(Counter::Rss, 1 << HPAGE_PMD_ORDER);
    Ok(true)
}
