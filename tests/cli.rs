//! The command line for shell scripts (SPEC section 5) and start-up configuration errors
//! (SPEC section 1), against the real binary.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;

/// Variables that would change the binary's configuration if inherited from the test runner.
const CONFIG_VARS: &[&str] = &[
    "ECHOCENTER_ADDR",
    "ECHOCENTER_DB",
    "ECHOCENTER_ENV",
    "ECHOCENTER_JWT_SECRET",
    "ECHOCENTER_JWT_TTL",
    "ECHOCENTER_ADMIN_USER",
    "ECHOCENTER_ADMIN_PASSWORD",
    "ECHOCENTER_MAX_MESSAGE_BYTES",
    "ECHOCENTER_MAX_CONNECTIONS",
    "ECHOCENTER_ALLOWED_ORIGINS",
    "ECHOCENTER_MAX_FRAMES_PER_SECOND",
    "ECHOCENTER_METRICS_TOKEN",
    "ECHOCENTER_LOG",
    "SERVER_HOST",
    "SERVER_PORT",
    "APP_ENV",
    "DB_PATH",
    "JWT_SECRET",
    "JWT_TOKEN_EXPIRATION",
    "INITIAL_ADMIN_USER",
    "INITIAL_ADMIN_PASS",
];

fn command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for var in CONFIG_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary to completion (within 30 s), feeding `stdin`. A `serve` that starts
/// listening is killed at once, so a configuration error that is not caught fails fast.
/// (`serve` goes through here, not `Server::start*`, only where the start must fail or only
/// `--help` is read: the harness fails without "listening on".)
fn run(args: &[&str], envs: &[(&str, &str)], stdin: &str) -> Output {
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    let mut child = command(args, envs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run echocenter");
    {
        let mut input = child.stdin.take().unwrap();
        let _ = input.write_all(stdin.as_bytes());
    }
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (buf, reader)
    };
    let (out, out_reader) = collect(Box::new(child.stdout.take().unwrap()));
    let (err, err_reader) = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let listening = String::from_utf8_lossy(&out.lock().unwrap()).contains("listening on");
        if listening || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let s = child.wait().unwrap();
            assert!(listening, "{args:?} did not exit within 30 s");
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    out_reader.join().unwrap();
    err_reader.join().unwrap();
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `echocenter <args> --db <db> --create`; asserts success. (Tests make their database on
/// first use; `a_missing_database_is_refused_without_create` pins the rule.)
fn ok(args: &[&str], db: &Path, stdin: &str) -> Output {
    let db = db_arg(db);
    let mut all = args.to_vec();
    all.extend(["--db", db.as_str(), "--create"]);
    let o = run(&all, &[], stdin);
    assert!(
        o.status.success(),
        "{all:?} failed: {}\nstdout: {}",
        stderr(&o),
        stdout(&o)
    );
    o
}

/// `echocenter <args> --db <db>`; asserts a non-zero exit with an explanation on stderr and
/// nothing on stdout. Returns stderr.
fn fails(args: &[&str], db: &Path, stdin: &str) -> String {
    fails_with(args, db, stdin).1
}

/// As `fails`; returns the exit status too.
fn fails_with(args: &[&str], db: &Path, stdin: &str) -> (i32, String) {
    let db = db_arg(db);
    let mut all = args.to_vec();
    all.extend(["--db", db.as_str(), "--create"]);
    let o = run(&all, &[], stdin);
    assert!(!o.status.success(), "{all:?} should fail: {}", stdout(&o));
    assert!(!stderr(&o).trim().is_empty(), "{all:?}: empty stderr");
    assert!(
        stdout(&o).trim().is_empty(),
        "{all:?}: stdout {:?}",
        stdout(&o)
    );
    (o.status.code().unwrap_or(-1), stderr(&o))
}

fn is_generated_token(t: &str) -> bool {
    t.len() == 67
        && t.starts_with("ec_")
        && t[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The single line a token-printing subcommand writes.
fn token_line(o: &Output) -> String {
    let out = stdout(o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout: {out:?}");
    assert!(out.ends_with('\n'));
    let token = lines[0].to_string();
    assert!(is_generated_token(&token), "{token:?}");
    token
}

fn new_db() -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    let db = dir.path().join("echocenter.db");
    (dir, db)
}

fn me(s: &Server, token: &str) -> (u16, serde_json::Value) {
    let r = s.get("/api/users/me", token);
    let v = serde_json::from_str(&r.body).unwrap_or_default();
    (r.status, v)
}

#[test]
fn agent_add_prints_only_a_token_that_the_server_accepts() {
    let (dir, db) = new_db();
    let o = ok(
        &["agent", "add", "Observer", "--description", "watches"],
        &db,
        "",
    );
    let token = token_line(&o);
    assert!(
        !stderr(&o).contains(&token),
        "the token is printed once, on stdout"
    );

    let s = Server::start_on(dir, db, &[], &[]);
    let (status, v) = me(&s, &token);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["username"], "Observer");
    assert_eq!(v["role"], "AGENT");
    assert_eq!(v["description"], "watches");
    let admin = s.admin_token();
    let listed = s.get("/api/users/agents", &admin).json();
    assert_eq!(listed[1]["username"], "Observer");
    assert_eq!(
        listed[1]["token_hint"],
        format!("{}...{}", &token[..4], &token[63..])
    );
}

#[test]
fn agent_add_creates_the_database_and_its_directory_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    if skip_on_postgres("the SQLite file, its directory and its mode") {
        return;
    }
    let dir = TempDir::new();
    let db = dir.path().join("nested").join("deeper").join("ec.db");
    let o = ok(&["agent", "add", "bot"], &db, "");
    token_line(&o);
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database mode {mode:o}");
}

#[test]
fn agent_list_shows_agents_and_the_butler_without_raw_tokens() {
    let (_dir, db) = new_db();
    let t1 = token_line(&ok(&["agent", "add", "Observer"], &db, ""));
    let t2 = token_line(&ok(&["agent", "add", "Guardian"], &db, ""));
    let o = ok(&["agent", "list"], &db, "");
    let out = stdout(&o);
    for name in ["Butler", "Observer", "Guardian"] {
        assert!(out.contains(name), "{name} missing: {out}");
    }
    assert!(
        out.contains(&format!("{}...{}", &t1[..4], &t1[63..])),
        "{out}"
    );
    assert!(
        !out.contains(&t1) && !out.contains(&t2),
        "raw tokens listed: {out}"
    );
    assert!(!out.contains("admin "), "humans are not agents: {out}");

    ok(&["agent", "remove", "Guardian"], &db, "");
    let out = stdout(&ok(&["agent", "list"], &db, ""));
    assert!(!out.contains("Guardian"), "{out}");
    assert!(out.contains("Observer"), "{out}");
}

#[test]
fn agent_rotate_and_remove_take_effect_on_a_running_server() {
    let (dir, db) = new_db();
    let first = token_line(&ok(&["agent", "add", "bot"], &db, ""));
    let s = Server::start_on(dir, db.clone(), &[], &[]);
    assert_eq!(me(&s, &first).0, 200);

    let second = token_line(&ok(&["agent", "rotate", "bot"], &db, ""));
    assert_ne!(first, second);
    // REST checks the database on every request: no waiting needed.
    let (status, v) = me(&s, &first);
    assert_eq!((status, v["error"].clone()), (401, json!("invalid token")));
    let (status, v) = me(&s, &second);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["username"], "bot");

    // The Butler can be rotated too.
    let butler = token_line(&ok(&["agent", "rotate", "Butler"], &db, ""));
    assert_eq!(me(&s, &butler).1["role"], "BUTLER");

    let o = ok(&["agent", "remove", "bot"], &db, "");
    assert!(
        stdout(&o).trim().is_empty(),
        "remove prints no token: {}",
        stdout(&o)
    );
    assert_eq!(me(&s, &second).0, 401);
    let admin = s.admin_token();
    let listed = s.get("/api/users/agents", &admin).json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // The name stays reserved.
    let r = s.post("/api/users/agents", &admin, json!({"username": "bot"}));
    assert_eq!(
        (r.status, r.error()),
        (409, "username already exists".into())
    );
}

#[test]
fn user_add_reads_the_password_from_stdin() {
    let (dir, db) = new_db();
    let o = ok(
        &["user", "add", "alice", "--role", "MEMBER"],
        &db,
        "s3cret-pass\n",
    );
    assert!(stdout(&o).trim().is_empty(), "{}", stdout(&o));
    assert!(
        !stderr(&o).contains("s3cret-pass"),
        "password echoed: {}",
        stderr(&o)
    );
    ok(
        &["user", "add", "root2", "--role", "admin"],
        &db,
        "root-pass-2",
    );

    let s = Server::start_on(dir, db.clone(), &[], &[]);
    let r = s.login("alice", "s3cret-pass");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["role"], "MEMBER");
    assert_eq!(
        s.login("alice", "s3cret-pass\n").status,
        401,
        "the newline is not part of it"
    );
    let r = s.login("root2", "root-pass-2");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["role"], "ADMIN");

    // While the server runs, too.
    ok(&["user", "add", "bob", "--role", "MEMBER"], &db, "bob-pass");
    assert_eq!(s.login("bob", "bob-pass").status, 200);
}

