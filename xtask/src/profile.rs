//! `cargo xtask profile`: where the CPUs spend a workload's time, as folded
//! stacks, an SVG flame graph and a short text summary.
//!
//! One QEMU boot of the benchmark's kernel mode (`mode=bench`, the machine
//! `cargo xtask bench` boots, see bench.rs) with `profile=HZ` added: the
//! kernel's sampling profiler (kernel/src/diag/profile.rs) samples every CPU
//! on its local-APIC timer during the timed windows and writes the samples
//! to the serial console after the result line, one line per distinct
//! stack. Here they are read back from the saved serial log, symbolized with
//! the kernel ELF (kernel addresses) and the user programs' ELF (user
//! addresses) through their DWARF, inlined frames included, and written to
//! `target/profile/<name>.folded` (Brendan Gregg's folded format: root
//! first, `;` between frames, the count last), `<name>.svg` (inferno's flame
//! graph) and `<name>.txt` (the summary also printed: samples per CPU, the
//! share of samples spinning per lock class, the top functions by self
//! time).
//!
//! A sample taken while the CPU waited for a contended `mm` lock ends in a
//! frame `[spinning on CLASS]` above the wait loop, so the graph shows each
//! lock's wait where it happens.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::bench::{self, Run, Windows};
use crate::kernel::{BuildConfig, Firmware};
use crate::qemu::{self, Accel};
use crate::symbols::Symbolizer;
use crate::{build_kernel, setup, workspace_root};

/// Lowest kernel address: addresses at or above it are symbolized with the
/// kernel ELF, the others with the user programs'.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

#[derive(Args)]
pub struct ProfileArgs {
    /// Workload, as `cargo xtask bench` runs it: disjoint (each thread maps,
    /// touches and unmaps its own region), same-table, same-page, madvise,
    /// madvise-same-table, fork (the timed part: the copy-on-write faults
    /// after a fork).
    #[arg(long, default_value = "disjoint")]
    workload: String,
    /// vCPUs, one pinned ring-3 thread on each.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Samples per second on each CPU (the local-APIC timer; the scheduler
    /// tick stays at 100 Hz).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(100..=20000))]
    rate: u32,
    /// `SPLIT_PTLOCK_CPUS`: a value above NR_CPUS (64), such as 1000000,
    /// profiles the single `mm.page_table_lock` kernel.
    #[arg(long, value_name = "N")]
    split_ptlock_cpus: Option<u32>,
    /// Profile the debug kernel (opt-level 1) instead of the release one.
    #[arg(long)]
    debug: bool,
    /// How faults lock: vma (their VMA's lock) or mmap (mmap_lock shared).
    #[arg(long = "fault-lock", default_value = "vma", value_parser = bench::FAULT_LOCKS)]
    fault_lock: String,
    /// Timed windows (sampled; the warm-up window is not).
    #[arg(long, default_value_t = 3)]
    windows: u32,
    /// MiB per thread or per shared region, as for the bench.
    #[arg(long, default_value_t = 128)]
    mib: u64,
    /// Passes per window (default as for the bench: for disjoint and
    /// same-table, as many as fit in `--window-ms` (0); 4 for the madvise
    /// workloads; else 1).
    #[arg(long)]
    rounds: Option<u64>,
    /// A window ends after this many milliseconds (0: no limit).
    #[arg(long, default_value_t = 2000)]
    window_ms: u64,
    /// Functions listed in the summary's self-time table.
    #[arg(long, default_value_t = 15)]
    top: usize,
    /// Accelerator (default: KVM only with hardware virtualization, else TCG).
    #[arg(long, value_enum)]
    accel: Option<Accel>,
    /// Limit on the QEMU run in seconds, from the kernel's first line.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// An extra QEMU argument (repeatable).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
    /// Sample instructions, not time, as `bench --icount` does
    /// (single-threaded TCG, `-icount shift=0`): the timer fires every
    /// 10^9 / rate instructions, so the profile is deterministic and shows
    /// where a fault's instructions go (not its time: under TCG a locked
    /// instruction or an exception costs far more than an add). Use it on
    /// one vCPU; refuses `--accel kvm`.
    #[arg(long)]
    icount: bool,
}

