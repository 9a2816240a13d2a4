//! Composing QEMU command lines and running them under a hard timeout.
//!
//! Exit protocol (DESIGN.md section 9.8): the kernel exits through
//! `isa-debug-exit`, so 33 means success and 35 failure. QEMU's own exit 1, a
//! triple fault (QEMU exits 0 under `-no-reboot`), a signal and a timeout are
//! all failures.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::clock::{self, Console, Expiry, Limits, RunClock, Source};
use crate::kernel::Firmware;
use crate::protocol::{self, TestReport};
use crate::symbols::{Symbolizer, parse_frame_addr};
use crate::{vcputime, workspace_root};

/// Exit status QEMU reports when the kernel wrote `ExitCode::Success`.
pub const STATUS_SUCCESS: i32 = 33;
/// Exit status QEMU reports when the kernel wrote `ExitCode::Failure`.
pub const STATUS_FAILURE: i32 = 35;

/// The fw_cfg file the kernel reads its command line from (kernel/src/cmdline.rs).
const CMDLINE_FW_CFG: &str = "opt/ptlk/cmdline";

/// How QEMU executes guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's multi-threaded binary translator.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        })
    }
}

/// What the host offers for hardware virtualization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostVirt {
    /// `/proc/cpuinfo` reports `vmx` or `svm`.
    pub hw: bool,
    /// `/dev/kvm` opens read-write.
    pub kvm_opens: bool,
}

impl HostVirt {
    /// Probes this host.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let kvm_opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        Self { hw, kvm_opens }
    }
}

/// The accelerator for a run that may count instructions (`--icount`:
/// TCG only, single-threaded, `Machine::icount`), else [`choose_accel`].
pub fn choose_accel_icount(icount: bool, forced: Option<Accel>) -> anyhow::Result<(Accel, String)> {
    match (icount, forced) {
        (true, Some(Accel::Kvm)) => {
            anyhow::bail!("--icount with --accel kvm: instruction counting is a TCG mode; drop --accel kvm")
        }
        (true, _) => Ok((Accel::Tcg, "--icount: single-threaded TCG counting instructions (-icount shift=0)".into())),
        (false, _) => Ok(choose_accel(forced)),
    }
}

/// Picks the accelerator: KVM only when the host CPU reports hardware
/// virtualization and /dev/kvm opens (the /dev/kvm on some machines is a
/// shadow-paging nested hypervisor that cannot run ordinary guests reliably),
/// otherwise TCG. `requested` forces a choice. Returns it with the reason.
pub fn choose_accel(requested: Option<Accel>) -> (Accel, String) {
    let HostVirt { hw, kvm_opens } = HostVirt::probe();
    match requested {
        Some(Accel::Kvm) => (Accel::Kvm, format!(
            "forced by --accel kvm (host CPU {} vmx/svm, /dev/kvm {})",
            if hw { "reports" } else { "does NOT report" },
            if kvm_opens { "opens" } else { "does NOT open" }
        )),
        Some(Accel::Tcg) => (Accel::Tcg, "forced by --accel tcg".into()),
        None if hw && kvm_opens => (Accel::Kvm, "host CPU reports vmx/svm and /dev/kvm opens".into()),
        None if !hw && kvm_opens => (
            Accel::Tcg,
            "host CPU reports no vmx/svm, so /dev/kvm is a nested shadow-paging hypervisor, not hardware virtualization (use --accel kvm to force it)".into(),
        ),
        None if hw => (Accel::Tcg, "host CPU reports vmx/svm but /dev/kvm does not open".into()),
        None => (Accel::Tcg, "no hardware virtualization on this host".into()),
    }
}

/// The likely cause when a guest stays silent (or the kernel never starts)
/// within the boot bound, for the accelerator and firmware that were tried.
pub fn boot_hint(accel: Accel, firmware: Firmware, expiry: Expiry, host: HostVirt) -> String {
    match (accel, expiry) {
        (Accel::Kvm, _) if !host.hw => "the host CPU reports no vmx/svm, so /dev/kvm is a nested shadow-paging \
             hypervisor that does not run this guest: use TCG (drop --accel kvm, or pass --accel tcg)"
            .into(),
        (Accel::Kvm, _) => "KVM did not get the guest to the kernel: try --accel tcg to tell a KVM problem \
             from an image problem"
            .into(),
        (Accel::Tcg, Expiry::Silent) => format!(
            "QEMU or the {} firmware is stuck before any output: see the `qemu:` lines above; a host this busy \
             may need a quieter moment",
            if firmware == Firmware::Uefi { "OVMF" } else { "BIOS" }
        ),
        (Accel::Tcg, _) => "the bootloader stopped before the kernel (its lines are above and in the log)".into(),
    }
}

