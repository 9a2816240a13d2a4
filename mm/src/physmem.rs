//! All of physical memory: the memmap, the frame allocator, the direct-map
//! window and the failure injector (Linux spreads these over `pglist_data`,
//! `zone` and globals).
//!
//! Everything is an instance, not a global, for two reasons: host tests run in
//! parallel threads and each builds its own `PhysMem` over its own buffer, so
//! exact free-frame counts never see another test's allocations; and loom
//! models must create their atomics inside each explored execution. The kernel
//! builds exactly one with [`crate::init`] and reaches it through
//! [`crate::phys`].

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};

use crate::addr::{DirectMap, PAGE_SIZE, Pfn, PhysAddr};
use crate::bootmem::BootMem;
use crate::frame::{FrameAllocator, Frames, MAX_ORDER};
use crate::gigantic::GiganticPool;
use crate::memmap::{MemMap, MemmapStats, Page, PageKind};
use crate::ptlock::{FailSite, FaultInject};
use crate::table_rcu::{TableRcu, TableRcuStats};

/// Physical memory: memmap + frame allocator + the gigantic pool + the zero
/// page.
pub struct PhysMem {
    memmap: MemMap,
    allocator: FrameAllocator,
    gigantic: GiganticPool,
    /// The shared zero page (Linux `ZERO_PAGE(0)`), allocated at creation
    /// and never freed.
    zero_pfn: Pfn,
    fault: FaultInject,
    /// Allocated split locks alive (ALLOC_SPLIT_PTLOCKS builds), for leak checks.
    pub(crate) ptl_live: AtomicU64,
    /// Detached page tables waiting for a grace period.
    pub(crate) table_rcu: TableRcu,
    #[cfg(loom)]
    pub(crate) loom_words: crate::pgtable::slot::LoomWords,
}

impl PhysMem {
    /// Carves the memmap out of usable RAM (bootmem-style), marks what boot
    /// took, and hands every remaining frame to the buddy allocator in the
    /// largest aligned blocks that fit.
    ///
    /// Panics if RAM cannot even hold the memmap.
    pub fn new(mut boot: BootMem) -> Self {
        let usable = boot.usable();
        let mut ranges = [(PhysAddr::new(0), PhysAddr::new(0)); crate::memmap::MAX_SECTIONS];
        let n = usable.len();
        ranges[..n].copy_from_slice(usable);
        let ranges = &ranges[..n];
        let bytes = MemMap::descriptor_bytes(ranges);
        let at = boot.alloc(bytes, PAGE_SIZE, PageKind::Memmap).expect("not enough contiguous RAM for the memmap");
        // SAFETY: `at` is a fresh bootmem range of `bytes` bytes inside usable
        // RAM; BootMem::new's contract makes that RAM and every usable range
        // ours and mapped by the window for the life of this PhysMem.
        let memmap = unsafe { MemMap::new(ranges, at, boot.window) };
        for &((s, e), kind) in boot.reserved() {
            let mut pfn = s.pfn();
            while pfn < e.pfn() {
                memmap.pfn_to_page(pfn).expect("reserved range outside RAM").set_kind(kind);
                pfn = pfn.add(1);
            }
        }
        let mut phys = Self {
            memmap,
            allocator: FrameAllocator::new(),
            gigantic: GiganticPool::new(),
            zero_pfn: Pfn::new(0),
            fault: FaultInject::new(),
            ptl_live: AtomicU64::new(0),
            table_rcu: TableRcu::new(),
            #[cfg(loom)]
            loom_words: crate::pgtable::slot::LoomWords::new(),
        };
        for &(s, e) in boot.free_ranges() {
            let (mut pfn, end) = (s.pfn().as_u64(), e.pfn().as_u64());
            while pfn < end {
                let align = if pfn == 0 { MAX_ORDER as u32 } else { pfn.trailing_zeros() };
                let fit = (end - pfn).ilog2();
                let order = align.min(fit).min(MAX_ORDER as u32) as usize;
                // SAFETY: free bootmem RAM, covered by the memmap, aligned to
                // its order by construction, never handed out before.
                unsafe { phys.allocator.add_free_block(&phys.memmap, Pfn::new(pfn), order) };
                pfn += 1 << order;
            }
        }
        for &((s, e), kind) in boot.reserved() {
            if kind == PageKind::Gigantic {
                let mut pa = s;
                while pa < e {
                    phys.gigantic.add(pa.pfn());
                    pa = pa.add(crate::addr::PUD_SIZE);
                }
            }
        }
        let (zero, _) = phys.alloc_pages_zeroed(0).expect("no frame for the zero page").into_raw();
        phys.page(zero).expect("allocated").set_kind(PageKind::ZeroPage);
        phys.zero_pfn = zero;
        phys
    }

