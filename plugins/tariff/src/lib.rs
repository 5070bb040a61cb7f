//! The tariff rule: load-based pricing per region.
//!
//! The region's load picks a tier; each boundary belongs to the higher tier:
//!
//! * load >= `critical_load_percent`: base × `critical_multiplier`;
//! * load >= `high_load_percent`: base × `high_multiplier`;
//! * load >= `normal_load_percent`: base × `normal_multiplier`;
//! * otherwise: base × `low_multiplier`.
//!
//! A decision is returned only when the new price moves more than
//! `min_change_percent` (strict) from the last published price, or when
//! there is no valid last price (<= 0).
//!
//! The rule is a pure function of the regions and the config: it does no I/O
//! and keeps no state across calls (the host keeps the last published
//! prices). The Wasm glue lives in `guest.rs`; this file is plain Rust,
//! tested natively.

use segs_plugin_sdk::{ConfigReader, ConfigValue, invalid};

#[cfg(target_arch = "wasm32")]
mod guest;

/// The rule's tiers, from the plugin's config table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub critical_load_percent: f64,
    pub high_load_percent: f64,
    pub normal_load_percent: f64,
    pub critical_multiplier: f64,
    pub high_multiplier: f64,
    pub normal_multiplier: f64,
    pub low_multiplier: f64,
    /// A price move of at most this many percent is not published.
    pub min_change_percent: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            critical_load_percent: 90.0,
            high_load_percent: 75.0,
            normal_load_percent: 50.0,
            critical_multiplier: 1.20,
            high_multiplier: 1.10,
            normal_multiplier: 1.00,
            low_multiplier: 0.95,
            min_change_percent: 2.0,
        }
    }
}

impl Config {
    /// Reads the config table; unknown keys, wrong types, non-positive
    /// multipliers and misordered tiers are refused with a message naming
    /// the key.
    pub fn from_pairs(pairs: &[(String, ConfigValue)]) -> Result<Self, String> {
        let d = Self::default();
        let mut r = ConfigReader::new(pairs);
        let config = Self {
            critical_load_percent: r.f64("critical_load_percent", d.critical_load_percent)?,
            high_load_percent: r.f64("high_load_percent", d.high_load_percent)?,
            normal_load_percent: r.f64("normal_load_percent", d.normal_load_percent)?,
            critical_multiplier: r.f64_positive("critical_multiplier", d.critical_multiplier)?,
            high_multiplier: r.f64_positive("high_multiplier", d.high_multiplier)?,
            normal_multiplier: r.f64_positive("normal_multiplier", d.normal_multiplier)?,
            low_multiplier: r.f64_positive("low_multiplier", d.low_multiplier)?,
            min_change_percent: r.f64_at_least("min_change_percent", d.min_change_percent, 0.0)?,
        };
        r.finish()?;
        if config.critical_load_percent < config.high_load_percent {
            return Err(invalid(
                "critical_load_percent",
                format!(
                    "must be >= high_load_percent ({}), got {}",
                    config.high_load_percent, config.critical_load_percent
                ),
            ));
        }
        if config.high_load_percent < config.normal_load_percent {
            return Err(invalid(
                "high_load_percent",
                format!(
                    "must be >= normal_load_percent ({}), got {}",
                    config.normal_load_percent, config.high_load_percent
                ),
            ));
        }
        Ok(config)
    }

    /// The tier for a load: its multiplier and reason.
    pub fn tier(&self, load_percentage: f64) -> (f64, TariffReason) {
        if load_percentage >= self.critical_load_percent {
            (self.critical_multiplier, TariffReason::CriticalLoad)
        } else if load_percentage >= self.high_load_percent {
            (self.high_multiplier, TariffReason::HighLoad)
        } else if load_percentage >= self.normal_load_percent {
            (self.normal_multiplier, TariffReason::NormalLoad)
        } else {
            (self.low_multiplier, TariffReason::LowLoad)
        }
    }
}

/// One region's current load and prices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionLoad {
    pub load_percentage: f64,
    /// The region's base price per kWh.
    pub base_price: f64,
    /// The last published price per kWh (the base price if none yet).
    pub last_price: f64,
}

/// Why a price was chosen: the load tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TariffReason {
    LowLoad,
    NormalLoad,
    HighLoad,
    CriticalLoad,
}

