//! REST: one `match` on (method, path) and a plain function per route. Each handler checks,
//! in SPEC order: route (404/405), authentication and role (401/403), body size (413),
//! validation (400). Authentication is an explicit call at the top of the handler.
//!
//! Handlers see only our own `Request` (method, path, query, headers, client address, body);
//! `bridge` turns what arrives on the public port into one, and is the only file that names
//! the HTTP library underneath.

pub mod bridge;
mod dashboard;

use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::auth::{self, AuthFailure, BearerError};
use crate::head::query_param;
use crate::hub::AnswerRefusal;
use crate::identity::{sha256_hex, AgentToken, Principal, Role};
use crate::store::{HumanChange, LogQuery, NewChat, NewLog, NewMachine, StoreError, UserRow};
use crate::wire::{self, Close, Code, Kind, UserView};
use crate::{clock, log_error};

/// Largest request body of any route (SPEC section 3).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// A page of `GET /api/messages` stops once its rows' content takes this much JSON (it always
/// has at least one row), so a page of long lines cannot grow to `limit` × the longest line.
pub const LOG_PAGE_BYTES: usize = 2 << 20;

/// A request as handlers see it: complete, its body already read and bounded by the bridge.
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    /// The client's address (through a trusted proxy: the client it names).
    pub peer: IpAddr,
    pub body: Body,
}

/// A request body: whole, or over the limit (and then never read).
pub enum Body {
    Complete(Vec<u8>),
    TooLarge,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response before it is written.
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json<T: Serialize>(status: u16, value: &T) -> Reply {
        Reply {
            status,
            body: serde_json::to_string(value).unwrap_or_else(|_| "{}".into()),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    pub fn html(body: &str) -> Reply {
        Reply {
            status: 200,
            body: body.to_string(),
            content_type: "text/html; charset=utf-8",
            headers: Vec::new(),
        }
    }

    fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, &wire::ErrorBody { error: message })
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }
}

type Result<T> = std::result::Result<T, Reply>;

impl From<StoreError> for Reply {
    fn from(e: StoreError) -> Reply {
        match e {
            StoreError::Conflict(why) => Reply::error(409, why),
            StoreError::NotFound => Reply::error(404, "not found"),
            other => {
                log_error!("http: storage failed: {other}");
                Reply::error(500, "internal server error")
            }
        }
    }
}

/// The routes of SPEC section 3, by path. Methods are checked separately (405).
enum Endpoint {
    Dashboard,
    Ping,
    Health,
    Login,
    Me,
    Messages,
    Users,
    User(String),
    MyPassword,
    Agents,
    AgentStatus,
    AgentTest,
    AgentToken(String),
    Agent(String),
    Butler,
    History(String),
    ButlerAgent(String),
    Threads,
    Thread(String),
    ThreadMessages(String),
    OpsStatus,
    AuthResponse,
    Metrics,
    DevToken(String),
    DevReset,
    DevChat,
    Ws,
    TestPanic,
}

fn endpoint(path: &str) -> Option<Endpoint> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let owned = |s: &str| s.to_string();
    Some(match segs.as_slice() {
        [] | [""] => Endpoint::Dashboard,
        ["metrics"] => Endpoint::Metrics,
        ["api", "ping"] => Endpoint::Ping,
        ["api", "health"] => Endpoint::Health,
        ["api", "ws"] => Endpoint::Ws,
        ["api", "auth", "login"] => Endpoint::Login,
        ["api", "messages"] => Endpoint::Messages,
        ["api", "users"] => Endpoint::Users,
        ["api", "users", "me"] => Endpoint::Me,
        ["api", "users", "butler"] => Endpoint::Butler,
        ["api", "users", "agents"] => Endpoint::Agents,
        ["api", "users", "agents", "status"] => Endpoint::AgentStatus,
        ["api", "users", "agents", "test-connection"] => Endpoint::AgentTest,
        ["api", "users", "agents", id] => Endpoint::Agent(owned(id)),
        ["api", "users", "agents", id, "token"] => Endpoint::AgentToken(owned(id)),
        ["api", "users", "me", "password"] => Endpoint::MyPassword,
        ["api", "users", "ops", "status"] => Endpoint::OpsStatus,
        ["api", "users", id] => Endpoint::User(owned(id)),
        ["api", "chat", "history", peer] => Endpoint::History(owned(peer)),
        ["api", "chat", "butler-agent", agent] => Endpoint::ButlerAgent(owned(agent)),
        ["api", "chat", "threads"] => Endpoint::Threads,
        ["api", "chat", "threads", id] => Endpoint::Thread(owned(id)),
        ["api", "chat", "threads", id, "messages"] => Endpoint::ThreadMessages(owned(id)),
        ["api", "chat", "auth", "response"] => Endpoint::AuthResponse,
        ["api", "dev", "mock", "agent-token", name] => {
            Endpoint::DevToken(crate::head::percent_decode(name))
        }
        ["api", "dev", "mock", "reset"] => Endpoint::DevReset,
        ["api", "dev", "mock", "chat"] => Endpoint::DevChat,
        ["api", "test", "panic"] => Endpoint::TestPanic,
        _ => return None,
    })
}

/// Everything a handler needs: the application and the request.
struct Ctx<'a> {
    app: &'a App,
    req: &'a Request,
    peer: IpAddr,
}

