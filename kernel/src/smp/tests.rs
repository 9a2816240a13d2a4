//! SMP tests: every CPU online and answering, IPIs, the barrier, the timer,
//! the TSCs agreeing, and TLB shoot-down correctness, deadlock freedom and
//! stress.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use arch::apic::vectors;
use arch::kvmap::{Caching, KvPage};
use arch::percpu::{self, NR_CPUS};
use ktest::ktest;
use spin::Mutex;
use x86_64::VirtAddr;
use x86_64::structures::paging::PhysFrame;

use super::*;

fn online() -> usize {
    percpu::online_count()
}

/// The number of CPUs online is what the command line expects
/// (`expect_cpus=N`, passed by xtask from `-smp N`) and what the MADT lists
/// (capped at NR_CPUS); a phantom CPU (`smp_phantom=ID`, which xtask adds
/// at -smp 3) timed out, was reported and did not stop the others; CPU 0 is
/// the boot CPU; APIC IDs are distinct.
#[ktest]
fn cpu_count() {
    let info = info().expect("smp::init did not run");
    let n = online();
    if let Some(expect) = crate::boot::cmdline::read().value("expect_cpus") {
        let expect: usize = expect.parse().expect("expect_cpus is not a number");
        assert_eq!(n, expect.min(NR_CPUS), "expected {expect} CPUs online (NR_CPUS {NR_CPUS})");
    }
    assert_eq!(info.failed, info.phantoms, "{} CPUs failed to start ({} phantoms)", info.failed, info.phantoms);
    let x2 = arch::cpu::features().contains(arch::cpu::Features::X2APIC);
    assert_eq!(info.mode == arch::apic::ApicMode::X2Apic, x2, "x2APIC must be used exactly when CPUID reports it");
    assert_eq!(n, info.madt_enabled.max(1) - info.beyond_nr_cpus, "online count disagrees with the MADT");
    assert!(percpu::cpu(0).is_online());
    let mut ids: Vec<u32> = percpu::online_cpus().map(|c| percpu::cpu(c).apic_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "two CPUs share an APIC ID");
}

/// Every online CPU runs a test body and reports in exactly once, on its
/// own per-CPU block (GS), with its own GDT and TSS, the shared IDT, its
/// APIC answering with the APIC ID the MADT gave, and SMEP/SMAP on.
#[ktest]
fn every_cpu_runs_and_reports_in() {
    #[derive(Clone, Copy, Default)]
    struct Report {
        runs: usize,
        apic_id: u32,
        gdt: u64,
        idt: u64,
        cr4: u64,
    }
    let reports: Mutex<[Report; NR_CPUS]> = Mutex::new([Report::default(); NR_CPUS]);
    on_each_cpu(|| {
        let cpu = percpu::cpu_id();
        let gdt = x86_64::instructions::tables::sgdt();
        let idt = x86_64::instructions::tables::sidt();
        let mut r = reports.lock();
        r[cpu].runs += 1;
        r[cpu].apic_id = apic::id();
        r[cpu].gdt = gdt.base.as_u64();
        r[cpu].idt = idt.base.as_u64();
        r[cpu].cr4 = x86_64::registers::control::Cr4::read_raw();
    });
    let r = reports.lock();
    let cpus: Vec<usize> = percpu::online_cpus().collect();
    for &c in &cpus {
        assert_eq!(r[c].runs, 1, "CPU {c} ran the body {} times", r[c].runs);
        assert_eq!(r[c].apic_id, percpu::cpu(c).apic_id(), "CPU {c}'s APIC reports another ID");
        assert_eq!(r[c].idt, r[0].idt, "CPU {c} has its own IDT");
        assert_eq!(r[c].cr4 & (3 << 20), r[0].cr4 & (3 << 20), "CPU {c} has different SMEP/SMAP");
        for &d in cpus.iter().filter(|&&d| d != c) {
            assert_ne!(r[c].gdt, r[d].gdt, "CPUs {c} and {d} share a GDT");
        }
    }
    let total: usize = r.iter().map(|x| x.runs).sum();
    assert_eq!(total, cpus.len(), "a CPU that is not online ran the body");
}

