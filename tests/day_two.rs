//! Issue #12, day two: retention, backups, human accounts, refusals the operator can see,
//! search, health. Against the real binary; time travel through the test-only
//! `ECHOCENTER_CLOCK_OFFSET`, never a sleep of minutes.
mod common;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

const METRICS: &str = "day-two-metrics-token";

fn metric(s: &Server, name: &str) -> f64 {
    let r = s.get("/metrics", METRICS);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}", r.body))
}

/// `echocenter <args>` on a database, with the given environment; returns the output.
fn cli(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for var in [
        "ECHOCENTER_ENV",
        "APP_ENV",
        "ECHOCENTER_DB",
        "DB_PATH",
        "ECHOCENTER_CLOCK_OFFSET",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn list(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}"))
}

fn log_contents(s: &Server, jwt: &str) -> Vec<String> {
    list(&s.get("/api/messages?limit=200", jwt).json())
        .iter()
        .map(|r| r["content"].as_str().unwrap().to_string())
        .collect()
}

// ----- retention --------------------------------------------------------------------------

#[test]
fn retention_removes_exactly_what_is_past_its_window() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "reporter");
    let (away_id, _) = s.register_agent(&admin, "away");
    for i in 0..5 {
        let r = s.post(
            "/api/messages",
            &token,
            json!({"content": format!("old {i}")}),
        );
        assert_eq!(r.status, 201);
    }
    let mut h = s.ws(&admin);
    // A delivered chat (the agent is online) and an undelivered one (the agent is away).
    let mut a = s.ws(&token);
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "delivered"}));
    a.recv_type("CHAT");
    h.send_json(json!({"type": "CHAT", "target_id": away_id, "payload": "undelivered"}));
    h.recv_until(|v| v["payload"] == "undelivered", "the echo");
    s.wait_for("the delivery mark", Duration::from_secs(5), || {
        history(&s, &admin, agent_id)
            .first()
            .is_some_and(|r| r["delivery"] == "delivered")
    });
    drop(a);
    drop(h);
    let thread_time = |s: &Server, admin: &str| -> Value {
        list(
            &s.get(&format!("/api/chat/threads?peer_id={agent_id}"), admin)
                .json(),
        )[0]["last_message_at"]
            .clone()
    };
    let sent_at = history(&s, &admin, agent_id)[0]["timestamp"].clone();
    assert_eq!(thread_time(&s, &admin), sent_at);

    // Three days later, with a one-day chat window, the background pruner (its first pass
    // runs a second after the start): the delivered row goes; the undelivered one stays for
    // store and forward's 7 days; logs (30 days) stay.
    let s = s.restart(
        &["--retain-chat", "1d"],
        &[("ECHOCENTER_CLOCK_OFFSET", "3d")],
    );
    let admin = s.admin_token();
    s.wait_for(
        "the delivered chat to be pruned",
        Duration::from_secs(10),
        || history(&s, &admin, agent_id).is_empty(),
    );
    // Its thread still says when it last had a message.
    assert_eq!(thread_time(&s, &admin), sent_at);
    assert_eq!(history(&s, &admin, away_id).len(), 1);
    assert_eq!(log_contents(&s, &admin).len(), 5);
    let (_dir, db) = s.stop_keeping_data();
    let db = db_arg(&db);

    // By hand. Eight days on, the undelivered row is past store and forward's window too.
    let prune = |offset: &str, extra: &[&str]| -> Value {
        let mut args = vec!["prune", "--json", "--db", db.as_str()];
        args.extend(extra);
        let out = cli(&args, &[("ECHOCENTER_CLOCK_OFFSET", offset)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        prune("8d", &["--retain-chat", "1d"]),
        json!({"logs_by_age": 0, "logs_by_budget": 0, "chat_by_age": 1})
    );
    // 31 days on, the logs (30 days) go, and nothing else is left.
    assert_eq!(
        prune("31d", &[]),
        json!({"logs_by_age": 5, "logs_by_budget": 0, "chat_by_age": 0})
    );
    assert_eq!(
        prune("400d", &[]),
        json!({"logs_by_age": 0, "logs_by_budget": 0, "chat_by_age": 0})
    );
}

fn history(s: &Server, jwt: &str, peer: i64) -> Vec<Value> {
    list(&s.get(&format!("/api/chat/history/{peer}"), jwt).json()).clone()
}

#[test]
fn zero_keeps_for_ever() {
    let s = Server::start_with(&["--retain-logs", "0"], &[]);
    let admin = s.admin_token();
    s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "a", "content": "keep me"}),
    );
    let s = s.restart(
        &["--retain-logs", "0"],
        &[("ECHOCENTER_CLOCK_OFFSET", "1000d")],
    );
    let admin = s.admin_token();
    // The first housekeeping runs within a second of the start; give it three.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(log_contents(&s, &admin), vec!["keep me"]);
}

