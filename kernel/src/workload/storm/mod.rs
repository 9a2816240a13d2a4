//! Fault storms: ring-3 threads of one address space, one per CPU (or as
//! many as asked), faulting the same address space at once through the real
//! #PF path. Used by the storm tests, `cargo xtask run`'s default workload
//! and the benchmark.
//!
//! The kernel maps the storm's area at `abi::storm::PARAMS_ADDR`
//! (`abi::storm::AREA_SIZE` bytes: as many pages as the reports of
//! `abi::storm::MAX_THREADS` threads need), writes the [`Params`],
//! optionally maps the region the threads will touch, starts the threads
//! (pinned round-robin over the given CPUs), waits for them, and
//! collects each thread's [`Report`] and exit code, the address space's
//! counters and page-table contents, before tearing it down.

use alloc::sync::Arc;
use alloc::vec::Vec;

use abi::storm::{AREA_SIZE, PARAMS_ADDR, Params, REPORTS_OFFSET, Report};
use mm::{MapFlags, Mapping, MmStats, Prot, VirtAddr};

use crate::uspace::{AddressSpace, new_user_thread};

/// Where storms put their region: 4 GiB, 1 GiB aligned, far from the
/// program image.
pub const BASE: u64 = 0x1_0000_0000;
/// A small page.
pub const PAGE: u64 = 4096;
/// A PMD-sized (transparent huge) page.
pub const HUGE: u64 = 2 << 20;

/// The parameters every storm sets: `threads` threads doing `mode` on `len`
/// bytes at [`BASE`] in `pattern`, `rounds` times; the rest as
/// `Params::default()` (callers add their own with struct-update syntax).
pub fn params(mode: u64, pattern: u64, len: u64, threads: u64, rounds: u64) -> Params {
    Params { mode, pattern, base: BASE, len, threads, rounds, ..Params::default() }
}

/// One storm to run.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Parameters the user threads read.
    pub params: Params,
    /// Map `[params.base, params.base + params.len)` with these flags before
    /// starting (`None`: the threads map their own memory).
    pub premap: Option<MapFlags>,
    /// CPUs to pin threads to, round-robin (`params.threads` threads).
    pub cpus: Vec<usize>,
}

/// What a storm did.
pub struct Outcome {
    /// Exit code of each thread (the mismatch count, or `uspace::KILLED`).
    pub exit_codes: Vec<i64>,
    /// Each thread's report.
    pub reports: Vec<Report>,
    /// The address space's counters at the end.
    pub stats: MmStats,
    /// Its counters when the threads were about to start (the storm's area
    /// and the threads' initial stacks set up, the region mapped but empty).
    pub stats_before: MmStats,
    /// Every page-table entry mapping user memory in the region at the end.
    pub mappings: Vec<Mapping>,
    /// The CPU each thread ran on.
    pub cpus: Vec<usize>,
    /// Pages the address space's page tables map at the end (all of them,
    /// not only the region's; the shared zero page not counted), to check
    /// against its RSS counter (`stats.rss_pages`).
    pub mapped_pages: u64,
}

impl Outcome {
    /// Total pages touched.
    pub fn touched(&self) -> u64 {
        self.reports.iter().map(|r| r.touched).sum()
    }

    /// Total mismatches (data corruption) over all threads.
    pub fn mismatches(&self) -> u64 {
        self.reports.iter().map(|r| r.mismatches).sum()
    }

    /// 4 KiB pages of `[params.base, params.base + params.len)` the threads'
    /// faults made present (were not mapped, became mapped), over all
    /// rounds: the pages made present while they ran (fresh anonymous
    /// pages, zero-page copies, THPs), less those made present outside the
    /// region (their stacks, the program's data), which stay mapped until
    /// the end: the RSS gained outside the region.
    pub fn region_made_present(&self) -> u64 {
        let made = |s: &MmStats| s.anon_faults + s.cow_faults + s.thp_faults * 512;
        let zero = mm::phys().zero_pfn();
        let region_mapped: u64 =
            self.mappings.iter().filter(|m| m.pa.pfn() != zero).map(|m| m.size / mm::PAGE_SIZE).sum();
        // The region was empty at the start: all RSS then was outside it.
        let outside = (self.stats.rss_pages.saturating_sub(region_mapped)).saturating_sub(self.stats_before.rss_pages);
        (made(&self.stats) - made(&self.stats_before)).saturating_sub(outside)
    }

