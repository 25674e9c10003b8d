-- 0005: an index for releasing revoked nodes' addresses after quarantine.
--
-- Every enrollment first releases the addresses of nodes revoked longer
-- than the quarantine ago (UPDATE nodes SET ip_released = 1 WHERE
-- revoked_at IS NOT NULL AND revoked_at <= ? AND ip_released = 0). Without
-- an index that is a scan of every node per enrollment; with this one it
-- reads only the revoked nodes still holding addresses.

CREATE INDEX nodes_quarantined ON nodes (revoked_at) WHERE ip_released = 0 AND revoked_at IS NOT NULL;
