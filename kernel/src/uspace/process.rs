//! Processes: an address space, the threads that run in it, a pid and an
//! exit status (Linux's thread group).
//!
//! # Life cycle
//!
//! A process is made by the kernel ([`Process::new`], parentless) or by
//! `fork` (a child of the forking thread's process, with a copy of its
//! address space and one thread). It counts its threads (`Inner::live`): a
//! thread is counted from the moment it is reserved, before its task exists,
//! to its exit. When the last one exits the process becomes a *zombie*: it
//! lets go of its address space (whose memory is freed once the exited
//! threads' tasks are gone, which the CPUs that ran them see to after their
//! next switch), keeps its exit status, and stays in the process table until
//! its parent `wait`s for it. A parentless zombie leaves the table at once;
//! the children of a process that exits become parentless (nobody will wait
//! for them: they leave the table when they exit).
//!
//! # Ending every thread (`exit_group`, a fatal fault, [`Process::kill`])
//!
//! Kernel code is never preempted (`crate::sched`), so a thread cannot be
//! stopped from the outside in the middle of a system call or a fault: it
//! must notice and exit itself, on its way back to ring 3. [`Process::kill`]
//! sets the process's `exiting` flag (once; the first exit status wins)
//! and then:
//!
//! * wakes the queues a thread of the process can sleep on in the kernel
//!   (the address space's `barrier` queue, the process's `wait` queue):
//!   every sleeper's condition includes `exiting`, so it returns and its
//!   system call ends;
//! * kicks every other CPU that runs one of its threads (a reschedule IPI).
//!
//! A thread checks the flag ([`exit_if_killed`]) on its ways back to user
//! mode, each time with interrupts disabled: at the end of every system
//! call, after every page fault it took in ring 3, at every timer tick and
//! reschedule IPI that interrupted ring 3 (after the tick's reschedule too,
//! for a thread that was preempted and runs again), and before a new thread
//! first enters ring 3. (Other interrupts and a ring-3 `int3` return
//! without the check; the kick or the next tick follows.) With interrupts
//! disabled between the check and the `iretq`, a kick that arrives after
//! the check is taken in ring 3, at once. A thread running in ring 3 is
//! interrupted by the kick (or, at the latest, by the next tick); a thread
//! in the kernel finishes what it is doing and exits on its way out; a
//! thread in a run queue exits when it runs next. So every thread of a
//! killed process ends within one system call, fault or tick of its own,
//! and the last one turns the process into a zombie with the group's exit
//! status.
//!
//! # Locks
//!
//! [`PROCESSES`] (the process table; every process's `parent`) is taken
//! before a process's `inner` lock, and only for the process tree: fork,
//! the last thread's exit, `wait`. `inner` (threads, live count, address
//! space) is a leaf, as are the wait queues' locks. `exiting` is set under
//! `inner`, so that a thread reserved after a kill is refused and a kill
//! sees every thread reserved before it.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use arch::trap::TrapFrame;
use spin::Mutex;

use super::space::{AddressSpace, SpaceError};
use crate::sched::{self, Task, WaitQueue};

/// Process identifier, unique for the life of the system (never reused).
pub type Pid = u64;

static NEXT_PID: AtomicU64 = AtomicU64::new(1);

/// Live `Process` objects (for leak tests).
pub static LIVE_PROCESSES: AtomicU64 = AtomicU64::new(0);

/// The process table: every process that has threads (or is being forked),
/// and every zombie whose parent has yet to `wait` for it. The lock also
/// protects every process's `parent`. (gdb's `procs` and `vmas PID` read it.)
pub static PROCESSES: Mutex<BTreeMap<Pid, Arc<Process>>> = Mutex::new(BTreeMap::new());

/// A process.
pub struct Process {
    pid: Pid,
    /// The name of its first thread's program (shown by gdb's `procs`).
    name: String,
    /// The parent's pid; 0 for none (made by the kernel, or orphaned).
    /// Written under [`PROCESSES`].
    parent: AtomicU64,
    /// Set once, under `inner`, when the process must end: its threads exit
    /// on their way back to user mode (module comment).
    exiting: AtomicBool,
    /// The exit status: set by the kill once `exiting`, else by the last
    /// thread's exit; final once `zombie`.
    status: AtomicI64,
    /// The last thread has exited.
    zombie: AtomicBool,
    inner: Mutex<Inner>,
    /// Woken when a child becomes a zombie, and when this process is killed
    /// (its threads in `wait` give up).
    child_wq: WaitQueue,
    /// Woken when this process becomes a zombie.
    exit_wq: WaitQueue,
}