#[test]
fn cli_errors_go_to_stderr_with_a_non_zero_exit() {
    let (_dir, db) = new_db();
    token_line(&ok(&["agent", "add", "bot"], &db, ""));

    let err = fails(&["agent", "add", "bot"], &db, "");
    assert!(err.contains("username already exists"), "{err}");
    let err = fails(&["agent", "add", "admin"], &db, "");
    assert!(err.contains("username already exists"), "{err}");
    let err = fails(&["agent", "rotate", "ghost"], &db, "");
    assert!(err.contains("ghost"), "names the agent: {err}");
    fails(&["agent", "remove", "ghost"], &db, "");
    fails(&["agent", "rotate", "admin"], &db, "");
    fails(&["agent", "remove", "admin"], &db, "");
    fails(&["agent", "remove", "Butler"], &db, "");
    fails(&["agent", "add", "bad name"], &db, "");
    fails(&["agent", "add"], &db, "");
    fails(&["agent", "frobnicate", "bot"], &db, "");

    let err = fails(&["user", "add", "carol"], &db, "pw\n");
    assert!(err.contains("--role"), "{err}");
    fails(&["user", "add", "carol", "--role", "AGENT"], &db, "pw\n");
    fails(&["user", "add", "carol", "--role", "MEMBER"], &db, "");
    let err = fails(
        &["user", "add", "bot", "--role", "MEMBER"],
        &db,
        "long-enough-pw\n",
    );
    assert!(err.contains("username already exists"), "{err}");

    // None of the failures changed anything.
    let out = stdout(&ok(&["agent", "list"], &db, ""));
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "Butler and bot only: {out}");
    let s = Server::start_on(TempDir::new(), db, &[], &[]);
    assert_eq!(s.login("carol", "pw").status, 401);
}

