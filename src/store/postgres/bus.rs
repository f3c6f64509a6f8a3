//! The cross-node bus on PostgreSQL (see `store/bus.rs` for what it promises, README
//! "Running several nodes" for how to run it).
//!
//! - **Publishing**: the writer adds one `pg_notify` per committed batch to the batch's own
//!   transaction (`notify_batch`), so a notification exists exactly when its rows do, and
//!   notifications from one node arrive everywhere in that node's commit order. One
//!   NOTIFY per row would stop scaling near 2.7k commits/s: notifying commits serialize on
//!   one queue lock, so it is taken once per batch.
//! - **Listening**: one dedicated connection per node (`listen`), never pooled (a LISTEN on
//!   a pooled or pgbouncer-transaction connection would hear nothing). When it is lost the
//!   node reconnects and says `Resync`: NOTIFY has no replay.
//! - **Membership**: `nodes` (heartbeats, by the database's clock, so nodes need not agree
//!   on the time) and `connections` (per node and user, a count and the busy flag). A user
//!   is online while a live node holds one of its connections; a node silent for
//!   `timeout` is swept by whichever node holds the sweep lock that moment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::{Client, NoTls, Transaction};
use crossbeam_channel::{Receiver, Sender};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{chat_from_row, prepared, Conn, Statement};
use crate::clock;
use crate::identity::Role;
use crate::store::bus::{
    Audience, BusEvent, BusItem, BusStats, Cluster, ClusterControl, Offline, RemoteChat, RemoteLog,
};
use crate::store::writer::{Job, Outcome};
use crate::store::{ChatRow, Delivery, LogRow, NewChat, Result, StoreError, Stored};
use crate::{log_error, log_info, log_warn};

/// The one channel every node listens on.
pub(in crate::store) const CHANNEL: &str = "echocenter";
/// A notification's payload stays below PostgreSQL's 8000-byte limit.
const NOTIFY_MAX: usize = 7600;
/// A frame whose JSON (escaped) is longer than this travels through `bus_frames`.
const INLINE_FRAME_MAX: usize = 6000;
/// Advisory locks: one per user's connection count (two-key form: this class, the user id),
/// and the sweep.
const PRESENCE_LOCK_CLASS: i32 = 0x4563_0010;
const SWEEP_LOCK: i64 = 0x4563_686f_0010;
/// Large frames are kept this long for listeners that lag behind.
const LARGE_FRAMES_KEPT: &str = "10 minutes";

// ----- publishing (the writer's side) -----------------------------------------------------

/// Adds this batch's notification(s) to its transaction: every stored row (not a repeat)
/// and every published frame, in the batch's order. `node` 0 publishes nothing (a command
/// line process is not a node).
pub(in crate::store) fn notify_batch(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    node: i64,
    batch: &[Job],
    outcomes: &[Outcome],
) -> Result<()> {
    if node == 0 {
        return Ok(());
    }
    let mut items: Vec<String> = Vec::new();
    for (job, outcome) in batch.iter().zip(outcomes) {
        let stored = match outcome {
            Outcome::Stored(Ok(s)) if !s.duplicate => Some(s),
            _ => None,
        };
        let item = match (job, stored) {
            (Job::Chat(c, _), Some(s)) => chat_item(c, s),
            (Job::Log(_, _), Some(s)) => json!(["l", s.id]),
            (Job::Publish(audience, frame), _) => {
                let inline = serde_json::to_string(frame).unwrap_or_default();
                if inline.len() <= INLINE_FRAME_MAX {
                    json!(["f", audience_json(audience), Value::String(frame.clone())])
                } else {
                    let st = prepared(
                        statements,
                        tx,
                        "INSERT INTO bus_frames (json) VALUES ($1) RETURNING id",
                    )?;
                    let id: i64 = tx.query_one(&st, &[frame])?.try_get(0)?;
                    json!(["t", audience_json(audience), id])
                }
            }
            _ => continue,
        };
        items.push(item.to_string());
    }
    if items.is_empty() {
        return Ok(());
    }
    let st = prepared(statements, tx, "SELECT pg_notify($1, $2)")?;
    let head = format!("{{\"n\":{node},\"t\":{},\"i\":[", clock::now_ms());
    let mut payload = head.clone();
    let mut count = 0;
    for item in items {
        // The item, its comma and the closing `]}`.
        if count > 0 && payload.len() + 1 + item.len() + 2 > NOTIFY_MAX {
            payload.push_str("]}");
            tx.execute(&st, &[&CHANNEL, &payload])?;
            payload = head.clone();
            count = 0;
        }
        if count > 0 {
            payload.push(',');
        }
        payload.push_str(&item);
        count += 1;
    }
    payload.push_str("]}");
    tx.execute(&st, &[&CHANNEL, &payload])?;
    Ok(())
}