/// The part of a process its `inner` lock protects.
struct Inner {
    /// The address space; `None` once the process is a zombie.
    space: Option<Arc<AddressSpace>>,
    /// Its threads (those not exited yet), for kills and gdb.
    threads: Vec<Weak<Task>>,
    /// Threads counted: reserved and not exited.
    live: usize,
}

/// Why a process did not take a new thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadError {
    /// The process is exiting or has exited.
    Exiting,
    /// Out of memory (the address space's stack, or the kernel task).
    NoMemory,
}

impl From<SpaceError> for ThreadError {
    fn from(_: SpaceError) -> Self {
        ThreadError::NoMemory
    }
}

impl Process {
    fn alloc(space: Arc<AddressSpace>, name: String, parent: Pid) -> Arc<Self> {
        LIVE_PROCESSES.fetch_add(1, Ordering::Relaxed);
        Arc::new(Self {
            pid: NEXT_PID.fetch_add(1, Ordering::Relaxed),
            name,
            parent: AtomicU64::new(parent),
            exiting: AtomicBool::new(false),
            status: AtomicI64::new(0),
            zombie: AtomicBool::new(false),
            inner: Mutex::new(Inner { space: Some(space), threads: Vec::new(), live: 0 }),
            child_wq: WaitQueue::new(),
            exit_wq: WaitQueue::new(),
        })
    }

    /// A parentless process owning `space` (with no threads yet: add them
    /// with [`Process::spawn_thread`]), entered in the process table.
    pub fn new(space: Arc<AddressSpace>, name: &str) -> Arc<Self> {
        let p = Self::new_unlinked(space.clone(), name);
        space.set_process(&p);
        p
    }

    /// [`Process::new`] without recording the process in the space (the
    /// caller does).
    pub(super) fn new_unlinked(space: Arc<AddressSpace>, name: &str) -> Arc<Self> {
        let p = Self::alloc(space, String::from(name), 0);
        PROCESSES.lock().insert(p.pid, p.clone());
        p
    }

    /// A new process with the user programs loaded (see
    /// [`AddressSpace::with_programs`]).
    pub fn with_programs(name: &str) -> Result<Arc<Self>, SpaceError> {
        Ok(Self::new(AddressSpace::with_programs()?, name))
    }

    /// The process ID.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The parent's pid (0: none).
    pub fn parent(&self) -> Pid {
        self.parent.load(Ordering::Relaxed)
    }

    /// Its address space, while it has one (not a zombie).
    pub fn space(&self) -> Option<Arc<AddressSpace>> {
        self.inner.lock().space.clone()
    }

    /// Whether it has been told to end.
    pub fn exiting(&self) -> bool {
        self.exiting.load(Ordering::Acquire)
    }

    /// Whether its last thread has exited.
    pub fn is_zombie(&self) -> bool {
        self.zombie.load(Ordering::Acquire)
    }

    /// Blocks until the process has exited (the kernel's own wait: no
    /// parent needed, nothing reaped); returns its exit status.
    pub fn wait_exit(&self) -> i64 {
        self.exit_wq.wait_until(|| self.is_zombie());
        self.status.load(Ordering::Relaxed)
    }

    /// Starts a ring-3 thread of this process on `cpu`, running user program
    /// `program` with two arguments (see `abi::program`).
    pub fn spawn_thread(
        self: &Arc<Self>,
        cpu: usize,
        program: usize,
        args: [u64; 2],
    ) -> Result<Arc<Task>, ThreadError> {
        Ok(sched::spawn(self.new_thread(cpu, program, args)?))
    }

    /// The thread [`Process::spawn_thread`] would start, not started yet
    /// (start it with `sched::spawn`; it counts as one of the process's
    /// threads from now on, so it must be started).
    pub fn new_thread(self: &Arc<Self>, cpu: usize, program: usize, args: [u64; 2]) -> Result<Arc<Task>, ThreadError> {
        let space = self.reserve()?;
        let frame = match space.map_stack() {
            Ok(stack_top) => arch::syscall::user_frame(space.entry(), stack_top, [program as u64, args[0], args[1]]),
            Err(e) => {
                self.unreserve();
                return Err(e.into());
            }
        };
        let name = alloc::format!("{}/{cpu}", abi::program::name(program));
        self.make_thread(name, cpu, space, frame)
    }

