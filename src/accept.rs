//! The public port: the accept loop, connection slots, and the request head.
//!
//! Our own accept loop (which never dies on an accept error) owns the port. Each connection
//! takes a slot of `--max-connections` and of its client address's cap before any thread is
//! started, then gets a thread that reads the request head with a size cap (8 KiB, else 431)
//! and a deadline (10 s), and validates it (ASCII path and header values, else 400). The
//! client address is the peer, or, when the peer is a trusted proxy, the address its
//! `X-Forwarded-For` names. `/api/ws` is upgraded right there on the raw `TcpStream` (`ws`);
//! every other request goes to the HTTP bridge (`http::bridge`), which reads and bounds the
//! body before any HTTP worker sees it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::App;
use crate::log_warn;

pub const MAX_HEAD_BYTES: usize = 8 * 1024;
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Stack of every per-connection thread. Only touched pages count towards memory.
pub const THREAD_STACK: usize = 256 * 1024;

/// Open connections per client address, for `--max-connections-per-ip`.
#[derive(Default)]
pub struct Slots {
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// Accepts forever. An accept error (say, out of file descriptors) is logged and retried
/// after a pause; it never ends the loop.
pub fn accept_loop(app: Arc<App>, listener: TcpListener) {
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
        Ok(p) => p.ip().to_canonical(),
        Err(_) => return,
    };
    let Some(slot) = Slot::enter(app, peer) else {
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
        .spawn(move || handle_connection(&app2, stream, peer, slot));
    if let Err(e) = spawned {
        // The slot and stream moved into the closure were dropped with it.
        log_warn!("cannot start a connection thread: {e}");
    }
}

/// One slot of `--max-connections`, and of the per-address cap, held while a connection lives.
///
/// A direct client is counted under its own address at accept. A trusted proxy's connection
/// is not counted under the proxy's address (every client behind it shares that address);
/// once its head is read, it is counted under the client its `X-Forwarded-For` names.
struct Slot {
    app: Arc<App>,
    address: Option<IpAddr>,
}

impl Slot {
    fn enter(app: &Arc<App>, peer: IpAddr) -> Option<Slot> {
        let open = app.hub.open_sockets.fetch_add(1, Relaxed) + 1;
        let mut slot = Slot {
            app: app.clone(),
            address: None,
        };
        if open > app.config.max_connections {
            app.hub.metrics.limit("max_connections");
            return None; // the drop gives the global slot back
        }
        if app.trusts(peer) || slot.count(peer) {
            Some(slot)
        } else {
            None
        }
    }

    /// Counts this connection under `address`; false when that address is at its cap.
    fn count(&mut self, address: IpAddr) -> bool {
        let mut per = self
            .app
            .slots
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = per.entry(address).or_insert(0);
        if *n >= self.app.config.max_connections_per_ip {
            self.app.hub.metrics.limit("max_connections_per_ip");
            return false;
        }
        *n += 1;
        self.address = Some(address);
        true
    }

    /// After the head: a proxied connection is counted under its real client.
    fn assign(&mut self, client: IpAddr) -> bool {
        self.address.is_some() || self.app.trusts(client) || self.count(client)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.app.hub.open_sockets.fetch_sub(1, Relaxed);
        let Some(address) = self.address else { return };
        let mut per = self
            .app
            .slots
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                per.remove(&address);
            }
        }
    }
}

fn handle_connection(app: &Arc<App>, mut stream: TcpStream, peer: IpAddr, mut slot: Slot) {
    let (head, leftover) = match read_head(&mut stream) {
        Ok(h) => h,
        Err(e) => {
            let (status, body, limit) = match e {
                HeadError::TooLarge => (
                    431,
                    r#"{"error":"request header fields too large"}"#,
                    Some("head_too_large"),
                ),
                HeadError::Timeout => (408, r#"{"error":"request timeout"}"#, Some("head_timeout")),
                HeadError::Malformed => (400, r#"{"error":"bad request"}"#, None),
                HeadError::BadTarget => (400, r#"{"error":"invalid request target"}"#, None),
                HeadError::BadHeaderValue => (400, r#"{"error":"invalid header value"}"#, None),
                HeadError::Closed => return,
            };
            if let Some(limit) = limit {
                app.hub.metrics.limit(limit);
            }
            respond_json(&mut stream, status, body, &[]);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let client = client_address(app, peer, &head);
    if !slot.assign(client) {
        respond_json(
            &mut stream,
            503,
            r#"{"error":"server at connection limit"}"#,
            &[],
        );
        return;
    }
    // The path only: query strings may carry tokens.
    crate::log_debug!("{client} {} {}", head.method, head.path);
    if head.path == "/api/ws" {
        crate::ws::serve(app, stream, head, leftover, client);
    } else if head.path == crate::ws::ECHO_PATH && app.config.conformance_echo {
        crate::ws::serve_echo(app, stream, head, leftover);
    } else {
        app.bridge.serve(app, stream, &head, leftover, client);
    }
}

/// The peer, or the client a trusted proxy names: the right-most `X-Forwarded-For` entry
/// that is not itself a trusted proxy (entries further left were written by the client and
/// prove nothing).
pub fn client_address(app: &App, peer: IpAddr, head: &Head) -> IpAddr {
    if !app.trusts(peer) {
        return peer;
    }
    let forwarded: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .flat_map(|(_, v)| v.split(','))
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        let Some(ip) = parse_forwarded_ip(entry) else {
            break;
        };
        client = ip;
        if !app.trusts(ip) {
            break;
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = entry.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    None
}

/// The parsed head of a request.
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
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

    /// Every value of a header that may repeat, in order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
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

/// Writes a complete JSON response and closes (used before any worker is involved).
pub fn respond_json(stream: &mut TcpStream, status: u16, body: &str, extra: &[(&str, &str)]) {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
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

enum HeadError {
    TooLarge,
    Timeout,
    Malformed,
    /// The request target is not printable ASCII (a raw UTF-8 path, control bytes).
    BadTarget,
    /// A header value holds bytes outside printable ASCII, space and tab.
    BadHeaderValue,
    Closed,
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
                let head = validate_head(&req)?;
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

/// Only printable ASCII passes on: what the workers and handlers see is plain text, and a
/// byte they could not parse is refused here with a 400 instead of a dropped connection.
fn validate_head(req: &httparse::Request) -> Result<Head, HeadError> {
    let target = req.path.unwrap_or("/");
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HeadError::BadTarget);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let printable = h
            .value
            .iter()
            .all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\t');
        if !printable {
            return Err(HeadError::BadHeaderValue);
        }
        // Printable ASCII is valid UTF-8.
        let value = std::str::from_utf8(h.value).unwrap_or_default().trim();
        headers.push((h.name.to_string(), value.to_string()));
    }
    Ok(Head {
        method: req.method.unwrap_or("GET").to_string(),
        path,
        query,
        version: req.version.unwrap_or(1),
        headers,
    })
}
