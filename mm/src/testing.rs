//! Host test support: the host HAL, simulated machines, a log capture.
//!
//! Parallel-test strategy: `cargo test` runs tests on many threads at once, so
//! every test builds its own [`TestMachine`] (a heap buffer standing in for
//! physical memory, with its own memmap, allocator and failure injector).
//! Exact free-frame counts therefore never see another test's allocations, and
//! no test needs a global mutex. The only process-wide state is the HAL,
//! whose per-CPU parts (CPU number, read-side depth, lock-order state) are
//! per-thread, and the lock statistics, which tests only compare as lower
//! bounds.

extern crate std;

use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::string::String;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, Once};
use std::vec::Vec;

use crate::addr::{DirectMap, PAGE_SIZE, PhysAddr};
use crate::bootmem::BootMem;
use crate::hal::Hal;
use crate::lock::lockdep::LockdepCpu;
use crate::mm_struct::KernelPgd;
use crate::pgtable::entry::{Pgd, PteFlags};
use crate::physmem::PhysMem;
use crate::tlb::{CpuBitmap, FlushRange};

/// The host HAL: each thread is a CPU.
pub struct HostHal;

/// The one host HAL instance.
pub static HOST_HAL: HostHal = HostHal;

#[cfg(not(loom))]
static NEXT_CPU: AtomicUsize = AtomicUsize::new(0);

/// One thread's read-side state as other threads see it: a sequence number,
/// odd while the thread is inside its outermost read-side section, and
/// another, odd while its "interrupts" are off (`local_irq_save`).
struct RcuReader {
    seq: AtomicU64,
    irq_off: AtomicU64,
}

/// Every thread that ever entered a read-side section (entries of exited
/// threads stay, even, and are skipped).
/// The host's grace-period state: every thread that ever entered a
/// read-side section (entries of exited threads stay, even, and are
/// skipped), and the numbered grace periods of `synchronize_rcu`.
struct HostRcu {
    readers: Mutex<Vec<Arc<RcuReader>>>,
    /// One grace period at a time.
    serial: Mutex<()>,
    /// Grace periods started / completed (a cookie names the first period
    /// that starts after it was taken).
    started: AtomicU64,
    done: AtomicU64,
}

impl HostRcu {
    const fn new() -> Self {
        Self {
            readers: Mutex::new(Vec::new()),
            serial: Mutex::new(()),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }
}

/// Process-wide for host tests (a grace period waits for every test thread).
#[cfg(not(loom))]
fn host_rcu() -> &'static HostRcu {
    static RCU_STATE: HostRcu = HostRcu::new();
    &RCU_STATE
}

/// Per loom execution: a loom model's grace periods concern its own threads,
/// not those of models running beside it in other test threads.
#[cfg(loom)]
fn host_rcu() -> &'static HostRcu {
    loom::lazy_static! {
        static ref RCU_STATE: HostRcu = HostRcu::new();
    }
    &RCU_STATE
}

struct RcuThread {
    depth: Cell<usize>,
    me: Arc<RcuReader>,
}

impl RcuThread {
    fn register() -> Self {
        let me = Arc::new(RcuReader { seq: AtomicU64::new(0), irq_off: AtomicU64::new(0) });
        host_rcu().readers.lock().unwrap().push(me.clone());
        Self { depth: Cell::new(0), me }
    }
}

impl Drop for RcuThread {
    fn drop(&mut self) {
        // In a loom model the registry ends with the execution (and may not
        // be touched while loom shuts it down).
        #[cfg(not(loom))]
        if let Ok(mut v) = host_rcu().readers.lock() {
            v.retain(|r| !Arc::ptr_eq(r, &self.me));
        }
    }
}

/// A TLB-flush observer: called on the flushing thread for each shoot-down.
pub type FlushObserver = Box<dyn Fn(&CpuBitmap, FlushRange)>;

// Read-side state is per thread, and per *loom* thread in loom models
// (loom runs its threads as coroutines of one OS thread, so a std
// thread-local would be shared by all of them).
#[cfg(not(loom))]
std::thread_local! {
    static RCU: RcuThread = RcuThread::register();
}
#[cfg(loom)]
loom::thread_local! {
    static RCU: RcuThread = RcuThread::register();
}

#[cfg(not(loom))]
std::thread_local! {
    static CPU: usize = NEXT_CPU.fetch_add(1, Relaxed);
}

// Under loom: per loom thread (loom runs its threads as coroutines of one OS
// thread, so a std thread-local would make every thread of a model one CPU,
// and per-CPU state, such as the rwlock's reader shards, would never be
// split between them), numbered from 0 in each execution in the order the
// threads first ask, which is the same in loom's replay of that execution.
// Bookkeeping, so a core atomic: numbering adds no interleavings.
#[cfg(loom)]
loom::lazy_static! {
    static ref LOOM_NEXT_CPU: AtomicUsize = AtomicUsize::new(0);
}
#[cfg(loom)]
loom::thread_local! {
    static CPU: usize = LOOM_NEXT_CPU.fetch_add(1, Relaxed);
}

