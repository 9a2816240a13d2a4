//! Loading the embedded user programs (like Linux's `fs/binfmt_elf.c`): the
//! image xtask builds from the `user` crate, and the ELF parser that
//! `uspace::AddressSpace::load` maps it with.

pub mod elf;

/// The user-program ELF, embedded at build time.
pub static IMAGE: &[u8] = include_bytes!(env!("PTLK_USER_ELF"));
