//! A fair, writer-preferring reader-writer spinlock: `mmap_lock`.
//!
//! # Protocol
//!
//! * What it protects: whatever it owns. `Mm` uses one for its VMA set
//!   (Linux `mm->mmap_lock`): page faults hold it *shared* (never a lock that
//!   serialises all faults of an address space), `mmap`/`munmap`/`mprotect`
//!   hold it exclusive (`munmap` downgrades to shared once the VMAs are out
//!   of the tree, Linux `mmap_write_downgrade`, so faults elsewhere proceed
//!   while it zaps). Holding it shared also pins the page-table *tree* above
//!   the PTE level for a fault: tables are detached only under the exclusive
//!   lock, or under a downgraded hold for spans no VMA covers any more, which
//!   no fault can walk into.
//! * Level: [`LockLevel::AddressSpace`] (1), the first lock of the order:
//!   `mmap_lock -> mm.page_table_lock -> PMD lock -> PTE lock -> frame caches`.
//!   Read and write acquisitions are both recorded by the debug lock-order
//!   checker; a CPU never takes it twice (not even shared: with a waiting
//!   writer, a recursive reader would deadlock).
//!
//! # Why writer-preferring
//!
//! Eight CPUs faulting constantly keep the reader count above zero nearly all
//! the time. With a reader-preferring lock a `munmap` would wait for a moment
//! with no reader at all, which may never come. Here a writer first queues
//! behind other writers (a ticket, so writers are FIFO among themselves),
//! then sets `WRITER` in the writer word: from that moment no new reader gets
//! in, the readers inside drain, and the writer owns the lock. Readers that
//! arrived meanwhile spin until the writer leaves.
//!
//! # Readers' turn after a writer
//!
//! Writer preference alone lets a stream of writers starve readers: a
//! thread that calls `mremap` in a loop queues its next write hold while the
//! last is being released, and the faults that waited behind it find the door
//! shut again before they get through it (under TCG, with vCPUs the host
//! deschedules, a fault waited over 5 s for an `mremap` mover and the lockup
//! watchdog fired). So the lock is phase-fair, as Linux's rwsem hands off to
//! waiting readers: a reader that finds `WRITER` set counts itself in
//! `waiting` until it gets in, and a writer with its ticket first lets the
//! readers counted there in before it closes the door. That wait is bounded
//! by [`READERS_TURN_CYCLES`], so a waiting reader whose vCPU the host
//! deschedules delays a writer by that much at most. Readers that never met
//! a writer never touch `waiting`: the fast path is unchanged.
//!
//! # Why the reader count is per CPU
//!
//! Every fault takes the lock shared and drops it: with one reader count,
//! that is two atomic read-modify-writes per fault on a cache line every
//! faulting CPU writes, and the line bounces between them on every fault
//! (Linux moved faults off `mmap_lock` altogether, to per-VMA locks, for
//! this reason). Here the count is split into cache-line-sized shards, one
//! per CPU ([`SHARDS`]), as in a "big reader" lock or Linux's
//! `percpu_rw_semaphore`: a reader touches only its own shard and *reads*
//! the writer word, which stays shared in every cache until a writer comes.
//! Writers pay instead: they scan every shard. They are rare.
//!
//! # Halting waiters
//!
//! Under a hypervisor every wait here may be long: a writer waits for a
//! `munmap` that zaps hundreds of megabytes under its downgraded hold, and
//! the next writers queue behind it. Spinning through that burns the host
//! core the zapping vCPU needs (with eight vCPUs on two host cores, most of
//! a `disjoint` storm's `mmap_lock` waiting was such spinning), where Linux's
//! rwsem puts the waiter to sleep. So with halting waiters on (the spinlock's
//! mode, `set_halting_waiters`) each of the three waits (a reader for the
//! writer to leave, a writer for its ticket, a writer for the readers to
//! drain) halts its CPU after [`HALT_AFTER_CYCLES`](super::HALT_AFTER_CYCLES)
//! of spinning, and whoever ends a wait kicks it, by the handshake of
//! `lock/halt.rs`: the flag is `halted`, set by a waiter with `fetch_or`
//! before it rereads the word its wait depends on with a read-modify-write,
//! and every change that can end a wait (the writer's `swap` of `writer`,
//! the `fetch_add` of `writers`, a reader's decrement of its shard) is a
//! read-modify-write followed by a look at `halted`. That costs a reader's
//! release a locked decrement instead of a plain one, only in this mode.
//!
//! # Words and the handshake
//!
//! `writer`: `WRITER` while a writer waits for readers to drain or holds the
//! lock. `readers[i]`: readers inside that entered through shard `i`.
//! `writers`: a ticket word (next ticket in
//! bits 16..32, now serving in bits 0..16), ordering writers among
//! themselves.
//!
//! A reader increments its shard, *then* reads `writer`; a writer sets
//! `writer`, *then* reads every shard. One of them must see the other (the
//! store-load pattern of Dekker's algorithm): either the reader sees
//! `WRITER`, backs out (decrements) and waits, or the writer sees the
//! reader's count and waits for it to leave. Store-then-load needs more than
//! acquire/release, so the writer reads each shard with a read-modify-write
//! (`fetch_add(0)`), which always reads the latest value: if the writer's
//! RMW comes first in the shard's modification order, the reader's
//! increment reads from it and synchronises with it, so the reader's later
//! load of `writer` sees `WRITER`; otherwise the writer sees the increment.
//! (Sequentially consistent loads would also do, but loom models `SeqCst` as
//! acquire/release and so could not verify it; this form it can.)

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use super::halt::{self, SpinTimer, halting_waiters};
use super::{LockClass, LockLevel, lockdep, stats};
use crate::hal;
use crate::percpu::this_cpu_dec_release;
use crate::sync::AtomicU32;

