//! `cargo xtask test`'s lint step, run first: rustfmt, clippy and rustdoc
//! over every crate, warnings as errors.
//!
//! * `cargo fmt --all -- --check` (rustfmt.toml: width 120, grouped imports);
//! * clippy on the host crates (`--all-targets`, so their tests too), on the
//!   kernel for `x86_64-unknown-none` built the way [`kernel::build`] builds
//!   it (which lints the workspace crates it depends on: arch, mm, abi,
//!   ktest), and on the user programs the way [`kernel::build_user`] builds
//!   them, all with `-D warnings` on top of the workspace lints (Cargo.toml:
//!   `undocumented_unsafe_blocks` is denied);
//! * `cargo doc --no-deps` for the host crates, for kernel and arch on the
//!   kernel target and for the user programs, with `RUSTDOCFLAGS="-D
//!   warnings"`, so a broken intra-doc link fails.

use std::process::Command;

use anyhow::Result;

use crate::kernel::{self, BuildConfig};
use crate::workspace_root;

/// The crates built for the host (xtask's own tests included).
const HOST_CRATES: [&str; 7] = ["mm", "xtask", "boot", "ktest", "ktest-macros", "abi", "linux-storm"];

/// One lint: a name for the summary and the command that must succeed.
pub struct Lint {
    /// Shown in the test summary.
    pub name: &'static str,
    /// Exits 0 when the lint passes.
    pub command: Command,
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = kernel::cargo();
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

fn with_packages(mut cmd: Command, packages: &[&str]) -> Command {
    for p in packages {
        cmd.args(["--package", p]);
    }
    cmd
}

/// The lints, in order. Builds the user programs first: the kernel's build
/// script wants their ELF even for clippy and rustdoc.
pub fn lints() -> Result<Vec<Lint>> {
    let user = kernel::build_user()?;
    // The default kernel configuration (split locks, no extra features).
    let config = BuildConfig { release: false, split_ptlock_cpus: None, features: Vec::new() };
    let deny = ["--", "-D", "warnings"];

    // --keep-going: one crate's findings do not hide an independent crate's.
    let mut host_clippy = with_packages(cargo(&["clippy", "--keep-going", "--all-targets"]), &HOST_CRATES);
    host_clippy.args(deny);
    let mut kernel_clippy = kernel::kernel_cargo("clippy", &config, &user);
    kernel_clippy.args(["--keep-going", "--package", "arch"]).args(deny);
    let mut user_clippy = kernel::user_cargo("clippy");
    user_clippy.args(deny);
    let mut host_doc = with_packages(cargo(&["doc", "--keep-going", "--no-deps"]), &HOST_CRATES);
    host_doc.env("RUSTDOCFLAGS", "-D warnings");
    let mut kernel_doc = kernel::kernel_cargo("doc", &config, &user);
    kernel_doc.args(["--keep-going", "--no-deps", "--package", "arch"]).env("RUSTDOCFLAGS", "-D warnings");
    let mut user_doc = kernel::user_cargo("doc");
    user_doc.arg("--no-deps").env("RUSTDOCFLAGS", "-D warnings");

    Ok(vec![
        Lint { name: "lint: cargo fmt --check", command: cargo(&["fmt", "--all", "--", "--check"]) },
        Lint {
            name: "lint: clippy, host crates (mm, xtask, boot, ktest, ktest-macros, abi, linux-storm)",
            command: host_clippy,
        },
        Lint { name: "lint: clippy, kernel target (kernel, arch, mm, abi, ktest)", command: kernel_clippy },
        Lint { name: "lint: clippy, user programs", command: user_clippy },
        Lint { name: "lint: rustdoc, host crates", command: host_doc },
        Lint { name: "lint: rustdoc, kernel and arch (kernel target)", command: kernel_doc },
        Lint { name: "lint: rustdoc, user programs", command: user_doc },
    ])
}
