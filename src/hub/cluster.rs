//! The hub among several nodes on one database (README "Running several nodes"; the store's
//! side is `store::bus`).
//!
//! - **Out**: a frame routed here is also published, so that the other nodes deliver it to
//!   their connections of the same users. Stored frames need nothing more: the writer
//!   announces every committed row. Unstored ones (CHAT_STREAM, CHAT_STREAM_END, custom
//!   types, AUTH_STATUS_UPDATE, PRESENCE, ERROR `undelivered`) go through `publish`, into
//!   the same ordered stream as the rows. Session closes and cache invalidations go as
//!   control messages, at once.
//! - **In**: the bus thread (`run_bus`) takes the listener's events in order and delivers
//!   them as if they had been routed here: a remote row to its receiver's and (human)
//!   sender's local connections, mirrored to local admins; a remote frame to its audience.
//! - **Presence**: the `connections` table is the truth; the hub asks it on open and close
//!   (first and last across every node, the 16-per-user cap), and REST reads who is online
//!   elsewhere from it, cached for a second.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Shared;
use super::envelope::Envelope;
use super::{Hub, Target};
use crate::identity::{Principal, Role};
use crate::store::{
    Audience, BusEvent, BusItem, ClusterControl, Offline, RemoteChat, RemoteLog, Stored,
};
use crate::wire::{Close, Kind};
use crate::{clock, log_debug, log_error, log_info};

/// How long REST trusts its view of who is online on other nodes.
const REMOTE_PRESENCE_TTL: Duration = Duration::from_secs(1);

/// The other nodes' users online (and busy), as last read.
#[derive(Default)]
pub(super) struct RemotePresence {
    read_at: Option<Instant>,
    online: HashMap<i64, bool>,
}

impl Hub {
    // ----- out ---------------------------------------------------------------------------

    /// Publishes an unstored frame for the other nodes (nothing on a single node).
    pub(super) fn publish(&self, audience: Audience, frame: &Shared) {
        if self.cluster.is_some() {
            self.store.publish(audience, frame.text.as_str());
        }
    }

    /// Tells the other nodes (nothing on a single node).
    pub(super) fn announce(&self, control: ClusterControl) {
        if let Some(c) = &self.cluster {
            if let Err(e) = c.control(&control) {
                log_error!("bus: cannot tell the other nodes ({control:?}): {e}");
            }
        }
    }

    // ----- presence ----------------------------------------------------------------------

    /// Whether `user` is online on another node, and busy there (None: not online, or one
    /// node only).
    pub(super) fn remote_presence(&self, user: i64) -> Option<bool> {
        let cluster = self.cluster.as_ref()?;
        let mut r = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        if r.read_at
            .is_none_or(|at| at.elapsed() > REMOTE_PRESENCE_TTL)
        {
            match cluster.online() {
                Ok(online) => {
                    r.online = online;
                    r.read_at = Some(Instant::now());
                }
                Err(e) => log_error!("bus: cannot read who is online: {e}"),
            }
        }
        r.online.get(&user).copied()
    }

    /// The next REST read asks the database again (presence changed somewhere).
    pub(super) fn presence_changed(&self) {
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_at = None;
    }

    /// Whether `user` has a connection on any node.
    pub(super) fn online_anywhere(&self, user: i64) -> bool {
        !self.conns_of(user).is_empty() || self.remote_presence(user).is_some()
    }

    // ----- in ----------------------------------------------------------------------------

    /// Starts the bus thread, if this node has others.
    pub fn start_bus(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(events) = self.cluster.as_ref().and_then(|c| c.events()) else {
            return Ok(());
        };
        let hub = self.clone();
        std::thread::Builder::new()
            .name("bus".into())
            .spawn(move || {
                for event in events {
                    hub.on_bus(event);
                }
            })
            .map(|_| ())
    }

