//! The hub: who is connected, and where each frame goes.
//!
//! Invariants:
//! - The hub owns the registry (user id → live connections); nothing else reaches into it.
//! - Routing never blocks: a delivery is a push onto the recipient's unbounded queue, guarded by
//!   our own count and byte caps. A recipient over its cap is closed (1013), not waited for.
//! - A stored frame is routed only after the store returned its `id`.
//! - Frames from one connection are routed in the order they were read (the connection's
//!   reader thread does the routing itself), so a stream's chunks, its final CHAT and its END
//!   reach each recipient in order. A stored frame is handled in two steps, `handle` (checks,
//!   submit to the store) and `land` (wait for the commit, route), so that a reader can submit
//!   several frames to one commit; it must land them in order before routing anything else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;

use crate::identity::{Principal, Role};
use crate::metrics::Metrics;
use crate::store::{self, ChatRow, NewChat, NewLog, Store, Stored};
use crate::wire::{self, Frame};
use crate::{clock, log_debug, log_warn};

/// Most queued frames per connection before it counts as a slow consumer.
pub const MAX_QUEUED_FRAMES: usize = 1024;
/// Most queued bytes per connection before it counts as a slow consumer.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;
/// Most live connections one user may hold.
pub const MAX_CONNS_PER_USER: usize = 16;
/// Store-and-forward replays at most this many frames, none older than `REPLAY_MAX_AGE`.
pub const REPLAY_LIMIT: i64 = 1000;
pub const REPLAY_MAX_AGE_MS: i64 = 7 * 24 * 3600 * 1000;
/// Frames a replay loads from the database at a time (bounds its memory).
const REPLAY_PAGE: i64 = 64;
/// How long a user lookup for routing is trusted (users added or removed by another process,
/// e.g. the CLI, are seen after this long).
const DIRECTORY_TTL: Duration = Duration::from_secs(5);
/// Size at which expired lookups are pruned from the cache.
const DIRECTORY_MAX: usize = 10_000;

/// One frame queued for a connection's writer.
pub struct Outbound {
    pub text: Utf8Bytes,
    pub kind: &'static str,
    /// Set for a stored frame addressed to this connection's (machine) user: once written,
    /// its row is flagged delivered.
    pub stored_id: Option<i64>,
}

/// Instructions to a connection's writer that jump the data queue.
pub enum Control {
    Pong(tungstenite::Bytes),
    Close(u16, &'static str),
}

/// The hub's handle on one live WebSocket connection.
pub struct Conn {
    pub id: u64,
    pub principal: Principal,
    out: Sender<Outbound>,
    ctl: Sender<Control>,
    queued_frames: AtomicUsize,
    queued_bytes: AtomicUsize,
    closing: AtomicBool,
    reader_done: AtomicBool,
    /// Milliseconds since the epoch of the last frame from the client (or of the connect).
    pub last_activity_ms: AtomicI64,
}

pub struct ConnQueues {
    pub out: Receiver<Outbound>,
    pub ctl: Receiver<Control>,
}

impl Conn {
    /// Queues a frame. Never blocks; a connection over its cap is closed with 1013.
    fn deliver(&self, hub: &Hub, frame: Outbound) -> bool {
        if self.closing.load(Relaxed) {
            return false;
        }
        let len = frame.text.len();
        let frames = self.queued_frames.fetch_add(1, Relaxed) + 1;
        let bytes = self.queued_bytes.fetch_add(len, Relaxed) + len;
        if frames > MAX_QUEUED_FRAMES || bytes > MAX_QUEUED_BYTES {
            self.queued_frames.fetch_sub(1, Relaxed);
            self.queued_bytes.fetch_sub(len, Relaxed);
            if self.close(1013, "slow consumer") {
                hub.metrics.slow_consumer_closes.fetch_add(1, Relaxed);
                log_warn!(
                    "ws: closing slow consumer {} (user {}): {frames} frames / {bytes} bytes queued",
                    self.id,
                    self.principal.id
                );
            }
            return false;
        }
        hub.metrics.frame_out(frame.kind);
        self.out.send(frame).is_ok()
    }

    /// The writer took a frame off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_frames.fetch_sub(1, Relaxed);
        self.queued_bytes.fetch_sub(len, Relaxed);
    }

