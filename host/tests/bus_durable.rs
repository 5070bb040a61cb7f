//! The durable embedded bus: what it acknowledged is in its journal, and a
//! bus reopened after a crash restores records, committed offsets and the
//! next offsets; retention; the dedupe rebuild after a restart. Real files in
//! temp dirs. A "crash" leaks the bus (`std::mem::forget`): no clean
//! shutdown, no flush, the writer thread and its connection just stop being
//! used, and the file is opened again beside them, as a restarted process
//! would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use segs::bus::{Bus, BusError, Consumer, Delivered, JournalOptions, MemoryBus, Record, Topic};

const T: Topic = Topic::TelemetryReadings;
/// Long enough never to be hit on a loaded machine; tests never wait it out.
const PATIENCE: Duration = Duration::from_secs(30);

fn opts(path: &Path) -> JournalOptions {
    JournalOptions {
        path: path.to_owned(),
        fsync: true,
        retain_min: Duration::ZERO,
        retain_unconsumed: 10_000,
    }
}

fn open(path: &Path, partitions: u32) -> MemoryBus {
    MemoryBus::open_durable(partitions, 100_000, opts(path)).expect("open journal")
}

fn journal(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("bus.db")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Records numbered `from..to` over 7 meters, stamped `ts`.
fn records(from: u32, to: u32, ts: i64) -> Vec<Record> {
    (from..to)
        .map(|i| Record::new(format!("MTR-{:08}", i % 7), i.to_string(), ts))
        .collect()
}

async fn drain(c: &mut dyn Consumer) -> Vec<Delivered> {
    let mut all = Vec::new();
    loop {
        let got = c.poll(64, Duration::ZERO).await.expect("poll");
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

fn values(ds: &[Delivered]) -> Vec<u32> {
    let mut v: Vec<u32> = ds
        .iter()
        .map(|d| {
            std::str::from_utf8(&d.record.value)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    v.sort();
    v
}

/// No clean shutdown: the bus and its consumers are leaked as they are.
fn crash(bus: MemoryBus, consumers: Vec<Box<dyn Consumer>>) {
    std::mem::forget(consumers);
    std::mem::forget(bus);
}

fn ends(bus: &MemoryBus) -> Vec<u64> {
    bus.stats()
        .into_iter()
        .filter(|s| s.topic == T)
        .map(|s| s.end_offset)
        .collect()
}

#[tokio::test]
async fn a_group_resumes_at_its_committed_offsets_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 3);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 100, 1)).await.expect("produce");
    assert_eq!(drain(&mut *c).await.len(), 100);
    c.commit().await.expect("commit");
    bus.produce(T, records(100, 150, 1)).await.expect("produce");
    // Polled but not committed: must come back.
    let polled = c.poll(10, Duration::ZERO).await.expect("poll");
    assert!(!polled.is_empty());
    let ends_before = ends(&bus);
    crash(bus, vec![c]);

    let bus = open(&path, 3);
    assert_eq!(ends(&bus), ends_before, "offsets are where they were");
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe again");
    let again = drain(&mut *c).await;
    assert_eq!(values(&again), (100..150).collect::<Vec<_>>());
    // Offsets continue, never reused.
    bus.produce(T, records(150, 160, 1)).await.expect("produce");
    let fresh = drain(&mut *c).await;
    assert_eq!(values(&fresh), (150..160).collect::<Vec<_>>());
    for d in &fresh {
        assert!(d.offset >= ends_before[d.partition as usize], "{d:?}");
    }
    c.commit().await.expect("commit");
    crash(bus, vec![c]);

    let bus = open(&path, 3);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert!(drain(&mut *c).await.is_empty(), "everything was committed");
    // A group the journal never saw starts at the earliest record kept.
    let mut other = bus.subscribe("new", &[T]).await.expect("subscribe");
    assert!(drain(&mut *other).await.len() <= 160);
}

#[tokio::test]
async fn an_empty_group_keeps_its_offsets_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 10, 1)).await.expect("produce");
    assert_eq!(drain(&mut *c).await.len(), 10);
    c.commit().await.expect("commit");
    drop(c); // the group is empty now, its offsets stay
    bus.produce(T, records(10, 20, 1)).await.expect("produce");
    crash(bus, vec![]);

    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    let got = drain(&mut *c).await;
    assert_eq!(values(&got), (10..20).collect::<Vec<_>>());
    assert_eq!(got[0].offset, 10);
}

