//! `/api/dev/mock/*` outside production, their refusal in production, and production clearing
//! the raw token copies (SPEC sections 2 and 3).

mod common;
use common::*;

use std::time::Duration;

use serde_json::{json, Value};

fn dev_token(s: &Server, admin: &str, name: &str) -> HttpResponse {
    s.get(&format!("/api/dev/mock/agent-token/{name}"), admin)
}

fn raw_token_of(s: &Server, admin: &str, name: &str) -> String {
    let r = dev_token(s, admin, name);
    assert_eq!(r.status, 200, "{name}: {}", r.body);
    r.json()["api_token"]
        .as_str()
        .expect("api_token is always a string")
        .to_string()
}

fn me_status(s: &Server, token: &str) -> u16 {
    s.get("/api/users/me", token).status
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn agent_token_returns_the_raw_token_outside_production() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "bot");
    let r = dev_token(&s, &admin, "bot");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"username": "bot", "role": "AGENT", "api_token": token})
    );

    // The Butler's token is there too, and it works.
    let r = dev_token(&s, &admin, "Butler").json();
    assert_eq!(r["role"], "BUTLER");
    let butler = r["api_token"].as_str().unwrap();
    assert!(butler.starts_with("ec_") && butler.len() == 67, "{butler}");
    assert_eq!(me_status(&s, butler), 200);

    // A supplied token, and a rotated one.
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "Observer", "api_token": "mock-observer-token"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(raw_token_of(&s, &admin, "Observer"), "mock-observer-token");
    let r = s.request(
        "PATCH",
        "/api/users/agents/3/token",
        Some(&admin),
        Some("{}"),
    );
    let rotated = r.json()["api_token"].as_str().unwrap().to_string();
    assert_eq!(raw_token_of(&s, &admin, "bot"), rotated);

    // Humans have no token: "".
    let r = dev_token(&s, &admin, "admin");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"username": "admin", "role": "ADMIN", "api_token": ""})
    );

    let r = dev_token(&s, &admin, "nobody");
    assert_eq!((r.status, r.error()), (404, "user not found".into()));
    // Names are case-sensitive.
    let r = dev_token(&s, &admin, "butler");
    assert_eq!((r.status, r.error()), (404, "user not found".into()));
}

#[test]
fn reset_recreates_only_admin_and_butler() {
    let s = Server::start();
    let admin = s.admin_token();
    let old_butler = s.butler_token(&admin);
    let (_, bot) = s.register_agent(&admin, "bot");
    s.create_human(&admin, "alice", "MEMBER");
    s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "bot", "level": "INFO", "content": "before reset"}),
    );
    let r = s.post(
        "/api/dev/mock/chat",
        &admin,
        json!({"sender_username": "admin", "receiver_username": "bot", "content": "hi"}),
    );
    assert_eq!(r.status, 201);
    // A conversation thread refers to both its users: it goes too (it used to make the
    // wipe fail on SQLite's foreign keys).
    let r = s.post(
        "/api/chat/threads",
        &admin,
        json!({"peer_id": 2, "channel_kind": "butler_direct"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let mut live = s.ws(&bot);
    // The agent keeps reading, as a real client does, so it answers the server's close.
    let closed = std::thread::spawn(move || live.recv_close());

    let r = s.request("POST", "/api/dev/mock/reset", Some(&admin), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"status": "reset"}));

    // Live sessions are closed.
    let code = closed.join().unwrap();
    assert!(
        code.is_some(),
        "the agent's session was closed with a close frame"
    );

    let admin = s.admin_token();
    let me = s.get("/api/users/me", &admin).json();
    assert_eq!(
        (me["id"].clone(), me["username"].clone()),
        (json!(1), json!("admin"))
    );
    let agents = s.get("/api/users/agents", &admin);
    assert_eq!(ids(&agents.json()), vec![2]);
    assert_eq!(agents.json()[0]["username"], "Butler");
    assert_eq!(agents.header("X-Total-Count"), Some("1"));

    assert_eq!(
        s.login("alice", "pw-123456-long").status,
        401,
        "members are gone"
    );
    assert_eq!(me_status(&s, &bot), 401, "agent tokens are gone");
    assert_eq!(
        me_status(&s, &old_butler),
        401,
        "the Butler has a new token"
    );
    let new_butler = s.butler_token(&admin);
    assert_ne!(new_butler, old_butler);
    assert_eq!(me_status(&s, &new_butler), 200);

    assert_eq!(s.get("/api/messages", &admin).body.trim(), "[]");
    assert_eq!(s.get("/api/chat/history/3", &admin).body.trim(), "[]");
    assert_eq!(s.get("/api/chat/threads", &admin).body.trim(), "[]");
    // Thread ids start again too, and the hub does not remember the old ones: thread 1 was
    // admin's with bot, now it is admin's with the Butler.
    let t = s.post(
        "/api/chat/threads",
        &admin,
        json!({"peer_id": 2, "channel_kind": "butler_direct"}),
    );
    assert_eq!(
        (t.status, t.json()["id"].clone()),
        (201, json!(1)),
        "{}",
        t.body
    );
    let mut human = s.ws(&admin);
    human.send_json(
        json!({"type": "CHAT", "target_id": 2, "payload": "after the reset",
                           "conversation_id": 1, "local_id": "after-1"}),
    );
    let echo = human.recv_until(|v| v["local_id"] == "after-1", "the echo");
    assert_eq!(
        (echo["type"].clone(), echo["conversation_id"].clone()),
        (json!("CHAT"), json!(1)),
        "{echo}"
    );
    let (id, _) = s.register_agent(&admin, "bot");
    assert_eq!(id, 3, "ids start again after admin (1) and Butler (2)");
    let r = dev_token(&s, &admin, "alice");
    assert_eq!(r.status, 404);
}