/// An IPI round trip to every other CPU, one at a time (a cross call that
/// runs there and is waited for), and a reschedule kick that each one takes.
#[ktest]
fn ipi_round_trip_to_every_cpu() {
    let me = percpu::cpu_id();
    let mut worst_ns = 0;
    for cpu in percpu::online_cpus().filter(|&c| c != me) {
        let ran_on = AtomicUsize::new(usize::MAX);
        let t0 = arch::time::now_ns();
        on_cpus(&CpuMask::single(cpu), || ran_on.store(percpu::cpu_id(), Ordering::Relaxed));
        worst_ns = worst_ns.max(arch::time::now_ns() - t0);
        assert_eq!(ran_on.load(Ordering::Relaxed), cpu, "the call ran on the wrong CPU");

        let before = reschedules(cpu);
        kick(cpu);
        let deadline = arch::time::now_ns() + 5_000_000_000;
        while reschedules(cpu) == before {
            assert!(arch::time::now_ns() < deadline, "CPU {cpu} never took the reschedule IPI");
            core::hint::spin_loop();
        }
    }
    log::info!("smp test: worst IPI round trip {} us over {} CPUs", worst_ns / 1000, online() - 1);
}

/// A fixed IPI to "everyone else" (the all-excluding-self shorthand when
/// every CPU is online) reaches each other CPU.
#[ktest]
fn ipi_to_all_but_self() {
    let me = percpu::cpu_id();
    let others = CpuMask::online().without(me);
    let before: Vec<u64> = (0..NR_CPUS).map(reschedules).collect();
    arch::ipi::send_fixed(&others, vectors::RESCHEDULE);
    let deadline = arch::time::now_ns() + 5_000_000_000;
    for cpu in others.iter() {
        while reschedules(cpu) == before[cpu] {
            assert!(arch::time::now_ns() < deadline, "CPU {cpu} never took the IPI");
            core::hint::spin_loop();
        }
    }
    assert_eq!(reschedules(me), before[me], "the sender interrupted itself");
}

/// The barrier keeps all CPUs in step for many rounds: nobody sees a slot
/// of the next round before everyone has checked the current one.
#[ktest]
fn barrier_keeps_cpus_in_step() {
    let n = online();
    // Every round needs every vCPU scheduled on the host: fewer rounds on
    // big, overcommitted machines.
    let rounds = (1600 / n).clamp(20, 200);
    let barrier = Barrier::new(n);
    let slots: [AtomicUsize; NR_CPUS] = [const { AtomicUsize::new(0) }; NR_CPUS];
    on_each_cpu(|| {
        let me = percpu::cpu_id();
        for round in 1..=rounds {
            slots[me].store(round, Ordering::Relaxed);
            barrier.wait();
            for c in percpu::online_cpus() {
                assert_eq!(slots[c].load(Ordering::Relaxed), round, "CPU {c} out of step");
            }
            barrier.wait();
        }
    });
}

/// Every CPU's TSC counts from the same origin: no CPU ever reads a TSC
/// value below one another CPU has already read (Linux's `check_tsc_warp`,
/// all CPUs at once, each reading and publishing under one lock). The
/// bench's window spans the first thread's start on one CPU to the last
/// thread's end on another (`Outcome::span_cycles`), and the storm tests'
/// overlap checks compare TSCs across CPUs too: an offset between CPUs
/// would add to, or hide in, those spans.
#[ktest]
fn tsc_never_goes_backwards_across_cpus() {
    // Each CPU reads for this many of its own TSC cycles (about 20 ms),
    // long enough to interleave with the others however the host runs them.
    let span = 20_000 * arch::time::tsc_per_us().unwrap_or(1);
    // The largest value read so far, and how far below it a later read was.
    let last = Mutex::new(0u64);
    let worst = AtomicU64::new(0);
    let (reads, warps) = (AtomicU64::new(0), AtomicU64::new(0));
    let barrier = Barrier::new(online());
    on_each_cpu(|| {
        barrier.wait();
        let start = arch::time::rdtsc();
        loop {
            let (prev, now) = {
                let mut last = last.lock();
                let prev = *last;
                let now = arch::time::rdtsc();
                *last = now.max(prev);
                (prev, now)
            };
            reads.fetch_add(1, Ordering::Relaxed);
            if now < prev {
                warps.fetch_add(1, Ordering::Relaxed);
                worst.fetch_max(prev - now, Ordering::Relaxed);
            }
            if now.wrapping_sub(start) > span {
                break;
            }
        }
    });
    let (warps, worst, reads) = (warps.into_inner(), worst.into_inner(), reads.into_inner());
    log::info!("tsc: {reads} reads on {} CPUs, {warps} went backwards (worst by {worst} cycles)", online());
    assert_eq!(
        warps, 0,
        "{warps} of {reads} TSC reads were below one another CPU had read, the worst by {worst} cycles"
    );
}

