//! Wasm component glue: converts between the WIT types of the
//! `anomaly-rule` world and the plain-Rust rule in `lib.rs`.

use std::sync::{Mutex, PoisonError};

use segs_plugin_sdk as sdk;

wit_bindgen::generate!({ world: "anomaly-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `ReadingBatch`, `Finding`.
use segs::rules::anomaly::AnomalyKind;
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

    fn detect(batch: ReadingBatch) -> Vec<Finding> {
        let config = config();
        crate::detect(
            &config,
            &batch.power_kw,
            &batch.baseline_kw,
            &batch.sample_count,
        )
        .into_iter()
        .map(|f| Finding {
            index: f.index,
            kind: match f.kind {
                crate::AnomalyKind::Spike => AnomalyKind::Spike,
                crate::AnomalyKind::Drop => AnomalyKind::Drop,
                crate::AnomalyKind::Outage => AnomalyKind::Outage,
            },
            severity: wit_severity(f.severity),
            change: f.change,
            message: f.message,
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
