//! The frame allocator: a buddy zone fronted by per-CPU caches of order-0
//! frames, and [`Frames`], the owning handle of an allocated block.
//!
//! # Locks
//!
//! | lock | protects |
//! | --- | --- |
//! | per-CPU list lock (`LockClass::FrameAllocator`, level `PcpList`) | that CPU's cached frames (taken by its CPU, and by a CPU returning frames the list handed out) |
//! | zone lock (`LockClass::FrameAllocator`, level `Zone`) | the buddy lists |
//!
//! Order: per-CPU list lock, then zone lock; never two list locks at once.
//! Neither is ever held while taking a page-table lock, so callers may free
//! frames while holding a PTE lock.
//!
//! # Counting
//!
//! The free-frame count is the buddy's free frames plus every per-CPU list's
//! length: cached frames count as free. Each part is mirrored in an atomic
//! written under its own lock, so reading the count takes no lock and the
//! allocator shares no hot counter between CPUs; once concurrent
//! allocations have finished, the sum is exact. `drain_pcp` moves every cached
//! frame back to the buddy (so higher orders can merge again); it does not
//! change the count.

mod buddy;
mod pcp;
pub mod poison;

use core::fmt;
use core::panic::Location;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use buddy::Buddy;
pub use buddy::{MAX_ORDER, NR_ORDERS};
use pcp::PcpList;
pub use pcp::{BATCH as PCP_BATCH, HIGH as PCP_HIGH};

use crate::addr::{PAGE_SIZE, Pfn, PhysAddr};
use crate::config::NR_CPUS;
use crate::lock::{LockClass, LockLevel, SpinLock};
use crate::memmap::{MemMap, PG_PTL, Page, PageKind};
use crate::physmem::PhysMem;

/// Marks a frame that is about to be freed as free in its descriptor,
/// checking that it was allocated and is not a live page table (and, in
/// debug builds, poisons it: see [`poison`]).
fn release(map: &MemMap, pfn: Pfn, p: &Page) {
    let kind = p.kind();
    assert!(kind != PageKind::Free, "double free of frame {pfn:?}");
    debug_assert!(
        kind != PageKind::PageTable && !p.has_flag(PG_PTL),
        "page table {pfn:?} freed without pagetable_dtor"
    );
    if poison::ACTIVE {
        poison::on_free(map, pfn, p, kind);
    }
    p.set_kind(PageKind::Free);
    p.refcount.store(0, Relaxed);
}

/// Frames `free_bulk` sorts by home at a time (at least a batch).
const FREE_CHUNK: usize = 64;
const _: () = assert!(FREE_CHUNK >= pcp::BATCH && FREE_CHUNK <= u8::MAX as usize + 1);

/// Number of per-CPU lists (loom models run two "CPUs").
pub const NR_PCP: usize = if cfg!(loom) {
    2
} else if NR_CPUS < 256 {
    NR_CPUS
} else {
    256
};

#[repr(align(64))]
struct PcpSlot {
    list: SpinLock<PcpList>,
    /// Mirror of the list length, written under `list`.
    count: AtomicU64,
}

pub(crate) struct FrameAllocator {
    zone: SpinLock<Buddy>,
    /// Mirror of the buddy's free frames, written under `zone`.
    zone_free: AtomicU64,
    pcp: [PcpSlot; NR_PCP],
    /// A list longer than this gives a batch back to the zone (see
    /// [`FrameAllocator::set_pcp_limits`]). Tuning, not protocol: read relaxed.
    pcp_high: core::sync::atomic::AtomicUsize,
    /// How far one list's own limit may grow (see [`FrameAllocator::trim`]).
    pcp_high_max: core::sync::atomic::AtomicUsize,
}

