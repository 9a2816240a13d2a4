//! The address-space operations (Linux `mm/mmap.c`, `mm/mprotect.c`,
//! `mm/gup.c`): `mmap`, `munmap`, `mprotect`, `access_remote`, populate, and
//! read-only walks for reports and tests.
//!
//! # Locks
//!
//! * `mmap`, `munmap`, `mprotect` take `mmap_lock` exclusive, change the VMA
//!   set and the entries (each under its own page-table lock), and shoot
//!   down stale translations ([`MmuGather::flush_tlb_only`]) *before*
//!   dropping it, so no CPU uses an old translation once another thread can
//!   map something new there. Freeing the unmapped frames and, after a grace
//!   period, the detached tables ([`MmuGather::finish`]) happens after
//!   dropping it: nothing can reach them any more, and a writer waiting for
//!   the lock should not wait for thousands of frees.
//! * `access_remote` and populate take `mmap_lock` shared and fault pages in
//!   like any fault; they copy data under the entry's lock, which keeps the
//!   frame mapped (and so allocated) for the copy.
//! * [`Mm::follow_pte_lockless`] takes no lock at all (Linux GUP-fast): it
//!   walks inside a read-side critical section, which is what the deferred
//!   freeing of detached tables protects.

use alloc::vec::Vec;
use core::fmt;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PTRS_PER_TABLE, PUD_SIZE, PhysAddr, TASK_SIZE_MAX, VirtAddr};
use crate::free_pgtables::free_pgtables;
use crate::helpers::RcuReadGuard;
use crate::huge_memory::split_huge_pmd_address;
use crate::memmap::PageKind;
use crate::memory::{Access, FaultError, FaultLock, fault_locked};
use crate::mm_struct::Mm;
use crate::pgtable::entry::{Pmd, Pte, PteFlags, Pud};
use crate::pgtable::walk::{p4d_offset, pgd_offset, pmd_offset, pud_offset};
use crate::tlb::MmuGather;
use crate::vma::{MAX_MAP_COUNT, MMAP_BASE, MMAP_MIN_ADDR, MapFlags, Prot, VmFlags, Vma, VmaSet};
use crate::zap::{ZapDetails, unmap_page_range};
use crate::{HugePte, huge_pte_lock, pmd_lock, pte_offset_map, pte_offset_map_lock};

/// Why `mmap`, `munmap` or `mprotect` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmapError {
    /// Bad arguments: zero or unaligned length/address, a range outside the
    /// user half, conflicting flags, cutting a hugetlb page (`EINVAL`).
    Invalid,
    /// No room: no free range of that size, too many mappings, an empty
    /// gigantic pool; for `mprotect`, a range not fully mapped (`ENOMEM`).
    NoMemory,
    /// `mremap`'s old range is not all inside one mapping (`EFAULT`).
    BadAddress,
    /// Part of the work could not be done now (`EAGAIN`): `MADV_COLLAPSE`
    /// found shared or pinned pages in a block.
    Busy,
}

impl fmt::Display for MmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmapError::Invalid => "invalid argument (EINVAL)",
            MmapError::NoMemory => "out of memory or address space (ENOMEM)",
            MmapError::BadAddress => "address not mapped (EFAULT)",
            MmapError::Busy => "resource temporarily unavailable (EAGAIN)",
        })
    }
}

/// One leaf mapping found by [`Mm::mappings`] or [`Mm::follow_pte_lockless`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Virtual address of the first byte mapped by the entry.
    pub va: VirtAddr,
    /// Physical address it maps to.
    pub pa: PhysAddr,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// The entry's flags (`PRESENT` clear and [`crate::PROTNONE`] set for
    /// `PROT_NONE`).
    pub flags: PteFlags,
}

/// Validates `[addr, addr + len)` for munmap/mprotect; returns the page
/// rounded range.
pub(crate) fn user_range(addr: VirtAddr, len: u64) -> Result<(u64, u64), MmapError> {
    let start = addr.as_u64();
    if !start.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(MmapError::Invalid);
    }
    let len = len.checked_add(PAGE_SIZE - 1).ok_or(MmapError::Invalid)? & !(PAGE_SIZE - 1);
    let end = start.checked_add(len).ok_or(MmapError::Invalid)?;
    if end > TASK_SIZE_MAX {
        return Err(MmapError::Invalid);
    }
    Ok((start, end))
}

