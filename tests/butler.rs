//! scripts/butler.py, the reference Butler, against the real server: humans instruct it over
//! their WebSocket, it instructs agents by name, asks approval for risky instructions and
//! relays the answers.
//!
//! Needs `python3` and `ECHOCENTER_TEST_PYTHON` pointing to a Python with websocket-client
//! (scripts/test.sh provides it). Agents are scripts/mock-agent.py or a test WebSocket that
//! plays a guide-style agent, so each test can see exactly what the agent received.
mod common;
use common::*;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

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

/// A command with the operator's environment cleared, so the machine running the tests cannot
/// change the outcome.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "ECHOCENTER_URL",
        "ECHOCENTER_AGENT_TOKEN",
        "ECHOCENTER_BUTLER_TOKEN",
        "ECHOCENTER_BUTLER_RISKY_WORDS",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

/// Stops (SIGTERM, then SIGKILL after 5 s) and reaps a child on drop, so a failing test leaves
/// no process behind.
struct Guard(Option<Child>);

impl Guard {
    fn signal(&self, sig: &str) {
        let pid = self.0.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
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

/// Starts scripts/butler.py against `base_url` with the token in the environment.
fn start_butler(base_url: &str, token: &str, log: &Path, args: &[&str]) -> Guard {
    let child = command(python())
        .arg(script("butler.py"))
        .args(["--max-backoff", "0.5"])
        .args(args)
        .env("ECHOCENTER_URL", base_url)
        .env("ECHOCENTER_BUTLER_TOKEN", token)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start butler.py");
    Guard(Some(child))
}

/// Starts scripts/mock-agent.py (it answers the Butler with one plain CHAT).
fn start_mock_agent(base_url: &str, token: &str, log: &Path) -> Guard {
    let child = command(python())
        .arg(script("mock-agent.py"))
        .args(["--chunk-delay", "0", "--max-backoff", "0.5"])
        .env("ECHOCENTER_URL", base_url)
        .env("ECHOCENTER_AGENT_TOKEN", token)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start mock-agent.py");
    Guard(Some(child))
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn text(v: &Value) -> &str {
    v["payload"].as_str().unwrap_or_default()
}

/// One test's world: a server, its admin, and the Butler running as scripts/butler.py.
struct World {
    s: Server,
    admin: String,
    butler_id: i64,
    butler: Guard,
    log: PathBuf,
}

impl World {
    fn start(butler_args: &[&str]) -> World {
        let s = Server::start();
        let admin = s.admin_token();
        let r = s.get("/api/users/butler", &admin);
        assert_eq!(r.status, 200, "{}", r.body);
        let butler_id = r.json()["id"].as_i64().unwrap();
        let token = s.butler_token(&admin);
        let log = s.dir.path().join("butler.log");
        let butler = start_butler(&url(&s), &token, &log, butler_args);
        let w = World {
            s,
            admin,
            butler_id,
            butler,
            log,
        };
        w.wait_butler_online(true);
        w
    }

    fn butler_online(&self) -> bool {
        let r = self.s.get("/api/users/butler", &self.admin);
        r.status == 200 && r.json()["online"] == true
    }

    fn wait_butler_online(&self, online: bool) {
        let deadline = Instant::now() + WAIT;
        while self.butler_online() != online {
            assert!(
                Instant::now() < deadline,
                "the Butler did not become {} in time; its log:\n{}",
                if online { "online" } else { "offline" },
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn agent_online(&self, name: &str) -> bool {
        let r = self.s.get("/api/users/agents", &self.admin);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["username"] == name && a["online"] == true)
    }

    fn wait_agent_online(&self, name: &str, agent_log: Option<&Path>) {
        let deadline = Instant::now() + WAIT;
        while !self.agent_online(name) {
            assert!(
                Instant::now() < deadline,
                "{name} did not come online; its log:\n{}",
                agent_log.map(read).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A guide-style agent played by the test over its own WebSocket.
    fn ws_agent(&self, name: &str) -> (i64, Ws) {
        let (id, token) = self.s.register_agent(&self.admin, name);
        let ws = self.s.ws(&token);
        self.wait_agent_online(name, None);
        (id, ws)
    }

    /// scripts/mock-agent.py registered as `name`.
    fn mock_agent(&self, name: &str) -> (i64, Guard) {
        let (id, token) = self.s.register_agent(&self.admin, name);
        let log = self.s.dir.path().join(format!("{name}.log"));
        let agent = start_mock_agent(&url(&self.s), &token, &log);
        self.wait_agent_online(name, Some(&log));
        (id, agent)
    }

    /// A new thread of the human behind `jwt` with the Butler (the dashboard's New thread).
    fn new_thread(&self, jwt: &str) -> i64 {
        let r = self.s.post(
            "/api/chat/threads",
            jwt,
            json!({"peer_id": self.butler_id, "channel_kind": "butler_direct"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["id"].as_i64().unwrap()
    }

    /// The default thread of the human behind `jwt` with the Butler: where the server files
    /// the human's CHATs that name no thread (and so the Butler's replies to them).
    fn default_thread(&self, jwt: &str) -> i64 {
        let r = self.s.get(
            &format!("/api/chat/threads?peer_id={}", self.butler_id),
            jwt,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["is_default"] == true)
            .unwrap_or_else(|| panic!("no default thread: {}", r.body))["id"]
            .as_i64()
            .unwrap()
    }

    /// A human's CHAT to the Butler, in thread `conversation_id` if given.
    fn tell(&self, human: &mut Ws, payload: &str, conversation_id: Option<i64>) {
        let mut frame = json!({"type": "CHAT", "target_id": self.butler_id, "payload": payload});
        if let Some(c) = conversation_id {
            frame["conversation_id"] = json!(c);
        }
        human.send_json(frame);
    }

    /// The next frame from the Butler of type `kind` satisfying `pred`; other frames are
    /// skipped. Panics with the Butler's log at the deadline.
    fn expect(
        &self,
        ws: &mut Ws,
        kind: &str,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(v) = ws.recv_within(Duration::from_millis(100)) {
                if v["type"] == kind && v["sender_id"] == self.butler_id && pred(&v) {
                    return v;
                }
            }
        }
        panic!(
            "timed out waiting for {what} ({kind} from the Butler); its log:\n{}",
            read(&self.log)
        );
    }

    /// The next CHAT from the Butler whose text contains `needle`.
    fn expect_chat(&self, ws: &mut Ws, needle: &str) -> Value {
        self.expect(ws, "CHAT", &format!("a CHAT containing {needle:?}"), |v| {
            text(v).contains(needle)
        })
    }

    /// The stored Butler↔agent conversation (admin route), oldest first.
    fn butler_agent_rows(&self, agent_id: i64) -> Vec<Value> {
        let r = self
            .s
            .get(&format!("/api/chat/butler-agent/{agent_id}"), &self.admin);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json().as_array().unwrap().clone()
    }

    /// What the Butler sent the agent, as stored.
    fn instructions_to(&self, agent_id: i64) -> Vec<Value> {
        self.butler_agent_rows(agent_id)
            .into_iter()
            .filter(|r| r["sender_id"] == self.butler_id)
            .collect()
    }
}

/// The next CHAT the test agent receives from the Butler.
fn instruction(w: &World, agent: &mut Ws) -> Value {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(v) = agent.recv_within(Duration::from_millis(100)) {
            assert_ne!(v["type"], "AUTH_REQUEST", "{v}");
            if v["type"] == "CHAT" {
                assert_eq!(
                    v["sender_id"], w.butler_id,
                    "only the Butler writes here: {v}"
                );
                return v;
            }
        }
    }
    panic!(
        "the agent received no instruction; the Butler's log:\n{}",
        read(&w.log)
    );
}

fn assert_forwarded(w: &World, v: &Value, task: &str) {
    assert_eq!(v["sender_id"], w.butler_id, "{v}");
    assert_eq!(v["sender_role"], "BUTLER", "{v}");
    assert_eq!(
        v["payload"], task,
        "the agent gets exactly the instruction: {v}"
    );
    assert!(v["local_id"].as_str().is_some_and(|l| !l.is_empty()), "{v}");
    assert!(
        v.get("conversation_id").is_none(),
        "the human's thread is not the agent's: {v}"
    );
}

/// An agent's plain answer to the Butler, as the integration guide writes it.
fn answer(agent: &mut Ws, butler_id: i64, payload: &str) {
    agent.send_json(json!({"type": "CHAT", "target_id": butler_id, "payload": payload}));
}

// -------------------------------------------------------------------------------------------
// Forwarding and relaying
// -------------------------------------------------------------------------------------------

#[test]
fn an_instruction_reaches_the_named_agent_and_its_answer_comes_back_in_the_thread() {
    let w = World::start(&[]);
    let (agent_id, _agent) = w.mock_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);
    let thread = w.new_thread(&w.admin);

    w.tell(
        &mut human,
        "ask Storage-Custodian to check the disk",
        Some(thread),
    );
    let reply = w.expect_chat(&mut human, "Storage-Custodian: ");
    // mock-agent.py quotes what it received.
    assert!(
        text(&reply).contains("acknowledges the instruction \"check the disk\""),
        "{reply}"
    );
    assert_eq!(
        reply["conversation_id"], thread,
        "the reply lands in the thread: {reply}"
    );
    assert_eq!(reply["target_id"], 1, "{reply}");
    assert!(
        reply["id"].as_i64().is_some(),
        "the reply is stored: {reply}"
    );

    // The agent received exactly the instruction, once.
    let sent = w.instructions_to(agent_id);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0]["type"], "CHAT");
    assert_eq!(sent[0]["payload"], "check the disk");

    // The @mention form, without a thread: the server files it into the pair's default
    // thread, and the reply follows it there.
    w.tell(&mut human, "@Storage-Custodian check the logs", None);
    let reply = w.expect_chat(&mut human, "instruction \"check the logs\"");
    assert!(text(&reply).starts_with("Storage-Custodian: "), "{reply}");
    assert_eq!(
        reply["conversation_id"],
        w.default_thread(&w.admin),
        "{reply}"
    );
    let sent = w.instructions_to(agent_id);
    assert_eq!(sent.len(), 2, "{sent:#?}");
    assert_eq!(sent[1]["payload"], "check the logs");
}

#[test]
fn a_streamed_answer_is_relayed_as_a_stream_with_the_same_stream_id() {
    let w = World::start(&[]);
    let (_, mut agent) = w.ws_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);

    let thread = w.new_thread(&w.admin);
    w.tell(
        &mut human,
        "@Storage-Custodian check the disk",
        Some(thread),
    );
    let got = instruction(&w, &mut agent);
    assert_forwarded(&w, &got, "check the disk");

    // The guide's streaming reply: chunks, the final CHAT with the same stream_id, the END.
    let chunks = ["Disk /srv ", "is 41% full, ", "no errors."];
    for c in chunks {
        agent.send_json(json!({"type": "CHAT_STREAM", "target_id": w.butler_id,
                               "payload": c, "stream_id": "disk-1"}));
    }
    agent.send_json(json!({"type": "CHAT", "target_id": w.butler_id,
                           "payload": chunks.concat(), "stream_id": "disk-1"}));
    agent.send_json(json!({"type": "CHAT_STREAM_END", "target_id": w.butler_id,
                           "payload": "", "stream_id": "disk-1"}));

    let frames = w.relayed_stream(&mut human);
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "CHAT_STREAM",
            "CHAT_STREAM",
            "CHAT_STREAM",
            "CHAT",
            "CHAT_STREAM_END"
        ],
        "{frames:#?}"
    );
    for f in &frames {
        assert_eq!(f["stream_id"], "disk-1", "one stream_id throughout: {f}");
        assert_eq!(
            f["conversation_id"], thread,
            "every frame in the thread: {f}"
        );
        assert_eq!(f["target_id"], 1, "{f}");
    }
    let joined: String = frames[..3].iter().map(text).collect();
    let full = format!("Storage-Custodian: {}", chunks.concat());
    assert_eq!(joined, full, "the chunks, the first one named");
    assert_eq!(
        frames[3]["payload"],
        full.as_str(),
        "final CHAT = the chunks joined"
    );
    assert!(
        frames[3]["id"].as_i64().is_some(),
        "the final CHAT is stored"
    );
}

impl World {
    /// The Butler's CHAT_STREAM / CHAT / CHAT_STREAM_END frames to `human`, up to the END.
    fn relayed_stream(&self, human: &mut Ws) -> Vec<Value> {
        let mut frames = Vec::new();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let Some(v) = human.recv_within(Duration::from_millis(100)) else {
                continue;
            };
            let kind = v["type"].as_str().unwrap_or_default().to_string();
            if v["sender_id"] == self.butler_id
                && matches!(kind.as_str(), "CHAT_STREAM" | "CHAT" | "CHAT_STREAM_END")
            {
                frames.push(v);
                if kind == "CHAT_STREAM_END" {
                    return frames;
                }
            }
        }
        panic!(
            "no CHAT_STREAM_END from the Butler; got {frames:#?}\nits log:\n{}",
            read(&self.log)
        );
    }
}

#[test]
fn two_humans_asking_the_same_agent_at_once_each_get_their_own_answer() {
    let w = World::start(&[]);
    let (_, _agent) = w.mock_agent("Storage-Custodian");
    let (alice_id, member_jwt) = w.s.create_human(&w.admin, "alice", "MEMBER");
    let mut admin = w.s.ws(&w.admin);
    let mut alice = w.s.ws(&member_jwt);

    let (admin_thread, alice_thread) = (w.new_thread(&w.admin), w.new_thread(&member_jwt));
    w.tell(
        &mut admin,
        "@Storage-Custodian count the inodes",
        Some(admin_thread),
    );
    w.tell(
        &mut alice,
        "ask Storage-Custodian to list the mounts",
        Some(alice_thread),
    );
    let a = w.expect_chat(&mut admin, "Storage-Custodian: ");
    let b = w.expect_chat(&mut alice, "Storage-Custodian: ");
    assert!(text(&a).contains("\"count the inodes\""), "{a}");
    assert_eq!(a["conversation_id"], admin_thread);
    assert!(text(&b).contains("\"list the mounts\""), "{b}");
    assert_eq!(b["conversation_id"], alice_thread);
    assert_eq!(b["target_id"], alice_id, "{b}");
}

// -------------------------------------------------------------------------------------------
// Approvals
// -------------------------------------------------------------------------------------------

/// The human's AUTH_REQUEST from the Butler; checks its payload.
fn expect_auth_request(w: &World, human: &mut Ws, command: &str, agent: &str) -> Value {
    let req = w.expect(human, "AUTH_REQUEST", "the approval request", |_| true);
    let p = &req["payload"];
    assert_eq!(p["status"], "PENDING", "{req}");
    assert_eq!(p["command"], command, "{req}");
    assert_eq!(p["target_agent_name"], agent, "{req}");
    assert!(
        p["action_id"].as_str().is_some_and(|a| a.len() >= 8),
        "{req}"
    );
    assert!(p["reason"].as_str().is_some_and(|r| !r.is_empty()), "{req}");
    assert!(
        req["id"].as_i64().is_some(),
        "AUTH_REQUEST is stored: {req}"
    );
    req
}

#[test]
fn a_risky_instruction_waits_for_approval_and_is_forwarded_once_approved() {
    let w = World::start(&[]);
    let (agent_id, mut agent) = w.ws_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);
    let thread = w.new_thread(&w.admin);

    w.tell(
        &mut human,
        "@Storage-Custodian restart the storage service",
        Some(thread),
    );
    let req = expect_auth_request(
        &w,
        &mut human,
        "restart the storage service",
        "Storage-Custodian",
    );
    assert_eq!(req["conversation_id"], thread, "{req}");
    assert_eq!(req["target_id"], 1, "the human who asked: {req}");
    // Nothing reached the agent: not live, not stored.
    agent.assert_no("CHAT", Duration::from_millis(300));
    assert!(w.instructions_to(agent_id).is_empty());

    let action_id = req["payload"]["action_id"].clone();
    human.send_json(json!({"type": "AUTH_RESPONSE",
                           "payload": {"action_id": action_id, "approved": true}}));
    let update = w.expect(&mut human, "AUTH_STATUS_UPDATE", "APPROVED", |_| true);
    assert_eq!(update["payload"]["action_id"], action_id, "{update}");
    assert_eq!(update["payload"]["status"], "APPROVED", "{update}");
    assert_eq!(update["conversation_id"], thread, "{update}");
    let note = w.expect_chat(&mut human, "Approved, forwarding");
    assert_eq!(note["conversation_id"], thread, "{note}");

    let got = instruction(&w, &mut agent);
    assert_forwarded(&w, &got, "restart the storage service");
    answer(
        &mut agent,
        w.butler_id,
        "storage service restarted, 3 s downtime",
    );
    let reply = w.expect_chat(&mut human, "storage service restarted");
    assert_eq!(
        text(&reply),
        "Storage-Custodian: storage service restarted, 3 s downtime"
    );
    assert_eq!(reply["conversation_id"], thread, "{reply}");
    assert_eq!(w.instructions_to(agent_id).len(), 1);
    // The stored request remembers the answer (a reloaded dashboard shows it).
    let rows = w.s.get("/api/chat/history/2", &w.admin).json();
    let stored = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "AUTH_REQUEST")
        .unwrap()
        .clone();
    assert_eq!(stored["payload"]["status"], "APPROVED", "{stored}");
}

