//! Issue #6, hostile conditions: who may do what. Every REST route of SPEC section 3 is tried
//! with every kind of caller (ADMIN, MEMBER, AGENT, BUTLER, no credentials), and every frame
//! type of SPEC section 4 is sent by every role to every kind of target. Refusals must carry
//! the exact status and error string (REST) or ERROR code (WebSocket); allowed calls must
//! succeed, and allowed frames must reach exactly the connections the SPEC names.
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const METRICS_TOKEN: &str = "matrix-metrics-token-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Nobody,
    Member,
    Agent,
    Butler,
    /// Last on purpose: admin calls change state (delete, rotate, reset).
    Admin,
}

const CALLERS: [Caller; 5] = [
    Caller::Nobody,
    Caller::Member,
    Caller::Agent,
    Caller::Butler,
    Caller::Admin,
];

/// Who a route admits, as SPEC section 3's "who" column says.
#[derive(Clone, Copy, Debug)]
enum Who {
    Public,
    Any,
    Human,
    /// The agent directory: humans, and the Butler (which instructs agents by name).
    HumanOrButler,
    Admin,
    /// `POST /api/messages`: an admin, or a machine (the Butler is a privileged agent).
    AdminOrAgent,
    /// `/metrics`: only the metrics token, never a user credential.
    MetricsToken,
    /// `/api/ws` without upgrade headers: 426 for everyone, before the token is looked at
    /// (a 401 for bad tokens and 426 for good ones would make it a token oracle).
    WsToken,
}

/// What a caller must get: `Ok(status)` for an admitted caller, else the refusal.
fn expected(who: Who, caller: Caller, ok: u16) -> Result<u16, (u16, &'static str)> {
    use Caller::*;
    match (who, caller) {
        (Who::Public, _) => Ok(ok),
        (Who::WsToken, _) => Ok(ok),
        (Who::MetricsToken, Nobody) => Err((401, "authorization header required")),
        (Who::MetricsToken, _) => Err((401, "invalid token")),
        (_, Nobody) => Err((401, "authorization header required")),
        (Who::Any, _) => Ok(ok),
        (Who::Human, Admin | Member) => Ok(ok),
        (Who::Human, Agent | Butler) => Err((403, "forbidden")),
        (Who::HumanOrButler, Admin | Member | Butler) => Ok(ok),
        (Who::HumanOrButler, Agent) => Err((403, "forbidden")),
        (Who::Admin, Admin) => Ok(ok),
        (Who::Admin, Member) => Err((403, "admin access required")),
        (Who::Admin, Agent | Butler) => Err((403, "forbidden")),
        (Who::AdminOrAgent, Admin | Agent | Butler) => Ok(ok),
        (Who::AdminOrAgent, Member) => Err((403, "admin access required")),
    }
}

struct Route {
    method: &'static str,
    path: String,
    who: Who,
    /// Status of a successful call.
    ok: u16,
    /// The body an admitted caller sends (valid, so that it gets a 2xx).
    body: Box<dyn Fn(Caller) -> Option<String>>,
}

fn route(
    method: &'static str,
    path: impl Into<String>,
    who: Who,
    ok: u16,
    body: impl Fn(Caller) -> Option<String> + 'static,
) -> Route {
    Route {
        method,
        path: path.into(),
        who,
        ok,
        body: Box::new(body),
    }
}

fn tag(c: Caller) -> &'static str {
    match c {
        Caller::Nobody => "nobody",
        Caller::Member => "member",
        Caller::Agent => "agent",
        Caller::Butler => "butler",
        Caller::Admin => "admin",
    }
}