/// A stored chat row's entry: the whole row when it is small, so the other nodes route it
/// without reading it back (that read, planned per execution with two joins, was a quarter
/// of PostgreSQL's CPU at 1,000 round trips/s across two nodes); else its id.
fn chat_item(c: &NewChat, s: &Stored) -> Value {
    let whole = json!([
        "C",
        s.id,
        c.sender_id,
        c.receiver_id,
        c.mirrored(),
        c.kind.as_str(),
        c.local_id,
        c.stream_id,
        c.conversation_id,
        s.timestamp,
        c.sender_name,
        c.sender_role.as_str(),
        c.receiver_role.as_str(),
        c.payload,
    ]);
    if whole.to_string().len() <= INLINE_FRAME_MAX {
        whole
    } else {
        json!(["c", s.id, c.sender_id, c.receiver_id, c.mirrored()])
    }
}

/// The row `chat_item` carried whole.
fn stored_chat(a: &[Value]) -> Option<BusItem> {
    let text = |i: usize| a.get(i).and_then(Value::as_str);
    let maybe_text = |i: usize| text(i).map(str::to_string);
    let receiver_role = Role::parse(text(12)?)?;
    let payload = RawValue::from_string(text(13)?.to_string()).ok()?;
    let row = ChatRow {
        id: a.get(1)?.as_i64()?,
        local_id: maybe_text(6),
        sender_id: a.get(2)?.as_i64()?,
        receiver_id: a.get(3)?.as_i64()?,
        kind: text(5)?.to_string(),
        payload,
        stream_id: maybe_text(7),
        conversation_id: a.get(8)?.as_i64(),
        timestamp: text(9)?.to_string(),
        // As stored: a frame for a machine waits for its delivery flag, one for a human
        // is history from the start.
        delivery: if receiver_role.is_human() {
            Delivery::Delivered
        } else {
            Delivery::Pending
        },
    };
    Some(BusItem::StoredChat {
        mirrored: a.get(4)?.as_bool()?,
        chat: Box::new(RemoteChat {
            row,
            sender_name: text(10)?.to_string(),
            sender_role: Role::parse(text(11)?)?,
            receiver_role,
        }),
    })
}

fn audience_json(a: &Audience) -> Value {
    match a {
        Audience::Users(ids) => json!(ids),
        Audience::Humans => json!("h"),
    }
}

fn audience_of(v: &Value) -> Option<Audience> {
    match v {
        Value::String(s) if s == "h" => Some(Audience::Humans),
        Value::Array(ids) => Some(Audience::Users(
            ids.iter().filter_map(Value::as_i64).collect(),
        )),
        _ => None,
    }
}

// ----- reading notifications --------------------------------------------------------------

/// A notification's payload as the hub's event; None for one that is not ours (or our own).
fn parse(payload: &str, own: i64) -> Option<BusEvent> {
    let v: Value = serde_json::from_str(payload).ok()?;
    let node = v["n"].as_i64().unwrap_or(0);
    if node == own {
        return None;
    }
    if let Some(kind) = v["c"].as_str() {
        let user = v["u"].as_i64().unwrap_or(0);
        let reason = v["r"].as_str().unwrap_or("").to_string();
        return Some(BusEvent::ClusterControl(match kind {
            "close" => ClusterControl::Close { user, reason },
            "close_all" => ClusterControl::CloseAll { reason },
            "forget" => ClusterControl::Forget { user },
            "forget_all" => ClusterControl::ForgetAll,
            _ => return None,
        }));
    }
    let items = v["i"]
        .as_array()?
        .iter()
        .filter_map(|item| {
            let a = item.as_array()?;
            Some(match a.first()?.as_str()? {
                "C" => stored_chat(a)?,
                "c" => BusItem::Chat {
                    id: a.get(1)?.as_i64()?,
                    sender: a.get(2)?.as_i64()?,
                    receiver: a.get(3)?.as_i64()?,
                    mirrored: a.get(4)?.as_bool()?,
                },
                "l" => BusItem::Log {
                    id: a.get(1)?.as_i64()?,
                },
                "f" => BusItem::Frame {
                    audience: audience_of(a.get(1)?)?,
                    json: a.get(2)?.as_str()?.to_string(),
                },
                "t" => BusItem::LargeFrame {
                    audience: audience_of(a.get(1)?)?,
                    id: a.get(2)?.as_i64()?,
                },
                _ => return None,
            })
        })
        .collect();
    Some(BusEvent::Batch {
        node,
        at_ms: v["t"].as_i64().unwrap_or(0),
        items,
    })
}

