//! System-call dispatch (ABI: the `abi` crate).
//!
//! Every handler validates its arguments: user pointers go through
//! `arch::usercopy` (range-checked, SMAP-windowed, fault-tolerant), and a bad
//! pointer or length becomes an error code, never a kernel fault.

use abi::{errno, nr};
use arch::trap::TrapFrame;
use mm::{MapFlags, MmapError, Prot, VirtAddr};

use super::process::{self, ForkError, WaitError};
use crate::sched;

/// Entered from `arch::syscall` with interrupts disabled, on the thread's
/// kernel stack.
pub fn handle(frame: &mut TrapFrame) {
    // System calls are interruptible (IPIs, TLB shoot-downs, ticks); the
    // return path needs interrupts off again before it swaps GS back.
    arch::irq::enable();
    let args = [frame.rdi, frame.rsi, frame.rdx, frame.r10, frame.r8, frame.r9];
    let ret = match frame.rax as usize {
        // The child resumes from a copy of this frame.
        nr::FORK => sys_fork(frame),
        number => dispatch(number, args),
    };
    // The way back to user mode is a quiescent state.
    crate::rcu::quiescent();
    arch::irq::disable();
    // With interrupts off until `iretq`: a kick after this check is taken
    // in ring 3 (see `process`).
    super::process::exit_if_killed();
    frame.rax = ret as u64;
}

fn dispatch(number: usize, a: [u64; 6]) -> isize {
    match number {
        nr::LOG => sys_log(a[0], a[1] as usize),
        nr::EXIT => process::exit_thread(a[0] as i64),
        nr::EXIT_GROUP => process::exit_group(a[0] as i64),
        nr::GETPID => {
            sched::with_current_process(|p| p.pid()).expect("system call from a task without a process") as isize
        }
        nr::WAIT => sys_wait(a[0], a[1]),
        nr::YIELD => {
            sched::yield_now();
            0
        }
        nr::GETTID => sched::current().tid() as isize,
        nr::GETCPU => arch::percpu::cpu_id() as isize,
        nr::MMAP => sys_mmap(a[0], a[1], a[2] as usize, a[3] as usize),
        nr::MUNMAP => result(with_space(|s| s.mm.munmap(VirtAddr::new(a[0]), a[1])).map(|_| 0)),
        nr::MPROTECT => match prot_from(a[2] as usize) {
            Some(prot) => result(with_space(|s| s.mm.mprotect(VirtAddr::new(a[0]), a[1], prot)).map(|_| 0)),
            None => -errno::EINVAL,
        },
        nr::BARRIER => {
            if a[1] == 0 || a[1] > 4096 {
                return -errno::EINVAL;
            }
            // Interrupted only when the process is being killed: the thread
            // never sees the result.
            with_space(|s| s.barrier(a[0], a[1] as usize));
            0
        }
        nr::CYCLES => arch::time::rdtsc() as isize,
        nr::MADVISE => {
            let advice = match a[2] as usize {
                abi::advice::DONTNEED => mm::Advice::DontNeed,
                abi::advice::COLLAPSE => mm::Advice::Collapse,
                abi::advice::POPULATE_WRITE => mm::Advice::PopulateWrite,
                _ => return -errno::EINVAL,
            };
            result(with_space(|s| s.mm.madvise(VirtAddr::new(a[0]), a[1], advice)).map(|_| 0))
        }
        nr::MREMAP => sys_mremap(a[0], a[1], a[2], a[3] as usize, a[4]),
        nr::CHECKSUM => sys_checksum(a[0], a[1]),
        _ => -errno::ENOSYS,
    }
}

/// Runs `f` on the calling thread's address space (borrowed, see
/// [`sched::with_current_space`]). Only user threads make system calls.
fn with_space<R>(f: impl FnOnce(&super::AddressSpace) -> R) -> R {
    sched::with_current_space(f).expect("system call from a task without an address space")
}

/// `fork()`: the calling thread, duplicated into a new process with a
/// copy-on-write copy of the address space; the child resumes from a copy
/// of `frame` with RAX 0 (see `Process::fork`).
fn sys_fork(frame: &TrapFrame) -> isize {
    let me = sched::current();
    let (Some(p), Some(space)) = (me.process(), me.space_ref()) else { return -errno::ENOSYS };
    match p.fork(space, me.name(), frame) {
        Ok(pid) => pid as isize,
        Err(ForkError::NoMemory) => -errno::ENOMEM,
        Err(ForkError::Exiting) => -errno::EINTR,
    }
}

/// `wait(pid, status)`: blocks until child `pid` exits, reaps it, stores
/// its exit status (an `i64`) at `status` unless that is 0, and returns
/// `pid`. (The status is not the result: a status may be any `i64`, and
/// -1..-4095 would read as an error.)
fn sys_wait(pid: u64, status: u64) -> isize {
    let Some(p) = process::current() else { return -errno::ECHILD };
    match p.wait_child(pid) {
        Ok(code) => {
            if status != 0 && arch::usercopy::copy_to_user(status, &code.to_le_bytes()).is_err() {
                return -errno::EFAULT;
            }
            pid as isize
        }
        Err(WaitError::NotAChild) => -errno::ECHILD,
        Err(WaitError::Exiting) => -errno::EINTR,
    }
}

