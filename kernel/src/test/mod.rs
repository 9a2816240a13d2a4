//! The in-kernel test harness and the tests that belong to no single module.
//!
//! * [`runner`]: selects, runs and reports the `#[ktest]`s (the protocol
//!   xtask parses);
//! * `selftest`: the runner's own failure paths, run only on request;
//! * `mmtests`: the mm crate's helpers on real page tables loaded in CR3.
//!
//! Most tests live next to the code they test, in a `tests` module.

mod mmtests;
pub mod runner;
#[cfg(target_os = "none")]
mod selftest;
