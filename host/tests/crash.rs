//! Crashes change no count: the real `segs` binary on the embedded default
//! (durable bus, SQLite) and on Kafka (the test broker), killed with SIGKILL at many points of a scripted
//! stream and restarted on the same files, ends with every acknowledged
//! reading counted exactly once, and no alert or tariff change repeated.
//!
//! The client behaves as a real one does: a request that got no answer
//! (the process died under it) is sent again once segs is back. Kill points:
//! - `ingest.after_publish` — mid-request: the readings are on the bus, the
//!   2xx never left (the retry must be told "duplicates");
//! - right after a 2xx (an external SIGKILL), twice, both inside an open
//!   15-minute window;
//! - `stream.before_checkpoint` — windows closed, not yet stored;
//! - `stream.after_publish` — stored and published, offsets not committed;
//! - `alerts.after_apply`, `tariff.after_apply` — an alert / a tariff stored,
//!   `alerts_processed` / `tariff_updates` not yet published;
//! - `stream.replay` — during the replay after a restart.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

mod common;

use common::{METERS, free_port, keys};
use segs::simulator::Simulator;
use segs::store::{AlertFilter, Store};
use serde_json::Value;

/// 12 simulated minutes at one reading per meter every 10 s: the scripted
/// surge (overload alert, tariff move), spike and outage all happen.
const TICKS: u64 = 72;
/// At most this many ticks: the 15-minute window the stream starts in.
const MAX_TICKS: u64 = 90;

/// The shipped config (see `common::config_doc`); on Kafka, the test broker
/// in a namespace of its own, with ingest's dedupe marks in Redis, as in
/// production (several ingest processes share them, and they outlive a
/// crash). A short hold: the retry of the request killed mid-publish meets
/// its hold, gets 503 until it runs out, then finds the readings on the bus.
fn write_config(dir: &Path, sim: &Simulator, kafka: bool) -> PathBuf {
    let mut doc = common::config_doc(sim);
    if kafka {
        let namespace = format!("crash{}-", uuid::Uuid::new_v4().simple());
        common::on_kafka(&mut doc, &common::test_brokers(), &namespace);
        let dedupe = doc["dedupe"].as_table_mut().unwrap();
        dedupe.insert("kind".into(), toml::Value::String("redis".into()));
        dedupe.insert("hold_s".into(), toml::Value::Integer(5));
        let k = doc["kafka"].as_table_mut().unwrap();
        k.insert("delivery_timeout_s".into(), toml::Value::Integer(4));
    }
    common::write(dir, "pipeline.toml", &doc)
}

/// One `segs run` process.
struct Segs {
    child: Child,
    url: String,
}

/// Starts `segs run --no-simulator` on the files in `dir`, armed with
/// `crash_at` (a `SEGS_CRASH_AT` spec), and waits until it answers. `None`
/// if it reached its crash point while starting (replaying what the last
/// one left).
async fn start(dir: &Path, config: &Path, crash_at: Option<&str>, n: usize) -> Option<Segs> {
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("segs-{n}.log"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segs"));
    cmd.args(["run", "--no-simulator", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(config)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("segs.db").display()),
        )
        .env("SEGS_BUS_PATH", dir.join("segs-bus.db"))
        .env_remove("SEGS_CRASH_AT")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(spec) = crash_at {
        cmd.env("SEGS_CRASH_AT", spec);
    }
    let mut child = cmd.spawn().expect("spawning segs");
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            if crash_at.is_some() && status.signal() == Some(9) {
                return None;
            }
            panic!(
                "segs exited at start ({status}); log:\n{}",
                std::fs::read_to_string(dir.join(format!("segs-{n}.log"))).unwrap_or_default()
            );
        }
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Some(Segs { child, url });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("segs did not answer within 60 s");
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

    /// Waits for a process that is dying (or dead) to be gone; true if it
    /// was killed by a signal (a crash point), not a clean exit.
    fn reap(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.wait().unwrap();
        status.signal() == Some(9)
    }
}

/// The processes of one test, armed one after another.
struct Run<'a> {
    dir: &'a Path,
    config: PathBuf,
    armed: VecDeque<&'static str>,
    current: Option<&'static str>,
    starts: usize,
    deaths: Vec<String>,
}

