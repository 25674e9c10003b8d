-- 0001: initial schema.
--
-- Migrations are append-only: never edit a file once it has shipped; add the
-- next number instead. Times are INTEGER unix nanoseconds (UTC); NULL means
-- the zero time ("never", "not revoked"). JSON columns hold arrays.

CREATE TABLE tokens (
	id          TEXT    PRIMARY KEY NOT NULL,
	secret_hash BLOB    NOT NULL CHECK (length(secret_hash) = 32),
	role        TEXT    NOT NULL,
	tags        TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
	max_uses    INTEGER NOT NULL DEFAULT 0 CHECK (max_uses >= 0),
	uses        INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0),
	created     INTEGER NOT NULL,
	expires     INTEGER NOT NULL,
	revoked_at  INTEGER,
	created_by  TEXT    NOT NULL DEFAULT ''
) STRICT;

CREATE TABLE nodes (
	id          TEXT    PRIMARY KEY NOT NULL,
	name        TEXT    NOT NULL,
	role        TEXT    NOT NULL,
	ipv4        TEXT    NOT NULL,
	ipv6        TEXT    NOT NULL,
	-- 1 once a revoked node's addresses have left quarantine and may be
	-- handed out again. Active nodes always have 0.
	ip_released INTEGER NOT NULL DEFAULT 0
	            CHECK (ip_released IN (0, 1) AND (ip_released = 0 OR revoked_at IS NOT NULL)),
	-- UNIQUE over all rows: a revoked node's key never comes back.
	wg_key      TEXT    NOT NULL UNIQUE,
	tags        TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
	services    TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(services) = 'array'),
	endpoints   TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(endpoints) = 'array'),
	token_id    TEXT    REFERENCES tokens (id),
	created     INTEGER NOT NULL,
	last_seen   INTEGER,
	revoked_at  INTEGER
) STRICT;

-- Names are unique among active nodes; a revoked node's name may be reused.
CREATE UNIQUE INDEX nodes_active_name ON nodes (name) WHERE revoked_at IS NULL;
-- Overlay addresses are unique among nodes that hold them (active nodes and
-- revoked ones still in quarantine).
CREATE UNIQUE INDEX nodes_held_ipv4 ON nodes (ipv4) WHERE ip_released = 0;
CREATE UNIQUE INDEX nodes_held_ipv6 ON nodes (ipv6) WHERE ip_released = 0;
CREATE INDEX nodes_created ON nodes (created);
CREATE INDEX nodes_token ON nodes (token_id);

CREATE TABLE admin_keys (
	id          TEXT    PRIMARY KEY NOT NULL,
	secret_hash BLOB    NOT NULL CHECK (length(secret_hash) = 32),
	created     INTEGER NOT NULL,
	expires     INTEGER,
	revoked_at  INTEGER,
	created_by  TEXT    NOT NULL DEFAULT ''
) STRICT;

-- Append-only: the store never updates or deletes rows.
CREATE TABLE audit (
	id     INTEGER PRIMARY KEY AUTOINCREMENT,
	time   INTEGER NOT NULL,
	actor  TEXT    NOT NULL,
	action TEXT    NOT NULL,
	target TEXT    NOT NULL DEFAULT '',
	detail TEXT    NOT NULL DEFAULT ''
) STRICT;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
	SELECT RAISE(ABORT, 'audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
	SELECT RAISE(ABORT, 'audit log is append-only');
END;

CREATE TABLE meta (
	key   TEXT PRIMARY KEY NOT NULL,
	value TEXT NOT NULL
) STRICT;
