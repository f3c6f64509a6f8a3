//! The SQLite backend: one WAL database file, several connections to it.
//!
//! - Two small pools of read connections (WAL lets readers run beside the writer and each
//!   other): `auth` for the point lookups that authentication and routing need, `general`
//!   for everything else (history, log searches, lists, administrative writes). A slow search
//!   therefore never queues an agent's authentication behind it.
//! - The group-commit writer's own connection (`SqliteWriter`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::value::RawValue;

use super::writer::{Batches, Job, Outcome};
use super::{
    Backend, ChatRow, Delivery, LogQuery, LogRow, NewChat, NewLog, NewMachine, ReplayShares,
    Result, Retired, StoreError, Stored, UserRow,
};
use crate::clock;
use crate::config::Sync;
use crate::identity::{AgentToken, Role};

/// Numbered migrations, applied in order, each in its own transaction, recorded by name.
const MIGRATIONS: &[(&str, &str)] = &[("001_initial", include_str!("../../sql/001_initial.sql"))];
/// Connections for authentication and routing lookups, and for everything else.
const AUTH_CONNECTIONS: usize = 2;
const GENERAL_CONNECTIONS: usize = 4;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(Box::new(e))
    }
}

/// Opens (creating if needed, mode 0600) and migrates the database; returns the backend and
/// the writer's side.
pub fn open(path: &Path, sync: Sync) -> Result<(Sqlite, SqliteWriter)> {
    prepare_file(path).map_err(|e| {
        StoreError::File(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })?;
    let mut conn = open_connection(path, sync)?;
    migrate(&mut conn)?;
    let writer = SqliteWriter {
        conn: open_connection(path, sync)?,
    };
    let mut general = vec![conn];
    for _ in 1..GENERAL_CONNECTIONS {
        general.push(open_connection(path, sync)?);
    }
    let auth = (0..AUTH_CONNECTIONS)
        .map(|_| open_connection(path, sync))
        .collect::<Result<Vec<_>>>()?;
    let backend = Sqlite {
        path: path.to_path_buf(),
        general: Pool::new(general),
        auth: Pool::new(auth),
    };
    Ok((backend, writer))
}

pub struct Sqlite {
    path: PathBuf,
    general: Pool,
    auth: Pool,
}

/// Connections lent out one caller at a time; a caller waits when all are out.
struct Pool {
    free: Mutex<Vec<Connection>>,
    returned: Condvar,
}

/// A connection borrowed from a pool; it goes back when dropped.
struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<Connection>,
}

impl Pool {
    fn new(conns: Vec<Connection>) -> Pool {
        Pool {
            free: Mutex::new(conns),
            returned: Condvar::new(),
        }
    }

    fn get(&self) -> Lease<'_> {
        // A panic while holding the lock leaves the list itself intact.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = free.pop() {
                return Lease {
                    pool: self,
                    conn: Some(conn),
                };
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl std::ops::Deref for Lease<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // Present from `get` until `drop`.
        self.conn.as_ref().expect("a lease holds its connection")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("a lease holds its connection")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut free: MutexGuard<'_, Vec<Connection>> =
                self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
            free.push(conn);
            self.pool.returned.notify_one();
        }
    }
}

impl Sqlite {
    fn conn(&self) -> Lease<'_> {
        self.general.get()
    }

    fn auth_conn(&self) -> Lease<'_> {
        self.auth.get()
    }
}

impl Backend for Sqlite {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    // ----- settings and bootstrap -------------------------------------------------------

    fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn user_count(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
    }

