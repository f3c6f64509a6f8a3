//! Measurements: latency percentiles, readings of a process from /proc (CPU, RSS, threads,
//! per-thread run time), /metrics deltas, and the `Observer` that brackets a measured phase.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde_json::{json, Value};

use crate::options::Common;
use crate::rest::http;

/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ) on every common build.
const CLK_TCK: f64 = 100.0;

/// Latency percentiles in milliseconds from samples in microseconds.
pub fn latency(mut v: Vec<u32>) -> Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    v.sort_unstable();
    let at = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        ms(v[i] as u64)
    };
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1000.0;
    json!({
        "n": v.len(),
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": ms(*v.last().unwrap_or(&0) as u64),
        "mean_ms": (mean * 1000.0).round() / 1000.0,
    })
}

pub fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn count_into(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_insert(0) += 1;
}

pub fn merge_counts(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

/// One reading of a process from /proc.
struct ProcSample {
    ticks: u64,
    rss_kib: u64,
    threads: u64,
    /// Per thread: (thread group name, run time in ns). Only read when asked.
    tasks: BTreeMap<u32, (String, u64)>,
}

fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may contain spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// "ws-writer-123" → "ws-writer", "http-3" → "http": one group per kind of server thread.
fn thread_group(name: &str) -> String {
    let g = name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches('-');
    if g.is_empty() {
        name.to_string()
    } else {
        g.to_string()
    }
}

fn proc_sample(pid: &str, with_tasks: bool) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Per thread, the scheduler's own run time (schedstat, ns): per-thread utime/stime are
    // tick samples and under-count threads that run in short bursts.
    let mut tasks = BTreeMap::new();
    if with_tasks {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in dir.flatten() {
                let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let sched = std::fs::read_to_string(e.path().join("schedstat")).ok();
                let comm = std::fs::read_to_string(e.path().join("comm")).ok();
                let run_ns = sched
                    .as_deref()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
                if let (Some(ns), Some(comm)) = (run_ns, comm) {
                    tasks.insert(tid, (thread_group(comm.trim()), ns));
                }
            }
        }
    }
    Some(ProcSample {
        ticks: stat_ticks(&stat)?,
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        tasks,
    })
}

pub fn server_rss(pid: Option<u32>) -> Option<(u64, u64)> {
    let s = proc_sample(&pid?.to_string(), false)?;
    Some((s.rss_kib, s.threads))
}

/// What a process's memory mappings hold, summed from /proc/PID/smaps (KiB, as the kernel
/// counts them). Read twice around an event, the difference says what the event cost.
pub struct Smaps {
    /// Mappings (VMAs). A server thread has four (as seen on Linux/glibc): its stack and the
    /// guard page below it, and the signal stack and guard page Rust's runtime gives every
    /// thread. `vm.max_map_count` caps the total.
    pub maps: u64,
    /// Private anonymous rw mappings exactly one per-connection stack in size (the guard
    /// page is a separate mapping), and their resident KiB: the pages those threads touched.
    /// glibc keeps the stacks of ended threads (up to 40 MiB) for reuse, so on a server that
    /// already held connections some of these were there, and resident, before.
    pub stacks: u64,
    pub stack_rss_kib: u64,
    /// Resident KiB of every mapping, and of its anonymous pages (stacks included; the rest
    /// is the malloc heap and arenas, and other private memory).
    pub rss_kib: u64,
    pub anon_kib: u64,
}

pub fn smaps(pid: Option<u32>, stack_kib: u64) -> Option<Smaps> {
    let text = std::fs::read_to_string(format!("/proc/{}/smaps", pid?)).ok()?;
    let mut m = Smaps {
        maps: 0,
        stacks: 0,
        stack_rss_kib: 0,
        rss_kib: 0,
        anon_kib: 0,
    };
    let mut in_stack = false;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-') {
            // A mapping's header: "lo-hi perms offset dev inode [path]".
            let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
            else {
                continue;
            };
            let perms = it.next().unwrap_or("");
            let path = it.nth(3);
            m.maps += 1;
            in_stack = path.is_none() && perms == "rw-p" && (hi - lo) / 1024 == stack_kib;
            m.stacks += u64::from(in_stack);
            continue;
        }
        let kib = it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match first {
            "Rss:" => {
                m.rss_kib += kib;
                if in_stack {
                    m.stack_rss_kib += kib;
                }
            }
            "Anonymous:" => m.anon_kib += kib,
            _ => {}
        }
    }
    Some(m)
}

/// A thread's own CPU time since `start`, as % of one core over the same wall time: for the
/// threads that end before the Observer's last sample (their time leaves /proc with them).
pub struct ThreadBusy {
    wall: Instant,
    cpu_ns: Option<u64>,
}

