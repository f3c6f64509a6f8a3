//! `search`: how long an agent waits to be let in while humans search the log (issue 12).
//! One phase without searches, then one with K threads each running log searches back to
//! back; in both, a prober opens the agent's WebSocket (handshake to 101: the token lookup)
//! and asks `GET /api/users/me` with the agent's token, one after the other. Fill the log
//! first (the `flood` scenario on the same server) so that searches have something to read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use crate::clock::now_us;
use crate::measure::{latency, round2, Observer};
use crate::options::{Common, SearchArgs};
use crate::rest::{http, login, register_agents};
use crate::ws::{spawn_small, ws_open};
use crate::Res;

/// The searches, in turn: words of the flood's lines (trigram index), a word nobody wrote
/// (the index answers at once), two letters (below the index's three: a scan of the table),
/// and a level filter with a word.
const QUERIES: [&str; 4] = [
    "/api/messages?q=upstream&limit=50",
    "/api/messages?q=no-such-words-here&limit=50",
    "/api/messages?q=zq&limit=50",
    "/api/messages?q=timed%20out&level=INFO&limit=200",
];

/// Auth latencies (µs) of one phase: WebSocket handshakes and REST `/me`.
fn probe(c: &Common, token: &str, secs: f64) -> Res<(Vec<u32>, Vec<u32>)> {
    let (mut ws, mut rest) = (Vec::new(), Vec::new());
    let until = Instant::now() + std::time::Duration::from_secs_f64(secs);
    while Instant::now() < until {
        let t = now_us();
        let s = ws_open(c.addr, token)?;
        ws.push((now_us() - t) as u32);
        let _ = s.shutdown(std::net::Shutdown::Both);
        let t = now_us();
        let (status, body) = http(c.addr, "GET", "/api/users/me", Some(token), None)?;
        if status != 200 {
            return Err(format!("/api/users/me: HTTP {status}: {body}"));
        }
        rest.push((now_us() - t) as u32);
    }
    Ok((ws, rest))
}

pub fn run(c: &Common, a: &SearchArgs) -> Res<Value> {
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let agent = register_agents(c.addr, &jwt, &[format!("{}-sp", c.prefix)])?
        .pop()
        .ok_or("no agent registered")?;
    let secs = a.duration.as_secs_f64();

    let (quiet_ws, quiet_rest) = probe(c, &agent.token, secs)?;

    let stop = Arc::new(AtomicBool::new(false));
    let searches = Arc::new(AtomicU64::new(0));
    let per_query: Arc<Vec<Mutex<Vec<u32>>>> =
        Arc::new(QUERIES.iter().map(|_| Mutex::new(Vec::new())).collect());
    let observer = Observer::start(c, true);
    let mut searchers = Vec::new();
    for i in 0..a.searchers {
        let (stop, searches, per_query, jwt, addr) = (
            stop.clone(),
            searches.clone(),
            per_query.clone(),
            jwt.clone(),
            c.addr,
        );
        searchers.push(spawn_small(format!("search-{i}"), move || -> Res<()> {
            let mut k = i;
            while !stop.load(Relaxed) {
                let q = k % QUERIES.len();
                let t = now_us();
                let (status, body) = http(addr, "GET", QUERIES[q], Some(&jwt), None)?;
                if status != 200 {
                    return Err(format!("{}: HTTP {status}: {body}", QUERIES[q]));
                }
                per_query[q].lock().unwrap().push((now_us() - t) as u32);
                searches.fetch_add(1, Relaxed);
                k += 1;
            }
            Ok(())
        })?);
    }
    let busy = probe(c, &agent.token, secs);
    stop.store(true, Relaxed);
    for s in searchers {
        s.join().map_err(|_| "a searcher panicked")??;
    }
    let observed = observer.finish();
    let (busy_ws, busy_rest) = busy?;

    let p99 = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0) as f64
    };
    let ratio = |busy: &[u32], quiet: &[u32]| round2(p99(busy) / p99(quiet).max(1.0));
    let queries: serde_json::Map<String, Value> = QUERIES
        .iter()
        .zip(per_query.iter())
        .map(|(q, v)| (q.to_string(), latency(v.lock().unwrap().clone())))
        .collect();
    Ok(json!({
        "scenario": "search",
        "searchers": a.searchers,
        "phase_s": secs,
        "searches": searches.load(Relaxed),
        "searches_per_s": round2(searches.load(Relaxed) as f64 / secs),
        "quiet": {"ws_auth": latency(quiet_ws.clone()), "rest_auth": latency(quiet_rest.clone())},
        "searching": {"ws_auth": latency(busy_ws.clone()), "rest_auth": latency(busy_rest.clone())},
        "p99_ratio_searching_to_quiet": {"ws_auth": ratio(&busy_ws, &quiet_ws), "rest_auth": ratio(&busy_rest, &quiet_rest)},
        "search_latency": Value::Object(queries),
        "observed": observed,
    }))
}
