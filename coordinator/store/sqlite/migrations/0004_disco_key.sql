-- 0004: nodes' disco (path-probe) keys.
--
-- A node reports its disco key, an X25519 public key distinct from its
-- WireGuard key, in its update call; the coordinator publishes it in
-- netmaps so that peers can authenticate the probes that choose between a
-- direct UDP path and the relay. Standard base64 of 32 bytes (validated by
-- the API); '' until the node reports one. SSH-only nodes (ssh_nodes) have
-- none.

ALTER TABLE nodes ADD COLUMN disco_key TEXT NOT NULL DEFAULT '';