impl ThreadBusy {
    pub fn start() -> ThreadBusy {
        ThreadBusy {
            wall: Instant::now(),
            cpu_ns: thread_cpu_ns(),
        }
    }

    pub fn pct(&self) -> Option<f64> {
        let used = thread_cpu_ns()?.saturating_sub(self.cpu_ns?);
        let wall = self.wall.elapsed().as_secs_f64().max(1e-3);
        Some(round2(used as f64 / 1e7 / wall))
    }
}

/// The calling thread's run time in ns (schedstat: the scheduler's own clock).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn fetch_metrics(addr: SocketAddr, token: &str) -> Option<BTreeMap<String, f64>> {
    let (status, body) = http(addr, "GET", "/metrics", Some(token), None).ok()?;
    if status != 200 {
        note!("GET /metrics: HTTP {status}");
        return None;
    }
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

/// What the server and this client spent while a scenario's measured phase ran.
pub struct Observer {
    addr: SocketAddr,
    pid: Option<String>,
    metrics_token: Option<String>,
    started: Instant,
    server: Option<ProcSample>,
    client: Option<ProcSample>,
    metrics: Option<BTreeMap<String, f64>>,
}

impl Observer {
    pub fn start(c: &Common, with_tasks: bool) -> Observer {
        let pid = c.server_pid.map(|p| p.to_string());
        Observer {
            addr: c.addr,
            server: pid.as_deref().and_then(|p| proc_sample(p, with_tasks)),
            client: proc_sample("self", false),
            metrics: c
                .metrics_token
                .as_deref()
                .and_then(|t| fetch_metrics(c.addr, t)),
            pid,
            metrics_token: c.metrics_token.clone(),
            started: Instant::now(),
        }
    }

    pub fn finish(self) -> Value {
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = |ticks: u64| round2(ticks as f64 / CLK_TCK / wall * 100.0);
        let mut out = json!({"wall_s": round2(wall)});
        let with_tasks = self.server.as_ref().is_some_and(|s| !s.tasks.is_empty());
        if let (Some(pid), Some(before)) = (&self.pid, &self.server) {
            if let Some(after) = proc_sample(pid, with_tasks) {
                out["server_cpu_pct"] = json!(pct(after.ticks.saturating_sub(before.ticks)));
                out["server_rss_kib"] = json!(after.rss_kib);
                out["server_threads"] = json!(after.threads);
                if with_tasks {
                    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
                    for (tid, (g, t)) in &after.tasks {
                        let b = before.tasks.get(tid).map(|x| x.1).unwrap_or(0);
                        *groups.entry(g.clone()).or_insert(0) += t.saturating_sub(b);
                    }
                    let groups: serde_json::Map<String, Value> = groups
                        .into_iter()
                        .filter(|(_, t)| *t > 0)
                        .map(|(g, ns)| (g, json!(round2(ns as f64 / 1e7 / wall))))
                        .collect();
                    out["server_cpu_pct_by_thread"] = Value::Object(groups);
                }
            }
        }
        if let (Some(before), Some(after)) = (&self.client, proc_sample("self", false)) {
            out["client_cpu_pct"] = json!(pct(after.ticks.saturating_sub(before.ticks)));
            out["client_rss_kib"] = json!(after.rss_kib);
            out["client_threads"] = json!(after.threads);
        }
        if let (Some(before), Some(token)) = (&self.metrics, &self.metrics_token) {
            if let Some(after) = fetch_metrics(self.addr, token) {
                out["metrics"] = metrics_delta(before, &after, wall);
            }
        }
        out
    }
}

fn metrics_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    wall: f64,
) -> Value {
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let commits = d("echocenter_db_commits_total");
    let rows = d("echocenter_stored_rows_total");
    let commit_s = d("echocenter_db_commit_seconds_total");
    let mut labelled = serde_json::Map::new();
    for (k, v) in after {
        let interesting = [
            "echocenter_frames_in_total",
            "echocenter_frames_out_total",
            "echocenter_error_frames_total",
            "echocenter_limit_trips_total",
            "echocenter_slow_consumer_closes_total",
            "echocenter_db_failed_commits_total",
        ]
        .iter()
        .any(|p| k.starts_with(p));
        let delta = v - before.get(k).copied().unwrap_or(0.0);
        if interesting && delta != 0.0 {
            let short = k.trim_start_matches("echocenter_").replace('"', "");
            labelled.insert(short, json!(delta));
        }
    }
    json!({
        "db_commits": commits,
        "db_rows": rows,
        "db_rows_per_commit": if commits > 0.0 { round2(rows / commits) } else { 0.0 },
        "db_commit_ms_avg": if commits > 0.0 { (commit_s / commits * 1e6).round() / 1000.0 } else { 0.0 },
        "db_commit_busy_pct": round2(commit_s * 100.0 / wall),
        "counters": Value::Object(labelled),
    })
}