/// Answers one request. Never panics on its own account; the bridge catches a panic of a
/// handler anyway.
pub fn handle(app: &App, req: &Request) -> Reply {
    app.hub
        .metrics
        .http_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ctx = Ctx {
        app,
        req,
        peer: req.peer,
    };
    let cors_origin = req
        .header("origin")
        .filter(|o| app.config.allowed_origins.iter().any(|a| a == o))
        .map(str::to_string);
    let mut reply =
        if req.method == "OPTIONS" && cors_origin.is_some() && endpoint(&req.path).is_some() {
            Reply {
                status: 204,
                body: String::new(),
                content_type: "text/plain",
                headers: vec![
                    (
                        "Access-Control-Allow-Methods",
                        "GET, POST, PATCH, DELETE".into(),
                    ),
                    (
                        "Access-Control-Allow-Headers",
                        "Authorization, Content-Type".into(),
                    ),
                    ("Access-Control-Max-Age", "600".into()),
                ],
            }
        } else {
            route(&ctx).unwrap_or_else(|r| r)
        };
    // Whatever the route, a request with an over-limit body never succeeds: a handler that
    // takes no body did not look at it, and this holds for it too (after route and auth).
    if matches!(req.body, Body::TooLarge) && reply.status < 400 {
        app.hub.metrics.limit("body_too_large");
        reply = Reply::error(413, "request body too large");
    }
    if let Some(o) = cors_origin {
        reply.headers.push(("Access-Control-Allow-Origin", o));
        reply
            .headers
            .push(("Access-Control-Expose-Headers", "X-Total-Count".into()));
        reply.headers.push(("Vary", "Origin".into()));
    }
    reply
        .headers
        .push(("X-Content-Type-Options", "nosniff".into()));
    reply
}

fn route(ctx: &Ctx) -> Result<Reply> {
    let Some(ep) = endpoint(&ctx.req.path) else {
        return Err(Reply::error(404, "not found"));
    };
    // HEAD is GET without the body (the bridge's HTTP layer leaves the body out).
    let method = match ctx.req.method.as_str() {
        "HEAD" => "GET",
        m => m,
    };
    match (ep, method) {
        (Endpoint::Dashboard, "GET") => Ok(dashboard::page()),
        (Endpoint::Ping, "GET") => Ok(Reply::json(200, &serde_json::json!({"message": "pong"}))),
        (Endpoint::Health, "GET") => Ok(health(ctx)),
        (Endpoint::Ws, "GET") => Err(Reply::error(426, "websocket upgrade required")),
        (Endpoint::Login, "POST") => login(ctx),
        (Endpoint::Me, "GET") => me(ctx),
        (Endpoint::Messages, "GET") => list_logs(ctx),
        (Endpoint::Messages, "POST") => post_log(ctx),
        (Endpoint::Users, "POST") => create_user(ctx),
        (Endpoint::Users, "GET") => list_humans(ctx),
        (Endpoint::User(id), "PATCH") => update_human(ctx, &id),
        (Endpoint::User(id), "DELETE") => delete_human(ctx, &id),
        (Endpoint::MyPassword, "POST") => change_my_password(ctx),
        (Endpoint::Agents, "GET") => list_agents(ctx),
        (Endpoint::Agents, "POST") => register_agent(ctx),
        (Endpoint::AgentStatus, "GET") => agent_statuses(ctx),
        (Endpoint::AgentTest, "POST") => test_connection(ctx),
        (Endpoint::AgentToken(id), "PATCH") => rotate_token(ctx, &id),
        (Endpoint::Agent(id), "DELETE") => delete_agent(ctx, &id),
        (Endpoint::Butler, "GET") => butler(ctx),
        (Endpoint::History(peer), "GET") => history(ctx, &peer),
        (Endpoint::ButlerAgent(agent), "GET") => butler_agent(ctx, &agent),
        (Endpoint::Threads, "GET") => list_threads(ctx),
        (Endpoint::Threads, "POST") => create_thread(ctx),
        (Endpoint::Thread(id), "PATCH") => update_thread(ctx, &id),
        (Endpoint::ThreadMessages(id), "GET") => thread_messages(ctx, &id),
        (Endpoint::OpsStatus, "GET") => ops_status(ctx),
        (Endpoint::AuthResponse, "POST") => auth_response(ctx),
        (Endpoint::Metrics, "GET") => metrics(ctx),
        (Endpoint::DevToken(name), "GET") => dev_token(ctx, &name),
        (Endpoint::DevReset, "POST") => dev_reset(ctx),
        (Endpoint::DevChat, "POST") => dev_chat(ctx),
        (Endpoint::TestPanic, "POST") if ctx.app.config.fault_injection => {
            panic!("fault injection: POST /api/test/panic")
        }
        (Endpoint::TestPanic, _) if !ctx.app.config.fault_injection => {
            Err(Reply::error(404, "not found"))
        }
        _ => Err(Reply::error(405, "method not allowed")),
    }
}

// ----- authentication --------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Any authenticated user, human or machine.
    Any,
    Human,
    /// The agent directory: humans, and the Butler, which instructs agents by name.
    HumanOrButler,
    Admin,
    AdminOrAgent,
}

fn authorize(ctx: &Ctx, access: Access) -> Result<Principal> {
    let metrics = &ctx.app.hub.metrics;
    let failed = || {
        metrics
            .auth_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    };
    let token = auth::parse_bearer(ctx.req.header("authorization")).map_err(|e| {
        failed();
        match e {
            BearerError::Missing => Reply::error(401, "authorization header required"),
            BearerError::Malformed => Reply::error(401, "invalid authorization header format"),
        }
    })?;
    // An address that keeps presenting bad tokens is not even asked for the next one.
    if let Some(wait) = ctx.app.token_failures.retry_after(ctx.peer) {
        metrics.limit("auth_throttled");
        crate::log_refusal!("http {}: 429 too many failed authentications", ctx.peer);
        return Err(throttled(wait));
    }
    let who = ctx.app.authenticate(token).map_err(|e| match e {
        AuthFailure::Invalid => {
            failed();
            ctx.app.token_failures.record_failure(ctx.peer);
            crate::log_refusal!(
                "http {}: 401 invalid token for {} {}",
                ctx.peer,
                ctx.req.method,
                ctx.req.path
            );
            Reply::error(401, "invalid token")
        }
        AuthFailure::Unavailable => Reply::error(500, "internal server error"),
    })?;
    let allowed = match access {
        Access::Any => true,
        Access::Human => who.role.is_human(),
        Access::HumanOrButler => who.role.is_human() || who.role == Role::Butler,
        Access::Admin => who.role == Role::Admin,
        Access::AdminOrAgent => matches!(who.role, Role::Admin | Role::Agent | Role::Butler),
    };
    if !allowed {
        let human_lacking_admin =
            who.role == Role::Member && matches!(access, Access::Admin | Access::AdminOrAgent);
        return Err(if human_lacking_admin {
            Reply::error(403, "admin access required")
        } else {
            Reply::error(403, "forbidden")
        });
    }
    Ok(who)
}

