//! `cargo xtask test`: host tests, then in-kernel tests in QEMU, then the
//! runner's own failure paths (a deliberately failing, oopsing and hanging
//! test must each make the run fail, with the right diagnosis).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::clock::{Expiry, Limits};
use crate::kernel::{BuildConfig, Firmware};
use crate::qemu::{self, Ending, Machine, Outcome};
use crate::symbols::Symbolizer;
use crate::{KernelArgs, MachineArgs, build_kernel, setup, workspace_root};

#[derive(Args)]
pub struct TestArgs {
    /// Run only tests whose names contain FILTER (host and kernel tests).
    /// `profile` and `linux` name whole steps instead: the short `cargo
    /// xtask profile` run, or the short `cargo xtask bench --guest linux`
    /// run, alone.
    filter: Option<String>,
    #[command(flatten)]
    kernel: KernelArgs,
    /// `--smp` is the main kernel test run's; `--mem` is every run's.
    #[command(flatten)]
    machine: MachineArgs,
    /// Skip the lint step (rustfmt --check, clippy and rustdoc with warnings
    /// as errors), which otherwise runs first.
    #[arg(long)]
    skip_lint: bool,
    /// Skip the host (`cargo test`) part.
    #[arg(long)]
    skip_host: bool,
    /// Skip the in-kernel (QEMU) part.
    #[arg(long)]
    skip_kernel: bool,
    /// Skip the runner self-tests and the extra boots (UEFI, other -smp,
    /// debug lock, gdb).
    #[arg(long)]
    quick: bool,
    /// Skip the gdb batch test (otherwise a missing gdb is a failure).
    #[arg(long)]
    skip_gdb: bool,
}

