//! The embedded store's raw archive: `raw_readings` in a database file of
//! its own (`segs.db` → `segs-raw.db`, beside it), written on a thread of
//! its own over its own SQLite connection (rusqlite), each call one
//! `BEGIN IMMEDIATE` transaction.
//!
//! The archive stage's readings are kept as batches
//! (`raw_reading_batches`, migration 0003 says why and what it measured):
//! one row per call and partition of `telemetry-readings`, holding the
//! readings as one JSON array of `[timestamp_ms, meter_id, region,
//! power_kw, voltage, current, frequency, power_factor, temperature,
//! energy_kwh]` arrays, their values copied from the records' own JSON text
//! (one scan, no number parsed; a record the scan declines goes through
//! [`RawReading::from_record`]). A replay is told by its offset: the
//! archived position of each partition of each bus log (`Bus::log_id`:
//! offsets start over in a new log) is stored in the same transaction, and
//! a record below it is skipped (so the calls of a partition must come in
//! offset order; the archive stage keeps them so). Rows written through
//! the row API ([`ArchiveWriter::insert`]: tests, files from before the
//! batches) are in `raw_reading_rows`, keyed by (timestamp, meter_id) with
//! integer milliseconds, where a replayed reading is ignored by the key.
//! `raw_readings` is a view over both, with the times as RFC 3339 text.
//!
//! Why a file of its own: SQLite has one writer per database file, and the
//! archive (every reading) and the stages (windows, checkpoints, outbox)
//! each held the write lock often enough that the other waited on it,
//! in SQLite's busy handler, which sleeps in steps of milliseconds. Why not
//! through the sqlx pool like every other write: the pool's multi-row
//! statements bind each value through a boxed argument list and a formatted
//! timestamp string per row, on a connection worker shared with the
//! stages' transactions. Here a row is bound straight from the
//! [`RawReading`], off the async runtime.
//!
//! The archive file's schema is `migrations/sqlite-archive/`. A store file
//! from before the split keeps an empty `raw_readings`; the rows it held are
//! moved into the archive file the first time it is opened.
//!
//! The row API has the pool path's semantics (still used by
//! `sqlite::memory:` stores, where a second connection would see another
//! database): one transaction per call, `ON CONFLICT DO NOTHING` on the
//! (timestamp, meter_id) key, constraint failures (a NaN power) are
//! [`StoreError::Rejected`], anything else [`StoreError::Database`]
//! (retried by the stage). Unlike the key, a batch does not fold two
//! records of one (meter, timestamp) into one: ingest's dedupe does that
//! before the bus, and the archive keeps what was accepted.
//!
//! Must not: hold anything but the raw readings, their positions and the
//! view.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::sqlite::RETENTION_BATCH;
use super::{RawReading, RawRecord, StoreError};

/// The columns of a row; `created_at` (no default) is the same clock
/// reading for every row of a call.
const INSERT_HEAD: &str = "INSERT INTO raw_reading_rows (timestamp, meter_id, region, power_kw, \
     voltage, current, frequency, power_factor, temperature, energy_kwh, created_at) VALUES ";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite-archive");

/// The page size of a new archive file. Its rows are batches of thousands
/// of readings, so most pages are overflow pages written once: with 16 KiB
/// pages the writer thread took 8 % less CPU than with SQLite's 4 KiB (a
/// quarter of the writes, WAL and checkpoint alike), for the same bytes a
/// reading; 64 KiB took 16 % less but wrote 4 % more, and four pages of
/// 64 KiB a commit whatever it holds when the load is light. A file made
/// with other pages keeps them (it holds days of readings: rewriting it
/// at start would take minutes).
pub(super) const PAGE_SIZE: u32 = 16_384;

/// The WAL's size between automatic checkpoints, bytes (about the store's
/// 10,000 pages of 4 KiB).
const WAL_AUTOCHECKPOINT_BYTES: u32 = 40 << 20;

type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer thread is asked to do.
enum Job {
    Insert(Arc<[RawReading]>, Answer<()>),
    /// Archives one poll's records (offsets of the named bus log) as
    /// batches; answers the readings stored.
    Archive(String, Arc<[RawRecord]>, Answer<u64>),
    Count(Answer<u64>),
    /// Deletes readings older than the cutoff (ms since the epoch);
    /// answers how many.
    DeleteBefore(i64, Answer<u64>),
}

/// The writer thread's handle; dropping it lets the thread finish what it
/// was given, then stops it.
pub(super) struct ArchiveWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl ArchiveWriter {
    /// The archive file of the store file `store`: its stem with `-raw`
    /// (`segs.db` → `segs-raw.db`), in the same folder.
    pub(super) fn path_for(store: &Path) -> PathBuf {
        let stem = store.file_stem().unwrap_or_default().to_string_lossy();
        let name = match store.extension() {
            Some(ext) => format!("{stem}-raw.{}", ext.to_string_lossy()),
            None => format!("{stem}-raw"),
        };
        store.with_file_name(name)
    }

