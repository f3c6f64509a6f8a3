//! `chat` and `stream`: humans send CHAT to agents that answer each one (chat: a CHAT with the
//! request's payload; stream: CHAT_STREAM chunks, the final CHAT and CHAT_STREAM_END), paced
//! at an offered rate (open loop) or with K requests in flight (closed loop). Round-trip
//! latency, lost and duplicated replies and echoes, and whether a stream's order was kept.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use crate::clock::{now_us, sleep_until};
use crate::measure::{count_into, latency, merge_counts, ms, round2, Observer, ThreadBusy};
use crate::options::{ChatArgs, Common};
use crate::rest::{self, create_humans, login, register_agents};
use crate::ws::{
    is_timeout, open_all_ok, send_json, shutdown_all, spawn_small, split, text_of, ws_config, Split,
};
use crate::Res;

/// What one agent saw.
#[derive(Default)]
struct AgentReport {
    requests: u64,
    frames_sent: u64,
    errors: BTreeMap<String, u64>,
    send_failures: u64,
}

/// Answers every CHAT with the request's payload (chat), or with `chunks` CHAT_STREAM frames, a
/// final CHAT and CHAT_STREAM_END (stream). Ends when the socket does.
fn agent_loop(mut ws: WebSocket<TcpStream>, chunks: usize, gap: Duration) -> AgentReport {
    let mut r = AgentReport::default();
    while let Ok(msg) = ws.read() {
        let Some(v) = text_of(&msg).and_then(|t| serde_json::from_str::<Value>(t).ok()) else {
            continue;
        };
        match v["type"].as_str() {
            Some("CHAT") => {
                let Some(sender) = v["sender_id"].as_i64().filter(|&s| s > 0) else {
                    continue;
                };
                r.requests += 1;
                let payload = &v["payload"];
                let mut frames = Vec::with_capacity(chunks + 2);
                if chunks == 0 {
                    frames.push(json!({"type": "CHAT", "target_id": sender, "payload": payload}));
                } else {
                    let seq = payload
                        .as_str()
                        .and_then(|p| p.split(' ').nth(1))
                        .unwrap_or("0");
                    let sid = format!("s{seq}");
                    for j in 0..chunks {
                        if j > 0 && !gap.is_zero() {
                            std::thread::sleep(gap);
                        }
                        let chunk = json!({"type": "CHAT_STREAM", "target_id": sender, "stream_id": sid,
                                            "payload": format!("c {j} {}", now_us())});
                        if send_json(&mut ws, &chunk).is_err() {
                            r.send_failures += 1;
                            return r;
                        }
                        r.frames_sent += 1;
                    }
                    frames.push(json!({"type": "CHAT", "target_id": sender, "stream_id": sid, "payload": payload}));
                    frames.push(json!({"type": "CHAT_STREAM_END", "target_id": sender, "stream_id": sid, "payload": ""}));
                }
                for f in &frames {
                    if send_json(&mut ws, f).is_err() {
                        r.send_failures += 1;
                        return r;
                    }
                    r.frames_sent += 1;
                }
            }
            Some("ERROR") => {
                count_into(&mut r.errors, v["payload"]["code"].as_str().unwrap_or("?"))
            }
            _ => {}
        }
    }
    r
}

/// Per request, what came back to the human that sent it.
#[derive(Default, Clone, Copy)]
struct Slot {
    sent_us: u64,
    echoes: u16,
    replies: u16,
    next_chunk: u32,
    ends: u16,
    done: bool,
}

/// Everything one sending connection (a human's, or the Butler's) received; a shared counter
/// lets main see progress.
struct SenderRx {
    me: i64,
    /// The sender is a machine (the Butler): a stored frame comes back as an ACK naming its
    /// `local_id`, not as an echo of the frame.
    acked: bool,
    /// This run's agents. Only their frames are answers: a machine's first connection is
    /// replayed whatever was addressed to it before (an earlier run's answers, say).
    peers: Arc<HashSet<i64>>,
    chunks: u32,
    slots: Vec<Slot>,
    /// Receive-time window (µs) in which latencies and completions are counted.
    window: (u64, u64),
    rtt: Vec<u32>,
    echo_lat: Vec<u32>,
    chunk_lat: Vec<u32>,
    stream_lat: Vec<u32>,
    in_window: u64,
    replies_received: u64,
    echoes_received: u64,
    dup_replies: u64,
    dup_echoes: u64,
    bad_echo: u64,
    order_violations: u64,
    chunks_received: u64,
    ends_received: u64,
    dup_ends: u64,
    unknown: u64,
    errors: BTreeMap<String, u64>,
    /// The open loop's reader thread's CPU over its life, % of one core.
    busy_pct: Option<f64>,
    /// Requests that are complete: echoed, and answered (stream: ended).
    done: Arc<AtomicU64>,
}