/// Starts `serve` with a bad setting; it must exit non-zero, naming the setting on stderr.
fn serve_rejects(extra: &[&str], envs: &[(&str, &str)], name: &str) {
    let (_dir, db) = new_db();
    let db = db_arg(&db);
    let mut args = vec!["serve", "--addr", "127.0.0.1:0", "--db", db.as_str()];
    args.extend(extra);
    let o = run(&args, envs, "");
    assert!(
        !o.status.success(),
        "{args:?} {envs:?} started anyway: {}",
        stdout(&o)
    );
    assert!(
        !stdout(&o).contains("listening on"),
        "{args:?} {envs:?}: {}",
        stdout(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains(name),
        "{args:?} {envs:?}: stderr does not name {name}: {err}"
    );
}

#[test]
fn invalid_configuration_is_a_startup_error_naming_the_variable_or_flag() {
    serve_rejects(&[], &[("ECHOCENTER_JWT_TTL", "1d")], "ECHOCENTER_JWT_TTL");
    serve_rejects(&["--max-connections", "lots"], &[], "--max-connections");
    serve_rejects(&[], &[("JWT_SECRET", "short")], "JWT_SECRET");
    serve_rejects(
        &["--jwt-secret", "only-31-bytes-long-xxxxxxxxxxxx"],
        &[],
        "--jwt-secret",
    );
    serve_rejects(&[], &[("ECHOCENTER_ENV", "staging")], "ECHOCENTER_ENV");
    serve_rejects(&["--jwt-ttl", "soon"], &[], "--jwt-ttl");
    serve_rejects(
        &[],
        &[("JWT_TOKEN_EXPIRATION", "24")],
        "JWT_TOKEN_EXPIRATION",
    );
    serve_rejects(
        &[],
        &[("ECHOCENTER_MAX_CONNECTIONS", "-1")],
        "ECHOCENTER_MAX_CONNECTIONS",
    );
    serve_rejects(&["--log", "verbose"], &[], "--log");
    serve_rejects(
        &["--allowed-origins", "ops.example.com"],
        &[],
        "--allowed-origins",
    );
}

#[test]
fn invalid_upstream_address_is_a_startup_error() {
    let (_dir, db) = new_db();
    let db = db_arg(&db);
    let o = run(
        &["serve", "--db", db.as_str()],
        &[("SERVER_HOST", "127.0.0.1"), ("SERVER_PORT", "http")],
        "",
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SERVER_PORT"), "{}", stderr(&o));
}

#[test]
fn subcommands_reject_bad_configuration_too() {
    let (_dir, db) = new_db();
    let db = db_arg(&db);
    let o = run(
        &["agent", "add", "bot", "--db", db.as_str()],
        &[("ECHOCENTER_JWT_TTL", "1d")],
        "",
    );
    assert!(!o.status.success());
    assert!(stdout(&o).trim().is_empty());
    assert!(stderr(&o).contains("ECHOCENTER_JWT_TTL"), "{}", stderr(&o));
}

/// The JWT lifetime a server issues, from a fresh admin login.
fn ttl_of(s: &Server) -> i64 {
    use base64::Engine;
    let token = s.admin_token();
    let claims = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap()
}

#[test]
fn configuration_precedence_flag_then_echocenter_var_then_upstream_name() {
    let s = Server::start_with(
        &["--jwt-ttl", "1h"],
        &[
            ("ECHOCENTER_JWT_TTL", "garbage"),
            ("JWT_TOKEN_EXPIRATION", "garbage"),
        ],
    );
    assert_eq!(
        ttl_of(&s),
        3600,
        "flag wins; overridden values are not parsed"
    );
    let s = Server::start_with(
        &[],
        &[
            ("ECHOCENTER_JWT_TTL", "1h30m"),
            ("JWT_TOKEN_EXPIRATION", "garbage"),
        ],
    );
    assert_eq!(ttl_of(&s), 5400);
    let s = Server::start_with(&[], &[("JWT_TOKEN_EXPIRATION", "90s")]);
    assert_eq!(ttl_of(&s), 90);
    // Upstream admin names.
    let s = Server::start_with(
        &[],
        &[
            ("INITIAL_ADMIN_USER", "boss"),
            ("INITIAL_ADMIN_PASS", "boss-pass-1"),
        ],
    );
    let r = s.login("boss", "boss-pass-1");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["id"], 1);
    assert_eq!(s.login("admin", "admin123").status, 401);
}

#[test]
fn no_arguments_means_serve_configured_from_the_environment() {
    if skip_on_postgres("checks that the SQLite file ECHOCENTER_DB names is created") {
        return;
    }
    let dir = TempDir::new();
    let db = dir.path().join("from-env.db");
    let mut child = command(
        &[],
        &[
            ("ECHOCENTER_ADDR", "127.0.0.1:0"),
            ("ECHOCENTER_DB", db.to_str().unwrap()),
        ],
    )
    .current_dir(dir.path())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("echocenter with no arguments serves");
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");
    assert!(db.exists(), "the database from ECHOCENTER_DB was created");
    assert!(
        !dir.path().join("echocenter.db").exists(),
        "not the default path"
    );
}

#[test]
fn bootstrap_passwords_development_warns_production_prints_a_random_one() {
    let s = Server::start();
    let err = s.stderr();
    assert!(
        err.contains("admin123"),
        "development warning names the password: {err}"
    );
    s.admin_token();

    let s = Server::start_with(&["--env", "production"], &[]);
    assert_eq!(s.login("admin", "admin123").status, 401);
    let err = s.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("password"))
        .unwrap_or_else(|| panic!("no password line on stderr: {err}"));
    let password = line
        .split_whitespace()
        .skip_while(|w| *w != "password")
        .nth(1)
        .unwrap_or_else(|| panic!("cannot find the password in {line:?}"));
    let r = s.login("admin", password);
    assert_eq!(
        r.status, 200,
        "printed password {password:?} does not log in: {}",
        r.body
    );
}

