//! The process programs: `fork` and copy-on-write, `wait`, members of a
//! process that gets killed, the fork storm and the fork benchmark (see
//! `abi::program` and `abi::fork`).

use core::sync::atomic::{AtomicU64, Ordering, compiler_fence};

use abi::fork::{
    self as f, BenchPage, CHILD_WORD, CONTROL_ADDR, DATA_ADDR, EnomemPage, MemberPage, StormPage, WRITER_WORDS,
};
use abi::{errno, map, prot};

use crate::sys;

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
const RW: usize = prot::READ | prot::WRITE;

fn read(addr: usize) -> u64 {
    // SAFETY: every caller reads memory it mapped (or the kernel mapped for
    // it) readable.
    unsafe { (addr as *const u64).read_volatile() }
}

fn write(addr: usize, v: u64) {
    // SAFETY: every caller writes memory it mapped (or the kernel mapped for
    // it) writable.
    unsafe { (addr as *mut u64).write_volatile(v) }
}

/// A word of the shared control page, as an atomic.
fn control_word<T>(field: &T) -> &AtomicU64 {
    // SAFETY: the field is an aligned u64 of the control page, which stays
    // mapped for the program's life; other threads (and the kernel) access it
    // only atomically or with volatile accesses.
    unsafe { AtomicU64::from_ptr(field as *const T as *mut u64) }
}

