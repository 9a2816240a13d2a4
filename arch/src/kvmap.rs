//! A small window of kernel virtual addresses that arch code maps page by
//! page: device registers (uncached) and pages whose mapping changes at run
//! time (the TLB shoot-down tests).
//!
//! Why not the direct map: the bootloader maps physical memory with 2 MiB
//! write-back pages up to the highest RAM address or 4 GiB, whichever is
//! larger. That *covers* the local APIC (0xfee00000) and the I/O APIC, but as
//! write-back memory, and its entries are shared huge pages that must not be
//! changed one 4 KiB page at a time. Device registers need an uncached
//! mapping of their own (PCD|PWT selects UC with the power-on PAT); relying on
//! the firmware's MTRRs to override the write-back type would work on most
//! machines and silently break on the rest.
//!
//! Layout: PML4 slot 508 (`0xffff_fe00_0000_0000`), one page table, so 2 MiB
//! of window. Its PML4 entry is created once at boot, before any user address
//! space copies the kernel half (DESIGN.md section 3); afterwards only the
//! window's own page table changes. The three table pages come from a static
//! pool inside the kernel image, which the frame allocator never hands out;
//! their physical addresses are found by translating through the live page
//! tables with the `x86_64` crate's `OffsetPageTable`.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{OffsetPageTable, PageTable, PageTableFlags, PhysFrame, Translate};
use x86_64::{PhysAddr, VirtAddr};

use crate::tlb::{PendingFlush, TlbRange};

/// PML4 slot of the window.
pub const WINDOW_SLOT: usize = 508;
/// First address of the window.
pub const WINDOW_BASE: u64 = 0xffff_0000_0000_0000 | ((WINDOW_SLOT as u64) << 39);
/// Pages in the window (one page table).
pub const WINDOW_PAGES: usize = 512;
const PAGE: u64 = 4096;

/// How a window page is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// Ordinary memory.
    WriteBack,
    /// Device registers: strong uncacheable (PAT entry 3 with the power-on PAT).
    Uncached,
}

impl Caching {
    fn flags(self) -> PageTableFlags {
        let base = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
        match self {
            Caching::WriteBack => base,
            Caching::Uncached => base | PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH,
        }
    }
}

/// The PDPT, PD and PT of the window, page aligned, in the kernel's .bss.
#[repr(C, align(4096))]
struct TablePool(UnsafeCell<[PageTable; 3]>);

// SAFETY: the tables are written only by `init` (once, on the boot CPU,
// before other CPUs run) and, for the PT, under the WINDOW lock; the CPU's
// page walker reads them concurrently, which is what page tables are for.
unsafe impl Sync for TablePool {}

static POOL: TablePool = TablePool(UnsafeCell::new([const { PageTable::new() }; 3]));

/// The window's page-table page and which of its entries are taken.
struct Window {
    pt: *mut PageTable,
    used: [u64; WINDOW_PAGES / 64],
}

// SAFETY: `pt` points into POOL ('static); it is only dereferenced with the
// WINDOW lock held.
unsafe impl Send for Window {}

/// Protects the window's page table entries and the `used` bitmap.
static WINDOW: Mutex<Option<Window>> = Mutex::new(None);

/// Virtual address of physical address 0 (the direct map), set by [`init`].
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);

/// The direct map's offset (0 before [`init`]).
pub fn direct_map_offset() -> u64 {
    PHYS_OFFSET.load(Ordering::Relaxed)
}

/// Creates the window in the active kernel page tables. Call once on the boot
/// CPU, before other CPUs start and before any address space copies the
/// kernel half. `phys_offset` is where the bootloader mapped physical memory.
pub fn init(phys_offset: u64) {
    let mut window = WINDOW.lock();
    assert!(window.is_none(), "kvmap::init called twice");
    PHYS_OFFSET.store(phys_offset, Ordering::Relaxed);
    let (pml4_frame, _) = Cr3::read();
    let pml4_ptr = (phys_offset + pml4_frame.start_address().as_u64()) as *mut PageTable;
    // SAFETY: CR3 holds the kernel's PML4, which the direct map reaches; only
    // the boot CPU runs, so this is the only reference to it for the
    // duration of `init`.
    let pml4 = unsafe { &mut *pml4_ptr };
    // SAFETY: the direct map covers all physical memory at `phys_offset`.
    let mapper = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(phys_offset)) };
    let tables = POOL.0.get() as *mut PageTable;
    let phys = |i: usize| {
        // SAFETY: `i < 3`, inside the pool.
        let virt = VirtAddr::from_ptr(unsafe { tables.add(i) });
        mapper.translate_addr(virt).expect("kernel .bss is not mapped")
    };
    let (pdpt_pa, pd_pa, pt_pa) = (phys(0), phys(1), phys(2));
    let table_flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    // SAFETY: the pool is ours (see TablePool); the tables were zeroed by
    // the ELF loader (.bss) and nothing refers to them yet.
    unsafe {
        (&mut *tables.add(0))[0].set_addr(pd_pa, table_flags);
        (&mut *tables.add(1))[0].set_addr(pt_pa, table_flags);
    }
    let mut mapper = mapper;
    let pml4 = mapper.level_4_table_mut();
    assert!(pml4[WINDOW_SLOT].is_unused(), "PML4 slot {WINDOW_SLOT} is already in use");
    // Written last, so the hardware never sees a half-built path.
    pml4[WINDOW_SLOT].set_addr(pdpt_pa, table_flags);
    // SAFETY: index 2 is inside the pool.
    *window = Some(Window { pt: unsafe { tables.add(2) }, used: [0; WINDOW_PAGES / 64] });
}

