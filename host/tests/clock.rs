//! One meter with a broken clock must not break event time for everyone.
//!
//! The same scripted stream (a regional surge that raises an overload alert
//! and moves the tariff) goes twice through the embedded default with the
//! shipped pipeline.toml and its event-time bounds: once clean, once with
//! requests among it that carry readings dated 2099 and 1971 (alone, and
//! mixed into a batch of good readings). Every bad request is refused with
//! a 400 that names the field and the bound, and the second run's
//! aggregates, alerts and tariffs are those of the clean run.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use segs::app::App;
use segs::config::{PipelineConfig, RegionConfig};
use segs::simulator::{self, SimConfig, Simulator};
use segs::store::{
    AggregateQuery, AlertFilter, MeterAggregate, RegionalAggregate, Store, WindowWidth,
};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped pipeline.toml (default event-time bounds), its store in
/// `dir`, capacities that put every region at 60 % in normal mode so the
/// first region's surge takes it past 90 %.
fn config(dir: &Path, sim: &Simulator) -> PipelineConfig {
    let plugins = root().join("target/plugins/anomaly.wasm");
    assert!(
        plugins.exists(),
        "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`)",
        plugins.display()
    );
    let mut cfg = PipelineConfig::load(&root().join("pipeline.toml")).unwrap();
    assert_eq!(
        (cfg.ingest.max_clock_skew_s, cfg.ingest.max_reading_age_s),
        (300, 604_800),
        "the shipped bounds"
    );
    cfg.store.url = format!("sqlite://{}", dir.join("segs.db").display());
    cfg.bus.path = dir.join("segs-bus.db");
    for r in &sim.config().regions {
        cfg.regions.insert(
            r.clone(),
            RegionConfig {
                capacity_kw: sim.region_base_load(r) / 0.6,
                base_price_per_kwh: 6.5,
            },
        );
    }
    cfg
}

/// 100 meters every 10 s with the demo script, starting two hours before
/// now (floored to 15 minutes): inside the bounds, and 12 simulated minutes
/// stay in the past.
fn sim_config() -> SimConfig {
    let start_ms = segs::time::window_start(
        segs::time::now_ms() - 2 * 3_600_000,
        segs::windows::FIFTEEN_MINUTES_MS,
    );
    let mut cfg = SimConfig {
        meters: 100,
        interval_s: 10,
        seed: 42,
        start_ms,
        ..SimConfig::default()
    };
    cfg.phases = simulator::default_phases(cfg.meters, &cfg.regions, cfg.interval_s);
    cfg
}

const TICKS: u64 = 72; // 12 simulated minutes

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

/// A 400 `validation_failed` whose details are exactly `expected`: (index,
/// the words the message must contain); every detail is about `timestamp`.
fn assert_refused(what: &str, (status, body): (u16, Value), expected: &[(Option<usize>, &[&str])]) {
    assert_eq!(status, 400, "{what}: {body}");
    assert_eq!(body["error"], "validation_failed", "{what}: {body}");
    let details = body["details"].as_array().unwrap();
    assert_eq!(details.len(), expected.len(), "{what}: {body}");
    for (d, (index, words)) in details.iter().zip(expected) {
        assert_eq!(d["field"], "timestamp", "{what}: {body}");
        assert_eq!(
            d.get("index").and_then(Value::as_u64),
            index.map(|i| i as u64),
            "{what}: {body}"
        );
        let message = d["message"].as_str().unwrap();
        for w in *words {
            assert!(message.contains(w), "{what}: {w:?} in {message:?}");
        }
    }
}

const AHEAD: &[&str] = &[
    "2099-01-01T00:00:00.000Z",
    "ahead",
    "at most 300 s",
    "max_clock_skew_s",
];
const OLD: &[&str] = &[
    "1971-01-01T00:00:00.000Z",
    "older",
    "at most 7 days",
    "max_reading_age_s",
];

