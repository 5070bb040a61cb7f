-- aggregates_1m and aggregates_15m keyed (window_start, meter_id) instead of
-- (meter_id, window_start) (issue 11: closing windows set the pace of the
-- stream stage).
--
-- A closed window writes one row per meter. Keyed by meter first, each of
-- those rows lands on its own meter's page, so a window of 33,000 meters
-- rewrote about 33,000 pages (4 KiB each into the WAL, and again at the WAL
-- checkpoint): about 25,000 rows/s once each meter had some history. Keyed
-- by window first, a window's rows are appended side by side: about ten
-- times that, measured with the same rows and pragmas. The separate
-- window_start index is now the key's prefix and goes.
--
-- A query for one meter walks the distinct window starts of its range along
-- the key (one seek each, see `meter_aggregates` in store/sqlite.rs), so it
-- needs no index by meter, which would scatter again.
--
-- The rows are copied once, here; a large table takes a while, once.

CREATE TABLE aggregates_1m_new (
    meter_id       TEXT NOT NULL,
    region         TEXT NOT NULL,
    window_start   TEXT NOT NULL,
    avg_power_kw   REAL NOT NULL,
    max_power_kw   REAL NOT NULL,
    min_power_kw   REAL NOT NULL,
    energy_kwh_sum REAL NOT NULL,
    voltage_avg    REAL,
    count          INTEGER NOT NULL CHECK (count >= 0),
    power_sum      REAL NOT NULL,
    voltage_sum    REAL NOT NULL DEFAULT 0,
    voltage_count  INTEGER NOT NULL DEFAULT 0 CHECK (voltage_count >= 0),
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (window_start, meter_id)
) WITHOUT ROWID;
INSERT INTO aggregates_1m_new
    (meter_id, region, window_start, avg_power_kw, max_power_kw, min_power_kw,
     energy_kwh_sum, voltage_avg, count, power_sum, voltage_sum, voltage_count,
     created_at, updated_at)
SELECT meter_id, region, window_start, avg_power_kw, max_power_kw, min_power_kw,
       energy_kwh_sum, voltage_avg, count, power_sum, voltage_sum, voltage_count,
       created_at, updated_at
FROM aggregates_1m ORDER BY window_start, meter_id;
DROP TABLE aggregates_1m;
ALTER TABLE aggregates_1m_new RENAME TO aggregates_1m;

CREATE TABLE aggregates_15m_new (
    meter_id       TEXT NOT NULL,
    region         TEXT NOT NULL,
    window_start   TEXT NOT NULL,
    avg_power_kw   REAL NOT NULL,
    max_power_kw   REAL NOT NULL,
    min_power_kw   REAL NOT NULL,
    energy_kwh_sum REAL NOT NULL,
    voltage_avg    REAL,
    count          INTEGER NOT NULL CHECK (count >= 0),
    power_sum      REAL NOT NULL,
    voltage_sum    REAL NOT NULL DEFAULT 0,
    voltage_count  INTEGER NOT NULL DEFAULT 0 CHECK (voltage_count >= 0),
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (window_start, meter_id)
) WITHOUT ROWID;
INSERT INTO aggregates_15m_new
    (meter_id, region, window_start, avg_power_kw, max_power_kw, min_power_kw,
     energy_kwh_sum, voltage_avg, count, power_sum, voltage_sum, voltage_count,
     created_at, updated_at)
SELECT meter_id, region, window_start, avg_power_kw, max_power_kw, min_power_kw,
       energy_kwh_sum, voltage_avg, count, power_sum, voltage_sum, voltage_count,
       created_at, updated_at
FROM aggregates_15m ORDER BY window_start, meter_id;
DROP TABLE aggregates_15m;
ALTER TABLE aggregates_15m_new RENAME TO aggregates_15m;
