//! Agent registration, listing, token hints, rotation, deletion and bootstrap (SPEC sections 1,
//! 2 and 3).

mod common;
use common::*;

use std::time::Duration;

use serde_json::{json, Value};

fn is_generated_token(t: &str) -> bool {
    t.len() == 67
        && t.starts_with("ec_")
        && t[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hint_of(t: &str) -> String {
    format!("{}...{}", &t[..4], &t[t.len() - 4..])
}

fn usernames(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect()
}

fn total(r: &HttpResponse) -> usize {
    r.header("X-Total-Count")
        .unwrap_or_else(|| panic!("no X-Total-Count: {:?}", r.headers))
        .parse()
        .unwrap()
}

fn me_status(s: &Server, token: &str) -> (u16, String) {
    let r = s.get("/api/users/me", token);
    let err = if r.status == 200 {
        String::new()
    } else {
        r.error()
    };
    (r.status, err)
}

fn agent_in_list(s: &Server, admin: &str, id: i64) -> Value {
    s.get("/api/users/agents", admin)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("agent {id} not listed"))
}

#[test]
fn registration_returns_a_generated_token_once_and_lists_only_its_hint() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "Observer", "description": "watches things"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let token = v["api_token"]
        .as_str()
        .expect("api_token in the 201 response");
    assert!(is_generated_token(token), "token format: {token}");
    assert_eq!(v["username"], "Observer");
    assert_eq!(v["role"], "AGENT");
    assert_eq!(v["actor_type"], "SYSTEM");
    assert_eq!(v["description"], "watches things");
    assert_eq!(v["token_hint"], hint_of(token));
    assert!(v["token_updated_at"].is_string(), "{v}");
    assert_eq!(v["status"], "OFFLINE");
    assert_eq!(v["online"], false);
    assert!(v["last_seen_at"].is_null(), "never connected: {v}");
    let id = v["id"].as_i64().unwrap();

    // The token authenticates.
    let me = s.get("/api/users/me", token);
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["id"], id);

    // Nothing else ever shows it again, to admins or members.
    for viewer in [&admin, &member] {
        for path in [
            "/api/users/agents",
            "/api/users/agents?page=1&limit=10",
            "/api/users/agents/status",
            "/api/users/butler",
        ] {
            let r = s.get(path, viewer);
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            assert!(!r.body.contains("api_token"), "{path}: {}", r.body);
            assert!(!r.body.contains(token), "{path}: {}", r.body);
        }
    }
    let listed = agent_in_list(&s, &member, id);
    assert_eq!(listed["token_hint"], hint_of(token));
    assert!(listed.get("api_token").is_none());
    let me = s.get("/api/users/me", token);
    assert!(!me.body.contains("api_token") && !me.body.contains(token));
}

#[test]
fn a_supplied_token_is_kept_and_hinted_first4_last4() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "Observer", "api_token": "mock-observer-token"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(v["api_token"], "mock-observer-token");
    assert_eq!(v["token_hint"], "mock...oken");
    let id = v["id"].as_i64().unwrap();
    assert_eq!(agent_in_list(&s, &admin, id)["token_hint"], "mock...oken");
    let me = s.get("/api/users/me", "mock-observer-token");
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["username"], "Observer");

    // Boundaries: 16 and 256 characters from the allowed set are accepted.
    let t16 = "abcdefgh.-_~1234";
    let t256 = "Z".repeat(255) + "9";
    for (name, t) in [("edge16", t16.to_string()), ("edge256", t256)] {
        let r = s.post(
            "/api/users/agents",
            &admin,
            json!({"username": name, "api_token": t}),
        );
        assert_eq!(r.status, 201, "{name}: {}", r.body);
        assert_eq!(r.json()["token_hint"], hint_of(&t));
        assert_eq!(s.get("/api/users/me", &t).status, 200, "{name}");
    }
}

