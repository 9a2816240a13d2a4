//! Page faults and unmapping (Linux `mm/memory.c`): `handle_mm_fault`,
//! `do_anonymous_page`, `do_wp_page`, `zap_pte_range` & co., `free_pgtables`,
//! and `change_protection` (Linux `mm/mprotect.c`).
//!
//! # Lock protocol (the table of [`crate::lock`], as this module uses it)
//!
//! | step | lock held |
//! | --- | --- |
//! | find the VMA, check access | `mmap_lock` shared (taken by [`handle_mm_fault`]) |
//! | allocate PUD / PMD tables (`pud_alloc`, `pmd_alloc`) | `mmap_lock` shared; install under `page_table_lock` |
//! | allocate a PTE table (`pte_alloc`) | install under the PMD lock |
//! | 2 MiB THP / hugetlb entry | PMD lock (`pmd_lock` / `huge_pte_lock`) |
//! | 1 GiB hugetlb entry | `page_table_lock` (`huge_pte_lock`) |
//! | 4 KiB entry (`do_anonymous_page`, `do_wp_page`) | PTE lock (`pte_offset_map_lock`) |
//! | zap / change_protection / free_pgtables | `mmap_lock` exclusive, then the entry's lock as above |
//!
//! Frames and tables are allocated and zeroed *before* the lock that
//! publishes them is taken; under the lock the code only checks that the
//! entry is still what it saw (`pmd_none`, `pte_none`, `pte_same`) and
//! installs. If it is not, another CPU won: the lock is dropped, the unused
//! frame freed, and the fault returns quietly (counted as a lost race).
//!
//! # Why a fault may retry, and why it terminates
//!
//! `pte_offset_map_lock` returns `None` when the PMD no longer points to a
//! PTE table by the time it looks: another CPU put a huge page there, or (for
//! walkers that do not hold `mmap_lock`) the table was detached. The fault
//! then restarts from the PMD. While a fault holds `mmap_lock` shared, a PMD
//! entry only ever moves *forward*, from none to a table or from none to a
//! huge page; tables and huge pages are removed, split or replaced only under
//! the exclusive lock. So the second walk sees the final state and a fault
//! retries at most twice. The loop is bounded anyway ([`MAX_FAULT_RETRIES`]):
//! past it the fault returns [`FaultResult::Retry`] and the access simply
//! faults again, as Linux returns `VM_FAULT_RETRY`/`0` and lets the CPU retry.
//!
//! # Freeing
//!
//! Unmapping goes through an [`MmuGather`]: entries are cleared under their
//! lock, frames and detached tables are gathered, and freed only after the
//! shoot-down (and, for tables, a grace period); see [`crate::tlb`].

use core::fmt;
use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{
    PAGE_SIZE, PGDIR_SIZE, PMD_SIZE, PTRS_PER_TABLE, PUD_SIZE, Pfn, PhysAddr, USER_PGTABLES_CEILING, VirtAddr,
};
use crate::counters::Counter;
use crate::gigantic::GIGANTIC_ORDER;
use crate::helpers::RcuReadGuard;
use crate::huge_memory::{__split_huge_pmd, ThpOutcome, change_huge_pmd, do_huge_pmd_anonymous_page, zap_huge_pmd};
use crate::hugetlb::hugetlb_fault;
use crate::memmap::PageKind;
use crate::mm_struct::Mm;
use crate::pgtable::entry::{PROTNONE, Pmd, Pte, PteFlags, Pud, pte_same};
use crate::pgtable::walk::{
    PmdRef, PudRef, p4d_alloc, p4d_clear, p4d_offset, pgd_offset, pmd_alloc, pmd_offset, pte_alloc, pud_alloc,
    pud_offset, set_pmd, set_pud,
};
use crate::ptdesc::{PtLevel, page_ptdesc};
use crate::tlb::{FlushRange, MmuGather, flush_tlb_range};
use crate::vma::{VmFlags, Vma};
use crate::vma_lock::{VmaReadGuard, lock_vma_under_rcu};
use crate::{HugePte, pmd_lock, pte_lockptr, pte_offset_map_lock};

/// A fault restarts its walk at most this many times before handing the
/// access back to the CPU (module comment: two suffice).
pub const MAX_FAULT_RETRIES: u32 = 8;

