//! Bad frames get an ERROR with the SPEC's code and the connection stays usable; limits close
//! with the SPEC's close codes.
mod common;
use common::*;
use serde_json::json;
use tungstenite::Message;

fn assert_error(ws: &mut Ws, code: &str) -> serde_json::Value {
    let e = ws.recv_type("ERROR");
    assert_eq!(e["payload"]["code"], code, "{e}");
    assert!(e["payload"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(e["sender_role"], "SERVER");
    e
}

#[test]
fn every_malformed_frame_gets_its_error_code_and_the_connection_survives() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "target");
    let mut h = s.ws(&admin);
    let cases: &[(&str, &str)] = &[
        ("{not json", "bad_json"),
        ("[1,2,3]", "bad_envelope"),
        ("\"just a string\"", "bad_envelope"),
        ("{}", "bad_envelope"),
        (r#"{"type": 7}"#, "bad_envelope"),
        (r#"{"type": "CHAT", "target_id": "2"}"#, "bad_envelope"),
        (r#"{"type": "CHAT", "target_id": -3}"#, "bad_envelope"),
        (
            r#"{"type": "CHAT", "target_id": 2, "local_id": 5}"#,
            "bad_envelope",
        ),
        (
            r#"{"type": "CHAT", "target_id": 2, "stream_id": {}}"#,
            "bad_envelope",
        ),
        (r#"{"type": "SYSTEM_LOG", "payload": 42}"#, "bad_envelope"),
        (
            r#"{"type": "SYSTEM_LOG", "payload": {"level": "not ok!", "content": "x"}}"#,
            "bad_envelope",
        ),
        (
            r#"{"type": "SYSTEM_LOG", "payload": {"level": "INFO"}}"#,
            "bad_envelope",
        ),
        (r#"{"type": "teleport"}"#, "unknown_type"),
        (r#"{"type": "TELE-PORT"}"#, "unknown_type"),
        (r#"{"type": "ACK"}"#, "forbidden"),
        (r#"{"type": "PRESENCE"}"#, "forbidden"),
        (
            r#"{"type": "AUTH_REQUEST", "target_id": 1, "payload": {}}"#,
            "forbidden",
        ),
        (
            r#"{"type": "CHAT", "payload": "to nobody"}"#,
            "target_required",
        ),
        (
            r#"{"type": "CHAT", "target_id": 0, "payload": "to nobody"}"#,
            "target_required",
        ),
        (
            r#"{"type": "CHAT_STREAM", "payload": "x"}"#,
            "target_required",
        ),
        (
            r#"{"type": "CHAT", "target_id": 424242, "payload": "x"}"#,
            "target_not_found",
        ),
    ];
    for (frame, code) in cases {
        h.send_text(frame);
        let e = h.recv_type("ERROR");
        assert_eq!(e["payload"]["code"], *code, "frame {frame} gave {e}");
    }
    // local_id is echoed on errors where the envelope could be read.
    h.send_json(json!({"type": "CHAT", "target_id": 424242, "payload": "x", "local_id": "mine"}));
    assert_eq!(assert_error(&mut h, "target_not_found")["local_id"], "mine");
    h.send_json(json!({"type": "teleport", "local_id": "mine2"}));
    assert_eq!(assert_error(&mut h, "unknown_type")["local_id"], "mine2");
    h.send_json(json!({"type": "CHAT", "target_id": "x", "local_id": "mine3"}));
    assert_eq!(assert_error(&mut h, "bad_envelope")["local_id"], "mine3");
    // Still usable.
    let mut agent = s.ws(&token);
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "still here"}));
    assert_eq!(agent.recv_type("CHAT")["payload"], "still here");
}

#[test]
fn a_text_frame_that_is_not_utf8_gets_bad_json_then_closes_with_1007() {
    let s = Server::start();
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    let bad = tungstenite::protocol::frame::Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    h.inner.send(Message::Frame(bad)).unwrap();
    assert_error(&mut h, "bad_json");
    assert_eq!(h.recv_close(), Some(1007));
}

#[test]
fn a_deleted_agent_is_not_a_chat_target() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, _) = s.register_agent(&admin, "gone");
    assert_eq!(
        s.request(
            "DELETE",
            &format!("/api/users/agents/{agent_id}"),
            Some(&admin),
            None
        )
        .status,
        200
    );
    let mut h = s.ws(&admin);
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "hello?"}));
    assert_error(&mut h, "target_not_found");
}

#[test]
fn binary_frames_holding_json_are_accepted_and_other_bytes_are_bad_json() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "bin");
    let mut agent = s.ws(&token);
    let mut h = s.ws(&admin);
    agent
        .inner
        .send(Message::binary(
            br#"{"type":"SYSTEM_LOG","payload":"from binary"}"#.to_vec(),
        ))
        .unwrap();
    assert_eq!(
        h.recv_type("SYSTEM_LOG")["payload"]["content"],
        "from binary"
    );
    agent
        .inner
        .send(Message::binary(vec![0xff, 0xfe, 0x00]))
        .unwrap();
    assert_error(&mut agent, "bad_json");
}

#[test]
fn a_message_over_the_size_limit_closes_with_1009() {
    let s = Server::start_with(&["--max-message-bytes", "1024"], &[]);
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    let big = format!(
        r#"{{"type":"SYSTEM_LOG","payload":"{}"}}"#,
        "x".repeat(2000)
    );
    h.send_text(&big);
    assert_eq!(h.recv_close(), Some(1009));
}

#[test]
fn a_hundred_consecutive_errors_close_with_1008() {
    let s = Server::start();
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    for _ in 0..100 {
        h.send_text("{");
    }
    assert_eq!(h.recv_close(), Some(1008));
}

#[test]
fn frames_over_the_rate_are_dropped_with_rate_limited() {
    let s = Server::start_with(&["--max-frames-per-second", "5"], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "flood");
    let mut agent = s.ws(&token);
    for i in 0..30 {
        agent.send_json(json!({"type": "SYSTEM_LOG", "payload": format!("line {i}"), "local_id": format!("f{i}")}));
    }
    let e = assert_error(&mut agent, "rate_limited");
    // The ERROR names the dropped frame, so the client knows which one to resend.
    let dropped = e["local_id"]
        .as_str()
        .expect("rate_limited carries local_id");
    assert!(dropped.starts_with('f'), "{e}");
    // Fewer than 30 rows were stored: the dropped frames were not.
    let rows = s.get("/api/messages?limit=200", &admin).json();
    let n = rows.as_array().unwrap().len();
    assert!((1..30).contains(&n), "{n} rows stored");
}

#[test]
fn ten_seconds_continuously_over_the_rate_closes_with_1008() {
    let s = Server::start_with(&["--max-frames-per-second", "2"], &[]);
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    // A steady flood just over the rate: some frames get through every second, which must
    // not reset the clock.
    let started = std::time::Instant::now();
    let code = loop {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "never closed"
        );
        if h.inner
            .send(Message::text(r#"{"type":"SYSTEM_LOG","payload":"x"}"#))
            .is_err()
        {
            break h.recv_close();
        }
        match h.inner.read() {
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break None,
            Ok(_) => {}
        }
    };
    assert_eq!(code, Some(1008));
    assert!(started.elapsed() >= std::time::Duration::from_secs(10));
}
