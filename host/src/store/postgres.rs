//! The production store: [`Store`] over PostgreSQL through sqlx
//! (`postgres://…` / `postgresql://…`, e.g. `DATABASE_URL`), schema from
//! `migrations/postgres/`, applied on open. Semantics are the SQLite
//! store's, rule for rule (the shared ones live in [`super::rules`]); the
//! behaviour suite `host/tests/store.rs` runs against both.
//!
//! Owns the PostgreSQL-specific choices:
//! - **two modes, chosen at open.** When the server offers the
//!   `timescaledb` extension (`pg_available_extensions`), one DO block
//!   creates it and turns the time series (raw_readings, aggregates_1m,
//!   aggregates_15m, aggregates_1m_regional) into hypertables with 1-day
//!   chunks, compression after 7 days and retention policies from the
//!   configured [`Retention`]; [`Store::apply_retention`] then leaves the
//!   deleting to TimescaleDB. Otherwise (or if that block fails, e.g. the
//!   library is not preloaded) the tables stay plain and
//!   [`Store::apply_retention`] deletes expired rows in batches, as SQLite
//!   does. One log line at open says which mode is in use.
//! - **batched writes:** readings, windows, regional windows, rule state and
//!   outbox rows are sent as one array per column and inserted with
//!   `UNNEST` — one statement per [`CHUNK_ROWS`] rows, never one per row.
//! - read-committed transactions; an alert change locks its row
//!   (`SELECT … FOR UPDATE`), a tariff locks its id sequence row, so
//!   concurrent writers serialize where SQLite's `BEGIN IMMEDIATE` would.
//! - timestamps are `timestamptz` (epoch ms on the Rust side), JSON is
//!   `jsonb`, a NaN is bound as NULL (what SQLite stores for it), so a NaN
//!   in a NOT NULL column is refused by both.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::InvoiceFilter;
use super::rules::{AlertChange, last_entry_wins, regional_key, tariff_id, tariff_prefix};
use super::{
    AggregateQuery, AlertFilter, AlertRow, Applied, Checkpoint, Effects, MeterAggregate, NewAlert,
    NewTariff, NotificationLog, OutboxBuilder, OutboxRecord, RawReading, RegionalAggregate,
    Retention, RetentionReport, RuleState, Store, StoreError, StoreOptions, TariffRow, Transition,
    WindowWidth, merge_duplicate_windows,
};
use crate::billing::Invoice;
use crate::bus::Topic;
use crate::messages::KeyedMessage;
use crate::time::{format_rfc3339_ms, now_ms};

/// Rows per batched statement, at most.
pub const CHUNK_ROWS: usize = 10_000;
/// Rows deleted per statement by the retention job (plain mode).
const RETENTION_BATCH: i64 = 20_000;
const POOL_CONNECTIONS: u32 = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TimescaleDB compresses chunks older than this.
const COMPRESS_AFTER: &str = "7 days";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// How the time series are kept, decided at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Hypertables, compression and retention policies (the extension's
    /// version).
    TimescaleDb { version: String },
    /// Plain tables; segs deletes expired rows itself.
    Plain,
}

/// The PostgreSQL implementation of [`Store`].
pub struct PostgresStore {
    pool: PgPool,
    retention: Retention,
    mode: Mode,
}

impl PostgresStore {
    /// Connects to the database at `url`, applies the migrations and, when
    /// TimescaleDB is available, the hypertable step. Errors name the
    /// server (host:port, database, user), never the password.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let password = super::url_password(url);
        let hide = |s: String| match &password {
            Some(p) if !p.is_empty() => s.replace(p.as_str(), "***"),
            _ => s,
        };
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::InvalidUrl(hide(format!("{}: {e}", super::redact_url(url)))))?
            .application_name("segs");
        let target = format!(
            "PostgreSQL at {}:{} (database {}, user {})",
            connect.get_host(),
            connect.get_port(),
            connect.get_database().unwrap_or(connect.get_username()),
            connect.get_username()
        );
        let connect_err = |source: sqlx::Error| StoreError::Connect {
            target: target.clone(),
            source,
        };
        // One direct connection first: it fails fast and names the server,
        // where a pool would retry until its acquire timeout.
        let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&connect))
            .await
            .map_err(|_| connect_err(sqlx::Error::PoolTimedOut))?
            .map_err(connect_err)?;
        MIGRATOR.run(&mut conn).await?;
        let mode = enable_timescaledb(&mut conn, &options.retention).await?;
        match &mode {
            Mode::TimescaleDb { version } => tracing::info!(
                "store: {target}: timescaledb {version}: hypertables, compression, \
                 retention policies"
            ),
            Mode::Plain => tracing::info!(
                "store: {target}: plain PostgreSQL: segs deletes expired rows itself"
            ),
        }
        conn.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .connect_lazy_with(connect);
        Ok(PostgresStore {
            pool,
            retention: options.retention,
            mode,
        })
    }

    /// The underlying pool (for tests and diagnostics).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The mode chosen at open.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }
}

// ------------------------------------------------------------ TimescaleDB

/// The TimescaleDB step as one DO block: create the extension, turn the
/// time series into hypertables (1-day chunks), enable compression (once)
/// with a policy after [`COMPRESS_AFTER`], and replace the retention
/// policies with `retention`'s. With `run` false the block parses and
/// returns at once: a plain server can check its syntax.
pub fn timescaledb_block(retention: &Retention, run: bool) -> String {
    let mut body = String::new();
    body.push_str(&format!("  IF NOT {run} THEN RETURN; END IF;\n"));
    body.push_str("  CREATE EXTENSION IF NOT EXISTS timescaledb;\n");
    let tables = [
        (
            "raw_readings",
            "timestamp",
            "meter_id",
            retention.raw_readings,
        ),
        (
            "aggregates_1m",
            "window_start",
            "meter_id",
            retention.aggregates_1m,
        ),
        (
            "aggregates_15m",
            "window_start",
            "meter_id",
            retention.aggregates_15m,
        ),
        (
            "aggregates_1m_regional",
            "window_start",
            "region",
            retention.aggregates_1m,
        ),
    ];
    for (table, time, segment, keep) in tables {
        let keep_s = keep.as_secs().max(1);
        body.push_str(&format!(
            "  PERFORM create_hypertable('{table}', '{time}', \
             chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE, \
             migrate_data => TRUE, create_default_indexes => FALSE);\n\
             \x20 IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables \
             WHERE hypertable_name = '{table}' AND compression_enabled) THEN\n\
             \x20   ALTER TABLE {table} SET (timescaledb.compress, \
             timescaledb.compress_segmentby = '{segment}', \
             timescaledb.compress_orderby = '{time} DESC');\n\
             \x20 END IF;\n\
             \x20 PERFORM add_compression_policy('{table}', INTERVAL '{COMPRESS_AFTER}', \
             if_not_exists => TRUE);\n\
             \x20 PERFORM remove_retention_policy('{table}', if_exists => TRUE);\n\
             \x20 PERFORM add_retention_policy('{table}', INTERVAL '{keep_s} seconds');\n"
        ));
    }
    format!("DO $segs$\nBEGIN\n{body}END\n$segs$")
}

