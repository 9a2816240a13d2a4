//! The register image every trap entry saves.

use core::fmt;

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

impl TrapFrame {
    /// Whether the trap interrupted ring 3.
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
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
