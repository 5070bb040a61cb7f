//! A hostile tariff rule, a test fixture for the host's sandbox and hot
//! swap (`host/tests/hot_swap.rs`); never shipped. It prices by the
//! tariff rule's default tiers (a copy, not the `tariff` crate, whose
//! component exports would clash with these) and misbehaves as its config
//! says:
//!
//! - `mode`: `none` | `trap` | `loop` | `alloc` (trap, spin forever or
//!   allocate without bound) | `nan` (NaN prices) | `bad_index` (an index
//!   past the batch) | `refuse` (refuses its config).
//! - `band_from`, `band_to`: `trap`, `loop` and `alloc` misbehave only in
//!   calls with a region whose load is inside this band (default: every
//!   call), so a fixture can pass the host's sample batch and fail on the
//!   stream.

use segs_plugin_sdk::{ConfigReader, ConfigValue};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: String,
    pub band_from: f64,
    pub band_to: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: "none".into(),
            band_from: f64::NEG_INFINITY,
            band_to: f64::INFINITY,
        }
    }
}

impl Config {
    pub fn from_pairs(pairs: &[(String, ConfigValue)]) -> Result<Self, String> {
        let d = Config::default();
        let mut r = ConfigReader::new(pairs);
        let config = Config {
            mode: r.text("mode", &d.mode)?,
            band_from: r.f64("band_from", -1e300)?,
            band_to: r.f64("band_to", 1e300)?,
        };
        r.finish()?;
        if config.mode == "refuse" {
            return Err("config key `mode`: this fixture refuses every config".into());
        }
        Ok(config)
    }

    fn in_band(&self, loads: &[f64]) -> bool {
        loads
            .iter()
            .any(|l| *l >= self.band_from && *l <= self.band_to)
    }
}

/// A region's load and prices (WIT `region-load`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionLoad {
    pub load_percentage: f64,
    pub base_price: f64,
    pub last_price: f64,
}

/// WIT `tariff-reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TariffReason {
    LowLoad,
    NormalLoad,
    HighLoad,
    CriticalLoad,
}

/// WIT `tariff-decision`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TariffDecision {
    pub index: u32,
    pub price_per_kwh: f64,
    pub reason: TariffReason,
    pub change_percent: f64,
}

/// The tariff rule's default tiers, publishing moves over 2 %.
fn honest_price(regions: &[RegionLoad]) -> Vec<TariffDecision> {
    regions
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let (m, reason) = match r.load_percentage {
                l if l >= 90.0 => (1.20, TariffReason::CriticalLoad),
                l if l >= 75.0 => (1.10, TariffReason::HighLoad),
                l if l >= 50.0 => (1.00, TariffReason::NormalLoad),
                _ => (0.95, TariffReason::LowLoad),
            };
            let price = r.base_price * m;
            let change = (price - r.last_price) / r.last_price * 100.0;
            (change.abs() > 2.0).then_some(TariffDecision {
                index: i as u32,
                price_per_kwh: price,
                reason,
                change_percent: change,
            })
        })
        .collect()
}

/// Prices like the tariff rule, then misbehaves as configured.
pub fn price(config: &Config, regions: &[RegionLoad]) -> Vec<TariffDecision> {
    let loads: Vec<f64> = regions.iter().map(|r| r.load_percentage).collect();
    let in_band = config.in_band(&loads);
    match config.mode.as_str() {
        "trap" if in_band => panic!("hostile fixture: trap in band"),
        "loop" if in_band => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "alloc" if in_band => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        _ => {}
    }
    let mut out = honest_price(regions);
    match config.mode.as_str() {
        "nan" => out.iter_mut().for_each(|d| d.price_per_kwh = f64::NAN),
        "bad_index" => out.push(TariffDecision {
            index: regions.len() as u32,
            price_per_kwh: 1.0,
            reason: TariffReason::LowLoad,
            change_percent: 0.0,
        }),
        _ => {}
    }
    out
}

#[cfg(target_arch = "wasm32")]
mod guest;
