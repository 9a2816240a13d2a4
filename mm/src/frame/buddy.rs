//! The buddy allocator: free blocks of 2^order frames on one list per order.
//!
//! A block of order `o` starting at PFN `p` (aligned to 2^o) has a buddy at
//! `p ^ 2^o`. Freeing merges a block with its buddy while the buddy is a free
//! block of the same order, then files the result; allocating takes the
//! smallest free block that is big enough and splits it, filing the upper
//! halves. Lists are doubly linked through the descriptors (`Page::lru`) so a
//! buddy can be unlinked from the middle of its list in O(1).
//!
//! A [`Buddy`] lives inside the zone lock; `&mut Buddy` is the proof that the
//! lock is held, which is what makes touching free frames' descriptors sound.

use core::sync::atomic::Ordering::Relaxed;

use crate::addr::Pfn;
use crate::memmap::{Links, MemMap, PG_BUDDY, Page};

/// Largest order: 2^10 frames = 4 MiB blocks (order 9 is a 2 MiB huge page).
pub const MAX_ORDER: usize = 10;
/// Number of orders, 0..=MAX_ORDER.
pub const NR_ORDERS: usize = MAX_ORDER + 1;

/// The free lists of one zone.
pub(crate) struct Buddy {
    heads: [u64; NR_ORDERS],
    nr_free: [u64; NR_ORDERS],
}

fn page(map: &MemMap, pfn: u64) -> &Page {
    map.pfn_to_page(Pfn::new(pfn)).expect("buddy: PFN outside the memmap")
}

/// The links of a page on a buddy list. Dereferencing the pointer is only
/// sound while holding that list's lock (the zone lock), whose `&mut` the callers have.
fn links(p: &Page) -> *mut Links {
    p.lru.get()
}

impl Buddy {
    pub(crate) const fn new() -> Self {
        Self { heads: [Links::NONE; NR_ORDERS], nr_free: [0; NR_ORDERS] }
    }

    fn push(&mut self, map: &MemMap, pfn: u64, order: usize) {
        let p = page(map, pfn);
        let old = self.heads[order];
        // SAFETY: &mut self proves the zone lock; `p` is being filed here.
        unsafe { *links(p) = Links { prev: Links::NONE, next: old } };
        if old != Links::NONE {
            // SAFETY: `old` heads this list, so its links are the zone lock's.
            unsafe { (*links(page(map, old))).prev = pfn };
        }
        self.heads[order] = pfn;
        p.order.store(order as u8, Relaxed);
        p.set_flag(PG_BUDDY);
        self.nr_free[order] += 1;
    }

    fn unlink(&mut self, map: &MemMap, pfn: u64, order: usize) {
        self.unlink_page(map, page(map, pfn), order);
    }

    /// [`Buddy::unlink`] of the free block whose first descriptor is `p`.
    fn unlink_page(&mut self, map: &MemMap, p: &Page, order: usize) {
        // SAFETY: `p` is on list `order` (PG_BUDDY with that order); zone lock held.
        let l = unsafe { *links(p) };
        if l.prev == Links::NONE {
            self.heads[order] = l.next;
        } else {
            // SAFETY: neighbours on a buddy list belong to the zone lock too.
            unsafe { (*links(page(map, l.prev))).next = l.next };
        }
        if l.next != Links::NONE {
            // SAFETY: the next neighbour is on the same buddy list, whose links
            // the zone lock (held by the caller) protects.
            unsafe { (*links(page(map, l.next))).prev = l.prev };
        }
        p.clear_flag(PG_BUDDY);
        self.nr_free[order] -= 1;
    }

    /// The descriptor of `pfn` if it heads a free block of 2^`order`
    /// frames (the merge then unlinks it without a second lookup).
    fn free_block(map: &MemMap, pfn: u64, order: usize) -> Option<&Page> {
        map.pfn_to_page(Pfn::new(pfn)).filter(|p| p.has_flag(PG_BUDDY) && p.order.load(Relaxed) as usize == order)
    }

    /// Takes the smallest free block of at least 2^`order` frames and splits
    /// off upper halves (filing them) until it is no bigger than
    /// 2^max(`order`, `down_to`); returns the block kept and its order.
    fn take(&mut self, map: &MemMap, order: usize, down_to: usize) -> Option<(u64, usize)> {
        let mut o = (order..NR_ORDERS).find(|&o| self.heads[o] != Links::NONE)?;
        let pfn = self.heads[o];
        self.unlink(map, pfn, o);
        while o > down_to.max(order) {
            o -= 1;
            self.push(map, pfn + (1 << o), o);
        }
        Some((pfn, o))
    }

    /// Takes a block of 2^order frames, or `None` if no block is big enough.
    pub(crate) fn alloc(&mut self, map: &MemMap, order: usize) -> Option<Pfn> {
        assert!(order <= MAX_ORDER, "order {order} too large");
        self.take(map, order, order).map(|(pfn, _)| Pfn::new(pfn))
    }

    /// Takes up to `n` free frames for a per-CPU list, whole blocks at a
    /// time, and hands each frame to `put`; returns how many it took (fewer
    /// only when the zone runs out).
    ///
    /// Taking them one [`Buddy::alloc`] at a time costs an unlink and a
    /// split (a push) per frame, under the zone lock. A CPU that allocates
    /// what another CPU frees (a thread faulting pages in while another
    /// unmaps, `same-table`) refills on every 63rd fault, so that cost was a
    /// tenth of its fault time. Here each step takes the smallest free
    /// block, as `alloc` would, splits it only down to the largest block
    /// that still fits in what is missing, and hands out that block's
    /// frames: an unlink and a few pushes per block.
    pub(crate) fn alloc_bulk(&mut self, map: &MemMap, n: usize, mut put: impl FnMut(Pfn)) -> usize {
        let mut got = 0;
        while got < n {
            let fits = (usize::BITS - 1 - (n - got).leading_zeros()) as usize;
            let Some((pfn, o)) = self.take(map, 0, fits) else { break };
            for i in 0..1u64 << o {
                put(Pfn::new(pfn + i));
            }
            got += 1 << o;
        }
        got
    }

    /// Returns a block, merging it with free buddies.
    ///
    /// # Safety
    ///
    /// `pfn..pfn + 2^order` is a block the caller owns (allocated from this
    /// zone, or never handed out), aligned to 2^order and covered by `map`,
    /// and nobody uses it after this call.
    pub(crate) unsafe fn free(&mut self, map: &MemMap, pfn: Pfn, order: usize) {
        let mut pfn = pfn.as_u64();
        let mut order = order;
        debug_assert_eq!(pfn & ((1 << order) - 1), 0, "misaligned block");
        while order < MAX_ORDER {
            let buddy = pfn ^ (1 << order);
            let Some(p) = Self::free_block(map, buddy, order) else { break };
            self.unlink_page(map, p, order);
            pfn &= !(1 << order);
            order += 1;
        }
        self.push(map, pfn, order);
    }

    /// Free frames on all lists.
    pub(crate) fn free_frames(&self) -> u64 {
        (0..NR_ORDERS).map(|o| self.nr_free[o] << o).sum()
    }

    /// Free blocks of one order.
    pub(crate) fn free_blocks(&self, order: usize) -> u64 {
        self.nr_free[order]
    }
}
