//! The store's behaviour suite: every test body runs against SQLite (a file
//! in a temporary directory, or `sqlite::memory:`) and against PostgreSQL
//! (a fresh database per test), as `<test>::sqlite` and `<test>::postgres`:
//! window merging, tariffs, the alert lifecycle, filters, JSON shapes,
//! retention, bulk inserts and the exactly-once unit of work. A few tests at
//! the end are specific to one backend.
//!
//! PostgreSQL: `SEGS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) names a database where the
//! user may `CREATE DATABASE`; each test creates `segs_test_<uuid>` and
//! drops it at the end. When the server is not reachable the `::postgres`
//! tests fail and say how to start it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use segs::store::{
    self, AggregateQuery, AlertFilter, AlertRow, MeterAggregate, NewAlert, NewTariff, RawReading,
    RegionalAggregate, Retention, Store, StoreOptions, Transition, WindowWidth,
};
use segs::time::{format_rfc3339_ms, parse_rfc3339_ms};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

const DAY_MS: i64 = 86_400_000;

fn t(s: &str) -> i64 {
    parse_rfc3339_ms(s).unwrap_or_else(|| panic!("bad test timestamp {s}"))
}

// ------------------------------------------------------------- backends

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const START_POSTGRES: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";

/// Where one test's store lives; [`Db::open`] may be called again to reopen
/// it (except for `sqlite::memory:`, which is a new database each time).
struct Db {
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database to drop at the end: (admin URL, name).
    pg: Option<(String, String)>,
}

impl Db {
    fn memory() -> Db {
        Db {
            url: "sqlite::memory:".into(),
            _dir: None,
            pg: None,
        }
    }

    fn file() -> Db {
        let dir = tempfile::tempdir().expect("tempdir");
        Db {
            url: format!("sqlite://{}", dir.path().join("segs.db").display()),
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A new, empty PostgreSQL database.
    async fn postgres() -> Db {
        let admin = postgres_admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {}: {e}\n\
                 The store suite's ::postgres tests need it. Start it with\n    {START_POSTGRES}\n\
                 (`cargo xtask test` checks for it), or set SEGS_TEST_POSTGRES_URL to a \
                 database where the user may CREATE DATABASE.",
                store::redact_url(&admin)
            )
        });
        let name = format!("segs_test_{}", Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        conn.close().await.ok();
        Db {
            url: with_database(&admin, &name),
            _dir: None,
            pg: Some((admin, name)),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        self.open_with(&StoreOptions::default()).await
    }

    async fn open_with(&self, options: &StoreOptions) -> Arc<dyn Store> {
        store::open_with(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", store::redact_url(&self.url)))
    }

    /// Drops the PostgreSQL database, if any.
    async fn drop_database(&self) {
        if let Some((admin, name)) = &self.pg {
            let mut conn = PgConnection::connect(admin).await.expect("reconnect");
            conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await
                .unwrap_or_else(|e| panic!("DROP DATABASE {name}: {e}"));
            conn.close().await.ok();
        }
    }

    /// Drops the database, then passes on the test body's panic, if any.
    async fn finish(self, result: std::thread::Result<()>) {
        self.drop_database().await;
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

fn postgres_admin_url() -> String {
    std::env::var("SEGS_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into())
}

/// `url` naming database `name` instead of its own.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (rest, String::new()),
    };
    let host = base.split_once('/').map_or(base, |(host, _)| host);
    format!("{scheme}://{host}/{name}{query}")
}

/// Turns `async fn name(db: &Db)` bodies into the tests `name::sqlite` (on
/// a `file` or `memory` SQLite database) and `name::postgres`.
macro_rules! on_both_backends {
    ($($name:ident: $sqlite:ident,)*) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test]
                async fn sqlite() {
                    let db = Db::$sqlite();
                    let result = AssertUnwindSafe(super::$name(&db)).catch_unwind().await;
                    db.finish(result).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let db = Db::postgres().await;
                    let result = AssertUnwindSafe(super::$name(&db)).catch_unwind().await;
                    db.finish(result).await;
                }
            }
        )*
    };
}

on_both_backends! {
    plugin_versions_are_shared_in_order: memory,
    a_late_window_merges_into_the_stored_one: file,
    duplicate_keys_within_one_call_are_merged_not_double_applied: memory,
    aggregate_queries_filter_and_order: memory,
    regional_windows_are_replaced_on_conflict: file,
    a_new_tariff_deactivates_the_previous_one: file,
    tariff_ids_follow_a_per_region_sequence: memory,
    alert_lifecycle: file,
    concurrent_acknowledgements_change_the_alert_once: file,
    an_alert_is_stored_once_per_id_and_once_per_dedupe_key: memory,
    raw_readings_hold_each_reading_once: file,
    archived_records_are_stored_once: file,
    archived_records_in_memory_are_stored_once: memory,
    alert_filters_and_limit: memory,
    alerts_with_equal_timestamps_list_newest_insert_first: memory,
    rows_serialize_with_the_seeds_column_names: memory,
    fifty_thousand_readings_in_one_call: file,
    billing_prices_each_window_by_the_tariff_in_force_and_never_bills_twice: file,
    a_delivered_notification_stays_delivered: memory,
    retention_deletes_only_old_rows: file,
    apply_stores_everything_or_nothing_with_its_outbox: file,
    a_claimed_checkpoint_fences_off_its_previous_writer: memory,
}

/// Two processes and one partition's checkpoint: whoever claims it last
/// writes it; the other's checkpoint (and everything stored with it) is
/// refused as fenced.
async fn a_claimed_checkpoint_fences_off_its_previous_writer(db: &Db) {
    use segs::store::{Applied, Checkpoint, Effects, StoreError};
    let store = db.open().await;
    let group = "stream-processor-group/1";
    let (first, none) = store.claim_checkpoint(group).await.unwrap();
    assert_eq!(none, None, "a claim alone is not a checkpoint");
    assert_eq!(store.load_checkpoint(group).await.unwrap(), None);
    let checkpoint = |epoch: i64, offset: u64, meter: &str| Effects {
        meter_windows: vec![(
            WindowWidth::OneMinute,
            vec![window(meter, "2025-11-12T06:30:00Z", &[1.0], &[])],
        )],
        checkpoint: Some(Checkpoint {
            group: group.into(),
            epoch,
            bus_id: "bus-1".into(),
            positions: vec![("telemetry-readings".into(), 1, offset)],
            state: vec![offset as u8],
        }),
        ..Effects::default()
    };
    let none = |_: &Applied| Vec::new();
    store
        .apply("stream/1", &checkpoint(first, 10, "MTR-A"), &none)
        .await
        .unwrap();
    // Another process takes the partition over.
    let (second, cp) = store.claim_checkpoint(group).await.unwrap();
    assert_eq!(second, first + 1);
    let cp = cp.expect("the first writer's checkpoint");
    assert_eq!(cp.positions, vec![("telemetry-readings".to_owned(), 1, 10)]);
    assert_eq!(cp.epoch, second);
    // The first writer's next checkpoint is refused, whole.
    let fenced = store
        .apply("stream/1", &checkpoint(first, 20, "MTR-B"), &none)
        .await;
    assert!(
        matches!(fenced, Err(StoreError::Fenced { ref group, epoch }) if group == "stream-processor-group/1" && epoch == first),
        "{fenced:?}"
    );
    store
        .apply("stream/1", &checkpoint(second, 30, "MTR-C"), &none)
        .await
        .unwrap();
    let cp = store.load_checkpoint(group).await.unwrap().unwrap();
    assert_eq!(cp.state, vec![30]);
    let meters: Vec<String> = store
        .meter_aggregates(WindowWidth::OneMinute, &AggregateQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.meter_id)
        .collect();
    assert_eq!(meters.len(), 2, "{meters:?}");
    assert!(!meters.contains(&"MTR-B".to_owned()), "{meters:?}");
}

// -------------------------------------------------------------- helpers

