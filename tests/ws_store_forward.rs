//! Store and forward: nothing accepted is lost while an agent or the Butler is away.
mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn chat_to_an_offline_agent_is_stored_and_replayed_in_order_on_connect() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "sleeper");
    let mut h = s.ws(&admin);
    let mut ids = Vec::new();
    for i in 0..5 {
        h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": format!("job {i}"), "local_id": format!("j{i}")}));
        ids.push(h.recv_type("CHAT")["id"].as_i64().unwrap());
    }
    let mut a = s.ws(&token);
    for (i, id) in ids.iter().enumerate() {
        let f = a.recv_type("CHAT");
        assert_eq!(f["id"], *id);
        assert_eq!(f["payload"], format!("job {i}"));
        assert_eq!(f["sender_id"], 1);
    }
    // Live frames follow, and nothing is sent twice.
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "live"}));
    assert_eq!(a.recv_type("CHAT")["payload"], "live");
    a.assert_no("CHAT", Duration::from_millis(300));
    // Once delivered, a reconnect does not replay again.
    a.close();
    h.recv_until(
        |v| v["type"] == "PRESENCE" && v["payload"]["online"] == false,
        "offline",
    );
    let mut again = s.ws(&token);
    again.assert_no("CHAT", Duration::from_millis(500));
}

#[test]
fn a_dropped_connection_loses_nothing_sent_after_the_drop() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "flaky");
    let mut h = s.ws(&admin);
    let a = s.ws(&token);
    h.recv_type("PRESENCE");
    // The agent vanishes without a close frame.
    drop(a);
    h.recv_until(
        |v| v["type"] == "PRESENCE" && v["payload"]["online"] == false,
        "offline",
    );
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "while you were out"}));
    let echo = h.recv_type("CHAT");
    let mut back = s.ws(&token);
    let f = back.recv_type("CHAT");
    assert_eq!(f["id"], echo["id"]);
}

#[test]
fn delivery_marks_survive_a_restart() {
    let mut s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "restarted");
    let mut h = s.ws(&admin);
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "before restart"}));
    let first = h.recv_type("CHAT");
    // Offline delivery survives a crash.
    let s2 = {
        s.kill9();
        s.restart(&[], &[])
    };
    let mut a = s2.ws(&token);
    assert_eq!(a.recv_type("CHAT")["id"], first["id"]);
    a.close();
    // After a clean shutdown the mark is persisted: no replay of what was delivered.
    let mut s2 = s2;
    s2.wait_for("agent offline", Duration::from_secs(5), || {
        let admin = s2.admin_token();
        s2.get("/api/users/agents", &admin)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["online"] == false)
    });
    assert!(s2.terminate().success());
    let s3 = s2.restart(&[], &[]);
    let mut a = s3.ws(&token);
    a.assert_no("CHAT", Duration::from_millis(500));
}

#[test]
fn auth_response_for_an_offline_butler_is_delivered_when_it_connects() {
    let s = Server::start();
    let admin = s.admin_token();
    let butler_tok = s.butler_token(&admin);
    let r = s.post(
        "/api/chat/auth/response",
        &admin,
        json!({"action_id": "a-9", "approved": true}),
    );
    assert_eq!(r.status, 200);
    let mut b = s.ws(&butler_tok);
    let f = b.recv_type("AUTH_RESPONSE");
    assert_eq!(f["payload"], json!({"action_id": "a-9", "approved": true}));
}

#[test]
fn only_the_newest_thousand_are_replayed_in_pages_and_the_rest_never_resurface() {
    let s = Server::start_with(&["--max-frames-per-second", "100000"], &[]);
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "backlogged");
    let mut h = s.ws(&admin);
    let total = 1005;
    let mut ids = Vec::with_capacity(total);
    for i in 0..total {
        h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": i, "local_id": format!("b{i}")}));
        ids.push(h.recv_type("CHAT")["id"].as_i64().unwrap());
    }
    let mut a = s.ws(&token);
    for expected in &ids[total - 1000..] {
        assert_eq!(a.recv_type("CHAT")["id"], *expected);
    }
    a.assert_no("CHAT", Duration::from_millis(300));
    a.close();
    h.recv_until(
        |v| v["type"] == "PRESENCE" && v["payload"]["online"] == false,
        "offline",
    );
    // The five left out are not sent later, behind newer frames.
    h.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "newest"}));
    let newest =
        h.recv_until(|v| v["type"] == "CHAT" && v["payload"] == "newest", "echo")["id"].clone();
    let mut again = s.ws(&token);
    assert_eq!(again.recv_type("CHAT")["id"], newest);
    again.assert_no("CHAT", Duration::from_millis(300));
}
