//! The embedded bus's journal: what [`super::MemoryBus`] acknowledges is on
//! disk first, so a crash (even SIGKILL) loses nothing that was
//! acknowledged, and consumer groups resume at their committed offsets.
//!
//! Storage: one SQLite file in WAL mode (`synchronous = FULL` when `fsync`
//! is on, so a commit survives power loss; `NORMAL` otherwise, which still
//! survives a killed process; 16 KiB pages, see [`PAGE_SIZE`], a 32 MiB page
//! cache, WAL checkpoints every 40 MiB). Tables:
//!
//! - `batches(topic, partition, base, count, max_ts, records)`: one row per
//!   `produce` call per partition (a rowid table, unique on (topic,
//!   partition, base): its rows are large); `records` is one BLOB holding the call's
//!   records for that partition in the encoding below; `base` is the offset
//!   of its first record, `max_ts` its newest record's timestamp (ms).
//! - `offsets(grp, topic, partition, next)`: every group's committed
//!   offsets, kept after the group's last member leaves (as Kafka keeps an
//!   empty group's offsets) until `delete_group`.
//! - `ends(topic, partition, next)`: the offset the next record of each
//!   partition gets, so offsets continue after a restart even when
//!   retention has deleted every row of a partition.
//! - `meta(key, value)`: format version and the partition count the journal
//!   was made with (a bus with another count is refused).
//!
//! Group commit: callers enqueue operations (an append of one produce call,
//! a group's new offsets, a group deletion) on a queue guarded by a mutex,
//! while still holding the bus lock that ordered them (partition locks for
//! appends, the groups lock for commits), so queue order is offset order.
//! One writer thread takes everything queued, writes it in ONE transaction,
//! then marks the partitions' durable ends (records become visible to
//! consumers only then) and answers each waiter. Under load many produce
//! and commit calls share one fsync.
//!
//! Failure: if a transaction fails, every waiter in it gets
//! [`BusError::Journal`], and so does every later operation: the bus is
//! failed until the process restarts and recovers from the file.
//!
//! Retention, by the writer thread at most once per second: a row is
//! deleted once every group subscribed to its topic has committed past it
//! and its newest record is older than `retain_min`; on a topic no group
//! subscribes to, rows older than the newest `retain_unconsumed` records of
//! their partition are deleted.
//!
//! Record encoding (hand-written, checked on decode): a blob is
//! `u8 version (1)`, `varint count`, then per record `varint key_len, key,
//! varint value_len, value, varint header_count, (varint name_len, name,
//! varint value_len, value)*, zigzag-varint timestamp_ms`. Varints are
//! LEB128 (7 bits per byte, least significant first, at most 10 bytes).
//! A blob of 512 bytes or more is stored compressed when that is shorter:
//! `u8 version (2)`, `varint length` of the plain encoding after its
//! version byte, then that encoding as one LZ4 block (readings' JSON
//! shrinks several times, and the journal's writes are the embedded bus's
//! largest cost). Files written before compression read as they were.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{BusError, Record, Topic};

/// Where and how the embedded bus keeps its journal.
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// The SQLite file (created if missing).
    pub path: PathBuf,
    /// fsync every commit (`synchronous = FULL`): acknowledged records
    /// survive power loss, not only a crashed process.
    pub fsync: bool,
    /// Committed rows are kept at least this long (by record timestamp), so
    /// a restart can rebuild what depends on recent records (dedupe).
    pub retain_min: Duration,
    /// Records kept per partition of a topic no group subscribes to.
    pub retain_unconsumed: usize,
}