/// A window holding `powers` (and `volts`), as the windows stage builds it.
fn window(meter: &str, start: &str, powers: &[f64], volts: &[f64]) -> MeterAggregate {
    let power_sum: f64 = powers.iter().sum();
    let voltage_sum: f64 = volts.iter().sum();
    MeterAggregate {
        meter_id: meter.into(),
        region: "Mumbai-North".into(),
        window_start_ms: t(start),
        avg_power_kw: power_sum / powers.len() as f64,
        max_power_kw: powers.iter().copied().fold(f64::MIN, f64::max),
        min_power_kw: powers.iter().copied().fold(f64::MAX, f64::min),
        energy_kwh_sum: powers.iter().map(|p| p / 60.0).sum(),
        voltage_avg: (!volts.is_empty()).then(|| voltage_sum / volts.len() as f64),
        count: powers.len() as u32,
        power_sum,
        voltage_sum,
        voltage_count: volts.len() as u32,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn alert(
    alert_type: &str,
    severity: &str,
    region: &str,
    meter: Option<&str>,
    at: &str,
) -> NewAlert {
    NewAlert {
        id: Uuid::new_v4(),
        alert_type: alert_type.parse().unwrap(),
        severity: severity.parse().unwrap(),
        region: Some(region.into()),
        meter_id: meter.map(Into::into),
        message: format!("{alert_type} in {region}"),
        timestamp_ms: t(at),
        metadata: json!({"baseline": 4.5, "current": 12.0, "change": 1.67, "type": "SPIKE"}),
        dedupe_key: None,
        rule: Some(rule("anomaly")),
    }
}

fn tariff(region: &str, price: f64, from: &str) -> NewTariff {
    NewTariff {
        region: region.into(),
        price_per_kwh: price,
        effective_from_ms: t(from),
        previous_price: Some(6.5),
        change_percent: Some(10.0),
        load_percentage: Some(79.0),
        reason: segs::messages::TariffReason::HighLoad,
        rule: Some(rule("tariff")),
    }
}

/// The provenance every test alert and tariff carries (read back whole).
fn rule(name: &str) -> segs::messages::RuleRef {
    segs::messages::RuleRef {
        name: name.into(),
        version: 2,
        sha256: "ab".repeat(32),
    }
}

fn reading(meter: &str, at_ms: i64, power: f64) -> RawReading {
    RawReading {
        meter_id: meter.into(),
        region: "Mumbai-North".into(),
        timestamp_ms: at_ms,
        power_kw: power,
        voltage: Some(235.6),
        current: Some(22.2),
        frequency: Some(50.0),
        power_factor: Some(0.95),
        temperature: Some(31.5),
        energy_kwh: Some(power / 60.0),
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .expect("a JSON object")
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

fn is_canonical_time(v: &Value) -> bool {
    v.as_str()
        .and_then(parse_rfc3339_ms)
        .is_some_and(|ms| v.as_str() == Some(format_rfc3339_ms(ms).as_str()))
}

// ------------------------------------------------------------ aggregates

async fn a_late_window_merges_into_the_stored_one(db: &Db) {
    let store = db.open().await;
    let first = store
        .upsert_meter_aggregates(
            WindowWidth::OneMinute,
            &[window(
                "MTR-00000042",
                "2025-11-12T06:30:00Z",
                &[5.2, 5.5, 5.0],
                &[235.6, 238.1, 236.8],
            )],
        )
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].count, 3);
    assert!(close(first[0].avg_power_kw, 15.7 / 3.0));

    // A reading that arrived after the window was flushed.
    let merged = store
        .upsert_meter_aggregates(
            WindowWidth::OneMinute,
            &[window("MTR-00000042", "2025-11-12T06:30:00Z", &[8.3], &[])],
        )
        .await
        .unwrap();
    assert_eq!(merged.len(), 1);
    let m = &merged[0];
    assert_eq!(m.count, 4);
    assert!(close(m.power_sum, 24.0));
    assert!(
        close(m.avg_power_kw, 6.0),
        "avg recomputed: {}",
        m.avg_power_kw
    );
    assert_eq!(m.max_power_kw, 8.3);
    assert_eq!(m.min_power_kw, 5.0);
    assert!(close(m.energy_kwh_sum, 24.0 / 60.0));
    assert_eq!(m.voltage_count, 3, "the late reading had no voltage");
    assert!(close(m.voltage_avg.unwrap(), 710.5 / 3.0));

    // What a query reads back is what the upsert returned.
    let stored = store
        .meter_aggregates(WindowWidth::OneMinute, &AggregateQuery::default())
        .await
        .unwrap();
    assert_eq!(stored, merged);
    assert_eq!(store.count_readings_1m().await.unwrap(), 4);

    // The 15-minute table is a separate one.
    assert!(
        store
            .meter_aggregates(WindowWidth::FifteenMinutes, &AggregateQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn duplicate_keys_within_one_call_are_merged_not_double_applied(db: &Db) {
    let store = db.open().await;
    let out = store
        .upsert_meter_aggregates(
            WindowWidth::FifteenMinutes,
            &[
                window("MTR-2", "2025-11-12T06:30:00Z", &[1.0, 3.0], &[230.0]),
                window("MTR-1", "2025-11-12T06:30:00Z", &[4.0], &[240.0]),
                window("MTR-2", "2025-11-12T06:30:00Z", &[8.0], &[240.0]),
                window("MTR-2", "2025-11-12T06:45:00Z", &[2.0], &[]),
            ],
        )
        .await
        .unwrap();
    let got: Vec<(&str, String, u32)> = out
        .iter()
        .map(|a| {
            (
                a.meter_id.as_str(),
                format_rfc3339_ms(a.window_start_ms),
                a.count,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("MTR-2", "2025-11-12T06:30:00.000Z".to_string(), 3),
            ("MTR-1", "2025-11-12T06:30:00.000Z".to_string(), 1),
            ("MTR-2", "2025-11-12T06:45:00.000Z".to_string(), 1),
        ],
        "one row per key, in order of first appearance"
    );
    assert!(close(out[0].avg_power_kw, 4.0));
    assert_eq!(out[0].max_power_kw, 8.0);
    assert_eq!(out[0].min_power_kw, 1.0);
    assert_eq!(out[0].voltage_avg, Some(235.0));
    assert_eq!(out[2].voltage_avg, None);

    // Applying the same call again doubles the counts exactly once more.
    let again = store
        .upsert_meter_aggregates(
            WindowWidth::FifteenMinutes,
            &[window(
                "MTR-2",
                "2025-11-12T06:30:00Z",
                &[1.0, 3.0, 8.0],
                &[230.0, 240.0],
            )],
        )
        .await
        .unwrap();
    assert_eq!(again[0].count, 6);
    assert!(close(again[0].avg_power_kw, 4.0));
}

async fn aggregate_queries_filter_and_order(db: &Db) {
    let store = db.open().await;
    let mut aggs = Vec::new();
    for m in ["MTR-3", "MTR-1", "MTR-2"] {
        for start in [
            "2025-11-12T06:32:00Z",
            "2025-11-12T06:30:00Z",
            "2025-11-12T06:31:00Z",
        ] {
            aggs.push(window(m, start, &[1.0], &[]));
        }
    }
    let mut other = window("MTR-9", "2025-11-12T06:31:00Z", &[2.0], &[]);
    other.region = "Delhi-South".into();
    aggs.push(other);
    store
        .upsert_meter_aggregates(WindowWidth::OneMinute, &aggs)
        .await
        .unwrap();

    let all = store
        .meter_aggregates(WindowWidth::OneMinute, &AggregateQuery::default())
        .await
        .unwrap();
    let order: Vec<(String, &str)> = all
        .iter()
        .map(|a| {
            (
                format_rfc3339_ms(a.window_start_ms)[14..16].to_string(),
                a.meter_id.as_str(),
            )
        })
        .collect();
    assert_eq!(order.len(), 10);
    let mut expected = order.clone();
    expected.sort();
    assert_eq!(order, expected, "by window_start then meter_id");

    let q = AggregateQuery {
        meter_id: Some("MTR-2".into()),
        from_ms: Some(t("2025-11-12T06:31:00Z")),
        to_ms: Some(t("2025-11-12T06:32:00Z")),
        ..AggregateQuery::default()
    };
    let one = store
        .meter_aggregates(WindowWidth::OneMinute, &q)
        .await
        .unwrap();
    assert_eq!(one.len(), 1, "from inclusive, to exclusive");
    assert_eq!(one[0].window_start_ms, t("2025-11-12T06:31:00Z"));

    // One meter over every window, over an open range, capped, and in a
    // region it is not in (SQLite walks the window starts for these).
    let by_meter = |meter: &str, from: Option<&str>, region: Option<&str>, limit: u32| {
        let q = AggregateQuery {
            meter_id: Some(meter.into()),
            from_ms: from.map(t),
            region: region.map(Into::into),
            limit,
            ..AggregateQuery::default()
        };
        let store = &store;
        async move {
            store
                .meter_aggregates(WindowWidth::OneMinute, &q)
                .await
                .unwrap()
                .iter()
                .map(|a| {
                    (
                        a.meter_id.clone(),
                        format_rfc3339_ms(a.window_start_ms)[14..16].to_string(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let w = |m: &str, minute: &str| (m.to_string(), minute.to_string());
    assert_eq!(
        by_meter("MTR-3", None, None, 1000).await,
        vec![w("MTR-3", "30"), w("MTR-3", "31"), w("MTR-3", "32")]
    );
    assert_eq!(
        by_meter("MTR-3", None, None, 2).await,
        vec![w("MTR-3", "30"), w("MTR-3", "31")]
    );
    assert_eq!(
        by_meter("MTR-1", Some("2025-11-12T06:30:30Z"), None, 1000).await,
        vec![w("MTR-1", "31"), w("MTR-1", "32")]
    );
    assert_eq!(
        by_meter("MTR-9", None, None, 1000).await,
        vec![w("MTR-9", "31")]
    );
    assert_eq!(
        by_meter("MTR-9", None, Some("Delhi-South"), 1000)
            .await
            .len(),
        1
    );
    assert!(
        by_meter("MTR-9", None, Some("Mumbai-North"), 1000)
            .await
            .is_empty()
    );
    assert!(by_meter("MTR-404", None, None, 1000).await.is_empty());

    let q = AggregateQuery {
        region: Some("Delhi-South".into()),
        ..AggregateQuery::default()
    };
    let delhi = store
        .meter_aggregates(WindowWidth::OneMinute, &q)
        .await
        .unwrap();
    assert_eq!(delhi.len(), 1);
    assert_eq!(delhi[0].meter_id, "MTR-9");

    let q = AggregateQuery {
        limit: 4,
        ..AggregateQuery::default()
    };
    assert_eq!(
        store
            .meter_aggregates(WindowWidth::OneMinute, &q)
            .await
            .unwrap()
            .len(),
        4
    );
    assert_eq!(store.count_readings_1m().await.unwrap(), 10);
}

fn regional(region: &str, at: &str, total: f64, load: f64) -> RegionalAggregate {
    RegionalAggregate {
        region: region.into(),
        window_start_ms: t(at),
        meter_count: 2,
        total_consumption: total,
        avg_consumption: total / 2.0,
        max_consumption: total * 0.75,
        min_consumption: total * 0.25,
        load_percentage: load,
        active_meters: vec!["MTR-00000001".into(), "MTR-00000002".into()],
    }
}

async fn regional_windows_are_replaced_on_conflict(db: &Db) {
    let store = db.open().await;
    store
        .upsert_regional_aggregates(&[
            regional("Mumbai-North", "2025-11-12T06:30:00Z", 10.0, 40.0),
            regional("Delhi-South", "2025-11-12T06:30:00Z", 20.0, 60.0),
            regional("Mumbai-North", "2025-11-12T06:31:00Z", 30.0, 91.0),
        ])
        .await
        .unwrap();
    let replacement = regional("Mumbai-North", "2025-11-12T06:30:00Z", 12.0, 48.0);
    store
        .upsert_regional_aggregates(&[
            regional("Mumbai-North", "2025-11-12T06:30:00Z", 11.0, 44.0),
            replacement.clone(),
        ])
        .await
        .unwrap();

    let q = AggregateQuery {
        region: Some("Mumbai-North".into()),
        ..AggregateQuery::default()
    };
    let rows = store.regional_aggregates(&q).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0], replacement, "the last write wins");
    assert_eq!(rows[1].load_percentage, 91.0);

    let q = AggregateQuery {
        from_ms: Some(t("2025-11-12T06:30:00Z")),
        to_ms: Some(t("2025-11-12T06:31:00Z")),
        ..AggregateQuery::default()
    };
    let minute: Vec<String> = store
        .regional_aggregates(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.region)
        .collect();
    assert_eq!(minute, ["Delhi-South", "Mumbai-North"]);
}

// --------------------------------------------------------------- tariffs

async fn plugin_versions_are_shared_in_order(db: &Db) {
    let store = db.open().await;
    assert!(store.plugin_versions_after(0).await.unwrap().is_empty());
    let v = |plugin: &str, bytes: &[u8]| segs::store::SharedPluginVersion {
        seq: 0,
        plugin: plugin.into(),
        sha256: "cd".repeat(32),
        component: bytes.to_vec(),
        config: json!({"threshold_percent": 85.0, "mode": "x", "n": 3, "on": true}),
        source: "admin".into(),
        origin: "p1".into(),
    };
    let first = store
        .publish_plugin_version(&v("tariff", b"\0asm one"))
        .await
        .unwrap();
    let second = store
        .publish_plugin_version(&v("overload", b"\0asm two"))
        .await
        .unwrap();
    assert!(second > first);
    let all = store.plugin_versions_after(0).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[0],
        segs::store::SharedPluginVersion {
            seq: first,
            ..v("tariff", b"\0asm one")
        }
    );
    let after = store.plugin_versions_after(first).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].plugin, "overload");
    assert_eq!(after[0].component, b"\0asm two");
}

async fn a_new_tariff_deactivates_the_previous_one(db: &Db) {
    let store = db.open().await;
    let first = store
        .insert_tariff(&tariff("Mumbai-North", 6.5, "2025-11-12T06:00:00Z"))
        .await
        .unwrap();
    assert!(first.is_active);
    assert_eq!(first.effective_to_ms, None);
    assert_eq!(first.time_of_day.as_deref(), Some("all_day"));
    assert_eq!(first.created_by.as_deref(), Some("segs"));

    let second = store
        .insert_tariff(&tariff("Mumbai-North", 7.15, "2025-11-12T06:30:00Z"))
        .await
        .unwrap();
    assert!(second.is_active);
    assert_eq!(second.price_per_kwh, 7.15);
    assert_eq!(second.reason, "HIGH_LOAD");
    assert_eq!(second.load_percentage, Some(79.0));
    assert_eq!(second.rule, Some(rule("tariff")), "provenance kept");

    let history = store
        .tariff_history(Some("Mumbai-North"), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].tariff_id, second.tariff_id, "newest first");
    let old = &history[1];
    assert_eq!(old.tariff_id, first.tariff_id);
    assert!(!old.is_active);
    assert_eq!(old.effective_to_ms, Some(t("2025-11-12T06:30:00Z")));

    let current = store.current_tariffs().await.unwrap();
    assert_eq!(current, vec![second]);
}

async fn tariff_ids_follow_a_per_region_sequence(db: &Db) {
    let store = db.open().await;
    let mut ids = Vec::new();
    for (region, from) in [
        ("Mumbai-North", "2025-11-12T06:00:00Z"),
        ("Delhi South", "2025-11-12T06:00:00Z"),
        ("Mumbai-North", "2025-11-12T06:01:00Z"),
        ("Mumbai-North", "2025-11-12T06:02:00Z"),
        ("Delhi South", "2025-11-12T06:01:00Z"),
    ] {
        ids.push(
            store
                .insert_tariff(&tariff(region, 7.0, from))
                .await
                .unwrap()
                .tariff_id,
        );
    }
    assert_eq!(
        ids,
        [
            "TRF-MUMBAI-NORTH-000001",
            "TRF-DELHI-SOUTH-000001",
            "TRF-MUMBAI-NORTH-000002",
            "TRF-MUMBAI-NORTH-000003",
            "TRF-DELHI-SOUTH-000002",
        ]
    );

    let current: Vec<(String, String)> = store
        .current_tariffs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.region, r.tariff_id))
        .collect();
    assert_eq!(
        current,
        [
            (
                "Delhi South".to_string(),
                "TRF-DELHI-SOUTH-000002".to_string()
            ),
            (
                "Mumbai-North".to_string(),
                "TRF-MUMBAI-NORTH-000003".to_string()
            ),
        ],
        "one active row per region, by region"
    );

    let all = store.tariff_history(None, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all.iter().filter(|r| r.is_active).count(), 2);
    assert_eq!(store.tariff_history(None, 2).await.unwrap().len(), 2);
}

// ---------------------------------------------------------------- alerts

async fn alert_lifecycle(db: &Db) {
    let store = db.open().await;
    let new = alert(
        "ANOMALY",
        "high",
        "Mumbai-North",
        Some("MTR-00000042"),
        "2025-11-12T06:30:00Z",
    );
    let row = store.insert_alert(&new).await.unwrap();
    assert_eq!(row.id, new.id);
    assert_eq!(row.status, "active");
    assert!(!row.acknowledged);
    assert_eq!(row.metadata, new.metadata);
    assert_eq!(row.rule, Some(rule("anomaly")), "provenance kept");

    // Inserting the same id again changes nothing.
    let mut replay = new.clone();
    replay.message = "different".into();
    assert_eq!(store.insert_alert(&replay).await.unwrap(), row);

    let ack_at = t("2025-11-12T06:35:00Z");
    let acked = match store
        .acknowledge_alert(new.id, "operator-7", ack_at)
        .await
        .unwrap()
    {
        Transition::Changed { from, row } => {
            assert_eq!(from, "active");
            row
        }
        other => panic!("expected a change, got {other:?}"),
    };
    assert_eq!(acked.status, "acknowledged");
    assert!(acked.acknowledged);
    assert_eq!(acked.acknowledged_by.as_deref(), Some("operator-7"));
    assert_eq!(acked.acknowledged_at_ms, Some(ack_at));
    assert_eq!(acked.resolved_at_ms, None);

    // Acknowledging twice is a no-op.
    match store
        .acknowledge_alert(new.id, "someone-else", ack_at + 1)
        .await
        .unwrap()
    {
        Transition::Unchanged(r) => assert_eq!(r, acked),
        other => panic!("expected unchanged, got {other:?}"),
    }

    let res_at = t("2025-11-12T07:00:00Z");
    let resolved = match store.resolve_alert(new.id, res_at).await.unwrap() {
        Transition::Changed { from, row } => {
            assert_eq!(from, "acknowledged");
            row
        }
        other => panic!("expected a change, got {other:?}"),
    };
    assert_eq!(resolved.status, "resolved");
    assert_eq!(resolved.resolved_at_ms, Some(res_at));
    assert_eq!(resolved.acknowledged_by.as_deref(), Some("operator-7"));

    match store.resolve_alert(new.id, res_at + 1).await.unwrap() {
        Transition::Unchanged(r) => assert_eq!(r, resolved),
        other => panic!("expected unchanged, got {other:?}"),
    }
    assert_eq!(
        store
            .acknowledge_alert(new.id, "late", res_at + 2)
            .await
            .unwrap(),
        Transition::Refused {
            status: segs::messages::AlertStatus::Resolved
        }
    );
    assert_eq!(store.get_alert(new.id).await.unwrap(), Some(resolved));

    let unknown = Uuid::new_v4();
    assert_eq!(
        store.acknowledge_alert(unknown, "x", 0).await.unwrap(),
        Transition::NotFound
    );
    assert_eq!(
        store.resolve_alert(unknown, 0).await.unwrap(),
        Transition::NotFound
    );
    assert_eq!(store.get_alert(unknown).await.unwrap(), None);

    // An active alert resolves directly.
    let other = store
        .insert_alert(&alert(
            "OVERLOAD",
            "critical",
            "Delhi-South",
            None,
            "2025-11-12T06:31:00Z",
        ))
        .await
        .unwrap();
    match store.resolve_alert(other.id, res_at).await.unwrap() {
        Transition::Changed { from, row } => {
            assert_eq!(from, "active");
            assert!(!row.acknowledged);
            assert_eq!(row.status, "resolved");
        }
        other => panic!("expected a change, got {other:?}"),
    }
}

async fn concurrent_acknowledgements_change_the_alert_once(db: &Db) {
    let store = db.open().await;
    let new = alert(
        "ANOMALY",
        "medium",
        "Mumbai-North",
        Some("MTR-1"),
        "2025-11-12T06:30:00Z",
    );
    store.insert_alert(&new).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .acknowledge_alert(new.id, &format!("op-{i}"), 1_000 + i)
                .await
        }));
    }
    let mut changed = 0;
    let mut unchanged = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Transition::Changed { .. } => changed += 1,
            Transition::Unchanged(_) => unchanged += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((changed, unchanged), (1, 7));
}

