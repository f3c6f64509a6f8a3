//! `logs`: N agents send SYSTEM_LOG at R/s each to D dashboards (admin connections);
//! delivered/sent per dashboard and end-to-end latency.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use crate::clock::{now_us, sleep_until};
use crate::measure::{count_into, latency, merge_counts, ms, round2, Observer};
use crate::options::{Common, LogsArgs};
use crate::rest::{create_humans, login, register_agents};
use crate::ws::{
    is_timeout, open_all_ok, send_json, shutdown_all, spawn_small, split, text_of, ws_config, Split,
};
use crate::Res;

/// What one dashboard received: per (agent, seq) a count.
struct DashRx {
    per_agent: usize,
    counts: Vec<u16>,
    lat: Vec<u32>,
    received: u64,
    dup: u64,
    foreign: u64,
    errors: BTreeMap<String, u64>,
    unique: Arc<AtomicU64>,
}

impl DashRx {
    fn handle(&mut self, text: &str) {
        let now = now_us();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        match v["type"].as_str() {
            Some("SYSTEM_LOG") => {
                let parsed = v["payload"]["content"].as_str().and_then(|c| {
                    let mut it = c.split(' ');
                    (it.next() == Some("el")).then_some(())?;
                    Some((
                        it.next()?.parse::<usize>().ok()?,
                        it.next()?.parse::<usize>().ok()?,
                        it.next()?.parse::<u64>().ok()?,
                    ))
                });
                let Some((a, s, t)) = parsed else {
                    self.foreign += 1;
                    return;
                };
                if s >= self.per_agent || a * self.per_agent + s >= self.counts.len() {
                    self.foreign += 1;
                    return;
                }
                self.received += 1;
                let c = &mut self.counts[a * self.per_agent + s];
                *c = c.saturating_add(1);
                if *c > 1 {
                    self.dup += 1;
                } else {
                    self.unique.fetch_add(1, Relaxed);
                    self.lat.push(now.saturating_sub(t) as u32);
                }
            }
            Some("ERROR") => count_into(
                &mut self.errors,
                v["payload"]["code"].as_str().unwrap_or("?"),
            ),
            _ => {}
        }
    }
}

/// Sends SYSTEM_LOG for a slice of agents: agent i of the slice at start + (k·n + i)·interval.
fn log_sender(
    mut ws: Vec<(usize, WebSocket<TcpStream>)>,
    rate: f64,
    offset: Duration,
    start: Instant,
    end: Instant,
) -> (Vec<(usize, u64)>, Duration, u64) {
    let n = ws.len();
    let mut sent = vec![0u64; n];
    let mut max_lag = Duration::ZERO;
    let mut failures = 0;
    let mut dead = vec![false; n];
    let interval = Duration::from_secs_f64(1.0 / (rate * n as f64));
    for j in 0u64.. {
        let due = start + offset + interval.mul_f64(j as f64);
        if due >= end {
            break;
        }
        let i = (j % n as u64) as usize;
        if dead[i] {
            continue;
        }
        max_lag = max_lag.max(sleep_until(due));
        let (a, w) = &mut ws[i];
        let frame = json!({"type": "SYSTEM_LOG", "payload": {"level": "INFO",
                           "content": format!("el {a} {} {}", sent[i], now_us())}});
        if send_json(w, &frame).is_err() {
            failures += 1;
            dead[i] = true;
            continue;
        }
        sent[i] += 1;
    }
    (
        ws.iter().map(|x| x.0).zip(sent).collect(),
        max_lag,
        failures,
    )
}

