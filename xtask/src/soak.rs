//! `cargo xtask soak`: the kernel's soak (`mode=soak`,
//! kernel/src/workload/soak.rs) for a set time on each lock build: a seeded
//! random mix of fault storms, system-call fuzzers, process and thread
//! churn and out-of-memory pressure on every CPU, with the invariants
//! checked after every phase. Prints the kernel's progress line each
//! minute and a summary; on a failure, the seed and the phase, and the
//! command that repeats it.

use std::io::{BufRead, BufReader, Seek};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::kernel::{BuildConfig, Firmware};
use crate::qemu::{self, Accel, Machine};
use crate::{build_kernel, setup};

/// `SPLIT_PTLOCK_CPUS` of the single-lock build.
const SINGLE_LOCK_CPUS: u32 = 1_000_000;

#[derive(Args)]
pub struct SoakArgs {
    /// Minutes of soak per lock build.
    #[arg(long, default_value_t = 5)]
    minutes: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=255))]
    smp: u32,
    /// Guest RAM, e.g. 1G.
    #[arg(long, default_value = "1G", value_parser = qemu::parse_mem)]
    mem: String,
    /// The seed (default: taken from the clock and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Lock builds to soak, one after the other: split, single.
    #[arg(long, default_value = "split,single", value_delimiter = ',')]
    locks: Vec<String>,
    /// About how long one phase runs, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    phase_ms: u64,
    /// An optimized kernel (the default is the debug build: the lock-order
    /// checker, page poisoning and the lock records of the watchdog).
    #[arg(long)]
    release: bool,
    /// Accelerator (default: KVM only with hardware virtualization, else TCG).
    #[arg(long, value_enum)]
    accel: Option<Accel>,
}

/// The kernel command line of a soak.
pub fn cmdline(secs: u64, seed: u64, phase_ms: u64) -> String {
    format!("mode=soak soak_secs={secs} soak_seed={seed} soak_phase_ms={phase_ms}")
}

/// The `SOAK-RESULT` line's JSON in `log`, if any.
pub fn result(log: &str) -> Option<Value> {
    let line = log.lines().find_map(|l| l.split_once("SOAK-RESULT ").map(|(_, j)| j.to_string()))?;
    serde_json::from_str(&line).ok()
}

/// The kernel's `SOAK FAILED: ...` line, if any.
pub fn failure(log: &str) -> Option<&str> {
    log.lines().find_map(|l| l.split_once("SOAK FAILED: ").map(|(_, why)| why))
}

/// The last phase the log says started.
pub fn last_phase(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| l.split_once("soak: phase ")?.1.split_whitespace().next()?.parse().ok())
}

/// One line of summary from a result.
pub fn describe(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    format!(
        "{} s on {} CPUs, seed {}: {} phases, {} storms ({} threads, {} killed out of memory), {} system calls fuzzed, {} processes, {} threads churned, {} injected failures in {} phases, {} faults, frames lost: {}",
        n("seconds"),
        n("cpus"),
        n("seed"),
        n("phases"),
        n("storms"),
        n("storm_threads"),
        n("storm_kills"),
        n("syscalls_fuzzed"),
        n("processes"),
        n("threads"),
        n("injected_failures"),
        n("injected_phases"),
        n("faults"),
        r["frames_lost"].as_i64().unwrap_or(0),
    )
}

