//! Login, JWT sessions, agent tokens as Bearer credentials, the `Authorization` header, role
//! checks and the login rate limit (SPEC sections 2 and 3).

mod common;
use common::*;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Sha256, Sha512};

/// A JWT secret the tests know, so they can forge tokens with it.
const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

/// The (header, claims) of a JWT.
fn jwt_parts(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {token}");
    (decode_part(parts[0]), decode_part(parts[1]))
}

fn hs256(secret: &[u8], input: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hs512(secret: &[u8], input: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha512>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A token with the given header and claims, signed HS256 with `secret`.
fn forge(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = b64(&hs256(secret, &input));
    format!("{input}.{sig}")
}

fn claims_for(user_id: i64, role: &str) -> Value {
    let now = now_secs();
    json!({"user_id": user_id, "role": role, "iat": now, "exp": now + 3600, "iss": "echocenter"})
}

fn hs256_header() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
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

fn with_auth_header(s: &Server, method: &str, path: &str, value: &str) -> HttpResponse {
    s.raw_request(
        method,
        path,
        &[("Authorization".to_string(), value.to_string())],
        None,
    )
}

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

#[test]
fn login_returns_a_jwt_and_the_user_object() {
    let s = Server::start();
    let r = s.login("admin", "admin123");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let token = v["token"].as_str().expect("token is a string");
    let (header, claims) = jwt_parts(token);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(claims["user_id"], 1);
    assert_eq!(claims["role"], "ADMIN");
    assert_eq!(claims["iss"], "echocenter");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 24 * 3600, "default --jwt-ttl is 24h");
    assert!((iat - now_secs()).abs() <= 60, "iat is now: {iat}");

    let user = &v["user"];
    assert_eq!(user["id"], 1);
    assert_eq!(user["username"], "admin");
    assert_eq!(user["role"], "ADMIN");
    assert_eq!(user["actor_type"], "HUMAN");
    for field in ["agent_kind", "runtime_kind", "description"] {
        assert!(user[field].is_string(), "user.{field} missing: {user}");
    }
    assert!(
        is_timestamp(user["created_at"].as_str().unwrap_or("")),
        "created_at: {user}"
    );
    assert!(user.get("api_token").is_none(), "{user}");
    assert!(user.get("password").is_none() && user.get("password_hash").is_none());

    // The token is a working session.
    let me = s.get("/api/users/me", token);
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["username"], "admin");
}

#[test]
fn wrong_password_and_unknown_user_are_401_invalid_credentials() {
    let s = Server::start();
    for (user, pw) in [
        ("admin", "wrong-password"),
        ("admin", "ADMIN123"),
        ("Admin", "admin123"),
        ("nobody", "admin123"),
    ] {
        let r = s.login(user, pw);
        assert_eq!(r.status, 401, "{user}/{pw}: {}", r.body);
        assert_eq!(r.error(), "invalid credentials", "{user}/{pw}");
        assert!(r.json().get("token").is_none());
    }
    // An agent has no password: its name does not log in.
    let admin = s.admin_token();
    s.register_agent(&admin, "bot");
    let r = s.login("bot", "anything");
    assert_eq!((r.status, r.error()), (401, "invalid credentials".into()));
}

#[test]
fn login_with_missing_or_mistyped_fields_is_400_invalid_request_body() {
    let s = Server::start();
    for body in [
        "{}",
        r#"{"username":"admin"}"#,
        r#"{"password":"admin123"}"#,
        r#"{"username":1,"password":"admin123"}"#,
        r#"{"username":"admin","password":null}"#,
        "not json",
        "",
    ] {
        let r = s.request("POST", "/api/auth/login", None, Some(body));
        assert_eq!(r.status, 400, "{body:?}: {}", r.body);
        assert_eq!(r.error(), "invalid request body", "{body:?}");
    }
    // Bad requests are not failed logins: the right password still works afterwards.
    s.admin_token();
}

#[test]
fn an_expired_jwt_is_refused_with_invalid_token() {
    let s = Server::start_with(&["--jwt-ttl", "1s"], &[]);
    // A 1 s token can expire between login and first use when the second ticks over; take
    // the first one that is accepted at least once.
    let mut accepted = None;
    for _ in 0..10 {
        let token = s.admin_token();
        let (_, claims) = jwt_parts(&token);
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            1
        );
        if s.get("/api/users/me", &token).status == 200 {
            accepted = Some(token);
            break;
        }
    }
    let token = accepted.expect("a fresh 1s token is accepted at least once");
    let exp = jwt_parts(&token).1["exp"].as_i64().unwrap();
    let mut last = (200, String::new());
    s.wait_for("the token to expire", Duration::from_secs(10), || {
        last = me_status(&s, &token);
        last.0 != 200
    });
    assert_eq!(last, (401, "invalid token".to_string()));
    assert!(now_secs() >= exp, "refused only once exp has passed");
    // Expired for every route, not just /me.
    let r = s.get("/api/messages", &token);
    assert_eq!((r.status, r.error()), (401, "invalid token".into()));
}

