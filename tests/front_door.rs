//! Issue #11, the front door: whatever reaches the public port, unauthenticated and hostile,
//! must not crash, stall or bloat the server. Each test is one reproduction from the issue,
//! against the real binary over raw sockets. (Set `ECHOCENTER_TEST_BIN` to an older build to
//! watch them fail there.)
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const METRICS: &str = "front-door-metrics-token";

fn metric(s: &Server, name: &str) -> f64 {
    let r = s.get("/metrics", METRICS);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}", r.body))
}

/// `GET /api/ping` answers 200 within `within` (the failure this guards against is a wait
/// without end, or a refused connection).
fn ping_answers(s: &Server, within: Duration) -> bool {
    let Ok(mut c) = TcpStream::connect(&s.addr) else {
        return false;
    };
    c.set_read_timeout(Some(within)).unwrap();
    let _ = c.write_all(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let raw = read_all(&mut c);
    status_of(&raw) == Some(200) && body_of(&raw).contains("pong")
}

fn alive(s: &mut Server) -> bool {
    s.child.as_mut().unwrap().try_wait().unwrap().is_none()
}

fn raw_head(s: &Server, head: &str) -> (Option<u16>, String) {
    let raw = exchange(&s.addr, head.as_bytes(), Duration::from_secs(10));
    (status_of(&raw), String::from_utf8_lossy(&raw).into_owned())
}

// ----- Content-Length ---------------------------------------------------------------------

#[test]
fn a_huge_content_length_is_413_without_reading_or_allocating_and_the_process_lives() {
    let mut s = Server::start();
    let before = rss_kib(s.pid());
    for length in [
        "1000000000000000",     // 1e15: the allocation that aborted the process
        "9223372036854775808",  // 2^63: a capacity overflow panic in a worker
        "18446744073709551615", // 2^64 - 1
        "99999999999999999999999999",
    ] {
        for _ in 0..3 {
            let (status, text) = raw_head(
                &s,
                &format!("GET /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"),
            );
            assert_eq!(status, Some(413), "Content-Length {length}: {text}");
            assert!(
                text.contains(r#"{"error":"request body too large"}"#),
                "{text}"
            );
        }
        assert!(alive(&mut s), "the server died on Content-Length {length}");
    }
    // Route and auth still come first: an unknown route is 404, a protected one 401.
    let (status, _) = raw_head(
        &s,
        "POST /api/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n",
    );
    assert_eq!(status, Some(404));
    let (status, _) = raw_head(
        &s,
        "POST /api/users HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n",
    );
    assert_eq!(status, Some(401));
    assert!(ping_answers(&s, Duration::from_secs(5)));
    let after = rss_kib(s.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

#[test]
fn ambiguous_framing_is_400_duplicate_negative_or_non_numeric_lengths_and_cl_with_te() {
    let s = Server::start();
    let cases = [
        (
            "Content-Length: 2\r\nContent-Length: 2\r\n",
            400,
            "more than one Content-Length",
        ),
        (
            "Content-Length: 2\r\nContent-Length: 5\r\n",
            400,
            "more than one Content-Length",
        ),
        ("Content-Length: 2, 2\r\n", 400, "invalid Content-Length"),
        ("Content-Length: -1\r\n", 400, "invalid Content-Length"),
        ("Content-Length: +2\r\n", 400, "invalid Content-Length"),
        ("Content-Length: 0x10\r\n", 400, "invalid Content-Length"),
        ("Content-Length: two\r\n", 400, "invalid Content-Length"),
        (
            "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
            400,
            "Content-Length and Transfer-Encoding together",
        ),
        (
            "Transfer-Encoding: gzip, chunked\r\n",
            501,
            "unsupported Transfer-Encoding",
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            501,
            "unsupported Transfer-Encoding",
        ),
        (
            "Expect: tea\r\nContent-Length: 2\r\n",
            417,
            "unsupported Expect",
        ),
    ];
    for (headers, status, error) in cases {
        let (got, text) = raw_head(
            &s,
            &format!("POST /api/auth/login HTTP/1.1\r\nHost: x\r\n{headers}\r\n{{}}"),
        );
        assert_eq!(got, Some(status), "{headers:?}: {text}");
        assert!(
            body_of(text.as_bytes()).contains(error),
            "{headers:?}: {text}"
        );
    }
    assert!(ping_answers(&s, Duration::from_secs(5)));
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let s = Server::start();
    let body = json!({"username": "admin", "password": "admin123"}).to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        format!(
            "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut interim = [0u8; 25];
    c.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(body.as_bytes()).unwrap();
    let raw = read_all(&mut c);
    assert_eq!(
        status_of(&raw),
        Some(200),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

// ----- chunked bodies ---------------------------------------------------------------------

#[test]
fn a_small_chunked_body_is_decoded_by_the_bridge() {
    let s = Server::start();
    let admin = s.admin_token();
    let body = json!({"username": "chunked-bot"}).to_string();
    let (a, b) = body.split_at(7);
    let req = format!(
        "POST /api/users/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: yes\r\n\r\n",
        a.len(),
        b.len()
    );
    let (status, text) = raw_head(&s, &req);
    assert_eq!(status, Some(201), "{text}");
    assert!(text.contains("chunked-bot"), "{text}");
}

#[test]
fn a_chunk_size_near_2_to_the_64_after_some_body_is_too_large_not_unlimited() {
    let mut s = Server::start();
    let before = rss_kib(s.pid());
    for size in ["ffffffffffffffff", "fffffffffffffffff", "fffffffffff00000"] {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            format!("POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n{size}\r\n")
                .as_bytes(),
        )
        .unwrap();
        // What a wrapped check would let through: 64 MiB more, which the server must not take.
        let block = vec![b'B'; 1 << 20];
        for _ in 0..64 {
            c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            if c.write_all(&block).is_err() {
                break;
            }
        }
        let raw = read_all(&mut c);
        assert_eq!(
            status_of(&raw),
            Some(413),
            "{size}: {}",
            String::from_utf8_lossy(&raw)
        );
    }
    assert!(alive(&mut s));
    let after = rss_kib(s.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

#[test]
fn broken_chunked_bodies_are_400() {
    let s = Server::start();
    for body in [
        "zz\r\nab\r\n0\r\n\r\n", // not hex
        "2\r\nabXX0\r\n\r\n",    // no CRLF after the data
        "\r\n",                  // an empty size line
    ] {
        let (status, text) = raw_head(
            &s,
            &format!("POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}"),
        );
        assert_eq!(status, Some(400), "{body:?}: {text}");
        assert!(text.contains("invalid chunked body"), "{text}");
    }
}

#[test]
fn an_endless_chunk_size_line_is_cut_off_and_memory_stays_flat() {
    let mut s = Server::start();
    let before = rss_kib(s.pid());
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    // 64 MiB of hex digits and no CR (the old decoder buffered all of it): the server answers
    // after the first KiB, then stops reading, and the writes fail or block.
    let digits = vec![b'a'; 1 << 20];
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < 64 << 20 && started.elapsed() < Duration::from_secs(20) {
        c.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        match c.write(&digits) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let raw = read_all(&mut c);
    assert_eq!(
        status_of(&raw),
        Some(400),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert!(
        sent < 64 << 20,
        "the server read all {sent} bytes of a size line"
    );
    let after = rss_kib(s.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert!(alive(&mut s));
    assert!(ping_answers(&s, Duration::from_secs(5)));
}

// ----- slow and stalled clients -----------------------------------------------------------

#[test]
fn slow_bodies_from_many_clients_do_not_take_rest_down() {
    let s = Server::start();
    // More stalled bodies than there are HTTP workers (8): each sends its head and one byte of
    // a 4 KiB body, then nothing.
    let mut slow = Vec::new();
    for i in 0..12 {
        let mut c = connect_from(&format!("127.0.0.{}", 10 + i), &s.addr);
        c.write_all(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n{")
            .unwrap();
        slow.push(c);
    }
    std::thread::sleep(Duration::from_millis(300)); // let them all reach the server
    assert!(ping_answers(&s, Duration::from_secs(5)), "ping stalled");
    assert_eq!(s.login("admin", "admin123").status, 200, "login stalled");
    assert_eq!(
        s.request("GET", "/", None, None).status,
        200,
        "dashboard stalled"
    );
    // Each stalled body is cut off at the body deadline (10 s) with 408.
    for mut c in slow {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let raw = read_all(&mut c);
        assert_eq!(
            status_of(&raw),
            Some(408),
            "{}",
            String::from_utf8_lossy(&raw)
        );
    }
}

#[test]
fn clients_that_never_read_a_large_response_do_not_hold_the_workers() {
    let s = Server::start_with(
        &[
            "--max-message-bytes",
            "1048576",
            "--max-log-bytes-per-second",
            "1073741824",
        ],
        &[],
    );
    let admin = s.admin_token();
    // Log lines that are long once escaped (control characters take six bytes in JSON): a
    // page of them is a response of several MiB.
    let line: String = "\u{7}".repeat(170_000);
    for _ in 0..12 {
        let r = s.post(
            "/api/messages",
            &admin,
            json!({"agent_id": "bulk", "level": "INFO", "content": line}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut stuck = Vec::new();
    for i in 0..12 {
        let mut c = connect_with(&format!("127.0.0.{}", 10 + i), &s.addr, Some(4096));
        c.write_all(
            format!(
                "GET /api/messages?limit=200 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        stuck.push(c); // never read
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(ping_answers(&s, Duration::from_secs(5)), "ping stalled");
    assert_eq!(s.get("/api/users/me", &admin).status, 200);
    drop(stuck);
}

#[test]
fn a_page_of_logs_has_a_byte_budget_and_posted_lines_the_websocket_limit() {
    let s = Server::start_with(&["--max-log-bytes-per-second", "1073741824"], &[]);
    let admin = s.admin_token();
    // POST /api/messages takes what a WebSocket message may hold (--max-message-bytes, 64 KiB
    // by default), not the 1 MiB of other bodies.
    let big = "x".repeat(70_000);
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "a", "content": big}),
    );
    assert_eq!(
        (r.status, r.error()),
        (413, "request body too large".into())
    );
    let line = "\u{1}".repeat(10_000); // 60 KB of JSON each
    for _ in 0..60 {
        let r = s.post(
            "/api/messages",
            &admin,
            json!({"agent_id": "a", "content": line}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = s.get("/api/messages?limit=200", &admin);
    let rows = r.json().as_array().unwrap().len();
    assert!(
        (30..60).contains(&rows),
        "{rows} rows in a {} byte page",
        r.body.len()
    );
    assert!(r.body.len() < 3 << 20, "{} bytes", r.body.len());
}

// ----- connection slots -------------------------------------------------------------------

#[test]
fn one_address_cannot_take_every_connection_slot() {
    let s = Server::start_with(&["--max-connections", "400"], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "neighbour");
    // 256 idle sockets from one address (the default per-address cap) ...
    let hog: Vec<TcpStream> = (0..256)
        .map(|_| connect_from("127.0.0.2", &s.addr))
        .collect();
    // ... the 257th is refused at once ...
    let mut extra = connect_from("127.0.0.2", &s.addr);
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let raw = read_all(&mut extra);
    assert_eq!(
        status_of(&raw),
        Some(503),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // ... while an agent from another address connects.
    let stream = connect_from("127.0.0.3", &s.addr);
    let url = format!("ws://{}/api/ws?token={token}", s.addr);
    let (mut ws, resp) = tungstenite::client(url.as_str(), stream).expect("agent connects");
    assert_eq!(resp.status(), 101);
    ws.send(tungstenite::Message::text(
        r#"{"type":"SYSTEM_LOG","payload":"here"}"#,
    ))
    .unwrap();
    drop(hog);
}

#[test]
fn a_trusted_proxy_is_not_capped_but_the_clients_it_names_are() {
    // 127.0.0.1 is trusted by default: its connections are counted under the client its
    // X-Forwarded-For names.
    let s = Server::start_with(&["--max-connections-per-ip", "2"], &[]);
    let hold = |xff: &str| {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        // An incomplete body keeps the connection open after its head was read.
        c.write_all(
            format!("POST /api/auth/login HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {xff}\r\nContent-Length: 10\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        c
    };
    let _a = hold("10.0.0.1");
    let _b = hold("10.0.0.1");
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = raw_head(
        &s,
        "GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
    );
    assert_eq!(status, Some(503), "the third connection of 10.0.0.1");
    let (status, _) = raw_head(
        &s,
        "GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n",
    );
    assert_eq!(status, Some(200), "another client behind the same proxy");
    // More than 2 connections from the proxy itself are fine.
    let _c = hold("10.0.0.3");
    let _d = hold("10.0.0.4");
    assert!(ping_answers(&s, Duration::from_secs(5)));
}

// ----- workers ----------------------------------------------------------------------------

#[test]
fn rest_keeps_answering_after_its_workers_panic() {
    let s = Server::start_with(&["--fault-injection", "--metrics-token", METRICS], &[]);
    for _ in 0..24 {
        let r = s.request("POST", "/api/test/panic", None, Some("{}"));
        assert_eq!(r.status, 500);
    }
    assert!(ping_answers(&s, Duration::from_secs(5)));
    assert_eq!(s.login("admin", "admin123").status, 200);
    assert_eq!(metric(&s, "echocenter_http_worker_panics_total"), 24.0);
    // Without the flag the route does not exist.
    let plain = Server::start();
    assert_eq!(
        plain.request("POST", "/api/test/panic", None, None).status,
        404
    );
}

// ----- authentication throttling ----------------------------------------------------------

#[test]
fn failed_token_authentications_are_throttled_per_address() {
    let s = Server::start_with(&["--max-auth-failures", "5"], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "good-agent");
    let from = |client: &str, bearer: &str| {
        s.raw_request(
            "GET",
            "/api/users/me",
            &[
                ("Authorization".into(), format!("Bearer {bearer}")),
                ("X-Forwarded-For".into(), client.into()),
            ],
            None,
        )
    };
    for i in 0..5 {
        let r = from("10.1.1.1", &format!("guess-{i}-xxxxxxxxxxxxxxxx"));
        assert_eq!((r.status, r.error()), (401, "invalid token".into()));
    }
    let r = from("10.1.1.1", "guess-6-xxxxxxxxxxxxxxxx");
    assert_eq!(
        (r.status, r.error()),
        (429, "too many failed authentications".into())
    );
    let wait: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Locked means locked: not even a good token is looked at from there ...
    assert_eq!(from("10.1.1.1", &token).status, 429);
    // ... the WebSocket upgrade too ...
    let mut ws = TcpStream::connect(&s.addr).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ws.write_all(
        format!("GET /api/ws?token={token} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let raw = read_all(&mut ws);
    assert_eq!(
        status_of(&raw),
        Some(429),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // ... but its neighbours are not affected.
    assert_eq!(from("10.1.1.2", &token).status, 200);
    let mut agent = s.ws(&token);
    agent.send_json(json!({"type": "SYSTEM_LOG", "payload": "still here"}));
}

#[test]
fn websocket_token_guesses_count_too() {
    let s = Server::start_with(&["--max-auth-failures", "3"], &[]);
    for i in 0..3 {
        let err = s
            .try_ws(&format!("nope-{i}-xxxxxxxxxxxxxxxxxx"))
            .unwrap_err();
        assert!(err.starts_with("401"), "{err}");
    }
    let err = s.try_ws("nope-4-xxxxxxxxxxxxxxxxxx").unwrap_err();
    assert!(err.starts_with("429"), "{err}");
}

#[test]
fn parallel_bad_logins_get_at_most_ten_verifications_and_never_all_the_workers() {
    let s = Server::start();
    let addr = s.addr.clone();
    let body = json!({"username": "admin", "password": "wrong-password"}).to_string();
    let login = {
        let (addr, body) = (addr.clone(), body.clone());
        move || {
            let req = format!(
                "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            status_of(&exchange(&addr, req.as_bytes(), Duration::from_secs(30)))
        }
    };
    let handles: Vec<_> = (0..30)
        .map(|_| {
            let login = login.clone();
            std::thread::spawn(login)
        })
        .collect();
    let statuses: Vec<Option<u16>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let count = |code: u16| statuses.iter().filter(|s| **s == Some(code)).count();
    // Each attempt is taken before its verification, so at most 10 were verified; the rest
    // were refused at once, as over the limit (429) or as more than the password thread
    // takes at a time (503, which does not count as a failure).
    assert!(count(401) <= 10, "{statuses:?}");
    assert_eq!(count(401) + count(429) + count(503), 30, "{statuses:?}");
    // Retried one at a time until locked out: exactly 10 failures in all, then 429.
    let mut failures = count(401);
    loop {
        match login() {
            Some(401) => failures += 1,
            Some(429) => break,
            Some(503) => continue,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(failures, 10);
    // The right password is refused too until the window passes: the limit is per address.
    assert_eq!(s.login("admin", "admin123").status, 429);
}

#[test]
fn a_login_flood_leaves_workers_for_everything_else() {
    let s = Server::start();
    let body = json!({"username": "admin", "password": "wrong-password"}).to_string();
    // 40 addresses × 3 bad logins at once: far more than the password thread can take.
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let (addr, body) = (s.addr.clone(), body.clone());
            std::thread::spawn(move || {
                for _ in 0..3 {
                    let mut c = connect_from(&format!("127.0.1.{}", 10 + i), &addr);
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let req = format!(
                        "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.write_all(req.as_bytes());
                    let _ = read_all(&mut c);
                }
            })
        })
        .collect();
    // Meanwhile REST answers.
    for _ in 0..5 {
        assert!(
            ping_answers(&s, Duration::from_secs(5)),
            "ping stalled behind the logins"
        );
    }
    for h in handles {
        h.join().unwrap();
    }
}

// ----- heads ------------------------------------------------------------------------------

#[test]
fn non_ascii_heads_get_400_not_silence() {
    let s = Server::start();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            "GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Name: caf\u{e9}\r\n\r\n"
                .as_bytes()
                .to_vec(),
            "invalid header value",
        ),
        (
            b"GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Name: \xff\xfe\r\n\r\n".to_vec(),
            "invalid header value",
        ),
        (
            "GET /api/caf\u{e9} HTTP/1.1\r\nHost: x\r\n\r\n"
                .as_bytes()
                .to_vec(),
            "invalid request target",
        ),
    ];
    for (req, error) in cases {
        let raw = exchange(&s.addr, &req, Duration::from_secs(5));
        assert_eq!(
            status_of(&raw),
            Some(400),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        assert!(
            body_of(&raw).contains(error),
            "{}",
            String::from_utf8_lossy(&raw)
        );
    }
    // Percent-encoded, the same path is fine (and simply not found).
    let (status, _) = raw_head(&s, "GET /api/caf%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, Some(404));
}

#[test]
fn head_is_get_without_a_body() {
    let s = Server::start();
    for path in ["/api/ping", "/"] {
        let (status, text) = raw_head(&s, &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(status, Some(200), "HEAD {path}: {text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "HEAD {path} has a body: {text:?}"
        );
    }
    let (status, _) = raw_head(&s, "HEAD /api/users/me HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, Some(401));
}

#[test]
fn the_dashboard_is_served_with_a_content_security_policy() {
    let s = Server::start();
    let r = s.request("GET", "/", None, None);
    assert_eq!(r.status, 200);
    let csp = r.header("Content-Security-Policy").expect("a CSP");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(r.header("Referrer-Policy"), Some("no-referrer"));
    assert_eq!(r.header("X-Frame-Options"), Some("DENY"));
    // Every REST answer says nosniff.
    let r = s.request("GET", "/api/ping", None, None);
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
}

// ----- payloads ---------------------------------------------------------------------------

#[test]
fn arrays_are_not_objects() {
    let s = Server::start();
    let admin = s.admin_token();
    for (path, body) in [
        ("/api/users/agents", "[]"),
        ("/api/users/agents", r#"["sneaky-agent"]"#),
        ("/api/auth/login", r#"["admin","admin123"]"#),
        ("/api/users", r#"["eve","password-123","ADMIN"]"#),
    ] {
        let r = s.request("POST", path, Some(&admin), Some(body));
        assert_eq!(
            (r.status, r.error()),
            (400, "invalid request body".into()),
            "{path} {body}"
        );
    }
    let agents = s.get("/api/users/agents", &admin).json();
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    let (_, token) = s.register_agent(&admin, "arrays");
    let mut agent = s.ws(&token);
    for frame in [
        json!({"type": "SYSTEM_LOG", "payload": ["INFO", "x"], "local_id": "a1"}).to_string(),
        r#"["CHAT", 1, "positional"]"#.to_string(),
    ] {
        agent.send_text(&frame);
        let e = agent.recv_type("ERROR");
        assert_eq!(e["payload"]["code"], "bad_envelope", "{frame}: {e}");
    }
    let logs = s.get("/api/messages", &admin).json();
    assert_eq!(logs.as_array().unwrap().len(), 0, "{logs}");
}

#[test]
fn payloads_nested_deeper_than_64_are_refused() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "deep");
    let mut human = s.ws(&admin);
    let mut agent = s.ws(&token);
    let nested = |depth: usize| -> Value {
        serde_json::from_str(&format!("{}{}", "[".repeat(depth), "]".repeat(depth))).unwrap()
    };
    let deep = format!(
        r#"{{"type":"CHAT","target_id":{agent_id},"local_id":"deep","payload":{}{}}}"#,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    human.send_text(&deep);
    let e = human.recv_type("ERROR");
    assert_eq!(e["payload"]["code"], "bad_envelope", "{e}");
    assert_eq!(e["local_id"], "deep");
    agent.assert_no("CHAT", Duration::from_millis(300));
    human.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": nested(64)}));
    let got = agent.recv_type("CHAT");
    assert_eq!(got["payload"], nested(64));
    // The dev endpoint's stored content follows the same rule.
    let r = s.post(
        "/api/dev/mock/chat",
        &admin,
        json!({"sender_username": "admin", "receiver_username": "deep", "content": nested(65)}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn a_reset_invalidates_every_jwt_issued_before_it() {
    let s = Server::start();
    let admin = s.admin_token();
    let (id, member) = s.create_human(&admin, "before-reset", "MEMBER");
    assert_eq!(s.post("/api/dev/mock/reset", &admin, json!({})).status, 200);
    // A new user takes the same id ...
    let fresh_admin = s.admin_token();
    let (new_id, _) = s.create_human(&fresh_admin, "after-reset", "ADMIN");
    assert_eq!(new_id, id);
    // ... and the old JWTs authenticate as nobody.
    for old in [&member, &admin] {
        let r = s.get("/api/users/me", old);
        assert_eq!((r.status, r.error()), (401, "invalid token".into()));
    }
    assert_eq!(s.get("/api/users/me", &fresh_admin).status, 200);
    // The new key survives a restart.
    let s = s.restart(&[], &[]);
    assert_eq!(s.get("/api/users/me", &fresh_admin).status, 200);
    assert_eq!(s.get("/api/users/me", &member).status, 401);
}

// ----- found by the red team ------------------------------------------------------------

#[test]
fn one_sender_cannot_store_logs_faster_than_its_byte_rate() {
    let s = Server::start_with(&["--max-log-bytes-per-second", "16384"], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "chatty");
    let mut agent = s.ws(&token);
    let line = "x".repeat(8000);
    // The burst is 4 s of the rate (64 KiB): eight 8 KB lines pass, then they are refused.
    let frames: Vec<Value> = (0..20)
        .map(|i| json!({"type": "SYSTEM_LOG", "payload": line, "local_id": format!("l{i}")}))
        .collect();
    agent.send_burst(&frames);
    let mut acked = 0;
    let mut refused = Vec::new();
    while acked + refused.len() < 20 {
        let f = agent.recv_until(|v| v["type"] == "ACK" || v["type"] == "ERROR", "an answer");
        if f["type"] == "ACK" {
            acked += 1;
        } else {
            assert_eq!(f["payload"]["code"], "rate_limited", "{f}");
            refused.push(f["local_id"].as_str().unwrap().to_string());
        }
    }
    assert!((7..=9).contains(&acked), "{acked} stored");
    // REST posts from the same sender share its budget.
    let r = s.post("/api/messages", &token, json!({"content": line}));
    assert_eq!(
        (r.status, r.error()),
        (429, "too many log bytes; retry later".into())
    );
    assert!(r.header("Retry-After").is_some());
    // Others are not affected.
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "a", "content": "hi"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn pings_count_against_the_frame_rate() {
    use tungstenite::Message;
    let s = Server::start_with(&["--max-frames-per-second", "5"], &[]);
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    for _ in 0..60 {
        h.inner.send(Message::Ping(vec![1, 2, 3].into())).unwrap();
    }
    let mut pongs = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match h.inner.read() {
            Ok(Message::Pong(_)) => pongs += 1,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
    // The burst allowance (2 s of 5/s) and a little refill: nowhere near 60.
    assert!((8..=20).contains(&pongs), "{pongs} pongs for 60 pings");
}

#[test]
fn a_flood_of_empty_fragments_is_closed_with_1009() {
    let s = Server::start_with(&["--metrics-token", METRICS], &[]);
    let admin = s.admin_token();
    let mut h = s.ws(&admin);
    // The start of a fragmented text message, then empty continuations (FIN 0, opcode 0,
    // masked, length 0: six bytes each): tungstenite takes them without a message for the
    // session to count, so they would cost CPU for ever. 8 MiB of them.
    h.inner
        .write(tungstenite::Message::Frame(
            tungstenite::protocol::frame::Frame::message(
                b"{".to_vec(),
                tungstenite::protocol::frame::coding::OpCode::Data(
                    tungstenite::protocol::frame::coding::Data::Text,
                ),
                false,
            ),
        ))
        .unwrap();
    h.inner.flush().unwrap();
    let empty_continuations: Vec<u8> = [0x00u8, 0x80, 1, 2, 3, 4].repeat((8 << 20) / 6);
    let raw = h.inner.get_mut().try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut raw = raw;
        raw.set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = raw.write_all(&empty_continuations);
    });
    assert_eq!(h.recv_close(), Some(1009));
    assert_eq!(
        metric(&s, "echocenter_limit_trips_total{limit=\"fragment_flood\"}"),
        1.0
    );
    sender.join().unwrap();
    // A large message cut into many small fragments is still fine.
    let mut h = s.ws(&admin);
    let text = json!({"type": "SYSTEM_LOG", "payload": "x".repeat(30_000)}).to_string();
    let bytes = text.as_bytes();
    for (i, piece) in bytes.chunks(16).enumerate() {
        let opcode = if i == 0 {
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            )
        } else {
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Continue,
            )
        };
        let last = (i + 1) * 16 >= bytes.len();
        h.inner
            .write(tungstenite::Message::Frame(
                tungstenite::protocol::frame::Frame::message(piece.to_vec(), opcode, last),
            ))
            .unwrap();
    }
    h.inner.flush().unwrap();
    let echoed = h.recv_type("SYSTEM_LOG");
    assert_eq!(echoed["payload"]["content"].as_str().unwrap().len(), 30_000);
}

#[test]
fn under_pressure_a_slow_head_gets_two_seconds_not_ten() {
    let s = Server::start_with(
        &["--max-connections", "20", "--trusted-proxies", "none"],
        &[],
    );
    // Fifteen idle sockets: three quarters of the slots.
    let idle: Vec<TcpStream> = (0..15)
        .map(|i| connect_from(&format!("127.0.2.{}", 10 + i), &s.addr))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut late = connect_from("127.0.3.1", &s.addr);
    late.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let raw = read_all(&mut late);
    assert_eq!(
        status_of(&raw),
        Some(408),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    drop(idle);
}

#[test]
fn slow_readers_of_big_pages_cannot_hold_unbounded_memory() {
    let mut s = Server::start_with(
        &[
            "--max-message-bytes",
            "1048576",
            "--max-log-bytes-per-second",
            "1073741824",
            "--metrics-token",
            METRICS,
        ],
        &[],
    );
    let admin = s.admin_token();
    // A page of 1.4 MB.
    let line = "y".repeat(700_000);
    for _ in 0..3 {
        let r = s.post(
            "/api/messages",
            &admin,
            json!({"agent_id": "bulk", "content": line}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let before = rss_kib(s.pid());
    // 200 clients × 1.4 MB (2 MiB of buffer each) asked for, none read: the budget
    // (256 MiB) holds.
    let stuck: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut c = connect_with(&format!("127.0.4.{}", 10 + i % 200), &s.addr, Some(1024));
            c.write_all(
                format!("GET /api/messages?limit=200 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            c
        })
        .collect();
    s.wait_for(
        "some pages refused for memory",
        Duration::from_secs(20),
        || {
            metric(
                &s,
                "echocenter_limit_trips_total{limit=\"response_memory\"}",
            ) > 0.0
        },
    );
    let after = rss_kib(s.pid());
    assert!(
        after < before + 400 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert!(ping_answers(&s, Duration::from_secs(5)));
    drop(stuck);
    assert!(alive(&mut s));
}
