//! Address newtypes: physical addresses, virtual addresses, page frame numbers,
//! and the direct-map window that turns one into the other.
//!
//! Every conversion between them is a named function, so a PFN can never be
//! passed where a byte address is expected.

use core::fmt;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page (and frame) size: 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// log2 of the span mapped by one PMD entry (2 MiB).
pub const PMD_SHIFT: u32 = 21;
/// Bytes mapped by one PMD entry.
pub const PMD_SIZE: u64 = 1 << PMD_SHIFT;
/// log2 of the span mapped by one PUD entry (1 GiB).
pub const PUD_SHIFT: u32 = 30;
/// Bytes mapped by one PUD entry.
pub const PUD_SIZE: u64 = 1 << PUD_SHIFT;
/// log2 of the span mapped by one PGD (PML4) entry (512 GiB).
pub const PGDIR_SHIFT: u32 = 39;
/// Bytes mapped by one PGD entry.
pub const PGDIR_SIZE: u64 = 1 << PGDIR_SHIFT;
/// Entries in every x86_64 table level.
pub const PTRS_PER_TABLE: usize = 512;
/// The first PGD slot of the kernel half (canonical upper half).
pub const KERNEL_PGD_BOUNDARY: usize = 256;
/// Exclusive end of user mappings (Linux `TASK_SIZE_MAX`; defined by the ABI).
pub use abi::TASK_SIZE_MAX;
/// Exclusive end of the span user page tables may cover (Linux
/// `USER_PGTABLES_CEILING`): the end of PGD slot 255. Only table freeing
/// uses it; user addresses are checked against [`TASK_SIZE_MAX`].
pub const USER_PGTABLES_CEILING: u64 = (KERNEL_PGD_BOUNDARY as u64) << PGDIR_SHIFT;

/// Bits 12..52 of an entry hold the physical address.
pub const PHYS_ADDR_BITS: u32 = 52;

/// A physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct PhysAddr(u64);

impl PhysAddr {
    /// Wraps a physical address; panics if it is wider than 52 bits (x86_64's
    /// architectural limit), since no entry could hold it.
    pub const fn new(pa: u64) -> Self {
        assert!(pa >> PHYS_ADDR_BITS == 0, "physical address beyond 52 bits");
        Self(pa)
    }
    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
    /// Rounds down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: u64) -> Self {
        Self(self.0 & !(align - 1))
    }
    /// Rounds up to a multiple of `align` (a power of two).
    pub const fn align_up(self, align: u64) -> Self {
        Self((self.0 + align - 1) & !(align - 1))
    }
    /// The frame containing this address.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
    /// This address plus `bytes`.
    pub const fn add(self, bytes: u64) -> Self {
        Self::new(self.0 + bytes)
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysAddr({:#x})", self.0)
    }
}

/// A virtual address (user or kernel).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VirtAddr(u64);

impl VirtAddr {
    /// Wraps a virtual address. Non-canonical addresses are accepted: the walker
    /// only uses bits 12..48, and callers (the fault path) check canonicality.
    pub const fn new(va: u64) -> Self {
        Self(va)
    }
    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// Index into the PGD (PML4).
    pub const fn pgd_index(self) -> usize {
        ((self.0 >> PGDIR_SHIFT) as usize) & (PTRS_PER_TABLE - 1)
    }
    /// Index into a PUD table (PDPT).
    pub const fn pud_index(self) -> usize {
        ((self.0 >> PUD_SHIFT) as usize) & (PTRS_PER_TABLE - 1)
    }
    /// Index into a PMD table (page directory).
    pub const fn pmd_index(self) -> usize {
        ((self.0 >> PMD_SHIFT) as usize) & (PTRS_PER_TABLE - 1)
    }
    /// Index into a PTE table.
    pub const fn pte_index(self) -> usize {
        ((self.0 >> PAGE_SHIFT) as usize) & (PTRS_PER_TABLE - 1)
    }
    /// Whether the address may be mapped by a user VMA (below [`TASK_SIZE_MAX`]).
    pub const fn is_user(self) -> bool {
        self.0 < TASK_SIZE_MAX
    }
    /// This address plus `bytes`.
    pub const fn add(self, bytes: u64) -> Self {
        Self(self.0.wrapping_add(bytes))
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

/// A page frame number: a physical address divided by [`PAGE_SIZE`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Pfn(u64);

impl Pfn {
    /// Wraps a frame number.
    pub const fn new(pfn: u64) -> Self {
        Self(pfn)
    }
    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// The physical address of the frame's first byte.
    pub const fn phys(self) -> PhysAddr {
        PhysAddr::new(self.0 << PAGE_SHIFT)
    }
    /// The frame `n` frames further on.
    pub const fn add(self, n: u64) -> Self {
        Self(self.0 + n)
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

/// The physical-memory window: all RAM mapped at a fixed offset (the
/// bootloader's direct map). In the kernel the offset is a high constant; in
/// host tests it is `buffer address - simulated physical base`, so the same
/// arithmetic reaches an ordinary heap buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectMap {
    offset: u64,
}

impl DirectMap {
    /// A window where physical address `pa` is visible at `pa + offset`
    /// (wrapping: on the host the offset may be "negative").
    pub const fn new(offset: u64) -> Self {
        Self { offset }
    }
    /// The offset.
    pub const fn offset(self) -> u64 {
        self.offset
    }
    /// The direct-map address of `pa` (Linux `__va`). Computing it is safe;
    /// dereferencing it is the business of the few modules that do.
    pub const fn virt(self, pa: PhysAddr) -> *mut u8 {
        pa.0.wrapping_add(self.offset) as usize as *mut u8
    }
    /// The physical address behind a direct-map address (Linux `__pa`).
    pub fn phys(self, va: *const u8) -> PhysAddr {
        PhysAddr::new((va as usize as u64).wrapping_sub(self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_split_the_address() {
        let va = VirtAddr::new((3 << PGDIR_SHIFT) | (5 << PUD_SHIFT) | (7 << PMD_SHIFT) | (9 << PAGE_SHIFT) | 0x123);
        assert_eq!((va.pgd_index(), va.pud_index(), va.pmd_index(), va.pte_index()), (3, 5, 7, 9));
        assert!(va.is_user());
        assert!(!VirtAddr::new(0xffff_8000_0000_0000).is_user());
        assert!(VirtAddr::new(TASK_SIZE_MAX - 1).is_user() && !VirtAddr::new(TASK_SIZE_MAX).is_user());
    }

    #[test]
    fn pfn_phys_round_trip_and_alignment() {
        let pa = PhysAddr::new(0x1234_5678);
        assert_eq!(pa.pfn(), Pfn::new(0x12345));
        assert_eq!(pa.pfn().phys(), PhysAddr::new(0x1234_5000));
        assert_eq!(pa.align_up(PAGE_SIZE), PhysAddr::new(0x1234_6000));
        assert!(!pa.is_aligned(PAGE_SIZE));
    }

    #[test]
    fn direct_map_round_trip_with_negative_offset() {
        let dm = DirectMap::new(0u64.wrapping_sub(0x1000));
        let pa = PhysAddr::new(0x5000);
        assert_eq!(dm.virt(pa) as usize, 0x4000);
        assert_eq!(dm.phys(dm.virt(pa)), pa);
    }

    #[test]
    #[should_panic(expected = "52 bits")]
    fn physaddr_rejects_wide_addresses() {
        let _ = PhysAddr::new(1 << 52);
    }
}
