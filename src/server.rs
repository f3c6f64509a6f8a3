//! The process: start-up, the accept loop, and shutdown.
//!
//! One public port serves REST and WebSocket. Our own accept loop (which never dies on an
//! accept error) hands each connection to a thread that reads the request head with a size cap
//! (8 KiB, else 431) and a deadline (10 s). `/api/ws` is upgraded right there on the raw
//! `TcpStream` (see `ws`); every other request is passed, with `Connection: close` and the
//! client's address in `X-EchoCenter-Peer`, to tiny_http listening on a Unix socket in a
//! private (0700) directory that only this process's user can reach. See ARCHITECTURE.md.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{self, JwtKeys};
use crate::config::{Config, Environment};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::{log_error, log_info, log_warn};

pub const MAX_HEAD_BYTES: usize = 8 * 1024;
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Stack of every per-connection thread. Only touched pages count towards memory.
pub const THREAD_STACK: usize = 256 * 1024;
/// How long a proxied REST request may stall mid-body before it is dropped.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_WORKERS: usize = 8;

pub struct App {
    pub config: Config,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub keys: JwtKeys,
    pub logins: auth::LoginLimiter,
    pub shutting_down: AtomicBool,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    http: HttpLayer,
}

/// tiny_http behind the private Unix socket, restartable.
///
/// tiny_http's own accept thread panics when it cannot clone an accepted descriptor (out of
/// file descriptors: `try_clone().unwrap()` in its `refined_tcp_stream.rs`), and its listener
/// dies with it. Our accept loop survives descriptor exhaustion, so the REST side must too:
/// when the socket stops answering, the next request starts a fresh tiny_http on a new socket
/// and releases the old one's workers.
struct HttpLayer {
    dir: PathBuf,
    current: Mutex<Option<(Arc<tiny_http::Server>, PathBuf)>>,
    restarting: Mutex<()>,
    generation: std::sync::atomic::AtomicU64,
}

impl HttpLayer {
    fn new(dir: PathBuf) -> HttpLayer {
        HttpLayer {
            dir,
            current: Mutex::new(None),
            restarting: Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn current_path(&self) -> Option<PathBuf> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().map(|(_, path)| path.clone())
    }

    /// Starts tiny_http and its workers on a new socket; retires the previous instance.
    fn start(&self, app: &Arc<App>) -> io::Result<PathBuf> {
        let n = self.generation.fetch_add(1, Relaxed);
        let path = self.dir.join(format!("http-{n}.sock"));
        let server = Arc::new(tiny_http::Server::http_unix(&path).map_err(io::Error::other)?);
        for i in 0..HTTP_WORKERS {
            let (app, server) = (app.clone(), server.clone());
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(request) = server.recv() {
                        crate::http::handle(&app, request);
                    }
                })?;
        }
        let old = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((server, path.clone()));
        if let Some((old, old_path)) = old {
            release_workers(&old);
            let _ = std::fs::remove_file(old_path);
        }
        Ok(path)
    }

    /// A connection to tiny_http, restarting it if its socket no longer answers.
    fn connect(&self, app: &Arc<App>) -> io::Result<UnixStream> {
        let dead = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            )
        };
        if let Some(path) = self.current_path() {
            match UnixStream::connect(&path) {
                Err(e) if dead(&e) => {}
                other => return other,
            }
        }
        let _one_at_a_time = self.restarting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Ok(s)) = self.current_path().map(UnixStream::connect) {
            return Ok(s);
        }
        if app.shutting_down.load(Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "shutting down",
            ));
        }
        log_warn!("the HTTP layer stopped answering; restarting it");
        UnixStream::connect(self.start(app)?)
    }

    fn stop(&self) {
        if let Some((server, _)) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            release_workers(&server);
        }
    }
}

/// `unblock` wakes one thread blocked in `recv`; every worker needs its own.
fn release_workers(server: &tiny_http::Server) {
    for _ in 0..HTTP_WORKERS {
        server.unblock();
    }
}

impl App {
    /// A browser's `Origin` is allowed when it is this server itself or explicitly listed.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if let Some(host) = host {
            if origin == format!("http://{host}") || origin == format!("https://{host}") {
                return true;
            }
        }
        self.config.allowed_origins.iter().any(|o| o == origin)
    }

    pub fn production(&self) -> bool {
        self.config.env == Environment::Production
    }
}

