//! Traps: the IDT, the common dispatcher, and what a kernel bug prints.
//!
//! The arch layer owns the mechanism (saving registers, finding exception-table
//! fixups, printing an oops); the kernel owns the policy through [`TrapHooks`]
//! (what a page fault means, what to do with a faulting user task, which IRQ
//! handler runs).

pub mod backtrace;
pub mod callchain;
mod entry;
pub mod extable;
mod frame;

use core::sync::atomic::Ordering;

pub use frame::TrapFrame;
pub(crate) use frame::push_gprs;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::{InterruptDescriptorTable, PageFaultErrorCode};

use crate::gdt::IstSlot;

/// Exception vectors by name.
#[allow(missing_docs)]
pub mod vector {
    pub const DIVIDE_ERROR: u8 = 0;
    pub const DEBUG: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BREAKPOINT: u8 = 3;
    pub const INVALID_OPCODE: u8 = 6;
    pub const DOUBLE_FAULT: u8 = 8;
    pub const GENERAL_PROTECTION: u8 = 13;
    pub const PAGE_FAULT: u8 = 14;
    pub const MACHINE_CHECK: u8 = 18;
    /// First vector available to device and inter-processor interrupts.
    pub const FIRST_IRQ: u8 = 32;
}

/// Human-readable exception names, indexed by vector.
const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved (15)",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved (31)",
];

/// Name of an exception vector (or "IRQ" for the rest).
pub fn vector_name(vector: u8) -> &'static str {
    EXCEPTION_NAMES.get(vector as usize).copied().unwrap_or("interrupt")
}

/// What a page fault looked like.
#[derive(Clone, Copy, Debug)]
pub struct PageFault {
    /// The faulting linear address (CR2).
    pub addr: VirtAddr,
    /// The hardware error code.
    pub code: PageFaultErrorCode,
}

impl PageFault {
    /// The access that faulted, decoded from the error code.
    pub fn access(&self) -> FaultAccess {
        FaultAccess {
            write: self.code.contains(PageFaultErrorCode::CAUSED_BY_WRITE),
            exec: self.code.contains(PageFaultErrorCode::INSTRUCTION_FETCH),
            user: self.code.contains(PageFaultErrorCode::USER_MODE),
            present: self.code.contains(PageFaultErrorCode::PROTECTION_VIOLATION),
        }
    }
}

/// The faulting access, as the page-fault error code describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultAccess {
    /// A write (bit 1; clear for a read or a fetch).
    pub write: bool,
    /// An instruction fetch (bit 4).
    pub exec: bool,
    /// Made in user mode (bit 2). A kernel user-copy access is a supervisor
    /// access: this is clear for it.
    pub user: bool,
    /// The page was present, so the access broke its protection (bit 0);
    /// clear when nothing was mapped.
    pub present: bool,
}

impl FaultAccess {
    /// A few words for a log line, e.g. "write to an unmapped page".
    pub fn describe(self) -> &'static str {
        match (self.present, self.write, self.exec) {
            (_, _, true) => "instruction fetch",
            (true, true, _) => "write to a present page",
            (true, false, _) => "read of a present page",
            (false, true, _) => "write to an unmapped page",
            (false, false, _) => "read of an unmapped page",
        }
    }
}

/// What the kernel's page-fault handler decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The mapping was fixed (or another CPU fixed it): retry the access.
    Handled,
    /// Not resolved, and why: the exception table, the user-exception hook
    /// or an oops takes it from here.
    Unhandled(FaultReason),
}

/// Why a page fault was left unresolved (the kernel fills it in from its
/// memory manager's answer; the user-exception hook reports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// The address is outside user space.
    KernelAddress,
    /// A kernel access to a user address that is not the memory manager's:
    /// outside the user-copy routines, or from a task with no address space.
    KernelAccess,
    /// No mapping covers the address (Linux's `SEGV_MAPERR`).
    NoMapping,
    /// The mapping does not allow this access (`SEGV_ACCERR`).
    NotPermitted,
    /// Memory ran out while resolving the fault.
    OutOfMemory,
}

