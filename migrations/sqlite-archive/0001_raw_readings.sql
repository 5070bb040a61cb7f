-- The raw archive's own database file (`<store file stem>-raw.db`, beside the
-- store's file): raw_readings only, the widest write of segs (every reading).
--
-- It has a file of its own so that its writes never wait for the store's
-- write lock (the windows, checkpoints and outbox of the stages), nor the
-- stages' for its: SQLite has one writer per database file. Same columns
-- and key as raw_readings in the store's migrations (0001, 0006), which an
-- in-memory store still uses.

CREATE TABLE IF NOT EXISTS raw_readings (
    reading_id   INTEGER PRIMARY KEY,
    meter_id     TEXT NOT NULL,
    region       TEXT NOT NULL,
    timestamp    TEXT NOT NULL,
    power_kw     REAL NOT NULL,
    voltage      REAL,
    current      REAL,
    frequency    REAL,
    power_factor REAL,
    temperature  REAL,
    energy_kwh   REAL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Each reading once (a replayed reading is ignored), in time order: new
-- entries land at the end of the index, and retention's `timestamp < ?` is
-- a prefix of it.
CREATE UNIQUE INDEX IF NOT EXISTS raw_readings_timestamp_meter ON raw_readings (timestamp, meter_id);
