//! A hostile anomaly rule, a test fixture of the `dead_letter` fault policy
//! (`host/tests/hot_swap.rs`); never shipped. It finds nothing, and traps in
//! every `detect` call on a batch of at least `trap_from_readings` readings
//! (default: never), so it passes the host's sample batch (8 readings) and
//! fails on the stream's batches.

use segs_plugin_sdk::{ConfigReader, ConfigValue};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// 0: never traps.
    pub trap_from_readings: u32,
}

impl Config {
    pub fn from_pairs(pairs: &[(String, ConfigValue)]) -> Result<Self, String> {
        let mut r = ConfigReader::new(pairs);
        let config = Config {
            trap_from_readings: r.u32_in("trap_from_readings", 0, 0..=u32::MAX)?,
        };
        r.finish()?;
        Ok(config)
    }

    /// Whether a batch of `readings` makes the fixture trap.
    pub fn traps_on(&self, readings: usize) -> bool {
        self.trap_from_readings > 0 && readings >= self.trap_from_readings as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traps_only_from_its_batch_size() {
        let config =
            Config::from_pairs(&[("trap_from_readings".into(), ConfigValue::Integer(9))]).unwrap();
        assert!(!config.traps_on(8));
        assert!(config.traps_on(9));
        assert!(!Config::default().traps_on(100_000));
        assert!(Config::from_pairs(&[("mode".into(), ConfigValue::Integer(1))]).is_err());
    }
}

#[cfg(target_arch = "wasm32")]
mod guest;
