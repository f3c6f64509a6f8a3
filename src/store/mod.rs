//! The store: the face the hub and REST use over a database backend. Every SQL statement
//! of the server lives behind it (in `sqlite.rs` and `postgres.rs`, and in `sql/` and
//! `sql/postgres/` for the schemas); neither the hub nor `http` names a backend.
//!
//! Two ways in:
//! - `Backend` (reached through `Store`'s `Deref`): reads and the rare administrative writes,
//!   each a complete statement or transaction of its own;
//! - the group-commit writer (`writer.rs`): the hot-path writes (chat frames, dashboard logs,
//!   delivery flags, last-seen times, replay plans) go to one writer thread, which commits
//!   everything that queued up while the previous commit was running in one transaction.
//!
//! The contract every backend keeps:
//! - **Ids before routing.** `submit_chat`/`submit_log` return a `Pending`; its `wait`
//!   returns once the row is committed, with its `id` and `timestamp`. An `id` a client has
//!   seen is in the database.
//! - **Order.** Rows submitted from one thread are committed in submission order (one
//!   writer, one queue), and a row's `id` is larger than the ids of every row committed
//!   before it. On PostgreSQL that holds per writer, i.e. per node: several nodes sharing one
//!   database draw ids from one sequence, so a row committed later on another node may have
//!   a smaller id. Per-sender order still holds (a sender's frames go through its node's one
//!   writer), and so does each node's own order.
//! - **Idempotency.** A chat or log row whose sender already stored that `local_id` stores
//!   nothing and returns the first row (`Stored::duplicate`). Decided in the database (a
//!   unique index on (sender_id, local_id)), so it holds across processes and nodes too.
//! - **All or nothing per batch.** When a commit fails, every caller of that batch is told
//!   (`StoreError::BatchFailed`); nothing of it is stored, and each may retry with its
//!   `local_id`.
//! - **At least once.** Delivery flags and last-seen times are written asynchronously: a
//!   crash before their commit means a frame is replayed again, never that one is lost.
//! - **Ids without gaps, mostly.** On SQLite ids are consecutive. On PostgreSQL a sequence
//!   hands them out and does not take back what a failed batch or a lost race drew, so ids
//!   may skip; refused duplicates (a name taken, a repeated `local_id`) are checked before
//!   they would draw one.

mod bus;
mod pool;
mod postgres;
mod sqlite;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::config::{Database, PostgresDsn, Sync};
use crate::identity::{AgentToken, Role};
use crate::wire::Kind;

pub use bus::{
    Audience, BusEvent, BusItem, Cluster, ClusterControl, Offline, RemoteChat, RemoteLog,
};
use writer::{answer, Job};
pub use writer::{Pending, Presence, WriterStats};

