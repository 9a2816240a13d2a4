//! Per-address-space counters: RSS and faults by kind (Linux `mm_rss_stat`
//! plus the vmstat fault events), read by tests and benchmarks.
//!
//! Counters are sharded by CPU, each shard on its own cache line, and updated
//! with `this_cpu_add`: a fault storm on eight CPUs must not bounce one
//! counter line between them, which would bring back the very contention
//! split page-table locks remove (Linux caches RSS per task for the same
//! reason), and a fault should not pay a locked instruction per counter. A
//! read sums the shards; it is exact once the counted work is done. No lock
//! protects them. The shards (one per possible CPU) live on the heap, beside
//! the `Mm`.

use alloc::boxed::Box;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use crate::config::NR_CPUS;
use crate::percpu::this_cpu_add;

/// One shard per CPU: `this_cpu_add` needs each shard to have one writer.
const SHARDS: usize = NR_CPUS;

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Counter {
    /// Anonymous memory mapped, in 4 KiB pages (THP counts 512). Signed in
    /// effect: one CPU maps, another unmaps; the sum is what matters.
    Rss,
    /// hugetlb memory mapped, in 4 KiB pages.
    HugetlbPages,
    AnonFaults,
    ZeroPageFaults,
    CowFaults,
    ThpFaults,
    ThpFallbacks,
    ThpSplits,
    HugetlbFaults,
    SpuriousFaults,
    LostRaces,
    Retries,
    Oom,
    /// Faults resolved under their VMA's lock, without `mmap_lock`.
    VmaLockFaults,
    /// Faults resolved under `mmap_lock` shared (fallbacks, or per-VMA
    /// locks switched off).
    MmapLockFaults,
    VmaFallbackNotFound,
    VmaFallbackLocked,
    VmaFallbackDetached,
    /// Pages unmapped by `madvise(MADV_DONTNEED)`, in 4 KiB pages.
    MadviseZapped,
    /// Empty PTE tables reclaimed by `madvise` (Linux PT_RECLAIM).
    PtReclaimed,
    /// Pages pinned by the lockless walker (`gup_fast`).
    GupFastPages,
    /// Pages pinned by the locked slow path after the lockless walk gave up.
    GupSlowPages,
    /// Write faults that made a page this mapping owns alone writable.
    WpReuses,
    /// Anonymous pages (4 KiB) fork made shared copy-on-write.
    ForkShared,
    /// 2 MiB blocks `MADV_COLLAPSE` turned into THPs.
    ThpCollapses,
    /// Blocks it left alone for shared or pinned pages.
    ThpCollapseRefused,
}

const N: usize = Counter::ThpCollapseRefused as usize + 1;

#[repr(align(64))]
struct Shard {
    c: [AtomicU64; N],
}

/// The sharded counters of one `Mm`.
pub(crate) struct MmCounters {
    shards: Box<[Shard]>,
}

impl MmCounters {
    pub(crate) fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| Shard { c: [const { AtomicU64::new(0) }; N] }).collect() }
    }

    #[inline]
    pub(crate) fn add(&self, c: Counter, n: i64) {
        let s = &self.shards[crate::hal::cpu_id() % SHARDS];
        this_cpu_add(&s.c[c as usize], n as u64);
    }

    #[inline]
    pub(crate) fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    fn sum(&self, c: Counter) -> u64 {
        self.shards.iter().fold(0u64, |a, s| a.wrapping_add(s.c[c as usize].load(Relaxed)))
    }

    pub(crate) fn snapshot(&self) -> MmStats {
        MmStats {
            rss_pages: self.sum(Counter::Rss),
            hugetlb_pages: self.sum(Counter::HugetlbPages),
            anon_faults: self.sum(Counter::AnonFaults),
            zero_page_faults: self.sum(Counter::ZeroPageFaults),
            cow_faults: self.sum(Counter::CowFaults),
            thp_faults: self.sum(Counter::ThpFaults),
            thp_fallbacks: self.sum(Counter::ThpFallbacks),
            thp_splits: self.sum(Counter::ThpSplits),
            hugetlb_faults: self.sum(Counter::HugetlbFaults),
            spurious_faults: self.sum(Counter::SpuriousFaults),
            lost_races: self.sum(Counter::LostRaces),
            retries: self.sum(Counter::Retries),
            oom: self.sum(Counter::Oom),
            vma_lock_faults: self.sum(Counter::VmaLockFaults),
            mmap_lock_faults: self.sum(Counter::MmapLockFaults),
            vma_fallback_not_found: self.sum(Counter::VmaFallbackNotFound),
            vma_fallback_locked: self.sum(Counter::VmaFallbackLocked),
            vma_fallback_detached: self.sum(Counter::VmaFallbackDetached),
            madvise_zapped: self.sum(Counter::MadviseZapped),
            pt_reclaimed: self.sum(Counter::PtReclaimed),
            gup_fast_pages: self.sum(Counter::GupFastPages),
            gup_slow_pages: self.sum(Counter::GupSlowPages),
            wp_reuses: self.sum(Counter::WpReuses),
            fork_shared: self.sum(Counter::ForkShared),
            thp_collapses: self.sum(Counter::ThpCollapses),
            thp_collapse_refused: self.sum(Counter::ThpCollapseRefused),
        }
    }
}