/// Past this sequence number a frame is counted as unknown instead of growing the table.
const MAX_SEQ: usize = 50_000_000;

impl SenderRx {
    fn new(
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
    fn handle(&mut self, text: &str) -> bool {
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

/// How a sender words request `k`: the payload carries `k` and the send time (µs). A machine
/// sender's `local_id` carries them as well, for its ACK, which has no payload to read.
#[derive(Clone)]
struct Requests {
    pad: String,
    timed_local_id: bool,
}

impl Requests {
    fn make(&self, k: u64, target: i64) -> Value {
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
struct SendReport {
    sent: u64,
    max_lag: Duration,
    send_failures: u64,
    /// The sending thread's CPU over its life, % of one core: near 100 for a closed loop's
    /// thread means this client, not the server, set the pace.
    busy_pct: Option<f64>,
}

/// Open loop: sends request k at start + offset + k·interval, to agents round-robin.
#[allow(clippy::too_many_arguments)]
fn paced_sender(
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
fn closed_loop_human(
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

pub fn run(c: &Common, a: &ChatArgs) -> Res<Value> {
    let butler = a.butler_interval.is_some();
    let (scenario, role) = if a.stream {
        ("stream", "human")
    } else if butler {
        ("butler", "butler")
    } else {
        ("chat", "human")
    };
    let tag = if a.stream {
        "s"
    } else if butler {
        "b"
    } else if a.closed_loop > 0 {
        "k"
    } else {
        "r"
    };
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let agent_names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-{tag}a{i}", c.prefix))
        .collect();
    let human_names: Vec<String> = (0..a.humans)
        .map(|i| format!("{}-{tag}h{i}", c.prefix))
        .collect();
    let agents = register_agents(c.addr, &jwt, &agent_names)?;
    // The senders: humans made for the run, or the Butler that every server has.
    let humans = if butler {
        vec![rest::butler(c.addr, &jwt)?]
    } else {
        create_humans(c.addr, &jwt, &human_names, "MEMBER")?
    };
    if butler {
        note!(
            "the Butler (id {}), {} agents ready",
            humans[0].id,
            agents.len()
        );
    } else {
        note!("{} humans, {} agents ready", humans.len(), agents.len());
    }

    let agent_tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let human_tokens: Vec<&str> = humans.iter().map(|x| x.token.as_str()).collect();
    let agent_socks = open_all_ok(c.addr, &agent_tokens, "agent")?;
    let mut ctls = Vec::new();
    let mut agent_threads = Vec::new();
    for (i, s) in agent_socks.into_iter().enumerate() {
        ctls.push(s.try_clone().map_err(|e| e.to_string())?);
        let ws = WebSocket::from_raw_socket(s, Role::Client, Some(ws_config()));
        let (chunks, gap) = (a.chunks, a.chunk_gap);
        agent_threads.push(spawn_small(format!("agent-{i}"), move || {
            agent_loop(ws, chunks, gap)
        })?);
    }
    let human_socks = open_all_ok(c.addr, &human_tokens, role)?;
    // Let the PRESENCE frames of the agents' connects pass before measuring.
    std::thread::sleep(Duration::from_millis(500));

    let agent_ids = Arc::new(agents.iter().map(|x| x.id).collect::<Vec<_>>());
    let peers: Arc<HashSet<i64>> = Arc::new(agent_ids.iter().copied().collect());
    let req = Requests {
        pad: "x".repeat(a.payload_bytes),
        timed_local_id: butler,
    };
    let done: Vec<Arc<AtomicU64>> = (0..a.humans).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let observer = Observer::start(c, true);
    let start = Instant::now();
    let end = start + a.duration;
    let drain_until = end + a.drain;
    let start_us = now_us();
    let window = if a.closed_loop > 0 {
        (
            start_us + a.warmup.as_micros() as u64,
            start_us + a.duration.as_micros() as u64,
        )
    } else {
        (0, u64::MAX)
    };

    let mut rxs: Vec<SenderRx> = Vec::new();
    let mut sends: Vec<SendReport> = Vec::new();
    if a.closed_loop > 0 {
        let mut threads = Vec::new();
        for (i, s) in human_socks.into_iter().enumerate() {
            let sp = split(s)?;
            ctls.push(sp.ctl.try_clone().map_err(|e| e.to_string())?);
            let inflight = a.closed_loop / a.humans + usize::from(i < a.closed_loop % a.humans);
            let (ids, peers, req, me, chunks, d) = (
                agent_ids.clone(),
                peers.clone(),
                req.clone(),
                humans[i].id,
                a.chunks,
                done[i].clone(),
            );
            let nh = a.humans;
            threads.push(spawn_small(format!("{role}-{i}"), move || {
                let mut rx = SenderRx::new(me, butler, peers, chunks, window, d);
                let r =
                    closed_loop_human(sp, &mut rx, i, nh, &ids, inflight, end, drain_until, &req);
                (rx, r)
            })?);
        }
        for t in threads {
            let (rx, r) = t.join().map_err(|_| "a human thread panicked")?;
            rxs.push(rx);
            sends.push(r);
        }
    } else {
        let interval = Duration::from_secs_f64(a.humans as f64 / a.rate);
        let mut readers = Vec::new();
        let mut senders = Vec::new();
        for (i, s) in human_socks.into_iter().enumerate() {
            let Split {
                writer,
                mut reader,
                ctl,
            } = split(s)?;
            ctls.push(ctl);
            let (me, peers, chunks, d) = (humans[i].id, peers.clone(), a.chunks, done[i].clone());
            readers.push(spawn_small(format!("{role}-rx-{i}"), move || {
                let busy = ThreadBusy::start();
                let mut rx = SenderRx::new(me, butler, peers, chunks, window, d);
                loop {
                    match reader.read() {
                        Ok(m) => {
                            if let Some(t) = text_of(&m) {
                                rx.handle(t);
                            }
                        }
                        Err(e) if is_timeout(&e) => continue,
                        Err(_) => break,
                    }
                }
                rx.busy_pct = busy.pct();
                rx
            })?);
            let (ids, req, nh) = (agent_ids.clone(), req.clone(), a.humans);
            senders.push(spawn_small(format!("{role}-tx-{i}"), move || {
                paced_sender(writer, i, nh, ids, interval, start, end, req)
            })?);
        }
        for t in senders {
            sends.push(t.join().map_err(|_| "a sender thread panicked")?);
        }
        let sent_total: u64 = sends.iter().map(|s| s.sent).sum();
        // Drain: wait until every request is answered, or give up at the deadline.
        while Instant::now() < drain_until {
            let done_total: u64 = done.iter().map(|d| d.load(Relaxed)).sum();
            if done_total >= sent_total {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let measured = observer.finish();
        shutdown_all(&ctls);
        for t in readers {
            rxs.push(t.join().map_err(|_| "a reader thread panicked")?);
        }
        return chat_report(
            scenario,
            a,
            rxs,
            sends,
            finish_agents(agent_threads)?,
            measured,
        );
    }
    let measured = observer.finish();
    shutdown_all(&ctls);
    chat_report(
        scenario,
        a,
        rxs,
        sends,
        finish_agents(agent_threads)?,
        measured,
    )
}

fn finish_agents(threads: Vec<JoinHandle<AgentReport>>) -> Res<AgentReport> {
    let mut total = AgentReport::default();
    for t in threads {
        let r = t.join().map_err(|_| "an agent thread panicked")?;
        total.requests += r.requests;
        total.frames_sent += r.frames_sent;
        total.send_failures += r.send_failures;
        merge_counts(&mut total.errors, r.errors);
    }
    Ok(total)
}

fn chat_report(
    scenario: &str,
    a: &ChatArgs,
    rxs: Vec<SenderRx>,
    sends: Vec<SendReport>,
    agents: AgentReport,
    measured: Value,
) -> Res<Value> {
    let sent: u64 = sends.iter().map(|s| s.sent).sum();
    let send_failures: u64 = sends.iter().map(|s| s.send_failures).sum();
    let max_lag = sends.iter().map(|s| s.max_lag).max().unwrap_or_default();
    let busiest = sends
        .iter()
        .filter_map(|s| s.busy_pct)
        .chain(rxs.iter().filter_map(|r| r.busy_pct))
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let (mut rtt, mut echo, mut chunk, mut stream) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut errors = BTreeMap::new();
    let (mut answered, mut echoed, mut replies, mut echoes) = (0u64, 0u64, 0u64, 0u64);
    let (mut dup_replies, mut dup_echoes, mut bad_echo, mut order, mut unknown) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut chunks, mut ends, mut dup_ends, mut in_window, mut complete_chunks) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (rx, s) in rxs.into_iter().zip(&sends) {
        let slots = &rx.slots[..(s.sent as usize).min(rx.slots.len())];
        answered += slots
            .iter()
            .filter(|x| {
                if rx.chunks == 0 {
                    x.replies > 0
                } else {
                    x.ends > 0
                }
            })
            .count() as u64;
        echoed += slots.iter().filter(|x| x.echoes > 0).count() as u64;
        complete_chunks += slots.iter().filter(|x| x.next_chunk == rx.chunks).count() as u64;
        replies += rx.replies_received;
        echoes += rx.echoes_received;
        dup_replies += rx.dup_replies;
        dup_echoes += rx.dup_echoes;
        bad_echo += rx.bad_echo;
        order += rx.order_violations;
        unknown += rx.unknown;
        chunks += rx.chunks_received;
        ends += rx.ends_received;
        dup_ends += rx.dup_ends;
        in_window += rx.in_window;
        rtt.extend(rx.rtt);
        echo.extend(rx.echo_lat);
        chunk.extend(rx.chunk_lat);
        stream.extend(rx.stream_lat);
        merge_counts(&mut errors, rx.errors);
    }
    let mut out = json!({
        "scenario": scenario,
        "mode": if a.closed_loop > 0 { "closed" } else { "open" },
        "humans": a.humans,
        "agents": a.agents,
        "duration_s": a.duration.as_secs_f64(),
        "sent": sent,
        "received": replies,
        "answered": answered,
        "lost": sent - answered,
        "duplicated": dup_replies,
        "echo": {"received": echoes, "lost": sent - echoed, "duplicated": dup_echoes, "bad": bad_echo,
                 "latency": latency(echo)},
        "send_failures": send_failures,
        "max_send_lag_ms": ms(max_lag.as_micros() as u64),
        "errors": errors,
        "unknown_frames": unknown,
        "agent_side": {"requests": agents.requests, "frames_sent": agents.frames_sent,
                       "send_failures": agents.send_failures, "errors": agents.errors},
        "observed": measured,
    });
    if a.closed_loop > 0 {
        let window = (a.duration - a.warmup).as_secs_f64();
        out["closed_loop"] = json!(a.closed_loop);
        out["warmup_s"] = json!(a.warmup.as_secs_f64());
        out["rt_per_s"] = json!(round2(in_window as f64 / window));
    } else {
        out["rate_offered"] = json!(a.rate);
        out["rt_per_s"] = json!(round2(answered as f64 / a.duration.as_secs_f64()));
    }
    if let Some(pct) = busiest {
        out["busiest_sender_thread_cpu_pct"] = json!(pct);
    }
    if let Some(interval) = a.butler_interval {
        // One sender, the Butler: its stored frames come back as ACKs, not echoes.
        let map = out.as_object_mut().expect("built as an object above");
        map.remove("humans");
        if let Some(acks) = map.remove("echo") {
            map.insert("ack".into(), acks);
        }
        out["interval_ms"] = json!(round2(interval.as_secs_f64() * 1000.0));
    }
    if a.stream {
        out["chunks_per_stream"] = json!(a.chunks);
        out["chunks_received"] = json!(chunks);
        out["chunks_expected"] = json!(sent * a.chunks as u64);
        out["streams_with_all_chunks"] = json!(complete_chunks);
        out["ends_received"] = json!(ends);
        out["duplicated_ends"] = json!(dup_ends);
        out["order_violations"] = json!(order);
        out["order_kept"] = json!(order == 0);
        out["chunk_latency"] = latency(chunk);
        out["stream_latency"] = latency(stream);
        out["final_latency"] = latency(rtt);
    } else {
        out["latency"] = latency(rtt);
    }
    Ok(out)
}
