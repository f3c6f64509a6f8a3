//! The hub: who is connected, and where each frame goes.
//!
//! Invariants:
//! - The hub owns the registry (user id → live connections); nothing else reaches into it.
//! - Routing never blocks: a delivery is a push onto the recipient's unbounded queue, guarded by
//!   our own count and byte caps. A recipient over its cap is closed (1013), not waited for.
//! - A stored frame is routed only after the store returned its `id`.
//! - A connection's frames are routed in the order they were read. Its `Session` (one per
//!   connection, owned by its reader thread) is the only way in: it submits a stored frame
//!   to the store and keeps it in flight, so that frames that arrived together share one
//!   commit, and it routes every frame in flight, in order, before it routes or answers
//!   anything else, and whenever it ends. A stream's chunks, its final CHAT and its END
//!   therefore reach each recipient in order.
//! - Store-and-forward is one `Replay` per new connection of a machine user.

mod cluster;
mod conn;
mod envelope;
mod replay;
mod session;
mod threads;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

pub use conn::{Conn, ConnQueues, Control, Outbound};
pub use envelope::{normalize_level, parse_log_payload, FrameError};
pub use replay::Replay;
pub use session::{End, Inbound, Session};
pub use threads::{channel_kind, AnswerRefusal};

use crate::identity::{Principal, Role};
use crate::metrics::Metrics;
use crate::store::{
    self, Audience, Cluster, ClusterControl, NewChat, NewLog, Presence, Store, Stored,
};
use crate::wire::{self, Close, Code, Frame, Kind};
use crate::{clock, log_debug, log_error};
use conn::Shared;
use envelope::{refuse, Envelope};
use threads::ThreadCache;

/// Most live connections one user may hold.
pub const MAX_CONNS_PER_USER: usize = 16;
/// How long a user lookup for routing is trusted (users added or removed by another process,
/// e.g. the CLI, are seen after this long).
const DIRECTORY_TTL: Duration = Duration::from_secs(5);
/// Size at which expired lookups are pruned from the cache.
const DIRECTORY_MAX: usize = 10_000;

#[derive(Default)]
struct Registry {
    by_user: HashMap<i64, Vec<Arc<Conn>>>,
    /// Human connections, for SYSTEM_LOG and PRESENCE fan-out without a scan of every agent.
    humans: Vec<Arc<Conn>>,
    /// When each machine user that went offline during this run was last seen (epoch ms).
    /// Written before the user leaves `by_user`, so whoever sees it offline sees this too.
    last_seen: HashMap<i64, i64>,
    /// Machine users online that said they are BUSY (AGENT_STATUS); cleared when they go
    /// offline.
    busy: std::collections::HashSet<i64>,
}

/// A routing target: a live user.
#[derive(Clone, Copy)]
struct Target {
    id: i64,
    role: Role,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    TooManyForUser,
}

/// Whether a machine user is online, as the registry sees it.
pub struct LivePresence {
    pub online: bool,
    /// Online and said it is BUSY.
    pub busy: bool,
    /// Online: its latest frame or connect; offline: its disconnect during this run (None
    /// when it has not disconnected since the server started: the database knows).
    pub last_seen_ms: Option<i64>,
}

/// A stored frame between its submission to the store and its routing.
struct Landing {
    pending: store::Pending,
    route: Route,
}

/// How a landed frame is routed once its row is committed.
enum Route {
    /// A relayed frame and its target.
    Relay(Envelope, Target),
    Log(NewLog),
}

impl Route {
    fn local_id(&self) -> Option<&str> {
        match self {
            Route::Relay(env, ..) => env.local_id.as_deref(),
            Route::Log(log) => log.local_id.as_deref(),
        }
    }
}

pub struct Hub {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    log_rates: LogRates,
    registry: RwLock<Registry>,
    presence: Mutex<()>,
    directory: Mutex<HashMap<i64, (Instant, Target)>>,
    threads: ThreadCache,
    /// The other nodes on this database, if any (`cluster.rs`).
    cluster: Option<Arc<dyn Cluster>>,
    remote: Mutex<cluster::RemotePresence>,
    /// Run when another node reset the data (the JWT key moved on).
    reset_hook: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    next_conn_id: AtomicU64,
    /// Connections of every kind (REST and WebSocket) open right now.
    pub open_sockets: AtomicUsize,
}

