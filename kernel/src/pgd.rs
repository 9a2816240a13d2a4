//! The kernel's page tables: the PML4 the bootloader built, adopted at boot.
//! Kernel tasks run on it, every address space copies its upper half, and
//! switching between the two is a CR3 load.

/// The kernel's own PML4 (the bootloader's, adopted at boot): kernel tasks
/// run on it, and every address space copies its upper half.
static KERNEL_PML4: spin::Once<u64> = spin::Once::new();

/// The kernel's page tables as the mm crate sees them.
pub fn kernel_pgd() -> mm::KernelPgd {
    let pa = *KERNEL_PML4.get().expect("pgd::adopt_boot_pml4 has not run");
    // SAFETY: the boot PML4 maps the kernel and is never freed.
    unsafe { mm::KernelPgd::new(mm::PhysAddr::new(pa)) }
}

/// Loads `pml4` into CR3 (flushing non-global translations).
///
/// # Safety
/// `pml4` must be a PML4 whose upper half is the kernel's.
pub unsafe fn load_cr3(pml4: u64) {
    use x86_64::registers::control::{Cr3, Cr3Flags};
    use x86_64::structures::paging::PhysFrame;
    let frame = PhysFrame::from_start_address(x86_64::PhysAddr::new(pml4)).expect("unaligned PML4");
    if Cr3::read().0 != frame {
        // SAFETY: the caller guarantees the kernel half is mapped the same.
        unsafe { Cr3::write(frame, Cr3Flags::empty()) };
    }
}

/// Loads the kernel's own page tables.
pub fn load_kernel_cr3() {
    // SAFETY: KERNEL_PML4 is the PML4 the kernel runs on (adopted from CR3
    // at boot), so its upper half is the kernel's by definition.
    unsafe { load_cr3(*KERNEL_PML4.get().expect("pgd::adopt_boot_pml4 has not run")) };
}

/// Adopts the PML4 in CR3 (the bootloader's) as the kernel's own. Called
/// once by the boot memory set-up, before any address space exists.
pub fn adopt_boot_pml4() {
    KERNEL_PML4.call_once(|| x86_64::registers::control::Cr3::read().0.start_address().as_u64());
}
