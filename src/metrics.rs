//! Counters for `GET /metrics` (Prometheus text format). Plain atomics: counting must never
//! slow down or block the path it counts.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::identity::Role;
use crate::wire::{Code, Kind};

/// Limits that refuse or close something, by name.
pub const LIMITS: &[&str] = &[
    "max_connections",
    "max_connections_per_ip",
    "user_connections",
    "head_too_large",
    "head_timeout",
    "head_deadline_shortened",
    "login_busy",
    "bridge_busy",
    "searches_busy",
    "response_memory",
    "log_rate_limited",
    "fragment_flood",
    "body_timeout",
    "body_malformed",
    "body_too_large",
    "send_timeout",
    "auth_throttled",
    "message_too_large",
    "login_rate_limited",
    "frame_rate_limited",
    "consecutive_errors",
    "ping_timeout",
];

#[derive(Default)]
pub struct Metrics {
    pub connections: [AtomicI64; 4],
    pub frames_in: [AtomicU64; Kind::ALL.len()],
    pub frames_out: [AtomicU64; Kind::ALL.len()],
    pub errors: [AtomicU64; Code::ALL.len()],
    pub limits: [AtomicU64; LIMITS.len()],
    pub slow_consumer_closes: AtomicU64,
    pub auth_failures: AtomicU64,
    pub accept_errors: AtomicU64,
    pub http_requests: AtomicU64,
    /// Request handlers that panicked (the worker survives; the request gets 500).
    pub worker_panics: AtomicU64,
    /// Frames store and forward retired unsent (their senders were told).
    pub replay_retired: AtomicU64,
    /// Cross-node delivery: from a batch's commit on another node to its routing here
    /// (milliseconds; counts per bucket of `BUS_LATENCY_BUCKETS_MS`, and the sum).
    pub bus_latency_buckets: [AtomicU64; BUS_LATENCY_BUCKETS_MS.len()],
    pub bus_latency_count: AtomicU64,
    pub bus_latency_sum_ms: AtomicU64,
}

/// Upper bounds of the cross-node latency histogram's buckets.
pub const BUS_LATENCY_BUCKETS_MS: [u64; 9] = [1, 2, 5, 10, 20, 50, 100, 500, 2000];

fn role_index(role: Role) -> usize {
    match role {
        Role::Admin => 0,
        Role::Member => 1,
        Role::Agent => 2,
        Role::Butler => 3,
    }
}

impl Metrics {
    /// One batch from another node arrived `ms` after it committed there.
    pub fn bus_latency(&self, ms: u64) {
        if let Some(i) = BUS_LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.bus_latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.bus_latency_count.fetch_add(1, Relaxed);
        self.bus_latency_sum_ms.fetch_add(ms, Relaxed);
    }

