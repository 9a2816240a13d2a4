//! The hand-written spinlock: a ticket lock, taken by bounded test-and-set
//! under a hypervisor.
//!
//! A ticket lock is FIFO-fair: under a fault storm every CPU waiting on a PTE
//! lock gets it in arrival order, so no CPU starves and the spin-time
//! statistics measure queueing rather than luck.
//!
//! Two 16-bit halves: `next`, the next ticket to hand out, and `owner`, the
//! ticket now served. `lock` takes a ticket with one `fetch_add(1)` on `next`
//! and spins until `owner` equals it. Only the holder writes `owner`, and it
//! knows the value (its own ticket), so `unlock` is a plain release store of
//! ticket + 1, not a locked instruction: one locked instruction per
//! lock/unlock pair instead of two. (Under QEMU's parallel TCG a locked
//! instruction is a helper call, several times the cost of a store, and a
//! fault takes two locks.) Both halves wrap at 16 bits, which is fine while
//! fewer than 65536 CPUs wait.
//!
//! # Under a hypervisor
//!
//! A FIFO lock is at its worst when the host deschedules a vCPU: the lock is
//! handed to the next ticket even when that vCPU is not running, and every
//! CPU behind it waits for the host to run it again (lock-*waiter*
//! preemption, on top of lock-holder preemption). Linux, running as a guest
//! without paravirtual spinlocks, gives up fairness for exactly this reason
//! and takes its queued spinlock with test-and-set (`virt_spin_lock`,
//! arch/x86/include/asm/qspinlock.h). [`set_virt_spinlocks`] does the same
//! here: a CPU takes the lock only when it is free right now (`next ==
//! owner`: one compare-exchange that hands it the ticket being served) and
//! otherwise spins on plain loads; whoever runs when the lock is released
//! gets it. The words and `unlock` are the same in both modes, so a CPU in
//! one mode never breaks a CPU in the other.
//!
//! Plain test-and-set is unfair without bound: under TCG with four vCPUs on
//! two host cores one CPU of a storm on the single `page_table_lock` waited
//! over 5 s for it (the lockup watchdog's limit). So a test-and-set waiter
//! that has competed for [`STARVE_CYCLES`] stops competing and takes a FIFO
//! ticket instead: from then on `next != owner` until its ticket is served,
//! so no newcomer can take the lock by compare-exchange, and it is served
//! after the holders queued before it. Under contention that is short
//! (which is all of it on bare metal) the lock is plain test-and-set; only
//! a waiter the others have starved for about a millisecond, about one
//! host scheduling slice, pays for fairness with the FIFO's exposure to a
//! descheduled vCPU. The kernel takes this mode when CPUID says it runs
//! under a hypervisor, and FIFO tickets on bare metal; `spinlock=tas` or
//! `spinlock=ticket` on its command line forces one.
//!
//! # Halting waiters
//!
//! Test-and-set stops a descheduled vCPU from holding up a queue, but a
//! waiter still burns its host core while the holder waits for one. So a
//! waiter that has spun for [`HALT_AFTER_CYCLES`](super::HALT_AFTER_CYCLES)
//! with interrupts on halts its vCPU and the unlocker kicks it (the
//! handshake and why no wake-up is lost: `lock/halt.rs`). Here the flag
//! that says "a waiter may be halted" is the `HALTED` bit of the `owner`
//! word, the word the wait depends on: the waiter sets it with one
//! `fetch_or`, whose old value is the ticket served at that moment (it
//! halts only if the lock was still not its to take then), and the unlock
//! releases the lock with one `swap` of the word (the next ticket, `HALTED`
//! clear), which tells it whether to kick. The unlock never touches the
//! lock after its `swap`: the next holder may free it at once (a PTE
//! table's lock shares its word with the page's `private` once the table
//! is freed). A waiter whose bit an unlock just cleared sets it again on
//! its next halt. The cost: an unlock is an exchange instead of a store,
//! and only with halting on (`set_halting_waiters`, the kernel's
//! `spinlock=auto` under a hypervisor). The loom model
//! `loom_halted_waiters_are_always_kicked` checks the handshake in every
//! interleaving, with halts that only a kick ends.
//!
//! Lock plus class tag fit in 8 bytes, so by default `ptl` fits in a `usize` and
//! lives inline in the page descriptor. With the `debug-ptlock` feature the
//! lock also records its owner CPU and the `#[track_caller]` site that took it;
//! it then no longer fits and `ptl` becomes a pointer (see `ptlock.rs`).

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
#[cfg(feature = "debug-ptlock")]
use core::{panic::Location, sync::atomic::AtomicPtr};

