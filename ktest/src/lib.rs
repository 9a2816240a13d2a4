//! The in-kernel test registry.
//!
//! `#[ktest]` (from `ktest-macros`) puts a [`KTest`] record into the `.ktests`
//! linker section of the kernel image; the kernel's linker script gathers them
//! between `__ktests_start` and `__ktests_end`, and `all()` (kernel target
//! only) returns them. Any kernel-side crate (arch, mm, kernel) can declare
//! tests next to its code.
#![no_std]

pub use ktest_macros::ktest;

/// One registered test.
#[repr(C)]
pub struct KTest {
    /// Full path, e.g. `kernel::boot::heap::tests::alloc_free`.
    pub name: &'static str,
    /// The body. It passes by returning and fails by panicking.
    pub func: fn(),
    /// Source file of the test.
    pub file: &'static str,
    /// Source line of the `#[ktest]`.
    pub line: u32,
}

#[cfg(target_os = "none")]
unsafe extern "C" {
    static __ktests_start: u8;
    static __ktests_end: u8;
}

/// Every test linked into this kernel, in link order.
#[cfg(target_os = "none")]
pub fn all() -> &'static [KTest] {
    // SAFETY: the linker script places all `.ktests` input sections (arrays of
    // `KTest`, each aligned to its type) contiguously between the two symbols.
    unsafe {
        let start = (&raw const __ktests_start).cast::<KTest>();
        let end = (&raw const __ktests_end).cast::<KTest>();
        let len = (end as usize - start as usize) / core::mem::size_of::<KTest>();
        core::slice::from_raw_parts(start, len)
    }
}
