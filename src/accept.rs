//! The public port: the accept loop, connection slots, and the client's address.
//!
//! Our own accept loop (which never dies on an accept error) owns the port. Each connection
//! takes a slot of `--max-connections` and of its client address's cap before any thread is
//! started, then gets a thread that reads the head (`head`). The client address is the peer,
//! or, when the peer is a trusted proxy, the address its `X-Forwarded-For` names. `/api/ws`
//! is upgraded right there on the raw `TcpStream` (`ws`); every other request goes to the
//! HTTP bridge (`http::bridge`), which reads and bounds the body before any HTTP worker
//! sees it.

use std::collections::HashMap;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::{App, THREAD_STACK};
use crate::head::{read_head, respond_error, Head, HeadError, HEAD_DEADLINE};

/// The head deadline while most connection slots are taken.
const SHORT_HEAD_DEADLINE: Duration = Duration::from_secs(2);
use crate::http::bridge::Bridge;
use crate::log_warn;

/// What the accept loop shares with its connection threads.
pub struct Door {
    pub app: Arc<App>,
    pub bridge: Arc<Bridge>,
    /// Open connections per client address, for `--max-connections-per-ip`.
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl Door {
    pub fn new(app: Arc<App>, bridge: Arc<Bridge>) -> Arc<Door> {
        Arc::new(Door {
            app,
            bridge,
            per_address: Mutex::new(HashMap::new()),
        })
    }
}

/// Accepts forever. An accept error (say, out of file descriptors) is logged and retried
/// after a pause; it never ends the loop.
pub fn accept_loop(door: Arc<Door>, listener: TcpListener) {
    let app = &door.app;
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
        admit(&door, stream);
    }
}

/// Counts a connection in, refuses it at a cap, or gives it a thread.
fn admit(door: &Arc<Door>, mut stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p.ip().to_canonical(),
        Err(_) => return,
    };
    let Some(slot) = Slot::enter(door, peer) else {
        respond_error(&mut stream, 503, "server at connection limit", &[]);
        return;
    };
    let door2 = door.clone();
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(THREAD_STACK)
        .spawn(move || handle_connection(&door2, stream, peer, slot));
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
    door: Arc<Door>,
    address: Option<IpAddr>,
}

impl Slot {
    fn enter(door: &Arc<Door>, peer: IpAddr) -> Option<Slot> {
        let app = &door.app;
        let open = app.hub.open_sockets.fetch_add(1, Relaxed) + 1;
        let mut slot = Slot {
            door: door.clone(),
            address: None,
        };
        if open > app.config.max_connections {
            app.hub.metrics.limit("max_connections");
            return None; // the drop gives the global slot back
        }
        if app.trusts(peer) || slot.count(crate::auth::address_key(peer)) {
            Some(slot)
        } else {
            None
        }
    }

    /// Counts this connection under `address`; false when that address is at its cap.
    fn count(&mut self, address: IpAddr) -> bool {
        let app = &self.door.app;
        let mut per = self
            .door
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = per.entry(address).or_insert(0);
        if *n >= app.config.max_connections_per_ip {
            app.hub.metrics.limit("max_connections_per_ip");
            return false;
        }
        *n += 1;
        self.address = Some(address);
        true
    }

    /// After the head: a proxied connection is counted under its real client.
    fn assign(&mut self, client: IpAddr) -> bool {
        self.address.is_some()
            || self.door.app.trusts(client)
            || self.count(crate::auth::address_key(client))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.door.app.hub.open_sockets.fetch_sub(1, Relaxed);
        let Some(address) = self.address else { return };
        let mut per = self
            .door
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

fn handle_connection(door: &Arc<Door>, mut stream: TcpStream, peer: IpAddr, mut slot: Slot) {
    let app = &door.app;
    // Under pressure (three quarters of the connection slots taken), a client gets 2 s for
    // its head instead of 10: slow heads cost a slot each, and the slots are what an attacker
    // is after.
    let open = app.hub.open_sockets.load(Relaxed);
    let deadline = if open * 4 >= app.config.max_connections * 3 {
        app.hub.metrics.limit("head_deadline_shortened");
        SHORT_HEAD_DEADLINE
    } else {
        HEAD_DEADLINE
    };
    let (head, leftover) = match read_head(&mut stream, deadline) {
        Ok(h) => h,
        Err(e) => {
            let (status, message, limit) = match e {
                HeadError::TooLarge => (
                    431,
                    "request header fields too large",
                    Some("head_too_large"),
                ),
                HeadError::Timeout => (408, "request timeout", Some("head_timeout")),
                HeadError::Malformed => (400, "bad request", None),
                HeadError::BadTarget => (400, "invalid request target", None),
                HeadError::BadHeaderValue => (400, "invalid header value", None),
                HeadError::Closed => return,
            };
            if let Some(limit) = limit {
                app.hub.metrics.limit(limit);
            }
            respond_error(&mut stream, status, message, &[]);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let client = client_address(app, peer, &head);
    if !slot.assign(client) {
        respond_error(&mut stream, 503, "server at connection limit", &[]);
        return;
    }
    // The path only: query strings may carry tokens.
    crate::log_debug!("{client} {} {}", head.method, head.path);
    if head.path == "/api/ws" {
        crate::ws::serve(app, stream, head, leftover, client);
    } else if head.path == crate::ws::ECHO_PATH && app.config.conformance_echo {
        crate::ws::serve_echo(app, stream, head, leftover);
    } else {
        door.bridge.serve(app, stream, &head, leftover, client);
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
