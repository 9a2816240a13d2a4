//! `mremap` (Linux `mm/mremap.c`): growing, shrinking and moving a mapping,
//! moving its page-table entries rather than its pages.
//!
//! # Two tables at once
//!
//! Moving entries holds two tables' locks: the *old* table's (plain) and the
//! *new* table's (nested, lockdep subclass 1), the same way round everywhere,
//! and only one lock when both are the same (one table, or split locks off):
//!
//! | what moves | how (Linux) | locks |
//! | --- | --- | --- |
//! | 4 KiB entries | `move_ptes`: the old table through `pte_offset_map_lock`, the new one through `pte_offset_map_rw_nolock` + `pmd_same` | old PTE lock, new PTE lock nested |
//! | a whole PTE table (source and destination 2 MiB aligned, 2 MiB left) | `move_normal_pmd`: the PMD entry moves, the table with it | old PMD lock, new PMD lock nested |
//! | a THP (2 MiB aligned on both sides) | `move_huge_pmd`: the huge entry and its deposited table | old PMD lock, new PMD lock nested |
//!
//! In every case the old range is shot down *before* the old lock is dropped
//! (Linux: `flush_tlb_range` under the old PTE lock): until then a CPU may
//! still write the moved page through a stale translation of the old
//! address, and once the lock is gone a fault may map something new there.
//!
//! # The rest
//!
//! `mremap` takes `mmap_lock` exclusive: the VMA it moves is write-locked
//! before its entries move (faults in it wait), the new VMA is born locked.
//! Faults in *other* VMAs may share the new range's tables and run meanwhile
//! (their entries are in other slots; the PTE lock serialises the table).
//! All destination tables are allocated before anything moves, so a move
//! that runs out of memory fails with nothing moved. RSS is unchanged.

use crate::addr::{PAGE_SIZE, PMD_SIZE, VirtAddr};
use crate::free_pgtables::free_pgtables;
use crate::huge_memory::{pgtable_trans_huge_deposit, pgtable_trans_huge_withdraw, split_huge_pmd_address};
use crate::mm_struct::Mm;
use crate::mmap::{MmapError, check_hugetlb_cuts};
use crate::pagewalk::addr_end;
use crate::pgtable::entry::Pmd;
use crate::pgtable::walk::{pte_alloc, set_pmd, walk_alloc_pmd, walk_pmd};
use crate::tlb::{FlushRange, MmuGather, flush_tlb_range};
use crate::vma::{MMAP_BASE, MMAP_MIN_ADDR, VmFlags, Vma};
use crate::zap::{ZapDetails, unmap_page_range};
use crate::{TASK_SIZE_MAX, pmd_lock, pmd_lockptr, pte_offset_map_lock, pte_offset_map_rw_nolock};

bitflags::bitflags! {
    /// `mremap` flags (Linux `MREMAP_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MremapFlags: u32 {
        /// The mapping may move if it cannot grow in place.
        const MAYMOVE = 1 << 0;
        /// Move it exactly to `new_addr` (needs `MAYMOVE`), replacing what is
        /// there.
        const FIXED = 1 << 1;
    }
}

