//! WebSocket connections: opening many of them, and splitting one into a reader and a
//! writer over clones of the same socket (the reader's own writes are discarded, so only the
//! writer ever writes).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::rest::{par_map, SETUP_THREADS};
use crate::Res;

/// Stack of every per-connection client thread: thousands of them must fit next to the server.
const STACK: usize = 64 * 1024;

pub fn ws_config() -> WebSocketConfig {
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
pub fn ws_open(addr: SocketAddr, token: &str) -> Res<TcpStream> {
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
pub struct ReadHalf(TcpStream);

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
pub struct Split {
    pub writer: WebSocket<TcpStream>,
    pub reader: WebSocket<ReadHalf>,
    pub ctl: TcpStream,
}

pub fn split(s: TcpStream) -> Res<Split> {
    let r = s.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    let ctl = s.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    Ok(Split {
        writer: WebSocket::from_raw_socket(s, Role::Client, Some(ws_config())),
        reader: WebSocket::from_raw_socket(ReadHalf(r), Role::Client, Some(ws_config())),
        ctl,
    })
}

/// Opens one connection per token on a few threads, stopping at `deadline`.
pub fn open_all(addr: SocketAddr, tokens: &[&str], deadline: Instant) -> Vec<Res<TcpStream>> {
    par_map(tokens, SETUP_THREADS, |t| {
        if Instant::now() >= deadline {
            return Err("not attempted: connect phase deadline".to_string());
        }
        ws_open(addr, t)
    })
}

pub fn open_all_ok(addr: SocketAddr, tokens: &[&str], what: &str) -> Res<Vec<TcpStream>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::with_capacity(tokens.len());
    for r in open_all(addr, tokens, deadline) {
        out.push(r.map_err(|e| format!("{what} connection: {e}"))?);
    }
    Ok(out)
}

pub fn spawn_small<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Res<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(STACK)
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e} (see vm.max_map_count / pid_max)"))
}

pub fn text_of(m: &Message) -> Option<&str> {
    match m {
        Message::Text(t) => Some(t.as_str()),
        Message::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

pub fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

pub fn send_json(ws: &mut WebSocket<TcpStream>, v: &Value) -> Res<()> {
    ws.send(Message::text(v.to_string()))
        .map_err(|e| e.to_string())
}

pub fn shutdown_all<'a>(ctls: impl IntoIterator<Item = &'a TcpStream>) {
    for c in ctls {
        let _ = c.shutdown(Shutdown::Both);
    }
}