pub(in crate::store) fn control_payload(node: i64, c: &ClusterControl) -> String {
    match c {
        ClusterControl::Close { user, reason } => {
            json!({"n": node, "c": "close", "u": user, "r": reason})
        }
        ClusterControl::CloseAll { reason } => json!({"n": node, "c": "close_all", "r": reason}),
        ClusterControl::Forget { user } => json!({"n": node, "c": "forget", "u": user}),
        ClusterControl::ForgetAll => json!({"n": node, "c": "forget_all"}),
    }
    .to_string()
}

/// The listener thread: LISTEN on a connection of its own, hand every notification to the
/// hub, and on losing the connection, connect again and say `Resync`.
fn listen(
    config: ::postgres::Config,
    node: i64,
    events: Sender<BusEvent>,
    stats: Arc<BusStats>,
    stop: Arc<AtomicBool>,
) {
    let mut first = true;
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Relaxed) {
        let mut client = match config.connect(NoTls) {
            Ok(c) => c,
            Err(e) => {
                log_warn!("bus: the listener cannot connect ({e}); trying again");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")) {
            log_warn!("bus: LISTEN failed ({e}); trying again");
            std::thread::sleep(backoff);
            continue;
        }
        backoff = Duration::from_millis(100);
        if !first {
            stats.listener_reconnects.fetch_add(1, Relaxed);
            log_info!("bus: the listener is back; running store and forward again");
            if events.send(BusEvent::Resync).is_err() {
                return;
            }
        }
        first = false;
        if !serve(&mut client, node, &events, &stats, &stop) {
            return;
        }
        if !stop.load(Relaxed) {
            log_warn!("bus: the listener's connection was lost; reconnecting");
        }
    }
}

