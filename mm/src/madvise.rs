//! `madvise` (Linux `mm/madvise.c`): `MADV_DONTNEED`, which drops the pages
//! of a range while the mapping stays, and reclaims the PTE tables it
//! empties; `MADV_POPULATE_WRITE`, which makes a range present and writable
//! as writes would, without an exception per page; `MADV_COLLAPSE`
//! ([`crate::khugepaged`]).
//!
//! # Locks
//!
//! `MADV_DONTNEED` needs no exclusive lock (Linux: `mmap_read_lock`): it
//! changes entries, not VMAs. It takes `mmap_lock` shared, so it runs while
//! faults go on in the very VMAs it zaps (under their VMA locks or
//! `mmap_lock` shared). Entries are cleared under their PTE or PMD lock, a
//! THP only partly inside the range is split under its PMD lock, the range
//! is shot down before `mmap_lock` is dropped, the frames are freed after
//! the shoot-down, and empty PTE tables are reclaimed with the protocol of
//! [`crate::zap`] and freed after a grace period. A fault that races the zap
//! either finds its entry cleared and maps a fresh zeroed page (what a
//! program that touches memory it just discarded gets on Linux too), or
//! installs first and the zap clears it.

use alloc::vec::Vec;

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::counters::Counter;
use crate::memory::FaultError;
use crate::mm_struct::Mm;
use crate::mmap::{MmapError, user_range};
use crate::tlb::MmuGather;
use crate::vma::{VmFlags, Vma};
use crate::zap::{ZapDetails, unmap_page_range};

/// `madvise` advice (Linux `MADV_*`; the system call maps the numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: the range reads as zeroes afterwards (private
    /// anonymous memory); its frames and emptied page tables are freed.
    DontNeed,
    /// `MADV_COLLAPSE`: every 2 MiB block of the range becomes a transparent
    /// huge page, holes zero-filled ([`crate::khugepaged`]).
    Collapse,
    /// `MADV_POPULATE_WRITE` (Linux 5.14): every page of the range is made
    /// present and writable by the fault path, as a write to each would,
    /// but in a loop under `mmap_lock` shared instead of an exception per
    /// page. The whole range must be mapped (else `NoMemory`, `ENOMEM`) and
    /// writable (else `BadAddress`, `EFAULT`: a write would fault).
    PopulateWrite,
}

impl Mm<'_> {
    /// Linux `madvise(addr, len, advice)`. `addr` must be page aligned
    /// (`Invalid`); `len` is rounded up to pages, and 0 does nothing. The
    /// advice applies to every mapped part of the range; if part of it is
    /// not mapped the call still does the rest and then fails with
    /// `NoMemory` (`ENOMEM`), as Linux does. On a hugetlb VMA the range is
    /// zapped in whole huge pages: its start must be aligned to the huge page
    /// size (`Invalid`) and its end is rounded down to one.
    pub fn madvise(&self, addr: VirtAddr, len: u64, advice: Advice) -> Result<(), MmapError> {
        if !addr.as_u64().is_multiple_of(PAGE_SIZE) {
            return Err(MmapError::Invalid);
        }
        if len == 0 {
            return Ok(());
        }
        let (start, end) = user_range(addr, len)?;
        match advice {
            Advice::DontNeed => self.madvise_dontneed(start, end),
            Advice::Collapse => self.madvise_collapse(start, end),
            Advice::PopulateWrite => self.madvise_populate_write(start, end),
        }
    }

    fn madvise_populate_write(&self, start: u64, end: u64) -> Result<(), MmapError> {
        {
            // Refuse before populating anything, as Linux checks each VMA
            // before faulting it in.
            let vmas = self.mmap_lock.read();
            let mut mapped_to = start;
            for v in vmas.overlapping(start, end) {
                if v.start.as_u64() > mapped_to {
                    return Err(MmapError::NoMemory);
                }
                if !v.flags.contains(VmFlags::WRITE) || !v.flags.is_accessible() {
                    return Err(MmapError::BadAddress);
                }
                mapped_to = v.end.as_u64();
            }
            if mapped_to < end {
                return Err(MmapError::NoMemory);
            }
        }
        // A VMA unmapped in between makes the populate fail, as on Linux.
        self.populate(VirtAddr::new(start), end - start, true).map_err(|e| match e {
            FaultError::MapErr | FaultError::Oom => MmapError::NoMemory,
            FaultError::AccErr => MmapError::BadAddress,
        })
    }

    fn madvise_dontneed(&self, start: u64, end: u64) -> Result<(), MmapError> {
        let mut tlb = MmuGather::new(self);
        let vmas = self.mmap_lock.read();
        let pieces: Vec<Vma> = vmas.overlapping(start, end).copied().collect();
        // Linux reclaims tables only when the range spans a PMD's worth.
        let details = ZapDetails { reclaim_pt: end - start >= PMD_SIZE };
        let mut mapped_to = start;
        let mut hole = false;
        let mut result = Ok(());
        for v in &pieces {
            hole |= v.start.as_u64() > mapped_to;
            mapped_to = v.end.as_u64();
            let s = start.max(v.start.as_u64());
            let mut e = end.min(v.end.as_u64());
            if v.flags.is_hugetlb() {
                let size = v.flags.page_size();
                if !s.is_multiple_of(size) {
                    result = Err(MmapError::Invalid);
                    break;
                }
                e &= !(size - 1);
            }
            if s < e {
                let done = unmap_page_range(&mut tlb, v, s, e, details);
                self.counters.add(Counter::MadviseZapped, done.pages as i64);
            }
        }
        hole |= mapped_to < end;
        // Shoot down before anyone can rely on the range reading as zeroes;
        // free the frames (and queue the tables) after dropping the lock.
        tlb.flush_tlb_only();
        drop(vmas);
        tlb.finish();
        result?;
        if hole { Err(MmapError::NoMemory) } else { Ok(()) }
    }
}
