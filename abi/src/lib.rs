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
//! | 1  | `exit`     | code                           | does not return; ends the calling thread (the last one ends the process, with exit status `code`) |
//! | 2  | `yield`    | -                              | 0 |
//! | 3  | `gettid`   | -                              | thread id |
//! | 4  | `getcpu`   | -                              | CPU number |
//! | 5  | `mmap`     | addr, len, prot, flags         | address / -EINVAL / -ENOMEM |
//! | 6  | `munmap`   | addr, len                      | 0 / -EINVAL |
//! | 7  | `mprotect` | addr, len, prot                | 0 / -EINVAL / -ENOMEM |
//! | 8  | `barrier`  | id, parties                    | 0 once `parties` threads of the address space arrived |
//! | 9  | `cycles`   | -                              | the TSC |
//! | 10 | `madvise`  | addr, len, advice              | 0 / -EINVAL (unaligned addr, unknown advice) / -ENOMEM (part unmapped) / -EFAULT (`POPULATE_WRITE` on a part not writable) |
//! | 11 | `checksum` | ptr, len                       | [`checksum`] of the bytes, read through pinned pages / -EFAULT / -ENOMEM (no memory to fault a page in) / -EINVAL (len > [`CHECKSUM_MAX`]) |
//! | 12 | `mremap`   | old, old_len, new_len, flags, new | address / -EINVAL / -EFAULT (old range not in one mapping) / -ENOMEM |
//! | 13 | `fork`     | -                              | the child's pid in the parent, 0 in the child / -ENOMEM / -EINTR (the process is being killed) |
//! | 14 | `wait`     | pid, status ptr (0: none)      | pid once that child exited, its exit status stored at ptr as an `i64` / -ECHILD (not a child, or already waited for) / -EFAULT / -EINTR |
//! | 15 | `exit_group` | code                         | does not return; ends every thread of the process, whose exit status is `code` |
//! | 16 | `getpid`   | -                              | the process id |
#![no_std]

pub mod rng;

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
    pub const MADVISE: usize = 10;
    pub const CHECKSUM: usize = 11;
    pub const MREMAP: usize = 12;
    pub const FORK: usize = 13;
    pub const WAIT: usize = 14;
    pub const EXIT_GROUP: usize = 15;
    pub const GETPID: usize = 16;
}

/// `flags` of `mremap` (Linux's values).
pub mod mremap {
    /// The mapping may move if it cannot grow in place.
    pub const MAYMOVE: usize = 1;
    /// Move it to exactly `new` (with `MAYMOVE`).
    pub const FIXED: usize = 2;
}

/// `advice` of `madvise` (Linux's numbers).
pub mod advice {
    /// The range reads as zeroes afterwards; its frames and emptied page
    /// tables are freed (Linux `MADV_DONTNEED`).
    pub const DONTNEED: usize = 4;
    /// Collapse every 2 MiB block of the range into a transparent huge page
    /// (Linux `MADV_COLLAPSE`): -EAGAIN if a block holds shared or pinned
    /// pages (the rest is done).
    pub const COLLAPSE: usize = 25;
    /// Make every page of the range present and writable, as a write to
    /// each would, without a fault per page (Linux `MADV_POPULATE_WRITE`):
    /// -ENOMEM if part of the range is not mapped, -EFAULT if part of it is
    /// not writable (checked before anything is populated).
    pub const POPULATE_WRITE: usize = 23;
}

/// Longest range `checksum` accepts (bytes).
pub const CHECKSUM_MAX: usize = 16 << 20;

/// The `checksum` system call's function: 64-bit FNV-1a of `bytes` with the
/// top bit cleared (so it is never mistaken for `-errno`). User programs
/// compute the same to check what the kernel read.
pub const fn checksum(bytes: &[u8]) -> u64 {
    checksum_finish(checksum_update(checksum_seed(), bytes))
}

/// [`checksum`] continued over more bytes: `checksum_update(checksum_seed(), b)`
/// for one buffer equals `checksum(b)`.
pub const fn checksum_seed() -> u64 {
    0xcbf2_9ce4_8422_2325
}

