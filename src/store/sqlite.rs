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
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::value::RawValue;

use super::pool::{Lease, Pool};
use super::writer::{failed, Batches, Job, Outcome};
use super::{
    Approval, Backend, ChatRow, Delivery, HumanChange, LogQuery, LogRow, NewChat, NewLog,
    NewMachine, ReplayShares, Result, Retired, StoreError, Stored, ThreadChange, ThreadRow,
    UserRow,
};
use crate::clock;
use crate::config::Sync;
use crate::identity::{AgentToken, Role};

/// Numbered migrations, applied in order, each in its own transaction, recorded by name.
const MIGRATIONS: &[(&str, &str)] = &[
    ("001_initial", include_str!("../../sql/001_initial.sql")),
    ("002_accounts", include_str!("../../sql/002_accounts.sql")),
    (
        "003_retention_search",
        include_str!("../../sql/003_retention_search.sql"),
    ),
    ("004_threads", include_str!("../../sql/004_threads.sql")),
    (
        "005_file_unthreaded_chat",
        include_str!("../../sql/005_file_unthreaded_chat.sql"),
    ),
    (
        "006_one_lookup_index_per_chat_row",
        include_str!("../../sql/006_one_lookup_index_per_chat_row.sql"),
    ),
];
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
    use_incremental_vacuum(&conn, path)?;
    migrate(&mut conn)?;
    let writer_conn = open_connection(path, sync)?;
    // After a checkpoint that could start the WAL over, cut the file back to this size (it
    // would otherwise stay as large as it ever grew).
    writer_conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
    let writer = SqliteWriter { conn: writer_conn };
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
    general: Pool<Connection>,
    auth: Pool<Connection>,
}