/// The kernel's policy for traps. Registered once with [`set_hooks`].
pub struct TrapHooks {
    /// A page fault at any privilege level. Runs with interrupts disabled.
    pub page_fault: fn(&mut TrapFrame, PageFault) -> FaultOutcome,
    /// An exception from ring 3 that was not resolved (for a page fault, the
    /// fault and why `page_fault` left it): the kernel ends the offending
    /// task and does not return to it.
    pub user_exception: fn(&mut TrapFrame, Option<(PageFault, FaultReason)>),
    /// `int3`. Returns to the instruction after it.
    pub breakpoint: fn(&mut TrapFrame),
    /// Any vector >= 32.
    pub irq: fn(u8, &mut TrapFrame),
    /// Called after an oops has been printed; never returns.
    pub fatal: fn() -> !,
    /// What an address in an oops is, when the kernel knows (for example
    /// "the guard page below a kernel stack"). Must not take locks: it runs
    /// in the double-fault handler.
    pub describe_addr: fn(u64) -> Option<&'static str>,
}

static HOOKS: Once<TrapHooks> = Once::new();

/// Registers the kernel's trap policy. Before this, every trap is an oops.
pub fn set_hooks(hooks: TrapHooks) {
    HOOKS.call_once(|| hooks);
}

static IDT: Once<InterruptDescriptorTable> = Once::new();

fn build_idt() -> InterruptDescriptorTable {
    let mut idt = InterruptDescriptorTable::new();
    // SAFETY: `trap_stub_table` is the table of 256 assembly stubs emitted by
    // `entry.rs`, in vector order.
    let stubs = unsafe { &entry::trap_stub_table };
    for (v, &addr) in stubs.iter().enumerate() {
        let addr = VirtAddr::new(addr);
        macro_rules! set {
            ($entry:expr) => {
                // SAFETY: every stub saves a full TrapFrame and returns with
                // iretq, the contract the IDT requires of a handler address.
                unsafe { $entry.set_handler_addr(addr) }
            };
        }
        let opts = match v {
            0 => set!(idt.divide_error),
            1 => set!(idt.debug),
            2 => set!(idt.non_maskable_interrupt),
            3 => set!(idt.breakpoint),
            4 => set!(idt.overflow),
            5 => set!(idt.bound_range_exceeded),
            6 => set!(idt.invalid_opcode),
            7 => set!(idt.device_not_available),
            8 => set!(idt.double_fault),
            10 => set!(idt.invalid_tss),
            11 => set!(idt.segment_not_present),
            12 => set!(idt.stack_segment_fault),
            13 => set!(idt.general_protection_fault),
            14 => set!(idt.page_fault),
            16 => set!(idt.x87_floating_point),
            17 => set!(idt.alignment_check),
            18 => set!(idt.machine_check),
            19 => set!(idt.simd_floating_point),
            20 => set!(idt.virtualization),
            21 => set!(idt.cp_protection_exception),
            28 => set!(idt.hv_injection_exception),
            29 => set!(idt.vmm_communication_exception),
            30 => set!(idt.security_exception),
            // 9, 15, 22..=27, 31 are reserved: the CPU never raises them.
            9 | 15 | 22..=27 | 31 => continue,
            _ => set!(idt[v as u8]),
        };
        match v as u8 {
            vector::DOUBLE_FAULT => {
                // SAFETY: the double-fault IST slot is filled by `gdt::load`
                // on every CPU before it loads this IDT.
                unsafe { opts.set_stack_index(IstSlot::DoubleFault as u16) };
            }
            vector::NMI => {
                // SAFETY: the NMI IST slot is filled by `gdt::load` on every
                // CPU before it loads this IDT.
                unsafe { opts.set_stack_index(IstSlot::Nmi as u16) };
            }
            vector::MACHINE_CHECK => {
                // SAFETY: the machine-check IST slot is filled by `gdt::load`
                // on every CPU before it loads this IDT.
                unsafe { opts.set_stack_index(IstSlot::MachineCheck as u16) };
            }
            vector::BREAKPOINT => {
                // Let `int3` work from ring 3 too (debuggers, tests).
                opts.set_privilege_level(x86_64::PrivilegeLevel::Ring3);
            }
            _ => {}
        }
    }
    idt
}