#[test]
fn tampered_and_foreign_algorithm_jwts_are_refused() {
    let s = Server::start_with(&["--jwt-secret", SECRET], &[]);
    let admin = s.admin_token();
    let (member_id, member) = s.create_human(&admin, "alice", "MEMBER");
    let parts: Vec<String> = member.split('.').map(str::to_string).collect();

    // Control: a token built here with the server's secret is accepted, so the refusals
    // below are about what was changed, not about how the tests build tokens.
    let good = forge(
        &hs256_header(),
        &claims_for(member_id, "MEMBER"),
        SECRET.as_bytes(),
    );
    let r = s.get("/api/users/me", &good);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["username"], "alice");

    let mut refused: Vec<(&str, String)> = Vec::new();

    // Signature changed.
    let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
    sig[0] ^= 0x01;
    refused.push((
        "flipped signature bit",
        format!("{}.{}.{}", parts[0], parts[1], b64(&sig)),
    ));
    refused.push(("no signature", format!("{}.{}.", parts[0], parts[1])));

    // Payload changed (become the admin), original signature kept.
    let mut claims = jwt_parts(&member).1;
    claims["user_id"] = json!(1);
    claims["role"] = json!("ADMIN");
    refused.push((
        "payload edited to the admin",
        format!(
            "{}.{}.{}",
            parts[0],
            b64(claims.to_string().as_bytes()),
            parts[2]
        ),
    ));

    // alg: none.
    let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let member_claims = b64(claims_for(member_id, "MEMBER").to_string().as_bytes());
    refused.push((
        "alg none, empty signature",
        format!("{none_header}.{member_claims}."),
    ));
    refused.push((
        "alg none, original signature",
        format!("{none_header}.{}.{}", parts[1], parts[2]),
    ));

    // HS512 header, correctly signed with HS512 and the real secret.
    let hs512_header = b64(br#"{"alg":"HS512","typ":"JWT"}"#);
    let input = format!("{hs512_header}.{member_claims}");
    refused.push((
        "HS512 signed with the secret",
        format!("{input}.{}", b64(&hs512(SECRET.as_bytes(), &input))),
    ));
    // HS512 header over a valid HS256 signature.
    refused.push((
        "HS512 header, HS256 signature",
        format!("{input}.{}", b64(&hs256(SECRET.as_bytes(), &input))),
    ));

    // Signed with another secret.
    refused.push((
        "other secret",
        forge(
            &hs256_header(),
            &claims_for(member_id, "MEMBER"),
            b"another-secret-0123456789-abcdefghijk",
        ),
    ));
    // Properly signed, but expired, from another issuer, or for users that cannot hold one.
    let mut expired = claims_for(member_id, "MEMBER");
    expired["exp"] = json!(now_secs() - 10);
    expired["iat"] = json!(now_secs() - 100);
    refused.push((
        "expired",
        forge(&hs256_header(), &expired, SECRET.as_bytes()),
    ));
    let mut issuer = claims_for(member_id, "MEMBER");
    issuer["iss"] = json!("someone-else");
    refused.push((
        "wrong issuer",
        forge(&hs256_header(), &issuer, SECRET.as_bytes()),
    ));
    refused.push((
        "unknown user id",
        forge(
            &hs256_header(),
            &claims_for(999, "ADMIN"),
            SECRET.as_bytes(),
        ),
    ));
    refused.push((
        "the Butler's id (machines hold tokens, not JWTs)",
        forge(&hs256_header(), &claims_for(2, "BUTLER"), SECRET.as_bytes()),
    ));
    refused.push((
        "garbage",
        "eyJhbGciOiJIUzI1NiJ9.garbage.garbage".to_string(),
    ));

    for (what, token) in &refused {
        let r = s.get("/api/users/me", token);
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        assert_eq!(r.error(), "invalid token", "{what}");
    }
    // The untouched token still works.
    assert_eq!(s.get("/api/users/me", &member).status, 200);
}

#[test]
fn the_database_role_not_the_claim_decides() {
    let s = Server::start_with(&["--jwt-secret", SECRET], &[]);
    let admin = s.admin_token();
    let (member_id, _) = s.create_human(&admin, "alice", "MEMBER");
    let as_admin = forge(
        &hs256_header(),
        &claims_for(member_id, "ADMIN"),
        SECRET.as_bytes(),
    );
    let r = s.post(
        "/api/users/agents",
        &as_admin,
        json!({"username": "sneaky"}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error(), "admin access required");
    let me = s.get("/api/users/me", &as_admin);
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["role"], "MEMBER");
}

