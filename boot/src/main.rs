//! `boot bios|uefi KERNEL_ELF`: writes the disk image next to the kernel and
//! prints its path (called by `cargo xtask`).

use std::path::PathBuf;
use std::process::ExitCode;

use boot::{Firmware, build_image};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [f, k] => Firmware::from_name(f).map(|f| (f, PathBuf::from(k))),
        _ => None,
    };
    let Some((firmware, kernel)) = parsed else {
        eprintln!("usage: boot bios|uefi KERNEL_ELF");
        return ExitCode::from(2);
    };
    match build_image(&kernel, firmware) {
        Ok(image) => {
            println!("{}", image.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("boot: {e:#}");
            ExitCode::FAILURE
        }
    }
}