/// Folds `bytes` into a running [`checksum`] state (finish with
/// [`checksum_finish`]).
pub const fn checksum_update(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// The system call's result for a running state.
pub const fn checksum_finish(h: u64) -> u64 {
    h & !(1 << 63)
}

/// Error numbers (returned negated).
pub mod errno {
    pub const EINTR: isize = 4;
    pub const ECHILD: isize = 10;
    pub const EAGAIN: isize = 11;
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

/// Compile-time maximum number of CPUs (Linux `CONFIG_NR_CPUS`): 64 unless
/// the build sets the `NR_CPUS` environment variable (1..=256). The one
/// source for every crate that sizes per-CPU arrays by it (`arch::percpu`,
/// `mm::config`): they re-export it, and the kernel asserts they agree.
pub const NR_CPUS: usize = parse_nr_cpus(option_env!("NR_CPUS"), 64);

const fn parse_nr_cpus(value: Option<&str>, default: usize) -> usize {
    let Some(s) = value else { return default };
    let bytes = s.as_bytes();
    assert!(!bytes.is_empty(), "NR_CPUS is empty");
    let mut i = 0;
    let mut n = 0usize;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "NR_CPUS must be a decimal number");
        assert!(n <= 1000, "NR_CPUS must be in 1..=256");
        n = n * 10 + (bytes[i] - b'0') as usize;
        i += 1;
    }
    assert!(n >= 1 && n <= 256, "NR_CPUS must be in 1..=256");
    n
}

/// Exclusive end of user mappings (Linux `TASK_SIZE_MAX` on x86_64 with
/// 4-level paging): the user half is PML4 slots 0..256, minus its last page,
/// which stays unmapped so that no user object ends at the canonical hole
/// (a speculative access past it would be non-canonical). Every check of a
/// user address (system-call pointers, page faults, mmap placement) uses it.
pub const TASK_SIZE_MAX: u64 = (1 << 47) - 4096;

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
    /// Two threads run this together (barrier 100): `arg0` rounds of:
    /// append `arg1` (a thread tag) to the shared trace at `TRACE_ADDR`, then
    /// `yield`. Exits 0.
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
    /// The fault storm (see [`crate::storm`]): `arg0` is the thread index;
    /// exits with the number of mismatches.
    pub const STORM: usize = 9;
    /// `fork` with copy-on-write seen from ring 3 (see [`crate::fork`]):
    /// maps and fills memory (4 KiB pages, a THP, zero-page reads), forks;
    /// the child checks it sees the parent's data while the parent
    /// overwrites part of it, writes its own, and exits with its pid; the
    /// parent waits, checks the status and that the child's writes stayed
    /// out of its memory. Exits with 0 or the number of the failed check.
    pub const FORK_PRIVATE: usize = 10;
    /// `wait` and `getpid`: children exiting with chosen statuses (one
    /// killed by a fault), waited for out of order; `-ECHILD` for a pid
    /// waited for twice, its own pid, a grandchild and a pid that never
    /// existed. Exits with 0 or the number of the failed check.
    pub const FORK_WAIT: usize = 11;
    /// One thread of a multi-thread process for the kill tests: touches
    /// [`crate::fork::MEMBER_BYTES`] of fresh memory, meets the other
    /// `arg1` threads in a barrier, then plays role `arg0`
    /// (`crate::fork::ROLE_*`).
    pub const PROC_MEMBER: usize = 12;
    /// The fork storm (see [`crate::fork::StormPage`]): `arg0` is the
    /// thread index; writers exit 0, the forker with the number of children
    /// that saw an inconsistent snapshot.
    pub const FORK_STORM: usize = 13;
    /// Waits for the kernel's go (`crate::fork::EnomemPage`), forks, and
    /// reports what `fork` returned; a child exits 0 at once.
    pub const FORK_ENOMEM: usize = 14;
    /// The fork benchmark (see [`crate::fork::BenchPage`]): `arg0` is the
    /// thread index.
    pub const FORK_BENCH: usize = 15;
    /// The system-call fuzzer (see [`crate::fuzz`]): `arg0` is the seed,
    /// `arg1` the number of calls. Exits 0 after its calls, or with the
    /// number of calls that succeeded where they must fail.
    pub const FUZZ: usize = 32;

    /// A short name for task names and logs.
    pub const fn name(program: usize) -> &'static str {
        match program {
            REPORT_CPU => "report-cpu",
            YIELD_TRACE => "yield-trace",
            TOUCH_KERNEL => "touch-kernel",
            EXEC_NX => "exec-nx",
            BAD_POINTERS => "bad-pointers",
            EXIT_WITH => "exit-with",
            WRITE_TEXT => "write-text",
            TOUCH_RANGE => "touch-range",
            SPIN => "spin",
            STORM => "storm",
            FORK_PRIVATE => "fork-private",
            FORK_WAIT => "fork-wait",
            PROC_MEMBER => "proc-member",
            FORK_STORM => "fork-storm",
            FORK_ENOMEM => "fork-enomem",
            FORK_BENCH => "fork-bench",
            FUZZ => "fuzz",
            _ => "unknown",
        }
    }
}

