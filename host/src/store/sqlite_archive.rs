//! The embedded store's raw archive: `raw_readings` in a database file of
//! its own (`segs.db` → `segs-raw.db`, beside it), written on a thread of
//! its own over its own SQLite connection (rusqlite), with one prepared
//! single-row INSERT reused for every row of a call and the whole call one
//! `BEGIN IMMEDIATE` transaction.
//!
//! Why a file of its own: SQLite has one writer per database file, and the
//! archive (every reading) and the stages (windows, checkpoints, outbox)
//! each held the write lock often enough that the other waited on it,
//! in SQLite's busy handler, which sleeps in steps of milliseconds. Why not
//! through the sqlx pool like every other write: the pool's multi-row
//! statements bind each value through a boxed argument list and a formatted
//! timestamp string per row, on a connection worker shared with the
//! stages' transactions. Here a row is bound straight from the
//! [`RawReading`] (the timestamp written into one reused buffer), off the
//! async runtime.
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
//! Must not: hold anything but `raw_readings`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::sqlite::RETENTION_BATCH;
use super::{RawReading, StoreError};

/// `created_at` is bound once per call (the column's default would format
/// the clock for every row).
const INSERT: &str = "INSERT INTO raw_readings (meter_id, region, timestamp, power_kw, \
     voltage, current, frequency, power_factor, temperature, energy_kwh, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT DO NOTHING";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite-archive");

type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer thread is asked to do.
enum Job {
    Insert(Arc<[RawReading]>, Answer<()>),
    Count(Answer<u64>),
    /// Deletes readings older than the RFC 3339 cutoff; answers how many.
    DeleteBefore(String, Answer<u64>),
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

    /// Deletes the readings before `cutoff` (RFC 3339), in batches of
    /// [`RETENTION_BATCH`] as the pool's retention does; how many it
    /// deleted.
    pub(super) async fn delete_before(&self, cutoff: String) -> Result<u64, StoreError> {
        self.call(|answer| Job::DeleteBefore(cutoff, answer)).await
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
            "INSERT OR IGNORE INTO main.raw_readings (meter_id, region, timestamp, power_kw, voltage, \
             current, frequency, power_factor, temperature, energy_kwh, created_at) \
             SELECT meter_id, region, timestamp, power_kw, voltage, current, frequency, \
             power_factor, temperature, energy_kwh, created_at FROM store.raw_readings \
             ORDER BY reading_id",
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
    let mut ts = String::with_capacity(32);
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Insert(rows, answer) => {
                let _ = answer.send(write(&mut conn, &rows, &mut ts));
            }
            Job::Count(answer) => {
                let n = conn
                    .query_row("SELECT COUNT(*) FROM raw_readings", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .map(|n| n.max(0) as u64)
                    .map_err(|e| database("cannot count", e));
                let _ = answer.send(n);
            }
            Job::DeleteBefore(cutoff, answer) => {
                let _ = answer.send(delete_before(&conn, &cutoff));
            }
        }
    }
}

fn delete_before(conn: &Connection, cutoff: &str) -> Result<u64, StoreError> {
    let mut total = 0u64;
    let mut delete = conn
        .prepare_cached(
            "DELETE FROM raw_readings WHERE reading_id IN \
             (SELECT reading_id FROM raw_readings WHERE timestamp < ?1 LIMIT ?2)",
        )
        .map_err(|e| database("cannot prepare", e))?;
    loop {
        let done = delete
            .execute(params![cutoff, RETENTION_BATCH])
            .map_err(|e| database("cannot delete", e))? as u64;
        total += done;
        if done < RETENTION_BATCH as u64 {
            return Ok(total);
        }
    }
}

fn write(conn: &mut Connection, rows: &[RawReading], ts: &mut String) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| database("cannot begin", e))?;
    {
        let created_at = crate::time::format_rfc3339_ms(crate::time::now_ms());
        let mut insert = tx
            .prepare_cached(INSERT)
            .map_err(|e| database("cannot prepare", e))?;
        for r in rows {
            ts.clear();
            crate::time::write_rfc3339_ms(ts, r.timestamp_ms);
            insert
                .execute(params![
                    r.meter_id,
                    r.region,
                    ts.as_str(),
                    r.power_kw,
                    r.voltage,
                    r.current,
                    r.frequency,
                    r.power_factor,
                    r.temperature,
                    r.energy_kwh,
                    created_at,
                ])
                .map_err(|e| database("cannot insert", e))?;
        }
    }
    tx.commit().map_err(|e| database("cannot commit", e))
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
