//! The hardware abstraction the memory manager runs on.
//!
//! `mm` never touches CPU registers itself: the kernel registers one [`Hal`] at
//! boot ([`set`]) and host tests use their own (`testing::HostHal`), so the one
//! page-table walker and the one set of helpers run unchanged in both places.
//! The three entries a page fault calls on every pass (the CPU number and the
//! RCU read side) are also bound at link time on the kernel target
//! ([`bind_hal!`](crate::bind_hal)), so the fault path makes no indirect call for them.
//!
//! What the HAL provides:
//! * the current CPU number (per-CPU frame caches, lock statistics, the lock
//!   order checker);
//! * a cycle counter (time spent spinning on contended locks), and a mark
//!   around each contended wait (the kernel's profiler tags samples with it);
//! * the read-side critical-section hooks that `pte_offset_map` enters and
//!   `pte_unmap` leaves (Linux: `rcu_read_lock`), and the grace periods that
//!   end them: detached page tables and replaced VMA arrays are freed only
//!   once every section that could have seen them has ended;
//! * interrupt masking for the lockless user-page walker
//!   (`crate::gup`), whose section a TLB shoot-down must wait for;
//! * per-CPU storage for the debug lock-order checker;
//! * TLB shoot-down on a set of CPUs ([`Hal::flush_tlb`]) and the wait for a
//!   grace period ([`Hal::synchronize_rcu`]): the two halves of the freeing
//!   protocol in [`crate::tlb`].
//!
//! The physical-memory window is not a HAL call: it is a fixed offset
//! ([`crate::addr::DirectMap`]) handed to [`crate::init`], because every table
//! access goes through it and an indirect call per entry would be wasteful.

use crate::lock::lockdep::LockdepCpu;
use crate::tlb::{CpuBitmap, FlushRange};

/// The hardware services `mm` needs. Implementations must be cheap: `cpu_id` and
/// `cycles` are called on lock paths.
pub trait Hal: Sync {
    /// The number of the executing CPU (0-based). Any value is accepted; per-CPU
    /// tables index it modulo their size.
    ///
    /// On bare metal (`target_os = "none"`, the kernel) two more promises
    /// hold, and per-CPU counters rely on them to skip locked instructions
    /// (`percpu::this_cpu_add`): the number is below
    /// [`NR_CPUS`](crate::config::NR_CPUS), and it stays the executing CPU's
    /// until the calling `mm` function returns (kernel code is not moved
    /// between CPUs). Host HALs may break both.
    fn cpu_id(&self) -> usize;

    /// A monotonically increasing cycle count (TSC in the kernel).
    fn cycles(&self) -> u64;

    /// Called on every turn of a contended spinlock's wait loop (`spins` counts
    /// the turns). The default is the CPU's pause hint. A host HAL, whose
    /// "CPUs" are preemptible threads, may yield now and then so a preempted
    /// ticket holder can run (the paravirtualised-spinlock problem).
    #[inline]
    fn spin_wait(&self, spins: u32) {
        let _ = spins;
        crate::sync::spin_loop();
    }

    /// Whether a lock waiter on this CPU may halt now (the spinlock's
    /// "Halting waiters"): the kernel says yes with interrupts on, so the
    /// unlocker's kick (or the timer) can end the halt. The default, for
    /// HALs whose CPUs cannot halt, is no: waiters spin.
    #[inline]
    fn can_halt(&self) -> bool {
        false
    }

    /// Runs `announce` (a lock waiter's announcement, which returns whether
    /// its wait must go on) and, if it says so, halts this CPU until an
    /// interrupt arrives (`sti; hlt`). Called only after [`Hal::can_halt`]
    /// said yes, with nothing locked but the wait. No interrupt may be taken
    /// between `announce` and the halt: a kick sent after the announcement
    /// must end the halt, not be taken just before it (the kernel runs
    /// `announce` with interrupts off). The default, for HALs whose CPUs
    /// cannot halt, announces and returns: the waiter spins on.
    fn halt_if(&self, announce: &mut dyn FnMut() -> bool) {
        announce();
    }

    /// Wakes `cpu` from [`Hal::halt_if`] (an IPI). May be called for a CPU that
    /// is not halted, or for this one (then it does nothing).
    fn kick(&self, cpu: usize) {
        let _ = cpu;
    }

    /// Called when an acquisition of a lock of `class` finds it taken,
    /// before its wait loop, and paired with [`Hal::lock_wait_end`] once the
    /// lock is ours. Only the contended path calls the pair, and nothing is
    /// locked in between but the wait itself. The kernel marks the CPU as
    /// spinning on `class`, so its sampling profiler can tag the samples
    /// taken meanwhile. The default does nothing.
    #[inline]
    fn lock_wait_begin(&self, class: crate::lock::LockClass) {
        let _ = class;
    }

    /// The wait that [`Hal::lock_wait_begin`] announced is over.
    #[inline]
    fn lock_wait_end(&self) {}

