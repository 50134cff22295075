//! Logging: env_logger with `timestamp LEVEL [thread] target: message` lines, so log lines
//! correlate with stack dumps. The filter comes from `NODEPOOL_BUILDER_LOG` (env_logger
//! syntax), else INFO (DEBUG with `-d`).

use std::io::Write;

/// Environment variable holding an env_logger filter, e.g. `info,nodepool.stack_dump=debug`.
pub const LOG_ENV: &str = "NODEPOOL_BUILDER_LOG";

/// Installs the logger writing to stderr.
pub fn init_stderr(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| default.to_string());
    env_logger::Builder::new()
        .parse_filters(&filter)
        .format(|buf, record| {
            let thread = std::thread::current();
            writeln!(
                buf,
                "{} {} [{}] {}: {}",
                buf.timestamp_millis(),
                record.level(),
                thread.name().unwrap_or("?"),
                record.target(),
                record.args()
            )
        })
        .target(env_logger::Target::Stderr)
        .init();
}