// ----- issue 12: a first run that works, and the command line as scripts use it ---------

#[test]
fn a_missing_database_is_refused_without_create() {
    // (PostgreSQL: a database that does not exist fails to connect, also with exit 3; see
    // tests/postgres.rs.)
    if skip_on_postgres("a missing SQLite file and --create") {
        return;
    }
    let dir = TempDir::new();
    let typo = dir.path().join("no-such-dir").join("x.db");
    let typo_arg = db_arg(&typo);
    for args in [
        vec!["agent", "list"],
        vec!["agent", "add", "bot"],
        vec!["user", "list"],
        vec!["prune"],
    ] {
        let mut all = args.clone();
        all.extend(["--db", typo_arg.as_str()]);
        let o = run(&all, &[], "");
        assert_eq!(o.status.code(), Some(3), "{all:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--create"), "{}", stderr(&o));
        assert!(stdout(&o).is_empty());
    }
    assert!(!typo.parent().unwrap().exists(), "nothing was created");
    // With --create it is made (and bootstrapped).
    ok(&["agent", "list"], &typo, "");
    assert!(typo.exists());
}

#[test]
fn help_is_there_for_every_command() {
    let o = run(&["help"], &[], "");
    assert!(o.status.success());
    assert!(stdout(&o).contains("echocenter agent add NAME"));
    for (args, needle) in [
        (vec!["help", "agent"], "agent rotate NAME"),
        (vec!["agent", "--help"], "agent rotate NAME"),
        (vec!["help", "user"], "user passwd NAME"),
        (vec!["user", "disable", "--help"], "user passwd NAME"),
        (vec!["serve", "--help"], "--retain-logs"),
        (vec!["--help"], "echocenter help [COMMAND]"),
        (vec!["help", "backup"], "online backup"),
        (vec!["help", "prune"], "--retain-chat"),
    ] {
        let o = run(&args, &[], "");
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains(needle), "{args:?}: {}", stdout(&o));
    }
    // The serve help shows defaults.
    let serve = stdout(&run(&["serve", "--help"], &[], ""));
    assert!(
        serve.contains("0.0.0.0:8080") && serve.contains("30d"),
        "{serve}"
    );
    // A command group alone explains itself (usage, exit 2).
    let o = run(&["agent"], &[], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("agent add NAME"), "{}", stderr(&o));
}

