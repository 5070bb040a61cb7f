//! Helpers for a plugin's native vector tests (feature `vectors`).
//!
//! Each plugin keeps its test vectors in `plugins/<name>/vectors.json`, shared
//! with the host's wasmtime test. The file holds `groups` (each with a
//! `config` object and the plugin's own cases) and `bad_configs` (each a
//! `config` object the plugin must refuse, and `error_contains`, a part of
//! the expected message). A plugin's `tests/vectors.rs` uses these helpers:
//!
//! ```no_run
//! use segs_plugin_sdk::{ConfigValue, vectors};
//!
//! # #[derive(Debug)] struct Config;
//! # impl Config {
//! #     fn from_pairs(_: &[(String, ConfigValue)]) -> Result<Self, String> { Ok(Config) }
//! # }
//! let v = vectors::load(env!("CARGO_MANIFEST_DIR"));
//! for group in v["groups"].as_array().expect("groups") {
//!     let config = vectors::group_config(group, Config::from_pairs);
//!     // ... run the group's cases with `config` ...
//! }
//! vectors::check_bad_configs(&v, Config::from_pairs);
//! ```
//!
//! Every helper panics (failing the test) with a message naming what is
//! wrong.

use std::fmt::Debug;

use serde_json::Value;

use crate::ConfigValue;

/// Reads and parses `<manifest_dir>/vectors.json`; pass it
/// `env!("CARGO_MANIFEST_DIR")`.
pub fn load(manifest_dir: &str) -> Value {
    let path = format!("{manifest_dir}/vectors.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

/// A JSON config object as config pairs (in the object's key order):
/// integer JSON numbers become `Integer`, numbers with a fraction or
/// exponent `Float`. Nested values are refused.
pub fn config(config: &Value) -> Vec<(String, ConfigValue)> {
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

/// The `config` of a vector group, parsed by `parse` (the plugin's
/// `Config::from_pairs`); panics naming the group if it is refused.
pub fn group_config<C>(
    group: &Value,
    parse: impl FnOnce(&[(String, ConfigValue)]) -> Result<C, String>,
) -> C {
    parse(&config(&group["config"]))
        .unwrap_or_else(|e| panic!("group {}: config refused: {e}", group["name"]))
}

/// Checks that `parse` refuses every entry of the vectors' `bad_configs`
/// (there must be at least 3) with a message containing its
/// `error_contains`. Returns how many were checked.
pub fn check_bad_configs<C: Debug>(
    vectors: &Value,
    parse: impl Fn(&[(String, ConfigValue)]) -> Result<C, String>,
) -> usize {
    let bad = vectors["bad_configs"].as_array().expect("bad_configs");
    assert!(bad.len() >= 3);
    for entry in bad {
        let needle = entry["error_contains"].as_str().expect("error_contains");
        match parse(&config(&entry["config"])) {
            Ok(config) => panic!("{} accepted as {config:?}", entry["config"]),
            Err(e) => assert!(e.contains(needle), "error {e:?} lacks {needle:?}"),
        }
    }
    bad.len()
}

/// The number `field` of `case`.
pub fn f64_of(case: &Value, field: &str) -> f64 {
    case[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} in {case}"))
}

/// The non-negative integer `field` of `case`, which must fit a `u32`.
pub fn u32_of(case: &Value, field: &str) -> u32 {
    let n = case[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {case}"));
    u32::try_from(n).expect("fits u32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A stand-in for a plugin's `Config::from_pairs`: knows only `n`.
    fn parse(pairs: &[(String, ConfigValue)]) -> Result<i64, String> {
        let mut r = crate::ConfigReader::new(pairs);
        let n = r.i64_in("n", 1, 0..=9)?;
        r.finish()?;
        Ok(n)
    }

    #[test]
    fn json_config_as_pairs() {
        // Keys in sorted order: serde_json may or may not preserve order.
        let pairs = config(&json!({ "b": true, "e": 1e3, "f": 1.0, "i": -2, "t": "x" }));
        assert_eq!(
            pairs,
            vec![
                ("b".to_owned(), ConfigValue::Boolean(true)),
                ("e".to_owned(), ConfigValue::Float(1000.0)),
                ("f".to_owned(), ConfigValue::Float(1.0)),
                ("i".to_owned(), ConfigValue::Integer(-2)),
                ("t".to_owned(), ConfigValue::Text("x".to_owned())),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "config `a`: unsupported value [1]")]
    fn nested_config_value_panics() {
        config(&json!({ "a": [1] }));
    }

    #[test]
    fn group_config_parses() {
        let group = json!({ "name": "g", "config": { "n": 3 } });
        assert_eq!(group_config(&group, parse), 3);
    }

    #[test]
    #[should_panic(expected = "group \"g\": config refused: config key `n`")]
    fn refused_group_config_panics() {
        group_config(&json!({ "name": "g", "config": { "n": 10 } }), parse);
    }

    fn bad(entries: Value) -> Value {
        json!({ "bad_configs": entries })
    }

    #[test]
    fn bad_configs_refused() {
        let v = bad(json!([
            { "config": { "n": -1 }, "error_contains": "must be between 0 and 9" },
            { "config": { "n": 1.5 }, "error_contains": "expected an integer" },
            { "config": { "m": 1 }, "error_contains": "unknown config key `m`" },
        ]));
        assert_eq!(check_bad_configs(&v, parse), 3);
    }

    #[test]
    #[should_panic(expected = "accepted as 2")]
    fn accepted_bad_config_panics() {
        let v = bad(json!([
            { "config": { "n": -1 }, "error_contains": "n" },
            { "config": { "m": 1 }, "error_contains": "m" },
            { "config": { "n": 2 }, "error_contains": "n" },
        ]));
        check_bad_configs(&v, parse);
    }

    #[test]
    #[should_panic(expected = "lacks \"typo\"")]
    fn wrong_message_panics() {
        let v = bad(json!([
            { "config": { "n": -1 }, "error_contains": "n" },
            { "config": { "m": 1 }, "error_contains": "m" },
            { "config": { "n": 10 }, "error_contains": "typo" },
        ]));
        check_bad_configs(&v, parse);
    }

    #[test]
    #[should_panic]
    fn too_few_bad_configs_panics() {
        check_bad_configs(&bad(json!([])), parse);
    }

    #[test]
    fn case_fields() {
        let case = json!({ "x": 1.5, "n": 7 });
        assert_eq!(f64_of(&case, "x"), 1.5);
        assert_eq!(f64_of(&case, "n"), 7.0);
        assert_eq!(u32_of(&case, "n"), 7);
    }
}
