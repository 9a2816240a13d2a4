//! Ring-3 threads.

use alloc::boxed::Box;
use alloc::sync::Arc;

use arch::trap::TrapFrame;

use super::process::ThreadError;
use super::space::{AddressSpace, SpaceError};
use crate::sched::{self, Task};

/// Starts a ring-3 thread of `space` on `cpu`, running user program `program`
/// with two arguments (see `abi::program`). The thread joins the process
/// that owns `space`, or, if it has none that is alive (a space from
/// `AddressSpace::new`, or one whose process has exited), a new parentless
/// process; see `Process::spawn_thread` to choose.
pub fn spawn_user(
    space: &Arc<AddressSpace>,
    cpu: usize,
    program: usize,
    args: [u64; 2],
) -> Result<Arc<Task>, SpaceError> {
    Ok(sched::spawn(new_user_thread(space, cpu, program, args)?))
}

/// Creates the thread [`spawn_user`] would start, without starting it (a
/// test can then take memory away before it runs). Start it with
/// `sched::spawn`: it counts as a thread of its process from now on.
pub fn new_user_thread(
    space: &Arc<AddressSpace>,
    cpu: usize,
    program: usize,
    args: [u64; 2],
) -> Result<Arc<Task>, SpaceError> {
    loop {
        let process = space.process_for_new_thread(abi::program::name(program));
        match process.new_thread(cpu, program, args) {
            Ok(task) => return Ok(task),
            // It began to exit after we found it: the next look makes a
            // new process.
            Err(ThreadError::Exiting) => continue,
            Err(ThreadError::NoMemory) => return Err(SpaceError::NoMemory),
        }
    }
}

/// First code of a user thread, in its kernel task: leave for ring 3 with
/// the register state in the leaked `Box<TrapFrame>` at `arg` (a fresh
/// thread's start, or a forked child's copy of its parent's system call).
pub(super) extern "C" fn user_thread_entry(arg: usize) -> ! {
    // SAFETY: `Process::make_thread` passed a leaked Box<TrapFrame>, and
    // this task is its only user; we own it now. The frame is moved out of
    // a temporary Box, freed at the end of this statement: a Box bound to a
    // name would be freed at the end of the function, which never comes.
    let frame: TrapFrame = *unsafe { Box::from_raw(arg as *mut TrapFrame) };
    let kernel_top = sched::current().stack_top().expect("user thread without a kernel stack");
    arch::irq::disable();
    // Killed before it ever ran (module comment of `process`).
    super::process::exit_if_killed();
    // SAFETY: `kernel_top` is this task's own kernel stack, nothing on it is
    // needed any more (we never return), and the scheduler loaded this
    // thread's address space (which maps its code and stack) when it
    // switched in.
    unsafe { arch::syscall::enter_user(&frame, kernel_top) }
}
