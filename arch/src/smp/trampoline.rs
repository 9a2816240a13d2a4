//! The real-mode trampoline an application processor starts in.
//!
//! A start-up IPI makes the AP execute in real mode at `page << 12`, with
//! `CS = page << 8` and `IP = 0`. The code below is assembled into the
//! kernel's read-only data (it never runs there) and copied to that page. It
//! goes from real mode straight to long mode (CR4.PAE, CR3, EFER.LME, then
//! CR0.PE|PG together, then a far jump into a 64-bit code segment), which the
//! architecture allows and which skips a pointless 32-bit stage.
//!
//! Paging needs page tables reachable with a 32-bit CR3 and the trampoline
//! identity-mapped at the moment CR0.PG is set. The kernel's own PML4 may lie
//! above 4 GiB and its lower half holds whatever the bootloader left there,
//! so the trampoline brings three page-table pages of its own, right after
//! the code page: a PML4 whose lower slot 0 identity-maps the first 2 MiB
//! (one large page) and whose upper half is a copy of the kernel's upper half
//! (so the kernel image is mapped too). Once in 64-bit mode the AP jumps to
//! [`arch_ap_entry64`] in the kernel image, which loads the kernel's real CR3
//! and leaves the low pages behind. The kernel's own page tables are never
//! changed for AP start-up.
//!
//! Several APs may run this code: they start one at a time, and the first
//! thing each does is claim the parameter block with `lock bts`; a CPU that
//! finds it already claimed (an AP that woke up after its start-up timed out)
//! halts in real mode instead of sharing another AP's stack.
//!
//! Layout of the low memory (4 pages, see [`TRAMPOLINE_PAGES`]):
//! page 0: code + [`TrampolineData`]; page 1: PML4; page 2: PDPT; page 3: PD.

use core::mem::offset_of;

/// Pages of low memory the trampoline needs.
pub const TRAMPOLINE_PAGES: usize = 4;

/// Parameters the BSP writes into the copied trampoline before each start.
/// Offsets are used by the assembly below (`const` operands), so the layout
/// is checked by the compiler, not by hand.
#[repr(C)]
pub(super) struct TrampolineData {
    /// 0 = free; bit 0 set by the AP that claims this start.
    pub claim: u32,
    /// Physical address of the temporary PML4 (below 4 GiB).
    pub temp_cr3: u32,
    /// EFER bits to set in real mode (LME, NXE, SCE).
    pub efer: u32,
    /// Far pointer (m16:32) to the 64-bit code: offset, then selector.
    pub far_offset: u32,
    pub far_selector: u16,
    /// GDTR operand: limit, then base.
    pub gdtr_limit: u16,
    pub gdtr_base: u32,
    /// The kernel's CR3, CR4 and CR0 (the boot CPU's values).
    pub kernel_cr3: u64,
    pub cr4: u64,
    pub cr0: u64,
    /// Top of the AP's boot stack.
    pub stack_top: u64,
    /// Argument passed to the Rust entry (`&'static ApStart`).
    pub arg: u64,
    /// Address of `arch_ap_entry64`.
    pub entry: u64,
    /// Null, 64-bit code (0x08), data (0x10).
    pub gdt: [u64; 3],
}

// The GDTR operand must be contiguous: a 16-bit limit directly followed by
// the base.
const _: () = assert!(offset_of!(TrampolineData, gdtr_base) == offset_of!(TrampolineData, gdtr_limit) + 2);
const _: () = assert!(offset_of!(TrampolineData, far_selector) == offset_of!(TrampolineData, far_offset) + 4);

/// Selector of the trampoline GDT's 64-bit code segment.
pub(super) const TRAMPOLINE_CS: u16 = 0x08;

/// GDT entries: 64-bit code (L=1, P, DPL0, execute/read) and data (P, DPL0,
/// read/write). Limits and bases are ignored in long mode.
pub(super) const TRAMPOLINE_GDT: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

/// Offset of [`TrampolineData`] in the blob: after a 2-byte short jump,
/// aligned to 8. `blob()` checks the assembler agrees.
const DATA_OFFSET: usize = 8;

/// CR4.PAE: the only CR4 bit long mode needs; the AP loads the boot CPU's
/// full CR4 once it runs on the kernel's page tables.
const CR4_PAE: u32 = 1 << 5;
/// CR0.PG | NE | ET | PE.
const CR0_PG_PE: u32 = 0x8000_0031;
/// IA32_EFER.
const MSR_EFER: u32 = 0xc000_0080;

