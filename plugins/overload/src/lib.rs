//! The overload rule: a region whose load stays above a threshold for
//! several consecutive 1-minute windows raises one critical alert.
//!
//! For each closed regional window, the new consecutive count is the host-kept
//! count plus one when `load_percentage > threshold_percent` (strict), else 0.
//! An alert is raised exactly when the new count reaches
//! `consecutive_windows`: one alert per incident, not one per window; a
//! window at or under the threshold ends the incident.
//!
//! The rule is a pure function of the windows and the config: it does no I/O
//! and keeps no state across calls (the host keeps the consecutive counts and
//! passes them in). The Wasm glue lives in `guest.rs`; this file is plain
//! Rust, tested natively.

use segs_plugin_sdk::{ConfigReader, ConfigValue, Severity};

#[cfg(target_arch = "wasm32")]
mod guest;

/// The rule's thresholds, from the plugin's config table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// A window whose load percentage is above this is overloaded.
    pub threshold_percent: f64,
    /// How many overloaded windows in a row raise the alert (>= 1).
    pub consecutive_windows: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            threshold_percent: 90.0,
            consecutive_windows: 2,
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
            threshold_percent: r.f64_at_least("threshold_percent", d.threshold_percent, 0.0)?,
            consecutive_windows: r.u32_in(
                "consecutive_windows",
                d.consecutive_windows,
                1..=u32::MAX,
            )?,
        };
        r.finish()?;
        Ok(config)
    }
}

/// One closed regional window with the host-kept state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionWindow {
    pub load_percentage: f64,
    /// Total consumption in the window, kW.
    pub total_consumption: f64,
    /// The region's capacity, kW.
    pub capacity_kw: f64,
    /// Consecutive overloaded windows before this one.
    pub consecutive: u32,
}

/// An overload alert.
#[derive(Debug, Clone, PartialEq)]
pub struct OverloadAlert {
    pub severity: Severity,
    pub message: String,
}

/// The rule's answer for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct OverloadDecision {
    /// The new consecutive count, for the host to keep.
    pub consecutive: u32,
    pub alert: Option<OverloadAlert>,
}

/// Decides one window.
pub fn decide(config: &Config, window: &RegionWindow) -> OverloadDecision {
    let consecutive = if window.load_percentage > config.threshold_percent {
        // Saturating: a region overloaded for 2^32 minutes stays "still
        // overloaded" rather than wrapping into a new incident.
        window.consecutive.saturating_add(1)
    } else {
        0
    };
    let alert = (consecutive == config.consecutive_windows).then(|| OverloadAlert {
        severity: Severity::Critical,
        message: format!(
            "Regional grid overload: {:.1}% capacity for {consecutive} consecutive window{} \
             (total {:.2} kW of {:.2} kW)",
            window.load_percentage,
            if consecutive == 1 { "" } else { "s" },
            window.total_consumption,
            window.capacity_kw
        ),
    });
    OverloadDecision { consecutive, alert }
}

/// Decides a batch of windows: one decision per window, same order.
pub fn evaluate(config: &Config, windows: &[RegionWindow]) -> Vec<OverloadDecision> {
    windows.iter().map(|w| decide(config, w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(load: f64, consecutive: u32) -> RegionWindow {
        RegionWindow {
            load_percentage: load,
            total_consumption: load / 100.0 * 320_000.0,
            capacity_kw: 320_000.0,
            consecutive,
        }
    }

    #[test]
    fn one_alert_per_incident() {
        let c = Config::default();
        let first = decide(&c, &window(92.0, 0));
        assert_eq!((first.consecutive, first.alert.is_some()), (1, false));
        let second = decide(&c, &window(92.0, 1));
        assert_eq!(second.consecutive, 2);
        let alert = second.alert.expect("alert on the 2nd window");
        assert_eq!(alert.severity, Severity::Critical);
        assert_eq!(
            alert.message,
            "Regional grid overload: 92.0% capacity for 2 consecutive windows \
             (total 294400.00 kW of 320000.00 kW)"
        );
        let third = decide(&c, &window(95.0, 2));
        assert_eq!((third.consecutive, third.alert.is_some()), (3, false));
        let reset = decide(&c, &window(50.0, 3));
        assert_eq!((reset.consecutive, reset.alert.is_some()), (0, false));
    }

    #[test]
    fn exactly_the_threshold_is_not_overloaded() {
        let d = decide(&Config::default(), &window(90.0, 5));
        assert_eq!((d.consecutive, d.alert), (0, None));
    }

    #[test]
    fn single_window_incidents() {
        let c = Config {
            consecutive_windows: 1,
            ..Config::default()
        };
        assert!(decide(&c, &window(91.0, 0)).alert.is_some());
        assert!(decide(&c, &window(91.0, 1)).alert.is_none());
    }

    #[test]
    fn count_saturates() {
        let d = decide(&Config::default(), &window(99.0, u32::MAX));
        assert_eq!((d.consecutive, d.alert), (u32::MAX, None));
    }

    #[test]
    fn nan_load_is_not_overloaded() {
        assert_eq!(
            decide(&Config::default(), &window(f64::NAN, 1)).consecutive,
            0
        );
    }

    #[test]
    fn evaluate_keeps_order() {
        let ds = evaluate(
            &Config::default(),
            &[window(92.0, 1), window(10.0, 4), window(92.0, 0)],
        );
        let counts: Vec<_> = ds.iter().map(|d| d.consecutive).collect();
        assert_eq!(counts, [2, 0, 1]);
        assert!(ds[0].alert.is_some());
    }

    #[test]
    fn config() {
        assert_eq!(Config::from_pairs(&[]), Ok(Config::default()));
        let pairs = vec![("consecutive_windows".to_owned(), ConfigValue::Integer(0))];
        assert_eq!(
            Config::from_pairs(&pairs),
            Err("config key `consecutive_windows`: must be >= 1, got 0".to_owned())
        );
    }
}