async fn an_alert_is_stored_once_per_id_and_once_per_dedupe_key(db: &Db) {
    let store = db.open().await;
    let mut first = alert(
        "ANOMALY",
        "high",
        "Mumbai-North",
        Some("MTR-1"),
        "2025-11-12T06:30:00Z",
    );
    first.dedupe_key = Some("alert:dedupe:MTR-1:ANOMALY:5876430".into());
    let stored = store.insert_alert(&first).await.unwrap();
    // The same alert again (a replay): the stored row, nothing new.
    assert_eq!(store.insert_alert(&first).await.unwrap(), stored);
    // Another alert with the same dedupe key: deduplicated.
    let mut second = alert(
        "ANOMALY",
        "low",
        "Mumbai-North",
        Some("MTR-1"),
        "2025-11-12T06:31:00Z",
    );
    second.dedupe_key = first.dedupe_key.clone();
    assert_eq!(store.insert_alert(&second).await.unwrap().id, first.id);
    // Without a dedupe key, alerts are never deduplicated.
    let third = alert(
        "ANOMALY",
        "low",
        "Mumbai-North",
        Some("MTR-1"),
        "2025-11-12T06:31:00Z",
    );
    store.insert_alert(&third).await.unwrap();
    let all = store.list_alerts(&AlertFilter::default()).await.unwrap();
    let mut ids: Vec<Uuid> = all.iter().map(|a| a.id).collect();
    ids.sort();
    let mut want = vec![first.id, third.id];
    want.sort();
    assert_eq!(ids, want);
}