core::arch::global_asm!(
    r#"
.pushsection .rodata.ap_trampoline, "a"
.global ap_trampoline_start
.global ap_trampoline_long
.global ap_trampoline_data
.global ap_trampoline_end
.p2align 3
.code16
ap_trampoline_start:
    // The parameter block sits at a fixed offset at the front, so real-mode
    // code can address it with constant displacements.
    jmp 1f
.p2align 3
ap_trampoline_data:
    .space {data_size}
1:
    cli
    cld
    mov ax, cs
    mov ds, ax
    // Claim the parameter block; a CPU that loses parks right here.
    lock bts dword ptr [{claim}], 0
    jc 2f
    mov eax, {cr4_pae}
    mov cr4, eax
    mov eax, dword ptr [{temp_cr3}]
    mov cr3, eax
    mov ecx, {msr_efer}
    mov eax, dword ptr [{efer}]
    xor edx, edx
    wrmsr
    lgdt [{gdtr}]
    mov eax, {cr0}
    mov cr0, eax
    // Into the 64-bit code segment: m16:32 far jump through the block.
    jmp fword ptr [{far}]
2:
    cli
    hlt
    jmp 2b

.code64
ap_trampoline_long:
    xor eax, eax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    lea rbx, [rip + ap_trampoline_data]
    mov rax, qword ptr [rbx + {kernel_cr3}]
    mov rdx, qword ptr [rbx + {cr4}]
    mov r8, qword ptr [rbx + {cr0_full}]
    mov rsi, qword ptr [rbx + {stack_top}]
    mov rdi, qword ptr [rbx + {arg}]
    mov rcx, qword ptr [rbx + {entry}]
    jmp rcx
ap_trampoline_end:
.popsection

// In the kernel image: still on the temporary page tables, whose upper half
// equals the kernel's, so this code is mapped before and after the CR3 load.
.pushsection .text.arch_ap_entry64, "ax"
.global arch_ap_entry64
arch_ap_entry64:
    mov cr3, rax
    mov cr4, rdx
    mov cr0, r8
    mov rsp, rsi
    xor ebp, ebp
    // A zero return address ends backtraces here.
    push rbp
    jmp {rust_entry}
.popsection
"#,
    claim = const DATA_OFFSET + offset_of!(TrampolineData, claim),
    temp_cr3 = const DATA_OFFSET + offset_of!(TrampolineData, temp_cr3),
    efer = const DATA_OFFSET + offset_of!(TrampolineData, efer),
    gdtr = const DATA_OFFSET + offset_of!(TrampolineData, gdtr_limit),
    far = const DATA_OFFSET + offset_of!(TrampolineData, far_offset),
    kernel_cr3 = const offset_of!(TrampolineData, kernel_cr3),
    cr4 = const offset_of!(TrampolineData, cr4),
    cr0_full = const offset_of!(TrampolineData, cr0),
    stack_top = const offset_of!(TrampolineData, stack_top),
    arg = const offset_of!(TrampolineData, arg),
    entry = const offset_of!(TrampolineData, entry),
    data_size = const core::mem::size_of::<TrampolineData>(),
    cr4_pae = const CR4_PAE,
    cr0 = const CR0_PG_PE,
    msr_efer = const MSR_EFER,
    rust_entry = sym super::ap_rust_entry,
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_long: u8;
    static ap_trampoline_data: u8;
    static ap_trampoline_end: u8;
    fn arch_ap_entry64();
}

/// The trampoline's code and data as assembled, and where its labels are.
pub(super) struct Blob {
    pub bytes: &'static [u8],
    /// Offset of the 64-bit code.
    pub long_offset: usize,
    /// Offset of [`TrampolineData`].
    pub data_offset: usize,
}

pub(super) fn blob() -> Blob {
    let start = &raw const ap_trampoline_start as usize;
    let end = &raw const ap_trampoline_end as usize;
    // SAFETY: the labels delimit the bytes assembled above, in .rodata.
    let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, end - start) };
    let data_offset = &raw const ap_trampoline_data as usize - start;
    assert_eq!(data_offset, DATA_OFFSET, "trampoline data block moved");
    Blob { bytes, long_offset: &raw const ap_trampoline_long as usize - start, data_offset }
}

/// Address of the 64-bit kernel-side entry.
pub(super) fn entry64() -> u64 {
    arch_ap_entry64 as *const () as u64
}