/// What one profile run does (from the command line, or `cargo xtask test`).
pub(crate) struct Plan {
    pub(crate) workload: String,
    pub(crate) fault_lock: &'static str,
    pub(crate) cpus: u32,
    pub(crate) rate: u32,
    pub(crate) windows: Windows,
    pub(crate) qemu_args: Vec<String>,
    pub(crate) timeout: Duration,
    pub(crate) top: usize,
    /// Prefix of the output files' names.
    pub(crate) prefix: &'static str,
    /// Instruction-counted TCG (`bench --icount`).
    pub(crate) icount: bool,
}

/// What a profile run wrote.
pub(crate) struct Output {
    pub(crate) folded: PathBuf,
    pub(crate) svg: PathBuf,
    pub(crate) text: PathBuf,
    /// The summary (also in `text`).
    pub(crate) summary: String,
    pub(crate) samples: u64,
    /// CPUs that took samples.
    pub(crate) cpus: usize,
    /// Windows after which the guest measured a vCPU round trip: none is
    /// wanted, its ping-pong would be sampled as the storm's time.
    pub(crate) round_trips: usize,
}

pub fn run(args: ProfileArgs) -> Result<bool> {
    bench::check_workload(&args.workload)?;
    if args.workload == bench::TRAPS {
        bail!(
            "traps runs with interrupts off on every vCPU (a cross-call), so the timer-driven profiler takes no sample in it; profile a storm instead (e.g. --workload disjoint)"
        );
    }
    let rounds = args.rounds.unwrap_or(bench::default_rounds(&args.workload, false));
    bench::check_rounds(&args.workload, rounds, args.window_ms)?;
    let (accel, why) = qemu::choose_accel_icount(args.icount, args.accel)?;
    let fault_lock = bench::FAULT_LOCKS.into_iter().find(|f| *f == args.fault_lock).expect("checked by clap");
    let config = BuildConfig { release: !args.debug, split_ptlock_cpus: args.split_ptlock_cpus, features: Vec::new() };
    let qemu_bin = setup::ensure_all(false)?;
    let (elf, image) = build_kernel(&config, Firmware::Bios)?;
    println!("xtask: accelerator {accel}: {why}");
    let plan = Plan {
        windows: Windows { windows: args.windows.max(1), mib: args.mib, rounds, window_ms: args.window_ms },
        workload: args.workload,
        fault_lock,
        cpus: args.cpus,
        rate: args.rate,
        qemu_args: args.qemu_args,
        timeout: Duration::from_secs(args.timeout),
        top: args.top,
        prefix: "",
        icount: args.icount,
    };
    let out = profile(&plan, &qemu_bin, &elf, &image, accel)?;
    print!("\n{}", out.summary);
    println!(
        "\nxtask: wrote {}\nxtask:       {}\nxtask:       {}",
        out.svg.display(),
        out.folded.display(),
        out.text.display()
    );
    Ok(true)
}

