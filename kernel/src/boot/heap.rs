//! The kernel heap: `linked_list_allocator` behind a spin lock, on a
//! physically contiguous range the memory setup takes from boot memory
//! (`boot/mem_init.rs`, recorded as `PageKind::Heap` in the memmap) and reaches
//! through the direct map.
//!
//! Page tables never come from here (DESIGN.md section 4): only ordinary
//! kernel objects, and the separately allocated `ptl` of the debug-lock build.
//!
//! # Failure injection (`fail=heap:1/N`)
//!
//! Most of the kernel allocates through Rust's `alloc` collections (`Box`,
//! `Arc`, `Vec`, `BTreeMap`), whose allocation failure is fatal: it calls
//! the allocation-error handler, which panics. So the injector
//! (`mm::FaultInject`, site `Heap`) fails only allocations made inside
//! [`fallible`], which code enters exactly where it asks with a fallible
//! API (`try_reserve`, a null check) and reports the error: today the
//! `log` system call's buffer (`-ENOMEM`). Everything else would still
//! abort on a real shortage, and is not injected: the tasks, address
//! spaces, processes and barriers of `sched` and `uspace` (`Arc`/`Box`/
//! `BTreeMap`), the memory manager's VMA arrays (`Arc`/`Vec` on `mmap`,
//! `munmap`, `mprotect`, `mremap`), and the debug build's allocated `ptl`,
//! which has its own site (`ptl`, failed at its constructor). Making those
//! fallible needs `try_*` constructors (the unstable `allocator_api`)
//! through every layer that builds them.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use arch::percpu::NR_CPUS;
use linked_list_allocator::Heap;
use spin::Mutex;

/// Per CPU: how deep it is in [`fallible`] sections.
static FALLIBLE: [AtomicU32; NR_CPUS] = [const { AtomicU32::new(0) }; NR_CPUS];

/// Runs `f`, whose heap allocations the caller handles when they fail, so
/// that the failure injector may fail them. `f` must not block or switch
/// tasks (another task on this CPU would inherit the section): wrap the
/// fallible allocation call itself, nothing more.
///
/// Interrupts are off meanwhile, so an interrupt handler's allocations are
/// never inside the section.
pub fn fallible<R>(f: impl FnOnce() -> R) -> R {
    arch::irq::without_interrupts(|| {
        let cpu = arch::percpu::cpu_id();
        FALLIBLE[cpu].fetch_add(1, Ordering::Relaxed);
        let r = f();
        FALLIBLE[cpu].fetch_sub(1, Ordering::Relaxed);
        r
    })
}

/// Whether an allocation now may be failed by the injector.
fn inject_failure() -> bool {
    FALLIBLE[arch::percpu::cpu_id()].load(Ordering::Relaxed) != 0
        && mm::try_phys().is_some_and(|p| p.fault_inject().should_fail(mm::ptlock::FailSite::Heap))
}

/// Protects the allocator's free list. Taken with interrupts disabled so an
/// interrupt handler that allocates cannot deadlock against its own CPU.
struct LockedHeap(Mutex<Heap>);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap(Mutex::new(Heap::empty()));

// SAFETY: all access to the `Heap` goes through the mutex; `Heap` returns
// properly aligned, non-overlapping blocks from memory it owns.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if inject_failure() {
            return core::ptr::null_mut();
        }
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
        let before = crate::workload::storm::settled_heap_usage();
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

    /// `fail=heap:1/N` fails allocations inside `fallible` sections only:
    /// there at about the rate, the failure is an error the caller sees, and
    /// nothing leaks; outside, never.
    #[ktest]
    fn injected_heap_failures_hit_only_fallible_allocations() {
        use mm::ptlock::FailSite;
        let before = crate::workload::storm::settled_heap_usage();
        let inject = mm::phys().fault_inject();
        let injected = inject.injected_at(FailSite::Heap);
        inject.set_rate(FailSite::Heap, 4);
        let mut failed = 0;
        for i in 0..400 {
            let mut v: Vec<u8> = Vec::new();
            if super::fallible(|| v.try_reserve_exact(64 + i)).is_err() {
                failed += 1;
            }
            // Outside a fallible section nothing fails (this would abort).
            let b = Box::new([i as u8; 32]);
            assert_eq!(b[31], i as u8);
        }
        inject.set_rate(FailSite::Heap, 0);
        assert!((60..140).contains(&failed), "{failed} of 400 fallible allocations failed at 1/4");
        assert_eq!(inject.injected_at(FailSite::Heap) - injected, failed);
        assert_eq!(super::used(), before, "heap usage did not return to its start");
    }
}
