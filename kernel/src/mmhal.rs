//! The kernel's implementation of the memory manager's hardware interface.

use arch::percpu::NR_CPUS;
use mm::lock::lockdep::LockdepCpu;

struct KernelHal;

/// Per-CPU held-lock sets for the debug lock-order checker. Each entry is
/// touched only by its own CPU.
static LOCKDEP: [LockdepCpu; NR_CPUS] = [const { LockdepCpu::new() }; NR_CPUS];

impl mm::hal::Hal for KernelHal {
    #[inline]
    fn cpu_id(&self) -> usize {
        arch::percpu::cpu_id()
    }

    #[inline]
    fn cycles(&self) -> u64 {
        arch::time::rdtsc()
    }

    /// A CPU spinning on a page-table lock may have interrupts off while the
    /// lock holder waits for it to acknowledge a TLB shoot-down: servicing
    /// pending flushes here is what makes that wait finish (arch/src/tlb.rs).
    #[inline]
    fn spin_wait(&self, _spins: u32) {
        arch::tlb::service_pending();
        core::hint::spin_loop();
    }

    fn rcu_read_lock(&self) {
        crate::rcu::read_lock();
    }

    fn rcu_read_unlock(&self) {
        crate::rcu::read_unlock();
    }

    fn lockdep(&self) -> Option<&LockdepCpu> {
        Some(&LOCKDEP[arch::percpu::cpu_id()])
    }
}

static HAL: KernelHal = KernelHal;

/// Registers the HAL. Call on the boot CPU before `mm::init`.
pub fn install() {
    assert!(mm::hal::set(&HAL), "mm HAL registered twice");
}
