//! TLB shoot-down and deferred freeing: [`CpuBitmap`] (Linux `mm_cpumask`),
//! [`FlushRange`], and [`MmuGather`] (Linux `struct mmu_gather`).
//!
//! # The freeing protocol
//!
//! Other CPUs may still translate through an entry we just cleared (their
//! TLBs and paging-structure caches), and lockless walkers
//! (`pte_offset_map` users) may still be reading a table we just detached.
//! So nothing is freed when its entry is cleared:
//!
//! 1. Entries are cleared under their lock (PTE lock, PMD lock,
//!    `page_table_lock`); each cleared mapping is *gathered*: its frame goes
//!    on the gather's page list and its address range widens the range to
//!    flush. Detached page tables go on the gather's table list.
//! 2. [`MmuGather::flush_mmu`] (Linux `tlb_flush_mmu`): one
//!    [`Hal::flush_tlb`](crate::hal::Hal::flush_tlb) of the gathered range on
//!    every CPU in the address space's [`CpuBitmap`], *then* the mappings'
//!    references on the gathered frames are dropped: a frame goes back to the
//!    allocator unless the lockless walker pinned it, in which case its
//!    pinner's put frees it. No CPU can reach them through a TLB any more,
//!    and the flush waited for every lockless walk that might have found
//!    them (the walk runs with interrupts off; the flush is an IPI).
//! 3. [`MmuGather::finish`] (Linux `tlb_finish_mmu`): flush as above, then
//!    the detached tables go to a grace-period batch ([`crate::table_rcu`]):
//!    each is destroyed (`pagetable_dtor`, then free) once every walker that
//!    could have seen it has left its read-side section, the destructor
//!    *with* the free, not before: a walker that found the table may still
//!    take its split lock. Nothing waits for that grace period here.
//!
//! The gather is `#[must_use]` and must be finished. Dropping an unfinished
//! gather finishes it and logs a warning, so forgetting costs time but never
//! safety.
//!
//! # Locks
//!
//! A gather takes no lock itself. [`MmuGather::flush_mmu`] may run with page
//! table locks held (the HAL allows a flush there); [`MmuGather::finish`]
//! may free frames and tables, so it runs with no spinlock held (the callers
//! drop `mmap_lock` first).
//!
//! Lists are threaded through the frames' own descriptors (`Page::link`), so
//! gathering never allocates and has no batch limit. A descriptor has one
//! link, so only a frame no other gather can hold goes on that list: one
//! whose mapping just cleared held its only reference. A frame shared since
//! a fork (one reference per mapping) may be gathered by the other address
//! space at the same moment (the parent's munmap and the child's exit on two
//! CPUs); threaded through one link, the two lists would run into each
//! other (a frame put twice, another never). Such frames go in a small array
//! of the gather's own instead (Linux gathers every page in arrays), and a
//! full array means a flush before the gather takes more
//! ([`MmuGather::remove_pte_page`]). No frame gains a mapping while its
//! address space zaps (fork takes `mmap_lock` exclusive), so a reference
//! count of one, read after the entry was cleared, stays the gather's alone.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PAGE_SIZE, Pfn, VirtAddr};
use crate::config::NR_CPUS;
use crate::frame::{MAX_ORDER, PCP_BATCH};
use crate::gigantic::GIGANTIC_ORDER;
use crate::memmap::Page;
use crate::mm_struct::Mm;
use crate::physmem::PhysMem;

const WORDS: usize = NR_CPUS.div_ceil(64);

/// Frames a gather holds outside its list before it must be flushed (module
/// comment): only frames shared since a fork, or pinned, go there.
pub const SHARED_BATCH: usize = 64;

/// A set of CPU numbers `0..NR_CPUS`, updated concurrently (Linux
/// `mm_cpumask`). An address space's bitmap holds every CPU that may cache
/// its translations: the kernel sets a CPU's bit when it loads the address
/// space's CR3 there (and may clear it once that CPU has flushed it away).
///
/// Ordering: [`CpuBitmap::set`] is sequentially consistent and the unmap
/// path issues a full fence between clearing entries and reading the set, so
/// a CPU either is seen (and flushed) or loads CR3 after the clear (and
/// cannot cache the old entry). Linux relies on the same pairing of
/// `cpumask_set_cpu` + barrier in `switch_mm` with the flush path.
pub struct CpuBitmap {
    words: [AtomicU64; WORDS],
}

