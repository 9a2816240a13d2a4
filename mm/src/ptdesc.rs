//! `Ptdesc`: the page descriptor of a page-table page, and the constructors and
//! destructor every page-table allocation and free goes through.
//!
//! A page-table page is allocated as a whole frame from the frame allocator,
//! never from the heap or a slab: the descriptor word that holds `ptl` is the
//! word a slab would use for itself (`slab_cache`).
//!
//! Ownership is in the types: [`PtPage`] is a table nobody else can reach yet
//! (fresh from [`pagetable_alloc`]) or any more (detached and past its grace
//! period). Only through `&mut PtPage` can the lock be constructed or destroyed,
//! and dropping a `PtPage` runs [`pagetable_dtor`] and frees the frame, so the
//! destructor runs on every freeing path by construction, together with the
//! free (never earlier: the lock must outlive every walker that may take it).
//! Publishing a table (`pmd_populate` ...) consumes the `PtPage`.

use core::fmt;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{Pfn, PhysAddr};
use crate::config::{USE_SPLIT_PMD_PTLOCKS, USE_SPLIT_PTE_PTLOCKS};
use crate::frame::Frames;
use crate::lock::LockClass;
use crate::memmap::{PG_PTL, Page, PageKind};
use crate::mm_struct::Mm;
use crate::physmem::PhysMem;
use crate::ptlock::{AllocError, PtLock, Ptl, PtlRepr, PtlStorage};

/// Which level a page-table page serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PtLevel {
    /// A PTE table (maps 4 KiB pages).
    Pte = 1,
    /// A PMD table.
    Pmd = 2,
    /// A PUD table.
    Pud = 3,
    /// A PGD (PML4).
    Pgd = 4,
}

/// The descriptor of a page-table page (Linux `struct ptdesc *`): a view, not
/// an owner.
#[derive(Clone, Copy)]
pub struct Ptdesc<'p> {
    page: &'p Page,
    pfn: Pfn,
}

impl<'p> Ptdesc<'p> {
    /// The table's frame.
    pub fn pfn(self) -> Pfn {
        self.pfn
    }
    /// The table's physical address.
    pub fn phys(self) -> PhysAddr {
        self.pfn.phys()
    }
    /// The underlying page descriptor.
    pub fn page(self) -> &'p Page {
        self.page
    }
    /// The level the constructor recorded (None before construction).
    pub fn level(self) -> Option<PtLevel> {
        match self.page.pt_level.load(Relaxed) {
            1 => Some(PtLevel::Pte),
            2 => Some(PtLevel::Pmd),
            3 => Some(PtLevel::Pud),
            4 => Some(PtLevel::Pgd),
            _ => None,
        }
    }
    /// Whether a split lock was constructed for this table.
    pub fn has_ptl(self) -> bool {
        self.page.has_flag(PG_PTL)
    }

    /// Linux `ptlock_ptr`: the table's split lock.
    ///
    /// Panics if no lock was constructed (not a page table, a kernel table, or
    /// split locks off for its level): reading the word then would interpret
    /// another kind's data as a lock.
    pub(crate) fn ptlock_ptr(self) -> &'p PtLock {
        assert!(self.has_ptl(), "no split lock on table {:?}", self.pfn);
        debug_assert_eq!(self.page.kind(), PageKind::PageTable, "ptl of a page that is not a page table");
        // SAFETY: PG_PTL says `init` constructed the lock and `dtor` has not
        // freed it; a published table's lock lives until the table is freed,
        // which happens only once no walker can reach it.
        unsafe { Ptl::get(ptl_slot(self.page)) }
    }
}

impl fmt::Debug for Ptdesc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ptdesc({:?}, {:?}, ptl: {})", self.pfn, self.level(), self.has_ptl())
    }
}

fn ptl_slot(page: &Page) -> *mut PtlStorage {
    let w = page.word.get();
    // SAFETY: `w` points to the live `PageWord` of `page`; taking a field's
    // address reads nothing. ManuallyDrop<T> has T's layout.
    unsafe { (&raw mut (*w).ptl).cast::<PtlStorage>() }
}

/// The descriptor of the table at `pfn` (Linux `page_ptdesc(pfn_to_page())`),
/// or `None` if the frame is not managed RAM.
pub fn page_ptdesc(phys: &PhysMem, pfn: Pfn) -> Option<Ptdesc<'_>> {
    Some(Ptdesc { page: phys.page(pfn)?, pfn })
}

/// Linux `virt_to_ptdesc`: the descriptor of the table at a direct-map address.
pub fn virt_to_ptdesc(phys: &PhysMem, va: *const u8) -> Option<Ptdesc<'_>> {
    page_ptdesc(phys, phys.window().phys(va).pfn())
}

