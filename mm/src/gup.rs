//! Pinning user pages (Linux `mm/gup.c`): the lockless walker
//! `get_user_pages_fast`, and the locked slow path it falls back to.
//!
//! # The lockless walk
//!
//! [`get_user_pages_fast`] walks the address space's tables with no lock at
//! all, with interrupts off and inside a read-side section:
//!
//! * Interrupts off: a CPU that unmaps a page clears its entry, shoots the
//!   TLB down (an IPI every CPU of the address space must answer, which this
//!   one only does with interrupts on), and only then drops the mapping's
//!   reference on the frame. So a frame whose entry the walk read cannot be
//!   freed until the walk is over (Linux's GUP-fast argument).
//! * The read-side section: a page table the walk reached cannot be freed
//!   either ([`crate::table_rcu`] waits for a grace period; a CPU with
//!   interrupts off inside a section cannot pass a quiescent state).
//!
//! For each page it reads the entry once (lockless), checks that it allows
//! the access, takes a reference on the frame (or the huge page's head)
//! unless the frame has none left ([`PhysMem::try_get_folio`]), then reads the
//! entry again: if it changed, the reference goes back and the page is left
//! to the slow path. Any doubt (no entry, a protection the access needs but
//! the entry lacks, the zero page for a write) ends the lockless walk there.
//!
//! # The slow path
//!
//! [`get_user_pages`] takes the VMA's lock as a fault does (`mmap_lock`
//! shared), checks the VMA allows the access, looks the page up under its
//! entry's lock and references it there (the mapping holds a reference, so
//! it cannot be the last one); if nothing suitable is mapped it faults the
//! page in and looks again.
//!
//! # Pins and freeing
//!
//! A reference taken here is a *pin*: munmap and `madvise` may clear the
//! entry meanwhile, but the frame goes back to the allocator only with its
//! last reference ([`PhysMem::put_folio`]), which may be the pin's. A pinned
//! THP is not split into independent frames until the pin goes
//! (`__split_huge_pmd` waits). Pins are short: kernel code pins, reads or
//! writes the pages through the direct map, and unpins ([`Pins`] on drop),
//! taking no lock meanwhile and never giving up its CPU.

use alloc::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Pfn, PhysAddr, VirtAddr};
use crate::counters::Counter;
use crate::gigantic::GIGANTIC_ORDER;
use crate::helpers::RcuReadGuard;
use crate::huge_memory::HPAGE_PMD_ORDER;
use crate::memmap::PageKind;
use crate::memory::{Access, FaultError, FaultLock, access_error, fault_locked};
use crate::mm_struct::Mm;
use crate::pgtable::entry::PteFlags;
use crate::pgtable::walk::{p4d_offset, pgd_offset, pmd_offset, pud_offset};
use crate::physmem::PhysMem;
use crate::{HugePte, huge_pte_lock, pmd_lock, pte_offset_map, pte_offset_map_lock};

/// One pinned 4 KiB page of user memory, inside the block whose head holds
/// the pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedPage {
    /// The pinned block's first frame (a 4 KiB frame, or a huge page's head).
    pub head: Pfn,
    /// The block's order (0, [`HPAGE_PMD_ORDER`], or [`GIGANTIC_ORDER`]).
    pub order: usize,
    /// The physical address of the 4 KiB page asked for.
    pub page: PhysAddr,
}

/// Pages pinned by [`get_user_pages_fast`] or [`get_user_pages`]; dropping
/// it unpins them (Linux `unpin_user_pages`).
#[must_use = "dropping Pins unpins the pages at once"]
pub struct Pins<'p> {
    phys: &'p PhysMem,
    start: VirtAddr,
    pages: Vec<PinnedPage>,
}

impl<'p> Pins<'p> {
    /// The pinned pages, one per 4 KiB page from the start address.
    pub fn pages(&self) -> &[PinnedPage] {
        &self.pages
    }

