//! The built-in meter simulator behind `segs simulate` and `segs run`'s demo
//! feed: virtual smart meters that produce the seed's `TelemetryReading`s and
//! post them to `/telemetry/batch`.
//!
//! Owns the meter model (ids, users, regions, base loads, modes, scripted
//! phases), its deterministic random numbers and the HTTP sender. Event time
//! is simulated (tick `k` is stamped `start_ms + k × interval`), never read
//! from the wall clock, so tests can run hours of grid in seconds; with the
//! same config and seed the bytes sent are identical across runs and
//! versions. The one tie to the clock: the sender never sends a tick before
//! the wall clock reaches its event time (segs refuses readings dated ahead
//! of its clock), so an accelerated run that catches up with the clock goes
//! on in real time. An accelerated demo therefore starts in the past
//! ([`demo_start_ms`]).
//!
//! Must not: reach into ingest, the bus or the stores (it is a client of the
//! HTTP API like any external meter), or use a random source other than
//! [`rng`].

mod model;
pub mod rng;
mod sender;

use std::ops::Range;
use std::str::FromStr;

pub use model::{
    BASE_LOAD_KW, ERROR_RATE, MAX_POWER_KW, MeterInfo, OUTAGE_MAX_KW, OUTAGE_SHARE, SimBatch,
    SimReading, Simulator, Status, Tick,
};
pub use sender::{SendTarget, SimStats, SimSummary, run};

/// Regions used when none are configured.
pub const DEFAULT_REGIONS: [&str; 4] = [
    "Mumbai-North",
    "Delhi-South",
    "Bangalore-East",
    "Chennai-West",
];

/// The largest meter count the id format `MTR-00000001` can name.
pub const MAX_METERS: u32 = 99_999_999;

/// Everything that determines the generated stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Number of virtual meters, `MTR-00000001` upwards.
    pub meters: u32,
    /// Seconds of simulated time between two readings of a meter.
    pub interval_s: u32,
    /// The global simulation mode.
    pub mode: Mode,
    /// Seed of every random choice; same seed, same bytes.
    pub seed: u64,
    /// Meter `i` (0-based) is in `regions[i % regions.len()]`.
    pub regions: Vec<String>,
    /// Event time of tick 0, epoch milliseconds.
    pub start_ms: i64,
    /// Scripted episodes (see [`default_phases`]).
    pub phases: Vec<Phase>,
    /// Share of readings (0..=1) sent a second time in the same tick, to
    /// exercise dedupe.
    pub duplicate_ratio: f64,
}

impl Default for SimConfig {
    /// 100 meters every 10 s in normal mode, seed 1, the default regions,
    /// starting now (floored to the interval), no phases, no duplicates.
    fn default() -> Self {
        let interval_s = 10;
        SimConfig {
            meters: 100,
            interval_s,
            mode: Mode::Normal,
            seed: 1,
            regions: DEFAULT_REGIONS.iter().map(|r| r.to_string()).collect(),
            start_ms: crate::time::window_start(
                crate::time::now_ms(),
                i64::from(interval_s) * 1000,
            ),
            phases: Vec::new(),
            duplicate_ratio: 0.0,
        }
    }
}

/// The seed's simulation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// baseLoad ± 10 %.
    #[default]
    Normal,
    /// baseLoad × 1.5–2.
    Peak,
    /// About a quarter of the meters (a fixed set per seed) read near zero;
    /// the rest read normally.
    Outage,
}

impl Mode {
    /// The wire name, as in the seed's `metadata.mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Peak => "peak",
            Mode::Outage => "outage",
        }
    }
}

impl FromStr for Mode {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, SimError> {
        match s {
            "normal" => Ok(Mode::Normal),
            "peak" => Ok(Mode::Peak),
            "outage" => Ok(Mode::Outage),
            _ => Err(SimError::Config(format!(
                "unknown mode {s:?} (expected normal, peak or outage)"
            ))),
        }
    }
}

/// A scripted episode: from tick `from_tick` for `ticks` ticks, apply `kind`
/// to `target`. Phases apply in order on top of the mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub from_tick: u64,
    pub ticks: u64,
    pub kind: PhaseKind,
    pub target: PhaseTarget,
}

