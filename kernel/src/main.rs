//! The bootable kernel.
//!
//! Modules by concern:
//!
//! * [`boot`]: the entry point and boot sequence, memory set-up, heap,
//!   command line, the boot self-checks;
//! * [`smp`], [`sched`], [`kstack`], [`rcu`], [`traps`], [`mmhal`], [`pgd`]:
//!   the running kernel (CPUs and their interrupts, tasks, kernel stacks,
//!   grace periods, trap policy, the memory manager's hardware interface,
//!   the kernel's page tables);
//! * [`uspace`], [`binfmt`]: user space (address spaces, threads, system
//!   calls, the page-fault glue) and loading the embedded user programs;
//! * [`diag`]: logging, the panic handler, fault statistics, the gdb block;
//! * [`test`](mod@test): the in-kernel test runner and the tests that belong to no
//!   single module;
//! * [`workload`]: what `mode=run` and `mode=bench` run (the fault storms).
#![no_std]
#![no_main]

extern crate alloc;

mod binfmt;
mod boot;
mod diag;
mod kstack;
mod mmhal;
mod pgd;
mod rcu;
mod sched;
mod smp;
mod test;
mod traps;
mod uspace;
mod workload;
