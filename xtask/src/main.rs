//! `cargo xtask`: the one developer tool (build, run, test).
//!
//! Every subcommand installs what it needs first (rustup components, QEMU,
//! OVMF; see `setup.rs`) and says what it did.

mod bench;
mod clock;
mod gdb;
mod hostprobe;
mod kernel;
mod lint;
mod linux;
mod profile;
mod protocol;
mod qemu;
mod setup;
mod soak;
mod symbols;
mod test;
mod vcputime;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::kernel::{BuildConfig, Firmware};
use crate::qemu::{Accel, Machine};

/// Developer tool for the split-page-table-lock kernel.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the kernel and its BIOS (or UEFI) disk image.
    Build {
        #[command(flatten)]
        kernel: KernelArgs,
        /// Build the UEFI image instead of the BIOS one.
        #[arg(long)]
        uefi: bool,
    },
    /// Boot the kernel in QEMU; it prints a boot summary, runs its default
    /// workload and powers off. Exits with the kernel's status.
    Run(RunArgs),
    /// Run the host tests, then the in-kernel tests in QEMU.
    Test(test::TestArgs),
    /// Start QEMU paused with its gdb stub and attach gdb with the kernel's
    /// symbols and the page-table-aware helpers (gdb/ptlk.py).
    Gdb(gdb::GdbArgs),
    /// Measure fault-storm throughput and scaling, split vs single lock, faults
    /// under VMA locks vs mmap_lock (table, target/bench/faultstorm.json and
    /// faultstorm.svg).
    Bench(bench::BenchArgs),
    /// Soak the kernel: a seeded random mix of fault storms, system-call
    /// fuzzers, process churn and out-of-memory pressure on every CPU for
    /// minutes, each lock build, with invariants checked after every phase.
    Soak(soak::SoakArgs),
    /// Sample every CPU during a fault storm (the bench's kernel mode with the
    /// in-kernel profiler on): folded stacks, an SVG flame graph and a
    /// summary in target/profile/.
    Profile(profile::ProfileArgs),
}

/// Options that change how the kernel is compiled.
#[derive(Args, Clone, Debug)]
pub struct KernelArgs {
    /// Build with the release profile (optimized; debug info kept).
    #[arg(long)]
    release: bool,
    /// Split page-table locks are used when SPLIT_PTLOCK_CPUS <= NR_CPUS (64).
    /// The default is 4 (split locks on); a large value such as 1000000 builds
    /// the single `mm.page_table_lock` kernel for comparison.
    #[arg(long, value_name = "N")]
    split_ptlock_cpus: Option<u32>,
}

impl KernelArgs {
    fn config(&self) -> BuildConfig {
        BuildConfig { release: self.release, split_ptlock_cpus: self.split_ptlock_cpus, features: Vec::new() }
    }
}

/// Size of the virtual machine (`run`, `test`, `gdb`).
#[derive(Args, Clone, Debug)]
pub struct VmSize {
    /// Number of virtual CPUs (under `gdb`, each is a gdb thread).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub smp: u32,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, default_value = "1G", value_parser = qemu::parse_mem)]
    pub mem: String,
}

/// Options of the virtual machine (`run`, `test`).
#[derive(Args, Clone, Debug)]
pub struct MachineArgs {
    #[command(flatten)]
    pub size: VmSize,
    /// Accelerator. Default: KVM only where the host CPU has hardware
    /// virtualization (vmx/svm) and /dev/kvm opens, otherwise TCG.
    #[arg(long, value_enum)]
    pub accel: Option<Accel>,
    /// Limit on a QEMU run in seconds, counted from the kernel's first line
    /// (a separate boot bound covers the firmware and bootloader: 120 s under
    /// TCG); the run is killed and reported, with the test that was running.
    /// Default: 600 (`test`: 600 for the main run, 300 for the short ones).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    machine: MachineArgs,
    /// Boot through UEFI (OVMF) instead of legacy BIOS.
    #[arg(long)]
    uefi: bool,
    /// Kernel log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log: String,
    /// Extra arguments passed to QEMU verbatim (after `--`).
    #[arg(last = true, value_name = "QEMU_ARGS")]
    qemu_args: Vec<String>,
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds the kernel and the image for `firmware` from this process's own
/// copy of the ELF (see [`kernel::private_copy`]); returns (elf, image).
pub fn build_kernel(config: &BuildConfig, firmware: Firmware) -> Result<(PathBuf, PathBuf)> {
    let elf = kernel::private_copy(&kernel::build(config)?, config)?;
    let image = kernel::image(&elf, firmware)?;
    Ok((elf, image))
}

fn run(args: RunArgs) -> Result<bool> {
    let firmware = if args.uefi { Firmware::Uefi } else { Firmware::Bios };
    let qemu_bin = setup::ensure_all(args.uefi)?;
    let (elf, image) = build_kernel(&args.kernel.config(), firmware)?;
    let (accel, why) = qemu::choose_accel(args.machine.accel);
    println!("xtask: accelerator {accel}: {why}");
    let machine = Machine {
        image,
        linux: None,
        firmware,
        smp: args.machine.size.smp,
        mem: args.machine.size.mem.clone(),
        accel,
        icount: false,
        cmdline: format!("mode=run log={}", args.log),
        extra: args.qemu_args.clone(),
        vcpu_time: None,
    };
    let symbols = symbols::Symbolizer::new(&elf);
    let timeout = Duration::from_secs(args.machine.timeout.unwrap_or(600));
    let name = format!("run-smp{}-{}", machine.smp, firmware.name());
    let outcome = qemu::run(&qemu_bin, &machine, &name, machine.limits(timeout), symbols.as_ref(), true)?;
    // A timeout's description names the serial log already.
    let log = match outcome.ending {
        qemu::Ending::Timeout(_) => String::new(),
        _ => format!("; serial log: {}", outcome.log.display()),
    };
    println!(
        "xtask: {} ({:.1} s, {accel}; {}){log}",
        outcome.describe(&name),
        outcome.elapsed.as_secs_f64(),
        outcome.boot_time(),
    );
    Ok(outcome.kernel_succeeded())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build { kernel, uefi } => (|| {
            setup::ensure_rust()?;
            let firmware = if uefi { Firmware::Uefi } else { Firmware::Bios };
            // Here the files stay where cargo puts the kernel.
            let elf = kernel::build(&kernel.config())?;
            let image = kernel::image(&elf, firmware)?;
            println!(
                "xtask: kernel {} (for gdb and addr2line)\nxtask: image  {} (carries {})",
                elf.display(),
                image.display(),
                boot::stripped_path(&elf).display()
            );
            Ok(true)
        })(),
        Command::Run(args) => run(args),
        Command::Test(args) => test::run(args),
        Command::Gdb(args) => gdb::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Profile(args) => profile::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