impl Hub {
    pub fn new(store: Store, metrics: Arc<Metrics>, log_bytes_per_second: usize) -> Arc<Hub> {
        Arc::new(Hub {
            cluster: store.cluster().cloned(),
            remote: Mutex::new(cluster::RemotePresence::default()),
            reset_hook: Mutex::new(None),
            store,
            metrics,
            log_rates: LogRates::new(log_bytes_per_second as f64),
            registry: RwLock::new(Registry::default()),
            presence: Mutex::new(()),
            directory: Mutex::new(HashMap::new()),
            threads: ThreadCache::default(),
            next_conn_id: AtomicU64::new(1),
            open_sockets: AtomicUsize::new(0),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|p| p.into_inner())
    }

    // ----- registry ---------------------------------------------------------------------

    /// Adds a connection. Returns it, its queues, and whether it is the user's first here.
    pub fn register(
        &self,
        principal: Principal,
    ) -> Result<(Arc<Conn>, ConnQueues, bool), RegisterError> {
        let id = self.next_conn_id.fetch_add(1, Relaxed);
        let (conn, queues) = Conn::new(id, principal, self.metrics.clone());
        let user = conn.principal.id;
        // Held across the registry change and its PRESENCE frame, so that a last close and
        // a new first open of the same user are announced in the order they happened.
        let _presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let here = self.read().by_user.get(&user).map_or(0, Vec::len);
        if here >= MAX_CONNS_PER_USER {
            return Err(RegisterError::TooManyForUser);
        }
        // Among several nodes, the cap and "first" count every node's connections.
        let first_anywhere = match &self.cluster {
            None => here == 0,
            Some(c) => match c.open(user, MAX_CONNS_PER_USER) {
                Ok(Some(first)) => first,
                Ok(None) => return Err(RegisterError::TooManyForUser),
                Err(e) => {
                    log_error!("bus: cannot count the connections of user {user}: {e}");
                    here == 0
                }
            },
        };
        {
            let mut reg = self.write();
            reg.by_user.entry(user).or_default().push(conn.clone());
            if conn.principal.role.is_human() {
                reg.humans.push(conn.clone());
            }
        }
        self.presence_changed();
        self.metrics.connection_opened(conn.principal.role);
        if first_anywhere && !conn.principal.role.is_human() {
            let now = clock::now_rfc3339();
            if self.cluster.is_none() {
                // For the command line (`agent list`): the database's view of who is
                // online. (Among several nodes `open` wrote it.)
                self.store.set_presence(user, Presence::Online(now.clone()));
            }
            self.announce_presence(&conn.principal, true, false, &now);
        }
        if here == 0 && conn.principal.role == Role::Butler {
            for notice in self.take_butler_notices() {
                conn.deliver(notice.to(None));
            }
        }
        Ok((conn, queues, here == 0))
    }

    pub fn unregister(&self, conn: &Arc<Conn>) {
        if self.cluster.is_some() {
            return self.unregister_among_nodes(conn);
        }
        let machine = !conn.principal.role.is_human();
        let only_one_left = || {
            self.read()
                .by_user
                .get(&conn.principal.id)
                .is_some_and(|list| list.iter().all(|c| c.id == conn.id))
        };
        // last_seen_at is committed before the user shows as offline anywhere, so REST never
        // sees an offline agent without it. The commit is waited for outside `presence`, so
        // a mass disconnect shares commits instead of queueing one commit per connection
        // behind the lock (and behind it every new connection).
        let mut now = clock::now_ms();
        let recorded = machine && only_one_left();
        if recorded {
            self.store
                .set_presence(conn.principal.id, Presence::Offline(clock::format_ms(now)));
            self.store.flush();
        }
        let _presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        // Registrations are serialized by `presence`, so "only connection left" is stable here.
        let last = only_one_left();
        if last && machine && !recorded {
            // Rare: another connection of this user closed in between.
            now = clock::now_ms();
            self.store
                .set_presence(conn.principal.id, Presence::Offline(clock::format_ms(now)));
            self.store.flush();
        }
        self.remove(conn, last, last && machine, now);
    }

    /// `unregister` among several nodes: the user is offline when its last connection on
    /// any node closes (the cluster records the last-seen time in the same transaction).
    fn unregister_among_nodes(&self, conn: &Arc<Conn>) {
        let machine = !conn.principal.role.is_human();
        let user = conn.principal.id;
        let _presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let last_here = self
            .read()
            .by_user
            .get(&user)
            .is_some_and(|list| list.iter().all(|c| c.id == conn.id));
        let now = clock::now_ms();
        let last_anywhere = match self
            .cluster
            .as_ref()
            .map(|c| c.close(user, &clock::format_ms(now)))
        {
            Some(Ok(last)) => last,
            Some(Err(e)) => {
                log_error!("bus: cannot count the connections of user {user}: {e}");
                last_here
            }
            None => last_here,
        };
        self.remove(conn, last_here, machine && last_anywhere, now);
        self.presence_changed();
    }

    /// Takes a connection out of the registry; announces the user offline when `offline`.
    fn remove(&self, conn: &Arc<Conn>, last_here: bool, offline: bool, now: i64) {
        let machine = !conn.principal.role.is_human();
        {
            let mut reg = self.write();
            if offline {
                reg.last_seen.insert(conn.principal.id, now);
            }
            if last_here && machine {
                reg.busy.remove(&conn.principal.id);
            }
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
        if offline {
            self.announce_presence(&conn.principal, false, false, &clock::format_ms(now));
        }
    }

    fn conns_of(&self, user_id: i64) -> Vec<Arc<Conn>> {
        self.read()
            .by_user
            .get(&user_id)
            .cloned()
            .unwrap_or_default()
    }

    fn humans(&self) -> Vec<Arc<Conn>> {
        self.read().humans.clone()
    }

    /// Whether a user is online, and when it was last seen, from one look at the registry.
    pub fn presence(&self, user_id: i64) -> LivePresence {
        let here = {
            let reg = self.read();
            match reg.by_user.get(&user_id) {
                Some(list) => LivePresence {
                    online: true,
                    busy: reg.busy.contains(&user_id),
                    last_seen_ms: list.iter().map(|c| c.last_activity_ms()).max(),
                },
                None => LivePresence {
                    online: false,
                    busy: false,
                    last_seen_ms: reg.last_seen.get(&user_id).copied(),
                },
            }
        };
        if here.online {
            return here;
        }
        // Online on another node (its last-seen time is the database's).
        match self.remote_presence(user_id) {
            Some(busy) => LivePresence {
                online: true,
                busy,
                last_seen_ms: None,
            },
            None => here,
        }
    }

    pub fn connection_count(&self) -> usize {
        self.read().by_user.values().map(Vec::len).sum()
    }

    /// Closes every session of a user (token rotated, agent removed, data reset), on every
    /// node.
    pub fn close_user(&self, user_id: i64, close: Close) {
        self.close_user_here(user_id, close);
        self.announce(ClusterControl::Close {
            user: user_id,
            reason: close.reason().to_string(),
        });
    }

    fn close_user_here(&self, user_id: i64, close: Close) {
        for c in self.conns_of(user_id) {
            c.close(close);
        }
    }

    /// Closes every session here (shutdown).
    pub fn close_all(&self, close: Close) {
        self.close_all_here(close);
    }

    /// Closes every session on every node (a data reset).
    pub fn close_everywhere(&self, close: Close) {
        self.close_all_here(close);
        self.announce(ClusterControl::CloseAll {
            reason: close.reason().to_string(),
        });
    }

    fn close_all_here(&self, close: Close) {
        let all: Vec<Arc<Conn>> = self.read().by_user.values().flatten().cloned().collect();
        for c in all {
            c.close(close);
        }
    }

    /// Forgets cached facts about a user (after it was created, deleted or reset), on every
    /// node.
    pub fn forget_user(&self, user_id: i64) {
        self.forget_user_here(user_id);
        self.announce(ClusterControl::Forget { user: user_id });
    }

    fn forget_user_here(&self, user_id: i64) {
        self.directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&user_id);
    }

    pub fn forget_all_users(&self) {
        self.forget_all_here();
        self.announce(ClusterControl::ForgetAll);
    }

    fn forget_all_here(&self) {
        self.directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.write().last_seen.clear();
        self.threads.forget_all();
        self.presence_changed();
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
                return Ok(Some(*t));
            }
        }
        let row = self.store.user_by_id(user_id).map_err(|e| {
            log_error!("hub: user lookup failed: {e}");
            refuse(Code::Internal, "storage unavailable")
        })?;
        let t = row.filter(|u| !u.deleted).map(|u| Target {
            id: u.id,
            role: u.role,
        });
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        match t {
            Some(t) => {
                if dir.len() >= DIRECTORY_MAX {
                    dir.retain(|_, (at, _)| at.elapsed() < DIRECTORY_TTL);
                }
                dir.insert(user_id, (Instant::now(), t));
            }
            None => {
                dir.remove(&user_id);
            }
        }
        Ok(t)
    }

    /// Why a session's credential no longer holds, if it does not: a machine's token must
    /// still be its current one (a rotation from the command line); a human must still exist,
    /// be enabled, have the role and session generation it logged in with, and its JWT must
    /// not have expired.
    pub fn credentials_revoked(&self, p: &Principal) -> Option<Close> {
        match &p.token_hash {
            Some(hash) => match self.store.token_hash_of(p.id) {
                Ok(Some(current)) if &current == hash => None,
                Ok(Some(_)) => Some(Close::TokenRevoked),
                Ok(None) => Some(Close::AgentRemoved),
                Err(_) => None,
            },
            None => {
                if p.expires_at.is_some_and(|exp| exp <= clock::now_secs()) {
                    return Some(Close::TokenExpired);
                }
                match self.store.user_by_id(p.id) {
                    Ok(Some(u)) if u.deleted => Some(Close::UserRemoved),
                    Ok(Some(u)) if u.disabled => Some(Close::UserDisabled),
                    Ok(Some(u)) if u.session_gen != p.session_gen || u.role != p.role => {
                        Some(Close::SessionRevoked)
                    }
                    Ok(Some(_)) => None,
                    Ok(None) => Some(Close::UserRemoved),
                    Err(_) => None,
                }
            }
        }
    }

    /// A writer flushed these stored frames to a connection of the user they address.
    pub fn delivered(&self, ids: Vec<i64>) {
        self.store.mark_delivered(ids);
    }

    // ----- inbound frames (through a `Session`) ----------------------------------------

    /// Checks a frame and routes it now, or, for a stored type, submits it to the store and
    /// returns it in flight, to be routed by `land` once its row is committed.
    fn accept(&self, from: &Arc<Conn>, env: Envelope) -> Result<Option<Landing>, FrameError> {
        let local_id = env.local_id.clone();
        self.dispatch(from, env)
            .map_err(|e| e.about(local_id.as_deref()))
    }

    /// Waits for a frame's commit, then routes it.
    fn land(&self, from: &Arc<Conn>, landing: Landing) -> Result<(), FrameError> {
        let Landing { pending, route } = landing;
        let stored = match pending.wait() {
            Ok(s) => s,
            Err(e) => return Err(storage_failed(e).about(route.local_id())),
        };
        match route {
            Route::Relay(env, target) => self.route_relay(from, &env, target, Some(&stored)),
            Route::Log(log) => self.route_log(from, &log, &stored),
        }
        Ok(())
    }

    /// Tells one connection why its frame was refused.
    fn send_error(&self, conn: &Conn, e: &FrameError) {
        self.metrics.error(e.code);
        let payload = raw_json(&wire::ErrorPayload {
            code: e.code.as_str(),
            message: &e.message,
        });
        let now = clock::now_rfc3339();
        let mut frame = Frame::server(Kind::Error, Some(&payload), &now);
        frame.local_id = e.local_id.as_deref();
        conn.deliver(Shared::new(Kind::Error, frame.to_json()).to(None));
    }

    fn dispatch(&self, from: &Arc<Conn>, env: Envelope) -> Result<Option<Landing>, FrameError> {
        let me = &from.principal;
        match env.kind {
            Kind::SystemLog => self.system_log(from, env).map(Some),
            Kind::Chat | Kind::ChatStream | Kind::ChatStreamEnd => {
                let target = self.require_target(env.target_id)?;
                self.relay(from, env, target)
            }
            Kind::AuthRequest => {
                if me.role != Role::Butler {
                    return Err(refuse(
                        Code::Forbidden,
                        "only the Butler may send AUTH_REQUEST",
                    ));
                }
                let target = self.require_target(env.target_id)?;
                if !target.role.is_human() {
                    return Err(refuse(Code::Forbidden, "AUTH_REQUEST must target a human"));
                }
                self.relay(from, env, target)
            }
            Kind::AuthResponse => {
                if !me.role.is_human() {
                    return Err(refuse(
                        Code::Forbidden,
                        "only humans may send AUTH_RESPONSE",
                    ));
                }
                let butler = self.butler_id()?;
                let target_id = if env.target_id == 0 {
                    butler
                } else {
                    env.target_id
                };
                if target_id != butler {
                    return Err(refuse(
                        Code::Forbidden,
                        "AUTH_RESPONSE must target the Butler",
                    ));
                }
                let target = self.require_target(target_id)?;
                let mut env = Envelope { target_id, ..env };
                let answer = self.check_answer(me, env.payload.as_deref())?;
                // The answer goes into the request's thread unless it names one.
                if env.conversation_id.is_none() {
                    env.conversation_id = answer.as_ref().and_then(|a| a.conversation_id);
                }
                self.relay(from, env, target)
            }
            Kind::AuthStatusUpdate => {
                if me.role != Role::Butler {
                    return Err(refuse(
                        Code::Forbidden,
                        "only the Butler may send AUTH_STATUS_UPDATE",
                    ));
                }
                // The Butler's own word on its request (it expired one, say) is remembered.
                self.record_status_update(me, env.payload.as_deref());
                if env.target_id == 0 {
                    self.to_every_human(me, &env);
                    Ok(None)
                } else {
                    let target = self.require_target(env.target_id)?;
                    self.relay(from, env, target)
                }
            }
            Kind::AgentStatus => {
                self.agent_status(me, &env)?;
                Ok(None)
            }
            Kind::Custom => {
                // Routed like CHAT_STREAM; with no target, to every human, never to agents.
                if env.target_id == 0 {
                    self.to_every_human(me, &env);
                    Ok(None)
                } else {
                    let target = self.require_target(env.target_id)?;
                    self.relay(from, env, target)
                }
            }
            // The envelope parser admits no server-only kind.
            Kind::Ack | Kind::Error | Kind::Presence | Kind::ButlerAgentMessage => Err(refuse(
                Code::Forbidden,
                format!("{} frames are sent by the server only", env.kind.as_str()),
            )),
        }
    }

    fn to_every_human(&self, me: &Principal, env: &Envelope) {
        let frame = self.frame_from(me, env, None, &clock::now_rfc3339());
        for c in self.humans() {
            c.deliver(frame.to(None));
        }
        self.publish(Audience::Humans, &frame);
    }

    /// AGENT_STATUS `{"status": "BUSY"|"IDLE"}` (or the bare string): an agent's or the
    /// Butler's own word on whether it is busy, shown with its presence until it goes offline.
    fn agent_status(&self, me: &Principal, env: &Envelope) -> Result<(), FrameError> {
        if me.role.is_human() {
            return Err(refuse(
                Code::Forbidden,
                "only agents and the Butler may send AGENT_STATUS",
            ));
        }
        let raw = env.payload.as_deref().map(RawValue::get).unwrap_or("null");
        let status = match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Object(o)) => o
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        let busy = match status.to_ascii_uppercase().as_str() {
            "BUSY" => true,
            "IDLE" => false,
            _ => {
                return Err(refuse(
                    Code::BadEnvelope,
                    r#"AGENT_STATUS payload must be {"status":"BUSY"} or {"status":"IDLE"}"#,
                ))
            }
        };
        let changed = {
            let _presence = self.presence.lock().unwrap_or_else(|p| p.into_inner());
            let mut reg = self.write();
            if busy {
                reg.busy.insert(me.id)
            } else {
                reg.busy.remove(&me.id)
            }
        };
        if changed {
            if let Some(c) = &self.cluster {
                if let Err(e) = c.set_busy(me.id, busy) {
                    log_error!("bus: cannot record that user {} is busy: {e}", me.id);
                }
            }
            self.announce_presence(me, true, busy, &clock::now_rfc3339());
        }
        Ok(())
    }

    fn require_target(&self, target_id: i64) -> Result<Target, FrameError> {
        if target_id == 0 {
            return Err(refuse(
                Code::TargetRequired,
                "this frame type needs a target_id",
            ));
        }
        self.target(target_id)?
            .ok_or_else(|| refuse(Code::TargetNotFound, format!("no user with id {target_id}")))
    }

    pub fn butler_id(&self) -> Result<i64, FrameError> {
        self.store
            .butler()
            .map_err(|_| refuse(Code::Internal, "storage unavailable"))?
            .map(|u| u.id)
            .ok_or_else(|| refuse(Code::TargetNotFound, "there is no Butler"))
    }

    /// CHAT, CHAT_STREAM(_END), AUTH_*: a stored type is submitted to the store and routed
    /// when it lands; the others are routed now.
    fn relay(
        &self,
        from: &Arc<Conn>,
        mut env: Envelope,
        target: Target,
    ) -> Result<Option<Landing>, FrameError> {
        self.file(&from.principal, target, &mut env)?;
        if !env.kind.stored() {
            self.route_relay(from, &env, target, None);
            return Ok(None);
        }
        let pending = self.submit_chat(&from.principal, &env, target);
        Ok(Some(Landing {
            pending,
            route: Route::Relay(env, target),
        }))
    }

    /// Delivers to every connection of the target and echoes to a human sender's
    /// connections; a machine sender gets an ACK for a stored frame with a `local_id`.
    fn route_relay(
        &self,
        from: &Arc<Conn>,
        env: &Envelope,
        target: Target,
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
            for c in self.conns_of(target.id) {
                c.deliver(frame.to(mark_id));
            }
            if stored.is_none() {
                // Other nodes: the same receiver, and a human sender's echo. (A stored row
                // is announced by the writer.)
                let mut users = vec![target.id];
                if me.role.is_human() && me.id != target.id {
                    users.push(me.id);
                }
                self.publish(Audience::Users(users), &frame);
            }
        }
        if me.role.is_human() {
            // The echo: every connection of a human sender, unless it already got the frame
            // as the target.
            if target.id != me.id || duplicate {
                for c in self.conns_of(me.id) {
                    c.deliver(frame.to(None));
                }
            }
        } else if let (Some(s), Some(local_id)) = (stored, &env.local_id) {
            self.ack(from, local_id, s);
        }
        if env.kind == Kind::Chat && !duplicate {
            if let Some(s) = stored {
                self.monitor_butler_agent(me, env, target, s);
            }
        }
    }

    fn submit_chat(&self, me: &Principal, env: &Envelope, target: Target) -> store::Pending {
        let payload = env
            .payload
            .as_ref()
            .map(|p| p.get().to_string())
            .unwrap_or_else(|| "null".into());
        self.store.submit_chat(NewChat {
            sender_id: me.id,
            receiver_id: target.id,
            kind: env.kind,
            payload,
            local_id: env.local_id.clone(),
            stream_id: env.stream_id.clone(),
            conversation_id: env.conversation_id,
            sender_name: me.username.clone(),
            sender_role: me.role,
            receiver_role: target.role,
        })
    }

    fn ack(&self, to: &Arc<Conn>, local_id: &str, s: &Stored) {
        let mut ack = Frame::server(Kind::Ack, None, &s.timestamp);
        ack.id = Some(s.id);
        ack.local_id = Some(local_id);
        to.deliver(Shared::new(Kind::Ack, ack.to_json()).to(None));
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
            kind: env.type_name(),
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
        Shared::new(env.kind, frame.to_json())
    }

    /// A Butler↔agent CHAT is mirrored to every admin (SPEC: BUTLER_AGENT_MESSAGE).
    fn monitor_butler_agent(&self, me: &Principal, env: &Envelope, target: Target, s: &Stored) {
        let agent_id = match (me.role, target.role) {
            (Role::Butler, Role::Agent) => target.id,
            (Role::Agent, Role::Butler) => me.id,
            _ => return,
        };
        let payload = raw_json(&wire::ButlerAgentPayload {
            agent_id,
            id: s.id,
            kind: env.kind.as_str(),
            sender_id: me.id,
            sender_name: &me.username,
            sender_role: me.role.as_str(),
            payload: env.payload.as_deref(),
            timestamp: &s.timestamp,
        });
        let now = clock::now_rfc3339();
        let frame = Shared::new(
            Kind::ButlerAgentMessage,
            Frame::server(Kind::ButlerAgentMessage, Some(&payload), &now).to_json(),
        );
        for c in self
            .humans()
            .into_iter()
            .filter(|c| c.principal.role == Role::Admin)
        {
            c.deliver(frame.to(None));
        }
    }

    fn system_log(&self, from: &Arc<Conn>, env: Envelope) -> Result<Landing, FrameError> {
        let (level, content) = parse_log_payload(env.payload.as_deref())?;
        let me = &from.principal;
        if !self.allow_log(me.id, content.len()) {
            return Err(refuse(
                Code::RateLimited,
                "log lines over this sender's bytes per second; this one was dropped",
            ));
        }
        let log = NewLog {
            sender_id: Some(me.id),
            agent_id: me.username.clone(),
            level,
            content,
            local_id: env.local_id,
        };
        Ok(Landing {
            pending: self.store.submit_log(log.clone()),
            route: Route::Log(log),
        })
    }

    /// A SYSTEM_LOG frame's row is committed: broadcast it, echo or acknowledge.
    fn route_log(&self, from: &Arc<Conn>, log: &NewLog, stored: &Stored) {
        let me = &from.principal;
        self.broadcast_log(me, log, stored);
        if me.role.is_human() {
            // The broadcast was the human's echo; a repeat gets the echo alone.
            if stored.duplicate {
                let frame = self.log_frame(me, log, stored);
                for c in self.conns_of(me.id) {
                    c.deliver(frame.to(None));
                }
            }
        } else if let Some(local_id) = &log.local_id {
            self.ack(from, local_id, stored);
        }
    }

    /// Whether `user` may store `bytes` more of log content now (`--max-log-bytes-per-second`:
    /// one sender cannot fill the disk, or flood every dashboard, faster than that).
    pub fn allow_log(&self, user: i64, bytes: usize) -> bool {
        let ok = self.log_rates.allow(user, bytes as f64);
        if !ok {
            self.metrics.limit("log_rate_limited");
        }
        ok
    }

    // ----- frames from REST ------------------------------------------------------------

    /// Stores a dashboard log and fans it out to every human connection (never to
    /// machines). A repeated `local_id` stores nothing and is not broadcast again.
    pub fn post_log(&self, sender: &Principal, log: &NewLog) -> Result<Stored, store::StoreError> {
        let stored = self.store.insert_log(log.clone())?;
        self.broadcast_log(sender, log, &stored);
        Ok(stored)
    }

    fn broadcast_log(&self, sender: &Principal, log: &NewLog, stored: &Stored) {
        if !stored.duplicate {
            let frame = self.log_frame(sender, log, stored);
            for c in self.humans() {
                c.deliver(frame.to(None));
            }
        }
    }

    fn log_frame(&self, sender: &Principal, log: &NewLog, stored: &Stored) -> Shared {
        let payload = raw_json(&wire::LogPayload {
            id: stored.id,
            agent_id: &log.agent_id,
            level: &log.level,
            content: &log.content,
            timestamp: &stored.timestamp,
        });
        let frame = Frame {
            id: Some(stored.id),
            kind: Kind::SystemLog.as_str(),
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
        Shared::new(Kind::SystemLog, frame.to_json())
    }

    /// Delivers an AUTH_RESPONSE posted over REST to the Butler, stored like a WS frame,
    /// and checked and remembered like one (README "Approvals").
    pub fn post_auth_response(
        &self,
        me: &Principal,
        payload: &RawValue,
    ) -> Result<(), AnswerRefusal> {
        let butler = self
            .butler_id()
            .and_then(|id| self.require_target(id))
            .map_err(AnswerRefusal::Failed)?;
        let answer = self.judge_answer(me, Some(payload))?;
        let env = Envelope {
            kind: Kind::AuthResponse,
            custom: None,
            target_id: butler.id,
            payload: Some(payload.to_owned()),
            local_id: None,
            stream_id: None,
            conversation_id: answer.as_ref().and_then(|a| a.conversation_id),
        };
        let stored = self
            .submit_chat(me, &env, butler)
            .wait()
            .map_err(|e| AnswerRefusal::Failed(storage_failed(e)))?;
        let frame = self.frame_from(me, &env, Some(stored.id), &stored.timestamp);
        for c in self.conns_of(butler.id) {
            c.deliver(frame.to(Some(stored.id)));
        }
        // The echo, as over the WebSocket: the answerer's other tabs see the answer.
        for c in self.conns_of(me.id) {
            c.deliver(frame.to(None));
        }
        Ok(())
    }

    fn announce_presence(&self, who: &Principal, online: bool, busy: bool, now: &str) {
        let payload = raw_json(&wire::PresencePayload {
            user_id: who.id,
            username: &who.username,
            role: who.role.as_str(),
            online,
            last_seen_at: Some(now),
            status: machine_status(online, busy),
            activity: if busy { "BUSY" } else { "IDLE" },
        });
        let frame = Shared::new(
            Kind::Presence,
            Frame::server(Kind::Presence, Some(&payload), now).to_json(),
        );
        log_debug!(
            "hub: {} {} is {}",
            who.role.as_str(),
            who.id,
            if online { "online" } else { "offline" }
        );
        for c in self.humans() {
            c.deliver(frame.to(None));
        }
        self.publish(Audience::Humans, &frame);
    }
}

