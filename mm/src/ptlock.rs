//! `ptl`: where a page table's split lock lives, decided at compile time.
//!
//! The document's trick, in Rust:
//! * if the lock fits in a `usize`, `ptl` *is* the lock, inline in the page
//!   descriptor: no allocation, no extra cache line;
//! * if it does not (the `debug-ptlock` lock records owner CPU and site), `ptl`
//!   is a pointer to a lock allocated from the kernel heap in
//!   `pagetable_pte_ctor` / `pagetable_pmd_ctor` and freed in `pagetable_dtor`.
//!   This is why the constructors can fail.
//!
//! [`ALLOC_SPLIT_PTLOCKS`] is computed from the sizes, as Linux computes
//! `ALLOC_SPLIT_PTLOCKS` from `sizeof(spinlock_t) > sizeof(long)`, and the
//! storage type is picked from it by a const-generic type function, so the
//! choice follows the lock type without any hand-maintained `cfg`. Both
//! representations are always compiled and unit-tested; the page descriptor
//! embeds only the chosen one.
//!
//! Nothing outside `ptdesc.rs` touches this storage (the document: "never
//! access page->ptl directly -- use appropriate helper").

use core::alloc::Layout;
use core::mem::size_of;
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU32, AtomicU64};

use crate::lock::{LockClass, RawSpinLock};

/// The page-table lock type (`spinlock_t`).
pub type PtLock = RawSpinLock;

/// Linux `ALLOC_SPLIT_PTLOCKS`: the lock does not fit in a `usize`, so `ptl`
/// holds a pointer to a separately allocated lock.
pub const ALLOC_SPLIT_PTLOCKS: bool = size_of::<PtLock>() > size_of::<usize>();

/// One way of storing `ptl` in the descriptor word.
pub trait PtlRepr {
    /// What the descriptor word holds.
    type Storage;
    /// Whether `init` allocates.
    const ALLOCATES: bool;
    /// Constructs a free lock of `class` in `slot`.
    ///
    /// # Safety
    ///
    /// `slot` is valid for writes, exclusively owned by the caller, and holds
    /// no constructed lock (it is uninitialised or was passed to `free`).
    unsafe fn init(slot: *mut Self::Storage, class: LockClass) -> Result<(), AllocError>;
    /// The lock in `slot`.
    ///
    /// # Safety
    ///
    /// `slot` holds a lock constructed by `init` and not yet freed, and stays
    /// so for `'a`.
    unsafe fn get<'a>(slot: *const Self::Storage) -> &'a PtLock;
    /// Destroys the lock in `slot` (freeing its allocation, if any).
    ///
    /// # Safety
    ///
    /// `slot` holds a lock constructed by `init`, exclusively owned, which
    /// nobody holds or will use again.
    unsafe fn free(slot: *mut Self::Storage);
}

/// `ptl` is the lock itself.
pub enum InlinePtl {}

impl PtlRepr for InlinePtl {
    type Storage = PtLock;
    const ALLOCATES: bool = false;
    unsafe fn init(slot: *mut PtLock, class: LockClass) -> Result<(), AllocError> {
        // SAFETY: the caller gives exclusive, writable, unconstructed storage.
        unsafe { slot.write(PtLock::new(class)) };
        Ok(())
    }
    unsafe fn get<'a>(slot: *const PtLock) -> &'a PtLock {
        // SAFETY: constructed and live for 'a (caller).
        unsafe { &*slot }
    }
    unsafe fn free(slot: *mut PtLock) {
        // SAFETY: constructed, unused from now on (caller).
        unsafe { slot.drop_in_place() };
    }
}

/// `ptl` points to a lock allocated from the kernel heap.
pub enum AllocatedPtl {}

impl PtlRepr for AllocatedPtl {
    type Storage = *mut PtLock;
    const ALLOCATES: bool = true;
    unsafe fn init(slot: *mut *mut PtLock, class: LockClass) -> Result<(), AllocError> {
        let layout = Layout::new::<PtLock>();
        // SAFETY: PtLock is not zero-sized, so the layout is valid for `alloc`.
        let p = unsafe { alloc::alloc::alloc(layout) }.cast::<PtLock>();
        if p.is_null() {
            // Fallible on purpose: an out-of-memory heap fails the ctor, the
            // caller frees the table and reports OOM.
            return Err(AllocError);
        }
        // SAFETY: `p` is a fresh allocation of the right layout; `slot` is
        // exclusive and writable (caller).
        unsafe {
            p.write(PtLock::new(class));
            slot.write(p);
        }
        Ok(())
    }
    unsafe fn get<'a>(slot: *const *mut PtLock) -> &'a PtLock {
        // SAFETY: `slot` holds the pointer `init` stored, to a live lock that
        // stays allocated for 'a (caller).
        unsafe { &**slot }
    }
    unsafe fn free(slot: *mut *mut PtLock) {
        // SAFETY: `slot` holds the pointer `init` stored; nobody uses the lock
        // any more (caller), so it can be dropped and deallocated.
        unsafe {
            let p = *slot;
            p.drop_in_place();
            alloc::alloc::dealloc(p.cast(), Layout::new::<PtLock>());
            slot.write(core::ptr::null_mut());
        }
    }
}

