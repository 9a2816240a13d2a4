//! The kernel command line, passed by xtask through QEMU's fw_cfg
//! (`-fw_cfg name=opt/ptlk/cmdline,string=...`).
//!
//! Words: `mode=run|test|bench|soak`, `filter=SUBSTRING` (tests), `selftests` (also run
//! the runner's own deliberately failing tests), `log=error|warn|info|debug|trace`,
//! `fault_lock=vma|mmap` (how page faults lock their VMA: the per-VMA lock,
//! the default, or `mmap_lock` shared as before Linux 6.4, for comparison),
//! `spinlock=auto|ticket|tas|tas-halt` (FIFO tickets; test-and-set as
//! Linux's `virt_spin_lock` in a guest; the same with waiters that halt
//! until kicked; auto: `tas-halt` under a hypervisor, else tickets),
//! `fail=frame:1/200,table:1/50,ptl:1/20,heap:1/1000` and `fail_seed=N`
//! (failure injection, see `boot::arm_failure_injection`), `watchdog=SECS|off`
//! (the lockup watchdog, `diag::watchdog`), `fault_time_every=N` (time one
//! page fault in N, a power of two, for the fault-latency statistics,
//! default 8; 1: all of them, `diag::faultstat`).

use spin::Once;

/// The fw_cfg file that carries the command line.
pub const FW_CFG_NAME: &str = "opt/ptlk/cmdline";
const MAX_LEN: usize = 512;

/// What the kernel was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The default workload.
    Run,
    /// The in-kernel test runner.
    Test,
    /// The fault-storm benchmark (`workload=`, `windows=`, `mib=`, `rounds=`,
    /// `threads=`, `chunk=`).
    Bench,
    /// The soak (`soak_secs=`, `soak_seed=`, `soak_phase_ms=`; `workload::soak`).
    Soak,
}

/// The parsed command line.
pub struct Cmdline {
    buf: [u8; MAX_LEN],
    len: usize,
}

static CMDLINE: Once<Cmdline> = Once::new();

impl Cmdline {
    /// The command line as given.
    pub fn raw(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    fn words(&self) -> impl Iterator<Item = &str> {
        self.raw().split_ascii_whitespace()
    }

    /// The value of `key=value`, if present.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.words().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// Whether the bare word `flag` is present.
    pub fn flag(&self, flag: &str) -> bool {
        self.words().any(|w| w == flag)
    }

    /// Requested mode (default: run).
    pub fn mode(&self) -> Mode {
        match self.value("mode") {
            Some("test") => Mode::Test,
            Some("bench") => Mode::Bench,
            Some("soak") => Mode::Soak,
            _ => Mode::Run,
        }
    }
}

/// Reads and parses the command line (once) and applies `log=`.
pub fn read() -> &'static Cmdline {
    let c = CMDLINE.call_once(|| {
        let mut c = Cmdline { buf: [0; MAX_LEN], len: 0 };
        let mut tmp = [0u8; MAX_LEN];
        if let Some(bytes) = arch::fw_cfg::read_file(FW_CFG_NAME, &mut tmp) {
            let text = core::str::from_utf8(bytes).unwrap_or("").trim_end_matches('\0').trim();
            c.buf[..text.len()].copy_from_slice(text.as_bytes());
            c.len = text.len();
        }
        c
    });
    if let Some(level) = c.value("log").and_then(|l| l.parse::<log::LevelFilter>().ok()) {
        log::set_max_level(level);
    }
    c
}
