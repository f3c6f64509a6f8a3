//! Test harness: starts the real `echocenter` binary on a free port with a temporary
//! database, and talks to it with real HTTP (a small client over `TcpStream`) and real
//! WebSocket (tungstenite) clients. Every wait is a wait-for-condition with a deadline, never
//! a sleep.
//!
//! The database is a SQLite file, or with `ECHOCENTER_TEST_DB=postgres` a PostgreSQL database
//! of its own in the cluster the libpq variables name (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`, as `pg_virtualenv` sets them): tests name a database by a file
//! path either way, and `db_arg` turns the path into what `--db` takes — the path itself, or
//! the URL of a database made for that path on first use (so a restart on the same path finds
//! the same data) and dropped with the test's `TempDir`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

pub const BIN: &str = env!("CARGO_BIN_EXE_echocenter");

/// The server binary the harness starts: this build's, or `ECHOCENTER_TEST_BIN` (to show that
/// a new test fails against an older build).
pub fn server_bin() -> String {
    std::env::var("ECHOCENTER_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}
static COUNTER: AtomicUsize = AtomicUsize::new(0);

// ----- the backend under test -------------------------------------------------------------

/// Whether this run's servers use PostgreSQL (`ECHOCENTER_TEST_DB=postgres`).
pub fn on_postgres() -> bool {
    std::env::var("ECHOCENTER_TEST_DB").is_ok_and(|v| v == "postgres")
}

/// For a test about the SQLite file itself: true (after a line saying why) when this run is
/// on PostgreSQL, and the test should return.
pub fn skip_on_postgres(why: &str) -> bool {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: {why}");
    }
    on_postgres()
}

/// What `--db` takes for the database at `path`: the path, or on PostgreSQL the URL of the
/// database made for it (made now, on first use).
pub fn db_arg(path: &Path) -> String {
    if !on_postgres() {
        return path.to_str().unwrap().to_string();
    }
    let mut made = PG_DATABASES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, name)) = made.iter().find(|(p, _)| p == path) {
        return pg_url(name);
    }
    let name = format!(
        "ect_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    pg_admin(&format!("CREATE DATABASE {name}"));
    made.push((path.to_path_buf(), name.clone()));
    pg_url(&name)
}

/// One number from the database at `path` (a file, or the PostgreSQL database made for it),
/// read directly, as an operator's query would.
pub fn query_i64(path: &Path, sql: &str) -> i64 {
    if on_postgres() {
        let mut client = postgres::Client::connect(&db_arg(path), postgres::NoTls).unwrap();
        client.query_one(sql, &[]).unwrap().get(0)
    } else {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }
}

/// Runs `sql` on the database at `path` (a file, or the PostgreSQL database made for it),
/// directly, as an operator would.
pub fn execute_sql(path: &Path, sql: &str) {
    if on_postgres() {
        let mut client = postgres::Client::connect(&db_arg(path), postgres::NoTls).unwrap();
        client.batch_execute(sql).unwrap();
    } else {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }
}

/// The databases made for paths, dropped with the directory that holds the path.
static PG_DATABASES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

