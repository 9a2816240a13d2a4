//! Ring-3 tests: user threads of one address space on every CPU, system
//! calls, bad accesses that must kill only the offender, and churn that must
//! leak nothing.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use abi::program;
use ktest::ktest;
use mm::{MapFlags, Prot, VirtAddr};

use super::space::LIVE_SPACES;
use super::*;
use crate::sched::task::{LIVE_STACKS, LIVE_TASKS};

fn cpus() -> Vec<usize> {
    arch::percpu::online_cpus().collect()
}

/// One user thread per CPU, all in one address space: each makes a thousand
/// system calls, checks its tid and CPU stay put, and exits with its CPU.
#[ktest]
fn user_threads_on_every_cpu_report_their_cpu() {
    let space = AddressSpace::with_programs().expect("address space");
    let threads: Vec<_> = cpus()
        .into_iter()
        .map(|cpu| (cpu, spawn_user(&space, cpu, program::REPORT_CPU, [1000, 0]).expect("spawn")))
        .collect();
    for (cpu, t) in threads {
        assert_eq!(t.join(), cpu as i64, "thread pinned to CPU {cpu} reported another CPU (or failed)");
    }
}

/// Two user threads that `yield` in a loop on the same CPU alternate.
#[ktest]
fn yielding_user_threads_interleave() {
    let space = AddressSpace::with_programs().expect("address space");
    space
        .mm
        .mmap(Some(VirtAddr::new(abi::TRACE_ADDR)), 4096, Prot::READ | Prot::WRITE, MapFlags::FIXED)
        .expect("trace page");
    let cpu = *cpus().last().unwrap();
    let a = spawn_user(&space, cpu, program::YIELD_TRACE, [40, 1]).unwrap();
    let b = spawn_user(&space, cpu, program::YIELD_TRACE, [40, 2]).unwrap();
    assert_eq!(a.join(), 0);
    assert_eq!(b.join(), 0);
    let mut trace = [0u8; 8 + 80];
    assert!(space.read(abi::TRACE_ADDR, &mut trace));
    assert_eq!(u64::from_le_bytes(trace[..8].try_into().unwrap()), 80);
    let entries = &trace[8..];
    let switches = entries.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches >= 70, "threads did not interleave: {entries:?}");
}

/// A user thread spinning without system calls does not keep the other
/// thread on its CPU from running: the timer preempts ring 3.
#[ktest]
fn spinning_user_thread_is_preempted() {
    let space = AddressSpace::with_programs().expect("address space");
    let cpu = *cpus().last().unwrap();
    // Long enough (a second or more under TCG) that the reporter can only
    // finish first if the spinner is preempted.
    let spinner = spawn_user(&space, cpu, program::SPIN, [200_000_000, 0]).unwrap();
    let reporter = spawn_user(&space, cpu, program::REPORT_CPU, [10, 0]).unwrap();
    assert_eq!(reporter.join(), cpu as i64);
    assert!(!spinner.has_exited(), "the spinner finished before the reporter ran: no preemption");
    assert_eq!(spinner.join(), 0);
}

/// Bad accesses end only the offending process, with the right outcome:
/// touching kernel memory, executing a no-exec page and writing read-only
/// text are fatal; bad system-call pointers get error codes. Each offender
/// is a process of its own (a fatal fault ends every thread of its process:
/// see `process_tests`); the bystander process runs on undisturbed.
#[ktest]
fn bad_user_accesses_kill_only_the_offender() {
    let cpus = cpus();
    let cpu = |i: usize| cpus[i % cpus.len()];
    let own = |i: usize, program: usize, arg: u64| {
        let space = AddressSpace::with_programs().expect("address space");
        spawn_user(&space, cpu(i), program, [arg, 0]).unwrap()
    };
    let bystander = own(0, program::REPORT_CPU, 20_000);
    let kernel = own(1, program::TOUCH_KERNEL, 0);
    let nx = own(2, program::EXEC_NX, 0);
    let text = own(3, program::WRITE_TEXT, 0);
    let pointers = own(4, program::BAD_POINTERS, 0);
    assert_eq!(kernel.join(), KILLED, "touching kernel memory must kill");
    assert_eq!(nx.join(), KILLED, "executing the stack must kill");
    assert_eq!(text.join(), KILLED, "writing text must kill");
    assert_eq!(pointers.join(), 0, "a bad-pointer check got the wrong error code");
    assert_eq!(bystander.join(), cpu(0) as i64, "the bystander thread was disturbed");
}

/// Thousands of address spaces and threads come and go: tasks, kernel
/// stacks, address spaces, processes and frames all return to their
/// starting counts.
#[ktest]
fn thread_and_space_churn_leaks_nothing() {
    let cpus = cpus();
    let round = |i: usize| {
        let space = AddressSpace::with_programs().expect("address space");
        let ts: Vec<_> = (0..4)
            .map(|j| spawn_user(&space, cpus[(i + j) % cpus.len()], program::EXIT_WITH, [(i + j) as u64, 0]).unwrap())
            .collect();
        for (j, t) in ts.into_iter().enumerate() {
            assert_eq!(t.join(), (i + j) as i64);
        }
        drop(space);
    };
    round(0);
    settle();
    let before = (
        mm::nr_free_pages(),
        LIVE_TASKS.load(Ordering::SeqCst),
        LIVE_STACKS.load(Ordering::SeqCst),
        LIVE_SPACES.load(Ordering::SeqCst),
        super::process::LIVE_PROCESSES.load(Ordering::SeqCst),
    );
    for i in 1..500 {
        round(i);
    }
    settle();
    let after = (
        mm::nr_free_pages(),
        LIVE_TASKS.load(Ordering::SeqCst),
        LIVE_STACKS.load(Ordering::SeqCst),
        LIVE_SPACES.load(Ordering::SeqCst),
        super::process::LIVE_PROCESSES.load(Ordering::SeqCst),
    );
    assert_eq!(after, before, "(free frames, tasks, kernel stacks, address spaces, processes) changed");
}

use crate::workload::storm::settle;
