//! Sets of logical CPU numbers for the hardware layer: [`CpuMask`] (a plain
//! bitset over `0..NR_CPUS`) and [`AtomicCpuMask`] (the same, updated by
//! several CPUs at once).
//!
//! `CpuMask` is a value: whom to interrupt. IPIs, cross calls and TLB
//! shoot-downs take one (`ipi::send_fixed`, `ipi::on_cpus`,
//! `tlb::shootdown`), and the online set is read as one.
//!
//! `AtomicCpuMask` is shared state inside this crate: the online set
//! (`percpu`), each CPU's cross-call and shoot-down inbox, the senders with
//! work for it (`ipi`), and the CPUs stopped by a dying one.
//!
//! Address spaces do not use either. The CPUs that may hold an address
//! space's TLB entries are the memory manager's `CpuBitmap` (mm/src/tlb.rs,
//! Linux's `mm_cpumask`): a CPU joins it when it loads the address space's
//! CR3, and the unmap path reads it for a shoot-down, which the kernel's HAL
//! (kernel/src/mmhal.rs) turns into a `CpuMask` for `tlb::shootdown`.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::percpu::NR_CPUS;

/// Number of 64-bit words in a mask.
pub const MASK_WORDS: usize = NR_CPUS.div_ceil(64);

/// Bits of the last word that name real CPUs (all ones if NR_CPUS % 64 == 0).
const LAST_WORD_BITS: u64 = match NR_CPUS % 64 {
    0 => u64::MAX,
    n => (1u64 << n) - 1,
};

fn split(cpu: usize) -> (usize, u64) {
    assert!(cpu < NR_CPUS, "CPU {cpu} out of range (NR_CPUS = {NR_CPUS})");
    (cpu / 64, 1u64 << (cpu % 64))
}

/// A set of logical CPU numbers in `0..NR_CPUS`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CpuMask {
    words: [u64; MASK_WORDS],
}

impl CpuMask {
    /// The empty set.
    pub const fn new() -> Self {
        Self { words: [0; MASK_WORDS] }
    }

    /// `{cpu}`.
    pub fn single(cpu: usize) -> Self {
        let mut m = Self::new();
        m.set(cpu);
        m
    }

    /// Every possible CPU number `0..NR_CPUS` (online or not).
    pub fn all_possible() -> Self {
        let mut m = Self { words: [u64::MAX; MASK_WORDS] };
        m.words[MASK_WORDS - 1] = LAST_WORD_BITS;
        m
    }

    /// The CPUs online now (those that finished bring-up).
    pub fn online() -> Self {
        crate::percpu::online_mask()
    }

    /// Adds `cpu`; returns whether it was already present.
    pub fn set(&mut self, cpu: usize) -> bool {
        let (w, bit) = split(cpu);
        let was = self.words[w] & bit != 0;
        self.words[w] |= bit;
        was
    }

    /// Removes `cpu`; returns whether it was present.
    pub fn clear(&mut self, cpu: usize) -> bool {
        let (w, bit) = split(cpu);
        let was = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        was
    }

    /// Whether `cpu` is in the set (false for numbers >= NR_CPUS).
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < NR_CPUS && self.words[cpu / 64] & (1u64 << (cpu % 64)) != 0
    }

    /// The set without `cpu`.
    #[must_use]
    pub fn without(mut self, cpu: usize) -> Self {
        self.clear(cpu);
        self
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of CPUs in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The lowest CPU number in the set.
    pub fn first(&self) -> Option<usize> {
        self.iter().next()
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| BitIter(w).map(move |b| i * 64 + b))
    }

    /// Whether every CPU of `other` is also in `self`.
    pub fn is_superset(&self, other: &CpuMask) -> bool {
        self.words.iter().zip(other.words.iter()).all(|(a, b)| b & !a == 0)
    }
}

/// Iterates the set bits of one word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

impl FromIterator<usize> for CpuMask {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut m = Self::new();
        for cpu in iter {
            m.set(cpu);
        }
        m
    }
}

impl core::ops::BitOr for CpuMask {
    type Output = CpuMask;
    fn bitor(mut self, rhs: CpuMask) -> CpuMask {
        self |= rhs;
        self
    }
}

impl core::ops::BitOrAssign for CpuMask {
    fn bitor_assign(&mut self, rhs: CpuMask) {
        for (a, b) in self.words.iter_mut().zip(rhs.words) {
            *a |= b;
        }
    }
}

impl core::ops::BitAnd for CpuMask {
    type Output = CpuMask;
    fn bitand(mut self, rhs: CpuMask) -> CpuMask {
        for (a, b) in self.words.iter_mut().zip(rhs.words) {
            *a &= b;
        }
        self
    }
}

/// Set difference: the CPUs of `self` that are not in `rhs`.
impl core::ops::Sub for CpuMask {
    type Output = CpuMask;
    fn sub(mut self, rhs: CpuMask) -> CpuMask {
        for (a, b) in self.words.iter_mut().zip(rhs.words) {
            *a &= !b;
        }
        self
    }
}

/// Prints ranges, e.g. `{0-3,5,7-8}`.
impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        let mut first = true;
        let mut iter = self.iter().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end = iter.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        f.write_str("}")
    }
}

impl fmt::Display for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A [`CpuMask`] that several CPUs update at once.
///
/// Each bit is updated atomically with `lock or`/`lock and` semantics
/// (`AcqRel`): setting a bit publishes everything the setter wrote before, and
/// whoever observes the bit sees it. A [`load`](AtomicCpuMask::load) of a mask
/// wider than one word is not a snapshot across words, which no user needs:
/// each CPU's bit is consistent on its own.
pub struct AtomicCpuMask {
    words: [AtomicU64; MASK_WORDS],
}

