//! `cargo xtask bench`: fault-storm throughput and scaling, split page-table
//! locks against the single `mm.page_table_lock`, and faults under per-VMA
//! locks against faults under `mmap_lock`, as a table, JSON and an SVG plot.
//!
//! Every run is a fresh QEMU boot of a release kernel with `-smp` equal to
//! the CPU count, guest memory preallocated on the host (`-mem-prealloc`), and
//! the kernel in `mode=bench` (kernel/src/workload/bench.rs) with
//! `fault_lock=vma|mmap`: one warm-up storm, then timed windows, each one
//! storm with one ring-3 thread pinned per CPU. The kernel times the windows
//! with the TSC and reports one `BENCH-RESULT` line; a run whose boot summary
//! does not report the fault locking asked for fails.
//!
//! `--pairs N` measures 1 -> 2 vCPU scaling as N interleaved pairs of boots
//! and reports each pair's ratio, their median and spread; the targets use
//! the median. `--check` turns a missed target, or a missing run a target
//! needs, into a failure. `--quick` is a smoke test with no target verdicts.
//!
//! `--guest linux` runs `disjoint` and `same-table` on Debian's stock
//! Linux instead (linux.rs), in the same QEMU configuration, into
//! `target/bench/linux.json` and `linux.svg`: the reference the kernel's
//! figures are compared with, measured in the same session. `--guest
//! ptlk,linux` boots both, interleaved pair by pair, and compares their
//! 1 -> 2 vCPU ratios pair by pair ([`against_linux`]). `--linux SUITE`
//! takes the Linux of another Debian suite (e.g. trixie's 6.12, with
//! per-VMA locks).
//!
//! Every run also reports what QEMU's vCPU threads did on the host during
//! its timed windows (vcputime.rs): on a CPU, blocked, or waiting for one.
//!
//! A boot that never started (nothing on the serial port) is repeated
//! ([`retry_silent`]); a boot that fails otherwise ends the measuring, and
//! the runs before it are still printed and written, marked `incomplete`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::clock::Expiry;
use crate::hostprobe::HostProbe;
use crate::kernel::{BuildConfig, Firmware};
use crate::qemu::{self, Accel, Machine};
use crate::setup::LinuxSource;
use crate::{build_kernel, linux, setup, vcputime, workspace_root};

/// The single-lock build: `SPLIT_PTLOCK_CPUS` above `NR_CPUS`.
pub(crate) const SINGLE_LOCK_CPUS: u32 = 1_000_000;
pub(crate) const WORKLOADS: [&str; 8] =
    ["disjoint", "populate", "same-table", "same-page", "madvise", "madvise-same-table", "fork", "traps"];
/// `disjoint` with each page made present by `MADV_POPULATE_WRITE` before
/// its write: the fault path's work without an exception per page.
pub(crate) const POPULATE: &str = "populate";
/// The workload that takes exceptions and nothing else (no memory manager,
/// no lock): how far exception delivery alone scales on this host.
pub(crate) const TRAPS: &str = "traps";
/// The default `--workloads`.
const DEFAULT_WORKLOADS: &str = "disjoint,same-table,same-page,madvise,madvise-same-table";
/// The `lock` of a Linux guest's runs (its table rows, pairs and plot).
pub(crate) const LINUX: &str = "linux";

/// Which kernel the bench boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// This kernel (the lock builds of `--locks`).
    Ptlk,
    /// Debian's stock cloud kernel running the same storms (linux.rs).
    Linux,
}

/// How faults lock (kernel command line `fault_lock=`): their VMA's lock
/// (per-VMA locks, the kernel's default) or `mmap_lock` shared.
pub(crate) const FAULT_LOCKS: [&str; 2] = ["vma", "mmap"];

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// CPU counts to measure (one QEMU boot each).
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    cpus: Vec<u32>,
    /// Workloads: disjoint (each thread maps its own `--mib` MiB, writes a
    /// byte per 4 KiB page, unmaps it), same-table (one region of threads x
    /// `--mib` MiB; thread t of n writes pages t, t+n, t+2n, ..., so all
    /// share PTE tables; after each pass a barrier, thread 0's munmap and
    /// re-mmap, a barrier, all timed), same-page (every thread writes the
    /// same 256 pages; counts pages made present, with lost races and
    /// spurious faults beside), madvise (each thread writes its own 2 MiB-aligned
    /// block, then MADV_DONTNEEDs it, which also reclaims the emptied PTE
    /// tables), madvise-same-table (threads write
    /// interleaved pages of one region, then each MADV_DONTNEEDs every n-th
    /// 2 MiB of it), fork (not in the default list: the threads populate
    /// `--mib` MiB together, one forks (timed: cycles per copied PTE), then
    /// all write every page again while the child still maps it: the
    /// faults/s are copy-on-write faults), populate (not in the default
    /// list: disjoint, but each thread makes every 64 pages present with
    /// MADV_POPULATE_WRITE before writing them; the faults/s are pages
    /// written, with no exception each: what the fault path's work scales
    /// like without the exception), traps (not in the default list:
    /// no storm; every vCPU takes exceptions in the kernel for
    /// `--window-ms`, and the faults/s are exception round trips: how far
    /// the host delivers exceptions in parallel, the part of a fault no
    /// memory manager can change; split lock build only unless `--locks`
    /// says otherwise).
    #[arg(long, default_value = DEFAULT_WORKLOADS, value_delimiter = ',')]
    workloads: Vec<String>,
    /// The kernels to measure: ptlk (this kernel), linux (Debian's stock
    /// cloud kernel, downloaded with apt-get into target/xtask/linux-debian
    /// on first use, booted by QEMU with an initramfs whose /init runs
    /// disjoint or same-table in the same shape (linux-storm/), THP off, in
    /// the same QEMU configuration), or both: `--guest ptlk,linux`
    /// interleaves them pair by pair (ptlk's pair k, then Linux's) and
    /// compares their ratios pair by pair. Linux's runs are labelled `linux`;
    /// Linux alone goes to target/bench/linux.json and linux.svg. With
    /// linux, the workloads default to disjoint,same-table, and --quick,
    /// --ceiling and --rounds are refused (--icount counts Linux's
    /// instructions per fault too, without --pairs); Linux alone also
    /// refuses this kernel's flags (--locks, --fault-lock, --kernel-arg,
    /// --check), which with both apply to ptlk's runs. Linux's runs have no
    /// targets.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ptlk")]
    guest: Vec<GuestKind>,
    /// Which Debian cloud kernel `--guest linux` boots: `system` (the one
    /// this system's apt sources offer: 6.1 on bookworm, whose faults take
    /// `mmap_lock`) or a Debian suite, e.g. `trixie` (6.12, with per-VMA
    /// locks, the Linux of issue 17's table) or `bookworm-backports`, read
    /// from deb.debian.org through an apt state of its own under
    /// target/xtask/linux-debian-SUITE (apt checks the suite's signature;
    /// the system's apt is untouched).
    #[arg(long, default_value = "system", value_parser = LinuxSource::parse)]
    linux: LinuxSource,
    /// Lock builds: split, single. Default: both; split alone with
    /// `--pairs`.
    #[arg(long, value_delimiter = ',')]
    locks: Option<Vec<String>>,
    /// How faults lock, passed as `fault_lock=` on the kernel command line:
    /// vma (their VMA's lock, mmap_lock only as a fallback; the kernel's
    /// default), mmap (mmap_lock shared, as before Linux 6.4). A run whose
    /// boot summary reports other locking fails.
    #[arg(long = "fault-lock", default_value = "vma", value_delimiter = ',', value_parser = FAULT_LOCKS)]
    fault_lock: Vec<String>,
    /// Timed windows per run (the median is reported with min and max).
    #[arg(long)]
    windows: Option<u32>,
    /// MiB per thread (disjoint, madvise, and same-table, whose shared
    /// region is threads x MiB) or per shared region (same-page, at most 1
    /// MiB of it; madvise-same-table); even for the madvise workloads (whole
    /// 2 MiB regions). Default 128, 16 with `--quick`.
    #[arg(long)]
    mib: Option<u64>,
    /// Passes per window; 0: as many as fit in `--window-ms` (`disjoint`:
    /// each thread stops when its time is up; `same-table`: every thread
    /// stops after the pass in which thread 0's time is up). Default: 0 for
    /// `disjoint` (each pass maps, touches and unmaps the thread's region,
    /// will-it-scale's loop, which also counts a fixed time's work: with a
    /// fixed number of passes the thread the host ran faster would sit idle
    /// until the slower one finished) and `same-table` (each pass: every
    /// thread touches its interleaved pages, a barrier, thread 0 munmaps the
    /// region and maps it again, a barrier; will-it-scale's shared case, the
    /// munmap timed), so both windows are as long; 4 for the madvise
    /// workloads (each pass touches, then MADV_DONTNEEDs); 1 for same-page
    /// (one pass over a fresh shared mapping; more passes add a re-map by
    /// one thread between them); 1 for all with `--quick`.
    #[arg(long)]
    rounds: Option<u64>,
    /// A window ends after this many milliseconds even if the threads have
    /// not touched their whole regions (0: no limit). Keeps slow runs (the
    /// single lock on 8 vCPUs under TCG) bounded.
    #[arg(long, default_value_t = 2000)]
    window_ms: u64,
    /// A smoke test, about a minute on a 2-core machine: fewer, shorter
    /// windows over 16 MiB regions; disjoint on 1, 2 and 8 CPUs with split
    /// locks, and 8 with the single lock (for each `--fault-lock`; --cpus,
    /// --workloads and --locks are ignored). Its shape is not the targets'
    /// shape, so it prints no target verdicts (and refuses `--check` and
    /// `--pairs`).
    #[arg(long)]
    quick: bool,
    /// Measure 1 -> 2 vCPU scaling as N interleaved pairs of boots (1 vCPU,
    /// 2 vCPUs, 1, 2, ... for each workload, lock and fault lock; split
    /// locks only unless `--locks` says otherwise): each pair's ratio, their
    /// median and spread (max - min) are reported, and the targets use the
    /// median. The 1 and 2 in `--cpus` are replaced by the pairs; its other
    /// counts still run once each.
    #[arg(long, value_name = "N")]
    pairs: Option<u32>,
    /// Measure what this host allows 1 -> 2 vCPU scaling to be, as N rounds
    /// per workload of one 1-vCPU boot alone, then two 1-vCPU boots at once:
    /// two VMs that share nothing (no guest memory, no QEMU process), only
    /// the host's cores, caches and neighbours. Each round's ratio (the two
    /// boots' faults/s summed, over the one alone), their median and spread
    /// are the ceiling any `--pairs` ratio of that workload meets on this
    /// host, and how much of a pair's spread is the host's. Each round also
    /// boots one 2-vCPU VM, so the kernel's own 1 -> 2 ratio and its share
    /// of the two VMs' throughput are measured in the same minutes. Split
    /// locks only; no target verdicts (refuses `--pairs`, `--check`,
    /// `--quick` and `--icount`).
    #[arg(long, value_name = "N")]
    ceiling: Option<u32>,
    /// Exit non-zero if a target is missed, or if a run a target needs is
    /// missing (each is named). The targets (split locks): 1 -> 2 vCPUs,
    /// median of the pairs, at least 1.85x for disjoint and 1.75x for
    /// same-table, with a spread of at most 0.15 (so `--pairs` 2 or more);
    /// 4 and 8 vCPUs at least 95% and 85% of the 2-vCPU throughput
    /// (disjoint, same-table); disjoint on 1 vCPU at least 300000 faults/s.
    /// The split-vs-single ratio at 8 vCPUs counts only if both its runs
    /// are there.
    #[arg(long)]
    check: bool,
    /// Accelerator (default: KVM only with hardware virtualization, else TCG).
    #[arg(long, value_enum)]
    accel: Option<Accel>,
    /// Count instructions, not time: single-threaded TCG with QEMU's
    /// `-icount shift=0`, where the guest's clocks advance one nanosecond
    /// per instruction. A run is then deterministic (the same kernel gives
    /// the same figures to the cycle, whatever the host is doing), so two
    /// builds compare exactly: `cycles/fault` is about the instructions per
    /// fault, `faults/s` the faults per 10^9 instructions (both counting the
    /// user loop and munmap in the window). The vCPUs take turns on one host
    /// thread, so it measures no scaling: no target verdicts, and `--check`,
    /// `--pairs` and `--accel kvm` are refused.
    #[arg(long)]
    icount: bool,
    /// Per-boot timeout in seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// An extra QEMU argument for every boot (repeatable), for experiments:
    /// e.g. `--qemu-arg=-smp --qemu-arg=1,maxcpus=2` runs one vCPU in QEMU's
    /// parallel mode (a later `-smp` overrides the bench's).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
    /// A kernel command-line option for every boot (repeatable), for A/B
    /// experiments in one session: e.g. `--kernel-arg spinlock=tas` against
    /// the default (README, "Kernel command line").
    #[arg(long = "kernel-arg", value_name = "KEY=VALUE", value_parser = kernel_arg)]
    kernel_args: Vec<String>,
}

/// A `KEY=VALUE` kernel option: one word, since the command line is split
/// at spaces.
fn kernel_arg(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() && !s.contains(char::is_whitespace) => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not KEY=VALUE (one word, e.g. spinlock=tas)")),
    }
}

/// One (workload, lock, fault lock, cpus) measurement.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) workload: String,
    pub(crate) lock: &'static str,
    pub(crate) fault_lock: &'static str,
    pub(crate) cpus: u32,
    /// With `--pairs`: which 1 -> 2 vCPU pair (from 1) this boot belongs to.
    pub(crate) pair: Option<u32>,
}

/// The fork figures of a `fork` run's raw result: the median fork's
/// milliseconds and cycles per 4 KiB entry it shared, over the windows.
fn fork_figures(raw: &Value, tsc_per_us: f64) -> Option<(f64, f64, u64)> {
    let cycles: Vec<f64> = raw["fork"]["cycles"].as_array()?.iter().filter_map(Value::as_f64).collect();
    let ptes: Vec<f64> = raw["fork"]["ptes"].as_array()?.iter().filter_map(Value::as_f64).collect();
    if cycles.is_empty() || cycles.len() != ptes.len() || ptes.iter().any(|&p| p <= 0.0) {
        return None;
    }
    let mut per_pte: Vec<f64> = cycles.iter().zip(&ptes).map(|(c, p)| c / p).collect();
    let ms = median(&mut cycles.iter().map(|c| c / tsc_per_us / 1000.0).collect::<Vec<_>>());
    Some((ms, median(&mut per_pte), ptes[0] as u64))
}

/// Whether `workload` zaps with `MADV_DONTNEED` (and so reclaims tables).
/// The workloads whose threads can take turns in runs of pages
/// (`same-table:N`).
const CHUNKED: [&str; 2] = ["same-table", "madvise-same-table"];

/// A workload as `--workloads` names it: one of [`WORKLOADS`], and for the
/// shared-table ones `NAME:N`, threads taking turns in runs of `N` pages
/// instead of page by page (the kernel's `chunk=N`; a diagnostic shape,
/// with no target verdicts). Returns the workload and `N` (1 without a
/// suffix; 0 for a suffix that is not a number, refused by [`plan`]).
pub(crate) fn chunked(workload: &str) -> (&str, u64) {
    match workload.split_once(':') {
        Some((w, n)) => (w, n.parse().unwrap_or(0)),
        None => (workload, 1),
    }
}

/// Refuses a workload name this kernel's bench does not run: not one of
/// [`WORKLOADS`], or a `:N` on a workload that takes no runs of pages.
pub(crate) fn check_workload(w: &str) -> Result<()> {
    let (base, chunk) = chunked(w);
    if !WORKLOADS.contains(&base) {
        bail!("unknown workload {w:?}; known: {}", WORKLOADS.join(", "));
    }
    if base != w && (!CHUNKED.contains(&base) || chunk < 2) {
        bail!(
            "workload {w:?}: NAME:N (threads taking turns in runs of N pages) is for {} only, with N of 2 or more (e.g. same-table:8: each thread has whole lines of PTEs; same-table:512: whole PTE tables)",
            CHUNKED.join(" and ")
        );
    }
    Ok(())
}

fn is_madvise(workload: &str) -> bool {
    workload.starts_with("madvise")
}

fn plan(args: &BenchArgs) -> Result<Vec<Run>> {
    let (ptlk, linux) = (args.guest.contains(&GuestKind::Ptlk), args.guest.contains(&GuestKind::Linux));
    if !linux {
        if args.linux != LinuxSource::System {
            bail!(
                "--linux {} chooses the Linux of --guest linux, and this bench boots no Linux: add --guest linux (or ptlk,linux)",
                args.linux
            );
        }
        return plan_ptlk(args);
    }
    let linux_runs = plan_linux(args, ptlk)?;
    if !ptlk {
        return Ok(linux_runs);
    }
    // This kernel in the same shape: Linux's workloads.
    let shared = BenchArgs { workloads: linux_workloads(args), guest: vec![GuestKind::Ptlk], ..args.clone() };
    let mut runs = plan_ptlk(&shared)?;
    // Interleaved: per workload, ptlk's pair k, then Linux's, then the
    // other CPU counts (a stable sort keeps ptlk's runs first).
    runs.extend(linux_runs);
    let order = |r: &Run| {
        let w = linux::WORKLOADS.iter().position(|w| *w == r.workload).unwrap_or(usize::MAX);
        (w, r.pair.unwrap_or(u32::MAX))
    };
    runs.sort_by_key(order);
    Ok(runs)
}