    /// Copies `buf.len()` bytes of the pinned range, from byte `offset` of
    /// it (relative to the start address), into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.copy(offset, buf, false);
    }

    /// Copies `buf` into the pinned range at byte `offset` (the pages were
    /// pinned for write).
    pub fn write(&self, offset: u64, buf: &mut [u8]) {
        self.copy(offset, buf, true);
    }

    fn copy(&self, offset: u64, buf: &mut [u8], to_frame: bool) {
        let first = self.start.as_u64() & (PAGE_SIZE - 1);
        let mut done = 0usize;
        while done < buf.len() {
            let at = first + offset + done as u64;
            let pin = self.pages[(at / PAGE_SIZE) as usize];
            let in_page = at % PAGE_SIZE;
            let n = ((PAGE_SIZE - in_page) as usize).min(buf.len() - done);
            // SAFETY: the page is pinned (a reference on its block, held
            // until `self` drops), so the frame stays this user memory's for
            // the copy; the range lies inside that 4 KiB page.
            unsafe { self.phys.copy_user_frame(pin.page.add(in_page), &mut buf[done..done + n], to_frame) };
            done += n;
        }
    }
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        for p in self.pages.drain(..) {
            self.phys.put_folio(p.head, p.order);
        }
    }
}

impl core::fmt::Debug for Pins<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Pins({:?}, {} pages)", self.start, self.pages.len())
    }
}

/// Whether a leaf entry with `flags` allows the access.
fn leaf_allows(flags: PteFlags, write: bool) -> bool {
    flags.contains(PteFlags::PRESENT | PteFlags::USER) && (!write || flags.contains(PteFlags::WRITABLE))
}

/// Takes a reference on the block headed by `head` if its descriptor says
/// it can be user memory, then checks `still` (the entry re-read): on a
/// change the reference goes back.
fn try_pin(phys: &PhysMem, head: Pfn, order: usize, page: PhysAddr, still: impl Fn() -> bool) -> Option<PinnedPage> {
    let kind = phys.page(head)?.kind();
    if !matches!(kind, PageKind::Anon | PageKind::ZeroPage | PageKind::Gigantic) {
        return None;
    }
    if !phys.try_get_folio(head) {
        return None;
    }
    if !still() {
        phys.put_folio(head, order);
        return None;
    }
    Some(PinnedPage { head, order, page })
}

/// The lockless walk of one page (module comment). `None`: leave it to the
/// slow path.
fn gup_fast_one(mm: &Mm<'_>, addr: VirtAddr, write: bool) -> Option<PinnedPage> {
    let phys = mm.phys();
    let pgd = pgd_offset(mm, addr);
    let pud = pud_offset(mm, p4d_offset(mm, pgd, addr), addr)?;
    let v = pud.get();
    if v.is_leaf() {
        let off = addr.as_u64() & (PUD_SIZE - 1) & !(PAGE_SIZE - 1);
        return leaf_allows(v.flags(), write)
            .then(|| try_pin(phys, v.pfn(), GIGANTIC_ORDER, v.phys().add(off), || pud.get() == v))
            .flatten();
    }
    let pmd = pmd_offset(mm, pud, addr)?;
    let v = pmd.get();
    if v.is_leaf() {
        let off = addr.as_u64() & (PMD_SIZE - 1) & !(PAGE_SIZE - 1);
        return leaf_allows(v.flags(), write)
            .then(|| try_pin(phys, v.pfn(), HPAGE_PMD_ORDER, v.phys().add(off), || pmd.get() == v))
            .flatten();
    }
    let map = pte_offset_map(mm, pmd, addr)?;
    let pte = map.ptep_get();
    if !pte.maps_frame() || !leaf_allows(pte.flags(), write) || (write && pte.pfn() == phys.zero_pfn()) {
        return None;
    }
    try_pin(phys, pte.pfn(), 0, pte.phys(), || map.ptep_get() == pte)
}

/// Linux `get_user_pages_fast` (`pin_user_pages_fast`): pins the `nr` pages
/// from `start` (rounded down to a page) for reading, or for writing when
/// `write`. Tries the lockless walk first; the pages it cannot pin go
/// through [`get_user_pages`]. Fails (pinning nothing) with the slow path's
/// error: no VMA (`MapErr`), a VMA that forbids the access (`AccErr`), or
/// no memory to fault a page in (`Oom`).
pub fn get_user_pages_fast<'p>(mm: &Mm<'p>, start: VirtAddr, nr: usize, write: bool) -> Result<Pins<'p>, FaultError> {
    let base = VirtAddr::new(start.as_u64() & !(PAGE_SIZE - 1));
    let mut pins = Pins { phys: mm.phys(), start, pages: Vec::with_capacity(nr) };
    {
        let hal = crate::hal::get();
        let irqs = hal.local_irq_save();
        let rcu = RcuReadGuard::new();
        while pins.pages.len() < nr {
            let a = base.add(pins.pages.len() as u64 * PAGE_SIZE);
            if !a.is_user() {
                break;
            }
            match gup_fast_one(mm, a, write) {
                Some(p) => pins.pages.push(p),
                None => break,
            }
        }
        drop(rcu);
        hal.local_irq_restore(irqs);
    }
    mm.counters.add(Counter::GupFastPages, pins.pages.len() as i64);
    if pins.pages.len() < nr {
        let done = pins.pages.len();
        let mut rest = get_user_pages(mm, base.add(done as u64 * PAGE_SIZE), nr - done, write)?;
        // The slow path's pins move over (and `rest` drops empty).
        pins.pages.append(&mut rest.pages);
    }
    Ok(pins)
}

