//! Per-CPU counter shards and the unlocked operations on them: Linux
//! `this_cpu_add` / `this_cpu_dec`.
//!
//! Statistics (lock acquisitions, RSS, fault counts) are sharded by CPU so
//! that counting never bounces a cache line between CPUs. A shard is then
//! written only by its own CPU, so the update needs no locked instruction:
//! on x86 in the kernel it is one unlocked `add` to memory, which an
//! interrupt on the same CPU cannot split (interrupts arrive between
//! instructions). That matters beyond cache lines under QEMU's parallel TCG,
//! where every locked instruction runs through a helper call (measured:
//! about 19 guest cycles for `lock xadd` with two vCPUs, 4 for `add`), and a
//! fault counts several things.
//!
//! Exclusivity is the kernel's side of the contract ([`crate::hal::Hal::cpu_id`]):
//! the executing CPU's number stays valid until the caller is done with it,
//! because kernel code never moves between CPUs, and numbers are below
//! [`crate::config::NR_CPUS`], so a shard of an `NR_CPUS`-sized table belongs
//! to one CPU. Host tests break it on purpose (their "CPUs" are threads that
//! may share a number) and loom models need atomics they can see, so there
//! the update is an ordinary atomic `fetch_add`.

use core::sync::atomic::AtomicU64;

/// Adds `n` (wrapping) to `counter`, a field of the executing CPU's shard.
/// Readers may sum the shards concurrently with relaxed loads.
#[inline]
pub(crate) fn this_cpu_add(counter: &AtomicU64, n: u64) {
    #[cfg(all(target_arch = "x86_64", target_os = "none"))]
    // SAFETY: `counter` is a valid, aligned `AtomicU64` for the duration of
    // the call. The unlocked `add` is a single-copy-atomic 8-byte load and
    // store, so concurrent relaxed loads of the shard are sound; no other
    // CPU writes it (module comment), and an interrupt handler on this CPU
    // that counts into it runs before or after the instruction, not inside.
    unsafe {
        core::arch::asm!("add qword ptr [{c}], {n}", c = in(reg) counter.as_ptr(), n = in(reg) n, options(nostack));
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
    counter.fetch_add(n, core::sync::atomic::Ordering::Relaxed);
}

/// Subtracts one from `count`, the executing CPU's reader count in a
/// [`crate::lock::RwSpinLock`] shard, with release ordering (Linux
/// `percpu_up_read`'s `this_cpu_dec`). Besides this CPU, the shard's only
/// writers are writers' `fetch_add(0)`s, which write back the value they read,
/// so an unlocked decrement cannot lose an update. x86 stores are release
/// stores, and the asm block (no `nomem`) keeps the compiler from moving the
/// critical section's accesses after it.
#[inline]
pub(crate) fn this_cpu_dec_release(count: &crate::sync::AtomicU32) {
    #[cfg(all(target_arch = "x86_64", target_os = "none"))]
    // SAFETY: `count` is a valid, aligned `AtomicU32` for the duration of the
    // call; its other writers are atomic read-modify-writes of zero (above),
    // and its readers use atomic loads.
    unsafe {
        core::arch::asm!("sub dword ptr [{c}], 1", c = in(reg) count.as_ptr(), options(nostack));
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
    count.fetch_sub(1, core::sync::atomic::Ordering::Release);
}
