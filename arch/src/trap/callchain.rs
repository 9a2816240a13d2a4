//! Call chains of an interrupted context, for the sampling profiler.
//!
//! [`capture`] turns the [`TrapFrame`] of an interrupt into the interrupted
//! RIP and the return addresses above it, innermost first, the way Linux's
//! `perf_callchain_kernel` + `perf_callchain_user` do:
//!
//! * **Kernel frames** follow the frame-pointer chain (`[rbp]` the caller's
//!   rbp, `[rbp + 8]` the return address; the kernel is built with
//!   `force-frame-pointers`). Every read goes through the exception table.
//! * **Through a trap.** When a return address is `trap_return` (the
//!   instruction after `call trap_dispatch` in the common entry path), the
//!   frame below it is `trap_dispatch`'s and the saved [`TrapFrame`] sits right
//!   above its return address. The walk records `trap_return` (it resolves
//!   to `trap_common`), then the trapped RIP, and goes on from the trapped
//!   rbp: in the kernel if the trap came from ring 0, in user space if from
//!   ring 3. So a timer tick inside `handle_mm_fault` shows the user
//!   instruction that faulted and the user program's frames above it.
//! * **Through a system call.** The `syscall` entry builds the user's
//!   [`TrapFrame`] at the top of the thread's kernel stack and calls without
//!   a frame link, so the chain ends there. If the walk ran on the stack whose
//!   top is this CPU's `kernel_rsp` (the running user thread's), the user
//!   registers are read from that frame.
//! * **User frames** follow the user program's own frame-pointer chain
//!   (xtask builds the user programs with `force-frame-pointers` too), read
//!   with [`read_user_u64_nofault`]: SMAP opened for one load, a fault
//!   ends the chain instead of being resolved (this runs in an interrupt).
//!
//! Which entries are exact instruction addresses (the interrupted RIP and
//! each trapped RIP) and which are return addresses (the call is the
//! instruction before) is recorded in [`Chain::exact`], so a symbolizer
//! can look up `addr - 1` for the latter only.

use super::TrapFrame;
use super::extable::probe_read_u64;

/// The most entries one chain records (also the width of [`Chain::exact`]).
pub const MAX_DEPTH: usize = 32;

/// Bytes of a saved [`TrapFrame`].
const FRAME_BYTES: u64 = core::mem::size_of::<TrapFrame>() as u64;
/// Offsets of the fields the walk reads from a saved frame.
const RBP_OFFSET: u64 = core::mem::offset_of!(TrapFrame, rbp) as u64;
const RIP_OFFSET: u64 = core::mem::offset_of!(TrapFrame, rip) as u64;
const CS_OFFSET: u64 = core::mem::offset_of!(TrapFrame, cs) as u64;

/// Lowest kernel address (the start of the upper half).
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// A captured call chain: `addrs[..len]`, innermost first.
#[derive(Clone, Copy, Debug)]
pub struct Chain {
    /// The addresses; entries past `len` are unspecified.
    pub addrs: [u64; MAX_DEPTH],
    /// How many entries are valid.
    pub len: usize,
    /// Bit `i` set: `addrs[i]` is an instruction address (an interrupted or
    /// trapped RIP), not a return address.
    pub exact: u32,
}

impl Chain {
    const fn new() -> Self {
        Self { addrs: [0; MAX_DEPTH], len: 0, exact: 0 }
    }

    /// The valid entries.
    pub fn as_slice(&self) -> &[u64] {
        &self.addrs[..self.len]
    }

    /// Appends one entry; `false` once the chain is full.
    fn push(&mut self, addr: u64, exact: bool) -> bool {
        if self.len == MAX_DEPTH {
            return false;
        }
        self.addrs[self.len] = addr;
        if exact {
            self.exact |= 1 << self.len;
        }
        self.len += 1;
        true
    }
}

core::arch::global_asm!(
    r#"
.p2align 4
.global arch_read_user_u64_nofault
// rdi = user address. Returns rax = value, rdx = 0, or rax = 0, rdx = 1 on a
// fault. SMAP is open for the one load only.
arch_read_user_u64_nofault:
    xor edx, edx
    stac
.Lread_user_nofault:
    mov rax, [rdi]
    clac
    ret
.Lread_user_nofault_fixup:
    clac
    xor eax, eax
    mov edx, 1
    ret
.pushsection __ex_table, "a"
    .p2align 3
    .quad .Lread_user_nofault, .Lread_user_nofault_fixup
.popsection
"#
);