#[test]
fn authorization_header_errors() {
    let s = Server::start();
    let admin = s.admin_token();

    let r = s.request("GET", "/api/users/me", None, None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.error(), "authorization header required");

    for value in [
        "Bearer".to_string(),
        "Basic YWRtaW46YWRtaW4xMjM=".to_string(),
        "Basic x".to_string(),
        format!("Token {admin}"),
        format!("Bearer {admin} extra"),
        format!("Bearer  {admin}"),
        admin.clone(),
    ] {
        let r = with_auth_header(&s, "GET", "/api/users/me", &value);
        assert_eq!(r.status, 401, "{value:?}: {}", r.body);
        assert_eq!(
            r.error(),
            "invalid authorization header format",
            "{value:?}"
        );
    }

    let r = with_auth_header(&s, "GET", "/api/users/me", "Bearer not-a-real-token");
    assert_eq!((r.status, r.error()), (401, "invalid token".into()));

    // The scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let r = with_auth_header(&s, "GET", "/api/users/me", &format!("{scheme} {admin}"));
        assert_eq!(r.status, 200, "{scheme}: {}", r.body);
    }
}

#[test]
fn a_member_gets_403_admin_access_required_on_admin_routes() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, _) = s.register_agent(&admin, "bot");
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    let id = agent_id.to_string();
    let cases: Vec<(&str, String, Option<String>)> = vec![
        (
            "POST",
            "/api/users".into(),
            Some(
                json!({"username": "x", "password": "pw-123456-long", "role": "ADMIN"}).to_string(),
            ),
        ),
        (
            "POST",
            "/api/users/agents".into(),
            Some(json!({"username": "x"}).to_string()),
        ),
        (
            "POST",
            "/api/users/agents/test-connection".into(),
            Some(json!({"api_token": "whatever-token-123"}).to_string()),
        ),
        (
            "PATCH",
            format!("/api/users/agents/{id}/token"),
            Some("{}".into()),
        ),
        ("DELETE", format!("/api/users/agents/{id}"), None),
        ("GET", format!("/api/chat/butler-agent/{id}"), None),
        ("GET", "/api/dev/mock/agent-token/bot".into(), None),
        ("POST", "/api/dev/mock/reset".into(), None),
        (
            "POST",
            "/api/messages".into(),
            Some(json!({"agent_id": "bot", "level": "INFO", "content": "x"}).to_string()),
        ),
    ];
    for (method, path, body) in &cases {
        let r = s.request(method, path, Some(&member), body.as_deref());
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(r.error(), "admin access required", "{method} {path}");
    }
    // Nothing happened: the agent is still there, with its name.
    let list = s.get("/api/users/agents", &admin).json();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    // Human routes are open to members.
    for path in [
        "/api/messages",
        "/api/users/agents",
        "/api/users/agents/status",
        "/api/users/butler",
        "/api/users/me",
    ] {
        assert_eq!(s.get(path, &member).status, 200, "{path}");
    }
}

#[test]
fn an_agent_token_on_a_human_route_gets_403_forbidden() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, agent) = s.register_agent(&admin, "bot");
    let butler = s.butler_token(&admin);
    // The Butler may read the agent directory (it instructs agents by name); agents may not.
    for path in ["/api/users/agents", "/api/users/agents/status"] {
        assert_eq!(s.get(path, &butler).status, 200, "{path}");
        let r = s.get(path, &agent);
        assert_eq!((r.status, r.error()), (403, "forbidden".into()), "{path}");
    }
    for token in [&agent, &butler] {
        for path in [
            "/api/messages",
            "/api/users/butler",
            "/api/chat/butler-agent/3",
            "/api/dev/mock/agent-token/bot",
        ] {
            let r = s.get(path, token);
            assert_eq!(r.status, 403, "{path}: {}", r.body);
            assert_eq!(r.error(), "forbidden", "{path}");
        }
        let r = s.post(
            "/api/chat/auth/response",
            token,
            json!({"action_id": "a1", "approved": true}),
        );
        assert_eq!((r.status, r.error()), (403, "forbidden".into()));
        let r = s.post("/api/users/agents", token, json!({"username": "spawned"}));
        assert_eq!((r.status, r.error()), (403, "forbidden".into()));
    }
    let names: Vec<Value> = s
        .get("/api/users/agents", &admin)
        .json()
        .as_array()
        .unwrap()
        .clone();
    assert!(names.iter().all(|u| u["username"] != "spawned"));
}

