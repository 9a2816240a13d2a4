//! The run-time lock-order checker of debug builds.
//!
//! Each CPU keeps the set of locks it holds, with the level each was taken at
//! and its nesting subclass (storage provided by the HAL: per-CPU in the
//! kernel, per-thread on the host). Before a lock is taken we check that every
//! held lock comes earlier in the order (see [`super`]): a lower level, or
//! the same level and a lower subclass. A plain acquisition is subclass 0; a
//! second lock of a level taken with `lock_nested` (Linux
//! `spin_lock_nested(lock, SINGLE_DEPTH_NESTING)`: fork copying a parent's
//! PTE table into a child's, mremap moving entries between two tables) is
//! subclass 1, so the *outer* lock must be the plain one: taking a plain
//! PTE lock while holding a nested one is reported as a wrong-order nesting.
//! We also check that the lock is not already ours (a self-deadlock, e.g.
//! `pte_offset_map_lock` under `pmd_lock` when both are `mm.page_table_lock`),
//! and afterwards we record it. In release builds every function here
//! compiles to nothing.
//!
//! Each entry also keeps the `#[track_caller]` site that took the lock, and
//! the CPU notes the lock it is about to take (from the check until the
//! acquisition): the kernel's lockup watchdog reads both from a stopped CPU
//! to say which lock a spinning CPU waits for, who holds it, and where the
//! holder took it ([`LockdepCpu::acquiring`], [`LockdepCpu::held`]).
//!
//! Only the owning CPU writes its [`LockdepCpu`], so relaxed atomics suffice:
//! they are used for interior mutability without `unsafe`, not for ordering.
//! (Other CPUs read them only as a diagnosis, once the owner has stopped.)

use core::panic::Location;
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU8, AtomicUsize};

use super::LockLevel;

/// How many locks one CPU may hold at once (the deepest legal nest is six).
pub const MAX_HELD: usize = 16;

/// One CPU's held-lock set.
pub struct LockdepCpu {
    depth: AtomicUsize,
    addr: [AtomicUsize; MAX_HELD],
    level: [AtomicU8; MAX_HELD],
    /// Nesting subclass: 0 plain, 1 `lock_nested`.
    sub: [AtomicU8; MAX_HELD],
    /// Where each held lock was taken (a `&'static Location`, as an address).
    site: [AtomicUsize; MAX_HELD],
    /// The lock this CPU checked last and has not recorded as taken yet: while
    /// it spins for one, that lock (0: none).
    acquiring: AtomicUsize,
    /// The level `acquiring` is being taken at.
    acquiring_level: AtomicU8,
    /// Where `acquiring` is being taken.
    acquiring_site: AtomicUsize,
}

/// A lock a CPU holds ([`LockdepCpu::held`]) or is taking
/// ([`LockdepCpu::acquiring`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The lock's address.
    pub addr: usize,
    /// The level it was taken at.
    pub level: LockLevel,
    /// Where it was taken.
    pub site: Option<&'static Location<'static>>,
}

fn site_addr(site: &'static Location<'static>) -> usize {
    site as *const Location<'static> as usize
}

