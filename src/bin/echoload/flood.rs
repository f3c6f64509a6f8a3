//! `flood`: N agents send SYSTEM_LOG lines as fast as the server takes them, a fixed number
//! each, while the database file (and its WAL) is measured: what retention and the per-agent
//! budgets hold the disk to under a flood (issue 12). Run the server with its per-sender
//! limits raised (`--max-log-bytes-per-second`, `--max-frames-per-second`) to push an hour's
//! worth of the defaults' maximum through in a minute or two; the retention rules are what
//! the run measures, and they are the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::measure::{count_into, fetch_metrics, merge_counts, round2, Observer};
use crate::options::{Common, FloodArgs};
use crate::rest::{login, register_agents};
use crate::ws::{is_timeout, open_all_ok, send_json, shutdown_all, spawn_small, split, text_of};
use crate::Res;

/// Words for the log lines: text like a log's (the trigram index of random bytes would be
/// far larger than a real one's, and of one repeated word far smaller).
const WORDS: [&str; 32] = [
    "backup",
    "disk",
    "usage",
    "at",
    "percent",
    "on",
    "volume",
    "sda1",
    "job",
    "finished",
    "in",
    "ms",
    "retry",
    "connection",
    "to",
    "upstream",
    "timed",
    "out",
    "after",
    "request",
    "served",
    "status",
    "200",
    "cache",
    "miss",
    "for",
    "key",
    "user",
    "session",
    "renewed",
    "queue",
    "depth",
];

/// The content of line `seq` of agent `agent`: `bytes` long, words chosen by a small LCG.
fn line(agent: usize, seq: u64, bytes: usize) -> String {
    let mut s = format!("fl {agent} {seq}");
    let mut x = seq
        .wrapping_mul(6364136223846793005)
        .wrapping_add(agent as u64 | 1);
    while s.len() < bytes {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push(' ');
        s.push_str(WORDS[(x >> 59) as usize]);
    }
    s.truncate(bytes);
    s
}

/// Bytes of the database file and its WAL.
fn db_bytes(db: &Path) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    (size(db), size(&PathBuf::from(wal)))
}

fn mib(b: u64) -> f64 {
    round2(b as f64 / (1 << 20) as f64)
}

