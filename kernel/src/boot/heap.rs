//! The kernel heap: `linked_list_allocator` behind a spin lock, on a
//! physically contiguous range the memory setup takes from boot memory
//! (`boot/mem_init.rs`, recorded as `PageKind::Heap` in the memmap) and reaches
//! through the direct map.
//!
//! Page tables never come from here (DESIGN.md section 4): only ordinary
//! kernel objects, and the separately allocated `ptl` of the debug-lock build.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;

use linked_list_allocator::Heap;
use spin::Mutex;

/// Protects the allocator's free list. Taken with interrupts disabled so an
/// interrupt handler that allocates cannot deadlock against its own CPU.
struct LockedHeap(Mutex<Heap>);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap(Mutex::new(Heap::empty()));

// SAFETY: all access to the `Heap` goes through the mutex; `Heap` returns
// properly aligned, non-overlapping blocks from memory it owns.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        arch::irq::without_interrupts(|| {
            self.0.lock().allocate_first_fit(layout).map_or(core::ptr::null_mut(), |p| p.as_ptr())
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        arch::irq::without_interrupts(|| {
            // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc` with
            // this layout, so it is non-null and owned by this heap.
            unsafe { self.0.lock().deallocate(NonNull::new_unchecked(ptr), layout) }
        })
    }
}

/// Hands `[virt, virt + size)` to the allocator. Call once.
pub fn init(virt: u64, size: u64) {
    let mut heap = HEAP.0.lock();
    assert_eq!(heap.size(), 0, "heap initialised twice");
    // SAFETY: the caller took this range from boot memory for the heap alone;
    // it is mapped writable through the direct map.
    unsafe { heap.init(virt as *mut u8, size as usize) };
}

/// Bytes currently allocated.
pub fn used() -> usize {
    arch::irq::without_interrupts(|| HEAP.0.lock().used())
}

#[cfg(target_os = "none")]
mod tests {
    use alloc::boxed::Box;
    use alloc::vec::Vec;

    use ktest::ktest;

    /// Thousands of allocations of mixed sizes and alignments, freed in a
    /// scrambled order; contents are checked and the heap returns to its
    /// starting usage.
    #[ktest]
    fn alloc_free_stress() {
        // Nothing else may free heap memory meanwhile (exited tasks of
        // earlier tests are released by their CPUs asynchronously).
        crate::workload::storm::settle();
        let before = super::used();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..8 {
            let mut blocks: Vec<Vec<u8>> = Vec::new();
            for i in 0..500 {
                let len = (next() % 4096) as usize + 1;
                blocks.push(alloc::vec![i as u8; len]);
            }
            // Free every other block, then check the survivors.
            let mut survivors = Vec::new();
            for (i, b) in blocks.into_iter().enumerate() {
                if next() % 2 == 0 {
                    assert!(b.iter().all(|&x| x == i as u8), "heap block {i} corrupted");
                    survivors.push((i, b));
                }
            }
            for (i, b) in &survivors {
                assert!(b.iter().all(|&x| x == *i as u8), "heap block {i} corrupted after frees");
            }
        }
        let big: Box<[u64]> = alloc::vec![7u64; 1 << 18].into_boxed_slice(); // 2 MiB
        assert_eq!(big.iter().sum::<u64>(), 7 << 18);
        drop(big);
        let aligned = alloc::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: the layout is non-zero; the block is freed with the same layout.
        unsafe {
            let p = alloc::alloc::alloc(aligned);
            assert!(!p.is_null() && (p as usize).is_multiple_of(4096));
            alloc::alloc::dealloc(p, aligned);
        }
        assert_eq!(super::used(), before, "heap usage did not return to its start");
    }
}
