//! The WebSocket side of a connection: the upgrade checks, then two threads per connection.
//!
//! tungstenite cannot split a socket, and a pong written by the reader in the middle of one of
//! the writer's frames would corrupt the stream. So each connection gets two `WebSocket`
//! values over one shared `TcpStream` (one descriptor: `&TcpStream` reads and writes):
//! - the reader (`reader.rs`) hands every message to the connection's `hub::Session` and
//!   nothing else; its writes go nowhere (`ReadHalf`), and pings and closes it receives are
//!   answered by asking the writer;
//! - the writer (`writer.rs`) owns every byte written: the store-and-forward replay, data
//!   frames from the hub's queue, pongs, pings, close frames. It also runs the liveness
//!   timer and the credential re-check.
//!
//! This module moves bytes; what the frames mean is the hub's business.

mod echo;
mod reader;
mod writer;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tungstenite::WebSocket;

pub use echo::{serve_echo, ECHO_PATH};

use crate::app::{App, THREAD_STACK};
use crate::auth::{self, AuthFailure};
use crate::head::{respond_error, respond_error_with, Head};
use crate::hub::{Conn, ConnQueues, RegisterError};
use crate::identity::Principal;
use crate::wire::Close;
use crate::{log_debug, log_info, log_refusal, log_warn};

/// A write that makes no progress for this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completes (or refuses) an upgrade on `/api/ws`, then serves the connection until it ends.
/// Never inlined into the connection's thread entry, whose other callees' frames would add
/// to it for the connection's whole life (see `head::read_head`).
#[inline(never)]
pub fn serve(app: &Arc<App>, mut stream: TcpStream, head: Head, leftover: Vec<u8>, peer: IpAddr) {
    let (principal, key) = match check_upgrade(app, &head, peer) {
        Ok(p) => p,
        Err(refusal) => {
            // One line for the operator (the path only: the query may carry the token).
            let detail: Vec<String> = refusal
                .fields
                .iter()
                .map(|(k, v)| format!("{k} {v:?}"))
                .collect();
            log_refusal!(
                "ws {peer}: {} {}{}{}",
                refusal.status,
                refusal.error,
                refusal
                    .user
                    .as_deref()
                    .map(|u| format!(" (user {u})"))
                    .unwrap_or_default(),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", detail.join(", "))
                }
            );
            let headers: Vec<(&str, &str)> = refusal
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            let fields: Vec<(&str, &str)> = refusal
                .fields
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            respond_error_with(
                &mut stream,
                refusal.status,
                refusal.error,
                &fields,
                &headers,
            );
            return;
        }
    };
    let (conn, queues, first) = match app.hub.register(principal) {
        Ok(r) => r,
        Err(RegisterError::TooManyForUser) => {
            app.hub.metrics.limit("user_connections");
            log_refusal!("ws {peer}: 429 too many connections for this user");
            respond_error(&mut stream, 429, "too many connections for this user", &[]);
            return;
        }
    };
    // A rotation or deletion that landed between authentication and registration would
    // have missed this connection: check again now that it is registered.
    if app.hub.credentials_revoked(&conn.principal).is_some() {
        app.hub.unregister(&conn);
        respond_error(&mut stream, 401, "invalid credentials", &[]);
        return;
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).is_err() {
        app.hub.unregister(&conn);
        return;
    }
    log_info!(
        "ws: {} {} ({}) connected as connection {}",
        conn.principal.role.as_str(),
        conn.principal.id,
        conn.principal.username,
        conn.id
    );
    run_connection(app, stream, leftover, conn, queues, first);
}

