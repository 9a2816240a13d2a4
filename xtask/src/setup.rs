//! Installs what the tools need, or says exactly what the user must do.
//!
//! - rustup: the components `rust-src`, `llvm-tools-preview`, `clippy` and
//!   `rustfmt` and the target `x86_64-unknown-none` of the pinned toolchain
//!   (rust-toolchain.toml does not install them by itself on these machines).
//! - Debian packages `qemu-system-x86` and `ovmf`, installed with apt-get
//!   when running as root. apt-get runs with `--no-remove`: installing never
//!   removes a package. When apt would have to (these machines carry
//!   `qemu-utils` 10 from bookworm-backports, which breaks bookworm's
//!   `qemu-system-common` 7.2), or when not running as root, xtask instead
//!   downloads the same Debian packages with `apt-get download` and unpacks
//!   them with `dpkg-deb -x` into `target/xtask/qemu-debian/` of this
//!   checkout, behind a wrapper script that points QEMU at its libraries,
//!   modules and firmware there. Nothing outside the checkout changes.
//! - For `bench --guest linux` only: Debian's cloud kernel (the package
//!   `linux-image-cloud-amd64` depends on), downloaded with `apt-get
//!   download` and unpacked into `target/xtask/linux-debian/`, as root or
//!   not. Nothing is installed. With `--linux SUITE` (e.g. `trixie`, whose
//!   6.12 has per-VMA locks) the package comes from that Debian suite
//!   instead, through an apt state of its own in
//!   `target/xtask/linux-debian-SUITE/apt/` (its own sources list, package
//!   lists and cache; apt checks the suite's signature against the system's
//!   Debian archive keyring), unpacked beside it; the system's apt is
//!   untouched.

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

