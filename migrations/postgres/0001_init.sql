-- segs PostgreSQL store: the seed's schema, plus the time series and the
-- exactly-once tables of the SQLite store (migrations/sqlite/0001–0003),
-- in PostgreSQL types.
--
-- Conventions (see host/src/store/mod.rs and postgres.rs):
--   * timestamps are TIMESTAMPTZ (segs reads and writes them as epoch ms);
--   * closed vocabularies (severity, status, type, reason) are TEXT with a
--     CHECK listing them (host/src/messages.rs);
--   * JSON documents are JSONB; measurements and prices DOUBLE PRECISION
--     (as REAL in SQLite: what is stored is what is read back);
--   * counts are BIGINT, as SQLite's 64-bit INTEGER;
--   * text the read API sorts by is COLLATE "C": byte order, as SQLite,
--     whatever the database's locale.
-- Time-series tables carry their time column in every unique key, so that
-- they can become TimescaleDB hypertables; that step is not a migration (it
-- runs only when the extension exists, see postgres.rs).

-- ---------------------------------------------------------------- users

CREATE TABLE users (
    user_id          TEXT PRIMARY KEY,
    email            TEXT UNIQUE,
    name             TEXT,
    role             TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator', 'admin')),
    meter_id         TEXT,
    region           TEXT,
    email_verified   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    is_active        BOOLEAN NOT NULL DEFAULT TRUE,
    suspended_at     TIMESTAMPTZ,
    suspended_reason TEXT,
    last_login_at    TIMESTAMPTZ
);

CREATE INDEX users_region ON users (region);

-- --------------------------------------------------------------- meters

CREATE TABLE meters (
    meter_id     TEXT PRIMARY KEY,
    user_id      TEXT REFERENCES users (user_id) ON DELETE SET NULL,
    region       TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'faulty')),
    installed_at TIMESTAMPTZ,
    last_seen_at TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX meters_user ON meters (user_id);
CREATE INDEX meters_region ON meters (region);

-- -------------------------------------------------------------- tariffs

