-- Provenance: the rule version (plugin name, version in its process,
-- component sha256) that raised each alert and decided each tariff. NULL
-- for rows from before this migration. Plugin faults and automatic
-- rollbacks are alerts too (host/src/messages.rs, AlertType).
ALTER TABLE alerts
    ADD COLUMN rule_name TEXT,
    ADD COLUMN rule_version BIGINT,
    ADD COLUMN rule_sha256 TEXT;
ALTER TABLE tariffs
    ADD COLUMN rule_name TEXT,
    ADD COLUMN rule_version BIGINT,
    ADD COLUMN rule_sha256 TEXT;
ALTER TABLE alerts DROP CONSTRAINT IF EXISTS alerts_type_check;
ALTER TABLE alerts ADD CONSTRAINT alerts_type_check
    CHECK (type IN ('ANOMALY', 'OVERLOAD', 'PLUGIN_FAULT', 'PLUGIN_ROLLBACK'));

-- Plugin versions installed through one process (admin API, watched
-- folder), for the other processes sharing this store to install too.
CREATE TABLE plugin_versions (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plugin     TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    component  BYTEA NOT NULL,
    config     JSONB NOT NULL DEFAULT '{}',
    source     TEXT NOT NULL,
    -- The process that installed it (it does not install it again).
    origin     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
