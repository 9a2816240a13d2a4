//! Physical memory at boot: from the bootloader's memory map to the mm
//! crate's memmap and frame allocator, with the kernel heap carved out first.
//!
//! The first MiB is never given to the allocator: it holds firmware data on
//! BIOS machines and the AP start-up trampoline must live there (the
//! trampoline code takes its page from it directly).

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};

use super::heap;

/// Everything below this stays out of the frame allocator.
pub const LOW_MEMORY_END: u64 = 0x10_0000;

/// Upper bound of the heap; smaller machines get an eighth of their RAM.
const HEAP_MAX: u64 = 32 << 20;

/// Usable RAM, as the bootloader reported it.
pub struct BootReport {
    /// Total usable bytes.
    pub usable: u64,
    /// Number of usable regions.
    pub regions: usize,
    /// The heap's physical start.
    pub heap_phys: u64,
    /// The heap's size.
    pub heap_size: u64,
}

/// Whether `[start, end)` lies inside one usable region of the boot memory
/// map (the AP trampoline checks its page with this).
pub fn is_usable(regions: &MemoryRegions, start: u64, end: u64) -> bool {
    regions.iter().any(|r| r.kind == MemoryRegionKind::Usable && r.start <= start && end <= r.end)
}

/// Builds the heap and the frame allocator. Call once, on the boot CPU.
pub fn init(regions: &MemoryRegions, phys_offset: u64) -> BootReport {
    crate::pgd::adopt_boot_pml4();
    let mut ranges = [(0u64, 0u64); mm::memmap::MAX_SECTIONS];
    let mut n = 0;
    let mut usable = 0;
    let mut count = 0;
    for r in regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable) {
        usable += r.end - r.start;
        count += 1;
        let start = r.start.max(LOW_MEMORY_END);
        if start < r.end && n < ranges.len() {
            ranges[n] = (start, r.end);
            n += 1;
        }
    }
    // SAFETY: the ranges are RAM the bootloader reports as usable (not holding
    // the kernel, its page tables, boot info or stack), mapped writable by the
    // direct map at `phys_offset`, and nothing else will claim them.
    let mut boot = unsafe { mm::BootMem::new(&ranges[..n], mm::DirectMap::new(phys_offset)) };
    let heap_size = HEAP_MAX.min(usable / 8) & !0xfff;
    let heap_phys = boot.alloc(heap_size, 4096, mm::PageKind::Heap).expect("no room for the kernel heap");
    heap::init(phys_offset + heap_phys.as_u64(), heap_size);
    mm::init(boot);
    BootReport { usable, regions: count, heap_phys: heap_phys.as_u64(), heap_size }
}

/// Sizes the per-CPU frame caches once the CPUs are online: each may hold
/// an eighth of free memory shared out among the CPUs (at least
/// `mm::PCP_HIGH`, at most 256 MiB), and a cache whose CPU recycles more
/// than that may grow until all caches together could hold half of free
/// memory. Returns both limits in frames.
///
/// Why so large: will-it-scale's `page_fault1` (and `cargo xtask bench`)
/// has each thread unmap 128 MiB and fault the next 128 MiB in. When a
/// CPU's cache holds a whole cycle's frames they go straight back to the
/// same CPU; otherwise every frame takes a buddy merge and a split under
/// the one zone lock, and the CPUs queue for it (measured: 1 -> 2 CPU
/// scaling 1.6x with 16 MiB caches, where the zone lock was the top
/// contended lock; at 8 vCPUs on 2 host cores, 54% of all samples spun on
/// it with the fixed eighth). Cached frames still count as free and are
/// drained when an allocation finds no block, so this costs no memory,
/// only some fragmentation for higher orders (which the drain undoes).
pub fn size_pcp_caches(online_cpus: usize) -> PcpLimits {
    const MAX_FRAMES: u64 = (256 << 20) / 4096;
    let cpus = online_cpus.max(1) as u64;
    let free = mm::nr_free_pages();
    let high = (free / 8 / cpus).min(MAX_FRAMES) as usize;
    let high_max = (free / 2 / cpus) as usize;
    mm::phys().set_pcp_limits(high, high_max);
    PcpLimits { high: mm::phys().pcp_high(), high_max: high_max.max(mm::phys().pcp_high()) }
}

/// The per-CPU frame cache limits the kernel chose, in frames.
pub struct PcpLimits {
    /// Each cache's limit.
    pub high: usize,
    /// How far a recycling CPU's cache may raise its own.
    pub high_max: usize,
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    /// Frames come and go through the allocator with exact accounting, and a
    /// zeroed frame is zero through the direct map.
    #[ktest]
    fn frame_alloc_free_accounting() {
        let before = mm::nr_free_pages();
        let f = mm::alloc_pages_zeroed(2).expect("no frames");
        assert_eq!(mm::nr_free_pages(), before - 4);
        // SAFETY: the 4 frames are ours; the direct map maps them.
        let bytes = unsafe { core::slice::from_raw_parts(f.virt(), 4 * 4096) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert!(f.phys_addr().as_u64() >= super::LOW_MEMORY_END, "allocator handed out low memory");
        mm::free_pages(f);
        assert_eq!(mm::nr_free_pages(), before);
    }
}
