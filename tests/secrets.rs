//! Issue #6, hostile conditions: secrets stay secret. Tokens, passwords, JWTs and `/api/ws`
//! query strings never reach the log (even at debug level), the one exception being the
//! production bootstrap password printed once; the database is readable by its owner only;
//! lists never carry raw tokens; error messages never echo a presented token.
mod common;
use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;

const ADMIN_PASSWORD: &str = "Adm1n-Pa55word-7f3k";
const JWT_SECRET: &str = "jwt-secret-that-is-long-enough-4u8w2q9z";
const METRICS_TOKEN: &str = "metrics-token-v9x2m4k7";

#[test]
fn no_secret_reaches_the_log_even_at_debug_level() {
    let mut s = Server::start_with(
        &[
            "--log",
            "debug",
            "--admin-password",
            ADMIN_PASSWORD,
            "--jwt-secret",
            JWT_SECRET,
            "--metrics-token",
            METRICS_TOKEN,
        ],
        &[],
    );
    let mut secrets: Vec<String> = vec![
        ADMIN_PASSWORD.into(),
        JWT_SECRET.into(),
        METRICS_TOKEN.into(),
    ];
    let login = s.login("admin", ADMIN_PASSWORD);
    assert_eq!(login.status, 200, "{}", login.body);
    let admin = login.json()["token"].as_str().unwrap().to_string();
    secrets.push(admin.clone());

    // Failed logins with passwords that are secrets too.
    for wrong in ["Wr0ng-Pa55word-q1w2", "another-Wrong-pw-e3r4"] {
        assert_eq!(s.login("admin", wrong).status, 401);
        secrets.push(wrong.into());
    }
    assert_eq!(s.login("nobody-here", "Unknown-Us3r-pw-t5y6").status, 401);
    secrets.push("Unknown-Us3r-pw-t5y6".into());

    // A human with a password, and its JWT.
    let r = s.post(
        "/api/users",
        &admin,
        json!({"username": "alice", "password": "Al1ce-Pa55word-z8x7", "role": "MEMBER"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    secrets.push("Al1ce-Pa55word-z8x7".into());
    let alice = s.login("alice", "Al1ce-Pa55word-z8x7").json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    secrets.push(alice.clone());

    // Agents: a generated token, a supplied one, rotations of both kinds.
    let (gen_id, generated) = s.register_agent(&admin, "gen");
    secrets.push(generated.clone());
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "sup", "api_token": "supplied-token-k2j4h6g8"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let sup_id = r.json()["id"].as_i64().unwrap();
    secrets.push("supplied-token-k2j4h6g8".into());
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{gen_id}/token"),
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let rotated = r.json()["api_token"].as_str().unwrap().to_string();
    secrets.push(rotated.clone());
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{sup_id}/token"),
        Some(&admin),
        Some(&json!({"api_token": "rotated-supplied-m5n6b7v8"}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    secrets.push("rotated-supplied-m5n6b7v8".into());
    // A conflicting supplied token (409) and an invalid one (400).
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "dup", "api_token": "rotated-supplied-m5n6b7v8"}),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "bad", "api_token": "bad token p0o9i8u7!"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    secrets.push("bad token p0o9i8u7!".into());
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": rotated}),
    );
    assert_eq!(r.json()["ok"], true, "{}", r.body);
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": "unregistered-token-c3v4b5n6"}),
    );
    assert_eq!(r.json()["ok"], false, "{}", r.body);
    secrets.push("unregistered-token-c3v4b5n6".into());
    let butler = s.butler_token(&admin);
    secrets.push(butler.clone());

    // WebSocket connects with ?token=, with the Bearer header, and failed ones.
    let mut agent = s.ws(&rotated);
    agent.send_json(json!({"type": "SYSTEM_LOG", "payload": "hello", "local_id": "x"}));
    agent.recv_type("ACK");
    let mut human = s.ws(&alice);
    human.send_text("{not json");
    human.recv_type("ERROR");
    let _butler_ws = s.ws(&butler);
    let headers = vec![
        ("Upgrade".to_string(), "websocket".to_string()),
        ("Connection".to_string(), "Upgrade".to_string()),
        ("Sec-WebSocket-Version".to_string(), "13".to_string()),
        (
            "Sec-WebSocket-Key".to_string(),
            "dGhlIHNhbXBsZSBub25jZQ==".to_string(),
        ),
        (
            "Authorization".to_string(),
            "Bearer rotated-supplied-m5n6b7v8".to_string(),
        ),
    ];
    assert_eq!(s.raw_request("GET", "/api/ws", &headers, None).status, 101);
    for wrong in ["wrong-ws-token-a1s2d3f4", "ec_0000wrongwrongwrong0000"] {
        assert!(s.try_ws(wrong).unwrap_err().starts_with("401"));
        secrets.push(wrong.into());
    }
    // The old tokens, now revoked.
    assert!(s.try_ws(&generated).unwrap_err().starts_with("401"));
    assert!(s
        .try_ws("supplied-token-k2j4h6g8")
        .unwrap_err()
        .starts_with("401"));
    // Bad credentials on REST and on /metrics.
    for wrong in [
        "rest-wrong-token-g7h8j9k0",
        "eyJhbGciOiJIUzI1NiJ9.e30.Zm9yZ2Vk",
    ] {
        assert_eq!(s.get("/api/users/me", wrong).status, 401);
        secrets.push(wrong.into());
    }
    assert_eq!(s.get("/metrics", METRICS_TOKEN).status, 200);
    assert_eq!(s.get("/metrics", "metrics-wrong-l1k2j3h4").status, 401);
    secrets.push("metrics-wrong-l1k2j3h4".into());
    // Query strings elsewhere are not secrets, but /api/ws's are: one with extra parameters.
    let r = s.request("GET", &format!("/api/ws?x=1&token={alice}&y=2"), None, None);
    assert_eq!(r.status, 426);

    // Stop cleanly so that every line is written, then look.
    agent.close();
    human.close();
    assert!(s.terminate().success());
    let log = s.stderr();
    // The log is real and at debug level (else this test could not fail).
    assert!(log.contains("DEBUG"), "{log}");
    assert!(log.contains("/api/ws"), "requests are logged: {log}");
    assert!(log.contains("/api/auth/login"), "{log}");
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret.as_str()),
            "secret {secret:?} found in the log:\n{log}"
        );
        // Nor the signature of a JWT on its own.
        if let Some(sig) = secret.rsplit('.').next().filter(|p| p.len() > 20) {
            assert!(!log.contains(sig), "JWT signature in the log:\n{log}");
        }
    }
    assert!(!log.contains("token="), "a query string in the log:\n{log}");
    assert!(!log.contains("admin123"), "{log}");
}

