//! The sampling profiler behind `cargo xtask profile`.
//!
//! # Clock
//!
//! Every CPU samples on its local-APIC timer interrupt. A performance
//! counter's overflow NMI would also see code that runs with interrupts
//! off, but QEMU's TCG emulates no PMU: `-cpu max` reports architectural
//! perfmon version 0 (CPUID leaf 0xA) and no AMD core counters, so the
//! timer it is. While a session runs, [`start`] reprograms every CPU's timer
//! from `TICK_HZ` to the sampling rate, and [`on_timer`] passes on only every
//! `rate / TICK_HZ`-th interrupt (an accumulator, exact on average for any
//! rate) as the scheduler's tick, so time slices, RCU's quiescent states and
//! [`ticks`](crate::smp::ticks) keep their `TICK_HZ` meaning. Code that runs
//! with interrupts off is seen when it enables them again; under TCG an
//! interrupt is taken between translation blocks.
//!
//! # Samples
//!
//! A sample is the interrupted RIP and its call chain, kernel frames then
//! user frames (`arch::trap::callchain`), and the lock class the CPU was
//! spinning on, if any. Each CPU appends its samples to its own buffer, from
//! its own timer interrupt, with interrupts off: one writer per buffer, no
//! lock, no read-modify-write on a shared line. The words are atomics only
//! so that the reader needs no `unsafe`; they compile to plain moves. A full
//! buffer counts the sample as dropped. [`stop`] turns sampling off on every
//! CPU with a cross call, which returns only once each CPU has run it, that
//! is after each CPU's last sampling interrupt: from then on the buffers
//! have no writer and are read and freed.
//!
//! A buffer is a run of words: a header (`len | class << 8 | exact << 32`:
//! the number of addresses, 1 + the lock class or 0, and which addresses are
//! instruction addresses rather than return addresses), then the addresses,
//! innermost first.
//!
//! # Lock classes
//!
//! `mm`'s spinlock and `mmap_lock` call the HAL's `lock_wait_begin(class)`
//! when they find the lock taken and `lock_wait_end` once they have it
//! (kernel/src/mmhal.rs): two stores to this CPU's marker, on the contended
//! path only. A kernel-mode sample reads the marker.
//!
//! # To the host
//!
//! [`Recording::dump`] writes the samples to the serial console, the channel
//! every run already captures and saves (xtask's serial log, with the test
//! protocol and oops backtraces): no extra QEMU device, file or fw_cfg
//! plumbing, and `cargo xtask profile` reads them from the saved log.
//! Identical stacks are merged first, so the dump is one line per distinct
//! (CPU, lock class, stack), not per sample:
//!
//! ```text
//! PROFILE-BEGIN rate=1000 cpus=2 clock=apic-timer perfmon=0/0/no tsc_mhz=2600
//! PROFILE-CPU 0 samples=412 dropped=0 cycles=1400000
//! PROFILE-S 0 pte_lock 17 5 ffffffff80031a2c,ffffffff80030f11,...
//! PROFILE-END stacks=230 samples=820
//! ```
//!
//! (`PROFILE-S cpu class count exact-mask addresses`, hex without `0x`,
//! class `-` for none; `cycles` is what taking the CPU's samples cost.)

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};

use arch::percpu::{self, NR_CPUS};
use arch::trap::TrapFrame;
use arch::trap::callchain::{self, MAX_DEPTH};
use mm::lock::LockClass;

use crate::smp::TICK_HZ;

/// Highest sampling rate [`start`] accepts.
pub const MAX_RATE: u32 = 20_000;
/// Buffer words for all CPUs together (8 MiB of the kernel heap), split
/// evenly over the online CPUs, and at most this many per CPU.
const TOTAL_WORDS: usize = 1 << 20;
const MAX_WORDS_PER_CPU: usize = 1 << 18;