#[repr(C)]
struct ReadResult {
    value: u64,
    faulted: u64,
}

unsafe extern "C" {
    fn arch_read_user_u64_nofault(addr: u64) -> ReadResult;
    /// The instruction after `call trap_dispatch` (trap/entry.rs).
    static trap_return: u8;
}

/// Reads the u64 at user address `addr` without resolving a fault (Linux
/// `copy_from_user_nofault`): `None` if the address is not a user address
/// or not mapped readable. Safe in interrupt context: the page-fault hook
/// leaves a kernel-mode fault outside the user-copy instruction unresolved,
/// and the exception table ends the read. The current address space is the
/// one read.
pub fn read_user_u64_nofault(addr: u64) -> Option<u64> {
    if !crate::usercopy::is_user_range(addr, 8) {
        return None;
    }
    // SAFETY: the address is in the user half (checked), so the load cannot
    // touch kernel memory; it has an exception-table entry, so a fault resumes
    // at the fixup (which also closes SMAP) instead of crashing.
    let r = unsafe { arch_read_user_u64_nofault(addr) };
    (r.faulted == 0).then_some(r.value)
}

/// Follows a user frame-pointer chain from `rbp`, appending return addresses.
fn walk_user(chain: &mut Chain, mut rbp: u64) {
    while rbp != 0 && rbp.is_multiple_of(8) {
        let (Some(next), Some(ret)) = (read_user_u64_nofault(rbp), read_user_u64_nofault(rbp + 8)) else { return };
        if ret == 0 || !chain.push(ret, false) || next <= rbp {
            return;
        }
        rbp = next;
    }
}

/// Reads a saved frame's (cs, rip, rbp) at `frame`.
fn saved_regs(frame: u64) -> Option<(u64, u64, u64)> {
    let cs = probe_read_u64(frame + CS_OFFSET).ok()?;
    let rip = probe_read_u64(frame + RIP_OFFSET).ok()?;
    let rbp = probe_read_u64(frame + RBP_OFFSET).ok()?;
    Some((cs, rip, rbp))
}

/// The call chain of the context `frame` interrupted: its RIP, then the
/// return addresses above it, through trap frames into user space (module
/// comment). `kernel_stack_bytes` is the size of a thread's kernel stack,
/// used to recognise that the walk ran on the running user thread's stack.
pub fn capture(frame: &TrapFrame, kernel_stack_bytes: u64) -> Chain {
    let mut chain = Chain::new();
    chain.push(frame.rip, true);
    if frame.from_user() {
        walk_user(&mut chain, frame.rbp);
        return chain;
    }
    let trap_ret = &raw const trap_return as u64;
    let mut rbp = frame.rbp;
    // The last kernel frame the walk read, for the system-call case.
    let mut last = None;
    while rbp >= KERNEL_START && rbp.is_multiple_of(8) {
        let (Ok(next), Ok(ret)) = (probe_read_u64(rbp), probe_read_u64(rbp + 8)) else { break };
        last = Some(rbp);
        if ret == 0 || !chain.push(ret, false) {
            return chain;
        }
        if ret == trap_ret {
            // `rbp` is trap_dispatch's frame; the saved registers sit just
            // above its return address.
            let Some((cs, rip, trapped_rbp)) = saved_regs(rbp + 16) else { return chain };
            if !chain.push(rip, true) {
                return chain;
            }
            if cs & 3 == 3 {
                walk_user(&mut chain, trapped_rbp);
                return chain;
            }
            if trapped_rbp <= rbp {
                return chain;
            }
            rbp = trapped_rbp;
            continue;
        }
        if next <= rbp {
            break; // Frames move up the stack; this is the chain's end (or junk).
        }
        rbp = next;
    }
    // The chain left the kernel without a trap frame: a system call's entry.
    let top = crate::percpu::this_cpu().kernel_rsp.load(core::sync::atomic::Ordering::Relaxed);
    if let Some(last) = last
        && top > kernel_stack_bytes
        && (top - kernel_stack_bytes..top).contains(&last)
        && let Some((cs, rip, user_rbp)) = saved_regs(top - FRAME_BYTES)
        && cs & 3 == 3
        && chain.push(rip, true)
    {
        walk_user(&mut chain, user_rbp);
    }
    chain
}
