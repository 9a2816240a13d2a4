//! `Mm`, the address space (Linux `struct mm_struct`).
//!
//! # Locks
//!
//! * `page_table_lock` protects the PGD, (folded) P4D and PUD entries of this
//!   address space, 1 GiB hugetlb entries, and, when split locks are off, the
//!   PMD and PTE entries too. It sits after the address-space (VMA) lock and
//!   before every PMD and PTE lock (see [`crate::lock`]).
//! * `mmap_lock` (a fair reader-writer spinlock, level 1, before
//!   `page_table_lock`) protects the VMA set: faults hold it shared,
//!   `mmap`/`munmap`/`mprotect` exclusive. Page tables are detached only
//!   under the exclusive lock, so a fault holding it shared may walk PUD and
//!   PMD tables without further locks; PTE tables are still reached through
//!   `pte_offset_map*`, which may fail and make the fault retry.
//! * `cpu_bitmap` (atomic, no lock) records the CPUs that may cache this
//!   address space's translations; shoot-downs go to them.
//! * The counters are per-CPU sharded atomics (no lock).
//! * `pmd_huge_pte` (without split PMD locks only) is the head of the
//!   deposited PTE tables, under `page_table_lock` (with split PMD locks each
//!   PMD table keeps its own head, under its own lock).
//!
//! Each user `Mm` owns a PGD frame whose upper half (slots 256..512) is a copy
//! of the kernel's PML4, made once at creation: kernel mappings live in
//! tables shared by all address spaces and never change after boot. Dropping
//! an `Mm` frees every user page table it owns (each through
//! `pagetable_dtor`), after unmapping every VMA (Linux `exit_mmap`): all
//! anonymous frames, huge frames and deposited tables go back, and the
//! free-frame count returns to where it was before the `Mm` was created.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{KERNEL_PGD_BOUNDARY, PTRS_PER_TABLE, PhysAddr};
use crate::counters::{MmCounters, MmStats};
use crate::lock::{LockClass, LockLevel, RwReadGuard, RwSpinLock};
use crate::pgtable::entry::{Pgd, Pmd, Pud};
use crate::physmem::PhysMem;
use crate::ptdesc::{PtLevel, PtPage, page_ptdesc, pagetable_alloc, pagetable_ctor};
use crate::ptlock::PtLock;
use crate::tlb::{CpuBitmap, MmuGather};
use crate::vma::{Vma, VmaSet};
use crate::vma_lock::VmaLookup;
use crate::{PtlGuard, PtlRef};

/// The kernel's own top-level table (Linux `init_mm.pgd` / `swapper_pg_dir`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPgd {
    pa: PhysAddr,
}

impl KernelPgd {
    /// Names the kernel's PML4.
    ///
    /// # Safety
    ///
    /// `pa` is the physical address of the live kernel PML4, page aligned,
    /// mapped by the direct map of every `PhysMem` it is used with, never
    /// freed, and accessed by others only atomically (the MMU, other CPUs).
    pub const unsafe fn new(pa: PhysAddr) -> Self {
        Self { pa }
    }
    /// Its physical address.
    pub fn phys(self) -> PhysAddr {
        self.pa
    }
}

/// An address space.
pub struct Mm<'p> {
    phys: &'p PhysMem,
    pgd: PhysAddr,
    init_mm: bool,
    /// Linux `mm->page_table_lock`.
    page_table_lock: PtLock,
    /// Linux `mm->mmap_lock`: the VMA set (module comment). Writers take it
    /// through [`Mm::mmap_write_lock`], which runs the per-VMA lock session.
    pub(crate) mmap_lock: RwSpinLock<VmaSet>,
    /// The published VMA array, `mm_lock_seq`, retired arrays (per-VMA locks).
    vma_lookup: VmaLookup,
    /// Linux `mm_cpumask`.
    cpu_bitmap: CpuBitmap,
    pub(crate) counters: MmCounters,
    /// Linux `mm->pmd_huge_pte`, used without split PMD locks: the first
    /// deposited PTE table (PFN + 1, 0 = none), under `page_table_lock`.
    pub(crate) pmd_huge_pte: AtomicU64,
    nr_ptes: AtomicU64,
    nr_pmds: AtomicU64,
    nr_puds: AtomicU64,
}

#[cfg(not(loom))]
impl Mm<'static> {
    /// A new user address space in the kernel's physical memory ([`crate::init`]
    /// must have run). `None` if the PGD frame cannot be allocated.
    pub fn new(kernel: KernelPgd) -> Option<Self> {
        Self::new_in(crate::phys(), kernel)
    }
}

