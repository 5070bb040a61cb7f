//! Wasm component glue: converts between the WIT types of the
//! `tariff-rule` world and the plain-Rust rule in `lib.rs`.

wit_bindgen::generate!({ world: "tariff-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `RegionLoad`, `TariffDecision`.
use segs::rules::tariff::TariffReason;

// `fn config()` and `fn set_config(pairs)` for the rule's `crate::Config`.
segs_plugin_sdk::guest_config!(crate::Config, segs::rules::types::ConfigValue);

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        set_config(config)
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

export!(Component);