impl FrameAllocator {
    pub(crate) fn new() -> Self {
        Self {
            zone: SpinLock::new(LockClass::FrameAllocator, LockLevel::Zone, Buddy::new()),
            zone_free: AtomicU64::new(0),
            pcp: core::array::from_fn(|_| PcpSlot {
                list: SpinLock::new(LockClass::FrameAllocator, LockLevel::PcpList, PcpList::new()),
                count: AtomicU64::new(0),
            }),
            pcp_high: core::sync::atomic::AtomicUsize::new(pcp::HIGH),
            pcp_high_max: core::sync::atomic::AtomicUsize::new(pcp::HIGH),
        }
    }

    /// Sets how many frames each per-CPU list may hold before it gives a
    /// batch back (`high`, at least [`pcp::HIGH`]), and how far a list that
    /// recycles more than that may raise its own limit (`high_max`, at least
    /// `high`). Lists already longer shrink on their next free.
    pub(crate) fn set_pcp_limits(&self, high: usize, high_max: usize) {
        let high = high.max(pcp::HIGH);
        self.pcp_high.store(high, Relaxed);
        self.pcp_high_max.store(high_max.max(high), Relaxed);
    }

    pub(crate) fn pcp_high(&self) -> usize {
        self.pcp_high.load(Relaxed)
    }

    /// Hands a block to the zone at boot.
    ///
    /// # Safety
    ///
    /// As [`Buddy::free`]: the block is free RAM covered by `map`, aligned.
    pub(crate) unsafe fn add_free_block(&self, map: &MemMap, pfn: Pfn, order: usize) {
        let mut zone = self.zone.lock();
        // SAFETY: forwarded from the caller.
        unsafe { zone.free(map, pfn, order) };
        self.zone_free.store(zone.free_frames(), Relaxed);
    }

    fn local_index(&self) -> usize {
        crate::hal::cpu_id() % NR_PCP
    }

    fn local(&self) -> &PcpSlot {
        &self.pcp[self.local_index()]
    }

