//! What the process-level and end-to-end tests share: the scripted stream,
//! the shipped config made runnable from a test (as a file, or embedded in
//! a temporary folder), posting it, the Kafka settings for the test broker,
//! and the exactly-once count checks. Each test crate uses part of it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use segs::config::PipelineConfig;
use segs::simulator::{self, SimConfig, Simulator};
use segs::store::{AggregateQuery, AlertFilter, AlertRow, Store, WindowWidth};
use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built component of `target/plugins` (or `SEGS_PLUGIN_DIR`).
pub fn component(name: &str) -> PathBuf {
    let dir = std::env::var_os("SEGS_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/plugins"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// An anomaly batch of `n` readings at a 5 kW baseline, one in a hundred a
/// 20 kW spike.
pub fn anomaly_batch(n: usize) -> segs::plugins::anomaly::ReadingBatch {
    segs::plugins::anomaly::ReadingBatch {
        power_kw: (0..n)
            .map(|i| if i % 100 == 0 { 20.0 } else { 5.0 })
            .collect(),
        baseline_kw: vec![5.0; n],
        sample_count: vec![50; n],
    }
}

pub const METERS: u32 = 100;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// 100 meters every 10 s with the demo script (spike, outage, regional
/// surge) and 3 % re-sent duplicates, starting at a quarter hour picked at
/// random in the last day: inside the ingest bounds, and no two runs share
/// dedupe keys (meterId, timestamp) in Redis.
pub fn sim_config(seed: u64) -> SimConfig {
    let quarters_back = 8 + (uuid::Uuid::new_v4().as_u128() % 88) as i64;
    let start_ms = segs::time::window_start(
        segs::time::now_ms() - quarters_back * segs::windows::FIFTEEN_MINUTES_MS,
        segs::windows::FIFTEEN_MINUTES_MS,
    );
    let mut cfg = SimConfig {
        meters: METERS,
        interval_s: 10,
        seed,
        start_ms,
        duplicate_ratio: 0.03,
        ..SimConfig::default()
    };
    cfg.phases = simulator::default_phases(cfg.meters, &cfg.regions, cfg.interval_s);
    cfg
}

/// The shipped pipeline.toml with absolute plugin paths and capacities that
/// put every region of `sim` at 60 % in normal mode (the surge crosses 90 %).
pub fn config_doc(sim: &Simulator) -> toml::Table {
    let plugins = root().join("target/plugins");
    assert!(
        plugins.join("anomaly.wasm").exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`)",
        plugins.display()
    );
    let text = std::fs::read_to_string(root().join("pipeline.toml")).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    for (name, plugin) in doc["plugins"].as_table_mut().unwrap() {
        plugin.as_table_mut().unwrap().insert(
            "component".into(),
            toml::Value::String(plugins.join(format!("{name}.wasm")).display().to_string()),
        );
    }
    let mut regions = toml::Table::new();
    for r in &sim.config().regions {
        let mut t = toml::Table::new();
        t.insert(
            "capacity_kw".into(),
            toml::Value::Float(sim.region_base_load(r) / 0.6),
        );
        t.insert("base_price_per_kwh".into(), toml::Value::Float(6.5));
        regions.insert(r.clone(), toml::Value::Table(t));
    }
    doc.insert("regions".into(), toml::Value::Table(regions));
    doc
}

/// The Kafka bus at `brokers` in `namespace`, with the test broker's client
/// settings: a killed member's partitions may move after 6 s (not Kafka's
/// 45), and one record per batch (Tansu 0.6 misnumbers a fetch that starts
/// inside a multi-record batch; ARCHITECTURE.md, Known gaps).
pub fn on_kafka(doc: &mut toml::Table, brokers: &str, namespace: &str) {
    doc["bus"]
        .as_table_mut()
        .unwrap()
        .insert("kind".into(), toml::Value::String("kafka".into()));
    let k = doc["kafka"].as_table_mut().unwrap();
    k.insert("brokers".into(), toml::Value::String(brokers.into()));
    k.insert("namespace".into(), toml::Value::String(namespace.into()));
    let mut client = toml::Table::new();
    for (key, value) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
        ("batch.num.messages", "1"),
    ] {
        client.insert(key.into(), toml::Value::String(value.into()));
    }
    k.insert("client".into(), toml::Value::Table(client));
}

/// The test broker `KAFKA_BROKERS` names (default 127.0.0.1:9092).
pub fn test_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Writes `doc` to `dir/name`.
pub fn write(dir: &Path, name: &str, doc: &toml::Table) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, toml::to_string(doc).unwrap()).unwrap();
    path
}

/// The shipped config for `sim` (see [`config_doc`]) on the embedded
/// default, its SQLite store and bus journal in `dir`.
pub fn embedded_config(dir: &Path, sim: &Simulator) -> PipelineConfig {
    let mut doc = config_doc(sim);
    doc["store"].as_table_mut().unwrap().insert(
        "url".into(),
        toml::Value::String(format!("sqlite://{}", dir.join("segs.db").display())),
    );
    doc["bus"].as_table_mut().unwrap().insert(
        "path".into(),
        toml::Value::String(dir.join("segs-bus.db").display().to_string()),
    );
    PipelineConfig::load(&write(dir, "pipeline.toml", &doc)).unwrap()
}

/// `POST {url}/telemetry/batch` with `body`.
pub async fn post_batch(client: &reqwest::Client, url: &str, body: &[u8]) -> reqwest::Response {
    client
        .post(format!("{url}/telemetry/batch"))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// Posts `sim`'s ticks `ticks` to `url`, every request answered 2xx; the
/// (meterId, timestamp) of every reading acknowledged (its size is the
/// readings accepted: the re-sent ones are in it once).
pub async fn post_ticks(
    client: &reqwest::Client,
    url: &str,
    sim: &mut Simulator,
    ticks: Range<u64>,
) -> HashSet<(String, String)> {
    let mut acked = HashSet::new();
    for k in ticks {
        for batch in sim.next_batches(1000) {
            let r = post_batch(client, url, &batch.body).await;
            assert_eq!(r.status().as_u16(), 200, "tick {k}");
            acked.extend(keys(&batch.body));
        }
    }
    acked
}

/// Every alert stored (up to 1000).
pub async fn all_alerts(store: &dyn Store) -> Vec<AlertRow> {
    store
        .list_alerts(&AlertFilter {
            limit: 1000,
            ..AlertFilter::default()
        })
        .await
        .unwrap()
}

/// (meterId, timestamp) of every reading in a batch body.
pub fn keys(body: &[u8]) -> Vec<(String, String)> {
    let readings: Vec<Value> = serde_json::from_slice(body).unwrap();
    readings
        .iter()
        .map(|r| {
            (
                r["meterId"].as_str().unwrap().to_owned(),
                segs::time::format_rfc3339_ms(
                    segs::time::parse_rfc3339_ms(r["timestamp"].as_str().unwrap()).unwrap(),
                ),
            )
        })
        .collect()
}

/// Every one of `unique` acknowledged readings counted once: each
/// meter-minute of aggregates_1m counts its 6 readings, the sums of
/// aggregates_1m and aggregates_15m are `unique`, and raw_readings holds
/// each reading once.
pub async fn assert_counted_once(store: &dyn Store, unique: u64) {
    let all = AggregateQuery {
        limit: 100_000,
        ..AggregateQuery::default()
    };
    let one = store
        .meter_aggregates(WindowWidth::OneMinute, &all)
        .await
        .unwrap();
    let sum_1m: u64 = one.iter().map(|a| u64::from(a.count)).sum();
    assert_eq!(sum_1m, unique, "sum of count in aggregates_1m");
    let wrong: Vec<_> = one
        .iter()
        .filter(|a| a.count != 6)
        .map(|a| (&a.meter_id, a.window_start_ms, a.count))
        .collect();
    assert!(
        wrong.is_empty(),
        "meter-minutes not counted 6 times: {wrong:?}"
    );
    assert_eq!(one.len() as u64, unique / 6, "one row per meter-minute");
    let fifteen = store
        .meter_aggregates(WindowWidth::FifteenMinutes, &all)
        .await
        .unwrap();
    let sum_15m: u64 = fifteen.iter().map(|a| u64::from(a.count)).sum();
    assert_eq!(sum_15m, unique, "sum of count in aggregates_15m");
    assert_eq!(
        store.count_raw_readings().await.unwrap(),
        unique,
        "raw_readings holds each reading once"
    );
}

/// A fresh PostgreSQL database named `{prefix}_{uuid}`: (its URL, the admin
/// URL to drop it with, its name). `SEGS_TEST_POSTGRES_URL` names the admin
/// database (default `postgres://postgres@127.0.0.1:5432/postgres`).
pub async fn postgres_database(prefix: &str) -> (String, String, String) {
    use sqlx::{Connection, Executor, PgConnection};
    let admin = std::env::var("SEGS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is not reachable ({e}): `cargo xtask services start` starts it")
    });
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    (format!("{base}/{name}"), admin, name)
}

/// Drops a database [`postgres_database`] made (best effort).
pub async fn drop_database(admin: &str, name: &str) {
    use sqlx::{Connection, Executor, PgConnection};
    if let Ok(mut conn) = PgConnection::connect(admin).await {
        let _ = conn
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    }
}