    /// Cycles from the first thread's start to the last thread's end.
    pub fn span_cycles(&self) -> u64 {
        let start = self.reports.iter().map(|r| r.start_cycles).min().unwrap_or(0);
        let end = self.reports.iter().map(|r| r.end_cycles).max().unwrap_or(0);
        end.saturating_sub(start)
    }

    /// CPU time in the span (in TSC cycles, summed over the threads) that
    /// threads spent not working: waiting at the timed part's barriers, or
    /// not yet started or already finished while another thread ran. With
    /// one thread per CPU, its share of `threads x span_cycles` is the
    /// share of the CPUs the storm left idle.
    pub fn waiting_cycles(&self) -> u64 {
        let span = self.span_cycles();
        self.reports
            .iter()
            .map(|r| span.saturating_sub(r.end_cycles.saturating_sub(r.start_cycles)) + r.waited_cycles)
            .sum()
    }
}

/// Why a storm could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StormError {
    /// Out of memory while setting up.
    NoMemory,
    /// No threads, or more than `abi::storm::MAX_THREADS`.
    TooManyThreads,
}

/// Runs `spec` to completion.
pub fn run(spec: &Spec) -> Result<Outcome, StormError> {
    let p = spec.params;
    let n = p.threads as usize;
    if n == 0 || n > abi::storm::MAX_THREADS {
        return Err(StormError::TooManyThreads);
    }
    let space: Arc<AddressSpace> = AddressSpace::with_programs().map_err(|_| StormError::NoMemory)?;
    space
        .mm
        .mmap(Some(VirtAddr::new(PARAMS_ADDR)), AREA_SIZE, Prot::READ | Prot::WRITE, MapFlags::FIXED)
        .map_err(|_| StormError::NoMemory)?;
    // SAFETY: Params is repr(C) plain data; viewing it as bytes is sound.
    let bytes =
        unsafe { core::slice::from_raw_parts(&p as *const Params as *const u8, core::mem::size_of::<Params>()) };
    if !space.write(PARAMS_ADDR, bytes) {
        return Err(StormError::NoMemory);
    }
    if let Some(flags) = spec.premap {
        space
            .mm
            .mmap(Some(VirtAddr::new(p.base)), p.len, Prot::READ | Prot::WRITE, flags | MapFlags::FIXED)
            .map_err(|_| StormError::NoMemory)?;
    }
    let mut cpus: Vec<usize> = (0..n).map(|i| spec.cpus[i % spec.cpus.len()]).collect();
    // Every thread is made before any starts: a thread that ran could be
    // killed (out of memory under failure injection) with its process, and
    // a thread made after that would belong to a new process and wait at
    // the first barrier for the dead. Under injection a creation that fails
    // is retried; if one still fails, the storm runs with the threads made.
    let tries = if mm::phys().fault_inject().armed() { 64 } else { 1 };
    let mut threads = Vec::with_capacity(n);
    for (i, &cpu) in cpus.iter().enumerate() {
        match (0..tries).find_map(|_| new_user_thread(&space, cpu, abi::program::STORM, [i as u64, 0]).ok()) {
            Some(t) => threads.push(t),
            None => break,
        }
    }
    let n = threads.len();
    if n == 0 {
        return Err(StormError::NoMemory);
    }
    if n < p.threads as usize {
        let fewer = Params { threads: n as u64, ..p };
        // SAFETY: as above.
        let bytes = unsafe {
            core::slice::from_raw_parts(&fewer as *const Params as *const u8, core::mem::size_of::<Params>())
        };
        if !space.write(PARAMS_ADDR, bytes) {
            return Err(StormError::NoMemory);
        }
        cpus.truncate(n);
    }
    let stats_before = space.mm.stats();
    let threads: Vec<_> = threads.into_iter().map(crate::sched::spawn).collect();
    let exit_codes: Vec<i64> = threads.iter().map(|t| t.join()).collect();
    let mut reports = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = Report::default();
        // SAFETY: Report is repr(C) plain data.
        let buf = unsafe {
            core::slice::from_raw_parts_mut(&mut r as *mut Report as *mut u8, core::mem::size_of::<Report>())
        };
        let at = PARAMS_ADDR + REPORTS_OFFSET + (i * core::mem::size_of::<Report>()) as u64;
        if !space.read(at, buf) {
            return Err(StormError::NoMemory);
        }
        reports.push(r);
    }
    let stats = space.mm.stats();
    let region = p.base..p.base + p.len;
    let all = space.mm.mappings();
    let zero = mm::phys().zero_pfn();
    let mapped_pages = all.iter().filter(|m| m.pa.pfn() != zero).map(|m| m.size / mm::PAGE_SIZE).sum();
    let mappings = all.into_iter().filter(|m| region.contains(&m.va.as_u64())).collect();
    drop(threads);
    drop(space);
    Ok(Outcome { exit_codes, reports, stats, stats_before, mappings, cpus, mapped_pages })
}