/// What the faulting access was (from the x86 page-fault error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access {
    /// A write (error code bit 1).
    pub write: bool,
    /// An instruction fetch (error code bit 4).
    pub exec: bool,
    /// From user mode (error code bit 2).
    pub user: bool,
}

impl Access {
    /// A user-mode read.
    pub const READ: Access = Access { write: false, exec: false, user: true };
    /// A user-mode write.
    pub const WRITE: Access = Access { write: true, exec: false, user: true };
    /// A user-mode instruction fetch.
    pub const EXEC: Access = Access { write: false, exec: true, user: true };

    /// The same access from kernel mode.
    pub const fn kernel(self) -> Access {
        Access { user: false, ..self }
    }
}

/// How a fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultResult {
    /// A fresh zeroed 4 KiB page was mapped.
    Anon,
    /// The shared zero page was mapped read-only.
    ZeroPage,
    /// The zero page was copied into a private writable page.
    Cow,
    /// A 2 MiB transparent huge page was mapped.
    Thp,
    /// A hugetlb page (2 MiB or 1 GiB) was mapped.
    HugeTlb,
    /// The access was already allowed (another CPU fixed it first, or a stale
    /// TLB entry): nothing to do.
    Spurious,
    /// Another CPU installed the entry while this one prepared it; the
    /// prepared frame was freed.
    LostRace,
    /// The tables kept changing; the access should simply be retried.
    Retry,
}

/// Why a fault could not be resolved (the task gets a signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// No VMA covers the address (`SEGV_MAPERR`).
    MapErr,
    /// The VMA forbids the access: write to read-only, fetch from
    /// non-executable, any access to `PROT_NONE` (`SEGV_ACCERR`).
    AccErr,
    /// No memory for a frame or a page table (`VM_FAULT_OOM`).
    Oom,
}

impl fmt::Display for FaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultError::MapErr => "no mapping at that address (SEGV_MAPERR)",
            FaultError::AccErr => "access not permitted by the mapping (SEGV_ACCERR)",
            FaultError::Oom => "out of memory",
        })
    }
}

/// Linux `access_error`: whether the VMA forbids the access.
pub(crate) fn access_error(flags: VmFlags, access: Access) -> bool {
    if access.write {
        !flags.contains(VmFlags::WRITE)
    } else if access.exec {
        !flags.contains(VmFlags::EXEC)
    } else {
        !flags.is_accessible()
    }
}

/// Linux `vm_get_page_prot`: the leaf-entry flags for a VMA's protection.
/// `PROT_NONE` gives a non-present entry that keeps its frame ([`PROTNONE`]).
pub(crate) fn vm_pte_flags(flags: VmFlags) -> PteFlags {
    if !flags.is_accessible() {
        return PROTNONE | PteFlags::USER | PteFlags::ACCESSED;
    }
    let mut f = PteFlags::PRESENT | PteFlags::USER | PteFlags::ACCESSED;
    if flags.contains(VmFlags::WRITE) {
        f |= PteFlags::WRITABLE | PteFlags::DIRTY;
    }
    if !flags.contains(VmFlags::EXEC) {
        f |= PteFlags::NO_EXECUTE;
    }
    f
}

/// The flags for the zero page in a VMA: never writable.
pub(crate) fn zero_pte_flags(flags: VmFlags) -> PteFlags {
    vm_pte_flags(flags).difference(PteFlags::WRITABLE | PteFlags::DIRTY)
}

/// Linux `mk_pte`: the entry mapping `pfn` in a VMA with `flags`.
pub(crate) fn mk_pte(mm: &Mm<'_>, pfn: Pfn, flags: VmFlags) -> Pte {
    let f = if pfn == mm.phys().zero_pfn() { zero_pte_flags(flags) } else { vm_pte_flags(flags) };
    Pte::new(pfn.phys(), f)
}

/// How page faults lock the VMA they fault in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultLocking {
    /// Linux 6.4+: the VMA's own read lock, found under RCU, with no
    /// `mmap_lock`; `mmap_lock` shared only when that fails
    /// ([`crate::vma_lock`]). The default.
    PerVma,
    /// Every fault takes `mmap_lock` shared (Linux before 6.4), for
    /// comparison (kernel command line `fault_lock=mmap`).
    MmapLock,
}

