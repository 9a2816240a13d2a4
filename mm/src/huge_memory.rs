//! Transparent huge pages (Linux `mm/huge_memory.c`): 2 MiB anonymous pages
//! mapped by one PMD entry, with a PTE table deposited beside each so that a
//! later split never allocates under a lock.
//!
//! # Locks
//!
//! | what | protected by |
//! | --- | --- |
//! | a huge PMD entry | the PMD table's lock (`pmd_lock`) |
//! | the deposited PTE tables of a PMD table (`pmd_huge_pte`) | the same PMD lock (with split PMD locks the list head lives in the PMD table's descriptor; without, in `Mm`, under `page_table_lock`, which is then what `pmd_lock` returns) |
//!
//! Faults install huge PMDs under `mmap_lock` shared; splits, zaps and
//! protection changes of huge PMDs run under `mmap_lock` exclusive.
//!
//! # Deposit
//!
//! `do_huge_pmd_anonymous_page` allocates and constructs a PTE table before
//! taking the PMD lock, and under it deposits the table with the huge PMD
//! (Linux `pgtable_trans_huge_deposit`, asserted under `pmd_lock`). A split
//! withdraws it, fills it with 512 entries for the subpages and publishes it
//! in place of the huge entry: no allocation, no failure, under the lock.
//! Zapping the whole huge page withdraws and frees the deposited table (it
//! was never reachable by a walker, so it needs no grace period).

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PTRS_PER_TABLE, VirtAddr};
use crate::config::USE_SPLIT_PMD_PTLOCKS;
use crate::counters::Counter;
use crate::memmap::PageKind;
use crate::memory::{FaultError, vm_huge_flags};
use crate::mm_struct::Mm;
use crate::pgtable::entry::{Pmd, Pte, PteFlags};
use crate::pgtable::walk::{PmdRef, pmd_populate, set_pmd};
use crate::ptdesc::{PtLevel, PtPage, page_ptdesc, pagetable_alloc, pagetable_pte_ctor};
use crate::tlb::{FlushRange, MmuGather, flush_tlb_range};
use crate::vma::Vma;
use crate::{PtlGuard, pmd_lock, pmd_lockptr};

/// Order of a PMD-sized page (2 MiB = 2^9 frames).
pub const HPAGE_PMD_ORDER: usize = 9;
const HPAGE_PMD_NR: u64 = 1 << HPAGE_PMD_ORDER;

/// Linux `pmd_huge_pte(mm, pmd)`: the head of the deposited-table list for
/// the PMD table containing `pmd` (PFN + 1, 0 = empty).
pub(crate) fn pmd_huge_pte<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>) -> &'a AtomicU64 {
    if USE_SPLIT_PMD_PTLOCKS && !mm.is_init_mm() {
        &page_ptdesc(mm.phys(), pmd.table_pa().pfn()).expect("PMD table is managed").page().link
    } else {
        &mm.pmd_huge_pte
    }
}

#[track_caller]
fn assert_pmd_locked(mm: &Mm<'_>, pmd: PmdRef<'_>, ptl: &PtlGuard<'_>) {
    assert!(pmd_lockptr(mm, pmd).is_held_by(ptl), "deposit list used without its pmd_lock");
    ptl.lock().assert_held();
}

/// Linux `pgtable_trans_huge_deposit`: parks a constructed, empty PTE table
/// with the huge PMD `pmd`. Called under `pmd_lock` (asserted).
#[track_caller]
pub fn pgtable_trans_huge_deposit<'p>(mm: &Mm<'p>, pmd: PmdRef<'_>, pgtable: PtPage<'p>, ptl: &PtlGuard<'_>) {
    assert_pmd_locked(mm, pmd, ptl);
    let head = pmd_huge_pte(mm, pmd);
    // The list owns the table from now on (it is reachable from no entry).
    let pt = pgtable.publish();
    pt.page().link.store(head.load(Relaxed), Relaxed);
    head.store(pt.pfn().as_u64() + 1, Relaxed);
}

/// Linux `pgtable_trans_huge_withdraw`: takes back a table deposited with a
/// huge PMD of the same PMD table. Called under `pmd_lock` (asserted).
/// Panics if none is deposited (every huge PMD deposits one).
#[track_caller]
pub fn pgtable_trans_huge_withdraw<'p>(mm: &Mm<'p>, pmd: PmdRef<'_>, ptl: &PtlGuard<'_>) -> PtPage<'p> {
    assert_pmd_locked(mm, pmd, ptl);
    let head = pmd_huge_pte(mm, pmd);
    let first = head.load(Relaxed);
    assert_ne!(first, 0, "huge PMD without a deposited PTE table");
    let pt = page_ptdesc(mm.phys(), crate::Pfn::new(first - 1)).expect("deposited table is managed");
    head.store(pt.page().link.swap(0, Relaxed), Relaxed);
    debug_assert_eq!(pt.level(), Some(PtLevel::Pte));
    // SAFETY: a deposited table was never reachable from an entry, so no
    // walker can hold it; the list owned it alone and we just unlinked it.
    unsafe { PtPage::from_published(mm.phys(), pt) }
}