#[test]
fn the_production_bootstrap_password_is_printed_once_and_works() {
    let s = Server::start_with(&["--env", "production"], &[]);
    let log = s.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("password")).collect();
    assert_eq!(lines.len(), 1, "one line names the password:\n{log}");
    let password = lines[0]
        .split_whitespace()
        .skip_while(|w| *w != "password")
        .nth(1)
        .unwrap_or_else(|| panic!("no password on {:?}", lines[0]))
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    assert!(password.len() >= 12, "a strong password: {password:?}");
    assert_ne!(password, "admin123");
    assert_eq!(log.matches(password.as_str()).count(), 1, "{log}");
    let r = s.login("admin", &password);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.login("admin", "admin123").status, 401);
    // The JWT it issues is not logged either.
    let jwt = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(s.get("/api/users/me", &jwt).status, 200);
    assert!(!s.stderr().contains(&jwt));
    // A restart does not bootstrap again: the password is not printed a second time.
    let s = s.restart(&["--env", "production"], &[]);
    let log = s.stderr();
    assert!(!log.contains(password.as_str()), "{log}");
    assert_eq!(s.login("admin", &password).status, 200);
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_database_and_its_wal_are_mode_0600() {
    if skip_on_postgres("the modes of the SQLite file and its WAL") {
        return;
    }
    let s = Server::start();
    let admin = s.admin_token();
    // Writes, so that the WAL exists.
    s.register_agent(&admin, "writer");
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "writer", "level": "INFO", "content": "x"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(mode(&s.db), 0o600, "{}", s.db.display());
    let mut checked = 1;
    for suffix in ["-wal", "-shm"] {
        let side = std::path::PathBuf::from(format!("{}{suffix}", s.db.display()));
        if side.exists() {
            assert_eq!(mode(&side), 0o600, "{}", side.display());
            checked += 1;
        }
    }
    assert!(checked >= 2, "WAL mode: the -wal file exists while running");

    // A database in a directory that does not exist yet: created, and 0600 as well.
    let dir = TempDir::new();
    let db = dir.path().join("nested/deeper/echo.db");
    let state = TempDir::new();
    let s = Server::start_on(state, db.clone(), &[], &[]);
    let admin = s.admin_token();
    s.register_agent(&admin, "w2");
    assert_eq!(mode(&db), 0o600);
    drop(s);
}

