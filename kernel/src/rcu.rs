//! RCU for page-table walkers: read-side sections cost two plain stores,
//! grace periods are detected from quiescent states.
//!
//! # Readers
//!
//! A read-side section (`pte_offset_map` ... `pte_unmap`, a fault under its
//! VMA lock, the lockless user-page walker) raises this CPU's nesting
//! depth and lowers it again: plain loads and stores, no locked
//! instruction, because only this CPU writes its depth (an interrupt that
//! nests a section restores it before the interrupted code resumes). Kernel
//! code is not preempted and never switches tasks inside a section.
//!
//! # Quiescent states and grace periods
//!
//! A CPU is *quiescent* where it is outside every section: at a timer tick
//! or reschedule IPI that interrupted depth 0, in the idle loop, at a
//! context switch, on the way back to user mode, and when it leaves its
//! outermost section while a grace period is waiting. A grace period is
//! numbered by `GP_SEQ` (odd while one runs): it starts when someone asked
//! for one ([`get_state`]), and it ends once every online CPU has reported a
//! quiescent state after its start. An updater that detached an object
//! takes a cookie with [`get_state`] and frees the object once
//! [`poll_state`] says the cookie's grace period is over (mm's per-CPU
//! batches of detached page tables), or waits for it ([`synchronize`]).
//!
//! # Ordering (the Rust memory model, not only x86's)
//!
//! Two guarantees, each a chain the code's fences build:
//!
//! 1. *A section that starts after its CPU reported a quiescent state for
//!    grace period g sees every detach that happened before g's cookie was
//!    taken.* The updater detaches, then runs a `SeqCst` fence and a
//!    `SeqCst` load of `GP_SEQ` (seeing g not yet started); g's start is a
//!    `SeqCst` read-modify-write of `GP_SEQ` after that load; the reporting
//!    CPU loads `GP_SEQ` (`SeqCst`, seeing g) and then runs a `SeqCst`
//!    fence before its next section. The two fences are then ordered in the
//!    single total order of `SeqCst` operations, which makes the detach
//!    visible to every load after the reader's fence.
//! 2. *A section that ended before its CPU's report happens before the
//!    free.* The report is a release store after the section, the CPU that
//!    completes g acquires every report before its release of `GP_SEQ`, and
//!    [`poll_state`] acquires `GP_SEQ`: a happens-before chain from the
//!    section's last read to the free.
//!
//! Waiting ([`synchronize`]) keeps interrupts as the caller had them and
//! answers TLB shoot-downs while it spins: a reader it waits for may be
//! waiting for this CPU's acknowledgement.

use core::sync::atomic::{AtomicU64, Ordering, compiler_fence, fence};

use arch::percpu::NR_CPUS;

/// One CPU's state, alone on its cache line: every fault enters and leaves
/// read-side sections, and a line shared by neighbouring CPUs would bounce
/// between them on each one.
#[repr(align(64))]
struct RcuCpu {
    /// Nesting depth of read-side sections on this CPU (written by it only).
    depth: AtomicU64,
    /// The grace period (odd `GP_SEQ` value) this CPU last reported a
    /// quiescent state for.
    qs_seq: AtomicU64,
}

static CPUS: [RcuCpu; NR_CPUS] = [const { RcuCpu { depth: AtomicU64::new(0), qs_seq: AtomicU64::new(0) } }; NR_CPUS];

/// Grace-period sequence: `2 * completed`, plus 1 while one runs.
static GP_SEQ: AtomicU64 = AtomicU64::new(0);
/// The highest cookie anybody asked for: a grace period starts while
/// `GP_SEQ` is below it.
static GP_WANTED: AtomicU64 = AtomicU64::new(0);
/// Expedited grace periods (statistics).
static EXPEDITED: AtomicU64 = AtomicU64::new(0);

