//! The split page-table lock helpers of `Documentation/mm/split_page_table_lock.rst`
//! (Linux `mm/pgtable-generic.c`, `include/linux/mm.h`), with the document's
//! names and meanings.
//!
//! # Protocol
//!
//! * A PTE table's entries are protected by that table's lock. The lock is
//!   found through the PMD *value* ([`pte_lockptr`]): it is the lock of the
//!   table the PMD points to, so it stays the right lock for the mapped table
//!   even if the PMD changes afterwards.
//! * A PMD table's entries are protected by that table's lock; [`pmd_lockptr`]
//!   rounds the entry's address down to its table and uses that table's
//!   descriptor.
//! * PUD/P4D/PGD entries and 1 GiB hugetlb entries: `mm.page_table_lock`.
//! * With split locks off (see [`crate::config`]), and for the kernel's own
//!   tables (`init_mm`), every helper gives `mm.page_table_lock`.
//! * Order: `mm.page_table_lock` -> PMD lock -> PTE lock; the helpers take each
//!   at its level, so the debug checker catches inversions (and a PTE lock
//!   taken under a PMD lock that is the same `page_table_lock`).
//!
//! In Rust, "returns a pointer to the PTE with a pointer to its lock" is a
//! guard that owns the mapping and, where taken, the lock:
//!
//! | helper | returns | dropping it is |
//! | --- | --- | --- |
//! | [`pte_offset_map`] | [`PteMap`] | [`pte_unmap`] |
//! | [`pte_offset_map_ro_nolock`] | [`PteMapNolock<Ro>`](PteMapNolock) (+ the lock, not taken) | [`pte_unmap`] |
//! | [`pte_offset_map_rw_nolock`] | ([`PteMapNolock<Rw>`](PteMapNolock), PMD value) | [`pte_unmap`] |
//! | [`pte_offset_map_lock`], [`pte_alloc_map_lock`] | [`PteGuard`] (lock taken) | [`pte_unmap_unlock`] |
//! | [`pmd_lock`], [`huge_pte_lock`] | [`PtlGuard`] | `spin_unlock` |
//!
//! Every "returns NULL" of the document is a `None`. A successful map places
//! the caller inside a read-side critical section ([`crate::hal::Hal::rcu_read_lock`])
//! until the unmap: that is what keeps a concurrently detached PTE table
//! (and its lock) alive, since detached tables are freed only after a grace
//! period ([`crate::table_rcu`]).

use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::Ordering::{Acquire, Release};

use crate::addr::{PMD_SHIFT, PMD_SIZE, PUD_SIZE, PhysAddr, VirtAddr};
use crate::config::{USE_SPLIT_PMD_PTLOCKS, USE_SPLIT_PTE_PTLOCKS};
use crate::frame::Frames;
use crate::lock::{LockLevel, RawSpinGuard};
use crate::memmap::PageKind;
use crate::mm_struct::Mm;
use crate::pgtable::entry::{Pmd, Pte, PteFlags, pmd_same, pte_same};
use crate::pgtable::slot::EntrySlot;
use crate::pgtable::walk::{PmdRef, PudRef, pmd_clear_bad, pte_alloc};
use crate::physmem::PhysMem;
use crate::ptdesc::{PtLevel, Ptdesc, page_ptdesc};
use crate::ptlock::PtLock;

/// A held page-table lock (`spinlock_t *` after `spin_lock`).
pub type PtlGuard<'a> = RawSpinGuard<'a>;

/// A page-table lock, not taken (`spinlock_t *`), with the level of the lock
/// order it is taken at. Equality is identity.
#[derive(Clone, Copy)]
pub struct PtlRef<'a> {
    lock: &'a PtLock,
    level: LockLevel,
}

