//! The system-call fuzzer (`abi::program::FUZZ`): seeded, bounded calls of
//! every system call with hostile arguments, counted by result in the
//! report page (`abi::fuzz`).
//!
//! Arguments are drawn from hostile pools: kernel, non-canonical,
//! unaligned and past-the-end addresses, lengths that wrap the address
//! space, zero and huge sizes, unknown flags, protections and advice,
//! pointers to unmapped and `PROT_NONE` memory, ranges that straddle the
//! arena's mappings and its transparent huge pages; unknown system-call
//! numbers too. Calls that change mappings only ever get arena addresses or
//! addresses the kernel must refuse, so the fuzzer never unmaps its own
//! code or stack by design. Where the kernel must refuse (an address
//! outside the user half, a range that wraps, an unknown flag, bit or
//! number), a success is counted as unexpected and the first such call is
//! recorded. `fork` is called at most `abi::fuzz::MAX_FORKS` times; each
//! child exits at once and is waited for. A call that blocks for good
//! (`barrier` with more parties than threads, `wait` for a live child) is
//! never made.

use abi::fuzz::{self, ARENA, ARENA_LEN, Report};
use abi::rng::Rng;
use abi::{errno, nr};

use crate::sys;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
/// The top of the user half (exclusive).
const USER_END: u64 = abi::TASK_SIZE_MAX;

/// An address and whether the kernel must refuse any call that uses it as
/// the start of a range with a nonzero length.
#[derive(Clone, Copy)]
struct Addr {
    va: u64,
    invalid: bool,
}

/// Addresses the kernel must refuse: kernel half, non-canonical, the last
/// page of the user half and beyond.
const BAD_ADDRS: [u64; 8] = [
    0xffff_ffff_8000_0000,
    0xffff_8000_0000_0000,
    0xffff_ffff_ffff_f000,
    0x0000_8000_0000_0000,
    0x1234_5678_9abc_d000,
    0x8000_0000_0000_0000,
    USER_END,
    USER_END + PAGE,
];

/// The arena's layout, re-established now and then: read-write pages, a
/// `PROT_NONE` block between them, a transparent-huge region (touched, so
/// 2 MiB pages exist), and holes.
fn build_arena() {
    let rw = abi::prot::READ | abi::prot::WRITE;
    let fixed = abi::map::FIXED;
    sys::mmap(ARENA as usize, (16 * PAGE) as usize, rw, fixed);
    sys::mmap((ARENA + 16 * PAGE) as usize, (16 * PAGE) as usize, 0, fixed);
    sys::mmap((ARENA + 32 * PAGE) as usize, (16 * PAGE) as usize, rw, fixed);
    let thp = ARENA + 2 * HUGE;
    if sys::mmap(thp as usize, (2 * HUGE) as usize, rw, fixed | abi::map::HUGEPAGE) == thp as isize {
        for k in 0..2 {
            // SAFETY: just mapped read-write (a write fault maps a THP).
            unsafe { ((thp + k * HUGE) as *mut u64).write_volatile(k + 1) };
        }
    }
}

/// A start address: in the arena (aligned, unaligned, at its mappings'
/// edges), or one the kernel must refuse. `reads_only`: also the program's
/// own image and stack, which only reading calls may get.
fn addr(r: &mut Rng, reads_only: bool) -> Addr {
    let edges = [0, 16 * PAGE, 32 * PAGE, 48 * PAGE, 2 * HUGE, 3 * HUGE, 4 * HUGE];
    let valid = |va| Addr { va, invalid: false };
    match r.below(10) {
        0..=3 => valid(ARENA + r.pick(&edges) + r.pick(&[0, PAGE, 0u64.wrapping_sub(PAGE)])),
        4 => valid(ARENA + r.below(ARENA_LEN)), // unaligned, anywhere in the arena
        5 => valid(ARENA + r.below(ARENA_LEN / PAGE) * PAGE),
        6 if reads_only => valid(r.pick(&[abi::USER_IMAGE_BASE, abi::USER_IMAGE_BASE + 0x1234, stack_addr()])),
        6 | 7 => Addr { va: r.pick(&BAD_ADDRS) + r.pick(&[0, 1, 8]), invalid: true },
        // The null page (unmapped): only for reading calls, as a range
        // from there may reach the program.
        8 if reads_only => valid(r.pick(&[0, 1, PAGE - 1, PAGE])),
        _ => valid(ARENA + ARENA_LEN + r.below(ARENA_LEN) / PAGE * PAGE), // holes past the arena
    }
}

/// An address on this thread's stack.
fn stack_addr() -> u64 {
    let x = 0u64;
    core::hint::black_box(&x) as *const u64 as u64
}

