//! Just enough ELF64 to load the user programs: the file header and the
//! `PT_LOAD` program headers of a static executable.

/// One loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address of the segment's first byte.
    pub vaddr: u64,
    /// Bytes in memory (the tail past `file_size` is zero).
    pub mem_size: u64,
    /// Offset of the segment's bytes in the file.
    pub offset: u64,
    /// Bytes present in the file.
    pub file_size: u64,
    /// Readable / writable / executable.
    pub read: bool,
    /// See `read`.
    pub write: bool,
    /// See `read`.
    pub exec: bool,
}

/// Why an image was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Not a little-endian x86_64 ELF64 executable.
    NotX86_64Executable,
    /// A header or segment points outside the file.
    Truncated,
    /// A segment is outside the user half or overlaps another.
    BadSegment,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    b.get(off..off + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or(ElfError::Truncated)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap())).ok_or(ElfError::Truncated)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, ElfError> {
    b.get(off..off + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap())).ok_or(ElfError::Truncated)
}

/// A parsed executable.
pub struct Elf<'a> {
    data: &'a [u8],
    /// Entry point.
    pub entry: u64,
    phoff: usize,
    phnum: usize,
    phentsize: usize,
}

impl<'a> Elf<'a> {
    /// Checks the header of `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        let ident_ok = data.get(0..7) == Some(&[0x7f, b'E', b'L', b'F', 2, 1, 1][..]);
        if !ident_ok || u16_at(data, 16)? != 2 /* ET_EXEC */ || u16_at(data, 18)? != 62
        /* x86_64 */
        {
            return Err(ElfError::NotX86_64Executable);
        }
        let elf = Self {
            data,
            entry: u64_at(data, 24)?,
            phoff: u64_at(data, 32)? as usize,
            phentsize: u16_at(data, 54)? as usize,
            phnum: u16_at(data, 56)? as usize,
        };
        if elf.phentsize < 56 {
            return Err(ElfError::Truncated);
        }
        Ok(elf)
    }

    /// The `PT_LOAD` segments, validated: inside the user half, in the file,
    /// page-aligned relative to each other and non-overlapping.
    pub fn segments(&self) -> Result<impl Iterator<Item = Segment> + '_, ElfError> {
        let mut prev_end = 0u64;
        for s in self.raw_segments() {
            let s = s?;
            let end = s.vaddr.checked_add(s.mem_size).ok_or(ElfError::BadSegment)?;
            let file_end = s.offset.checked_add(s.file_size).ok_or(ElfError::Truncated)?;
            if file_end > self.data.len() as u64 {
                return Err(ElfError::Truncated);
            }
            if s.file_size > s.mem_size || end > abi::TASK_SIZE_MAX || s.vaddr < (prev_end + 0xfff) & !0xfff {
                return Err(ElfError::BadSegment);
            }
            prev_end = end;
        }
        Ok(self.raw_segments().map(|s| s.expect("validated above")))
    }

    /// The bytes of `seg` present in the file.
    pub fn bytes(&self, seg: &Segment) -> &'a [u8] {
        &self.data[seg.offset as usize..(seg.offset + seg.file_size) as usize]
    }

    fn raw_segments(&self) -> impl Iterator<Item = Result<Segment, ElfError>> + '_ {
        (0..self.phnum).filter_map(move |i| {
            let ph = self.phoff + i * self.phentsize;
            let parse = || -> Result<Option<Segment>, ElfError> {
                if u32_at(self.data, ph)? != PT_LOAD {
                    return Ok(None);
                }
                let flags = u32_at(self.data, ph + 4)?;
                Ok(Some(Segment {
                    offset: u64_at(self.data, ph + 8)?,
                    vaddr: u64_at(self.data, ph + 16)?,
                    file_size: u64_at(self.data, ph + 32)?,
                    mem_size: u64_at(self.data, ph + 40)?,
                    read: flags & PF_R != 0,
                    write: flags & PF_W != 0,
                    exec: flags & PF_X != 0,
                }))
            };
            parse().transpose()
        })
    }
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    use super::*;

    /// The embedded user image parses: an entry inside a text segment that is
    /// read+exec and not writable, and data that is not executable.
    #[ktest]
    fn user_image_parses() {
        let elf = Elf::parse(super::super::IMAGE).expect("user image rejected");
        let segs: alloc::vec::Vec<_> = elf.segments().expect("bad segments").collect();
        assert!(!segs.is_empty());
        let text =
            segs.iter().find(|s| (s.vaddr..s.vaddr + s.mem_size).contains(&elf.entry)).expect("entry outside segments");
        assert!(text.exec && text.read && !text.write);
        assert!(segs.iter().all(|s| !(s.write && s.exec)), "W^X violated");
        assert_eq!(segs[0].vaddr, abi::USER_IMAGE_BASE);
    }

    /// Garbage and truncated images are rejected, not trusted.
    #[ktest]
    fn bad_images_are_rejected() {
        assert_eq!(Elf::parse(b"not an elf").err(), Some(ElfError::NotX86_64Executable));
        let image = super::super::IMAGE;
        assert!(Elf::parse(&image[..40]).is_err());
        let mut copy = alloc::vec::Vec::from(image);
        // Point the first program header's file offset past the end.
        let phoff = u64::from_le_bytes(copy[32..40].try_into().unwrap()) as usize;
        copy[phoff + 8..phoff + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        let elf = Elf::parse(&copy).unwrap();
        assert!(elf.segments().is_err());
    }
}