#[tokio::test]
async fn commit_positions_commits_exactly_those_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 10, 1)).await.expect("produce");
    let got = c.poll(100, Duration::ZERO).await.expect("poll");
    assert_eq!(got.len(), 10);

    let err = c
        .commit_positions(&[(T, 0, 11)])
        .await
        .expect_err("past the position");
    assert!(
        matches!(
            err,
            BusError::CommitBeyondPosition {
                offset: 11,
                position: 10,
                ..
            }
        ),
        "{err:?}"
    );
    // A partition this member does not own (partition 0 of alerts).
    let err = c
        .commit_positions(&[(Topic::Alerts, 0, 0)])
        .await
        .expect_err("not owned");
    assert!(matches!(err, BusError::Rebalanced { .. }), "{err:?}");

    c.commit_positions(&[(T, 0, 4)]).await.expect("commit 4");
    crash(bus, vec![c]);

    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    let got = drain(&mut *c).await;
    assert_eq!(got.first().map(|d| d.offset), Some(4));
    assert_eq!(values(&got), (4..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn commits_that_do_not_wait_land_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 10, 1)).await.expect("produce");
    assert_eq!(c.poll(100, Duration::ZERO).await.expect("poll").len(), 10);
    let err = c
        .commit_positions_soon(&[(T, 0, 11)])
        .await
        .expect_err("past the position");
    assert!(
        matches!(err, BusError::CommitBeyondPosition { .. }),
        "{err:?}"
    );
    c.commit_positions_soon(&[(T, 0, 4)])
        .await
        .expect("commit 4");
    c.commit_positions_soon(&[(T, 0, 7)])
        .await
        .expect("commit 7");
    // Counted at once (the lag bound and /readyz see it)...
    assert_eq!(bus.lag("g", &[T]).await.unwrap(), [(T, 0, 3)]);
    // ...and on disk, in order, once the bus has let its journal finish.
    drop(c);
    drop(bus);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert_eq!(values(&drain(&mut *c).await), (7..10).collect::<Vec<_>>());
    c.commit_soon().await.expect("commit all");
    drop(c);
    drop(bus);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert!(drain(&mut *c).await.is_empty());
}

/// A new one-partition journal at `path` holding records 0..10 (two
/// produce calls), group "g" committed at 3.
async fn ten_records_committed_at_three(path: &Path) {
    let bus = open(path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 6, 1)).await.expect("produce");
    bus.produce(T, records(6, 10, 1)).await.expect("produce");
    assert_eq!(c.poll(100, Duration::ZERO).await.expect("poll").len(), 10);
    c.commit_positions(&[(T, 0, 3)]).await.expect("commit 3");
}

/// The journal of [`ten_records_committed_at_three`] reopened: "g" gets
/// 3..10 again, and records produced now follow at 10.
async fn resumes_at_three(path: &Path) -> (MemoryBus, Box<dyn Consumer>) {
    let bus = open(path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert_eq!(values(&drain(&mut *c).await), (3..10).collect::<Vec<_>>());
    bus.produce(T, records(10, 12, 1))
        .await
        .expect("produce after");
    assert_eq!(values(&drain(&mut *c).await), [10, 11]);
    (bus, c)
}

#[tokio::test]
async fn a_journal_with_the_keyed_batches_table_converts_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    ten_records_committed_at_three(&path).await;
    // As builds before the rowid table left it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP INDEX batches_key;
         ALTER TABLE batches RENAME TO rowid_batches;
         CREATE TABLE batches (topic TEXT NOT NULL, partition INTEGER NOT NULL,
             base INTEGER NOT NULL, count INTEGER NOT NULL, max_ts INTEGER NOT NULL,
             records BLOB NOT NULL, PRIMARY KEY (topic, partition, base)) WITHOUT ROWID;
         INSERT INTO batches SELECT topic, partition, base, count, max_ts, records
             FROM rowid_batches;
         DROP TABLE rowid_batches;",
    )
    .unwrap();
    drop(conn);

    let (bus, c) = resumes_at_three(&path).await;
    drop(c);
    drop(bus);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'batches'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!sql.to_ascii_uppercase().contains("WITHOUT ROWID"), "{sql}");
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3, "each produce call's row once");
}