const WRITER: u32 = 1;
const TICKET_ONE: u32 = 1 << 16;

/// How long, in TSC cycles, a writer lets the readers that waited behind
/// the previous writer in before it closes the door anyway (module comment,
/// "Readers' turn after a writer"): about half a millisecond.
pub const READERS_TURN_CYCLES: u64 = 1 << 20;

/// The loom models' bound, in spins (their HAL has no clock).
const LOOM_READERS_TURN_SPINS: u32 = 2;

/// Reader-count shards per lock (one cache line each): one per CPU, so a
/// shard has one writer besides the writers' `fetch_add(0)`
/// (`percpu::this_cpu_dec_release`). Loom models run a few "CPUs" and need few.
pub const SHARDS: usize = if cfg!(loom) { 2 } else { crate::config::NR_CPUS };

/// One CPU's (or a few CPUs') count of readers inside, alone on its line.
#[repr(align(64))]
struct ReaderShard(AtomicU32);

/// A fair, writer-preferring reader-writer spinlock owning a `T`.
pub struct RwSpinLock<T> {
    /// Per-CPU counts of readers inside (module comment).
    readers: [ReaderShard; SHARDS],
    /// `WRITER` while a writer waits or holds.
    writer: AtomicU32,
    /// Writer queue: ticket word.
    writers: AtomicU32,
    /// Readers that found a writer in and wait for it to leave (module
    /// comment, "Readers' turn after a writer").
    waiting: AtomicU32,
    /// Nonzero when a waiter may be halted on this lock (module comment,
    /// "Halting waiters"): set by waiters, cleared by whoever kicks them.
    halted: AtomicU32,
    class: u8,
    data: UnsafeCell<T>,
}

/// The shard this CPU counts itself in.
fn my_shard() -> u8 {
    (hal::cpu_id() % SHARDS) as u8
}

// SAFETY: the lock hands out `&T` to any number of readers (so `T: Sync`) or
// one `&mut T` (so `T: Send`), never both at once.
unsafe impl<T: Send + Sync> Sync for RwSpinLock<T> {}
// SAFETY: moving the lock moves `T`.
unsafe impl<T: Send> Send for RwSpinLock<T> {}

impl<T> RwSpinLock<T> {
    /// A free lock of statistics class `class`.
    #[cfg(not(loom))]
    pub const fn new(class: LockClass, data: T) -> Self {
        Self {
            readers: [const { ReaderShard(AtomicU32::new(0)) }; SHARDS],
            writer: AtomicU32::new(0),
            writers: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            halted: AtomicU32::new(0),
            class: class as u8,
            data: UnsafeCell::new(data),
        }
    }

    /// A free lock (loom atomics cannot be built in const).
    #[cfg(loom)]
    pub fn new(class: LockClass, data: T) -> Self {
        Self {
            readers: core::array::from_fn(|_| ReaderShard(AtomicU32::new(0))),
            writer: AtomicU32::new(0),
            writers: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            halted: AtomicU32::new(0),
            class: class as u8,
            data: UnsafeCell::new(data),
        }
    }

