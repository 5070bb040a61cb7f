//! The plugins' test vectors (`plugins/<name>/vectors.json`), run through the
//! built components inside wasmtime. The same files run natively in each
//! plugin crate's own tests; both must give the same answers.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

mod common;

use segs::plugins::{
    self, AggregateRule, AnomalyRule, ConfigValue, Limits, OverloadRule, Runtime, Severity,
    TariffRule,
};
use serde_json::Value;

use common::{anomaly_batch, component, root};

fn vectors(name: &str) -> Value {
    let path = root().join(format!("plugins/{name}/vectors.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config(v: &Value) -> Vec<(String, ConfigValue)> {
    v.as_object()
        .expect("config is an object")
        .iter()
        .map(|(k, v)| {
            let cv = match v {
                Value::Number(n) if n.is_i64() => ConfigValue::Integer(n.as_i64().unwrap()),
                Value::Number(n) => ConfigValue::Float(n.as_f64().unwrap()),
                Value::Bool(b) => ConfigValue::Boolean(*b),
                Value::String(s) => ConfigValue::Text(s.clone()),
                other => panic!("config value {other} is not a scalar"),
            };
            (k.clone(), cv)
        })
        .collect()
}

fn runtime() -> Runtime {
    Runtime::new(Limits::default()).expect("wasmtime runtime")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing in {v}"))
}

fn u(v: &Value, key: &str) -> u32 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` missing in {v}")) as u32
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Low => "low",
        Severity::Medium => "medium",
        Severity::High => "high",
        Severity::Critical => "critical",
    }
}

/// Loads `name` with each of the vectors' bad configs and checks it is refused
/// with a message naming the key. Returns how many were checked.
fn check_bad_configs(
    name: &str,
    v: &Value,
    load: impl Fn(Vec<(String, ConfigValue)>) -> Result<(), plugins::PluginError>,
) -> usize {
    let bad = v["bad_configs"].as_array().expect("bad_configs");
    assert!(bad.len() >= 3, "{name}: at least 3 bad configs");
    for b in bad {
        let err = load(config(&b["config"])).expect_err(&format!("{name}: {b} must be refused"));
        let msg = err.to_string();
        let want = b["error_contains"].as_str().unwrap();
        assert!(
            matches!(err, plugins::PluginError::Config { .. }),
            "{name}: {b} refused as {err:?}, want a config refusal"
        );
        assert!(
            msg.contains(want),
            "{name}: `{msg}` does not contain `{want}`"
        );
    }
    bad.len()
}

#[test]
fn anomaly_vectors_through_wasm() {
    let rt = runtime();
    let path = component("anomaly");
    let v = vectors("anomaly");
    let mut cases_run = 0;
    for group in v["groups"].as_array().unwrap() {
        let gname = group["name"].as_str().unwrap();
        let mut rule = AnomalyRule::load(&rt, "anomaly", &path, config(&group["config"]))
            .unwrap_or_else(|e| panic!("group {gname}: {e}"));
        let cases = group["cases"].as_array().unwrap();
        let mut batch = plugins::anomaly::ReadingBatch {
            power_kw: vec![],
            baseline_kw: vec![],
            sample_count: vec![],
        };
        for c in cases {
            batch.power_kw.push(f(c, "power_kw"));
            batch.baseline_kw.push(f(c, "baseline_kw"));
            batch.sample_count.push(u(c, "sample_count"));
        }
        let findings = rule.detect(&batch).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let cname = c["name"].as_str().unwrap();
            let got = findings.iter().find(|f| f.index as usize == i);
            match (&c["expect"], got) {
                (Value::Null, None) => {}
                (Value::Null, Some(g)) => panic!("{gname} / {cname}: unexpected finding {g:?}"),
                (e, None) => panic!("{gname} / {cname}: expected {e}, got nothing"),
                (e, Some(g)) => {
                    let kind = match g.kind {
                        plugins::anomaly::AnomalyKind::Spike => "spike",
                        plugins::anomaly::AnomalyKind::Drop => "drop",
                        plugins::anomaly::AnomalyKind::Outage => "outage",
                    };
                    assert_eq!(kind, e["kind"], "{gname} / {cname}: kind");
                    assert_eq!(
                        severity(g.severity),
                        e["severity"],
                        "{gname} / {cname}: severity"
                    );
                    assert!(
                        close(g.change, f(e, "change")),
                        "{gname} / {cname}: change {}",
                        g.change
                    );
                    assert_eq!(g.message, e["message"], "{gname} / {cname}: message");
                }
            }
            cases_run += 1;
        }
    }
    assert!(cases_run >= 15, "only {cases_run} anomaly cases");
    check_bad_configs("anomaly", &v, |cfg| {
        AnomalyRule::load(&rt, "anomaly", &path, cfg).map(|_| ())
    });
}

#[test]
fn overload_vectors_through_wasm() {
    let rt = runtime();
    let path = component("overload");
    let v = vectors("overload");
    let mut cases_run = 0;
    for group in v["groups"].as_array().unwrap() {
        let gname = group["name"].as_str().unwrap();
        let mut rule = OverloadRule::load(&rt, "overload", &path, config(&group["config"]))
            .unwrap_or_else(|e| panic!("group {gname}: {e}"));
        let cases = group["cases"].as_array().unwrap();
        let windows: Vec<_> = cases
            .iter()
            .map(|c| plugins::overload::RegionWindow {
                load_percentage: f(c, "load_percentage"),
                total_consumption: f(c, "total_consumption"),
                capacity_kw: f(c, "capacity_kw"),
                consecutive: u(c, "consecutive"),
            })
            .collect();
        let decisions = rule.evaluate(&windows).unwrap();
        for (c, d) in cases.iter().zip(&decisions) {
            let cname = c["name"].as_str().unwrap();
            let e = &c["expect"];
            assert_eq!(
                d.consecutive,
                u(e, "consecutive"),
                "{gname} / {cname}: consecutive"
            );
            match (&e["alert"], &d.alert) {
                (Value::Null, None) => {}
                (Value::Null, Some(a)) => panic!("{gname} / {cname}: unexpected alert {a:?}"),
                (ea, None) => panic!("{gname} / {cname}: expected alert {ea}"),
                (ea, Some(a)) => {
                    assert_eq!(severity(a.severity), ea["severity"], "{gname} / {cname}");
                    assert_eq!(a.message, ea["message"], "{gname} / {cname}");
                }
            }
            cases_run += 1;
        }
    }
    assert!(cases_run >= 5, "only {cases_run} overload cases");
    check_bad_configs("overload", &v, |cfg| {
        OverloadRule::load(&rt, "overload", &path, cfg).map(|_| ())
    });
}

#[test]
fn tariff_vectors_through_wasm() {
    let rt = runtime();
    let path = component("tariff");
    let v = vectors("tariff");
    let mut cases_run = 0;
    for group in v["groups"].as_array().unwrap() {
        let gname = group["name"].as_str().unwrap();
        let mut rule = TariffRule::load(&rt, "tariff", &path, config(&group["config"]))
            .unwrap_or_else(|e| panic!("group {gname}: {e}"));
        let cases = group["cases"].as_array().unwrap();
        let loads: Vec<_> = cases
            .iter()
            .map(|c| plugins::tariff::RegionLoad {
                load_percentage: f(c, "load_percentage"),
                base_price: f(c, "base_price"),
                last_price: f(c, "last_price"),
            })
            .collect();
        let decisions = rule.price(&loads).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let cname = c["name"].as_str().unwrap();
            let got = decisions.iter().find(|d| d.index as usize == i);
            match (&c["expect"], got) {
                (Value::Null, None) => {}
                (Value::Null, Some(g)) => panic!("{gname} / {cname}: unexpected decision {g:?}"),
                (e, None) => panic!("{gname} / {cname}: expected {e}, got nothing"),
                (e, Some(g)) => {
                    let reason = match g.reason {
                        plugins::tariff::TariffReason::LowLoad => "low-load",
                        plugins::tariff::TariffReason::NormalLoad => "normal-load",
                        plugins::tariff::TariffReason::HighLoad => "high-load",
                        plugins::tariff::TariffReason::CriticalLoad => "critical-load",
                    };
                    assert_eq!(reason, e["reason"], "{gname} / {cname}: reason");
                    assert!(
                        close(g.price_per_kwh, f(e, "price_per_kwh")),
                        "{gname} / {cname}: price {}",
                        g.price_per_kwh
                    );
                    assert!(
                        close(g.change_percent, f(e, "change_percent")),
                        "{gname} / {cname}: change {}",
                        g.change_percent
                    );
                }
            }
            cases_run += 1;
        }
    }
    assert!(cases_run >= 8, "only {cases_run} tariff cases");
    check_bad_configs("tariff", &v, |cfg| {
        TariffRule::load(&rt, "tariff", &path, cfg).map(|_| ())
    });
}

#[test]
fn aggregate_vectors_through_wasm() {
    let rt = runtime();
    let path = component("aggregate");
    let v = vectors("aggregate");
    let mut cases_run = 0;
    for group in v["groups"].as_array().unwrap() {
        let gname = group["name"].as_str().unwrap();
        let mut rule = AggregateRule::load(&rt, "aggregate", &path, config(&group["config"]))
            .unwrap_or_else(|e| panic!("group {gname}: {e}"));
        let meters = group["meters"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let windows: Vec<_> = meters
            .iter()
            .map(|m| plugins::aggregate::MeterWindow {
                count: u(m, "count"),
                power_sum: f(m, "power_sum"),
                max_power: f(m, "max_power"),
                min_power: f(m, "min_power"),
                energy_sum: f(m, "energy_sum"),
                voltage_sum: f(m, "voltage_sum"),
                voltage_count: u(m, "voltage_count"),
            })
            .collect();
        for (m, g) in meters.iter().zip(rule.finish_meters(&windows).unwrap()) {
            let name = m["name"].as_str().unwrap();
            let e = &m["expect"];
            for (key, got) in [
                ("avg_power_kw", g.avg_power_kw),
                ("max_power_kw", g.max_power_kw),
                ("min_power_kw", g.min_power_kw),
                ("energy_kwh_sum", g.energy_kwh_sum),
            ] {
                assert!(close(got, f(e, key)), "{gname} / {name}: {key} {got}");
            }
            match (&e["voltage_avg"], g.voltage_avg) {
                (Value::Null, None) => {}
                (ev, Some(gv)) if ev.is_number() => {
                    assert!(
                        close(gv, ev.as_f64().unwrap()),
                        "{gname} / {name}: voltage_avg {gv}"
                    )
                }
                (ev, gv) => panic!("{gname} / {name}: voltage_avg {gv:?}, want {ev}"),
            }
            assert_eq!(g.count, u(e, "count"), "{gname} / {name}: count");
            assert_eq!(
                Value::Bool(g.publish),
                e["publish"],
                "{gname} / {name}: publish"
            );
            cases_run += 1;
        }
        let regions = group["regions"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let rwindows: Vec<_> = regions
            .iter()
            .map(|r| plugins::aggregate::RegionWindow {
                meter_count: u(r, "meter_count"),
                total_kw: f(r, "total_kw"),
                max_kw: f(r, "max_kw"),
                min_kw: f(r, "min_kw"),
                capacity_kw: f(r, "capacity_kw"),
            })
            .collect();
        for (r, g) in regions.iter().zip(rule.finish_regions(&rwindows).unwrap()) {
            let name = r["name"].as_str().unwrap();
            let e = &r["expect"];
            for (key, got) in [
                ("total_consumption", g.total_consumption),
                ("avg_consumption", g.avg_consumption),
                ("max_consumption", g.max_consumption),
                ("min_consumption", g.min_consumption),
                ("load_percentage", g.load_percentage),
            ] {
                assert!(close(got, f(e, key)), "{gname} / {name}: {key} {got}");
            }
            cases_run += 1;
        }
    }
    assert!(cases_run >= 6, "only {cases_run} aggregate cases");
    check_bad_configs("aggregate", &v, |cfg| {
        AggregateRule::load(&rt, "aggregate", &path, cfg).map(|_| ())
    });
}

#[test]
fn a_core_module_or_garbage_is_refused_with_the_reason() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = AnomalyRule::load(&rt, "anomaly", &core, vec![])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("core wasm module"), "{err}");
    let missing = dir.path().join("nope.wasm");
    let err = AnomalyRule::load(&rt, "anomaly", &missing, vec![])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn a_component_of_another_world_is_refused() {
    let rt = runtime();
    // The tariff component does not export `detect`.
    let err = AnomalyRule::load(&rt, "anomaly", &component("tariff"), vec![])
        .err()
        .expect("tariff component is not an anomaly rule")
        .to_string();
    assert!(err.contains("anomaly-rule"), "{err}");
}

#[test]
fn a_memory_blow_up_fails_that_call_only() {
    let rt = Runtime::new(Limits {
        max_memory_bytes: 2 << 20,
        ..Limits::default()
    })
    .unwrap();
    let mut rule = AnomalyRule::load(&rt, "anomaly", &component("anomaly"), vec![]).unwrap();
    assert_eq!(rule.detect(&anomaly_batch(1000)).unwrap().len(), 10);
    // 500,000 readings need ~10 MiB of guest memory: over the 2 MiB cap.
    let err = rule.detect(&anomaly_batch(500_000)).unwrap_err();
    assert!(matches!(err, plugins::PluginError::Trap { .. }), "{err:?}");
    assert_eq!(rule.failures(), 1);
    // The instance is rebuilt and configured again: the next batch works.
    assert_eq!(rule.detect(&anomaly_batch(1000)).unwrap().len(), 10);
}

#[test]
fn a_call_over_its_time_bound_is_interrupted() {
    let rt = Runtime::new(Limits {
        call_timeout: std::time::Duration::from_millis(1),
        max_memory_bytes: 1 << 30,
        ..Limits::default()
    })
    .unwrap();
    let mut rule = AnomalyRule::load(&rt, "anomaly", &component("anomaly"), vec![]).unwrap();
    // Millions of readings with a finding (and a formatted message) each
    // take far longer than one epoch tick.
    let mut big = anomaly_batch(2_000_000);
    big.power_kw.iter_mut().for_each(|p| *p = 20.0);
    let err = rule.detect(&big).unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(rule.detect(&anomaly_batch(100)).unwrap().len(), 1);
}