impl<'p> Mm<'p> {
    /// Linux `mremap(old_addr, old_len, new_len, flags, new_addr)`. Errors as
    /// Linux: `Invalid` for an unaligned address, a zero `old_len` (no shared mappings here) or `new_len`, `FIXED`
    /// without `MAYMOVE`, overlapping old and new ranges, a hugetlb mapping;
    /// `BadAddress` (`EFAULT`) if `[old_addr, old_addr + old_len)` is not all
    /// inside one VMA; `NoMemory` if it can neither grow in place nor move,
    /// or a table cannot be allocated (then nothing moved).
    pub fn mremap(
        &self,
        old_addr: VirtAddr,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
        new_addr: Option<VirtAddr>,
    ) -> Result<VirtAddr, MmapError> {
        let old = old_addr.as_u64();
        if !old.is_multiple_of(PAGE_SIZE)
            || new_len == 0
            || (flags.contains(MremapFlags::FIXED) && !flags.contains(MremapFlags::MAYMOVE))
        {
            return Err(MmapError::Invalid);
        }
        let round = |l: u64| l.checked_add(PAGE_SIZE - 1).map(|l| l & !(PAGE_SIZE - 1)).ok_or(MmapError::Invalid);
        let (old_len, new_len) = (round(old_len)?, round(new_len)?);
        // Linux accepts an empty old range only for shared mappings (to map
        // the same pages twice); every mapping here is private.
        if old_len == 0 {
            return Err(MmapError::Invalid);
        }
        let old_end = old.checked_add(old_len).filter(|&e| e <= TASK_SIZE_MAX).ok_or(MmapError::Invalid)?;
        let mut tlb = MmuGather::new(self);
        let mut vmas = self.mmap_write_lock();
        let vma = *vmas.find(old_addr).ok_or(MmapError::BadAddress)?;
        if old_end > vma.end.as_u64() {
            return Err(MmapError::BadAddress);
        }
        if vma.flags.is_hugetlb() {
            return Err(MmapError::Invalid);
        }
        let fixed = if flags.contains(MremapFlags::FIXED) {
            let n = new_addr.ok_or(MmapError::Invalid)?.as_u64();
            let n_end = n.checked_add(new_len).filter(|&e| e <= TASK_SIZE_MAX).ok_or(MmapError::Invalid)?;
            if !n.is_multiple_of(PAGE_SIZE) || n < MMAP_MIN_ADDR || (n < old_end && old < n_end) {
                return Err(MmapError::Invalid);
            }
            Some(n)
        } else {
            None
        };
        let result = if let Some(n) = fixed {
            check_hugetlb_cuts(&vmas, n, n + new_len)?;
            // MAP_FIXED's replacement: whatever the new range held goes.
            crate::mmap::do_munmap(&mut vmas, &mut tlb, n, n + new_len)?;
            self.move_vma(&mut vmas, &mut tlb, vma, old, old_len, n, new_len)
        } else if new_len <= old_len {
            // Shrink in place: unmap the tail. The same size changes nothing
            // (Linux: `do_vmi_munmap` of nothing, its error ignored); an
            // empty unmap must not cut the VMA at `old_end`, which may lie
            // inside a THP.
            if new_len < old_len {
                crate::mmap::do_munmap(&mut vmas, &mut tlb, old + new_len, old_end)?;
            }
            Ok(old)
        } else if old_end == vma.end.as_u64()
            && old.checked_add(new_len).is_some_and(|e| e <= TASK_SIZE_MAX && !vmas.intersects(old_end, e))
        {
            // Grow in place: the VMA extends (merging with itself).
            vmas.insert(Vma { start: VirtAddr::new(old_end), end: VirtAddr::new(old + new_len), flags: vma.flags });
            Ok(old)
        } else if flags.contains(MremapFlags::MAYMOVE) {
            let align = if vma.flags.contains(VmFlags::HUGEPAGE) && new_len >= PMD_SIZE { PMD_SIZE } else { PAGE_SIZE };
            let n = vmas.find_gap_top_down(new_len, align, MMAP_BASE).ok_or(MmapError::NoMemory)?;
            self.move_vma(&mut vmas, &mut tlb, vma, old, old_len, n, new_len)
        } else {
            Err(MmapError::NoMemory)
        };
        tlb.flush_tlb_only();
        drop(vmas);
        tlb.finish();
        result.map(VirtAddr::new)
    }