    /// Enters as a reader through `shard` unless a writer is there.
    fn try_enter(&self, shard: u8) -> bool {
        let count = &self.readers[shard as usize].0;
        count.fetch_add(1, AcqRel);
        if self.writer.load(Acquire) & WRITER == 0 {
            return true;
        }
        // A writer came first: back out so it can drain.
        self.leave(count);
        false
    }

    /// Leaves the readers counted in `count`, this CPU's shard: a plain
    /// decrement, or with halting waiters a read-modify-write and a look at
    /// `halted`, so a writer halted on the drain is kicked (module comment,
    /// "Halting waiters").
    #[inline]
    fn leave(&self, count: &AtomicU32) {
        if halting_waiters() {
            count.fetch_sub(1, AcqRel);
            self.wake_halted();
        } else {
            // The shard is this CPU's (the guard is not `Send`, kernel code
            // is not moved between CPUs, no interrupt handler takes the
            // lock), so leaving needs no locked instruction in the kernel.
            this_cpu_dec_release(count);
        }
    }

    /// Kicks the waiters halted on this lock, if any. Called after every
    /// read-modify-write that can end a wait (module comment).
    #[inline]
    fn wake_halted(&self) {
        if self.halted.load(Acquire) != 0 && self.halted.swap(0, AcqRel) != 0 {
            halt::kick_halted(self.addr());
        }
    }

    /// The end of a write hold, by `release` or `downgrade`: opens the door
    /// to the readers (those that tried meanwhile backed out), hands the
    /// next writer its turn, and kicks whoever halted waiting for either.
    /// Both changes are read-modify-writes with acquire, as the halting
    /// handshake needs (module comment, "Halting waiters").
    fn open_and_pass_on(&self, ticket: u16) {
        self.writer.swap(0, AcqRel);
        // Wrap 0xffff -> 0 without carrying into "next".
        if ticket == u16::MAX {
            self.writers.fetch_sub(0xffff, AcqRel);
        } else {
            self.writers.fetch_add(1, AcqRel);
        }
        self.wake_halted();
    }

    /// One turn of a wait: spin, and once the wait has spun for
    /// `HALT_AFTER_CYCLES` halt until kicked, if `blocked` says it must go
    /// on after `halted` is set. `blocked` reads the word the wait depends
    /// on with read-modify-writes (module comment, "Halting waiters").
    #[inline]
    fn wait_turn(&self, hal: &dyn hal::Hal, spins: &mut u32, timer: &mut SpinTimer, blocked: impl Fn() -> bool) {
        *spins = spins.wrapping_add(1);
        hal.spin_wait(*spins);
        if timer.should_halt(hal) {
            halt::halt_while(hal, self.addr(), || {
                self.halted.fetch_or(1, AcqRel);
                blocked()
            });
        }
    }

    /// Whether no reader is inside; once true with `WRITER` set, it stays
    /// true. Decided by read-modify-writes, not loads ([`Self::drained_rmw`];
    /// see the module comment), after a pass of loads that fails cheaply
    /// while a shard is busy.
    fn drained(&self) -> bool {
        self.readers.iter().all(|r| r.0.load(Relaxed) == 0) && self.drained_rmw()
    }

    /// [`Self::drained`] with read-modify-writes only, for a halting
    /// writer's last look (a load may return a stale count).
    fn drained_rmw(&self) -> bool {
        self.readers.iter().all(|r| r.0.fetch_add(0, AcqRel) == 0)
    }

    fn addr(&self) -> usize {
        self as *const Self as usize
    }

