//! The embedded store: [`Store`] over one SQLite file (or `sqlite::memory:`)
//! through sqlx, schema from `migrations/sqlite/`, applied on open.
//!
//! Owns the SQLite-specific choices: WAL journal with `synchronous=NORMAL`
//! and a busy timeout; every write is one `BEGIN IMMEDIATE` transaction (the
//! write lock is taken up front, so a read-then-write inside it cannot fail
//! on a stale snapshot); multi-row INSERTs are cut into chunks whose sizes
//! come from a fixed ladder of powers of two, so each table has a handful of
//! distinct statements, all kept prepared by the connection's statement
//! cache. Timestamps are TEXT in the canonical RFC 3339 form, which sorts
//! and compares correctly as text.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, Transaction};
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
use crate::time::{format_rfc3339_ms, now_ms, parse_rfc3339_ms};

/// Bound parameters per statement in the bundled SQLite
/// (`SQLITE_MAX_VARIABLE_NUMBER`, 32766 since 3.32).
const MAX_VARIABLES: usize = 32_766;
/// Rows per INSERT statement, at most (a power of two).
const MAX_CHUNK_ROWS: usize = 2048;
/// Rows deleted per statement by the retention job, so that writers are
/// never locked out for long.
pub(super) const RETENTION_BATCH: i64 = 20_000;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
const FILE_POOL_CONNECTIONS: u32 = 4;
/// Page cache per connection, KiB (`PRAGMA cache_size`).
pub(super) const CACHE_KIB: u32 = 32 * 1024;
/// WAL pages between automatic checkpoints (`PRAGMA wal_autocheckpoint`).
pub(super) const WAL_AUTOCHECKPOINT: u32 = 10_000;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    pool: SqlitePool,
    retention: Retention,
    /// `raw_readings` for a database file, in the archive file beside it
    /// (`None`: in memory, where they stay in the pool's one database).
    archive: Option<super::sqlite_archive::ArchiveWriter>,
    /// Held by every write of this process ([`WriteTx`]).
    write_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` — `sqlite://path`,
    /// `sqlite:path` or `sqlite::memory:` — and applies the migrations.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::InvalidUrl(format!("{url}: {e}")))?
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // SQLite's default page cache is 2 MiB: every B-tree step past
            // it is a read syscall, which dominated the store's CPU time.
            .pragma("cache_size", format!("-{}", CACHE_KIB))
            // Statement journals (a multi-row statement inside a transaction
            // keeps one, to undo itself alone) in memory, not in a temporary
            // file: written with a syscall per page, they were a sixth of
            // the store's CPU time.
            .pragma("temp_store", "MEMORY")
            // WAL checkpoints every 10,000 pages instead of 1,000: pages
            // rewritten often (index leaves, the outbox) are copied back
            // once per checkpoint, not once per 1,000 pages written; the
            // archive's commits paid a third of its time in them.
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT.to_string());
        let file = (!is_memory_url(url)).then(|| connect.get_filename().to_owned());
        let pool = if is_memory_url(url) {
            // Each connection to `:memory:` would see its own database, and a
            // shared-cache database vanishes with its last connection: use
            // exactly one connection, kept for the life of the pool.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(connect)
                .await?
        } else {
            let connect = connect
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            SqlitePoolOptions::new()
                .max_connections(FILE_POOL_CONNECTIONS)
                .connect_with(connect)
                .await?
        };
        MIGRATOR.run(&pool).await?;
        let archive = match file {
            Some(path) => {
                Some(super::sqlite_archive::ArchiveWriter::open(&path, BUSY_TIMEOUT).await?)
            }
            None => None,
        };
        Ok(SqliteStore {
            pool,
            retention: options.retention,
            archive,
            write_lock: Default::default(),
        })
    }

    /// The underlying pool (for tests and diagnostics).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A write transaction, begun once this process's other writers are
    /// done (see [`WriteTx`]).
    async fn write_tx(&self) -> Result<WriteTx, StoreError> {
        let lock = self.write_lock.clone().lock_owned().await;
        Ok(WriteTx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            _lock: lock,
        })
    }
}

/// A `BEGIN IMMEDIATE` transaction holding the store's in-process write
/// lock until it ends. SQLite has one writer per file; without the lock the
/// stages' writers (stream checkpoints, regional, alert and tariff stages,
/// outbox clean-up) met on the file's lock, and the one that lost slept in
/// SQLite's busy handler, in steps of 1 to 100 ms, even after the lock was
/// free again. With it they queue in order and start the moment the
/// previous write ends. (Another process on the same file still meets the
/// busy timeout.)
struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

impl WriteTx {
    async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

fn is_memory_url(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (db, params) = rest.split_once('?').unwrap_or((rest, ""));
    db == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

// ------------------------------------------------------------ statements

/// Chunk sizes covering `n` rows: as many `max` chunks as fit, then the
/// binary decomposition of the rest, so only log2(max) + 1 distinct
/// statement shapes ever exist per table.
fn chunk_sizes(mut n: usize, max: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= max {
            max
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        n -= size;
        Some(size)
    })
}

/// The largest power-of-two row count whose parameters fit one statement.
fn max_chunk_rows(columns: usize) -> usize {
    let fit = MAX_VARIABLES / columns;
    let pow2 = 1 << (usize::BITS - 1 - fit.leading_zeros());
    pow2.min(MAX_CHUNK_ROWS)
}

/// `{head} VALUES (?,…),(?,…) {tail}` for `rows` rows of `columns` values.
fn values_sql(head: &str, columns: usize, rows: usize, tail: &str) -> String {
    let mut s = String::with_capacity(head.len() + tail.len() + 10 + rows * (2 * columns + 2));
    s.push_str(head);
    s.push_str(" VALUES ");
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..columns {
            if c > 0 {
                s.push(',');
            }
            s.push('?');
        }
        s.push(')');
    }
    s.push(' ');
    s.push_str(tail);
    s
}

const RAW_INSERT: &str = "INSERT INTO raw_readings (meter_id, region, timestamp, power_kw, \
     voltage, current, frequency, power_factor, temperature, energy_kwh)";
const RAW_COLUMNS: usize = 10;

const AGG_COLUMNS: &str = "meter_id, region, window_start, avg_power_kw, max_power_kw, \
     min_power_kw, energy_kwh_sum, voltage_avg, count, power_sum, voltage_sum, voltage_count";
const AGG_INSERT_COLUMNS: usize = 14;

fn agg_upsert_head(table: &str) -> String {
    format!("INSERT INTO {table} ({AGG_COLUMNS}, created_at, updated_at)")
}

