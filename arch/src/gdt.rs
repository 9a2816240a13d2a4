//! Per-CPU GDT and TSS with separate IST stacks.
//!
//! Segment layout (fixed by `syscall`/`sysret`, see `STAR` in `syscall.rs`):
//! `0x08` kernel code, `0x10` kernel data, `0x18` user data, `0x20` user code,
//! `0x28` TSS (two slots).
//!
//! The double fault, NMI and machine check handlers each run on their own IST
//! stack, so a kernel stack overflow (which faults with no stack left) still
//! reaches a handler that can print what happened.

use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::{PrivilegeLevel, VirtAddr};

/// Kernel code selector.
pub const KERNEL_CS: SegmentSelector = SegmentSelector::new(1, PrivilegeLevel::Ring0);
/// Kernel data/stack selector.
pub const KERNEL_DS: SegmentSelector = SegmentSelector::new(2, PrivilegeLevel::Ring0);
/// User data/stack selector (RPL 3).
pub const USER_DS: SegmentSelector = SegmentSelector::new(3, PrivilegeLevel::Ring3);
/// User code selector (RPL 3).
pub const USER_CS: SegmentSelector = SegmentSelector::new(4, PrivilegeLevel::Ring3);
const TSS_SEL: SegmentSelector = SegmentSelector::new(5, PrivilegeLevel::Ring0);

/// IST slot (1-based in the IDT, 0-based in the TSS) of each special stack.
#[derive(Clone, Copy)]
#[repr(u16)]
pub enum IstSlot {
    /// #DF.
    DoubleFault = 0,
    /// NMI.
    Nmi = 1,
    /// #MC.
    MachineCheck = 2,
}

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

/// Everything one CPU's segmentation needs. Must live forever once loaded.
#[repr(C)]
pub struct CpuTables {
    gdt: GlobalDescriptorTable<8>,
    tss: TaskStateSegment,
    ist: [IstStack; 3],
}

impl CpuTables {
    /// Empty tables; [`load`] fills and activates them.
    pub const fn new() -> Self {
        Self {
            gdt: GlobalDescriptorTable::empty(),
            tss: TaskStateSegment::new(),
            ist: [const { IstStack([0; IST_STACK_SIZE]) }; 3],
        }
    }
}

impl Default for CpuTables {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills `tables` for this CPU and loads the GDT, segment registers and TSS.
pub fn load(tables: &'static mut CpuTables) {
    for (slot, stack) in tables.ist.iter().enumerate() {
        let top = VirtAddr::from_ptr(stack.0.as_ptr()) + IST_STACK_SIZE as u64;
        tables.tss.interrupt_stack_table[slot] = top;
    }
    let tss_ptr: *mut TaskStateSegment = &mut tables.tss;
    let mut gdt = GlobalDescriptorTable::new();
    assert_eq!(gdt.append(Descriptor::kernel_code_segment()), KERNEL_CS);
    assert_eq!(gdt.append(Descriptor::kernel_data_segment()), KERNEL_DS);
    assert_eq!(gdt.append(Descriptor::user_data_segment()), USER_DS);
    assert_eq!(gdt.append(Descriptor::user_code_segment()), USER_CS);
    // SAFETY: the TSS lives in `tables`, which is 'static and never moves.
    let tss_desc = unsafe { Descriptor::tss_segment_unchecked(tss_ptr) };
    assert_eq!(gdt.append(tss_desc), TSS_SEL);
    tables.gdt = gdt;
    let gdt: &'static GlobalDescriptorTable<8> = &tables.gdt;
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT loaded just above.
    unsafe {
        CS::set_reg(KERNEL_CS);
        SS::set_reg(KERNEL_DS);
        DS::set_reg(SegmentSelector(0));
        ES::set_reg(SegmentSelector(0));
        load_tss(TSS_SEL);
    }
    crate::percpu::this_cpu().set_tss(tss_ptr);
}

/// Sets the stack the CPU switches to when an interrupt arrives in ring 3
/// (`TSS.rsp0`) and the `syscall` entry stack. Called on every context switch
/// to a user thread.
pub fn set_kernel_stack(top: VirtAddr) {
    let this = crate::percpu::this_cpu();
    let tss = this.tss();
    assert!(!tss.is_null(), "set_kernel_stack before gdt::load");
    // SAFETY: `tss` points at this CPU's TSS (set by `load`); only this CPU
    // writes it, and the CPU reads rsp0 only on a privilege change, which
    // cannot happen while we run this kernel code.
    unsafe { (*tss).privilege_stack_table[0] = top };
    this.kernel_rsp.store(top.as_u64(), core::sync::atomic::Ordering::Relaxed);
}