/// Boots `image` with the profiler on, symbolizes what it recorded with
/// `elf` (and the user programs' ELF) and writes the folded stacks, the
/// flame graph and the summary.
pub(crate) fn profile(plan: &Plan, qemu_bin: &Path, elf: &Path, image: &Path, accel: Accel) -> Result<Output> {
    // The user programs as the kernel embeds them, copied beside this
    // process's kernel before anything can rebuild them.
    let user_elf = elf.with_file_name("user");
    std::fs::copy(workspace_root().join("target/user/x86_64-unknown-none/release/user"), &user_elf)
        .context("copying the user programs' ELF")?;
    let mut run = Run {
        workload: plan.workload.clone(),
        lock: "split",
        fault_lock: plan.fault_lock,
        cpus: plan.cpus,
        pair: None,
    };
    let mut machine = bench::machine(&run, &plan.windows, image.to_path_buf(), accel, &plan.qemu_args);
    machine.icount = plan.icount;
    machine.cmdline.push_str(&format!(" profile={}", plan.rate));
    let name = format!("{}profile-{}-{}cpu", plan.prefix, plan.workload, plan.cpus);
    let kernel_symbols = Symbolizer::new(elf);
    println!(
        "xtask: profiling `{}` on {} vCPUs at {} Hz ({} windows of {} MiB, {}) ...",
        plan.workload,
        plan.cpus,
        plan.rate,
        plan.windows.windows,
        plan.windows.mib,
        plan.windows.passes()
    );
    let out = qemu::run(qemu_bin, &machine, &name, machine.limits(plan.timeout), kernel_symbols.as_ref(), false)?;
    if !out.kernel_succeeded() {
        bail!("{} (serial log: {})", out.describe(&name), out.log.display());
    }
    let log = std::fs::read_to_string(&out.log)?;
    let recording = parse(&log).with_context(|| format!("reading the samples in {}", out.log.display()))?;
    let result = bench::find_result(&out.log)?;
    if result["split_pte_ptlocks"].as_bool() == Some(false) {
        run.lock = "single";
    }
    let throughput = match bench::summarize(&run, &result) {
        Ok(r) => format!(
            "{:.0} faults/s (median window), {:.0} cycles/fault mean",
            r["faults_per_sec"].as_f64().unwrap_or(0.0),
            r["cycles_per_fault_mean"].as_f64().unwrap_or(0.0)
        ),
        Err(e) => format!("the bench's checks of this run failed: {e:#}"),
    };
    let symbols = Symbols { kernel: kernel_symbols, user: Symbolizer::new(&user_elf) };
    let folded = fold(&recording, &symbols);
    if folded.summary.total == 0 {
        bail!("the kernel took no samples (serial log: {})", out.log.display());
    }
    let header = format!(
        "profile: `{}` on {} vCPUs, {} page-table locks, faults under {} lock, {} kernel, {accel}{}; {} Hz from the local-APIC timer (no PMU under TCG: perfmon {}); {throughput} with the profiler on",
        plan.workload,
        plan.cpus,
        run.lock,
        if plan.fault_lock == "vma" { "their VMA's" } else { "mmap_lock" },
        // The private copy's directory is named after the build (`release`,
        // `debug-ptl1000000`, ...; `kernel::private_copy`).
        if elf.parent().and_then(Path::file_name).and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("release")) {
            "release"
        } else {
            "debug"
        },
        if plan.icount { " counting instructions (-icount shift=0: samples are instructions, not time)" } else { "" },
        recording.rate,
        recording.perfmon,
    );
    let summary = format!("{header}\n{}", folded.summary.render(plan.top));
    let dir = workspace_root().join("target/profile");
    std::fs::create_dir_all(&dir)?;
    let stem = format!("{}{}-{}-{}cpu", plan.prefix, plan.workload, run.lock, plan.cpus);
    let (folded_path, svg_path, text_path) =
        (dir.join(format!("{stem}.folded")), dir.join(format!("{stem}.svg")), dir.join(format!("{stem}.txt")));
    std::fs::write(&folded_path, folded.text())?;
    std::fs::write(&text_path, &summary)?;
    let title = format!("ptlk: {} on {} vCPUs, {} locks", plan.workload, plan.cpus, run.lock);
    let subtitle = format!(
        "{} samples at {} Hz per CPU; [spinning on X]: waiting for a contended lock of class X",
        folded.summary.total, recording.rate
    );
    let mut file = std::fs::File::create(&svg_path)?;
    write_svg(&folded.lines(), &title, &subtitle, &mut file)?;
    file.flush()?;
    Ok(Output {
        folded: folded_path,
        svg: svg_path,
        text: text_path,
        summary,
        samples: folded.summary.total,
        cpus: folded.summary.per_cpu.len(),
        round_trips: result["windows"]
            .as_array()
            .map_or(0, |ws| ws.iter().filter(|w| !w["round_trip_ns"].is_null()).count()),
    })
}

/// `cargo xtask test`'s profile step: a short `disjoint` storm on two vCPUs
/// with the kernel the test run built; the flame graph must name
/// `handle_mm_fault`, both CPUs must have sampled, and the guest must have
/// measured no vCPU round trip while sampling.
pub(crate) fn test_step(qemu_bin: &Path, elf: &Path, image: &Path, accel: Accel) -> Result<(bool, String)> {
    let plan = Plan {
        workload: "disjoint".into(),
        fault_lock: "vma",
        cpus: 2,
        rate: 1000,
        windows: Windows { windows: 2, mib: 16, rounds: 2, window_ms: 2000 },
        qemu_args: Vec::new(),
        timeout: Duration::from_secs(300),
        top: 10,
        prefix: "xtask-test-",
        icount: false,
    };
    let out = profile(&plan, qemu_bin, elf, image, accel)?;
    let svg = std::fs::read_to_string(&out.svg)?;
    let named = svg.contains("handle_mm_fault");
    let fault_path = fault_path_share(&std::fs::read_to_string(&out.folded)?);
    // The storm spends most of its time in the fault path: a share this low
    // means the walk lost the frames between user space and the handler.
    let ok = named && fault_path >= 0.1 && out.cpus == 2 && out.round_trips == 0;
    Ok((
        ok,
        format!(
            "{} samples on {} CPUs; flame graph {} handle_mm_fault; {:.0}% of the samples in it under a user fault (user frames, trap_common, handle_mm_fault: at least 10% wanted); {} vCPU round trips measured while sampling (none wanted): {}",
            out.samples,
            out.cpus,
            if named { "names" } else { "does NOT name" },
            100.0 * fault_path,
            out.round_trips,
            out.svg.display()
        ),
    ))
}