/// The parsed head of a request.
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub version: u8,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(self.query.as_deref()?, name)
    }
}

pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok()),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a complete JSON response and closes (used before tiny_http is involved).
pub fn respond_json(stream: &mut TcpStream, status: u16, body: &str, extra: &[(&str, &str)]) {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

/// Opens the database, runs bootstrap on an empty one, and enforces production rules.
/// Shared by `serve` and the command-line subcommands.
pub fn open_store(config: &Config) -> Result<Store, String> {
    let store = Store::open(&config.db, config.sync)
        .map_err(|e| format!("cannot open database {}: {e}", config.db.display()))?;
    bootstrap(&store, config).map_err(|e| format!("bootstrap failed: {e}"))?;
    if config.env == Environment::Production {
        let cleared = store.clear_raw_tokens().map_err(|e| e.to_string())?;
        if cleared > 0 {
            log_info!("production: cleared {cleared} raw token copies from the database");
        }
    }
    Ok(store)
}

/// Creates the admin (id 1) and the Butler (id 2) on an empty database.
pub fn bootstrap(store: &Store, config: &Config) -> Result<(), crate::store::StoreError> {
    if store.user_count()? > 0 {
        return Ok(());
    }
    let admin = config.admin_user.clone().unwrap_or_else(|| "admin".into());
    let password = match (&config.admin_password, config.env) {
        (Some(p), _) => p.clone(),
        (None, Environment::Development) => {
            crate::log_warn!("bootstrap: created admin {admin:?} with the development password \"admin123\"; set ECHOCENTER_ADMIN_PASSWORD for anything real");
            "admin123".into()
        }
        (None, Environment::Production) => {
            let p = hex::encode(auth::random_bytes::<12>());
            // The one place a secret is printed: the operator has no other way to learn it.
            eprintln!(
                "bootstrap: created admin {admin:?} with password {p} (shown once; store it now)"
            );
            p
        }
    };
    let keep_raw = config.env == Environment::Development;
    store.bootstrap(
        &admin,
        &auth::hash_password(&password),
        &auth::generate_token(),
        keep_raw,
    )?;
    Ok(())
}

fn jwt_secret(store: &Store, config: &Config) -> Result<Vec<u8>, String> {
    if let Some(s) = &config.jwt_secret {
        return Ok(s.clone());
    }
    match store.setting("jwt_secret").map_err(|e| e.to_string())? {
        Some(hexed) => hex::decode(hexed).map_err(|e| format!("stored jwt_secret is corrupt: {e}")),
        None => {
            let secret = auth::random_bytes::<32>().to_vec();
            store
                .set_setting("jwt_secret", &hex::encode(&secret))
                .map_err(|e| e.to_string())?;
            Ok(secret)
        }
    }
}

/// `echocenter serve`: runs until SIGINT/SIGTERM, then shuts down cleanly.
pub fn serve(config: Config) -> Result<(), String> {
    crate::logging::set_level(config.log);
    // Installed before anything is announced, so a SIGTERM right after "listening on"
    // already gets the clean shutdown.
    let signals = {
        use signal_hook::consts::{SIGINT, SIGTERM};
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| log_error!("cannot install signal handlers: {e}; running until killed"))
            .ok()
    };
    let store = open_store(&config)?;
    // Tells the command-line tools which mode owns this database (they keep no raw token
    // copies in a production database).
    store
        .set_setting(
            "env",
            if config.env == Environment::Production {
                "production"
            } else {
                "development"
            },
        )
        .map_err(|e| e.to_string())?;
    let keys = JwtKeys::new(jwt_secret(&store, &config)?, config.jwt_ttl);
    let listener = TcpListener::bind(&config.addr)
        .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let hub = Hub::new(store.clone(), Arc::new(Metrics::default()));
    let socket_dir = private_dir()?;
    let app = Arc::new(App {
        config,
        store,
        hub,
        keys,
        logins: auth::LoginLimiter::default(),
        shutting_down: AtomicBool::new(false),
        per_ip: Mutex::new(HashMap::new()),
        http: HttpLayer::new(socket_dir.clone()),
    });
    app.http
        .start(&app)
        .map_err(|e| format!("cannot start the HTTP layer: {e}"))?;
    {
        let app = app.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(app, listener))
            .map_err(|e| e.to_string())?;
    }
    log_info!(
        "echocenter listening on {local} ({} mode, database {})",
        if app.production() {
            "production"
        } else {
            "development"
        },
        app.store.path().display()
    );
    // Tests and scripts wait for this exact line on stdout.
    println!("listening on {local}");
    let _ = io::stdout().flush();

    wait_for_signal(signals);
    shutdown(&app, local);
    let _ = std::fs::remove_dir_all(&socket_dir);
    Ok(())
}

