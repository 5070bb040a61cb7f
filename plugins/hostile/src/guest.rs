//! Wasm component glue of the hostile fixture: the `tariff-rule` world.

wit_bindgen::generate!({ world: "tariff-rule", path: "../../wit" });

use segs::rules::tariff::TariffReason;

segs_plugin_sdk::guest_config!(crate::Config, segs::rules::types::ConfigValue);

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        set_config(config)
    }

    fn price(regions: Vec<RegionLoad>) -> Vec<TariffDecision> {
        let regions: Vec<crate::RegionLoad> = regions
            .iter()
            .map(|r| crate::RegionLoad {
                load_percentage: r.load_percentage,
                base_price: r.base_price,
                last_price: r.last_price,
            })
            .collect();
        crate::price(&config(), &regions)
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
