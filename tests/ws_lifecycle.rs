//! Connection life: the upgrade checks, presence, liveness, revocation, shutdown.
mod common;
use common::*;
use serde_json::json;
use std::time::Duration;
use tungstenite::Message;

/// The headers of a well-formed opening handshake, plus `extra`.
fn handshake(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = vec![
        ("Upgrade".to_string(), "websocket".to_string()),
        ("Connection".to_string(), "Upgrade".to_string()),
        ("Sec-WebSocket-Version".to_string(), "13".to_string()),
        (
            "Sec-WebSocket-Key".to_string(),
            "dGhlIHNhbXBsZSBub25jZQ==".to_string(),
        ),
    ];
    for (k, v) in extra {
        h.retain(|(name, _)| !name.eq_ignore_ascii_case(k));
        h.push((k.to_string(), v.to_string()));
    }
    h
}

#[test]
fn upgrade_checks_answer_in_order_handshake_before_token() {
    let s = Server::start_with(&["--allowed-origins", "https://ops.example.com"], &[]);
    let admin = s.admin_token();
    // Not a handshake: 426 whatever the token, so a plain GET cannot test tokens.
    for path in [
        "/api/ws".to_string(),
        "/api/ws?token=nope".to_string(),
        format!("/api/ws?token={admin}"),
    ] {
        let r = s.request("GET", &path, None, None);
        assert_eq!(
            (r.status, r.error().as_str()),
            (426, "websocket upgrade required"),
            "{path}"
        );
    }
    let r = s.raw_request("GET", "/api/ws", &handshake(&[]), None);
    assert_eq!((r.status, r.error().as_str()), (401, "token is required"));
    let r = s.raw_request("GET", "/api/ws?token=nope", &handshake(&[]), None);
    assert_eq!((r.status, r.error().as_str()), (401, "invalid credentials"));
    let upgrade = |origin: &str| {
        s.raw_request(
            "GET",
            &format!("/api/ws?token={admin}"),
            &handshake(&[("Origin", origin)]),
            None,
        )
    };
    let r = upgrade("https://evil.example.com");
    assert_eq!((r.status, r.error().as_str()), (403, "origin not allowed"));
    assert_eq!(upgrade("https://ops.example.com").status, 101);
    assert_eq!(upgrade(&format!("http://{}", s.addr)).status, 101);
    // The Bearer header works as well as ?token=.
    let r = s.raw_request(
        "GET",
        "/api/ws",
        &handshake(&[("Authorization", "Bearer nope")]),
        None,
    );
    assert_eq!(r.status, 401);
}

#[test]
fn malformed_handshakes_are_refused_before_the_token_is_read() {
    let s = Server::start();
    let admin = s.admin_token();
    let path = format!("/api/ws?token={admin}");
    // A key that is not the base64 of 16 bytes.
    for key in [
        "",
        "abc",
        "dGhlIHNhbXBsZSBub25jZSEh",
        "!!!!!!!!!!!!!!!!!!!!!!==",
    ] {
        let r = s.raw_request(
            "GET",
            &path,
            &handshake(&[("Sec-WebSocket-Key", key)]),
            None,
        );
        assert_eq!(
            (r.status, r.error().as_str()),
            (400, "invalid Sec-WebSocket-Key"),
            "key {key:?}"
        );
    }
    let r = s.raw_request(
        "GET",
        &path,
        &handshake(&[("Sec-WebSocket-Version", "8")]),
        None,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"));
    // HTTP/1.0 cannot upgrade (RFC 6455 section 4.1); a POST is not a handshake either.
    let mut raw = std::net::TcpStream::connect(&s.addr).unwrap();
    use std::io::{Read, Write};
    raw.write_all(
        format!(
            "GET {path} HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    let r = s.raw_request("POST", &path, &handshake(&[]), Some(b"{}"));
    assert_eq!(r.status, 426, "{}", r.body);
}

#[test]
fn the_conformance_echo_endpoint_exists_only_behind_its_flag() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.request("GET", "/api/ws-echo", Some(&admin), None);
    assert_eq!(r.status, 404);
    let s = Server::start_with(&["--conformance-echo"], &[]);
    let stream = std::net::TcpStream::connect(&s.addr).unwrap();
    let url = format!("ws://{}/api/ws-echo", s.addr);
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
    ws.send(Message::text("echo me")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("echo me"));
}

#[test]
fn the_connection_cap_answers_503_and_the_per_user_cap_429() {
    let s = Server::start_with(&["--max-connections", "3"], &[]);
    let admin = s.admin_token();
    let _a = s.ws(&admin);
    let _b = s.ws(&admin);
    let _c = s.ws(&admin);
    let err = s.try_ws(&admin).expect_err("fourth connection refused");
    assert!(err.starts_with("503"), "{err}");
    let r = s.request("GET", "/api/ping", None, None);
    assert_eq!(
        (r.status, r.error().as_str()),
        (503, "server at connection limit")
    );
    drop((_a, _b, _c));

    let s = Server::start();
    let admin = s.admin_token();
    let held: Vec<Ws> = (0..16).map(|_| s.ws(&admin)).collect();
    let err = s.try_ws(&admin).expect_err("17th connection refused");
    assert!(err.starts_with("429"), "{err}");
    drop(held);
}

#[test]
fn presence_on_first_connect_and_last_disconnect_only() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "blinker");
    let mut h = s.ws(&admin);
    let a1 = s.ws(&token);
    let p = h.recv_type("PRESENCE");
    assert_eq!(p["payload"]["user_id"], agent_id);
    assert_eq!(p["payload"]["online"], true);
    assert_eq!(p["payload"]["username"], "blinker");
    let a2 = s.ws(&token);
    a1.close();
    h.assert_no("PRESENCE", Duration::from_millis(400));
    let listed = s.get("/api/users/agents", &admin).json();
    let me = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == agent_id)
        .unwrap()
        .clone();
    assert_eq!(
        (me["online"].as_bool(), me["status"].as_str()),
        (Some(true), Some("ONLINE"))
    );
    a2.close();
    let p = h.recv_type("PRESENCE");
    assert_eq!(p["payload"]["online"], false);
    let listed = s.get("/api/users/agents", &admin).json();
    let me = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == agent_id)
        .unwrap()
        .clone();
    assert_eq!(me["online"], false);
    assert_eq!(me["last_seen_at"], p["payload"]["last_seen_at"]);
    assert_eq!(me["last_report"], "websocket_disconnected");
}