impl CpuBitmap {
    /// The empty set.
    pub const fn new() -> Self {
        Self { words: [const { AtomicU64::new(0) }; WORDS] }
    }

    fn split(cpu: usize) -> (usize, u64) {
        assert!(cpu < NR_CPUS, "CPU {cpu} out of range (NR_CPUS = {NR_CPUS})");
        (cpu / 64, 1 << (cpu % 64))
    }

    /// Adds `cpu`; returns whether it was already present.
    pub fn set(&self, cpu: usize) -> bool {
        let (w, b) = Self::split(cpu);
        self.words[w].fetch_or(b, Ordering::SeqCst) & b != 0
    }

    /// Removes `cpu`; returns whether it was present.
    pub fn clear(&self, cpu: usize) -> bool {
        let (w, b) = Self::split(cpu);
        self.words[w].fetch_and(!b, Ordering::SeqCst) & b != 0
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        let (w, b) = Self::split(cpu);
        self.words[w].load(Ordering::SeqCst) & b != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::SeqCst) == 0)
    }

    /// Number of CPUs in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.load(Ordering::SeqCst).count_ones() as usize).sum()
    }

    /// The CPUs in the set, ascending (each word read once).
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            let mut bits = w.load(Ordering::SeqCst);
            core::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(i * 64 + b)
            })
        })
    }

    /// The raw words (bit `c % 64` of word `c / 64` is CPU `c`).
    pub fn words(&self) -> [u64; WORDS] {
        core::array::from_fn(|i| self.words[i].load(Ordering::SeqCst))
    }
}

impl Default for CpuBitmap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CpuBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// What a shoot-down must invalidate: `[start, end)` of user virtual
/// addresses, or everything. Any CPU invalidating it must also drop
/// paging-structure-cache entries for the range when `freed_tables` is set
/// (x86 `invlpg` does so for every linear address; a full flush does too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushRange {
    /// First byte (page aligned).
    pub start: VirtAddr,
    /// One past the last byte (page aligned); `u64::MAX` with `start` 0 means all.
    pub end: VirtAddr,
    /// Page tables under the range were detached (Linux `tlb->freed_tables`).
    pub freed_tables: bool,
}

impl FlushRange {
    /// Every translation of the address space.
    pub const ALL: FlushRange =
        FlushRange { start: VirtAddr::new(0), end: VirtAddr::new(u64::MAX), freed_tables: true };

    /// `[start, end)`, rounded out to pages.
    pub fn new(start: VirtAddr, end: VirtAddr) -> Self {
        let s = start.as_u64() & !(PAGE_SIZE - 1);
        let e = end.as_u64().saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        Self { start: VirtAddr::new(s), end: VirtAddr::new(e), freed_tables: false }
    }

    /// The page containing `addr`.
    pub fn page(addr: VirtAddr) -> Self {
        Self::new(addr, addr.add(1))
    }

    /// Whether this is [`FlushRange::ALL`].
    pub fn is_all(&self) -> bool {
        self.start.as_u64() == 0 && self.end.as_u64() == u64::MAX
    }

    /// Number of 4 KiB pages covered (`u64::MAX` for all).
    pub fn nr_pages(&self) -> u64 {
        if self.is_all() { u64::MAX } else { (self.end.as_u64() - self.start.as_u64()) / PAGE_SIZE }
    }