/// hugetlb pages are never split: a range may only cut a hugetlb VMA at a
/// multiple of its page size (Linux: `EINVAL` from `hugetlb_split`).
pub(crate) fn check_hugetlb_cuts(vmas: &VmaSet, start: u64, end: u64) -> Result<(), MmapError> {
    for v in vmas.overlapping(start, end) {
        let sz = v.flags.page_size();
        if v.flags.is_hugetlb()
            && ((start > v.start.as_u64() && !start.is_multiple_of(sz))
                || (end < v.end.as_u64() && !end.is_multiple_of(sz)))
        {
            return Err(MmapError::Invalid);
        }
    }
    Ok(())
}

/// Linux `do_vmi_munmap`: removes `[start, end)` from the VMA set, zaps its
/// entries into `tlb` and detaches the page tables the gap no longer needs.
pub(crate) fn do_munmap(vmas: &mut VmaSet, tlb: &mut MmuGather<'_, '_>, start: u64, end: u64) -> Result<(), MmapError> {
    check_hugetlb_cuts(vmas, start, end)?;
    let removed = vmas.remove_range(start, end);
    let (Some(first), Some(last)) = (removed.first(), removed.last()) else { return Ok(()) };
    for v in &removed {
        unmap_page_range(tlb, v, v.start.as_u64(), v.end.as_u64(), ZapDetails::default());
    }
    let (floor, ceiling) = vmas.gap_around(first.start.as_u64(), last.end.as_u64());
    free_pgtables(tlb, floor, ceiling, first.start.as_u64(), last.end.as_u64());
    Ok(())
}

impl<'p> Mm<'p> {
    /// Linux `mmap` of private anonymous memory. `addr`: with
    /// [`MapFlags::FIXED`] the exact (aligned) address, whose old mappings
    /// are replaced atomically under the exclusive `mmap_lock`; without, a
    /// hint used if that range is free, else the kernel picks the highest
    /// free range below [`MMAP_BASE`]. `len` is rounded up to the page size
    /// (4 KiB, or the hugetlb page size). THP mappings of at least 2 MiB are
    /// placed 2 MiB aligned. [`MapFlags::POPULATE`] faults every page in
    /// before returning (failures are ignored, as Linux does).
    pub fn mmap(&self, addr: Option<VirtAddr>, len: u64, prot: Prot, flags: MapFlags) -> Result<VirtAddr, MmapError> {
        if flags.contains(MapFlags::HUGETLB_2M | MapFlags::HUGETLB_1G) || self.is_init_mm() {
            return Err(MmapError::Invalid);
        }
        let vmflags = VmFlags::from_prot_and_map(prot, flags);
        let size = vmflags.page_size();
        if len == 0 {
            return Err(MmapError::Invalid);
        }
        let len = len.checked_add(size - 1).ok_or(MmapError::NoMemory)? & !(size - 1);
        if len > TASK_SIZE_MAX - MMAP_MIN_ADDR {
            return Err(MmapError::NoMemory);
        }
        if size == PUD_SIZE && (self.phys().gigantic_pool().nr_free() as u64) < len / PUD_SIZE {
            // Linux reserves hugetlb pages at mmap time; we only refuse a
            // mapping the pool could never back.
            return Err(MmapError::NoMemory);
        }
        let mut tlb = MmuGather::new(self);
        let mut vmas = self.mmap_write_lock();
        if vmas.len() >= MAX_MAP_COUNT {
            return Err(MmapError::NoMemory);
        }
        let start = if flags.contains(MapFlags::FIXED) {
            let a = addr.ok_or(MmapError::Invalid)?.as_u64();
            if a % size != 0 || a < MMAP_MIN_ADDR || a.checked_add(len).is_none_or(|e| e > TASK_SIZE_MAX) {
                return Err(MmapError::Invalid);
            }
            do_munmap(&mut vmas, &mut tlb, a, a + len)?;
            a
        } else {
            let align = if size > PAGE_SIZE {
                size
            } else if flags.contains(MapFlags::HUGEPAGE) && len >= PMD_SIZE {
                PMD_SIZE
            } else {
                PAGE_SIZE
            };
            let hint = addr.map(|a| a.as_u64()).filter(|&a| {
                a % align == 0
                    && a >= MMAP_MIN_ADDR
                    && a.checked_add(len).is_some_and(|e| e <= TASK_SIZE_MAX && !vmas.intersects(a, e))
            });
            match hint {
                Some(a) => a,
                None => vmas.find_gap_top_down(len, align, MMAP_BASE).ok_or(MmapError::NoMemory)?,
            }
        };
        vmas.insert(Vma { start: VirtAddr::new(start), end: VirtAddr::new(start + len), flags: vmflags });
        tlb.flush_tlb_only();
        drop(vmas);
        tlb.finish();
        if flags.contains(MapFlags::POPULATE) {
            let _ = self.populate(VirtAddr::new(start), len, prot.contains(Prot::WRITE));
        }
        Ok(VirtAddr::new(start))
    }