    /// Creates or migrates the archive file of the (already migrated) store
    /// file `store`, moves in what the store's own `raw_readings` still
    /// holds, and starts the writer thread.
    pub(super) async fn open(
        store: &Path,
        busy_timeout: Duration,
    ) -> Result<ArchiveWriter, StoreError> {
        let path = Self::path_for(store);
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            // Only a new file takes it: a file in WAL mode keeps its pages.
            .page_size(PAGE_SIZE)
            .create_if_missing(true)
            .busy_timeout(busy_timeout)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        pool.close().await;
        let conn = Connection::open(&path).map_err(|e| database("cannot open", e))?;
        conn.busy_timeout(busy_timeout)
            .map_err(|e| database("cannot set the busy timeout", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| database("cannot set WAL", e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| database("cannot set synchronous", e))?;
        conn.pragma_update(None, "cache_size", -i64::from(super::sqlite::CACHE_KIB))
            .map_err(|e| database("cannot set the cache size", e))?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(|e| database("cannot set temp_store", e))?;
        let page_size: u32 = conn
            .pragma_query_value(None, "page_size", |row| row.get(0))
            .map_err(|e| database("cannot read the page size", e))?;
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            WAL_AUTOCHECKPOINT_BYTES / page_size.max(512),
        )
        .map_err(|e| database("cannot set wal_autocheckpoint", e))?;
        move_legacy_rows(&conn, store)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("segs-raw-archive".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| {
                StoreError::Database(sqlx::Error::Io(std::io::Error::other(format!(
                    "raw archive: cannot start the writer thread: {e}"
                ))))
            })?;
        Ok(ArchiveWriter {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Inserts `readings` in one transaction (each reading once).
    pub(super) async fn insert(&self, readings: Arc<[RawReading]>) -> Result<(), StoreError> {
        self.call(|answer| Job::Insert(readings, answer)).await
    }

    /// Archives the readings among `records` as one batch per partition,
    /// skipping what a partition has archived already (see [`archive`]).
    pub(super) async fn archive(
        &self,
        log_id: &str,
        records: Arc<[RawRecord]>,
    ) -> Result<u64, StoreError> {
        let log_id = log_id.to_owned();
        self.call(|answer| Job::Archive(log_id, records, answer))
            .await
    }

    /// Readings in the archive.
    pub(super) async fn count(&self) -> Result<u64, StoreError> {
        self.call(Job::Count).await
    }

    /// Deletes the readings before `cutoff_ms`, in batches of
    /// [`RETENTION_BATCH`] as the pool's retention does; how many it
    /// deleted.
    pub(super) async fn delete_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        self.call(|answer| Job::DeleteBefore(cutoff_ms, answer))
            .await
    }

    async fn call<T>(&self, job: impl FnOnce(Answer<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let gone = || {
            StoreError::Database(sqlx::Error::Io(std::io::Error::other(
                "raw archive: the writer thread stopped",
            )))
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job(tx))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the rows a store file from before the split holds in its own
/// `raw_readings` into the archive (each once), then empties that table.
fn move_legacy_rows(conn: &Connection, store: &Path) -> Result<(), StoreError> {
    let store = store.to_string_lossy();
    conn.execute("ATTACH DATABASE ?1 AS store", params![store.as_ref()])
        .map_err(|e| database("cannot attach the store file", e))?;
    let moved = (|| {
        let legacy: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM store.sqlite_master WHERE type = 'table' \
             AND name = 'raw_readings') AND EXISTS (SELECT 1 FROM store.raw_readings)",
            [],
            |r| r.get(0),
        )?;
        if !legacy {
            return Ok(0);
        }
        // Rolled back when dropped uncommitted.
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let moved = tx.execute(
            "INSERT OR IGNORE INTO main.raw_reading_rows (timestamp, meter_id, region, power_kw, \
             voltage, current, frequency, power_factor, temperature, energy_kwh, created_at) \
             SELECT CAST(round((julianday(timestamp) - 2440587.5) * 86400000.0) AS INTEGER), \
             meter_id, region, power_kw, voltage, current, frequency, power_factor, \
             temperature, energy_kwh, \
             CAST(round((julianday(created_at) - 2440587.5) * 86400000.0) AS INTEGER) \
             FROM store.raw_readings ORDER BY timestamp, meter_id",
            [],
        )?;
        tx.execute("DELETE FROM store.raw_readings", [])?;
        tx.commit()?;
        Ok(moved)
    })();
    let detached = conn.execute_batch("DETACH DATABASE store");
    let moved = moved.map_err(|e| database("cannot move the store file's raw readings", e))?;
    detached.map_err(|e| database("cannot detach the store file", e))?;
    if moved > 0 {
        tracing::info!(
            readings = moved,
            "raw archive: moved the store file's raw_readings into the archive file"
        );
    }
    Ok(())
}

fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Insert(rows, answer) => {
                let _ = answer.send(write(&mut conn, &rows));
            }
            Job::Archive(log_id, records, answer) => {
                let _ = answer.send(archive(&mut conn, &log_id, &records));
            }
            Job::Count(answer) => {
                let n = conn
                    .query_row(
                        "SELECT (SELECT COUNT(*) FROM raw_reading_rows) + \
                         (SELECT COALESCE(SUM(readings), 0) FROM raw_reading_batches)",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .map(|n| n.max(0) as u64)
                    .map_err(|e| database("cannot count", e));
                let _ = answer.send(n);
            }
            Job::DeleteBefore(cutoff, answer) => {
                let _ = answer.send(delete_before(&conn, cutoff));
            }
        }
    }
}

fn delete_before(conn: &Connection, cutoff_ms: i64) -> Result<u64, StoreError> {
    let mut total = 0u64;
    let mut delete = conn
        .prepare_cached(
            "DELETE FROM raw_reading_rows WHERE (timestamp, meter_id) IN \
             (SELECT timestamp, meter_id FROM raw_reading_rows WHERE timestamp < ?1 \
              ORDER BY timestamp LIMIT ?2)",
        )
        .map_err(|e| database("cannot prepare", e))?;
    loop {
        let done = delete
            .execute(params![cutoff_ms, RETENTION_BATCH])
            .map_err(|e| database("cannot delete", e))? as u64;
        total += done;
        if done < RETENTION_BATCH as u64 {
            break;
        }
    }
    // A batch goes once its newest reading is past the cutoff, a few
    // batches (thousands of readings each) per statement.
    let mut delete = conn
        .prepare_cached(
            "DELETE FROM raw_reading_batches WHERE rowid IN \
             (SELECT rowid FROM raw_reading_batches WHERE last_ms < ?1 LIMIT ?2) \
             RETURNING readings",
        )
        .map_err(|e| database("cannot prepare", e))?;
    loop {
        let mut batches = 0usize;
        let mut rows = delete
            .query(params![cutoff_ms, BATCHES_PER_DELETE])
            .map_err(|e| database("cannot delete", e))?;
        while let Some(row) = rows.next().map_err(|e| database("cannot delete", e))? {
            batches += 1;
            total += row
                .get::<_, i64>(0)
                .map_err(|e| database("cannot delete", e))? as u64;
        }
        if batches < BATCHES_PER_DELETE {
            return Ok(total);
        }
    }
}

/// Batches a retention statement deletes at most.
const BATCHES_PER_DELETE: usize = 16;

/// Rows per INSERT statement: one statement of many rows costs SQLite less
/// per row than one statement per row (11 parameters each, far below
/// SQLite's limit of 32,766).
const ROWS_PER_INSERT: usize = 64;

/// The INSERT of `rows` rows.
fn insert_sql(rows: usize) -> String {
    const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let mut sql = String::with_capacity(INSERT_HEAD.len() + rows * (ROW.len() + 2) + 32);
    sql.push_str(INSERT_HEAD);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(ROW);
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

fn write(conn: &mut Connection, rows: &[RawReading]) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| database("cannot begin", e))?;
    {
        let created_at = crate::time::now_ms();
        let full = insert_sql(ROWS_PER_INSERT);
        let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
        let mut insert = tx
            .prepare_cached(&full)
            .map_err(|e| database("cannot prepare", e))?;
        for chunk in &mut chunks {
            bind_rows(&mut insert, chunk, created_at)?;
            insert
                .raw_execute()
                .map_err(|e| database("cannot insert", e))?;
        }
        // The rest one row at a time: two statements in the cache, not one
        // per remainder length.
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut insert = tx
                .prepare_cached(&insert_sql(1))
                .map_err(|e| database("cannot prepare", e))?;
            for row in rest.chunks(1) {
                bind_rows(&mut insert, row, created_at)?;
                insert
                    .raw_execute()
                    .map_err(|e| database("cannot insert", e))?;
            }
        }
    }
    tx.commit().map_err(|e| database("cannot commit", e))
}

