//! Time since boot from the TSC, calibrated against the legacy PIT.
//!
//! The TSC is read on every CPU; with an invariant TSC (and under QEMU) all
//! CPUs count at the same rate from roughly the same origin. Calibration runs
//! once, on the boot CPU, by timing a 10 ms one-shot of PIT channel 2.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;

/// TSC ticks per microsecond (0 until [`calibrate`] has run).
static TSC_PER_US: AtomicU64 = AtomicU64::new(0);
/// TSC value at the start of [`calibrate`]: the origin of "time since boot".
static TSC_ORIGIN: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear, so it is allowed.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 10;
/// Upper bound on calibration rounds (each CALIBRATION_MS long).
const MAX_ROUNDS: usize = 50;

/// Measures the TSC rate. Call once on the boot CPU with interrupts off.
///
/// Every port access may stall for a long time under a hypervisor (under
/// TCG it takes QEMU's global lock, which other busy vCPUs contend for:
/// with OVMF's APs spinning, a 10 ms window was measured as 15 ms). So the
/// start and the end of the PIT window are bracketed by TSC reads, and of
/// several rounds the first one whose brackets are tight (under 0.5% of
/// the window) is used, or else the tightest of them all (stalls of 8-12 ms
/// were seen in every port access of some rounds under OVMF).
pub fn calibrate() {
    TSC_ORIGIN.store(rdtsc(), Ordering::Relaxed);
    let ticks = (PIT_HZ * CALIBRATION_MS / 1000) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    let mut best: Option<(u64, u64)> = None; // (slack, TSC ticks in the window)
    for _ in 0..MAX_ROUNDS {
        // SAFETY: ports 0x42/0x43/0x61 are the legacy PIT channel 2 and its
        // gate; nothing else in the kernel uses them.
        let (slack, tsc_delta) = unsafe {
            let g = gate.read();
            gate.write((g & !0x02) | 0x01); // gate on, speaker off
            cmd.write(0b1011_0000); // channel 2, lo/hi, mode 0, binary
            ch2.write(ticks as u8);
            // Counting starts with the high byte's write, somewhere in [s0, s1].
            let s0 = rdtsc();
            ch2.write((ticks >> 8) as u8);
            let s1 = rdtsc();
            // Mode 0: OUT2 (bit 5 of port 0x61) goes high when the count
            // expires, which happened after the last read that saw it low
            // began (e0) and before the read that saw it high ended (e1).
            let mut e0 = s1;
            let e1 = loop {
                let before = rdtsc();
                if gate.read() & 0x20 != 0 {
                    break rdtsc();
                }
                e0 = before;
            };
            ((s1 - s0) + (e1 - e0), (e0 + e1) / 2 - (s0 + s1) / 2)
        };
        if best.is_none_or(|(s, _)| slack < s) {
            best = Some((slack, tsc_delta));
        }
        if slack * 200 < tsc_delta {
            break;
        }
    }
    let tsc_delta = best.map_or(0, |(_, d)| d);
    let per_us = (tsc_delta / (CALIBRATION_MS * 1000)).max(1);
    TSC_PER_US.store(per_us, Ordering::Relaxed);
}

/// TSC ticks per microsecond, or `None` before calibration.
pub fn tsc_per_us() -> Option<u64> {
    match TSC_PER_US.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// Nanoseconds since calibration (0 before it).
pub fn now_ns() -> u64 {
    match tsc_per_us() {
        Some(per_us) => tsc_to_ns(rdtsc().saturating_sub(TSC_ORIGIN.load(Ordering::Relaxed)), per_us),
        None => 0,
    }
}

/// Converts a TSC interval to nanoseconds.
pub fn cycles_to_ns(cycles: u64) -> u64 {
    tsc_to_ns(cycles, tsc_per_us().unwrap_or(1))
}

fn tsc_to_ns(cycles: u64, per_us: u64) -> u64 {
    ((cycles as u128) * 1000 / per_us as u128) as u64
}

/// Busy-waits for `us` microseconds.
pub fn delay_us(us: u64) {
    let per_us = tsc_per_us().unwrap_or(3000);
    let end = rdtsc() + us * per_us;
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}