pub fn run(c: &Common, a: &LogsArgs) -> Res<Value> {
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-la{i}", c.prefix))
        .collect();
    let agents = register_agents(c.addr, &jwt, &names)?;
    // Dashboards are admin connections; one user may hold 16, so add admins beyond that.
    let extra = a.dashboards.saturating_sub(1).div_euclid(16);
    let extra_names: Vec<String> = (0..extra).map(|i| format!("{}-ld{i}", c.prefix)).collect();
    let mut dash_tokens = vec![jwt.clone()];
    dash_tokens.extend(
        create_humans(c.addr, &jwt, &extra_names, "ADMIN")?
            .into_iter()
            .map(|x| x.token),
    );
    let dash_tok: Vec<&str> = (0..a.dashboards)
        .map(|i| dash_tokens[i / 16].as_str())
        .collect();

    let per_agent = (a.rate * a.duration.as_secs_f64()).ceil() as usize + 2;
    let unique: Vec<Arc<AtomicU64>> = (0..a.dashboards)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let mut ctls = Vec::new();
    let mut dash_threads = Vec::new();
    for (i, s) in open_all_ok(c.addr, &dash_tok, "dashboard")?
        .into_iter()
        .enumerate()
    {
        ctls.push(s.try_clone().map_err(|e| e.to_string())?);
        let mut ws = WebSocket::from_raw_socket(s, Role::Client, Some(ws_config()));
        let mut rx = DashRx {
            per_agent,
            counts: vec![0; per_agent * a.agents],
            lat: Vec::new(),
            received: 0,
            dup: 0,
            foreign: 0,
            errors: BTreeMap::new(),
            unique: unique[i].clone(),
        };
        dash_threads.push(spawn_small(format!("dash-{i}"), move || {
            loop {
                match ws.read() {
                    Ok(m) => {
                        if let Some(t) = text_of(&m) {
                            rx.handle(t);
                        }
                    }
                    Err(e) if is_timeout(&e) => continue,
                    Err(_) => break,
                }
            }
            rx
        })?);
    }
    let agent_tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let mut writers: Vec<Vec<(usize, WebSocket<TcpStream>)>> =
        (0..a.senders.min(a.agents)).map(|_| Vec::new()).collect();
    let mut agent_readers = Vec::new();
    let nw = writers.len();
    for (i, s) in open_all_ok(c.addr, &agent_tokens, "agent")?
        .into_iter()
        .enumerate()
    {
        let Split {
            writer,
            mut reader,
            ctl,
        } = split(s)?;
        ctls.push(ctl);
        writers[i % nw].push((i, writer));
        agent_readers.push(spawn_small(format!("agent-rx-{i}"), move || {
            let mut errors = BTreeMap::new();
            loop {
                match reader.read() {
                    Ok(m) => {
                        let v = text_of(&m).and_then(|t| serde_json::from_str::<Value>(t).ok());
                        if let Some(v) = v {
                            if v["type"] == "ERROR" {
                                count_into(
                                    &mut errors,
                                    v["payload"]["code"].as_str().unwrap_or("?"),
                                );
                            }
                        }
                    }
                    Err(e) if is_timeout(&e) => continue,
                    Err(_) => break,
                }
            }
            errors
        })?);
    }
    note!("{} agents, {} dashboards connected", a.agents, a.dashboards);
    std::thread::sleep(Duration::from_millis(500));

    let observer = Observer::start(c, true);
    let start = Instant::now();
    let end = start + a.duration;
    let mut senders = Vec::new();
    for (w, group) in writers.into_iter().enumerate() {
        let offset = Duration::from_secs_f64(w as f64 / (a.rate * a.agents as f64));
        let rate = a.rate;
        senders.push(spawn_small(format!("log-tx-{w}"), move || {
            log_sender(group, rate, offset, start, end)
        })?);
    }
    let mut sent = vec![0u64; a.agents];
    let mut max_lag = Duration::ZERO;
    let mut send_failures = 0;
    for t in senders {
        let (counts, lag, f) = t.join().map_err(|_| "a sender thread panicked")?;
        for (i, n) in counts {
            sent[i] = n;
        }
        max_lag = max_lag.max(lag);
        send_failures += f;
    }
    let total: u64 = sent.iter().sum();
    let drain_until = end + a.drain;
    while Instant::now() < drain_until && unique.iter().any(|u| u.load(Relaxed) < total) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let measured = observer.finish();
    shutdown_all(&ctls);
    let mut dashboards = Vec::new();
    let mut all_lat = Vec::new();
    let mut errors = BTreeMap::new();
    let (mut lost_total, mut dup_total) = (0u64, 0u64);
    for t in dash_threads {
        let rx = t.join().map_err(|_| "a dashboard thread panicked")?;
        // Delivered = distinct (agent, seq) pairs that were actually sent.
        let delivered: u64 = (0..a.agents)
            .map(|i| {
                rx.counts[i * per_agent..i * per_agent + sent[i] as usize]
                    .iter()
                    .filter(|&&c| c > 0)
                    .count() as u64
            })
            .sum();
        lost_total += total - delivered;
        dup_total += rx.dup;
        let lat = latency(rx.lat.clone());
        dashboards.push(json!({"delivered": delivered, "sent": total, "ratio": if total > 0 { delivered as f64 / total as f64 } else { 0.0 },
                                "lost": total - delivered, "duplicated": rx.dup, "other_logs": rx.foreign,
                                "p99_ms": lat["p99_ms"]}));
        all_lat.extend(rx.lat);
        merge_counts(&mut errors, rx.errors);
    }
    let mut agent_errors = BTreeMap::new();
    for t in agent_readers {
        merge_counts(
            &mut agent_errors,
            t.join().map_err(|_| "an agent thread panicked")?,
        );
    }
    let secs = a.duration.as_secs_f64();
    Ok(json!({
        "scenario": "logs",
        "agents": a.agents,
        "rate_per_agent": a.rate,
        "dashboards": a.dashboards,
        "duration_s": secs,
        "sent": total,
        "sent_per_s": round2(total as f64 / secs),
        "lost": lost_total,
        "duplicated": dup_total,
        "per_dashboard": dashboards,
        "latency": latency(all_lat),
        "max_send_lag_ms": ms(max_lag.as_micros() as u64),
        "send_failures": send_failures,
        "errors_to_dashboards": errors,
        "errors_to_agents": agent_errors,
        "observed": measured,
    }))
}