async fn raw_readings_hold_each_reading_once(db: &Db) {
    let store = db.open().await;
    let batch: Vec<RawReading> = (0..10).map(|i| reading("MTR-1", i * 1000, 1.0)).collect();
    store
        .insert_raw_readings(batch.clone().into())
        .await
        .unwrap();
    // A replay of part of it, with one new reading.
    let mut again = batch[5..].to_vec();
    again.push(reading("MTR-1", 10_000, 1.0));
    store
        .insert_raw_readings(again.clone().into())
        .await
        .unwrap();
    assert_eq!(store.count_raw_readings().await.unwrap(), 11);
}

/// Records of `telemetry-readings` as ingest publishes them: reading `i`
/// of meter `MTR-{i % 3}` at `i` seconds, on partition `i % 2` at offset
/// `i / 2`.
fn published(range: std::ops::Range<u64>) -> std::sync::Arc<[segs::store::RawRecord]> {
    range
        .map(|i| segs::store::RawRecord {
            partition: (i % 2) as u32,
            offset: i / 2,
            value: format!(
                r#"{{"readingId":"r-{i}","meterId":"MTR-{}","timestamp":"{}","powerKw":{}.5,"voltage":230,"region":"north","receivedAt":"2025-11-12T06:30:00.000Z"}}"#,
                i % 3,
                segs::time::format_rfc3339_ms(1_762_929_000_000 + i as i64 * 1000),
                i,
            )
            .into_bytes()
            .into(),
        })
        .collect()
}

