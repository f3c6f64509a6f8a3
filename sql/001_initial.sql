-- EchoCenter schema, version 1.
-- Timestamps are RFC 3339 UTC with milliseconds ("2026-11-28T20:11:26.123Z"): they sort as text.

CREATE TABLE users (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
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
    last_seen_at   TEXT
);

CREATE TABLE human_credentials (
    user_id       INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE machine_credentials (
    user_id      INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
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
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id  TEXT NOT NULL,
    level     TEXT NOT NULL,
    content   TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    sender_id INTEGER REFERENCES users(id),
    local_id  TEXT
);
CREATE UNIQUE INDEX messages_sender_local ON messages (sender_id, local_id) WHERE local_id IS NOT NULL;
CREATE INDEX messages_agent ON messages (agent_id, id);

CREATE TABLE chat_messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    local_id        TEXT,
    sender_id       INTEGER NOT NULL REFERENCES users(id),
    receiver_id     INTEGER NOT NULL REFERENCES users(id),
    type            TEXT NOT NULL DEFAULT 'CHAT',
    -- The payload exactly as sent, as JSON text.
    content         TEXT NOT NULL,
    stream_id       TEXT,
    conversation_id INTEGER,
    timestamp       TEXT NOT NULL,
    -- Store-and-forward: 0 while a frame addressed to an agent or the Butler has not yet
    -- been written to one of its connections; 1 once it has (and always for humans, who load
    -- history over REST instead).
    delivered       INTEGER NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX chat_sender_local ON chat_messages (sender_id, local_id) WHERE local_id IS NOT NULL;
CREATE INDEX chat_pair ON chat_messages (sender_id, receiver_id, id);
CREATE INDEX chat_undelivered ON chat_messages (receiver_id, id) WHERE delivered = 0;

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