fn agg_upsert_tail(t: &str) -> String {
    format!(
        "ON CONFLICT (window_start, meter_id) DO UPDATE SET \
         count = {t}.count + excluded.count, \
         power_sum = {t}.power_sum + excluded.power_sum, \
         voltage_sum = {t}.voltage_sum + excluded.voltage_sum, \
         voltage_count = {t}.voltage_count + excluded.voltage_count, \
         energy_kwh_sum = {t}.energy_kwh_sum + excluded.energy_kwh_sum, \
         max_power_kw = max({t}.max_power_kw, excluded.max_power_kw), \
         min_power_kw = min({t}.min_power_kw, excluded.min_power_kw), \
         avg_power_kw = CASE WHEN {t}.count + excluded.count > 0 \
             THEN ({t}.power_sum + excluded.power_sum) / ({t}.count + excluded.count) \
             ELSE {t}.avg_power_kw END, \
         voltage_avg = CASE WHEN {t}.voltage_count + excluded.voltage_count > 0 \
             THEN ({t}.voltage_sum + excluded.voltage_sum) \
                  / ({t}.voltage_count + excluded.voltage_count) \
             ELSE NULL END, \
         updated_at = excluded.updated_at \
         RETURNING {AGG_COLUMNS}"
    )
}

const REGIONAL_COLUMNS: &str = "region, window_start, meter_count, total_consumption, \
     avg_consumption, max_consumption, min_consumption, load_percentage, active_meters";
const REGIONAL_INSERT_COLUMNS: usize = 10;
const REGIONAL_TAIL: &str = "ON CONFLICT (region, window_start) DO UPDATE SET \
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

// --------------------------------------------------------------- decoding

/// Ids bound in one `IN (…)` query (under SQLite's bind limit).
const IDS_PER_QUERY: usize = 5_000;

fn ts(row: &SqliteRow, table: &'static str, column: &'static str) -> Result<i64, StoreError> {
    let s: &str = row.try_get(column)?;
    parse_rfc3339_ms(s).ok_or_else(|| StoreError::Corrupt {
        table,
        column,
        value: s.to_owned(),
    })
}

fn ts_opt(
    row: &SqliteRow,
    table: &'static str,
    column: &'static str,
) -> Result<Option<i64>, StoreError> {
    let s: Option<&str> = row.try_get(column)?;
    s.map(|s| {
        parse_rfc3339_ms(s).ok_or_else(|| StoreError::Corrupt {
            table,
            column,
            value: s.to_owned(),
        })
    })
    .transpose()
}