/// Reads notifications until the connection is lost (true) or the hub is gone (false).
fn serve(
    client: &mut Client,
    node: i64,
    events: &Sender<BusEvent>,
    stats: &BusStats,
    stop: &AtomicBool,
) -> bool {
    let mut checked = Instant::now();
    while !stop.load(Relaxed) {
        {
            let mut notifications = client.notifications();
            let mut it = notifications.timeout_iter(Duration::from_millis(500));
            loop {
                match it.next() {
                    Ok(Some(n)) => {
                        stats.notifications.fetch_add(1, Relaxed);
                        if let Some(event) = parse(n.payload(), node) {
                            if events.send(event).is_err() {
                                return false;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log_warn!("bus: the listener's connection failed: {e}");
                        return true;
                    }
                }
            }
        }
        if client.is_closed() {
            return true;
        }
        // A connection cut without a word (a network partition) shows only when used.
        if checked.elapsed() > Duration::from_secs(5) {
            if client.is_valid(Duration::from_secs(3)).is_err() {
                return true;
            }
            checked = Instant::now();
        }
    }
    true
}

// ----- membership -------------------------------------------------------------------------

/// This node in the cluster: its membership rows, its listener, its heartbeat.
pub struct PgCluster {
    node: i64,
    conn: Mutex<Conn>,
    timeout_secs: f64,
    events: Mutex<Option<Receiver<BusEvent>>>,
    stats: Arc<BusStats>,
    stop: Arc<AtomicBool>,
}

/// Joins: registers this node, and starts its listener and its heartbeat (with the sweep).
pub(in crate::store) fn join(
    config: &::postgres::Config,
    writer_node: &AtomicI64,
    address: &str,
    timeout: Duration,
) -> Result<Arc<PgCluster>> {
    let mut conn = Conn::connect(config)?;
    let node: i64 = conn
        .client
        .query_one(
            "INSERT INTO nodes (address) VALUES ($1) RETURNING id",
            &[&address],
        )?
        .try_get(0)?;
    writer_node.store(node, Relaxed);
    let (tx, rx) = crossbeam_channel::unbounded();
    let cluster = Arc::new(PgCluster {
        node,
        conn: Mutex::new(conn),
        timeout_secs: timeout.as_secs_f64(),
        events: Mutex::new(Some(rx)),
        stats: Arc::new(BusStats::default()),
        stop: Arc::new(AtomicBool::new(false)),
    });
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(|_| ())
            .map_err(StoreError::File)
    };
    {
        // Named, so an operator (or a test) can tell the listener from the pools.
        let mut listener = config.clone();
        listener.application_name("echocenter-bus-listener");
        let (config, tx, stats, stop) = (
            listener,
            tx.clone(),
            cluster.stats.clone(),
            cluster.stop.clone(),
        );
        spawn(
            "bus-listener",
            Box::new(move || listen(config, node, tx, stats, stop)),
        )?;
    }
    {
        let (config, weak, address) = (
            config.clone(),
            Arc::downgrade(&cluster),
            address.to_string(),
        );
        spawn(
            "bus-heartbeat",
            Box::new(move || heartbeat(config, weak, tx, address, timeout)),
        )?;
    }
    log_info!(
        "bus: joined as node {node}; nodes silent for {} s are swept",
        timeout.as_secs_f64()
    );
    Ok(cluster)
}

/// Every sixth of the timeout: this node's heartbeat, the notification queue's usage, and
/// (on one node at a time) the sweep of nodes that fell silent.
fn heartbeat(
    config: ::postgres::Config,
    cluster: std::sync::Weak<PgCluster>,
    events: Sender<BusEvent>,
    address: String,
    timeout: Duration,
) {
    let every = timeout / 6;
    let mut conn: Option<Conn> = None;
    loop {
        std::thread::sleep(every);
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if cluster.stop.load(Relaxed) {
            return;
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = Conn::connect(&config).ok();
        }
        let Some(c) = conn.as_mut() else {
            log_warn!("bus: heartbeat: the database cannot be reached");
            continue;
        };
        match beat(c, &cluster, &address) {
            Ok(true) => {}
            Ok(false) => {
                log_warn!("bus: this node was swept while silent; counting its connections again");
                let _ = events.send(BusEvent::Rejoin);
            }
            Err(e) => log_warn!("bus: heartbeat failed: {e}"),
        }
        match sweep(c, cluster.timeout_secs) {
            Ok(offline) if !offline.is_empty() => {
                let _ = events.send(BusEvent::Swept(offline));
            }
            Ok(_) => {}
            Err(e) => log_warn!("bus: sweep failed: {e}"),
        }
    }
}

/// Whether this node's row was still there (else it is made again).
fn beat(c: &mut Conn, cluster: &PgCluster, address: &str) -> Result<bool> {
    let n = c.execute(
        "UPDATE nodes SET heartbeat_at = now() WHERE id = $1",
        &[&cluster.node],
    )?;
    if let Ok(Some(row)) = c.query_opt("SELECT (pg_notification_queue_usage() * 1e6)::int8", &[]) {
        let ppm: i64 = row.try_get(0)?;
        cluster
            .stats
            .queue_usage_ppm
            .store(ppm.max(0) as u64, Relaxed);
    }
    if n == 1 {
        return Ok(true);
    }
    c.execute(
        "INSERT INTO nodes (id, address) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        &[&cluster.node, &address],
    )?;
    Ok(false)
}

/// Removes nodes silent for longer than the timeout and their connections; returns the
/// machine users that are now offline everywhere (their last-seen time recorded).
fn sweep(c: &mut Conn, timeout_secs: f64) -> Result<Vec<Offline>> {
    let client = c.checked()?;
    let mut tx = client.transaction()?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SWEEP_LOCK])?
        .try_get(0)?;
    if !locked {
        return Ok(Vec::new());
    }
    tx.execute(
        "DELETE FROM nodes WHERE heartbeat_at < now() - make_interval(secs => $1)",
        &[&timeout_secs],
    )?;
    let users: Vec<i64> = tx
        .query(
            "DELETE FROM connections c WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = c.node_id)
             RETURNING user_id",
            &[],
        )?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    let now = clock::now_rfc3339();
    let offline = if users.is_empty() {
        Vec::new()
    } else {
        tx.query(
            "UPDATE users u SET online_since = NULL, last_seen_at = $2
             WHERE u.id = ANY($1) AND u.role IN ('AGENT', 'BUTLER')
               AND NOT EXISTS (SELECT 1 FROM connections c WHERE c.user_id = u.id)
             RETURNING u.id, u.username, u.role",
            &[&users, &now],
        )?
        .iter()
        .filter_map(|r| {
            Some(Offline {
                id: r.try_get(0).ok()?,
                username: r.try_get(1).ok()?,
                role: Role::parse(r.try_get::<_, &str>(2).ok()?)?,
                last_seen_at: now.clone(),
            })
        })
        .collect()
    };
    tx.execute(
        &format!(
            "DELETE FROM bus_frames WHERE created_at < now() - interval '{LARGE_FRAMES_KEPT}'"
        ),
        &[],
    )?;
    tx.commit()?;
    Ok(offline)
}