fn sys_log(ptr: u64, len: usize) -> isize {
    if len > abi::LOG_MAX {
        return -errno::EINVAL;
    }
    // A failed allocation is this call's error, not the kernel's: the heap's
    // failure injector may fail it (`boot::heap::fallible`).
    let mut buf = alloc::vec::Vec::new();
    if crate::boot::heap::fallible(|| buf.try_reserve_exact(len)).is_err() {
        return -errno::ENOMEM;
    }
    buf.resize(len, 0u8);
    if arch::usercopy::copy_from_user(&mut buf, ptr).is_err() {
        return -errno::EFAULT;
    }
    match core::str::from_utf8(&buf) {
        Ok(text) => {
            let me = sched::current();
            log::info!("[user tid {} {}] {}", me.tid(), me.name(), text);
            0
        }
        Err(_) => -errno::EINVAL,
    }
}

/// `checksum(ptr, len)`: reads the user's bytes through pages pinned by the
/// lockless walker (`mm::gup::get_user_pages_fast`), not through the user
/// mapping: the pages stay valid even if another thread unmaps them
/// meanwhile (the pin keeps each frame from the allocator).
fn sys_checksum(ptr: u64, len: u64) -> isize {
    if len > abi::CHECKSUM_MAX as u64 {
        return -errno::EINVAL;
    }
    if len == 0 {
        return abi::checksum(&[]) as isize;
    }
    let Some(end) = ptr.checked_add(len).filter(|&e| e <= abi::TASK_SIZE_MAX) else { return -errno::EFAULT };
    let first = ptr & !(mm::PAGE_SIZE - 1);
    let nr = (end - first).div_ceil(mm::PAGE_SIZE) as usize;
    with_space(|s| {
        let pins = match mm::gup::get_user_pages_fast(&s.mm, VirtAddr::new(ptr), nr, false) {
            Ok(pins) => pins,
            // As Linux's gup: no memory to fault a page in is ENOMEM, the
            // rest (no VMA, no access) EFAULT.
            Err(mm::memory::FaultError::Oom) => return -errno::ENOMEM,
            Err(_) => return -errno::EFAULT,
        };
        let mut h = abi::checksum_seed();
        let mut buf = [0u8; 512];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            pins.read(at, &mut buf[..n]);
            h = abi::checksum_update(h, &buf[..n]);
            at += n as u64;
        }
        abi::checksum_finish(h) as isize
    })
}

fn prot_from(bits: usize) -> Option<Prot> {
    if bits & !(abi::prot::READ | abi::prot::WRITE | abi::prot::EXEC) != 0 {
        return None;
    }
    let mut p = Prot::empty();
    p.set(Prot::READ, bits & abi::prot::READ != 0);
    p.set(Prot::WRITE, bits & abi::prot::WRITE != 0);
    p.set(Prot::EXEC, bits & abi::prot::EXEC != 0);
    Some(p)
}

fn sys_mmap(addr: u64, len: u64, prot: usize, flags: usize) -> isize {
    let Some(prot) = prot_from(prot) else { return -errno::EINVAL };
    let known = abi::map::FIXED | abi::map::HUGEPAGE | abi::map::HUGETLB_2M | abi::map::HUGETLB_1G | abi::map::POPULATE;
    if flags & !known != 0 {
        return -errno::EINVAL;
    }
    let mut f = MapFlags::empty();
    f.set(MapFlags::FIXED, flags & abi::map::FIXED != 0);
    f.set(MapFlags::HUGEPAGE, flags & abi::map::HUGEPAGE != 0);
    f.set(MapFlags::HUGETLB_2M, flags & abi::map::HUGETLB_2M != 0);
    f.set(MapFlags::HUGETLB_1G, flags & abi::map::HUGETLB_1G != 0);
    f.set(MapFlags::POPULATE, flags & abi::map::POPULATE != 0);
    let hint = if flags & abi::map::FIXED != 0 { Some(VirtAddr::new(addr)) } else { None };
    result(with_space(|s| s.mm.mmap(hint, len, prot, f)).map(|a| a.as_u64() as isize))
}

fn sys_mremap(old: u64, old_len: u64, new_len: u64, flags: usize, new: u64) -> isize {
    if flags & !(abi::mremap::MAYMOVE | abi::mremap::FIXED) != 0 {
        return -errno::EINVAL;
    }
    let mut f = mm::mremap::MremapFlags::empty();
    f.set(mm::mremap::MremapFlags::MAYMOVE, flags & abi::mremap::MAYMOVE != 0);
    f.set(mm::mremap::MremapFlags::FIXED, flags & abi::mremap::FIXED != 0);
    let target = (flags & abi::mremap::FIXED != 0).then(|| VirtAddr::new(new));
    result(with_space(|s| s.mm.mremap(VirtAddr::new(old), old_len, new_len, f, target)).map(|a| a.as_u64() as isize))
}

fn result(r: Result<isize, MmapError>) -> isize {
    match r {
        Ok(v) => v,
        Err(MmapError::NoMemory) => -errno::ENOMEM,
        Err(MmapError::BadAddress) => -errno::EFAULT,
        Err(MmapError::Busy) => -errno::EAGAIN,
        Err(MmapError::Invalid) => -errno::EINVAL,
    }
}
