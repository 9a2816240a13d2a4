//! Page faults (Linux `mm/memory.c`): `handle_mm_fault`,
//! `do_anonymous_page`, `do_wp_page`. Unmapping lives in [`crate::zap`],
//! protection changes in `mprotect`, table freeing in `free_pgtables`.
//!
//! # Lock protocol (the table of [`crate::lock`], as this module uses it)
//!
//! | step | lock held |
//! | --- | --- |
//! | find the VMA, check access | its VMA lock, found under RCU; or `mmap_lock` shared when that fails ([`handle_mm_fault`]) |
//! | allocate PUD / PMD tables (`pud_alloc`, `pmd_alloc`) | install under `page_table_lock` |
//! | allocate a PTE table (`pte_alloc`) | install under the PMD lock |
//! | 2 MiB THP / hugetlb entry | PMD lock (`pmd_lock` / `huge_pte_lock`) |
//! | 1 GiB hugetlb entry | `page_table_lock` (`huge_pte_lock`) |
//! | 4 KiB entry (`do_anonymous_page`, `do_wp_page`) | PTE lock (`pte_offset_map_lock`) |
//!
//! Frames and tables are allocated and zeroed *before* the lock that
//! publishes them is taken; under the lock the code only checks that the
//! entry is still what it saw (`pmd_none`, `pte_none`, `pte_same`) and
//! installs. If it is not, another CPU won: the lock is dropped, the unused
//! frame freed, and the fault returns quietly (counted as a lost race).
//!
//! # Why a fault may retry, and why it terminates
//!
//! A fault's VMA lock (or shared `mmap_lock`) keeps its VMA, and the PUD and
//! PMD tables above it, in place, but not the PMD *entry*: other CPUs install
//! tables and huge pages in it (none to table, none to huge), and
//! `madvise(MADV_DONTNEED)`, which runs under the same shared locks, zaps huge
//! pages (huge to none), splits them (huge to table) and reclaims empty PTE
//! tables (table to none, [`crate::zap`]). So `pte_offset_map` may find no
//! table, or `pte_offset_map_lock`'s `pmd_same` re-check may fail; the fault
//! then walks again from the PMD, and never writes into a table no PMD points
//! to. Each retry means another CPU made progress on that PMD; the loop is
//! bounded anyway ([`MAX_FAULT_RETRIES`]): past it the fault returns
//! [`FaultResult::Retry`] and the access simply faults again, as Linux
//! returns `VM_FAULT_RETRY`/`0` and lets the CPU retry.

use core::fmt;
use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{Pfn, VirtAddr};
use crate::counters::Counter;
use crate::helpers::RcuReadGuard;
use crate::huge_memory::{ThpOutcome, do_huge_pmd_anonymous_page, do_huge_pmd_wp_page};
use crate::hugetlb::hugetlb_fault;
use crate::memmap::PageKind;
use crate::mm_struct::Mm;
use crate::pgtable::entry::{PROTNONE, Pte, PteFlags, pte_same};
use crate::pgtable::walk::{PmdRef, p4d_alloc, pgd_offset, pmd_alloc, pte_alloc, pud_alloc};
use crate::tlb::{FlushRange, flush_tlb_range};
use crate::vma::{VmFlags, Vma};
use crate::vma_lock::{VmaReadGuard, lock_vma_under_rcu};
use crate::{HugePte, pte_offset_map_lock};

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
    /// A write to a read-only page this mapping owns alone (after fork, or
    /// its sharer went away): made writable in place (Linux `wp_page_reuse`).
    Reuse,
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
        return hugetlb_fault(mm, vma, HugePte::Pud(pud), addr, access).map(Some);
    }
    let pmd = pmd_alloc(mm, pud, addr).ok_or(FaultError::Oom)?;
    if vma.flags.contains(VmFlags::HUGETLB_2M) {
        return hugetlb_fault(mm, vma, HugePte::Pmd(pmd), addr, access).map(Some);
    }
    let pmdval = pmd.get();
    if pmdval.is_none() && vma.thp_suitable(addr) {
        match do_huge_pmd_anonymous_page(mm, vma, pmd, addr)? {
            ThpOutcome::Mapped => return Ok(Some(FaultResult::Thp)),
            ThpOutcome::Raced => return Ok(None),
            ThpOutcome::Fallback => {}
        }
    } else if pmdval.is_leaf() {
        if access.write && !pmdval.flags().contains(PteFlags::WRITABLE) && vma.flags.contains(VmFlags::WRITE) {
            // Write-protected by fork (THPs are never shared: fork copied
            // it for the child): make it writable in place.
            return Ok(Some(do_huge_pmd_wp_page(mm, vma, pmd, pmdval)));
        }
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
    // A write gets a zeroed frame, allocated before the lock; a read maps
    // the shared zero page.
    let frame = if access.write {
        let f = mm.phys().alloc_pages_zeroed(0).ok_or(FaultError::Oom)?;
        f.page().set_kind(PageKind::Anon);
        Some(f)
    } else {
        None
    };
    // `None`: the PMD changed; the frame (if any) drops, the walk goes again.
    let Some(mut pte) = pte_offset_map_lock(mm, pmd, addr) else { return Ok(None) };
    if !pte.ptep_get().is_none() {
        // Another CPU won: unlock first, then free the frame.
        drop(pte);
        drop(frame);
        mm.counters.inc(Counter::LostRaces);
        return Ok(Some(FaultResult::LostRace));
    }
    let result = match frame {
        Some(frame) => {
            pte.install(frame, vm_pte_flags(vma.flags));
            mm.counters.inc(Counter::Rss);
            mm.counters.inc(Counter::AnonFaults);
            FaultResult::Anon
        }
        None => {
            pte.set_pte(Pte::new(mm.phys().zero_pfn().phys(), zero_pte_flags(vma.flags)));
            mm.counters.inc(Counter::ZeroPageFaults);
            FaultResult::ZeroPage
        }
    };
    drop(pte);
    Ok(Some(result))
}