impl TariffReason {
    /// The name used in tariff updates: `low-load`, `normal-load`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            TariffReason::LowLoad => "low-load",
            TariffReason::NormalLoad => "normal-load",
            TariffReason::HighLoad => "high-load",
            TariffReason::CriticalLoad => "critical-load",
        }
    }
}

/// A price to publish for one region.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TariffDecision {
    /// Index of the region in the batch.
    pub index: u32,
    pub price_per_kwh: f64,
    pub reason: TariffReason,
    /// (new - last) / last × 100; 0 when there was no valid last price.
    pub change_percent: f64,
}

/// Prices one region: `(price, reason, change percent)` when the price moves
/// enough to publish, else `None`.
pub fn quote(config: &Config, region: &RegionLoad) -> Option<(f64, TariffReason, f64)> {
    let (multiplier, reason) = config.tier(region.load_percentage);
    let price = region.base_price * multiplier;
    if region.last_price.is_nan() || region.last_price <= 0.0 {
        // No usable last price (none yet, or a bad one): always publish.
        return Some((price, reason, 0.0));
    }
    // Multiplying before dividing keeps round figures exact: a move from
    // 50 to 51 is exactly 2 %, so it stays unpublished at the default 2 %.
    let change_percent = (price - region.last_price) * 100.0 / region.last_price;
    (change_percent.abs() > config.min_change_percent).then_some((price, reason, change_percent))
}

/// Prices a batch of regions; returns only the regions whose price moves
/// enough to publish, in index order.
pub fn price(config: &Config, regions: &[RegionLoad]) -> Vec<TariffDecision> {
    regions
        .iter()
        .enumerate()
        .filter_map(|(i, region)| {
            quote(config, region).map(|(price_per_kwh, reason, change_percent)| TariffDecision {
                // A list of more than u32::MAX regions cannot reach a guest.
                index: i as u32,
                price_per_kwh,
                reason,
                change_percent,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(load: f64, base: f64, last: f64) -> RegionLoad {
        RegionLoad {
            load_percentage: load,
            base_price: base,
            last_price: last,
        }
    }

    #[test]
    fn tier_boundaries_belong_to_the_higher_tier() {
        let c = Config::default();
        assert_eq!(c.tier(90.0), (1.20, TariffReason::CriticalLoad));
        assert_eq!(c.tier(89.99), (1.10, TariffReason::HighLoad));
        assert_eq!(c.tier(75.0), (1.10, TariffReason::HighLoad));
        assert_eq!(c.tier(74.99), (1.00, TariffReason::NormalLoad));
        assert_eq!(c.tier(50.0), (1.00, TariffReason::NormalLoad));
        assert_eq!(c.tier(49.99), (0.95, TariffReason::LowLoad));
        assert_eq!(c.tier(f64::NAN), (0.95, TariffReason::LowLoad));
    }

    #[test]
    fn exactly_two_percent_is_not_published() {
        let c = Config::default();
        assert_eq!(quote(&c, &region(60.0, 51.0, 50.0)), None);
        assert_eq!(quote(&c, &region(60.0, 49.0, 50.0)), None);
        let (price, reason, change) = quote(&c, &region(60.0, 51.5, 50.0)).unwrap();
        assert_eq!(
            (price, reason, change),
            (51.5, TariffReason::NormalLoad, 3.0)
        );
    }

    #[test]
    fn no_last_price_always_publishes() {
        let c = Config::default();
        assert_eq!(
            quote(&c, &region(60.0, 6.5, 0.0)),
            Some((6.5, TariffReason::NormalLoad, 0.0))
        );
        assert!(quote(&c, &region(60.0, 6.5, -1.0)).is_some());
    }

    #[test]
    fn price_returns_only_moves_with_their_index() {
        let ds = price(
            &Config::default(),
            &[region(60.0, 6.5, 6.5), region(79.0, 6.5, 6.5)],
        );
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].index, 1);
        assert_eq!(ds[0].reason, TariffReason::HighLoad);
        assert!((ds[0].price_per_kwh - 7.15).abs() < 1e-12);
        assert!((ds[0].change_percent - 10.0).abs() < 1e-9);
    }

    #[test]
    fn config_checks_order() {
        assert_eq!(Config::from_pairs(&[]), Ok(Config::default()));
        let pairs = vec![("high_load_percent".to_owned(), ConfigValue::Integer(95))];
        assert_eq!(
            Config::from_pairs(&pairs),
            Err(
                "config key `critical_load_percent`: must be >= high_load_percent (95), got 90"
                    .to_owned()
            )
        );
    }
}