fn pruned(c: &Common) -> BTreeMap<String, f64> {
    c.metrics_token
        .as_deref()
        .and_then(|t| fetch_metrics(c.addr, t))
        .map(|m| {
            m.into_iter()
                .filter(|(k, _)| {
                    k.starts_with("echocenter_pruned_rows_total")
                        || k == "echocenter_stored_rows_total"
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn run(c: &Common, a: &FloodArgs) -> Res<Value> {
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-fl{i}", c.prefix))
        .collect();
    let agents = register_agents(c.addr, &jwt, &names)?;
    let tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let before = db_bytes(&a.db);
    let metrics_before = pruned(c);

    // Sample the file sizes while the flood runs, for the peak.
    let done = Arc::new(AtomicBool::new(false));
    let peak_total = Arc::new(AtomicU64::new(before.0 + before.1));
    let sampler = {
        let (done, peak, db, every) = (done.clone(), peak_total.clone(), a.db.clone(), a.sample);
        spawn_small("sampler".into(), move || {
            let mut peak_wal = 0;
            while !done.load(Relaxed) {
                let (main, wal) = db_bytes(&db);
                peak.fetch_max(main + wal, Relaxed);
                peak_wal = peak_wal.max(wal);
                std::thread::sleep(every);
            }
            peak_wal
        })?
    };

    let observer = Observer::start(c, true);
    let started = Instant::now();
    let mut ctls = Vec::new();
    let mut senders = Vec::new();
    for (i, s) in open_all_ok(c.addr, &tokens, "agent")?
        .into_iter()
        .enumerate()
    {
        let mut sp = split(s)?;
        ctls.push(sp.ctl.try_clone().map_err(|e| e.to_string())?);
        let acked = Arc::new(AtomicBool::new(false));
        let reader = {
            let acked = acked.clone();
            spawn_small(format!("flood-rx-{i}"), move || {
                let mut errors = BTreeMap::new();
                loop {
                    match sp.reader.read() {
                        Ok(m) => {
                            let Some(v) =
                                text_of(&m).and_then(|t| serde_json::from_str::<Value>(t).ok())
                            else {
                                continue;
                            };
                            if v["type"] == "ERROR" {
                                count_into(
                                    &mut errors,
                                    v["payload"]["code"].as_str().unwrap_or("?"),
                                );
                            } else if v["type"] == "ACK" && v["local_id"] == "last" {
                                acked.store(true, Relaxed);
                                break;
                            }
                        }
                        Err(e) if is_timeout(&e) => continue,
                        Err(_) => break,
                    }
                }
                errors
            })?
        };
        let (lines, bytes) = (a.lines, a.line_bytes);
        let mut writer = sp.writer;
        senders.push((
            spawn_small(format!("flood-tx-{i}"), move || -> Res<u64> {
                for seq in 0..lines {
                    let mut frame = json!({"type": "SYSTEM_LOG",
                        "payload": {"level": "INFO", "content": line(i, seq, bytes)}});
                    if seq + 1 == lines {
                        frame["local_id"] = json!("last");
                    }
                    send_json(&mut writer, &frame)?;
                }
                writer.flush().map_err(|e| e.to_string())?;
                Ok(lines)
            })?,
            reader,
            acked,
        ));
    }
    let mut sent = 0u64;
    let mut errors = BTreeMap::new();
    let mut unacked = 0;
    for (tx, rx, acked) in senders {
        sent += tx.join().map_err(|_| "a sender panicked")??;
        merge_counts(&mut errors, rx.join().map_err(|_| "a reader panicked")?);
        if !acked.load(Relaxed) {
            unacked += 1;
        }
    }
    let flood_s = started.elapsed().as_secs_f64();
    let observed = observer.finish();
    let right_after = db_bytes(&a.db);
    shutdown_all(&ctls);

    // Let the pruner's minute come round, then measure what the rules hold the disk to.
    let settle_until = Instant::now() + a.settle;
    while Instant::now() < settle_until {
        std::thread::sleep(Duration::from_millis(200));
    }
    done.store(true, Relaxed);
    let peak_wal = sampler.join().map_err(|_| "the sampler panicked")?;
    let settled = db_bytes(&a.db);
    let metrics_after = pruned(c);
    let delta: serde_json::Map<String, Value> = metrics_after
        .iter()
        .map(|(k, v)| {
            let short = k.trim_start_matches("echocenter_").replace('"', "");
            (
                short,
                json!(v - metrics_before.get(k).copied().unwrap_or(0.0)),
            )
        })
        .collect();

    let content_bytes = sent * a.line_bytes as u64;
    // The defaults' ceiling for one sender: 256 KiB/s of log content, 1000 frames/s.
    let per_agent_s = (a.line_bytes as f64 / 262_144.0).max(1.0 / 1000.0) * a.lines as f64;
    Ok(json!({
        "scenario": "flood",
        "agents": a.agents,
        "lines_per_agent": a.lines,
        "line_bytes": a.line_bytes,
        "sent": sent,
        "unacknowledged_agents": unacked,
        "errors": errors,
        "content_mib": mib(content_bytes),
        "flood_s": round2(flood_s),
        "hours_at_default_sender_limits": round2(per_agent_s / 3600.0),
        "db_mib_before": mib(before.0 + before.1),
        "db_mib_peak": mib(peak_total.load(Relaxed)),
        "wal_mib_peak": mib(peak_wal),
        "db_mib_after_flood": {"main": mib(right_after.0), "wal": mib(right_after.1)},
        "settle_s": a.settle.as_secs_f64(),
        "db_mib_settled": {"main": mib(settled.0), "wal": mib(settled.1)},
        "metrics": Value::Object(delta),
        "observed": observed,
    }))
}