/// The system-call fuzzer (`program::FUZZ`): one thread per process calls
/// every system call with hostile arguments and counts the results in a
/// [`fuzz::Report`] the kernel maps at [`fuzz::REPORT_ADDR`].
pub mod fuzz {
    /// Where the kernel maps the report page.
    pub const REPORT_ADDR: u64 = 0x2100_0000;
    /// Where the fuzzer keeps its own mappings (read-write, `PROT_NONE`,
    /// transparent-huge): every address it passes to a call that changes
    /// mappings lies here or is one the kernel must refuse (kernel,
    /// non-canonical, beyond the user half), so it never unmaps its own
    /// code or stack by design; a call that does so anyway is a kernel bug
    /// the fuzzer sees as its own death.
    pub const ARENA: u64 = 0x40_0000_0000;
    /// Bytes of the arena (1 GiB aligned).
    pub const ARENA_LEN: u64 = 64 << 20;
    /// Most `fork`s one fuzzer makes (each child exits at once and is
    /// waited for).
    pub const MAX_FORKS: u64 = 8;

    /// Result classes the fuzzer counts, indexes of `Report::results`.
    pub const OK: usize = 0;
    /// `-EINVAL`.
    pub const EINVAL: usize = 1;
    /// `-EFAULT`.
    pub const EFAULT: usize = 2;
    /// `-ENOMEM`.
    pub const ENOMEM: usize = 3;
    /// `-ENOSYS`.
    pub const ENOSYS: usize = 4;
    /// `-EAGAIN`.
    pub const EAGAIN: usize = 5;
    /// `-ECHILD`.
    pub const ECHILD: usize = 6;
    /// `-EINTR`.
    pub const EINTR: usize = 7;
    /// Any other negative result.
    pub const OTHER: usize = 8;
    /// Number of classes.
    pub const CLASSES: usize = 9;
    /// Their names, in index order.
    pub const CLASS_NAMES: [&str; CLASSES] =
        ["ok", "EINVAL", "EFAULT", "ENOMEM", "ENOSYS", "EAGAIN", "ECHILD", "EINTR", "other"];

    /// What a fuzzer reports (written as it goes, so a fuzzer that is
    /// killed leaves its counts so far).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Report {
        /// System calls made.
        pub calls: u64,
        /// Results by class (`OK`, `EINVAL`, ...).
        pub results: [u64; CLASSES],
        /// Calls that succeeded where they must fail (a bad address,
        /// length, flag or number the kernel accepted).
        pub unexpected_ok: u64,
        /// The first such call: number and arguments.
        pub first_unexpected: [u64; 7],
        /// `fork`s made.
        pub forks: u64,
        /// The system call in progress (number), for a fuzzer that died.
        pub last_nr: u64,
        /// 1 once the fuzzer finished its calls.
        pub done: u64,
    }
}

/// Shared trace area used by `YIELD_TRACE` (mapped by the test).
pub const TRACE_ADDR: u64 = 0x1000_0000;

/// The fault-storm program (`program::STORM`): threads of one address space
/// touch memory in patterns chosen by a parameter block the kernel writes at
/// [`storm::PARAMS_ADDR`]; each thread reports into its own result slot.
pub mod storm {
    /// Where the kernel maps the storm's area ([`AREA_SIZE`] bytes: the
    /// parameter block, then one [`Report`] per thread).
    pub const PARAMS_ADDR: u64 = 0x2000_0000;
    /// Offset of thread `i`'s report: `REPORTS_OFFSET + i * size_of::<Report>()`.
    pub const REPORTS_OFFSET: u64 = 256;
    /// Most threads one storm can have: one per CPU of the largest kernel
    /// (`NR_CPUS` may be built up to 256), whatever the CPU count.
    pub const MAX_THREADS: usize = 256;
    /// Bytes mapped at [`PARAMS_ADDR`]: enough pages for [`MAX_THREADS`]
    /// reports.
    pub const AREA_SIZE: u64 =
        (REPORTS_OFFSET + (MAX_THREADS * core::mem::size_of::<Report>()) as u64).next_multiple_of(4096);

    const _: () = assert!(core::mem::size_of::<Params>() <= REPORTS_OFFSET as usize, "Params overlaps the reports");
    const _: () = assert!(MAX_THREADS >= crate::NR_CPUS, "a storm must be able to run a thread on every CPU");

