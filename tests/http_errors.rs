//! Error bodies and their order (route, auth, body size, validation), request limits and CORS
//! (SPEC section 3).

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

const MIB: usize = 1 << 20;

fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("Authorization".to_string(), format!("Bearer {token}"))]
}

/// A valid registration body padded with spaces to exactly `len` bytes.
fn padded_body(username: &str, len: usize) -> Vec<u8> {
    let mut body = json!({"username": username}).to_string().into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

/// Sends raw bytes and returns the status code and the whole response text.
fn raw_exchange(s: &Server, bytes: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(&s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer and close before reading everything; that is fine.
    let _ = stream.write_all(bytes);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, text)
}

#[test]
fn invalid_json_is_400_invalid_request_body() {
    let s = Server::start();
    let admin = s.admin_token();
    for (path, body) in [
        ("/api/users/agents", "{not json"),
        ("/api/users/agents", "[1, 2]"),
        ("/api/users/agents", "\"just a string\""),
        ("/api/users", "{"),
        ("/api/messages", "nope"),
        ("/api/users/agents/test-connection", "{\"api_token\": }"),
        ("/api/chat/auth/response", "{]"),
        ("/api/dev/mock/chat", "{"),
        ("/api/auth/login", "{{"),
    ] {
        let r = s.request("POST", path, Some(&admin), Some(body));
        assert_eq!(r.status, 400, "{path} {body:?}: {}", r.body);
        assert_eq!(
            r.body.trim(),
            r#"{"error":"invalid request body"}"#,
            "{path}"
        );
    }
    let r = s.request(
        "PATCH",
        "/api/users/agents/2/token",
        Some(&admin),
        Some("{oops"),
    );
    assert_eq!((r.status, r.error()), (400, "invalid request body".into()));
    // Invalid UTF-8 is not JSON either.
    let r = s.raw_request(
        "POST",
        "/api/users/agents",
        &bearer(&admin),
        Some(b"{\"username\": \"\xff\xfe\"}"),
    );
    assert_eq!((r.status, r.error()), (400, "invalid request body".into()));
}

#[test]
fn wrong_field_types_are_400_invalid_request_body() {
    let s = Server::start();
    let admin = s.admin_token();
    let cases = [
        ("POST", "/api/users/agents", json!({"username": 5})),
        (
            "POST",
            "/api/users/agents",
            json!({"username": "x", "api_token": 12345}),
        ),
        ("POST", "/api/users/agents", json!({"username": ["bot"]})),
        (
            "POST",
            "/api/users",
            json!({"username": "bob", "password": 123456, "role": "MEMBER"}),
        ),
        (
            "POST",
            "/api/users",
            json!({"username": "bob", "password": "pw-123456-long", "role": 1}),
        ),
        (
            "POST",
            "/api/messages",
            json!({"agent_id": "x", "level": "INFO", "content": 5}),
        ),
        (
            "POST",
            "/api/messages",
            json!({"agent_id": 7, "level": "INFO", "content": "x"}),
        ),
        (
            "POST",
            "/api/users/agents/test-connection",
            json!({"api_token": 5}),
        ),
        (
            "POST",
            "/api/chat/auth/response",
            json!({"action_id": "a1", "approved": "yes"}),
        ),
        (
            "PATCH",
            "/api/users/agents/2/token",
            json!({"api_token": true}),
        ),
        (
            "POST",
            "/api/auth/login",
            json!({"username": "admin", "password": 5}),
        ),
    ];
    for (method, path, body) in cases {
        let r = s.request(method, path, Some(&admin), Some(&body.to_string()));
        assert_eq!(r.status, 400, "{method} {path} {body}: {}", r.body);
        assert_eq!(r.error(), "invalid request body", "{method} {path} {body}");
    }
    // Nothing was created along the way.
    let agents = s.get("/api/users/agents", &admin).json();
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    assert_eq!(s.login("bob", "123456").status, 401);
}

#[test]
fn a_body_over_1_mib_is_413_and_exactly_1_mib_is_accepted() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.raw_request(
        "POST",
        "/api/users/agents",
        &bearer(&admin),
        Some(&padded_body("too-big", MIB + 1)),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body.trim(), r#"{"error":"request body too large"}"#);

    let r = s.raw_request(
        "POST",
        "/api/messages",
        &bearer(&admin),
        Some(&vec![b'x'; 3 * MIB]),
    );
    assert_eq!(
        (r.status, r.error()),
        (413, "request body too large".into())
    );

    let r = s.raw_request(
        "POST",
        "/api/users/agents",
        &bearer(&admin),
        Some(&padded_body("just-fits", MIB)),
    );
    assert_eq!(r.status, 201, "exactly 1 MiB is allowed: {}", r.body);

    let names: Vec<String> = s
        .get("/api/users/agents", &admin)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["Butler", "just-fits"]);
}