#[test]
fn a_rejected_instruction_is_reported_and_never_forwarded() {
    let w = World::start(&[]);
    let (agent_id, mut agent) = w.ws_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);

    let thread = w.new_thread(&w.admin);
    w.tell(
        &mut human,
        "ask Storage-Custodian to DROP the cache table",
        Some(thread),
    );
    let req = expect_auth_request(&w, &mut human, "DROP the cache table", "Storage-Custodian");
    let action_id = req["payload"]["action_id"].clone();
    human.send_json(json!({"type": "AUTH_RESPONSE",
                           "payload": {"action_id": action_id, "approved": false}}));
    let update = w.expect(&mut human, "AUTH_STATUS_UPDATE", "REJECTED", |_| true);
    assert_eq!(update["payload"]["status"], "REJECTED", "{update}");
    let note = w.expect_chat(&mut human, "Not forwarded");
    assert!(text(&note).contains("DROP the cache table"), "{note}");
    assert!(text(&note).contains("rejected"), "{note}");
    assert_eq!(note["conversation_id"], thread, "{note}");

    // The Butler handles frames in order: had it forwarded anything, it would have done so
    // before this reply. Nothing is stored and nothing arrives.
    assert!(w.instructions_to(agent_id).is_empty());
    agent.assert_no("CHAT", Duration::from_millis(300));

    // A second answer for the same action is refused by the server, which remembers the
    // first: the card stays rejected and the Butler never hears of it.
    human.send_json(json!({"type": "AUTH_RESPONSE", "local_id": "again",
                           "payload": {"action_id": action_id, "approved": true}}));
    let e = human.recv_type("ERROR");
    assert_eq!(e["payload"]["code"], "forbidden", "{e}");
    assert!(
        e["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("REJECTED"),
        "{e}"
    );
    w.tell(&mut human, "help", None);
    w.expect_chat(&mut human, "I can forward instructions");
    assert!(w.instructions_to(agent_id).is_empty());
}

