//! The one clock: every timestamp a payload carries is microseconds since this process
//! started, so a receiver in the same process can subtract it from its own reading.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Fixes the epoch; called first thing in `main`, before any thread reads the clock.
pub fn start() {
    EPOCH.get_or_init(Instant::now);
}

/// Microseconds since the process started: the one clock every timestamp in a payload uses.
pub fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Sleeps until `due`; returns how late the caller already was (zero when it slept).
pub fn sleep_until(due: Instant) -> Duration {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
        Duration::ZERO
    } else {
        now - due
    }
}