#[test]
fn a_chunked_body_over_1_mib_is_413() {
    let s = Server::start();
    let admin = s.admin_token();
    let mut req = format!(
        "POST /api/users/agents HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        s.addr
    )
    .into_bytes();
    let body = padded_body("chunky", MIB + 100);
    for chunk in body.chunks(64 * 1024) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = raw_exchange(&s, &req);
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains(r#"{"error":"request body too large"}"#),
        "{text}"
    );
    let list = s.get("/api/users/agents", &admin).json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing registered: {list}"
    );
}

#[test]
fn checks_run_in_order_route_auth_size_validation() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "alice", "MEMBER");
    let big = padded_body("x", MIB + 1);

    // Route first: an unknown path or wrong method wins over a missing token.
    let r = s.raw_request("POST", "/api/nope", &[], Some(&big));
    assert_eq!((r.status, r.body.trim()), (404, r#"{"error":"not found"}"#));
    let r = s.raw_request("PUT", "/api/users/agents", &[], Some(&big));
    assert_eq!(
        (r.status, r.body.trim()),
        (405, r#"{"error":"method not allowed"}"#)
    );
    // Auth before size: an unauthenticated oversize POST is 401.
    let r = s.raw_request("POST", "/api/users/agents", &[], Some(&big));
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.error(), "authorization header required");
    let r = s.raw_request(
        "POST",
        "/api/users/agents",
        &bearer("bogus-token"),
        Some(&big),
    );
    assert_eq!((r.status, r.error()), (401, "invalid token".into()));
    // Role before size.
    let r = s.raw_request("POST", "/api/users/agents", &bearer(&member), Some(&big));
    assert_eq!((r.status, r.error()), (403, "admin access required".into()));
    // Auth before validation.
    let r = s.request("POST", "/api/users/agents", None, Some("{not json"));
    assert_eq!(
        (r.status, r.error()),
        (401, "authorization header required".into())
    );
    let r = s.request(
        "POST",
        "/api/users/agents",
        Some(&member),
        Some("{not json"),
    );
    assert_eq!((r.status, r.error()), (403, "admin access required".into()));
    // Size before validation: an oversize invalid body is 413, not 400.
    let r = s.raw_request(
        "POST",
        "/api/users/agents",
        &bearer(&admin),
        Some(&vec![b'{'; MIB + 1]),
    );
    assert_eq!(
        (r.status, r.error()),
        (413, "request body too large".into())
    );
    // Auth before query validation.
    let r = s.request("GET", "/api/messages?limit=0", None, None);
    assert_eq!(r.status, 401);
}

#[test]
fn unknown_routes_are_404_not_found() {
    let s = Server::start();
    let admin = s.admin_token();
    for path in [
        "/api/nope",
        "/api/users/agents/3/token/extra",
        "/api/chat/history",
        "/api/chat/threads/1/messages/extra",
        "/nothing/here",
        "/api",
    ] {
        for token in [None, Some(admin.as_str())] {
            let r = s.request("GET", path, token, None);
            assert_eq!(r.status, 404, "{path}: {}", r.body);
            assert_eq!(r.body.trim(), r#"{"error":"not found"}"#, "{path}");
            assert!(
                r.header("Content-Type")
                    .unwrap_or("")
                    .starts_with("application/json"),
                "{path}: {:?}",
                r.headers
            );
        }
    }
}

#[test]
fn wrong_methods_are_405_method_not_allowed() {
    let s = Server::start();
    let admin = s.admin_token();
    for (method, path) in [
        ("DELETE", "/api/ping"),
        ("POST", "/api/ping"),
        ("GET", "/api/auth/login"),
        ("PUT", "/api/users/agents"),
        ("POST", "/api/users/me"),
        ("GET", "/api/users/agents/2/token"),
        ("POST", "/api/users/agents/2"),
        ("DELETE", "/api/messages"),
        ("GET", "/api/dev/mock/reset"),
        ("PUT", "/api/users"),
        ("POST", "/api/users/3"),
    ] {
        let r = s.request(method, path, Some(&admin), None);
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert_eq!(
            r.body.trim(),
            r#"{"error":"method not allowed"}"#,
            "{method} {path}"
        );
    }
    // The Butler was not deleted by any of that.
    assert_eq!(s.get("/api/users/butler", &admin).status, 200);
}

#[test]
fn a_request_head_over_8_kib_is_431() {
    let s = Server::start();
    let big = vec![("X-Padding".to_string(), "a".repeat(9 * 1024))];
    let r = s.raw_request("GET", "/api/ping", &big, None);
    assert_eq!(r.status, 431, "{}", r.body);
    let long_path = format!("/api/ping?pad={}", "b".repeat(9 * 1024));
    let r = s.raw_request("GET", &long_path, &[], None);
    assert_eq!(r.status, 431, "{}", r.body);
    // Just under the limit is served.
    let fits = vec![("X-Padding".to_string(), "a".repeat(7 * 1024))];
    let r = s.raw_request("GET", "/api/ping", &fits, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"message": "pong"}));
}