const FORMAT_VERSION: i64 = 1;
/// The journal's page size. Every commit writes each page it changed into
/// the WAL whole: the `batches` leaf and index pages, `ends`, `offsets` and
/// the header page, besides the new rows' pages. With 64 KiB pages (the
/// size before) that was about 300 KiB a commit whatever it held: under
/// sustained load (about 225 commits/s) the WAL took 84 MB/s for about
/// 25 MB/s of records, and the process wrote 806 bytes to disk a reading
/// (558 with 16 KiB pages; `bench sustained`, shipped configuration). A
/// batch (about 30 KB compressed per partition and produce call) still
/// takes only a few overflow pages, one WAL frame (two writes) each;
/// 4 KiB pages wrote a little less and made four times the writes.
const PAGE_SIZE: i64 = 16_384;
/// A batch blob's first byte: the records as they are (the encoding below)…
const BLOB_PLAIN: u8 = 1;
/// …or that encoding after the byte, compressed (LZ4 block).
const BLOB_LZ4: u8 = 2;
/// Blobs shorter than this are kept plain (too small to gain).
const COMPRESS_FROM: usize = 512;

/// One partition's part of a produce call, encoded.
pub(crate) struct Append {
    pub topic: Topic,
    pub partition: u32,
    pub base: u64,
    pub count: u64,
    pub max_ts: i64,
    pub blob: Vec<u8>,
}

pub(crate) enum Op {
    Append(Vec<Append>),
    Offsets {
        group: String,
        offsets: Vec<(Topic, u32, u64)>,
    },
    DeleteGroup(String),
}

type Ack = oneshot::Sender<Result<(), String>>;

struct Queue {
    ops: Vec<(Op, Option<Ack>)>,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Set once a write failed; every later operation is refused with it.
    failed: Mutex<Option<String>>,
}

/// Called by the writer thread after each committed transaction with the
/// new durable end of every partition it appended to.
pub(crate) type OnDurable = Box<dyn Fn(&[(Topic, u32, u64)]) + Send>;

/// The journal handle held by the bus. Dropping it lets the writer finish
/// what is queued, then stops it.
pub(crate) struct Journal {
    path: PathBuf,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// For [`Journal::recent`]: reads do not queue behind writes (WAL).
    reader: Mutex<Connection>,
}

/// What the journal held when it was opened.
pub(crate) struct Recovered {
    /// Group → committed offsets.
    pub groups: HashMap<String, HashMap<(Topic, u32), u64>>,
    /// Per (topic, partition): records from the lowest offset anyone still
    /// needs, as (offset of the first, records), contiguous and ending where
    /// the next record's offset starts (no records: that offset, as first).
    pub logs: HashMap<(Topic, u32), (u64, Vec<Record>)>,
    /// Made when the file was created; names its offsets ([`crate::bus::Bus::log_id`]).
    pub log_id: String,
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Journal(format!("{}: {what}: {e}", path.display()))
}

fn open_connection(path: &Path, fsync: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // A new file gets PAGE_SIZE (before WAL is set, which writes the
    // header); a file made with another size is rewritten with it once.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    if page != PAGE_SIZE {
        tracing::info!(
            path = %path.display(),
            from = page,
            to = PAGE_SIZE,
            "bus journal: rewriting the file with smaller pages (once)"
        );
        // A WAL file's page size is fixed: leave WAL (which checkpoints
        // it), then VACUUM rewrites every page at the new size, atomically.
        conn.pragma_update(None, "journal_mode", "DELETE")?;
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.execute_batch("VACUUM")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
    // 32 MiB of page cache instead of SQLite's 2 MiB default: appends and
    // retention then rarely read pages back from the file.
    conn.pragma_update(None, "cache_size", -32 * 1024)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // WAL checkpoints every 40 MiB instead of every 1,000 pages (16 MiB):
    // under load the WAL takes tens of MB a second, so the default
    // checkpointed several times a second.
    conn.pragma_update(None, "wal_autocheckpoint", (40 << 20) / PAGE_SIZE)?;
    Ok(conn)
}