/// `reading` (a JSON object) with its timestamp replaced.
fn dated(reading: &Value, timestamp: &str) -> Value {
    let mut r = reading.clone();
    r["timestamp"] = json!(timestamp);
    r
}

/// An alert as compared: (type, severity, region, meter_id, timestamp).
type AlertKey = (
    segs::messages::AlertType,
    segs::messages::Severity,
    Option<String>,
    Option<String>,
    i64,
);

/// What a run left in the store, in a stable order.
#[derive(Debug, PartialEq)]
struct Outcome {
    accepted: u64,
    meter_1m: Vec<MeterAggregate>,
    regional: Vec<RegionalAggregate>,
    alerts: Vec<AlertKey>,
    /// (region, effective_from, price, effective_to)
    tariffs: Vec<(String, i64, f64, Option<i64>)>,
}

/// Feeds the stream tick by tick without pacing; with `bad_clocks`, the
/// broken-clock requests go in among it. Returns what the store holds after
/// a clean shutdown.
async fn run(sim_cfg: &SimConfig, bad_clocks: bool) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = Simulator::new(sim_cfg.clone()).unwrap();
    let app = App::start(config(dir.path(), &sim), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let batch_url = format!("http://{}/telemetry/batch", app.addr);
    let one_url = format!("http://{}/telemetry", app.addr);
    let client = reqwest::Client::new();
    let surged = sim_cfg.regions[0].clone();
    let in_surged_region = json!({
        "readingId": "broken-clock",
        "meterId": "MTR-00000001",
        "region": surged,
        "timestamp": "2099-01-01T00:00:00Z",
        "powerKw": 19.5,
    });

    if bad_clocks {
        // On a fresh start, before any traffic: a reading from 1971.
        let r = post(
            &client,
            &one_url,
            serde_json::to_vec(&dated(&in_surged_region, "1971-01-01T00:00:00Z")).unwrap(),
        )
        .await;
        assert_refused("1971 on POST /telemetry", r, &[(None, OLD)]);
    }
    for k in 0..TICKS {
        for batch in sim.next_batches(1000) {
            if bad_clocks && k == 20 {
                // During the surge: one reading from 2099.
                let r = post(
                    &client,
                    &batch_url,
                    serde_json::to_vec(&json!([in_surged_region])).unwrap(),
                )
                .await;
                assert_refused("2099 alone", r, &[(Some(0), AHEAD)]);
            }
            if bad_clocks && k == 30 {
                // This tick's own batch with two readings' clocks broken:
                // refused whole; the intact batch then counts in full.
                let mut readings: Vec<Value> = serde_json::from_slice(&batch.body).unwrap();
                readings[5] = dated(&readings[5], "2099-01-01T00:00:00Z");
                readings[7] = dated(&readings[7], "1971-01-01T00:00:00Z");
                let r = post(&client, &batch_url, serde_json::to_vec(&readings).unwrap()).await;
                assert_refused("mixed batch", r, &[(Some(5), AHEAD), (Some(7), OLD)]);
            }
            let (status, body) = post(&client, &batch_url, batch.body).await;
            assert_eq!(
                (status, &body),
                (200, &json!({"accepted": batch.readings, "duplicates": 0})),
                "tick {k}"
            );
        }
    }
    let metrics = app.ctx.metrics.clone();
    let store = app.ctx.store.clone();
    app.shutdown().await;
    assert_eq!(
        metrics.rejected_requests.load(Ordering::Relaxed),
        if bad_clocks { 3 } else { 0 }
    );
    outcome(&*store, metrics.accepted.load(Ordering::Relaxed)).await
}

