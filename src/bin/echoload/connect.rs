//! `connect`: N idle agent connections held for a while; connect rate, failures, and the
//! server's memory before and after (`--server-pid`) → KiB per idle connection.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::measure::{count_into, round2, server_rss, smaps, Observer, Smaps};
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
    let maps_before = smaps(c.server_pid, a.server_stack_kib);
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
    let maps_held = smaps(c.server_pid, a.server_stack_kib);
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
        if let (Some(mb), Some(mh), true) = (maps_before, maps_held, n_ok > 0) {
            out["memory_per_conn"] = memory_per_conn(&mb, &mh, (b.1, h.1), n_ok, a);
        }
    }
    Ok(out)
}

/// What one idle connection costs the server, from its mappings before the connections were
/// opened and at the end of the hold: the differences divided by the connections held. The
/// three `_kib` parts add up to `rss_kib` (smaps' own sum, close to VmRSS's `kib_per_conn`).
fn memory_per_conn(
    before: &Smaps,
    held: &Smaps,
    threads: (u64, u64),
    n: usize,
    a: &ConnectArgs,
) -> Value {
    let per = |b: u64, h: u64| round2((h as f64 - b as f64) / n as f64);
    let heap_other = |m: &Smaps| m.anon_kib.saturating_sub(m.stack_rss_kib);
    let not_anon = |m: &Smaps| m.rss_kib.saturating_sub(m.anon_kib);
    json!({
        // Resident pages of the per-connection thread stacks (mappings of --server-stack-kib).
        "stack_kib": per(before.stack_rss_kib, held.stack_rss_kib),
        // Every other anonymous resident page: the malloc heap and arenas (buffers, queues,
        // the registry's entries), and anything else private.
        "heap_other_anon_kib": per(heap_other(before), heap_other(held)),
        // File-backed and shared resident pages (the binary, libraries): ~0 per connection.
        "file_shared_kib": per(not_anon(before), not_anon(held)),
        "rss_kib": per(before.rss_kib, held.rss_kib),
        // New stack mappings: below the thread count when glibc reused cached stacks.
        "stack_mappings": per(before.stacks, held.stacks),
        "threads": per(threads.0, threads.1),
        "maps": per(before.maps, held.maps),
        "stack_size_kib": a.server_stack_kib,
    })
}