/// A journal made before `batches` was a rowid table (it was WITHOUT
/// ROWID, keyed by (topic, partition, base)) gets its rows copied into the
/// rowid table [`SCHEMA`] makes, once. A WITHOUT ROWID table keeps each row
/// in its key's B-tree, so a batch of hundreds of KB was read back whole
/// whenever a seek or a delete stepped on it (SQLite advises against rows
/// over a twentieth of a page there): about half the journal's time under
/// sustained load.
fn rowid_batches(conn: &Connection) -> rusqlite::Result<()> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'batches'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if !sql.is_some_and(|s| s.to_ascii_uppercase().contains("WITHOUT ROWID")) {
        return Ok(());
    }
    // SCHEMA makes the rowid table beside the renamed one (the rest of it
    // is there already).
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         ALTER TABLE batches RENAME TO batches_keyed;
         {SCHEMA}
         INSERT INTO batches (topic, partition, base, count, max_ts, records)
             SELECT topic, partition, base, count, max_ts, records FROM batches_keyed
             ORDER BY topic, partition, base;
         DROP TABLE batches_keyed;
         COMMIT;"
    ))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    base INTEGER NOT NULL,
    count INTEGER NOT NULL,
    max_ts INTEGER NOT NULL,
    records BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS batches_key ON batches (topic, partition, base);
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ends (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
";

impl Journal {
    /// Opens (or creates) the journal, checks its partition count, reads back
    /// what it holds and starts the writer thread.
    pub(crate) fn open(
        opts: &JournalOptions,
        partitions: u32,
        on_durable: OnDurable,
    ) -> Result<(Journal, Recovered), BusError> {
        let path = opts.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&path, "cannot create its folder", e))?;
        }
        let conn = open_connection(&path, opts.fsync).map_err(|e| err(&path, "cannot open", e))?;
        rowid_batches(&conn).map_err(|e| err(&path, "cannot convert its batches table", e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| err(&path, "cannot create tables", e))?;
        let stored: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'partitions'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| err(&path, "cannot read meta", e))?;
        match stored {
            Some(n) if n != i64::from(partitions) => {
                return Err(BusError::Journal(format!(
                    "{}: this bus journal was made with {n} partitions per topic, but bus.partitions \
                     is {partitions}; keep bus.partitions = {n}, or move the file away to start an \
                     empty bus",
                    path.display()
                )));
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('partitions', ?1), ('version', ?2)",
                    params![i64::from(partitions), FORMAT_VERSION],
                )
                .map_err(|e| err(&path, "cannot write meta", e))?;
            }
        }
        // The log's identity: a random number drawn when the file is made.
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('log_id', ?1) ON CONFLICT (key) DO NOTHING",
            params![(uuid::Uuid::new_v4().as_u128() as i64) & i64::MAX],
        )
        .map_err(|e| err(&path, "cannot write meta", e))?;
        let log_id: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
                r.get(0)
            })
            .map_err(|e| err(&path, "cannot read meta", e))?;
        let mut recovered = recover(&conn, partitions, opts.retain_unconsumed)
            .map_err(|e| err(&path, "cannot read back", e))?;
        recovered.log_id = format!("embedded-{log_id:016x}");
        let reader = open_connection(&path, opts.fsync)
            .map_err(|e| err(&path, "cannot open a reader", e))?;

        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                ops: Vec::new(),
                stop: false,
            }),
            wake: Condvar::new(),
            failed: Mutex::new(None),
        });
        let writer = Writer {
            conn,
            path: path.clone(),
            shared: shared.clone(),
            on_durable,
            retain_min: opts.retain_min,
            retain_unconsumed: opts.retain_unconsumed as u64,
        };
        let handle = std::thread::Builder::new()
            .name("segs-bus-journal".into())
            .spawn(move || writer.run())
            .map_err(|e| err(&path, "cannot start the writer thread", e))?;
        Ok((
            Journal {
                path,
                shared,
                writer: Some(handle),
                reader: Mutex::new(reader),
            },
            recovered,
        ))
    }

    /// The error every operation gets once a write has failed.
    pub(crate) fn failed(&self) -> Option<BusError> {
        self.shared
            .failed
            .lock()
            .as_ref()
            .map(|m| BusError::Journal(m.clone()))
    }

    /// Queues `op`; the receiver answers once it is committed. Call while
    /// holding the lock that ordered the operation.
    pub(crate) fn enqueue(&self, op: Op) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.push(op, Some(tx));
        rx
    }

    /// Queues `op` without waiting for it.
    pub(crate) fn enqueue_detached(&self, op: Op) {
        self.push(op, None);
    }

    fn push(&self, op: Op, ack: Option<Ack>) {
        let mut q = self.shared.queue.lock();
        q.ops.push((op, ack));
        drop(q);
        self.shared.wake.notify_one();
    }

    /// Queues `op` without a confirmation: it is committed in queue order
    /// with the rest, and a failure fails the journal (see [`Journal::failed`]).
    pub(crate) fn enqueue_unconfirmed(&self, op: Op) {
        self.push(op, None);
    }

    /// Waits for an enqueued operation's commit.
    pub(crate) async fn wait(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), BusError> {
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(BusError::Journal(m)),
            Err(_) => Err(BusError::Journal(
                "the journal writer stopped before confirming the write".into(),
            )),
        }
    }

    /// Records of `topic` with `timestamp_ms >= since_ms` still in the file,
    /// by partition and offset.
    pub(crate) fn recent(&self, topic: Topic, since_ms: i64) -> Result<Vec<Record>, BusError> {
        let conn = self.reader.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT records FROM batches WHERE topic = ?1 AND max_ts >= ?2
                 ORDER BY partition, base",
            )
            .map_err(|e| err(&self.path, "cannot read", e))?;
        let mut rows = stmt
            .query(params![topic.name(), since_ms])
            .map_err(|e| err(&self.path, "cannot read", e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| err(&self.path, "cannot read", e))? {
            let blob: Vec<u8> = row.get(0).map_err(|e| err(&self.path, "cannot read", e))?;
            let records =
                decode(Bytes::from(blob)).map_err(|e| err(&self.path, "corrupt batch", e))?;
            out.extend(records.into_iter().filter(|r| r.timestamp_ms >= since_ms));
        }
        Ok(out)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Reads every partition's records from the lowest offset a group still
/// needs (or the newest `retain_unconsumed` of an unsubscribed topic), the
/// partition ends and every group's offsets.
fn recover(
    conn: &Connection,
    partitions: u32,
    retain_unconsumed: usize,
) -> rusqlite::Result<Recovered> {
    let mut ends = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT topic, partition, next FROM ends")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let name: String = r.get(0)?;
            let Some(topic) = Topic::from_name(&name) else {
                tracing::warn!(topic = %name, "bus journal: unknown topic ignored");
                continue;
            };
            let p: u32 = r.get(1)?;
            let next: i64 = r.get(2)?;
            ends.insert((topic, p), next as u64);
        }
    }
    let mut groups: HashMap<String, HashMap<(Topic, u32), u64>> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT grp, topic, partition, next FROM offsets")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let group: String = r.get(0)?;
            let name: String = r.get(1)?;
            let Some(topic) = Topic::from_name(&name) else {
                continue;
            };
            let p: u32 = r.get(2)?;
            let next: i64 = r.get(3)?;
            groups
                .entry(group)
                .or_default()
                .insert((topic, p), next as u64);
        }
    }
    let mut logs = HashMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT base, count, records FROM batches
         WHERE topic = ?1 AND partition = ?2 AND base + count > ?3 ORDER BY base",
    )?;
    for topic in Topic::ALL {
        for p in 0..partitions {
            let end = ends.get(&(topic, p)).copied().unwrap_or(0);
            let needed: Option<u64> = groups
                .values()
                .filter_map(|g| g.get(&(topic, p)).copied())
                .min();
            let from = needed.unwrap_or_else(|| end.saturating_sub(retain_unconsumed as u64));
            let mut first: Option<u64> = None;
            let mut records = Vec::new();
            let mut rows = stmt.query(params![topic.name(), p, from as i64])?;
            while let Some(r) = rows.next()? {
                let base: i64 = r.get(0)?;
                let count: i64 = r.get(1)?;
                let blob: Vec<u8> = r.get(2)?;
                let base = base as u64;
                let expected = first.map(|f| f + records.len() as u64);
                if expected.is_some_and(|e| e != base) {
                    return Err(rusqlite::Error::InvalidColumnType(
                        0,
                        format!("{topic} partition {p}: gap at offset {base}"),
                        rusqlite::types::Type::Integer,
                    ));
                }
                let batch = decode(Bytes::from(blob)).map_err(|m| {
                    rusqlite::Error::InvalidColumnType(
                        2,
                        format!("{topic} partition {p} offset {base}: {m}"),
                        rusqlite::types::Type::Blob,
                    )
                })?;
                if batch.len() as i64 != count {
                    return Err(rusqlite::Error::InvalidColumnType(
                        1,
                        format!(
                            "{topic} partition {p} offset {base}: count {count} but {} records",
                            batch.len()
                        ),
                        rusqlite::types::Type::Integer,
                    ));
                }
                first.get_or_insert(base);
                records.extend(batch);
            }
            let first = first.unwrap_or(end);
            if first + (records.len() as u64) < end {
                return Err(rusqlite::Error::InvalidColumnType(
                    0,
                    format!(
                        "{topic} partition {p}: records end at {} but the next offset is {end}",
                        first + records.len() as u64
                    ),
                    rusqlite::types::Type::Integer,
                ));
            }
            logs.insert((topic, p), (first, records));
        }
    }
    Ok(Recovered {
        groups,
        logs,
        log_id: String::new(),
    })
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    shared: Arc<Shared>,
    on_durable: OnDurable,
    retain_min: Duration,
    retain_unconsumed: u64,
}