#[derive(Debug)]
pub enum StoreError {
    /// A uniqueness rule was broken; the text is the client-facing reason.
    Conflict(&'static str),
    NotFound,
    /// The database refused or failed a statement (the backend's own error inside).
    Db(Box<dyn std::error::Error + Send + std::marker::Sync>),
    /// The database file or its directory could not be prepared.
    File(std::io::Error),
    /// The database was migrated by a newer build (it names a migration this one lacks):
    /// running on it could misread or damage what the newer build wrote.
    NewerSchema(String),
    /// The group commit this write was part of failed (disk full, I/O): nothing of it is
    /// stored, and the write may be retried.
    BatchFailed,
    /// The writer thread is gone (it would only end by panicking).
    Closed,
    /// This backend does not do that (e.g. a file backup of a PostgreSQL database); the text
    /// says what to do instead.
    Unsupported(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict(why) => write!(f, "conflict: {why}"),
            StoreError::NotFound => write!(f, "not found"),
            StoreError::Db(e) => write!(f, "database error: {e}"),
            StoreError::File(e) => write!(f, "{e}"),
            StoreError::NewerSchema(name) => write!(
                f,
                "the database was upgraded by a newer EchoCenter (migration {name}); run that \
                 version, or restore a backup made before the upgrade"
            ),
            StoreError::BatchFailed => write!(f, "the commit failed; nothing of it was stored"),
            StoreError::Closed => write!(f, "store is shut down"),
            StoreError::Unsupported(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub agent_kind: String,
    pub runtime_kind: String,
    pub description: String,
    pub created_at: String,
    pub deleted: bool,
    pub last_seen_at: Option<String>,
    pub token_hint: Option<String>,
    pub token_updated_at: Option<String>,
    /// A human whose account is disabled: no login, no sessions.
    pub disabled: bool,
    /// The generation a JWT must carry (see `sql/002_accounts.sql`).
    pub session_gen: i64,
    /// A machine user with a live connection: since when (the database's view).
    pub online_since: Option<String>,
}

/// A change to a human account; absent fields stay as they are.
#[derive(Debug, Default)]
pub struct HumanChange {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    pub password_hash: Option<String>,
}

#[derive(Debug)]
pub struct NewMachine<'a> {
    pub username: &'a str,
    pub role: Role,
    pub token: &'a AgentToken,
    pub agent_kind: &'a str,
    pub runtime_kind: &'a str,
    pub description: &'a str,
}

#[derive(Clone, Debug)]
pub struct LogRow {
    pub id: i64,
    pub agent_id: String,
    pub level: String,
    pub content: String,
    pub timestamp: String,
}

#[derive(Debug, Default)]
pub struct LogQuery {
    pub offset: i64,
    pub limit: i64,
    pub agent_id: Option<String>,
    /// Any of these levels (empty: all).
    pub levels: Vec<String>,
    pub q: Option<String>,
    /// Rows older than this id only (paging back from a page's last row).
    pub before_id: Option<i64>,
    /// Timestamps (our RFC 3339 text, which sorts) at or after / before.
    pub since: Option<String>,
    pub until: Option<String>,
    /// The page stops once its rows' content takes this many bytes of JSON (at least one row).
    pub max_bytes: usize,
}

#[derive(Debug)]
pub struct ChatRow {
    pub id: i64,
    pub local_id: Option<String>,
    pub sender_id: i64,
    pub receiver_id: i64,
    pub kind: String,
    pub payload: Box<RawValue>,
    pub stream_id: Option<String>,
    pub conversation_id: Option<i64>,
    pub timestamp: String,
    pub delivery: Delivery,
}

/// Where a stored chat frame stands with store and forward (`chat_messages.delivered`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Addressed to a machine that has not received it yet.
    Pending,
    /// Written to one of the receiver's connections (or addressed to a human, who reads
    /// history instead).
    Delivered,
    /// Left out of a replay: never sent (see `Store::plan_replay`).
    Retired,
}

impl Delivery {
    fn from_column(v: i64) -> Delivery {
        match v {
            0 => Delivery::Pending,
            2 => Delivery::Retired,
            _ => Delivery::Delivered,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Pending => "pending",
            Delivery::Delivered => "delivered",
            Delivery::Retired => "retired",
        }
    }
}

/// The replay window's shares (see `hub::replay`).
#[derive(Debug, Clone)]
pub struct ReplayShares {
    /// Frames older than this (stored timestamp) are not replayed.
    pub since: String,
    /// Newest frames kept per human or Butler sender.
    pub priority: i64,
    /// Newest frames kept per agent sender, and from all agents together.
    pub agent: i64,
    pub agent_window: i64,
}

/// A conversation thread (README "Threads").
#[derive(Debug, Clone)]
pub struct ThreadRow {
    pub id: i64,
    pub owner_user_id: i64,
    pub peer_user_id: i64,
    pub channel_kind: String,
    pub title: String,
    pub summary: Option<String>,
    pub is_pinned: bool,
    pub is_default: bool,
    pub archived_at: Option<String>,
    pub last_message_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A change to a thread; absent fields stay as they are.
#[derive(Debug, Default)]
pub struct ThreadChange {
    pub title: Option<String>,
    pub summary: Option<String>,
    pub is_pinned: Option<bool>,
    pub is_archived: Option<bool>,
}

/// A stored AUTH_REQUEST, found by its payload's `action_id`.
#[derive(Debug, Clone)]
pub struct Approval {
    /// The AUTH_REQUEST row.
    pub id: i64,
    pub action_id: String,
    /// The Butler that asked, and the human asked.
    pub butler_id: i64,
    pub human_id: i64,
    /// PENDING, APPROVED, REJECTED or EXPIRED.
    pub status: String,
    pub conversation_id: Option<i64>,
}

/// What retention keeps (None: no limit of that kind).
#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub logs_for: Option<std::time::Duration>,
    pub chat_for: Option<std::time::Duration>,
    pub max_log_rows_per_agent: Option<u64>,
    pub max_log_bytes_per_agent: Option<u64>,
}

/// Rows retention deleted, by rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub logs_by_age: u64,
    pub logs_by_budget: u64,
    pub chat_by_age: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.logs_by_age + self.logs_by_budget + self.chat_by_age
    }

    pub fn add(&mut self, other: &Pruned) {
        self.logs_by_age += other.logs_by_age;
        self.logs_by_budget += other.logs_by_budget;
        self.chat_by_age += other.chat_by_age;
    }
}

