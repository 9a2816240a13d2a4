//! The COM1 serial console.
//!
//! Every byte the kernel prints goes through `SERIAL`. The lock is taken
//! with interrupts disabled so that an interrupt handler that prints (an oops,
//! an NMI) cannot deadlock against the code it interrupted on the same CPU.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::SerialPort;

/// The standard PC I/O port of COM1.
const COM1: u16 = 0x3f8;

/// The console: the UART plus what the line discipline needs to know.
struct Console {
    port: SerialPort,
    /// Whether the last byte written ended a line.
    at_line_start: bool,
    /// Bumped on every write; lets a writer that left a line open (the test
    /// runner's `test name ... `) see whether anybody wrote after it.
    generation: u64,
}

/// Protects the UART's transmit path and the line state: one writer at a
/// time, so lines from different CPUs do not interleave byte by byte.
static SERIAL: Mutex<Option<Console>> = Mutex::new(None);

/// Programs the UART (115200 8N1, FIFOs on). Called once on the boot CPU
/// before anything is printed.
pub fn init() {
    // SAFETY: COM1 is the standard PC serial port; nothing else in the kernel
    // drives these I/O ports.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *SERIAL.lock() = Some(Console { port, at_line_start: true, generation: 0 });
}

struct Sink<'a>(&'a mut SerialPort, Option<&'a mut bool>);

impl Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.0.send(b'\r');
            }
            self.0.send(byte);
        }
        if let (Some(flag), Some(last)) = (self.1.as_deref_mut(), s.bytes().last()) {
            *flag = last == b'\n';
        }
        Ok(())
    }
}

fn with_console<R>(f: impl FnOnce(&mut Console) -> R) -> Option<R> {
    crate::irq::without_interrupts(|| SERIAL.lock().as_mut().map(f))
}

fn emit(c: &mut Console, args: fmt::Arguments) {
    c.generation += 1;
    let _ = Sink(&mut c.port, Some(&mut c.at_line_start)).write_fmt(args);
}

/// Writes `args` to the console as one unit (no other CPU's output can land
/// in the middle of it).
pub fn write_fmt(args: fmt::Arguments) {
    with_console(|c| emit(c, args));
}

/// Writes `args` starting on a fresh line: if somebody left a line open,
/// it is ended first. Used by the logger so log lines never glue onto a
/// half-written line.
pub fn write_line(args: fmt::Arguments) {
    with_console(|c| {
        if !c.at_line_start {
            emit(c, format_args!("\n"));
        }
        emit(c, args);
    });
}

/// Writes `args` and returns the console generation after the write, for
/// [`write_fmt_if_unchanged`].
pub fn write_fmt_tracked(args: fmt::Arguments) -> u64 {
    with_console(|c| {
        if !c.at_line_start {
            emit(c, format_args!("\n"));
        }
        emit(c, args);
        c.generation
    })
    .unwrap_or(0)
}

/// Writes `args` only if nothing was written since `generation`; returns
/// whether it did. The test runner uses this to finish `test x ... ` with
/// `ok`, or to print the whole line again if a log line came in between.
pub fn write_fmt_if_unchanged(generation: u64, args: fmt::Arguments) -> bool {
    with_console(|c| {
        if c.generation != generation {
            return false;
        }
        emit(c, args);
        true
    })
    .unwrap_or(false)
}

/// Last-resort output for the panic and oops paths: if another CPU died
/// holding the console lock, steal it rather than hang silently.
pub fn write_fmt_forced(args: fmt::Arguments) {
    crate::irq::without_interrupts(|| {
        // Try for a while (~a few ms under TCG) before forcing.
        for _ in 0..1_000_000 {
            if let Some(mut guard) = SERIAL.try_lock() {
                if let Some(c) = guard.as_mut() {
                    emit(c, args);
                }
                return;
            }
            core::hint::spin_loop();
        }
        // SAFETY: the holder is presumed dead (we waited ~ms for a line of
        // output). Writing to the UART concurrently can at worst interleave
        // bytes; it cannot corrupt memory, since SerialPort is only a port number.
        let mut port = unsafe { SerialPort::new(COM1) };
        let _ = Sink(&mut port, None).write_fmt(args);
    });
}

/// `print!` to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!($($arg)*)) };
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
