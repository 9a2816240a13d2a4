//! Inter-processor interrupts: sending them (to one CPU, a set, all but
//! self), cross-CPU function calls that wait for completion, and stopping the
//! other CPUs with an NMI when the system dies.
//!
//! # Cross-call channels
//!
//! A `Channel` carries requests of one kind (function calls, TLB flushes).
//! Each *sender* CPU owns one request slot per channel: two payload words
//! and a count of targets that have not finished. Each *target* CPU has an
//! inbox, an [`AtomicCpuMask`] of the senders with work for it. Sending sets
//! the sender's bit in each target's inbox (AcqRel: the payload and anything
//! the sender wrote before are visible to the target that sees the bit), then
//! interrupts the target. A target empties its inbox with one atomic swap per
//! word, runs each request and decrements its sender's count (Release: the
//! sender that reads 0 sees the work's effects).
//!
//! No locks, no allocation: a sender has at most one request per channel in
//! flight (it disables interrupts from posting until the count reaches 0,
//! and nothing it runs meanwhile posts on the same channel), so the slot is
//! never overwritten while targets still read it.
//!
//! While a sender waits it services its own inbox, so two CPUs that wait on
//! each other with interrupts off both make progress (see `tlb.rs` for the
//! argument in full).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::apic::{self, DeliveryMode, Destination, Ipi, vectors};
use crate::cpumask::{AtomicCpuMask, CpuMask};
use crate::percpu::{self, NR_CPUS};

/// A sender's request slot.
struct Slot {
    a: AtomicU64,
    b: AtomicU64,
    /// Targets that have not completed the request.
    pending: AtomicUsize,
}

/// One kind of cross-CPU request, delivered on `vector`.
pub(crate) struct Channel {
    vector: u8,
    slots: [Slot; NR_CPUS],
    /// `inbox[t]`: the senders with a request for CPU `t`.
    inbox: [AtomicCpuMask; NR_CPUS],
}

/// How long a sender waits for acknowledgements before declaring the system
/// broken. Generous: under TCG with many vCPUs per host core a target may
/// not run for a while.
const ACK_TIMEOUT_US: u64 = 20_000_000;

impl Channel {
    const fn new(vector: u8) -> Self {
        Self {
            vector,
            slots: [const { Slot { a: AtomicU64::new(0), b: AtomicU64::new(0), pending: AtomicUsize::new(0) } };
                NR_CPUS],
            inbox: [const { AtomicCpuMask::new() }; NR_CPUS],
        }
    }

    /// Posts `(a, b)` from this CPU to every CPU in `targets` (which must not
    /// contain this CPU) and interrupts them. Interrupts must be disabled
    /// and stay so until [`Channel::wait_done`] returns.
    pub(crate) fn post(&self, targets: &CpuMask, a: u64, b: u64) {
        debug_assert!(!crate::irq::enabled(), "cross-call posted with interrupts enabled");
        let me = percpu::cpu_id();
        debug_assert!(!targets.contains(me));
        let slot = &self.slots[me];
        assert_eq!(slot.pending.load(Ordering::Acquire), 0, "CPU {me} posted a second request on one channel");
        slot.a.store(a, Ordering::Relaxed);
        slot.b.store(b, Ordering::Relaxed);
        slot.pending.store(targets.count(), Ordering::Relaxed);
        for t in targets.iter() {
            // AcqRel (inside `set`): publishes the slot to the target.
            self.inbox[t].set(me);
        }
        send_fixed(targets, self.vector);
    }

    /// Spins until every target of this CPU's request has completed it,
    /// calling `service` on every turn (which must service this CPU's own
    /// inboxes, so CPUs waiting on each other cannot deadlock).
    pub(crate) fn wait_done(&self, me: usize, mut service: impl FnMut()) {
        let slot = &self.slots[me];
        let start = crate::time::rdtsc();
        let limit = crate::time::tsc_per_us().unwrap_or(3000) * ACK_TIMEOUT_US;
        let mut turns = 0u32;
        while slot.pending.load(Ordering::Acquire) != 0 {
            service();
            core::hint::spin_loop();
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(1024) && crate::time::rdtsc() - start > limit {
                self.report_stuck(me);
            }
        }
    }

    #[cold]
    fn report_stuck(&self, me: usize) -> ! {
        let stuck: CpuMask = (0..NR_CPUS).filter(|&t| self.inbox[t].contains(me)).collect();
        panic!(
            "CPU {me}: cross-call on vector {:#x} not acknowledged after {} s; still queued at CPUs {stuck:?}, {} outstanding",
            self.vector,
            ACK_TIMEOUT_US / 1_000_000,
            self.slots[me].pending.load(Ordering::Relaxed)
        );
    }

    /// Whether CPU `me` has requests waiting on this channel.
    #[inline]
    pub(crate) fn has_incoming(&self, me: usize) -> bool {
        !self.inbox[me].is_empty()
    }