/// The workloads of a bench with the Linux guest: Linux's two unless
/// `--workloads` names others.
fn linux_workloads(args: &BenchArgs) -> Vec<String> {
    if args.workloads.join(",") == DEFAULT_WORKLOADS {
        linux::WORKLOADS.iter().map(|w| w.to_string()).collect()
    } else {
        args.workloads.clone()
    }
}

/// The runs of this kernel (`--guest ptlk`).
fn plan_ptlk(args: &BenchArgs) -> Result<Vec<Run>> {
    for w in &args.workloads {
        check_workload(w)?;
    }
    if args.quick && args.check {
        bail!(
            "--check with --quick: --quick measures smaller regions in shorter windows, not the targets' shape, so it gives no target verdicts; drop --quick (e.g. `cargo xtask bench --pairs 5 --check`)"
        );
    }
    if args.quick && args.pairs.is_some() {
        bail!("--pairs with --quick: --quick has its own fixed runs; use --pairs with --cpus/--workloads instead");
    }
    if args.pairs == Some(0) || args.ceiling == Some(0) {
        bail!("--pairs and --ceiling take a count of 1 or more");
    }
    if args.ceiling.is_some() && (args.pairs.is_some() || args.check || args.quick || args.icount) {
        bail!(
            "--ceiling with --pairs, --check, --quick or --icount: --ceiling measures the host (two 1-vCPU VMs at once against one alone), not the kernel's scaling, so it gives no target verdicts; run it on its own, e.g. `cargo xtask bench --ceiling 5 --workloads disjoint,same-table`"
        );
    }
    if args.icount && (args.check || args.pairs.is_some()) {
        bail!(
            "--icount with --check or --pairs: under --icount the vCPUs take turns on one host thread, so it measures instructions per fault, not scaling, and gives no target verdicts; drop --icount for the targets (e.g. `cargo xtask bench --pairs 5 --check`)"
        );
    }
    if args.icount {
        qemu::choose_accel_icount(true, args.accel)?;
    }
    let default_locks =
        if args.pairs.is_some() { vec!["split".to_string()] } else { vec!["split".into(), "single".into()] };
    let locks = args.locks.clone().unwrap_or(default_locks);
    for l in &locks {
        if l != "split" && l != "single" {
            bail!("unknown lock mode {l:?}; known: split, single");
        }
    }
    for f in &args.fault_lock {
        if !FAULT_LOCKS.contains(&f.as_str()) {
            bail!("unknown fault lock {f:?}; known: {}", FAULT_LOCKS.join(", "));
        }
    }
    check_cpus(args)?;
    for w in &args.workloads {
        check_rounds(w, rounds_for(args, w), args.window_ms)?;
    }
    if args.window_ms == 0 && args.workloads.iter().any(|w| w == TRAPS) {
        bail!("traps with --window-ms 0: its windows are a time, not passes; give --window-ms (default 2000)");
    }
    if let Some(mib) = args.mib
        && (mib == 0 || mib % 2 != 0)
        && !args.quick
        && args.workloads.iter().any(|w| is_madvise(w))
    {
        bail!("--mib {mib}: the madvise workloads need an even, nonzero MiB count (they zap whole 2 MiB regions)");
    }
    // In FAULT_LOCKS order, each once.
    let fault_locks: Vec<&'static str> =
        FAULT_LOCKS.into_iter().filter(|f| args.fault_lock.iter().any(|a| a == f)).collect();
    if fault_locks.is_empty() {
        bail!("--fault-lock needs at least one of {}", FAULT_LOCKS.join(", "));
    }
    let mut runs = Vec::new();
    if args.quick {
        for &fault_lock in &fault_locks {
            for (lock, cpus) in [("split", 1), ("split", 2), ("split", 8), ("single", 8)] {
                runs.push(Run { workload: "disjoint".into(), lock, fault_lock, cpus, pair: None });
            }
        }
        return Ok(runs);
    }
    for lock in ["split", "single"] {
        if !locks.iter().any(|l| l == lock) {
            continue;
        }
        for &fault_lock in &fault_locks {
            for w in &args.workloads {
                // Exceptions take no page-table lock: one build is enough.
                if w == TRAPS && lock == "single" && args.locks.is_none() {
                    continue;
                }
                runs.extend(cpu_runs(args, w, lock, fault_lock));
            }
        }
    }
    Ok(runs)
}

/// The runs of `--guest linux`: its two workloads, `--cpus` and `--pairs`
/// as for this kernel, labelled [`LINUX`]; `fault_lock` is set once the
/// kernel's release is known ([`linux::fault_lock`]). `with_ptlk`: this
/// kernel runs too, and takes the flags that are its own.
fn plan_linux(args: &BenchArgs, with_ptlk: bool) -> Result<Vec<Run>> {
    let own = !with_ptlk;
    let refused = [
        (own && args.locks.is_some(), "--locks"),
        (own && args.fault_lock != ["vma"], "--fault-lock"),
        (own && !args.kernel_args.is_empty(), "--kernel-arg"),
        (own && args.check, "--check"),
        (args.rounds.is_some(), "--rounds"),
        (args.quick, "--quick"),
        (args.ceiling.is_some(), "--ceiling"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        bail!(
            "{flag} with --guest linux: Linux is measured as the reference, in the targets' shape only (it has no lock builds, its release decides how faults lock, and the targets are this kernel's); drop {flag}"
        );
    }
    if args.icount && args.pairs.is_some() {
        bail!(
            "--icount with --pairs: under --icount the vCPUs take turns on one host thread, so it counts instructions per fault and measures no scaling; drop --pairs (e.g. `cargo xtask bench --guest linux --icount --cpus 1`)"
        );
    }
    let workloads = linux_workloads(args);
    if let Some(w) = workloads.iter().find(|w| !linux::WORKLOADS.contains(&w.as_str())) {
        bail!("--guest linux runs {} only, not {w:?}", linux::WORKLOADS.join(" and "));
    }
    if args.window_ms == 0 {
        bail!("--guest linux with --window-ms 0: its windows are a time (give --window-ms, default 2000)");
    }
    check_cpus(args)?;
    Ok(workloads.iter().flat_map(|w| cpu_runs(args, w, LINUX, "mmap")).collect())
}

fn check_cpus(args: &BenchArgs) -> Result<()> {
    if args.cpus.iter().any(|&c| c == 0 || c > 64) {
        bail!("--cpus takes counts in 1..=64");
    }
    Ok(())
}

/// The boots of one (workload, lock, fault lock): the `--pairs` first, then
/// each other count of `--cpus` once (the 1 and 2 of `--cpus` give way to
/// the pairs).
///
/// The pairs alternate their order, 1, 2, then 2, 1, then 1, 2, ... (an
/// ABBA design): these hosts drift for minutes at a time, and with every
/// pair 1 then 2, a host that speeds up (or slows down) through the run
/// favours (or penalizes) every 2-vCPU boot, which biases every ratio the
/// same way; alternating cancels a steady drift between consecutive pairs.
fn cpu_runs(args: &BenchArgs, workload: &str, lock: &'static str, fault_lock: &'static str) -> Vec<Run> {
    let run = |cpus, pair| Run { workload: workload.to_string(), lock, fault_lock, cpus, pair };
    let mut runs: Vec<Run> = (1..=args.pairs.unwrap_or(0))
        .flat_map(|k| {
            let order = if k % 2 == 1 { [1, 2] } else { [2, 1] };
            order.map(|cpus| run(cpus, Some(k)))
        })
        .collect();
    let mut cpus: Vec<u32> = Vec::new();
    for &c in &args.cpus {
        if !cpus.contains(&c) && !(args.pairs.is_some() && (c == 1 || c == 2)) {
            cpus.push(c);
        }
    }
    runs.extend(cpus.into_iter().map(|c| run(c, None)));
    runs
}

/// How the boot summary says faults lock: `vma` or `mmap` (from the
/// `boot: page-table locks: ...; faults lock ...` line), or `None` if no
/// such line is in `log`.
fn reported_fault_lock(log: &str) -> Option<&'static str> {
    let line = log.lines().find(|l| l.contains("boot: page-table locks:"))?;
    let how = line.split_once("faults lock ")?.1;
    if how.starts_with("their VMA") {
        Some("vma")
    } else if how.starts_with("mmap_lock") {
        Some("mmap")
    } else {
        None
    }
}

/// Fails unless the boot summary in `log` reports the fault locking `want`.
fn check_fault_lock(log: &str, want: &str) -> Result<()> {
    match reported_fault_lock(log) {
        Some(got) if got == want => Ok(()),
        Some(got) => bail!("asked for fault_lock={want}, but the boot summary says faults lock {got}"),
        None => bail!("asked for fault_lock={want}, but no boot summary line says how faults lock"),
    }
}

