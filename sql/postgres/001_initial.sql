-- EchoCenter schema on PostgreSQL, version 1: the final shape of SQLite's sql/001..004, with
-- the same tables and column names (so the integration guide's "query the same fields from
-- users/machine_credentials" works), PostgreSQL's types where they differ.
--
-- Timestamps stay TEXT in the server's own format, RFC 3339 UTC with milliseconds
-- ("2026-11-28T20:11:26.123Z"): they sort as text, the API returns them byte for byte as
-- SQLite's backend does, and they come from the server's clock, not the database's (see
-- src/store/postgres.rs). Those that are compared or ordered are COLLATE "C": byte order,
-- as on SQLite, whatever the database's locale. Chat payloads stay TEXT too: stored exactly
-- as sent.
--
-- The log search index (pg_trgm) is not here: it is made at start-up when the extension can
-- be created (src/store/postgres.rs, `search_index`), and the search scans without it.

CREATE TABLE users (
    id             BIGSERIAL PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    role           TEXT NOT NULL CHECK (role IN ('ADMIN', 'MEMBER', 'AGENT', 'BUTLER')),
    actor_type     TEXT NOT NULL CHECK (actor_type IN ('HUMAN', 'SYSTEM')),
    agent_kind     TEXT NOT NULL DEFAULT 'generic',
    runtime_kind   TEXT NOT NULL DEFAULT 'websocket',
    description    TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL,
    -- A deleted agent keeps its row (history refers to it, the name stays reserved).
    deleted_at     TEXT,
    -- Presence that must survive restarts.
    last_seen_at   TEXT,
    -- Set while an account is disabled: it cannot log in, and its sessions are closed.
    disabled_at    TEXT,
    -- The generation a JWT must carry (see sql/002_accounts.sql).
    session_gen    BIGINT NOT NULL DEFAULT 0,
    -- Set while a machine user has a live connection (since when); every server start clears it.
    online_since   TEXT
);

CREATE TABLE human_credentials (
    user_id       BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE machine_credentials (
    user_id      BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    -- Lookup key: lower-case hex SHA-256 of the raw token.
    token_sha256 TEXT NOT NULL UNIQUE,
    token_hint   TEXT NOT NULL,
    -- Raw copy kept only outside production (see SPEC section 2); NULL otherwise.
    api_token    TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);

-- Dashboard logs (SYSTEM_LOG frames and POST /api/messages).
CREATE TABLE messages (
    id        BIGSERIAL PRIMARY KEY,
    agent_id  TEXT NOT NULL,
    level     TEXT NOT NULL,
    content   TEXT NOT NULL,
    timestamp TEXT COLLATE "C" NOT NULL,
    sender_id BIGINT REFERENCES users(id),
    local_id  TEXT,
    -- Idempotency per sender (NULLs are distinct: rows without a local_id never collide).
    CONSTRAINT messages_sender_local UNIQUE (sender_id, local_id)
);
CREATE INDEX messages_agent ON messages (agent_id, id);

CREATE TABLE chat_messages (
    id              BIGSERIAL PRIMARY KEY,
    local_id        TEXT,
    sender_id       BIGINT NOT NULL REFERENCES users(id),
    receiver_id     BIGINT NOT NULL REFERENCES users(id),
    type            TEXT NOT NULL DEFAULT 'CHAT',
    -- The payload exactly as sent, as JSON text.
    content         TEXT NOT NULL,
    stream_id       TEXT,
    conversation_id BIGINT,
    timestamp       TEXT COLLATE "C" NOT NULL,
    -- Store and forward: 0 while a frame addressed to an agent or the Butler has not been
    -- written to one of its connections, 1 once it has (always for humans), 2 retired.
    delivered       INTEGER NOT NULL DEFAULT 1,
    -- Idempotency per sender, checked in SQL so that a retry landing on another node finds
    -- the first row (INSERT … ON CONFLICT (sender_id, local_id)).
    CONSTRAINT chat_sender_local UNIQUE (sender_id, local_id)
);
CREATE INDEX chat_pair ON chat_messages (sender_id, receiver_id, id);
CREATE INDEX chat_undelivered ON chat_messages (receiver_id, id) WHERE delivered = 0;
CREATE INDEX chat_conversation ON chat_messages (conversation_id, id)
    WHERE conversation_id IS NOT NULL;

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Per agent (messages.agent_id): how many log lines and how many bytes of content it has
-- stored, kept by the triggers below, so the per-agent budget is checked without a scan.
-- Statement triggers with transition tables: one upsert per agent per batch, not per row.
CREATE TABLE log_usage (
    agent_id TEXT PRIMARY KEY,
    rows     BIGINT NOT NULL,
    bytes    BIGINT NOT NULL
);

CREATE FUNCTION log_usage_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- In agent order, so that two nodes' batches lock the same rows in the same order.
    INSERT INTO log_usage (agent_id, rows, bytes)
        SELECT agent_id, COUNT(*), SUM(octet_length(content)) FROM new_rows
        GROUP BY agent_id ORDER BY agent_id
        ON CONFLICT (agent_id) DO UPDATE
            SET rows = log_usage.rows + excluded.rows, bytes = log_usage.bytes + excluded.bytes;
    RETURN NULL;
END $$;
CREATE TRIGGER log_usage_insert AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_usage_insert();

CREATE FUNCTION log_usage_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE log_usage u SET rows = u.rows - d.n, bytes = u.bytes - d.b
        FROM (SELECT agent_id, COUNT(*) AS n, SUM(octet_length(content)) AS b
              FROM old_rows GROUP BY agent_id) d
        WHERE u.agent_id = d.agent_id;
    RETURN NULL;
END $$;
CREATE TRIGGER log_usage_delete AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION log_usage_delete();

-- Conversation threads (issue 13): a human's chat with one agent or with the Butler, grouped.
CREATE TABLE conversation_threads (
    id              BIGSERIAL PRIMARY KEY,
    owner_user_id   BIGINT NOT NULL REFERENCES users(id),
    peer_user_id    BIGINT NOT NULL REFERENCES users(id),
    channel_kind    TEXT NOT NULL CHECK (channel_kind IN ('agent_direct', 'butler_direct')),
    title           TEXT NOT NULL,
    summary         TEXT,
    is_pinned       BOOLEAN NOT NULL DEFAULT FALSE,
    -- The pair's default thread: where frames that name no thread go (one per pair).
    is_default      BOOLEAN NOT NULL DEFAULT FALSE,
    archived_at     TEXT,
    last_message_at TEXT COLLATE "C",
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX threads_owner ON conversation_threads (owner_user_id, peer_user_id);
CREATE UNIQUE INDEX threads_default_per_pair
    ON conversation_threads (owner_user_id, peer_user_id) WHERE is_default;

-- A field of a JSON text, or NULL when the text is not JSON (a hand-edited row must not make
-- a lookup fail): SQLite's json_extract for top-level fields.
CREATE FUNCTION echocenter_json_field(doc TEXT, field TEXT) RETURNS TEXT
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN doc::jsonb ->> field;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;

-- Approvals: an AUTH_REQUEST is found by its payload's action_id when a human answers it.
CREATE INDEX chat_auth_requests ON chat_messages (echocenter_json_field(content, 'action_id'))
    WHERE type = 'AUTH_REQUEST';