    /// Whether `addr` is covered.
    pub fn contains(&self, addr: VirtAddr) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Calls the HAL's shoot-down for `range` on the CPUs of `mm`.
pub(crate) fn flush_tlb_range(mm: &Mm<'_>, range: FlushRange) {
    // Entries were cleared before this point; make the clear visible before
    // reading the set of CPUs (pairs with `CpuBitmap::set`).
    core::sync::atomic::fence(Ordering::SeqCst);
    crate::hal::get().flush_tlb(mm.cpu_bitmap(), range);
}

/// The descriptor of a frame a gather holds (it was mapped, so it is in
/// the memmap).
#[inline]
fn gathered_page<'a>(mm: &'a Mm<'_>, pfn: Pfn) -> &'a Page {
    mm.phys().page(pfn).expect("gathered frame outside the memmap")
}

/// A singly linked list of frames threaded through `Page::link`:
/// `link = (next_pfn + 1) << 8 | order`, 0 ends the list.
struct FreeList {
    head: u64,
    len: u64,
}

impl FreeList {
    const fn new() -> Self {
        Self { head: 0, len: 0 }
    }
    fn push(&mut self, page: &Page, pfn: Pfn, order: usize) {
        page.link.store(self.head, Ordering::Relaxed);
        self.head = ((pfn.as_u64() + 1) << 8) | order as u64;
        self.len += 1;
    }
    /// The newest gathered block: its first frame, order and descriptor.
    fn pop<'a>(&mut self, mm: &'a Mm<'_>) -> Option<(Pfn, usize, &'a Page)> {
        if self.head == 0 {
            return None;
        }
        let pfn = Pfn::new((self.head >> 8) - 1);
        let order = (self.head & 0xff) as usize;
        let page = gathered_page(mm, pfn);
        // The gather owns the link (memmap lock table): no other writer.
        self.head = page.link.load(Ordering::Relaxed);
        page.link.store(0, Ordering::Relaxed);
        self.len -= 1;
        Some((pfn, order, page))
    }
}

/// Detached tables chained through `Page::link` (`pfn + 1`, 0 ends it),
/// newest first: the form [`crate::table_rcu`] queues them in.
#[derive(Default)]
struct TableChain {
    head: u64,
    tail: u64,
    len: u64,
}

impl TableChain {
    fn push(&mut self, mm: &Mm<'_>, pfn: Pfn) {
        let page = mm.phys().page(pfn).expect("gathered table outside the memmap");
        // A detached table is owned by the list it is on (memmap lock table).
        debug_assert_eq!(page.link.load(Ordering::Relaxed), 0, "detached table still on a list");
        page.link.store(self.head, Ordering::Relaxed);
        self.head = pfn.as_u64() + 1;
        if self.tail == 0 {
            self.tail = self.head;
        }
        self.len += 1;
    }
}

/// Linux `struct mmu_gather`: cleared mappings waiting for their shoot-down,
/// and detached tables waiting for a grace period (module comment).
#[must_use = "an MmuGather holds frames and tables until it is finished (tlb_finish_mmu)"]
pub struct MmuGather<'m, 'p> {
    mm: &'m Mm<'p>,
    start: u64,
    end: u64,
    freed_tables: bool,
    pages: FreeList,
    /// Order-0 frames that another address space may be gathering too
    /// (module comment); `shared[..nr_shared]` are live.
    shared: [Pfn; SHARED_BATCH],
    nr_shared: usize,
    tables: TableChain,
    /// The gathered frames are already shot down ([`MmuGather::flush_tlb_only`]).
    pages_shot_down: bool,
    finished: bool,
}

impl<'m, 'p> MmuGather<'m, 'p> {
    /// Linux `tlb_gather_mmu`: an empty gather for `mm`.
    pub fn new(mm: &'m Mm<'p>) -> Self {
        Self {
            mm,
            start: u64::MAX,
            end: 0,
            freed_tables: false,
            pages: FreeList::new(),
            shared: [Pfn::new(0); SHARED_BATCH],
            nr_shared: 0,
            tables: TableChain::default(),
            pages_shot_down: false,
            finished: false,
        }
    }

    /// The address space.
    pub fn mm(&self) -> &'m Mm<'p> {
        self.mm
    }

    /// Linux `tlb_flush_pte_range` / `__tlb_adjust_range`: `[start, end)`
    /// had an entry changed or cleared and must be shot down.
    pub fn flush_range(&mut self, start: VirtAddr, end: VirtAddr) {
        self.start = self.start.min(start.as_u64());
        self.end = self.end.max(end.as_u64());
    }

    /// Makes the next flush a full one ([`FlushRange::ALL`], paging-structure
    /// caches included): Linux `tlb->fullmm`, used when a whole address space
    /// goes away.
    pub fn flush_all(&mut self) {
        self.start = 0;
        self.end = u64::MAX;
        self.freed_tables = true;
    }