impl Writer {
    fn run(mut self) {
        let mut last_trim = Instant::now();
        loop {
            let (ops, stop) = {
                let mut q = self.shared.queue.lock();
                if q.ops.is_empty() && !q.stop {
                    let _ = self.shared.wake.wait_for(&mut q, Duration::from_secs(1));
                }
                (std::mem::take(&mut q.ops), q.stop)
            };
            if !ops.is_empty() {
                self.write(ops);
            }
            if stop {
                return;
            }
            if last_trim.elapsed() >= Duration::from_secs(1) {
                last_trim = Instant::now();
                if self.shared.failed.lock().is_none() {
                    if let Err(e) = self.trim() {
                        tracing::warn!(path = %self.path.display(), error = %e, "bus journal retention failed; will retry");
                    }
                }
            }
        }
    }

    fn write(&mut self, ops: Vec<(Op, Option<Ack>)>) {
        if let Some(m) = self.shared.failed.lock().clone() {
            for (_, ack) in ops {
                if let Some(a) = ack {
                    let _ = a.send(Err(m.clone()));
                }
            }
            return;
        }
        let mut durable: Vec<(Topic, u32, u64)> = Vec::new();
        let result = self.transaction(&ops, &mut durable);
        let answer = match result {
            Ok(()) => {
                (self.on_durable)(&durable);
                Ok(())
            }
            Err(e) => {
                let m = format!(
                    "{}: write failed: {e}; the embedded bus refuses every further write until segs \
                     restarts (a restart recovers everything acknowledged before)",
                    self.path.display()
                );
                tracing::error!("bus journal {m}");
                *self.shared.failed.lock() = Some(m.clone());
                Err(m)
            }
        };
        for (_, ack) in ops {
            if let Some(a) = ack {
                let _ = a.send(answer.clone());
            }
        }
    }

