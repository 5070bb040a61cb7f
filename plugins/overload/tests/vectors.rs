//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use overload::{Config, RegionWindow, evaluate};
use segs_plugin_sdk::Severity;
use segs_plugin_sdk::vectors::{check_bad_configs, f64_of, group_config, load, u32_of};
use serde_json::Value;

fn vectors() -> Value {
    load(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let (mut checked, mut alerts) = (0, 0);
    for group in groups {
        let group_name = group["name"].as_str().expect("group name");
        let config = group_config(group, Config::from_pairs);
        let cases = group["cases"].as_array().expect("cases");
        let windows: Vec<RegionWindow> = cases
            .iter()
            .map(|c| RegionWindow {
                load_percentage: f64_of(c, "load_percentage"),
                total_consumption: f64_of(c, "total_consumption"),
                capacity_kw: f64_of(c, "capacity_kw"),
                consecutive: u32_of(c, "consecutive"),
            })
            .collect();
        let decisions = evaluate(&config, &windows);
        assert_eq!(decisions.len(), cases.len(), "group {group_name}");

        for (index, (case, decision)) in cases.iter().zip(&decisions).enumerate() {
            let what = format!("group {group_name}, case {index} ({})", case["name"]);
            let expect = &case["expect"];
            assert_eq!(
                decision.consecutive,
                u32_of(expect, "consecutive"),
                "{what}"
            );
            match (&decision.alert, &expect["alert"]) {
                (None, Value::Null) => {}
                (Some(alert), expected) if !expected.is_null() => {
                    let severity: Severity =
                        expected["severity"].as_str().unwrap().parse().unwrap();
                    assert_eq!(alert.severity, severity, "{what}");
                    assert_eq!(alert.message, expected["message"], "{what}");
                    alerts += 1;
                }
                (got, expected) => panic!("{what}: alert {got:?}, expected {expected}"),
            }
            checked += 1;
        }
    }
    assert!(checked > 0 && alerts > 0, "vectors check nothing");
}

#[test]
fn bad_configs() {
    check_bad_configs(&vectors(), Config::from_pairs);
}
