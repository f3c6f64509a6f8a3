//! SPEC section 4: who receives what, what is stored, and what comes back to the sender.
mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(400);

#[test]
fn sender_fields_are_overwritten_and_client_ids_ignored() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "a1");
    let mut agent = s.ws(&token);
    let mut human = s.ws(&admin);
    agent.send_json(json!({
        "type": "CHAT", "target_id": 1, "payload": "hi", "id": 999999,
        "sender_id": 1, "sender_name": "admin", "sender_role": "ADMIN", "timestamp": "yesterday"
    }));
    let got = human.recv_type("CHAT");
    assert_eq!(got["sender_id"], agent_id);
    assert_eq!(got["sender_name"], "a1");
    assert_eq!(got["sender_role"], "AGENT");
    assert_ne!(got["id"], 999999);
    assert_ne!(got["timestamp"], "yesterday");
}

#[test]
fn system_log_is_stored_and_reaches_humans_only() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, t1) = s.register_agent(&admin, "logger");
    let (_, t2) = s.register_agent(&admin, "bystander");
    let (_, member) = s.create_human(&admin, "watcher", "MEMBER");
    let mut a1 = s.ws(&t1);
    let mut a2 = s.ws(&t2);
    let mut h_admin = s.ws(&admin);
    let mut h_member = s.ws(&member);
    a1.send_json(
        json!({"type": "SYSTEM_LOG", "payload": {"level": "warning", "content": "disk 91%"}}),
    );
    for h in [&mut h_admin, &mut h_member] {
        let f = h.recv_type("SYSTEM_LOG");
        assert_eq!(f["payload"]["level"], "WARNING");
        assert_eq!(f["payload"]["content"], "disk 91%");
        assert_eq!(f["payload"]["agent_id"], "logger");
        assert_eq!(f["payload"]["id"], f["id"]);
        assert_eq!(f["payload"]["timestamp"], f["timestamp"]);
    }
    a2.assert_no("SYSTEM_LOG", QUIET);
    a1.assert_no("SYSTEM_LOG", QUIET);
    let logs = s.get("/api/messages", &admin).json();
    assert_eq!(logs[0]["agent_id"], "logger");
    assert_eq!(logs[0]["level"], "WARNING");
    // A plain string payload is content at level INFO.
    a1.send_json(json!({"type": "SYSTEM_LOG", "payload": "plain"}));
    let f = h_admin.recv_type("SYSTEM_LOG");
    assert_eq!(
        (
            f["payload"]["level"].as_str(),
            f["payload"]["content"].as_str()
        ),
        (Some("INFO"), Some("plain"))
    );
}

#[test]
fn chat_is_stored_then_delivered_to_every_target_connection_and_echoed_to_the_human() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "worker");
    let mut w1 = s.ws(&token);
    let mut w2 = s.ws(&token);
    let mut h1 = s.ws(&admin);
    let mut h2 = s.ws(&admin);
    h1.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": {"cmd": "scan"}, "local_id": "u-1"}));
    let r1 = w1.recv_type("CHAT");
    let r2 = w2.recv_type("CHAT");
    let e1 = h1.recv_type("CHAT");
    let e2 = h2.recv_type("CHAT");
    for f in [&r2, &e1, &e2] {
        assert_eq!(f, &r1);
    }
    assert!(r1["id"].as_i64().unwrap() > 0);
    assert_eq!(r1["payload"], json!({"cmd": "scan"}));
    assert_eq!(r1["local_id"], "u-1");
    let history = s
        .get(&format!("/api/chat/history/{agent_id}"), &admin)
        .json();
    let row = &history[0];
    assert_eq!(
        (&row["id"], &row["timestamp"], &row["local_id"]),
        (&r1["id"], &r1["timestamp"], &r1["local_id"])
    );
    assert_eq!(row["payload"], json!({"cmd": "scan"}));
    // Agent senders get no echo.
    w1.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "done"}));
    h1.recv_until(|v| v["type"] == "CHAT" && v["payload"] == "done", "reply");
    w1.assert_no("CHAT", QUIET);
}