/// One QEMU invocation.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Disk image to boot, or with `linux` a Linux kernel (bzImage).
    pub image: PathBuf,
    /// Boot `image` as a Linux kernel with this initramfs and command line
    /// (`-kernel`, `-initrd`, `-append`: `bench --guest linux`), not this
    /// kernel's disk image.
    pub linux: Option<LinuxBoot>,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// Number of vCPUs.
    pub smp: u32,
    /// Guest RAM, in QEMU's syntax (`1G`, `512M`).
    pub mem: String,
    /// KVM or TCG.
    pub accel: Accel,
    /// TCG only: one host thread takes the vCPUs in turns and the guest's
    /// clocks count instructions (`-icount shift=0`, one virtual nanosecond
    /// per instruction), so a run is deterministic (`bench --icount`).
    pub icount: bool,
    /// The kernel command line (fw_cfg; `-append` for a Linux guest).
    pub cmdline: String,
    /// Extra arguments appended verbatim.
    pub extra: Vec<String>,
    /// Account what the vCPU threads did on the host between two serial
    /// lines (`bench`: its timed windows); the result is in
    /// [`Outcome::vcpu_time`].
    pub vcpu_time: Option<vcputime::Marks>,
}

impl Machine {
    /// Limits for a run of this machine: the boot bound that fits its
    /// accelerator and firmware, `run` from the kernel's first line, no
    /// per-test limit.
    pub fn limits(&self, run: Duration) -> Limits {
        Limits { boot: clock::boot_bound(self.accel, self.firmware), run, test: None }
    }

    /// The full QEMU command.
    pub fn command(&self, qemu: &Path) -> Result<Command> {
        let mut c = Command::new(qemu);
        c.args(["-M", "q35", "-smp", &self.smp.to_string(), "-m", &self.mem]);
        match self.accel {
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
            // qemu64 lacks SMEP, SMAP, PCID and 1 GiB pages: use `max`.
            Accel::Tcg if self.icount => c.args(["-accel", "tcg,thread=single", "-icount", "shift=0", "-cpu", "max"]),
            Accel::Tcg => c.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        if self.firmware == Firmware::Uefi {
            let (code, vars) = crate::setup::ovmf().context("OVMF firmware not found (package `ovmf`)")?;
            // Each image gets its own writable copy of the variable store.
            let vars_copy = self.image.with_extension("ovmf-vars.fd");
            std::fs::copy(&vars, &vars_copy).with_context(|| format!("copying {}", vars.display()))?;
            c.arg("-drive").arg(format!("if=pflash,format=raw,readonly=on,file={}", code.display()));
            c.arg("-drive").arg(format!("if=pflash,format=raw,file={}", vars_copy.display()));
        }
        if let Some(linux) = &self.linux {
            c.arg("-kernel").arg(&self.image).arg("-initrd").arg(&linux.initrd).args(["-append", &self.cmdline]);
        } else {
            // Writes go to a throw-away overlay (the kernel never writes its
            // disk), so two runs of one image at once (a `run` beside a
            // `test`) do not fight over QEMU's image lock.
            c.arg("-drive").arg(format!("format=raw,snapshot=on,file={}", self.image.display()));
        }
        c.args(["-serial", "stdio", "-display", "none", "-monitor", "none", "-no-reboot"]);
        // Named threads (`CPU 0/TCG`): for `top -H`, gdb's `info threads`
        // on QEMU, and the vCPU accounting of `vcputime`.
        c.args(["-name", "ptlk,debug-threads=on"]);
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        if self.linux.is_none() {
            // QEMU option syntax: a literal comma is written twice.
            c.arg("-fw_cfg").arg(format!("name={CMDLINE_FW_CFG},string={}", self.cmdline.replace(',', ",,")));
        }
        c.args(&self.extra);
        Ok(c)
    }
}

/// A Linux guest booted directly by QEMU (no firmware output, no
/// bootloader: its first serial line is the guest's).
#[derive(Clone, Debug)]
pub struct LinuxBoot {
    /// The initramfs (`-initrd`).
    pub initrd: PathBuf,
}

/// How a QEMU run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// QEMU exited with this status.
    Exit(i32),
    /// QEMU was killed by a signal.
    Signal,
    /// xtask stopped it when this limit passed.
    Timeout(Expiry),
}

