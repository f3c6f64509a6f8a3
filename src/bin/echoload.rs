//! `echoload`: a load generator for EchoCenter that speaks only the public protocol — REST
//! login and registration, then the one WebSocket — against a server on the loopback address.
//!
//! Scenarios (each bounded in time and count; each ends by printing exactly one JSON line of
//! results on stdout, progress goes to stderr):
//! - `connect`: N idle agent connections held for a while; connect rate, failures, and the
//!   server's RSS before/after (`--server-pid`) → KiB per idle connection.
//! - `chat`: H humans send CHAT to A agents round-robin at an offered rate; the agents answer
//!   each request with its payload; round-trip latency, lost and duplicated replies.
//!   `--closed-loop K` keeps K requests in flight instead, as fast as the server allows.
//! - `logs`: N agents send SYSTEM_LOG at R/s each to D dashboards (admin connections);
//!   delivered/sent per dashboard and end-to-end latency.
//! - `stream`: like `chat`, but agents answer with CHAT_STREAM chunks, a final CHAT and
//!   CHAT_STREAM_END; chunk latency and whether the order was kept.
//!
//! Threads, not async: one blocking reader thread per connection that has something to read
//! (small stacks), sender threads that pace requests. A connection read and written by two
//! threads is two `WebSocket` values over clones of one `TcpStream`: the reader's own writes
//! (pongs, close replies) are discarded, so only the sender ever writes to the socket.
//! Latency is measured on one clock: the sender writes `now` (µs since start) into the
//! payload, and the receiver in the same process subtracts it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// Stack of every per-connection client thread: thousands of them must fit next to the server.
const STACK: usize = 64 * 1024;
/// Threads used for REST setup (registration, logins) and for opening connections.
const SETUP_THREADS: usize = 8;
/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ) on every common build.
const CLK_TCK: f64 = 100.0;
/// Upper bounds so a typo cannot start an unbounded run.
const MAX_CONNECTIONS: usize = 20_000;
const MAX_DURATION_SECS: f64 = 600.0;

type Res<T> = Result<T, String>;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the process started: the one clock every timestamp in a payload uses.
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

macro_rules! note {
    ($($t:tt)*) => { eprintln!("echoload: {}", format!($($t)*)) };
}

const USAGE: &str = "\
echoload SCENARIO [options]   (one JSON line of results on stdout)

scenarios:
  connect   --agents N (5000) --duration S hold time (10) --settle S (2) --max-connect-secs (120)
  chat      --humans H (16) --agents A (50) --rate RT/S (5000) --duration S (10)
            [--closed-loop K --warmup S (1)] --payload-bytes B (64) --drain S (5)
  logs      --agents N (200) --rate R/S per agent (10) --dashboards D (3) --senders W (4)
            --duration S (10) --drain S (5)
  stream    --humans H (8) --agents A (20) --rate REQ/S (200) --chunks C (10)
            --chunk-gap-us U (0) --duration S (10) --drain S (5)

common:
  --addr 127.0.0.1:18100   loopback only
  --admin-user admin --admin-password admin123
  --server-pid PID         sample the server's RSS, threads and CPU (per thread group)
  --metrics-token T        read GET /metrics before/after (commits, batch sizes, errors)
  --prefix P               prefix of the users created (default: unique per run)
";

fn main() {
    EPOCH.get_or_init(Instant::now);
    let mut args = pico_args::Arguments::from_env();
    if args.contains(["-h", "--help"]) {
        print!("{USAGE}");
        return;
    }
    let scenario = match args.subcommand() {
        Ok(Some(s)) => s,
        _ => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    match run(&scenario, args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            note!("{scenario} failed: {e}");
            println!("{}", json!({"scenario": scenario, "error": e}));
            std::process::exit(1);
        }
    }
}

fn run(scenario: &str, mut args: pico_args::Arguments) -> Res<Value> {
    let common = Common::parse(&mut args)?;
    let result = match scenario {
        "connect" => {
            let a = ConnectArgs::parse(&mut args)?;
            finish_args(args)?;
            connect_scenario(&common, &a)
        }
        "chat" | "stream" => {
            let a = ChatArgs::parse(&mut args, scenario == "stream")?;
            finish_args(args)?;
            chat_scenario(&common, &a)
        }
        "logs" => {
            let a = LogsArgs::parse(&mut args)?;
            finish_args(args)?;
            logs_scenario(&common, &a)
        }
        other => Err(format!("unknown scenario {other:?}\n{USAGE}")),
    }?;
    Ok(result)
}

fn finish_args(args: pico_args::Arguments) -> Res<()> {
    let rest = args.finish();
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected arguments: {rest:?}"))
    }
}

fn opt<T: std::str::FromStr>(
    args: &mut pico_args::Arguments,
    name: &'static str,
    default: T,
) -> Res<T>
where
    T::Err: std::fmt::Display,
{
    args.opt_value_from_str(name)
        .map(|v| v.unwrap_or(default))
        .map_err(|e| format!("{name}: {e}"))
}

fn bounded(name: &str, v: usize, lo: usize, hi: usize) -> Res<usize> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{name} must be between {lo} and {hi}"))
    }
}

fn secs(name: &str, v: f64) -> Res<Duration> {
    if v.is_finite() && (0.0..=MAX_DURATION_SECS).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "{name} must be between 0 and {MAX_DURATION_SECS} seconds"
        ))
    }
}

// ----- options ------------------------------------------------------------------------------

struct Common {
    addr: SocketAddr,
    admin_user: String,
    admin_password: String,
    server_pid: Option<u32>,
    metrics_token: Option<String>,
    prefix: String,
}

impl Common {
    fn parse(args: &mut pico_args::Arguments) -> Res<Common> {
        let addr: SocketAddr = opt(args, "--addr", "127.0.0.1:18100".parse().unwrap())?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--addr {addr}: echoload only targets the loopback address"
            ));
        }
        let default_prefix = format!(
            "el{:x}",
            (std::process::id() as u64) << 20
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64 & 0xf_ffff)
                    .unwrap_or(0)
        );
        Ok(Common {
            addr,
            admin_user: opt(args, "--admin-user", "admin".to_string())?,
            admin_password: opt(args, "--admin-password", "admin123".to_string())?,
            server_pid: args
                .opt_value_from_str("--server-pid")
                .map_err(|e| format!("--server-pid: {e}"))?,
            metrics_token: args
                .opt_value_from_str("--metrics-token")
                .map_err(|e| format!("--metrics-token: {e}"))?,
            prefix: opt(args, "--prefix", default_prefix)?,
        })
    }
}