/// Enters a read-side critical section on this CPU (nests). The caller must
/// not switch tasks until the matching [`read_unlock`]; interrupts stay as
/// they are.
#[inline]
pub fn read_lock() {
    let cpu = &CPUS[arch::percpu::cpu_id()];
    cpu.depth.store(cpu.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    // The section's loads stay after the store (an interrupt in between
    // sees depth 1 and reports nothing).
    compiler_fence(Ordering::SeqCst);
}

/// Leaves a read-side critical section. Leaving the outermost one while a
/// grace period waits reports a quiescent state at once.
#[inline]
pub fn read_unlock() {
    compiler_fence(Ordering::SeqCst);
    let me = arch::percpu::cpu_id();
    let cpu = &CPUS[me];
    let depth = cpu.depth.load(Ordering::Relaxed);
    assert!(depth > 0, "rcu read_unlock without read_lock");
    cpu.depth.store(depth - 1, Ordering::Relaxed);
    if depth == 1 && GP_SEQ.load(Ordering::Relaxed) & 1 == 1 {
        note_qs(me);
    }
}

/// Whether this CPU is inside a read-side section.
pub fn in_read_section() -> bool {
    CPUS[arch::percpu::cpu_id()].depth.load(Ordering::Relaxed) != 0
}

/// Reports a quiescent state for the running grace period, if any, from a
/// point where this CPU (`me`) is outside every section, and completes the
/// period if this was the last CPU it waited for.
fn note_qs(me: usize) {
    let g = GP_SEQ.load(Ordering::SeqCst);
    if g & 1 == 0 || CPUS[me].qs_seq.load(Ordering::Relaxed) == g {
        return;
    }
    // Guarantee 2: every section before this point, before the report;
    // guarantee 1: every section after it, after the load of `g` above.
    fence(Ordering::SeqCst);
    CPUS[me].qs_seq.store(g, Ordering::Release);
    try_complete(g);
}

/// Ends grace period `g` if every online CPU has reported for it.
fn try_complete(g: u64) {
    if arch::percpu::online_cpus().all(|c| CPUS[c].qs_seq.load(Ordering::Acquire) == g) {
        // Several CPUs may see it complete; one moves the sequence on.
        let _ = GP_SEQ.compare_exchange(g, g + 1, Ordering::SeqCst, Ordering::Relaxed);
    }
}

/// Starts a grace period if one was asked for and none runs.
fn start_if_wanted() {
    let g = GP_SEQ.load(Ordering::SeqCst);
    if g & 1 == 0 && g < GP_WANTED.load(Ordering::Relaxed) {
        let _ = GP_SEQ.compare_exchange(g, g + 1, Ordering::SeqCst, Ordering::Relaxed);
    }
}

/// The quiescent-state hook of a timer tick or reschedule IPI on this CPU:
/// `from_user` or an interrupted depth of 0 means the CPU was quiescent.
/// Also moves grace periods along (starts a wanted one, completes a
/// finished one). Runs in interrupt context: never frees anything.
pub fn on_interrupt(from_user: bool) {
    let me = arch::percpu::cpu_id();
    start_if_wanted();
    if from_user || CPUS[me].depth.load(Ordering::Relaxed) == 0 {
        note_qs(me);
    } else {
        let g = GP_SEQ.load(Ordering::SeqCst);
        if g & 1 == 1 {
            try_complete(g);
        }
    }
}

/// The quiescent-state hook of a context switch, the idle loop and the
/// return to user mode: this CPU is outside every section here.
#[inline]
pub fn quiescent() {
    let me = arch::percpu::cpu_id();
    debug_assert_eq!(CPUS[me].depth.load(Ordering::Relaxed), 0, "quiescent point inside an RCU section");
    if GP_SEQ.load(Ordering::Relaxed) & 1 == 1 {
        note_qs(me);
    }
}

/// Linux `get_state_synchronize_rcu` + `start_poll_synchronize_rcu`: a
/// cookie that [`poll_state`] reports complete once a grace period that
/// started after this call has ended, and a request that one starts.
pub fn get_state() -> u64 {
    // Guarantee 1: the caller's detach before the load of `GP_SEQ`.
    fence(Ordering::SeqCst);
    let g = GP_SEQ.load(Ordering::SeqCst);
    // A period under way may have started before the detach: the next one
    // must end (Linux `rcu_seq_snap`).
    let cookie = (g + 3) & !1;
    GP_WANTED.fetch_max(cookie, Ordering::Relaxed);
    cookie
}

/// Linux `poll_state_synchronize_rcu`.
pub fn poll_state(cookie: u64) -> bool {
    GP_SEQ.load(Ordering::Acquire) >= cookie
}

/// Waits until every read-side section that was running on another CPU when
/// this was called has ended. Must not be called inside a section. Grace
/// periods normally end within a tick of every CPU; `expedite` makes the
/// other CPUs report at once with a reschedule IPI.
fn wait(expedite: bool) {
    let me = arch::percpu::cpu_id();
    assert!(!in_read_section(), "synchronize() inside an RCU read-side section would deadlock");
    let cookie = get_state();
    let mut spins = 0u64;
    while !poll_state(cookie) {
        start_if_wanted();
        note_qs(me);
        let g = GP_SEQ.load(Ordering::SeqCst);
        if g & 1 == 1 {
            try_complete(g);
            if expedite && spins.is_multiple_of(1 << 12) {
                for c in arch::percpu::online_cpus() {
                    if c != me && CPUS[c].qs_seq.load(Ordering::Relaxed) != g {
                        crate::smp::kick(c);
                    }
                }
            }
        }
        // A CPU we wait for may itself wait for our TLB acknowledgement.
        arch::tlb::service_pending();
        core::hint::spin_loop();
        spins += 1;
    }
}

/// Linux `synchronize_rcu`.
pub fn synchronize() {
    wait(false);
}

/// Linux `synchronize_rcu_expedited`: as [`synchronize`], pushing the other
/// CPUs with reschedule IPIs instead of waiting for their ticks.
pub fn synchronize_expedited() {
    EXPEDITED.fetch_add(1, Ordering::Relaxed);
    wait(true);
}

/// Grace periods completed since boot.
pub fn grace_periods() -> u64 {
    GP_SEQ.load(Ordering::Relaxed) / 2
}

/// Expedited grace periods asked for since boot.
pub fn expedited() -> u64 {
    EXPEDITED.load(Ordering::Relaxed)
}

#[cfg(target_os = "none")]
mod tests {
    use core::sync::atomic::AtomicU64;
    use core::sync::atomic::Ordering::SeqCst;

    use ktest::ktest;

    use crate::sched;

    /// 0: start, 1: reader inside, 2: reader may leave, 3: reader left.
    static STAGE: AtomicU64 = AtomicU64::new(0);

    extern "C" fn reader(_: usize) -> ! {
        super::read_lock();
        STAGE.store(1, SeqCst);
        while STAGE.load(SeqCst) != 2 {
            core::hint::spin_loop();
        }
        // Linger inside the section: a synchronize that does not wait for
        // us returns during this delay and sees stage 2, not 3.
        arch::time::delay_us(20_000);
        STAGE.store(3, SeqCst);
        super::read_unlock();
        sched::exit_current(0)
    }

    /// `synchronize` waits for a read-side section that began before it on
    /// another CPU, and returns only once that section has ended.
    #[ktest]
    fn synchronize_waits_for_a_reader_on_another_cpu() {
        let Some(other) = arch::percpu::online_cpus().find(|&c| c != arch::percpu::cpu_id()) else {
            return; // One CPU: there is no other reader to wait for.
        };
        STAGE.store(0, SeqCst);
        let t = sched::spawn(sched::Task::new_kernel("rcu-reader".into(), other, reader, 0).unwrap());
        while STAGE.load(SeqCst) != 1 {
            core::hint::spin_loop();
        }
        let before = super::grace_periods();
        STAGE.store(2, SeqCst);
        super::synchronize();
        assert_eq!(STAGE.load(SeqCst), 3, "synchronize returned while the reader was still inside");
        assert!(super::grace_periods() > before);
        assert_eq!(t.join(), 0);
    }

    /// A polled grace period (what mm's batches of detached tables wait
    /// for) does not end while a reader that was inside when the cookie was
    /// taken stays inside, and ends without anybody waiting for it once the
    /// reader leaves: the other CPUs' ticks and idle loops report their
    /// quiescent states.
    #[ktest]
    fn a_polled_grace_period_waits_for_a_reader_and_ends_on_its_own() {
        let Some(other) = arch::percpu::online_cpus().find(|&c| c != arch::percpu::cpu_id()) else {
            return;
        };
        STAGE.store(0, SeqCst);
        let t = sched::spawn(sched::Task::new_kernel("rcu-reader".into(), other, reader, 0).unwrap());
        while STAGE.load(SeqCst) != 1 {
            core::hint::spin_loop();
        }
        let cookie = super::get_state();
        // Several ticks of every CPU: the period cannot end with the reader inside.
        arch::time::delay_us(100_000);
        assert!(!super::poll_state(cookie), "a grace period ended while a reader was inside");
        STAGE.store(2, SeqCst);
        assert_eq!(t.join(), 0);
        // Nobody calls synchronize: ticks (this CPU's too: interrupts are on)
        // and idle loops end the period.
        assert!(arch::irq::enabled());
        while !super::poll_state(cookie) {
            core::hint::spin_loop();
        }
    }

    /// `synchronize_expedited` waits for the reader too, and kicks the other
    /// CPUs instead of waiting for their ticks.
    #[ktest]
    fn expedited_grace_period_waits_for_a_reader() {
        let Some(other) = arch::percpu::online_cpus().find(|&c| c != arch::percpu::cpu_id()) else {
            return;
        };
        STAGE.store(0, SeqCst);
        let t = sched::spawn(sched::Task::new_kernel("rcu-reader".into(), other, reader, 0).unwrap());
        while STAGE.load(SeqCst) != 1 {
            core::hint::spin_loop();
        }
        let before = super::expedited();
        STAGE.store(2, SeqCst);
        super::synchronize_expedited();
        assert_eq!(STAGE.load(SeqCst), 3, "synchronize_expedited returned while the reader was still inside");
        assert_eq!(super::expedited(), before + 1);
        assert_eq!(t.join(), 0);
    }
}
