//! Kernel stacks with guard pages.
//!
//! Every task's kernel stack lives in its own 64 KiB slot of a dedicated
//! region of the kernel half: the upper 32 KiB are the stack, mapped page by
//! page to frames from the frame allocator; the lower 32 KiB stay unmapped.
//! A stack that overflows runs into that guard and faults instead of silently
//! overwriting its neighbour. The fault cannot be delivered on the overflowed
//! stack, so it becomes a double fault, which runs on its own IST stack; the
//! oops then names the guard page (see [`describe_addr`]).
//!
//! Layout: PML4 slot [`REGION_SLOT`], [`MAX_STACKS`] slots. All of the
//! region's page tables (one PDPT, one PD, and the PTs in one contiguous
//! block) are allocated at boot, before any address space copies the kernel
//! half, and never change afterwards; only PTEs do. Allocating them up front
//! also keeps frame accounting exact for leak tests.
//!
//! Freeing and the TLB: a freed stack's PTEs are made non-present at once
//! and flushed on the freeing CPU (a dead stack used by mistake there
//! faults), but other CPUs may still cache the old translations, so the
//! frames and the slot are recycled only after a TLB shoot-down on every
//! CPU. Shoot-downs are batched ([`PURGE_BATCH`]) and run only from
//! [`KernelStack::new`] and [`purge`], never from the drop: a task is dropped
//! in places (with interrupts off, after a context switch) where waiting for
//! other CPUs is best avoided. Until the purge, the non-present
//! PTEs still hold the frame addresses (the hardware ignores the other bits
//! of a non-present entry), so no other bookkeeping is needed.

use core::sync::atomic::{AtomicU64, Ordering};

use arch::tlb::{PendingFlush, TlbRange};
use spin::Mutex;
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageTable, PageTableFlags};

/// PML4 slot of the stack region (`kvmap` uses 508, the kernel image 511).
pub const REGION_SLOT: usize = 507;
/// First address of the region.
pub const REGION_BASE: u64 = 0xffff_0000_0000_0000 | ((REGION_SLOT as u64) << 39);
/// Bytes of one stack.
pub const STACK_SIZE: usize = 32 * 1024;
/// Unmapped bytes below each stack.
pub const GUARD_SIZE: u64 = 32 * 1024;
/// Bytes of one slot: guard, then stack.
const SLOT_SIZE: u64 = GUARD_SIZE + STACK_SIZE as u64;
/// How many stacks can exist at once.
pub const MAX_STACKS: usize = 2048;
/// Freed stacks that wait for one shared shoot-down before reuse.
pub const PURGE_BATCH: usize = 64;

const PAGE: u64 = 4096;
const STACK_PAGES: usize = STACK_SIZE / PAGE as usize;
const PTES_PER_SLOT: usize = (SLOT_SIZE / PAGE) as usize;
const REGION_SIZE: u64 = SLOT_SIZE * MAX_STACKS as u64;
/// Page tables covering the region (each maps 2 MiB).
const NR_PTS: usize = (REGION_SIZE >> 21) as usize;
/// Order of the contiguous block holding the PTs.
const PT_ORDER: usize = NR_PTS.trailing_zeros() as usize;
const _: () = assert!(NR_PTS.is_power_of_two() && NR_PTS <= 512, "the PTs are one block under one PD");
const WORDS: usize = MAX_STACKS / 64;

/// The region's bookkeeping; the PTEs themselves live in `ptes`.
struct Region {
    /// The PTs, as one array of `NR_PTS * 512` entries (direct map).
    ptes: *mut PageTable,
    /// Slots holding a live stack, or freed and awaiting a purge.
    taken: [u64; WORDS],
    /// Freed slots whose frames are not yet recycled (subset of `taken`).
    dead: [u64; WORDS],
}

// SAFETY: `ptes` points into page-table frames owned by the region for the
// life of the system; it is only dereferenced with the REGION lock held.
unsafe impl Send for Region {}