impl PgCluster {
    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections of `user` on live nodes (the caller holds the user's presence lock).
    fn live_count(&self, tx: &mut Transaction, user: i64) -> Result<i64> {
        Ok(tx
            .query_one(
                "SELECT COALESCE(SUM(c.conns), 0)::int8 FROM connections c
                 JOIN nodes n ON n.id = c.node_id
                 WHERE c.user_id = $1 AND n.heartbeat_at > now() - make_interval(secs => $2)",
                &[&user, &self.timeout_secs],
            )?
            .try_get(0)?)
    }
}

/// The user's presence lock (two-key advisory lock; ids beyond 2^31 share keys, harmlessly).
fn lock_user(tx: &mut Transaction, user: i64) -> Result<()> {
    let key = (user % i32::MAX as i64) as i32;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&PRESENCE_LOCK_CLASS, &key],
    )?;
    Ok(())
}

impl Cluster for PgCluster {
    fn node(&self) -> i64 {
        self.node
    }

    fn open(&self, user: i64, max: usize) -> Result<Option<bool>> {
        let mut conn = self.conn();
        let client = conn.checked()?;
        let mut tx = client.transaction()?;
        lock_user(&mut tx, user)?;
        let before = self.live_count(&mut tx, user)?;
        if before >= max as i64 {
            tx.commit()?;
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO connections (node_id, user_id, conns) VALUES ($1, $2, 1)
             ON CONFLICT (node_id, user_id) DO UPDATE SET conns = connections.conns + 1",
            &[&self.node, &user],
        )?;
        let first = before == 0;
        if first {
            let now = clock::now_rfc3339();
            tx.execute(
                "UPDATE users SET online_since = $2, last_seen_at = $2
                 WHERE id = $1 AND role IN ('AGENT', 'BUTLER')",
                &[&user, &now],
            )?;
        }
        tx.commit()?;
        Ok(Some(first))
    }

    fn close(&self, user: i64, at: &str) -> Result<bool> {
        let mut conn = self.conn();
        let client = conn.checked()?;
        let mut tx = client.transaction()?;
        lock_user(&mut tx, user)?;
        tx.execute(
            "UPDATE connections SET conns = conns - 1 WHERE node_id = $1 AND user_id = $2",
            &[&self.node, &user],
        )?;
        tx.execute(
            "DELETE FROM connections WHERE node_id = $1 AND user_id = $2 AND conns <= 0",
            &[&self.node, &user],
        )?;
        let last = self.live_count(&mut tx, user)? == 0;
        if last {
            tx.execute(
                "UPDATE users SET online_since = NULL, last_seen_at = $2
                 WHERE id = $1 AND role IN ('AGENT', 'BUTLER')",
                &[&user, &at],
            )?;
        }
        tx.commit()?;
        Ok(last)
    }

    fn set_busy(&self, user: i64, busy: bool) -> Result<()> {
        self.conn().execute(
            "UPDATE connections SET busy = $3 WHERE node_id = $1 AND user_id = $2",
            &[&self.node, &user, &busy],
        )?;
        Ok(())
    }