#[test]
fn exit_codes_match_the_curl_twins() {
    let (_dir, db) = new_db();
    token_line(&ok(&["agent", "add", "bot"], &db, ""));
    assert_eq!(fails_with(&["agent", "add", "bot"], &db, "").0, 5);
    assert_eq!(fails_with(&["agent", "rotate", "ghost"], &db, "").0, 6);
    assert_eq!(fails_with(&["user", "remove", "ghost"], &db, "").0, 6);
    assert_eq!(fails_with(&["agent", "frobnicate"], &db, "").0, 2);
    assert_eq!(
        fails_with(&["user", "add", "eve"], &db, "pw-long-enough\n").0,
        2
    );
    assert_eq!(fails_with(&["agent", "add", "bad name"], &db, "").0, 1);
    // The last admin cannot go.
    let (code, err) = fails_with(&["user", "disable", "admin"], &db, "");
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("last admin"), "{err}");
}

#[test]
fn lists_come_as_json_too_with_status() {
    let (_dir, db) = new_db();
    let token = token_line(&ok(
        &["agent", "add", "bot", "--description", "d1"],
        &db,
        "",
    ));
    let rows: serde_json::Value =
        serde_json::from_str(&stdout(&ok(&["agent", "list", "--json"], &db, ""))).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Butler", "bot"]);
    assert_eq!(rows[1]["status"], "OFFLINE");
    assert_eq!(rows[1]["last_seen_at"], serde_json::Value::Null);
    assert!(!rows.to_string().contains(&token));
    // Online while the server holds its connection; the database says so.
    let s = Server::start_on(TempDir::new(), db.clone(), &[], &[]);
    let ws = s.ws(&token);
    let online = || {
        let rows: serde_json::Value =
            serde_json::from_str(&stdout(&ok(&["agent", "list", "--json"], &db, ""))).unwrap();
        rows[1].clone()
    };
    s.wait_for(
        "the database to show bot online",
        Duration::from_secs(10),
        || online()["status"] == "ONLINE",
    );
    assert!(
        online()["last_seen_at"].is_string(),
        "last seen is the connect time"
    );
    let table = stdout(&ok(&["agent", "list"], &db, ""));
    assert!(table.lines().next().unwrap().contains("STATUS"), "{table}");
    assert!(table.contains("ONLINE"), "{table}");
    ws.close();
    s.wait_for("offline in the database", Duration::from_secs(10), || {
        online()["status"] == "OFFLINE"
    });
    let users: serde_json::Value =
        serde_json::from_str(&stdout(&ok(&["user", "list", "--json"], &db, ""))).unwrap();
    assert_eq!(users[0]["username"], "admin");
    assert_eq!(users[0]["role"], "ADMIN");
    assert_eq!(users[0]["disabled"], false);
}

