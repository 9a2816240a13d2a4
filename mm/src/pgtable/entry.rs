//! Page-table entry types in the x86_64 hardware format.
//!
//! One type per level, so a PMD value cannot be written into a PTE slot. P4D is
//! folded into the PGD on 4-level paging: `P4d` is the PGD entry type.

use core::fmt;

use crate::addr::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Pfn, PhysAddr};

bitflags::bitflags! {
    /// The flag bits of an x86_64 page-table entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        /// The entry maps something.
        const PRESENT = 1 << 0;
        /// Writes allowed.
        const WRITABLE = 1 << 1;
        /// User-mode accesses allowed.
        const USER = 1 << 2;
        /// Write-through caching.
        const WRITE_THROUGH = 1 << 3;
        /// Caching disabled.
        const NO_CACHE = 1 << 4;
        /// Set by the CPU on access.
        const ACCESSED = 1 << 5;
        /// Set by the CPU on write (leaf entries).
        const DIRTY = 1 << 6;
        /// PS: a PMD maps a 2 MiB page, a PUD a 1 GiB page.
        const HUGE = 1 << 7;
        /// Not flushed on CR3 switches.
        const GLOBAL = 1 << 8;
        /// Available to software.
        const SOFT1 = 1 << 9;
        /// Available to software.
        const SOFT2 = 1 << 10;
        /// Available to software.
        const SOFT3 = 1 << 11;
        /// Instruction fetches forbidden.
        const NO_EXECUTE = 1 << 63;
    }
}

/// Linux `_PAGE_PROTNONE`: a leaf entry of a `PROT_NONE` mapping keeps its
/// frame but is not present (so every user access faults); this software bit
/// tells it from an empty or swap-like entry.
pub const PROTNONE: PteFlags = PteFlags::SOFT1;