    /// Linux `munmap`: unmaps `[addr, addr + len)` (page aligned `addr`, `len`
    /// rounded up), splitting VMAs and huge pages it cuts (hugetlb pages may
    /// not be cut: `Invalid`). Frames are freed after a shoot-down on every
    /// CPU of the address space, empty page tables after a grace period.
    /// Unmapping a range with nothing mapped succeeds.
    pub fn munmap(&self, addr: VirtAddr, len: u64) -> Result<(), MmapError> {
        let (start, end) = user_range(addr, len)?;
        let mut tlb = MmuGather::new(self);
        let mut vmas = self.mmap_write_lock();
        check_hugetlb_cuts(&vmas, start, end)?;
        let removed = vmas.remove_range(start, end);
        let (Some(first), Some(last)) = (removed.first(), removed.last()) else { return Ok(()) };
        let (floor, ceiling) = vmas.gap_around(first.start.as_u64(), last.end.as_u64());
        // A THP cut by either end of the range is split now, while the VMAs
        // on both sides of the cut are write-locked (no fault inside them).
        let cuts = [
            (start, removed.iter().find(|v| v.start.as_u64() == start)),
            (end, removed.iter().find(|v| v.end.as_u64() == end)),
        ];
        for (cut, vma) in cuts {
            if let Some(vma) = vma.filter(|_| cut % PMD_SIZE != 0) {
                split_huge_pmd_address(self, vma, cut);
            }
        }
        // Linux mmap_write_downgrade: the VMAs are out of the tree, so no
        // fault can reach the range any more; faults in the rest of the
        // address space go on while we zap and free tables (which spans no
        // VMA covers, so no fault walks into them).
        let vmas = vmas.downgrade();
        for v in &removed {
            unmap_page_range(&mut tlb, v, v.start.as_u64(), v.end.as_u64(), ZapDetails::default());
        }
        free_pgtables(&mut tlb, floor, ceiling, first.start.as_u64(), last.end.as_u64());
        // The shoot-down must happen before anyone may map the range again
        // (under the lock); freeing the frames need not (module comment).
        tlb.flush_tlb_only();
        drop(vmas);
        tlb.finish();
        Ok(())
    }

    /// Linux `mm_populate`: faults in every page of `[addr, addr + len)`
    /// that a VMA allows (writable ones for write when `write`), stopping at
    /// the first error.
    pub fn populate(&self, addr: VirtAddr, len: u64, write: bool) -> Result<(), FaultError> {
        let end = addr.as_u64().saturating_add(len);
        let mut a = addr.as_u64() & !(PAGE_SIZE - 1);
        while a < end {
            let vmas = self.mmap_lock.read();
            let Some(&vma) = vmas.find(VirtAddr::new(a)) else { return Err(FaultError::MapErr) };
            let step = vma.flags.page_size();
            // Many pages per lock hold, but give writers a chance now and then.
            let stop = end.min(vma.end.as_u64()).min(a.saturating_add(512 * step));
            while a < stop {
                if vma.flags.is_accessible() {
                    let access =
                        Access { write: write && vma.flags.contains(VmFlags::WRITE), exec: false, user: false };
                    fault_locked(self, &vma, VirtAddr::new(a), access, false, FaultLock::Mmap)?;
                }
                a = (a & !(step - 1)) + step;
            }
            drop(vmas);
        }
        Ok(())
    }