    /// Creates the admin (id 1) and the Butler (id 2) on an empty database, in one transaction.
    /// Returns false (and changes nothing) when users already exist.
    fn bootstrap(
        &self,
        admin: &str,
        password_hash: &str,
        butler_token: &AgentToken,
        keep_raw: bool,
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?;
        if count > 0 {
            return Ok(false);
        }
        let now = clock::now_rfc3339();
        insert_human(&tx, admin, Role::Admin, password_hash, &now)?;
        insert_machine(
            &tx,
            &NewMachine {
                username: "Butler",
                role: Role::Butler,
                token: butler_token,
                agent_kind: "butler",
                runtime_kind: "websocket",
                description: "The Butler: instructs agents on behalf of humans",
            },
            keep_raw,
            &now,
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Production keeps no raw tokens: clears every stored copy.
    fn clear_raw_tokens(&self) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE machine_credentials SET api_token = NULL WHERE api_token IS NOT NULL",
            [],
        )?)
    }

    /// Wipes all data (for `/api/dev/mock/reset`); ids start again at 1. Pending hot-path
    /// writes are committed first so none lands after the wipe.
    fn wipe(&self) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "DELETE FROM chat_messages;
             DELETE FROM messages;
             DELETE FROM human_credentials;
             DELETE FROM machine_credentials;
             DELETE FROM users;
             DELETE FROM sqlite_sequence WHERE name IN ('users', 'messages', 'chat_messages');",
        )?;
        tx.commit()?;
        Ok(())
    }

    // ----- users ------------------------------------------------------------------------

    fn create_human(&self, username: &str, role: Role, password_hash: &str) -> Result<UserRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = insert_human(&tx, username, role, password_hash, &clock::now_rfc3339())?;
        tx.commit()?;
        user_by_id(&conn, id)?.ok_or(StoreError::NotFound)
    }

    fn create_machine(&self, m: &NewMachine, keep_raw: bool) -> Result<UserRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = insert_machine(&tx, m, keep_raw, &clock::now_rfc3339())?;
        tx.commit()?;
        user_by_id(&conn, id)?.ok_or(StoreError::NotFound)
    }

    fn user_by_id(&self, id: i64) -> Result<Option<UserRow>> {
        user_by_id(&self.auth_conn(), id)
    }

    fn user_by_name(&self, username: &str) -> Result<Option<UserRow>> {
        let conn = self.conn();
        let id: Option<i64> = conn
            .query_row(
                "SELECT id FROM users WHERE username = ?1",
                [username],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => user_by_id(&conn, id),
            None => Ok(None),
        }
    }

    /// The password hash of a live human, for login.
    fn password_hash(&self, username: &str) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT u.id, h.password_hash FROM users u JOIN human_credentials h ON h.user_id = u.id
                 WHERE u.username = ?1 AND u.deleted_at IS NULL",
                [username],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// The live AGENT or BUTLER whose token hashes to `sha256`.
    fn machine_by_token_hash(&self, sha256: &str) -> Result<Option<UserRow>> {
        let conn = self.auth_conn();
        let id: Option<i64> = conn
            .query_row(
                "SELECT u.id FROM machine_credentials m JOIN users u ON u.id = m.user_id
                 WHERE m.token_sha256 = ?1 AND u.deleted_at IS NULL AND u.role IN ('AGENT', 'BUTLER')",
                [sha256],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => user_by_id(&conn, id),
            None => Ok(None),
        }
    }

    /// The current token hash of a machine user (None when it has no credential any more).
    fn token_hash_of(&self, user_id: i64) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT token_sha256 FROM machine_credentials WHERE user_id = ?1",
                [user_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The raw token kept outside production (None when there is no copy).
    fn raw_token(&self, user_id: i64) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT api_token FROM machine_credentials WHERE user_id = ?1",
                [user_id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Live AGENT and BUTLER users, ordered by id.
    fn machines(&self) -> Result<Vec<UserRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{USER_SELECT} WHERE u.role IN ('AGENT', 'BUTLER') AND u.deleted_at IS NULL ORDER BY u.id"
        ))?;
        let rows = stmt.query_map([], user_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// The Butler (the live BUTLER user with the lowest id), if there is one.
    fn butler(&self) -> Result<Option<UserRow>> {
        let conn = self.auth_conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{USER_SELECT} WHERE u.role = 'BUTLER' AND u.deleted_at IS NULL ORDER BY u.id LIMIT 1"
        ))?;
        Ok(stmt.query_row([], user_from_row).optional()?)
    }

    /// The latest SYSTEM_LOG content of each named agent (absent when it never reported).
    fn last_reports(&self, usernames: &[&str]) -> Result<HashMap<String, String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT content FROM messages WHERE agent_id = ?1 ORDER BY id DESC LIMIT 1",
        )?;
        let mut out = HashMap::new();
        for name in usernames {
            if let Some(content) = stmt
                .query_row([name], |r| r.get::<_, String>(0))
                .optional()?
            {
                out.insert((*name).to_string(), content);
            }
        }
        Ok(out)
    }

    fn rotate_token(&self, user_id: i64, token: &AgentToken, keep_raw: bool) -> Result<()> {
        let now = clock::now_rfc3339();
        let hash = token.sha256();
        let res = self.conn().execute(
            "INSERT INTO machine_credentials (user_id, token_sha256, token_hint, api_token, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (user_id) DO UPDATE SET token_sha256 = excluded.token_sha256,
                 token_hint = excluded.token_hint, api_token = excluded.api_token, updated_at = excluded.updated_at",
            params![user_id, hash, token.hint(), keep_raw.then_some(token.expose()), now],
        );
        map_unique(res, "api_token already in use")?;
        Ok(())
    }

    /// Marks an agent deleted and drops its credential; its history stays.
    fn delete_agent(&self, user_id: i64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM machine_credentials WHERE user_id = ?1",
            [user_id],
        )?;
        let n = tx.execute(
            "UPDATE users SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL",
            params![user_id, clock::now_rfc3339()],
        )?;
        tx.commit()?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    // ----- dashboard logs ---------------------------------------------------------------

    fn logs(&self, q: &LogQuery) -> Result<Vec<LogRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, agent_id, level, content, timestamp FROM messages
             WHERE (?1 IS NULL OR agent_id = ?1)
               AND (?2 IS NULL OR level IN (SELECT value FROM json_each(?2)))
               AND (?3 IS NULL OR content LIKE ?3 ESCAPE '\\')
               AND (?6 IS NULL OR id < ?6)
               AND (?7 IS NULL OR timestamp >= ?7)
               AND (?8 IS NULL OR timestamp < ?8)
             ORDER BY id DESC LIMIT ?4 OFFSET ?5",
        )?;
        let pattern = q.q.as_deref().map(|s| format!("%{}%", escape_like(s)));
        let levels = (!q.levels.is_empty())
            .then(|| serde_json::to_string(&q.levels).unwrap_or_else(|_| "[]".into()));
        let mut rows = stmt.query(params![
            q.agent_id,
            levels,
            pattern,
            q.limit,
            q.offset,
            q.before_id,
            q.since,
            q.until
        ])?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(r) = rows.next()? {
            let row = LogRow {
                id: r.get(0)?,
                agent_id: r.get(1)?,
                level: r.get(2)?,
                content: r.get(3)?,
                timestamp: r.get(4)?,
            };
            bytes += crate::wire::json_escaped_len(&row.content);
            if bytes > q.max_bytes && !out.is_empty() {
                break;
            }
            out.push(row);
        }
        Ok(out)
    }

    // ----- chat -------------------------------------------------------------------------

    /// Both directions between `a` and `b`: the newest `limit` rows below `before_id`,
    /// returned oldest first.
    fn chat_history(
        &self,
        a: i64,
        b: i64,
        limit: i64,
        before_id: Option<i64>,
    ) -> Result<Vec<ChatRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{CHAT_SELECT} WHERE ((sender_id = ?1 AND receiver_id = ?2) OR (sender_id = ?2 AND receiver_id = ?1))
               AND (?3 IS NULL OR id < ?3)
             ORDER BY id DESC LIMIT ?4"
        ))?;
        let rows = stmt.query_map(params![a, b, before_id, limit], chat_from_row)?;
        let mut out: Vec<ChatRow> = rows.collect::<std::result::Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// One page of a replay: undelivered frames for `user_id` with ids in `from..=to`, in id
    /// order, at most `page` of them. Paged so a long backlog never sits in memory at once.
    fn undelivered_page(
        &self,
        user_id: i64,
        from: i64,
        to: i64,
        page: i64,
    ) -> Result<Vec<ChatRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{CHAT_SELECT} WHERE receiver_id = ?1 AND delivered = 0 AND id >= ?2 AND id <= ?3
             ORDER BY id LIMIT ?4"
        ))?;
        let rows = stmt.query_map(params![user_id, from, to, page], chat_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

const USER_SELECT: &str =
    "SELECT u.id, u.username, u.role, u.agent_kind, u.runtime_kind, u.description,
        u.created_at, u.deleted_at IS NOT NULL, u.last_seen_at, m.token_hint, m.updated_at
     FROM users u LEFT JOIN machine_credentials m ON m.user_id = u.id";

const CHAT_SELECT: &str = "SELECT id, local_id, sender_id, receiver_id, type, content, stream_id,
        conversation_id, timestamp, delivered FROM chat_messages";

fn user_from_row(r: &rusqlite::Row) -> rusqlite::Result<UserRow> {
    let role: String = r.get(2)?;
    Ok(UserRow {
        id: r.get(0)?,
        username: r.get(1)?,
        // The CHECK constraint on users.role admits only the four roles.
        role: Role::parse(&role).unwrap_or(Role::Member),
        agent_kind: r.get(3)?,
        runtime_kind: r.get(4)?,
        description: r.get(5)?,
        created_at: r.get(6)?,
        deleted: r.get(7)?,
        last_seen_at: r.get(8)?,
        token_hint: r.get(9)?,
        token_updated_at: r.get(10)?,
    })
}

fn chat_from_row(r: &rusqlite::Row) -> rusqlite::Result<ChatRow> {
    let content: String = r.get(5)?;
    // Rows are written as JSON text by this store; anything else (hand edits) reads as a string.
    let payload = RawValue::from_string(content.clone())
        .or_else(|_| RawValue::from_string(serde_json::to_string(&content).unwrap_or_default()))
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
        })?;
    Ok(ChatRow {
        id: r.get(0)?,
        local_id: r.get(1)?,
        sender_id: r.get(2)?,
        receiver_id: r.get(3)?,
        kind: r.get(4)?,
        payload,
        stream_id: r.get(6)?,
        conversation_id: r.get(7)?,
        timestamp: r.get(8)?,
        delivery: Delivery::from_column(r.get(9)?),
    })
}