fn wait_for_signal(signals: Option<signal_hook::iterator::Signals>) {
    match signals {
        Some(mut signals) => {
            if let Some(sig) = signals.forever().next() {
                log_info!("received signal {sig}, shutting down");
            }
        }
        None => loop {
            std::thread::park();
        },
    }
}

fn shutdown(app: &Arc<App>, local: SocketAddr) {
    app.shutting_down.store(true, Relaxed);
    // Wake the accept loop so it sees the flag.
    let wake = if local.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), local.port())
    } else {
        local
    };
    let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
    app.hub.close_all(1001, "server shutdown");
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.hub.connection_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every frame that was acknowledged is already committed; this commits the rest
    // (delivery marks, last-seen times).
    app.store.flush();
    app.http.stop();
    log_info!("shutdown complete");
}

fn private_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "echocenter-{}-{}",
        std::process::id(),
        hex::encode(auth::random_bytes::<6>())
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Accepts forever. An accept error (say, out of file descriptors) is logged and retried
/// after a pause; it never ends the loop.
fn accept_loop(app: Arc<App>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(10);
    let mut last_error_log: Option<Instant> = None;
    for incoming in listener.incoming() {
        if app.shutting_down.load(Relaxed) {
            return;
        }
        let stream = match incoming {
            Ok(s) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                app.hub.metrics.accept_errors.fetch_add(1, Relaxed);
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    log_warn!("accept failed: {e}; retrying in {backoff:?}");
                    last_error_log = Some(Instant::now());
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        admit(&app, stream);
    }
}

/// Counts a connection in, refuses it at a cap, or gives it a thread.
fn admit(app: &Arc<App>, mut stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p.ip(),
        Err(_) => return,
    };
    let Some(guard) = SocketGuard::enter(app, peer) else {
        respond_json(
            &mut stream,
            503,
            r#"{"error":"server at connection limit"}"#,
            &[],
        );
        return;
    };
    let app2 = app.clone();
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let _guard = guard;
            handle_connection(&app2, stream, peer);
        });
    if let Err(e) = spawned {
        // The guard and stream moved into the closure were dropped with it.
        log_warn!("cannot start a connection thread: {e}");
    }
}

/// Holds one slot of `--max-connections` and of the per-address cap while a connection lives.
struct SocketGuard {
    app: Arc<App>,
    ip: IpAddr,
}

impl SocketGuard {
    fn enter(app: &Arc<App>, ip: IpAddr) -> Option<SocketGuard> {
        let open = app.hub.open_sockets.fetch_add(1, Relaxed) + 1;
        if open > app.config.max_connections {
            app.hub.open_sockets.fetch_sub(1, Relaxed);
            app.hub.metrics.limit("max_connections");
            return None;
        }
        let mut per_ip = app.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= app.config.max_connections_per_ip {
            drop(per_ip);
            app.hub.open_sockets.fetch_sub(1, Relaxed);
            app.hub.metrics.limit("max_connections_per_ip");
            return None;
        }
        *n += 1;
        Some(SocketGuard {
            app: app.clone(),
            ip,
        })
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.app.hub.open_sockets.fetch_sub(1, Relaxed);
        let mut per_ip = self.app.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

enum HeadError {
    TooLarge,
    Timeout,
    Malformed,
    Closed,
}

fn handle_connection(app: &Arc<App>, mut stream: TcpStream, peer: IpAddr) {
    let (head, leftover) = match read_head(&mut stream) {
        Ok(h) => h,
        Err(HeadError::TooLarge) => {
            app.hub.metrics.limit("head_too_large");
            respond_json(
                &mut stream,
                431,
                r#"{"error":"request header fields too large"}"#,
                &[],
            );
            return;
        }
        Err(HeadError::Timeout) => {
            app.hub.metrics.limit("head_timeout");
            respond_json(&mut stream, 408, r#"{"error":"request timeout"}"#, &[]);
            return;
        }
        Err(HeadError::Malformed) => {
            respond_json(&mut stream, 400, r#"{"error":"bad request"}"#, &[]);
            return;
        }
        Err(HeadError::Closed) => return,
    };
    let _ = stream.set_read_timeout(None);
    // The path only: query strings may carry tokens.
    crate::log_debug!("{peer} {} {}", head.method, head.path);
    if head.path == "/api/ws" {
        crate::ws::serve(app, stream, head, leftover);
    } else if head.path == crate::ws::ECHO_PATH && app.config.conformance_echo {
        crate::ws::serve_echo(app, stream, head, leftover);
    } else {
        proxy(app, stream, head, leftover, peer);
    }
}

/// Reads until the end of the head, at most `MAX_HEAD_BYTES`, within `HEAD_DEADLINE`.
fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), HeadError> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut filled = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(HeadError::Closed),
        };
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p.to_string(), Some(q.to_string())),
                    None => (target.to_string(), None),
                };
                let head = Head {
                    method: req.method.unwrap_or("GET").to_string(),
                    path,
                    query,
                    version: req.version.unwrap_or(1),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                return Ok((head, buf[len..filled].to_vec()));
            }
            Ok(httparse::Status::Partial) if filled == MAX_HEAD_BYTES => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

