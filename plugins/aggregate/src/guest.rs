//! Wasm component glue: converts between the WIT types of the
//! `aggregate-rule` world and the plain-Rust rule in `lib.rs`.

wit_bindgen::generate!({ world: "aggregate-rule", path: "../../wit" });

// The world's `use` items are generated as root aliases: `Config`,
// `MeterWindow`, `MeterAggregate`, `RegionWindow`, `RegionalAggregate`.

// `fn config()` and `fn set_config(pairs)` for the rule's `crate::Config`.
segs_plugin_sdk::guest_config!(crate::Config, segs::rules::types::ConfigValue);

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        set_config(config)
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

export!(Component);