#[test]
fn a_flooding_agent_is_held_to_its_log_budget_and_the_space_comes_back() {
    let s = Server::start_with(
        &[
            "--max-log-rows-per-agent",
            "500",
            "--max-log-bytes-per-second",
            "1073741824",
            "--max-frames-per-second",
            "100000",
            "--metrics-token",
            METRICS,
        ],
        &[],
    );
    let admin = s.admin_token();
    let (_, flood) = s.register_agent(&admin, "flood");
    let (_, calm) = s.register_agent(&admin, "calm");
    let r = s.post(
        "/api/messages",
        &calm,
        json!({"content": "the calm one's line"}),
    );
    assert_eq!(r.status, 201);
    let mut a = s.ws(&flood);
    let words = "disk usage on /var is nominal, backup of shard seven queued, ";
    for chunk in 0..40 {
        let frames: Vec<Value> = (0..250)
            .map(|i| {
                let line = format!("{chunk}-{i} {}", words.repeat(32));
                json!({"type": "SYSTEM_LOG", "payload": line, "local_id": format!("{chunk}-{i}")})
            })
            .collect();
        a.send_burst(&frames);
        for _ in 0..250 {
            a.recv_type("ACK");
        }
    }
    // 10,000 lines sent; the budget is 500 (trimmed to 95% when over).
    s.wait_for("the flood to be trimmed", Duration::from_secs(20), || {
        metric(
            &s,
            "echocenter_pruned_rows_total{table=\"messages\",rule=\"budget\"}",
        ) >= 9000.0
    });
    let kept = list(
        &s.get("/api/messages?agent_id=flood&limit=200&offset=400", &admin)
            .json(),
    )
    .len();
    assert!(kept <= 200, "{kept}");
    // The other agent's line is untouched.
    let calm_rows = s.get("/api/messages?agent_id=calm", &admin).json();
    assert_eq!(list(&calm_rows).len(), 1);
    if skip_on_postgres("the rest checks the size of the SQLite file and its WAL") {
        return;
    }
    // Pages went back to the file system: the file is far smaller than 10,000 × 2 KB.
    let size = std::fs::metadata(&s.db).unwrap().len()
        + std::fs::metadata(s.db.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(
        size < 20 << 20,
        "database and WAL hold {size} bytes, more than the 20 MB of lines sent"
    );
}

// ----- backups ----------------------------------------------------------------------------

#[test]
fn a_backup_under_load_restores_every_acknowledged_row() {
    // (PostgreSQL's backup refusal is tests/postgres.rs's.)
    if skip_on_postgres("SQLite's online backup to a file") {
        return;
    }
    let s = Server::start_with(&["--max-frames-per-second", "100000"], &[]);
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "busy");
    let mut a = s.ws(&token);
    let mut acked: Vec<i64> = Vec::new();
    let send = |a: &mut Ws, from: usize, n: usize| -> Vec<i64> {
        let frames: Vec<Value> = (from..from + n)
            .map(|i| json!({"type": "CHAT", "target_id": 1, "payload": i, "local_id": format!("b{i}")}))
            .collect();
        a.send_burst(&frames);
        (0..n)
            .map(|_| a.recv_type("ACK")["id"].as_i64().unwrap())
            .collect()
    };
    acked.extend(send(&mut a, 0, 300));
    // The backup runs while the agent keeps writing.
    let backup = s.dir.path().join("copy.db");
    let backup_arg = backup.to_str().unwrap().to_string();
    let db_arg = s.db.to_str().unwrap().to_string();
    let writer = {
        let token = token.clone();
        let s_addr = s.addr.clone();
        std::thread::spawn(move || {
            let stream = std::net::TcpStream::connect(&s_addr).unwrap();
            let (mut ws, _) = tungstenite::client(
                format!("ws://{s_addr}/api/ws?token={token}").as_str(),
                stream,
            )
            .unwrap();
            for i in 0..300 {
                let f = json!({"type": "CHAT", "target_id": 1, "payload": i, "local_id": format!("w{i}")});
                ws.send(tungstenite::Message::text(f.to_string())).unwrap();
            }
            let _ = ws.close(None);
        })
    };
    let out = cli(&["backup", &backup_arg, "--db", &db_arg], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    writer.join().unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // It refuses to overwrite.
    let out = cli(&["backup", &backup_arg, "--db", &db_arg], &[]);
    assert_eq!(out.status.code(), Some(5));
    // Restore: a fresh server on the copy has every row acknowledged before the backup.
    let restored = Server::start_on(TempDir::new(), backup.clone(), &[], &[]);
    let admin = restored.admin_token();
    let ids: Vec<i64> = list(
        &restored
            .get(&format!("/api/chat/history/{agent_id}?limit=500"), &admin)
            .json(),
    )
    .iter()
    .map(|r| r["id"].as_i64().unwrap())
    .collect();
    for id in &acked {
        assert!(
            ids.contains(id),
            "acknowledged row {id} missing from the restored copy"
        );
    }
    // And the restored server works: the agent's token still authenticates.
    assert_eq!(restored.get("/api/users/me", &token).status, 200);
}

// ----- human accounts ---------------------------------------------------------------------

#[test]
fn an_accounts_lifecycle_with_revoked_sessions_and_the_last_admin_rule() {
    let s = Server::start();
    let admin = s.admin_token();
    let (carol_id, carol) = s.create_human(&admin, "carol", "MEMBER");
    // The list: humans with roles and the disabled flag; admins only.
    let users = s.get("/api/users", &admin).json();
    let names: Vec<(&str, &str, bool)> = list(&users)
        .iter()
        .map(|u| {
            (
                u["username"].as_str().unwrap(),
                u["role"].as_str().unwrap(),
                u["disabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![("admin", "ADMIN", false), ("carol", "MEMBER", false)]
    );
    assert_eq!(s.get("/api/users", &carol).status, 403);
    // Disabling: no login, the JWT stops working, the live session closes at once.
    let mut ws = s.ws(&carol);
    let r = s.request(
        "PATCH",
        &format!("/api/users/{carol_id}"),
        Some(&admin),
        Some(r#"{"disabled":true}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["disabled"], true);
    assert_eq!(ws.recv_close(), Some(1008));
    assert_eq!(s.get("/api/users/me", &carol).status, 401);
    let r = s.login("carol", "pw-123456-long");
    assert_eq!((r.status, r.error()), (403, "account disabled".into()));
    let r = s.request(
        "PATCH",
        &format!("/api/users/{carol_id}"),
        Some(&admin),
        Some(r#"{"disabled":false}"#),
    );
    assert_eq!(r.status, 200);
    let carol = s.token_for("carol", "pw-123456-long");
    // A role change ends sessions too (the role a session was opened with no longer holds).
    let mut ws = s.ws(&carol);
    let r = s.request(
        "PATCH",
        &format!("/api/users/{carol_id}"),
        Some(&admin),
        Some(r#"{"role":"ADMIN"}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(ws.recv_close(), Some(1008));
    assert_eq!(s.get("/api/users/me", &carol).status, 401);
    let carol = s.token_for("carol", "pw-123456-long");
    assert_eq!(
        s.get("/api/users", &carol).status,
        200,
        "carol is an admin now"
    );
    // Her own password: the current one is checked, the new one must be long enough, and
    // the answer carries a fresh JWT while every older one stops working.
    let bad = s.post(
        "/api/users/me/password",
        &carol,
        json!({"current_password": "wrong-password", "new_password": "another-long-one"}),
    );
    assert_eq!(
        (bad.status, bad.error()),
        (401, "invalid credentials".into())
    );
    let short = s.post(
        "/api/users/me/password",
        &carol,
        json!({"current_password": "pw-123456-long", "new_password": "short"}),
    );
    assert_eq!(short.status, 400);
    assert!(short.error().contains("at least 8"), "{}", short.body);
    let same = s.post(
        "/api/users/me/password",
        &carol,
        json!({"current_password": "pw-123456-long", "new_password": "pw-123456-long"}),
    );
    assert_eq!(
        (same.status, same.error()),
        (400, "new password must differ from the current one".into())
    );
    // The form can know the rule: /me tells a human the shortest password accepted.
    let me = s.get("/api/users/me", &carol).json();
    assert_eq!(me["password_min_length"], 8, "{me}");
    let fresh = s.change_password(&carol, "pw-123456-long", "another-long-one");
    assert_eq!(s.get("/api/users/me", &carol).status, 401);
    assert_eq!(s.get("/api/users/me", &fresh).status, 200);
    // The last-admin rule and not-yourself.
    let r = s.request("DELETE", "/api/users/1", Some(&admin), None);
    assert_eq!(
        (r.status, r.error()),
        (400, "cannot remove yourself".into())
    );
    let r = s.request(
        "PATCH",
        "/api/users/1",
        Some(&admin),
        Some(r#"{"disabled":true}"#),
    );
    assert_eq!(
        (r.status, r.error()),
        (400, "cannot disable yourself".into())
    );
    let r = s.request(
        "DELETE",
        &format!("/api/users/{carol_id}"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.request(
        "PATCH",
        "/api/users/1",
        Some(&admin),
        Some(r#"{"role":"MEMBER"}"#),
    );
    assert_eq!(
        (r.status, r.error()),
        (409, "cannot remove the last admin".into())
    );
    // Removed: gone from the list, its JWT dead, its name reserved.
    assert_eq!(s.get("/api/users/me", &fresh).status, 401);
    assert_eq!(list(&s.get("/api/users", &admin).json()).len(), 1);
    let again = s.post(
        "/api/users",
        &admin,
        json!({"username": "carol", "password": "pw-123456-long", "role": "MEMBER"}),
    );
    assert_eq!(again.status, 409);
    // Agents are not humans; unknown ids are 404.
    let (agent_id, _) = s.register_agent(&admin, "robot");
    let r = s.request(
        "DELETE",
        &format!("/api/users/{agent_id}"),
        Some(&admin),
        None,
    );
    assert_eq!(
        (r.status, r.error()),
        (400, "target user is not a human".into())
    );
    let r = s.request("DELETE", "/api/users/999", Some(&admin), None);
    assert_eq!((r.status, r.error()), (404, "user not found".into()));
}

#[test]
fn passwords_must_be_12_characters_in_production_and_8_in_development() {
    let s = Server::start();
    let admin = s.admin_token();
    for (password, status) in [("1234567", 400), ("12345678", 201)] {
        let r = s.post(
            "/api/users",
            &admin,
            json!({"username": format!("u{}", password.len()), "password": password, "role": "MEMBER"}),
        );
        assert_eq!(r.status, status, "{password}: {}", r.body);
    }
    let s = Server::start_with(
        &[
            "--env",
            "production",
            "--admin-password",
            "a-production-secret",
        ],
        &[],
    );
    let admin = s.token_for("admin", "a-production-secret");
    for (password, status) in [("12345678901", 400), ("123456789012", 201)] {
        let r = s.post(
            "/api/users",
            &admin,
            json!({"username": format!("u{}", password.len()), "password": password, "role": "MEMBER"}),
        );
        assert_eq!(r.status, status, "{password}: {}", r.body);
        if status == 400 {
            assert!(r.error().contains("at least 12"), "{}", r.body);
        }
    }
    assert_eq!(
        s.get("/api/users/me", &admin).json()["password_min_length"],
        12
    );
    // Machines have no password: no rule in their /me.
    let (_, agent) = s.register_agent(&admin, "robot");
    let me = s.get("/api/users/me", &agent).json();
    assert!(me.get("password_min_length").is_none(), "{me}");
}

#[test]
fn a_production_start_refuses_the_development_password() {
    let (_dir, path) = Server::start().stop_keeping_data();
    let db = db_arg(&path);
    // By hand, not `Server::start*`: the harness waits for "listening on" and fails without
    // it, and here the start itself must fail, with what it printed checked.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--env",
            "production",
            "--addr",
            "127.0.0.1:0",
            "--db",
            &db,
        ])
        .env_remove("ECHOCENTER_ADMIN_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("development") && err.contains("user passwd admin"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    // Fixed as the message says, it starts.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "user",
        "passwd",
        "admin",
        "--db",
        &db,
        "--env",
        "production",
    ])
    .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a-production-password\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let s = Server::start_on(TempDir::new(), path, &["--env", "production"], &[]);
    assert_eq!(s.login("admin", "a-production-password").status, 200);
}

#[test]
fn a_start_that_cannot_listen_bootstraps_nothing_and_prints_no_password() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let dir = TempDir::new();
    let db = dir.path().join("e.db");
    // By hand, not `Server::start*`: this start must fail (the address is taken), and the
    // harness only knows starts that succeed.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--env",
            "production",
            "--addr",
            &taken,
            "--db",
            &db_arg(&db),
        ])
        .env_remove("ECHOCENTER_ADMIN_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "{err}");
    assert!(!err.contains("password"), "a password was printed: {err}");
    // The database has no users yet: the first start that can listen bootstraps.
    assert_eq!(query_i64(&db, "SELECT COUNT(*) FROM users"), 0);
}

/// A database upgraded by a newer build (it names a migration this build does not have) is
/// refused, by the server and the command line, rather than misread.
#[test]
fn a_database_from_a_newer_build_is_refused_with_a_way_out() {
    let (_dir, db) = Server::start().stop_keeping_data();
    execute_sql(
        &db,
        "INSERT INTO migrations (name, applied_at) VALUES ('999_from_the_future', '2030-01-01T00:00:00.000Z')",
    );
    let db = db_arg(&db);
    // By hand, not `Server::start*`: the start must fail.
    let serve = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--db", &db])
        .output()
        .unwrap();
    let list = Command::new(BIN)
        .args(["agent", "list", "--db", &db])
        .output()
        .unwrap();
    for (what, out) in [("serve", &serve), ("agent list", &list)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("newer EchoCenter (migration 999_from_the_future)")
                && err.contains("restore a backup"),
            "{what}: {err}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    }
    assert_eq!(
        list.status.code(),
        Some(3),
        "the database is unusable: exit 3"
    );
    assert!(!serve.status.success());
}

// ----- refusals the operator can see --------------------------------------------------------

#[test]
fn refusals_leave_one_warn_line_each_and_never_a_secret() {
    let s = Server::start_with(&["--allowed-origins", "https://ops.example.com"], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "watched");
    let bogus = "ec_this-is-not-a-real-token-0123456789";
    assert!(s.try_ws(bogus).is_err());
    assert_eq!(s.login("admin", "wrong-password-here").status, 401);
    assert_eq!(s.get("/api/users/me", bogus).status, 401);
    // A refused Origin: the body and the log say what was compared.
    let headers = vec![
        ("Upgrade".to_string(), "websocket".to_string()),
        ("Connection".to_string(), "Upgrade".to_string()),
        ("Sec-WebSocket-Version".to_string(), "13".to_string()),
        (
            "Sec-WebSocket-Key".to_string(),
            "dGhlIHNhbXBsZSBub25jZQ==".to_string(),
        ),
        ("Origin".to_string(), "https://evil.example.com".to_string()),
    ];
    let r = s.raw_request("GET", &format!("/api/ws?token={token}"), &headers, None);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["origin"], "https://evil.example.com");
    assert_eq!(r.json()["host"], s.addr.as_str());
    let log = s.stderr();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused:")).collect();
    assert!(
        refused
            .iter()
            .any(|l| l.contains("401 invalid credentials")),
        "{log}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("login") && l.contains("(user admin)")),
        "{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("401 invalid token")),
        "{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("403 origin not allowed")
            && l.contains("evil.example.com")
            && l.contains("(user watched)")),
        "{log}"
    );
    assert!(refused.iter().all(|l| l.contains("WARN")), "{log}");
    for secret in [bogus, token.as_str(), admin.as_str(), "wrong-password-here"] {
        assert!(!log.contains(secret), "a secret reached the log: {log}");
    }
}

#[test]
fn a_flood_of_refusals_cannot_fill_the_log() {
    let s = Server::start_with(&["--max-auth-failures", "100000"], &[]);
    for i in 0..300 {
        let _ = s.try_ws(&format!("nope-{i}-xxxxxxxxxxxxxxxxxxxxxx"));
    }
    let log = s.stderr();
    let lines = log.lines().filter(|l| l.contains("refused:")).count();
    assert!(
        (20..=45).contains(&lines),
        "{lines} refusal lines for 300 refusals:\n{log}"
    );
}

// ----- search -----------------------------------------------------------------------------

#[test]
fn the_indexed_search_finds_what_the_substring_rule_finds() {
    let s = Server::start();
    let admin = s.admin_token();
    let fixture = [
        "Disk /dev/sda1 at 91% capacity",
        "disk check passed",
        "Backup job #42 finished in 3m",
        "backup_job_43 queued",
        "user bob logged in",
        "BOBCAT deployment rolled back",
        "100% done, 0 errors",
        "the quick brown fox",
        "QUICKSTART guide updated",
        "ünïcödé line with ascii words",
    ];
    for line in fixture {
        let r = s.post(
            "/api/messages",
            &admin,
            json!({"agent_id": "fx", "content": line}),
        );
        assert_eq!(r.status, 201);
    }
    for q in [
        "disk",
        "DISK",
        "backup",
        "job",
        "bob",
        "quick",
        "100%",
        "_job_",
        "91%",
        "ascii w",
        "x",
        "er",
        "no such thing",
    ] {
        let mut want: Vec<&str> = fixture
            .iter()
            .copied()
            .filter(|l| l.to_ascii_lowercase().contains(&q.to_ascii_lowercase()))
            .collect();
        want.reverse(); // newest first
        let encoded: String = q
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let got = s
            .get(&format!("/api/messages?q={encoded}&limit=200"), &admin)
            .json();
        let got: Vec<&str> = list(&got)
            .iter()
            .map(|r| r["content"].as_str().unwrap())
            .collect();
        assert_eq!(got, want, "q={q:?}");
    }
}

// ----- health -----------------------------------------------------------------------------

#[test]
fn health_is_200_when_the_database_answers_and_503_when_writes_stall() {
    let s = Server::start();
    let r = s.request("GET", "/api/health", None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let mut body = r.json();
    if on_postgres() {
        // Among nodes, which one answered.
        assert!(body["node"].is_i64(), "{body}");
        body.as_object_mut().unwrap().remove("node");
    }
    assert_eq!(
        body,
        json!({"status": "ok", "database": "ok", "writer": "ok"})
    );
    if skip_on_postgres("the rest holds SQLite's write lock from another process") {
        return;
    }
    // Another process holds the write lock: the writer cannot commit.
    let blocker = rusqlite::Connection::open(&s.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let r = s.request("GET", "/api/health", None, None);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["status"], "unavailable");
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    s.wait_for("health to come back", Duration::from_secs(15), || {
        s.request("GET", "/api/health", None, None).status == 200
    });
}