/// The journal's page size and journal mode, read from the file.
fn page_size_and_mode(path: &Path) -> (i64, String) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let page = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let mode = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    (page, mode)
}

/// A commit writes every page it changed into the WAL whole, so the page
/// size is what a commit costs at least: a new journal gets 16 KiB pages,
/// and one made with 64 KiB pages (builds before) is rewritten with them
/// once, keeping its records and offsets.
#[tokio::test]
async fn a_journal_made_with_large_pages_is_rewritten_with_small_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    ten_records_committed_at_three(&path).await;
    assert_eq!(page_size_and_mode(&path), (16_384, "wal".to_owned()));
    // As builds before left it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = DELETE; PRAGMA page_size = 65536; VACUUM; \
         PRAGMA journal_mode = WAL;",
    )
    .unwrap();
    drop(conn);
    assert_eq!(page_size_and_mode(&path), (65_536, "wal".to_owned()));

    let (bus, mut c) = resumes_at_three(&path).await;
    c.commit_positions(&[(T, 0, 12)]).await.expect("commit 12");
    drop(c);
    drop(bus);
    assert_eq!(page_size_and_mode(&path), (16_384, "wal".to_owned()));
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert!(drain(&mut *c).await.is_empty(), "resumes at 12");
    assert_eq!(ends(&bus), [12]);
}

#[tokio::test]
async fn commit_positions_on_the_volatile_bus() {
    let bus = MemoryBus::new(1, 10_000);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 10, 1)).await.expect("produce");
    assert_eq!(drain(&mut *c).await.len(), 10);
    c.commit_positions(&[(T, 0, 6)]).await.expect("commit 6");
    drop(c);
    let mut c = bus.subscribe("g", &[T]).await.expect("rejoin");
    assert_eq!(values(&drain(&mut *c).await), (6..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn what_produce_acknowledged_survives_with_and_without_fsync() {
    for fsync in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let path = journal(&dir);
        let o = JournalOptions {
            fsync,
            ..opts(&path)
        };
        let bus = MemoryBus::open_durable(3, 100_000, o.clone()).expect("open");
        // No group at all: the topic keeps its newest records.
        for i in 0..20 {
            bus.produce(T, records(i * 10, i * 10 + 10, 1))
                .await
                .expect("produce");
        }
        crash(bus, vec![]);
        let bus = MemoryBus::open_durable(3, 100_000, o).expect("reopen");
        let mut c = bus.subscribe("late", &[T]).await.expect("subscribe");
        let got = drain(&mut *c).await;
        assert_eq!(values(&got), (0..200).collect::<Vec<_>>(), "fsync {fsync}");
    }
}

#[tokio::test]
async fn records_are_visible_only_once_journaled() {
    // Every record a consumer sees was acknowledged-able: after a crash
    // right after a poll, the reopened bus has every polled record.
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 2);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    let producer = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                bus.produce(T, records(i * 20, i * 20 + 20, 1))
                    .await
                    .expect("produce");
            }
        })
    };
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 1000 && start.elapsed() < PATIENCE {
        seen.extend(c.poll(100, Duration::from_millis(50)).await.expect("poll"));
    }
    producer.await.expect("producer");
    crash(bus, vec![c]);
    let bus = open(&path, 2);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert_eq!(values(&drain(&mut *c).await), values(&seen));
    assert_eq!(seen.len(), 1000);
}

#[tokio::test]
async fn another_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 3);
    bus.produce(T, records(0, 5, 1)).await.expect("produce");
    drop(bus);
    let err = MemoryBus::open_durable(4, 100_000, opts(&path))
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, BusError::Journal(_)), "{err:?}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("3 partitions"), "{msg}");
    assert!(msg.contains("is 4"), "{msg}");
    // The right count still opens it.
    drop(open(&path, 3));
}