    /// Takes the lock shared (Linux `mmap_read_lock`).
    #[track_caller]
    pub fn read(&self) -> RwReadGuard<'_, T> {
        lockdep::before_acquire(self.addr(), LockLevel::AddressSpace, false);
        let hal = hal::get();
        let mut start = None;
        let mut spins = 0u32;
        let mut timer = SpinTimer::new();
        let shard = my_shard();
        while !self.try_enter(shard) {
            // A writer waits or holds: stay out until it leaves, counted
            // among the readers the next writer lets in first.
            start.get_or_insert_with(|| {
                self.waiting.fetch_add(1, Relaxed);
                self.wait_begin(hal)
            });
            while self.writer.load(Relaxed) & WRITER != 0 {
                self.wait_turn(hal, &mut spins, &mut timer, || self.writer.fetch_add(0, AcqRel) & WRITER != 0);
            }
        }
        if start.is_some() {
            self.waiting.fetch_sub(1, Release);
        }
        self.record(start);
        lockdep::acquired(self.addr(), LockLevel::AddressSpace, false);
        RwReadGuard { lock: self, shard, _not_send: PhantomData }
    }

    /// Takes the lock exclusive (Linux `mmap_write_lock`).
    #[track_caller]
    pub fn write(&self) -> RwWriteGuard<'_, T> {
        self.write_inner(false)
    }

    /// Takes a second lock of this kind exclusive while holding a first
    /// (Linux `mmap_write_lock_nested(mm, SINGLE_DEPTH_NESTING)`: fork locks
    /// the new address space while it holds the parent's).
    #[track_caller]
    pub fn write_nested(&self) -> RwWriteGuard<'_, T> {
        self.write_inner(true)
    }

    #[track_caller]
    fn write_inner(&self, nested: bool) -> RwWriteGuard<'_, T> {
        lockdep::before_acquire(self.addr(), LockLevel::AddressSpace, nested);
        let hal = hal::get();
        let mut start = None;
        let mut spins = 0u32;
        let mut timer = SpinTimer::new();
        // 1. Queue behind other writers.
        let t = self.writers.fetch_add(TICKET_ONE, Acquire);
        let ticket = (t >> 16) as u16;
        while self.writers.load(Acquire) as u16 != ticket {
            start.get_or_insert_with(|| self.wait_begin(hal));
            self.wait_turn(hal, &mut spins, &mut timer, || self.writers.fetch_add(0, AcqRel) as u16 != ticket);
        }
        // 2. The readers the last writer kept out go first (bounded).
        if self.waiting.load(Acquire) != 0 {
            let since = hal.cycles();
            let mut turn = 0u32;
            while self.waiting.load(Acquire) != 0
                && if cfg!(loom) {
                    // No clock under loom (the host HAL's `cycles`).
                    turn < LOOM_READERS_TURN_SPINS
                } else {
                    hal.cycles().wrapping_sub(since) < READERS_TURN_CYCLES
                }
            {
                start.get_or_insert_with(|| self.wait_begin(hal));
                turn += 1;
                spins = spins.wrapping_add(1);
                hal.spin_wait(spins);
            }
        }
        // 3. Close the door on new readers (only the ticket holder sets it).
        let s = self.writer.swap(WRITER, AcqRel);
        debug_assert_eq!(s & WRITER, 0, "two writers inside the rwlock");
        // 4. Let the readers inside drain.
        while !self.drained() {
            start.get_or_insert_with(|| self.wait_begin(hal));
            self.wait_turn(hal, &mut spins, &mut timer, || !self.drained_rmw());
        }
        self.record(start);
        lockdep::acquired(self.addr(), LockLevel::AddressSpace, nested);
        RwWriteGuard { lock: self, ticket, _not_send: PhantomData }
    }

    /// Takes the lock shared if no writer waits or holds it right now.
    #[track_caller]
    pub fn try_read(&self) -> Option<RwReadGuard<'_, T>> {
        if self.writer.load(Relaxed) & WRITER != 0 {
            return None;
        }
        lockdep::before_acquire(self.addr(), LockLevel::AddressSpace, false);
        let shard = my_shard();
        if !self.try_enter(shard) {
            return None;
        }
        self.record(None);
        lockdep::acquired(self.addr(), LockLevel::AddressSpace, false);
        Some(RwReadGuard { lock: self, shard, _not_send: PhantomData })
    }

    /// The first turn of a wait: tells the HAL (`Hal::lock_wait_begin`) and
    /// returns the cycle count the wait started at; `record` ends it.
    fn wait_begin(&self, hal: &dyn hal::Hal) -> u64 {
        hal.lock_wait_begin(LockClass::from_u8(self.class));
        hal.cycles()
    }

    fn record(&self, start: Option<u64>) {
        match start {
            None => stats::record(self.class, false, 0),
            Some(s) => {
                let hal = hal::get();
                hal.lock_wait_end();
                stats::record(self.class, true, hal.cycles().wrapping_sub(s))
            }
        }
    }

    /// Readers inside now (a snapshot, for assertions and reports).
    pub fn readers(&self) -> u32 {
        self.readers.iter().map(|r| r.0.load(Relaxed)).sum()
    }

    /// Whether a writer holds or waits for the lock (snapshot).
    pub fn writer_pending(&self) -> bool {
        self.writer.load(Relaxed) & WRITER != 0
    }

    /// The data through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }

    /// Asserts (debug builds) that this CPU holds the lock, shared or not.
    #[track_caller]
    pub fn assert_held(&self) {
        if cfg!(debug_assertions) {
            match lockdep::holds(self.addr()) {
                Some(held) => assert!(held, "mmap_lock not held by this CPU"),
                None => assert!(self.readers() != 0 || self.writer_pending(), "mmap_lock not held"),
            }
        }
    }
}

