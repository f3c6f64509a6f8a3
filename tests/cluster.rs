//! Several nodes on one PostgreSQL database (README "Running several nodes"): real server
//! processes, one database, clients on different nodes. PostgreSQL only: on a SQLite run
//! every test says it is skipped and returns (scripts/test.sh runs this file again inside
//! pg_virtualenv, and CI requires that run).
mod common;
use common::*;

use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn cluster() -> bool {
    if !on_postgres() {
        eprintln!("skipped: several nodes need PostgreSQL (scripts/test.sh runs this suite in pg_virtualenv)");
    }
    on_postgres()
}

/// `n` nodes on one fresh database.
fn nodes(n: usize, args: &[&str]) -> (TempDir, Vec<Server>) {
    let dir = TempDir::new();
    let db: PathBuf = dir.path().join("shared");
    // The first creates the schema and the admin; the others join it.
    let mut all = vec![Server::start_on(TempDir::new(), db.clone(), args, &[])];
    for _ in 1..n {
        all.push(Server::start_on(TempDir::new(), db.clone(), args, &[]));
    }
    (dir, all)
}

fn node_of(s: &Server) -> i64 {
    s.request("GET", "/api/health", None, None).json()["node"]
        .as_i64()
        .expect("a node id in /api/health")
}

fn agent_row(s: &Server, jwt: &str, id: i64) -> Value {
    let list = s.get("/api/users/agents", jwt).json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("agent {id} not in {list}"))
}

fn presence_of(ws: &mut Ws, user: i64, online: bool) -> Value {
    ws.recv_until(
        |v| {
            v["type"] == "PRESENCE"
                && v["payload"]["user_id"] == user
                && v["payload"]["online"] == online
        },
        "a PRESENCE event",
    )["payload"]
        .clone()
}

