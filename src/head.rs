//! The request head: read with a size cap (8 KiB, else 431) and a deadline (10 s), and
//! validated (printable ASCII target and header values, else 400) before anything routes it;
//! and the raw JSON answers given before any other layer is involved.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub const MAX_HEAD_BYTES: usize = 8 * 1024;
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);

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

/// Writes a complete `{"error": message}` response and closes (used before any worker is
/// involved).
pub fn respond_error(stream: &mut TcpStream, status: u16, message: &str, extra: &[(&str, &str)]) {
    respond_error_with(stream, status, message, &[], extra);
}

/// As `respond_error`, with more fields beside `error` (e.g. what a check compared).
pub fn respond_error_with(
    stream: &mut TcpStream,
    status: u16,
    message: &str,
    fields: &[(&str, &str)],
    extra: &[(&str, &str)],
) {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), message.into());
    for (k, v) in fields {
        body.insert((*k).to_string(), (*v).into());
    }
    let body = serde_json::Value::Object(body).to_string();
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

pub enum HeadError {
    TooLarge,
    Timeout,
    Malformed,
    /// The request target is not printable ASCII (a raw UTF-8 path, control bytes).
    BadTarget,
    /// A header value holds bytes outside printable ASCII, space and tab.
    BadHeaderValue,
    Closed,
}

/// Reads until the end of the head, at most `MAX_HEAD_BYTES`, within `within` (normally
/// `HEAD_DEADLINE`). Never inlined: its buffers' frame would then stay on the stack of the
/// connection's thread for the connection's whole life (it did once the compiler chose to
/// inline it: 4 KiB more resident per idle WebSocket).
#[inline(never)]
pub fn read_head(stream: &mut TcpStream, within: Duration) -> Result<(Head, Vec<u8>), HeadError> {
    let deadline = Instant::now() + within;
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