/// Applies the TimescaleDB step when the server offers the extension.
async fn enable_timescaledb(
    conn: &mut PgConnection,
    retention: &Retention,
) -> Result<Mode, StoreError> {
    let available: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
            .fetch_optional(&mut *conn)
            .await?;
    if available.is_none() {
        return Ok(Mode::Plain);
    }
    if let Err(e) = sqlx::query(&timescaledb_block(retention, true))
        .execute(&mut *conn)
        .await
    {
        tracing::warn!(
            "store: the timescaledb extension is installed but could not be set up ({e}); \
             keeping plain tables"
        );
        return Ok(Mode::Plain);
    }
    let version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            .fetch_one(&mut *conn)
            .await?;
    Ok(Mode::TimescaleDb { version })
}

// ------------------------------------------------------------ statements

const RAW_INSERT: &str = "INSERT INTO raw_readings (meter_id, region, timestamp, power_kw, \
     voltage, current, frequency, power_factor, temperature, energy_kwh) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::float8[], \
     $5::float8[], $6::float8[], $7::float8[], $8::float8[], $9::float8[], $10::float8[]) \
     ON CONFLICT DO NOTHING";

const AGG_COLUMNS: &str = "meter_id, region, window_start, avg_power_kw, max_power_kw, \
     min_power_kw, energy_kwh_sum, voltage_avg, count, power_sum, voltage_sum, voltage_count";

fn agg_upsert(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS t ({AGG_COLUMNS}, created_at, updated_at) \
         SELECT u.*, $13, $13 FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], \
         $4::float8[], $5::float8[], $6::float8[], $7::float8[], $8::float8[], $9::int8[], \
         $10::float8[], $11::float8[], $12::int8[]) AS u \
         ON CONFLICT (meter_id, window_start) DO UPDATE SET \
         count = t.count + excluded.count, \
         power_sum = t.power_sum + excluded.power_sum, \
         voltage_sum = t.voltage_sum + excluded.voltage_sum, \
         voltage_count = t.voltage_count + excluded.voltage_count, \
         energy_kwh_sum = t.energy_kwh_sum + excluded.energy_kwh_sum, \
         max_power_kw = GREATEST(t.max_power_kw, excluded.max_power_kw), \
         min_power_kw = LEAST(t.min_power_kw, excluded.min_power_kw), \
         avg_power_kw = CASE WHEN t.count + excluded.count > 0 \
             THEN (t.power_sum + excluded.power_sum) / (t.count + excluded.count) \
             ELSE t.avg_power_kw END, \
         voltage_avg = CASE WHEN t.voltage_count + excluded.voltage_count > 0 \
             THEN (t.voltage_sum + excluded.voltage_sum) \
                  / (t.voltage_count + excluded.voltage_count) \
             ELSE NULL END, \
         updated_at = excluded.updated_at \
         RETURNING {AGG_COLUMNS}"
    )
}

const REGIONAL_COLUMNS: &str = "region, window_start, meter_count, total_consumption, \
     avg_consumption, max_consumption, min_consumption, load_percentage, active_meters";

const REGIONAL_UPSERT: &str = "INSERT INTO aggregates_1m_regional (region, window_start, \
     meter_count, total_consumption, avg_consumption, max_consumption, min_consumption, \
     load_percentage, active_meters, created_at) \
     SELECT u.region, u.window_start, u.meter_count, u.total, u.avg, u.max, u.min, u.load, \
     u.active::jsonb, $10 FROM UNNEST($1::text[], $2::timestamptz[], $3::int8[], \
     $4::float8[], $5::float8[], $6::float8[], $7::float8[], $8::float8[], $9::text[]) \
     AS u(region, window_start, meter_count, total, avg, max, min, load, active) \
     ON CONFLICT (region, window_start) DO UPDATE SET \
     meter_count = excluded.meter_count, \
     total_consumption = excluded.total_consumption, \
     avg_consumption = excluded.avg_consumption, \
     max_consumption = excluded.max_consumption, \
     min_consumption = excluded.min_consumption, \
     load_percentage = excluded.load_percentage, \
     active_meters = excluded.active_meters";

const ALERT_COLUMNS: &str = "id, type, severity, region, meter_id, message, status, timestamp, \
     acknowledged, acknowledged_by, acknowledged_at, resolved_at, metadata, created_at, updated_at, \
     rule_name, rule_version, rule_sha256";

const TARIFF_COLUMNS: &str = "tariff_id, region, time_of_day, price_per_kwh, effective_from, \
     effective_to, is_active, created_by, created_at, updated_at, previous_price, \
     change_percent, load_percentage, reason, rule_name, rule_version, rule_sha256";

// --------------------------------------------------------------- encoding

/// Epoch ms as a `timestamptz`.
fn at(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Rejected(format!("timestamp {ms} ms is out of range")))
}

/// A float as SQLite stores it: NaN has no value (NULL).
fn real(x: f64) -> Option<f64> {
    (!x.is_nan()).then_some(x)
}

fn real_opt(x: Option<f64>) -> Option<f64> {
    x.and_then(real)
}

// --------------------------------------------------------------- decoding

fn ts(row: &PgRow, column: &'static str) -> Result<i64, StoreError> {
    Ok(row.try_get::<DateTime<Utc>, _>(column)?.timestamp_millis())
}

fn ts_opt(row: &PgRow, column: &'static str) -> Result<Option<i64>, StoreError> {
    Ok(row
        .try_get::<Option<DateTime<Utc>>, _>(column)?
        .map(|t| t.timestamp_millis()))
}

