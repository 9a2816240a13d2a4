//! Building the kernel ELF and its disk images.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
/// BIOS or UEFI: the boot crate's type (built without its image builder here).
pub use boot::Firmware;

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
    /// Cargo's target directory for this configuration: `target`, or
    /// `target/kernel-ptl<N>` for a `SPLIT_PTLOCK_CPUS` build. The setting
    /// is a build-script input of mm (not a feature), so a build of one
    /// value over another's artifacts rebuilds mm and the kernel each time;
    /// `cargo xtask test` builds both.
    pub fn target_dir(&self) -> PathBuf {
        match self.split_ptlock_cpus {
            Some(n) => workspace_root().join(format!("target/kernel-ptl{n}")),
            None => workspace_root().join("target"),
        }
    }

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

/// `cargo` without the environment's RUSTFLAGS.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Flags come from .cargo/config.toml (kernel) or are set below (user);
    // a stray RUSTFLAGS in the environment would override both.
    cmd.env_remove("RUSTFLAGS").env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// `cargo <subcommand>` for the user programs as [`build_user`] compiles
/// them (static ELF at 4 MiB with frame pointers, see user/linker.ld). They
/// get their own target directory: their code-model flags differ from the
/// kernel's, and sharing one would rebuild both every time.
pub fn user_cargo(subcommand: &str) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args([subcommand, "--package", "user", "--target", "x86_64-unknown-none", "--release"])
        .args(["--target-dir", "target/user"])
        .env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static\x1f-Cforce-frame-pointers=yes");
    cmd
}

/// Builds the user programs and returns the path of their ELF.
pub fn build_user() -> Result<PathBuf> {
    let status = user_cargo("build").status().context("running cargo build for the user programs")?;
    if !status.success() {
        bail!("user program build failed");
    }
    Ok(workspace_root().join("target/user/x86_64-unknown-none/release/user"))
}

/// `cargo <subcommand>` for the kernel as [`build`] compiles it: the kernel
/// target, `config`'s profile, features and `SPLIT_PTLOCK_CPUS`, and the user
/// programs at `user` that it embeds. `cargo xtask test`'s lint step runs
/// clippy and rustdoc through this too.
pub fn kernel_cargo(subcommand: &str, config: &BuildConfig, user: &Path) -> Command {
    let mut cmd = cargo();
    // The kernel embeds the user programs (kernel/build.rs checks the path).
    cmd.env("PTLK_USER_ELF", user);
    cmd.current_dir(workspace_root()).args([subcommand, "--package", "kernel", "--target", "x86_64-unknown-none"]);
    if config.release {
        cmd.arg("--release");
        // One code unit across arch, mm and the kernel (fat LTO, one
        // codegen unit): the fault path crosses all three crates, and
        // without LTO each crossing stays a call. Measured (TCG, 1 vCPU):
        // 1837 -> 1828 instructions per fault, and 6% more faults/s, more
        // than the instructions alone explain. Set here, not in
        // Cargo.toml, so host builds (xtask, the mm unit tests) keep their
        // faster release profile.
        cmd.env("CARGO_PROFILE_RELEASE_LTO", "fat").env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1");
    }
    if !config.features.is_empty() {
        cmd.args(["--features", &config.features.join(",")]);
    }
    // The mm crate reads these at build time (mm/build.rs).
    match config.split_ptlock_cpus {
        Some(n) => cmd.env("SPLIT_PTLOCK_CPUS", n.to_string()),
        None => cmd.env_remove("SPLIT_PTLOCK_CPUS"),
    };
    cmd.args(["--target-dir", &config.target_dir().to_string_lossy()]);
    cmd
}

/// Builds the kernel and returns the path of its ELF.
pub fn build(config: &BuildConfig) -> Result<PathBuf> {
    let user = build_user()?;
    println!("xtask: building kernel ({})", config.label());
    let status = kernel_cargo("build", config, &user).status().context("running cargo build for the kernel")?;
    if !status.success() {
        bail!("kernel build failed");
    }
    let profile = if config.release { "release" } else { "debug" };
    Ok(config.target_dir().join("x86_64-unknown-none").join(profile).join("kernel"))
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