impl<'a> PtlRef<'a> {
    pub(crate) fn new(lock: &'a PtLock, level: LockLevel) -> Self {
        Self { lock, level }
    }
    /// `spin_lock(ptl)`.
    #[track_caller]
    pub fn lock(self) -> PtlGuard<'a> {
        self.lock.lock(self.level)
    }
    /// `spin_lock_nested(ptl)`: a second lock of the same level.
    #[track_caller]
    pub fn lock_nested(self) -> PtlGuard<'a> {
        self.lock.lock_nested(self.level)
    }
    /// The lock itself.
    pub fn raw(self) -> &'a PtLock {
        self.lock
    }
    /// The level it is taken at.
    pub fn level(self) -> LockLevel {
        self.level
    }
    /// Whether `guard` holds this lock.
    pub fn is_held_by(self, guard: &PtlGuard<'_>) -> bool {
        core::ptr::eq(self.lock, guard.lock())
    }
}

impl PartialEq for PtlRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        core::ptr::eq(self.lock, other.lock)
    }
}
impl Eq for PtlRef<'_> {}

impl fmt::Debug for PtlRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PtlRef({:p} {}, {:?})", self.lock, self.lock.class().name(), self.level)
    }
}

/// Linux `pte_lockptr(mm, pmdval)`: the lock of the PTE table `pmdval` points
/// to (or `mm.page_table_lock` without split PTE locks). Prefer the lock a
/// map helper hands out ([`PteMapNolock::ptl`]), which cannot outlive the
/// mapping.
///
/// # Safety
///
/// `pmdval` is a PTE-table pointer, and the table stays attached or alive
/// while the returned reference is used: the caller holds the lock of the
/// PMD entry it read `pmdval` from (the table cannot be detached without
/// it), or is inside a read-side section that began before it read
/// `pmdval` (a detached table, and with `debug-ptlock` its allocated lock,
/// is freed only after that section ends) and does not use the reference
/// after leaving it.
pub unsafe fn pte_lockptr<'a>(mm: &'a Mm<'_>, pmdval: Pmd) -> PtlRef<'a> {
    if USE_SPLIT_PTE_PTLOCKS && !mm.is_init_mm() {
        let pt = page_ptdesc(mm.phys(), pmdval.pfn()).expect("pte_lockptr: pmd does not point into managed memory");
        // SAFETY: the caller's contract is this function's.
        unsafe { table_ptl(mm, pt) }
    } else {
        PtlRef::new(mm.page_table_lock_raw(), LockLevel::Pte)
    }
}

/// [`pte_lockptr`] for a PTE table whose descriptor the caller already
/// holds (the map helpers found it validating the PMD value), so the fault
/// path looks the table's frame up in the memmap once, not twice.
///
/// # Safety
///
/// As [`pte_lockptr`]'s, for the table `pt` describes.
unsafe fn table_ptl<'a>(mm: &'a Mm<'_>, pt: Ptdesc<'a>) -> PtlRef<'a> {
    if USE_SPLIT_PTE_PTLOCKS && !mm.is_init_mm() {
        debug_assert_eq!(pt.level(), Some(PtLevel::Pte), "pte_lockptr: pmd does not point to a PTE table");
        PtlRef::new(pt.ptlock_ptr(), LockLevel::Pte)
    } else {
        PtlRef::new(mm.page_table_lock_raw(), LockLevel::Pte)
    }
}

/// Linux `pmd_lockptr`: the lock of the PMD table containing `pmd` (found by
/// rounding the entry's address down to its table), or `mm.page_table_lock`
/// without split PMD locks.
pub fn pmd_lockptr<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>) -> PtlRef<'a> {
    if USE_SPLIT_PMD_PTLOCKS && !mm.is_init_mm() {
        let pt = page_ptdesc(mm.phys(), pmd.table_pa().pfn()).expect("pmd_lockptr: entry outside managed memory");
        debug_assert_eq!(pt.level(), Some(PtLevel::Pmd), "pmd_lockptr: entry is not in a PMD table");
        PtlRef::new(pt.ptlock_ptr(), LockLevel::Pmd)
    } else {
        PtlRef::new(mm.page_table_lock_raw(), LockLevel::Pmd)
    }
}

