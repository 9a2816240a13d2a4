//! Page tables: entry types ([`entry`]), the one module that touches entry
//! memory ([`slot`]), and the walker ([`walk`]).

pub mod entry;
pub mod slot;
pub mod walk;