    /// The block's first frame and its descriptor.
    fn alloc_raw<'m>(&self, map: &'m MemMap, order: usize) -> Option<(Pfn, &'m Page)> {
        if order == 0 {
            let me = self.local_index();
            let slot = &self.pcp[me];
            let mut list = slot.list.lock();
            if list.count() == 0 {
                list.refilled = true;
                let mut zone = self.zone.lock();
                zone.alloc_bulk(map, pcp::BATCH, |pfn| {
                    let p = map.pfn_to_page(pfn).expect("pcp: PFN outside the memmap");
                    // SAFETY: the zone just gave us this frame; `p` is its
                    // descriptor.
                    unsafe { list.push(p, pfn, &slot.count) }
                });
                self.zone_free.store(zone.free_frames(), Relaxed);
            }
            // Its free sends it back here (`free_bulk`).
            list.pop(map, &slot.count).inspect(|(_, p)| p.home.store(me as u16, Relaxed))
        } else {
            let mut zone = self.zone.lock();
            let r = zone.alloc(map, order);
            self.zone_free.store(zone.free_frames(), Relaxed);
            let pfn = r?;
            Some((pfn, map.pfn_to_page(pfn).expect("allocated frame outside memmap")))
        }
    }

    /// Allocates a block; on failure drains every per-CPU cache back into the
    /// buddy (merging what it can), taking the block from the zone as soon
    /// as one exists ([`FrameAllocator::alloc_draining`]), so "no memory"
    /// means no block of that order was free anywhere. Debug builds check
    /// each frame's poison and record the caller as its owner ([`poison`]).
    ///
    /// Returns the block's first frame and its descriptor.
    #[track_caller]
    pub(crate) fn alloc<'m>(&self, map: &'m MemMap, order: usize) -> Option<(Pfn, &'m Page)> {
        assert!(order <= MAX_ORDER, "order {order} > MAX_ORDER");
        let (pfn, head) = match self.alloc_raw(map, order) {
            Some(p) => p,
            None => self.alloc_draining(map, order)?,
        };
        for i in 0..1u64 << order {
            let p = if i == 0 { head } else { map.pfn_to_page(pfn.add(i)).expect("allocated frame outside memmap") };
            debug_assert_eq!(p.kind(), PageKind::Free, "allocator handed out a used frame");
            if poison::ACTIVE {
                poison::on_alloc(map, pfn.add(i), p, Location::caller());
            }
            p.set_kind(PageKind::Kernel);
        }
        head.refcount.store(1, Relaxed);
        Some((pfn, head))
    }

    /// Frees a block.
    ///
    /// # Safety
    ///
    /// The caller owns the block (it came from `alloc` with this order) and
    /// nothing uses it afterwards.
    pub(crate) unsafe fn free(&self, map: &MemMap, pfn: Pfn, order: usize) {
        if order == 0 {
            let page = map.pfn_to_page(pfn).expect("freeing a frame outside memmap");
            // SAFETY: forwarded from the caller; `page` is `pfn`'s descriptor.
            return unsafe { self.free_bulk(map, &[(pfn, page)]) };
        }
        for i in 0..1u64 << order {
            release(map, pfn.add(i), map.pfn_to_page(pfn.add(i)).expect("freeing a frame outside memmap"));
        }
        let mut zone = self.zone.lock();
        // SAFETY: forwarded from the caller.
        unsafe { zone.free(map, pfn, order) };
        self.zone_free.store(zone.free_frames(), Relaxed);
    }

    /// Frees order-0 frames with one per-CPU list lock for all of them
    /// (Linux `free_unref_folios`): `munmap` of a large region frees tens of
    /// thousands, and one lock round trip each would dominate.
    ///
    /// Each frame goes back to the list it was allocated from (its
    /// `Page::home`), not necessarily ours. Linux files every freed page on
    /// the freeing CPU's list; then a CPU that frees what another allocated
    /// (one thread's `munmap` of a region all threads fault into,
    /// `same-table`) overfills its own list, which gives batches back to
    /// the zone (a buddy merge per frame, inside the `munmap`, while the
    /// other threads wait for it), and the other CPU's list runs empty and
    /// refills from the zone (a split per block), all under the one zone
    /// lock. Sent home, every list gets back what it hands out: no trip to
    /// the zone at all. The cost is one extra list lock per batch and list
    /// that has frames in it; a thread freeing its own frames pays nothing.
    ///
    /// # Safety
    ///
    /// As [`FrameAllocator::free`] for each frame (order 0), and each
    /// `(pfn, page)` pairs a frame with its own descriptor in `map` (the
    /// caller looked it up already: a `munmap`'s gather has, and freeing
    /// tens of thousands of frames should not look each up twice).
    pub(crate) unsafe fn free_bulk(&self, map: &MemMap, frames: &[(Pfn, &Page)]) {
        if frames.is_empty() {
            return;
        }
        let me = self.local_index();
        for chunk in frames.chunks(FREE_CHUNK) {
            // Our own list first, noting the frames of other lists, then one
            // visit per other list with frames in the chunk (usually none).
            // Never two list locks at once.
            let mut away = [0u8; FREE_CHUNK];
            // SAFETY: forwarded from the caller.
            let mut left = unsafe { self.file_home(map, me, chunk, &mut away, None) };
            while let Some((n, home)) = left {
                // SAFETY: as above.
                left = unsafe { self.file_home(map, home, chunk, &mut away, Some(n)) };
            }
        }
    }

    /// Files on list `home`, under its lock, the frames of `chunk` whose
    /// home it is, then trims the list: all of `chunk` (`only` is `None`),
    /// or those whose indices are the first `only` entries of `away`.
    /// Leaves the indices of the frames it did not file at the front of
    /// `away` and returns how many, with the home of the first of them
    /// (`None` when it filed them all).
    ///
    /// # Safety
    ///
    /// As [`FrameAllocator::free_bulk`].
    unsafe fn file_home(
        &self,
        map: &MemMap,
        home: usize,
        chunk: &[(Pfn, &Page)],
        away: &mut [u8; FREE_CHUNK],
        only: Option<usize>,
    ) -> Option<(usize, usize)> {
        let slot = &self.pcp[home];
        let mut list = slot.list.lock();
        let mut kept = 0;
        let mut next_home = 0;
        let n = only.unwrap_or(chunk.len());
        for k in 0..n {
            let i = if only.is_some() { away[k] as usize } else { k };
            let (pfn, p) = chunk[i];
            debug_assert!(
                map.pfn_to_page(pfn).is_some_and(|d| core::ptr::eq(d, p)),
                "freeing {pfn:?} with another frame's descriptor"
            );
            if Self::home_of(p) != home {
                if kept == 0 {
                    next_home = Self::home_of(p);
                }
                // `kept <= k`: this never overwrites an index still to read.
                away[kept] = i as u8;
                kept += 1;
                continue;
            }
            release(map, pfn, p);
            // SAFETY: the caller gives the frame up; `p` is its descriptor.
            unsafe { list.push(p, pfn, &slot.count) };
        }
        self.trim(map, slot, &mut list);
        (kept > 0).then_some((kept, next_home))
    }

    /// The list an order-0 frame was allocated from (any list for a frame
    /// that came some other way: a piece of a split block, say).
    fn home_of(p: &Page) -> usize {
        p.home.load(Relaxed) as usize % NR_PCP
    }

    /// Gives batches back to the zone while `list` is above its limit.
    ///
    /// The limit adapts (as Linux 6.7's automatic `pcp->high` tuning does,
    /// by a simpler rule): a list that overflows after it had to refill
    /// from the zone belongs to a CPU that frees about as much as it
    /// allocates (a thread that unmaps a region and maps the next one), and
    /// every frame it gives back now it would fetch again soon, each trip
    /// under the one zone lock that every CPU shares. So it doubles its own
    /// limit, up to `pcp_high_max`, instead. A CPU that only frees (or only
    /// allocates) never grows its list. An allocation that finds no block
    /// anywhere drains every list and sets every limit back to the base
    /// ([`FrameAllocator::drain_all`]).
    fn trim(&self, map: &MemMap, slot: &PcpSlot, list: &mut PcpList) {
        let base = self.pcp_high.load(Relaxed);
        let mut high = list.high.max(base);
        if list.count() <= high {
            return;
        }
        if list.refilled {
            list.refilled = false;
            high = (high * 2).min(self.pcp_high_max.load(Relaxed)).max(base);
            list.high = high;
            if list.count() <= high {
                return;
            }
        }
        let mut zone = self.zone.lock();
        while list.count() > high {
            for _ in 0..pcp::BATCH {
                let Some((p, _)) = list.pop(map, &slot.count) else { break };
                // SAFETY: the frame was free on our list; now the zone's.
                unsafe { zone.free(map, p, 0) };
            }
        }
        self.zone_free.store(zone.free_frames(), Relaxed);
    }

    /// Gives `slot`'s frames back to the zone and its limit back to the
    /// base; with `take`, then allocates a block of that order from the
    /// zone under the same hold of the zone lock.
    fn drain_slot(&self, map: &MemMap, slot: &PcpSlot, take: Option<usize>) -> Option<Pfn> {
        let mut list = slot.list.lock();
        list.high = 0;
        list.refilled = false;
        if list.count() == 0 && take.is_none() {
            return None;
        }
        let mut zone = self.zone.lock();
        while let Some((p, _)) = list.pop(map, &slot.count) {
            // SAFETY: the frame was free on our list; now the zone's.
            unsafe { zone.free(map, p, 0) };
        }
        let got = take.and_then(|order| zone.alloc(map, order));
        self.zone_free.store(zone.free_frames(), Relaxed);
        got
    }

    /// The last resort of [`FrameAllocator::alloc`]: drains every list (ours
    /// first), and takes the block from the zone in the same hold of the
    /// zone lock as a drain that made one free.
    ///
    /// Draining every list and then allocating left a window between the
    /// two. Another CPU whose list ran empty in it refilled a whole batch
    /// from the zone, taking back what the drain had just freed, and with
    /// less than a batch of memory left the allocation failed while free
    /// frames sat on that CPU's list. The loom models found it once each of
    /// their threads was a CPU of its own; its model is
    /// `loom_alloc_keeps_a_drained_frame_from_another_cpus_refill`.
    fn alloc_draining<'m>(&self, map: &'m MemMap, order: usize) -> Option<(Pfn, &'m Page)> {
        let me = self.local_index();
        let mut got = None;
        for i in 0..NR_PCP {
            let slot = &self.pcp[(me + i) % NR_PCP];
            let take = got.is_none().then_some(order);
            if let Some(pfn) = self.drain_slot(map, slot, take) {
                got = Some(pfn);
            }
        }
        let pfn = got?;
        let page = map.pfn_to_page(pfn).expect("allocated frame outside memmap");
        if order == 0 {
            // Its free sends it to our list (`free_bulk`).
            page.home.store(me as u16, Relaxed);
        }
        Some((pfn, page))
    }

    pub(crate) fn drain_local(&self, map: &MemMap) {
        self.drain_slot(map, self.local(), None);
    }

    pub(crate) fn drain_all(&self, map: &MemMap) {
        for slot in &self.pcp {
            self.drain_slot(map, slot, None);
        }
    }

    pub(crate) fn nr_free(&self) -> u64 {
        self.zone_free.load(Relaxed) + self.nr_cached()
    }

    pub(crate) fn nr_cached(&self) -> u64 {
        self.pcp.iter().map(|s| s.count.load(Relaxed)).sum()
    }

    pub(crate) fn free_blocks(&self, order: usize) -> u64 {
        self.zone.lock().free_blocks(order)
    }
}

