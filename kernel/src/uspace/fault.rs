//! The page-fault glue: from the trap layer into `mm::handle_mm_fault`, and
//! the end of a task whose fault nobody can resolve.

use arch::trap::{FaultAccess, FaultOutcome, FaultReason, PageFault, TrapFrame};
use mm::{Access, FaultError, VirtAddr};

use crate::sched;

/// Exit code of a task killed for a fault (128 + SIGSEGV, negated).
pub const KILLED: i64 = abi::fork::KILLED;

/// The #PF policy: user addresses go to the memory manager (from ring 3, or
/// from a kernel user-copy instruction); everything else is for the
/// exception table or an oops.
pub fn page_fault(frame: &mut TrapFrame, pf: PageFault) -> FaultOutcome {
    let addr = pf.addr.as_u64();
    let user_access = frame.from_user() || arch::usercopy::in_user_copy(frame.rip);
    if addr >= abi::TASK_SIZE_MAX || !user_access {
        // Not the memory manager's: counted for the trap tests (user faults
        // are not, to keep a shared counter off the fault storms' hot path).
        crate::traps::count_page_fault(addr);
        let reason = if addr >= abi::TASK_SIZE_MAX { FaultReason::KernelAddress } else { FaultReason::KernelAccess };
        return FaultOutcome::Unhandled(reason);
    }
    let FaultAccess { write, exec, user, .. } = pf.access();
    let access = Access { write, exec, user };
    let irqs_on = frame.interrupts_were_enabled();
    let start = crate::diag::faultstat::start();
    // The current task is read with interrupts still off, so that read needs
    // no cli/sti pair of its own: under QEMU's TCG each `sti` ends the
    // translated block and goes back through the emulator's main loop.
    let r = sched::with_current_space(|space| {
        // The interrupted code had interrupts on (ring 3 always does): keep
        // them on while we work, so TLB shoot-downs and IPIs aimed at this
        // CPU are answered promptly.
        if irqs_on {
            arch::irq::enable();
        }
        let r = mm::handle_mm_fault(&space.mm, VirtAddr::new(addr), access);
        arch::irq::disable();
        r
    });
    match r {
        Some(Ok(_)) => {
            crate::diag::faultstat::record(start);
            if frame.from_user() {
                // Back to ring 3, interrupts off: a killed process's thread
                // leaves here (see `process`).
                super::process::exit_if_killed();
            }
            FaultOutcome::Handled
        }
        Some(Err(e)) => FaultOutcome::Unhandled(reason(e)),
        // A kernel task touching a user address: not the memory manager's.
        None => FaultOutcome::Unhandled(FaultReason::KernelAccess),
    }
}

/// The trap layer's name for why the memory manager gave up.
fn reason(e: FaultError) -> FaultReason {
    match e {
        FaultError::MapErr => FaultReason::NoMapping,
        FaultError::AccErr => FaultReason::NotPermitted,
        FaultError::Oom => FaultReason::OutOfMemory,
    }
}

/// What the kill line says about an unresolved fault.
fn why(reason: FaultReason, access: FaultAccess) -> &'static str {
    match reason {
        FaultReason::KernelAddress => "user access to kernel memory",
        FaultReason::NoMapping => "no mapping at this address",
        FaultReason::NotPermitted if access.exec => "execute of a no-exec page",
        FaultReason::NotPermitted if access.write => "write to a read-only mapping",
        FaultReason::NotPermitted => "access not permitted by the mapping",
        FaultReason::OutOfMemory => "out of memory",
        // Only a kernel-mode fault gets this reason, and those never reach
        // the user-exception hook; said plainly all the same.
        FaultReason::KernelAccess => "unresolved page fault",
    }
}

/// A ring-3 exception nobody resolved: end the task's process (all its
/// threads, as Linux's SIGSEGV does) with one log line, keep the kernel and
/// the other processes running.
pub fn user_exception(frame: &mut TrapFrame, fault: Option<(PageFault, FaultReason)>) {
    let me = sched::current();
    let pid = me.process().map_or(0, |p| p.pid());
    match fault {
        Some((pf, reason)) => log::warn!(
            "task {} ({}, pid {pid}) killed: {}: address {:#x}, rip {:#x}, error code {:#x} ({})",
            me.tid(),
            me.name(),
            why(reason, pf.access()),
            pf.addr.as_u64(),
            frame.rip,
            pf.code.bits(),
            pf.access().describe()
        ),
        None => log::warn!(
            "task {} ({}, pid {pid}) killed: {} (vector {}) at rip {:#x}, error code {:#x}",
            me.tid(),
            me.name(),
            arch::trap::vector_name(frame.vector as u8),
            frame.vector,
            frame.rip,
            frame.error_code
        ),
    }
    if let Some(p) = me.process() {
        p.kill(KILLED);
    }
    drop(me);
    super::process::exit_thread(KILLED)
}