impl<'p> Mm<'p> {
    /// A new user address space whose tables come from `phys`.
    pub fn new_in(phys: &'p PhysMem, kernel: KernelPgd) -> Option<Self> {
        let mut t = pagetable_alloc(phys)?;
        pagetable_ctor(&mut t, PtLevel::Pgd);
        for i in KERNEL_PGD_BOUNDARY..PTRS_PER_TABLE {
            // SAFETY: KernelPgd's contract: page aligned (so this slot is
            // 8-byte aligned), mapped, live, atomically accessed.
            let src = unsafe { phys.slot_unchecked(kernel.pa.add(8 * i as u64)) };
            let dst = phys.slot(t.phys_addr().add(8 * i as u64)).expect("own PGD is managed");
            // Not yet published: nobody else reads `dst`.
            dst.store(src.load(Relaxed), Relaxed);
        }
        let pgd = t.publish().phys();
        Some(Self::make(phys, pgd, false))
    }

    /// A new user address space sharing `self`'s kernel half (fork's child).
    pub fn new_child_of(&self) -> Option<Self> {
        // SAFETY: `self.pgd` is this address space's live, page-aligned PGD
        // frame of `self.phys`; its kernel half (slots 256..512) holds the
        // kernel's entries, never changed after boot, read atomically.
        let kernel = unsafe { KernelPgd::new(self.pgd) };
        Self::new_in(self.phys, kernel)
    }

    /// The kernel's address space (Linux `init_mm`) over the kernel PML4: its
    /// tables get no split locks, every helper hands out its
    /// `page_table_lock`, and dropping it frees nothing.
    pub fn new_init_mm(phys: &'p PhysMem, kernel: KernelPgd) -> Self {
        Self::make(phys, kernel.pa, true)
    }

    fn make(phys: &'p PhysMem, pgd: PhysAddr, init_mm: bool) -> Self {
        Self {
            phys,
            pgd,
            init_mm,
            page_table_lock: PtLock::new(LockClass::PageTableLock),
            mmap_lock: RwSpinLock::new(LockClass::MmapLock, VmaSet::new()),
            vma_lookup: VmaLookup::new(),
            cpu_bitmap: CpuBitmap::new(),
            counters: MmCounters::new(),
            pmd_huge_pte: AtomicU64::new(0),
            nr_ptes: AtomicU64::new(0),
            nr_pmds: AtomicU64::new(0),
            nr_puds: AtomicU64::new(0),
        }
    }