/// The share of the samples in folded `stacks` that show the whole fault
/// path: a user frame, then `trap_common` (the trap entry), then
/// `handle_mm_fault`, in that order from the root.
fn fault_path_share(stacks: &str) -> f64 {
    let (mut total, mut path) = (0u64, 0u64);
    for line in stacks.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else { continue };
        let n: u64 = count.parse().unwrap_or(0);
        total += n;
        let frames: Vec<&str> = stack.split(';').collect();
        let user = frames.iter().position(|f| f.starts_with("user::"));
        let entry = frames.iter().position(|&f| f == "trap_common");
        let handler = frames.iter().position(|f| f.ends_with("::handle_mm_fault"));
        if let (Some(u), Some(e), Some(h)) = (user, entry, handler)
            && u < e
            && e < h
        {
            path += n;
        }
    }
    path as f64 / total.max(1) as f64
}

/// One `PROFILE-S` line: samples of one CPU with one stack and lock class.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stack {
    cpu: usize,
    /// The lock class the CPU was spinning on.
    class: Option<String>,
    count: u64,
    /// Bit `i`: `addrs[i]` is an instruction address, not a return address.
    exact: u32,
    /// Innermost first.
    addrs: Vec<u64>,
}

/// One `PROFILE-CPU` line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CpuLine {
    cpu: usize,
    samples: u64,
    dropped: u64,
    /// TSC cycles taking the samples cost.
    cycles: u64,
}

/// What the kernel dumped.
#[derive(Debug)]
struct Recording {
    rate: u32,
    perfmon: String,
    /// TSC rate (0: unknown).
    tsc_mhz: u64,
    cpus: Vec<CpuLine>,
    stacks: Vec<Stack>,
}

/// `key=value` of a `PROFILE-` line.
fn field<'a>(words: &[&'a str], key: &str) -> Result<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .with_context(|| format!("no `{key}=` in {:?}", words.join(" ")))
}

/// Reads the kernel's dump (kernel/src/diag/profile.rs) from a serial log.
fn parse(log: &str) -> Result<Recording> {
    let mut rec: Option<Recording> = None;
    let mut end: Option<(usize, u64)> = None;
    for line in log.lines() {
        let Some(at) = line.find("PROFILE-") else { continue };
        let words: Vec<&str> = line[at..].split_whitespace().collect();
        match words[0] {
            "PROFILE-BEGIN" => {
                rec = Some(Recording {
                    rate: field(&words, "rate")?.parse()?,
                    perfmon: field(&words, "perfmon")?.to_string(),
                    tsc_mhz: field(&words, "tsc_mhz").map_or(Ok(0), str::parse)?,
                    cpus: Vec::new(),
                    stacks: Vec::new(),
                })
            }
            "PROFILE-CPU" => {
                let r = rec.as_mut().context("PROFILE-CPU before PROFILE-BEGIN")?;
                r.cpus.push(CpuLine {
                    cpu: words.get(1).context("no CPU")?.parse()?,
                    samples: field(&words, "samples")?.parse()?,
                    dropped: field(&words, "dropped")?.parse()?,
                    cycles: field(&words, "cycles").map_or(Ok(0), str::parse)?,
                });
            }
            "PROFILE-S" => {
                let r = rec.as_mut().context("PROFILE-S before PROFILE-BEGIN")?;
                let [_, cpu, class, count, exact, addrs] = words[..] else {
                    bail!("malformed stack line: {line:?}");
                };
                r.stacks.push(Stack {
                    cpu: cpu.parse()?,
                    class: (class != "-").then(|| class.to_string()),
                    count: count.parse()?,
                    exact: u32::from_str_radix(exact, 16)?,
                    addrs: addrs.split(',').map(|a| u64::from_str_radix(a, 16)).collect::<Result<_, _>>()?,
                });
            }
            "PROFILE-END" => end = Some((field(&words, "stacks")?.parse()?, field(&words, "samples")?.parse()?)),
            _ => {}
        }
    }
    let rec = rec.context("no PROFILE-BEGIN line: the kernel did not dump samples")?;
    let (stacks, samples) = end.context("no PROFILE-END line: the dump is incomplete")?;
    let total: u64 = rec.stacks.iter().map(|s| s.count).sum();
    if stacks != rec.stacks.len() || samples != total {
        bail!("the dump says {stacks} stacks / {samples} samples, but {} / {total} arrived", rec.stacks.len());
    }
    for c in &rec.cpus {
        let got: u64 = rec.stacks.iter().filter(|s| s.cpu == c.cpu).map(|s| s.count).sum();
        if got != c.samples {
            bail!("CPU {} took {} samples, but {got} arrived", c.cpu, c.samples);
        }
    }
    Ok(rec)
}