/// Protects the slot bitmaps and the region's PTEs. Taken with interrupts
/// off; never held across a shoot-down (a CPU spinning here with interrupts
/// off would not answer it).
static REGION: Mutex<Option<Region>> = Mutex::new(None);

/// Stacks in use (for leak tests and the boot summary).
pub static LIVE: AtomicU64 = AtomicU64::new(0);
/// Shoot-downs issued to recycle freed stacks.
pub static PURGES: AtomicU64 = AtomicU64::new(0);

fn bit(words: &[u64; WORDS], i: usize) -> bool {
    words[i / 64] & (1 << (i % 64)) != 0
}

fn set_bit(words: &mut [u64; WORDS], i: usize, on: bool) {
    if on {
        words[i / 64] |= 1 << (i % 64);
    } else {
        words[i / 64] &= !(1 << (i % 64));
    }
}

impl Region {
    /// The PTE of page `page` (0..16) of `slot`.
    fn pte(&mut self, slot: usize, page: usize) -> &mut x86_64::structures::paging::page_table::PageTableEntry {
        let i = slot * PTES_PER_SLOT + page;
        // SAFETY: `i < NR_PTS * 512` (slot < MAX_STACKS), the PT block is
        // ours, and `&mut self` means the REGION lock is held.
        unsafe { &mut (&mut *self.ptes.add(i / 512))[i % 512] }
    }

    /// Frees the frames of every dead slot and returns the slots to use.
    /// Only after a shoot-down that followed their unmapping.
    fn recycle(&mut self, dead: &[u64; WORDS]) {
        for slot in (0..MAX_STACKS).filter(|&s| bit(dead, s)) {
            for page in PTES_PER_SLOT - STACK_PAGES..PTES_PER_SLOT {
                let e = self.pte(slot, page);
                let pfn = mm::Pfn::new(e.addr().as_u64() / PAGE);
                e.set_unused();
                // SAFETY: the frame came from `alloc_pages(0).into_raw()` in
                // `KernelStack::new`, and each dead entry is recycled once.
                drop(unsafe { mm::Frames::from_raw(mm::phys(), pfn, 0) });
            }
            set_bit(&mut self.taken, slot, false);
        }
    }
}

fn with_region<R>(f: impl FnOnce(&mut Region) -> R) -> R {
    arch::irq::without_interrupts(|| f(REGION.lock().as_mut().expect("kstack::init has not run")))
}

/// Builds the region's page tables and hooks them into the kernel's PML4.
/// Call once on the boot CPU, after the frame allocator exists and before
/// other CPUs start or any address space copies the kernel half.
pub fn init(phys_offset: u64) {
    let mut region = REGION.lock();
    assert!(region.is_none(), "kstack::init called twice");
    let table = |order| mm::alloc_pages_zeroed(order).expect("no frames for the kernel stack region").into_raw();
    let (pdpt, _) = table(0);
    let (pd, _) = table(0);
    let (pts, _) = table(PT_ORDER);
    let virt = |pfn: mm::Pfn| (phys_offset + pfn.phys().as_u64()) as *mut PageTable;
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    // SAFETY: the three allocations are fresh, zeroed, owned by the region
    // forever, and reached through the direct map; nothing else refers to them.
    unsafe {
        (&mut *virt(pdpt))[0].set_addr(frame_addr(pd), flags);
        for i in 0..NR_PTS {
            (&mut *virt(pd))[i].set_addr(frame_addr(pts.add(i as u64)), flags);
        }
    }
    let pml4_pa = x86_64::registers::control::Cr3::read().0.start_address().as_u64();
    // SAFETY: CR3 holds the kernel's PML4 (reached through the direct map);
    // only the boot CPU runs, and no address space has copied it yet.
    let pml4 = unsafe { &mut *((phys_offset + pml4_pa) as *mut PageTable) };
    assert!(pml4[REGION_SLOT].is_unused(), "PML4 slot {REGION_SLOT} is already in use");
    // Written last, so the hardware never sees a half-built path.
    pml4[REGION_SLOT].set_addr(frame_addr(pdpt), flags);
    *region = Some(Region { ptes: virt(pts), taken: [0; WORDS], dead: [0; WORDS] });
}

