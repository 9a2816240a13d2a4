//! Detached page tables wait here for a grace period, in per-CPU batches
//! (Linux `tlb_remove_table` with `CONFIG_MMU_GATHER_RCU_TABLE_FREE`:
//! `tlb_table_flush` hands a batch to `call_rcu`).
//!
//! # Why tables wait
//!
//! A table detached from its parent entry (munmap's `free_pgtables`,
//! `madvise` reclaiming an empty PTE table) may still be in use by a walker
//! that read the parent entry before the detach: a `pte_offset_map` user
//! (faults, the page-table reclaim itself) inside its read-side section, or
//! the lockless user-page walker (`crate::gup`) with interrupts off. Such a
//! walker may read the table's entries and take its split lock. So the table
//! (and, in `debug-ptlock` builds, its allocated lock) is destroyed only once
//! every read-side section that could have seen it has ended:
//! `pagetable_dtor` runs *with* the free, not at the detach.
//!
//! # How
//!
//! [`crate::MmuGather::finish`] shoots the range down (paging-structure
//! caches included) and hands its list of detached tables to
//! `TableRcu::defer` with a cookie from
//! [`Hal::get_state_synchronize_rcu`](crate::hal::Hal::get_state_synchronize_rcu).
//! Nothing waits: the unmap path returns at once. A batch is freed by
//! [`TableRcu::reap`] once its cookie polls complete; reaping runs at every
//! gather's finish (all CPUs' lists, each with a try-lock) and whenever the
//! kernel has nothing better to do (its idle loop). The backlog is bounded:
//! past [`BACKLOG_TABLES`] waiting tables, or when a CPU's ring of batches
//! is full, the deferring CPU expedites a grace period
//! ([`Hal::synchronize_rcu_expedited`](crate::hal::Hal::synchronize_rcu_expedited))
//! and reaps, instead of letting the list grow without limit.
//! [`TableRcu::barrier`] (Linux `rcu_barrier`) waits for a grace period and
//! frees everything: leak checks call it before counting frames.
//!
//! # Locks
//!
//! Each CPU's ring has its own spinlock (class `Other`, untracked level: it
//! nests with nothing). Tables are unlinked from a ring under its lock and
//! freed after dropping it, so the frame allocator's locks are never taken
//! under it. The tables themselves are chained through `Page::link` (the
//! memmap's lock table: a detached table is owned by the list it is on).

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::Relaxed;

use crate::addr::{PTRS_PER_TABLE, Pfn};
use crate::config::NR_CPUS;
use crate::lock::{LockClass, LockLevel, SpinLock};
use crate::physmem::PhysMem;
use crate::ptdesc::{PtLevel, PtPage, page_ptdesc};

/// Tables that may wait for a grace period, all CPUs together, before the
/// CPU deferring more expedites one (16 MiB of tables).
pub const BACKLOG_TABLES: u64 = 4096;
/// Batches one CPU's ring holds (one per distinct grace-period cookie).
const RING: usize = 8;
/// Per-CPU rings (loom models run two "CPUs").
const NR_RINGS: usize = if cfg!(loom) { 2 } else { NR_CPUS };

/// A chain of detached tables through `Page::link` (`pfn + 1`, 0 ends it),
/// all detached before one cookie was taken.
#[derive(Clone, Copy, Default)]
struct Batch {
    cookie: u64,
    head: u64,
    tail: u64,
    len: u64,
}

/// One CPU's FIFO of batches, oldest first.
#[derive(Default)]
struct Ring {
    batches: [Batch; RING],
    first: usize,
    len: usize,
}

impl Ring {
    fn newest(&mut self) -> Option<&mut Batch> {
        (self.len > 0).then(|| &mut self.batches[(self.first + self.len - 1) % RING])
    }
    fn push(&mut self, b: Batch) -> bool {
        if self.len == RING {
            return false;
        }
        self.batches[(self.first + self.len) % RING] = b;
        self.len += 1;
        true
    }
    fn pop_if(&mut self, ready: impl Fn(u64) -> bool) -> Option<Batch> {
        if self.len == 0 || !ready(self.batches[self.first].cookie) {
            return None;
        }
        let b = self.batches[self.first];
        self.first = (self.first + 1) % RING;
        self.len -= 1;
        Some(b)
    }
}

#[repr(align(64))]
struct CpuRing {
    ring: SpinLock<Ring>,
}

/// The per-CPU batches of one [`PhysMem`] (see the module comment).
pub struct TableRcu {
    rings: [CpuRing; NR_RINGS],
    /// Tables waiting, all rings (exact once concurrent defers and reaps end).
    waiting: AtomicU64,
    /// Tables freed after their grace period, since boot.
    freed: AtomicU64,
    /// Grace periods expedited because the backlog hit its bound.
    expedited: AtomicU64,
}

/// Figures for reports and tests ([`PhysMem::table_rcu_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableRcuStats {
    /// Detached tables waiting for their grace period now.
    pub waiting: u64,
    /// Tables freed after a grace period, since boot.
    pub freed: u64,
    /// Grace periods expedited because the backlog hit its bound.
    pub expedited: u64,
}

impl TableRcu {
    pub(crate) fn new() -> Self {
        Self {
            rings: core::array::from_fn(|_| CpuRing {
                ring: SpinLock::new(LockClass::Other, LockLevel::Untracked, Ring::default()),
            }),
            waiting: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            expedited: AtomicU64::new(0),
        }
    }