    /// Enter a read-side critical section (Linux `rcu_read_lock`): a page table
    /// reached through it must not be freed until the matching
    /// [`rcu_read_unlock`](Hal::rcu_read_unlock). Nests.
    fn rcu_read_lock(&self) {}

    /// Leave a read-side critical section.
    fn rcu_read_unlock(&self) {}

    /// Linux `synchronize_rcu`: returns once every read-side critical section
    /// ([`rcu_read_lock`](Hal::rcu_read_lock) .. [`rcu_read_unlock`](Hal::rcu_read_unlock))
    /// that began before the call has ended. Sections that begin later need
    /// not be waited for. `mm` calls it with no spinlock held and outside any
    /// read-side section of its own, and only where it cannot defer (a
    /// backlog of deferred frees beyond its bound, `rcu_barrier`, tests):
    /// the unmap paths use the polled interface below instead. While it
    /// waits it must keep answering TLB shoot-down requests: a reader it
    /// waits for may itself be waiting for this CPU's acknowledgement.
    fn synchronize_rcu(&self);

    /// Linux `synchronize_rcu_expedited`: as [`Hal::synchronize_rcu`], but
    /// pushes the other CPUs to report a quiescent state now instead of at
    /// their next tick. `mm` calls it when its deferred frees pile up past
    /// their bound. The default is the normal grace period.
    fn synchronize_rcu_expedited(&self) {
        self.synchronize_rcu();
    }

    /// Linux `get_state_synchronize_rcu` (+ `start_poll_synchronize_rcu`): a
    /// cookie for "a full grace period from now", and a request that one
    /// starts. [`Hal::poll_state_synchronize_rcu`] of the cookie turns true
    /// once every read-side section running at this call has ended. Deferred
    /// freeing tags each batch with one and frees it once it polls true.
    fn get_state_synchronize_rcu(&self) -> u64;

    /// Linux `poll_state_synchronize_rcu`: whether the grace period a
    /// [`Hal::get_state_synchronize_rcu`] cookie names has completed. Never
    /// waits.
    fn poll_state_synchronize_rcu(&self, cookie: u64) -> bool;

    /// Linux `local_irq_save`: disables interrupts on this CPU and returns
    /// whether they were enabled. The lockless walker runs its whole walk
    /// with interrupts off, so a CPU that unmaps and shoots down the TLB
    /// (an IPI this CPU only answers with interrupts on) cannot free a frame
    /// or table the walk may still reach until the walk is over. A host HAL
    /// models the same handshake: its [`Hal::flush_tlb`] waits for every
    /// "interrupts off" section that began before it.
    fn local_irq_save(&self) -> bool {
        false
    }

    /// Linux `local_irq_restore`: re-enables interrupts if `enabled`.
    fn local_irq_restore(&self, enabled: bool) {
        let _ = enabled;
    }

    /// Invalidates `range` of the current address space's translations on
    /// every CPU in `cpus` (the executing CPU included, if it is in the set)
    /// and returns once each has done so (Linux `flush_tlb_mm_range`). Must
    /// be legal with interrupts disabled and with page-table spinlocks held:
    /// the fault path flushes under a PTE or PMD lock (COW of the zero page,
    /// splitting a huge PMD). With `range.freed_tables` the CPUs must also
    /// drop cached paging-structure entries for the range. An empty set is
    /// allowed and means nothing to do.
    fn flush_tlb(&self, cpus: &CpuBitmap, range: FlushRange);

    /// The executing CPU's lock-order state, for debug builds' checker. Return
    /// `None` to switch the checker off (it then only checks that a lock is held,
    /// not by whom).
    fn lockdep(&self) -> Option<&LockdepCpu> {
        None
    }
}

/// The HAL in force before [`set`]: the boot CPU, no cycle counter.
struct BootHal;

impl Hal for BootHal {
    fn cpu_id(&self) -> usize {
        0
    }
    fn cycles(&self) -> u64 {
        0
    }
    fn synchronize_rcu(&self) {
        // Its read-side hooks are no-ops: there is never a reader to wait for.
    }
    fn get_state_synchronize_rcu(&self) -> u64 {
        0
    }
    fn poll_state_synchronize_rcu(&self, _cookie: u64) -> bool {
        // No reader exists before the kernel's HAL: every period is over.
        true
    }
    fn flush_tlb(&self, cpus: &CpuBitmap, range: FlushRange) {
        // Before the kernel's HAL is registered no CPU has loaded a user
        // address space, so no CPU can be in any address space's bitmap.
        assert!(cpus.is_empty(), "TLB shoot-down {range:?} on {cpus:?} before the HAL is registered");
    }
}

static HAL: spin::Once<&'static dyn Hal> = spin::Once::new();

/// Registers the kernel's HAL. Call once, early at boot, before other CPUs run.
/// Returns `false` (and changes nothing) if a HAL was already registered.
pub fn set(hal: &'static dyn Hal) -> bool {
    let mut fresh = false;
    HAL.call_once(|| {
        fresh = true;
        hal
    });
    fresh
}

