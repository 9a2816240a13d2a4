//! Building the kernel ELF and its disk images.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

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

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Flags come from .cargo/config.toml (kernel) or are set below (user);
    // a stray RUSTFLAGS in the environment would override both.
    cmd.env_remove("RUSTFLAGS").env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// Builds the user programs (a static ELF at 4 MiB, see user/linker.ld) and
/// returns its path. They get their own target directory: their code-model
/// flags differ from the kernel's, and sharing one would rebuild both every time.
pub fn build_user() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "user", "--target", "x86_64-unknown-none", "--release"])
        .args(["--target-dir", "target/user"])
        .env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static\x1f-Cforce-frame-pointers=yes");
    let status = cmd.status().context("running cargo build for the user programs")?;
    if !status.success() {
        bail!("user program build failed");
    }
    Ok(workspace_root().join("target/user/x86_64-unknown-none/release/user"))
}

/// Builds the kernel and returns the path of its ELF.
pub fn build(config: &BuildConfig) -> Result<PathBuf> {
    let user = build_user()?;
    let mut cmd = cargo();
    // The kernel embeds the user programs (kernel/src/user/mod.rs).
    cmd.env("PTLK_USER_ELF", &user);
    cmd.current_dir(workspace_root()).args(["build", "--package", "kernel", "--target", "x86_64-unknown-none"]);
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

/// Copies the kernel cargo just built into a directory of this xtask process
/// (`target/xtask/kernels/<pid>/<config>/kernel`) and returns the copy. Its
/// images, the backtrace symbolizer and gdb then all use the ELF this process
/// built, even when another `cargo xtask` in the same tree (a second
/// terminal, another test run's debug-ptlock build) rebuilds
/// `target/x86_64-unknown-none/...` meanwhile: booting one build's image
/// while symbolizing another's gives wrong backtraces, and an image rewritten
/// under a booting QEMU boots to silence. Directories of xtask processes that
/// have exited are removed first.
pub fn private_copy(elf: &Path, config: &BuildConfig) -> Result<PathBuf> {
    let root = workspace_root().join("target/xtask/kernels");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let alive = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(std::process::id().to_string()).join(config.label());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join("kernel");
    std::fs::copy(elf, &copy).with_context(|| format!("copying {} to {}", elf.display(), copy.display()))?;
    Ok(copy)
}

/// Which firmware an image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS.
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

impl Firmware {
    /// Lowercase name, as the `boot` tool takes it.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// Builds the disk image for `firmware` from the kernel ELF with the `boot`
/// tool. It runs as a separate program, not a library of xtask: building the
/// `bootloader` crate needs the rustup components that xtask installs, so
/// xtask itself must build without them.
pub fn image(kernel: &Path, firmware: Firmware) -> Result<PathBuf> {
    let out = cargo()
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--package", "boot", "--"])
        .arg(firmware.name())
        .arg(kernel)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the boot image builder")?;
    if !out.status.success() {
        bail!("building the {} disk image failed", firmware.name());
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("the boot tool printed no image path");
    }
    Ok(PathBuf::from(path))
}