    /// The physical memory the tables come from.
    pub fn phys(&self) -> &'p PhysMem {
        self.phys
    }

    /// The PGD's physical address (what goes into CR3).
    pub fn pgd_phys(&self) -> PhysAddr {
        self.pgd
    }

    /// Whether this is the kernel's address space.
    pub fn is_init_mm(&self) -> bool {
        self.init_mm
    }

    /// `mm->page_table_lock`, not taken.
    pub fn page_table_lock(&self) -> PtlRef<'_> {
        PtlRef::new(&self.page_table_lock, LockLevel::PageTableLock)
    }

    /// `spin_lock(&mm->page_table_lock)`.
    #[track_caller]
    pub fn lock_page_table(&self) -> PtlGuard<'_> {
        self.page_table_lock.lock(LockLevel::PageTableLock)
    }

    pub(crate) fn page_table_lock_raw(&self) -> &PtLock {
        &self.page_table_lock
    }

    /// PTE tables installed (Linux `mm_pgtables_bytes` by level).
    pub fn nr_ptes(&self) -> u64 {
        self.nr_ptes.load(Relaxed)
    }
    /// PMD tables installed.
    pub fn nr_pmds(&self) -> u64 {
        self.nr_pmds.load(Relaxed)
    }
    /// PUD tables installed.
    pub fn nr_puds(&self) -> u64 {
        self.nr_puds.load(Relaxed)
    }
    pub(crate) fn inc_nr(&self, level: PtLevel) {
        match level {
            PtLevel::Pte => &self.nr_ptes,
            PtLevel::Pmd => &self.nr_pmds,
            PtLevel::Pud => &self.nr_puds,
            PtLevel::Pgd => return,
        }
        .fetch_add(1, Relaxed);
    }
    pub(crate) fn dec_nr(&self, level: PtLevel) {
        match level {
            PtLevel::Pte => &self.nr_ptes,
            PtLevel::Pmd => &self.nr_pmds,
            PtLevel::Pud => &self.nr_puds,
            PtLevel::Pgd => return,
        }
        .fetch_sub(1, Relaxed);
    }

    /// Linux `mm_cpumask`: the CPUs that may cache this address space's
    /// translations. The kernel sets a CPU's bit when it loads this address
    /// space's CR3 on that CPU; shoot-downs go to every CPU in it.
    pub fn cpu_bitmap(&self) -> &CpuBitmap {
        &self.cpu_bitmap
    }

    /// A snapshot of the RSS and fault counters.
    pub fn stats(&self) -> MmStats {
        self.counters.snapshot()
    }

    /// A snapshot of the VMA set (takes `mmap_lock` shared).
    pub fn vmas(&self) -> Vec<Vma> {
        self.mmap_lock.read().iter().copied().collect()
    }

    /// `mmap_lock`, for callers that read the VMA set across several
    /// operations (faults need not: `handle_mm_fault` locks what it needs).
    /// Writers use [`Mm::mmap_write_lock`].
    pub fn mmap_lock(&self) -> &RwSpinLock<VmaSet> {
        &self.mmap_lock
    }

    /// Linux `mmap_write_lock`: `mmap_lock` exclusive, and a per-VMA-lock
    /// write session ([`crate::vma_lock`]) that ends when the guard drops or
    /// downgrades.
    #[track_caller]
    pub fn mmap_write_lock(&self) -> MmapWriteGuard<'_, 'p> {
        let mut guard = self.mmap_lock.write();
        guard.begin_session(self.vma_lookup.mm_lock_seq.load(Relaxed));
        MmapWriteGuard { mm: self, guard: Some(guard) }
    }

    /// [`Mm::mmap_write_lock`] of a second address space while holding the
    /// first's (Linux `mmap_write_lock_nested`): fork's child.
    #[track_caller]
    pub(crate) fn mmap_write_lock_nested(&self) -> MmapWriteGuard<'_, 'p> {
        let mut guard = self.mmap_lock.write_nested();
        guard.begin_session(self.vma_lookup.mm_lock_seq.load(Relaxed));
        MmapWriteGuard { mm: self, guard: Some(guard) }
    }

    pub(crate) fn vma_lookup(&self) -> &VmaLookup {
        &self.vma_lookup
    }

    /// Write sessions ended so far (Linux `mm_lock_seq`), for reports.
    pub fn mm_lock_seq(&self) -> u64 {
        self.vma_lookup.mm_lock_seq.load(Relaxed)
    }

    /// Linux `exit_mmap`: unmaps every VMA (frames, huge frames, deposited
    /// tables), shoots down whatever CPUs may still cache translations, then
    /// frees the page tables.
    fn exit_mmap(&mut self) {
        let vmas = self.mmap_lock.get_mut().take_all();
        let this: &Self = self;
        let mut tlb = MmuGather::new(this);
        for vma in &vmas {
            crate::zap::unmap_page_range(&mut tlb, vma, vma.start.as_u64(), vma.end.as_u64(), Default::default());
        }
        if !this.cpu_bitmap.is_empty() {
            // The tables freed below go without a grace period (nobody can
            // walk a dying address space), but CPUs that ran it may still
            // hold TLB and paging-structure entries for them: one full flush
            // covers the frames and the tables.
            tlb.flush_all();
        }
        tlb.finish();
        debug_assert_eq!(this.pmd_huge_pte.load(Relaxed), 0, "deposited tables left at exit");
    }

    /// Frees a published table of `level`, unless the frame is not one (a
    /// corrupted entry must not free somebody else's frame).
    ///
    /// # Safety
    ///
    /// The entry pointing at it has been cleared and no walker can reach it.
    unsafe fn free_table(&self, pa: PhysAddr, level: PtLevel) {
        match page_ptdesc(self.phys, pa.pfn()) {
            Some(pt) if pt.page().kind() == crate::PageKind::PageTable && pt.level() == Some(level) => {
                // SAFETY: forwarded from the caller.
                drop(unsafe { PtPage::from_published(self.phys, pt) })
            }
            _ => log::error!("mm: {level:?} table at {pa:?} is not a page table we own; not freed"),
        }
    }

    fn free_pmd_table(&mut self, pa: PhysAddr) {
        for i in 0..PTRS_PER_TABLE {
            let Some(slot) = self.phys.slot(pa.add(8 * i as u64)) else { return };
            let v = Pmd::from_raw(slot.swap(0, Relaxed));
            if v.is_table() {
                // SAFETY: `&mut self`: no walker exists; the entry is cleared.
                unsafe { self.free_table(v.phys(), PtLevel::Pte) };
            } else if v.is_bad() {
                log::error!("mm: bad {v} in teardown");
            }
        }
        // SAFETY: `&mut self`: no walker exists; the caller cleared the PUD
        // entry pointing to this table.
        unsafe { self.free_table(pa, PtLevel::Pmd) };
    }

    fn free_pud_table(&mut self, pa: PhysAddr) {
        for i in 0..PTRS_PER_TABLE {
            let Some(slot) = self.phys.slot(pa.add(8 * i as u64)) else { return };
            let v = Pud::from_raw(slot.swap(0, Relaxed));
            if v.is_table() {
                self.free_pmd_table(v.phys());
            } else if v.is_bad() {
                log::error!("mm: bad {v} in teardown");
            }
        }
        // SAFETY: `&mut self`: no walker exists; the caller cleared the entry.
        unsafe { self.free_table(pa, PtLevel::Pud) };
    }

    /// Linux `free_pgtables` + `pgd_free` for the whole user half.
    fn free_pgtables(&mut self) {
        for i in 0..KERNEL_PGD_BOUNDARY {
            let Some(slot) = self.phys.slot(self.pgd.add(8 * i as u64)) else { return };
            let v = Pgd::from_raw(slot.swap(0, Relaxed));
            if v.is_table() {
                self.free_pud_table(v.phys());
            } else if v.is_bad() {
                log::error!("mm: bad {v} in teardown");
            }
        }
        // SAFETY: `&mut self`: the PGD is unreachable once this Mm is gone (the
        // kernel switches CR3 away before dropping an Mm).
        unsafe { self.free_table(self.pgd, PtLevel::Pgd) };
    }
}