/// A table cell: the number, or `-` where the run has none.
fn number_or_dash(v: &Value) -> String {
    if v.is_null() { "-".into() } else { v.to_string() }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

pub(crate) fn find_result(log: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .find_map(|l| l.split_once("BENCH-RESULT ").map(|(_, j)| j.to_string()))
        .with_context(|| format!("no BENCH-RESULT line in {}", log.display()))?;
    serde_json::from_str(&line).with_context(|| format!("bad BENCH-RESULT JSON in {}", log.display()))
}

/// Faults a window may take beyond one per page touched: each thread's
/// stack and the program's text and data on first use, and the odd fault
/// on a page another CPU was installing (counted once per thread at most).
fn fault_slack(cpus: u32, touched: u64) -> u64 {
    64 * cpus as u64 + 64 + touched / 100
}

/// Fails unless a window's fault count fits its pages: at least the
/// faults the pages need (`min_faults`: every page touched was faulted in
/// once), at most one per page each thread touched plus [`fault_slack`].
/// Fewer means faults went uncounted or pages were never faulted (a
/// mapping that was populated, or a touch loop that skipped pages); more
/// means faults repeated (a fault that did not make progress, a lost
/// mapping).
///
/// `populate`'s pages are made present by `madvise` before they are
/// written, so its writes may take only the slack's faults.
fn check_fault_count(window: &Value, cpus: u32, workload: &str) -> Result<()> {
    let get = |k: &str| window[k].as_u64().with_context(|| format!("no `{k}` in the window's result"));
    let (faults, touched, min) = (get("faults")?, get("touched")?, get("min_faults")?);
    if touched == 0 {
        bail!("no page was touched");
    }
    if workload == POPULATE {
        let max = fault_slack(cpus, 0);
        if faults > max {
            bail!("{faults} faults for {touched} pages made present by madvise first: expected at most {max}");
        }
        return Ok(());
    }
    let max = touched + fault_slack(cpus, touched);
    if faults < min || faults > max {
        bail!(
            "{faults} faults for {touched} pages touched: expected {min}..={max} (one fault per page, and a few for stacks and text)"
        );
    }
    Ok(())
}

/// Whether `workload`'s rate counts pages made present rather than fault
/// returns: with every thread touching the same pages, a fault that lost
/// the race or found the page already there does no useful work.
pub(crate) fn counts_present(workload: &str) -> bool {
    workload == "same-page"
}

/// Turns the kernel's raw result into the run record of faultstorm.json.
///
/// `faults_per_sec` (with its min and max over the windows) is the run's
/// rate of useful work: fault returns per second, or for `same-page`
/// ([`counts_present`]) pages made present per second; `counts` says which.
/// `fault_returns_per_sec` is always the fault returns.
pub(crate) fn summarize(run: &Run, raw: &Value) -> Result<Value> {
    let tsc_per_us = raw["tsc_per_us"].as_f64().filter(|&t| t > 0.0).context("no TSC rate")?;
    let windows = raw["windows"].as_array().context("no windows")?;
    let present_counted = counts_present(&run.workload);
    let (mut rates, mut fault_rates): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let (mut faults, mut cycles, mut present, mut lost, mut spurious) = (0u64, 0u64, 0u64, 0u64, 0u64);
    // CPU time the threads spent waiting, over all windows (None: a kernel
    // that does not report it).
    let mut waiting = Some(0u64);
    for (i, w) in windows.iter().enumerate() {
        let f = w["faults"].as_u64().unwrap_or(0);
        let c = w["cycles"].as_u64().unwrap_or(0).max(1);
        let wait = w["waiting_cycles"].as_u64();
        if let Some(wait) = wait
            && wait > c * u64::from(run.cpus)
        {
            bail!("window {}: threads waited {wait} cycles, more than {} CPUs x {c} cycles", i + 1, run.cpus);
        }
        waiting = waiting.zip(wait).map(|(a, b)| a + b);
        let secs = c as f64 / tsc_per_us / 1e6;
        faults += f;
        cycles += c;
        lost += w["lost_races"].as_u64().unwrap_or(0);
        spurious += w["spurious_faults"].as_u64().unwrap_or(0);
        fault_rates.push(f as f64 / secs);
        if present_counted {
            let p = w["present"]
                .as_u64()
                .with_context(|| format!("window {}: no `present` (pages made present) in the result", i + 1))?;
            if p == 0 || p > f {
                bail!("window {}: {p} pages made present by {f} faults (each needs a fault of its own)", i + 1);
            }
            present += p;
            rates.push(p as f64 / secs);
        } else {
            present += w["present"].as_u64().unwrap_or(0);
            // `populate`'s work is the pages it wrote, not its few faults.
            let work = if run.workload == POPULATE { w["touched"].as_u64().unwrap_or(0) } else { f };
            rates.push(work as f64 / secs);
        }
    }
    let min = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = rates.iter().cloned().fold(0.0, f64::max);
    let med = median(&mut rates.clone());
    let n_windows = windows.len().max(1) as f64;
    let round_trip = round_trips(windows, run.cpus)?;
    let mm = &raw["mm"];
    // The kernel's own word on its fault locking, and its counters, agree
    // with the boot summary (checked before) or the run is not what it says.
    if let Some(k) = raw["fault_lock"].as_str()
        && k != run.fault_lock
    {
        bail!("asked for fault_lock={}, but the kernel's result says fault_lock={k}", run.fault_lock);
    }
    // A kernel that ignored `chunk=N` ran the page-by-page shape.
    let chunk = chunked(&run.workload).1;
    if chunk != 1 && raw["chunk"].as_u64() != Some(chunk) {
        bail!(
            "asked for {} (runs of {chunk} pages), but the kernel's result says chunk={}",
            run.workload,
            raw["chunk"]
        );
    }
    let vma_lock_faults = mm["vma_lock_faults"].as_u64().unwrap_or(0);
    if run.fault_lock == "mmap" && vma_lock_faults > 0 {
        bail!("fault_lock=mmap, but {vma_lock_faults} faults were resolved under a VMA lock");
    }
    // The same for the page-table locks: the kernel built for `single`
    // must not have split PTE locks, nor `split` lack them. A Linux guest
    // has no lock builds, but must be the guest that was asked for.
    let linux_result = raw["guest"] == LINUX;
    if linux_result != (run.lock == LINUX) {
        bail!(
            "asked for the {} run, but the result is {}from a Linux guest",
            run.lock,
            if linux_result { "" } else { "not " }
        );
    }
    match raw["split_pte_ptlocks"].as_bool() {
        _ if linux_result => {}
        Some(split) if split == (run.lock == "split") => {}
        Some(split) => bail!(
            "asked for the {} lock build, but the kernel's result says split PTE locks are {}",
            run.lock,
            if split { "on" } else { "off" }
        ),
        None => bail!("the kernel's result does not say whether PTE locks are split"),
    }
    for (i, w) in windows.iter().enumerate() {
        check_fault_count(w, run.cpus, &run.workload).with_context(|| format!("window {}", i + 1))?;
    }
    let pt_reclaimed = mm["pt_reclaimed"].as_u64().unwrap_or(0);
    // `populate`'s few faults (stacks, text) say nothing of its pages.
    let fault_cost = |key: &str| if run.workload == POPULATE { Value::Null } else { raw[key].clone() };
    let fork = match fork_figures(raw, tsc_per_us) {
        Some((ms, per_pte, ptes)) => json!({"ms": ms, "cycles_per_pte": per_pte, "ptes": ptes}),
        None if run.workload == "fork" => bail!("a fork run's result has no fork cycles and entries"),
        None => Value::Null,
    };
    Ok(json!({
        "workload": run.workload,
        "lock": run.lock,
        "fault_lock": run.fault_lock,
        "cpus": run.cpus,
        "faults": faults,
        "seconds": cycles as f64 / tsc_per_us / 1e6,
        "stats_cycles": raw["stats_cycles"],
        "pair": run.pair,
        "counts": match run.workload.as_str() {
            _ if present_counted => "pages made present",
            TRAPS => "exception round trips",
            POPULATE => "pages written (made present by madvise)",
            _ => "fault returns",
        },
        "faults_per_sec": med,
        "faults_per_sec_min": min,
        "faults_per_sec_max": max,
        "faults_per_sec_per_cpu": med / run.cpus as f64,
        "fault_returns_per_sec": median(&mut fault_rates),
        "present": present,
        "lost_races": lost,
        "spurious_faults": spurious,
        "lost_races_per_window": lost as f64 / n_windows,
        "spurious_faults_per_window": spurious as f64 / n_windows,
        // Share of the CPUs' time in the windows the threads spent waiting
        // (barriers, thread 0's munmap, uneven finishes): what a 1 -> 2
        // ratio loses to the workload's serial parts.
        "waiting_share": waiting.map(|w| w as f64 / (cycles as f64 * f64::from(run.cpus))),
        "cycles_per_fault_mean": fault_cost("cycles_per_fault_mean"),
        "cycles_per_fault_p99": fault_cost("cycles_per_fault_p99"),
        // A cache line's round trip between two of the guest's vCPUs after
        // each window (ns): where the host had them (see `round_trips`).
        "round_trip_ns": round_trip,
        "windows": windows,
        "locks": raw["locks"],
        "lock_halts": raw["lock_halts"],
        "lock_kicks": raw["lock_kicks"],
        "mm": mm,
        "pt_reclaimed_per_window": pt_reclaimed as f64 / windows.len().max(1) as f64,
        "fork": fork,
    }))
}

/// The words for a run's `round_trip_ns` (None if it has none).
fn describe_round_trip(rt: &Value) -> Option<String> {
    let f = |k: &str| rt[k].as_f64();
    let unanswered = match rt["unanswered"].as_u64()? {
        0 => String::new(),
        n => format!(", {n} window(s) unanswered"),
    };
    Some(match f("median") {
        Some(m) => format!("vCPU round trip {m:.0} ns (windows {:.0}-{:.0}{unanswered})", f("min")?, f("max")?),
        None => format!("vCPU round trip unmeasured{unanswered}"),
    })
}

/// The median, min and max over the windows of the kernel's measure, after
/// each window, of a cache line's round trip between two of its vCPUs
/// (kernel `workload::roundtrip`), as `{median, min, max, unanswered}` in ns;
/// null for one vCPU, or a kernel (or Linux guest) that does not measure it.
/// `unanswered` counts the windows after which the other vCPU did not answer
/// within the kernel's second (the host kept it off its cores).
fn round_trips(windows: &[Value], cpus: u32) -> Result<Value> {
    let (mut ns, mut unanswered) = (Vec::new(), 0);
    for (i, w) in windows.iter().enumerate() {
        match w.get("round_trip_ns") {
            None => return Ok(Value::Null),
            Some(Value::Null) if cpus > 1 => unanswered += 1,
            Some(Value::Null) => return Ok(Value::Null),
            Some(v) => ns.push(v.as_f64().with_context(|| format!("window {}: round_trip_ns {v}", i + 1))?),
        }
    }
    if ns.is_empty() && unanswered == 0 {
        return Ok(Value::Null);
    }
    let min = ns.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = ns.iter().cloned().fold(0.0, f64::max);
    let median = if ns.is_empty() { Value::Null } else { json!(median(&mut ns)) };
    Ok(json!({"median": median, "min": min, "max": max, "unanswered": unanswered}))
}

/// Passes per window for `workload` (see `BenchArgs::rounds`).
fn rounds_for(args: &BenchArgs, workload: &str) -> u64 {
    args.rounds.unwrap_or(default_rounds(workload, args.quick))
}

/// `--rounds 0`: each thread makes passes until the window's time is up.
pub(crate) const UNTIL_WINDOW_ENDS: u64 = 0;

/// The workloads whose windows can end with their time (`disjoint`'s and
/// `populate`'s threads wait for nobody; in `same-table` thread 0 says which pass is the
/// last), and by default do.
const TIME_BOUND: [&str; 3] = ["disjoint", "populate", "same-table"];

/// The default passes per window of `workload` (see `BenchArgs::rounds`).
pub(crate) fn default_rounds(workload: &str, quick: bool) -> u64 {
    match chunked(workload).0 {
        _ if quick => 1,
        w if TIME_BOUND.contains(&w) => UNTIL_WINDOW_ENDS,
        w if is_madvise(w) => 4,
        _ => 1,
    }
}

/// Refuses windows the kernel cannot time: a window of passes until the
/// time is up needs a time, and a workload that can stop when it is up
/// ([`TIME_BOUND`]).
pub(crate) fn check_rounds(workload: &str, rounds: u64, window_ms: u64) -> Result<()> {
    if rounds != UNTIL_WINDOW_ENDS {
        return Ok(());
    }
    if !TIME_BOUND.contains(&chunked(workload).0) {
        bail!(
            "--rounds 0 (passes until the window's time is up) with {workload}: its threads meet at barriers every pass with no way to agree on the last one; only disjoint, populate and same-table can (give {workload} a pass count, e.g. --rounds 4)"
        );
    }
    if window_ms == 0 {
        bail!(
            "{workload} with --window-ms 0: its windows are the passes made until the window's time is up, so they need a time; give --window-ms (default 2000) or a pass count with --rounds"
        );
    }
    Ok(())
}

/// The shape of a run's windows (the bench's `--windows`, `--mib`,
/// `--rounds`, `--window-ms`).
pub(crate) struct Windows {
    pub(crate) windows: u32,
    pub(crate) mib: u64,
    pub(crate) rounds: u64,
    pub(crate) window_ms: u64,
}

impl Windows {
    /// How a window's passes end, in words ("4 passes", or "passes for
    /// 2000 ms").
    pub(crate) fn passes(&self) -> String {
        if self.rounds == UNTIL_WINDOW_ENDS {
            format!("passes for {} ms", self.window_ms)
        } else {
            format!("{} passes", self.rounds)
        }
    }
}

/// The QEMU machine of one boot of `run` (`cargo xtask profile` boots the
/// same, with `profile=HZ` added to the command line): BIOS, `-smp` equal
/// to the CPU count, memory for the workload preallocated, the kernel in
/// `mode=bench`.
pub(crate) fn machine(run: &Run, w: &Windows, image: PathBuf, accel: Accel, qemu_args: &[String]) -> Machine {
    Machine {
        image,
        linux: None,
        firmware: Firmware::Bios,
        smp: run.cpus,
        mem: mem_for(run, w.mib),
        accel,
        icount: false,
        cmdline: format!(
            "mode=bench workload={} windows={} mib={} rounds={} window_ms={} fault_lock={}{}",
            chunked(&run.workload).0,
            w.windows,
            w.mib,
            w.rounds,
            w.window_ms,
            run.fault_lock,
            match chunked(&run.workload).1 {
                1 => String::new(),
                n => format!(" chunk={n}"),
            }
        ),
        extra: ["-mem-prealloc".to_string()].into_iter().chain(qemu_args.iter().cloned()).collect(),
        vcpu_time: Some(vcputime::STORM),
    }
}

/// The machine of one boot of `run` on the Linux guest: the same as this
/// kernel's ([`machine`]), booting Linux with the storm's initramfs.
fn linux_machine(run: &Run, w: &Windows, guest: &linux::Guest, accel: Accel, qemu_args: &[String]) -> Machine {
    let mut m = machine(run, w, guest.kernel.bzimage.clone(), accel, qemu_args);
    m.linux = Some(qemu::LinuxBoot { initrd: guest.initrd.clone() });
    m.cmdline = linux::cmdline(&run.workload, w.windows, w.mib, w.window_ms);
    m
}

/// `m` with the bench's `--kernel-arg` options appended to its command line.
fn with_kernel_args(mut m: Machine, kernel_args: &[String]) -> Machine {
    for a in kernel_args {
        m.cmdline.push(' ');
        m.cmdline.push_str(a);
    }
    m
}

fn mem_for(run: &Run, mib: u64) -> String {
    // Every disjoint thread holds its region at once; leave room for tables,
    // the heap and the kernel.
    let per_thread = matches!(chunked(&run.workload).0, "disjoint" | "populate" | "madvise" | "same-table");
    let need = 1024 + if per_thread { run.cpus as u64 * mib * 5 / 4 } else { mib * 2 };
    format!("{}M", need.max(2048))
}

pub fn run(args: BenchArgs) -> Result<bool> {
    let mut runs = plan(&args)?;
    let windows = args.windows.unwrap_or(if args.quick { 3 } else { 5 });
    let mib = args.mib.unwrap_or(if args.quick { 16 } else { 128 });
    let qemu_bin = setup::ensure_all(false)?;
    let guest = match runs.iter().any(|r| r.lock == LINUX) {
        true => {
            let guest = linux::prepare(&args.linux)?;
            println!("xtask: bench --guest linux: {}", linux::describe(&guest));
            for r in runs.iter_mut().filter(|r| r.lock == LINUX) {
                r.fault_lock = linux::fault_lock(&guest.kernel.release);
            }
            Some(guest)
        }
        false => None,
    };
    // Linux alone is the reference, with files of its own; with this kernel
    // beside it, the report is this kernel's.
    let linux_only = !args.guest.contains(&GuestKind::Ptlk);
    let (accel, why) = qemu::choose_accel_icount(args.icount, args.accel)?;
    let host_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("xtask: bench on {accel} ({why}); host has {host_cpus} CPUs; {} runs, {windows} windows each", runs.len());
    if args.icount {
        println!(
            "xtask: --icount: one virtual nanosecond per guest instruction, so faults/s is faults per 10^9 instructions and cycles/fault about instructions per fault; runs are deterministic, and the vCPUs take turns on one host thread"
        );
    }
    if host_cpus < 8 {
        println!(
            "xtask: note: with more vCPUs than host CPUs, throughput beyond {host_cpus} CPUs measures overcommit (and lock-holder preemption), not the guest alone"
        );
    }
    if let Some(rounds) = args.ceiling {
        return ceiling(&args, rounds, &qemu_bin, accel, windows, mib);
    }
    let probe = HostProbe::calibrate(host_cpus);
    let mut records = Vec::new();
    let mut built: Option<(&str, PathBuf)> = None;
    // A boot that fails for good ends the measuring, not the report: the
    // runs before it are written and printed, then the failure is returned.
    let mut failed: Option<(String, anyhow::Error)> = None;
    'runs: for (i, run) in runs.iter().enumerate() {
        let shape = Windows { windows, mib, rounds: rounds_for(&args, &run.workload), window_ms: args.window_ms };
        let mut machine = match &guest {
            Some(g) if run.lock == LINUX => linux_machine(run, &shape, g, accel, &args.qemu_args),
            _ => {
                let image = match &built {
                    Some((lock, image)) if *lock == run.lock => image.clone(),
                    _ => {
                        let config = BuildConfig {
                            release: true,
                            split_ptlock_cpus: (run.lock == "single").then_some(SINGLE_LOCK_CPUS),
                            features: Vec::new(),
                        };
                        let (_, image) = build_kernel(&config, Firmware::Bios)?;
                        built = Some((run.lock, image.clone()));
                        image
                    }
                };
                with_kernel_args(machine(run, &shape, image, accel, &args.qemu_args), &args.kernel_args)
            }
        };
        machine.icount = args.icount;
        let pair = run.pair.map(|k| format!("-pair{k}")).unwrap_or_default();
        let name = format!("bench-{}-{}-{}-{}cpu{pair}", run.workload, run.lock, run.fault_lock, run.cpus);
        // A boot during which the host was busy is repeated (up to
        // BUSY_RETRIES times); the boot with the freest host is kept.
        let mut kept: Option<(f64, Value)> = None;
        for attempt in 0..=BUSY_RETRIES {
            print!(
                "xtask: bench [{}/{}] {:18} {:6} {:4} {} CPU(s){} ... ",
                i + 1,
                runs.len(),
                run.workload,
                run.lock,
                run.fault_lock,
                run.cpus,
                run.pair.map(|k| format!(" pair {k}")).unwrap_or_default()
            );
            use std::io::Write as _;
            std::io::stdout().flush().ok();
            // Instruction counts do not depend on the host: no probe.
            let before = if args.icount { 1.0 } else { probe.capacity(run.cpus as usize) };
            let booted = retry_silent(|| boot(&qemu_bin, &machine, &name, run, args.timeout));
            let host = if args.icount { 1.0 } else { before.min(probe.capacity(run.cpus as usize)) };
            let (mut rec, elapsed) = match booted {
                Ok(b) => b,
                Err(e) => {
                    println!("FAILED");
                    failed = Some((name, e));
                    break 'runs;
                }
            };
            rec["rounds"] = json!(rounds_for(&args, &run.workload));
            rec["host_capacity"] = json!((host * 1000.0).round() / 1000.0);
            rec["attempts"] = json!(attempt + 1);
            let reclaimed = if is_madvise(&run.workload) {
                format!(", {:.0} PTE tables reclaimed/window", rec["pt_reclaimed_per_window"].as_f64().unwrap_or(0.0))
            } else if run.workload == "fork" {
                format!(
                    " (copy-on-write), fork of {} PTEs {:.1} ms = {:.0} cycles/PTE",
                    rec["fork"]["ptes"],
                    rec["fork"]["ms"].as_f64().unwrap_or(0.0),
                    rec["fork"]["cycles_per_pte"].as_f64().unwrap_or(0.0)
                )
            } else if counts_present(&run.workload) {
                format!(
                    " (pages made present; {:.0} fault returns/s, {:.1} lost races and {:.1} spurious faults/window)",
                    rec["fault_returns_per_sec"].as_f64().unwrap_or(0.0),
                    rec["lost_races_per_window"].as_f64().unwrap_or(0.0),
                    rec["spurious_faults_per_window"].as_f64().unwrap_or(0.0)
                )
            } else {
                String::new()
            };
            let vcpus = vcputime::describe(&rec["vcpu_threads"]).map(|d| format!(", {d}")).unwrap_or_default();
            let round_trip = describe_round_trip(&rec["round_trip_ns"]).map(|d| format!(", {d}")).unwrap_or_default();
            println!(
                "{:>12.0} faults/s (min {:.0}, max {:.0}){}{reclaimed}{}, {:.1} s, host {host:.2}{vcpus}{round_trip}",
                rec["faults_per_sec"].as_f64().unwrap(),
                rec["faults_per_sec_min"].as_f64().unwrap(),
                rec["faults_per_sec_max"].as_f64().unwrap(),
                rec["cycles_per_fault_mean"]
                    .as_f64()
                    .map(|c| format!(", {c:.0} cycles/fault mean"))
                    .unwrap_or_default(),
                rec["waiting_share"]
                    .as_f64()
                    .map(|w| format!(", threads waiting {:.1}%", 100.0 * w))
                    .unwrap_or_default(),
                elapsed.as_secs_f64()
            );
            if kept.as_ref().is_none_or(|(h, _)| host > *h) {
                kept = Some((host, rec));
            }
            if host >= BUSY_HOST {
                break;
            }
            if attempt < BUSY_RETRIES {
                println!(
                    "xtask: the host was busy during that boot (its threads ran at {:.0}% speed): repeating it",
                    host * 100.0
                );
                std::thread::sleep(Duration::from_secs(5));
            }
        }
        let (_, rec) = kept.expect("at least one attempt");
        records.push(rec);
    }
    let report = json!({
        "guest": args.guest.iter().map(|g| if *g == GuestKind::Linux { "linux" } else { "ptlk" }).collect::<Vec<_>>(),
        "linux_release": guest.as_ref().map(|g| g.kernel.release.clone()),
        "linux_cmdline": runs.iter().find(|r| r.lock == LINUX).map(|r| linux::cmdline(&r.workload, windows, mib, args.window_ms)),
        "accel": accel.to_string(),
        "accel_reason": why,
        "qemu_args": args.qemu_args,
        "kernel_args": args.kernel_args,
        "fault_locks": runs.iter().filter(|r| r.lock != LINUX).map(|r| r.fault_lock).fold(Vec::new(), |mut v, f| {
            if !v.contains(&f) {
                v.push(f);
            }
            v
        }),
        "host_cpus": host_cpus,
        "quick": args.quick,
        "icount": args.icount,
        "pairs": args.pairs,
        "check": args.check,
        "windows": windows,
        "mib": mib,
        "window_ms": args.window_ms,
        "runs": records,
        "incomplete": failed.as_ref().map(|(name, e)| json!({"failed_run": name, "error": format!("{e:#}")})),
    });
    let mut report = report;
    let pairs = pair_stats(&report);
    report["pair_stats"] = json!(pairs.iter().map(PairStats::to_json).collect::<Vec<_>>());
    let against = against_linux(&pairs);
    report["against_linux"] = json!(against);
    let no_targets = args.quick || args.icount || linux_only;
    let targets = if no_targets { Vec::new() } else { targets(&report, args.check) };
    report["targets"] = json!(targets.iter().map(Target::to_json).collect::<Vec<_>>());
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let stem = if linux_only { "linux" } else { "faultstorm" };
    let json_path = dir.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    print_pairs(&pairs);
    print_against_linux(&against);
    let svg = dir.join(format!("{stem}.svg"));
    plot(&report, &svg)?;
    println!("xtask: wrote {} and {}", json_path.display(), svg.display());
    if let Some(g) = guest.as_ref().filter(|_| linux_only) {
        println!(
            "\nno target verdicts: the targets are this kernel's; this measured Linux {} as the reference (compare with `cargo xtask bench --pairs N` in the same session)",
            g.kernel.release
        );
    } else if args.quick {
        println!(
            "\nno target verdicts: --quick measures 16 MiB regions in short windows, not the targets' shape (run without --quick, e.g. `cargo xtask bench --pairs 5 --check`)"
        );
    } else if args.icount {
        println!(
            "\nno target verdicts: --icount counts instructions with the vCPUs taking turns on one host thread, so it measures no scaling (run without --icount, e.g. `cargo xtask bench --pairs 5 --check`)"
        );
    } else {
        print_targets(&report, &targets);
    }
    if let Some((name, e)) = failed {
        return Err(e.context(format!(
            "bench stopped at `{name}`: the {} run(s) before it are in {} (marked incomplete)",
            report["runs"].as_array().map_or(0, Vec::len),
            json_path.display()
        )));
    }
    if args.check {
        check_verdict(&targets)?;
        println!("xtask: bench --check: every target met");
    }
    Ok(true)
}

/// A boot that ended with nothing on the serial port: QEMU or the firmware
/// stuck before the guest ran (for a Linux guest, booted directly, Linux
/// silent in its early boot, before `quiet` lets anything out). It says
/// nothing about the fault path being measured, so [`retry_silent`] repeats
/// it instead of ending a bench that may have run for an hour.
#[derive(Debug)]
struct NeverStarted(String);