    /// Asks the writer to close with `code`. Returns false if a close was already asked for.
    pub fn close(&self, code: u16, reason: &'static str) -> bool {
        if self.closing.swap(true, Relaxed) {
            return false;
        }
        let _ = self.ctl.send(Control::Close(code, reason));
        true
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    /// The reader thread has stopped reading (the peer answered our close, or left).
    pub fn mark_reader_done(&self) {
        self.reader_done.store(true, Relaxed);
    }

    pub fn reader_done(&self) -> bool {
        self.reader_done.load(Relaxed)
    }

    /// Sends a pong through the writer (the reader never writes to the socket). A ping
    /// flood while the writer is stuck cannot grow the queue: past 8 queued control frames
    /// further pings go unanswered (RFC 6455 only asks for a pong "as soon as practical", and
    /// a peer that floods pings is not waiting for each one).
    pub fn pong(&self, data: tungstenite::Bytes) {
        if self.ctl.len() < 8 {
            let _ = self.ctl.send(Control::Pong(data));
        }
    }

    pub fn touch(&self) {
        self.last_activity_ms.store(clock::now_ms(), Relaxed);
    }

    /// Queues a frame for this connection only (ACK, ERROR, replay).
    pub fn send_direct(
        &self,
        hub: &Hub,
        kind: &'static str,
        text: String,
        stored_id: Option<i64>,
    ) -> bool {
        self.deliver(
            hub,
            Outbound {
                text: text.into(),
                kind,
                stored_id,
            },
        )
    }
}

#[derive(Default)]
struct Registry {
    by_user: HashMap<i64, Vec<Arc<Conn>>>,
    /// Human connections, for SYSTEM_LOG and PRESENCE fan-out without a scan of every agent.
    humans: Vec<Arc<Conn>>,
}

#[derive(Clone)]
struct Target {
    role: Role,
}

/// Why a frame was refused: becomes an ERROR frame on the sender's connection.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    TooManyForUser,
}

pub struct Hub {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    registry: RwLock<Registry>,
    presence: Mutex<()>,
    directory: Mutex<HashMap<i64, (Instant, Target)>>,
    next_conn_id: AtomicU64,
    /// Connections of every kind (REST and WebSocket) open right now.
    pub open_sockets: AtomicUsize,
}

/// A validated inbound frame.
pub struct Envelope {
    kind: &'static str,
    target_id: i64,
    payload: Option<Box<RawValue>>,
    local_id: Option<String>,
    stream_id: Option<String>,
    conversation_id: Option<i64>,
}

impl Envelope {
    /// Frames of this type are stored before they are routed (SPEC section 4).
    pub fn is_stored(&self) -> bool {
        matches!(
            self.kind,
            "SYSTEM_LOG" | "CHAT" | "AUTH_REQUEST" | "AUTH_RESPONSE"
        )
    }
}

/// What `Hub::handle` did with a frame.
pub enum Step {
    /// Routed (or, for a refused frame, nothing to do).
    Done,
    /// Submitted to the store; route it with `Hub::land`.
    InFlight(InFlight),
}

/// A stored frame between its submission to the store and its routing.
pub struct InFlight {
    pending: store::Pending,
    then: Then,
}

/// How an in-flight frame is routed once its row is committed.
enum Then {
    Relay(Envelope, (i64, Target)),
    Log(NewLog),
}

const KNOWN_TYPES: &[&str] = &[
    "SYSTEM_LOG",
    "CHAT",
    "CHAT_STREAM",
    "CHAT_STREAM_END",
    "AUTH_REQUEST",
    "AUTH_RESPONSE",
    "AUTH_STATUS_UPDATE",
];
const SERVER_ONLY_TYPES: &[&str] = &["ACK", "ERROR", "PRESENCE", "BUTLER_AGENT_MESSAGE"];

