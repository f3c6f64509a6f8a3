//! Conversation threads, approvals that remember their answer, custom frame types and the
//! presence agents set (README "Threads", "Approvals", "Custom frame types", "AGENT_STATUS"),
//! against the real binary over HTTP and WebSocket.
mod common;
use common::*;

use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn patch(s: &Server, path: &str, token: &str, body: Value) -> HttpResponse {
    s.request("PATCH", path, Some(token), Some(&body.to_string()))
}

fn new_thread(s: &Server, jwt: &str, peer: i64, kind: &str, title: &str) -> Value {
    let r = s.post(
        "/api/chat/threads",
        jwt,
        json!({"peer_id": peer, "channel_kind": kind, "title": title}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

fn threads(s: &Server, jwt: &str, query: &str) -> Vec<Value> {
    let r = s.get(&format!("/api/chat/threads{query}"), jwt);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn thread_messages(s: &Server, jwt: &str, thread: i64) -> Vec<Value> {
    let r = s.get(&format!("/api/chat/threads/{thread}/messages"), jwt);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn payloads(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| match &r["payload"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

fn ids(rows: &[Value]) -> Vec<i64> {
    rows.iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

fn error_of(ws: &mut Ws) -> Value {
    ws.recv_type("ERROR")["payload"].clone()
}

fn butler_id(s: &Server, admin: &str) -> i64 {
    let r = s.get("/api/users/butler", admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["id"].as_i64().unwrap()
}

/// A human's CHAT, in `thread` when given; returns the echo the server sends back.
fn say(human: &mut Ws, to: i64, text: &str, thread: Option<i64>) -> Value {
    let mut frame = json!({"type": "CHAT", "target_id": to, "payload": text, "local_id": text});
    if let Some(t) = thread {
        frame["conversation_id"] = json!(t);
    }
    human.send_json(frame);
    human.recv_until(
        |v| v["type"] == "CHAT" && v["local_id"] == text,
        "the echo of a human's CHAT",
    )
}

// ----- routes ---------------------------------------------------------------------------

#[test]
fn threads_are_created_listed_in_order_renamed_pinned_and_archived() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, _) = s.register_agent(&admin, "Worker");
    assert!(threads(&s, &admin, "").is_empty(), "[] when there are none");

    let first = new_thread(&s, &admin, agent, "agent_direct", "  ");
    assert_eq!(
        first["title"], "New conversation",
        "an empty title: {first}"
    );
    assert_eq!(first["is_default"], false);
    assert_eq!(first["is_pinned"], false);
    assert_eq!(first["channel_kind"], "agent_direct");
    assert_eq!(first["peer_user_id"], agent);
    assert_eq!(first["owner_user_id"], 1);
    for absent in ["archived_at", "last_message_at", "summary"] {
        assert!(first.get(absent).is_none(), "{absent} omitted: {first}");
    }
    for present in ["created_at", "updated_at"] {
        assert!(first[present].as_str().unwrap().ends_with('Z'), "{first}");
    }
    let second = new_thread(&s, &admin, agent, "agent_direct", "Disk check");
    let (first, second) = (
        first["id"].as_i64().unwrap(),
        second["id"].as_i64().unwrap(),
    );

    // No messages yet: newest id first.
    assert_eq!(ids(&threads(&s, &admin, "")), [second, first]);

    // A message moves its thread up (last_message_at follows every stored frame).
    let mut ws = s.ws(&admin);
    let echo = say(&mut ws, agent, "hello", Some(first));
    let listed = threads(&s, &admin, "");
    assert_eq!(ids(&listed), [first, second]);
    assert_eq!(listed[0]["last_message_at"], echo["timestamp"]);
    assert_eq!(listed[0]["updated_at"], echo["timestamp"]);
    assert!(listed[1].get("last_message_at").is_none());

    // Pinned threads come first.
    let r = patch(
        &s,
        &format!("/api/chat/threads/{second}"),
        &admin,
        json!({"is_pinned": true, "title": "Pinned one", "summary": "about the disk"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (&v["is_pinned"], &v["title"], &v["summary"]),
        (&json!(true), &json!("Pinned one"), &json!("about the disk"))
    );
    assert_eq!(ids(&threads(&s, &admin, "")), [second, first]);

    // Archiving sets archived_at; unarchiving removes it. An empty title is the default one.
    let r = patch(
        &s,
        &format!("/api/chat/threads/{first}"),
        &admin,
        json!({"is_archived": true, "title": ""}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["archived_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r.json()["title"], "New conversation");
    let r = patch(
        &s,
        &format!("/api/chat/threads/{first}"),
        &admin,
        json!({"is_archived": false}),
    );
    assert!(r.json().get("archived_at").is_none(), "{}", r.body);

    // Filters.
    let butler = butler_id(&s, &admin);
    let to_butler = new_thread(&s, &admin, butler, "butler_direct", "Butler")["id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        ids(&threads(&s, &admin, &format!("?peer_id={butler}"))),
        [to_butler]
    );
    assert_eq!(
        ids(&threads(&s, &admin, "?channel_kind=agent_direct")),
        [second, first]
    );
    assert!(threads(
        &s,
        &admin,
        &format!("?peer_id={butler}&channel_kind=agent_direct")
    )
    .is_empty());
}

#[test]
fn thread_routes_refuse_bad_requests_with_clear_errors() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, agent_token) = s.register_agent(&admin, "Worker");
    let (member_id, member) = s.create_human(&admin, "mia", "MEMBER");
    let butler = butler_id(&s, &admin);

    let create = |body: Value| s.post("/api/chat/threads", &admin, body);
    for (body, status, error) in [
        (json!({}), 400, "peer_id and channel_kind are required"),
        (
            json!({"peer_id": agent}),
            400,
            "peer_id and channel_kind are required",
        ),
        (
            json!({"channel_kind": "agent_direct"}),
            400,
            "peer_id and channel_kind are required",
        ),
        (
            json!({"peer_id": agent, "channel_kind": "group"}),
            400,
            "invalid channel_kind",
        ),
        (
            json!({"peer_id": agent, "channel_kind": "butler_direct"}),
            400,
            "invalid channel_kind",
        ),
        (
            json!({"peer_id": butler, "channel_kind": "agent_direct"}),
            400,
            "invalid channel_kind",
        ),
        (
            json!({"peer_id": member_id, "channel_kind": "agent_direct"}),
            400,
            "invalid peer_id",
        ),
        (
            json!({"peer_id": 999, "channel_kind": "agent_direct"}),
            400,
            "invalid peer_id",
        ),
        (
            json!({"peer_id": agent, "channel_kind": "agent_direct", "title": "x".repeat(201)}),
            400,
            "title is too long",
        ),
    ] {
        let r = create(body.clone());
        assert_eq!((r.status, r.error()), (status, error.to_string()), "{body}");
    }
    let r = s.request("POST", "/api/chat/threads", Some(&admin), Some("{not json"));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = s.request("POST", "/api/chat/threads", Some(&admin), Some("[]"));
    assert_eq!(r.status, 400, "{}", r.body);

    // Agents and strangers have no threads.
    let r = s.get("/api/chat/threads", &agent_token);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = s.request("GET", "/api/chat/threads", None, None);
    assert_eq!(r.status, 401, "{}", r.body);

    // Someone else's thread, or none, or not a number: 404, the same for all.
    let mine = new_thread(&s, &member, agent, "agent_direct", "mine")["id"]
        .as_i64()
        .unwrap();
    for path in [
        format!("/api/chat/threads/{mine}"),
        "/api/chat/threads/424242".to_string(),
        "/api/chat/threads/abc".to_string(),
        "/api/chat/threads/-1".to_string(),
    ] {
        let r = patch(&s, &path, &admin, json!({"title": "taken"}));
        assert_eq!(
            (r.status, r.error().as_str()),
            (404, "conversation thread not found"),
            "{path}"
        );
        let r = s.get(&format!("{path}/messages"), &admin);
        assert_eq!(
            (r.status, r.error().as_str()),
            (404, "conversation thread not found"),
            "{path}"
        );
    }
    assert!(
        threads(&s, &admin, "").is_empty(),
        "the member's thread is not listed to the admin"
    );
    assert_eq!(thread_messages(&s, &member, mine), Vec::<Value>::new());

    // Like history: a limit above 500 is 500; below 1, or not a number, is refused.
    let r = s.get(
        &format!("/api/chat/threads/{mine}/messages?limit=501"),
        &member,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for query in ["?limit=0", "?limit=x", "?before_id=0"] {
        let r = s.get(
            &format!("/api/chat/threads/{mine}/messages{query}"),
            &member,
        );
        assert_eq!(r.status, 400, "{query}: {}", r.body);
    }
    for query in ["?peer_id=x", "?channel_kind=group"] {
        let r = s.get(&format!("/api/chat/threads{query}"), &member);
        assert_eq!(r.status, 400, "{query}: {}", r.body);
    }
    let r = patch(
        &s,
        &format!("/api/chat/threads/{mine}"),
        &member,
        json!({"is_pinned": "yes"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = patch(
        &s,
        &format!("/api/chat/threads/{mine}"),
        &member,
        json!({"title": "y".repeat(201)}),
    );
    assert_eq!((r.status, r.error().as_str()), (400, "title is too long"));
}

#[test]
fn thread_messages_page_like_history_oldest_first() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, _) = s.register_agent(&admin, "Worker");
    let thread = new_thread(&s, &admin, agent, "agent_direct", "paged")["id"]
        .as_i64()
        .unwrap();
    let mut ws = s.ws(&admin);
    for i in 0..5 {
        say(&mut ws, agent, &format!("m{i}"), Some(thread));
    }
    say(&mut ws, agent, "elsewhere", None);

    let all = thread_messages(&s, &admin, thread);
    assert_eq!(payloads(&all), ["m0", "m1", "m2", "m3", "m4"]);
    // The same row shape as GET /api/chat/history/:peer_id.
    let history = s.get(&format!("/api/chat/history/{agent}"), &admin).json();
    assert_eq!(all[0], history[0]);
    assert_eq!(all[0]["conversation_id"], thread);

    let page = s
        .get(
            &format!("/api/chat/threads/{thread}/messages?limit=2"),
            &admin,
        )
        .json();
    assert_eq!(payloads(page.as_array().unwrap()), ["m3", "m4"]);
    let older = s
        .get(
            &format!(
                "/api/chat/threads/{thread}/messages?limit=2&before_id={}",
                page[0]["id"]
            ),
            &admin,
        )
        .json();
    assert_eq!(payloads(older.as_array().unwrap()), ["m1", "m2"]);
}

// ----- filing ---------------------------------------------------------------------------

#[test]
fn a_humans_chat_without_a_thread_goes_to_the_default_one_made_on_demand() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, agent_token) = s.register_agent(&admin, "Worker");
    let mut a = s.ws(&agent_token);
    let mut ws = s.ws(&admin);

    let echo = say(&mut ws, agent, "first", None);
    let listed = threads(&s, &admin, "");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let default = &listed[0];
    assert_eq!(default["is_default"], true);
    assert_eq!(default["channel_kind"], "agent_direct");
    assert_eq!(
        echo["conversation_id"], default["id"],
        "the echo is stamped"
    );
    let got = a.recv_type("CHAT");
    assert_eq!(
        got["conversation_id"], default["id"],
        "so is the agent's copy"
    );

    // The second one goes to the same thread: one default per pair.
    say(&mut ws, agent, "second", None);
    assert_eq!(threads(&s, &admin, "").len(), 1);
    let rows = thread_messages(&s, &admin, default["id"].as_i64().unwrap());
    assert_eq!(payloads(&rows), ["first", "second"]);
}

#[test]
fn after_a_data_reset_a_humans_chat_goes_to_the_new_pairs_default_thread() {
    // The hub remembers each pair's default thread; a reset starts thread ids over, so a
    // remembered id would name another pair's thread (or none).
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, _) = s.register_agent(&admin, "Worker");
    let mut ws = s.ws(&admin);
    let before = say(&mut ws, agent, "before", None);
    assert_eq!(before["conversation_id"], 1, "{before}");
    drop(ws);

    let r = s.request("POST", "/api/dev/mock/reset", Some(&admin), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let admin = s.admin_token();
    // Thread 1 is now the admin's with the Butler; the agent comes back under the same id.
    let butler = new_thread(&s, &admin, butler_id(&s, &admin), "butler_direct", "Ops");
    assert_eq!(butler["id"], 1);
    let (again, _) = s.register_agent(&admin, "Worker");
    assert_eq!(again, agent, "the ids start over");
    let mut ws = s.ws(&admin);
    let after = say(&mut ws, agent, "after", None);
    let default = threads(&s, &admin, "")
        .into_iter()
        .find(|t| t["peer_user_id"] == agent)
        .expect("the pair's new default thread");
    assert_eq!(default["is_default"], true);
    assert_eq!(after["conversation_id"], default["id"], "{after}");
    assert_eq!(
        payloads(&thread_messages(
            &s,
            &admin,
            default["id"].as_i64().unwrap()
        )),
        ["after"]
    );
    assert!(
        thread_messages(&s, &admin, 1).is_empty(),
        "nothing in the Butler's thread"
    );
}

/// tests/guide/agent.py is the integration guide's example, byte for byte; it never sends
/// conversation_id.
fn start_guide_agent(s: &Server, token: &str) -> std::process::Child {
    let python = std::env::var("ECHOCENTER_TEST_PYTHON")
        .expect("ECHOCENTER_TEST_PYTHON is not set: run the suite with scripts/test.sh");
    let script = std::fs::read_to_string("tests/guide/agent.py")
        .unwrap()
        .replace("your_token_here", token)
        .replace("localhost:8080", &s.addr);
    let path = s.dir.path().join("agent.py");
    std::fs::write(&path, script).unwrap();
    Command::new(python)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn the_guides_unchanged_python_agent_answers_inside_the_thread_the_human_writes_in() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, token) = s.register_agent(&admin, "Guide-Agent");
    let (_, member) = s.create_human(&admin, "mia", "MEMBER");
    let mut ws = s.ws(&admin);
    let mut other = s.ws(&member);
    let mut guide = start_guide_agent(&s, &token);
    ws.recv_until(|v| v["type"] == "SYSTEM_LOG", "Agent Online");

    let disk = new_thread(&s, &admin, agent, "agent_direct", "Disk")["id"]
        .as_i64()
        .unwrap();
    let net = new_thread(&s, &admin, agent, "agent_direct", "Network")["id"]
        .as_i64()
        .unwrap();
    let reply_in = |ws: &mut Ws| {
        ws.recv_until(
            |v| v["type"] == "CHAT" && v["sender_id"] == agent,
            "the guide agent's reply",
        )
    };

    say(&mut ws, agent, "check the disk", Some(disk));
    let reply = reply_in(&mut ws);
    assert_eq!(reply["payload"], "Roger that!");
    assert_eq!(
        reply["conversation_id"], disk,
        "the reply is in the open thread"
    );

    say(&mut ws, agent, "check the network", Some(net));
    assert_eq!(reply_in(&mut ws)["conversation_id"], net);

    // Another human's conversation with the same agent is theirs: its default thread.
    say(&mut other, agent, "hello from mia", None);
    let theirs = reply_in(&mut other);
    let mia_default = threads(&s, &member, "")[0]["id"].as_i64().unwrap();
    assert_eq!(theirs["conversation_id"], mia_default);
    ws.assert_no("CHAT", Duration::from_millis(300));

    let _ = guide.kill();
    let _ = guide.wait();
    assert_eq!(
        payloads(&thread_messages(&s, &admin, disk)),
        ["check the disk", "Roger that!"]
    );
    assert_eq!(
        payloads(&thread_messages(&s, &admin, net)),
        ["check the network", "Roger that!"]
    );
    // No default thread was made for the admin: every frame had a thread.
    assert!(threads(&s, &admin, "")
        .iter()
        .all(|t| t["is_default"] == false));
}

#[test]
fn a_streamed_answer_is_stamped_with_the_thread_in_every_frame_and_in_the_stored_row() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, token) = s.register_agent(&admin, "Streamer");
    let mut a = s.ws(&token);
    let mut ws = s.ws(&admin);
    let thread = new_thread(&s, &admin, agent, "agent_direct", "stream")["id"]
        .as_i64()
        .unwrap();
    say(&mut ws, agent, "tell me a story", Some(thread));
    a.recv_type("CHAT");

    for chunk in ["Once ", "upon"] {
        a.send_json(
            json!({"type": "CHAT_STREAM", "target_id": 1, "stream_id": "s1", "payload": chunk}),
        );
    }
    a.send_json(json!({"type": "CHAT", "target_id": 1, "stream_id": "s1", "payload": "Once upon", "local_id": "final"}));
    a.send_json(json!({"type": "CHAT_STREAM_END", "target_id": 1, "stream_id": "s1"}));
    for kind in ["CHAT_STREAM", "CHAT_STREAM", "CHAT", "CHAT_STREAM_END"] {
        let v = ws.recv_until(|v| v["sender_id"] == agent, kind);
        assert_eq!(v["type"], kind, "{v}");
        assert_eq!(v["conversation_id"], thread, "{v}");
        assert_eq!(v["stream_id"], "s1", "{v}");
    }
    assert_eq!(a.recv_type("ACK")["local_id"], "final");
    let rows = thread_messages(&s, &admin, thread);
    assert_eq!(payloads(&rows), ["tell me a story", "Once upon"]);
    assert_eq!(rows[1]["stream_id"], "s1");
}

#[test]
fn a_conversation_id_that_is_not_the_pairs_own_is_refused_and_not_stored() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, token) = s.register_agent(&admin, "Worker");
    let (agent2, token2) = s.register_agent(&admin, "Other");
    let (member_id, member) = s.create_human(&admin, "mia", "MEMBER");
    let mias = new_thread(&s, &member, agent, "agent_direct", "private")["id"]
        .as_i64()
        .unwrap();
    let admins_other = new_thread(&s, &admin, agent2, "agent_direct", "with Other")["id"]
        .as_i64()
        .unwrap();
    let mut ws = s.ws(&admin);
    let mut a = s.ws(&token);
    let mut a2 = s.ws(&token2);

    let forbidden = |ws: &mut Ws, frame: Value| {
        ws.send_json(frame.clone());
        let e = error_of(ws);
        assert_eq!(e["code"], "forbidden", "{frame}: {e}");
        e
    };
    // The admin writing into the member's thread; into a thread with another agent; into
    // one that does not exist.
    for thread in [mias, admins_other, 999_999] {
        let e = forbidden(
            &mut ws,
            json!({"type": "CHAT", "target_id": agent, "payload": "sneak", "conversation_id": thread}),
        );
        assert_eq!(
            e["message"],
            "conversation thread not found for these two users"
        );
    }
    // The agent writing to the admin in the member's thread.
    forbidden(
        &mut a,
        json!({"type": "CHAT", "target_id": 1, "payload": "sneak", "conversation_id": mias}),
    );
    forbidden(
        &mut a,
        json!({"type": "CHAT_STREAM", "target_id": 1, "stream_id": "x", "payload": "sneak", "conversation_id": mias}),
    );
    // Between two agents there are no threads.
    let e = forbidden(
        &mut a,
        json!({"type": "CHAT", "target_id": agent2, "payload": "sneak", "conversation_id": mias}),
    );
    assert_eq!(
        e["message"],
        "conversation_id names a thread between a human and an agent"
    );
    a2.assert_no("CHAT", Duration::from_millis(200));

    // Nothing of it was stored or delivered; the member's own thread is untouched.
    assert_eq!(
        s.get(&format!("/api/chat/history/{agent}"), &admin).json(),
        json!([])
    );
    assert_eq!(thread_messages(&s, &member, mias), Vec::<Value>::new());
    a.assert_no("CHAT", Duration::from_millis(200));

    // The agent may write in the member's thread to the member.
    a.send_json(json!({"type": "CHAT", "target_id": member_id, "payload": "for mia", "conversation_id": mias, "local_id": "ok"}));
    assert_eq!(a.recv_type("ACK")["local_id"], "ok");
    assert_eq!(payloads(&thread_messages(&s, &member, mias)), ["for mia"]);

    // A conversation_id that is not an id at all is a bad envelope.
    ws.send_json(
        json!({"type": "CHAT", "target_id": agent, "payload": "x", "conversation_id": "abc"}),
    );
    assert_eq!(error_of(&mut ws)["code"], "bad_envelope");
}

// ----- approvals ------------------------------------------------------------------------

struct Approvals {
    s: Server,
    admin: String,
    butler: i64,
    b: Ws,
    member_id: i64,
    member: String,
}

impl Approvals {
    fn start(args: &[&str]) -> Approvals {
        let s = Server::start_with(args, &[]);
        let admin = s.admin_token();
        let butler = butler_id(&s, &admin);
        let b = s.ws(&s.butler_token(&admin));
        let (member_id, member) = s.create_human(&admin, "mia", "MEMBER");
        Approvals {
            s,
            admin,
            butler,
            b,
            member_id,
            member,
        }
    }

    /// The Butler asks `human` to approve; returns the frame the human received.
    fn ask(&mut self, human: &mut Ws, human_id: i64, action_id: &str) -> Value {
        self.b.send_json(json!({
            "type": "AUTH_REQUEST", "target_id": human_id, "local_id": action_id,
            "payload": {"action_id": action_id, "command": "restart nginx", "status": "PENDING"}
        }));
        assert_eq!(self.b.recv_type("ACK")["local_id"], action_id);
        human.recv_until(
            |v| v["type"] == "AUTH_REQUEST" && v["payload"]["action_id"] == action_id,
            "the AUTH_REQUEST",
        )
    }

    fn answer(&self, human: &mut Ws, action_id: &str, approved: bool) {
        human.send_json(json!({
            "type": "AUTH_RESPONSE", "target_id": self.butler,
            "payload": {"action_id": action_id, "approved": approved}
        }));
    }

    /// The stored request's status, as `jwt` sees it in its history with the Butler.
    fn status(&self, jwt: &str, action_id: &str) -> String {
        let rows = self
            .s
            .get(&format!("/api/chat/history/{}", self.butler), jwt)
            .json();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "AUTH_REQUEST" && r["payload"]["action_id"] == action_id)
            .unwrap_or_else(|| panic!("no AUTH_REQUEST {action_id} in {rows}"))["payload"]["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[test]
fn an_answered_approval_remembers_its_answer_and_cannot_be_answered_again() {
    let mut w = Approvals::start(&[]);
    let mut mia = w.s.ws(&w.member);
    let (_, other) = w.s.create_human(&w.admin, "otto", "MEMBER");
    let mut otto = w.s.ws(&other);

    let asked = w.ask(&mut mia, w.member_id, "a1");
    let default = threads(&w.s, &w.member, "")[0]["id"].clone();
    assert_eq!(
        asked["conversation_id"], default,
        "filed like the Butler's CHAT"
    );
    assert_eq!(w.status(&w.member, "a1"), "PENDING");

    // A member may not answer what was asked of someone else.
    w.answer(&mut otto, "a1", true);
    let e = error_of(&mut otto);
    assert_eq!(e["code"], "forbidden");
    assert_eq!(
        e["message"],
        "this approval was asked of someone else (only they, or an admin, may answer)"
    );
    let r = w.s.post(
        "/api/chat/auth/response",
        &other,
        json!({"action_id": "a1", "approved": true}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    w.b.assert_no("AUTH_RESPONSE", Duration::from_millis(200));

    // The addressee answers: the Butler gets it in the request's thread; the request remembers.
    w.answer(&mut mia, "a1", false);
    let got = w.b.recv_type("AUTH_RESPONSE");
    assert_eq!(got["payload"]["approved"], false);
    assert_eq!(got["sender_id"], w.member_id);
    assert_eq!(got["conversation_id"], default);
    w.s.wait_for("REJECTED stored", WAIT, || {
        w.status(&w.member, "a1") == "REJECTED"
    });

    // Once answered, never again: over the WebSocket or REST, by anyone.
    w.answer(&mut mia, "a1", true);
    let e = error_of(&mut mia);
    assert_eq!(
        (e["code"].as_str(), e["message"].as_str()),
        (
            Some("forbidden"),
            Some("this approval was already answered: REJECTED")
        )
    );
    let r = w.s.post(
        "/api/chat/auth/response",
        &w.admin,
        json!({"action_id": "a1", "approved": true}),
    );
    assert_eq!(
        (r.status, r.error().as_str()),
        (409, "approval already answered")
    );
    w.b.assert_no("AUTH_RESPONSE", Duration::from_millis(200));
    assert_eq!(w.status(&w.member, "a1"), "REJECTED");

    // An admin may answer a member's request, over REST too.
    w.ask(&mut mia, w.member_id, "a2");
    let r = w.s.post(
        "/api/chat/auth/response",
        &w.admin,
        json!({"action_id": "a2", "approved": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let got = w.b.recv_type("AUTH_RESPONSE");
    assert_eq!(
        (
            got["payload"]["action_id"].as_str(),
            got["sender_id"].as_i64()
        ),
        (Some("a2"), Some(1))
    );
    assert_eq!(w.status(&w.member, "a2"), "APPROVED");
    // The admin's answer is filed in the member's thread (where the request is) and is in
    // the admin's own history with the Butler, not in the member's: it is between the admin
    // and the Butler. (History reads filed rows through threads, and answers apart.)
    assert_eq!(got["conversation_id"], default);
    let answers = |jwt: &str| -> Vec<i64> {
        w.s.get(&format!("/api/chat/history/{}", w.butler), jwt)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["type"] == "AUTH_RESPONSE" && r["payload"]["action_id"] == "a2")
            .map(|r| r["sender_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(answers(&w.admin), [1]);
    assert!(answers(&w.member).is_empty());
    let in_thread: Vec<Value> = thread_messages(&w.s, &w.member, default.as_i64().unwrap())
        .into_iter()
        .filter(|r| r["type"] == "AUTH_RESPONSE")
        .collect();
    assert_eq!(
        in_thread.len(),
        2,
        "mia's answer to a1 and the admin's to a2: {in_thread:?}"
    );

    // An answer to something the server never stored is only routed (the Butler judges it).
    w.answer(&mut mia, "never-asked", true);
    assert_eq!(
        w.b.recv_type("AUTH_RESPONSE")["payload"]["action_id"],
        "never-asked"
    );
}

#[test]
fn pending_approvals_expire_at_start_up_and_the_butler_is_told_when_it_connects() {
    let mut w = Approvals::start(&[]);
    let mut mia = w.s.ws(&w.member);
    w.ask(&mut mia, w.member_id, "before-restart");
    w.ask(&mut mia, w.member_id, "answered");
    w.answer(&mut mia, "answered", true);
    w.b.recv_type("AUTH_RESPONSE");
    w.s.wait_for("APPROVED stored", WAIT, || {
        w.status(&w.member, "answered") == "APPROVED"
    });
    drop(mia);

    let Approvals {
        s, member, butler, ..
    } = w;
    // (On PostgreSQL the killed process's node counts as alive until its silence passes
    // --node-timeout; only then is this node alone and the start-up expiry runs.)
    let s = s.restart(&["--node-timeout", "1s"], &[]);
    let admin = s.admin_token();
    let w = Approvals {
        b: s.ws(&s.butler_token(&admin)),
        s,
        admin,
        butler,
        member_id: 0,
        member,
    };
    let mut b = w.b;
    let told = b.recv_type("AUTH_STATUS_UPDATE");
    assert_eq!(
        told["payload"],
        json!({"action_id": "before-restart", "status": "EXPIRED"})
    );
    assert_eq!(told["sender_id"], 0, "from the server: {told}");
    b.assert_no("AUTH_STATUS_UPDATE", Duration::from_millis(300));
    let w = Approvals { b, ..w };
    assert_eq!(w.status(&w.member, "before-restart"), "EXPIRED");
    assert_eq!(
        w.status(&w.member, "answered"),
        "APPROVED",
        "answers survive restarts"
    );

    let mut mia = w.s.ws(&w.member);
    w.answer(&mut mia, "before-restart", true);
    assert_eq!(
        error_of(&mut mia)["message"],
        "this approval was already answered: EXPIRED"
    );
}

#[test]
fn a_pending_approval_expires_after_the_configured_age_and_both_sides_are_told() {
    let mut w = Approvals::start(&["--approval-ttl", "1s"]);
    let mut mia = w.s.ws(&w.member);
    let asked = w.ask(&mut mia, w.member_id, "slow");
    let told = mia.recv_until(
        |v| v["type"] == "AUTH_STATUS_UPDATE",
        "the human is told it expired",
    );
    assert_eq!(
        told["payload"],
        json!({"action_id": "slow", "status": "EXPIRED"})
    );
    assert_eq!(told["conversation_id"], asked["conversation_id"]);
    let told = w.b.recv_type("AUTH_STATUS_UPDATE");
    assert_eq!(told["payload"]["status"], "EXPIRED");
    assert_eq!(w.status(&w.member, "slow"), "EXPIRED");
}

#[test]
fn the_butlers_own_status_update_is_remembered_and_relayed() {
    let mut w = Approvals::start(&[]);
    let mut mia = w.s.ws(&w.member);
    w.ask(&mut mia, w.member_id, "gave-up");
    w.b.send_json(json!({
        "type": "AUTH_STATUS_UPDATE", "target_id": w.member_id,
        "payload": {"action_id": "gave-up", "status": "EXPIRED"}
    }));
    let got = mia.recv_type("AUTH_STATUS_UPDATE");
    assert_eq!(got["payload"]["status"], "EXPIRED");
    w.s.wait_for("EXPIRED stored", WAIT, || {
        w.status(&w.member, "gave-up") == "EXPIRED"
    });

    // A status that is not final changes nothing.
    w.ask(&mut mia, w.member_id, "still");
    w.b.send_json(json!({
        "type": "AUTH_STATUS_UPDATE", "target_id": w.member_id,
        "payload": {"action_id": "still", "status": "MAYBE"}
    }));
    mia.recv_type("AUTH_STATUS_UPDATE");
    assert_eq!(w.status(&w.member, "still"), "PENDING");

    // Only the Butler asks and reports.
    for kind in ["AUTH_REQUEST", "AUTH_STATUS_UPDATE"] {
        mia.send_json(json!({"type": kind, "target_id": 1, "payload": {"action_id": "x"}}));
        assert_eq!(error_of(&mut mia)["code"], "forbidden", "{kind}");
    }
}

// ----- custom frame types ---------------------------------------------------------------

fn frames_in_custom(s: &Server) -> u64 {
    let text = s.get("/metrics", "metrics-secret").body;
    text.lines()
        .find_map(|l| l.strip_prefix("echocenter_frames_in_total{type=\"custom\"} "))
        .unwrap_or_else(|| panic!("no custom counter in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_custom_type_goes_to_its_target_or_to_every_human_and_never_to_other_agents() {
    let s = Server::start_with(&["--metrics-token", "metrics-secret"], &[]);
    let admin = s.admin_token();
    let (agent, token) = s.register_agent(&admin, "Weather");
    let (agent2, token2) = s.register_agent(&admin, "Other");
    let (_, member) = s.create_human(&admin, "mia", "MEMBER");
    let mut a = s.ws(&token);
    let mut a2 = s.ws(&token2);
    let mut b = s.ws(&s.butler_token(&admin));
    let mut ws = s.ws(&admin);
    let mut mia = s.ws(&member);
    let before = frames_in_custom(&s);

    // No target: every human, the agents and the Butler not.
    a.send_json(json!({"type": "WEATHER_UPDATE", "payload": {"temp_c": 21.5}}));
    for human in [&mut ws, &mut mia] {
        let v = human.recv_type("WEATHER_UPDATE");
        assert_eq!(v["payload"], json!({"temp_c": 21.5}));
        assert_eq!(v["sender_id"], agent);
        assert!(v.get("id").is_none(), "not stored: {v}");
    }
    a2.assert_no("WEATHER_UPDATE", Duration::from_millis(200));
    b.assert_no("WEATHER_UPDATE", Duration::from_millis(100));

    // A target: only it.
    let name32 = "A".repeat(31) + "9";
    a.send_json(json!({"type": name32, "target_id": agent2, "payload": "for you"}));
    assert_eq!(a2.recv_type(&name32)["payload"], "for you");
    ws.assert_no(&name32, Duration::from_millis(200));

    // Counted, and nowhere in history.
    assert_eq!(frames_in_custom(&s), before + 2);
    assert_eq!(s.get("/api/messages", &admin).json(), json!([]));
    assert_eq!(
        s.get(&format!("/api/chat/history/{agent}"), &admin).json(),
        json!([])
    );

    // Names that are not custom types.
    for bad in [
        "weather_update",
        "WEATHER-UPDATE",
        &("A".repeat(33)),
        "",
        "ÄPFEL",
    ] {
        a.send_json(json!({"type": bad, "payload": 1}));
        let e = error_of(&mut a);
        assert_eq!(e["code"], "unknown_type", "{bad:?}: {e}");
    }
    // A target that does not exist.
    a.send_json(json!({"type": "PING_ME", "target_id": 999, "payload": 1}));
    assert_eq!(error_of(&mut a)["code"], "target_not_found");
}

// ----- AGENT_STATUS ---------------------------------------------------------------------

fn listed_status(s: &Server, admin: &str, id: i64) -> (String, String) {
    let agents = s.get("/api/users/agents", admin).json();
    let a = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("agent {id} not in {agents}"))
        .clone();
    (
        a["status"].as_str().unwrap().to_string(),
        a["activity"].as_str().unwrap().to_string(),
    )
}

#[test]
fn an_agent_says_it_is_busy_or_idle_and_presence_carries_it() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent, token) = s.register_agent(&admin, "Worker");
    let mut ws = s.ws(&admin);
    assert_eq!(listed_status(&s, &admin, agent).0, "OFFLINE");
    let mut a = s.ws(&token);
    let online = ws.recv_type("PRESENCE");
    assert_eq!(
        (
            online["payload"]["status"].as_str(),
            online["payload"]["activity"].as_str()
        ),
        (Some("ONLINE"), Some("IDLE"))
    );

    a.send_json(json!({"type": "AGENT_STATUS", "payload": {"status": "BUSY"}}));
    let p = ws.recv_type("PRESENCE")["payload"].clone();
    assert_eq!(
        (
            p["user_id"].as_i64(),
            p["online"].as_bool(),
            p["status"].as_str(),
            p["activity"].as_str()
        ),
        (Some(agent), Some(true), Some("BUSY"), Some("BUSY"))
    );
    assert_eq!(
        listed_status(&s, &admin, agent),
        ("BUSY".into(), "BUSY".into())
    );
    let statuses = s.get("/api/users/agents/status", &admin).json();
    let row = statuses
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == agent)
        .unwrap()
        .clone();
    assert_eq!(
        (
            row["status"].as_str(),
            row["activity"].as_str(),
            row["online"].as_bool()
        ),
        (Some("BUSY"), Some("BUSY"), Some(true))
    );

    // Saying it again changes nothing, so nobody is told again.
    a.send_json(json!({"type": "AGENT_STATUS", "payload": "busy"}));
    ws.assert_no("PRESENCE", Duration::from_millis(200));

    a.send_json(json!({"type": "AGENT_STATUS", "payload": {"status": "IDLE"}}));
    assert_eq!(ws.recv_type("PRESENCE")["payload"]["status"], "ONLINE");
    assert_eq!(
        listed_status(&s, &admin, agent),
        ("ONLINE".into(), "IDLE".into())
    );

    // Busy ends with the connection.
    a.send_json(json!({"type": "AGENT_STATUS", "payload": {"status": "BUSY"}}));
    ws.recv_type("PRESENCE");
    a.close();
    let off = ws.recv_type("PRESENCE")["payload"].clone();
    assert_eq!(off["status"], "OFFLINE");
    let _a = s.ws(&token);
    assert_eq!(ws.recv_type("PRESENCE")["payload"]["status"], "ONLINE");

    // Bad payloads and humans are refused.
    let mut a = s.ws(&token);
    for bad in [
        json!({"status": "SLEEPING"}),
        json!(null),
        json!(3),
        json!({"state": "BUSY"}),
    ] {
        a.send_json(json!({"type": "AGENT_STATUS", "payload": bad}));
        assert_eq!(error_of(&mut a)["code"], "bad_envelope", "{bad}");
    }
    ws.send_json(json!({"type": "AGENT_STATUS", "payload": {"status": "BUSY"}}));
    assert_eq!(error_of(&mut ws)["code"], "forbidden");
}

#[test]
fn ops_status_answers_not_configured() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.get("/api/users/ops/status", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"enabled": false, "worker_reachable": false, "node_count": 0, "ssh_key_count": 0})
    );
    assert_eq!(
        s.request("GET", "/api/users/ops/status", None, None).status,
        401
    );
}