/// The archive stage's call: every reading of a poll stored, a replayed
/// one (after a crash before its offsets were committed) once, a record
/// that is not a reading skipped, and retention by the readings' times.
/// (`sqlite_archive`'s unit tests hold a store file's batches to read back
/// as the rows of their readings.)
async fn archived_records_are_stored_once(db: &Db) {
    let store = db.open().await;
    assert_eq!(
        store
            .archive_records("embedded-test", published(0..40))
            .await
            .unwrap(),
        40
    );
    let replayed = store
        .archive_records("embedded-test", published(20..60))
        .await
        .unwrap();
    assert_eq!(store.count_raw_readings().await.unwrap(), 60);
    // PostgreSQL's key makes the replayed half no-ops; a store file skips
    // it by offset. Either way the call stores no more than is new.
    assert!(replayed <= 40, "{replayed}");
    let junk = std::sync::Arc::from([segs::store::RawRecord {
        partition: 0,
        offset: 30,
        value: b"{\"meterId\":\"MTR-9\"}".as_slice().into(),
    }]);
    assert_eq!(
        store.archive_records("embedded-test", junk).await.unwrap(),
        0
    );
    assert_eq!(store.count_raw_readings().await.unwrap(), 60);
    // Retention reads the batches' times: everything before reading 45.
    let report = store
        .apply_retention(1_762_929_045_000 + 7 * 24 * 3_600_000)
        .await
        .unwrap();
    assert!(report.raw_readings <= 45, "{}", report.raw_readings);
    let left = store.count_raw_readings().await.unwrap();
    assert_eq!(left, 60 - report.raw_readings);
    assert!(left >= 15, "{left}");
}

async fn archived_records_in_memory_are_stored_once(db: &Db) {
    archived_records_are_stored_once(db).await;
}

async fn apply_stores_everything_or_nothing_with_its_outbox(db: &Db) {
    use segs::messages::KeyedMessage;
    use segs::store::{Applied, Checkpoint, Effects, RuleState};

    let store = db.open().await;
    let mut dup = alert(
        "OVERLOAD",
        "high",
        "Mumbai-North",
        None,
        "2025-11-12T06:30:00Z",
    );
    dup.dedupe_key = Some("alert:dedupe:Mumbai-North:OVERLOAD:1".into());
    let effects = Effects {
        meter_windows: vec![(
            WindowWidth::OneMinute,
            vec![window("MTR-1", "2025-11-12T06:30:00Z", &[1.0, 3.0], &[])],
        )],
        regional_windows: vec![regional("Mumbai-North", "2025-11-12T06:30:00Z", 2.0, 50.0)],
        alerts: vec![dup.clone(), dup.clone()],
        tariffs: vec![tariff("Mumbai-North", 7.15, "2025-11-12T06:30:00Z")],
        rule_state: vec![RuleState {
            rule: "overload.consecutive".into(),
            key: "Mumbai-North".into(),
            value: 2,
        }],
        checkpoint: Some(Checkpoint {
            group: "stream-processor-group".into(),
            epoch: 0,
            bus_id: "bus-1".into(),
            positions: vec![("telemetry-readings".into(), 0, 42)],
            state: vec![1, 2, 3],
        }),
    };
    let outbox = |applied: &Applied| {
        // Built from what was stored: one message per stored alert and tariff.
        let mut out: Vec<KeyedMessage> = Vec::new();
        for row in applied.alerts.iter().flatten() {
            out.push(KeyedMessage {
                topic: segs::bus::Topic::AlertsProcessed,
                key: row.id.to_string(),
                value: b"{}".to_vec(),
                headers: vec![("type".into(), row.alert_type.to_string())],
            });
        }
        for row in &applied.tariffs {
            out.push(KeyedMessage {
                topic: segs::bus::Topic::TariffUpdates,
                key: row.tariff_id.clone(),
                value: b"{}".to_vec(),
                headers: vec![],
            });
        }
        out
    };
    let (applied, records) = store.apply("test", &effects, &outbox).await.unwrap();
    assert_eq!(applied.meter_windows[0][0].count, 2);
    assert!(applied.alerts[0].is_some());
    assert!(applied.alerts[1].is_none(), "the second is deduplicated");
    assert_eq!(applied.tariffs[0].tariff_id, "TRF-MUMBAI-NORTH-000001");
    assert_eq!(records.len(), 2);
    assert_eq!(store.pending_outbox("test").await.unwrap(), records);
    assert!(store.pending_outbox("other").await.unwrap().is_empty());
    let cp = store
        .load_checkpoint("stream-processor-group")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.positions, vec![("telemetry-readings".to_owned(), 0, 42)]);
    assert_eq!(cp.state, vec![1, 2, 3]);
    assert_eq!(
        store.load_rule_state("overload.consecutive").await.unwrap(),
        vec![("Mumbai-North".to_owned(), 2)]
    );
    // Deleting through the last seq of one apply leaves the next apply's.
    let later = |_: &Applied| {
        vec![KeyedMessage {
            topic: segs::bus::Topic::Alerts,
            key: "later".into(),
            value: b"{}".to_vec(),
            headers: Vec::new(),
        }]
    };
    let (_, next) = store
        .apply("test", &Effects::default(), &later)
        .await
        .unwrap();
    assert!(next[0].seq > records[1].seq);
    store.delete_outbox("test", records[1].seq).await.unwrap();
    assert_eq!(store.pending_outbox("test").await.unwrap(), next);

    // A unit of work the database refuses leaves nothing behind.
    let refused = Effects {
        meter_windows: vec![(
            WindowWidth::OneMinute,
            vec![window("MTR-3", "2025-11-12T06:31:00Z", &[1.0], &[])],
        )],
        regional_windows: vec![RegionalAggregate {
            meter_count: 1,
            ..regional("South", "2025-11-12T06:31:00Z", 1.0, 1.0)
        }],
        tariffs: vec![NewTariff {
            price_per_kwh: f64::NAN,
            ..tariff("South", 1.0, "2025-11-12T06:31:00Z")
        }],
        ..Effects::default()
    };
    assert!(store.apply("test", &refused, &outbox).await.is_err());
    let after = store
        .meter_aggregates(WindowWidth::OneMinute, &AggregateQuery::default())
        .await
        .unwrap();
    assert_eq!(after.len(), 1, "MTR-3's window was not stored");
    assert_eq!(store.pending_outbox("test").await.unwrap(), next);
}