/// Type-level `if`: picks a [`PtlRepr`] from a `bool`.
pub struct Choose<const ALLOC: bool>;

/// The representation [`Choose`] selects.
pub trait Chosen {
    /// The representation.
    type Repr: PtlRepr;
}
impl Chosen for Choose<false> {
    type Repr = InlinePtl;
}
impl Chosen for Choose<true> {
    type Repr = AllocatedPtl;
}

/// The representation in force in this build.
pub type Ptl = <Choose<{ ALLOC_SPLIT_PTLOCKS }> as Chosen>::Repr;

/// What the descriptor word holds for a page table in this build.
pub type PtlStorage = <Ptl as PtlRepr>::Storage;

/// Allocation failed (a frame, or a constructor's lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocError;

impl core::fmt::Display for AllocError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("out of memory")
    }
}

/// Failure injection for the page-table constructors: "fail the Nth ctor from
/// now". Per physical-memory instance, so concurrent host tests do not inject
/// into each other; compiled into every build so in-kernel tests can use it
/// too. Injection applies to every `pagetable_pte_ctor` / `pagetable_pmd_ctor`
/// call, whether or not that call would allocate, so every caller's error path
/// can be exercised in every configuration.
#[derive(Debug, Default)]
pub struct FaultInject {
    ctor_countdown: AtomicU32,
    injected: AtomicU64,
}

impl FaultInject {
    /// A disarmed injector.
    pub const fn new() -> Self {
        Self { ctor_countdown: AtomicU32::new(0), injected: AtomicU64::new(0) }
    }

    /// Make the `n`-th constructor call from now fail (`n >= 1`; 1 = the next).
    pub fn fail_nth_ctor(&self, n: u32) {
        assert!(n >= 1, "fail_nth_ctor counts from 1");
        self.ctor_countdown.store(n, Relaxed);
    }

    /// Disarm.
    pub fn disarm(&self) {
        self.ctor_countdown.store(0, Relaxed);
    }

    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Relaxed)
    }

    /// Called by each constructor: whether this call must fail.
    pub(crate) fn ctor_should_fail(&self) -> bool {
        let r = self.ctor_countdown.fetch_update(Relaxed, Relaxed, |c| c.checked_sub(1));
        if r == Ok(1) {
            self.injected.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use core::mem::MaybeUninit;

    use super::*;
    use crate::lock::LockLevel;

    fn exercise<R: PtlRepr>() {
        let mut slot = MaybeUninit::<R::Storage>::uninit();
        // SAFETY: a fresh local slot, exclusively ours.
        unsafe { R::init(slot.as_mut_ptr(), LockClass::PteLock) }.unwrap();
        // SAFETY: constructed above, lives until `free` below.
        let l = unsafe { R::get(slot.as_ptr()) };
        assert_eq!(l.class(), LockClass::PteLock);
        let g = l.lock(LockLevel::Untracked);
        assert!(l.is_locked());
        drop(g);
        // SAFETY: constructed, not held, not used after this.
        unsafe { R::free(slot.as_mut_ptr()) };
    }

    #[test]
    fn both_representations_work_in_every_build() {
        exercise::<InlinePtl>();
        exercise::<AllocatedPtl>();
    }

    #[test]
    fn the_choice_follows_the_size() {
        assert_eq!(ALLOC_SPLIT_PTLOCKS, size_of::<PtLock>() > size_of::<usize>());
        assert_eq!(<Ptl as PtlRepr>::ALLOCATES, ALLOC_SPLIT_PTLOCKS);
        // The descriptor word never grows beyond a usize.
        assert!(size_of::<PtlStorage>() <= size_of::<usize>());
        assert_eq!(cfg!(feature = "debug-ptlock"), ALLOC_SPLIT_PTLOCKS);
    }

    #[test]
    fn fault_injection_fails_exactly_the_nth_call() {
        let f = FaultInject::new();
        assert!(!f.ctor_should_fail());
        f.fail_nth_ctor(3);
        assert_eq!(
            [f.ctor_should_fail(), f.ctor_should_fail(), f.ctor_should_fail(), f.ctor_should_fail()],
            [false, false, true, false]
        );
        assert_eq!(f.injected(), 1);
        f.fail_nth_ctor(1);
        f.disarm();
        assert!(!f.ctor_should_fail());
    }
}