#[test]
fn chat_streams_logs_and_presence_cross_nodes_with_the_stored_ids() {
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(3, &[]);
    let (a, b, c) = (&n[0], &n[1], &n[2]);
    assert!(
        node_of(a) != node_of(b) && node_of(b) != node_of(c),
        "three nodes"
    );
    // One JWT secret in the database: a token from one node works on every node.
    let admin = a.admin_token();
    let (agent, token) = b.register_agent(&admin, "Remote-Worker");
    let (member_id, member) = c.create_human(&admin, "mia", "MEMBER");
    let mut human = b.ws(&admin);
    let mut watcher = c.ws(&member);

    // The agent connects on A: the humans on B and C see it come online, and REST on C
    // says so.
    let mut on_a = a.ws(&token);
    presence_of(&mut human, agent, true);
    let p = presence_of(&mut watcher, agent, true);
    assert_eq!(p["status"], "ONLINE");
    c.wait_for("online on C's REST", Duration::from_secs(5), || {
        agent_row(c, &member, agent)["online"] == true
    });

    // B → A: the echo and the agent's copy carry the stored id (and the thread).
    let thread = b
        .post(
            "/api/chat/threads",
            &admin,
            json!({"peer_id": agent, "channel_kind": "agent_direct", "title": "cross"}),
        )
        .json()["id"]
        .as_i64()
        .unwrap();
    human.send_json(json!({"type": "CHAT", "target_id": agent, "payload": "scan", "local_id": "h1", "conversation_id": thread}));
    let echo = human.recv_until(|v| v["local_id"] == "h1", "the echo");
    let got = on_a.recv_type("CHAT");
    assert_eq!(got["id"], echo["id"]);
    assert_eq!(got["payload"], "scan");
    assert_eq!(got["conversation_id"], thread);

    // A → B: a whole answer, then a streamed one, in order, filed into the human's thread
    // (the agent names none).
    on_a.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "done", "local_id": "a1"}));
    let ack = on_a.recv_type("ACK");
    let reply = human.recv_until(
        |v| v["type"] == "CHAT" && v["sender_id"] == agent,
        "the reply",
    );
    assert_eq!(reply["id"], ack["id"]);
    assert_eq!(reply["conversation_id"], thread);
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.push(json!({"type": "CHAT_STREAM", "target_id": 1, "stream_id": "s1", "payload": format!("c{i} ")}));
    }
    burst.push(json!({"type": "CHAT", "target_id": 1, "stream_id": "s1", "payload": "all of it", "local_id": "a2"}));
    burst.push(json!({"type": "CHAT_STREAM_END", "target_id": 1, "stream_id": "s1"}));
    on_a.send_burst(&burst);
    let mut seen = Vec::new();
    while seen.last().map(|(t, _): &(String, Value)| t.as_str()) != Some("CHAT_STREAM_END") {
        let v = human.recv_until(|v| v["sender_id"] == agent, "the stream");
        assert_eq!(v["conversation_id"], thread, "{v}");
        seen.push((
            v["type"].as_str().unwrap().to_string(),
            v["payload"].clone(),
        ));
    }
    let kinds: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    let mut want = vec!["CHAT_STREAM"; 20];
    want.push("CHAT");
    want.push("CHAT_STREAM_END");
    assert_eq!(kinds, want, "the stream's order holds across nodes");
    for (i, (_, p)) in seen.iter().take(20).enumerate() {
        assert_eq!(p, &json!(format!("c{i} ")));
    }
    let rows = b
        .get(&format!("/api/chat/threads/{thread}/messages"), &admin)
        .json();
    let payloads: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["scan", "done", "all of it"]);

    // A log line from A reaches every human, on B and C, with its stored id.
    on_a.send_json(json!({"type": "SYSTEM_LOG", "payload": {"level": "WARN", "content": "disk 91%"}, "local_id": "l1"}));
    let log_ack = on_a.recv_until(
        |v| v["type"] == "ACK" && v["local_id"] == "l1",
        "the log's ACK",
    );
    for ws in [&mut human, &mut watcher] {
        let log = ws.recv_until(
            |v| v["type"] == "SYSTEM_LOG" && v["payload"]["content"] == "disk 91%",
            "the log line",
        );
        assert_eq!(log["id"], log_ack["id"]);
        assert_eq!(log["payload"]["content"], "disk 91%");
    }

    // A custom frame with no target: every human, wherever connected.
    on_a.send_json(json!({"type": "WEATHER_UPDATE", "payload": {"temp_c": 3}}));
    assert_eq!(watcher.recv_type("WEATHER_UPDATE")["payload"]["temp_c"], 3);

    // BUSY on A: PRESENCE on C, and B's REST says BUSY.
    on_a.send_json(json!({"type": "AGENT_STATUS", "payload": {"status": "BUSY"}}));
    let p = watcher.recv_until(
        |v| v["type"] == "PRESENCE" && v["payload"]["status"] == "BUSY",
        "BUSY",
    );
    assert_eq!(p["payload"]["user_id"], agent);
    b.wait_for("BUSY on B's REST", Duration::from_secs(5), || {
        agent_row(b, &admin, agent)["status"] == "BUSY"
    });

    // A member on C writes to the agent on A: filed into her own thread, answered there.
    watcher.send_json(
        json!({"type": "CHAT", "target_id": agent, "payload": "from mia", "local_id": "m1"}),
    );
    watcher.recv_until(|v| v["local_id"] == "m1", "mia's echo");
    on_a.recv_until(|v| v["payload"] == "from mia", "mia's CHAT on A");
    on_a.send_json(json!({"type": "CHAT", "target_id": member_id, "payload": "hi mia"}));
    let to_mia = watcher.recv_until(|v| v["payload"] == "hi mia", "the answer to mia");
    let mias = c.get("/api/chat/threads", &member).json();
    assert_eq!(to_mia["conversation_id"], mias[0]["id"]);

    // The agent leaves A: offline for everyone (once, not per node).
    on_a.close();
    let p = presence_of(&mut watcher, agent, false);
    assert_eq!(p["status"], "OFFLINE");
    presence_of(&mut human, agent, false);
    c.wait_for("offline on C's REST", Duration::from_secs(5), || {
        agent_row(c, &member, agent)["online"] == false
    });
    assert!(agent_row(c, &member, agent)["last_seen_at"].is_string());
}

