//! The kernel's serial protocol, as xtask reads it.
//!
//! The kernel's test runner prints libtest-shaped lines (see
//! `kernel/src/testrunner.rs`):
//!
//! ```text
//! running 3 tests
//! test a::b ... ok
//! test a::c ...                 <- written before the test runs
//! [    1.234567] cpu0 INFO  ... <- a log line may break the open line
//! test a::c ... FAILED
//!     panicked at src/x.rs:9: boom
//! not run (1): a::d
//! 1 passed, 1 failed
//! ```
//!
//! [`TestReport`] is fed line by line while QEMU runs, so a timeout can name
//! the test that was running.

/// What a run of the in-kernel test runner reported so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TestReport {
    /// `running N tests`.
    pub planned: Option<usize>,
    /// Tests that printed `ok`.
    pub passed: Vec<String>,
    /// Tests that printed `FAILED`, with the indented lines after them.
    pub failed: Vec<(String, Vec<String>)>,
    /// The test whose `test NAME ... ` line is open (started, not finished).
    pub running: Option<String>,
    /// Tests the runner listed as not run after a failure.
    pub not_run: Vec<String>,
    /// The closing `N passed, M failed` line.
    pub summary: Option<(usize, usize)>,
    /// A `KERNEL PANIC` or `KERNEL OOPS` line was seen.
    pub crashed: bool,
}

impl TestReport {
    /// Consumes one line of serial output (with or without `\r`).
    pub fn feed(&mut self, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(n) =
            line.strip_prefix("running ").and_then(|r| r.strip_suffix(" tests").or_else(|| r.strip_suffix(" test")))
        {
            self.planned = n.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.split_once(" ...") {
                let name = name.to_string();
                match result.trim() {
                    "" => self.running = Some(name),
                    "ok" => {
                        self.running = None;
                        if !self.passed.contains(&name) {
                            self.passed.push(name);
                        }
                    }
                    "FAILED" => {
                        self.running = None;
                        self.failed.push((name, Vec::new()));
                    }
                    _ => {}
                }
            }
        } else if let Some(list) = line.strip_prefix("not run (") {
            if let Some((_, names)) = list.split_once("): ") {
                self.not_run = names.split(", ").map(str::to_string).collect();
            }
        } else if let Some(summary) = parse_summary(line) {
            self.summary = Some(summary);
        } else if line.starts_with("    ")
            && self.summary.is_none()
            && let Some((_, detail)) = self.failed.last_mut()
        {
            detail.push(line.trim().to_string());
        }
        if line.contains("KERNEL PANIC") || line.contains("KERNEL OOPS") {
            self.crashed = true;
        }
    }

    /// Whether the report by itself shows a complete, all-passing run.
    pub fn all_passed(&self) -> bool {
        match self.summary {
            Some((passed, failed)) => {
                failed == 0
                    && self.failed.is_empty()
                    && !self.crashed
                    && passed == self.passed.len()
                    && self.planned == Some(passed)
            }
            None => false,
        }
    }
}

/// The test an unfinished line (`test NAME ... `, no newline yet) says has
/// started, if that is what `partial` is.
pub fn open_test(partial: &str) -> Option<&str> {
    let name = partial.strip_prefix("test ")?.trim_end().strip_suffix(" ...")?;
    (!name.is_empty() && !name.contains(' ')).then_some(name)
}

fn parse_summary(line: &str) -> Option<(usize, usize)> {
    let (p, rest) = line.split_once(" passed, ")?;
    let f = rest.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(text: &str) -> TestReport {
        let mut r = TestReport::default();
        for line in text.lines() {
            r.feed(line);
        }
        r
    }

    #[test]
    fn clean_run_passes() {
        let r = report("running 2 tests\r\ntest a::b ... ok\r\ntest a::c ... ok\r\n2 passed, 0 failed\r\n");
        assert_eq!(r.passed, ["a::b", "a::c"]);
        assert!(r.all_passed());
    }

    #[test]
    fn failed_test_fails_run() {
        let r = report(
            "running 3 tests\ntest a::b ... ok\ntest a::c ... FAILED\n    panicked at x.rs:9: boom\n\
             not run (1): a::d\n1 passed, 1 failed\n",
        );
        assert!(!r.all_passed());
        assert_eq!(r.failed, [("a::c".to_string(), vec!["panicked at x.rs:9: boom".to_string()])]);
        assert_eq!(r.not_run, ["a::d"]);
    }

    #[test]
    fn open_line_names_running_test() {
        let r = report("running 2 tests\ntest a::b ... ok\ntest a::hang ... ");
        assert_eq!(r.running.as_deref(), Some("a::hang"));
        assert!(!r.all_passed(), "no summary: not a pass");
    }

    #[test]
    fn log_line_breaking_an_open_line_is_tolerated() {
        let r = report(
            "running 1 test\ntest a::b ... \n[    0.1] cpu3 INFO  hello\ntest a::b ... ok\n1 passed, 0 failed\n",
        );
        assert!(r.all_passed());
        assert_eq!(r.running, None);
    }

    #[test]
    fn summary_without_matching_ok_lines_is_not_a_pass() {
        // A kernel that claims success without having run what it planned.
        let r = report("running 2 tests\ntest a::b ... ok\n2 passed, 0 failed\n");
        assert!(!r.all_passed());
    }

    #[test]
    fn open_line_is_a_started_test() {
        assert_eq!(open_test("test a::hang ... "), Some("a::hang"));
        assert_eq!(open_test("test a::b ... ok"), None);
        assert_eq!(open_test("test a::b"), None, "name still arriving");
        assert_eq!(open_test("[    0.1] cpu0 INFO  x"), None);
    }

    #[test]
    fn panic_outside_tests_is_a_crash() {
        let r = report("running 0 tests\nKERNEL PANIC on CPU 1: oh no\n0 passed, 0 failed\n");
        assert!(r.crashed && !r.all_passed());
    }
}
