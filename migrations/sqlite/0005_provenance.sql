-- Provenance: the rule version (plugin name, version in its process,
-- component sha256) that raised each alert and decided each tariff. NULL
-- for rows from before this migration.
ALTER TABLE alerts ADD COLUMN rule_name TEXT;
ALTER TABLE alerts ADD COLUMN rule_version INTEGER;
ALTER TABLE alerts ADD COLUMN rule_sha256 TEXT;
ALTER TABLE tariffs ADD COLUMN rule_name TEXT;
ALTER TABLE tariffs ADD COLUMN rule_version INTEGER;
ALTER TABLE tariffs ADD COLUMN rule_sha256 TEXT;
