//! Issue #6, hostile conditions: `/metrics` is guarded by its own token, speaks the Prometheus
//! text format, and its counters move with what actually happened (auth failures, ERROR frames
//! by code, connections by role, frames by type, limit trips, slow-consumer closes).
mod common;
use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TOKEN: &str = "scrape-me-0123456789abcdef";

fn start() -> Server {
    Server::start_with(&["--metrics-token", TOKEN], &[])
}

/// One scrape, as `sample name with labels` → value.
fn scrape(s: &Server) -> HashMap<String, f64> {
    let r = s.get("/metrics", TOKEN);
    assert_eq!(r.status, 200, "{}", r.body);
    parse_prometheus(&r.body)
}

fn parse_prometheus(body: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        out.insert(name.to_string(), value);
    }
    out
}

fn get(m: &HashMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no sample {name} in {:?}", m.keys().collect::<Vec<_>>()))
}

/// Polls until the sample reaches `want` (counters are updated by server threads).
fn wait_metric(s: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(&scrape(s), name);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_is_404_without_a_metrics_token() {
    let s = Server::start();
    let admin = s.admin_token();
    for token in [None, Some(admin.as_str()), Some(TOKEN)] {
        let r = s.request("GET", "/metrics", token, None);
        assert_eq!(r.status, 404, "{}", r.body);
        assert_eq!(r.error(), "not found");
    }
}

#[test]
fn metrics_answers_only_its_token_with_prometheus_text() {
    let s = start();
    let admin = s.admin_token();
    let (_, agent) = s.register_agent(&admin, "scraped");
    let r = s.request("GET", "/metrics", None, None);
    assert_eq!(
        (r.status, r.error().as_str()),
        (401, "authorization header required")
    );
    for wrong in [
        "scrape-me-0123456789abcdeX",
        "scrape-me",
        &admin,
        &agent,
        "x",
    ] {
        let r = s.get("/metrics", wrong);
        assert_eq!(
            (r.status, r.error().as_str()),
            (401, "invalid token"),
            "{wrong}"
        );
    }
    let r = s.get("/metrics", TOKEN);
    assert_eq!(r.status, 200, "{}", r.body);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content type {ct:?}");
    // The text format: every sample belongs to a family declared by a `# TYPE` line.
    let mut families: HashMap<String, String> = HashMap::new();
    for line in r.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                matches!(
                    kind,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "{line}"
            );
            families.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            // A histogram's samples are its family's name plus _bucket, _sum or _count.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|f| families.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(
                families.contains_key(family),
                "sample without a # TYPE: {line}"
            );
        }
    }
    let m = parse_prometheus(&r.body);
    // What SPEC section 3 promises: connections by role, frames in/out by type, stored rows,
    // ERROR frames by code, slow-consumer closes, auth failures, commit latency and batch size.
    for role in ["ADMIN", "MEMBER", "AGENT", "BUTLER"] {
        get(&m, &format!("echocenter_connections{{role=\"{role}\"}}"));
    }
    for kind in ["SYSTEM_LOG", "CHAT", "ACK", "ERROR", "PRESENCE"] {
        get(
            &m,
            &format!("echocenter_frames_in_total{{type=\"{kind}\"}}"),
        );
        get(
            &m,
            &format!("echocenter_frames_out_total{{type=\"{kind}\"}}"),
        );
    }
    for code in [
        "bad_json",
        "bad_envelope",
        "unknown_type",
        "forbidden",
        "target_required",
        "target_not_found",
        "rate_limited",
        "internal",
    ] {
        get(
            &m,
            &format!("echocenter_error_frames_total{{code=\"{code}\"}}"),
        );
    }
    for name in [
        "echocenter_slow_consumer_closes_total",
        "echocenter_auth_failures_total",
        "echocenter_stored_rows_total",
        "echocenter_db_commit_seconds_total",
        "echocenter_db_batch_size_avg",
    ] {
        get(&m, name);
    }
    assert!(!r.body.contains(TOKEN), "the token is not echoed");
}

