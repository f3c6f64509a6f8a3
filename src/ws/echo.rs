//! Test only (`--conformance-echo`): an unauthenticated WebSocket that echoes every message,
//! on the same stack as `/api/ws` (buffers, limits, reader/writer split), so a conformance
//! suite exercises the code that serves agents.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role as WsRole};
use tungstenite::{Message, WebSocket};

use super::{ws_config, ReadHalf, WriteHalf};
use crate::app::{App, THREAD_STACK};
use crate::head::{respond_error, Head};

/// After our close frame, how long the peer has to answer.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
            respond_error(&mut stream, 426, "websocket upgrade required", &[]);
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
        .stack_size(THREAD_STACK)
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
        ReadHalf::new(stream.clone(), app.config.max_message_bytes),
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