/// Result of one QEMU run.
pub struct Outcome {
    /// How it ended.
    pub ending: Ending,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// The test protocol as parsed from the serial output.
    pub report: TestReport,
    /// Where the serial output was saved.
    pub log: PathBuf,
    /// The last complete line of output.
    pub last_line: String,
    /// The limits the run had.
    pub limits: Limits,
    /// QEMU's start to the first serial output (firmware's included).
    pub first_output: Option<Duration>,
    /// QEMU's start to the kernel's first line.
    pub kernel_start: Option<Duration>,
    /// What the vCPU threads did between the machine's
    /// [`Machine::vcpu_time`] lines, if it asked and both were seen.
    pub vcpu_time: Option<vcputime::VcpuTime>,
    /// The machine's accelerator and firmware (for the diagnosis).
    pub accel: Accel,
    /// BIOS or UEFI.
    pub firmware: Firmware,
}

impl Outcome {
    /// The kernel said success through isa-debug-exit.
    pub fn kernel_succeeded(&self) -> bool {
        self.ending == Ending::Exit(STATUS_SUCCESS)
    }

    /// One line explaining the ending.
    pub fn describe(&self, name: &str) -> String {
        match &self.ending {
            Ending::Exit(STATUS_SUCCESS) => format!("`{name}`: kernel reported success"),
            Ending::Exit(STATUS_FAILURE) => format!("`{name}`: kernel reported FAILURE"),
            Ending::Exit(0) => format!(
                "`{name}`: QEMU exited 0 without the kernel's exit code (triple fault or reset under -no-reboot)"
            ),
            Ending::Exit(code) => format!("`{name}`: QEMU exited with status {code} (not a kernel exit code)"),
            Ending::Signal => format!("`{name}`: QEMU was killed by a signal"),
            Ending::Timeout(expiry) => {
                let log = self.log.display();
                let (accel, fw) = (self.accel, self.firmware.name().to_uppercase());
                match expiry {
                    Expiry::Silent | Expiry::NoKernel => {
                        let what = if *expiry == Expiry::Silent {
                            "nothing reached the serial port".to_string()
                        } else {
                            format!("the kernel printed nothing (last boot-stage line: {:?})", self.last_line)
                        };
                        format!(
                            "`{name}`: BOOT TIMEOUT: {what} within {} s of QEMU's start ({accel}, {fw}); likely cause: {}; serial log: {log}",
                            self.limits.boot.as_secs(),
                            boot_hint(self.accel, self.firmware, *expiry, HostVirt::probe())
                        )
                    }
                    Expiry::Test => format!(
                        "`{name}`: TIMEOUT: test `{}` ran longer than its {} s limit; serial log: {log}",
                        self.report.running.as_deref().unwrap_or("?"),
                        self.limits.test.unwrap_or_default().as_secs()
                    ),
                    Expiry::Run => {
                        let limit = self.limits.run.as_secs();
                        match &self.report.running {
                            Some(test) => format!(
                                "`{name}`: TIMEOUT ({limit} s from the kernel's first line) while test `{test}` was running; serial log: {log}"
                            ),
                            None => format!(
                                "`{name}`: TIMEOUT ({limit} s from the kernel's first line) with no test running; last line: {:?}; serial log: {log}",
                                self.last_line
                            ),
                        }
                    }
                }
            }
        }
    }

    /// `kernel's first line after 2.3 s` (or why there was none), for summaries.
    pub fn boot_time(&self) -> String {
        match (self.kernel_start, self.first_output) {
            (Some(k), _) => format!("kernel's first line {:.1} s after QEMU's start", k.as_secs_f64()),
            (None, Some(o)) => format!("no kernel line; first serial output after {:.1} s", o.as_secs_f64()),
            (None, None) => "no serial output".into(),
        }
    }
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
    Eof,
}

fn pump(mut r: impl Read + Send + 'static, tx: mpsc::Sender<Chunk>, is_err: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Chunk::Eof);
                    return;
                }
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let _ = tx.send(if is_err { Chunk::Err(data) } else { Chunk::Out(data) });
                }
            }
        }
    });
}

/// Directory of saved serial logs.
pub fn log_dir() -> PathBuf {
    workspace_root().join("target/xtask/logs")
}

