//! Scale-out on Kafka: the same scripted stream through one `segs` process,
//! and through an ingest process plus two processing processes sharing the
//! consumer groups — one of them SIGKILLed midway, the other taking its
//! partitions over — gives the same aggregates (per meter and regional),
//! alerts and tariffs. The real binary, the test broker (Tansu) and a
//! PostgreSQL database shared by the processes, as in production.
//!
//! Needs `cargo xtask build-plugins` first and the services of
//! `cargo xtask services start` (`cargo xtask test` does both).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{METERS, free_port};
use segs::simulator::Simulator;
use segs::store::{AggregateQuery, AlertFilter, Store, WindowWidth};

/// 12 simulated minutes: the scripted surge, spike and outage all happen.
const TICKS: u64 = 72;
/// The second processing process is killed after this tick's 2xx.
const KILL_AFTER: u64 = 33;

/// The shipped config (see `common::config_doc`), on the embedded default
/// or (`kafka`: its namespace) on the test broker.
fn write_config(dir: &Path, sim: &Simulator, kafka: Option<&str>) -> PathBuf {
    let mut doc = common::config_doc(sim);
    if let Some(namespace) = kafka {
        common::on_kafka(&mut doc, &common::test_brokers(), namespace);
    }
    let name = if kafka.is_some() { "kafka" } else { "one" };
    common::write(dir, &format!("pipeline-{name}.toml"), &doc)
}

/// One `segs run` process.
struct Segs {
    child: Child,
    url: String,
}

