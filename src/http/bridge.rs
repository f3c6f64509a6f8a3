//! The HTTP bridge: the only file that names tiny_http.
//!
//! Everything that reaches the public port is hostile until our own code has bounded it, so
//! this file stands in front of tiny_http the way nginx stands in front of an application
//! server:
//!
//! 1. The connection thread (see `accept`) has read and validated the head. Here it reads the
//!    body itself: `Content-Length` up to the 1 MiB limit (a larger one is not read at all),
//!    chunked bodies decoded by our code with a cap on every line and on the total, the
//!    whole body within `BODY_DEADLINE`. Ambiguous framing (`Content-Length` twice, not a
//!    number, together with `Transfer-Encoding`) is refused with 400, as RFC 9112 asks.
//! 2. tiny_http then sees only a complete, normalized request over a private Unix socket:
//!    our `Content-Length`, `Connection: close`, the client address in `X-EchoCenter-Peer`
//!    and, for a body over the limit, `X-EchoCenter-Body: too-large` (the handler answers
//!    413 after its route and auth checks, in SPEC order). Client copies of our headers are
//!    dropped. tiny_http's own readers therefore never allocate a client-chosen size.
//! 3. The worker converts tiny_http's request into our `Request`, runs the handler inside
//!    `catch_unwind` (a panicking handler costs one 500, not a worker), and answers.
//! 4. The connection thread reads the whole response (bounded) before it writes a byte to the
//!    client, so a client that never reads holds only its own thread, never a worker; the
//!    write to the client has a deadline of its own.
//!
//! tiny_http's accept thread on the Unix socket dies when the process runs out of file
//! descriptors (it unwraps a `try_clone`); the next request notices the dead socket and
//! starts a fresh tiny_http on a new one, releasing the old workers.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::app::App;
use crate::head::{respond_error, Head};
use crate::http::{Body, Reply, Request, MAX_BODY_BYTES};
use crate::{log_error, log_warn};

const WORKERS: usize = 8;
/// The whole body must arrive within this long after the head (like the head's deadline).
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Longest chunk-size line (size, extensions, CRLF) of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// Most bytes of trailer fields after the last chunk.
const MAX_TRAILERS: usize = 8 * 1024;
/// A worker must answer within this long.
const WORKER_DEADLINE: Duration = Duration::from_secs(60);
/// Largest response a handler may produce (pages are budgeted far below this).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// The client must take the whole response within this long.
const SEND_DEADLINE: Duration = Duration::from_secs(30);
/// After answering a request whose body was left unread, how long (and how much) of it is
/// read and discarded before the socket closes, so the client sees the answer instead of a
/// connection reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
/// Requests handed to tiny_http at once. Each holds three descriptors across the Unix socket;
/// the rest wait here, holding only their own socket, for up to `SLOT_WAIT`.
const EXCHANGE_SLOTS: usize = 32;
const SLOT_WAIT: Duration = Duration::from_secs(10);
/// Responses read but not yet taken by their clients, in bytes, across all connections. A
/// client that reads slowly holds its response in memory; past this, new responses get 503.
const BUFFERED_RESPONSE_BUDGET: usize = 256 << 20;
/// The kernel's send buffer for a REST answer (see `Bridge::serve`).
const SEND_BUFFER_BYTES: usize = 128 << 10;

/// Headers of the client's that are about the connection or the framing (which we replace),
/// or that only we may set.
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "expect",
    "upgrade",
    PEER_HEADER,
    BODY_HEADER,
];
const PEER_HEADER: &str = "x-echocenter-peer";
const BODY_HEADER: &str = "x-echocenter-body";

/// tiny_http behind the private Unix socket, restartable.
pub struct Bridge {
    dir: PathBuf,
    current: Mutex<Option<Instance>>,
    restarting: Mutex<()>,
    generation: AtomicU64,
    slots: Slots,
    /// Bytes of responses held for clients right now.
    buffered: AtomicUsize,
}