    /// Write a tag into this thread's slot of each assigned page, then read
    /// every tag back.
    pub const MODE_TOUCH: u64 = 0;
    /// Read every assigned page first (each must read zero: the shared zero
    /// page), wait for all threads, then write and verify as `MODE_TOUCH`.
    pub const MODE_COW: u64 = 1;
    /// Rounds of: map `len` bytes anywhere, write a tag into the first word
    /// of each 4 KiB page, unmap (will-it-scale page_fault1, per thread).
    /// With `verify`, also check that the rest of each page reads zero
    /// right after its write, and read every tag back before the unmap. A
    /// failed `mmap` or `munmap`, a wrong tag or a nonzero byte counts as a
    /// mismatch.
    pub const MODE_CYCLE: u64 = 2;
    /// Rounds of `mmap(MAP_FIXED)` over `[base, base + len)`: replaces the
    /// mapping (unmap + map under the address-space lock) while others touch it.
    pub const MODE_REMAPPER: u64 = 3;
    /// Rounds of `mprotect` of one 4 KiB page in each 2 MiB of the range,
    /// splitting any 2 MiB mapping there.
    pub const MODE_SPLITTER: u64 = 4;
    /// Rounds of `madvise(MADV_DONTNEED)` over each 2 MiB of the range
    /// (which also reclaims the PTE tables it empties) while others touch it.
    pub const MODE_DONTNEED: u64 = 5;
    /// As `MODE_TOUCH`, and every tag is also read back through the
    /// `checksum` system call (pinned pages, the lockless walker): the
    /// kernel must see the tag, or zero where a remap or DONTNEED took it.
    pub const MODE_GUP: u64 = 6;
    /// Rounds of: write and verify as `MODE_TOUCH`, then
    /// `madvise(MADV_DONTNEED)` this thread's share of the region, in
    /// chunks of up to 2 MiB (whole 2 MiB regions when they are aligned, so
    /// the emptied PTE tables are reclaimed too), and the next round faults
    /// everything again. With `PATTERN_BLOCKS` the share is the thread's own
    /// block and threads never wait for each other; with any other pattern
    /// threads share PTE tables, so the share is every `threads`-th 2 MiB
    /// region starting at the thread's index, zapped between two barriers
    /// (all threads have verified their pages before any zap, and every zap
    /// is done before the next round's writes). A `madvise` error counts as
    /// a mismatch. The benchmark's `madvise` workloads.
    pub const MODE_TOUCH_DONTNEED: u64 = 7;
    /// Writes tags into the first [`MOVER_PAGES`] pages of the region, then
    /// rounds of `mremap(MAYMOVE | FIXED)` of them to `aux` and back,
    /// checking every tag after each move (a lost or wrong tag is a
    /// mismatch). Run by thread 0 with `PATTERN_BLOCKS`, whose block it is.
    pub const MODE_MREMAP: u64 = 8;
    /// Rounds of `madvise(MADV_COLLAPSE)` over each 2 MiB of the region
    /// (`EAGAIN`, a refused block, is fine), and `MADV_DONTNEED` of one 2 MiB
    /// every third round, while others touch it.
    pub const MODE_COLLAPSE: u64 = 9;
    /// Pages `MODE_MREMAP` moves.
    pub const MOVER_PAGES: u64 = 16;

    /// Thread `i` of `n` touches the `i`-th contiguous block of pages.
    pub const PATTERN_BLOCKS: u64 = 0;
    /// Thread `i` touches pages `i, i + n, i + 2n, ...` (same PTE tables);
    /// with [`Params::chunk_pages`] `c > 1`, runs of `c` pages instead:
    /// pages `ic .. ic + c`, then `(i + n)c .. (i + n)c + c`, and so on.
    pub const PATTERN_INTERLEAVED: u64 = 1;
    /// Every thread touches every page (its own 8-byte slot in it).
    pub const PATTERN_SAME: u64 = 2;
    /// Thread `i` touches the first page of every 2 MiB region if `i` is
    /// even (THP faults), else every 64th page plus its index (4 KiB faults).
    pub const PATTERN_HUGE_MIX: u64 = 3;