/// Why an upgrade was refused: the HTTP answer, and who asked if that is known.
struct Refusal {
    status: u16,
    error: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Fields of the body beside `error` (what a check compared).
    fields: Vec<(&'static str, String)>,
    user: Option<String>,
}

fn refusal(status: u16, error: &'static str) -> Refusal {
    Refusal {
        status,
        error,
        headers: Vec::new(),
        fields: Vec::new(),
        user: None,
    }
}

/// Whether the head is a WebSocket opening handshake at all (RFC 6455 section 4.1: GET,
/// HTTP/1.1 or later, `Upgrade: websocket`, `Connection: upgrade`).
fn is_upgrade(head: &Head) -> bool {
    head.method == "GET"
        && head.version >= 1
        && head
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && head.header("connection").is_some_and(|c| {
            c.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// A `Sec-WebSocket-Key` is the base64 of a 16-byte nonce (RFC 6455 section 4.1).
fn valid_key(key: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|nonce| nonce.len() == 16)
}

/// The checks of SPEC section 4 (the connection cap was checked at accept), except that the
/// handshake itself is checked before the token: answering 426 for a good token and 401 for
/// a bad one would let anyone test tokens without completing an upgrade. An address with too
/// many failed authentications is refused before its token is looked at.
fn check_upgrade(app: &App, head: &Head, peer: IpAddr) -> Result<(Principal, String), Refusal> {
    if !is_upgrade(head) {
        return Err(refusal(426, "websocket upgrade required"));
    }
    if head.header("sec-websocket-version") != Some("13") {
        let mut r = refusal(400, "unsupported websocket version");
        r.headers.push(("Sec-WebSocket-Version", "13".into()));
        return Err(r);
    }
    let key = match head.header("sec-websocket-key") {
        Some(k) if valid_key(k) => k.to_string(),
        _ => return Err(refusal(400, "invalid Sec-WebSocket-Key")),
    };
    let token = head
        .query_param("token")
        .filter(|t| !t.is_empty())
        .or_else(|| {
            auth::parse_bearer(head.header("authorization"))
                .ok()
                .map(str::to_string)
        });
    let Some(token) = token else {
        app.hub.metrics.auth_failures.fetch_add(1, Relaxed);
        return Err(refusal(401, "token is required"));
    };
    if let Some(wait) = app.token_failures.retry_after(peer) {
        app.hub.metrics.limit("auth_throttled");
        let mut r = refusal(429, "too many failed authentications");
        r.headers.push(("Retry-After", wait.to_string()));
        return Err(r);
    }
    let principal = match app.authenticate(&token) {
        Ok(p) => p,
        Err(AuthFailure::Invalid) => {
            app.hub.metrics.auth_failures.fetch_add(1, Relaxed);
            app.token_failures.record_failure(peer);
            return Err(refusal(401, "invalid credentials"));
        }
        Err(AuthFailure::Unavailable) => return Err(refusal(500, "internal server error")),
    };
    if let Some(origin) = head.header("origin") {
        let host = head.header("host");
        if !app.origin_allowed(origin, host) {
            // Say what was compared: behind a proxy that rewrites Host this is the whole
            // story (pass Host through, or list the origin in --allowed-origins).
            let mut r = refusal(403, "origin not allowed");
            r.fields.push(("origin", origin.to_string()));
            r.fields.push(("host", host.unwrap_or("").to_string()));
            r.user = Some(principal.username);
            return Err(r);
        }
    }
    Ok((principal, key))
}

fn ws_config(app: &App) -> WebSocketConfig {
    // Small buffers: thousands of idle agents matter more than peak throughput of one.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(app.config.max_message_bytes))
        .max_frame_size(Some(app.config.max_message_bytes))
}

fn run_connection(
    app: &Arc<App>,
    stream: TcpStream,
    leftover: Vec<u8>,
    conn: Arc<Conn>,
    queues: ConnQueues,
    first: bool,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    // One descriptor per connection, shared by the two threads.
    let stream = Arc::new(stream);
    let write_stream = WriteHalf(stream.clone());
    // Store and forward: a machine's first connection replays what it missed (the writer
    // sends it, page by page, before any live frame).
    let replay = if first {
        app.hub.replay_for(&conn.principal)
    } else {
        None
    };
    let writer = {
        let app = app.clone();
        let conn = conn.clone();
        let config = ws_config(&app);
        std::thread::Builder::new()
            .name(format!("ws-writer-{}", conn.id))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let ws = WebSocket::from_raw_socket(write_stream, WsRole::Server, Some(config));
                writer::run(&app, &conn, queues, ws, replay);
            })
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            log_warn!("ws: cannot start a writer thread: {e}");
            let _ = stream.shutdown(Shutdown::Both);
            app.hub.unregister(&conn);
            return;
        }
    };
    let mut ws = WebSocket::from_partially_read(
        ReadHalf::new(stream, app.config.max_message_bytes),
        leftover,
        WsRole::Server,
        Some(ws_config(app)),
    );
    reader::run(app, &conn, &mut ws);
    conn.mark_reader_done();
    // Whatever ended the reader, make sure the writer ends too, then leave the registry.
    conn.close(Close::Normal);
    let _ = writer.join();
    let _ = ws.get_ref().stream.shutdown(Shutdown::Both);
    app.hub.unregister(&conn);
    log_debug!("ws: connection {} closed", conn.id);
}

/// The read side of the socket. Its writes are discarded: the writer thread owns the wire.
///
/// While `buffered_only` is set, a read that would need the socket fails with `WouldBlock`
/// instead of blocking: tungstenite then hands out only the frames already in its buffer,
/// and keeps a partial one for later (it supports non-blocking streams).
///
/// Every message the session sees is counted against the frame rate, but tungstenite takes
/// continuation frames (and their fragments' headers) without returning anything, so a
/// client could make the reader parse millions of empty fragments a second. The reader
/// resets `since_message` whenever a message comes out; past `max_since_message` bytes
/// without one, the read fails (`FragmentFlood`) and the connection is closed (1009).
struct ReadHalf {
    stream: Arc<TcpStream>,
    buffered_only: bool,
    since_message: usize,
    max_since_message: usize,
}

/// The error `ReadHalf` fails with when too many bytes came without a message.
#[derive(Debug)]
struct FragmentFlood;

impl std::fmt::Display for FragmentFlood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("too many bytes without a complete message")
    }
}

impl std::error::Error for FragmentFlood {}

impl ReadHalf {
    fn new(stream: Arc<TcpStream>, max_message_bytes: usize) -> ReadHalf {
        ReadHalf {
            stream,
            buffered_only: false,
            since_message: 0,
            // A message at its largest, cut into one-byte fragments (seven bytes each with
            // their masked headers), fits; nothing an honest client sends comes near.
            max_since_message: 8 * max_message_bytes + 64 * 1024,
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.buffered_only {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.since_message > self.max_since_message {
            return Err(io::Error::new(io::ErrorKind::InvalidData, FragmentFlood));
        }
        let n = (&*self.stream).read(buf)?;
        self.since_message += n;
        Ok(n)
    }
}

/// The write side of the socket, for the writer thread. Reading is the reader's job alone:
/// bytes taken here would be lost to it, so a read is refused.
struct WriteHalf(Arc<TcpStream>);

impl WriteHalf {
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }
}

impl Read for WriteHalf {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
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
