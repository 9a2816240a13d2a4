//! TLB flushing: on this CPU (`invlpg`, CR3 reload) and on a set of CPUs
//! (shoot-down through an IPI, waiting for every acknowledgement).
//!
//! # Shoot-down protocol
//!
//! Each CPU owns one request slot (the range to flush and a count of
//! outstanding acknowledgements) and each CPU has an inbox, an
//! [`AtomicCpuMask`](crate::cpumask::AtomicCpuMask) of the senders whose
//! requests it has not serviced yet (see `ipi::Channel`). The initiator:
//!
//! 1. flushes locally if it is in the mask;
//! 2. writes the range into its slot and sets the outstanding count to the
//!    number of targets;
//! 3. sets its own bit in every target's inbox (release: the page-table
//!    change made before the call, and the slot, are visible to whoever sees
//!    the bit) and sends each target the `TLB_SHOOTDOWN` IPI;
//! 4. spins until the count reaches zero.
//!
//! A target (in the IPI handler, or in any wait loop) empties its inbox,
//! flushes each sender's range and decrements that sender's count.
//!
//! # Why it cannot deadlock
//!
//! The initiator runs step 4 with interrupts disabled (it may be inside the
//! page-fault path, holding page-table spinlocks). If two CPUs shoot at each
//! other, neither takes the other's IPI, so the wait loop *services this
//! CPU's own inbox* on every turn: each completes the other's request while
//! waiting for its own. The same holds for a CPU that spins on a lock with
//! interrupts off while the lock holder shoots at it: lock wait loops call
//! [`service_pending`] (the memory manager's HAL `spin_wait` hook is where),
//! so the holder's request is completed and the holder can go on to release
//! the lock. Servicing a flush is always safe: it only discards cached
//! translations and takes no lock.
//!
//! Each CPU has at most one request of its own in flight, because the whole
//! shoot-down runs with interrupts off and nothing inside it starts another
//! (NMI handlers never shoot down).

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::VirtAddr;
use x86_64::registers::control::{Cr3, Cr4, Cr4Flags};

use crate::cpumask::CpuMask;
use crate::percpu::NR_CPUS;

/// Ranges of more pages than this are flushed with a full flush instead of
/// one `invlpg` per page (Linux's `tlb_single_page_flush_ceiling` is 33 too:
/// past it, refilling the TLB costs less than the invalidations).
pub const FULL_FLUSH_THRESHOLD: u64 = 33;

const PAGE: u64 = 4096;
/// `pages` value meaning "everything".
const ALL: u64 = u64::MAX;

/// What to flush: a run of 4 KiB pages, or the whole TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbRange {
    start: u64,
    pages: u64,
}

impl TlbRange {
    /// Every translation (including global ones).
    pub const ALL: TlbRange = TlbRange { start: 0, pages: ALL };

    /// The page containing `addr`.
    pub fn page(addr: VirtAddr) -> Self {
        Self::pages(addr, 1)
    }

    /// `count` pages starting at the page containing `start`.
    pub fn pages(start: VirtAddr, count: u64) -> Self {
        Self { start: start.align_down(PAGE).as_u64(), pages: count }
    }

    /// The pages that overlap `[start, end)`.
    pub fn range(start: VirtAddr, end: VirtAddr) -> Self {
        let first = start.align_down(PAGE).as_u64();
        let last = end.align_up(PAGE).as_u64();
        Self { start: first, pages: last.saturating_sub(first) / PAGE }
    }

    /// Whether this range is flushed with a full flush.
    pub fn is_full(&self) -> bool {
        self.pages == ALL || self.pages > FULL_FLUSH_THRESHOLD
    }

    /// Number of pages (`None` for [`TlbRange::ALL`]).
    pub fn page_count(&self) -> Option<u64> {
        (self.pages != ALL).then_some(self.pages)
    }

    /// The two words carried in a shoot-down request.
    pub(crate) fn encode(self) -> (u64, u64) {
        (self.start, self.pages)
    }

    pub(crate) fn decode(start: u64, pages: u64) -> Self {
        Self { start, pages }
    }
}

/// A page-table change whose stale TLB entries have not been flushed yet.
/// Whoever changes an entry that a TLB may cache gets one of these and must
/// say where to flush; dropping it unflushed is a bug (debug builds panic).
#[must_use = "a page-table change needs its TLB flush: call shootdown() or flush_local()"]
pub struct PendingFlush {
    range: TlbRange,
    done: bool,
}

impl PendingFlush {
    /// A flush owed for `range`.
    pub fn new(range: TlbRange) -> Self {
        Self { range, done: false }
    }

    /// The range still to be flushed.
    pub fn range(&self) -> TlbRange {
        self.range
    }

    /// Flushes on every CPU of `mask` (this one included if present) and
    /// waits for all of them. See [`shootdown`].
    pub fn shootdown(mut self, mask: &CpuMask) {
        self.done = true;
        shootdown(mask, self.range);
    }