#[test]
fn a_stream_arrives_in_order_and_only_the_final_chat_is_stored() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "streamer");
    let mut agent = s.ws(&token);
    let mut human = s.ws(&admin);
    for i in 0..20 {
        agent.send_json(json!({"type": "CHAT_STREAM", "target_id": 1, "stream_id": "s1", "payload": format!("c{i} ")}));
    }
    agent.send_json(
        json!({"type": "CHAT", "target_id": 1, "stream_id": "s1", "payload": "all of it"}),
    );
    agent.send_json(json!({"type": "CHAT_STREAM_END", "target_id": 1, "stream_id": "s1"}));
    let mut seen = Vec::new();
    loop {
        let f = human.recv_until(|v| v["stream_id"] == "s1", "stream frames");
        let kind = f["type"].as_str().unwrap().to_string();
        seen.push(if kind == "CHAT_STREAM" {
            f["payload"].as_str().unwrap().to_string()
        } else {
            kind.clone()
        });
        if kind == "CHAT_STREAM_END" {
            break;
        }
    }
    let mut expected: Vec<String> = (0..20).map(|i| format!("c{i} ")).collect();
    expected.push("CHAT".into());
    expected.push("CHAT_STREAM_END".into());
    assert_eq!(seen, expected);
    let history = s
        .get(&format!("/api/chat/history/{agent_id}"), &admin)
        .json();
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert_eq!(history[0]["stream_id"], "s1");
    assert_eq!(history[0]["payload"], "all of it");
}

#[test]
fn local_id_is_idempotent_per_sender_and_machines_get_an_ack() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "acker");
    let (_, other) = s.register_agent(&admin, "other");
    let mut agent = s.ws(&token);
    let mut agent2 = s.ws(&other);
    let mut human = s.ws(&admin);
    agent.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "once", "local_id": "k1"}));
    let ack1 = agent.recv_type("ACK");
    agent.send_json(
        json!({"type": "CHAT", "target_id": 1, "payload": "once again", "local_id": "k1"}),
    );
    let ack2 = agent.recv_type("ACK");
    assert_eq!(ack1["id"], ack2["id"]);
    assert_eq!(ack1["local_id"], "k1");
    assert_eq!(ack1["timestamp"], ack2["timestamp"]);
    assert_eq!(ack1["sender_id"], 0);
    assert_eq!(ack1["sender_name"], "echocenter");
    let first = human.recv_type("CHAT");
    assert_eq!(first["id"], ack1["id"]);
    human.assert_no("CHAT", QUIET);
    // The same local_id from another sender is a different message.
    agent2.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "mine", "local_id": "k1"}));
    let ack3 = agent2.recv_type("ACK");
    assert_ne!(ack3["id"], ack1["id"]);
    // A human repeating a local_id gets the echo again with the first id, and it is not re-delivered.
    let agent_id = first["sender_id"].as_i64().unwrap();
    human.send_json(
        json!({"type": "CHAT", "target_id": agent_id, "payload": "x", "local_id": "h1"}),
    );
    let e1 = human.recv_until(|v| v["local_id"] == "h1", "echo");
    agent.recv_until(|v| v["local_id"] == "h1", "delivery");
    human.send_json(
        json!({"type": "CHAT", "target_id": agent_id, "payload": "x", "local_id": "h1"}),
    );
    let e2 = human.recv_until(|v| v["local_id"] == "h1", "second echo");
    assert_eq!(e1["id"], e2["id"]);
    agent.assert_no("CHAT", QUIET);
}

#[test]
fn agent_to_agent_chat_is_stored_and_agents_never_see_others_traffic() {
    let s = Server::start();
    let admin = s.admin_token();
    let (a_id, a_tok) = s.register_agent(&admin, "alpha");
    let (b_id, b_tok) = s.register_agent(&admin, "beta");
    let (_, c_tok) = s.register_agent(&admin, "gamma");
    let mut a = s.ws(&a_tok);
    let mut b = s.ws(&b_tok);
    let mut c = s.ws(&c_tok);
    a.send_json(json!({"type": "CHAT", "target_id": b_id, "payload": "psst"}));
    let got = b.recv_type("CHAT");
    assert_eq!(got["sender_id"], a_id);
    c.assert_no("CHAT", QUIET);
    let history = s.get(&format!("/api/chat/history/{a_id}"), &b_tok).json();
    assert_eq!(history[0]["payload"], "psst");
}

