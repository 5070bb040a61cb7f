//! Wasm component glue: converts between the WIT types of the
//! `overload-rule` world and the plain-Rust rule in `lib.rs`.

use std::sync::{Mutex, PoisonError};

use segs_plugin_sdk as sdk;

wit_bindgen::generate!({ world: "overload-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `RegionWindow`, `OverloadDecision`.
use segs::rules::overload::OverloadAlert;
use segs::rules::types::{ConfigValue, Severity};

/// The config set by the last successful `configure`; `None` means defaults.
static CONFIG: Mutex<Option<crate::Config>> = Mutex::new(None);

fn config() -> crate::Config {
    CONFIG
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or_default()
}

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        let parsed = crate::Config::from_pairs(&plain_config(config))?;
        *CONFIG.lock().unwrap_or_else(PoisonError::into_inner) = Some(parsed);
        Ok(())
    }

    fn evaluate(windows: Vec<RegionWindow>) -> Vec<OverloadDecision> {
        let config = config();
        windows
            .iter()
            .map(|w| {
                let decision = crate::decide(
                    &config,
                    &crate::RegionWindow {
                        load_percentage: w.load_percentage,
                        total_consumption: w.total_consumption,
                        capacity_kw: w.capacity_kw,
                        consecutive: w.consecutive,
                    },
                );
                OverloadDecision {
                    consecutive: decision.consecutive,
                    alert: decision.alert.map(|a| OverloadAlert {
                        severity: wit_severity(a.severity),
                        message: a.message,
                    }),
                }
            })
            .collect()
    }
}

fn plain_config(pairs: Config) -> Vec<(String, sdk::ConfigValue)> {
    pairs
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                ConfigValue::Float(v) => sdk::ConfigValue::Float(v),
                ConfigValue::Integer(v) => sdk::ConfigValue::Integer(v),
                ConfigValue::Boolean(v) => sdk::ConfigValue::Boolean(v),
                ConfigValue::Text(v) => sdk::ConfigValue::Text(v),
            };
            (key, value)
        })
        .collect()
}

fn wit_severity(severity: sdk::Severity) -> Severity {
    match severity {
        sdk::Severity::Low => Severity::Low,
        sdk::Severity::Medium => Severity::Medium,
        sdk::Severity::High => Severity::High,
        sdk::Severity::Critical => Severity::Critical,
    }
}

export!(Component);
