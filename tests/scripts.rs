//! The shell-first tools in `scripts/`, run as an operator would, against a real server:
//! register-agent.sh, seed-demo.sh, mock-agent.py, demo.sh and the systemd unit.
//!
//! Needs `curl`, `bash` and `python3` on PATH, and `ECHOCENTER_TEST_PYTHON` pointing to a
//! Python with websocket-client (scripts/test.sh provides it).
mod common;
use common::*;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const AGENTS: [(&str, &str); 4] = [
    ("Observer", "mock-observer-token"),
    ("Diagnoser", "mock-diagnoser-token"),
    ("Guardian", "mock-guardian-token"),
    ("Storage-Custodian", "mock-storage-custodian-token"),
];

fn python() -> String {
    std::env::var("ECHOCENTER_TEST_PYTHON").expect(
        "ECHOCENTER_TEST_PYTHON is not set: run the suite with scripts/test.sh, which makes a \
         venv with websocket-client (or point it at a python that can `import websocket`)",
    )
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn url(s: &Server) -> String {
    format!("http://{}", s.addr)
}

/// A command for a script with the operator's environment variables cleared, so that the
/// machine running the tests cannot change the outcome.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "ECHOCENTER_URL",
        "ECHOCENTER_ADMIN_USER",
        "ECHOCENTER_ADMIN_PASSWORD",
        "ECHOCENTER_AGENT_TOKEN",
        "ECHOCENTER_BIN",
        "ECHOCENTER_PYTHON",
        "ECHOCENTER_DEMO_PORT",
        "ECHOCENTER_DEMO_HOST",
        "ECHOCENTER_DEMO_KEEP",
        "ECHOCENTER_ENV",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("run script")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn register(s_url: &str, password: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = command(script("register-agent.sh"));
    cmd.args(args).env("ECHOCENTER_URL", s_url);
    if let Some(p) = password {
        cmd.env("ECHOCENTER_ADMIN_PASSWORD", p);
    }
    run(cmd)
}

fn seed(s: &Server) -> Output {
    let mut cmd = command(script("seed-demo.sh"));
    cmd.env("ECHOCENTER_URL", url(s))
        .env("ECHOCENTER_ADMIN_PASSWORD", "admin123");
    run(cmd)
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

fn agents(s: &Server, admin: &str) -> Vec<Value> {
    let r = s.get("/api/users/agents", admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn agent_online(s: &Server, admin: &str, name: &str) -> bool {
    agents(s, admin)
        .iter()
        .any(|a| a["username"] == name && a["online"] == true)
}

fn logs(s: &Server, admin: &str, query: &str) -> Vec<Value> {
    let r = s.get(&format!("/api/messages?limit=200{query}"), admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn history(s: &Server, jwt: &str, peer: i64) -> Vec<Value> {
    let r = s.get(&format!("/api/chat/history/{peer}"), jwt);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
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

// ----------------------------------------------------------------------------------------
// register-agent.sh
// ----------------------------------------------------------------------------------------

#[test]
fn register_agent_prints_only_a_working_token() {
    let s = Server::start();
    let admin = s.admin_token();

    let out = register(&url(&s), Some("admin123"), &["shell-bot"]);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    let printed = stdout(&out);
    assert!(printed.ends_with('\n'), "one line: {printed:?}");
    let token = printed.trim_end_matches('\n');
    assert!(
        !token.contains('\n'),
        "only the token on stdout: {printed:?}"
    );
    assert!(
        token.starts_with("ec_") && token.len() == 67,
        "a generated token: {token:?}"
    );

    // The token authenticates as the new agent, over REST and over the WebSocket.
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": token}),
    );
    assert_eq!(r.json()["agent_name"], "shell-bot", "{}", r.body);
    let r = s.post(
        "/api/messages",
        token,
        json!({"level": "INFO", "content": "hello from cron"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["agent_id"], "shell-bot");
    let mut ws = s.ws(token);
    ws.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "hi", "local_id": "a"}));
    assert_eq!(ws.recv_type("ACK")["local_id"], "a");

    // Without ECHOCENTER_ADMIN_PASSWORD the development default is used, with a note;
    // --description and --token are passed through.
    let out = register(
        &format!("{}/", url(&s)),
        None,
        &[
            "--description",
            "nightly jobs",
            "--token",
            "cron-bot-token-0123456789",
            "cron-bot",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "cron-bot-token-0123456789\n");
    assert!(
        stderr(&out).contains("ECHOCENTER_ADMIN_PASSWORD"),
        "a note about the default password: {}",
        stderr(&out)
    );
    let cron = agents(&s, &admin)
        .into_iter()
        .find(|a| a["username"] == "cron-bot")
        .expect("cron-bot listed");
    assert_eq!(cron["description"], "nightly jobs");
}

#[test]
fn register_agent_exit_codes_tell_failures_apart() {
    let s = Server::start();
    let u = url(&s);

    let bad = register(&u, Some("wrong-password"), &["bot-a"]);
    assert_eq!(
        bad.status.code(),
        Some(4),
        "bad credentials: {}",
        stderr(&bad)
    );
    assert_eq!(stdout(&bad), "");
    assert!(
        stderr(&bad).contains("invalid credentials"),
        "{}",
        stderr(&bad)
    );

    let first = register(&u, Some("admin123"), &["bot-a"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let taken = register(&u, Some("admin123"), &["bot-a"]);
    assert_eq!(
        taken.status.code(),
        Some(5),
        "name taken: {}",
        stderr(&taken)
    );
    assert_eq!(stdout(&taken), "");
    assert!(
        stderr(&taken).contains("already exists"),
        "{}",
        stderr(&taken)
    );

    let down = register(
        &format!("http://127.0.0.1:{}", free_port()),
        Some("admin123"),
        &["bot-b"],
    );
    assert_eq!(
        down.status.code(),
        Some(3),
        "server down: {}",
        stderr(&down)
    );
    assert_eq!(stdout(&down), "");
    assert!(
        stderr(&down).contains("cannot connect"),
        "{}",
        stderr(&down)
    );

    let invalid = register(&u, Some("admin123"), &["bad name!"]);
    assert_eq!(invalid.status.code(), Some(1), "{}", stderr(&invalid));
    assert!(
        stderr(&invalid).contains("invalid username"),
        "{}",
        stderr(&invalid)
    );

    let usage = register(&u, Some("admin123"), &[]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    assert!(stderr(&usage).contains("usage"), "{}", stderr(&usage));

    // A member may log in but not register agents.
    let admin = s.admin_token();
    s.create_human(&admin, "mia", "MEMBER");
    let mut cmd = command(script("register-agent.sh"));
    cmd.arg("bot-c")
        .env("ECHOCENTER_URL", &u)
        .env("ECHOCENTER_ADMIN_USER", "mia")
        .env("ECHOCENTER_ADMIN_PASSWORD", "pw-123456-long");
    let member = run(cmd);
    assert_eq!(member.status.code(), Some(4), "{}", stderr(&member));

    // Nothing above registered bot-b or bot-c.
    let names: Vec<Value> = agents(&s, &admin)
        .iter()
        .map(|a| a["username"].clone())
        .collect();
    assert_eq!(names, [json!("Butler"), json!("bot-a")]);
}

// ----------------------------------------------------------------------------------------
// seed-demo.sh
// ----------------------------------------------------------------------------------------

#[test]
fn seed_demo_builds_the_demo_world_once() {
    let s = Server::start();
    let admin = s.admin_token();

    let out = seed(&s);
    assert!(
        out.status.success(),
        "seed failed: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // The four agents, each with its fixed token.
    let listed = agents(&s, &admin);
    let mut ids = HashMap::new();
    for (name, token) in AGENTS {
        let a = listed
            .iter()
            .find(|a| a["username"] == name)
            .unwrap_or_else(|| panic!("{name} not registered: {listed:?}"));
        assert_eq!(a["role"], "AGENT");
        ids.insert(name, a["id"].as_i64().unwrap());
        let r = s.post(
            "/api/users/agents/test-connection",
            &admin,
            json!({"api_token": token}),
        );
        assert_eq!(r.json()["agent_name"], name, "{token}: {}", r.body);
    }
    assert_eq!(listed.len(), 5, "Butler + 4 agents: {listed:?}");

    // Exactly 21 dashboard rows: 4 per agent, plus 2 for Observer and 1 for each other.
    let check_logs = || {
        let all = logs(&s, &admin, "");
        assert_eq!(all.len(), 21, "21 log rows: {all:#?}");
        for (name, n) in [
            ("Observer", 6),
            ("Diagnoser", 5),
            ("Guardian", 5),
            ("Storage-Custodian", 5),
        ] {
            let rows = all.iter().filter(|r| r["agent_id"] == name).count();
            assert_eq!(rows, n, "rows of {name}");
        }
        let errors: Vec<&Value> = all.iter().filter(|r| r["level"] == "ERROR").collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(all.iter().any(|r| r["level"] == "WARNING"));
    };
    check_logs();

    // Chat history with Observer, Diagnoser and Guardian (not Storage-Custodian).
    let check_chats = || {
        for name in ["Observer", "Diagnoser", "Guardian"] {
            let rows = history(&s, &admin, ids[name]);
            let texts: Vec<(i64, &str)> = rows
                .iter()
                .map(|r| {
                    (
                        r["sender_id"].as_i64().unwrap(),
                        r["payload"].as_str().unwrap(),
                    )
                })
                .collect();
            let init = format!("Initial link established with {name}.");
            assert_eq!(
                texts,
                [
                    (ids[name], init.as_str()),
                    (1, "Acknowledged. Report current status."),
                    (ids[name], "Status nominal. Task queue is clear."),
                ],
                "chat with {name}"
            );
        }
        assert!(history(&s, &admin, ids["Storage-Custodian"]).is_empty());
    };
    check_chats();

    // A second run adds nothing.
    let again = seed(&s);
    assert!(
        again.status.success(),
        "re-run failed: {}{}",
        stdout(&again),
        stderr(&again)
    );
    assert!(
        stdout(&again).contains("0 added, 21 already present"),
        "{}",
        stdout(&again)
    );
    assert_eq!(agents(&s, &admin).len(), 5);
    check_logs();
    check_chats();
}

#[test]
fn seed_demo_reports_bad_credentials_and_a_missing_server() {
    let s = Server::start();
    let mut cmd = command(script("seed-demo.sh"));
    cmd.env("ECHOCENTER_URL", url(&s))
        .env("ECHOCENTER_ADMIN_PASSWORD", "nope");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let mut cmd = command(script("seed-demo.sh"));
    cmd.env(
        "ECHOCENTER_URL",
        format!("http://127.0.0.1:{}", free_port()),
    )
    .env("ECHOCENTER_ADMIN_PASSWORD", "admin123");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let admin = s.admin_token();
    assert!(logs(&s, &admin, "").is_empty());
}

#[test]
fn seed_demo_leaves_conflicting_agents_alone() {
    let s = Server::start();
    let admin = s.admin_token();
    // Observer exists with another token; the Guardian token belongs to someone else.
    let (_, observer_token) = s.register_agent(&admin, "Observer");
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "Other", "api_token": "mock-guardian-token"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);

    let out = seed(&s);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("Observer: username already exists"), "{err}");
    assert!(
        err.contains("mock-guardian-token belongs to Other"),
        "{err}"
    );
    // Nothing was rotated or taken over.
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": observer_token}),
    );
    assert_eq!(r.json()["agent_name"], "Observer");
    let names: Vec<String> = agents(&s, &admin)
        .iter()
        .map(|a| a["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "Butler",
            "Observer",
            "Other",
            "Diagnoser",
            "Storage-Custodian"
        ]
    );
    // The log rows are all there; the chat history skips only the missing Guardian.
    assert_eq!(logs(&s, &admin, "").len(), 21);
    let ids: HashMap<String, i64> = agents(&s, &admin)
        .iter()
        .map(|a| {
            (
                a["username"].as_str().unwrap().to_string(),
                a["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(history(&s, &admin, ids["Observer"]).len(), 3);
    assert_eq!(history(&s, &admin, ids["Diagnoser"]).len(), 3);
    assert!(history(&s, &admin, ids["Other"]).is_empty());
}

// ----------------------------------------------------------------------------------------
// mock-agent.py
// ----------------------------------------------------------------------------------------

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

/// Starts the binary on a fixed address and database (the harness always picks a new port).
fn start_server_at(addr: &str, db: &Path, stderr_to: &Path) -> Guard {
    let err = std::fs::File::create(stderr_to).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--addr")
        .arg(addr)
        .arg("--db")
        .arg(db)
        // Its private socket directory goes next to the database (removed with the test's
        // directory even after the SIGKILL below).
        .env("TMPDIR", db.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err);
    for var in [
        "ECHOCENTER_ENV",
        "APP_ENV",
        "ECHOCENTER_ADMIN_PASSWORD",
        "ECHOCENTER_ADMIN_USER",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let guard = Guard(Some(child));
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "server on {addr} did not start: {}",
                std::fs::read_to_string(stderr_to).unwrap_or_default()
            )
        });
    assert_eq!(line, format!("listening on {addr}"));
    guard
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
    let second = start_server_at(&s.addr, &s.db, &s.dir.path().join("second.log"));
    wait_online(&s, &admin, "Phoenix", true, &log);
    let mut human = s.ws(&admin);
    let frames = ask(&mut human, agent_id, "still there?");
    assert_streamed_reply(&frames, "still there?");
    drop(human);

    // Both sessions' "online" rows are stored before the crash below.
    wait_rows(&s, &admin, "&agent_id=Phoenix&level=SUCCESS", 2, &log);

    // 2. A crash (SIGKILL: no close frame), then the server comes back.
    let mut second = second;
    let seen = std::fs::read_to_string(&log).unwrap().len();
    second.0.as_mut().unwrap().kill().unwrap();
    second.wait_exit(Duration::from_secs(10));
    wait_for_log(&log, "disconnected", seen);
    let _third = start_server_at(&s.addr, &s.db, &s.dir.path().join("third.log"));
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

// ----------------------------------------------------------------------------------------
// demo.sh
// ----------------------------------------------------------------------------------------

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    (out.status.success(), stdout(&out))
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z')))
        }
        Err(_) => false,
    }
}

/// demo.sh, stopped with SIGTERM on drop if the test fails midway (it then cleans up itself).
struct Demo {
    child: Option<Child>,
    pids: Vec<u32>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in &self.pids {
            if alive(*pid) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// A running demo.sh, with what its "ready" block said.
struct RunningDemo {
    demo: Demo,
    tmp: TempDir,
    stderr_path: PathBuf,
    base: String,
    port: u16,
    server_pid: u32,
    agent_pid: u32,
    data_dir: PathBuf,
}

/// Starts demo.sh (in its own process group when `own_group`, as a shell's foreground job
/// is) and waits for its ready block.
fn start_demo(args: &[&str], own_group: bool) -> RunningDemo {
    use std::os::unix::process::CommandExt;
    let tmp = TempDir::new();
    let stderr_path = tmp.path().join("demo.err");
    let mut cmd = command("bash");
    cmd.arg(script("demo.sh"))
        .args(args)
        .env("ECHOCENTER_BIN", BIN)
        .env("ECHOCENTER_PYTHON", python())
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    if own_group {
        cmd.process_group(0);
    }
    let child = cmd.spawn().expect("start demo.sh");
    let mut demo = Demo {
        child: Some(child),
        pids: Vec::new(),
    };

    // Read its stdout until the ready block has been printed.
    let out = demo.child.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lines.iter().any(|l: &String| l.starts_with("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(e) => panic!(
                "demo.sh never got ready ({e:?}).\nstdout:\n{}\nstderr:\n{}",
                lines.join("\n"),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            ),
        }
    }
    let field = |name: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name:?} line in {lines:#?}"))
    };
    let ready = lines
        .iter()
        .find_map(|l| l.strip_prefix("EchoCenter demo ready: "))
        .unwrap_or_else(|| panic!("no ready line: {lines:#?}"));
    let base = ready.trim_end_matches('/').to_string();
    let port: u16 = base
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected URL {base}"))
        .parse()
        .unwrap();
    let server_pid: u32 = field("server pid:").parse().unwrap();
    let agent_pid: u32 = field("agent pid:").parse().unwrap();
    let data_dir = PathBuf::from(field("data dir:").split(' ').next().unwrap());
    demo.pids = vec![server_pid, agent_pid];
    assert!(alive(server_pid) && alive(agent_pid));
    assert!(data_dir.starts_with(tmp.path()), "{data_dir:?}");
    assert!(data_dir.join("echocenter.db").exists());
    RunningDemo {
        demo,
        tmp,
        stderr_path,
        base,
        port,
        server_pid,
        agent_pid,
        data_dir,
    }
}

impl RunningDemo {
    /// The API answers, with the demo world and only the mock agent online.
    fn check_api(&self) {
        let base = &self.base;
        let (ok, body) = curl(&[&format!("{base}/api/ping")]);
        assert!(ok && body.contains("pong"), "{body}");
        let (ok, body) = curl(&[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"username":"admin","password":"admin123"}"#,
            &format!("{base}/api/auth/login"),
        ]);
        assert!(ok, "{body}");
        let jwt = serde_json::from_str::<Value>(&body).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let auth = format!("Authorization: Bearer {jwt}");
        let (ok, body) = curl(&["-H", &auth, &format!("{base}/api/users/agents")]);
        assert!(ok, "{body}");
        let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
        for (name, _) in AGENTS {
            let a = listed
                .iter()
                .find(|a| a["username"] == name)
                .unwrap_or_else(|| panic!("{name} missing: {body}"));
            assert_eq!(a["online"], name == "Storage-Custodian", "{name}: {a}");
        }
        let (_, body) = curl(&["-H", &auth, &format!("{base}/api/messages?limit=200")]);
        let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
        assert!(rows.len() >= 21, "seeded rows: {}", rows.len());
    }

    /// Waits for demo.sh to exit; then nothing it started may be left. Returns its exit
    /// status and stderr.
    fn wait_and_check_cleanup(mut self) -> (ExitStatus, String) {
        let status = wait_child(self.demo.child.as_mut().unwrap(), Duration::from_secs(30));
        self.demo.child = None;
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        assert!(!alive(self.server_pid), "server left running: {stderr}");
        assert!(!alive(self.agent_pid), "mock agent left running: {stderr}");
        assert!(!self.data_dir.exists(), "{:?} not removed", self.data_dir);
        assert!(
            TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "port {} still open",
            self.port
        );
        // Only the demo's directory was in TMPDIR (the server's private socket dir is gone too).
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "demo.err")
            .collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
        (status, stderr)
    }
}

fn kill(sig: &str, target: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {target}");
}

#[test]
fn demo_on_a_given_port_cleans_up_when_interrupted() {
    let port = free_port();
    let demo = start_demo(&["--port", &port.to_string()], false);
    assert_eq!(demo.port, port);
    demo.check_api();
    // SIGINT to the script alone: it must stop its children itself.
    kill("INT", &demo.demo.child.as_ref().unwrap().id().to_string());
    let (status, stderr) = demo.wait_and_check_cleanup();
    assert!(status.success(), "demo.sh exit {status:?}: {stderr}");
}

#[test]
fn demo_on_a_free_port_cleans_up_after_ctrl_c_to_the_process_group() {
    let demo = start_demo(&[], true);
    demo.check_api();
    // A terminal's Ctrl-C: SIGINT to the whole foreground process group.
    let pgid = demo.demo.child.as_ref().unwrap().id();
    kill("INT", &format!("-{pgid}"));
    let (status, stderr) = demo.wait_and_check_cleanup();
    assert!(status.success(), "demo.sh exit {status:?}: {stderr}");
}

#[test]
fn demo_stops_and_cleans_up_when_the_server_dies() {
    let demo = start_demo(&[], false);
    kill("KILL", &demo.server_pid.to_string());
    let (status, stderr) = demo.wait_and_check_cleanup();
    assert_eq!(
        status.code(),
        Some(1),
        "a crashed server is a failure: {stderr}"
    );
    assert!(stderr.contains("server stopped unexpectedly"), "{stderr}");
}

// ----------------------------------------------------------------------------------------
// echocenter.service and script hygiene
// ----------------------------------------------------------------------------------------

/// Parses a systemd unit: `[Section]` headers and `Key=Value` lines; comments (#, ;) and
/// blank lines skipped. Returns section → list of (key, value), in order.
fn parse_unit(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line {}: no continuation lines expected",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(
                sections.iter().all(|(s, _)| s != name),
                "line {}: section [{name}] repeated",
                n + 1
            );
            sections.push((name.to_string(), Vec::new()));
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {raw:?}", n + 1));
        let key = key.trim();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "line {}: bad key {key:?}",
            n + 1
        );
        let section = sections
            .last_mut()
            .unwrap_or_else(|| panic!("line {}: setting before any [section]", n + 1));
        section.1.push((key.to_string(), value.trim().to_string()));
    }
    sections
}

#[test]
fn systemd_unit_parses_and_carries_the_production_settings() {
    let path = script("echocenter.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let sections = parse_unit(&text);
    let names: Vec<&str> = sections.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Unit", "Service", "Install"]);
    let service = &sections[1].1;
    let all = |key: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let v = all(key);
        assert_eq!(v.len(), 1, "{key} set once in [Service]: {v:?}");
        v[0]
    };
    let exec = one("ExecStart");
    assert!(exec.starts_with('/'), "absolute ExecStart: {exec}");
    assert!(
        exec.contains("--db /var/lib/echocenter/echocenter.db"),
        "{exec}"
    );
    assert!(all("Environment").contains(&"ECHOCENTER_ENV=production"));
    assert_eq!(one("StateDirectory"), "echocenter");
    assert!(
        one("User") == "echocenter" || all("DynamicUser") == ["yes"],
        "runs as its own user"
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    let families: Vec<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    for f in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(families.contains(&f), "{f} allowed: {families:?}");
    }
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 20_000, "LimitNOFILE {nofile}");
    let tasks = one("TasksMax");
    assert!(
        tasks == "infinity" || tasks.parse::<u64>().unwrap() >= 20_000,
        "two threads per WebSocket need a high TasksMax: {tasks}"
    );
    assert_eq!(
        sections[2].1,
        [("WantedBy".into(), "multi-user.target".into())]
    );

    // systemd's own checker, where installed, on a copy whose ExecStart exists here.
    let verifier = Command::new("systemd-analyze").arg("--version").output();
    if verifier.map(|o| o.status.success()).unwrap_or(false) {
        let tmp = TempDir::new();
        let unit = tmp.path().join("echocenter.service");
        let bin = exec.split_whitespace().next().unwrap();
        std::fs::write(&unit, text.replace(bin, BIN)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let err = stderr(&out);
        let about_unit: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("echocenter.service"))
            .collect();
        assert!(
            out.status.success() && about_unit.is_empty(),
            "systemd-analyze verify: {err}"
        );
    } else {
        eprintln!("systemd-analyze not installed: checked the unit's syntax only");
    }
}

fn api(s: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = command(script("echocenter-api.sh"));
    cmd.args(args)
        .env("ECHOCENTER_URL", url(s))
        .env("ECHOCENTER_ADMIN_PASSWORD", "admin123");
    match stdin {
        None => run(cmd),
        Some(input) => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

#[test]
fn the_api_script_mirrors_the_command_line_against_a_live_server() {
    let s = Server::start();
    let added = api(
        &s,
        &["agent", "add", "remote-bot", "--description", "over curl"],
        None,
    );
    assert!(added.status.success(), "{}", stderr(&added));
    let token = stdout(&added).trim().to_string();
    assert!(token.starts_with("ec_"), "{token}");
    assert_eq!(s.get("/api/users/me", &token).status, 200);

    let listed = api(&s, &["agent", "list"], None);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let table = stdout(&listed);
    assert!(
        table
            .lines()
            .any(|l| l.contains("remote-bot") && l.contains("AGENT")),
        "{table}"
    );
    assert!(!table.contains(&token), "the list must not show raw tokens");

    let rotated = api(&s, &["agent", "rotate", "remote-bot"], None);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let fresh = stdout(&rotated).trim().to_string();
    assert!(fresh.starts_with("ec_") && fresh != token);
    assert_eq!(s.get("/api/users/me", &token).status, 401);
    assert_eq!(s.get("/api/users/me", &fresh).status, 200);

    let removed = api(&s, &["agent", "remove", "remote-bot"], None);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(s.get("/api/users/me", &fresh).status, 401);
    assert_eq!(
        api(&s, &["agent", "remove", "remote-bot"], None)
            .status
            .code(),
        Some(6)
    );
    assert_eq!(
        api(&s, &["agent", "rotate", "nobody"], None).status.code(),
        Some(6)
    );

    let user = api(
        &s,
        &["user", "add", "carol", "--role", "MEMBER"],
        Some("carol-pass-1\n"),
    );
    assert!(user.status.success(), "{}", stderr(&user));
    assert_eq!(s.login("carol", "carol-pass-1").status, 200);
    let again = api(
        &s,
        &["user", "add", "carol", "--role", "MEMBER"],
        Some("carol-pass-2\n"),
    );
    assert_eq!(again.status.code(), Some(5));
    assert_eq!(
        api(&s, &["user", "add", "dave"], Some("x\n")).status.code(),
        Some(2)
    );
    assert_eq!(api(&s, &["agent"], None).status.code(), Some(2));
}

#[test]
fn scripts_are_strict_and_parse() {
    for name in [
        "register-agent.sh",
        "seed-demo.sh",
        "demo.sh",
        "echocenter-api.sh",
        "lib/api.sh",
    ] {
        let path = script(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        if !name.starts_with("lib/") {
            assert!(text.starts_with("#!/usr/bin/env bash\n"), "{name}: shebang");
            assert!(
                text.contains("\nset -euo pipefail\n"),
                "{name}: strict mode"
            );
            assert!(is_executable(&path), "{name} is not executable");
        }
        match Command::new("shellcheck").arg("-x").arg(&path).output() {
            Ok(out) => assert!(out.status.success(), "shellcheck {name}:\n{}", stdout(&out)),
            Err(_) => eprintln!("shellcheck not installed: skipped for {name}"),
        }
    }
    let agent = script("mock-agent.py");
    assert!(is_executable(&agent));
    // Compiles without writing __pycache__ next to the script.
    let out = Command::new(python())
        .args([
            "-c",
            "import sys; compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')",
        ])
        .arg(&agent)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o111 == 0o111
}
