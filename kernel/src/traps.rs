//! The kernel's trap policy (arch provides the mechanism).
//!
//! Page faults on user addresses go to the memory manager (`uspace::fault`);
//! what it cannot resolve falls through to the exception table, a killed
//! user task, or an oops. Breakpoints are counted and skipped, which is what
//! the trap tests check.

use core::sync::atomic::{AtomicU64, Ordering};

use arch::trap::{TrapFrame, TrapHooks};

/// `int3`s taken since boot.
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);
/// Address of the last `int3` (the instruction after it, as the CPU reports).
pub static LAST_BREAKPOINT_RIP: AtomicU64 = AtomicU64::new(0);
/// Page faults taken since boot, and the last faulting address.
pub static PAGE_FAULTS: AtomicU64 = AtomicU64::new(0);
/// See [`PAGE_FAULTS`].
pub static LAST_FAULT_ADDR: AtomicU64 = AtomicU64::new(0);

/// Counts a page fault (for the trap tests).
pub fn count_page_fault(addr: u64) {
    PAGE_FAULTS.fetch_add(1, Ordering::Relaxed);
    LAST_FAULT_ADDR.store(addr, Ordering::Relaxed);
}

fn breakpoint(frame: &mut TrapFrame) {
    BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
    LAST_BREAKPOINT_RIP.store(frame.rip, Ordering::Relaxed);
    log::debug!("breakpoint at {:#x}", frame.rip - 1);
}

fn irq(vector: u8, frame: &mut TrapFrame) {
    if !crate::smp::handle_irq(vector, frame) {
        arch::trap::oops(frame, None, "unexpected interrupt");
    }
}

fn fatal() -> ! {
    crate::test::runner::on_fatal();
    arch::qemu::exit(arch::qemu::ExitCode::Failure)
}

/// Registers the policy with the trap layer.
pub fn install() {
    arch::trap::set_hooks(TrapHooks {
        page_fault: crate::uspace::page_fault,
        user_exception: crate::uspace::user_exception,
        breakpoint,
        irq,
        fatal,
        describe_addr: crate::kstack::describe_addr,
    });
}

#[cfg(target_os = "none")]
mod tests {
    use core::sync::atomic::Ordering;

    use ktest::ktest;

    use super::*;

    /// `int3` reaches the breakpoint handler, which records the address after
    /// the instruction and resumes there.
    #[ktest]
    fn breakpoint_is_caught_and_resumed() {
        let before = BREAKPOINTS.load(Ordering::Relaxed);
        let expected_rip: u64;
        // SAFETY: int3 traps to our handler, which returns to the next
        // instruction; the lea records that instruction's address.
        unsafe {
            core::arch::asm!("int3", "2: lea {}, [rip + 2b]", out(reg) expected_rip);
        }
        assert_eq!(BREAKPOINTS.load(Ordering::Relaxed), before + 1, "breakpoint handler did not run");
        assert_eq!(LAST_BREAKPOINT_RIP.load(Ordering::Relaxed), expected_rip);
    }

    /// A read of an unmapped kernel address raises #PF with that address in
    /// CR2; the exception table turns it into an error instead of an oops.
    #[ktest]
    fn page_fault_is_caught_by_exception_table() {
        const UNMAPPED: u64 = 0xffff_e000_dead_b000;
        let before = PAGE_FAULTS.load(Ordering::Relaxed);
        assert_eq!(arch::trap::extable::probe_read_u64(UNMAPPED), Err(arch::trap::extable::Fault));
        assert_eq!(PAGE_FAULTS.load(Ordering::Relaxed), before + 1);
        assert_eq!(LAST_FAULT_ADDR.load(Ordering::Relaxed), UNMAPPED);
        // A mapped address reads normally through the same path.
        let value = 0x5eed_u64;
        assert_eq!(arch::trap::extable::probe_read_u64(&value as *const u64 as u64), Ok(0x5eed));
    }

    /// A write to the kernel's own read-only data faults too (CR0.WP is on).
    #[ktest]
    fn write_to_rodata_faults() {
        static RO: u64 = 42;
        let addr = &RO as *const u64 as u64;
        // SAFETY: the store is expected to fault; if it did not, RO would be
        // changed, which the assertion reports.
        let r = unsafe { arch::trap::extable::probe_write_u64(addr, 7) };
        assert_eq!(r, Err(arch::trap::extable::Fault), "wrote to .rodata");
        assert_eq!(LAST_FAULT_ADDR.load(Ordering::Relaxed), addr);
    }
}
