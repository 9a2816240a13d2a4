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

/// Where random failures can be injected ([`FaultInject::set_rate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailSite {
    /// Every frame allocation (`PhysMem::alloc_pages`, any order).
    Frame = 0,
    /// Every page-table constructor (`pagetable_pte_ctor` /
    /// `pagetable_pmd_ctor`): the table is freed and the caller reports
    /// out-of-memory, as when its frame could not be had.
    Table = 1,
    /// The constructor's `ptl` allocation, in builds where `ptl` is
    /// allocated ([`ALLOC_SPLIT_PTLOCKS`], `debug-ptlock`); never elsewhere.
    Ptl = 2,
    /// Kernel-heap allocations (the kernel's global allocator asks, and
    /// fails only allocations whose callers handle a failure).
    Heap = 3,
}

impl FailSite {
    /// Every site, in index order.
    pub const ALL: [FailSite; 4] = [FailSite::Frame, FailSite::Table, FailSite::Ptl, FailSite::Heap];

    /// The name `fail=` uses.
    pub const fn name(self) -> &'static str {
        match self {
            FailSite::Frame => "frame",
            FailSite::Table => "table",
            FailSite::Ptl => "ptl",
            FailSite::Heap => "heap",
        }
    }
}

/// Failure injection, per physical-memory instance (so concurrent host tests
/// do not inject into each other; compiled into every build so in-kernel
/// tests and the kernel command line can use it too). Two kinds:
///
/// * "fail the Nth page-table constructor from now"
///   ([`FaultInject::fail_nth_ctor`]), for tests of one error path. It
///   applies to every `pagetable_pte_ctor` / `pagetable_pmd_ctor` call,
///   whether or not that call would allocate, so every caller's error path
///   can be exercised in every configuration;
/// * random failures at a rate per [`FailSite`] ("one call in N"), from a
///   seeded sequence ([`FaultInject::configure`] parses the kernel's
///   `fail=frame:1/200,table:1/50,ptl:1/20,heap:1/1000`). The sequence is a
///   hash of the seed and a global call number, so one seed gives the same
///   decisions for the same order of calls; concurrent CPUs interleave
///   their calls differently from run to run. A site whose rate is 0 costs
///   one relaxed load.
#[derive(Debug, Default)]
pub struct FaultInject {
    ctor_countdown: AtomicU32,
    injected: AtomicU64,
    /// Per site: fail one call in this many (0: never).
    one_in: [AtomicU32; 4],
    /// Per site: failures injected.
    injected_at: [AtomicU64; 4],
    seed: AtomicU64,
    /// Calls that drew a number.
    draws: AtomicU64,
}

/// A `fail=` specification that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadFailSpec(pub &'static str);

impl FaultInject {
    /// A disarmed injector.
    pub const fn new() -> Self {
        Self {
            ctor_countdown: AtomicU32::new(0),
            injected: AtomicU64::new(0),
            one_in: [const { AtomicU32::new(0) }; 4],
            injected_at: [const { AtomicU64::new(0) }; 4],
            seed: AtomicU64::new(0),
            draws: AtomicU64::new(0),
        }
    }

    /// Make the `n`-th constructor call from now fail (`n >= 1`; 1 = the next).
    pub fn fail_nth_ctor(&self, n: u32) {
        assert!(n >= 1, "fail_nth_ctor counts from 1");
        self.ctor_countdown.store(n, Relaxed);
    }

    /// Disarm the countdown ([`FaultInject::fail_nth_ctor`]).
    pub fn disarm(&self) {
        self.ctor_countdown.store(0, Relaxed);
    }

    /// How many failures were injected so far (both kinds, all sites).
    pub fn injected(&self) -> u64 {
        self.injected.load(Relaxed)
    }

    /// Fail one call in `one_in` at `site` from now on (0: never).
    pub fn set_rate(&self, site: FailSite, one_in: u32) {
        self.one_in[site as usize].store(one_in, Relaxed);
    }

    /// The rate in force at `site` (one call in N; 0: never).
    pub fn rate(&self, site: FailSite) -> u32 {
        self.one_in[site as usize].load(Relaxed)
    }

    /// Whether any site has a rate.
    pub fn armed(&self) -> bool {
        FailSite::ALL.iter().any(|&s| self.rate(s) != 0)
    }

    /// Stops every random failure (the countdown is left alone).
    pub fn clear_rates(&self) {
        for s in FailSite::ALL {
            self.set_rate(s, 0);
        }
    }

