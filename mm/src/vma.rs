//! Virtual memory areas (Linux `struct vm_area_struct`) and the ordered set
//! of them an address space owns.
//!
//! # Locks
//!
//! A [`VmaSet`] lives inside `Mm::mmap_lock` (a [`RwSpinLock`](crate::lock::RwSpinLock),
//! level 1 of the order): `mmap`, `munmap` and `mprotect` change it under
//! the exclusive lock, `madvise`, populate and faults that could not use
//! their VMA's own lock read it under the shared lock. Faults normally do
//! not touch it at all: they look their VMA up in the published array and
//! lock only that VMA ([`crate::vma_lock`]). The set itself has no lock of
//! its own.
//!
//! # Invariants
//!
//! * VMAs are page aligned, non-empty, and do not overlap.
//! * Neighbours that touch and have equal flags are merged, so the set is the
//!   canonical description of the address space (the property test compares
//!   it with a model page by page *and* interval by interval).
//! * hugetlb VMAs are aligned to their page size at both ends.
//! * No page-table entry maps anything outside a VMA, and a page table exists
//!   only if its span meets a VMA (`munmap` frees tables whose span it
//!   empties). That is what lets `free_pgtables` judge a table by its span.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, VirtAddr};
use crate::vma_lock::VmaNode;

/// Lowest address a mapping may start at (Linux `mmap_min_addr`, 64 KiB):
/// keeps NULL-pointer dereferences faulting.
pub const MMAP_MIN_ADDR: u64 = 0x1_0000;
/// Kernel-chosen addresses are searched top-down from here (Linux
/// `mmap_base`; the space above is left for the stack).
pub const MMAP_BASE: u64 = 0x7fff_0000_0000;
/// At most this many VMAs (Linux `sysctl_max_map_count`).
pub const MAX_MAP_COUNT: usize = 65530;

bitflags::bitflags! {
    /// Memory protection of a mapping (Linux `PROT_*`). Empty is `PROT_NONE`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Prot: u32 {
        /// Readable.
        const READ = 1 << 0;
        /// Writable (on x86_64 this implies readable).
        const WRITE = 1 << 1;
        /// Executable (on x86_64 this implies readable).
        const EXEC = 1 << 2;
    }
}

impl Prot {
    /// `PROT_NONE`.
    pub const NONE: Prot = Prot::empty();
}

bitflags::bitflags! {
    /// `mmap` flags (Linux `MAP_*`; mappings are always private and anonymous).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MapFlags: u32 {
        /// Map exactly at the given address, replacing what is there.
        const FIXED = 1 << 0;
        /// Transparent huge pages welcome (Linux `madvise(MADV_HUGEPAGE)`).
        const HUGEPAGE = 1 << 1;
        /// hugetlb mapping of 2 MiB pages (Linux `MAP_HUGETLB | MAP_HUGE_2MB`).
        const HUGETLB_2M = 1 << 2;
        /// hugetlb mapping of 1 GiB pages (Linux `MAP_HUGETLB | MAP_HUGE_1GB`).
        const HUGETLB_1G = 1 << 3;
        /// Fault every page in before returning (Linux `MAP_POPULATE`).
        const POPULATE = 1 << 4;
    }
}

bitflags::bitflags! {
    /// A VMA's flags (Linux `vm_flags`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct VmFlags: u32 {
        /// `VM_READ`.
        const READ = 1 << 0;
        /// `VM_WRITE`.
        const WRITE = 1 << 1;
        /// `VM_EXEC`.
        const EXEC = 1 << 2;
        /// `VM_HUGEPAGE`: 2 MiB transparent huge pages where they fit.
        const HUGEPAGE = 1 << 3;
        /// `VM_HUGETLB` with 2 MiB pages.
        const HUGETLB_2M = 1 << 4;
        /// `VM_HUGETLB` with 1 GiB pages.
        const HUGETLB_1G = 1 << 5;
    }
}

