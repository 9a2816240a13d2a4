//! What QEMU's vCPU threads did on the host while a bench storm ran: on a
//! host CPU, runnable (waiting for one), or blocked (asleep in the host
//! kernel).
//!
//! It tells the two ways a 2-vCPU boot can lose to two 1-vCPU ones apart.
//! A vCPU thread blocks when it sleeps on a lock of QEMU's (QEMU takes its
//! global lock, the BQL, to deliver every exception, so every guest page
//! fault takes it once; two vCPUs faulting at once meet there) or when its
//! guest CPU halts; it is runnable but waiting when the host has no CPU for
//! it. Whatever a boot loses beyond those two, its vCPU threads lose while
//! running: each event costs the emulator more with two vCPUs than with one.
//! (Measured on these machines: a 2-vCPU `disjoint` storm's threads run
//! 97% of the timed windows, blocked 2%, so the loss there is the running
//! kind; `same-table`'s threads also block while they wait at its
//! barriers, where the guest halts.)
//!
//! The figures come from `/proc/PID/task/TID/schedstat` (nanoseconds on a
//! CPU, nanoseconds runnable but waiting) of the threads QEMU names
//! `CPU n/TCG` or `CPU n/KVM` (`-name ...,debug-threads=on`), read at two
//! serial lines of the guest: the end of its warm-up window and the end of
//! its last timed window, so only the timed windows count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The serial lines between which a storm's vCPU threads are accounted:
/// the first line containing `start`, then the last line after it
/// containing `end`.
#[derive(Clone, Copy, Debug)]
pub struct Marks {
    pub start: &'static str,
    pub end: &'static str,
}

/// A bench storm's: from the end of the warm-up window (`bench: warm-up:`,
/// `linux-storm: warm-up:`) to the end of its last timed window (`bench:
/// window 5/5:`, `linux-storm: window 5/5:`). Not to the `BENCH-RESULT`
/// line: the guest ends the run right after it, and QEMU's threads may be
/// gone by the time that line is read.
pub const STORM: Marks = Marks { start: "warm-up:", end: " window " };

/// One vCPU thread's counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ThreadTimes {
    tid: u32,
    /// Nanoseconds on a host CPU.
    running: u64,
    /// Nanoseconds runnable, waiting for a host CPU.
    runnable: u64,
}

/// The host's CPU time so far, all its CPUs together (`/proc/stat`'s `cpu`
/// line, in clock ticks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostTicks {
    /// Every state's ticks (user, nice, system, idle, iowait, irq, softirq,
    /// steal; guest time is already inside user and nice).
    total: u64,
    /// Ticks the host's own hypervisor ran something else on its CPUs.
    steal: u64,
}

/// The vCPU threads' counters at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    at: Instant,
    threads: Vec<ThreadTimes>,
    host: Option<HostTicks>,
}

/// How the vCPU threads spent the time between two snapshots, as shares of
/// it, averaged over the threads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VcpuTime {
    pub threads: usize,
    pub wall: Duration,
    pub running: f64,
    pub runnable: f64,
    pub blocked: f64,
    /// The share of the host's CPU time its hypervisor stole over the same
    /// span (`None` where the host does not report it).
    pub steal: Option<f64>,
}

impl VcpuTime {
    /// Its JSON record (`vcpu_threads` of a bench run): shares to 0.1%.
    pub fn to_json(self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "threads": self.threads,
            "seconds": round(self.wall.as_secs_f64()),
            "running": round(self.running),
            "blocked": round(self.blocked),
            "runnable": round(self.runnable),
            "host_steal": self.steal.map(round),
        })
    }
}

/// The words for a [`VcpuTime::to_json`] record, e.g. `vCPU threads ran
/// 97% blocked 2% runnable 1%, host steal 0.4%`; `None` for a run without
/// one.
pub fn describe(record: &Value) -> Option<String> {
    let share = |k: &str| record[k].as_f64().map(|x| 100.0 * x);
    let steal = share("host_steal").map(|s| format!(", host steal {s:.1}%")).unwrap_or_default();
    Some(format!(
        "vCPU threads ran {:.0}% blocked {:.0}% runnable {:.0}%{steal}",
        share("running")?,
        share("blocked")?,
        share("runnable")?
    ))
}

