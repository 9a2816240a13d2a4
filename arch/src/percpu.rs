//! Per-CPU base, reached through the GS segment base.
//!
//! While a CPU runs kernel code, `IA32_GS_BASE` points at its [`PerCpu`]; the
//! first word of that block points at itself, so `gs:0` gives the block's
//! address in one instruction. While a CPU runs user code the kernel value sits
//! in `IA32_KERNEL_GS_BASE` and every entry path executes `swapgs` first
//! (see `trap/entry.rs`).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Compile-time maximum number of CPUs (`abi::NR_CPUS`, the one source of
/// it). CPUs beyond it stay offline.
pub use abi::NR_CPUS;
use x86_64::VirtAddr;
use x86_64::registers::model_specific::{GsBase, KernelGsBase};

/// The per-CPU block. Field offsets are part of the entry-code ABI: the
/// assembly in `trap/entry.rs` and `syscall.rs` reads them through `gs:`.
#[repr(C, align(64))]
pub struct PerCpu {
    /// `gs:0`: this block's own address.
    self_ptr: AtomicU64,
    /// `gs:8`: the logical CPU number (0 = boot CPU), dense in `0..NR_CPUS`.
    cpu_id: AtomicU32,
    /// `gs:12`: the local APIC ID of this CPU.
    apic_id: AtomicU32,
    /// `gs:16`: kernel stack top used by the `syscall` entry.
    pub kernel_rsp: AtomicU64,
    /// `gs:24`: the user stack pointer saved by the `syscall` entry.
    pub user_rsp_scratch: AtomicU64,
    /// `gs:32`: the TSS of this CPU (for `rsp0` updates on context switch).
    tss: AtomicU64,
    /// `gs:40`: nesting depth of interrupt/exception handlers on this CPU.
    pub irq_depth: AtomicU32,
    /// Set once this CPU has finished its own bring-up.
    online: AtomicU32,
}

/// Offsets used by assembly; checked against the struct below.
pub const PERCPU_KERNEL_RSP: usize = 16;
/// See [`PERCPU_KERNEL_RSP`].
pub const PERCPU_USER_RSP: usize = 24;
const _: () = assert!(core::mem::offset_of!(PerCpu, kernel_rsp) == PERCPU_KERNEL_RSP);
const _: () = assert!(core::mem::offset_of!(PerCpu, user_rsp_scratch) == PERCPU_USER_RSP);
const _: () = assert!(core::mem::offset_of!(PerCpu, cpu_id) == 8);

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_ptr: AtomicU64::new(0),
            cpu_id: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            kernel_rsp: AtomicU64::new(0),
            user_rsp_scratch: AtomicU64::new(0),
            tss: AtomicU64::new(0),
            irq_depth: AtomicU32::new(0),
            online: AtomicU32::new(0),
        }
    }

    /// Logical CPU number.
    pub fn cpu_id(&self) -> usize {
        self.cpu_id.load(Ordering::Relaxed) as usize
    }

    /// Local APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    /// Whether this CPU has completed bring-up.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire) != 0
    }

    pub(crate) fn set_tss(&self, tss: *mut x86_64::structures::tss::TaskStateSegment) {
        self.tss.store(tss as u64, Ordering::Relaxed);
    }

    pub(crate) fn tss(&self) -> *mut x86_64::structures::tss::TaskStateSegment {
        self.tss.load(Ordering::Relaxed) as *mut _
    }
}

/// One block per possible CPU. Statically allocated so that a CPU can reach
/// its block before the heap exists.
static PERCPU: [PerCpu; NR_CPUS] = [const { PerCpu::new() }; NR_CPUS];

/// Points this CPU's GS base at block `cpu_id` and records its APIC ID.
/// Must run first on every CPU, before anything that logs.
pub fn init_this_cpu(cpu_id: usize, apic_id: u32) {
    let block = &PERCPU[cpu_id];
    block.self_ptr.store(block as *const PerCpu as u64, Ordering::Relaxed);
    block.cpu_id.store(cpu_id as u32, Ordering::Relaxed);
    block.apic_id.store(apic_id, Ordering::Relaxed);
    let base = VirtAddr::new(block as *const PerCpu as u64);
    GsBase::write(base);
    // User mode starts with GS base 0; `swapgs` on entry brings this back.
    KernelGsBase::write(VirtAddr::zero());
}

/// The online CPUs as a mask (kept in step with each block's `online` flag),
/// so IPI and shoot-down paths read one word instead of every block.
static ONLINE: crate::cpumask::AtomicCpuMask = crate::cpumask::AtomicCpuMask::new();

/// Marks this CPU online (visible to [`online_cpus`]).
pub fn mark_online() {
    this_cpu().online.store(1, Ordering::Release);
    ONLINE.set(cpu_id());
}

/// The online CPUs.
pub fn online_mask() -> crate::cpumask::CpuMask {
    ONLINE.load()
}

/// Records this CPU's local APIC ID once the APIC is up (the boot CPU's
/// block is initialised before its APIC ID is known).
pub fn set_apic_id(apic_id: u32) {
    this_cpu().apic_id.store(apic_id, Ordering::Relaxed);
}

/// This CPU's block.
pub fn this_cpu() -> &'static PerCpu {
    let ptr: u64;
    // SAFETY: `init_this_cpu` ran on this CPU first (boot order), so gs:0
    // holds the address of a `PerCpu` in the static array.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) ptr, options(nostack, preserves_flags, readonly));
    }
    // SAFETY: gs:0 holds the address of this CPU's `PerCpu` in the static
    // array (`init_this_cpu` stored it there), which is 'static and never
    // moves, and `PerCpu` is only ever shared (its fields are atomics).
    unsafe { &*(ptr as *const PerCpu) }
}

/// The logical number of the CPU running this code.
#[inline]
pub fn cpu_id() -> usize {
    let id: u32;
    // SAFETY: `init_this_cpu` ran on this CPU first (boot order), so the GS
    // base is this CPU's `PerCpu` and gs:8 is its `cpu_id` (offset asserted
    // above); the load has no side effects.
    unsafe {
        core::arch::asm!("mov {:e}, gs:[8]", out(reg) id, options(nostack, preserves_flags, readonly));
    }
    id as usize
}

/// Block of CPU `cpu` (any CPU, online or not).
pub fn cpu(cpu: usize) -> &'static PerCpu {
    &PERCPU[cpu]
}

/// Iterator over the logical numbers of online CPUs.
pub fn online_cpus() -> impl Iterator<Item = usize> {
    let mask = online_mask();
    (0..NR_CPUS).filter(move |&c| mask.contains(c))
}

/// Number of online CPUs.
pub fn online_count() -> usize {
    online_mask().count()
}
