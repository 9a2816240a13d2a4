//! The lockup watchdog (Linux's hard-lockup detector and the spinlock
//! debug code's "lockup suspected", in one).
//!
//! Two ways a CPU can stop making progress, and how each is seen:
//!
//! * **Spinning on one lock.** Every turn of a contended wait loop of `mm`'s
//!   locks (spinlocks, `mmap_lock`) goes through the HAL's `spin_wait`,
//!   which calls [`spinning`] with the turn count: the first turn stamps the
//!   wait's start, and every 4096th checks how long it has lasted. A CPU
//!   that has waited [`SPIN_LIMIT_SECS`] notices it itself, interrupts off
//!   or not.
//! * **No timer tick handled** (interrupts off for good, or stuck in an
//!   interrupt handler): every CPU counts its ticks ([`tick`]) and watches
//!   one buddy, the next CPU online (Linux's buddy hard-lockup detector):
//!   if the buddy's count has not moved for [`TICK_LIMIT_SECS`] of the
//!   watcher's own ticks, the buddy is locked up. Counted in ticks, not in
//!   TSC time (though the CPUs' TSCs agree, see the smp test
//!   `tsc_never_goes_backwards_across_cpus`): a host that pauses the whole
//!   machine pauses the watcher's ticks too, so a pause is never taken for
//!   a lockup. Code that legitimately keeps interrupts off for long while
//!   making progress says so with [`touch`] (the cross-CPU barrier does,
//!   each round).
//!
//! Either way, the first CPU to notice stops every other CPU with an NMI
//! (`arch::ipi::stop_other_cpus_reporting`), and each of them prints, one at
//! a time, where it was interrupted, its backtrace, the lock it is taking
//! (the lock-order checker notes it before the wait), which CPU holds that
//! lock and where it took it (the checker's record of every CPU's held
//! locks, with `#[track_caller]` sites), and the locks it holds itself.
//! Then the noticing CPU prints its own, marks the running test FAILED and
//! powers off with a failure. The lock records exist in debug builds (the
//! checker's); a release kernel still detects and stops, with backtraces.
//!
//! `watchdog=off` on the command line disables it; `watchdog=SECS` sets the
//! spin limit (the tick limit is four times that).

use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicBool, AtomicU64};

use arch::percpu::{self, NR_CPUS};
use arch::trap::TrapFrame;

/// Default seconds a CPU may spin for one lock before the watchdog fires.
pub const SPIN_LIMIT_SECS: u64 = 5;
/// Default seconds a CPU may go without handling a timer tick (or a
/// [`touch`]): generous, because under TCG on an overcommitted host a
/// cross-CPU stress with interrupts off can legitimately take many seconds.
pub const TICK_LIMIT_SECS: u64 = 4 * SPIN_LIMIT_SECS;

/// Per CPU: ticks handled plus touches (the progress its buddy watches).
static PROGRESS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// Per CPU: its buddy's progress count when it last moved, and how many of
/// this CPU's own ticks have passed since.
static BUDDY_SEEN: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
static BUDDY_STALE: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// Own ticks without buddy progress that make a lockup (0: off).
static TICK_LIMIT_TICKS: AtomicU64 = AtomicU64::new(0);
/// Per CPU: TSC at the first turn of its current (or last) lock wait.
static SPIN_START: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// The spin limit in TSC cycles (0 until [`init`], and when disabled).
static SPIN_LIMIT: AtomicU64 = AtomicU64::new(0);
/// Set by the CPU that reports a lockup.
static FIRED: AtomicBool = AtomicBool::new(false);

/// Arms the watchdog (after the TSC is calibrated and the CPUs are up),
/// unless the command line says `watchdog=off`. Returns the spin limit in
/// seconds (0: off), for the boot summary.
pub fn init(cmdline: &crate::boot::cmdline::Cmdline) -> u64 {
    let secs = match cmdline.value("watchdog") {
        Some("off") => 0,
        Some(v) => v.parse().unwrap_or(SPIN_LIMIT_SECS),
        None => SPIN_LIMIT_SECS,
    };
    let Some(per_us) = arch::time::tsc_per_us() else { return 0 };
    SPIN_LIMIT.store(secs * per_us * 1_000_000, Relaxed);
    TICK_LIMIT_TICKS.store(secs * (TICK_LIMIT_SECS / SPIN_LIMIT_SECS) * u64::from(crate::smp::TICK_HZ), Relaxed);
    secs
}

/// This CPU is making progress although it handles no ticks (Linux
/// `touch_nmi_watchdog`): for loops that legitimately run with interrupts
/// off for long, once per step.
#[inline]
pub fn touch() {
    PROGRESS[percpu::cpu_id()].fetch_add(1, Relaxed);
}