    fn transaction(
        &mut self,
        ops: &[(Op, Option<Ack>)],
        durable: &mut Vec<(Topic, u32, u64)>,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO batches (topic, partition, base, count, max_ts, records)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut offsets = tx.prepare_cached(
                "INSERT INTO offsets (grp, topic, partition, next) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (grp, topic, partition) DO UPDATE SET next = excluded.next",
            )?;
            let mut delete_group = tx.prepare_cached("DELETE FROM offsets WHERE grp = ?1")?;
            for (op, _) in ops {
                match op {
                    Op::Append(parts) => {
                        for a in parts {
                            insert.execute(params![
                                a.topic.name(),
                                a.partition,
                                a.base as i64,
                                a.count as i64,
                                a.max_ts,
                                a.blob
                            ])?;
                            let end = a.base + a.count;
                            match durable
                                .iter_mut()
                                .find(|(t, p, _)| *t == a.topic && *p == a.partition)
                            {
                                Some(d) => d.2 = d.2.max(end),
                                None => durable.push((a.topic, a.partition, end)),
                            }
                        }
                    }
                    Op::Offsets { group, offsets: o } => {
                        for (topic, p, next) in o {
                            offsets.execute(params![group, topic.name(), p, *next as i64])?;
                        }
                    }
                    Op::DeleteGroup(group) => {
                        delete_group.execute(params![group])?;
                    }
                }
            }
            let mut end = tx.prepare_cached(
                "INSERT INTO ends (topic, partition, next) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next = max(next, excluded.next)",
            )?;
            for (topic, p, next) in durable.iter() {
                end.execute(params![topic.name(), p, *next as i64])?;
            }
        }
        tx.commit()
    }

    /// Deletes rows every subscribed group has committed that are older than
    /// `retain_min`, and rows of unsubscribed topics past the newest
    /// `retain_unconsumed` records.
    ///
    /// The first row (by base) to keep ends what is
    /// deleted: rows are appended in base order with their newest record's
    /// time, so that is every deletable row but one whose time is a little
    /// older than a row's before it, which goes at a later trim. Found by
    /// walking the index from the lowest base, it costs a look at each row
    /// deleted; a `DELETE` testing every row below the committed offset
    /// also looked, every second, at each row of the last `retain_min`
    /// (under sustained load the journal thread's CPU climbed for the first
    /// minute, to 0.25-0.27 cores, mostly reading those rows' pages back).
    fn trim(&mut self) -> rusqlite::Result<()> {
        let cutoff = crate::time::now_ms()
            .saturating_sub(i64::try_from(self.retain_min.as_millis()).unwrap_or(i64::MAX));
        let tx = self.conn.transaction()?;
        {
            let mut parts = tx.prepare_cached(
                "SELECT e.topic, e.partition, e.next,
                        (SELECT MIN(o.next) FROM offsets o
                          WHERE o.topic = e.topic AND o.partition = e.partition)
                 FROM ends e",
            )?;
            let rows: Vec<(String, i64, i64, Option<i64>)> = parts
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut first_kept = tx.prepare_cached(
                "SELECT base FROM batches WHERE topic = ?1 AND partition = ?2
                 AND (base + count > ?3 OR max_ts >= ?4) ORDER BY base LIMIT 1",
            )?;
            let mut below = tx.prepare_cached(
                "DELETE FROM batches WHERE topic = ?1 AND partition = ?2 AND base < ?3",
            )?;
            for (topic, p, end, floor) in rows {
                // Kept: rows reaching the committed offset or newer than the
                // cutoff; with no group, rows reaching into the newest
                // `retain_unconsumed` records, whatever their age.
                let (keep_from, newer_than) = match floor {
                    Some(floor) => (floor, cutoff),
                    None => (end.saturating_sub(self.retain_unconsumed as i64), i64::MAX),
                };
                let kept: Option<i64> = first_kept
                    .query_row(params![topic, p, keep_from, newer_than], |r| r.get(0))
                    .optional()?;
                // None: no row is to be kept.
                below.execute(params![topic, p, kept.unwrap_or(i64::MAX)])?;
            }
        }
        tx.commit()
    }
}