/// The TSC (ring 3 may read it).
fn tsc() -> u64 {
    // SAFETY: `rdtsc` has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

// ------------------------------------------------------------ FORK_PRIVATE

/// What the parent writes before the fork, into word `w` of page `k` of
/// region `r`.
fn original(r: u64, k: usize, w: usize) -> u64 {
    0x0f0f_0000_0000_0000 | (r << 40) | ((k as u64) << 16) | w as u64
}

fn by_parent(r: u64, k: usize, w: usize) -> u64 {
    original(r, k, w) ^ 0x00a0_0000_0000_0000
}

fn by_child(r: u64, k: usize, w: usize) -> u64 {
    original(r, k, w) ^ 0x00c0_0000_0000_0000
}

/// The words of a page both sides check (first, middle, last).
const WORDS: [usize; 3] = [0, 256, 511];

/// `program::FORK_PRIVATE`.
pub fn private() -> isize {
    const PAGES: usize = 64;
    let small = sys::mmap(0, PAGES * PAGE, RW, 0);
    // Twice 2 MiB, so that an aligned 2 MiB block (a THP) lies inside.
    let huge = sys::mmap(0, 2 * HUGE, RW, map::HUGEPAGE);
    let zero = sys::mmap(0, 16 * PAGE, RW, 0);
    if small < 0 || huge < 0 || zero < 0 {
        return 1;
    }
    let thp = (huge as usize).next_multiple_of(HUGE);
    // (region, base, pages): region 0 is 4 KiB pages, region 1 one THP.
    let regions = [(0u64, small as usize, PAGES), (1u64, thp, HUGE / PAGE)];
    for &(r, base, pages) in &regions {
        for k in 0..pages {
            for w in WORDS {
                write(base + k * PAGE + w * 8, original(r, k, w));
            }
        }
    }
    for k in 0..16 {
        // Reads map the shared zero page.
        if read(zero as usize + k * PAGE) != 0 {
            return 2;
        }
    }
    let me = sys::getpid();
    let pid = sys::fork();
    if pid < 0 {
        return 3;
    }
    if pid == 0 {
        // The child runs after the parent has overwritten the first half of
        // each region (it waits for us on our CPU): it must still see the
        // originals there, then writes the second half.
        let mut bad = 0;
        for &(r, base, pages) in &regions {
            for k in 0..pages {
                for w in WORDS {
                    if read(base + k * PAGE + w * 8) != original(r, k, w) {
                        bad += 1;
                    }
                }
            }
            for k in pages / 2..pages {
                for w in WORDS {
                    write(base + k * PAGE + w * 8, by_child(r, k, w));
                }
            }
            for k in 0..pages {
                for w in WORDS {
                    let want = if k < pages / 2 { original(r, k, w) } else { by_child(r, k, w) };
                    if read(base + k * PAGE + w * 8) != want {
                        bad += 1;
                    }
                }
            }
        }
        for k in 0..16 {
            if read(zero as usize + k * PAGE) != 0 {
                bad += 1;
            }
            write(zero as usize + k * PAGE, 7);
        }
        let child = sys::getpid();
        // The parent checks that the status is the pid fork gave it.
        sys::exit(if bad == 0 && child != me { child } else { -1 - bad as isize });
    }
    for &(r, base, pages) in &regions {
        for k in 0..pages / 2 {
            for w in WORDS {
                write(base + k * PAGE + w * 8, by_parent(r, k, w));
            }
        }
    }
    match sys::wait(pid) {
        Ok(status) if status == pid as i64 => {}
        Ok(_) => return 4,
        Err(_) => return 5,
    }
    for &(r, base, pages) in &regions {
        for k in 0..pages {
            for w in WORDS {
                let want = if k < pages / 2 { by_parent(r, k, w) } else { original(r, k, w) };
                if read(base + k * PAGE + w * 8) != want {
                    return 6;
                }
            }
        }
    }
    for k in 0..16 {
        if read(zero as usize + k * PAGE) != 0 {
            return 7;
        }
    }
    if sys::wait(pid) != Err(-errno::ECHILD) {
        return 8;
    }
    if sys::getpid() != me {
        return 9;
    }
    0
}

// ------------------------------------------------------------ FORK_WAIT

/// `program::FORK_WAIT`.
pub fn wait() -> isize {
    const N: usize = 4;
    let me = sys::getpid();
    if me <= 0 {
        return 1;
    }
    let mut pids = [0isize; N];
    for (i, slot) in pids.iter_mut().enumerate() {
        let pid = sys::fork();
        if pid < 0 {
            return 2;
        }
        if pid == 0 {
            match i {
                // A fatal fault: the status says so.
                2 => {
                    read(0xffff_ffff_8000_0000);
                    sys::exit(-2)
                }
                // A grandchild, left for nobody to wait for; our status
                // is its pid.
                3 => {
                    let g = sys::fork();
                    if g == 0 {
                        sys::exit(5);
                    }
                    sys::exit(g)
                }
                _ => sys::exit(100 + i as isize),
            }
        }
        *slot = pid;
    }
    // Out of order: the last first.
    for i in (0..N).rev() {
        let Ok(status) = sys::wait(pids[i]) else { return 10 + i as isize };
        let ok = match i {
            2 => status == f::KILLED,
            3 => {
                // Not our child (our child's): ECHILD, alive or not.
                status > 0 && sys::wait(status as isize) == Err(-errno::ECHILD)
            }
            _ => status == 100 + i as i64,
        };
        if !ok {
            return 20 + i as isize;
        }
    }
    if sys::wait(pids[0]) != Err(-errno::ECHILD) {
        return 30;
    }
    if sys::wait(me) != Err(-errno::ECHILD) {
        return 31;
    }
    if sys::wait(0x7fff_ffff) != Err(-errno::ECHILD) {
        return 32;
    }
    // A status pointer into the kernel: EFAULT (and the child is reaped).
    let pid = sys::fork();
    if pid == 0 {
        sys::exit(0);
    }
    if sys::wait_raw(pid, 0xffff_ffff_8000_0000) != -errno::EFAULT {
        return 33;
    }
    if sys::wait(pid) != Err(-errno::ECHILD) {
        return 34;
    }
    // No status pointer: the pid comes back.
    let pid = sys::fork();
    if pid == 0 {
        sys::exit(0);
    }
    if sys::wait_raw(pid, 0) != pid {
        return 35;
    }
    0
}

// ------------------------------------------------------------ PROC_MEMBER

fn member_page() -> &'static MemberPage {
    // SAFETY: the kernel maps the control page before it starts the threads.
    unsafe { &*(CONTROL_ADDR as *const MemberPage) }
}

/// `program::PROC_MEMBER`.
pub fn member(role: u64, parties: u64) -> isize {
    let len = f::MEMBER_BYTES as usize;
    let m = sys::mmap(0, len, RW, 0);
    if m < 0 {
        return 1;
    }
    for a in (m as usize..m as usize + len).step_by(PAGE) {
        write(a, a as u64);
    }
    sys::barrier(50, parties);
    let page = member_page();
    let go = || {
        while control_word(&page.go).load(Ordering::Acquire) == 0 {
            sys::yield_now();
        }
    };
    control_word(&page.ready).fetch_add(1, Ordering::AcqRel);
    match role {
        f::ROLE_SPIN => {
            // No system call: only an interrupt can end this early.
            let end = tsc() + f::MEMBER_SPIN_CYCLES;
            while tsc() < end {
                core::hint::spin_loop();
            }
            control_word(&page.escaped).fetch_add(1, Ordering::AcqRel);
            0
        }
        f::ROLE_BLOCK => {
            sys::barrier(51, 1 << 12);
            control_word(&page.escaped).fetch_add(1, Ordering::AcqRel);
            2
        }
        f::ROLE_WAITER => {
            let pid = sys::fork();
            if pid == 0 {
                // Blocks until somebody kills this process.
                sys::barrier(52, 1 << 12);
                sys::exit(3);
            }
            if pid < 0 {
                return 4;
            }
            control_word(&page.child_pid).store(pid as u64, Ordering::Release);
            let _ = sys::wait(pid);
            control_word(&page.escaped).fetch_add(1, Ordering::AcqRel);
            5
        }
        f::ROLE_FAULT => {
            go();
            read(0xffff_ffff_8000_0000);
            6
        }
        f::ROLE_EXIT_GROUP => {
            go();
            sys::exit_group(f::EXIT_GROUP_CODE as isize)
        }
        _ => 7,
    }
}