#[test]
fn users_are_managed_from_the_command_line_and_the_server_follows() {
    let (_dir, db) = new_db();
    ok(
        &["user", "add", "carol", "--role", "MEMBER"],
        &db,
        "carol-pass-1\n",
    );
    // Too short for development's 8-character rule.
    let err = fails(&["user", "add", "dan", "--role", "MEMBER"], &db, "short\n");
    assert!(err.contains("at least 8"), "{err}");
    let s = Server::start_on(
        TempDir::new(),
        db.clone(),
        &["--ws-ping-interval", "200ms", "--ws-idle-timeout", "2s"],
        &[],
    );
    let carol = s.token_for("carol", "carol-pass-1");
    let mut ws = s.ws(&carol);
    // A new password from the command line: the old JWT stops working, the session closes
    // within one liveness tick.
    ok(&["user", "passwd", "carol"], &db, "carol-pass-2\n");
    assert_eq!(s.get("/api/users/me", &carol).status, 401);
    assert_eq!(ws.recv_close(), Some(1008));
    let carol = s.token_for("carol", "carol-pass-2");
    ok(&["user", "disable", "carol"], &db, "");
    assert_eq!(s.get("/api/users/me", &carol).status, 401);
    assert_eq!(s.login("carol", "carol-pass-2").status, 403);
    ok(&["user", "enable", "carol"], &db, "");
    let carol = s.token_for("carol", "carol-pass-2");
    ok(&["user", "remove", "carol"], &db, "");
    assert_eq!(s.get("/api/users/me", &carol).status, 401);
    assert_eq!(s.login("carol", "carol-pass-2").status, 401);
    // The name stays reserved.
    assert_eq!(
        fails_with(
            &["user", "add", "carol", "--role", "MEMBER"],
            &db,
            "carol-pass-3\n"
        )
        .0,
        5
    );
}

/// Every flag the configuration reads is in `serve --help` (the two test-only flags apart)
/// and in README's configuration table, so a new flag cannot ship undocumented.
#[test]
fn every_server_flag_is_in_serve_help_and_in_the_readme() {
    let source = std::fs::read_to_string("src/config.rs").unwrap();
    let readme = std::fs::read_to_string("README.md").unwrap();
    let help = stdout(&run(&["serve", "--help"], &[], ""));
    let mut flags: Vec<&str> = source
        .split('"')
        .filter(|s| {
            s.starts_with("--")
                && s.len() > 2
                && s[2..].bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        })
        .collect();
    flags.sort_unstable();
    flags.dedup();
    assert!(flags.len() > 20, "flags found in src/config.rs: {flags:?}");
    for flag in flags {
        let test_only = matches!(flag, "--conformance-echo" | "--fault-injection");
        assert!(
            test_only || help.contains(&format!("  {flag} ")),
            "{flag} is missing from `serve --help`:\n{help}"
        );
        assert!(
            readme.contains(&format!("`{flag}`")),
            "{flag} is missing from README's configuration table"
        );
    }
}
