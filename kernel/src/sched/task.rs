//! Tasks: kernel threads and (with an address space) user threads.

use alloc::string::String;
use alloc::sync::Arc;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};

use arch::context::Context;

use super::WaitQueue;
use crate::uspace::{AddressSpace, Process};

/// Task identifier, unique for the life of the system.
pub type Tid = u64;

static NEXT_TID: AtomicU64 = AtomicU64::new(1);
/// Live `Task` objects (for leak tests).
pub static LIVE_TASKS: AtomicU64 = AtomicU64::new(0);

/// Scheduling state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Created, or waiting in a run queue.
    Runnable = 0,
    /// On its CPU now.
    Running = 1,
    /// Waiting for [`super::wake`].
    Blocked = 2,
    /// Finished; kept until the last reference goes.
    Exited = 3,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => State::Runnable,
            1 => State::Running,
            2 => State::Blocked,
            _ => State::Exited,
        }
    }
}

use crate::kstack::KernelStack;
/// Live kernel stacks (for leak tests).
pub use crate::kstack::LIVE as LIVE_STACKS;

/// A thread of execution.
pub struct Task {
    tid: Tid,
    name: String,
    /// The CPU this task is pinned to.
    cpu: usize,
    state: AtomicU8,
    /// Saved registers while switched out. Only the task's own CPU touches
    /// it, with interrupts off (tasks never migrate).
    context: UnsafeCell<Context>,
    /// `None` for a CPU's boot context adopted as a task.
    stack: Option<KernelStack>,
    exit_code: AtomicI64,
    /// Woken when the task exits.
    exited: WaitQueue,
    /// The address space of a user thread (`None` for kernel tasks, which
    /// run on the kernel's own page tables).
    space: Option<Arc<AddressSpace>>,
    /// The process of a user thread (`None` for kernel tasks).
    process: Option<Arc<Process>>,
}

// SAFETY: `context` is accessed only by the task's own CPU with interrupts
// disabled (see the scheduler's module comment); all other fields are
// immutable or atomic.
unsafe impl Sync for Task {}
// SAFETY: moving a task to another CPU's hands (its `Arc` is dropped or
// queued anywhere) touches no CPU-local state: `context` is read and written
// only by the task's own CPU with interrupts disabled, whichever CPU holds
// the `Arc`, and all other fields are immutable, atomic or `Send`.
unsafe impl Send for Task {}

impl Task {
    fn alloc(
        name: String,
        cpu: usize,
        stack: Option<KernelStack>,
        context: Context,
        space: Option<Arc<AddressSpace>>,
        process: Option<Arc<Process>>,
    ) -> Arc<Self> {
        LIVE_TASKS.fetch_add(1, Ordering::Relaxed);
        Arc::new(Self {
            tid: NEXT_TID.fetch_add(1, Ordering::Relaxed),
            name,
            cpu,
            state: AtomicU8::new(State::Runnable as u8),
            context: UnsafeCell::new(context),
            stack,
            exit_code: AtomicI64::new(0),
            exited: WaitQueue::new(),
            space,
            process,
        })
    }

    /// Wraps the code already running on this CPU (its boot stack).
    pub(super) fn adopt_current(name: &str, cpu: usize) -> Arc<Self> {
        Self::alloc(String::from(name), cpu, None, Context::default(), None, None)
    }

    /// A kernel task that will run `entry(arg)` on `cpu` once spawned.
    /// `entry` must end with [`super::exit_current`]. `None` if out of memory.
    pub fn new_kernel(name: String, cpu: usize, entry: extern "C" fn(usize) -> !, arg: usize) -> Option<Arc<Self>> {
        Self::with_stack(name, cpu, entry, arg, None)
    }

    /// A user thread of `process`, in its address space `space`: starts
    /// like a kernel task running `entry` (which enters ring 3), and runs on
    /// `space`'s page tables.
    pub fn new_user(
        name: String,
        cpu: usize,
        space: Arc<AddressSpace>,
        process: Arc<Process>,
        entry: extern "C" fn(usize) -> !,
        arg: usize,
    ) -> Option<Arc<Self>> {
        Self::with_stack(name, cpu, entry, arg, Some((space, process)))
    }