    /// Linux `tlb_remove_page_size`: the entry mapping `pfn` (a block of
    /// 2^order frames, or a gigantic page) at `[addr, addr + size)` was
    /// cleared; free the frames after the shoot-down.
    ///
    /// For huge blocks (THPs, hugetlb and gigantic pages), which fork copies
    /// and no two address spaces ever map; a frame a PTE mapped goes through
    /// [`MmuGather::remove_pte_page`].
    pub fn remove_page(&mut self, pfn: Pfn, order: usize, addr: VirtAddr) {
        debug_assert!(order > 0 && (order <= MAX_ORDER || order == GIGANTIC_ORDER));
        self.flush_range(addr, addr.add(PAGE_SIZE << order));
        let page = gathered_page(self.mm, pfn);
        self.pages.push(page, pfn, order);
    }

    /// Linux `__tlb_remove_page`: the PTE mapping the 4 KiB frame `pfn` at
    /// `addr` was cleared; free the frame after the shoot-down. Returns
    /// whether the gather is full: the caller then drops its page-table lock
    /// and calls [`MmuGather::flush_mmu`] before it gathers more.
    #[must_use = "a full gather must be flushed before it takes more frames"]
    #[inline]
    pub fn remove_pte_page(&mut self, pfn: Pfn, addr: VirtAddr) -> bool {
        self.flush_range(addr, addr.add(PAGE_SIZE));
        let page = gathered_page(self.mm, pfn);
        // Acquire: a fork's reference (taken under the other side's locks,
        // published to us by `mmap_lock`) or another gather's put is seen.
        if page.refcount.load(Ordering::Acquire) == 1 {
            // Ours alone: no other gather can reach this descriptor.
            self.pages.push(page, pfn, 0);
            return false;
        }
        assert!(self.nr_shared < SHARED_BATCH, "gathered past a full batch without a flush");
        self.shared[self.nr_shared] = pfn;
        self.nr_shared += 1;
        self.nr_shared == SHARED_BATCH
    }

    /// Linux `tlb_remove_table` (`pte_free_tlb` & co.): a page table whose
    /// entries covered `[start, end)` was detached from its parent; free it
    /// (dtor with the free) after the shoot-down and a grace period.
    pub fn remove_table(&mut self, table: Pfn, start: VirtAddr, end: VirtAddr) {
        self.flush_range(start, end);
        self.freed_tables = true;
        self.tables.push(self.mm, table);
    }

    /// Frames waiting for the flush.
    pub fn nr_pending_pages(&self) -> u64 {
        self.pages.len + self.nr_shared as u64
    }

    /// Tables waiting for the grace period.
    pub fn nr_pending_tables(&self) -> u64 {
        self.tables.len
    }

    /// The range the next flush covers (None: nothing to flush).
    pub fn pending_range(&self) -> Option<FlushRange> {
        (self.start < self.end).then(|| FlushRange {
            start: VirtAddr::new(self.start),
            end: VirtAddr::new(self.end),
            freed_tables: self.freed_tables,
        })
    }

    /// Linux `tlb_flush_mmu`: shoots the gathered range down on every CPU
    /// of the address space, then drops the mappings' references on the
    /// gathered frames ([`PhysMem::put_folio`](crate::PhysMem::put_folio)):
    /// a frame nobody pinned goes back to the allocator now, a pinned one
    /// when its pinner lets go. Tables stay for [`MmuGather::finish`]. Legal
    /// with page-table locks held.
    pub fn flush_mmu(&mut self) {
        debug_assert!(
            self.nr_pending_pages() == 0 || self.pending_range().is_some() || self.pages_shot_down,
            "gathered frames without a range to flush"
        );
        self.flush_tlb_only();
        self.pages_shot_down = false;
        let phys = self.mm.phys();
        // Each gathered block was mapped by exactly one entry, which was
        // cleared under its lock before being gathered, and the shoot-down
        // above removed every cached translation of it: the mapping's
        // reference is the gather's to drop. Order-0 frames whose last
        // reference that was go back in batches, one per-CPU list lock each.
        if self.nr_pending_pages() == 0 {
            return;
        }
        // Each frame goes with the descriptor `pop` found it by, so the
        // free does not look it up again. The entries past `n` are never
        // read; the zero page's descriptor only fills the array.
        let filler = (phys.zero_pfn(), phys.page(phys.zero_pfn()).expect("the zero page is in the memmap"));
        let mut batch = [filler; PCP_BATCH];
        let mut n = 0;
        // The list's frames, then those that may be in other gathers too
        // (module comment).
        let shared = core::mem::take(&mut self.nr_shared);
        let shared = self.shared[..shared].iter().map(|&pfn| (pfn, 0, gathered_page(self.mm, pfn)));
        for (pfn, order, page) in core::iter::from_fn(|| self.pages.pop(self.mm)).chain(shared) {
            if !PhysMem::put_page_testzero(page, pfn) {
                // Pinned (crate::gup): the pinner's put frees it.
                continue;
            }
            if order == 0 {
                batch[n] = (pfn, page);
                n += 1;
                if n == batch.len() {
                    // SAFETY: the last reference is gone (above): the gather
                    // owns each frame, and frees each once, with the
                    // descriptor `pop` looked it up by.
                    unsafe { phys.free_pages_bulk(&batch) };
                    n = 0;
                }
            } else {
                phys.free_folio(pfn, order);
            }
        }
        // SAFETY: the batch's last frames, each one whose last reference the
        // gather just dropped (above), freed once with its own descriptor.
        unsafe { phys.free_pages_bulk(&batch[..n]) };
    }