impl std::fmt::Display for NeverStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NeverStarted {}

/// Repeats of a boot that never started ([`NeverStarted`]).
const SILENT_RETRIES: u32 = 2;

/// Runs `boot` (one boot), repeating it up to [`SILENT_RETRIES`] times while
/// it fails with [`NeverStarted`]; any other failure, or a boot that stays
/// silent, is returned as it is.
fn retry_silent<T>(mut boot: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match boot() {
            Err(e) if attempt <= SILENT_RETRIES && e.downcast_ref::<NeverStarted>().is_some() => {
                attempt += 1;
                println!(
                    "\nxtask: {e}\nxtask: the guest never ran, so that boot measured nothing: repeating it (attempt {attempt} of {})",
                    SILENT_RETRIES + 1
                );
            }
            result => return result,
        }
    }
}

/// One bench boot of `run` on `machine` (serial log `name`): its summarized
/// record and wall time. Fails if the kernel did not report success or
/// locked faults other than `run` asked.
fn boot(
    qemu_bin: &std::path::Path,
    machine: &Machine,
    name: &str,
    run: &Run,
    timeout: u64,
) -> Result<(Value, Duration)> {
    let out = qemu::run(qemu_bin, machine, name, machine.limits(Duration::from_secs(timeout)), None, false)?;
    if out.ending == qemu::Ending::Timeout(Expiry::Silent) {
        return Err(NeverStarted(out.describe(name)).into());
    }
    let text = std::fs::read_to_string(&out.log)?;
    if !out.kernel_succeeded() {
        // linux-storm says why it failed on a line of its own.
        let why = text.lines().find(|l| l.starts_with("BENCH-FAILED")).map(|l| format!(": {l}")).unwrap_or_default();
        bail!("{}{why} (serial log: {})", out.describe(name), out.log.display());
    }
    // Linux prints no boot summary; its release says how it locks faults.
    if run.lock != LINUX
        && let Err(e) = check_fault_lock(&text, run.fault_lock)
    {
        bail!("{name}: {e} (serial log: {})", out.log.display());
    }
    let mut rec = summarize(run, &find_result(&out.log)?)?;
    if let Some(v) = out.vcpu_time {
        rec["vcpu_threads"] = v.to_json();
    }
    Ok((rec, out.elapsed))
}

/// `cargo xtask test`'s Linux-guest step: `--guest linux`'s two storms on
/// 2 vCPUs, one short window each over 16 MiB per thread. Each must report
/// one fault per page written (the bench's check: THP off, every fault
/// counted) and `same-table` must have waited at its barriers (its passes
/// really alternated with thread 0's munmap). A one-line summary.
pub(crate) fn linux_test_step(qemu_bin: &std::path::Path, accel: Accel) -> Result<String> {
    let guest = linux::prepare(&LinuxSource::System)?;
    let fault_lock = linux::fault_lock(&guest.kernel.release);
    let shape = Windows { windows: 1, mib: 16, rounds: UNTIL_WINDOW_ENDS, window_ms: 500 };
    let mut parts = vec![format!("Linux {}", guest.kernel.release)];
    for w in linux::WORKLOADS {
        let run = Run { workload: w.into(), lock: LINUX, fault_lock, cpus: 2, pair: None };
        let machine = linux_machine(&run, &shape, &guest, accel, &[]);
        let (rec, _) = retry_silent(|| boot(qemu_bin, &machine, &format!("test-linux-{w}"), &run, 300))?;
        let waited = rec["waiting_share"].as_f64().unwrap_or(0.0);
        if w == "same-table" && waited <= 0.0 {
            bail!("Linux same-table on 2 vCPUs never waited at a barrier: its passes did not alternate");
        }
        // The host-side accounting of the storm's vCPU threads (vcputime.rs)
        // must have found both and seen the timed windows between its lines.
        let vcpus = &rec["vcpu_threads"];
        if vcpus["threads"].as_u64() != Some(2) || vcpus["running"].as_f64().is_none_or(|r| r <= 0.0) {
            bail!("Linux {w} on 2 vCPUs: no accounting of QEMU's 2 vCPU threads over the timed windows ({vcpus})");
        }
        parts.push(format!(
            "{w}: {} faults, {:.0}/s, vCPU threads ran {:.0}%",
            rec["faults"],
            rec["faults_per_sec"].as_f64().unwrap_or(0.0),
            100.0 * vcpus["running"].as_f64().unwrap_or(0.0)
        ));
    }
    Ok(parts.join("; "))
}

/// `--ceiling`: per workload, `rounds` rounds of one 1-vCPU boot alone, two
/// at once, and one 2-vCPU boot (see `BenchArgs::ceiling`); prints each
/// round's ratios, their medians and spreads, and writes them to
/// `target/bench/ceiling.json`.
fn ceiling(
    args: &BenchArgs,
    rounds: u32,
    qemu_bin: &std::path::Path,
    accel: Accel,
    windows: u32,
    mib: u64,
) -> Result<bool> {
    let (_, image) =
        build_kernel(&BuildConfig { release: true, split_ptlock_cpus: None, features: Vec::new() }, Firmware::Bios)?;
    let fault_lock = FAULT_LOCKS.into_iter().find(|f| args.fault_lock.iter().any(|a| a == f)).unwrap_or("vma");
    let rate = |rec: &Value| rec["faults_per_sec"].as_f64().unwrap_or(0.0);
    let mut report = Vec::new();
    for w in &args.workloads {
        let run = Run { workload: w.clone(), lock: "split", fault_lock, cpus: 1, pair: None };
        let run2 = Run { workload: w.clone(), lock: "split", fault_lock, cpus: 2, pair: None };
        let shape = Windows { windows, mib, rounds: rounds_for(args, w), window_ms: args.window_ms };
        let machine1 =
            with_kernel_args(machine(&run, &shape, image.clone(), accel, &args.qemu_args), &args.kernel_args);
        let machine2 =
            with_kernel_args(machine(&run2, &shape, image.clone(), accel, &args.qemu_args), &args.kernel_args);
        let name = |what: &str| format!("bench-{w}-ceiling-{what}");
        let mut rows = Vec::new();
        for k in 1..=rounds {
            let (alone, _) = boot(qemu_bin, &machine1, &name(&format!("{k}-alone")), &run, args.timeout)?;
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| boot(qemu_bin, &machine1, &name(&format!("{k}-a")), &run, args.timeout));
                let b = s.spawn(|| boot(qemu_bin, &machine1, &name(&format!("{k}-b")), &run, args.timeout));
                (a.join().expect("boot thread"), b.join().expect("boot thread"))
            });
            let (smp2, _) = boot(qemu_bin, &machine2, &name(&format!("{k}-2cpu")), &run2, args.timeout)?;
            let (two, alone, smp2) = (rate(&a?.0) + rate(&b?.0), rate(&alone), rate(&smp2));
            if alone <= 0.0 || two <= 0.0 {
                bail!("{w}: a 1-vCPU boot of round {k} measured no faults");
            }
            println!(
                "xtask: ceiling {w} round {k}/{rounds}: one 1-vCPU VM {alone:.0} faults/s; two at once {two:.0} in all ({:.2}x); one 2-vCPU VM {smp2:.0} ({:.2}x, {:.0}% of two VMs)",
                two / alone,
                smp2 / alone,
                100.0 * smp2 / two
            );
            rows.push(json!({
                "round": k, "alone": alone, "two_at_once": two, "ratio": two / alone,
                "two_vcpus": smp2, "ratio_2vcpu": smp2 / alone, "two_vcpus_of_two_vms": smp2 / two,
            }));
        }
        let stats = |key: &str| {
            let v: Vec<f64> = rows.iter().filter_map(|r| r[key].as_f64()).collect();
            ratio_stats(&v).expect("at least one round")
        };
        let ((med, spread), (med2, spread2), (share, _)) =
            (stats("ratio"), stats("ratio_2vcpu"), stats("two_vcpus_of_two_vms"));
        report.push(json!({
            "workload": w, "median": med, "spread": spread, "median_2vcpu": med2, "spread_2vcpu": spread2,
            "median_two_vcpus_of_two_vms": share, "rounds": rows, "passes": shape.passes(),
        }));
    }
    println!(
        "\nhost ceiling for 1 -> 2 vCPU scaling ({accel}; two 1-vCPU VMs that share only the host, at once, against one alone), and one 2-vCPU VM in the same rounds ({windows} windows of {mib} MiB per thread)"
    );
    for r in &report {
        let list = |key: &str| {
            let values: Vec<f64> =
                r["rounds"].as_array().into_iter().flatten().map(|x| x[key].as_f64().unwrap_or(0.0)).collect();
            joined(&values, |v| format!("{v:.2}"))
        };
        let f = |key: &str| r[key].as_f64().unwrap_or(0.0);
        println!(
            "  {:<18} ({}) two VMs: median {:.2}x, spread {:.2} ({}); one 2-vCPU VM: median {:.2}x, spread {:.2} ({}); median {:.0}% of two VMs",
            r["workload"].as_str().unwrap_or(""),
            r["passes"].as_str().unwrap_or(""),
            f("median"),
            f("spread"),
            list("ratio"),
            f("median_2vcpu"),
            f("spread_2vcpu"),
            list("ratio_2vcpu"),
            100.0 * f("median_two_vcpus_of_two_vms")
        );
    }
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ceiling.json");
    let doc = json!({ "accel": accel.to_string(), "windows": windows, "mib": mib, "workloads": report });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!("xtask: wrote {}", path.display());
    Ok(true)
}

/// The fault-lock modes the report's runs used, in `FAULT_LOCKS` order.
fn fault_locks_in(report: &Value) -> Vec<&'static str> {
    let runs = report["runs"].as_array().cloned().unwrap_or_default();
    let ours = |r: &&Value| r["lock"] != LINUX;
    FAULT_LOCKS.into_iter().filter(|f| runs.iter().filter(ours).any(|r| r["fault_lock"] == *f)).collect()
}

fn print_table(report: &Value) {
    println!(
        "\nfault storm, {} on {} host CPUs (median of {} windows; faults/s, for same-page pages made present/s; lost, spur: faults per window that lost a race or were spurious; PT/win: PTE tables reclaimed by madvise per window)",
        report["accel"].as_str().unwrap_or("?"),
        report["host_cpus"],
        report["windows"]
    );
    println!(
        "{:<18} {:<7} {:<10} {:>4} {:>4} {:>12} {:>12} {:>12} {:>11} {:>6} {:>10} {:>9} {:>7} {:>7} {:>7}  top contended lock (spin share)",
        "workload",
        "lock",
        "fault_lock",
        "cpus",
        "pair",
        "faults/s",
        "min",
        "max",
        "per cpu",
        "wait%",
        "cyc/fault",
        "p99",
        "lost",
        "spur",
        "PT/win"
    );
    for r in report["runs"].as_array().into_iter().flatten() {
        let locks = r["locks"].as_object();
        let total_spin: f64 =
            locks.map(|m| m.values().map(|l| l["spin_cycles"].as_f64().unwrap_or(0.0)).sum()).unwrap_or(0.0);
        // Spinning as a share of the CPU time the counters cover (TSC
        // cycles, summed over the run's CPUs).
        let cpu_cycles = r["stats_cycles"].as_f64().unwrap_or(0.0) * r["cpus"].as_f64().unwrap_or(1.0);
        let top = locks
            .and_then(|m| {
                m.iter().max_by(|a, b| a.1["spin_cycles"].as_f64().partial_cmp(&b.1["spin_cycles"].as_f64()).unwrap())
            })
            .map(|(k, l)| {
                if total_spin > 0.0 {
                    let share = 100.0 * l["spin_cycles"].as_f64().unwrap_or(0.0) / cpu_cycles.max(1.0);
                    format!("{k} {share:.2}% ({}/{} contended)", l["contended"], l["acquisitions"])
                } else {
                    "none contended".to_string()
                }
            })
            .unwrap_or_default();
        let workload = r["workload"].as_str().unwrap_or("");
        let reclaimed = if is_madvise(workload) {
            format!("{:.0}", r["pt_reclaimed_per_window"].as_f64().unwrap_or(0.0))
        } else {
            "-".to_string()
        };
        let pair = r["pair"].as_u64().map_or("-".to_string(), |k| k.to_string());
        let per_window = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:<18} {:<7} {:<10} {:>4} {:>4} {:>12.0} {:>12.0} {:>12.0} {:>11.0} {:>6} {:>10} {:>9} {:>7} {:>7} {:>7}  {}",
            workload,
            r["lock"].as_str().unwrap_or(""),
            r["fault_lock"].as_str().unwrap_or(""),
            r["cpus"],
            pair,
            r["faults_per_sec"].as_f64().unwrap_or(0.0),
            r["faults_per_sec_min"].as_f64().unwrap_or(0.0),
            r["faults_per_sec_max"].as_f64().unwrap_or(0.0),
            r["faults_per_sec_per_cpu"].as_f64().unwrap_or(0.0),
            r["waiting_share"].as_f64().map_or("-".to_string(), |w| format!("{:.1}", 100.0 * w)),
            number_or_dash(&r["cycles_per_fault_mean"]),
            number_or_dash(&r["cycles_per_fault_p99"]),
            per_window("lost_races_per_window"),
            per_window("spurious_faults_per_window"),
            reclaimed,
            top
        );
    }
    let forks: Vec<&Value> =
        report["runs"].as_array().into_iter().flatten().filter(|r| r["fork"].is_object()).collect();
    if !forks.is_empty() {
        println!("\nfork (median of the windows; the faults/s above are the copy-on-write faults after it)");
        println!(
            "{:<7} {:<10} {:>4} {:>10} {:>10} {:>12}",
            "lock", "fault_lock", "cpus", "PTEs", "fork ms", "cycles/PTE"
        );
        for r in forks {
            println!(
                "{:<7} {:<10} {:>4} {:>10} {:>10.2} {:>12.0}",
                r["lock"].as_str().unwrap_or(""),
                r["fault_lock"].as_str().unwrap_or(""),
                r["cpus"],
                r["fork"]["ptes"],
                r["fork"]["ms"].as_f64().unwrap_or(0.0),
                r["fork"]["cycles_per_pte"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

/// The runs of (`workload`, `lock`, `fault_lock`) on `cpus` CPUs (several
/// with `--pairs`).
fn runs_of<'a>(report: &'a Value, workload: &str, lock: &str, fault_lock: &str, cpus: u64) -> Vec<&'a Value> {
    report["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["workload"] == workload
                && r["lock"] == lock
                && r["fault_lock"] == fault_lock
                && r["cpus"].as_u64() == Some(cpus)
        })
        .collect()
}

/// The rate of (`workload`, `lock`, `fault_lock`) on `cpus` CPUs: the
/// median over its runs (one, or one per pair with `--pairs`).
fn rate_of(report: &Value, workload: &str, lock: &str, fault_lock: &str, cpus: u64) -> Option<f64> {
    let mut rates: Vec<f64> =
        runs_of(report, workload, lock, fault_lock, cpus).iter().filter_map(|r| r["faults_per_sec"].as_f64()).collect();
    (!rates.is_empty()).then(|| median(&mut rates))
}

/// The median and the spread (max - min) of some ratios, or `None` if
/// there are none.
pub(crate) fn ratio_stats(ratios: &[f64]) -> Option<(f64, f64)> {
    if ratios.is_empty() {
        return None;
    }
    let max = ratios.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
    Some((median(&mut ratios.to_vec()), max - min))
}

/// One pair of boots: the 1-vCPU and the 2-vCPU rate.
#[derive(Clone, Debug)]
pub(crate) struct Pair {
    /// Its index (from 1); 0 for the plain 1- and 2-CPU runs of a bench
    /// without `--pairs`.
    pub(crate) index: u32,
    pub(crate) one: f64,
    pub(crate) two: f64,
    /// The lower host capacity of its two boots.
    pub(crate) host: f64,
    /// The share of its 2-vCPU boot's timed windows its vCPU threads spent
    /// on a host CPU (`vcputime.rs`), if it was measured.
    pub(crate) ran: Option<f64>,
    /// The median cache-line round trip between its 2-vCPU boot's vCPUs
    /// after each window, in ns (`round_trips`), if it was measured.
    pub(crate) rt: Option<f64>,
    /// The larger share of the host's CPU time its hypervisor stole during
    /// either boot's timed windows (`vcputime.rs`), if the host reports it.
    pub(crate) steal: Option<f64>,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.two / self.one
    }
}

/// The 1 -> 2 vCPU scaling of one (workload, lock, fault lock).
#[derive(Clone, Debug)]
pub(crate) struct PairStats {
    pub(crate) workload: String,
    pub(crate) lock: String,
    pub(crate) fault_lock: String,
    /// Whether the pairs are `--pairs` boots (else one pair made of the
    /// plain 1- and 2-CPU runs).
    pub(crate) interleaved: bool,
    pub(crate) pairs: Vec<Pair>,
}

impl PairStats {
    fn ratios(&self) -> Vec<f64> {
        self.pairs.iter().map(Pair::ratio).collect()
    }

    /// The median ratio of the pairs.
    pub(crate) fn median(&self) -> f64 {
        ratio_stats(&self.ratios()).map_or(0.0, |s| s.0)
    }

    /// Max - min of the pairs' ratios (0 for one pair).
    pub(crate) fn spread(&self) -> f64 {
        ratio_stats(&self.ratios()).map_or(0.0, |s| s.1)
    }

