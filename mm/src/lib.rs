//! The memory manager: the struct-page array (memmap), the frame allocator,
//! page tables with Linux's split page-table locks, and the address space
//! (`Mm`), following `Documentation/mm/split_page_table_lock.rst`.
//!
//! `#![no_std]`; reaches hardware only through [`hal::Hal`], so the same walker
//! and helpers run in the kernel and in host tests (whose "physical memory" is
//! an ordinary buffer holding real x86_64-format page tables).
//!
//! # Module map
//!
//! | module | job |
//! | --- | --- |
//! | [`addr`] | `PhysAddr`, `VirtAddr`, `Pfn`, the direct-map window |
//! | [`hal`] | the hardware trait and its registration |
//! | [`bootmem`] | usable RAM before the allocator; boot-time contiguous allocations |
//! | [`memmap`] | `Page` descriptors (<= 64 bytes each) per usable frame, in sections |
//! | [`frame`] | buddy allocator (orders 0..=10) + per-CPU order-0 caches; `Frames` |
//! | [`physmem`] | `PhysMem`: memmap + allocator + window, one per machine |
//! | [`lock`] | the ticket spinlock, lock classes and statistics, lock order (protocol comment) |
//! | [`ptlock`] | `ptl` storage: inline lock or allocated pointer, chosen from the size |
//! | [`ptdesc`] | `Ptdesc`, `PtPage`, `pagetable_*_ctor` / `pagetable_dtor` |
//! | [`pgtable`] | entry types, the entry-access module, the walker and `*_alloc` |
//! | `helpers` | `pte_offset_map_lock` and friends, `pmd_lock`, `huge_pte_lock` (re-exported here) |
//! | [`mm_struct`] | `Mm` (PGD, `page_table_lock`, `mmap_lock` + VMA set, `cpu_bitmap`, counters) and `KernelPgd` |
//! | [`vma`] | `Vma`, `VmFlags`, `Prot`, `MapFlags`, the ordered `VmaSet` |
//! | [`mmap`] | `Mm::mmap` / `munmap` / `mprotect` / `populate` / `access_remote`, lockless and locked walks |
//! | [`memory`] | `handle_mm_fault`, `do_anonymous_page`, `do_wp_page`, zap, `free_pgtables`, `change_protection` |
//! | [`huge_memory`] | THP: `do_huge_pmd_anonymous_page`, deposit/withdraw, `__split_huge_pmd`, `zap_huge_pmd` |
//! | [`hugetlb`] | `hugetlb_fault` for 2 MiB (buddy) and 1 GiB (gigantic pool) pages |
//! | [`gigantic`] | the pool of 1 GiB frames reserved at boot |
//! | [`tlb`] | `CpuBitmap`, `FlushRange`, `MmuGather` (flush, then free; grace period for tables) |
//! | [`counters`] | per-`Mm` RSS and fault counters (`MmStats`) |
//! | `percpu` | `this_cpu_add`: the unlocked update of a CPU's own counter shard |
//! | [`config`] | split-lock configuration from the build, `describe_config` |
//!
//! # Boot sequence (kernel)
//!
//! ```text
//! mm::hal::set(&KERNEL_HAL);                                   // once, on the BSP
//! let mut boot = unsafe { mm::BootMem::new(&usable_ranges, mm::DirectMap::new(phys_offset)) };
//! boot.reserve_gigantic(n);                                    // 1 GiB hugetlb pool, first
//! let heap = boot.alloc(HEAP_BYTES, 4096, mm::PageKind::Heap)  // before the buddy starts
//!     .expect("heap");                                        // -> PhysAddr; map via phys_offset
//! let phys: &'static mm::PhysMem = mm::init(boot);              // memmap carved, rest to buddy
//! let kpgd = unsafe { mm::KernelPgd::new(cr3_phys) };
//! let mm = mm::Mm::new(kpgd).expect("oom");                    // a user address space
//! ```
//!
//! The kernel heap comes from [`BootMem::alloc`] (kind [`PageKind::Heap`] in
//! the memmap); heap-backed allocations in `mm` (only the `debug-ptlock`
//! build's allocated `ptl`) therefore need the heap set up before the first
//! page-table constructor runs, not before `init`.
//!
//! # Public API summary
//!
//! * init: [`BootMem::new`], [`BootMem::alloc`], [`init`], [`phys`], [`hal::set`]
//! * frames: [`alloc_pages`], [`alloc_pages_zeroed`], [`free_pages`],
//!   [`nr_free_pages`], [`drain_all_pcp`] (and the same on [`PhysMem`])
//! * address spaces: [`Mm::new`], [`Mm::new_in`], [`Mm::new_init_mm`],
//!   `Drop for Mm` (unmaps everything, frees frames and tables exactly)
//! * mappings: [`Mm::mmap`]`(addr: Option<VirtAddr>, len, Prot, MapFlags) -> Result<VirtAddr, MmapError>`,
//!   [`Mm::munmap`]`(addr, len)`, [`Mm::mprotect`]`(addr, len, Prot)`,
//!   [`Mm::populate`], [`Mm::vmas`], [`Mm::mappings`], [`Mm::follow_pte_lockless`]
//! * faults: [`handle_mm_fault`]`(mm, addr, Access) -> Result<FaultResult, FaultError>`
//!   (takes `mmap_lock` shared itself; errors `MapErr`, `AccErr`, `Oom`)
//! * kernel access to user memory: [`Mm::access_remote`]`(addr, &mut [u8], write)`
//! * shoot-down: [`Mm::cpu_bitmap`] (set a CPU's bit when loading the CR3),
//!   [`hal::Hal::flush_tlb`], [`hal::Hal::synchronize_rcu`], [`MmuGather`]
//! * counters: [`Mm::stats`] -> [`MmStats`]; the zero page [`PhysMem::zero_pfn`];
//!   the gigantic pool [`BootMem::reserve_gigantic`], [`PhysMem::gigantic_pool`]
//! * walker: [`pgd_offset`], [`p4d_offset`], [`pud_offset`], [`pmd_offset`],
//!   [`p4d_alloc`], [`pud_alloc`], [`pmd_alloc`], [`pte_alloc`]
//! * helpers: [`pte_offset_map_lock`], [`pte_offset_map_ro_nolock`],
//!   [`pte_offset_map_rw_nolock`], [`pte_offset_map`], [`pte_unmap`],
//!   [`pte_unmap_unlock`], [`pte_alloc_map_lock`], [`pmd_lock`],
//!   [`pmd_lockptr`], [`pte_lockptr`], [`huge_pte_lock`], [`huge_pte_lockptr`]
//! * tables: [`pagetable_alloc`], [`pagetable_pte_ctor`],
//!   [`pagetable_pmd_ctor`], [`pagetable_dtor`], [`pagetable_free`]
//! * report: [`describe_config`], [`memmap_stats`], [`lock::lock_stats`]