/// `mmap_lock` held exclusive with a per-VMA-lock write session (see
/// [`Mm::mmap_write_lock`]). Dropping it publishes the changed VMA array,
/// ends the session (releasing every VMA it write-locked), then unlocks
/// (Linux `mmap_write_unlock` with `vma_end_write_all`).
#[must_use = "dropping the guard unlocks at once"]
pub struct MmapWriteGuard<'a, 'p> {
    mm: &'a Mm<'p>,
    guard: Option<crate::lock::RwWriteGuard<'a, VmaSet>>,
}

impl<'a> MmapWriteGuard<'a, '_> {
    fn end_session(&mut self) {
        let set = self.guard.as_mut().expect("guard present until drop");
        if let Some(array) = set.end_session() {
            self.mm.vma_lookup.publish(array);
        }
        // Release: the array and every detach mark of the session happen
        // before a reader sees the new sequence (vma_lock's argument).
        self.mm.vma_lookup.mm_lock_seq.fetch_add(1, core::sync::atomic::Ordering::Release);
    }

    /// Linux `mmap_write_downgrade`: ends the write session and keeps
    /// `mmap_lock` shared, with no writer in between.
    pub fn downgrade(mut self) -> RwReadGuard<'a, VmaSet> {
        self.end_session();
        self.guard.take().expect("guard present until drop").downgrade()
    }
}

impl core::ops::Deref for MmapWriteGuard<'_, '_> {
    type Target = VmaSet;
    fn deref(&self) -> &VmaSet {
        self.guard.as_ref().expect("guard present until drop")
    }
}

impl core::ops::DerefMut for MmapWriteGuard<'_, '_> {
    fn deref_mut(&mut self) -> &mut VmaSet {
        self.guard.as_mut().expect("guard present until drop")
    }
}

impl Drop for MmapWriteGuard<'_, '_> {
    fn drop(&mut self) {
        if self.guard.is_some() {
            self.end_session();
            drop(self.guard.take());
            // With the lock dropped: retired arrays whose grace period passed.
            self.mm.vma_lookup.reap();
        }
    }
}

impl Drop for Mm<'_> {
    fn drop(&mut self) {
        if !self.init_mm {
            self.exit_mmap();
            self.free_pgtables();
        }
    }
}