    /// Pairs with a boot during which the host was busy.
    fn busy(&self) -> usize {
        self.pairs.iter().filter(|p| p.host < BUSY_HOST).count()
    }

    fn to_json(&self) -> Value {
        json!({
            "workload": self.workload,
            "lock": self.lock,
            "fault_lock": self.fault_lock,
            "interleaved": self.interleaved,
            "ratios": self.ratios(),
            "faults_per_sec_1": self.pairs.iter().map(|p| p.one).collect::<Vec<_>>(),
            "faults_per_sec_2": self.pairs.iter().map(|p| p.two).collect::<Vec<_>>(),
            "host_capacity": self.pairs.iter().map(|p| p.host).collect::<Vec<_>>(),
            "round_trip_ns_2": self.pairs.iter().map(|p| p.rt).collect::<Vec<_>>(),
            "host_steal": self.pairs.iter().map(|p| p.steal).collect::<Vec<_>>(),
            "median": self.median(),
            "spread": self.spread(),
        })
    }
}

/// Pair `index` of a 1-vCPU boot `a` and a 2-vCPU boot `b`; `None` if
/// either lacks a rate or the 1-vCPU rate is zero.
fn pair_of(index: u32, a: &Value, b: &Value) -> Option<Pair> {
    let rate = |r: &Value| r["faults_per_sec"].as_f64();
    let host = |r: &Value| r["host_capacity"].as_f64().unwrap_or(1.0);
    let steal = |r: &Value| r["vcpu_threads"]["host_steal"].as_f64();
    let (one, two) = (rate(a)?, rate(b)?);
    (one > 0.0).then(|| Pair {
        index,
        one,
        two,
        host: host(a).min(host(b)),
        ran: b["vcpu_threads"]["running"].as_f64(),
        rt: b["round_trip_ns"]["median"].as_f64(),
        steal: steal(a).into_iter().chain(steal(b)).reduce(f64::max),
    })
}

/// The 1 -> 2 vCPU pairs of every (workload, lock, fault lock) in the
/// report, in the order of its runs: the `--pairs` boots (a pair missing
/// one of its boots is left out), or, where there are none, the plain 1-
/// and 2-CPU runs as one pair.
pub(crate) fn pair_stats(report: &Value) -> Vec<PairStats> {
    let runs = report["runs"].as_array().cloned().unwrap_or_default();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in &runs {
        let key = (
            r["workload"].as_str().unwrap_or("").to_string(),
            r["lock"].as_str().unwrap_or("").to_string(),
            r["fault_lock"].as_str().unwrap_or("").to_string(),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut out = Vec::new();
    for (w, l, fl) in keys {
        let of = |cpus: u64| runs_of(report, &w, &l, &fl, cpus);
        let (ones, twos) = (of(1), of(2));
        let mut indices: Vec<u32> =
            ones.iter().chain(&twos).filter_map(|r| r["pair"].as_u64()).map(|k| k as u32).collect();
        indices.sort_unstable();
        indices.dedup();
        let interleaved = !indices.is_empty();
        let pairs: Vec<Pair> = if interleaved {
            indices.iter().filter_map(|&k| pair_of(k, with_pair(&ones, Some(k))?, with_pair(&twos, Some(k))?)).collect()
        } else {
            with_pair(&ones, None).zip(with_pair(&twos, None)).and_then(|(a, b)| pair_of(0, a, b)).into_iter().collect()
        };
        if !pairs.is_empty() {
            out.push(PairStats { workload: w, lock: l, fault_lock: fl, interleaved, pairs });
        }
    }
    out
}

/// The run of `runs` in pair `pair` (`None`: in no pair).
fn with_pair<'a>(runs: &[&'a Value], pair: Option<u32>) -> Option<&'a Value> {
    runs.iter().find(|r| r["pair"].as_u64() == pair.map(u64::from)).copied()
}

fn print_pairs(stats: &[PairStats]) {
    let interleaved: Vec<&PairStats> = stats.iter().filter(|s| s.interleaved).collect();
    if interleaved.is_empty() {
        return;
    }
    println!(
        "\n1 -> 2 vCPU pairs (boots interleaved 1, 2, 2, 1, 1, 2, ...; faults/s; host: the busier boot's capacity; ran: the share of the 2-vCPU boot's windows its vCPU threads were on a host CPU; rt: the median round trip of a cache line between its vCPUs after each window, ns; steal: the larger share of the host's CPU time its hypervisor took during either boot's windows)"
    );
    println!(
        "{:<18} {:<7} {:<10} {:>4} {:>12} {:>12} {:>7} {:>5} {:>5} {:>5} {:>6}",
        "workload", "lock", "fault_lock", "pair", "1 vCPU", "2 vCPUs", "ratio", "host", "ran", "rt", "steal"
    );
    for s in interleaved {
        for p in &s.pairs {
            println!(
                "{:<18} {:<7} {:<10} {:>4} {:>12.0} {:>12.0} {:>6.2}x {:>5.2} {:>5} {:>5} {:>6}",
                s.workload,
                s.lock,
                s.fault_lock,
                p.index,
                p.one,
                p.two,
                p.ratio(),
                p.host,
                p.ran.map_or("-".to_string(), |r| format!("{:.0}%", 100.0 * r)),
                p.rt.map_or("-".to_string(), |ns| format!("{ns:.0}")),
                p.steal.map_or("-".to_string(), |s| format!("{:.1}%", 100.0 * s))
            );
        }
        println!(
            "{:<18} {:<7} {:<10} median {:.2}x, spread {:.2} (max - min) over {} pairs",
            s.workload,
            s.lock,
            s.fault_lock,
            s.median(),
            s.spread(),
            s.pairs.len()
        );
    }
}

/// This kernel's 1 -> 2 vCPU pairs of each workload against Linux's of the
/// same run (`--guest ptlk,linux`): per pair index both had, the two ratios
/// and their difference, the median difference, how many pairs this kernel
/// was ahead in, and its median rates over Linux's.
pub(crate) fn against_linux(stats: &[PairStats]) -> Vec<Value> {
    let mut out = Vec::new();
    for l in stats.iter().filter(|s| s.lock == LINUX && s.interleaved) {
        for p in stats.iter().filter(|s| s.lock != LINUX && s.interleaved && s.workload == l.workload) {
            let both: Vec<(&Pair, &Pair)> =
                p.pairs.iter().filter_map(|a| l.pairs.iter().find(|b| b.index == a.index).map(|b| (a, b))).collect();
            if both.is_empty() {
                continue;
            }
            let diffs: Vec<f64> = both.iter().map(|(a, b)| a.ratio() - b.ratio()).collect();
            let rates = |f: fn(&Pair) -> f64, of: &[&Pair]| median(&mut of.iter().map(|x| f(x)).collect::<Vec<_>>());
            let (ours, theirs): (Vec<&Pair>, Vec<&Pair>) = both.iter().copied().unzip();
            out.push(json!({
                "workload": p.workload,
                "lock": p.lock,
                "fault_lock": p.fault_lock,
                "linux_fault_lock": l.fault_lock,
                "pairs": both.iter().map(|(a, _)| a.index).collect::<Vec<_>>(),
                "ratios": ours.iter().map(|a| a.ratio()).collect::<Vec<_>>(),
                "linux_ratios": theirs.iter().map(|b| b.ratio()).collect::<Vec<_>>(),
                "median": p.median(),
                "linux_median": l.median(),
                "differences": diffs,
                "median_difference": median(&mut diffs.clone()),
                "ahead": diffs.iter().filter(|d| **d > 0.0).count(),
                "rate_1_over_linux": rates(|x| x.one, &ours) / rates(|x| x.one, &theirs),
                "rate_2_over_linux": rates(|x| x.two, &ours) / rates(|x| x.two, &theirs),
            }));
        }
    }
    out
}

fn print_against_linux(rows: &[Value]) {
    if rows.is_empty() {
        return;
    }
    println!("\nagainst Linux, pair by pair (the same pair index: this kernel's boots, then Linux's, minutes apart)");
    for r in rows {
        let list = |k: &str| {
            let values: Vec<f64> = r[k].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
            joined(&values, |v| format!("{v:+.2}"))
        };
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<18} {} {}: 1 -> 2 median {:.2}x against Linux's {:.2}x; differences {} (median {:+.2}, ahead in {} of {}); rates {:.2}x Linux's on 1 vCPU, {:.2}x on 2",
            r["workload"].as_str().unwrap_or(""),
            r["lock"].as_str().unwrap_or(""),
            r["fault_lock"].as_str().unwrap_or(""),
            f("median"),
            f("linux_median"),
            list("differences"),
            f("median_difference"),
            r["ahead"],
            r["pairs"].as_array().map_or(0, Vec::len),
            f("rate_1_over_linux"),
            f("rate_2_over_linux"),
        );
    }
}

/// `values`, each formatted by `format`, comma-separated.
fn joined(values: &[f64], format: impl Fn(f64) -> String) -> String {
    values.iter().map(|&v| format(v)).collect::<Vec<_>>().join(", ")
}

/// What became of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Met,
    Missed,
    /// A run it needs is not in the report (only listed with `--check`).
    Missing,
}

/// One target line.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// What is measured against what (or, when missing, what is needed).
    pub(crate) text: String,
    pub(crate) status: Status,
    /// A remark after the verdict (a busy host).
    pub(crate) note: String,
}

impl Target {
    fn new(text: String, ok: bool) -> Target {
        Target { text, status: if ok { Status::Met } else { Status::Missed }, note: String::new() }
    }

    fn missing(text: String) -> Target {
        Target { text, status: Status::Missing, note: String::new() }
    }

    fn verdict(&self) -> &'static str {
        match self.status {
            Status::Met => "met",
            Status::Missed => "MISSED",
            Status::Missing => "MISSING",
        }
    }

    fn to_json(&self) -> Value {
        json!({"target": self.text, "verdict": self.verdict(), "note": self.note})
    }
}

/// 1 -> 2 vCPUs (median of pairs, split locks): the least ratio each
/// workload must reach.
pub(crate) const SCALING_TARGETS: [(&str, f64); 2] = [("disjoint", 1.85), ("same-table", 1.75)];
/// The most the pairs' ratios may spread (max - min).
pub(crate) const SPREAD_TARGET: f64 = 0.15;
/// Past the host's cores: the share of the 2-vCPU throughput each count
/// must keep (split locks, the workloads of `SCALING_TARGETS`).
pub(crate) const OVERCOMMIT_TARGETS: [(u64, f64); 2] = [(4, 0.95), (8, 0.85)];
/// `disjoint` on one vCPU (split locks), faults/s per thread.
pub(crate) const ONE_CPU_TARGET: f64 = 300_000.0;

/// The targets the report can be held to. Without `check`, only those its
/// runs allow; with it, a target whose runs are missing is listed as
/// [`Status::Missing`] (the split-vs-single ratio, no target of issue 17,
/// only when both its runs are there).
pub(crate) fn targets(report: &Value, check: bool) -> Vec<Target> {
    let mut out = Vec::new();
    let mut fault_locks = fault_locks_in(report);
    if fault_locks.is_empty() && check {
        fault_locks.push(FAULT_LOCKS[0]);
    }
    let pairs = pair_stats(report);
    for fl in fault_locks {
        let rate = |w: &str, l: &str, c: u64| rate_of(report, w, l, fl, c);
        match rate("disjoint", "split", 1) {
            Some(r) => out.push(Target::new(
                format!("disjoint, split, fault_lock={fl}, 1 vCPU: {r:.0} faults/s per thread (target >= {ONE_CPU_TARGET:.0})"),
                r >= ONE_CPU_TARGET,
            )),
            None if check => {
                out.push(Target::missing(format!("disjoint, split, fault_lock={fl}, 1 vCPU: no run (needs --workloads disjoint --locks split)")))
            }
            None => {}
        }
        for (w, target) in SCALING_TARGETS {
            let what = format!("{w}, split, fault_lock={fl}, 1 -> 2 vCPUs");
            match pairs.iter().find(|s| s.workload == w && s.lock == "split" && s.fault_lock == fl) {
                Some(s) => {
                    let n = s.pairs.len();
                    let of =
                        if s.interleaved { format!("median of {n} pairs") } else { "one run each, not pairs".into() };
                    let mut t = Target::new(
                        format!("{what}: {:.2}x, {of} (target >= {target}x)", s.median()),
                        s.median() >= target,
                    );
                    if s.busy() > 0 {
                        t.note = format!(
                            " ({} of {n} pairs rest on a boot during which the host was busy; rerun with --pairs)",
                            s.busy()
                        );
                    }
                    out.push(t);
                    if n >= 2 {
                        out.push(Target::new(
                            format!(
                                "{what}: spread {:.2} (max - min of {n} pairs' ratios; target <= {SPREAD_TARGET})",
                                s.spread()
                            ),
                            s.spread() <= SPREAD_TARGET + 1e-9,
                        ));
                    } else if check {
                        out.push(Target::missing(format!("{what}: a spread needs 2 pairs or more (--pairs N)")));
                    }
                }
                None if check => {
                    out.push(Target::missing(format!("{what}: no 1- and 2-vCPU runs (--pairs N --workloads {w})")))
                }
                None => {}
            }
            for (c, share) in OVERCOMMIT_TARGETS {
                let what = format!("{w}, split, fault_lock={fl}, {c} vCPUs");
                match (rate(w, "split", 2), rate(w, "split", c)) {
                    (Some(two), Some(x)) if two > 0.0 => out.push(Target::new(
                        format!(
                            "{what}: {:.0}% of the 2-vCPU throughput ({x:.0} against {two:.0} faults/s; target >= {:.0}%)",
                            100.0 * x / two,
                            100.0 * share
                        ),
                        x >= share * two,
                    )),
                    (two, x) if check => out.push(Target::missing(format!(
                        "{what}: needs {} (--cpus ...,{c} --workloads {w})",
                        match (two, x) {
                            (None, None) => format!("runs on 2 and {c} vCPUs"),
                            (None, _) => "a run on 2 vCPUs".to_string(),
                            _ => format!("a run on {c} vCPUs"),
                        }
                    ))),
                    _ => {}
                }
            }
        }
        if let (Some(s), Some(g)) = (rate("disjoint", "split", 8), rate("disjoint", "single", 8)) {
            out.push(Target::new(
                format!("disjoint, fault_lock={fl}, 8 vCPUs, split vs single: {:.2}x (target >= 2x)", s / g),
                s / g >= 2.0,
            ));
        }
    }
    out
}

fn print_targets(report: &Value, targets: &[Target]) {
    if targets.is_empty() {
        return;
    }
    println!("\ntargets ({}):", report["accel"].as_str().unwrap_or("?"));
    for t in targets {
        println!("  {}: {}{}", t.text, t.verdict(), t.note);
    }
}

/// `--check`: an error naming every missed target and missing run.
pub(crate) fn check_verdict(targets: &[Target]) -> Result<()> {
    let missed: Vec<&Target> = targets.iter().filter(|t| t.status == Status::Missed).collect();
    let missing: Vec<&Target> = targets.iter().filter(|t| t.status == Status::Missing).collect();
    if missed.is_empty() && missing.is_empty() {
        if targets.is_empty() {
            bail!("bench --check: no target could be checked");
        }
        return Ok(());
    }
    let mut msg = format!("bench --check: {} target(s) missed, {} missing a run", missed.len(), missing.len());
    for t in missed.iter().chain(&missing) {
        msg += &format!("\n  {}: {}", t.verdict(), t.text);
    }
    bail!(msg)
}

/// Below this host capacity (see `hostprobe`) a boot is repeated, and a
/// target ratio that still rests on one is flagged.
const BUSY_HOST: f64 = 0.95;
/// Repeats of a boot during which the host was busy.
const BUSY_RETRIES: u32 = 2;

