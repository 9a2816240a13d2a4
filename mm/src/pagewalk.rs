//! The one range walk the entry-changing operations share (Linux
//! `mm/pagewalk.c`, and the `*_pud_range` / `*_pmd_range` skeletons of
//! `zap_page_range` and `change_protection`).
//!
//! A `RangeOps` says what to do with a 1 GiB leaf, a whole 2 MiB leaf, and
//! a run of PTEs in one table; `walk_page_range` visits `[start, end)` of a
//! VMA level by level, skipping empty entries. A transparent huge page only
//! partly inside the range is split first (its deposited table becomes the
//! PTE table), so an operation never sees half a huge page; hugetlb pages are
//! never split (their callers refuse ranges that cut one).
//!
//! Locks: the walk itself reads upper-level entries locklessly; each
//! operation takes the lock of the entry it changes. Upper tables are not
//! freed under the walk: the caller holds `mmap_lock` (shared or
//! exclusive) and PUD and PMD tables are detached only under it exclusive,
//! in spans no VMA covers. PTE tables may be reclaimed by a concurrent
//! `madvise`: `RangeOps::pte_range` maps them through
//! `pte_offset_map_lock`, which re-checks the PMD.

use crate::addr::{PGDIR_SIZE, PMD_SIZE, PUD_SIZE, VirtAddr};
use crate::huge_memory::__split_huge_pmd;
use crate::pgtable::walk::{P4dRef, PmdRef, PudRef, p4d_offset, pgd_offset, pmd_offset, pud_offset};
use crate::tlb::MmuGather;
use crate::vma::Vma;

/// `min(round_up(addr + 1, size), end)`: where the walk of one entry of
/// span `size` stops (Linux `p?d_addr_end`).
pub(crate) fn addr_end(addr: u64, size: u64, end: u64) -> u64 {
    ((addr & !(size - 1)) + size).min(end)
}

/// What a range operation does at each kind of entry.
pub(crate) trait RangeOps {
    /// A 1 GiB hugetlb leaf, wholly inside the range, at `haddr`.
    fn huge_pud(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pud: PudRef<'_>, haddr: VirtAddr);
    /// A 2 MiB leaf (THP or hugetlb), wholly inside the range, at `haddr`.
    fn huge_pmd(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, haddr: VirtAddr);
    /// The PTEs of `[start, end)`, all in the table `pmd` points to.
    fn pte_range(&mut self, tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, start: u64, end: u64);
}

/// Applies `ops` to every mapped entry of `[start, end)` inside `vma`.
pub(crate) fn walk_page_range(tlb: &mut MmuGather<'_, '_>, vma: &Vma, start: u64, end: u64, ops: &mut impl RangeOps) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PGDIR_SIZE, end);
        let p4d = p4d_offset(mm, pgd_offset(mm, VirtAddr::new(a)), VirtAddr::new(a));
        if p4d.get().is_table() {
            walk_pud_range(tlb, vma, p4d, a, next, ops);
        }
        a = next;
    }
}

fn walk_pud_range(
    tlb: &mut MmuGather<'_, '_>,
    vma: &Vma,
    p4d: P4dRef<'_>,
    start: u64,
    end: u64,
    ops: &mut impl RangeOps,
) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PUD_SIZE, end);
        let Some(pud) = pud_offset(mm, p4d, VirtAddr::new(a)) else { return };
        let v = pud.get();
        if v.is_leaf() {
            debug_assert!(a.is_multiple_of(PUD_SIZE) && next - a == PUD_SIZE, "range cuts a 1 GiB page");
            ops.huge_pud(tlb, vma, pud, VirtAddr::new(a));
        } else if v.is_table() {
            walk_pmd_range(tlb, vma, pud, a, next, ops);
        }
        a = next;
    }
}

fn walk_pmd_range(
    tlb: &mut MmuGather<'_, '_>,
    vma: &Vma,
    pud: PudRef<'_>,
    start: u64,
    end: u64,
    ops: &mut impl RangeOps,
) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PMD_SIZE, end);
        let Some(pmd) = pmd_offset(mm, pud, VirtAddr::new(a)) else { return };
        let haddr = VirtAddr::new(a & !(PMD_SIZE - 1));
        if pmd.get().is_leaf() {
            if a == haddr.as_u64() && next - a == PMD_SIZE {
                ops.huge_pmd(tlb, vma, pmd, haddr);
                a = next;
                continue;
            }
            // Part of a THP: split it, then treat the part as 4 KiB pages.
            debug_assert!(!vma.flags.is_hugetlb(), "range cuts a hugetlb page");
            __split_huge_pmd(mm, vma, pmd, haddr);
        }
        if pmd.get().is_table() {
            ops.pte_range(tlb, vma, pmd, a, next);
        }
        a = next;
    }
}
