//! The memmap: one [`Page`] descriptor per usable frame (Linux's `struct page`
//! array), found by PFN arithmetic.
//!
//! RAM arrives as a handful of ranges with holes between them. Each range
//! becomes a section: its base PFN and a slice of descriptors, so a hole
//! costs nothing. Lookup is a binary search over the (few, sorted) sections.
//! The descriptor arrays themselves are carved out of RAM at boot (`bootmem`),
//! before any allocator exists.
//!
//! # Which lock protects which field
//!
//! | field | protected by |
//! | --- | --- |
//! | `kind`, `pt_level`, `refcount` | owner of the frame (atomics, so debug checks may read them anywhere) |
//! | `flags` `BUDDY`, `order` | the zone lock |
//! | `flags` `PCP` | the per-CPU list lock |
//! | `flags` `PTL` | owner of the page table (its constructor and destructor) |
//! | `lru` | whichever free list the frame is on (zone lock or per-CPU list lock) |
//! | `word` | the frame's owner; for a page table, only through `ptdesc` (`ptl`) |
//! | `owner` | the allocator, on behalf of the frame's owner at its allocation and free (debug builds' page poisoning) |
//! | `link` | PMD table: head of its deposited PTE tables (`pmd_huge_pte`), under its PMD lock; deposited PTE table: next in that list, same lock; frame or table waiting in an `MmuGather`: next in the gather's list, owned by the gather (a frame only if its cleared mapping held its only reference: a frame shared since a fork may be in two gathers at once and waits in the gather's array instead) |

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::{ManuallyDrop, size_of};
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64};

use crate::addr::{DirectMap, PAGE_SIZE, Pfn, PhysAddr};
use crate::ptlock::PtlStorage;

/// What a frame is currently used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// In the frame allocator (buddy lists or a per-CPU cache).
    Free = 0,
    /// Never handed to the allocator (firmware, boot structures).
    Reserved = 1,
    /// Holds the memmap itself.
    Memmap = 2,
    /// The kernel heap (taken at boot through bootmem).
    Heap = 3,
    /// Allocated, no more specific use recorded.
    Kernel = 4,
    /// Anonymous user memory.
    Anon = 5,
    /// A page-table page; its descriptor is viewed as a `Ptdesc`.
    PageTable = 6,
    /// The shared zero page.
    ZeroPage = 7,
    /// A 1 GiB frame of the gigantic hugetlb pool (reserved at boot).
    Gigantic = 8,
}

impl PageKind {
    pub(crate) fn from_u8(v: u8) -> PageKind {
        match v {
            0 => PageKind::Free,
            1 => PageKind::Reserved,
            2 => PageKind::Memmap,
            3 => PageKind::Heap,
            4 => PageKind::Kernel,
            5 => PageKind::Anon,
            6 => PageKind::PageTable,
            7 => PageKind::ZeroPage,
            8 => PageKind::Gigantic,
            _ => PageKind::Reserved,
        }
    }
}

/// Free-list links (PFNs; [`Links::NONE`] ends a list). Stored in the
/// descriptor rather than the free frame so that free memory is never written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Links {
    pub(crate) prev: u64,
    pub(crate) next: u64,
}

impl Links {
    pub(crate) const NONE: u64 = u64::MAX;
}

/// The word that different kinds of page use differently (Linux: the union
/// holding `ptl`, `private`, `slab_cache`). Page tables keep their `ptl` here;
/// that is why page tables must never be slab pages (a slab would reuse it).
#[repr(C)]
pub(crate) union PageWord {
    /// Page tables: the split lock, inline or a pointer (`ptlock.rs`).
    pub(crate) ptl: ManuallyDrop<PtlStorage>,
    /// Other owners: free for their use.
    pub(crate) private: usize,
}

/// `flags` bit: head of a free block on a buddy list (`order` valid).
pub(crate) const PG_BUDDY: u8 = 1 << 0;
/// `flags` bit: on a per-CPU free list.
pub(crate) const PG_PCP: u8 = 1 << 1;
/// `flags` bit: page table whose split lock was constructed.
pub(crate) const PG_PTL: u8 = 1 << 2;