#[test]
fn every_rest_route_admits_exactly_the_roles_of_the_spec() {
    let s = Server::start_with(&["--metrics-token", METRICS_TOKEN], &[]);
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "matrix-member", "MEMBER");
    let (agent_id, agent) = s.register_agent(&admin, "matrix-agent");
    let (rotate_victim, _) = s.register_agent(&admin, "rotate-victim");
    let (delete_victim, _) = s.register_agent(&admin, "delete-victim");
    let butler = s.butler_token(&admin);
    let token_of = |c: Caller| -> Option<&str> {
        match c {
            Caller::Nobody => None,
            Caller::Member => Some(&member),
            Caller::Agent => Some(&agent),
            Caller::Butler => Some(&butler),
            Caller::Admin => Some(&admin),
        }
    };
    let none = |_: Caller| None;
    let routes = vec![
        route("GET", "/api/ping", Who::Public, 200, none),
        route("POST", "/api/auth/login", Who::Public, 200, |_| {
            Some(json!({"username": "admin", "password": "admin123"}).to_string())
        }),
        route("GET", "/api/users/me", Who::Any, 200, none),
        route("GET", "/api/messages", Who::Human, 200, none),
        route("POST", "/api/messages", Who::AdminOrAgent, 201, |c| {
            Some(
                json!({"agent_id": "matrix-agent", "level": "INFO", "content": format!("posted by {}", tag(c))})
                    .to_string(),
            )
        }),
        route("GET", "/api/users/agents", Who::HumanOrButler, 200, none),
        route(
            "GET",
            "/api/users/agents/status",
            Who::HumanOrButler,
            200,
            none,
        ),
        route("GET", "/api/users/butler", Who::Human, 200, none),
        route(
            "GET",
            format!("/api/chat/history/{agent_id}"),
            Who::Any,
            200,
            none,
        ),
        route(
            "GET",
            format!("/api/chat/butler-agent/{agent_id}"),
            Who::Admin,
            200,
            none,
        ),
        route("POST", "/api/chat/auth/response", Who::Human, 200, |c| {
            Some(json!({"action_id": format!("act-{}", tag(c)), "approved": true}).to_string())
        }),
        route("POST", "/api/users", Who::Admin, 201, |c| {
            Some(
                json!({"username": format!("made-by-{}", tag(c)), "password": "pw-123456-long", "role": "MEMBER"})
                    .to_string(),
            )
        }),
        route("POST", "/api/users/agents", Who::Admin, 201, |c| {
            Some(json!({"username": format!("agent-by-{}", tag(c))}).to_string())
        }),
        route(
            "POST",
            "/api/users/agents/test-connection",
            Who::Admin,
            200,
            |_| Some(json!({"api_token": "not-a-registered-token-123"}).to_string()),
        ),
        route(
            "PATCH",
            format!("/api/users/agents/{rotate_victim}/token"),
            Who::Admin,
            200,
            |_| Some("{}".to_string()),
        ),
        route(
            "DELETE",
            format!("/api/users/agents/{delete_victim}"),
            Who::Admin,
            200,
            none,
        ),
        route("GET", "/metrics", Who::MetricsToken, 200, none),
        route(
            "GET",
            "/api/dev/mock/agent-token/matrix-agent",
            Who::Admin,
            200,
            none,
        ),
        route("POST", "/api/dev/mock/chat", Who::Admin, 201, |_| {
            Some(
                json!({"sender_username": "admin", "receiver_username": "Butler", "content": "mock"})
                    .to_string(),
            )
        }),
        route("GET", "/api/ws", Who::WsToken, 426, none),
        // Last: an admin's reset wipes every credential used above.
        route("POST", "/api/dev/mock/reset", Who::Admin, 200, none),
    ];

    let mut failures = Vec::new();
    let mut checked = 0;
    for r in &routes {
        for caller in CALLERS {
            let body = (r.body)(caller);
            let resp = s.request(r.method, &r.path, token_of(caller), body.as_deref());
            checked += 1;
            let what = format!("{:?} {} {}", caller, r.method, r.path);
            match expected(r.who, caller, r.ok) {
                Ok(status) => {
                    if resp.status != status {
                        failures.push(format!(
                            "{what}: expected {status}, got {} {}",
                            resp.status, resp.body
                        ));
                    }
                }
                Err((status, error)) => {
                    let got_error = serde_json::from_str::<Value>(&resp.body)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_string));
                    if resp.status != status || got_error.as_deref() != Some(error) {
                        failures.push(format!(
                            "{what}: expected {status} {error:?}, got {} {}",
                            resp.status, resp.body
                        ));
                    }
                }
            }
        }
    }
    assert_eq!(checked, routes.len() * CALLERS.len());
    assert!(
        failures.is_empty(),
        "{} of {checked} (caller, route) pairs wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The metrics token itself is the one credential /metrics admits.
    let s = Server::start_with(&["--metrics-token", METRICS_TOKEN], &[]);
    let r = s.get("/metrics", METRICS_TOKEN);
    assert_eq!(r.status, 200, "{}", r.body);
    // ... and it is no user credential anywhere else.
    let r = s.get("/api/users/me", METRICS_TOKEN);
    assert_eq!((r.status, r.error().as_str()), (401, "invalid token"));
}