use super::halt::{self, SpinTimer, halting_waiters};
use super::{LockClass, LockLevel, lockdep, stats};
use crate::hal;
use crate::sync::{AtomicU16, AtomicU32};

/// How long, in TSC cycles, a test-and-set waiter competes for the lock
/// before it queues for a FIFO ticket (module comment): about a millisecond,
/// a host scheduling slice, so queueing happens only when the host's
/// descheduling (not the lock's traffic) starved the waiter.
pub const STARVE_CYCLES: u64 = 1 << 21;

/// The loom models' bound, in spins (their HAL has no clock): small, so
/// they explore the hand-over from competing to queueing.
const LOOM_STARVE_SPINS: u32 = 2;

/// The `owner` word's flag: a waiter may be halted on this lock.
const HALTED: u32 = 1 << 16;

/// Test-and-set instead of FIFO tickets (module comment). Set once at boot.
static VIRT_SPINLOCKS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Chooses test-and-set (`true`, for a guest whose vCPUs the host may
/// deschedule) or FIFO tickets (`false`, the default) for every spinlock
/// from now on (module comment).
pub fn set_virt_spinlocks(on: bool) {
    VIRT_SPINLOCKS.store(on, Relaxed);
}

/// Whether spinlocks are taken with test-and-set.
pub fn virt_spinlocks() -> bool {
    VIRT_SPINLOCKS.load(Relaxed)
}

/// A ticket spinlock that protects no Rust data: it guards memory the hardware
/// also reads (page-table entries), so it is a bare lock, like `spinlock_t`.
pub struct RawSpinLock {
    /// Bits 0..16: the ticket now served, written only by the holder. Bit
    /// `HALTED`: some waiter may be halted on this lock, so its unlock must
    /// kick (module comment, "Halting waiters"). One word, so that the
    /// unlock releases and learns of halted waiters in one exchange and
    /// never touches the lock again: once released, the lock's memory may
    /// be freed and reused at once (a page table's `ptl` shares its word
    /// with the page's `private`).
    owner: AtomicU32,
    /// The next ticket to hand out (see the module comment).
    next: AtomicU16,
    /// `LockClass as u8`, for statistics.
    class: u8,
    /// Debug lock only: the CPU holding the lock, `u32::MAX` when free.
    #[cfg(feature = "debug-ptlock")]
    owner_cpu: core::sync::atomic::AtomicU32,
    /// Debug lock only: where the holder took it.
    #[cfg(feature = "debug-ptlock")]
    owner_site: AtomicPtr<Location<'static>>,
}

impl RawSpinLock {
    /// A free lock of the given class.
    #[cfg(not(loom))]
    pub const fn new(class: LockClass) -> Self {
        Self {
            owner: AtomicU32::new(0),
            next: AtomicU16::new(0),
            class: class as u8,
            #[cfg(feature = "debug-ptlock")]
            owner_cpu: core::sync::atomic::AtomicU32::new(u32::MAX),
            #[cfg(feature = "debug-ptlock")]
            owner_site: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// A free lock of the given class (loom atomics cannot be built in const).
    #[cfg(loom)]
    pub fn new(class: LockClass) -> Self {
        Self {
            owner: AtomicU32::new(0),
            next: AtomicU16::new(0),
            class: class as u8,
            #[cfg(feature = "debug-ptlock")]
            owner_cpu: core::sync::atomic::AtomicU32::new(u32::MAX),
            #[cfg(feature = "debug-ptlock")]
            owner_site: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The lock's statistics class.
    pub fn class(&self) -> LockClass {
        LockClass::from_u8(self.class)
    }

    /// Takes the lock at `level` of the lock order, spinning until it is ours.
    #[track_caller]
    #[inline]
    pub fn lock(&self, level: LockLevel) -> RawSpinGuard<'_> {
        self.lock_inner(level, false, virt_spinlocks())
    }

    /// Takes a second lock of a level already held (Linux
    /// `spin_lock_nested`). The caller documents why its order is safe.
    #[track_caller]
    pub fn lock_nested(&self, level: LockLevel) -> RawSpinGuard<'_> {
        self.lock_inner(level, true, virt_spinlocks())
    }

    #[track_caller]
    #[inline]
    fn lock_inner(&self, level: LockLevel, nested: bool, test_and_set: bool) -> RawSpinGuard<'_> {
        let hal = hal::get();
        lockdep::before_acquire(self.addr(), level, nested);
        if test_and_set {
            let ticket = self.lock_test_and_set(hal);
            return self.acquired(level, ticket, nested);
        }
        let ticket = self.next.fetch_add(1, Acquire);
        if self.serving(Acquire) == ticket {
            stats::record(self.class, false, 0);
        } else {
            hal.lock_wait_begin(self.class());
            let start = hal.cycles();
            let mut spins = 0u32;
            while self.serving(Acquire) != ticket {
                spins = spins.wrapping_add(1);
                hal.spin_wait(spins);
            }
            hal.lock_wait_end();
            stats::record(self.class, true, hal.cycles().wrapping_sub(start));
        }
        self.acquired(level, ticket, nested)
    }

    /// Linux `virt_spin_lock`: take the ticket being served when the lock is
    /// free (one compare-exchange), else spin on loads until it is; after
    /// [`STARVE_CYCLES`] of losing, queue for a FIFO ticket (module comment).
    #[inline]
    fn lock_test_and_set(&self, hal: &dyn hal::Hal) -> u16 {
        let mut start = None;
        let mut spins = 0u32;
        // When this wait stops spinning and halts (module comment).
        let mut timer = SpinTimer::new();
        loop {
            if let Some(s) = start
                && if cfg!(loom) {
                    // No clock under loom: time would make the model's
                    // choices differ between its executions.
                    spins >= LOOM_STARVE_SPINS
                } else {
                    hal.cycles().wrapping_sub(s) >= STARVE_CYCLES
                }
            {
                // Starved: stop competing. Our ticket makes `next != owner`
                // until it is served, which shuts the compare-exchange below
                // to every newcomer.
                let ticket = self.next.fetch_add(1, Acquire);
                while self.serving(Acquire) != ticket {
                    spins = spins.wrapping_add(1);
                    hal.spin_wait(spins);
                    if timer.should_halt(hal) {
                        self.halt_while(hal, |serving| serving != ticket);
                    }
                }
                hal.lock_wait_end();
                stats::record(self.class, true, hal.cycles().wrapping_sub(s));
                return ticket;
            }
            let owner = self.serving(Acquire);
            if self.next.load(Relaxed) == owner
                && self.next.compare_exchange(owner, owner.wrapping_add(1), Acquire, Relaxed).is_ok()
            {
                match start {
                    None => stats::record(self.class, false, 0),
                    Some(s) => {
                        hal.lock_wait_end();
                        stats::record(self.class, true, hal.cycles().wrapping_sub(s))
                    }
                }
                return owner;
            }
            start.get_or_insert_with(|| {
                hal.lock_wait_begin(self.class());
                hal.cycles()
            });
            spins = spins.wrapping_add(1);
            hal.spin_wait(spins);
            if timer.should_halt(hal) {
                self.halt_while(hal, |serving| self.next.load(SeqCst) != serving);
            }
        }
    }

    /// Halts this CPU while `taken(serving)` says the lock is not ours to
    /// take, until an unlocker kicks it (or any interrupt arrives). The
    /// handshake with [`Self::unlock`] is in the module comment: the slot is
    /// published first, then `HALTED` is set with one read-modify-write of
    /// the `owner` word, whose old value says whether the lock was released
    /// meanwhile; an unlock that comes later in that word's order sees the
    /// flag.
    #[cold]
    fn halt_while(&self, hal: &dyn hal::Hal, taken: impl Fn(u16) -> bool) {
        halt::halt_while(hal, self.addr(), || taken(self.owner.fetch_or(HALTED, SeqCst) as u16));
    }

    /// The ticket now served.
    #[inline]
    fn serving(&self, order: core::sync::atomic::Ordering) -> u16 {
        self.owner.load(order) as u16
    }

    /// Takes the lock if it is free right now.
    #[track_caller]
    pub fn try_lock(&self, level: LockLevel) -> Option<RawSpinGuard<'_>> {
        // Free means `next == owner`. If the compare-exchange still finds
        // `next` equal to the `owner` we loaded, every ticket handed out has
        // been served, so `owner` has not moved and the ticket is ours at
        // once. The acquire load of `owner` pairs with the last unlock.
        let owner = self.serving(Acquire);
        if self.next.load(Relaxed) != owner {
            return None;
        }
        lockdep::before_acquire(self.addr(), level, false);
        self.next.compare_exchange(owner, owner.wrapping_add(1), Acquire, Relaxed).ok()?;
        stats::record(self.class, false, 0);
        Some(self.acquired(level, owner, false))
    }

    #[track_caller]
    fn acquired(&self, level: LockLevel, ticket: u16, nested: bool) -> RawSpinGuard<'_> {
        lockdep::acquired(self.addr(), level, nested);
        #[cfg(feature = "debug-ptlock")]
        {
            self.owner_cpu.store(hal::cpu_id() as u32, Relaxed);
            self.owner_site.store(Location::caller() as *const _ as *mut _, Relaxed);
        }
        // `owner` is our ticket now; keep it so unlock needs no load.
        RawSpinGuard { lock: self, ticket, level, _not_send: PhantomData }
    }

    fn unlock(&self, ticket: u16) {
        #[cfg(feature = "debug-ptlock")]
        {
            self.owner_cpu.store(u32::MAX, Relaxed);
            self.owner_site.store(core::ptr::null_mut(), Relaxed);
        }
        lockdep::released(self.addr());
        let next = u32::from(ticket.wrapping_add(1));
        if !halting_waiters() {
            // No waiter halts: a plain store (one locked instruction per
            // lock/unlock pair, module comment).
            self.owner.store(next, Release);
        } else if self.owner.swap(next, AcqRel) & HALTED != 0 {
            // Released: from here on only the lock's address is used, never
            // its memory. Acquire pairs with the waiter's `fetch_or`, so its
            // slot is seen.
            halt::kick_halted(self.addr());
        }
    }

    /// Whether some CPU holds the lock (a snapshot: only meaningful to assert
    /// that *we* hold it).
    pub fn is_locked(&self) -> bool {
        self.serving(Relaxed) != self.next.load(Relaxed)
    }

    /// Debug lock: the CPU that holds the lock.
    #[cfg(feature = "debug-ptlock")]
    pub fn owner_cpu(&self) -> Option<u32> {
        match self.owner_cpu.load(Relaxed) {
            u32::MAX => None,
            c => Some(c),
        }
    }

    /// Debug lock: the source location that took the lock.
    #[cfg(feature = "debug-ptlock")]
    pub fn owner_site(&self) -> Option<&'static Location<'static>> {
        let p = self.owner_site.load(Relaxed);
        // SAFETY: the pointer is null or came from `Location::caller()`, which
        // is a `&'static Location`.
        unsafe { p.cast_const().as_ref() }
    }

    /// Asserts (debug builds) that the executing CPU holds this lock: through the
    /// lock-order checker where the HAL provides one, else that it is held at all.
    #[track_caller]
    #[inline]
    pub fn assert_held(&self) {
        if cfg!(debug_assertions) {
            match lockdep::holds(self.addr()) {
                Some(held) => assert!(held, "{} lock {:p} not held by this CPU", self.class().name(), self),
                None => assert!(self.is_locked(), "{} lock {:p} not held", self.class().name(), self),
            }
            #[cfg(feature = "debug-ptlock")]
            assert_eq!(self.owner_cpu(), Some(hal::cpu_id() as u32), "lock held by another CPU");
        }
    }

    fn addr(&self) -> usize {
        self as *const Self as usize
    }
}

