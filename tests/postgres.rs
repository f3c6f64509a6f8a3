//! The PostgreSQL backend where it differs from SQLite's: how it is selected (and which
//! `--db` values are refused), several processes on one database (migrations under the
//! advisory lock, one bootstrap, one JWT secret, `local_id` idempotency across processes),
//! the integration guide's direct query, and what it refuses (a file backup, a database that
//! does not exist). Everything else runs on both backends through the harness
//! (`ECHOCENTER_TEST_DB=postgres`; `scripts/test.sh` runs the suite both ways).

mod common;
use common::*;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// Tests that need the cluster return early (saying so) on a SQLite run.
fn cluster() -> bool {
    if !on_postgres() {
        eprintln!("skipped: needs PostgreSQL (scripts/test.sh runs this suite in pg_virtualenv)");
    }
    on_postgres()
}

/// Runs the binary to completion (at most 30 s) with the database variables cleared.
fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let here = TempDir::new();
    run_in(&here, args, envs)
}

/// As `run`, in the working directory `dir`.
fn run_in(dir: &TempDir, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "ECHOCENTER_DB",
        "DB_PATH",
        "DB_DRIVER",
        "DB_DSN",
        "PG_HOST",
        "PG_PORT",
        "PG_USER",
        "PG_PASSWORD",
        "PG_DATABASE",
        "PG_SSLMODE",
        "ECHOCENTER_ENV",
        "APP_ENV",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30));
    let mut out = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out.stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut out.stderr)
        .unwrap();
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn database_urls_we_do_not_serve_are_refused_at_start() {
    let dir = TempDir::new();
    for (args, envs, names) in [
        (vec!["--db", "mysql://app:pw@db/echo"], vec![], "--db"),
        (vec!["--db", "sqlite://./echo.db"], vec![], "--db"),
        (
            vec![],
            vec![("ECHOCENTER_DB", "mysql://db/echo")],
            "ECHOCENTER_DB",
        ),
        (vec![], vec![("DB_DRIVER", "mysql")], "DB_DRIVER"),
        (
            vec!["--db", "postgres://app:pw@db/echo?sslmode=require"],
            vec![],
            "--db",
        ),
        (
            vec![],
            vec![("DB_DRIVER", "postgres"), ("PG_SSLMODE", "verify-full")],
            "PG_SSLMODE",
        ),
    ] {
        let mut all = vec!["serve", "--addr", "127.0.0.1:0"];
        all.extend(&args);
        let o = run_in(&dir, &all, &envs);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{all:?} {envs:?}: {err}");
        assert!(err.contains(names), "{all:?} {envs:?}: {err}");
        assert!(!err.contains(":pw@"), "the password is shown: {err}");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("listening on"),
            "{all:?}"
        );
    }
    // Nothing was made in the working directory (the old behaviour: a directory "mysql:").
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn several_servers_starting_at_once_on_a_fresh_database_all_come_up() {
    if !cluster() {
        return;
    }
    let dir = TempDir::new();
    let db = dir.path().join("shared");
    db_arg(&db); // the empty database, before the servers race to migrate it
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || Server::start_on(TempDir::new(), db, &[], &[]))
        })
        .collect();
    let servers: Vec<Server> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    // Each migration applied once, one admin and one Butler, one JWT secret for all.
    let migrations = std::fs::read_dir("sql/postgres").unwrap().count() as i64;
    assert_eq!(
        query_i64(&db, "SELECT COUNT(*) FROM migrations"),
        migrations
    );
    assert_eq!(query_i64(&db, "SELECT COUNT(*) FROM users"), 2);
    let jwt = servers[0].admin_token();
    for s in &servers {
        let me = s.get("/api/users/me", &jwt);
        assert_eq!(me.status, 200, "{}", me.body);
        assert_eq!(me.json()["id"], 1);
    }
    // And a restart finds everything in place.
    let again = Server::start_on(TempDir::new(), db.clone(), &[], &[]);
    assert_eq!(again.get("/api/users/me", &jwt).status, 200);
}

