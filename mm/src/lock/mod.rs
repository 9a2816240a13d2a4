//! Spinlocks, lock classes, lock statistics and the lock-order protocol.
//!
//! # Protocol
//!
//! What each lock protects (the table of DESIGN.md section 5):
//!
//! | lock | protects |
//! | --- | --- |
//! | `mmap_lock` ([`RwSpinLock`], `Mm::mmap_lock`) | the VMA set; held shared by faults (which keeps page tables from being detached under them), exclusive by mmap/munmap/mprotect |
//! | `mm.page_table_lock` | PGD, P4D (folded) and PUD entries; 1 GiB hugetlb entries; *every* entry when split locks are off |
//! | PMD lock (`pmd_lock`, the PMD table's `ptl`) | the entries of that one PMD table; 2 MiB hugetlb/THP entries |
//! | PTE lock (`pte_offset_map_lock`, the PTE table's `ptl`) | the entries of that one PTE table |
//! | per-CPU frame cache lock | that CPU's list of cached order-0 frames |
//! | zone lock | the buddy free lists |
//!
//! Order (a CPU may only take a lock of a *higher* level than all it holds):
//!
//! ```text
//! mmap_lock -> mm.page_table_lock -> PMD lock -> PTE lock -> per-CPU frame cache -> zone
//! ```
//!
//! The gigantic-page pool lock sits at the zone's level and nests with
//! nothing. `hal::flush_tlb` may be called with any of these held;
//! `hal::synchronize_rcu` is only called with none held.
//!
//! Two locks of one level are never held together unless the second is taken
//! with [`RawSpinLock::lock_nested`], whose caller documents its own order.
//!
//! Which guard proves what:
//! * a [`PtlGuard`](crate::PtlGuard) returned by `pmd_lock` is the proof needed
//!   to write a PMD entry (`set_pmd`, `pmd_populate`); writers check in debug
//!   builds that it is the lock of *that* entry's table;
//! * a [`PteGuard`](crate::PteGuard) owns the PTE lock, so `set_pte` on it needs
//!   no further check: the type is the proof;
//! * `mm.page_table_lock`'s guard is the proof for PGD/P4D/PUD writes.
//!
//! Checking:
//! * at compile time where the call graph allows it: [`ordered`] gives each
//!   level a zero-sized token, and taking a lock consumes the token of a lower
//!   level;
//! * at run time in debug builds (`cfg(debug_assertions)`): [`lockdep`] keeps
//!   the locks each CPU holds and panics on an out-of-order or recursive
//!   acquisition, and entry writers assert that the right lock is held.

pub mod lockdep;
pub mod ordered;
mod rwlock;
mod spinlock;
pub mod stats;

pub use rwlock::{RwReadGuard, RwSpinLock, RwWriteGuard};
pub use spinlock::{RawSpinGuard, RawSpinLock, SpinLock, SpinLockGuard};
pub use stats::{LockStats, lock_stats, reset_lock_stats};

/// What a lock is, for statistics: the benchmark reports contention per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LockClass {
    /// `mm.page_table_lock`.
    PageTableLock = 0,
    /// A PMD table's split lock.
    PmdLock = 1,
    /// A PTE table's split lock.
    PteLock = 2,
    /// The frame allocator (zone and per-CPU caches).
    FrameAllocator = 3,
    /// Anything else.
    Other = 4,
    /// `Mm::mmap_lock`, the VMA set's reader-writer lock.
    MmapLock = 5,
}

impl LockClass {
    /// Number of classes.
    pub const COUNT: usize = 6;
    /// All classes, in index order.
    pub const ALL: [LockClass; Self::COUNT] = [
        LockClass::PageTableLock,
        LockClass::PmdLock,
        LockClass::PteLock,
        LockClass::FrameAllocator,
        LockClass::Other,
        LockClass::MmapLock,
    ];
    /// A short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            LockClass::PageTableLock => "page_table_lock",
            LockClass::PmdLock => "pmd_lock",
            LockClass::PteLock => "pte_lock",
            LockClass::FrameAllocator => "frame_allocator",
            LockClass::Other => "other",
            LockClass::MmapLock => "mmap_lock",
        }
    }
    pub(crate) const fn from_u8(v: u8) -> LockClass {
        match v {
            0 => LockClass::PageTableLock,
            1 => LockClass::PmdLock,
            2 => LockClass::PteLock,
            3 => LockClass::FrameAllocator,
            5 => LockClass::MmapLock,
            _ => LockClass::Other,
        }
    }
}

/// Where an acquisition sits in the lock order (see the protocol above). The
/// level belongs to the *acquisition*, not the lock: with split locks off,
/// `pmd_lock` returns `mm.page_table_lock` taken at [`LockLevel::Pmd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum LockLevel {
    /// The address-space lock (`mmap_lock`, the VMA set).
    AddressSpace = 1,
    /// `mm.page_table_lock`.
    PageTableLock = 2,
    /// A PMD table lock.
    Pmd = 3,
    /// A PTE table lock.
    Pte = 4,
    /// A per-CPU frame cache.
    PcpList = 5,
    /// The buddy allocator's zone lock.
    Zone = 6,
    /// Not ordered against the others and not tracked (kernel-internal locks
    /// that never nest with these).
    Untracked = 255,
}

impl LockLevel {
    pub(crate) const fn from_u8(v: u8) -> LockLevel {
        match v {
            1 => LockLevel::AddressSpace,
            2 => LockLevel::PageTableLock,
            3 => LockLevel::Pmd,
            4 => LockLevel::Pte,
            5 => LockLevel::PcpList,
            6 => LockLevel::Zone,
            _ => LockLevel::Untracked,
        }
    }
}