impl Window {
    fn take_slots(&mut self, pages: usize) -> Option<usize> {
        let free = |w: &Self, i: usize| w.used[i / 64] & (1 << (i % 64)) == 0;
        let start = (0..=WINDOW_PAGES.checked_sub(pages)?).find(|&s| (s..s + pages).all(|i| free(self, i)))?;
        for i in start..start + pages {
            self.used[i / 64] |= 1 << (i % 64);
        }
        Some(start)
    }

    fn release(&mut self, index: usize) {
        self.used[index / 64] &= !(1 << (index % 64));
    }

    fn set(&mut self, index: usize, frame: Option<PhysAddr>, caching: Caching) {
        // SAFETY: `pt` points to the window's page table in POOL and the
        // WINDOW lock (held by our caller through `&mut self`) serialises
        // writers. The hardware reads entries concurrently; a 64-bit aligned
        // store is atomic for it.
        let entry = unsafe { &mut (&mut *self.pt)[index] };
        match frame {
            Some(pa) => entry.set_addr(pa, caching.flags()),
            None => entry.set_unused(),
        }
    }
}

fn with_window<R>(f: impl FnOnce(&mut Window) -> R) -> R {
    crate::irq::without_interrupts(|| f(WINDOW.lock().as_mut().expect("kvmap::init has not run")))
}

fn page_addr(index: usize) -> VirtAddr {
    VirtAddr::new(WINDOW_BASE + index as u64 * PAGE)
}

/// Maps `pages` pages of device registers at physical `phys` (page aligned)
/// uncached, for the life of the system. Returns the virtual address of
/// `phys`.
pub fn map_mmio(phys: PhysAddr, pages: usize) -> VirtAddr {
    assert!(phys.is_aligned(PAGE), "MMIO range {phys:?} is not page aligned");
    with_window(|w| {
        let first = w.take_slots(pages).expect("kernel window full");
        for i in 0..pages {
            w.set(first + i, Some(phys + i as u64 * PAGE), Caching::Uncached);
        }
        page_addr(first)
    })
}

/// One window page mapped to a frame; unmapped (and shot down on every
/// online CPU) when dropped.
pub struct KvPage {
    index: usize,
}

impl KvPage {
    /// Maps a free window page to `frame`, or `None` if the window is full.
    pub fn map(frame: PhysFrame, caching: Caching) -> Option<KvPage> {
        with_window(|w| {
            let index = w.take_slots(1)?;
            w.set(index, Some(frame.start_address()), caching);
            Some(KvPage { index })
        })
    }

    /// The page's virtual address.
    pub fn addr(&self) -> VirtAddr {
        page_addr(self.index)
    }

    /// Points the page at `frame`. Other CPUs may keep using the old frame
    /// through their TLBs until the returned flush is carried out.
    pub fn remap(&self, frame: PhysFrame, caching: Caching) -> PendingFlush {
        with_window(|w| w.set(self.index, Some(frame.start_address()), caching));
        PendingFlush::new(TlbRange::page(self.addr()))
    }
}

impl Drop for KvPage {
    fn drop(&mut self) {
        with_window(|w| w.set(self.index, None, Caching::WriteBack));
        // Any CPU may have touched a kernel page: flush everywhere before the
        // slot can be reused for another frame.
        PendingFlush::new(TlbRange::page(self.addr())).shootdown(&crate::cpumask::CpuMask::online());
        with_window(|w| w.release(self.index));
    }
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    use super::*;

    /// The window's PML4 entry exists in the kernel page table, a page
    /// mapped there reads the frame's contents, and a remap followed by the
    /// returned flush shows the new frame on this CPU.
    #[ktest]
    fn window_maps_and_remaps_locally() {
        #[repr(C, align(4096))]
        struct Frame([u64; 512]);
        let a = Frame([0xaaaa; 512]);
        let b = Frame([0xbbbb; 512]);
        let off = direct_map_offset();
        // The boot stack lives in the direct-mapped heap or bootloader memory;
        // translate it through the page tables to be independent of which.
        let (pml4_frame, _) = Cr3::read();
        // SAFETY: read-only use of the live PML4 through the direct map.
        let pml4 = unsafe { &mut *((off + pml4_frame.start_address().as_u64()) as *mut PageTable) };
        // SAFETY: the direct map covers physical memory at `off`.
        let mapper = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(off)) };
        let pa = |f: &Frame| PhysFrame::containing_address(mapper.translate_addr(VirtAddr::from_ptr(f)).unwrap());
        let page = KvPage::map(pa(&a), Caching::WriteBack).expect("window full");
        // SAFETY: the page maps `a`, which lives until the end of the test.
        let read = || unsafe { core::ptr::read_volatile(page.addr().as_ptr::<u64>()) };
        assert_eq!(read(), 0xaaaa);
        page.remap(pa(&b), Caching::WriteBack).flush_local();
        assert_eq!(read(), 0xbbbb);
        drop(page);
        assert!(arch_probe_unmapped(page_addr_of_dropped()));
    }

    fn page_addr_of_dropped() -> u64 {
        // The slot just released is the lowest free one, so a new mapping
        // would reuse it; its address must not be mapped now.
        with_window(|w| {
            let index = (0..WINDOW_PAGES).find(|&i| w.used[i / 64] & (1 << (i % 64)) == 0).unwrap();
            page_addr(index).as_u64()
        })
    }

    fn arch_probe_unmapped(addr: u64) -> bool {
        crate::trap::extable::probe_read_u64(addr).is_err()
    }
}
