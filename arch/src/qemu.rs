//! QEMU's `isa-debug-exit` device: the way a test run reports its status.
//!
//! xtask starts QEMU with `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
//! Writing `v` to the port makes QEMU exit with status `(v << 1) | 1`, so the
//! two codes below become exit statuses 33 and 35. Neither can be confused with
//! QEMU's own failure (1), a triple fault under `-no-reboot` (0) or a signal.

use x86_64::instructions::port::Port;

/// I/O port of the `isa-debug-exit` device.
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The status the kernel reports to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Everything passed: QEMU exits with 33.
    Success = 0x10,
    /// Something failed: QEMU exits with 35.
    Failure = 0x11,
}

/// QEMU's exit status for each code (what xtask checks).
pub const QEMU_STATUS_SUCCESS: i32 = ((ExitCode::Success as i32) << 1) | 1;
/// See [`QEMU_STATUS_SUCCESS`].
pub const QEMU_STATUS_FAILURE: i32 = ((ExitCode::Failure as i32) << 1) | 1;

/// Powers the machine off with `code`. On real hardware (no device) the write
/// is ignored and the CPU halts forever.
pub fn exit(code: ExitCode) -> ! {
    let mut port: Port<u32> = Port::new(DEBUG_EXIT_PORT);
    // SAFETY: port 0xf4 is the debug-exit device that xtask configures; on a
    // machine without it the write goes nowhere.
    unsafe { port.write(code as u32) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