/// The registered HAL (the boot HAL before [`set`]; in this crate's own unit
/// tests, the host test HAL).
#[inline]
pub fn get() -> &'static dyn Hal {
    match HAL.get() {
        Some(h) => *h,
        None => default_hal(),
    }
}

#[cfg(not(test))]
fn default_hal() -> &'static dyn Hal {
    &BootHal
}

#[cfg(test)]
fn default_hal() -> &'static dyn Hal {
    // Unit tests never call `set`: they all share the host HAL, whose per-CPU
    // state is per-thread.
    let _ = BootHal;
    &crate::testing::HOST_HAL
}

/// The current CPU number.
#[inline]
pub fn cpu_id() -> usize {
    fast::cpu_id()
}

/// Enters a read-side critical section ([`Hal::rcu_read_lock`]).
#[inline]
pub fn rcu_read_lock() {
    fast::rcu_read_lock()
}

/// Leaves a read-side critical section ([`Hal::rcu_read_unlock`]).
#[inline]
pub fn rcu_read_unlock() {
    fast::rcu_read_unlock()
}

/// The entries every page fault calls several times ([`cpu_id`] for lock
/// statistics, per-CPU frame lists and counters; the RCU read side for the
/// VMA lookup and `pte_offset_map`) are bound at link time on the kernel
/// target, not called through the registered `&dyn Hal`: the kernel names
/// its HAL with [`bind_hal!`](crate::bind_hal), and with LTO each call inlines to a few
/// instructions (a fault ran 1828 instructions before, 1651 after). An
/// indirect call also costs more than its instructions under TCG: QEMU
/// resolves the call and its `ret` through a hash lookup each. Host builds
/// (unit tests, loom) go through the registered HAL; so does every other
/// entry, which runs off the fault path or only when a lock is contended.
/// On the kernel target the bound entries are the kernel's from the first
/// call, also before [`set`]: they must work wherever `mm` code can run.
#[cfg(target_os = "none")]
mod fast {
    unsafe extern "Rust" {
        fn __mm_hal_cpu_id() -> usize;
        fn __mm_hal_rcu_read_lock();
        fn __mm_hal_rcu_read_unlock();
    }

    #[inline]
    pub(super) fn cpu_id() -> usize {
        // SAFETY: `bind_hal!` defines each of these symbols with exactly the
        // signature declared here, and the kernel does not link without it.
        unsafe { __mm_hal_cpu_id() }
    }

    #[inline]
    pub(super) fn rcu_read_lock() {
        // SAFETY: as in `cpu_id`.
        unsafe { __mm_hal_rcu_read_lock() }
    }

    #[inline]
    pub(super) fn rcu_read_unlock() {
        // SAFETY: as in `cpu_id`.
        unsafe { __mm_hal_rcu_read_unlock() }
    }
}

#[cfg(not(target_os = "none"))]
mod fast {
    #[inline]
    pub(super) fn cpu_id() -> usize {
        super::get().cpu_id()
    }

    #[inline]
    pub(super) fn rcu_read_lock() {
        super::get().rcu_read_lock()
    }

    #[inline]
    pub(super) fn rcu_read_unlock() {
        super::get().rcu_read_unlock()
    }
}

/// Binds the fault path's HAL entries ([`cpu_id`], [`rcu_read_lock`],
/// [`rcu_read_unlock`]) to `$hal`, a `static` implementing [`Hal`], at link
/// time. The kernel invokes it once, next to its [`set`] of the same HAL; a
/// kernel that forgets it does not link.
#[macro_export]
macro_rules! bind_hal {
    ($hal:path) => {
        #[unsafe(no_mangle)]
        #[inline]
        fn __mm_hal_cpu_id() -> usize {
            $crate::hal::Hal::cpu_id(&$hal)
        }
        #[unsafe(no_mangle)]
        #[inline]
        fn __mm_hal_rcu_read_lock() {
            $crate::hal::Hal::rcu_read_lock(&$hal)
        }
        #[unsafe(no_mangle)]
        #[inline]
        fn __mm_hal_rcu_read_unlock() {
            $crate::hal::Hal::rcu_read_unlock(&$hal)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_hal_is_cpu_zero() {
        assert_eq!(BootHal.cpu_id(), 0);
        assert_eq!(BootHal.cycles(), 0);
        assert!(BootHal.lockdep().is_none());
        BootHal.synchronize_rcu();
        BootHal.flush_tlb(&CpuBitmap::new(), FlushRange::ALL);
    }

    #[test]
    fn unit_tests_see_the_host_hal_with_distinct_cpus_per_thread() {
        let here = cpu_id();
        let there = std::thread::spawn(cpu_id).join().unwrap();
        assert_ne!(here, there);
        assert!(get().lockdep().is_some());
    }
}