#[test]
fn duplicates_are_409() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "bot", "api_token": "shared-token-123456"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    for name in ["bot", "admin", "Butler"] {
        let r = s.post("/api/users/agents", &admin, json!({"username": name}));
        assert_eq!(r.status, 409, "{name}: {}", r.body);
        assert_eq!(r.error(), "username already exists", "{name}");
    }
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "bot2", "api_token": "shared-token-123456"}),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.error(), "api_token already in use");
    // Neither failed attempt created anything.
    let list = s.get("/api/users/agents", &admin).json();
    assert_eq!(usernames(&list), vec!["Butler", "bot"]);
    // Usernames are case-sensitive.
    let r = s.post("/api/users/agents", &admin, json!({"username": "Bot"}));
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn registration_validation_errors() {
    let s = Server::start();
    let admin = s.admin_token();
    for body in [
        json!({}),
        json!({"username": ""}),
        json!({"username": null}),
        json!({"api_token": "valid-token-1234567"}),
    ] {
        let r = s.post("/api/users/agents", &admin, body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.error(), "username is required", "{body}");
    }
    for name in [
        "bad name".to_string(),
        "slash/name".to_string(),
        "émile".to_string(),
        "semi;colon".to_string(),
        "x".repeat(65),
    ] {
        let r = s.post("/api/users/agents", &admin, json!({"username": name}));
        assert_eq!(r.status, 400, "{name:?}: {}", r.body);
        assert_eq!(r.error(), "invalid username", "{name:?}");
    }
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "x".repeat(64)}),
    );
    assert_eq!(r.status, 201, "64 characters is allowed: {}", r.body);
    for token in [
        "short".to_string(),
        "fifteen-chars-x".to_string(),
        "has space in the token".to_string(),
        "has/slash/in/the/token".to_string(),
        "plus+is+not+allowed+here".to_string(),
        "a".repeat(257),
    ] {
        let r = s.post(
            "/api/users/agents",
            &admin,
            json!({"username": "tokenless", "api_token": token}),
        );
        assert_eq!(r.status, 400, "{token:?}: {}", r.body);
        assert_eq!(r.error(), "invalid api_token", "{token:?}");
    }
    let list = s.get("/api/users/agents", &admin).json();
    assert!(!usernames(&list).contains(&"tokenless".to_string()));
}

#[test]
fn list_filters_pages_and_counts() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    for name in [
        "Observer",
        "Diagnoser",
        "Guardian",
        "Storage-Custodian",
        "obscura",
    ] {
        s.register_agent(&admin, name);
    }
    let all = s.get("/api/users/agents", &admin);
    assert_eq!(all.status, 200);
    assert_eq!(total(&all), 6);
    let all = all.json();
    assert_eq!(
        usernames(&all),
        vec![
            "Butler",
            "Observer",
            "Diagnoser",
            "Guardian",
            "Storage-Custodian",
            "obscura"
        ]
    );
    let all_ids = ids(&all);
    assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "ordered by id");
    // Humans are never listed.
    assert!(!usernames(&all).contains(&"alice".to_string()));

    let check = |query: &str, want: &[&str], want_total: usize| {
        let r = s.get(&format!("/api/users/agents?{query}"), &member);
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        assert_eq!(usernames(&r.json()), want, "{query}");
        assert_eq!(total(&r), want_total, "X-Total-Count for {query}");
    };
    // q: case-insensitive substring of username or role.
    check("q=OBS", &["Observer", "obscura"], 2);
    check("q=butl", &["Butler"], 1);
    check(
        "q=agent",
        &[
            "Observer",
            "Diagnoser",
            "Guardian",
            "Storage-Custodian",
            "obscura",
        ],
        5,
    );
    check("q=nothing-matches", &[], 0);
    // exclude_role: comma list, case-insensitive.
    check(
        "exclude_role=butler",
        &[
            "Observer",
            "Diagnoser",
            "Guardian",
            "Storage-Custodian",
            "obscura",
        ],
        5,
    );
    check("exclude_role=AGENT", &["Butler"], 1);
    check("exclude_role=Agent,BUTLER", &[], 0);
    // Paging: the total is counted before paging.
    check("limit=2", &["Butler", "Observer"], 6);
    check("page=2&limit=2", &["Diagnoser", "Guardian"], 6);
    check("page=3&limit=2", &["Storage-Custodian", "obscura"], 6);
    check("page=4&limit=2", &[], 6);
    check(
        "page=1",
        &[
            "Butler",
            "Observer",
            "Diagnoser",
            "Guardian",
            "Storage-Custodian",
            "obscura",
        ],
        6,
    );
    check("page=2", &[], 6);
    check(
        "q=agent&page=2&limit=2",
        &["Guardian", "Storage-Custodian"],
        5,
    );
    check("exclude_role=butler&limit=1", &["Observer"], 5);

    let past_end = s.get("/api/users/agents?page=9&limit=50", &admin);
    assert_eq!(past_end.body.trim(), "[]");
    let far = s.get(
        &format!("/api/users/agents?page={}&limit=200", i64::MAX),
        &admin,
    );
    assert_eq!((far.status, far.body.trim()), (200, "[]"), "no overflow");

    for (query, err) in [
        ("page=0", "invalid page"),
        ("page=-1", "invalid page"),
        ("page=abc", "invalid page"),
        ("page=1.5", "invalid page"),
        ("limit=0", "invalid limit"),
        ("limit=-5", "invalid limit"),
        ("limit=ten", "invalid limit"),
        ("page=1&limit=x", "invalid limit"),
    ] {
        let r = s.get(&format!("/api/users/agents?{query}"), &admin);
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.error(), err, "{query}");
    }
}