impl Hub {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new(Hub {
            store,
            metrics,
            registry: RwLock::new(Registry::default()),
            presence: Mutex::new(()),
            directory: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            open_sockets: AtomicUsize::new(0),
        })
    }

    // ----- registry ---------------------------------------------------------------------

    /// Adds a connection. Returns it, its queues, and whether it is the user's first.
    pub fn register(
        &self,
        principal: Principal,
    ) -> Result<(Arc<Conn>, ConnQueues, bool), RegisterError> {
        let (out_tx, out_rx) = unbounded();
        let (ctl_tx, ctl_rx) = unbounded();
        let conn = Arc::new(Conn {
            id: self.next_conn_id.fetch_add(1, Relaxed),
            principal,
            out: out_tx,
            ctl: ctl_tx,
            queued_frames: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
            last_activity_ms: AtomicI64::new(clock::now_ms()),
        });
        // Held across the registry change and its PRESENCE frame, so that a last close and
        // a new first open of the same user are announced in the order they happened.
        let _presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let first = {
            let mut reg = self.registry.write().unwrap_or_else(|p| p.into_inner());
            let list = reg.by_user.entry(conn.principal.id).or_default();
            if list.len() >= MAX_CONNS_PER_USER {
                return Err(RegisterError::TooManyForUser);
            }
            list.push(conn.clone());
            let first = list.len() == 1;
            if conn.principal.role.is_human() {
                reg.humans.push(conn.clone());
            }
            first
        };
        self.metrics.connection_opened(conn.principal.role);
        if first && !conn.principal.role.is_human() {
            self.announce_presence(&conn.principal, true, &clock::now_rfc3339());
        }
        Ok((
            conn,
            ConnQueues {
                out: out_rx,
                ctl: ctl_rx,
            },
            first,
        ))
    }

    pub fn unregister(&self, conn: &Arc<Conn>) {
        let machine = !conn.principal.role.is_human();
        let only_one_left = || {
            let reg = self.registry.read().unwrap_or_else(|p| p.into_inner());
            reg.by_user
                .get(&conn.principal.id)
                .is_some_and(|list| list.iter().all(|c| c.id == conn.id))
        };
        // last_seen_at is committed before the user shows as offline anywhere, so REST never
        // sees an offline agent without it. The commit is waited for outside `presence`, so
        // a mass disconnect shares commits instead of queueing one commit per connection
        // behind the lock (and behind it every new connection).
        let mut now = clock::now_rfc3339();
        let recorded = machine && only_one_left();
        if recorded {
            self.store.set_last_seen(conn.principal.id, now.clone());
            self.store.flush();
        }
        let _presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        // Registrations are serialized by `presence`, so "only connection left" is stable here.
        let last = only_one_left();
        if last && machine && !recorded {
            // Rare: another connection of this user closed in between.
            now = clock::now_rfc3339();
            self.store.set_last_seen(conn.principal.id, now.clone());
            self.store.flush();
        }
        {
            let mut reg = self.registry.write().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = reg.by_user.get_mut(&conn.principal.id) {
                list.retain(|c| c.id != conn.id);
                if list.is_empty() {
                    reg.by_user.remove(&conn.principal.id);
                }
            }
            if !machine {
                reg.humans.retain(|c| c.id != conn.id);
            }
        }
        self.metrics.connection_closed(conn.principal.role);
        if last && machine {
            self.announce_presence(&conn.principal, false, &now);
        }
    }

    fn conns_of(&self, user_id: i64) -> Vec<Arc<Conn>> {
        let reg = self.registry.read().unwrap_or_else(|p| p.into_inner());
        reg.by_user.get(&user_id).cloned().unwrap_or_default()
    }

    fn humans(&self) -> Vec<Arc<Conn>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .humans
            .clone()
    }

    /// When the user was last active, if it is online now.
    pub fn online_since(&self, user_id: i64) -> Option<i64> {
        let reg = self.registry.read().unwrap_or_else(|p| p.into_inner());
        reg.by_user
            .get(&user_id)
            .and_then(|list| list.iter().map(|c| c.last_activity_ms.load(Relaxed)).max())
    }

    pub fn connection_count(&self) -> usize {
        let reg = self.registry.read().unwrap_or_else(|p| p.into_inner());
        reg.by_user.values().map(Vec::len).sum()
    }

    /// Closes every session of a user (token rotated, agent removed, data reset).
    pub fn close_user(&self, user_id: i64, code: u16, reason: &'static str) {
        for c in self.conns_of(user_id) {
            c.close(code, reason);
        }
    }

    /// Closes every session (shutdown: 1001; reset: 1008).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        let all: Vec<Arc<Conn>> = {
            let reg = self.registry.read().unwrap_or_else(|p| p.into_inner());
            reg.by_user.values().flatten().cloned().collect()
        };
        for c in all {
            c.close(code, reason);
        }
    }

    /// Forgets cached facts about a user (after it was created, deleted or reset).
    pub fn forget_user(&self, user_id: i64) {
        self.directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&user_id);
    }

    pub fn forget_all_users(&self) {
        self.directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The live user behind a `target_id`. Hits are cached for `DIRECTORY_TTL`; misses are
    /// not, so probing random ids cannot grow the cache.
    fn target(&self, user_id: i64) -> Result<Option<Target>, FrameError> {
        if let Some((at, t)) = self
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user_id)
        {
            if at.elapsed() < DIRECTORY_TTL {
                return Ok(Some(t.clone()));
            }
        }
        let row = self.store.user_by_id(user_id).map_err(|e| {
            crate::log_error!("hub: user lookup failed: {e}");
            refuse("internal", "storage unavailable")
        })?;
        let t = row.filter(|u| !u.deleted).map(|u| Target { role: u.role });
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        match &t {
            Some(t) => {
                if dir.len() >= DIRECTORY_MAX {
                    dir.retain(|_, (at, _)| at.elapsed() < DIRECTORY_TTL);
                }
                dir.insert(user_id, (Instant::now(), t.clone()));
            }
            None => {
                dir.remove(&user_id);
            }
        }
        Ok(t)
    }

    // ----- store and forward -----------------------------------------------------------

    /// A writer flushed these stored frames to a connection of the user they address.
    pub fn delivered(&self, ids: Vec<i64>) {
        self.store.mark_delivered(ids);
    }

    /// The id range a new connection of a machine user must replay before live frames
    /// (SPEC: the newest 1000 undelivered CHAT/AUTH_* frames, none older than 7 days).
    pub fn replay_range(&self, principal: &Principal) -> Option<(i64, i64)> {
        let since = clock::format_ms(clock::now_ms() - REPLAY_MAX_AGE_MS);
        self.store
            .replay_range(principal.id, &since, REPLAY_LIMIT)
            .unwrap_or_else(|e| {
                crate::log_error!("hub: cannot plan the replay for user {}: {e}", principal.id);
                None
            })
    }

    /// One page of a replay, as outbound frames in id order, with the id of the page's last
    /// row (None when the range is exhausted).
    pub fn replay_page(
        &self,
        principal: &Principal,
        from: i64,
        to: i64,
    ) -> (Vec<Outbound>, Option<i64>) {
        match self
            .store
            .undelivered_page(principal.id, from, to, REPLAY_PAGE)
        {
            Ok(rows) => {
                let last = rows.last().map(|r| r.id);
                (
                    rows.iter()
                        .filter_map(|row| self.replay_frame(row))
                        .collect(),
                    last,
                )
            }
            Err(e) => {
                crate::log_error!(
                    "hub: cannot load frames to replay for user {}: {e}",
                    principal.id
                );
                (Vec::new(), None)
            }
        }
    }

    fn replay_frame(&self, row: &ChatRow) -> Option<Outbound> {
        let sender = self.store.user_by_id(row.sender_id).ok().flatten()?;
        let kind = static_type(&row.kind)?;
        let frame = Frame {
            id: Some(row.id),
            kind,
            sender_id: sender.id,
            sender_name: &sender.username,
            sender_role: sender.role.as_str(),
            target_id: Some(row.receiver_id),
            payload: Some(&row.payload),
            local_id: row.local_id.as_deref(),
            stream_id: row.stream_id.as_deref(),
            conversation_id: row.conversation_id,
            timestamp: &row.timestamp,
        };
        Some(Outbound {
            text: frame.to_json().into(),
            kind,
            stored_id: Some(row.id),
        })
    }

    // ----- inbound frames ---------------------------------------------------------------

    /// Parses and validates one text frame (SPEC section 4's field rules).
    pub fn parse_frame(&self, text: &str) -> Result<Envelope, (FrameError, Option<String>)> {
        let env = parse_envelope(text)?;
        self.metrics.frame_in(env.kind);
        Ok(env)
    }

    /// Checks and routes a frame; a frame that is stored is only submitted to the store and
    /// comes back as `Step::InFlight`, to be routed by `land` once its row is committed.
    pub fn handle(
        &self,
        from: &Arc<Conn>,
        env: Envelope,
    ) -> Result<Step, (FrameError, Option<String>)> {
        let local_id = env.local_id.clone();
        self.dispatch(from, env).map_err(|e| (e, local_id))
    }

    /// Waits for an in-flight frame's commit, then routes it as `handle` would have.
    pub fn land(&self, from: &Arc<Conn>, f: InFlight) -> Result<(), (FrameError, Option<String>)> {
        let stored = match f.pending.wait() {
            Ok(s) => s,
            Err(e) => {
                let local_id = match &f.then {
                    Then::Relay(env, _) => env.local_id.clone(),
                    Then::Log(log) => log.local_id.clone(),
                };
                return Err((storage_failed(e), local_id));
            }
        };
        match f.then {
            Then::Relay(env, target) => self.route_relay(from, &env, target, Some(&stored)),
            Then::Log(log) => self.route_log(from, &log, &stored),
        }
        Ok(())
    }

    fn dispatch(&self, from: &Arc<Conn>, env: Envelope) -> Result<Step, FrameError> {
        let me = &from.principal;
        match env.kind {
            "SYSTEM_LOG" => self.system_log(from, env),
            "CHAT" | "CHAT_STREAM" | "CHAT_STREAM_END" => {
                let target = self.require_target(env.target_id)?;
                self.relay(from, env, target)
            }
            "AUTH_REQUEST" => {
                if me.role != Role::Butler {
                    return Err(refuse("forbidden", "only the Butler may send AUTH_REQUEST"));
                }
                let target = self.require_target(env.target_id)?;
                if !target.1.role.is_human() {
                    return Err(refuse("forbidden", "AUTH_REQUEST must target a human"));
                }
                self.relay(from, env, target)
            }
            "AUTH_RESPONSE" => {
                if !me.role.is_human() {
                    return Err(refuse("forbidden", "only humans may send AUTH_RESPONSE"));
                }
                let butler = self.butler_id()?;
                let target_id = if env.target_id == 0 {
                    butler
                } else {
                    env.target_id
                };
                if target_id != butler {
                    return Err(refuse("forbidden", "AUTH_RESPONSE must target the Butler"));
                }
                let target = self.require_target(target_id)?;
                self.relay(from, Envelope { target_id, ..env }, target)
            }
            "AUTH_STATUS_UPDATE" => {
                if me.role != Role::Butler {
                    return Err(refuse(
                        "forbidden",
                        "only the Butler may send AUTH_STATUS_UPDATE",
                    ));
                }
                if env.target_id == 0 {
                    let text = self.frame_from(me, &env, None, &clock::now_rfc3339());
                    for c in self.humans() {
                        c.deliver(self, text.clone_for(None));
                    }
                    Ok(Step::Done)
                } else {
                    let target = self.require_target(env.target_id)?;
                    self.relay(from, env, target)
                }
            }
            // parse_envelope admits only the known types.
            _ => Err(refuse("unknown_type", "unknown frame type")),
        }
    }

    fn require_target(&self, target_id: i64) -> Result<(i64, Target), FrameError> {
        if target_id == 0 {
            return Err(refuse(
                "target_required",
                "this frame type needs a target_id",
            ));
        }
        match self.target(target_id)? {
            Some(t) => Ok((target_id, t)),
            None => Err(refuse(
                "target_not_found",
                format!("no user with id {target_id}"),
            )),
        }
    }

    pub fn butler_id(&self) -> Result<i64, FrameError> {
        self.store
            .butler()
            .map_err(|_| refuse("internal", "storage unavailable"))?
            .map(|u| u.id)
            .ok_or_else(|| refuse("target_not_found", "there is no Butler"))
    }

    /// CHAT, CHAT_STREAM(_END), AUTH_*: a stored type is submitted to the store and routed
    /// when it lands; the others are routed now.
    fn relay(
        &self,
        from: &Arc<Conn>,
        env: Envelope,
        target: (i64, Target),
    ) -> Result<Step, FrameError> {
        if !env.is_stored() {
            self.route_relay(from, &env, target, None);
            return Ok(Step::Done);
        }
        let pending = self.submit_chat(&from.principal, &env, target.0, !target.1.role.is_human());
        Ok(Step::InFlight(InFlight {
            pending,
            then: Then::Relay(env, target),
        }))
    }

    /// Delivers to every connection of the target and echoes to a human sender's
    /// connections; a machine sender gets an ACK for a stored frame with a `local_id`.
    fn route_relay(
        &self,
        from: &Arc<Conn>,
        env: &Envelope,
        (target_id, target): (i64, Target),
        stored: Option<&Stored>,
    ) {
        let me = &from.principal;
        let timestamp = stored
            .map(|s| s.timestamp.clone())
            .unwrap_or_else(clock::now_rfc3339);
        let frame = self.frame_from(me, env, stored.map(|s| s.id), &timestamp);
        let duplicate = stored.is_some_and(|s| s.duplicate);

        if !duplicate {
            let mark_id = stored.filter(|_| !target.role.is_human()).map(|s| s.id);
            for c in self.conns_of(target_id) {
                c.deliver(self, frame.clone_for(mark_id));
            }
        }
        if me.role.is_human() {
            // The echo: every connection of a human sender, unless it already got the frame
            // as the target.
            if target_id != me.id || duplicate {
                for c in self.conns_of(me.id) {
                    c.deliver(self, frame.clone_for(None));
                }
            }
        } else if let (Some(s), Some(local_id)) = (stored, &env.local_id) {
            self.ack(from, local_id, s);
        }
        if env.kind == "CHAT" && !duplicate {
            if let Some(s) = stored {
                self.monitor_butler_agent(me, env, target_id, &target, s);
            }
        }
    }

    fn submit_chat(
        &self,
        me: &Principal,
        env: &Envelope,
        target_id: i64,
        forward: bool,
    ) -> store::Pending {
        let payload = env
            .payload
            .as_ref()
            .map(|p| p.get().to_string())
            .unwrap_or_else(|| "null".into());
        self.store.submit_chat(NewChat {
            sender_id: me.id,
            receiver_id: target_id,
            kind: env.kind.to_string(),
            payload,
            local_id: env.local_id.clone(),
            stream_id: env.stream_id.clone(),
            conversation_id: env.conversation_id,
            forward,
        })
    }

    fn ack(&self, to: &Arc<Conn>, local_id: &str, s: &Stored) {
        let mut ack = Frame::server("ACK", None, &s.timestamp);
        ack.id = Some(s.id);
        ack.local_id = Some(local_id);
        to.send_direct(self, "ACK", ack.to_json(), None);
    }

    fn frame_from(
        &self,
        me: &Principal,
        env: &Envelope,
        id: Option<i64>,
        timestamp: &str,
    ) -> Shared {
        let frame = Frame {
            id,
            kind: env.kind,
            sender_id: me.id,
            sender_name: &me.username,
            sender_role: me.role.as_str(),
            target_id: (env.target_id != 0).then_some(env.target_id),
            payload: env.payload.as_deref(),
            local_id: env.local_id.as_deref(),
            stream_id: env.stream_id.as_deref(),
            conversation_id: env.conversation_id,
            timestamp,
        };
        Shared {
            text: frame.to_json().into(),
            kind: env.kind,
        }
    }

    fn monitor_butler_agent(
        &self,
        me: &Principal,
        env: &Envelope,
        target_id: i64,
        target: &Target,
        s: &Stored,
    ) {
        let agent_id = match (me.role, target.role) {
            (Role::Butler, Role::Agent) => target_id,
            (Role::Agent, Role::Butler) => me.id,
            _ => return,
        };
        let payload = wire::ButlerAgentPayload {
            agent_id,
            id: s.id,
            kind: env.kind,
            sender_id: me.id,
            sender_name: &me.username,
            sender_role: me.role.as_str(),
            payload: env.payload.as_deref(),
            timestamp: &s.timestamp,
        };
        let payload = raw_json(&payload);
        let now = clock::now_rfc3339();
        let text: Utf8Bytes = Frame::server("BUTLER_AGENT_MESSAGE", Some(&payload), &now)
            .to_json()
            .into();
        for c in self
            .humans()
            .into_iter()
            .filter(|c| c.principal.role == Role::Admin)
        {
            c.deliver(
                self,
                Outbound {
                    text: text.clone(),
                    kind: "BUTLER_AGENT_MESSAGE",
                    stored_id: None,
                },
            );
        }
    }

    fn system_log(&self, from: &Arc<Conn>, env: Envelope) -> Result<Step, FrameError> {
        let (level, content) = parse_log_payload(env.payload.as_deref())?;
        let me = &from.principal;
        let log = NewLog {
            sender_id: Some(me.id),
            agent_id: me.username.clone(),
            level,
            content,
            local_id: env.local_id,
        };
        Ok(Step::InFlight(InFlight {
            pending: self.store.submit_log(log.clone()),
            then: Then::Log(log),
        }))
    }

    /// A SYSTEM_LOG frame's row is committed: broadcast it, echo or acknowledge.
    fn route_log(&self, from: &Arc<Conn>, log: &NewLog, stored: &Stored) {
        let me = &from.principal;
        self.broadcast_log(me, log, stored);
        if me.role.is_human() {
            // The broadcast was the human's echo; a repeat gets the echo alone.
            if stored.duplicate {
                let text = self.log_frame(me, log, stored);
                for c in self.conns_of(me.id) {
                    c.deliver(self, text.clone_for(None));
                }
            }
        } else if let Some(local_id) = &log.local_id {
            self.ack(from, local_id, stored);
        }
    }

    /// Stores a dashboard log and fans it out to every human connection (never to
    /// machines). A repeated `local_id` stores nothing and is not broadcast again.
    pub fn post_log(&self, sender: &Principal, log: &NewLog) -> Result<Stored, store::StoreError> {
        let stored = self.store.insert_log(log.clone())?;
        self.broadcast_log(sender, log, &stored);
        Ok(stored)
    }

    fn broadcast_log(&self, sender: &Principal, log: &NewLog, stored: &Stored) {
        if !stored.duplicate {
            let text = self.log_frame(sender, log, stored);
            for c in self.humans() {
                c.deliver(self, text.clone_for(None));
            }
        }
    }

    fn log_frame(&self, sender: &Principal, log: &NewLog, stored: &Stored) -> Shared {
        let payload = wire::LogPayload {
            id: stored.id,
            agent_id: &log.agent_id,
            level: &log.level,
            content: &log.content,
            timestamp: &stored.timestamp,
        };
        let payload = raw_json(&payload);
        let frame = Frame {
            id: Some(stored.id),
            kind: "SYSTEM_LOG",
            sender_id: sender.id,
            sender_name: &sender.username,
            sender_role: sender.role.as_str(),
            target_id: None,
            payload: Some(&payload),
            local_id: log.local_id.as_deref(),
            stream_id: None,
            conversation_id: None,
            timestamp: &stored.timestamp,
        };
        Shared {
            text: frame.to_json().into(),
            kind: "SYSTEM_LOG",
        }
    }

    /// Delivers an AUTH_RESPONSE posted over REST to the Butler, stored like a WS frame.
    pub fn post_auth_response(&self, me: &Principal, payload: &RawValue) -> Result<(), FrameError> {
        let butler = self.butler_id()?;
        let env = Envelope {
            kind: "AUTH_RESPONSE",
            target_id: butler,
            payload: Some(payload.to_owned()),
            local_id: None,
            stream_id: None,
            conversation_id: None,
        };
        let stored = self
            .submit_chat(me, &env, butler, true)
            .wait()
            .map_err(storage_failed)?;
        let frame = self.frame_from(me, &env, Some(stored.id), &stored.timestamp);
        for c in self.conns_of(butler) {
            c.deliver(self, frame.clone_for(Some(stored.id)));
        }
        Ok(())
    }

    fn announce_presence(&self, who: &Principal, online: bool, now: &str) {
        let payload = wire::PresencePayload {
            user_id: who.id,
            username: &who.username,
            role: who.role.as_str(),
            online,
            last_seen_at: Some(now),
        };
        let payload = raw_json(&payload);
        let text: Utf8Bytes = Frame::server("PRESENCE", Some(&payload), now)
            .to_json()
            .into();
        log_debug!(
            "hub: {} {} is {}",
            who.role.as_str(),
            who.id,
            if online { "online" } else { "offline" }
        );
        for c in self.humans() {
            c.deliver(
                self,
                Outbound {
                    text: text.clone(),
                    kind: "PRESENCE",
                    stored_id: None,
                },
            );
        }
    }
}

