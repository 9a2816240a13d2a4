//! The per-CPU scheduler.
//!
//! Design:
//! - Every task is *pinned* to one CPU for its whole life and each CPU has its
//!   own run queue, so the common path (yield, block, pick next) touches only
//!   the local queue's lock; other CPUs take it only to wake a task there.
//!   Because tasks never migrate, a task's saved context is written and read
//!   by one CPU only.
//! - Kernel code is not preempted: kernel tasks yield or block. A task running
//!   in ring 3 is preempted by the local-APIC timer tick.
//! - For the same reason no task is stopped from the outside. A process that
//!   must end (`exit_group`, a fatal fault) sets a flag that each of its
//!   threads checks on every way back to ring 3, including at the tick and
//!   at a reschedule IPI ([`kick`]) that interrupted ring 3; see
//!   `crate::uspace::process` for the protocol.
//! - A task that exits cannot free the stack it is running on: the CPU parks
//!   it as a "zombie" and the next task to run on that CPU drops it after the
//!   switch.
//!
//! Locks: `CpuSched::rq` protects one CPU's run queue (lock order: it is a leaf;
//! it is never held across a context switch). The task slots of `CpuSched`
//! (`current`, `idle`, `zombie`) are [`OwnerCell`]s: touched only by their
//! own CPU (through [`local`]) with interrupts disabled, which every access
//! proves with an [`IrqsOff`] guard.

pub mod task;
mod wait;

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arch::irq::IrqsOff;
use arch::percpu::NR_CPUS;
use spin::Mutex;
pub use task::{State, Task};
pub use wait::WaitQueue;

/// One CPU's scheduler state (cache-line aligned: no false sharing between
/// neighbouring CPUs' queues).
#[repr(align(64))]
struct CpuSched {
    /// Runnable tasks of this CPU, in FIFO order. Protected by the lock:
    /// the owner pops and re-queues, any CPU pushes a woken task.
    rq: Mutex<VecDeque<Arc<Task>>>,
    /// The running task.
    current: OwnerCell<Arc<Task>>,
    /// The task that runs when the queue is empty.
    idle: OwnerCell<Arc<Task>>,
    /// An exited task whose stack we left; dropped after the next switch.
    zombie: OwnerCell<Arc<Task>>,
    /// Whether `init_cpu` ran here.
    ready: AtomicBool,
    /// Context switches on this CPU.
    switches: AtomicUsize,
}

/// A slot of one CPU's scheduler state that only that CPU touches, with
/// interrupts off: no lock, and no reference into it ever leaves an access
/// (values go in and out whole), so accesses cannot overlap.
struct OwnerCell<T>(UnsafeCell<Option<T>>);

// SAFETY: an `OwnerCell` is reached only through its CPU's `local()` (the
// module never touches another CPU's cells), and every access takes an
// `IrqsOff`: interrupts are off on that CPU, so no interrupt handler and no
// other task runs there during the access, and no other CPU ever accesses
// the cell. The values are `Send` (`Arc<Task>`), so it does not matter which
// CPU dropped or created them.
unsafe impl<T: Send> Sync for OwnerCell<T> {}

impl<T: Clone> OwnerCell<T> {
    const fn new() -> Self {
        Self(UnsafeCell::new(None))
    }

    /// A copy of the value.
    fn get(&self, irqs: &IrqsOff) -> Option<T> {
        irqs.check();
        // SAFETY: only this CPU accesses the cell, with interrupts off
        // (`irqs`), and no reference into it outlives an access (see the
        // `Sync` impl): this shared borrow is the only one.
        unsafe { (*self.0.get()).clone() }
    }

    /// Stores `value` and returns the old one (the caller drops it, outside
    /// the access).
    fn replace(&self, irqs: &IrqsOff, value: Option<T>) -> Option<T> {
        irqs.check();
        // SAFETY: only this CPU accesses the cell, with interrupts off
        // (`irqs`), and no reference into it outlives an access (see the
        // `Sync` impl): this exclusive borrow is the only one.
        unsafe { core::mem::replace(&mut *self.0.get(), value) }
    }
}

