//! `cargo xtask gdb`: QEMU paused with its gdb stub, and gdb attached with the
//! kernel's symbols and the helpers of gdb/ptlk.py.
//!
//! The helpers load through gdb's own auto-load mechanism: xtask writes
//! `<kernel ELF>-gdb.py` next to the ELF (it sources gdb/ptlk.py) and starts
//! gdb with `-iex "add-auto-load-safe-path <repo>"`, so nobody has to edit
//! their ~/.gdbinit.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use boot::Firmware;
use clap::Args;

use crate::qemu::{self, Accel, Machine};
use crate::{build_kernel, setup, workspace_root, KernelArgs};

#[derive(Args)]
pub struct GdbArgs {
    /// Boot the in-kernel tests whose names contain FILTER instead of the
    /// default workload.
    #[arg(long, value_name = "FILTER")]
    test: Option<String>,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Number of vCPUs (each shows up as a gdb thread).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=255))]
    smp: u32,
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = qemu::parse_mem)]
    mem: String,
    /// Accelerator: TCG by default (software breakpoints are unreliable under
    /// KVM); with `kvm`, breakpoints are hardware breakpoints.
    #[arg(long, value_enum, default_value = "tcg")]
    accel: Accel,
    /// Boot through UEFI.
    #[arg(long)]
    uefi: bool,
    /// TCP port of QEMU's gdb stub (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Only start QEMU (paused) and print the gdb command to attach with.
    #[arg(long)]
    no_gdb: bool,
}

/// The auto-load script gdb picks up for `elf`.
pub fn install_autoload(elf: &Path) -> Result<PathBuf> {
    let script = PathBuf::from(format!("{}-gdb.py", elf.display()));
    let helpers = workspace_root().join("gdb/ptlk.py");
    std::fs::write(
        &script,
        format!("# Written by `cargo xtask gdb`: loads the ptlk helpers.\nimport gdb\ngdb.execute('source {}')\n", helpers.display()),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    Ok(script)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// gdb's arguments for attaching to `port` with `elf`, before any `-ex` of
/// the caller's. `hw` makes the panic breakpoints hardware breakpoints.
pub fn gdb_args(elf: &Path, port: u16, hw: bool) -> Vec<String> {
    let root = workspace_root();
    vec![
        "-q".into(),
        "-iex".into(),
        format!("add-auto-load-safe-path {}", root.display()),
        "-iex".into(),
        format!("directory {}", root.display()),
        elf.display().to_string(),
        "-ex".into(),
        format!("target remote 127.0.0.1:{port}"),
        "-ex".into(),
        format!("ptlk-break-on-panic{}", if hw { " hw" } else { "" }),
    ]
}

/// Starts QEMU paused with the gdb stub on `port`; serial output goes to `serial_log`.
pub fn start_paused_qemu(machine: &Machine, port: u16, serial_log: &Path) -> Result<Child> {
    let qemu_bin = setup::ensure_qemu(machine.firmware == Firmware::Uefi)?;
    let mut m = machine.clone();
    m.extra.extend(["-gdb".to_string(), format!("tcp:127.0.0.1:{port}"), "-S".to_string()]);
    let mut cmd = m.command(&qemu_bin)?;
    // Replace `-serial stdio` by a file so the terminal belongs to gdb.
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut fixed = Command::new(&qemu_bin);
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == "-serial" {
            it.next();
            fixed.arg("-serial").arg(format!("file:{}", serial_log.display()));
        } else {
            fixed.arg(a);
        }
    }
    println!("xtask: {}", format!("{fixed:?}").replace('"', ""));
    cmd = fixed;
    cmd.stdin(Stdio::null()).spawn().context("starting QEMU")
}

pub fn run(args: GdbArgs) -> Result<bool> {
    let firmware = if args.uefi { Firmware::Uefi } else { Firmware::Bios };
    setup::ensure_all(args.uefi)?;
    let gdb_bin = which("gdb");
    if gdb_bin.is_none() && !args.no_gdb {
        bail!("gdb is not installed (Debian: apt-get install gdb); use --no-gdb to start QEMU only");
    }
    let (elf, image) = build_kernel(&args.kernel.config(), firmware)?;
    install_autoload(&elf)?;
    let port = match args.port {
        Some(p) => p,
        None => free_port()?,
    };
    let cmdline = match &args.test {
        Some(f) => format!("mode=test filter={f}"),
        None => "mode=run".to_string(),
    };
    let machine = Machine { image, firmware, smp: args.smp, mem: args.mem.clone(), accel: args.accel, cmdline, extra: Vec::new() };
    std::fs::create_dir_all(qemu::log_dir())?;
    let serial = qemu::log_dir().join("gdb-serial.log");
    let mut qemu_child = start_paused_qemu(&machine, port, &serial)?;
    let hw = args.accel == Accel::Kvm;
    let gdb_cmd = gdb_args(&elf, port, hw);
    println!("xtask: QEMU is paused with its gdb stub on 127.0.0.1:{port} ({} vCPUs = gdb threads)", args.smp);
    println!("xtask: serial output goes to {} (tail -f it in another terminal)", serial.display());
    if args.accel == Accel::Kvm {
        println!("xtask: KVM: software breakpoints are unreliable, use `hbreak` (the panic breakpoints are hardware ones)");
    }
    if args.no_gdb {
        println!("xtask: attach with:\n    gdb {}", shell_join(&gdb_cmd));
        println!("xtask: press Ctrl-C to stop QEMU");
        let status = qemu_child.wait()?;
        return Ok(status.success());
    }
    let status = Command::new(gdb_bin.unwrap()).args(&gdb_cmd).status().context("running gdb")?;
    let _ = qemu_child.kill();
    let _ = qemu_child.wait();
    Ok(status.success())
}

fn shell_join(args: &[String]) -> String {
    args.iter()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Path of `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}
