-- 0002: access keys and service visibility overrides.
--
-- An access key lets a browser through the proxy to private services: of
-- every node (node NULL) or of one node, and every service (service NULL)
-- or one. Only the SHA-256 hash of its secret is stored. Access keys always
-- expire.

CREATE TABLE access_keys (
	id          TEXT    PRIMARY KEY NOT NULL,
	secret_hash BLOB    NOT NULL CHECK (length(secret_hash) = 32),
	-- The id of the node whose services the key opens; NULL: every node.
	node        TEXT    CHECK (node IS NULL OR node <> ''),
	-- The service the key opens; NULL: every service.
	service     TEXT    CHECK (service IS NULL OR service <> ''),
	created     INTEGER NOT NULL,
	expires     INTEGER NOT NULL,
	revoked_at  INTEGER,
	created_by  TEXT    NOT NULL DEFAULT ''
) STRICT;

CREATE INDEX access_keys_created ON access_keys (created);

-- An admin's override of whether a node's service is public (1) or
-- private (0), whatever the node reports. Rows for services the node does
-- not publish are kept and apply when it does.
CREATE TABLE service_visibility (
	node_id TEXT    NOT NULL REFERENCES nodes (id),
	service TEXT    NOT NULL CHECK (service <> ''),
	public  INTEGER NOT NULL CHECK (public IN (0, 1)),
	PRIMARY KEY (node_id, service)
) STRICT;