    /// Flushes on this CPU only: correct when no other CPU can have used the
    /// mapping (for example a user address space active on this CPU alone).
    pub fn flush_local(mut self) {
        self.done = true;
        flush_local(self.range);
    }

    /// Declares that no flush is needed (the entry was not present before,
    /// so no TLB can hold it).
    pub fn not_needed(mut self) {
        self.done = true;
    }
}

impl Drop for PendingFlush {
    fn drop(&mut self) {
        debug_assert!(self.done, "PendingFlush for {:?} dropped without a flush", self.range);
    }
}

/// Per-CPU counters, for tests and statistics (one cache line per CPU).
#[repr(align(64))]
struct Stats {
    /// Single-page invalidations performed.
    pages: AtomicU64,
    /// Full flushes performed.
    full: AtomicU64,
    /// Requests from other CPUs serviced.
    serviced: AtomicU64,
    /// Shoot-downs this CPU initiated that involved other CPUs.
    initiated: AtomicU64,
}

static STATS: [Stats; NR_CPUS] = [const {
    Stats {
        pages: AtomicU64::new(0),
        full: AtomicU64::new(0),
        serviced: AtomicU64::new(0),
        initiated: AtomicU64::new(0),
    }
}; NR_CPUS];

/// Counters of one CPU: (single-page invalidations, full flushes, remote
/// requests serviced, remote shoot-downs initiated).
pub fn stats(cpu: usize) -> (u64, u64, u64, u64) {
    let s = &STATS[cpu];
    (
        s.pages.load(Ordering::Relaxed),
        s.full.load(Ordering::Relaxed),
        s.serviced.load(Ordering::Relaxed),
        s.initiated.load(Ordering::Relaxed),
    )
}

/// Invalidates this CPU's translation of the page containing `addr`.
#[inline]
pub fn flush_page(addr: VirtAddr) {
    x86_64::instructions::tlb::flush(addr);
}

/// Flushes this CPU's whole TLB, global entries included: toggling CR4.PGE
/// flushes everything; without PGE there are no global entries and a CR3
/// reload suffices.
pub fn flush_all_local() {
    crate::irq::without_interrupts(|| {
        let cr4 = Cr4::read();
        if cr4.contains(Cr4Flags::PAGE_GLOBAL) {
            // SAFETY: clearing and restoring PGE changes no mapping; it is
            // the architectural way to drop global TLB entries.
            unsafe {
                Cr4::write(cr4 - Cr4Flags::PAGE_GLOBAL);
                Cr4::write(cr4);
            }
        } else {
            let (frame, flags) = Cr3::read();
            // SAFETY: reloading the same CR3 value changes no mapping.
            unsafe { Cr3::write(frame, flags) };
        }
    });
}

/// Flushes `range` on this CPU (a full flush past [`FULL_FLUSH_THRESHOLD`]).
pub fn flush_local(range: TlbRange) {
    let stats = &STATS[crate::percpu::cpu_id()];
    if range.is_full() {
        flush_all_local();
        stats.full.fetch_add(1, Ordering::Relaxed);
    } else {
        for i in 0..range.pages {
            flush_page(VirtAddr::new(range.start + i * PAGE));
        }
        stats.pages.fetch_add(range.pages, Ordering::Relaxed);
    }
}

/// Flushes `range` on every online CPU in `mask` and returns once each has
/// done so. This CPU flushes directly if it is in `mask`.
///
/// Legal with interrupts disabled, while holding spinlocks, and in interrupt
/// context (not in an NMI handler): see the module comment for why it
/// cannot deadlock, provided lock wait loops call [`service_pending`].
pub fn shootdown(mask: &CpuMask, range: TlbRange) {
    crate::irq::without_interrupts(|| {
        let me = crate::percpu::cpu_id();
        if mask.contains(me) {
            flush_local(range);
        }
        let targets = *mask & crate::percpu::online_mask().without(me);
        if targets.is_empty() {
            return;
        }
        STATS[me].initiated.fetch_add(1, Ordering::Relaxed);
        let (a, b) = range.encode();
        crate::ipi::TLB.post(&targets, a, b);
        crate::ipi::TLB.wait_done(me, || {
            service_pending();
        });
    });
}

/// Services the flush requests other CPUs have queued for this one. Cheap
/// when there are none (one load). Call from every loop that may spin with
/// interrupts disabled.
#[inline]
pub fn service_pending() {
    let me = crate::percpu::cpu_id();
    if crate::ipi::TLB.has_incoming(me) {
        service_pending_slow(me);
    }
}

#[cold]
fn service_pending_slow(me: usize) {
    let serviced = crate::ipi::TLB.drain(me, |start, pages| flush_local(TlbRange::decode(start, pages)));
    STATS[me].serviced.fetch_add(serviced as u64, Ordering::Relaxed);
}