fn user_by_id(conn: &Connection, id: i64) -> Result<Option<UserRow>> {
    let mut stmt = conn.prepare_cached(&format!("{USER_SELECT} WHERE u.id = ?1"))?;
    Ok(stmt.query_row([id], user_from_row).optional()?)
}

fn insert_human(
    conn: &Connection,
    username: &str,
    role: Role,
    password_hash: &str,
    now: &str,
) -> Result<i64> {
    let res = conn.execute(
        "INSERT INTO users (username, role, actor_type, created_at) VALUES (?1, ?2, 'HUMAN', ?3)",
        params![username, role.as_str(), now],
    );
    map_unique(res, "username already exists")?;
    let id = conn.last_insert_rowid();
    conn.execute(
        "INSERT INTO human_credentials (user_id, password_hash, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
        params![id, password_hash, now],
    )?;
    Ok(id)
}

fn insert_machine(conn: &Connection, m: &NewMachine, keep_raw: bool, now: &str) -> Result<i64> {
    let res = conn.execute(
        "INSERT INTO users (username, role, actor_type, agent_kind, runtime_kind, description, created_at)
         VALUES (?1, ?2, 'SYSTEM', ?3, ?4, ?5, ?6)",
        params![m.username, m.role.as_str(), m.agent_kind, m.runtime_kind, m.description, now],
    );
    map_unique(res, "username already exists")?;
    let id = conn.last_insert_rowid();
    let res = conn.execute(
        "INSERT INTO machine_credentials (user_id, token_sha256, token_hint, api_token, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        params![
            id,
            m.token.sha256(),
            m.token.hint(),
            keep_raw.then_some(m.token.expose()),
            now
        ],
    );
    map_unique(res, "api_token already in use")?;
    Ok(id)
}