/// A counting semaphore: here `EXCHANGE_SLOTS` exchanges with tiny_http at once; also the
/// handlers' limit on concurrent log searches.
pub(super) struct Slots {
    free: Mutex<usize>,
    returned: Condvar,
}

impl Slots {
    pub(super) const fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n),
            returned: Condvar::new(),
        }
    }

    /// A slot, waiting up to `within` for one.
    pub(super) fn take(&self, within: Duration) -> Option<SlotGuard<'_>> {
        let deadline = Instant::now() + within;
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            free = self
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Some(SlotGuard(self))
    }
}

pub(super) struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.returned.notify_one();
    }
}

/// Bytes of one held response, counted in `Bridge::buffered` until dropped.
struct Held<'a> {
    bridge: &'a Bridge,
    bytes: Vec<u8>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.bridge
            .buffered
            .fetch_sub(self.bytes.capacity(), Relaxed);
    }
}

struct Instance {
    server: Arc<tiny_http::Server>,
    path: PathBuf,
}

/// Why an exchange with tiny_http produced no response to send.
enum Exchange {
    Io(io::Error),
    /// Holding this response would pass `BUFFERED_RESPONSE_BUDGET`.
    OverBudget,
}

impl From<io::Error> for Exchange {
    fn from(e: io::Error) -> Exchange {
        Exchange::Io(e)
    }
}

/// A request refused by the bridge itself, before any worker.
struct Refusal {
    status: u16,
    message: &'static str,
    /// Part of the body may still be unread.
    unread: bool,
}

fn refuse(status: u16, message: &'static str) -> Refusal {
    Refusal {
        status,
        message,
        unread: true,
    }
}

impl Bridge {
    pub fn new(dir: PathBuf) -> Bridge {
        Bridge {
            dir,
            current: Mutex::new(None),
            restarting: Mutex::new(()),
            generation: AtomicU64::new(0),
            slots: Slots::new(EXCHANGE_SLOTS),
            buffered: AtomicUsize::new(0),
        }
    }

