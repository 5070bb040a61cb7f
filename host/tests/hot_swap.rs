//! Hot swap of rule plugins while telemetry flows: the admin API (token,
//! step-named refusals, swap, rollback through the `segs plugins` CLI), the
//! watched plugin folder, provenance on every decision, and faults (counted,
//! raised, rolled back after N in a row). Real components, real HTTP, a real
//! SQLite store.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use segs::app::App;
use segs::config::{PipelineConfig, RegionConfig};
use segs::messages::AlertType;
use segs::plugins::{
    self, AnomalyRule, ConfigValue, FaultPolicy, Limits, OnFault, PluginEvent, Registry, Runtime,
    Step, TariffRule,
};
use segs::simulator::{self, SendTarget, SimConfig, SimStats, Simulator};
use segs::store::{AggregateQuery, AlertFilter, WindowWidth};
use serde_json::Value;

use common::{anomaly_batch, component, root};

const TOKEN: &str = "s3cret-admin-token";
/// 2025-11-12T06:00:00Z: a fixed start so event time is repeatable.
const START_MS: i64 = 1_762_927_200_000;
const OLD_MULTIPLIERS: [f64; 4] = [0.95, 1.00, 1.10, 1.20];
const NEW_MULTIPLIERS: [f64; 4] = [1.40, 1.50, 1.60, 1.70];

/// The same component with a custom section appended: a new build (new
/// sha256) with the same code.
fn rebuilt(name: &str, tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(component(name)).unwrap();
    let label = b"segs-test";
    let mut payload = vec![label.len() as u8];
    payload.extend_from_slice(label);
    payload.extend_from_slice(tag.as_bytes());
    assert!(payload.len() < 128, "one-byte LEB128 size");
    bytes.push(0); // custom section
    bytes.push(payload.len() as u8);
    bytes.extend_from_slice(&payload);
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    plugins::sha256_hex(bytes)
}

/// The shipped pipeline.toml with its store and journal in `dir`, regions
/// at 60 % of capacity (the scripted surge crosses 90 %), and the admin
/// token set.
fn config(dir: &Path, sim: &Simulator) -> PipelineConfig {
    component("anomaly");
    let mut cfg = PipelineConfig::load(&root().join("pipeline.toml")).unwrap();
    cfg.store.url = format!("sqlite://{}", dir.join("segs.db").display());
    cfg.ingest.max_reading_age_s = 0;
    cfg.bus.path = dir.join("segs-bus.db");
    cfg.admin.token = TOKEN.into();
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

fn sim_config() -> SimConfig {
    let mut cfg = SimConfig {
        meters: 100,
        interval_s: 10,
        seed: 7,
        start_ms: START_MS,
        duplicate_ratio: 0.03,
        ..SimConfig::default()
    };
    cfg.phases = simulator::default_phases(cfg.meters, &cfg.regions, cfg.interval_s);
    cfg
}

struct Admin {
    client: reqwest::Client,
    base: String,
}

impl Admin {
    async fn send(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> (u16, Value) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn list(&self, token: Option<&str>) -> (u16, Value) {
        let req = self.client.get(format!("{}/admin/plugins", self.base));
        self.send(req, token).await
    }

    /// The listing of plugin `name` (`GET /admin/plugins`).
    async fn slot(&self, name: &str) -> Value {
        let (status, body) = self.list(Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        body["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {body}"))
            .clone()
    }

    /// The serving (version, sha256) of `name`.
    async fn serving(&self, name: &str) -> (u64, String) {
        let slot = self.slot(name).await;
        (
            slot["serving"]["version"].as_u64().unwrap(),
            slot["serving"]["sha256"].as_str().unwrap().to_owned(),
        )
    }

    async fn push(
        &self,
        name: &str,
        bytes: Vec<u8>,
        config: Option<&Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut url = reqwest::Url::parse(&format!("{}/admin/plugins/{name}", self.base)).unwrap();
        if let Some(c) = config {
            url.query_pairs_mut().append_pair("config", &c.to_string());
        }
        let req = self
            .client
            .put(url)
            .header("content-type", "application/wasm")
            .body(bytes);
        self.send(req, token).await
    }

    async fn push_config(&self, name: &str, config: &Value) -> (u16, Value) {
        let req = self
            .client
            .put(format!("{}/admin/plugins/{name}", self.base))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "config": config }).to_string());
        self.send(req, Some(TOKEN)).await
    }
}

fn tariff_config(m: [f64; 4]) -> Value {
    serde_json::json!({
        "low_multiplier": m[0],
        "normal_multiplier": m[1],
        "high_multiplier": m[2],
        "critical_multiplier": m[3],
    })
}

