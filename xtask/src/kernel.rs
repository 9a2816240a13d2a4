//! Building the kernel ELF and its disk images.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use boot::Firmware;

use crate::workspace_root;

/// Compile-time kernel configuration chosen on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildConfig {
    /// Release profile instead of dev.
    pub release: bool,
    /// `SPLIT_PTLOCK_CPUS` for the mm crate (None: the crate's default, 4).
    pub split_ptlock_cpus: Option<u32>,
    /// Extra cargo features of the kernel crate.
    pub features: Vec<String>,
}

impl BuildConfig {
    /// A short label for log file names, e.g. `debug` or `release-ptl1000000`.
    pub fn label(&self) -> String {
        let mut s = String::from(if self.release { "release" } else { "debug" });
        if let Some(n) = self.split_ptlock_cpus {
            s.push_str(&format!("-ptl{n}"));
        }
        for f in &self.features {
            s.push('-');
            s.push_str(f);
        }
        s
    }
}

/// Builds the kernel and returns the path of its ELF.
pub fn build(config: &BuildConfig) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "kernel", "--target", "x86_64-unknown-none"]);
    if config.release {
        cmd.arg("--release");
    }
    if !config.features.is_empty() {
        cmd.args(["--features", &config.features.join(",")]);
    }
    // The mm crate reads these at build time (mm/build.rs).
    match config.split_ptlock_cpus {
        Some(n) => cmd.env("SPLIT_PTLOCK_CPUS", n.to_string()),
        None => cmd.env_remove("SPLIT_PTLOCK_CPUS"),
    };
    println!("xtask: building kernel ({})", config.label());
    let status = cmd.status().context("running cargo build for the kernel")?;
    if !status.success() {
        bail!("kernel build failed");
    }
    let profile = if config.release { "release" } else { "debug" };
    Ok(workspace_root().join("target/x86_64-unknown-none").join(profile).join("kernel"))
}

/// Builds the disk image for `firmware` from the kernel ELF.
pub fn image(kernel: &std::path::Path, firmware: Firmware) -> Result<PathBuf> {
    boot::build_image(kernel, firmware)
}
