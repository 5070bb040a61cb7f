//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use anomaly::{Config, detect};
use segs_plugin_sdk::Severity;
use segs_plugin_sdk::vectors::{check_bad_configs, f64_of, group_config, load, u32_of};
use serde_json::Value;

const TOLERANCE: f64 = 1e-9;

fn vectors() -> Value {
    load(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn groups() {
    let vectors = vectors();
    let groups = vectors["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let mut checked = 0;
    for group in groups {
        let group_name = group["name"].as_str().expect("group name");
        let config = group_config(group, Config::from_pairs);
        let cases = group["cases"].as_array().expect("cases");

        let power: Vec<f64> = cases.iter().map(|c| f64_of(c, "power_kw")).collect();
        let baseline: Vec<f64> = cases.iter().map(|c| f64_of(c, "baseline_kw")).collect();
        let samples: Vec<u32> = cases.iter().map(|c| u32_of(c, "sample_count")).collect();
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
    check_bad_configs(&vectors(), Config::from_pairs);
}
