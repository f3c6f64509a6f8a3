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

/// `n` CHATs from `from` to `to`, each acknowledged or echoed; returns their ids.
fn send_chats(from: &mut Ws, to: i64, n: usize, tag: &str, machine: bool) -> Vec<i64> {
    let answer = if machine { "ACK" } else { "CHAT" };
    let frames: Vec<_> = (0..n)
        .map(|i| json!({"type": "CHAT", "target_id": to, "payload": format!("{tag} {i}"), "local_id": format!("{tag}-{i}")}))
        .collect();
    for chunk in frames.chunks(50) {
        from.send_burst(chunk);
    }
    (0..n)
        .map(|_| from.recv_type(answer)["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn a_flood_of_agent_frames_never_pushes_out_a_humans_instruction() {
    let s = Server::start_with(&["--max-frames-per-second", "100000"], &[]);
    let admin = s.admin_token();
    let (victim_id, victim) = s.register_agent(&admin, "victim");
    let (_, junk) = s.register_agent(&admin, "junk");
    let mut h = s.ws(&admin);
    let instruction = send_chats(&mut h, victim_id, 1, "instruction", false)[0];
    // 1000 junk CHATs after it, faster than anyone could read them.
    let mut j = s.ws(&junk);
    let junk_ids = send_chats(&mut j, victim_id, 1000, "junk", true);
    let mut a = s.ws(&victim);
    // The instruction comes first (oldest id), then the junk agent's newest 100 only.
    assert_eq!(a.recv_type("CHAT")["id"], instruction);
    for expected in &junk_ids[900..] {
        assert_eq!(a.recv_type("CHAT")["id"], *expected);
    }
    a.assert_no("CHAT", Duration::from_millis(300));
    // The junk sender is told, in one ERROR, that 900 of its frames were retired unsent.
    let e = j.recv_type("ERROR");
    assert_eq!(e["payload"]["code"], "undelivered", "{e}");
    assert_eq!(e["payload"]["count"], 900);
    assert_eq!(e["payload"]["receiver_id"], victim_id);
    assert_eq!(e["local_id"], "junk-899");
    assert_eq!(e["payload"]["ids"][0], junk_ids[899]);
    // The admin's history says the instruction was delivered.
    let history = s
        .get(&format!("/api/chat/history/{victim_id}"), &admin)
        .json();
    let row = history
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == instruction)
        .unwrap()
        .clone();
    s.wait_for("the delivery mark", Duration::from_secs(5), || {
        let h = s
            .get(&format!("/api/chat/history/{victim_id}"), &admin)
            .json();
        h.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == instruction && r["delivery"] == "delivered")
    });
    assert_eq!(row["payload"], "instruction 0");
}

#[test]
fn agents_share_one_window_and_no_agent_fills_it_alone() {
    let s = Server::start_with(&["--max-frames-per-second", "100000"], &[]);
    let admin = s.admin_token();
    let (victim_id, victim) = s.register_agent(&admin, "victim");
    // Eleven agents with 100 frames each (1100, over the agents' window of 1000) and one
    // with 300 (over its share of 100).
    let mut sent: Vec<(usize, Vec<i64>)> = Vec::new();
    for n in 0..12 {
        let (_, token) = s.register_agent(&admin, &format!("sender-{n}"));
        let mut w = s.ws(&token);
        let count = if n == 0 { 300 } else { 100 };
        sent.push((
            n,
            send_chats(&mut w, victim_id, count, &format!("s{n}"), true),
        ));
        w.close();
    }
    let mut a = s.ws(&victim);
    let mut got = Vec::new();
    while let Some(f) = a.recv_within(Duration::from_millis(500)) {
        if f["type"] == "CHAT" {
            got.push(f["id"].as_i64().unwrap());
        }
    }
    let mut kept: Vec<i64> = sent
        .iter()
        .flat_map(|(n, ids)| if *n == 0 { &ids[200..] } else { &ids[..] })
        .copied()
        .collect();
    kept.sort();
    // The newest 1000 of what the shares allow, in id order.
    let expect: Vec<i64> = kept[kept.len() - 1000..].to_vec();
    assert_eq!(got.len(), 1000);
    assert_eq!(got, expect);
}

#[test]
fn a_humans_frames_beyond_its_share_are_retired_visibly() {
    let s = Server::start_with(&["--max-frames-per-second", "100000"], &[]);
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "away");
    let mut h = s.ws(&admin);
    let ids = send_chats(&mut h, agent_id, 1003, "h", false);
    let history = |s: &Server| {
        s.get(
            &format!(
                "/api/chat/history/{agent_id}?limit=500&before_id={}",
                ids[10]
            ),
            &admin,
        )
        .json()
    };
    let pending: Vec<String> = history(&s)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["delivery"].as_str().unwrap().to_string())
        .collect();
    assert!(pending.iter().all(|d| d == "pending"), "{pending:?}");
    let mut a = s.ws(&token);
    for expected in &ids[3..] {
        assert_eq!(a.recv_type("CHAT")["id"], *expected);
    }
    // The human hears about the three that were not delivered ...
    let e = h.recv_until(|v| v["type"] == "ERROR", "the undelivered report");
    assert_eq!(e["payload"]["code"], "undelivered");
    assert_eq!(e["payload"]["count"], 3);
    assert_eq!(e["local_id"], "h-2");
    // ... and its history says so, row by row.
    let rows = history(&s);
    let delivery = |id: i64| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()["delivery"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for id in &ids[..3] {
        assert_eq!(delivery(*id), "retired");
    }
    s.wait_for("delivery marks", Duration::from_secs(5), || {
        let rows = history(&s);
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["delivery"] == "delivered")
            .count()
            == 7
    });
}