struct ConnectArgs {
    agents: usize,
    hold: Duration,
    settle: Duration,
    max_connect: Duration,
}

impl ConnectArgs {
    fn parse(args: &mut pico_args::Arguments) -> Res<ConnectArgs> {
        Ok(ConnectArgs {
            agents: bounded("--agents", opt(args, "--agents", 5000)?, 1, MAX_CONNECTIONS)?,
            hold: secs("--duration", opt(args, "--duration", 10.0)?)?,
            settle: secs("--settle", opt(args, "--settle", 2.0)?)?,
            max_connect: secs(
                "--max-connect-secs",
                opt(args, "--max-connect-secs", 120.0)?,
            )?,
        })
    }
}

struct ChatArgs {
    stream: bool,
    humans: usize,
    agents: usize,
    rate: f64,
    closed_loop: usize,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    payload_bytes: usize,
    chunks: usize,
    chunk_gap: Duration,
}

impl ChatArgs {
    fn parse(args: &mut pico_args::Arguments, stream: bool) -> Res<ChatArgs> {
        let (humans, agents, rate) = if stream {
            (8, 20, 200.0)
        } else {
            (16, 50, 5000.0)
        };
        let a = ChatArgs {
            stream,
            humans: bounded("--humans", opt(args, "--humans", humans)?, 1, 2000)?,
            agents: bounded(
                "--agents",
                opt(args, "--agents", agents)?,
                1,
                MAX_CONNECTIONS,
            )?,
            rate: opt(args, "--rate", rate)?,
            closed_loop: if stream {
                0
            } else {
                bounded("--closed-loop", opt(args, "--closed-loop", 0)?, 0, 100_000)?
            },
            warmup: secs("--warmup", opt(args, "--warmup", 1.0)?)?,
            duration: secs("--duration", opt(args, "--duration", 10.0)?)?,
            drain: secs("--drain", opt(args, "--drain", 5.0)?)?,
            payload_bytes: bounded(
                "--payload-bytes",
                opt(args, "--payload-bytes", 64)?,
                0,
                32 * 1024,
            )?,
            chunks: if stream {
                bounded("--chunks", opt(args, "--chunks", 10)?, 1, 1000)?
            } else {
                0
            },
            chunk_gap: Duration::from_micros(if stream {
                opt(args, "--chunk-gap-us", 0u64)?.min(1_000_000)
            } else {
                0
            }),
        };
        if !(a.rate > 0.0 && a.rate <= 1_000_000.0) {
            return Err("--rate must be in (0, 1000000]".into());
        }
        if a.closed_loop > 0 && a.warmup >= a.duration {
            return Err("--warmup must be shorter than --duration".into());
        }
        if a.closed_loop > 0 && a.closed_loop < a.humans {
            return Err(
                "--closed-loop K needs K >= --humans (each human keeps K/H in flight)".into(),
            );
        }
        Ok(a)
    }
}

struct LogsArgs {
    agents: usize,
    rate: f64,
    dashboards: usize,
    senders: usize,
    duration: Duration,
    drain: Duration,
}

impl LogsArgs {
    fn parse(args: &mut pico_args::Arguments) -> Res<LogsArgs> {
        let a = LogsArgs {
            agents: bounded("--agents", opt(args, "--agents", 200)?, 1, MAX_CONNECTIONS)?,
            rate: opt(args, "--rate", 10.0)?,
            dashboards: bounded("--dashboards", opt(args, "--dashboards", 3)?, 1, 1000)?,
            senders: bounded("--senders", opt(args, "--senders", 4)?, 1, 256)?,
            duration: secs("--duration", opt(args, "--duration", 10.0)?)?,
            drain: secs("--drain", opt(args, "--drain", 5.0)?)?,
        };
        if !(a.rate > 0.0 && a.rate <= 10_000.0) {
            return Err("--rate must be in (0, 10000] per agent".into());
        }
        Ok(a)
    }
}