/// Linux `pmd_lock`: takes the PMD table lock and returns it taken.
#[track_caller]
pub fn pmd_lock<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>) -> PtlGuard<'a> {
    pmd_lockptr(mm, pmd).lock()
}

/// Linux `pud_lockptr`: PUD entries have no split lock.
pub fn pud_lockptr<'a>(mm: &'a Mm<'_>, _pud: PudRef<'_>) -> PtlRef<'a> {
    mm.page_table_lock()
}

/// Linux `pud_lock`.
#[track_caller]
pub fn pud_lock<'a>(mm: &'a Mm<'_>, pud: PudRef<'_>) -> PtlGuard<'a> {
    pud_lockptr(mm, pud).lock()
}

/// The entry a hugetlb page is mapped by: a PMD entry (2 MiB) or a PUD entry
/// (1 GiB). Linux passes either as a `pte_t *`.
#[derive(Clone, Copy, Debug)]
pub enum HugePte<'a> {
    /// A 2 MiB page's PMD entry.
    Pmd(PmdRef<'a>),
    /// A 1 GiB page's PUD entry.
    Pud(PudRef<'a>),
}

/// Linux `huge_pte_lockptr`: pages of 1 GiB and up use `mm.page_table_lock`
/// (no split lock at PUD level); pages of 2 MiB use the PMD split lock.
pub fn huge_pte_lockptr<'a>(mm: &'a Mm<'_>, size: u64, pte: HugePte<'_>) -> PtlRef<'a> {
    if size >= PUD_SIZE {
        mm.page_table_lock()
    } else if size >= PMD_SIZE {
        match pte {
            HugePte::Pmd(pmd) => pmd_lockptr(mm, pmd),
            HugePte::Pud(_) => panic!("huge_pte_lockptr: a {size:#x}-byte page is mapped by a PMD entry"),
        }
    } else {
        panic!("huge_pte_lockptr: {size:#x} is not a huge page size")
    }
}

/// Linux `huge_pte_lock`: takes [`huge_pte_lockptr`].
#[track_caller]
pub fn huge_pte_lock<'a>(mm: &'a Mm<'_>, size: u64, pte: HugePte<'_>) -> PtlGuard<'a> {
    huge_pte_lockptr(mm, size, pte).lock()
}

/// A read-side critical section (Linux `rcu_read_lock`), entered through the
/// HAL and left on drop (`rcu_read_unlock`). Borrows tied to it (a VMA from
/// [`crate::vma_lock::lock_vma_under_rcu`]) cannot outlive the section.
#[must_use = "dropping it leaves the read-side section at once"]
pub struct RcuReadGuard {
    _not_send: PhantomData<*const ()>,
}

impl RcuReadGuard {
    /// Enters a section (nests).
    pub fn new() -> Self {
        crate::hal::rcu_read_lock();
        Self { _not_send: PhantomData }
    }
}

impl Default for RcuReadGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RcuReadGuard {
    fn drop(&mut self) {
        crate::hal::rcu_read_unlock();
    }
}

/// A mapped PTE (Linux: the `pte_t *` from `pte_offset_map`): the entry for
/// one address in a PTE table, inside a read-side critical section.
/// Lockless reads only. Dropping it is [`pte_unmap`].
pub struct PteMap<'a> {
    phys: &'a PhysMem,
    table: PhysAddr,
    /// The table's descriptor, as `map_pte` validated it.
    ptdesc: Ptdesc<'a>,
    addr: VirtAddr,
    pmdval: Pmd,
    _rcu: RcuReadGuard,
}

