//! What comes back to a sending connection (a human's, or the Butler's): per request its echo
//! or ACK and its answer, their latencies, duplicates, and a stream's order.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde_json::Value;

use crate::clock::now_us;
use crate::measure::count_into;

/// Per request, what came back to the human that sent it.
#[derive(Default, Clone, Copy)]
pub struct Slot {
    pub sent_us: u64,
    pub echoes: u16,
    pub replies: u16,
    pub next_chunk: u32,
    pub ends: u16,
    pub done: bool,
}

/// Everything one sending connection (a human's, or the Butler's) received; a shared counter
/// lets main see progress.
pub struct SenderRx {
    pub me: i64,
    /// The sender is a machine (the Butler): a stored frame comes back as an ACK naming its
    /// `local_id`, not as an echo of the frame.
    pub acked: bool,
    /// This run's agents. Only their frames are answers: a machine's first connection is
    /// replayed whatever was addressed to it before (an earlier run's answers, say).
    pub peers: Arc<HashSet<i64>>,
    pub chunks: u32,
    pub slots: Vec<Slot>,
    /// Receive-time window (µs) in which latencies and completions are counted.
    pub window: (u64, u64),
    pub rtt: Vec<u32>,
    pub echo_lat: Vec<u32>,
    pub chunk_lat: Vec<u32>,
    pub stream_lat: Vec<u32>,
    pub in_window: u64,
    pub replies_received: u64,
    pub echoes_received: u64,
    pub dup_replies: u64,
    pub dup_echoes: u64,
    pub bad_echo: u64,
    pub order_violations: u64,
    pub chunks_received: u64,
    pub ends_received: u64,
    pub dup_ends: u64,
    pub unknown: u64,
    pub errors: BTreeMap<String, u64>,
    /// The open loop's reader thread's CPU over its life, % of one core.
    pub busy_pct: Option<f64>,
    /// Requests that are complete: echoed, and answered (stream: ended).
    pub done: Arc<AtomicU64>,
}

/// Past this sequence number a frame is counted as unknown instead of growing the table.
const MAX_SEQ: usize = 50_000_000;

impl SenderRx {
    pub fn new(
        me: i64,
        acked: bool,
        peers: Arc<HashSet<i64>>,
        chunks: usize,
        window: (u64, u64),
        done: Arc<AtomicU64>,
    ) -> SenderRx {
        SenderRx {
            me,
            acked,
            peers,
            chunks: chunks as u32,
            slots: Vec::new(),
            window,
            rtt: Vec::new(),
            echo_lat: Vec::new(),
            chunk_lat: Vec::new(),
            stream_lat: Vec::new(),
            in_window: 0,
            replies_received: 0,
            echoes_received: 0,
            dup_replies: 0,
            dup_echoes: 0,
            bad_echo: 0,
            order_violations: 0,
            chunks_received: 0,
            ends_received: 0,
            dup_ends: 0,
            unknown: 0,
            errors: BTreeMap::new(),
            busy_pct: None,
            done,
        }
    }

    fn slot(&mut self, k: usize) -> Option<&mut Slot> {
        if k >= MAX_SEQ {
            self.unknown += 1;
            return None;
        }
        if k >= self.slots.len() {
            let len = (k + 1).max(self.slots.len() * 2);
            self.slots.resize(len, Slot::default());
        }
        Some(&mut self.slots[k])
    }

    /// True when `v` comes from one of this run's agents; anything else is counted as unknown.
    fn is_peer_frame(&mut self, v: &Value) -> bool {
        let ok = v["sender_id"]
            .as_i64()
            .is_some_and(|id| self.peers.contains(&id));
        if !ok {
            self.unknown += 1;
        }
        ok
    }

    /// Marks request `k` complete the first time it is both echoed and answered; returns
    /// whether this frame completed it.
    fn complete(&mut self, k: usize, win: bool) -> bool {
        let chunks = self.chunks;
        let s = &mut self.slots[k];
        let answered = if chunks == 0 {
            s.replies > 0
        } else {
            s.ends > 0
        };
        if s.done || s.echoes == 0 || !answered {
            return false;
        }
        s.done = true;
        self.done.fetch_add(1, Relaxed);
        if win {
            self.in_window += 1;
        }
        true
    }