/// Waits until `done` holds (the writer trims at most once a second).
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn retention_deletes_only_committed_and_old_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let o = JournalOptions {
        retain_min: Duration::from_secs(3600),
        ..opts(&path)
    };
    let bus = MemoryBus::open_durable(1, 100_000, o.clone()).expect("open");
    let old = now_ms() - 2 * 3600 * 1000;
    let new = now_ms();
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 10, old)).await.expect("A: old"); // 0..10
    bus.produce(T, records(10, 20, new)).await.expect("B: new"); // 10..20
    bus.produce(T, records(20, 30, old)).await.expect("C: old"); // 20..30
    let got = c.poll(100, Duration::ZERO).await.expect("poll");
    assert_eq!(got.len(), 30);
    c.commit_positions(&[(T, 0, 20)])
        .await
        .expect("commit A, B");

    let in_journal = |bus: &MemoryBus| {
        let mut v: Vec<u32> = bus
            .recent(T, i64::MIN)
            .expect("recent")
            .iter()
            .map(|r| std::str::from_utf8(&r.value).unwrap().parse().unwrap())
            .collect();
        v.sort();
        v
    };
    assert!(
        eventually(|| !in_journal(&bus).contains(&0)).await,
        "A (committed, old) is never deleted"
    );
    // B is committed but recent; C is old but not committed.
    assert_eq!(in_journal(&bus), (10..30).collect::<Vec<_>>());
    assert_eq!(
        bus.recent(T, new).expect("recent").len(),
        10,
        "only B is that recent"
    );
    crash(bus, vec![c]);

    // After a restart, the group gets C again, offsets continue.
    let bus = MemoryBus::open_durable(1, 100_000, o).expect("reopen");
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    let got = drain(&mut *c).await;
    assert_eq!(values(&got), (20..30).collect::<Vec<_>>());
    assert_eq!(got[0].offset, 20);
    c.commit().await.expect("commit");
    bus.produce(T, records(30, 31, new)).await.expect("produce");
    assert_eq!(drain(&mut *c).await[0].offset, 30);
}

#[tokio::test]
async fn offsets_continue_when_retention_emptied_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 10, 1)).await.expect("produce");
    assert_eq!(drain(&mut *c).await.len(), 10);
    c.commit().await.expect("commit");
    assert!(
        eventually(|| bus.recent(T, i64::MIN).expect("recent").is_empty()).await,
        "committed rows past retain_min (0) are deleted"
    );
    crash(bus, vec![c]);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(10, 11, 1)).await.expect("produce");
    let got = drain(&mut *c).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].offset, 10);
}

#[tokio::test]
async fn unsubscribed_topics_keep_their_newest_records_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let o = JournalOptions {
        retain_unconsumed: 15,
        ..opts(&path)
    };
    let bus = MemoryBus::open_durable(1, 100_000, o.clone()).expect("open");
    for i in 0..5 {
        bus.produce(Topic::Alerts, records(i * 10, i * 10 + 10, 1))
            .await
            .expect("produce");
    }
    // Rows wholly below the newest 15 records go: 0..10, 10..20, 20..30.
    assert!(
        eventually(|| bus.recent(Topic::Alerts, i64::MIN).expect("recent").len() == 20).await,
        "old rows of an unconsumed topic are never deleted"
    );
    crash(bus, vec![]);
    let bus = MemoryBus::open_durable(1, 100_000, o).expect("reopen");
    let mut c = bus
        .subscribe("late", &[Topic::Alerts])
        .await
        .expect("subscribe");
    assert_eq!(values(&drain(&mut *c).await), (35..50).collect::<Vec<_>>());
}

// ------------------------------------------------------- dedupe rebuild --

/// A record as ingest publishes it: value JSON with the canonical timestamp,
/// stamped with the time it was received.
fn published(meter: &str, event_ms: i64, received_ms: i64) -> Record {
    let value = serde_json::json!({
        "readingId": format!("r-{meter}-{event_ms}"),
        "meterId": meter,
        "region": "Mumbai-North",
        "timestamp": segs::time::format_rfc3339_ms(event_ms),
        "powerKw": 1.5,
        "receivedAt": segs::time::format_rfc3339_ms(received_ms),
    });
    Record::new(meter.to_owned(), value.to_string(), received_ms)
}

fn key(meter: &str, event_ms: i64) -> String {
    format!(
        "reading:{meter}:{}",
        segs::time::format_rfc3339_ms(event_ms)
    )
}