    /// Starts tiny_http and its workers on a new socket; retires the previous instance.
    pub fn start(&self, app: &Arc<App>) -> io::Result<PathBuf> {
        let n = self.generation.fetch_add(1, Relaxed);
        let path = self.dir.join(format!("http-{n}.sock"));
        let server = Arc::new(tiny_http::Server::http_unix(&path).map_err(io::Error::other)?);
        for i in 0..WORKERS {
            let (app, server) = (app.clone(), server.clone());
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || run_worker(&app, &server))?;
        }
        let old = self.lock().replace(Instance {
            server,
            path: path.clone(),
        });
        if let Some(old) = old {
            release_workers(&old.server);
            let _ = std::fs::remove_file(old.path);
        }
        Ok(path)
    }

    pub fn stop(&self) {
        if let Some(old) = self.lock().take() {
            release_workers(&old.server);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instance>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current_path(&self) -> Option<PathBuf> {
        self.lock().as_ref().map(|i| i.path.clone())
    }

    /// Serves one REST request whose head the connection thread has read.
    pub fn serve(
        &self,
        app: &Arc<App>,
        mut client: TcpStream,
        head: &Head,
        leftover: Vec<u8>,
        peer: IpAddr,
    ) {
        let body = match read_body(&mut client, head, leftover) {
            Ok(body) => body,
            Err(r) => {
                app.hub.metrics.limit(match r.status {
                    408 => "body_timeout",
                    _ => "body_malformed",
                });
                respond_error(&mut client, r.status, r.message, &[]);
                if r.unread {
                    linger(&mut client);
                }
                return;
            }
        };
        let unread = matches!(body, Body::TooLarge);
        let inner = normalized_request(head, &body, peer);
        let response = {
            let Some(_slot) = self.slots.take(SLOT_WAIT) else {
                app.hub.metrics.limit("bridge_busy");
                respond_error(
                    &mut client,
                    503,
                    "server busy, retry",
                    &[("Retry-After", "1")],
                );
                return;
            };
            self.exchange(app, &inner)
        };
        let response = match response {
            Ok(r) => r,
            Err(Exchange::OverBudget) => {
                app.hub.metrics.limit("response_memory");
                respond_error(
                    &mut client,
                    503,
                    "server busy, retry",
                    &[("Retry-After", "1")],
                );
                return;
            }
            Err(Exchange::Io(e)) => {
                log_error!("http: the HTTP layer did not answer: {e}");
                let (status, body) = match e.kind() {
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                        (504, "the server took too long to answer")
                    }
                    _ => (503, "server unavailable"),
                };
                respond_error(&mut client, status, body, &[]);
                return;
            }
        };
        // A fixed, modest kernel send buffer: what a slow reader has not taken stays in
        // `response`, where BUFFERED_RESPONSE_BUDGET sees it, instead of up to 4 MiB per
        // socket of kernel memory that nothing here counts.
        let _ = socket2::SockRef::from(&client).set_send_buffer_size(SEND_BUFFER_BYTES);
        if send_response(&mut client, &response.bytes).is_err() {
            app.hub.metrics.limit("send_timeout");
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        drop(response);
        if unread {
            linger(&mut client);
        }
    }

    /// One request to tiny_http and its whole response, every step with a deadline, the
    /// response counted against `BUFFERED_RESPONSE_BUDGET` while it is held.
    fn exchange(&self, app: &Arc<App>, request: &[u8]) -> Result<Held<'_>, Exchange> {
        let mut inner = self.connect(app)?;
        let deadline = Instant::now() + WORKER_DEADLINE;
        inner.set_write_timeout(Some(WORKER_DEADLINE))?;
        inner.write_all(request)?;
        let mut held = Held {
            bridge: self,
            bytes: Vec::new(),
        };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Exchange::Io(io::ErrorKind::TimedOut.into()));
            }
            inner.set_read_timeout(Some(left))?;
            let n = match inner.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let before = held.bytes.capacity();
            held.bytes.extend_from_slice(&chunk[..n]);
            let grown = held.bytes.capacity() - before;
            let total = self.buffered.fetch_add(grown, Relaxed) + grown;
            if total > BUFFERED_RESPONSE_BUDGET || held.bytes.len() > MAX_RESPONSE_BYTES {
                return Err(Exchange::OverBudget);
            }
        }
        if held.bytes.is_empty() {
            return Err(Exchange::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "empty response",
            )));
        }
        Ok(held)
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
}

/// `unblock` wakes one thread blocked in `recv`; every worker needs its own.
fn release_workers(server: &tiny_http::Server) {
    for _ in 0..WORKERS {
        server.unblock();
    }
}

// ----- the client's body -----------------------------------------------------------------

/// The client's socket with the bytes already read past the head, under one deadline.
struct Input<'a> {
    stream: &'a mut TcpStream,
    buf: Vec<u8>,
    pos: usize,
    deadline: Instant,
}

impl Input<'_> {
    /// Reads more from the socket; false at end of stream.
    fn fill(&mut self) -> Result<bool, Refusal> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(refuse(408, "request timeout"));
        }
        let _ = self.stream.set_read_timeout(Some(left));
        let mut chunk = [0u8; 16 * 1024];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) => Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(refuse(408, "request timeout"))
                }
                Err(_) => Err(closed()),
            };
        }
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Appends exactly `n` more bytes to `out`.
    fn take(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), Refusal> {
        while n > 0 {
            if self.available().is_empty() && !self.fill()? {
                return Err(closed());
            }
            let k = n.min(self.available().len());
            out.extend_from_slice(&self.available()[..k]);
            self.pos += k;
            n -= k;
        }
        Ok(())
    }

    /// One CRLF-terminated line of at most `max` bytes, without the CRLF.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, Refusal> {
        loop {
            if let Some(i) = self.available().windows(2).position(|w| w == b"\r\n") {
                if i + 2 > max {
                    return Err(bad_chunk());
                }
                let line = self.available()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.available().len() >= max {
                return Err(bad_chunk());
            }
            if !self.fill()? {
                return Err(closed());
            }
        }
    }
}