// ------------------------------------------------------------ FORK_ENOMEM

/// `program::FORK_ENOMEM`.
pub fn enomem() -> isize {
    // SAFETY: the kernel maps the control page before it starts the thread.
    let page = unsafe { &*(CONTROL_ADDR as *const EnomemPage) };
    let len = control_word(&page.pages).load(Ordering::Acquire) as usize * PAGE;
    let m = sys::mmap(0, len, RW, 0);
    if m < 0 {
        return 1;
    }
    for a in (m as usize..m as usize + len).step_by(PAGE) {
        write(a, a as u64);
    }
    control_word(&page.ready).store(1, Ordering::Release);
    while control_word(&page.go).load(Ordering::Acquire) == 0 {
        sys::yield_now();
    }
    let r = sys::fork();
    if r == 0 {
        sys::exit(0);
    }
    control_word(&page.result).store(r as u64, Ordering::Release);
    control_word(&page.done).store(1, Ordering::Release);
    while control_word(&page.go2).load(Ordering::Acquire) == 0 {
        sys::yield_now();
    }
    // Our memory is intact and ours to write (a failed fork may have
    // write-protected it).
    for a in (m as usize..m as usize + len).step_by(PAGE) {
        if read(a) != a as u64 {
            return 2;
        }
        write(a, !(a as u64));
    }
    if r > 0 && sys::wait(r) != Ok(0) {
        return 3;
    }
    0
}

// ------------------------------------------------------------ FORK_STORM

fn storm_page() -> &'static StormPage {
    // SAFETY: the kernel maps and fills the control page before it starts
    // the threads.
    unsafe { &*(CONTROL_ADDR as *const StormPage) }
}

/// Address of writer `w`'s `k`-th page.
fn storm_addr(p: &StormPage, w: u64, k: u64) -> usize {
    DATA_ADDR as usize + ((k * p.writers + w) as usize) * PAGE
}

/// `program::FORK_STORM`: writer `index`, or the forker (`index == writers`).
pub fn storm(index: u64) -> isize {
    let p = storm_page();
    if index < p.writers { storm_writer(p, index) } else { storm_forker(p) }
}

/// Rounds of writes in the order the snapshot check relies on (see
/// `abi::fork::StormPage`) until the forker says stop.
fn storm_writer(p: &StormPage, w: u64) -> isize {
    let slot = w as usize;
    let mut round = 0;
    while control_word(&p.stop).load(Ordering::Acquire) == 0 {
        round += 1;
        control_word(&p.started[slot]).store(round, Ordering::Relaxed);
        // Stores reach memory in program order (x86); the fences keep the
        // compiler from moving them.
        compiler_fence(Ordering::SeqCst);
        for k in 0..p.pages_per_writer {
            let page = storm_addr(p, w, k);
            for (j, &word) in WRITER_WORDS.iter().enumerate() {
                write(page + word as usize * 8, f::storm_tag(k, w, j as u64, round));
            }
            control_word(&p.progress[slot]).fetch_add(1, Ordering::Relaxed);
        }
        compiler_fence(Ordering::SeqCst);
        control_word(&p.done[slot]).store(round, Ordering::Release);
    }
    0
}

fn progress(p: &StormPage) -> u64 {
    (0..p.writers as usize).map(|w| control_word(&p.progress[w]).load(Ordering::Relaxed)).sum()
}