/// Undelivered frames are kept this long whatever the chat retention (store and forward's
/// window; see `hub::replay`).
pub const UNDELIVERED_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;

/// A frame retired from store and forward, for telling its sender.
#[derive(Debug, Clone)]
pub struct Retired {
    pub id: i64,
    pub sender_id: i64,
    pub local_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewChat {
    pub sender_id: i64,
    pub receiver_id: i64,
    pub kind: Kind,
    /// The payload as JSON text, stored exactly as sent.
    pub payload: String,
    pub local_id: Option<String>,
    pub stream_id: Option<String>,
    pub conversation_id: Option<i64>,
    /// What routing needs of the two users, here and on another node (the cross-node bus
    /// carries small rows whole, so that node does not read them back).
    pub sender_name: String,
    pub sender_role: Role,
    pub receiver_role: Role,
}

impl NewChat {
    /// Whether store and forward must deliver it (the receiver is an agent or the Butler).
    pub fn forward(&self) -> bool {
        !self.receiver_role.is_human()
    }

    /// Between the Butler and an agent (admins see it as BUTLER_AGENT_MESSAGE, on every
    /// node).
    pub fn mirrored(&self) -> bool {
        matches!(
            (self.sender_role, self.receiver_role),
            (Role::Butler, Role::Agent) | (Role::Agent, Role::Butler)
        )
    }
}

#[derive(Debug, Clone)]
pub struct NewLog {
    pub sender_id: Option<i64>,
    pub agent_id: String,
    pub level: String,
    pub content: String,
    pub local_id: Option<String>,
}

/// What a hot-path insert returns: the row's identity, and whether it was already there
/// (a repeated `local_id`), in which case nothing new was stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: i64,
    pub timestamp: String,
    pub duplicate: bool,
}

/// Reads and administrative writes. Each method is one statement or one transaction.
pub trait Backend: Send + std::marker::Sync {
    /// Where the data lives, for log lines (a file path, or a database URL without password).
    fn describe(&self) -> String;

    /// Joins the nodes that share this database (the server does; the command line does
    /// not), listening on `address`; nodes silent for `timeout` are swept. None where there
    /// is only ever one node (SQLite).
    fn join_cluster(
        &self,
        _address: &str,
        _timeout: std::time::Duration,
    ) -> Result<Option<Arc<dyn Cluster>>> {
        Ok(None)
    }

    /// Tells every node on this database, from a process that is not one (the command
    /// line: a rotation closes the agent's sessions at once). Nothing where there are none.
    fn announce(&self, _control: &ClusterControl) -> Result<()> {
        Ok(())
    }