impl<T> OwnerCell<Arc<T>> {
    /// The address of the value, without taking a reference: the caller
    /// argues why it stays valid.
    fn as_ptr(&self, irqs: &IrqsOff) -> Option<*const T> {
        irqs.check();
        // SAFETY: only this CPU accesses the cell, with interrupts off
        // (`irqs`), and no reference into it outlives an access (see the
        // `Sync` impl): this shared borrow is the only one.
        unsafe { (*self.0.get()).as_ref().map(Arc::as_ptr) }
    }
}

impl CpuSched {
    const fn new() -> Self {
        Self {
            rq: Mutex::new(VecDeque::new()),
            current: OwnerCell::new(),
            idle: OwnerCell::new(),
            zombie: OwnerCell::new(),
            ready: AtomicBool::new(false),
            switches: AtomicUsize::new(0),
        }
    }
}

static CPUS: [CpuSched; NR_CPUS] = [const { CpuSched::new() }; NR_CPUS];

/// Run-queue slots each CPU keeps allocated. A burst of tasks grows a queue
/// past it; the idle loop shrinks it back, so the heap a quiet kernel uses
/// does not creep up with each new high-water mark (the soak and the leak
/// checks compare it with a baseline: a queue that grew from 4 to 8 slots
/// read as a 32-byte leak).
pub(crate) const RQ_RESERVE: usize = 16;

/// How a CPU asks another to reschedule (`smp::kick`, a reschedule IPI,
/// registered at boot).
static KICK: spin::Once<fn(usize)> = spin::Once::new();

/// Registers how to make a remote CPU notice newly queued work.
pub fn set_kick(f: fn(usize)) {
    KICK.call_once(|| f);
}

fn local() -> &'static CpuSched {
    &CPUS[arch::percpu::cpu_id()]
}