    /// Linux `access_process_vm` (what ptrace and the ELF loader use): reads
    /// (`write == false`) user memory at `addr` into `buf`, or writes `buf`
    /// there, through this address space's page tables, faulting pages in as
    /// needed. Like ptrace it ignores the protection (`FOLL_FORCE`): a write
    /// to a read-only page gets a private copy that stays read-only for the
    /// user. Fails with `MapErr` where no VMA exists, or `Oom`.
    pub fn access_remote(&self, addr: VirtAddr, buf: &mut [u8], write: bool) -> Result<(), FaultError> {
        let mut done = 0usize;
        while done < buf.len() {
            let va = addr.add(done as u64);
            if !va.is_user() {
                return Err(FaultError::MapErr);
            }
            let vmas = self.mmap_lock.read();
            let Some(&vma) = vmas.find(va) else { return Err(FaultError::MapErr) };
            let mut tries = 0;
            let n = loop {
                if let Some(n) = self.copy_mapped(va, &mut buf[done..], write) {
                    break n;
                }
                tries += 1;
                // Each round faults the page in; only a zap racing every
                // round (madvise on another CPU) makes it go again.
                if tries > 64 * crate::memory::MAX_FAULT_RETRIES {
                    log::error!("mm: access_remote at {va:?} cannot make progress");
                    return Err(FaultError::Oom);
                }
                let access = Access { write, exec: false, user: false };
                fault_locked(self, &vma, va, access, true, FaultLock::Mmap)?;
            };
            drop(vmas);
            done += n;
        }
        Ok(())
    }

    /// Copies between `buf` and the frame mapped at `va`, up to the end of
    /// that mapping, under the entry's lock. `None`: not mapped (or mapped to
    /// the zero page for a write): fault first.
    fn copy_mapped(&self, va: VirtAddr, buf: &mut [u8], write: bool) -> Option<usize> {
        let pgd = pgd_offset(self, va);
        let pud = pud_offset(self, p4d_offset(self, pgd, va), va)?;
        if pud.get().is_leaf() {
            let _ptl = huge_pte_lock(self, PUD_SIZE, HugePte::Pud(pud));
            let v: Pud = pud.get();
            return v.is_leaf().then(|| self.copy_frame(v.phys(), PUD_SIZE, va, buf, write));
        }
        let pmd = pmd_offset(self, pud, va)?;
        if pmd.get().is_leaf() {
            let _ptl = pmd_lock(self, pmd);
            let v: Pmd = pmd.get();
            return v.is_leaf().then(|| self.copy_frame(v.phys(), PMD_SIZE, va, buf, write));
        }
        let pte = pte_offset_map_lock(self, pmd, va)?;
        let v: Pte = pte.ptep_get();
        if !v.maps_frame() || (write && v.pfn() == self.phys().zero_pfn()) {
            return None;
        }
        // A write goes through a writable entry, or (FOLL_FORCE into a
        // read-only mapping) into a page this mapping owns alone; a page
        // fork left shared must be copied first (fault with write).
        if write && !v.is_writable() && self.phys().page(v.pfn()).is_none_or(|p| p.refcount() != 1) {
            return None;
        }
        Some(self.copy_frame(v.phys(), PAGE_SIZE, va, buf, write))
    }

    fn copy_frame(&self, base: PhysAddr, size: u64, va: VirtAddr, buf: &mut [u8], write: bool) -> usize {
        let off = va.as_u64() & (size - 1);
        let n = ((size - off) as usize).min(buf.len());
        debug_assert!(!write || base.pfn() != self.phys().zero_pfn(), "writing the zero page");
        // SAFETY: `[base + off, + n)` lies in the block of `size` bytes at
        // `base`, mapped as user memory by an entry whose lock the caller
        // (`copy_mapped`) holds, so it stays allocated for the copy.
        unsafe { self.phys().copy_user_frame(base.add(off), &mut buf[..n], write) };
        n
    }