#[test]
fn a_retried_local_id_on_another_process_is_stored_once_with_the_first_id() {
    if !cluster() {
        return;
    }
    let dir = TempDir::new();
    let db = dir.path().join("shared");
    let a = Server::start_on(TempDir::new(), db.clone(), &[], &[]);
    let b = Server::start_on(TempDir::new(), db.clone(), &[], &[]);
    let admin = a.admin_token();
    let (_, token) = a.register_agent(&admin, "retrier");

    // Stored through one, retried through the other: the same id, one row.
    let mut on_a = a.ws(&token);
    on_a.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "once", "local_id": "r-1"}));
    let first = on_a.recv_type("ACK");
    let mut on_b = b.ws(&token);
    on_b.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "once", "local_id": "r-1"}));
    let retry = on_b.recv_type("ACK");
    assert_eq!(retry["id"], first["id"], "{first} / {retry}");
    assert_eq!(retry["timestamp"], first["timestamp"]);
    // Logs too.
    on_a.send_json(json!({"type": "SYSTEM_LOG", "payload": "up", "local_id": "l-1"}));
    let log_first = on_a.recv_type("ACK");
    on_b.send_json(json!({"type": "SYSTEM_LOG", "payload": "up", "local_id": "l-1"}));
    assert_eq!(on_b.recv_type("ACK")["id"], log_first["id"]);

    // Both at once, many times: whichever commits second finds the first's row (the
    // ON CONFLICT path), and each key is stored once.
    let frames = |tag: &str| -> Vec<Value> {
        (0..40)
            .map(|i| json!({"type": "CHAT", "target_id": 1, "payload": tag, "local_id": format!("race-{i}")}))
            .collect()
    };
    on_a.send_burst(&frames("via a"));
    on_b.send_burst(&frames("via b"));
    let acks = |ws: &mut Ws| -> Vec<(String, i64)> {
        (0..40)
            .map(|_| {
                let ack = ws.recv_type("ACK");
                (
                    ack["local_id"].as_str().unwrap().to_string(),
                    ack["id"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let mut from_a = acks(&mut on_a);
    let mut from_b = acks(&mut on_b);
    from_a.sort();
    from_b.sort();
    assert_eq!(
        from_a, from_b,
        "both processes answer with the stored row's id"
    );
    assert_eq!(
        query_i64(
            &db,
            "SELECT COUNT(*) FROM chat_messages WHERE local_id LIKE 'race-%' OR local_id = 'r-1'"
        ),
        41
    );
    assert_eq!(
        query_i64(&db, "SELECT COUNT(*) FROM messages WHERE local_id = 'l-1'"),
        1
    );
}

#[test]
fn the_guides_direct_query_of_users_and_machine_credentials_works_in_psql() {
    if !cluster() {
        return;
    }
    let s = Server::start();
    let admin = s.admin_token();
    let (id, token) = s.register_agent(&admin, "guide-bot");
    // "If using PostgreSQL, query the same fields from users/machine_credentials."
    let out = Command::new("psql")
        .arg(s.db_arg())
        .args(["-X", "-t", "-A", "-F", "|", "-c"])
        .arg(
            "SELECT u.id, u.username, u.role, m.api_token, m.token_hint
             FROM users u JOIN machine_credentials m ON m.user_id = u.id
             WHERE u.username = 'guide-bot'",
        )
        .output()
        .expect("psql (PostgreSQL's client) is installed with the server");
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hint = format!("{}...{}", &token[..4], &token[token.len() - 4..]);
    assert_eq!(line, format!("{id}|guide-bot|AGENT|{token}|{hint}"));
}

#[test]
fn a_file_backup_is_refused_with_a_pointer_to_pg_dump() {
    if !cluster() {
        return;
    }
    let s = Server::start();
    let target = s.dir.path().join("copy.db");
    let o = run(
        &["backup", target.to_str().unwrap(), "--db", &s.db_arg()],
        &[],
    );
    let err = stderr(&o);
    // Exit 1: "any other error" in the command line's exit statuses (`echocenter help`).
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("pg_dump"), "{err}");
    assert!(!target.exists());
    let password = std::env::var("PGPASSWORD").unwrap_or_default();
    assert!(
        password.is_empty() || !err.contains(&password),
        "the password is shown: {err}"
    );
}

#[test]
fn a_database_that_does_not_exist_is_unreachable_and_the_password_never_shows() {
    if !cluster() {
        return;
    }
    // Our harness makes databases on demand; this one it never made.
    let url = pg_url("echocenter_no_such_database");
    let o = run(&["agent", "list", "--db", &url], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("echocenter_no_such_database"), "{err}");
    let password = std::env::var("PGPASSWORD").unwrap_or_default();
    assert!(
        password.is_empty() || !err.contains(&password),
        "the password is shown: {err}"
    );
    // A running server logs its database without the password too.
    let s = Server::start();
    s.admin_token();
    let log = s.stderr();
    assert!(log.contains("postgres://"), "{log}");
    assert!(
        password.is_empty() || !log.contains(&password),
        "the password is in the log: {log}"
    );
}

#[test]
fn the_originals_db_driver_and_pg_variables_reach_the_database() {
    if !cluster() {
        return;
    }
    let dir = TempDir::new();
    let path = dir.path().join("upstream");
    let url = db_arg(&path);
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let name = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    let envs = [
        ("DB_DRIVER", "postgres".to_string()),
        ("PG_HOST", var("PGHOST", "localhost")),
        ("PG_PORT", var("PGPORT", "5432")),
        ("PG_USER", var("PGUSER", "postgres")),
        ("PG_PASSWORD", var("PGPASSWORD", "")),
        ("PG_DATABASE", name),
        ("PG_SSLMODE", "disable".to_string()),
    ];
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let o = run(&["agent", "add", "upstream-bot"], &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    // DB_DSN, the original's other way, finds the same database.
    let o = run(
        &["agent", "list", "--json"],
        &[("DB_DRIVER", "postgresql"), ("DB_DSN", &url)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let listed = String::from_utf8_lossy(&o.stdout);
    assert!(listed.contains("upstream-bot"), "{listed}");
}

#[test]
fn the_server_carries_on_after_its_database_connections_are_cut() {
    if !cluster() {
        return;
    }
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "survivor");
    let mut agent = s.ws(&token);
    agent
        .send_json(json!({"type": "CHAT", "target_id": 1, "payload": "before", "local_id": "c-1"}));
    let before = agent.recv_type("ACK")["id"].as_i64().unwrap();

    // Every pooled client and the writer's lose their connections at once.
    let cut = pg_cut_connections(&s.db);
    assert!(cut >= 7, "the server's connections: {cut}");
    // Reads: each client finds its connection gone at its next statement and runs it again
    // on a new one. Administrative writes check first.
    assert_eq!(s.get("/api/users/me", &admin).status, 200);
    assert_eq!(s.login("admin", "admin123").status, 200);
    let (_, other) = s.register_agent(&admin, "newcomer");
    assert_eq!(s.get("/api/users/me", &other).status, 200);
    // The writer: its next batch's BEGIN finds the connection gone, and the batch goes on a
    // new one. Nothing is lost or stored twice.
    agent.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "after", "local_id": "c-2"}));
    let after = agent.recv_type("ACK")["id"].as_i64().unwrap();
    assert!(after > before);
    let history = s
        .get(&format!("/api/chat/history/{agent_id}"), &admin)
        .json();
    let payloads: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["payload"])
        .collect();
    assert_eq!(payloads, vec![&json!("before"), &json!("after")]);
}
