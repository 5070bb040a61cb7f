//! The meter model: which meters exist, what each reads at each tick, and
//! the JSON the seed's simulator would send for it.
//!
//! Every reading is a pure function of (seed, meter, tick) through
//! [`SplitMix64::stream`], so a stream is repeatable, a reading can be
//! re-derived for a re-send, and changing one meter or phase does not
//! reshuffle the others. Must not do I/O or read the clock.

use std::io::Write as _;

use super::rng::SplitMix64;
use super::{MAX_METERS, Mode, Phase, PhaseKind, PhaseTarget, SimConfig, SimError};

const DOMAIN_METER: u64 = 1;
const DOMAIN_READING: u64 = 2;
const DOMAIN_DUPLICATE: u64 = 3;

/// Share of readings with `status: "ERROR"`.
pub const ERROR_RATE: f64 = 0.005;
/// Share of meters that go dark in [`Mode::Outage`].
pub const OUTAGE_SHARE: f64 = 0.25;
/// Readings of a meter in outage are below this (kW).
pub const OUTAGE_MAX_KW: f64 = 0.05;
/// The seed's range of `powerKw` is 0..=20.
pub const MAX_POWER_KW: f64 = 20.0;
/// Per-meter baseLoad is drawn from this range (kW, one decimal).
pub const BASE_LOAD_KW: (f64, f64) = (1.5, 8.0);

struct Meter {
    region: u32,
    base_load: f64,
    outage_prone: bool,
}

enum Target {
    All,
    Meters(std::ops::Range<u32>),
    Region(u32),
}

/// A configured simulator: the meters and the position in the stream.
pub struct Simulator {
    cfg: SimConfig,
    meters: Vec<Meter>,
    /// Each region as a JSON string literal, escaped once.
    region_json: Vec<String>,
    phases: Vec<(Phase, Target)>,
    next_tick: u64,
}

/// One meter as the simulator models it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterInfo<'a> {
    /// 0-based.
    pub index: u32,
    /// `MTR-00000001` for index 0.
    pub id: String,
    /// `USR-…`: two meters per user.
    pub user_id: String,
    pub region: &'a str,
    /// Normal consumption, kW.
    pub base_load: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Error => "ERROR",
        }
    }
}

/// One generated reading (its JSON is written by [`Simulator::write_reading`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SimReading {
    /// 0-based meter index.
    pub meter: u32,
    pub tick: u64,
    /// Per-meter sequence number, from 1.
    pub seq: u64,
    pub timestamp_ms: i64,
    /// A version-4 UUID's bytes.
    pub reading_id: [u8; 16],
    /// kW, 0..=20, 3 decimals.
    pub power_kw: f64,
    /// kWh over the interval, 4 decimals.
    pub energy_kwh: f64,
    /// V, 210..=250, 1 decimal.
    pub voltage: f64,
    pub status: Status,
    /// The label of the last phase applied, if any.
    pub phase: Option<&'static str>,
}

impl SimReading {
    /// `MTR-00000001` for meter 0.
    pub fn meter_id(&self) -> String {
        format!("MTR-{:08}", self.meter + 1)
    }

    /// The reading id in the canonical hyphenated UUID form.
    pub fn reading_id_string(&self) -> String {
        let mut out = Vec::with_capacity(36);
        write_uuid(&self.reading_id, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The readings of every meter for one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub index: u64,
    pub timestamp_ms: i64,
    /// One reading per meter in meter order, then the re-sent duplicates.
    pub readings: Vec<SimReading>,
}

/// One serialized `/telemetry/batch` body.
#[derive(Debug, Clone, PartialEq)]
pub struct SimBatch {
    /// A JSON array of readings.
    pub body: Vec<u8>,
    /// How many readings it holds.
    pub readings: usize,
}

fn round_to(x: f64, scale: f64) -> f64 {
    // `+ 0.0` turns a negative zero into zero.
    (x * scale).round() / scale + 0.0
}

fn write_uuid(b: &[u8; 16], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 0xf)]);
    }
}

