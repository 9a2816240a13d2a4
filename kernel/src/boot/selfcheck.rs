//! A quick self-check of what the kernel has (heap, traps, exception table,
//! timekeeping), each with a one-line result: the first part of `cargo xtask
//! run`'s default workload (`workload::run`), before its fault storm.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use arch::qemu::ExitCode;

use crate::traps;

/// One check: `Err` says what went wrong.
type Check = fn() -> Result<(), &'static str>;

/// Runs every check; the machine's exit status is the AND of them.
pub fn run() -> ExitCode {
    let checks: [(&str, Check); 4] = [
        ("heap", heap),
        ("breakpoint trap", breakpoint),
        ("page fault + exception table", page_fault),
        ("timekeeping", time),
    ];
    let mut ok = true;
    for (name, check) in checks {
        match check() {
            Ok(()) => log::info!("self-check {name}: ok"),
            Err(why) => {
                log::error!("self-check {name}: FAILED ({why})");
                ok = false;
            }
        }
    }
    if ok { ExitCode::Success } else { ExitCode::Failure }
}

fn heap() -> Result<(), &'static str> {
    let before = crate::boot::heap::used();
    let v: Vec<u64> = (0..100_000).collect();
    if v.iter().sum::<u64>() != 100_000 * 99_999 / 2 {
        return Err("vector contents wrong");
    }
    drop(v);
    if crate::boot::heap::used() != before { Err("heap usage did not return") } else { Ok(()) }
}

fn breakpoint() -> Result<(), &'static str> {
    let before = traps::BREAKPOINTS.load(Ordering::Relaxed);
    x86_64::instructions::interrupts::int3();
    if traps::BREAKPOINTS.load(Ordering::Relaxed) == before + 1 { Ok(()) } else { Err("handler did not run") }
}

fn page_fault() -> Result<(), &'static str> {
    match arch::trap::extable::probe_read_u64(0xffff_e000_dead_b000) {
        Err(_) => Ok(()),
        Ok(_) => Err("unmapped read succeeded"),
    }
}

fn time() -> Result<(), &'static str> {
    let t0 = arch::time::now_ns();
    arch::time::delay_us(1000);
    let dt = arch::time::now_ns() - t0;
    if (1_000_000..50_000_000).contains(&dt) { Ok(()) } else { Err("1 ms delay measured out of range") }
}