/// Copies tiny_http's response to the client, adding `Connection: close` to its head.
/// tiny_http never sends that header (it refuses it from handlers too), and a keep-alive
/// client (browsers, Node's fetch) would otherwise send its next request on a connection we
/// are about to close. Interim `100 Continue` heads pass through unchanged.
fn forward_response(inner: &mut impl Read, client: &mut impl Write) -> io::Result<()> {
    const MAX_RESPONSE_HEAD: usize = 64 * 1024;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = inner.read(&mut chunk)?;
        if n == 0 {
            return client.write_all(&buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let interim = buf.starts_with(b"HTTP/1.1 1") || buf.starts_with(b"HTTP/1.0 1");
            if interim {
                client.write_all(&buf[..end + 4])?;
                buf.drain(..end + 4);
                continue;
            }
            client.write_all(&buf[..end + 2])?;
            client.write_all(b"Connection: close\r\n\r\n")?;
            client.write_all(&buf[end + 4..])?;
            io::copy(inner, client)?;
            return Ok(());
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            client.write_all(&buf)?;
            io::copy(inner, client)?;
            return Ok(());
        }
    }
}

/// Hands a REST request to tiny_http over the private Unix socket and pipes bytes both ways.
fn proxy(app: &Arc<App>, mut client: TcpStream, head: Head, leftover: Vec<u8>, peer: IpAddr) {
    let mut inner = match app.http.connect(app) {
        Ok(s) => s,
        Err(e) => {
            log_error!("cannot reach the HTTP layer: {e}");
            respond_json(&mut client, 503, r#"{"error":"server unavailable"}"#, &[]);
            return;
        }
    };
    let mut out = format!(
        "{} {}{} HTTP/1.{}\r\n",
        head.method,
        head.path,
        head.query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default(),
        head.version
    );
    for (k, v) in &head.headers {
        let hop = ["connection", "keep-alive", "x-echocenter-peer"];
        if !hop.iter().any(|h| k.eq_ignore_ascii_case(h)) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str(&format!(
        "X-EchoCenter-Peer: {peer}\r\nConnection: close\r\n\r\n"
    ));
    if inner.write_all(out.as_bytes()).is_err() || inner.write_all(&leftover).is_err() {
        return;
    }
    let (Ok(mut inner_read), Ok(mut client_write)) = (inner.try_clone(), client.try_clone()) else {
        return;
    };
    let response = std::thread::Builder::new()
        .name("proxy".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = forward_response(&mut inner_read, &mut client_write);
            // The response is complete: end the client connection, which also ends the
            // request-body copy below if the client is still sending.
            let _ = client_write.shutdown(Shutdown::Both);
        });
    let _ = client.set_read_timeout(Some(BODY_IDLE_TIMEOUT));
    let _ = io::copy(&mut client, &mut inner);
    let _ = inner.shutdown(Shutdown::Write);
    if let Ok(handle) = response {
        let _ = handle.join();
    }
}