/// Echoes the lines of the growing `log` that concern the soak until `stop`.
fn follow(log: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let log = log.to_path_buf();
    std::thread::spawn(move || {
        let mut pos = 0u64;
        loop {
            let done = stop.load(Ordering::Relaxed);
            if let Ok(mut f) = std::fs::File::open(&log)
                && f.seek(std::io::SeekFrom::Start(pos)).is_ok()
            {
                let mut r = BufReader::new(f);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if !line.ends_with('\n') {
                        break;
                    }
                    pos += line.len() as u64;
                    let l = line.trim_end();
                    let wanted = ["soak: ", "SOAK", "PANIC", "OOPS", "WATCHDOG", "watchdog:", "panicked"];
                    if wanted.iter().any(|w| l.contains(w)) && !l.contains("soak: phase ") {
                        println!("{l}");
                    }
                    line.clear();
                }
            }
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

pub fn run(args: SoakArgs) -> Result<bool> {
    for l in &args.locks {
        if l != "split" && l != "single" {
            bail!("unknown lock build {l:?}; known: split, single");
        }
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let qemu_bin = setup::ensure_all(false)?;
    let (accel, why) = qemu::choose_accel(args.accel);
    println!(
        "xtask: soak: {} min per lock build ({}), -smp {}, seed {seed}; accelerator {accel}: {why}",
        args.minutes,
        args.locks.join(", "),
        args.smp
    );
    let mut all_ok = true;
    let mut summaries = Vec::new();
    for lock in &args.locks {
        let config = BuildConfig {
            release: args.release,
            split_ptlock_cpus: (lock == "single").then_some(SINGLE_LOCK_CPUS),
            features: Vec::new(),
        };
        let (_, image) = build_kernel(&config, Firmware::Bios)?;
        let machine = Machine {
            image,
            linux: None,
            firmware: Firmware::Bios,
            smp: args.smp,
            mem: args.mem.clone(),
            accel,
            icount: false,
            cmdline: cmdline(args.minutes * 60, seed, args.phase_ms),
            extra: Vec::new(),
            vcpu_time: None,
        };
        let name = format!("soak-{lock}-smp{}", args.smp);
        let log_path = qemu::log_dir().join(format!("{name}.log"));
        let stop = Arc::new(AtomicBool::new(false));
        let follower = follow(&log_path, stop.clone());
        // The run limit: the soak's time, plus a last phase and the
        // invariant checks under a slow host.
        let limit = Duration::from_secs(args.minutes * 60 + 300);
        let outcome = qemu::run(&qemu_bin, &machine, &name, machine.limits(limit), None, false);
        stop.store(true, Ordering::Relaxed);
        let _ = follower.join();
        let outcome = outcome?;
        let log =
            std::fs::read_to_string(&outcome.log).with_context(|| format!("reading {}", outcome.log.display()))?;
        let res = result(&log);
        let ok = outcome.kernel_succeeded() && res.as_ref().is_some_and(|r| r["ok"] == true);
        match (&res, ok) {
            (Some(r), true) => summaries.push(format!("{lock}: {}", describe(r))),
            _ => {
                all_ok = false;
                let why = failure(&log).map(str::to_string).unwrap_or_else(|| outcome.describe(&name));
                let phase = last_phase(&log).map_or(String::from("?"), |p| p.to_string());
                summaries.push(format!(
                    "{lock}: FAILED in phase {phase}: {why}\n      repeat: cargo xtask soak --seed {seed} --smp {} --locks {lock} --minutes {}{}; serial log: {}",
                    args.smp,
                    args.minutes,
                    if args.release { " --release" } else { "" },
                    outcome.log.display()
                ));
            }
        }
    }
    println!("\nxtask: soak summary");
    for s in &summaries {
        println!("  {s}");
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_failures_and_phases_are_read_from_the_log() {
        let log = "[ 0.1] cpu0 INFO  soak: phase 1 (seed 7)\n[ 3.1] cpu0 INFO  soak: phase 2 (seed 7)\n[ 5.0] cpu0 ERROR SOAK FAILED: seed 7, phase 2: free frames 10, baseline 12: 2 lost\nSOAK-RESULT {\"ok\":false,\"seed\":7,\"cpus\":4,\"seconds\":5,\"phases\":2,\"frames_lost\":2}\n";
        assert_eq!(last_phase(log), Some(2));
        assert_eq!(failure(log), Some("seed 7, phase 2: free frames 10, baseline 12: 2 lost"));
        let r = result(log).unwrap();
        assert_eq!(r["ok"], false);
        assert!(describe(&r).contains("seed 7: 2 phases") && describe(&r).contains("frames lost: 2"));
        assert!(result("no result here").is_none());
        assert_eq!(cmdline(30, 1, 3000), "mode=soak soak_secs=30 soak_seed=1 soak_phase_ms=3000");
    }
}
