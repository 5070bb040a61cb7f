//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use overload::{Config, RegionWindow, evaluate};
use segs_plugin_sdk::{ConfigValue, Severity};
use serde_json::Value;

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

#[test]
fn groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let (mut checked, mut alerts) = (0, 0);
    for group in groups {
        let group_name = group["name"].as_str().expect("group name");
        let config = Config::from_pairs(&config_pairs(&group["config"]))
            .unwrap_or_else(|e| panic!("group {group_name}: config refused: {e}"));
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