impl<'a> PteMap<'a> {
    fn slot_at(&self, addr: VirtAddr) -> EntrySlot<'a> {
        assert_eq!(
            addr.as_u64() >> PMD_SHIFT,
            self.addr.as_u64() >> PMD_SHIFT,
            "address outside this PTE table's span"
        );
        // SAFETY: `map_pte` made this map only for a PMD whose frame the
        // memmap describes as a PTE table, so the table is managed RAM, which
        // the window maps; the map's RCU read section keeps it from being
        // freed (tables are freed a grace period after they are detached);
        // the entry is 8-byte aligned and inside it (index < 512); entries
        // are only accessed atomically. So the memmap lookup of
        // `PhysMem::slot` would only repeat `map_pte`'s check, on every PTE
        // access of every fault and zap.
        unsafe { self.phys.slot_unchecked(self.table.add(8 * addr.pte_index() as u64)) }
    }
    /// Linux `ptep_get`: the mapped entry (lockless).
    pub fn ptep_get(&self) -> Pte {
        self.get_at(self.addr)
    }
    /// Another entry of the same table (`addr` in the same 2 MiB span).
    pub fn get_at(&self, addr: VirtAddr) -> Pte {
        Pte::from_raw(self.slot_at(addr).load(Acquire))
    }
    /// The address the map was made for.
    pub fn addr(&self) -> VirtAddr {
        self.addr
    }
    /// The PMD value the map was made from.
    pub fn pmdval(&self) -> Pmd {
        self.pmdval
    }
    /// The mapped PTE table's physical address.
    pub fn table_pa(&self) -> PhysAddr {
        self.table
    }
    /// The PTE's physical address.
    pub fn pte_pa(&self) -> PhysAddr {
        self.table.add(8 * self.addr.pte_index() as u64)
    }
}

impl fmt::Debug for PteMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PteMap({:?} in table {:?})", self.addr, self.table)
    }
}

/// Linux `___pte_offset_map`: validates the PMD and maps the PTE, or returns
/// `None` (leaving the read-side section) when the PMD is none, not present
/// (a swap-like entry), huge, or bad; a bad PMD (including one pointing at
/// anything but a PTE table we manage) is reported and cleared.
fn map_pte<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr) -> Option<PteMap<'a>> {
    let rcu = RcuReadGuard::new();
    let pmdval = pmd.get();
    if pmdval.is_none() || !pmdval.is_present() || pmdval.is_huge() {
        return None;
    }
    let ptdesc = match page_ptdesc(mm.phys(), pmdval.pfn()) {
        Some(pt)
            if !pmdval.is_bad()
                && pt.page().kind() == PageKind::PageTable
                && pt.page().pt_level.load(Acquire) == PtLevel::Pte as u8 =>
        {
            pt
        }
        // A table we do not manage: in a user address space that can only be
        // corruption; the kernel's may hold the bootloader's tables, which
        // we cannot map but must not destroy.
        None if mm.is_init_mm() && !pmdval.is_bad() => {
            log::error!("mm: init_mm {pmdval} at {:?} points outside managed memory", pmd.pa());
            return None;
        }
        _ => {
            pmd_clear_bad(pmd, pmdval);
            return None;
        }
    };
    Some(PteMap { phys: mm.phys(), table: pmdval.phys(), ptdesc, addr, pmdval, _rcu: rcu })
}

/// Linux `pte_offset_map`: maps the PTE for `addr` without locking. `None`
/// if there is no PTE table (PMD none, huge, or bad: bad is reported and
/// cleared).
pub fn pte_offset_map<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr) -> Option<PteMap<'a>> {
    map_pte(mm, pmd, addr)
}

/// Typestate: the table may only be read under the lock.
pub enum Ro {}
/// Typestate: the table may be written under the lock.
pub enum Rw {}

/// A mapped PTE with its table's lock, not taken (Linux: the `pte_t *` and
/// `spinlock_t *` from `pte_offset_map_{ro,rw}_nolock`).
pub struct PteMapNolock<'a, M> {
    map: PteMap<'a>,
    ptl: PtlRef<'a>,
    _mode: PhantomData<M>,
}