fn storm_forker(p: &StormPage) -> isize {
    let report = |field: &u64, v: u64| control_word(field).fetch_add(v, Ordering::Relaxed);
    // Every page present before the first fork.
    while (0..p.writers as usize).any(|w| control_word(&p.done[w]).load(Ordering::Acquire) == 0) {
        sys::yield_now();
    }
    for _ in 0..p.forks {
        let before = progress(p);
        let pid = sys::fork();
        if pid == 0 {
            sys::exit(storm_child(p) as isize);
        }
        let after = progress(p);
        if pid < 0 {
            report(&p.errors, 1);
            continue;
        }
        report(&p.forks_done, 1);
        if after > before {
            report(&p.forks_overlapped, 1);
        }
        match sys::wait(pid) {
            Ok(status) => {
                if status & 1 == 1 {
                    report(&p.children_mid_round, 1);
                }
                if status >> 1 == 0 {
                    report(&p.children_ok, 1);
                } else {
                    if control_word(&p.children_bad).fetch_add(1, Ordering::Relaxed) == 0 {
                        control_word(&p.first_bad_status).store(status as u64, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                report(&p.errors, 1);
            }
        }
    }
    control_word(&p.stop).store(1, Ordering::Release);
    control_word(&p.children_bad).load(Ordering::Relaxed) as isize
}

/// A storm child: checks its snapshot (see `abi::fork::StormPage`), then
/// writes its own word into every page and checks that its copies kept the
/// snapshot. Returns its exit status (`abi::fork::storm_child_status`).
fn storm_child(p: &StormPage) -> i64 {
    let mut violations = 0u64;
    let mut mid_round = false;
    let sum = |p: &StormPage| {
        let mut h = abi::checksum_seed();
        for w in 0..p.writers {
            let counters = [p.started[w as usize], p.done[w as usize]];
            for c in counters {
                h = abi::checksum_update(h, &c.to_le_bytes());
            }
            for k in 0..p.pages_per_writer {
                for &word in &WRITER_WORDS {
                    h = abi::checksum_update(h, &read(storm_addr(p, w, k) + word as usize * 8).to_le_bytes());
                }
            }
        }
        h
    };
    for w in 0..p.writers {
        let (s, d) = (p.started[w as usize], p.done[w as usize]);
        if s != d && s != d + 1 {
            violations += 1;
            continue;
        }
        mid_round |= s == d + 1;
        // In the writer's order: round s up to some word, round d after it.
        let mut in_d = s == d;
        for k in 0..p.pages_per_writer {
            for (j, &word) in WRITER_WORDS.iter().enumerate() {
                let v = read(storm_addr(p, w, k) + word as usize * 8);
                match f::storm_round(v, k, w, j as u64) {
                    Some(r) if r == d => in_d = true,
                    Some(r) if r == s && !in_d => {}
                    _ => violations += 1,
                }
            }
        }
    }
    let before = sum(p);
    let me = sys::getpid() as u64;
    for w in 0..p.writers {
        for k in 0..p.pages_per_writer {
            write(storm_addr(p, w, k) + CHILD_WORD as usize * 8, (0x5c << 56) | (me << 24) | (k * p.writers + w));
        }
    }
    if sum(p) != before {
        violations += 1;
    }
    for w in 0..p.writers {
        for k in 0..p.pages_per_writer {
            if read(storm_addr(p, w, k) + CHILD_WORD as usize * 8) != (0x5c << 56) | (me << 24) | (k * p.writers + w) {
                violations += 1;
            }
        }
    }
    f::storm_child_status(violations, mid_round)
}

// ------------------------------------------------------------ FORK_BENCH

fn bench_page() -> &'static BenchPage {
    // SAFETY: the kernel maps and fills the control page before it starts
    // the threads.
    unsafe { &*(CONTROL_ADDR as *const BenchPage) }
}

/// `program::FORK_BENCH`: thread `index` (see `abi::fork::BenchPage`).
pub fn bench(index: u64) -> isize {
    let p = bench_page();
    let i = index as usize;
    let block = (p.len / p.threads) as usize / PAGE * PAGE;
    let base = DATA_ADDR as usize + i * block;
    for a in (base..base + block).step_by(PAGE) {
        write(a, 1);
    }
    sys::barrier(60, p.threads);
    if i == 0 {
        let t0 = tsc();
        let pid = sys::fork();
        let t1 = tsc();
        if pid == 0 {
            // Keeps every page shared until the kernel kills us.
            sys::barrier(61, 2);
            sys::exit(1);
        }
        if pid < 0 {
            control_word(&p.failed[i]).store(1, Ordering::Relaxed);
        } else {
            control_word(&p.fork_cycles).store(t1 - t0, Ordering::Relaxed);
            control_word(&p.child_pid).store(pid as u64, Ordering::Release);
        }
    }
    sys::barrier(62, p.threads);
    let start = tsc();
    let mut written = 0;
    for a in (base..base + block).step_by(PAGE) {
        write(a, 2);
        written += 1;
    }
    let end = tsc();
    for a in (base..base + block).step_by(PAGE) {
        if read(a) != 2 {
            control_word(&p.failed[i]).store(2, Ordering::Relaxed);
        }
    }
    control_word(&p.start[i]).store(start, Ordering::Relaxed);
    control_word(&p.end[i]).store(end, Ordering::Relaxed);
    control_word(&p.written[i]).store(written, Ordering::Release);
    0
}
