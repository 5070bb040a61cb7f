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