impl VmFlags {
    /// The access bits.
    pub const PROT_MASK: VmFlags = VmFlags::READ.union(VmFlags::WRITE).union(VmFlags::EXEC);

    /// The flags of a new mapping.
    pub fn from_prot_and_map(prot: Prot, map: MapFlags) -> VmFlags {
        let mut f = Self::from_prot(prot);
        if map.contains(MapFlags::HUGEPAGE) {
            f |= VmFlags::HUGEPAGE;
        }
        if map.contains(MapFlags::HUGETLB_2M) {
            f |= VmFlags::HUGETLB_2M;
        }
        if map.contains(MapFlags::HUGETLB_1G) {
            f |= VmFlags::HUGETLB_1G;
        }
        f
    }

    /// The access bits for `prot`.
    pub fn from_prot(prot: Prot) -> VmFlags {
        let mut f = VmFlags::empty();
        if prot.contains(Prot::READ) {
            f |= VmFlags::READ;
        }
        if prot.contains(Prot::WRITE) {
            f |= VmFlags::WRITE;
        }
        if prot.contains(Prot::EXEC) {
            f |= VmFlags::EXEC;
        }
        f
    }

    /// These flags with their access bits replaced by `prot` (mprotect).
    pub fn with_prot(self, prot: Prot) -> VmFlags {
        self.difference(Self::PROT_MASK) | Self::from_prot(prot)
    }

    /// Linux `vma_is_accessible`: some access is allowed (x86_64 cannot map
    /// write-only or execute-only, so any of the three means readable).
    pub fn is_accessible(self) -> bool {
        self.intersects(Self::PROT_MASK)
    }

    /// Linux `is_vm_hugetlb_page`.
    pub fn is_hugetlb(self) -> bool {
        self.intersects(VmFlags::HUGETLB_2M | VmFlags::HUGETLB_1G)
    }

    /// The size of the pages mapping this VMA: 4 KiB, or the hugetlb size.
    pub fn page_size(self) -> u64 {
        if self.contains(VmFlags::HUGETLB_1G) {
            PUD_SIZE
        } else if self.contains(VmFlags::HUGETLB_2M) {
            PMD_SIZE
        } else {
            PAGE_SIZE
        }
    }
}

/// A virtual memory area: `[start, end)` with one set of flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vma {
    /// First byte (page aligned).
    pub start: VirtAddr,
    /// One past the last byte (page aligned).
    pub end: VirtAddr,
    /// Flags.
    pub flags: VmFlags,
}

impl Vma {
    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: VirtAddr) -> bool {
        self.start <= addr && addr < self.end
    }
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.end.as_u64() - self.start.as_u64()
    }
    /// Never true for a VMA in a set (kept for the `len` convention).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Linux `thp_vma_allowable_order` for PMD order at `addr`: the VMA asked
    /// for huge pages and the whole aligned 2 MiB block around `addr` lies
    /// inside it (a partial block would map memory outside the VMA).
    pub fn thp_suitable(&self, addr: VirtAddr) -> bool {
        let haddr = addr.as_u64() & !(PMD_SIZE - 1);
        self.flags.contains(VmFlags::HUGEPAGE)
            && !self.flags.is_hugetlb()
            && haddr >= self.start.as_u64()
            && haddr + PMD_SIZE <= self.end.as_u64()
    }
}

impl fmt::Debug for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vma({:#x}..{:#x} {:?})", self.start.as_u64(), self.end.as_u64(), self.flags)
    }
}

/// The ordered set of an address space's VMAs, keyed by start address
/// (Linux uses a maple tree; a B-tree gives the same ordered queries).
///
/// It lives inside `mmap_lock`: faults that fall back from their VMA lock
/// read it shared, writers change it exclusive. Each entry is a published
/// [`VmaNode`] with its per-VMA lock ([`crate::vma_lock`]): a change never
/// edits a node, it write-locks and detaches it and inserts new nodes, born
/// locked for the running write session. When the session ends the set is
/// published as the array lock-free faults search.
#[derive(Default)]
pub struct VmaSet {
    map: BTreeMap<u64, Arc<VmaNode>>,
    /// The write session in progress (`mm_lock_seq` when it began).
    session: u64,
    /// Changed since the last publication.
    dirty: bool,
}

