//! Diagnostics: what the kernel tells the people and tools watching it.
//!
//! * [`logger`]: the `log` facade on the serial console;
//! * [`panic`](mod@panic): the panic handler (report, backtrace, test verdict, exit);
//! * [`faultstat`]: per-CPU page-fault counts and cost histograms;
//! * [`profile`]: the sampling profiler (`cargo xtask profile`);
//! * [`watchdog`]: the lockup watchdog (a CPU spinning on one lock, or
//!   handling no tick, for seconds stops every CPU and reports each);
//! * [`debuginfo`]: the block of build facts gdb/ptlk.py reads.

pub mod debuginfo;
pub mod faultstat;
pub mod logger;
mod panic;
pub mod profile;
pub mod watchdog;
