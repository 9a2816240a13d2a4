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
    /// Each turn also feeds the lockup watchdog, which times the wait.
    #[inline]
    fn spin_wait(&self, spins: u32) {
        arch::tlb::service_pending();
        crate::diag::watchdog::spinning(spins);
        core::hint::spin_loop();
    }

    /// A lock waiter halts only with interrupts on: the unlocker's kick is
    /// an IPI, and the timer tick ends any halt in any case.
    #[inline]
    fn can_halt(&self) -> bool {
        arch::irq::enabled()
    }

    fn halt_if(&self, announce: &mut dyn FnMut() -> bool) {
        // Interrupts off from the announcement to the halt: a kick sent
        // after the announcement stays pending, and `sti; hlt` (atomic with
        // respect to interrupts) takes it and ends the halt at once. With
        // interrupts on it could be taken before the `hlt`, which would
        // then sleep until the next timer tick.
        arch::irq::disable();
        if announce() {
            x86_64::instructions::interrupts::enable_and_hlt();
        } else {
            // Interrupts were on (`can_halt`).
            arch::irq::enable();
        }
    }

    /// The reschedule IPI: its handler does nothing a lock waiter minds.
    fn kick(&self, cpu: usize) {
        crate::smp::kick(cpu);
    }

    /// Marks this CPU as spinning on `class` for the sampling profiler.
    #[inline]
    fn lock_wait_begin(&self, class: mm::lock::LockClass) {
        crate::diag::profile::spin_begin(class);
    }

    #[inline]
    fn lock_wait_end(&self) {
        crate::diag::profile::spin_end();
    }

    fn synchronize_rcu(&self) {
        crate::rcu::synchronize();
    }

    fn synchronize_rcu_expedited(&self) {
        crate::rcu::synchronize_expedited();
    }

    /// The lockless walker's section: a TLB shoot-down IPI waits for it.
    fn local_irq_save(&self) -> bool {
        let was = arch::irq::enabled();
        arch::irq::disable();
        was
    }

    fn local_irq_restore(&self, enabled: bool) {
        if enabled {
            arch::irq::enable();
        }
    }

    fn get_state_synchronize_rcu(&self) -> u64 {
        crate::rcu::get_state()
    }

    fn poll_state_synchronize_rcu(&self, cookie: u64) -> bool {
        crate::rcu::poll_state(cookie)
    }

    /// Shoots down on the address space's CPUs (arch/src/tlb.rs), which is
    /// legal with interrupts off and page-table locks held. When page tables
    /// were freed the whole TLB goes: a full flush also drops the
    /// paging-structure caches for every address, on every vendor, whereas
    /// `invlpg` only guarantees that for the address it names on AMD.
    fn flush_tlb(&self, cpus: &mm::CpuBitmap, range: mm::FlushRange) {
        if cpus.is_empty() {
            return;
        }
        let mask: arch::cpumask::CpuMask = cpus.iter().collect();
        let range = if range.is_all() || range.freed_tables {
            arch::tlb::TlbRange::ALL
        } else {
            arch::tlb::TlbRange::range(
                x86_64::VirtAddr::new(range.start.as_u64()),
                x86_64::VirtAddr::new(range.end.as_u64()),
            )
        };
        arch::tlb::shootdown(&mask, range);
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

// The fault path's CPU number and RCU read side, bound at link time (no
// indirect call per use; mm/src/hal.rs says why).
mm::bind_hal!(HAL);

/// `cpu`'s lock-order records (the locks it holds, with where it took them,
/// and the one it is taking), for the lockup watchdog's report; `None` in
/// release builds, which keep none.
pub fn lockdep_of(cpu: usize) -> Option<&'static LockdepCpu> {
    (cfg!(debug_assertions) && cpu < NR_CPUS).then(|| &LOCKDEP[cpu])
}

// Per-CPU shards on both sides of the HAL index by the CPU number: the two
// crates must agree on how many there are (both take `abi::NR_CPUS`).
const _: () = assert!(arch::percpu::NR_CPUS == mm::config::NR_CPUS, "arch and mm disagree on NR_CPUS");

/// Registers the HAL. Call on the boot CPU before `mm::init`.
pub fn install() {
    assert!(mm::hal::set(&HAL), "mm HAL registered twice");
}

#[cfg(target_os = "none")]
mod tests {
    use core::sync::atomic::{AtomicU64, Ordering};

    use ktest::ktest;
    use mm::lock::{LockClass, LockLevel, RwSpinLock, SpinLock};

    use crate::sched::{self, Task};

    static LOCK: SpinLock<u64> = SpinLock::new(LockClass::Other, LockLevel::Untracked, 0);
    static RWLOCK: RwSpinLock<u64> = RwSpinLock::new(LockClass::Other, 0);
    static GOT: AtomicU64 = AtomicU64::new(0);

