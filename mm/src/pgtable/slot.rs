//! The one module that reads and writes the contents of frames.
//!
//! Page-table entries are read by other CPUs and by the MMU while we write
//! them, so every entry access is an atomic operation on an [`EntrySlot`]
//! (Linux: `READ_ONCE`/`WRITE_ONCE` on a `pte_t *`). Zeroing a fresh frame uses
//! atomic stores as well: then no access to frame contents anywhere in `mm` is
//! a non-atomic one, so even a walker that raced with a (buggy) early free
//! reads stale values rather than causing a data race.
//!
//! Under `cfg(loom)` the words are `loom` atomics kept in a map from physical
//! address to atomic, created on first touch, so that the real helpers run in
//! the model checker while the memmap still lives in an ordinary buffer.

use core::sync::atomic::Ordering;

use crate::addr::{PAGE_SIZE, Pfn, PhysAddr};
use crate::physmem::PhysMem;
use crate::sync::AtomicU64;

/// One 64-bit word of a frame: a page-table entry (a `pte_t *`, `pmd_t *` ...).
#[derive(Clone, Copy)]
pub struct EntrySlot<'a> {
    cell: &'a AtomicU64,
    pa: PhysAddr,
}

impl<'a> EntrySlot<'a> {
    /// The physical address of the entry.
    pub fn pa(&self) -> PhysAddr {
        self.pa
    }
    #[inline]
    pub(crate) fn load(&self, order: Ordering) -> u64 {
        self.cell.load(order)
    }
    #[inline]
    pub(crate) fn store(&self, v: u64, order: Ordering) {
        self.cell.store(v, order)
    }
    #[inline]
    pub(crate) fn swap(&self, v: u64, order: Ordering) -> u64 {
        self.cell.swap(v, order)
    }
    #[inline]
    pub(crate) fn fetch_and(&self, v: u64, order: Ordering) -> u64 {
        self.cell.fetch_and(v, order)
    }
    #[inline]
    pub(crate) fn compare_exchange(&self, old: u64, new: u64) -> Result<u64, u64> {
        self.cell.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
    }
}

