//! Facts the gdb helpers (gdb/ptlk.py) cannot read from DWARF: the build's
//! compile-time configuration and fixed addresses, in one `#[repr(C)]` block
//! with a stable symbol name (like Linux's vmcoreinfo). The helpers check
//! `magic` and `version` before trusting the rest.

/// The block gdb reads. Field order and types are the ABI with gdb/ptlk.py
/// (bump `version` on any change).
#[repr(C)]
pub struct PtlkDebugInfo {
    /// `b"PTLKDBG\0"` as a little-endian u64.
    pub magic: u64,
    /// Layout version of this block.
    pub version: u32,
    /// Split PTE locks in force (`mm::config::USE_SPLIT_PTE_PTLOCKS`).
    pub split_pte_ptlocks: u8,
    /// Split PMD locks in force.
    pub split_pmd_ptlocks: u8,
    /// `ptl` is a pointer to an allocated lock (`mm::ALLOC_SPLIT_PTLOCKS`).
    pub alloc_split_ptlocks: u8,
    /// The debug lock (owner CPU and site) is built in.
    pub debug_ptlock: u8,
    /// Virtual address of physical 0 (the direct map).
    pub phys_offset: u64,
    /// Compile-time CPU limit.
    pub nr_cpus: u32,
    /// `size_of::<mm::Page>()`.
    pub page_desc_size: u32,
}

/// The block itself.
#[unsafe(no_mangle)]
#[used]
pub static PTLK_DEBUG_INFO: PtlkDebugInfo = PtlkDebugInfo {
    magic: u64::from_le_bytes(*b"PTLKDBG\0"),
    version: 1,
    split_pte_ptlocks: mm::config::USE_SPLIT_PTE_PTLOCKS as u8,
    split_pmd_ptlocks: mm::config::USE_SPLIT_PMD_PTLOCKS as u8,
    alloc_split_ptlocks: mm::ALLOC_SPLIT_PTLOCKS as u8,
    debug_ptlock: cfg!(feature = "debug-ptlock") as u8,
    phys_offset: crate::boot::PHYS_OFFSET,
    nr_cpus: arch::percpu::NR_CPUS as u32,
    page_desc_size: core::mem::size_of::<mm::Page>() as u32,
};