impl<'a, M> PteMapNolock<'a, M> {
    /// The mapping.
    pub fn map(&self) -> &PteMap<'a> {
        &self.map
    }
    /// The PTE table's lock (right for this table even if the PMD changes).
    /// Borrowed from the mapping: the read-side section that keeps the table
    /// (and its lock) alive lasts as long as the mapping.
    pub fn ptl(&self) -> PtlRef<'_> {
        self.ptl
    }
    /// Linux `ptep_get`.
    pub fn ptep_get(&self) -> Pte {
        self.map.ptep_get()
    }
}

impl<'a> PteMapNolock<'a, Ro> {
    /// Takes the lock for read-only use of the table. No PMD check is needed:
    /// the read-side section keeps the table alive even if it was detached.
    #[track_caller]
    pub fn lock(self) -> PteGuard<'a, Ro> {
        let ptl = self.ptl.lock();
        PteGuard { ptl, map: self.map, _mode: PhantomData }
    }
}

impl<'a> PteMapNolock<'a, Rw> {
    /// Takes the lock and checks `pmd_same(*pmd, pmdval)`: the table is still
    /// the one `pmd` points to, so writes under the lock are safe. `None`
    /// (lock dropped, unmapped) if the PMD changed: the caller retries.
    #[track_caller]
    pub fn lock_if_pmd_same(self, pmd: PmdRef<'_>) -> Option<PteGuard<'a, Rw>> {
        let ptl = self.ptl.lock();
        if pmd_same(self.map.pmdval, pmd.get()) {
            Some(PteGuard { ptl, map: self.map, _mode: PhantomData })
        } else {
            None
        }
    }
    /// As [`PteMapNolock::lock_if_pmd_same`], taking the lock as the *second*
    /// PTE lock of this CPU (Linux `spin_lock_nested(ptl,
    /// SINGLE_DEPTH_NESTING)`): fork holds the child's table lock and takes
    /// the parent's, mremap holds the old table's and takes the new one's.
    /// If both are one lock (split locks off: each address space's
    /// `page_table_lock`, or two tables of one address space), the caller
    /// must not call this: it already holds the lock.
    #[track_caller]
    pub fn lock_nested_if_pmd_same(self, pmd: PmdRef<'_>) -> Option<PteGuard<'a, Rw>> {
        let ptl = self.ptl.lock_nested();
        if pmd_same(self.map.pmdval, pmd.get()) {
            Some(PteGuard { ptl, map: self.map, _mode: PhantomData })
        } else {
            None
        }
    }
    /// Takes the lock and checks `pte_same(*pte, expected)` (the other
    /// stability check the document allows). `None` if the PTE changed.
    ///
    /// `expected` must not be none: a none entry is also what every entry of
    /// a table reclaimed meanwhile reads, so `pte_same` against none proves
    /// nothing about the table still being attached (Linux never makes that
    /// check). Use [`PteMapNolock::lock_if_pmd_same`] to install into an
    /// empty entry.
    #[track_caller]
    pub fn lock_if_pte_same(self, expected: Pte) -> Option<PteGuard<'a, Rw>> {
        assert!(!expected.is_none(), "lock_if_pte_same against a none entry cannot tell a detached table");
        let ptl = self.ptl.lock();
        if pte_same(self.map.ptep_get(), expected) {
            Some(PteGuard { ptl, map: self.map, _mode: PhantomData })
        } else {
            None
        }
    }
}

impl<M> fmt::Debug for PteMapNolock<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PteMapNolock({:?}, {:?})", self.map, self.ptl)
    }
}

/// Linux `pte_offset_map_ro_nolock`: maps the PTE and returns its table's
/// lock, not taken, for read-only use. `None` if there is no PTE table.
pub fn pte_offset_map_ro_nolock<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr) -> Option<PteMapNolock<'a, Ro>> {
    let map = map_pte(mm, pmd, addr)?;
    // SAFETY: `map` validated the table inside its read-side section, which
    // the returned mapping owns; the lock is handed out only borrowed from
    // it (`PteMapNolock::ptl`).
    let ptl = unsafe { table_ptl(mm, map.ptdesc) };
    Some(PteMapNolock { map, ptl, _mode: PhantomData })
}

