//! Spinlocks, lock classes, lock statistics and the lock-order protocol.
//!
//! # Protocol
//!
//! What each lock protects and the order they are taken in are written in
//! one place, `mm/README.md` ("Locks and their order"); every module that
//! takes locks points there. The levels below ([`LockLevel`]) encode that
//! order for the checker: a CPU may only take a lock of a *higher* level
//! than all it holds, except a second lock of one level taken with
//! [`RawSpinLock::lock_nested`], whose caller documents its own order.
//! `hal::flush_tlb` may be called with any of these held;
//! `hal::synchronize_rcu` only with none.
//!
//! Which guard proves what:
//! * a [`PtlGuard`](crate::PtlGuard) returned by `pmd_lock` is the proof needed
//!   to write a PMD entry (`set_pmd`, `pmd_populate`); writers check in debug
//!   builds that it is the lock of *that* entry's table;
//! * a [`PteGuard`](crate::PteGuard) owns the PTE lock, so `set_pte` on it needs
//!   no further check: the type is the proof;
//! * `mm.page_table_lock`'s guard is the proof for PGD/P4D/PUD writes.
//!
//! Checking, at run time in debug builds (`cfg(debug_assertions)`):
//! [`lockdep`] keeps the locks each CPU holds and panics on an out-of-order
//! or recursive acquisition, and entry writers assert that the right lock is
//! held. (An earlier compile-time scheme of zero-sized level tokens was
//! removed: the real paths take their locks inside helpers and across
//! nested same-level pairs, which tokens could not follow, so it guarded
//! only its own tests.)

mod halt;
pub mod lockdep;
mod rwlock;
mod spinlock;
#[cfg(test)]
pub(crate) use halt::HALTING_CPUS;
pub mod stats;

pub use halt::{HALT_AFTER_CYCLES, halt_counts, halting_waiters, set_halting_waiters};
pub use rwlock::{RwReadGuard, RwSpinLock, RwWriteGuard};
pub use spinlock::{RawSpinGuard, RawSpinLock, SpinLock, SpinLockGuard, set_virt_spinlocks, virt_spinlocks};
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