/// Loads the shared IDT on this CPU (built on first use).
pub fn load_idt() {
    IDT.call_once(build_idt).load();
}

/// Entered from `trap_common` / `trap_paranoid` with the saved registers.
#[unsafe(no_mangle)]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    let cpu = crate::percpu::this_cpu();
    // Only this CPU writes its depth, and a nested trap restores it before
    // we resume: plain loads and stores suffice (no locked instruction on
    // every trap).
    let depth = cpu.irq_depth.load(Ordering::Relaxed);
    cpu.irq_depth.store(depth + 1, Ordering::Relaxed);
    dispatch(frame);
    cpu.irq_depth.store(depth, Ordering::Relaxed);
}

fn dispatch(frame: &mut TrapFrame) {
    let vector = frame.vector as u8;
    let hooks = HOOKS.get();
    if vector >= vector::FIRST_IRQ {
        match hooks {
            Some(h) => (h.irq)(vector, frame),
            None => oops(frame, None, "interrupt before the kernel registered handlers"),
        }
        return;
    }
    if vector == vector::NMI && crate::ipi::stop_requested_for_me() {
        // Another CPU is dying (or reporting a lockup) and asked us to stop.
        crate::ipi::stopped_by_nmi(frame);
    }
    let fault = (vector == vector::PAGE_FAULT).then(|| PageFault {
        addr: Cr2::read().unwrap_or(VirtAddr::zero()),
        code: PageFaultErrorCode::from_bits_truncate(frame.error_code),
    });
    let mut unresolved = None;
    if let (Some(h), Some(pf)) = (hooks, fault) {
        match (h.page_fault)(frame, pf) {
            FaultOutcome::Handled => return,
            FaultOutcome::Unhandled(reason) => unresolved = Some((pf, reason)),
        }
    }
    if vector == vector::BREAKPOINT
        && let Some(h) = hooks
    {
        (h.breakpoint)(frame);
        return;
    }
    if frame.from_user() {
        if let Some(h) = hooks {
            (h.user_exception)(frame, unresolved);
            return;
        }
    } else if let Some(fixup) = extable::search(frame.rip) {
        frame.rip = fixup;
        return;
    }
    oops(frame, fault, "unhandled exception");
}

/// Prints everything known about a fatal trap and stops the system.
pub fn oops(frame: &TrapFrame, fault: Option<PageFault>, why: &str) -> ! {
    // Stop the other CPUs first so the report is not interleaved with their
    // output; if another CPU is already reporting, its report wins.
    if !crate::ipi::stop_other_cpus() {
        crate::ipi::park();
    }
    let cpu = crate::percpu::cpu_id();
    let vector = frame.vector as u8;
    crate::serial::write_fmt_forced(format_args!(
        "\nKERNEL OOPS on CPU {cpu}: {} (vector {vector}), error code {:#x}: {why}\n",
        vector_name(vector),
        frame.error_code,
    ));
    let describe = |addr: u64| HOOKS.get().and_then(|h| (h.describe_addr)(addr));
    if let Some(pf) = fault {
        crate::serial::write_fmt_forced(format_args!("  CR2 {:#018x}  ({:?})\n", pf.addr.as_u64(), pf.code));
    } else if vector == vector::DOUBLE_FAULT {
        // A double fault is usually a fault that could not be delivered; CR2
        // still holds the address of the page fault that started it, if any.
        let cr2 = Cr2::read_raw();
        crate::serial::write_fmt_forced(format_args!("  CR2 {cr2:#018x}  (last page-fault address)\n"));
    }
    let suspects =
        [fault.map(|pf| pf.addr.as_u64()), (vector == vector::DOUBLE_FAULT).then(Cr2::read_raw), Some(frame.rsp)];
    if let Some(what) = suspects.into_iter().flatten().find_map(describe) {
        crate::serial::write_fmt_forced(format_args!("  {what}\n"));
    }
    crate::serial::write_fmt_forced(format_args!("{frame}\n"));
    backtrace::print(frame.rip, frame.rbp);
    match HOOKS.get() {
        Some(h) => (h.fatal)(),
        None => crate::qemu::exit(crate::qemu::ExitCode::Failure),
    }
}
