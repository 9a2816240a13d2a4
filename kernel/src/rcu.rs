//! A minimal RCU for page-table walkers.
//!
//! Readers (`pte_offset_map` ... `pte_unmap`, through the mm HAL) mark their
//! CPU as inside a read-side critical section; they never sleep or switch
//! tasks inside one. [`synchronize`] returns once every reader that might have
//! seen a pointer published before the call has left its section, after
//! which a detached page table may be freed (DESIGN.md section 6).
//!
//! Per CPU there is a nesting depth and a generation number; leaving the
//! outermost section bumps the generation. `synchronize` snapshots both for
//! every CPU and waits, for each CPU that was inside a section, until its
//! generation moves. A full barrier on each side (the writer's fence after
//! its detach, the reader's `swap` on entering its outermost section) orders
//! the writer's detach before its snapshot and the reader's "inside" before
//! its first table read, so a reader that the snapshot saw outside a section
//! cannot reach the detached table; one that it saw inside is waited for.

use core::sync::atomic::{AtomicU64, Ordering};

use arch::percpu::NR_CPUS;

/// One CPU's state, alone on its cache line: every fault enters and leaves
/// read-side sections, and a line shared by neighbouring CPUs would bounce
/// between them on each one.
#[repr(align(64))]
struct RcuCpu {
    /// Nesting depth of read-side sections on this CPU.
    depth: AtomicU64,
    /// Bumped each time the outermost section ends.
    generation: AtomicU64,
}

static CPUS: [RcuCpu; NR_CPUS] =
    [const { RcuCpu { depth: AtomicU64::new(0), generation: AtomicU64::new(0) } }; NR_CPUS];

/// Grace periods completed (statistics).
static GRACE_PERIODS: AtomicU64 = AtomicU64::new(0);
/// Grace periods started, numbered from 1: a polled cookie names the first
/// one that starts after it was taken.
static GP_STARTED: AtomicU64 = AtomicU64::new(0);
/// The highest-numbered grace period completed. A later-started one covers
/// everything an earlier one does, so the maximum is what polls compare.
static GP_DONE: AtomicU64 = AtomicU64::new(0);

/// Linux `get_state_synchronize_rcu`: a cookie that [`poll_state`] reports
/// complete once a grace period that started after this call has ended.
pub fn get_state() -> u64 {
    GP_STARTED.load(Ordering::SeqCst) + 1
}

/// Linux `poll_state_synchronize_rcu`.
pub fn poll_state(cookie: u64) -> bool {
    GP_DONE.load(Ordering::SeqCst) >= cookie
}

/// Enters a read-side critical section on this CPU (nests). The caller must
/// not switch tasks until the matching [`read_unlock`]; interrupts stay as
/// they are (the page-fault path runs with them off).
///
/// Only this CPU writes its own counters (an interrupt handler that nests a
/// section restores them before we resume), so only the outermost entry
/// needs a locked instruction: the full barrier of its `swap` orders "inside"
/// before the section's first table read, against the fence `synchronize`
/// puts between its detach and its snapshot. Everything else is plain loads
/// and stores: this runs several times per fault.
pub fn read_lock() {
    let cpu = &CPUS[arch::percpu::cpu_id()];
    let depth = cpu.depth.load(Ordering::Relaxed);
    if depth == 0 {
        cpu.depth.swap(1, Ordering::SeqCst);
    } else {
        cpu.depth.store(depth + 1, Ordering::Relaxed);
    }
}

/// Leaves a read-side critical section.
pub fn read_unlock() {
    let cpu = &CPUS[arch::percpu::cpu_id()];
    let depth = cpu.depth.load(Ordering::Relaxed);
    assert!(depth > 0, "rcu read_unlock without read_lock");
    // Release: the section's table reads happen before anything a
    // `synchronize` that sees the new depth or generation does next.
    cpu.depth.store(depth - 1, Ordering::Release);
    if depth == 1 {
        let generation = cpu.generation.load(Ordering::Relaxed);
        cpu.generation.store(generation + 1, Ordering::Release);
    }
}

/// Whether this CPU is inside a read-side section.
pub fn in_read_section() -> bool {
    CPUS[arch::percpu::cpu_id()].depth.load(Ordering::SeqCst) != 0
}

/// Waits until every read-side section that was running on another CPU when
/// this was called has ended. Must not be called inside a section.
pub fn synchronize() {
    let me = arch::percpu::cpu_id();
    assert!(!in_read_section(), "synchronize() inside an RCU read-side section would deadlock");
    // The caller's detach (a store) before the snapshot's loads: the other
    // half of the handshake with `read_lock`'s swap.
    core::sync::atomic::fence(Ordering::SeqCst);
    let id = GP_STARTED.fetch_add(1, Ordering::SeqCst) + 1;
    let mut snapshot = [(0u64, 0u64); NR_CPUS];
    for (cpu, snap) in snapshot.iter_mut().enumerate() {
        *snap = (CPUS[cpu].depth.load(Ordering::SeqCst), CPUS[cpu].generation.load(Ordering::SeqCst));
    }
    for (cpu, &(depth, generation)) in snapshot.iter().enumerate() {
        if cpu == me || depth == 0 {
            continue;
        }
        while CPUS[cpu].generation.load(Ordering::SeqCst) == generation {
            core::hint::spin_loop();
        }
    }
    GRACE_PERIODS.fetch_add(1, Ordering::Relaxed);
    GP_DONE.fetch_max(id, Ordering::SeqCst);
}

/// Grace periods completed since boot.
pub fn grace_periods() -> u64 {
    GRACE_PERIODS.load(Ordering::Relaxed)
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
        assert_eq!(super::grace_periods(), before + 1);
        assert_eq!(t.join(), 0);
    }
}
