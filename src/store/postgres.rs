//! The PostgreSQL backend: the same tables and columns as SQLite's (`sql/postgres/`), through
//! blocking `postgres` clients (each wraps tokio-postgres with a private current-thread
//! runtime of its own; no async in our code, no background threads).
//!
//! - Two small pools of clients, as SQLite's: `auth` for the point lookups that
//!   authentication and routing need, `general` for everything else (history, log searches,
//!   lists, administrative writes), so a search flood never queues a login behind it.
//! - The group-commit writer's own client (`PostgresWriter`): one transaction per batch, the
//!   chat rows of a batch in one multi-row INSERT and its log rows in another, idempotency on
//!   (sender_id, local_id) decided in SQL (`ON CONFLICT`), so that a retry which lands on
//!   another node sharing the database finds the first row.
//! - Migrations (`sql/postgres/NNN_*.sql`) run under a session advisory lock: nodes that start
//!   together on one database apply each exactly once, the others wait and find them done.
//!
//! Timestamps are TEXT in the server's RFC 3339 millisecond format, made by the server's
//! clock (`clock::now_rfc3339`), not `timestamptz` from the database's `now()`: the API then
//! returns them byte for byte as it does on SQLite (a `timestamptz` would come back in
//! another shape and precision unless every read formatted it), every comparison with a
//! client's `since`/`until` and the replay window stays a text comparison as on SQLite, and
//! the test clock (`ECHOCENTER_CLOCK_OFFSET`) moves them as it moves SQLite's.
//!
//! Client-visible differences from SQLite are written down in `store/mod.rs` (the contract)
//! and README "PostgreSQL".

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};
use serde_json::value::RawValue;

mod bus;

use super::pool::{Lease, Pool};
use super::writer::{failed, Batches, Job, Outcome, Presence};
use super::{
    Approval, Backend, ChatRow, Delivery, HumanChange, LogQuery, LogRow, NewChat, NewLog,
    NewMachine, Pruned, ReplayShares, Result, Retention, Retired, StoreError, Stored, ThreadChange,
    ThreadRow, UserRow,
};
use crate::clock;
use crate::config::PostgresDsn;
use crate::identity::{AgentToken, Role};

/// Numbered migrations, applied in order, each in its own transaction, recorded by name.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "001_initial",
        include_str!("../../sql/postgres/001_initial.sql"),
    ),
    (
        "002_cluster",
        include_str!("../../sql/postgres/002_cluster.sql"),
    ),
];
/// Clients for authentication and routing lookups, and for everything else.
const AUTH_CONNECTIONS: usize = 2;
const GENERAL_CONNECTIONS: usize = 4;
/// Advisory lock keys (any constants every node shares): migrations at start-up; bootstrap,
/// so two nodes starting on an empty database create one admin; changes to humans, so two
/// admins demoted at once cannot both pass the last-admin check.
const MIGRATION_LOCK: i64 = 0x4563_686f_0001;
const BOOTSTRAP_LOCK: i64 = 0x4563_686f_0002;
const HUMANS_LOCK: i64 = 0x4563_686f_0003;
/// Retention: one node prunes at a time.
const PRUNE_LOCK: i64 = 0x4563_686f_0004;

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        // The server's own message (severity, text, detail) when it has one; the driver's
        // ("error connecting to server: …") otherwise.
        match e.as_db_error() {
            Some(db) => StoreError::Db(Box::new(db.clone())),
            None => StoreError::Db(Box::new(e)),
        }
    }
}

/// A client's settings from the connection string: what every pool, the writer and a
/// listener connection (the cross-node bus) connect with.
pub fn client_config(dsn: &PostgresDsn) -> Result<::postgres::Config> {
    let mut config: ::postgres::Config = dsn
        .expose()
        .parse()
        .map_err(|e: ::postgres::Error| StoreError::Db(Box::new(e)))?;
    // `config::database` accepts only the sslmodes that may connect without TLS, and this
    // build has no TLS client: say so to the driver rather than let it try.
    config.ssl_mode(::postgres::config::SslMode::Disable);
    if config.get_application_name().is_none() {
        config.application_name("echocenter");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    // Plan every execution for its arguments and the tables as they are. A prepared
    // statement's cached generic plan is made against the table sizes of the moment: on a new
    // database the bus's fetch by id and the delivery flags were planned as scans of a
    // then-empty `chat_messages` and kept scanning it as it grew (pg_stat_statements under
    // two nodes: 0.74 ms per fetch instead of 0.04, 60 million rows read in 12 s, cross-node
    // p99 1.4 s at 1,000 round trips/s). Our statements are small; planning them costs less.
    let options = match config.get_options() {
        Some(theirs) => format!("{theirs} -c plan_cache_mode=force_custom_plan"),
        None => "-c plan_cache_mode=force_custom_plan".to_string(),
    };
    config.options(&options);
    Ok(config)
}

/// The writer's settings: `client_config`'s, except that its statements keep their cached
/// generic plans and never scan a table whole. Planning each execution was a quarter of
/// PostgreSQL's CPU at 1,000 round trips/s across two nodes (perf); every statement the
/// writer runs goes by an index (inserts, flags and presence by primary key, keys by
/// `chat_sender_local`, replay by `chat_undelivered`, pruning in id order), so the only
/// scans a generic plan would choose are the ones made when the tables were empty, which is
/// what `force_custom_plan` guards the other connections against. JIT is off: a scan that
/// must stay one (`log_usage` has no index to go by) costs 1e10 with seq scans off, which
/// made PostgreSQL compile that query on every prune step (113 ms instead of 0.015).
fn writer_config(config: &::postgres::Config) -> ::postgres::Config {
    let mut writer = config.clone();
    let options = format!(
        "{} -c plan_cache_mode=auto -c enable_seqscan=off -c jit=off",
        writer.get_options().unwrap_or_default()
    );
    writer.options(options.trim_start());
    writer
}

/// Another client on the store's database (for a dedicated connection such as a LISTEN).
#[allow(dead_code)] // the cross-node bus (issue 14) is its first user
pub fn connect(dsn: &PostgresDsn) -> Result<Client> {
    Ok(client_config(dsn)?.connect(NoTls)?)
}

/// Connects, migrates (once, under the advisory lock), and opens the pools and the writer.
pub fn open(dsn: &PostgresDsn) -> Result<(Postgres, PostgresWriter)> {
    let config = client_config(dsn)?;
    let mut first = Conn::connect(&config)?;
    let search = migrate(&mut first.client)?;
    let mut general = vec![first];
    for _ in 1..GENERAL_CONNECTIONS {
        general.push(Conn::connect(&config)?);
    }
    let auth = (0..AUTH_CONNECTIONS)
        .map(|_| Conn::connect(&config))
        .collect::<Result<Vec<_>>>()?;
    let node = Arc::new(AtomicI64::new(0));
    let config_w = writer_config(&config);
    let writer = PostgresWriter {
        conn: Some(Conn::connect(&config_w)?),
        config: config_w,
        node: node.clone(),
    };
    let backend = Postgres {
        config,
        node,
        shown: dsn.redacted().to_string(),
        search,
        general: Pool::new(general),
        auth: Pool::new(auth),
    };
    Ok((backend, writer))
}

/// A client and the statements prepared on it (a statement prepared once is one round trip
/// per use instead of two).
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    config: ::postgres::Config,
}

impl Conn {
    fn connect(config: &::postgres::Config) -> Result<Conn> {
        Ok(Conn {
            client: config.connect(NoTls)?,
            statements: HashMap::new(),
            config: config.clone(),
        })
    }

    /// The client, checked with a no-op round trip first (and replaced if its connection
    /// is gone), for what must not fail just because an idle connection was cut: a
    /// transaction, or a write that may not run twice. These are the rare administrative
    /// writes, so the extra round trip costs nothing that matters.
    fn checked(&mut self) -> Result<&mut Client> {
        if self.client.is_closed() || self.client.is_valid(Duration::from_secs(5)).is_err() {
            self.reconnect()?;
        }
        Ok(&mut self.client)
    }

    /// A new connection in place of this one, when it was lost.
    fn reconnect(&mut self) -> Result<()> {
        let fresh = Conn::connect(&self.config)?;
        *self = fresh;
        Ok(())
    }

    /// One statement; when the connection turns out to be gone (the database restarted, an
    /// administrator ran pg_terminate_backend), once more on a new one, so that the caller
    /// does not see the failure. Only statements that may safely run twice come through
    /// here: reads, and idempotent writes (upserts, clearing a column).
    fn once_more<T>(
        &mut self,
        sql: &str,
        run: impl Fn(&mut Client, &Statement) -> std::result::Result<T, ::postgres::Error>,
    ) -> Result<T> {
        let first = prepared(&mut self.statements, &mut self.client, sql)
            .and_then(|st| Ok(run(&mut self.client, &st)?));
        match first {
            Err(_) if self.client.is_closed() => {
                self.reconnect()?;
                let st = prepared(&mut self.statements, &mut self.client, sql)?;
                Ok(run(&mut self.client, &st)?)
            }
            other => other,
        }
    }

    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.once_more(sql, |c, st| c.query(st, params))
    }

    fn query_opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        self.once_more(sql, |c, st| c.query_opt(st, params))
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.once_more(sql, |c, st| c.execute(st, params))
    }
}

