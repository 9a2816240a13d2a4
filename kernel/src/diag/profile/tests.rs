//! The profiler on real CPUs: samples of a CPU that spins in a known
//! function fall inside it, with the frame-pointer chain above it; a CPU
//! that spins on a held lock is tagged with the lock's class, and only
//! while it waits. (Symbolization is xtask's: `cargo xtask test` also runs
//! `cargo xtask profile --cpus 2` and looks for `handle_mm_fault` in the
//! flame graph.)

use core::sync::atomic::AtomicU32;
use core::sync::atomic::Ordering::SeqCst;

use ktest::ktest;
use mm::lock::{LockClass, LockLevel, RawSpinLock};

use super::*;
use crate::sched;

/// Sampling rate of these tests.
const RATE: u32 = 1000;

core::arch::global_asm!(
    r#"
.p2align 4
.global ptlk_profile_spin
// rdi = TSC deadline: spins until the TSC passes it. A frame of its own,
// as compiled code has (push rbp; mov rbp, rsp).
ptlk_profile_spin:
    push rbp
    mov rbp, rsp
.global ptlk_profile_spin_loop
ptlk_profile_spin_loop:
    pause
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rdi
    jb ptlk_profile_spin_loop
    pop rbp
    ret
.global ptlk_profile_spin_end
ptlk_profile_spin_end:

.p2align 4
.global ptlk_profile_outer
// rdi = TSC deadline: calls ptlk_profile_spin, so every sample in its loop
// has ptlk_profile_outer_ret as its first return address.
ptlk_profile_outer:
    push rbp
    mov rbp, rsp
    call ptlk_profile_spin
.global ptlk_profile_outer_ret
ptlk_profile_outer_ret:
    pop rbp
    ret
"#
);

unsafe extern "C" {
    fn ptlk_profile_outer(deadline: u64);
    static ptlk_profile_spin: u8;
    static ptlk_profile_spin_loop: u8;
    static ptlk_profile_spin_end: u8;
    static ptlk_profile_outer_ret: u8;
}

/// Spins in `ptlk_profile_spin` for `ms` milliseconds.
fn spin_in_known_function(ms: u64) {
    let deadline = arch::time::rdtsc() + ms * 1000 * arch::time::tsc_per_us().unwrap_or(1000);
    // SAFETY: the function reads the TSC and uses only its own stack frame
    // and rax/rdx (caller-saved); it returns once the TSC passes `deadline`.
    unsafe { ptlk_profile_outer(deadline) };
}

/// Samples `cpu` has taken in the running session.
fn taken(cpu: usize) -> u64 {
    CPUS[cpu].samples.load(SeqCst)
}

/// Enough samples for a verdict, and a bound on waiting for them: a vCPU
/// that the host runs a quarter of the time (8 vCPUs on 2 busy cores)
/// takes a quarter of the samples a dedicated one would.
const WANT: u64 = 100;
const PATIENCE_MS: u64 = 20_000;

/// Waits (with `step`) until `cpu` has taken `n` more samples than `from`,
/// or the patience runs out.
fn until_sampled(cpu: usize, from: u64, n: u64, mut step: impl FnMut()) {
    let t0 = arch::time::now_ns();
    while taken(cpu) < from + n && arch::time::now_ns() - t0 < PATIENCE_MS * 1_000_000 {
        step();
    }
}