/// 429 for an address over the failed-authentication limit.
fn throttled(wait: u64) -> Reply {
    Reply::error(429, "too many failed authentications")
        .with_header("Retry-After", wait.to_string())
}

// ----- request bodies and query parameters ----------------------------------------------

/// The body, if it is at most `limit` bytes (else 413).
fn body_within<'a>(ctx: &'a Ctx, limit: usize) -> Result<&'a [u8]> {
    match &ctx.req.body {
        Body::Complete(b) if b.len() <= limit => Ok(b),
        _ => {
            ctx.app.hub.metrics.limit("body_too_large");
            Err(Reply::error(413, "request body too large"))
        }
    }
}

fn read_body<'a>(ctx: &'a Ctx) -> Result<&'a [u8]> {
    body_within(ctx, MAX_BODY_BYTES)
}

/// A JSON object into `T`. Serde's derived structs would also take a JSON array as their
/// fields in order (`[]` as an object with every field absent); a body must be an object.
fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    if !wire::is_json_object(bytes) {
        return Err(Reply::error(400, "invalid request body"));
    }
    serde_json::from_slice(bytes).map_err(|_| Reply::error(400, "invalid request body"))
}

fn json_body<T: DeserializeOwned>(ctx: &Ctx) -> Result<T> {
    parse_body(read_body(ctx)?)
}

fn param(ctx: &Ctx, name: &str) -> Option<String> {
    ctx.req
        .query
        .as_deref()
        .and_then(|q| query_param(q, name))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// An integer query parameter: absent → None; not an integer or below `min` → 400
/// `invalid <name>`; above `cap` → clamped.
fn int_param(ctx: &Ctx, name: &str, min: i64, cap: i64) -> Result<Option<i64>> {
    let raw = ctx.req.query.as_deref().and_then(|q| query_param(q, name));
    match raw {
        None => Ok(None),
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) if n >= min => Ok(Some(n.min(cap))),
            _ => Err(Reply::error(400, &format!("invalid {name}"))),
        },
    }
}

/// An RFC 3339 time parameter, as the stored timestamps spell it (they sort as text).
fn time_param(ctx: &Ctx, name: &str) -> Result<Option<String>> {
    match param(ctx, name) {
        None => Ok(None),
        Some(v) => clock::parse_rfc3339(&v)
            .map(|ms| Some(clock::format_ms(ms)))
            .ok_or_else(|| Reply::error(400, &format!("invalid {name}"))),
    }
}

fn path_id(raw: &str, name: &str) -> Result<i64> {
    raw.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Reply::error(400, &format!("invalid {name}")))
}

// ----- views -----------------------------------------------------------------------------

fn user_views(ctx: &Ctx, rows: Vec<UserRow>) -> Result<Vec<UserView>> {
    let names: Vec<&str> = rows
        .iter()
        .filter(|u| !u.role.is_human())
        .map(|u| u.username.as_str())
        .collect();
    let reports = ctx.app.store.last_reports(&names)?;
    Ok(rows
        .into_iter()
        .map(|u| {
            let report = reports.get(&u.username).cloned();
            user_view(ctx, u, report)
        })
        .collect())
}

fn user_view(ctx: &Ctx, u: UserRow, last_report: Option<String>) -> UserView {
    let machine = (!u.role.is_human()).then(|| {
        // One look at the registry gives presence and last-seen together; the database's
        // last_seen_at is for users that have not disconnected since this server started.
        let presence = ctx.app.hub.presence(u.id);
        let online = presence.online;
        wire::MachineView {
            token_hint: u.token_hint.clone(),
            token_updated_at: u.token_updated_at.clone(),
            status: crate::hub::machine_status(online, presence.busy),
            activity: if presence.busy { "BUSY" } else { "IDLE" },
            online,
            last_seen_at: presence
                .last_seen_ms
                .map(clock::format_ms)
                .or(u.last_seen_at.clone()),
            last_report: last_report.unwrap_or_else(|| {
                if online {
                    "websocket_connected"
                } else {
                    "websocket_disconnected"
                }
                .to_string()
            }),
        }
    });
    UserView {
        id: u.id,
        username: u.username,
        role: u.role.as_str(),
        actor_type: u.role.actor_type(),
        agent_kind: u.agent_kind,
        runtime_kind: u.runtime_kind,
        description: u.description,
        created_at: u.created_at,
        disabled: u.role.is_human().then_some(u.disabled),
        password_min_length: None,
        machine,
        api_token: None,
    }
}

fn single_view(ctx: &Ctx, u: UserRow) -> Result<UserView> {
    Ok(user_views(ctx, vec![u])?
        .pop()
        .expect("one row in, one view out"))
}

// ----- handlers --------------------------------------------------------------------------

fn login(ctx: &Ctx) -> Result<Reply> {
    // The attempt is taken before the (slow) verification, so parallel guesses cannot all
    // pass the limit before any of them is counted.
    let attempt = ctx.app.logins.reserve(ctx.peer).map_err(|wait| {
        ctx.app.hub.metrics.limit("login_rate_limited");
        crate::log_refusal!("login {}: 429 too many login attempts", ctx.peer);
        Reply::error(429, "too many login attempts").with_header("Retry-After", wait.to_string())
    })?;
    let user = match verify_login(ctx) {
        Ok(Some(user)) => user,
        Ok(None) => {
            ctx.app
                .hub
                .metrics
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::log_refusal!(
                "login {}: 401 invalid credentials (user {})",
                ctx.peer,
                attempted_username(ctx)
            );
            return Err(Reply::error(401, "invalid credentials"));
        }
        Err(reply) => {
            attempt.release();
            return Err(reply);
        }
    };
    attempt.release();
    if user.disabled {
        // Said only to someone who knows the password.
        crate::log_refusal!(
            "login {}: 403 account disabled (user {})",
            ctx.peer,
            user.username
        );
        return Err(Reply::error(403, "account disabled"));
    }
    let token = ctx
        .app
        .keys
        .issue(user.id, user.role, user.session_gen, clock::now_secs());
    let user = single_view(ctx, user)?;
    Ok(Reply::json(200, &wire::LoginResponse { token, user }))
}