fn closed() -> Refusal {
    Refusal {
        status: 400,
        message: "the request body ended early",
        unread: false,
    }
}

fn bad_chunk() -> Refusal {
    refuse(400, "invalid chunked body")
}

/// Reads the body the head announces, bounded in size and time (see the module comment).
fn read_body(client: &mut TcpStream, head: &Head, leftover: Vec<u8>) -> Result<Body, Refusal> {
    let lengths: Vec<&str> = head.headers_named("content-length").collect();
    let encodings: Vec<&str> = head.headers_named("transfer-encoding").collect();
    if !lengths.is_empty() && !encodings.is_empty() {
        return Err(refuse(400, "Content-Length and Transfer-Encoding together"));
    }
    let length = match lengths.as_slice() {
        [] => None,
        [one] => Some(parse_length(one)?),
        _ => return Err(refuse(400, "more than one Content-Length")),
    };
    let chunked = match encodings.as_slice() {
        [] => false,
        [one] if one.trim().eq_ignore_ascii_case("chunked") => true,
        _ => return Err(refuse(501, "unsupported Transfer-Encoding")),
    };
    let expects_continue = match head.header("expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
        Some(_) => return Err(refuse(417, "unsupported Expect")),
    };
    if length.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        // Not read at all: the handler answers 413 after its route and auth checks.
        return Ok(Body::TooLarge);
    }
    if length.unwrap_or(0) == 0 && !chunked {
        return Ok(Body::Complete(Vec::new()));
    }
    if expects_continue && leftover.is_empty() {
        let _ = client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut input = Input {
        stream: client,
        buf: leftover,
        pos: 0,
        deadline: Instant::now() + BODY_DEADLINE,
    };
    let mut body = Vec::new();
    match length {
        Some(n) => {
            input.take(n as usize, &mut body)?;
            Ok(Body::Complete(body))
        }
        None => read_chunked(&mut input, body),
    }
}

/// `Content-Length`: decimal digits only (no sign, no list). A number too large for 64 bits
/// is simply too large.
fn parse_length(value: &str) -> Result<u64, Refusal> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse(400, "invalid Content-Length"));
    }
    Ok(v.parse::<u64>().unwrap_or(u64::MAX))
}

/// RFC 9112 section 7.1, with a cap on every line, on the trailers and on the decoded total.
fn read_chunked(input: &mut Input, mut body: Vec<u8>) -> Result<Body, Refusal> {
    loop {
        let line = input.line(MAX_CHUNK_LINE)?;
        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
        let digits = std::str::from_utf8(digits).map_err(|_| bad_chunk())?.trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad_chunk());
        }
        let size = u64::from_str_radix(digits, 16).unwrap_or(u64::MAX);
        if size == 0 {
            break;
        }
        // Compared without adding: `len + size` wraps for sizes near 2^64 (release builds
        // do not check), and a wrapped sum would let any size through.
        let room = (MAX_BODY_BYTES - body.len()) as u64;
        if size > room {
            return Ok(Body::TooLarge);
        }
        input.take(size as usize, &mut body)?;
        if !input.line(2)?.is_empty() {
            return Err(bad_chunk());
        }
    }
    let mut trailers = 0;
    loop {
        let line = input.line(MAX_TRAILERS - trailers)?;
        if line.is_empty() {
            return Ok(Body::Complete(body));
        }
        trailers += line.len() + 2;
    }
}