// ---------------------------------------------------------------- encoding --

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Encodes records into one batch blob (see the module header).
pub(crate) fn encode(records: &[Record]) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|r| {
            r.key.len()
                + r.value.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>()
                + 16
        })
        .sum();
    let mut out = Vec::with_capacity(size + 6);
    out.push(BLOB_PLAIN);
    put_varint(&mut out, records.len() as u64);
    for r in records {
        put_bytes(&mut out, &r.key);
        put_bytes(&mut out, &r.value);
        put_varint(&mut out, r.headers.len() as u64);
        for (k, v) in &r.headers {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        let ts = r.timestamp_ms;
        put_varint(&mut out, ((ts << 1) ^ (ts >> 63)) as u64);
    }
    if out.len() < COMPRESS_FROM {
        return out;
    }
    // Compressed: the journal's writes (WAL, then checkpoint) are the
    // embedded bus's largest cost per record, and readings' JSON shrinks
    // several times under LZ4 for little CPU.
    let mut packed = Vec::with_capacity(out.len() / 2 + 16);
    packed.push(BLOB_LZ4);
    put_varint(&mut packed, (out.len() - 1) as u64);
    packed.extend_from_slice(&lz4_flex::block::compress(&out[1..]));
    if packed.len() < out.len() {
        packed
    } else {
        out
    }
}