impl<T> fmt::Debug for RwSpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RwSpinLock").field("readers", &self.readers()).field("writer", &self.writer_pending()).finish()
    }
}

/// Shared access; dropping it releases (Linux `mmap_read_unlock`).
#[must_use = "dropping the guard unlocks at once"]
pub struct RwReadGuard<'a, T> {
    lock: &'a RwSpinLock<T>,
    /// The shard we are counted in (tasks may not migrate, but the count
    /// must go back where it came from regardless).
    shard: u8,
    _not_send: PhantomData<*const ()>,
}

impl<T> Deref for RwReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a reader is inside, so no writer holds the lock and no
        // `&mut T` exists until every reader has left.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> Drop for RwReadGuard<'_, T> {
    fn drop(&mut self) {
        lockdep::released(self.lock.addr());
        self.lock.leave(&self.lock.readers[self.shard as usize].0);
    }
}

/// Exclusive access; dropping it releases (Linux `mmap_write_unlock`).
#[must_use = "dropping the guard unlocks at once"]
pub struct RwWriteGuard<'a, T> {
    lock: &'a RwSpinLock<T>,
    ticket: u16,
    _not_send: PhantomData<*const ()>,
}

impl<T> Deref for RwWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the writer is alone inside (WRITER set, every shard drained).
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for RwWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<'a, T> RwWriteGuard<'a, T> {
    /// Turns the exclusive hold into a shared one without letting another
    /// writer in between (Linux `mmap_write_downgrade`). Readers waiting
    /// behind us enter at once; the next writer queues behind our read hold.
    pub fn downgrade(self) -> RwReadGuard<'a, T> {
        let this = core::mem::ManuallyDrop::new(self);
        // Count ourselves as a reader before opening the door, so the next
        // writer (which may take its ticket as soon as we advance ours)
        // waits for our read hold.
        let shard = my_shard();
        this.lock.readers[shard as usize].0.fetch_add(1, AcqRel);
        this.lock.open_and_pass_on(this.ticket);
        // The lock-order checker keeps the lock as held: same address, same
        // level, only the mode changed.
        RwReadGuard { lock: this.lock, shard, _not_send: PhantomData }
    }
}