/// A page-table page we own: unpublished, or detached and unreachable. Drop
/// runs [`pagetable_dtor`] and frees the frame.
#[must_use = "dropping a PtPage frees the table"]
pub struct PtPage<'p> {
    phys: &'p PhysMem,
    pt: Ptdesc<'p>,
}

impl<'p> PtPage<'p> {
    /// The table's descriptor.
    pub fn ptdesc(&self) -> Ptdesc<'p> {
        self.pt
    }
    /// The table's physical address.
    pub fn phys_addr(&self) -> PhysAddr {
        self.pt.phys()
    }
    /// Writes entry `index` of a table nobody else can reach yet (filling
    /// the PTE table a huge PMD is split into, before publishing it).
    pub(crate) fn init_entry(&mut self, index: usize, raw: u64) {
        assert!(index < crate::addr::PTRS_PER_TABLE);
        let slot = self.phys.slot(self.phys_addr().add(8 * index as u64)).expect("own table is managed");
        slot.store(raw, Relaxed);
    }
    /// Gives up ownership because the table is now reachable from an entry.
    pub(crate) fn publish(self) -> Ptdesc<'p> {
        let pt = self.pt;
        core::mem::forget(self);
        pt
    }
    /// Takes back ownership of a published table in order to free it.
    ///
    /// # Safety
    ///
    /// No entry points to the table any more and no walker can still be using
    /// it or its lock (every read-side critical section that could have seen
    /// it has ended), and ownership is not taken twice.
    pub unsafe fn from_published(phys: &'p PhysMem, pt: Ptdesc<'p>) -> Self {
        Self { phys, pt }
    }
}

impl Drop for PtPage<'_> {
    fn drop(&mut self) {
        pagetable_dtor(self);
        // SAFETY: we own the frame (PtPage's invariant) and are destroying it.
        drop(unsafe { Frames::from_raw(self.phys, self.pt.pfn, 0) });
    }
}

impl fmt::Debug for PtPage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PtPage({:?})", self.pt)
    }
}

/// Linux `pagetable_alloc`: one zeroed frame for a table, not yet constructed.
pub fn pagetable_alloc(phys: &PhysMem) -> Option<PtPage<'_>> {
    let (pfn, _) = phys.alloc_pages_zeroed(0)?.into_raw();
    let page = phys.page(pfn).expect("allocated frame outside memmap");
    Some(PtPage { phys, pt: Ptdesc { page, pfn } })
}

/// Linux `pagetable_free`: destroys (if still constructed) and frees a table.
pub fn pagetable_free(table: PtPage<'_>) {
    drop(table);
}

/// Linux `__pagetable_ctor`: marks the frame as a page table of `level`.
pub(crate) fn pagetable_ctor(table: &mut PtPage<'_>, level: PtLevel) {
    table.pt.page.set_kind(PageKind::PageTable);
    table.pt.page.pt_level.store(level as u8, Relaxed);
}

fn ctor_with_lock(
    mm: &Mm<'_>,
    table: &mut PtPage<'_>,
    level: PtLevel,
    split: bool,
    class: LockClass,
) -> Result<(), AllocError> {
    debug_assert!(core::ptr::eq(mm.phys(), table.phys), "table from another PhysMem");
    if table.phys.fault_inject().ctor_should_fail() {
        return Err(AllocError);
    }
    // Kernel page tables get no split lock (Linux: `mm != &init_mm`).
    if split && !mm.is_init_mm() {
        let page = table.pt.page;
        assert!(!page.has_flag(PG_PTL), "ctor on a table that already has a lock");
        // SAFETY: `&mut PtPage` means nobody else can reach this table or its
        // descriptor word, and PG_PTL is clear, so no lock lives there.
        unsafe { Ptl::init(ptl_slot(page), class)? };
        if <Ptl as PtlRepr>::ALLOCATES {
            table.phys.ptl_live.fetch_add(1, Relaxed);
        }
        page.set_flag(PG_PTL);
    }
    pagetable_ctor(table, level);
    Ok(())
}

/// Linux `pagetable_pte_ctor`: prepares a PTE table, constructing its split
/// lock (allocating it when `ptl` is a pointer). Fails when that allocation
/// fails (or a failure is injected); the caller then frees the table.
pub fn pagetable_pte_ctor(mm: &Mm<'_>, table: &mut PtPage<'_>) -> Result<(), AllocError> {
    ctor_with_lock(mm, table, PtLevel::Pte, USE_SPLIT_PTE_PTLOCKS, LockClass::PteLock)
}

