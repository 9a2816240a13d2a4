//! Per-VMA locks (Linux 6.4+ `CONFIG_PER_VMA_LOCK`): a page fault locks only
//! the VMA it faults in, and takes no `mmap_lock` at all.
//!
//! # Protocol
//!
//! * **Lookup.** The VMAs are published as an immutable sorted array of
//!   nodes (`VmaArray`) behind one pointer. A fault enters a read-side
//!   section, loads the pointer, binary-searches the address and read-locks
//!   the node it finds ([`lock_vma_under_rcu`]). Writers never change a
//!   published node's range or flags: a change replaces the node.
//! * **The VMA lock.** Each node has a reader count with a writer bit in one
//!   word ([`VmaLock`]). A fault's read lock is a try-lock: it fails if a
//!   writer holds the node, and then the fault falls back to `mmap_lock`
//!   (which waits for that writer). Readers never wait.
//! * **Write sessions.** Writers hold `mmap_lock` exclusive. The address
//!   space counts its write sessions (`mm_lock_seq`, Linux the same name);
//!   each node records the session that last write-locked it (`lock_seq`).
//!   Before a writer changes a VMA, or the page tables under it, it
//!   write-locks the node (`VmaLock::start_write`, Linux
//!   `vma_start_write`): it sets the writer bit, waits for the readers inside
//!   to leave (faults in progress finish; they need no lock the writer holds),
//!   stamps `lock_seq` with the session, and clears the bit. From then until
//!   the session ends, a reader that sees `lock_seq == mm_lock_seq` fails.
//!   Nodes a session creates are born stamped with it. Ending the session
//!   (`mmap_write_unlock` or `mmap_write_downgrade`) publishes the new
//!   array, then bumps `mm_lock_seq`, which releases every stamp at once
//!   (Linux `vma_end_write_all`).
//! * **Replaced nodes** are marked detached (after being write-locked) and
//!   stay allocated until a grace period after the array that listed them
//!   was replaced: a reader that read-locks one sees it detached and retries
//!   under `mmap_lock`. The address space keeps retired arrays on a list
//!   tagged with grace-period cookies and frees them as they complete.
//!
//! Why a reader that passes the checks may use the node: it read-locked it
//! (count incremented) *before* the writer's `start_write` read the count,
//! so the writer waits for it; or after the writer's `start_write`, in which
//! case its re-check of `lock_seq` (after the lock, with acquire) sees the
//! stamp, and either the session still runs (`lock_seq == mm_lock_seq`:
//! fail) or it has ended, and the acquire load of `mm_lock_seq` that showed
//! the bump also shows the detached mark set before it (fail), or the node
//! was not replaced at all (it is current: proceed).
//!
//! # Why a sorted array
//!
//! Lookups are lock-free and `O(log n)`, updates copy the array (`O(n)`,
//! under the exclusive `mmap_lock`, at most once per session), and the
//! reclamation argument is one sentence. Linux needs a maple tree because
//! processes map thousands of VMAs and change them constantly; here address
//! spaces hold tens, and mapping changes are the rare operation. Past
//! [`crate::vma::MAX_MAP_COUNT`] VMAs a copy is 65530 entries: slow, but
//! bounded and correct.
//!
//! Each entry holds the VMA's end beside the node pointer, so the search
//! reads the array alone and touches one node, the one it returns; and each
//! node's lock word has a cache line of its own. Threads faulting in
//! different VMAs then share no written line on the lookup path (Linux: the
//! maple tree keeps its pivots in its own nodes; `vm_refcnt` is cache-line
//! aligned).
//!
//! # Locks
//!
//! The VMA lock sits at the level of `mmap_lock` (level 1 of the order): a
//! fault holds one or the other, then the page-table locks. A writer takes a
//! node's write side only momentarily, under `mmap_lock` exclusive, while it
//! holds no page-table lock. Readers never spin on it, so it cannot be part
//! of a deadlock; the debug lock-order checker does not track it.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::AtomicPtr;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::addr::VirtAddr;
use crate::counters::Counter;
use crate::lock::{LockClass, LockLevel, SpinLock};
use crate::mm_struct::Mm;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64};
use crate::vma::Vma;

const WRITER: u32 = 1 << 31;

/// A VMA's lock (module comment): reader count and writer bit, the write
/// session that last locked it, and whether it was replaced.
///
/// On a cache line of its own (Linux puts `vm_refcnt` on its own line for
/// the same reason): every fault in the VMA writes `state` twice, and the
/// VMA's range and flags beside it are read by every fault that looks at
/// this node, in this VMA or not. Sharing the line would make each of those
/// reads a miss on a line another CPU keeps writing.
#[repr(align(64))]
pub struct VmaLock {
    state: AtomicU32,
    lock_seq: AtomicU64,
    detached: AtomicBool,
}

impl VmaLock {
    fn new(session: u64) -> Self {
        Self { state: AtomicU32::new(0), lock_seq: AtomicU64::new(session), detached: AtomicBool::new(false) }
    }

