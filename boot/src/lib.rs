//! Disk-image builder: wraps the `bootloader` crate's BIOS and UEFI image
//! builders. xtask calls this directly instead of going through a bindeps
//! `build.rs` (bootloader issues #356 and #366 explain why that route hurts).
//!
//! The image carries the kernel without its debug info (`<kernel>.stripped`,
//! made with `llvm-objcopy --strip-debug`): the BIOS stage reads the kernel
//! file through real-mode disk calls, about 0.7 MB/s under TCG, and debug
//! info is most of a debug build. The unstripped ELF stays where cargo put
//! it, for gdb, the backtrace symbolizer and addr2line; both files have the
//! same loadable segments and symbols, so addresses agree.

use std::path::{Path, PathBuf};

#[cfg(feature = "builder")]
use anyhow::{Context, Result, bail};

/// Which firmware an image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS: a raw disk image with an MBR.
    Bios,
    /// UEFI (OVMF in QEMU): a GPT disk image with an EFI system partition.
    Uefi,
}

impl Firmware {
    /// Short lowercase name, used in file names, messages and as the `boot`
    /// tool's argument.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    /// The firmware called `name` (see [`Firmware::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Firmware::Bios, Firmware::Uefi].into_iter().find(|f| f.name() == name)
    }

    /// The image [`build_image`] writes for `kernel`: `<kernel>.<bios|uefi>.img`.
    pub fn image_path(self, kernel: &Path) -> PathBuf {
        kernel.with_extension(format!("{}.img", self.name()))
    }
}

/// The kernel file that goes into the images, next to `kernel`.
pub fn stripped_path(kernel: &Path) -> PathBuf {
    kernel.with_extension("stripped")
}

/// Writes `kernel` without its debug sections to [`stripped_path`] and
/// returns that path. `llvm-objcopy` (from the `llvm-tools-preview`
/// component, which the bootloader's own build needs anyway) copies every
/// loadable segment and the symbol table as they are.
#[cfg(feature = "builder")]
pub fn strip_debug(kernel: &Path) -> Result<PathBuf> {
    let tools = llvm_tools::LlvmTools::new()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("finding the llvm tools (rustup component llvm-tools-preview)")?;
    let objcopy = tools
        .tool(&llvm_tools::exe("llvm-objcopy"))
        .context("llvm-objcopy is missing from the llvm-tools-preview component")?;
    let out = stripped_path(kernel);
    let status = std::process::Command::new(&objcopy)
        .arg("--strip-debug")
        .arg(kernel)
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    if !status.success() {
        bail!("`{} --strip-debug {}` failed ({status})", objcopy.display(), kernel.display());
    }
    Ok(out)
}

/// Builds a bootable disk image for `kernel` next to it, with the kernel
/// stripped of debug info, and returns its path ([`Firmware::image_path`]).
#[cfg(feature = "builder")]
pub fn build_image(kernel: &Path, firmware: Firmware) -> Result<PathBuf> {
    let stripped = strip_debug(kernel)?;
    let out = firmware.image_path(kernel);
    match firmware {
        Firmware::Bios => bootloader::BiosBoot::new(&stripped)
            .create_disk_image(&out)
            .with_context(|| format!("building BIOS image {}", out.display()))?,
        Firmware::Uefi => bootloader::UefiBoot::new(&stripped)
            .create_disk_image(&out)
            .with_context(|| format!("building UEFI image {}", out.display()))?,
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in [Firmware::Bios, Firmware::Uefi] {
            assert_eq!(Firmware::from_name(f.name()), Some(f));
        }
        assert_eq!(Firmware::from_name("coreboot"), None);
    }

    #[test]
    fn files_sit_next_to_the_kernel() {
        let k = Path::new("target/x86_64-unknown-none/debug/kernel");
        assert_eq!(Firmware::Uefi.image_path(k), Path::new("target/x86_64-unknown-none/debug/kernel.uefi.img"));
        assert_eq!(stripped_path(k), Path::new("target/x86_64-unknown-none/debug/kernel.stripped"));
    }
}