/// The local-APIC timer ticks on every CPU at roughly TICK_HZ. Never more
/// than twice as often, in any window; at least half as often in one of
/// five: a host that keeps a vCPU off its core for longer than a tick loses
/// that CPU's ticks (QEMU merges a tick into one still pending) while the
/// TSC keeps counting, so one window alone can read low without a bug.
#[ktest]
fn timer_ticks_on_every_cpu() {
    const WAIT_MS: u64 = 500;
    const WINDOWS: usize = 5;
    let was_enabled = arch::irq::enabled();
    arch::irq::enable();
    let mut last_short = None;
    for _ in 0..WINDOWS {
        let before: Vec<u64> = (0..NR_CPUS).map(ticks).collect();
        let t0 = arch::time::now_ns();
        arch::time::delay_us(WAIT_MS * 1000);
        let elapsed_ms = (arch::time::now_ns() - t0) / 1_000_000;
        let expect = elapsed_ms * u64::from(TICK_HZ) / 1000;
        last_short = None;
        for cpu in percpu::online_cpus() {
            let got = ticks(cpu) - before[cpu];
            assert!(got <= expect * 2 + 2, "CPU {cpu}: {got} ticks in {elapsed_ms} ms, expected about {expect}");
            if got * 10 < expect * 5 {
                last_short = Some((cpu, got, elapsed_ms, expect));
            }
        }
        if last_short.is_none() {
            break;
        }
    }
    if !was_enabled {
        arch::irq::disable();
    }
    if let Some((cpu, got, elapsed_ms, expect)) = last_short {
        panic!("CPU {cpu}: {got} ticks in {elapsed_ms} ms, expected about {expect} (short in {WINDOWS} windows)");
    }
}

/// Past the threshold a range is flushed with one full flush; below it,
/// page by page.
#[ktest]
fn large_ranges_degrade_to_a_full_flush() {
    use arch::tlb::{FULL_FLUSH_THRESHOLD, flush_local, stats};
    arch::irq::without_interrupts(|| {
        let me = percpu::cpu_id();
        let base = VirtAddr::new(arch::kvmap::WINDOW_BASE);
        let (pages0, full0, _, _) = stats(me);
        flush_local(TlbRange::pages(base, FULL_FLUSH_THRESHOLD));
        let (pages1, full1, _, _) = stats(me);
        assert_eq!((pages1 - pages0, full1 - full0), (FULL_FLUSH_THRESHOLD, 0));
        flush_local(TlbRange::pages(base, FULL_FLUSH_THRESHOLD + 1));
        flush_local(TlbRange::ALL);
        let (pages2, full2, _, _) = stats(me);
        assert_eq!((pages2 - pages1, full2 - full1), (0, 2));
        assert_eq!(TlbRange::range(base, base + 4097u64).page_count(), Some(2));
    });
}

/// Two frames with distinct contents and a window page mapped to the first.
struct RemapFixture {
    frames: [Option<mm::Frames<'static>>; 2],
    page: Option<KvPage>,
}

const PATTERN: [u64; 2] = [0xaaaa_aaaa_0000_0001, 0xbbbb_bbbb_0000_0002];

impl RemapFixture {
    fn new() -> Self {
        let frames = [0, 1].map(|i| {
            let f = mm::alloc_pages_zeroed(0).expect("no frames");
            // SAFETY: the frame is ours; the direct map maps it.
            unsafe { (f.virt() as *mut u64).write_volatile(PATTERN[i]) };
            Some(f)
        });
        let mut fx = Self { frames, page: None };
        fx.page = Some(KvPage::map(fx.frame(0), Caching::WriteBack).expect("kernel window full"));
        fx
    }

    fn frame(&self, i: usize) -> PhysFrame {
        let pa = self.frames[i].as_ref().unwrap().phys_addr().as_u64();
        PhysFrame::containing_address(x86_64::PhysAddr::new(pa))
    }

    fn addr(&self) -> VirtAddr {
        self.page.as_ref().unwrap().addr()
    }