/// One CPU's profiler state, alone on its cache line.
#[repr(align(64))]
struct PerCpu {
    /// The buffer (`cap` words), null outside a session.
    buf: AtomicPtr<AtomicU64>,
    cap: AtomicUsize,
    /// Words written; only this CPU writes it, from its timer interrupt.
    len: AtomicUsize,
    samples: AtomicU64,
    dropped: AtomicU64,
    /// TSC cycles spent taking samples (the profiler's own cost).
    cost: AtomicU64,
    /// The sampling rate this CPU's timer runs at; 0: not sampling.
    rate: AtomicU32,
    /// Scheduler-tick accumulator (module comment).
    tick_acc: AtomicU32,
    /// 1 + the class of the lock this CPU is spinning on; 0: none.
    spinning: AtomicU8,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            buf: AtomicPtr::new(core::ptr::null_mut()),
            cap: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            samples: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            cost: AtomicU64::new(0),
            rate: AtomicU32::new(0),
            tick_acc: AtomicU32::new(0),
            spinning: AtomicU8::new(0),
        }
    }
}

static CPUS: [PerCpu; NR_CPUS] = [const { PerCpu::new() }; NR_CPUS];
/// A session is running (between [`start`] and [`stop`]).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The running session's rate.
static RATE: AtomicU32 = AtomicU32::new(0);

/// Why [`start`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// A session is already running.
    Busy,
    /// The rate is below `TICK_HZ` or above [`MAX_RATE`].
    BadRate,
    /// The buffers could not be allocated.
    NoMemory,
}

/// This CPU is spinning on a lock of `class` (the HAL's `lock_wait_begin`).
#[inline]
pub fn spin_begin(class: LockClass) {
    CPUS[percpu::cpu_id()].spinning.store(class as u8 + 1, Relaxed);
}

/// This CPU stopped spinning (the HAL's `lock_wait_end`).
#[inline]
pub fn spin_end() {
    CPUS[percpu::cpu_id()].spinning.store(0, Relaxed);
}

fn class_from_tag(tag: u8) -> Option<LockClass> {
    LockClass::ALL.into_iter().find(|&c| c as u8 + 1 == tag)
}

/// What the CPU reports about a PMU, for the log and the dump.
fn perfmon() -> String {
    let p = arch::cpu::perfmon();
    alloc::format!("{}/{}/{}", p.version, p.counters, if p.amd_core_ext { "yes" } else { "no" })
}

/// Starts a session: every online CPU samples `rate_hz` times a second until
/// [`stop`].
pub fn start(rate_hz: u32) -> Result<(), StartError> {
    if !(TICK_HZ..=MAX_RATE).contains(&rate_hz) {
        return Err(StartError::BadRate);
    }
    if ACTIVE.swap(true, Acquire) {
        return Err(StartError::Busy);
    }
    let online: Vec<usize> = percpu::online_cpus().collect();
    let words = (TOTAL_WORDS / online.len().max(1)).min(MAX_WORDS_PER_CPU);
    for &cpu in &online {
        let mut v = Vec::new();
        if v.try_reserve_exact(words).is_err() {
            free_buffers();
            ACTIVE.store(false, Release);
            return Err(StartError::NoMemory);
        }
        v.extend((0..words).map(|_| AtomicU64::new(0)));
        let buf: *mut [AtomicU64] = Box::into_raw(v.into_boxed_slice());
        let c = &CPUS[cpu];
        c.len.store(0, Relaxed);
        c.samples.store(0, Relaxed);
        c.dropped.store(0, Relaxed);
        c.cost.store(0, Relaxed);
        c.tick_acc.store(0, Relaxed);
        c.cap.store(words, Relaxed);
        c.buf.store(buf.cast(), Relaxed);
    }
    RATE.store(rate_hz, Relaxed);
    let p = arch::cpu::perfmon();
    log::info!(
        "profile: sampling {rate_hz} Hz on {} CPUs from the local-APIC timer ({}); {} KiB of buffer per CPU",
        online.len(),
        if p.version == 0 && !p.amd_core_ext {
            "the CPU offers no PMU counter overflow NMI: CPUID leaf 0xA reports perfmon version 0"
        } else {
            "a PMU is reported, but the timer works on every CPU model, TCG included"
        },
        words * 8 / 1024,
    );
    // The cross call orders the buffer stores above before each CPU's
    // first sample.
    crate::smp::on_each_cpu(|| {
        let c = &CPUS[percpu::cpu_id()];
        c.rate.store(rate_hz, Relaxed);
        arch::apic::timer_start_periodic(rate_hz);
    });
    Ok(())
}

