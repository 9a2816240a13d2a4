//! The system-call ABI shared by the kernel and the user programs.
//!
//! Calling convention (Linux-like): `syscall` with the number in RAX and
//! arguments in RDI, RSI, RDX, R10, R8, R9; the result comes back in RAX.
//! Results are `isize`: a non-negative value on success, `-errno` on failure.
//! RCX and R11 are clobbered.
//!
//! | nr | name       | arguments                      | result |
//! |----|------------|--------------------------------|--------|
//! | 0  | `log`      | ptr, len                       | 0 / -EFAULT / -EINVAL (len > 4096 or not UTF-8) |
//! | 1  | `exit`     | code                           | does not return; the last thread frees the address space |
//! | 2  | `yield`    | -                              | 0 |
//! | 3  | `gettid`   | -                              | thread id |
//! | 4  | `getcpu`   | -                              | CPU number |
//! | 5  | `mmap`     | addr, len, prot, flags         | address / -EINVAL / -ENOMEM |
//! | 6  | `munmap`   | addr, len                      | 0 / -EINVAL |
//! | 7  | `mprotect` | addr, len, prot                | 0 / -EINVAL / -ENOMEM |
//! | 8  | `barrier`  | id, parties                    | 0 once `parties` threads of the address space arrived |
//! | 9  | `cycles`   | -                              | the TSC |
#![no_std]

/// System-call numbers.
pub mod nr {
    pub const LOG: usize = 0;
    pub const EXIT: usize = 1;
    pub const YIELD: usize = 2;
    pub const GETTID: usize = 3;
    pub const GETCPU: usize = 4;
    pub const MMAP: usize = 5;
    pub const MUNMAP: usize = 6;
    pub const MPROTECT: usize = 7;
    pub const BARRIER: usize = 8;
    pub const CYCLES: usize = 9;
}

/// Error numbers (returned negated).
pub mod errno {
    pub const ENOMEM: isize = 12;
    pub const EFAULT: isize = 14;
    pub const EINVAL: isize = 22;
    pub const ENOSYS: isize = 38;
}

/// `prot` bits of `mmap` / `mprotect`.
pub mod prot {
    pub const READ: usize = 1;
    pub const WRITE: usize = 2;
    pub const EXEC: usize = 4;
}

/// `flags` of `mmap`.
pub mod map {
    /// Map exactly at `addr`, replacing whatever was mapped there.
    pub const FIXED: usize = 1 << 0;
    /// Transparent-huge-page hint: faults may map 2 MiB pages.
    pub const HUGEPAGE: usize = 1 << 1;
    /// hugetlb-style mapping of 2 MiB pages (len and addr 2 MiB aligned).
    pub const HUGETLB_2M: usize = 1 << 2;
    /// hugetlb-style mapping of 1 GiB pages (len and addr 1 GiB aligned).
    pub const HUGETLB_1G: usize = 1 << 3;
    /// Fault every page in at once.
    pub const POPULATE: usize = 1 << 4;
}

/// Longest string `log` accepts.
pub const LOG_MAX: usize = 4096;

/// Where the user program image is linked (and loaded).
pub const USER_IMAGE_BASE: u64 = 0x40_0000;

/// The user programs: a thread starts at the image's entry with the program
/// number in RDI and two arguments in RSI and RDX. Its exit code is the
/// program's verdict (0 = as expected) unless the program says otherwise.
pub mod program {
    /// Calls `getcpu` and `gettid` `arg0` times, checks they are stable, logs
    /// one line, exits with the CPU number.
    pub const REPORT_CPU: usize = 0;
    /// `arg0` rounds of: append `arg1` (a thread tag) to the shared trace at
    /// `TRACE_ADDR`, then `yield`. Exits 0.
    pub const YIELD_TRACE: usize = 1;
    /// Reads a kernel address: must be killed.
    pub const TOUCH_KERNEL: usize = 2;
    /// Jumps into its (no-exec) stack: must be killed.
    pub const EXEC_NX: usize = 3;
    /// Passes bad pointers and lengths to `log`: exits 0 if every call got
    /// the right error code, else the number of the first wrong check.
    pub const BAD_POINTERS: usize = 4;
    /// Exits with `arg0` right away.
    pub const EXIT_WITH: usize = 5;
    /// Writes to its read-only text: must be killed.
    pub const WRITE_TEXT: usize = 6;
    /// Touches `[arg0, arg0 + arg1)` one byte per 4 KiB page (write then
    /// check), exits with the number of mismatches.
    pub const TOUCH_RANGE: usize = 7;
    /// Spins for `arg0` iterations without system calls (preemption test),
    /// then exits 0.
    pub const SPIN: usize = 8;
}

/// Shared trace area used by `YIELD_TRACE` (mapped by the test).
pub const TRACE_ADDR: u64 = 0x1000_0000;