async fn alert_filters_and_limit(db: &Db) {
    let store = db.open().await;
    let specs = [
        (
            "ANOMALY",
            "high",
            "Mumbai-North",
            Some("MTR-1"),
            "2025-11-12T06:30:00Z",
        ),
        (
            "ANOMALY",
            "low",
            "Mumbai-North",
            Some("MTR-2"),
            "2025-11-12T06:33:00Z",
        ),
        (
            "OVERLOAD",
            "critical",
            "Mumbai-North",
            None,
            "2025-11-12T06:31:00Z",
        ),
        (
            "ANOMALY",
            "medium",
            "Delhi-South",
            Some("MTR-3"),
            "2025-11-12T06:32:00Z",
        ),
        (
            "OVERLOAD",
            "critical",
            "Delhi-South",
            None,
            "2025-11-12T06:34:00Z",
        ),
    ];
    let mut ids = Vec::new();
    for (ty, sev, region, meter, at) in specs {
        ids.push(
            store
                .insert_alert(&alert(ty, sev, region, meter, at))
                .await
                .unwrap()
                .id,
        );
    }
    store.acknowledge_alert(ids[0], "op", 0).await.unwrap();
    store.resolve_alert(ids[3], 0).await.unwrap();

    let list = |f: AlertFilter| {
        let store = store.clone();
        async move {
            store
                .list_alerts(&f)
                .await
                .unwrap()
                .into_iter()
                .map(|r: AlertRow| format_rfc3339_ms(r.timestamp_ms)[14..16].to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(AlertFilter::default()).await,
        ["34", "33", "32", "31", "30"],
        "newest first"
    );
    assert_eq!(
        list(AlertFilter {
            limit: 2,
            ..Default::default()
        })
        .await,
        ["34", "33"]
    );
    assert!(
        list(AlertFilter {
            limit: 0,
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        list(AlertFilter {
            region: Some("Mumbai-North".into()),
            ..Default::default()
        })
        .await,
        ["33", "31", "30"]
    );
    assert_eq!(
        list(AlertFilter {
            status: Some("active".into()),
            ..Default::default()
        })
        .await,
        ["34", "33", "31"]
    );
    assert_eq!(
        list(AlertFilter {
            status: Some("acknowledged".into()),
            ..Default::default()
        })
        .await,
        ["30"]
    );
    assert_eq!(
        list(AlertFilter {
            alert_type: Some("OVERLOAD".into()),
            ..Default::default()
        })
        .await,
        ["34", "31"]
    );
    assert_eq!(
        list(AlertFilter {
            severity: Some("critical".into()),
            ..Default::default()
        })
        .await,
        ["34", "31"]
    );
    assert_eq!(
        list(AlertFilter {
            meter_id: Some("MTR-2".into()),
            ..Default::default()
        })
        .await,
        ["33"]
    );
    assert_eq!(
        list(AlertFilter {
            region: Some("Delhi-South".into()),
            alert_type: Some("ANOMALY".into()),
            status: Some("resolved".into()),
            ..Default::default()
        })
        .await,
        ["32"]
    );
}

async fn alerts_with_equal_timestamps_list_newest_insert_first(db: &Db) {
    let store = db.open().await;
    let a = store
        .insert_alert(&alert(
            "ANOMALY",
            "low",
            "R",
            Some("M1"),
            "2025-11-12T06:30:00Z",
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let b = store
        .insert_alert(&alert(
            "ANOMALY",
            "low",
            "R",
            Some("M2"),
            "2025-11-12T06:30:00Z",
        ))
        .await
        .unwrap();
    let ids: Vec<Uuid> = store
        .list_alerts(&AlertFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, [b.id, a.id]);
}

// ------------------------------------------------------------ JSON shape

async fn rows_serialize_with_the_seeds_column_names(db: &Db) {
    let store = db.open().await;

    let agg = store
        .upsert_meter_aggregates(
            WindowWidth::OneMinute,
            &[window(
                "MTR-00000042",
                "2025-11-12T06:30:00Z",
                &[5.2, 5.5, 5.0],
                &[235.6],
            )],
        )
        .await
        .unwrap()
        .remove(0);
    let v = serde_json::to_value(&agg).unwrap();
    assert_eq!(
        keys(&v),
        sorted(&[
            "meter_id",
            "region",
            "window_start",
            "avg_power_kw",
            "max_power_kw",
            "min_power_kw",
            "energy_kwh_sum",
            "voltage_avg",
            "count",
            "power_sum",
            "voltage_sum",
            "voltage_count",
        ])
    );
    assert_eq!(v["window_start"], "2025-11-12T06:30:00.000Z");
    assert_eq!(v["count"], 3);
    assert_eq!(serde_json::from_value::<MeterAggregate>(v).unwrap(), agg);

    let reg = regional("Mumbai-North", "2025-11-12T06:30:00Z", 7892.45, 79.0);
    let v = serde_json::to_value(&reg).unwrap();
    assert_eq!(
        keys(&v),
        sorted(&[
            "region",
            "timestamp",
            "meter_count",
            "total_consumption",
            "avg_consumption",
            "max_consumption",
            "min_consumption",
            "load_percentage",
            "active_meters",
        ])
    );
    assert_eq!(v["timestamp"], "2025-11-12T06:30:00.000Z");
    assert_eq!(v["active_meters"], json!(["MTR-00000001", "MTR-00000002"]));
    assert_eq!(serde_json::from_value::<RegionalAggregate>(v).unwrap(), reg);

    let new = alert(
        "ANOMALY",
        "high",
        "Mumbai-North",
        Some("MTR-00000042"),
        "2025-11-12T06:30:00Z",
    );
    let row = store.insert_alert(&new).await.unwrap();
    let v = serde_json::to_value(&row).unwrap();
    assert_eq!(
        keys(&v),
        sorted(&[
            "id",
            "type",
            "severity",
            "region",
            "meter_id",
            "message",
            "status",
            "timestamp",
            "acknowledged",
            "acknowledged_by",
            "acknowledged_at",
            "resolved_at",
            "metadata",
            "created_at",
            "updated_at",
            "rule",
        ])
    );
    assert_eq!(v["id"], new.id.to_string());
    assert_eq!(
        v["rule"],
        json!({"name": "anomaly", "version": 2, "sha256": "ab".repeat(32)})
    );
    assert_eq!(v["type"], "ANOMALY");
    assert_eq!(v["timestamp"], "2025-11-12T06:30:00.000Z");
    assert_eq!(v["acknowledged"], false);
    assert_eq!(v["acknowledged_at"], Value::Null);
    assert!(
        v["metadata"].is_object(),
        "metadata is an object, not a string"
    );
    assert_eq!(v["metadata"]["type"], "SPIKE");
    assert!(is_canonical_time(&v["created_at"]), "{}", v["created_at"]);
    assert!(is_canonical_time(&v["updated_at"]));
    let Transition::Changed { row: acked, .. } = store
        .acknowledge_alert(row.id, "op", t("2025-11-12T06:35:00Z"))
        .await
        .unwrap()
    else {
        panic!("not acknowledged")
    };
    let v = serde_json::to_value(&acked).unwrap();
    assert_eq!(v["acknowledged"], true);
    assert_eq!(v["acknowledged_at"], "2025-11-12T06:35:00.000Z");
    assert_eq!(serde_json::from_value::<AlertRow>(v).unwrap(), acked);

    let first = store
        .insert_tariff(&tariff("Mumbai-North", 6.5, "2025-11-12T06:00:00Z"))
        .await
        .unwrap();
    store
        .insert_tariff(&tariff("Mumbai-North", 7.15, "2025-11-12T06:30:00Z"))
        .await
        .unwrap();
    let old = store
        .tariff_history(Some("Mumbai-North"), 10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.tariff_id == first.tariff_id)
        .unwrap();
    let v = serde_json::to_value(&old).unwrap();
    assert_eq!(
        keys(&v),
        sorted(&[
            "tariff_id",
            "region",
            "time_of_day",
            "price_per_kwh",
            "effective_from",
            "effective_to",
            "is_active",
            "created_by",
            "created_at",
            "updated_at",
            "previous_price",
            "change_percent",
            "load_percentage",
            "reason",
            "rule",
        ])
    );
    assert_eq!(v["effective_from"], "2025-11-12T06:00:00.000Z");
    assert_eq!(v["effective_to"], "2025-11-12T06:30:00.000Z");
    assert_eq!(v["is_active"], false);
    assert_eq!(v["price_per_kwh"], 6.5);
    assert!(is_canonical_time(&v["created_at"]));
    assert_eq!(serde_json::from_value::<store::TariffRow>(v).unwrap(), old);

    let raw = reading("MTR-00000042", t("2025-11-12T06:30:00Z"), 5.234);
    let v = serde_json::to_value(&raw).unwrap();
    assert_eq!(
        keys(&v),
        sorted(&[
            "meter_id",
            "region",
            "timestamp",
            "power_kw",
            "voltage",
            "current",
            "frequency",
            "power_factor",
            "temperature",
            "energy_kwh",
        ])
    );
    assert_eq!(v["timestamp"], "2025-11-12T06:30:00.000Z");
}

// ------------------------------------------------------ retention, bulk

async fn retention_deletes_only_old_rows(db: &Db) {
    let store = db.open_with(&StoreOptions::default()).await;
    let now = t("2025-11-12T06:30:00Z");

    store
        .insert_raw_readings(Arc::from([
            reading("MTR-1", now - 8 * DAY_MS, 1.0),
            reading("MTR-1", now - 7 * DAY_MS - 1, 1.0),
            reading("MTR-1", now - 7 * DAY_MS, 1.0), // exactly at the edge: kept
            reading("MTR-1", now - DAY_MS, 1.0),
            reading("MTR-1", now, 1.0),
        ]))
        .await
        .unwrap();
    let at = |ms: i64| format_rfc3339_ms(ms);
    store
        .upsert_meter_aggregates(
            WindowWidth::OneMinute,
            &[
                window("MTR-1", &at(now - 31 * DAY_MS), &[1.0], &[]),
                window("MTR-1", &at(now - 29 * DAY_MS), &[1.0], &[]),
            ],
        )
        .await
        .unwrap();
    store
        .upsert_meter_aggregates(
            WindowWidth::FifteenMinutes,
            &[
                window("MTR-1", &at(now - 366 * DAY_MS), &[1.0], &[]),
                window("MTR-1", &at(now - 364 * DAY_MS), &[1.0], &[]),
            ],
        )
        .await
        .unwrap();
    store
        .upsert_regional_aggregates(&[
            regional("R", &at(now - 31 * DAY_MS), 1.0, 1.0),
            regional("R", &at(now - 29 * DAY_MS), 1.0, 1.0),
        ])
        .await
        .unwrap();

    let report = store.apply_retention(now).await.unwrap();
    assert_eq!(report.raw_readings, 2);
    assert_eq!(report.aggregates_1m, 1);
    assert_eq!(report.aggregates_15m, 1);
    assert_eq!(report.aggregates_1m_regional, 1);
    assert_eq!(store.count_raw_readings().await.unwrap(), 3);
    let left = store
        .meter_aggregates(WindowWidth::OneMinute, &AggregateQuery::default())
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].window_start_ms, now - 29 * DAY_MS);
    let left = store
        .meter_aggregates(WindowWidth::FifteenMinutes, &AggregateQuery::default())
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].window_start_ms, now - 364 * DAY_MS);

    // A second run finds nothing more.
    assert_eq!(
        store.apply_retention(now).await.unwrap(),
        Default::default()
    );

    // Shorter windows are configurable.
    drop(store);
    let short = StoreOptions {
        retention: Retention {
            raw_readings: std::time::Duration::from_secs(3600),
            ..Retention::default()
        },
    };
    let store = db.open_with(&short).await;
    let report = store.apply_retention(now).await.unwrap();
    assert_eq!(report.raw_readings, 2);
    assert_eq!(report.aggregates_1m, 0);
    assert_eq!(store.count_raw_readings().await.unwrap(), 1);
}

async fn fifty_thousand_readings_in_one_call(db: &Db) {
    let store = db.open().await;
    let start = t("2025-11-12T06:00:00Z");
    let readings: Vec<RawReading> = (0..50_000i64)
        .map(|i| {
            let mut r = reading(
                &format!("MTR-{:08}", i % 1000),
                start + i * 10,
                (i % 200) as f64 / 10.0,
            );
            if i % 3 == 0 {
                r.voltage = None;
                r.temperature = None;
            }
            r
        })
        .collect();
    store
        .insert_raw_readings(readings.clone().into())
        .await
        .unwrap();
    assert_eq!(store.count_raw_readings().await.unwrap(), 50_000);

    // And many windows in one upsert (more than one statement's worth on
    // either backend).
    let windows: Vec<MeterAggregate> = (0..12_000i64)
        .map(|i| {
            let mut w = window(
                &format!("MTR-{:08}", i % 1000),
                "2025-11-12T06:00:00Z",
                &[1.0, 2.0],
                &[230.0],
            );
            w.window_start_ms += (i / 1000) * 60_000;
            w
        })
        .collect();
    let out = store
        .upsert_meter_aggregates(WindowWidth::OneMinute, &windows)
        .await
        .unwrap();
    assert_eq!(out.len(), 12_000);
    assert!(
        out.iter()
            .zip(&windows)
            .all(|(o, w)| o.meter_id == w.meter_id && o.window_start_ms == w.window_start_ms)
    );
    assert_eq!(store.count_readings_1m().await.unwrap(), 24_000);
}

// ------------------------------------------------------ backend-specific

#[tokio::test]
async fn data_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("reopen.db").display());
    {
        let store = store::open(&url).await.unwrap();
        store
            .insert_raw_readings(Arc::from([reading("MTR-1", 0, 1.0)]))
            .await
            .unwrap();
        store
            .upsert_meter_aggregates(
                WindowWidth::OneMinute,
                &[window("MTR-1", "2025-11-12T06:30:00Z", &[1.0, 2.0], &[])],
            )
            .await
            .unwrap();
    }
    let store = store::open(&url).await.unwrap();
    assert_eq!(store.count_raw_readings().await.unwrap(), 1);
    assert_eq!(store.count_readings_1m().await.unwrap(), 2);
}