/// `segs plugins …` against `base`; (success, stdout + stderr).
async fn cli(base: &str, token: &str, args: &[&str]) -> (bool, String) {
    segs_admin("plugins", base, token, args).await
}

/// `segs <command> --url base --token token …`, a client of the admin API;
/// (success, stdout + stderr).
async fn segs_admin(command: &str, base: &str, token: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_segs"))
        .arg(command)
        .args(["--url", base, "--token", token])
        .args(args)
        .env_remove("SEGS_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn is_one_of(price: f64, multipliers: &[f64]) -> bool {
    multipliers
        .iter()
        .any(|m| (price - 6.5 * m).abs() < 1e-9 * price.max(1.0))
}

/// The issue's main case: refusals first (no token, wrong token, random
/// bytes, another world's component, a config the rule refuses) change
/// nothing; then, while the simulator streams, new price tiers in a new
/// build go in through `PUT /admin/plugins/tariff`. Every tariff decision
/// names the version and sha256 that made it and is priced by that
/// version's tiers; no reading is lost or counted twice; the CLI lists the
/// versions and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tariff_swap_while_the_stream_flows_changes_prices_and_loses_no_reading() {
    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = sim_config();
    let sim = Simulator::new(sim_cfg.clone()).unwrap();
    let app = App::start(config(dir.path(), &sim), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = app.ctx.store.clone();
    let bus = app.ctx.bus.clone();
    let base = format!("http://{}", app.addr);
    let admin = Admin {
        client: reqwest::Client::new(),
        base: base.clone(),
    };
    let old_sha = sha256(&std::fs::read(component("tariff")).unwrap());
    assert_eq!(admin.serving("tariff").await, (1, old_sha.clone()));

    // No token, a wrong token: 401, nothing changes.
    assert_eq!(admin.list(None).await.0, 401);
    assert_eq!(admin.list(Some("wrong")).await.0, 401);
    let new_build = rebuilt("tariff", "v2");
    let new_config = tariff_config(NEW_MULTIPLIERS);
    for token in [None, Some("wrong")] {
        let (status, _) = admin
            .push("tariff", new_build.clone(), Some(&new_config), token)
            .await;
        assert_eq!(status, 401);
    }
    assert_eq!(admin.serving("tariff").await, (1, old_sha.clone()));

    // Bad components and a bad config are refused, naming the step.
    let (status, body) = admin
        .push("tariff", b"definitely not wasm".to_vec(), None, Some(TOKEN))
        .await;
    assert_eq!(
        (status, body["step"].as_str()),
        (422, Some("compile")),
        "{body}"
    );
    let anomaly = std::fs::read(component("anomaly")).unwrap();
    let (status, body) = admin.push("tariff", anomaly, None, Some(TOKEN)).await;
    assert_eq!(
        (status, body["step"].as_str()),
        (422, Some("world")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("tariff-rule"),
        "{body}"
    );
    let (status, body) = admin
        .push_config("tariff", &serde_json::json!({"normal_multiplier": -1.0}))
        .await;
    assert_eq!(
        (status, body["step"].as_str()),
        (422, Some("configure")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("normal_multiplier"),
        "{body}"
    );
    let (status, body) = admin
        .push("nonesuch", new_build.clone(), None, Some(TOKEN))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(admin.serving("tariff").await, (1, old_sha.clone()));

    // The stream, and the swap while it flows.
    let stats = SimStats::new();
    let target = SendTarget {
        url: base.clone(),
        batch_size: 200,
        rate: Some(4000.0),
        ticks: Some(72), // 12 simulated minutes
        ..SendTarget::default()
    };
    let streaming = tokio::spawn(simulator::run(sim_cfg.clone(), target, stats.clone()));
    while stats.accepted.load(Ordering::Relaxed) < 2400 && !streaming.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let accepted_at_swap = stats.accepted.load(Ordering::Relaxed);
    let (status, body) = admin
        .push("tariff", new_build.clone(), Some(&new_config), Some(TOKEN))
        .await;
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "swapped after {accepted_at_swap} readings were accepted, {} by the time it served",
        stats.accepted.load(Ordering::Relaxed)
    );
    let new_sha = sha256(&new_build);
    assert_eq!(body["plugin"]["version"], 2);
    assert_eq!(body["plugin"]["sha256"], new_sha.as_str());
    assert_eq!(body["plugin"]["source"], "admin");
    assert_eq!(admin.serving("tariff").await, (2, new_sha.clone()));
    streaming.await.unwrap().unwrap();

    // The CLI: a wrong token is refused; list shows both versions.
    let (ok, text) = cli(&base, "wrong", &["list"]).await;
    assert!(!ok && text.contains("401"), "{text}");
    let (ok, text) = cli(&base, TOKEN, &["list"]).await;
    assert!(ok, "{text}");
    assert!(
        text.contains(&new_sha[..12]) && text.contains(&old_sha[..12]),
        "{text}"
    );
    app.shutdown().await;

    // Nothing lost, nothing counted twice.
    let accepted = stats.accepted.load(Ordering::Relaxed);
    assert_eq!(accepted, 7200, "every unique reading accepted");
    let all = AggregateQuery {
        limit: 100_000,
        ..AggregateQuery::default()
    };
    let one = store
        .meter_aggregates(WindowWidth::OneMinute, &all)
        .await
        .unwrap();
    let sum: u64 = one.iter().map(|a| u64::from(a.count)).sum();
    assert_eq!(sum, accepted, "sum of count in aggregates_1m");

    // Every tariff decision: priced by the tiers of the version it names.
    let tariffs = store.tariff_history(None, 10_000).await.unwrap();
    let mut by_version = [0, 0];
    for t in &tariffs {
        let rule = t.rule.as_ref().expect("every tariff names its rule");
        assert_eq!(rule.name, "tariff");
        match rule.version {
            1 => {
                assert_eq!(rule.sha256, old_sha);
                assert!(is_one_of(t.price_per_kwh, &OLD_MULTIPLIERS), "{t:?}");
                by_version[0] += 1;
            }
            2 => {
                assert_eq!(rule.sha256, new_sha);
                assert!(is_one_of(t.price_per_kwh, &NEW_MULTIPLIERS), "{t:?}");
                by_version[1] += 1;
            }
            v => panic!("no version {v} was installed: {t:?}"),
        }
    }
    assert!(by_version[1] > 0, "decisions after the swap: {tariffs:?}");
    // A region's windows are priced in order: once one was priced by the
    // new version, none after it was priced by the old.
    for region in &sim_cfg.regions {
        let mut ordered: Vec<_> = tariffs.iter().filter(|t| &t.region == region).collect();
        ordered.sort_by_key(|t| t.effective_from_ms);
        let versions: Vec<u64> = ordered
            .iter()
            .map(|t| t.rule.as_ref().unwrap().version)
            .collect();
        assert!(versions.is_sorted(), "{region}: {versions:?}");
    }

    // The published tariff_updates name the same rule as the stored rows.
    let published = bus
        .recent_records(segs::bus::Topic::TariffUpdates, 0)
        .await
        .unwrap();
    assert_eq!(published.len(), tariffs.len());
    for record in &published {
        let update: segs::messages::TariffUpdate = segs::messages::decode(&record.value).unwrap();
        let row = tariffs
            .iter()
            .find(|t| t.tariff_id == update.tariff_id)
            .unwrap();
        assert_eq!(update.rule, row.rule, "{update:?}");
    }

    // Alerts name their rule too.
    let alerts = store
        .list_alerts(&AlertFilter {
            limit: 1000,
            ..AlertFilter::default()
        })
        .await
        .unwrap();
    assert!(!alerts.is_empty());
    for a in &alerts {
        let rule = a.rule.as_ref().expect("every alert names its rule");
        let want = match a.alert_type {
            AlertType::Anomaly => "anomaly",
            AlertType::Overload => "overload",
            other => panic!("unexpected {other} alert: {a:?}"),
        };
        assert_eq!((rule.name.as_str(), rule.version), (want, 1), "{a:?}");
        assert_eq!(rule.sha256.len(), 64);
    }
}

/// A rollback through the CLI puts the earlier version back; a second one
/// has nowhere to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pushes_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_config()).unwrap();
    let app = App::start(config(dir.path(), &sim), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", app.addr);
    let admin = Admin {
        client: reqwest::Client::new(),
        base: base.clone(),
    };
    let old = admin.serving("overload").await;

    let file = dir.path().join("overload-v2.wasm");
    std::fs::write(&file, rebuilt("overload", "v2")).unwrap();
    let (ok, text) = cli(
        &base,
        TOKEN,
        &[
            "push",
            "overload",
            file.to_str().unwrap(),
            "--config",
            r#"{"threshold_percent": 80.0}"#,
        ],
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("overload v2"), "{text}");
    assert_eq!(admin.serving("overload").await.0, 2);

    // Config only: the serving component with a new config is version 3.
    let (ok, text) = cli(
        &base,
        TOKEN,
        &[
            "push",
            "overload",
            "--config",
            r#"{"consecutive_windows": 3}"#,
        ],
    )
    .await;
    assert!(ok, "{text}");
    let (v, sha) = admin.serving("overload").await;
    assert_eq!(v, 3);
    assert_eq!(sha, sha256(&rebuilt("overload", "v2")));

    // Bad input through the CLI names the step.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x0d\0\x01\0garbage").unwrap();
    let (ok, text) = cli(&base, TOKEN, &["push", "overload", junk.to_str().unwrap()]).await;
    assert!(!ok && text.contains("`compile`"), "{text}");

    for expected in [2, 1] {
        let (ok, text) = cli(&base, TOKEN, &["rollback", "overload"]).await;
        assert!(ok, "{text}");
        assert_eq!(admin.serving("overload").await.0, expected);
    }
    assert_eq!(admin.serving("overload").await, old);
    let (ok, text) = cli(&base, TOKEN, &["rollback", "overload"]).await;
    assert!(!ok && text.contains("no previous version"), "{text}");
    app.shutdown().await;
}

/// Without a token the admin API is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_config()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    cfg.admin.token.clear();
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admin = Admin {
        client: reqwest::Client::new(),
        base: format!("http://{}", app.addr),
    };
    let (status, body) = admin.list(Some("anything")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "admin_off");
    let (status, _) = admin
        .push("tariff", rebuilt("tariff", "x"), None, Some(""))
        .await;
    assert_eq!(status, 404);
    app.shutdown().await;
}

/// A component copied into the watched folder is swapped in; junk there is
/// refused and the serving version stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_folder_swaps_a_new_component_in() {
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("plugins");
    std::fs::create_dir(&watched).unwrap();
    let sim = Simulator::new(sim_config()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    cfg.admin.watch_dir = watched.clone();
    cfg.admin.watch_debounce_ms = 100;
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let registry = app.registry.clone().unwrap();
    let serving = |name: &str| registry.get(name).unwrap().serving();
    let anomaly_v1 = serving("anomaly");

    std::fs::write(watched.join("anomaly.wasm"), b"not a component").unwrap();
    let build = rebuilt("tariff", "watched");
    std::fs::write(watched.join("tariff.wasm"), &build).unwrap();
    // Bounded so a broken watch fails instead of hanging; not a speed check.
    let mut waited = Duration::ZERO;
    while serving("tariff").version != 2 {
        assert!(
            waited < Duration::from_secs(120),
            "the watched tariff.wasm was never swapped in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let v = serving("tariff");
    assert_eq!(v.sha256, sha256(&build));
    assert!(v.source.starts_with("watch:"), "{v:?}");
    assert_eq!(serving("anomaly"), anomaly_v1, "junk changes nothing");
    app.shutdown().await;
}

/// Faults fail their call only, are counted on the version that made them,
/// come out as events (raised as PLUGIN_FAULT alerts), and after N in a row
/// the slot rolls back (a PLUGIN_ROLLBACK alert); the rolled-back version
/// serves the next batch. The fault is a real memory blow-up under a 2 MiB
/// cap.
#[test]
fn faults_are_counted_raised_and_rolled_back_after_n_in_a_row() {
    let rt = Runtime::new(Limits {
        max_memory_bytes: 2 << 20,
        ..Limits::default()
    })
    .unwrap();
    let mut registry = Registry::default();
    let events = registry.take_events().unwrap();
    let mut events = events;
    let policy = FaultPolicy {
        on_fault: OnFault::Skip,
        auto_rollback_after: 2,
    };
    let slot = registry
        .load::<<AnomalyRule as Handle>::W>(&rt, "anomaly", &component("anomaly"), vec![], policy)
        .unwrap();
    let mut rule = slot.instance().unwrap();
    let control = registry.get("anomaly").unwrap();
    let v2 = control
        .swap(
            None,
            Some(vec![("min_sample_size".into(), ConfigValue::Integer(5))]),
            "test".into(),
        )
        .unwrap();
    assert_eq!(v2.version, 2);
    assert!(v2.source.ends_with("+config"), "{v2:?}");

    assert_eq!(rule.detect(&anomaly_batch(1000)).unwrap().len(), 10);
    assert_eq!(rule.served_by().version, 2, "the handle moved to v2");
    for _ in 0..2 {
        let err = rule.detect(&anomaly_batch(500_000)).unwrap_err();
        assert!(matches!(err, plugins::PluginError::Trap { .. }), "{err:?}");
    }
    let listing = control.listing();
    assert_eq!(listing.serving.version, 1, "rolled back after 2 in a row");
    assert!(listing.previous.is_empty());
    // The next batch runs on v1.
    assert_eq!(rule.detect(&anomaly_batch(1000)).unwrap().len(), 10);
    assert_eq!(rule.served_by().version, 1);
    assert_eq!(control.listing().serving.calls, 1);

    let mut got = Vec::new();
    while let Ok(e) = events.try_recv() {
        got.push(e);
    }
    assert_eq!(got.len(), 3, "{got:?}");
    for e in &got[..2] {
        let PluginEvent::Fault { version, call, .. } = e else {
            panic!("{e:?}");
        };
        assert_eq!((version.version, *call), (2, "detect"));
        let alert = segs::pipeline::faults::alert(e);
        assert_eq!(alert.alert_type, AlertType::PluginFault);
        assert_eq!(alert.rule.as_ref().unwrap().version, 2);
    }
    let PluginEvent::RolledBack {
        from, to, faults, ..
    } = &got[2]
    else {
        panic!("{:?}", got[2]);
    };
    assert_eq!((from.version, to.version, *faults), (2, 1, 2));
    let alert = segs::pipeline::faults::alert(&got[2]);
    assert_eq!(alert.alert_type, AlertType::PluginRollback);
    assert!(alert.message.contains("from v2 to v1"), "{}", alert.message);

    // A swap refused at `sample`-or-earlier leaves v1 serving.
    let tariff = std::fs::read(component("tariff")).unwrap();
    let err = control
        .swap(Some(&tariff), None, "test".into())
        .unwrap_err();
    assert_eq!(err.step(), Some(Step::World), "{err}");
    assert_eq!(control.listing().serving.version, 1);
}

/// Names the world type of a handle alias.
trait Handle {
    type W: plugins::World;
}
impl<W: plugins::World> Handle for plugins::Plugin<W> {
    type W = W;
}

/// `retry_previous`: the batch the serving version failed goes to the
/// version before it; when that fails too, the call fails, and each fault
/// is counted on the version that made it.
#[test]
fn retry_previous_gives_the_failed_batch_to_the_previous_version() {
    let rt = Runtime::new(Limits {
        max_memory_bytes: 2 << 20,
        ..Limits::default()
    })
    .unwrap();
    let mut registry = Registry::default();
    let policy = FaultPolicy {
        on_fault: OnFault::RetryPrevious,
        auto_rollback_after: 0,
    };
    let slot = registry
        .load::<<AnomalyRule as Handle>::W>(&rt, "anomaly", &component("anomaly"), vec![], policy)
        .unwrap();
    let mut rule = slot.instance().unwrap();
    let control = registry.get("anomaly").unwrap();
    control
        .swap(Some(&rebuilt("anomaly", "v2")), None, "test".into())
        .unwrap();
    // Both versions blow the 2 MiB cap on this batch.
    let err = rule.detect(&anomaly_batch(500_000)).unwrap_err();
    assert!(matches!(err, plugins::PluginError::Trap { .. }), "{err:?}");
    let listing = control.listing();
    assert_eq!(listing.serving.version, 2, "auto rollback is off");
    assert_eq!((listing.serving.calls, listing.serving.faults), (1, 1));
    let v1 = &listing.previous[0];
    assert_eq!((v1.version, v1.calls, v1.faults), (1, 1, 1), "v1 was tried");
    // The next batch runs on the serving version again.
    assert_eq!(rule.detect(&anomaly_batch(1000)).unwrap().len(), 10);
    assert_eq!(rule.served_by().version, 2);
}

/// The hostile fixture with `mode` (and no band: it misbehaves on every
/// call).
fn hostile(mode: &str) -> Vec<(String, ConfigValue)> {
    vec![("mode".into(), ConfigValue::Text(mode.into()))]
}

/// A component that refuses its config, traps, spins, allocates without
/// bound, prices NaN or answers for a region that is not there is refused
/// at swap time, naming the step; the serving version stays.
#[test]
fn hostile_components_are_refused_at_swap_time() {
    let rt = Runtime::new(Limits::default()).unwrap();
    let mut registry = Registry::default();
    registry
        .load::<<TariffRule as Handle>::W>(
            &rt,
            "tariff",
            &component("tariff"),
            vec![],
            FaultPolicy::default(),
        )
        .unwrap();
    let control = registry.get("tariff").unwrap();
    let bytes = std::fs::read(component("hostile")).unwrap();
    for (mode, step, says) in [
        ("refuse", Step::Configure, "refuses every config"),
        ("trap", Step::Sample, "sample"),
        ("loop", Step::Sample, "timed out"),
        ("alloc", Step::Sample, "sample"),
        ("nan", Step::Sample, "NaN"),
        ("bad_index", Step::Sample, "index 4 of 4"),
    ] {
        let err = control
            .swap(Some(&bytes), Some(hostile(mode)), "test".into())
            .unwrap_err();
        assert_eq!(err.step(), Some(step), "{mode}: {err}");
        assert!(err.to_string().contains(says), "{mode}: {err}");
        assert_eq!(control.listing().serving.version, 1, "{mode}");
    }
    // Well-behaved, it is accepted.
    let v = control
        .swap(Some(&bytes), Some(hostile("none")), "test".into())
        .unwrap();
    assert_eq!(v.version, 2);
}

/// A component that passes its checks and then traps on the stream's data
/// (loads inside its band) fails those calls only: readings are still
/// counted, the faults show in `GET /admin/plugins` and as a PLUGIN_FAULT
/// alert (deduplicated), after 3 in a row the tariff rule is rolled back
/// (a PLUGIN_ROLLBACK alert) and the previous version prices the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_traps_on_the_stream_is_contained_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = sim_config();
    let sim = Simulator::new(sim_cfg.clone()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    // Every region at 65 % of capacity, inside the fixture's band (the
    // host's sample batch, at 10, 55, 80 and 95 %, is outside it).
    for r in &sim_cfg.regions {
        cfg.regions.get_mut(r).unwrap().capacity_kw = sim.region_base_load(r) / 0.65;
    }
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = app.ctx.store.clone();
    let base = format!("http://{}", app.addr);
    let admin = Admin {
        client: reqwest::Client::new(),
        base: base.clone(),
    };
    let old_sha = admin.serving("tariff").await.1;
    let fixture = std::fs::read(component("hostile")).unwrap();
    let band = serde_json::json!({"mode": "trap", "band_from": 56.0, "band_to": 79.0});
    let (status, body) = admin
        .push("tariff", fixture.clone(), Some(&band), Some(TOKEN))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plugin"]["version"], 2);

    let stats = SimStats::new();
    let target = SendTarget {
        url: base.clone(),
        batch_size: 200,
        ticks: Some(72),
        ..SendTarget::default()
    };
    simulator::run(sim_cfg, target, stats.clone())
        .await
        .unwrap();
    let health = admin
        .client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "segs keeps answering");

    // Bounded so a broken rollback fails instead of hanging; not a speed
    // check.
    let mut waited = Duration::ZERO;
    let rolled_back = loop {
        let tariff = admin.slot("tariff").await;
        let rollback_stored = store
            .list_alerts(&AlertFilter {
                alert_type: Some("PLUGIN_ROLLBACK".into()),
                ..AlertFilter::default()
            })
            .await
            .unwrap();
        if tariff["serving"]["version"] == 1 && !rollback_stored.is_empty() {
            break tariff;
        }
        assert!(
            waited < Duration::from_secs(120),
            "no rollback: {tariff} {:?}",
            store.regional_aggregates(&AggregateQuery::default()).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    };
    assert_eq!(rolled_back["serving"]["sha256"], old_sha.as_str());
    let retired = &rolled_back["retired"][0];
    assert_eq!(retired["version"], 2, "{rolled_back}");
    assert!(
        retired["faults"].as_u64().unwrap() >= 3,
        "rolled back after 3 in a row: {rolled_back}"
    );
    assert_eq!(retired["sha256"], sha256(&fixture).as_str());
    app.shutdown().await;

    let accepted = stats.accepted.load(Ordering::Relaxed);
    assert_eq!(accepted, 7200);
    let one = store
        .meter_aggregates(
            WindowWidth::OneMinute,
            &AggregateQuery {
                limit: 100_000,
                ..AggregateQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        one.iter().map(|a| u64::from(a.count)).sum::<u64>(),
        accepted,
        "a failing rule loses no reading"
    );

    let alerts = |t: &str| {
        let store = store.clone();
        let t = t.to_owned();
        async move {
            store
                .list_alerts(&AlertFilter {
                    alert_type: Some(t),
                    ..AlertFilter::default()
                })
                .await
                .unwrap()
        }
    };
    let faults = alerts("PLUGIN_FAULT").await;
    assert!(!faults.is_empty());
    assert!(faults.len() < 3, "deduplicated: {faults:?}");
    let fault = &faults[0];
    assert_eq!(fault.rule.as_ref().unwrap().version, 2);
    assert_eq!(fault.metadata["plugin"], "tariff");
    assert_eq!(fault.metadata["call"], "price");
    let rollbacks = alerts("PLUGIN_ROLLBACK").await;
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    assert_eq!(rollbacks[0].metadata["rolled_back_from"], 2);
    assert_eq!(rollbacks[0].rule.as_ref().unwrap().version, 1);

    // The failing version decided only where it did not trap (a round of
    // regions all outside its band: the surged region); the rolled-back
    // one priced on.
    let tariffs = store.tariff_history(None, 10_000).await.unwrap();
    for t in &tariffs {
        if t.rule.as_ref().unwrap().version == 2 {
            let load = t.load_percentage.unwrap();
            assert!(!(56.0..=79.0).contains(&load), "{t:?}");
        }
    }
    assert!(
        tariffs
            .iter()
            .any(|t| t.rule.as_ref().unwrap().version == 1),
        "{tariffs:?}"
    );
}

/// Swaps reach the other processes on the same store: a `PUT` is recorded
/// in `plugin_versions` (with this process as its origin), and a version
/// another process recorded is installed here through the same checks —
/// a good one serves, a bad one is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_recorded_by_another_process_are_installed_here() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_config()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    cfg.admin.follow_interval_ms = 50;
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = app.ctx.store.clone();
    let registry = app.registry.clone().unwrap();
    let admin = Admin {
        client: reqwest::Client::new(),
        base: format!("http://{}", app.addr),
    };

    // A swap here is recorded for the others.
    let build = rebuilt("tariff", "shared");
    let (status, body) = admin.push("tariff", build.clone(), None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let recorded = store.plugin_versions_after(0).await.unwrap();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(body["shared_seq"], recorded[0].seq);
    assert_eq!(
        (recorded[0].plugin.as_str(), recorded[0].sha256.clone()),
        ("tariff", sha256(&build))
    );
    assert_eq!(recorded[0].component, build);

    // Another process's swaps: a bad one, then a good one with a config.
    let other =
        |plugin: &str, component: Vec<u8>, config: Value| segs::store::SharedPluginVersion {
            seq: 0,
            plugin: plugin.into(),
            sha256: sha256(&component),
            component,
            config,
            source: "admin".into(),
            origin: "another-process".into(),
        };
    let anomaly_v1 = registry.get("anomaly").unwrap().serving();
    store
        .publish_plugin_version(&other("anomaly", b"junk".to_vec(), serde_json::json!({})))
        .await
        .unwrap();
    let good = rebuilt("overload", "other");
    store
        .publish_plugin_version(&other(
            "overload",
            good.clone(),
            serde_json::json!({"threshold_percent": 85.0}),
        ))
        .await
        .unwrap();
    // Bounded so a broken follower fails instead of hanging; not a speed
    // check.
    let mut waited = Duration::ZERO;
    while registry.get("overload").unwrap().serving().version != 2 {
        assert!(
            waited < Duration::from_secs(60),
            "the other process's overload swap never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    let overload = registry.get("overload").unwrap();
    let v = overload.serving();
    assert_eq!(v.sha256, sha256(&good));
    assert!(v.source.starts_with("shared:"), "{v:?}");
    let (_, config) = overload.serving_artifact();
    assert_eq!(
        plugins::config_to_json(&config),
        serde_json::json!({"threshold_percent": 85.0})
    );
    // Rows are installed in order: the junk one came first and was refused.
    assert_eq!(registry.get("anomaly").unwrap().serving(), anomaly_v1);
    app.shutdown().await;
}

/// A plugin's own sandbox limits apply to it alone: 1 MiB of memory is too
/// little for the tariff component (refused at start, naming it), while
/// the others keep `[sandbox]`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_own_sandbox_limits_apply_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_config()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    cfg.plugins
        .get_mut("tariff")
        .unwrap()
        .sandbox
        .max_memory_mib = Some(1);
    let limits = cfg.plugin_limits("tariff");
    assert_eq!(limits.max_memory_bytes, 1 << 20);
    assert_eq!(cfg.plugin_limits("anomaly").max_memory_bytes, 64 << 20);
    let err = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .err()
        .expect("1 MiB is too little for the tariff rule")
        .to_string();
    assert!(err.contains("tariff"), "{err}");
}

/// With `sandbox.compile_cache_dir`, compiled components are kept there
/// (keyed by content), so the next start or a swap back does not recompile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_config()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    let cache = dir.path().join("plugin-cache");
    cfg.sandbox.compile_cache_dir = cache.clone();
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    app.shutdown().await;
    let files = walk(&cache);
    assert!(
        files >= 4,
        "{files} cached artifacts in {}",
        cache.display()
    );
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let p = e.unwrap().path();
                    if p.is_dir() { walk(&p) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `segs replay-dead-letters` through the binary: its output and success.
async fn replay_cli(base: &str, args: &[&str]) -> (bool, String) {
    segs_admin("replay-dead-letters", base, TOKEN, args).await
}

/// `on_fault = "dead_letter"`: every anomaly batch the serving version
/// fails on is parked on `plugin_dead_letter`, not lost (the readings are
/// aggregated regardless); a replay while the failing version still serves
/// stops at the first letter and keeps it; after a rollback,
/// `segs replay-dead-letters` raises the batches' alerts (the scenario's
/// spike and outage) through the serving version, and a second replay has
/// nothing left to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_anomaly_batches_are_parked_and_replayed_once() {
    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = sim_config();
    let sim = Simulator::new(sim_cfg.clone()).unwrap();
    let mut cfg = config(dir.path(), &sim);
    let anomaly = cfg.plugins.get_mut("anomaly").unwrap();
    anomaly.on_fault = OnFault::DeadLetter;
    anomaly.auto_rollback_after = 0;
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let store = app.ctx.store.clone();
    let metrics = app.ctx.metrics.clone();
    let base = format!("http://{}", app.addr);
    let admin = Admin {
        client: reqwest::Client::new(),
        base: base.clone(),
    };
    let good_sha = admin.serving("anomaly").await.1;
    let fixture = std::fs::read(component("hostile_anomaly")).unwrap();
    // The host's sample batch has 8 readings: the fixture passes it, and
    // traps on every batch of the stream.
    let (status, body) = admin
        .push(
            "anomaly",
            fixture,
            Some(&serde_json::json!({"trap_from_readings": 9})),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plugin"]["version"], 2);

    let stats = SimStats::new();
    let target = SendTarget {
        url: base.clone(),
        batch_size: 200,
        ticks: Some(72),
        ..SendTarget::default()
    };
    simulator::run(sim_cfg, target, stats.clone())
        .await
        .unwrap();
    let accepted = stats.accepted.load(Ordering::Relaxed);
    assert_eq!(accepted, 7200);

    let parked = || async {
        let (status, body) = admin
            .send(
                admin.client.get(format!("{base}/admin/dead-letters")),
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["parked"].as_u64().unwrap()
    };
    let faults_of_v2 = || async {
        admin.slot("anomaly").await["serving"]["faults"]
            .as_u64()
            .unwrap()
    };
    // Every reading folded, and every failed batch parked (as many letters
    // as faults, and still so a second later). Bounded so that a lost
    // letter fails instead of hanging; not a speed check.
    let mut waited = Duration::ZERO;
    let letters = loop {
        let (n, faults) = (parked().await, faults_of_v2().await);
        let folded = metrics.readings_processed.load(Ordering::Relaxed) >= accepted;
        if folded && n > 0 && n == faults {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if parked().await == n && faults_of_v2().await == faults {
                break n;
            }
        }
        assert!(
            waited < Duration::from_secs(120),
            "parked {n}, faults {faults}, folded {folded}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    };
    let anomalies = || async {
        store
            .list_alerts(&AlertFilter {
                alert_type: Some("ANOMALY".into()),
                limit: 1000,
                ..AlertFilter::default()
            })
            .await
            .unwrap()
    };
    assert!(
        anomalies().await.is_empty(),
        "the failing version raised nothing"
    );

    // The failing version is still serving: the replay stops at the first
    // letter and keeps every one.
    let (status, report) = admin
        .send(
            admin
                .client
                .post(format!("{base}/admin/dead-letters/replay")),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["replayed"], 0, "{report}");
    assert_eq!(report["parked"], letters, "{report}");
    assert!(
        report["stopped"].as_str().unwrap().contains("failed again"),
        "{report}"
    );
    // Operators see them in /metrics as the replay group's lag.
    let text = admin
        .client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let in_metrics: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("segs_bus_lag_records{")
                && l.contains("group=\"dead-letter-replay-group\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(in_metrics as u64, letters, "{text}");

    let (status, body) = admin
        .send(
            admin
                .client
                .post(format!("{base}/admin/plugins/anomaly/rollback")),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (ok, text) = replay_cli(&base, &["--count"]).await;
    assert!(ok && text.contains(&format!("{letters} parked")), "{text}");
    let (ok, text) = replay_cli(&base, &[]).await;
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("{letters} replayed")) && text.contains("0 still parked"),
        "{text}"
    );

    // The alert stage stores what the replay published.
    let mut waited = Duration::ZERO;
    let raised = loop {
        let raised = anomalies().await;
        let kinds: Vec<&str> = raised
            .iter()
            .filter_map(|a| a.metadata["type"].as_str())
            .collect();
        if kinds.contains(&"spike") && kinds.contains(&"outage") {
            break raised;
        }
        assert!(waited < Duration::from_secs(60), "{raised:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    };
    for a in &raised {
        let rule = a.rule.as_ref().unwrap();
        assert_eq!((rule.version, rule.sha256.as_str()), (1, good_sha.as_str()));
    }
    let (ok, text) = replay_cli(&base, &[]).await;
    assert!(ok && text.starts_with("0 replayed"), "{text}");
    app.shutdown().await;
    assert_eq!(anomalies().await.len(), raised.len());

    let one = store
        .meter_aggregates(
            WindowWidth::OneMinute,
            &AggregateQuery {
                limit: 100_000,
                ..AggregateQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        one.iter().map(|a| u64::from(a.count)).sum::<u64>(),
        accepted,
        "a parked batch loses no reading"
    );
}