/// The descriptor of one 4 KiB frame. Aligned to a cache line so that two
/// tables' inline locks never share one (that sharing would bring back the
/// contention split locks remove).
#[repr(C, align(64))]
pub struct Page {
    kind: AtomicU8,
    pub(crate) flags: AtomicU8,
    pub(crate) order: AtomicU8,
    pub(crate) pt_level: AtomicU8,
    pub(crate) refcount: AtomicU32,
    pub(crate) lru: UnsafeCell<Links>,
    pub(crate) word: UnsafeCell<PageWord>,
    /// An owner-private list link (see the module's lock table). An atomic
    /// so that it needs no `unsafe`; each use is serialised by its owner.
    pub(crate) link: AtomicU64,
    /// Debug builds' page poisoning: the frame's last owner (allocation
    /// site; kind and CPU once freed), see `frame::poison`. Written by the
    /// allocator on the owner's behalf at allocation and free; 0 for a
    /// frame not allocated since boot. Unused in release builds.
    pub(crate) owner: AtomicU64,
    /// The per-CPU list this frame was last allocated from (order 0), where
    /// its free sends it back (`frame::FrameAllocator::free_bulk`). Written
    /// by the allocating CPU under that list's lock; read by the freeing
    /// one, which owns the frame by then.
    pub(crate) home: AtomicU16,
}

// The struct-page budget: at most 64 bytes per 4 KiB frame (1.5625% of RAM).
const _: () = assert!(size_of::<Page>() <= 64, "struct Page grew beyond 64 bytes");

// SAFETY: the atomics are Sync; `lru` and `word` are only accessed under the
// locks named in the module comment (free lists) or by the frame's exclusive
// owner (ctor/dtor of page tables), and the `ptl` inside `word` is itself a
// lock whose atomics make shared use sound.
unsafe impl Sync for Page {}
// SAFETY: a Page is plain memory with no thread affinity: nothing in it is
// tied to the thread that created it.
unsafe impl Send for Page {}

impl Page {
    /// A descriptor for a frame of `kind`.
    pub(crate) fn new(kind: PageKind) -> Self {
        Self {
            kind: AtomicU8::new(kind as u8),
            flags: AtomicU8::new(0),
            order: AtomicU8::new(0),
            pt_level: AtomicU8::new(0),
            refcount: AtomicU32::new(0),
            lru: UnsafeCell::new(Links { prev: Links::NONE, next: Links::NONE }),
            word: UnsafeCell::new(PageWord { private: 0 }),
            link: AtomicU64::new(0),
            owner: AtomicU64::new(0),
            home: AtomicU16::new(0),
        }
    }

    /// What the frame is used for.
    pub fn kind(&self) -> PageKind {
        PageKind::from_u8(self.kind.load(Relaxed))
    }

    /// Records what the frame is used for (by its owner).
    pub fn set_kind(&self, kind: PageKind) {
        self.kind.store(kind as u8, Relaxed);
    }

    /// The reference count (1 while allocated, 0 while free, for now).
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Relaxed)
    }

    pub(crate) fn has_flag(&self, f: u8) -> bool {
        self.flags.load(Relaxed) & f != 0
    }
    // A page's flags have one writer at a time: the page's owner (PG_PTL in a
    // table's constructor and destructor), or, while the frame is free, the
    // holder of the lock of the free list it sits on (zone lock for
    // PG_BUDDY, per-CPU list lock for PG_PCP; a move between lists holds
    // both). Others only read them. So an update is a load and a store, not
    // a locked read-modify-write: QEMU's parallel TCG runs a locked
    // instruction through a helper call, and the fault path sets and clears
    // PG_PCP once per frame.
    pub(crate) fn set_flag(&self, f: u8) {
        self.flags.store(self.flags.load(Relaxed) | f, Relaxed);
    }
    pub(crate) fn clear_flag(&self, f: u8) {
        self.flags.store(self.flags.load(Relaxed) & !f, Relaxed);
    }
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("kind", &self.kind())
            .field("flags", &self.flags.load(Relaxed))
            .field("order", &self.order.load(Relaxed))
            .finish()
    }
}

/// A run of frames without holes and its descriptors.
#[derive(Clone, Copy)]
pub(crate) struct Section {
    pub(crate) base: Pfn,
    pub(crate) nr: u64,
    pub(crate) pages: *const Page,
}

impl Section {
    const EMPTY: Section = Section { base: Pfn::new(0), nr: 0, pages: core::ptr::null() };
    fn contains(&self, pfn: Pfn) -> bool {
        pfn.as_u64() >= self.base.as_u64() && pfn.as_u64() - self.base.as_u64() < self.nr
    }
}