/// Runs `f` on this CPU's private state with interrupts off.
fn with_local<R>(f: impl FnOnce(&'static CpuSched, &IrqsOff) -> R) -> R {
    let irqs = IrqsOff::save();
    f(local(), &irqs)
}

/// Makes the code running on this CPU a task (`name`), and creates the CPU's
/// idle task. Call once per CPU, from its boot context, before any other
/// scheduler call on that CPU.
pub fn init_cpu(name: &str) {
    with_local(|cs, irqs| {
        let cpu = arch::percpu::cpu_id();
        let boot = Task::adopt_current(name, cpu);
        let idle =
            Task::new_kernel(alloc::format!("idle/{cpu}"), cpu, idle_loop, 0).expect("no memory for the idle task");
        boot.set_state(State::Running);
        cs.rq.lock().reserve_exact(RQ_RESERVE);
        let old = (cs.current.replace(irqs, Some(boot)), cs.idle.replace(irqs, Some(idle)));
        drop(old);
        cs.ready.store(true, Ordering::Release);
    });
}

/// Whether the scheduler runs on `cpu`.
pub fn cpu_ready(cpu: usize) -> bool {
    CPUS[cpu].ready.load(Ordering::Acquire)
}

/// The running task.
pub fn current() -> Arc<Task> {
    with_local(|cs, irqs| cs.current.get(irqs)).expect("scheduler not initialised on this CPU")
}

/// Runs `f` on the running task's address space, if it is a user thread,
/// without taking a reference (Linux `current->mm`).
///
/// The threads of one process share the `Arc`: a clone and a drop per fault
/// would be two locked operations on one cache line that every CPU of a
/// fault storm writes.
pub fn with_current_space<R>(f: impl FnOnce(&crate::uspace::AddressSpace) -> R) -> Option<R> {
    let task: *const Task = with_local(|cs, irqs| cs.current.as_ptr(irqs))?;
    // SAFETY: `task` is the running task, which is executing this call. A
    // task is kept alive while it runs (by this CPU's `current`) and while it
    // is switched out (by whoever will resume it), and it cannot exit in the
    // middle of this call, so the pointer stays valid until `f` returns. Its
    // `space` is set at creation and never changed, and the `Arc` in it keeps
    // the address space alive as long as the task.
    let space = unsafe { &*task }.space_ref()?;
    Some(f(space))
}

/// Runs `f` on the running task's process, if it is a user thread, without
/// taking a reference (as [`with_current_space`]).
pub fn with_current_process<R>(f: impl FnOnce(&Arc<crate::uspace::Process>) -> R) -> Option<R> {
    let task: *const Task = with_local(|cs, irqs| cs.current.as_ptr(irqs))?;
    // SAFETY: `task` is the running task, which is executing this call. A
    // task is kept alive while it runs (by this CPU's `current`) and cannot
    // exit in the middle of this call, so the pointer stays valid until `f`
    // returns. Its `process` is set at creation and never changed, and the
    // `Arc` in it keeps the process alive as long as the task.
    let process = unsafe { &*task }.process()?;
    Some(f(process))
}

/// Gives back the slots a burst of tasks grew an empty run queue by, past
/// [`RQ_RESERVE`].
fn trim(rq: &mut VecDeque<Arc<Task>>) {
    if rq.is_empty() && rq.capacity() > RQ_RESERVE {
        rq.shrink_to(RQ_RESERVE);
    }
}

/// Trims this CPU's run queue as its idle loop does. For leak checks, which
/// compare the heap's usage before and after a burst of tasks on the CPU
/// they run on: that CPU may not pass through its idle loop with an empty
/// queue between the two readings (a joining task is woken straight into
/// its place), and its queue's spare slots would read as a leak, or as a
/// baseline the heap later falls below.
pub fn trim_run_queue() {
    let _irqs = IrqsOff::save();
    trim(&mut local().rq.lock());
}

/// The slots this CPU's run queue has allocated (tests).
pub(crate) fn run_queue_capacity() -> usize {
    let _irqs = IrqsOff::save();
    local().rq.lock().capacity()
}

extern "C" fn idle_loop(_: usize) -> ! {
    loop {
        // Idle is quiescent, and the time to free what waited for a grace
        // period (detached page tables).
        crate::rcu::quiescent();
        if let Some(phys) = mm::try_phys() {
            phys.rcu_reap();
        }
        arch::irq::disable();
        let has_work = {
            let mut rq = local().rq.lock();
            trim(&mut rq);
            !rq.is_empty()
        };
        if has_work {
            schedule();
            arch::irq::enable();
        } else {
            // `sti; hlt` is atomic with respect to interrupts: a wake-up IPI
            // that arrives after the check still ends the halt.
            x86_64::instructions::interrupts::enable_and_hlt();
        }
    }
}

/// Queues `task` on its CPU and makes that CPU notice.
fn enqueue(task: Arc<Task>) {
    let cpu = task.cpu();
    CPUS[cpu].rq.lock().push_back(task);
    if cpu != arch::percpu::cpu_id()
        && let Some(kick) = KICK.get()
    {
        kick(cpu);
    }
}

/// Makes `cpu` notice new work or a killed process (a reschedule IPI; no
/// effect on this CPU).
pub fn kick(cpu: usize) {
    if cpu != arch::percpu::cpu_id()
        && let Some(kick) = KICK.get()
    {
        kick(cpu);
    }
}

/// Starts a new task (already created, state Runnable).
pub fn spawn(task: Arc<Task>) -> Arc<Task> {
    assert!(cpu_ready(task.cpu()), "CPU {} has no scheduler", task.cpu());
    task.set_state(State::Runnable);
    enqueue(task.clone());
    task
}

/// Gives the CPU to the next runnable task on this CPU, if any.
pub fn yield_now() {
    schedule();
}

/// Wakes a task blocked in a [`WaitQueue`]; no effect on other states.
pub fn wake(task: &Arc<Task>) {
    if task.try_transition(State::Blocked, State::Runnable) {
        enqueue(task.clone());
    }
}

/// Second half of a block: the task already marked itself Blocked (and may
/// have been woken since, in which case it is queued and this is a yield).
pub(crate) fn block_prepared() {
    schedule();
}

/// Ends the running task with `code`. Its resources are released once this
/// CPU has switched away from its stack.
pub fn exit_current(code: i64) -> ! {
    let cur = current();
    arch::irq::disable();
    cur.finish(code);
    drop(cur);
    schedule();
    unreachable!("an exited task was scheduled again");
}

/// The core: picks the next task on this CPU and switches to it.
pub fn schedule() {
    // A context switch is a quiescent state: no read-side section spans it.
    crate::rcu::quiescent();
    // Interrupts come back on when this task returns from here, if they
    // were on when it came in.
    let irqs = IrqsOff::save();
    let cs = local();
    let prev = cs.current.get(&irqs).expect("schedule() before init_cpu");
    let idle = cs.idle.get(&irqs).expect("no idle task");
    // Exited tasks found in the queue: dropped after the lock is released.
    let mut stale: Vec<Arc<Task>> = Vec::new();
    let next = {
        let mut rq = cs.rq.lock();
        // A task can be queued while it still runs: a waker made it
        // Runnable between its `prepare_block` and its `cancel_block` (see
        // WaitQueue::wait_until). If it then exits, that entry is stale.
        let mut candidate = rq.pop_front();
        while candidate.as_ref().is_some_and(|t| t.state() == State::Exited) {
            stale.extend(candidate.take());
            candidate = rq.pop_front();
        }
        match candidate {
            Some(next) => {
                // A running task goes to the back of the queue; a blocked or
                // exited one does not (a woken one was queued by its waker).
                if prev.state() == State::Running && !Arc::ptr_eq(&prev, &idle) {
                    prev.set_state(State::Runnable);
                    rq.push_back(prev.clone());
                }
                next
            }
            None if prev.state() == State::Running => {
                drop(rq);
                drop(irqs);
                return;
            }
            None => idle.clone(),
        }
    };
    drop(stale);
    if Arc::ptr_eq(&prev, &next) {
        prev.set_state(State::Running);
        drop(irqs);
        return;
    }
    next.set_state(State::Running);
    next.switch_in_hardware_state(&prev);
    if prev.state() == State::Exited {
        drop(cs.zombie.replace(&irqs, Some(prev.clone())));
    }
    let prev_ctx = prev.context_ptr();
    let next_ctx = next.context_ptr();
    drop(cs.current.replace(&irqs, Some(next)));
    cs.switches.fetch_add(1, Ordering::Relaxed);
    // The Arcs in `current` and (for an exited prev) `zombie` keep both
    // contexts alive across the switch; our local clones must not, or an
    // exited task would never be freed.
    drop(prev);
    drop(idle);
    // SAFETY: interrupts are off; `next_ctx` belongs to a task pinned to this
    // CPU that is not running (it was queued or is the idle task), and
    // `prev_ctx` stays alive in `current`/`zombie` until it is resumed.
    unsafe { arch::context::switch(prev_ctx, next_ctx) };
    finish_switch(&irqs);
}

/// Runs after every switch, on the incoming task: frees the task we left if
/// it had exited.
fn finish_switch(irqs: &IrqsOff) {
    drop(local().zombie.replace(irqs, None));
}

/// First code of every new task (see `Task::new_kernel`), which the switch
/// entered with interrupts off.
pub(crate) fn task_entry_tail() {
    finish_switch(&IrqsOff::assert());
}

/// Called from the timer interrupt: preempts a task that was running in
/// ring 3. A user thread whose process is being killed exits here instead
/// of going back to ring 3 (before the switch, or when it runs again).
pub fn tick(from_user: bool) {
    if from_user {
        crate::uspace::exit_if_killed();
        schedule();
        crate::uspace::exit_if_killed();
    }
}

#[cfg(target_os = "none")]
mod tests;