    fn read(&self) -> u64 {
        // SAFETY: the page maps one of our two frames for as long as `self`.
        unsafe { (self.addr().as_ptr::<u64>()).read_volatile() }
    }
}

impl Drop for RemapFixture {
    fn drop(&mut self) {
        drop(self.page.take()); // Unmaps and shoots down before the frames go.
        for f in self.frames.iter_mut() {
            mm::free_pages(f.take().unwrap());
        }
    }
}

/// Shoot-down correctness: every CPU reads through a kernel mapping (and so
/// caches it), one CPU points the mapping at another frame and shoots down,
/// and then every CPU reads the new frame. Also reports how many CPUs still
/// saw the old frame *before* the shoot-down, which shows that the TLBs
/// really did hold the stale entry the shoot-down had to remove.
#[ktest]
fn shootdown_makes_every_cpu_see_the_new_frame() {
    let fx = RemapFixture::new();
    let n = online();
    let initiator = percpu::cpu_id();
    let barrier = Barrier::new(n);
    let pending: Mutex<Option<PendingFlush>> = Mutex::new(None);
    let stale = AtomicUsize::new(0);
    let fresh = AtomicUsize::new(0);
    on_each_cpu(|| {
        let me = percpu::cpu_id();
        assert_eq!(fx.read(), PATTERN[0], "CPU {me} read the wrong frame before the remap");
        barrier.wait();
        if me == initiator {
            let page = fx.page.as_ref().unwrap();
            *pending.lock() = Some(page.remap(fx.frame(1), Caching::WriteBack));
        }
        barrier.wait();
        if fx.read() == PATTERN[0] {
            stale.fetch_add(1, Ordering::Relaxed);
        }
        barrier.wait();
        if me == initiator {
            let flush = pending.lock().take().unwrap();
            flush.shootdown(&CpuMask::online());
        }
        barrier.wait();
        let v = fx.read();
        assert_eq!(v, PATTERN[1], "CPU {me} still reads the old frame after the shoot-down");
        fresh.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(fresh.load(Ordering::Relaxed), n);
    log::info!(
        "smp test: before the shoot-down {} of {n} CPUs still read the old frame through their TLB; after it, none",
        stale.load(Ordering::Relaxed)
    );
}

/// The classic deadlock, made legal: CPU A holds a spinlock with interrupts
/// off and shoots down at CPU B, while B spins on that lock with interrupts
/// off. B's lock loop services flush requests (as the mm HAL's `spin_wait`
/// does), so A's shoot-down completes and A releases the lock.
#[ktest]
fn shootdown_while_the_target_spins_on_our_lock() {
    let me = percpu::cpu_id();
    let Some(other) = percpu::online_cpus().find(|&c| c != me) else { return };
    let lock = Mutex::new(0u64);
    let locked = AtomicBool::new(false);
    let spinning = AtomicBool::new(false);
    let page = VirtAddr::new(arch::kvmap::WINDOW_BASE);
    on_cpus(&(CpuMask::single(me) | CpuMask::single(other)), || {
        if percpu::cpu_id() == me {
            let mut guard = lock.lock();
            locked.store(true, Ordering::Release);
            while !spinning.load(Ordering::Acquire) {
                arch::tlb::service_pending();
                core::hint::spin_loop();
            }
            shootdown(&CpuMask::single(other), TlbRange::page(page));
            *guard += 1;
        } else {
            while !locked.load(Ordering::Acquire) {
                core::hint::spin_loop();
            }
            spinning.store(true, Ordering::Release);
            loop {
                if let Some(mut g) = lock.try_lock() {
                    *g += 1;
                    break;
                }
                arch::tlb::service_pending();
                core::hint::spin_loop();
            }
        }
    });
    assert_eq!(*lock.lock(), 2);
}

fn sum_serviced() -> u64 {
    (0..NR_CPUS).map(|c| arch::tlb::stats(c).2).sum()
}

fn range_for(i: u64, base: VirtAddr) -> TlbRange {
    match i % 4 {
        0 => TlbRange::page(base),
        1 => TlbRange::pages(base, 8),
        2 => TlbRange::pages(base, arch::tlb::FULL_FLUSH_THRESHOLD + 5),
        _ => TlbRange::ALL,
    }
}

/// Stress with interrupts off: every CPU at once issues up to a thousand
/// shoot-downs (8000 in all at -smp 8; fewer each, at least 250, on bigger
/// machines) at all the others (mixed sizes) from a cross-called function,
/// i.e. with interrupts disabled, so every acknowledgement has to come from
/// a wait loop servicing its own queue. No deadlock, and the acknowledgement
/// count adds up exactly.
#[ktest]
fn shootdown_stress_all_cpus_interrupts_off() {
    let n = online() as u64;
    let per_cpu = (8000 / n).clamp(250, 1000);
    let base = VirtAddr::new(arch::kvmap::WINDOW_BASE);
    let before = sum_serviced();
    let barrier = Barrier::new(n as usize);
    let t0 = arch::time::now_ns();
    on_each_cpu(|| {
        let others = CpuMask::online().without(percpu::cpu_id());
        barrier.wait();
        for i in 0..per_cpu {
            shootdown(&others, range_for(i, base));
        }
        barrier.wait();
    });
    let ms = (arch::time::now_ns() - t0) / 1_000_000;
    let serviced = sum_serviced() - before;
    assert_eq!(serviced, per_cpu * n * (n - 1), "acknowledged requests do not add up");
    log::info!("smp test: {} concurrent shoot-downs from {n} CPUs, {serviced} acknowledgements, {ms} ms", per_cpu * n);
}

static TASK_SHOTS: AtomicU64 = AtomicU64::new(0);
static TASK_STOP: AtomicBool = AtomicBool::new(false);
static TASK_START: AtomicUsize = AtomicUsize::new(0);

/// Even CPUs: shoot at everyone, `arg` times. Runs with interrupts on
/// between shoot-downs.
extern "C" fn shooter(arg: usize) -> ! {
    let base = VirtAddr::new(arch::kvmap::WINDOW_BASE);
    TASK_START.fetch_add(1, Ordering::AcqRel);
    for i in 0..arg as u64 {
        shootdown(&CpuMask::online(), range_for(i, base));
        TASK_SHOTS.fetch_add(1, Ordering::Relaxed);
    }
    crate::sched::exit_current(0)
}

/// Odd CPUs: ordinary work with interrupts on, so their flushes arrive as
/// real TLB_SHOOTDOWN interrupts.
extern "C" fn bystander(_: usize) -> ! {
    TASK_START.fetch_add(1, Ordering::AcqRel);
    let mut x = 0u64;
    while !TASK_STOP.load(Ordering::Acquire) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        core::hint::spin_loop();
    }
    core::hint::black_box(x);
    crate::sched::exit_current(0)
}

/// Stress through the interrupt path: tasks pinned to every CPU, the even
/// ones issuing thousands of shoot-downs between them, the odd ones running
/// with interrupts enabled and taking the requests as TLB_SHOOTDOWN IPIs.
#[ktest]
fn shootdown_stress_from_tasks_through_interrupts() {
    let me = percpu::cpu_id();
    let cpus: Vec<usize> = percpu::online_cpus().collect();
    // 2000 in all at -smp 8; at least 100 per shooter on big machines.
    let per_shooter = (4000 / cpus.len()).clamp(100, 500);
    TASK_SHOTS.store(0, Ordering::Relaxed);
    TASK_STOP.store(false, Ordering::Relaxed);
    TASK_START.store(0, Ordering::Relaxed);
    let irq_before: Vec<u64> = (0..NR_CPUS).map(arch::ipi::tlb_ipis).collect();
    let mut shooters = Vec::new();
    let mut bystanders = Vec::new();
    for &cpu in &cpus {
        let (name, entry): (&str, extern "C" fn(usize) -> !) =
            if cpu % 2 == 0 { ("tlb-shooter", shooter) } else { ("tlb-bystander", bystander) };
        let task = crate::sched::Task::new_kernel(alloc::format!("{name}/{cpu}"), cpu, entry, per_shooter)
            .expect("out of memory");
        let task: Arc<crate::sched::Task> = crate::sched::spawn(task);
        if cpu % 2 == 0 { shooters.push(task) } else { bystanders.push(task) }
    }
    let t0 = arch::time::now_ns();
    for t in &shooters {
        t.join();
    }
    TASK_STOP.store(true, Ordering::Release);
    for t in &bystanders {
        t.join();
    }
    let ms = (arch::time::now_ns() - t0) / 1_000_000;
    assert_eq!(TASK_SHOTS.load(Ordering::Relaxed), (per_shooter * shooters.len()) as u64);
    let via_irq: u64 = cpus.iter().filter(|&&c| c % 2 == 1).map(|&c| arch::ipi::tlb_ipis(c) - irq_before[c]).sum();
    if !bystanders.is_empty() {
        assert!(via_irq > 0, "no bystander ever took a TLB_SHOOTDOWN interrupt");
    }
    log::info!(
        "smp test: {} shoot-downs from {} tasks, {} TLB interrupts on {} bystanders, {ms} ms (test CPU {me})",
        TASK_SHOTS.load(Ordering::Relaxed),
        shooters.len(),
        via_irq,
        bystanders.len()
    );
}

/// The runner's own failure path for SMP (runs only with `selftests`).
mod selftest {
    use super::*;

    /// A panic on another CPU, while the test CPU waits for it with
    /// interrupts off, is reported as this test's failure: the panicking CPU
    /// stops the others with an NMI (the waiting one included), prints, and
    /// ends the run. xtask expects exactly that (`-smp 3`).
    #[ktest]
    fn panic_on_another_cpu() {
        let me = percpu::cpu_id();
        let other = percpu::online_cpus().find(|&c| c != me).expect("needs two CPUs");
        on_cpus(&CpuMask::single(other), || panic!("deliberate panic on CPU {}", percpu::cpu_id()));
        unreachable!("the panic on CPU {other} did not end the run");
    }
}
