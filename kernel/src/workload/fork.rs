//! `fork` under load: the fork storm (issue 18's storm (i), a test) and the
//! fork benchmark (`cargo xtask bench --workloads fork`).
//!
//! Both run one process of ring-3 threads (`abi::program::FORK_STORM`,
//! `FORK_BENCH`) that share a control page with the kernel at
//! `abi::fork::CONTROL_ADDR` and a data region at `abi::fork::DATA_ADDR`
//! (mapped here, faulted in by the threads).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::offset_of;

use abi::fork::{BenchPage, CONTROL_ADDR, DATA_ADDR, MAX_WRITERS, StormPage};
use arch::qemu::ExitCode;
use mm::lock::{LockClass, lock_stats, reset_lock_stats};
use mm::{MapFlags, MmStats, Prot, VirtAddr};

use super::storm::{online, settle};
use crate::sched::{self, Task};
use crate::uspace::{AddressSpace, Process};

/// Why a run could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// Out of memory while setting up.
    NoMemory,
    /// More threads than the control page has slots for.
    TooManyThreads,
}

/// A started run: the process, its address space, its threads.
type Started = (Arc<Process>, Arc<AddressSpace>, Vec<Arc<Task>>);

/// A process with the user programs, its control page and a data region of
/// `len` bytes (mapped, not populated), and a thread of `program` per entry
/// of `cpus` (thread `i` on `cpus[i]` with argument `i`), all made before
/// any starts (so no thread's stack is mapped while another runs).
fn start(name: &str, program: usize, cpus: &[usize], len: u64, control: &[u64]) -> Result<Started, SetupError> {
    let p = Process::with_programs(name).map_err(|_| SetupError::NoMemory)?;
    let space = p.space().ok_or(SetupError::NoMemory)?;
    let rw = Prot::READ | Prot::WRITE;
    space.mm.mmap(Some(VirtAddr::new(CONTROL_ADDR)), 4096, rw, MapFlags::FIXED).map_err(|_| SetupError::NoMemory)?;
    space.mm.mmap(Some(VirtAddr::new(DATA_ADDR)), len, rw, MapFlags::FIXED).map_err(|_| SetupError::NoMemory)?;
    let bytes: Vec<u8> = control.iter().flat_map(|w| w.to_le_bytes()).collect();
    if !space.write(CONTROL_ADDR, &bytes) {
        return Err(SetupError::NoMemory);
    }
    let mut threads = Vec::with_capacity(cpus.len());
    for (i, &cpu) in cpus.iter().enumerate() {
        match p.new_thread(cpu, program, [i as u64, 0]) {
            Ok(t) => threads.push(t),
            Err(_) => {
                // The process refuses no thread before it has one: this is
                // memory. End the ones made (they exit at once).
                p.kill(-1);
                for t in threads {
                    sched::spawn(t);
                }
                return Err(SetupError::NoMemory);
            }
        }
    }
    let threads: Vec<_> = threads.into_iter().map(sched::spawn).collect();
    Ok((p, space, threads))
}