#[test]
fn an_approval_posted_over_rest_forwards_the_instruction() {
    let w = World::start(&[]);
    let (agent_id, _agent) = w.mock_agent("Storage-Custodian");
    let (member_id, member_jwt) = w.s.create_human(&w.admin, "alice", "MEMBER");
    let mut alice = w.s.ws(&member_jwt);

    w.tell(&mut alice, "@Storage-Custodian reboot node-3", None);
    let req = expect_auth_request(&w, &mut alice, "reboot node-3", "Storage-Custodian");
    assert_eq!(req["target_id"], member_id);
    assert_eq!(
        req["conversation_id"],
        w.default_thread(&member_jwt),
        "{req}"
    );
    assert!(w.instructions_to(agent_id).is_empty());
    // Another tab of alice's.
    let mut other_tab = w.s.ws(&member_jwt);

    // The dashboard's Approve button.
    let r = w.s.post(
        "/api/chat/auth/response",
        &member_jwt,
        json!({"action_id": req["payload"]["action_id"], "approved": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"status": "processed"}));
    // Her other tabs see the answer, as they would one sent over the WebSocket.
    let echo = other_tab.recv_type("AUTH_RESPONSE");
    assert_eq!(
        (
            echo["payload"]["action_id"].clone(),
            echo["payload"]["approved"].clone(),
            echo["sender_id"].clone(),
            echo["conversation_id"].clone()
        ),
        (
            req["payload"]["action_id"].clone(),
            json!(true),
            json!(member_id),
            req["conversation_id"].clone()
        )
    );

    w.expect_chat(&mut alice, "Approved, forwarding");
    let reply = w.expect_chat(&mut alice, "Storage-Custodian: ");
    assert!(
        text(&reply).contains("acknowledges the instruction \"reboot node-3\""),
        "{reply}"
    );
    let sent = w.instructions_to(agent_id);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0]["payload"], "reboot node-3");
}

