//! Boot-time memory: the usable RAM ranges before any allocator exists, and
//! `alloc` for the few physically contiguous ranges boot needs (the memmap
//! itself, the kernel heap). Linux calls this memblock.
//!
//! Fixed-size arrays only: this runs before the kernel heap exists.

use crate::addr::{DirectMap, PAGE_SIZE, PhysAddr};
use crate::memmap::{MAX_SECTIONS, PageKind};

/// At most this many ranges taken through [`BootMem::alloc`].
pub const MAX_RESERVED: usize = 16;
const MAX_FREE: usize = MAX_SECTIONS + MAX_RESERVED;

type Range = (PhysAddr, PhysAddr);

/// Usable RAM and what boot has taken from it.
pub struct BootMem {
    pub(crate) window: DirectMap,
    usable: [Range; MAX_SECTIONS],
    nr_usable: usize,
    free: [Range; MAX_FREE],
    nr_free: usize,
    reserved: [(Range, PageKind); MAX_RESERVED],
    nr_reserved: usize,
}

fn insert_sorted(arr: &mut [Range], len: &mut usize, r: Range) {
    let i = arr[..*len].partition_point(|x| x.0 < r.0);
    arr.copy_within(i..*len, i + 1);
    arr[i] = r;
    *len += 1;
}

impl BootMem {
    /// Takes the bootloader's usable ranges `(start, end)` (end exclusive, any
    /// alignment: starts are rounded up and ends down to 4 KiB; overlapping or
    /// touching ranges are merged; more than `MAX_SECTIONS` ranges after
    /// merging are dropped with a warning).
    ///
    /// # Safety
    ///
    /// Every range is RAM that nothing else uses, mapped writable by `window`,
    /// for as long as the [`crate::PhysMem`] built from this `BootMem` (and
    /// anything allocated from it) lives.
    pub unsafe fn new(ranges: &[(u64, u64)], window: DirectMap) -> Self {
        let mut usable = [(PhysAddr::new(0), PhysAddr::new(0)); MAX_SECTIONS];
        let mut n = 0;
        for &(s, e) in ranges {
            let s = PhysAddr::new(s).align_up(PAGE_SIZE);
            let e = PhysAddr::new(e).align_down(PAGE_SIZE);
            if s >= e {
                continue;
            }
            // Merge with any range it overlaps or touches.
            let (mut s, mut e) = (s, e);
            let mut i = 0;
            while i < n {
                let (a, b) = usable[i];
                if a <= e && s <= b {
                    s = s.min(a);
                    e = e.max(b);
                    usable.copy_within(i + 1..n, i);
                    n -= 1;
                } else {
                    i += 1;
                }
            }
            if n == MAX_SECTIONS {
                log::warn!("bootmem: more than {MAX_SECTIONS} RAM ranges, ignoring {s:?}..{e:?}");
                continue;
            }
            insert_sorted(&mut usable, &mut n, (s, e));
        }
        let mut free = [(PhysAddr::new(0), PhysAddr::new(0)); MAX_FREE];
        free[..n].copy_from_slice(&usable[..n]);
        Self {
            window,
            usable,
            nr_usable: n,
            free,
            nr_free: n,
            reserved: [((PhysAddr::new(0), PhysAddr::new(0)), PageKind::Reserved); MAX_RESERVED],
            nr_reserved: 0,
        }
    }

    /// Takes `bytes` (rounded up to 4 KiB) of physically contiguous RAM aligned
    /// to `align` (a power of two, at least 4 KiB is used), from the top of
    /// memory down, and records it as `kind` in the memmap once that exists.
    /// `None` if no range has room (or `MAX_RESERVED` ranges are taken).
    pub fn alloc(&mut self, bytes: u64, align: u64, kind: PageKind) -> Option<PhysAddr> {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let align = align.max(PAGE_SIZE);
        let bytes = bytes.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
        if bytes == 0 || self.nr_reserved == MAX_RESERVED || self.nr_free == MAX_FREE {
            return None;
        }
        for i in (0..self.nr_free).rev() {
            let (s, e) = self.free[i];
            let Some(top) = e.as_u64().checked_sub(bytes) else { continue };
            let start = top & !(align - 1);
            if start < s.as_u64() {
                continue;
            }
            let (start, end) = (PhysAddr::new(start), PhysAddr::new(start + bytes));
            // Replace [s, e) by the pieces left on either side.
            self.free.copy_within(i + 1..self.nr_free, i);
            self.nr_free -= 1;
            if s < start {
                insert_sorted(&mut self.free, &mut self.nr_free, (s, start));
            }
            if end < e {
                insert_sorted(&mut self.free, &mut self.nr_free, (end, e));
            }
            self.reserved[self.nr_reserved] = ((start, end), kind);
            self.nr_reserved += 1;
            return Some(start);
        }
        None
    }

    /// Reserves up to `n` 1 GiB-aligned 1 GiB ranges for the gigantic hugetlb
    /// pool (Linux `hugepages=` for 1 GiB pages, taken from memblock because
    /// the buddy cannot make blocks that large). Returns how many it got.
    /// Call before anything else takes boot memory, so the big aligned
    /// ranges are still whole.
    pub fn reserve_gigantic(&mut self, n: usize) -> usize {
        (0..n)
            .take_while(|_| self.alloc(crate::addr::PUD_SIZE, crate::addr::PUD_SIZE, PageKind::Gigantic).is_some())
            .count()
    }

    /// The usable ranges, sorted and merged.
    pub fn usable(&self) -> &[(PhysAddr, PhysAddr)] {
        &self.usable[..self.nr_usable]
    }

    /// What is still free.
    pub fn free_ranges(&self) -> &[(PhysAddr, PhysAddr)] {
        &self.free[..self.nr_free]
    }

    /// What was taken, with its kind.
    pub fn reserved(&self) -> &[((PhysAddr, PhysAddr), PageKind)] {
        &self.reserved[..self.nr_reserved]
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free_ranges().iter().map(|(s, e)| e.as_u64() - s.as_u64()).sum()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn boot(r: &[(u64, u64)]) -> BootMem {
        // SAFETY: these tests never build a PhysMem or touch the memory.
        unsafe { BootMem::new(r, DirectMap::new(0)) }
    }

    #[test]
    fn ranges_are_aligned_sorted_and_merged() {
        let b = boot(&[(0x5000, 0x8000), (0x1234, 0x3000), (0x3000, 0x4fff), (0x9000, 0x9800)]);
        let got: std::vec::Vec<_> = b.usable().iter().map(|(s, e)| (s.as_u64(), e.as_u64())).collect();
        // 0x1234 rounds up to 0x2000; [0x2000,0x3000) touches [0x3000,0x4000);
        // [0x9000, 0x9800) is less than a page and disappears.
        assert_eq!(got, [(0x2000, 0x4000), (0x5000, 0x8000)]);
    }

    #[test]
    fn alloc_is_top_down_aligned_and_splits() {
        let mut b = boot(&[(0x10_0000, 0x80_0000)]);
        let before = b.free_bytes();
        let a = b.alloc(0x1800, 0x20_0000, PageKind::Heap).unwrap();
        assert_eq!(a, PhysAddr::new(0x60_0000));
        assert_eq!(b.free_bytes(), before - 0x2000);
        assert_eq!(b.free_ranges().len(), 2);
        assert_eq!(b.reserved(), &[((PhysAddr::new(0x60_0000), PhysAddr::new(0x60_2000)), PageKind::Heap)]);
        assert!(b.alloc(0x100_0000, PAGE_SIZE, PageKind::Heap).is_none(), "more than exists");
    }
}