/// An allocated block of 2^order physically contiguous frames. Dropping it
/// frees the block; [`Frames::into_raw`] hands ownership to something else
/// (a page table, the heap) and [`Frames::from_raw`] takes it back.
#[must_use = "dropping Frames frees them at once"]
pub struct Frames<'p> {
    phys: &'p PhysMem,
    pfn: Pfn,
    order: u8,
    /// The first frame's descriptor, when the allocator handed it out with
    /// the block (a fault uses it at once; `from_raw` does not look it up).
    page: Option<&'p Page>,
}

impl<'p> Frames<'p> {
    pub(crate) fn new(phys: &'p PhysMem, pfn: Pfn, order: usize, page: Option<&'p Page>) -> Self {
        Self { phys, pfn, order: order as u8, page }
    }

    /// The first frame.
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
    /// The block's physical address.
    pub fn phys_addr(&self) -> PhysAddr {
        self.pfn.phys()
    }
    /// The block's order.
    pub fn order(&self) -> usize {
        self.order as usize
    }
    /// Bytes in the block.
    pub fn size(&self) -> u64 {
        PAGE_SIZE << self.order
    }
    /// The descriptor of the first frame.
    pub fn page(&self) -> &'p Page {
        self.page.unwrap_or_else(|| self.phys.memmap().pfn_to_page(self.pfn).expect("allocated frame outside memmap"))
    }
    /// The direct-map address of the block.
    pub fn virt(&self) -> *mut u8 {
        self.phys.window().virt(self.phys_addr())
    }
    /// Gives up ownership without freeing: returns (first PFN, order).
    pub fn into_raw(self) -> (Pfn, usize) {
        let r = (self.pfn, self.order as usize);
        core::mem::forget(self);
        r
    }
    /// Takes back ownership of a block given up with [`Frames::into_raw`].
    ///
    /// # Safety
    ///
    /// `pfn`/`order` came from `into_raw` on a block of `phys`, and ownership
    /// is not claimed twice.
    pub unsafe fn from_raw(phys: &'p PhysMem, pfn: Pfn, order: usize) -> Self {
        Self::new(phys, pfn, order, None)
    }
}

impl Drop for Frames<'_> {
    fn drop(&mut self) {
        // SAFETY: `Frames` owns the block (it came from the allocator or
        // `from_raw`) and is being destroyed, so nobody uses it afterwards.
        unsafe { self.phys.allocator().free(self.phys.memmap(), self.pfn, self.order as usize) };
    }
}

impl fmt::Debug for Frames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frames({:?}, order {})", self.pfn, self.order)
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