impl fmt::Debug for RawSpinLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSpinLock").field("class", &self.class().name()).field("locked", &self.is_locked()).finish()
    }
}

/// Proof that a [`RawSpinLock`] is held; dropping it unlocks. Not `Send`: a
/// spinlock is released on the CPU that took it.
#[must_use = "dropping the guard unlocks at once"]
pub struct RawSpinGuard<'a> {
    lock: &'a RawSpinLock,
    ticket: u16,
    level: LockLevel,
    _not_send: PhantomData<*const ()>,
}

impl<'a> RawSpinGuard<'a> {
    /// The lock this guard holds (compare with `core::ptr::eq` for identity).
    /// Borrowed from the guard: the lock may belong to a table that is freed
    /// once it is unlocked and its read-side section ends.
    pub fn lock(&self) -> &RawSpinLock {
        self.lock
    }
    /// The level it was taken at.
    pub fn level(&self) -> LockLevel {
        self.level
    }
}

impl Drop for RawSpinGuard<'_> {
    fn drop(&mut self) {
        self.lock.unlock(self.ticket);
    }
}

impl fmt::Debug for RawSpinGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawSpinGuard({:p}, {:?})", self.lock, self.level)
    }
}

/// A spinlock that owns the data it protects.
pub struct SpinLock<T> {
    raw: RawSpinLock,
    level: u8,
    data: UnsafeCell<T>,
}

