//! System-call wrappers and tiny formatting helpers (no allocator here).

use abi::nr;

/// A raw system call with up to three arguments.
pub fn syscall3(n: usize, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the kernel's syscall ABI (abi crate): RCX and R11 are
    // clobbered, every other register is preserved.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Two-argument system call.
pub fn syscall2(n: usize, a: usize, b: usize) -> isize {
    syscall3(n, a, b, 0)
}

pub fn log(msg: impl AsRef<[u8]>) {
    let m = msg.as_ref();
    syscall2(nr::LOG, m.as_ptr() as usize, m.len());
}

pub fn exit(code: isize) -> ! {
    syscall2(nr::EXIT, code as usize, 0);
    loop {
        core::hint::spin_loop();
    }
}

pub fn yield_now() {
    syscall2(nr::YIELD, 0, 0);
}

pub fn gettid() -> usize {
    syscall2(nr::GETTID, 0, 0) as usize
}

pub fn getcpu() -> usize {
    syscall2(nr::GETCPU, 0, 0) as usize
}

/// Decimal digits of `v`, right-aligned in a fixed buffer.
pub fn dec(mut v: u64) -> DecBuf {
    let mut d = DecBuf { buf: [0; 20], start: 20 };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return d;
        }
    }
}

pub struct DecBuf {
    buf: [u8; 20],
    start: usize,
}

impl core::ops::Deref for DecBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Concatenates `parts` into `buf` (truncating).
pub fn fmt<'a>(buf: &'a mut [u8], parts: &[&[u8]]) -> &'a [u8] {
    let mut n = 0;
    for p in parts {
        let take = p.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&p[..take]);
        n += take;
    }
    &buf[..n]
}

pub fn barrier(id: u64, parties: u64) {
    syscall2(nr::BARRIER, id as usize, parties as usize);
}

pub fn cycles() -> u64 {
    syscall2(nr::CYCLES, 0, 0) as u64
}

pub fn mmap(addr: usize, len: usize, prot: usize, flags: usize) -> isize {
    syscall6(nr::MMAP, [addr, len, prot, flags, 0, 0])
}

pub fn munmap(addr: usize, len: usize) -> isize {
    syscall2(nr::MUNMAP, addr, len)
}

pub fn mprotect(addr: usize, len: usize, prot: usize) -> isize {
    syscall3(nr::MPROTECT, addr, len, prot)
}

pub fn madvise(addr: usize, len: usize, advice: usize) -> isize {
    syscall3(nr::MADVISE, addr, len, advice)
}

pub fn mremap(old: usize, old_len: usize, new_len: usize, flags: usize, new: usize) -> isize {
    syscall6(nr::MREMAP, [old, old_len, new_len, flags, new, 0])
}

/// `abi::checksum` of `[addr, addr + len)`, computed by the kernel through
/// pinned pages.
pub fn checksum(addr: usize, len: usize) -> isize {
    syscall2(nr::CHECKSUM, addr, len)
}

/// A raw system call with six arguments (RDI, RSI, RDX, R10, R8, R9).
pub fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the kernel's syscall ABI: RCX and R11 are clobbered, every
    // other register is preserved.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `fork()`: the child's pid in the parent, 0 in the child, or `-errno`.
pub fn fork() -> isize {
    syscall2(nr::FORK, 0, 0)
}

/// `wait(pid)`: blocks until child `pid` exits; its exit status, or
/// `Err(-errno)` (`-ECHILD`: not a child of ours, or already waited for).
pub fn wait(pid: isize) -> Result<i64, isize> {
    let mut status = 0i64;
    let r = syscall2(nr::WAIT, pid as usize, &mut status as *mut i64 as usize);
    if r < 0 { Err(r) } else { Ok(status) }
}

/// `wait` with a raw status pointer (tests of the pointer checks).
pub fn wait_raw(pid: isize, status: usize) -> isize {
    syscall2(nr::WAIT, pid as usize, status)
}

/// `exit_group(code)`: ends every thread of the process.
pub fn exit_group(code: isize) -> ! {
    syscall2(nr::EXIT_GROUP, code as usize, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `getpid()`.
pub fn getpid() -> isize {
    syscall2(nr::GETPID, 0, 0)
}