    /// Linux `move_vma`: a VMA at `new` with `vma`'s flags, the entries of
    /// the first `min(old_len, new_len)` bytes moved there, the old range
    /// unmapped. Returns `new`.
    #[allow(clippy::too_many_arguments)]
    fn move_vma(
        &self,
        vmas: &mut crate::mm_struct::MmapWriteGuard<'_, 'p>,
        tlb: &mut MmuGather<'_, 'p>,
        vma: Vma,
        old: u64,
        old_len: u64,
        new: u64,
        new_len: u64,
    ) -> Result<u64, MmapError> {
        let len = old_len.min(new_len);
        // No fault runs in the old range from here on.
        vmas.write_lock_range(old, old + old_len);
        // THPs cut by the moved range's ends, or not 2 MiB aligned at both
        // ends of the move, move as 4 KiB entries.
        for cut in [old, old + len] {
            if cut % PMD_SIZE != 0 {
                split_huge_pmd_address(self, &vma, cut);
            }
        }
        if old % PMD_SIZE != new % PMD_SIZE {
            let mut a = old & !(PMD_SIZE - 1);
            while a < old + len {
                split_huge_pmd_address(self, &vma, a.max(old));
                a += PMD_SIZE;
            }
        }
        vmas.insert(Vma { start: VirtAddr::new(new), end: VirtAddr::new(new + new_len), flags: vma.flags });
        if let Err(e) = prepare_destination(self, old, new, len) {
            // Nothing moved: take the new VMA out again (its tables go with
            // the gap's).
            vmas.remove_range(new, new + new_len);
            let (floor, ceiling) = vmas.gap_around(new, new + new_len);
            free_pgtables(tlb, floor, ceiling, new, new + new_len);
            return Err(e);
        }
        move_page_tables(self, old, new, len);
        // What is left of the old range (if it shrank) goes; its tables too.
        // An empty old range (`old_len` 0: only a new mapping with the old
        // one's flags) removes nothing, and leaves no gap to free.
        if old_len > 0 {
            let removed = vmas.remove_range(old, old + old_len);
            for v in &removed {
                unmap_page_range(tlb, v, v.start.as_u64(), v.end.as_u64(), ZapDetails::default());
            }
            let (floor, ceiling) = vmas.gap_around(old, old + old_len);
            free_pgtables(tlb, floor, ceiling, old, old + old_len);
        }
        Ok(new)
    }
}

/// How one chunk of the move goes.
enum Chunk {
    /// A whole PTE table or a THP: the PMD entry moves.
    Pmd,
    /// Entries of one PTE table (or part of one) move one by one.
    Ptes,
    /// Nothing mapped there.
    Empty,
}

/// The chunk of the move at `old`..`old + len` (`next` is where it ends).
fn chunk_at(mm: &Mm<'_>, old: u64, new: u64, next: u64) -> Chunk {
    let Some(pmd) = walk_pmd(mm, VirtAddr::new(old)) else { return Chunk::Empty };
    let v = pmd.get();
    let whole = old.is_multiple_of(PMD_SIZE) && new.is_multiple_of(PMD_SIZE) && next - old == PMD_SIZE;
    if v.is_none() {
        Chunk::Empty
    } else if whole && (v.is_table() || v.is_leaf()) {
        Chunk::Pmd
    } else if v.is_table() {
        Chunk::Ptes
    } else {
        debug_assert!(false, "a huge PMD only partly moved at {old:#x}");
        Chunk::Empty
    }
}

/// Allocates every destination table the move needs (so the move itself
/// cannot fail): a PMD entry for each chunk, and a PTE table where entries
/// move one by one.
fn prepare_destination(mm: &Mm<'_>, old: u64, new: u64, len: u64) -> Result<(), MmapError> {
    let mut off = 0;
    while off < len {
        let next = addr_end(old + off, PMD_SIZE, old + len) - old;
        let (o, n) = (old + off, new + off);
        match chunk_at(mm, o, n, old + next) {
            Chunk::Empty => {}
            Chunk::Pmd => {
                walk_alloc_pmd(mm, VirtAddr::new(n)).ok_or(MmapError::NoMemory)?;
            }
            Chunk::Ptes => {
                // The new range may straddle two PTE tables.
                for a in [n, n + (next - off) - PAGE_SIZE] {
                    let pmd = walk_alloc_pmd(mm, VirtAddr::new(a)).ok_or(MmapError::NoMemory)?;
                    pte_alloc(mm, pmd).map_err(|_| MmapError::NoMemory)?;
                }
            }
        }
        off = next;
    }
    Ok(())
}

/// Linux `move_page_tables`: moves the entries of `[old, old + len)` to
/// `[new, new + len)`; every destination table exists.
fn move_page_tables(mm: &Mm<'_>, old: u64, new: u64, len: u64) {
    let mut off = 0;
    while off < len {
        let next = addr_end(old + off, PMD_SIZE, old + len) - old;
        let (o, n) = (old + off, new + off);
        match chunk_at(mm, o, n, old + next) {
            Chunk::Empty => {}
            Chunk::Pmd => move_pmd(mm, o, n),
            Chunk::Ptes => {
                // Split where the destination crosses into its next table.
                let mut a = 0;
                while a < next - off {
                    let b = (addr_end(n + a, PMD_SIZE, n + (next - off)) - n).min(next - off);
                    move_ptes(mm, o + a, n + a, b - a);
                    a = b;
                }
            }
        }
        off = next;
    }
}