#[test]
fn a_pending_approval_does_not_hold_up_other_requests() {
    let w = World::start(&[]);
    let (_, mut guarded) = w.ws_agent("Guardian");
    let (_, _storage) = w.mock_agent("Storage-Custodian");
    let (_, member_jwt) = w.s.create_human(&w.admin, "alice", "MEMBER");
    let mut admin = w.s.ws(&w.admin);
    let mut alice = w.s.ws(&member_jwt);

    w.tell(&mut admin, "@Guardian kill process 4242", None);
    let req = expect_auth_request(&w, &mut admin, "kill process 4242", "Guardian");
    // While the admin thinks, alice is served.
    w.tell(&mut alice, "@Storage-Custodian check the disk", None);
    w.expect_chat(&mut alice, "instruction \"check the disk\"");
    // alice cannot decide the admin's request (she is neither the asker nor an admin): the
    // server refuses it before the Butler hears of it.
    let r = w.s.post(
        "/api/chat/auth/response",
        &member_jwt,
        json!({"action_id": req["payload"]["action_id"], "approved": true}),
    );
    assert_eq!(
        (r.status, r.error()),
        (403, "forbidden".into()),
        "{}",
        r.body
    );
    guarded.assert_no("CHAT", Duration::from_millis(200));

    admin.send_json(json!({"type": "AUTH_RESPONSE",
                           "payload": {"action_id": req["payload"]["action_id"],
                                       "approved": true}}));
    let got = instruction(&w, &mut guarded);
    assert_forwarded(&w, &got, "kill process 4242");
}