impl VmaSet {
    /// An empty set.
    pub const fn new() -> Self {
        Self { map: BTreeMap::new(), session: 0, dirty: false }
    }

    /// Number of VMAs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Linux `vma_lookup`: the VMA containing `addr`.
    pub fn find(&self, addr: VirtAddr) -> Option<&Vma> {
        let (_, v) = self.map.range(..=addr.as_u64()).next_back()?;
        v.vma.contains(addr).then_some(&v.vma)
    }

    /// The VMAs meeting `[start, end)`, in address order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> + '_ {
        self.overlapping_nodes(start, end).map(|n| &n.vma)
    }

    fn overlapping_nodes(&self, start: u64, end: u64) -> impl Iterator<Item = &Arc<VmaNode>> + '_ {
        let first = match self.map.range(..=start).next_back() {
            Some((&s, v)) if v.vma.end.as_u64() > start => s,
            _ => start,
        };
        self.map
            .range(first..end)
            .map(|(_, v)| v)
            .filter(move |v| v.vma.end.as_u64() > start && v.vma.start.as_u64() < end)
    }

    /// Whether `[start, end)` meets any VMA.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).next().is_some()
    }

    /// Whether every byte of `[start, end)` is inside some VMA.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for v in self.overlapping(start, end) {
            if v.start.as_u64() > at {
                return false;
            }
            at = v.end.as_u64();
        }
        at >= end
    }

    /// The free gap around the (free) range `[start, end)`: from the end of
    /// the VMA below (or 0) to the start of the VMA above (or the ceiling of
    /// user page tables). Linux `free_pgtables`' floor and ceiling.
    pub fn gap_around(&self, start: u64, end: u64) -> (u64, u64) {
        let floor = self.map.range(..start).next_back().map_or(0, |(_, v)| v.vma.end.as_u64());
        let ceiling =
            self.map.range(end..).next().map_or(crate::addr::USER_PGTABLES_CEILING, |(_, v)| v.vma.start.as_u64());
        debug_assert!(floor <= start && end <= ceiling, "gap_around of a range that is not free");
        (floor, ceiling)
    }

    /// Linux `vm_unmapped_area` (top-down): the highest `len`-byte range,
    /// aligned to `align`, inside `[MMAP_MIN_ADDR, limit)` and meeting no VMA.
    pub fn find_gap_top_down(&self, len: u64, align: u64, limit: u64) -> Option<u64> {
        let mut hi = limit;
        // Walk the VMAs below `limit` from the top; each gap is [prev.end, hi).
        for (_, v) in self.map.range(..limit).rev() {
            if let Some(a) = Self::fit(v.vma.end.as_u64().max(MMAP_MIN_ADDR), hi, len, align) {
                return Some(a);
            }
            hi = hi.min(v.vma.start.as_u64());
        }
        Self::fit(MMAP_MIN_ADDR, hi, len, align)
    }

    fn fit(lo: u64, hi: u64, len: u64, align: u64) -> Option<u64> {
        let top = hi.checked_sub(len)? & !(align - 1);
        (top >= lo && hi > lo).then_some(top)
    }

    /// Starts a write session (the caller took `mmap_lock` exclusive;
    /// `session` is the address space's `mm_lock_seq`).
    pub(crate) fn begin_session(&mut self, session: u64) {
        self.session = session;
    }

    /// Linux `vma_start_write` on every VMA: no fault runs in any of them
    /// until the session ends (fork copies the page tables of all of them).
    pub(crate) fn write_lock_all(&self) {
        for n in self.map.values() {
            n.lock.start_write(self.session);
        }
    }

    /// Linux `vma_start_write` on every VMA meeting `[start, end)`: the
    /// faults inside finish, later ones wait for the session's end (mremap
    /// moves the range's entries before it replaces its VMAs).
    pub(crate) fn write_lock_range(&self, start: u64, end: u64) {
        for n in self.overlapping_nodes(start, end) {
            n.lock.start_write(self.session);
        }
    }

    /// Takes `node` out of service: write-locks it (faults inside finish
    /// first) and marks it detached. The caller removes or replaces it.
    fn retire(&mut self, node: &VmaNode) {
        node.lock.start_write(self.session);
        node.lock.detach();
        self.dirty = true;
    }

    fn put(&mut self, vma: Vma) {
        self.map.insert(vma.start.as_u64(), VmaNode::new(vma, self.session));
        self.dirty = true;
    }

    /// Replaces the node at `key` by `vmas` (after retiring it).
    fn replace(&mut self, key: u64, vmas: &[Vma]) {
        let old = self.map.remove(&key).expect("replacing a VMA that is not in the set");
        self.retire(&old);
        for &v in vmas {
            self.put(v);
        }
    }

    /// Cuts the VMAs meeting `[start, end)` so that no VMA straddles `start`
    /// or `end` (Linux `split_vma` at both ends). An empty range cuts
    /// nothing: nothing is removed or changed there, so a cut would only
    /// leave two equal neighbours unmerged (and the caller, which splits the
    /// THPs at the cuts of the ranges it changes, would not split one cut
    /// there: a THP spanning two VMAs, which fork would copy twice).
    pub(crate) fn split_at_bounds(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        for cut in [start, end] {
            let hit = self.map.range(..cut).next_back().map(|(_, v)| v.vma).filter(|v| v.end.as_u64() > cut);
            if let Some(v) = hit {
                let c = VirtAddr::new(cut);
                self.replace(v.start.as_u64(), &[Vma { end: c, ..v }, Vma { start: c, ..v }]);
            }
        }
    }

    /// Removes every VMA piece inside `[start, end)` (after splitting at the
    /// bounds) and returns the pieces in address order. Each was
    /// write-locked first: no fault is left inside it.
    pub(crate) fn remove_range(&mut self, start: u64, end: u64) -> Vec<Vma> {
        self.split_at_bounds(start, end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let node = self.map.remove(&k).expect("listed above");
            self.retire(&node);
            out.push(node.vma);
        }
        out
    }

    /// Inserts a VMA over a free range, merging it with equal-flag neighbours
    /// it touches (Linux `vma_merge`): what `mmap` does once it found the
    /// range. Only a write session (`Mm::mmap_write_lock`) reaches a
    /// `&mut VmaSet`; a neighbour that merges is replaced, so faults on it
    /// wait for the session to end.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(!self.intersects(vma.start.as_u64(), vma.end.as_u64()), "insert over a mapped range");
        debug_assert!(vma.start < vma.end);
        self.put(vma);
        self.merge_around(vma.start.as_u64(), vma.end.as_u64());
    }

    /// Merges equal-flag neighbours touching anywhere in `[start, end]`.
    pub(crate) fn merge_around(&mut self, start: u64, end: u64) {
        let from = self.map.range(..start).next_back().map_or(start, |(&k, _)| k);
        let keys: Vec<u64> = self.map.range(from..=end).map(|(&k, _)| k).collect();
        let mut prev: Option<Vma> = None;
        for k in keys {
            let cur = self.map[&k].vma;
            if let Some(pv) = prev
                && pv.end == cur.start
                && pv.flags == cur.flags
            {
                let merged = Vma { end: cur.end, ..pv };
                let node = self.map.remove(&k).expect("listed above");
                self.retire(&node);
                self.replace(pv.start.as_u64(), &[merged]);
                prev = Some(merged);
                continue;
            }
            prev = Some(cur);
        }
    }

    /// Replaces the flags of the VMA starting at `start` (which the caller
    /// split out beforehand).
    pub(crate) fn set_flags(&mut self, start: u64, flags: VmFlags) {
        if let Some(v) = self.map.get(&start).map(|n| n.vma) {
            self.replace(start, &[Vma { flags, ..v }]);
        }
    }

    /// Takes every VMA out (address-space teardown: nobody can look them up).
    pub(crate) fn take_all(&mut self) -> Vec<Vma> {
        self.dirty = true;
        core::mem::take(&mut self.map).into_values().map(|n| n.vma).collect()
    }

    /// Every VMA, in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> + '_ {
        self.map.values().map(|n| &n.vma)
    }

    /// Every VMA node with its lock, in address order (reports, gdb).
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<VmaNode>> + '_ {
        self.map.values()
    }

    /// Ends the write session: if anything changed, the array faults search
    /// (the caller publishes it before bumping `mm_lock_seq`).
    pub(crate) fn end_session(&mut self) -> Option<alloc::boxed::Box<crate::vma_lock::VmaArray>> {
        let changed = core::mem::take(&mut self.dirty);
        changed.then(|| crate::vma_lock::VmaArray::new(self.map.values().cloned()))
    }
}

