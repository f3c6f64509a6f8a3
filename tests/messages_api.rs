//! Dashboard logs (`/api/messages`) and chat history over REST (SPEC section 3).

mod common;
use common::*;

use std::time::Duration;

use serde_json::{json, Value};

fn is_timestamp(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

fn list(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}"))
}

fn ids(v: &Value) -> Vec<i64> {
    list(v).iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

fn contents(v: &Value) -> Vec<String> {
    list(v)
        .iter()
        .map(|r| r["content"].as_str().unwrap().to_string())
        .collect()
}

fn post_log(s: &Server, token: &str, agent_id: &str, level: &str, content: &str) -> Value {
    let r = s.post(
        "/api/messages",
        token,
        json!({"agent_id": agent_id, "level": level, "content": content}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

fn mock_chat(s: &Server, admin: &str, from: &str, to: &str, content: Value) -> i64 {
    let r = s.post(
        "/api/dev/mock/chat",
        admin,
        json!({"sender_username": from, "receiver_username": to, "content": content}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_i64().unwrap()
}

#[test]
fn an_admin_posts_a_log_and_gets_the_stored_row() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "Observer", "level": "warning", "content": "disk at 91%"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let row = r.json();
    assert!(row["id"].as_i64().unwrap() > 0);
    assert_eq!(row["agent_id"], "Observer");
    assert_eq!(row["level"], "WARNING", "levels are upper-cased");
    assert_eq!(row["content"], "disk at 91%");
    assert!(is_timestamp(row["timestamp"].as_str().unwrap()), "{row}");

    let stored = s.get("/api/messages", &admin).json();
    assert_eq!(list(&stored).len(), 1);
    assert_eq!(stored[0], row, "the listed row equals the 201 body");

    // No level: INFO.
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "Observer", "content": "no level"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["level"], "INFO");
}

#[test]
fn an_agents_log_is_filed_under_its_own_name_and_broadcast_to_humans() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "bot");
    let mut human = s.ws(&admin);
    let row = post_log(&s, &token, "somebody-else", "SUCCESS", "scan complete");
    assert_eq!(
        row["agent_id"], "bot",
        "agent_id forced to the agent's username"
    );
    assert_eq!(row["level"], "SUCCESS");

    let frame = human.recv_until(
        |v| v["type"] == "SYSTEM_LOG" && v["payload"]["content"] == "scan complete",
        "the SYSTEM_LOG broadcast",
    );
    assert_eq!(frame["payload"]["agent_id"], "bot");
    assert_eq!(frame["payload"]["id"], row["id"]);
    assert_eq!(frame["payload"]["timestamp"], row["timestamp"]);

    let stored = s.get("/api/messages?agent_id=bot", &admin).json();
    assert_eq!(ids(&stored), vec![row["id"].as_i64().unwrap()]);
    let stored = s.get("/api/messages?agent_id=somebody-else", &admin).json();
    assert!(list(&stored).is_empty());
}

#[test]
fn a_member_may_read_but_not_post_logs() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    let r = s.post(
        "/api/messages",
        &member,
        json!({"agent_id": "x", "level": "INFO", "content": "nope"}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error(), "admin access required");
    let r = s.get("/api/messages", &member);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), "[]", "nothing was stored, and empty is []");
}

