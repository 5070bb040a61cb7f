//! Wasm component glue: converts between the WIT types of the
//! `overload-rule` world and the plain-Rust rule in `lib.rs`.

use segs_plugin_sdk as sdk;

wit_bindgen::generate!({ world: "overload-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `RegionWindow`, `OverloadDecision`.
use segs::rules::overload::OverloadAlert;
use segs::rules::types::Severity;

// `fn config()` and `fn set_config(pairs)` for the rule's `crate::Config`.
sdk::guest_config!(crate::Config, segs::rules::types::ConfigValue);

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        set_config(config)
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

fn wit_severity(severity: sdk::Severity) -> Severity {
    match severity {
        sdk::Severity::Low => Severity::Low,
        sdk::Severity::Medium => Severity::Medium,
        sdk::Severity::High => Severity::High,
        sdk::Severity::Critical => Severity::Critical,
    }
}

export!(Component);