    // ----- settings and bootstrap -------------------------------------------------------
    fn setting(&self, key: &str) -> Result<Option<String>>;
    fn set_setting(&self, key: &str, value: &str) -> Result<()>;
    /// The value of `key`, set to `value` first if it had none: processes starting together
    /// on one database agree on the one that was stored first (the JWT secret).
    fn setting_or_init(&self, key: &str, value: &str) -> Result<String>;
    fn user_count(&self) -> Result<i64>;
    /// Creates the admin (id 1) and the Butler (id 2) on an empty database, in one
    /// transaction. Returns false (and changes nothing) when users already exist.
    fn bootstrap(
        &self,
        admin: &str,
        password_hash: &str,
        butler_token: &AgentToken,
        keep_raw: bool,
    ) -> Result<bool>;
    /// Production keeps no raw tokens: clears every stored copy.
    fn clear_raw_tokens(&self) -> Result<usize>;
    /// Wipes all data (for `/api/dev/mock/reset`); ids start again at 1. The caller flushes
    /// the writer first, so no pending write lands after the wipe.
    fn wipe(&self) -> Result<()>;

    // ----- users ------------------------------------------------------------------------
    fn create_human(&self, username: &str, role: Role, password_hash: &str) -> Result<UserRow>;
    fn create_machine(&self, m: &NewMachine, keep_raw: bool) -> Result<UserRow>;
    fn user_by_id(&self, id: i64) -> Result<Option<UserRow>>;
    fn user_by_name(&self, username: &str) -> Result<Option<UserRow>>;
    /// The password hash of a live human, for login.
    fn password_hash(&self, username: &str) -> Result<Option<(i64, String)>>;
    /// The live AGENT or BUTLER whose token hashes to `sha256`.
    fn machine_by_token_hash(&self, sha256: &str) -> Result<Option<UserRow>>;
    /// The current token hash of a machine user (None when it has no credential any more).
    fn token_hash_of(&self, user_id: i64) -> Result<Option<String>>;
    /// The raw token kept outside production (None when there is no copy).
    fn raw_token(&self, user_id: i64) -> Result<Option<String>>;
    /// Live AGENT and BUTLER users, ordered by id.
    fn machines(&self) -> Result<Vec<UserRow>>;
    /// Live ADMIN and MEMBER users (disabled ones included), ordered by id.
    fn humans(&self) -> Result<Vec<UserRow>>;
    /// Changes a human's role, disabled flag or password. A role change, disabling and a new
    /// password end every session (the session generation moves on). Refused with
    /// `Conflict("cannot remove the last admin")` when no active admin would remain; `NotFound`
    /// for anything but a live human.
    fn update_human(&self, id: i64, change: &HumanChange) -> Result<UserRow>;
    /// Marks a human deleted (its history stays, its name stays reserved) and ends its
    /// sessions; the last-admin rule as above.
    fn delete_human(&self, id: i64) -> Result<()>;
    fn password_hash_of(&self, id: i64) -> Result<Option<String>>;
    /// (username, password hash) of every active admin, for the start-up check that none
    /// still has the development password.
    fn admin_password_hashes(&self) -> Result<Vec<(String, String)>>;
    /// Forgets every `online_since` (a start: nothing is connected yet).
    fn clear_presence(&self) -> Result<()>;
    /// Writes a consistent copy of the whole database to `target` (a new file, mode 0600),
    /// safe while the server writes. PostgreSQL: `Unsupported`, pointing to pg_dump.
    fn backup_to(&self, target: &Path) -> Result<()>;
    /// Whether a read answers (the health check).
    fn readable(&self) -> Result<()>;
    /// The Butler (the live BUTLER user with the lowest id), if there is one.
    fn butler(&self) -> Result<Option<UserRow>>;
    /// The latest SYSTEM_LOG content of each named agent (absent when it never reported).
    fn last_reports(&self, usernames: &[&str]) -> Result<HashMap<String, String>>;
    fn rotate_token(&self, user_id: i64, token: &AgentToken, keep_raw: bool) -> Result<()>;
    /// Marks an agent deleted and drops its credential; its history stays.
    fn delete_agent(&self, user_id: i64) -> Result<()>;