struct Reader {
    blob: Bytes,
    at: usize,
}

impl Reader {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.blob.get(self.at) else {
                return Err(format!("truncated varint at byte {}", self.at));
            };
            self.at += 1;
            if i == 9 && b > 1 {
                return Err(format!("varint overflow at byte {}", self.at - 1));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint too long at byte {}", self.at))
    }

    fn bytes(&mut self) -> Result<Bytes, String> {
        let len = self.varint()?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| self.at.checked_add(l))
            .filter(|&e| e <= self.blob.len())
            .ok_or_else(|| format!("length {len} at byte {} runs past the end", self.at))?;
        let b = self.blob.slice(self.at..end);
        self.at = end;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| "header is not UTF-8".to_owned())
    }
}

/// Decodes a batch blob; keys and values are slices of `blob`.
pub(crate) fn decode(blob: Bytes) -> Result<Vec<Record>, String> {
    let Some(&version) = blob.first() else {
        return Err("empty batch".into());
    };
    let mut r = match version {
        BLOB_PLAIN => Reader { blob, at: 1 },
        BLOB_LZ4 => {
            let mut head = Reader { blob, at: 1 };
            let len = head.varint()?;
            let packed = &head.blob[head.at..];
            // LZ4 expands at most 255 times: a bound before allocating.
            if len > (packed.len() as u64).saturating_mul(255) {
                return Err(format!(
                    "unpacked length {len} exceeds what the batch can hold"
                ));
            }
            let mut plain = vec![0u8; len as usize];
            let n = lz4_flex::block::decompress_into(packed, &mut plain)
                .map_err(|e| format!("compressed batch: {e}"))?;
            if n != plain.len() {
                return Err(format!("compressed batch unpacks to {n} bytes, not {len}"));
            }
            Reader {
                blob: Bytes::from(plain),
                at: 0,
            }
        }
        _ => return Err(format!("unknown batch encoding version {version}")),
    };
    let count = r.varint()?;
    // Each record takes at least 4 bytes: a bound before allocating.
    if count > (r.blob.len() as u64) / 4 + 1 {
        return Err(format!("record count {count} exceeds the batch size"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let key = r.bytes()?;
        let value = r.bytes()?;
        let nh = r.varint()?;
        if nh > (r.blob.len() - r.at) as u64 / 2 {
            return Err(format!("header count {nh} exceeds the batch size"));
        }
        let mut headers = Vec::with_capacity(nh as usize);
        for _ in 0..nh {
            let k = r.string()?;
            let v = r.string()?;
            headers.push((k, v));
        }
        let z = r.varint()?;
        let timestamp_ms = ((z >> 1) as i64) ^ -((z & 1) as i64);
        out.push(Record {
            key,
            value,
            headers,
            timestamp_ms,
        });
    }
    if r.at != r.blob.len() {
        return Err(format!(
            "{} trailing bytes after {count} records",
            r.blob.len() - r.at
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::new("MTR-00000001", "{\"a\":1}", 1_700_000_000_123),
            Record {
                key: Bytes::new(),
                value: Bytes::from(vec![0u8; 300]),
                headers: vec![("h".into(), "ü".into()), (String::new(), String::new())],
                timestamp_ms: -5,
            },
            Record::new("k", "", i64::MAX),
            Record::new("k", "v", i64::MIN),
        ]
    }

    #[test]
    fn encoding_round_trips() {
        let records = sample();
        let blob = encode(&records);
        assert_eq!(decode(Bytes::from(blob)).unwrap(), records);
        assert_eq!(
            decode(Bytes::from(encode(&[]))).unwrap(),
            Vec::<Record>::new()
        );
    }

    /// Every prefix of `blob`, and `blob` with a byte more, are refused.
    fn assert_cut_or_padded_refused(blob: &[u8]) {
        for cut in 0..blob.len() {
            assert!(
                decode(Bytes::copy_from_slice(&blob[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut padded = blob.to_vec();
        padded.push(0);
        assert!(decode(Bytes::from(padded)).is_err());
    }

    #[test]
    fn truncated_or_padded_blobs_are_refused() {
        let blob = encode(&sample());
        assert_cut_or_padded_refused(&blob);
        let mut wrong_version = blob;
        wrong_version[0] = 9;
        assert!(decode(Bytes::from(wrong_version)).is_err());
    }

    /// Records like the readings on `telemetry-readings`: large enough to
    /// be compressed.
    fn readings() -> Vec<Record> {
        (0..200)
            .map(|i| {
                Record::new(
                    format!("MTR-{i:08}"),
                    format!(
                        "{{\"meterId\":\"MTR-{i:08}\",\"region\":\"north\",\
                         \"timestamp\":\"2025-11-12T06:30:{:02}.000Z\",\"powerKw\":{}.25}}",
                        i % 60,
                        i * 7
                    ),
                    1_700_000_000_000 + i,
                )
            })
            .collect()
    }

    #[test]
    fn large_batches_are_compressed_and_round_trip() {
        let records = readings();
        let blob = encode(&records);
        assert_eq!(blob[0], BLOB_LZ4);
        let plain_len: usize = records.iter().map(|r| r.key.len() + r.value.len()).sum();
        assert!(blob.len() * 2 < plain_len, "{} of {plain_len}", blob.len());
        assert_eq!(decode(Bytes::from(blob)).unwrap(), records);
        // Small ones stay plain.
        assert_eq!(encode(&records[..1])[0], BLOB_PLAIN);
    }

    #[test]
    fn damaged_compressed_blobs_are_refused() {
        let blob = encode(&readings());
        assert_eq!(blob[0], BLOB_LZ4);
        assert_cut_or_padded_refused(&blob);
        // A length the block cannot hold, and one it does not fill.
        let mut head = vec![BLOB_LZ4];
        put_varint(&mut head, u64::MAX);
        assert!(decode(Bytes::from(head)).is_err());
        let mut longer = vec![BLOB_LZ4];
        let mut r = Reader {
            blob: Bytes::from(blob.clone()),
            at: 1,
        };
        let len = r.varint().unwrap();
        put_varint(&mut longer, len + 1);
        longer.extend_from_slice(&blob[r.at..]);
        assert!(decode(Bytes::from(longer)).is_err());
    }

    #[test]
    fn varints_are_leb128() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader {
                blob: Bytes::from(out),
                at: 0,
            };
            assert_eq!(r.varint().unwrap(), v);
        }
        let mut r = Reader {
            blob: Bytes::from_static(&[0xff; 11]),
            at: 0,
        };
        assert!(r.varint().is_err());
    }
}