impl PhysMem {
    /// The word at `pa`, if `pa` is 8-byte aligned and inside a frame this
    /// `PhysMem` manages. A corrupted entry pointing anywhere else yields
    /// `None`, never a wild reference.
    pub(crate) fn slot(&self, pa: PhysAddr) -> Option<EntrySlot<'_>> {
        if !pa.is_aligned(8) || !self.memmap().contains(pa.pfn()) {
            return None;
        }
        // SAFETY: managed RAM is mapped by the window for the life of `self`
        // (BootMem::new's contract); entries are only accessed atomically.
        Some(unsafe { self.slot_unchecked(pa) })
    }

    /// The word at `pa`, which may lie outside managed RAM (the kernel's PGD).
    ///
    /// # Safety
    ///
    /// `pa` is 8-byte aligned RAM mapped by the window for the life of `self`,
    /// accessed only atomically while shared.
    #[cfg(not(loom))]
    pub(crate) unsafe fn slot_unchecked(&self, pa: PhysAddr) -> EntrySlot<'_> {
        let p = self.window().virt(pa).cast::<u64>();
        // SAFETY: aligned, valid for the life of `self`, and only accessed
        // atomically (caller), which is what `from_ptr` requires.
        let cell = unsafe { AtomicU64::from_ptr(p) };
        EntrySlot { cell, pa }
    }

    /// Loom build: the word's loom atomic.
    ///
    /// # Safety
    ///
    /// None beyond the non-loom variant's; kept `unsafe` for one signature.
    #[cfg(loom)]
    pub(crate) unsafe fn slot_unchecked(&self, pa: PhysAddr) -> EntrySlot<'_> {
        EntrySlot { cell: self.loom_words.get(pa), pa }
    }

    /// Copies bytes between a user frame and a kernel buffer: `buf` into
    /// memory at `pa` when `to_frame`, else memory at `pa` into `buf`
    /// (`copy_to_user` / `copy_from_user` once the frame is found).
    ///
    /// # Safety
    ///
    /// `[pa, pa + buf.len())` lies inside one block of managed RAM that stays
    /// allocated to the caller's use for the copy: mapped by an entry whose
    /// lock the caller holds, or pinned ([`crate::gup`]). It is user memory
    /// (never a page table or other kernel data), so a concurrent user-mode
    /// access to the same bytes is the usual shared-memory race of a user
    /// copy, not a violation of any kernel invariant.
    pub(crate) unsafe fn copy_user_frame(&self, pa: PhysAddr, buf: &mut [u8], to_frame: bool) {
        debug_assert!(self.page(pa.pfn()).is_some_and(|p| p.kind() != crate::PageKind::Free));
        #[cfg(not(loom))]
        {
            let p = self.window().virt(pa);
            if to_frame {
                // SAFETY: the caller's contract: the range is user memory the
                // caller holds; `buf` is a distinct kernel buffer.
                unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
            } else {
                // SAFETY: the caller's contract: the range is user memory the
                // caller holds (pinned or mapped under its lock); `buf` is a
                // distinct kernel buffer.
                unsafe { core::ptr::copy_nonoverlapping(p.cast_const(), buf.as_mut_ptr(), buf.len()) };
            }
        }
        #[cfg(loom)]
        {
            let _ = (pa, to_frame);
            buf.fill(0);
        }
    }

    /// Copies the contents of 2^`order` frames at `src` into 2^`order` frames
    /// at `dst` (fork's copy of a huge page, a COW copy, a collapse), 8 bytes
    /// at a time through atomic loads and stores.
    ///
    /// # Safety
    ///
    /// `dst` is a block the caller owns (fresh, not yet mapped); `src` is user
    /// memory the caller holds (a reference, or mapped read-only under locks
    /// that keep it mapped) and nobody writes during the copy.
    pub(crate) unsafe fn copy_frames(&self, dst: Pfn, src: Pfn, order: usize) {
        let words = ((PAGE_SIZE << order) / 8) as usize;
        #[cfg(not(loom))]
        {
            let d = self.window().virt(dst.phys()).cast::<AtomicU64>();
            let s = self.window().virt(src.phys()).cast::<AtomicU64>();
            // SAFETY: both blocks are managed RAM mapped for the life of
            // `self`, aligned, accessed only atomically here; the caller's
            // contract keeps them allocated and `dst` unshared.
            let (d, s) = unsafe { (core::slice::from_raw_parts(d, words), core::slice::from_raw_parts(s, words)) };
            for (dw, sw) in d.chunks_exact(8).zip(s.chunks_exact(8)) {
                for (a, b) in dw.iter().zip(sw) {
                    a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
        }
        #[cfg(loom)]
        for i in 0..words as u64 {
            let v = self.loom_words.get(src.phys().add(8 * i)).load(Ordering::Relaxed);
            self.loom_words.get(dst.phys().add(8 * i)).store(v, Ordering::Relaxed);
        }
    }

    /// Zeroes 2^order frames the caller owns (fresh from the allocator).
    pub(crate) fn zero_frames(&self, pfn: Pfn, order: usize) {
        debug_assert!(self.page(pfn).is_some_and(|p| p.kind() != crate::PageKind::Free));
        let bytes = PAGE_SIZE << order;
        #[cfg(not(loom))]
        {
            let base = self.window().virt(pfn.phys()).cast::<AtomicU64>();
            // SAFETY: the block is managed RAM mapped for the life of `self`,
            // aligned, and only ever accessed atomically.
            let words = unsafe { core::slice::from_raw_parts(base, (bytes / 8) as usize) };
            // 64 stores (512 bytes) per turn, 8 turns a page: under QEMU's
            // TCG every loop turn ends a translated block. The compiler
            // unrolls a smaller chunk only to 16 stores (32 turns a page),
            // which cost a `disjoint` fault 58 more instructions.
            let (chunks, rest) = words.as_chunks::<64>();
            debug_assert!(rest.is_empty(), "a frame is 512 words");
            for chunk in chunks {
                for w in chunk {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
        #[cfg(loom)]
        self.loom_words.zero(pfn.phys(), bytes);
    }
}

#[cfg(loom)]
pub(crate) use loom_words::LoomWords;

#[cfg(loom)]
mod loom_words {
    extern crate std;
    use std::boxed::Box;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// Frame words as loom atomics, created on first touch (value 0). Boxes
    /// are never removed before the map drops, so references stay valid.
    /// The std mutex is never held across a loom operation.
    pub(crate) struct LoomWords {
        map: Mutex<BTreeMap<u64, Box<AtomicU64>>>,
    }

    impl LoomWords {
        pub(crate) fn new() -> Self {
            Self { map: Mutex::new(BTreeMap::new()) }
        }

        pub(crate) fn get(&self, pa: PhysAddr) -> &AtomicU64 {
            let mut m = self.map.lock().unwrap();
            let b = m.entry(pa.as_u64()).or_insert_with(|| Box::new(AtomicU64::new(0)));
            let p: *const AtomicU64 = &**b;
            // SAFETY: the box is never removed or moved out while `self`
            // lives, so its contents outlive the returned borrow of `self`.
            unsafe { &*p }
        }

        pub(crate) fn zero(&self, pa: PhysAddr, bytes: u64) {
            let cells: std::vec::Vec<*const AtomicU64> = {
                let m = self.map.lock().unwrap();
                m.range(pa.as_u64()..pa.as_u64() + bytes).map(|(_, b)| &**b as *const AtomicU64).collect()
            };
            for c in cells {
                // SAFETY: as in `get`, boxes live as long as `self`.
                unsafe { &*c }.store(0, Ordering::Relaxed);
            }
        }
    }
}