    fn on_bus(&self, event: BusEvent) {
        match event {
            BusEvent::Batch { node, at_ms, items } => {
                self.metrics
                    .bus_latency(clock::now_ms().saturating_sub(at_ms).max(0) as u64);
                log_debug!("bus: {} items from node {node}", items.len());
                self.remote_batch(items);
            }
            BusEvent::ClusterControl(c) => self.remote_control(c),
            BusEvent::Resync => self.resync(),
            BusEvent::Rejoin => self.rejoin(),
            BusEvent::Swept(offline) => self.swept(offline),
        }
    }

    /// Delivers another node's batch here, in its order.
    fn remote_batch(&self, items: Vec<BusItem>) {
        let (humans, admins) = {
            let reg = self.read();
            let admins = reg.humans.iter().any(|c| c.principal.role == Role::Admin);
            (!reg.humans.is_empty(), admins)
        };
        let mut chat_ids = Vec::new();
        let mut log_ids = Vec::new();
        for item in &items {
            match item {
                BusItem::Chat {
                    id,
                    sender,
                    receiver,
                    mirrored,
                } if self.wants_chat(*sender, *receiver, *mirrored && admins) => {
                    chat_ids.push(*id);
                }
                BusItem::Log { id } if humans => log_ids.push(*id),
                _ => {}
            }
        }
        let chats: HashMap<i64, RemoteChat> = self
            .fetch(chat_ids, |ids| self.cluster_chats(ids))
            .into_iter()
            .map(|c| (c.row.id, c))
            .collect();
        let logs: HashMap<i64, RemoteLog> = self
            .fetch(log_ids, |ids| self.cluster_logs(ids))
            .into_iter()
            .map(|l| (l.row.id, l))
            .collect();
        let mut chats = chats;
        let mut logs = logs;
        for item in items {
            match item {
                BusItem::Chat { id, .. } => {
                    if let Some(c) = chats.remove(&id) {
                        self.remote_chat(c);
                    }
                }
                BusItem::StoredChat { mirrored, chat } => {
                    let (sender, receiver) = (chat.row.sender_id, chat.row.receiver_id);
                    if self.wants_chat(sender, receiver, mirrored && admins) {
                        self.remote_chat(*chat);
                    }
                }
                BusItem::Log { id } => {
                    if let Some(l) = logs.remove(&id) {
                        self.remote_log(l);
                    }
                }
                BusItem::Frame { audience, json } => self.deliver_here(&audience, json),
                BusItem::LargeFrame { audience, id } => {
                    let json = self
                        .cluster
                        .as_ref()
                        .and_then(|c| c.large_frame(id).ok().flatten());
                    match json {
                        Some(json) => self.deliver_here(&audience, json),
                        None => log_error!("bus: large frame {id} is gone; not delivered here"),
                    }
                }
            }
        }
    }

    /// Whether a row between these two users is routed here: one of them is connected, or
    /// it is mirrored to admins and one is here.
    fn wants_chat(&self, sender: i64, receiver: i64, mirrored_to_admins: bool) -> bool {
        self.has_conns(receiver) || self.has_conns(sender) || mirrored_to_admins
    }

    fn has_conns(&self, user: i64) -> bool {
        self.read().by_user.contains_key(&user)
    }

    fn fetch<T>(
        &self,
        ids: Vec<i64>,
        get: impl Fn(&[i64]) -> crate::store::Result<Vec<T>>,
    ) -> Vec<T> {
        if ids.is_empty() {
            return Vec::new();
        }
        match get(&ids) {
            Ok(rows) => rows,
            Err(e) => {
                log_error!(
                    "bus: cannot read {} rows of another node; they reach this node's users by store and forward or history: {e}",
                    ids.len()
                );
                Vec::new()
            }
        }
    }

    fn cluster_chats(&self, ids: &[i64]) -> crate::store::Result<Vec<RemoteChat>> {
        match &self.cluster {
            Some(c) => c.chats(ids),
            None => Ok(Vec::new()),
        }
    }

    fn cluster_logs(&self, ids: &[i64]) -> crate::store::Result<Vec<RemoteLog>> {
        match &self.cluster {
            Some(c) => c.logs(ids),
            None => Ok(Vec::new()),
        }
    }

