//! User space: address spaces, ring-3 threads, system calls and the
//! page-fault glue between the trap layer and the memory manager.
//!
//! An [`AddressSpace`] is an `mm::Mm` (page tables, VMAs, locks) plus what
//! the kernel needs around it: the threads that share it and the barriers of
//! the `barrier` system call. Threads hold an `Arc` to it; the last thread to
//! exit drops it, which unmaps and frees everything the Mm owned.

mod fault;
mod space;
mod syscall;
mod thread;

#[cfg(target_os = "none")]
mod tests;

pub use fault::{KILLED, page_fault, user_exception};
pub use space::AddressSpace;
pub use thread::{new_user_thread, spawn_user};

/// Sets up the system-call entry on this CPU. Call on every CPU.
pub fn init_cpu() {
    arch::syscall::init(syscall::handle);
}