    fn with_stack(
        name: String,
        cpu: usize,
        entry: extern "C" fn(usize) -> !,
        arg: usize,
        user: Option<(Arc<AddressSpace>, Arc<Process>)>,
    ) -> Option<Arc<Self>> {
        let stack = KernelStack::new()?;
        // The task's code starts below a slot the size of a trap frame at the
        // top of its stack: a user thread builds its first ring-3 frame
        // there (`arch::syscall::enter_user`) without overwriting its own
        // live Rust frames.
        let start = stack.top() - core::mem::size_of::<arch::trap::TrapFrame>() as u64;
        // SAFETY: the stack is fresh, aligned (the frame size is a multiple
        // of 16) and owned by the task.
        let ctx = unsafe { Context::new_thread(start, trampoline, [entry as *const () as usize, arg]) };
        let (space, process) = user.unzip();
        Some(Self::alloc(name, cpu, Some(stack), ctx, space, process))
    }

    /// The address space of a user thread, borrowed.
    pub fn space_ref(&self) -> Option<&AddressSpace> {
        self.space.as_deref()
    }

    /// The process of a user thread.
    pub fn process(&self) -> Option<&Arc<Process>> {
        self.process.as_ref()
    }

    /// Identifier.
    pub fn tid(&self) -> Tid {
        self.tid
    }

    /// Name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CPU it is pinned to.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Current state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(super) fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
    }

    pub(super) fn try_transition(&self, from: State, to: State) -> bool {
        self.state.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Top of the kernel stack (None for adopted boot contexts).
    pub fn stack_top(&self) -> Option<u64> {
        self.stack.as_ref().map(KernelStack::top)
    }

    pub(super) fn context_ptr(&self) -> *mut Context {
        self.context.get()
    }

    /// Marks the task as about to block (see `WaitQueue::wait_until`).
    pub(super) fn prepare_block(&self) {
        self.try_transition(State::Running, State::Blocked);
    }

    /// Undoes [`Self::prepare_block`] if nobody woke the task meanwhile.
    pub(super) fn cancel_block(&self) {
        self.try_transition(State::Blocked, State::Running);
    }

    /// Sets the hardware up for running this task after `prev`: its kernel
    /// stack for traps from ring 3, and its page tables. Kernel tasks run on
    /// the kernel's own PML4, so a finished address space is never left in
    /// CR3. The CPU leaves `prev`'s cpumask only after CR3 no longer points
    /// at it (the write flushed its translations), so a shoot-down never
    /// misses a CPU that may still cache them.
    pub(super) fn switch_in_hardware_state(&self, prev: &Task) {
        if let Some(top) = self.stack_top() {
            arch::gdt::set_kernel_stack(x86_64::VirtAddr::new(top));
        }
        match (&prev.space, &self.space) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => {}
            (old, new) => {
                match new {
                    Some(space) => space.activate(),
                    None => crate::pgd::load_kernel_cr3(),
                }
                if let Some(old) = old {
                    old.deactivate();
                }
            }
        }
    }

    pub(super) fn finish(&self, code: i64) {
        self.exit_code.store(code, Ordering::Release);
        self.set_state(State::Exited);
        self.exited.wake_all();
    }

    /// Whether the task has exited.
    pub fn has_exited(&self) -> bool {
        self.state() == State::Exited
    }

    /// Blocks until the task exits; returns its exit code.
    pub fn join(&self) -> i64 {
        self.exited.wait_until(|| self.has_exited());
        self.exit_code.load(Ordering::Acquire)
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        LIVE_TASKS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// First code a new kernel task runs: finish the switch that brought us here,
/// then call the real entry.
extern "C" fn trampoline(entry: usize, arg: usize) -> ! {
    super::task_entry_tail();
    arch::irq::enable();
    // SAFETY: `new_kernel` passed an `extern "C" fn(usize) -> !` as usize.
    let entry: extern "C" fn(usize) -> ! = unsafe { core::mem::transmute(entry) };
    entry(arg)
}