fn plot(report: &Value, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let runs = report["runs"].as_array().cloned().unwrap_or_default();
    let max_cpus = runs.iter().filter_map(|r| r["cpus"].as_u64()).max().unwrap_or(1) as u32;
    let max_rate = runs.iter().filter_map(|r| r["faults_per_sec"].as_f64()).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let title = format!(
        "page-fault throughput, {} ({} host CPUs)",
        report["accel"].as_str().unwrap_or("?"),
        report["host_cpus"]
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0u32..max_cpus + 1, 0f64..max_rate * 1.15)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("CPUs (one ring-3 thread each)")
        .y_desc("faults per second (median)")
        .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut series: Vec<(String, String, String)> = Vec::new();
    for r in &runs {
        let key = (
            r["workload"].as_str().unwrap_or("").to_string(),
            r["lock"].as_str().unwrap_or("").to_string(),
            r["fault_lock"].as_str().unwrap_or("").to_string(),
        );
        if !series.contains(&key) {
            series.push(key);
        }
    }
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (w, l, fl)) in series.iter().enumerate() {
        // One point per CPU count: the median of its runs (several with
        // `--pairs`).
        let mut counts: Vec<u64> = runs
            .iter()
            .filter(|r| r["workload"] == w.as_str() && r["lock"] == l.as_str() && r["fault_lock"] == fl.as_str())
            .filter_map(|r| r["cpus"].as_u64())
            .collect();
        counts.sort_unstable();
        counts.dedup();
        let pts: Vec<(u32, f64)> =
            counts.into_iter().filter_map(|c| Some((c as u32, rate_of(report, w, l, fl, c)?))).collect();
        let color = palette[i % palette.len()];
        let style = if l == "single" { color.stroke_width(2) } else { color.stroke_width(3) };
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("{w} / {l} lock / faults under {fl}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        // Points: discs for faults under VMA locks, crosses under mmap_lock.
        if fl == "mmap" {
            chart
                .draw_series(pts.iter().map(|&(x, y)| Cross::new((x, y), 5, color.stroke_width(2))))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        } else {
            chart
                .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `cargo xtask bench ARGS` as clap parses it.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    /// A boot that never started is repeated, up to `SILENT_RETRIES` times,
    /// and a boot that stays silent is then reported as it failed.
    #[test]
    fn a_boot_that_never_started_is_repeated() {
        let mut calls = 0;
        let got = retry_silent(|| {
            calls += 1;
            if calls <= SILENT_RETRIES { Err(NeverStarted(format!("silent {calls}")).into()) } else { Ok(calls) }
        });
        assert_eq!(got.unwrap(), SILENT_RETRIES + 1);

        let mut calls = 0;
        let err = retry_silent(|| -> Result<()> {
            calls += 1;
            Err(NeverStarted(format!("silent {calls}")).into())
        })
        .unwrap_err();
        assert_eq!(calls, SILENT_RETRIES + 1);
        assert_eq!(err.to_string(), format!("silent {}", SILENT_RETRIES + 1));
    }

    /// Any other failure (the kernel failed, printed no result, timed out
    /// after it started) is returned at once: repeating it could hide a bug.
    #[test]
    fn a_boot_that_failed_after_starting_is_not_repeated() {
        let mut calls = 0;
        let err = retry_silent(|| -> Result<()> {
            calls += 1;
            bail!("`bench-x`: kernel reported FAILURE")
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(err.to_string().contains("FAILURE"));
    }

    fn keys(runs: &[Run]) -> Vec<(&str, &str, &str, u32)> {
        runs.iter().map(|r| (r.workload.as_str(), r.lock, r.fault_lock, r.cpus)).collect()
    }

    #[test]
    fn kernel_args_must_be_one_key_value_word() {
        assert_eq!(parse(&["--kernel-arg", "spinlock=tas"]).unwrap().kernel_args, ["spinlock=tas"]);
        for bad in ["spinlock", "=tas", "spinlock=", "a=b c"] {
            let e = parse(&["--kernel-arg", bad]).err().expect(bad).to_string();
            assert!(e.contains("is not KEY=VALUE"), "{bad}: {e}");
        }
    }

    #[test]
    fn summary_takes_the_median_window() {
        let run = Run { workload: "disjoint".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        let raw = json!({
            "tsc_per_us": 1000, "split_pte_ptlocks": true,
            "windows": [
                {"faults": 1000, "cycles": 1_000_000, "touched": 990, "min_faults": 990},
                {"faults": 1000, "cycles": 2_000_000, "touched": 990, "min_faults": 990},
                {"faults": 1000, "cycles": 500_000, "touched": 990, "min_faults": 990}
            ],
            "cycles_per_fault_mean": 10, "cycles_per_fault_p99": 20, "locks": {}
        });
        let r = summarize(&run, &raw).unwrap();
        // 1 ms, 2 ms, 0.5 ms windows of 1000 faults: 1e6, 5e5, 2e6 faults/s.
        assert_eq!(r["faults_per_sec"].as_f64().unwrap(), 1e6);
        assert_eq!(r["faults_per_sec_min"].as_f64().unwrap(), 5e5);
        assert_eq!(r["faults_per_sec_max"].as_f64().unwrap(), 2e6);
        assert_eq!(r["faults_per_sec_per_cpu"].as_f64().unwrap(), 5e5);
        assert_eq!(r["faults"].as_u64().unwrap(), 3000);
        assert_eq!(r["fault_lock"], "vma");
    }

    #[test]
    fn summary_reports_reclaimed_tables_and_rejects_the_wrong_fault_locking() {
        let raw = |fault_lock: &str, vma_lock_faults: u64| {
            json!({
                "tsc_per_us": 1000, "fault_lock": fault_lock, "split_pte_ptlocks": true,
                "windows": [
                    {"faults": 1000, "cycles": 1_000_000, "touched": 1000, "min_faults": 1000},
                    {"faults": 1000, "cycles": 1_000_000, "touched": 1000, "min_faults": 1000}
                ],
                "cycles_per_fault_mean": 10, "cycles_per_fault_p99": 20, "locks": {},
                "mm": {"vma_lock_faults": vma_lock_faults, "mmap_lock_faults": 7, "pt_reclaimed": 130}
            })
        };
        let vma = Run { workload: "madvise".into(), lock: "split", fault_lock: "vma", cpus: 1, pair: None };
        let r = summarize(&vma, &raw("vma", 2000)).unwrap();
        assert_eq!(r["pt_reclaimed_per_window"].as_f64().unwrap(), 65.0);
        assert_eq!(r["mm"]["mmap_lock_faults"].as_u64().unwrap(), 7);
        let err = summarize(&vma, &raw("mmap", 0)).unwrap_err().to_string();
        assert!(err.contains("asked for fault_lock=vma") && err.contains("fault_lock=mmap"), "{err}");
        let mmap = Run { workload: "madvise".into(), lock: "split", fault_lock: "mmap", cpus: 1, pair: None };
        assert!(summarize(&mmap, &raw("mmap", 0)).is_ok());
        let err = summarize(&mmap, &raw("mmap", 3)).unwrap_err().to_string();
        assert!(err.contains("3 faults were resolved under a VMA lock"), "{err}");
    }

    #[test]
    fn linux_results_are_read_like_the_kernels_and_not_mixed_up_with_them() {
        // linux-storm's line: no lock build, no fault-cost figures.
        let linux_raw = |faults: u64| {
            json!({
                "guest": "linux", "release": "6.1.0-57-cloud-amd64", "tsc_per_us": 2594.5,
                "windows": [{"faults": faults, "cycles": 5_189_000_000u64, "touched": 180_000, "min_faults": 180_000, "waiting_cycles": 0}]
            })
        };
        let run = Run { workload: "disjoint".into(), lock: LINUX, fault_lock: "mmap", cpus: 2, pair: None };
        let r = summarize(&run, &linux_raw(180_000)).unwrap();
        assert!((r["faults_per_sec"].as_f64().unwrap() - 90_000.0).abs() < 1.0, "{}", r["faults_per_sec"]);
        assert!(r["cycles_per_fault_mean"].is_null());
        // With THP on, a fault maps 512 pages: far fewer faults than pages.
        let err = format!("{:#}", summarize(&run, &linux_raw(400)).unwrap_err());
        assert!(err.contains("400 faults for 180000 pages"), "{err}");
        // A kernel result where Linux was asked for, and the reverse.
        let mut ptlk = linux_raw(180_000);
        ptlk.as_object_mut().unwrap().remove("guest");
        ptlk["split_pte_ptlocks"] = json!(true);
        let err = summarize(&run, &ptlk).unwrap_err().to_string();
        assert!(err.contains("not from a Linux guest"), "{err}");
        let split = Run { lock: "split", fault_lock: "vma", ..run };
        let err = summarize(&split, &linux_raw(180_000)).unwrap_err().to_string();
        assert!(err.contains("asked for the split run") && err.contains("from a Linux guest"), "{err}");
    }

    #[test]
    fn linux_guest_runs_its_two_storms_as_pairs_and_refuses_kernel_only_flags() {
        let runs = plan(&parse(&["--guest", "linux", "--pairs", "2", "--cpus", "1,2,4"]).unwrap()).unwrap();
        assert_eq!(
            keys(&runs),
            [
                ("disjoint", LINUX, "mmap", 1),
                ("disjoint", LINUX, "mmap", 2),
                ("disjoint", LINUX, "mmap", 2),
                ("disjoint", LINUX, "mmap", 1),
                ("disjoint", LINUX, "mmap", 4),
                ("same-table", LINUX, "mmap", 1),
                ("same-table", LINUX, "mmap", 2),
                ("same-table", LINUX, "mmap", 2),
                ("same-table", LINUX, "mmap", 1),
                ("same-table", LINUX, "mmap", 4),
            ]
        );
        assert_eq!(runs.iter().map(|r| r.pair).collect::<Vec<_>>()[..5], [Some(1), Some(1), Some(2), Some(2), None]);
        let one = plan(&parse(&["--guest", "linux", "--workloads", "same-table", "--cpus", "2"]).unwrap()).unwrap();
        assert_eq!(keys(&one), [("same-table", LINUX, "mmap", 2)]);
        for flags in [
            &["--check"][..],
            &["--quick"],
            &["--locks", "single"],
            &["--fault-lock", "mmap"],
            &["--kernel-arg", "spinlock=tas"],
            &["--rounds", "3"],
            &["--ceiling", "2"],
        ] {
            let args = parse(&[&["--guest", "linux"][..], flags].concat()).unwrap();
            let err = plan(&args).unwrap_err().to_string();
            assert!(err.contains(&format!("{} with --guest linux", flags[0])), "{flags:?}: {err}");
        }
        let err = plan(&parse(&["--guest", "linux", "--icount", "--pairs", "2"]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("--icount with --pairs: under --icount"), "{err}");
        assert_eq!(plan(&parse(&["--guest", "linux", "--icount", "--cpus", "1"]).unwrap()).unwrap().len(), 2);
        let err = plan(&parse(&["--guest", "linux", "--workloads", "same-page"]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("runs disjoint and same-table only"), "{err}");
        assert!(parse(&["--guest", "freebsd"]).is_err());
    }

    #[test]
    fn linux_takes_a_debian_suite_and_only_with_a_linux_guest() {
        let args = parse(&["--guest", "linux", "--linux", "trixie"]).unwrap();
        assert_eq!(args.linux, LinuxSource::Suite("trixie".into()));
        assert_eq!(plan(&args).unwrap().len(), plan(&parse(&["--guest", "linux"]).unwrap()).unwrap().len());
        assert_eq!(parse(&["--guest", "linux"]).unwrap().linux, LinuxSource::System);
        assert_eq!(
            parse(&["--linux", "bookworm-backports", "--guest", "ptlk,linux"]).unwrap().linux.to_string(),
            "bookworm-backports"
        );
        for bad in ["Trixie", "trixie/main", "", "-x", "trixie main"] {
            assert!(parse(&["--guest", "linux", "--linux", bad]).is_err(), "{bad:?}");
        }
        let err = plan(&parse(&["--linux", "trixie"]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("--linux trixie chooses the Linux of --guest linux"), "{err}");
    }

    #[test]
    fn both_guests_interleave_pair_by_pair_and_only_this_kernel_has_targets() {
        let args = parse(&["--guest", "ptlk,linux", "--pairs", "2", "--cpus", "1,2,8", "--check"]).unwrap();
        let runs = plan(&args).unwrap();
        let order: Vec<(&str, &str, u32, Option<u32>)> =
            runs.iter().map(|r| (r.workload.as_str(), r.lock, r.cpus, r.pair)).collect();
        assert_eq!(
            order[..10],
            [
                ("disjoint", "split", 1, Some(1)),
                ("disjoint", "split", 2, Some(1)),
                ("disjoint", LINUX, 1, Some(1)),
                ("disjoint", LINUX, 2, Some(1)),
                ("disjoint", "split", 2, Some(2)),
                ("disjoint", "split", 1, Some(2)),
                ("disjoint", LINUX, 2, Some(2)),
                ("disjoint", LINUX, 1, Some(2)),
                ("disjoint", "split", 8, None),
                ("disjoint", LINUX, 8, None),
            ]
        );
        assert_eq!(runs.len(), 20, "the same again for same-table");
        assert!(runs[10..].iter().all(|r| r.workload == "same-table"));
        // This kernel's flags are its runs' when both run.
        let with_lock = parse(&["--guest", "ptlk,linux", "--fault-lock", "mmap", "--cpus", "2"]).unwrap();
        let runs = plan(&with_lock).unwrap();
        assert_eq!(
            keys(&runs),
            [
                ("disjoint", "split", "mmap", 2),
                ("disjoint", "single", "mmap", 2),
                ("disjoint", LINUX, "mmap", 2),
                ("same-table", "split", "mmap", 2),
                ("same-table", "single", "mmap", 2),
                ("same-table", LINUX, "mmap", 2)
            ]
        );
        // A report with both: the targets see only this kernel's runs (no
        // `mmap` targets because Linux faults under mmap_lock).
        let run = |lock: &str, fl: &str, cpus: u64, pair: u64, rate: f64| json!({"workload": "disjoint", "lock": lock, "fault_lock": fl, "cpus": cpus, "pair": pair, "faults_per_sec": rate, "host_capacity": 1.0});
        let report = json!({"runs": [
            run("split", "vma", 1, 1, 200_000.0), run("split", "vma", 2, 1, 340_000.0),
            run(LINUX, "mmap", 1, 1, 50_000.0), run(LINUX, "mmap", 2, 1, 90_000.0),
            run("split", "vma", 1, 2, 210_000.0), run("split", "vma", 2, 2, 399_000.0),
            run(LINUX, "mmap", 1, 2, 52_000.0), run(LINUX, "mmap", 2, 2, 78_000.0),
        ]});
        assert_eq!(fault_locks_in(&report), ["vma"]);
        assert!(targets(&report, true).iter().all(|t| !t.text.contains("mmap")), "no targets for Linux's fault lock");
        let against = against_linux(&pair_stats(&report));
        assert_eq!(against.len(), 1);
        let a = &against[0];
        let diffs: Vec<f64> = a["differences"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect();
        assert!((diffs[0] - (1.7 - 1.8)).abs() < 1e-9 && (diffs[1] - (1.9 - 1.5)).abs() < 1e-9, "{diffs:?}");
        assert_eq!(a["ahead"], 1);
        assert!((a["median_difference"].as_f64().unwrap() - 0.15).abs() < 1e-9);
        assert!((a["rate_1_over_linux"].as_f64().unwrap() - 205_000.0 / 51_000.0).abs() < 1e-9);
    }

    #[test]
    fn summary_rejects_the_wrong_lock_build_and_faults_that_do_not_fit_the_pages() {
        let raw = |split: bool, faults: u64, touched: u64, min_faults: u64| {
            json!({
                "tsc_per_us": 1000, "fault_lock": "vma", "split_pte_ptlocks": split,
                "windows": [
                    {"faults": 5000, "cycles": 1_000_000, "touched": 5000, "min_faults": 5000, "present": 5000},
                    {"faults": faults, "cycles": 1_000_000, "touched": touched, "min_faults": min_faults, "present": min_faults}
                ],
                "cycles_per_fault_mean": 10, "cycles_per_fault_p99": 20, "locks": {}, "mm": {}
            })
        };
        let split = Run { workload: "disjoint".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        let single = Run { workload: "disjoint".into(), lock: "single", ..split };
        assert!(summarize(&split, &raw(true, 5100, 5000, 5000)).is_ok());
        assert!(summarize(&single, &raw(false, 5000, 5000, 5000)).is_ok());
        let err = summarize(&single, &raw(true, 5000, 5000, 5000)).unwrap_err().to_string();
        assert!(err.contains("asked for the single lock build") && err.contains("split PTE locks are on"), "{err}");
        let err = summarize(&split, &raw(false, 5000, 5000, 5000)).unwrap_err().to_string();
        assert!(err.contains("split PTE locks are off"), "{err}");
        // Fewer faults than pages: faults went uncounted or pages were never faulted.
        let err = format!("{:#}", summarize(&split, &raw(true, 4000, 5000, 5000)).unwrap_err());
        assert!(err.contains("window 2") && err.contains("4000 faults for 5000 pages"), "{err}");
        // Far more: faults repeated. A few more (stacks, text) are fine.
        let slack = fault_slack(2, 5000);
        assert!(summarize(&split, &raw(true, 5000 + slack, 5000, 5000)).is_ok());
        assert!(summarize(&split, &raw(true, 5001 + slack, 5000, 5000)).is_err());
        // Same-page: every thread touches the same pages, one fault each.
        let same = Run { workload: "same-page".into(), ..split };
        assert!(summarize(&same, &raw(true, 300, 512, 256)).is_ok());
        assert!(summarize(&same, &raw(true, 200, 512, 256)).is_err());
        assert!(summarize(&split, &raw(true, 0, 0, 0)).is_err(), "a window that touched nothing");
    }

    #[test]
    fn fork_runs_report_the_fork_and_need_its_figures() {
        let raw = |fork: Value| {
            json!({
                "tsc_per_us": 1000, "fault_lock": "vma", "split_pte_ptlocks": true,
                "windows": [
                    {"faults": 1000, "cycles": 1_000_000, "touched": 1000, "min_faults": 1000},
                    {"faults": 1002, "cycles": 2_000_000, "touched": 1000, "min_faults": 1000},
                    {"faults": 1001, "cycles": 1_000_000, "touched": 1000, "min_faults": 1000}
                ],
                "cycles_per_fault_mean": 10, "cycles_per_fault_p99": 0, "locks": {}, "mm": {}, "fork": fork
            })
        };
        let run = Run { workload: "fork".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        // Forks of 1000 entries in 2, 3 and 4 ms: the median 3 ms, 3000 cycles per entry.
        let r = summarize(&run, &raw(json!({"cycles": [2_000_000, 4_000_000, 3_000_000], "ptes": [1000, 1000, 1000]})))
            .unwrap();
        assert_eq!(r["fork"]["ms"].as_f64().unwrap(), 3.0);
        assert_eq!(r["fork"]["cycles_per_pte"].as_f64().unwrap(), 3000.0);
        assert_eq!(r["fork"]["ptes"].as_u64().unwrap(), 1000);
        assert_eq!(r["faults_per_sec"].as_f64().unwrap(), 1e6);
        let err = summarize(&run, &raw(Value::Null)).unwrap_err().to_string();
        assert!(err.contains("no fork cycles"), "{err}");
        let err = summarize(&run, &raw(json!({"cycles": [1], "ptes": [0]}))).unwrap_err().to_string();
        assert!(err.contains("no fork cycles"), "{err}");
        // Not in the default list, but known.
        let args = parse(&["--workloads", "fork", "--cpus", "1,2", "--locks", "split"]).unwrap();
        assert_eq!(keys(&plan(&args).unwrap()), [("fork", "split", "vma", 1), ("fork", "split", "vma", 2)]);
        assert!(!parse(&[]).unwrap().workloads.iter().any(|w| w == "fork"));
    }

    #[test]
    fn bad_workload_is_a_clear_error() {
        let args = parse(&["--cpus", "1", "--workloads", "nope", "--locks", "split"]).unwrap();
        let err = plan(&args).err().unwrap().to_string();
        assert!(err.contains("unknown workload \"nope\""), "{err}");
    }

    #[test]
    fn fault_lock_defaults_to_vma_and_takes_a_list() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.fault_lock, ["vma"]);
        let args = parse(&["--fault-lock", "vma,mmap", "--cpus", "1,2", "--workloads", "madvise", "--locks", "split"])
            .unwrap();
        assert_eq!(
            keys(&plan(&args).unwrap()),
            [
                ("madvise", "split", "vma", 1),
                ("madvise", "split", "vma", 2),
                ("madvise", "split", "mmap", 1),
                ("madvise", "split", "mmap", 2)
            ]
        );
        // Order and repeats on the command line do not matter.
        let args = parse(&["--fault-lock=mmap,vma,mmap", "--cpus=1", "--workloads=disjoint", "--locks=split"]).unwrap();
        assert_eq!(keys(&plan(&args).unwrap()), [("disjoint", "split", "vma", 1), ("disjoint", "split", "mmap", 1)]);
    }

    #[test]
    fn a_wrong_fault_lock_is_a_clear_error() {
        let err = parse(&["--fault-lock", "vma,rwsem"]).err().unwrap().to_string();
        assert!(err.contains("invalid value 'rwsem' for '--fault-lock"), "{err}");
        assert!(err.contains("[possible values: vma, mmap]"), "{err}");
        assert!(parse(&["--fault-lock", ""]).is_err(), "an empty value is no fault lock");
    }

    #[test]
    fn madvise_workloads_are_known_and_need_whole_2mib_regions() {
        let args = parse(&["--workloads", "madvise,madvise-same-table", "--cpus", "2", "--locks", "single"]).unwrap();
        assert_eq!(
            keys(&plan(&args).unwrap()),
            [("madvise", "single", "vma", 2), ("madvise-same-table", "single", "vma", 2)]
        );
        assert_eq!(rounds_for(&args, "madvise"), 4);
        assert_eq!(rounds_for(&args, "madvise-same-table"), 4);
        let run = |w: &str| Run { workload: w.into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        // 2 threads x 1024 MiB of their own, against one shared 1024 MiB.
        assert_eq!(mem_for(&run("madvise"), 1024), "3584M");
        assert_eq!(mem_for(&run("madvise-same-table"), 1024), "3072M");
        let odd = parse(&["--workloads", "disjoint,madvise", "--mib", "3"]).unwrap();
        let err = plan(&odd).err().unwrap().to_string();
        assert!(err.contains("--mib 3") && err.contains("even"), "{err}");
        let odd_without_madvise = parse(&["--workloads", "disjoint", "--mib", "3"]).unwrap();
        assert!(plan(&odd_without_madvise).is_ok());
    }

    #[test]
    fn the_boot_summary_must_report_the_fault_locking_asked_for() {
        let vma = "[    0.08] cpu0 INFO  boot: page-table locks: PTE locks: split (per table); struct Page 64 B; faults lock their VMA (per-VMA locks, mmap_lock only as a fallback)\n";
        let mmap = "[    0.08] cpu0 INFO  boot: page-table locks: PTE locks: split (per table); struct Page 64 B; faults lock mmap_lock shared (fault_lock=mmap)\n";
        assert_eq!(reported_fault_lock(vma), Some("vma"));
        assert_eq!(reported_fault_lock(mmap), Some("mmap"));
        assert!(check_fault_lock(vma, "vma").is_ok());
        assert!(check_fault_lock(mmap, "mmap").is_ok());
        let err = check_fault_lock(vma, "mmap").unwrap_err().to_string();
        assert!(err.contains("asked for fault_lock=mmap") && err.contains("faults lock vma"), "{err}");
        // A kernel that does not say (an older one) is no evidence either way.
        let old = "[    0.08] cpu0 INFO  boot: page-table locks: PTE locks: split (per table); struct Page 64 B\n";
        let err = check_fault_lock(old, "vma").unwrap_err().to_string();
        assert!(err.contains("no boot summary line says how faults lock"), "{err}");
    }

    #[test]
    fn quick_plan_has_the_required_runs() {
        let args = parse(&["--quick"]).unwrap();
        let runs = plan(&args).unwrap();
        assert_eq!(
            keys(&runs),
            [
                ("disjoint", "split", "vma", 1),
                ("disjoint", "split", "vma", 2),
                ("disjoint", "split", "vma", 8),
                ("disjoint", "single", "vma", 8)
            ]
        );
        assert_eq!(rounds_for(&args, "disjoint"), 1, "quick windows are one pass");
        let both = parse(&["--quick", "--fault-lock", "vma,mmap"]).unwrap();
        let runs = plan(&both).unwrap();
        assert_eq!(runs.len(), 8);
        assert!(runs[4..].iter().all(|r| r.fault_lock == "mmap"));
    }

    #[test]
    fn same_page_alone_has_one_pass_windows_by_default_and_rounds_overrides() {
        let args = parse(&[]).unwrap();
        assert_eq!(rounds_for(&args, "disjoint"), UNTIL_WINDOW_ENDS, "a fixed time's work, as will-it-scale");
        assert_eq!(rounds_for(&args, "madvise"), 4);
        assert_eq!(rounds_for(&args, "same-table"), UNTIL_WINDOW_ENDS, "as long a window as disjoint's");
        assert_eq!(rounds_for(&args, "same-page"), 1);
        let args = parse(&["--rounds", "3"]).unwrap();
        assert_eq!(rounds_for(&args, "same-table"), 3);
        assert_eq!(rounds_for(&args, "disjoint"), 3);
        assert_eq!(rounds_for(&parse(&["--quick"]).unwrap(), "same-table"), 1);
        assert_eq!(rounds_for(&parse(&["--quick"]).unwrap(), "disjoint"), 1);
    }

    #[test]
    fn only_disjoint_and_same_table_windows_can_end_with_their_time() {
        assert!(plan(&parse(&["--workloads", "disjoint,same-table", "--rounds", "0"]).unwrap()).is_ok());
        let e = plan(&parse(&["--workloads", "disjoint,madvise-same-table", "--rounds", "0"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("with madvise-same-table"), "{e}");
        let e = plan(&parse(&["--workloads", "same-table", "--window-ms", "0"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("same-table with --window-ms 0"), "{e}");
        // A pass count needs no time limit.
        assert!(plan(&parse(&["--workloads", "disjoint", "--window-ms", "0", "--rounds", "4"]).unwrap()).is_ok());
    }

    #[test]
    fn traps_run_one_lock_build_for_their_time_and_count_exceptions() {
        // No page-table lock in an exception: the single-lock build only
        // when asked for.
        let runs = plan(&parse(&["--workloads", "traps,disjoint", "--cpus", "1,2"]).unwrap()).unwrap();
        assert_eq!(
            keys(&runs),
            [
                ("traps", "split", "vma", 1),
                ("traps", "split", "vma", 2),
                ("disjoint", "split", "vma", 1),
                ("disjoint", "split", "vma", 2),
                ("disjoint", "single", "vma", 1),
                ("disjoint", "single", "vma", 2)
            ]
        );
        let asked = plan(&parse(&["--workloads", "traps", "--cpus", "2", "--locks", "single"]).unwrap()).unwrap();
        assert_eq!(keys(&asked), [("traps", "single", "vma", 2)]);
        assert!(!parse(&[]).unwrap().workloads.iter().any(|w| w == TRAPS), "traps is not a storm: not by default");
        let e = plan(&parse(&["--workloads", "traps", "--window-ms", "0"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("traps with --window-ms 0"), "{e}");
        // Its result is a storm's: a window's faults are its exceptions.
        let run = Run { workload: TRAPS.into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        let window =
            json!({"faults": 3000, "cycles": 1_000_000, "touched": 3000, "min_faults": 3000, "waiting_cycles": 0});
        let raw = json!({
            "tsc_per_us": 1000, "split_pte_ptlocks": true, "fault_lock": "vma", "windows": [window],
            "cycles_per_fault_mean": 600, "cycles_per_fault_p99": 0, "locks": {}, "mm": {}
        });
        let r = summarize(&run, &raw).unwrap();
        assert_eq!(r["counts"], "exception round trips");
        assert_eq!(r["faults_per_sec"].as_f64().unwrap(), 3_000_000.0);
    }

    #[test]
    fn populate_counts_pages_written_and_allows_no_fault_per_page() {
        let run = Run { workload: POPULATE.into(), lock: "split", fault_lock: "vma", cpus: 1, pair: None };
        let raw = |faults: u64| {
            json!({
                "tsc_per_us": 1000, "split_pte_ptlocks": true, "fault_lock": "vma",
                "windows": [{"faults": faults, "cycles": 1_000_000, "touched": 5000, "min_faults": 0, "waiting_cycles": 0}],
                "cycles_per_fault_mean": 0, "cycles_per_fault_p99": 0, "locks": {}, "mm": {}
            })
        };
        let r = summarize(&run, &raw(3)).unwrap();
        assert_eq!(r["counts"], "pages written (made present by madvise)");
        assert_eq!(r["faults_per_sec"].as_f64().unwrap(), 5_000_000.0, "pages written per second, not faults");
        assert!(r["cycles_per_fault_mean"].is_null(), "its few faults are not its pages' cost");
        // A fault per page means madvise made nothing present.
        let e = summarize(&run, &raw(5000)).unwrap_err();
        assert!(format!("{e:#}").contains("made present by madvise first"), "{e:#}");
        assert!(plan(&parse(&["--workloads", "populate", "--rounds", "0"]).unwrap()).is_ok());
        assert_eq!(default_rounds(POPULATE, false), UNTIL_WINDOW_ENDS);
    }

    #[test]
    fn targets_and_rows_are_found_per_fault_lock() {
        let report = json!({"runs": [
            {"workload": "disjoint", "lock": "split", "fault_lock": "mmap", "cpus": 1, "faults_per_sec": 1.0},
            {"workload": "disjoint", "lock": "split", "fault_lock": "vma", "cpus": 1, "faults_per_sec": 2.0},
        ]});
        assert_eq!(fault_locks_in(&report), ["vma", "mmap"]);
        assert_eq!(rate_of(&report, "disjoint", "split", "vma", 1), Some(2.0));
        assert_eq!(rate_of(&report, "disjoint", "split", "mmap", 1), Some(1.0));
        assert!(rate_of(&report, "disjoint", "single", "vma", 1).is_none());
    }

    #[test]
    fn same_table_holds_a_region_of_mib_per_thread() {
        let run = |w: &str, cpus: u32| Run { workload: w.into(), lock: "split", fault_lock: "vma", cpus, pair: None };
        // 8 threads x 128 MiB of one region, as disjoint's 8 regions.
        assert_eq!(mem_for(&run("same-table", 8), 128), mem_for(&run("disjoint", 8), 128));
        assert_eq!(mem_for(&run("same-table", 8), 1024), "11264M");
        assert_eq!(mem_for(&run("same-page", 8), 1024), "3072M");
    }

    /// The raw result of a run whose windows took `faults` faults and made
    /// `present` pages present in 1 ms each.
    fn raw_windows(faults: u64, present: u64, lost: u64, spurious: u64) -> Value {
        let w = json!({
            "faults": faults, "cycles": 1_000_000, "touched": 512, "min_faults": 256,
            "present": present, "lost_races": lost, "spurious_faults": spurious
        });
        json!({
            "tsc_per_us": 1000, "fault_lock": "vma", "split_pte_ptlocks": true,
            "windows": [w.clone(), w.clone(), w],
            "cycles_per_fault_mean": 10, "cycles_per_fault_p99": 20, "locks": {}, "mm": {}
        })
    }

    #[test]
    fn waiting_is_a_share_of_the_cpus_time_in_the_windows() {
        let run = Run { workload: "same-table".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        // Three windows of 1e6 cycles on 2 CPUs: 6e6 CPU cycles, 0.6e6 waited.
        let mut raw = raw_windows(300, 256, 0, 0);
        for (w, wait) in raw["windows"].as_array_mut().unwrap().iter_mut().zip([100_000, 200_000, 300_000]) {
            w["waiting_cycles"] = json!(wait);
        }
        let r = summarize(&run, &raw).unwrap();
        assert!((r["waiting_share"].as_f64().unwrap() - 0.1).abs() < 1e-12, "{}", r["waiting_share"]);
        // An older kernel's result has no figure, and says so.
        assert!(summarize(&run, &raw_windows(300, 256, 0, 0)).unwrap()["waiting_share"].is_null());
        // More waiting than the CPUs had time is a broken result.
        raw["windows"][1]["waiting_cycles"] = json!(2_000_001);
        let e = summarize(&run, &raw).unwrap_err().to_string();
        assert!(e.contains("window 2") && e.contains("more than 2 CPUs"), "{e}");
    }

    #[test]
    fn a_chunked_same_table_boots_same_table_in_runs_of_pages_and_gets_no_verdict() {
        let args = parse(&["--workloads", "same-table:8,same-table:512,same-table", "--cpus", "2", "--locks", "split"])
            .unwrap();
        let runs = plan(&args).unwrap();
        assert_eq!(
            runs.iter().map(|r| r.workload.as_str()).collect::<Vec<_>>(),
            ["same-table:8", "same-table:512", "same-table"]
        );
        let w = Windows { windows: 5, mib: 128, rounds: rounds_for(&args, &runs[0].workload), window_ms: 2000 };
        // Its windows are as long as same-table's, its memory the same.
        assert_eq!(w.rounds, UNTIL_WINDOW_ENDS);
        assert_eq!(mem_for(&runs[0], 128), mem_for(&runs[2], 128));
        let m = machine(&runs[0], &w, PathBuf::from("k.img"), Accel::Tcg, &[]);
        assert!(m.cmdline.contains(" workload=same-table ") && m.cmdline.ends_with(" chunk=8"), "{}", m.cmdline);
        let m = machine(&runs[2], &w, PathBuf::from("k.img"), Accel::Tcg, &[]);
        assert!(!m.cmdline.contains("chunk"), "{}", m.cmdline);
        // Only the shared-table workloads take runs, of 2 pages or more.
        for bad in ["disjoint:8", "same-table:1", "same-table:0", "same-table:x", "same-tabl:8"] {
            let e = plan(&parse(&["--workloads", bad]).unwrap()).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(plan(&parse(&["--workloads", "madvise-same-table:512"]).unwrap()).is_ok());
        // The kernel must say it ran the runs: an older one ignores chunk=8.
        let run = Run { workload: "same-table:8".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        let mut raw = raw_windows(300, 256, 0, 0);
        let e = summarize(&run, &raw).unwrap_err().to_string();
        assert!(e.contains("runs of 8 pages"), "{e}");
        raw["chunk"] = json!(8);
        assert!(summarize(&run, &raw).is_ok());
        // No target speaks of it: the 1 -> 2 target is the page-by-page shape's.
        assert!(SCALING_TARGETS.iter().all(|(w, _)| *w != "same-table:8"));
    }

    #[test]
    fn round_trips_are_summarised_over_the_windows() {
        let run = Run { workload: "same-table".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        let mut raw = raw_windows(300, 256, 0, 0);
        for (w, ns) in raw["windows"].as_array_mut().unwrap().iter_mut().zip([480, 110, 130]) {
            w["round_trip_ns"] = json!(ns);
        }
        let r = summarize(&run, &raw).unwrap();
        assert_eq!(r["round_trip_ns"], json!({"median": 130.0, "min": 110.0, "max": 480.0, "unanswered": 0}));
        assert_eq!(describe_round_trip(&r["round_trip_ns"]).unwrap(), "vCPU round trip 130 ns (windows 110-480)");
        // A kernel that does not measure it has no figure; nor has one vCPU.
        let r = summarize(&run, &raw_windows(300, 256, 0, 0)).unwrap();
        assert!(r["round_trip_ns"].is_null() && describe_round_trip(&r["round_trip_ns"]).is_none());
        let mut one = raw.clone();
        for w in one["windows"].as_array_mut().unwrap() {
            w["round_trip_ns"] = Value::Null;
        }
        let solo = Run { workload: "same-table".into(), lock: "split", fault_lock: "vma", cpus: 1, pair: None };
        assert!(summarize(&solo, &one).unwrap()["round_trip_ns"].is_null());
        // On two vCPUs a window without a figure is one the other did not
        // answer: counted, and said.
        raw["windows"][2]["round_trip_ns"] = Value::Null;
        let r = summarize(&run, &raw).unwrap();
        assert_eq!(r["round_trip_ns"], json!({"median": 295.0, "min": 110.0, "max": 480.0, "unanswered": 1}));
        assert_eq!(
            describe_round_trip(&r["round_trip_ns"]).unwrap(),
            "vCPU round trip 295 ns (windows 110-480, 1 window(s) unanswered)"
        );
    }

    #[test]
    fn same_page_counts_pages_made_present_and_reports_races_beside() {
        let same = Run { workload: "same-page".into(), lock: "split", fault_lock: "vma", cpus: 2, pair: None };
        // 300 fault returns a window, 256 of them made a page present, 30
        // lost a race, 14 were spurious.
        let r = summarize(&same, &raw_windows(300, 256, 30, 14)).unwrap();
        assert_eq!(r["counts"], "pages made present");
        assert_eq!(r["faults_per_sec"].as_f64().unwrap(), 256_000.0);
        assert_eq!(r["fault_returns_per_sec"].as_f64().unwrap(), 300_000.0);
        assert_eq!(r["present"].as_u64().unwrap(), 3 * 256);
        assert_eq!(r["lost_races"].as_u64().unwrap(), 90);
        assert_eq!(r["lost_races_per_window"].as_f64().unwrap(), 30.0);
        assert_eq!(r["spurious_faults_per_window"].as_f64().unwrap(), 14.0);
        // Other workloads still count fault returns.
        let disjoint = Run { workload: "disjoint".into(), ..same };
        let raw = json!({
            "tsc_per_us": 1000, "fault_lock": "vma", "split_pte_ptlocks": true,
            "windows": [{"faults": 1000, "cycles": 1_000_000, "touched": 1000, "min_faults": 1000, "present": 1000}],
            "cycles_per_fault_mean": 10, "cycles_per_fault_p99": 20, "locks": {}, "mm": {}
        });
        let r = summarize(&disjoint, &raw).unwrap();
        assert_eq!(r["counts"], "fault returns");
        assert_eq!(r["faults_per_sec"].as_f64().unwrap(), 1e6);
        // More pages made present than faults, none, or no count: wrong.
        let err = format!("{:#}", summarize(&same, &raw_windows(300, 301, 0, 0)).unwrap_err());
        assert!(err.contains("301 pages made present by 300 faults"), "{err}");
        assert!(summarize(&same, &raw_windows(300, 0, 0, 0)).is_err());
        let mut old = raw_windows(300, 256, 0, 0);
        old["windows"][1].as_object_mut().unwrap().remove("present");
        let err = format!("{:#}", summarize(&same, &old).unwrap_err());
        assert!(err.contains("window 2: no `present`"), "{err}");
    }

    #[test]
    fn pairs_interleave_1_and_2_vcpus_per_workload_with_split_locks_by_default() {
        let args = parse(&["--pairs", "2", "--workloads", "disjoint,same-table", "--cpus", "1,2,8"]).unwrap();
        let runs = plan(&args).unwrap();
        assert_eq!(
            keys(&runs),
            [
                ("disjoint", "split", "vma", 1),
                ("disjoint", "split", "vma", 2),
                ("disjoint", "split", "vma", 2),
                ("disjoint", "split", "vma", 1),
                ("disjoint", "split", "vma", 8),
                ("same-table", "split", "vma", 1),
                ("same-table", "split", "vma", 2),
                ("same-table", "split", "vma", 2),
                ("same-table", "split", "vma", 1),
                ("same-table", "split", "vma", 8),
            ]
        );
        let pairs: Vec<Option<u32>> = runs.iter().map(|r| r.pair).collect();
        assert_eq!(pairs[..5], [Some(1), Some(1), Some(2), Some(2), None]);
        // ABBA: the boots of 4 pairs go 1, 2, 2, 1, 1, 2, 2, 1, so in every
        // two consecutive pairs each count's boots sit at the same mean
        // position, and a steady drift of the host favours neither.
        let runs = plan(&parse(&["--pairs", "4", "--workloads", "disjoint", "--cpus", "1,2"]).unwrap()).unwrap();
        assert_eq!(runs.iter().map(|r| r.cpus).collect::<Vec<_>>(), [1, 2, 2, 1, 1, 2, 2, 1]);
        let mean_position = |cpus: u32| {
            let at: Vec<usize> = runs.iter().enumerate().filter(|(_, r)| r.cpus == cpus).map(|(i, _)| i).collect();
            at.iter().sum::<usize>() as f64 / at.len() as f64
        };
        assert_eq!(mean_position(1), mean_position(2));
        // --locks still chooses; without --pairs both builds run.
        let args =
            parse(&["--pairs", "1", "--workloads", "disjoint", "--cpus", "4", "--locks", "split,single"]).unwrap();
        assert_eq!(plan(&args).unwrap().iter().filter(|r| r.lock == "single").count(), 3);
        let args = parse(&["--workloads", "disjoint", "--cpus", "1"]).unwrap();
        assert_eq!(keys(&plan(&args).unwrap()), [("disjoint", "split", "vma", 1), ("disjoint", "single", "vma", 1)]);
        let err = plan(&parse(&["--pairs", "0"]).unwrap()).err().unwrap().to_string();
        assert!(err.contains("--pairs"), "{err}");
    }

    #[test]
    fn icount_measures_no_scaling_so_check_pairs_and_kvm_are_refused() {
        for flags in [&["--icount", "--check"][..], &["--icount", "--pairs", "3"][..]] {
            let err = plan(&parse(flags).unwrap()).err().unwrap().to_string();
            assert!(err.contains("--icount with --check or --pairs") && err.contains("no target verdicts"), "{err}");
        }
        let err = plan(&parse(&["--icount", "--accel", "kvm"]).unwrap()).err().unwrap().to_string();
        assert!(err.contains("--icount with --accel kvm"), "{err}");
        assert!(plan(&parse(&["--icount", "--cpus", "1"]).unwrap()).is_ok());
    }

    #[test]
    fn an_icount_machine_runs_single_threaded_tcg_counting_instructions() {
        let args = parse(&["--icount", "--cpus", "2"]).unwrap();
        let run = &plan(&args).unwrap()[0];
        let w = Windows { windows: 1, mib: 16, rounds: 1, window_ms: 0 };
        let mut m = machine(run, &w, PathBuf::from("k.img"), Accel::Tcg, &[]);
        let args_of = |m: &Machine| -> Vec<String> {
            m.command(std::path::Path::new("qemu"))
                .unwrap()
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert!(args_of(&m).iter().any(|a| a == "tcg,thread=multi"));
        m.icount = true;
        let a = args_of(&m);
        assert!(a.iter().any(|a| a == "tcg,thread=single"), "{a:?}");
        assert!(a.windows(2).any(|w| w[0] == "-icount" && w[1] == "shift=0"), "{a:?}");
    }

    #[test]
    fn kernel_args_go_on_the_machines_command_line() {
        let args = parse(&["--cpus", "2", "--kernel-arg", "spinlock=tas", "--kernel-arg", "watchdog=off"]).unwrap();
        let run = &plan(&args).unwrap()[0];
        let w = Windows { windows: 1, mib: 16, rounds: 1, window_ms: 0 };
        let m = with_kernel_args(machine(run, &w, PathBuf::from("k.img"), Accel::Tcg, &[]), &args.kernel_args);
        assert!(m.cmdline.starts_with("mode=bench workload=disjoint"), "{}", m.cmdline);
        assert!(m.cmdline.ends_with(" spinlock=tas watchdog=off"), "{}", m.cmdline);
    }

    #[test]
    fn ceiling_measures_the_host_so_it_runs_alone() {
        for flags in [&["--pairs", "3"][..], &["--check"][..], &["--quick"][..], &["--icount"][..]] {
            let args: Vec<&str> = ["--ceiling", "2"].into_iter().chain(flags.iter().copied()).collect();
            let err = plan(&parse(&args).unwrap()).err().unwrap().to_string();
            assert!(err.contains("--ceiling with") && err.contains("no target verdicts"), "{flags:?}: {err}");
        }
        let err = plan(&parse(&["--ceiling", "0"]).unwrap()).err().unwrap().to_string();
        assert!(err.contains("--ceiling take"), "{err}");
        assert!(plan(&parse(&["--ceiling", "3", "--workloads", "disjoint"]).unwrap()).is_ok());
    }

    #[test]
    fn quick_gives_no_verdicts_so_check_and_pairs_are_refused() {
        let err = plan(&parse(&["--quick", "--check"]).unwrap()).err().unwrap().to_string();
        assert!(err.contains("--check with --quick") && err.contains("no target verdicts"), "{err}");
        let err = plan(&parse(&["--quick", "--pairs", "3"]).unwrap()).err().unwrap().to_string();
        assert!(err.contains("--pairs with --quick"), "{err}");
    }

    #[test]
    fn pair_statistics_are_the_median_and_the_spread_of_the_ratios() {
        assert_eq!(ratio_stats(&[]), None);
        assert_eq!(ratio_stats(&[1.8]), Some((1.8, 0.0)));
        let (m, s) = ratio_stats(&[1.9, 1.7, 1.8, 2.0]).unwrap();
        assert!((m - 1.85).abs() < 1e-12 && (s - 0.3).abs() < 1e-12, "{m} {s}");
        let (m, s) = ratio_stats(&[1.86, 1.80, 1.95]).unwrap();
        assert!((m - 1.86).abs() < 1e-12 && (s - 0.15).abs() < 1e-12, "{m} {s}");
    }

    /// A run record as `summarize` makes it (the fields the targets use).
    fn rec(workload: &str, lock: &str, cpus: u64, pair: Option<u32>, rate: f64) -> Value {
        json!({"workload": workload, "lock": lock, "fault_lock": "vma", "cpus": cpus, "pair": pair,
               "faults_per_sec": rate, "host_capacity": 1.0})
    }

    /// A report whose `disjoint` and `same-table` runs meet every target:
    /// three pairs each, and 4 and 8 vCPUs.
    fn good_report() -> Value {
        let mut runs = Vec::new();
        for w in ["disjoint", "same-table"] {
            for (k, two) in [(1, 660_000.0), (2, 640_000.0), (3, 650_000.0)] {
                runs.push(rec(w, "split", 1, Some(k), 350_000.0));
                runs.push(rec(w, "split", 2, Some(k), two));
            }
            runs.push(rec(w, "split", 4, None, 630_000.0));
            runs.push(rec(w, "split", 8, None, 560_000.0));
        }
        json!({"accel": "tcg", "runs": runs})
    }

    #[test]
    fn pairs_are_found_and_summarized_per_workload() {
        let stats = pair_stats(&good_report());
        assert_eq!(stats.len(), 2);
        let d = &stats[0];
        assert_eq!((d.workload.as_str(), d.lock.as_str(), d.interleaved), ("disjoint", "split", true));
        assert_eq!(d.pairs.iter().map(|p| p.index).collect::<Vec<_>>(), [1, 2, 3]);
        // Ratios 1.886, 1.829, 1.857: the median 650/350, spread 20/350.
        assert!((d.median() - 650.0 / 350.0).abs() < 1e-12);
        assert!((d.spread() - 20.0 / 350.0).abs() < 1e-12);
        // The 2-vCPU rate the 4/8-vCPU targets compare with is the pairs' median.
        assert_eq!(rate_of(&good_report(), "disjoint", "split", "vma", 2), Some(650_000.0));
        // A pair missing a boot is left out; plain runs make one pair.
        let report = json!({"runs": [
            rec("disjoint", "split", 1, Some(1), 100.0), rec("disjoint", "split", 2, Some(1), 190.0),
            rec("disjoint", "split", 1, Some(2), 100.0),
            rec("same-table", "split", 1, None, 100.0), rec("same-table", "split", 2, None, 170.0),
        ]});
        let stats = pair_stats(&report);
        assert_eq!(stats[0].pairs.len(), 1);
        assert!(stats[0].interleaved && !stats[1].interleaved);
        assert_eq!((stats[1].pairs[0].index, stats[1].median()), (0, 1.7));
        // A pair carries its 2-vCPU boot's round trip, not its 1-vCPU one's.
        assert_eq!(stats[0].pairs[0].rt, None);
        let mut report = report;
        report["runs"][1]["round_trip_ns"] = json!({"median": 130.0, "min": 110.0, "max": 480.0, "unanswered": 0});
        report["runs"][0]["round_trip_ns"] = json!({"median": 1.0, "min": 1.0, "max": 1.0, "unanswered": 0});
        let stats = pair_stats(&report);
        assert_eq!(stats[0].pairs[0].rt, Some(130.0));
        assert_eq!(stats[0].to_json()["round_trip_ns_2"], json!([130.0]));
        // And the larger host steal of its two boots, whichever reported it.
        assert_eq!(stats[0].pairs[0].steal, None);
        report["runs"][0]["vcpu_threads"] = json!({"running": 0.99, "host_steal": 0.031});
        report["runs"][1]["vcpu_threads"] = json!({"running": 0.97, "host_steal": 0.004});
        report["runs"][4]["vcpu_threads"] = json!({"running": 0.97, "host_steal": 0.012});
        let stats = pair_stats(&report);
        assert_eq!(stats[0].pairs[0].steal, Some(0.031));
        assert_eq!(stats[1].pairs[0].steal, Some(0.012));
        assert_eq!(stats[0].to_json()["host_steal"], json!([0.031]));
    }

    fn statuses(targets: &[Target]) -> Vec<Status> {
        targets.iter().map(|t| t.status).collect()
    }

    #[test]
    fn check_passes_when_every_target_is_met() {
        let found = targets(&good_report(), true);
        // 1 vCPU, and per workload: ratio, spread, 4 and 8 vCPUs.
        assert_eq!(found.len(), 9, "{found:#?}");
        assert!(found.iter().all(|t| t.status == Status::Met), "{found:#?}");
        assert!(check_verdict(&found).is_ok());
        assert!(found[1].text.contains("1.86x, median of 3 pairs (target >= 1.85x)"), "{}", found[1].text);
    }

    #[test]
    fn a_missed_target_fails_the_check_and_is_named() {
        let mut report = good_report();
        // same-table on 8 vCPUs: 500k of 650k is 77% (target 85%).
        let runs = report["runs"].as_array_mut().unwrap();
        let eight = runs.iter_mut().find(|r| r["workload"] == "same-table" && r["cpus"] == 8).unwrap();
        eight["faults_per_sec"] = json!(500_000.0);
        let found = targets(&report, true);
        let missed: Vec<&Target> = found.iter().filter(|t| t.status == Status::Missed).collect();
        assert_eq!(missed.len(), 1);
        assert!(missed[0].text.starts_with("same-table, split, fault_lock=vma, 8 vCPUs: 77%"), "{}", missed[0].text);
        let err = check_verdict(&found).unwrap_err().to_string();
        assert!(err.contains("1 target(s) missed, 0 missing") && err.contains("MISSED: same-table"), "{err}");
        // A low median, a wide spread, a slow single vCPU.
        let report = json!({"runs": [
            rec("disjoint", "split", 1, Some(1), 280_000.0), rec("disjoint", "split", 2, Some(1), 560_000.0),
            rec("disjoint", "split", 1, Some(2), 280_000.0), rec("disjoint", "split", 2, Some(2), 460_000.0),
        ]});
        let t = targets(&report, false);
        assert_eq!(statuses(&t), [Status::Missed, Status::Missed, Status::Missed], "{t:#?}");
        assert!(t[1].text.contains("1.82x") && t[2].text.contains("spread 0.36"), "{t:#?}");
    }

    #[test]
    fn missing_runs_fail_the_check_but_are_not_verdicts_without_it() {
        // Only disjoint, one plain run on 1 and 2 vCPUs: no spread, no 4 or
        // 8 vCPUs, no same-table.
        let report = json!({"runs": [
            rec("disjoint", "split", 1, None, 350_000.0), rec("disjoint", "split", 2, None, 660_000.0),
        ]});
        let t = targets(&report, false);
        assert_eq!(statuses(&t), [Status::Met, Status::Met]);
        assert!(t[1].text.contains("one run each, not pairs"), "{}", t[1].text);
        assert!(check_verdict(&t).is_ok(), "without --check nothing is missing");
        let t = targets(&report, true);
        let missing: Vec<&str> = t.iter().filter(|t| t.status == Status::Missing).map(|t| t.text.as_str()).collect();
        assert_eq!(missing.len(), 6, "{missing:#?}");
        assert!(missing[0].contains("disjoint") && missing[0].contains("spread needs 2 pairs"), "{missing:?}");
        assert!(missing[1].contains("disjoint, split, fault_lock=vma, 4 vCPUs: needs a run on 4 vCPUs"));
        assert!(missing[3].contains("same-table") && missing[3].contains("no 1- and 2-vCPU runs"), "{missing:?}");
        assert!(missing[4].contains("same-table, split, fault_lock=vma, 4 vCPUs: needs runs on 2 and 4 vCPUs"));
        let err = check_verdict(&t).unwrap_err().to_string();
        assert!(err.contains("0 target(s) missed, 6 missing a run") && err.contains("MISSING: same-table"), "{err}");
        // An empty report (e.g. every run of another workload) misses all.
        let t = targets(&json!({"runs": []}), true);
        assert_eq!(t.len(), 7, "1 vCPU, and per workload 1 -> 2, 4 and 8 vCPUs: {t:#?}");
        assert!(t.iter().all(|t| t.status == Status::Missing));
        assert!(check_verdict(&targets(&json!({"runs": []}), false)).is_err(), "nothing checked is no pass");
    }

    #[test]
    fn split_vs_single_counts_only_when_both_runs_are_there() {
        let mut report = good_report();
        assert!(!targets(&report, true).iter().any(|t| t.text.contains("split vs single")));
        report["runs"].as_array_mut().unwrap().push(rec("disjoint", "single", 8, None, 300_000.0));
        let t = targets(&report, true);
        let sv = t.iter().find(|t| t.text.contains("split vs single")).unwrap();
        assert_eq!(sv.status, Status::Missed, "560k / 300k < 2");
    }
}