/// One serialized frame shared by all its recipients (the text is reference-counted).
struct Shared {
    text: Utf8Bytes,
    kind: &'static str,
}

impl Shared {
    fn clone_for(&self, stored_id: Option<i64>) -> Outbound {
        Outbound {
            text: self.text.clone(),
            kind: self.kind,
            stored_id,
        }
    }
}

/// A serializable payload as raw JSON for a `Frame`. Our payload types are plain structs of
/// strings and numbers, which always serialize.
pub fn raw_json<T: serde::Serialize>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("payload serializes")
}

fn storage_failed(e: store::StoreError) -> FrameError {
    crate::log_error!("hub: storing a frame failed: {e}");
    refuse(
        "internal",
        "storage failed; the frame was not stored, retry with the same local_id",
    )
}

fn static_type(kind: &str) -> Option<&'static str> {
    KNOWN_TYPES.iter().copied().find(|t| *t == kind)
}

/// Parses and validates an envelope; see SPEC section 4 for the field rules.
fn parse_envelope(text: &str) -> Result<Envelope, (FrameError, Option<String>)> {
    if !wire::is_json_object(text.as_bytes()) {
        // Valid JSON that is not an object (serde would read an array as the fields in
        // order), or not JSON at all.
        let err = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => refuse("bad_envelope", "a frame must be a JSON object"),
            Err(_) => refuse("bad_json", "the frame is not valid JSON"),
        };
        return Err((err, None));
    }
    let raw: wire::RawEnvelope = serde_json::from_str(text).map_err(|e| {
        let err = match e.classify() {
            serde_json::error::Category::Data => refuse(
                "bad_envelope",
                "a frame must be a JSON object with a string type",
            ),
            _ => refuse("bad_json", "the frame is not valid JSON"),
        };
        (err, None)
    })?;
    // Errors about a readable envelope carry its local_id, so the client can match them.
    let local_id = usable_local_id(&raw);
    validate_envelope(raw).map_err(|e| (e, local_id))
}