fn site_from(addr: usize) -> Option<&'static Location<'static>> {
    // SAFETY: a nonzero value was stored by `site_addr` from a `&'static
    // Location` (the only writer of these words), so it is that reference.
    (addr != 0).then(|| unsafe { &*(addr as *const Location<'static>) })
}

impl LockdepCpu {
    /// An empty set.
    pub const fn new() -> Self {
        Self {
            depth: AtomicUsize::new(0),
            addr: [const { AtomicUsize::new(0) }; MAX_HELD],
            level: [const { AtomicU8::new(0) }; MAX_HELD],
            sub: [const { AtomicU8::new(0) }; MAX_HELD],
            site: [const { AtomicUsize::new(0) }; MAX_HELD],
            acquiring: AtomicUsize::new(0),
            acquiring_level: AtomicU8::new(0),
            acquiring_site: AtomicUsize::new(0),
        }
    }

    /// The lock this CPU is taking (checked, not yet acquired: while it
    /// spins, the lock it waits for) and where, if any. A `try_lock` that
    /// lost its compare-exchange leaves its lock here until the next
    /// acquisition: read it only while the CPU is known to be waiting.
    pub fn acquiring(&self) -> Option<HeldLock> {
        let addr = self.acquiring.load(Relaxed);
        (addr != 0).then(|| HeldLock {
            addr,
            level: LockLevel::from_u8(self.acquiring_level.load(Relaxed)),
            site: site_from(self.acquiring_site.load(Relaxed)),
        })
    }

    /// The locks this CPU holds, oldest first.
    pub fn held(&self) -> impl Iterator<Item = HeldLock> + '_ {
        (0..self.depth().min(MAX_HELD)).map(|i| HeldLock {
            addr: self.addr[i].load(Relaxed),
            level: LockLevel::from_u8(self.level[i].load(Relaxed)),
            site: site_from(self.site[i].load(Relaxed)),
        })
    }

    /// Number of locks held.
    pub fn depth(&self) -> usize {
        self.depth.load(Relaxed)
    }

    #[track_caller]
    fn check(&self, addr: usize, level: LockLevel, nested: bool) {
        self.acquiring.store(addr, Relaxed);
        self.acquiring_level.store(level as u8, Relaxed);
        self.acquiring_site.store(site_addr(Location::caller()), Relaxed);
        for i in 0..self.depth() {
            let held = self.addr[i].load(Relaxed);
            let held_level = LockLevel::from_u8(self.level[i].load(Relaxed));
            assert!(held != addr, "lockdep: recursive locking of lock {addr:#x} at {level:?}");
            if held_level == LockLevel::Untracked {
                continue;
            }
            let held_sub = self.sub[i].load(Relaxed);
            let sub = nested as u8;
            assert!(
                held_level < level || (held_level == level && held_sub < sub),
                "lockdep: lock order violation: taking {level:?} lock {addr:#x} (subclass {sub}) while holding \
                 {held_level:?} lock {held:#x} (subclass {held_sub})"
            );
        }
    }

    #[track_caller]
    fn push(&self, addr: usize, level: LockLevel, nested: bool) {
        let d = self.depth();
        assert!(d < MAX_HELD, "lockdep: more than {MAX_HELD} locks held");
        self.addr[d].store(addr, Relaxed);
        self.level[d].store(level as u8, Relaxed);
        self.sub[d].store(nested as u8, Relaxed);
        self.site[d].store(site_addr(Location::caller()), Relaxed);
        self.depth.store(d + 1, Relaxed);
        self.acquiring.store(0, Relaxed);
    }

    fn remove(&self, addr: usize) {
        let d = self.depth();
        // Search from the top: releases are usually LIFO, but need not be.
        if let Some(i) = (0..d).rev().find(|&i| self.addr[i].load(Relaxed) == addr) {
            for j in i..d - 1 {
                self.addr[j].store(self.addr[j + 1].load(Relaxed), Relaxed);
                self.level[j].store(self.level[j + 1].load(Relaxed), Relaxed);
                self.sub[j].store(self.sub[j + 1].load(Relaxed), Relaxed);
                self.site[j].store(self.site[j + 1].load(Relaxed), Relaxed);
            }
            self.depth.store(d - 1, Relaxed);
        }
    }

    fn contains(&self, addr: usize) -> bool {
        (0..self.depth()).any(|i| self.addr[i].load(Relaxed) == addr)
    }
}

impl Default for LockdepCpu {
    fn default() -> Self {
        Self::new()
    }
}

const ACTIVE: bool = cfg!(all(debug_assertions, not(loom)));

#[inline]
fn cpu_state() -> Option<&'static LockdepCpu> {
    if ACTIVE { crate::hal::get().lockdep() } else { None }
}

/// Checks an acquisition of `addr` at `level` before it spins.
#[track_caller]
#[inline]
pub(crate) fn before_acquire(addr: usize, level: LockLevel, nested: bool) {
    if let Some(c) = cpu_state() {
        c.check(addr, level, nested);
    }
}

/// Records that `addr` is now held (`nested`: taken with `lock_nested`).
#[track_caller]
#[inline]
pub(crate) fn acquired(addr: usize, level: LockLevel, nested: bool) {
    if let Some(c) = cpu_state() {
        c.push(addr, level, nested);
    }
}

/// Records that `addr` was released.
#[inline]
pub(crate) fn released(addr: usize) {
    if let Some(c) = cpu_state() {
        c.remove(addr);
    }
}

/// Whether this CPU holds `addr`; `None` when the checker is off.
pub(crate) fn holds(addr: usize) -> Option<bool> {
    cpu_state().map(|c| c.contains(addr))
}

/// Locks held by the executing CPU (0 when the checker is off). Tests use it to
/// prove that a helper released everything it took.
pub fn held_locks() -> usize {
    cpu_state().map_or(0, |c| c.depth())
}

#[cfg(all(test, debug_assertions, not(loom)))]
mod tests {
    use super::*;
    use crate::lock::{LockClass, RawSpinLock};

    #[test]
    fn in_order_nesting_is_fine_and_tracked() {
        let a = RawSpinLock::new(LockClass::PageTableLock);
        let b = RawSpinLock::new(LockClass::PmdLock);
        let c = RawSpinLock::new(LockClass::PteLock);
        let ga = a.lock(LockLevel::PageTableLock);
        let gb = b.lock(LockLevel::Pmd);
        let gc = c.lock(LockLevel::Pte);
        assert_eq!(held_locks(), 3);
        drop(gb); // out-of-order release is allowed
        drop(gc);
        drop(ga);
        assert_eq!(held_locks(), 0);
    }

    #[test]
    #[should_panic(expected = "lock order violation")]
    fn pte_then_pmd_panics() {
        let pte = RawSpinLock::new(LockClass::PteLock);
        let pmd = RawSpinLock::new(LockClass::PmdLock);
        let _g = pte.lock(LockLevel::Pte);
        let _h = pmd.lock(LockLevel::Pmd);
    }

    #[test]
    #[should_panic(expected = "lock order violation")]
    fn two_pte_locks_without_nested_panics() {
        let a = RawSpinLock::new(LockClass::PteLock);
        let b = RawSpinLock::new(LockClass::PteLock);
        let _g = a.lock(LockLevel::Pte);
        let _h = b.lock(LockLevel::Pte);
    }

    #[test]
    fn nested_same_level_is_allowed() {
        let a = RawSpinLock::new(LockClass::PteLock);
        let b = RawSpinLock::new(LockClass::PteLock);
        let _g = a.lock(LockLevel::Pte);
        let _h = b.lock_nested(LockLevel::Pte);
        assert_eq!(held_locks(), 2);
    }

    /// The nested lock is the inner one: a plain PTE lock taken while a
    /// nested one is held (the two tables' locks in the wrong order, as if
    /// fork took the parent's first) is a wrong-order nesting.
    #[test]
    #[should_panic(expected = "lock order violation")]
    fn a_plain_lock_inside_a_nested_one_of_its_level_panics() {
        let child = RawSpinLock::new(LockClass::PteLock);
        let parent = RawSpinLock::new(LockClass::PteLock);
        let _p = parent.lock_nested(LockLevel::Pte);
        let _c = child.lock(LockLevel::Pte);
    }

    /// Two nested locks of one level: only one level of nesting exists.
    #[test]
    #[should_panic(expected = "lock order violation")]
    fn two_nested_locks_of_one_level_panic() {
        let (a, b, c) = (
            RawSpinLock::new(LockClass::PteLock),
            RawSpinLock::new(LockClass::PteLock),
            RawSpinLock::new(LockClass::PteLock),
        );
        let _g = a.lock(LockLevel::Pte);
        let _h = b.lock_nested(LockLevel::Pte);
        let _i = c.lock_nested(LockLevel::Pte);
    }

    #[test]
    #[should_panic(expected = "recursive locking")]
    fn recursion_panics_instead_of_deadlocking() {
        let a = RawSpinLock::new(LockClass::PageTableLock);
        let _g = a.lock(LockLevel::Pmd);
        let _h = a.lock(LockLevel::Pte);
    }

    fn addr_of(l: &RawSpinLock) -> usize {
        l as *const RawSpinLock as usize
    }

    /// What the lockup watchdog reads: the held locks with the sites that
    /// took them, and the lock being taken until it is recorded.
    #[test]
    fn held_locks_carry_their_sites_and_the_lock_being_taken_is_noted() {
        let a = RawSpinLock::new(LockClass::PageTableLock);
        let b = RawSpinLock::new(LockClass::PteLock);
        let (ga, line_a) = (a.lock(LockLevel::PageTableLock), line!());
        let (gb, line_b) = (b.lock(LockLevel::Pte), line!());
        let c = cpu_state().expect("the host HAL keeps lockdep state");
        let held: std::vec::Vec<_> = c.held().map(|h| (h.addr, h.level, h.site.map(|s| s.line()))).collect();
        assert_eq!(
            held,
            [(addr_of(&a), LockLevel::PageTableLock, Some(line_a)), (addr_of(&b), LockLevel::Pte, Some(line_b))]
        );
        assert_eq!(c.acquiring(), None, "nothing is being taken");
        drop(ga);
        assert_eq!(c.held().map(|h| h.site.map(|s| s.line())).collect::<std::vec::Vec<_>>(), [Some(line_b)]);
        drop(gb);
        // `lock` notes the lock when it checks the order, before it spins
        // for it, and clears the note once it holds it.
        let c_lock = RawSpinLock::new(LockClass::PteLock);
        let check_line = line!() + 1;
        before_acquire(addr_of(&c_lock), LockLevel::Pte, false);
        let noted = c.acquiring().expect("the lock being taken is noted");
        assert_eq!(
            (noted.addr, noted.level, noted.site.map(|s| s.line())),
            (addr_of(&c_lock), LockLevel::Pte, Some(check_line))
        );
        acquired(addr_of(&c_lock), LockLevel::Pte, false);
        assert_eq!(c.acquiring(), None);
        released(addr_of(&c_lock));
        assert_eq!(held_locks(), 0);
    }

    #[test]
    #[should_panic(expected = "not held")]
    fn assert_held_catches_a_missing_lock() {
        let a = RawSpinLock::new(LockClass::PteLock);
        a.assert_held();
    }

    #[test]
    #[should_panic(expected = "not held by this CPU")]
    fn assert_held_catches_a_lock_held_elsewhere() {
        let a = std::sync::Arc::new(RawSpinLock::new(LockClass::PteLock));
        let a2 = a.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _g = a2.lock(LockLevel::Pte);
            tx.send(()).unwrap();
            let _ = done_rx.recv();
        });
        rx.recv().unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.assert_held()));
        drop(done_tx);
        holder.join().unwrap();
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    }
}