    // ----- conversation threads ---------------------------------------------------------
    /// A human's threads, optionally with one peer or of one kind: pinned first, then by the
    /// newest message (threads without one last), then newest first.
    fn threads(
        &self,
        owner: i64,
        peer: Option<i64>,
        channel_kind: Option<&str>,
    ) -> Result<Vec<ThreadRow>>;
    fn thread(&self, id: i64) -> Result<Option<ThreadRow>>;
    fn create_thread(
        &self,
        owner: i64,
        peer: i64,
        channel_kind: &str,
        title: &str,
    ) -> Result<ThreadRow>;
    /// The pair's default thread, created on first use.
    fn default_thread(&self, owner: i64, peer: i64, channel_kind: &str) -> Result<ThreadRow>;
    fn update_thread(&self, id: i64, change: &ThreadChange) -> Result<ThreadRow>;
    /// A thread's stored rows: the newest `limit` below `before_id`, oldest first.
    fn thread_messages(&self, id: i64, limit: i64, before_id: Option<i64>) -> Result<Vec<ChatRow>>;
    /// The thread of the newest stored frame `human` sent `peer` that named one.
    fn last_thread(&self, human: i64, peer: i64) -> Result<Option<i64>>;

    // ----- approvals --------------------------------------------------------------------
    /// The newest stored AUTH_REQUEST whose payload has this `action_id`.
    fn approval(&self, action_id: &str) -> Result<Option<Approval>>;
    /// Rewrites a PENDING request's status (APPROVED, REJECTED, EXPIRED); false when it was
    /// no longer pending.
    fn set_approval_status(&self, request_id: i64, status: &str) -> Result<bool>;
    /// Every PENDING request stored before `before` (all of them when None) becomes EXPIRED.
    fn expire_approvals(&self, before: Option<&str>) -> Result<Vec<Approval>>;

    // ----- logs and chat ----------------------------------------------------------------
    fn logs(&self, q: &LogQuery) -> Result<Vec<LogRow>>;
    /// Both directions between `a` and `b`: the newest `limit` rows below `before_id`,
    /// returned oldest first.
    fn chat_history(
        &self,
        a: i64,
        b: i64,
        limit: i64,
        before_id: Option<i64>,
    ) -> Result<Vec<ChatRow>>;
    /// One page of a replay: undelivered frames for `user_id` with ids in `from..=to`, in id
    /// order, at most `page` of them. Paged so a long backlog never sits in memory at once.
    fn undelivered_page(&self, user_id: i64, from: i64, to: i64, page: i64)
        -> Result<Vec<ChatRow>>;
}

/// The database: a backend, and the group-commit writer in front of it.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    jobs: crossbeam_channel::Sender<Job>,
    stats: Arc<WriterStats>,
    /// Set once, when the server joins the other nodes (`join_cluster`).
    cluster: Arc<std::sync::OnceLock<Arc<dyn Cluster>>>,
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &(dyn Backend + 'static) {
        &*self.backend
    }
}

impl Store {
    /// Opens and migrates the database (a SQLite file is created if needed; a PostgreSQL
    /// database must exist), then starts the writer. `sync` is SQLite's; on PostgreSQL the
    /// server's `synchronous_commit` decides.
    pub fn open(db: &Database, sync: Sync) -> Result<Store> {
        match db {
            Database::Sqlite(path) => {
                let (backend, writer) = sqlite::open(path, sync)?;
                Store::start(Arc::new(backend), writer)
            }
            Database::Postgres(dsn) => {
                let (backend, writer) = postgres::open(dsn)?;
                Store::start(Arc::new(backend), writer)
            }
        }
    }

    /// Another PostgreSQL client on the database `dsn` names, with the settings the store's
    /// own clients use (for a dedicated connection, such as a LISTEN for the cross-node bus).
    #[allow(dead_code)] // the cross-node bus (issue 14) is its first user
    pub fn connect_postgres(dsn: &PostgresDsn) -> Result<::postgres::Client> {
        postgres::connect(dsn)
    }