#[test]
fn the_server_pings_and_closes_a_silent_client_with_1011() {
    let s = Server::start_with(
        &["--ws-ping-interval", "200ms", "--ws-idle-timeout", "1s"],
        &[],
    );
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    // Reading answers pings (tungstenite replies on read), so this client stays alive.
    let mut pings = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if let Ok(Message::Ping(_)) = h.inner.read() {
            pings += 1;
        }
    }
    assert!(pings >= 3, "only {pings} pings");
    // A client that never reads never answers: it is closed after the idle timeout.
    let mut silent = s.ws(&admin);
    std::thread::sleep(Duration::from_millis(1500)); // the silence under test, not synchronisation
    assert_eq!(silent.recv_close(), Some(1011));
}

#[test]
fn rotating_or_deleting_closes_live_sessions_with_1008() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, token) = s.register_agent(&admin, "rotated");
    let mut a = s.ws(&token);
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{id}/token"),
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(a.recv_close(), Some(1008));
    let fresh = r.json()["api_token"].as_str().unwrap().to_string();
    assert!(s.try_ws(&token).unwrap_err().starts_with("401"));
    let mut b = s.ws(&fresh);
    assert_eq!(
        s.request(
            "DELETE",
            &format!("/api/users/agents/{id}"),
            Some(&admin),
            None
        )
        .status,
        200
    );
    assert_eq!(b.recv_close(), Some(1008));
    assert!(s.try_ws(&fresh).unwrap_err().starts_with("401"));
}

#[test]
fn a_token_rotated_from_the_command_line_closes_its_session_within_a_tick() {
    let s = Server::start_with(&["--ws-ping-interval", "300ms"], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "cli-rotated");
    let mut a = s.ws(&token);
    let out = std::process::Command::new(BIN)
        .args(["agent", "rotate", "cli-rotated", "--db"])
        .arg(s.db_arg())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.recv_close(), Some(1008));
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let mut s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "stayer");
    let mut h = s.ws(&admin);
    let mut a = s.ws(&token);
    a.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "last words", "local_id": "lw"}));
    let ack = a.recv_type("ACK");
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(h.recv_close(), Some(1001));
    assert_eq!(a.recv_close(), Some(1001));
    let s = s.restart(&[], &[]);
    let admin = s.admin_token();
    let history = s
        .get(&format!("/api/chat/history/{agent_id}"), &admin)
        .json();
    assert_eq!(history[0]["id"], ack["id"]);
}

#[test]
fn each_websocket_holds_one_server_descriptor() {
    let s = Server::start();
    let admin = s.admin_token();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
            .unwrap()
            .count()
    };
    let (_, token) = s.register_agent(&admin, "fd-counter");
    let before = fds();
    let mut conns: Vec<Ws> = (0..12).map(|_| s.ws(&token)).collect();
    // An ACK means the connection's reader is running, so both its threads hold the socket.
    for (i, ws) in conns.iter_mut().enumerate() {
        ws.send_json(json!({"type": "SYSTEM_LOG", "payload": "hi", "local_id": format!("fd{i}")}));
        ws.recv_type("ACK");
    }
    let per_connection = (fds() as f64 - before as f64) / conns.len() as f64;
    // Descriptors bound how many agents a server holds (10,000 under a 20,000 limit).
    assert!(
        per_connection <= 1.1,
        "{per_connection} descriptors per WebSocket"
    );
}