#![no_std]

extern crate alloc;
#[cfg(any(test, loom))]
extern crate std;

pub mod addr;
pub mod bootmem;
pub mod config;
pub mod counters;
pub mod fork;
pub mod frame;
pub mod free_pgtables;
pub mod gigantic;
pub mod gup;
pub mod hal;
mod helpers;
pub mod huge_memory;
pub mod hugetlb;
pub mod khugepaged;
pub mod lock;
pub mod madvise;
pub mod memmap;
pub mod memory;
pub mod mm_struct;
pub mod mmap;
pub mod mprotect;
pub mod mremap;
pub mod pagewalk;
mod percpu;
pub mod pgtable;
pub mod physmem;
pub mod ptdesc;
pub mod ptlock;
mod sync;
pub mod table_rcu;
pub mod tlb;
pub mod vma;
pub mod vma_lock;
pub mod zap;

#[cfg(test)]
#[cfg_attr(loom, allow(dead_code))]
pub(crate) mod testing;

#[cfg(all(test, loom))]
mod loom_tests;

#[cfg(all(test, not(loom)))]
mod fault_tests;

#[cfg(all(test, not(loom)))]
mod huge_tests;

#[cfg(all(test, not(loom)))]
mod madvise_tests;

#[cfg(all(test, not(loom)))]
mod gup_tests;

#[cfg(all(test, not(loom)))]
mod fork_tests;

#[cfg(all(test, not(loom)))]
mod mremap_tests;

#[cfg(all(test, not(loom)))]
mod collapse_tests;

#[cfg(all(test, not(loom)))]
mod vma_thp_tests;