#[test]
fn mock_chat_stores_without_delivering() {
    let s = Server::start();
    let admin = s.admin_token();
    let (bot_id, bot) = s.register_agent(&admin, "bot");
    let mut live = s.ws(&bot);
    let r = s.post(
        "/api/dev/mock/chat",
        &admin,
        json!({"sender_username": "admin", "receiver_username": "bot", "content": "stored only",
               "local_id": "seed-1"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1, "only {{id}}: {v}");
    let id = v["id"].as_i64().expect("id is an integer");
    assert!(id > 0);
    live.assert_no("CHAT", Duration::from_millis(300));

    let h = s.get(&format!("/api/chat/history/{bot_id}"), &admin).json();
    assert_eq!(ids(&h), vec![id]);
    assert_eq!(h[0]["payload"], "stored only");
    assert_eq!(h[0]["local_id"], "seed-1");
    assert_eq!(h[0]["sender_id"], 1);

    for (body, err) in [
        (
            json!({"sender_username": "ghost", "receiver_username": "bot", "content": "x"}),
            "sender user not found",
        ),
        (
            json!({"sender_username": "admin", "receiver_username": "ghost", "content": "x"}),
            "receiver user not found",
        ),
    ] {
        let r = s.post("/api/dev/mock/chat", &admin, body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.error(), err, "{body}");
    }
    let h = s.get(&format!("/api/chat/history/{bot_id}"), &admin).json();
    assert_eq!(ids(&h), vec![id], "failed seeds stored nothing");
}

#[test]
fn mock_chat_is_filed_into_a_thread_like_a_sent_frame() {
    let s = Server::start();
    let admin = s.admin_token();
    let (bot_id, _bot) = s.register_agent(&admin, "bot");
    let seed = |from: &str, to: &str, content: &str| {
        let r = s.post(
            "/api/dev/mock/chat",
            &admin,
            json!({"sender_username": from, "receiver_username": to, "content": content}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["id"].as_i64().unwrap()
    };
    // A human's message naming no thread goes to the pair's default thread, made on demand;
    // the agent's answer follows the human into it.
    let asked = seed("admin", "bot", "seeded question");
    let answered = seed("bot", "admin", "seeded answer");
    let threads = s
        .get(&format!("/api/chat/threads?peer_id={bot_id}"), &admin)
        .json();
    assert_eq!(threads.as_array().unwrap().len(), 1, "{threads}");
    assert_eq!(threads[0]["is_default"], true);
    assert!(threads[0]["last_message_at"].is_string(), "{threads}");
    let id = threads[0]["id"].as_i64().unwrap();
    let rows = s
        .get(&format!("/api/chat/threads/{id}/messages"), &admin)
        .json();
    assert_eq!(ids(&rows), vec![asked, answered]);
    assert!(rows
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["conversation_id"] == id));
}

#[test]
fn dev_endpoints_are_403_in_production() {
    let s = Server::start_with(
        &["--env", "production", "--admin-password", "x-secret-long-1"],
        &[],
    );
    assert_eq!(
        s.login("admin", "admin123").status,
        401,
        "no dev password in production"
    );
    let r = s.login("admin", "x-secret-long-1");
    assert_eq!(r.status, 200, "{}", r.body);
    let admin = r.json()["token"].as_str().unwrap().to_string();
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    s.register_agent(&admin, "bot");

    let cases = [
        ("GET", "/api/dev/mock/agent-token/bot", None),
        ("GET", "/api/dev/mock/agent-token/Butler", None),
        ("GET", "/api/dev/mock/agent-token/nobody", None),
        ("POST", "/api/dev/mock/reset", None),
        (
            "POST",
            "/api/dev/mock/chat",
            Some(
                json!({"sender_username": "admin", "receiver_username": "bot", "content": "x"})
                    .to_string(),
            ),
        ),
    ];
    for (method, path, body) in &cases {
        let r = s.request(method, path, Some(&admin), body.as_deref());
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(
            r.error(),
            "mock endpoints are disabled in production",
            "{method} {path}"
        );
        // Authentication and role are still checked first.
        let r = s.request(method, path, Some(&member), body.as_deref());
        assert_eq!((r.status, r.error()), (403, "admin access required".into()));
        let r = s.request(method, path, None, body.as_deref());
        assert_eq!(r.status, 401);
    }
    // The reset did not happen.
    assert_eq!(s.login("alice", "pw-123456-long").status, 200);
    let agents = s.get("/api/users/agents", &admin).json();
    assert_eq!(agents.as_array().unwrap().len(), 2);
}

const PROD_PASSWORD: &str = "a-real-admin-password";

#[test]
fn a_production_start_clears_the_stored_raw_tokens() {
    let s = Server::start();
    let admin = s.admin_token();
    let (bot_id, bot) = s.register_agent(&admin, "bot");
    let butler = s.butler_token(&admin);
    assert_eq!(raw_token_of(&s, &admin, "bot"), bot);

    // A production start refuses the development password: set a real one first.
    s.change_password(&admin, "admin123", PROD_PASSWORD);
    // Production: the tokens keep working, but their raw copies are dropped.
    let s = s.restart(&["--env", "production"], &[]);
    let admin = s.token_for("admin", PROD_PASSWORD); // bootstrap does not run again
    assert_eq!(me_status(&s, &bot), 200);
    assert_eq!(me_status(&s, &butler), 200);
    // Agents registered or rotated in production never get a raw copy either.
    let (_, prod_bot) = s.register_agent(&admin, "prod-bot");
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{bot_id}/token"),
        Some(&admin),
        Some(&json!({"api_token": "rotated-in-production"}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let s = s.restart(&[], &[]);
    let admin = s.token_for("admin", PROD_PASSWORD);
    for name in ["bot", "Butler", "prod-bot"] {
        let r = dev_token(&s, &admin, name);
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(r.json()["api_token"], "", "{name}");
    }
    assert_eq!(me_status(&s, "rotated-in-production"), 200);
    assert_eq!(me_status(&s, &prod_bot), 200);
    assert_eq!(me_status(&s, &butler), 200);
    assert_eq!(me_status(&s, &bot), 401, "rotated away in production");

    // A development rotation keeps a raw copy again.
    let r = s.request(
        "PATCH",
        "/api/users/agents/2/token",
        Some(&admin),
        Some("{}"),
    );
    let fresh = r.json()["api_token"].as_str().unwrap().to_string();
    assert_eq!(raw_token_of(&s, &admin, "Butler"), fresh);
}

#[test]
fn an_upstream_app_env_of_prod_also_disables_the_mock_endpoints() {
    let s = Server::start_with(
        &[],
        &[
            ("APP_ENV", "prod"),
            ("ECHOCENTER_ADMIN_PASSWORD", "x-secret-long-1"),
        ],
    );
    let r = s.login("admin", "x-secret-long-1");
    assert_eq!(r.status, 200, "{}", r.body);
    let admin = r.json()["token"].as_str().unwrap().to_string();
    let r = dev_token(&s, &admin, "Butler");
    assert_eq!(
        (r.status, r.error()),
        (403, "mock endpoints are disabled in production".into())
    );

    // Any other APP_ENV means development.
    let s = Server::start_with(&[], &[("APP_ENV", "staging")]);
    let admin = s.admin_token();
    assert_eq!(dev_token(&s, &admin, "Butler").status, 200);
}
