//! The bench's `disjoint` and `same-table` storms as a Linux program, so a
//! stock Linux guest can be measured in the same QEMU, on the same host, in
//! the same session as this kernel (`cargo xtask bench --guest linux`).
//!
//! xtask links it statically and boots it as `/init` of an initramfs beside
//! Debian's cloud kernel. It reads its shape from the kernel command line
//! (Linux hands unknown `key=value` words to init as environment variables:
//! `bench_workload`, `bench_windows`, `bench_mib`, `bench_window_ms`), runs
//! one thread pinned to each online CPU, and reports one `BENCH-RESULT` line
//! in the format of the kernel's bench (kernel/src/workload/bench.rs), so
//! xtask's table, pairs and plot read both alike. It ends the run through
//! QEMU's `isa-debug-exit` port, with the kernel's exit codes.
//!
//! The loops are will-it-scale's `page_fault1` shapes, as the kernel's user
//! storm program (user/src/storm.rs, `MODE_CYCLE` and the interleaved
//! pattern with `unmap_each_round`) runs them:
//!
//! * `disjoint`: each thread maps its own `bench_mib` MiB, writes one word
//!   per 4 KiB page, unmaps it, and again, until the window's time is up
//!   (looked at every 64 pages);
//! * `same-table`: one region of threads x `bench_mib` MiB; thread t of n
//!   writes pages t, t+n, t+2n, ..., so all share PTE tables; after each
//!   pass a barrier, thread 0's munmap and re-mmap, a barrier, all timed; the
//!   pass in which the time is up is the last.
//!
//! A window's faults are the process's minor faults (`getrusage`), which the
//! bench checks against the pages written: one each, as with transparent
//! huge pages off (xtask boots with `transparent_hugepage=never`; a THP
//! setting other than `never` fails the run).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PAGE: usize = 4096;
/// The deadline is looked at every this many pages.
const CHECK_EVERY: u64 = 64;
/// `isa-debug-exit`'s port and the kernel's two codes (arch/src/qemu.rs):
/// QEMU exits with `(code << 1) | 1`, 33 or 35.
const DEBUG_EXIT_PORT: u16 = 0xf4;
const EXIT_SUCCESS: u32 = 0x10;
const EXIT_FAILURE: u32 = 0x11;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Disjoint,
    SameTable,
}

/// The run's shape, from the environment.
#[derive(Clone, Copy, Debug)]
struct Shape {
    workload: Workload,
    windows: u32,
    mib: u64,
    window_ms: u64,
}

fn main() {
    let code = match run() {
        Ok(result) => {
            println!("BENCH-RESULT {result}");
            EXIT_SUCCESS
        }
        Err(e) => {
            println!("BENCH-FAILED: {e}");
            EXIT_FAILURE
        }
    };
    exit_qemu(code)
}

fn env(key: &str) -> Result<String, String> {
    std::env::var(key).map_err(|_| format!("no `{key}=` on the kernel command line"))
}

fn env_number(key: &str) -> Result<u64, String> {
    let v = env(key)?;
    v.parse().map_err(|_| format!("`{key}={v}`: not a number"))
}

fn shape() -> Result<Shape, String> {
    let workload = match env("bench_workload")?.as_str() {
        "disjoint" => Workload::Disjoint,
        "same-table" => Workload::SameTable,
        w => return Err(format!("`bench_workload={w}`: this program runs disjoint and same-table")),
    };
    let shape = Shape {
        workload,
        windows: u32::try_from(env_number("bench_windows")?).map_err(|_| "bench_windows too large")?,
        mib: env_number("bench_mib")?,
        window_ms: env_number("bench_window_ms")?,
    };
    if shape.windows == 0 || shape.mib == 0 || shape.window_ms == 0 {
        return Err(format!("{shape:?}: windows, MiB and window length must all be nonzero"));
    }
    Ok(shape)
}

fn run() -> Result<Value, String> {
    let shape = shape()?;
    let release = release();
    check_thp()?;
    let cpus = std::thread::available_parallelism().map_err(|e| format!("counting CPUs: {e}"))?.get();
    let tsc_per_us = tsc_per_us();
    println!(
        "linux-storm: Linux {release}, {cpus} CPUs, {:?} over {} MiB per thread, {} windows of {} ms, TSC {tsc_per_us:.1} per us",
        shape.workload, shape.mib, shape.windows, shape.window_ms
    );
    let storm = Storm::start(shape, cpus, (shape.window_ms as f64 * 1000.0 * tsc_per_us) as u64);
    // One warm-up window, as the kernel's bench does, then the timed ones
    // (the host accounts QEMU's vCPU threads from the warm-up line on).
    let warm = storm.window()?;
    println!("linux-storm: warm-up: {} faults for {} pages", warm["faults"], warm["touched"]);
    let mut windows = Vec::new();
    for i in 1..=shape.windows {
        let w = storm.window()?;
        println!(
            "linux-storm: window {i}/{}: {} faults for {} pages in {:.0} us",
            shape.windows,
            w["faults"],
            w["touched"],
            w["cycles"].as_f64().unwrap_or(0.0) / tsc_per_us
        );
        windows.push(w);
    }
    storm.stop();
    Ok(json!({
        "guest": "linux",
        "release": release,
        "tsc_per_us": tsc_per_us,
        "windows": windows,
    }))
}