// -------------------------------------------------------------------------------------------
// Clear replies
// -------------------------------------------------------------------------------------------

#[test]
fn unknown_offline_and_unparseable_instructions_get_a_clear_reply() {
    let w = World::start(&[]);
    let (offline_id, _) = w.s.register_agent(&w.admin, "Observer");
    let (_, _storage) = w.ws_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);

    let thread = w.new_thread(&w.admin);
    w.tell(&mut human, "@Nobody check the disk", Some(thread));
    let r = w.expect_chat(&mut human, "I don't know an agent called \"Nobody\"");
    assert!(
        text(&r).contains("Storage-Custodian"),
        "lists who exists: {r}"
    );
    assert_eq!(r["conversation_id"], thread, "{r}");

    w.tell(&mut human, "what is the weather like?", Some(thread));
    let r = w.expect_chat(
        &mut human,
        "I can forward instructions: ask <agent> to <task>, or @<agent> <task>",
    );
    assert_eq!(r["conversation_id"], thread, "{r}");

    w.tell(&mut human, "ask Observer to look around", None);
    let r = w.expect_chat(&mut human, "Observer is offline");
    assert!(text(&r).contains("did not forward"), "{r}");
    assert!(w.instructions_to(offline_id).is_empty());

    w.tell(&mut human, "ask Butler to make tea", None);
    w.expect_chat(&mut human, "That is me");

    w.tell(&mut human, "agents", None);
    let r = w.expect_chat(&mut human, "Agents: ");
    assert!(text(&r).contains("Observer (offline)"), "{r}");
    assert!(text(&r).contains("Storage-Custodian (online)"), "{r}");

    // An answer to an approval the Butler never asked (or asked before it restarted).
    let r = w.s.post(
        "/api/chat/auth/response",
        &w.admin,
        json!({"action_id": "no-such-action", "approved": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let update = w.expect(&mut human, "AUTH_STATUS_UPDATE", "EXPIRED", |_| true);
    assert_eq!(
        update["payload"],
        json!({"action_id": "no-such-action", "status": "EXPIRED"})
    );
    w.expect_chat(&mut human, "There is no pending approval no-such-action");
}

#[test]
fn silence_from_the_agent_and_from_the_approver_each_time_out_with_a_message() {
    let w = World::start(&["--answer-timeout", "1", "--approval-timeout", "1"]);
    let (agent_id, mut agent) = w.ws_agent("Quiet");
    let mut human = w.s.ws(&w.admin);

    let thread = w.new_thread(&w.admin);
    w.tell(&mut human, "@Quiet report status", Some(thread));
    let got = instruction(&w, &mut agent);
    assert_forwarded(&w, &got, "report status");
    let r = w.expect_chat(&mut human, "No answer from Quiet within 1 s");
    assert_eq!(r["conversation_id"], thread, "{r}");
    // A late answer is still passed on, marked as late.
    answer(&mut agent, w.butler_id, "all good");
    let r = w.expect_chat(&mut human, "all good");
    assert_eq!(
        text(&r),
        "Quiet (late answer to \"report status\"): all good"
    );

    w.tell(&mut human, "@Quiet reboot now", Some(thread));
    let req = expect_auth_request(&w, &mut human, "reboot now", "Quiet");
    let update = w.expect(&mut human, "AUTH_STATUS_UPDATE", "EXPIRED", |_| true);
    assert_eq!(update["payload"]["status"], "EXPIRED", "{update}");
    assert_eq!(update["payload"]["action_id"], req["payload"]["action_id"]);
    w.expect_chat(&mut human, "No decision on \"reboot now\"");
    // Approving after the expiry (a card reloaded from history) is refused: the server
    // recorded the Butler's EXPIRED, and nothing is forwarded.
    human.send_json(json!({"type": "AUTH_RESPONSE",
                           "payload": {"action_id": req["payload"]["action_id"],
                                       "approved": true}}));
    let e = human.recv_type("ERROR");
    assert_eq!(e["payload"]["code"], "forbidden", "{e}");
    assert!(
        e["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("EXPIRED"),
        "{e}"
    );
    assert_eq!(w.instructions_to(agent_id).len(), 1);
    agent.assert_no("CHAT", Duration::from_millis(200));
}

#[test]
fn risky_words_are_configurable() {
    let w = World::start(&["--risky-words", "purge, wipe"]);
    let (_, mut agent) = w.ws_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);

    // Not on this list: forwarded at once.
    w.tell(&mut human, "@Storage-Custodian restart the service", None);
    let got = instruction(&w, &mut agent);
    assert_forwarded(&w, &got, "restart the service");
    // Whole words only: "wipeout" is not "wipe".
    w.tell(&mut human, "@Storage-Custodian check the wipeout log", None);
    let got = instruction(&w, &mut agent);
    assert_forwarded(&w, &got, "check the wipeout log");
    // On it, in any case: asked first.
    w.tell(&mut human, "@Storage-Custodian PURGE old snapshots", None);
    expect_auth_request(&w, &mut human, "PURGE old snapshots", "Storage-Custodian");
    agent.assert_no("CHAT", Duration::from_millis(200));
}

// -------------------------------------------------------------------------------------------
// Connection life
// -------------------------------------------------------------------------------------------

/// A full round trip through the Butler with a fresh test agent connection.
fn round_trip(w: &World, agent_token: &str, question: &str) {
    let mut agent = w.s.ws(agent_token);
    let mut human = w.s.ws(&w.admin);
    w.tell(&mut human, &format!("@Phoenix {question}"), None);
    let got = instruction(w, &mut agent);
    assert_forwarded(w, &got, question);
    answer(&mut agent, w.butler_id, &format!("done: {question}"));
    w.expect_chat(&mut human, &format!("Phoenix: done: {question}"));
}

#[test]
fn the_butler_reconnects_after_the_server_restarts() {
    let mut w = World::start(&[]);
    let (_, token) = w.s.register_agent(&w.admin, "Phoenix");
    round_trip(&w, &token, "first");

    // 1. A graceful restart (close 1001) on the same address and database.
    assert!(w.s.terminate().success());
    let seen = read(&w.log).len();
    w.s.restart_on_same_address(&[], &[]);
    w.wait_butler_online(true);
    // The server may list it online a moment before its log line is written.
    w.s.wait_for("the Butler's log says it connected again", WAIT, || {
        read(&w.log)[seen..].contains("connected to")
    });
    round_trip(&w, &token, "second");

    // 2. A crash (no close frame), then the server comes back.
    w.s.kill9();
    w.s.restart_on_same_address(&[], &[]);
    w.wait_butler_online(true);
    round_trip(&w, &token, "third");
    assert!(
        w.butler.running(),
        "the Butler never gives up on a server that went away"
    );
}

#[test]
fn an_instruction_sent_while_the_butler_was_offline_is_handled_when_it_connects() {
    let s = Server::start();
    let admin = s.admin_token();
    let butler_id = s.get("/api/users/butler", &admin).json()["id"]
        .as_i64()
        .unwrap();
    let (_, token) = s.register_agent(&admin, "Storage-Custodian");
    let mut agent = s.ws(&token);
    let mut human = s.ws(&admin);
    let r = s.post(
        "/api/chat/threads",
        &admin,
        json!({"peer_id": butler_id, "channel_kind": "butler_direct"}),
    );
    let thread = r.json()["id"].as_i64().unwrap();
    // Stored for the Butler, delivered when it connects.
    human.send_json(json!({"type": "CHAT", "target_id": butler_id,
                           "payload": "@Storage-Custodian check the disk",
                           "conversation_id": thread}));
    human.recv_type("CHAT"); // the echo: stored

    let log = s.dir.path().join("butler.log");
    let butler = start_butler(&url(&s), &s.butler_token(&admin), &log, &[]);
    let w = World {
        s,
        admin,
        butler_id,
        butler,
        log,
    };
    let got = instruction(&w, &mut agent);
    assert_forwarded(&w, &got, "check the disk");
    answer(&mut agent, butler_id, "41% used");
    let r = w.expect_chat(&mut human, "Storage-Custodian: 41% used");
    assert_eq!(r["conversation_id"], thread, "{r}");
}

#[test]
fn sigterm_ends_the_butler_cleanly_and_tells_whoever_is_waiting() {
    let mut w = World::start(&[]);
    let (_, _agent) = w.ws_agent("Storage-Custodian");
    let mut human = w.s.ws(&w.admin);
    let thread = w.new_thread(&w.admin);
    w.tell(
        &mut human,
        "@Storage-Custodian shutdown the array",
        Some(thread),
    );
    let req = expect_auth_request(&w, &mut human, "shutdown the array", "Storage-Custodian");

    w.butler.signal("TERM");
    let status = w.butler.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}: {}", read(&w.log));
    // The approval card is closed, and the human told.
    let update = w.expect(&mut human, "AUTH_STATUS_UPDATE", "EXPIRED", |_| true);
    assert_eq!(update["payload"]["action_id"], req["payload"]["action_id"]);
    assert_eq!(update["payload"]["status"], "EXPIRED");
    let r = w.expect_chat(&mut human, "shutting down");
    assert_eq!(r["conversation_id"], thread, "{r}");
    w.wait_butler_online(false);

    let token = w.s.butler_token(&w.admin);
    let log = read(&w.log);
    assert!(!log.contains(&token), "token in the log: {log}");
    assert!(log.contains("signal 15"), "{log}");
}

#[test]
fn a_rejected_token_or_the_wrong_role_ends_the_butler_with_a_status_that_says_so() {
    let s = Server::start();
    let admin = s.admin_token();
    let dir = s.dir.path();

    // A token the server rejects: exit 3, no retry loop.
    let log = dir.join("bad.log");
    let mut bad = start_butler(&url(&s), "not-a-valid-token-at-all", &log, &[]);
    let status = bad.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "{}", read(&log));
    assert!(
        !read(&log).contains("not-a-valid-token-at-all"),
        "{}",
        read(&log)
    );

    // An AGENT's token is not the Butler's: exit 4.
    let (_, agent_token) = s.register_agent(&admin, "Impostor");
    let log = dir.join("impostor.log");
    let mut impostor = start_butler(&url(&s), &agent_token, &log, &[]);
    let status = impostor.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(4), "{}", read(&log));
    assert!(read(&log).contains("not to the Butler"), "{}", read(&log));

    // A rotated token: the live Butler is closed (1008 token revoked) and gives up with 3.
    let token = s.butler_token(&admin);
    let log = dir.join("rotated.log");
    let mut butler = start_butler(&url(&s), &token, &log, &[]);
    let deadline = Instant::now() + WAIT;
    while s.get("/api/users/butler", &admin).json()["online"] != true {
        assert!(Instant::now() < deadline, "{}", read(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let butler_id = s.get("/api/users/butler", &admin).json()["id"].clone();
    let r = s.request(
        "PATCH",
        &format!("/api/users/agents/{butler_id}/token"),
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let status = butler.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "{}", read(&log));
    assert!(read(&log).contains("token revoked"), "{}", read(&log));

    // No token at all: a usage error.
    let out = command(python())
        .arg(script("butler.py"))
        .env("ECHOCENTER_URL", url(&s))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

// -------------------------------------------------------------------------------------------
// demo.sh
// -------------------------------------------------------------------------------------------

/// A request to a server this test did not start (demo.sh's); small JSON bodies only.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(addr, req.as_bytes(), Duration::from_secs(10));
    let status = status_of(&raw).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&raw)));
    (
        status,
        serde_json::from_str(&body_of(&raw)).unwrap_or(Value::Null),
    )
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

