//! Turns backtrace addresses in the serial log into function and file:line.
//!
//! The kernel prints frames as `  #N 0xffffffff8001abcd`; the kernel ELF is
//! linked at its run address (no relocation, no ASLR), so the address can be
//! looked up in its DWARF directly.

use std::path::Path;

/// Symbol lookup in one kernel ELF.
pub struct Symbolizer {
    loader: addr2line::Loader,
}

impl Symbolizer {
    /// Loads the debug info of `elf`; `None` (with a warning) if unreadable.
    pub fn new(elf: &Path) -> Option<Self> {
        match addr2line::Loader::new(elf) {
            Ok(loader) => Some(Self { loader }),
            Err(e) => {
                eprintln!("xtask: warning: cannot read symbols from {}: {e}", elf.display());
                None
            }
        }
    }

    /// `function at file:line` for `addr` (inlined frames joined by ` <- `).
    pub fn describe(&self, addr: u64) -> Option<String> {
        let mut parts = Vec::new();
        if let Ok(mut frames) = self.loader.find_frames(addr) {
            while let Ok(Some(frame)) = frames.next() {
                let func = frame
                    .function
                    .as_ref()
                    .and_then(|f| f.demangle().ok().map(|s| s.into_owned()))
                    .unwrap_or_else(|| "??".into());
                let loc = frame
                    .location
                    .map(|l| format!("{}:{}", l.file.unwrap_or("?"), l.line.unwrap_or(0)))
                    .unwrap_or_default();
                parts.push(format!("{} at {}", strip_hash(&func), loc));
            }
        }
        if parts.is_empty() {
            return self.loader.find_symbol(addr).map(str::to_string);
        }
        Some(parts.join(" <- "))
    }

    /// If `line` is a backtrace frame, returns it with the symbol appended.
    pub fn annotate(&self, line: &str) -> Option<String> {
        let addr = parse_frame_addr(line)?;
        // Frames after #0 are return addresses: look up the call itself.
        let is_first = line.trim_start().starts_with("#0 ");
        let probe = if is_first { addr } else { addr - 1 };
        let desc = self.describe(probe)?;
        Some(format!("{}  {desc}", line.trim_end()))
    }
}

/// Drops the trailing `::h0123456789abcdef` that legacy mangling leaves.
fn strip_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => head,
        _ => name,
    }
}

/// The address of a `  #N 0x...` backtrace line.
pub fn parse_frame_addr(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix('#')?;
    let (depth, addr) = rest.split_once(' ')?;
    depth.parse::<u32>().ok()?;
    let addr = addr.trim().strip_prefix("0x")?;
    u64::from_str_radix(addr, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lines_parse() {
        assert_eq!(parse_frame_addr("  #0 0xffffffff80001234"), Some(0xffff_ffff_8000_1234));
        assert_eq!(parse_frame_addr("  #12 0xffffffff80001234\r"), Some(0xffff_ffff_8000_1234));
        assert_eq!(parse_frame_addr("test #1 ok"), None);
        assert_eq!(parse_frame_addr("  #x 0x12"), None);
    }

    #[test]
    fn hashes_are_stripped() {
        assert_eq!(strip_hash("kernel::main::h0123456789abcdef"), "kernel::main");
        assert_eq!(strip_hash("kernel::hello"), "kernel::hello");
    }
}
