//! The fault-storm program: see `abi::storm` for the protocol.

use abi::storm::{self, Params, Report, for_each_page};

use crate::sys;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;

fn params() -> Params {
    // SAFETY: the kernel maps and fills the parameter page before starting
    // any storm thread, and never changes it while they run.
    unsafe { (storm::PARAMS_ADDR as *const Params).read_volatile() }
}

/// Whether every thread but the special ones (`index < special_threads`,
/// this one among them) has finished its report.
fn others_done(p: &Params, index: u64) -> bool {
    (p.special_threads..p.threads).filter(|&i| i != index).all(|i| {
        // SAFETY: the report area is mapped for every thread; another
        // thread's slot is written by it, read here with a volatile load.
        unsafe { core::ptr::addr_of!((*report(i)).done).read_volatile() == 1 }
    })
}

fn report(index: u64) -> *mut Report {
    (storm::PARAMS_ADDR + storm::REPORTS_OFFSET + index * core::mem::size_of::<Report>() as u64) as *mut Report
}

/// Whether a system call's result `r` (expected: `want`) is a failure to
/// report as a mismatch: `-ENOMEM` is counted in `out.oom` instead when the
/// storm tolerates it (failure injection).
fn bad(r: isize, want: isize, p: &Params, out: &mut Report) -> bool {
    if r == want {
        return false;
    }
    if r == -abi::errno::ENOMEM && p.tolerate_oom != 0 {
        out.oom += 1;
        return false;
    }
    true
}

/// `madvise(MADV_DONTNEED)` of `[start, end)` in chunks that end at 2 MiB
/// boundaries (whole 2 MiB regions where the range is aligned); returns the
/// number of calls that failed.
fn dontneed(start: u64, end: u64) -> u64 {
    let mut failed = 0;
    let mut a = start;
    while a < end {
        let next = ((a / HUGE + 1) * HUGE).min(end);
        if sys::madvise(a as usize, (next - a) as usize, abi::advice::DONTNEED) != 0 {
            failed += 1;
        }
        a = next;
    }
    failed
}

/// `MODE_TOUCH_DONTNEED`'s zap (see `abi::storm`): thread `i`'s own block
/// with `PATTERN_BLOCKS`, else every `threads`-th 2 MiB region from the
/// `i`-th, between two barriers. Returns the failed `madvise` calls.
fn dontneed_share(p: &Params, i: u64, out: &mut Report) -> u64 {
    let n = p.threads.max(1);
    let end = p.base + p.len;
    if p.pattern == storm::PATTERN_BLOCKS {
        let per = p.len / PAGE / n * PAGE;
        return dontneed(p.base + i * per, p.base + (i + 1) * per);
    }
    wait_for_all(4, p, out);
    let mut failed = 0;
    let mut region = p.base + i * HUGE;
    while region < end {
        failed += dontneed(region, (region + HUGE).min(end));
        region += n * HUGE;
    }
    wait_for_all(5, p, out);
    failed
}