/// The username a login body named, for the refusal's log line (never the password; a name
/// that is not a valid username, perhaps a password typed in the wrong field, is not shown).
fn attempted_username(ctx: &Ctx) -> String {
    let name = read_body(ctx)
        .ok()
        .and_then(|b| serde_json::from_slice::<wire::LoginRequest>(b).ok())
        .map(|r| r.username);
    match name {
        Some(n) if auth::valid_username(&n) => n,
        _ => "(not a valid username)".to_string(),
    }
}

/// The user behind a login body's credentials; None when they are wrong.
fn verify_login(ctx: &Ctx) -> Result<Option<UserRow>> {
    let req: wire::LoginRequest = json_body(ctx)?;
    if req.username.is_empty() || req.password.is_empty() {
        return Err(Reply::error(400, "invalid request body"));
    }
    let found = ctx.app.store.password_hash(&req.username)?;
    // An unknown user is checked against a dummy hash: it takes as long as a wrong password.
    let hash = found
        .as_ref()
        .map_or(auth::dummy_hash(), |(_, h)| h.as_str());
    let verified = check_password(ctx, &req.password, hash)?;
    match (verified, found) {
        (true, Some((id, _))) => Ok(ctx.app.store.user_by_id(id)?),
        _ => Ok(None),
    }
}

/// A password check, or 503 when the password thread is full (a login flood must not tie up
/// every HTTP worker).
fn check_password(ctx: &Ctx, password: &str, hash: &str) -> Result<bool> {
    auth::verify_password_if_free(password, hash).map_err(|auth::PasswordsBusy| {
        ctx.app.hub.metrics.limit("login_busy");
        Reply::error(503, "server busy, retry").with_header("Retry-After", "1".into())
    })
}

/// For load balancers and systemd: 200 when a read answers and the writer commits within
/// 2 s, else 503; the body says which part failed.
fn health(ctx: &Ctx) -> Reply {
    let database = match ctx.app.store.readable() {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            log_error!("health: the database does not answer: {e}");
            "unreachable".to_string()
        }
    };
    let writer = if ctx
        .app
        .store
        .writer_answers(std::time::Duration::from_secs(2))
    {
        "ok"
    } else {
        "stalled"
    };
    let ok = database == "ok" && writer == "ok";
    let mut body = serde_json::json!({
        "status": if ok { "ok" } else { "unavailable" },
        "database": database,
        "writer": writer,
    });
    // Among several nodes: which one answered (its row in `nodes`).
    if let Some(c) = ctx.app.store.cluster() {
        body["node"] = serde_json::json!(c.node());
    }
    Reply::json(if ok { 200 } else { 503 }, &body)
}

fn me(ctx: &Ctx) -> Result<Reply> {
    let who = authorize(ctx, Access::Any)?;
    let row = ctx
        .app
        .store
        .user_by_id(who.id)?
        .ok_or_else(|| Reply::error(401, "invalid token"))?;
    let human = row.role.is_human();
    let mut view = single_view(ctx, row)?;
    if human {
        view.password_min_length = Some(auth::min_password_length(ctx.app.production()));
    }
    Ok(Reply::json(200, &view))
}

/// How long a log search waits for its turn before it is told to retry.
const SEARCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Text searches run at most half the cores at a time (at least one). A search of a large log
/// is CPU for as long as it runs: seven at once on 2 cores held an agent's authentication up
/// to 0.8 s at p99 (`echoload search`); the rest of the server needs a core of its own.
fn searches() -> &'static bridge::Slots {
    static SEARCHES: std::sync::OnceLock<bridge::Slots> = std::sync::OnceLock::new();
    SEARCHES.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        bridge::Slots::new((cores / 2).max(1))
    })
}

fn list_logs(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Human)?;
    let query = LogQuery {
        offset: int_param(ctx, "offset", 0, i64::MAX)?.unwrap_or(0),
        limit: int_param(ctx, "limit", 1, 200)?.unwrap_or(50),
        agent_id: param(ctx, "agent_id"),
        levels: param(ctx, "level")
            .map(|l| {
                l.split(',')
                    .map(|p| p.trim().to_ascii_uppercase())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        q: param(ctx, "q"),
        before_id: int_param(ctx, "before_id", 1, i64::MAX)?,
        since: time_param(ctx, "since")?,
        until: time_param(ctx, "until")?,
        max_bytes: LOG_PAGE_BYTES,
    };
    let rows = match &query.q {
        Some(_) => {
            let Some(_turn) = searches().take(SEARCH_WAIT) else {
                ctx.app.hub.metrics.limit("searches_busy");
                return Err(
                    Reply::error(503, "server busy, retry").with_header("Retry-After", "1".into())
                );
            };
            ctx.app.store.logs(&query)?
        }
        None => ctx.app.store.logs(&query)?,
    };
    let views: Vec<wire::LogView> = rows
        .iter()
        .map(|r| wire::LogView {
            id: r.id,
            agent_id: &r.agent_id,
            level: &r.level,
            content: &r.content,
            timestamp: &r.timestamp,
        })
        .collect();
    Ok(Reply::json(200, &views))
}

fn post_log(ctx: &Ctx) -> Result<Reply> {
    let who = authorize(ctx, Access::AdminOrAgent)?;
    // One content limit for both ways in: a posted log line is a WebSocket message's size.
    let req: wire::PostLogRequest =
        parse_body(body_within(ctx, ctx.app.config.max_message_bytes)?)?;
    let agent_id = if who.role.is_human() {
        req.agent_id
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| Reply::error(400, "agent_id is required"))?
    } else {
        who.username.clone()
    };
    let level = crate::hub::normalize_level(req.level.as_deref().filter(|l| !l.is_empty()))
        .ok_or_else(|| Reply::error(400, "invalid level"))?;
    if !ctx.app.hub.allow_log(who.id, req.content.len()) {
        return Err(Reply::error(429, "too many log bytes; retry later")
            .with_header("Retry-After", "1".into()));
    }
    let log = NewLog {
        sender_id: Some(who.id),
        agent_id,
        level,
        content: req.content,
        local_id: None,
    };
    let stored = ctx.app.hub.post_log(&who, &log)?;
    Ok(Reply::json(
        201,
        &wire::LogView {
            id: stored.id,
            agent_id: &log.agent_id,
            level: &log.level,
            content: &log.content,
            timestamp: &stored.timestamp,
        },
    ))
}