    /// The shared zero page's frame (Linux `my_zero_pfn`): mapped read-only
    /// by read faults on anonymous memory, never written, never freed.
    pub fn zero_pfn(&self) -> Pfn {
        self.zero_pfn
    }

    /// The pool of 1 GiB hugetlb frames.
    pub fn gigantic_pool(&self) -> &GiganticPool {
        &self.gigantic
    }

    /// The memmap.
    pub fn memmap(&self) -> &MemMap {
        &self.memmap
    }

    pub(crate) fn allocator(&self) -> &FrameAllocator {
        &self.allocator
    }

    /// The direct-map window.
    pub fn window(&self) -> DirectMap {
        self.memmap.window()
    }

    /// The descriptor of a frame.
    pub fn page(&self, pfn: Pfn) -> Option<&Page> {
        self.memmap.pfn_to_page(pfn)
    }

    /// Allocates 2^order contiguous frames (Linux `alloc_pages`). Their kind
    /// is [`PageKind::Kernel`] until the owner says otherwise. Debug builds
    /// record the caller as the frames' owner (`frame::poison`).
    #[track_caller]
    pub fn alloc_pages(&self, order: usize) -> Option<Frames<'_>> {
        if self.fault.should_fail(FailSite::Frame) {
            return None;
        }
        let (pfn, page) = self.allocator.alloc(&self.memmap, order)?;
        Some(Frames::new(self, pfn, order, Some(page)))
    }

    /// Allocates and zeroes 2^order frames.
    #[track_caller]
    pub fn alloc_pages_zeroed(&self, order: usize) -> Option<Frames<'_>> {
        let f = self.alloc_pages(order)?;
        self.zero_frames(f.pfn(), order);
        Some(f)
    }

    /// Frees a block (same as dropping it).
    pub fn free_pages(&self, frames: Frames<'_>) {
        drop(frames);
    }

    /// Free frames, counting those cached per CPU. Exact once concurrent
    /// allocations and frees have finished.
    pub fn nr_free_pages(&self) -> u64 {
        self.allocator.nr_free()
    }

    /// Frames sitting in per-CPU caches (part of [`PhysMem::nr_free_pages`]).
    pub fn nr_cached_pages(&self) -> u64 {
        self.allocator.nr_cached()
    }

    /// Free blocks of exactly `order` on the buddy lists.
    pub fn nr_free_blocks(&self, order: usize) -> u64 {
        self.allocator.free_blocks(order)
    }

    /// Frees order-0 frames in one go (one per-CPU list lock per list with
    /// frames in it), each given with its descriptor.
    ///
    /// # Safety
    ///
    /// The caller owns each frame (allocated at order 0, not yet freed) and
    /// nothing uses them afterwards; each `page` is its `pfn`'s descriptor
    /// (from [`PhysMem::page`]).
    pub(crate) unsafe fn free_pages_bulk(&self, frames: &[(Pfn, &Page)]) {
        // SAFETY: forwarded from the caller.
        unsafe { self.allocator.free_bulk(&self.memmap, frames) };
    }

    /// [`PhysMem::free_pages_bulk`] for frames given by number alone.
    ///
    /// # Safety
    ///
    /// As [`PhysMem::free_pages_bulk`] for each frame.
    #[cfg(all(test, not(loom)))]
    pub(crate) unsafe fn free_frames_bulk(&self, pfns: &[Pfn]) {
        let frames: alloc::vec::Vec<(Pfn, &Page)> =
            pfns.iter().map(|&pfn| (pfn, self.page(pfn).expect("freeing a frame outside memmap"))).collect();
        // SAFETY: forwarded from the caller; each descriptor is its frame's.
        unsafe { self.free_pages_bulk(&frames) };
    }

    /// Returns the executing CPU's cached frames to the buddy.
    pub fn drain_local_pcp(&self) {
        self.allocator.drain_local(&self.memmap);
    }

    /// Lets each per-CPU list cache up to `high` frames (never fewer than
    /// the default [`crate::PCP_HIGH`]), and a list whose CPU keeps
    /// refilling and overflowing it grow its own limit up to `high_max`.
    /// The kernel sizes both from memory and CPU count at boot: a CPU that
    /// unmaps a large region and maps the next one then recycles its frames
    /// without visiting the zone. Cached frames still count as free, and an
    /// allocation that finds no block drains every list (setting each
    /// limit back to `high`) and retries.
    pub fn set_pcp_limits(&self, high: usize, high_max: usize) {
        self.allocator.set_pcp_limits(high, high_max);
    }

    /// The per-CPU list limit in force.
    pub fn pcp_high(&self) -> usize {
        self.allocator.pcp_high()
    }

    /// Returns every CPU's cached frames to the buddy.
    pub fn drain_all_pcp(&self) {
        self.allocator.drain_all(&self.memmap);
    }

    /// The failure injector: page-table constructors (countdown and random),
    /// random frame, `ptl` and (asked by the kernel's heap) heap failures.
    pub fn fault_inject(&self) -> &FaultInject {
        &self.fault
    }

    /// Split locks currently allocated (always 0 with inline `ptl`).
    pub fn nr_allocated_ptlocks(&self) -> u64 {
        self.ptl_live.load(Relaxed)
    }

    /// Memmap figures for the boot report.
    pub fn memmap_stats(&self) -> MemmapStats {
        self.memmap.stats()
    }

    /// Frees the detached page tables whose grace period has completed
    /// (never waits). The kernel calls it when a CPU goes idle; every
    /// `MmuGather::finish` does too. Returns how many were freed.
    pub fn rcu_reap(&self) -> u64 {
        self.table_rcu.reap(self)
    }

    /// Linux `rcu_barrier` for page tables: waits for a grace period, then
    /// frees every detached table queued before the call. Leak checks call
    /// it before counting free frames. No spinlock held, no read-side
    /// section open.
    pub fn rcu_barrier(&self) {
        self.table_rcu.barrier(self)
    }

    /// Detached tables waiting, freed, and expedited grace periods.
    pub fn table_rcu_stats(&self) -> TableRcuStats {
        self.table_rcu.stats()
    }

    /// Linux `folio_try_get` (`get_page_unless_zero`): takes a reference on
    /// the block headed by `pfn` unless it has none (it is free or being
    /// freed). The lockless walker's reference: it must re-check the entry
    /// it found `pfn` through afterwards, and drop the reference with
    /// [`PhysMem::put_folio`] if the entry changed.
    pub fn try_get_folio(&self, pfn: Pfn) -> bool {
        let Some(page) = self.page(pfn) else { return false };
        let mut cur = page.refcount.load(Relaxed);
        loop {
            if cur == 0 {
                return false;
            }
            match page.refcount.compare_exchange_weak(cur, cur + 1, Acquire, Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Linux `folio_put`: drops a reference on the block of 2^`order` frames
    /// headed by `pfn` (or, with [`crate::GIGANTIC_ORDER`], a gigantic page);
    /// the last reference frees it. An unmapped user frame is freed by its
    /// last put: the mapping's (the TLB gather's, after the shoot-down) or a
    /// pinner's ([`crate::gup`]), whichever comes last.
    pub fn put_folio(&self, pfn: Pfn, order: usize) {
        if self.put_folio_testzero(pfn) {
            self.free_folio(pfn, order);
        }
    }

    /// Linux `folio_get`: one more reference on a block the caller holds one
    /// on already, or that an entry maps while the caller holds that entry's
    /// lock (fork's second mapping of a page).
    pub(crate) fn get_folio(&self, pfn: Pfn) {
        let old = self.page(pfn).expect("get of a frame outside the memmap").refcount.fetch_add(1, Relaxed);
        assert!(old > 0, "get of frame {pfn:?} with no reference");
    }

    /// Drops a reference; true if it was the last (the caller frees).
    pub(crate) fn put_folio_testzero(&self, pfn: Pfn) -> bool {
        Self::put_page_testzero(self.page(pfn).expect("put of a frame outside the memmap"), pfn)
    }

    /// [`PhysMem::put_folio_testzero`] for a caller that holds the frame's
    /// descriptor `page` already (the TLB gather's free loop).
    pub(crate) fn put_page_testzero(page: &Page, pfn: Pfn) -> bool {
        let old = page.refcount.fetch_sub(1, AcqRel);
        assert!(old > 0, "put of frame {pfn:?} with no reference");
        old == 1
    }

    /// Frees a block whose last reference is gone.
    pub(crate) fn free_folio(&self, pfn: Pfn, order: usize) {
        if order == crate::GIGANTIC_ORDER {
            self.gigantic.free(pfn);
        } else {
            // SAFETY: the last reference was dropped: nothing maps or pins
            // the block, and it was allocated at `order` by its mapper.
            drop(unsafe { Frames::from_raw(self, pfn, order) });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::testing::TestMachine;

    #[test]
    fn every_frame_but_the_memmap_is_free_after_init() {
        let m = TestMachine::with_regions(&[(0x10_0000, 0x90_0000)]);
        let total = 0x80_0000 / PAGE_SIZE;
        let memmap_frames = m.phys.memmap().overhead_bytes().div_ceil(PAGE_SIZE);
        // The zero page and the test machine's kernel PML4 take one frame each.
        assert_eq!(m.phys.nr_free_pages(), total - memmap_frames - 2);
    }

    /// `fail=frame:1/N`: allocations fail at about that rate, each failure
    /// leaves the allocator as it was, and everything allocated comes back.
    #[test]
    fn injected_frame_failures_fail_cleanly() {
        let m = TestMachine::with_regions(&[(0x10_0000, 0x90_0000)]);
        let before = m.phys.nr_free_pages();
        m.phys.fault_inject().set_seed(11);
        m.phys.fault_inject().configure("frame:1/4").unwrap();
        let got: std::vec::Vec<_> = (0..400).map(|i| m.phys.alloc_pages(i % 2)).collect();
        let failed = got.iter().filter(|f| f.is_none()).count() as u64;
        assert!((60..140).contains(&failed), "{failed} of 400 failed at 1/4");
        assert_eq!(m.phys.fault_inject().injected_at(FailSite::Frame), failed);
        let held: u64 = got.iter().flatten().map(|f| 1 << f.order()).sum();
        assert_eq!(m.phys.nr_free_pages(), before - held);
        drop(got);
        assert_eq!(m.phys.nr_free_pages(), before);
        m.phys.fault_inject().clear_rates();
        assert!((0..100).all(|_| m.phys.alloc_pages(0).is_some()));
    }

    #[test]
    fn bootmem_heap_range_is_marked_and_not_allocatable() {
        let m = TestMachine::build(&[(0x10_0000, 0x90_0000)], |boot| {
            let heap = boot.alloc(0x4_0000, PAGE_SIZE, PageKind::Heap).unwrap();
            assert!(heap.is_aligned(PAGE_SIZE));
        });
        let map = m.phys.memmap();
        let heap_frames =
            (0x100..0x900).filter(|&p| map.pfn_to_page(Pfn::new(p)).unwrap().kind() == PageKind::Heap).count();
        assert_eq!(heap_frames, 0x40);
        let total = 0x800;
        let memmap_frames = map.overhead_bytes().div_ceil(PAGE_SIZE);
        // The zero page and the test machine's kernel PML4 take one frame each.
        assert_eq!(m.phys.nr_free_pages(), total - 0x40 - memmap_frames - 2);
        // Allocate everything: no Heap frame is ever handed out.
        let mut all = std::vec::Vec::new();
        while let Some(f) = m.phys.alloc_pages(0) {
            assert_ne!(f.page().kind(), PageKind::Heap);
            all.push(f);
        }
        assert_eq!(all.len() as u64, total - 0x40 - memmap_frames - 2);
        assert_eq!(m.phys.nr_free_pages(), 0);
    }
}