    fn online(&self) -> Result<HashMap<i64, bool>> {
        let rows = self.conn().query(
            "SELECT c.user_id, bool_or(c.busy) FROM connections c
             JOIN nodes n ON n.id = c.node_id
             WHERE n.heartbeat_at > now() - make_interval(secs => $1)
             GROUP BY c.user_id",
            &[&self.timeout_secs],
        )?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    fn chats(&self, ids: &[i64]) -> Result<Vec<RemoteChat>> {
        let ids = ids.to_vec();
        let rows = self.conn().query(
            "SELECT c.id, c.local_id, c.sender_id, c.receiver_id, c.type, c.content, c.stream_id,
                    c.conversation_id, c.timestamp, c.delivered, s.username, s.role, r.role
             FROM chat_messages c JOIN users s ON s.id = c.sender_id
             JOIN users r ON r.id = c.receiver_id
             WHERE c.id = ANY($1) ORDER BY c.id",
            &[&ids],
        )?;
        rows.iter()
            .map(|r| {
                let role = |i: usize| -> Result<Role> {
                    Role::parse(r.try_get::<_, &str>(i)?)
                        .ok_or_else(|| StoreError::Db("a user row with an unknown role".into()))
                };
                Ok(RemoteChat {
                    row: chat_from_row(r)?,
                    sender_name: r.try_get(10)?,
                    sender_role: role(11)?,
                    receiver_role: role(12)?,
                })
            })
            .collect()
    }

    fn logs(&self, ids: &[i64]) -> Result<Vec<RemoteLog>> {
        let ids = ids.to_vec();
        let rows = self.conn().query(
            "SELECT m.id, m.agent_id, m.level, m.content, m.timestamp, m.sender_id, m.local_id,
                    u.username, u.role
             FROM messages m LEFT JOIN users u ON u.id = m.sender_id
             WHERE m.id = ANY($1) ORDER BY m.id",
            &[&ids],
        )?;
        rows.iter()
            .map(|r| {
                let agent_id: String = r.try_get(1)?;
                let name: Option<String> = r.try_get(7)?;
                let role: Option<&str> = r.try_get(8)?;
                Ok(RemoteLog {
                    row: LogRow {
                        id: r.try_get(0)?,
                        agent_id: agent_id.clone(),
                        level: r.try_get(2)?,
                        content: r.try_get(3)?,
                        timestamp: r.try_get(4)?,
                    },
                    sender_id: r.try_get::<_, Option<i64>>(5)?.unwrap_or(0),
                    sender_name: name.unwrap_or(agent_id),
                    sender_role: role.and_then(Role::parse).unwrap_or(Role::Agent),
                    local_id: r.try_get(6)?,
                })
            })
            .collect()
    }

    fn large_frame(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_opt("SELECT json FROM bus_frames WHERE id = $1", &[&id])?
            .map(|r| r.try_get(0))
            .transpose()?)
    }

    fn peers(&self) -> Result<usize> {
        let row = self.conn().query_opt(
            "SELECT COUNT(*) FROM nodes WHERE id <> $1
               AND heartbeat_at > now() - make_interval(secs => $2)",
            &[&self.node, &self.timeout_secs],
        )?;
        Ok(row
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?
            .unwrap_or(0) as usize)
    }

    fn control(&self, c: &ClusterControl) -> Result<()> {
        self.conn().execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &control_payload(self.node, c)],
        )?;
        Ok(())
    }

    fn events(&self) -> Option<Receiver<BusEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn stats(&self) -> &BusStats {
        &self.stats
    }

    fn rejoin(&self, counts: &[(i64, usize, bool)]) -> Result<()> {
        let mut conn = self.conn();
        let client = conn.checked()?;
        let mut tx = client.transaction()?;
        tx.execute("DELETE FROM connections WHERE node_id = $1", &[&self.node])?;
        for (user, n, busy) in counts {
            tx.execute(
                "INSERT INTO connections (node_id, user_id, conns, busy) VALUES ($1, $2, $3, $4)",
                &[&self.node, user, &(*n as i32), busy],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn leave(&self) {
        self.stop.store(true, Relaxed);
        let mut conn = self.conn();
        let done = conn.checked().and_then(|client| {
            let mut tx = client.transaction()?;
            tx.execute("DELETE FROM connections WHERE node_id = $1", &[&self.node])?;
            tx.execute("DELETE FROM nodes WHERE id = $1", &[&self.node])?;
            tx.commit()?;
            Ok(())
        });
        if let Err(e) = done {
            log_error!("bus: cannot leave the cluster cleanly ({e}); the sweep will");
        }
    }
}