#[test]
fn logs_are_newest_first_and_filter_by_agent_level_and_literal_substring() {
    let s = Server::start();
    let admin = s.admin_token();
    let rows = [
        ("Observer", "INFO", "100% done"),
        ("Observer", "ERROR", "100 percent"),
        ("Diagnoser", "INFO", "a_b"),
        ("Diagnoser", "WARNING", "axb"),
        ("Guardian", "ERROR", "Disk FULL"),
    ];
    let mut posted = Vec::new();
    for (agent, level, content) in rows {
        posted.push(
            post_log(&s, &admin, agent, level, content)["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let all = s.get("/api/messages", &admin).json();
    let mut newest_first = posted.clone();
    newest_first.reverse();
    assert_eq!(ids(&all), newest_first);
    for row in list(&all) {
        assert!(is_timestamp(row["timestamp"].as_str().unwrap()), "{row}");
    }

    let check = |query: &str, want: &[&str]| {
        let r = s.get(&format!("/api/messages?{query}"), &admin);
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        assert_eq!(contents(&r.json()), want, "{query}");
    };
    check("agent_id=Observer", &["100 percent", "100% done"]);
    check("level=ERROR", &["Disk FULL", "100 percent"]);
    check("agent_id=Diagnoser&level=WARNING", &["axb"]);
    check("q=100", &["100 percent", "100% done"]);
    // `%` and `_` are literal characters, not LIKE wildcards.
    check("q=%25", &["100% done"]);
    check("q=100%25", &["100% done"]);
    check("q=_", &["a_b"]);
    check("q=a_b", &["a_b"]);
    check("q=%25%25", &[]);
    check("q=Disk%20FULL", &["Disk FULL"]);
    check("agent_id=Nobody", &[]);
    let empty = s.get("/api/messages?agent_id=Nobody", &admin);
    assert_eq!(empty.body.trim(), "[]");
}

#[test]
fn logs_offset_and_limit_are_validated_defaulted_and_capped() {
    let s = Server::start_with(&["--sync", "normal"], &[]);
    let admin = s.admin_token();
    let empty = s.get("/api/messages", &admin);
    assert_eq!(empty.status, 200);
    assert_eq!(empty.body.trim(), "[]");

    for i in 0..205 {
        post_log(&s, &admin, "bulk", "INFO", &format!("row {i}"));
    }
    let count = |query: &str| {
        let r = s.get(&format!("/api/messages?{query}"), &admin);
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        list(&r.json()).len()
    };
    assert_eq!(count(""), 50, "default limit 50");
    assert_eq!(count("limit=1000"), 200, "limit capped at 200");
    assert_eq!(count("limit=200"), 200);
    assert_eq!(count("limit=7"), 7);
    assert_eq!(count("offset=200"), 5);
    assert_eq!(count("offset=205"), 0);
    assert_eq!(count("offset=100000"), 0);
    assert_eq!(count(&format!("offset={}", i64::MAX)), 0);

    let page = s.get("/api/messages?offset=3&limit=2", &admin).json();
    assert_eq!(contents(&page), vec!["row 201", "row 200"]);
    let past = s.get("/api/messages?offset=999", &admin);
    assert_eq!(past.body.trim(), "[]");

    for (query, err) in [
        ("offset=-1", "invalid offset"),
        ("offset=abc", "invalid offset"),
        ("offset=1.5", "invalid offset"),
        ("limit=0", "invalid limit"),
        ("limit=-3", "invalid limit"),
        ("limit=many", "invalid limit"),
    ] {
        let r = s.get(&format!("/api/messages?{query}"), &admin);
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.error(), err, "{query}");
    }
}

#[test]
fn logs_page_back_by_id_filter_several_levels_and_a_time_range() {
    let s = Server::start();
    let admin = s.admin_token();
    let mut stored = Vec::new();
    for (i, level) in ["INFO", "ERROR", "CRITICAL", "DEBUG", "ERROR"]
        .iter()
        .enumerate()
    {
        stored.push(post_log(&s, &admin, "a", level, &format!("line {i}")));
    }
    let id = |i: usize| stored[i]["id"].as_i64().unwrap();
    let ts = |i: usize| stored[i]["timestamp"].as_str().unwrap().to_string();
    // before_id pages back from a page's last row.
    let page = s
        .get(&format!("/api/messages?before_id={}", id(3)), &admin)
        .json();
    assert_eq!(ids(&page), vec![id(2), id(1), id(0)]);
    // Several levels at once (case-insensitive), so ERROR does not hide CRITICAL.
    let page = s.get("/api/messages?level=error,Critical", &admin).json();
    assert_eq!(ids(&page), vec![id(4), id(2), id(1)]);
    // A time range: since is inclusive, until exclusive; any RFC 3339 offset is understood.
    let page = s
        .get(
            &format!("/api/messages?since={}&until={}", ts(1), ts(4)),
            &admin,
        )
        .json();
    let expect: Vec<i64> = (1..4).rev().filter(|&i| ts(i) < ts(4)).map(id).collect();
    assert_eq!(ids(&page), expect);
    let page = s
        .get("/api/messages?until=2000-01-01T01:00:00%2B01:00", &admin)
        .json();
    assert_eq!(list(&page).len(), 0);
    for bad in [
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "before_id=0",
    ] {
        let r = s.get(&format!("/api/messages?{bad}"), &admin);
        let name = bad.split('=').next().unwrap();
        assert_eq!(
            (r.status, r.error()),
            (400, format!("invalid {name}")),
            "{bad}"
        );
    }
}

#[test]
fn chat_history_returns_the_newest_rows_oldest_first_and_pages_back() {
    let s = Server::start();
    let admin = s.admin_token();
    let (bot_id, bot) = s.register_agent(&admin, "bot");
    s.register_agent(&admin, "other");
    let mut mine = Vec::new();
    for i in 0..6 {
        let (from, to) = if i % 2 == 0 {
            ("admin", "bot")
        } else {
            ("bot", "admin")
        };
        mine.push(mock_chat(&s, &admin, from, to, json!(format!("m{i}"))));
        // Noise in other conversations.
        mock_chat(&s, &admin, "admin", "other", json!("not yours"));
        mock_chat(&s, &admin, "bot", "Butler", json!("not yours either"));
    }
    let structured = mock_chat(
        &s,
        &admin,
        "bot",
        "admin",
        json!({"text": "hi", "n": [1, 2]}),
    );
    mine.push(structured);

    let r = s.get(&format!("/api/chat/history/{bot_id}"), &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    let h = r.json();
    assert_eq!(ids(&h), mine, "both directions, oldest first");
    let first = &h[0];
    assert_eq!(first["sender_id"], 1);
    assert_eq!(first["receiver_id"], bot_id);
    assert_eq!(first["type"], "CHAT");
    assert_eq!(first["payload"], "m0");
    assert!(
        first.get("local_id").is_some() && first.get("stream_id").is_some(),
        "{first}"
    );
    assert!(
        is_timestamp(first["timestamp"].as_str().unwrap()),
        "{first}"
    );
    assert_eq!(h[1]["sender_id"], bot_id);
    assert_eq!(h[1]["receiver_id"], 1);
    assert_eq!(
        h[6]["payload"],
        json!({"text": "hi", "n": [1, 2]}),
        "the JSON value as sent"
    );

    // The agent sees the same conversation from its side.
    let theirs = s.get("/api/chat/history/1", &bot).json();
    assert_eq!(ids(&theirs), mine);

    // The newest `limit`, oldest first.
    let last2 = s
        .get(&format!("/api/chat/history/{bot_id}?limit=2"), &admin)
        .json();
    assert_eq!(ids(&last2), mine[5..].to_vec());
    // Paging back from the oldest row seen.
    let before = mine[5];
    let older = s
        .get(
            &format!("/api/chat/history/{bot_id}?limit=2&before_id={before}"),
            &admin,
        )
        .json();
    assert_eq!(ids(&older), mine[3..5].to_vec());
    let older = s
        .get(
            &format!("/api/chat/history/{bot_id}?before_id={}", mine[3]),
            &admin,
        )
        .json();
    assert_eq!(ids(&older), mine[..3].to_vec());
    let none = s.get(
        &format!("/api/chat/history/{bot_id}?before_id={}", mine[0]),
        &admin,
    );
    assert_eq!(none.status, 200);
    assert_eq!(none.body.trim(), "[]");
    // A peer with no conversation: [].
    let none = s.get("/api/chat/history/999", &admin);
    assert_eq!((none.status, none.body.trim()), (200, "[]"));
}

#[test]
fn chat_history_keeps_local_id_and_type() {
    let s = Server::start();
    let admin = s.admin_token();
    s.register_agent(&admin, "bot");
    let r = s.post(
        "/api/dev/mock/chat",
        &admin,
        json!({"sender_username": "Butler", "receiver_username": "admin", "type": "AUTH_REQUEST",
               "content": {"action_id": "a1"}, "local_id": "l-42"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let h = s.get("/api/chat/history/2", &admin).json();
    assert_eq!(list(&h).len(), 1, "{h}");
    assert_eq!(h[0]["type"], "AUTH_REQUEST");
    assert_eq!(h[0]["local_id"], "l-42");
    assert_eq!(h[0]["payload"], json!({"action_id": "a1"}));
}

#[test]
fn chat_history_parameter_errors() {
    let s = Server::start();
    let admin = s.admin_token();
    for (path, err) in [
        ("/api/chat/history/abc", "invalid peer_id"),
        ("/api/chat/history/1.5", "invalid peer_id"),
        ("/api/chat/history/3?limit=0", "invalid limit"),
        ("/api/chat/history/3?limit=-1", "invalid limit"),
        ("/api/chat/history/3?limit=lots", "invalid limit"),
        ("/api/chat/history/3?before_id=0", "invalid before_id"),
        ("/api/chat/history/3?before_id=x", "invalid before_id"),
    ] {
        let r = s.get(path, &admin);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.error(), err, "{path}");
    }
    let r = s.request("GET", "/api/chat/history/3", None, None);
    assert_eq!(
        (r.status, r.error()),
        (401, "authorization header required".into())
    );
}

#[test]
fn chat_history_limit_defaults_to_100_and_is_capped_at_500() {
    let s = Server::start_with(&["--sync", "normal"], &[]);
    let admin = s.admin_token();
    let (bot_id, _) = s.register_agent(&admin, "bot");
    let mut all = Vec::new();
    for i in 0..505 {
        all.push(mock_chat(&s, &admin, "admin", "bot", json!(i)));
    }
    let get = |q: &str| {
        s.get(&format!("/api/chat/history/{bot_id}{q}"), &admin)
            .json()
    };
    assert_eq!(ids(&get("")), all[405..].to_vec(), "default: newest 100");
    assert_eq!(
        ids(&get("?limit=100000")),
        all[5..].to_vec(),
        "clamped to 500"
    );
    assert_eq!(ids(&get("?limit=500")), all[5..].to_vec());
}

#[test]
fn butler_agent_conversation_is_admin_only() {
    let s = Server::start();
    let admin = s.admin_token();
    let (bot_id, bot) = s.register_agent(&admin, "bot");
    let (other_id, _) = s.register_agent(&admin, "other");
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    let a = mock_chat(&s, &admin, "Butler", "bot", json!("do the scan"));
    mock_chat(&s, &admin, "Butler", "other", json!("not this one"));
    mock_chat(&s, &admin, "admin", "bot", json!("nor this"));
    let b = mock_chat(&s, &admin, "bot", "Butler", json!("done"));

    let r = s.get(&format!("/api/chat/butler-agent/{bot_id}"), &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    let h = r.json();
    assert_eq!(ids(&h), vec![a, b]);
    assert_eq!(h[0]["sender_id"], 2);
    assert_eq!(h[1]["payload"], "done");
    let other = s
        .get(&format!("/api/chat/butler-agent/{other_id}"), &admin)
        .json();
    assert_eq!(list(&other).len(), 1);

    let r = s.get(&format!("/api/chat/butler-agent/{bot_id}"), &member);
    assert_eq!((r.status, r.error()), (403, "admin access required".into()));
    let r = s.get(&format!("/api/chat/butler-agent/{bot_id}"), &bot);
    assert_eq!((r.status, r.error()), (403, "forbidden".into()));
    let r = s.get("/api/chat/butler-agent/abc", &admin);
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn a_posted_log_becomes_the_agents_last_report() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, token) = s.register_agent(&admin, "bot");
    post_log(&s, &token, "bot", "INFO", "all systems nominal");
    let report = || {
        s.get("/api/users/agents/status", &admin).json()[0]["last_report"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    s.wait_for("last_report", Duration::from_secs(5), || {
        report() == "all systems nominal"
    });
    let listed = s.get("/api/users/agents", &admin).json();
    let bot = list(&listed)
        .iter()
        .find(|u| u["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(bot["last_report"], "all systems nominal");
}

#[test]
fn an_auth_response_reaches_the_butler_and_is_stored() {
    let s = Server::start();
    let admin = s.admin_token();
    let (member_id, member) = s.create_human(&admin, "alice", "MEMBER");
    let butler = s.butler_token(&admin);
    let mut butler_ws = s.ws(&butler);
    let r = s.post(
        "/api/chat/auth/response",
        &member,
        json!({"action_id": "act-7", "approved": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"status": "processed"}));

    let frame = butler_ws.recv_type("AUTH_RESPONSE");
    assert_eq!(frame["sender_id"], member_id);
    assert_eq!(frame["payload"]["action_id"], "act-7");
    assert_eq!(frame["payload"]["approved"], true);

    let h = s.get("/api/chat/history/2", &member).json();
    assert_eq!(list(&h).len(), 1, "{h}");
    assert_eq!(h[0]["type"], "AUTH_RESPONSE");
    assert_eq!(h[0]["id"], frame["id"]);
    assert_eq!(
        h[0]["payload"],
        json!({"action_id": "act-7", "approved": true})
    );

    let r = s.post(
        "/api/chat/auth/response",
        &member,
        json!({"action_id": "act-8"}),
    );
    assert_eq!((r.status, r.error()), (400, "invalid request body".into()));
}