#[test]
fn the_demo_runs_the_butler_and_its_approval_flow_works() {
    let tmp = TempDir::new();
    let err_path = tmp.path().join("demo.err");
    let mut cmd = command("bash");
    cmd.arg(script("demo.sh"))
        .env("ECHOCENTER_BIN", server_bin())
        .env("ECHOCENTER_PYTHON", python())
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for var in [
        "ECHOCENTER_ADMIN_USER",
        "ECHOCENTER_ADMIN_PASSWORD",
        "ECHOCENTER_DEMO_PORT",
        "ECHOCENTER_DEMO_HOST",
        "ECHOCENTER_DEMO_KEEP",
    ] {
        cmd.env_remove(var);
    }
    let mut demo = Guard(Some(cmd.spawn().expect("start demo.sh")));
    let out = demo.0.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lines.iter().any(|l| l.starts_with("Press Ctrl-C")) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(e) => panic!(
                "demo.sh never got ready ({e:?}): {lines:#?}\n{}",
                read(&err_path)
            ),
        }
    }
    let field = |name: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name:?} line in {lines:#?}"))
    };
    let base = field("EchoCenter demo ready:");
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let butler_pid: u32 = field("butler pid:").parse().unwrap();
    let data_dir = PathBuf::from(field("data dir:").split(' ').next().unwrap());
    assert!(alive(butler_pid));
    assert!(
        read(&err_path).contains("the Butler is running"),
        "{}",
        read(&err_path)
    );

    // The README's walk-through: tell the Butler, get the approval card, approve, the answer.
    let (status, login) = http(
        &addr,
        "POST",
        "/api/auth/login",
        None,
        r#"{"username":"admin","password":"admin123"}"#,
    );
    assert_eq!(status, 200, "{login}");
    let jwt = login["token"].as_str().unwrap().to_string();
    let (status, butler) = http(&addr, "GET", "/api/users/butler", Some(&jwt), "");
    assert_eq!(status, 200, "{butler}");
    assert_eq!(butler["online"], true, "{butler}");
    let butler_id = butler["id"].as_i64().unwrap();
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    let (ws, _) =
        tungstenite::client(format!("ws://{addr}/api/ws?token={jwt}").as_str(), stream).unwrap();
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut human = Ws { inner: ws };
    human.send_json(json!({"type": "CHAT", "target_id": butler_id,
                           "payload": "@Storage-Custodian restart the storage service"}));
    let from_butler = |v: &Value, kind: &str| v["type"] == kind && v["sender_id"] == butler_id;
    let req = human.recv_until(|v| from_butler(v, "AUTH_REQUEST"), "the approval request");
    assert_eq!(req["payload"]["status"], "PENDING", "{req}");
    assert_eq!(req["payload"]["command"], "restart the storage service");
    let body = json!({"action_id": req["payload"]["action_id"], "approved": true}).to_string();
    let (status, r) = http(&addr, "POST", "/api/chat/auth/response", Some(&jwt), &body);
    assert_eq!((status, r), (200, json!({"status": "processed"})));
    let reply = human.recv_until(
        |v| from_butler(v, "CHAT") && text(v).starts_with("Storage-Custodian: "),
        "the relayed answer",
    );
    assert!(
        text(&reply).contains("\"restart the storage service\""),
        "{reply}"
    );
    human.close();

    // Ctrl-C stops the Butler with everything else.
    demo.signal("INT");
    let status = demo.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "demo.sh exit {status:?}: {}",
        read(&err_path)
    );
    assert!(!alive(butler_pid), "the Butler was left running");
    assert!(!data_dir.exists(), "{data_dir:?} not removed");
}