/// The TSC, read directly (ring 3 may: CR4.TSD is clear), so checking a
/// deadline costs no system call.
fn tsc() -> u64 {
    // SAFETY: `rdtsc` has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Waits at barrier `id` of the timed part for every thread, and counts the
/// wait in `out.waited_cycles`.
fn wait_for_all(id: u64, p: &Params, out: &mut Report) {
    let t = tsc();
    sys::barrier(id, p.threads);
    out.waited_cycles += tsc().wrapping_sub(t);
}

/// Whether `deadline` (0: none) has passed.
fn past(deadline: u64) -> bool {
    deadline != 0 && tsc() > deadline
}

/// [`past`], looked at every 64 pages done.
fn expired(deadline: u64, done: u64) -> bool {
    done.is_multiple_of(64) && past(deadline)
}

/// Whether every byte of `page` after its first word reads zero (a fresh
/// anonymous page must, whatever its frame held before).
fn rest_is_zero(page: u64) -> bool {
    (1..PAGE / 8).all(|w| {
        // SAFETY: the caller's page is mapped readable.
        unsafe { ((page + w * 8) as *const u64).read_volatile() == 0 }
    })
}

/// The word of `page` that belongs to thread `i`.
fn slot(page: u64, i: u64) -> *mut u64 {
    (page + (i % 512) * 8) as *mut u64
}

/// Entry: thread `index` of the storm.
pub fn run(index: u64) -> isize {
    let p = params();
    let r = report(index);
    let mut out = Report::default();
    let mode = if index < p.special_threads { p.special_mode } else { p.mode };
    sys::barrier(0, p.threads);
    out.start_cycles = sys::cycles();
    let deadline = if p.duration_cycles != 0 { out.start_cycles + p.duration_cycles } else { 0 };
    for round in 0..p.rounds.max(1) {
        match mode {
            storm::MODE_CYCLE => {
                let len = p.len as usize;
                let addr = sys::mmap(0, len, abi::prot::READ | abi::prot::WRITE, p.map_flags as usize);
                if addr < 0 {
                    if bad(addr, 0, &p, &mut out) {
                        out.mismatches += 1;
                        break;
                    }
                    continue;
                }
                let (start, mut a) = (addr as u64, addr as u64);
                let populate = p.populate_pages * PAGE;
                while a < start + p.len {
                    if populate != 0 && (a - start).is_multiple_of(populate) {
                        let len = populate.min(start + p.len - a) as usize;
                        if sys::madvise(a as usize, len, abi::advice::POPULATE_WRITE) != 0 {
                            out.mismatches += 1;
                            break;
                        }
                    }
                    // SAFETY: we just mapped [addr, addr + len) read-write.
                    unsafe { (a as *mut u64).write_volatile(storm::tag(a, index, round)) };
                    if p.verify != 0 && !rest_is_zero(a) {
                        out.mismatches += 1;
                    }
                    out.touched += 1;
                    a += PAGE;
                    if expired(deadline, out.touched) {
                        break;
                    }
                }
                // Every page touched still holds its tag (the tests; the
                // bench, like will-it-scale, only writes).
                if p.verify != 0 {
                    for b in (start..a).step_by(PAGE as usize) {
                        // SAFETY: as above, still mapped.
                        if unsafe { (b as *const u64).read_volatile() } != storm::tag(b, index, round) {
                            out.mismatches += 1;
                        }
                    }
                }
                if bad(sys::munmap(addr as usize, len), 0, &p, &mut out) {
                    out.mismatches += 1;
                }
                // No barriers in this mode: past the deadline, stop cycling.
                if past(deadline) {
                    break;
                }
            }
            storm::MODE_REMAPPER => {
                let flags = abi::map::FIXED | p.map_flags as usize;
                let r = sys::mmap(p.base as usize, p.len as usize, abi::prot::READ | abi::prot::WRITE, flags);
                if bad(r, p.base as isize, &p, &mut out) {
                    out.mismatches += 1;
                }
                sys::yield_now();
            }
            storm::MODE_DONTNEED => {
                for _ in 0..10 {
                    let mut region = p.base;
                    while region < p.base + p.len {
                        if bad(sys::madvise(region as usize, HUGE as usize, abi::advice::DONTNEED), 0, &p, &mut out) {
                            out.mismatches += 1;
                        }
                        region += HUGE;
                    }
                    sys::yield_now();
                }
            }
            storm::MODE_MREMAP => {
                let (home, away) = (p.base, p.aux);
                let len = (storm::MOVER_PAGES * PAGE) as usize;
                let tag = |k: u64| storm::tag(home + k * PAGE, index, 0);
                if round == 0 {
                    for k in 0..storm::MOVER_PAGES {
                        // SAFETY: the kernel mapped the region read-write;
                        // these pages are this thread's block.
                        unsafe { ((home + k * PAGE) as *mut u64).write_volatile(tag(k)) };
                    }
                }
                let flags = abi::mremap::MAYMOVE | abi::mremap::FIXED;
                let mut moves = 0u64;
                // At least ten round trips, and on while the others still run:
                // the moves must overlap their faults, however the host
                // schedules the vCPUs.
                while moves < 10 || (round + 1 == p.rounds.max(1) && moves < 100_000 && !others_done(&p, index)) {
                    moves += 1;
                    for (from, to) in [(home, away), (away, home)] {
                        let r = sys::mremap(from as usize, len, len, flags, to as usize);
                        if r != to as isize {
                            if bad(r, to as isize, &p, &mut out) {
                                out.mismatches += 1;
                            }
                            continue;
                        }
                        for k in 0..storm::MOVER_PAGES {
                            // SAFETY: just moved here, mapped read-write.
                            if unsafe { ((to + k * PAGE) as *const u64).read_volatile() } != tag(k) {
                                out.mismatches += 1;
                            }
                        }
                        out.touched += storm::MOVER_PAGES;
                    }
                }
            }
            storm::MODE_COLLAPSE => {
                let mut step = 0u64;
                // At least ten passes, and on while the others still run.
                while step < 10 || (round + 1 == p.rounds.max(1) && step < 100_000 && !others_done(&p, index)) {
                    step += 1;
                    let mut region = p.base;
                    while region < p.base + p.len {
                        let r = sys::madvise(region as usize, HUGE as usize, abi::advice::COLLAPSE);
                        if r != -abi::errno::EAGAIN && bad(r, 0, &p, &mut out) {
                            out.mismatches += 1;
                        }
                        region += HUGE;
                    }
                    if step % 3 == 2 {
                        let victim = p.base + (step / 3 % (p.len / HUGE)) * HUGE;
                        if bad(sys::madvise(victim as usize, HUGE as usize, abi::advice::DONTNEED), 0, &p, &mut out) {
                            out.mismatches += 1;
                        }
                    }
                    sys::yield_now();
                }
            }
            storm::MODE_SPLITTER => {
                // Toggle EXEC on one 4 KiB page per 2 MiB region: a real
                // protection change (so a huge mapping there must split) that
                // never takes away what the touchers need.
                for step in 0..20 {
                    let extra = if step % 2 == 0 { abi::prot::EXEC } else { 0 };
                    let mut region = p.base;
                    while region < p.base + p.len {
                        let page = region + PAGE * (1 + (round * 20 + step) % 500);
                        let r = sys::mprotect(page as usize, PAGE as usize, abi::prot::READ | abi::prot::WRITE | extra);
                        if bad(r, 0, &p, &mut out) {
                            out.mismatches += 1;
                        }
                        region += HUGE;
                    }
                    sys::yield_now();
                }
            }
            _ => {
                if mode == storm::MODE_COW {
                    for_each_page(&p, index, |page| {
                        // SAFETY: the kernel mapped the region readable.
                        if unsafe { slot(page, index).read_volatile() } != 0 {
                            out.mismatches += 1;
                        }
                    });
                    wait_for_all(1, &p, &mut out);
                }
                // Past the deadline the remaining pages are skipped, and only
                // the pages touched are checked (both walks go in the same
                // order).
                let mut this_round = 0u64;
                let mut stopped = false;
                for_each_page(&p, index, |page| {
                    if stopped {
                        return;
                    }
                    // SAFETY: the kernel mapped the region read-write; this
                    // slot is ours alone.
                    unsafe { slot(page, index).write_volatile(storm::tag(page, index, round)) };
                    this_round += 1;
                    stopped = expired(deadline, this_round);
                });
                out.touched += this_round;
                let mut checked = 0u64;
                for_each_page(&p, index, |page| {
                    if checked == this_round {
                        return;
                    }
                    checked += 1;
                    // SAFETY: as above.
                    let v = unsafe { slot(page, index).read_volatile() };
                    if v == 0 && p.tolerate_loss != 0 {
                        out.lost += 1;
                    } else if v != storm::tag(page, index, round) {
                        out.mismatches += 1;
                    }
                    if mode == storm::MODE_GUP {
                        // The kernel reads the slot through a pinned page.
                        let got = sys::checksum(slot(page, index) as usize, 8);
                        let tag = abi::checksum(&storm::tag(page, index, round).to_le_bytes());
                        let zero = abi::checksum(&[0; 8]);
                        let lost = p.tolerate_loss != 0 && got == zero as isize;
                        // Under failure injection the slow path may find no
                        // memory to fault the page back in (after a DONTNEED).
                        let oom = got == -abi::errno::ENOMEM && p.tolerate_oom != 0;
                        if oom {
                            out.oom += 1;
                        } else if got != tag as isize && !lost {
                            out.mismatches += 1;
                        }
                        out.gup_checks += 1;
                    }
                });
                if mode == storm::MODE_TOUCH_DONTNEED {
                    let failed = dontneed_share(&p, index, &mut out);
                    out.mismatches += failed;
                    // Threads with blocks of their own wait for nobody, so
                    // past the deadline they stop; with shared tables every
                    // thread takes part in every round's barriers.
                    if p.pattern == storm::PATTERN_BLOCKS && past(deadline) {
                        break;
                    }
                }
            }
        }
        if p.unmap_each_round != 0 {
            wait_for_all(2, &p, &mut out);
            if index == 0 {
                let t = tsc();
                if bad(sys::munmap(p.base as usize, p.len as usize), 0, &p, &mut out) {
                    out.mismatches += 1;
                }
                if round + 1 < p.rounds && !past(deadline) {
                    let flags = abi::map::FIXED | p.map_flags as usize;
                    let r = sys::mmap(p.base as usize, p.len as usize, abi::prot::READ | abi::prot::WRITE, flags);
                    if bad(r, p.base as isize, &p, &mut out) {
                        out.mismatches += 1;
                    }
                } else {
                    // Published before the barrier the others wait at.
                    out.last_round = 1;
                    // SAFETY: our own report slot; the others only read
                    // this field, after the barrier below.
                    unsafe { core::ptr::addr_of_mut!((*r).last_round).write_volatile(1) };
                }
                out.unmap_cycles += tsc().wrapping_sub(t);
            }
            wait_for_all(3, &p, &mut out);
            out.rounds += 1;
            // SAFETY: the report area is mapped for every thread; thread 0
            // wrote this field before the barrier we just passed.
            if unsafe { core::ptr::addr_of!((*report(0)).last_round).read_volatile() } != 0 {
                break;
            }
        } else if p.remap_between_rounds != 0 && round + 1 < p.rounds {
            wait_for_all(2, &p, &mut out);
            if index == 0 {
                let flags = abi::map::FIXED | p.map_flags as usize;
                sys::mmap(p.base as usize, p.len as usize, abi::prot::READ | abi::prot::WRITE, flags);
            }
            wait_for_all(3, &p, &mut out);
        }
    }
    out.end_cycles = sys::cycles();
    out.done = 1;
    // SAFETY: the report slot of this thread is ours alone.
    unsafe { r.write_volatile(out) };
    out.mismatches as isize
}
