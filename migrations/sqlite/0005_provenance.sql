-- Provenance: the rule version (plugin name, version in its process,
-- component sha256) that raised each alert and decided each tariff. NULL
-- for rows from before this migration.
ALTER TABLE alerts ADD COLUMN rule_name TEXT;
ALTER TABLE alerts ADD COLUMN rule_version INTEGER;
ALTER TABLE alerts ADD COLUMN rule_sha256 TEXT;
ALTER TABLE tariffs ADD COLUMN rule_name TEXT;
ALTER TABLE tariffs ADD COLUMN rule_version INTEGER;
ALTER TABLE tariffs ADD COLUMN rule_sha256 TEXT;

-- Plugin versions installed through one process (admin API, watched
-- folder), for the other processes sharing this store to install too.
CREATE TABLE plugin_versions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin     TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    component  BLOB NOT NULL,
    config     TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(config)),
    source     TEXT NOT NULL,
    -- The process that installed it (it does not install it again).
    origin     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