/// Address to function names, innermost (inlined) first.
trait Resolve {
    fn functions(&self, addr: u64) -> Vec<String>;
}

/// The kernel's and the user programs' symbols.
struct Symbols {
    kernel: Option<Symbolizer>,
    user: Option<Symbolizer>,
}

impl Resolve for Symbols {
    fn functions(&self, addr: u64) -> Vec<String> {
        let s = if addr >= KERNEL_START { &self.kernel } else { &self.user };
        s.as_ref().map(|s| s.functions(addr)).unwrap_or_default()
    }
}

/// The function names at `probe`, innermost first, never empty, and safe
/// for the folded format (`;` separates frames there).
fn names_at(r: &dyn Resolve, probe: u64) -> Vec<String> {
    let mut names: Vec<String> = r.functions(probe).into_iter().map(|n| n.replace(';', ",")).collect();
    if names.is_empty() {
        names.push(format!("[{} {probe:#x}]", if probe >= KERNEL_START { "kernel" } else { "user" }));
    }
    names
}

/// One CPU's share of the samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct CpuSummary {
    cpu: usize,
    samples: u64,
    dropped: u64,
    /// Samples that interrupted ring 3.
    user: u64,
    /// Samples taken while spinning on a lock.
    spinning: u64,
}

/// The numbers of the text summary.
#[derive(Debug, Default)]
struct Summary {
    total: u64,
    /// The profiler's own cost: mean TSC cycles per sample, and that as a
    /// share of each CPU's time at the sampling rate (`None`: unknown).
    cost: Option<(u64, f64)>,
    per_cpu: Vec<CpuSummary>,
    /// Samples per function at the sampled RIP (the function compiled as
    /// such, which inlined functions are part of), most first, with the
    /// innermost inlined function seen there most often, if any.
    self_time: Vec<(String, u64, Option<String>)>,
    /// Samples per lock class spun on, most first.
    classes: Vec<(String, u64)>,
}

fn pct(n: u64, total: u64) -> f64 {
    100.0 * n as f64 / total.max(1) as f64
}

impl Summary {
    fn render(&self, top: usize) -> String {
        let mut s = format!("{} samples", self.total);
        if let Some((cycles, share)) = self.cost {
            s += &format!("; taking one cost {cycles} TSC cycles on average, {share:.2}% of each CPU's time");
        }
        s += "\n\nsamples per CPU:\n";
        for c in &self.per_cpu {
            s += &format!(
                "  cpu{:<3} {:>7}  ({:.1}% in user mode, {:.1}% spinning on a lock{})\n",
                c.cpu,
                c.samples,
                pct(c.user, c.samples),
                pct(c.spinning, c.samples),
                if c.dropped > 0 {
                    format!("; {} DROPPED: buffer full, lower --rate", c.dropped)
                } else {
                    String::new()
                }
            );
        }
        s += "\nspinning on a lock, share of all samples, by lock class:\n";
        if self.classes.is_empty() {
            s += "  none (no sample was taken while a CPU waited for an mm lock)\n";
        }
        for (class, n) in &self.classes {
            s += &format!("  {class:<16} {:>6.2}%  ({n} samples)\n", pct(*n, self.total));
        }
        s += "\ntop functions by self time (the function at the sampled instruction; in brackets the inlined\nfunction most of its samples were in):\n";
        for (name, n, inlined) in self.self_time.iter().take(top) {
            let inlined = inlined.as_ref().map(|i| format!("  [{i}]")).unwrap_or_default();
            s += &format!("  {:>6.2}%  {n:>7}  {name}{inlined}\n", pct(*n, self.total));
        }
        s
    }
}

