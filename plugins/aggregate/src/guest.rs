//! Wasm component glue: converts between the WIT types of the
//! `aggregate-rule` world and the plain-Rust rule in `lib.rs`.

use std::sync::{Mutex, PoisonError};

use segs_plugin_sdk as sdk;

wit_bindgen::generate!({ world: "aggregate-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `MeterWindow`, `MeterAggregate`, `RegionWindow`, `RegionalAggregate`.
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

    fn finish_meters(windows: Vec<MeterWindow>) -> Vec<MeterAggregate> {
        let config = config();
        windows
            .iter()
            .map(|w| {
                let a = crate::finish_meter(
                    &config,
                    &crate::MeterWindow {
                        count: w.count,
                        power_sum: w.power_sum,
                        max_power: w.max_power,
                        min_power: w.min_power,
                        energy_sum: w.energy_sum,
                        voltage_sum: w.voltage_sum,
                        voltage_count: w.voltage_count,
                    },
                );
                MeterAggregate {
                    avg_power_kw: a.avg_power_kw,
                    max_power_kw: a.max_power_kw,
                    min_power_kw: a.min_power_kw,
                    energy_kwh_sum: a.energy_kwh_sum,
                    voltage_avg: a.voltage_avg,
                    count: a.count,
                    publish: a.publish,
                }
            })
            .collect()
    }

    fn finish_regions(regions: Vec<RegionWindow>) -> Vec<RegionalAggregate> {
        let config = config();
        regions
            .iter()
            .map(|r| {
                let a = crate::finish_region(
                    &config,
                    &crate::RegionWindow {
                        meter_count: r.meter_count,
                        total_kw: r.total_kw,
                        max_kw: r.max_kw,
                        min_kw: r.min_kw,
                        capacity_kw: r.capacity_kw,
                    },
                );
                RegionalAggregate {
                    total_consumption: a.total_consumption,
                    avg_consumption: a.avg_consumption,
                    max_consumption: a.max_consumption,
                    min_consumption: a.min_consumption,
                    load_percentage: a.load_percentage,
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

export!(Component);