#[tokio::test]
async fn dedupe_marks_are_rebuilt_for_readings_received_within_the_ttl() {
    use segs::dedupe::{Dedupe, KeyBatch, MemoryDedupe};

    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let o = JournalOptions {
        retain_min: Duration::from_secs(3600),
        ..opts(&path)
    };
    let bus = MemoryBus::open_durable(3, 100_000, o.clone()).expect("open");
    let now = now_ms();
    let event = 1_762_927_200_000;
    bus.produce(
        T,
        vec![
            published("MTR-00000001", event, now - 5_000),
            published("MTR-00000002", event, now - 5_000),
            // Received longer ago than the TTL: its mark would have expired.
            published("MTR-00000003", event, now - 120_000),
        ],
    )
    .await
    .expect("produce");
    let mut c = bus.subscribe("stream", &[T]).await.expect("subscribe");
    drain(&mut *c).await;
    c.commit()
        .await
        .expect("committed: still kept for retain_min");
    crash(bus, vec![c]);

    let bus = MemoryBus::open_durable(3, 100_000, o).expect("reopen");
    let dedupe = MemoryDedupe::new();
    let marked = segs::app::remark_recent_readings(&bus, &dedupe, Duration::from_secs(60))
        .await
        .expect("rebuild");
    assert_eq!(marked, 2);
    let mut keys = KeyBatch::default();
    keys.push(&key("MTR-00000001", event));
    keys.push(&key("MTR-00000002", event));
    keys.push(&key("MTR-00000003", event));
    keys.push(&key("MTR-00000001", event + 10_000));
    let fresh = dedupe
        .check_and_mark(&keys, Duration::from_secs(60))
        .await
        .expect("check");
    assert_eq!(fresh, [false, false, true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_after_a_restart_is_told_duplicates() {
    use segs::app::App;
    use segs::config::{BusKind, PipelineConfig};
    use segs::simulator::{SimConfig, Simulator};

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let plugin = root.join("target/plugins/anomaly.wasm");
    assert!(
        plugin.exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`)",
        plugin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = PipelineConfig::load(&root.join("pipeline.toml")).expect("pipeline.toml");
    cfg.store.url = format!("sqlite://{}", dir.path().join("segs.db").display());
    cfg.bus.path = dir.path().join("segs-bus.db");
    // This test posts a fixed 2025 date; lift the event-time past bound.
    cfg.ingest.max_reading_age_s = 0;
    assert_eq!(cfg.bus.kind, BusKind::Embedded, "the shipped default");

    let mut sim = Simulator::new(SimConfig {
        meters: 50,
        interval_s: 10,
        seed: 7,
        start_ms: 1_762_927_200_000,
        ..SimConfig::default()
    })
    .expect("simulator");
    let first = sim.next_batches(1000).remove(0).body;
    let second = sim.next_batches(1000).remove(0).body;
    let client = reqwest::Client::new();
    let post = |addr: std::net::SocketAddr, body: Vec<u8>| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("http://{addr}/telemetry/batch"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("POST");
            assert!(r.status().is_success(), "{}", r.status());
            let body = r.bytes().await.expect("answer");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
            (
                v["accepted"].as_u64().unwrap(),
                v["duplicates"].as_u64().unwrap(),
            )
        }
    };

    let app = App::start(cfg.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start");
    assert_eq!(post(app.addr, first.clone()).await, (50, 0));
    app.shutdown().await;

    // A new process: the memory dedupe starts empty and is rebuilt from the
    // journal, so the client's retry (its 2xx was lost) counts nothing twice.
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("restart");
    assert_eq!(post(app.addr, first).await, (0, 50));
    assert_eq!(post(app.addr, second).await, (50, 0));
    app.shutdown().await;
}

#[tokio::test]
async fn a_failed_journal_write_fails_this_and_every_later_produce() {
    let dir = tempfile::tempdir().unwrap();
    let path = journal(&dir);
    let bus = open(&path, 1);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, records(0, 5, 1)).await.expect("produce");
    // Break the file under the bus: its next write fails.
    rusqlite::Connection::open(&path)
        .and_then(|conn| conn.execute_batch("DROP TABLE batches"))
        .expect("drop the table");
    let err = bus
        .produce(T, records(5, 10, 1))
        .await
        .expect_err("the write fails");
    let msg = err.to_string();
    assert!(matches!(err, BusError::Journal(_)), "{err:?}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("refuses every further write"), "{msg}");
    let again = bus
        .produce(T, records(10, 11, 1))
        .await
        .expect_err("the bus stays failed");
    assert!(matches!(again, BusError::Journal(_)), "{again:?}");
    assert!(matches!(c.commit().await, Err(BusError::Journal(_))));
    // Only what was journaled was ever visible.
    assert_eq!(values(&drain(&mut *c).await), (0..5).collect::<Vec<_>>());
}
