//! The reader thread: takes messages off the socket and hands them to the connection's
//! `hub::Session`. While frames are in flight it takes only what tungstenite has already
//! buffered (`ReadHalf::buffered_only`), so a frame is routed as soon as its commit is done,
//! not when the client next writes.

use std::io;
use std::sync::Arc;

use tungstenite::error::ProtocolError;
use tungstenite::{Message, WebSocket};

use super::ReadHalf;
use crate::app::App;
use crate::hub::{Conn, End, Inbound, Session};
use crate::log_debug;

pub fn run(app: &App, conn: &Arc<Conn>, ws: &mut WebSocket<ReadHalf>) {
    let mut session = Session::new(
        app.hub.clone(),
        conn.clone(),
        app.config.max_frames_per_second,
    );
    let end = loop {
        ws.get_mut().buffered_only = session.has_in_flight();
        let message = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e))
                if e.kind() == io::ErrorKind::WouldBlock && ws.get_ref().buffered_only =>
            {
                session.caught_up();
                continue;
            }
            Err(tungstenite::Error::Capacity(_)) => break End::TooBig,
            Err(tungstenite::Error::Io(e))
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<super::FragmentFlood>()) =>
            {
                app.hub.metrics.limit("fragment_flood");
                break End::TooBig;
            }
            Err(tungstenite::Error::Utf8(_)) => break End::InvalidUtf8,
            Err(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                break End::Gone
            }
            Err(tungstenite::Error::Protocol(e)) => {
                log_debug!("ws: protocol error on connection {}: {e}", conn.id);
                break End::ProtocolError;
            }
            Err(_) => break End::Gone,
        };
        conn.touch();
        ws.get_mut().since_message = 0;
        match &message {
            Message::Text(t) => session.take(Inbound::Text(t.as_str())),
            Message::Binary(b) => session.take(Inbound::Binary(b)),
            Message::Ping(data) => session.ping(data.clone()),
            // An unasked-for pong counts against the frame rate like a ping.
            Message::Pong(_) => session.pong(),
            Message::Frame(_) => {}
            Message::Close(frame) => {
                break End::PeerClosed(frame.as_ref().map(|f| u16::from(f.code)));
            }
        }
        if !session.is_open() {
            return;
        }
    };
    session.end(end);
}
