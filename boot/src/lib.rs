//! Disk-image builder: wraps the `bootloader` crate's BIOS and UEFI image
//! builders. xtask calls this directly instead of going through a bindeps
//! `build.rs` (bootloader issues #356 and #366 explain why that route hurts).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Which firmware the image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS: a raw disk image with an MBR.
    Bios,
    /// UEFI: a GPT disk image with an EFI system partition.
    Uefi,
}

impl Firmware {
    /// Short lowercase name, used in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// Builds a bootable disk image for `kernel` next to it and returns its path
/// (`<kernel>.<bios|uefi>.img`).
pub fn build_image(kernel: &Path, firmware: Firmware) -> Result<PathBuf> {
    let out = kernel.with_extension(format!("{}.img", firmware.name()));
    match firmware {
        Firmware::Bios => bootloader::BiosBoot::new(kernel)
            .create_disk_image(&out)
            .with_context(|| format!("building BIOS image {}", out.display()))?,
        Firmware::Uefi => bootloader::UefiBoot::new(kernel)
            .create_disk_image(&out)
            .with_context(|| format!("building UEFI image {}", out.display()))?,
    }
    Ok(out)
}