#[test]
fn an_agent_token_is_accepted_as_bearer_on_me_and_post_messages() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, agent) = s.register_agent(&admin, "bot");

    let me = s.get("/api/users/me", &agent);
    assert_eq!(me.status, 200, "{}", me.body);
    let me = me.json();
    assert_eq!(me["id"], agent_id);
    assert_eq!(me["username"], "bot");
    assert_eq!(me["role"], "AGENT");
    assert_eq!(me["actor_type"], "SYSTEM");
    assert!(me.get("api_token").is_none(), "never the raw token: {me}");
    assert!(!s.get("/api/users/me", &agent).body.contains(&agent));

    let r = s.post(
        "/api/messages",
        &agent,
        json!({"agent_id": "bot", "level": "INFO", "content": "hello from bot"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["agent_id"], "bot");

    // The Butler's token authenticates too.
    let butler = s.butler_token(&admin);
    let me = s.get("/api/users/me", &butler);
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["id"], 2);
    assert_eq!(me.json()["role"], "BUTLER");
}

#[test]
fn get_me_returns_the_callers_own_user() {
    let s = Server::start();
    let admin = s.admin_token();
    let (member_id, member) = s.create_human(&admin, "alice", "MEMBER");
    let me = s.get("/api/users/me", &admin).json();
    assert_eq!(
        (me["id"].clone(), me["role"].clone()),
        (json!(1), json!("ADMIN"))
    );
    let me = s.get("/api/users/me", &member);
    assert_eq!(me.status, 200);
    let me = me.json();
    assert_eq!(me["id"], member_id);
    assert_eq!(me["username"], "alice");
    assert_eq!(me["role"], "MEMBER");
    assert_eq!(me["actor_type"], "HUMAN");
    assert!(is_timestamp(me["created_at"].as_str().unwrap()), "{me}");
}

#[test]
fn ten_failed_logins_lock_the_address_out_with_429_and_retry_after() {
    let s = Server::start();
    let admin = s.admin_token();
    // A success does not count as a failure.
    s.admin_token();
    let started = Instant::now();
    for i in 0..10 {
        let r = s.login("admin", &format!("wrong-{i}"));
        assert_eq!(r.status, 401, "failure {i}: {}", r.body);
        assert_eq!(r.error(), "invalid credentials");
    }
    assert!(
        started.elapsed() < Duration::from_secs(290),
        "the ten failures must fall within the 5-minute window"
    );
    for (user, pw) in [("admin", "admin123"), ("admin", "wrong"), ("nobody", "x")] {
        let r = s.login(user, pw);
        assert_eq!(r.status, 429, "{user}/{pw}: {}", r.body);
        assert_eq!(r.error(), "too many login attempts");
        assert!(r.json().get("token").is_none());
        let retry: u64 = r
            .header("Retry-After")
            .expect("Retry-After header")
            .parse()
            .expect("Retry-After is whole seconds");
        assert!((1..=300).contains(&retry), "Retry-After {retry}");
    }
    // Existing sessions are not affected by the lockout.
    assert_eq!(s.get("/api/users/me", &admin).status, 200);
}

#[test]
fn an_admin_creates_humans_who_can_log_in() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.post(
        "/api/users",
        &admin,
        json!({"username": "alice", "password": "alice-pass-1", "role": "MEMBER"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let u = r.json();
    assert!(u["id"].as_i64().unwrap() > 2);
    assert_eq!(u["username"], "alice");
    assert_eq!(u["role"], "MEMBER");
    assert_eq!(u["actor_type"], "HUMAN");
    assert!(is_timestamp(u["created_at"].as_str().unwrap()), "{u}");
    assert!(!r.body.contains("alice-pass-1"), "{}", r.body);
    let login = s.login("alice", "alice-pass-1");
    assert_eq!(login.status, 200, "{}", login.body);
    assert_eq!(login.json()["user"]["id"], u["id"]);

    let r = s.post(
        "/api/users",
        &admin,
        json!({"username": "root2", "password": "root-pass-2", "role": "ADMIN"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["role"], "ADMIN");
    let root2 = s.login("root2", "root-pass-2").json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    // A second admin has admin rights.
    let r = s.post("/api/users/agents", &root2, json!({"username": "bot"}));
    assert_eq!(r.status, 201, "{}", r.body);

    for name in ["alice", "admin", "Butler", "bot"] {
        let r = s.post(
            "/api/users",
            &admin,
            json!({"username": name, "password": "pw-123456-long", "role": "MEMBER"}),
        );
        assert_eq!(r.status, 409, "{name}: {}", r.body);
        assert_eq!(r.error(), "username already exists", "{name}");
    }
    let r = s.post(
        "/api/users",
        &admin,
        json!({"username": "bad name", "password": "pw-123456-long", "role": "MEMBER"}),
    );
    assert_eq!((r.status, r.error()), (400, "invalid username".into()));
    for role in ["AGENT", "BUTLER", "OWNER"] {
        let r = s.post(
            "/api/users",
            &admin,
            json!({"username": "eve", "password": "pw-123456-long", "role": role}),
        );
        assert_eq!(r.status, 400, "{role}: {}", r.body);
    }
    assert_eq!(s.login("eve", "pw-123456-long").status, 401);
}
