//! The WebSocket side of a connection: the upgrade checks, then two threads per connection.
//!
//! tungstenite cannot split a socket, and a pong written by the reader in the middle of one of
//! the writer's frames would corrupt the stream. So each connection gets two `WebSocket`
//! values over one shared `TcpStream` (one descriptor: `&TcpStream` reads and writes):
//! - the reader's writes go nowhere (`ReadHalf`); pings it receives are answered by asking
//!   the writer, and so is a close frame;
//! - the writer thread owns every byte written: data frames from the hub's queue, pongs,
//!   pings, close frames. It also runs the liveness timer and the credential re-check.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::accept::{respond_json, Head};
use crate::app::App;
use crate::auth::{self, AuthFailure};
use crate::hub::{
    Conn, ConnQueues, Control, FrameError, Hub, InFlight, Outbound, RegisterError, Step,
};
use crate::identity::Principal;
use crate::wire::{self, Frame};
use crate::{clock, log_debug, log_info, log_warn};

/// Consecutive ERROR frames after which a connection is closed (1008).
const MAX_CONSECUTIVE_ERRORS: u32 = 100;
/// Most stored frames of one connection submitted but not yet routed. Their bytes are bounded
/// too: while frames are in flight only the read buffer is consulted, so they are one message
/// (≤ the message limit) plus what one 4 KiB read brought with it.
const MAX_IN_FLIGHT: usize = 64;
/// How long a connection may stay over its frame rate before it is closed (1008).
const RATE_LIMITED_CLOSE_AFTER: Duration = Duration::from_secs(10);
/// Frames the writer puts on the wire before one flush.
const WRITE_BATCH: usize = 64;
/// After our close frame, how long the peer has to answer before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// A write that makes no progress for this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completes (or refuses) an upgrade on `/api/ws`, then serves the connection until it ends.
pub fn serve(app: &Arc<App>, mut stream: TcpStream, head: Head, leftover: Vec<u8>, peer: IpAddr) {
    let (principal, key) = match check_upgrade(app, &head, peer) {
        Ok(p) => p,
        Err(refusal) => {
            let body = format!("{{\"error\":\"{}\"}}", refusal.error);
            let extra: Vec<(&str, &str)> = refusal
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            respond_json(&mut stream, refusal.status, &body, &extra);
            return;
        }
    };
    let (conn, queues, first) = match app.hub.register(principal) {
        Ok(r) => r,
        Err(RegisterError::TooManyForUser) => {
            app.hub.metrics.limit("user_connections");
            respond_json(
                &mut stream,
                429,
                r#"{"error":"too many connections for this user"}"#,
                &[],
            );
            return;
        }
    };
    // A rotation or deletion that landed between authentication and registration would
    // have missed this connection: check again now that it is registered.
    if crate::ws::credentials_revoked(app, &conn.principal).is_some() {
        app.hub.unregister(&conn);
        respond_json(&mut stream, 401, r#"{"error":"invalid credentials"}"#, &[]);
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

/// Why an upgrade was refused: the HTTP answer.
struct Refusal {
    status: u16,
    error: &'static str,
    headers: Vec<(&'static str, String)>,
}

fn refusal(status: u16, error: &'static str) -> Refusal {
    Refusal {
        status,
        error,
        headers: Vec::new(),
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
    let principal = match auth::authenticate(&app.store, &app.keys, &token) {
        Ok(p) => p,
        Err(AuthFailure::Invalid) => {
            app.hub.metrics.auth_failures.fetch_add(1, Relaxed);
            app.token_failures.record_failure(peer);
            return Err(refusal(401, "invalid credentials"));
        }
        Err(AuthFailure::Unavailable) => return Err(refusal(500, "internal server error")),
    };
    if let Some(origin) = head.header("origin") {
        if !app.origin_allowed(origin, head.header("host")) {
            return Err(refusal(403, "origin not allowed"));
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
    let replay = if first && !conn.principal.role.is_human() {
        app.hub.replay_range(&conn.principal)
    } else {
        None
    };
    let writer = {
        let app = app.clone();
        let conn = conn.clone();
        let config = ws_config(&app);
        std::thread::Builder::new()
            .name(format!("ws-writer-{}", conn.id))
            .stack_size(crate::accept::THREAD_STACK)
            .spawn(move || {
                let ws = WebSocket::from_raw_socket(write_stream, WsRole::Server, Some(config));
                run_writer(&app, &conn, queues, ws, replay);
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
        ReadHalf::new(stream),
        leftover,
        WsRole::Server,
        Some(ws_config(app)),
    );
    run_reader(app, &conn, &mut ws);
    conn.mark_reader_done();
    // Whatever ended the reader, make sure the writer ends too, then leave the registry.
    conn.close(1000, "");
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
struct ReadHalf {
    stream: Arc<TcpStream>,
    buffered_only: bool,
}

impl ReadHalf {
    fn new(stream: Arc<TcpStream>) -> ReadHalf {
        ReadHalf {
            stream,
            buffered_only: false,
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.buffered_only {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        (&*self.stream).read(buf)
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

/// Per-connection frame budget: a token bucket of `rate` per second with a burst of 2×.
/// Per-connection frame budget: a token bucket of `rate` per second with a burst of 2×.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
    /// Start of the current run of refusals; a run ends after a second with no refusal.
    limited_since: Option<Instant>,
    last_refused: Option<Instant>,
}

impl RateLimit {
    fn new(rate: u32) -> RateLimit {
        RateLimit {
            rate: rate as f64,
            tokens: 2.0 * rate as f64,
            last: Instant::now(),
            limited_since: None,
            last_refused: None,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(2.0 * self.rate);
        self.last = now;
        if self
            .last_refused
            .is_some_and(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.limited_since = None;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.limited_since.get_or_insert(now);
            self.last_refused = Some(now);
            false
        }
    }

    /// Over the rate, with no second of calm, for `RATE_LIMITED_CLOSE_AFTER`.
    fn limited_too_long(&self) -> bool {
        self.limited_since
            .is_some_and(|t| t.elapsed() >= RATE_LIMITED_CLOSE_AFTER)
    }
}

/// A connection's stored frames between their submission to the store and their routing,
/// in the order they were read. Frames that arrived together (already in the read buffer)
/// are submitted together and so share a commit; they are routed, oldest first, before the
/// reader waits on the socket again and before anything else is routed or sent for this
/// connection, which keeps every recipient's view in the order the frames were read.
#[derive(Default)]
struct Pipeline {
    in_flight: VecDeque<InFlight>,
    consecutive_errors: u32,
}

impl Pipeline {
    /// Routes every in-flight frame. False when their errors closed the connection.
    fn land_all(&mut self, hub: &Hub, conn: &Arc<Conn>) -> bool {
        let mut open = true;
        // A closing connection still routes the rest: their rows are stored, and their
        // recipients are waiting for them.
        while let Some(f) = self.in_flight.pop_front() {
            let landed = hub.land(conn, f);
            open &= self.record(hub, conn, landed);
        }
        open
    }

    /// Counts an outcome; an error becomes an ERROR frame. False when this error was the
    /// `MAX_CONSECUTIVE_ERRORS`th in a row (the connection is then closed).
    fn record(
        &mut self,
        hub: &Hub,
        conn: &Conn,
        outcome: Result<(), (FrameError, Option<String>)>,
    ) -> bool {
        let Err((e, local_id)) = outcome else {
            self.consecutive_errors = 0;
            return true;
        };
        send_error(hub, conn, e.code, &e.message, local_id.as_deref());
        self.consecutive_errors += 1;
        if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
            hub.metrics.limit("consecutive_errors");
            conn.close(1008, "too many errors");
            return false;
        }
        true
    }
}

fn run_reader(app: &App, conn: &Arc<Conn>, ws: &mut WebSocket<ReadHalf>) {
    let mut pipeline = Pipeline::default();
    read_frames(app, conn, ws, &mut pipeline);
    // Whatever ended the reading, every submitted frame is stored: route it.
    pipeline.land_all(&app.hub, conn);
}

fn read_frames(app: &App, conn: &Arc<Conn>, ws: &mut WebSocket<ReadHalf>, pipeline: &mut Pipeline) {
    let hub = &app.hub;
    let mut rate = RateLimit::new(app.config.max_frames_per_second);
    loop {
        // With frames in flight, take only what is already buffered; when that runs out,
        // route them before blocking on the socket.
        ws.get_mut().buffered_only = !pipeline.in_flight.is_empty();
        let message = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if e.kind() == io::ErrorKind::WouldBlock && ws.get_ref().buffered_only =>
            {
                if !pipeline.land_all(hub, conn) {
                    return;
                }
                continue;
            }
            Err(tungstenite::Error::Capacity(_)) => {
                hub.metrics.limit("message_too_large");
                pipeline.land_all(hub, conn);
                conn.close(1009, "message too big");
                return;
            }
            Err(tungstenite::Error::Utf8(_)) => {
                // Say why (ERROR bad_json), then fail the connection as RFC 6455 section 8.1
                // asks: when the bad bytes were in a fragment, tungstenite keeps the rest of
                // the message buffered, and reading on could splice the fragments that follow
                // into a different, valid-looking frame.
                pipeline.land_all(hub, conn);
                send_error(hub, conn, "bad_json", "text frame is not valid UTF-8", None);
                conn.close(1007, "invalid utf-8");
                return;
            }
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => return,
            Err(tungstenite::Error::Protocol(e)) => {
                log_debug!("ws: protocol error on connection {}: {e}", conn.id);
                pipeline.land_all(hub, conn);
                conn.close(1002, "protocol error");
                return;
            }
            Err(_) => return,
        };
        conn.touch();
        let text = match &message {
            Message::Text(t) => Ok(t.as_str()),
            Message::Binary(b) => std::str::from_utf8(b).map_err(|_| ()),
            Message::Ping(data) => {
                conn.pong(data.clone());
                continue;
            }
            Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(frame) => {
                // Echo the peer's code, as RFC 6455 section 5.5.1 asks.
                let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1000);
                pipeline.land_all(hub, conn);
                conn.close(if code == 1005 { 1000 } else { code }, "");
                return;
            }
        };
        if conn.is_closing() {
            return;
        }
        if !rate.allow() {
            if !pipeline.land_all(hub, conn) {
                return;
            }
            hub.metrics.limit("frame_rate_limited");
            let local_id = text.ok().and_then(crate::hub::peek_local_id);
            send_error(
                hub,
                conn,
                "rate_limited",
                "too many frames; this one was dropped",
                local_id.as_deref(),
            );
            if rate.limited_too_long() {
                conn.close(1008, "rate limited");
                return;
            }
            continue;
        }
        let parsed = match text {
            Ok(text) => hub.parse_frame(text),
            Err(()) => Err((
                crate::hub::FrameError {
                    code: "bad_json",
                    message: "binary frame is not UTF-8 JSON".into(),
                },
                None,
            )),
        };
        // A frame routed now, or an error about it, goes after every frame read before it.
        if !parsed.as_ref().is_ok_and(|env| env.is_stored()) && !pipeline.land_all(hub, conn) {
            return;
        }
        let step = parsed.and_then(|env| hub.handle(conn, env));
        let open = match step {
            Ok(Step::InFlight(f)) => {
                pipeline.in_flight.push_back(f);
                pipeline.in_flight.len() < MAX_IN_FLIGHT || pipeline.land_all(hub, conn)
            }
            Ok(Step::Done) => pipeline.record(hub, conn, Ok(())),
            Err(e) => pipeline.land_all(hub, conn) && pipeline.record(hub, conn, Err(e)),
        };
        if !open {
            return;
        }
    }
}

fn send_error(hub: &Hub, conn: &Conn, code: &'static str, message: &str, local_id: Option<&str>) {
    hub.metrics.error(code);
    let payload = crate::hub::raw_json(&wire::ErrorPayload { code, message });
    let now = clock::now_rfc3339();
    let mut frame = Frame::server("ERROR", Some(&payload), &now);
    frame.local_id = local_id;
    conn.send_direct(hub, "ERROR", frame.to_json(), None);
}

fn run_writer(
    app: &App,
    conn: &Arc<Conn>,
    queues: ConnQueues,
    mut ws: WebSocket<WriteHalf>,
    replay: Option<(i64, i64)>,
) {
    let close_code = serve_writes(app, conn, &queues, &mut ws, replay);
    if let Some((code, reason)) = close_code {
        conn.close(code, reason);
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        // Best effort: the peer may already be gone.
        let _ = ws.close(Some(frame));
        let _ = ws.flush();
        if code != 1000 {
            log_info!("ws: closed connection {} with {code} {reason}", conn.id);
        }
        // Half-close so the peer can still read our close frame and answer it; the reader
        // (blocked in read) ends on that answer. A peer that never answers gets the socket
        // torn down after the grace period (a read timeout set now would not reach a read
        // already in progress).
        let _ = ws.get_ref().shutdown(Shutdown::Write);
        let deadline = Instant::now() + CLOSE_GRACE;
        while !conn.reader_done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = ws.get_ref().shutdown(Shutdown::Both);
    } else {
        conn.close(1006, "");
        // The peer is gone: wake the reader, which is blocked in read().
        let _ = ws.get_ref().shutdown(Shutdown::Both);
    }
    // Frames still queued were never written: their rows stay undelivered and are replayed
    // on the next connect.
    while let Ok(frame) = queues.out.try_recv() {
        conn.dequeued(frame.text.len());
    }
}

/// The writer's loop. Returns the close to send, or None when the socket failed.
fn serve_writes(
    app: &App,
    conn: &Arc<Conn>,
    queues: &ConnQueues,
    ws: &mut WebSocket<WriteHalf>,
    replay: Option<(i64, i64)>,
) -> Option<(u16, &'static str)> {
    let hub = &app.hub;
    // Every stored frame up to the replay's end was in the replay; when one of them also
    // arrives live, it is not sent twice.
    let replayed_up_to = replay.map_or(0, |(_, to)| to);
    if let Some((from, to)) = replay {
        let mut next = from;
        while let (page, Some(last)) = hub.replay_page(&conn.principal, next, to) {
            let mut delivered = Vec::with_capacity(page.len());
            for frame in page {
                delivered.extend(frame.stored_id);
                ws.write(Message::Text(frame.text)).ok()?;
            }
            ws.flush().ok()?;
            hub.delivered(delivered);
            next = last + 1;
        }
        // What the replay left out (beyond the newest 1000, or too old) is never sent, and
        // so must not surface in a later replay behind newer frames.
        app.store.abandon_undelivered_below(conn.principal.id, from);
    }
    let ping_interval = app.config.ws_ping_interval;
    let mut next_ping = Instant::now() + ping_interval;
    loop {
        // The timer runs first on every turn, so a busy queue cannot starve pings, the
        // silence check or the credential re-check.
        let now = Instant::now();
        if now >= next_ping {
            next_ping = now + ping_interval;
            if let Some(close) = liveness_check(app, conn) {
                return Some(close);
            }
            ws.send(Message::Ping(Default::default())).ok()?;
        }
        let silence_deadline = silence_deadline(app, conn);
        let timeout = next_ping
            .min(silence_deadline)
            .saturating_duration_since(Instant::now());
        select! {
            recv(queues.ctl) -> ctl => match ctl {
                Ok(Control::Pong(data)) => ws.send(Message::Pong(data)).ok()?,
                Ok(Control::Close(code, reason)) => {
                    // What was queued before the close (the ACKs and echoes of a client's last
                    // burst, the ERROR that explains a close) goes out first, unless the close
                    // is because the peer does not read (1013) or does not answer (1011).
                    // Nothing is queued after a close, so this ends.
                    if !matches!(code, 1011 | 1013) {
                        while let Ok(first) = queues.out.try_recv() {
                            write_batch(hub, conn, ws, queues, first, replayed_up_to).ok()?;
                        }
                    }
                    return Some((code, reason));
                }
                Err(_) => return None,
            },
            recv(queues.out) -> first => {
                write_batch(hub, conn, ws, queues, first.ok()?, replayed_up_to).ok()?;
            }
            default(timeout) => {
                if Instant::now() >= silence_deadline {
                    hub.metrics.limit("ping_timeout");
                    return Some((1011, "ping timeout"));
                }
            }
        }
    }
}

/// When the connection will have been silent for the idle timeout.
fn silence_deadline(app: &App, conn: &Conn) -> Instant {
    let silent_ms = (clock::now_ms() - conn.last_activity_ms.load(Relaxed)).max(0) as u64;
    let limit = app.config.ws_idle_timeout;
    Instant::now() + limit.saturating_sub(Duration::from_millis(silent_ms))
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes once, then
/// records the stored frames addressed to this connection's user as delivered.
fn write_batch(
    hub: &Hub,
    conn: &Conn,
    ws: &mut WebSocket<WriteHalf>,
    queues: &ConnQueues,
    first: Outbound,
    replayed_up_to: i64,
) -> tungstenite::Result<()> {
    let mut delivered = Vec::new();
    let mut next = Some(first);
    let mut written = 0;
    while let Some(frame) = next.take() {
        conn.dequeued(frame.text.len());
        let skip = frame.stored_id.is_some_and(|id| id <= replayed_up_to);
        if !skip {
            delivered.extend(frame.stored_id);
            ws.write(Message::Text(frame.text))?;
        }
        written += 1;
        if written < WRITE_BATCH {
            next = queues.out.try_recv().ok();
        }
    }
    ws.flush()?;
    hub.delivered(delivered);
    Ok(())
}

/// Every liveness tick: is the peer still there, and is its credential still valid?
fn liveness_check(app: &App, conn: &Conn) -> Option<(u16, &'static str)> {
    let silent_ms = clock::now_ms() - conn.last_activity_ms.load(Relaxed);
    if silent_ms > app.config.ws_idle_timeout.as_millis() as i64 {
        app.hub.metrics.limit("ping_timeout");
        return Some((1011, "ping timeout"));
    }
    credentials_revoked(app, &conn.principal)
}

/// Why a session's credential no longer holds, if it does not.
pub fn credentials_revoked(app: &App, p: &Principal) -> Option<(u16, &'static str)> {
    match &p.token_hash {
        // A machine: its token must still be the current one (rotation from the CLI).
        Some(hash) => match app.store.token_hash_of(p.id) {
            Ok(Some(current)) if &current == hash => None,
            Ok(Some(_)) => Some((1008, "token revoked")),
            Ok(None) => Some((1008, "agent removed")),
            Err(_) => None,
        },
        // A human: the account must still exist and the JWT must not have expired.
        None => {
            if p.expires_at.is_some_and(|exp| exp <= clock::now_secs()) {
                return Some((1008, "token expired"));
            }
            match app.store.user_by_id(p.id) {
                Ok(Some(u)) if !u.deleted => None,
                Ok(_) => Some((1008, "user removed")),
                Err(_) => None,
            }
        }
    }
}

/// Where `--conformance-echo` serves its echo WebSocket.
pub const ECHO_PATH: &str = "/api/ws-echo";

/// Test only (`--conformance-echo`): an unauthenticated WebSocket that echoes every message,
/// on the same stack as `/api/ws` (buffers, limits, reader/writer split), so a conformance
/// suite exercises the code that serves agents. Unlike `/api/ws`, invalid UTF-8 in a text
/// message fails the connection with 1007, as RFC 6455 section 8.1 asks of an endpoint that
/// has no ERROR frame to send.
pub fn serve_echo(app: &Arc<App>, mut stream: TcpStream, head: Head, leftover: Vec<u8>) {
    let key = match head.header("sec-websocket-key") {
        Some(k) if head.header("sec-websocket-version") == Some("13") => k.to_string(),
        _ => {
            respond_json(
                &mut stream,
                426,
                r#"{"error":"websocket upgrade required"}"#,
                &[],
            );
            return;
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).is_err() {
        return;
    }
    let stream = Arc::new(stream);
    let write_stream = WriteHalf(stream.clone());
    let (tx, rx) = crossbeam_channel::bounded::<Message>(64);
    let config = ws_config(app);
    let writer = std::thread::Builder::new()
        .name("ws-echo-writer".into())
        .stack_size(crate::accept::THREAD_STACK)
        .spawn(move || {
            let mut ws = WebSocket::from_raw_socket(write_stream, WsRole::Server, Some(config));
            for message in rx {
                let closing = matches!(message, Message::Close(_));
                if ws.send(message).is_err() || closing {
                    break;
                }
            }
            let _ = ws.get_ref().0.set_read_timeout(Some(CLOSE_GRACE));
            let _ = ws.get_ref().shutdown(Shutdown::Write);
        });
    let Ok(writer) = writer else { return };
    let mut ws = WebSocket::from_partially_read(
        ReadHalf::new(stream.clone()),
        leftover,
        WsRole::Server,
        Some(ws_config(app)),
    );
    let close = |code: u16, reason: &str| {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        }))
    };
    loop {
        let reply = match ws.read() {
            Ok(Message::Ping(data)) => Message::Pong(data),
            Ok(Message::Close(frame)) => {
                let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1000);
                let _ = tx.send(if code == 1005 {
                    Message::Close(None)
                } else {
                    close(code, "")
                });
                break;
            }
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            Ok(_) => continue,
            Err(tungstenite::Error::Capacity(_)) => {
                let _ = tx.send(close(1009, "message too big"));
                break;
            }
            Err(tungstenite::Error::Utf8(_)) => {
                let _ = tx.send(close(1007, "invalid utf-8"));
                break;
            }
            Err(tungstenite::Error::Protocol(_)) => {
                let _ = tx.send(close(1002, "protocol error"));
                break;
            }
            Err(_) => break,
        };
        if tx.send(reply).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
}
