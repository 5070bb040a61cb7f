//! The aggregate rule: window post-processing, from the host's closed window
//! sums to the figures that are stored and published.
//!
//! Per meter window: `avg_power_kw = power_sum / count` (0 for an empty
//! window), `voltage_avg = voltage_sum / voltage_count` (none without voltage
//! readings), both rounded to `decimals`; sums, max and min pass through
//! unrounded; `publish` is false for windows with fewer than
//! `min_count_to_publish` readings (the host still stores them).
//!
//! Per regional window: `load_percentage = total_kw / capacity_kw × 100`
//! (0 when the capacity is not positive), `avg_consumption = total_kw /
//! meter_count` (0 without meters), total / max / min from the window (max
//! and min 0 without meters); every regional figure is rounded to `decimals`.
//!
//! The rule is a pure function of the windows and the config: it does no I/O
//! and keeps no state across calls (the host folds and keeps the windows).
//! The Wasm glue lives in `guest.rs`; this file is plain Rust, tested
//! natively.

use segs_plugin_sdk::{ConfigReader, ConfigValue};

#[cfg(target_arch = "wasm32")]
mod guest;

/// The rule's settings, from the plugin's config table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Meter windows with fewer readings are stored but not published.
    pub min_count_to_publish: u32,
    /// Decimal places of the averages and the regional figures (0..=9).
    pub decimals: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_count_to_publish: 1,
            decimals: 3,
        }
    }
}

impl Config {
    /// Reads the config table; unknown keys, wrong types and out-of-range
    /// values are refused with a message naming the key.
    pub fn from_pairs(pairs: &[(String, ConfigValue)]) -> Result<Self, String> {
        let d = Self::default();
        let mut r = ConfigReader::new(pairs);
        let config = Self {
            min_count_to_publish: r.u32_in(
                "min_count_to_publish",
                d.min_count_to_publish,
                0..=u32::MAX,
            )?,
            decimals: r.u32_in("decimals", d.decimals, 0..=9)?,
        };
        r.finish()?;
        Ok(config)
    }

    /// `value` rounded to `self.decimals` places, halves away from zero.
    pub fn round(&self, value: f64) -> f64 {
        round_to(value, self.decimals)
    }
}

/// `value` rounded to `decimals` places (halves away from zero). Values too
/// large to carry that many decimals in an f64, and non-finite values, are
/// returned unchanged.
pub fn round_to(value: f64, decimals: u32) -> f64 {
    // 2^52: from here on an f64 has no fractional bits left.
    const EXACT: f64 = 4_503_599_627_370_496.0;
    let factor = 10f64.powi(decimals as i32);
    let scaled = value * factor;
    if !scaled.is_finite() || scaled.abs() >= EXACT {
        return value;
    }
    scaled.round() / factor
}

/// The sums of one meter's closed window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterWindow {
    pub count: u32,
    pub power_sum: f64,
    pub max_power: f64,
    pub min_power: f64,
    pub energy_sum: f64,
    pub voltage_sum: f64,
    pub voltage_count: u32,
}

/// What is stored (and maybe published) for one meter window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterAggregate {
    pub avg_power_kw: f64,
    pub max_power_kw: f64,
    pub min_power_kw: f64,
    pub energy_kwh_sum: f64,
    /// None when the window had no voltage readings.
    pub voltage_avg: Option<f64>,
    pub count: u32,
    /// False: stored, but not published.
    pub publish: bool,
}

/// The sums of one region's closed window, folded by the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionWindow {
    pub meter_count: u32,
    /// Sum over meters of their average power in the window, kW.
    pub total_kw: f64,
    pub max_kw: f64,
    pub min_kw: f64,
    pub capacity_kw: f64,
}

/// What is stored and published for one regional window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionalAggregate {
    pub total_consumption: f64,
    pub avg_consumption: f64,
    pub max_consumption: f64,
    pub min_consumption: f64,
    pub load_percentage: f64,
}

/// Finishes one meter window.
pub fn finish_meter(config: &Config, w: &MeterWindow) -> MeterAggregate {
    let avg_power_kw = if w.count == 0 {
        0.0
    } else {
        config.round(w.power_sum / f64::from(w.count))
    };
    let voltage_avg =
        (w.voltage_count > 0).then(|| config.round(w.voltage_sum / f64::from(w.voltage_count)));
    MeterAggregate {
        avg_power_kw,
        max_power_kw: w.max_power,
        min_power_kw: w.min_power,
        energy_kwh_sum: w.energy_sum,
        voltage_avg,
        count: w.count,
        publish: w.count >= config.min_count_to_publish,
    }
}

