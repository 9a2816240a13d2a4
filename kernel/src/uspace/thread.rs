//! Ring-3 threads.

use alloc::boxed::Box;
use alloc::sync::Arc;

use super::space::{AddressSpace, SpaceError};
use crate::sched::{self, Task};

/// Where and how a user thread starts.
struct UserStart {
    entry: u64,
    stack_top: u64,
    args: [u64; 3],
}

/// Starts a ring-3 thread of `space` on `cpu`, running user program `program`
/// with two arguments (see `abi::program`).
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
/// `sched::spawn`.
pub fn new_user_thread(
    space: &Arc<AddressSpace>,
    cpu: usize,
    program: usize,
    args: [u64; 2],
) -> Result<Arc<Task>, SpaceError> {
    let stack_top = space.map_stack()?;
    let start = Box::new(UserStart { entry: space.entry(), stack_top, args: [program as u64, args[0], args[1]] });
    let name = alloc::format!("{}/{cpu}", abi::program::name(program));
    let arg = Box::into_raw(start) as usize;
    match Task::new_user(name, cpu, space.clone(), user_thread_entry, arg) {
        Some(task) => Ok(task),
        None => {
            // SAFETY: the task was not created, so nothing else owns `arg`.
            drop(unsafe { Box::from_raw(arg as *mut UserStart) });
            Err(SpaceError::NoMemory)
        }
    }
}

/// First code of a user thread, in its kernel task: leave for ring 3.
extern "C" fn user_thread_entry(arg: usize) -> ! {
    // SAFETY: `spawn_user` passed a leaked Box<UserStart>; we own it now.
    let start = unsafe { Box::from_raw(arg as *mut UserStart) };
    let frame = arch::syscall::user_frame(start.entry, start.stack_top, start.args);
    let kernel_top = sched::current().stack_top().expect("user thread without a kernel stack");
    drop(start);
    arch::irq::disable();
    // SAFETY: `kernel_top` is this task's own kernel stack, nothing on it is
    // needed any more (we never return), and the scheduler loaded this
    // thread's address space (which maps entry and stack) when it switched in.
    unsafe { arch::syscall::enter_user(&frame, kernel_top) }
}