/// A closed-vocabulary column (severity, status, …) read into its enum.
fn vocabulary<V: FromStr>(
    row: &PgRow,
    table: &'static str,
    column: &'static str,
) -> Result<V, StoreError> {
    let s: &str = row.try_get(column)?;
    s.parse().map_err(|_| StoreError::Corrupt {
        table,
        column,
        value: s.to_owned(),
    })
}

fn u32_col(row: &PgRow, table: &'static str, column: &'static str) -> Result<u32, StoreError> {
    let v: i64 = row.try_get(column)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        column,
        value: v.to_string(),
    })
}

fn count_col(v: i64, table: &'static str, column: &'static str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        column,
        value: v.to_string(),
    })
}

fn json_col<T: serde::de::DeserializeOwned>(
    row: &PgRow,
    table: &'static str,
    column: &'static str,
) -> Result<T, StoreError> {
    let v: serde_json::Value = row.try_get(column)?;
    serde_json::from_value(v.clone()).map_err(|_| StoreError::Corrupt {
        table,
        column,
        value: v.to_string(),
    })
}

fn meter_aggregate(row: &PgRow, table: &'static str) -> Result<MeterAggregate, StoreError> {
    Ok(MeterAggregate {
        meter_id: row.try_get("meter_id")?,
        region: row.try_get("region")?,
        window_start_ms: ts(row, "window_start")?,
        avg_power_kw: row.try_get("avg_power_kw")?,
        max_power_kw: row.try_get("max_power_kw")?,
        min_power_kw: row.try_get("min_power_kw")?,
        energy_kwh_sum: row.try_get("energy_kwh_sum")?,
        voltage_avg: row.try_get("voltage_avg")?,
        count: u32_col(row, table, "count")?,
        power_sum: row.try_get("power_sum")?,
        voltage_sum: row.try_get("voltage_sum")?,
        voltage_count: u32_col(row, table, "voltage_count")?,
    })
}

fn regional_aggregate(row: &PgRow) -> Result<RegionalAggregate, StoreError> {
    const T: &str = "aggregates_1m_regional";
    Ok(RegionalAggregate {
        region: row.try_get("region")?,
        window_start_ms: ts(row, "window_start")?,
        meter_count: u32_col(row, T, "meter_count")?,
        total_consumption: row.try_get("total_consumption")?,
        avg_consumption: row.try_get("avg_consumption")?,
        max_consumption: row.try_get("max_consumption")?,
        min_consumption: row.try_get("min_consumption")?,
        load_percentage: row.try_get("load_percentage")?,
        active_meters: json_col(row, T, "active_meters")?,
    })
}

fn alert_row(row: &PgRow) -> Result<AlertRow, StoreError> {
    const T: &str = "alerts";
    Ok(AlertRow {
        id: row.try_get("id")?,
        alert_type: vocabulary(row, T, "type")?,
        severity: vocabulary(row, T, "severity")?,
        region: row.try_get("region")?,
        meter_id: row.try_get("meter_id")?,
        message: row.try_get("message")?,
        status: vocabulary(row, T, "status")?,
        timestamp_ms: ts(row, "timestamp")?,
        acknowledged: row.try_get("acknowledged")?,
        acknowledged_by: row.try_get("acknowledged_by")?,
        acknowledged_at_ms: ts_opt(row, "acknowledged_at")?,
        resolved_at_ms: ts_opt(row, "resolved_at")?,
        metadata: row.try_get("metadata")?,
        created_at_ms: ts(row, "created_at")?,
        updated_at_ms: ts(row, "updated_at")?,
        rule: super::rows::rule_ref(row)?,
    })
}

fn tariff_row(row: &PgRow) -> Result<TariffRow, StoreError> {
    const T: &str = "tariffs";
    Ok(TariffRow {
        tariff_id: row.try_get("tariff_id")?,
        region: row.try_get("region")?,
        time_of_day: row.try_get("time_of_day")?,
        price_per_kwh: row.try_get("price_per_kwh")?,
        effective_from_ms: ts(row, "effective_from")?,
        effective_to_ms: ts_opt(row, "effective_to")?,
        is_active: row.try_get("is_active")?,
        created_by: row.try_get("created_by")?,
        created_at_ms: ts(row, "created_at")?,
        updated_at_ms: ts(row, "updated_at")?,
        previous_price: row.try_get("previous_price")?,
        change_percent: row.try_get("change_percent")?,
        load_percentage: row.try_get("load_percentage")?,
        reason: vocabulary(row, T, "reason")?,
        rule: super::rows::rule_ref(row)?,
    })
}

// ------------------------------------------------- writes in a transaction
//
// Each write exists once, on a connection inside a transaction, so that the
// single-purpose `Store` methods and `Store::apply` run the same SQL.

