//! The system-call fuzzer's kernel side: each fuzzer is a one-thread
//! process running `abi::program::FUZZ` (user/src/fuzz.rs) in an address
//! space of its own, with its report page mapped at `abi::fuzz::REPORT_ADDR`.
//! Used by the fuzz test below and by the soak.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use abi::fuzz::{CLASS_NAMES, CLASSES, REPORT_ADDR, Report};
use mm::{MapFlags, Prot, VirtAddr};

use crate::sched::Task;
use crate::uspace::{AddressSpace, spawn_user};

/// A running fuzzer.
pub struct Fuzzer {
    space: Arc<AddressSpace>,
    task: Arc<Task>,
}

/// How a fuzzer ended.
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    /// Its exit code: 0, the number of unexpected successes, or
    /// `uspace::KILLED`.
    pub exit: i64,
    /// Its report (as far as it got).
    pub report: Report,
}

/// Starts a fuzzer on `cpu` making `calls` calls from `seed`. `None` when
/// memory is short.
pub fn start(cpu: usize, seed: u64, calls: u64) -> Option<Fuzzer> {
    let space = AddressSpace::with_programs().ok()?;
    space.mm.mmap(Some(VirtAddr::new(REPORT_ADDR)), 4096, Prot::READ | Prot::WRITE, MapFlags::FIXED).ok()?;
    // Fault the page in now: reading the report back needs no memory.
    if !space.write(REPORT_ADDR, &[0u8; core::mem::size_of::<Report>()]) {
        return None;
    }
    let task = spawn_user(&space, cpu, abi::program::FUZZ, [seed, calls]).ok()?;
    Some(Fuzzer { space, task })
}

impl Fuzzer {
    /// Waits for the fuzzer to end and reads its report.
    pub fn join(self) -> Ended {
        let exit = self.task.join();
        let mut report = Report::default();
        // SAFETY: Report is repr(C) plain data; any bytes are a valid value.
        let buf = unsafe {
            core::slice::from_raw_parts_mut(&mut report as *mut Report as *mut u8, core::mem::size_of::<Report>())
        };
        let read = self.space.read(REPORT_ADDR, buf);
        assert!(read, "the fuzzer's report page is mapped");
        Ended { exit, report }
    }
}

/// The seed of the fuzzer on `cpu` in a run seeded `seed`: distinct per
/// CPU and per run (the program's generator keeps only odd seeds).
pub fn fuzzer_seed(seed: u64, cpu: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(2 * cpu as u64 + 1)
}

/// Sums reports.
pub fn total(ended: &[Ended]) -> Report {
    let mut t = Report::default();
    for e in ended {
        t.calls += e.report.calls;
        t.unexpected_ok += e.report.unexpected_ok;
        t.forks += e.report.forks;
        t.done += e.report.done;
        for c in 0..CLASSES {
            t.results[c] += e.report.results[c];
        }
    }
    t
}

/// `N calls: ok X, EINVAL Y, ...`.
pub fn describe(t: &Report) -> String {
    let mut s = format!("{} calls ({} forks):", t.calls, t.forks);
    for (c, name) in CLASS_NAMES.iter().enumerate() {
        s += &format!(" {name} {}", t.results[c]);
    }
    s += &format!("; {} unexpected successes", t.unexpected_ok);
    s
}

#[cfg(target_os = "none")]
mod tests {
    use alloc::vec::Vec;

    use abi::fuzz;
    use abi::storm::{self, Params};
    use ktest::ktest;
    use mm::MapFlags;

    use super::*;
    use crate::workload::storm::{Spec, online, run, settle};

    /// Calls per fuzzer (one per CPU).
    const CALLS: u64 = 1500;

    /// One fuzzer per CPU, each calling every system call with hostile
    /// arguments, while fault storms (with DONTNEED and remaps) run on the
    /// same CPUs: every call returns (an error where the arguments are
    /// bad: an address outside the user half, a wrapping range, an unknown
    /// flag, advice or number), no fuzzer is killed, the kernel neither
    /// oopses nor hangs, the storms see no corruption, and every frame,
    /// `ptl` and heap byte comes back. The seed is `fuzz_seed=` (default 1).
    #[ktest]
    fn fuzz_every_system_call_on_every_cpu_while_storms_run() {
        let seed: u64 = crate::boot::cmdline::read().value("fuzz_seed").and_then(|s| s.parse().ok()).unwrap_or(1);
        let cpus = online();
        // A short run first: what the kernel allocates once, on first use
        // (a process-table node, say), is not a leak.
        let warm: Vec<Fuzzer> = cpus.iter().map(|&c| start(c, fuzzer_seed(!seed, c), 64).expect("a fuzzer")).collect();
        drop(warm.into_iter().map(Fuzzer::join).collect::<Vec<_>>());
        let heap = crate::workload::storm::settled_heap_usage();
        let (frames, ptls) = (mm::nr_free_pages(), mm::phys().nr_allocated_ptlocks());
        let fuzzers: Vec<Fuzzer> =
            cpus.iter().map(|&c| start(c, fuzzer_seed(seed, c), CALLS).expect("a fuzzer")).collect();
        let n = cpus.len().max(2) as u64;
        for special in [storm::MODE_DONTNEED, storm::MODE_REMAPPER] {
            let p = Params {
                mode: storm::MODE_TOUCH,
                pattern: storm::PATTERN_INTERLEAVED,
                base: 0x1_0000_0000,
                len: 4 << 20,
                threads: n,
                rounds: 4,
                tolerate_loss: 1,
                special_threads: 1,
                special_mode: special,
                ..Params::default()
            };
            let out = run(&Spec { params: p, premap: Some(MapFlags::empty()), cpus: cpus.clone() }).expect("storm");
            assert!(out.exit_codes.iter().all(|&c| c == 0), "storm beside the fuzzers: {:?}", out.exit_codes);
        }
        let ended: Vec<Ended> = fuzzers.into_iter().map(Fuzzer::join).collect();
        settle();
        let t = total(&ended);
        log::info!("fuzz (seed {seed}, {} CPUs): {}", cpus.len(), describe(&t));
        for (i, e) in ended.iter().enumerate() {
            let r = &e.report;
            assert_eq!(
                r.unexpected_ok,
                0,
                "fuzzer {i}: {} calls succeeded that had to fail; the first: nr {} args {:x?}",
                r.unexpected_ok,
                r.first_unexpected[0],
                &r.first_unexpected[1..]
            );
            assert!(e.exit == 0 && r.done == 1, "fuzzer {i} ended with {} in system call {}", e.exit, r.last_nr);
        }
        for class in [fuzz::OK, fuzz::EINVAL, fuzz::EFAULT, fuzz::ENOMEM, fuzz::ENOSYS, fuzz::ECHILD] {
            assert!(t.results[class] > 0, "no call ended in {}: {}", fuzz::CLASS_NAMES[class], describe(&t));
        }
        drop(ended);
        assert_eq!(crate::workload::storm::settle_frames(frames), frames, "frames leaked by the fuzzers");
        assert_eq!(mm::phys().nr_allocated_ptlocks(), ptls, "allocated ptls leaked by the fuzzers");
        assert_eq!(crate::workload::storm::settle_heap(heap), heap, "heap bytes leaked by the fuzzers");
    }
}