/// Linux `move_normal_pmd` / `move_huge_pmd`: moves the PMD entry at `old`
/// (a PTE table, or a THP with its deposited table) to the empty one at
/// `new`, under both PMD locks, and shoots the old 2 MiB down before the old
/// lock is dropped.
fn move_pmd(mm: &Mm<'_>, old: u64, new: u64) {
    let old_pmd = walk_pmd(mm, VirtAddr::new(old)).expect("checked by chunk_at");
    let new_pmd = walk_pmd(mm, VirtAddr::new(new)).expect("allocated by prepare_destination");
    let old_pl = pmd_lock(mm, old_pmd);
    let new_ptl = pmd_lockptr(mm, new_pmd);
    // One PMD table (or split locks off): one lock, already held.
    let new_pl = (!new_ptl.is_held_by(&old_pl)).then(|| new_ptl.lock_nested());
    let v = old_pmd.get();
    debug_assert!(new_pmd.get().is_none(), "the destination PMD is not empty");
    set_pmd(mm, old_pmd, Pmd::NONE, &old_pl);
    let new_guard = new_pl.as_ref().unwrap_or(&old_pl);
    if v.is_leaf() {
        // The THP's deposited table belongs to the PMD table it is in.
        let table = pgtable_trans_huge_withdraw(mm, old_pmd, &old_pl);
        pgtable_trans_huge_deposit(mm, new_pmd, table, new_guard);
    }
    set_pmd(mm, new_pmd, v, new_guard);
    flush_tlb_range(
        mm,
        FlushRange { freed_tables: v.is_table(), ..FlushRange::new(VirtAddr::new(old), VirtAddr::new(old + PMD_SIZE)) },
    );
    drop(new_pl);
    drop(old_pl);
}

/// Linux `move_ptes`: moves `len` bytes of 4 KiB entries from `old` to
/// `new`, both ranges inside one PTE table each; the old table's lock plain,
/// the new one's nested (or the same lock, held once); the old range is shot
/// down before the old lock is dropped.
fn move_ptes(mm: &Mm<'_>, old: u64, new: u64, len: u64) {
    let old_pmd = walk_pmd(mm, VirtAddr::new(old)).expect("checked by chunk_at");
    let new_pmd = walk_pmd(mm, VirtAddr::new(new)).expect("allocated by prepare_destination");
    let Some(mut og) = pte_offset_map_lock(mm, old_pmd, VirtAddr::new(old)) else { return };
    let (nmap, _) =
        pte_offset_map_rw_nolock(mm, new_pmd, VirtAddr::new(new)).expect("allocated by prepare_destination");
    let mut moved = false;
    if nmap.ptl().is_held_by(og.ptl()) {
        // One lock for both tables (one table, or split locks off).
        let mut a = 0;
        while a < len {
            let pte = og.ptep_get_and_clear(VirtAddr::new(old + a));
            if !pte.is_none() {
                let ok = og.set_pte_in_table_under_this_lock(&nmap, new_pmd, VirtAddr::new(new + a), pte);
                assert!(ok, "the destination PMD is stable under mmap_lock");
                moved = true;
            }
            a += PAGE_SIZE;
        }
        drop(nmap);
    } else {
        let mut ng = nmap.lock_nested_if_pmd_same(new_pmd).expect("the destination PMD is stable under mmap_lock");
        let mut a = 0;
        while a < len {
            let pte = og.ptep_get_and_clear(VirtAddr::new(old + a));
            if !pte.is_none() {
                ng.set_pte_at(VirtAddr::new(new + a), pte);
                moved = true;
            }
            a += PAGE_SIZE;
        }
        drop(ng);
    }
    if moved {
        // Before the old lock goes: no CPU may keep using the old address.
        flush_tlb_range(mm, FlushRange::new(VirtAddr::new(old), VirtAddr::new(old + len)));
    }
    drop(og);
}