#[test]
fn store_and_forward_reaches_an_agent_that_comes_back_on_another_node() {
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(2, &[]);
    let (a, b) = (&n[0], &n[1]);
    let admin = a.admin_token();
    let (agent, token) = a.register_agent(&admin, "Wanderer");
    let mut human = a.ws(&admin);
    let first = a.ws(&token);
    first.close();
    presence_of(&mut human, agent, false);
    let mut ids = Vec::new();
    for i in 0..5 {
        human.send_json(json!({"type": "CHAT", "target_id": agent, "payload": format!("job {i}"), "local_id": format!("j{i}")}));
        ids.push(human.recv_until(|v| v["local_id"] == format!("j{i}"), "echo")["id"].clone());
    }
    let mut on_b = b.ws(&token);
    for (i, id) in ids.iter().enumerate() {
        let v = on_b.recv_type("CHAT");
        assert_eq!((&v["id"], &v["payload"]), (id, &json!(format!("job {i}"))));
    }
    // Delivered now: a later reconnection, anywhere, gets nothing again.
    b.wait_for("delivered", Duration::from_secs(5), || {
        a.get(&format!("/api/chat/history/{agent}"), &admin)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["delivery"] == "delivered")
    });
    on_b.close();
    let mut again = a.ws(&token);
    again.assert_no("CHAT", Duration::from_millis(500));
}

