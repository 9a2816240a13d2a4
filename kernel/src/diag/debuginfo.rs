//! Facts the gdb helpers (gdb/ptlk.py) cannot read from DWARF: the build's
//! compile-time configuration, fixed addresses, and the names of the memory
//! manager's enumerations that the struct-page array stores as plain bytes,
//! in one `#[repr(C)]` block with a stable symbol name (like Linux's
//! vmcoreinfo). The helpers check `magic` and `version` before trusting the
//! rest, and take their name tables from here instead of keeping copies.

use mm::{PageKind, PtLevel};

/// Room for one name in a table: NUL-padded ASCII.
const NAME_LEN: usize = 16;
/// Room for the entries of one name table.
const MAX_NAMES: usize = 16;

/// A table of names indexed by an enumeration's value (`count` used,
/// unused entries all NUL).
#[repr(C)]
pub struct NameTable {
    /// Entries in use.
    pub count: u32,
    /// The names, each NUL-padded.
    pub names: [[u8; NAME_LEN]; MAX_NAMES],
}

impl NameTable {
    /// The table of `names`, entry `i` for value `i`.
    const fn new(names: &[&str]) -> Self {
        assert!(names.len() <= MAX_NAMES, "too many names for a debug-info table");
        let mut table = NameTable { count: names.len() as u32, names: [[0; NAME_LEN]; MAX_NAMES] };
        let mut i = 0;
        while i < names.len() {
            let bytes = names[i].as_bytes();
            assert!(bytes.len() < NAME_LEN, "name too long for a debug-info table");
            let mut j = 0;
            while j < bytes.len() {
                table.names[i][j] = bytes[j];
                j += 1;
            }
            i += 1;
        }
        table
    }
}

/// `mm::PageKind`'s variants, in value order (checked below).
const PAGE_KINDS: [PageKind; 9] = [
    PageKind::Free,
    PageKind::Reserved,
    PageKind::Memmap,
    PageKind::Heap,
    PageKind::Kernel,
    PageKind::Anon,
    PageKind::PageTable,
    PageKind::ZeroPage,
    PageKind::Gigantic,
];

/// A page kind's name as gdb prints it. The match has no catch-all: a new
/// `PageKind` does not build until it is named here (and listed above).
const fn page_kind_name(kind: PageKind) -> &'static str {
    match kind {
        PageKind::Free => "Free",
        PageKind::Reserved => "Reserved",
        PageKind::Memmap => "Memmap",
        PageKind::Heap => "Heap",
        PageKind::Kernel => "Kernel",
        PageKind::Anon => "Anon",
        PageKind::PageTable => "PageTable",
        PageKind::ZeroPage => "ZeroPage",
        PageKind::Gigantic => "Gigantic",
    }
}

const PAGE_KIND_NAMES: [&str; PAGE_KINDS.len()] = {
    let mut names = [""; PAGE_KINDS.len()];
    let mut i = 0;
    while i < PAGE_KINDS.len() {
        assert!(PAGE_KINDS[i] as usize == i, "PAGE_KINDS is not in value order");
        names[i] = page_kind_name(PAGE_KINDS[i]);
        i += 1;
    }
    names
};

/// A page-table level's name as gdb prints it (value 0 in the struct page
/// means "not a page table", printed `-`). No catch-all, as above for kinds.
const fn pt_level_name(level: PtLevel) -> &'static str {
    match level {
        PtLevel::Pte => "PTE",
        PtLevel::Pmd => "PMD",
        PtLevel::Pud => "PUD",
        PtLevel::Pgd => "PGD",
    }
}

const PT_LEVEL_NAMES: [&str; 5] = {
    let levels = [PtLevel::Pte, PtLevel::Pmd, PtLevel::Pud, PtLevel::Pgd];
    let mut names = ["-"; 5];
    let mut i = 0;
    while i < levels.len() {
        assert!(levels[i] as usize == i + 1, "page-table levels are not numbered 1..=4");
        names[i + 1] = pt_level_name(levels[i]);
        i += 1;
    }
    names
};

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
    /// Names of `mm::PageKind` by value (a struct page's `kind`).
    pub page_kinds: NameTable,
    /// Names of a struct page's `pt_level` by value (0: not a page table).
    pub pt_levels: NameTable,
}

/// The block itself.
#[unsafe(no_mangle)]
#[used]
pub static PTLK_DEBUG_INFO: PtlkDebugInfo = PtlkDebugInfo {
    magic: u64::from_le_bytes(*b"PTLKDBG\0"),
    version: 2,
    split_pte_ptlocks: mm::config::USE_SPLIT_PTE_PTLOCKS as u8,
    split_pmd_ptlocks: mm::config::USE_SPLIT_PMD_PTLOCKS as u8,
    alloc_split_ptlocks: mm::ALLOC_SPLIT_PTLOCKS as u8,
    debug_ptlock: cfg!(feature = "debug-ptlock") as u8,
    phys_offset: crate::boot::PHYS_OFFSET,
    nr_cpus: arch::percpu::NR_CPUS as u32,
    page_desc_size: core::mem::size_of::<mm::Page>() as u32,
    page_kinds: NameTable::new(&PAGE_KIND_NAMES),
    pt_levels: NameTable::new(&PT_LEVEL_NAMES),
};

#[cfg(target_os = "none")]
mod tests {
    use alloc::format;

    use ktest::ktest;

    use super::*;

    /// The exported names are the variants' own names (what `Debug` prints;
    /// page-table levels in capitals), in value order.
    #[ktest]
    fn debuginfo_names_match_the_enums() {
        fn name(table: &NameTable, i: usize) -> &str {
            let raw = &table.names[i];
            let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            core::str::from_utf8(&raw[..len]).expect("name is not UTF-8")
        }
        assert_eq!(PTLK_DEBUG_INFO.page_kinds.count as usize, PAGE_KINDS.len());
        for (i, kind) in PAGE_KINDS.iter().enumerate() {
            assert_eq!(name(&PTLK_DEBUG_INFO.page_kinds, i), format!("{kind:?}"));
        }
        assert_eq!(PTLK_DEBUG_INFO.pt_levels.count, 5);
        assert_eq!(name(&PTLK_DEBUG_INFO.pt_levels, 0), "-");
        for (i, level) in [PtLevel::Pte, PtLevel::Pmd, PtLevel::Pud, PtLevel::Pgd].iter().enumerate() {
            assert_eq!(name(&PTLK_DEBUG_INFO.pt_levels, i + 1), format!("{level:?}").to_uppercase());
        }
    }
}