impl fmt::Debug for VmaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.map.values().map(|n| n.vma)).finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn vma(s: u64, e: u64, f: VmFlags) -> Vma {
        Vma { start: VirtAddr::new(s), end: VirtAddr::new(e), flags: f }
    }
    const RW: VmFlags = VmFlags::READ.union(VmFlags::WRITE);
    const R: VmFlags = VmFlags::READ;

    #[test]
    fn insert_merges_equal_neighbours_only() {
        let mut s = VmaSet::new();
        s.insert(vma(0x10000, 0x20000, RW));
        s.insert(vma(0x30000, 0x40000, RW));
        s.insert(vma(0x20000, 0x30000, RW));
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), [vma(0x10000, 0x40000, RW)]);
        s.insert(vma(0x40000, 0x50000, R));
        assert_eq!(s.len(), 2);
        assert_eq!(s.find(VirtAddr::new(0x3ffff)).unwrap().flags, RW);
        assert_eq!(s.find(VirtAddr::new(0x40000)).unwrap().flags, R);
        assert!(s.find(VirtAddr::new(0x50000)).is_none());
    }

    #[test]
    fn remove_range_splits_and_reports_pieces() {
        let mut s = VmaSet::new();
        s.insert(vma(0x10000, 0x40000, RW));
        s.insert(vma(0x50000, 0x60000, R));
        let gone = s.remove_range(0x20000, 0x58000);
        assert_eq!(gone, [vma(0x20000, 0x40000, RW), vma(0x50000, 0x58000, R)]);
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), [vma(0x10000, 0x20000, RW), vma(0x58000, 0x60000, R)]);
        assert_eq!(s.gap_around(0x20000, 0x58000), (0x20000, 0x58000));
        assert!(s.covers(0x10000, 0x20000) && !s.covers(0x10000, 0x21000));
    }

    #[test]
    fn top_down_search_finds_the_highest_aligned_gap() {
        let mut s = VmaSet::new();
        assert_eq!(s.find_gap_top_down(0x1000, PAGE_SIZE, MMAP_BASE), Some(MMAP_BASE - 0x1000));
        s.insert(vma(MMAP_BASE - 0x3000, MMAP_BASE, RW));
        assert_eq!(s.find_gap_top_down(0x2000, PAGE_SIZE, MMAP_BASE), Some(MMAP_BASE - 0x5000));
        let a = s.find_gap_top_down(PMD_SIZE, PMD_SIZE, MMAP_BASE).unwrap();
        assert_eq!(a % PMD_SIZE, 0);
        assert!(a + PMD_SIZE <= MMAP_BASE - 0x3000);
        assert!(s.find_gap_top_down(MMAP_BASE, PAGE_SIZE, MMAP_BASE).is_none());
    }
}
