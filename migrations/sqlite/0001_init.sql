-- segs embedded store: the seed's logical schema in SQLite types.
--
-- Conventions (see host/src/store/mod.rs):
--   * timestamps are TEXT in the canonical fixed-width UTC form
--     '2025-11-12T06:30:00.000Z', so they sort and compare as text;
--   * booleans are INTEGER 0/1;
--   * JSON documents (metadata, details, active_meters) are TEXT;
--   * money and measurements are REAL.
-- The DEFAULT expression below yields that same canonical form, for rows
-- typed in by hand with sqlite3; segs itself always binds its timestamps.

-- ---------------------------------------------------------------- users

CREATE TABLE users (
    user_id          TEXT PRIMARY KEY NOT NULL,
    email            TEXT UNIQUE,
    name             TEXT,
    role             TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator', 'admin')),
    meter_id         TEXT,
    region           TEXT,
    email_verified   INTEGER NOT NULL DEFAULT 0 CHECK (email_verified IN (0, 1)),
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    is_active        INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    suspended_at     TEXT,
    suspended_reason TEXT,
    last_login_at    TEXT
);

CREATE INDEX users_region ON users (region);

-- --------------------------------------------------------------- meters

CREATE TABLE meters (
    meter_id     TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT REFERENCES users (user_id) ON DELETE SET NULL,
    region       TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'faulty')),
    installed_at TEXT,
    last_seen_at TEXT,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX meters_user ON meters (user_id);
CREATE INDEX meters_region ON meters (region);

-- -------------------------------------------------------------- tariffs

CREATE TABLE tariffs (
    tariff_id       TEXT PRIMARY KEY NOT NULL,
    region          TEXT NOT NULL,
    time_of_day     TEXT,
    price_per_kwh   REAL NOT NULL,
    effective_from  TEXT NOT NULL,
    effective_to    TEXT,
    is_active       INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    created_by      TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Beyond the seed's table: the rest of the `tariff_updates` payload.
    previous_price  REAL,
    change_percent  REAL,
    load_percentage REAL,
    reason          TEXT NOT NULL DEFAULT ''
);

-- At most one active tariff per region.
CREATE UNIQUE INDEX tariffs_one_active_per_region ON tariffs (region) WHERE is_active = 1;
CREATE INDEX tariffs_region_active ON tariffs (region, is_active);
CREATE INDEX tariffs_region_effective_from ON tariffs (region, effective_from);

-- Per-prefix sequence behind tariff ids `TRF-{PREFIX}-{n:06}`.
CREATE TABLE tariff_id_sequences (
    prefix     TEXT PRIMARY KEY NOT NULL,
    last_value INTEGER NOT NULL
);

CREATE TABLE tariff_rules (
    rule_id             TEXT PRIMARY KEY NOT NULL,
    region              TEXT,            -- NULL: every region
    name                TEXT NOT NULL,
    min_load_percentage REAL,
    max_load_percentage REAL,
    multiplier          REAL NOT NULL DEFAULT 1.0,
    base_price_per_kwh  REAL,
    time_of_day         TEXT NOT NULL DEFAULT 'all_day',
    priority            INTEGER NOT NULL DEFAULT 0,
    is_active           INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    created_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX tariff_rules_region_active ON tariff_rules (region, is_active);

-- --------------------------------------------------------------- alerts

CREATE TABLE alerts (
    id              TEXT PRIMARY KEY NOT NULL,   -- UUID, hyphenated lower case
    type            TEXT NOT NULL,
    severity        TEXT NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    region          TEXT,
    meter_id        TEXT,
    message         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'acknowledged', 'resolved')),
    timestamp       TEXT NOT NULL,
    acknowledged    INTEGER NOT NULL DEFAULT 0 CHECK (acknowledged IN (0, 1)),
    acknowledged_by TEXT,
    acknowledged_at TEXT,
    resolved_at     TEXT,
    metadata        TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX alerts_timestamp ON alerts (timestamp);
CREATE INDEX alerts_status_timestamp ON alerts (status, timestamp);
CREATE INDEX alerts_type_timestamp ON alerts (type, timestamp);
CREATE INDEX alerts_region_timestamp ON alerts (region, timestamp);
CREATE INDEX alerts_meter_timestamp ON alerts (meter_id, timestamp);

-- ------------------------------------------------------------- invoices

CREATE TABLE invoices (
    invoice_id           TEXT PRIMARY KEY NOT NULL,
    user_id              TEXT REFERENCES users (user_id),
    billing_period_start TEXT NOT NULL,
    billing_period_end   TEXT NOT NULL,
    total_kwh            REAL NOT NULL,
    total_amount         REAL NOT NULL,
    currency             TEXT NOT NULL DEFAULT 'INR',
    status               TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid', 'overdue', 'cancelled')),
    due_date             TEXT,
    paid_date            TEXT,
    payment_method       TEXT,
    created_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX invoices_user_period ON invoices (user_id, billing_period_start);
CREATE INDEX invoices_status ON invoices (status);

CREATE TABLE invoice_line_items (
    line_item_id  INTEGER PRIMARY KEY,
    invoice_id    TEXT NOT NULL REFERENCES invoices (invoice_id) ON DELETE CASCADE,
    meter_id      TEXT,
    tariff_id     TEXT,
    period_start  TEXT NOT NULL,
    period_end    TEXT NOT NULL,
    description   TEXT,
    kwh           REAL NOT NULL,
    price_per_kwh REAL NOT NULL,
    amount        REAL NOT NULL,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX invoice_line_items_invoice ON invoice_line_items (invoice_id);

-- ----------------------------------------------------------- audit_logs

CREATE TABLE audit_logs (
    id         INTEGER PRIMARY KEY,
    action     TEXT NOT NULL,       -- e.g. 'alert.acknowledged'
    entity     TEXT NOT NULL,       -- e.g. 'alert'
    entity_id  TEXT NOT NULL,
    actor      TEXT,
    details    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(details)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX audit_logs_entity ON audit_logs (entity, entity_id);
CREATE INDEX audit_logs_created_at ON audit_logs (created_at);

-- ---------------------------------------------------------- time series

CREATE TABLE raw_readings (
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

CREATE INDEX raw_readings_meter_timestamp ON raw_readings (meter_id, timestamp);
CREATE INDEX raw_readings_timestamp ON raw_readings (timestamp);

-- Per-meter windows. Beyond the seed's columns: the running sums
-- (power_sum, voltage_sum, voltage_count) that let a late reading be merged
-- into a window that was already stored.
CREATE TABLE aggregates_1m (
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
    PRIMARY KEY (meter_id, window_start)
) WITHOUT ROWID;

CREATE INDEX aggregates_1m_window_start ON aggregates_1m (window_start);

CREATE TABLE aggregates_15m (
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
    PRIMARY KEY (meter_id, window_start)
) WITHOUT ROWID;

CREATE INDEX aggregates_15m_window_start ON aggregates_15m (window_start);

-- Per-region 1-minute windows, as published on `aggregates_1m_regional`.
CREATE TABLE aggregates_1m_regional (
    region            TEXT NOT NULL,
    window_start      TEXT NOT NULL,
    meter_count       INTEGER NOT NULL CHECK (meter_count >= 0),
    total_consumption REAL NOT NULL,
    avg_consumption   REAL NOT NULL,
    max_consumption   REAL NOT NULL,
    min_consumption   REAL NOT NULL,
    load_percentage   REAL NOT NULL,
    active_meters     TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(active_meters)),
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (region, window_start)
) WITHOUT ROWID;

CREATE INDEX aggregates_1m_regional_window_start ON aggregates_1m_regional (window_start);
