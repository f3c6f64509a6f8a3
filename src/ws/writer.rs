//! The writer thread: the only code that writes to a connection's socket. It sends the
//! store-and-forward replay first, then frames from the hub's queue, pongs and closes asked
//! for by the reader or the hub, and pings; it runs the liveness timer and the credential
//! re-check.

use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use super::WriteHalf;
use crate::app::App;
use crate::hub::{Conn, ConnQueues, Control, Hub, Outbound, Replay};
use crate::wire::Close;
use crate::{clock, log_info};

/// Frames the writer puts on the wire before one flush.
const WRITE_BATCH: usize = 64;
/// After our close frame, how long the peer has to answer before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

pub fn run(
    app: &App,
    conn: &Arc<Conn>,
    queues: ConnQueues,
    mut ws: WebSocket<WriteHalf>,
    replay: Option<Replay>,
) {
    match serve(app, conn, &queues, &mut ws, replay) {
        Some(close) => {
            conn.close(close);
            let frame = CloseFrame {
                code: CloseCode::from(close.code()),
                reason: close.reason().into(),
            };
            // Best effort: the peer may already be gone.
            let _ = ws.close(Some(frame));
            let _ = ws.flush();
            if close != Close::Normal {
                log_info!(
                    "ws: closed connection {} with {} {}",
                    conn.id,
                    close.code(),
                    close.reason()
                );
            }
            // Half-close so the peer can still read our close frame and answer it; the
            // reader (blocked in read) ends on that answer. A peer that never answers gets
            // the socket torn down after the grace period (a read timeout set now would not
            // reach a read already in progress).
            let _ = ws.get_ref().shutdown(Shutdown::Write);
            let deadline = Instant::now() + CLOSE_GRACE;
            while !conn.reader_done() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = ws.get_ref().shutdown(Shutdown::Both);
        }
        None => {
            conn.close(Close::Gone);
            // The peer is gone: wake the reader, which is blocked in read().
            let _ = ws.get_ref().shutdown(Shutdown::Both);
        }
    }
    // Frames still queued were never written: their rows stay undelivered and are replayed
    // on the next connect.
    while let Ok(frame) = queues.out.try_recv() {
        conn.dequeued(frame.text.len());
    }
}

/// The writer's loop. Returns the close to send, or None when the socket failed.
fn serve(
    app: &App,
    conn: &Arc<Conn>,
    queues: &ConnQueues,
    ws: &mut WebSocket<WriteHalf>,
    mut replay: Option<Replay>,
) -> Option<Close> {
    let hub = &app.hub;
    if let Some(replay) = replay.as_mut() {
        while let Some(page) = replay.next_page() {
            let mut delivered = Vec::with_capacity(page.len());
            for frame in page {
                delivered.extend(frame.stored_id);
                ws.write(Message::Text(frame.text)).ok()?;
            }
            ws.flush().ok()?;
            hub.delivered(delivered);
        }
    }
    let replay = replay.as_ref();
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
                Ok(Control::Close(close)) => {
                    // What was queued before the close (the ACKs and echoes of a client's last
                    // burst, the ERROR that explains a close) goes out first, unless the peer
                    // does not read or does not answer. Nothing is queued after a close, so
                    // this ends.
                    if close.flushes_queue() {
                        while let Ok(first) = queues.out.try_recv() {
                            write_batch(hub, conn, ws, queues, first, replay).ok()?;
                        }
                    }
                    return Some(close);
                }
                Err(_) => return None,
            },
            recv(queues.out) -> first => {
                write_batch(hub, conn, ws, queues, first.ok()?, replay).ok()?;
            }
            default(timeout) => {
                if Instant::now() >= silence_deadline {
                    hub.metrics.limit("ping_timeout");
                    return Some(Close::PingTimeout);
                }
            }
        }
    }
}

/// When the connection will have been silent for the idle timeout.
fn silence_deadline(app: &App, conn: &Conn) -> Instant {
    let silent_ms = (clock::now_ms() - conn.last_activity_ms()).max(0) as u64;
    let limit = app.config.ws_idle_timeout;
    Instant::now() + limit.saturating_sub(Duration::from_millis(silent_ms))
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes once, then
/// records the stored frames addressed to this connection's user as delivered. A stored
/// frame the replay already sent is not sent twice.
fn write_batch(
    hub: &Hub,
    conn: &Conn,
    ws: &mut WebSocket<WriteHalf>,
    queues: &ConnQueues,
    first: Outbound,
    replay: Option<&Replay>,
) -> tungstenite::Result<()> {
    let mut delivered = Vec::new();
    let mut next = Some(first);
    let mut written = 0;
    while let Some(frame) = next.take() {
        conn.dequeued(frame.text.len());
        let replayed = frame
            .stored_id
            .is_some_and(|id| replay.is_some_and(|r| r.covers(id)));
        if !replayed {
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
fn liveness_check(app: &App, conn: &Conn) -> Option<Close> {
    let silent_ms = clock::now_ms() - conn.last_activity_ms();
    if silent_ms > app.config.ws_idle_timeout.as_millis() as i64 {
        app.hub.metrics.limit("ping_timeout");
        return Some(Close::PingTimeout);
    }
    app.hub.credentials_revoked(&conn.principal)
}