    pub fn connection_opened(&self, role: Role) {
        self.connections[role_index(role)].fetch_add(1, Relaxed);
    }
    pub fn connection_closed(&self, role: Role) {
        self.connections[role_index(role)].fetch_sub(1, Relaxed);
    }
    pub fn frame_in(&self, kind: Kind) {
        self.frames_in[kind.index()].fetch_add(1, Relaxed);
    }
    pub fn frame_out(&self, kind: Kind) {
        self.frames_out[kind.index()].fetch_add(1, Relaxed);
    }
    pub fn error(&self, code: Code) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }
    pub fn limit(&self, name: &str) {
        if let Some(i) = LIMITS.iter().position(|c| *c == name) {
            self.limits[i].fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self, store: &crate::store::Store) -> String {
        let mut s = String::new();
        let roles = ["ADMIN", "MEMBER", "AGENT", "BUTLER"];
        s.push_str("# TYPE echocenter_connections gauge\n");
        for (i, r) in roles.iter().enumerate() {
            let _ = writeln!(
                s,
                "echocenter_connections{{role=\"{r}\"}} {}",
                self.connections[i].load(Relaxed)
            );
        }
        s.push_str("# TYPE echocenter_frames_in_total counter\n");
        for k in Kind::ALL {
            let _ = writeln!(
                s,
                "echocenter_frames_in_total{{type=\"{}\"}} {}",
                k.as_str(),
                self.frames_in[k.index()].load(Relaxed)
            );
        }
        s.push_str("# TYPE echocenter_frames_out_total counter\n");
        for k in Kind::ALL {
            let _ = writeln!(
                s,
                "echocenter_frames_out_total{{type=\"{}\"}} {}",
                k.as_str(),
                self.frames_out[k.index()].load(Relaxed)
            );
        }
        s.push_str("# TYPE echocenter_error_frames_total counter\n");
        for c in Code::ALL {
            let _ = writeln!(
                s,
                "echocenter_error_frames_total{{code=\"{}\"}} {}",
                c.as_str(),
                self.errors[c.index()].load(Relaxed)
            );
        }
        s.push_str("# TYPE echocenter_limit_trips_total counter\n");
        for (i, c) in LIMITS.iter().enumerate() {
            let _ = writeln!(
                s,
                "echocenter_limit_trips_total{{limit=\"{c}\"}} {}",
                self.limits[i].load(Relaxed)
            );
        }
        let simple = [
            (
                "echocenter_slow_consumer_closes_total",
                &self.slow_consumer_closes,
            ),
            ("echocenter_auth_failures_total", &self.auth_failures),
            ("echocenter_accept_errors_total", &self.accept_errors),
            ("echocenter_http_requests_total", &self.http_requests),
            ("echocenter_http_worker_panics_total", &self.worker_panics),
            ("echocenter_replay_retired_total", &self.replay_retired),
        ];
        for (name, v) in simple {
            let _ = writeln!(s, "# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        let st = store.stats();
        let commits = st.commits.load(Relaxed);
        let rows = st.rows.load(Relaxed);
        let _ = writeln!(s, "# TYPE echocenter_stored_rows_total counter");
        let _ = writeln!(s, "echocenter_stored_rows_total {rows}");
        let _ = writeln!(s, "# TYPE echocenter_db_commits_total counter");
        let _ = writeln!(s, "echocenter_db_commits_total {commits}");
        let _ = writeln!(s, "# TYPE echocenter_db_failed_commits_total counter");
        let _ = writeln!(
            s,
            "echocenter_db_failed_commits_total {}",
            st.failed_commits.load(Relaxed)
        );
        let _ = writeln!(s, "# TYPE echocenter_db_commit_seconds_total counter");
        let _ = writeln!(
            s,
            "echocenter_db_commit_seconds_total {:.6}",
            st.commit_micros_total.load(Relaxed) as f64 / 1e6
        );
        // Writes per commit, of every kind (a commit may carry only delivery flags).
        let _ = writeln!(s, "# TYPE echocenter_db_batch_size_avg gauge");
        let jobs = st.jobs.load(Relaxed);
        let avg = if commits == 0 {
            0.0
        } else {
            jobs as f64 / commits as f64
        };
        let _ = writeln!(s, "echocenter_db_batch_size_avg {avg:.2}");
        let _ = writeln!(s, "# TYPE echocenter_pruned_rows_total counter");
        for (table, rule, v) in [
            ("messages", "age", &st.pruned_logs_by_age),
            ("messages", "budget", &st.pruned_logs_by_budget),
            ("chat_messages", "age", &st.pruned_chat_by_age),
        ] {
            let _ = writeln!(
                s,
                "echocenter_pruned_rows_total{{table=\"{table}\",rule=\"{rule}\"}} {}",
                v.load(Relaxed)
            );
        }
        if let Some(cluster) = store.cluster() {
            let bus = cluster.stats();
            let _ = writeln!(
                s,
                "# TYPE echocenter_bus_listener_reconnects_total counter\n\
                 echocenter_bus_listener_reconnects_total {}\n\
                 # TYPE echocenter_bus_notifications_total counter\n\
                 echocenter_bus_notifications_total {}\n\
                 # TYPE echocenter_bus_notification_queue_usage gauge\n\
                 echocenter_bus_notification_queue_usage {:.6}",
                bus.listener_reconnects.load(Relaxed),
                bus.notifications.load(Relaxed),
                bus.queue_usage_ppm.load(Relaxed) as f64 / 1e6,
            );
            let _ = writeln!(s, "# TYPE echocenter_bus_delivery_seconds histogram");
            let mut cumulative = 0;
            for (i, b) in BUS_LATENCY_BUCKETS_MS.iter().enumerate() {
                cumulative += self.bus_latency_buckets[i].load(Relaxed);
                let _ = writeln!(
                    s,
                    "echocenter_bus_delivery_seconds_bucket{{le=\"{}\"}} {cumulative}",
                    *b as f64 / 1000.0
                );
            }
            let count = self.bus_latency_count.load(Relaxed);
            let _ = writeln!(
                s,
                "echocenter_bus_delivery_seconds_bucket{{le=\"+Inf\"}} {count}\n\
                 echocenter_bus_delivery_seconds_sum {:.3}\n\
                 echocenter_bus_delivery_seconds_count {count}",
                self.bus_latency_sum_ms.load(Relaxed) as f64 / 1000.0
            );
        }
        s
    }
}
