//! The register image every trap entry saves.

use core::fmt;

use x86_64::registers::rflags::RFlags;

/// Registers saved on the kernel stack by the entry stubs, lowest address
/// first. The layout is the ABI between `entry.rs` and Rust: the stubs push
/// `error_code` (or a dummy 0) and `vector`, then the general registers.
#[repr(C)]
#[derive(Clone, Default)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Interrupt vector (pushed by the stub).
    pub vector: u64,
    /// Hardware error code, or 0 for vectors that have none.
    pub error_code: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);
// The general registers sit below `vector` in the order `push_gprs!` leaves
// them: `rax` pushed first (highest), `r15` last (lowest).
const _: () = assert!(
    core::mem::offset_of!(TrapFrame, r15) == 0
        && core::mem::offset_of!(TrapFrame, rax) == 14 * 8
        && core::mem::offset_of!(TrapFrame, vector) == 15 * 8
);

/// Assembly that pushes the general registers in [`TrapFrame`]'s order, on
/// top of `vector` and `error_code`: the one place the layout is written in
/// assembly, used by the trap entry (`entry.rs`) and the `syscall` entry
/// (`syscall.rs`).
macro_rules! push_gprs {
    () => {
        "push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15"
    };
}

/// The inverse of [`push_gprs!`]: pops a [`TrapFrame`]'s general registers,
/// leaving `vector` on top of the stack.
macro_rules! pop_gprs {
    () => {
        "pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax"
    };
}

pub(crate) use pop_gprs;
pub(crate) use push_gprs;

impl TrapFrame {
    /// Whether the trap interrupted ring 3.
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }

    /// Whether the interrupted code ran with interrupts enabled (RFLAGS.IF).
    pub fn interrupts_were_enabled(&self) -> bool {
        RFlags::from_bits_truncate(self.rflags).contains(RFlags::INTERRUPT_FLAG)
    }
}

impl fmt::Display for TrapFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  RIP {:#018x}  CS {:#06x}  RFLAGS {:#010x}", self.rip, self.cs, self.rflags)?;
        writeln!(f, "  RSP {:#018x}  SS {:#06x}", self.rsp, self.ss)?;
        writeln!(f, "  RAX {:#018x}  RBX {:#018x}  RCX {:#018x}", self.rax, self.rbx, self.rcx)?;
        writeln!(f, "  RDX {:#018x}  RSI {:#018x}  RDI {:#018x}", self.rdx, self.rsi, self.rdi)?;
        writeln!(f, "  RBP {:#018x}  R8  {:#018x}  R9  {:#018x}", self.rbp, self.r8, self.r9)?;
        writeln!(f, "  R10 {:#018x}  R11 {:#018x}  R12 {:#018x}", self.r10, self.r11, self.r12)?;
        write!(f, "  R13 {:#018x}  R14 {:#018x}  R15 {:#018x}", self.r13, self.r14, self.r15)
    }
}