#[test]
fn list_responses_never_contain_api_token() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, generated) = s.register_agent(&admin, "lister-gen");
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "lister-sup", "api_token": "listed-token-q9w8e7r6"}),
    );
    assert_eq!(r.status, 201);
    let butler = s.butler_token(&admin);
    let (_, member) = s.create_human(&admin, "lister-human", "MEMBER");
    let _online = s.ws(&generated);
    for token in [&admin, &member] {
        for path in [
            "/api/users/agents",
            "/api/users/agents?page=1&limit=1",
            "/api/users/agents?q=lister",
            "/api/users/agents/status",
            "/api/users/butler",
            "/api/users/me",
        ] {
            let r = s.get(path, token);
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            assert!(!r.body.contains("api_token"), "{path}: {}", r.body);
            for secret in [generated.as_str(), "listed-token-q9w8e7r6", butler.as_str()] {
                assert!(!r.body.contains(secret), "{path}: {}", r.body);
            }
        }
    }
    // The hint is there instead.
    let list = s.get("/api/users/agents", &admin).json();
    let sup = list
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "lister-sup")
        .unwrap()
        .clone();
    assert_eq!(sup["token_hint"], "list...e7r6");
    // An agent looking at itself does not see its token either.
    let me = s.get("/api/users/me", &generated);
    assert_eq!(me.status, 200);
    assert!(!me.body.contains("api_token") && !me.body.contains(&generated));
}

#[test]
fn error_messages_never_echo_a_presented_token() {
    let s = Server::start_with(&["--metrics-token", METRICS_TOKEN], &[]);
    let admin = s.admin_token();
    let (agent_id, agent) = s.register_agent(&admin, "echo-check");
    let presented = "presented-token-z1x2c3v4";
    let mut bodies: Vec<(String, String)> = Vec::new();
    let mut record = |what: &str, r: HttpResponse| {
        assert!(r.status >= 400, "{what}: {} {}", r.status, r.body);
        bodies.push((what.to_string(), r.body));
    };
    record("REST bearer", s.get("/api/users/me", presented));
    record(
        "REST bearer, extra part",
        s.raw_request(
            "GET",
            "/api/users/me",
            &[(
                "Authorization".to_string(),
                format!("Bearer {presented} extra"),
            )],
            None,
        ),
    );
    record(
        "REST other scheme",
        s.raw_request(
            "GET",
            "/api/users/me",
            &[("Authorization".to_string(), format!("Token {presented}"))],
            None,
        ),
    );
    record("metrics", s.get("/metrics", presented));
    record(
        "ws query",
        s.request("GET", &format!("/api/ws?token={presented}"), None, None),
    );
    record(
        "ws bearer",
        s.request("GET", "/api/ws", Some(presented), None),
    );
    record(
        "register with an invalid token",
        s.post(
            "/api/users/agents",
            &admin,
            json!({"username": "x1", "api_token": format!("{presented} !")}),
        ),
    );
    record(
        "register with a taken token",
        s.post(
            "/api/users/agents",
            &admin,
            json!({"username": "x2", "api_token": agent}),
        ),
    );
    record(
        "rotate to an invalid token",
        s.request(
            "PATCH",
            &format!("/api/users/agents/{agent_id}/token"),
            Some(&admin),
            Some(&json!({"api_token": format!("{presented}\u{e9}")}).to_string()),
        ),
    );
    // The WebSocket upgrade failure as a client library sees it.
    let err = s.try_ws(presented).unwrap_err();
    for (what, body) in &bodies {
        assert!(!body.contains(presented), "{what} echoed the token: {body}");
        assert!(!body.contains(&agent), "{what} echoed a token: {body}");
    }
    assert!(!err.contains(presented), "{err}");
    // A test-connection answer for an unknown token does not repeat it either.
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": presented}),
    );
    assert_eq!(r.status, 200);
    assert!(!r.body.contains(presented), "{}", r.body);
    // Log lines are written before the response; none of them names the token.
    assert!(!s.stderr().contains(presented));
}