/// A CPU that spins in a known function for a while collects samples
/// whose RIP lies inside that function, and whose first return address is
/// the instruction after the call that entered it (the frame-pointer chain
/// from the trap frame), then more kernel frames above it.
#[ktest]
fn samples_of_a_cpu_spinning_in_a_function_fall_inside_it() {
    assert!(arch::irq::enabled(), "the test runs with interrupts on");
    let me = percpu::cpu_id();
    let spin = &raw const ptlk_profile_spin as u64..&raw const ptlk_profile_spin_end as u64;
    let loop_start = &raw const ptlk_profile_spin_loop as u64;
    let outer_ret = &raw const ptlk_profile_outer_ret as u64;
    start(RATE).expect("profiler start");
    assert_eq!(start(RATE), Err(StartError::Busy), "a second session while one runs");
    until_sampled(me, 0, WANT, || spin_in_known_function(20));
    let rec = stop().expect("a session was running");
    assert!(stop().is_none(), "the session ended");
    let samples: Vec<Sample<'_>> = rec.cpu(me).collect();
    let inside: Vec<&Sample<'_>> = samples.iter().filter(|s| spin.contains(&s.addrs[0])).collect();
    log::info!("profile test: {} of {} samples of CPU {me} inside ptlk_profile_spin", inside.len(), samples.len());
    assert!(
        inside.len() as u64 >= WANT / 2 && inside.len() * 10 >= samples.len() * 8,
        "{} of {} samples of CPU {me} inside ptlk_profile_spin ({spin:#x?})",
        inside.len(),
        samples.len()
    );
    for s in inside.iter().filter(|s| s.addrs[0] >= loop_start) {
        assert_eq!(s.exact & 1, 1, "the interrupted RIP is an exact address");
        assert!(s.addrs.len() >= 3, "chain too short: {:#x?}", s.addrs);
        assert_eq!(s.addrs[1], outer_ret, "first return address: {:#x?}", s.addrs);
        assert!(s.addrs[2] >= 0xffff_ffff_8000_0000, "the caller is kernel code: {:#x?}", s.addrs);
        assert!(s.class.is_none(), "not spinning on a lock");
    }
    // The ticks went on at TICK_HZ, not at the sampling rate, and the
    // timer is back at TICK_HZ: the smp tick test checks the latter rate.
}

static HELD: RawSpinLock = RawSpinLock::new(LockClass::PteLock);
/// 1: the spinner is about to take `HELD`; 2: it has it; 3: it is done.
static STAGE: AtomicU32 = AtomicU32::new(0);

extern "C" fn spinner(_: usize) -> ! {
    STAGE.store(1, SeqCst);
    let g = HELD.lock(LockLevel::Untracked);
    STAGE.store(2, SeqCst);
    drop(g);
    // Not spinning on a lock any more: these samples carry no class.
    let me = percpu::cpu_id();
    until_sampled(me, taken(me), WANT / 5, || spin_in_known_function(20));
    STAGE.store(3, SeqCst);
    sched::exit_current(0)
}

/// A CPU spinning on a held lock is tagged with the lock's class while it
/// waits, and not after it got the lock; the holder is not tagged.
#[ktest]
fn a_cpu_spinning_on_a_held_lock_is_tagged_with_its_class() {
    let me = percpu::cpu_id();
    let Some(other) = percpu::online_cpus().find(|&c| c != me) else {
        return; // One CPU: nobody to spin on our lock.
    };
    STAGE.store(0, SeqCst);
    let guard = HELD.lock(LockLevel::Untracked);
    start(RATE).expect("profiler start");
    let t = sched::spawn(sched::Task::new_kernel("profile-spinner".into(), other, spinner, 0).unwrap());
    while STAGE.load(SeqCst) < 1 {
        core::hint::spin_loop();
    }
    // The spinner waits on HELD all this time.
    until_sampled(other, taken(other), WANT, || arch::time::delay_us(10_000));
    assert_eq!(STAGE.load(SeqCst), 1, "the spinner got a held lock");
    drop(guard);
    assert_eq!(t.join(), 0);
    let rec = stop().expect("a session was running");
    let theirs: Vec<Sample<'_>> = rec.cpu(other).collect();
    let tagged = theirs.iter().filter(|s| s.class == Some(LockClass::PteLock)).count();
    log::info!("profile test: {tagged} of {} samples of CPU {other} tagged pte_lock", theirs.len());
    assert!(tagged as u64 >= WANT / 2, "{tagged} of {} samples of CPU {other} tagged pte_lock", theirs.len());
    assert!(
        theirs.iter().all(|s| s.class.is_none() || s.class == Some(LockClass::PteLock)),
        "another class on CPU {other}"
    );
    // After the wait: untagged samples in the known function, after the
    // last tagged one.
    let last_tagged = theirs.iter().rposition(|s| s.class.is_some()).unwrap();
    let spin = &raw const ptlk_profile_spin as u64..&raw const ptlk_profile_spin_end as u64;
    let after = theirs[last_tagged + 1..].iter().filter(|s| spin.contains(&s.addrs[0])).count();
    assert!(after as u64 >= WANT / 10, "{after} untagged samples after the wait on CPU {other}");
    let mine = rec.cpu(me).filter(|s| s.class.is_some()).count();
    assert_eq!(mine, 0, "the holder (CPU {me}) was tagged as spinning");
}
