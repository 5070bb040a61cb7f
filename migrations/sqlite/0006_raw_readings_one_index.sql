-- raw_readings with one index instead of two (issue 11: the archive set the
-- pace of the whole pipeline, and most of its cost was index upkeep).
--
-- The one key a reading needs is still unique (each reading once; a replayed
-- reading is ignored), now in the order (timestamp, meter_id): readings
-- arrive almost in time order, so new entries land at the end of the index
-- instead of all over it, and the retention job's `timestamp < ?` range is
-- a prefix of it, so the separate timestamp index is no longer needed.
-- Nothing reads raw_readings by meter (the read API serves aggregates).

DROP INDEX IF EXISTS raw_readings_meter_timestamp;
DROP INDEX IF EXISTS raw_readings_timestamp;
CREATE UNIQUE INDEX raw_readings_timestamp_meter ON raw_readings (timestamp, meter_id);