impl Sqlite {
    fn conn(&self) -> Lease<'_, Connection> {
        self.general.get()
    }

    fn auth_conn(&self) -> Lease<'_, Connection> {
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

    fn setting_or_init(&self, key: &str, value: &str) -> Result<String> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            params![key, value],
        )?;
        Ok(
            conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })?,
        )
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
             DELETE FROM conversation_threads;
             DELETE FROM messages;
             DELETE FROM conversation_threads;
             DELETE FROM human_credentials;
             DELETE FROM machine_credentials;
             DELETE FROM users;
             DELETE FROM log_usage;
             DELETE FROM sqlite_sequence
                 WHERE name IN ('users', 'messages', 'chat_messages', 'conversation_threads');",
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

    fn humans(&self) -> Result<Vec<UserRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{USER_SELECT} WHERE u.role IN ('ADMIN', 'MEMBER') AND u.deleted_at IS NULL ORDER BY u.id"
        ))?;
        let rows = stmt.query_map([], user_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    fn update_human(&self, id: i64, change: &HumanChange) -> Result<UserRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT id FROM users WHERE id = ?1 AND deleted_at IS NULL AND role IN ('ADMIN', 'MEMBER')",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let now = clock::now_rfc3339();
        if let Some(role) = change.role {
            tx.execute(
                "UPDATE users SET role = ?2, session_gen = session_gen + 1 WHERE id = ?1 AND role <> ?2",
                params![id, role.as_str()],
            )?;
        }
        match change.disabled {
            Some(true) => {
                tx.execute(
                    "UPDATE users SET disabled_at = ?2, session_gen = session_gen + 1
                     WHERE id = ?1 AND disabled_at IS NULL",
                    params![id, now],
                )?;
            }
            Some(false) => {
                tx.execute("UPDATE users SET disabled_at = NULL WHERE id = ?1", [id])?;
            }
            None => {}
        }
        if let Some(hash) = &change.password_hash {
            tx.execute(
                "UPDATE human_credentials SET password_hash = ?2, updated_at = ?3 WHERE user_id = ?1",
                params![id, hash, now],
            )?;
            tx.execute(
                "UPDATE users SET session_gen = session_gen + 1 WHERE id = ?1",
                [id],
            )?;
        }
        ensure_an_admin_remains(&tx)?;
        tx.commit()?;
        user_by_id(&conn, id)?.ok_or(StoreError::NotFound)
    }

    fn delete_human(&self, id: i64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE users SET deleted_at = ?2, session_gen = session_gen + 1
             WHERE id = ?1 AND deleted_at IS NULL AND role IN ('ADMIN', 'MEMBER')",
            params![id, clock::now_rfc3339()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        tx.execute("DELETE FROM human_credentials WHERE user_id = ?1", [id])?;
        ensure_an_admin_remains(&tx)?;
        tx.commit()?;
        Ok(())
    }

    fn password_hash_of(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .auth_conn()
            .query_row(
                "SELECT password_hash FROM human_credentials WHERE user_id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn admin_password_hashes(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT u.username, h.password_hash FROM users u JOIN human_credentials h ON h.user_id = u.id
             WHERE u.role = 'ADMIN' AND u.deleted_at IS NULL AND u.disabled_at IS NULL ORDER BY u.id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    fn backup_to(&self, target: &Path) -> Result<()> {
        prepare_new_file(target).map_err(|e| {
            StoreError::File(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", target.display()),
            ))
        })?;
        let src = self.conn();
        let mut dst = Connection::open(target)?;
        // One step of every page: the copy is the database as of one read transaction (WAL
        // readers do not block the writer, and a writer cannot restart a single step).
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
        backup.step(-1)?;
        drop(backup);
        // The copy stands alone: its own journal, not the source's WAL.
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        Ok(())
    }

    fn readable(&self) -> Result<()> {
        self.auth_conn()
            .query_row("SELECT COUNT(*) FROM migrations", [], |r| {
                r.get::<_, i64>(0)
            })?;
        Ok(())
    }

    fn clear_presence(&self) -> Result<()> {
        self.conn().execute(
            "UPDATE users SET online_since = NULL WHERE online_since IS NOT NULL",
            [],
        )?;
        Ok(())
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
        // A substring of three characters or more is looked up in the trigram index, which
        // is then the outer loop (newest match first); shorter ones scan, as LIKE must.
        let fts = q.q.as_deref().filter(|s| s.chars().count() >= 3);
        let (from, search) = match fts {
            Some(_) => (
                "messages_fts f JOIN messages m ON m.id = f.rowid",
                "f.messages_fts MATCH ?3 ORDER BY f.rowid DESC",
            ),
            None => (
                "messages m",
                "(?3 IS NULL OR m.content LIKE ?3 ESCAPE '\\') ORDER BY m.id DESC",
            ),
        };
        let sql = format!(
            "SELECT m.id, m.agent_id, m.level, m.content, m.timestamp FROM {from}
             WHERE (?1 IS NULL OR m.agent_id = ?1)
               AND (?2 IS NULL OR m.level IN (SELECT value FROM json_each(?2)))
               AND (?6 IS NULL OR m.id < ?6)
               AND (?7 IS NULL OR m.timestamp >= ?7)
               AND (?8 IS NULL OR m.timestamp < ?8)
               AND {search} LIMIT ?4 OFFSET ?5"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let pattern = match (fts, q.q.as_deref()) {
            // An FTS5 phrase: the whole text, quotes doubled, matched as a substring.
            (Some(text), _) => Some(format!("\"{}\"", text.replace('"', "\"\""))),
            (None, Some(text)) => Some(format!("%{}%", escape_like(text))),
            (None, None) => None,
        };
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

    // ----- conversation threads ---------------------------------------------------------

    fn threads(
        &self,
        owner: i64,
        peer: Option<i64>,
        channel_kind: Option<&str>,
    ) -> Result<Vec<ThreadRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{THREAD_SELECT} WHERE owner_user_id = ?1 AND (?2 IS NULL OR peer_user_id = ?2)
               AND (?3 IS NULL OR channel_kind = ?3)
             ORDER BY is_pinned DESC, last_at IS NULL, last_at DESC, id DESC"
        ))?;
        let rows = stmt.query_map(params![owner, peer, channel_kind], thread_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    fn thread(&self, id: i64) -> Result<Option<ThreadRow>> {
        thread_by_id(&self.auth_conn(), id)
    }

    fn create_thread(
        &self,
        owner: i64,
        peer: i64,
        channel_kind: &str,
        title: &str,
    ) -> Result<ThreadRow> {
        let conn = self.conn();
        let id = insert_thread(&conn, owner, peer, channel_kind, title, false)?;
        thread_by_id(&conn, id)?.ok_or(StoreError::NotFound)
    }

    fn default_thread(&self, owner: i64, peer: i64, channel_kind: &str) -> Result<ThreadRow> {
        const FIND: &str = "SELECT id FROM conversation_threads
                            WHERE owner_user_id = ?1 AND peer_user_id = ?2 AND is_default = 1";
        let mut conn = self.conn();
        // Found with a plain read: the write lock (an immediate transaction, which waits for
        // the writer's commit and holds up the next one) only when it must be made.
        let found: Option<i64> = conn
            .query_row(FIND, params![owner, peer], |r| r.get(0))
            .optional()?;
        if let Some(id) = found {
            return thread_by_id(&conn, id)?.ok_or(StoreError::NotFound);
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<i64> = tx
            .query_row(FIND, params![owner, peer], |r| r.get(0))
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => insert_thread(&tx, owner, peer, channel_kind, "New conversation", true)?,
        };
        tx.commit()?;
        thread_by_id(&conn, id)?.ok_or(StoreError::NotFound)
    }

    fn update_thread(&self, id: i64, change: &ThreadChange) -> Result<ThreadRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = clock::now_rfc3339();
        let archived_at: Option<Option<&str>> =
            change
                .is_archived
                .map(|a| if a { Some(now.as_str()) } else { None });
        let n = tx.execute(
            "UPDATE conversation_threads SET
                 title = COALESCE(?2, title),
                 summary = CASE WHEN ?3 IS NULL THEN summary ELSE NULLIF(?3, '') END,
                 is_pinned = COALESCE(?4, is_pinned),
                 archived_at = CASE WHEN ?5 THEN CASE WHEN ?6 IS NULL THEN NULL
                                   ELSE COALESCE(archived_at, ?6) END ELSE archived_at END,
                 updated_at = ?7
             WHERE id = ?1",
            params![
                id,
                change.title,
                change.summary,
                change.is_pinned,
                archived_at.is_some(),
                archived_at.flatten(),
                now
            ],
        )?;
        tx.commit()?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        thread_by_id(&conn, id)?.ok_or(StoreError::NotFound)
    }

    fn thread_messages(&self, id: i64, limit: i64, before_id: Option<i64>) -> Result<Vec<ChatRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{CHAT_SELECT} WHERE conversation_id = ?1 AND (?2 IS NULL OR id < ?2)
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![id, before_id, limit], chat_from_row)?;
        let mut out: Vec<ChatRow> = rows.collect::<std::result::Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    fn last_thread(&self, human: i64, peer: i64) -> Result<Option<i64>> {
        Ok(self
            .auth_conn()
            .query_row(
                // Through the pair's threads (chat_conversation): filed rows are not in
                // chat_pair (sql/006).
                "SELECT c.conversation_id FROM conversation_threads t
                 JOIN chat_messages c ON c.conversation_id = t.id
                 WHERE t.owner_user_id = ?1 AND t.peer_user_id = ?2 AND c.sender_id = ?1
                 ORDER BY c.id DESC LIMIT 1",
                params![human, peer],
                |r| r.get(0),
            )
            .optional()?)
    }

    // ----- approvals --------------------------------------------------------------------

    fn approval(&self, action_id: &str) -> Result<Option<Approval>> {
        let conn = self.auth_conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, json_extract(content, '$.action_id'), sender_id, receiver_id,
                    COALESCE(json_extract(content, '$.status'), 'PENDING'), conversation_id
             FROM chat_messages
             WHERE type = 'AUTH_REQUEST' AND json_extract(content, '$.action_id') = ?1
             ORDER BY id DESC LIMIT 1",
        )?;
        Ok(stmt.query_row([action_id], approval_from_row).optional()?)
    }

    fn set_approval_status(&self, request_id: i64, status: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE chat_messages SET content = json_set(content, '$.status', ?2)
             WHERE id = ?1 AND type = 'AUTH_REQUEST' AND json_valid(content)
               AND json_type(content) = 'object'
               AND COALESCE(json_extract(content, '$.status'), 'PENDING') = 'PENDING'",
            params![request_id, status],
        )?;
        Ok(n > 0)
    }

    fn expire_approvals(&self, before: Option<&str>) -> Result<Vec<Approval>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "UPDATE chat_messages SET content = json_set(content, '$.status', 'EXPIRED')
             WHERE type = 'AUTH_REQUEST' AND json_valid(content) AND json_type(content) = 'object'
               AND COALESCE(json_extract(content, '$.status'), 'PENDING') = 'PENDING'
               AND json_extract(content, '$.action_id') IS NOT NULL
               AND (?1 IS NULL OR timestamp < ?1)
             RETURNING id, json_extract(content, '$.action_id'), sender_id, receiver_id,
                       'EXPIRED', conversation_id",
        )?;
        let rows = stmt.query_map([before], approval_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
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
        // A row is in `chat_pair` (no thread, or an AUTH_RESPONSE) or in one of the pair's
        // threads, never in both (sql/006): each part by its own index.
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{CHAT_SELECT} WHERE id IN (
                 SELECT id FROM chat_messages
                 WHERE sender_id = ?1 AND receiver_id = ?2
                   AND (conversation_id IS NULL OR type = 'AUTH_RESPONSE') AND (?3 IS NULL OR id < ?3)
                 UNION ALL
                 SELECT id FROM chat_messages
                 WHERE sender_id = ?2 AND receiver_id = ?1
                   AND (conversation_id IS NULL OR type = 'AUTH_RESPONSE') AND (?3 IS NULL OR id < ?3)
                 UNION ALL
                 SELECT c.id FROM conversation_threads t
                 JOIN chat_messages c ON c.conversation_id = t.id
                 WHERE ((t.owner_user_id = ?1 AND t.peer_user_id = ?2)
                        OR (t.owner_user_id = ?2 AND t.peer_user_id = ?1))
                   AND c.type <> 'AUTH_RESPONSE' AND (?3 IS NULL OR c.id < ?3))
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
        u.created_at, u.deleted_at IS NOT NULL, u.last_seen_at, m.token_hint, m.updated_at,
        u.disabled_at IS NOT NULL, u.session_gen, u.online_since
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
        disabled: r.get(11)?,
        session_gen: r.get(12)?,
        online_since: r.get(13)?,
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

/// A thread's `last_message_at` is its newest stored row's time, read through
/// `chat_conversation` (one index probe per thread), and its `updated_at` the later of that
/// and its own. Keeping them in the thread's row instead cost an UPDATE per stored chat row,
/// one more page in nearly every group commit (about a sixth of the closed-loop throughput,
/// measured); the stored `last_message_at` answers for threads whose rows were all pruned
/// (retention keeps it: `keep_thread_times`).
const THREAD_SELECT: &str = "SELECT id, owner_user_id, peer_user_id, channel_kind, title, summary,
        is_pinned, is_default, archived_at, last_at, created_at,
        CASE WHEN last_at > updated_at THEN last_at ELSE updated_at END
     FROM (SELECT t.*, COALESCE(
               (SELECT c.timestamp FROM chat_messages c
                WHERE c.conversation_id = t.id ORDER BY c.id DESC LIMIT 1),
               t.last_message_at) AS last_at
           FROM conversation_threads t)";

fn thread_from_row(r: &rusqlite::Row) -> rusqlite::Result<ThreadRow> {
    Ok(ThreadRow {
        id: r.get(0)?,
        owner_user_id: r.get(1)?,
        peer_user_id: r.get(2)?,
        channel_kind: r.get(3)?,
        title: r.get(4)?,
        summary: r.get(5)?,
        is_pinned: r.get(6)?,
        is_default: r.get(7)?,
        archived_at: r.get(8)?,
        last_message_at: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
    })
}

fn thread_by_id(conn: &Connection, id: i64) -> Result<Option<ThreadRow>> {
    let mut stmt = conn.prepare_cached(&format!("{THREAD_SELECT} WHERE id = ?1"))?;
    Ok(stmt.query_row([id], thread_from_row).optional()?)
}

fn insert_thread(
    conn: &Connection,
    owner: i64,
    peer: i64,
    channel_kind: &str,
    title: &str,
    is_default: bool,
) -> Result<i64> {
    let now = clock::now_rfc3339();
    conn.execute(
        "INSERT INTO conversation_threads
             (owner_user_id, peer_user_id, channel_kind, title, is_default, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        params![owner, peer, channel_kind, title, is_default, now],
    )?;
    Ok(conn.last_insert_rowid())
}

fn approval_from_row(r: &rusqlite::Row) -> rusqlite::Result<Approval> {
    Ok(Approval {
        id: r.get(0)?,
        action_id: r.get(1)?,
        butler_id: r.get(2)?,
        human_id: r.get(3)?,
        status: r.get(4)?,
        conversation_id: r.get(5)?,
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

/// The last-admin rule: every change to humans leaves at least one admin who can log in.
fn ensure_an_admin_remains(tx: &rusqlite::Transaction) -> Result<()> {
    let admins: i64 = tx.query_row(
        "SELECT COUNT(*) FROM users u JOIN human_credentials h ON h.user_id = u.id
         WHERE u.role = 'ADMIN' AND u.deleted_at IS NULL AND u.disabled_at IS NULL",
        [],
        |r| r.get(0),
    )?;
    if admins == 0 {
        return Err(StoreError::Conflict("cannot remove the last admin"));
    }
    Ok(())
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

/// Creates `path` (it must not exist), mode 0600.
fn prepare_new_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

fn open_connection(path: &Path, sync: Sync) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Before anything writes the file's first page (switching to WAL does): on a new file
    // this is what makes it incremental; on an existing one it changes nothing by itself.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
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

/// Pruned pages go back to the file system only with incremental auto-vacuum. A new database
/// gets it before its first table; one made by an older build is converted once with VACUUM
/// (which rewrites the file: it takes a while on a large one, and as much free disk again).
fn use_incremental_vacuum(conn: &Connection, path: &Path) -> Result<()> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == 2 {
        return Ok(());
    }
    // `open_connection` asked for it; on a database made without it, VACUUM applies it.
    let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))?;
    if tables > 0 {
        crate::log_info!(
            "store: converting {} to incremental auto-vacuum (once; this rewrites the file)",
            path.display()
        );
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    let applied: Vec<String> = conn
        .prepare("SELECT name FROM migrations ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<std::result::Result<_, _>>()?;
    if let Some(unknown) = applied
        .iter()
        .find(|a| !MIGRATIONS.iter().any(|(name, _)| name == a))
    {
        return Err(StoreError::NewerSchema(unknown.clone()));
    }
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

/// Most rows, and bytes of content, one prune step deletes: a step is one short
/// transaction (deleting a row also updates the search index, which re-reads its content).
const PRUNE_ROWS: i64 = 2000;
const PRUNE_BYTES: i64 = 4 << 20;
/// An agent over its budget is trimmed to this share of it, so that it is not pruned again
/// for every new line.
const BUDGET_TRIM_TO: f64 = 0.95;
/// Pages given back to the file system after a prune step (4 KiB each).
const VACUUM_PAGES: i64 = 4096;

impl Batches for SqliteWriter {
    fn write(&mut self, batch: &[Job]) -> (Vec<Outcome>, bool) {
        write_batch(&mut self.conn, batch)
    }

    fn prune_step(&mut self, r: &super::Retention) -> Result<super::Pruned> {
        let now = clock::now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut pruned = super::Pruned::default();
        if let Some(keep) = r.logs_for {
            let cutoff = clock::format_ms(now - keep.as_millis() as i64);
            pruned.logs_by_age = delete_oldest(
                &tx,
                "messages",
                "timestamp < ?1",
                &[&cutoff as &dyn rusqlite::ToSql],
            )?;
        }
        if r.max_log_rows_per_agent.is_some() || r.max_log_bytes_per_agent.is_some() {
            pruned.logs_by_budget = trim_log_budgets(&tx, r)?;
        }
        if let Some(keep) = r.chat_for {
            let cutoff = clock::format_ms(now - keep.as_millis() as i64);
            // Undelivered frames stay for store and forward's whole window.
            let replay_cutoff = clock::format_ms(now - super::UNDELIVERED_KEPT_MS);
            let ids = oldest(
                &tx,
                "chat_messages",
                "timestamp < ?1 AND NOT (delivered = 0 AND timestamp >= ?2)",
                &[&cutoff as &dyn rusqlite::ToSql, &replay_cutoff],
            )?;
            keep_thread_times(&tx, &ids)?;
            pruned.chat_by_age = delete_ids(&tx, "chat_messages", &ids)?;
        }
        if pruned.logs_by_age + pruned.logs_by_budget > 0 {
            // Deleting from the search index leaves tombstones in its segments until they are
            // merged. Merge about as much as the step deleted (negative: whatever the number
            // of segments), so the index shrinks with the table: with 256 pages a step, a
            // flood of 4 KB lines left 53 MiB of index for 8 MiB of logs; with 2048, 14 MiB.
            tx.execute(
                "INSERT INTO messages_fts (messages_fts, rank) VALUES ('merge', -2048)",
                [],
            )?;
        }
        tx.commit()?;
        if pruned.total() > 0 {
            give_back_pages(&self.conn);
        }
        Ok(pruned)
    }

    fn idle(&mut self) {
        // Pages freed since the last prune step (the search index's merges free them too).
        give_back_pages(&self.conn);
        // Without this a small, busy database can keep every page in the WAL for hours, and
        // the main file alone (a naive copy) would hold nothing. PASSIVE never waits.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    }
}

/// Gives up to `VACUUM_PAGES` free pages back to the file system (incremental auto-vacuum;
/// see `open`). The pragma frees one page per step of its statement: it must be stepped to
/// the end. (Run through `query_row`, one step, it gave back one page per prune step, and a
/// flood of one agent left a 937 MiB file holding 67 MiB of logs.)
fn give_back_pages(conn: &Connection) {
    let result = conn
        .prepare(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))
        .and_then(|mut st| {
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        });
    if let Err(e) = result {
        crate::log_warn!("store: cannot give free pages back: {e}");
    }
}

/// Deletes the oldest rows of `table` matching `filter` (by id: ids grow with time), at most
/// `PRUNE_ROWS` and about `PRUNE_BYTES` of content. Returns how many.
fn delete_oldest(
    tx: &rusqlite::Transaction,
    table: &str,
    filter: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<u64> {
    let ids = oldest(tx, table, filter, args)?;
    delete_ids(tx, table, &ids)
}

/// The ids of the oldest rows of `table` matching `filter`, up to `PRUNE_ROWS` and
/// `PRUNE_BYTES` of content.
fn oldest(
    tx: &rusqlite::Transaction,
    table: &str,
    filter: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<i64>> {
    let n = args.len();
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT id, length(CAST(content AS BLOB)) FROM {table} WHERE {filter} ORDER BY id LIMIT ?{}",
        n + 1
    ))?;
    let mut params: Vec<&dyn rusqlite::ToSql> = args.to_vec();
    params.push(&PRUNE_ROWS);
    let rows: Vec<(i64, i64)> = stmt
        .query_map(params.as_slice(), |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<std::result::Result<_, _>>()?;
    Ok(within_bytes(&rows))
}

/// Before chat rows go, their threads' own `last_message_at` takes the newest time among
/// them: THREAD_SELECT reads it from the newest row left, and this column once none is.
fn keep_thread_times(tx: &rusqlite::Transaction, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    tx.execute(
        "UPDATE conversation_threads AS t
         SET last_message_at = g.at
         FROM (SELECT conversation_id, MAX(timestamp) AS at FROM chat_messages
               WHERE id IN (SELECT value FROM json_each(?1)) AND conversation_id IS NOT NULL
               GROUP BY conversation_id) AS g
         WHERE t.id = g.conversation_id
           AND (t.last_message_at IS NULL OR t.last_message_at < g.at)",
        [list],
    )?;
    Ok(())
}

/// The ids of the first rows whose content adds up to `PRUNE_BYTES` (at least one).
fn within_bytes(rows: &[(i64, i64)]) -> Vec<i64> {
    let mut bytes = 0;
    let mut ids = Vec::new();
    for (id, len) in rows {
        bytes += len;
        if bytes > PRUNE_BYTES && !ids.is_empty() {
            break;
        }
        ids.push(*id);
    }
    ids
}

fn delete_ids(tx: &rusqlite::Transaction, table: &str, ids: &[i64]) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    let n = tx.execute(
        &format!("DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?1))"),
        [list],
    )?;
    Ok(n as u64)
}

/// Agents over their row or byte budget lose their oldest lines, one bounded step at a time.
fn trim_log_budgets(tx: &rusqlite::Transaction, r: &super::Retention) -> Result<u64> {
    let max_rows = r.max_log_rows_per_agent.map(|n| n as i64);
    let max_bytes = r.max_log_bytes_per_agent.map(|n| n as i64);
    let over: Vec<(String, i64, i64)> = tx
        .prepare_cached(
            "SELECT agent_id, rows, bytes FROM log_usage
             WHERE (?1 IS NOT NULL AND rows > ?1) OR (?2 IS NOT NULL AND bytes > ?2)
             ORDER BY bytes DESC LIMIT 8",
        )?
        .query_map(params![max_rows, max_bytes], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<std::result::Result<_, _>>()?;
    let mut deleted = 0;
    for (agent, rows, bytes) in over {
        // How many of its oldest rows to drop: enough for both budgets, with some room.
        let by_rows = max_rows
            .map(|m| rows - (m as f64 * BUDGET_TRIM_TO) as i64)
            .unwrap_or(0);
        let by_bytes = max_bytes
            .map(|m| {
                let excess = bytes - (m as f64 * BUDGET_TRIM_TO) as i64;
                let per_row = (bytes / rows.max(1)).max(1);
                (excess + per_row - 1) / per_row
            })
            .unwrap_or(0);
        let want = by_rows.max(by_bytes).clamp(1, PRUNE_ROWS);
        let candidates: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT id, length(CAST(content AS BLOB)) FROM messages
                 WHERE agent_id = ?1 ORDER BY id LIMIT ?2",
            )?
            .query_map(params![agent, want], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        deleted += delete_ids(tx, "messages", &within_bytes(&candidates))?;
    }
    Ok(deleted)
}

/// Runs one batch in one transaction. A row that breaks a constraint fails alone (SQLite rolls
/// back only that statement); an error that rolls back the transaction, or a failing commit,
/// fails the batch, and every caller is told so.
fn write_batch(conn: &mut Connection, batch: &[Job]) -> (Vec<Outcome>, bool) {
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
            Job::Presence(user, presence) => {
                // Online: the connect time is both last-seen and online-since; offline: the
                // disconnect time, and no longer online.
                let result = match presence {
                    super::writer::Presence::Online(at) => tx.execute(
                        "UPDATE users SET last_seen_at = ?2, online_since = ?2 WHERE id = ?1",
                        params![user, at],
                    ),
                    super::writer::Presence::Offline(at) => tx.execute(
                        "UPDATE users SET last_seen_at = ?2, online_since = NULL WHERE id = ?1",
                        params![user, at],
                    ),
                };
                if let Err(e) = result {
                    crate::log_warn!("store: cannot record presence: {e}");
                }
                Outcome::Nothing
            }
            // Answered after the commit, by the writer loop.
            // One node: nobody to publish to (the hub does not send these to SQLite).
            Job::Publish(..) | Job::Barrier(_) | Job::Retention(_) | Job::Prune(..) => {
                Outcome::Nothing
            }
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
        !c.forward()
    ])?;
    let id = tx.last_insert_rowid();
    // The thread's last_message_at and updated_at follow from this row (THREAD_SELECT).
    Ok(Stored {
        id,
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

#[cfg(test)]
mod tests {
    use super::give_back_pages;

    #[test]
    fn free_pages_go_back_to_the_file_system_up_to_the_step_size() {
        let dir = std::env::temp_dir().join(format!("echocenter-vacuum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.db");
        let _ = std::fs::remove_file(&path);
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; CREATE TABLE t (x);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO t SELECT printf('%.4000c', 'x') FROM generate_series(1, 3000)",
            [],
        )
        .or_else(|_| {
            // No generate_series in this build: a recursive count instead.
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
                 INSERT INTO t SELECT printf('%.4000c', 'x') FROM n",
                [],
            )
        })
        .unwrap();
        conn.execute("DELETE FROM t", []).unwrap();
        let free = |c: &rusqlite::Connection| -> i64 {
            c.query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap()
        };
        let before = free(&conn);
        assert!(before > 2900, "{before}");
        give_back_pages(&conn);
        assert_eq!(
            free(&conn),
            0,
            "all {before} free pages went back in one call"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