// SAFETY: the lock serialises all access to `data`, so sharing the lock between
// threads only ever moves `T` between them, which `T: Send` allows.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: moving the lock moves `T`.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A free lock of `class`, taken at `level` of the lock order.
    #[cfg(not(loom))]
    pub const fn new(class: LockClass, level: LockLevel, data: T) -> Self {
        Self { raw: RawSpinLock::new(class), level: level as u8, data: UnsafeCell::new(data) }
    }

    /// A free lock of `class`, taken at `level` of the lock order.
    #[cfg(loom)]
    pub fn new(class: LockClass, level: LockLevel, data: T) -> Self {
        Self { raw: RawSpinLock::new(class), level: level as u8, data: UnsafeCell::new(data) }
    }

    /// Takes the lock.
    #[track_caller]
    #[inline]
    pub fn lock(&self) -> SpinLockGuard<'_, T> {
        let raw = self.raw.lock(LockLevel::from_u8(self.level));
        SpinLockGuard { raw, data: &self.data }
    }

    /// [`SpinLock::lock`] in the given mode regardless of the global one
    /// (`test_and_set`: as `set_virt_spinlocks(true)`), for the loom model
    /// that mixes both: a model must not flip the process-wide mode under
    /// the models running beside it (and a host test must not flip it under
    /// the tests beside it).
    #[cfg(test)]
    pub(crate) fn lock_in_mode(&self, test_and_set: bool) -> SpinLockGuard<'_, T> {
        let raw = self.raw.lock_inner(LockLevel::from_u8(self.level), false, test_and_set);
        SpinLockGuard { raw, data: &self.data }
    }

    /// Takes the lock if free.
    #[track_caller]
    pub fn try_lock(&self) -> Option<SpinLockGuard<'_, T>> {
        let raw = self.raw.try_lock(LockLevel::from_u8(self.level))?;
        Some(SpinLockGuard { raw, data: &self.data })
    }

    /// The data, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Access to a [`SpinLock`]'s data; dropping it unlocks.
