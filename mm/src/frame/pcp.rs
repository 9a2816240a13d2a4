//! Per-CPU caches of order-0 frames (Linux `per_cpu_pages`).
//!
//! A fault storm allocates one frame per fault on every CPU; if each took the
//! zone lock, the allocator would serialise exactly the work split page-table
//! locks parallelise. Each CPU instead keeps a short list of free frames and
//! only visits the zone in batches: to refill when empty, to give back when the
//! list grows past `HIGH`.
//!
//! Each list has its own spinlock: taken by "its" CPU to allocate and free,
//! and by another CPU to return frames this list handed out (a batch at a
//! time, `FrameAllocator::free_bulk`), so it is contended only when that
//! happens while its CPU allocates; on the host, threads may also share a
//! CPU number. Order: per-CPU list lock, then zone lock; never two list
//! locks at once.

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::Pfn;
use crate::memmap::{Links, MemMap, PG_PCP, Page};

/// Frames moved between a list and the zone at a time (Linux's default
/// `pcp->batch`).
pub const BATCH: usize = 63;
/// Above this many frames (16 MiB) a list gives a batch back to the zone,
/// unless the kernel raised the limit ([`crate::PhysMem::set_pcp_limits`]).
///
/// Large on purpose: a thread that unmaps a big region and maps the next one
/// (will-it-scale's `page_fault1`, `cargo xtask bench`) recycles its frames
/// through its own list instead of through the zone lock, where every frame
/// would cost a buddy merge and a split and CPUs would queue for it. With
/// `HIGH = 4 * 16` the zone lock was the top contended lock at 2 CPUs and
/// freeing dominated `munmap`. Cached frames still count as free, and an
/// allocation that finds no block drains every CPU's list, taking its block
/// as a drain frees one, so a big cache never causes a failure.
pub const HIGH: usize = 64 * BATCH;

/// One CPU's free list.
pub(crate) struct PcpList {
    head: u64,
    count: usize,
    /// This list's own limit, raised while its CPU recycles more frames
    /// than the base limit (0: the allocator's base limit). See
    /// [`super::FrameAllocator::trim`].
    pub(crate) high: usize,
    /// The list refilled from the zone since it last gave frames back: its
    /// CPU allocates as much as it frees, so a larger list would have kept
    /// both trips to the zone.
    pub(crate) refilled: bool,
}

/// The links of a page on a per-CPU list. Dereferencing the pointer is only
/// sound while holding that list's lock (the per-CPU list lock), whose `&mut` the callers have.
fn links(p: &Page) -> *mut Links {
    p.lru.get()
}

impl PcpList {
    pub(crate) const fn new() -> Self {
        Self { head: Links::NONE, count: 0, high: 0, refilled: false }
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Files a free frame.
    ///
    /// # Safety
    ///
    /// The caller owns frame `pfn` and gives it up; `p` is its descriptor
    /// (callers have it at hand, so the list does not look it up again).
    pub(crate) unsafe fn push(&mut self, p: &Page, pfn: Pfn, mirror: &AtomicU64) {
        // SAFETY: &mut self proves the list lock; the frame is being filed.
        unsafe { (*links(p)).next = self.head };
        p.set_flag(PG_PCP);
        self.head = pfn.as_u64();
        self.count += 1;
        mirror.store(self.count as u64, Relaxed);
    }

    /// Takes a frame off the list: the frame and its descriptor.
    pub(crate) fn pop<'m>(&mut self, map: &'m MemMap, mirror: &AtomicU64) -> Option<(Pfn, &'m Page)> {
        if self.head == Links::NONE {
            return None;
        }
        let pfn = self.head;
        let p = map.pfn_to_page(Pfn::new(pfn)).expect("pcp: PFN outside the memmap");
        // SAFETY: `p` heads this list, whose lock `&mut self` proves.
        self.head = unsafe { (*links(p)).next };
        p.clear_flag(PG_PCP);
        self.count -= 1;
        mirror.store(self.count as u64, Relaxed);
        Some((Pfn::new(pfn), p))
    }
}