static PER_VMA_FAULTS: AtomicBool = AtomicBool::new(true);

/// Chooses how faults lock their VMA from now on (boot option, benchmarks).
pub fn set_fault_locking(l: FaultLocking) {
    PER_VMA_FAULTS.store(l == FaultLocking::PerVma, Relaxed);
}

/// How faults lock their VMA now.
pub fn fault_locking() -> FaultLocking {
    if PER_VMA_FAULTS.load(Relaxed) { FaultLocking::PerVma } else { FaultLocking::MmapLock }
}

/// What keeps a fault's VMA from changing under it: the proof
/// [`fault_locked`] takes.
pub(crate) enum FaultLock<'a> {
    /// `mmap_lock`, shared or exclusive (the guard is the caller's).
    Mmap,
    /// The VMA's own read lock.
    Vma(&'a VmaReadGuard<'a>),
}

/// Linux `handle_mm_fault` (with the `lock_vma_under_rcu`,
/// `lock_mm_and_find_vma` and `access_error` steps of the x86 fault
/// handler): resolves a fault at `addr` in `mm` on the executing CPU.
///
/// It takes no lock that serialises the faults of an address space: it finds
/// its VMA in the published array under RCU and read-locks only that VMA
/// ([`crate::vma_lock`]); if the VMA is being changed (or the lookup misses)
/// it falls back to `mmap_lock` shared, which waits for the writer. Then only
/// the locks of the page tables it touches. The read-side section around a
/// fault under its VMA lock keeps the VMA's node alive; the fallback leaves
/// it before waiting for `mmap_lock` (a writer may wait for a grace period
/// after dropping `mmap_lock`, never while holding it, and a reader that
/// waited for `mmap_lock` inside a section would stall that grace period).
pub fn handle_mm_fault(mm: &Mm<'_>, addr: VirtAddr, access: Access) -> Result<FaultResult, FaultError> {
    if !addr.is_user() {
        return Err(FaultError::MapErr);
    }
    if fault_locking() == FaultLocking::PerVma {
        let rcu = RcuReadGuard::new();
        if let Ok(vlock) = lock_vma_under_rcu(mm, addr, &rcu) {
            let vma = *vlock.vma();
            mm.counters.inc(Counter::VmaLockFaults);
            if access_error(vma.flags, access) {
                return Err(FaultError::AccErr);
            }
            return fault_locked(mm, &vma, addr, access, false, FaultLock::Vma(&vlock));
        }
    }
    let vmas = mm.mmap_lock.read();
    mm.counters.inc(Counter::MmapLockFaults);
    let Some(&vma) = vmas.find(addr) else { return Err(FaultError::MapErr) };
    if access_error(vma.flags, access) {
        return Err(FaultError::AccErr);
    }
    let r = fault_locked(mm, &vma, addr, access, false, FaultLock::Mmap);
    drop(vmas);
    r
}

/// The fault with `vma` found and held stable by `lock`. `force` (Linux
/// `FOLL_FORCE`, for `access_remote`): the VMA's protection was not checked;
/// entries are still made with the VMA's protection.
pub(crate) fn fault_locked(
    mm: &Mm<'_>,
    vma: &Vma,
    addr: VirtAddr,
    access: Access,
    force: bool,
    lock: FaultLock<'_>,
) -> Result<FaultResult, FaultError> {
    match lock {
        FaultLock::Mmap => mm.mmap_lock.assert_held(),
        FaultLock::Vma(g) => debug_assert!(g.vma() == vma, "fault on a VMA it did not lock"),
    }
    for attempt in 0..MAX_FAULT_RETRIES {
        if attempt > 0 {
            mm.counters.inc(Counter::Retries);
        }
        match __handle_mm_fault(mm, vma, addr, access, force) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => continue,
            Err(e) => {
                if e == FaultError::Oom {
                    mm.counters.inc(Counter::Oom);
                }
                return Err(e);
            }
        }
    }
    log::warn!("mm: fault at {addr:?} retried {MAX_FAULT_RETRIES} times; letting the access fault again");
    Ok(FaultResult::Retry)
}