fn map_unique(res: rusqlite::Result<usize>, why: &'static str) -> Result<usize> {
    match res {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            Err(StoreError::Conflict(why))
        }
        other => Ok(other?),
    }
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn prepare_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    // Also tighten a file that existed before us.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

fn open_connection(path: &Path, sync: Sync) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        },
    )?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    for (name, sql) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done: bool = tx.query_row(
            "SELECT COUNT(*) > 0 FROM migrations WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        if !done {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?1, ?2)",
                params![name, clock::now_rfc3339()],
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}

// ----- the writer thread ----------------------------------------------------------------

/// The writer's own connection.
pub struct SqliteWriter {
    conn: Connection,
}

impl Batches for SqliteWriter {
    fn write(&mut self, batch: &[Job]) -> (Vec<Outcome>, bool) {
        write_batch(&mut self.conn, batch)
    }
}

/// Runs one batch in one transaction. A row that breaks a constraint fails alone (SQLite rolls
/// back only that statement); an error that rolls back the transaction, or a failing commit,
/// fails the batch, and every caller is told so.
fn write_batch(conn: &mut Connection, batch: &[Job]) -> (Vec<Outcome>, bool) {
    let failed = |batch: &[Job]| {
        batch
            .iter()
            .map(|job| match job {
                Job::Chat(..) | Job::Log(..) => Outcome::Stored(Err(StoreError::BatchFailed)),
                Job::PlanReplay(..) => Outcome::Plan(Err(StoreError::BatchFailed)),
                _ => Outcome::Nothing,
            })
            .collect()
    };
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            crate::log_error!("store: cannot begin a write transaction: {e}");
            return (failed(batch), false);
        }
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch {
        let outcome = match job {
            Job::Chat(c, _) => Outcome::Stored(write_chat(&tx, c)),
            Job::Log(l, _) => Outcome::Stored(write_log(&tx, l)),
            Job::Delivered(ids) => {
                for id in ids {
                    if let Err(e) = tx
                        .prepare_cached(
                            "UPDATE chat_messages SET delivered = 1 WHERE id = ?1 AND delivered = 0",
                        )
                        .and_then(|mut st| st.execute([id]))
                    {
                        crate::log_warn!("store: cannot record a delivery: {e}");
                    }
                }
                Outcome::Nothing
            }
            Job::PlanReplay(user, shares, _) => Outcome::Plan(plan_replay(&tx, *user, shares)),
            Job::LastSeen(user, at) => {
                if let Err(e) = tx.execute(
                    "UPDATE users SET last_seen_at = ?2 WHERE id = ?1",
                    params![user, at],
                ) {
                    crate::log_warn!("store: cannot record last_seen_at: {e}");
                }
                Outcome::Nothing
            }
            Job::Barrier(_) => Outcome::Nothing,
        };
        outcomes.push(outcome);
        // Some errors (disk full, I/O, out of memory) make SQLite roll the whole transaction
        // back. The rest of the batch would then run outside it, committed row by row while
        // the earlier callers are told their rows failed: fail the whole batch instead.
        if tx.is_autocommit() {
            crate::log_error!(
                "store: the write transaction was rolled back; {} writes not stored",
                batch.len()
            );
            return (failed(batch), false);
        }
    }
    match tx.commit() {
        Ok(()) => (outcomes, true),
        Err(e) => {
            crate::log_error!(
                "store: commit failed, {} writes not stored: {e}",
                batch.len()
            );
            (failed(batch), false)
        }
    }
}

