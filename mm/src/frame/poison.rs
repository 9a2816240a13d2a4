//! Page poisoning (debug builds; Linux `CONFIG_PAGE_POISONING` with
//! `page_owner`'s record of who had a page).
//!
//! Every frame that is freed is filled with [`POISON`], and every frame the
//! allocator hands out again is checked for it first. A byte that changed
//! in between was written after the free: a stale TLB entry after munmap, a
//! missed unmap, a kernel pointer kept past `drop`. The check panics with
//! the frame, the offset and value of the first bad word, and the frame's
//! last owner: what it was used for (its [`PageKind`] when it was freed),
//! the `#[track_caller]` site that allocated it, and the CPU that freed it.
//!
//! The owner is recorded in the descriptor's `owner` word, so it costs no
//! memory beyond the 64-byte descriptor and no lock: the site at
//! allocation, by the allocating CPU (the frame is its own from then on),
//! kind and CPU at the free, by the freeing owner. A frame the allocator
//! has never seen freed (free since boot) carries no poison and is not
//! checked.
//!
//! Only debug builds poison ([`ACTIVE`]); a release build's allocation and
//! free paths do not contain this code at all. Loom models skip it (their
//! frames are a handful of words, not memory).

use core::panic::Location;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{PAGE_SIZE, Pfn};
use crate::memmap::{MemMap, Page, PageKind};

/// Whether this build poisons freed frames.
pub const ACTIVE: bool = cfg!(all(debug_assertions, not(loom)));

/// The byte a free frame is filled with (Linux `PAGE_POISON`).
pub const POISON: u8 = 0xaa;
const POISON_WORD: u64 = u64::from_ne_bytes([POISON; 8]);

/// `owner` word layout: bits 0..4 the kind at the free + 1 (0: not freed
/// since the site was recorded, so not poisoned), bits 4..19 the freeing
/// CPU, bits 19..64 bits 3..48 of the `&'static Location` of the
/// allocation site (8-aligned; bit 47 is the sign of a canonical address).
const KIND_BITS: u64 = 0xf;
const CPU_SHIFT: u32 = 4;
const CPU_MASK: u64 = 0x7fff;
const SITE_SHIFT: u32 = 19;

/// What a frame's `owner` word says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The kind the frame had when it was freed (`None`: not freed since its
    /// last allocation, or never allocated).
    pub freed_kind: Option<PageKind>,
    /// The CPU that freed it.
    pub freed_on: usize,
    /// Where it was allocated (`None`: never allocated since boot).
    pub site: Option<&'static Location<'static>>,
}

fn encode_site(site: &'static Location<'static>) -> u64 {
    let p = site as *const Location<'static> as u64;
    ((p >> 3) & ((1 << (64 - SITE_SHIFT)) - 1)) << SITE_SHIFT
}

fn decode_site(word: u64) -> Option<&'static Location<'static>> {
    let mut p = (word >> SITE_SHIFT) << 3;
    if p == 0 {
        return None;
    }
    if p & (1 << 47) != 0 {
        p |= 0xffff_0000_0000_0000;
    }
    // SAFETY: the bits came from `encode_site` of a `&'static Location`
    // (the only writer of these bits), which kept every address bit of a
    // canonical pointer: bits 0..3 are zero by alignment, bits 48..64 copies
    // of bit 47. So `p` is that reference again.
    Some(unsafe { &*(p as *const Location<'static>) })
}

/// Decodes a descriptor's owner record.
pub fn owner(page: &Page) -> Owner {
    let w = page.owner.load(Relaxed);
    let kind = w & KIND_BITS;
    Owner {
        freed_kind: (kind != 0).then(|| PageKind::from_u8((kind - 1) as u8)),
        freed_on: ((w >> CPU_SHIFT) & CPU_MASK) as usize,
        site: decode_site(w),
    }
}

/// The words of a frame, through the direct map.
fn words(map: &MemMap, pfn: Pfn) -> *mut u64 {
    map.window().virt(pfn.phys()).cast()
}

/// A frame is being freed by its owner (which gives it up): fills it with
/// [`POISON`] and records its kind and this CPU next to its allocation site.
pub(crate) fn on_free(map: &MemMap, pfn: Pfn, page: &Page, kind: PageKind) {
    // SAFETY: the caller owns the frame and gives it up: nothing else reads
    // or writes it until the allocator hands it out again, and the window
    // maps every frame the memmap covers, writable, 8-aligned.
    unsafe { core::ptr::write_bytes(words(map, pfn), POISON, (PAGE_SIZE / 8) as usize) };
    let cpu = (crate::hal::cpu_id() as u64 & CPU_MASK) << CPU_SHIFT;
    let site = page.owner.load(Relaxed) & !((1 << SITE_SHIFT) - 1);
    page.owner.store(site | cpu | (kind as u64 + 1), Relaxed);
}

/// A frame is being handed out by the allocator to a caller at `site`:
/// panics with the frame and its last owner if a word of it changed since
/// it was poisoned, then records `site`.
#[track_caller]
pub(crate) fn on_alloc(map: &MemMap, pfn: Pfn, page: &Page, site: &'static Location<'static>) {
    if page.owner.load(Relaxed) & KIND_BITS != 0
        && let Some((at, value)) = first_change(map, pfn)
    {
        let o = owner(page);
        panic!(
            "page poisoning: frame {pfn:?} (phys {:#x}) was written after it was freed: word at offset {at:#x} \
             is {value:#018x}, not {POISON_WORD:#018x}; last owner: {:?} allocated at {}, freed on CPU {}; \
             now allocated at {site}",
            pfn.phys().as_u64(),
            o.freed_kind.unwrap_or(PageKind::Free),
            o.site.map_or(alloc::string::String::from("(unknown)"), |s| alloc::format!("{s}")),
            o.freed_on,
        );
    }
    page.owner.store(encode_site(site), Relaxed);
}

/// The first word of a poisoned frame that no longer holds the poison.
fn first_change(map: &MemMap, pfn: Pfn) -> Option<(u64, u64)> {
    let w = words(map, pfn);
    (0..PAGE_SIZE / 8).find_map(|i| {
        // SAFETY: the allocator owns the free frame (its caller's lock or
        // `&mut` proves it) and the window maps it; 8-aligned words.
        let v = unsafe { w.add(i as usize).read_volatile() };
        (v != POISON_WORD).then_some((i * 8, v))
    })
}