    /// Counts one more thread and returns the address space it will run
    /// in; refused once the process is exiting or has exited.
    fn reserve(&self) -> Result<Arc<AddressSpace>, ThreadError> {
        let mut inner = self.inner.lock();
        if self.exiting.load(Ordering::Relaxed) || self.is_zombie() {
            return Err(ThreadError::Exiting);
        }
        let space = inner.space.clone().ok_or(ThreadError::Exiting)?;
        inner.live += 1;
        Ok(space)
    }

    /// Undoes a [`Process::reserve`] whose thread was never made.
    fn unreserve(&self) {
        self.put_thread(None, 0);
    }

    /// Makes the kernel task of a reserved thread that enters ring 3 with
    /// `frame`.
    fn make_thread(
        self: &Arc<Self>,
        name: String,
        cpu: usize,
        space: Arc<AddressSpace>,
        frame: TrapFrame,
    ) -> Result<Arc<Task>, ThreadError> {
        let arg = alloc::boxed::Box::into_raw(alloc::boxed::Box::new(frame)) as usize;
        match Task::new_user(name, cpu, space, self.clone(), super::thread::user_thread_entry, arg) {
            Some(task) => {
                self.inner.lock().threads.push(Arc::downgrade(&task));
                Ok(task)
            }
            None => {
                // SAFETY: the task was not created, so nothing else owns
                // the leaked box at `arg`.
                drop(unsafe { alloc::boxed::Box::from_raw(arg as *mut TrapFrame) });
                self.unreserve();
                Err(ThreadError::NoMemory)
            }
        }
    }

    /// `fork` by the current thread (of this process, running in `space`,
    /// with the register state `frame` at its system call): a child process
    /// with a copy-on-write copy of `space` and one thread on this CPU that
    /// resumes in ring 3 as `frame` with RAX 0. Returns the child's pid.
    pub fn fork(
        self: &Arc<Self>,
        space: &AddressSpace,
        thread_name: &str,
        frame: &TrapFrame,
    ) -> Result<Pid, ForkError> {
        if self.exiting() {
            return Err(ForkError::Exiting);
        }
        let child_space = space.fork().map_err(|_| ForkError::NoMemory)?;
        let child = Self::alloc(child_space.clone(), self.name.clone(), self.pid);
        child_space.set_process(&child);
        let mut child_frame = frame.clone();
        child_frame.rax = 0;
        let reserved = child.reserve().expect("a new process takes threads");
        let task = child
            .make_thread(String::from(thread_name), arch::percpu::cpu_id(), reserved, child_frame)
            .map_err(|_| ForkError::NoMemory)?;
        // Into the table under our pid. We are a live thread of the parent,
        // so it is no zombie and its exit (which orphans its children under
        // this lock) comes after this.
        PROCESSES.lock().insert(child.pid, child.clone());
        sched::spawn(task);
        Ok(child.pid)
    }

    /// Ends every thread of the process; its exit status will be `code`
    /// (module comment). Returns `false` if it was already exiting or has
    /// exited (the first kill's status stands).
    pub fn kill(&self, code: i64) -> bool {
        let (threads, space) = {
            let mut inner = self.inner.lock();
            if self.exiting.load(Ordering::Relaxed) || self.is_zombie() {
                return false;
            }
            self.status.store(code, Ordering::Relaxed);
            self.exiting.store(true, Ordering::Release);
            if inner.live == 0 {
                // No thread to end it: it ends here.
                self.zombie.store(true, Ordering::Release);
                let space = inner.space.take();
                drop(inner);
                self.exited(space);
                return true;
            }
            let threads: Vec<Arc<Task>> = inner.threads.iter().filter_map(Weak::upgrade).collect();
            (threads, inner.space.clone())
        };
        // Sleepers in the kernel: their conditions include `exiting`.
        if let Some(space) = &space {
            space.wake_barrier_waiters();
        }
        self.child_wq.wake_all();
        // Threads in ring 3 elsewhere: the flag before the IPI.
        core::sync::atomic::fence(Ordering::SeqCst);
        let me = arch::percpu::cpu_id();
        let mut kicked = [false; arch::percpu::NR_CPUS];
        for t in &threads {
            let cpu = t.cpu();
            if cpu != me && !t.has_exited() && !kicked[cpu] {
                kicked[cpu] = true;
                sched::kick(cpu);
            }
        }
        true
    }