/// Starts `segs run --no-simulator --role ROLE` and waits until it answers.
async fn start(dir: &Path, config: &Path, store_url: &str, role: &str, name: &str) -> Segs {
    let port = free_port();
    let log_path = dir.join(format!("segs-{name}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segs"))
        .args(["run", "--no-simulator", "--role", role, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(config)
        .env("DATABASE_URL", store_url)
        .env("SEGS_BUS_PATH", dir.join(format!("segs-bus-{name}.db")))
        .env_remove("SEGS_CRASH_AT")
        .env_remove("KAFKA_BROKERS")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning segs");
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "segs ({name}) exited at start ({status}); log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Segs { child, url };
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("segs ({name}) did not answer within 60 s");
}

/// A process left behind by a failing test would load the shared broker
/// for every test after it.
impl Drop for Segs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Segs {
    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for a clean exit (open windows stored).
    fn stop(&mut self) {
        // SAFETY: kill has no preconditions; the pid is our child's.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "clean stop: {status}");
    }
}

/// Posts every batch of `ticks` ticks to `url`, retrying 503s; calls
/// `after_tick` after each tick's 2xx.
async fn send(sim: &mut Simulator, url: &str, ticks: u64, mut after_tick: impl FnMut(u64)) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for k in 0..ticks {
        for batch in sim.next_batches(1000) {
            let mut attempt = 0;
            loop {
                attempt += 1;
                assert!(attempt < 100, "tick {k}: too many attempts");
                let r = common::post_batch(&client, url, &batch.body).await;
                match r.status().as_u16() {
                    200 => break,
                    503 => tokio::time::sleep(Duration::from_millis(200)).await,
                    status => panic!("tick {k}: {status} {:?}", r.text().await),
                }
            }
        }
        after_tick(k);
        // A pace that keeps the kill mid-stream.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (meter, window start, count, avg, max, min, energy).
type MeterRow = (String, i64, u32, String, String, String, String);
/// (region, window start, meter count, total, load %, active meters).
type RegionalRow = (String, i64, u32, String, String, Vec<String>);
/// (type, severity, meter, region, timestamp).
type AlertKey = (String, String, Option<String>, Option<String>, i64);
/// (region, price, reason, effective from, active).
type TariffRow = (String, String, String, i64, bool);

/// Everything a run decided, in a form two runs can be compared by.
#[derive(Debug, PartialEq)]
struct Results {
    meters_1m: Vec<MeterRow>,
    meters_15m: Vec<MeterRow>,
    regional: Vec<RegionalRow>,
    alerts: Vec<AlertKey>,
    tariffs: Vec<TariffRow>,
}

/// A float as the store gives it back, to 9 decimals.
fn f(x: f64) -> String {
    format!("{x:.9}")
}

async fn results(store: &dyn Store) -> Results {
    let all = AggregateQuery {
        limit: 100_000,
        ..AggregateQuery::default()
    };
    let meters = |rows: Vec<segs::store::MeterAggregate>| {
        let mut v: Vec<_> = rows
            .into_iter()
            .map(|a| {
                (
                    a.meter_id,
                    a.window_start_ms,
                    a.count,
                    f(a.avg_power_kw),
                    f(a.max_power_kw),
                    f(a.min_power_kw),
                    f(a.energy_kwh_sum),
                )
            })
            .collect();
        v.sort();
        v
    };
    let meters_1m = meters(
        store
            .meter_aggregates(WindowWidth::OneMinute, &all)
            .await
            .unwrap(),
    );
    let meters_15m = meters(
        store
            .meter_aggregates(WindowWidth::FifteenMinutes, &all)
            .await
            .unwrap(),
    );
    let mut regional: Vec<_> = store
        .regional_aggregates(&all)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.region,
                r.window_start_ms,
                r.meter_count,
                f(r.total_consumption),
                f(r.load_percentage),
                r.active_meters,
            )
        })
        .collect();
    regional.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut alerts: Vec<_> = store
        .list_alerts(&AlertFilter {
            limit: 10_000,
            ..AlertFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|a| {
            (
                a.alert_type.to_string(),
                a.severity.to_string(),
                a.meter_id,
                a.region,
                a.timestamp_ms,
            )
        })
        .collect();
    alerts.sort();
    let mut tariffs: Vec<_> = store
        .tariff_history(None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            (
                t.region,
                f(t.price_per_kwh),
                t.reason.to_string(),
                t.effective_from_ms,
                t.is_active,
            )
        })
        .collect();
    tariffs.sort();
    Results {
        meters_1m,
        meters_15m,
        regional,
        alerts,
        tariffs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processing_processes_one_killed_give_one_process_results() {
    // Kept when the test fails: the processes' logs are the evidence.
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_owned();
    let dir = scopeguard_keep(dir);
    eprintln!("segs logs in {}", dir_path.display());

    // One process, the embedded default: the reference.
    let mut sim = Simulator::new(common::sim_config(11)).unwrap();
    let one_config = write_config(dir_path.as_path(), &sim, None);
    let one_store = format!("sqlite://{}", dir_path.as_path().join("one.db").display());
    let mut one = start(dir_path.as_path(), &one_config, &one_store, "all", "one").await;
    send(&mut sim, &one.url, TICKS, |_| {}).await;
    one.stop();
    let reference = results(&*segs::store::open(&one_store).await.unwrap()).await;
    assert_eq!(
        reference.meters_1m.iter().map(|m| m.2).sum::<u32>(),
        METERS * TICKS as u32
    );
    assert!(reference.alerts.iter().any(|a| a.0 == "OVERLOAD"));
    assert!(!reference.tariffs.is_empty());

    // Ingest, and two processing processes sharing the partitions, on
    // Kafka and one PostgreSQL database.
    let mut sim = Simulator::new(sim.config().clone()).unwrap();
    let namespace = format!("scale{}-", uuid::Uuid::new_v4().simple());
    let config = write_config(dir_path.as_path(), &sim, Some(&namespace));
    let (pg_url, admin, name) = common::postgres_database("segs_scale").await;
    let ingest = start(dir_path.as_path(), &config, &pg_url, "ingest", "ingest").await;
    let mut first = start(dir_path.as_path(), &config, &pg_url, "process", "p1").await;
    let mut second = start(dir_path.as_path(), &config, &pg_url, "process", "p2").await;
    // Let the group settle on both members before the stream starts (the
    // test is about the kill; a rebalance mid-stream is also handled).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut killed = false;
    send(&mut sim, &ingest.url, TICKS, |k| {
        if k == KILL_AFTER {
            second.kill();
            killed = true;
        }
    })
    .await;
    assert!(killed, "the second process was killed midway");
    // Tansu 0.6 moves a dead member's partitions only at the group's next
    // change (a member joining), not when its session expires as Kafka
    // does: a third process joins, and the killed one's partitions move to
    // the survivors from its checkpoints.
    let mut third = start(dir_path.as_path(), &config, &pg_url, "process", "p3").await;
    let store = segs::store::open(&pg_url).await.unwrap();
    // The survivor takes the killed one's partitions over (after its
    // session expires) and catches up; then a clean stop closes the
    // windows still open.
    let total = u64::from(METERS) * TICKS;
    let mut archived = 0;
    for _ in 0..120 {
        archived = store.count_raw_readings().await.unwrap();
        if archived == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(archived, total, "the raw archive caught up");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut ingest = ingest;
    ingest.stop();
    third.stop();
    first.stop();
    let scaled = results(&*store).await;
    drop(store);
    common::drop_database(&admin, &name).await;

    let same = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        let (a, b) = (format!("{a:?}"), format!("{b:?}"));
        if a != b {
            panic!("{what} differ (one process vs two):\n one: {a}\n two: {b}");
        }
    };
    same("aggregates_1m", &reference.meters_1m, &scaled.meters_1m);
    same("aggregates_15m", &reference.meters_15m, &scaled.meters_15m);
    same("regional windows", &reference.regional, &scaled.regional);
    same("alerts", &reference.alerts, &scaled.alerts);
    same("tariffs", &reference.tariffs, &scaled.tariffs);
    let regions: HashSet<&String> = scaled.regional.iter().map(|r| &r.0).collect();
    assert_eq!(regions.len(), 4);
    dir.passed();
}

/// A temporary directory removed only if the test passed.
struct KeepOnFailure(Option<tempfile::TempDir>);

fn scopeguard_keep(dir: tempfile::TempDir) -> KeepOnFailure {
    KeepOnFailure(Some(dir))
}

impl KeepOnFailure {
    fn passed(mut self) {
        self.0.take();
    }
}

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}