    /// Seeds the random sequence and restarts it.
    pub fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Relaxed);
        self.draws.store(0, Relaxed);
    }

    /// Random failures injected at `site` so far.
    pub fn injected_at(&self, site: FailSite) -> u64 {
        self.injected_at[site as usize].load(Relaxed)
    }

    /// Applies a `fail=` specification: comma-separated `SITE:1/N` (or
    /// `SITE:0` to turn one off), SITE one of `frame`, `table`, `ptl`,
    /// `heap`. Sites not named keep their rate. Nothing changes on error.
    pub fn configure(&self, spec: &str) -> Result<(), BadFailSpec> {
        let mut rates = [None; 4];
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (name, rate) = part.split_once(':').ok_or(BadFailSpec("expected SITE:1/N"))?;
            let site = FailSite::ALL
                .into_iter()
                .find(|s| s.name() == name)
                .ok_or(BadFailSpec("unknown site (frame, table, ptl, heap)"))?;
            let one_in = match rate.split_once('/') {
                Some(("1", n)) => {
                    n.parse::<u32>().ok().filter(|&n| n >= 1).ok_or(BadFailSpec("expected 1/N, N >= 1"))?
                }
                None if rate == "0" => 0,
                _ => return Err(BadFailSpec("expected 1/N or 0")),
            };
            rates[site as usize] = Some(one_in);
        }
        for (site, rate) in FailSite::ALL.into_iter().zip(rates) {
            if let Some(r) = rate {
                self.set_rate(site, r);
            }
        }
        Ok(())
    }

    /// Whether this call at `site` must fail (a random failure).
    #[inline]
    pub fn should_fail(&self, site: FailSite) -> bool {
        let n = self.one_in[site as usize].load(Relaxed);
        n != 0 && self.draw(site, n)
    }

    #[cold]
    fn draw(&self, site: FailSite, n: u32) -> bool {
        let k = self.draws.fetch_add(1, Relaxed);
        if !splitmix64(self.seed.load(Relaxed) ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).is_multiple_of(u64::from(n)) {
            return false;
        }
        self.injected_at[site as usize].fetch_add(1, Relaxed);
        self.injected.fetch_add(1, Relaxed);
        true
    }

    /// Called by each constructor: whether this call must fail (the
    /// countdown, or a random `table` failure, or a random `ptl` failure
    /// where the constructor allocates its lock).
    pub(crate) fn ctor_should_fail(&self) -> bool {
        let r = self.ctor_countdown.fetch_update(Relaxed, Relaxed, |c| c.checked_sub(1));
        if r == Ok(1) {
            self.injected.fetch_add(1, Relaxed);
            return true;
        }
        self.should_fail(FailSite::Table) || (<Ptl as PtlRepr>::ALLOCATES && self.should_fail(FailSite::Ptl))
    }
}

/// SplitMix64's output function: a well-mixed 64-bit hash of `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

    #[test]
    fn fail_specs_parse_and_rates_hold_roughly() {
        let f = FaultInject::new();
        assert!(!f.armed());
        f.configure("frame:1/200,table:1/50,ptl:1/20,heap:1/1000").unwrap();
        assert_eq!(FailSite::ALL.map(|s| f.rate(s)), [200, 50, 20, 1000]);
        f.configure("table:0").unwrap();
        assert_eq!(f.rate(FailSite::Table), 0, "a site can be turned off alone");
        assert_eq!(f.rate(FailSite::Frame), 200, "sites not named keep their rate");
        for bad in ["frame", "disk:1/2", "frame:2/3", "frame:1/0", "frame:1/x", "frame:1/2,heap"] {
            assert!(f.configure(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(f.rate(FailSite::Frame), 200, "a bad spec changes nothing");
        // One in 50 over 100k calls: about 2000 failures.
        f.set_seed(7);
        f.set_rate(FailSite::Table, 50);
        let fails = (0..100_000).filter(|_| f.should_fail(FailSite::Table)).count() as u64;
        assert!((1700..2300).contains(&fails), "{fails} failures in 100000 calls at 1/50");
        assert_eq!(f.injected_at(FailSite::Table), fails);
        // The same seed gives the same sequence.
        let run = |seed| {
            f.set_seed(seed);
            (0..1000).map(|_| f.should_fail(FailSite::Table)).collect::<std::vec::Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        f.clear_rates();
        assert!(!f.armed() && !(0..1000).any(|_| f.should_fail(FailSite::Frame)));
    }

    #[test]
    fn random_ctor_failures_take_ptl_only_where_the_lock_is_allocated() {
        let f = FaultInject::new();
        f.set_rate(FailSite::Ptl, 1);
        assert_eq!(f.ctor_should_fail(), ALLOC_SPLIT_PTLOCKS);
        f.clear_rates();
        f.set_rate(FailSite::Table, 1);
        assert!(f.ctor_should_fail());
        assert_eq!(f.injected_at(FailSite::Table), 1);
    }
}