fn create_user(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let req: wire::CreateUserRequest = json_body(ctx)?;
    if !auth::valid_username(&req.username) {
        return Err(Reply::error(400, "invalid username"));
    }
    let role = match Role::parse(&req.role.to_ascii_uppercase()) {
        Some(r @ (Role::Admin | Role::Member)) => r,
        _ => return Err(Reply::error(400, "invalid role")),
    };
    if req.password.is_empty() {
        return Err(Reply::error(400, "password is required"));
    }
    if let Some(problem) = auth::password_problem(&req.password, ctx.app.production()) {
        return Err(Reply::error(400, &problem));
    }
    let row =
        ctx.app
            .store
            .create_human(&req.username, role, &auth::hash_password(&req.password))?;
    ctx.app.hub.forget_user(row.id);
    Ok(Reply::json(201, &single_view(ctx, row)?))
}

fn list_humans(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let rows = ctx.app.store.humans()?;
    Ok(Reply::json(200, &user_views(ctx, rows)?))
}

/// The live human behind `:id`, or 404 `user not found` (agents have their own routes).
fn human_target(ctx: &Ctx, raw_id: &str) -> Result<UserRow> {
    let id = path_id(raw_id, "user id")?;
    match ctx.app.store.user_by_id(id)? {
        Some(u) if !u.deleted && u.role.is_human() => Ok(u),
        Some(u) if !u.deleted => Err(Reply::error(400, "target user is not a human")),
        _ => Err(Reply::error(404, "user not found")),
    }
}

fn update_human(ctx: &Ctx, raw_id: &str) -> Result<Reply> {
    let me = authorize(ctx, Access::Admin)?;
    let req: wire::UpdateUserRequest = json_body(ctx)?;
    let user = human_target(ctx, raw_id)?;
    let role = match req.role.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None => None,
        Some("ADMIN") => Some(Role::Admin),
        Some("MEMBER") => Some(Role::Member),
        Some(_) => return Err(Reply::error(400, "invalid role")),
    };
    if req.disabled == Some(true) && user.id == me.id {
        return Err(Reply::error(400, "cannot disable yourself"));
    }
    let password_hash = match req.password.as_deref() {
        None => None,
        Some(p) => match auth::password_problem(p, ctx.app.production()) {
            Some(problem) => return Err(Reply::error(400, &problem)),
            None => Some(auth::hash_password(p)),
        },
    };
    let change = HumanChange {
        role,
        disabled: req.disabled,
        password_hash,
    };
    let row = ctx.app.store.update_human(user.id, &change)?;
    if row.session_gen != user.session_gen {
        let close = if row.disabled {
            Close::UserDisabled
        } else {
            Close::SessionRevoked
        };
        ctx.app.hub.close_user(user.id, close);
    }
    ctx.app.hub.forget_user(user.id);
    Ok(Reply::json(200, &single_view(ctx, row)?))
}

fn delete_human(ctx: &Ctx, raw_id: &str) -> Result<Reply> {
    let me = authorize(ctx, Access::Admin)?;
    let user = human_target(ctx, raw_id)?;
    if user.id == me.id {
        return Err(Reply::error(400, "cannot remove yourself"));
    }
    ctx.app.store.delete_human(user.id)?;
    ctx.app.hub.forget_user(user.id);
    ctx.app.hub.close_user(user.id, Close::UserRemoved);
    Ok(Reply::json(200, &serde_json::json!({"ok": true})))
}

/// A human changes its own password; every session of the account ends (this request's JWT
/// too), and the answer carries a fresh JWT so the caller stays logged in.
fn change_my_password(ctx: &Ctx) -> Result<Reply> {
    let me = authorize(ctx, Access::Human)?;
    let attempt = ctx.app.logins.reserve(ctx.peer).map_err(|wait| {
        ctx.app.hub.metrics.limit("login_rate_limited");
        Reply::error(429, "too many login attempts").with_header("Retry-After", wait.to_string())
    })?;
    let req: wire::ChangePasswordRequest = match json_body(ctx) {
        Ok(r) => r,
        Err(e) => {
            attempt.release();
            return Err(e);
        }
    };
    let current = ctx.app.store.password_hash_of(me.id)?.unwrap_or_default();
    let verified = match check_password(ctx, &req.current_password, &current) {
        Ok(v) => v,
        Err(busy) => {
            attempt.release();
            return Err(busy);
        }
    };
    if !verified {
        return Err(Reply::error(401, "invalid credentials"));
    }
    attempt.release();
    if let Some(problem) = auth::password_problem(&req.new_password, ctx.app.production()) {
        return Err(Reply::error(400, &problem));
    }
    if req.new_password == req.current_password {
        return Err(Reply::error(
            400,
            "new password must differ from the current one",
        ));
    }
    let change = HumanChange {
        password_hash: Some(auth::hash_password(&req.new_password)),
        ..HumanChange::default()
    };
    let row = ctx.app.store.update_human(me.id, &change)?;
    ctx.app.hub.close_user(me.id, Close::SessionRevoked);
    let token = ctx
        .app
        .keys
        .issue(row.id, row.role, row.session_gen, clock::now_secs());
    let user = single_view(ctx, row)?;
    Ok(Reply::json(200, &wire::LoginResponse { token, user }))
}

