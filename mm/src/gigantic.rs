//! The gigantic-page pool: 1 GiB frames for hugetlb mappings, reserved at
//! boot (Linux `hugepagesz=1G hugepages=N` on the command line, which takes
//! them from memblock before the buddy allocator starts).
//!
//! The buddy's largest block is order 10 (4 MiB), so 1 GiB frames cannot come
//! from it; [`crate::BootMem::reserve_gigantic`] takes 1 GiB-aligned ranges
//! out of boot memory and [`crate::PhysMem::new`] hands them to this pool.
//! 2 MiB hugetlb frames come from the buddy (order 9).
//!
//! # Locks
//!
//! | lock | protects | level |
//! | --- | --- | --- |
//! | `pool` (class `FrameAllocator`) | which pool pages are free | `Zone` (nests with nothing) |

use crate::addr::{PAGE_SHIFT, PUD_SHIFT, Pfn};
use crate::lock::{LockClass, LockLevel, SpinLock};

/// At most this many 1 GiB pages in the pool.
pub const MAX_GIGANTIC: usize = 64;
/// The buddy-style order of a 1 GiB page (2^18 frames).
pub const GIGANTIC_ORDER: usize = (PUD_SHIFT - PAGE_SHIFT) as usize;

struct Pool {
    pfn: [u64; MAX_GIGANTIC],
    free: [bool; MAX_GIGANTIC],
    n: usize,
}

/// The pool of 1 GiB frames.
pub struct GiganticPool {
    pool: SpinLock<Pool>,
}

impl GiganticPool {
    pub(crate) fn new() -> Self {
        Self {
            pool: SpinLock::new(
                LockClass::FrameAllocator,
                LockLevel::Zone,
                Pool { pfn: [0; MAX_GIGANTIC], free: [false; MAX_GIGANTIC], n: 0 },
            ),
        }
    }

    /// Adds a reserved 1 GiB frame at boot.
    pub(crate) fn add(&self, pfn: Pfn) {
        let mut p = self.pool.lock();
        if p.n == MAX_GIGANTIC {
            log::warn!("gigantic pool full, {pfn:?} unused");
            return;
        }
        let n = p.n;
        p.pfn[n] = pfn.as_u64();
        p.free[n] = true;
        p.n += 1;
    }

    /// Takes a free 1 GiB frame (contents not zeroed).
    pub(crate) fn alloc(&self) -> Option<Pfn> {
        let mut p = self.pool.lock();
        let i = (0..p.n).find(|&i| p.free[i])?;
        p.free[i] = false;
        Some(Pfn::new(p.pfn[i]))
    }

    /// Returns a frame taken with `alloc`. Panics on a frame that is not a
    /// pool page or is already free (a double free).
    pub(crate) fn free(&self, pfn: Pfn) {
        let mut p = self.pool.lock();
        let i = (0..p.n).find(|&i| p.pfn[i] == pfn.as_u64()).expect("freeing a frame that is not a gigantic page");
        assert!(!p.free[i], "double free of gigantic page {pfn:?}");
        p.free[i] = true;
    }

    /// Pages in the pool.
    pub fn nr_total(&self) -> usize {
        self.pool.lock().n
    }

    /// Free pages in the pool.
    pub fn nr_free(&self) -> usize {
        let p = self.pool.lock();
        (0..p.n).filter(|&i| p.free[i]).count()
    }
}
