//! One line per event on stderr, filtered by level (`--log`).
//!
//! Callers never pass secrets here: tokens, passwords, JWTs and `/api/ws` query strings are
//! kept out of every message by construction (the accept loop logs paths without queries).

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

pub fn write(level: Level, args: std::fmt::Arguments) {
    if enabled(level) {
        eprintln!(
            "{} {:5} {}",
            crate::clock::now_rfc3339(),
            level.label(),
            args
        );
    }
}

/// Refusals (a bad token, a refused Origin, a failed login) are logged as warnings, one line
/// each, but at most `REFUSALS_PER_WINDOW` a window: a flood of them must not fill the disk.
/// The first line after a window in which some were held back says how many.
const REFUSALS_PER_WINDOW: u32 = 20;
const REFUSAL_WINDOW_SECS: i64 = 10;

struct RefusalWindow {
    started_ms: i64,
    written: u32,
    held_back: u64,
}

static REFUSALS: std::sync::Mutex<RefusalWindow> = std::sync::Mutex::new(RefusalWindow {
    started_ms: 0,
    written: 0,
    held_back: 0,
});

/// One warning line about a refused request or connection, unless too many came lately.
/// Callers name the reason and the peer; never a token, password or JWT.
pub fn refusal(args: std::fmt::Arguments) {
    if !enabled(Level::Warn) {
        return;
    }
    let now = crate::clock::now_ms();
    let held_back = {
        let mut w = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
        if now - w.started_ms >= REFUSAL_WINDOW_SECS * 1000 {
            let held = w.held_back;
            *w = RefusalWindow {
                started_ms: now,
                written: 0,
                held_back: 0,
            };
            if held > 0 {
                Some(held)
            } else {
                None
            }
        } else if w.written >= REFUSALS_PER_WINDOW {
            w.held_back += 1;
            return;
        } else {
            None
        }
    };
    if let Some(n) = held_back {
        write(
            Level::Warn,
            format_args!(
                "refused: {n} more refusals were not logged in the last {REFUSAL_WINDOW_SECS} s"
            ),
        );
    }
    REFUSALS.lock().unwrap_or_else(|p| p.into_inner()).written += 1;
    write(Level::Warn, format_args!("refused: {args}"));
}

#[macro_export]
macro_rules! log_refusal { ($($t:tt)*) => { $crate::logging::refusal(format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_error { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_warn { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_info { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! log_debug { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Debug, format_args!($($t)*)) } }