    /// The parameter block.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Params {
        /// One of the `MODE_*` constants (for threads that follow `pattern`).
        pub mode: u64,
        /// One of the `PATTERN_*` constants.
        pub pattern: u64,
        /// Start of the region (mapped by the kernel, except in `MODE_CYCLE`).
        pub base: u64,
        /// Its length in bytes.
        pub len: u64,
        /// Threads taking part (barrier parties).
        pub threads: u64,
        /// Rounds (each starts with a barrier). In `MODE_CYCLE`, with
        /// `duration_cycles`, `u64::MAX` makes each thread cycle until its
        /// time is up (the bench's `disjoint` windows).
        pub rounds: u64,
        /// `map::*` flags for the mappings the program makes itself.
        pub map_flags: u64,
        /// Nonzero: a tag that reads back as zero was lost to a concurrent
        /// remap (counted in `lost`), not an error.
        pub tolerate_loss: u64,
        /// Nonzero: between rounds, thread 0 replaces the whole region with a
        /// fresh mapping (MAP_FIXED), so every round faults again.
        pub remap_between_rounds: u64,
        /// Per-thread mode overrides: thread `i` runs `special_mode` if
        /// `i < special_threads` (remappers, splitters).
        pub special_threads: u64,
        /// See `special_threads`.
        pub special_mode: u64,
        /// `MODE_CYCLE`, `MODE_TOUCH` and `MODE_TOUCH_DONTNEED`: a thread
        /// stops touching this many TSC cycles after its start barrier (a
        /// cycle still unmaps its region; a touch pass checks only the pages
        /// it touched; a DONTNEED round still zaps its share, and with
        /// shared tables still takes part in every round's barriers); 0
        /// means no limit. Bounds a benchmark window when faults are slow (the
        /// single-lock build on many vCPUs), like will-it-scale's
        /// fixed-duration samples.
        pub duration_cycles: u64,
        /// `MODE_MREMAP`: where the pages move to and back from.
        pub aux: u64,
        /// `MODE_CYCLE`: nonzero: check all 4096 bytes of every page right
        /// after its first write (a fresh page reads zero but for the tag),
        /// and read every tag back before the unmap. Off in the benchmark,
        /// which does what will-it-scale does: the checks would double the
        /// time per page, and under TCG the read-back misses QEMU's TLB
        /// whenever another thread's unmap has shot it down in between.
        pub verify: u64,
        /// Nonzero: a system call that fails with `-ENOMEM` (failure
        /// injection, memory pressure) is counted in `Report::oom` and its
        /// step skipped, not counted as a mismatch.
        pub tolerate_oom: u64,
        /// Nonzero (`MODE_TOUCH` on a region the kernel mapped): every round
        /// ends with a barrier, then thread 0 unmaps the whole region (and,
        /// before every round but the last, maps it again, `MAP_FIXED`),
        /// then another barrier; each thread's end time is taken after the
        /// last round's, so the unmaps and re-maps fall inside the timed
        /// span (will-it-scale's shared `page_fault1`, whose loop includes
        /// the munmap). A failed `munmap` or `mmap` is a mismatch. Takes
        /// the place of `remap_between_rounds`. Once thread 0's time is up
        /// (`duration_cycles`), the round it is in is the last, for every
        /// thread ([`Report::last_round`]).
        pub unmap_each_round: u64,
        /// `MODE_CYCLE`: nonzero: the thread makes each run of this many
        /// pages present with `MADV_POPULATE_WRITE` just before writing them,
        /// so its writes take no fault: the fault path's work without an
        /// exception per page (the bench's `populate`). A failed `madvise`
        /// is a mismatch.
        pub populate_pages: u64,
        /// `PATTERN_INTERLEAVED`: the threads take turns in runs of this
        /// many pages (0 and 1: page by page). The bench's diagnostic
        /// shapes of `same-table`: 8 gives each thread whole lines of PTEs
        /// (8 entries of 8 bytes) in shared tables, 512 whole PTE tables in
        /// the one shared VMA.
        pub chunk_pages: u64,
    }

    /// What one thread reports.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Report {
        /// Pages this thread touched (first-touch faults in `MODE_CYCLE`).
        pub touched: u64,
        /// Tags that read back wrong: data corruption.
        pub mismatches: u64,
        /// Tags lost to a concurrent remap (only with `tolerate_loss`).
        pub lost: u64,
        /// TSC when the timed part began (after the start barrier) and ended.
        pub start_cycles: u64,
        /// See `start_cycles`.
        pub end_cycles: u64,
        /// Set to 1 when the thread finished.
        pub done: u64,
        /// Tags checked through the `checksum` system call (`MODE_GUP`).
        pub gup_checks: u64,
        /// System calls that failed with `-ENOMEM` (only with `tolerate_oom`).
        pub oom: u64,
        /// TSC cycles of the timed part spent waiting at barriers for the
        /// other threads (and, with `unmap_each_round`, for thread 0's
        /// munmap): time in the window this thread did none of its work.
        pub waited_cycles: u64,
        /// With `unmap_each_round`: rounds this thread completed.
        pub rounds: u64,
        /// With `unmap_each_round`, thread 0's only: TSC cycles in its
        /// munmaps and re-mmaps (the others wait at a barrier meanwhile).
        pub unmap_cycles: u64,
        /// With `unmap_each_round`, thread 0's only: nonzero once it has
        /// unmapped the region for the last time (after the last round, or
        /// when its time was up); the others read it after the round's last
        /// barrier and stop too, so all make the same rounds.
        pub last_round: u64,
    }

    /// Calls `f` with the address of every page thread `i` touches in
    /// `[p.base, p.base + p.len)` under `p.pattern`, in order. The storm
    /// program follows it; the kernel's tests use it to know which pages
    /// the threads made present (with `PATTERN_SAME` and the even threads
    /// of `PATTERN_HUGE_MIX`, threads share pages).
    pub fn for_each_page(p: &Params, i: u64, mut f: impl FnMut(u64)) {
        const PAGE: u64 = 4096;
        const HUGE: u64 = 2 << 20;
        let pages = p.len / PAGE;
        let n = p.threads.max(1);
        match p.pattern {
            PATTERN_BLOCKS => {
                let per = pages / n;
                for k in i * per..(i + 1) * per {
                    f(p.base + k * PAGE);
                }
            }
            PATTERN_INTERLEAVED => {
                let c = p.chunk_pages.max(1);
                if c == 1 {
                    // Page by page, the benchmark's shape: the plain loop
                    // (the run loop below costs about 13 more instructions
                    // a page, 0.6% of a `same-table` fault, under --icount).
                    let mut k = i;
                    while k < pages {
                        f(p.base + k * PAGE);
                        k += n;
                    }
                    return;
                }
                let mut run = i;
                while run * c < pages {
                    for k in run * c..((run + 1) * c).min(pages) {
                        f(p.base + k * PAGE);
                    }
                    run += n;
                }
            }
            PATTERN_SAME => {
                for k in 0..pages {
                    f(p.base + k * PAGE);
                }
            }
            _ /* HUGE_MIX */ => {
                let mut region = p.base;
                while region < p.base + p.len {
                    if i.is_multiple_of(2) {
                        f(region);
                    } else {
                        let mut k = 1 + i;
                        while k < HUGE / PAGE {
                            f(region + k * PAGE);
                            k += 64;
                        }
                    }
                    region += HUGE;
                }
            }
        }
    }

    /// The tag a thread writes into a page in a round.
    pub const fn tag(page_addr: u64, thread: u64, round: u64) -> u64 {
        (page_addr ^ (thread << 48) ^ (round << 40)) | 1
    }

    #[cfg(test)]
    mod tests {
        extern crate std;
        use std::vec::Vec;

        use super::*;

        fn pages_of(p: &Params, i: u64) -> Vec<u64> {
            let mut v = Vec::new();
            for_each_page(p, i, |a| v.push((a - p.base) / 4096));
            v
        }

        #[test]
        fn interleaved_runs_cover_every_page_once_in_turns_of_chunk_pages() {
            for (threads, chunk, pages) in [(2, 0, 64), (2, 1, 64), (2, 8, 64), (3, 8, 100), (2, 512, 2048), (4, 3, 10)]
            {
                let p = Params {
                    pattern: PATTERN_INTERLEAVED,
                    base: 1 << 32,
                    len: pages * 4096,
                    threads,
                    chunk_pages: chunk,
                    ..Params::default()
                };
                let mut owner = std::vec![None; pages as usize];
                for i in 0..threads {
                    for k in pages_of(&p, i) {
                        assert_eq!(
                            owner[k as usize], None,
                            "page {k} touched twice ({threads} threads, chunk {chunk})"
                        );
                        owner[k as usize] = Some(i);
                    }
                }
                let c = chunk.max(1);
                for (k, o) in owner.iter().enumerate() {
                    assert_eq!(*o, Some((k as u64 / c) % threads), "page {k} ({threads} threads, chunk {chunk})");
                }
            }
            // Page by page, as before the chunks: thread 1 of 2 takes the odd pages.
            let p = Params { pattern: PATTERN_INTERLEAVED, len: 8 * 4096, threads: 2, ..Params::default() };
            assert_eq!(pages_of(&p, 1), [1, 3, 5, 7]);
            // Runs of 8: each thread has whole lines of PTEs.
            let p = Params { chunk_pages: 8, len: 32 * 4096, ..p };
            assert_eq!(pages_of(&p, 1), (8..16).chain(24..32).collect::<Vec<_>>());
        }
    }
}

