-- The raw archive as batches: the archive stage's readings of one poll and
-- one partition are one row, their columns one JSON array per reading, so
-- archiving a reading appends its bytes to a blob instead of inserting it
-- into a b-tree (whose inserts, bound column by column, and the pages they
-- wrote twice (WAL, then checkpoint) were the largest single cost of the
-- embedded pipeline under `cargo xtask bench sustained`). `raw_readings`
-- stays the query surface: the view below unnests the batches with SQLite's
-- JSON functions, beside the rows of raw_reading_rows (written by the
-- store's row API and by files from before this migration).
--
-- A replay is told by its offset: `raw_archive_positions` holds, per bus
-- log (`Bus::log_id`: offsets start over in a new one, as a volatile bus
-- does in every process) and partition of telemetry-readings, the offset
-- after the last record archived, written in the transaction that
-- archives it.

CREATE TABLE raw_reading_batches (
    log_id       TEXT NOT NULL,      -- the bus log the offsets are in
    partition    INTEGER NOT NULL,   -- of telemetry-readings
    first_offset INTEGER NOT NULL,   -- of the first record archived here
    next_offset  INTEGER NOT NULL,   -- after the last record of the call
    first_ms     INTEGER NOT NULL,   -- oldest event time in the batch, ms
    last_ms      INTEGER NOT NULL,   -- newest event time in the batch, ms
    readings     INTEGER NOT NULL,   -- elements of `rows`
    created_at   INTEGER NOT NULL,   -- when archived, ms since the Unix epoch
    -- [timestamp_ms, meter_id, region, power_kw, voltage, current,
    --  frequency, power_factor, temperature, energy_kwh] per reading
    rows         TEXT NOT NULL
);

-- Retention deletes a batch once its newest reading is past the cutoff.
CREATE INDEX raw_reading_batches_last_ms ON raw_reading_batches (last_ms);

CREATE TABLE raw_archive_positions (
    log_id       TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    PRIMARY KEY (log_id, partition)
) WITHOUT ROWID;

DROP VIEW raw_readings;

CREATE VIEW raw_readings AS
SELECT meter_id,
       region,
       strftime('%Y-%m-%dT%H:%M:%fZ', timestamp / 1000.0, 'unixepoch') AS timestamp,
       power_kw, voltage, current, frequency, power_factor, temperature, energy_kwh,
       strftime('%Y-%m-%dT%H:%M:%fZ', created_at / 1000.0, 'unixepoch') AS created_at,
       timestamp AS timestamp_ms
FROM raw_reading_rows
UNION ALL
SELECT json_extract(r.value, '$[1]') AS meter_id,
       json_extract(r.value, '$[2]') AS region,
       strftime('%Y-%m-%dT%H:%M:%fZ', json_extract(r.value, '$[0]') / 1000.0, 'unixepoch')
           AS timestamp,
       CAST(json_extract(r.value, '$[3]') AS REAL) AS power_kw,
       CAST(json_extract(r.value, '$[4]') AS REAL) AS voltage,
       CAST(json_extract(r.value, '$[5]') AS REAL) AS current,
       CAST(json_extract(r.value, '$[6]') AS REAL) AS frequency,
       CAST(json_extract(r.value, '$[7]') AS REAL) AS power_factor,
       CAST(json_extract(r.value, '$[8]') AS REAL) AS temperature,
       CAST(json_extract(r.value, '$[9]') AS REAL) AS energy_kwh,
       strftime('%Y-%m-%dT%H:%M:%fZ', b.created_at / 1000.0, 'unixepoch') AS created_at,
       json_extract(r.value, '$[0]') AS timestamp_ms
FROM raw_reading_batches AS b, json_each(b.rows) AS r;