    /// Queues the detached tables chained from `head` (`pfn + 1` links
    /// through `Page::link`, `len` of them, last one `tail`) to be freed once
    /// a grace period from now has passed. Never waits, unless the backlog
    /// is past its bound.
    ///
    /// Every table on the chain was detached from its parent entry under the
    /// parent's lock, and the TLB range it covered was shot down.
    pub(crate) fn defer(&self, phys: &PhysMem, head: u64, tail: u64, len: u64) {
        if len == 0 {
            return;
        }
        let hal = crate::hal::get();
        let cookie = hal.get_state_synchronize_rcu();
        let mut b = Batch { cookie, head, tail, len };
        let ring = &self.rings[crate::hal::cpu_id() % NR_RINGS];
        self.waiting.fetch_add(len, Relaxed);
        loop {
            let mut r = ring.ring.lock();
            if let Some(newest) = r.newest().filter(|n| n.cookie == cookie) {
                // Same grace period: append to that batch.
                link_after(phys, newest.tail, b.head);
                newest.tail = b.tail;
                newest.len += b.len;
                break;
            }
            if r.push(b) {
                break;
            }
            // The ring is full of batches still waiting: expedite.
            drop(r);
            self.expedite(phys);
            b = Batch { cookie: hal.get_state_synchronize_rcu(), ..b };
        }
        if self.waiting.load(Relaxed) > BACKLOG_TABLES {
            self.expedite(phys);
        } else {
            self.reap(phys);
        }
    }

    fn expedite(&self, phys: &PhysMem) {
        self.expedited.fetch_add(1, Relaxed);
        crate::hal::get().synchronize_rcu_expedited();
        self.reap(phys);
    }

    /// Frees every batch whose grace period has completed, on every CPU's
    /// ring (a ring another CPU is working on is skipped). Never waits.
    /// Returns the number of tables freed.
    pub fn reap(&self, phys: &PhysMem) -> u64 {
        if self.waiting.load(Relaxed) == 0 {
            return 0;
        }
        let hal = crate::hal::get();
        let mut freed = 0;
        for ring in &self.rings {
            loop {
                let Some(mut r) = ring.ring.try_lock() else { break };
                let Some(b) = r.pop_if(|c| hal.poll_state_synchronize_rcu(c)) else { break };
                drop(r);
                freed += free_chain(phys, b.head);
                self.waiting.fetch_sub(b.len, Relaxed);
            }
        }
        self.freed.fetch_add(freed, Relaxed);
        freed
    }

    /// Linux `rcu_barrier` for tables: waits for a grace period and frees
    /// every batch queued before the call. Call with no spinlock held and
    /// outside any read-side section.
    pub fn barrier(&self, phys: &PhysMem) {
        if self.waiting.load(Relaxed) == 0 {
            return;
        }
        crate::hal::get().synchronize_rcu();
        let hal = crate::hal::get();
        let mut freed = 0;
        for ring in &self.rings {
            loop {
                let mut r = ring.ring.lock();
                let Some(b) = r.pop_if(|c| hal.poll_state_synchronize_rcu(c)) else { break };
                drop(r);
                freed += free_chain(phys, b.head);
                self.waiting.fetch_sub(b.len, Relaxed);
            }
        }
        self.freed.fetch_add(freed, Relaxed);
    }

    /// Current figures.
    pub fn stats(&self) -> TableRcuStats {
        TableRcuStats {
            waiting: self.waiting.load(Relaxed),
            freed: self.freed.load(Relaxed),
            expedited: self.expedited.load(Relaxed),
        }
    }
}

fn link_after(phys: &PhysMem, tail: u64, next_head: u64) {
    let page = phys.page(Pfn::new(tail - 1)).expect("queued table outside the memmap");
    debug_assert_eq!(page.link.load(Relaxed), 0, "tail of a batch has a successor");
    page.link.store(next_head, Relaxed);
}

/// Destroys and frees the tables chained from `head`; returns how many.
fn free_chain(phys: &PhysMem, mut head: u64) -> u64 {
    let mut n = 0;
    while head != 0 {
        let pfn = Pfn::new(head - 1);
        let pt = page_ptdesc(phys, pfn).expect("queued table outside the memmap");
        if cfg!(debug_assertions) && pt.level() == Some(PtLevel::Pte) {
            // A walker that wrote into the table after it was detached (a
            // missed `pmd_same` re-check) left an entry here. (Upper tables
            // of a detached subtree still point to their children.)
            if let Some(i) = (0..PTRS_PER_TABLE as u64)
                .find(|i| phys.slot(pfn.phys().add(8 * i)).is_some_and(|s| s.load(Relaxed) != 0))
            {
                panic!("detached table {pfn:?} has entry {i} set at its grace period's end: written after the detach");
            }
        }
        // The batch owns the link (memmap lock table): no other writer.
        head = pt.page().link.swap(0, Relaxed);
        // SAFETY: the table was detached from its parent entry under the
        // parent's lock before it was queued, the range it covered was shot
        // down, and the grace period of its batch has completed, so every
        // walker that could have found it (read-side section or interrupts
        // off) has finished with it and its lock; the batch owned it alone.
        drop(unsafe { PtPage::from_published(phys, pt) });
        n += 1;
    }
    n
}