    /// Runs every request queued for CPU `me` (`run(a, b)`), completing each.
    /// Returns how many it ran.
    pub(crate) fn drain(&self, me: usize, mut run: impl FnMut(u64, u64)) -> usize {
        let mut n = 0;
        loop {
            let senders = self.inbox[me].take();
            if senders.is_empty() {
                return n;
            }
            for s in senders.iter() {
                let slot = &self.slots[s];
                run(slot.a.load(Ordering::Relaxed), slot.b.load(Ordering::Relaxed));
                // Release: the sender that sees the count drop sees our work.
                slot.pending.fetch_sub(1, Ordering::Release);
                n += 1;
            }
        }
    }
}

/// TLB flush requests (see `tlb.rs`).
pub(crate) static TLB: Channel = Channel::new(vectors::TLB_SHOOTDOWN);
/// Function-call requests: `a` is the address of a `&dyn Fn()`, `b` unused.
static CALLS: Channel = Channel::new(vectors::CALL_FUNCTION);

/// Per CPU: set while it runs a cross-called function (which must not start
/// another cross-call: its slot may be in use).
static IN_CALL: [AtomicBool; NR_CPUS] = [const { AtomicBool::new(false) }; NR_CPUS];

/// Sends a fixed IPI on `vector` to every CPU in `targets`. Uses the
/// all-but-self shorthand when `targets` is every other CPU in the system.
pub fn send_fixed(targets: &CpuMask, vector: u8) {
    let me = percpu::cpu_id();
    let online = percpu::online_mask();
    // The shorthand reaches every enabled APIC, so only when every CPU the
    // firmware reported is online and all of them but us are targets.
    if online.count() == present_cpus() && *targets == online.without(me) && targets.count() > 1 {
        send_all_but_self(vector);
        return;
    }
    for t in targets.iter() {
        apic::send_ipi(percpu::cpu(t).apic_id(), vector);
    }
}

/// Sends a fixed IPI on `vector` to CPU `cpu`.
pub fn send_to(cpu: usize, vector: u8) {
    apic::send_ipi(percpu::cpu(cpu).apic_id(), vector);
}

/// Sends a fixed IPI on `vector` to every other CPU with an enabled APIC
/// (one command: the all-excluding-self shorthand). Only meaningful once
/// every present CPU is online; [`send_fixed`] picks it when that holds.
pub fn send_all_but_self(vector: u8) {
    apic::send(Ipi { mode: DeliveryMode::Fixed, vector, dest: Destination::AllExcludingSelf });
}

/// Number of CPUs the firmware listed as present and enabled (set at boot).
static PRESENT: AtomicUsize = AtomicUsize::new(1);

/// Records how many CPUs the firmware reports (including any left offline),
/// which decides whether the all-but-self shorthand may be used.
pub fn set_present_cpus(n: usize) {
    PRESENT.store(n, Ordering::Relaxed);
}

fn present_cpus() -> usize {
    PRESENT.load(Ordering::Relaxed)
}

/// A type-erased `&dyn Fn()` passed through a slot as the address of a fat
/// reference living on the sender's stack.
type CallRef<'a> = &'a (dyn Fn() + Sync);

/// Runs `f` on every online CPU in `mask` (this one too, if included) and
/// returns when all have finished. On other CPUs `f` runs in interrupt
/// context; here it runs with interrupts disabled.
///
/// Rules for `f`: it must not block or sleep, must not take a lock that a CPU
/// may hold while waiting for this call, and must not call `on_cpus` or
/// `on_each_cpu` itself. TLB shoot-downs inside `f` are fine. Callable with
/// interrupts on or off, but not while holding spinlocks that others take
/// with interrupts disabled (they would not service the request).
pub fn on_cpus(mask: &CpuMask, f: impl Fn() + Sync) {
    let f: CallRef = &f;
    crate::irq::without_interrupts(|| {
        let me = percpu::cpu_id();
        assert!(!IN_CALL[me].load(Ordering::Relaxed), "on_cpus called from a cross-called function");
        let targets = *mask & percpu::online_mask().without(me);
        if !targets.is_empty() {
            CALLS.post(&targets, &f as *const CallRef as u64, 0);
        }
        if mask.contains(me) {
            run_call(me, f);
        }
        if !targets.is_empty() {
            CALLS.wait_done(me, || {
                crate::tlb::service_pending();
                service_calls(me);
            });
        }
    });
}

/// Runs `f` on every online CPU, this one included, and waits for all.
/// See [`on_cpus`] for what `f` may do.
pub fn on_each_cpu(f: impl Fn() + Sync) {
    on_cpus(&CpuMask::online(), f);
}

fn run_call(me: usize, f: CallRef) {
    IN_CALL[me].store(true, Ordering::Relaxed);
    f();
    IN_CALL[me].store(false, Ordering::Relaxed);
}

fn service_calls(me: usize) {
    CALLS.drain(me, |a, _| {
        // SAFETY: `a` is the address of a `CallRef` on the stack of a sender
        // that is spinning in `wait_done` until we decrement its count (after
        // this closure returns), so the reference and its target are alive.
        let f: CallRef = unsafe { *(a as *const CallRef) };
        run_call(me, f);
    });
}