pub use addr::{DirectMap, PAGE_SIZE, PMD_SIZE, PUD_SIZE, Pfn, PhysAddr, TASK_SIZE_MAX, VirtAddr};
pub use bootmem::BootMem;
pub use config::{MmConfig, describe_config};
pub use counters::MmStats;
pub use frame::{Frames, MAX_ORDER, PCP_BATCH, PCP_HIGH};
pub use gigantic::{GIGANTIC_ORDER, GiganticPool};
pub use helpers::*;
pub use huge_memory::{HPAGE_PMD_ORDER, pgtable_trans_huge_deposit, pgtable_trans_huge_withdraw};
pub use madvise::Advice;
pub use memmap::{MemmapStats, Page, PageKind};
pub use memory::{Access, FaultError, FaultResult, MAX_FAULT_RETRIES, handle_mm_fault};
pub use mm_struct::{KernelPgd, Mm};
pub use mmap::{Mapping, MmapError};
pub use pgtable::entry::{P4d, PROTNONE, Pgd, Pmd, Pte, PteFlags, Pud, pmd_same, pte_same};
pub use pgtable::walk::{
    __pte_alloc, P4dRef, PgdRef, PmdRef, PudRef, p4d_alloc, p4d_clear, p4d_offset, p4d_populate, pgd_offset, pmd_alloc,
    pmd_clear_bad, pmd_offset, pmd_populate, pte_alloc, pud_alloc, pud_offset, pud_populate, set_pmd, set_pud,
    walk_alloc_pmd, walk_pmd,
};
pub use physmem::PhysMem;
pub use ptdesc::{
    PtLevel, PtPage, Ptdesc, page_ptdesc, pagetable_alloc, pagetable_dtor, pagetable_free, pagetable_pmd_ctor,
    pagetable_pte_ctor, virt_to_ptdesc,
};
pub use ptlock::{ALLOC_SPLIT_PTLOCKS, AllocError, FaultInject, PtLock};
pub use tlb::{CpuBitmap, FlushRange, MmuGather};
pub use vma::{MMAP_BASE, MMAP_MIN_ADDR, MapFlags, Prot, VmFlags, Vma, VmaSet};

#[cfg(not(loom))]
static PHYS: spin::Once<PhysMem> = spin::Once::new();

/// Builds the kernel's physical memory manager from `boot` (carving the
/// memmap out of usable RAM and freeing everything else into the buddy
/// allocator) and makes it the global one. Call once; later calls return the
/// first instance and ignore `boot`.
#[cfg(not(loom))]
pub fn init(boot: BootMem) -> &'static PhysMem {
    PHYS.call_once(|| PhysMem::new(boot))
}

/// The global physical memory manager. Panics before [`init`].
#[cfg(not(loom))]
pub fn phys() -> &'static PhysMem {
    PHYS.get().expect("mm::init has not run")
}

/// The global physical memory manager, if [`init`] has run.
#[cfg(not(loom))]
pub fn try_phys() -> Option<&'static PhysMem> {
    PHYS.get()
}

/// Allocates 2^order contiguous frames from the global allocator.
#[cfg(not(loom))]
#[track_caller]
pub fn alloc_pages(order: usize) -> Option<Frames<'static>> {
    phys().alloc_pages(order)
}

/// Allocates 2^order zeroed frames from the global allocator.
#[cfg(not(loom))]
#[track_caller]
pub fn alloc_pages_zeroed(order: usize) -> Option<Frames<'static>> {
    phys().alloc_pages_zeroed(order)
}

/// Frees frames (same as dropping them).
pub fn free_pages(frames: Frames<'_>) {
    drop(frames);
}

/// Free frames in the global allocator, per-CPU caches included.
#[cfg(not(loom))]
pub fn nr_free_pages() -> u64 {
    phys().nr_free_pages()
}

/// Returns every CPU's cached frames to the global buddy allocator.
#[cfg(not(loom))]
pub fn drain_all_pcp() {
    phys().drain_all_pcp()
}

/// Memmap figures for the boot report.
#[cfg(not(loom))]
pub fn memmap_stats() -> MemmapStats {
    phys().memmap_stats()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn global_init_once() {
        // The only test that touches the global instance. Its buffer is
        // leaked: the global lives for the rest of the process.
        let layout = std::alloc::Layout::from_size_align(0x40_0000, 4096).unwrap();
        // SAFETY: non-zero layout.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!buf.is_null());
        // SAFETY: the leaked buffer spans physical 0..4 MiB at this window and
        // is used by nothing else, forever.
        let boot = unsafe { BootMem::new(&[(0x1000, 0x40_0000)], DirectMap::new(buf as u64)) };
        let p = init(boot);
        assert!(core::ptr::eq(p, phys()));
        let before = nr_free_pages();
        let f = alloc_pages_zeroed(3).unwrap();
        assert_eq!(nr_free_pages(), before - 8);
        free_pages(f);
        assert_eq!(nr_free_pages(), before);
        drain_all_pcp();
        assert_eq!(memmap_stats().page_descriptor_bytes, 64);
        let (kpgd, _) = alloc_pages_zeroed(0).unwrap().into_raw();
        // SAFETY: a frame of the global PhysMem that is never freed.
        let kernel = unsafe { KernelPgd::new(kpgd.phys()) };
        let before = nr_free_pages();
        let mm = Mm::new(kernel).unwrap();
        assert_eq!(nr_free_pages(), before - 1);
        drop(mm);
        assert_eq!(nr_free_pages(), before);
    }
}