/// One walk of the fault. `Ok(None)`: a table changed under us, walk again.
fn __handle_mm_fault(
    mm: &Mm<'_>,
    vma: &Vma,
    addr: VirtAddr,
    access: Access,
    force: bool,
) -> Result<Option<FaultResult>, FaultError> {
    let pgd = pgd_offset(mm, addr);
    let p4d = p4d_alloc(mm, pgd, addr).ok_or(FaultError::Oom)?;
    // PUD and PMD tables: allocated outside the lock, installed under
    // page_table_lock only if the entry is still empty (pud_alloc/pmd_alloc).
    let pud = pud_alloc(mm, p4d, addr).ok_or(FaultError::Oom)?;
    if vma.flags.contains(VmFlags::HUGETLB_1G) {
        return hugetlb_fault(mm, vma, HugePte::Pud(pud), addr).map(Some);
    }
    let pmd = pmd_alloc(mm, pud, addr).ok_or(FaultError::Oom)?;
    if vma.flags.contains(VmFlags::HUGETLB_2M) {
        return hugetlb_fault(mm, vma, HugePte::Pmd(pmd), addr).map(Some);
    }
    let pmdval = pmd.get();
    if pmdval.is_none() && vma.thp_suitable(addr) {
        match do_huge_pmd_anonymous_page(mm, vma, pmd, addr)? {
            ThpOutcome::Mapped => return Ok(Some(FaultResult::Thp)),
            ThpOutcome::Raced => return Ok(None),
            ThpOutcome::Fallback => {}
        }
    } else if pmdval.is_leaf() {
        // A huge page maps it with the VMA's protection, which allows the
        // access (checked): another CPU mapped it, or a stale TLB entry.
        mm.counters.inc(Counter::SpuriousFaults);
        return Ok(Some(FaultResult::Spurious));
    }
    // Linux `pte_alloc`: a PTE table under the PMD, installed under pmd_lock
    // only if the PMD is still none (else the new table is freed).
    pte_alloc(mm, pmd).map_err(|_| FaultError::Oom)?;
    handle_pte_fault(mm, vma, pmd, addr, access, force)
}

/// Linux `handle_pte_fault`.
fn handle_pte_fault(
    mm: &Mm<'_>,
    vma: &Vma,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
    access: Access,
    force: bool,
) -> Result<Option<FaultResult>, FaultError> {
    // One read-side section around the lockless look and the locked update
    // that follows: the `pte_offset_map` and `pte_offset_map_lock` inside
    // then nest, and only this outermost entry pays the barrier (a locked
    // instruction in the kernel's RCU). Nothing here waits for a grace
    // period or switches tasks.
    let _rcu = crate::helpers::RcuReadGuard::new();
    // A lockless look first (Linux `ptep_get_lockless`): decides which path
    // to take; each path re-checks under the PTE lock.
    let Some(map) = crate::pte_offset_map(mm, pmd, addr) else { return Ok(None) };
    let orig = map.ptep_get();
    drop(map);
    if orig.is_none() {
        return do_anonymous_page(mm, vma, pmd, addr, access);
    }
    if access.write && (orig.pfn() == mm.phys().zero_pfn() || !orig.is_writable()) {
        return do_wp_page(mm, vma, pmd, addr, orig, force);
    }
    if !orig.maps_frame() {
        log::error!("mm: unexpected {orig} at {addr:?}");
        return Err(FaultError::AccErr);
    }
    mm.counters.inc(Counter::SpuriousFaults);
    Ok(Some(FaultResult::Spurious))
}