    /// A row stored on another node, routed here as `route_relay` routes one of ours: to
    /// the receiver's connections (flagged delivered once written), echoed to a human
    /// sender's, mirrored to admins; never an ACK (the sender is not here).
    fn remote_chat(&self, c: RemoteChat) {
        let RemoteChat {
            row,
            sender_name,
            sender_role,
            receiver_role,
        } = c;
        let Some(kind) = Kind::parse(&row.kind) else {
            return;
        };
        let sender = Principal {
            id: row.sender_id,
            username: sender_name,
            role: sender_role,
            token_hash: None,
            expires_at: None,
            session_gen: 0,
        };
        let target = Target {
            id: row.receiver_id,
            role: receiver_role,
        };
        // A human wrote in this thread: an agent here answers into it (threads.rs).
        if let (true, Some(thread)) = (sender_role.is_human(), row.conversation_id) {
            self.human_wrote_in(sender.id, target.id, thread);
        }
        let env = Envelope {
            kind,
            custom: None,
            target_id: row.receiver_id,
            payload: Some(row.payload),
            local_id: row.local_id,
            stream_id: row.stream_id,
            conversation_id: row.conversation_id,
        };
        let stored = Stored {
            id: row.id,
            timestamp: row.timestamp,
            duplicate: false,
        };
        let frame = self.frame_from(&sender, &env, Some(stored.id), &stored.timestamp);
        let mark = (!target.role.is_human()).then_some(stored.id);
        for c in self.conns_of(target.id) {
            c.deliver(frame.to(mark));
        }
        if sender.role.is_human() && target.id != sender.id {
            for c in self.conns_of(sender.id) {
                c.deliver(frame.to(None));
            }
        }
        if kind == Kind::Chat {
            self.monitor_butler_agent(&sender, &env, target, &stored);
        }
    }

    fn remote_log(&self, l: RemoteLog) {
        let sender = Principal {
            id: l.sender_id,
            username: l.sender_name,
            role: l.sender_role,
            token_hash: None,
            expires_at: None,
            session_gen: 0,
        };
        let log = crate::store::NewLog {
            sender_id: Some(l.sender_id),
            agent_id: l.row.agent_id,
            level: l.row.level,
            content: l.row.content,
            local_id: l.local_id,
        };
        let stored = Stored {
            id: l.row.id,
            timestamp: l.row.timestamp,
            duplicate: false,
        };
        let frame = self.log_frame(&sender, &log, &stored);
        for c in self.humans() {
            c.deliver(frame.to(None));
        }
    }

    fn deliver_here(&self, audience: &Audience, json: String) {
        let kind = frame_kind(&json);
        if kind == Kind::Presence {
            self.presence_changed();
            self.butler_came_back(&json);
        }
        let frame = Shared::new(kind, json);
        match audience {
            Audience::Humans => {
                for c in self.humans() {
                    c.deliver(frame.to(None));
                }
            }
            Audience::Users(users) => {
                let mut seen = HashSet::new();
                for u in users {
                    if seen.insert(*u) {
                        for c in self.conns_of(*u) {
                            c.deliver(frame.to(None));
                        }
                    }
                }
            }
        }
    }

    /// The Butler connected on another node: what this node kept for it goes there.
    fn butler_came_back(&self, presence: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(presence) else {
            return;
        };
        let p = &v["payload"];
        if p["role"] != "BUTLER" || p["online"] != true {
            return;
        }
        let Some(butler) = p["user_id"].as_i64() else {
            return;
        };
        for notice in self.take_butler_notices() {
            self.publish(Audience::Users(vec![butler]), &notice);
        }
    }

    fn remote_control(&self, c: ClusterControl) {
        log_debug!("bus: control {c:?}");
        match c {
            ClusterControl::Close { user, reason } => {
                if let Some(close) = close_of(&reason) {
                    self.close_user_here(user, close);
                }
            }
            ClusterControl::CloseAll { reason } => {
                if let Some(close) = close_of(&reason) {
                    self.close_all_here(close);
                }
            }
            ClusterControl::Forget { user } => self.forget_user_here(user),
            ClusterControl::ForgetAll => {
                self.forget_all_here();
                if let Some(hook) = &*self.reset_hook.lock().unwrap_or_else(|p| p.into_inner()) {
                    hook();
                }
            }
        }
    }