#[test]
fn cors_for_listed_origins_only() {
    let origin = "https://ops.example.com";
    let s = Server::start_with(
        &[
            "--allowed-origins",
            "https://ops.example.com,http://localhost:5173",
        ],
        &[],
    );
    let admin = s.admin_token();
    let preflight = |origin: &str, path: &str| {
        s.raw_request(
            "OPTIONS",
            path,
            &[
                ("Origin".to_string(), origin.to_string()),
                (
                    "Access-Control-Request-Method".to_string(),
                    "PATCH".to_string(),
                ),
                (
                    "Access-Control-Request-Headers".to_string(),
                    "authorization, content-type".to_string(),
                ),
            ],
            None,
        )
    };
    let list_items = |h: Option<&str>| -> Vec<String> {
        h.unwrap_or("")
            .split(',')
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect()
    };

    for (o, path) in [
        (origin, "/api/users/agents"),
        ("http://localhost:5173", "/api/users/agents/3/token"),
        (origin, "/api/auth/login"),
    ] {
        let r = preflight(o, path);
        assert_eq!(r.status, 204, "{o} {path}: {}", r.body);
        assert_eq!(r.header("Access-Control-Allow-Origin"), Some(o));
        let methods = list_items(r.header("Access-Control-Allow-Methods"));
        for m in ["get", "post", "patch", "delete"] {
            assert!(methods.contains(&m.to_string()), "{methods:?}");
        }
        let headers = list_items(r.header("Access-Control-Allow-Headers"));
        for h in ["authorization", "content-type"] {
            assert!(headers.contains(&h.to_string()), "{headers:?}");
        }
        let exposed = list_items(r.header("Access-Control-Expose-Headers"));
        assert!(
            exposed.contains(&"x-total-count".to_string()),
            "{:?}",
            r.headers
        );
    }

    // The actual request carries the CORS headers too, so X-Total-Count is readable.
    let mut headers = bearer(&admin);
    headers.push(("Origin".to_string(), origin.to_string()));
    let r = s.raw_request("GET", "/api/users/agents", &headers, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("Access-Control-Allow-Origin"), Some(origin));
    assert!(list_items(r.header("Access-Control-Expose-Headers"))
        .contains(&"x-total-count".to_string()));
    assert!(r.header("X-Total-Count").is_some());

    // Other origins: no CORS headers at all.
    for other in [
        "https://evil.example.com",
        "https://ops.example.com.evil.net",
        "null",
    ] {
        let r = preflight(other, "/api/users/agents");
        assert_ne!(r.status, 204, "{other}");
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-")),
            "{other}: {:?}",
            r.headers
        );
        let mut headers = bearer(&admin);
        headers.push(("Origin".to_string(), other.to_string()));
        let r = s.raw_request("GET", "/api/users/agents", &headers, None);
        assert_eq!(r.status, 200);
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-")),
            "{other}: {:?}",
            r.headers
        );
    }
}

#[test]
fn no_cors_headers_without_allowed_origins() {
    let s = Server::start();
    let r = s.raw_request(
        "OPTIONS",
        "/api/users/agents",
        &[
            ("Origin".to_string(), "https://ops.example.com".to_string()),
            (
                "Access-Control-Request-Method".to_string(),
                "GET".to_string(),
            ),
        ],
        None,
    );
    assert_ne!(r.status, 204);
    assert!(
        r.header("Access-Control-Allow-Origin").is_none(),
        "{:?}",
        r.headers
    );
}

#[test]
fn metrics_are_404_without_a_metrics_token_and_guarded_with_one() {
    let s = Server::start();
    let admin = s.admin_token();
    let r = s.get("/metrics", &admin);
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.body.trim(), r#"{"error":"not found"}"#);

    let s = Server::start_with(&["--metrics-token", "scrape-token-123"], &[]);
    let admin = s.admin_token();
    let r = s.request("GET", "/metrics", None, None);
    assert_eq!(
        (r.status, r.error()),
        (401, "authorization header required".into())
    );
    let r = s.get("/metrics", &admin);
    assert_eq!((r.status, r.error()), (401, "invalid token".into()));
    let r = s.get("/metrics", "scrape-token-123");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("echocenter_"), "{}", r.body);
    assert!(!r.body.contains("scrape-token-123"));
}

#[test]
fn rest_responses_say_connection_close_so_keep_alive_clients_do_not_reuse_the_socket() {
    let s = Server::start();
    let headers = vec![("Connection".to_string(), "keep-alive".to_string())];
    let r = s.raw_request("GET", "/api/ping", &headers, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    let r = s.request("GET", "/api/nope", None, None);
    assert_eq!(r.header("connection"), Some("close"));
}