fn usable_local_id(raw: &wire::RawEnvelope) -> Option<String> {
    raw.local_id
        .as_ref()
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
}

/// The `local_id` of a frame that will not be handled (it was over the rate), so the ERROR
/// that says so can name it. Only the envelope's own fields are looked at.
pub fn peek_local_id(text: &str) -> Option<String> {
    if !wire::is_json_object(text.as_bytes()) {
        return None;
    }
    serde_json::from_str::<wire::RawEnvelope>(text)
        .ok()
        .and_then(|raw| usable_local_id(&raw))
}

fn validate_envelope(raw: wire::RawEnvelope<'_>) -> Result<Envelope, FrameError> {
    let kind = match &raw.kind {
        Some(serde_json::Value::String(s)) => s.as_str(),
        _ => return Err(refuse("bad_envelope", "type must be a string")),
    };
    if SERVER_ONLY_TYPES.contains(&kind) {
        return Err(refuse(
            "forbidden",
            format!("{kind} frames are sent by the server only"),
        ));
    }
    let kind = static_type(kind)
        .ok_or_else(|| refuse("unknown_type", format!("unknown frame type {kind:?}")))?;
    let target_id = match &raw.target_id {
        None => 0,
        Some(v) => v
            .as_i64()
            .filter(|n| *n >= 0)
            .ok_or_else(|| refuse("bad_envelope", "target_id must be an integer >= 0"))?,
    };
    let short_string =
        |v: &Option<serde_json::Value>, name: &str| -> Result<Option<String>, FrameError> {
            match v {
                None => Ok(None),
                Some(serde_json::Value::String(s)) if s.len() <= 128 => Ok(Some(s.clone())),
                Some(_) => Err(refuse(
                    "bad_envelope",
                    format!("{name} must be a string of at most 128 bytes"),
                )),
            }
        };
    let local_id = short_string(&raw.local_id, "local_id")?.filter(|s| !s.is_empty());
    let stream_id = short_string(&raw.stream_id, "stream_id")?;
    let conversation_id = match &raw.conversation_id {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| refuse("bad_envelope", "conversation_id must be an integer"))?,
        ),
    };
    if raw
        .payload
        .is_some_and(|p| wire::nesting_depth(p.get()) > wire::MAX_PAYLOAD_DEPTH)
    {
        return Err(refuse(
            "bad_envelope",
            format!(
                "payload is nested deeper than {} levels",
                wire::MAX_PAYLOAD_DEPTH
            ),
        ));
    }
    Ok(Envelope {
        kind,
        target_id,
        payload: raw.payload.map(ToOwned::to_owned),
        local_id,
        stream_id,
        conversation_id,
    })
}