/// Runs `machine` until it exits or a limit of `limits` passes (see
/// `clock.rs`), echoing the kernel's serial output to the terminal (when
/// `echo`; the firmware's and bootloader's lines only when the kernel never
/// starts), saving all of it to `target/xtask/logs/<name>.log`, feeding it to
/// the test-protocol parser and annotating backtrace frames.
pub fn run(
    qemu: &Path,
    machine: &Machine,
    name: &str,
    limits: Limits,
    symbols: Option<&Symbolizer>,
    echo: bool,
) -> Result<Outcome> {
    std::fs::create_dir_all(log_dir())?;
    let log_path = log_dir().join(format!("{}.log", name.replace([' ', '/'], "_")));
    let mut log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = machine.command(qemu)?;
    let printable = format!("{cmd:?}").replace('"', "");
    println!("xtask: [{name}] {printable}");
    writeln!(log, "# {printable}")?;
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let (tx, rx) = mpsc::channel();
    pump(child.stdout.take().unwrap(), tx.clone(), false);
    pump(child.stderr.take().unwrap(), tx, true);

    let mut report = TestReport::default();
    let mut clock = RunClock::new(limits);
    // A Linux guest is started by QEMU itself: every line is the guest's.
    let mut console = if machine.linux.is_some() { Console::started() } else { Console::default() };
    // Boot-stage lines: in the log, echoed only if the kernel never starts.
    let mut boot_lines: Vec<String> = Vec::new();
    // The test the clock's test limit is running for.
    let mut clocked_test: Option<String> = None;
    let mut partial = String::new();
    // Bytes of `partial` already echoed to the terminal.
    let mut echoed = 0usize;
    let mut last_line = String::new();
    let mut open_streams = 2;
    let mut expired = None;
    // The vCPU threads' counters at the start line, then the shares at the end.
    let mut vcpu_start: Option<vcputime::Snapshot> = None;
    let mut vcpu_end: Option<vcputime::Snapshot> = None;
    let sampler = machine.vcpu_time.map(|_| vcputime::Sampler::start(child.id()));
    let stdout = std::io::stdout();
    while open_streams > 0 {
        let now = start.elapsed();
        if let Some(expiry) = clock.expired(now) {
            expired = Some(expiry);
            break;
        }
        match rx.recv_timeout(clock.deadline().0.saturating_sub(now)) {
            Ok(Chunk::Out(data)) => {
                let now = start.elapsed();
                clock.output(now);
                let text = String::from_utf8_lossy(&data).replace('\r', "");
                partial.push_str(&text);
                let mut out = stdout.lock();
                // Complete lines are echoed with their backtrace annotation;
                // the open remainder (`test x ... `) is echoed at once so the
                // terminal shows what is running.
                while let Some(pos) = partial.find('\n') {
                    let line: String = partial.drain(..=pos).collect();
                    let line = line.trim_end_matches('\n');
                    writeln!(log, "{line}")?;
                    if !line.trim().is_empty() {
                        last_line = line.to_string();
                    }
                    if let Some(marks) = machine.vcpu_time {
                        if vcpu_start.is_none() && line.contains(marks.start) {
                            vcpu_start = vcputime::snapshot(child.id());
                        } else if vcpu_start.is_some() && line.contains(marks.end) {
                            // The last such line ends the span. QEMU may be
                            // gone by the time a line is read (the guest ends
                            // the run right after its last one): then the
                            // sampler's last snapshot, at most
                            // `vcputime::SAMPLE_EVERY` older, ends it.
                            vcpu_end =
                                vcputime::snapshot(child.id()).or_else(|| sampler.as_ref()?.latest()).or(vcpu_end);
                        }
                    }
                    if console.classify(line) == Source::Boot {
                        boot_lines.push(line.to_string());
                        echoed = 0;
                        continue;
                    }
                    if clock.kernel_start().is_none() {
                        clock.kernel_line(now);
                        if echo {
                            let _ = writeln!(
                                out,
                                "xtask: [{name}] kernel's first line {:.1} s after QEMU's start ({} firmware and bootloader lines are in the serial log)",
                                now.as_secs_f64(),
                                boot_lines.len()
                            );
                        }
                    }
                    if echo {
                        let _ = writeln!(out, "{}", &line[echoed.min(line.len())..]);
                    }
                    echoed = 0;
                    report.feed(line);
                    if let Some(annotated) = symbols.and_then(|s| parse_frame_addr(line).and(s.annotate(line))) {
                        let sym = annotated[line.trim_end().len()..].trim();
                        writeln!(log, "        {sym}")?;
                        if echo {
                            let _ = writeln!(out, "        {sym}");
                        }
                    }
                }
                if echo && clock.kernel_start().is_some() && partial.len() > echoed {
                    let _ = out.write_all(&partial.as_bytes()[echoed..]);
                    echoed = partial.len();
                }
                let _ = out.flush();
                // The test limit restarts whenever another test starts.
                let running = protocol::open_test(&partial).map(str::to_string).or_else(|| report.running.clone());
                if running != clocked_test {
                    match running {
                        Some(_) => clock.test_started(now),
                        None => clock.test_ended(),
                    }
                    clocked_test = running;
                }
            }
            Ok(Chunk::Err(data)) => {
                let text = String::from_utf8_lossy(&data);
                for line in text.lines() {
                    eprintln!("qemu: {line}");
                    writeln!(log, "qemu: {line}")?;
                }
            }
            Ok(Chunk::Eof) => open_streams -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if !partial.is_empty() {
        writeln!(log, "{partial}")?;
        if console.in_kernel() {
            report.feed(&partial);
        } else {
            boot_lines.push(partial.clone());
        }
        if !partial.trim().is_empty() {
            last_line = partial.trim_end().to_string();
        }
    }
    if echo && !console.in_kernel() && !boot_lines.is_empty() {
        // The kernel never spoke: what the firmware and bootloader said is
        // the only clue.
        println!("xtask: [{name}] the kernel never started; firmware and bootloader output:");
        for line in &boot_lines {
            println!("{line}");
        }
    }
    let ending = if let Some(expiry) = expired {
        let _ = child.kill();
        let _ = child.wait();
        if echo && console.in_kernel() {
            println!();
        }
        Ending::Timeout(expiry)
    } else {
        let status = child.wait()?;
        match status.code() {
            Some(code) => Ending::Exit(code),
            None => Ending::Signal,
        }
    };
    let elapsed = start.elapsed();
    writeln!(log, "# ended: {ending:?} after {:.1} s", elapsed.as_secs_f64())?;
    if let Some(k) = clock.kernel_start() {
        writeln!(log, "# kernel's first line after {:.2} s", k.as_secs_f64())?;
    }
    let vcpu_time = vcpu_start.as_ref().zip(vcpu_end.as_ref()).and_then(|(a, b)| a.until(b));
    Ok(Outcome {
        ending,
        elapsed,
        report,
        log: log_path,
        last_line,
        limits,
        first_output: clock.first_output(),
        kernel_start: clock.kernel_start(),
        vcpu_time,
        accel: machine.accel,
        firmware: machine.firmware,
    })
}

/// Parses a QEMU memory size (`512M`, `2G`, `1024`) to validate it early.
pub fn parse_mem(s: &str) -> Result<String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("--mem {s:?}: expected a size like 512M or 2G"))?;
    let mib = match unit {
        "" | "M" | "m" | "MiB" => n,
        "G" | "g" | "GiB" => n * 1024,
        _ => bail!("--mem {s:?}: unknown unit {unit:?} (use M or G)"),
    };
    if mib < 128 {
        bail!("--mem {s}: the kernel needs at least 128M");
    }
    Ok(format!("{mib}M"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem("2G").unwrap(), "2048M");
        assert_eq!(parse_mem("512M").unwrap(), "512M");
        assert_eq!(parse_mem("1024").unwrap(), "1024M");
        assert!(parse_mem("12T").is_err());
        assert!(parse_mem("lots").is_err());
        assert!(parse_mem("64M").is_err());
    }

    #[test]
    fn silent_kvm_without_vmx_says_use_tcg() {
        let no_hw = HostVirt { hw: false, kvm_opens: true };
        for expiry in [Expiry::Silent, Expiry::NoKernel] {
            assert!(boot_hint(Accel::Kvm, Firmware::Bios, expiry, no_hw).contains("use TCG"));
        }
        let hw = HostVirt { hw: true, kvm_opens: true };
        assert!(boot_hint(Accel::Kvm, Firmware::Uefi, Expiry::Silent, hw).contains("--accel tcg"));
        assert!(boot_hint(Accel::Tcg, Firmware::Uefi, Expiry::Silent, hw).contains("OVMF"));
        assert!(boot_hint(Accel::Tcg, Firmware::Bios, Expiry::NoKernel, hw).contains("bootloader"));
    }

    #[test]
    fn forced_accel_is_respected() {
        assert_eq!(choose_accel(Some(Accel::Tcg)).0, Accel::Tcg);
        assert_eq!(choose_accel(Some(Accel::Kvm)).0, Accel::Kvm);
    }
}