/// Linux `pte_offset_map_rw_nolock`: as the read-only variant, plus the PMD
/// value seen, which the caller must check with `pmd_same` after taking the
/// lock and before writing (or use [`PteMapNolock::lock_if_pmd_same`]).
pub fn pte_offset_map_rw_nolock<'a>(
    mm: &'a Mm<'_>,
    pmd: PmdRef<'_>,
    addr: VirtAddr,
) -> Option<(PteMapNolock<'a, Rw>, Pmd)> {
    let map = map_pte(mm, pmd, addr)?;
    let pmdval = map.pmdval;
    // SAFETY: as in `pte_offset_map_ro_nolock`.
    let ptl = unsafe { table_ptl(mm, map.ptdesc) };
    Some((PteMapNolock { map, ptl, _mode: PhantomData }, pmdval))
}

/// A mapped PTE with its table's lock held (Linux: `pte_t *` + taken
/// `spinlock_t *`). The lock is the proof for writes: `set_pte` needs nothing
/// else. Dropping it is [`pte_unmap_unlock`]: unlock, then unmap.
pub struct PteGuard<'a, M = Rw> {
    // Field order is drop order: the lock is released before the read-side
    // section ends, as in Linux's pte_unmap_unlock.
    ptl: PtlGuard<'a>,
    map: PteMap<'a>,
    _mode: PhantomData<M>,
}

impl<'a, M> PteGuard<'a, M> {
    /// Linux `ptep_get`: the locked entry.
    pub fn ptep_get(&self) -> Pte {
        self.map.ptep_get()
    }
    /// Another entry of the same table (same 2 MiB span).
    pub fn get_at(&self, addr: VirtAddr) -> Pte {
        self.map.get_at(addr)
    }
    /// The mapping.
    pub fn map(&self) -> &PteMap<'a> {
        &self.map
    }
    /// The held lock.
    pub fn ptl(&self) -> &PtlGuard<'a> {
        &self.ptl
    }
    /// The address mapped.
    pub fn addr(&self) -> VirtAddr {
        self.map.addr
    }
    /// The PMD value the table was reached through. For a [`Rw`] guard
    /// (from [`pte_offset_map_lock`] or [`PteMapNolock::lock_if_pmd_same`])
    /// it is still current: the PMD was re-checked under this lock, and
    /// nobody detaches the table without it. A [`Ro`] guard from
    /// [`pte_offset_map_ro_nolock`] was not re-checked: the table may have
    /// been detached meanwhile (the read-side section keeps it readable).
    pub fn pmdval(&self) -> Pmd {
        self.map.pmdval
    }
}