async fn insert_raw_readings(
    tx: &mut PgConnection,
    readings: &[RawReading],
) -> Result<(), StoreError> {
    for chunk in readings.chunks(CHUNK_ROWS) {
        let n = chunk.len();
        let mut meter = Vec::with_capacity(n);
        let mut region = Vec::with_capacity(n);
        let mut time = Vec::with_capacity(n);
        let mut power = Vec::with_capacity(n);
        let mut voltage = Vec::with_capacity(n);
        let mut current = Vec::with_capacity(n);
        let mut frequency = Vec::with_capacity(n);
        let mut power_factor = Vec::with_capacity(n);
        let mut temperature = Vec::with_capacity(n);
        let mut energy = Vec::with_capacity(n);
        for r in chunk {
            meter.push(r.meter_id.as_str());
            region.push(r.region.as_str());
            time.push(at(r.timestamp_ms)?);
            power.push(real(r.power_kw));
            voltage.push(real_opt(r.voltage));
            current.push(real_opt(r.current));
            frequency.push(real_opt(r.frequency));
            power_factor.push(real_opt(r.power_factor));
            temperature.push(real_opt(r.temperature));
            energy.push(real_opt(r.energy_kwh));
        }
        // Each reading once: (meter_id, timestamp) is the primary key, and a
        // replayed reading is ignored.
        sqlx::query(RAW_INSERT)
            .bind(meter)
            .bind(region)
            .bind(time)
            .bind(power)
            .bind(voltage)
            .bind(current)
            .bind(frequency)
            .bind(power_factor)
            .bind(temperature)
            .bind(energy)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn upsert_meter_aggregates(
    tx: &mut PgConnection,
    width: WindowWidth,
    aggs: &[MeterAggregate],
) -> Result<Vec<MeterAggregate>, StoreError> {
    if aggs.is_empty() {
        return Ok(Vec::new());
    }
    let table = width.table();
    let merged = merge_duplicate_windows(aggs);
    let sql = agg_upsert(table);
    let now = at(now_ms())?;
    let mut out = Vec::with_capacity(merged.len());
    for chunk in merged.chunks(CHUNK_ROWS) {
        let n = chunk.len();
        let mut meter = Vec::with_capacity(n);
        let mut region = Vec::with_capacity(n);
        let mut start = Vec::with_capacity(n);
        let mut avg = Vec::with_capacity(n);
        let mut max = Vec::with_capacity(n);
        let mut min = Vec::with_capacity(n);
        let mut energy = Vec::with_capacity(n);
        let mut voltage_avg = Vec::with_capacity(n);
        let mut count = Vec::with_capacity(n);
        let mut power_sum = Vec::with_capacity(n);
        let mut voltage_sum = Vec::with_capacity(n);
        let mut voltage_count = Vec::with_capacity(n);
        for a in chunk {
            meter.push(a.meter_id.as_str());
            region.push(a.region.as_str());
            start.push(at(a.window_start_ms)?);
            avg.push(real(a.avg_power_kw));
            max.push(real(a.max_power_kw));
            min.push(real(a.min_power_kw));
            energy.push(real(a.energy_kwh_sum));
            voltage_avg.push(real_opt(a.voltage_avg));
            count.push(i64::from(a.count));
            power_sum.push(real(a.power_sum));
            voltage_sum.push(real(a.voltage_sum));
            voltage_count.push(i64::from(a.voltage_count));
        }
        let rows = sqlx::query(&sql)
            .bind(meter)
            .bind(region)
            .bind(start)
            .bind(avg)
            .bind(max)
            .bind(min)
            .bind(energy)
            .bind(voltage_avg)
            .bind(count)
            .bind(power_sum)
            .bind(voltage_sum)
            .bind(voltage_count)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        // RETURNING promises no order: put the rows back in input order.
        let mut stored: HashMap<(String, i64), MeterAggregate> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let a = meter_aggregate(row, table)?;
            stored.insert((a.meter_id.clone(), a.window_start_ms), a);
        }
        for a in chunk {
            let key = (a.meter_id.clone(), a.window_start_ms);
            let row = stored.remove(&key).ok_or_else(|| StoreError::Corrupt {
                table,
                column: "window_start",
                value: format!(
                    "upsert returned no row for {} @ {}",
                    a.meter_id,
                    format_rfc3339_ms(a.window_start_ms)
                ),
            })?;
            out.push(row);
        }
    }
    Ok(out)
}

async fn upsert_regional_aggregates(
    tx: &mut PgConnection,
    aggs: &[RegionalAggregate],
) -> Result<(), StoreError> {
    if aggs.is_empty() {
        return Ok(());
    }
    // The last entry for a key wins, as it would in the table (and one
    // statement must not touch a row twice).
    let unique = last_entry_wins(aggs, regional_key);
    let now = at(now_ms())?;
    for chunk in unique.chunks(CHUNK_ROWS) {
        let n = chunk.len();
        let mut region = Vec::with_capacity(n);
        let mut start = Vec::with_capacity(n);
        let mut meter_count = Vec::with_capacity(n);
        let mut total = Vec::with_capacity(n);
        let mut avg = Vec::with_capacity(n);
        let mut max = Vec::with_capacity(n);
        let mut min = Vec::with_capacity(n);
        let mut load = Vec::with_capacity(n);
        let mut active = Vec::with_capacity(n);
        for a in chunk {
            region.push(a.region.as_str());
            start.push(at(a.window_start_ms)?);
            meter_count.push(i64::from(a.meter_count));
            total.push(real(a.total_consumption));
            avg.push(real(a.avg_consumption));
            max.push(real(a.max_consumption));
            min.push(real(a.min_consumption));
            load.push(real(a.load_percentage));
            active.push(serde_json::to_string(&a.active_meters)?);
        }
        sqlx::query(REGIONAL_UPSERT)
            .bind(region)
            .bind(start)
            .bind(meter_count)
            .bind(total)
            .bind(avg)
            .bind(max)
            .bind(min)
            .bind(load)
            .bind(active)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Inserts an `active` alert; `None` when one with the same id or the same
/// dedupe key is already stored (nothing is written then).
async fn insert_alert(
    tx: &mut PgConnection,
    alert: &NewAlert,
) -> Result<Option<AlertRow>, StoreError> {
    let metadata = if alert.metadata.is_null() {
        serde_json::json!({})
    } else {
        alert.metadata.clone()
    };
    let now = at(now_ms())?;
    let sql = format!(
        "INSERT INTO alerts (id, type, severity, region, meter_id, message, status, \
         timestamp, acknowledged, metadata, created_at, updated_at, dedupe_key, \
         rule_name, rule_version, rule_sha256) \
         VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, FALSE, $8, $9, $9, $10, $11, $12, $13) \
         ON CONFLICT DO NOTHING RETURNING {ALERT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(alert.id)
        .bind(alert.alert_type.as_str())
        .bind(alert.severity.as_str())
        .bind(&alert.region)
        .bind(&alert.meter_id)
        .bind(&alert.message)
        .bind(at(alert.timestamp_ms)?)
        .bind(metadata)
        .bind(now)
        .bind(&alert.dedupe_key)
        .bind(alert.rule.as_ref().map(|r| r.name.as_str()))
        .bind(alert.rule.as_ref().map(|r| r.version as i64))
        .bind(alert.rule.as_ref().map(|r| r.sha256.as_str()))
        .fetch_optional(&mut *tx)
        .await?;
    row.as_ref().map(alert_row).transpose()
}

async fn insert_tariff(tx: &mut PgConnection, tariff: &NewTariff) -> Result<TariffRow, StoreError> {
    let prefix = tariff_prefix(&tariff.region);
    let from = at(tariff.effective_from_ms)?;
    let now = at(now_ms())?;
    // Locks the prefix's row until commit: tariffs of one region (one
    // prefix) are allocated one after the other.
    let n: i64 = sqlx::query_scalar(
        "INSERT INTO tariff_id_sequences (prefix, last_value) VALUES ($1, 1) \
         ON CONFLICT (prefix) DO UPDATE SET last_value = tariff_id_sequences.last_value + 1 \
         RETURNING last_value",
    )
    .bind(&prefix)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE tariffs SET is_active = FALSE, effective_to = $1, updated_at = $2 \
         WHERE region = $3 AND is_active",
    )
    .bind(from)
    .bind(now)
    .bind(&tariff.region)
    .execute(&mut *tx)
    .await?;
    let insert = format!(
        "INSERT INTO tariffs ({TARIFF_COLUMNS}) \
         VALUES ($1, $2, 'all_day', $3, $4, NULL, TRUE, 'segs', $5, $5, $6, $7, $8, $9, \
         $10, $11, $12) \
         RETURNING {TARIFF_COLUMNS}"
    );
    let row = sqlx::query(&insert)
        .bind(tariff_id(&prefix, n))
        .bind(&tariff.region)
        .bind(real(tariff.price_per_kwh))
        .bind(from)
        .bind(now)
        .bind(real_opt(tariff.previous_price))
        .bind(real_opt(tariff.change_percent))
        .bind(real_opt(tariff.load_percentage))
        .bind(tariff.reason.as_str())
        .bind(tariff.rule.as_ref().map(|r| r.name.as_str()))
        .bind(tariff.rule.as_ref().map(|r| r.version as i64))
        .bind(tariff.rule.as_ref().map(|r| r.sha256.as_str()))
        .fetch_one(&mut *tx)
        .await?;
    tariff_row(&row)
}

async fn save_rule_state(tx: &mut PgConnection, state: &[RuleState]) -> Result<(), StoreError> {
    if state.is_empty() {
        return Ok(());
    }
    let unique = last_entry_wins(state, |s| (s.rule.as_str(), s.key.as_str()));
    let now = at(now_ms())?;
    for chunk in unique.chunks(CHUNK_ROWS) {
        let rule: Vec<&str> = chunk.iter().map(|s| s.rule.as_str()).collect();
        let key: Vec<&str> = chunk.iter().map(|s| s.key.as_str()).collect();
        let value: Vec<i64> = chunk.iter().map(|s| s.value).collect();
        sqlx::query(
            "INSERT INTO rule_state (rule, key, value, updated_at) \
             SELECT u.rule, u.key, u.value, $4 \
             FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS u(rule, key, value) \
             ON CONFLICT (rule, key) DO UPDATE SET value = excluded.value, \
             updated_at = excluded.updated_at",
        )
        .bind(rule)
        .bind(key)
        .bind(value)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn save_checkpoint(tx: &mut PgConnection, cp: &Checkpoint) -> Result<(), StoreError> {
    let positions = serde_json::to_value(&cp.positions)?;
    let updated_at = at(now_ms())?;
    let done = if cp.epoch == 0 {
        sqlx::query(
            "INSERT INTO stream_checkpoints (consumer_group, bus_id, positions, state, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer_group) DO UPDATE SET \
             bus_id = excluded.bus_id, positions = excluded.positions, \
             state = excluded.state, updated_at = excluded.updated_at",
        )
        .bind(&cp.group)
        .bind(&cp.bus_id)
        .bind(positions)
        .bind(cp.state.as_slice())
        .bind(updated_at)
        .execute(&mut *tx)
        .await?
    } else {
        sqlx::query(
            "UPDATE stream_checkpoints SET bus_id = $1, positions = $2, state = $3, \
             updated_at = $4 WHERE consumer_group = $5 AND epoch = $6",
        )
        .bind(&cp.bus_id)
        .bind(positions)
        .bind(cp.state.as_slice())
        .bind(updated_at)
        .bind(&cp.group)
        .bind(cp.epoch)
        .execute(&mut *tx)
        .await?
    };
    if done.rows_affected() == 0 {
        return Err(StoreError::Fenced {
            group: cp.group.clone(),
            epoch: cp.epoch,
        });
    }
    Ok(())
}

/// The group's checkpoint; `None` when there is none, or only a claim.
async fn load_checkpoint(
    conn: &mut PgConnection,
    group: &str,
) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query(
        "SELECT bus_id, positions, state, epoch FROM stream_checkpoints \
         WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let state: Vec<u8> = row.try_get("state")?;
    if state.is_empty() {
        return Ok(None);
    }
    Ok(Some(Checkpoint {
        group: group.to_owned(),
        epoch: row.try_get("epoch")?,
        bus_id: row.try_get("bus_id")?,
        positions: json_col(&row, "stream_checkpoints", "positions")?,
        state,
    }))
}

/// Writes `messages` to the stage's outbox; their seqs increase in order.
async fn insert_outbox(
    tx: &mut PgConnection,
    stage: &str,
    messages: Vec<KeyedMessage>,
) -> Result<Vec<OutboxRecord>, StoreError> {
    let mut records = Vec::with_capacity(messages.len());
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let chunk: Vec<KeyedMessage> = messages.by_ref().take(CHUNK_ROWS).collect();
        // Allocate the seqs first, so that which seq is whose does not hang
        // on the order an INSERT … SELECT happens to produce rows in.
        let mut seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('outbox', 'seq')) \
             FROM generate_series(1, $1)",
        )
        .bind(chunk.len() as i64)
        .fetch_all(&mut *tx)
        .await?;
        seqs.sort_unstable();
        let topic: Vec<&str> = chunk.iter().map(|m| m.topic.name()).collect();
        let key: Vec<&str> = chunk.iter().map(|m| m.key.as_str()).collect();
        let value: Vec<&[u8]> = chunk.iter().map(|m| m.value.as_slice()).collect();
        let headers: Vec<String> = chunk
            .iter()
            .map(|m| serde_json::to_string(&m.headers))
            .collect::<Result<_, _>>()?;
        sqlx::query(
            "INSERT INTO outbox (seq, stage, topic, key, value, headers) \
             SELECT u.seq, $6, u.topic, u.key, u.value, u.headers::jsonb \
             FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::bytea[], $5::text[]) \
             AS u(seq, topic, key, value, headers)",
        )
        .bind(&seqs)
        .bind(topic)
        .bind(key)
        .bind(value)
        .bind(headers)
        .bind(stage)
        .execute(&mut *tx)
        .await?;
        records.extend(
            seqs.into_iter()
                .zip(chunk)
                .map(|(seq, message)| OutboxRecord { seq, message }),
        );
    }
    Ok(records)
}

// ---------------------------------------------------------- alert changes

impl PostgresStore {
    async fn change_alert(
        &self,
        id: Uuid,
        change: AlertChange<'_>,
        at_ms: i64,
    ) -> Result<Transition, StoreError> {
        let when = at(at_ms)?;
        let now = at(now_ms())?;
        let mut tx = self.pool.begin().await?;
        // The row lock makes concurrent changes of one alert take turns: the
        // second one reads the first one's result.
        let select = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1 FOR UPDATE");
        let Some(current) = sqlx::query(&select)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Transition::NotFound);
        };
        let current = alert_row(&current)?;
        if let Some(done) = change.check(&current) {
            return Ok(done);
        }
        let updated = match change {
            AlertChange::Acknowledge { by } => {
                let sql = format!(
                    "UPDATE alerts SET status = 'acknowledged', acknowledged = TRUE, \
                     acknowledged_by = $1, acknowledged_at = $2, updated_at = $3 \
                     WHERE id = $4 AND status IN ('active') RETURNING {ALERT_COLUMNS}"
                );
                sqlx::query(&sql)
                    .bind(by)
                    .bind(when)
                    .bind(now)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            AlertChange::Resolve => {
                let sql = format!(
                    "UPDATE alerts SET status = 'resolved', resolved_at = $1, updated_at = $2 \
                     WHERE id = $3 AND status IN ('active', 'acknowledged') \
                     RETURNING {ALERT_COLUMNS}"
                );
                sqlx::query(&sql)
                    .bind(when)
                    .bind(now)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let Some(updated) = updated else {
            // Unreachable while the transaction holds the row lock; report
            // what is there rather than guess.
            return Ok(Transition::Refused {
                status: current.status,
            });
        };
        let row = alert_row(&updated)?;
        sqlx::query(
            "INSERT INTO audit_logs (action, entity, entity_id, actor, details, created_at) \
             VALUES ($1, 'alert', $2, $3, $4, $5)",
        )
        .bind(change.audit_action())
        .bind(id.hyphenated().to_string())
        .bind(change.actor())
        .bind(change.audit_details(current.status, at_ms))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Transition::Changed {
            from: current.status,
            row,
        })
    }

    /// Deletes rows matching `… < $1` in batches of [`RETENTION_BATCH`],
    /// each its own statement, until nothing is left; returns the total.
    async fn delete_before(
        &self,
        table: &'static str,
        column: &'static str,
        cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
        );
        let mut total = 0u64;
        loop {
            let done = sqlx::query(&sql)
                .bind(cutoff)
                .bind(RETENTION_BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += done;
            if done < RETENTION_BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

fn push_window_filters<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    query: &'a AggregateQuery,
) -> Result<(), StoreError> {
    if let Some(r) = &query.region {
        qb.push(" AND region = ");
        qb.push_bind(r.as_str());
    }
    if let Some(from) = query.from_ms {
        qb.push(" AND window_start >= ");
        qb.push_bind(at(from)?);
    }
    if let Some(to) = query.to_ms {
        qb.push(" AND window_start < ");
        qb.push_bind(at(to)?);
    }
    Ok(())
}

// ------------------------------------------------------------------ Store

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn save_invoices(&self, invoices: &[Invoice]) -> Result<(), StoreError> {
        let now = at(now_ms())?;
        let mut tx = self.pool.begin().await?;
        for inv in invoices {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM invoices WHERE invoice_id = $1 FOR UPDATE")
                    .bind(&inv.invoice_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if status.as_deref().is_some_and(|s| s != "pending") {
                continue;
            }
            sqlx::query(
                "INSERT INTO invoices (invoice_id, meter_id, user_id, billing_period_start, \
                 billing_period_end, total_kwh, total_amount, currency, status, created_at, \
                 updated_at) \
                 VALUES ($1, $2, (SELECT user_id FROM meters WHERE meter_id = $2), $3, $4, \
                 $5::float8, $6::float8, $7, 'pending', $8, $8) \
                 ON CONFLICT (invoice_id) DO UPDATE SET user_id = excluded.user_id, \
                 total_kwh = excluded.total_kwh, total_amount = excluded.total_amount, \
                 updated_at = excluded.updated_at",
            )
            .bind(&inv.invoice_id)
            .bind(&inv.meter_id)
            .bind(at(inv.period_start_ms)?)
            .bind(at(inv.period_end_ms)?)
            .bind(inv.total_kwh)
            .bind(inv.total_amount)
            .bind(inv.currency)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM invoice_line_items WHERE invoice_id = $1")
                .bind(&inv.invoice_id)
                .execute(&mut *tx)
                .await?;
            for l in &inv.line_items {
                sqlx::query(
                    "INSERT INTO invoice_line_items (invoice_id, meter_id, tariff_id, \
                     period_start, period_end, description, kwh, price_per_kwh, amount, \
                     created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7::float8, $8::float8, $9::float8, $10)",
                )
                .bind(&inv.invoice_id)
                .bind(&l.meter_id)
                .bind(&l.tariff_id)
                .bind(at(l.period_start_ms)?)
                .bind(at(l.period_end_ms)?)
                .bind(&l.description)
                .bind(l.kwh)
                .bind(l.price_per_kwh)
                .bind(l.amount)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_invoices(&self, f: &InvoiceFilter) -> Result<Vec<Invoice>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT invoice_id, meter_id, user_id, billing_period_start, billing_period_end, \
             total_kwh::float8 AS total_kwh, total_amount::float8 AS total_amount, status \
             FROM invoices WHERE true",
        );
        if let Some(m) = &f.meter_id {
            qb.push(" AND meter_id = ").push_bind(m.clone());
        }
        if let Some(u) = &f.user_id {
            qb.push(" AND user_id = ").push_bind(u.clone());
        }
        if let Some(from) = f.from_ms {
            qb.push(" AND billing_period_start >= ")
                .push_bind(at(from)?);
        }
        if let Some(to) = f.to_ms {
            qb.push(" AND billing_period_end <= ").push_bind(at(to)?);
        }
        qb.push(" ORDER BY billing_period_start DESC, invoice_id LIMIT ")
            .push_bind(i64::from(f.limit));
        let heads = qb.build().fetch_all(&self.pool).await?;
        let ids = heads
            .iter()
            .map(|h| h.try_get::<String, _>("invoice_id"))
            .collect::<Result<Vec<_>, _>>()?;
        let lines = sqlx::query(
            "SELECT invoice_id, meter_id, tariff_id, period_start, period_end, description, \
             kwh::float8 AS kwh, price_per_kwh::float8 AS price_per_kwh, \
             amount::float8 AS amount FROM invoice_line_items WHERE invoice_id = ANY($1) \
             ORDER BY invoice_id, period_start, line_item_id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        super::rows::invoices(&heads, &lines, &|r, c| ts(r, c))
    }

    async fn delivered_notifications(
        &self,
        webhook: &str,
        event_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT event_id FROM notification_deliveries \
             WHERE webhook = $1 AND event_id = ANY($2) AND status = 'delivered'",
        )
        .bind(webhook)
        .bind(event_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(found)
    }

    async fn log_notification(&self, e: &NotificationLog) -> Result<(), StoreError> {
        let at = at(e.at_ms)?;
        sqlx::query(
            "INSERT INTO notification_deliveries (webhook, event_id, event_type, status, \
             attempts, response_status, last_error, updated_at, delivered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (webhook, event_id) DO UPDATE SET status = excluded.status, \
             attempts = excluded.attempts, response_status = excluded.response_status, \
             last_error = excluded.last_error, updated_at = excluded.updated_at, \
             delivered_at = excluded.delivered_at \
             WHERE notification_deliveries.status <> 'delivered'",
        )
        .bind(&e.webhook)
        .bind(&e.event_id)
        .bind(e.event_type)
        .bind(if e.delivered { "delivered" } else { "failing" })
        .bind(i64::from(e.attempts))
        .bind(e.response_status.map(i32::from))
        .bind(&e.last_error)
        .bind(at)
        .bind(e.delivered.then_some(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_raw_readings(
        &self,
        readings: std::sync::Arc<[RawReading]>,
    ) -> Result<(), StoreError> {
        if readings.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        insert_raw_readings(&mut tx, &readings).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn upsert_meter_aggregates(
        &self,
        width: WindowWidth,
        aggs: &[MeterAggregate],
    ) -> Result<Vec<MeterAggregate>, StoreError> {
        if aggs.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let out = upsert_meter_aggregates(&mut tx, width, aggs).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn upsert_regional_aggregates(
        &self,
        aggs: &[RegionalAggregate],
    ) -> Result<(), StoreError> {
        if aggs.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        upsert_regional_aggregates(&mut tx, aggs).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_alert(&self, alert: &NewAlert) -> Result<AlertRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = match insert_alert(&mut tx, alert).await? {
            Some(row) => row,
            None => {
                // Already there: by id, or another alert with its dedupe key.
                // (Read committed: this statement sees the conflicting row,
                // which ON CONFLICT waited for.)
                let select = format!(
                    "SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1 OR dedupe_key = $2 \
                     ORDER BY id = $1 DESC LIMIT 1"
                );
                let row = sqlx::query(&select)
                    .bind(alert.id)
                    .bind(&alert.dedupe_key)
                    .fetch_one(&mut *tx)
                    .await?;
                alert_row(&row)?
            }
        };
        tx.commit().await?;
        Ok(row)
    }

    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<AlertRow>, StoreError> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE TRUE"));
        for (column, value) in [
            ("region", &filter.region),
            ("status", &filter.status),
            ("type", &filter.alert_type),
            ("severity", &filter.severity),
            ("meter_id", &filter.meter_id),
        ] {
            if let Some(v) = value {
                qb.push(format_args!(" AND {column} = "));
                qb.push_bind(v.as_str());
            }
        }
        qb.push(" ORDER BY timestamp DESC, created_at DESC, seq DESC LIMIT ");
        qb.push_bind(i64::from(filter.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(alert_row).collect()
    }

    async fn get_alert(&self, id: Uuid) -> Result<Option<AlertRow>, StoreError> {
        let select = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1");
        let row = sqlx::query(&select)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(alert_row).transpose()
    }

    async fn acknowledge_alert(
        &self,
        id: Uuid,
        by: &str,
        at_ms: i64,
    ) -> Result<Transition, StoreError> {
        self.change_alert(id, AlertChange::Acknowledge { by }, at_ms)
            .await
    }

    async fn resolve_alert(&self, id: Uuid, at_ms: i64) -> Result<Transition, StoreError> {
        self.change_alert(id, AlertChange::Resolve, at_ms).await
    }

    async fn insert_tariff(&self, tariff: &NewTariff) -> Result<TariffRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = insert_tariff(&mut tx, tariff).await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn current_tariffs(&self) -> Result<Vec<TariffRow>, StoreError> {
        let sql = format!(
            "SELECT {TARIFF_COLUMNS} FROM tariffs WHERE is_active ORDER BY region, tariff_id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(tariff_row).collect()
    }

    async fn tariff_history(
        &self,
        region: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TariffRow>, StoreError> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {TARIFF_COLUMNS} FROM tariffs"));
        if let Some(region) = region {
            qb.push(" WHERE region = ");
            qb.push_bind(region);
        }
        qb.push(" ORDER BY effective_from DESC, seq DESC LIMIT ");
        qb.push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(tariff_row).collect()
    }

    async fn meter_aggregates(
        &self,
        width: WindowWidth,
        query: &AggregateQuery,
    ) -> Result<Vec<MeterAggregate>, StoreError> {
        let table = width.table();
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {AGG_COLUMNS} FROM {table} WHERE TRUE"));
        if let Some(m) = &query.meter_id {
            qb.push(" AND meter_id = ");
            qb.push_bind(m.as_str());
        }
        push_window_filters(&mut qb, query)?;
        qb.push(" ORDER BY window_start, meter_id LIMIT ");
        qb.push_bind(i64::from(query.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(|r| meter_aggregate(r, table)).collect()
    }

    async fn regional_aggregates(
        &self,
        query: &AggregateQuery,
    ) -> Result<Vec<RegionalAggregate>, StoreError> {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "SELECT {REGIONAL_COLUMNS} FROM aggregates_1m_regional WHERE TRUE"
        ));
        push_window_filters(&mut qb, query)?;
        qb.push(" ORDER BY window_start, region LIMIT ");
        qb.push_bind(i64::from(query.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(regional_aggregate).collect()
    }

    async fn count_readings_1m(&self) -> Result<u64, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(count), 0)::BIGINT FROM aggregates_1m")
                .fetch_one(&self.pool)
                .await?;
        count_col(n, "aggregates_1m", "count")
    }

    async fn count_raw_readings(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM raw_readings")
            .fetch_one(&self.pool)
            .await?;
        count_col(n, "raw_readings", "reading_id")
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn apply_retention(&self, now_ms: i64) -> Result<RetentionReport, StoreError> {
        if let Mode::TimescaleDb { .. } = self.mode {
            // The retention policies drop whole chunks on TimescaleDB's own
            // schedule.
            return Ok(RetentionReport::default());
        }
        let r = self.retention;
        let cutoff = |keep: Duration| {
            let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
            at(now_ms
                .saturating_sub(keep_ms)
                .max(DateTime::<Utc>::MIN_UTC.timestamp_millis()))
        };
        Ok(RetentionReport {
            raw_readings: self
                .delete_before("raw_readings", "timestamp", cutoff(r.raw_readings)?)
                .await?,
            aggregates_1m: self
                .delete_before("aggregates_1m", "window_start", cutoff(r.aggregates_1m)?)
                .await?,
            aggregates_15m: self
                .delete_before("aggregates_15m", "window_start", cutoff(r.aggregates_15m)?)
                .await?,
            aggregates_1m_regional: self
                .delete_before(
                    "aggregates_1m_regional",
                    "window_start",
                    cutoff(r.aggregates_1m)?,
                )
                .await?,
        })
    }

    async fn load_rule_state(&self, rule: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT key, value FROM rule_state WHERE rule = $1 ORDER BY key")
                .bind(rule)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    async fn save_rule_state(&self, rule: &str, state: &[(String, i64)]) -> Result<(), StoreError> {
        if state.is_empty() {
            return Ok(());
        }
        let rows: Vec<RuleState> = state
            .iter()
            .map(|(key, value)| RuleState {
                rule: rule.to_owned(),
                key: key.clone(),
                value: *value,
            })
            .collect();
        let mut tx = self.pool.begin().await?;
        save_rule_state(&mut tx, &rows).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn apply(
        &self,
        stage: &str,
        effects: &Effects,
        outbox: &OutboxBuilder<'_>,
    ) -> Result<(Applied, Vec<OutboxRecord>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Applied::default();
        for (width, rows) in &effects.meter_windows {
            applied
                .meter_windows
                .push(upsert_meter_aggregates(&mut tx, *width, rows).await?);
        }
        upsert_regional_aggregates(&mut tx, &effects.regional_windows).await?;
        for alert in &effects.alerts {
            applied.alerts.push(insert_alert(&mut tx, alert).await?);
        }
        for tariff in &effects.tariffs {
            applied.tariffs.push(insert_tariff(&mut tx, tariff).await?);
        }
        save_rule_state(&mut tx, &effects.rule_state).await?;
        if let Some(cp) = &effects.checkpoint {
            save_checkpoint(&mut tx, cp).await?;
        }
        let records = insert_outbox(&mut tx, stage, outbox(&applied)).await?;
        tx.commit().await?;
        Ok((applied, records))
    }

    async fn pending_outbox(&self, stage: &str) -> Result<Vec<OutboxRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, topic, key, value, headers FROM outbox WHERE stage = $1 ORDER BY seq",
        )
        .bind(stage)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let topic: &str = row.try_get("topic")?;
                Ok(OutboxRecord {
                    seq: row.try_get("seq")?,
                    message: KeyedMessage {
                        topic: Topic::from_name(topic).ok_or_else(|| StoreError::Corrupt {
                            table: "outbox",
                            column: "topic",
                            value: topic.to_owned(),
                        })?,
                        key: row.try_get("key")?,
                        value: row.try_get("value")?,
                        headers: json_col(row, "outbox", "headers")?,
                    },
                })
            })
            .collect()
    }

    async fn delete_outbox(&self, stage: &str, through_seq: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM outbox WHERE stage = $1 AND seq <= $2")
            .bind(stage)
            .bind(through_seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn load_checkpoint(&self, group: &str) -> Result<Option<Checkpoint>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        load_checkpoint(&mut conn, group).await
    }

    async fn publish_plugin_version(
        &self,
        v: &crate::store::SharedPluginVersion,
    ) -> Result<i64, StoreError> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO plugin_versions (plugin, sha256, component, config, source, origin) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
        )
        .bind(&v.plugin)
        .bind(&v.sha256)
        .bind(&v.component)
        .bind(&v.config)
        .bind(&v.source)
        .bind(&v.origin)
        .fetch_one(&self.pool)
        .await?;
        Ok(seq)
    }

    async fn plugin_versions_after(
        &self,
        seq: i64,
    ) -> Result<Vec<crate::store::SharedPluginVersion>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, plugin, sha256, component, config, source, origin \
             FROM plugin_versions WHERE seq > $1 ORDER BY seq",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(crate::store::SharedPluginVersion {
                    seq: row.try_get("seq")?,
                    plugin: row.try_get("plugin")?,
                    sha256: row.try_get("sha256")?,
                    component: row.try_get("component")?,
                    config: row.try_get("config")?,
                    source: row.try_get("source")?,
                    origin: row.try_get("origin")?,
                })
            })
            .collect()
    }

    async fn claim_checkpoint(&self, group: &str) -> Result<(i64, Option<Checkpoint>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO stream_checkpoints (consumer_group, bus_id, positions, state, \
             updated_at, epoch) VALUES ($1, '', '[]'::jsonb, ''::bytea, $2, 1) \
             ON CONFLICT (consumer_group) \
             DO UPDATE SET epoch = stream_checkpoints.epoch + 1 RETURNING epoch",
        )
        .bind(group)
        .bind(at(now_ms())?)
        .fetch_one(&mut *tx)
        .await?;
        let cp = load_checkpoint(&mut tx, group).await?;
        tx.commit().await?;
        Ok((epoch, cp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_is_bound_as_null_as_sqlite_stores_it() {
        assert_eq!(real(f64::NAN), None);
        assert_eq!(real(1.5), Some(1.5));
        assert_eq!(real(f64::INFINITY), Some(f64::INFINITY));
        assert_eq!(real_opt(Some(f64::NAN)), None);
    }

    #[test]
    fn timescaledb_block_covers_every_time_series() {
        let block = timescaledb_block(&Retention::default(), true);
        assert!(block.starts_with("DO $segs$"));
        assert!(block.contains("IF NOT true THEN RETURN"));
        for table in [
            "raw_readings",
            "aggregates_1m",
            "aggregates_15m",
            "aggregates_1m_regional",
        ] {
            assert!(
                block.contains(&format!("create_hypertable('{table}'")),
                "{table}"
            );
        }
        assert!(block.contains("add_retention_policy('raw_readings', INTERVAL '604800 seconds')"));
        assert!(
            block.contains("add_retention_policy('aggregates_15m', INTERVAL '31536000 seconds')")
        );
        assert!(timescaledb_block(&Retention::default(), false).contains("IF NOT false THEN"));
    }
}