/// apt's option to download as root when running as root: apt drops to its
/// `_apt` user to download, which cannot write into the checkout.
fn apt_sandbox() -> &'static [&'static str] {
    if is_root() { &["-o", "APT::Sandbox::User=root"] } else { &[] }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Candidate OVMF firmware files (code, variables template), Debian first,
/// relative to a root (`/`, or the unpacked packages' tree).
const OVMF_PAIRS: [(&str, &str); 3] = [
    ("usr/share/OVMF/OVMF_CODE_4M.fd", "usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("usr/share/OVMF/OVMF_CODE.fd", "usr/share/OVMF/OVMF_VARS.fd"),
    ("usr/share/edk2/ovmf/OVMF_CODE.fd", "usr/share/edk2/ovmf/OVMF_VARS.fd"),
];

/// The UEFI firmware: code (read-only) and a variables template; the
/// system's first, then the one unpacked into this checkout.
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    [PathBuf::from("/"), local_tree()]
        .iter()
        .flat_map(|root| OVMF_PAIRS.iter().map(move |(c, v)| (root.join(c), root.join(v))))
        .find(|(c, v)| c.is_file() && v.is_file())
}

/// The Debian packages QEMU and its UEFI firmware come in.
const PACKAGES: [&str; 2] = ["qemu-system-x86", "ovmf"];

/// Where Debian's QEMU is unpacked when apt cannot install it (see the
/// module comment).
fn local_dir() -> PathBuf {
    workspace_root().join("target/xtask/qemu-debian")
}

/// The unpacked packages' file tree.
fn local_tree() -> PathBuf {
    local_dir().join("root")
}

/// The wrapper script that runs the unpacked QEMU, once the unpacking has
/// finished (and the wrapper printed QEMU's version).
fn local_qemu() -> Option<PathBuf> {
    let (dir, wrapper) = (local_dir(), local_dir().join("qemu-system-x86_64"));
    (dir.join("complete").is_file() && wrapper.is_file()).then_some(wrapper)
}

/// Ensures `qemu-system-x86_64` (and OVMF when `uefi`): the system's, else
/// one unpacked here before; else installs Debian's packages as root, or
/// unpacks them into the checkout (see the module comment). Returns the
/// QEMU to run.
pub fn ensure_qemu(uefi: bool) -> Result<PathBuf> {
    let found = || on_path("qemu-system-x86_64").or_else(local_qemu).filter(|_| !uefi || ovmf().is_some());
    if let Some(qemu) = found() {
        return Ok(qemu);
    }
    let what = if uefi { "QEMU and its UEFI firmware (OVMF)" } else { "QEMU" };
    let command = format!("apt-get update && apt-get install -y --no-remove {}", PACKAGES.join(" "));
    if on_path("apt-get").is_none() {
        bail!(
            "{what} not found, and this is not a Debian-based system: install QEMU (x86_64 system emulator) and \
             OVMF with your package manager"
        );
    }
    if !is_root() {
        println!(
            "xtask: {what} not found and not running as root: unpacking Debian's packages into {}",
            local_dir().display()
        );
        unpack_locally().with_context(|| {
            format!("could not unpack Debian's QEMU into the checkout; install it with:\n    sudo sh -c '{command}'")
        })?;
        return found().with_context(|| format!("{what} still not found after unpacking Debian's packages"));
    }
    println!("xtask: {what} not found; running as root: {command}");
    apt_get(&["update"], &command)?;
    let install: Vec<&str> = ["install", "-y", "--no-remove"].iter().chain(PACKAGES.iter()).copied().collect();
    if let Err(e) = apt_get(&install, &command) {
        // Ask apt what it wanted to remove (a simulation changes nothing).
        let removals = apt_removals(&simulate_install()?);
        if removals.is_empty() {
            return Err(e);
        }
        println!(
            "xtask: apt would have to remove {} to install {}, and xtask never removes a package: unpacking \
             the same Debian packages into {} instead (nothing outside this checkout changes)",
            removals.join(", "),
            PACKAGES.join(" "),
            local_dir().display()
        );
        unpack_locally()?;
    } else {
        println!("xtask: installed {}", PACKAGES.join(" "));
    }
    found().with_context(|| format!("{what} still not found after installing {}", PACKAGES.join(" ")))
}

/// What `apt-get install` of [`PACKAGES`] would do (`-s`: a simulation,
/// which needs no root and changes nothing).
fn simulate_install() -> Result<String> {
    output(Command::new("apt-get").args(["install", "-s", "-y", "--no-install-recommends"]).args(PACKAGES))
        .context("asking apt what installing QEMU takes")
}

/// Downloads the packages apt would install for [`PACKAGES`] (those not
/// installed yet, at the versions apt picked), unpacks them into
/// [`local_tree`] and, when QEMU was among them (not only OVMF), writes
/// the wrapper script and checks that it starts.
fn unpack_locally() -> Result<()> {
    let dir = local_dir();
    let (debs, tree) = (dir.join("debs"), local_tree());
    for d in [&debs, &tree] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing the unfinished {}", d.display()))?;
        }
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let wanted: Vec<String> = apt_installs(&simulate_install()?).iter().map(|(n, v)| format!("{n}={v}")).collect();
    if wanted.is_empty() {
        bail!("apt plans to install nothing for {}, yet QEMU is not on PATH", PACKAGES.join(" "));
    }
    println!("xtask: downloading {} Debian packages into {}", wanted.len(), debs.display());
    let mut download = Command::new("apt-get");
    download.current_dir(&debs).arg("download").args(&wanted).args(apt_sandbox());
    output(&mut download)
        .context("downloading QEMU's Debian packages (a fresh machine needs `apt-get update` first)")?;
    for entry in std::fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))
                .with_context(|| format!("unpacking {}", deb.display()))?;
        }
    }
    let wrapper = dir.join("qemu-system-x86_64");
    let mut what = String::from("OVMF");
    if tree.join("usr/bin/qemu-system-x86_64").is_file() {
        std::fs::write(&wrapper, wrapper_script(&tree)).with_context(|| format!("writing {}", wrapper.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        let version = output(Command::new(&wrapper).arg("--version")).context("the unpacked QEMU does not start")?;
        what = version.lines().next().unwrap_or_default().to_string();
        if !what.starts_with("QEMU emulator version") {
            bail!("the unpacked QEMU printed {what:?} for --version");
        }
        println!("xtask: runs go through {}", wrapper.display());
    }
    std::fs::write(dir.join("complete"), &what)?;
    println!("xtask: unpacked {what} into {}", tree.display());
    Ok(())
}

/// A shell script that runs the QEMU unpacked at `tree` with its libraries
/// (`LD_LIBRARY_PATH`), its modules (the TCG accelerator is one:
/// `QEMU_MODULE_DIR`) and its firmware directories (`-L`; Debian's QEMU
/// looks for SeaBIOS and iPXE in their own packages' directories).
fn wrapper_script(tree: &Path) -> String {
    let t = tree.display();
    format!(
        "#!/bin/sh\n\
         # Debian's QEMU, unpacked into this checkout by `cargo xtask` (xtask/src/setup.rs)\n\
         # because apt could not install it system-wide (not root, or not without removing a package).\n\
         T='{t}'\n\
         export LD_LIBRARY_PATH=\"$T/usr/lib/x86_64-linux-gnu:$T/lib/x86_64-linux-gnu${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\"\n\
         export QEMU_MODULE_DIR=\"$T/usr/lib/x86_64-linux-gnu/qemu\"\n\
         exec \"$T/usr/bin/qemu-system-x86_64\" -L \"$T/usr/share/qemu\" -L \"$T/usr/share/seabios\" -L \"$T/usr/lib/ipxe/qemu\" \"$@\"\n"
    )
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

/// The packages (name, version) an `apt-get -s` (simulated) run would
/// install (its `Inst NAME [OLD] (VERSION SOURCE [ARCH])` lines).
fn apt_installs(simulated: &str) -> Vec<(String, String)> {
    simulated
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|rest| {
            let name = rest.split_whitespace().next()?;
            let version = rest.split_once('(')?.1.split_whitespace().next()?;
            Some((name.to_string(), version.to_string()))
        })
        .collect()
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

/// The package whose dependency is Debian's current cloud kernel: a small
/// kernel for virtual machines (virtio, the 8250 serial port), stock
/// otherwise.
const LINUX_PACKAGE: &str = "linux-image-cloud-amd64";

/// A Linux kernel unpacked from Debian's package.
#[derive(Clone, Debug)]
pub struct LinuxKernel {
    /// The compressed kernel image QEMU boots (`-kernel`).
    pub bzimage: PathBuf,
    /// Its release (`uname -r`), e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
}

/// Where `--guest linux` gets Debian's cloud kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxSource {
    /// The package this system's apt sources offer (Linux 6.1 on bookworm).
    System,
    /// A Debian suite (`trixie`, `bookworm-backports`, ...), read through a
    /// private apt state under the checkout, from `deb.debian.org`.
    Suite(String),
}

impl LinuxSource {
    /// `system`, or a suite's name (lowercase letters, digits and `-`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "system" {
            return Ok(LinuxSource::System);
        }
        let valid = !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(LinuxSource::Suite(s.to_string()))
        } else {
            Err(format!("{s:?} is neither `system` nor a Debian suite name such as `trixie` or `bookworm-backports`"))
        }
    }
}

