//! The `syscall` entry path and user-mode entry.
//!
//! `syscall` arrives with the user's RIP in RCX and RFLAGS in R11, on the
//! user stack, with the user's GS. The entry swaps GS, switches to the thread's
//! kernel stack (`gs:PERCPU_KERNEL_RSP`, set on every context switch by
//! `gdt::set_kernel_stack`), and builds the same [`TrapFrame`] an interrupt
//! from ring 3 would, so the return path is the shared `trap_return`
//! (`iretq`; never `sysret`, which faults in ring 0 on a non-canonical RCX).
//!
//! ABI (Linux-like): number in RAX; arguments in RDI, RSI, RDX, R10, R8, R9;
//! result in RAX. RCX and R11 are clobbered.

use spin::Once;
use x86_64::VirtAddr;
use x86_64::registers::model_specific::{Efer, EferFlags, LStar, SFMask, Star};
use x86_64::registers::rflags::RFlags;

use crate::gdt::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use crate::percpu::{PERCPU_KERNEL_RSP, PERCPU_USER_RSP};
use crate::trap::TrapFrame;

/// `TrapFrame::vector` value of a frame built by the syscall entry.
pub const SYSCALL_VECTOR: u64 = 0x100;

core::arch::global_asm!(
    r#"
.p2align 4
.global arch_syscall_entry
arch_syscall_entry:
    swapgs
    mov gs:[{user_rsp}], rsp
    mov rsp, gs:[{kernel_rsp}]
    push {user_ds}
    push qword ptr gs:[{user_rsp}]
    push r11
    push {user_cs}
    push rcx
    push 0
    push {vector}
"#,
    crate::trap::push_gprs!(),
    r#"
    cld
    mov rdi, rsp
    call arch_syscall_dispatch
    jmp trap_return

.p2align 4
.global arch_enter_user
// rdi = pointer to a TrapFrame on the current kernel stack: start executing
// it (used for the first entry of a user thread).
arch_enter_user:
    mov rsp, rdi
    jmp trap_return
"#,
    user_rsp = const PERCPU_USER_RSP,
    kernel_rsp = const PERCPU_KERNEL_RSP,
    user_ds = const USER_DS.0 as u64,
    user_cs = const USER_CS.0 as u64,
    vector = const SYSCALL_VECTOR,
);

unsafe extern "C" {
    fn arch_syscall_entry();
    fn arch_enter_user(frame: *mut TrapFrame) -> !;
}

/// The kernel's system-call handler, registered with [`init`].
static HANDLER: Once<fn(&mut TrapFrame)> = Once::new();

#[unsafe(no_mangle)]
extern "C" fn arch_syscall_dispatch(frame: &mut TrapFrame) {
    let handler = HANDLER.get().expect("syscall before a handler was registered");
    handler(frame);
}

/// Enables `syscall` on this CPU and routes it to `handler`, which runs with
/// interrupts disabled (SFMASK clears IF) on the thread's kernel stack. Call
/// on every CPU, with the same handler: the first registration wins.
pub fn init(handler: fn(&mut TrapFrame)) {
    HANDLER.call_once(|| handler);
    // SAFETY: the selectors match the GDT layout of `gdt.rs` (kernel CS/SS at
    // 0x08/0x10; sysret would use 0x18+3/0x20+3); LSTAR points at the entry
    // above; SFMASK clears IF, TF, DF and AC on entry.
    unsafe {
        Star::write(USER_CS, USER_DS, KERNEL_CS, KERNEL_DS).expect("GDT layout does not fit STAR");
        LStar::write(VirtAddr::new(arch_syscall_entry as *const () as u64));
        SFMask::write(RFlags::INTERRUPT_FLAG | RFlags::TRAP_FLAG | RFlags::DIRECTION_FLAG | RFlags::ALIGNMENT_CHECK);
        Efer::update(|e| e.insert(EferFlags::SYSTEM_CALL_EXTENSIONS));
    }
}

/// A frame that enters ring 3 at `rip` with stack `rsp`, interrupts on and
/// `rdi`/`rsi`/`rdx` set as the first arguments.
pub fn user_frame(rip: u64, rsp: u64, args: [u64; 3]) -> TrapFrame {
    TrapFrame {
        rip,
        rsp,
        cs: USER_CS.0 as u64,
        ss: USER_DS.0 as u64,
        rflags: (RFlags::INTERRUPT_FLAG | RFlags::from_bits_retain(0x2)).bits(),
        rdi: args[0],
        rsi: args[1],
        rdx: args[2],
        ..TrapFrame::default()
    }
}

/// Switches to ring 3 with the register state `frame`. The frame is copied
/// to the top of the current kernel stack region given by `kernel_stack_top`,
/// which also becomes the stack for traps and syscalls from this thread.
///
/// # Safety
/// `kernel_stack_top` must be the top of the current thread's own kernel
/// stack, the current stack pointer must lie at least `size_of::<TrapFrame>()`
/// below it, and nothing on that stack may be needed any more. CR3 must hold the
/// address space that maps `frame.rip` and `frame.rsp` for user access.
pub unsafe fn enter_user(frame: &TrapFrame, kernel_stack_top: u64) -> ! {
    crate::gdt::set_kernel_stack(VirtAddr::new(kernel_stack_top));
    let slot = (kernel_stack_top as *mut TrapFrame).wrapping_sub(1);
    // SAFETY: the slot is the top of this thread's kernel stack, which the
    // caller keeps free of live Rust frames (its code runs below the slot);
    // the frame is copied there before jumping to it.
    unsafe {
        slot.write(frame.clone());
        arch_enter_user(slot)
    }
}
