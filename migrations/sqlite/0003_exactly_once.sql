-- One effect per reading (see ARCHITECTURE.md, "Exactly once"):
--   * raw_readings holds each reading once: (meter_id, timestamp) is unique,
--     and a replayed reading is ignored;
--   * an alert carries its dedupe key; at most one alert per key is stored,
--     so a replayed or repeated alert is recognised by the store itself;
--   * the outbox holds the messages a stage derived, written in the same
--     transaction as the rows they describe, until they are published;
--   * stream_checkpoints holds the stream stage's open windows and baselines
--     with the bus positions they cover.

DELETE FROM raw_readings WHERE reading_id NOT IN
    (SELECT MIN(reading_id) FROM raw_readings GROUP BY meter_id, timestamp);
DROP INDEX IF EXISTS raw_readings_meter_timestamp;
CREATE UNIQUE INDEX raw_readings_meter_timestamp ON raw_readings (meter_id, timestamp);

ALTER TABLE alerts ADD COLUMN dedupe_key TEXT;
CREATE UNIQUE INDEX alerts_dedupe_key ON alerts (dedupe_key) WHERE dedupe_key IS NOT NULL;

CREATE TABLE outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    stage   TEXT NOT NULL,
    topic   TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   BLOB NOT NULL,
    headers TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX outbox_stage_seq ON outbox (stage, seq);

CREATE TABLE stream_checkpoints (
    consumer_group TEXT PRIMARY KEY NOT NULL,
    bus_id         TEXT NOT NULL,   -- the log the positions refer to
    positions      TEXT NOT NULL,   -- JSON [[topic, partition, next_offset], …]
    state          BLOB NOT NULL,   -- the stage's own encoding
    updated_at     TEXT NOT NULL
);