impl fmt::Debug for Mm<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mm")
            .field("pgd", &self.pgd)
            .field("init_mm", &self.init_mm)
            .field("nr_puds", &self.nr_puds())
            .field("nr_pmds", &self.nr_pmds())
            .field("nr_ptes", &self.nr_ptes())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use crate::addr::{PGDIR_SIZE, PUD_SIZE, VirtAddr};
    use crate::testing::{KERNEL_PGD_ENTRIES, TestMachine};
    use crate::{pgd_offset, pte_alloc_map_lock, walk_alloc_pmd};

    #[test]
    fn new_mm_shares_the_kernel_half_and_nothing_else() {
        let m = TestMachine::new();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        assert_ne!(mm.pgd_phys(), m.kernel.phys());
        let pgd = page_ptdesc(&m.phys, mm.pgd_phys().pfn()).unwrap();
        assert_eq!(pgd.level(), Some(PtLevel::Pgd));
        assert!(!pgd.has_ptl(), "the PGD is protected by page_table_lock");
        for slot in 0..PTRS_PER_TABLE {
            let va = VirtAddr::new(if slot < 256 {
                slot as u64 * PGDIR_SIZE
            } else {
                0xffff_0000_0000_0000 | (slot as u64 * PGDIR_SIZE)
            });
            let got = pgd_offset(&mm, va).get();
            match KERNEL_PGD_ENTRIES.iter().find(|(s, _)| *s == slot) {
                Some(&(_, v)) => assert_eq!(got.raw(), v, "kernel slot {slot}"),
                None => assert!(got.is_none(), "slot {slot} should be empty"),
            }
            assert_eq!(got, if slot >= 256 { m.kernel_entry(slot) } else { Pgd::NONE });
        }
    }

    #[test]
    fn dropping_an_mm_frees_every_table_and_split_lock() {
        let m = TestMachine::new();
        let start = m.phys.nr_free_pages();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        // Spread over two PGD slots, several PUD and PMD entries.
        let addrs =
            [0x1000u64, 0x20_1000, 0x4000_0000, PUD_SIZE * 3 + 0x60_0000, PGDIR_SIZE + 0x1000, PGDIR_SIZE * 2 - 0x1000];
        for &a in &addrs {
            let va = VirtAddr::new(a);
            let pmd = walk_alloc_pmd(&mm, va).unwrap();
            drop(pte_alloc_map_lock(&mm, pmd, va).unwrap());
        }
        let tables = 1 + mm.nr_puds() + mm.nr_pmds() + mm.nr_ptes();
        // PMD tables: PGD 0 has PUD entries 0, 1, 3; PGD 1 has 0 and 511.
        assert_eq!((mm.nr_puds(), mm.nr_pmds(), mm.nr_ptes()), (2, 5, 6));
        assert_eq!(m.phys.nr_free_pages(), start - tables);
        if crate::ALLOC_SPLIT_PTLOCKS {
            let split = if crate::config::USE_SPLIT_PTE_PTLOCKS { 6 } else { 0 }
                + if crate::config::USE_SPLIT_PMD_PTLOCKS { 5 } else { 0 };
            assert_eq!(m.phys.nr_allocated_ptlocks(), split);
        } else {
            assert_eq!(m.phys.nr_allocated_ptlocks(), 0);
        }
        drop(mm);
        assert_eq!(m.phys.nr_free_pages(), start, "every table freed");
        assert_eq!(m.phys.nr_allocated_ptlocks(), 0, "every split lock freed");
    }

    #[test]
    fn teardown_never_frees_a_frame_that_is_not_its_table() {
        let m = TestMachine::new();
        let mm = Mm::new_in(&m.phys, m.kernel).unwrap();
        let va = VirtAddr::new(0x4000_0000);
        let pmd = walk_alloc_pmd(&mm, va).unwrap();
        // A well-formed table pointer to somebody's data frame.
        let data = m.phys.alloc_pages(0).unwrap();
        crate::set_pmd(&mm, pmd, Pmd::table(data.phys_addr(), true), &crate::pmd_lock(&mm, pmd));
        let before = m.phys.nr_free_pages();
        drop(mm);
        assert_eq!(m.phys.nr_free_pages(), before + 3, "PGD, PUD, PMD tables only");
        assert_eq!(data.page().kind(), crate::PageKind::Kernel, "the data frame survived");
    }

    #[test]
    fn many_address_spaces_come_and_go_without_leaks() {
        let m = TestMachine::new();
        let start = m.phys.nr_free_pages();
        for round in 0..20u64 {
            let mms: std::vec::Vec<_> = (0..4).map(|_| Mm::new_in(&m.phys, m.kernel).unwrap()).collect();
            for (i, mm) in mms.iter().enumerate() {
                let va = VirtAddr::new((round * 7 + i as u64) * 0x20_0000);
                drop(pte_alloc_map_lock(mm, walk_alloc_pmd(mm, va).unwrap(), va).unwrap());
            }
        }
        assert_eq!(m.phys.nr_free_pages(), start);
    }
}
