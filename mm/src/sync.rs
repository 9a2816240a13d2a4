//! The atomics the lock protocol is made of, switchable to `loom`'s.
//!
//! Under `cfg(loom)` the spinlock word and the page-table entries are `loom`
//! atomics, so the *real* helpers run inside `loom::model` and every
//! interleaving of their atomic operations is explored. Everything else
//! (statistics, kind tags checked by debug assertions, the free-frame count)
//! keeps `core` atomics: it is bookkeeping, not protocol.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64};

/// Tell the CPU (or loom's scheduler) that we are spinning.
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::hint::spin_loop();
}