impl std::fmt::Display for LinuxSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinuxSource::System => f.write_str("system"),
            LinuxSource::Suite(s) => f.write_str(s),
        }
    }
}

fn linux_dir(source: &LinuxSource) -> PathBuf {
    match source {
        LinuxSource::System => workspace_root().join("target/xtask/linux-debian"),
        LinuxSource::Suite(s) => workspace_root().join(format!("target/xtask/linux-debian-{s}")),
    }
}

/// The kernel unpacked before, if the unpacking finished.
fn unpacked_linux(dir: &Path) -> Option<LinuxKernel> {
    if !dir.join("complete").is_file() {
        return None;
    }
    std::fs::read_dir(dir.join("root/boot")).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let release = name.strip_prefix("vmlinuz-")?.to_string();
        Some(LinuxKernel { bzimage: e.path(), release })
    })
}

/// The kernel package an `apt-cache depends` of [`LINUX_PACKAGE`] names
/// (its `Depends: linux-image-...` line).
fn kernel_package(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
}

/// The keyring a suite's package lists are checked against.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// apt's options for a suite's private state under `dir`: its own sources
/// list (that suite alone), package lists, cache and an empty status, so
/// nothing of the system's apt changes. apt still checks the suite's
/// `InRelease` signature, against the system's Debian archive keyring.
fn private_apt(dir: &Path, suite: &str) -> Result<Vec<String>> {
    if !Path::new(DEBIAN_KEYRING).is_file() {
        bail!(
            "--linux {suite} needs Debian's archive keyring to check the suite's signature, and {DEBIAN_KEYRING} is missing \
             (package debian-archive-keyring)"
        );
    }
    let apt = dir.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "parts", "preferences.d"] {
        std::fs::create_dir_all(apt.join(d)).with_context(|| format!("creating {}", apt.join(d).display()))?;
    }
    let list = apt.join("sources.list");
    std::fs::write(&list, format!("deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {suite} main\n"))
        .with_context(|| format!("writing {}", list.display()))?;
    let opts = [
        format!("Dir::Etc::SourceList={}", list.display()),
        format!("Dir::Etc::SourceParts={}", apt.join("parts").display()),
        format!("Dir::Etc::Preferences={}", apt.join("preferences").display()),
        format!("Dir::Etc::PreferencesParts={}", apt.join("preferences.d").display()),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "Dir::State::Status=/dev/null".to_string(),
    ];
    let opts = opts.into_iter().flat_map(|o| ["-o".to_string(), o]);
    Ok(opts.chain(apt_sandbox().iter().map(|o| o.to_string())).collect())
}

