-- 0003: SSH-only nodes.
--
-- An SSH-only node is a device with only stock OpenSSH: an admin certifies
-- its SSH public key for a name (meshctl nodes add-ssh), and the proxy's SSH
-- fallback server lets it remote-forward its services. It has no WireGuard
-- key and no overlay address, so it lives in its own table rather than in
-- nodes (whose wg_key/ipv4/ipv6 are NOT NULL and unique, and which
-- service_visibility references). Node names are unique among the active
-- nodes of both tables; the store checks that across tables, and each
-- table's partial unique index backs it up within the table.

CREATE TABLE ssh_nodes (
	id          TEXT    PRIMARY KEY NOT NULL,
	name        TEXT    NOT NULL CHECK (name <> ''),
	-- JSON array of services (name, nominal port, public flag) the node
	-- may forward; fixed by the admin, not reported by the device.
	services    TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(services) = 'array'),
	ssh_key     TEXT    NOT NULL CHECK (ssh_key <> ''),
	created     INTEGER NOT NULL,
	revoked_at  INTEGER,
	created_by  TEXT    NOT NULL DEFAULT ''
) STRICT;

CREATE UNIQUE INDEX ssh_nodes_active_name ON ssh_nodes (name) WHERE revoked_at IS NULL;
CREATE INDEX ssh_nodes_created ON ssh_nodes (created);
