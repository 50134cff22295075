//! nodepool's log line: `%(asctime)s %(levelname)s %(name)s: %(message)s`.
//!
//! Facts from nodepool 11 (`nodepool/logconfig.py`, wire spec §6.2) and Python's `logging`:
//!
//! * `asctime` is local time as `2026-12-07 18:00:00,123` (comma before the milliseconds).
//! * Level names are Python's: `DEBUG`, `INFO`, `WARNING`, `ERROR`. Rust's `TRACE` (below
//!   Python's DEBUG) keeps its name.
//! * nodepool's `MultiLineFormatter` formats every line of a multi-line message as a line of
//!   its own, with the full prefix, and the message part of each continuation line indented
//!   by two spaces. So every physical line of the log starts with a timestamp and a logger
//!   name, and `grep nodepool.stack_dump` finds a whole stack dump.
//!
//! Pure functions; the logger in `mod.rs` supplies the clock.

use std::time::SystemTime;

/// A log level as Python numbers it (`logging.DEBUG` is 10).
pub fn python_level(level: log::Level) -> u32 {
    match level {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug => 10,
        log::Level::Trace => 5,
    }
}

/// A level's name as Python prints it.
pub fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARNING",
        log::Level::Info => "INFO",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    }
}

/// Calendar fields of a local time, as `localtime_r` gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
}

impl LocalTime {
    /// `t` in the process's time zone (`TZ`, else `/etc/localtime`), as Python's
    /// `time.localtime` does.
    pub fn of(t: SystemTime) -> LocalTime {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs() as libc::time_t;
        // SAFETY: localtime_r writes only into `tm`, which we own; a zeroed tm is valid.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
        if !ok {
            // Cannot happen for times the clock gives; fall back to the epoch.
            tm.tm_year = 70;
            tm.tm_mday = 1;
        }
        LocalTime {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec as u32,
            millis: since.subsec_millis(),
        }
    }

    /// Python's `asctime`: `2026-12-07 18:00:00,123`.
    pub fn asctime(&self) -> String {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02},{:03}",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.millis
        )
    }
}

/// Appends one record to `out`: a line per line of `message`, each with the prefix, the
/// continuation lines' messages indented by two spaces; every line ends with `\n`.
pub fn format_record(out: &mut Vec<u8>, asctime: &str, level: &str, name: &str, message: &str) {
    for (i, line) in message.split('\n').enumerate() {
        out.extend_from_slice(asctime.as_bytes());
        out.push(b' ');
        out.extend_from_slice(level.as_bytes());
        out.push(b' ');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        if i > 0 {
            out.extend_from_slice(b"  ");
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(message: &str) -> String {
        let mut out = Vec::new();
        format_record(
            &mut out,
            "2026-12-07 18:00:00,123",
            "DEBUG",
            "nodepool.stack_dump",
            message,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn one_line_is_nodepools_format() {
        assert_eq!(
            formatted("Beginning debug handler"),
            "2026-12-07 18:00:00,123 DEBUG nodepool.stack_dump: Beginning debug handler\n"
        );
    }

    #[test]
    fn continuation_lines_repeat_the_prefix_and_indent_by_two_spaces() {
        // What nodepool's MultiLineFormatter prints for "a\nb\n  c".
        assert_eq!(
            formatted("a\nb\n  c"),
            "2026-12-07 18:00:00,123 DEBUG nodepool.stack_dump: a\n\
             2026-12-07 18:00:00,123 DEBUG nodepool.stack_dump:   b\n\
             2026-12-07 18:00:00,123 DEBUG nodepool.stack_dump:     c\n"
        );
    }

    #[test]
    fn asctime_is_pythons() {
        let t = LocalTime {
            year: 2026,
            month: 12,
            day: 7,
            hour: 8,
            minute: 5,
            second: 9,
            millis: 7,
        };
        assert_eq!(t.asctime(), "2026-12-07 08:05:09,007");
    }

    #[test]
    fn local_time_follows_the_clock() {
        let now = SystemTime::now();
        let t = LocalTime::of(now);
        assert!(t.year >= 2024 && (1..=12).contains(&t.month) && (1..=31).contains(&t.day));
        assert!(t.hour < 24 && t.minute < 60 && t.second < 61 && t.millis < 1000);
    }

    #[test]
    fn levels_are_named_and_numbered_as_in_python() {
        assert_eq!(level_name(log::Level::Warn), "WARNING");
        assert_eq!(level_name(log::Level::Error), "ERROR");
        assert_eq!(python_level(log::Level::Debug), 10);
        assert_eq!(python_level(log::Level::Warn), 30);
        assert!(python_level(log::Level::Trace) < python_level(log::Level::Debug));
    }
}
