//! The embedded store's raw archive writer: `raw_readings` inserts on a
//! thread of their own, over their own SQLite connection (rusqlite), with
//! one prepared single-row INSERT reused for every row of a call and the
//! whole call one `BEGIN IMMEDIATE` transaction.
//!
//! Why not through the sqlx pool like every other write: the archive is the
//! widest write of segs (every reading), and the pool's multi-row
//! statements bind each value through a boxed argument list and a
//! formatted timestamp string per row, on a connection worker shared with
//! the stages' transactions. Here a row is bound straight from the
//! [`RawReading`] (the timestamp written into one reused buffer), off the
//! async runtime, so the archive keeps up with ingest.
//!
//! Same semantics as the pool path it replaces for files: one transaction
//! per call, `ON CONFLICT DO NOTHING` on the (timestamp, meter_id) key (a
//! replayed reading is ignored), constraint failures (a NaN power) are
//! [`StoreError::Rejected`], anything else [`StoreError::Database`] (retried
//! by the stage). `sqlite::memory:` stores keep the pool path (a second
//! connection would see another database).
//!
//! Must not: be used for anything but `raw_readings`.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{RawReading, StoreError};

/// `created_at` is bound once per call (the column's default would format
/// the clock for every row).
const INSERT: &str = "INSERT INTO raw_readings (meter_id, region, timestamp, power_kw, \
     voltage, current, frequency, power_factor, temperature, energy_kwh, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT DO NOTHING";

type Job = (Arc<[RawReading]>, oneshot::Sender<Result<(), StoreError>>);

/// The writer thread's handle; dropping it lets the thread finish what it
/// was given, then stops it.
pub(super) struct ArchiveWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl ArchiveWriter {
    /// Opens a connection to the (already migrated) database file at `path`
    /// and starts the writer thread.
    pub(super) fn open(path: &Path, busy_timeout: Duration) -> Result<ArchiveWriter, StoreError> {
        let conn = Connection::open(path).map_err(|e| database("cannot open", e))?;
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
        let (tx, rx) = oneshot::channel();
        let gone = || {
            StoreError::Database(sqlx::Error::Io(std::io::Error::other(
                "raw archive: the writer thread stopped",
            )))
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send((readings, tx))
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

fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    let mut ts = String::with_capacity(32);
    while let Ok((rows, answer)) = jobs.recv() {
        let _ = answer.send(write(&mut conn, &rows, &mut ts));
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
