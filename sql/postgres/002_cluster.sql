-- Several nodes on one database (README "Running several nodes"): who is alive, and which
-- node holds which user's connections. Liveness uses the database's clock (now()), not the
-- nodes', so nodes need not agree on the time; these are the only timestamptz columns.

CREATE TABLE nodes (
    id           BIGSERIAL PRIMARY KEY,
    -- The address the node listens on, for an operator reading this table.
    address      TEXT NOT NULL DEFAULT '',
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A user's live connections on one node (a count), and whether it said it is busy.
-- No foreign keys: rows of a swept node or a removed user are simply deleted.
CREATE TABLE connections (
    node_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL,
    conns   INTEGER NOT NULL,
    busy    BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (node_id, user_id)
);
CREATE INDEX connections_user ON connections (user_id);

-- Unstored frames too large for a notification's payload, for a few minutes.
CREATE TABLE bus_frames (
    id         BIGSERIAL PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    json       TEXT NOT NULL
);
