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

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::kernel::Firmware;
use crate::qemu::{self, Accel, Machine};
use crate::{KernelArgs, VmSize, build_kernel, setup, workspace_root};

#[derive(Args)]
pub struct GdbArgs {
    /// Boot the in-kernel tests whose names contain FILTER instead of the
    /// default workload.
    #[arg(long, value_name = "FILTER")]
    test: Option<String>,
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    size: VmSize,
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
        format!(
            "# Written by `cargo xtask gdb`: loads the ptlk helpers.\nimport gdb\ngdb.execute('source {}')\n",
            helpers.display()
        ),
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
    let machine = Machine {
        image,
        linux: None,
        firmware,
        smp: args.size.smp,
        mem: args.size.mem.clone(),
        accel: args.accel,
        icount: false,
        cmdline,
        extra: Vec::new(),
        vcpu_time: None,
    };
    std::fs::create_dir_all(qemu::log_dir())?;
    let serial = qemu::log_dir().join("gdb-serial.log");
    let mut qemu_child = start_paused_qemu(&machine, port, &serial)?;
    let hw = args.accel == Accel::Kvm;
    let gdb_cmd = gdb_args(&elf, port, hw);
    println!("xtask: QEMU is paused with its gdb stub on 127.0.0.1:{port} ({} vCPUs = gdb threads)", args.size.smp);
    println!("xtask: serial output goes to {} (tail -f it in another terminal)", serial.display());
    if args.accel == Accel::Kvm {
        println!(
            "xtask: KVM: software breakpoints are unreliable, use `hbreak` (the panic breakpoints are hardware ones)"
        );
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
    args.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() }).collect::<Vec<_>>().join(" ")
}

/// Path of `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// What the batch test checks in gdb's output.
#[derive(Debug, Default)]
struct GdbFindings {
    stopped_in_fault_handler: bool,
    unmapped_before: bool,
    frame_after: Option<u64>,
    page_is_anon: bool,
    ptl_table: Option<u64>,
    walk_table: Option<u64>,
    ptl_line: String,
    vma_listed: bool,
    /// `procs` marked the faulting thread's process as running ...
    process_marked: bool,
    /// ... and listed its threads.
    process_listed: bool,
    /// `vmas $ptlk_pid` (that process's VMAs, by pid) listed the region.
    vma_listed_by_pid: bool,
}

fn hex_after(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(key).nth(1)?.trim_start();
    let hex = rest.strip_prefix("0x")?;
    let end = hex.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(hex.len());
    u64::from_str_radix(&hex[..end], 16).ok()
}

/// Parses the batch session's output (sections are separated by `=== name`).
fn parse_findings(out: &str) -> GdbFindings {
    let mut f = GdbFindings::default();
    let mut section = "";
    for line in out.lines() {
        if let Some(s) = line.strip_prefix("=== ") {
            section = match s.trim() {
                "bt" => "bt",
                "walk-before" => "walk-before",
                "ptl" => "ptl",
                "walk-after" => "walk-after",
                "page" => "page",
                "vmas" => "vmas",
                "procs" => "procs",
                "vmas-pid" => "vmas-pid",
                _ => "",
            };
            continue;
        }
        match section {
            "bt" if line.contains("uspace::fault::page_fault") => f.stopped_in_fault_handler = true,
            "walk-before" if line.contains("is not mapped") => f.unmapped_before = true,
            "ptl" if line.contains("PTE entry") || line.contains("PTE:") => {
                f.ptl_line = line.trim().to_string();
                f.ptl_table = hex_after(line, "of table pfn").map(|p| p << 12);
            }
            "walk-after" => {
                if line.trim_start().starts_with("PMD[") {
                    f.walk_table = hex_after(line, "table");
                }
                if line.contains("maps to phys") {
                    f.frame_after = hex_after(line, "maps to phys");
                }
            }
            "page" if line.contains("kind") && line.contains("Anon") => f.page_is_anon = true,
            // The storm region of kernel/src/storm/tests.rs (BASE, 2 MiB),
            // with its per-VMA lock state.
            "vmas" if line.contains("0x000100000000-0x000100200000") && line.contains("lock: ") => f.vma_listed = true,
            "procs" if line.trim_start().starts_with('*') && line.contains("live") => f.process_marked = true,
            "procs" if line.trim_start().starts_with("tid ") => f.process_listed |= f.process_marked,
            "vmas-pid" if line.contains("0x000100000000-0x000100200000") && line.contains("lock: ") => {
                f.vma_listed_by_pid = true
            }
            _ => {}
        }
    }
    f
}