fn list_agents(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::HumanOrButler)?;
    let q = param(ctx, "q").map(|s| s.to_lowercase());
    let excluded: Vec<String> = param(ctx, "exclude_role")
        .map(|s| {
            s.split(',')
                .map(|r| r.trim().to_ascii_uppercase())
                .collect()
        })
        .unwrap_or_default();
    let page = int_param(ctx, "page", 1, i64::MAX)?;
    let limit = int_param(ctx, "limit", 1, 200)?;
    let rows: Vec<UserRow> = ctx
        .app
        .store
        .machines()?
        .into_iter()
        .filter(|u| !excluded.iter().any(|r| r == u.role.as_str()))
        .filter(|u| {
            q.as_ref().is_none_or(|q| {
                u.username.to_lowercase().contains(q) || u.role.as_str().to_lowercase().contains(q)
            })
        })
        .collect();
    let total = rows.len();
    let rows: Vec<UserRow> = match (page, limit) {
        (None, None) => rows,
        (page, limit) => {
            let limit = limit.unwrap_or(50) as usize;
            let skip = (page.unwrap_or(1) as usize - 1).saturating_mul(limit);
            rows.into_iter().skip(skip).take(limit).collect()
        }
    };
    Ok(Reply::json(200, &user_views(ctx, rows)?).with_header("X-Total-Count", total.to_string()))
}

fn agent_statuses(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::HumanOrButler)?;
    let agents: Vec<UserRow> = ctx
        .app
        .store
        .machines()?
        .into_iter()
        .filter(|u| u.role == Role::Agent)
        .collect();
    let statuses: Vec<wire::AgentStatus> = user_views(ctx, agents)?
        .into_iter()
        .filter_map(|v| {
            let m = v.machine?;
            Some(wire::AgentStatus {
                id: v.id,
                username: v.username,
                role: v.role,
                status: m.status,
                activity: m.activity,
                online: m.online,
                last_seen_at: m.last_seen_at,
                last_report: m.last_report,
            })
        })
        .collect();
    Ok(Reply::json(200, &statuses))
}

fn butler(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Human)?;
    match ctx.app.store.butler()? {
        Some(b) => Ok(Reply::json(200, &single_view(ctx, b)?)),
        None => Err(Reply::error(404, "butler not found")),
    }
}

fn register_agent(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let req: wire::RegisterAgentRequest = json_body(ctx)?;
    let username = req.username.as_deref().map(str::trim).unwrap_or("");
    if username.is_empty() {
        return Err(Reply::error(400, "username is required"));
    }
    if !auth::valid_username(username) {
        return Err(Reply::error(400, "invalid username"));
    }
    let token = supplied_or_new_token(req.api_token.as_deref())?;
    let kind = |v: &Option<String>, default: &str| {
        v.as_deref()
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default.to_string())
    };
    let row = ctx.app.store.create_machine(
        &NewMachine {
            username,
            role: Role::Agent,
            token: &token,
            agent_kind: &kind(&req.agent_kind, "generic"),
            runtime_kind: &kind(&req.runtime_kind, "websocket"),
            description: req.description.as_deref().unwrap_or("").trim(),
        },
        !ctx.app.production(),
    )?;
    ctx.app.hub.forget_user(row.id);
    let mut view = single_view(ctx, row)?;
    view.api_token = Some(token.expose().to_string());
    Ok(Reply::json(201, &view))
}

/// A caller-supplied token (validated), or a fresh one when none was given.
fn supplied_or_new_token(supplied: Option<&str>) -> Result<AgentToken> {
    match supplied.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) if auth::valid_supplied_token(t) => Ok(AgentToken::new(t)),
        Some(_) => Err(Reply::error(400, "invalid api_token")),
        None => Ok(auth::generate_token()),
    }
}

fn test_connection(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let req: wire::TokenRequest = json_body(ctx)?;
    let token = req.api_token.as_deref().map(str::trim).unwrap_or("");
    if token.is_empty() {
        return Err(Reply::error(400, "api_token is required"));
    }
    let found = ctx
        .app
        .store
        .machine_by_token_hash(&AgentToken::new(token).sha256())?;
    Ok(Reply::json(
        200,
        &match found {
            Some(u) => wire::TestConnectionResponse {
                ok: true,
                message: "token accepted by backend",
                agent_id: Some(u.id),
                agent_name: Some(u.username),
            },
            None => wire::TestConnectionResponse {
                ok: false,
                message: "token is not registered to any agent",
                agent_id: None,
                agent_name: None,
            },
        },
    ))
}

/// The agent (or Butler) behind `:id`, or the SPEC's 400/404.
fn machine_target(ctx: &Ctx, raw_id: &str, allow_butler: bool) -> Result<UserRow> {
    let id = path_id(raw_id, "agent id")?;
    let user = ctx
        .app
        .store
        .user_by_id(id)?
        .filter(|u| !u.deleted)
        .ok_or_else(|| Reply::error(404, "agent not found"))?;
    let ok = user.role == Role::Agent || (allow_butler && user.role == Role::Butler);
    if !ok {
        return Err(Reply::error(400, "target user is not an agent"));
    }
    Ok(user)
}

fn rotate_token(ctx: &Ctx, raw_id: &str) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let bytes = read_body(ctx)?;
    let req: wire::TokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        wire::TokenRequest { api_token: None }
    } else {
        parse_body(bytes)?
    };
    let user = machine_target(ctx, raw_id, true)?;
    let token = supplied_or_new_token(req.api_token.as_deref())?;
    ctx.app
        .store
        .rotate_token(user.id, &token, !ctx.app.production())?;
    ctx.app.hub.close_user(user.id, Close::TokenRevoked);
    Ok(Reply::json(
        200,
        &wire::RotateResponse {
            ok: true,
            message: "agent token updated",
            agent_id: user.id,
            api_token: token.expose().to_string(),
        },
    ))
}

fn delete_agent(ctx: &Ctx, raw_id: &str) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let user = machine_target(ctx, raw_id, false)?;
    ctx.app.store.delete_agent(user.id)?;
    ctx.app.hub.forget_user(user.id);
    ctx.app.hub.close_user(user.id, Close::AgentRemoved);
    Ok(Reply::json(200, &serde_json::json!({"ok": true})))
}

