-- Conversation threads (issue 13; the original's facts are in ../shared/upstream-threads.md).
-- A human's chat with one agent or with the Butler, grouped; every stored chat frame between
-- the two names its thread in chat_messages.conversation_id.
CREATE TABLE conversation_threads (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The human who created it (or for whom it was created on demand).
    owner_user_id   INTEGER NOT NULL REFERENCES users(id),
    -- The agent or the Butler.
    peer_user_id    INTEGER NOT NULL REFERENCES users(id),
    channel_kind    TEXT NOT NULL CHECK (channel_kind IN ('agent_direct', 'butler_direct')),
    title           TEXT NOT NULL,
    summary         TEXT,
    is_pinned       INTEGER NOT NULL DEFAULT 0,
    -- The pair's default thread: where frames that name no thread go (one per pair).
    is_default      INTEGER NOT NULL DEFAULT 0,
    archived_at     TEXT,
    last_message_at TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX threads_owner ON conversation_threads (owner_user_id, peer_user_id);
CREATE UNIQUE INDEX threads_default_per_pair
    ON conversation_threads (owner_user_id, peer_user_id) WHERE is_default = 1;

-- A thread's messages, newest first.
CREATE INDEX chat_conversation ON chat_messages (conversation_id, id) WHERE conversation_id IS NOT NULL;

-- Approvals: an AUTH_REQUEST is found by its payload's action_id when a human answers it.
CREATE INDEX chat_auth_requests ON chat_messages (json_extract(content, '$.action_id'))
    WHERE type = 'AUTH_REQUEST';
