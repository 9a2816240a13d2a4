//! Lock order checked by the compiler (after Redox's `sync/ordered.rs`).
//!
//! Each level of the order is a zero-sized type. Taking a lock of level `L`
//! consumes a [`LockToken`] of a level `L` ranks [`Above`], and the result
//! carries a token of level `L` that only lets the holder take locks ranked
//! above `L`. Tokens borrow mutably from their parent, so while a lock is held
//! the lower token cannot be used again to take something out of order.
//!
//! The root token ([`LockToken::<Unlocked>::new`]) is created once per
//! execution context (a task, a CPU's interrupt path). The runtime checker in
//! [`super::lockdep`] still watches every acquisition, including those made
//! without tokens.
//!
//! Taking the page-table locks in order compiles:
//!
//! ```no_run
//! use mm::lock::ordered::{LockToken, Unlocked};
//! use mm::{Mm, PmdRef, VirtAddr, pte_offset_map_lock_ordered, pmd_lock_ordered};
//!
//! fn fine(mm: &Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr, mut t: LockToken<'_, Unlocked>) {
//!     let mut pt = mm.lock_page_table_ordered(t.borrow());
//!     let mut pl = pmd_lock_ordered(mm, pmd, pt.token());
//!     let _pte = pte_offset_map_lock_ordered(mm, pmd, addr, pl.token());
//! }
//! ```
//!
//! Taking a PMD lock while holding a PTE lock does not:
//!
//! ```compile_fail,E0277
//! use mm::lock::ordered::{LockToken, Unlocked};
//! use mm::{Mm, PmdRef, VirtAddr, pte_offset_map_lock_ordered, pmd_lock_ordered};
//!
//! fn inverted(mm: &Mm<'_>, pmd: PmdRef<'_>, addr: VirtAddr, mut t: LockToken<'_, Unlocked>) {
//!     let mut pte = pte_offset_map_lock_ordered(mm, pmd, addr, t.borrow()).unwrap();
//!     let _pmd = pmd_lock_ordered(mm, pmd, pte.token()); // PmdLevel is not Above<PteLevel>
//! }
//! ```
//!
//! Nor does reusing the lower token while the higher lock is held:
//!
//! ```compile_fail,E0499
//! use mm::lock::ordered::{LockToken, Unlocked};
//! use mm::{Mm, PmdRef, pmd_lock_ordered};
//!
//! fn reuse(mm: &Mm<'_>, pmd: PmdRef<'_>, mut t: LockToken<'_, Unlocked>) {
//!     let held = pmd_lock_ordered(mm, pmd, t.borrow());
//!     let _ptl = mm.lock_page_table_ordered(t.borrow()); // `t` is still lent to `held`
//!     drop(held);
//! }
//! ```

use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use super::LockLevel;

mod sealed {
    pub trait Sealed {}
}

/// A level of the lock order.
pub trait Level: sealed::Sealed {
    /// The run-time level it corresponds to.
    const LEVEL: Option<LockLevel>;
}

/// `Self` may be taken while `L` is the highest level held.
pub trait Above<L: Level>: Level {}

macro_rules! levels {
    ($($(#[$m:meta])* $name:ident = $lvl:expr;)*) => {$(
        $(#[$m])*
        pub enum $name {}
        impl sealed::Sealed for $name {}
        impl Level for $name {
            const LEVEL: Option<LockLevel> = $lvl;
        }
    )*};
}

levels! {
    /// Nothing held.
    Unlocked = None;
    /// The address-space (VMA) lock.
    AddressSpaceLevel = Some(LockLevel::AddressSpace);
    /// `mm.page_table_lock`.
    PageTableLockLevel = Some(LockLevel::PageTableLock);
    /// A PMD table lock.
    PmdLevel = Some(LockLevel::Pmd);
    /// A PTE table lock.
    PteLevel = Some(LockLevel::Pte);
}

macro_rules! above {
    ($hi:ident: $($lo:ident),*) => {$( impl Above<$lo> for $hi {} )*};
}

above!(AddressSpaceLevel: Unlocked);
above!(PageTableLockLevel: Unlocked, AddressSpaceLevel);
above!(PmdLevel: Unlocked, AddressSpaceLevel, PageTableLockLevel);
above!(PteLevel: Unlocked, AddressSpaceLevel, PageTableLockLevel, PmdLevel);

/// Permission to take locks ranked above `L`. Zero-sized, not `Send`.
pub struct LockToken<'a, L: Level> {
    _p: PhantomData<(&'a mut (), L, *const ())>,
}

impl LockToken<'static, Unlocked> {
    /// The root token of an execution context.
    ///
    /// # Safety
    ///
    /// At most one root token exists per execution context (task or interrupt
    /// path) at a time, and it is created while that context holds no lock;
    /// otherwise two tokens could each vouch for an empty lock set.
    pub unsafe fn new() -> Self {
        LockToken { _p: PhantomData }
    }
}

impl<'a, L: Level> LockToken<'a, L> {
    /// Lends the token for one acquisition.
    pub fn borrow(&mut self) -> LockToken<'_, L> {
        LockToken { _p: PhantomData }
    }

    /// The token of a lock just taken above `L`.
    pub(crate) fn step<H: Above<L>>(self) -> LockToken<'a, H> {
        LockToken { _p: PhantomData }
    }
}

/// A lock guard together with the token of its level.
pub struct Ordered<'t, L: Level, G> {
    guard: G,
    token: LockToken<'t, L>,
}

impl<'t, L: Level, G> Ordered<'t, L, G> {
    pub(crate) fn new(guard: G, token: LockToken<'t, L>) -> Self {
        Self { guard, token }
    }
    /// The token for taking a lock above this one, lent while it is held.
    pub fn token(&mut self) -> LockToken<'_, L> {
        self.token.borrow()
    }
    /// Releases the lock.
    pub fn unlock(self) {
        drop(self);
    }
}

impl<L: Level, G> Deref for Ordered<'_, L, G> {
    type Target = G;
    fn deref(&self) -> &G {
        &self.guard
    }
}

impl<L: Level, G> DerefMut for Ordered<'_, L, G> {
    fn deref_mut(&mut self) -> &mut G {
        &mut self.guard
    }
}