fn pg_env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The cluster's maintenance database (where databases are made and dropped), from the
/// libpq variables.
fn pg_admin(sql: &str) {
    let mut config = postgres::Config::new();
    let host = pg_env("PGHOST", "localhost");
    if host.starts_with('/') {
        config.host_path(&host);
    } else {
        config.host(&host);
    }
    config
        .port(pg_env("PGPORT", "5432").parse().expect("PGPORT is a port"))
        .user(&pg_env("PGUSER", "postgres"))
        .password(pg_env("PGPASSWORD", ""))
        .dbname(&pg_env("PGDATABASE", "postgres"));
    let mut client = config
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot reach the PostgreSQL cluster of PGHOST/PGPORT: {e}"));
    client
        .batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Cuts every connection to the PostgreSQL database made for `path` (as an administrator's
/// pg_terminate_backend, or a database restart, would); returns how many there were.
pub fn pg_cut_connections(path: &Path) -> i64 {
    let url = db_arg(path);
    let name = url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .unwrap()
        .to_string();
    let mut client = postgres::Client::connect(&pg_url("postgres"), postgres::NoTls)
        .or_else(|_| {
            postgres::Client::connect(&pg_url(&pg_env("PGDATABASE", "postgres")), postgres::NoTls)
        })
        .unwrap();
    client
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// Cuts the bus listeners' connections to the database made for `path` (what an operator's
/// pg_terminate_backend, or a pooler restart, does to them); returns how many there were.
pub fn pg_terminate_listeners(path: &Path) -> i64 {
    let url = db_arg(path);
    let name = url
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .unwrap()
        .to_string();
    let mut client =
        postgres::Client::connect(&pg_url(&pg_env("PGDATABASE", "postgres")), postgres::NoTls)
            .unwrap();
    client
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'echocenter-bus-listener'",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// The URL of database `name` in the libpq variables' cluster.
pub fn pg_url(name: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let host = pg_env("PGHOST", "localhost");
    let port = pg_env("PGPORT", "5432");
    let auth = format!(
        "{}:{}",
        enc(&pg_env("PGUSER", "postgres")),
        enc(&pg_env("PGPASSWORD", ""))
    );
    if host.starts_with('/') {
        format!(
            "postgres://{auth}@/{name}?host={}&port={port}&sslmode=disable",
            enc(&host)
        )
    } else {
        format!("postgres://{auth}@{host}:{port}/{name}?sslmode=disable")
    }
}

/// Drops the databases made for paths under `dir`.
fn drop_databases_under(dir: &Path) {
    if !on_postgres() || dir.as_os_str().is_empty() {
        return;
    }
    let gone: Vec<String> = {
        let mut made = PG_DATABASES.lock().unwrap_or_else(|p| p.into_inner());
        let (under, rest): (Vec<_>, Vec<_>) = made.drain(..).partition(|(p, _)| p.starts_with(dir));
        *made = rest;
        under.into_iter().map(|(_, name)| name).collect()
    };
    for name in gone {
        // FORCE: a server killed a moment ago may still hold a connection.
        pg_admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
}

/// A temporary directory removed on drop (with the PostgreSQL databases made for its paths).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "echocenter-test-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop_databases_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub db: PathBuf,
    pub dir: TempDir,
    stderr_path: PathBuf,
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `error` string of an error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[], &[])
    }

    /// Starts the binary with extra flags and environment, on a fresh database.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = TempDir::new();
        let db = dir.path().join("echocenter.db");
        Server::start_on(dir, db, args, envs)
    }

    /// Starts the binary on an existing directory and database file (restarts).
    pub fn start_on(dir: TempDir, db: PathBuf, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::launch(dir, db, "127.0.0.1:0", args, envs, None)
    }

    /// Starts the binary under `ulimit -n nofile` (through bash, which can set the limit).
    pub fn start_with_nofile(nofile: u32) -> Server {
        let dir = TempDir::new();
        let db = dir.path().join("echocenter.db");
        Server::launch(dir, db, "127.0.0.1:0", &[], &[], Some(nofile))
    }

    /// The one place the harness starts the binary: `serve` on `addr` (port 0: a free port)
    /// and `db`, with the operator's configuration variables cleared, and returns once it
    /// printed `listening on ADDR`.
    fn launch(
        dir: TempDir,
        db: PathBuf,
        addr: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        nofile: Option<u32>,
    ) -> Server {
        let stderr_path = dir.path().join(format!(
            "stderr-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = match nofile {
            None => Command::new(server_bin()),
            Some(n) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} || exit 99; exec \"$@\""))
                    .arg("bash")
                    .arg(server_bin());
                c
            }
        };
        cmd.arg("serve")
            .arg("--addr")
            .arg(addr)
            .arg("--db")
            .arg(db_arg(&db))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for var in [
            "ECHOCENTER_ENV",
            "APP_ENV",
            "ECHOCENTER_ADMIN_PASSWORD",
            "ECHOCENTER_ADMIN_USER",
            "JWT_SECRET",
            "ECHOCENTER_JWT_SECRET",
        ] {
            cmd.env_remove(var);
        }
        // The server's private socket directory goes inside the test's own directory, so a
        // SIGKILLed server leaves nothing behind in the machine's /tmp.
        cmd.env("TMPDIR", dir.path());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start echocenter");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start: {}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        Server {
            child: Some(child),
            addr,
            db,
            dir,
            stderr_path,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// What `--db` takes for this server's database (a path, or a PostgreSQL URL).
    pub fn db_arg(&self) -> String {
        db_arg(&self.db)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        wait_child(&mut child, Duration::from_secs(20))
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops this process (SIGKILL) and hands back its directory and database, which stay.
    pub fn stop_keeping_data(mut self) -> (TempDir, PathBuf) {
        if self.child.is_some() {
            self.kill9();
        }
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        (dir, self.db.clone())
    }

    /// Starts the binary again on the same address and database, after `terminate` or `kill9`
    /// (a process still running is SIGKILLed first): for clients that keep reconnecting to
    /// one URL, as the mock agent and the Butler do. `restart` picks a new port instead.
    pub fn restart_on_same_address(&mut self, args: &[&str], envs: &[(&str, &str)]) {
        if self.child.is_some() {
            self.kill9();
        }
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        let addr = self.addr.clone();
        *self = Server::launch(dir, self.db.clone(), &addr, args, envs, None);
        assert_eq!(self.addr, addr, "the server came back on another address");
    }

    /// Stops this process (SIGKILL) and starts a new one on the same database.
    pub fn restart(mut self, args: &[&str], envs: &[(&str, &str)]) -> Server {
        if self.child.is_some() {
            self.kill9();
        }
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        let db = self.db.clone();
        Server::start_on(dir, db, args, envs)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> HttpResponse {
        let mut headers = Vec::new();
        if let Some(t) = token {
            headers.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        self.raw_request(method, path, &headers, body.map(str::as_bytes))
    }

    pub fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
        {
            req.push_str("Connection: close\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        if let Some(b) = body {
            // The server may answer (413) before reading a large body; that is fine.
            let _ = s.write_all(b);
        }
        read_response(&mut s)
    }

    pub fn get(&self, path: &str, token: &str) -> HttpResponse {
        self.request("GET", path, Some(token), None)
    }

    pub fn post(&self, path: &str, token: &str, body: Value) -> HttpResponse {
        self.request("POST", path, Some(token), Some(&body.to_string()))
    }

    pub fn login(&self, username: &str, password: &str) -> HttpResponse {
        self.request(
            "POST",
            "/api/auth/login",
            None,
            Some(&json!({"username": username, "password": password}).to_string()),
        )
    }

    /// A JWT for the bootstrap admin (development password).
    pub fn admin_token(&self) -> String {
        self.token_for("admin", "admin123")
    }

    /// A JWT for `username`, asserting the login succeeds.
    pub fn token_for(&self, username: &str, password: &str) -> String {
        let r = self.login(username, password);
        assert_eq!(r.status, 200, "login {username}: {}", r.body);
        r.json()["token"].as_str().unwrap().to_string()
    }

    /// Changes the password of the human behind `jwt`; returns the new JWT (the old one, and
    /// every other session of the account, stop working).
    pub fn change_password(&self, jwt: &str, current: &str, new: &str) -> String {
        let r = self.post(
            "/api/users/me/password",
            jwt,
            json!({"current_password": current, "new_password": new}),
        );
        assert_eq!(r.status, 200, "password change: {}", r.body);
        r.json()["token"].as_str().unwrap().to_string()
    }

    /// Registers an agent; returns (id, raw token).
    pub fn register_agent(&self, admin: &str, name: &str) -> (i64, String) {
        let r = self.post("/api/users/agents", admin, json!({"username": name}));
        assert_eq!(r.status, 201, "register {name}: {}", r.body);
        let v = r.json();
        (
            v["id"].as_i64().unwrap(),
            v["api_token"].as_str().unwrap().to_string(),
        )
    }

    /// Creates a human with a password; returns its JWT.
    pub fn create_human(&self, admin: &str, name: &str, role: &str) -> (i64, String) {
        let r = self.post(
            "/api/users",
            admin,
            json!({"username": name, "password": "pw-123456-long", "role": role}),
        );
        assert_eq!(r.status, 201, "create {name}: {}", r.body);
        let id = r.json()["id"].as_i64().unwrap();
        let t = self.login(name, "pw-123456-long");
        assert_eq!(t.status, 200);
        (id, t.json()["token"].as_str().unwrap().to_string())
    }

    /// The raw token of the Butler (development only).
    pub fn butler_token(&self, admin: &str) -> String {
        let r = self.get("/api/dev/mock/agent-token/Butler", admin);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["api_token"].as_str().unwrap().to_string()
    }

    pub fn ws(&self, token: &str) -> Ws {
        self.try_ws(token)
            .unwrap_or_else(|e| panic!("websocket connect failed: {e}"))
    }

    pub fn try_ws(&self, token: &str) -> Result<Ws, String> {
        let stream = TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        let url = format!("ws://{}/api/ws?token={token}", self.addr);
        match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => {
                ws.get_ref()
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                Ok(Ws { inner: ws })
            }
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                Err(format!(
                    "{} {}",
                    resp.status().as_u16(),
                    String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits until `cond` holds, polling; panics with `what` after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        wait_until(what, timeout, &mut cond)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_until(what: &str, timeout: Duration, cond: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_response(s: &mut TcpStream) -> HttpResponse {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    // Read to the end, or for a 101 just the head (the connection then stays open).
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if raw.starts_with(b"HTTP/1.1 101") && raw.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// A WebSocket client for tests.
pub struct Ws {
    pub inner: WebSocket<TcpStream>,
}

impl std::fmt::Debug for Ws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ws")
    }
}

impl Ws {
    pub fn send_json(&mut self, v: Value) {
        self.inner.send(Message::text(v.to_string())).unwrap();
    }

    pub fn send_text(&mut self, t: &str) {
        self.inner.send(Message::text(t.to_string())).unwrap();
    }

    /// Sends all `frames` with one flush, so they reach the server together (as a client
    /// that writes faster than the server reads would deliver them).
    pub fn send_burst(&mut self, frames: &[Value]) {
        for f in frames {
            self.inner.write(Message::text(f.to_string())).unwrap();
        }
        self.inner.flush().unwrap();
    }

    /// Every JSON text frame until the connection ends (its server died, say), or until
    /// `timeout` passes without one.
    pub fn drain_until_end(&mut self, timeout: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        let mut deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.inner.read() {
                Ok(Message::Text(t)) => {
                    got.push(serde_json::from_str(t.as_str()).unwrap());
                    deadline = Instant::now() + timeout;
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        got
    }

    /// The next JSON text frame, or None at the deadline. Panics if the connection closed.
    pub fn recv_within(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.inner.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Binary(b)) => return Some(serde_json::from_slice(&b).unwrap()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("websocket ended while waiting for a frame: {e}"),
            }
        }
        None
    }

    /// The next frame whose type is `kind` (others are skipped), within 10 s.
    pub fn recv_type(&mut self, kind: &str) -> Value {
        self.recv_until(|v| v["type"] == kind, &format!("a {kind} frame"))
    }

    pub fn recv_until(&mut self, mut pred: impl FnMut(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(v) = self.recv_within(Duration::from_millis(200)) {
                if pred(&v) {
                    return v;
                }
            }
        }
        panic!("timed out waiting for {what}");
    }

    /// Reads until the server closes; returns the close code (None if no close frame came).
    pub fn recv_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(70);
        while Instant::now() < deadline {
            match self.inner.read() {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
        panic!("server did not close the connection");
    }

    /// Asserts that no frame of type `kind` arrives within `window`.
    pub fn assert_no(&mut self, kind: &str, window: Duration) {
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            if let Some(v) = self.recv_within(Duration::from_millis(50)) {
                assert_ne!(v["type"], kind, "unexpected frame: {v}");
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.inner.close(None);
        let _ = self.inner.flush();
    }
}

// ----- raw sockets ------------------------------------------------------------------------

/// A TCP connection to `addr` from `source`, an address of this machine (all of 127.0.0.0/8 is
/// loopback), so that one test can be several clients. 127.0.0.1 is a trusted proxy by
/// default; 127.0.0.2 and up are ordinary clients.
pub fn connect_from(source: &str, addr: &str) -> TcpStream {
    connect_with(source, addr, None)
}

/// As `connect_from`, with a small receive buffer (set before the handshake, so the window
/// stays small): the kernel can then hold little of what the server sends.
pub fn connect_with(source: &str, addr: &str, recv_buffer: Option<usize>) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let target: std::net::SocketAddr = addr.parse().unwrap();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n).unwrap();
    }
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&target.into()).unwrap();
    socket.into()
}

/// Writes `bytes` and reads until the server closes (or `timeout` passes without a byte).
pub fn exchange(addr: &str, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    read_all(&mut s)
}

pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

pub fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

pub fn body_of(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
