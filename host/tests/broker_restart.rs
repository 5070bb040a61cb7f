//! A broker restart mid-stream loses nothing acknowledged: the real `segs`
//! binary on Kafka (a Tansu broker of this test's own, on a spare port,
//! storing its log in SQLite so that it outlives the broker process) while
//! the broker is SIGKILLed and started again. Requests meanwhile get 503
//! (nothing acknowledged that the broker does not hold) and are retried;
//! at the end every acknowledged reading is counted exactly once.
//!
//! Needs `cargo xtask build-plugins` first and Tansu built with its
//! `libsql` feature (`cargo xtask test` installs it so).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{METERS, free_port, keys};
use segs::simulator::Simulator;

/// 12 simulated minutes; the broker dies after `KILL_AFTER`'s 2xx.
const TICKS: u64 = 72;
const KILL_AFTER: u64 = 30;

/// A Tansu broker on `port`, its log in `dir/tansu.db`.
struct Broker {
    child: Child,
}

/// Nothing outlives a failing test.
impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `segs` child, killed if the test fails before it stops it.
struct Child2(Child);

impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Broker {
    async fn start(dir: &Path, port: u16, n: usize) -> Broker {
        let log = std::fs::File::create(dir.join(format!("tansu-{n}.log"))).unwrap();
        let listener = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new("tansu")
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning tansu (`cargo xtask services start` installs it)");
        for _ in 0..300 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "tansu exited at start ({status}): it needs its `libsql` feature \
                     (`cargo install tansu --locked --features dynostore,libsql`; \
                     `cargo xtask test` does it); log:\n{}",
                    std::fs::read_to_string(dir.join(format!("tansu-{n}.log"))).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Broker { child };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("tansu did not listen on {port} within 30 s");
    }

    /// Stops the broker (SIGTERM, as a rolling restart does).
    fn stop(&mut self) {
        // SAFETY: kill has no preconditions; the pid is our child's.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// The shipped config (see `common::config_doc`) on the broker at `port`,
/// with short delivery timeout and dedupe hold.
fn write_config(dir: &Path, sim: &Simulator, port: u16) -> PathBuf {
    let mut doc = common::config_doc(sim);
    common::on_kafka(&mut doc, &format!("127.0.0.1:{port}"), "");
    doc["kafka"]
        .as_table_mut()
        .unwrap()
        .insert("delivery_timeout_s".into(), toml::Value::Integer(4));
    doc["dedupe"]
        .as_table_mut()
        .unwrap()
        .insert("hold_s".into(), toml::Value::Integer(5));
    common::write(dir, "pipeline.toml", &doc)
}

/// Ignored: the test broker cannot do it. Tansu 0.6 restarted on its SQLite
/// log panics on the first produce of an idempotent producer it knew
/// before the restart (`tansu_storage::lite` `idempotent_message_check`:
/// "more or less than one row"), and its storage task is gone from then on;
/// its in-memory storage forgets everything at a restart. segs's producer
/// is idempotent by design (no duplicates on retries), so the test waits
/// for a broker that keeps idempotent producers across restarts — Apache
/// Kafka does. Run it with `--run-ignored all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Tansu 0.6 panics on an idempotent producer after a restart on its SQLite log (see the doc comment)"]
async fn a_broker_restart_mid_stream_loses_nothing_acknowledged() {
    // Kept when the test fails: the logs are the evidence.
    let dir = tempfile::tempdir().unwrap().keep();
    eprintln!("logs in {}", dir.display());
    let mut sim = Simulator::new(common::sim_config(5)).unwrap();
    let port = free_port();
    let mut broker = Broker::start(&dir, port, 0).await;
    let config = write_config(&dir, &sim, port);

    let http_port = free_port();
    let log = std::fs::File::create(dir.join("segs.log")).unwrap();
    let segs = Command::new(env!("CARGO_BIN_EXE_segs"))
        .args(["run", "--no-simulator", "--listen"])
        .arg(format!("127.0.0.1:{http_port}"))
        .arg("--config")
        .arg(&config)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("segs.db").display()),
        )
        .env_remove("KAFKA_BROKERS")
        .env_remove("SEGS_CRASH_AT")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning segs");
    let mut segs = Child2(segs);
    let url = format!("http://127.0.0.1:{http_port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut up = false;
    for _ in 0..600 {
        assert!(segs.0.try_wait().unwrap().is_none(), "segs exited at start");
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await {
            up = r.status().is_success();
            if up {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "segs did not answer within 60 s");

    let mut acked: HashSet<(String, String)> = HashSet::new();
    let mut refused_while_down = 0;
    let mut down = false;
    for k in 0..TICKS {
        for batch in sim.next_batches(1000) {
            let mut attempt = 0;
            loop {
                attempt += 1;
                assert!(attempt < 300, "tick {k}: too many attempts");
                let r = common::post_batch(&client, &url, &batch.body).await;
                match r.status().as_u16() {
                    200 => {
                        acked.extend(keys(&batch.body));
                        break;
                    }
                    503 => {
                        if down {
                            refused_while_down += 1;
                            if refused_while_down == 2 {
                                // The outage has been seen: the broker
                                // comes back on the same log.
                                broker = Broker::start(&dir, port, 1).await;
                                down = false;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    status => panic!("tick {k}: {status} {:?}", r.text().await),
                }
            }
        }
        if k == KILL_AFTER {
            broker.stop();
            down = true;
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(
        refused_while_down >= 2,
        "requests while the broker was down were refused ({refused_while_down})"
    );
    // Let the stages catch up, then stop cleanly (open windows stored).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SAFETY: kill has no preconditions; the pid is our child's.
    unsafe {
        libc::kill(segs.0.id() as i32, libc::SIGTERM);
    }
    let status = segs.0.wait().unwrap();
    assert!(status.success(), "clean stop: {status}");
    broker.stop();

    let store = segs::store::open(&format!("sqlite://{}", dir.join("segs.db").display()))
        .await
        .unwrap();
    let unique = acked.len() as u64;
    assert_eq!(unique, u64::from(METERS) * TICKS);
    common::assert_counted_once(&*store, unique).await;
    let _ = std::fs::remove_dir_all(&dir);
}
