//! When xtask stops a QEMU run: the boot bound, the run limit and the test
//! limit, and how serial lines are told apart (firmware and bootloader, or the
//! kernel).
//!
//! The limits count from what the serial port shows, not from QEMU's start,
//! so a slow firmware or bootloader stage (the BIOS path reads the whole
//! kernel file through real-mode disk calls) cannot fail a test:
//!
//! * the **boot bound** runs from QEMU's start to the kernel's first line. It
//!   fits the accelerator and firmware ([`boot_bound`]); when it passes, the
//!   run stops with what was tried and the likely cause.
//! * the **run limit** (`--timeout`) runs from the kernel's first line.
//! * the optional **test limit** runs from the start of the test that is
//!   running (the protocol's open `test NAME ... ` line), and restarts with
//!   each test.
//!
//! [`RunClock`] is pure (times are offsets from QEMU's start) so the rules
//! are unit-tested without QEMU.

use std::time::Duration;

use crate::kernel::Firmware;
use crate::qemu::Accel;

/// The bound on QEMU's start to the kernel's first line.
///
/// Under TCG the debug image takes up to about 20 s through the BIOS path on
/// a 2-core machine (more when the host is busy); hardware virtualization
/// boots in a second or two, so a KVM guest that stays silent for 30 s is not
/// going to boot.
pub fn boot_bound(accel: Accel, firmware: Firmware) -> Duration {
    match (accel, firmware) {
        (Accel::Tcg, _) => Duration::from_secs(120),
        (Accel::Kvm, Firmware::Bios) => Duration::from_secs(30),
        // OVMF's own start is slower than SeaBIOS's.
        (Accel::Kvm, Firmware::Uefi) => Duration::from_secs(45),
    }
}

/// The three limits of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// QEMU's start to the kernel's first line.
    pub boot: Duration,
    /// The kernel's first line to the end of the run.
    pub run: Duration,
    /// The start of a test to its end (none: only the run limit applies).
    pub test: Option<Duration>,
}

/// Which limit ended a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing at all reached the serial port within the boot bound.
    Silent,
    /// Firmware or bootloader output arrived, but no kernel line within the
    /// boot bound.
    NoKernel,
    /// The run limit, counted from the kernel's first line.
    Run,
    /// The test limit, counted from the start of the running test.
    Test,
}

/// The state of one run's limits. All times are offsets from QEMU's start.
#[derive(Clone, Debug)]
pub struct RunClock {
    limits: Limits,
    first_output: Option<Duration>,
    kernel_start: Option<Duration>,
    test_start: Option<Duration>,
}

impl RunClock {
    /// A run that has just started QEMU.
    pub fn new(limits: Limits) -> Self {
        Self { limits, first_output: None, kernel_start: None, test_start: None }
    }

    /// Serial output arrived at `at` (any byte, firmware's included).
    pub fn output(&mut self, at: Duration) {
        self.first_output.get_or_insert(at);
    }

    /// The kernel printed a line at `at` (the first call counts).
    pub fn kernel_line(&mut self, at: Duration) {
        self.output(at);
        self.kernel_start.get_or_insert(at);
    }

    /// A test started at `at` (a new `test NAME ... ` line).
    pub fn test_started(&mut self, at: Duration) {
        self.test_start = Some(at);
    }

    /// No test is running any more.
    pub fn test_ended(&mut self) {
        self.test_start = None;
    }

    /// When the first serial output arrived.
    pub fn first_output(&self) -> Option<Duration> {
        self.first_output
    }

    /// When the kernel's first line arrived.
    pub fn kernel_start(&self) -> Option<Duration> {
        self.kernel_start
    }

    /// The earliest limit in force and which one it is.
    pub fn deadline(&self) -> (Duration, Expiry) {
        let Some(kernel) = self.kernel_start else {
            let expiry = if self.first_output.is_some() { Expiry::NoKernel } else { Expiry::Silent };
            return (self.limits.boot, expiry);
        };
        let run = (kernel + self.limits.run, Expiry::Run);
        match (self.limits.test, self.test_start) {
            (Some(limit), Some(start)) if start + limit < run.0 => (start + limit, Expiry::Test),
            _ => run,
        }
    }

    /// The limit that has passed at `now`, if any.
    pub fn expired(&self, now: Duration) -> Option<Expiry> {
        let (at, expiry) = self.deadline();
        (now >= at).then_some(expiry)
    }
}

/// Where a serial line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The firmware (OVMF) or the bootloader.
    Boot,
    /// The kernel.
    Kernel,
}

/// Sorts serial lines into boot-stage and kernel output. The kernel's lines
/// are recognised by shape (a `[    0.060803] cpu0 ...` log line, the test
/// runner's `running N tests`, a panic), or they follow the bootloader's last
/// line (`Jumping to kernel entry point`); everything before is the boot stage.
#[derive(Clone, Debug, Default)]
pub struct Console {
    kernel: bool,
}

impl Console {
    /// A console whose every line is the kernel's (a guest QEMU loads
    /// directly, with no firmware or bootloader output before it).
    pub fn started() -> Console {
        Console { kernel: true }
    }

    /// Whether a kernel line has been seen.
    pub fn in_kernel(&self) -> bool {
        self.kernel
    }

    /// Classifies one complete line (and remembers when the kernel started).
    pub fn classify(&mut self, line: &str) -> Source {
        if self.kernel {
            return Source::Kernel;
        }
        if line.contains("Jumping to kernel entry point") {
            // The bootloader's last line; the kernel prints next.
            self.kernel = true;
            return Source::Boot;
        }
        if is_kernel_line(line) {
            self.kernel = true;
            return Source::Kernel;
        }
        Source::Boot
    }
}