    fn start(backend: Arc<dyn Backend>, writer: impl writer::Batches) -> Result<Store> {
        let (jobs, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(WriterStats::default());
        let writer_stats = stats.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(writer, rx, &writer_stats))
            .map_err(StoreError::File)?;
        Ok(Store {
            backend,
            jobs,
            stats,
            cluster: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// Joins the other nodes on this database, if the backend has any (see
    /// `Backend::join_cluster`). Once; later calls change nothing.
    pub fn join_cluster(&self, address: &str, timeout: std::time::Duration) -> Result<()> {
        if self.cluster.get().is_none() {
            if let Some(c) = self.backend.join_cluster(address, timeout)? {
                let _ = self.cluster.set(c);
            }
        }
        Ok(())
    }

    /// This node among others, when it has joined some.
    pub fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.get()
    }

    /// Publishes an unstored frame to the other nodes, in order with this node's writes
    /// (nothing when there are none).
    pub fn publish(&self, audience: Audience, json: &str) {
        if self.cluster.get().is_some() {
            let _ = self.jobs.send(Job::Publish(audience, json.to_string()));
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    // ----- the hot path: group-committed writes ----------------------------------------

    pub fn insert_chat(&self, chat: NewChat) -> Result<Stored> {
        self.submit_chat(chat).wait()
    }

    pub fn insert_log(&self, log: NewLog) -> Result<Stored> {
        self.submit_log(log).wait()
    }

    /// Queues a chat row for the next commit without waiting for it.
    pub fn submit_chat(&self, chat: NewChat) -> Pending {
        self.submit(|answer| Job::Chat(chat, answer))
    }

    /// Queues a log row for the next commit without waiting for it.
    pub fn submit_log(&self, log: NewLog) -> Pending {
        self.submit(|answer| Job::Log(log, answer))
    }

    fn submit(&self, job: impl FnOnce(writer::Answer<Result<Stored>>) -> Job) -> Pending {
        let (answer, wait) = answer();
        Pending::new(self.jobs.send(job(answer)).ok().map(|_| wait))
    }

    /// Records (asynchronously) that these stored frames were written to a connection of
    /// their receiver. A crash before the commit means they are sent again: at least once.
    pub fn mark_delivered(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.jobs.send(Job::Delivered(ids));
        }
    }

    /// Records (asynchronously) a machine user's first connection opening or last closing.
    pub fn set_presence(&self, user_id: i64, presence: Presence) {
        let _ = self.jobs.send(Job::Presence(user_id, presence));
    }

    /// Plans store and forward for `user_id`: retires every undelivered frame addressed to
    /// it that falls outside the window (older than `since`; beyond its sender's share; from
    /// agents, beyond the agents' window) and returns those, with the id of the newest frame
    /// left to replay. One write in the writer's next commit.
    pub fn plan_replay(
        &self,
        user_id: i64,
        shares: ReplayShares,
    ) -> Result<(Vec<Retired>, Option<i64>)> {
        let (answer, wait) = answer();
        self.jobs
            .send(Job::PlanReplay(user_id, shares, answer))
            .map_err(|_| StoreError::Closed)?;
        wait.wait().unwrap_or(Err(StoreError::Closed))
    }

    /// Turns on background retention in the writer (pruning in bounded steps between
    /// batches: every minute, and sooner while an agent floods).
    pub fn start_retention(&self, retention: Retention) {
        let _ = self.jobs.send(Job::Retention(retention));
    }

    /// Prunes now, until nothing is past the rules; returns what was deleted.
    pub fn prune_now(&self, retention: &Retention) -> Result<Pruned> {
        let (answer, wait) = answer();
        self.jobs
            .send(Job::Prune(retention.clone(), answer))
            .map_err(|_| StoreError::Closed)?;
        wait.wait().unwrap_or(Err(StoreError::Closed))
    }

    /// Whether the writer commits within `timeout` (the health check).
    pub fn writer_answers(&self, timeout: std::time::Duration) -> bool {
        let (answer, wait) = answer();
        self.jobs.send(Job::Barrier(answer)).is_ok() && wait.wait_for(timeout).is_some()
    }

    /// Waits until every write queued before this call is committed.
    pub fn flush(&self) {
        let (answer, wait) = answer();
        if self.jobs.send(Job::Barrier(answer)).is_ok() {
            let _ = wait.wait();
        }
    }

    /// Wipes all data; pending writes are committed first so none lands after the wipe.
    /// (This inherent method is what `store.wipe()` calls; the backend's alone would not
    /// flush.)
    pub fn wipe(&self) -> Result<()> {
        self.flush();
        self.backend.wipe()
    }
}