/// A byte budget per sender: `rate` bytes a second, bursts of 4 seconds' worth.
struct LogRates {
    rate: f64,
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

impl LogRates {
    fn new(rate: f64) -> LogRates {
        LogRates {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn allow(&self, user: i64, bytes: f64) -> bool {
        let burst = 4.0 * self.rate;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(user).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(burst);
        *last = now;
        // One line larger than the whole burst still goes through when the bucket is full.
        if *tokens >= bytes.min(burst) {
            *tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// A machine user's `status` as agent objects and PRESENCE spell it: ONLINE, BUSY (online and
/// said so; the original dashboard shows it) or OFFLINE.
pub fn machine_status(online: bool, busy: bool) -> &'static str {
    match (online, busy) {
        (true, true) => "BUSY",
        (true, false) => "ONLINE",
        (false, _) => "OFFLINE",
    }
}

/// A serializable payload as raw JSON for a `Frame`. Our payload types are plain structs of
/// strings and numbers, which always serialize.
pub fn raw_json<T: serde::Serialize>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("payload serializes")
}

fn storage_failed(e: store::StoreError) -> FrameError {
    log_error!("hub: storing a frame failed: {e}");
    refuse(
        Code::Internal,
        "storage failed; the frame was not stored, retry with the same local_id",
    )
}