impl AtomicCpuMask {
    /// The empty set.
    pub const fn new() -> Self {
        Self { words: [const { AtomicU64::new(0) }; MASK_WORDS] }
    }

    /// Adds `cpu`; returns whether it was already present.
    pub fn set(&self, cpu: usize) -> bool {
        let (w, bit) = split(cpu);
        self.words[w].fetch_or(bit, Ordering::AcqRel) & bit != 0
    }

    /// Removes `cpu`; returns whether it was present.
    pub fn clear(&self, cpu: usize) -> bool {
        let (w, bit) = split(cpu);
        self.words[w].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        let (w, bit) = split(cpu);
        self.words[w].load(Ordering::Acquire) & bit != 0
    }

    /// Adds every CPU of `mask`.
    pub fn insert_all(&self, mask: &CpuMask) {
        for (a, &b) in self.words.iter().zip(mask.words.iter()) {
            if b != 0 {
                a.fetch_or(b, Ordering::AcqRel);
            }
        }
    }

    /// The current contents.
    pub fn load(&self) -> CpuMask {
        let mut m = CpuMask::new();
        for (dst, src) in m.words.iter_mut().zip(self.words.iter()) {
            *dst = src.load(Ordering::Acquire);
        }
        m
    }

    /// Empties the set and returns what it held (each word atomically).
    pub fn take(&self) -> CpuMask {
        let mut m = CpuMask::new();
        for (dst, src) in m.words.iter_mut().zip(self.words.iter()) {
            // A plain load first: the common case (an empty inbox polled in a
            // spin loop) then costs no locked instruction and no cache-line
            // ownership transfer.
            if src.load(Ordering::Relaxed) != 0 {
                *dst = src.swap(0, Ordering::AcqRel);
            }
        }
        m
    }

    /// Whether the set is empty (a cheap check for polling loops).
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }
}

impl Default for AtomicCpuMask {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AtomicCpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.load(), f)
    }
}

#[cfg(target_os = "none")]
mod tests {
    use ktest::ktest;

    use super::*;

    /// Set, clear, count, iteration order and the set operations agree with
    /// a plain list of numbers, including the last possible CPU.
    #[ktest]
    fn cpumask_set_operations() {
        let mut m = CpuMask::new();
        assert!(m.is_empty() && m.first().is_none());
        let last = NR_CPUS - 1;
        let mut expected = alloc_free_list::List::default();
        for cpu in [0, 3, 5, last] {
            if cpu < NR_CPUS && !expected.as_slice().contains(&cpu) {
                assert!(!m.set(cpu));
                expected.push(cpu);
            }
        }
        assert!(m.set(0), "set() must report a bit that was already there");
        assert_eq!(m.count(), expected.as_slice().len());
        let listed: alloc_free_list::List = m.iter().collect();
        assert_eq!(listed.as_slice(), expected.as_slice(), "iteration must be ascending");
        assert!(!m.contains(NR_CPUS + 7));
        assert!(m.clear(last) && !m.clear(last) && !m.contains(last));
        m.set(last);
        let other = CpuMask::single(0);
        assert_eq!((m & other).iter().collect::<alloc_free_list::List>().as_slice(), &[0]);
        assert!((m | other).is_superset(&m) && (m | other).is_superset(&other));
        assert!(!(m - other).contains(0) && (m - other).count() == m.count() - 1);
        assert_eq!(CpuMask::all_possible().count(), NR_CPUS);
        assert_eq!(CpuMask::single(last).first(), Some(last));
        assert_eq!(CpuMask::all_possible().without(last).count(), NR_CPUS - 1);
    }

    /// Debug output collapses runs into ranges.
    #[ktest]
    fn cpumask_prints_ranges() {
        use core::fmt::Write;
        let m: CpuMask = [0usize, 1, 2, 3, 5].into_iter().filter(|&c| c < NR_CPUS).collect();
        let mut s = alloc_free_list::Text::default();
        write!(s, "{m:?}").unwrap();
        let expect = if NR_CPUS > 5 { "{0-3,5}" } else { "{0-3}" };
        assert_eq!(s.as_str(), expect);
    }

    /// The atomic mask: set/clear report the previous state, take empties it.
    #[ktest]
    fn atomic_cpumask_take_and_report() {
        let a = AtomicCpuMask::new();
        assert!(a.is_empty());
        assert!(!a.set(NR_CPUS - 1));
        assert!(a.set(NR_CPUS - 1));
        a.insert_all(&CpuMask::single(0));
        assert!(a.contains(0));
        let taken = a.take();
        assert!(taken.contains(0) && taken.contains(NR_CPUS - 1));
        assert!(a.is_empty() && a.take().is_empty());
        assert!(!a.clear(0));
    }

    /// Fixed-capacity helpers so these tests need no allocator (arch has none).
    mod alloc_free_list {
        #[derive(Default)]
        pub struct List {
            items: [usize; 8],
            len: usize,
        }
        impl List {
            pub fn push(&mut self, x: usize) {
                self.items[self.len] = x;
                self.len += 1;
            }
            pub fn as_slice(&self) -> &[usize] {
                &self.items[..self.len]
            }
        }
        impl FromIterator<usize> for List {
            fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
                let mut l = List::default();
                for x in iter {
                    l.items[l.len] = x;
                    l.len += 1;
                }
                l
            }
        }
        #[derive(Default)]
        pub struct Text {
            buf: [u8; 32],
            len: usize,
        }
        impl Text {
            pub fn as_str(&self) -> &str {
                core::str::from_utf8(&self.buf[..self.len]).unwrap()
            }
        }
        impl core::fmt::Write for Text {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
                self.len += s.len();
                Ok(())
            }
        }
    }
}