/// A length for a range starting at `start`: zero, tiny, page-sized,
/// huge-page-sized, huge, or one that wraps the address space; and whether
/// the range (nonzero) must be refused for leaving the user half.
fn len(r: &mut Rng, start: u64) -> (u64, bool) {
    let l = match r.below(9) {
        0 => 0,
        1 => r.pick(&[1, 7, PAGE - 1]),
        2 => PAGE * (1 + r.below(16)),
        3 => r.pick(&[HUGE, HUGE + PAGE, 2 * HUGE]),
        4 => r.pick(&[1 << 40, 1 << 46, 1 << 47]),
        5 => 0u64.wrapping_sub(start),        // ends exactly at 2^64
        6 => 0u64.wrapping_sub(start) + PAGE, // wraps past zero
        7 => r.pick(&[u64::MAX, 1 << 63, u64::MAX - PAGE + 1]),
        _ => r.below(ARENA_LEN),
    };
    let leaves = l != 0 && start.checked_add(l).is_none_or(|end| end > USER_END);
    (l, leaves)
}

/// Protections: valid ones, and unknown bits (which must be refused).
fn prot(r: &mut Rng) -> (u64, bool) {
    let p = r.pick(&[0, 1, 3, 5, 7, 2, 8, 0x10, u64::MAX, 0x8000_0000]);
    (p, p & !7 != 0)
}

/// The system-call result classes of `abi::fuzz`.
fn class(ret: isize) -> usize {
    match ret {
        r if r >= 0 => fuzz::OK,
        r if r == -errno::EINVAL => fuzz::EINVAL,
        r if r == -errno::EFAULT => fuzz::EFAULT,
        r if r == -errno::ENOMEM => fuzz::ENOMEM,
        r if r == -errno::ENOSYS => fuzz::ENOSYS,
        r if r == -errno::EAGAIN => fuzz::EAGAIN,
        r if r == -errno::ECHILD => fuzz::ECHILD,
        r if r == -errno::EINTR => fuzz::EINTR,
        _ => fuzz::OTHER,
    }
}

/// Bytes a fuzzer may ask `MAP_POPULATE` to fill, in all.
const POPULATE_BUDGET: u64 = 32 << 20;

struct Fuzzer {
    rng: Rng,
    report: *mut Report,
    out: Report,
    /// Bytes populated so far.
    populated: u64,
}

impl Fuzzer {
    /// Makes one call; `must_fail`: the arguments are ones the kernel must
    /// refuse, so a success is counted as unexpected.
    fn call(&mut self, n: usize, a: [u64; 6], must_fail: bool) -> isize {
        self.out.last_nr = n as u64;
        self.publish();
        let ret = sys::syscall6(n, a.map(|v| v as usize));
        self.out.calls += 1;
        self.out.results[class(ret)] += 1;
        if must_fail && ret >= 0 {
            if self.out.unexpected_ok == 0 {
                self.out.first_unexpected = [n as u64, a[0], a[1], a[2], a[3], a[4], a[5]];
            }
            self.out.unexpected_ok += 1;
        }
        ret
    }

    fn publish(&self) {
        // SAFETY: the kernel maps the report page before it starts this
        // thread; this process's one thread writes it.
        unsafe { self.report.write_volatile(self.out) };
    }

