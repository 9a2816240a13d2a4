//! User-mode test programs.
//!
//! One static ELF holds every program; the kernel starts each thread at
//! `_start(program, arg0, arg1)` (see `abi::program`). The programs are small
//! on purpose: they exercise system calls, faults and memory from ring 3 and
//! report through their exit code and the `log` call.
#![no_std]
#![no_main]

mod fork;
mod fuzz;
mod storm;
mod sys;

use abi::{errno, program};

#[unsafe(no_mangle)]
extern "C" fn _start(program: usize, arg0: usize, arg1: usize) -> ! {
    let code = match program {
        program::REPORT_CPU => report_cpu(arg0),
        program::YIELD_TRACE => yield_trace(arg0, arg1),
        program::TOUCH_KERNEL => touch(0xffff_ffff_8000_0000),
        program::EXEC_NX => exec_nx(),
        program::BAD_POINTERS => bad_pointers(),
        program::EXIT_WITH => arg0 as isize,
        program::WRITE_TEXT => write_text(),
        program::TOUCH_RANGE => touch_range(arg0, arg1),
        program::SPIN => spin(arg0),
        program::STORM => storm::run(arg0 as u64),
        program::FUZZ => fuzz::run(arg0 as u64, arg1 as u64),
        program::FORK_PRIVATE => fork::private(),
        program::FORK_WAIT => fork::wait(),
        program::PROC_MEMBER => fork::member(arg0 as u64, arg1 as u64),
        program::FORK_STORM => fork::storm(arg0 as u64),
        program::FORK_ENOMEM => fork::enomem(),
        program::FORK_BENCH => fork::bench(arg0 as u64),
        _ => {
            sys::log("unknown program");
            -1
        }
    };
    sys::exit(code)
}

fn report_cpu(rounds: usize) -> isize {
    let cpu = sys::getcpu();
    let tid = sys::gettid();
    for _ in 0..rounds {
        if sys::gettid() != tid {
            return -2;
        }
        // Threads are pinned: the CPU must not change under us.
        if sys::getcpu() != cpu {
            return -3;
        }
    }
    let mut buf = [0u8; 64];
    let msg = sys::fmt(&mut buf, &[b"user thread tid ", &sys::dec(tid as u64), b" on cpu ", &sys::dec(cpu as u64)]);
    sys::log(msg);
    cpu as isize
}

fn yield_trace(rounds: usize, tag: usize) -> isize {
    // Layout at TRACE_ADDR: [next index: u64][entries: u8...]
    // SAFETY: the test maps the trace page read-write before starting the
    // threads; the index is only updated atomically.
    let next = unsafe { core::sync::atomic::AtomicU64::from_ptr(abi::TRACE_ADDR as *mut u64) };
    let entries = (abi::TRACE_ADDR + 8) as *mut u8;
    // Both threads start together, or the first could finish before the
    // second exists.
    sys::barrier(100, 2);
    for _ in 0..rounds {
        let i = next.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
        // SAFETY: as above; each index is handed out once.
        unsafe { entries.add(i as usize).write_volatile(tag as u8) };
        sys::yield_now();
    }
    0
}

fn touch(addr: u64) -> isize {
    // SAFETY: deliberately invalid: this program exists to be killed.
    let v = unsafe { (addr as *const u64).read_volatile() };
    v as isize
}

fn exec_nx() -> isize {
    // `ret` encoded in a stack buffer: the stack is mapped no-exec.
    let code = [0xc3u8; 16];
    // SAFETY: deliberately invalid: executing data must fault.
    let f: extern "C" fn() = unsafe { core::mem::transmute(code.as_ptr()) };
    f();
    core::hint::black_box(&code);
    1
}

fn write_text() -> isize {
    let target = write_text as *const () as *mut u8;
    // SAFETY: deliberately invalid: text is mapped read-only.
    unsafe { target.write_volatile(0xcc) };
    1
}

fn bad_pointers() -> isize {
    let checks: [(u64, usize, isize); 5] = [
        (0xffff_ffff_8000_0000, 8, -errno::EFAULT),      // kernel address
        (0x7000_0000_0000, 8, -errno::EFAULT),           // unmapped user address
        (0x0000_7fff_ffff_fffc, 16, -errno::EFAULT),     // runs past the user half
        (u64::MAX - 4, 16, -errno::EFAULT),              // wraps around
        (abi::USER_IMAGE_BASE, 1 << 20, -errno::EINVAL), // longer than LOG_MAX
    ];
    for (i, (ptr, len, want)) in checks.into_iter().enumerate() {
        let got = sys::syscall2(abi::nr::LOG, ptr as usize, len);
        if got != want {
            return i as isize + 1;
        }
    }
    0
}

fn touch_range(start: usize, len: usize) -> isize {
    let mut bad = 0;
    let mut addr = start;
    while addr < start + len {
        let p = addr as *mut u64;
        let want = (addr as u64) ^ 0x5a5a_5a5a;
        // SAFETY: the test mapped [start, start + len) read-write.
        unsafe {
            p.write_volatile(want);
            if p.read_volatile() != want {
                bad += 1;
            }
        }
        addr += 4096;
    }
    bad
}

fn spin(iterations: usize) -> isize {
    let mut x = 0u64;
    for i in 0..iterations {
        x = core::hint::black_box(x.wrapping_add(i as u64));
    }
    core::hint::black_box(x);
    0
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::log("user program panicked");
    sys::exit(-100)
}