/// Frees the buffers of every CPU (no CPU samples any more).
fn free_buffers() {
    for c in &CPUS {
        let buf = c.buf.swap(core::ptr::null_mut(), Relaxed);
        let cap = c.cap.swap(0, Relaxed);
        if !buf.is_null() {
            // SAFETY: `buf`/`cap` came from `Box::into_raw` of a boxed slice
            // of `cap` words in `start`, and were taken out of the slot
            // (swapped to null) here, so this is the only reclaim; no CPU
            // samples any more (`stop`'s cross call, or `start` before its
            // own), so nothing else refers to it.
            drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(buf, cap)) });
        }
    }
}

/// Ends the session: every CPU's timer goes back to `TICK_HZ`, and the
/// samples are handed back. `None` if no session was running.
pub fn stop() -> Option<Recording> {
    if !ACTIVE.load(Acquire) {
        return None;
    }
    // Returns once every CPU has run it, i.e. after its last sample.
    crate::smp::on_each_cpu(|| {
        let c = &CPUS[percpu::cpu_id()];
        c.rate.store(0, Relaxed);
        arch::apic::timer_start_periodic(TICK_HZ);
    });
    let mut cpus = Vec::new();
    for cpu in percpu::online_cpus() {
        let c = &CPUS[cpu];
        let buf = c.buf.load(Acquire);
        if buf.is_null() {
            continue;
        }
        let len = c.len.load(Acquire).min(c.cap.load(Relaxed));
        // SAFETY: `buf` points at the `cap` words allocated in `start`, kept
        // until `free_buffers` below; `len <= cap`; the atomics are only
        // read, and their writer has stopped (the cross call above).
        let words = unsafe { core::slice::from_raw_parts(buf, len) };
        cpus.push(CpuRecording {
            cpu,
            words: words.iter().map(|w| w.load(Relaxed)).collect(),
            samples: c.samples.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            cost: c.cost.load(Relaxed),
        });
    }
    free_buffers();
    let rate = RATE.load(Relaxed);
    ACTIVE.store(false, Release);
    Some(Recording { rate, cpus })
}

/// Called on every timer interrupt, first, with interrupts off: takes a
/// sample if this CPU is sampling. Returns whether this interrupt is also
/// the scheduler's tick.
pub fn on_timer(frame: &TrapFrame) -> bool {
    let c = &CPUS[percpu::cpu_id()];
    let rate = c.rate.load(Relaxed);
    if rate == 0 {
        return true;
    }
    record(c, frame);
    let acc = c.tick_acc.load(Relaxed) + TICK_HZ;
    let due = acc >= rate;
    c.tick_acc.store(if due { acc - rate } else { acc }, Relaxed);
    due
}