/// `{level, content}` (level upper-cased, default INFO, 1–16 of A–Z and _) or a plain string.
pub fn parse_log_payload(payload: Option<&RawValue>) -> Result<(String, String), FrameError> {
    #[derive(serde::Deserialize)]
    struct LogBody {
        #[serde(default)]
        level: Option<String>,
        content: String,
    }
    let bad = || {
        refuse(
            "bad_envelope",
            "SYSTEM_LOG payload must be {level, content} or a string",
        )
    };
    let payload = payload.ok_or_else(bad)?;
    if let Ok(content) = serde_json::from_str::<String>(payload.get()) {
        return Ok(("INFO".into(), content));
    }
    // An object, not an array read as its fields in order.
    if !wire::is_json_object(payload.get().as_bytes()) {
        return Err(bad());
    }
    let body: LogBody = serde_json::from_str(payload.get()).map_err(|_| bad())?;
    let level = normalize_level(body.level.as_deref())
        .ok_or_else(|| refuse("bad_envelope", "level must be 1-16 characters of A-Z and _"))?;
    Ok((level, body.content))
}

pub fn normalize_level(level: Option<&str>) -> Option<String> {
    let level = level
        .map(str::to_ascii_uppercase)
        .unwrap_or_else(|| "INFO".into());
    let ok = (1..=16).contains(&level.len())
        && level.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    ok.then_some(level)
}

