//! The hub's handle on one live WebSocket connection: its delivery queue, and the control
//! queue through which the hub and the reader ask the writer for pongs and closes.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};
use tungstenite::Utf8Bytes;

use crate::identity::Principal;
use crate::metrics::Metrics;
use crate::wire::{Close, Kind};
use crate::{clock, log_warn};

/// Most queued frames per connection before it counts as a slow consumer.
pub const MAX_QUEUED_FRAMES: usize = 1024;
/// Most queued bytes per connection before it counts as a slow consumer.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

/// One frame queued for a connection's writer.
pub struct Outbound {
    pub text: Utf8Bytes,
    pub kind: Kind,
    /// Set for a stored frame addressed to this connection's (machine) user: once written,
    /// its row is flagged delivered.
    pub stored_id: Option<i64>,
}

/// One serialized frame shared by all its recipients (the text is reference-counted).
pub struct Shared {
    pub text: Utf8Bytes,
    pub kind: Kind,
}

impl Shared {
    pub fn new(kind: Kind, text: String) -> Shared {
        Shared {
            text: text.into(),
            kind,
        }
    }

    pub fn to(&self, stored_id: Option<i64>) -> Outbound {
        Outbound {
            text: self.text.clone(),
            kind: self.kind,
            stored_id,
        }
    }
}

/// Instructions to a connection's writer that jump the data queue.
pub enum Control {
    Pong(tungstenite::Bytes),
    Close(Close),
}

/// The writer's ends of a connection's queues.
pub struct ConnQueues {
    pub out: Receiver<Outbound>,
    pub ctl: Receiver<Control>,
}

pub struct Conn {
    pub id: u64,
    pub principal: Principal,
    metrics: Arc<Metrics>,
    out: Sender<Outbound>,
    ctl: Sender<Control>,
    queued_frames: AtomicUsize,
    queued_bytes: AtomicUsize,
    closing: AtomicBool,
    reader_done: AtomicBool,
    /// Milliseconds since the epoch of the last frame from the client (or of the connect).
    last_activity_ms: AtomicI64,
}

impl Conn {
    pub fn new(id: u64, principal: Principal, metrics: Arc<Metrics>) -> (Arc<Conn>, ConnQueues) {
        let (out_tx, out_rx) = unbounded();
        let (ctl_tx, ctl_rx) = unbounded();
        let conn = Arc::new(Conn {
            id,
            principal,
            metrics,
            out: out_tx,
            ctl: ctl_tx,
            queued_frames: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
            last_activity_ms: AtomicI64::new(clock::now_ms()),
        });
        let queues = ConnQueues {
            out: out_rx,
            ctl: ctl_rx,
        };
        (conn, queues)
    }

    /// Queues a frame. Never blocks; a connection over its cap is closed (1013).
    pub fn deliver(&self, frame: Outbound) -> bool {
        if self.closing.load(Relaxed) {
            return false;
        }
        let len = frame.text.len();
        let frames = self.queued_frames.fetch_add(1, Relaxed) + 1;
        let bytes = self.queued_bytes.fetch_add(len, Relaxed) + len;
        if frames > MAX_QUEUED_FRAMES || bytes > MAX_QUEUED_BYTES {
            self.queued_frames.fetch_sub(1, Relaxed);
            self.queued_bytes.fetch_sub(len, Relaxed);
            if self.close(Close::SlowConsumer) {
                self.metrics.slow_consumer_closes.fetch_add(1, Relaxed);
                log_warn!(
                    "ws: closing slow consumer {} (user {}): {frames} frames / {bytes} bytes queued",
                    self.id,
                    self.principal.id
                );
            }
            return false;
        }
        self.metrics.frame_out(frame.kind);
        self.out.send(frame).is_ok()
    }

    /// The writer took a frame off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_frames.fetch_sub(1, Relaxed);
        self.queued_bytes.fetch_sub(len, Relaxed);
    }

    /// Asks the writer to close. Returns false if a close was already asked for.
    pub fn close(&self, close: Close) -> bool {
        if self.closing.swap(true, Relaxed) {
            return false;
        }
        let _ = self.ctl.send(Control::Close(close));
        true
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    /// The reader thread has stopped reading (the peer answered our close, or left).
    pub fn mark_reader_done(&self) {
        self.reader_done.store(true, Relaxed);
    }

    pub fn reader_done(&self) -> bool {
        self.reader_done.load(Relaxed)
    }

    /// Sends a pong through the writer (the reader never writes to the socket). A ping
    /// flood while the writer is stuck cannot grow the queue: past 8 queued control frames
    /// further pings go unanswered (RFC 6455 only asks for a pong "as soon as practical", and
    /// a peer that floods pings is not waiting for each one).
    pub fn pong(&self, data: tungstenite::Bytes) {
        if self.ctl.len() < 8 {
            let _ = self.ctl.send(Control::Pong(data));
        }
    }

    /// The client said something (any frame counts as alive).
    pub fn touch(&self) {
        self.last_activity_ms.store(clock::now_ms(), Relaxed);
    }

    /// Milliseconds since the epoch of the client's last frame (or of the connect).
    pub fn last_activity_ms(&self) -> i64 {
        self.last_activity_ms.load(Relaxed)
    }
}