impl Simulator {
    /// Checks the config and derives the meters.
    pub fn new(cfg: SimConfig) -> Result<Self, SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        if cfg.meters == 0 || cfg.meters > MAX_METERS {
            return bad(format!(
                "meters must be 1..={MAX_METERS}, got {}",
                cfg.meters
            ));
        }
        if cfg.interval_s == 0 {
            return bad("interval must be at least 1 s".into());
        }
        if cfg.regions.is_empty() || cfg.regions.iter().any(|r| r.is_empty()) {
            return bad("regions must be a non-empty list of non-empty names".into());
        }
        if !(0.0..=1.0).contains(&cfg.duplicate_ratio) {
            return bad(format!(
                "duplicate ratio must be in 0..=1, got {}",
                cfg.duplicate_ratio
            ));
        }
        let mut phases = Vec::with_capacity(cfg.phases.len());
        for (i, p) in cfg.phases.iter().enumerate() {
            if let PhaseKind::Spike { factor } | PhaseKind::Surge { factor } = p.kind {
                if !(factor.is_finite() && factor >= 0.0) {
                    return bad(format!(
                        "phase {i}: factor must be a finite number >= 0, got {factor}"
                    ));
                }
            }
            let target = match &p.target {
                PhaseTarget::All => Target::All,
                PhaseTarget::Meters(r) if r.start < r.end && r.end <= cfg.meters => {
                    Target::Meters(r.clone())
                }
                PhaseTarget::Meters(r) => {
                    return bad(format!(
                        "phase {i}: meter range {r:?} is empty or beyond the {} meters",
                        cfg.meters
                    ));
                }
                PhaseTarget::Region(name) => match cfg.regions.iter().position(|r| r == name) {
                    Some(idx) => Target::Region(idx as u32),
                    None => return bad(format!("phase {i}: unknown region {name:?}")),
                },
            };
            phases.push((p.clone(), target));
        }
        let n_regions = cfg.regions.len() as u32;
        let meters = (0..cfg.meters)
            .map(|i| {
                let mut rng = SplitMix64::stream(cfg.seed, &[DOMAIN_METER, u64::from(i)]);
                let base_load = round_to(rng.range(BASE_LOAD_KW.0, BASE_LOAD_KW.1), 10.0);
                let outage_prone = rng.next_f64() < OUTAGE_SHARE;
                Meter {
                    region: i % n_regions,
                    base_load,
                    outage_prone,
                }
            })
            .collect();
        let region_json = cfg
            .regions
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_else(|_| "\"\"".into()))
            .collect();
        Ok(Simulator {
            cfg,
            meters,
            region_json,
            phases,
            next_tick: 0,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Meter `index` (0-based), if it exists.
    pub fn meter(&self, index: u32) -> Option<MeterInfo<'_>> {
        let m = self.meters.get(index as usize)?;
        Some(MeterInfo {
            index,
            id: format!("MTR-{:08}", index + 1),
            user_id: format!("USR-{:08}", index / 2 + 1),
            region: &self.cfg.regions[m.region as usize],
            base_load: m.base_load,
        })
    }

    /// Sum of the base loads of the region's meters (kW): its normal-mode
    /// load, before noise and phases.
    pub fn region_base_load(&self, region: &str) -> f64 {
        let Some(idx) = self.cfg.regions.iter().position(|r| r == region) else {
            return 0.0;
        };
        self.meters
            .iter()
            .filter(|m| m.region as usize == idx)
            .map(|m| m.base_load)
            .sum()
    }

    /// The tick [`Self::next_tick`] will produce.
    pub fn next_tick_index(&self) -> u64 {
        self.next_tick
    }

    /// Event time of tick `tick`.
    pub fn timestamp_ms(&self, tick: u64) -> i64 {
        let step = i64::from(self.cfg.interval_s) * 1000;
        self.cfg
            .start_ms
            .saturating_add(step.saturating_mul(i64::try_from(tick).unwrap_or(i64::MAX)))
    }

    /// What meter `meter` reads at tick `tick` (pure: the same every call),
    /// if the meter exists.
    pub fn reading(&self, meter: u32, tick: u64) -> Option<SimReading> {
        Some(self.generate(meter, self.meters.get(meter as usize)?, tick))
    }

    fn generate(&self, meter: u32, m: &Meter, tick: u64) -> SimReading {
        let mut rng = SplitMix64::stream(self.cfg.seed, &[DOMAIN_READING, u64::from(meter), tick]);
        // A fixed number of draws in a fixed order: changing the mode or a
        // phase changes nothing else about the reading.
        let mut reading_id = rng.bytes16();
        reading_id[6] = (reading_id[6] & 0x0f) | 0x40;
        reading_id[8] = (reading_id[8] & 0x3f) | 0x80;
        let noise = rng.range(-0.1, 0.1);
        let peak = rng.range(1.5, 2.0);
        let dark = rng.range(0.0, OUTAGE_MAX_KW);
        let volt = rng.range(-15.0, 15.0);
        let status = if rng.next_f64() < ERROR_RATE {
            Status::Error
        } else {
            Status::Ok
        };

        let mut power = match self.cfg.mode {
            Mode::Peak => m.base_load * peak,
            Mode::Outage if m.outage_prone => dark,
            Mode::Normal | Mode::Outage => m.base_load * (1.0 + noise),
        };
        let mut phase = None;
        for (p, target) in &self.phases {
            let hit = match target {
                Target::All => true,
                Target::Meters(r) => r.contains(&meter),
                Target::Region(r) => *r == m.region,
            };
            if hit && p.is_active(tick) {
                phase = Some(p.kind.label());
                match p.kind {
                    PhaseKind::Spike { factor } | PhaseKind::Surge { factor } => power *= factor,
                    PhaseKind::Outage => power = dark,
                }
            }
        }
        let power_kw = round_to(power.clamp(0.0, MAX_POWER_KW), 1000.0);
        SimReading {
            meter,
            tick,
            seq: tick + 1,
            timestamp_ms: self.timestamp_ms(tick),
            reading_id,
            power_kw,
            energy_kwh: round_to(power_kw * f64::from(self.cfg.interval_s) / 3600.0, 10_000.0),
            voltage: round_to((230.0 + volt).clamp(210.0, 250.0), 10.0),
            status,
            phase,
        }
    }

    /// The readings of every meter for the next interval, followed by the
    /// re-sent duplicates (`duplicate_ratio`).
    pub fn next_tick(&mut self) -> Tick {
        let tick = self.next_tick;
        self.next_tick += 1;
        let n = self.cfg.meters;
        let ratio = self.cfg.duplicate_ratio;
        let extra = (f64::from(n) * ratio * 1.2) as usize;
        let mut readings = Vec::with_capacity(n as usize + extra);
        readings.extend(
            (0..n)
                .zip(&self.meters)
                .map(|(i, m)| self.generate(i, m, tick)),
        );
        if ratio > 0.0 {
            for i in 0..n {
                let u = SplitMix64::stream(self.cfg.seed, &[DOMAIN_DUPLICATE, u64::from(i), tick])
                    .next_f64();
                if u < ratio {
                    readings.push(readings[i as usize].clone());
                }
            }
        }
        Tick {
            index: tick,
            timestamp_ms: self.timestamp_ms(tick),
            readings,
        }
    }

    /// The next tick as `/telemetry/batch` bodies of at most `max_batch`
    /// readings each.
    pub fn next_batches(&mut self, max_batch: usize) -> Vec<SimBatch> {
        let tick = self.next_tick();
        tick.readings
            .chunks(max_batch.max(1))
            .map(|chunk| {
                let mut body = Vec::with_capacity(chunk.len() * 340 + 2);
                self.write_batch(chunk, &mut body);
                SimBatch {
                    body,
                    readings: chunk.len(),
                }
            })
            .collect()
    }

    /// Appends `readings` as a JSON array. The readings must come from this
    /// simulator (panics on an unknown meter).
    pub fn write_batch(&self, readings: &[SimReading], out: &mut Vec<u8>) {
        out.push(b'[');
        let mut ts = (i64::MIN, String::with_capacity(24));
        for (i, r) in readings.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if ts.0 != r.timestamp_ms {
                ts.1.clear();
                crate::time::write_rfc3339_ms(&mut ts.1, r.timestamp_ms);
                ts.0 = r.timestamp_ms;
            }
            self.write_with_timestamp(r, &ts.1, out);
        }
        out.push(b']');
    }

    /// Appends one reading as the seed's `TelemetryReading` JSON object.
    /// `r` must come from this simulator (panics on an unknown meter).
    pub fn write_reading(&self, r: &SimReading, out: &mut Vec<u8>) {
        self.write_with_timestamp(r, &crate::time::format_rfc3339_ms(r.timestamp_ms), out);
    }

    fn write_with_timestamp(&self, r: &SimReading, ts: &str, out: &mut Vec<u8>) {
        let m = &self.meters[r.meter as usize];
        let n = r.meter + 1;
        out.extend_from_slice(b"{\"readingId\":\"");
        write_uuid(&r.reading_id, out);
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "\",\"meterId\":\"MTR-{n:08}\",\"userId\":\"USR-{:08}\",\"timestamp\":\"{ts}\",\
             \"powerKw\":{},\"energyKwh\":{},\"voltage\":{},\"region\":",
            n.div_ceil(2),
            r.power_kw,
            r.energy_kwh,
            r.voltage,
        );
        out.extend_from_slice(self.region_json[m.region as usize].as_bytes());
        let _ = write!(
            out,
            ",\"seq\":{},\"status\":\"{}\",\"metadata\":{{\"mode\":\"{}\",\"baseLoad\":{}",
            r.seq,
            r.status.as_str(),
            self.cfg.mode.as_str(),
            m.base_load,
        );
        if let Some(p) = r.phase {
            let _ = write!(out, ",\"phase\":\"{p}\"");
        }
        out.extend_from_slice(b"}}");
    }
}