/// Linux `do_anonymous_page`: the first touch of an anonymous page.
///
/// A read maps the shared zero page read-only. A write allocates and zeroes
/// a frame *before* taking the PTE lock; under the lock, if the entry is no
/// longer none, another CPU won the race: the frame is freed after the
/// unlock and the fault returns quietly.
fn do_anonymous_page(
    mm: &Mm<'_>,
    vma: &Vma,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
    access: Access,
) -> Result<Option<FaultResult>, FaultError> {
    if !access.write {
        let zero = Pte::new(mm.phys().zero_pfn().phys(), zero_pte_flags(vma.flags));
        let Some(mut pte) = pte_offset_map_lock(mm, pmd, addr) else { return Ok(None) };
        if !pte.ptep_get().is_none() {
            drop(pte);
            mm.counters.inc(Counter::LostRaces);
            return Ok(Some(FaultResult::LostRace));
        }
        pte.set_pte(zero);
        drop(pte);
        mm.counters.inc(Counter::ZeroPageFaults);
        return Ok(Some(FaultResult::ZeroPage));
    }
    let frame = mm.phys().alloc_pages_zeroed(0).ok_or(FaultError::Oom)?;
    frame.page().set_kind(PageKind::Anon);
    let entry = Pte::new(frame.phys_addr(), vm_pte_flags(vma.flags));
    let Some(mut pte) = pte_offset_map_lock(mm, pmd, addr) else {
        drop(frame);
        return Ok(None);
    };
    if !pte.ptep_get().is_none() {
        // Another CPU won: unlock first, then free the frame.
        drop(pte);
        drop(frame);
        mm.counters.inc(Counter::LostRaces);
        return Ok(Some(FaultResult::LostRace));
    }
    pte.set_pte(entry);
    // The entry owns the frame now; zap frees it.
    let _ = frame.into_raw();
    drop(pte);
    mm.counters.inc(Counter::Rss);
    mm.counters.inc(Counter::AnonFaults);
    Ok(Some(FaultResult::Anon))
}

/// Linux `do_wp_page`: a write to a present read-only entry.
///
/// The zero page is copied (`wp_page_copy`): the new frame is allocated and
/// filled outside the lock, then under the PTE lock the entry must still be
/// the one we saw (`pte_same`); the old entry is cleared and shot down on
/// every CPU of the address space before the new one goes in (Linux
/// `ptep_clear_flush`), so no CPU keeps reading the zero page after another
/// wrote the private copy. A private page mapped read-only in a writable VMA
/// is simply made writable (`wp_page_reuse`).
fn do_wp_page(
    mm: &Mm<'_>,
    vma: &Vma,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
    orig: Pte,
    force: bool,
) -> Result<Option<FaultResult>, FaultError> {
    let zero_pfn = mm.phys().zero_pfn();
    if orig.pfn() != zero_pfn {
        let Some(mut pte) = pte_offset_map_lock(mm, pmd, addr) else { return Ok(None) };
        if !pte_same(pte.ptep_get(), orig) {
            drop(pte);
            mm.counters.inc(Counter::LostRaces);
            return Ok(Some(FaultResult::LostRace));
        }
        if vma.flags.contains(VmFlags::WRITE) {
            // Upgrading permissions needs no shoot-down: a stale read-only
            // entry elsewhere only causes a spurious fault.
            pte.set_pte(mk_pte(mm, orig.pfn(), vma.flags));
        } else {
            debug_assert!(force, "write fault on a read-only VMA got past access_error");
        }
        drop(pte);
        mm.counters.inc(Counter::SpuriousFaults);
        return Ok(Some(FaultResult::Spurious));
    }
    // Copying the zero page is zeroing.
    let frame = mm.phys().alloc_pages_zeroed(0).ok_or(FaultError::Oom)?;
    frame.page().set_kind(PageKind::Anon);
    let entry = Pte::new(frame.phys_addr(), vm_pte_flags(vma.flags));
    let Some(mut pte) = pte_offset_map_lock(mm, pmd, addr) else {
        drop(frame);
        return Ok(None);
    };
    if !pte_same(pte.ptep_get(), orig) {
        drop(pte);
        drop(frame);
        mm.counters.inc(Counter::LostRaces);
        return Ok(Some(FaultResult::LostRace));
    }
    // ptep_clear_flush, then set_pte_at.
    pte.ptep_get_and_clear(addr);
    flush_tlb_range(mm, FlushRange::page(addr));
    pte.set_pte(entry);
    let _ = frame.into_raw();
    drop(pte);
    mm.counters.inc(Counter::Rss);
    mm.counters.inc(Counter::CowFaults);
    Ok(Some(FaultResult::Cow))
}

/// `min(round_up(addr + 1, size), end)`: where the walk of one entry of
/// span `size` stops (Linux `p?d_addr_end`).
fn addr_end(addr: u64, size: u64, end: u64) -> u64 {
    ((addr & !(size - 1)) + size).min(end)
}