/// The timer tick on this CPU (interrupts off): counts it and checks the
/// buddy's progress.
pub fn tick() {
    let cpu = percpu::cpu_id();
    PROGRESS[cpu].fetch_add(1, Relaxed);
    let limit = TICK_LIMIT_TICKS.load(Relaxed);
    if limit == 0 {
        return;
    }
    let Some(buddy) = percpu::online_cpus().find(|&c| c > cpu).or_else(|| percpu::online_cpus().find(|&c| c != cpu))
    else {
        return;
    };
    let seen = PROGRESS[buddy].load(Relaxed);
    if seen != BUDDY_SEEN[cpu].swap(seen, Relaxed) {
        BUDDY_STALE[cpu].store(0, Relaxed);
        return;
    }
    let stale = BUDDY_STALE[cpu].fetch_add(1, Relaxed) + 1;
    if stale > limit {
        lockup(format_args!(
            "CPU {buddy} handled no timer tick for {} s (interrupts off, or stuck in a handler), as its buddy CPU {cpu} counts",
            stale / u64::from(crate::smp::TICK_HZ)
        ));
    }
}

/// One turn of a contended lock's wait loop on this CPU (the HAL's
/// `spin_wait`; `spins` counts the turns of this wait from 1).
#[inline]
pub fn spinning(spins: u32) {
    if spins == 1 {
        SPIN_START[percpu::cpu_id()].store(arch::time::rdtsc(), Relaxed);
    } else if spins.is_multiple_of(4096) {
        check_spin();
    }
}

#[cold]
fn check_spin() {
    let limit = SPIN_LIMIT.load(Relaxed);
    let cpu = percpu::cpu_id();
    let spun = arch::time::rdtsc().saturating_sub(SPIN_START[cpu].load(Relaxed));
    if limit != 0 && spun > limit {
        let secs = cycles_to_tenths(spun);
        lockup(format_args!("CPU {cpu} has been spinning on one lock for {}.{} s", secs / 10, secs % 10));
    }
}

fn cycles_to_tenths(cycles: u64) -> u64 {
    cycles / (arch::time::tsc_per_us().unwrap_or(1000) * 100_000).max(1)
}

/// Reports a lockup and ends the run (module comment).
#[cold]
fn lockup(why: core::fmt::Arguments) -> ! {
    arch::irq::disable();
    if FIRED.swap(true, Relaxed) {
        // Another CPU is reporting; its NMI will stop this one.
        loop {
            core::hint::spin_loop();
        }
    }
    let me = percpu::cpu_id();
    arch::serial::write_fmt_forced(format_args!(
        "\nWATCHDOG: lockup detected on CPU {me}: {why}\n\
         watchdog: stopping every other CPU with an NMI; each prints where it was\n"
    ));
    if !arch::ipi::stop_other_cpus_reporting(report_stopped, 3000) {
        arch::ipi::park(); // A panic on another CPU is reporting already.
    }
    arch::serial::write_fmt_forced(format_args!("watchdog: CPU {me} (noticed the lockup):\n"));
    describe_locks(me);
    arch::trap::backtrace::print(lockup as *const () as u64, arch::trap::backtrace::current_rbp());
    arch::serial::write_fmt_forced(format_args!(
        "watchdog: {} of {} other CPUs stopped and reported\n",
        arch::ipi::stopped_count(),
        percpu::online_count() - 1
    ));
    crate::test::runner::on_lockup();
    arch::qemu::exit(arch::qemu::ExitCode::Failure)
}

/// Runs on each CPU the watchdog's NMI stopped, before it parks.
fn report_stopped(frame: &TrapFrame) {
    let cpu = percpu::cpu_id();
    arch::serial::write_fmt_forced(format_args!(
        "watchdog: CPU {cpu}: interrupted in {} at rip {:#x}\n",
        if frame.from_user() { "ring 3" } else { "the kernel" },
        frame.rip
    ));
    describe_locks(cpu);
    if !frame.from_user() {
        arch::trap::backtrace::print(frame.rip, frame.rbp);
    }
}

/// Prints the lock `cpu` is taking (and who holds it, where taken) and the
/// locks it holds, from the lock-order checker's records. No heap: this
/// runs in NMI context.
fn describe_locks(cpu: usize) {
    let out = |args: core::fmt::Arguments| arch::serial::write_fmt_forced(format_args!("  {args}\n"));
    let Some(me) = crate::mmhal::lockdep_of(cpu) else {
        out(format_args!("(lock records are kept by debug builds only)"));
        return;
    };
    match me.acquiring() {
        Some(want) => {
            out(format_args!("waiting for lock {:#x} ({:?}), taking it at {}", want.addr, want.level, Site(want.site)));
            let holder = percpu::online_cpus()
                .find_map(|c| crate::mmhal::lockdep_of(c)?.held().find(|h| h.addr == want.addr).map(|h| (c, h)));
            match holder {
                Some((c, h)) => out(format_args!("that lock is held by CPU {c}, taken at {}", Site(h.site))),
                None => out(format_args!("no CPU's records show that lock held")),
            }
        }
        None => out(format_args!("not taking a lock the checker knows of")),
    }
    for h in me.held() {
        out(format_args!("holds lock {:#x} ({:?}), taken at {}", h.addr, h.level, Site(h.site)));
    }
}

/// A `Location` or `?`.
struct Site(Option<&'static core::panic::Location<'static>>);

impl core::fmt::Display for Site {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(l) => write!(f, "{l}"),
            None => f.write_str("?"),
        }
    }
}
