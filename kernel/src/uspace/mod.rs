//! User space: processes, address spaces, ring-3 threads, system calls and
//! the page-fault glue between the trap layer and the memory manager.
//!
//! A [`Process`] owns an [`AddressSpace`] and its threads, and has a pid,
//! a parent (or none) and an exit status (see [`process`] for its life, how
//! all its threads are ended, and its locks). An `AddressSpace` is an
//! `mm::Mm` (page tables, VMAs, locks) plus what the kernel needs around it:
//! the barriers of the `barrier` system call, the entry point of its image.
//! Threads hold an `Arc` to their address space and to their process; the
//! process lets go of its space when its last thread exits, and the space
//! (everything the Mm owned) is freed once the exited threads' tasks are
//! gone.

mod fault;
pub mod process;
mod space;
mod syscall;
mod thread;

#[cfg(target_os = "none")]
mod process_tests;
#[cfg(target_os = "none")]
mod tests;

pub use fault::{KILLED, page_fault, user_exception};
pub use process::{Process, exit_if_killed};
pub use space::AddressSpace;
pub use thread::{new_user_thread, spawn_user};

/// Sets up the system-call entry on this CPU. Call on every CPU.
pub fn init_cpu() {
    arch::syscall::init(syscall::handle);
}