    extern "C" fn take_the_lock(_: usize) -> ! {
        // A kernel task runs with interrupts on: it may halt.
        let v = *LOCK.lock();
        GOT.store(v, Ordering::Release);
        sched::exit_current(0)
    }

    extern "C" fn read_the_rwlock(_: usize) -> ! {
        let v = *RWLOCK.read();
        GOT.store(v, Ordering::Release);
        sched::exit_current(0)
    }

    /// A task on another CPU waits, with `waiter`, for a lock that this CPU
    /// holds through `hold` (which stores its argument under the lock and
    /// returns the guard): once the waiter has halted, the guard drops. A
    /// timer tick may also end the halt before the unlock, which then has no
    /// one to kick (the waiter spins again), so this tries up to `ROUNDS`
    /// times and asks for a kick in one of them, and for the value stored
    /// under the lock in each.
    fn a_halted_waiter_is_kicked<G>(hold: impl Fn(u64) -> G, waiter: extern "C" fn(usize) -> !) {
        const ROUNDS: usize = 10;
        let Some(cpu) = arch::percpu::online_cpus().find(|&c| c != arch::percpu::cpu_id()) else {
            log::info!("one CPU: no second CPU to wait on the lock");
            return;
        };
        let mode = (mm::lock::virt_spinlocks(), mm::lock::halting_waiters());
        mm::lock::set_virt_spinlocks(true);
        mm::lock::set_halting_waiters(true);
        let (_, kicks) = mm::lock::halt_counts();
        let mut rounds = 0;
        while rounds < ROUNDS && mm::lock::halt_counts().1 == kicks {
            rounds += 1;
            GOT.store(0, Ordering::Release);
            let (halts, _) = mm::lock::halt_counts();
            let g = hold(7 + rounds as u64);
            let task = sched::spawn(Task::new_kernel("halt-waiter".into(), cpu, waiter, 0).expect("out of memory"));
            // The waiter's halt, however long the host takes to get there
            // (the run's timeout bounds it).
            while mm::lock::halt_counts().0 == halts {
                core::hint::spin_loop();
            }
            drop(g);
            assert_eq!(task.join(), 0);
            assert_eq!(
                GOT.load(Ordering::Acquire),
                7 + rounds as u64,
                "the waiter got the lock after the holder's update"
            );
        }
        let (_, kicks_now) = mm::lock::halt_counts();
        mm::lock::set_virt_spinlocks(mode.0);
        mm::lock::set_halting_waiters(mode.1);
        assert!(
            kicks_now > kicks,
            "in {rounds} rounds the unlock kicked no halted waiter ({kicks} kicks before, {kicks_now} after)"
        );
    }

    /// The entries `bind_hal!` binds at link time are this kernel's: on
    /// every CPU, `mm`'s CPU number is the CPU's own, and `mm`'s read-side
    /// section is the kernel's RCU reader (a grace period would wait for it).
    #[ktest]
    fn mm_sees_the_bound_cpu_number_and_rcu_reader_on_every_cpu() {
        let cpus = AtomicU64::new(0);
        arch::ipi::on_each_cpu(|| {
            let cpu = arch::percpu::cpu_id();
            assert_eq!(mm::hal::cpu_id(), cpu, "mm's CPU number on CPU {cpu}");
            assert!(!crate::rcu::in_read_section(), "CPU {cpu} starts inside a read-side section");
            mm::hal::rcu_read_lock();
            let inside = crate::rcu::in_read_section();
            mm::hal::rcu_read_unlock();
            assert!(inside, "mm's rcu_read_lock did not enter the kernel's read-side section on CPU {cpu}");
            assert!(!crate::rcu::in_read_section(), "mm's rcu_read_unlock did not leave it on CPU {cpu}");
            cpus.fetch_or(1 << cpu, Ordering::Relaxed);
        });
        let online = arch::percpu::online_cpus().fold(0u64, |m, c| m | 1 << c);
        assert_eq!(cpus.load(Ordering::Relaxed), online, "not every CPU ran the check");
    }

    /// Halting waiters (mm/src/lock/halt.rs): a test-and-set waiter with
    /// interrupts on that spins past `HALT_AFTER_CYCLES` halts its CPU, and
    /// the unlock kicks it awake (without the kick only the timer would
    /// wake it, and the kick count would not move).
    #[ktest]
    fn a_halted_lock_waiter_is_kicked_by_the_unlock() {
        a_halted_waiter_is_kicked(
            |v| {
                let mut g = LOCK.lock();
                *g = v;
                g
            },
            take_the_lock,
        );
    }

    /// The same for `mmap_lock`'s kind of lock: a reader that waits for a
    /// writer halts, and the writer's release kicks it.
    #[ktest]
    fn a_halted_mmap_lock_reader_is_kicked_by_the_writer() {
        a_halted_waiter_is_kicked(
            |v| {
                let mut g = RWLOCK.write();
                *g = v;
                g
            },
            read_the_rwlock,
        );
    }
}