/// Linux `pagetable_pmd_ctor`: as [`pagetable_pte_ctor`] for a PMD table;
/// also empties its list of deposited PTE tables (Linux `pmd_huge_pte`).
pub fn pagetable_pmd_ctor(mm: &Mm<'_>, table: &mut PtPage<'_>) -> Result<(), AllocError> {
    ctor_with_lock(mm, table, PtLevel::Pmd, USE_SPLIT_PMD_PTLOCKS, LockClass::PmdLock)?;
    table.pt.page.link.store(0, Relaxed);
    Ok(())
}

/// Linux `pagetable_dtor`: destroys the split lock (freeing it if allocated)
/// and clears the page-table mark. Idempotent; also run by dropping the
/// `PtPage`.
pub fn pagetable_dtor(table: &mut PtPage<'_>) {
    let page = table.pt.page;
    if page.has_flag(PG_PTL) {
        // SAFETY: `&mut PtPage` means the table is unreachable, so nobody holds
        // or will take the lock; PG_PTL says it is constructed.
        unsafe { Ptl::free(ptl_slot(page)) };
        if <Ptl as PtlRepr>::ALLOCATES {
            table.phys.ptl_live.fetch_sub(1, Relaxed);
        }
        page.clear_flag(PG_PTL);
    }
    if page.kind() == PageKind::PageTable {
        page.set_kind(PageKind::Kernel);
        page.pt_level.store(0, Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::testing::TestMachine;

    #[test]
    fn ctor_and_dtor_manage_kind_level_and_lock() {
        let m = TestMachine::new();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        let before = m.phys.nr_free_pages();
        let mut t = pagetable_alloc(&m.phys).unwrap();
        assert_eq!(t.ptdesc().page().kind(), PageKind::Kernel);
        assert_eq!(t.ptdesc().level(), None);
        pagetable_pte_ctor(&mm, &mut t).unwrap();
        let pt = t.ptdesc();
        assert_eq!((pt.page().kind(), pt.level()), (PageKind::PageTable, Some(PtLevel::Pte)));
        assert_eq!(pt.has_ptl(), USE_SPLIT_PTE_PTLOCKS);
        if USE_SPLIT_PTE_PTLOCKS {
            let l = pt.ptlock_ptr();
            assert_eq!(l.class(), LockClass::PteLock);
            assert!(!l.is_locked());
            assert_eq!(m.phys.nr_allocated_ptlocks(), u64::from(crate::ALLOC_SPLIT_PTLOCKS));
        }
        pagetable_dtor(&mut t);
        assert!(!pt.has_ptl());
        assert_eq!(pt.page().kind(), PageKind::Kernel);
        assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
        pagetable_dtor(&mut t); // idempotent
        pagetable_free(t);
        assert_eq!(m.phys.nr_free_pages(), before);

        // Dropping a constructed table runs the dtor on the way out.
        let mut t = pagetable_alloc(&m.phys).unwrap();
        pagetable_pmd_ctor(&mm, &mut t).unwrap();
        assert_eq!(t.ptdesc().has_ptl(), USE_SPLIT_PMD_PTLOCKS);
        if USE_SPLIT_PMD_PTLOCKS {
            assert_eq!(t.ptdesc().ptlock_ptr().class(), LockClass::PmdLock);
        }
        drop(t);
        assert_eq!(m.phys.nr_free_pages(), before);
        assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
    }

    #[test]
    fn injected_ctor_failure_leaves_the_table_unconstructed() {
        let m = TestMachine::new();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        let before = m.phys.nr_free_pages();
        let mut t = pagetable_alloc(&m.phys).unwrap();
        m.phys.fault_inject().fail_nth_ctor(1);
        assert_eq!(pagetable_pte_ctor(&mm, &mut t), Err(AllocError));
        assert!(!t.ptdesc().has_ptl());
        assert_ne!(t.ptdesc().page().kind(), PageKind::PageTable);
        drop(t);
        assert_eq!(m.phys.nr_free_pages(), before);
    }

    #[test]
    #[should_panic(expected = "no split lock")]
    fn ptl_of_an_unconstructed_table_is_refused() {
        let m = TestMachine::new();
        let t = pagetable_alloc(&m.phys).unwrap();
        let _ = t.ptdesc().ptlock_ptr();
    }

    #[test]
    fn virt_and_pfn_lookups_agree() {
        let m = TestMachine::new();
        let t = pagetable_alloc(&m.phys).unwrap();
        let va = m.phys.window().virt(t.phys_addr());
        let a = virt_to_ptdesc(&m.phys, va).unwrap();
        let b = page_ptdesc(&m.phys, t.ptdesc().pfn()).unwrap();
        assert!(core::ptr::eq(a.page(), b.page()));
        assert_eq!(a.phys(), t.phys_addr());
    }
}