/// What `do_huge_pmd_anonymous_page` did.
pub(crate) enum ThpOutcome {
    /// The huge page is mapped.
    Mapped,
    /// No 2 MiB frame: use 4 KiB pages.
    Fallback,
    /// The PMD was populated meanwhile; walk again.
    Raced,
}

/// Linux `do_huge_pmd_anonymous_page`: maps a zeroed 2 MiB page at the
/// empty PMD `pmd`. The frame and the PTE table to deposit are allocated,
/// zeroed and constructed before `pmd_lock`; under it the PMD must still be
/// none, else another CPU won (a table or a huge page) and both are freed
/// after the unlock.
pub(crate) fn do_huge_pmd_anonymous_page(
    mm: &Mm<'_>,
    vma: &Vma,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
) -> Result<ThpOutcome, FaultError> {
    let _ = addr;
    let Some(folio) = mm.phys().alloc_pages_zeroed(HPAGE_PMD_ORDER) else {
        mm.counters.inc(Counter::ThpFallbacks);
        return Ok(ThpOutcome::Fallback);
    };
    for i in 0..HPAGE_PMD_NR {
        mm.phys().page(folio.pfn().add(i)).expect("allocated").set_kind(PageKind::Anon);
    }
    let Some(mut pgtable) = pagetable_alloc(mm.phys()) else { return Err(FaultError::Oom) };
    pagetable_pte_ctor(mm, &mut pgtable).map_err(|_| FaultError::Oom)?;
    let pl = pmd_lock(mm, pmd);
    if !pmd.get().is_none() {
        drop(pl);
        drop(pgtable);
        drop(folio);
        mm.counters.inc(Counter::LostRaces);
        return Ok(ThpOutcome::Raced);
    }
    pgtable_trans_huge_deposit(mm, pmd, pgtable, &pl);
    mm.inc_nr(PtLevel::Pte);
    set_pmd_huge(mm, pmd, folio, vm_huge_flags(vma.flags), &pl);
    drop(pl);
    mm.counters.add(Counter::Rss, HPAGE_PMD_NR as i64);
    mm.counters.inc(Counter::ThpFaults);
    Ok(ThpOutcome::Mapped)
}

/// Linux `set_pmd_at` of `mk_huge_pmd(folio)`: maps the 2 MiB block `folio`
/// at `pmd` with `flags`, under its PMD lock; the entry owns the block from
/// now on, and the zap that clears it gathers it.
pub(crate) fn set_pmd_huge(mm: &Mm<'_>, pmd: PmdRef<'_>, folio: crate::Frames<'_>, flags: PteFlags, pl: &PtlGuard<'_>) {
    debug_assert_eq!(folio.order(), HPAGE_PMD_ORDER);
    set_pmd(mm, pmd, Pmd::new(folio.phys_addr(), flags), pl);
    let _owned_by_the_entry = folio.into_raw();
}

/// Linux `do_huge_pmd_wp_page`, reuse: a write to a THP fork write-protected.
/// THPs are never shared between address spaces (fork copies them for the
/// child, `crate::fork`), so the page is this mapping's alone: under the PMD
/// lock, if the entry is still `orig`, make it writable in place.
pub(crate) fn do_huge_pmd_wp_page(mm: &Mm<'_>, vma: &Vma, pmd: PmdRef<'_>, orig: Pmd) -> crate::FaultResult {
    let pl = pmd_lock(mm, pmd);
    if pmd.get() != orig {
        mm.counters.inc(Counter::LostRaces);
        return crate::FaultResult::LostRace;
    }
    set_pmd(mm, pmd, Pmd::new(orig.phys(), vm_huge_flags(vma.flags)), &pl);
    drop(pl);
    mm.counters.inc(Counter::WpReuses);
    crate::FaultResult::Reuse
}

