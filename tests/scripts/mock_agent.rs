//! mock-agent.py: streams to humans, answers the Butler plainly, exits on signals, and
//! reconnects with backoff when the server restarts.

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{agents, command, history, logs, python, run, script, seed, stderr, url};

/// Stops (SIGTERM, then SIGKILL after 5 s) and reaps a child on drop, so a failing test leaves
/// no process behind (and a server gets to remove its private socket directory).
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.0.take().unwrap();
        wait_child(&mut child, timeout)
    }
    fn running(&mut self) -> bool {
        self.0.as_mut().unwrap().try_wait().unwrap().is_none()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Ok(None) = c.try_wait() {
                let _ = Command::new("kill").arg(c.id().to_string()).status();
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent_online(s: &Server, admin: &str, name: &str) -> bool {
    agents(s, admin)
        .iter()
        .any(|a| a["username"] == name && a["online"] == true)
}

/// Starts scripts/mock-agent.py with `token` against `base_url`; its stderr goes to `log`.
fn start_mock_agent(base_url: &str, token: &str, log: &Path) -> Guard {
    let err = std::fs::File::create(log).unwrap();
    let child = command(python())
        .arg(script("mock-agent.py"))
        .arg("--chunk-delay")
        .arg("0")
        .env("ECHOCENTER_URL", base_url)
        .env("ECHOCENTER_AGENT_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start mock-agent.py");
    Guard(Some(child))
}

fn wait_online(s: &Server, admin: &str, name: &str, online: bool, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent_online(s, admin, name) != online {
        assert!(
            Instant::now() < deadline,
            "{name} did not become {} within 30 s; agent log:\n{}",
            if online { "online" } else { "offline" },
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a CHAT from a human connection to the agent and returns the agent's reply frames
/// (CHAT_STREAM / CHAT / CHAT_STREAM_END from the agent), up to and including the END.
fn ask(human: &mut Ws, agent_id: i64, text: &str) -> Vec<Value> {
    human.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": text}));
    let mut frames = Vec::new();
    human.recv_until(
        |v| {
            let from_agent = v["sender_id"] == agent_id;
            let kind = v["type"].as_str().unwrap_or_default();
            if from_agent && matches!(kind, "CHAT_STREAM" | "CHAT" | "CHAT_STREAM_END") {
                frames.push(v.clone());
            }
            from_agent && kind == "CHAT_STREAM_END"
        },
        "the mock agent's streamed reply",
    );
    frames
}

/// Checks the streaming contract: ≥2 chunks, then one CHAT with the same stream_id whose
/// payload is the chunks joined, then CHAT_STREAM_END; returns the final CHAT.
fn assert_streamed_reply(frames: &[Value], question: &str) -> Value {
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    let n = kinds.len();
    assert!(n >= 4, "expected chunks + CHAT + END, got {kinds:?}");
    assert!(
        kinds[..n - 2].iter().all(|k| *k == "CHAT_STREAM"),
        "chunks must come first: {kinds:?}"
    );
    assert_eq!(&kinds[n - 2..], ["CHAT", "CHAT_STREAM_END"], "{kinds:?}");
    let stream_id = frames[0]["stream_id"]
        .as_str()
        .expect("chunks carry a stream_id");
    assert!(!stream_id.is_empty());
    for f in frames {
        assert_eq!(f["stream_id"], stream_id, "one stream_id throughout: {f}");
    }
    let joined: String = frames[..n - 2]
        .iter()
        .map(|f| f["payload"].as_str().unwrap())
        .collect();
    let last = frames[n - 2].clone();
    assert_eq!(
        last["payload"],
        joined.as_str(),
        "final CHAT = the chunks joined"
    );
    assert!(
        joined.contains(question),
        "the reply quotes the question: {joined}"
    );
    assert!(last["id"].as_i64().is_some(), "the final CHAT is stored");
    last
}

#[test]
fn mock_agent_streams_to_humans_answers_the_butler_and_exits_on_sigterm() {
    let s = Server::start();
    let admin = s.admin_token();
    let out = seed(&s);
    assert!(out.status.success(), "{}", stderr(&out));
    let agent_id = agents(&s, &admin)
        .iter()
        .find(|a| a["username"] == "Storage-Custodian")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let log = s.dir.path().join("agent.log");
    let mut agent = start_mock_agent(&url(&s), "mock-storage-custodian-token", &log);
    wait_online(&s, &admin, "Storage-Custodian", true, &log);

    // On connect it reported to the dashboard.
    let mut online_logs = Vec::new();
    s.wait_for("the agent's SYSTEM_LOG", Duration::from_secs(10), || {
        online_logs = logs(&s, &admin, "&agent_id=Storage-Custodian&level=SUCCESS");
        !online_logs.is_empty()
    });
    assert!(
        online_logs[0]["content"]
            .as_str()
            .unwrap()
            .contains("online"),
        "{online_logs:?}"
    );

    // A human gets chunks, the final CHAT with the same stream_id, then the END.
    let mut human = s.ws(&admin);
    let frames = ask(&mut human, agent_id, "How full are the disks?");
    let last = assert_streamed_reply(&frames, "How full are the disks?");
    // Only the final CHAT is stored, with its stream_id.
    let rows = history(&s, &admin, agent_id);
    let stored = rows
        .iter()
        .find(|r| r["id"] == last["id"])
        .expect("stored reply");
    assert_eq!(stored["stream_id"], last["stream_id"]);
    assert_eq!(stored["payload"], last["payload"]);
    s.wait_for(
        "the 'Reply delivered' log row",
        Duration::from_secs(10),
        || {
            logs(
                &s,
                &admin,
                "&agent_id=Storage-Custodian&q=Reply%20delivered%20to%20admin",
            )
            .len()
                == 1
        },
    );

    // Another agent's CHAT is ignored (two mock agents must not talk forever) ...
    let (_, peer_token) = s.register_agent(&admin, "Peer");
    let mut peer = s.ws(&peer_token);
    peer.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "ping"}));
    // ... while the agent keeps serving humans (frames are handled in order, so by the time
    // this reply is complete the peer's CHAT has been processed).
    let frames = ask(&mut human, agent_id, "second question");
    assert_streamed_reply(&frames, "second question");
    peer.assert_no("CHAT", Duration::from_millis(300));
    peer.assert_no("CHAT_STREAM", Duration::from_millis(10));

    // The Butler gets one plain CHAT, no stream.
    let butler_token = s.butler_token(&admin);
    let mut butler = s.ws(&butler_token);
    butler.send_json(json!({"type": "CHAT", "target_id": agent_id, "payload": "rotate logs"}));
    let reply = butler.recv_until(
        |v| {
            assert_ne!(v["type"], "CHAT_STREAM", "no stream for the Butler: {v}");
            v["type"] == "CHAT" && v["sender_id"] == agent_id
        },
        "the agent's CHAT to the Butler",
    );
    assert!(reply.get("stream_id").is_none(), "{reply}");
    assert!(
        reply["payload"].as_str().unwrap().contains("rotate logs"),
        "{reply}"
    );
    butler.assert_no("CHAT_STREAM_END", Duration::from_millis(200));

    // SIGTERM: a clean exit, and the server sees it go.
    assert!(agent.running());
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    wait_online(&s, &admin, "Storage-Custodian", false, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("mock-storage-custodian-token"),
        "token in the log: {text}"
    );
}

#[test]
fn mock_agent_exits_on_sigint_and_rejects_a_bad_token() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "Solo");
    let log = s.dir.path().join("solo.log");
    let mut agent = start_mock_agent(&url(&s), &token, &log);
    wait_online(&s, &admin, "Solo", true, &log);
    agent.signal("INT");
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    wait_online(&s, &admin, "Solo", false, &log);

    // A token the server rejects is final: exit 3, no retry loop.
    let log = s.dir.path().join("bad.log");
    let mut bad = start_mock_agent(&url(&s), "not-a-valid-token-at-all", &log);
    let status = bad.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(3),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // No token at all: usage error.
    let out = run({
        let mut c = command(python());
        c.arg(script("mock-agent.py"))
            .env("ECHOCENTER_URL", url(&s));
        c
    });
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

fn wait_for_log(log: &Path, needle: &str, after: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.len() > after && text[after..].contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent log never showed {needle:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the log query returns exactly `n` rows.
fn wait_rows(s: &Server, admin: &str, query: &str, n: usize, agent_log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = logs(s, admin, query);
        if rows.len() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} rows for {query}, have {rows:#?}\nagent log:\n{}\nserver logs:{}",
            std::fs::read_to_string(agent_log).unwrap_or_default(),
            server_logs(s.dir.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every `*.log` file of a test directory, for failure messages.
fn server_logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            out.push_str(&format!("\n== {}\n{text}", p.display()));
        }
    }
    out
}

#[test]
fn mock_agent_reconnects_with_backoff_when_the_server_restarts() {
    let mut s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "Phoenix");
    let log = s.dir.path().join("phoenix.log");
    let mut agent = start_mock_agent(&url(&s), &token, &log);
    wait_online(&s, &admin, "Phoenix", true, &log);
    // Its "online" row is stored (so the count below does not depend on a race).
    wait_rows(&s, &admin, "&agent_id=Phoenix&level=SUCCESS", 1, &log);

    // 1. A graceful restart (close 1001), same address and database.
    let seen = std::fs::read_to_string(&log).unwrap().len();
    let status = s.terminate();
    assert!(status.success());
    // The agent notices and keeps retrying while nothing listens.
    wait_for_log(&log, "disconnected", seen);
    wait_for_log(&log, "cannot connect", seen);
    assert!(
        agent.running(),
        "the agent must not give up while the server is down"
    );
    s.restart_on_same_address(&[], &[]);
    wait_online(&s, &admin, "Phoenix", true, &log);
    let mut human = s.ws(&admin);
    let frames = ask(&mut human, agent_id, "still there?");
    assert_streamed_reply(&frames, "still there?");
    drop(human);

    // Both sessions' "online" rows are stored before the crash below.
    wait_rows(&s, &admin, "&agent_id=Phoenix&level=SUCCESS", 2, &log);

    // 2. A crash (SIGKILL: no close frame), then the server comes back.
    let seen = std::fs::read_to_string(&log).unwrap().len();
    s.kill9();
    wait_for_log(&log, "disconnected", seen);
    s.restart_on_same_address(&[], &[]);
    wait_online(&s, &admin, "Phoenix", true, &log);
    let mut human = s.ws(&admin);
    let frames = ask(&mut human, agent_id, "and now?");
    assert_streamed_reply(&frames, "and now?");

    // Each session announced itself on the dashboard (stored across restarts).
    let online = logs(&s, &admin, "&agent_id=Phoenix&level=SUCCESS");
    assert_eq!(online.len(), 3, "{online:#?}");
    assert!(
        online[0]["content"]
            .as_str()
            .unwrap()
            .contains("reconnected"),
        "{online:?}"
    );

    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}