/// Binds `rows` to a statement of [`insert_sql`]`(rows.len())`.
fn bind_rows(
    insert: &mut rusqlite::CachedStatement<'_>,
    rows: &[RawReading],
    created_at_ms: i64,
) -> Result<(), StoreError> {
    let bind = |insert: &mut rusqlite::CachedStatement<'_>, at: usize, v: &dyn rusqlite::ToSql| {
        insert
            .raw_bind_parameter(at, v)
            .map_err(|e| database("cannot bind", e))
    };
    for (i, r) in rows.iter().enumerate() {
        let at = i * 11;
        bind(insert, at + 1, &r.timestamp_ms)?;
        bind(insert, at + 2, &r.meter_id)?;
        bind(insert, at + 3, &r.region)?;
        bind(insert, at + 4, &r.power_kw)?;
        bind(insert, at + 5, &r.voltage)?;
        bind(insert, at + 6, &r.current)?;
        bind(insert, at + 7, &r.frequency)?;
        bind(insert, at + 8, &r.power_factor)?;
        bind(insert, at + 9, &r.temperature)?;
        bind(insert, at + 10, &r.energy_kwh)?;
        bind(insert, at + 11, &created_at_ms)?;
    }
    Ok(())
}

/// Archives one poll's records (see the migration
/// `0003_raw_reading_batches.sql`): in one transaction, per partition, the
/// records at or past the partition's archived position, as one row of
/// `raw_reading_batches`, and the position past the last record. Records
/// below the position are a replay and are skipped; records that are not
/// readings are skipped too, their offsets passed.
fn archive(conn: &mut Connection, log_id: &str, records: &[RawRecord]) -> Result<u64, StoreError> {
    let mut partitions: Vec<u32> = records.iter().map(|r| r.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| database("cannot begin", e))?;
    let created_at = crate::time::now_ms();
    let mut stored = 0u64;
    // About 100 bytes a reading.
    let mut rows = Vec::with_capacity(records.len() * 112 + 2);
    for p in partitions {
        let position: u64 = tx
            .prepare_cached(
                "SELECT next_offset FROM raw_archive_positions WHERE log_id = ?1 AND partition = ?2",
            )
            .and_then(|mut q| {
                q.query_row(params![log_id, p], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map_err(|e| database("cannot read the archived position", e))?
            .map_or(0, |n| n.max(0) as u64);
        let mut batch = Batch::default();
        rows.clear();
        rows.push(b'[');
        for r in records
            .iter()
            .filter(|r| r.partition == p && r.offset >= position)
        {
            batch.add_offset(r.offset);
            if let Some(ts) = encode_row(&r.value, &mut rows) {
                batch.add_reading(ts);
            }
        }
        rows.push(b']');
        let Some((first_offset, next_offset)) = batch.offsets else {
            continue; // all replayed
        };
        if let Some((first_ms, last_ms)) = batch.event_times {
            tx.prepare_cached(
                "INSERT INTO raw_reading_batches (log_id, partition, first_offset, \
                 next_offset, first_ms, last_ms, readings, created_at, rows) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut q| {
                q.execute(params![
                    log_id,
                    p,
                    offset_col(first_offset),
                    offset_col(next_offset),
                    first_ms,
                    last_ms,
                    batch.readings as i64,
                    created_at,
                    rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(&rows)),
                ])
            })
            .map_err(|e| database("cannot insert a batch", e))?;
            stored += batch.readings;
        }
        tx.prepare_cached(
            "INSERT INTO raw_archive_positions (log_id, partition, next_offset) \
             VALUES (?1, ?2, ?3) ON CONFLICT (log_id, partition) DO UPDATE \
             SET next_offset = max(next_offset, excluded.next_offset)",
        )
        .and_then(|mut q| q.execute(params![log_id, p, offset_col(next_offset)]))
        .map_err(|e| database("cannot store the archived position", e))?;
    }
    tx.commit().map_err(|e| database("cannot commit", e))?;
    Ok(stored)
}

/// An offset as SQLite's INTEGER (offsets stay far below 2^63).
fn offset_col(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// What one partition's batch covers.
#[derive(Default)]
struct Batch {
    /// (first, next) offset of the records taken.
    offsets: Option<(u64, u64)>,
    /// (oldest, newest) event time of the readings.
    event_times: Option<(i64, i64)>,
    readings: u64,
}

impl Batch {
    fn add_offset(&mut self, offset: u64) {
        let (first, next) = self.offsets.get_or_insert((offset, offset + 1));
        *first = (*first).min(offset);
        *next = (*next).max(offset + 1);
    }

    fn add_reading(&mut self, ts: i64) {
        let (first, last) = self.event_times.get_or_insert((ts, ts));
        *first = (*first).min(ts);
        *last = (*last).max(ts);
        self.readings += 1;
    }
}

/// Appends the reading of `value` to the JSON array `out` (which holds
/// `[` and the readings before) as `[timestamp_ms, meter_id, region,
/// power_kw, voltage, current, frequency, power_factor, temperature,
/// energy_kwh]`; answers its event time, or `None` (and appends nothing)
/// when it is not a reading. In the plain case the values are the
/// record's own JSON text, copied; else the record goes through
/// [`RawReading::from_record`] and the row is written by serde_json.
fn encode_row(value: &[u8], out: &mut Vec<u8>) -> Option<i64> {
    let start = out.len();
    if out.len() > 1 {
        out.push(b',');
    }
    let row = out.len();
    if let Some(ts) = crate::reading::WireFields::scan(value).and_then(|f| copy_fields(&f, out)) {
        return Some(ts);
    }
    out.truncate(row);
    let Some(r) = RawReading::from_record(value) else {
        out.truncate(start);
        return None;
    };
    let columns = (
        r.timestamp_ms,
        &r.meter_id,
        &r.region,
        r.power_kw,
        r.voltage,
        r.current,
        r.frequency,
        r.power_factor,
        r.temperature,
        r.energy_kwh,
    );
    if serde_json::to_writer(&mut *out, &columns).is_err() {
        out.truncate(start);
        return None;
    }
    Some(r.timestamp_ms)
}

/// The plain case of [`encode_row`]: every column of the scanned record
/// has its type (strings the scanner took have no escapes; numbers are
/// JSON numbers within f64), copied as it is. `None` leaves `out` to be
/// truncated by the caller.
fn copy_fields(f: &crate::reading::WireFields<'_>, out: &mut Vec<u8>) -> Option<i64> {
    use std::io::Write;
    let ts = crate::time::parse_rfc3339_ms(crate::reading::text(f.timestamp)?)?;
    let meter = string(f.meter_id)?;
    let region = string(f.region)?;
    write!(out, "[{ts},").ok()?;
    out.extend_from_slice(meter.as_bytes());
    out.push(b',');
    out.extend_from_slice(region.as_bytes());
    out.push(b',');
    out.extend_from_slice(number(f.power_kw)?.as_bytes());
    for v in [
        f.voltage,
        f.current,
        f.frequency,
        f.power_factor,
        f.temperature,
        f.energy_kwh,
    ] {
        out.push(b',');
        match v {
            None | Some("null") => out.extend_from_slice(b"null"),
            Some(_) => out.extend_from_slice(number(v)?.as_bytes()),
        }
    }
    out.push(b']');
    Some(ts)
}

/// A JSON string value as the scanner gave it, quotes included.
fn string(v: Option<&str>) -> Option<&str> {
    let v = v?;
    crate::json_scan::plain_str(v).map(|_| v)
}

/// A JSON number value as the scanner gave it, when serde_json would read
/// it into a finite f64: one with an exponent is parsed to be sure.
fn number(v: Option<&str>) -> Option<&str> {
    let v = crate::reading::number_text(v)?;
    if v.bytes().any(|b| b == b'e' || b == b'E') {
        crate::reading::number(Some(v))?;
    }
    Some(v)
}

/// A rusqlite error as the store reports it: constraint failures are bad
/// input ([`StoreError::Rejected`]), the rest database errors to retry.
fn database(what: &str, e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, msg) = &e {
        if f.code == rusqlite::ErrorCode::ConstraintViolation {
            return StoreError::Rejected(msg.clone().unwrap_or_else(|| e.to_string()));
        }
    }
    StoreError::Database(sqlx::Error::Io(std::io::Error::other(format!(
        "raw archive: {what}: {e}"
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(i: usize) -> RawReading {
        RawReading {
            meter_id: format!("MTR-{}", i % 50),
            region: if i % 2 == 0 { "north" } else { "south" }.into(),
            timestamp_ms: 1_700_000_000_000 + (i / 50) as i64 * 10_000,
            power_kw: i as f64 + 0.5,
            voltage: (i % 3 == 0).then_some(230.0),
            current: None,
            frequency: Some(50.0),
            power_factor: None,
            temperature: Some(-(i as f64)),
            energy_kwh: (i % 5 == 0).then_some(0.25),
        }
    }

    /// Row `i` as stored: (meter, region, timestamp, power, voltage,
    /// temperature, energy).
    type Stored = (
        String,
        String,
        String,
        f64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );

    /// What [`stored`] reads back for `r`, stored at `ts`.
    fn as_stored(r: &RawReading, ts: &str) -> Stored {
        (
            r.meter_id.clone(),
            r.region.clone(),
            ts.to_owned(),
            r.power_kw,
            r.voltage,
            r.temperature,
            r.energy_kwh,
        )
    }

    fn stored(conn: &Connection, meter: &str, ts: &str) -> Stored {
        conn.query_row(
            "SELECT meter_id, region, timestamp, power_kw, voltage, temperature, energy_kwh \
             FROM raw_readings WHERE meter_id = ?1 AND timestamp = ?2",
            params![meter, ts],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap()
    }

    /// A new archive file is made with [`PAGE_SIZE`] pages, in WAL mode.
    #[tokio::test]
    async fn a_new_archive_file_has_large_pages_and_a_wal() {
        use crate::store::{Store, StoreOptions, sqlite::SqliteStore};
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("segs.db");
        let url = format!("sqlite://{}", store.display());
        let writer = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        writer
            .insert_raw_readings(Arc::from([reading(1)]))
            .await
            .unwrap();
        assert_eq!(writer.count_raw_readings().await.unwrap(), 1);
        drop(writer);
        let conn = Connection::open(ArchiveWriter::path_for(&store)).unwrap();
        let page_size: u32 = conn
            .pragma_query_value(None, "page_size", |row| row.get(0))
            .unwrap();
        assert_eq!(page_size, PAGE_SIZE);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// An archive file of migration 0001 (text times, a rowid table) is
    /// moved into `raw_reading_rows` when opened: every row once, the same
    /// values, and `raw_readings` reads exactly as the old table did.
    #[tokio::test]
    async fn an_archive_of_text_times_is_moved_to_integer_times_unchanged() {
        use crate::store::{Store, StoreOptions, sqlite::SqliteStore};
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("segs.db");
        let archive = ArchiveWriter::path_for(&store);
        // The archive as 0001 left it.
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&archive)
            .create_if_missing(true);
        let pool = sqlx::sqlite::SqlitePool::connect_with(options)
            .await
            .unwrap();
        let first = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(MIGRATOR.migrations[..1].to_vec()),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        first.run(&pool).await.unwrap();
        let old: Vec<RawReading> = (0..150).map(reading).collect();
        for r in &old {
            sqlx::query(
                "INSERT INTO raw_readings (meter_id, region, timestamp, power_kw, voltage, \
                 current, frequency, power_factor, temperature, energy_kwh, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '2025-11-12T06:30:00.123Z')",
            )
            .bind(&r.meter_id)
            .bind(&r.region)
            .bind(crate::time::format_rfc3339_ms(r.timestamp_ms + 999))
            .bind(r.power_kw)
            .bind(r.voltage)
            .bind(r.current)
            .bind(r.frequency)
            .bind(r.power_factor)
            .bind(r.temperature)
            .bind(r.energy_kwh)
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;

        let url = format!("sqlite://{}", store.display());
        let writer = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(writer.count_raw_readings().await.unwrap(), 150);
        // A replay of an old reading is still a no-op.
        let mut replay = reading(7);
        replay.timestamp_ms += 999;
        writer
            .insert_raw_readings(Arc::from([replay]))
            .await
            .unwrap();
        assert_eq!(writer.count_raw_readings().await.unwrap(), 150);
        drop(writer);

        let conn = Connection::open(&archive).unwrap();
        // It keeps the pages it was made with.
        let page_size: u32 = conn
            .pragma_query_value(None, "page_size", |row| row.get(0))
            .unwrap();
        assert_eq!(page_size, 4096);
        for r in &old {
            let ts = crate::time::format_rfc3339_ms(r.timestamp_ms + 999);
            assert_eq!(stored(&conn, &r.meter_id, &ts), as_stored(r, &ts));
            let (ms, created): (i64, String) = conn
                .query_row(
                    "SELECT timestamp_ms, created_at FROM raw_readings \
                     WHERE meter_id = ?1 AND timestamp = ?2",
                    params![r.meter_id, ts],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .unwrap();
            assert_eq!(ms, r.timestamp_ms + 999);
            assert_eq!(created, "2025-11-12T06:30:00.123Z");
        }
    }

    /// The view gives each stored millisecond back as the RFC 3339 text
    /// segs writes everywhere else.
    #[test]
    fn the_view_reads_times_as_segs_formats_them() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATOR.migrations[0].sql.as_ref())
            .unwrap();
        conn.execute_batch(MIGRATOR.migrations[1].sql.as_ref())
            .unwrap();
        let times = [
            0,
            1,
            999,
            1_000,
            1_762_929_000_001,
            1_762_929_059_999,
            4_102_444_799_999,
        ];
        for (i, ms) in times.into_iter().enumerate() {
            conn.execute(
                "INSERT INTO raw_reading_rows (timestamp, meter_id, region, power_kw, created_at) \
                 VALUES (?1, ?2, 'r', 1.0, ?1)",
                params![ms, format!("MTR-{i}")],
            )
            .unwrap();
            let (ts, created): (String, String) = conn
                .query_row(
                    "SELECT timestamp, created_at FROM raw_readings WHERE meter_id = ?1",
                    params![format!("MTR-{i}")],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(ts, crate::time::format_rfc3339_ms(ms), "{ms}");
            assert_eq!(created, ts);
        }
    }

    /// A file store in `dir` (its archive file beside it), and the store
    /// file's path.
    async fn store_in(dir: &Path) -> (crate::store::sqlite::SqliteStore, PathBuf) {
        use crate::store::{StoreOptions, sqlite::SqliteStore};
        let store = dir.join("segs.db");
        let url = format!("sqlite://{}", store.display());
        let writer = SqliteStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        (writer, store)
    }

    #[tokio::test]
    async fn many_rows_per_statement_store_each_reading_once_and_whole() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let (writer, store) = store_in(dir.path()).await;
        // Two full statements and a rest of 22 rows; the second call
        // replays rows 100..150 (across a statement's edge) and adds 50.
        let first: Vec<RawReading> = (0..150).map(reading).collect();
        writer.insert_raw_readings(first.into()).await.unwrap();
        let mut second: Vec<RawReading> = (100..200).map(reading).collect();
        second.push(reading(180));
        writer.insert_raw_readings(second.into()).await.unwrap();
        assert_eq!(writer.count_raw_readings().await.unwrap(), 200);
        drop(writer);

        let conn = Connection::open(ArchiveWriter::path_for(&store)).unwrap();
        for i in [0, 63, 64, 70, 127, 128, 149, 150, 199] {
            let r = reading(i);
            let ts = crate::time::format_rfc3339_ms(r.timestamp_ms);
            assert_eq!(
                stored(&conn, &r.meter_id, &ts),
                as_stored(&r, &ts),
                "row {i}"
            );
        }
    }

    /// Of two rows with one key in a call, the first in the call is the one
    /// stored, whatever the order of the rest.
    #[tokio::test]
    async fn of_two_rows_with_one_key_in_a_call_the_first_is_stored() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let (writer, store) = store_in(dir.path()).await;
        let changed = |i: usize| RawReading {
            power_kw: -1.0,
            ..reading(i)
        };
        // Newest first (row i at 129 - i); a changed row 40 before its
        // original, a changed row 3 after its.
        let mut rows: Vec<RawReading> = (0..130).rev().map(reading).collect();
        rows.insert(10, changed(40));
        rows.push(changed(3));
        writer.insert_raw_readings(rows.into()).await.unwrap();
        assert_eq!(writer.count_raw_readings().await.unwrap(), 130);
        drop(writer);

        let conn = Connection::open(ArchiveWriter::path_for(&store)).unwrap();
        for (i, expected) in [
            (0, reading(0)),
            (3, reading(3)),
            (40, changed(40)),
            (64, reading(64)),
            (129, reading(129)),
        ] {
            let ts = crate::time::format_rfc3339_ms(expected.timestamp_ms);
            assert_eq!(
                stored(&conn, &expected.meter_id, &ts),
                as_stored(&expected, &ts),
                "row {i}"
            );
        }
    }

    /// The bus log the tests' offsets are in.
    const LOG: &str = "embedded-0000000000000001";

    /// `reading(i)` as ingest publishes it on the bus (with fields the
    /// archive does not keep), at `offset` of `partition`.
    fn record(i: usize, partition: u32, offset: u64) -> RawRecord {
        let r = reading(i);
        let v = serde_json::json!({
            "readingId": format!("r-{i}"),
            "meterId": r.meter_id,
            "timestamp": crate::time::format_rfc3339_ms(r.timestamp_ms),
            "powerKw": r.power_kw,
            "voltage": r.voltage,
            "current": r.current,
            "frequency": r.frequency,
            "powerFactor": r.power_factor,
            "temperature": r.temperature,
            "energyKwh": r.energy_kwh,
            "region": r.region,
            "metadata": {"mode": "normal", "phases": [1, 2]},
            "receivedAt": "2025-11-12T06:30:00.123Z",
        });
        RawRecord {
            partition,
            offset,
            value: serde_json::to_vec(&v).unwrap().into(),
        }
    }

    /// Every column of every row of `raw_readings` but `created_at`, in key
    /// order.
    fn every_row(conn: &Connection) -> Vec<Vec<rusqlite::types::Value>> {
        let mut q = conn
            .prepare(
                "SELECT meter_id, region, timestamp, power_kw, voltage, current, frequency, \
                 power_factor, temperature, energy_kwh, timestamp_ms FROM raw_readings \
                 ORDER BY timestamp_ms, meter_id",
            )
            .unwrap();
        q.query_map([], |r| (0..11).map(|i| r.get(i)).collect())
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Records archived as batches read back through `raw_readings` exactly
    /// as the same readings inserted as rows do: same columns, same types,
    /// same values (nulls, integral numbers, escaped strings included).
    #[tokio::test]
    async fn archived_records_read_back_as_the_rows_of_their_readings() {
        use crate::store::Store;
        let mut records: Vec<RawRecord> = (0..300)
            .map(|i| record(i, (i % 3) as u32, i as u64))
            .collect();
        // Plain and not: an escaped meter id and region (the serde_json
        // path), integral numbers, an exponent.
        records.push(RawRecord {
            partition: 1,
            offset: 1000,
            value: br#"{"meterId":"MTR-\u00e9\"q","region":"so\/uth","timestamp":"2025-11-12T06:30:00.5+01:00","powerKw":3,"voltage":2.3e2,"current":null,"energyKwh":0}"#.as_slice().into(),
        });
        records.push(RawRecord {
            partition: 1,
            offset: 1001,
            value: br#"{"meterId":"MTR-x","region":"r","timestamp":"2025-11-12T06:30:00Z","powerKw":-0.0,"frequency":1E-3}"#.as_slice().into(),
        });
        let rows: Vec<RawReading> = records
            .iter()
            .map(|r| RawReading::from_record(&r.value).unwrap())
            .collect();

        let batches = tempfile::tempdir().unwrap();
        let (writer, store) = store_in(batches.path()).await;
        let stored = writer.archive_records(LOG, records.into()).await.unwrap();
        assert_eq!(stored, 302);
        assert_eq!(writer.count_raw_readings().await.unwrap(), 302);
        drop(writer);
        let as_rows = tempfile::tempdir().unwrap();
        let (writer, rows_store) = store_in(as_rows.path()).await;
        writer.insert_raw_readings(rows.into()).await.unwrap();
        drop(writer);

        let batches = Connection::open(ArchiveWriter::path_for(&store)).unwrap();
        let in_batches: i64 = batches
            .query_row("SELECT COUNT(*) FROM raw_reading_batches", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_batches, 3, "one batch per partition");
        let rows = Connection::open(ArchiveWriter::path_for(&rows_store)).unwrap();
        let (a, b) = (every_row(&batches), every_row(&rows));
        assert_eq!(a.len(), 302);
        assert_eq!(a, b);
    }

    /// A record at an offset its partition has archived (a replay after a
    /// crash, in any cut) is stored once; records that are not readings
    /// are skipped and their offsets passed; offsets of another bus log
    /// are another partition's.
    #[tokio::test]
    async fn a_replayed_record_is_archived_once() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let (writer, _) = store_in(dir.path()).await;
        let poll = |range: std::ops::Range<usize>| -> Arc<[RawRecord]> {
            range
                .map(|i| record(i, (i % 2) as u32, (i / 2) as u64))
                .collect()
        };
        assert_eq!(
            writer.archive_records(LOG, poll(0..100)).await.unwrap(),
            100
        );
        // From before the last commit: 60..100 again, then 40 new.
        assert_eq!(
            writer.archive_records(LOG, poll(60..140)).await.unwrap(),
            40
        );
        assert_eq!(writer.archive_records(LOG, poll(0..140)).await.unwrap(), 0);
        // Partition 2 holds no reading yet.
        let junk = |offset: u64, value: &'static [u8]| RawRecord {
            partition: 2,
            offset,
            value: value.into(),
        };
        let not_readings: Arc<[RawRecord]> = Arc::from([
            junk(0, b"not json"),
            junk(1, br#"{"meterId":"MTR-1"}"#),
            junk(
                2,
                br#"{"meterId":"MTR-1","region":"r","timestamp":"2025-11-12T06:30:00Z","powerKw":"5"}"#,
            ),
        ]);
        assert_eq!(writer.archive_records(LOG, not_readings).await.unwrap(), 0);
        // Partition 2's offsets up to 2 are passed, its 3 is new.
        let mut next = poll(140..148).to_vec();
        next.push(record(1000, 2, 2));
        next.push(record(1001, 2, 3));
        assert_eq!(writer.archive_records(LOG, next.into()).await.unwrap(), 9);
        assert_eq!(writer.count_raw_readings().await.unwrap(), 149);
        // Offsets of another log (a volatile bus in a new process, a bus
        // made anew) start over: not a replay.
        let restarted = writer
            .archive_records("memory-2", poll(0..10))
            .await
            .unwrap();
        assert_eq!(restarted, 10);
        assert_eq!(writer.count_raw_readings().await.unwrap(), 159);
    }

    /// Retention deletes a batch once its newest reading is past the
    /// cutoff, and reports its readings.
    #[tokio::test]
    async fn retention_deletes_batches_whose_newest_reading_is_past_the_cutoff() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let (writer, store) = store_in(dir.path()).await;
        // reading(i) is at START + (i / 50) * 10 s; one call per 100.
        for call in 0..40u64 {
            let records: Arc<[RawRecord]> = (call * 100..call * 100 + 100)
                .map(|i| record(i as usize, 0, i))
                .collect();
            writer.archive_records(LOG, records).await.unwrap();
        }
        writer
            .insert_raw_readings(Arc::from([reading(0), reading(3999)]))
            .await
            .unwrap();
        drop(writer);
        let archive = ArchiveWriter::open(&store, Duration::from_secs(5))
            .await
            .unwrap();
        // Calls 0..=24 end before reading 2500's time, and so does the row
        // of reading 0.
        let cutoff = reading(2500).timestamp_ms;
        let deleted = archive.delete_before(cutoff).await.unwrap();
        assert_eq!(deleted, 2501);
        assert_eq!(archive.count().await.unwrap(), 1501);
        assert_eq!(archive.delete_before(cutoff).await.unwrap(), 0);
    }

    /// A row [`encode_row`] writes reads back through SQLite's JSON as the
    /// row [`RawReading::from_record`] gives, for a record and every
    /// damaged copy of it (either both none, or the same columns).
    #[test]
    fn an_encoded_row_is_the_row_of_its_record() {
        const READING: &str = r#"{"readingId":"r-1","meterId":"MTR-00000001","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"energyKwh":0.0436,"voltage":230.5,"current":null,"frequency":50,"powerFactor":0.97,"temperature":-3.5,"region":"Mumbai-North","metadata":{"mode":"normal"}}"#;
        let conn = Connection::open_in_memory().unwrap();
        let mut read = conn
            .prepare(
                "SELECT json_extract(?1, '$[0]'), json_extract(?1, '$[1]'), \
                 json_extract(?1, '$[2]'), CAST(json_extract(?1, '$[3]') AS REAL), \
                 CAST(json_extract(?1, '$[4]') AS REAL), CAST(json_extract(?1, '$[5]') AS REAL), \
                 CAST(json_extract(?1, '$[6]') AS REAL), CAST(json_extract(?1, '$[7]') AS REAL), \
                 CAST(json_extract(?1, '$[8]') AS REAL), CAST(json_extract(?1, '$[9]') AS REAL)",
            )
            .unwrap();
        let mut rows = 0;
        for v in std::iter::once(READING.to_owned()).chain(crate::json_scan::damaged(READING)) {
            let mut out = b"[".to_vec();
            let ts = encode_row(v.as_bytes(), &mut out);
            let expected = RawReading::from_record(v.as_bytes());
            assert_eq!(ts, expected.as_ref().map(|r| r.timestamp_ms), "{v}");
            let Some(expected) = expected else {
                assert_eq!(out, b"[", "{v}");
                continue;
            };
            rows += 1;
            let row = std::str::from_utf8(&out[1..]).unwrap();
            let got = read
                .query_row(params![row], |r| {
                    Ok(RawReading {
                        timestamp_ms: r.get(0)?,
                        meter_id: r.get(1)?,
                        region: r.get(2)?,
                        power_kw: r.get(3)?,
                        voltage: r.get(4)?,
                        current: r.get(5)?,
                        frequency: r.get(6)?,
                        power_factor: r.get(7)?,
                        temperature: r.get(8)?,
                        energy_kwh: r.get(9)?,
                    })
                })
                .unwrap_or_else(|e| panic!("{v} as {row}: {e}"));
            assert_eq!(got, expected, "{v} as {row}");
        }
        assert!(rows > 1000, "only {rows} rows");
    }
}