// ----- REST: the setup every scenario shares -------------------------------------------------

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Res<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf) {
        if buf.is_empty() {
            return Err(format!("{method} {path}: {e}"));
        }
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: malformed response"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let rest = &buf[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: malformed status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || size > b.len() {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

fn expect_json(r: (u16, String), want: u16, what: &str) -> Res<Value> {
    let (status, body) = r;
    if status != want {
        return Err(format!("{what}: HTTP {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("{what}: bad JSON ({e}): {body}"))
}

fn login(addr: SocketAddr, user: &str, password: &str) -> Res<String> {
    let v = expect_json(
        http(
            addr,
            "POST",
            "/api/auth/login",
            None,
            Some(&json!({"username": user, "password": password})),
        )?,
        200,
        &format!("login {user}"),
    )?;
    v["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("login {user}: no token in response"))
}

/// A user the scenario created: its id and the token it connects with.
#[derive(Clone)]
struct Account {
    id: i64,
    token: String,
}

/// Runs `f` over `items` on `threads` scoped threads, results in input order.
fn par_map<T: Sync, U: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<U>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                *out[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every index below len was taken by exactly one worker")
        })
        .collect()
}

fn register_agents(addr: SocketAddr, jwt: &str, names: &[String]) -> Res<Vec<Account>> {
    let started = Instant::now();
    let results = par_map(names, SETUP_THREADS, |name| {
        let v = expect_json(
            http(
                addr,
                "POST",
                "/api/users/agents",
                Some(jwt),
                Some(&json!({"username": name})),
            )?,
            201,
            &format!("register agent {name}"),
        )?;
        match (v["id"].as_i64(), v["api_token"].as_str()) {
            (Some(id), Some(token)) => Ok(Account {
                id,
                token: token.to_string(),
            }),
            _ => Err(format!("register agent {name}: no id/api_token in {v}")),
        }
    });
    let out = results.into_iter().collect::<Res<Vec<_>>>()?;
    note!(
        "registered {} agents in {:.1}s",
        out.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn create_humans(addr: SocketAddr, jwt: &str, names: &[String], role: &str) -> Res<Vec<Account>> {
    let password = "echoload-password-1";
    let results = par_map(names, SETUP_THREADS, |name| {
        let v = expect_json(
            http(
                addr,
                "POST",
                "/api/users",
                Some(jwt),
                Some(&json!({"username": name, "password": password, "role": role})),
            )?,
            201,
            &format!("create user {name}"),
        )?;
        let id = v["id"]
            .as_i64()
            .ok_or_else(|| format!("create user {name}: no id"))?;
        Ok(Account {
            id,
            token: login(addr, name, password)?,
        })
    });
    results.into_iter().collect()
}

// ----- WebSocket connections -----------------------------------------------------------------

fn ws_config() -> WebSocketConfig {
    // Small buffers: a client holding thousands of connections must stay small too.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// The stream the handshake runs over. It never reads past the blank line that ends the
/// server's 101 response (it peeks, then consumes only up to there), so no WebSocket frame the
/// server sends right after the upgrade is left behind in the handshake's buffer. That is
/// what allows splitting the socket into a reader and a writer afterwards.
struct HandshakeStream {
    s: TcpStream,
    /// How much of "\r\n\r\n" the bytes consumed so far end with.
    matched: usize,
}

impl Read for HandshakeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.matched == 4 || buf.is_empty() {
            return Ok(0);
        }
        let n = self.s.peek(buf)?;
        let mut take = n;
        for (i, &b) in buf[..n].iter().enumerate() {
            self.matched = match (self.matched, b) {
                (0 | 2, b'\r') => self.matched + 1,
                (1 | 3, b'\n') => self.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if self.matched == 4 {
                take = i + 1;
                break;
            }
        }
        self.s.read_exact(&mut buf[..take])?;
        Ok(take)
    }
}

impl Write for HandshakeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// Opens one WebSocket with `token`; returns the socket right after the 101 response.
fn ws_open(addr: SocketAddr, token: &str) -> Res<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(20)));
    let url = format!("ws://{addr}/api/ws?token={token}");
    let hs = HandshakeStream { s, matched: 0 };
    match tungstenite::client::client_with_config(url.as_str(), hs, Some(ws_config())) {
        Ok((ws, _response)) => {
            let s = ws.into_inner().s;
            let _ = s.set_read_timeout(None);
            Ok(s)
        }
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            Err(format!("HTTP {} {}", resp.status().as_u16(), body.trim()))
        }
        Err(HandshakeError::Failure(tungstenite::Error::Io(e))) => {
            Err(format!("handshake: {}", e.kind()))
        }
        Err(e) => Err(format!("handshake: {e}")),
    }
}

/// The read side of a split socket: writes (pongs, close replies) are discarded because the
/// sender thread owns every byte written to the socket.
struct ReadHalf(TcpStream);

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection split into halves, plus a handle main keeps to shut the socket down at the end.
struct Split {
    writer: WebSocket<TcpStream>,
    reader: WebSocket<ReadHalf>,
    ctl: TcpStream,
}

fn split(s: TcpStream) -> Res<Split> {
    let r = s.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    let ctl = s.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    Ok(Split {
        writer: WebSocket::from_raw_socket(s, Role::Client, Some(ws_config())),
        reader: WebSocket::from_raw_socket(ReadHalf(r), Role::Client, Some(ws_config())),
        ctl,
    })
}

/// Opens one connection per token on a few threads, stopping at `deadline`.
fn open_all(addr: SocketAddr, tokens: &[&str], deadline: Instant) -> Vec<Res<TcpStream>> {
    par_map(tokens, SETUP_THREADS, |t| {
        if Instant::now() >= deadline {
            return Err("not attempted: connect phase deadline".to_string());
        }
        ws_open(addr, t)
    })
}

fn open_all_ok(addr: SocketAddr, tokens: &[&str], what: &str) -> Res<Vec<TcpStream>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::with_capacity(tokens.len());
    for r in open_all(addr, tokens, deadline) {
        out.push(r.map_err(|e| format!("{what} connection: {e}"))?);
    }
    Ok(out)
}

fn spawn_small<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Res<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(STACK)
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e} (see vm.max_map_count / pid_max)"))
}

fn text_of(m: &Message) -> Option<&str> {
    match m {
        Message::Text(t) => Some(t.as_str()),
        Message::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

fn send_json(ws: &mut WebSocket<TcpStream>, v: &Value) -> Res<()> {
    ws.send(Message::text(v.to_string()))
        .map_err(|e| e.to_string())
}

/// Sleeps until `due`; returns how late the caller already was (zero when it slept).
fn sleep_until(due: Instant) -> Duration {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
        Duration::ZERO
    } else {
        now - due
    }
}

fn shutdown_all<'a>(ctls: impl IntoIterator<Item = &'a TcpStream>) {
    for c in ctls {
        let _ = c.shutdown(Shutdown::Both);
    }
}

// ----- measurements --------------------------------------------------------------------------