/// Whether a thread name is one of QEMU's vCPU threads (`CPU 0/TCG`).
fn is_vcpu_thread(comm: &str) -> bool {
    comm.trim_end().strip_prefix("CPU ").and_then(|rest| rest.split_once('/')).is_some_and(|(n, accel)| {
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && matches!(accel, "TCG" | "KVM")
    })
}

/// A `schedstat` file's first two fields: nanoseconds running, runnable.
fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut it = s.split_whitespace().map(str::parse::<u64>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// `/proc/stat`'s `cpu` line as [`HostTicks`]; `None` for a line without
/// the steal field (kernels before 2.6.11) or one that does not parse.
fn parse_proc_stat(s: &str) -> Option<HostTicks> {
    let line = s.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let states = fields.get(..8)?;
    Some(HostTicks { total: states.iter().sum(), steal: states[7] })
}

/// The counters of process `pid`'s vCPU threads now; `None` if it has none
/// (or is gone, or this is not Linux).
pub fn snapshot(pid: u32) -> Option<Snapshot> {
    let at = Instant::now();
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !is_vcpu_thread(&comm) {
            continue;
        }
        let Some((running, runnable)) =
            std::fs::read_to_string(entry.path().join("schedstat")).ok().as_deref().and_then(parse_schedstat)
        else {
            continue;
        };
        threads.push(ThreadTimes { tid, running, runnable });
    }
    (!threads.is_empty()).then(|| {
        let host = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_proc_stat);
        Snapshot { at, threads, host }
    })
}