/// Processes, `fork` and the programs that test and measure them
/// (`program::FORK_*`, `program::PROC_MEMBER`).
pub mod fork {
    /// Where the kernel maps the one page the fork storm, the fork bench and
    /// the process tests share with it (parameters, reports, control words).
    pub const CONTROL_ADDR: u64 = 0x3000_0000;
    /// Where `FORK_STORM` and `FORK_BENCH` expect their data region.
    pub const DATA_ADDR: u64 = 0x1_0000_0000;

    /// The exit status of a process killed for a fault (128 + SIGSEGV,
    /// negated; the kernel's `uspace::KILLED`).
    pub const KILLED: i64 = -139;

    /// Memory each `PROC_MEMBER` thread maps and writes before its barrier.
    pub const MEMBER_BYTES: u64 = 1 << 20;
    /// `PROC_MEMBER` role: spin in ring 3 (no system calls) for `MEMBER_SPIN_CYCLES`,
    /// then exit 0. Only a kill ends it sooner.
    pub const ROLE_SPIN: u64 = 0;
    /// `PROC_MEMBER` role: block in a barrier nobody else joins.
    pub const ROLE_BLOCK: u64 = 1;
    /// `PROC_MEMBER` role: fork a child that blocks in a barrier for ever,
    /// store its pid at [`MemberPage::child_pid`], then `wait` for it.
    pub const ROLE_WAITER: u64 = 2;
    /// `PROC_MEMBER` role: once [`MemberPage::go`] is set, read kernel
    /// memory (a fatal fault).
    pub const ROLE_FAULT: u64 = 3;
    /// `PROC_MEMBER` role: once [`MemberPage::go`] is set,
    /// `exit_group(EXIT_GROUP_CODE)`.
    pub const ROLE_EXIT_GROUP: u64 = 4;
    /// The status `ROLE_EXIT_GROUP` ends its process with.
    pub const EXIT_GROUP_CODE: i64 = 77;
    /// How long `ROLE_SPIN` spins (TSC cycles: about 80 s at 3 GHz). Only a
    /// kill that failed lets it run out (and then `escaped` says so, well
    /// inside the test run's time limit); it is long so that a slow setup
    /// on a busy host (8 vCPUs spinning on 2 cores while the waiter forks)
    /// can never look like one.
    pub const MEMBER_SPIN_CYCLES: u64 = 240_000_000_000;