/// A line only the kernel prints.
fn is_kernel_line(line: &str) -> bool {
    let line = line.trim_end();
    let stamped = line.strip_prefix('[').and_then(|r| r.split_once(']')).is_some_and(|(stamp, rest)| {
        let stamp = stamp.trim_start();
        let (secs, frac) = stamp.split_once('.').unwrap_or(("", ""));
        !secs.is_empty()
            && secs.bytes().all(|b| b.is_ascii_digit())
            && !frac.is_empty()
            && frac.bytes().all(|b| b.is_ascii_digit())
            && rest.trim_start().starts_with("cpu")
    });
    stamped
        || (line.starts_with("running ") && (line.ends_with(" tests") || line.ends_with(" test")))
        || line.contains("KERNEL PANIC")
        || line.contains("KERNEL OOPS")
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn limits(test: Option<u64>) -> Limits {
        Limits { boot: s(120), run: s(15), test: test.map(s) }
    }

    #[test]
    fn slow_boot_does_not_eat_the_run_limit() {
        // The case that failed CI: 20 s of BIOS loading, then a 15 s limit.
        let mut c = RunClock::new(limits(None));
        assert_eq!(c.expired(s(20)), None, "no output yet, but within the boot bound");
        c.output(s(19));
        c.kernel_line(s(21));
        assert_eq!(c.deadline(), (s(36), Expiry::Run));
        assert_eq!(c.expired(s(35)), None);
        assert_eq!(c.expired(s(36)), Some(Expiry::Run));
    }

    #[test]
    fn silence_hits_the_boot_bound() {
        let c = RunClock::new(limits(None));
        assert_eq!(c.expired(s(119)), None);
        assert_eq!(c.expired(s(120)), Some(Expiry::Silent));
    }

    #[test]
    fn bootloader_output_without_a_kernel_line_is_told_apart() {
        let mut c = RunClock::new(limits(None));
        c.output(s(10));
        assert_eq!(c.first_output(), Some(s(10)));
        assert_eq!(c.kernel_start(), None);
        assert_eq!(c.expired(s(120)), Some(Expiry::NoKernel));
    }

    #[test]
    fn first_kernel_line_counts_once() {
        let mut c = RunClock::new(limits(None));
        c.kernel_line(s(5));
        c.kernel_line(s(9));
        assert_eq!(c.kernel_start(), Some(s(5)));
        assert_eq!(c.first_output(), Some(s(5)), "a kernel line is output too");
    }

    #[test]
    fn test_limit_restarts_with_each_test() {
        let mut c = RunClock::new(Limits { boot: s(120), run: s(300), test: Some(s(15)) });
        c.kernel_line(s(20));
        assert_eq!(c.deadline(), (s(320), Expiry::Run), "no test running: the run limit");
        c.test_started(s(21));
        assert_eq!(c.deadline(), (s(36), Expiry::Test));
        c.test_ended();
        c.test_started(s(30));
        assert_eq!(c.expired(s(44)), None, "the second test has its own 15 s");
        assert_eq!(c.expired(s(45)), Some(Expiry::Test));
        c.test_ended();
        assert_eq!(c.expired(s(45)), None);
    }

    #[test]
    fn run_limit_wins_when_it_is_earlier() {
        let mut c = RunClock::new(Limits { boot: s(120), run: s(10), test: Some(s(15)) });
        c.kernel_line(s(20));
        c.test_started(s(25));
        assert_eq!(c.deadline(), (s(30), Expiry::Run));
    }

    #[test]
    fn kvm_bound_is_shorter_than_tcg() {
        for fw in [Firmware::Bios, Firmware::Uefi] {
            assert!(boot_bound(Accel::Kvm, fw) < boot_bound(Accel::Tcg, fw));
            assert!(boot_bound(Accel::Tcg, fw) >= s(120));
        }
    }

    #[test]
    fn console_separates_bootloader_from_kernel() {
        let mut c = Console::default();
        let lines = [
            ("BdsDxe: loading Boot0001 \"UEFI QEMU HARDDISK\"", Source::Boot),
            ("INFO : 4th Stage", Source::Boot),
            ("INFO : Elf file loaded at Pointer {", Source::Boot),
            ("    addr: 0x0000000001000000,", Source::Boot),
            ("}", Source::Boot),
            ("INFO : Jumping to kernel entry point at VirtAddr(0xffffffff80017600)", Source::Boot),
            ("whatever the kernel prints first", Source::Kernel),
            ("INFO : looks like the bootloader but comes after it", Source::Kernel),
        ];
        for (line, source) in lines {
            assert_eq!(c.classify(line), source, "{line}");
        }
        assert!(c.in_kernel());
    }

    #[test]
    fn kernel_lines_are_recognised_without_the_bootloader_log() {
        for line in [
            "[    0.060803] cpu0 INFO  smp: 1 CPU online",
            "running 3 tests",
            "running 1 test",
            "KERNEL PANIC on CPU 0: boom",
        ] {
            let mut c = Console::default();
            assert_eq!(c.classify(line), Source::Kernel, "{line}");
        }
        for line in ["INFO : BIOS boot", "[Bds] Booting", "[ 0.x] cpu0", "running late"] {
            let mut c = Console::default();
            assert_eq!(c.classify(line), Source::Boot, "{line}");
        }
    }
}