/// A snapshot of an address space's counters ([`crate::Mm::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmStats {
    /// Anonymous memory mapped now, in 4 KiB pages (a 2 MiB THP counts 512;
    /// the shared zero page counts nothing).
    pub rss_pages: u64,
    /// hugetlb memory mapped now, in 4 KiB pages.
    pub hugetlb_pages: u64,
    /// Faults that mapped a fresh zeroed 4 KiB page (`do_anonymous_page`).
    pub anon_faults: u64,
    /// Read faults that mapped the shared zero page.
    pub zero_page_faults: u64,
    /// Write faults that copied a page into a private one (`wp_page_copy`):
    /// the zero page, or a page `fork` left shared.
    pub cow_faults: u64,
    /// Faults that mapped a 2 MiB transparent huge page.
    pub thp_faults: u64,
    /// THP-eligible faults that fell back to 4 KiB (no 2 MiB frame free).
    pub thp_fallbacks: u64,
    /// Huge PMDs split into PTE tables (partial munmap/mprotect).
    pub thp_splits: u64,
    /// Faults that mapped a hugetlb page (2 MiB or 1 GiB).
    pub hugetlb_faults: u64,
    /// Faults that found the access already allowed (another CPU fixed it,
    /// or a stale TLB entry).
    pub spurious_faults: u64,
    /// Faults that prepared a frame or table and found, under the lock, that
    /// another CPU had installed one first.
    pub lost_races: u64,
    /// Walks restarted because a page table changed under them.
    pub retries: u64,
    /// Faults that failed for lack of memory.
    pub oom: u64,
    /// Faults resolved under their VMA's lock, with no `mmap_lock`.
    pub vma_lock_faults: u64,
    /// Faults resolved under `mmap_lock` shared.
    pub mmap_lock_faults: u64,
    /// Fallbacks to `mmap_lock`: no VMA in the published array.
    pub vma_fallback_not_found: u64,
    /// Fallbacks to `mmap_lock`: the VMA was write-locked by a writer.
    pub vma_fallback_locked: u64,
    /// Fallbacks to `mmap_lock`: the VMA was replaced after the lookup.
    pub vma_fallback_detached: u64,
    /// Pages unmapped by `madvise(MADV_DONTNEED)` (4 KiB units).
    pub madvise_zapped: u64,
    /// Empty PTE tables freed by `madvise` (page-table reclaim).
    pub pt_reclaimed: u64,
    /// Pages pinned by the lockless walker.
    pub gup_fast_pages: u64,
    /// Pages pinned by the locked slow path.
    pub gup_slow_pages: u64,
    /// Write faults that made a page this mapping owns alone writable
    /// (`wp_page_reuse`), not counting copies.
    pub wp_reuses: u64,
    /// Anonymous 4 KiB pages fork left shared copy-on-write (in the parent's
    /// counters).
    pub fork_shared: u64,
    /// 2 MiB blocks `MADV_COLLAPSE` turned into THPs.
    pub thp_collapses: u64,
    /// Blocks `MADV_COLLAPSE` refused (shared or pinned pages).
    pub thp_collapse_refused: u64,
}

impl MmStats {
    /// Faults that installed something new.
    pub fn installing_faults(&self) -> u64 {
        self.anon_faults + self.zero_page_faults + self.cow_faults + self.thp_faults + self.hugetlb_faults
    }
}
