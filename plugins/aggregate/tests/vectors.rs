//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use aggregate::{Config, MeterWindow, RegionWindow, finish_meters, finish_regions};
use segs_plugin_sdk::ConfigValue;
use serde_json::Value;

const TOLERANCE: f64 = 1e-9;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors.json");
    let text = std::fs::read_to_string(path).expect("read vectors.json");
    serde_json::from_str(&text).expect("parse vectors.json")
}

/// A JSON config object as config pairs: integer JSON numbers become
/// `Integer`, numbers with a fraction or exponent `Float`.
fn config_pairs(config: &Value) -> Vec<(String, ConfigValue)> {
    let object = config.as_object().expect("config is a JSON object");
    object
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Number(n) if n.is_f64() => ConfigValue::Float(n.as_f64().unwrap()),
                Value::Number(n) => ConfigValue::Integer(n.as_i64().expect("integer fits i64")),
                Value::Bool(b) => ConfigValue::Boolean(*b),
                Value::String(s) => ConfigValue::Text(s.clone()),
                other => panic!("config `{key}`: unsupported value {other}"),
            };
            (key.clone(), value)
        })
        .collect()
}

fn f64_of(case: &Value, field: &str) -> f64 {
    case[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} in {case}"))
}

fn u32_of(case: &Value, field: &str) -> u32 {
    let n = case[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {case}"));
    u32::try_from(n).expect("fits u32")
}

fn assert_close(got: f64, expect: &Value, field: &str, what: &str) {
    let expected = f64_of(expect, field);
    assert!(
        (got - expected).abs() < TOLERANCE,
        "{what}: {field} {got} != {expected}"
    );
}

fn config_of(group: &Value) -> Config {
    Config::from_pairs(&config_pairs(&group["config"]))
        .unwrap_or_else(|e| panic!("group {}: config refused: {e}", group["name"]))
}

#[test]
fn meter_groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    let mut checked = 0;
    for group in groups {
        let config = config_of(group);
        let cases = group["meters"].as_array().expect("meters");
        let windows: Vec<MeterWindow> = cases
            .iter()
            .map(|c| MeterWindow {
                count: u32_of(c, "count"),
                power_sum: f64_of(c, "power_sum"),
                max_power: f64_of(c, "max_power"),
                min_power: f64_of(c, "min_power"),
                energy_sum: f64_of(c, "energy_sum"),
                voltage_sum: f64_of(c, "voltage_sum"),
                voltage_count: u32_of(c, "voltage_count"),
            })
            .collect();
        let aggregates = finish_meters(&config, &windows);
        assert_eq!(aggregates.len(), cases.len(), "group {}", group["name"]);

        for (case, got) in cases.iter().zip(&aggregates) {
            let what = format!("group {}, meter {}", group["name"], case["name"]);
            let expect = &case["expect"];
            assert_close(got.avg_power_kw, expect, "avg_power_kw", &what);
            assert_close(got.max_power_kw, expect, "max_power_kw", &what);
            assert_close(got.min_power_kw, expect, "min_power_kw", &what);
            assert_close(got.energy_kwh_sum, expect, "energy_kwh_sum", &what);
            match (got.voltage_avg, &expect["voltage_avg"]) {
                (None, Value::Null) => {}
                (Some(v), _) => assert_close(v, expect, "voltage_avg", &what),
                (None, other) => panic!("{what}: voltage_avg None, expected {other}"),
            }
            assert_eq!(got.count, u32_of(expect, "count"), "{what}");
            assert_eq!(got.publish, expect["publish"], "{what}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no meter window was checked");
}

#[test]
fn region_groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    let mut checked = 0;
    for group in groups {
        let config = config_of(group);
        let cases = group["regions"].as_array().expect("regions");
        let regions: Vec<RegionWindow> = cases
            .iter()
            .map(|c| RegionWindow {
                meter_count: u32_of(c, "meter_count"),
                total_kw: f64_of(c, "total_kw"),
                max_kw: f64_of(c, "max_kw"),
                min_kw: f64_of(c, "min_kw"),
                capacity_kw: f64_of(c, "capacity_kw"),
            })
            .collect();
        let aggregates = finish_regions(&config, &regions);
        assert_eq!(aggregates.len(), cases.len(), "group {}", group["name"]);

        for (case, got) in cases.iter().zip(&aggregates) {
            let what = format!("group {}, region {}", group["name"], case["name"]);
            let expect = &case["expect"];
            assert_close(got.total_consumption, expect, "total_consumption", &what);
            assert_close(got.avg_consumption, expect, "avg_consumption", &what);
            assert_close(got.max_consumption, expect, "max_consumption", &what);
            assert_close(got.min_consumption, expect, "min_consumption", &what);
            assert_close(got.load_percentage, expect, "load_percentage", &what);
            checked += 1;
        }
    }
    assert!(checked > 0, "no regional window was checked");
}

#[test]
fn bad_configs() {
    let vectors = vectors();
    let bad = vectors["bad_configs"].as_array().expect("bad_configs");
    assert!(bad.len() >= 3);
    for entry in bad {
        let needle = entry["error_contains"].as_str().expect("error_contains");
        match Config::from_pairs(&config_pairs(&entry["config"])) {
            Ok(config) => panic!("{} accepted as {config:?}", entry["config"]),
            Err(e) => assert!(e.contains(needle), "error {e:?} lacks {needle:?}"),
        }
    }
}