/// Ensures Debian's cloud kernel from `source` is unpacked in the checkout
/// (see the module comment) and returns it.
pub fn ensure_linux(source: &LinuxSource) -> Result<LinuxKernel> {
    let dir = linux_dir(source);
    if let Some(kernel) = unpacked_linux(&dir) {
        return Ok(kernel);
    }
    if on_path("apt-get").is_none() {
        bail!(
            "`--guest linux` boots Debian's cloud kernel, fetched with apt-get, and this is not a Debian-based system; \
             unpack a `linux-image-*-cloud-amd64` package's boot/vmlinuz-* into {} and create {}",
            dir.join("root/boot").display(),
            dir.join("complete").display()
        );
    }
    let apt_opts = match source {
        LinuxSource::System => Vec::new(),
        LinuxSource::Suite(suite) => {
            let opts = private_apt(&dir, suite)?;
            println!("xtask: reading Debian {suite}'s package list (for --guest linux --linux {suite})");
            let update = Command::new("apt-get").args(&opts).arg("update").output().context("running apt-get")?;
            if !update.status.success() {
                // Nothing of a suite that could not be read stays behind.
                let _ = std::fs::remove_dir_all(&dir);
                let stderr = String::from_utf8_lossy(&update.stderr);
                let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("E: ")).collect();
                bail!(
                    "--linux {suite}: apt could not read Debian suite {suite:?} from deb.debian.org (is it a suite, and is the network up?): {}",
                    if errors.is_empty() { stderr.trim().to_string() } else { errors.join(" ") }
                );
            }
            opts
        }
    };
    let depends = || output(Command::new("apt-cache").args(&apt_opts).args(["depends", LINUX_PACKAGE])).ok();
    let mut package = depends().as_deref().and_then(kernel_package);
    if package.is_none() && is_root() && *source == LinuxSource::System {
        println!("xtask: apt knows no {LINUX_PACKAGE}: running apt-get update");
        apt_get(&["update"], "apt-get update")?;
        package = depends().as_deref().and_then(kernel_package);
    }
    let Some(package) = package else {
        match source {
            LinuxSource::System => {
                bail!("apt knows no {LINUX_PACKAGE} (its package lists may be missing: run `apt-get update` as root)")
            }
            LinuxSource::Suite(suite) => bail!("Debian {suite} has no {LINUX_PACKAGE}"),
        }
    };
    let (debs, tree) = (dir.join("debs"), dir.join("root"));
    for d in [&debs, &tree] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing the unfinished {}", d.display()))?;
        }
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    println!("xtask: downloading Debian's {package} into {} (for --guest linux)", debs.display());
    let mut download = Command::new("apt-get");
    download.current_dir(&debs).args(&apt_opts).args(["download", &package]);
    if *source == LinuxSource::System {
        // A suite's options carry it already.
        download.args(apt_sandbox());
    }
    output(&mut download).with_context(|| format!("downloading {package}"))?;
    for entry in std::fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))
                .with_context(|| format!("unpacking {}", deb.display()))?;
        }
    }
    std::fs::write(dir.join("complete"), &package)?;
    let kernel = unpacked_linux(&dir).with_context(|| format!("{package} holds no boot/vmlinuz-*"))?;
    println!("xtask: unpacked Linux {} into {}", kernel.release, tree.display());
    Ok(kernel)
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

    #[test]
    fn installs_are_read_from_an_apt_simulation() {
        let sim = "Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n\
                   Inst ipxe-qemu (1.0.0+git-20190125.36a4c85-5.1 Debian:12.15/oldstable [all])\n\
                   Inst libgstreamer-plugins-base1.0-0 [1.22.0-3] (1.22.0-3+deb12u7 Debian-Security:12/oldstable-security [amd64])\n\
                   Conf ipxe-qemu (1.0.0+git-20190125.36a4c85-5.1 Debian:12.15/oldstable [all])\n";
        assert_eq!(
            apt_installs(sim),
            [
                ("ipxe-qemu".to_string(), "1.0.0+git-20190125.36a4c85-5.1".to_string()),
                ("libgstreamer-plugins-base1.0-0".to_string(), "1.22.0-3+deb12u7".to_string())
            ]
        );
    }

    #[test]
    fn the_cloud_kernel_package_is_read_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(kernel_package(out).as_deref(), Some("linux-image-6.1.0-57-cloud-amd64"));
        assert_eq!(kernel_package("linux-image-cloud-amd64\n  Depends: <linux-image-6.1>\n"), None);
        assert_eq!(kernel_package(""), None);
    }

    #[test]
    fn an_unpacked_kernel_is_found_only_once_complete() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("root/boot")).unwrap();
        std::fs::write(dir.join("root/boot/vmlinuz-6.1.0-57-cloud-amd64"), b"").unwrap();
        std::fs::write(dir.join("root/boot/config-6.1.0-57-cloud-amd64"), b"").unwrap();
        assert!(unpacked_linux(&dir).is_none(), "an unfinished unpacking is not used");
        std::fs::write(dir.join("complete"), b"").unwrap();
        let k = unpacked_linux(&dir).unwrap();
        assert_eq!(k.release, "6.1.0-57-cloud-amd64");
        assert!(k.bzimage.ends_with("root/boot/vmlinuz-6.1.0-57-cloud-amd64"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_wrapper_points_qemu_at_the_unpacked_tree() {
        let w = wrapper_script(Path::new("/x/root"));
        assert!(w.starts_with("#!/bin/sh\n"));
        assert!(w.contains("T='/x/root'"));
        assert!(w.contains("QEMU_MODULE_DIR=\"$T/usr/lib/x86_64-linux-gnu/qemu\""));
        assert!(w.contains("-L \"$T/usr/share/seabios\""));
    }
}
