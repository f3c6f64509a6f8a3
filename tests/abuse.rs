//! Issue #6, hostile conditions: clients that do not read, do not finish their request, send
//! huge heads, open too many sockets, exhaust the process's file descriptors, or vanish. The
//! server must shed them (with the SPEC's status or close code) and keep serving everyone else.
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

const METRICS: &str = "abuse-metrics-token-123456";

fn metric(s: &Server, name: &str) -> f64 {
    let r = s.get("/metrics", METRICS);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}", r.body))
}

// ----- (a) slow consumer -------------------------------------------------------------------

#[test]
fn a_human_that_never_reads_is_closed_with_1013_while_everyone_else_keeps_going() {
    let s = Server::start_with(
        &[
            "--max-log-bytes-per-second",
            "1073741824",
            "--metrics-token",
            METRICS,
            "--max-frames-per-second",
            "100000",
            "--sync",
            "normal",
        ],
        &[],
    );
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "reader", "MEMBER");
    let (_, agent_token) = s.register_agent(&admin, "firehose");
    let mut agent = s.ws(&agent_token);
    // The slow consumer: connected, never reads.
    let mut sleeper = s.ws(&admin);
    // The good consumer reads everything, on its own thread.
    let mut good = s.ws(&member);
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let good_thread = std::thread::spawn(move || {
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Some(v) = good.recv_within(Duration::from_millis(200)) else {
                continue;
            };
            if v["type"] != "SYSTEM_LOG" {
                continue;
            }
            if v["payload"]["content"] == "done" {
                return ids;
            }
            ids.push(v["id"].as_i64().unwrap());
            counter.fetch_add(1, Ordering::SeqCst);
        }
        panic!("the good consumer never saw the end; it got {}", ids.len());
    });

    let content = "y".repeat(60 * 1024);
    let mut acked = Vec::new();
    let mut slowest_ack = Duration::ZERO;
    let mut send = |i: usize, agent: &mut Ws, acked: &mut Vec<i64>| {
        // Stay within 32 frames of the good consumer, so that only the sleeper lags.
        let wait = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::SeqCst) + 32 < i {
            assert!(Instant::now() < wait, "the good consumer stalled at {i}");
            std::thread::sleep(Duration::from_millis(2));
        }
        let local_id = format!("f{i}");
        let t = Instant::now();
        agent.send_json(json!({"type": "SYSTEM_LOG", "payload": {"level": "DEBUG", "content": content}, "local_id": local_id}));
        let ack = agent.recv_type("ACK");
        slowest_ack = slowest_ack.max(t.elapsed());
        assert_eq!(ack["local_id"], local_id.as_str());
        acked.push(ack["id"].as_i64().unwrap());
    };
    let mut i = 0;
    while metric(&s, "echocenter_slow_consumer_closes_total") < 1.0 {
        assert!(i < 1000, "60 MB sent and the sleeper was never closed");
        for _ in 0..10 {
            send(i, &mut agent, &mut acked);
            i += 1;
        }
    }
    let tripped_at = i;
    // The flood goes on after the close; nothing else is affected.
    for _ in 0..50 {
        send(i, &mut agent, &mut acked);
        i += 1;
    }
    agent.send_json(json!({"type": "SYSTEM_LOG", "payload": "done", "local_id": "done"}));
    agent.recv_type("ACK");
    let seen = good_thread.join().unwrap();
    assert_eq!(
        seen.len(),
        acked.len(),
        "the good consumer missed logs ({tripped_at} sent when the sleeper was closed)"
    );
    assert_eq!(seen, acked, "every log, in order");
    assert!(
        slowest_ack < Duration::from_secs(5),
        "the sender was held up for {slowest_ack:?}"
    );
    assert_eq!(metric(&s, "echocenter_slow_consumer_closes_total"), 1.0);

    // Now the sleeper reads: what was written before, then the 1013 close.
    assert_eq!(sleeper.recv_close(), Some(1013));
    // One warning line for it.
    let log = s.stderr();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("slow consumer"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}

// ----- (b) slow-loris -----------------------------------------------------------------------

