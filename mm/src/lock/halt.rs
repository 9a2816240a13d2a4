//! Halting lock waiters, shared by the spinlock and `mmap_lock`.
//!
//! Under a hypervisor a spinning waiter burns the host core its holder (or
//! the CPU that would end its wait) needs: with eight vCPUs on two host
//! cores, six spinning waiters are six host threads the host runs in turn
//! with the one that would release the lock. So, as Linux's paravirtual
//! spinlocks do (`pv_wait`/`pv_kick`, kernel/locking/qspinlock_paravirt.h,
//! there with a hypercall) and as its sleeping `mmap_lock` (an rwsem) does by
//! nature, a waiter that has spun for [`HALT_AFTER_CYCLES`] with interrupts
//! on halts its vCPU (`sti; hlt`), which gives the host core back, and the
//! CPU that ends its wait wakes it with an IPI ("kick").
//!
//! # The handshake
//!
//! A lost wake-up must be impossible. Each lock keeps a flag that says "a
//! waiter may be halted here" (the spinlock in its `owner` word, the rwlock
//! in a word of its own), and the per-CPU slots [`WAITING_ON`] say which lock
//! each halted CPU waits for. Both sides work in two steps, Dekker's
//! pattern with read-modify-writes:
//!
//! * the waiter publishes the lock's address in its slot, sets the flag with
//!   a read-modify-write, then reads the word its wait depends on with a
//!   read-modify-write too, and halts only if that still says "wait";
//! * the CPU that ends the wait changes that word with a read-modify-write,
//!   then looks at the flag, and if it is set kicks every CPU whose slot
//!   names this lock.
//!
//! The two read-modify-writes of the word the wait depends on are ordered
//! in its modification order. If the waiter's comes second, it reads the
//! change and does not halt. If it comes first, the changer's
//! read-modify-write reads from it and synchronises with it, so the flag
//! (set before it) is visible to the changer's later look. Loom models
//! `SeqCst` only as acquire/release, and this form it can verify
//! (`loom_halted_waiters_are_always_kicked`,
//! `loom_rwlock_halted_waiters_are_always_kicked`).
//!
//! The HAL announces and halts with interrupts off in between
//! ([`hal::Hal::halt_if`]: `cli; announce; sti; hlt`): a kick that arrives
//! after the announcement stays pending and ends the halt at once, instead
//! of being taken just before it and leaving the CPU asleep until its next
//! timer tick. The timer tick ends any halt in any case, so a bug here
//! costs time (at most a tick), never a hang.

use core::sync::atomic::Ordering::{Relaxed, SeqCst};

use crate::hal;

/// How long, in TSC cycles, a waiter with interrupts on spins before it
/// halts its CPU until it is kicked (module comment): about 25 µs, longer
/// than any critical section that is not stretched by the host descheduling
/// its holder.
pub const HALT_AFTER_CYCLES: u64 = 1 << 16;

/// Halting waiters on (module comment). Set once at boot.
#[cfg(not(loom))]
static HALT_WAITERS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

// Under loom, per model execution: a model that halts must not switch the
// mode of the models running beside it in the same test process (their
// unlocks would change from a store to a swap between two of their
// executions, which loom cannot replay). Bookkeeping, so a core atomic.
#[cfg(loom)]
loom::lazy_static! {
    static ref HALT_WAITERS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
}

/// CPUs that may halt: every CPU, and in the loom models three (so a
/// kicker's scan of the slots stays a few atomic loads to explore).
pub(crate) const HALTING_CPUS: usize = if cfg!(loom) { 3 } else { crate::config::NR_CPUS };

/// Per CPU: the address of the lock its halted waiter waits for, 0 when
/// none. Written by its CPU, read by kickers (module comment).
#[cfg(not(loom))]
static WAITING_ON: [core::sync::atomic::AtomicUsize; HALTING_CPUS] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; HALTING_CPUS];

// Under loom the slots are loom atomics, fresh for each execution, so the
// model explores every order of the handshake's accesses.
#[cfg(loom)]
loom::lazy_static! {
    static ref WAITING_ON: [loom::sync::atomic::AtomicUsize; HALTING_CPUS] =
        core::array::from_fn(|_| loom::sync::atomic::AtomicUsize::new(0));
}

/// Waits ended by a halt, and kicks sent, since boot.
static HALTS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static KICKS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Makes lock waiters halt instead of spinning past [`HALT_AFTER_CYCLES`]
/// (module comment): the spinlock's test-and-set waits and every wait of
/// `mmap_lock`, where [`hal::Hal::can_halt`] allows it. Set at boot, before
/// other CPUs take locks: a switch while a lock is contended may cost a
/// waiter a halt until its next timer tick.
pub fn set_halting_waiters(on: bool) {
    HALT_WAITERS.store(on, Relaxed);
}

/// Whether waiters halt (module comment).
pub fn halting_waiters() -> bool {
    HALT_WAITERS.load(Relaxed)
}

/// Halts taken by lock waiters and kicks sent since boot.
pub fn halt_counts() -> (u64, u64) {
    (HALTS.load(Relaxed), KICKS.load(Relaxed))
}

/// When a wait should stop spinning and halt: one per wait loop.
pub(crate) struct SpinTimer {
    /// Since when the wait has spun without a halt; 0 when not yet known.
    since: u64,
}

impl SpinTimer {
    pub(crate) const fn new() -> Self {
        Self { since: 0 }
    }

    /// Whether the wait, which has spun since this timer started (or since
    /// its last halt), should halt now.
    #[inline]
    pub(crate) fn should_halt(&mut self, hal: &dyn hal::Hal) -> bool {
        if !halting_waiters() {
            return false;
        }
        if cfg!(loom) {
            // No clock under loom (it would make the model's choices differ
            // between executions): a waiter that may halt halts at its
            // first lost turn (its `spin_wait` does not yield, see the host
            // HAL), so the models explore the handshake.
            return hal.can_halt();
        }
        let now = hal.cycles();
        if self.since == 0 {
            self.since = now;
            return false;
        }
        if now.wrapping_sub(self.since) < HALT_AFTER_CYCLES || !hal.can_halt() {
            return false;
        }
        self.since = 0;
        true
    }
}

/// Publishes this CPU as a waiter on the lock at `addr`, then runs
/// `announce`, which sets the lock's flag and returns whether the wait must
/// go on (both with read-modify-writes, module comment); if it must, halts
/// until a kick or any other interrupt. Returns with the slot cleared.
#[cold]
pub(crate) fn halt_while(hal: &dyn hal::Hal, addr: usize, mut announce: impl FnMut() -> bool) {
    // The kernel's CPUs are all below NR_CPUS; a host test's thread may
    // not be, and then spins on.
    let Some(slot) = WAITING_ON.get(hal.cpu_id()) else { return };
    slot.store(addr, SeqCst);
    hal.halt_if(&mut || {
        let wait = announce();
        if wait {
            HALTS.fetch_add(1, Relaxed);
        }
        wait
    });
    slot.store(0, SeqCst);
}

/// Wakes every CPU halted on the lock at `addr`. Reads only the slots,
/// never the lock: a released spinlock's memory may already be reused.
#[cold]
pub(crate) fn kick_halted(addr: usize) {
    let hal = hal::get();
    for (cpu, slot) in WAITING_ON.iter().enumerate() {
        if slot.load(SeqCst) == addr {
            KICKS.fetch_add(1, Relaxed);
            hal.kick(cpu);
        }
    }
}