    /// A thread of this process is gone (`task`, or a reservation whose
    /// thread was never made): the last one turns the process into a zombie
    /// with status `code` (or the kill's), lets go of its address space,
    /// orphans its children and tells whoever waits.
    fn put_thread(&self, task: Option<&Task>, code: i64) {
        let space = {
            let mut inner = self.inner.lock();
            if let Some(task) = task {
                inner.threads.retain(|w| w.strong_count() > 0 && !core::ptr::eq(w.as_ptr(), task));
            }
            inner.live -= 1;
            if inner.live > 0 {
                return;
            }
            if !self.exiting.load(Ordering::Relaxed) {
                self.status.store(code, Ordering::Relaxed);
            }
            self.zombie.store(true, Ordering::Release);
            inner.space.take()
        };
        self.exited(space);
    }

    /// The rest of becoming a zombie (after `zombie` is set): lets go of the
    /// address space, wakes the kernel's waiters, orphans the children, and
    /// leaves the table or wakes the parent.
    fn exited(&self, space: Option<Arc<AddressSpace>>) {
        drop(space);
        self.exit_wq.wake_all();
        let mut reaped = Vec::new();
        let parent = {
            let mut table = PROCESSES.lock();
            let orphans: Vec<Pid> = table.values().filter(|p| p.parent() == self.pid).map(|p| p.pid).collect();
            for pid in orphans {
                let p = &table[&pid];
                p.parent.store(0, Ordering::Relaxed);
                if p.is_zombie() {
                    reaped.extend(table.remove(&pid));
                }
            }
            match table.get(&self.parent()) {
                Some(parent) if self.parent() != 0 => Some(parent.clone()),
                _ => {
                    reaped.extend(table.remove(&self.pid));
                    None
                }
            }
        };
        drop(reaped);
        if let Some(parent) = parent {
            parent.child_wq.wake_all();
        }
    }

    /// `wait(pid)` by a thread of this process: blocks until child `pid`
    /// has exited, reaps it and returns its status. `ECHILD` if `pid` is
    /// not a child of this process (or was already waited for), `Exiting`
    /// if this process is killed meanwhile.
    pub fn wait_child(&self, pid: Pid) -> Result<i64, WaitError> {
        loop {
            let child = {
                let mut table = PROCESSES.lock();
                let child = match table.get(&pid) {
                    Some(c) if pid != self.pid && c.parent() == self.pid => c.clone(),
                    _ => return Err(WaitError::NotAChild),
                };
                if child.is_zombie() {
                    table.remove(&pid);
                    drop(table);
                    return Ok(child.status.load(Ordering::Relaxed));
                }
                child
            };
            self.child_wq.wait_until(|| child.is_zombie() || self.exiting());
            if self.exiting() {
                return Err(WaitError::Exiting);
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        LIVE_PROCESSES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why `fork` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkError {
    /// The address space could not be copied, or the child's thread made.
    NoMemory,
    /// The forking process is being killed.
    Exiting,
}

/// Why `wait` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// No child of the caller has that pid (Linux `ECHILD`).
    NotAChild,
    /// The caller's process is being killed.
    Exiting,
}

/// The process with id `pid`, if it is in the process table.
pub fn find(pid: Pid) -> Option<Arc<Process>> {
    PROCESSES.lock().get(&pid).cloned()
}

/// The process the running task belongs to (`None` for a kernel task).
pub fn current() -> Option<Arc<Process>> {
    sched::with_current_process(|p| p.clone())
}

/// Ends the running user thread with `code` (the group's status instead if
/// its process is exiting): the process takes note (the last thread makes
/// it a zombie), then the task exits.
pub fn exit_thread(code: i64) -> ! {
    let me = sched::current();
    let code = match me.process() {
        Some(p) => {
            let code = if p.exiting() { p.status.load(Ordering::Relaxed) } else { code };
            p.put_thread(Some(&me), code);
            code
        }
        None => code,
    };
    drop(me);
    sched::exit_current(code)
}

/// `exit_group(code)`: ends every thread of the running thread's process
/// (the first kill's status stands), this one now.
pub fn exit_group(code: i64) -> ! {
    if let Some(p) = current() {
        p.kill(code);
    }
    exit_thread(code)
}

/// The check on every way back to user mode (module comment): if the
/// running thread's process is exiting, the thread exits here. Call with
/// interrupts disabled and no lock held.
pub fn exit_if_killed() {
    if sched::with_current_process(|p| p.exiting()) == Some(true) {
        exit_thread(0)
    }
}

/// Whether the running thread's process is exiting (sleepers' conditions).
pub fn current_exiting() -> bool {
    sched::with_current_process(|p| p.exiting()) == Some(true)
}