/// Lets every CPU switch once, so exited tasks (and the address space they
/// held) are freed before frames are counted, recycles freed kernel stacks,
/// and frees the detached page tables waiting for a grace period.
pub fn settle() {
    extern "C" fn nop(_: usize) -> ! {
        crate::sched::exit_current(0)
    }
    for cpu in online() {
        if let Some(t) = crate::sched::Task::new_kernel("settle".into(), cpu, nop, 0) {
            let t = crate::sched::spawn(t);
            t.join();
            // `join` returns once the task is marked exited; its CPU drops
            // its own reference only after switching away from its stack.
            while Arc::strong_count(&t) > 1 {
                core::hint::spin_loop();
            }
        }
    }
    crate::sched::yield_now();
    // The other CPUs idle now and trim their run queues; this one may not.
    crate::sched::trim_run_queue();
    // Freed kernel stacks keep their frames until a shoot-down recycles them.
    crate::kstack::purge();
    // Detached page tables wait for a grace period before they are freed.
    mm::phys().rcu_barrier();
}

/// [`settle`]s until the heap is back to `baseline` bytes in use, or 30 s
/// have passed; returns the bytes in use then. Exited tasks release what
/// they held (their process, its zombie record) as their CPUs switch away,
/// which can come after one `settle`, and later still when the host keeps
/// those vCPUs off its cores; a leak stays (and only a failing run waits
/// the whole 30 s).
pub fn settle_heap(baseline: usize) -> usize {
    let (used, settles) = settle_until(crate::boot::heap::used, |used| used == baseline);
    log_slow_settle("heap bytes in use", used, baseline, settles);
    used
}

/// [`settle`]s until two settles in a row leave the heap's usage unchanged
/// (or 30 s have passed) and returns it: a baseline that work still
/// finishing on other CPUs (an idle loop shrinking a run queue, an exited
/// task's last reference) will not move under a test that compares the
/// heap's usage before and after.
pub fn settled_heap_usage() -> usize {
    let mut last = None;
    settle_until(crate::boot::heap::used, |used| last.replace(used) == Some(used)).0
}

/// [`settle`]s until the free frames are back to `baseline`, or 30 s have
/// passed; returns the free frames then. An address space's frames (its
/// tables, its pages) go back when its process is released, which, as for
/// the heap ([`settle_heap`]), can come after one `settle`; a leak stays.
pub fn settle_frames(baseline: u64) -> u64 {
    let (free, settles) = settle_until(mm::nr_free_pages, |free| free == baseline);
    log_slow_settle("free frames", free, baseline, settles);
    free
}

/// [`settle`]s until `done` accepts what `measure` reads, or 30 s have
/// passed; returns the last reading and how many settles it took.
fn settle_until<T: Copy>(measure: impl Fn() -> T, mut done: impl FnMut(T) -> bool) -> (T, u32) {
    let start = arch::time::now_ns();
    let mut settles = 0;
    loop {
        settle();
        settles += 1;
        let now = measure();
        if done(now) || arch::time::now_ns() - start > 30_000_000_000 {
            return (now, settles);
        }
        arch::time::delay_us(10_000);
    }
}

/// Says so in the log when a leak check needed more than one [`settle`]:
/// a release that came late (an exited process freed when its last CPU
/// switched away) reads "back after N settles", a leak "still ... after N
/// settles"; a failing check's log then tells the two apart.
fn log_slow_settle<T: PartialEq + core::fmt::Display>(what: &str, now: T, baseline: T, settles: u32) {
    if settles <= 1 {
        return;
    }
    if now == baseline {
        log::info!("settle: {what} back to {baseline} after {settles} settles");
    } else {
        log::warn!("settle: {what} still {now}, not {baseline}, after {settles} settles");
    }
}

/// The CPUs online now.
pub fn online() -> Vec<usize> {
    arch::percpu::online_cpus().collect()
}

#[cfg(target_os = "none")]
mod inject_tests;
#[cfg(target_os = "none")]
mod tests;