/// Folded stacks, merged over CPUs, and the summary.
struct Folded {
    stacks: BTreeMap<String, u64>,
    summary: Summary,
}

impl Folded {
    /// `frame;frame;... count` lines, sorted.
    fn lines(&self) -> Vec<String> {
        self.stacks.iter().map(|(k, n)| format!("{k} {n}")).collect()
    }

    fn text(&self) -> String {
        self.lines().iter().map(|l| format!("{l}\n")).collect()
    }
}

/// Symbolizes every stack: root first, each address's inlined frames
/// expanded (outermost first), return addresses looked up at `addr - 1`
/// (the call), `[spinning on CLASS]` on top of a lock wait.
fn fold(rec: &Recording, r: &dyn Resolve) -> Folded {
    let mut cache: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    // Per function at the RIP: samples, and samples per innermost inlined one.
    let mut self_time: HashMap<String, (u64, HashMap<String, u64>)> = HashMap::new();
    let mut classes: HashMap<String, u64> = HashMap::new();
    let mut per_cpu: BTreeMap<usize, CpuSummary> = BTreeMap::new();
    for c in &rec.cpus {
        per_cpu.insert(c.cpu, CpuSummary { cpu: c.cpu, dropped: c.dropped, ..Default::default() });
    }
    let mut total = 0;
    for st in &rec.stacks {
        let mut frames: Vec<String> = Vec::new();
        for (i, &addr) in st.addrs.iter().enumerate().rev() {
            let probe = if st.exact >> i & 1 == 1 { addr } else { addr.wrapping_sub(1) };
            let names = cache.entry(probe).or_insert_with(|| names_at(r, probe));
            frames.extend(names.iter().rev().cloned());
            if i == 0 {
                let (n, inner) = self_time.entry(names.last().expect("never empty").clone()).or_default();
                *n += st.count;
                if names.len() > 1 {
                    *inner.entry(names[0].clone()).or_default() += st.count;
                }
            }
        }
        if let Some(class) = &st.class {
            frames.push(format!("[spinning on {class}]"));
            *classes.entry(class.clone()).or_default() += st.count;
        }
        *stacks.entry(frames.join(";")).or_default() += st.count;
        let c = per_cpu.entry(st.cpu).or_insert_with(|| CpuSummary { cpu: st.cpu, ..Default::default() });
        c.samples += st.count;
        if st.addrs.first().is_some_and(|&a| a < KERNEL_START) {
            c.user += st.count;
        }
        if st.class.is_some() {
            c.spinning += st.count;
        }
        total += st.count;
    }
    let most_first = |m: HashMap<String, u64>| {
        let mut v: Vec<(String, u64)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    };
    let mut self_time: Vec<(String, u64, Option<String>)> = self_time
        .into_iter()
        .map(|(f, (n, inner))| (f, n, most_first(inner).into_iter().next().map(|(i, _)| i)))
        .collect();
    self_time.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let cost_cycles: u64 = rec.cpus.iter().map(|c| c.cycles).sum();
    let cost = (cost_cycles > 0 && total > 0 && rec.tsc_mhz > 0).then(|| {
        let mean = cost_cycles / total;
        (mean, 100.0 * mean as f64 * f64::from(rec.rate) / (rec.tsc_mhz as f64 * 1e6))
    });
    Folded {
        stacks,
        summary: Summary {
            total,
            cost,
            per_cpu: per_cpu.into_values().collect(),
            self_time,
            classes: most_first(classes),
        },
    }
}