    /// One random call.
    fn step(&mut self) {
        let r = &mut self.rng;
        let junk = [r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64()];
        match r.below(20) {
            0 => {
                // log: hostile pointers, too-long lengths, invalid UTF-8
                // (a valid line would only flood the console).
                let a = addr(r, true);
                let bad_utf8 = [0xffu8, 0xfe, 0x80, 0x41];
                let (ptr, n, must) = match r.below(3) {
                    0 if a.invalid => (a.va, 1 + r.below(64), true),
                    0 => (a.va, abi::LOG_MAX as u64 + 1 + r.below(1 << 20), true),
                    1 => (bad_utf8.as_ptr() as u64, 4, true),
                    _ => (r.pick(&BAD_ADDRS), r.pick(&[1, 4096, u64::MAX]), true),
                };
                self.call(nr::LOG, [ptr, n, junk[2], junk[3], junk[4], junk[5]], must);
            }
            1 => {
                let n = r.pick(&[nr::YIELD, nr::GETTID, nr::GETCPU, nr::CYCLES, nr::GETPID]);
                self.call(n, junk, false);
            }
            2 | 3 => {
                // mmap: any hint (FIXED only in the arena or at a refused
                // address), hostile lengths, protections and flags.
                let a = addr(r, false);
                let (l, leaves) = len(r, a.va);
                let (p, bad_prot) = prot(r);
                let mut flags = r.pick(&[0, 1, 2, 3, 4, 8, 0x10, 0x11, 0x20, 0x100, u64::MAX]);
                let populate = abi::map::POPULATE as u64;
                if flags & populate != 0 && (l > 4 * HUGE || self.populated > POPULATE_BUDGET) {
                    flags &= !populate; // do not fill the machine
                }
                if flags & populate != 0 && flags & !0x1f == 0 {
                    self.populated += l;
                }
                let fixed = flags & abi::map::FIXED as u64 != 0;
                let bad_flags = flags & !0x1f != 0;
                let must =
                    bad_prot || bad_flags || l == 0 || (fixed && (a.invalid || leaves || !a.va.is_multiple_of(PAGE)));
                self.call(nr::MMAP, [a.va, l, p, flags, junk[4], junk[5]], must);
            }
            4 | 5 => {
                let a = addr(r, false);
                let (l, leaves) = len(r, a.va);
                let must = (l != 0 && a.invalid) || leaves || !a.va.is_multiple_of(PAGE);
                self.call(nr::MUNMAP, [a.va, l, junk[2], junk[3], junk[4], junk[5]], must);
            }
            6 | 7 => {
                let a = addr(r, false);
                let (l, leaves) = len(r, a.va);
                let (p, bad_prot) = prot(r);
                let must = bad_prot || (l != 0 && (a.invalid || leaves)) || !a.va.is_multiple_of(PAGE);
                self.call(nr::MPROTECT, [a.va, l, p, junk[3], junk[4], junk[5]], must);
            }
            8 | 9 => {
                let a = addr(r, false);
                let (l, leaves) = len(r, a.va);
                let advice =
                    r.pick(&[abi::advice::DONTNEED as u64, abi::advice::COLLAPSE as u64, 0, 1, 3, 99, u64::MAX]);
                let known = advice == abi::advice::DONTNEED as u64 || advice == abi::advice::COLLAPSE as u64;
                let must = !known || (l != 0 && (a.invalid || leaves)) || !a.va.is_multiple_of(PAGE);
                self.call(nr::MADVISE, [a.va, l, advice, junk[3], junk[4], junk[5]], must);
            }
            10 | 11 => {
                // checksum reads only: any address, the program included.
                let a = addr(r, true);
                let (l, leaves) = len(r, a.va);
                let must = l > abi::CHECKSUM_MAX as u64 || (l != 0 && (a.invalid || leaves));
                self.call(nr::CHECKSUM, [a.va, l, junk[2], junk[3], junk[4], junk[5]], must);
            }
            12 | 13 => {
                let old = addr(r, false);
                let (old_len, leaves) = len(r, old.va);
                let (new_len, _) = len(r, old.va);
                let flags = r.pick(&[0, 1, 3, 2, 4, 0x100, u64::MAX]);
                let new = addr(r, false);
                let must = old_len == 0
                    || old.invalid
                    || leaves
                    || flags & !3 != 0
                    || !old.va.is_multiple_of(PAGE)
                    || (flags == 3 && new.invalid);
                // A FIXED move must not land outside the arena unless refused.
                let new_va =
                    if flags & 2 != 0 && !new.invalid { ARENA + new.va % ARENA_LEN / PAGE * PAGE } else { new.va };
                self.call(nr::MREMAP, [old.va, old_len, new_len, flags, new_va, junk[5]], must);
            }
            14 => {
                // barrier: only calls that cannot block (no other thread).
                let parties = r.pick(&[0, 1, 4097, u64::MAX]);
                self.call(nr::BARRIER, [junk[0], parties, junk[2], junk[3], junk[4], junk[5]], parties != 1);
            }
            15 => {
                // wait: pids that are not children (never blocks), and
                // hostile status pointers.
                let pid = r.pick(&[0, 1, u64::MAX, 1 << 40, sys::getpid() as u64]);
                let ptr = if r.chance(2) { addr(r, true).va } else { 0 };
                self.call(nr::WAIT, [pid, ptr, junk[2], junk[3], junk[4], junk[5]], true);
            }
            16 => self.fork_once(),
            _ => {
                // Unknown numbers (and huge ones).
                let n = r.pick(&[64, 255, 256, 1000, 4096, usize::MAX, 1 << 32]);
                self.call(n, junk, true);
            }
        }
    }

    /// `fork`, bounded: the child exits at once; the parent waits for it,
    /// now and then through a hostile status pointer first.
    fn fork_once(&mut self) {
        if self.out.forks >= fuzz::MAX_FORKS {
            return;
        }
        self.out.forks += 1;
        let child = self.call(nr::FORK, [0; 6], false);
        if child == 0 {
            sys::exit_group(0);
        }
        if child > 0 {
            let bad = self.rng.pick(&BAD_ADDRS);
            // A bad status pointer: -EFAULT, and the child stays waitable
            // (or it was reaped: then -ECHILD below is fine too).
            self.call(nr::WAIT, [child as u64, bad, 0, 0, 0, 0], true);
            let mut status = 0i64;
            self.call(nr::WAIT, [child as u64, &mut status as *mut i64 as u64, 0, 0, 0, 0], false);
        }
    }
}

/// Entry: `calls` calls from `seed`; exits with the number of unexpected
/// successes (0: every call that had to fail failed).
pub fn run(seed: u64, calls: u64) -> isize {
    let mut f =
        Fuzzer { rng: Rng::new(seed), report: fuzz::REPORT_ADDR as *mut Report, out: Report::default(), populated: 0 };
    build_arena();
    for i in 0..calls {
        if i % 256 == 0 {
            build_arena();
        }
        f.step();
    }
    f.out.done = 1;
    f.publish();
    f.out.unexpected_ok as isize
}
