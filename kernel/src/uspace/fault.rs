//! The page-fault glue: from the trap layer into `mm::handle_mm_fault`, and
//! the end of a task whose fault nobody can resolve.

use arch::trap::{FaultOutcome, PageFault, TrapFrame};
use mm::{Access, FaultError, VirtAddr};
use x86_64::structures::idt::PageFaultErrorCode;

use crate::sched;

/// Exit code of a task killed for a fault (128 + SIGSEGV, negated).
pub const KILLED: i64 = -139;

/// Per CPU: why the last fault on it could not be resolved (read by
/// `user_exception` for the log line).
static LAST_ERROR: [spin::Mutex<Option<FaultError>>; arch::percpu::NR_CPUS] =
    [const { spin::Mutex::new(None) }; arch::percpu::NR_CPUS];

/// The #PF policy: user addresses go to the memory manager (from ring 3, or
/// from a kernel user-copy instruction); everything else is for the
/// exception table or an oops.
pub fn page_fault(frame: &mut TrapFrame, pf: PageFault) -> FaultOutcome {
    let addr = pf.addr.as_u64();
    if addr >= abi::TASK_SIZE_MAX || !(frame.from_user() || arch::usercopy::in_user_copy(frame.rip)) {
        // Not the memory manager's: counted for the trap tests (user faults
        // are not, to keep a shared counter off the fault storms' hot path).
        crate::traps::count_page_fault(addr);
        return FaultOutcome::Unhandled;
    }
    let access = Access {
        write: pf.code.contains(PageFaultErrorCode::CAUSED_BY_WRITE),
        exec: pf.code.contains(PageFaultErrorCode::INSTRUCTION_FETCH),
        user: frame.from_user(),
    };
    // The interrupted code had interrupts on (ring 3 always does): keep them
    // on while we work, so TLB shoot-downs and IPIs aimed at this CPU are
    // answered promptly.
    let reenable = frame.rflags & (1 << 9) != 0;
    if reenable {
        arch::irq::enable();
    }
    let start = arch::time::rdtsc();
    let r = sched::with_current_space(|space| mm::handle_mm_fault(&space.mm, VirtAddr::new(addr), access));
    arch::irq::disable();
    if let Some(Ok(_)) = r {
        crate::diag::faultstat::record(arch::time::rdtsc().wrapping_sub(start));
    }
    match r {
        // A kernel task touching a user address: not the memory manager's.
        None => FaultOutcome::Unhandled,
        Some(Ok(_)) => FaultOutcome::Handled,
        Some(Err(e)) => {
            *LAST_ERROR[arch::percpu::cpu_id()].lock() = Some(e);
            FaultOutcome::Unhandled
        }
    }
}

fn describe(code: PageFaultErrorCode) -> &'static str {
    let write = code.contains(PageFaultErrorCode::CAUSED_BY_WRITE);
    let exec = code.contains(PageFaultErrorCode::INSTRUCTION_FETCH);
    let present = code.contains(PageFaultErrorCode::PROTECTION_VIOLATION);
    match (present, write, exec) {
        (_, _, true) => "instruction fetch",
        (true, true, _) => "write to a present page",
        (true, false, _) => "read of a present page",
        (false, true, _) => "write to an unmapped page",
        (false, false, _) => "read of an unmapped page",
    }
}

/// A ring-3 exception nobody resolved: end the task with one log line, keep
/// the kernel and the other tasks running.
pub fn user_exception(frame: &mut TrapFrame, fault: Option<PageFault>) {
    let me = sched::current();
    let reason = match fault {
        Some(pf) => {
            let why = if pf.addr.as_u64() >= abi::TASK_SIZE_MAX {
                "user access to kernel memory"
            } else {
                match LAST_ERROR[arch::percpu::cpu_id()].lock().take() {
                    Some(FaultError::MapErr) => "no mapping at this address",
                    Some(FaultError::AccErr) => match (
                        pf.code.contains(PageFaultErrorCode::INSTRUCTION_FETCH),
                        pf.code.contains(PageFaultErrorCode::CAUSED_BY_WRITE),
                    ) {
                        (true, _) => "execute of a no-exec page",
                        (_, true) => "write to a read-only mapping",
                        _ => "access not permitted by the mapping",
                    },
                    Some(FaultError::Oom) => "out of memory",
                    _ => "unresolved page fault",
                }
            };
            log::warn!(
                "task {} ({}) killed: {why}: address {:#x}, rip {:#x}, error code {:#x} ({})",
                me.tid(),
                me.name(),
                pf.addr.as_u64(),
                frame.rip,
                pf.code.bits(),
                describe(pf.code)
            );
            why
        }
        None => {
            log::warn!(
                "task {} ({}) killed: {} (vector {}) at rip {:#x}, error code {:#x}",
                me.tid(),
                me.name(),
                arch::trap::vector_name(frame.vector as u8),
                frame.vector,
                frame.rip,
                frame.error_code
            );
            arch::trap::vector_name(frame.vector as u8)
        }
    };
    let _ = reason;
    drop(me);
    sched::exit_current(KILLED)
}