impl<'a> PteGuard<'a, Rw> {
    /// Linux `set_pte`: writes the locked entry.
    pub fn set_pte(&mut self, pte: Pte) {
        self.set_pte_at(self.map.addr, pte);
    }
    /// Maps `frame` at the locked entry with `flags` (Linux `set_pte_at` of
    /// `mk_pte(page)` after `folio_add_new_anon_rmap`): the entry owns the
    /// frame from now on, and the zap that clears the entry gathers it.
    pub fn install(&mut self, frame: Frames<'_>, flags: PteFlags) {
        debug_assert_eq!(frame.order(), 0, "a PTE maps one 4 KiB frame");
        self.set_pte(Pte::new(frame.phys_addr(), flags));
        let _owned_by_the_entry = frame.into_raw();
    }
    /// Linux `set_pte_at`: writes another entry of the locked table.
    pub fn set_pte_at(&mut self, addr: VirtAddr, pte: Pte) {
        self.map.slot_at(addr).store(pte.raw(), Release);
    }
    /// Linux `ptep_get_and_clear`: clears an entry and returns what it held
    /// (atomically: the CPU may set accessed/dirty concurrently).
    pub fn ptep_get_and_clear(&mut self, addr: VirtAddr) -> Pte {
        Pte::from_raw(self.map.slot_at(addr).swap(0, Release))
    }
    /// Writes an entry of *another* PTE table whose lock is this guard's
    /// lock too (two tables under one `page_table_lock` when split locks are
    /// off, or the same table mapped twice): `other` must be that table's
    /// mapping; `false` (nothing written) if its PMD changed since it was
    /// mapped. mremap's `move_ptes` when both tables share a lock.
    pub fn set_pte_in_table_under_this_lock(
        &mut self,
        other: &PteMapNolock<'_, Rw>,
        pmd: PmdRef<'_>,
        addr: VirtAddr,
        pte: Pte,
    ) -> bool {
        assert!(other.ptl().is_held_by(&self.ptl), "the other table's lock is not this guard's");
        if !pmd_same(other.map.pmdval, pmd.get()) {
            return false;
        }
        other.map.slot_at(addr).store(pte.raw(), Release);
        true
    }
    /// Linux `ptep_set_wrprotect`: clears the writable bit of an entry
    /// atomically (the CPU may set accessed/dirty meanwhile); returns the
    /// entry as it was.
    pub fn ptep_set_wrprotect(&mut self, addr: VirtAddr) -> Pte {
        Pte::from_raw(self.map.slot_at(addr).fetch_and(!PteFlags::WRITABLE.bits(), Release))
    }
    /// Linux `pte_clear`.
    pub fn pte_clear(&mut self, addr: VirtAddr) {
        self.set_pte_at(addr, Pte::NONE);
    }
}

impl<M> fmt::Debug for PteGuard<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PteGuard({:?}, {:?})", self.map, self.ptl)
    }
}

/// Linux `__pte_offset_map_lock`: maps the PTE, takes its table's lock, then
/// re-reads the PMD; if the PMD changed between mapping and locking (the table
/// was replaced, removed or turned huge) it unlocks, unmaps and tries again.
/// `None` if there is no PTE table.
#[track_caller]
pub fn pte_offset_map_lock<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr) -> Option<PteGuard<'a, Rw>> {
    loop {
        let map = map_pte(mm, pmd, addr)?;
        // SAFETY: `map` validated the PMD value as a PTE table inside its
        // read-side section; the guard holding the lock owns `map`, and drops
        // the lock before it.
        let ptl = unsafe { table_ptl(mm, map.ptdesc) }.lock();
        if pmd_same(map.pmdval, pmd.get()) {
            return Some(PteGuard { ptl, map, _mode: PhantomData });
        }
        // The PMD moved on: drop the lock, then the map, and retry.
        drop(ptl);
        drop(map);
    }
}

/// Linux `pte_alloc_map_lock`: allocates the PTE table if needed
/// ([`pte_alloc`]), then [`pte_offset_map_lock`]. `None` if allocation failed
/// (or the PMD became huge meanwhile).
#[track_caller]
pub fn pte_alloc_map_lock<'a>(mm: &'a Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr) -> Option<PteGuard<'a, Rw>> {
    pte_alloc(mm, pmd).ok()?;
    pte_offset_map_lock(mm, pmd, addr)
}

mod sealed {
    pub trait Sealed {}
}

/// Things [`pte_unmap`] ends: any mapping made by a `pte_offset_map*` helper.
pub trait PteMapping: sealed::Sealed {}
impl sealed::Sealed for PteMap<'_> {}
impl PteMapping for PteMap<'_> {}
impl<M> sealed::Sealed for PteMapNolock<'_, M> {}
impl<M> PteMapping for PteMapNolock<'_, M> {}

/// Linux `pte_unmap`: ends the mapping and its read-side section.
pub fn pte_unmap<T: PteMapping>(map: T) {
    drop(map);
}

/// Linux `pte_unmap_unlock`: unlocks, then unmaps.
pub fn pte_unmap_unlock<M>(guard: PteGuard<'_, M>) {
    drop(guard);
}

#[cfg(all(test, not(loom)))]
#[path = "helpers_tests.rs"]
mod tests;