/// The frame's address as the `x86_64` crate's page-table entries take it.
fn frame_addr(pfn: mm::Pfn) -> PhysAddr {
    PhysAddr::new(pfn.phys().as_u64())
}

/// Shoots down the translations of every freed stack, then recycles their
/// frames and slots. Leak tests call it (through `storm::settle`) before
/// counting frames. Must not be called with a spinlock held.
pub fn purge() {
    let dead = with_region(|r| {
        let dead = r.dead;
        r.dead = [0; WORDS];
        dead
    });
    if dead.iter().all(|&w| w == 0) {
        return;
    }
    // The slots stay `taken` (and so unused) while the shoot-down runs.
    PendingFlush::new(TlbRange::range(
        x86_64::VirtAddr::new(REGION_BASE),
        x86_64::VirtAddr::new(REGION_BASE + REGION_SIZE),
    ))
    .shootdown(&arch::cpumask::CpuMask::online());
    PURGES.fetch_add(1, Ordering::Relaxed);
    with_region(|r| r.recycle(&dead));
}

/// Whether `addr` lies in the guard below some kernel stack.
pub fn is_guard(addr: u64) -> bool {
    (REGION_BASE..REGION_BASE + REGION_SIZE).contains(&addr) && (addr - REGION_BASE) % SLOT_SIZE < GUARD_SIZE
}

/// A diagnosis for an oops: what `addr` (CR2, or the stack pointer) is, when
/// it is something the region knows about.
pub fn describe_addr(addr: u64) -> Option<&'static str> {
    if is_guard(addr) {
        Some("kernel stack overflow: the address is in the guard page below a kernel stack")
    } else {
        None
    }
}

/// A task's own kernel stack; unmapped when dropped.
pub struct KernelStack {
    slot: usize,
}

impl KernelStack {
    /// Allocates and maps a stack, or `None` when frames or slots run out.
    pub fn new() -> Option<Self> {
        let nr_dead = with_region(|r| r.dead.iter().map(|w| w.count_ones() as usize).sum::<usize>());
        if nr_dead >= PURGE_BATCH {
            purge();
        }
        let slot = match with_region(take_slot) {
            Some(s) => s,
            None => {
                purge();
                with_region(take_slot)?
            }
        };
        let mut frames = [None; STACK_PAGES];
        // Zeroed, as Linux zeroes thread stacks (`THREADINFO_GFP` has
        // `__GFP_ZERO`): no stale data shows through an uninitialised stack
        // read. Under QEMU's TCG it matters for speed too: a recycled frame
        // that held user code still carries translated blocks, and until a
        // write has covered each of them every store to the page takes
        // QEMU's self-modifying-code slow path (measured: every fault of a
        // short storm 20x slower when a new thread's stack reused the last
        // storm's program text).
        for f in frames.iter_mut() {
            match mm::alloc_pages_zeroed(0) {
                Some(frame) => *f = Some(frame.into_raw().0),
                None => {
                    for pfn in frames.iter().flatten() {
                        // SAFETY: allocated just above with order 0 and given up by into_raw.
                        drop(unsafe { mm::Frames::from_raw(mm::phys(), *pfn, 0) });
                    }
                    with_region(|r| set_bit(&mut r.taken, slot, false));
                    return None;
                }
            }
        }
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
        with_region(|r| {
            for (i, pfn) in frames.iter().enumerate() {
                let pfn = pfn.expect("all frames allocated");
                // The slot's entries are unused (a fresh slot, or recycled
                // after a shoot-down), so no TLB holds them: no flush needed.
                r.pte(slot, PTES_PER_SLOT - STACK_PAGES + i).set_addr(frame_addr(pfn), flags);
            }
        });
        LIVE.fetch_add(1, Ordering::Relaxed);
        Some(Self { slot })
    }