/// Linux `get_user_pages` (`pin_user_pages`): pins `nr` pages from `start`
/// (rounded down to a page) under the VMA's lock (`mmap_lock` shared),
/// faulting in what is not mapped (module comment).
pub fn get_user_pages<'p>(mm: &Mm<'p>, start: VirtAddr, nr: usize, write: bool) -> Result<Pins<'p>, FaultError> {
    let base = VirtAddr::new(start.as_u64() & !(PAGE_SIZE - 1));
    let mut pins = Pins { phys: mm.phys(), start, pages: Vec::with_capacity(nr) };
    let access = Access { write, exec: false, user: true };
    while pins.pages.len() < nr {
        let a = base.add(pins.pages.len() as u64 * PAGE_SIZE);
        if !a.is_user() {
            return Err(FaultError::MapErr);
        }
        let vmas = mm.mmap_lock().read();
        let Some(&vma) = vmas.find(a) else { return Err(FaultError::MapErr) };
        if access_error(vma.flags, access) {
            return Err(FaultError::AccErr);
        }
        let mut tries = 0;
        let pin = loop {
            if let Some(p) = follow_page_pin(mm, a, write) {
                break p;
            }
            tries += 1;
            if tries > 64 * crate::memory::MAX_FAULT_RETRIES {
                log::error!("mm: get_user_pages at {a:?} cannot make progress");
                return Err(FaultError::Oom);
            }
            fault_locked(mm, &vma, a, access, false, FaultLock::Mmap)?;
        };
        drop(vmas);
        pins.pages.push(pin);
        mm.counters.inc(Counter::GupSlowPages);
    }
    Ok(pins)
}

/// Linux `follow_page_mask` + `try_grab_folio` under the entry's lock:
/// pins the page mapped at `addr` if the entry allows the access.
fn follow_page_pin(mm: &Mm<'_>, addr: VirtAddr, write: bool) -> Option<PinnedPage> {
    let phys = mm.phys();
    let pgd = pgd_offset(mm, addr);
    let pud = pud_offset(mm, p4d_offset(mm, pgd, addr), addr)?;
    // Under the entry's lock the mapping holds a reference, so ours is never
    // the first: `try_get_folio` cannot fail for a mapped block.
    let pin =
        |head: Pfn, order: usize, page: PhysAddr| phys.try_get_folio(head).then_some(PinnedPage { head, order, page });
    if pud.get().is_leaf() {
        let _ptl = huge_pte_lock(mm, PUD_SIZE, HugePte::Pud(pud));
        let v = pud.get();
        let off = addr.as_u64() & (PUD_SIZE - 1) & !(PAGE_SIZE - 1);
        return (v.is_leaf() && leaf_allows(v.flags(), write))
            .then(|| pin(v.pfn(), GIGANTIC_ORDER, v.phys().add(off)))?;
    }
    let pmd = pmd_offset(mm, pud, addr)?;
    if pmd.get().is_leaf() {
        let _ptl = pmd_lock(mm, pmd);
        let v = pmd.get();
        let off = addr.as_u64() & (PMD_SIZE - 1) & !(PAGE_SIZE - 1);
        return (v.is_leaf() && leaf_allows(v.flags(), write))
            .then(|| pin(v.pfn(), HPAGE_PMD_ORDER, v.phys().add(off)))?;
    }
    let pte = pte_offset_map_lock(mm, pmd, addr)?;
    let v = pte.ptep_get();
    if !v.maps_frame() || !leaf_allows(v.flags(), write) || (write && v.pfn() == phys.zero_pfn()) {
        return None;
    }
    pin(v.pfn(), 0, v.phys())
}