    /// The `PROC_MEMBER` page at [`CONTROL_ADDR`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct MemberPage {
        /// Threads that have touched their memory and passed the barrier
        /// (each adds one).
        pub ready: u64,
        /// The pid of `ROLE_WAITER`'s child, once forked.
        pub child_pid: u64,
        /// Set by the kernel: the `ROLE_FAULT` and `ROLE_EXIT_GROUP` threads
        /// wait for it (the others are in place by then).
        pub go: u64,
        /// Threads that got past the point where a kill must stop them (the
        /// end of `ROLE_SPIN`'s spin, `ROLE_BLOCK`'s barrier, `ROLE_WAITER`'s
        /// wait): a thread that then exits on its own gets the process's
        /// exit status all the same, so only this tells.
        pub escaped: u64,
    }

    /// The `FORK_ENOMEM` page at [`CONTROL_ADDR`]. The thread sets `ready`,
    /// waits for `go`, forks, stores the result in `result` and sets `done`;
    /// then waits for `go2` and exits 0.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct EnomemPage {
        pub ready: u64,
        pub go: u64,
        pub result: i64,
        pub done: u64,
        pub go2: u64,
        /// Pages of memory the thread writes before `ready` (so fork has
        /// tables and pages to copy).
        pub pages: u64,
    }

    /// Most writer threads of the fork storm.
    pub const MAX_WRITERS: usize = 48;
    /// The words of a page a storm writer writes, in this order (the
    /// first, two in the middle, the last).
    pub const WRITER_WORDS: [u64; 4] = [0, 170, 341, 511];
    /// The word a storm child writes its own tag into (no writer uses it).
    pub const CHILD_WORD: u64 = 256;

    /// The fork storm's page at [`CONTROL_ADDR`]: parameters (written by the
    /// kernel), the writers' control words, the forker's report.
    ///
    /// Writer `w` owns pages `w, w + writers, w + 2 * writers, ...` of the
    /// region at [`DATA_ADDR`] (so every PTE table holds pages of every
    /// writer). In round `r = 1, 2, ...` it stores `started[w] = r`, then
    /// [`storm_tag`]`(k, w, j, r)` into word `WRITER_WORDS[j]` of its `k`-th
    /// page, page by page and word by word, then `done[w] = r`; its stores
    /// reach memory in that order. A child of `fork` sees its parent's
    /// memory as it was at one instant (every store before it, none after):
    /// so for each writer `started` is `done` or `done + 1`, and the
    /// writer's words read in its order hold round `started` up to some
    /// point and round `done` from there on (all `done` if the two are
    /// equal). Anything else (a word of an older or newer round, a round
    /// `started` after a `done` one, a word that is not a tag of its place)
    /// is a torn or mixed snapshot.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct StormPage {
        /// Writer threads (indices `0..writers`); thread `writers` forks,
        /// once every writer has finished its first round.
        pub writers: u64,
        /// Pages each writer owns.
        pub pages_per_writer: u64,
        /// Forks the forker makes.
        pub forks: u64,
        /// Set by the forker when it is done: writers finish their round and exit.
        pub stop: u64,
        /// Forks made, and how many of them returned a child pid.
        pub forks_done: u64,
        /// Forks during which the writers stored at least one tag (their
        /// progress counters moved between just before and just after).
        pub forks_overlapped: u64,
        /// Children whose snapshot was consistent, and those whose was not.
        pub children_ok: u64,
        pub children_bad: u64,
        /// Children that found at least one writer in the middle of a round.
        pub children_mid_round: u64,
        /// The first bad child's exit status (see `storm_child_status`).
        pub first_bad_status: i64,
        /// Forks that failed (`fork` or `wait` returned an error).
        pub errors: u64,
        /// Rounds each writer started and finished.
        pub started: [u64; MAX_WRITERS],
        pub done: [u64; MAX_WRITERS],
        /// Pages each writer has written (all rounds).
        pub progress: [u64; MAX_WRITERS],
    }

    const _: () = assert!(core::mem::size_of::<StormPage>() <= 4096, "StormPage must fit in a page");

    /// The tag writer `w` stores in word slot `j` of its `k`-th page in round
    /// `r`: a magic byte, the round, the writer, the slot and the page, so
    /// that a word out of place or of the wrong round is recognised.
    pub const fn storm_tag(k: u64, w: u64, j: u64, r: u64) -> u64 {
        (0xa5 << 56) | ((r & 0xff_ffff) << 32) | ((w & 0xff) << 24) | ((j & 0xf) << 20) | (k & 0xf_ffff)
    }

    /// The round of a word that should be `storm_tag(k, w, j, _)` or zero
    /// (round 0: never written), or `None` if it is neither.
    pub const fn storm_round(v: u64, k: u64, w: u64, j: u64) -> Option<u64> {
        if v == 0 {
            return Some(0);
        }
        let r = (v >> 32) & 0xff_ffff;
        if r != 0 && v == storm_tag(k, w, j, r) { Some(r) } else { None }
    }

    /// A storm child's exit status: `2 * violations + mid_round` (bit 0: it
    /// found a writer in the middle of a round).
    pub const fn storm_child_status(violations: u64, mid_round: bool) -> i64 {
        (2 * violations + mid_round as u64) as i64
    }

    /// The fork bench's page at [`CONTROL_ADDR`]. Every thread writes one
    /// byte into each page of its block of the region at [`DATA_ADDR`]
    /// (populate), all meet, thread 0 forks (timed; the child blocks until
    /// the kernel kills it), all meet again and write their blocks once more
    /// (timed: every write is a copy-on-write fault that copies, the child
    /// still maps every page).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct BenchPage {
        /// Threads (barrier parties).
        pub threads: u64,
        /// Bytes of the region (each thread writes `len / threads`).
        pub len: u64,
        /// TSC cycles the `fork` call took, and the child's pid.
        pub fork_cycles: u64,
        pub child_pid: u64,
        /// Per thread: the copy-on-write phase's TSC start and end, and the
        /// pages written in it.
        pub start: [u64; MAX_WRITERS],
        pub end: [u64; MAX_WRITERS],
        pub written: [u64; MAX_WRITERS],
        /// Per thread: nonzero if a check failed (a write that did not read back,
        /// a failed fork).
        pub failed: [u64; MAX_WRITERS],
    }

    const _: () = assert!(core::mem::size_of::<BenchPage>() <= 4096, "BenchPage must fit in a page");
}