/// `cargo xtask test`'s gdb check: boots a storm test paused under gdb,
/// stops inside the page-fault handler on a first touch in the storm region,
/// and checks `bt`, `pt-walk` and `ptl` against what the kernel then does
/// (the frame it installs, its descriptor, the PTE table's lock).
/// Returns (passed, detail).
pub fn batch_test(elf: &Path, image: &Path, accel: Accel) -> Result<(bool, String)> {
    let Some(gdb_bin) = which("gdb") else {
        return Ok((
            false,
            "gdb is not installed (Debian: apt-get install gdb); pass --skip-gdb to skip this check".into(),
        ));
    };
    install_autoload(elf)?;
    let port = free_port()?;
    let machine = Machine {
        image: image.to_path_buf(),
        linux: None,
        firmware: Firmware::Bios,
        smp: 2,
        mem: "1024M".into(),
        accel,
        icount: false,
        cmdline: "mode=test filter=storm_same_pte_table".into(),
        extra: Vec::new(),
        vcpu_time: None,
    };
    std::fs::create_dir_all(qemu::log_dir())?;
    let serial = qemu::log_dir().join("gdb-test-serial.log");
    let mut qemu_child = start_paused_qemu(&machine, port, &serial)?;
    // The storm region of the storm tests (kernel/src/storm/tests.rs BASE).
    let script = [
        "set pagination off".to_string(),
        "set confirm off".to_string(),
        "break kernel::uspace::fault::page_fault if $cr2 >= 0x100000000 && $cr2 < 0x100200000".to_string(),
        // Skip the first faults: the PTE table exists from then on.
        "ignore $bpnum 20".to_string(),
        "continue".to_string(),
        "set $addr = $cr2".to_string(),
        "echo === bt\\n".to_string(),
        "bt 6".to_string(),
        "echo === walk-before\\n".to_string(),
        "pt-walk $addr".to_string(),
        "echo === ptl\\n".to_string(),
        "ptl $addr".to_string(),
        // Only this fault now: other CPUs' faults must not stop `finish`.
        "delete".to_string(),
        "finish".to_string(),
        "echo === walk-after\\n".to_string(),
        "pt-walk $addr".to_string(),
        "echo === page\\n".to_string(),
        "page va $addr".to_string(),
        "echo === vmas\\n".to_string(),
        "vmas".to_string(),
        "echo === procs\\n".to_string(),
        "procs".to_string(),
        "echo === vmas-pid\\n".to_string(),
        "vmas $ptlk_pid".to_string(),
        "kill".to_string(),
    ];
    let mut args = gdb_args(elf, port, accel == Accel::Kvm);
    args.insert(0, "-batch".into());
    args.insert(1, "-nx".into());
    for cmd in &script {
        args.push("-ex".into());
        args.push(cmd.clone());
    }
    let log_path = qemu::log_dir().join("gdb-test.log");
    println!("xtask: [gdb batch test] gdb {}", shell_join(&args));
    let child =
        Command::new(gdb_bin).args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let start = std::time::Instant::now();
    let timeout = std::time::Duration::from_secs(300);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(o) => o?,
        Err(_) => {
            let _ = qemu_child.kill();
            let _ = qemu_child.wait();
            return Ok((
                false,
                format!("gdb session timed out after {} s (log: {})", timeout.as_secs(), serial.display()),
            ));
        }
    };
    let _ = qemu_child.kill();
    let _ = qemu_child.wait();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    std::fs::write(&log_path, &text)?;
    let f = parse_findings(&text);
    let mut problems = Vec::new();
    if !f.stopped_in_fault_handler {
        problems.push("bt does not show kernel::uspace::fault::page_fault");
    }
    if !f.unmapped_before {
        problems.push("pt-walk at the stop did not report the address unmapped");
    }
    if f.frame_after.is_none() {
        problems.push("after the handler returned, pt-walk found no frame");
    }
    if !f.page_is_anon {
        problems.push("the installed frame's struct page is not Anon");
    }
    if !f.vma_listed {
        problems.push("vmas did not list the storm region with its VMA lock state");
    }
    if !f.process_listed {
        problems.push("procs did not mark the faulting thread's process as the one running, with its threads");
    }
    if !f.vma_listed_by_pid {
        problems.push("vmas $ptlk_pid did not list the storm region");
    }
    let split = !text.contains("PTE locks mm.page_table_lock");
    if split && (f.ptl_table.is_none() || f.ptl_table != f.walk_table) {
        problems.push("ptl named a PTE table other than the one pt-walk reached");
    }
    let ok = problems.is_empty();
    let detail = if ok {
        format!(
            "stopped in page_fault, frame {:#x} installed and Anon, {} ({:.1} s; log {})",
            f.frame_after.unwrap_or(0),
            f.ptl_line,
            start.elapsed().as_secs_f64(),
            log_path.display()
        )
    } else {
        format!("{} (gdb log: {})", problems.join("; "), log_path.display())
    };
    Ok((ok, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_are_parsed_from_a_session() {
        let out = "=== bt\n#0  kernel::uspace::fault::page_fault (frame=..) at kernel/src/uspace/fault.rs:20\n\
                   === walk-before\n  PTE[  5] @phys 0x123 = 0x0  not present -\n  => 0x100005000 is not mapped\n\
                   === ptl\n  PTE entry @phys 0x3d000028: split PTE lock of table pfn 0x3d000, inline in the descriptor at 0xffff: free (next ticket 2, owner 2)\n\
                   === walk-after\n  PMD[  0] @phys 0x1 = 0x3d000067  table 0x3d000000        P W U A D\n  => 0x100005000 maps to phys 0x3e123000 (4K page)\n\
                   === page\n  kind      Anon\n=== vmas\n  0x000100000000-0x000100200000     2048 KiB  r w        lock: 0 readers, lock_seq 3\n\
                   === procs\n  *     4     - live           -       2  storm          Mm at 0xffff\n          tid 33    storm/0              cpu 0   Running\n\
                   === vmas-pid\n  0x000100000000-0x000100200000     2048 KiB  r w        lock: 1 reader, lock_seq 3\n";
        let f = parse_findings(out);
        assert!(f.stopped_in_fault_handler && f.unmapped_before && f.page_is_anon && f.vma_listed);
        assert!(f.process_listed && f.vma_listed_by_pid);
        assert_eq!(f.frame_after, Some(0x3e12_3000));
        assert_eq!(f.ptl_table, Some(0x3d00_0000));
        assert_eq!(f.walk_table, Some(0x3d00_0000));
        let without_lock = out.replace("        lock: 0 readers, lock_seq 3", "");
        assert!(!parse_findings(&without_lock).vma_listed, "a vmas line without the lock column");
    }
}