    /// The (exclusive, 16-byte aligned) top.
    pub fn top(&self) -> u64 {
        REGION_BASE + (self.slot as u64 + 1) * SLOT_SIZE
    }

    /// The lowest mapped byte; the guard is just below.
    pub fn bottom(&self) -> u64 {
        self.top() - STACK_SIZE as u64
    }
}

fn take_slot(r: &mut Region) -> Option<usize> {
    let slot = (0..MAX_STACKS).find(|&s| !bit(&r.taken, s))?;
    set_bit(&mut r.taken, slot, true);
    Some(slot)
}

impl Drop for KernelStack {
    fn drop(&mut self) {
        with_region(|r| {
            for page in PTES_PER_SLOT - STACK_PAGES..PTES_PER_SLOT {
                let e = r.pte(self.slot, page);
                // Not present, frame address kept for `recycle`.
                e.set_flags(e.flags() - PageTableFlags::PRESENT);
            }
            set_bit(&mut r.dead, self.slot, true);
        });
        // This CPU stops reaching the stack at once (eight `invlpg`s); the
        // others may until the next purge.
        arch::tlb::flush_local(TlbRange::pages(x86_64::VirtAddr::new(self.bottom()), STACK_PAGES as u64));
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(target_os = "none")]
mod tests {
    use arch::trap::extable::{probe_read_u64, probe_write_u64};
    use ktest::ktest;

    use super::*;

    /// A stack is mapped and writable from bottom to top, the guard below it
    /// is not mapped, and after the stack is dropped its pages fault too;
    /// after a purge the frames are back in the allocator.
    #[ktest]
    fn stack_has_a_guard_and_is_unmapped_when_freed() {
        // Other CPUs may still be dropping the last tests' exited tasks:
        // let them finish (and purge) before counting.
        crate::workload::storm::settle();
        let before = mm::nr_free_pages();
        let s = KernelStack::new().expect("stack");
        let (bottom, top) = (s.bottom(), s.top());
        assert_eq!(top - bottom, STACK_SIZE as u64);
        // SAFETY: the stack is ours and mapped; the probes survive a fault.
        unsafe {
            assert_eq!(probe_write_u64(bottom, 1), Ok(()));
            assert_eq!(probe_write_u64(top - 8, 2), Ok(()));
        }
        assert_eq!(probe_read_u64(bottom), Ok(1));
        assert!(is_guard(bottom - 8) && is_guard(bottom - GUARD_SIZE) && !is_guard(bottom));
        assert!(probe_read_u64(bottom - 8).is_err(), "the guard page is mapped");
        assert!(describe_addr(bottom - 8).is_some_and(|d| d.contains("kernel stack overflow")));
        drop(s);
        assert!(probe_read_u64(bottom).is_err(), "a freed stack is still mapped");
        purge();
        assert_eq!(mm::nr_free_pages(), before, "stack frames not recycled");
    }

    /// Many stacks at once get distinct slots; freeing them all and purging
    /// returns every frame, and the slots are reused.
    #[ktest]
    fn stacks_are_distinct_and_recycled() {
        crate::workload::storm::settle();
        let before = mm::nr_free_pages();
        let live = LIVE.load(Ordering::SeqCst);
        let stacks: alloc::vec::Vec<_> = (0..3 * PURGE_BATCH).map(|_| KernelStack::new().expect("stack")).collect();
        let mut tops: alloc::vec::Vec<_> = stacks.iter().map(KernelStack::top).collect();
        tops.sort_unstable();
        tops.dedup();
        assert_eq!(tops.len(), stacks.len(), "two stacks share a slot");
        assert_eq!(LIVE.load(Ordering::SeqCst), live + stacks.len() as u64);
        drop(stacks);
        purge();
        assert_eq!(mm::nr_free_pages(), before, "stack frames leaked");
        assert_eq!(LIVE.load(Ordering::SeqCst), live);
    }
}
