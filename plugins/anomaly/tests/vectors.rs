//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use anomaly::{Config, detect};
use segs_plugin_sdk::{ConfigValue, Severity};
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

#[test]
fn groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let mut checked = 0;
    for group in groups {
        let group_name = group["name"].as_str().expect("group name");
        let config = Config::from_pairs(&config_pairs(&group["config"]))
            .unwrap_or_else(|e| panic!("group {group_name}: config refused: {e}"));
        let cases = group["cases"].as_array().expect("cases");

        let power: Vec<f64> = cases.iter().map(|c| f64_of(c, "power_kw")).collect();
        let baseline: Vec<f64> = cases.iter().map(|c| f64_of(c, "baseline_kw")).collect();
        let samples: Vec<u32> = cases
            .iter()
            .map(|c| c["sample_count"].as_u64().expect("sample_count") as u32)
            .collect();
        let findings = detect(&config, &power, &baseline, &samples);

        let expected = cases.iter().filter(|c| !c["expect"].is_null()).count();
        assert_eq!(
            findings.len(),
            expected,
            "group {group_name}: {findings:#?}"
        );
        assert!(
            findings.windows(2).all(|w| w[0].index < w[1].index),
            "group {group_name}: findings not in index order"
        );
        for (index, case) in cases.iter().enumerate() {
            let what = format!("group {group_name}, case {index} ({})", case["name"]);
            let found = findings.iter().find(|f| f.index as usize == index);
            let expect = &case["expect"];
            if expect.is_null() {
                assert!(found.is_none(), "{what}: unexpected {found:?}");
                continue;
            }
            let found = found.unwrap_or_else(|| panic!("{what}: no finding"));
            assert_eq!(found.kind.as_str(), expect["kind"], "{what}");
            let severity: Severity = expect["severity"].as_str().unwrap().parse().unwrap();
            assert_eq!(found.severity, severity, "{what}");
            let change = f64_of(expect, "change");
            assert!(
                (found.change - change).abs() < TOLERANCE,
                "{what}: change {} != {change}",
                found.change
            );
            assert_eq!(found.message, expect["message"], "{what}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no finding was checked");
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