    /// Linux GUP-fast's walk (`gup_fast_pte_range` & co.): the leaf mapping
    /// `addr`, found without any lock, inside a read-side critical section
    /// that keeps every table it reads from being freed under it (tables are
    /// detached first and freed only after a grace period). `None` when
    /// nothing maps `addr`.
    pub fn follow_pte_lockless(&self, addr: VirtAddr) -> Option<Mapping> {
        let _rcu = RcuReadGuard::new();
        let pgd = pgd_offset(self, addr);
        let pud = pud_offset(self, p4d_offset(self, pgd, addr), addr)?;
        let v = pud.get();
        if v.is_leaf() {
            return Some(Mapping {
                va: VirtAddr::new(addr.as_u64() & !(PUD_SIZE - 1)),
                pa: v.phys(),
                size: PUD_SIZE,
                flags: v.flags(),
            });
        }
        let pmd = pmd_offset(self, pud, addr)?;
        let v = pmd.get();
        if v.is_leaf() {
            return Some(Mapping {
                va: VirtAddr::new(addr.as_u64() & !(PMD_SIZE - 1)),
                pa: v.phys(),
                size: PMD_SIZE,
                flags: v.flags(),
            });
        }
        let map = pte_offset_map(self, pmd, addr)?;
        let pte = map.ptep_get();
        // The grace period is what this relies on: however stale, the table
        // we read is still a page table, not a recycled frame.
        debug_assert!(
            self.phys().page(map.table_pa().pfn()).is_some_and(|p| p.kind() == PageKind::PageTable),
            "lockless walker read a freed page table"
        );
        pte.maps_frame().then(|| Mapping {
            va: VirtAddr::new(addr.as_u64() & !(PAGE_SIZE - 1)),
            pa: pte.phys(),
            size: PAGE_SIZE,
            flags: pte.flags(),
        })
    }

    /// Every leaf mapping of the user half, in address order (takes
    /// `mmap_lock` shared; entries are read locklessly, a snapshot). For
    /// reports and for tests that count mappings. The walk runs inside a
    /// read-side section: `mmap_lock` shared does not keep PTE tables in
    /// place (`madvise` reclaims them under it, and a downgraded munmap
    /// frees tables in the spans it emptied), a grace period does.
    pub fn mappings(&self) -> Vec<Mapping> {
        let _vmas = self.mmap_lock.read();
        let _rcu = RcuReadGuard::new();
        let mut out = Vec::new();
        let phys = self.phys();
        let entries = |table: PhysAddr| {
            (0..PTRS_PER_TABLE).filter_map(move |i| {
                let raw = phys.slot(table.add(8 * i as u64))?.load(core::sync::atomic::Ordering::Acquire);
                (raw != 0).then_some((i as u64, raw))
            })
        };
        for g in 0..crate::addr::KERNEL_PGD_BOUNDARY as u64 {
            let gva = g << crate::addr::PGDIR_SHIFT;
            let pgd = pgd_offset(self, VirtAddr::new(gva)).get();
            if !pgd.is_table() {
                continue;
            }
            for (u, raw) in entries(pgd.phys()) {
                let uva = gva + u * PUD_SIZE;
                let pud = Pud::from_raw(raw);
                if pud.is_leaf() {
                    out.push(Mapping { va: VirtAddr::new(uva), pa: pud.phys(), size: PUD_SIZE, flags: pud.flags() });
                    continue;
                }
                if !pud.is_table() {
                    continue;
                }
                for (m, raw) in entries(pud.phys()) {
                    let mva = uva + m * PMD_SIZE;
                    let pmd = Pmd::from_raw(raw);
                    if pmd.is_leaf() {
                        out.push(Mapping {
                            va: VirtAddr::new(mva),
                            pa: pmd.phys(),
                            size: PMD_SIZE,
                            flags: pmd.flags(),
                        });
                        continue;
                    }
                    if !pmd.is_table() {
                        continue;
                    }
                    for (t, raw) in entries(pmd.phys()) {
                        let pte = Pte::from_raw(raw);
                        if pte.maps_frame() {
                            out.push(Mapping {
                                va: VirtAddr::new(mva + t * PAGE_SIZE),
                                pa: pte.phys(),
                                size: PAGE_SIZE,
                                flags: pte.flags(),
                            });
                        }
                    }
                }
            }
        }
        out
    }
}