#[test]
fn refused_callers_change_nothing() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "m", "MEMBER");
    let (victim, victim_token) = s.register_agent(&admin, "victim");
    let (_, agent) = s.register_agent(&admin, "other");
    let butler = s.butler_token(&admin);
    for token in [None, Some(member.as_str()), Some(&agent), Some(&butler)] {
        let r = s.request(
            "PATCH",
            &format!("/api/users/agents/{victim}/token"),
            token,
            Some("{}"),
        );
        assert!(matches!(r.status, 401 | 403), "{}", r.body);
        let r = s.request(
            "DELETE",
            &format!("/api/users/agents/{victim}"),
            token,
            None,
        );
        assert!(matches!(r.status, 401 | 403), "{}", r.body);
        let r = s.request("POST", "/api/dev/mock/reset", token, None);
        assert!(matches!(r.status, 401 | 403), "{}", r.body);
        let r = s.request(
            "POST",
            "/api/users",
            token,
            Some(
                &json!({"username": "intruder", "password": "pw-123456-long", "role": "ADMIN"})
                    .to_string(),
            ),
        );
        assert!(matches!(r.status, 401 | 403), "{}", r.body);
    }
    // The victim's token still works, it is still listed, and nobody was created.
    let mut ws = s.ws(&victim_token);
    ws.send_json(json!({"type": "SYSTEM_LOG", "payload": "alive", "local_id": "l1"}));
    ws.recv_type("ACK");
    let names: Vec<String> = s
        .get("/api/users/agents", &admin)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"victim".to_string()), "{names:?}");
    assert_eq!(s.login("intruder", "pw-123456-long").status, 401);
    assert_eq!(
        s.login("m", "pw-123456-long").status,
        200,
        "member survives"
    );
}