/// A test body run on a fresh PostgreSQL database, dropped afterwards.
async fn on_postgres<F: std::future::Future<Output = ()>>(body: impl FnOnce(String) -> F) {
    let db = Db::postgres().await;
    let result = AssertUnwindSafe(body(db.url.clone())).catch_unwind().await;
    db.finish(result).await;
}

#[tokio::test]
async fn postgres_migrates_once_and_checks_both_modes() {
    use segs::store::postgres::{Mode, PostgresStore, timescaledb_block};
    on_postgres(|url| async move {
        let pg = PostgresStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        let timescale: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
        )
        .fetch_one(pg.pool())
        .await
        .unwrap();
        if !timescale {
            assert_eq!(pg.mode(), &Mode::Plain);
        }
        // Both branches are valid SQL for this server: the TimescaleDB block
        // is compiled (syntax-checked) by PL/pgSQL before it returns at its
        // guard, with or without the extension…
        sqlx::query(&timescaledb_block(&Retention::default(), false))
            .execute(pg.pool())
            .await
            .expect("the TimescaleDB step parses");
        // …and a syntax error in it would be caught.
        let broken =
            timescaledb_block(&Retention::default(), false).replace("ALTER TABLE", "ALTER TABEL");
        assert!(sqlx::query(&broken).execute(pg.pool()).await.is_err());

        // Reopening applies no migration twice.
        drop(pg);
        let again = PostgresStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_name IN ('users', 'meters', 'tariffs', 'alerts', 'invoices', \
             'invoice_line_items', 'tariff_rules', 'audit_logs', 'raw_readings', \
             'aggregates_1m', 'aggregates_15m', 'aggregates_1m_regional', 'rule_state', \
             'outbox', 'stream_checkpoints', 'tariff_id_sequences', \
             'notification_deliveries')",
        )
        .fetch_one(again.pool())
        .await
        .unwrap();
        assert_eq!(tables, 17);
        let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(again.pool())
            .await
            .unwrap();
        let files = std::fs::read_dir(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres"),
        )
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .is_ok_and(|f| f.path().extension().is_some_and(|e| e == "sql"))
        })
        .count();
        assert_eq!(migrations as usize, files, "each migration applied once");
    })
    .await;
}

#[tokio::test]
async fn postgres_audit_rows_record_each_change() {
    use segs::store::postgres::PostgresStore;
    on_postgres(|url| async move {
        let pg = PostgresStore::open(&url, &StoreOptions::default())
            .await
            .unwrap();
        let new = alert(
            "ANOMALY",
            "high",
            "Mumbai-North",
            Some("MTR-1"),
            "2025-11-12T06:30:00Z",
        );
        pg.insert_alert(&new).await.unwrap();
        pg.acknowledge_alert(new.id, "ops", 2_000).await.unwrap();
        pg.acknowledge_alert(new.id, "ops", 2_500).await.unwrap(); // unchanged
        pg.resolve_alert(new.id, 3_000).await.unwrap();
        pg.resolve_alert(new.id, 3_500).await.unwrap(); // unchanged
        let rows: Vec<(String, String, Option<String>, Value)> =
            sqlx::query_as("SELECT action, entity_id, actor, details FROM audit_logs ORDER BY id")
                .fetch_all(pg.pool())
                .await
                .unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].0, "alert.acknowledged");
        assert_eq!(rows[0].1, new.id.to_string());
        assert_eq!(rows[0].2.as_deref(), Some("ops"));
        assert_eq!(
            rows[0].3,
            json!({"from": "active", "to": "acknowledged", "at": "1970-01-01T00:00:02.000Z"})
        );
        assert_eq!(rows[1].0, "alert.resolved");
        assert_eq!(rows[1].2, None);
        assert_eq!(rows[1].3["from"], "acknowledged");
    })
    .await;
}

