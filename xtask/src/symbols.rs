//! Turns backtrace addresses in the serial log into function and file:line.
//!
//! The kernel prints frames as `  #N 0xffffffff8001abcd`; the kernel ELF is
//! linked at its run address (no relocation, no ASLR), so the address can be
//! looked up in its DWARF directly.

use std::path::Path;

/// Symbol lookup in one kernel ELF.
pub struct Symbolizer {
    loader: addr2line::Loader,
    /// Every symbol defined in an executable section, functions and
    /// assembly labels alike, by address (see [`Symbolizer::functions`]).
    labels: Vec<(u64, String)>,
}

/// The symbols of `elf`'s executable sections, sorted by address.
fn code_labels(elf: &Path) -> Vec<(u64, String)> {
    use object::{Object, ObjectSection, ObjectSymbol, SectionKind};
    let Ok(data) = std::fs::read(elf) else { return Vec::new() };
    let Ok(file) = object::File::parse(&*data) else { return Vec::new() };
    let mut labels: Vec<(u64, String)> = file
        .symbols()
        .filter(|s| s.is_definition() || s.kind() == object::SymbolKind::Unknown)
        .filter(|s| {
            s.section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .is_some_and(|sec| sec.kind() == SectionKind::Text)
        })
        .filter_map(|s| Some((s.address(), s.name().ok().filter(|n| !n.is_empty())?.to_string())))
        .collect();
    labels.sort();
    labels
}

impl Symbolizer {
    /// Loads the debug info of `elf`; `None` (with a warning) if unreadable.
    pub fn new(elf: &Path) -> Option<Self> {
        match addr2line::Loader::new(elf) {
            Ok(loader) => Some(Self { loader, labels: code_labels(elf) }),
            Err(e) => {
                eprintln!("xtask: warning: cannot read symbols from {}: {e}", elf.display());
                None
            }
        }
    }

    /// The names (aliases) of the nearest code symbol at or below `addr`,
    /// demangled.
    fn labels_at(&self, addr: u64) -> Vec<String> {
        let end = self.labels.partition_point(|(a, _)| *a <= addr);
        let Some(&(start, _)) = end.checked_sub(1).map(|i| &self.labels[i]) else { return Vec::new() };
        self.labels[..end]
            .iter()
            .rev()
            .take_while(|(a, _)| *a == start)
            .map(|(_, n)| strip_hash(&addr2line::demangle_auto(n.into(), None)).to_string())
            .collect()
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

    /// The functions executing at `addr`, innermost first: the frames DWARF
    /// records there for inlined calls, then the function they were inlined
    /// into (the profiler's stacks show each). The nearest code symbol at or
    /// below `addr` has the last word: assembly (the trap and system-call
    /// entries) has labels but no DWARF, and a DWARF lookup there lands in
    /// the preceding Rust function; so where DWARF's outermost function is
    /// not that symbol, the symbol alone is the answer. Empty if there is
    /// neither.
    pub fn functions(&self, addr: u64) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(mut frames) = self.loader.find_frames(addr) {
            while let Ok(Some(frame)) = frames.next() {
                if let Some(name) = frame.function.as_ref().and_then(|f| f.demangle().ok()) {
                    names.push(strip_hash(&name).to_string());
                }
            }
        }
        let labels = self.labels_at(addr);
        match (labels.first(), names.last()) {
            (Some(label), outer) if outer.is_none_or(|o| !labels.contains(o)) => vec![label.clone()],
            _ => names,
        }
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