    /// Linux `tlb_flush_mmu_tlbonly`: the shoot-down alone. The gathered
    /// frames are then unreachable through any page table or TLB and stay
    /// gathered until [`MmuGather::flush_mmu`] or [`MmuGather::finish`], so a
    /// caller can free them after dropping `mmap_lock` (freeing thousands of
    /// frames takes longer than zapping them, and a writer waiting for the
    /// lock need not wait for it).
    pub fn flush_tlb_only(&mut self) {
        if let Some(range) = self.pending_range() {
            flush_tlb_range(self.mm, range);
            self.start = u64::MAX;
            self.end = 0;
            self.pages_shot_down = true;
        }
    }

    /// Linux `tlb_finish_mmu`: [`MmuGather::flush_mmu`], then hands the
    /// detached tables to the grace-period batches ([`crate::table_rcu`]),
    /// which free each (dtor with the free) once every walker that could
    /// have seen it is gone. Never waits for the grace period itself
    /// (unless the backlog of waiting tables is past its bound). Call with
    /// no spinlock held.
    pub fn finish(mut self) {
        self.finish_inner();
    }

    fn finish_inner(&mut self) {
        self.finished = true;
        self.flush_mmu();
        let phys = self.mm.phys();
        let t = core::mem::take(&mut self.tables);
        phys.table_rcu.defer(phys, t.head, t.tail, t.len);
    }
}

impl Drop for MmuGather<'_, '_> {
    fn drop(&mut self) {
        // A test that failed inside a flush must not flush (and fail) again
        // while unwinding: that would abort the whole test binary.
        #[cfg(test)]
        if std::thread::panicking() {
            return;
        }
        if !self.finished {
            if self.nr_pending_pages() != 0 || self.tables.len != 0 || self.start < self.end {
                log::warn!("mm: MmuGather dropped without finish(): {self:?}");
            }
            self.finish_inner();
        }
    }
}

impl fmt::Debug for MmuGather<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmuGather")
            .field("range", &self.pending_range())
            .field("pages", &self.nr_pending_pages())
            .field("tables", &self.tables.len)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn cpu_bitmap_sets_clears_and_iterates() {
        let b = CpuBitmap::new();
        assert!(b.is_empty());
        assert!(!b.set(3));
        assert!(b.set(3));
        b.set(NR_CPUS - 1);
        assert_eq!(b.iter().collect::<std::vec::Vec<_>>(), [3, NR_CPUS - 1]);
        assert_eq!(b.count(), 2);
        assert!(b.clear(3) && !b.clear(3));
        assert!(!b.contains(3) && b.contains(NR_CPUS - 1));
    }

    #[test]
    fn tlb_range_rounds_out_to_pages() {
        let r = FlushRange::new(VirtAddr::new(0x1234), VirtAddr::new(0x3001));
        assert_eq!((r.start.as_u64(), r.end.as_u64(), r.nr_pages()), (0x1000, 0x4000, 3));
        assert!(r.contains(VirtAddr::new(0x3fff)) && !r.contains(VirtAddr::new(0x4000)));
        assert!(FlushRange::ALL.is_all() && FlushRange::ALL.contains(VirtAddr::new(0xdead_0000)));
    }
}
