//! The cross-node bus, as the store offers it to the hub (README "Running several nodes").
//!
//! Several nodes on one PostgreSQL database route each other's frames through it: every
//! committed batch of a node's writer carries one notification (split below PostgreSQL's
//! 8000-byte limit) listing, in the batch's order, the rows it stored (ids and who they
//! concern) and the unstored frames it routed (their JSON, or for a large one the id of a
//! row in `bus_frames`). Every node listens; it fetches the rows whose receivers it holds
//! and delivers them and the frames through its usual per-connection queues. One writer per
//! node and PostgreSQL delivering notifications in commit order keep a sender's frames in
//! order on every node: a stream's chunks, its final CHAT and its END.
//!
//! Nothing here names a backend: the hub sees `Cluster`, which only PostgreSQL provides
//! (SQLite is one box: `Store::cluster` is None and nothing is published).

use std::collections::HashMap;

use crossbeam_channel::Receiver;

use super::{ChatRow, LogRow, Result};
use crate::identity::Role;

/// Who a frame published on the bus is for, on every other node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every connection of these users.
    Users(Vec<i64>),
    /// Every human connection (PRESENCE, broadcast custom frames, AUTH_STATUS_UPDATE).
    Humans,
}

/// One entry of a batch's notification, in the order the node's writer took them.
#[derive(Debug)]
pub enum BusItem {
    /// A chat row was stored, carried whole (rows up to a few KB): routed without reading
    /// it back. `mirrored` as for `Chat`.
    StoredChat {
        mirrored: bool,
        chat: Box<RemoteChat>,
    },
    /// A chat row was stored (too large to carry whole: read it back by id); `mirrored`
    /// when it is between the Butler and an agent (every admin sees those, as
    /// BUTLER_AGENT_MESSAGE).
    Chat {
        id: i64,
        sender: i64,
        receiver: i64,
        mirrored: bool,
    },
    /// A dashboard log row was stored (every human sees it).
    Log { id: i64 },
    /// A frame that is not stored, as it goes on the wire.
    Frame { audience: Audience, json: String },
    /// Such a frame, too large for a notification: its row in `bus_frames`.
    LargeFrame { audience: Audience, id: i64 },
}

/// Sessions that must end, or cached facts that must go, on every node (rotation, removal,
/// a password change, a data reset). Published at once, not with a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterControl {
    /// Close every session of a user; the reason is a `wire::Close` reason text.
    Close {
        user: i64,
        reason: String,
    },
    /// Close every session on the node (a data reset).
    CloseAll {
        reason: String,
    },
    /// Forget what is cached about a user (its role, its threads).
    Forget {
        user: i64,
    },
    ForgetAll,
}

/// What the listener hands the hub.
#[derive(Debug)]
pub enum BusEvent {
    /// Another node's committed batch; `at_ms` is when it committed, by that node's clock.
    Batch {
        node: i64,
        at_ms: i64,
        items: Vec<BusItem>,
    },
    ClusterControl(ClusterControl),
    /// The listener was down (a dropped connection); notifications may have been missed, so
    /// the node runs store and forward again for its connected users.
    Resync,
    /// This node's heartbeat found it swept (it was silent for too long): its connections
    /// must be counted again.
    Rejoin,
    /// Machine users whose last connection was on a node that died: now offline.
    Swept(Vec<Offline>),
}

/// A machine user that went offline with a dead node.
#[derive(Debug, Clone)]
pub struct Offline {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub last_seen_at: String,
}

/// A chat row stored on another node, with what routing needs of its users.
#[derive(Debug)]
pub struct RemoteChat {
    pub row: ChatRow,
    pub sender_name: String,
    pub sender_role: Role,
    pub receiver_role: Role,
}

/// A log row fetched for routing on another node.
pub struct RemoteLog {
    pub row: LogRow,
    pub sender_id: i64,
    pub sender_name: String,
    pub sender_role: Role,
    pub local_id: Option<String>,
}

/// Counters of the bus for `/metrics`.
#[derive(Default)]
pub struct BusStats {
    pub listener_reconnects: std::sync::atomic::AtomicU64,
    pub notifications: std::sync::atomic::AtomicU64,
    /// `pg_notification_queue_usage()` × 1e6, sampled with the heartbeat.
    pub queue_usage_ppm: std::sync::atomic::AtomicU64,
}

/// A node among others on one database.
pub trait Cluster: Send + Sync {
    /// This node's id (its row in `nodes`).
    fn node(&self) -> i64;
    /// A connection of `user` opens on this node. None when the cluster already holds `max`
    /// of them; otherwise whether it is the user's first anywhere.
    fn open(&self, user: i64, max: usize) -> Result<Option<bool>>;
    /// A connection of `user` closed on this node: whether it was the user's last anywhere
    /// (and then its last-seen time is recorded as `at`).
    fn close(&self, user: i64, at: &str) -> Result<bool>;
    /// Whether `user` (online on this node) said it is busy.
    fn set_busy(&self, user: i64, busy: bool) -> Result<()>;
    /// Users online on any live node, and whether each is busy.
    fn online(&self) -> Result<HashMap<i64, bool>>;
    /// Chat rows (of those ids) and their users, for routing here.
    fn chats(&self, ids: &[i64]) -> Result<Vec<RemoteChat>>;
    fn logs(&self, ids: &[i64]) -> Result<Vec<RemoteLog>>;
    /// A large frame's JSON (`BusItem::LargeFrame`).
    fn large_frame(&self, id: i64) -> Result<Option<String>>;
    /// How many other nodes are alive.
    fn peers(&self) -> Result<usize>;
    /// Publishes a control message to every node (this one ignores its own).
    fn control(&self, c: &ClusterControl) -> Result<()>;
    /// The listener's events; taken once, by the hub.
    fn events(&self) -> Option<Receiver<BusEvent>>;
    fn stats(&self) -> &BusStats;
    /// Counts this node's connections again after it was swept while silent: (user,
    /// connections, busy).
    fn rejoin(&self, counts: &[(i64, usize, bool)]) -> Result<()>;
    /// Leaves the cluster (a clean shutdown): this node's connections stop counting now
    /// rather than when the sweeper notices its silence.
    fn leave(&self);
}