/// Linux `unmap_page_range`: clears every entry mapping `[start, end)` of
/// `vma` and gathers what they mapped. Huge PMDs only partly inside are split
/// first (their deposited table becomes the PTE table). The caller holds
/// `mmap_lock` exclusive (or owns the dying address space).
pub(crate) fn unmap_page_range(tlb: &mut MmuGather<'_, '_>, vma: &Vma, start: u64, end: u64) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PGDIR_SIZE, end);
        let p4d = p4d_offset(mm, pgd_offset(mm, VirtAddr::new(a)), VirtAddr::new(a));
        if p4d.get().is_table() {
            zap_pud_range(tlb, vma, p4d, a, next);
        }
        a = next;
    }
}

fn zap_pud_range(tlb: &mut MmuGather<'_, '_>, vma: &Vma, p4d: crate::P4dRef<'_>, start: u64, end: u64) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PUD_SIZE, end);
        let Some(pud) = pud_offset(mm, p4d, VirtAddr::new(a)) else { return };
        let v = pud.get();
        if v.is_leaf() {
            debug_assert!(a.is_multiple_of(PUD_SIZE) && next - a == PUD_SIZE, "partial unmap of a 1 GiB page");
            zap_huge_pud(tlb, pud, VirtAddr::new(a & !(PUD_SIZE - 1)));
        } else if v.is_table() {
            zap_pmd_range(tlb, vma, pud, a, next);
        }
        a = next;
    }
}

/// Clears a 1 GiB hugetlb entry under `huge_pte_lock` (= `page_table_lock`).
fn zap_huge_pud(tlb: &mut MmuGather<'_, '_>, pud: PudRef<'_>, haddr: VirtAddr) {
    let mm = tlb.mm();
    let ptl = crate::huge_pte_lock(mm, PUD_SIZE, HugePte::Pud(pud));
    let old = pud.get();
    if !old.is_leaf() {
        return;
    }
    set_pud(mm, pud, Pud::NONE, &ptl);
    tlb.remove_page(old.pfn(), GIGANTIC_ORDER, haddr);
    drop(ptl);
    mm.counters.add(Counter::HugetlbPages, -((PUD_SIZE / PAGE_SIZE) as i64));
}

fn zap_pmd_range(tlb: &mut MmuGather<'_, '_>, vma: &Vma, pud: PudRef<'_>, start: u64, end: u64) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PMD_SIZE, end);
        let Some(pmd) = pmd_offset(mm, pud, VirtAddr::new(a)) else { return };
        let haddr = VirtAddr::new(a & !(PMD_SIZE - 1));
        if pmd.get().is_leaf() {
            if a == haddr.as_u64() && next - a == PMD_SIZE {
                zap_huge_pmd(tlb, vma, pmd, haddr);
                a = next;
                continue;
            }
            // Part of a THP: split it, then zap the part as 4 KiB pages.
            debug_assert!(!vma.flags.is_hugetlb(), "partial unmap of a hugetlb page");
            __split_huge_pmd(mm, pmd, haddr);
        }
        if pmd.get().is_table() {
            zap_pte_range(tlb, pmd, a, next);
        }
        a = next;
    }
}