impl Phase {
    pub fn is_active(&self, tick: u64) -> bool {
        tick >= self.from_tick && tick - self.from_tick < self.ticks
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PhaseKind {
    /// Power × `factor` on the target meters (an anomaly SPIKE when
    /// `factor` > 2).
    Spike { factor: f64 },
    /// Power near zero (< 0.05 kW): an anomaly OUTAGE.
    Outage,
    /// Power × `factor` on a whole region, to push its load percentage up
    /// (overload alert, tariff move) without per-meter spikes (keep `factor`
    /// below 2).
    Surge { factor: f64 },
}

impl PhaseKind {
    /// The name written to `metadata.phase` of affected readings.
    pub fn label(&self) -> &'static str {
        match self {
            PhaseKind::Spike { .. } => "spike",
            PhaseKind::Outage => "outage",
            PhaseKind::Surge { .. } => "surge",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PhaseTarget {
    All,
    /// 0-based meter indices: meter `i` is `MTR-{i+1:08}`.
    Meters(Range<u32>),
    /// Every meter of the region.
    Region(String),
}

/// How far before the clock an accelerated demo starts: an hour of
/// simulated grid can run faster than real time before the simulator
/// catches up with the clock (well inside ingest's default
/// `max_reading_age_s` of 7 days).
pub const DEMO_HEAD_START_MS: i64 = 3_600_000;

/// Tick 0 of an accelerated demo started at `now_ms`: [`DEMO_HEAD_START_MS`]
/// earlier, floored to 15 minutes so that 15-minute windows start with it.
/// The scripted phases ([`default_phases`]) are offsets from tick 0, so
/// they play out within the first simulated minutes whatever the start.
pub fn demo_start_ms(now_ms: i64) -> i64 {
    crate::time::window_start(
        now_ms - DEMO_HEAD_START_MS,
        crate::windows::FIFTEEN_MINUTES_MS,
    )
}

/// Power factor of the demo surge: load × 1.7, enough to take a region from
/// ~60 % to ~100 % of capacity, and below the anomaly spike threshold
/// (+100 %) so the surge itself raises no per-meter alerts.
pub const DEMO_SURGE_FACTOR: f64 = 1.7;
/// Power factor of the demo spike: +300 %, a high-severity SPIKE.
pub const DEMO_SPIKE_FACTOR: f64 = 4.0;

/// The demo script used by `segs run`: with the default 10 s interval,
/// within the first few simulated minutes
/// - `regions[0]` surges (× [`DEMO_SURGE_FACTOR`]) from minute 2 to minute 8,
///   i.e. for six full 1-minute regional windows (overload, tariff up, then
///   back down);
/// - a meter outside `regions[0]` spikes (× [`DEMO_SPIKE_FACTOR`]) for 2 ticks
///   from minute 3;
/// - another meter outside `regions[0]` has an outage for a minute from
///   minute 4.
///
/// The spike and the outage start no earlier than tick 12, so that the
/// anomaly baseline (10 readings) exists. Meters that do not exist are left
/// out.
pub fn default_phases(meters: u32, regions: &[String], interval_s: u32) -> Vec<Phase> {
    let per_min = u64::from((60 / interval_s.max(1)).max(1));
    let warm = 12;
    let n_regions = regions.len().max(1) as u32;
    let outside_first_region = |skip: Option<u32>| {
        (0..meters)
            .find(|&i| (n_regions == 1 || i % n_regions != 0) && Some(i) != skip)
            .or_else(|| (0..meters).find(|&i| Some(i) != skip))
    };
    let mut phases = Vec::new();
    if let Some(region) = regions.first() {
        phases.push(Phase {
            from_tick: 2 * per_min,
            ticks: 6 * per_min,
            kind: PhaseKind::Surge {
                factor: DEMO_SURGE_FACTOR,
            },
            target: PhaseTarget::Region(region.clone()),
        });
    }
    let spike = outside_first_region(None);
    if let Some(m) = spike {
        phases.push(Phase {
            from_tick: (3 * per_min).max(warm),
            ticks: 2,
            kind: PhaseKind::Spike {
                factor: DEMO_SPIKE_FACTOR,
            },
            target: PhaseTarget::Meters(m..m + 1),
        });
    }
    if let Some(m) = outside_first_region(spike) {
        phases.push(Phase {
            from_tick: (4 * per_min).max(warm),
            ticks: per_min.max(3),
            kind: PhaseKind::Outage,
            target: PhaseTarget::Meters(m..m + 1),
        });
    }
    phases
}

/// Simulator failures. HTTP error statuses are not errors of the run: they
/// are counted in [`SimStats`] and the run goes on.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulator config: {0}")]
    Config(String),
    #[error("invalid target URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("cannot reach {url} after {attempts} attempts")]
    Unreachable {
        url: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
}

#[cfg(test)]
mod tests;