fn chat_rows(rows: &[crate::store::ChatRow]) -> Vec<wire::ChatView<'_>> {
    rows.iter()
        .map(|r| wire::ChatView {
            id: r.id,
            local_id: r.local_id.as_deref(),
            sender_id: r.sender_id,
            receiver_id: r.receiver_id,
            kind: &r.kind,
            payload: &r.payload,
            stream_id: r.stream_id.as_deref(),
            conversation_id: r.conversation_id,
            timestamp: &r.timestamp,
            delivery: r.delivery.as_str(),
        })
        .collect()
}

fn history(ctx: &Ctx, raw_peer: &str) -> Result<Reply> {
    let who = authorize(ctx, Access::Any)?;
    let peer = raw_peer
        .parse::<i64>()
        .map_err(|_| Reply::error(400, "invalid peer_id"))?;
    let limit = int_param(ctx, "limit", 1, 500)?.unwrap_or(100);
    let before = int_param(ctx, "before_id", 1, i64::MAX)?;
    let rows = ctx.app.store.chat_history(who.id, peer, limit, before)?;
    Ok(Reply::json(200, &chat_rows(&rows)))
}

fn butler_agent(ctx: &Ctx, raw_agent: &str) -> Result<Reply> {
    authorize(ctx, Access::Admin)?;
    let agent = path_id(raw_agent, "agent_id")?;
    let limit = int_param(ctx, "limit", 1, 500)?.unwrap_or(100);
    let before = int_param(ctx, "before_id", 1, i64::MAX)?;
    let butler = ctx
        .app
        .store
        .butler()?
        .ok_or_else(|| Reply::error(404, "butler not found"))?;
    let rows = ctx
        .app
        .store
        .chat_history(butler.id, agent, limit, before)?;
    Ok(Reply::json(200, &chat_rows(&rows)))
}

// ----- conversation threads (README "Threads") ------------------------------------------

fn thread_view(t: crate::store::ThreadRow) -> wire::ThreadView {
    wire::ThreadView {
        id: t.id,
        owner_user_id: t.owner_user_id,
        peer_user_id: t.peer_user_id,
        channel_kind: t.channel_kind,
        title: t.title,
        summary: t.summary,
        is_pinned: t.is_pinned,
        is_default: t.is_default,
        archived_at: t.archived_at,
        last_message_at: t.last_message_at,
        created_at: t.created_at,
        updated_at: t.updated_at,
    }
}

fn channel_kind_param(raw: &str) -> Result<&'static str> {
    match raw {
        "agent_direct" => Ok("agent_direct"),
        "butler_direct" => Ok("butler_direct"),
        _ => Err(Reply::error(400, "invalid channel_kind")),
    }
}

fn list_threads(ctx: &Ctx) -> Result<Reply> {
    let who = authorize(ctx, Access::Human)?;
    let peer = int_param(ctx, "peer_id", 1, i64::MAX)?;
    let kind = param(ctx, "channel_kind")
        .map(|k| channel_kind_param(&k))
        .transpose()?;
    let rows = ctx.app.store.threads(who.id, peer, kind)?;
    let views: Vec<wire::ThreadView> = rows.into_iter().map(thread_view).collect();
    Ok(Reply::json(200, &views))
}

fn create_thread(ctx: &Ctx) -> Result<Reply> {
    let who = authorize(ctx, Access::Human)?;
    let req: wire::CreateThreadRequest = json_body(ctx)?;
    let (Some(peer), Some(kind)) = (req.peer_id, req.channel_kind.as_deref()) else {
        return Err(Reply::error(400, "peer_id and channel_kind are required"));
    };
    let kind = channel_kind_param(kind)?;
    let peer_user = ctx
        .app
        .store
        .user_by_id(peer)?
        .filter(|u| !u.deleted && !u.role.is_human())
        .ok_or_else(|| Reply::error(400, "invalid peer_id"))?;
    if crate::hub::channel_kind(peer_user.role) != kind {
        return Err(Reply::error(400, "invalid channel_kind"));
    }
    let title = req
        .title
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or("New conversation");
    if title.chars().count() > 200 {
        return Err(Reply::error(400, "title is too long"));
    }
    let row = ctx.app.store.create_thread(who.id, peer, kind, title)?;
    Ok(Reply::json(201, &thread_view(row)))
}

/// The caller's own thread, or 404 `conversation thread not found` (also for others').
fn own_thread(ctx: &Ctx, who: &Principal, raw_id: &str) -> Result<crate::store::ThreadRow> {
    let not_found = || Reply::error(404, "conversation thread not found");
    let id = raw_id.parse::<i64>().map_err(|_| not_found())?;
    ctx.app
        .store
        .thread(id)?
        .filter(|t| t.owner_user_id == who.id)
        .ok_or_else(not_found)
}

fn update_thread(ctx: &Ctx, raw_id: &str) -> Result<Reply> {
    let who = authorize(ctx, Access::Human)?;
    let req: wire::UpdateThreadRequest = json_body(ctx)?;
    let thread = own_thread(ctx, &who, raw_id)?;
    let title = match req.title.as_deref().map(str::trim) {
        Some("") => Some("New conversation".to_string()),
        Some(t) if t.chars().count() > 200 => return Err(Reply::error(400, "title is too long")),
        other => other.map(str::to_string),
    };
    let change = crate::store::ThreadChange {
        title,
        summary: req.summary,
        is_pinned: req.is_pinned,
        is_archived: req.is_archived,
    };
    let row = ctx.app.store.update_thread(thread.id, &change)?;
    Ok(Reply::json(200, &thread_view(row)))
}

fn thread_messages(ctx: &Ctx, raw_id: &str) -> Result<Reply> {
    let who = authorize(ctx, Access::Human)?;
    let thread = own_thread(ctx, &who, raw_id)?;
    let limit = int_param(ctx, "limit", 1, 500)?.unwrap_or(200);
    let before = int_param(ctx, "before_id", 1, i64::MAX)?;
    let rows = ctx.app.store.thread_messages(thread.id, limit, before)?;
    Ok(Reply::json(200, &chat_rows(&rows)))
}