/// Linux `zap_pte_range`: under the PTE lock, clears each entry and gathers
/// its frame (the zero page is only flushed, never freed).
fn zap_pte_range(tlb: &mut MmuGather<'_, '_>, pmd: PmdRef<'_>, start: u64, end: u64) {
    let mm = tlb.mm();
    let zero = mm.phys().zero_pfn();
    let Some(mut pte) = pte_offset_map_lock(mm, pmd, VirtAddr::new(start)) else { return };
    let mut freed = 0i64;
    let mut a = start;
    while a < end {
        let va = VirtAddr::new(a);
        let old = pte.ptep_get_and_clear(va);
        if old.maps_frame() {
            if old.pfn() == zero {
                tlb.flush_range(va, va.add(PAGE_SIZE));
            } else {
                tlb.remove_page(old.pfn(), 0, va);
                freed += 1;
            }
        } else if !old.is_none() {
            log::error!("mm: zap of unexpected {old} at {va:?}");
        }
        a += PAGE_SIZE;
    }
    drop(pte);
    mm.counters.add(Counter::Rss, -freed);
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
    p4d: crate::P4dRef<'_>,
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
    let ptl = pte_lockptr(mm, old);
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
/// before the detach can still read it, and nobody writes it).
fn table_entries<'a>(mm: &'a Mm<'_>, table: PhysAddr) -> impl Iterator<Item = (usize, u64)> + 'a {
    (0..PTRS_PER_TABLE).filter_map(move |i| {
        let v = mm.phys().slot(table.add(8 * i as u64))?.load(Relaxed);
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
    let mut children = alloc::vec::Vec::new();
    for (i, raw) in table_entries(mm, table) {
        let v = Pmd::from_raw(raw);
        if v.is_table() {
            children.push(v.pfn().as_u64() | ((i as u64) << 52));
        } else {
            log::error!("mm: freeing a PMD table {table:?} with {v} in entry {i}");
            debug_assert!(false, "freeing a PMD table that still maps something");
        }
    }
    for c in children {
        let (pfn, i) = (Pfn::new(c & ((1 << 52) - 1)), c >> 52);
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

/// Linux `change_protection`: rewrites every entry of `[start, end)` with
/// the protection of `vma.flags` (already the new flags), under each
/// entry's lock, and widens the gather's flush range for each change. Huge
/// PMDs only partly inside are split first. `mmap_lock` exclusive.
pub(crate) fn change_protection(tlb: &mut MmuGather<'_, '_>, vma: &Vma, start: u64, end: u64) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PGDIR_SIZE, end);
        let p4d = p4d_offset(mm, pgd_offset(mm, VirtAddr::new(a)), VirtAddr::new(a));
        if p4d.get().is_table() {
            let mut b = a;
            while b < next {
                let bnext = addr_end(b, PUD_SIZE, next);
                if let Some(pud) = pud_offset(mm, p4d, VirtAddr::new(b)) {
                    let v = pud.get();
                    if v.is_leaf() {
                        let ptl = crate::huge_pte_lock(mm, PUD_SIZE, HugePte::Pud(pud));
                        let old = pud.get();
                        if old.is_leaf() {
                            let new = Pud::new(old.phys(), vm_pte_flags(vma.flags) | PteFlags::HUGE);
                            set_pud(mm, pud, new, &ptl);
                            tlb.flush_range(
                                VirtAddr::new(b & !(PUD_SIZE - 1)),
                                VirtAddr::new((b & !(PUD_SIZE - 1)) + PUD_SIZE),
                            );
                        }
                    } else if v.is_table() {
                        change_pmd_range(tlb, vma, pud, b, bnext);
                    }
                }
                b = bnext;
            }
        }
        a = next;
    }
}

fn change_pmd_range(tlb: &mut MmuGather<'_, '_>, vma: &Vma, pud: PudRef<'_>, start: u64, end: u64) {
    let mm = tlb.mm();
    let mut a = start;
    while a < end {
        let next = addr_end(a, PMD_SIZE, end);
        let Some(pmd) = pmd_offset(mm, pud, VirtAddr::new(a)) else { return };
        let haddr = VirtAddr::new(a & !(PMD_SIZE - 1));
        if pmd.get().is_leaf() {
            if a == haddr.as_u64() && next - a == PMD_SIZE {
                change_huge_pmd(tlb, vma, pmd, haddr);
                a = next;
                continue;
            }
            debug_assert!(!vma.flags.is_hugetlb(), "partial mprotect of a hugetlb page");
            __split_huge_pmd(mm, pmd, haddr);
        }
        if pmd.get().is_table() {
            change_pte_range(tlb, vma, pmd, a, next);
        }
        a = next;
    }
}

/// Linux `change_pte_range`.
fn change_pte_range(tlb: &mut MmuGather<'_, '_>, vma: &Vma, pmd: PmdRef<'_>, start: u64, end: u64) {
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

/// The huge-entry flags for a VMA (a leaf PMD or PUD, present or `PROT_NONE`).
pub(crate) fn vm_huge_flags(flags: VmFlags) -> PteFlags {
    vm_pte_flags(flags) | PteFlags::HUGE
}