CREATE TABLE tariffs (
    tariff_id       TEXT COLLATE "C" PRIMARY KEY,
    -- Insertion order (SQLite's rowid): ties of effective_from.
    seq             BIGINT GENERATED ALWAYS AS IDENTITY,
    region          TEXT COLLATE "C" NOT NULL,
    time_of_day     TEXT,
    price_per_kwh   DOUBLE PRECISION NOT NULL,
    effective_from  TIMESTAMPTZ NOT NULL,
    effective_to    TIMESTAMPTZ,
    is_active       BOOLEAN NOT NULL DEFAULT TRUE,
    created_by      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Beyond the seed's table: the rest of the `tariff_updates` payload.
    previous_price  DOUBLE PRECISION,
    change_percent  DOUBLE PRECISION,
    load_percentage DOUBLE PRECISION,
    reason          TEXT NOT NULL
        CHECK (reason IN ('LOW_LOAD', 'NORMAL_LOAD', 'HIGH_LOAD', 'CRITICAL_LOAD'))
);

-- At most one active tariff per region.
CREATE UNIQUE INDEX tariffs_one_active_per_region ON tariffs (region) WHERE is_active;
CREATE INDEX tariffs_region_effective_from ON tariffs (region, effective_from DESC, seq DESC);
CREATE INDEX tariffs_effective_from ON tariffs (effective_from DESC, seq DESC);

-- Per-prefix sequence behind tariff ids `TRF-{PREFIX}-{n:06}`.
CREATE TABLE tariff_id_sequences (
    prefix     TEXT PRIMARY KEY,
    last_value BIGINT NOT NULL
);

CREATE TABLE tariff_rules (
    rule_id             TEXT PRIMARY KEY,
    region              TEXT,            -- NULL: every region
    name                TEXT NOT NULL,
    min_load_percentage DOUBLE PRECISION,
    max_load_percentage DOUBLE PRECISION,
    multiplier          DOUBLE PRECISION NOT NULL DEFAULT 1.0,
    base_price_per_kwh  DOUBLE PRECISION,
    time_of_day         TEXT NOT NULL DEFAULT 'all_day',
    priority            INTEGER NOT NULL DEFAULT 0,
    is_active           BOOLEAN NOT NULL DEFAULT TRUE,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX tariff_rules_region_active ON tariff_rules (region, is_active);

-- --------------------------------------------------------------- alerts

CREATE TABLE alerts (
    id              UUID PRIMARY KEY,
    -- Insertion order (SQLite's rowid): ties of timestamp and created_at.
    seq             BIGINT GENERATED ALWAYS AS IDENTITY,
    type            TEXT NOT NULL CHECK (type IN ('ANOMALY', 'OVERLOAD')),
    severity        TEXT NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    region          TEXT COLLATE "C",
    meter_id        TEXT COLLATE "C",
    message         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'acknowledged', 'resolved')),
    timestamp       TIMESTAMPTZ NOT NULL,
    acknowledged    BOOLEAN NOT NULL DEFAULT FALSE,
    acknowledged_by TEXT,
    acknowledged_at TIMESTAMPTZ,
    resolved_at     TIMESTAMPTZ,
    metadata        JSONB NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- At most one alert per `alert:dedupe:{subject}:{type}:{bucket}`.
    dedupe_key      TEXT
);

CREATE UNIQUE INDEX alerts_dedupe_key ON alerts (dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX alerts_timestamp ON alerts (timestamp DESC, created_at DESC, seq DESC);
CREATE INDEX alerts_status_timestamp ON alerts (status, timestamp DESC);
CREATE INDEX alerts_type_timestamp ON alerts (type, timestamp DESC);
CREATE INDEX alerts_region_timestamp ON alerts (region, timestamp DESC);
CREATE INDEX alerts_meter_timestamp ON alerts (meter_id, timestamp DESC);

-- ------------------------------------------------------------- invoices

CREATE TABLE invoices (
    invoice_id           TEXT PRIMARY KEY,
    user_id              TEXT REFERENCES users (user_id),
    billing_period_start TIMESTAMPTZ NOT NULL,
    billing_period_end   TIMESTAMPTZ NOT NULL,
    total_kwh            NUMERIC(12, 2) NOT NULL,
    total_amount         NUMERIC(12, 2) NOT NULL,
    currency             TEXT NOT NULL DEFAULT 'INR',
    status               TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'paid', 'overdue', 'cancelled')),
    due_date             TIMESTAMPTZ,
    paid_date            TIMESTAMPTZ,
    payment_method       TEXT,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX invoices_user_period ON invoices (user_id, billing_period_start);
CREATE INDEX invoices_status ON invoices (status);

CREATE TABLE invoice_line_items (
    line_item_id  BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    invoice_id    TEXT NOT NULL REFERENCES invoices (invoice_id) ON DELETE CASCADE,
    meter_id      TEXT,
    tariff_id     TEXT,
    period_start  TIMESTAMPTZ NOT NULL,
    period_end    TIMESTAMPTZ NOT NULL,
    description   TEXT,
    kwh           NUMERIC(12, 4) NOT NULL,
    price_per_kwh NUMERIC(10, 4) NOT NULL,
    amount        NUMERIC(12, 2) NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX invoice_line_items_invoice ON invoice_line_items (invoice_id);

-- ----------------------------------------------------------- audit_logs

CREATE TABLE audit_logs (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action     TEXT NOT NULL,       -- e.g. 'alert.acknowledged'
    entity     TEXT NOT NULL,       -- e.g. 'alert'
    entity_id  TEXT NOT NULL,
    actor      TEXT,
    details    JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX audit_logs_entity ON audit_logs (entity, entity_id);
CREATE INDEX audit_logs_created_at ON audit_logs (created_at);

-- ---------------------------------------------------------- time series

-- Each reading once: a replayed (meter_id, timestamp) is ignored.
CREATE TABLE raw_readings (
    reading_id   BIGINT GENERATED BY DEFAULT AS IDENTITY (CACHE 1000),
    meter_id     TEXT COLLATE "C" NOT NULL,
    region       TEXT COLLATE "C" NOT NULL,
    timestamp    TIMESTAMPTZ NOT NULL,
    power_kw     DOUBLE PRECISION NOT NULL,
    voltage      DOUBLE PRECISION,
    current      DOUBLE PRECISION,
    frequency    DOUBLE PRECISION,
    power_factor DOUBLE PRECISION,
    temperature  DOUBLE PRECISION,
    energy_kwh   DOUBLE PRECISION,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, timestamp)
);

CREATE INDEX raw_readings_timestamp ON raw_readings (timestamp);

-- Per-meter windows. Beyond the seed's columns: the running sums
-- (power_sum, voltage_sum, voltage_count) that let a late reading be merged
-- into a window that was already stored.
CREATE TABLE aggregates_1m (
    meter_id       TEXT COLLATE "C" NOT NULL,
    region         TEXT COLLATE "C" NOT NULL,
    window_start   TIMESTAMPTZ NOT NULL,
    avg_power_kw   DOUBLE PRECISION NOT NULL,
    max_power_kw   DOUBLE PRECISION NOT NULL,
    min_power_kw   DOUBLE PRECISION NOT NULL,
    energy_kwh_sum DOUBLE PRECISION NOT NULL,
    voltage_avg    DOUBLE PRECISION,
    count          BIGINT NOT NULL CHECK (count >= 0),
    power_sum      DOUBLE PRECISION NOT NULL,
    voltage_sum    DOUBLE PRECISION NOT NULL DEFAULT 0,
    voltage_count  BIGINT NOT NULL DEFAULT 0 CHECK (voltage_count >= 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, window_start)
);

CREATE INDEX aggregates_1m_window_start ON aggregates_1m (window_start);

CREATE TABLE aggregates_15m (
    meter_id       TEXT COLLATE "C" NOT NULL,
    region         TEXT COLLATE "C" NOT NULL,
    window_start   TIMESTAMPTZ NOT NULL,
    avg_power_kw   DOUBLE PRECISION NOT NULL,
    max_power_kw   DOUBLE PRECISION NOT NULL,
    min_power_kw   DOUBLE PRECISION NOT NULL,
    energy_kwh_sum DOUBLE PRECISION NOT NULL,
    voltage_avg    DOUBLE PRECISION,
    count          BIGINT NOT NULL CHECK (count >= 0),
    power_sum      DOUBLE PRECISION NOT NULL,
    voltage_sum    DOUBLE PRECISION NOT NULL DEFAULT 0,
    voltage_count  BIGINT NOT NULL DEFAULT 0 CHECK (voltage_count >= 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, window_start)
);

CREATE INDEX aggregates_15m_window_start ON aggregates_15m (window_start);

-- Per-region 1-minute windows, as published on `aggregates_1m_regional`.
CREATE TABLE aggregates_1m_regional (
    region            TEXT COLLATE "C" NOT NULL,
    window_start      TIMESTAMPTZ NOT NULL,
    meter_count       BIGINT NOT NULL CHECK (meter_count >= 0),
    total_consumption DOUBLE PRECISION NOT NULL,
    avg_consumption   DOUBLE PRECISION NOT NULL,
    max_consumption   DOUBLE PRECISION NOT NULL,
    min_consumption   DOUBLE PRECISION NOT NULL,
    load_percentage   DOUBLE PRECISION NOT NULL,
    active_meters     JSONB NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(active_meters) = 'array'),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (region, window_start)
);

CREATE INDEX aggregates_1m_regional_window_start ON aggregates_1m_regional (window_start);

-- --------------------------------------------------- state and delivery

-- State the host keeps on behalf of rule plugins between calls (e.g. the
-- overload rule's consecutive overloaded windows per region).
CREATE TABLE rule_state (
    rule       TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    value      BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rule, key)
);

-- Messages a stage derived, written in the same transaction as the rows
-- they describe, until they are published (ARCHITECTURE.md, "Exactly once").
CREATE TABLE outbox (
    seq     BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    stage   TEXT NOT NULL,
    topic   TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   BYTEA NOT NULL,
    headers JSONB NOT NULL DEFAULT '[]'
);
CREATE INDEX outbox_stage_seq ON outbox (stage, seq);

-- A stage's open windows and baselines with the bus positions they cover.
CREATE TABLE stream_checkpoints (
    consumer_group TEXT PRIMARY KEY,
    bus_id         TEXT NOT NULL,   -- the log the positions refer to
    positions      JSONB NOT NULL,  -- [[topic, partition, next_offset], …]
    state          BYTEA NOT NULL,  -- the stage's own encoding
    updated_at     TIMESTAMPTZ NOT NULL
);