std::thread_local! {
    static LOCKDEP: &'static LockdepCpu = Box::leak(Box::new(LockdepCpu::new()));
    static FLUSH_OBSERVER: RefCell<Option<FlushObserver>> = const { RefCell::new(None) };
    static THREAD_FLUSHES: Cell<u64> = const { Cell::new(0) };
}

/// Installs (or with `None` removes) this thread's flush observer. Tests use
/// it to check, at the moment of each shoot-down, that the frames it covers
/// have not been freed yet.
pub fn set_flush_observer(f: Option<FlushObserver>) {
    FLUSH_OBSERVER.with(|o| *o.borrow_mut() = f);
}

/// Shoot-downs requested by this thread so far.
pub fn thread_flushes() -> u64 {
    THREAD_FLUSHES.with(|c| c.get())
}

/// Threads that called [`halting_cpu`]: the thread halted as each CPU,
/// so a kick can unpark it.
#[cfg(not(loom))]
static HALTING_CPUS: Mutex<Vec<Option<std::thread::Thread>>> = Mutex::new(Vec::new());

#[cfg(not(loom))]
std::thread_local! {
    static HALTING_CPU: Cell<Option<usize>> = const { Cell::new(None) };
}

// Under loom: per loom thread and per execution (loom's threads share one
// OS thread, and each execution starts afresh). The std mutex is never held
// across a loom operation.
#[cfg(loom)]
loom::lazy_static! {
    static ref HALTING_CPUS: Mutex<Vec<Option<loom::thread::Thread>>> = Mutex::new(Vec::new());
}

#[cfg(loom)]
loom::thread_local! {
    static HALTING_CPU: Cell<Option<usize>> = Cell::new(None);
}

/// Held by a host test that runs halting CPUs ([`halting_cpu`]) for its
/// whole run: tests run in parallel, and two tests playing the same CPU
/// would send each other's kicks to the wrong thread (and each one's halt
/// counts would include the other's).
#[cfg(not(loom))]
pub static HALTING_TEST: Mutex<()> = Mutex::new(());

/// How long a halted host "CPU" waits for its kick before the test fails
/// with a lost wake-up (a real CPU would sleep until its next timer tick).
#[cfg(not(loom))]
pub const LOST_KICK: std::time::Duration = std::time::Duration::from_secs(20);

/// Makes this thread CPU `cpu` (below `NR_CPUS`, not used by another
/// thread at the same time) and lets its lock waits halt: a halt parks the
/// thread until a kick unparks it, and fails the test after [`LOST_KICK`]
/// without one.
///
/// Under loom a halt parks the loom thread: one nobody kicks is a deadlock,
/// which loom reports, so a model fails on a lost wake-up in every
/// interleaving that has one. (A real halt also ends at the next timer
/// tick; the models hold the handshake to the stricter rule.)
pub fn halting_cpu(cpu: usize) {
    assert!(cpu < crate::lock::HALTING_CPUS);
    HALTING_CPU.with(|c| c.set(Some(cpu)));
    let mut cpus = HALTING_CPUS.lock().unwrap();
    if cpus.len() <= cpu {
        cpus.resize(cpu + 1, None);
    }
    #[cfg(not(loom))]
    let me = std::thread::current();
    #[cfg(loom)]
    let me = loom::thread::current();
    cpus[cpu] = Some(me);
}