fn record(c: &PerCpu, frame: &TrapFrame) {
    let buf = c.buf.load(Acquire);
    let cap = c.cap.load(Relaxed);
    if buf.is_null() {
        return;
    }
    let start = arch::time::rdtsc();
    let chain = callchain::capture(frame, crate::kstack::STACK_SIZE as u64);
    let class = if frame.from_user() { 0 } else { c.spinning.load(Relaxed) };
    let len = c.len.load(Relaxed);
    let need = 1 + chain.len;
    if len + need > cap {
        c.dropped.store(c.dropped.load(Relaxed) + 1, Relaxed);
        return;
    }
    // SAFETY: `buf` and `cap` describe the live allocation `start` made for
    // this CPU; it is freed only after `stop`'s cross call has run here,
    // which cannot happen during this interrupt. Only this CPU writes these
    // words, and `len + need <= cap`.
    let words = unsafe { core::slice::from_raw_parts(buf, cap) };
    words[len].store(chain.len as u64 | u64::from(class) << 8 | u64::from(chain.exact) << 32, Relaxed);
    for (w, &a) in words[len + 1..len + need].iter().zip(chain.as_slice()) {
        w.store(a, Relaxed);
    }
    c.len.store(len + need, Release);
    c.samples.store(c.samples.load(Relaxed) + 1, Relaxed);
    c.cost.store(c.cost.load(Relaxed) + arch::time::rdtsc().wrapping_sub(start), Relaxed);
}

/// One sample, read back from a [`Recording`].
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The lock class the CPU was spinning on, if any.
    pub class: Option<LockClass>,
    /// Bit `i`: `addrs[i]` is an instruction address, not a return address.
    pub exact: u32,
    /// The interrupted RIP, then the return addresses, innermost first.
    pub addrs: &'a [u64],
}

/// One CPU's samples.
pub struct CpuRecording {
    /// The CPU.
    pub cpu: usize,
    words: Vec<u64>,
    /// Samples taken.
    pub samples: u64,
    /// Samples lost to a full buffer.
    pub dropped: u64,
    /// TSC cycles the samples cost.
    pub cost: u64,
}

impl CpuRecording {
    /// The samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = Sample<'_>> {
        let mut rest = &self.words[..];
        core::iter::from_fn(move || {
            let (&header, tail) = rest.split_first()?;
            let n = (header & 0xff) as usize;
            if n > MAX_DEPTH || n > tail.len() {
                return None;
            }
            let (addrs, next) = tail.split_at(n);
            rest = next;
            Some(Sample { class: class_from_tag((header >> 8) as u8), exact: (header >> 32) as u32, addrs })
        })
    }
}

/// The samples of one session, per CPU.
pub struct Recording {
    /// The sampling rate.
    pub rate: u32,
    /// One entry per CPU that sampled.
    pub cpus: Vec<CpuRecording>,
}

impl Recording {
    /// The samples of `cpu` (empty if it did not sample).
    pub fn cpu(&self, cpu: usize) -> impl Iterator<Item = Sample<'_>> {
        self.cpus.iter().filter(move |c| c.cpu == cpu).flat_map(|c| c.samples())
    }

    /// Writes the samples to the serial console in the compact format of
    /// the module comment.
    pub fn dump(&self) {
        arch::println!(
            "PROFILE-BEGIN rate={} cpus={} clock=apic-timer perfmon={} tsc_mhz={}",
            self.rate,
            self.cpus.len(),
            perfmon(),
            arch::time::tsc_per_us().unwrap_or(0)
        );
        let (mut stacks, mut total) = (0usize, 0u64);
        for c in &self.cpus {
            arch::println!("PROFILE-CPU {} samples={} dropped={} cycles={}", c.cpu, c.samples, c.dropped, c.cost);
            let mut merged: BTreeMap<(u8, u32, &[u64]), u64> = BTreeMap::new();
            for s in c.samples() {
                *merged.entry((s.class.map_or(0, |k| k as u8 + 1), s.exact, s.addrs)).or_default() += 1;
            }
            let mut line = String::new();
            for ((class, exact, addrs), n) in &merged {
                line.clear();
                let name = class_from_tag(*class).map_or("-", LockClass::name);
                let _ = write!(line, "PROFILE-S {} {name} {n} {exact:x} ", c.cpu);
                for (i, a) in addrs.iter().enumerate() {
                    let _ = write!(line, "{}{a:x}", if i == 0 { "" } else { "," });
                }
                arch::println!("{line}");
                total += n;
            }
            stacks += merged.len();
        }
        arch::println!("PROFILE-END stacks={stacks} samples={total}");
    }
}

#[cfg(target_os = "none")]
mod tests;
