//! End to end on the embedded default: real HTTP on loopback, the in-process
//! bus and dedupe, a real SQLite file, the real plugin components. A
//! fixed-seed simulated stream with a scripted spike, outage and regional
//! surge goes in; exact results come out.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;

use segs::app::App;
use segs::bus::Topic;
use segs::config::{PipelineConfig, RegionConfig};
use segs::simulator::{self, SendTarget, SimConfig, SimStats, Simulator};
use segs::store::{AggregateQuery, AlertFilter, Store, WindowWidth};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped pipeline.toml, with its store and bus journal in `dir`.
fn config(dir: &Path) -> PipelineConfig {
    let plugins = root().join("target/plugins/anomaly.wasm");
    assert!(
        plugins.exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`)",
        plugins.display()
    );
    let mut cfg = PipelineConfig::load(&root().join("pipeline.toml")).unwrap();
    cfg.store.url = format!("sqlite://{}", dir.join("segs.db").display());
    // These tests post readings at fixed dates (START_MS, 2025-11-12) so
    // that event time is repeatable: lift the past bound of event time,
    // which would refuse them as older than 7 days. tests/clock.rs covers
    // the bounds.
    cfg.ingest.max_reading_age_s = 0;
    cfg.bus.path = dir.join("segs-bus.db");
    cfg
}

async fn start(cfg: PipelineConfig) -> App {
    App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// 2025-11-12T06:00:00Z: a fixed start so event time is repeatable.
const START_MS: i64 = 1_762_927_200_000;

/// What is on `aggregates_1m` (key, message), read from the start by a new
/// consumer group: until `expected` messages came (waiting up to 30 s
/// without any), and then whatever else comes within a second.
async fn meter_windows_published(
    bus: &dyn segs::bus::Bus,
    expected: usize,
) -> Vec<(String, segs::messages::MeterWindow)> {
    let mut probe = bus
        .subscribe("aggregates-probe", &[Topic::Aggregates1m])
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut quiet = 0;
    loop {
        let wait = if out.len() < expected { 5 } else { 1 };
        let batch = probe.poll(10_000, Duration::from_secs(wait)).await.unwrap();
        if batch.is_empty() {
            quiet += 1;
            if out.len() >= expected || quiet == 6 {
                return out;
            }
            continue;
        }
        quiet = 0;
        for d in batch {
            let key = String::from_utf8(d.record.key.to_vec()).unwrap();
            let window = serde_json::from_slice(&d.record.value)
                .unwrap_or_else(|e| panic!("aggregates_1m message: {e}"));
            out.push((key, window));
        }
    }
}

/// The same config on the Kafka bus (the test broker, `KAFKA_BROKERS`), in
/// a namespace of its own.
fn on_kafka(cfg: &mut PipelineConfig) {
    cfg.bus.kind = segs::config::BusKind::Kafka;
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        cfg.kafka.brokers = brokers;
    }
    cfg.kafka.namespace = format!("e2e{}-", uuid::Uuid::new_v4().simple());
    // Tansu 0.6 misnumbers the records of a fetch that starts inside a
    // multi-record batch; one record per batch keeps its offsets right.
    cfg.kafka
        .client
        .insert("batch.num.messages".into(), "1".into());
}

/// Where the scripted stream runs: the embedded default, or some of the
/// production services in its place.
#[derive(Debug, Clone, Copy, Default)]
struct Services {
    kafka: bool,
    postgres: bool,
    redis: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_stream_gives_exact_results() {
    scripted_stream(Services::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_stream_gives_exact_results_on_kafka() {
    scripted_stream(Services {
        kafka: true,
        ..Services::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_stream_gives_exact_results_on_postgres() {
    scripted_stream(Services {
        postgres: true,
        ..Services::default()
    })
    .await;
}

/// The production stack: Kafka, Redis (ingest's marks, alert marks, the
/// tariff cache) and PostgreSQL together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_stream_gives_exact_results_on_kafka_redis_and_postgres() {
    scripted_stream(Services {
        kafka: true,
        postgres: true,
        redis: true,
    })
    .await;
}

/// The Redis database this file's test uses, emptied at its start (the
/// stream's keys are fixed, so a rerun would find its own marks): no other
/// test uses it.
const E2E_REDIS_DB: u32 = 7;

/// A fixed-seed stream with a spike, an outage, a regional surge and 3 %
/// duplicates; the results are checked exactly. The same on every bus,
/// store and dedupe.
async fn scripted_stream(services: Services) {
    let dir = tempfile::tempdir().unwrap();
    let mut sim_cfg = SimConfig {
        meters: 100,
        interval_s: 10,
        seed: 42,
        start_ms: START_MS,
        duplicate_ratio: 0.03,
        ..SimConfig::default()
    };
    sim_cfg.phases =
        simulator::default_phases(sim_cfg.meters, &sim_cfg.regions, sim_cfg.interval_s);
    let sim = Simulator::new(sim_cfg.clone()).unwrap();

    // Capacities that put every region at 60 % of capacity in normal mode,
    // so the first region's ×1.7 surge takes it past 90 %.
    let mut cfg = config(dir.path());
    for r in &sim_cfg.regions {
        cfg.regions.insert(
            r.clone(),
            RegionConfig {
                capacity_kw: sim.region_base_load(r) / 0.6,
                base_price_per_kwh: 6.5,
            },
        );
    }
    if services.kafka {
        on_kafka(&mut cfg);
    }
    let mut database = None;
    if services.postgres {
        let (url, admin, name) = common::postgres_database("segs_e2e").await;
        cfg.store.url = url;
        database = Some((admin, name));
    }
    let redis_url = format!("redis://127.0.0.1:6379/{E2E_REDIS_DB}");
    if services.redis {
        let client = redis::Client::open(redis_url.as_str()).unwrap();
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis at 127.0.0.1:6379: `cargo xtask services start` starts it");
        redis::cmd("FLUSHDB")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        cfg.dedupe.kind = segs::config::DedupeKind::Redis;
        cfg.dedupe.redis_url = redis_url.clone();
    }
    let surged = sim_cfg.regions[0].clone();
    let spike_meter = phase_meter(&sim_cfg, "spike");
    let outage_meter = phase_meter(&sim_cfg, "outage");

    let app = start(cfg).await;
    let store = app.ctx.store.clone();
    let metrics = app.ctx.metrics.clone();
    let bus = app.ctx.bus.clone();
    let stats = SimStats::new();
    let target = SendTarget {
        url: format!("http://{}", app.addr),
        batch_size: 1000,
        ticks: Some(72), // 12 simulated minutes
        ..SendTarget::default()
    };
    let summary = simulator::run(sim_cfg.clone(), target, stats.clone())
        .await
        .unwrap();
    // What a Prometheus server would scrape, through a text-format parser.
    let scraped = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    app.shutdown().await;
    let families = prometheus_parse::Scrape::parse(scraped.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{scraped}"));
    let counter = |name: &str| -> u64 {
        match families
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| &s.value)
        {
            Some(prometheus_parse::Value::Counter(v))
            | Some(prometheus_parse::Value::Untyped(v)) => *v as u64,
            other => panic!("{name}: {other:?}\n{scraped}"),
        }
    };
    assert_eq!(
        counter("segs_readings_accepted_total"),
        stats.accepted.load(Ordering::Relaxed)
    );
    assert_eq!(
        counter("segs_readings_duplicate_total"),
        stats.duplicates.load(Ordering::Relaxed)
    );

    let accepted = stats.accepted.load(Ordering::Relaxed);
    let duplicates = stats.duplicates.load(Ordering::Relaxed);
    assert_eq!(accepted, 7200, "every unique reading accepted: {summary:?}");
    assert!(duplicates > 0, "the stream re-sent some readings");
    assert_eq!(metrics.duplicates.load(Ordering::Relaxed), duplicates);
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);

    // Every accepted reading is counted once, in 1-minute and 15-minute
    // aggregates alike, and archived once.
    assert_eq!(store.count_readings_1m().await.unwrap(), accepted);
    assert_eq!(store.count_raw_readings().await.unwrap(), accepted);
    let all = AggregateQuery {
        meter_id: None,
        region: None,
        from_ms: None,
        to_ms: None,
        limit: 10_000,
    };
    let fifteen = store
        .meter_aggregates(WindowWidth::FifteenMinutes, &all)
        .await
        .unwrap();
    assert_eq!(
        fifteen.iter().map(|a| u64::from(a.count)).sum::<u64>(),
        accepted
    );
    let one = store
        .meter_aggregates(WindowWidth::OneMinute, &all)
        .await
        .unwrap();
    assert_eq!(one.len(), 100 * 12, "one row per meter per minute");
    assert!(
        one.iter().all(|a| a.count == 6),
        "6 readings per meter-minute"
    );

    // Anomalies: the spike and the outage, once each after dedupe; nothing else.
    let alerts = common::all_alerts(&*store).await;
    let anomalies: Vec<_> = alerts
        .iter()
        .filter(|a| a.alert_type == "ANOMALY")
        .collect();
    let kinds: Vec<(String, String)> = anomalies
        .iter()
        .map(|a| {
            (
                a.meter_id.clone().unwrap(),
                a.metadata["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(anomalies.len(), 2, "{kinds:?}");
    assert!(
        kinds.contains(&(spike_meter.clone(), "spike".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(outage_meter.clone(), "outage".into())),
        "{kinds:?}"
    );
    let outage = anomalies
        .iter()
        .find(|a| a.metadata["type"] == "outage")
        .unwrap();
    assert_eq!(outage.severity, "high");

    // Overload: one incident, one alert, in the surged region.
    let overloads: Vec<_> = alerts
        .iter()
        .filter(|a| a.alert_type == "OVERLOAD")
        .collect();
    assert_eq!(overloads.len(), 1, "{overloads:?}");
    assert_eq!(overloads[0].region.as_deref(), Some(surged.as_str()));
    assert_eq!(overloads[0].severity, "critical");
    assert!(overloads[0].metadata["load_percentage"].as_f64().unwrap() > 90.0);
    assert_eq!(alerts.len(), 3);

    // Tariff: the surged region goes to critical pricing and back; the
    // others never move more than 2 % from base.
    let mut history = store.tariff_history(None, 100).await.unwrap();
    history.reverse();
    let moves: Vec<(String, f64, String, bool)> = history
        .iter()
        .map(|t| {
            (
                t.region.clone(),
                t.price_per_kwh,
                t.reason.to_string(),
                t.is_active,
            )
        })
        .collect();
    assert_eq!(
        moves,
        vec![
            (surged.clone(), 7.8, "CRITICAL_LOAD".into(), false),
            (surged.clone(), 6.5, "NORMAL_LOAD".into(), true),
        ]
    );
    assert_eq!(
        history[0].effective_to_ms,
        Some(history[1].effective_from_ms)
    );

    // Regional windows: one per region per minute, the surge visible.
    let regional = store.regional_aggregates(&all).await.unwrap();
    assert_eq!(regional.len(), 4 * 12);
    let peak = regional
        .iter()
        .filter(|r| r.region == surged)
        .map(|r| r.load_percentage)
        .fold(0.0, f64::max);
    assert!(peak > 90.0, "{peak}");
    assert!(regional.iter().all(|r| r.meter_count == 25));

    // The per-meter windows go on aggregates_1m for other Kafka clients:
    // each stored window once, keyed by its meter. The in-process bus, which
    // nothing outside this process reads, carries none.
    let expected = if services.kafka { one.len() } else { 0 };
    let published = meter_windows_published(&*bus, expected).await;
    if services.kafka {
        assert_eq!(published.len(), one.len(), "one message per stored window");
        for (key, window) in &published {
            assert_eq!(key, &window.meter_id);
            assert!(
                one.iter().any(|a| a.meter_id == window.meter_id
                    && a.window_start_ms == window.window_start_ms
                    && a.count == window.count),
                "{window:?} is not a stored window"
            );
        }
    } else {
        assert_eq!(
            published.len(),
            0,
            "the in-process bus carries no meter windows"
        );
    }

    if services.redis {
        // What other processes (and the seed's services) read in Redis: one
        // alert mark per stored alert, owned by its id, and the surged
        // region's current price.
        let client = redis::Client::open(redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("alert:dedupe:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut owners = Vec::new();
        for k in &keys {
            let id: String = redis::cmd("GET")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            owners.push(id);
        }
        owners.sort();
        let mut stored: Vec<String> = alerts.iter().map(|a| a.id.to_string()).collect();
        stored.sort();
        assert_eq!(owners, stored, "alert marks {keys:?}");
        let cached: Vec<String> = redis::cmd("KEYS")
            .arg("tariff:*:current")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(cached, vec![format!("tariff:{surged}:current")]);
        let current: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&cached[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        let active = history.iter().find(|t| t.is_active).unwrap();
        assert_eq!(current["tariff_id"], active.tariff_id);
        assert_eq!(current["price_per_kwh"].parse::<f64>().unwrap(), 6.5);
        assert_eq!(
            current["effective_from_ms"].parse::<i64>().unwrap(),
            active.effective_from_ms
        );
    }
    if let Some((admin, name)) = database {
        drop(store);
        common::drop_database(&admin, &name).await;
    }
}

/// The meter id a default phase of `kind` targets.
fn phase_meter(cfg: &SimConfig, kind: &str) -> String {
    let phase = cfg
        .phases
        .iter()
        .find(|p| p.kind.label() == kind)
        .unwrap_or_else(|| panic!("no {kind} phase"));
    match &phase.target {
        simulator::PhaseTarget::Meters(r) => format!("MTR-{:08}", r.start + 1),
        other => panic!("{kind} targets {other:?}"),
    }
}

/// A reading that passes validation.
fn good(i: usize) -> Value {
    json!({
        "readingId": format!("r-{i}"),
        "meterId": format!("MTR-{i:08}"),
        "region": "Mumbai-North",
        "timestamp": "2025-11-12T06:30:00.000Z",
        "powerKw": 5.234,
        "voltage": 235.6,
    })
}

async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Value) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest.max_body_bytes = 64 * 1024;
    let app = start(cfg).await;
    let batch_url = format!("http://{}/telemetry/batch", app.addr);
    let one_url = format!("http://{}/telemetry", app.addr);
    let client = reqwest::Client::new();

    let with = |field: &str, value: Value| {
        let mut r = good(1);
        r[field] = value;
        r
    };
    let without = |field: &str| {
        let mut r = good(1);
        r.as_object_mut().unwrap().remove(field);
        r
    };
    let batch = |bad: Value| serde_json::to_vec(&json!([good(0), bad, good(2)])).unwrap();
    // (what, body, expected status, field named in the details)
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("bad JSON", b"[{\"meterId\": ".to_vec(), 400, None),
        (
            "not an array",
            serde_json::to_vec(&good(0)).unwrap(),
            400,
            None,
        ),
        ("empty batch", b"[]".to_vec(), 400, None),
        (
            "oversize batch",
            serde_json::to_vec(&(0..1001).map(|_| json!({})).collect::<Vec<_>>()).unwrap(),
            400,
            None,
        ),
        (
            "missing readingId",
            batch(without("readingId")),
            400,
            Some("readingId"),
        ),
        (
            "empty meterId",
            batch(with("meterId", json!(""))),
            400,
            Some("meterId"),
        ),
        (
            "missing region",
            batch(without("region")),
            400,
            Some("region"),
        ),
        (
            "region not a string",
            batch(with("region", json!(7))),
            400,
            Some("region"),
        ),
        (
            "bad timestamp",
            batch(with("timestamp", json!("yesterday"))),
            400,
            Some("timestamp"),
        ),
        (
            "timestamp without zone",
            batch(with("timestamp", json!("2025-11-12T06:30:00"))),
            400,
            Some("timestamp"),
        ),
        (
            "negative power",
            batch(with("powerKw", json!(-1.0))),
            400,
            Some("powerKw"),
        ),
        (
            "power as a string",
            batch(with("powerKw", json!("5"))),
            400,
            Some("powerKw"),
        ),
        (
            "negative voltage",
            batch(with("voltage", json!(-230))),
            400,
            Some("voltage"),
        ),
        (
            "negative current",
            batch(with("current", json!(-1))),
            400,
            Some("current"),
        ),
        (
            "negative frequency",
            batch(with("frequency", json!(-50))),
            400,
            Some("frequency"),
        ),
        (
            "powerFactor above 1",
            batch(with("powerFactor", json!(1.01))),
            400,
            Some("powerFactor"),
        ),
        (
            "temperature as text",
            batch(with("temperature", json!("hot"))),
            400,
            Some("temperature"),
        ),
        ("oversize body", vec![b' '; 65 * 1024], 413, None),
    ];
    for (what, body, status, field) in cases {
        let (got, json) = post(&client, &batch_url, body).await;
        assert_eq!(got, status, "{what}: {json}");
        assert!(
            json["message"].is_string(),
            "{what}: a JSON error body: {json}"
        );
        if let Some(field) = field {
            let details = json["details"].as_array().unwrap();
            assert!(
                details
                    .iter()
                    .any(|d| d["field"] == field && d["index"] == 1),
                "{what}: details name index 1, field {field}: {json}"
            );
        }
    }
    let (got, json) = post(
        &client,
        &one_url,
        serde_json::to_vec(&with("powerKw", json!(-2))).unwrap(),
    )
    .await;
    assert_eq!(got, 400, "{json}");
    assert_eq!(json["details"][0]["field"], "powerKw");

    // Nothing was published: a new consumer group sees an empty topic.
    let mut probe = app
        .ctx
        .bus
        .subscribe("probe-group", &[Topic::TelemetryReadings])
        .await
        .unwrap();
    let seen = probe.poll(100, Duration::from_millis(300)).await.unwrap();
    assert!(seen.is_empty(), "{} readings were published", seen.len());

    // A valid request still works, and counts once.
    let body = serde_json::to_vec(&json!([good(0), good(1)])).unwrap();
    let (got, json) = post(&client, &batch_url, body.clone()).await;
    assert_eq!(
        (got, &json),
        (200, &json!({"accepted": 2, "duplicates": 0}))
    );
    let (got, json) = post(&client, &batch_url, body).await;
    assert_eq!(
        (got, &json),
        (200, &json!({"accepted": 0, "duplicates": 2}))
    );

    let store: Arc<dyn Store> = app.ctx.store.clone();
    app.shutdown().await;
    assert_eq!(store.count_raw_readings().await.unwrap(), 2);
    assert_eq!(store.count_readings_1m().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_answers_with_seed_columns_and_refuses_bad_queries() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(config(dir.path())).await;
    let base = format!("http://{}", app.addr);
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(&json!([good(0), good(1)])).unwrap();
    assert_eq!(
        post(&client, &format!("{base}/telemetry/batch"), body)
            .await
            .0,
        200
    );

    let get = |path: String| {
        let client = client.clone();
        async move {
            let r = client.get(path).send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(get(format!("{base}/healthz")).await.1["status"], "ok");
    for bad in [
        "/alerts?status=sleeping",
        "/alerts?severity=apocalyptic",
        "/alerts?limit=0",
        "/alerts?colour=red",
        "/aggregates/1m?from=yesterday",
        "/aggregates/regional?meter_id=MTR-1",
    ] {
        let (status, json) = get(format!("{base}{bad}")).await;
        assert_eq!(status, 400, "{bad}: {json}");
        assert!(json["message"].is_string(), "{bad}: {json}");
    }
    assert_eq!(get(format!("{base}/nope")).await.0, 404);
    assert_eq!(
        get(format!("{base}/tariffs/current")).await,
        (200, json!([]))
    );

    // Close the windows: the aggregate becomes readable with seed columns.
    let store = app.ctx.store.clone();
    let bus = app.ctx.bus.clone();
    let new = segs::store::NewAlert {
        id: uuid::Uuid::new_v4(),
        alert_type: segs::messages::AlertType::Anomaly,
        severity: segs::messages::Severity::High,
        region: Some("Mumbai-North".into()),
        meter_id: Some("MTR-00000001".into()),
        message: "test".into(),
        timestamp_ms: START_MS,
        metadata: json!({"type": "spike"}),
        dedupe_key: None,
        rule: None,
    };
    let alert = store.insert_alert(&new).await.unwrap();
    let mut updates = bus
        .subscribe("notification-probe", &[Topic::AlertStatusUpdates])
        .await
        .unwrap();
    let ack = |id: String, body: Value| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let r = client
                .post(format!("{base}/alerts/{id}/acknowledge"))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
            )
        }
    };
    let id = alert.id.to_string();
    assert_eq!(ack(id.clone(), json!({})).await.0, 400, "`by` is required");
    assert_eq!(ack("not-a-uuid".into(), json!({"by": "op"})).await.0, 400);
    assert_eq!(
        ack(uuid::Uuid::new_v4().to_string(), json!({"by": "op"}))
            .await
            .0,
        404
    );
    let (status, row) = ack(id.clone(), json!({"by": "operator-7"})).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["status"], "acknowledged");
    assert_eq!(row["acknowledged_by"], "operator-7");
    let r = client
        .post(format!("{base}/alerts/{id}/resolve"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        ack(id.clone(), json!({"by": "op"})).await.0,
        409,
        "a resolved alert"
    );
    let published = updates.poll(10, Duration::from_secs(2)).await.unwrap();
    let statuses: Vec<Value> = published
        .iter()
        .map(|d| serde_json::from_slice::<Value>(&d.record.value).unwrap()["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!("acknowledged"), json!("resolved")]);
    let (status, list) = get(format!("{base}/alerts?status=resolved&type=ANOMALY")).await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["meter_id"], "MTR-00000001");
    assert!(list[0]["resolved_at"].is_string());

    app.shutdown().await;
    let rows = store
        .meter_aggregates(
            WindowWidth::OneMinute,
            &AggregateQuery {
                meter_id: Some("MTR-00000000".into()),
                region: None,
                from_ms: None,
                to_ms: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let row = serde_json::to_value(&rows[0]).unwrap();
    for col in [
        "meter_id",
        "region",
        "window_start",
        "avg_power_kw",
        "max_power_kw",
        "min_power_kw",
        "energy_kwh_sum",
        "voltage_avg",
        "count",
    ] {
        assert!(row.get(col).is_some(), "column {col} in {row}");
    }
    assert_eq!(row["window_start"], "2025-11-12T06:30:00.000Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_an_overload_incident_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let config = || {
        let mut cfg = config(dir.path());
        cfg.regions.insert(
            "Grid-X".into(),
            RegionConfig {
                capacity_kw: 10.0,
                base_price_per_kwh: 6.5,
            },
        );
        cfg
    };
    // One meter at 9.5 kW of a 10 kW region: 95 % load, one window per run.
    let minute = |m: i64| {
        let readings: Vec<Value> = (0..6)
            .map(|i| {
                json!({
                    "readingId": format!("r-{m}-{i}"),
                    "meterId": "MTR-X",
                    "region": "Grid-X",
                    "timestamp": segs::time::format_rfc3339_ms(START_MS + m * 60_000 + i * 10_000),
                    "powerKw": 9.5,
                })
            })
            .collect();
        serde_json::to_vec(&readings).unwrap()
    };
    let overloads = |store: Arc<dyn Store>| async move {
        store
            .list_alerts(&AlertFilter {
                alert_type: Some("OVERLOAD".into()),
                ..AlertFilter::default()
            })
            .await
            .unwrap()
            .len()
    };

    let app = start(config()).await;
    let url = format!("http://{}/telemetry/batch", app.addr);
    assert_eq!(post(&client, &url, minute(0)).await.0, 200);
    let store = app.ctx.store.clone();
    app.shutdown().await; // closes the window: 1 overloaded window so far
    assert_eq!(overloads(store).await, 0);

    let app = start(config()).await;
    let url = format!("http://{}/telemetry/batch", app.addr);
    assert_eq!(post(&client, &url, minute(1)).await.0, 200);
    let store = app.ctx.store.clone();
    app.shutdown().await; // the second consecutive window, after a restart
    assert_eq!(overloads(store).await, 1, "the count survived the restart");
}

/// On Kafka, ingest and processing run in separate processes (here two
/// apps): readings posted to the `ingest` one are windowed and stored by the
/// `process` one; neither serves what the other runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_processing_run_in_separate_roles_on_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path());
    on_kafka(&mut base);
    let mut ingest_cfg = base.clone();
    ingest_cfg.role = segs::config::Role::Ingest;
    let mut process_cfg = base;
    process_cfg.role = segs::config::Role::Process;
    let processing = start(process_cfg).await;
    let ingest = start(ingest_cfg).await;
    assert!(
        ingest.plugins.is_empty(),
        "an ingest process loads no plugins"
    );
    let client = reqwest::Client::new();

    let body = serde_json::to_vec(&(0..10).map(good).collect::<Vec<_>>()).unwrap();
    let (status, json) = post(
        &client,
        &format!("http://{}/telemetry/batch", ingest.addr),
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, &json),
        (200, &json!({"accepted": 10, "duplicates": 0}))
    );
    let (status, _) = post(
        &client,
        &format!("http://{}/telemetry/batch", processing.addr),
        body,
    )
    .await;
    assert_eq!(status, 404, "a process-role segs takes no telemetry");

    // Stopping the processing side closes and stores the open windows.
    let store = processing.ctx.store.clone();
    let metrics = processing.ctx.metrics.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metrics.readings_processed.load(Ordering::Relaxed) < 10
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ingest.shutdown().await;
    processing.shutdown().await;
    assert_eq!(store.count_readings_1m().await.unwrap(), 10);
    assert_eq!(store.count_raw_readings().await.unwrap(), 10);
}

/// Issue 11: a load sent in order by a client over several connections
/// reaches the stream stage a little out of order (requests run
/// concurrently), and under an accelerated replay a little is minutes of
/// event time. None of it may count as late: 8 senders take 1,000-reading
/// bodies of 2,000 meters x 60 ticks (10 minutes of event time) in order,
/// re-sending a refused one, and every reading lands in an on-time window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_order_load_over_several_connections_has_no_late_readings() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(config(dir.path())).await;
    let metrics = app.ctx.metrics.clone();
    let mut sim = Simulator::new(SimConfig {
        meters: 2000,
        interval_s: 10,
        seed: 7,
        start_ms: START_MS,
        ..SimConfig::default()
    })
    .unwrap();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..60)
            .flat_map(|_| sim.next_batches(1000))
            .map(|b| b.body)
            .collect(),
    );
    let total = bodies.len() as u64 * 1000;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = format!("http://{}/telemetry/batch", app.addr);
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let (bodies, next, url) = (bodies.clone(), next.clone(), url.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else {
                        return;
                    };
                    loop {
                        let (status, _) = post(&client, &url, body.clone()).await;
                        if status == 200 {
                            break;
                        }
                        assert_eq!(status, 503, "body {i}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(metrics.accepted.load(Ordering::Relaxed), total);
    let store = app.ctx.store.clone();
    app.shutdown().await;
    assert_eq!(metrics.readings_processed.load(Ordering::Relaxed), total);
    assert_eq!(
        metrics.late_readings.load(Ordering::Relaxed),
        0,
        "an in-order load produced late readings"
    );
    assert_eq!(store.count_raw_readings().await.unwrap(), total);
}

/// The grace of the watermark, both ways: a reading older than the newest
/// seen is on time if it comes within `ORDER_GRACE` (a concurrent request),
/// late — and still counted, merged into its stored window — after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_behind_the_newest_is_late_only_after_the_grace() {
    use segs::pipeline::ORDER_GRACE;
    let dir = tempfile::tempdir().unwrap();
    let app = start(config(dir.path())).await;
    let metrics = app.ctx.metrics.clone();
    let url = format!("http://{}/telemetry/batch", app.addr);
    let client = reqwest::Client::new();
    let at = |i: usize, minute: i64| {
        let mut r = good(i);
        r["timestamp"] = json!(segs::time::format_rfc3339_ms(START_MS + minute * 60_000));
        r
    };
    let processed = |n: u64| {
        let metrics = metrics.clone();
        async move {
            while metrics.readings_processed.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // Minute 3 first, then minutes 1 and 2 right after: within the grace.
    let body = |rs: Vec<Value>| serde_json::to_vec(&rs).unwrap();
    assert_eq!(post(&client, &url, body(vec![at(1, 3)])).await.0, 200);
    processed(1).await;
    assert_eq!(
        post(&client, &url, body(vec![at(2, 1), at(3, 2)])).await.0,
        200
    );
    processed(3).await;
    assert_eq!(metrics.late_readings.load(Ordering::Relaxed), 0);
    // Long after minute 3 was seen (minute 1 has closed): late, counted.
    tokio::time::sleep(ORDER_GRACE * 2).await;
    assert_eq!(post(&client, &url, body(vec![at(4, 1)])).await.0, 200);
    processed(4).await;
    let store = app.ctx.store.clone();
    app.shutdown().await;
    assert_eq!(metrics.late_readings.load(Ordering::Relaxed), 1);
    let all = AggregateQuery {
        limit: 100,
        ..AggregateQuery::default()
    };
    let rows = store
        .meter_aggregates(WindowWidth::OneMinute, &all)
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|r| u64::from(r.count)).sum::<u64>(), 4);
}