async fn outcome(store: &dyn Store, accepted: u64) -> Outcome {
    let all = AggregateQuery {
        meter_id: None,
        region: None,
        from_ms: None,
        to_ms: None,
        limit: 10_000,
    };
    let mut meter_1m = store
        .meter_aggregates(WindowWidth::OneMinute, &all)
        .await
        .unwrap();
    meter_1m
        .sort_by(|a, b| (&a.meter_id, a.window_start_ms).cmp(&(&b.meter_id, b.window_start_ms)));
    let mut regional = store.regional_aggregates(&all).await.unwrap();
    regional.sort_by(|a, b| (&a.region, a.window_start_ms).cmp(&(&b.region, b.window_start_ms)));
    for r in &mut regional {
        r.active_meters.sort();
    }
    let mut alerts: Vec<_> = store
        .list_alerts(&AlertFilter {
            limit: 1000,
            ..AlertFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|a| {
            (
                a.alert_type,
                a.severity,
                a.region,
                a.meter_id,
                a.timestamp_ms,
            )
        })
        .collect();
    alerts.sort();
    let mut tariffs: Vec<_> = store
        .tariff_history(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            (
                t.region,
                t.effective_from_ms,
                t.price_per_kwh,
                t.effective_to_ms,
            )
        })
        .collect();
    tariffs.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Outcome {
        accepted,
        meter_1m,
        regional,
        alerts,
        tariffs,
    }
}

/// A regional total sums the meters' averages in the order the meters first
/// reported in that minute, which may differ between any two runs, clean or
/// not (the stream worker reads three partitions), and is stored rounded to
/// 3 decimals (the aggregate plugin's `decimals`): a sum that lands on a
/// rounding edge may differ by one in the last decimal. Everything else
/// must be equal.
fn same_regional(a: &RegionalAggregate, b: &RegionalAggregate) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 0.001 + 1e-9;
    (
        &a.region,
        a.window_start_ms,
        a.meter_count,
        &a.active_meters,
    ) == (
        &b.region,
        b.window_start_ms,
        b.meter_count,
        &b.active_meters,
    ) && close(a.total_consumption, b.total_consumption)
        && close(a.avg_consumption, b.avg_consumption)
        && close(a.max_consumption, b.max_consumption)
        && close(a.min_consumption, b.min_consumption)
        && close(a.load_percentage, b.load_percentage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_broken_clocks_are_refused_and_change_nothing() {
    let sim_cfg = sim_config();
    let clean = run(&sim_cfg, false).await;
    let dirty = run(&sim_cfg, true).await;
    let surged = &sim_cfg.regions[0];

    // The clean run is the scripted result: everything counted on time, one
    // overload incident and a tariff move in the surged region.
    assert_eq!(clean.accepted, 100 * TICKS);
    assert_eq!(clean.meter_1m.len(), 100 * 12, "one row per meter-minute");
    assert!(clean.meter_1m.iter().all(|a| a.count == 6));
    assert_eq!(
        clean.regional.len(),
        4 * 12,
        "every regional minute, on time"
    );
    let overloads: Vec<_> = clean.alerts.iter().filter(|a| a.0 == "OVERLOAD").collect();
    assert_eq!(overloads.len(), 1, "{:?}", clean.alerts);
    assert_eq!(overloads[0].2.as_deref(), Some(surged.as_str()));
    assert!(
        clean.tariffs.iter().any(|t| &t.0 == surged && t.2 == 7.8),
        "{:?}",
        clean.tariffs
    );

    // The run with broken clocks among the traffic: the same.
    assert_eq!(dirty.accepted, clean.accepted);
    assert_eq!(
        dirty.meter_1m, clean.meter_1m,
        "per-meter 1-minute aggregates"
    );
    assert_eq!(
        dirty.alerts, clean.alerts,
        "alerts (type, severity, region, meter, timestamp)"
    );
    assert_eq!(
        dirty.tariffs, clean.tariffs,
        "tariff changes (region, from, price, to)"
    );
    assert_eq!(dirty.regional.len(), clean.regional.len());
    for (d, c) in dirty.regional.iter().zip(&clean.regional) {
        assert!(
            same_regional(d, c),
            "regional window differs:\n{d:?}\n{c:?}"
        );
    }
}