/// The `CALL_FUNCTION` interrupt: runs the functions queued for this CPU.
/// The caller sends the EOI.
pub fn handle_call_function_ipi() {
    service_calls(percpu::cpu_id());
}

/// Per CPU: `TLB_SHOOTDOWN` interrupts taken (requests serviced from a wait
/// loop are not counted here; see `tlb::stats`).
static TLB_IPIS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];

/// `TLB_SHOOTDOWN` interrupts taken by `cpu`.
pub fn tlb_ipis(cpu: usize) -> u64 {
    TLB_IPIS[cpu].load(Ordering::Relaxed)
}

/// The `TLB_SHOOTDOWN` interrupt: performs the flushes queued for this CPU.
/// The caller sends the EOI.
pub fn handle_tlb_ipi() {
    TLB_IPIS[percpu::cpu_id()].fetch_add(1, Ordering::Relaxed);
    crate::tlb::service_pending();
}

// ---------------------------------------------------------------------------
// Stopping the other CPUs (panic, oops).

/// CPU number + 1 of the CPU that is stopping the others, 0 if none.
static STOPPER: AtomicUsize = AtomicUsize::new(0);
/// CPUs that have parked after the stop NMI.
static STOPPED: AtomicCpuMask = AtomicCpuMask::new();

/// Stops every other online CPU with an NMI so that a dying CPU's output is
/// not interleaved with theirs and they stop changing state. Waits briefly
/// (100 ms) for them to park.
///
/// Returns `true` if this CPU is the one doing the stopping (or the system
/// has a single CPU), `false` if another CPU started first, in which case
/// the caller should [`park`] (that CPU is reporting, and its NMI is on the
/// way).
pub fn stop_other_cpus() -> bool {
    let me = percpu::cpu_id();
    match STOPPER.compare_exchange(0, me + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        // A nested stop on the same CPU (a panic while reporting): go on.
        Err(owner) if owner == me + 1 => return true,
        Err(_) => return false,
    }
    if apic::mode().is_none() {
        return true; // Early boot: no APIC, no other CPUs.
    }
    let others = percpu::online_mask().without(me);
    for t in others.iter() {
        apic::send_nmi(percpu::cpu(t).apic_id());
    }
    let deadline = crate::time::rdtsc() + crate::time::tsc_per_us().unwrap_or(3000) * 100_000;
    while !STOPPED.load().is_superset(&others) && crate::time::rdtsc() < deadline {
        core::hint::spin_loop();
    }
    true
}

/// How many CPUs have parked after a stop (for the dying CPU's report).
pub fn stopped_count() -> usize {
    STOPPED.load().count()
}

/// What each stopped CPU prints before it parks, when the stopper asked for
/// reports ([`stop_other_cpus_reporting`]).
static STOP_REPORT: spin::Once<fn(&crate::trap::TrapFrame)> = spin::Once::new();
/// Held by the stopped CPU that is printing its report: one at a time.
static REPORT_LOCK: AtomicBool = AtomicBool::new(false);

/// As [`stop_other_cpus`], but every CPU the NMI stops first runs `report`
/// with the state it was interrupted in (one CPU at a time), then parks.
/// Waits up to `wait_ms` for all of them to have reported and parked. A
/// lockup watchdog uses it to print what every CPU was doing.
pub fn stop_other_cpus_reporting(report: fn(&crate::trap::TrapFrame), wait_ms: u64) -> bool {
    STOP_REPORT.call_once(|| report);
    if !stop_other_cpus() {
        return false;
    }
    let others = percpu::online_mask().without(percpu::cpu_id());
    let deadline = crate::time::rdtsc() + crate::time::tsc_per_us().unwrap_or(3000) * 1000 * wait_ms;
    while !STOPPED.load().is_superset(&others) && crate::time::rdtsc() < deadline {
        core::hint::spin_loop();
    }
    true
}

/// The stop NMI arrived on this CPU (the trap layer's NMI path): print its
/// report if the stopper asked for one, then [`park`].
pub fn stopped_by_nmi(frame: &crate::trap::TrapFrame) -> ! {
    if let Some(report) = STOP_REPORT.get() {
        while REPORT_LOCK.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        report(frame);
        REPORT_LOCK.store(false, Ordering::Release);
    }
    park()
}

/// Whether a stop is in progress and this CPU is not the one stopping.
/// Checked by the NMI handler.
pub fn stop_requested_for_me() -> bool {
    let owner = STOPPER.load(Ordering::Acquire);
    owner != 0 && owner != percpu::cpu_id() + 1
}

/// Parks this CPU for good: interrupts off, halted. NMIs that arrive while
/// parked re-enter the NMI handler, which parks again.
pub fn park() -> ! {
    crate::irq::disable();
    STOPPED.set(percpu::cpu_id());
    loop {
        crate::irq::halt();
    }
}
