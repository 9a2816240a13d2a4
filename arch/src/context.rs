//! Kernel context switch.
//!
//! A switched-out thread's state is its kernel stack: `switch` pushes the
//! callee-saved registers (the System V ABI says the caller already saved the
//! rest), stores the stack pointer in the outgoing [`Context`], loads the
//! incoming one and pops its registers. A new thread's stack is prepared so
//! that its first switch-in "returns" into `arch_thread_start`, which calls the
//! entry function with its argument.

/// A switched-out kernel context: the saved stack pointer.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Context {
    rsp: u64,
}

core::arch::global_asm!(
    r#"
.p2align 4
.global arch_context_switch
// rdi = &mut prev.rsp, rsi = next.rsp
arch_context_switch:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    mov [rdi], rsp
    mov rsp, rsi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret

.p2align 4
.global arch_thread_start
// First switch-in of a new thread: r12 = entry, r13/r14 = arguments.
arch_thread_start:
    mov rdi, r13
    mov rsi, r14
    call r12
    ud2
"#
);

unsafe extern "C" {
    fn arch_context_switch(prev_rsp: *mut u64, next_rsp: u64);
    fn arch_thread_start();
}

impl Context {
    /// Prepares a context that, when switched to, runs `entry(args[0], args[1])`
    /// on the stack whose (exclusive) top is `stack_top`. `entry` must never
    /// return.
    ///
    /// # Safety
    /// `stack_top` must be the 16-byte-aligned top of a writable stack of at
    /// least 128 bytes that nothing else uses.
    pub unsafe fn new_thread(stack_top: u64, entry: extern "C" fn(usize, usize) -> !, args: [usize; 2]) -> Self {
        assert_eq!(stack_top % 16, 0, "misaligned stack top");
        // Initial frame, lowest address first: r15 r14 r13 r12 rbx rbp, the
        // return address, then padding so that `call r12` in
        // arch_thread_start sees a 16-byte-aligned stack.
        let frame: [u64; 9] = [
            0,
            args[1] as u64,
            args[0] as u64,
            entry as *const () as u64,
            0,
            0,
            arch_thread_start as *const () as u64,
            0,
            0,
        ];
        let rsp = stack_top - (frame.len() as u64) * 8;
        // SAFETY: the caller guarantees the stack is writable and unused; the
        // frame fits in the 128 bytes below its top.
        unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), rsp as *mut u64, frame.len()) };
        Self { rsp }
    }
}

/// Saves the running context into `prev` and resumes `next`. Returns when
/// some other CPU or thread switches back to `prev`.
///
/// # Safety
/// Interrupts must be disabled. `next` must be a context prepared by
/// [`Context::new_thread`] or saved by an earlier `switch`, whose stack is
/// still alive and which is not running on any CPU; `prev` must stay valid
/// until it is resumed.
pub unsafe fn switch(prev: *mut Context, next: *const Context) {
    // SAFETY: the caller upholds the contract above; the assembly saves and
    // restores every callee-saved register.
    unsafe { arch_context_switch(&raw mut (*prev).rsp, (*next).rsp) };
}
