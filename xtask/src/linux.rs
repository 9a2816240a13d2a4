//! `cargo xtask bench --guest linux`: the same storms on a stock Linux
//! guest, in the same QEMU, on the same host, in the same session, so the
//! kernel's figures have a reference measured beside them rather than
//! quoted from another day.
//!
//! The guest is Debian's cloud kernel ([`setup::ensure_linux`]) booted
//! directly by QEMU (`-kernel`, `-initrd`) with an initramfs that holds one
//! program: `linux-storm` (linux-storm/src/main.rs), statically linked and
//! run as `/init`. It runs `disjoint` or `same-table` in the kernel bench's
//! shape and prints the kernel bench's `BENCH-RESULT` line, so the bench's
//! table, pairs and plot read both guests alike. Transparent huge pages are
//! off (`transparent_hugepage=never`), as in will-it-scale's `page_fault1`
//! runs the issue compares with; everything else is Debian's default.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::setup::{self, LinuxKernel, LinuxSource};
use crate::{kernel, workspace_root};

/// The storms `linux-storm` runs.
pub const WORKLOADS: [&str; 2] = ["disjoint", "same-table"];

/// The Linux guest of a bench: its kernel and the initramfs around the
/// storm program.
pub struct Guest {
    pub kernel: LinuxKernel,
    pub initrd: PathBuf,
}

/// Unpacks Debian's cloud kernel from `source` (once), builds `linux-storm`
/// and writes the initramfs that runs it.
pub fn prepare(source: &LinuxSource) -> Result<Guest> {
    let kernel = setup::ensure_linux(source)?;
    let storm = build_storm()?;
    let init = std::fs::read(&storm).with_context(|| format!("reading {}", storm.display()))?;
    let initrd = workspace_root().join("target/xtask/linux-storm.cpio");
    std::fs::write(&initrd, initramfs(init)).with_context(|| format!("writing {}", initrd.display()))?;
    Ok(Guest { kernel, initrd })
}

/// Builds `linux-storm` for Linux, statically linked (the initramfs has no
/// libraries), into its own target directory.
fn build_storm() -> Result<PathBuf> {
    let target = "x86_64-unknown-linux-gnu";
    let status = kernel::cargo()
        .current_dir(workspace_root())
        .args(["build", "--package", "linux-storm", "--release", "--target", target])
        .args(["--target-dir", "target/linux-storm"])
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .status()
        .context("running cargo build for linux-storm")?;
    if !status.success() {
        bail!("building linux-storm failed ({status})");
    }
    Ok(workspace_root().join(format!("target/linux-storm/{target}/release/linux-storm")))
}

/// How faults lock in Linux `release`: under their VMA's lock from 6.4 on
/// (x86's per-VMA locks), else under `mmap_lock` shared.
pub fn fault_lock(release: &str) -> &'static str {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= (6, 4) { "vma" } else { "mmap" }
}

/// The Linux command line of one run: the serial console, quiet, THP off,
/// no reboot on a panic (QEMU's `-no-reboot` ends the run), and the
/// storm's shape, which Linux hands to `/init` as environment variables.
pub fn cmdline(workload: &str, windows: u32, mib: u64, window_ms: u64) -> String {
    format!(
        "console=ttyS0 quiet transparent_hugepage=never panic=-1 bench_workload={workload} bench_windows={windows} bench_mib={mib} bench_window_ms={window_ms}"
    )
}

/// One file of an initramfs.
enum Entry<'a> {
    Dir(&'a str),
    /// A character device node (major, minor).
    CharDev(&'a str, u32, u32),
    /// An executable file.
    Exec(&'a str, Vec<u8>),
}

/// The initramfs: `/init` (the storm program), `/dev/console` for its
/// output, and the mount points it uses.
fn initramfs(init: Vec<u8>) -> Vec<u8> {
    cpio(&[
        Entry::Dir("dev"),
        Entry::CharDev("dev/console", 5, 1),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Exec("init", init),
    ])
}

/// A `newc` cpio archive (the initramfs format Linux unpacks, see its
/// Documentation/driver-api/early-userspace/buffer-format.rst): per entry a
/// 110-byte ASCII header of thirteen 8-digit hex fields, the NUL-terminated
/// name, the data, each padded to 4 bytes; a `TRAILER!!!` entry ends it.
fn cpio(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir(name) => put(ino, name, 0o040755, (0, 0), &[]),
            Entry::CharDev(name, major, minor) => put(ino, name, 0o020600, (*major, *minor), &[]),
            Entry::Exec(name, data) => put(ino, name, 0o100755, (0, 0), data),
        }
    }
    put(0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// Where a run's kernel is, for messages.
pub fn describe(guest: &Guest) -> String {
    format!("Linux {} ({}), initramfs {}", guest.kernel.release, guest.kernel.bzimage.display(), guest.initrd.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a `newc` archive back: (name, mode, rdev major, minor, data).
    fn entries(mut a: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = a.len();
        loop {
            assert_eq!(&a[..6], b"070701", "magic at offset {}", total - a.len());
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
            let (mode, size, major, minor, namesize) = (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&a[110..name_end - 1]).unwrap().to_string();
            assert_eq!(a[name_end - 1], 0, "names are NUL-terminated");
            let data_start = name_end.next_multiple_of(4);
            let data = a[data_start..data_start + size as usize].to_vec();
            a = &a[(data_start + size as usize).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, major, minor, data));
        }
    }

    #[test]
    fn the_initramfs_reads_back_as_newc_with_init_and_a_console() {
        let init: Vec<u8> = (0..4099u32).map(|i| i as u8).collect();
        let got = entries(&initramfs(init.clone()));
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "proc", "sys", "init"]);
        assert_eq!((got[1].1, got[1].2, got[1].3), (0o020600, 5, 1), "/dev/console is char 5:1");
        assert_eq!(got[0].1, 0o040755);
        assert_eq!(got[4].1, 0o100755, "init is an executable file");
        assert_eq!(got[4].4, init, "init's bytes survive the padding");
    }

    #[test]
    fn faults_lock_their_vma_from_linux_6_4() {
        assert_eq!(fault_lock("6.1.0-57-cloud-amd64"), "mmap");
        assert_eq!(fault_lock("6.3.13"), "mmap");
        assert_eq!(fault_lock("6.4.0-1-amd64"), "vma");
        assert_eq!(fault_lock("6.12.9+bpo-cloud-amd64"), "vma");
    }

    #[test]
    fn the_command_line_carries_the_shape_and_turns_thp_off() {
        let c = cmdline("same-table", 5, 128, 2000);
        assert!(c.contains("console=ttyS0") && c.contains("transparent_hugepage=never"));
        assert!(c.ends_with("bench_workload=same-table bench_windows=5 bench_mib=128 bench_window_ms=2000"));
    }
}
