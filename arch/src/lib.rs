//! x86_64 hardware layer of the kernel.
//!
//! Everything here touches the machine: segments and the TSS, the IDT and the
//! trap entry path, the per-CPU base, the serial console, the TSC, CPUID,
//! QEMU's debug devices, ACPI, the local APIC, AP start-up, IPIs and TLB
//! shoot-down. It offers safe, documented interfaces; `unsafe` stays
//! inside this crate (and the few low-level modules of `mm`).
#![no_std]

pub mod acpi;
pub mod apic;
pub mod context;
pub mod cpu;
pub mod cpumask;
pub mod fw_cfg;
pub mod gdt;
pub mod ipi;
pub mod irq;
pub mod kvmap;
pub mod percpu;
pub mod pic;
pub mod qemu;
pub mod serial;
pub mod smp;
pub mod syscall;
pub mod time;
pub mod tlb;
pub mod trap;
pub mod usercopy;

/// Brings up the boot CPU's own state, in the only order that works: the
/// per-CPU base first (logging reads the CPU number), then the console, the
/// GDT/TSS (the IDT refers to IST stacks), the IDT, and the TSC rate.
pub fn init_boot_cpu() {
    percpu::init_this_cpu(0, 0);
    serial::init();
    // The boot CPU's tables, handed to the CPU for good: the first call
    // takes the lock and never gives it back.
    static BSP_TABLES: spin::Mutex<gdt::CpuTables> = spin::Mutex::new(gdt::CpuTables::new());
    if let Some(tables) = BSP_TABLES.try_lock() {
        gdt::load(spin::MutexGuard::leak(tables));
    }
    trap::load_idt();
    pic::disable();
    time::calibrate();
}
