//! Exception table: instructions that are allowed to fault.
//!
//! Code that must touch memory that may not be mapped (user copies, the
//! backtrace walker, probing tests) places each risky instruction's address,
//! with the address to resume at, in the `__ex_table` section. The trap
//! dispatcher looks a faulting kernel RIP up here before declaring an oops.

/// One `__ex_table` record (as emitted by the assembly below).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExtableEntry {
    /// Address of the instruction that may fault.
    pub insn: u64,
    /// Where execution resumes if it does.
    pub fixup: u64,
}

unsafe extern "C" {
    static __ex_table_start: ExtableEntry;
    static __ex_table_end: ExtableEntry;
}

fn table() -> &'static [ExtableEntry] {
    // SAFETY: the linker script places every `__ex_table` input section
    // between these two symbols; the records are 16-byte aligned pairs.
    unsafe {
        let start = &raw const __ex_table_start;
        let end = &raw const __ex_table_end;
        let len = (end as usize - start as usize) / core::mem::size_of::<ExtableEntry>();
        core::slice::from_raw_parts(start, len)
    }
}

/// The fixup address for a fault at `rip`, if the instruction is listed.
pub fn search(rip: u64) -> Option<u64> {
    table().iter().find(|e| e.insn == rip).map(|e| e.fixup)
}

core::arch::global_asm!(
    r#"
.p2align 4
.global arch_probe_read_u64
// rdi = address. Returns rax = value, rdx = 0, or rax = 0, rdx = 1 on a fault.
arch_probe_read_u64:
    xor edx, edx
.Lprobe_read:
    mov rax, [rdi]
    ret
.Lprobe_read_fixup:
    xor eax, eax
    mov edx, 1
    ret
.pushsection __ex_table, "a"
    .p2align 3
    .quad .Lprobe_read, .Lprobe_read_fixup
.popsection

.p2align 4
.global arch_probe_write_u64
// rdi = address, rsi = value. Returns rax = 0, or 1 on a fault.
arch_probe_write_u64:
    xor eax, eax
.Lprobe_write:
    mov [rdi], rsi
    ret
.Lprobe_write_fixup:
    mov eax, 1
    ret
.pushsection __ex_table, "a"
    .p2align 3
    .quad .Lprobe_write, .Lprobe_write_fixup
.popsection
"#
);

#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

unsafe extern "C" {
    fn arch_probe_read_u64(addr: u64) -> ProbeResult;
    fn arch_probe_write_u64(addr: u64, value: u64) -> u64;
}

/// A memory access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault;

/// Reads a u64 at `addr`, returning `Err(Fault)` instead of an oops if the
/// address is not mapped (or not canonical).
pub fn probe_read_u64(addr: u64) -> Result<u64, Fault> {
    // SAFETY: the load is covered by an exception-table entry, so a fault
    // resumes at the fixup instead of crashing; nothing else is touched.
    let r = unsafe { arch_probe_read_u64(addr) };
    if r.faulted == 0 { Ok(r.value) } else { Err(Fault) }
}

/// Writes `value` at `addr`, returning `Err(Fault)` if the store faults.
///
/// # Safety
/// If the address *is* mapped, the caller must own the u64 there.
pub unsafe fn probe_write_u64(addr: u64, value: u64) -> Result<(), Fault> {
    // SAFETY: covered by an exception-table entry; the caller guarantees
    // ownership of the target if it is mapped.
    if unsafe { arch_probe_write_u64(addr, value) } == 0 { Ok(()) } else { Err(Fault) }
}