/// The original's optional operations executor is not part of EchoCenter; its dashboard polls
/// this and shows a red banner on a 404, so it gets the "not configured" answer.
fn ops_status(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx, Access::Human)?;
    Ok(Reply::json(
        200,
        &serde_json::json!({
            "enabled": false,
            "worker_reachable": false,
            "node_count": 0,
            "ssh_key_count": 0
        }),
    ))
}

fn auth_response(ctx: &Ctx) -> Result<Reply> {
    let who = authorize(ctx, Access::Human)?;
    let req: wire::AuthResponseRequest = json_body(ctx)?;
    let payload =
        serde_json::json!({"action_id": req.action_id, "approved": req.approved}).to_string();
    let payload = serde_json::value::RawValue::from_string(payload)
        .map_err(|_| Reply::error(400, "invalid request body"))?;
    match ctx.app.hub.post_auth_response(&who, &payload) {
        Ok(()) => Ok(Reply::json(
            200,
            &serde_json::json!({"status": "processed"}),
        )),
        Err(AnswerRefusal::Failed(e)) if e.code == Code::TargetNotFound => {
            Err(Reply::error(404, "butler not found"))
        }
        Err(AnswerRefusal::Answered(_)) => Err(Reply::error(409, "approval already answered")),
        Err(AnswerRefusal::NotAddressee) => Err(Reply::error(403, "forbidden")),
        Err(AnswerRefusal::Failed(_)) => Err(Reply::error(500, "internal server error")),
    }
}

fn metrics(ctx: &Ctx) -> Result<Reply> {
    let Some(expected) = &ctx.app.config.metrics_token else {
        return Err(Reply::error(404, "not found"));
    };
    let presented = auth::parse_bearer(ctx.req.header("authorization")).map_err(|e| match e {
        BearerError::Missing => Reply::error(401, "authorization header required"),
        BearerError::Malformed => Reply::error(401, "invalid authorization header format"),
    })?;
    // Compare digests so neither length nor content leaks through timing.
    let ok: bool = sha256_hex(presented)
        .as_bytes()
        .ct_eq(sha256_hex(expected).as_bytes())
        .into();
    if !ok {
        return Err(Reply::error(401, "invalid token"));
    }
    Ok(Reply {
        status: 200,
        body: ctx.app.hub.metrics.render(&ctx.app.store),
        content_type: "text/plain; version=0.0.4",
        headers: Vec::new(),
    })
}

fn dev_gate(ctx: &Ctx) -> Result<Principal> {
    let who = authorize(ctx, Access::Admin)?;
    if ctx.app.production() {
        return Err(Reply::error(
            403,
            "mock endpoints are disabled in production",
        ));
    }
    Ok(who)
}

fn dev_token(ctx: &Ctx, username: &str) -> Result<Reply> {
    dev_gate(ctx)?;
    let user = ctx
        .app
        .store
        .user_by_name(username)?
        .ok_or_else(|| Reply::error(404, "user not found"))?;
    let token = if user.role.is_human() {
        None
    } else {
        ctx.app.store.raw_token(user.id)?
    };
    Ok(Reply::json(
        200,
        &wire::DevToken {
            username: &user.username,
            role: user.role.as_str(),
            api_token: token.as_deref().unwrap_or(""),
        },
    ))
}

fn dev_reset(ctx: &Ctx) -> Result<Reply> {
    dev_gate(ctx)?;
    ctx.app.hub.close_everywhere(Close::DataReset);
    // Let the closing sessions finish (their last writes and unregistering) before the wipe,
    // so nothing of the old world lands in the new one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ctx.app.hub.connection_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    ctx.app.store.wipe()?;
    // Ids start again at 1: a JWT from before the reset must not name a new user.
    let generation = crate::bootstrap::jwt_generation(&ctx.app.store).map_err(|e| {
        log_error!("http: {e}");
        Reply::error(500, "internal server error")
    })? + 1;
    ctx.app
        .store
        .set_setting("jwt_generation", &generation.to_string())?;
    ctx.app.keys.set_generation(generation);
    ctx.app.hub.forget_all_users();
    crate::bootstrap::bootstrap(&ctx.app.store, &ctx.app.config).map_err(|e| {
        log_error!("http: {e}");
        Reply::error(500, "internal server error")
    })?;
    Ok(Reply::json(200, &serde_json::json!({"status": "reset"})))
}

fn dev_chat(ctx: &Ctx) -> Result<Reply> {
    dev_gate(ctx)?;
    let req: wire::MockChatRequest = json_body(ctx)?;
    let sender = ctx
        .app
        .store
        .user_by_name(&req.sender_username)?
        .ok_or_else(|| Reply::error(400, "sender user not found"))?;
    let receiver = ctx
        .app
        .store
        .user_by_name(&req.receiver_username)?
        .ok_or_else(|| Reply::error(400, "receiver user not found"))?;
    if wire::nesting_depth(req.content.get()) > wire::MAX_PAYLOAD_DEPTH {
        return Err(Reply::error(400, "content is nested too deeply"));
    }
    let kind = match req.kind.as_deref().map(Kind::parse) {
        None => Kind::Chat,
        Some(Some(k)) if Kind::REPLAYED.contains(&k) => k,
        Some(_) => return Err(Reply::error(400, "invalid type")),
    };
    // Filed into a thread as a sent frame would be, or the thread-only dashboard never shows it.
    let conversation_id = ctx
        .app
        .hub
        .thread_for(&sender, &receiver, kind)
        .map_err(|_| Reply::error(500, "internal server error"))?;
    let stored = ctx.app.store.insert_chat(NewChat {
        sender_id: sender.id,
        receiver_id: receiver.id,
        kind,
        payload: req.content.get().to_string(),
        local_id: req.local_id.filter(|l| !l.is_empty()),
        stream_id: None,
        conversation_id,
        sender_name: sender.username.clone(),
        sender_role: sender.role,
        receiver_role: receiver.role,
    })?;
    Ok(Reply::json(201, &serde_json::json!({"id": stored.id})))
}