    /// Linux `vma_start_read`: a try-lock for a fault. Fails (never waits) if
    /// a writer holds or has stamped the node in the running session.
    fn start_read(&self, mm_lock_seq: &AtomicU64) -> bool {
        if self.lock_seq.load(Acquire) == mm_lock_seq.load(Acquire) {
            return false;
        }
        let old = self.state.fetch_add(1, Acquire);
        if old & WRITER != 0 {
            self.state.fetch_sub(1, Release);
            return false;
        }
        // Re-check after the lock (module comment): a writer may have
        // stamped the node between the first check and the increment.
        if self.lock_seq.load(Acquire) == mm_lock_seq.load(Acquire) {
            self.end_read();
            return false;
        }
        true
    }

    /// Linux `vma_end_read`.
    fn end_read(&self) {
        self.state.fetch_sub(1, Release);
    }

    /// Linux `vma_start_write`: excludes faults from the node for the rest of
    /// the write session `session` (the caller holds `mmap_lock` exclusive).
    /// Waits for the faults inside to finish; returns at once if the node is
    /// already stamped with this session.
    pub(crate) fn start_write(&self, session: u64) {
        if self.lock_seq.load(Relaxed) == session {
            return;
        }
        let old = self.state.fetch_or(WRITER, Acquire);
        debug_assert_eq!(old & WRITER, 0, "two writers on one VMA (mmap_lock not held exclusive?)");
        let hal = crate::hal::get();
        let mut spins = 0u32;
        while self.state.load(Acquire) != WRITER {
            spins = spins.wrapping_add(1);
            hal.spin_wait(spins);
        }
        self.lock_seq.store(session, Release);
        self.state.fetch_and(!WRITER, Release);
    }

    /// Marks the node replaced (after [`VmaLock::start_write`]).
    pub(crate) fn detach(&self) {
        self.detached.store(true, Release);
    }

    /// Faults inside now (a snapshot, for reports).
    pub fn readers(&self) -> u32 {
        self.state.load(Relaxed) & !WRITER
    }

    /// Whether the node was replaced (a snapshot).
    pub fn is_detached(&self) -> bool {
        self.detached.load(Relaxed)
    }

    /// The write session that last locked it.
    pub fn lock_seq(&self) -> u64 {
        self.lock_seq.load(Relaxed)
    }
}

/// A VMA as the address space publishes it: its immutable range and flags,
/// and its lock.
pub struct VmaNode {
    /// The range and flags (never change once published).
    pub vma: Vma,
    /// The per-VMA lock.
    pub lock: VmaLock,
}

impl VmaNode {
    /// A node created in write session `session` (locked for it).
    pub(crate) fn new(vma: Vma, session: u64) -> Arc<Self> {
        Arc::new(Self { vma, lock: VmaLock::new(session) })
    }
}

impl fmt::Debug for VmaNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} readers {} lock_seq {}{}",
            self.vma,
            self.lock.readers(),
            self.lock.lock_seq(),
            if self.lock.is_detached() { " detached" } else { "" }
        )
    }
}

/// One entry of the published array: a node and a copy of its end.
struct Slot {
    end: VirtAddr,
    node: Arc<VmaNode>,
}

/// The published, sorted VMA array.
///
/// The binary search compares the ends kept in the array itself, as
/// Linux's maple tree keeps its pivots in its own nodes: a lookup then reads
/// one node, the one it returns, and not the nodes of other threads' VMAs,
/// whose locks their faults keep writing.
pub(crate) struct VmaArray {
    slots: Box<[Slot]>,
}

impl VmaArray {
    pub(crate) fn new(nodes: impl Iterator<Item = Arc<VmaNode>>) -> Box<Self> {
        Box::new(Self { slots: nodes.map(|node| Slot { end: node.vma.end, node }).collect() })
    }

    fn find(&self, addr: VirtAddr) -> Option<&Arc<VmaNode>> {
        let i = self.slots.partition_point(|s| s.end <= addr);
        self.slots.get(i).map(|s| &s.node).filter(|n| n.vma.contains(addr))
    }
}

/// The lookup side of an address space: the published array, the session
/// counter, and the arrays waiting for a grace period.
pub(crate) struct VmaLookup {
    array: AtomicPtr<VmaArray>,
    /// Linux `mm->mm_lock_seq`: write sessions ended so far.
    pub(crate) mm_lock_seq: AtomicU64,
    /// Replaced arrays and the grace-period cookie each waits for.
    retired: SpinLock<Vec<(u64, Box<VmaArray>)>>,
}

/// Replaced arrays that may wait before the next writer expedites a grace
/// period for them.
const RETIRED_MAX: usize = 64;

impl VmaLookup {
    pub(crate) fn new() -> Self {
        Self {
            array: AtomicPtr::new(Box::into_raw(VmaArray::new(core::iter::empty()))),
            mm_lock_seq: AtomicU64::new(0),
            retired: SpinLock::new(LockClass::Other, LockLevel::Untracked, Vec::new()),
        }
    }