#[test]
fn list_limit_is_capped_at_200() {
    let s = Server::start_with(&["--sync", "normal"], &[]);
    let admin = s.admin_token();
    for i in 0..200 {
        s.register_agent(&admin, &format!("a{i:03}"));
    }
    let r = s.get("/api/users/agents?limit=1000", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(total(&r), 201);
    let page = r.json();
    assert_eq!(page.as_array().unwrap().len(), 200, "limit clamped to 200");
    assert_eq!(page[0]["username"], "Butler");
    let r = s.get("/api/users/agents?limit=1000&page=2", &admin);
    assert_eq!(usernames(&r.json()), vec!["a199"], "page 2 of 200 per page");
    // Neither page nor limit: everything.
    let r = s.get("/api/users/agents", &admin);
    assert_eq!(r.json().as_array().unwrap().len(), 201);
}

#[test]
fn agent_status_lists_agents_only_with_presence() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    let empty = s.get("/api/users/agents/status", &member);
    assert_eq!(
        (empty.status, empty.body.trim()),
        (200, "[]"),
        "the Butler is not listed"
    );
    let (id, token) = s.register_agent(&admin, "bot");
    let r = s.get("/api/users/agents/status", &member);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "AGENT users only, not the Butler: {v}");
    let row = rows[0].as_object().unwrap();
    let mut keys: Vec<&str> = row.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec![
            "activity",
            "id",
            "last_report",
            "last_seen_at",
            "online",
            "role",
            "status",
            "username"
        ]
    );
    assert_eq!(row["id"], id);
    assert_eq!(row["role"], "AGENT");
    assert_eq!(row["status"], "OFFLINE");
    assert_eq!(row["online"], false);
    assert!(row["last_seen_at"].is_null());

    let status_of = || s.get("/api/users/agents/status", &admin).json()[0].clone();
    let ws = s.ws(&token);
    s.wait_for("bot online", Duration::from_secs(10), || {
        status_of()["online"] == true
    });
    let online = status_of();
    assert_eq!(online["status"], "ONLINE");
    assert!(online["last_seen_at"].is_string(), "{online}");
    ws.close();
    s.wait_for("bot offline", Duration::from_secs(10), || {
        status_of()["online"] == false
    });
    let offline = status_of();
    assert_eq!(offline["status"], "OFFLINE");
    assert!(
        offline["last_seen_at"].is_string(),
        "kept after disconnect: {offline}"
    );
}

#[test]
fn butler_endpoint_shows_the_butler_without_its_token() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.get("/api/users/butler", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    let b = r.json();
    assert_eq!(b["id"], 2);
    assert_eq!(b["username"], "Butler");
    assert_eq!(b["role"], "BUTLER");
    assert_eq!(b["actor_type"], "SYSTEM");
    assert_eq!(b["online"], false);
    assert!(b.get("api_token").is_none());
    let raw = s.butler_token(&admin);
    assert_eq!(b["token_hint"], hint_of(&raw));
    assert!(!r.body.contains(&raw));
}

#[test]
fn test_connection_reports_whether_a_token_is_registered() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, token) = s.register_agent(&admin, "bot");
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": token}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ok"], true);
    assert!(v["message"].is_string());
    assert_eq!(v["agent_id"], id);
    assert_eq!(v["agent_name"], "bot");

    let butler = s.butler_token(&admin);
    let v = s
        .post(
            "/api/users/agents/test-connection",
            &admin,
            json!({"api_token": butler}),
        )
        .json();
    assert_eq!(
        (v["ok"].clone(), v["agent_id"].clone()),
        (json!(true), json!(2))
    );

    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": "not-a-registered-token"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ok"], false);
    assert!(v["message"].is_string());
    assert!(v.get("agent_id").is_none_or(Value::is_null), "{v}");

    // A human's JWT is not an agent token.
    let v = s
        .post(
            "/api/users/agents/test-connection",
            &admin,
            json!({"api_token": admin}),
        )
        .json();
    assert_eq!(v["ok"], false, "{v}");
}