/// Latency percentiles in milliseconds from samples in microseconds.
fn latency(mut v: Vec<u32>) -> Value {
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

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn count_into(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_insert(0) += 1;
}

fn merge_counts(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
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

fn server_rss(pid: Option<u32>) -> Option<(u64, u64)> {
    let s = proc_sample(&pid?.to_string(), false)?;
    Some((s.rss_kib, s.threads))
}

fn fetch_metrics(addr: SocketAddr, token: &str) -> Option<BTreeMap<String, f64>> {
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
struct Observer {
    addr: SocketAddr,
    pid: Option<String>,
    metrics_token: Option<String>,
    started: Instant,
    server: Option<ProcSample>,
    client: Option<ProcSample>,
    metrics: Option<BTreeMap<String, f64>>,
}

impl Observer {
    fn start(c: &Common, with_tasks: bool) -> Observer {
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

    fn finish(self) -> Value {
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

// ----- connect -------------------------------------------------------------------------------

fn connect_scenario(c: &Common, a: &ConnectArgs) -> Res<Value> {
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-c{i}", c.prefix))
        .collect();
    let reg_started = Instant::now();
    let agents = register_agents(c.addr, &jwt, &names)?;
    let register_s = reg_started.elapsed().as_secs_f64();
    std::thread::sleep(a.settle);
    let before = server_rss(c.server_pid);
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
    }
    Ok(out)
}

// ----- chat and stream -----------------------------------------------------------------------

/// What one agent saw.
#[derive(Default)]
struct AgentReport {
    requests: u64,
    frames_sent: u64,
    errors: BTreeMap<String, u64>,
    send_failures: u64,
}

/// Answers every CHAT with the request's payload (chat), or with `chunks` CHAT_STREAM frames, a
/// final CHAT and CHAT_STREAM_END (stream). Ends when the socket does.
fn agent_loop(mut ws: WebSocket<TcpStream>, chunks: usize, gap: Duration) -> AgentReport {
    let mut r = AgentReport::default();
    while let Ok(msg) = ws.read() {
        let Some(v) = text_of(&msg).and_then(|t| serde_json::from_str::<Value>(t).ok()) else {
            continue;
        };
        match v["type"].as_str() {
            Some("CHAT") => {
                let Some(sender) = v["sender_id"].as_i64().filter(|&s| s > 0) else {
                    continue;
                };
                r.requests += 1;
                let payload = &v["payload"];
                let mut frames = Vec::with_capacity(chunks + 2);
                if chunks == 0 {
                    frames.push(json!({"type": "CHAT", "target_id": sender, "payload": payload}));
                } else {
                    let seq = payload
                        .as_str()
                        .and_then(|p| p.split(' ').nth(1))
                        .unwrap_or("0");
                    let sid = format!("s{seq}");
                    for j in 0..chunks {
                        if j > 0 && !gap.is_zero() {
                            std::thread::sleep(gap);
                        }
                        let chunk = json!({"type": "CHAT_STREAM", "target_id": sender, "stream_id": sid,
                                            "payload": format!("c {j} {}", now_us())});
                        if send_json(&mut ws, &chunk).is_err() {
                            r.send_failures += 1;
                            return r;
                        }
                        r.frames_sent += 1;
                    }
                    frames.push(json!({"type": "CHAT", "target_id": sender, "stream_id": sid, "payload": payload}));
                    frames.push(json!({"type": "CHAT_STREAM_END", "target_id": sender, "stream_id": sid, "payload": ""}));
                }
                for f in &frames {
                    if send_json(&mut ws, f).is_err() {
                        r.send_failures += 1;
                        return r;
                    }
                    r.frames_sent += 1;
                }
            }
            Some("ERROR") => {
                count_into(&mut r.errors, v["payload"]["code"].as_str().unwrap_or("?"))
            }
            _ => {}
        }
    }
    r
}

/// Per request, what came back to the human that sent it.
#[derive(Default, Clone, Copy)]
struct Slot {
    sent_us: u64,
    echoes: u16,
    replies: u16,
    next_chunk: u32,
    ends: u16,
    done: bool,
}

/// Everything one human connection received; a shared counter lets main see progress.
struct HumanRx {
    me: i64,
    chunks: u32,
    slots: Vec<Slot>,
    /// Receive-time window (µs) in which latencies and completions are counted.
    window: (u64, u64),
    rtt: Vec<u32>,
    echo_lat: Vec<u32>,
    chunk_lat: Vec<u32>,
    stream_lat: Vec<u32>,
    in_window: u64,
    replies_received: u64,
    echoes_received: u64,
    dup_replies: u64,
    dup_echoes: u64,
    bad_echo: u64,
    order_violations: u64,
    chunks_received: u64,
    ends_received: u64,
    dup_ends: u64,
    unknown: u64,
    errors: BTreeMap<String, u64>,
    /// Requests that are complete: echoed, and answered (stream: ended).
    done: Arc<AtomicU64>,
}

/// Past this sequence number a frame is counted as unknown instead of growing the table.
const MAX_SEQ: usize = 50_000_000;

impl HumanRx {
    fn new(me: i64, chunks: usize, window: (u64, u64), done: Arc<AtomicU64>) -> HumanRx {
        HumanRx {
            me,
            chunks: chunks as u32,
            slots: Vec::new(),
            window,
            rtt: Vec::new(),
            echo_lat: Vec::new(),
            chunk_lat: Vec::new(),
            stream_lat: Vec::new(),
            in_window: 0,
            replies_received: 0,
            echoes_received: 0,
            dup_replies: 0,
            dup_echoes: 0,
            bad_echo: 0,
            order_violations: 0,
            chunks_received: 0,
            ends_received: 0,
            dup_ends: 0,
            unknown: 0,
            errors: BTreeMap::new(),
            done,
        }
    }

    fn slot(&mut self, k: usize) -> Option<&mut Slot> {
        if k >= MAX_SEQ {
            self.unknown += 1;
            return None;
        }
        if k >= self.slots.len() {
            let len = (k + 1).max(self.slots.len() * 2);
            self.slots.resize(len, Slot::default());
        }
        Some(&mut self.slots[k])
    }

    /// Marks request `k` complete the first time it is both echoed and answered; returns
    /// whether this frame completed it.
    fn complete(&mut self, k: usize, win: bool) -> bool {
        let chunks = self.chunks;
        let s = &mut self.slots[k];
        let answered = if chunks == 0 {
            s.replies > 0
        } else {
            s.ends > 0
        };
        if s.done || s.echoes == 0 || !answered {
            return false;
        }
        s.done = true;
        self.done.fetch_add(1, Relaxed);
        if win {
            self.in_window += 1;
        }
        true
    }

    /// Handles one frame; true when it completed a request.
    fn handle(&mut self, text: &str) -> bool {
        let now = now_us();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.unknown += 1;
            return false;
        };
        let win = now >= self.window.0 && now < self.window.1;
        let chunks = self.chunks;
        match v["type"].as_str() {
            Some("CHAT") => {
                let Some((k, t)) = v["payload"].as_str().and_then(parse_rt) else {
                    self.unknown += 1;
                    return false;
                };
                if v["sender_id"].as_i64() == Some(self.me) {
                    // The echo of our own request: it carries our local_id and the stored id.
                    self.echoes_received += 1;
                    if v["local_id"].as_str() != Some(format!("l{k}").as_str())
                        || v["id"].as_i64().is_none()
                    {
                        self.bad_echo += 1;
                    }
                    let Some(s) = self.slot(k) else { return false };
                    s.echoes += 1;
                    s.sent_us = t;
                    if s.echoes > 1 {
                        self.dup_echoes += 1;
                        return false;
                    }
                    if win {
                        self.echo_lat.push(now.saturating_sub(t) as u32);
                    }
                } else {
                    // The agent's answer (stream: the final CHAT, after every chunk).
                    self.replies_received += 1;
                    let Some(s) = self.slot(k) else { return false };
                    s.replies += 1;
                    s.sent_us = t;
                    let out_of_order = chunks > 0 && (s.next_chunk != chunks || s.ends > 0);
                    let dup = s.replies > 1;
                    if out_of_order {
                        self.order_violations += 1;
                    }
                    if dup {
                        self.dup_replies += 1;
                        return false;
                    }
                    if win {
                        self.rtt.push(now.saturating_sub(t) as u32);
                    }
                }
                self.complete(k, win)
            }
            Some("CHAT_STREAM") => {
                self.chunks_received += 1;
                let chunk = v["payload"].as_str().and_then(|p| {
                    let mut it = p.split(' ');
                    (it.next() == Some("c")).then_some(())?;
                    Some((
                        it.next()?.parse::<u32>().ok()?,
                        it.next()?.parse::<u64>().ok()?,
                    ))
                });
                let (Some(k), Some((j, t))) = (stream_seq(&v), chunk) else {
                    self.unknown += 1;
                    return false;
                };
                if win {
                    self.chunk_lat.push(now.saturating_sub(t) as u32);
                }
                let Some(s) = self.slot(k) else { return false };
                let out_of_order = j != s.next_chunk || s.replies > 0 || s.ends > 0;
                s.next_chunk = s.next_chunk.max(j + 1);
                if out_of_order {
                    self.order_violations += 1;
                }
                false
            }
            Some("CHAT_STREAM_END") => {
                self.ends_received += 1;
                let Some(k) = stream_seq(&v) else {
                    self.unknown += 1;
                    return false;
                };
                let Some(s) = self.slot(k) else { return false };
                s.ends += 1;
                let out_of_order = s.replies != 1 || s.next_chunk != chunks;
                let (dup, sent) = (s.ends > 1, s.sent_us);
                if out_of_order {
                    self.order_violations += 1;
                }
                if dup {
                    self.dup_ends += 1;
                    return false;
                }
                if win && sent > 0 {
                    self.stream_lat.push(now.saturating_sub(sent) as u32);
                }
                self.complete(k, win)
            }
            Some("ERROR") => {
                count_into(
                    &mut self.errors,
                    v["payload"]["code"].as_str().unwrap_or("?"),
                );
                false
            }
            Some("PRESENCE") | Some("SYSTEM_LOG") | Some("BUTLER_AGENT_MESSAGE") => false,
            _ => {
                self.unknown += 1;
                false
            }
        }
    }
}

/// "rt K T …" → (K, T).
fn parse_rt(p: &str) -> Option<(usize, u64)> {
    let mut it = p.split(' ');
    (it.next()? == "rt").then_some(())?;
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn stream_seq(v: &Value) -> Option<usize> {
    v["stream_id"].as_str()?.strip_prefix('s')?.parse().ok()
}

fn request(k: u64, target: i64, pad: &str) -> Value {
    json!({"type": "CHAT", "target_id": target, "local_id": format!("l{k}"),
           "payload": format!("rt {k} {} {pad}", now_us())})
}

/// What one human's sender did.
struct SendReport {
    sent: u64,
    max_lag: Duration,
    send_failures: u64,
}

/// Open loop: sends request k at start + offset + k·interval, to agents round-robin.
#[allow(clippy::too_many_arguments)]
fn paced_sender(
    mut w: WebSocket<TcpStream>,
    idx: usize,
    humans: usize,
    agents: Arc<Vec<i64>>,
    interval: Duration,
    start: Instant,
    end: Instant,
    pad: String,
) -> SendReport {
    let offset = interval.mul_f64(idx as f64 / humans as f64);
    let mut r = SendReport {
        sent: 0,
        max_lag: Duration::ZERO,
        send_failures: 0,
    };
    for k in 0u64.. {
        let due = start + offset + interval.mul_f64(k as f64);
        if due >= end {
            break;
        }
        r.max_lag = r.max_lag.max(sleep_until(due));
        let target = agents[(k as usize * humans + idx) % agents.len()];
        if send_json(&mut w, &request(k, target, &pad)).is_err() {
            r.send_failures += 1;
            break;
        }
        r.sent = k + 1;
    }
    r
}

/// Closed loop on one human: `inflight` requests outstanding until `end`, then drain.
#[allow(clippy::too_many_arguments)]
fn closed_loop_human(
    mut sp: Split,
    rx: &mut HumanRx,
    idx: usize,
    humans: usize,
    agents: &[i64],
    inflight: usize,
    end: Instant,
    drain_until: Instant,
    pad: &str,
) -> SendReport {
    let mut r = SendReport {
        sent: 0,
        max_lag: Duration::ZERO,
        send_failures: 0,
    };
    let _ = sp.ctl.set_read_timeout(Some(Duration::from_millis(100)));
    let mut next_k = 0u64;
    let mut send_next = |w: &mut WebSocket<TcpStream>, r: &mut SendReport| {
        let target = agents[(next_k as usize * humans + idx) % agents.len()];
        if send_json(w, &request(next_k, target, pad)).is_err() {
            r.send_failures += 1;
            return false;
        }
        next_k += 1;
        r.sent = next_k;
        true
    };
    for _ in 0..inflight {
        if !send_next(&mut sp.writer, &mut r) {
            return r;
        }
    }
    let mut outstanding = inflight as u64;
    loop {
        let now = Instant::now();
        if now >= drain_until || (now >= end && outstanding == 0) {
            break;
        }
        match sp.reader.read() {
            Ok(msg) => {
                let Some(text) = text_of(&msg) else { continue };
                if rx.handle(text) {
                    outstanding = outstanding.saturating_sub(1);
                    if Instant::now() < end {
                        if !send_next(&mut sp.writer, &mut r) {
                            break;
                        }
                        outstanding += 1;
                    }
                }
            }
            Err(e) if is_timeout(&e) => continue,
            Err(_) => break,
        }
    }
    // The socket stays open (main holds a clone) until the server's CPU has been sampled:
    // closing it here would end the server's threads for it and lose their CPU time.
    r
}

fn chat_scenario(c: &Common, a: &ChatArgs) -> Res<Value> {
    let scenario = if a.stream { "stream" } else { "chat" };
    let tag = if a.stream {
        "s"
    } else if a.closed_loop > 0 {
        "k"
    } else {
        "r"
    };
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let agent_names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-{tag}a{i}", c.prefix))
        .collect();
    let human_names: Vec<String> = (0..a.humans)
        .map(|i| format!("{}-{tag}h{i}", c.prefix))
        .collect();
    let agents = register_agents(c.addr, &jwt, &agent_names)?;
    let humans = create_humans(c.addr, &jwt, &human_names, "MEMBER")?;
    note!("{} humans, {} agents ready", humans.len(), agents.len());

    let agent_tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let human_tokens: Vec<&str> = humans.iter().map(|x| x.token.as_str()).collect();
    let agent_socks = open_all_ok(c.addr, &agent_tokens, "agent")?;
    let mut ctls = Vec::new();
    let mut agent_threads = Vec::new();
    for (i, s) in agent_socks.into_iter().enumerate() {
        ctls.push(s.try_clone().map_err(|e| e.to_string())?);
        let ws = WebSocket::from_raw_socket(s, Role::Client, Some(ws_config()));
        let (chunks, gap) = (a.chunks, a.chunk_gap);
        agent_threads.push(spawn_small(format!("agent-{i}"), move || {
            agent_loop(ws, chunks, gap)
        })?);
    }
    let human_socks = open_all_ok(c.addr, &human_tokens, "human")?;
    // Let the PRESENCE frames of the agents' connects pass before measuring.
    std::thread::sleep(Duration::from_millis(500));

    let agent_ids = Arc::new(agents.iter().map(|x| x.id).collect::<Vec<_>>());
    let pad: String = "x".repeat(a.payload_bytes);
    let done: Vec<Arc<AtomicU64>> = (0..a.humans).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let observer = Observer::start(c, true);
    let start = Instant::now();
    let end = start + a.duration;
    let drain_until = end + a.drain;
    let start_us = now_us();
    let window = if a.closed_loop > 0 {
        (
            start_us + a.warmup.as_micros() as u64,
            start_us + a.duration.as_micros() as u64,
        )
    } else {
        (0, u64::MAX)
    };

    let mut rxs: Vec<HumanRx> = Vec::new();
    let mut sends: Vec<SendReport> = Vec::new();
    if a.closed_loop > 0 {
        let mut threads = Vec::new();
        for (i, s) in human_socks.into_iter().enumerate() {
            let sp = split(s)?;
            ctls.push(sp.ctl.try_clone().map_err(|e| e.to_string())?);
            let inflight = a.closed_loop / a.humans + usize::from(i < a.closed_loop % a.humans);
            let (ids, pad, me, chunks, d) = (
                agent_ids.clone(),
                pad.clone(),
                humans[i].id,
                a.chunks,
                done[i].clone(),
            );
            let nh = a.humans;
            threads.push(spawn_small(format!("human-{i}"), move || {
                let mut rx = HumanRx::new(me, chunks, window, d);
                let r =
                    closed_loop_human(sp, &mut rx, i, nh, &ids, inflight, end, drain_until, &pad);
                (rx, r)
            })?);
        }
        for t in threads {
            let (rx, r) = t.join().map_err(|_| "a human thread panicked")?;
            rxs.push(rx);
            sends.push(r);
        }
    } else {
        let interval = Duration::from_secs_f64(a.humans as f64 / a.rate);
        let mut readers = Vec::new();
        let mut senders = Vec::new();
        for (i, s) in human_socks.into_iter().enumerate() {
            let Split {
                writer,
                mut reader,
                ctl,
            } = split(s)?;
            ctls.push(ctl);
            let (me, chunks, d) = (humans[i].id, a.chunks, done[i].clone());
            readers.push(spawn_small(format!("human-rx-{i}"), move || {
                let mut rx = HumanRx::new(me, chunks, window, d);
                loop {
                    match reader.read() {
                        Ok(m) => {
                            if let Some(t) = text_of(&m) {
                                rx.handle(t);
                            }
                        }
                        Err(e) if is_timeout(&e) => continue,
                        Err(_) => break,
                    }
                }
                rx
            })?);
            let (ids, pad, nh) = (agent_ids.clone(), pad.clone(), a.humans);
            senders.push(spawn_small(format!("human-tx-{i}"), move || {
                paced_sender(writer, i, nh, ids, interval, start, end, pad)
            })?);
        }
        for t in senders {
            sends.push(t.join().map_err(|_| "a sender thread panicked")?);
        }
        let sent_total: u64 = sends.iter().map(|s| s.sent).sum();
        // Drain: wait until every request is answered, or give up at the deadline.
        while Instant::now() < drain_until {
            let done_total: u64 = done.iter().map(|d| d.load(Relaxed)).sum();
            if done_total >= sent_total {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let measured = observer.finish();
        shutdown_all(&ctls);
        for t in readers {
            rxs.push(t.join().map_err(|_| "a reader thread panicked")?);
        }
        return chat_report(
            scenario,
            a,
            rxs,
            sends,
            finish_agents(agent_threads)?,
            measured,
        );
    }
    let measured = observer.finish();
    shutdown_all(&ctls);
    chat_report(
        scenario,
        a,
        rxs,
        sends,
        finish_agents(agent_threads)?,
        measured,
    )
}

fn finish_agents(threads: Vec<JoinHandle<AgentReport>>) -> Res<AgentReport> {
    let mut total = AgentReport::default();
    for t in threads {
        let r = t.join().map_err(|_| "an agent thread panicked")?;
        total.requests += r.requests;
        total.frames_sent += r.frames_sent;
        total.send_failures += r.send_failures;
        merge_counts(&mut total.errors, r.errors);
    }
    Ok(total)
}

fn chat_report(
    scenario: &str,
    a: &ChatArgs,
    rxs: Vec<HumanRx>,
    sends: Vec<SendReport>,
    agents: AgentReport,
    measured: Value,
) -> Res<Value> {
    let sent: u64 = sends.iter().map(|s| s.sent).sum();
    let send_failures: u64 = sends.iter().map(|s| s.send_failures).sum();
    let max_lag = sends.iter().map(|s| s.max_lag).max().unwrap_or_default();
    let (mut rtt, mut echo, mut chunk, mut stream) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut errors = BTreeMap::new();
    let (mut answered, mut echoed, mut replies, mut echoes) = (0u64, 0u64, 0u64, 0u64);
    let (mut dup_replies, mut dup_echoes, mut bad_echo, mut order, mut unknown) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut chunks, mut ends, mut dup_ends, mut in_window, mut complete_chunks) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (rx, s) in rxs.into_iter().zip(&sends) {
        let slots = &rx.slots[..(s.sent as usize).min(rx.slots.len())];
        answered += slots
            .iter()
            .filter(|x| {
                if rx.chunks == 0 {
                    x.replies > 0
                } else {
                    x.ends > 0
                }
            })
            .count() as u64;
        echoed += slots.iter().filter(|x| x.echoes > 0).count() as u64;
        complete_chunks += slots.iter().filter(|x| x.next_chunk == rx.chunks).count() as u64;
        replies += rx.replies_received;
        echoes += rx.echoes_received;
        dup_replies += rx.dup_replies;
        dup_echoes += rx.dup_echoes;
        bad_echo += rx.bad_echo;
        order += rx.order_violations;
        unknown += rx.unknown;
        chunks += rx.chunks_received;
        ends += rx.ends_received;
        dup_ends += rx.dup_ends;
        in_window += rx.in_window;
        rtt.extend(rx.rtt);
        echo.extend(rx.echo_lat);
        chunk.extend(rx.chunk_lat);
        stream.extend(rx.stream_lat);
        merge_counts(&mut errors, rx.errors);
    }
    let mut out = json!({
        "scenario": scenario,
        "mode": if a.closed_loop > 0 { "closed" } else { "open" },
        "humans": a.humans,
        "agents": a.agents,
        "duration_s": a.duration.as_secs_f64(),
        "sent": sent,
        "received": replies,
        "answered": answered,
        "lost": sent - answered,
        "duplicated": dup_replies,
        "echo": {"received": echoes, "lost": sent - echoed, "duplicated": dup_echoes, "bad": bad_echo,
                 "latency": latency(echo)},
        "send_failures": send_failures,
        "max_send_lag_ms": ms(max_lag.as_micros() as u64),
        "errors": errors,
        "unknown_frames": unknown,
        "agent_side": {"requests": agents.requests, "frames_sent": agents.frames_sent,
                       "send_failures": agents.send_failures, "errors": agents.errors},
        "observed": measured,
    });
    if a.closed_loop > 0 {
        let window = (a.duration - a.warmup).as_secs_f64();
        out["closed_loop"] = json!(a.closed_loop);
        out["warmup_s"] = json!(a.warmup.as_secs_f64());
        out["rt_per_s"] = json!(round2(in_window as f64 / window));
    } else {
        out["rate_offered"] = json!(a.rate);
        out["rt_per_s"] = json!(round2(answered as f64 / a.duration.as_secs_f64()));
    }
    if a.stream {
        out["chunks_per_stream"] = json!(a.chunks);
        out["chunks_received"] = json!(chunks);
        out["chunks_expected"] = json!(sent * a.chunks as u64);
        out["streams_with_all_chunks"] = json!(complete_chunks);
        out["ends_received"] = json!(ends);
        out["duplicated_ends"] = json!(dup_ends);
        out["order_violations"] = json!(order);
        out["order_kept"] = json!(order == 0);
        out["chunk_latency"] = latency(chunk);
        out["stream_latency"] = latency(stream);
        out["final_latency"] = latency(rtt);
    } else {
        out["latency"] = latency(rtt);
    }
    Ok(out)
}

// ----- logs ----------------------------------------------------------------------------------

/// What one dashboard received: per (agent, seq) a count.
struct DashRx {
    per_agent: usize,
    counts: Vec<u16>,
    lat: Vec<u32>,
    received: u64,
    dup: u64,
    foreign: u64,
    errors: BTreeMap<String, u64>,
    unique: Arc<AtomicU64>,
}

impl DashRx {
    fn handle(&mut self, text: &str) {
        let now = now_us();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        match v["type"].as_str() {
            Some("SYSTEM_LOG") => {
                let parsed = v["payload"]["content"].as_str().and_then(|c| {
                    let mut it = c.split(' ');
                    (it.next() == Some("el")).then_some(())?;
                    Some((
                        it.next()?.parse::<usize>().ok()?,
                        it.next()?.parse::<usize>().ok()?,
                        it.next()?.parse::<u64>().ok()?,
                    ))
                });
                let Some((a, s, t)) = parsed else {
                    self.foreign += 1;
                    return;
                };
                if s >= self.per_agent || a * self.per_agent + s >= self.counts.len() {
                    self.foreign += 1;
                    return;
                }
                self.received += 1;
                let c = &mut self.counts[a * self.per_agent + s];
                *c = c.saturating_add(1);
                if *c > 1 {
                    self.dup += 1;
                } else {
                    self.unique.fetch_add(1, Relaxed);
                    self.lat.push(now.saturating_sub(t) as u32);
                }
            }
            Some("ERROR") => count_into(
                &mut self.errors,
                v["payload"]["code"].as_str().unwrap_or("?"),
            ),
            _ => {}
        }
    }
}

/// Sends SYSTEM_LOG for a slice of agents: agent i of the slice at start + (k·n + i)·interval.
fn log_sender(
    mut ws: Vec<(usize, WebSocket<TcpStream>)>,
    rate: f64,
    offset: Duration,
    start: Instant,
    end: Instant,
) -> (Vec<(usize, u64)>, Duration, u64) {
    let n = ws.len();
    let mut sent = vec![0u64; n];
    let mut max_lag = Duration::ZERO;
    let mut failures = 0;
    let mut dead = vec![false; n];
    let interval = Duration::from_secs_f64(1.0 / (rate * n as f64));
    for j in 0u64.. {
        let due = start + offset + interval.mul_f64(j as f64);
        if due >= end {
            break;
        }
        let i = (j % n as u64) as usize;
        if dead[i] {
            continue;
        }
        max_lag = max_lag.max(sleep_until(due));
        let (a, w) = &mut ws[i];
        let frame = json!({"type": "SYSTEM_LOG", "payload": {"level": "INFO",
                           "content": format!("el {a} {} {}", sent[i], now_us())}});
        if send_json(w, &frame).is_err() {
            failures += 1;
            dead[i] = true;
            continue;
        }
        sent[i] += 1;
    }
    (
        ws.iter().map(|x| x.0).zip(sent).collect(),
        max_lag,
        failures,
    )
}

fn logs_scenario(c: &Common, a: &LogsArgs) -> Res<Value> {
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-la{i}", c.prefix))
        .collect();
    let agents = register_agents(c.addr, &jwt, &names)?;
    // Dashboards are admin connections; one user may hold 16, so add admins beyond that.
    let extra = a.dashboards.saturating_sub(1).div_euclid(16);
    let extra_names: Vec<String> = (0..extra).map(|i| format!("{}-ld{i}", c.prefix)).collect();
    let mut dash_tokens = vec![jwt.clone()];
    dash_tokens.extend(
        create_humans(c.addr, &jwt, &extra_names, "ADMIN")?
            .into_iter()
            .map(|x| x.token),
    );
    let dash_tok: Vec<&str> = (0..a.dashboards)
        .map(|i| dash_tokens[i / 16].as_str())
        .collect();

    let per_agent = (a.rate * a.duration.as_secs_f64()).ceil() as usize + 2;
    let unique: Vec<Arc<AtomicU64>> = (0..a.dashboards)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let mut ctls = Vec::new();
    let mut dash_threads = Vec::new();
    for (i, s) in open_all_ok(c.addr, &dash_tok, "dashboard")?
        .into_iter()
        .enumerate()
    {
        ctls.push(s.try_clone().map_err(|e| e.to_string())?);
        let mut ws = WebSocket::from_raw_socket(s, Role::Client, Some(ws_config()));
        let mut rx = DashRx {
            per_agent,
            counts: vec![0; per_agent * a.agents],
            lat: Vec::new(),
            received: 0,
            dup: 0,
            foreign: 0,
            errors: BTreeMap::new(),
            unique: unique[i].clone(),
        };
        dash_threads.push(spawn_small(format!("dash-{i}"), move || {
            loop {
                match ws.read() {
                    Ok(m) => {
                        if let Some(t) = text_of(&m) {
                            rx.handle(t);
                        }
                    }
                    Err(e) if is_timeout(&e) => continue,
                    Err(_) => break,
                }
            }
            rx
        })?);
    }
    let agent_tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let mut writers: Vec<Vec<(usize, WebSocket<TcpStream>)>> =
        (0..a.senders.min(a.agents)).map(|_| Vec::new()).collect();
    let mut agent_readers = Vec::new();
    let nw = writers.len();
    for (i, s) in open_all_ok(c.addr, &agent_tokens, "agent")?
        .into_iter()
        .enumerate()
    {
        let Split {
            writer,
            mut reader,
            ctl,
        } = split(s)?;
        ctls.push(ctl);
        writers[i % nw].push((i, writer));
        agent_readers.push(spawn_small(format!("agent-rx-{i}"), move || {
            let mut errors = BTreeMap::new();
            loop {
                match reader.read() {
                    Ok(m) => {
                        let v = text_of(&m).and_then(|t| serde_json::from_str::<Value>(t).ok());
                        if let Some(v) = v {
                            if v["type"] == "ERROR" {
                                count_into(
                                    &mut errors,
                                    v["payload"]["code"].as_str().unwrap_or("?"),
                                );
                            }
                        }
                    }
                    Err(e) if is_timeout(&e) => continue,
                    Err(_) => break,
                }
            }
            errors
        })?);
    }
    note!("{} agents, {} dashboards connected", a.agents, a.dashboards);
    std::thread::sleep(Duration::from_millis(500));

    let observer = Observer::start(c, true);
    let start = Instant::now();
    let end = start + a.duration;
    let mut senders = Vec::new();
    for (w, group) in writers.into_iter().enumerate() {
        let offset = Duration::from_secs_f64(w as f64 / (a.rate * a.agents as f64));
        let rate = a.rate;
        senders.push(spawn_small(format!("log-tx-{w}"), move || {
            log_sender(group, rate, offset, start, end)
        })?);
    }
    let mut sent = vec![0u64; a.agents];
    let mut max_lag = Duration::ZERO;
    let mut send_failures = 0;
    for t in senders {
        let (counts, lag, f) = t.join().map_err(|_| "a sender thread panicked")?;
        for (i, n) in counts {
            sent[i] = n;
        }
        max_lag = max_lag.max(lag);
        send_failures += f;
    }
    let total: u64 = sent.iter().sum();
    let drain_until = end + a.drain;
    while Instant::now() < drain_until && unique.iter().any(|u| u.load(Relaxed) < total) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let measured = observer.finish();
    shutdown_all(&ctls);
    let mut dashboards = Vec::new();
    let mut all_lat = Vec::new();
    let mut errors = BTreeMap::new();
    let (mut lost_total, mut dup_total) = (0u64, 0u64);
    for t in dash_threads {
        let rx = t.join().map_err(|_| "a dashboard thread panicked")?;
        // Delivered = distinct (agent, seq) pairs that were actually sent.
        let delivered: u64 = (0..a.agents)
            .map(|i| {
                rx.counts[i * per_agent..i * per_agent + sent[i] as usize]
                    .iter()
                    .filter(|&&c| c > 0)
                    .count() as u64
            })
            .sum();
        lost_total += total - delivered;
        dup_total += rx.dup;
        let lat = latency(rx.lat.clone());
        dashboards.push(json!({"delivered": delivered, "sent": total, "ratio": if total > 0 { delivered as f64 / total as f64 } else { 0.0 },
                                "lost": total - delivered, "duplicated": rx.dup, "other_logs": rx.foreign,
                                "p99_ms": lat["p99_ms"]}));
        all_lat.extend(rx.lat);
        merge_counts(&mut errors, rx.errors);
    }
    let mut agent_errors = BTreeMap::new();
    for t in agent_readers {
        merge_counts(
            &mut agent_errors,
            t.join().map_err(|_| "an agent thread panicked")?,
        );
    }
    let secs = a.duration.as_secs_f64();
    Ok(json!({
        "scenario": "logs",
        "agents": a.agents,
        "rate_per_agent": a.rate,
        "dashboards": a.dashboards,
        "duration_s": secs,
        "sent": total,
        "sent_per_s": round2(total as f64 / secs),
        "lost": lost_total,
        "duplicated": dup_total,
        "per_dashboard": dashboards,
        "latency": latency(all_lat),
        "max_send_lag_ms": ms(max_lag.as_micros() as u64),
        "send_failures": send_failures,
        "errors_to_dashboards": errors,
        "errors_to_agents": agent_errors,
        "observed": measured,
    }))
}