/// Linux `__split_huge_pmd` (+ `split_huge_page`): replaces the huge PMD at
/// `haddr` by its deposited PTE table filled with 512 entries for the
/// subpages, with the same protection. Each subpage becomes an independent
/// 4 KiB frame. Under `pmd_lock`, with `mmap_lock` held (exclusive for
/// munmap and mprotect, shared for `madvise`: faults may race it and see
/// the PMD huge, then none, then a table, and retry). A hugetlb PMD is never
/// split: callers refuse ranges that cut a hugetlb page, and `vma` decides
/// (a 2 MiB hugetlb frame and a THP look alike in the memmap).
///
/// A THP pinned by the lockless walker ([`crate::gup`]) holds a reference on
/// its head: it cannot become 512 separately owned frames until the pin
/// goes, so the split waits for it. Pins are held only by running kernel
/// code that takes no lock before dropping them, so the wait ends.
pub(crate) fn __split_huge_pmd(mm: &Mm<'_>, vma: &Vma, pmd: PmdRef<'_>, haddr: VirtAddr) {
    if vma.flags.is_hugetlb() {
        debug_assert!(false, "splitting a hugetlb page at {haddr:?}");
        return;
    }
    let pl = pmd_lock(mm, pmd);
    let old = pmd.get();
    if !old.is_leaf() {
        return;
    }
    let mut pgtable = pgtable_trans_huge_withdraw(mm, pmd, &pl);
    // Bit 7 is PS in a PMD but PAT in a PTE: drop it.
    let flags = old.flags().difference(PteFlags::HUGE);
    let base = old.pfn();
    for i in 0..PTRS_PER_TABLE {
        pgtable.init_entry(i, Pte::new(base.add(i as u64).phys(), flags).raw());
    }
    // split_page: every subpage is now a separately owned order-0 frame
    // (the buddy frees and merges them one by one).
    for i in 1..HPAGE_PMD_NR {
        mm.phys().page(base.add(i)).expect("mapped frame is managed").refcount.store(1, Relaxed);
    }
    // pmdp_invalidate: no CPU may hold the 2 MiB translation once 4 KiB ones
    // for the same addresses can be loaded (x86 forbids mixing them for one
    // address), so clear and shoot down before publishing the table.
    set_pmd(mm, pmd, Pmd::NONE, &pl);
    flush_tlb_range(mm, FlushRange::new(haddr, haddr.add(PMD_SIZE)));
    // The flush waited for every lockless walk that saw the huge entry
    // (interrupts off); what they pinned, they hold a head reference for.
    let head = mm.phys().page(base).expect("mapped frame is managed");
    let mut spins = 0u32;
    while head.refcount() > 1 {
        spins = spins.wrapping_add(1);
        crate::hal::get().spin_wait(spins);
    }
    pmd_populate(mm, pmd, pgtable, &pl);
    drop(pl);
    mm.counters.inc(Counter::ThpSplits);
}

/// Linux `split_huge_pmd_address`: splits the THP of `vma` mapping `addr`,
/// if any. hugetlb VMAs are never split (their callers refuse to cut them);
/// the VMA decides, not the frame (2 MiB hugetlb frames are anonymous too).
pub(crate) fn split_huge_pmd_address(mm: &Mm<'_>, vma: &Vma, addr: u64) {
    if vma.flags.is_hugetlb() {
        return;
    }
    let Some(pmd) = crate::pgtable::walk::walk_pmd(mm, VirtAddr::new(addr)) else { return };
    if pmd.get().is_leaf() {
        __split_huge_pmd(mm, vma, pmd, VirtAddr::new(addr & !(PMD_SIZE - 1)));
    }
}

/// Linux `zap_huge_pmd`: clears a huge PMD (THP or 2 MiB hugetlb) under
/// `pmd_lock` (= `huge_pte_lock` for 2 MiB) and gathers the 2 MiB frame; a
/// THP's deposited table is withdrawn and freed at once.
/// Returns the 4 KiB pages unmapped (0 if another CPU got there first).
pub(crate) fn zap_huge_pmd(tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, haddr: VirtAddr) -> u64 {
    let mm = tlb.mm();
    let pl = pmd_lock(mm, pmd);
    let old = pmd.get();
    if !old.is_leaf() {
        return 0;
    }
    set_pmd(mm, pmd, Pmd::NONE, &pl);
    let deposited = (!vma.flags.is_hugetlb()).then(|| pgtable_trans_huge_withdraw(mm, pmd, &pl));
    tlb.remove_page(old.pfn(), HPAGE_PMD_ORDER, haddr);
    drop(pl);
    let pages = (PMD_SIZE / PAGE_SIZE) as i64;
    if let Some(t) = deposited {
        drop(t);
        mm.dec_nr(PtLevel::Pte);
        mm.counters.add(Counter::Rss, -pages);
    } else {
        mm.counters.add(Counter::HugetlbPages, -pages);
    }
    pages as u64
}

/// Linux `change_huge_pmd`: rewrites a whole huge PMD with `vma`'s
/// protection under `pmd_lock`.
pub(crate) fn change_huge_pmd(tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, haddr: VirtAddr) {
    let mm = tlb.mm();
    let pl = pmd_lock(mm, pmd);
    let old = pmd.get();
    if !old.is_leaf() {
        return;
    }
    let new = Pmd::new(old.phys(), vm_huge_flags(vma.flags));
    if new != old {
        set_pmd(mm, pmd, new, &pl);
        tlb.flush_range(haddr, haddr.add(PMD_SIZE));
    }
}