    /// Publishes `array` (under `mmap_lock` exclusive, before the session
    /// ends) and retires the one it replaces.
    pub(crate) fn publish(&self, array: Box<VmaArray>) {
        let old = self.array.swap(Box::into_raw(array), AcqRel);
        // SAFETY: `old` came from `Box::into_raw` (here or in `new`) and was
        // just unpublished by this swap, so we own it; readers that loaded it
        // are covered by the grace period it now waits for.
        let old = unsafe { Box::from_raw(old) };
        let cookie = crate::hal::get().get_state_synchronize_rcu();
        self.retired.lock().push((cookie, old));
    }

    /// Frees the retired arrays whose grace period has passed; past the
    /// bound, waits for one. Call with no lock held and outside any
    /// read-side section (after `mmap_write_unlock`).
    pub(crate) fn reap(&self) {
        let hal = crate::hal::get();
        let mut retired = self.retired.lock();
        if retired.len() > RETIRED_MAX {
            drop(retired);
            hal.synchronize_rcu_expedited();
            retired = self.retired.lock();
        }
        // Dropping an array drops its node references; a replaced node goes
        // with the last array (or set) that held it.
        retired.retain(|(cookie, _)| !hal.poll_state_synchronize_rcu(*cookie));
    }

    /// The published array, inside a read-side section.
    fn current<'r>(&self, _rcu: &'r crate::helpers::RcuReadGuard) -> &'r VmaArray {
        // SAFETY: the pointer is always a live `Box<VmaArray>`; a replaced
        // one is freed only after a grace period that begins after it was
        // unpublished, so it outlives the read-side section `_rcu` proves.
        unsafe { &*self.array.load(Acquire) }
    }
}

impl Drop for VmaLookup {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader can hold the pointer any more.
        drop(unsafe { Box::from_raw(*self.array.get_mut()) });
    }
}

/// Why a fault could not use its VMA's lock and fell back to `mmap_lock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmaLockFallback {
    /// No VMA in the published array covers the address (perhaps a writer
    /// has not published it yet); `mmap_lock` decides.
    NotFound,
    /// A writer holds the VMA, or stamped it in the running session.
    Locked,
    /// The node was replaced after the lookup found it.
    Detached,
}

/// A fault's read lock on one VMA ([`lock_vma_under_rcu`]); dropping it is
/// `vma_end_read`. Valid inside the read-side section it was found in.
pub struct VmaReadGuard<'r> {
    node: &'r VmaNode,
}

impl<'r> VmaReadGuard<'r> {
    /// The locked VMA.
    pub fn vma(&self) -> &'r Vma {
        &self.node.vma
    }
}

impl Drop for VmaReadGuard<'_> {
    fn drop(&mut self) {
        self.node.lock.end_read();
    }
}

/// Linux `lock_vma_under_rcu`: the VMA containing `addr`, read-locked, found
/// without `mmap_lock`. Errors say why the caller must fall back.
pub fn lock_vma_under_rcu<'r>(
    mm: &Mm<'_>,
    addr: VirtAddr,
    rcu: &'r crate::helpers::RcuReadGuard,
) -> Result<VmaReadGuard<'r>, VmaLockFallback> {
    let lookup = mm.vma_lookup();
    let Some(node) = lookup.current(rcu).find(addr) else {
        mm.counters.inc(Counter::VmaFallbackNotFound);
        return Err(VmaLockFallback::NotFound);
    };
    // The node lives as long as the array that lists it (section `rcu`).
    let node: &'r VmaNode = node;
    if !node.lock.start_read(&lookup.mm_lock_seq) {
        mm.counters.inc(Counter::VmaFallbackLocked);
        return Err(VmaLockFallback::Locked);
    }
    if node.lock.detached.load(Acquire) {
        node.lock.end_read();
        mm.counters.inc(Counter::VmaFallbackDetached);
        return Err(VmaLockFallback::Detached);
    }
    Ok(VmaReadGuard { node })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::vma::{Prot, VmFlags};

    /// A fault writes its VMA's lock word twice; every lookup reads the
    /// node's range. They must not share a cache line (see [`VmaLock`]).
    #[test]
    fn the_lock_word_has_a_cache_line_of_its_own() {
        let vma = Vma {
            start: VirtAddr::new(0x1000_0000),
            end: VirtAddr::new(0x2000_0000),
            flags: VmFlags::from_prot_and_map(Prot::READ | Prot::WRITE, crate::vma::MapFlags::empty()),
        };
        let nodes: alloc::vec::Vec<_> = (0..8).map(|_| VmaNode::new(vma, 0)).collect();
        let line = |p: usize| p / 64;
        for n in &nodes {
            let range = &n.vma as *const Vma as usize;
            let range_lines = line(range)..=line(range + size_of::<Vma>() - 1);
            let state = &n.lock.state as *const AtomicU32 as usize;
            assert!(!range_lines.contains(&line(state)), "a VMA's lock word shares a cache line with its range");
            for other in &nodes {
                let theirs = &other.lock.state as *const AtomicU32 as usize;
                assert!(core::ptr::eq(n, other) || line(state) != line(theirs), "two VMAs' lock words share a line");
            }
        }
    }
}