#[test]
fn bad_and_malformed_credentials_are_401_on_every_protected_route() {
    let s = Server::start_with(&["--metrics-token", METRICS_TOKEN], &[]);
    let admin = s.admin_token();
    let (agent_id, _) = s.register_agent(&admin, "cred-agent");
    let protected: Vec<(&str, String, Option<&str>)> = vec![
        ("GET", "/api/users/me".into(), None),
        ("GET", "/api/messages".into(), None),
        ("POST", "/api/messages".into(), Some("{}")),
        ("GET", "/api/users/agents".into(), None),
        ("GET", "/api/users/agents/status".into(), None),
        ("GET", "/api/users/butler".into(), None),
        ("GET", format!("/api/chat/history/{agent_id}"), None),
        ("GET", format!("/api/chat/butler-agent/{agent_id}"), None),
        ("POST", "/api/chat/auth/response".into(), Some("{}")),
        ("POST", "/api/users".into(), Some("{}")),
        ("POST", "/api/users/agents".into(), Some("{}")),
        (
            "POST",
            "/api/users/agents/test-connection".into(),
            Some("{}"),
        ),
        (
            "PATCH",
            format!("/api/users/agents/{agent_id}/token"),
            Some("{}"),
        ),
        ("DELETE", format!("/api/users/agents/{agent_id}"), None),
        ("GET", "/metrics".into(), None),
        ("GET", "/api/dev/mock/agent-token/admin".into(), None),
        ("POST", "/api/dev/mock/reset".into(), None),
        ("POST", "/api/dev/mock/chat".into(), Some("{}")),
    ];
    let headers = |v: &str| vec![("Authorization".to_string(), v.to_string())];
    let mut failures = Vec::new();
    for (method, path, body) in &protected {
        for (auth, want) in [
            ("Bearer ec_not-a-real-token-0000", "invalid token"),
            (
                "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl",
                "invalid token",
            ),
            (
                "Basic YWRtaW46YWRtaW4xMjM=",
                "invalid authorization header format",
            ),
            ("Bearer", "invalid authorization header format"),
            ("Bearer a b", "invalid authorization header format"),
        ] {
            let r = s.raw_request(method, path, &headers(auth), body.map(str::as_bytes));
            let got = serde_json::from_str::<Value>(&r.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string));
            if r.status != 401 || got.as_deref() != Some(want) {
                failures.push(format!(
                    "{method} {path} with {auth:?}: expected 401 {want:?}, got {} {}",
                    r.status, r.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The agent survived all of it.
    assert!(s
        .get("/api/users/agents", &admin)
        .body
        .contains("cred-agent"));
}

// ----- WebSocket frames ------------------------------------------------------------------

/// One live connection, remembering every frame it received so that nothing delivered to the
/// wrong connection can go unnoticed.
struct Peer {
    name: &'static str,
    id: i64,
    role: &'static str,
    ws: Ws,
    log: Vec<Value>,
}

impl Peer {
    fn wait(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(v) = self.ws.recv_within(Duration::from_millis(200)) {
                self.log.push(v.clone());
                if pred(&v) {
                    return v;
                }
            }
        }
        panic!("{} never received {what}", self.name);
    }

    fn is_human(&self) -> bool {
        matches!(self.role, "ADMIN" | "MEMBER")
    }
}

/// The `<<...>>` marker a test frame carries in its payload or local_id.
fn marker(v: &Value) -> Option<String> {
    let text = v.to_string();
    let start = text.find("<<")?;
    let end = text[start..].find(">>")? + start + 2;
    Some(text[start..end].to_string())
}

const SERVER_ONLY: [&str; 4] = ["ACK", "ERROR", "PRESENCE", "BUTLER_AGENT_MESSAGE"];
const FRAME_TYPES: [&str; 11] = [
    "SYSTEM_LOG",
    "CHAT",
    "CHAT_STREAM",
    "CHAT_STREAM_END",
    "AUTH_REQUEST",
    "AUTH_RESPONSE",
    "AUTH_STATUS_UPDATE",
    "ACK",
    "ERROR",
    "PRESENCE",
    "BUTLER_AGENT_MESSAGE",
];

/// What the SPEC says happens to one frame.
enum Outcome {
    Refused(&'static str),
    Delivered {
        /// Connections (peer indexes) that receive the frame itself, echo included.
        to: Vec<usize>,
        /// The (machine) sender gets an ACK for its local_id.
        ack: bool,
        /// Every ADMIN connection gets a BUTLER_AGENT_MESSAGE mirror.
        mirrored: bool,
    },
}

/// SPEC section 4's routing table, for peers laid out as in the test below.
fn rule(peers: &[Peer], kind: &str, sender: usize, target: Option<usize>) -> Outcome {
    let humans: Vec<usize> = (0..peers.len()).filter(|&i| peers[i].is_human()).collect();
    let role = |i: usize| peers[i].role;
    let sender_human = peers[sender].is_human();
    let with_echo = |mut to: Vec<usize>| {
        if sender_human && !to.contains(&sender) {
            to.push(sender);
        }
        to
    };
    if SERVER_ONLY.contains(&kind) {
        return Outcome::Refused("forbidden");
    }
    match kind {
        "SYSTEM_LOG" => Outcome::Delivered {
            to: humans,
            ack: !sender_human,
            mirrored: false,
        },
        "CHAT" | "CHAT_STREAM" | "CHAT_STREAM_END" => match target {
            None => Outcome::Refused("target_required"),
            Some(t) => {
                let pair = [role(sender), role(t)];
                Outcome::Delivered {
                    to: with_echo(vec![t]),
                    ack: kind == "CHAT" && !sender_human,
                    mirrored: kind == "CHAT"
                        && (pair == ["BUTLER", "AGENT"] || pair == ["AGENT", "BUTLER"]),
                }
            }
        },
        "AUTH_REQUEST" => match (role(sender), target) {
            ("BUTLER", None) => Outcome::Refused("target_required"),
            ("BUTLER", Some(t)) if peers[t].is_human() => Outcome::Delivered {
                to: vec![t],
                ack: true,
                mirrored: false,
            },
            _ => Outcome::Refused("forbidden"),
        },
        "AUTH_RESPONSE" => {
            let butler = peers.iter().position(|p| p.role == "BUTLER").unwrap();
            match target {
                _ if !sender_human => Outcome::Refused("forbidden"),
                None => Outcome::Delivered {
                    to: with_echo(vec![butler]),
                    ack: false,
                    mirrored: false,
                },
                Some(t) if t == butler => Outcome::Delivered {
                    to: with_echo(vec![butler]),
                    ack: false,
                    mirrored: false,
                },
                Some(_) => Outcome::Refused("forbidden"),
            }
        }
        "AUTH_STATUS_UPDATE" => match (role(sender), target) {
            ("BUTLER", None) => Outcome::Delivered {
                to: humans,
                ack: false,
                mirrored: false,
            },
            ("BUTLER", Some(t)) => Outcome::Delivered {
                to: vec![t],
                ack: false,
                mirrored: false,
            },
            _ => Outcome::Refused("forbidden"),
        },
        other => panic!("no rule for {other}"),
    }
}

#[test]
fn every_role_and_frame_type_pair_is_refused_or_delivered_as_the_spec_says() {
    let s = Server::start();
    let admin = s.admin_token();
    let (admin2_id, admin2) = s.create_human(&admin, "admin2", "ADMIN");
    let (member_id, member) = s.create_human(&admin, "member1", "MEMBER");
    let (member2_id, member2) = s.create_human(&admin, "member2", "MEMBER");
    let (agent_id, agent) = s.register_agent(&admin, "agent1");
    let (agent2_id, agent2) = s.register_agent(&admin, "agent2");
    let butler = s.butler_token(&admin);
    let specs: [(&'static str, i64, &'static str, &str); 7] = [
        ("admin", 1, "ADMIN", &admin),
        ("admin2", admin2_id, "ADMIN", &admin2),
        ("member1", member_id, "MEMBER", &member),
        ("member2", member2_id, "MEMBER", &member2),
        ("agent1", agent_id, "AGENT", &agent),
        ("agent2", agent2_id, "AGENT", &agent2),
        ("Butler", 2, "BUTLER", &butler),
    ];
    let mut peers: Vec<Peer> = specs
        .iter()
        .map(|(name, id, role, token)| Peer {
            name,
            id: *id,
            role,
            ws: s.ws(token),
            log: Vec::new(),
        })
        .collect();
    let senders = [0usize, 2, 4, 6];
    let targets = [None, Some(1usize), Some(3), Some(5), Some(6)];
    // (peer, marker, frame type) that the SPEC says must arrive.
    let mut expected: Vec<(usize, String, String)> = Vec::new();
    let mut refused: Vec<(usize, Option<usize>, String, String)> = Vec::new();
    let mut n = 0;
    for &sender in &senders {
        for kind in FRAME_TYPES {
            for &target in &targets {
                n += 1;
                let mark = format!("<<m{n}>>");
                let mut frame = json!({"type": kind, "local_id": mark});
                frame["payload"] = match kind {
                    "SYSTEM_LOG" | "CHAT" | "CHAT_STREAM" | "CHAT_STREAM_END" => json!(mark),
                    _ => json!({"action_id": mark, "approved": true}),
                };
                if let Some(t) = target {
                    frame["target_id"] = json!(peers[t].id);
                }
                let what = format!(
                    "{} {kind} to {}",
                    peers[sender].role,
                    target.map_or("nobody", |t| peers[t].name)
                );
                peers[sender].ws.send_json(frame);
                match rule(&peers, kind, sender, target) {
                    Outcome::Refused(code) => {
                        let e = peers[sender].wait(&format!("the ERROR for {what}"), |v| {
                            v["type"] == "ERROR" && v["local_id"] == mark.as_str()
                        });
                        assert_eq!(e["payload"]["code"], code, "{what}: {e}");
                        assert_eq!(e["sender_role"], "SERVER", "{what}: {e}");
                        expected.push((sender, mark.clone(), "ERROR".into()));
                        refused.push((sender, target, kind.to_string(), mark));
                    }
                    Outcome::Delivered { to, ack, mirrored } => {
                        let (sender_id, sender_role) = (peers[sender].id, peers[sender].role);
                        for &r in &to {
                            let got = peers[r].wait(&what, |v| {
                                v["type"] == kind && marker(v).as_deref() == Some(mark.as_str())
                            });
                            assert_eq!(got["sender_id"], sender_id, "{what}: {got}");
                            assert_eq!(got["sender_role"], sender_role, "{what}: {got}");
                            expected.push((r, mark.clone(), kind.to_string()));
                        }
                        if ack {
                            let a = peers[sender].wait(&format!("the ACK for {what}"), |v| {
                                v["type"] == "ACK" && v["local_id"] == mark.as_str()
                            });
                            assert!(a["id"].as_i64().is_some(), "{what}: {a}");
                            expected.push((sender, mark.clone(), "ACK".into()));
                        }
                        if mirrored {
                            for admin in [0, 1] {
                                peers[admin].wait(&format!("the mirror of {what}"), |v| {
                                    v["type"] == "BUTLER_AGENT_MESSAGE"
                                        && marker(v).as_deref() == Some(mark.as_str())
                                });
                                expected.push((admin, mark.clone(), "BUTLER_AGENT_MESSAGE".into()));
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(n, senders.len() * FRAME_TYPES.len() * targets.len());

    // Every sender's reader has finished routing: one more round trip each.
    for &sender in &senders {
        let mark = format!("<<flush{sender}>>");
        let id = peers[sender].id;
        peers[sender]
            .ws
            .send_json(json!({"type": "CHAT", "target_id": id, "payload": mark, "local_id": mark}));
        peers[sender].wait("its flush", |v| {
            marker(v).as_deref() == Some(mark.as_str())
                && matches!(v["type"].as_str(), Some("ACK" | "CHAT"))
        });
    }
    // A last frame to every connection, queued after anything misrouted.
    let targets_of_sentinel: Vec<i64> = peers.iter().map(|p| p.id).collect();
    for id in targets_of_sentinel {
        peers[0].ws.send_json(
            json!({"type": "CHAT", "target_id": id, "payload": format!("<<sentinel{id}>>")}),
        );
    }
    for p in peers.iter_mut() {
        let mark = format!("<<sentinel{}>>", p.id);
        p.wait("its sentinel", |v| {
            v["type"] == "CHAT" && marker(v).as_deref() == Some(mark.as_str())
        });
    }

    // Nothing arrived that the SPEC does not route there, and nothing twice.
    let mut failures = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for v in &p.log {
            let kind = v["type"].as_str().unwrap_or("?").to_string();
            if !p.is_human() && matches!(kind.as_str(), "SYSTEM_LOG" | "PRESENCE") {
                failures.push(format!("{} (a machine) received {v}", p.name));
            }
            let Some(m) = marker(v) else { continue };
            if !m.starts_with("<<m") {
                continue;
            }
            *seen.entry((m.clone(), kind.clone())).or_default() += 1;
            if !expected
                .iter()
                .any(|(r, em, ek)| *r == i && *em == m && *ek == kind)
            {
                failures.push(format!("{} received a frame not routed to it: {v}", p.name));
            }
        }
        for ((m, kind), count) in seen {
            if count > 1 {
                failures.push(format!("{} received {kind} {m} {count} times", p.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Refused frames of stored types were not stored either.
    for (sender, target, kind, mark) in &refused {
        let Some(t) = target else { continue };
        if !matches!(kind.as_str(), "CHAT" | "AUTH_REQUEST" | "AUTH_RESPONSE") {
            continue;
        }
        let token = specs[*sender].3;
        let history = s.get(&format!("/api/chat/history/{}", peers[*t].id), token);
        assert_eq!(history.status, 200, "{}", history.body);
        assert!(
            !history.body.contains(mark.as_str()),
            "refused {kind} from {} was stored: {}",
            peers[*sender].name,
            history.body
        );
    }
}

#[test]
fn agents_never_see_other_agents_traffic() {
    let s = Server::start();
    let admin = s.admin_token();
    let (_, member) = s.create_human(&admin, "watcher", "MEMBER");
    let (bystander_id, bystander_token) = s.register_agent(&admin, "bystander");
    let (busy_id, busy_token) = s.register_agent(&admin, "busy");
    let butler_token = s.butler_token(&admin);
    let mut bystander = s.ws(&bystander_token);
    let mut butler = s.ws(&butler_token);
    let mut h = s.ws(&admin);
    let mut m = s.ws(&member);
    // The busy agent connects (PRESENCE to humans only), talks, logs, streams.
    let mut busy = s.ws(&busy_token);
    let p = h.recv_until(
        |v| v["type"] == "PRESENCE" && v["payload"]["user_id"] == busy_id,
        "busy's PRESENCE",
    );
    assert_eq!(p["payload"]["online"], true);
    h.send_json(json!({"type": "CHAT", "target_id": busy_id, "payload": "secret instruction"}));
    assert_eq!(busy.recv_type("CHAT")["payload"], "secret instruction");
    for (kind, payload) in [
        ("CHAT_STREAM", "part 1"),
        ("CHAT_STREAM", "part 2"),
        ("CHAT", "part 1 part 2"),
        ("CHAT_STREAM_END", ""),
    ] {
        busy.send_json(
            json!({"type": kind, "target_id": 1, "payload": payload, "stream_id": "s1"}),
        );
        let got = h.recv_type(kind);
        assert_eq!(got["sender_id"], busy_id);
    }
    busy.send_json(
        json!({"type": "SYSTEM_LOG", "payload": {"level": "ERROR", "content": "busy log"}}),
    );
    assert_eq!(m.recv_type("SYSTEM_LOG")["payload"]["content"], "busy log");
    h.send_json(json!({"type": "SYSTEM_LOG", "payload": "a human's log"}));
    m.recv_until(
        |v| v["type"] == "SYSTEM_LOG" && v["payload"]["content"] == "a human's log",
        "the human's log",
    );
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "busy", "level": "INFO", "content": "posted log"}),
    );
    assert_eq!(r.status, 201);
    m.recv_until(
        |v| v["type"] == "SYSTEM_LOG" && v["payload"]["content"] == "posted log",
        "the posted log",
    );
    // The busy agent's reader is done routing (its ACK comes after its fan-out), then it
    // leaves (PRESENCE offline to humans only).
    busy.send_json(json!({"type": "SYSTEM_LOG", "payload": "last", "local_id": "last"}));
    busy.recv_type("ACK");
    busy.close();
    h.recv_until(
        |v| v["type"] == "PRESENCE" && v["payload"]["online"] == false,
        "busy's offline PRESENCE",
    );
    // A sentinel to the bystander and the Butler: it must be the first thing either sees.
    h.send_json(json!({"type": "CHAT", "target_id": bystander_id, "payload": "sentinel"}));
    h.send_json(json!({"type": "CHAT", "target_id": 2, "payload": "sentinel"}));
    for (name, ws) in [("bystander", &mut bystander), ("Butler", &mut butler)] {
        let first = ws
            .recv_within(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{name} got nothing"));
        assert_eq!(
            (first["type"].as_str(), first["payload"].as_str()),
            (Some("CHAT"), Some("sentinel")),
            "{name} saw other traffic first: {first}"
        );
    }
}
