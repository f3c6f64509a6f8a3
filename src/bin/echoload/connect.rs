//! `connect`: N idle agent connections held for a while; connect rate, failures, and the
//! server's memory before and after (`--server-pid`) → KiB per idle connection.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::measure::{count_into, round2, server_rss, Observer};
use crate::options::{Common, ConnectArgs};
use crate::rest::{login, register_agents};
use crate::ws::{open_all, shutdown_all};
use crate::Res;

pub fn run(c: &Common, a: &ConnectArgs) -> Res<Value> {
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-c{i}", c.prefix))
        .collect();
    let reg_started = Instant::now();
    let agents = register_agents(c.addr, &jwt, &names)?;
    let register_s = reg_started.elapsed().as_secs_f64();
    std::thread::sleep(a.settle);
    let before = server_rss(c.server_pid);
    let observer = Observer::start(c, false);

    let tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let started = Instant::now();
    let results = open_all(c.addr, &tokens, started + a.max_connect);
    let connect_s = started.elapsed().as_secs_f64();
    let mut conns = Vec::new();
    let mut errors = BTreeMap::new();
    for r in results {
        match r {
            Ok(s) => conns.push(s),
            Err(e) => count_into(&mut errors, &e),
        }
    }
    note!(
        "{} of {} connected in {connect_s:.1}s; holding {:?}",
        conns.len(),
        a.agents,
        a.hold
    );
    std::thread::sleep(a.settle);
    let connected = server_rss(c.server_pid);
    // Hold, sampling the peak.
    let hold_end = Instant::now() + a.hold;
    let mut peak_rss = connected.map(|x| x.0).unwrap_or(0);
    while Instant::now() < hold_end {
        std::thread::sleep(
            Duration::from_millis(500).min(hold_end.saturating_duration_since(Instant::now())),
        );
        if let Some((rss, _)) = server_rss(c.server_pid) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let held = server_rss(c.server_pid);
    // Which connections survived the hold? An idle agent should get nothing at all.
    let (mut alive, mut dropped, mut with_data) = (0u64, 0u64, 0u64);
    for s in &conns {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 1];
        match s.peek(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => alive += 1,
            Ok(0) | Err(_) => dropped += 1,
            Ok(_) => {
                alive += 1;
                with_data += 1;
            }
        }
    }
    let server = observer.finish();
    shutdown_all(&conns);
    let n_ok = conns.len();
    drop(conns);
    std::thread::sleep(a.settle);
    let closed = server_rss(c.server_pid);

    let mut out = json!({
        "scenario": "connect",
        "agents": a.agents,
        "connected": n_ok,
        "failed": a.agents - n_ok,
        "failures": errors,
        "register_s": round2(register_s),
        "connect_s": round2(connect_s),
        "connects_per_s": round2(n_ok as f64 / connect_s.max(1e-3)),
        "hold_s": a.hold.as_secs_f64(),
        "alive_after_hold": alive,
        "dropped_during_hold": dropped,
        "conns_with_unexpected_data": with_data,
        "observed": server,
    });
    if let (Some(b), Some(h)) = (before, held) {
        out["server_rss_before_kib"] = json!(b.0);
        out["server_rss_connected_kib"] = json!(connected.map(|x| x.0));
        out["server_rss_held_kib"] = json!(h.0);
        out["server_rss_peak_kib"] = json!(peak_rss);
        out["server_rss_after_close_kib"] = json!(closed.map(|x| x.0));
        out["server_threads_before"] = json!(b.1);
        out["server_threads_held"] = json!(h.1);
        out["kib_per_conn"] = json!(if n_ok > 0 {
            round2(h.0.saturating_sub(b.0) as f64 / n_ok as f64)
        } else {
            0.0
        });
    }
    Ok(out)
}
