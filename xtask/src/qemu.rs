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

use crate::kernel::Firmware;
use crate::protocol::TestReport;
use crate::symbols::{Symbolizer, parse_frame_addr};
use crate::workspace_root;

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

/// Picks the accelerator: KVM only when the host CPU reports hardware
/// virtualization and /dev/kvm opens (the /dev/kvm on some machines is a
/// shadow-paging nested hypervisor that cannot run ordinary guests reliably),
/// otherwise TCG. `requested` forces a choice. Returns it with the reason.
pub fn choose_accel(requested: Option<Accel>) -> (Accel, String) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm_opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
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

/// One QEMU invocation.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Disk image to boot.
    pub image: PathBuf,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// Number of vCPUs.
    pub smp: u32,
    /// Guest RAM, in QEMU's syntax (`1G`, `512M`).
    pub mem: String,
    /// KVM or TCG.
    pub accel: Accel,
    /// The kernel command line (fw_cfg).
    pub cmdline: String,
    /// Extra arguments appended verbatim.
    pub extra: Vec<String>,
}

impl Machine {
    /// The full QEMU command.
    pub fn command(&self, qemu: &Path) -> Result<Command> {
        let mut c = Command::new(qemu);
        c.args(["-M", "q35", "-smp", &self.smp.to_string(), "-m", &self.mem]);
        match self.accel {
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
            // qemu64 lacks SMEP, SMAP, PCID and 1 GiB pages: use `max`.
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
        c.arg("-drive").arg(format!("format=raw,file={}", self.image.display()));
        c.args(["-serial", "stdio", "-display", "none", "-monitor", "none", "-no-reboot"]);
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        // QEMU option syntax: a literal comma is written twice.
        c.arg("-fw_cfg").arg(format!("name={CMDLINE_FW_CFG},string={}", self.cmdline.replace(',', ",,")));
        c.args(&self.extra);
        Ok(c)
    }
}

/// How a QEMU run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// QEMU exited with this status.
    Exit(i32),
    /// QEMU was killed by a signal.
    Signal,
    /// xtask stopped it at the timeout.
    Timeout,
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
            Ending::Timeout => match &self.report.running {
                Some(test) => format!("`{name}`: TIMEOUT while test `{test}` was running"),
                None => format!("`{name}`: TIMEOUT with no test running; last line: {:?}", self.last_line),
            },
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

/// Runs `machine` until it exits or `timeout` passes, echoing serial output
/// to the terminal (when `echo`), saving it to `target/xtask/logs/<name>.log`,
/// feeding it to the test-protocol parser and annotating backtrace frames.
pub fn run(
    qemu: &Path,
    machine: &Machine,
    name: &str,
    timeout: Duration,
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
    let mut partial = String::new();
    // Bytes of `partial` already echoed to the terminal.
    let mut echoed = 0usize;
    let mut last_line = String::new();
    let mut open_streams = 2;
    let deadline = start + timeout;
    let mut timed_out = false;
    let stdout = std::io::stdout();
    while open_streams > 0 {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(Chunk::Out(data)) => {
                let text = String::from_utf8_lossy(&data).replace('\r', "");
                partial.push_str(&text);
                let mut out = stdout.lock();
                // Complete lines are echoed with their backtrace annotation;
                // the open remainder (`test x ... `) is echoed at once so the
                // terminal shows what is running.
                while let Some(pos) = partial.find('\n') {
                    let line: String = partial.drain(..=pos).collect();
                    let line = line.trim_end_matches('\n');
                    if echo {
                        let _ = writeln!(out, "{}", &line[echoed.min(line.len())..]);
                    }
                    echoed = 0;
                    writeln!(log, "{line}")?;
                    report.feed(line);
                    if let Some(annotated) = symbols.and_then(|s| parse_frame_addr(line).and(s.annotate(line))) {
                        let sym = annotated[line.trim_end().len()..].trim();
                        writeln!(log, "        {sym}")?;
                        if echo {
                            let _ = writeln!(out, "        {sym}");
                        }
                    }
                    if !line.trim().is_empty() {
                        last_line = line.to_string();
                    }
                }
                if echo && partial.len() > echoed {
                    let _ = out.write_all(partial[echoed..].as_bytes());
                    echoed = partial.len();
                }
                let _ = out.flush();
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
        report.feed(&partial);
    }
    let ending = if timed_out {
        let _ = child.kill();
        let _ = child.wait();
        if echo {
            println!();
        }
        Ending::Timeout
    } else {
        let status = child.wait()?;
        match status.code() {
            Some(code) => Ending::Exit(code),
            None => Ending::Signal,
        }
    };
    let elapsed = start.elapsed();
    writeln!(log, "# ended: {ending:?} after {:.1} s", elapsed.as_secs_f64())?;
    Ok(Outcome { ending, elapsed, report, log: log_path, last_line })
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
    fn forced_accel_is_respected() {
        assert_eq!(choose_accel(Some(Accel::Tcg)).0, Accel::Tcg);
        assert_eq!(choose_accel(Some(Accel::Kvm)).0, Accel::Kvm);
    }
}