    /// Handles one frame; true when it completed a request.
    pub fn handle(&mut self, text: &str) -> bool {
        let now = now_us();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.unknown += 1;
            return false;
        };
        let win = now >= self.window.0 && now < self.window.1;
        let chunks = self.chunks;
        match v["type"].as_str() {
            Some("CHAT") => {
                let Some((k, t)) = v["payload"].as_str().and_then(parse_rt) else {
                    self.unknown += 1;
                    return false;
                };
                if v["sender_id"].as_i64() == Some(self.me) {
                    // The echo of our own request: it carries our local_id and the stored id.
                    self.echoes_received += 1;
                    if v["local_id"].as_str() != Some(format!("l{k}").as_str())
                        || v["id"].as_i64().is_none()
                    {
                        self.bad_echo += 1;
                    }
                    let Some(s) = self.slot(k) else { return false };
                    s.echoes += 1;
                    s.sent_us = t;
                    if s.echoes > 1 {
                        self.dup_echoes += 1;
                        return false;
                    }
                    if win {
                        self.echo_lat.push(now.saturating_sub(t) as u32);
                    }
                } else {
                    // The agent's answer (stream: the final CHAT, after every chunk).
                    if !self.is_peer_frame(&v) {
                        return false;
                    }
                    self.replies_received += 1;
                    let Some(s) = self.slot(k) else { return false };
                    s.replies += 1;
                    s.sent_us = t;
                    let out_of_order = chunks > 0 && (s.next_chunk != chunks || s.ends > 0);
                    let dup = s.replies > 1;
                    if out_of_order {
                        self.order_violations += 1;
                    }
                    if dup {
                        self.dup_replies += 1;
                        return false;
                    }
                    if win {
                        self.rtt.push(now.saturating_sub(t) as u32);
                    }
                }
                self.complete(k, win)
            }
            Some("CHAT_STREAM") => {
                if !self.is_peer_frame(&v) {
                    return false;
                }
                self.chunks_received += 1;
                let chunk = v["payload"].as_str().and_then(|p| {
                    let mut it = p.split(' ');
                    (it.next() == Some("c")).then_some(())?;
                    Some((
                        it.next()?.parse::<u32>().ok()?,
                        it.next()?.parse::<u64>().ok()?,
                    ))
                });
                let (Some(k), Some((j, t))) = (stream_seq(&v), chunk) else {
                    self.unknown += 1;
                    return false;
                };
                if win {
                    self.chunk_lat.push(now.saturating_sub(t) as u32);
                }
                let Some(s) = self.slot(k) else { return false };
                let out_of_order = j != s.next_chunk || s.replies > 0 || s.ends > 0;
                s.next_chunk = s.next_chunk.max(j + 1);
                if out_of_order {
                    self.order_violations += 1;
                }
                false
            }
            Some("CHAT_STREAM_END") => {
                if !self.is_peer_frame(&v) {
                    return false;
                }
                self.ends_received += 1;
                let Some(k) = stream_seq(&v) else {
                    self.unknown += 1;
                    return false;
                };
                let Some(s) = self.slot(k) else { return false };
                s.ends += 1;
                let out_of_order = s.replies != 1 || s.next_chunk != chunks;
                let (dup, sent) = (s.ends > 1, s.sent_us);
                if out_of_order {
                    self.order_violations += 1;
                }
                if dup {
                    self.dup_ends += 1;
                    return false;
                }
                if win && sent > 0 {
                    self.stream_lat.push(now.saturating_sub(sent) as u32);
                }
                self.complete(k, win)
            }
            Some("ACK") if self.acked => {
                // The Butler's acknowledgement of a stored request: the local_id carries the
                // sequence number and send time (an ACK has no payload), plus the stored id.
                let Some((k, t)) = v["local_id"].as_str().and_then(parse_timed_local_id) else {
                    self.unknown += 1;
                    return false;
                };
                self.echoes_received += 1;
                if v["id"].as_i64().is_none() {
                    self.bad_echo += 1;
                }
                let Some(s) = self.slot(k) else { return false };
                s.echoes += 1;
                if s.echoes > 1 {
                    self.dup_echoes += 1;
                    return false;
                }
                if win {
                    self.echo_lat.push(now.saturating_sub(t) as u32);
                }
                self.complete(k, win)
            }
            Some("ERROR") => {
                count_into(
                    &mut self.errors,
                    v["payload"]["code"].as_str().unwrap_or("?"),
                );
                false
            }
            Some("PRESENCE") | Some("SYSTEM_LOG") | Some("BUTLER_AGENT_MESSAGE") => false,
            _ => {
                self.unknown += 1;
                false
            }
        }
    }
}

/// "rt K T …" → (K, T).
fn parse_rt(p: &str) -> Option<(usize, u64)> {
    let mut it = p.split(' ');
    (it.next()? == "rt").then_some(())?;
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn stream_seq(v: &Value) -> Option<usize> {
    v["stream_id"].as_str()?.strip_prefix('s')?.parse().ok()
}

/// "lK.T" → (K, T): a machine sender's local_id.
fn parse_timed_local_id(l: &str) -> Option<(usize, u64)> {
    let (k, t) = l.strip_prefix('l')?.split_once('.')?;
    Some((k.parse().ok()?, t.parse().ok()?))
}