impl Hal for HostHal {
    fn cpu_id(&self) -> usize {
        if let Some(cpu) = HALTING_CPU.with(|c| c.get()) {
            return cpu;
        }
        CPU.with(|c| *c)
    }
    fn can_halt(&self) -> bool {
        HALTING_CPU.with(|c| c.get()).is_some()
    }
    #[cfg(not(loom))]
    fn halt_if(&self, announce: &mut dyn FnMut() -> bool) {
        if !announce() {
            return;
        }
        // A kick after the announcement leaves a token: the park returns at
        // once, as `sti; hlt` does with the IPI pending.
        let start = std::time::Instant::now();
        std::thread::park_timeout(LOST_KICK);
        assert!(start.elapsed() < LOST_KICK, "a halted lock waiter was never kicked (lost wake-up)");
    }
    #[cfg(loom)]
    fn halt_if(&self, announce: &mut dyn FnMut() -> bool) {
        // Returns at once if a kick came first (the park token), as
        // `sti; hlt` does with the IPI pending.
        if announce() {
            loom::thread::park();
        }
    }
    fn kick(&self, cpu: usize) {
        let t = HALTING_CPUS.lock().unwrap().get(cpu).cloned().flatten();
        if let Some(t) = t {
            t.unpark();
        }
    }
    #[cfg(not(loom))]
    fn cycles(&self) -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
    }
    /// No clock under loom: loom replays each execution's prefix to explore
    /// the next, and a choice made from the wall clock (a wait that gives
    /// up after so many cycles) could go the other way in the replay, when
    /// the host has just descheduled the test thread. Loom then explores a
    /// history that never happened and trips its own assertions (it did
    /// once in CI, under a busy host). The locks bound their loom waits in
    /// spins instead; a clock that stands still only zeroes the statistics.
    #[cfg(loom)]
    fn cycles(&self) -> u64 {
        0
    }
    #[cfg(loom)]
    fn spin_wait(&self, _spins: u32) {
        // A loom spin yields to the other threads until they block, so a
        // waiter would only look again once the holder had run to its end;
        // a CPU that may halt goes straight to its halt instead, which
        // lets the halting models interleave it with the unlock.
        if !self.can_halt() {
            crate::sync::spin_loop();
        }
    }
    #[cfg(not(loom))]
    fn spin_wait(&self, spins: u32) {
        // Test threads are preemptible: let a preempted ticket holder run.
        if spins.is_multiple_of(128) {
            std::thread::yield_now();
        } else {
            core::hint::spin_loop();
        }
    }
    fn rcu_read_lock(&self) {
        RCU.with(|r| {
            if r.depth.get() == 0 {
                // Odd: inside. SeqCst pairs with synchronize_rcu's fence: either
                // the updater sees us inside, or our later loads see its
                // detach.
                r.me.seq.fetch_add(1, SeqCst);
            }
            r.depth.set(r.depth.get() + 1);
        });
    }
    fn rcu_read_unlock(&self) {
        RCU.with(|r| {
            let d = r.depth.get();
            assert!(d > 0, "rcu_read_unlock without rcu_read_lock");
            r.depth.set(d - 1);
            if d == 1 {
                r.me.seq.fetch_add(1, SeqCst);
            }
        });
    }
    fn synchronize_rcu(&self) {
        assert_eq!(rcu_depth(), 0, "synchronize_rcu inside a read-side section would wait for itself");
        // One grace period at a time, numbered: a cookie names the first
        // period that starts after it was taken (see `get_state_...`).
        let rcu = host_rcu();
        let _serial = rcu.serial.lock().unwrap_or_else(|e| e.into_inner());
        let id = rcu.started.fetch_add(1, SeqCst) + 1;
        wait_for_odd_sections(|r| &r.seq);
        rcu.done.store(id, SeqCst);
    }
    fn get_state_synchronize_rcu(&self) -> u64 {
        // A period already under way may have snapshotted before our
        // caller's detach: only the next one to start counts.
        host_rcu().started.load(SeqCst) + 1
    }
    fn poll_state_synchronize_rcu(&self, cookie: u64) -> bool {
        // Nothing drives grace periods on the host but `synchronize_rcu`
        // (tests call `PhysMem::rcu_barrier`); polling never waits.
        host_rcu().done.load(SeqCst) >= cookie
    }
    fn local_irq_save(&self) -> bool {
        RCU.with(|r| {
            let was = r.me.irq_off.load(SeqCst) % 2 == 0;
            if was {
                r.me.irq_off.fetch_add(1, SeqCst);
            }
            was
        })
    }
    fn local_irq_restore(&self, enabled: bool) {
        if enabled {
            RCU.with(|r| r.me.irq_off.fetch_add(1, SeqCst));
        }
    }
    fn flush_tlb(&self, cpus: &CpuBitmap, range: FlushRange) {
        // A shoot-down IPI is answered only with interrupts on: wait for
        // every thread whose "interrupts" were off when the flush began
        // (the lockless walker's section), as the kernel's flush does.
        wait_for_odd_sections(|r| &r.irq_off);
        THREAD_FLUSHES.with(|c| c.set(c.get() + 1));
        FLUSH_OBSERVER.with(|o| {
            if let Some(f) = o.borrow().as_ref() {
                f(cpus, range);
            }
        });
    }
    fn lockdep(&self) -> Option<&LockdepCpu> {
        Some(LOCKDEP.with(|l| *l))
    }
}

/// Waits until every other thread whose counter (`seq` or `irq_off`) was
/// odd at the call has moved on: the common core of a grace period and of
/// a shoot-down's wait for interrupts-off sections.
fn wait_for_odd_sections(counter: impl Fn(&RcuReader) -> &AtomicU64) {
    std::sync::atomic::fence(SeqCst);
    let me = RCU.with(|r| r.me.clone());
    let snapshot: Vec<(Arc<RcuReader>, u64)> = host_rcu()
        .readers
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !Arc::ptr_eq(r, &me))
        .map(|r| (r.clone(), counter(r).load(SeqCst)))
        .collect();
    for (r, seq) in snapshot {
        if seq % 2 == 1 {
            // Inside a section that began before us: wait for it to end
            // (in a loom model, by letting the other loom threads run).
            while counter(&r).load(SeqCst) == seq {
                #[cfg(not(loom))]
                std::thread::yield_now();
                #[cfg(loom)]
                loom::thread::yield_now();
            }
        }
    }
}

