//! What each interrupt vector does: the timer tick (and the profiler's
//! samples), reschedule IPIs,
//! cross calls, TLB shoot-downs, APIC errors and spurious interrupts, with
//! per-CPU counts for the tests.

use core::sync::atomic::{AtomicU64, Ordering};

use arch::apic::{self, vectors};
use arch::percpu::{self, NR_CPUS};
use arch::trap::TrapFrame;
use spin::Once;

/// Per CPU: timer interrupts taken.
static TICKS: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// Per CPU: reschedule IPIs taken.
static RESCHEDULES: [AtomicU64; NR_CPUS] = [const { AtomicU64::new(0) }; NR_CPUS];
/// Spurious interrupts (APIC spurious vector, stray legacy-PIC IRQ 7/15).
static SPURIOUS: AtomicU64 = AtomicU64::new(0);

/// The per-tick callback: `fn(from_user)`.
static TICK_HANDLER: Once<fn(bool)> = Once::new();

/// Registers `handler` to run on every timer tick on every CPU, after the
/// EOI (so it may switch tasks), with interrupts disabled; its argument says
/// whether the tick interrupted ring 3. The first registration wins (the boot
/// CPU makes it, before it enables interrupts).
pub fn set_tick_handler(handler: fn(bool)) {
    TICK_HANDLER.call_once(|| handler);
}

/// Timer ticks taken by `cpu` since it came up.
pub fn ticks(cpu: usize) -> u64 {
    TICKS[cpu].load(Ordering::Relaxed)
}

/// Reschedule IPIs taken by `cpu`.
pub fn reschedules(cpu: usize) -> u64 {
    RESCHEDULES[cpu].load(Ordering::Relaxed)
}

/// Makes `cpu` look at its run queue (a reschedule IPI): wakes it from the
/// idle `hlt`. Does nothing for this CPU or an offline one.
pub fn kick(cpu: usize) {
    if cpu != percpu::cpu_id() && percpu::cpu(cpu).is_online() {
        arch::ipi::send_to(cpu, vectors::RESCHEDULE);
    }
}

/// Dispatches vectors >= 32 (called from the trap policy). Returns `false`
/// for a vector nobody owns.
pub fn handle_irq(vector: u8, frame: &mut TrapFrame) -> bool {
    let cpu = percpu::cpu_id();
    match vector {
        vectors::TIMER => {
            // EOI first: the handler may switch to another task and not
            // come back here for a long time.
            apic::eoi();
            // While the profiler samples, the timer runs at its rate and
            // only every (rate / TICK_HZ)-th interrupt is the tick.
            if !crate::diag::profile::on_timer(frame) {
                return true;
            }
            TICKS[cpu].fetch_add(1, Ordering::Relaxed);
            // Before the handler: it may switch tasks.
            crate::rcu::on_interrupt(frame.from_user());
            if let Some(handler) = TICK_HANDLER.get() {
                handler(frame.from_user());
            }
        }
        vectors::RESCHEDULE => {
            // Waking the CPU is the whole job: the idle loop re-checks its
            // run queue after every interrupt.
            apic::eoi();
            RESCHEDULES[cpu].fetch_add(1, Ordering::Relaxed);
            // An expedited grace period kicks CPUs to report at once.
            crate::rcu::on_interrupt(frame.from_user());
            // So does a process being killed: its thread in ring 3 here
            // exits instead of going back (`uspace::process`).
            if frame.from_user() {
                crate::uspace::exit_if_killed();
            }
        }
        vectors::CALL_FUNCTION => {
            arch::ipi::handle_call_function_ipi();
            apic::eoi();
        }
        vectors::TLB_SHOOTDOWN => {
            arch::ipi::handle_tlb_ipi();
            apic::eoi();
        }
        vectors::ERROR => {
            let esr = apic::take_errors();
            apic::eoi();
            log::warn!("local APIC error on CPU {cpu}: ESR {esr:#x}");
        }
        // Spurious: by definition no EOI. 0x27/0x2f are the masked legacy
        // PICs' spurious IRQ 7/15, which can still appear after remapping.
        vectors::SPURIOUS | 0x27 | 0x2f => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        _ => return false,
    }
    true
}