/// Finishes a batch of meter windows: one aggregate per window, same order.
pub fn finish_meters(config: &Config, windows: &[MeterWindow]) -> Vec<MeterAggregate> {
    windows.iter().map(|w| finish_meter(config, w)).collect()
}

/// Finishes one regional window.
pub fn finish_region(config: &Config, r: &RegionWindow) -> RegionalAggregate {
    let load_percentage = if r.capacity_kw > 0.0 {
        r.total_kw / r.capacity_kw * 100.0
    } else {
        0.0
    };
    let (avg, max, min) = if r.meter_count == 0 {
        (0.0, 0.0, 0.0)
    } else {
        (r.total_kw / f64::from(r.meter_count), r.max_kw, r.min_kw)
    };
    RegionalAggregate {
        total_consumption: config.round(r.total_kw),
        avg_consumption: config.round(avg),
        max_consumption: config.round(max),
        min_consumption: config.round(min),
        load_percentage: config.round(load_percentage),
    }
}

/// Finishes a batch of regional windows: one aggregate per region, same
/// order.
pub fn finish_regions(config: &Config, regions: &[RegionWindow]) -> Vec<RegionalAggregate> {
    regions.iter().map(|r| finish_region(config, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_to_places() {
        assert_eq!(round_to(3.333_333, 3), 3.333);
        assert_eq!(round_to(0.666_666, 3), 0.667);
        assert_eq!(round_to(-0.666_666, 3), -0.667);
        assert_eq!(round_to(2.4, 0), 2.0);
        assert_eq!(round_to(2.5, 0), 3.0);
        assert_eq!(round_to(1.0 / 3.0, 9), 0.333_333_333);
        assert_eq!(round_to(1e300, 3), 1e300);
        assert!(round_to(f64::NAN, 3).is_nan());
        assert_eq!(round_to(f64::INFINITY, 3), f64::INFINITY);
    }

    fn meter(count: u32, power_sum: f64, voltage_count: u32) -> MeterWindow {
        MeterWindow {
            count,
            power_sum,
            max_power: 4.0,
            min_power: 1.0,
            energy_sum: 0.012_345_6,
            voltage_sum: 230.0 * f64::from(voltage_count),
            voltage_count,
        }
    }

    #[test]
    fn meter_window() {
        let a = finish_meter(&Config::default(), &meter(3, 10.0, 2));
        assert_eq!(
            a,
            MeterAggregate {
                avg_power_kw: 3.333,
                max_power_kw: 4.0,
                min_power_kw: 1.0,
                energy_kwh_sum: 0.012_345_6,
                voltage_avg: Some(230.0),
                count: 3,
                publish: true,
            }
        );
    }

    #[test]
    fn empty_meter_window() {
        let a = finish_meter(&Config::default(), &meter(0, 0.0, 0));
        assert_eq!(
            (a.avg_power_kw, a.voltage_avg, a.publish),
            (0.0, None, false)
        );
        let all = Config {
            min_count_to_publish: 0,
            ..Config::default()
        };
        assert!(finish_meter(&all, &meter(0, 0.0, 0)).publish);
    }

    #[test]
    fn regional_window() {
        let r = RegionWindow {
            meter_count: 2,
            total_kw: 294_400.0,
            max_kw: 200_000.0,
            min_kw: 94_400.0,
            capacity_kw: 320_000.0,
        };
        let a = finish_region(&Config::default(), &r);
        assert_eq!(
            a,
            RegionalAggregate {
                total_consumption: 294_400.0,
                avg_consumption: 147_200.0,
                max_consumption: 200_000.0,
                min_consumption: 94_400.0,
                load_percentage: 92.0,
            }
        );
        let no_capacity = RegionWindow {
            capacity_kw: 0.0,
            ..r
        };
        assert_eq!(
            finish_region(&Config::default(), &no_capacity).load_percentage,
            0.0
        );
        let no_meters = RegionWindow {
            meter_count: 0,
            total_kw: 0.0,
            ..r
        };
        let a = finish_region(&Config::default(), &no_meters);
        assert_eq!(
            (a.avg_consumption, a.max_consumption, a.min_consumption),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn config() {
        assert_eq!(Config::from_pairs(&[]), Ok(Config::default()));
        let pairs = vec![("decimals".to_owned(), ConfigValue::Integer(10))];
        assert_eq!(
            Config::from_pairs(&pairs),
            Err("config key `decimals`: must be between 0 and 9, got 10".to_owned())
        );
    }
}
