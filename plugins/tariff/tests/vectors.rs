//! Runs `vectors.json` (shared with the host's wasmtime test) through the
//! plain-Rust rule.

use segs_plugin_sdk::vectors::{check_bad_configs, f64_of, group_config, load};
use serde_json::Value;
use tariff::{Config, RegionLoad, price};

const TOLERANCE: f64 = 1e-9;

fn vectors() -> Value {
    load(env!("CARGO_MANIFEST_DIR"))
}

fn assert_close(got: f64, expected: f64, what: &str) {
    assert!(
        (got - expected).abs() < TOLERANCE,
        "{what}: {got} != {expected}"
    );
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
        let regions: Vec<RegionLoad> = cases
            .iter()
            .map(|c| RegionLoad {
                load_percentage: f64_of(c, "load_percentage"),
                base_price: f64_of(c, "base_price"),
                last_price: f64_of(c, "last_price"),
            })
            .collect();
        let decisions = price(&config, &regions);

        let expected = cases.iter().filter(|c| !c["expect"].is_null()).count();
        assert_eq!(
            decisions.len(),
            expected,
            "group {group_name}: {decisions:#?}"
        );
        assert!(
            decisions.windows(2).all(|w| w[0].index < w[1].index),
            "group {group_name}: decisions not in index order"
        );
        for (index, case) in cases.iter().enumerate() {
            let what = format!("group {group_name}, case {index} ({})", case["name"]);
            let found = decisions.iter().find(|d| d.index as usize == index);
            let expect = &case["expect"];
            if expect.is_null() {
                assert!(found.is_none(), "{what}: unexpected {found:?}");
                continue;
            }
            let found = found.unwrap_or_else(|| panic!("{what}: no decision"));
            assert_close(found.price_per_kwh, f64_of(expect, "price_per_kwh"), &what);
            assert_eq!(found.reason.as_str(), expect["reason"], "{what}");
            assert_close(
                found.change_percent,
                f64_of(expect, "change_percent"),
                &what,
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no decision was checked");
}

#[test]
fn bad_configs() {
    check_bad_configs(&vectors(), Config::from_pairs);
}
