//! Kernel access to user memory.
//!
//! Every read or write of a user address goes through these helpers: the
//! range is checked to lie in the user half, SMAP is opened for the copy only
//! (`stac`/`clac`), and the copy instruction has an exception-table entry, so
//! a fault the memory manager cannot resolve ends the copy with an error
//! instead of an oops. A fault it *can* resolve (a page not touched yet) is
//! handled by the page-fault path and the copy continues.

pub use abi::TASK_SIZE_MAX;

/// A user access touched memory the task may not access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadUserAccess;

core::arch::global_asm!(
    r#"
.p2align 4
.global arch_copy_user
// rdi = dst, rsi = src, rdx = len. Returns rax = bytes NOT copied.
arch_copy_user:
    mov rcx, rdx
    stac
.global arch_copy_user_insn
arch_copy_user_insn:
    rep movsb
    clac
    xor eax, eax
    ret
.Lcopy_user_fixup:
    clac
    mov rax, rcx
    ret
.pushsection __ex_table, "a"
    .p2align 3
    .quad arch_copy_user_insn, .Lcopy_user_fixup
.popsection
"#
);

unsafe extern "C" {
    fn arch_copy_user(dst: *mut u8, src: *const u8, len: usize) -> usize;
}

/// Whether `[addr, addr + len)` lies entirely in the user half.
pub fn is_user_range(addr: u64, len: usize) -> bool {
    addr.checked_add(len as u64).is_some_and(|end| end <= TASK_SIZE_MAX)
}

/// Copies `dst.len()` bytes from user address `src`.
pub fn copy_from_user(dst: &mut [u8], src: u64) -> Result<(), BadUserAccess> {
    if !is_user_range(src, dst.len()) {
        return Err(BadUserAccess);
    }
    // SAFETY: `dst` is a valid kernel buffer; the source range is in the user
    // half (checked), and faults on it are caught by the exception table.
    let left = unsafe { arch_copy_user(dst.as_mut_ptr(), src as *const u8, dst.len()) };
    if left == 0 { Ok(()) } else { Err(BadUserAccess) }
}

/// Copies `src` to user address `dst`.
pub fn copy_to_user(dst: u64, src: &[u8]) -> Result<(), BadUserAccess> {
    if !is_user_range(dst, src.len()) {
        return Err(BadUserAccess);
    }
    // SAFETY: `src` is a valid kernel buffer; the destination range is in
    // the user half (checked), and faults on it are caught by the exception
    // table.
    let left = unsafe { arch_copy_user(dst as *mut u8, src.as_ptr(), src.len()) };
    if left == 0 { Ok(()) } else { Err(BadUserAccess) }
}

/// Whether `rip` is inside a user-copy instruction (the page-fault handler
/// resolves faults there as user faults on behalf of the task).
pub fn in_user_copy(rip: u64) -> bool {
    unsafe extern "C" {
        static arch_copy_user_insn: u8;
    }
    rip == &raw const arch_copy_user_insn as u64
}
