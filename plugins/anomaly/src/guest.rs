//! Wasm component glue: converts between the WIT types of the
//! `anomaly-rule` world and the plain-Rust rule in `lib.rs`.

use segs_plugin_sdk as sdk;

wit_bindgen::generate!({ world: "anomaly-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `ReadingBatch`, `Finding`.
use segs::rules::anomaly::AnomalyKind;
use segs::rules::types::Severity;

// `fn config()` and `fn set_config(pairs)` for the rule's `crate::Config`.
sdk::guest_config!(crate::Config, segs::rules::types::ConfigValue);

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        set_config(config)
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

fn wit_severity(severity: sdk::Severity) -> Severity {
    match severity {
        sdk::Severity::Low => Severity::Low,
        sdk::Severity::Medium => Severity::Medium,
        sdk::Severity::High => Severity::High,
        sdk::Severity::Critical => Severity::Critical,
    }
}

export!(Component);