/// `uname -r`.
fn release() -> String {
    // SAFETY: `utsname` is plain data; all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates `release` within the array.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// Fails unless transparent huge pages are off (or not built in): with
/// THP a fault maps 512 pages, and the counts would not compare.
fn check_thp() -> Result<(), String> {
    let _ = std::fs::create_dir_all("/sys");
    // SAFETY: the arguments are NUL-terminated strings; mounting sysfs
    // changes nothing but this (initramfs) namespace's /sys.
    let mounted = unsafe { libc::mount(c"sysfs".as_ptr(), c"/sys".as_ptr(), c"sysfs".as_ptr(), 0, std::ptr::null()) };
    if mounted != 0 {
        return Err(format!("mounting sysfs: {}", std::io::Error::last_os_error()));
    }
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
        Ok(s) if !s.contains("[never]") => {
            Err(format!("transparent huge pages are on ({}); boot with transparent_hugepage=never", s.trim()))
        }
        _ => Ok(()),
    }
}

fn tsc() -> u64 {
    // SAFETY: `rdtsc` has no side effects and is allowed in ring 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per microsecond, against `CLOCK_MONOTONIC` over 200 ms.
fn tsc_per_us() -> f64 {
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), tsc());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1e6
}

/// The process's minor faults so far (all threads).
fn minor_faults() -> u64 {
    // SAFETY: `rusage` is plain data; all zeroes is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable `rusage`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_minflt as u64
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<(), String> {
    // SAFETY: `cpu_set_t` is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the number of online CPUs, within the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid CPU set of the size given.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(format!("pinning a thread to CPU {cpu}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// An anonymous private read-write mapping of `len` bytes (at `fixed`, if
/// given).
fn map(len: usize, fixed: Option<usize>) -> Result<usize, String> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if fixed.is_some() { libc::MAP_FIXED } else { 0 };
    // SAFETY: a new anonymous mapping; with MAP_FIXED, `fixed` is the
    // storm's own region, which nothing else uses.
    let p = unsafe { libc::mmap(fixed.unwrap_or(0) as *mut _, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap of {len} bytes: {}", std::io::Error::last_os_error()));
    }
    Ok(p as usize)
}

fn unmap(addr: usize, len: usize) -> Result<(), String> {
    // SAFETY: [addr, addr + len) is a mapping of this storm, which no
    // reference points into.
    if unsafe { libc::munmap(addr as *mut _, len) } != 0 {
        return Err(format!("munmap: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes one word to the page at `addr`.
fn touch(addr: usize, value: u64) {
    // SAFETY: callers pass a page of a read-write mapping of this storm.
    unsafe { (addr as *mut u64).write_volatile(value) };
}

/// What one thread did in one window.
#[derive(Default)]
struct Slot {
    touched: AtomicU64,
    waited: AtomicU64,
    end: AtomicU64,
    failed: AtomicBool,
}

/// What every thread shares.
struct Shared {
    shape: Shape,
    threads: usize,
    /// The main thread and every worker, at a window's start and end.
    window: Barrier,
    /// The workers, between `same-table` passes.
    pass: Barrier,
    /// TSC value at which this window's time is up.
    deadline: AtomicU64,
    /// `same-table`'s region (mapped by the main thread per window).
    region: AtomicU64,
    /// Set by thread 0 in the last `same-table` pass.
    last_pass: AtomicBool,
    stop: AtomicBool,
    slots: Vec<Slot>,
}

struct Storm {
    shared: Arc<Shared>,
    window_cycles: u64,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Storm {
    fn start(shape: Shape, threads: usize, window_cycles: u64) -> Storm {
        let shared = Arc::new(Shared {
            shape,
            threads,
            window: Barrier::new(threads + 1),
            pass: Barrier::new(threads),
            deadline: AtomicU64::new(0),
            region: AtomicU64::new(0),
            last_pass: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            slots: (0..threads).map(|_| Slot::default()).collect(),
        });
        let workers = (0..threads)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::spawn(move || worker(&s, i))
            })
            .collect();
        Storm { shared, window_cycles, workers }
    }

    fn region_len(&self) -> usize {
        (self.shared.shape.mib << 20) as usize
    }

    /// Runs one window; its record in the kernel bench's format.
    fn window(&self) -> Result<Value, String> {
        let s = &self.shared;
        let shared_len = self.region_len() * s.threads;
        if s.shape.workload == Workload::SameTable {
            s.region.store(map(shared_len, None)? as u64, Relaxed);
            s.last_pass.store(false, Relaxed);
        }
        for slot in &s.slots {
            slot.touched.store(0, Relaxed);
            slot.waited.store(0, Relaxed);
        }
        let faults = minor_faults();
        let start = tsc();
        s.deadline.store(start + self.window_cycles, Relaxed);
        s.window.wait();
        s.window.wait();
        let faults = minor_faults() - faults;
        let end = s.slots.iter().map(|t| t.end.load(Relaxed)).max().unwrap_or(start);
        if s.slots.iter().any(|t| t.failed.load(Relaxed)) {
            return Err("a storm thread's mmap or munmap failed (its message is above)".into());
        }
        if s.shape.workload == Workload::SameTable {
            unmap(s.region.load(Relaxed) as usize, shared_len)?;
        }
        let touched: u64 = s.slots.iter().map(|t| t.touched.load(Relaxed)).sum();
        Ok(json!({
            "faults": faults,
            "cycles": end.saturating_sub(start),
            "touched": touched,
            "min_faults": touched,
            "waiting_cycles": s.slots.iter().map(|t| t.waited.load(Relaxed)).sum::<u64>(),
        }))
    }

    fn stop(self) {
        self.shared.stop.store(true, Relaxed);
        self.shared.window.wait();
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, index: usize) {
    if let Err(e) = pin(index) {
        println!("linux-storm: {e}");
        s.slots[index].failed.store(true, Relaxed);
    }
    loop {
        s.window.wait();
        if s.stop.load(Relaxed) {
            return;
        }
        let slot = &s.slots[index];
        let done = match s.shape.workload {
            Workload::Disjoint => disjoint(s, slot),
            Workload::SameTable => same_table(s, index, slot),
        };
        if let Err(e) = done {
            println!("linux-storm: thread {index}: {e}");
            slot.failed.store(true, Relaxed);
        }
        slot.end.store(tsc(), Relaxed);
        s.window.wait();
    }
}

fn past(s: &Shared) -> bool {
    tsc() > s.deadline.load(Relaxed)
}

fn disjoint(s: &Shared, slot: &Slot) -> Result<(), String> {
    let len = (s.shape.mib << 20) as usize;
    let mut touched = 0u64;
    while !past(s) {
        let base = map(len, None)?;
        for page in (base..base + len).step_by(PAGE) {
            touch(page, touched);
            touched += 1;
            if touched.is_multiple_of(CHECK_EVERY) && past(s) {
                break;
            }
        }
        unmap(base, len)?;
    }
    slot.touched.store(touched, Relaxed);
    Ok(())
}

fn same_table(s: &Shared, index: usize, slot: &Slot) -> Result<(), String> {
    let len = (s.shape.mib << 20) as usize * s.threads;
    let base = s.region.load(Relaxed) as usize;
    let (mut touched, mut waited) = (0u64, 0u64);
    let mut wait = || {
        let t = tsc();
        s.pass.wait();
        waited += tsc() - t;
    };
    loop {
        let mut this_pass = 0u64;
        for page in (base + index * PAGE..base + len).step_by(PAGE * s.threads) {
            touch(page, touched);
            this_pass += 1;
            if this_pass.is_multiple_of(CHECK_EVERY) && past(s) {
                break;
            }
        }
        touched += this_pass;
        wait();
        if index == 0 {
            unmap(base, len)?;
            if past(s) {
                s.last_pass.store(true, Relaxed);
            } else {
                map(len, Some(base))?;
            }
        }
        wait();
        if s.last_pass.load(Relaxed) {
            break;
        }
    }
    slot.touched.store(touched, Relaxed);
    slot.waited.store(waited, Relaxed);
    Ok(())
}

/// Ends the run: QEMU exits with `(code << 1) | 1`. If the port cannot be
/// had, powers off (QEMU then exits 0, which xtask reports as no exit code).
fn exit_qemu(code: u32) -> ! {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // The serial driver sends queued output after `write` returns: wait
    // until it has, or QEMU's exit cuts the result line off.
    // SAFETY: tcdrain only waits on the open descriptor 1.
    unsafe { libc::tcdrain(1) };
    // SAFETY: asks for access to the debug-exit device's four ports; init
    // runs as root, with CAP_SYS_RAWIO.
    if unsafe { libc::ioperm(DEBUG_EXIT_PORT.into(), 4, 1) } == 0 {
        // SAFETY: port 0xf4 is QEMU's isa-debug-exit device (xtask adds it),
        // and ioperm above granted this thread access to it.
        unsafe { core::arch::asm!("out dx, eax", in("dx") DEBUG_EXIT_PORT, in("eax") code) };
    }
    println!("linux-storm: no access to the debug-exit port: {}", std::io::Error::last_os_error());
    // SAFETY: init powering the machine off is the end of this program.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    std::process::exit(1)
}
