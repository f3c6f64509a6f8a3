-- Retention and search (issue 12).

-- Per agent (messages.agent_id): how many log lines and how many bytes of content it has
-- stored, kept by the triggers below, so the per-agent budget is checked without a scan.
CREATE TABLE log_usage (
    agent_id TEXT PRIMARY KEY,
    rows     INTEGER NOT NULL,
    bytes    INTEGER NOT NULL
);
INSERT INTO log_usage (agent_id, rows, bytes)
    SELECT agent_id, COUNT(*), SUM(length(CAST(content AS BLOB))) FROM messages GROUP BY agent_id;

CREATE TRIGGER log_usage_insert AFTER INSERT ON messages BEGIN
    INSERT INTO log_usage (agent_id, rows, bytes)
        VALUES (new.agent_id, 1, length(CAST(new.content AS BLOB)))
        ON CONFLICT (agent_id) DO UPDATE SET rows = rows + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER log_usage_delete AFTER DELETE ON messages BEGIN
    UPDATE log_usage SET rows = rows - 1, bytes = bytes - length(CAST(old.content AS BLOB))
        WHERE agent_id = old.agent_id;
END;

-- The log search: substrings of content (case-insensitive), through a trigram index instead
-- of a scan of the whole table.
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content, content = 'messages', content_rowid = 'id', tokenize = 'trigram'
);
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