/// Maximum number of holes-free RAM ranges (bootloader memory maps have a few).
pub const MAX_SECTIONS: usize = 64;

/// `pfn >> CHUNK_SHIFT` is a frame's 1 GiB chunk of the physical address
/// space, the unit of [`MemMap`]'s lookup hint.
const CHUNK_SHIFT: u32 = 18;

/// Chunks the hint covers: the first TiB of physical addresses (frames
/// above it are found by binary search).
const HINT_CHUNKS: usize = 1024;

/// A hint entry for a chunk no section overlaps.
const NO_SECTION: u8 = u8::MAX;

/// The memmap: sections sorted by PFN.
///
/// `pfn_to_page` is on every hot path (each PTE read, each frame allocated
/// or freed), so the section of a frame is found in O(1): `hint` gives, per
/// 1 GiB chunk, the section that covers most of it, and only a frame outside
/// that section (in a chunk with a hole, such as the first, whose low 640
/// KiB is its own section) needs the binary search. Linux's SPARSEMEM
/// indexes its `mem_section` array the same way, by the high bits of the
/// PFN; its sections have a fixed size and so need no search at all.
pub struct MemMap {
    sections: [Section; MAX_SECTIONS],
    nr_sections: usize,
    /// Per 1 GiB chunk: the index of the section that covers most of it, or
    /// `NO_SECTION`.
    hint: [u8; HINT_CHUNKS],
    window: DirectMap,
    bytes: u64,
}

// SAFETY: the section pointers refer to descriptors that live as long as the
// MemMap (guaranteed by whoever built it, see `MemMap::new`); `Page` is Sync.
unsafe impl Sync for MemMap {}
// SAFETY: the section pointers stay valid wherever the MemMap goes (the
// descriptors live in RAM it does not own and outlives); `Page` is Sync.
unsafe impl Send for MemMap {}

impl MemMap {
    /// Builds the memmap from sorted, non-overlapping, page-aligned RAM ranges,
    /// writing one descriptor (kind `Free`) per frame at `at`, which must have
    /// room for `descriptor_bytes(ranges)` bytes.
    ///
    /// # Safety
    ///
    /// `at` is the physical address of writable RAM, seen through `window`,
    /// 64-byte aligned, large enough, used for nothing else, and valid together
    /// with every frame of `ranges` for as long as the returned MemMap and
    /// anything borrowing it live.
    pub(crate) unsafe fn new(ranges: &[(PhysAddr, PhysAddr)], at: PhysAddr, window: DirectMap) -> Self {
        assert!(ranges.len() <= MAX_SECTIONS, "too many RAM ranges");
        let mut sections = [Section::EMPTY; MAX_SECTIONS];
        let mut cursor = window.virt(at).cast::<Page>();
        assert!(cursor.is_aligned(), "memmap not aligned for Page");
        for (i, &(start, end)) in ranges.iter().enumerate() {
            let nr = (end.as_u64() - start.as_u64()) / PAGE_SIZE;
            for j in 0..nr as usize {
                // SAFETY: `at` has room for one descriptor per frame of every
                // range (caller), and nothing else uses that memory.
                unsafe { cursor.add(j).write(Page::new(PageKind::Free)) };
            }
            sections[i] = Section { base: start.pfn(), nr, pages: cursor };
            // SAFETY: still inside the memmap area (one past this section's end
            // at most).
            cursor = unsafe { cursor.add(nr as usize) };
        }
        let bytes = Self::descriptor_bytes(ranges);
        let hint = Self::hints(&sections[..ranges.len()]);
        Self { sections, nr_sections: ranges.len(), hint, window, bytes }
    }

    /// The lookup hint of `sections` (see [`MemMap`]).
    fn hints(sections: &[Section]) -> [u8; HINT_CHUNKS] {
        let mut hint = [NO_SECTION; HINT_CHUNKS];
        for (c, h) in hint.iter_mut().enumerate() {
            let (start, end) = ((c as u64) << CHUNK_SHIFT, (c as u64 + 1) << CHUNK_SHIFT);
            let overlap = |s: &Section| {
                let (b, e) = (s.base.as_u64(), s.base.as_u64() + s.nr);
                e.min(end).saturating_sub(b.max(start))
            };
            if let Some((i, s)) = sections.iter().enumerate().max_by_key(|(_, s)| overlap(s))
                && overlap(s) > 0
            {
                *h = i as u8;
            }
        }
        hint
    }

