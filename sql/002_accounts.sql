-- Human accounts (issue 12): disabling, revoking sessions, and presence the command line can see.

-- Set while an account is disabled: it cannot log in, and its sessions are closed.
ALTER TABLE users ADD COLUMN disabled_at TEXT;
-- Bumped whenever a human's password changes, its account is disabled or removed, or its role
-- changes. A JWT carries the generation it was issued under (claim "gen"); an older one no
-- longer authenticates, and live sessions under it are closed.
ALTER TABLE users ADD COLUMN session_gen INTEGER NOT NULL DEFAULT 0;
-- Set while a machine user has a live connection (since when); every server start clears it.
ALTER TABLE users ADD COLUMN online_since TEXT;
