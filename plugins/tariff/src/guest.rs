//! Wasm component glue: converts between the WIT types of the
//! `tariff-rule` world and the plain-Rust rule in `lib.rs`.

use std::sync::{Mutex, PoisonError};

use segs_plugin_sdk as sdk;

wit_bindgen::generate!({ world: "tariff-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `RegionLoad`, `TariffDecision`.
use segs::rules::tariff::TariffReason;
use segs::rules::types::ConfigValue;

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

    fn price(regions: Vec<RegionLoad>) -> Vec<TariffDecision> {
        let config = config();
        let regions: Vec<crate::RegionLoad> = regions
            .iter()
            .map(|r| crate::RegionLoad {
                load_percentage: r.load_percentage,
                base_price: r.base_price,
                last_price: r.last_price,
            })
            .collect();
        crate::price(&config, &regions)
            .into_iter()
            .map(|d| TariffDecision {
                index: d.index,
                price_per_kwh: d.price_per_kwh,
                reason: match d.reason {
                    crate::TariffReason::LowLoad => TariffReason::LowLoad,
                    crate::TariffReason::NormalLoad => TariffReason::NormalLoad,
                    crate::TariffReason::HighLoad => TariffReason::HighLoad,
                    crate::TariffReason::CriticalLoad => TariffReason::CriticalLoad,
                },
                change_percent: d.change_percent,
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

export!(Component);