impl Run<'_> {
    /// Records how the last process died and starts the next, armed with
    /// the next crash point (again if it dies while starting).
    async fn restart(&mut self, death: String) -> Segs {
        self.deaths.push(death);
        loop {
            self.starts += 1;
            self.current = self.armed.pop_front();
            match start(self.dir, &self.config, self.current, self.starts).await {
                Some(segs) => return segs,
                None => self
                    .deaths
                    .push(format!("{} (while starting)", self.current.unwrap())),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_changes_no_count() {
    sigkill_anywhere(false).await;
}

/// Passes when the test broker keeps up (on this machine about half the
/// tries); ignored because Tansu 0.6 now and then leaves every consumer
/// group waiting on a killed member for good, so the next process never gets
/// a partition and a crash point is never reached (its log shows no
/// assignment in any group). What it checks of segs — the two-phase Redis
/// dedupe, checkpoints and replays on Kafka — passed in the runs that got
/// their partitions. Run it with `cargo nextest run -E 'test(on_kafka)'
/// --run-ignored all` (nextest retries it twice, `.config/nextest.toml`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Tansu 0.6 can leave consumer groups waiting on a killed member for good (see the doc comment)"]
async fn sigkill_anywhere_changes_no_count_on_kafka() {
    sigkill_anywhere(true).await;
}

async fn sigkill_anywhere(kafka: bool) {
    // Kept when the test fails: the processes' logs are the evidence.
    let dir = tempfile::tempdir().unwrap().keep();
    let mut sim = Simulator::new(common::sim_config(7)).unwrap();
    let config = write_config(dir.as_path(), &sim, kafka);
    eprintln!("segs logs in {}", dir.as_path().display());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Processes die in this order; each restart is armed with the next.
    // (On Kafka, where a restarted process waits for its partitions, the
    // stream's second outbox publication may come only at the clean stop:
    // the first one is the kill point there.)
    // (`archive.after_commit`: the archive commits while later writes are
    // still under way; what it committed must be stored, or readings go
    // missing from raw_readings.)
    let points = [
        "ingest.after_publish#10",
        "archive.after_commit#40",
        "stream.replay#5",
        "stream.before_checkpoint#2",
        "alerts.after_apply#1",
        "tariff.after_apply#1",
        if kafka {
            "stream.after_publish#1"
        } else {
            "stream.after_publish#2"
        },
    ];
    let mut run = Run {
        dir: dir.as_path(),
        config,
        armed: points[1..].iter().copied().collect(),
        current: Some(points[0]),
        starts: 0,
        deaths: Vec::new(),
    };
    // After the 2xx of these ticks, an external SIGKILL.
    // (On Kafka one: each restart there waits for the killed member's
    // session to expire, and a kill re-arms the point it pre-empted.)
    let kill_after: HashSet<u64> = if kafka { [20].into() } else { [20, 45].into() };
    // On Kafka a restarted member gets its partitions only once the killed
    // one's session has expired: a slower pace keeps the crash points
    // mid-stream.
    let pace = Duration::from_millis(if kafka { 300 } else { 60 });
    let mut segs = start(dir.as_path(), &run.config, run.current, 0)
        .await
        .expect("the first start");
    let mut acked: HashSet<(String, String)> = HashSet::new();
    let mut retried_after_crash = Vec::new();

    // The scripted ticks, then whole minutes more while a crash point is
    // still to be reached (up to the 15-minute window's end).
    let mut ticks = 0;
    for k in 0..MAX_TICKS {
        if k >= TICKS && k % 6 == 0 && run.current.is_none() {
            break;
        }
        ticks = k + 1;
        for batch in sim.next_batches(1000) {
            let mut attempt = 0;
            loop {
                attempt += 1;
                assert!(attempt < 100, "tick {k}: too many attempts");
                let sent = client
                    .post(format!("{}/telemetry/batch", segs.url))
                    .header("content-type", "application/json")
                    .body(batch.body.clone())
                    .send()
                    .await;
                let answer = match sent {
                    Ok(r) => Some((r.status().as_u16(), r.bytes().await)),
                    Err(_) => None,
                };
                match answer {
                    Some((200, Ok(body))) => {
                        let body: Value = serde_json::from_slice(&body).unwrap();
                        if attempt > 1 {
                            retried_after_crash.push((k, body.clone()));
                        }
                        acked.extend(keys(&batch.body));
                        break;
                    }
                    Some((503, _)) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Some((status, body)) => panic!("tick {k}: {status} {body:?}"),
                    None => {
                        // No answer: the process died under the request.
                        assert!(segs.reap(), "segs exited without being killed");
                        let death = run.current.unwrap_or("?").to_owned();
                        segs = run.restart(death).await;
                    }
                }
            }
        }
        if kill_after.contains(&k) {
            segs.kill();
            // Its crash point was not reached: arm the next process with it.
            if let Some(c) = run.current {
                run.armed.push_front(c);
            }
            segs = run
                .restart(format!("SIGKILL after the 2xx of tick {k}"))
                .await;
        }
        // Give the stages time to get somewhere between requests, so that
        // the armed crash points are reached mid-stream.
        tokio::time::sleep(pace).await;
        if let Ok(Some(_)) = segs.child.try_wait() {
            assert!(segs.reap(), "segs exited without being killed");
            let death = run.current.unwrap_or("?").to_owned();
            segs = run.restart(death).await;
        }
    }
    // Let an armed process reach its point with nothing more sent, then
    // stop the last one cleanly (SIGTERM: open windows are stored).
    let mut waited = 0;
    while run.current.is_some() && waited < 30 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        waited += 1;
        if segs.child.try_wait().unwrap().is_some() {
            assert!(segs.reap());
            let death = run.current.unwrap().to_owned();
            segs = run.restart(death).await;
            waited = 0;
        }
    }
    // Stop cleanly (SIGTERM: open windows are stored). A process still
    // armed may reach its point while stopping: that is one more crash, and
    // the next process is stopped in turn.
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // SAFETY: kill has no preconditions; the pid is our child's.
        unsafe {
            libc::kill(segs.child.id() as i32, libc::SIGTERM);
        }
        let status = segs.child.wait().unwrap();
        if status.success() {
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert!(
            run.current.is_some() && status.signal() == Some(9),
            "clean stop: {status}"
        );
        let death = format!("{} (while stopping)", run.current.unwrap());
        segs = run.restart(death).await;
    }
    let (current, armed, deaths) = (run.current, run.armed, run.deaths);

    // Every crash point was reached.
    assert!(
        current.is_none() && armed.is_empty(),
        "crash points never reached: {current:?} {armed:?} (deaths: {deaths:?})"
    );
    for p in points {
        assert!(
            deaths.iter().any(|d| d.starts_with(p)),
            "{p} never reached: {deaths:?}"
        );
    }
    assert!(deaths.len() > points.len(), "{deaths:?}");
    eprintln!("deaths: {deaths:?}");
    // The request that died after publishing was answered "duplicates" on
    // its retry: its readings were already kept.
    let (tick, retry) = &retried_after_crash[0];
    assert_eq!(*tick, 9, "{retried_after_crash:?}");
    assert_eq!(retry["accepted"], 0, "{retry}");

    let store = segs::store::open(&format!(
        "sqlite://{}",
        dir.as_path().join("segs.db").display()
    ))
    .await
    .unwrap();
    assert_exactly_once(&*store, &acked, ticks).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn assert_exactly_once(store: &dyn Store, acked: &HashSet<(String, String)>, ticks: u64) {
    let unique = acked.len() as u64;
    assert_eq!(
        unique,
        u64::from(METERS) * ticks,
        "every reading acked once"
    );
    common::assert_counted_once(store, unique).await;

    // No alert stored twice; the scripted overload incident alerts once.
    let alerts = store
        .list_alerts(&AlertFilter {
            limit: 10_000,
            ..AlertFilter::default()
        })
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for a in &alerts {
        assert!(
            seen.insert((
                a.alert_type,
                a.meter_id.clone(),
                a.region.clone(),
                a.timestamp_ms
            )),
            "alert stored twice: {a:?}"
        );
    }
    let overloads = alerts.iter().filter(|a| a.alert_type == "OVERLOAD").count();
    assert_eq!(overloads, 1, "{alerts:?}");
    assert!(
        alerts.iter().any(|a| a.alert_type == "ANOMALY"),
        "{alerts:?}"
    );

    // No tariff change repeated: per region, effective_from strictly
    // increases and each row changes the price.
    let mut history = store.tariff_history(None, 10_000).await.unwrap();
    history.sort_by(|a, b| (&a.region, a.effective_from_ms).cmp(&(&b.region, b.effective_from_ms)));
    let mut last: HashMap<&str, (i64, f64)> = HashMap::new();
    for t in &history {
        if let Some((from, price)) = last.get(t.region.as_str()) {
            assert!(t.effective_from_ms > *from, "tariff repeated: {t:?}");
            assert_ne!(t.price_per_kwh, *price, "tariff change repeated: {t:?}");
        }
        last.insert(&t.region, (t.effective_from_ms, t.price_per_kwh));
    }
    assert!(
        history.iter().any(|t| t.price_per_kwh == 7.8),
        "the surge moved a tariff: {history:?}"
    );
}