#[test]
fn a_request_head_that_never_ends_is_cut_off_after_10_s_while_others_are_served() {
    let s = Server::start_with(&["--metrics-token", METRICS], &[]);
    let admin = s.admin_token();
    let started = Instant::now();
    // Twenty clients send half a head and stop.
    let mut stalled: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            c.write_all(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            c
        })
        .collect();
    // One trickles a byte every 500 ms: a per-read timeout would never fire for it, only a
    // deadline on the whole head does. (The sleep is the trickle under test.)
    let mut trickler = TcpStream::connect(&s.addr).unwrap();
    let mut trickle_writer = trickler.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = trickle_writer.write_all(b"GET /api/ping HTTP/1.1\r\n");
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(500));
            if trickle_writer.write_all(b"X").is_err() {
                return;
            }
        }
    });
    // Meanwhile everybody else is served promptly.
    for _ in 0..5 {
        let t = Instant::now();
        let r = s.request("GET", "/api/ping", None, None);
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let t = Instant::now();
    let mut ws = s.ws(&admin);
    ws.send_json(json!({"type": "SYSTEM_LOG", "payload": "still here"}));
    ws.recv_type("SYSTEM_LOG");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(s.get("/api/users/me", &admin).status, 200);

    // Each stalled client gets a 408 (or just a closed connection) at the head deadline.
    for c in stalled.iter_mut().chain(std::iter::once(&mut trickler)) {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let got = read_all(c);
        let elapsed = started.elapsed();
        if !got.is_empty() {
            assert_eq!(
                status_of(&got),
                Some(408),
                "{}",
                String::from_utf8_lossy(&got)
            );
        }
        assert!(
            elapsed >= Duration::from_millis(9500),
            "cut off after {elapsed:?}, before the 10 s deadline"
        );
        assert!(
            elapsed < Duration::from_secs(16),
            "still open after {elapsed:?}"
        );
    }
    assert!(metric(&s, "echocenter_limit_trips_total{limit=\"head_timeout\"}") >= 21.0);
}

// ----- (c) huge heads -----------------------------------------------------------------------

