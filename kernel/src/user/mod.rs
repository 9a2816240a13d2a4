//! User programs: the embedded image (built from `user/` by xtask) and
//! loading it into an address space.

pub mod elf;

/// The user-program ELF, embedded at build time.
pub static IMAGE: &[u8] = include_bytes!(env!("PTLK_USER_ELF"));
