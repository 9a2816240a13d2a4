//! The `log` facade on the serial console.
//!
//! Every line reads `[seconds.micros] cpuN LEVEL message`, with the time since
//! the TSC was calibrated at boot.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = arch::time::now_ns();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        arch::serial::write_line(format_args!(
            "[{:5}.{:06}] cpu{} {} {}\n",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            arch::percpu::cpu_id(),
            level,
            record.args()
        ));
    }

    fn flush(&self) {}
}

/// Installs the logger. The level comes from the command line later
/// (`log=debug`); until then it is `info`.
pub fn init() {
    log::set_logger(&LOGGER).expect("logger installed twice");
    log::set_max_level(LevelFilter::Info);
}
