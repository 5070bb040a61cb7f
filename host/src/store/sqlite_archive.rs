//! The embedded store's raw archive: `raw_readings` in a database file of
//! its own (`segs.db` → `segs-raw.db`, beside it), written on a thread of
//! its own over its own SQLite connection (rusqlite), with prepared
//! many-row INSERTs reused for every row of a call and the whole call one
//! `BEGIN IMMEDIATE` transaction.
//!
//! The rows are in `raw_reading_rows`, keyed by (timestamp, meter_id) with
//! times as integer milliseconds and no rowid (one b-tree, a small key);
//! `raw_readings` is a view over it with the times as RFC 3339 text, as the
//! table read before (migration 0002 says why and what it measured).
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
//! Same semantics as the pool path (still used by `sqlite::memory:` stores,
//! where a second connection would see another database): one transaction
//! per call, `ON CONFLICT DO NOTHING` on the (timestamp, meter_id) key (a
//! replayed reading is ignored), constraint failures (a NaN power) are
//! [`StoreError::Rejected`], anything else [`StoreError::Database`] (retried
//! by the stage).
//!
//! Must not: hold anything but `raw_reading_rows` and its view.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::sqlite::RETENTION_BATCH;
use super::{RawReading, StoreError};

/// The columns of a row; `created_at` (no default) is the same clock
/// reading for every row of a call.
const INSERT_HEAD: &str = "INSERT INTO raw_reading_rows (timestamp, meter_id, region, power_kw, \
     voltage, current, frequency, power_factor, temperature, energy_kwh, created_at) VALUES ";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite-archive");

type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer thread is asked to do.
enum Job {
    Insert(Arc<[RawReading]>, Answer<()>),
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
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            super::sqlite::WAL_AUTOCHECKPOINT,
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
            Job::Count(answer) => {
                let n = conn
                    .query_row("SELECT COUNT(*) FROM raw_reading_rows", [], |r| {
                        r.get::<_, i64>(0)
                    })
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
            return Ok(total);
        }
    }
}

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
}