#[must_use = "dropping the guard unlocks at once"]
pub struct SpinLockGuard<'a, T> {
    raw: RawSpinGuard<'a>,
    data: &'a UnsafeCell<T>,
}

impl<T> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        let _ = &self.raw;
        // SAFETY: `raw` proves the lock is held, so no other reference to the
        // data exists until this guard drops.
        unsafe { &*self.data.get() }
    }
}

impl<T> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access.
        unsafe { &mut *self.data.get() }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::lock::{halt_counts, set_halting_waiters};

    /// Halting waiters: four threads, as CPUs 60 to 63 that may halt, take
    /// a test-and-set lock whose holder keeps it for 200 µs at a time, longer
    /// than `HALT_AFTER_CYCLES` (ns on the host): waiters halt, unlocks kick
    /// them, and a lost wake-up fails the halt after `LOST_KICK`.
    #[test]
    fn halted_waiters_are_always_kicked() {
        let _cpus = crate::testing::HALTING_TEST.lock().unwrap_or_else(|e| e.into_inner());
        set_halting_waiters(true);
        let (halts, kicks) = halt_counts();
        let l = Arc::new(SpinLock::new(LockClass::Other, LockLevel::Untracked, 0u64));
        let threads: std::vec::Vec<_> = (60..64)
            .map(|cpu| {
                let l = l.clone();
                std::thread::spawn(move || {
                    crate::testing::halting_cpu(cpu);
                    for _ in 0..100 {
                        let mut g = l.lock_in_mode(true);
                        *g += 1;
                        let t = std::time::Instant::now();
                        while t.elapsed() < std::time::Duration::from_micros(200) {
                            core::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 400);
        let (halts_now, kicks_now) = halt_counts();
        assert!(
            halts_now > halts && kicks_now > kicks,
            "no waiter halted or was kicked: {halts_now} halts, {kicks_now} kicks"
        );
    }

    #[test]
    fn tickets_wrap_at_16_bits() {
        let l = RawSpinLock::new(LockClass::Other);
        for _ in 0..70_000 {
            let g = l.lock(LockLevel::Untracked);
            assert!(l.is_locked());
            drop(g);
            assert!(!l.is_locked());
        }
        // A wrap happened (70000 > 65536); the lock still works and is free.
        assert!(l.try_lock(LockLevel::Untracked).is_some());
    }

    #[test]
    fn try_lock_fails_while_held() {
        let l = RawSpinLock::new(LockClass::Other);
        let g = l.lock(LockLevel::Untracked);
        assert!(l.try_lock(LockLevel::Untracked).is_none());
        drop(g);
        assert!(l.try_lock(LockLevel::Untracked).is_some());
    }

    #[test]
    fn mutual_exclusion_under_threads() {
        let l = Arc::new(SpinLock::new(LockClass::Other, LockLevel::Untracked, 0u64));
        let threads: std::vec::Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        // Non-atomic read-modify-write: loses updates unless
                        // the lock excludes.
                        let mut g = l.lock();
                        let v = *g;
                        core::hint::black_box(());
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 80_000);
    }

    #[test]
    fn contention_is_counted() {
        let l = Arc::new(RawSpinLock::new(LockClass::Other));
        let before = crate::lock::lock_stats(LockClass::Other);
        let g = l.lock(LockLevel::Untracked);
        let l2 = l.clone();
        let waiter = std::thread::spawn(move || {
            let _g = l2.lock(LockLevel::Untracked);
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(g);
        waiter.join().unwrap();
        let after = crate::lock::lock_stats(LockClass::Other);
        assert!(after.acquisitions >= before.acquisitions + 2);
        assert!(after.contended > before.contended);
        assert!(after.spin_cycles > before.spin_cycles);
    }

    #[cfg(feature = "debug-ptlock")]
    #[test]
    fn debug_lock_records_owner_and_site() {
        let l = RawSpinLock::new(LockClass::Other);
        assert!(l.owner_cpu().is_none());
        let line = line!() + 1;
        let g = l.lock(LockLevel::Untracked);
        assert_eq!(l.owner_cpu(), Some(crate::hal::cpu_id() as u32));
        let site = l.owner_site().unwrap();
        assert_eq!((site.file(), site.line()), (file!(), line));
        drop(g);
        assert!(l.owner_site().is_none());
        assert!(core::mem::size_of::<RawSpinLock>() > core::mem::size_of::<usize>());
    }

    #[cfg(not(feature = "debug-ptlock"))]
    #[test]
    fn plain_lock_fits_in_a_usize() {
        assert!(core::mem::size_of::<RawSpinLock>() <= core::mem::size_of::<usize>());
    }
}
