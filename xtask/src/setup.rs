//! Installs what the tools need, or says exactly what the user must do.
//!
//! - rustup: the components `rust-src`, `llvm-tools-preview`, `clippy` and
//!   `rustfmt` and the target `x86_64-unknown-none` of the pinned toolchain
//!   (rust-toolchain.toml does not install them by itself on these machines).
//! - Debian packages `qemu-system-x86` and `ovmf`, installed with apt-get
//!   when running as root; otherwise the exact command is printed. apt-get
//!   runs with `--no-remove`: installing never removes a package (on a fresh
//!   machine a plain install once removed `qemu-utils`); when apt would have
//!   to, xtask lists the packages in the way and stops.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

const COMPONENTS: [(&str, &str); 4] =
    [("rust-src", "rust-src"), ("llvm-tools", "llvm-tools-preview"), ("clippy", "clippy"), ("rustfmt", "rustfmt")];
const TARGET: &str = "x86_64-unknown-none";

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut c = Command::new("rustup");
    c.current_dir(workspace_root());
    c
}

/// Ensures the rustup components and target of the pinned toolchain.
pub fn ensure_rust() -> Result<()> {
    let installed = output(rustup().args(["component", "list", "--installed"]))
        .context("rustup is needed to install toolchain components (https://rustup.rs)")?;
    for (probe, name) in COMPONENTS {
        if !installed.lines().any(|l| l.starts_with(probe)) {
            println!("xtask: installing rustup component {name} for the pinned toolchain");
            let status = rustup().args(["component", "add", name]).status()?;
            if !status.success() {
                bail!("`rustup component add {name}` failed; run it yourself in {}", workspace_root().display());
            }
        }
    }
    let targets = output(rustup().args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|l| l.trim() == TARGET) {
        println!("xtask: installing rustup target {TARGET} for the pinned toolchain");
        let status = rustup().args(["target", "add", TARGET]).status()?;
        if !status.success() {
            bail!("`rustup target add {TARGET}` failed; run it yourself in {}", workspace_root().display());
        }
    }
    Ok(())
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Candidate OVMF firmware files (code, variables template), Debian first.
const OVMF_PAIRS: [(&str, &str); 3] = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
];

/// The UEFI firmware: code (read-only) and a variables template.
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    OVMF_PAIRS
        .iter()
        .find(|(c, v)| Path::new(c).is_file() && Path::new(v).is_file())
        .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
}

/// Ensures `qemu-system-x86_64` (and OVMF when `uefi`), installing the Debian
/// packages as root. Returns the QEMU binary.
pub fn ensure_qemu(uefi: bool) -> Result<PathBuf> {
    let mut missing = Vec::new();
    if on_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86");
    }
    if uefi && ovmf().is_none() {
        missing.push("ovmf");
    }
    if !missing.is_empty() {
        // Install both together when either is missing: one apt run.
        let packages = ["qemu-system-x86", "ovmf"];
        let command = format!("apt-get update && apt-get install -y --no-remove {}", packages.join(" "));
        if !is_root() {
            bail!(
                "missing {} (QEMU{}); install with:\n    sudo sh -c '{command}'\n\
                 (or your distribution's QEMU x86 system emulator and OVMF packages)",
                missing.join(", "),
                if uefi { " and its UEFI firmware" } else { "" }
            );
        }
        if on_path("apt-get").is_none() {
            bail!(
                "missing {}; this is not a Debian-based system: install QEMU (x86_64 system emulator) and OVMF with your package manager",
                missing.join(", ")
            );
        }
        println!("xtask: {} not installed; running as root: {command}", missing.join(", "));
        apt_get(&["update"], &command)?;
        let install: Vec<&str> = ["install", "-y", "--no-remove"].iter().chain(packages.iter()).copied().collect();
        if let Err(e) = apt_get(&install, &command) {
            // Ask apt what it wanted to remove (a simulation changes nothing).
            let simulated = Command::new("apt-get")
                .args(["install", "-s", "-y"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let removals = apt_removals(&simulated);
            if removals.is_empty() {
                return Err(e);
            }
            bail!(
                "installing {} would make apt remove {}, and xtask never removes packages.\n\
                 Check what needs them (`apt-cache rdepends --installed {}`); if they can go, run\n    \
                 apt-get install {}\n\
                 yourself (apt lists what it removes and asks first), or install QEMU and OVMF some other way.",
                packages.join(" "),
                removals.join(", "),
                removals.join(" "),
                packages.join(" ")
            );
        }
        println!("xtask: installed {}", packages.join(" "));
    }
    on_path("qemu-system-x86_64").context("qemu-system-x86_64 still not on PATH after installing qemu-system-x86")
}

/// Runs `apt-get ARGS` non-interactively; `whole` is the command to tell the
/// user to run when it fails.
fn apt_get(args: &[&str], whole: &str) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("`apt-get {}` failed (exit {status}); run `{whole}` yourself", args.join(" "));
    }
    Ok(())
}

/// The packages an `apt-get -s` (simulated) run would remove (its `Remv
/// NAME [VERSION]` lines).
fn apt_removals(simulated: &str) -> Vec<String> {
    simulated
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Everything `run` and `test` need.
pub fn ensure_all(uefi: bool) -> Result<PathBuf> {
    ensure_rust()?;
    ensure_qemu(uefi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_read_from_an_apt_simulation() {
        let sim = "NOTE: This is only a simulation!\n\
                   Remv qemu-utils [1:8.2.2+ds-0ubuntu1]\n\
                   Inst qemu-system-x86 (1:8.2.2+ds-0ubuntu1.4 Ubuntu:24.04/noble-updates [amd64])\n\
                   Remv qemu-block-extra [1:8.2.2+ds-0ubuntu1] [qemu-utils:amd64 ]\n\
                   Conf qemu-system-x86 (1:8.2.2+ds-0ubuntu1.4 Ubuntu:24.04/noble-updates [amd64])\n";
        assert_eq!(apt_removals(sim), ["qemu-utils", "qemu-block-extra"]);
        assert!(apt_removals("Inst ovmf (2024.02-2 Debian:12 [all])\n").is_empty());
    }
}