/// The control page's words as the threads left them.
fn control_words(space: &AddressSpace) -> Vec<u64> {
    let mut b = alloc::vec![0u8; 4096];
    assert!(space.read(CONTROL_ADDR, &mut b), "the control page is mapped");
    b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

// ------------------------------------------------------------ the storm

/// One fork storm.
#[derive(Clone, Debug)]
pub struct StormSpec {
    /// Writer threads; the forker is one more.
    pub writers: usize,
    /// Pages each writer owns (interleaved with the other writers').
    pub pages_per_writer: u64,
    /// Forks the forker makes (each child checks its snapshot and exits).
    pub forks: u64,
    /// CPUs: the forker (and so its children) runs on the first, the
    /// writers round-robin on the others (on the first too if it is alone).
    /// A writer beside the forker would hold up the children: its
    /// copy-on-write faults (each with a TLB shoot-down to every CPU of the
    /// process) keep it in the kernel, where ticks do not preempt it.
    pub cpus: Vec<usize>,
}

/// What a fork storm did.
#[derive(Clone, Debug)]
pub struct StormOutcome {
    /// The forker's report (see `abi::fork::StormPage`).
    pub forks_done: u64,
    pub forks_overlapped: u64,
    pub children_ok: u64,
    pub children_bad: u64,
    pub children_mid_round: u64,
    pub first_bad_status: i64,
    pub errors: u64,
    /// Rounds each writer finished.
    pub rounds: Vec<u64>,
    /// Exit codes: the writers', then the forker's.
    pub exit_codes: Vec<i64>,
    /// The parent's counters at the end.
    pub stats: MmStats,
}

/// Runs a fork storm to completion (see `abi::fork::StormPage` for what
/// the threads and the children do and check).
pub fn storm(spec: &StormSpec) -> Result<StormOutcome, SetupError> {
    let n = spec.writers;
    if n == 0 || n > MAX_WRITERS {
        return Err(SetupError::TooManyThreads);
    }
    let mut control = alloc::vec![0u64; 4096 / 8];
    control[offset_of!(StormPage, writers) / 8] = n as u64;
    control[offset_of!(StormPage, pages_per_writer) / 8] = spec.pages_per_writer;
    control[offset_of!(StormPage, forks) / 8] = spec.forks;
    let len = n as u64 * spec.pages_per_writer * 4096;
    let others = if spec.cpus.len() > 1 { &spec.cpus[1..] } else { &spec.cpus[..] };
    let mut placement: Vec<usize> = (0..n).map(|i| others[i % others.len()]).collect();
    placement.push(spec.cpus[0]);
    let (p, space, threads) = start("fork-storm", abi::program::FORK_STORM, &placement, len, &control)?;
    let exit_codes: Vec<i64> = threads.iter().map(|t| t.join()).collect();
    p.wait_exit();
    let w = control_words(&space);
    let word = |offset: usize| w[offset / 8];
    let out = StormOutcome {
        forks_done: word(offset_of!(StormPage, forks_done)),
        forks_overlapped: word(offset_of!(StormPage, forks_overlapped)),
        children_ok: word(offset_of!(StormPage, children_ok)),
        children_bad: word(offset_of!(StormPage, children_bad)),
        children_mid_round: word(offset_of!(StormPage, children_mid_round)),
        first_bad_status: word(offset_of!(StormPage, first_bad_status)) as i64,
        errors: word(offset_of!(StormPage, errors)),
        rounds: (0..n).map(|i| word(offset_of!(StormPage, done) + 8 * i)).collect(),
        exit_codes,
        stats: space.mm.stats(),
    };
    Ok(out)
}

// ------------------------------------------------------------ the benchmark

/// One window of the fork benchmark.
struct BenchWindow {
    /// TSC cycles of the `fork` call, and the 4 KiB entries it shared.
    fork_cycles: u64,
    fork_ptes: u64,
    /// Copy-on-write faults after the fork, and the span they took (first
    /// thread's start to last thread's end).
    cow_faults: u64,
    cow_cycles: u64,
    /// The threads' own cycles in the copy-on-write phase, summed.
    thread_cycles: u64,
    /// Pages written in that phase.
    written: u64,
}

/// One window: populate, fork (timed), write everything again (timed), kill
/// the child.
fn bench_window(n: usize, len: u64) -> Result<BenchWindow, String> {
    let cpus = online();
    let mut control = alloc::vec![0u64; 4096 / 8];
    control[offset_of!(BenchPage, threads) / 8] = n as u64;
    control[offset_of!(BenchPage, len) / 8] = len;
    let (p, space, threads) = start("fork-bench", abi::program::FORK_BENCH, &cpus[..n], len, &control)
        .map_err(|e| format!("set-up: {e:?}"))?;
    let codes: Vec<i64> = threads.iter().map(|t| t.join()).collect();
    p.wait_exit();
    let w = control_words(&space);
    let word = |offset: usize| w[offset / 8];
    let stats = space.mm.stats();
    let child_pid = word(offset_of!(BenchPage, child_pid));
    let child = crate::uspace::process::find(child_pid);
    if let Some(c) = &child {
        c.kill(0);
        c.wait_exit();
    }
    drop(child);
    // The child's address space goes first (with its task, at its CPU's
    // next switch): two address spaces that share pages must not be torn
    // down at once today (see `process_tests::kill_every_thread`).
    settle();
    drop((threads, space, p));
    let failed: Vec<u64> = (0..n).map(|i| word(offset_of!(BenchPage, failed) + 8 * i)).collect();
    if codes.iter().any(|&c| c != 0) || failed.iter().any(|&f| f != 0) || child_pid == 0 {
        return Err(format!("threads exited {codes:?}, checks failed {failed:?}, child pid {child_pid}"));
    }
    let per = |field: usize| -> Vec<u64> { (0..n).map(|i| word(field + 8 * i)).collect() };
    let (start, end, written) =
        (per(offset_of!(BenchPage, start)), per(offset_of!(BenchPage, end)), per(offset_of!(BenchPage, written)));
    let span = end.iter().max().unwrap_or(&0).saturating_sub(*start.iter().min().unwrap_or(&0));
    Ok(BenchWindow {
        fork_cycles: word(offset_of!(BenchPage, fork_cycles)),
        fork_ptes: stats.fork_shared,
        cow_faults: stats.cow_faults,
        cow_cycles: span,
        thread_cycles: start.iter().zip(&end).map(|(s, e)| e - s).sum(),
        written: written.iter().sum(),
    })
}

/// `mode=bench workload=fork` (called by `bench::run`): a warm-up and
/// `windows` timed windows on every online CPU, each a fresh process of one
/// thread per CPU that populates `mib` MiB (split between the threads),
/// forks once (timed in the forking thread: cycles per 4 KiB entry shared),
/// and writes every page again while the child still maps them (every write
/// a copy-on-write fault that copies: faults/s over the span from the first
/// thread's start to the last one's end). Prints one `BENCH-RESULT` line in
/// the format of the fault-storm bench, with a `fork` object added. With
/// `profile` (`profile=HZ`), the sampling profiler runs during the timed
/// windows and its samples follow the result line (`cargo xtask profile`).
pub fn bench(windows: u64, mib: u64, profile: Option<u32>) -> ExitCode {
    let cpus = online();
    let n = cpus.len();
    let len = (mib << 20) / n as u64 / 4096 * 4096 * n as u64;
    log::info!(
        "bench: fork on {n} CPUs: {mib} MiB populated by {n} threads, forked, rewritten; 1 warm-up + {windows} windows"
    );
    let mut results = Vec::new();
    let mut stats_start = 0;
    for w in 0..=windows {
        settle();
        if w == 1 {
            reset_lock_stats();
            stats_start = arch::time::rdtsc();
            if let Some(rate) = profile
                && let Err(e) = crate::diag::profile::start(rate)
            {
                log::error!("bench: profile={rate}: cannot start the profiler: {e:?}");
                return ExitCode::Failure;
            }
        }
        let win = match bench_window(n, len) {
            Ok(win) => win,
            Err(e) => {
                log::error!("bench: fork window {w}: {e}");
                return ExitCode::Failure;
            }
        };
        if win.cow_faults < win.written {
            log::error!(
                "bench: {} pages rewritten after fork, only {} copy-on-write faults",
                win.written,
                win.cow_faults
            );
            return ExitCode::Failure;
        }
        log::info!(
            "bench: {}: fork of {} PTEs in {} us ({} cycles/PTE); {} copy-on-write faults in {} us",
            if w == 0 { String::from("warm-up") } else { format!("window {w}/{windows}") },
            win.fork_ptes,
            arch::time::cycles_to_ns(win.fork_cycles) / 1000,
            win.fork_cycles / win.fork_ptes.max(1),
            win.cow_faults,
            arch::time::cycles_to_ns(win.cow_cycles) / 1000,
        );
        if w > 0 {
            results.push(win);
        }
    }
    let recording = profile.and_then(|_| crate::diag::profile::stop());
    let stats_cycles = arch::time::rdtsc().wrapping_sub(stats_start);
    let faults: u64 = results.iter().map(|w| w.written).sum();
    let thread_cycles: u64 = results.iter().map(|w| w.thread_cycles).sum();
    let mut json = format!(
        "{{\"workload\":\"fork\",\"cpus\":{n},\"tsc_per_us\":{},\"split_pte_ptlocks\":{},\"fault_lock\":\"{}\",\"stats_cycles\":{stats_cycles},\"windows\":[",
        arch::time::tsc_per_us().unwrap_or(0),
        mm::config::USE_SPLIT_PTE_PTLOCKS,
        super::bench::fault_lock_name()
    );
    for (i, w) in results.iter().enumerate() {
        json += &format!(
            "{}{{\"faults\":{},\"cycles\":{},\"touched\":{},\"min_faults\":{}}}",
            if i == 0 { "" } else { "," },
            w.cow_faults,
            w.cow_cycles,
            w.written,
            w.written
        );
    }
    // Per fault: the writing threads' own time over their faults (the
    // write and the fault, copy included).
    json += &format!(
        "],\"cycles_per_fault_mean\":{},\"cycles_per_fault_p99\":0,\"locks\":{{",
        thread_cycles / faults.max(1)
    );
    for (i, class) in [
        LockClass::PageTableLock,
        LockClass::PmdLock,
        LockClass::PteLock,
        LockClass::FrameAllocator,
        LockClass::MmapLock,
    ]
    .into_iter()
    .enumerate()
    {
        let l = lock_stats(class);
        json += &format!(
            "{}\"{}\":{{\"acquisitions\":{},\"contended\":{},\"spin_cycles\":{}}}",
            if i == 0 { "" } else { "," },
            class.name(),
            l.acquisitions,
            l.contended,
            l.spin_cycles
        );
    }
    json += "},\"mm\":{},\"fork\":{\"cycles\":[";
    for (i, w) in results.iter().enumerate() {
        json += &format!("{}{}", if i == 0 { "" } else { "," }, w.fork_cycles);
    }
    json += "],\"ptes\":[";
    for (i, w) in results.iter().enumerate() {
        json += &format!("{}{}", if i == 0 { "" } else { "," }, w.fork_ptes);
    }
    json += "]}}";
    arch::println!("BENCH-RESULT {json}");
    if let Some(r) = recording {
        r.dump();
    }
    ExitCode::Success
}

#[cfg(target_os = "none")]
mod tests;