/// See `Store::plan_replay`. One statement retires what the window leaves out; the frames
/// kept are each sender's newest, by the shares, and no older than `since`.
fn plan_replay(
    tx: &rusqlite::Transaction,
    user: i64,
    shares: &ReplayShares,
) -> Result<(Vec<Retired>, Option<i64>)> {
    let mut stmt = tx.prepare_cached(
        "WITH pending AS (
             SELECT c.id, c.timestamp, u.role AS sender_role,
                    ROW_NUMBER() OVER (PARTITION BY c.sender_id ORDER BY c.id DESC) AS nth
             FROM chat_messages c JOIN users u ON u.id = c.sender_id
             WHERE c.receiver_id = ?1 AND c.delivered = 0
         ),
         agent_kept AS (
             SELECT id FROM pending
             WHERE sender_role = 'AGENT' AND nth <= ?4 AND timestamp >= ?2
             ORDER BY id DESC LIMIT ?5
         ),
         kept AS (
             SELECT id FROM pending
             WHERE sender_role <> 'AGENT' AND nth <= ?3 AND timestamp >= ?2
             UNION ALL SELECT id FROM agent_kept
         )
         UPDATE chat_messages SET delivered = 2
         WHERE receiver_id = ?1 AND delivered = 0 AND id NOT IN (SELECT id FROM kept)
         RETURNING id, sender_id, local_id",
    )?;
    let retired = stmt
        .query_map(
            params![
                user,
                shares.since,
                shares.priority,
                shares.agent,
                shares.agent_window
            ],
            |r| {
                Ok(Retired {
                    id: r.get(0)?,
                    sender_id: r.get(1)?,
                    local_id: r.get(2)?,
                })
            },
        )?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let last: Option<i64> = tx.query_row(
        "SELECT MAX(id) FROM chat_messages WHERE receiver_id = ?1 AND delivered = 0",
        [user],
        |r| r.get(0),
    )?;
    Ok((retired, last))
}