/// Linux `do_wp_page`: a write to a present read-only entry.
///
/// A page this mapping holds the only reference to is simply made writable
/// (`wp_page_reuse`). The zero page, and a page fork left shared, are copied
/// (`wp_page_copy`): the new frame is allocated and filled outside the lock
/// (a shared page is held by a reference of ours meanwhile), then under the
/// PTE lock the entry must still be the one we saw (`pte_same`); the old
/// entry is cleared and shot down on every CPU of the address space before
/// the new one goes in (Linux `ptep_clear_flush`), so no CPU keeps reading
/// the old page after another wrote the private copy, and only then does
/// the old mapping drop its reference.
fn do_wp_page(
    mm: &Mm<'_>,
    vma: &Vma,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
    orig: Pte,
    force: bool,
) -> Result<Option<FaultResult>, FaultError> {
    let zero_pfn = mm.phys().zero_pfn();
    let phys = mm.phys();
    // The page the copy is made from: none (zeroing) for the zero page; for
    // an anonymous page, one we hold a reference on while we copy it
    // outside the lock (Linux `folio_get` in `do_wp_page`).
    let mut source = None;
    if orig.pfn() != zero_pfn {
        let Some(mut pte) = pte_offset_map_lock(mm, pmd, addr) else { return Ok(None) };
        if !pte_same(pte.ptep_get(), orig) {
            drop(pte);
            mm.counters.inc(Counter::LostRaces);
            return Ok(Some(FaultResult::LostRace));
        }
        let exclusive = phys.page(orig.pfn()).is_some_and(|p| p.refcount() == 1);
        if !vma.flags.contains(VmFlags::WRITE) {
            // access_remote's FOLL_FORCE write to a read-only mapping: the
            // entry stays read-only for the user; a page it owns alone is
            // written through the entry, a shared one is copied first.
            debug_assert!(force, "write fault on a read-only VMA got past access_error");
            if exclusive {
                drop(pte);
                mm.counters.inc(Counter::SpuriousFaults);
                return Ok(Some(FaultResult::Spurious));
            }
        } else if exclusive {
            // Linux `wp_page_reuse`: the only reference is this mapping's
            // (fork's sharer went away, or it never had one). Upgrading
            // permissions needs no shoot-down: a stale read-only entry
            // elsewhere only causes a spurious fault.
            pte.set_pte(mk_pte(mm, orig.pfn(), vma.flags));
            drop(pte);
            mm.counters.inc(Counter::WpReuses);
            return Ok(Some(FaultResult::Reuse));
        }
        // Shared copy-on-write (fork), or pinned: copy it.
        phys.get_folio(orig.pfn());
        source = Some(orig.pfn());
        drop(pte);
    }
    // Linux `wp_page_copy`: a new frame, zeroed (the zero page) or a copy.
    let frame = match source {
        None => phys.alloc_pages_zeroed(0),
        Some(src) => phys.alloc_pages(0).inspect(|f| {
            // SAFETY: `f` is fresh and ours; `src` stays allocated (our
            // reference) and nobody writes it: every mapping of a shared
            // page is read-only, and a pin for write is taken only through a
            // writable entry (which makes the page unshared first).
            unsafe { phys.copy_frames(f.pfn(), src, 0) };
        }),
    };
    let Some(frame) = frame else {
        if let Some(src) = source {
            phys.put_folio(src, 0);
        }
        return Err(FaultError::Oom);
    };
    frame.page().set_kind(PageKind::Anon);
    let result = wp_install_copy(mm, vma, pmd, addr, orig, frame);
    if let Some(src) = source {
        // Our reference for the copy; the mapping's went with the entry.
        phys.put_folio(src, 0);
    }
    result
}

/// The locked half of `wp_page_copy`: if the entry is still `orig`, clear it,
/// shoot it down, map `frame` instead, and drop the old mapping's reference.
fn wp_install_copy(
    mm: &Mm<'_>,
    vma: &Vma,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
    orig: Pte,
    frame: crate::Frames<'_>,
) -> Result<Option<FaultResult>, FaultError> {
    let zero_pfn = mm.phys().zero_pfn();
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
    pte.install(frame, vm_pte_flags(vma.flags));
    drop(pte);
    if orig.pfn() == zero_pfn {
        mm.counters.inc(Counter::Rss);
    } else {
        // The old mapping's reference, now that no TLB maps it here.
        mm.phys().put_folio(orig.pfn(), 0);
    }
    mm.counters.inc(Counter::CowFaults);
    Ok(Some(FaultResult::Cow))
}

/// The huge-entry flags for a VMA (a leaf PMD or PUD, present or `PROT_NONE`).
pub(crate) fn vm_huge_flags(flags: VmFlags) -> PteFlags {
    vm_pte_flags(flags) | PteFlags::HUGE
}