#[test]
fn rotation_replaces_the_token() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, first) = s.register_agent(&admin, "bot");
    let path = format!("/api/users/agents/{id}/token");

    // No body at all.
    let r = s.request("PATCH", &path, Some(&admin), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ok"], true);
    assert!(v["message"].is_string());
    assert_eq!(v["agent_id"], id);
    let second = v["api_token"].as_str().unwrap().to_string();
    assert!(is_generated_token(&second), "{second}");
    assert_ne!(second, first);
    assert_eq!(me_status(&s, &first), (401, "invalid token".into()));
    assert_eq!(me_status(&s, &second).0, 200);

    // An empty body (Content-Length: 0).
    let r = s.request("PATCH", &path, Some(&admin), Some(""));
    assert_eq!(r.status, 200, "{}", r.body);
    let third = r.json()["api_token"].as_str().unwrap().to_string();
    assert!(is_generated_token(&third));
    assert_eq!(me_status(&s, &second), (401, "invalid token".into()));
    assert_eq!(me_status(&s, &third).0, 200);

    // `{}`.
    let r = s.request("PATCH", &path, Some(&admin), Some("{}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let fourth = r.json()["api_token"].as_str().unwrap().to_string();
    assert!(is_generated_token(&fourth));
    assert_eq!(me_status(&s, &third), (401, "invalid token".into()));

    // A supplied token.
    let supplied = "rotated-by-hand-0123456789";
    let r = s.request(
        "PATCH",
        &path,
        Some(&admin),
        Some(&json!({"api_token": supplied}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["api_token"], supplied);
    assert_eq!(me_status(&s, &fourth), (401, "invalid token".into()));
    assert_eq!(me_status(&s, supplied).0, 200);
    let listed = agent_in_list(&s, &admin, id);
    assert_eq!(listed["token_hint"], hint_of(supplied));
    assert!(!s.get("/api/users/agents", &admin).body.contains(supplied));

    // test-connection follows the rotation.
    let ok = |t: &str| {
        s.post(
            "/api/users/agents/test-connection",
            &admin,
            json!({"api_token": t}),
        )
        .json()["ok"]
            .clone()
    };
    assert_eq!(ok(supplied), true);
    assert_eq!(ok(&first), false);
}

#[test]
fn rotation_errors() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, token) = s.register_agent(&admin, "bot");
    s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "other", "api_token": "other-agents-token-1"}),
    );
    let patch = |path: &str, body: &str| s.request("PATCH", path, Some(&admin), Some(body));
    for (path, body, status, err) in [
        ("/api/users/agents/999/token", "{}", 404, "agent not found"),
        (
            "/api/users/agents/1/token",
            "{}",
            400,
            "target user is not an agent",
        ),
        ("/api/users/agents/abc/token", "{}", 400, "invalid agent id"),
        (
            &format!("/api/users/agents/{id}/token") as &str,
            r#"{"api_token":"other-agents-token-1"}"#,
            409,
            "api_token already in use",
        ),
        (
            &format!("/api/users/agents/{id}/token"),
            r#"{"api_token":"bad token!"}"#,
            400,
            "invalid api_token",
        ),
    ] {
        let r = patch(path, body);
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        assert_eq!(r.error(), err, "{path} {body}");
    }
    // None of the failures changed the token.
    assert_eq!(me_status(&s, &token).0, 200);
}

#[test]
fn the_butler_token_can_be_rotated() {
    let s = Server::start();
    let admin = s.admin_token();
    let old = s.butler_token(&admin);
    let r = s.request(
        "PATCH",
        "/api/users/agents/2/token",
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let new = r.json()["api_token"].as_str().unwrap().to_string();
    assert_eq!(me_status(&s, &old), (401, "invalid token".into()));
    let me = s.get("/api/users/me", &new);
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["role"], "BUTLER");
}