    /// The listener missed notifications: what this node's machine users may have missed is
    /// still undelivered in the database, so it is sent again, as store and forward does.
    /// (Humans read their history; the dashboard catches up when it reconnects.)
    fn resync(&self) {
        let users: Vec<i64> = {
            let reg = self.read();
            reg.by_user
                .iter()
                .filter(|(_, conns)| conns.iter().any(|c| !c.principal.role.is_human()))
                .map(|(u, _)| *u)
                .collect()
        };
        let mut sent = 0;
        for user in users {
            let mut next = 0;
            loop {
                let rows = match self.store.undelivered_page(user, next, i64::MAX, 64) {
                    Ok(rows) => rows,
                    Err(e) => {
                        log_error!("bus: resync of user {user} failed: {e}");
                        break;
                    }
                };
                let Some(last) = rows.last().map(|r| r.id) else {
                    break;
                };
                next = last + 1;
                let conns = self.conns_of(user);
                for row in &rows {
                    if let Some(frame) = self.replay_frame(row) {
                        for c in &conns {
                            c.deliver(
                                Shared {
                                    text: frame.text.clone(),
                                    kind: frame.kind,
                                }
                                .to(Some(row.id)),
                            );
                        }
                        sent += 1;
                    }
                }
            }
        }
        log_info!("bus: resync sent {sent} undelivered frames again");
    }

    /// This node was swept while silent: count its connections again.
    fn rejoin(&self) {
        let counts: Vec<(i64, usize, bool)> = {
            let reg = self.read();
            reg.by_user
                .iter()
                .map(|(u, conns)| (*u, conns.len(), reg.busy.contains(u)))
                .collect()
        };
        if let Some(c) = &self.cluster {
            if let Err(e) = c.rejoin(&counts) {
                log_error!("bus: cannot count this node's connections again: {e}");
            }
        }
        self.presence_changed();
    }

    /// Users whose last connection was on a node that died: offline, for everyone.
    fn swept(&self, offline: Vec<Offline>) {
        self.presence_changed();
        for o in offline {
            log_info!(
                "bus: {} {} went offline with its node",
                o.role.as_str(),
                o.id
            );
            let who = Principal {
                id: o.id,
                username: o.username,
                role: o.role,
                token_hash: None,
                expires_at: None,
                session_gen: 0,
            };
            self.write()
                .last_seen
                .insert(o.id, clock::parse_rfc3339(&o.last_seen_at).unwrap_or(0));
            self.announce_presence(&who, false, false, &o.last_seen_at);
        }
    }

    /// What to run when another node reset the data.
    pub fn on_reset(&self, hook: Box<dyn Fn() + Send + Sync>) {
        *self.reset_hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// How many other nodes are alive (0 on a single node).
    pub fn peers(&self) -> usize {
        self.cluster
            .as_ref()
            .and_then(|c| c.peers().ok())
            .unwrap_or(0)
    }

    /// Leaves the other nodes (a clean shutdown, after every session closed).
    pub fn leave_cluster(&self) {
        if let Some(c) = &self.cluster {
            c.leave();
        }
    }
}

/// The frame type of a frame's JSON (for the per-type counters), read without parsing the
/// rest.
fn frame_kind(json: &str) -> Kind {
    #[derive(serde::Deserialize)]
    struct TypeOnly<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<TypeOnly>(json)
        .ok()
        .and_then(|t| Kind::parse(&t.kind))
        .unwrap_or(Kind::Custom)
}

/// The closes another node may ask for, by their reason text.
fn close_of(reason: &str) -> Option<Close> {
    [
        Close::TokenRevoked,
        Close::AgentRemoved,
        Close::UserRemoved,
        Close::UserDisabled,
        Close::SessionRevoked,
        Close::DataReset,
    ]
    .into_iter()
    .find(|c| c.reason() == reason)
}