/// Bits 12..52: the physical address.
pub const ENTRY_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The flags a table-pointing entry must have (plus optional `USER`,
/// `ACCESSED`, `DIRTY`); anything else makes it "bad" (Linux `p?d_bad`).
const TABLE_REQUIRED: PteFlags = PteFlags::PRESENT.union(PteFlags::WRITABLE);
const TABLE_OPTIONAL: PteFlags = PteFlags::USER.union(PteFlags::ACCESSED).union(PteFlags::DIRTY);

macro_rules! entry_type {
    ($(#[$m:meta])* $name:ident, $lvl:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The empty entry.
            pub const NONE: Self = Self(0);
            /// An entry from its raw bits.
            pub const fn from_raw(v: u64) -> Self {
                Self(v)
            }
            /// The raw bits.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// An entry pointing at `pa` with `flags`.
            pub fn new(pa: PhysAddr, flags: PteFlags) -> Self {
                debug_assert!(pa.is_aligned(PAGE_SIZE), "entry address not page aligned");
                Self((pa.as_u64() & ENTRY_ADDR_MASK) | flags.bits())
            }
            /// Linux `p?d_none`: all bits clear.
            pub const fn is_none(self) -> bool {
                self.0 == 0
            }
            /// Linux `p?d_present`.
            pub const fn is_present(self) -> bool {
                self.0 & PteFlags::PRESENT.bits() != 0
            }
            /// The flag bits.
            pub const fn flags(self) -> PteFlags {
                PteFlags::from_bits_retain(self.0 & !ENTRY_ADDR_MASK)
            }
            /// The physical address the entry points at.
            pub const fn phys(self) -> PhysAddr {
                PhysAddr::new(self.0 & ENTRY_ADDR_MASK)
            }
            /// The frame the entry points at.
            pub const fn pfn(self) -> Pfn {
                self.phys().pfn()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#018x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($lvl, " {:016x}"), self.0)
            }
        }
    };
}

entry_type!(
    /// A PGD (PML4) entry; with P4D folded also the P4D entry.
    Pgd, "pgd"
);
entry_type!(
    /// A PUD (PDPT) entry: a PMD table or a 1 GiB page.
    Pud, "pud"
);
entry_type!(
    /// A PMD (page directory) entry: a PTE table or a 2 MiB page.
    Pmd, "pmd"
);
entry_type!(
    /// A PTE: a 4 KiB page.
    Pte, "pte"
);

/// P4D is folded into the PGD on 4-level paging.
pub type P4d = Pgd;

fn table_flags_ok(flags: PteFlags) -> bool {
    flags.difference(TABLE_OPTIONAL) == TABLE_REQUIRED
}

fn table_flags(user: bool) -> PteFlags {
    let f = TABLE_REQUIRED | PteFlags::ACCESSED;
    if user { f | PteFlags::USER } else { f }
}

impl Pgd {
    /// An entry pointing at a PUD table.
    pub fn table(pa: PhysAddr, user: bool) -> Self {
        Self::new(pa, table_flags(user))
    }
    /// Present but not a well-formed table pointer (PGD entries never map
    /// pages, so PS is bad here).
    pub fn is_bad(self) -> bool {
        self.is_present() && !table_flags_ok(self.flags())
    }
    /// Present and a well-formed table pointer.
    pub fn is_table(self) -> bool {
        self.is_present() && !self.is_bad()
    }
}

/// The entries that point to a table or map a huge page (PS set): PUD
/// (1 GiB pages) and PMD (2 MiB pages) share one shape.
macro_rules! table_or_huge_entry {
    ($name:ident, $size:expr, $table:literal, $leaf_doc:literal, $huge_doc:literal) => {
        impl $name {
            #[doc = concat!("An entry pointing at a ", $table, " table.")]
            pub fn table(pa: PhysAddr, user: bool) -> Self {
                Self::new(pa, table_flags(user))
            }
            #[doc = concat!("A huge page of ", stringify!($size), " bytes.")]
            pub fn huge(pa: PhysAddr, flags: PteFlags) -> Self {
                debug_assert!(pa.is_aligned($size));
                Self::new(pa, flags | PteFlags::PRESENT | PteFlags::HUGE)
            }
            #[doc = $huge_doc]
            pub fn is_huge(self) -> bool {
                self.is_present() && self.flags().contains(PteFlags::HUGE)
            }
            #[doc = $leaf_doc]
            pub fn is_leaf(self) -> bool {
                self.flags().contains(PteFlags::HUGE) && (self.is_present() || self.flags().contains(PROTNONE))
            }
            /// Linux `p?d_bad`: present, not huge, and not a well-formed table pointer.
            pub fn is_bad(self) -> bool {
                self.is_present() && !self.is_huge() && !table_flags_ok(self.flags())
            }
            #[doc = concat!("Present and a well-formed ", $table, "-table pointer.")]
            pub fn is_table(self) -> bool {
                self.is_present() && !self.is_huge() && !self.is_bad()
            }
        }
    };
}

table_or_huge_entry!(
    Pud,
    PUD_SIZE,
    "PMD",
    "A 1 GiB leaf, present or `PROT_NONE` (see [`PROTNONE`]).",
    "Linux `pud_leaf`: maps a 1 GiB page."
);
table_or_huge_entry!(
    Pmd,
    PMD_SIZE,
    "PTE",
    "A 2 MiB leaf (THP or hugetlb), present or `PROT_NONE` (see [`PROTNONE`]).",
    "Linux `pmd_trans_huge` / `pmd_leaf`: maps a 2 MiB page."
);

impl Pte {
    /// A 4 KiB page mapping.
    pub fn page(pa: PhysAddr, flags: PteFlags) -> Self {
        Self::new(pa, flags | PteFlags::PRESENT)
    }
    /// Writable mapping.
    pub fn is_writable(self) -> bool {
        self.flags().contains(PteFlags::WRITABLE)
    }
    /// Linux `pte_protnone`: maps a frame of a `PROT_NONE` mapping.
    pub fn is_protnone(self) -> bool {
        !self.is_present() && self.flags().contains(PROTNONE)
    }
    /// Maps a frame, present or `PROT_NONE`.
    pub fn maps_frame(self) -> bool {
        self.is_present() || self.is_protnone()
    }
}

/// Linux `pmd_same`: the entry did not change.
pub fn pmd_same(a: Pmd, b: Pmd) -> bool {
    a == b
}

/// Linux `pte_same`.
pub fn pte_same(a: Pte, b: Pte) -> bool {
    a == b
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn table_huge_bad_classification() {
        let pa = PhysAddr::new(0x20_0000);
        let t = Pmd::table(pa, true);
        assert!(t.is_table() && !t.is_huge() && !t.is_bad() && !t.is_none());
        assert_eq!(t.phys(), pa);
        let h = Pmd::huge(pa, PteFlags::WRITABLE | PteFlags::USER);
        assert!(h.is_huge() && !h.is_table() && !h.is_bad());
        // Present but read-only: not a valid table pointer.
        let bad = Pmd::new(pa, PteFlags::PRESENT);
        assert!(bad.is_bad() && !bad.is_table());
        // Caching bits on a table pointer: bad too.
        assert!(Pmd::new(pa, PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_CACHE).is_bad());
        // Not present but not none (a swap-like entry): neither bad nor a table.
        let swap = Pmd::from_raw(0x1000);
        assert!(!swap.is_none() && !swap.is_present() && !swap.is_bad() && !swap.is_table());
        assert!(Pgd::new(pa, PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::HUGE).is_bad());
        assert!(Pud::huge(PhysAddr::new(0x4000_0000), PteFlags::empty()).is_huge());
    }

    #[test]
    fn address_and_flags_split() {
        let e = Pte::page(PhysAddr::new(0xabc_d000), PteFlags::WRITABLE | PteFlags::NO_EXECUTE);
        assert_eq!(e.phys(), PhysAddr::new(0xabc_d000));
        assert_eq!(e.pfn(), Pfn::new(0xabcd));
        assert_eq!(e.flags(), PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE);
        assert!(e.is_writable());
        assert!(pte_same(e, Pte::from_raw(e.raw())));
        assert!(!pmd_same(Pmd::NONE, Pmd::table(PhysAddr::new(0x1000), false)));
    }
}