#[test]
fn a_request_head_over_8_kib_gets_431() {
    let s = Server::start();
    // One big header, sent at once.
    let head = format!(
        "GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let got = exchange(&s.addr, head.as_bytes(), Duration::from_secs(15));
    assert_eq!(
        status_of(&got),
        Some(431),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let body: Value = serde_json::from_str(&body_of(&got)).unwrap();
    assert_eq!(body, json!({"error": "request header fields too large"}));
    // Many small headers, written in pieces, with no end in sight.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for i in 0..60 {
        if c.write_all(format!("X-H{i}: {}\r\n", "b".repeat(200)).as_bytes())
            .is_err()
        {
            break;
        }
    }
    let got = read_all(&mut c);
    assert_eq!(
        status_of(&got),
        Some(431),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A WebSocket upgrade with a huge head is refused the same way.
    let head = format!(
        "GET /api/ws?token=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nCookie: {}\r\n\r\n",
        "c".repeat(9000)
    );
    let got = exchange(&s.addr, head.as_bytes(), Duration::from_secs(15));
    assert_eq!(
        status_of(&got),
        Some(431),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A head just under the limit is served, and so is everyone after.
    let head = format!(
        "GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fits: {}\r\n\r\n",
        "d".repeat(7 * 1024)
    );
    let got = exchange(&s.addr, head.as_bytes(), Duration::from_secs(15));
    assert_eq!(
        status_of(&got),
        Some(200),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(s.request("GET", "/api/ping", None, None).status, 200);
}

// ----- (d) connections per address ----------------------------------------------------------

#[test]
fn the_per_address_cap_refuses_the_fourth_connection_with_503_until_one_closes() {
    // Loopback is a trusted proxy by default (exempt from the per-address cap): count it.
    let s = Server::start_with(
        &["--max-connections-per-ip", "3", "--trusted-proxies", "none"],
        &[],
    );
    let admin = s.admin_token();
    // The login's own connection holds a slot until the server has finished closing it,
    // a moment after the client has read the answer: wait for each slot rather than race.
    let admitted = || {
        let mut ws = None;
        s.wait_for("a free slot", Duration::from_secs(10), || {
            ws = s.try_ws(&admin).ok();
            ws.is_some()
        });
        ws.unwrap()
    };
    let a = admitted();
    let _b = admitted();
    let _c = admitted();
    let r = s.request("GET", "/api/ping", None, None);
    assert_eq!(
        (r.status, r.error().as_str()),
        (503, "server at connection limit")
    );
    let err = s.try_ws(&admin).expect_err("a fourth WebSocket is refused");
    assert!(err.starts_with("503"), "{err}");
    // A raw socket counts too: it is refused before it says anything.
    let got = exchange(&s.addr, b"", Duration::from_secs(5));
    assert_eq!(
        status_of(&got),
        Some(503),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // One leaves; a new one is admitted (once the server has noticed).
    a.close();
    let _d = admitted();
    // ... and the cap still holds.
    let r = s.request("GET", "/api/ping", None, None);
    assert_eq!(r.status, 503, "{}", r.body);
}

// ----- (e) out of file descriptors ----------------------------------------------------------

/// One request to `addr`; None if the connection failed or no status line came back (the
/// harness's client would panic, and failing is what this section provokes).
fn try_request(addr: &str, req: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    c.write_all(req.as_bytes()).ok()?;
    let got = read_all(&mut c);
    Some((status_of(&got)?, body_of(&got)))
}

#[test]
fn the_server_survives_running_out_of_file_descriptors_with_idle_clients() {
    exhaust_descriptors_then_recover(false);
}

#[test]
fn the_server_survives_running_out_of_file_descriptors_with_requests_in_flight() {
    exhaust_descriptors_then_recover(true);
}

/// Opens a hundred connections to a server limited to 64 descriptors (if `with_requests`,
/// every other one sends a complete request, so that the HTTP layer runs out too, and the
/// rest a request whose body never arrives, which holds its descriptor), closes them, and
/// expects full service back.
fn exhaust_descriptors_then_recover(with_requests: bool) {
    let server = Server::start_with_nofile(64);
    let ping = "GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(
        try_request(&server.addr, ping).map(|r| r.0),
        Some(200),
        "{}",
        server.stderr()
    );
    // A hundred clients: more sockets than the process may hold.
    let mut crowd = Vec::new();
    let stalled = "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{";
    for i in 0..100 {
        let mut c = TcpStream::connect(&server.addr).unwrap();
        if with_requests {
            let _ = c.write_all(if i % 2 == 0 { ping } else { stalled }.as_bytes());
        }
        crowd.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stderr().contains("accept failed") {
        assert!(
            Instant::now() < deadline,
            "descriptors never ran out (the test proves nothing): {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(crowd);
    // Service comes back: REST (through the proxy and the HTTP layer), a login (the
    // database), and a WebSocket.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if try_request(&server.addr, ping).map(|r| r.0) == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/api/ping is not served again after the descriptors came back: {:?}\n{}",
            try_request(&server.addr, ping),
            server
                .stderr()
                .lines()
                .take(12)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = json!({"username": "admin", "password": "admin123"}).to_string();
    let login = try_request(
        &server.addr,
        &format!(
            "POST /api/auth/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("login answered");
    assert_eq!(login.0, 200, "{}", login.1);
    let jwt: Value = serde_json::from_str(&login.1).unwrap();
    let jwt = jwt["token"].as_str().unwrap();
    let stream = TcpStream::connect(&server.addr).unwrap();
    let url = format!("ws://{}/api/ws?token={jwt}", server.addr);
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("WebSocket after recovery");
    ws.send(Message::text(r#"{"type":"SYSTEM_LOG","payload":"back"}"#))
        .unwrap();
    let echoed = ws.read().unwrap();
    assert!(echoed.to_string().contains("back"), "{echoed}");
    let mut server = server;
    assert!(
        server.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the process is still running"
    );
}

// ----- (f) vanished and half-open clients ---------------------------------------------------

fn presence_of(h: &mut Ws, user: i64, online: bool) -> Value {
    h.recv_until(
        |v| {
            v["type"] == "PRESENCE"
                && v["payload"]["user_id"] == user
                && v["payload"]["online"] == online
        },
        &format!("PRESENCE online:{online} for user {user}"),
    )
}

fn listed_online(s: &Server, admin: &str, user: i64) -> bool {
    s.get("/api/users/agents", admin)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == user)
        .map(|u| u["online"] == true)
        .unwrap()
}

#[test]
fn a_client_that_disappears_without_a_close_frame_goes_offline() {
    let s = Server::start();
    let admin = s.admin_token();
    let (quiet_id, quiet) = s.register_agent(&admin, "vanishes-quietly");
    let (rude_id, rude) = s.register_agent(&admin, "vanishes-rudely");
    let mut h = s.ws(&admin);

    // Dropped socket, nothing unread: the server sees end-of-stream, no close frame.
    let a = s.ws(&quiet);
    presence_of(&mut h, quiet_id, true);
    assert!(listed_online(&s, &admin, quiet_id));
    drop(a);
    presence_of(&mut h, quiet_id, false);
    assert!(!listed_online(&s, &admin, quiet_id));

    // Dropped with unread data in the socket: the kernel resets the connection.
    let mut b = s.ws(&rude);
    presence_of(&mut h, rude_id, true);
    b.send_json(json!({"type": "SYSTEM_LOG", "payload": "about to vanish", "local_id": "v"}));
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(b.inner.get_ref().peek(&mut byte), Ok(n) if n > 0) {
        assert!(Instant::now() < deadline, "the ACK never arrived");
    }
    drop(b);
    presence_of(&mut h, rude_id, false);
    assert!(!listed_online(&s, &admin, rude_id));
    // The server is none the worse.
    let mut again = s.ws(&rude);
    again.send_json(json!({"type": "SYSTEM_LOG", "payload": "back", "local_id": "w"}));
    again.recv_type("ACK");
}

/// A WebSocket handshake by hand; the stream is returned right after the 101 head, unread.
fn raw_ws(addr: &str, token: &str) -> TcpStream {
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.write_all(
        format!(
            "GET /api/ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            raw.read(&mut byte).unwrap(),
            1,
            "connection closed in the head"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    raw
}

/// The (unmasked, short) frames a server wrote, as (opcode, payload).
fn server_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        let len = (rest[1] & 0x7f) as usize;
        assert!(
            len < 126 && rest.len() >= 2 + len,
            "unexpected frame {rest:?}"
        );
        frames.push((opcode, rest[2..2 + len].to_vec()));
        rest = &rest[2 + len..];
    }
    frames
}

fn close_code(frames: &[(u8, Vec<u8>)]) -> u16 {
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .unwrap_or_else(|| panic!("no close frame: {frames:?}"));
    u16::from_be_bytes([close.1[0], close.1[1]])
}

#[test]
fn a_half_open_connection_is_closed_by_the_liveness_timer() {
    let s = Server::start_with(
        &["--ws-ping-interval", "200ms", "--ws-idle-timeout", "1s"],
        &[],
    );
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "half-open");
    // The observer keeps reading, which answers the server's pings: it stays alive.
    let mut h = s.ws(&admin);
    // After the handshake this client neither reads nor writes, nor closes its socket.
    let mut raw = raw_ws(&s.addr, &token);
    let opened = Instant::now();
    presence_of(&mut h, agent_id, true);
    // Pings go unanswered; after the idle timeout the server gives up on the connection and
    // the agent goes offline (the PRESENCE is sent once the connection has left the registry).
    presence_of(&mut h, agent_id, false);
    let elapsed = opened.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}, before the 1 s idle timeout"
    );
    assert!(!listed_online(&s, &admin, agent_id));
    // What the client would have read: pings, then a close frame with 1011, then the end.
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let frames = server_frames(&read_all(&mut raw));
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "no ping: {frames:?}"
    );
    assert_eq!(close_code(&frames), 1011);
}

#[test]
fn a_client_that_never_answers_the_close_of_a_revoked_session_still_goes_offline() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "deaf");
    let mut h = s.ws(&admin);
    let mut raw = raw_ws(&s.addr, &token);
    presence_of(&mut h, agent_id, true);
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{agent_id}/token"),
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(r.status, 200);
    // The server closes with 1008; this client never answers (nor closes its socket). After
    // the close handshake's grace period the server must drop it all the same.
    presence_of(&mut h, agent_id, false);
    assert!(!listed_online(&s, &admin, agent_id));
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(close_code(&server_frames(&read_all(&mut raw))), 1008);
}