/// Property tests: the envelope parser is the first thing hostile input meets. They run in CI
/// for a bounded number of cases (PROPTEST_CASES, default 256 per property); any failure
/// proptest finds is kept as a regression test below.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            prop::sample::select(
                KNOWN_TYPES
                    .iter()
                    .chain(SERVER_ONLY_TYPES)
                    .copied()
                    .collect::<Vec<_>>()
            )
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "type",
                        "target_id",
                        "payload",
                        "local_id",
                        "stream_id",
                        "conversation_id",
                        "id",
                        "sender_id",
                        "x"
                    ])
                    .prop_map(String::from),
                    inner,
                    0..7
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// What any successful parse guarantees to the router.
    fn check_invariants(text: &str) {
        match parse_envelope(text) {
            Ok(env) => {
                assert!(KNOWN_TYPES.contains(&env.kind));
                assert!(env.target_id >= 0);
                assert!(env
                    .local_id
                    .as_ref()
                    .is_none_or(|l| !l.is_empty() && l.len() <= 128));
                assert!(env.stream_id.as_ref().is_none_or(|l| l.len() <= 128));
            }
            Err((e, local_id)) => {
                assert!(
                    crate::metrics::ERROR_CODES.contains(&e.code),
                    "unknown code {}",
                    e.code
                );
                assert!(!e.message.is_empty());
                assert!(local_id.is_none_or(|l| l.len() <= 128));
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_parser(text in ".{0,300}") {
            check_invariants(&text);
        }

        #[test]
        fn arbitrary_json_is_accepted_or_refused_with_a_spec_code(v in json_value()) {
            let text = v.to_string();
            check_invariants(&text);
            // A well-formed frame of a known type is never refused as bad JSON.
            if let Some(kind) = v.get("type").and_then(|t| t.as_str()) {
                if let Err((e, _)) = parse_envelope(&text) {
                    prop_assert_ne!(e.code, "bad_json", "{} {}", kind, text);
                }
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(flips in prop::collection::vec((0usize..200, any::<u8>()), 1..8)) {
            let mut bytes = br#"{"type":"CHAT","target_id":7,"payload":{"a":[1,2,"x"]},"local_id":"abc","stream_id":"s"}"#.to_vec();
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                check_invariants(text);
            }
        }

        #[test]
        fn log_payloads_never_panic(v in json_value()) {
            let raw = RawValue::from_string(v.to_string()).unwrap();
            if let Ok((level, _)) = parse_log_payload(Some(&raw)) {
                prop_assert!((1..=16).contains(&level.len()));
                prop_assert!(level.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_errors_are_classified() {
        let code = |t: &str| parse_envelope(t).err().map(|e| e.0.code);
        assert_eq!(code("{nope"), Some("bad_json"));
        assert_eq!(code("[1,2]"), Some("bad_envelope"));
        assert_eq!(code("{}"), Some("bad_envelope"));
        assert_eq!(code(r#"{"type":5}"#), Some("bad_envelope"));
        assert_eq!(
            code(r#"{"type":"CHAT","target_id":"7"}"#),
            Some("bad_envelope")
        );
        assert_eq!(
            code(r#"{"type":"CHAT","target_id":-1}"#),
            Some("bad_envelope")
        );
        assert_eq!(code(r#"{"type":"NOPE"}"#), Some("unknown_type"));
        assert_eq!(code(r#"["CHAT",2,"hi"]"#), Some("bad_envelope"));
        assert_eq!(code(r#"[1,2"#), Some("bad_json"));
        let deep = format!(
            r#"{{"type":"CHAT","target_id":1,"payload":{}{}}}"#,
            "[".repeat(65),
            "]".repeat(65)
        );
        assert_eq!(code(&deep), Some("bad_envelope"));
        let ok = format!(
            r#"{{"type":"CHAT","target_id":1,"payload":{}{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert_eq!(code(&ok), None);
        assert_eq!(
            peek_local_id(r#"{"type":"CHAT","local_id":"l-9"}"#).as_deref(),
            Some("l-9")
        );
        assert_eq!(code(r#"{"type":"ACK"}"#), Some("forbidden"));
        let long = "x".repeat(129);
        assert_eq!(
            code(&format!(r#"{{"type":"CHAT","local_id":"{long}"}}"#)),
            Some("bad_envelope")
        );
        assert_eq!(
            code(r#"{"type":"CHAT","target_id":null,"id":99,"sender_id":"x"}"#),
            None
        );
    }

    #[test]
    fn log_payloads() {
        let p = |s: &str| parse_log_payload(Some(&RawValue::from_string(s.into()).unwrap()));
        assert_eq!(p(r#""hello""#).unwrap(), ("INFO".into(), "hello".into()));
        assert_eq!(
            p(r#"{"level":"warning","content":"x"}"#).unwrap(),
            ("WARNING".into(), "x".into())
        );
        assert_eq!(p(r#"{"content":"x"}"#).unwrap().0, "INFO");
        assert!(p(r#"{"level":"bad level","content":"x"}"#).is_err());
        assert!(p(r#"{"level":"INFO"}"#).is_err());
        assert!(
            p(r#"["INFO","x"]"#).is_err(),
            "an array is not {{level, content}}"
        );
        assert!(p("42").is_err());
        assert!(parse_log_payload(None).is_err());
    }
}