/// The request as tiny_http gets it: complete, with our framing and our headers.
fn normalized_request(head: &Head, body: &Body, peer: IpAddr) -> Vec<u8> {
    let query = head
        .query
        .as_deref()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut out = format!(
        "{} {}{query} HTTP/1.{}\r\n",
        head.method, head.path, head.version
    );
    for (k, v) in &head.headers {
        if !DROPPED_HEADERS.iter().any(|h| k.eq_ignore_ascii_case(h)) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    let bytes: &[u8] = match body {
        Body::Complete(b) => b,
        Body::TooLarge => {
            out.push_str(&format!("{BODY_HEADER}: too-large\r\n"));
            &[]
        }
    };
    out.push_str(&format!(
        "Content-Length: {}\r\n{PEER_HEADER}: {peer}\r\nConnection: close\r\n\r\n",
        bytes.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(bytes);
    out
}

// ----- the response ----------------------------------------------------------------------

/// Writes tiny_http's response to the client within `SEND_DEADLINE`, adding
/// `Connection: close` to its head: tiny_http never sends it (it refuses it from handlers
/// too), and a keep-alive client would otherwise send its next request on a connection that
/// is about to close.
fn send_response(client: &mut TcpStream, response: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + SEND_DEADLINE;
    match response.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => {
            write_before(client, &response[..end + 2], deadline)?;
            write_before(client, b"Connection: close\r\n", deadline)?;
            write_before(client, &response[end + 2..], deadline)?;
        }
        None => write_before(client, response, deadline)?,
    }
    let _ = client.flush();
    Ok(())
}

fn write_before(client: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        client.set_write_timeout(Some(left))?;
        match client.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and discards what the client is still sending, briefly, then closes.
fn linger(client: &mut TcpStream) {
    let _ = client.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut discarded = 0;
    let mut chunk = [0u8; 16 * 1024];
    while discarded < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
}

// ----- the workers -----------------------------------------------------------------------

/// Serves requests until tiny_http is stopped. A panic anywhere in a request's handling is
/// caught here: tiny_http answers that request with 500 (its `Request` is dropped unanswered)
/// and this worker goes on with the next one.
fn run_worker(app: &Arc<App>, server: &tiny_http::Server) {
    loop {
        let served = panic::catch_unwind(AssertUnwindSafe(|| match server.recv() {
            Ok(request) => {
                answer(app, request);
                true
            }
            Err(_) => false,
        }));
        match served {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                app.hub.metrics.worker_panics.fetch_add(1, Relaxed);
                log_error!("http: a request handler panicked; the worker goes on");
            }
        }
    }
}

fn answer(app: &App, mut rq: tiny_http::Request) {
    let request = our_request(&mut rq);
    let reply = crate::http::handle(app, &request);
    let _ = rq.respond(tiny_response(reply));
}

/// tiny_http's request as ours. Its body is complete and small (the bridge made it so), and
/// it is read whole before the handler runs, so tiny_http never has to drain an unread one.
fn our_request(rq: &mut tiny_http::Request) -> Request {
    let headers: Vec<(String, String)> = rq
        .headers()
        .iter()
        .map(|h| (h.field.as_str().to_string(), h.value.to_string()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let peer = find(PEER_HEADER)
        .and_then(|p| p.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let too_large = find(BODY_HEADER).is_some();
    let headers = headers
        .into_iter()
        .filter(|(k, _)| !DROPPED_HEADERS.iter().any(|h| k.eq_ignore_ascii_case(h)))
        .collect();
    let url = rq.url().to_string();
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (url, None),
    };
    let body = if too_large {
        Body::TooLarge
    } else {
        let mut bytes = Vec::new();
        let _ = rq
            .as_reader()
            .take(MAX_BODY_BYTES as u64)
            .read_to_end(&mut bytes);
        Body::Complete(bytes)
    };
    Request {
        method: rq.method().as_str().to_string(),
        path,
        query,
        headers,
        peer,
        body,
    }
}

fn tiny_response(reply: Reply) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
    let mut response =
        tiny_http::Response::from_data(reply.body.into_bytes()).with_status_code(reply.status);
    let headers = reply
        .headers
        .into_iter()
        .chain([("Content-Type", reply.content_type.to_string())])
        .chain([("Server", "echocenter".to_string())]);
    for (k, v) in headers {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            response.add_header(h);
        }
    }
    response
}