    /// Bytes of descriptors needed for `ranges`.
    pub(crate) fn descriptor_bytes(ranges: &[(PhysAddr, PhysAddr)]) -> u64 {
        let frames: u64 = ranges.iter().map(|(s, e)| (e.as_u64() - s.as_u64()) / PAGE_SIZE).sum();
        frames * size_of::<Page>() as u64
    }

    #[inline]
    fn section_of(&self, pfn: Pfn) -> Option<&Section> {
        if let Some(&i) = self.hint.get((pfn.as_u64() >> CHUNK_SHIFT) as usize)
            && let Some(s) = self.sections.get(i as usize)
            && s.contains(pfn)
        {
            return Some(s);
        }
        self.search(pfn)
    }

    /// The section of `pfn` by binary search (frames the hint misses).
    #[cold]
    fn search(&self, pfn: Pfn) -> Option<&Section> {
        let secs = &self.sections[..self.nr_sections];
        let i = secs.partition_point(|s| s.base.as_u64() <= pfn.as_u64());
        let s = secs.get(i.checked_sub(1)?)?;
        s.contains(pfn).then_some(s)
    }

    /// The descriptor of `pfn` (Linux `pfn_to_page`), or `None` for a frame the
    /// memmap does not cover (a hole, or memory that is not usable RAM).
    #[inline]
    pub fn pfn_to_page(&self, pfn: Pfn) -> Option<&Page> {
        let s = self.section_of(pfn)?;
        // SAFETY: `pfn` is inside the section, so the index is within its
        // descriptor array, which lives as long as `self` (see `new`).
        Some(unsafe { &*s.pages.add((pfn.as_u64() - s.base.as_u64()) as usize) })
    }

    /// The frame a descriptor describes (Linux `page_to_pfn`).
    pub fn page_to_pfn(&self, page: &Page) -> Pfn {
        let p = page as *const Page as usize;
        for s in &self.sections[..self.nr_sections] {
            let base = s.pages as usize;
            if p >= base && p < base + s.nr as usize * size_of::<Page>() {
                return s.base.add(((p - base) / size_of::<Page>()) as u64);
            }
        }
        panic!("page_to_pfn: descriptor {p:#x} is not in the memmap");
    }

    /// Linux `phys_to_page`.
    pub fn phys_to_page(&self, pa: PhysAddr) -> Option<&Page> {
        self.pfn_to_page(pa.pfn())
    }

    /// Linux `page_to_phys`.
    pub fn page_to_phys(&self, page: &Page) -> PhysAddr {
        self.page_to_pfn(page).phys()
    }

    /// Linux `page_address` / `page_to_virt`: the direct-map address.
    pub fn page_to_virt(&self, page: &Page) -> *mut u8 {
        self.window.virt(self.page_to_phys(page))
    }

    /// Linux `virt_to_page`.
    pub fn virt_to_page(&self, va: *const u8) -> Option<&Page> {
        self.phys_to_page(self.window.phys(va))
    }

    /// Whether `pfn` is covered.
    pub fn contains(&self, pfn: Pfn) -> bool {
        self.section_of(pfn).is_some()
    }

    /// The direct map this memmap was built with.
    pub fn window(&self) -> DirectMap {
        self.window
    }

    /// Frames covered (usable RAM, including what the memmap itself uses).
    pub fn nr_frames(&self) -> u64 {
        self.sections[..self.nr_sections].iter().map(|s| s.nr).sum()
    }

    /// The sections as (base PFN, frame count).
    pub fn sections(&self) -> impl Iterator<Item = (Pfn, u64)> + '_ {
        self.sections[..self.nr_sections].iter().map(|s| (s.base, s.nr))
    }

    /// Bytes the descriptors occupy.
    pub fn overhead_bytes(&self) -> u64 {
        self.bytes
    }
}

/// Figures for the boot report: the descriptor size and the memmap's cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapStats {
    /// `size_of::<Page>()`.
    pub page_descriptor_bytes: usize,
    /// Frames described.
    pub frames: u64,
    /// Bytes of descriptors.
    pub overhead_bytes: u64,
    /// Overhead per 10^6 bytes of described RAM (15625 = 1.5625%).
    pub overhead_ppm: u64,
}