#[test]
fn delete_disables_the_agent_but_keeps_the_name_reserved() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, token) = s.register_agent(&admin, "bot");
    let (keep_id, keep) = s.register_agent(&admin, "keeper");
    let r = s.post(
        "/api/dev/mock/chat",
        &admin,
        json!({"sender_username": "admin", "receiver_username": "bot", "content": "hi"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);

    let r = s.request(
        "DELETE",
        &format!("/api/users/agents/{id}"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"ok": true}));

    assert_eq!(me_status(&s, &token), (401, "invalid token".into()));
    let list = s.get("/api/users/agents", &admin);
    assert_eq!(usernames(&list.json()), vec!["Butler", "keeper"]);
    assert_eq!(total(&list), 2);
    let status = s.get("/api/users/agents/status", &admin).json();
    assert_eq!(ids(&status), vec![keep_id]);
    let v = s
        .post(
            "/api/users/agents/test-connection",
            &admin,
            json!({"api_token": token}),
        )
        .json();
    assert_eq!(v["ok"], false);

    let r = s.post("/api/users/agents", &admin, json!({"username": "bot"}));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.error(), "username already exists");

    // History is kept.
    let h = s.get(&format!("/api/chat/history/{id}"), &admin).json();
    assert_eq!(h.as_array().unwrap().len(), 1, "{h}");

    // Deleting again, or rotating a deleted agent: it is gone.
    let r = s.request(
        "DELETE",
        &format!("/api/users/agents/{id}"),
        Some(&admin),
        None,
    );
    assert_eq!((r.status, r.error()), (404, "agent not found".into()));
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{id}/token"),
        Some(&admin),
        Some("{}"),
    );
    assert_eq!((r.status, r.error()), (404, "agent not found".into()));
    assert_eq!(me_status(&s, &keep).0, 200, "other agents unaffected");
}

#[test]
fn delete_errors() {
    let s = Server::start();
    let admin = s.admin_token();
    let (member_id, _) = s.create_human(&admin, "alice", "MEMBER");
    let butler = s.butler_token(&admin);
    for (path, status, err) in [
        (
            "/api/users/agents/2".to_string(),
            400,
            "target user is not an agent",
        ),
        (
            "/api/users/agents/1".to_string(),
            400,
            "target user is not an agent",
        ),
        (
            format!("/api/users/agents/{member_id}"),
            400,
            "target user is not an agent",
        ),
        ("/api/users/agents/999".to_string(), 404, "agent not found"),
        ("/api/users/agents/abc".to_string(), 400, "invalid agent id"),
    ] {
        let r = s.request("DELETE", &path, Some(&admin), None);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert_eq!(r.error(), err, "{path}");
    }
    assert_eq!(me_status(&s, &butler).0, 200, "the Butler survives");
    assert_eq!(s.get("/api/users/butler", &admin).status, 200);
    assert_eq!(s.login("alice", "pw-123456-long").status, 200);
}

#[test]
fn bootstrap_creates_admin_1_and_butler_2_exactly_once() {
    let s = Server::start();
    let admin = s.admin_token();
    let me = s.get("/api/users/me", &admin).json();
    assert_eq!(
        (me["id"].clone(), me["username"].clone()),
        (json!(1), json!("admin"))
    );
    let list = s.get("/api/users/agents", &admin).json();
    assert_eq!(ids(&list), vec![2]);
    assert_eq!(list[0]["username"], "Butler");
    assert_eq!(list[0]["role"], "BUTLER");
    let butler_hint = list[0]["token_hint"].clone();
    let butler = s.butler_token(&admin);
    let (bot_id, bot) = s.register_agent(&admin, "bot");
    assert_eq!(bot_id, 3);

    // A restart on the same database, even with another admin password configured, does not
    // bootstrap again.
    let s = s.restart(&["--admin-password", "another-password"], &[]);
    let r = s.login("admin", "another-password");
    assert_eq!(r.status, 401, "bootstrap ran again: {}", r.body);
    let admin = s.admin_token();
    let me = s.get("/api/users/me", &admin).json();
    assert_eq!(me["id"], 1);
    let list = s.get("/api/users/agents", &admin).json();
    assert_eq!(ids(&list), vec![2, 3]);
    assert_eq!(list[0]["token_hint"], butler_hint);
    assert_eq!(me_status(&s, &butler).0, 200, "the Butler keeps its token");
    assert_eq!(me_status(&s, &bot).0, 200);

    let s = s.restart(&[], &[]);
    let admin = s.admin_token();
    let (next, _) = s.register_agent(&admin, "bot2");
    assert_eq!(next, 4, "no users were created by the restarts");
    assert_eq!(
        ids(&s.get("/api/users/agents", &admin).json()),
        vec![2, 3, 4]
    );
}