#[test]
fn closes_on_one_node_end_sessions_on_the_others_at_once() {
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(3, &[]);
    let (a, b, c) = (&n[0], &n[1], &n[2]);
    let admin = a.admin_token();
    let (agent, token) = a.register_agent(&admin, "Rotated");
    let (member_id, member) = a.create_human(&admin, "mia", "MEMBER");
    let mut on_b = b.ws(&token);
    let mut mia_on_c = c.ws(&member);

    // Rotation through A closes the agent's session on B at once: long before the liveness
    // re-check (every 25 s) would.
    let t = Instant::now();
    let r = a.request(
        "PATCH",
        &format!("/api/users/agents/{agent}/token"),
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(on_b.recv_close(), Some(1008));
    drop(on_b);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    let fresh = r.json()["api_token"].as_str().unwrap().to_string();
    assert!(
        c.try_ws(&token).is_err(),
        "the old token is refused everywhere"
    );

    // Disabling a human through B ends her session on C.
    let r = b.request(
        "PATCH",
        &format!("/api/users/{member_id}"),
        Some(&admin),
        Some(r#"{"disabled":true}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(mia_on_c.recv_close(), Some(1008));
    drop(mia_on_c);

    // The 16-per-user cap counts every node. (A closed session stops counting once its
    // node has unregistered it: waited for here.)
    let counted = |want: i64| {
        a.wait_for("the cluster's count", Duration::from_secs(5), || {
            query_i64(
                &a.db,
                &format!(
                    "SELECT COALESCE(SUM(conns), 0)::int8 FROM connections WHERE user_id = {agent}"
                ),
            ) == want
        })
    };
    counted(0);
    let mut held = Vec::new();
    for i in 0..16 {
        held.push(n[i % 3].ws(&fresh));
    }
    let refused = n[1].try_ws(&fresh).expect_err("the 17th connection");
    assert!(refused.starts_with("429"), "{refused}");
    held.pop().unwrap().close();
    counted(15);
    let _sixteenth = c.ws(&fresh);
}

#[test]
fn a_node_killed_under_load_loses_nothing_acknowledged() {
    if !cluster() {
        return;
    }
    let (_db, mut n) = nodes(2, &["--node-timeout", "2s"]);
    let admin = n[0].admin_token();
    let (agent, token) = n[0].register_agent(&admin, "Survivor");
    let (stayer, stayer_token) = n[0].register_agent(&admin, "Goes-Down-With-A");
    let mut human = n[1].ws(&admin);
    let mut on_a = n[0].ws(&token);
    let _stays_on_a = n[0].ws(&stayer_token);
    presence_of(&mut human, stayer, true);

    // The agent on A sends as fast as it can; A dies in the middle.
    let frames: Vec<Value> = (0..400)
        .map(|i| json!({"type": "CHAT", "target_id": 1, "payload": format!("m{i}"), "local_id": format!("k{i}")}))
        .collect();
    on_a.send_burst(&frames);
    let mut acked = Vec::new();
    while acked.len() < 50 {
        let v = on_a.recv_type("ACK");
        acked.push(v["local_id"].as_str().unwrap().to_string());
    }
    n[0].kill9();
    for v in on_a.drain_until_end(Duration::from_millis(500)) {
        if v["type"] == "ACK" {
            acked.push(v["local_id"].as_str().unwrap().to_string());
        }
    }
    // Its agent reconnects to B and sends again what was not acknowledged, as the guide's
    // local_id rule allows; a frame that was stored anyway is not stored twice.
    let mut on_b = n[1].ws(&token);
    let unacked: Vec<Value> = frames
        .iter()
        .filter(|f| !acked.contains(&f["local_id"].as_str().unwrap().to_string()))
        .cloned()
        .collect();
    on_b.send_burst(&unacked);
    for _ in 0..unacked.len() {
        on_b.recv_type("ACK");
    }
    let history = n[1]
        .get(&format!("/api/chat/history/{agent}?limit=1000"), &admin)
        .json();
    let stored: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["local_id"].as_str().unwrap())
        .collect();
    assert_eq!(stored.len(), 400, "each frame once: {} rows", stored.len());
    for k in &acked {
        assert!(stored.contains(&k.as_str()), "acknowledged {k} is stored");
    }
    // The agent that had only A's connection goes offline once A's silence passes the
    // timeout; the one that moved to B stays online.
    let p = presence_of(&mut human, stayer, false);
    assert_eq!(p["status"], "OFFLINE");
    assert_eq!(agent_row(&n[1], &admin, agent)["online"], true);
    assert_eq!(agent_row(&n[1], &admin, stayer)["online"], false);
}

#[test]
fn a_dropped_listener_connection_recovers_without_loss() {
    if !cluster() {
        return;
    }
    let (dir, n) = nodes(2, &["--metrics-token", "metrics-secret"]);
    let (a, b) = (&n[0], &n[1]);
    let admin = a.admin_token();
    let (agent, token) = a.register_agent(&admin, "On-B");
    let mut human = a.ws(&admin);
    let mut on_b = b.ws(&token);
    presence_of(&mut human, agent, true);

    // Cut every listener's connection; meanwhile the human on A goes on writing to the agent
    // on B, whose node may miss the notifications.
    let cut = pg_terminate_listeners(&dir.path().join("shared"));
    assert!(cut >= 2, "listeners cut: {cut}");
    for i in 0..30 {
        human.send_json(json!({"type": "CHAT", "target_id": agent, "payload": format!("during {i}"), "local_id": format!("d{i}")}));
    }
    // At least once: a frame routed live and replayed after the reconnect arrives twice, so
    // count distinct payloads, not frames.
    let mut payloads = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while payloads.len() < 30 && Instant::now() < deadline {
        if let Some(v) = on_b.recv_within(Duration::from_millis(100)) {
            if v["type"] == "CHAT" && v["sender_id"] == 1 {
                payloads.insert(v["payload"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(
        payloads.len(),
        30,
        "every frame reached the agent (at least once): {payloads:?}"
    );
    // And the bus works again, live.
    human.send_json(
        json!({"type": "CHAT", "target_id": agent, "payload": "after", "local_id": "after"}),
    );
    on_b.recv_until(|v| v["payload"] == "after", "a frame after the recovery");
    let metrics = b.get("/metrics", "metrics-secret").body;
    let reconnects: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("echocenter_bus_listener_reconnects_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(reconnects >= 1.0, "{metrics}");
}

#[test]
fn a_large_unstored_frame_crosses_through_the_table() {
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(2, &[]);
    let admin = n[0].admin_token();
    let (_, token) = n[0].register_agent(&admin, "Big");
    let mut human = n[1].ws(&admin);
    let mut on_a = n[0].ws(&token);
    let big = "x".repeat(30_000);
    on_a.send_json(
        json!({"type": "CHAT_STREAM", "target_id": 1, "stream_id": "big", "payload": big}),
    );
    on_a.send_json(json!({"type": "CHAT_STREAM_END", "target_id": 1, "stream_id": "big"}));
    let v = human.recv_type("CHAT_STREAM");
    assert_eq!(v["payload"].as_str().unwrap().len(), 30_000);
    human.recv_type("CHAT_STREAM_END");
}

#[test]
fn a_large_stored_chat_is_read_back_by_id_in_order_with_the_small_ones() {
    // Small stored rows travel whole in the notification; one too large for it is read
    // back from the table by id. Both must reach the other node as stored, in order.
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(2, &[]);
    let admin = n[0].admin_token();
    let (agent, token) = n[0].register_agent(&admin, "Bulky");
    let mut human = n[1].ws(&admin);
    let mut on_a = n[0].ws(&token);
    let big = "y".repeat(30_000);
    on_a.send_burst(&[
        json!({"type": "CHAT", "target_id": 1, "payload": "before", "local_id": "s1"}),
        json!({"type": "CHAT", "target_id": 1, "payload": {"text": big}, "local_id": "b1"}),
        json!({"type": "CHAT", "target_id": 1, "payload": "after", "local_id": "s2"}),
    ]);
    let acks: Vec<Value> = (0..3).map(|_| on_a.recv_type("ACK")).collect();
    let got: Vec<Value> = (0..3)
        .map(|_| {
            human.recv_until(
                |v| v["type"] == "CHAT" && v["sender_id"] == agent,
                "a reply",
            )
        })
        .collect();
    assert_eq!(got[0]["payload"], "before");
    assert_eq!(got[1]["payload"]["text"].as_str().unwrap().len(), 30_000);
    assert_eq!(got[2]["payload"], "after");
    for (g, a) in got.iter().zip(&acks) {
        assert_eq!(g["id"], a["id"], "{g}");
        assert_eq!(g["sender_name"], "Bulky");
        assert_eq!(g["timestamp"], a["timestamp"]);
    }
}

#[test]
fn approvals_cross_nodes_and_are_answered_once() {
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(2, &[]);
    let (a, b) = (&n[0], &n[1]);
    let admin = a.admin_token();
    let mut butler = a.ws(&a.butler_token(&admin));
    let mut human = b.ws(&admin);
    butler.send_json(
        json!({"type": "AUTH_REQUEST", "target_id": 1, "local_id": "q1",
        "payload": {"action_id": "x1", "command": "restart", "status": "PENDING"}}),
    );
    let asked = human.recv_type("AUTH_REQUEST");
    assert_eq!(asked["payload"]["action_id"], "x1");
    human.send_json(
        json!({"type": "AUTH_RESPONSE", "payload": {"action_id": "x1", "approved": true}}),
    );
    assert_eq!(
        butler.recv_type("AUTH_RESPONSE")["payload"]["approved"],
        true
    );
    let r = a.post(
        "/api/chat/auth/response",
        &admin,
        json!({"action_id": "x1", "approved": false}),
    );
    assert_eq!(
        r.status, 409,
        "answered once, whichever node asks: {}",
        r.body
    );
    // A node that starts while another runs does not expire what is pending there.
    butler.send_json(
        json!({"type": "AUTH_REQUEST", "target_id": 1, "local_id": "q2",
        "payload": {"action_id": "x2", "command": "restart", "status": "PENDING"}}),
    );
    human.recv_until(|v| v["payload"]["action_id"] == "x2", "the second request");
    let third = Server::start_on(TempDir::new(), a.db.clone(), &[], &[]);
    let history = third.get("/api/chat/history/2", &admin).json();
    let x2 = history
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["payload"]["action_id"] == "x2")
        .unwrap()
        .clone();
    assert_eq!(x2["payload"]["status"], "PENDING");
}

#[test]
fn a_rotation_from_the_command_line_closes_sessions_on_the_nodes_at_once() {
    if !cluster() {
        return;
    }
    let (_db, n) = nodes(2, &[]);
    let admin = n[0].admin_token();
    let (_, token) = n[0].register_agent(&admin, "cli-rotated");
    let mut on_b = n[1].ws(&token);
    let t = Instant::now();
    let out = std::process::Command::new(server_bin())
        .args(["agent", "rotate", "cli-rotated", "--db", &db_arg(&n[0].db)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(on_b.recv_close(), Some(1008));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "closed after {:?} (the liveness re-check alone takes 25 s)",
        t.elapsed()
    );
}
