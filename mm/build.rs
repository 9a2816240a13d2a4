//! Generates the compile-time configuration of the split page-table locks.
//!
//! Linux decides `USE_SPLIT_PTE_PTLOCKS` from `CONFIG_SPLIT_PTLOCK_CPUS` and
//! `CONFIG_NR_CPUS` at build time; we read the same two numbers from the
//! environment (`cargo xtask ... --split-ptlock-cpus N` sets
//! `SPLIT_PTLOCK_CPUS`) and write it as a constant into `$OUT_DIR/config.rs`,
//! which `src/config.rs` includes. `NR_CPUS` is not read here: every crate
//! takes it from `abi::NR_CPUS`, its one source.

use std::path::PathBuf;
use std::{env, fs};

fn read(name: &str, default: usize) -> usize {
    println!("cargo:rerun-if-env-changed={name}");
    match env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let split = read("SPLIT_PTLOCK_CPUS", 4);
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    fs::write(
        out.join("config.rs"),
        format!(
            "/// `CONFIG_SPLIT_PTLOCK_CPUS` (env `SPLIT_PTLOCK_CPUS`, default 4).\n\
             pub const SPLIT_PTLOCK_CPUS: usize = {split};\n"
        ),
    )
    .expect("write config.rs");
}
