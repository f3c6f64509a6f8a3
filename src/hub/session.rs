//! A connection's way in: every frame its reader takes from the socket goes through its
//! `Session`, which keeps them in order.
//!
//! A stored frame is submitted to the store and kept in flight; the reader then takes the
//! next frame already in its buffer, so frames that arrived together share one commit. The
//! session routes every frame in flight, oldest first, before it routes or answers anything
//! else (a frame that is not stored, an ERROR, a rate refusal), when the reader has caught up
//! with the socket, when 64 are in flight, and whenever the session ends, however it ends
//! (`end`, or being dropped): every stored frame is routed, and in the order it was read.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::envelope::{parse_envelope, peek_local_id, refuse};
use super::{Conn, FrameError, Hub, Landing};
use crate::wire::{Close, Code};

/// Consecutive ERROR frames after which a connection is closed (1008).
const MAX_CONSECUTIVE_ERRORS: u32 = 100;
/// Most stored frames of one connection submitted but not yet routed. Their bytes are bounded
/// too: while frames are in flight the reader takes only what is already buffered, so they
/// are one message (≤ the message limit) plus what one 4 KiB read brought with it.
const MAX_IN_FLIGHT: usize = 64;
/// How long a connection may stay over its frame rate before it is closed (1008).
const RATE_LIMITED_CLOSE_AFTER: Duration = Duration::from_secs(10);

/// A data message from the client.
pub enum Inbound<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// Why the reader stops.
pub enum End {
    /// The peer sent a close frame (with this code, if any).
    PeerClosed(Option<u16>),
    /// A message over `--max-message-bytes`.
    TooBig,
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// The peer broke RFC 6455.
    ProtocolError,
    /// The socket failed or the peer vanished.
    Gone,
}

pub struct Session {
    hub: Arc<Hub>,
    conn: Arc<Conn>,
    in_flight: VecDeque<Landing>,
    errors_in_row: u32,
    rate: RateLimit,
    open: bool,
}

impl Session {
    pub fn new(hub: Arc<Hub>, conn: Arc<Conn>, max_frames_per_second: u32) -> Session {
        Session {
            hub,
            conn,
            in_flight: VecDeque::new(),
            errors_in_row: 0,
            rate: RateLimit::new(max_frames_per_second),
            open: true,
        }
    }

    /// Frames are in flight: the reader should take only what it has buffered, and call
    /// `caught_up` when that runs out, rather than wait on the socket.
    pub fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// False once the session has closed the connection (or the hub has): read no further.
    pub fn is_open(&self) -> bool {
        self.open && !self.conn.is_closing()
    }

    /// One data message from the client.
    pub fn take(&mut self, message: Inbound) {
        if !self.is_open() {
            return;
        }
        let text = match message {
            Inbound::Text(t) => Ok(t),
            Inbound::Binary(b) => std::str::from_utf8(b).map_err(|_| ()),
        };
        if !self.rate.allow() {
            self.refuse_for_rate(text.ok());
            return;
        }
        let parsed = match text {
            Ok(text) => parse_envelope(text),
            Err(()) => Err(refuse(Code::BadJson, "binary frame is not UTF-8 JSON")),
        };
        let env = match parsed {
            Ok(env) => env,
            Err(e) => return self.answer(Err(e)),
        };
        self.hub.metrics.frame_in(env.kind);
        // A frame routed now goes after every frame read before it.
        if !env.kind.stored() {
            self.land_all();
        }
        match self.hub.accept(&self.conn, env) {
            Ok(Some(landing)) => {
                self.in_flight.push_back(landing);
                if self.in_flight.len() >= MAX_IN_FLIGHT {
                    self.land_all();
                }
            }
            Ok(None) => self.answer(Ok(())),
            Err(e) => self.answer(Err(e)),
        }
    }

    /// A ping: answered through the writer, within the frame rate like any frame (a ping
    /// flood gets no pongs, and ten seconds of it closes the connection).
    pub fn ping(&mut self, data: tungstenite::Bytes) {
        if !self.is_open() {
            return;
        }
        if self.rate.allow() {
            self.conn.pong(data);
            return;
        }
        self.hub.metrics.limit("frame_rate_limited");
        if self.rate.limited_too_long() {
            self.conn.close(Close::RateLimited);
            self.open = false;
        }
    }

    /// A pong: nothing to do, but it counts against the frame rate.
    pub fn pong(&mut self) {
        if self.is_open() && !self.rate.allow() {
            self.hub.metrics.limit("frame_rate_limited");
            if self.rate.limited_too_long() {
                self.conn.close(Close::RateLimited);
                self.open = false;
            }
        }
    }

    /// The reader has nothing more buffered: route every frame in flight.
    pub fn caught_up(&mut self) {
        self.land_all();
    }

    /// The reader stops: route what is in flight, say why if there is something to say, and
    /// ask the writer to close.
    pub fn end(mut self, end: End) {
        self.land_all();
        let close = match end {
            End::PeerClosed(code) => match code {
                None | Some(1005) => Close::Normal,
                Some(code) => Close::Echo(code),
            },
            End::TooBig => {
                self.hub.metrics.limit("message_too_large");
                Close::MessageTooBig
            }
            End::InvalidUtf8 => {
                // Say why, then fail the connection as RFC 6455 section 8.1 asks: when the
                // bad bytes were in a fragment, tungstenite keeps the rest of the message
                // buffered, and reading on could splice the fragments that follow into a
                // different, valid-looking frame.
                let e = refuse(Code::BadJson, "text frame is not valid UTF-8");
                self.hub.send_error(&self.conn, &e);
                Close::InvalidUtf8
            }
            End::ProtocolError => Close::ProtocolError,
            End::Gone => Close::Gone,
        };
        self.conn.close(close);
    }

    /// Routes every frame in flight, oldest first. A closing connection still routes them
    /// all: their rows are stored, and their recipients are waiting for them.
    fn land_all(&mut self) {
        while let Some(landing) = self.in_flight.pop_front() {
            let landed = self.hub.land(&self.conn, landing);
            self.record(landed);
        }
    }

    /// The outcome of a frame that is not in flight: after everything that is.
    fn answer(&mut self, outcome: Result<(), FrameError>) {
        if outcome.is_err() {
            self.land_all();
        }
        self.record(outcome);
    }

    /// Counts an outcome; an error becomes an ERROR frame, and the 100th in a row closes
    /// the connection.
    fn record(&mut self, outcome: Result<(), FrameError>) {
        let Err(e) = outcome else {
            self.errors_in_row = 0;
            return;
        };
        self.hub.send_error(&self.conn, &e);
        self.errors_in_row += 1;
        if self.errors_in_row >= MAX_CONSECUTIVE_ERRORS && self.open {
            self.hub.metrics.limit("consecutive_errors");
            self.conn.close(Close::TooManyErrors);
            self.open = false;
        }
    }

    /// A frame over the rate is dropped unread, but its ERROR names it (`local_id`), so the
    /// client knows which one to resend. Rate refusals do not count as errors in a row.
    fn refuse_for_rate(&mut self, text: Option<&str>) {
        self.land_all();
        self.hub.metrics.limit("frame_rate_limited");
        let local_id = text.and_then(peek_local_id);
        let e = refuse(Code::RateLimited, "too many frames; this one was dropped")
            .about(local_id.as_deref());
        self.hub.send_error(&self.conn, &e);
        if self.rate.limited_too_long() {
            self.conn.close(Close::RateLimited);
            self.open = false;
        }
    }
}

impl Drop for Session {
    /// However the reader ended, every submitted frame is stored: route it.
    fn drop(&mut self) {
        self.land_all();
    }
}

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