fn write_chat(tx: &rusqlite::Transaction, c: &NewChat) -> Result<Stored> {
    if let Some(local_id) = &c.local_id {
        let mut stmt = tx.prepare_cached(
            "SELECT id, timestamp FROM chat_messages WHERE sender_id = ?1 AND local_id = ?2",
        )?;
        if let Some((id, timestamp)) = stmt
            .query_row(params![c.sender_id, local_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
        {
            return Ok(Stored {
                id,
                timestamp,
                duplicate: true,
            });
        }
    }
    let timestamp = clock::now_rfc3339();
    let mut stmt = tx.prepare_cached(
        "INSERT INTO chat_messages (local_id, sender_id, receiver_id, type, content, stream_id, conversation_id, timestamp, delivered)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    stmt.execute(params![
        c.local_id,
        c.sender_id,
        c.receiver_id,
        c.kind.as_str(),
        c.payload,
        c.stream_id,
        c.conversation_id,
        timestamp,
        !c.forward
    ])?;
    Ok(Stored {
        id: tx.last_insert_rowid(),
        timestamp,
        duplicate: false,
    })
}

fn write_log(tx: &rusqlite::Transaction, l: &NewLog) -> Result<Stored> {
    if let (Some(local_id), Some(sender)) = (&l.local_id, l.sender_id) {
        let mut stmt = tx.prepare_cached(
            "SELECT id, timestamp FROM messages WHERE sender_id = ?1 AND local_id = ?2",
        )?;
        if let Some((id, timestamp)) = stmt
            .query_row(params![sender, local_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
        {
            return Ok(Stored {
                id,
                timestamp,
                duplicate: true,
            });
        }
    }
    let timestamp = clock::now_rfc3339();
    let mut stmt = tx.prepare_cached(
        "INSERT INTO messages (agent_id, level, content, timestamp, sender_id, local_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    stmt.execute(params![
        l.agent_id,
        l.level,
        l.content,
        timestamp,
        l.sender_id,
        l.local_id
    ])?;
    Ok(Stored {
        id: tx.last_insert_rowid(),
        timestamp,
        duplicate: false,
    })
}