#[test]
fn counters_move_with_traffic() {
    let s = start();
    let admin = s.admin_token();
    let (agent_id, agent_token) = s.register_agent(&admin, "counted");
    let base = scrape(&s);
    let delta = |now: &HashMap<String, f64>, name: &str| get(now, name) - get(&base, name);

    // Auth failures: a bad login, a bad REST token, a bad WebSocket token.
    assert_eq!(s.login("admin", "wrong-password").status, 401);
    assert_eq!(s.get("/api/users/me", "ec_bogus-token-000").status, 401);
    assert!(s.try_ws("bogus-token-000").unwrap_err().starts_with("401"));
    let now = scrape(&s);
    assert_eq!(delta(&now, "echocenter_auth_failures_total"), 3.0);

    // Connections by role.
    let mut agent = s.ws(&agent_token);
    let mut human = s.ws(&admin);
    let now = scrape(&s);
    assert_eq!(get(&now, "echocenter_connections{role=\"AGENT\"}"), 1.0);
    assert_eq!(get(&now, "echocenter_connections{role=\"ADMIN\"}"), 1.0);
    assert_eq!(get(&now, "echocenter_connections{role=\"MEMBER\"}"), 0.0);

    // ERROR frames by code.
    let before = scrape(&s);
    agent.send_text("{not json");
    assert_eq!(agent.recv_type("ERROR")["payload"]["code"], "bad_json");
    agent.send_json(json!({"type": "teleport"}));
    assert_eq!(agent.recv_type("ERROR")["payload"]["code"], "unknown_type");
    agent.send_json(json!({"type": "PRESENCE"}));
    assert_eq!(agent.recv_type("ERROR")["payload"]["code"], "forbidden");
    let now = scrape(&s);
    let d = |name: &str| get(&now, name) - get(&before, name);
    assert_eq!(d("echocenter_error_frames_total{code=\"bad_json\"}"), 1.0);
    assert_eq!(
        d("echocenter_error_frames_total{code=\"unknown_type\"}"),
        1.0
    );
    assert_eq!(d("echocenter_error_frames_total{code=\"forbidden\"}"), 1.0);
    assert_eq!(
        d("echocenter_error_frames_total{code=\"bad_envelope\"}"),
        0.0
    );
    assert_eq!(d("echocenter_frames_out_total{type=\"ERROR\"}"), 3.0);

    // Frames in and out by type.
    let before = scrape(&s);
    agent.send_json(json!({"type": "SYSTEM_LOG", "payload": "counted log", "local_id": "c1"}));
    agent.recv_type("ACK");
    human.recv_type("SYSTEM_LOG");
    human.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "counted chat"}));
    agent.recv_type("CHAT");
    human.recv_type("CHAT"); // the echo
    let now = scrape(&s);
    let d = |name: &str| get(&now, name) - get(&before, name);
    assert_eq!(d("echocenter_frames_in_total{type=\"SYSTEM_LOG\"}"), 1.0);
    assert_eq!(d("echocenter_frames_out_total{type=\"SYSTEM_LOG\"}"), 1.0);
    assert_eq!(d("echocenter_frames_out_total{type=\"ACK\"}"), 1.0);
    assert_eq!(d("echocenter_frames_in_total{type=\"CHAT\"}"), 1.0);
    assert_eq!(d("echocenter_frames_out_total{type=\"CHAT\"}"), 2.0);
    assert!(
        d("echocenter_stored_rows_total") >= 2.0,
        "log and chat rows"
    );
    assert!(get(&now, "echocenter_db_commit_seconds_total") > 0.0);
    assert!(get(&now, "echocenter_db_batch_size_avg") > 0.0);

    // The gauge goes back down when connections end.
    agent.close();
    human.close();
    wait_metric(&s, "echocenter_connections{role=\"AGENT\"}", 0.0);
    wait_metric(&s, "echocenter_connections{role=\"ADMIN\"}", 0.0);
}

#[test]
fn limit_trips_are_counted() {
    let s = start();
    let base = scrape(&s);
    let limit = |m: &HashMap<String, f64>, name: &str| {
        get(
            m,
            &format!("echocenter_limit_trips_total{{limit=\"{name}\"}}"),
        )
    };
    // A request head over 8 KiB.
    let big = vec![("X-Padding".to_string(), "p".repeat(9 * 1024))];
    let r = s.raw_request("GET", "/api/ping", &big, None);
    assert_eq!(
        (r.status, r.error().as_str()),
        (431, "request header fields too large")
    );
    let now = scrape(&s);
    assert_eq!(
        limit(&now, "head_too_large") - limit(&base, "head_too_large"),
        1.0
    );
    // Ten failed logins, then the address is locked out.
    for i in 0..10 {
        let r = s.login("admin", &format!("wrong-{i}"));
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = s.login("admin", "admin123");
    assert_eq!(
        (r.status, r.error().as_str()),
        (429, "too many login attempts")
    );
    let now = scrape(&s);
    assert_eq!(
        limit(&now, "login_rate_limited") - limit(&base, "login_rate_limited"),
        1.0
    );
    assert_eq!(
        get(&now, "echocenter_auth_failures_total") - get(&base, "echocenter_auth_failures_total"),
        10.0
    );
}

#[test]
fn slow_consumer_closes_are_counted() {
    let s = Server::start_with(
        &[
            "--max-log-bytes-per-second",
            "1073741824",
            "--metrics-token",
            TOKEN,
            "--max-frames-per-second",
            "100000",
            "--sync",
            "normal",
        ],
        &[],
    );
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "flooder");
    let mut agent = s.ws(&token);
    // A human that never reads.
    let mut sleeper = s.ws(&admin);
    let content = "z".repeat(60 * 1024);
    let mut sent = 0;
    loop {
        assert!(sent < 1000, "60 MB flooded and nobody was closed");
        agent.send_json(
            json!({"type": "SYSTEM_LOG", "payload": content, "local_id": format!("f{sent}")}),
        );
        let ack = agent.recv_type("ACK");
        assert_eq!(ack["local_id"], format!("f{sent}"));
        sent += 1;
        if sent % 10 == 0 && get(&scrape(&s), "echocenter_slow_consumer_closes_total") > 0.0 {
            break;
        }
    }
    // More flooding closes nothing more: the slow consumer was closed once.
    for i in 0..20 {
        agent.send_json(
            json!({"type": "SYSTEM_LOG", "payload": "after", "local_id": format!("g{i}")}),
        );
        agent.recv_type("ACK");
    }
    let m = scrape(&s);
    assert_eq!(get(&m, "echocenter_slow_consumer_closes_total"), 1.0);
    assert_eq!(sleeper.recv_close(), Some(1013));
    // Answer the close, as a well-behaved client would; the connection is then gone.
    let _ = sleeper.inner.flush();
    wait_metric(&s, "echocenter_connections{role=\"ADMIN\"}", 0.0);
}