/// Read-side critical-section depth of the calling thread.
pub fn rcu_depth() -> usize {
    RCU.with(|r| r.depth.get())
}

/// A 4 KiB-aligned zeroed heap buffer playing physical memory `0..len`.
struct Buffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Buffer {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE as usize).unwrap();
        // SAFETY: non-zero size (callers ask for at least one region).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "test buffer allocation failed");
        Self { ptr, layout }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// A simulated machine: memory, its `PhysMem`, and a kernel PML4 whose upper
/// half has recognisable entries. Field order matters: `phys` (which points
/// into the buffer) drops before the buffer.
pub struct TestMachine {
    /// The machine's physical memory manager.
    pub phys: PhysMem,
    /// The "kernel" PML4 (a frame of this machine).
    pub kernel: KernelPgd,
    _buf: Buffer,
}

// SAFETY: the buffer is plain memory owned by the machine; all shared access
// to it goes through `PhysMem`, which is Sync.
unsafe impl Sync for TestMachine {}
// SAFETY: moving the machine moves the buffer's owner; the buffer has no
// thread affinity and `PhysMem` is Send.
unsafe impl Send for TestMachine {}

/// The fake kernel PGD entries every test machine has (slot, value).
pub const KERNEL_PGD_ENTRIES: [(usize, u64); 2] = [(256, 0x7000_0000 | 0x63), (511, 0x7000_1000 | 0x63)];

impl TestMachine {
    /// 1 MiB..8 MiB of RAM (one 4 MiB-aligned order-10 block among others).
    pub fn new() -> Self {
        Self::with_regions(&[(0x10_0000, 0x80_0000)])
    }

    /// RAM made of `regions` (start, end).
    pub fn with_regions(regions: &[(u64, u64)]) -> Self {
        Self::build(regions, |_| {})
    }

    /// RAM made of `regions`, with `boot` run on the bootmem before the
    /// allocator starts.
    pub fn build(regions: &[(u64, u64)], boot: impl FnOnce(&mut BootMem)) -> Self {
        let top = regions.iter().map(|r| r.1).max().expect("at least one region");
        let buf = Buffer::new(top as usize);
        let window = DirectMap::new(buf.ptr as u64);
        // SAFETY: every region lies inside the buffer (which spans physical
        // 0..top at `window`), nothing else uses it, and it outlives `phys`
        // (field order).
        let mut bm = unsafe { BootMem::new(regions, window) };
        boot(&mut bm);
        let phys = PhysMem::new(bm);
        let (pfn, _) = phys.alloc_pages_zeroed(0).expect("kernel PGD").into_raw();
        phys.page(pfn).unwrap().set_kind(crate::PageKind::Reserved);
        for (i, v) in KERNEL_PGD_ENTRIES {
            phys.slot(pfn.phys().add(8 * i as u64)).unwrap().store(v, Relaxed);
        }
        // SAFETY: a frame of this machine, page aligned, never freed (kind
        // Reserved, handle forgotten), accessed through slots only.
        let kernel = unsafe { KernelPgd::new(pfn.phys()) };
        Self { phys, kernel, _buf: buf }
    }

    /// Free frames once every detached table waiting for a grace period has
    /// been freed (`rcu_barrier`, then count): what leak checks compare.
    pub fn settled_free_pages(&self) -> u64 {
        self.phys.rcu_barrier();
        self.phys.nr_free_pages()
    }

    /// The kernel PGD entry in `slot` as seen by the test.
    pub fn kernel_entry(&self, slot: usize) -> Pgd {
        Pgd::from_raw(self.phys.slot(self.kernel.phys().add(8 * slot as u64)).unwrap().load(Relaxed))
    }
}

impl Default for TestMachine {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes a PMD value that fails `is_bad` checks: present, read-only.
pub fn bad_pmd_value() -> crate::Pmd {
    crate::Pmd::new(PhysAddr::new(0x20_0000), PteFlags::PRESENT)
}

struct CaptureLogger;

std::thread_local! {
    static LOGS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = std::format!("{} {}", record.level(), record.args());
        LOGS.with(|l| l.borrow_mut().push(line));
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once per process).
pub fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CaptureLogger).expect("logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The log lines this thread produced since the last call.
pub fn take_logs() -> Vec<String> {
    LOGS.with(|l| core::mem::take(&mut *l.borrow_mut()))
}