/// How often a [`Sampler`] snapshots the vCPU threads.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Snapshots a process's vCPU threads every [`SAMPLE_EVERY`] on a thread of
/// its own, until the process is gone or the sampler is dropped: the latest
/// snapshot stands in for one taken at a serial line read after QEMU exited.
pub struct Sampler {
    latest: Arc<Mutex<Option<Snapshot>>>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    pub fn start(pid: u32) -> Self {
        let (latest, stop) = (Arc::new(Mutex::new(None)), Arc::new(AtomicBool::new(false)));
        let (l, s) = (Arc::clone(&latest), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match snapshot(pid) {
                    Some(snap) => *l.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap),
                    // Gone (or not started its vCPUs yet: keep trying while
                    // nothing was seen).
                    None if l.lock().unwrap_or_else(|e| e.into_inner()).is_some() => break,
                    None => {}
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self { latest, stop }
    }

    /// The latest snapshot taken.
    pub fn latest(&self) -> Option<Snapshot> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Snapshot {
    /// How the threads present in both snapshots spent the time from this
    /// one to `later`.
    pub fn until(&self, later: &Snapshot) -> Option<VcpuTime> {
        let wall = later.at.checked_duration_since(self.at)?;
        let mut v = between(&self.threads, &later.threads, wall)?;
        v.steal = self.host.zip(later.host).and_then(|(a, b)| steal_share(a, b));
        Some(v)
    }
}

/// The share of the host's CPU time stolen from `before` to `after`; `None`
/// if no tick passed (or the counters went backwards).
fn steal_share(before: HostTicks, after: HostTicks) -> Option<f64> {
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    let steal = after.steal.checked_sub(before.steal)?;
    Some((steal as f64 / total as f64).min(1.0))
}

fn between(before: &[ThreadTimes], after: &[ThreadTimes], wall: Duration) -> Option<VcpuTime> {
    let wall_ns = wall.as_nanos() as f64;
    if wall_ns <= 0.0 {
        return None;
    }
    let (mut running, mut runnable, mut n) = (0.0, 0.0, 0usize);
    for a in after {
        let Some(b) = before.iter().find(|b| b.tid == a.tid) else { continue };
        running += (a.running.saturating_sub(b.running) as f64 / wall_ns).min(1.0);
        runnable += (a.runnable.saturating_sub(b.runnable) as f64 / wall_ns).min(1.0);
        n += 1;
    }
    if n == 0 {
        return None;
    }
    let (running, runnable) = (running / n as f64, runnable / n as f64);
    Some(VcpuTime { threads: n, wall, running, runnable, blocked: (1.0 - running - runnable).max(0.0), steal: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_told_by_their_names() {
        for name in ["CPU 0/TCG\n", "CPU 12/TCG", "CPU 3/KVM"] {
            assert!(is_vcpu_thread(name), "{name:?}");
        }
        for name in ["qemu-system-x86", "CPU /TCG", "CPU x/TCG", "CPU 0/HVF", "worker", "call_rcu"] {
            assert!(!is_vcpu_thread(name), "{name:?}");
        }
    }

    #[test]
    fn schedstat_gives_running_and_runnable_nanoseconds() {
        assert_eq!(parse_schedstat("869320 1200 2\n"), Some((869320, 1200)));
        assert_eq!(parse_schedstat("5"), None);
        assert_eq!(parse_schedstat("a b c"), None);
    }

    #[test]
    fn shares_are_per_thread_averages_of_the_wall_time() {
        let t = |tid, running, runnable| ThreadTimes { tid, running, runnable };
        let before = [t(1, 100, 0), t(2, 0, 0), t(3, 0, 0)];
        // Over 1000 ns: thread 1 ran 800 and waited 100, thread 2 ran 600
        // and waited 0; thread 3 is gone, thread 4 is new: neither counts.
        let after = [t(1, 900, 100), t(2, 600, 0), t(4, 1000, 0)];
        let v = between(&before, &after, Duration::from_nanos(1000)).unwrap();
        assert_eq!(v.threads, 2);
        assert!((v.running - 0.7).abs() < 1e-9, "{v:?}");
        assert!((v.runnable - 0.05).abs() < 1e-9, "{v:?}");
        assert!((v.blocked - 0.25).abs() < 1e-9, "{v:?}");
        assert_eq!(describe(&v.to_json()).as_deref(), Some("vCPU threads ran 70% blocked 25% runnable 5%"));
        assert_eq!(v.to_json()["host_steal"], Value::Null);
        assert_eq!(describe(&Value::Null), None);
        assert!(between(&before, &[t(9, 1, 1)], Duration::from_nanos(1000)).is_none());
        assert!(between(&before, &after, Duration::ZERO).is_none());
    }

    #[test]
    fn steal_is_the_host_lost_share_of_its_cpu_time() {
        // Two CPUs, 100 ticks a second, 10 s apart: 2000 ticks, 50 stolen.
        let before = parse_proc_stat(
            "cpu  1466180 0 268263 928482 5839 0 2128 22566 0 0\ncpu0 733090 0 134131 464241 2919 0 1064 11283 0 0\n",
        )
        .unwrap();
        assert_eq!(before, HostTicks { total: 1466180 + 268263 + 928482 + 5839 + 2128 + 22566, steal: 22566 });
        // Guest time (the last two fields) is inside user time: not added.
        let after = parse_proc_stat("intr 5\ncpu  1467180 0 268763 928932 5839 0 2128 22616 300 0\n").unwrap();
        assert_eq!(after.total - before.total, 2000);
        assert_eq!(steal_share(before, after), Some(0.025));
        assert_eq!(steal_share(before, before), None, "no tick passed");
        assert_eq!(steal_share(after, before), None, "counters went backwards");
        // Kernels without the steal field, and lines that do not parse.
        assert_eq!(parse_proc_stat("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"), None);
        let v = VcpuTime {
            threads: 2,
            wall: Duration::from_secs(10),
            running: 0.97,
            runnable: 0.01,
            blocked: 0.02,
            steal: steal_share(before, after),
        };
        assert_eq!(v.to_json()["host_steal"].as_f64(), Some(0.025));
        assert_eq!(
            describe(&v.to_json()).as_deref(),
            Some("vCPU threads ran 97% blocked 2% runnable 1%, host steal 2.5%")
        );
    }

    #[test]
    fn this_process_threads_are_not_vcpus() {
        assert!(snapshot(std::process::id()).is_none());
    }
}