/// What a kernel run must show to count as passed.
#[derive(Clone, Debug)]
enum Expect {
    /// All selected tests pass and the kernel exits with success.
    Pass,
    /// The named test FAILS (with `detail` in its message) and the run fails.
    Fail { test: &'static str, detail: &'static str },
    /// The kernel oopses inside the named test; the backtrace is symbolized.
    Oops { test: &'static str },
    /// The run hangs in the named test and the timeout names it.
    Timeout { test: &'static str },
    /// A kernel stack overflows into its guard page inside the named test:
    /// a double fault whose oops names the overflow.
    StackOverflow { test: &'static str },
    /// CPUs deadlock inside the named test: the lockup watchdog stops every
    /// CPU and each names the lock it waits for and that lock's holder with
    /// the site that took it; the backtraces are symbolized.
    Lockup { test: &'static str, cpus: usize },
    /// A soak (`mode=soak`) that ends with its result line saying ok.
    Soak,
}

struct KernelRun {
    name: String,
    /// Extra kernel cargo features (a separate build).
    features: Vec<String>,
    /// `SPLIT_PTLOCK_CPUS` of this run's kernel (a separate build when it
    /// differs from the main run's).
    split_ptlock_cpus: Option<u32>,
    firmware: Firmware,
    smp: u32,
    cmdline: String,
    /// The run limit, from the kernel's first line.
    timeout: Duration,
    /// A limit per test, from the test's start.
    test_timeout: Option<Duration>,
    expect: Expect,
}

impl KernelRun {
    /// The kernel command line's `filter=` value.
    fn filter(&self) -> Option<&str> {
        self.cmdline.split_whitespace().find_map(|w| w.strip_prefix("filter="))
    }
}

struct StepResult {
    name: String,
    ok: bool,
    detail: String,
    elapsed: Duration,
}

/// Runs `cmd` as one step of the summary.
fn command_step(name: &str, mut cmd: Command) -> Result<StepResult> {
    let start = Instant::now();
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    println!("xtask: [{name}] cargo {}", args.join(" "));
    let status = cmd.status().with_context(|| format!("running cargo {}", args.join(" ")))?;
    Ok(StepResult {
        name: name.to_string(),
        ok: status.success(),
        detail: if status.success() { "passed".into() } else { format!("FAILED ({status})") },
        elapsed: start.elapsed(),
    })
}

fn host_step(name: &str, args: &[&str], envs: &[(&str, String)], filter: Option<&str>) -> Result<StepResult> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root()).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    command_step(name, cmd)
}

fn host_tests(args: &TestArgs) -> Result<Vec<StepResult>> {
    let filter = args.filter.as_deref();
    let mut env = Vec::new();
    if let Some(n) = args.kernel.split_ptlock_cpus {
        env.push(("SPLIT_PTLOCK_CPUS", n.to_string()));
    }
    let mut results = vec![host_step(
        "host: xtask + boot + abi",
        &["test", "-p", "xtask", "-p", "boot", "-p", "ktest", "-p", "abi"],
        &env,
        filter,
    )?];
    results.push(host_step("host: mm", &["test", "-p", "mm"], &env, filter)?);
    results.push(host_step(
        "host: mm, debug-ptlock (allocated ptl)",
        &["test", "-p", "mm", "--features", "debug-ptlock"],
        &env,
        filter,
    )?);
    if args.kernel.split_ptlock_cpus.is_none() {
        // The single-lock build in its own target dir: the setting is a
        // build-script input, and sharing a dir would rebuild mm each time.
        let single = [("SPLIT_PTLOCK_CPUS", "1000000".to_string())];
        results.push(host_step(
            "host: mm, single page_table_lock",
            &["test", "-p", "mm", "--target-dir", "target/host-single"],
            &single,
            filter,
        )?);
    }
    let loom_filter = filter.map_or("loom".to_string(), |f| f.to_string());
    let mut loom_env = env.clone();
    loom_env.push(("RUSTFLAGS", "--cfg loom".to_string()));
    results.push(host_step(
        "host: mm, loom models of the lock protocol",
        &["test", "-p", "mm", "--release", "--target-dir", "target/loom"],
        &loom_env,
        Some(&loom_filter),
    )?);
    Ok(results)
}

fn judge(run: &KernelRun, o: &Outcome) -> (bool, String) {
    let r = &o.report;
    match &run.expect {
        Expect::Pass => {
            // A filter that selects nothing would otherwise pass silently.
            let none_selected = r.planned == Some(0);
            let ok = o.kernel_succeeded() && r.all_passed() && !none_selected;
            let detail = match (ok, r.summary) {
                (true, Some((p, _))) => format!("{p} passed"),
                _ if none_selected => format!(
                    "the kernel selected no test: filter `{}` matches no kernel test (use --skip-kernel for host tests only)",
                    run.filter().unwrap_or("")
                ),
                _ => {
                    let mut d = o.describe(&run.name);
                    for (t, why) in &r.failed {
                        d.push_str(&format!("\n      FAILED {t}: {}", why.join(" / ")));
                    }
                    if !r.not_run.is_empty() {
                        d.push_str(&format!("\n      not run: {}", r.not_run.join(", ")));
                    }
                    d
                }
            };
            (ok, detail)
        }
        Expect::Fail { test, detail } => {
            let failed = r.failed.iter().any(|(t, why)| t.ends_with(test) && why.iter().any(|w| w.contains(detail)));
            let ok = failed && o.ending == Ending::Exit(qemu::STATUS_FAILURE) && !r.all_passed();
            (ok, format!("expected `{test}` to FAIL: {}", if ok { "it did, and the run failed" } else { "it did NOT" }))
        }
        Expect::Oops { test } => {
            let log = std::fs::read_to_string(&o.log).unwrap_or_default();
            let symbolized = log.contains("selftest::deliberate_oops at ");
            let failed = r.failed.iter().any(|(t, _)| t.ends_with(test));
            let ok = r.crashed && failed && symbolized && o.ending == Ending::Exit(qemu::STATUS_FAILURE);
            (
                ok,
                format!(
                    "expected an oops in `{test}` with a symbolized backtrace: oops {}, FAILED {}, symbolized {}",
                    r.crashed, failed, symbolized
                ),
            )
        }
        Expect::StackOverflow { test } => {
            let log = std::fs::read_to_string(&o.log).unwrap_or_default();
            let double_fault = log.contains("#DF double fault");
            let named = log.contains("kernel stack overflow");
            let failed = r.failed.iter().any(|(t, _)| t.ends_with(test));
            let ok = r.crashed && failed && double_fault && named && o.ending == Ending::Exit(qemu::STATUS_FAILURE);
            (
                ok,
                format!(
                    "expected a double fault naming a kernel stack overflow in `{test}`: oops {}, double fault {double_fault}, overflow named {named}, FAILED {failed}",
                    r.crashed
                ),
            )
        }
        Expect::Lockup { test, cpus } => {
            let log = std::fs::read_to_string(&o.log).unwrap_or_default();
            let (detected, holders, symbolized) = lockup_report(&log, test);
            let failed = r.failed.iter().any(|(t, why)| t.ends_with(test) && why.iter().any(|w| w.contains("lockup")));
            let ok =
                detected && holders >= *cpus && symbolized && failed && o.ending == Ending::Exit(qemu::STATUS_FAILURE);
            (
                ok,
                format!(
                    "expected the watchdog to stop every CPU in `{test}` and name each one's lock and its holder: detected {detected}, {holders} of {cpus} CPUs named the holder and its site, backtrace symbolized {symbolized}, FAILED {failed}"
                ),
            )
        }
        Expect::Soak => {
            let log = std::fs::read_to_string(&o.log).unwrap_or_default();
            let res = crate::soak::result(&log);
            let ok = o.kernel_succeeded() && res.as_ref().is_some_and(|r| r["ok"] == true);
            // The short soak must have run a phase under failure injection
            // (phases draw it from the seed and their number, one in four).
            let injected = res.as_ref().is_some_and(|r| r["injected_phases"].as_u64().unwrap_or(0) > 0);
            let detail = match (&res, ok) {
                (Some(r), true) if !injected => {
                    format!(
                        "no phase ran under failure injection (pick a seed that draws one): {}",
                        crate::soak::describe(r)
                    )
                }
                (Some(r), true) => crate::soak::describe(r),
                _ => format!(
                    "soak FAILED in phase {}: {}",
                    crate::soak::last_phase(&log).map_or(String::from("?"), |p| p.to_string()),
                    crate::soak::failure(&log).map(str::to_string).unwrap_or_else(|| o.describe(&run.name))
                ),
            };
            (ok && injected, detail)
        }
        Expect::Timeout { test } => {
            let named = o.describe(&run.name).contains(test);
            let ok = matches!(o.ending, Ending::Timeout(Expiry::Run | Expiry::Test)) && named;
            (ok, format!("expected a timeout naming `{test}`: {}", o.describe(&run.name)))
        }
    }
}

/// What a watchdog report in `log` shows: whether a lockup was detected,
/// how many CPUs named the holder of the lock they wait for and the site
/// that took it, and whether a backtrace frame was symbolized to `test`.
fn lockup_report(log: &str, test: &str) -> (bool, usize, bool) {
    let detected = log.contains("WATCHDOG: lockup detected on CPU");
    let holders = log.lines().filter(|l| l.contains("that lock is held by CPU") && l.contains(".rs:")).count();
    let symbolized = log.lines().any(|l| l.contains(&format!("selftest::{test}")) && l.contains(" at "));
    (detected, holders, symbolized)
}

/// Filters that name a step of [`run`] rather than tests: with one of them,
/// that step runs alone (no host tests, no kernel test boot, which would
/// select no test and fail).
const STEP_FILTERS: [&str; 2] = ["profile", "linux"];

fn names_a_step(filter: Option<&str>) -> bool {
    filter.is_some_and(|f| STEP_FILTERS.contains(&f))
}

fn kernel_runs(args: &TestArgs) -> Vec<KernelRun> {
    if names_a_step(args.filter.as_deref()) {
        return Vec::new();
    }
    let filter = args.filter.clone().unwrap_or_default();
    let filter_word = if filter.is_empty() { String::new() } else { format!(" filter={filter}") };
    let main_timeout = Duration::from_secs(args.machine.timeout.unwrap_or(600));
    let mut runs = vec![KernelRun {
        name: format!("kernel tests, -smp {}, BIOS", args.machine.size.smp),
        features: Vec::new(),
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Bios,
        smp: args.machine.size.smp,
        cmdline: format!("mode=test expect_cpus={}{filter_word}", args.machine.size.smp),
        timeout: main_timeout,
        test_timeout: None,
        expect: Expect::Pass,
    }];
    if args.quick || !filter.is_empty() {
        return runs;
    }
    runs.push(KernelRun {
        name: "UEFI boot smoke test, -smp 2".into(),
        features: Vec::new(),
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Uefi,
        smp: 2,
        cmdline: "mode=test filter=boot_smoke".into(),
        timeout: Duration::from_secs(args.machine.timeout.unwrap_or(300)),
        test_timeout: None,
        expect: Expect::Pass,
    });
    // Short SMP runs at other CPU counts: the smallest machine, and an odd
    // one that also asks for a phantom CPU (APIC ID 77, absent) whose
    // start-up must time out without stopping the others.
    for (smp, extra) in [(1, ""), (3, " smp_phantom=77")] {
        runs.push(KernelRun {
            name: format!("SMP tests, -smp {smp}, BIOS"),
            features: Vec::new(),
            split_ptlock_cpus: args.kernel.split_ptlock_cpus,
            firmware: Firmware::Bios,
            smp,
            cmdline: format!("mode=test expect_cpus={smp} filter=smp::tests{extra}"),
            timeout: Duration::from_secs(args.machine.timeout.unwrap_or(300)),
            test_timeout: None,
            expect: Expect::Pass,
        });
    }
    // More CPUs than one page of storm reports once held (48): every CPU
    // comes up and a storm runs a thread on each of them.
    runs.push(KernelRun {
        name: "SMP and storm tests, -smp 50, BIOS".into(),
        features: Vec::new(),
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Bios,
        smp: 50,
        cmdline: "mode=test expect_cpus=50 filter=smp::tests::cpu_count,storm_disjoint_regions".into(),
        timeout: Duration::from_secs(args.machine.timeout.unwrap_or(300)),
        test_timeout: None,
        expect: Expect::Pass,
    });
    let selftest = |name: &str, test: &'static str, expect: Expect, test_secs: Option<u64>| KernelRun {
        name: format!("runner self-test: {name}"),
        features: Vec::new(),
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Bios,
        smp: 1,
        cmdline: format!("mode=test selftests filter=selftest::{test}"),
        timeout: Duration::from_secs(300),
        test_timeout: test_secs.map(Duration::from_secs),
        expect,
    };
    runs.push(selftest(
        "failing test",
        "deliberate_failure",
        Expect::Fail { test: "deliberate_failure", detail: "deliberate failure" },
        None,
    ));
    runs.push(selftest("oops in a test", "deliberate_oops", Expect::Oops { test: "deliberate_oops" }, None));
    if !args.kernel.release {
        // Page poisoning is a debug-build check.
        runs.push(selftest(
            "write after free (page poisoning)",
            "deliberate_use_after_free",
            Expect::Fail { test: "deliberate_use_after_free", detail: "was written after it was freed" },
            None,
        ));
    }
    // 15 s from the start of the test (not from QEMU's start: the BIOS
    // stage alone can take 20 s here).
    runs.push(selftest("hanging test", "deliberate_hang", Expect::Timeout { test: "deliberate_hang" }, Some(15)));
    runs.push(selftest(
        "kernel stack overflow",
        "deliberate_stack_overflow",
        Expect::StackOverflow { test: "deliberate_stack_overflow" },
        None,
    ));
    // Two CPUs deadlock on two locks taken in opposite orders: the lockup
    // watchdog (5 s) must catch it and diagnose both CPUs.
    runs.push(KernelRun {
        smp: 2,
        ..selftest(
            "ABBA deadlock (lockup watchdog)",
            "deliberate_abba_deadlock",
            Expect::Lockup { test: "deliberate_abba_deadlock", cpus: 2 },
            None,
        )
    });
    runs.push(KernelRun {
        name: "runner self-test: panic on another CPU".into(),
        features: Vec::new(),
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Bios,
        smp: 3,
        cmdline: "mode=test selftests filter=smp::tests::selftest::".into(),
        timeout: Duration::from_secs(300),
        test_timeout: None,
        expect: Expect::Fail { test: "panic_on_another_cpu", detail: "deliberate panic on CPU" },
    });
    // A short soak: storms, fuzzers, churn and failure injection at random
    // for 30 s, invariants after every phase (`cargo xtask soak` runs long
    // ones).
    runs.push(KernelRun {
        name: "soak, 30 s, -smp 4".into(),
        features: Vec::new(),
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Bios,
        smp: 4,
        cmdline: crate::soak::cmdline(30, 1, 3000),
        timeout: Duration::from_secs(args.machine.timeout.unwrap_or(300)),
        test_timeout: None,
        expect: Expect::Soak,
    });
    // The other ptl variant: the debug lock (owner CPU + site) no longer
    // fits in a word, so every PTE/PMD table's lock is allocated by its
    // constructor. The page-table and storm tests run against it (last:
    // it is a separate kernel build).
    runs.push(KernelRun {
        name: "mm and storm tests, debug-ptlock (allocated ptl), -smp 4".into(),
        features: vec!["debug-ptlock".into()],
        split_ptlock_cpus: args.kernel.split_ptlock_cpus,
        firmware: Firmware::Bios,
        smp: 4,
        cmdline: "mode=test expect_cpus=4 filter=mmtests,storm,uspace".into(),
        timeout: Duration::from_secs(args.machine.timeout.unwrap_or(600)),
        test_timeout: None,
        expect: Expect::Pass,
    });
    // The single `mm.page_table_lock` kernel (SPLIT_PTLOCK_CPUS above
    // NR_CPUS, what the benchmark compares against): every PTE and PMD
    // helper hands out the one lock, so the page-table and storm tests run
    // on that path too. Unless the main run already was that build.
    if args.kernel.split_ptlock_cpus.is_none() {
        runs.push(KernelRun {
            name: "mm and storm tests, single page_table_lock, -smp 4".into(),
            features: Vec::new(),
            split_ptlock_cpus: Some(SINGLE_LOCK_CPUS),
            firmware: Firmware::Bios,
            smp: 4,
            cmdline: "mode=test expect_cpus=4 filter=mmtests,storm".into(),
            timeout: Duration::from_secs(args.machine.timeout.unwrap_or(600)),
            test_timeout: None,
            expect: Expect::Pass,
        });
    }
    runs
}

/// `SPLIT_PTLOCK_CPUS` of the single-lock build (above `NR_CPUS`).
const SINGLE_LOCK_CPUS: u32 = 1_000_000;

/// Runs everything; returns whether all of it passed.
pub fn run(args: TestArgs) -> Result<bool> {
    let total = Instant::now();
    let mut results = Vec::new();
    if !args.skip_lint {
        setup::ensure_rust()?;
        for lint in crate::lint::lints()? {
            results.push(command_step(lint.name, lint.command)?);
        }
    }
    if !args.skip_host && !names_a_step(args.filter.as_deref()) {
        setup::ensure_rust()?;
        results.extend(host_tests(&args)?);
    }
    if !args.skip_kernel {
        let runs = kernel_runs(&args);
        let need_uefi = runs.iter().any(|r| r.firmware == Firmware::Uefi);
        let qemu_bin = setup::ensure_all(need_uefi)?;
        let mut config = BuildConfig { features: Vec::new(), ..args.kernel.config() };
        let (mut elf, mut bios) = build_kernel(&config, Firmware::Bios)?;
        // The profile step below boots this build after the others (each
        // build has its own private directory, so the paths stay valid).
        let (main_elf, main_bios) = (elf.clone(), bios.clone());
        let uefi = if need_uefi { Some(crate::kernel::image(&elf, Firmware::Uefi)?) } else { None };
        let mut symbols = Symbolizer::new(&elf);
        let (accel, why) = qemu::choose_accel(args.machine.accel);
        println!("xtask: accelerator {accel}: {why}");
        let mut gdb_done = args.quick || args.skip_gdb || args.filter.is_some();
        let main_config = config.clone();
        for run in runs {
            let run_config = BuildConfig {
                features: run.features.clone(),
                split_ptlock_cpus: run.split_ptlock_cpus,
                ..main_config.clone()
            };
            if run_config != main_config && !gdb_done {
                // Before the feature builds replace the default kernel.
                gdb_done = true;
                let started = Instant::now();
                let (ok, detail) = crate::gdb::batch_test(&elf, &bios, accel)?;
                println!("xtask: [gdb batch test] {}: {detail}", if ok { "ok" } else { "FAILED" });
                results.push(StepResult {
                    name: "gdb batch test (bt, pt-walk, ptl, page, vmas in a storm fault)".into(),
                    ok,
                    detail,
                    elapsed: started.elapsed(),
                });
            }
            if run_config != config {
                // Runs are ordered so that each configuration is built once.
                config = run_config;
                (elf, bios) = build_kernel(&config, Firmware::Bios)?;
                symbols = Symbolizer::new(&elf);
            }
            let image = match run.firmware {
                Firmware::Bios => bios.clone(),
                Firmware::Uefi => uefi.clone().expect("UEFI image built above"),
            };
            let machine = Machine {
                image,
                linux: None,
                firmware: run.firmware,
                smp: run.smp,
                mem: args.machine.size.mem.clone(),
                accel,
                icount: false,
                cmdline: run.cmdline.clone(),
                extra: Vec::new(),
                vcpu_time: None,
            };
            let log_name = format!("test-{}", run.name.replace([',', ':', ' '], "-").replace("--", "-"));
            let limits = Limits { test: run.test_timeout, ..machine.limits(run.timeout) };
            let outcome = qemu::run(&qemu_bin, &machine, &log_name, limits, symbols.as_ref(), true)?;
            let (ok, detail) = judge(&run, &outcome);
            println!(
                "xtask: [{}] {} in {:.1} s ({accel}; {}); serial log: {}",
                run.name,
                if ok { "ok" } else { "FAILED" },
                outcome.elapsed.as_secs_f64(),
                outcome.boot_time(),
                outcome.log.display()
            );
            if !ok {
                println!("xtask:     {detail}");
            }
            results.push(StepResult { name: run.name, ok, detail, elapsed: outcome.elapsed });
        }
        // `cargo xtask profile --cpus 2`, short: the flame graph of a fault
        // storm must name handle_mm_fault.
        if !args.quick && args.filter.as_deref().is_none_or(|f| f == "profile") {
            let started = Instant::now();
            let (ok, detail) = crate::profile::test_step(&qemu_bin, &main_elf, &main_bios, accel)
                .unwrap_or_else(|e| (false, format!("{e:#}")));
            println!("xtask: [profile] {}: {detail}", if ok { "ok" } else { "FAILED" });
            results.push(StepResult {
                name: "cargo xtask profile --cpus 2 (short disjoint storm)".into(),
                ok,
                detail,
                elapsed: started.elapsed(),
            });
        }
        // `cargo xtask bench --guest linux`, short: Debian's Linux runs the
        // storms and reports one fault per page.
        if !args.quick && args.filter.as_deref().is_none_or(|f| f == "linux") {
            let started = Instant::now();
            let (ok, detail) = match crate::bench::linux_test_step(&qemu_bin, accel) {
                Ok(summary) => (true, summary),
                Err(e) => (false, format!("{e:#}")),
            };
            println!("xtask: [bench --guest linux] {}: {detail}", if ok { "ok" } else { "FAILED" });
            results.push(StepResult {
                name: "cargo xtask bench --guest linux (2 vCPUs, short disjoint and same-table)".into(),
                ok,
                detail,
                elapsed: started.elapsed(),
            });
        }
    }
    println!("\nxtask: test summary ({:.0} s in all)", total.elapsed().as_secs_f64());
    for r in &results {
        println!(
            "  {:7} {:6.1} s  {}  {}",
            if r.ok { "ok" } else { "FAILED" },
            r.elapsed.as_secs_f64(),
            r.name,
            r.detail.lines().next().unwrap_or("")
        );
    }
    let all_ok = results.iter().all(|r| r.ok);
    println!("xtask: {}", if all_ok { "all tests passed" } else { "SOME TESTS FAILED" });
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::protocol::TestReport;
    use crate::qemu::Accel;

    fn run_expecting(expect: Expect, cmdline: &str) -> KernelRun {
        KernelRun {
            name: "r".into(),
            features: Vec::new(),
            split_ptlock_cpus: None,
            firmware: Firmware::Bios,
            smp: 1,
            cmdline: cmdline.into(),
            timeout: Duration::from_secs(10),
            test_timeout: None,
            expect,
        }
    }

    fn outcome(ending: Ending, serial: &str) -> Outcome {
        let mut report = TestReport::default();
        for line in serial.lines() {
            report.feed(line);
        }
        Outcome {
            ending,
            elapsed: Duration::from_secs(1),
            report,
            log: PathBuf::from("target/xtask/logs/r.log"),
            last_line: serial.lines().last().unwrap_or("").into(),
            limits: crate::clock::Limits { boot: Duration::from_secs(120), run: Duration::from_secs(10), test: None },
            first_output: Some(Duration::from_secs(1)),
            kernel_start: Some(Duration::from_secs(1)),
            vcpu_time: None,
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
        }
    }

    #[test]
    fn filter_matching_no_kernel_test_fails() {
        let run = run_expecting(Expect::Pass, "mode=test filter=nosuchtest");
        let o = outcome(Ending::Exit(qemu::STATUS_SUCCESS), "running 0 tests\n0 passed, 0 failed\n");
        let (ok, detail) = judge(&run, &o);
        assert!(!ok);
        assert!(detail.contains("`nosuchtest` matches no kernel test"), "{detail}");
        let o = outcome(Ending::Exit(qemu::STATUS_SUCCESS), "running 1 test\ntest a::b ... ok\n1 passed, 0 failed\n");
        assert!(judge(&run, &o).0);
    }

    #[test]
    fn a_filter_naming_a_step_boots_no_kernel_test_run() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            test: TestArgs,
        }
        let args = |words: &[&str]| {
            <Cli as clap::Parser>::parse_from(std::iter::once("test").chain(words.iter().copied())).test
        };
        for step in STEP_FILTERS {
            assert!(kernel_runs(&args(&[step])).is_empty(), "`{step}` booted a kernel test run");
        }
        let storm = kernel_runs(&args(&["storm"]));
        assert_eq!(storm.len(), 1);
        assert_eq!(storm[0].filter(), Some("storm"));
        assert!(kernel_runs(&args(&[])).len() > 1);
    }

    #[test]
    fn a_lockup_passes_only_with_every_cpu_diagnosed() {
        let run = run_expecting(Expect::Lockup { test: "deliberate_abba_deadlock", cpus: 2 }, "mode=test");
        let dir = std::env::temp_dir().join(format!("xtask-lockup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let judge_log = |log: &str, ending: Ending| {
            let path = dir.join("r.log");
            std::fs::write(&path, log).unwrap();
            let mut o = outcome(ending, log);
            o.log = path;
            judge(&run, &o)
        };
        let cpu = |n: usize, holder: usize| {
            format!(
                "watchdog: CPU {n}: interrupted in the kernel at rip 0x1\n  waiting for lock 0x10 (Untracked), taking it at kernel/src/test/selftest.rs:93:30\n  that lock is held by CPU {holder}, taken at kernel/src/test/selftest.rs:88:28\nbacktrace:\n  #0 0xffffffff8002ab88\n        kernel::test::selftest::deliberate_abba_deadlock at kernel/src/test/selftest.rs:99\n"
            )
        };
        let head = "running 1 test\ntest kernel::test::selftest::deliberate_abba_deadlock ... \nWATCHDOG: lockup detected on CPU 0: CPU 0 has been spinning on one lock for 5.0 s\n";
        let tail = "test kernel::test::selftest::deliberate_abba_deadlock ... FAILED\n    lockup: the watchdog stopped every CPU (see above)\n0 passed, 1 failed\n";
        let full = format!("{head}{}{}{tail}", cpu(1, 0), cpu(0, 1));
        let (ok, detail) = judge_log(&full, Ending::Exit(qemu::STATUS_FAILURE));
        assert!(ok, "{detail}");
        // One CPU's diagnosis missing, or a hang the run limit caught: not enough.
        let one = format!("{head}{}{tail}", cpu(1, 0));
        assert!(!judge_log(&one, Ending::Exit(qemu::STATUS_FAILURE)).0);
        let hang = "running 1 test\ntest kernel::test::selftest::deliberate_abba_deadlock ... ";
        assert!(!judge_log(hang, Ending::Timeout(Expiry::Run)).0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn hang_is_caught_only_by_a_run_or_test_timeout_naming_it() {
        let run = run_expecting(Expect::Timeout { test: "hang" }, "mode=test");
        let serial = "running 1 test\ntest selftest::hang ... ";
        let (ok, detail) = judge(&run, &outcome(Ending::Timeout(Expiry::Test), serial));
        assert!(ok, "{detail}");
        assert!(detail.contains("r.log"), "the message names the serial log: {detail}");
        assert!(judge(&run, &outcome(Ending::Timeout(Expiry::Run), serial)).0);
        // A boot that never reaches the kernel is not the hang we want.
        assert!(!judge(&run, &outcome(Ending::Timeout(Expiry::Silent), "")).0);
        assert!(!judge(&run, &outcome(Ending::Exit(qemu::STATUS_FAILURE), serial)).0);
    }
}