impl<T> Drop for RwWriteGuard<'_, T> {
    fn drop(&mut self) {
        lockdep::released(self.lock.addr());
        self.lock.open_and_pass_on(self.ticket);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::vec::Vec;

    use super::*;

    #[test]
    fn readers_share_writers_exclude() {
        let l = RwSpinLock::new(LockClass::Other, 5u32);
        let a = l.read();
        // Another CPU (thread) reads at the same time.
        std::thread::scope(|s| {
            s.spawn(|| {
                let b = l.try_read().expect("readers share");
                assert_eq!((*b, l.readers()), (5, 2));
            });
        });
        assert_eq!(*a, 5);
        drop(a);
        let mut w = l.write();
        *w = 6;
        assert!(l.try_read().is_none(), "a writer excludes readers");
        drop(w);
        assert_eq!(*l.read(), 6);
        assert_eq!((l.readers(), l.writer_pending()), (0, false));
    }

    /// A writer that takes the lock back to back (an `mremap` loop) does
    /// not starve readers: each reader that waited gets in before the next
    /// write hold (module comment, "Readers' turn after a writer"), so three
    /// readers finish 100 reads each within a bounded number of write holds.
    #[test]
    fn back_to_back_writers_do_not_starve_readers() {
        const READS: u64 = 100;
        const MAX_HOLDS: u64 = 20_000;
        let l = Arc::new(RwSpinLock::new(LockClass::Other, 0u64));
        let done = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (l, done) = (l.clone(), done.clone());
                std::thread::spawn(move || {
                    for _ in 0..READS {
                        drop(l.read());
                    }
                    done.fetch_add(1, SeqCst);
                })
            })
            .collect();
        let mut holds = 0;
        while done.load(SeqCst) < 3 && holds < MAX_HOLDS {
            let mut g = l.write();
            *g += 1;
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(20) {
                core::hint::spin_loop();
            }
            drop(g);
            holds += 1;
        }
        let finished = done.load(SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(
            finished, 3,
            "readers starved: {finished} of 3 finished their {READS} reads in {holds} back-to-back write holds"
        );
    }

    #[test]
    fn writers_exclude_each_other_and_readers_see_consistent_pairs() {
        let l = Arc::new(RwSpinLock::new(LockClass::Other, (0u64, 0u64)));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (l, stop) = (l.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(SeqCst) {
                        let g = l.read();
                        assert_eq!(g.0, g.1, "a reader saw a half-done write");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let mut g = l.write();
                        g.0 += 1;
                        core::hint::black_box(&mut *g);
                        g.1 += 1;
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(*l.read(), (4000, 4000));
    }

    /// The point of writer preference: readers that keep the lock busy
    /// without a single gap still let a writer in promptly.
    #[test]
    fn a_writer_is_not_starved_by_overlapping_readers() {
        let l = Arc::new(RwSpinLock::new(LockClass::Other, 0u64));
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        // Four readers whose critical sections overlap: each re-enters right
        // after leaving, so with a reader-preferring lock the count would
        // (almost) never reach zero.
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (l, stop, reads) = (l.clone(), stop.clone(), reads.clone());
                std::thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        let _g = l.read();
                        reads.fetch_add(1, SeqCst);
                        for _ in 0..200 {
                            core::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        while reads.load(SeqCst) < 1000 {
            std::thread::yield_now();
        }
        let t0 = std::time::Instant::now();
        for i in 0..50 {
            *l.write() = i;
        }
        let took = t0.elapsed();
        stop.store(true, SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert!(took < std::time::Duration::from_secs(5), "50 writes took {took:?}");
        assert!(lock_stats_seen());
    }

    fn lock_stats_seen() -> bool {
        crate::lock::lock_stats(LockClass::Other).acquisitions > 0
    }

    #[test]
    fn downgrade_lets_readers_in_and_keeps_writers_out() {
        let l = Arc::new(RwSpinLock::new(LockClass::Other, 0u64));
        let mut w = l.write();
        *w = 7;
        let r = w.downgrade();
        assert_eq!(*r, 7);
        // Another reader gets in while we still hold ours.
        let l2 = l.clone();
        assert_eq!(std::thread::spawn(move || *l2.read()).join().unwrap(), 7);
        // A writer waits for our read hold to end.
        let entered = Arc::new(AtomicBool::new(false));
        let (l3, e3) = (l.clone(), entered.clone());
        let writer = std::thread::spawn(move || {
            *l3.write() = 8;
            e3.store(true, SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!entered.load(SeqCst), "a writer entered during a downgraded hold");
        drop(r);
        writer.join().unwrap();
        assert_eq!(*l.read(), 8);
    }

    /// Halting waiters (module comment): four CPUs that may halt (60 to
    /// 63) take the lock with holds of 200 µs, longer than
    /// `HALT_AFTER_CYCLES` (ns on the host), so each of the three waits
    /// halts: readers behind a writer, writers behind a writer's ticket,
    /// writers behind readers (among them downgraded holds). Every halt must
    /// end with a kick: a lost one fails the halt after `LOST_KICK`.
    #[test]
    fn halted_waiters_are_always_kicked() {
        const ROUNDS: u64 = 40;
        let _cpus = crate::testing::HALTING_TEST.lock().unwrap_or_else(|e| e.into_inner());
        let mode = halting_waiters();
        halt::set_halting_waiters(true);
        let (halts, kicks) = halt::halt_counts();
        let hold = || {
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(200) {
                core::hint::spin_loop();
            }
        };
        let l = Arc::new(RwSpinLock::new(LockClass::Other, (0u64, 0u64)));
        let threads: Vec<_> = (60..64)
            .map(|cpu| {
                let l = l.clone();
                std::thread::spawn(move || {
                    crate::testing::halting_cpu(cpu);
                    for i in 0..ROUNDS {
                        if cpu % 2 == 0 {
                            let mut g = l.write();
                            g.0 += 1;
                            hold();
                            g.1 += 1;
                            if i % 4 == 0 {
                                // A downgraded hold: writers wait for it.
                                let r = g.downgrade();
                                assert_eq!(r.0, r.1);
                                hold();
                            }
                        } else {
                            let g = l.read();
                            assert_eq!(g.0, g.1, "a reader saw a half-done write");
                            hold();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        halt::set_halting_waiters(mode);
        assert_eq!(*l.read(), (2 * ROUNDS, 2 * ROUNDS));
        let (halts_now, kicks_now) = halt::halt_counts();
        assert!(
            halts_now > halts && kicks_now > kicks,
            "no waiter halted or was kicked: {halts_now} halts, {kicks_now} kicks"
        );
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "recursive locking")]
    fn recursive_read_is_caught() {
        let l = RwSpinLock::new(LockClass::Other, ());
        let _a = l.read();
        let _b = l.read();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "lock order violation")]
    fn mmap_lock_under_a_page_table_lock_is_caught() {
        let pt = crate::lock::RawSpinLock::new(LockClass::PageTableLock);
        let l = RwSpinLock::new(LockClass::MmapLock, ());
        let _g = pt.lock(LockLevel::PageTableLock);
        let _r = l.read();
    }
}

/// Loom model of the reader/writer handshake: a reader and a writer (which
/// then downgrades) never overlap a write with a read, in any interleaving.
/// Run with the other models (`mm/src/loom_tests.rs` header).
#[cfg(all(test, loom))]
mod loom_model {
    extern crate std;

    use loom::cell::UnsafeCell as LoomUnsafeCell;
    use loom::sync::Arc;

    use super::*;

    #[test]
    fn loom_rwlock_reader_and_downgrading_writer_exclude() {
        loom::model(|| {
            let l = Arc::new(RwSpinLock::new(LockClass::Other, LoomUnsafeCell::new(0u64)));
            let l2 = l.clone();
            let reader = loom::thread::spawn(move || {
                let g = l2.read();
                // SAFETY: loom's cell; a read hold excludes writers.
                g.with(|v| unsafe { *v })
            });
            let w = l.write();
            // SAFETY: loom's cell; the write hold is exclusive.
            w.with_mut(|v| unsafe { *v = 1 });
            let r = w.downgrade();
            // SAFETY: as for the reader.
            assert_eq!(r.with(|v| unsafe { *v }), 1);
            drop(r);
            let seen = reader.join().unwrap();
            assert!(seen == 0 || seen == 1);
        });
    }

    /// Halting waiters (module comment): three CPUs that halt at their
    /// first lost turn (the host HAL under loom), one writing and
    /// downgrading, one reading, one writing. Every wait of the lock can
    /// halt here (a reader behind a writer, a writer behind a ticket, a
    /// writer behind readers), and a halt nobody kicks is a deadlock loom
    /// reports. The execution's halt counts show that waiters halted.
    #[test]
    fn loom_rwlock_halted_waiters_are_always_kicked() {
        let (halts, kicks) = halt::halt_counts();
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(2);
        }
        b.check(|| {
            halt::set_halting_waiters(true);
            let l = Arc::new(RwSpinLock::new(LockClass::Other, LoomUnsafeCell::new(0u64)));
            let (l1, l2) = (l.clone(), l.clone());
            let reader = loom::thread::spawn(move || {
                crate::testing::halting_cpu(1);
                let g = l1.read();
                // SAFETY: loom's cell; a read hold excludes writers.
                g.with(|v| unsafe { *v })
            });
            let writer = loom::thread::spawn(move || {
                crate::testing::halting_cpu(2);
                let w = l2.write();
                // SAFETY: loom's cell; the write hold is exclusive.
                w.with_mut(|v| unsafe { *v += 10 });
            });
            crate::testing::halting_cpu(0);
            let w = l.write();
            // SAFETY: as above.
            w.with_mut(|v| unsafe { *v += 1 });
            let r = w.downgrade();
            // SAFETY: loom's cell; a read hold excludes writers.
            let mine = r.with(|v| unsafe { *v });
            assert!(mine == 1 || mine == 11);
            drop(r);
            let seen = reader.join().unwrap();
            writer.join().unwrap();
            assert!([0, 1, 10, 11].contains(&seen));
            // SAFETY: every thread is joined.
            assert_eq!(l.read().with(|v| unsafe { *v }), 11);
        });
        let (halts_now, kicks_now) = halt::halt_counts();
        assert!(halts_now > halts && kicks_now > kicks, "no waiter halted or was kicked in any execution");
    }
}
