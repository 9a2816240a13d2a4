//! Frame-pointer backtraces.
//!
//! The kernel is built with `-C force-frame-pointers=yes`, so every frame
//! starts with `push rbp; mov rbp, rsp`: `[rbp]` is the caller's rbp and
//! `[rbp + 8]` the return address. Each read goes through the exception
//! table, so a corrupt chain ends the trace instead of faulting again.
//!
//! Output format (parsed by xtask, which adds function and file:line):
//! `  #3 0xffffffff80012345`.

use super::extable::probe_read_u64;

/// Deepest trace printed.
const MAX_FRAMES: usize = 32;

/// Calls `f(depth, return_address)` for each frame, starting at `rbp`.
pub fn walk(mut rbp: u64, mut f: impl FnMut(usize, u64)) {
    for depth in 0..MAX_FRAMES {
        if rbp == 0 || !rbp.is_multiple_of(8) || rbp < 0xffff_8000_0000_0000 {
            return;
        }
        let (Ok(next), Ok(ret)) = (probe_read_u64(rbp), probe_read_u64(rbp + 8)) else { return };
        if ret == 0 {
            return;
        }
        f(depth, ret);
        if next <= rbp {
            return; // Frames must move up the stack; anything else is corrupt.
        }
        rbp = next;
    }
}

/// Prints a backtrace starting at `rip` (frame #0) and the chain at `rbp`.
pub fn print(rip: u64, rbp: u64) {
    crate::serial::write_fmt_forced(format_args!("backtrace:\n  #0 {rip:#018x}\n"));
    walk(rbp, |depth, ret| {
        // A return address points after the call; xtask subtracts one when
        // resolving so the line is the call's own.
        crate::serial::write_fmt_forced(format_args!("  #{} {ret:#018x}\n", depth + 1));
    });
}

/// The current frame pointer.
#[inline(always)]
pub fn current_rbp() -> u64 {
    let rbp: u64;
    // SAFETY: reading rbp has no side effects.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack, preserves_flags)) };
    rbp
}
