//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use aggregate::{Config, MeterWindow, RegionWindow, finish_meters, finish_regions};
use segs_plugin_sdk::vectors::{check_bad_configs, f64_of, group_config, load, u32_of};
use serde_json::Value;

const TOLERANCE: f64 = 1e-9;

fn vectors() -> Value {
    load(env!("CARGO_MANIFEST_DIR"))
}

fn assert_close(got: f64, expect: &Value, field: &str, what: &str) {
    let expected = f64_of(expect, field);
    assert!(
        (got - expected).abs() < TOLERANCE,
        "{what}: {field} {got} != {expected}"
    );
}

#[test]
fn meter_groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    let mut checked = 0;
    for group in groups {
        let config = group_config(group, Config::from_pairs);
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
        let config = group_config(group, Config::from_pairs);
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
    check_bad_configs(&vectors(), Config::from_pairs);
}