/// Draws the flame graph of folded `lines` with inferno.
fn write_svg(lines: &[String], title: &str, subtitle: &str, out: impl std::io::Write) -> Result<()> {
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.subtitle = Some(subtitle.to_string());
    opts.count_name = "samples".into();
    // Similar names get similar colours, and one name the same colour in
    // every graph.
    opts.hash = true;
    opts.image_width = Some(1400);
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out).context("drawing the flame graph")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A serial log as the kernel writes it: log lines around the dump,
    /// two CPUs, a user-mode sample, a spinning sample, and a stack seen on
    /// both CPUs.
    const LOG: &str = "\
[    1.0] cpu0 INFO  bench: window 1/1: 100 faults in 10 us
BENCH-RESULT {}
PROFILE-BEGIN rate=1000 cpus=2 clock=apic-timer perfmon=0/0/no tsc_mhz=2000
PROFILE-CPU 0 samples=6 dropped=0 cycles=60000
PROFILE-S 0 - 3 5 ffffffff80001010,ffffffff80002000,400100,400210
PROFILE-S 0 pte_lock 2 1 ffffffff80003004,ffffffff80002008
PROFILE-S 0 - 1 1 400104,400210
PROFILE-CPU 1 samples=4 dropped=2 cycles=40000
PROFILE-S 1 - 4 5 ffffffff80001010,ffffffff80002000,400100,400210
PROFILE-END stacks=4 samples=10
[    1.1] cpu0 INFO  powering off (success)
";

    /// Symbols of a made-up program: `fault` at 0x...1000 (with `zero`
    /// inlined at 0x...1010), `handle_mm_fault` at 0x...2000, `lock` at
    /// 0x...3000; user `touch` at 0x400100 and `main` at 0x400200.
    struct Fake;

    impl Resolve for Fake {
        fn functions(&self, addr: u64) -> Vec<String> {
            let v = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
            match addr {
                0xffff_ffff_8000_1010..=0xffff_ffff_8000_101f => v(&["mm::zero", "mm::fault"]),
                0xffff_ffff_8000_1000..=0xffff_ffff_8000_1fff => v(&["mm::fault"]),
                0xffff_ffff_8000_2000..=0xffff_ffff_8000_2fff => v(&["mm::memory::handle_mm_fault"]),
                0xffff_ffff_8000_3000..=0xffff_ffff_8000_3fff => v(&["<mm::lock::RawSpinLock>::lock"]),
                0x40_0100..=0x40_01ff => v(&["user::touch"]),
                0x40_0200..=0x40_02ff => v(&["user::main"]),
                _ => Vec::new(),
            }
        }
    }

    #[test]
    fn the_dump_parses_and_is_checked() {
        let rec = parse(LOG).unwrap();
        assert_eq!((rec.rate, rec.perfmon.as_str()), (1000, "0/0/no"));
        assert_eq!(rec.cpus[1], CpuLine { cpu: 1, samples: 4, dropped: 2, cycles: 40000 });
        assert_eq!(rec.stacks.len(), 4);
        assert_eq!(
            rec.stacks[1],
            Stack {
                cpu: 0,
                class: Some("pte_lock".into()),
                count: 2,
                exact: 1,
                addrs: vec![0xffff_ffff_8000_3004, 0xffff_ffff_8000_2008]
            }
        );
        // A lost line, a missing end, a count that does not add up: errors.
        let lost = LOG.replace("PROFILE-S 0 - 1 1 400104,400210\n", "");
        assert!(parse(&lost).unwrap_err().to_string().contains("3 / 9 arrived"));
        let cut = LOG.replace("PROFILE-END stacks=4 samples=10\n", "");
        assert!(parse(&cut).unwrap_err().to_string().contains("no PROFILE-END"));
        let wrong = LOG.replace("PROFILE-CPU 0 samples=6", "PROFILE-CPU 0 samples=7");
        assert!(parse(&wrong).unwrap_err().to_string().contains("CPU 0 took 7 samples, but 6 arrived"));
        assert!(parse("no dump here\n").unwrap_err().to_string().contains("no PROFILE-BEGIN"));
    }

    #[test]
    fn stacks_fold_root_first_with_inlined_frames_and_spin_tags() {
        let folded = fold(&parse(LOG).unwrap(), &Fake);
        assert_eq!(
            folded.lines(),
            [
                "mm::memory::handle_mm_fault;<mm::lock::RawSpinLock>::lock;[spinning on pte_lock] 2",
                "user::main;user::touch 1",
                // Return address 0x400210 is looked up at 0x40020f: `main`;
                // 0xffffffff80002000 at ...1fff: `fault`, not
                // `handle_mm_fault` (bits 0 and 2 of exact 5 are the
                // interrupted and the trapped RIP). Both CPUs' samples.
                "user::main;user::touch;mm::fault;mm::fault;mm::zero 7",
            ]
        );
        let s = &folded.summary;
        assert_eq!(s.total, 10);
        assert_eq!(s.self_time[0], ("mm::fault".to_string(), 7, Some("mm::zero".to_string())));
        assert_eq!(s.self_time[1], ("<mm::lock::RawSpinLock>::lock".to_string(), 2, None));
        assert_eq!(s.classes, [("pte_lock".to_string(), 2)]);
        assert_eq!(
            s.per_cpu,
            [
                CpuSummary { cpu: 0, samples: 6, dropped: 0, user: 1, spinning: 2 },
                CpuSummary { cpu: 1, samples: 4, dropped: 2, user: 0, spinning: 0 }
            ]
        );
        // 10000 cycles a sample, 1000 samples a second at 2 GHz: 0.5%.
        assert_eq!(s.cost, Some((10000, 0.5)));
        let text = s.render(5);
        assert!(text.contains("10000 TSC cycles on average, 0.50% of each CPU's time"), "{text}");
        assert!(text.contains("pte_lock") && text.contains("20.00%"), "{text}");
        assert!(text.contains("70.00%        7  mm::fault  [mm::zero]\n"), "{text}");
        assert!(text.contains("2 DROPPED"), "{text}");
    }

    #[test]
    fn the_fault_path_is_a_user_frame_the_trap_entry_and_the_handler_in_order() {
        let stacks = "user::main;trap_common;trap_dispatch;mm::memory::handle_mm_fault;mm::zero 6\n\
                      mm::memory::handle_mm_fault;mm::zero 2\n\
                      user::main;user::touch 1\n\
                      trap_common;user::main;mm::memory::handle_mm_fault 1\n";
        assert_eq!(fault_path_share(stacks), 0.6);
        assert_eq!(fault_path_share(""), 0.0);
    }

    #[test]
    fn icount_is_refused_with_kvm_before_anything_is_built() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            profile: ProfileArgs,
        }
        let args = <Cli as clap::Parser>::try_parse_from(["profile", "--icount", "--accel", "kvm"]).unwrap().profile;
        let err = run(args).err().unwrap().to_string();
        assert!(err.contains("--icount with --accel kvm"), "{err}");
    }

    #[test]
    fn traps_are_refused_before_anything_is_built() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            profile: ProfileArgs,
        }
        let args = <Cli as clap::Parser>::try_parse_from(["profile", "--workload", "traps"]).unwrap().profile;
        let err = run(args).err().unwrap().to_string();
        assert!(err.contains("interrupts off"), "{err}");
    }

    #[test]
    fn unknown_addresses_keep_their_place() {
        let log = "PROFILE-BEGIN rate=100 cpus=1 perfmon=0/0/no\nPROFILE-CPU 0 samples=1 dropped=0\n\
                   PROFILE-S 0 - 1 1 ffffffff90000000,400210\nPROFILE-END stacks=1 samples=1\n";
        let folded = fold(&parse(log).unwrap(), &Fake);
        assert_eq!(folded.lines(), ["user::main;[kernel 0xffffffff90000000] 1"]);
    }

    #[test]
    fn the_flame_graph_is_xml_naming_the_functions() {
        let folded = fold(&parse(LOG).unwrap(), &Fake);
        let mut svg = Vec::new();
        write_svg(&folded.lines(), "test graph", "10 samples", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        // Well-formed XML: read every event to the end, collecting the
        // frames' <title> texts (inferno: "name (N samples, P%)").
        let mut reader = quick_xml::Reader::from_str(&svg);
        let (mut titles, mut in_title, mut elements) = (Vec::new(), false, 0);
        loop {
            match reader.read_event().expect("the SVG is well-formed XML") {
                quick_xml::events::Event::Start(e) => {
                    elements += 1;
                    in_title = e.name().as_ref() == b"title";
                }
                quick_xml::events::Event::Text(t) if in_title => {
                    titles.push(t.decode().unwrap().into_owned());
                }
                quick_xml::events::Event::End(_) => in_title = false,
                quick_xml::events::Event::Eof => break,
                _ => {}
            }
        }
        assert!(elements > 10, "{elements} elements");
        for f in ["user::main", "user::touch", "mm::zero", "mm::fault", "[spinning on pte_lock]"] {
            assert!(titles.iter().any(|t| t.starts_with(&format!("{f} ("))), "no frame titled {f}: {titles:?}");
        }
        let main = titles.iter().find(|t| t.starts_with("user::main (")).unwrap();
        assert!(main.contains("8 samples"), "{main}");
        assert!(svg.contains("test graph"));
    }
}