#[test]
fn auth_request_only_from_the_butler_and_auth_response_only_from_humans() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, agent_tok) = s.register_agent(&admin, "plain");
    let butler_tok = s.butler_token(&admin);
    let mut butler = s.ws(&butler_tok);
    let mut agent = s.ws(&agent_tok);
    let mut human = s.ws(&admin);

    agent.send_json(json!({"type": "AUTH_REQUEST", "target_id": 1, "payload": {"action_id": "x"}, "local_id": "r0"}));
    let err = agent.recv_type("ERROR");
    assert_eq!(err["payload"]["code"], "forbidden");
    assert_eq!(err["local_id"], "r0");

    butler.send_json(json!({"type": "AUTH_REQUEST", "target_id": 1, "payload": {"action_id": "act-1", "command": "rm -rf /tmp/x"}, "local_id": "r1"}));
    let req = human.recv_type("AUTH_REQUEST");
    assert_eq!(req["payload"]["action_id"], "act-1");
    assert_eq!(butler.recv_type("ACK")["local_id"], "r1");

    agent.send_json(json!({"type": "AUTH_RESPONSE", "target_id": 2, "payload": {"action_id": "act-1", "approved": true}}));
    assert_eq!(agent.recv_type("ERROR")["payload"]["code"], "forbidden");

    human.send_json(json!({"type": "AUTH_RESPONSE", "target_id": 2, "payload": {"action_id": "act-1", "approved": true}}));
    let resp = butler.recv_type("AUTH_RESPONSE");
    assert_eq!(resp["payload"]["approved"], true);
    assert_eq!(resp["sender_id"], 1);

    let r = s.post(
        "/api/chat/auth/response",
        &admin,
        json!({"action_id": "act-2", "approved": false}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "processed"}));
    let resp = butler.recv_until(
        |v| v["type"] == "AUTH_RESPONSE" && v["payload"]["action_id"] == "act-2",
        "REST auth response",
    );
    assert_eq!(resp["payload"]["approved"], false);
    // Agents may not use the REST approval either.
    assert_eq!(
        s.post(
            "/api/chat/auth/response",
            &agent_tok,
            json!({"action_id": "a", "approved": true})
        )
        .status,
        403
    );
}

#[test]
fn butler_agent_chat_is_mirrored_to_admins_only() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, agent_tok) = s.register_agent(&admin, "minion");
    let (_, member) = s.create_human(&admin, "m1", "MEMBER");
    let butler_tok = s.butler_token(&admin);
    let mut butler = s.ws(&butler_tok);
    let mut agent = s.ws(&agent_tok);
    let mut h_admin = s.ws(&admin);
    let mut h_member = s.ws(&member);
    butler.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "status?"}));
    let delivered = agent.recv_type("CHAT");
    let mirror = h_admin.recv_type("BUTLER_AGENT_MESSAGE");
    assert_eq!(mirror["sender_id"], 0);
    assert_eq!(mirror["payload"]["agent_id"], agent_id);
    assert_eq!(mirror["payload"]["id"], delivered["id"]);
    assert_eq!(mirror["payload"]["sender_role"], "BUTLER");
    assert_eq!(mirror["payload"]["payload"], "status?");
    agent.send_json(json!({"type": "CHAT", "target_id": 2, "payload": "green"}));
    let back = h_admin.recv_type("BUTLER_AGENT_MESSAGE");
    assert_eq!(back["payload"]["sender_role"], "AGENT");
    h_member.assert_no("BUTLER_AGENT_MESSAGE", QUIET);
    let conv = s
        .get(&format!("/api/chat/butler-agent/{agent_id}"), &admin)
        .json();
    assert_eq!(conv.as_array().unwrap().len(), 2);
}

#[test]
fn a_human_chatting_with_itself_gets_the_frame_once() {
    let s = Server::start();
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    h.send_json(
        json!({"type": "CHAT", "target_id": 1, "payload": "note to self", "local_id": "n1"}),
    );
    h.recv_type("CHAT");
    h.assert_no("CHAT", QUIET);
}
