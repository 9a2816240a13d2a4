//! Compile-time configuration of the split page-table locks.
//!
//! This mirrors `Documentation/mm/split_page_table_lock.rst`:
//!
//! * split PTE locks are on when `SPLIT_PTLOCK_CPUS <= NR_CPUS`;
//! * split PMD locks are on when split PTE locks are on *and* the architecture
//!   supports them (`ARCH_ENABLE_SPLIT_PMD_PTLOCK`; x86_64 with four levels does);
//! * when a split lock is off, every helper hands out `mm.page_table_lock`.
//!
//! Both numbers come from the environment at build time (`SPLIT_PTLOCK_CPUS`
//! through `build.rs`, `NR_CPUS` through `abi::NR_CPUS`), so
//! `SPLIT_PTLOCK_CPUS=1000000 cargo build` gives the single-lock kernel for
//! comparison without editing code.

use core::fmt;

include!(concat!(env!("OUT_DIR"), "/config.rs"));

/// `CONFIG_NR_CPUS`: from `abi::NR_CPUS`, the one source every crate uses.
pub use abi::NR_CPUS;

/// x86_64 with 4-level paging has more than two levels, so a PMD split lock makes
/// sense (the document: "PMD split lock only makes sense if you have more than two
/// page table levels").
pub const ARCH_ENABLE_SPLIT_PMD_PTLOCK: bool = true;

/// Linux `USE_SPLIT_PTE_PTLOCKS`.
pub const USE_SPLIT_PTE_PTLOCKS: bool = SPLIT_PTLOCK_CPUS <= NR_CPUS;

/// Linux `USE_SPLIT_PMD_PTLOCKS`.
pub const USE_SPLIT_PMD_PTLOCKS: bool = USE_SPLIT_PTE_PTLOCKS && ARCH_ENABLE_SPLIT_PMD_PTLOCK;

// The document: split PMD locks only where split PTE locks are on.
const _: () = assert!(!USE_SPLIT_PMD_PTLOCKS || USE_SPLIT_PTE_PTLOCKS);

pub use crate::ptlock::ALLOC_SPLIT_PTLOCKS;

/// What the kernel's boot summary prints about the memory manager's locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmConfig {
    /// `SPLIT_PTLOCK_CPUS` this crate was built with.
    pub split_ptlock_cpus: usize,
    /// `NR_CPUS` this crate was built with.
    pub nr_cpus: usize,
    /// PTE tables carry their own lock.
    pub split_pte_ptlocks: bool,
    /// PMD tables carry their own lock.
    pub split_pmd_ptlocks: bool,
    /// `ptl` is a pointer to a separately allocated lock (true) or the lock itself.
    pub alloc_split_ptlocks: bool,
    /// `size_of` the page-table lock type.
    pub ptlock_size: usize,
    /// `size_of::<Page>()`, the memmap cost per 4 KiB frame.
    pub page_size_bytes: usize,
    /// The debug lock (owner CPU and acquisition site) is compiled in.
    pub debug_ptlock: bool,
}

/// The configuration this crate was compiled with.
pub fn describe_config() -> MmConfig {
    MmConfig {
        split_ptlock_cpus: SPLIT_PTLOCK_CPUS,
        nr_cpus: NR_CPUS,
        split_pte_ptlocks: USE_SPLIT_PTE_PTLOCKS,
        split_pmd_ptlocks: USE_SPLIT_PMD_PTLOCKS,
        alloc_split_ptlocks: ALLOC_SPLIT_PTLOCKS,
        ptlock_size: core::mem::size_of::<crate::ptlock::PtLock>(),
        page_size_bytes: core::mem::size_of::<crate::memmap::Page>(),
        debug_ptlock: cfg!(feature = "debug-ptlock"),
    }
}

impl fmt::Display for MmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = |on: bool| if on { "split (per table)" } else { "mm.page_table_lock" };
        write!(
            f,
            "PTE locks: {}, PMD locks: {}, PUD/PGD: mm.page_table_lock; \
             ptl {} ({} B lock{}); SPLIT_PTLOCK_CPUS={} NR_CPUS={}; struct Page {} B",
            level(self.split_pte_ptlocks),
            level(self.split_pmd_ptlocks),
            if self.alloc_split_ptlocks { "allocated" } else { "inline" },
            self.ptlock_size,
            if self.debug_ptlock { ", debug" } else { "" },
            self.split_ptlock_cpus,
            self.nr_cpus,
            self.page_size_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_config_names_the_locks() {
        let c = describe_config();
        let s = alloc::format!("{c}");
        assert_eq!(c.split_pte_ptlocks, USE_SPLIT_PTE_PTLOCKS);
        assert!(s.contains(if c.alloc_split_ptlocks { "ptl allocated" } else { "ptl inline" }));
        if USE_SPLIT_PTE_PTLOCKS {
            assert!(s.starts_with("PTE locks: split"));
        } else {
            assert!(s.starts_with("PTE locks: mm.page_table_lock"));
        }
    }
}
