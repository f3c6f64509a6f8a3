//! The sending side: how request `k` is worded, the open loop (paced at an offered rate) and
//! the closed loop (K requests in flight on one connection).

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::WebSocket;

use super::receiver::SenderRx;
use crate::clock::{now_us, sleep_until};
use crate::measure::ThreadBusy;
use crate::ws::{is_timeout, send_json, text_of, Split};

/// How a sender words request `k`: the payload carries `k` and the send time (µs). A machine
/// sender's `local_id` carries them as well, for its ACK, which has no payload to read.
#[derive(Clone)]
pub struct Requests {
    pub pad: String,
    pub timed_local_id: bool,
}

impl Requests {
    pub fn make(&self, k: u64, target: i64) -> Value {
        let now = now_us();
        let local_id = if self.timed_local_id {
            format!("l{k}.{now}")
        } else {
            format!("l{k}")
        };
        json!({"type": "CHAT", "target_id": target, "local_id": local_id,
               "payload": format!("rt {k} {now} {}", self.pad)})
    }
}

/// What one sender (a human's, or the Butler's) did.
pub struct SendReport {
    pub sent: u64,
    pub max_lag: Duration,
    pub send_failures: u64,
    /// The sending thread's CPU over its life, % of one core: near 100 for a closed loop's
    /// thread means this client, not the server, set the pace.
    pub busy_pct: Option<f64>,
}

/// Open loop: sends request k at start + offset + k·interval, to agents round-robin.
#[allow(clippy::too_many_arguments)]
pub fn paced_sender(
    mut w: WebSocket<TcpStream>,
    idx: usize,
    humans: usize,
    agents: Arc<Vec<i64>>,
    interval: Duration,
    start: Instant,
    end: Instant,
    req: Requests,
) -> SendReport {
    let offset = interval.mul_f64(idx as f64 / humans as f64);
    let busy = ThreadBusy::start();
    let mut r = SendReport {
        sent: 0,
        max_lag: Duration::ZERO,
        send_failures: 0,
        busy_pct: None,
    };
    for k in 0u64.. {
        let due = start + offset + interval.mul_f64(k as f64);
        if due >= end {
            break;
        }
        r.max_lag = r.max_lag.max(sleep_until(due));
        let target = agents[(k as usize * humans + idx) % agents.len()];
        if send_json(&mut w, &req.make(k, target)).is_err() {
            r.send_failures += 1;
            break;
        }
        r.sent = k + 1;
    }
    r.busy_pct = busy.pct();
    r
}

/// Closed loop on one human: `inflight` requests outstanding until `end`, then drain.
#[allow(clippy::too_many_arguments)]
pub fn closed_loop_human(
    mut sp: Split,
    rx: &mut SenderRx,
    idx: usize,
    humans: usize,
    agents: &[i64],
    inflight: usize,
    end: Instant,
    drain_until: Instant,
    req: &Requests,
) -> SendReport {
    let busy = ThreadBusy::start();
    let mut r = SendReport {
        sent: 0,
        max_lag: Duration::ZERO,
        send_failures: 0,
        busy_pct: None,
    };
    let _ = sp.ctl.set_read_timeout(Some(Duration::from_millis(100)));
    let mut next_k = 0u64;
    let mut send_next = |w: &mut WebSocket<TcpStream>, r: &mut SendReport| {
        let target = agents[(next_k as usize * humans + idx) % agents.len()];
        if send_json(w, &req.make(next_k, target)).is_err() {
            r.send_failures += 1;
            return false;
        }
        next_k += 1;
        r.sent = next_k;
        true
    };
    for _ in 0..inflight {
        if !send_next(&mut sp.writer, &mut r) {
            return r;
        }
    }
    let mut outstanding = inflight as u64;
    loop {
        let now = Instant::now();
        if now >= drain_until || (now >= end && outstanding == 0) {
            break;
        }
        match sp.reader.read() {
            Ok(msg) => {
                let Some(text) = text_of(&msg) else { continue };
                if rx.handle(text) {
                    outstanding = outstanding.saturating_sub(1);
                    if Instant::now() < end {
                        if !send_next(&mut sp.writer, &mut r) {
                            break;
                        }
                        outstanding += 1;
                    }
                }
            }
            Err(e) if is_timeout(&e) => continue,
            Err(_) => break,
        }
    }
    // The socket stays open (main holds a clone) until the server's CPU has been sampled:
    // closing it here would end the server's threads for it and lose their CPU time.
    r.busy_pct = busy.pct();
    r
}