#[tokio::test]
async fn postgres_refuses_bad_input_as_rejected() {
    on_postgres(|url| async move {
        let store = store::open(&url).await.unwrap();
        // Text PostgreSQL cannot store (a NUL byte) is bad input, not an
        // outage to retry.
        let e = store
            .insert_raw_readings(Arc::from([reading("MTR-\0", 0, 1.0)]))
            .await
            .unwrap_err();
        assert!(matches!(e, store::StoreError::Rejected(_)), "{e:?}");
        // A NaN in a NOT NULL column is refused, as by SQLite.
        let e = store
            .insert_raw_readings(Arc::from([reading("MTR-1", 0, f64::NAN)]))
            .await
            .unwrap_err();
        assert!(matches!(e, store::StoreError::Rejected(_)), "{e:?}");
        assert_eq!(store.count_raw_readings().await.unwrap(), 0);
    })
    .await;
}

/// Runs `sql` (no binds) on the test database, whichever it is.
async fn exec(db: &Db, sql: &str) {
    if db.url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    }
}

async fn billing_prices_each_window_by_the_tariff_in_force_and_never_bills_twice(db: &Db) {
    let store = db.open().await;
    exec(
        db,
        "INSERT INTO users (user_id) VALUES ('USR-1'); \
         INSERT INTO meters (meter_id, user_id, region) VALUES ('MTR-A', 'USR-1', 'Mumbai-North');",
    )
    .await;
    let energy = |meter: &str, start: &str, kwh: f64| {
        let mut w = window(meter, start, &[1.0], &[]);
        w.energy_kwh_sum = kwh;
        w
    };
    store
        .upsert_meter_aggregates(
            WindowWidth::FifteenMinutes,
            &[
                energy("MTR-A", "2025-11-12T06:00:00Z", 1.5),
                energy("MTR-A", "2025-11-12T06:15:00Z", 2.0),
                energy("MTR-A", "2025-11-12T06:30:00Z", 2.4),
                energy("MTR-A", "2025-11-12T06:45:00Z", 1.0),
                energy("MTR-B", "2025-11-12T06:00:00Z", 4.0),
                energy("MTR-B", "2025-11-12T06:45:00Z", 3.0),
                // Outside the period: not billed.
                energy("MTR-A", "2025-11-12T07:00:00Z", 9.0),
            ],
        )
        .await
        .unwrap();
    // Base 6.50 until 06:20, then 7.15 (high load), then 5.50 from 06:45.
    let high = store
        .insert_tariff(&tariff("Mumbai-North", 7.15, "2025-11-12T06:20:00Z"))
        .await
        .unwrap();
    let low = store
        .insert_tariff(&tariff("Mumbai-North", 5.5, "2025-11-12T06:45:00Z"))
        .await
        .unwrap();
    let (from, to) = (t("2025-11-12T06:00:00Z"), t("2025-11-12T07:00:00Z"));
    let base = |_: &str| 6.5;
    let invoices = segs::billing::run(&*store, &base, from, to).await.unwrap();
    assert_eq!(invoices.len(), 2);
    let a = invoices.iter().find(|i| i.meter_id == "MTR-A").unwrap();
    let b = invoices.iter().find(|i| i.meter_id == "MTR-B").unwrap();
    // By hand: MTR-A 1.5 × 6.5 + 2.0 × 6.5 + 2.4 × 7.15 + 1.0 × 5.5
    //   = 9.75 + 13.00 + 17.16 + 5.50 = 45.41;
    // MTR-B 4.0 × 6.5 + 3.0 × 5.5 = 26.00 + 16.50 = 42.50.
    assert_eq!(a.total_amount, 45.41);
    assert!(close(a.total_kwh, 6.9), "{}", a.total_kwh);
    assert_eq!(a.user_id.as_deref(), Some("USR-1"));
    assert_eq!(b.total_amount, 42.5);
    assert_eq!(b.user_id, None);
    let lines: Vec<(Option<&str>, String, String, f64, f64)> = a
        .line_items
        .iter()
        .map(|l| {
            (
                l.tariff_id.as_deref(),
                segs::time::format_rfc3339_ms(l.period_start_ms),
                segs::time::format_rfc3339_ms(l.period_end_ms),
                (l.kwh * 1e4).round() / 1e4,
                (l.amount * 100.0).round() / 100.0,
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            (
                None,
                "2025-11-12T06:00:00.000Z".into(),
                "2025-11-12T06:30:00.000Z".into(),
                3.5,
                22.75
            ),
            (
                Some(high.tariff_id.as_str()),
                "2025-11-12T06:30:00.000Z".into(),
                "2025-11-12T06:45:00.000Z".into(),
                2.4,
                17.16
            ),
            (
                Some(low.tariff_id.as_str()),
                "2025-11-12T06:45:00.000Z".into(),
                "2025-11-12T07:00:00.000Z".into(),
                1.0,
                5.5
            ),
        ]
    );

    // Billing the period again gives the same invoices, not second ones; a
    // paid invoice is left as it was even when its windows changed since.
    exec(
        db,
        &format!(
            "UPDATE invoices SET status = 'paid' WHERE invoice_id = '{}'",
            b.invoice_id
        ),
    )
    .await;
    store
        .upsert_meter_aggregates(
            WindowWidth::FifteenMinutes,
            &[energy("MTR-B", "2025-11-12T06:15:00Z", 1.0)],
        )
        .await
        .unwrap();
    let again = segs::billing::run(&*store, &base, from, to).await.unwrap();
    let all = store
        .list_invoices(&store::InvoiceFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "no second invoice");
    let a2 = again.iter().find(|i| i.meter_id == "MTR-A").unwrap();
    assert_eq!(a2.invoice_id, a.invoice_id);
    assert_eq!(a2.total_amount, 45.41);
    assert_eq!(a2.line_items.len(), 3);
    let b2 = again.iter().find(|i| i.meter_id == "MTR-B").unwrap();
    assert_eq!((b2.status.as_str(), b2.total_amount), ("paid", 42.5));
    let by_user = store
        .list_invoices(&store::InvoiceFilter {
            user_id: Some("USR-1".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_user.len(), 1);
    assert_eq!(by_user[0].meter_id, "MTR-A");
}

async fn a_delivered_notification_stays_delivered(db: &Db) {
    let store = db.open().await;
    let entry = |event: &str, delivered: bool, attempts: u32| store::NotificationLog {
        webhook: "ops".into(),
        event_id: event.into(),
        event_type: "alert",
        delivered,
        attempts,
        response_status: Some(if delivered { 204 } else { 503 }),
        last_error: (!delivered).then(|| "the receiver answered 503".into()),
        at_ms: 1_000 + i64::from(attempts),
    };
    store
        .log_notification(&entry("alert:a", false, 1))
        .await
        .unwrap();
    store
        .log_notification(&entry("alert:a", true, 2))
        .await
        .unwrap();
    // A late failure report (an attempt that raced the delivery) changes
    // nothing: the event is not sent again.
    store
        .log_notification(&entry("alert:a", false, 3))
        .await
        .unwrap();
    store
        .log_notification(&entry("alert:b", false, 1))
        .await
        .unwrap();
    let ids = [
        "alert:a".to_owned(),
        "alert:b".to_owned(),
        "alert:c".to_owned(),
    ];
    let delivered = store.delivered_notifications("ops", &ids).await.unwrap();
    assert_eq!(delivered, vec!["alert:a".to_owned()]);
    assert!(
        store
            .delivered_notifications("other", &ids)
            .await
            .unwrap()
            .is_empty(),
        "per webhook"
    );
}
