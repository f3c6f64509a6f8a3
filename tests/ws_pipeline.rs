//! Frames that reach the server together are stored in one commit and routed afterwards
//! (ws.rs `Pipeline`): the order every recipient sees must still be the order they were sent,
//! and nothing submitted may be lost when the connection ends.
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Reads frames until `n` of the given types arrived; returns them in arrival order.
fn collect(ws: &mut Ws, types: &[&str], n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = ws.recv_until(
            |v| types.contains(&v["type"].as_str().unwrap_or("")),
            "a frame",
        );
        got.push(v);
    }
    got
}

/// A stable label for a frame as the recipient sees it, to compare orders.
fn label(v: &Value) -> String {
    match v["type"].as_str().unwrap() {
        "SYSTEM_LOG" => format!("log {}", v["payload"]["content"].as_str().unwrap()),
        "CHAT_STREAM" | "CHAT_STREAM_END" => {
            format!(
                "{} {}",
                v["type"].as_str().unwrap(),
                v["stream_id"].as_str().unwrap()
            )
        }
        "ACK" | "ERROR" => format!(
            "{} {}",
            v["type"].as_str().unwrap(),
            v["local_id"].as_str().unwrap()
        ),
        _ => format!(
            "{} {}",
            v["type"].as_str().unwrap(),
            v["payload"].as_str().unwrap()
        ),
    }
}

#[test]
fn a_burst_of_mixed_frames_reaches_the_human_in_the_order_sent() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "bursty");
    let mut agent = s.ws(&token);
    let mut human = s.ws(&admin);
    // Stored (CHAT, SYSTEM_LOG) and routed-at-once (CHAT_STREAM, CHAT_STREAM_END) frames
    // interleaved, so a routed-at-once frame always follows stored frames still in flight.
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for i in 0..60 {
        let sid = format!("s{i}");
        frames.push(json!({"type": "CHAT", "target_id": 1, "payload": format!("c{i}"), "local_id": format!("c{i}")}));
        expected.push(format!("CHAT c{i}"));
        frames
            .push(json!({"type": "CHAT_STREAM", "target_id": 1, "payload": "x", "stream_id": sid}));
        expected.push(format!("CHAT_STREAM {sid}"));
        frames.push(
            json!({"type": "SYSTEM_LOG", "payload": format!("l{i}"), "local_id": format!("l{i}")}),
        );
        expected.push(format!("log l{i}"));
        frames.push(json!({"type": "CHAT_STREAM_END", "target_id": 1, "stream_id": sid}));
        expected.push(format!("CHAT_STREAM_END {sid}"));
    }
    agent.send_burst(&frames);
    let got = collect(
        &mut human,
        &["CHAT", "CHAT_STREAM", "CHAT_STREAM_END", "SYSTEM_LOG"],
        expected.len(),
    );
    assert_eq!(got.iter().map(label).collect::<Vec<_>>(), expected);
    // Stored ids grow in the order sent.
    let ids: Vec<i64> = got
        .iter()
        .filter(|v| v["type"] == "CHAT")
        .map(|v| v["id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    human.assert_no("CHAT", Duration::from_millis(300));
}

#[test]
fn acks_and_errors_of_a_burst_come_back_in_the_order_sent() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "acked");
    let mut agent = s.ws(&token);
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for i in 0..100 {
        if i % 10 == 5 {
            // Refused before it is stored: its ERROR must not overtake the ACKs before it.
            frames.push(json!({"type": "CHAT", "target_id": 987654, "payload": "lost", "local_id": format!("e{i}")}));
            expected.push(format!("ERROR e{i}"));
        } else {
            frames.push(json!({"type": "CHAT", "target_id": 1, "payload": format!("m{i}"), "local_id": format!("m{i}")}));
            expected.push(format!("ACK m{i}"));
        }
    }
    agent.send_burst(&frames);
    let got = collect(&mut agent, &["ACK", "ERROR"], expected.len());
    assert_eq!(got.iter().map(label).collect::<Vec<_>>(), expected);
    for e in got.iter().filter(|v| v["type"] == "ERROR") {
        assert_eq!(e["payload"]["code"], "target_not_found");
    }
    // The same burst again: every row is a duplicate, acknowledged with its first id.
    let first_ids: Vec<Value> = got.iter().map(|v| v["id"].clone()).collect();
    agent.send_burst(&frames);
    let again = collect(&mut agent, &["ACK", "ERROR"], expected.len());
    assert_eq!(
        again.iter().map(|v| v["id"].clone()).collect::<Vec<_>>(),
        first_ids
    );
    let history = s.get("/api/chat/history/1?limit=500", &token).json();
    assert_eq!(history.as_array().unwrap().len(), 90);
}

#[test]
fn frames_sent_just_before_a_close_are_all_stored_and_delivered() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "leaving");
    let mut agent = s.ws(&token);
    let mut human = s.ws(&admin);
    let frames: Vec<Value> = (0..200)
        .map(|i| json!({"type": "CHAT", "target_id": 1, "payload": format!("bye{i}"), "local_id": format!("b{i}")}))
        .collect();
    for f in &frames {
        agent
            .inner
            .write(tungstenite::Message::text(f.to_string()))
            .unwrap();
    }
    // The close frame travels in the same write as the burst.
    agent.inner.close(None).unwrap();
    let _ = agent.inner.flush();
    // Every frame is acknowledged before the server answers the close.
    let mut acks = Vec::new();
    loop {
        match agent.inner.read() {
            Ok(tungstenite::Message::Text(t)) => {
                acks.push(label(&serde_json::from_str(t.as_str()).unwrap()));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let want_acks: Vec<String> = (0..200).map(|i| format!("ACK b{i}")).collect();
    assert_eq!(acks, want_acks);
    let got = collect(&mut human, &["CHAT"], frames.len());
    let want: Vec<String> = (0..200).map(|i| format!("CHAT bye{i}")).collect();
    assert_eq!(got.iter().map(label).collect::<Vec<_>>(), want);
    let history = s
        .get(&format!("/api/chat/history/{agent_id}?limit=500"), &admin)
        .json();
    assert_eq!(history.as_array().unwrap().len(), 200);
}

#[test]
fn a_human_burst_reaches_the_agent_and_the_echo_in_order() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "target");
    let mut agent = s.ws(&token);
    let mut human = s.ws(&admin);
    let mut second_tab = s.ws(&admin);
    let frames: Vec<Value> = (0..150)
        .map(|i| json!({"type": "CHAT", "target_id": agent_id, "payload": format!("do {i}"), "local_id": format!("h{i}")}))
        .collect();
    human.send_burst(&frames);
    let want: Vec<String> = (0..150).map(|i| format!("CHAT do {i}")).collect();
    for ws in [&mut agent, &mut human, &mut second_tab] {
        let got = collect(ws, &["CHAT"], frames.len());
        assert_eq!(got.iter().map(label).collect::<Vec<_>>(), want);
    }
}