/// `sql` prepared on this connection, once.
fn prepared(
    statements: &mut HashMap<String, Statement>,
    client: &mut impl GenericClient,
    sql: &str,
) -> Result<Statement> {
    if let Some(st) = statements.get(sql) {
        return Ok(st.clone());
    }
    let st = client.prepare(sql)?;
    statements.insert(sql.to_string(), st.clone());
    Ok(st)
}

/// How the log search finds substrings (see `search_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    Trigram,
    Scan,
}

pub struct Postgres {
    /// The connection string without its password.
    shown: String,
    /// What every client connects with (the bus opens its own).
    config: ::postgres::Config,
    /// This node's id, shared with the writer, which publishes under it.
    node: Arc<AtomicI64>,
    search: Search,
    general: Pool<Conn>,
    auth: Pool<Conn>,
}

impl Postgres {
    fn conn(&self) -> Result<Lease<'_, Conn>> {
        revive(self.general.get())
    }

    fn auth_conn(&self) -> Result<Lease<'_, Conn>> {
        revive(self.auth.get())
    }
}

/// A pooled client whose connection is known to be lost (a database restart, a network cut)
/// is replaced before it is lent; until the database answers again, each use fails on its
/// own. (One lost unnoticed is found by its next statement: `Conn::once_more`.)
fn revive(mut lease: Lease<'_, Conn>) -> Result<Lease<'_, Conn>> {
    if lease.client.is_closed() {
        lease.reconnect()?;
    }
    Ok(lease)
}

impl Backend for Postgres {
    fn join_cluster(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<Option<Arc<dyn super::Cluster>>> {
        let cluster: Arc<dyn super::Cluster> =
            bus::join(&self.config, &self.node, address, timeout)?;
        Ok(Some(cluster))
    }

    fn announce(&self, control: &super::ClusterControl) -> Result<()> {
        self.conn()?.execute(
            "SELECT pg_notify($1, $2)",
            &[&bus::CHANNEL, &bus::control_payload(0, control)],
        )?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{}, log search {}",
            self.shown,
            match self.search {
                Search::Trigram => "by pg_trgm index",
                Search::Scan => "by scan (no pg_trgm)",
            }
        )
    }

    // ----- settings and bootstrap -------------------------------------------------------

    fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = self
            .conn()?
            .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
        Ok(())
    }

    fn setting_or_init(&self, key: &str, value: &str) -> Result<String> {
        let mut conn = self.conn()?;
        conn.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &value],
        )?;
        let row = conn.query_opt("SELECT value FROM settings WHERE key = $1", &[&key])?;
        row.map(|r| r.try_get(0))
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    fn user_count(&self) -> Result<i64> {
        let row = self.conn()?.query_opt("SELECT COUNT(*) FROM users", &[])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
    }

    fn bootstrap(
        &self,
        admin: &str,
        password_hash: &str,
        butler_token: &AgentToken,
        keep_raw: bool,
    ) -> Result<bool> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        // Nodes starting together on an empty database: one creates the admin and the
        // Butler, the others wait here and then find them.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BOOTSTRAP_LOCK])?;
        let count: i64 = tx
            .query_one("SELECT COUNT(*) FROM users", &[])?
            .try_get(0)?;
        if count > 0 {
            return Ok(false);
        }
        let now = clock::now_rfc3339();
        insert_human(&mut tx, admin, Role::Admin, password_hash, &now)?;
        insert_machine(
            &mut tx,
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

    fn clear_raw_tokens(&self) -> Result<usize> {
        Ok(self.conn()?.execute(
            "UPDATE machine_credentials SET api_token = NULL WHERE api_token IS NOT NULL",
            &[],
        )? as usize)
    }

    fn wipe(&self) -> Result<()> {
        // Settings (the JWT secret and key generation) stay, as on SQLite; ids start at 1.
        self.conn()?.checked()?.batch_execute(
            "TRUNCATE chat_messages, messages, conversation_threads, human_credentials,
                      machine_credentials, users, log_usage RESTART IDENTITY CASCADE",
        )?;
        Ok(())
    }

    // ----- users ------------------------------------------------------------------------

    fn create_human(&self, username: &str, role: Role, password_hash: &str) -> Result<UserRow> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        let id = insert_human(
            &mut tx,
            username,
            role,
            password_hash,
            &clock::now_rfc3339(),
        )?;
        tx.commit()?;
        user_by_id(&mut conn, id)?.ok_or(StoreError::NotFound)
    }

    fn create_machine(&self, m: &NewMachine, keep_raw: bool) -> Result<UserRow> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        let id = insert_machine(&mut tx, m, keep_raw, &clock::now_rfc3339())?;
        tx.commit()?;
        user_by_id(&mut conn, id)?.ok_or(StoreError::NotFound)
    }

    fn user_by_id(&self, id: i64) -> Result<Option<UserRow>> {
        user_by_id(&mut *self.auth_conn()?, id)
    }

    fn user_by_name(&self, username: &str) -> Result<Option<UserRow>> {
        let mut conn = self.conn()?;
        let row = conn.query_opt(
            &format!("{USER_SELECT} WHERE u.username = $1"),
            &[&username],
        )?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    fn password_hash(&self, username: &str) -> Result<Option<(i64, String)>> {
        let row = self.conn()?.query_opt(
            "SELECT u.id, h.password_hash FROM users u JOIN human_credentials h ON h.user_id = u.id
             WHERE u.username = $1 AND u.deleted_at IS NULL",
            &[&username],
        )?;
        Ok(row
            .map(|r| Ok::<_, ::postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()?)
    }

    fn machine_by_token_hash(&self, sha256: &str) -> Result<Option<UserRow>> {
        let row = self.auth_conn()?.query_opt(
            &format!(
                "{USER_SELECT} WHERE m.token_sha256 = $1 AND u.deleted_at IS NULL
                   AND u.role IN ('AGENT', 'BUTLER')"
            ),
            &[&sha256],
        )?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    fn token_hash_of(&self, user_id: i64) -> Result<Option<String>> {
        let row = self.conn()?.query_opt(
            "SELECT token_sha256 FROM machine_credentials WHERE user_id = $1",
            &[&user_id],
        )?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn raw_token(&self, user_id: i64) -> Result<Option<String>> {
        let row = self.conn()?.query_opt(
            "SELECT api_token FROM machine_credentials WHERE user_id = $1",
            &[&user_id],
        )?;
        Ok(row
            .map(|r| r.try_get::<_, Option<String>>(0))
            .transpose()?
            .flatten())
    }

    fn machines(&self) -> Result<Vec<UserRow>> {
        let rows = self.conn()?.query(
            &format!(
                "{USER_SELECT} WHERE u.role IN ('AGENT', 'BUTLER') AND u.deleted_at IS NULL
                 ORDER BY u.id"
            ),
            &[],
        )?;
        rows.iter().map(user_from_row).collect()
    }

    fn humans(&self) -> Result<Vec<UserRow>> {
        let rows = self.conn()?.query(
            &format!(
                "{USER_SELECT} WHERE u.role IN ('ADMIN', 'MEMBER') AND u.deleted_at IS NULL
                 ORDER BY u.id"
            ),
            &[],
        )?;
        rows.iter().map(user_from_row).collect()
    }

    fn update_human(&self, id: i64, change: &HumanChange) -> Result<UserRow> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HUMANS_LOCK])?;
        let exists = tx.query_opt(
            "SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL AND role IN ('ADMIN', 'MEMBER')",
            &[&id],
        )?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let now = clock::now_rfc3339();
        if let Some(role) = change.role {
            tx.execute(
                "UPDATE users SET role = $2, session_gen = session_gen + 1 WHERE id = $1 AND role <> $2",
                &[&id, &role.as_str()],
            )?;
        }
        match change.disabled {
            Some(true) => {
                tx.execute(
                    "UPDATE users SET disabled_at = $2, session_gen = session_gen + 1
                     WHERE id = $1 AND disabled_at IS NULL",
                    &[&id, &now],
                )?;
            }
            Some(false) => {
                tx.execute("UPDATE users SET disabled_at = NULL WHERE id = $1", &[&id])?;
            }
            None => {}
        }
        if let Some(hash) = &change.password_hash {
            tx.execute(
                "UPDATE human_credentials SET password_hash = $2, updated_at = $3 WHERE user_id = $1",
                &[&id, hash, &now],
            )?;
            tx.execute(
                "UPDATE users SET session_gen = session_gen + 1 WHERE id = $1",
                &[&id],
            )?;
        }
        ensure_an_admin_remains(&mut tx)?;
        tx.commit()?;
        user_by_id(&mut conn, id)?.ok_or(StoreError::NotFound)
    }

    fn delete_human(&self, id: i64) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HUMANS_LOCK])?;
        let n = tx.execute(
            "UPDATE users SET deleted_at = $2, session_gen = session_gen + 1
             WHERE id = $1 AND deleted_at IS NULL AND role IN ('ADMIN', 'MEMBER')",
            &[&id, &clock::now_rfc3339()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        tx.execute("DELETE FROM human_credentials WHERE user_id = $1", &[&id])?;
        ensure_an_admin_remains(&mut tx)?;
        tx.commit()?;
        Ok(())
    }

    fn password_hash_of(&self, id: i64) -> Result<Option<String>> {
        let row = self.auth_conn()?.query_opt(
            "SELECT password_hash FROM human_credentials WHERE user_id = $1",
            &[&id],
        )?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn admin_password_hashes(&self) -> Result<Vec<(String, String)>> {
        let rows = self.conn()?.query(
            "SELECT u.username, h.password_hash FROM users u JOIN human_credentials h ON h.user_id = u.id
             WHERE u.role = 'ADMIN' AND u.deleted_at IS NULL AND u.disabled_at IS NULL ORDER BY u.id",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<std::result::Result<_, ::postgres::Error>>()?)
    }

    fn clear_presence(&self) -> Result<()> {
        self.conn()?.execute(
            // Only users no node holds: this node starts, the others go on.
            "UPDATE users u SET online_since = NULL WHERE online_since IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM connections c WHERE c.user_id = u.id)",
            &[],
        )?;
        Ok(())
    }

    fn backup_to(&self, _target: &Path) -> Result<()> {
        Err(StoreError::Unsupported(format!(
            "the PostgreSQL backend has no built-in backup; use PostgreSQL's own tools, e.g. \
             pg_dump --format=custom --file=echocenter.dump '{}' (restore with pg_restore)",
            self.shown
        )))
    }

    fn readable(&self) -> Result<()> {
        self.auth_conn()?
            .query_opt("SELECT COUNT(*) FROM migrations", &[])?;
        Ok(())
    }

    fn butler(&self) -> Result<Option<UserRow>> {
        let row = self.auth_conn()?.query_opt(
            &format!(
                "{USER_SELECT} WHERE u.role = 'BUTLER' AND u.deleted_at IS NULL ORDER BY u.id LIMIT 1"
            ),
            &[],
        )?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    fn last_reports(&self, usernames: &[&str]) -> Result<HashMap<String, String>> {
        // One round trip: each agent's newest line, looked up in messages_agent (agent_id, id).
        let rows = self.conn()?.query(
            "SELECT a.name, m.content FROM unnest($1::text[]) AS a(name)
             CROSS JOIN LATERAL (SELECT content FROM messages WHERE agent_id = a.name
                                 ORDER BY id DESC LIMIT 1) m",
            &[&usernames],
        )?;
        let mut out = HashMap::new();
        for r in &rows {
            out.insert(r.try_get(0)?, r.try_get(1)?);
        }
        Ok(out)
    }

    fn rotate_token(&self, user_id: i64, token: &AgentToken, keep_raw: bool) -> Result<()> {
        let now = clock::now_rfc3339();
        let hash = token.sha256();
        let raw = keep_raw.then_some(token.expose());
        let res = self.conn()?.checked()?.execute(
            "INSERT INTO machine_credentials (user_id, token_sha256, token_hint, api_token, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $5)
             ON CONFLICT (user_id) DO UPDATE SET token_sha256 = excluded.token_sha256,
                 token_hint = excluded.token_hint, api_token = excluded.api_token, updated_at = excluded.updated_at",
            &[&user_id, &hash, &token.hint(), &raw, &now],
        );
        map_unique(res, "api_token already in use")?;
        Ok(())
    }

    fn delete_agent(&self, user_id: i64) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        tx.execute(
            "DELETE FROM machine_credentials WHERE user_id = $1",
            &[&user_id],
        )?;
        let n = tx.execute(
            "UPDATE users SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL",
            &[&user_id, &clock::now_rfc3339()],
        )?;
        tx.commit()?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    // ----- conversation threads ---------------------------------------------------------

    fn threads(
        &self,
        owner: i64,
        peer: Option<i64>,
        channel_kind: Option<&str>,
    ) -> Result<Vec<ThreadRow>> {
        let rows = self.conn()?.query(
            &format!(
                "{THREAD_SELECT} WHERE owner_user_id = $1
                   AND ($2::int8 IS NULL OR peer_user_id = $2)
                   AND ($3::text IS NULL OR channel_kind = $3)
                 ORDER BY is_pinned DESC, last_at IS NULL, last_at DESC, id DESC"
            ),
            &[&owner, &peer, &channel_kind],
        )?;
        rows.iter().map(thread_from_row).collect()
    }

    fn thread(&self, id: i64) -> Result<Option<ThreadRow>> {
        thread_by_id(&mut *self.auth_conn()?, id)
    }

    fn create_thread(
        &self,
        owner: i64,
        peer: i64,
        channel_kind: &str,
        title: &str,
    ) -> Result<ThreadRow> {
        let mut conn = self.conn()?;
        let now = clock::now_rfc3339();
        let row = conn.checked()?.query_one(
            "INSERT INTO conversation_threads
                 (owner_user_id, peer_user_id, channel_kind, title, is_default, created_at, updated_at)
             VALUES ($1, $2, $3, $4, FALSE, $5, $5) RETURNING id",
            &[&owner, &peer, &channel_kind, &title, &now],
        )?;
        let id: i64 = row.try_get(0)?;
        thread_by_id(&mut conn, id)?.ok_or(StoreError::NotFound)
    }

    fn default_thread(&self, owner: i64, peer: i64, channel_kind: &str) -> Result<ThreadRow> {
        let mut conn = self.conn()?;
        let find = "SELECT id FROM conversation_threads
                    WHERE owner_user_id = $1 AND peer_user_id = $2 AND is_default";
        let mut id: Option<i64> = conn
            .query_opt(find, &[&owner, &peer])?
            .map(|r| r.try_get(0))
            .transpose()?;
        if id.is_none() {
            // Two requests (or nodes) creating the pair's default at once: one insert wins,
            // the other finds it.
            let now = clock::now_rfc3339();
            id = conn
                .checked()?
                .query_opt(
                    "INSERT INTO conversation_threads
                         (owner_user_id, peer_user_id, channel_kind, title, is_default, created_at, updated_at)
                     VALUES ($1, $2, $3, 'New conversation', TRUE, $4, $4)
                     ON CONFLICT (owner_user_id, peer_user_id) WHERE is_default DO NOTHING
                     RETURNING id",
                    &[&owner, &peer, &channel_kind, &now],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
        }
        if id.is_none() {
            id = conn
                .query_opt(find, &[&owner, &peer])?
                .map(|r| r.try_get(0))
                .transpose()?;
        }
        let id = id.ok_or(StoreError::NotFound)?;
        thread_by_id(&mut conn, id)?.ok_or(StoreError::NotFound)
    }

    fn update_thread(&self, id: i64, change: &ThreadChange) -> Result<ThreadRow> {
        let mut conn = self.conn()?;
        let now = clock::now_rfc3339();
        let archived_at: Option<Option<&str>> =
            change
                .is_archived
                .map(|a| if a { Some(now.as_str()) } else { None });
        let n = conn.checked()?.execute(
            "UPDATE conversation_threads SET
                 title = COALESCE($2::text, title),
                 summary = CASE WHEN $3::text IS NULL THEN summary ELSE NULLIF($3::text, '') END,
                 is_pinned = COALESCE($4::bool, is_pinned),
                 archived_at = CASE WHEN $5::bool THEN CASE WHEN $6::text IS NULL THEN NULL
                                   ELSE COALESCE(archived_at, $6::text) END ELSE archived_at END,
                 updated_at = $7
             WHERE id = $1",
            &[
                &id,
                &change.title,
                &change.summary,
                &change.is_pinned,
                &archived_at.is_some(),
                &archived_at.flatten(),
                &now,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        thread_by_id(&mut conn, id)?.ok_or(StoreError::NotFound)
    }

    fn thread_messages(&self, id: i64, limit: i64, before_id: Option<i64>) -> Result<Vec<ChatRow>> {
        let rows = self.conn()?.query(
            &format!(
                "{CHAT_SELECT} WHERE conversation_id = $1 AND ($2::int8 IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&id, &before_id, &limit],
        )?;
        let mut out = rows.iter().map(chat_from_row).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    fn last_thread(&self, human: i64, peer: i64) -> Result<Option<i64>> {
        let row = self.auth_conn()?.query_opt(
            "SELECT conversation_id FROM chat_messages
             WHERE sender_id = $1 AND receiver_id = $2 AND conversation_id IS NOT NULL
             ORDER BY id DESC LIMIT 1",
            &[&human, &peer],
        )?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    // ----- approvals --------------------------------------------------------------------

    fn approval(&self, action_id: &str) -> Result<Option<Approval>> {
        let row = self.auth_conn()?.query_opt(
            "SELECT id, echocenter_json_field(content, 'action_id'), sender_id, receiver_id,
                    COALESCE(echocenter_json_field(content, 'status'), 'PENDING'), conversation_id
             FROM chat_messages
             WHERE type = 'AUTH_REQUEST' AND echocenter_json_field(content, 'action_id') = $1
             ORDER BY id DESC LIMIT 1",
            &[&action_id],
        )?;
        row.map(|r| approval_from_row(&r)).transpose()
    }

    fn set_approval_status(&self, request_id: i64, status: &str) -> Result<bool> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        let row = tx.query_opt(
            "SELECT content FROM chat_messages WHERE id = $1 AND type = 'AUTH_REQUEST' FOR UPDATE",
            &[&request_id],
        )?;
        let Some(row) = row else {
            return Ok(false);
        };
        let content: String = row.try_get(0)?;
        let Some(rewritten) = json_status::set_pending(&content, status) else {
            return Ok(false);
        };
        tx.execute(
            "UPDATE chat_messages SET content = $2 WHERE id = $1",
            &[&request_id, &rewritten],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn expire_approvals(&self, before: Option<&str>) -> Result<Vec<Approval>> {
        let mut conn = self.conn()?;
        let mut tx = conn.checked()?.transaction()?;
        let rows = tx.query(
            "SELECT id, content, echocenter_json_field(content, 'action_id'), sender_id,
                    receiver_id, conversation_id
             FROM chat_messages
             WHERE type = 'AUTH_REQUEST'
               AND COALESCE(echocenter_json_field(content, 'status'), 'PENDING') = 'PENDING'
               AND echocenter_json_field(content, 'action_id') IS NOT NULL
               AND ($1::text IS NULL OR timestamp < $1)
             ORDER BY id FOR UPDATE",
            &[&before],
        )?;
        let mut expired = Vec::new();
        let mut ids = Vec::new();
        let mut contents = Vec::new();
        for r in &rows {
            let content: String = r.try_get(1)?;
            let Some(rewritten) = json_status::set_pending(&content, "EXPIRED") else {
                continue;
            };
            let id: i64 = r.try_get(0)?;
            ids.push(id);
            contents.push(rewritten);
            expired.push(Approval {
                id,
                action_id: r.try_get(2)?,
                butler_id: r.try_get(3)?,
                human_id: r.try_get(4)?,
                status: "EXPIRED".into(),
                conversation_id: r.try_get(5)?,
            });
        }
        if !ids.is_empty() {
            tx.execute(
                "UPDATE chat_messages c SET content = u.content
                 FROM unnest($1::int8[], $2::text[]) AS u(id, content) WHERE c.id = u.id",
                &[&ids, &contents],
            )?;
        }
        tx.commit()?;
        Ok(expired)
    }

    // ----- logs and chat ----------------------------------------------------------------

    fn logs(&self, q: &LogQuery) -> Result<Vec<LogRow>> {
        // Only the filters asked for are in the statement: a generic plan over
        // "$1 IS NULL OR …" would serve every shape of query badly. With the pg_trgm index
        // the planner picks it for a selective substring; without it, or for one of fewer
        // than three characters, the search scans, as SQLite's LIKE does.
        let mut args = Args::default();
        let mut sql =
            String::from("SELECT id, agent_id, level, content, timestamp FROM messages WHERE TRUE");
        if let Some(agent) = &q.agent_id {
            sql += &format!(" AND agent_id = {}", args.bind(agent.clone()));
        }
        if !q.levels.is_empty() {
            sql += &format!(" AND level = ANY({})", args.bind(q.levels.clone()));
        }
        if let Some(before) = q.before_id {
            sql += &format!(" AND id < {}", args.bind(before));
        }
        if let Some(since) = &q.since {
            sql += &format!(" AND timestamp >= {}", args.bind(since.clone()));
        }
        if let Some(until) = &q.until {
            sql += &format!(" AND timestamp < {}", args.bind(until.clone()));
        }
        if let Some(text) = &q.q {
            let pattern = format!("%{}%", escape_like(text));
            sql += &format!(" AND content ILIKE {} ESCAPE E'\\\\'", args.bind(pattern));
        }
        sql += &format!(
            " ORDER BY id DESC LIMIT {} OFFSET {}",
            args.bind(q.limit),
            args.bind(q.offset)
        );
        let rows = self.conn()?.query(&sql, &args.refs())?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in &rows {
            let row = LogRow {
                id: r.try_get(0)?,
                agent_id: r.try_get(1)?,
                level: r.try_get(2)?,
                content: r.try_get(3)?,
                timestamp: r.try_get(4)?,
            };
            bytes += crate::wire::json_escaped_len(&row.content);
            if bytes > q.max_bytes && !out.is_empty() {
                break;
            }
            out.push(row);
        }
        Ok(out)
    }

    fn chat_history(
        &self,
        a: i64,
        b: i64,
        limit: i64,
        before_id: Option<i64>,
    ) -> Result<Vec<ChatRow>> {
        let rows = self.conn()?.query(
            &format!(
                "{CHAT_SELECT} WHERE ((sender_id = $1 AND receiver_id = $2) OR (sender_id = $2 AND receiver_id = $1))
                   AND ($3::int8 IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4"
            ),
            &[&a, &b, &before_id, &limit],
        )?;
        let mut out = rows.iter().map(chat_from_row).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    fn undelivered_page(
        &self,
        user_id: i64,
        from: i64,
        to: i64,
        page: i64,
    ) -> Result<Vec<ChatRow>> {
        let rows = self.conn()?.query(
            &format!(
                "{CHAT_SELECT} WHERE receiver_id = $1 AND delivered = 0 AND id >= $2 AND id <= $3
                 ORDER BY id LIMIT $4"
            ),
            &[&user_id, &from, &to, &page],
        )?;
        rows.iter().map(chat_from_row).collect()
    }
}

/// Parameters of a statement built piece by piece.
#[derive(Default)]
struct Args(Vec<Box<dyn ToSql + Sync + Send>>);

impl Args {
    /// Adds a parameter; returns its placeholder (`$n`).
    fn bind<T: ToSql + Sync + Send + 'static>(&mut self, value: T) -> String {
        self.0.push(Box::new(value));
        format!("${}", self.0.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect()
    }
}

const USER_SELECT: &str =
    "SELECT u.id, u.username, u.role, u.agent_kind, u.runtime_kind, u.description,
        u.created_at, u.deleted_at IS NOT NULL, u.last_seen_at, m.token_hint, m.updated_at,
        u.disabled_at IS NOT NULL, u.session_gen, u.online_since
     FROM users u LEFT JOIN machine_credentials m ON m.user_id = u.id";

const CHAT_SELECT: &str = "SELECT id, local_id, sender_id, receiver_id, type, content, stream_id,
        conversation_id, timestamp, delivered FROM chat_messages";

/// A thread's `last_message_at` is its newest stored row's time, read through
/// `chat_conversation` (one index probe per thread), and its `updated_at` the later of that
/// and its own, as on SQLite. Keeping them in the thread's row cost an UPDATE per batch,
/// and a thread's two users are often on two nodes, whose writers then queued on that row's
/// lock (a tenth of PostgreSQL's CPU at 1,000 round trips/s across two nodes); the stored
/// `last_message_at` answers for threads whose rows were all pruned (`keep_thread_times`).
const THREAD_SELECT: &str = "SELECT id, owner_user_id, peer_user_id, channel_kind, title, summary,
        is_pinned, is_default, archived_at, last_at, created_at, GREATEST(last_at, updated_at)
     FROM (SELECT t.*, COALESCE(newest.at, t.last_message_at) AS last_at
           FROM conversation_threads t
           LEFT JOIN LATERAL (SELECT c.timestamp AS at FROM chat_messages c
                              WHERE c.conversation_id = t.id ORDER BY c.id DESC LIMIT 1)
             AS newest ON true) AS threads";

fn user_from_row(r: &Row) -> Result<UserRow> {
    let role: String = r.try_get(2)?;
    Ok(UserRow {
        id: r.try_get(0)?,
        username: r.try_get(1)?,
        // The CHECK constraint on users.role admits only the four roles.
        role: Role::parse(&role).unwrap_or(Role::Member),
        agent_kind: r.try_get(3)?,
        runtime_kind: r.try_get(4)?,
        description: r.try_get(5)?,
        created_at: r.try_get(6)?,
        deleted: r.try_get(7)?,
        last_seen_at: r.try_get(8)?,
        token_hint: r.try_get(9)?,
        token_updated_at: r.try_get(10)?,
        disabled: r.try_get(11)?,
        session_gen: r.try_get(12)?,
        online_since: r.try_get(13)?,
    })
}

fn chat_from_row(r: &Row) -> Result<ChatRow> {
    let content: String = r.try_get(5)?;
    // Rows are written as JSON text by this store; anything else (hand edits) reads as a string.
    let payload = RawValue::from_string(content.clone())
        .or_else(|_| RawValue::from_string(serde_json::to_string(&content).unwrap_or_default()))
        .map_err(|e| StoreError::Db(Box::new(e)))?;
    let delivered: i32 = r.try_get(9)?;
    Ok(ChatRow {
        id: r.try_get(0)?,
        local_id: r.try_get(1)?,
        sender_id: r.try_get(2)?,
        receiver_id: r.try_get(3)?,
        kind: r.try_get(4)?,
        payload,
        stream_id: r.try_get(6)?,
        conversation_id: r.try_get(7)?,
        timestamp: r.try_get(8)?,
        delivery: Delivery::from_column(delivered.into()),
    })
}

fn thread_from_row(r: &Row) -> Result<ThreadRow> {
    Ok(ThreadRow {
        id: r.try_get(0)?,
        owner_user_id: r.try_get(1)?,
        peer_user_id: r.try_get(2)?,
        channel_kind: r.try_get(3)?,
        title: r.try_get(4)?,
        summary: r.try_get(5)?,
        is_pinned: r.try_get(6)?,
        is_default: r.try_get(7)?,
        archived_at: r.try_get(8)?,
        last_message_at: r.try_get(9)?,
        created_at: r.try_get(10)?,
        updated_at: r.try_get(11)?,
    })
}

fn approval_from_row(r: &Row) -> Result<Approval> {
    Ok(Approval {
        id: r.try_get(0)?,
        action_id: r.try_get(1)?,
        butler_id: r.try_get(2)?,
        human_id: r.try_get(3)?,
        status: r.try_get(4)?,
        conversation_id: r.try_get(5)?,
    })
}

fn user_by_id(conn: &mut Conn, id: i64) -> Result<Option<UserRow>> {
    let row = conn.query_opt(&format!("{USER_SELECT} WHERE u.id = $1"), &[&id])?;
    row.map(|r| user_from_row(&r)).transpose()
}

fn thread_by_id(conn: &mut Conn, id: i64) -> Result<Option<ThreadRow>> {
    let row = conn.query_opt(&format!("{THREAD_SELECT} WHERE id = $1"), &[&id])?;
    row.map(|r| thread_from_row(&r)).transpose()
}

/// A name already taken is checked before the insert, so that the usual refusal does not
/// use up an id of the sequence (SQLite's ids have no gaps there, and tests and operators
/// see ids); the unique index still decides a race.
fn insert_human(
    tx: &mut Transaction,
    username: &str,
    role: Role,
    password_hash: &str,
    now: &str,
) -> Result<i64> {
    name_is_free(tx, username)?;
    let res = tx.query_one(
        "INSERT INTO users (username, role, actor_type, created_at) VALUES ($1, $2, 'HUMAN', $3)
         RETURNING id",
        &[&username, &role.as_str(), &now],
    );
    let id: i64 = map_unique(res, "username already exists")?.try_get(0)?;
    tx.execute(
        "INSERT INTO human_credentials (user_id, password_hash, created_at, updated_at)
         VALUES ($1, $2, $3, $3)",
        &[&id, &password_hash, &now],
    )?;
    Ok(id)
}

fn insert_machine(tx: &mut Transaction, m: &NewMachine, keep_raw: bool, now: &str) -> Result<i64> {
    name_is_free(tx, m.username)?;
    let hash = m.token.sha256();
    if tx
        .query_opt(
            "SELECT 1 FROM machine_credentials WHERE token_sha256 = $1",
            &[&hash],
        )?
        .is_some()
    {
        return Err(StoreError::Conflict("api_token already in use"));
    }
    let res = tx.query_one(
        "INSERT INTO users (username, role, actor_type, agent_kind, runtime_kind, description, created_at)
         VALUES ($1, $2, 'SYSTEM', $3, $4, $5, $6) RETURNING id",
        &[&m.username, &m.role.as_str(), &m.agent_kind, &m.runtime_kind, &m.description, &now],
    );
    let id: i64 = map_unique(res, "username already exists")?.try_get(0)?;
    let raw = keep_raw.then_some(m.token.expose());
    let res = tx.execute(
        "INSERT INTO machine_credentials (user_id, token_sha256, token_hint, api_token, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $5)",
        &[&id, &hash, &m.token.hint(), &raw, &now],
    );
    map_unique(res, "api_token already in use")?;
    Ok(id)
}

fn name_is_free(tx: &mut Transaction, username: &str) -> Result<()> {
    match tx.query_opt("SELECT 1 FROM users WHERE username = $1", &[&username])? {
        Some(_) => Err(StoreError::Conflict("username already exists")),
        None => Ok(()),
    }
}

/// The last-admin rule: every change to humans leaves at least one admin who can log in.
fn ensure_an_admin_remains(tx: &mut Transaction) -> Result<()> {
    let admins: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM users u JOIN human_credentials h ON h.user_id = u.id
             WHERE u.role = 'ADMIN' AND u.deleted_at IS NULL AND u.disabled_at IS NULL",
            &[],
        )?
        .try_get(0)?;
    if admins == 0 {
        return Err(StoreError::Conflict("cannot remove the last admin"));
    }
    Ok(())
}

fn map_unique<T>(res: std::result::Result<T, ::postgres::Error>, why: &'static str) -> Result<T> {
    match res {
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(StoreError::Conflict(why)),
        other => Ok(other?),
    }
}

/// LIKE's wildcards and its escape character, taken literally.
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

// ----- migrations -----------------------------------------------------------------------

/// Applies the migrations not yet recorded, each in its own transaction, under a session
/// advisory lock: several nodes starting together on one fresh database apply each exactly
/// once (the others wait for the lock, then find them recorded). A node that dies holding
/// the lock releases it with its connection. Then makes the search index if it can.
fn migrate(client: &mut Client) -> Result<Search> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = apply_migrations(client).map(|()| search_index(client));
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    let search = result?;
    unlocked?;
    Ok(search)
}

fn apply_migrations(client: &mut Client) -> Result<()> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    // A migration this build does not know: a newer build upgraded the database.
    for row in client.query("SELECT name FROM migrations ORDER BY name", &[])? {
        let applied: String = row.try_get(0)?;
        if !MIGRATIONS.iter().any(|(name, _)| *name == applied) {
            return Err(StoreError::NewerSchema(applied));
        }
    }
    for (name, sql) in MIGRATIONS {
        let mut tx = client.transaction()?;
        let done = tx
            .query_opt("SELECT 1 FROM migrations WHERE name = $1", &[name])?
            .is_some();
        if !done {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO migrations (name, applied_at) VALUES ($1, $2)",
                &[name, &clock::now_rfc3339()],
            )?;
            crate::log_info!("store: applied migration postgres/{name}");
        }
        tx.commit()?;
    }
    Ok(())
}

/// The log search's trigram index (SQLite's FTS5 trigram table does the same job): made when
/// the `pg_trgm` extension is there or can be created (a trusted extension since
/// PostgreSQL 13: the database's owner may), else the search scans with ILIKE, and says so.
fn search_index(client: &mut Client) -> Search {
    let have = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')",
            &[],
        )
        .and_then(|r| r.try_get::<_, bool>(0))
        .unwrap_or(false);
    let made = if have {
        Ok(())
    } else {
        client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    };
    let indexed = made.and_then(|()| {
        client.batch_execute(
            "CREATE INDEX IF NOT EXISTS messages_content_trgm ON messages
                 USING gin (content gin_trgm_ops)",
        )
    });
    match indexed {
        Ok(()) => Search::Trigram,
        Err(e) => {
            crate::log_warn!(
                "store: the log search scans every row (ILIKE): the pg_trgm extension is not \
                 available ({}); a superuser can run CREATE EXTENSION pg_trgm in this database",
                StoreError::from(e)
            );
            Search::Scan
        }
    }
}

// ----- the writer thread ----------------------------------------------------------------

/// The writer's own client; reconnected on the next batch when its connection was lost.
pub struct PostgresWriter {
    config: ::postgres::Config,
    conn: Option<Conn>,
    /// This node's id once the server joined the cluster (0: publish nothing).
    node: Arc<AtomicI64>,
}

/// Most rows, and bytes of content, one prune step deletes (one short transaction).
const PRUNE_ROWS: i64 = 2000;
const PRUNE_BYTES: i64 = 4 << 20;
/// An agent over its budget is trimmed to this share of it, so that it is not pruned again
/// for every new line.
const BUDGET_TRIM_TO: f64 = 0.95;

impl PostgresWriter {
    fn live(&mut self) -> Result<&mut Conn> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.conn = None;
            self.conn = Some(Conn::connect(&self.config)?);
        }
        // Set just above.
        Ok(self.conn.as_mut().expect("a live connection"))
    }
}

impl PostgresWriter {
    fn write_again(&mut self, batch: &[Job]) -> (Vec<Outcome>, bool) {
        self.attempt(batch, true)
    }

    fn attempt(&mut self, batch: &[Job], retried: bool) -> (Vec<Outcome>, bool) {
        let node = self.node.load(std::sync::atomic::Ordering::Relaxed);
        let conn = match self.live() {
            Ok(conn) => conn,
            Err(e) => {
                crate::log_error!(
                    "store: cannot reach the database, {} writes not stored: {e}",
                    batch.len()
                );
                return (failed(batch), false);
            }
        };
        // The cross-node bus adds its one pg_notify per batch to this transaction: a NOTIFY
        // is delivered when its transaction commits, and only then.
        match write_batch(conn, node, batch) {
            Ok(outcomes) => (outcomes, true),
            // The connection was found gone at BEGIN: nothing of this batch reached the
            // database, so it goes once more on a new connection.
            Err(Attempt::NotBegun(_)) if !retried => self.write_again(batch),
            Err(Attempt::NotBegun(e) | Attempt::Failed(e)) => {
                crate::log_error!(
                    "store: commit failed, {} writes not stored: {e}",
                    batch.len()
                );
                (failed(batch), false)
            }
        }
    }
}

impl Batches for PostgresWriter {
    fn write(&mut self, batch: &[Job]) -> (Vec<Outcome>, bool) {
        self.attempt(batch, false)
    }

    fn prune_step(&mut self, r: &Retention) -> Result<Pruned> {
        let now = clock::now_ms();
        let conn = self.live()?;
        let Conn {
            client, statements, ..
        } = conn;
        let mut tx = client.transaction()?;
        let mut pruned = Pruned::default();
        // Among several nodes one prunes at a time; the others find nothing to do.
        let ours: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])?
            .try_get(0)?;
        if !ours {
            return Ok(pruned);
        }
        if let Some(keep) = r.logs_for {
            let cutoff = clock::format_ms(now - keep.as_millis() as i64);
            let st = prepared(
                statements,
                &mut tx,
                "SELECT id, octet_length(content)::int8 FROM messages WHERE timestamp < $1
                 ORDER BY id LIMIT $2",
            )?;
            let rows = tx.query(&st, &[&cutoff, &PRUNE_ROWS])?;
            pruned.logs_by_age = delete_ids(&mut tx, "messages", &within_bytes(&rows)?)?;
        }
        if r.max_log_rows_per_agent.is_some() || r.max_log_bytes_per_agent.is_some() {
            pruned.logs_by_budget = trim_log_budgets(&mut tx, r)?;
        }
        if let Some(keep) = r.chat_for {
            let cutoff = clock::format_ms(now - keep.as_millis() as i64);
            // Undelivered frames stay for store and forward's whole window.
            let replay_cutoff = clock::format_ms(now - super::UNDELIVERED_KEPT_MS);
            let rows = tx.query(
                "SELECT id, octet_length(content)::int8 FROM chat_messages
                 WHERE timestamp < $1 AND NOT (delivered = 0 AND timestamp >= $2)
                 ORDER BY id LIMIT $3",
                &[&cutoff, &replay_cutoff, &PRUNE_ROWS],
            )?;
            let ids = within_bytes(&rows)?;
            keep_thread_times(&mut tx, &ids)?;
            pruned.chat_by_age = delete_ids(&mut tx, "chat_messages", &ids)?;
        }
        tx.commit()?;
        // Freed space is reused by PostgreSQL's autovacuum; nothing to give back by hand.
        Ok(pruned)
    }

    fn idle(&mut self) {}
}

/// The ids of the first rows (id, bytes) whose content adds up to `PRUNE_BYTES` (at least one).
fn within_bytes(rows: &[Row]) -> Result<Vec<i64>> {
    let mut bytes = 0;
    let mut ids = Vec::new();
    for r in rows {
        let (id, len): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
        bytes += len;
        if bytes > PRUNE_BYTES && !ids.is_empty() {
            break;
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Before chat rows go, their threads' own `last_message_at` takes the newest time among
/// them: THREAD_SELECT reads it from the newest row left, and this column once none is.
fn keep_thread_times(tx: &mut Transaction, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "UPDATE conversation_threads AS t
         SET last_message_at = g.at
         FROM (SELECT conversation_id, MAX(timestamp) AS at FROM chat_messages
               WHERE id = ANY($1) AND conversation_id IS NOT NULL
               GROUP BY conversation_id) AS g
         WHERE t.id = g.conversation_id
           AND (t.last_message_at IS NULL OR t.last_message_at < g.at)",
        &[&ids],
    )?;
    Ok(())
}

fn delete_ids(tx: &mut Transaction, table: &str, ids: &[i64]) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(tx.execute(&format!("DELETE FROM {table} WHERE id = ANY($1)"), &[&ids])?)
}

/// Agents over their row or byte budget lose their oldest lines, one bounded step at a time.
fn trim_log_budgets(tx: &mut Transaction, r: &Retention) -> Result<u64> {
    let max_rows = r.max_log_rows_per_agent.map(|n| n as i64);
    let max_bytes = r.max_log_bytes_per_agent.map(|n| n as i64);
    let over = tx.query(
        "SELECT agent_id, rows, bytes FROM log_usage
         WHERE ($1::int8 IS NOT NULL AND rows > $1) OR ($2::int8 IS NOT NULL AND bytes > $2)
         ORDER BY bytes DESC LIMIT 8",
        &[&max_rows, &max_bytes],
    )?;
    let mut deleted = 0;
    for row in &over {
        let (agent, rows, bytes): (String, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
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
        let candidates = tx.query(
            "SELECT id, octet_length(content)::int8 FROM messages
             WHERE agent_id = $1 ORDER BY id LIMIT $2",
            &[&agent, &want],
        )?;
        deleted += delete_ids(tx, "messages", &within_bytes(&candidates)?)?;
    }
    Ok(deleted)
}

/// Runs one batch in one transaction. A batch whose statements fail (a row breaking a
/// constraint aborts a PostgreSQL transaction, unlike SQLite's statement) is written again
/// row by row, each row in a savepoint of its own, so that the row fails alone as it does on
/// SQLite; a lost connection or a failing commit fails the whole batch.
fn write_batch(
    conn: &mut Conn,
    node: i64,
    batch: &[Job],
) -> std::result::Result<Vec<Outcome>, Attempt> {
    match run_batch(conn, node, batch, false) {
        Ok(outcomes) => Ok(outcomes),
        Err(Attempt::Failed(e)) if !conn.client.is_closed() => {
            crate::log_warn!(
                "store: a batch of {} writes failed ({e}); writing it again one row at a time",
                batch.len()
            );
            run_batch(conn, node, batch, true)
        }
        Err(e) => Err(e),
    }
}

/// How an attempt at a batch failed: at its BEGIN (nothing of the batch reached the
/// database; typically the connection was found gone), or later (it may have, up to its
/// rollback or a commit whose answer was lost).
enum Attempt {
    NotBegun(StoreError),
    Failed(StoreError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Attempt::Failed(e)
    }
}

impl From<::postgres::Error> for Attempt {
    fn from(e: ::postgres::Error) -> Self {
        Attempt::Failed(e.into())
    }
}

/// The rows of a batch waiting for their multi-row INSERT, and the delivery flags waiting
/// for their UPDATE. Presence changes do not touch them; a replay plan reads them, so they
/// are written before it.
#[derive(Default)]
struct Rows<'a> {
    chats: Vec<(usize, &'a NewChat)>,
    logs: Vec<(usize, &'a NewLog)>,
    delivered: Vec<i64>,
}

fn run_batch(
    conn: &mut Conn,
    node: i64,
    batch: &[Job],
    careful: bool,
) -> std::result::Result<Vec<Outcome>, Attempt> {
    let Conn {
        client, statements, ..
    } = conn;
    // A BEGIN that fails ran nothing of the batch (typically: the connection is gone).
    let mut tx = client
        .transaction()
        .map_err(|e| Attempt::NotBegun(e.into()))?;
    let mut outcomes: Vec<Outcome> = batch.iter().map(|_| Outcome::Nothing).collect();
    let mut rows = Rows::default();
    for (i, job) in batch.iter().enumerate() {
        match job {
            Job::Chat(c, _) => rows.chats.push((i, c)),
            Job::Log(l, _) => rows.logs.push((i, l)),
            Job::Delivered(ids) => rows.delivered.extend_from_slice(ids),
            Job::PlanReplay(user, shares, _) => {
                write_rows(&mut tx, statements, &mut rows, &mut outcomes, careful)?;
                let plan = guarded(&mut tx, careful, |t| {
                    plan_replay(t, statements, *user, shares)
                })?;
                outcomes[i] = Outcome::Plan(plan);
            }
            Job::Presence(user, presence) => {
                // Online: the connect time is both last-seen and online-since; offline: the
                // disconnect time, and no longer online.
                let (sql, at) = match presence {
                    Presence::Online(at) => (
                        "UPDATE users SET last_seen_at = $2, online_since = $2 WHERE id = $1",
                        at,
                    ),
                    Presence::Offline(at) => (
                        "UPDATE users SET last_seen_at = $2, online_since = NULL WHERE id = $1",
                        at,
                    ),
                };
                let done = guarded(&mut tx, careful, |t| {
                    let st = prepared(statements, t, sql)?;
                    Ok(t.execute(&st, &[user, at])?)
                })?;
                if let Err(e) = done {
                    crate::log_warn!("store: cannot record presence: {e}");
                }
            }
            // Published below, with the rows; answered after the commit, by the writer loop.
            Job::Publish(..) | Job::Barrier(_) | Job::Retention(_) | Job::Prune(..) => {}
        }
    }
    write_rows(&mut tx, statements, &mut rows, &mut outcomes, careful)?;
    // The other nodes hear of this batch when, and only when, it commits.
    bus::notify_batch(&mut tx, statements, node, batch, &outcomes)?;
    tx.commit()?;
    Ok(outcomes)
}

/// Runs `f` as part of the batch. Carefully (the second attempt): inside a savepoint, so
/// that its failure is its own (`Ok(Err(e))`) and the batch goes on; otherwise its failure
/// fails the attempt.
fn guarded<T>(
    tx: &mut Transaction,
    careful: bool,
    f: impl FnOnce(&mut Transaction) -> Result<T>,
) -> Result<Result<T>> {
    if !careful {
        return f(tx).map(Ok);
    }
    let mut savepoint = tx.transaction()?;
    match f(&mut savepoint) {
        Ok(v) => {
            savepoint.commit()?;
            Ok(Ok(v))
        }
        Err(e) => {
            savepoint.rollback()?;
            Ok(Err(e))
        }
    }
}

fn write_rows(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    rows: &mut Rows,
    outcomes: &mut [Outcome],
    careful: bool,
) -> Result<()> {
    let chats = std::mem::take(&mut rows.chats);
    let logs = std::mem::take(&mut rows.logs);
    if careful {
        for (i, c) in chats {
            let one = guarded(tx, true, |t| store_chats(t, statements, &[c]))?;
            outcomes[i] = Outcome::Stored(one.map(|mut s| s.remove(0)));
        }
        for (i, l) in logs {
            let one = guarded(tx, true, |t| store_logs(t, statements, &[l]))?;
            outcomes[i] = Outcome::Stored(one.map(|mut s| s.remove(0)));
        }
    } else {
        if !chats.is_empty() {
            let list: Vec<&NewChat> = chats.iter().map(|(_, c)| *c).collect();
            let stored = store_chats(tx, statements, &list)?;
            for ((i, _), s) in chats.iter().zip(stored) {
                outcomes[*i] = Outcome::Stored(Ok(s));
            }
        }
        if !logs.is_empty() {
            let list: Vec<&NewLog> = logs.iter().map(|(_, l)| *l).collect();
            let stored = store_logs(tx, statements, &list)?;
            for ((i, _), s) in logs.iter().zip(stored) {
                outcomes[*i] = Outcome::Stored(Ok(s));
            }
        }
    }
    let mut ids = std::mem::take(&mut rows.delivered);
    if !ids.is_empty() {
        // In id order, so that two writers flagging overlapping rows lock them alike.
        ids.sort_unstable();
        ids.dedup();
        let done = guarded(tx, careful, |t| {
            let st = prepared(
                statements,
                t,
                // `delivered < 1` is `delivered = 0` (0, 1, 2 are its only values) said so
                // that the planner goes by primary key alone: with `= 0` it also scanned
                // the whole partial index `chat_undelivered`, dead entries and all, per batch.
                "UPDATE chat_messages SET delivered = 1 WHERE id = ANY($1) AND delivered < 1",
            )?;
            Ok(t.execute(&st, &[&ids])?)
        })?;
        if let Err(e) = done {
            crate::log_warn!("store: cannot record a delivery: {e}");
        }
    }
    Ok(())
}

/// `n` new ids of `sequence`, ascending: the rows of one batch get them in submission order,
/// so a row's id is larger than every row's this node committed before it.
fn next_ids(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    sequence: &str,
    n: usize,
) -> Result<Vec<i64>> {
    let st = prepared(
        statements,
        tx,
        &format!("SELECT nextval('{sequence}') FROM generate_series(1, $1::int4)"),
    )?;
    let mut ids = tx
        .query(&st, &[&(n as i32)])?
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// What one row of a group is: a repeat of an earlier row of the same group, or to be
/// inserted (the index among the rows to insert; the INSERT skips it when its key is
/// already stored).
enum Fate {
    SameAs(usize),
    New(usize),
}

/// The fates of a group's rows by their (sender, local_id) keys.
fn fates(keys: &[Option<(i64, &str)>]) -> Vec<Fate> {
    let mut first_of: HashMap<(i64, &str), usize> = HashMap::new();
    let mut new = 0;
    keys.iter()
        .enumerate()
        .map(|(k, key)| {
            if let Some((sender, local)) = key {
                if let Some(first) = first_of.get(&(*sender, *local)) {
                    return Fate::SameAs(*first);
                }
                first_of.insert((*sender, *local), k);
            }
            new += 1;
            Fate::New(new - 1)
        })
        .collect()
}

/// The answers for a group: `inserted` holds the ids the INSERT returned; a row whose id is
/// not there was skipped because its key was stored already (a retry, here or on another
/// node, committed before or racing this batch), and is that row (`raced`, found by key).
fn answers(
    fates: Vec<Fate>,
    keys: &[Option<(i64, &str)>],
    ids: &[i64],
    timestamps: &[String],
    inserted: &HashSet<i64>,
    raced: &HashMap<(i64, String), Stored>,
) -> Result<Vec<Stored>> {
    let mut out: Vec<Stored> = Vec::with_capacity(fates.len());
    for (k, fate) in fates.into_iter().enumerate() {
        let stored = match fate {
            Fate::SameAs(first) => Stored {
                duplicate: true,
                ..out[first].clone()
            },
            Fate::New(j) if inserted.contains(&ids[j]) => Stored {
                id: ids[j],
                timestamp: timestamps[j].clone(),
                duplicate: false,
            },
            Fate::New(_) => {
                let (sender, local) = keys[k].ok_or(StoreError::NotFound)?;
                let s = raced
                    .get(&(sender, local.to_string()))
                    .ok_or(StoreError::NotFound)?;
                Stored {
                    duplicate: true,
                    ..s.clone()
                }
            }
        };
        out.push(stored);
    }
    Ok(out)
}

/// The rows of `table` stored under these (sender_id, local_id) keys.
fn find_keys(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    table: &str,
    keys: &[(i64, &str)],
) -> Result<HashMap<(i64, String), Stored>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let st = prepared(
        statements,
        tx,
        &format!(
            // One index lookup per key, whatever the planner thinks of the table's size (as
            // a plain join it was planned as a hash of the keys and a scan of the table);
            // the LIMIT keeps the lateral subquery from being flattened back into a join.
            "SELECT k.sender_id, k.local_id, t.id, t.timestamp
             FROM unnest($1::int8[], $2::text[]) AS k(sender_id, local_id)
             CROSS JOIN LATERAL (
                 SELECT f.id, f.timestamp FROM {table} f
                 WHERE f.sender_id = k.sender_id AND f.local_id = k.local_id LIMIT 1
             ) t"
        ),
    )?;
    let senders: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let locals: Vec<&str> = keys.iter().map(|k| k.1).collect();
    let mut found = HashMap::new();
    for r in tx.query(&st, &[&senders, &locals])? {
        found.insert(
            (r.try_get(0)?, r.try_get(1)?),
            Stored {
                id: r.try_get(2)?,
                timestamp: r.try_get(3)?,
                duplicate: true,
            },
        );
    }
    Ok(found)
}

/// Stores a group of chat rows with one multi-row INSERT; the answers in order.
fn store_chats(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    chats: &[&NewChat],
) -> Result<Vec<Stored>> {
    let keys: Vec<Option<(i64, &str)>> = chats
        .iter()
        .map(|c| c.local_id.as_deref().map(|l| (c.sender_id, l)))
        .collect();
    // No lookup of the keys first: the INSERT skips a key already stored (a retry), and
    // only the rows it skipped are looked up (`raced`), which saves a round trip in nearly
    // every commit.
    let fates = fates(&keys);
    let new: Vec<&NewChat> = fates
        .iter()
        .zip(chats)
        .filter(|(f, _)| matches!(f, Fate::New(_)))
        .map(|(_, c)| *c)
        .collect();
    let ids = if new.is_empty() {
        Vec::new()
    } else {
        next_ids(tx, statements, "chat_messages_id_seq", new.len())?
    };
    let timestamps: Vec<String> = new.iter().map(|_| clock::now_rfc3339()).collect();
    let mut inserted = HashSet::new();
    if !new.is_empty() {
        let st = prepared(
            statements,
            tx,
            "INSERT INTO chat_messages (id, local_id, sender_id, receiver_id, type, content,
                                        stream_id, conversation_id, timestamp, delivered)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                                  $6::text[], $7::text[], $8::int8[], $9::text[], $10::int4[])
             ON CONFLICT (sender_id, local_id) DO NOTHING
             RETURNING id",
        )?;
        let local_ids: Vec<Option<&str>> = new.iter().map(|c| c.local_id.as_deref()).collect();
        let senders: Vec<i64> = new.iter().map(|c| c.sender_id).collect();
        let receivers: Vec<i64> = new.iter().map(|c| c.receiver_id).collect();
        let kinds: Vec<&str> = new.iter().map(|c| c.kind.as_str()).collect();
        let payloads: Vec<&str> = new.iter().map(|c| c.payload.as_str()).collect();
        let streams: Vec<Option<&str>> = new.iter().map(|c| c.stream_id.as_deref()).collect();
        let threads: Vec<Option<i64>> = new.iter().map(|c| c.conversation_id).collect();
        let delivered: Vec<i32> = new.iter().map(|c| i32::from(!c.forward())).collect();
        for r in tx.query(
            &st,
            &[
                &ids,
                &local_ids,
                &senders,
                &receivers,
                &kinds,
                &payloads,
                &streams,
                &threads,
                &timestamps,
                &delivered,
            ],
        )? {
            inserted.insert(r.try_get::<_, i64>(0)?);
        }
        // A thread's last_message_at and updated_at follow from its newest row
        // (THREAD_SELECT): no UPDATE of the thread here.
    }
    let raced_keys: Vec<(i64, &str)> = fates
        .iter()
        .zip(&keys)
        .filter_map(|(f, k)| match f {
            Fate::New(j) if !inserted.contains(&ids[*j]) => *k,
            _ => None,
        })
        .collect();
    let raced = find_keys(tx, statements, "chat_messages", &raced_keys)?;
    answers(fates, &keys, &ids, &timestamps, &inserted, &raced)
}

/// Stores a group of log rows with one multi-row INSERT; the answers in order. A row is
/// idempotent when it has both a sender and a `local_id`.
fn store_logs(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    logs: &[&NewLog],
) -> Result<Vec<Stored>> {
    let keys: Vec<Option<(i64, &str)>> = logs
        .iter()
        .map(|l| match (l.sender_id, l.local_id.as_deref()) {
            (Some(s), Some(local)) => Some((s, local)),
            _ => None,
        })
        .collect();
    // No lookup of the keys first: the INSERT skips a key already stored (a retry), and
    // only the rows it skipped are looked up (`raced`), which saves a round trip in nearly
    // every commit.
    let fates = fates(&keys);
    let new: Vec<&NewLog> = fates
        .iter()
        .zip(logs)
        .filter(|(f, _)| matches!(f, Fate::New(_)))
        .map(|(_, l)| *l)
        .collect();
    let ids = if new.is_empty() {
        Vec::new()
    } else {
        next_ids(tx, statements, "messages_id_seq", new.len())?
    };
    let timestamps: Vec<String> = new.iter().map(|_| clock::now_rfc3339()).collect();
    let mut inserted = HashSet::new();
    if !new.is_empty() {
        let st = prepared(
            statements,
            tx,
            "INSERT INTO messages (id, agent_id, level, content, timestamp, sender_id, local_id)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::int8[], $7::text[])
             ON CONFLICT (sender_id, local_id) DO NOTHING
             RETURNING id",
        )?;
        let agents: Vec<&str> = new.iter().map(|l| l.agent_id.as_str()).collect();
        let levels: Vec<&str> = new.iter().map(|l| l.level.as_str()).collect();
        let contents: Vec<&str> = new.iter().map(|l| l.content.as_str()).collect();
        let senders: Vec<Option<i64>> = new.iter().map(|l| l.sender_id).collect();
        let local_ids: Vec<Option<&str>> = new.iter().map(|l| l.local_id.as_deref()).collect();
        for r in tx.query(
            &st,
            &[
                &ids,
                &agents,
                &levels,
                &contents,
                &timestamps,
                &senders,
                &local_ids,
            ],
        )? {
            inserted.insert(r.try_get::<_, i64>(0)?);
        }
    }
    let raced_keys: Vec<(i64, &str)> = fates
        .iter()
        .zip(&keys)
        .filter_map(|(f, k)| match f {
            Fate::New(j) if !inserted.contains(&ids[*j]) => *k,
            _ => None,
        })
        .collect();
    let raced = find_keys(tx, statements, "messages", &raced_keys)?;
    answers(fates, &keys, &ids, &timestamps, &inserted, &raced)
}

/// See `Store::plan_replay`. One statement retires what the window leaves out; the frames
/// kept are each sender's newest, by the shares, and no older than `since`.
fn plan_replay(
    tx: &mut Transaction,
    statements: &mut HashMap<String, Statement>,
    user: i64,
    shares: &ReplayShares,
) -> Result<(Vec<Retired>, Option<i64>)> {
    let st = prepared(
        statements,
        tx,
        "WITH pending AS (
             SELECT c.id, c.timestamp, u.role AS sender_role,
                    ROW_NUMBER() OVER (PARTITION BY c.sender_id ORDER BY c.id DESC) AS nth
             FROM chat_messages c JOIN users u ON u.id = c.sender_id
             WHERE c.receiver_id = $1 AND c.delivered = 0
         ),
         agent_kept AS (
             SELECT id FROM pending
             WHERE sender_role = 'AGENT' AND nth <= $4 AND timestamp >= $2
             ORDER BY id DESC LIMIT $5
         ),
         kept AS (
             SELECT id FROM pending
             WHERE sender_role <> 'AGENT' AND nth <= $3 AND timestamp >= $2
             UNION ALL SELECT id FROM agent_kept
         )
         UPDATE chat_messages SET delivered = 2
         WHERE receiver_id = $1 AND delivered = 0 AND id NOT IN (SELECT id FROM kept)
         RETURNING id, sender_id, local_id",
    )?;
    let mut retired = tx
        .query(
            &st,
            &[
                &user,
                &shares.since,
                &shares.priority,
                &shares.agent,
                &shares.agent_window,
            ],
        )?
        .iter()
        .map(|r| {
            Ok(Retired {
                id: r.try_get(0)?,
                sender_id: r.try_get(1)?,
                local_id: r.try_get(2)?,
            })
        })
        .collect::<std::result::Result<Vec<_>, ::postgres::Error>>()?;
    // RETURNING has no order; the senders are told in id order, as on SQLite.
    retired.sort_by_key(|r| r.id);
    let st = prepared(
        statements,
        tx,
        "SELECT MAX(id) FROM chat_messages WHERE receiver_id = $1 AND delivered = 0",
    )?;
    let last: Option<i64> = tx.query_one(&st, &[&user])?.try_get(0)?;
    Ok((retired, last))
}

/// Approvals: an AUTH_REQUEST's status lives in its stored payload (`"status"`), rewritten
/// the way SQLite's `json_set(content, '$.status', …)` rewrites it, so that history reads
/// byte for byte the same on both backends. PostgreSQL's own `jsonb_set` would not do: jsonb
/// reorders keys and re-spaces the text.
mod json_status {
    /// The payload with its top-level `status` set, when it is a JSON object whose status is
    /// PENDING, null or absent; None otherwise (already answered, or not an object).
    ///
    /// Like SQLite's json_set: the text comes back minified (whitespace outside strings
    /// dropped, strings and numbers as written), the first `status` key's value replaced in
    /// place, or `"status"` appended last.
    pub fn set_pending(doc: &str, status: &str) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(doc).ok()?;
        if !value.is_object() {
            return None;
        }
        let min = minify(doc);
        let fields = top_level_fields(&min)?;
        let status_json = serde_json::to_string(status).ok()?;
        let found = fields.iter().find(|(key, _)| {
            serde_json::from_str::<String>(&min[key.clone()])
                .ok()
                .as_deref()
                == Some("status")
        });
        match found {
            Some((_, at)) => {
                let current = &min[at.clone()];
                let pending = current == "null"
                    || serde_json::from_str::<String>(current).ok().as_deref() == Some("PENDING");
                pending.then(|| format!("{}{status_json}{}", &min[..at.start], &min[at.end..]))
            }
            None => {
                let body = &min[..min.len() - 1];
                let comma = if fields.is_empty() { "" } else { "," };
                Some(format!("{body}{comma}\"status\":{status_json}}}"))
            }
        }
    }

    /// The JSON text without whitespace outside strings.
    fn minify(doc: &str) -> String {
        let mut out = String::with_capacity(doc.len());
        let mut in_string = false;
        let mut escaped = false;
        for c in doc.chars() {
            if in_string {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
                if c == '"' {
                    in_string = true;
                }
                out.push(c);
            }
        }
        out
    }

    /// The byte ranges of each top-level key (with its quotes) and value of a minified
    /// JSON object.
    #[allow(clippy::type_complexity)]
    fn top_level_fields(
        min: &str,
    ) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
        let b = min.as_bytes();
        if b.first() != Some(&b'{') {
            return None;
        }
        let mut fields = Vec::new();
        let mut i = 1;
        if b.get(i) == Some(&b'}') {
            return Some(fields);
        }
        loop {
            let key_end = skip_value(b, i)?;
            if b.get(key_end) != Some(&b':') {
                return None;
            }
            let value_end = skip_value(b, key_end + 1)?;
            fields.push((i..key_end, key_end + 1..value_end));
            match b.get(value_end) {
                Some(b',') => i = value_end + 1,
                Some(b'}') => return Some(fields),
                _ => return None,
            }
        }
    }

    /// Where the value starting at `i` ends.
    fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        loop {
            let c = *b.get(i)?;
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == b'\\' {
                    escaped = true;
                } else if c == b'"' {
                    in_string = false;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
            } else {
                match c {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth == 0 => return Some(i),
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    b',' | b':' if depth == 0 => return Some(i),
                    _ => {}
                }
            }
            i += 1;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::set_pending;

        /// Byte for byte what SQLite's json_set writes (the bundled SQLite, checked here).
        #[test]
        fn rewrites_as_sqlite_json_set_does() {
            let sqlite = rusqlite::Connection::open_in_memory().unwrap();
            let docs = [
                r#"{"action_id":"a1","command":"restart"}"#,
                r#"{ "action_id" : "a1",  "nested": {"status": "x", "list": [1, 2 , {"a":"b"}]} }"#,
                r#"{}"#,
                r#"{"status":"PENDING","action_id":"a"}"#,
                r#"{"status":null,"n":1.50e3,"s":"\u00e9\n \"q\" "}"#,
                r#"{"k":"é","status" :  "PENDING" , "z":true}"#,
                r#"{"status":"PENDING","status":"APPROVED"}"#,
                "{\n\t\"action_id\": \"x\",\r\n\t\"deep\": [[], {}, \"]}\"]\n}",
            ];
            for doc in docs {
                let expected: String = sqlite
                    .query_row("SELECT json_set(?1, '$.status', 'APPROVED')", [doc], |r| {
                        r.get(0)
                    })
                    .unwrap();
                assert_eq!(
                    set_pending(doc, "APPROVED").as_deref(),
                    Some(&*expected),
                    "{doc}"
                );
            }
        }

        #[test]
        fn only_pending_objects_are_rewritten() {
            assert_eq!(set_pending(r#"{"status":"APPROVED"}"#, "EXPIRED"), None);
            assert_eq!(set_pending(r#"{"status":3}"#, "EXPIRED"), None);
            assert_eq!(set_pending(r#"["status"]"#, "EXPIRED"), None);
            assert_eq!(set_pending(r#""text""#, "EXPIRED"), None);
            assert_eq!(set_pending("not json", "EXPIRED"), None);
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::{client_config, writer_config};
    use crate::config::parse_dsn;

    #[test]
    fn every_connection_plans_each_execution_and_keeps_the_users_own_options() {
        let dsn = parse_dsn("--db", "postgres://app@db.internal/echo").unwrap();
        let config = client_config(&dsn).unwrap();
        assert_eq!(
            config.get_options(),
            Some("-c plan_cache_mode=force_custom_plan")
        );
        let dsn = parse_dsn(
            "--db",
            "postgres://app@db.internal/echo?options=-c%20statement_timeout%3D5s",
        )
        .unwrap();
        let config = client_config(&dsn).unwrap();
        assert_eq!(
            config.get_options(),
            Some("-c statement_timeout=5s -c plan_cache_mode=force_custom_plan")
        );
    }

    #[test]
    fn the_writer_keeps_its_plans_and_goes_by_index_after_the_users_options() {
        let dsn = parse_dsn(
            "--db",
            "postgres://app@db.internal/echo?options=-c%20statement_timeout%3D5s",
        )
        .unwrap();
        let writer = writer_config(&client_config(&dsn).unwrap());
        // The last setting of a name wins.
        assert_eq!(
            writer.get_options(),
            Some(
                "-c statement_timeout=5s -c plan_cache_mode=force_custom_plan \
                 -c plan_cache_mode=auto -c enable_seqscan=off -c jit=off"
            )
        );
    }
}