impl MemMap {
    /// The report figures.
    pub fn stats(&self) -> MemmapStats {
        let ram = self.nr_frames() * PAGE_SIZE;
        MemmapStats {
            page_descriptor_bytes: size_of::<Page>(),
            frames: self.nr_frames(),
            overhead_bytes: self.bytes,
            overhead_ppm: (self.bytes * 1_000_000).checked_div(ram).unwrap_or(0),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::testing::TestMachine;

    #[test]
    fn page_is_one_cache_line() {
        assert_eq!(size_of::<Page>(), 64);
        assert_eq!(core::mem::align_of::<Page>(), 64);
    }

    #[test]
    fn holes_cost_nothing_and_conversions_round_trip() {
        // Two RAM ranges with a 1 MiB hole between them.
        let m = TestMachine::with_regions(&[(0x10_0000, 0x20_0000), (0x30_0000, 0x40_0000)]);
        let map = m.phys.memmap();
        assert_eq!(map.nr_frames(), 512);
        assert_eq!(map.overhead_bytes(), 512 * 64);
        assert_eq!(map.stats().overhead_ppm, 15625);
        assert!(map.pfn_to_page(Pfn::new(0x250)).is_none(), "hole has a descriptor");
        assert!(map.pfn_to_page(Pfn::new(0xff)).is_none());
        assert!(map.pfn_to_page(Pfn::new(0x400)).is_none());
        for pfn in [0x100u64, 0x1ff, 0x300, 0x3ff] {
            let page = map.pfn_to_page(Pfn::new(pfn)).unwrap();
            assert_eq!(map.page_to_pfn(page), Pfn::new(pfn));
            assert_eq!(map.page_to_phys(page), Pfn::new(pfn).phys());
            let va = map.page_to_virt(page);
            assert!(core::ptr::eq(map.virt_to_page(va).unwrap(), page));
        }
    }

    /// The O(1) section lookup (the hint per 1 GiB chunk, `MemMap`'s
    /// comment) finds what the binary search finds, for every frame around
    /// every section's edges: a chunk with a small section and a large one
    /// (the PC's first chunk, with its 640 KiB), a section across a chunk
    /// boundary, a chunk with two sections and a hole, holes, and a section
    /// beyond the chunks the hint covers. (It fails when the hint picks a
    /// section that does not contain the frame and the lookup trusts it.)
    #[test]
    fn the_hinted_lookup_finds_what_the_search_finds() {
        const G: u64 = 1 << CHUNK_SHIFT;
        let ranges = [
            (0, 160),
            (256, 2 * G + 100),
            (3 * G + 10, 3 * G + 20),
            (3 * G + 30, 3 * G + 40),
            ((HINT_CHUNKS as u64 + 2) * G, (HINT_CHUNKS as u64 + 2) * G + 5),
        ];
        let mut sections = [Section::EMPTY; MAX_SECTIONS];
        for (i, &(b, e)) in ranges.iter().enumerate() {
            sections[i] = Section { base: Pfn::new(b), nr: e - b, pages: core::ptr::null() };
        }
        let hint = MemMap::hints(&sections[..ranges.len()]);
        assert_eq!(&hint[..3], &[1, 1, 1], "the section with most of each chunk");
        assert!(matches!(hint[3], 2 | 3), "a chunk with two sections of 10 frames each");
        assert_eq!(hint[4], NO_SECTION);
        let map = MemMap { sections, nr_sections: ranges.len(), hint, window: DirectMap::new(0), bytes: 0 };
        for &(b, e) in &ranges {
            for pfn in (b.saturating_sub(3)..b + 3).chain(e - 3..e + 3) {
                let pfn = Pfn::new(pfn);
                let (fast, slow) = (map.section_of(pfn), map.search(pfn));
                assert_eq!(fast.map(|s| s.base), slow.map(|s| s.base), "pfn {:#x}", pfn.as_u64());
                assert_eq!(fast.is_some(), ranges.iter().any(|&(b, e)| (b..e).contains(&pfn.as_u64())));
            }
        }
    }

    #[test]
    fn the_memmap_is_carved_from_ram_and_marked() {
        let m = TestMachine::with_regions(&[(0x10_0000, 0x50_0000)]);
        let map = m.phys.memmap();
        let memmap_frames =
            (0x100..0x500).filter(|&p| map.pfn_to_page(Pfn::new(p)).unwrap().kind() == PageKind::Memmap).count() as u64;
        assert_eq!(memmap_frames, map.overhead_bytes().div_ceil(PAGE_SIZE));
    }
}