/// A closed-vocabulary column (severity, status, …) read into its enum.
fn vocabulary<V: FromStr>(
    row: &SqliteRow,
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

fn u32_col(row: &SqliteRow, table: &'static str, column: &'static str) -> Result<u32, StoreError> {
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

fn meter_aggregate(row: &SqliteRow, table: &'static str) -> Result<MeterAggregate, StoreError> {
    Ok(MeterAggregate {
        meter_id: row.try_get("meter_id")?,
        region: row.try_get("region")?,
        window_start_ms: ts(row, table, "window_start")?,
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

fn regional_aggregate(row: &SqliteRow) -> Result<RegionalAggregate, StoreError> {
    const T: &str = "aggregates_1m_regional";
    let active: &str = row.try_get("active_meters")?;
    Ok(RegionalAggregate {
        region: row.try_get("region")?,
        window_start_ms: ts(row, T, "window_start")?,
        meter_count: u32_col(row, T, "meter_count")?,
        total_consumption: row.try_get("total_consumption")?,
        avg_consumption: row.try_get("avg_consumption")?,
        max_consumption: row.try_get("max_consumption")?,
        min_consumption: row.try_get("min_consumption")?,
        load_percentage: row.try_get("load_percentage")?,
        active_meters: serde_json::from_str(active).map_err(|_| StoreError::Corrupt {
            table: T,
            column: "active_meters",
            value: active.to_owned(),
        })?,
    })
}

fn alert_row(row: &SqliteRow) -> Result<AlertRow, StoreError> {
    const T: &str = "alerts";
    let id: &str = row.try_get("id")?;
    let metadata: &str = row.try_get("metadata")?;
    Ok(AlertRow {
        id: Uuid::parse_str(id).map_err(|_| StoreError::Corrupt {
            table: T,
            column: "id",
            value: id.to_owned(),
        })?,
        alert_type: vocabulary(row, T, "type")?,
        severity: vocabulary(row, T, "severity")?,
        region: row.try_get("region")?,
        meter_id: row.try_get("meter_id")?,
        message: row.try_get("message")?,
        status: vocabulary(row, T, "status")?,
        timestamp_ms: ts(row, T, "timestamp")?,
        acknowledged: row.try_get::<i64, _>("acknowledged")? != 0,
        acknowledged_by: row.try_get("acknowledged_by")?,
        acknowledged_at_ms: ts_opt(row, T, "acknowledged_at")?,
        resolved_at_ms: ts_opt(row, T, "resolved_at")?,
        metadata: serde_json::from_str(metadata).map_err(|_| StoreError::Corrupt {
            table: T,
            column: "metadata",
            value: metadata.to_owned(),
        })?,
        created_at_ms: ts(row, T, "created_at")?,
        updated_at_ms: ts(row, T, "updated_at")?,
        rule: super::rows::rule_ref(row)?,
    })
}

fn tariff_row(row: &SqliteRow) -> Result<TariffRow, StoreError> {
    const T: &str = "tariffs";
    Ok(TariffRow {
        tariff_id: row.try_get("tariff_id")?,
        region: row.try_get("region")?,
        time_of_day: row.try_get("time_of_day")?,
        price_per_kwh: row.try_get("price_per_kwh")?,
        effective_from_ms: ts(row, T, "effective_from")?,
        effective_to_ms: ts_opt(row, T, "effective_to")?,
        is_active: row.try_get::<i64, _>("is_active")? != 0,
        created_by: row.try_get("created_by")?,
        created_at_ms: ts(row, T, "created_at")?,
        updated_at_ms: ts(row, T, "updated_at")?,
        previous_price: row.try_get("previous_price")?,
        change_percent: row.try_get("change_percent")?,
        load_percentage: row.try_get("load_percentage")?,
        reason: vocabulary(row, T, "reason")?,
        rule: super::rows::rule_ref(row)?,
    })
}

// ---------------------------------------------------------- alert changes

impl SqliteStore {
    async fn change_alert(
        &self,
        id: Uuid,
        change: AlertChange<'_>,
        at_ms: i64,
    ) -> Result<Transition, StoreError> {
        let id_text = id.hyphenated().to_string();
        let at = format_rfc3339_ms(at_ms);
        let now = format_rfc3339_ms(now_ms());
        let mut tx = self.write_tx().await?;

        // Under BEGIN IMMEDIATE nobody else can write between this read and
        // the update below; the update's status guard keeps it correct even
        // so.
        let select = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?");
        let Some(current) = sqlx::query(&select)
            .bind(&id_text)
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
                    "UPDATE alerts SET status = 'acknowledged', acknowledged = 1, \
                     acknowledged_by = ?, acknowledged_at = ?, updated_at = ? \
                     WHERE id = ? AND status IN ('active') RETURNING {ALERT_COLUMNS}"
                );
                sqlx::query(&sql)
                    .bind(by)
                    .bind(&at)
                    .bind(&now)
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            AlertChange::Resolve => {
                let sql = format!(
                    "UPDATE alerts SET status = 'resolved', resolved_at = ?, updated_at = ? \
                     WHERE id = ? AND status IN ('active', 'acknowledged') \
                     RETURNING {ALERT_COLUMNS}"
                );
                sqlx::query(&sql)
                    .bind(&at)
                    .bind(&now)
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let Some(updated) = updated else {
            // Unreachable while the transaction holds the write lock; report
            // what is there rather than guess.
            return Ok(Transition::Refused {
                status: current.status,
            });
        };
        let row = alert_row(&updated)?;

        sqlx::query(
            "INSERT INTO audit_logs (action, entity, entity_id, actor, details, created_at) \
             VALUES (?, 'alert', ?, ?, ?, ?)",
        )
        .bind(change.audit_action())
        .bind(&id_text)
        .bind(change.actor())
        .bind(change.audit_details(current.status, at_ms).to_string())
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Transition::Changed {
            from: current.status,
            row,
        })
    }
}

// ------------------------------------------------- writes in a transaction
//
// Each write exists once, on a connection inside a transaction, so that the
// single-purpose `Store` methods and `Store::apply` run the same SQL.

async fn upsert_meter_aggregates(
    tx: &mut SqliteConnection,
    width: WindowWidth,
    aggs: &[MeterAggregate],
) -> Result<Vec<MeterAggregate>, StoreError> {
    if aggs.is_empty() {
        return Ok(Vec::new());
    }
    let table = width.table();
    let merged = merge_duplicate_windows(aggs);
    let head = agg_upsert_head(table);
    let now = format_rfc3339_ms(now_ms());
    let max = max_chunk_rows(AGG_INSERT_COLUMNS);
    // Windows closed on time are new rows, stored as given: inserted without
    // reading them back (RETURNING streamed every row back through sqlx's
    // worker, most of the upsert's time). Only if one of them is there
    // already (a late window) is the try undone and the chunk merged.
    sqlx::query("SAVEPOINT new_windows")
        .execute(&mut *tx)
        .await?;
    let mut inserted = 0;
    let mut rest = merged.as_slice();
    for size in chunk_sizes(merged.len(), max) {
        let (chunk, after) = rest.split_at(size);
        rest = after;
        let sql = values_sql(&head, AGG_INSERT_COLUMNS, size, "ON CONFLICT DO NOTHING");
        let done = bind_aggregates(sqlx::query(&sql), chunk, &now)
            .execute(&mut *tx)
            .await?;
        inserted += done.rows_affected();
        if done.rows_affected() < size as u64 {
            break;
        }
    }
    if inserted == merged.len() as u64 {
        sqlx::query("RELEASE new_windows").execute(&mut *tx).await?;
        return Ok(merged);
    }
    sqlx::query("ROLLBACK TO new_windows; RELEASE new_windows")
        .execute(&mut *tx)
        .await?;
    let tail = agg_upsert_tail(table);
    let mut out = Vec::with_capacity(merged.len());
    let mut rest = merged.as_slice();
    for size in chunk_sizes(merged.len(), max) {
        let (chunk, after) = rest.split_at(size);
        rest = after;
        let sql = values_sql(&head, AGG_INSERT_COLUMNS, size, &tail);
        let rows = bind_aggregates(sqlx::query(&sql), chunk, &now)
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

/// Binds the [`AGG_INSERT_COLUMNS`] of each row of `chunk`.
fn bind_aggregates<'q>(
    mut q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    chunk: &'q [MeterAggregate],
    now: &'q str,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for a in chunk {
        q = q
            .bind(a.meter_id.as_str())
            .bind(a.region.as_str())
            .bind(format_rfc3339_ms(a.window_start_ms))
            .bind(a.avg_power_kw)
            .bind(a.max_power_kw)
            .bind(a.min_power_kw)
            .bind(a.energy_kwh_sum)
            .bind(a.voltage_avg)
            .bind(i64::from(a.count))
            .bind(a.power_sum)
            .bind(a.voltage_sum)
            .bind(i64::from(a.voltage_count))
            .bind(now)
            .bind(now);
    }
    q
}

async fn upsert_regional_aggregates(
    tx: &mut SqliteConnection,
    aggs: &[RegionalAggregate],
) -> Result<(), StoreError> {
    if aggs.is_empty() {
        return Ok(());
    }
    // The last entry for a key wins, as it would in the table.
    let unique = last_entry_wins(aggs, regional_key);

    let head = format!("INSERT INTO aggregates_1m_regional ({REGIONAL_COLUMNS}, created_at)");
    let now = format_rfc3339_ms(now_ms());
    let max = max_chunk_rows(REGIONAL_INSERT_COLUMNS);
    let mut rest = unique.as_slice();
    for size in chunk_sizes(unique.len(), max) {
        let (chunk, after) = rest.split_at(size);
        rest = after;
        let sql = values_sql(&head, REGIONAL_INSERT_COLUMNS, size, REGIONAL_TAIL);
        let mut q = sqlx::query(&sql);
        for a in chunk {
            q = q
                .bind(a.region.as_str())
                .bind(format_rfc3339_ms(a.window_start_ms))
                .bind(i64::from(a.meter_count))
                .bind(a.total_consumption)
                .bind(a.avg_consumption)
                .bind(a.max_consumption)
                .bind(a.min_consumption)
                .bind(a.load_percentage)
                .bind(serde_json::to_string(&a.active_meters)?)
                .bind(now.as_str());
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// The outbox of one `apply`: its messages as one row of `outbox_batches`
/// (migration 0009), whose seq every message shares.
async fn insert_outbox(
    tx: &mut SqliteConnection,
    stage: &str,
    messages: Vec<KeyedMessage>,
) -> Result<Vec<OutboxRecord>, StoreError> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let stored: Vec<StoredMessage<'_>> = messages
        .iter()
        .map(|m| StoredMessage {
            topic: Cow::Borrowed(m.topic.name()),
            key: Cow::Borrowed(&m.key),
            value: Cow::Borrowed(&m.value),
            headers: Cow::Borrowed(&m.headers),
        })
        .collect();
    // Strings, bytes and pairs of strings: encoding cannot fail.
    let blob = postcard::to_stdvec(&stored).expect("outbox messages encode");
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO outbox_batches (stage, messages) VALUES (?, ?) RETURNING seq",
    )
    .bind(stage)
    .bind(blob)
    .fetch_one(&mut *tx)
    .await?;
    Ok(messages
        .into_iter()
        .map(|message| OutboxRecord { seq, message })
        .collect())
}

/// One message of an outbox batch as stored: borrowed to write, owned to
/// read back.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredMessage<'a> {
    topic: Cow<'a, str>,
    key: Cow<'a, str>,
    #[serde(with = "serde_bytes", borrow)]
    value: Cow<'a, [u8]>,
    headers: Cow<'a, [(String, String)]>,
}

/// Messages an earlier build left in the one-row-per-message `outbox` get
/// seqs below every batch's (this minus their own), so they go first and
/// are deleted by the same `delete_outbox`.
const LEGACY_OUTBOX_BASE: i64 = 1 << 62;

/// Inserts an `active` alert; `None` when one with the same id or the same
/// dedupe key is already stored (nothing is written then).
async fn insert_alert(
    tx: &mut SqliteConnection,
    alert: &NewAlert,
) -> Result<Option<AlertRow>, StoreError> {
    let id = alert.id.hyphenated().to_string();
    let metadata = if alert.metadata.is_null() {
        "{}".to_owned()
    } else {
        serde_json::to_string(&alert.metadata)?
    };
    let now = format_rfc3339_ms(now_ms());
    let sql = format!(
        "INSERT INTO alerts (id, type, severity, region, meter_id, message, status, \
         timestamp, acknowledged, metadata, created_at, updated_at, dedupe_key, \
         rule_name, rule_version, rule_sha256) \
         VALUES (?, ?, ?, ?, ?, ?, 'active', ?, 0, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT DO NOTHING RETURNING {ALERT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(&id)
        .bind(alert.alert_type.as_str())
        .bind(alert.severity.as_str())
        .bind(&alert.region)
        .bind(&alert.meter_id)
        .bind(&alert.message)
        .bind(format_rfc3339_ms(alert.timestamp_ms))
        .bind(metadata)
        .bind(&now)
        .bind(&now)
        .bind(&alert.dedupe_key)
        .bind(alert.rule.as_ref().map(|r| r.name.as_str()))
        .bind(alert.rule.as_ref().map(|r| r.version as i64))
        .bind(alert.rule.as_ref().map(|r| r.sha256.as_str()))
        .fetch_optional(&mut *tx)
        .await?;
    row.as_ref().map(alert_row).transpose()
}

async fn insert_tariff(
    tx: &mut SqliteConnection,
    tariff: &NewTariff,
) -> Result<TariffRow, StoreError> {
    let prefix = tariff_prefix(&tariff.region);
    let from = format_rfc3339_ms(tariff.effective_from_ms);
    let now = format_rfc3339_ms(now_ms());
    let n: i64 = sqlx::query_scalar(
        "INSERT INTO tariff_id_sequences (prefix, last_value) VALUES (?, 1) \
         ON CONFLICT (prefix) DO UPDATE SET last_value = last_value + 1 \
         RETURNING last_value",
    )
    .bind(&prefix)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE tariffs SET is_active = 0, effective_to = ?, updated_at = ? \
         WHERE region = ? AND is_active = 1",
    )
    .bind(&from)
    .bind(&now)
    .bind(&tariff.region)
    .execute(&mut *tx)
    .await?;
    let insert = format!(
        "INSERT INTO tariffs ({TARIFF_COLUMNS}) \
         VALUES (?, ?, 'all_day', ?, ?, NULL, 1, 'segs', ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         RETURNING {TARIFF_COLUMNS}"
    );
    let row = sqlx::query(&insert)
        .bind(tariff_id(&prefix, n))
        .bind(&tariff.region)
        .bind(tariff.price_per_kwh)
        .bind(&from)
        .bind(&now)
        .bind(&now)
        .bind(tariff.previous_price)
        .bind(tariff.change_percent)
        .bind(tariff.load_percentage)
        .bind(tariff.reason.as_str())
        .bind(tariff.rule.as_ref().map(|r| r.name.as_str()))
        .bind(tariff.rule.as_ref().map(|r| r.version as i64))
        .bind(tariff.rule.as_ref().map(|r| r.sha256.as_str()))
        .fetch_one(&mut *tx)
        .await?;
    tariff_row(&row)
}

async fn save_rule_state(tx: &mut SqliteConnection, state: &[RuleState]) -> Result<(), StoreError> {
    let now = format_rfc3339_ms(now_ms());
    for s in state {
        sqlx::query(
            "INSERT INTO rule_state (rule, key, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (rule, key) DO UPDATE SET value = excluded.value, \
             updated_at = excluded.updated_at",
        )
        .bind(&s.rule)
        .bind(&s.key)
        .bind(s.value)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

// ------------------------------------------------------------------ Store

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn save_invoices(&self, invoices: &[Invoice]) -> Result<(), StoreError> {
        let now = format_rfc3339_ms(now_ms());
        let mut tx = self.write_tx().await?;
        for inv in invoices {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM invoices WHERE invoice_id = ?")
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
                 VALUES (?1, ?2, (SELECT user_id FROM meters WHERE meter_id = ?2), ?3, ?4, ?5, \
                 ?6, ?7, 'pending', ?8, ?8) \
                 ON CONFLICT (invoice_id) DO UPDATE SET user_id = excluded.user_id, \
                 total_kwh = excluded.total_kwh, total_amount = excluded.total_amount, \
                 updated_at = excluded.updated_at",
            )
            .bind(&inv.invoice_id)
            .bind(&inv.meter_id)
            .bind(format_rfc3339_ms(inv.period_start_ms))
            .bind(format_rfc3339_ms(inv.period_end_ms))
            .bind(inv.total_kwh)
            .bind(inv.total_amount)
            .bind(inv.currency)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM invoice_line_items WHERE invoice_id = ?")
                .bind(&inv.invoice_id)
                .execute(&mut *tx)
                .await?;
            for l in &inv.line_items {
                sqlx::query(
                    "INSERT INTO invoice_line_items (invoice_id, meter_id, tariff_id, \
                     period_start, period_end, description, kwh, price_per_kwh, amount, \
                     created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&inv.invoice_id)
                .bind(&l.meter_id)
                .bind(&l.tariff_id)
                .bind(format_rfc3339_ms(l.period_start_ms))
                .bind(format_rfc3339_ms(l.period_end_ms))
                .bind(&l.description)
                .bind(l.kwh)
                .bind(l.price_per_kwh)
                .bind(l.amount)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_invoices(&self, f: &InvoiceFilter) -> Result<Vec<Invoice>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT invoice_id, meter_id, user_id, billing_period_start, billing_period_end, \
             total_kwh, total_amount, status FROM invoices WHERE 1 = 1",
        );
        if let Some(m) = &f.meter_id {
            qb.push(" AND meter_id = ").push_bind(m.clone());
        }
        if let Some(u) = &f.user_id {
            qb.push(" AND user_id = ").push_bind(u.clone());
        }
        if let Some(from) = f.from_ms {
            qb.push(" AND billing_period_start >= ")
                .push_bind(format_rfc3339_ms(from));
        }
        if let Some(to) = f.to_ms {
            qb.push(" AND billing_period_end <= ")
                .push_bind(format_rfc3339_ms(to));
        }
        qb.push(" ORDER BY billing_period_start DESC, invoice_id LIMIT ")
            .push_bind(i64::from(f.limit));
        let heads = qb.build().fetch_all(&self.pool).await?;
        // Their line items, in few queries (ids bound in chunks).
        let mut lines = Vec::new();
        for chunk in heads.chunks(IDS_PER_QUERY) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT invoice_id, meter_id, tariff_id, period_start, period_end, \
                 description, kwh, price_per_kwh, amount FROM invoice_line_items \
                 WHERE invoice_id IN (",
            );
            let mut ids = q.separated(", ");
            for head in chunk {
                ids.push_bind(head.try_get::<String, _>("invoice_id")?);
            }
            q.push(") ORDER BY invoice_id, period_start, line_item_id");
            lines.extend(q.build().fetch_all(&self.pool).await?);
        }
        super::rows::invoices(&heads, &lines, &|r, c| ts(r, "invoices", c))
    }

    async fn delivered_notifications(
        &self,
        webhook: &str,
        event_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for chunk in event_ids.chunks(IDS_PER_QUERY) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT event_id FROM notification_deliveries WHERE status = 'delivered' \
                 AND webhook = ",
            );
            q.push_bind(webhook).push(" AND event_id IN (");
            let mut ids = q.separated(", ");
            for id in chunk {
                ids.push_bind(id.clone());
            }
            q.push(")");
            out.extend(
                q.build_query_scalar::<String>()
                    .fetch_all(&self.pool)
                    .await?,
            );
        }
        Ok(out)
    }

    async fn log_notification(&self, e: &NotificationLog) -> Result<(), StoreError> {
        let at = format_rfc3339_ms(e.at_ms);
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO notification_deliveries (webhook, event_id, event_type, status, \
             attempts, response_status, last_error, updated_at, delivered_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
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
        .bind(e.response_status.map(i64::from))
        .bind(&e.last_error)
        .bind(&at)
        .bind(e.delivered.then_some(&at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn archive_records(
        &self,
        log_id: &str,
        records: std::sync::Arc<[super::RawRecord]>,
    ) -> Result<u64, StoreError> {
        match &self.archive {
            Some(archive) if !records.is_empty() => archive.archive(log_id, records).await,
            Some(_) => Ok(0),
            None => super::archive_as_rows(self, &records).await,
        }
    }

    async fn insert_raw_readings(
        &self,
        readings: std::sync::Arc<[RawReading]>,
    ) -> Result<(), StoreError> {
        if readings.is_empty() {
            return Ok(());
        }
        if let Some(archive) = &self.archive {
            return archive.insert(readings).await;
        }
        let readings = &readings[..];
        let max = max_chunk_rows(RAW_COLUMNS);
        let mut tx = self.write_tx().await?;
        let mut rest = readings;
        for size in chunk_sizes(readings.len(), max) {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            // Each reading once: (meter_id, timestamp) is unique, and a
            // replayed reading is ignored.
            let sql = values_sql(RAW_INSERT, RAW_COLUMNS, size, "ON CONFLICT DO NOTHING");
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.meter_id.as_str())
                    .bind(r.region.as_str())
                    .bind(format_rfc3339_ms(r.timestamp_ms))
                    .bind(r.power_kw)
                    .bind(r.voltage)
                    .bind(r.current)
                    .bind(r.frequency)
                    .bind(r.power_factor)
                    .bind(r.temperature)
                    .bind(r.energy_kwh);
            }
            q.execute(&mut *tx).await?;
        }
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
        let mut tx = self.write_tx().await?;
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
        let mut tx = self.write_tx().await?;
        upsert_regional_aggregates(&mut tx, aggs).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_alert(&self, alert: &NewAlert) -> Result<AlertRow, StoreError> {
        let mut tx = self.write_tx().await?;
        let row = match insert_alert(&mut tx, alert).await? {
            Some(row) => row,
            None => {
                // Already there: by id, or another alert with its dedupe key.
                let select = format!(
                    "SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ? OR dedupe_key = ? \
                     ORDER BY id = ? DESC LIMIT 1"
                );
                let id = alert.id.hyphenated().to_string();
                let row = sqlx::query(&select)
                    .bind(&id)
                    .bind(&alert.dedupe_key)
                    .bind(&id)
                    .fetch_one(&mut *tx)
                    .await?;
                alert_row(&row)?
            }
        };
        tx.commit().await?;
        Ok(row)
    }

    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<AlertRow>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1"));
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
        qb.push(" ORDER BY timestamp DESC, created_at DESC, rowid DESC LIMIT ");
        qb.push_bind(i64::from(filter.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(alert_row).collect()
    }

    async fn get_alert(&self, id: Uuid) -> Result<Option<AlertRow>, StoreError> {
        let select = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?");
        let row = sqlx::query(&select)
            .bind(id.hyphenated().to_string())
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
        let mut tx = self.write_tx().await?;
        let row = insert_tariff(&mut tx, tariff).await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn load_rule_state(&self, rule: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT key, value FROM rule_state WHERE rule = ? ORDER BY key")
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
        let mut tx = self.write_tx().await?;
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
        let mut tx = self.write_tx().await?;
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
        let messages = outbox(&applied);
        let records = insert_outbox(&mut tx, stage, messages).await?;
        tx.commit().await?;
        Ok((applied, records))
    }

    async fn pending_outbox(&self, stage: &str) -> Result<Vec<OutboxRecord>, StoreError> {
        let corrupt =
            |table: &'static str, column: &'static str, value: &str| StoreError::Corrupt {
                table,
                column,
                value: value.to_owned(),
            };
        let legacy = sqlx::query(
            "SELECT seq, topic, key, value, headers FROM outbox WHERE stage = ? ORDER BY seq",
        )
        .bind(stage)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(legacy.len());
        for row in &legacy {
            let topic: &str = row.try_get("topic")?;
            let headers: &str = row.try_get("headers")?;
            let seq: i64 = row.try_get("seq")?;
            out.push(OutboxRecord {
                seq: seq - LEGACY_OUTBOX_BASE,
                message: KeyedMessage {
                    topic: Topic::from_name(topic)
                        .ok_or_else(|| corrupt("outbox", "topic", topic))?,
                    key: row.try_get("key")?,
                    value: row.try_get("value")?,
                    headers: serde_json::from_str(headers)
                        .map_err(|_| corrupt("outbox", "headers", headers))?,
                },
            });
        }
        let batches =
            sqlx::query("SELECT seq, messages FROM outbox_batches WHERE stage = ? ORDER BY seq")
                .bind(stage)
                .fetch_all(&self.pool)
                .await?;
        for row in &batches {
            let seq: i64 = row.try_get("seq")?;
            let blob: &[u8] = row.try_get("messages")?;
            let messages: Vec<StoredMessage<'_>> = postcard::from_bytes(blob)
                .map_err(|e| corrupt("outbox_batches", "messages", &format!("seq {seq}: {e}")))?;
            for m in messages {
                out.push(OutboxRecord {
                    seq,
                    message: KeyedMessage {
                        topic: Topic::from_name(&m.topic)
                            .ok_or_else(|| corrupt("outbox_batches", "messages", &m.topic))?,
                        key: m.key.into_owned(),
                        value: m.value.into_owned(),
                        headers: m.headers.into_owned(),
                    },
                });
            }
        }
        Ok(out)
    }

    async fn delete_outbox(&self, stage: &str, through_seq: i64) -> Result<(), StoreError> {
        let _lock = self.write_lock.lock().await;
        let legacy_through = if through_seq < 0 {
            through_seq + LEGACY_OUTBOX_BASE
        } else {
            i64::MAX
        };
        sqlx::query("DELETE FROM outbox WHERE stage = ? AND seq <= ?")
            .bind(stage)
            .bind(legacy_through)
            .execute(&self.pool)
            .await?;
        if through_seq >= 0 {
            sqlx::query("DELETE FROM outbox_batches WHERE stage = ? AND seq <= ?")
                .bind(stage)
                .bind(through_seq)
                .execute(&self.pool)
                .await?;
        }
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
             VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(&v.plugin)
        .bind(&v.sha256)
        .bind(&v.component)
        .bind(serde_json::to_string(&v.config)?)
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
             FROM plugin_versions WHERE seq > ? ORDER BY seq",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let config: &str = row.try_get("config")?;
                Ok(crate::store::SharedPluginVersion {
                    seq: row.try_get("seq")?,
                    plugin: row.try_get("plugin")?,
                    sha256: row.try_get("sha256")?,
                    component: row.try_get("component")?,
                    config: serde_json::from_str(config).map_err(|_| StoreError::Corrupt {
                        table: "plugin_versions",
                        column: "config",
                        value: config.to_owned(),
                    })?,
                    source: row.try_get("source")?,
                    origin: row.try_get("origin")?,
                })
            })
            .collect()
    }

    async fn claim_checkpoint(&self, group: &str) -> Result<(i64, Option<Checkpoint>), StoreError> {
        let mut tx = self.write_tx().await?;
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO stream_checkpoints (consumer_group, bus_id, positions, state, \
             updated_at, epoch) VALUES (?, '', '[]', x'', ?, 1) ON CONFLICT (consumer_group) \
             DO UPDATE SET epoch = epoch + 1 RETURNING epoch",
        )
        .bind(group)
        .bind(format_rfc3339_ms(now_ms()))
        .fetch_one(&mut *tx)
        .await?;
        let cp = load_checkpoint(&mut tx, group).await?;
        tx.commit().await?;
        Ok((epoch, cp))
    }

    async fn current_tariffs(&self) -> Result<Vec<TariffRow>, StoreError> {
        let sql = format!(
            "SELECT {TARIFF_COLUMNS} FROM tariffs WHERE is_active = 1 ORDER BY region, tariff_id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(tariff_row).collect()
    }

    async fn tariff_history(
        &self,
        region: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TariffRow>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {TARIFF_COLUMNS} FROM tariffs"));
        if let Some(region) = region {
            qb.push(" WHERE region = ");
            qb.push_bind(region);
        }
        qb.push(" ORDER BY effective_from DESC, rowid DESC LIMIT ");
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
        let mut qb: QueryBuilder<Sqlite> = match &query.meter_id {
            // Keyed (window_start, meter_id) with no index by meter
            // (migration 0008): walk the distinct window starts of the range
            // along the key, one seek each, and look the meter up in each.
            Some(m) => {
                let mut qb = QueryBuilder::new(format!(
                    "WITH RECURSIVE starts(ws) AS (SELECT MIN(window_start) FROM {table} WHERE 1 = 1"
                ));
                push_time_filters(&mut qb, query);
                qb.push(format!(
                    " UNION ALL SELECT (SELECT MIN(window_start) FROM {table} \
                     WHERE window_start > starts.ws"
                ));
                if let Some(to) = query.to_ms {
                    qb.push(" AND window_start < ");
                    qb.push_bind(format_rfc3339_ms(to));
                }
                qb.push(format!(
                    ") FROM starts WHERE starts.ws IS NOT NULL) \
                     SELECT {AGG_COLUMNS} FROM starts JOIN {table} \
                     ON window_start = starts.ws AND meter_id = "
                ));
                qb.push_bind(m.as_str());
                if let Some(r) = &query.region {
                    qb.push(" AND region = ");
                    qb.push_bind(r.as_str());
                }
                qb
            }
            None => {
                let mut qb =
                    QueryBuilder::new(format!("SELECT {AGG_COLUMNS} FROM {table} WHERE 1 = 1"));
                push_window_filters(&mut qb, query);
                qb
            }
        };
        qb.push(" ORDER BY window_start, meter_id LIMIT ");
        qb.push_bind(i64::from(query.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(|r| meter_aggregate(r, table)).collect()
    }

    async fn regional_aggregates(
        &self,
        query: &AggregateQuery,
    ) -> Result<Vec<RegionalAggregate>, StoreError> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {REGIONAL_COLUMNS} FROM aggregates_1m_regional WHERE 1 = 1"
        ));
        push_window_filters(&mut qb, query);
        qb.push(" ORDER BY window_start, region LIMIT ");
        qb.push_bind(i64::from(query.limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(regional_aggregate).collect()
    }

    async fn count_readings_1m(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(count), 0) FROM aggregates_1m")
            .fetch_one(&self.pool)
            .await?;
        count_col(n, "aggregates_1m", "count")
    }

    async fn count_raw_readings(&self) -> Result<u64, StoreError> {
        if let Some(archive) = &self.archive {
            return archive.count().await;
        }
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
        let r = self.retention;
        let cutoff_ms = |keep: Duration| {
            now_ms.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
        };
        let cutoff = |keep: Duration| format_rfc3339_ms(cutoff_ms(keep));
        Ok(RetentionReport {
            raw_readings: match &self.archive {
                Some(archive) => archive.delete_before(cutoff_ms(r.raw_readings)).await?,
                None => {
                    self.delete_before(
                        "DELETE FROM raw_readings WHERE reading_id IN \
                         (SELECT reading_id FROM raw_readings WHERE timestamp < ? LIMIT ?)",
                        &cutoff(r.raw_readings),
                    )
                    .await?
                }
            },
            aggregates_1m: self
                .delete_before(
                    "DELETE FROM aggregates_1m WHERE (window_start, meter_id) IN \
                     (SELECT window_start, meter_id FROM aggregates_1m \
                      WHERE window_start < ? ORDER BY window_start LIMIT ?)",
                    &cutoff(r.aggregates_1m),
                )
                .await?,
            aggregates_15m: self
                .delete_before(
                    "DELETE FROM aggregates_15m WHERE (window_start, meter_id) IN \
                     (SELECT window_start, meter_id FROM aggregates_15m \
                      WHERE window_start < ? ORDER BY window_start LIMIT ?)",
                    &cutoff(r.aggregates_15m),
                )
                .await?,
            aggregates_1m_regional: self
                .delete_before(
                    "DELETE FROM aggregates_1m_regional WHERE (region, window_start) IN \
                     (SELECT region, window_start FROM aggregates_1m_regional \
                      WHERE window_start < ? LIMIT ?)",
                    &cutoff(r.aggregates_1m),
                )
                .await?,
        })
    }
}

impl SqliteStore {
    /// Runs a `… < ? LIMIT ?` delete in batches of [`RETENTION_BATCH`], each
    /// its own short transaction, until nothing is left; returns the total.
    async fn delete_before(&self, sql: &'static str, cutoff: &str) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let _lock = self.write_lock.lock().await;
            let done = sqlx::query(sql)
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

fn push_window_filters<'a>(qb: &mut QueryBuilder<'a, Sqlite>, query: &'a AggregateQuery) {
    if let Some(r) = &query.region {
        qb.push(" AND region = ");
        qb.push_bind(r.as_str());
    }
    push_time_filters(qb, query);
}

/// `from_ms` and `to_ms` of `query` on `window_start`.
fn push_time_filters(qb: &mut QueryBuilder<'_, Sqlite>, query: &AggregateQuery) {
    if let Some(from) = query.from_ms {
        qb.push(" AND window_start >= ");
        qb.push_bind(format_rfc3339_ms(from));
    }
    if let Some(to) = query.to_ms {
        qb.push(" AND window_start < ");
        qb.push_bind(format_rfc3339_ms(to));
    }
}

/// Saves a checkpoint, fenced by its epoch (see [`Checkpoint`]).
async fn save_checkpoint(tx: &mut SqliteConnection, cp: &Checkpoint) -> Result<(), StoreError> {
    let positions = serde_json::to_string(&cp.positions)?;
    let updated_at = format_rfc3339_ms(now_ms());
    let done = if cp.epoch == 0 {
        sqlx::query(
            "INSERT INTO stream_checkpoints (consumer_group, bus_id, positions, state, \
             updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (consumer_group) DO UPDATE SET \
             bus_id = excluded.bus_id, positions = excluded.positions, \
             state = excluded.state, updated_at = excluded.updated_at",
        )
        .bind(&cp.group)
        .bind(&cp.bus_id)
        .bind(&positions)
        .bind(cp.state.as_slice())
        .bind(&updated_at)
        .execute(&mut *tx)
        .await?
    } else {
        sqlx::query(
            "UPDATE stream_checkpoints SET bus_id = ?, positions = ?, state = ?, \
             updated_at = ? WHERE consumer_group = ? AND epoch = ?",
        )
        .bind(&cp.bus_id)
        .bind(&positions)
        .bind(cp.state.as_slice())
        .bind(&updated_at)
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
    conn: &mut SqliteConnection,
    group: &str,
) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query(
        "SELECT bus_id, positions, state, epoch FROM stream_checkpoints \
         WHERE consumer_group = ?",
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
    let positions: &str = row.try_get("positions")?;
    Ok(Some(Checkpoint {
        group: group.to_owned(),
        epoch: row.try_get("epoch")?,
        bus_id: row.try_get("bus_id")?,
        positions: serde_json::from_str(positions).map_err(|_| StoreError::Corrupt {
            table: "stream_checkpoints",
            column: "positions",
            value: positions.to_owned(),
        })?,
        state,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_outbox_is_one_row_per_apply_and_older_rows_go_first() {
        let store = SqliteStore::open("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        let msg = |key: &str| KeyedMessage {
            topic: Topic::Aggregates1m,
            key: key.into(),
            value: format!("{{\"meterId\":\"{key}\"}}").into_bytes(),
            headers: vec![("type".into(), "METER_1M".into())],
        };
        // A message an earlier build left, one row per message.
        sqlx::query(
            "INSERT INTO outbox (stage, topic, key, value, headers) \
             VALUES ('s', 'aggregates_1m', 'old', x'7b7d', '[]')",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let none = Effects::default();
        let (_, first) = store
            .apply("s", &none, &|_| vec![msg("a"), msg("b")])
            .await
            .unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].seq, first[1].seq, "one batch, one seq");
        let (_, second) = store.apply("s", &none, &|_| vec![msg("c")]).await.unwrap();
        assert!(second[0].seq > first[0].seq);
        store
            .apply("other", &none, &|_| vec![msg("x")])
            .await
            .unwrap();
        let batches: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_batches")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(batches, 3);

        let keys = |records: &[OutboxRecord]| -> Vec<String> {
            records.iter().map(|r| r.message.key.clone()).collect()
        };
        let pending = store.pending_outbox("s").await.unwrap();
        assert_eq!(keys(&pending), ["old", "a", "b", "c"]);
        assert_eq!(pending[1].message, msg("a"), "stored as given");
        assert!(pending.windows(2).all(|w| w[0].seq <= w[1].seq));
        store.delete_outbox("s", pending[0].seq).await.unwrap();
        assert_eq!(
            keys(&store.pending_outbox("s").await.unwrap()),
            ["a", "b", "c"]
        );
        store.delete_outbox("s", first[1].seq).await.unwrap();
        assert_eq!(keys(&store.pending_outbox("s").await.unwrap()), ["c"]);
        store.delete_outbox("s", second[0].seq).await.unwrap();
        assert!(store.pending_outbox("s").await.unwrap().is_empty());
        assert_eq!(keys(&store.pending_outbox("other").await.unwrap()), ["x"]);
    }

    #[test]
    fn chunks_cover_exactly_with_few_shapes() {
        for n in [0usize, 1, 2, 3, 7, 100, 2047, 2048, 2049, 50_000] {
            let sizes: Vec<usize> = chunk_sizes(n, 2048).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n, "n = {n}");
            assert!(
                sizes.iter().all(|s| s.is_power_of_two() && *s <= 2048),
                "{sizes:?}"
            );
        }
        assert_eq!(chunk_sizes(13, 2048).collect::<Vec<_>>(), [8, 4, 1]);
        assert_eq!(max_chunk_rows(10), 2048);
        assert_eq!(max_chunk_rows(14), 2048);
        assert!(max_chunk_rows(14) * 14 <= MAX_VARIABLES);
        assert_eq!(max_chunk_rows(20), 1024);
    }

    #[test]
    fn values_sql_has_one_placeholder_per_value() {
        let sql = values_sql("INSERT INTO t (a, b)", 2, 3, "RETURNING a");
        assert_eq!(
            sql,
            "INSERT INTO t (a, b) VALUES (?,?),(?,?),(?,?) RETURNING a"
        );
    }

    #[test]
    fn memory_urls() {
        assert!(is_memory_url("sqlite::memory:"));
        assert!(is_memory_url("sqlite://:memory:"));
        assert!(is_memory_url("sqlite://?mode=memory&cache=shared"));
        assert!(!is_memory_url("sqlite://segs.db"));
        assert!(!is_memory_url("sqlite:///var/lib/segs/memory.db"));
    }

    fn raw(meter: &str, ts: i64) -> RawReading {
        RawReading {
            meter_id: meter.to_owned(),
            region: "north".to_owned(),
            timestamp_ms: ts,
            power_kw: 1.5,
            voltage: Some(230.0),
            current: None,
            frequency: None,
            power_factor: None,
            temperature: None,
            energy_kwh: None,
        }
    }

    #[test]
    fn the_archive_file_sits_beside_the_store_file() {
        use super::super::sqlite_archive::ArchiveWriter;
        use std::path::Path;
        let at = |p: &str| ArchiveWriter::path_for(Path::new(p));
        assert_eq!(
            at("/var/lib/segs/segs.db"),
            Path::new("/var/lib/segs/segs-raw.db")
        );
        assert_eq!(at("data/store"), Path::new("data/store-raw"));
        assert_eq!(at("a.b.sqlite"), Path::new("a.b-raw.sqlite"));
    }

    /// The archive is a file of its own (its writes never wait for the
    /// stages' write lock): the store file's raw_readings stays empty, and
    /// what a store file from before the split held is moved over once.
    #[tokio::test]
    async fn windows_stored_keyed_by_meter_move_to_the_time_first_key() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("segs.db").display());
        // A store file as the builds before migration 0008 left it.
        let before: Vec<_> = MIGRATOR
            .migrations
            .iter()
            .filter(|m| m.version < 8)
            .cloned()
            .collect();
        let old = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(before),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        {
            let pool = SqlitePoolOptions::new()
                .connect_with(
                    SqliteConnectOptions::from_str(&url)
                        .unwrap()
                        .create_if_missing(true),
                )
                .await
                .unwrap();
            old.run(&pool).await.unwrap();
            sqlx::query(
                "INSERT INTO aggregates_1m (meter_id, region, window_start, avg_power_kw, \
                 max_power_kw, min_power_kw, energy_kwh_sum, count, power_sum) VALUES \
                 ('MTR-2', 'north', '2025-11-12T06:31:00.000Z', 1.0, 1.0, 1.0, 0.1, 1, 1.0), \
                 ('MTR-1', 'north', '2025-11-12T06:31:00.000Z', 2.0, 2.0, 2.0, 0.2, 1, 2.0), \
                 ('MTR-1', 'north', '2025-11-12T06:30:00.000Z', 3.0, 3.0, 3.0, 0.3, 1, 3.0)",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let store = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        let key: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM pragma_index_info('sqlite_autoindex_aggregates_1m_1')",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(key, ["window_start", "meter_id"]);
        let all = store
            .meter_aggregates(WindowWidth::OneMinute, &AggregateQuery::default())
            .await
            .unwrap();
        let rows: Vec<(&str, f64)> = all
            .iter()
            .map(|a| (a.meter_id.as_str(), a.avg_power_kw))
            .collect();
        assert_eq!(rows, [("MTR-1", 3.0), ("MTR-1", 2.0), ("MTR-2", 1.0)]);
        // And the upsert still merges into a moved row.
        let mut again = all[2].clone();
        again.count = 1;
        let merged = store
            .upsert_meter_aggregates(WindowWidth::OneMinute, &[again])
            .await
            .unwrap();
        assert_eq!(merged[0].count, 2);
    }

    #[tokio::test]
    async fn raw_readings_live_in_the_archive_file_and_old_rows_move_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segs.db");
        let url = format!("sqlite://{}", path.display());
        let store = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        store
            .insert_raw_readings(std::sync::Arc::from([raw("MTR-1", 0), raw("MTR-2", 0)]))
            .await
            .unwrap();
        assert_eq!(store.count_raw_readings().await.unwrap(), 2);
        let in_store: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM raw_readings")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(in_store, 0, "the store file's own table is not written");
        // A store file from before the split: rows in its own table, one of
        // them also in the archive already.
        sqlx::query(
            "INSERT INTO raw_readings (meter_id, region, timestamp, power_kw) VALUES \
             ('MTR-1', 'north', '1970-01-01T00:00:00.000Z', 1.5), \
             ('MTR-3', 'south', '1970-01-01T00:00:10.000Z', 2.5)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        drop(store);
        let again = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(
            again.count_raw_readings().await.unwrap(),
            3,
            "each reading once"
        );
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM raw_readings")
            .fetch_one(again.pool())
            .await
            .unwrap();
        assert_eq!(left, 0);
        let archive = path.with_file_name("segs-raw.db");
        let conn = rusqlite::Connection::open(&archive).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let south: String = conn
            .query_row(
                "SELECT meter_id FROM raw_readings WHERE region = 'south'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(south, "MTR-3");
    }

    #[tokio::test]
    async fn file_database_is_created_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested.db");
        let url = format!("sqlite://{}", path.display());
        let store = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        assert!(path.exists());
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(sync, 1, "synchronous=NORMAL");
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(busy, 10_000);

        // Reopening an existing file applies no migration twice.
        drop(store);
        let again = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN \
             ('users', 'meters', 'tariffs', 'alerts', 'invoices', 'invoice_line_items', \
              'tariff_rules', 'audit_logs', 'raw_readings', 'aggregates_1m', \
              'aggregates_15m', 'aggregates_1m_regional')",
        )
        .fetch_one(again.pool())
        .await
        .unwrap();
        assert_eq!(tables, 12);
    }

    #[tokio::test]
    async fn audit_rows_record_each_change() {
        let store = SqliteStore::open("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        let id = Uuid::new_v4();
        store
            .insert_alert(&NewAlert {
                id,
                alert_type: crate::messages::AlertType::Anomaly,
                severity: crate::messages::Severity::High,
                region: Some("Mumbai-North".into()),
                meter_id: Some("MTR-00000001".into()),
                message: "spike".into(),
                timestamp_ms: 1_000,
                metadata: serde_json::json!({}),
                dedupe_key: None,
                rule: None,
            })
            .await
            .unwrap();
        store.acknowledge_alert(id, "ops", 2_000).await.unwrap();
        store.acknowledge_alert(id, "ops", 2_500).await.unwrap(); // unchanged
        store.resolve_alert(id, 3_000).await.unwrap();
        store.resolve_alert(id, 3_500).await.unwrap(); // unchanged
        let rows: Vec<(String, String, Option<String>, String)> =
            sqlx::query_as("SELECT action, entity_id, actor, details FROM audit_logs ORDER BY id")
                .fetch_all(store.pool())
                .await
                .unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].0, "alert.acknowledged");
        assert_eq!(rows[0].1, id.to_string());
        assert_eq!(rows[0].2.as_deref(), Some("ops"));
        let d: serde_json::Value = serde_json::from_str(&rows[0].3).unwrap();
        assert_eq!(
            d,
            serde_json::json!({"from": "active", "to": "acknowledged", "at": "1970-01-01T00:00:02.000Z"})
        );
        assert_eq!(rows[1].0, "alert.resolved");
        assert_eq!(rows[1].2, None);
        let d: serde_json::Value = serde_json::from_str(&rows[1].3).unwrap();
        assert_eq!(d["from"], "acknowledged");
    }
}
