//! Windows: the hot path. Tumbling 1-minute and 15-minute windows per meter
//! by event time, the per-meter baseline the anomaly rule compares against,
//! and the regional 1-minute sums derived from the per-meter windows.
//!
//! Architecture Invariant: this module does no I/O and never calls Wasm. It
//! folds readings into sums and hands closed windows back to its caller (the
//! stream stage), which runs the plugins on whole batches and stores and
//! publishes the results.
//!
//! Per reading the cost is one hash lookup of the meter id (interned to a
//! dense index the first time it is seen; that is the only allocation) and
//! two array updates; no allocation, no lock.
//!
//! Closing: a window `[start, start + width)` closes when the watermark —
//! the newest event time seen minus the allowed lateness — reaches its end
//! ([`Windows::advance`]), when the stream has been idle for that width's
//! flush interval (`FLUSH_INTERVAL_1M` / `FLUSH_INTERVAL_15M`;
//! [`Windows::close_width`]), or at shutdown ([`Windows::close_all`]). A
//! reading for a window that has already closed is still counted: it opens a
//! *late* window of that start, which closes at the next advance and is merged
//! into the stored row by the store (sums add up). Late windows do not revise
//! the regional aggregate of their minute, which has been published already;
//! they are counted in [`WindowStats::late_readings`].
//!
//! Event time is trusted: ingest refuses readings dated more than
//! `[ingest] max_clock_skew_s` ahead of the server clock or more than
//! `max_reading_age_s` behind it, so one reading can move the watermark at
//! most that far ahead of the clock. Records from other producers (a
//! future Kafka bus) must be held to the same bounds before they get here.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// Dense index of a meter, assigned on first sight.
pub type MeterIdx = u32;
/// Dense index of a region, assigned on first sight.
pub type RegionIdx = u32;

pub const ONE_MINUTE_MS: i64 = 60_000;
pub const FIFTEEN_MINUTES_MS: i64 = 900_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Width {
    OneMinute,
    FifteenMinutes,
}

impl Width {
    pub fn ms(self) -> i64 {
        match self {
            Width::OneMinute => ONE_MINUTE_MS,
            Width::FifteenMinutes => FIFTEEN_MINUTES_MS,
        }
    }
}

/// Running sums of one meter's window (the seed's `AggregateWindow`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sums {
    pub count: u32,
    pub power_sum: f64,
    pub max_power: f64,
    pub min_power: f64,
    pub energy_sum: f64,
    pub voltage_sum: f64,
    pub voltage_count: u32,
}

impl Sums {
    const EMPTY: Sums = Sums {
        count: 0,
        power_sum: 0.0,
        max_power: f64::NEG_INFINITY,
        min_power: f64::INFINITY,
        energy_sum: 0.0,
        voltage_sum: 0.0,
        voltage_count: 0,
    };

    #[inline]
    fn add(&mut self, power_kw: f64, energy_kwh: Option<f64>, voltage: Option<f64>) {
        self.count += 1;
        self.power_sum += power_kw;
        self.max_power = self.max_power.max(power_kw);
        self.min_power = self.min_power.min(power_kw);
        self.energy_sum += energy_kwh.unwrap_or(0.0);
        if let Some(v) = voltage {
            self.voltage_sum += v;
            self.voltage_count += 1;
        }
    }

    pub fn avg_power(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.power_sum / f64::from(self.count)
        }
    }
}

/// One meter's slot in a closed window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeterSums {
    pub meter: MeterIdx,
    pub region: RegionIdx,
    pub sums: Sums,
}

/// A window of one width and start, closed: every meter that reported in it.
#[derive(Debug, Clone)]
pub struct ClosedWindow {
    pub width: Width,
    pub start_ms: i64,
    /// Opened after its start had already closed: merge, don't replace.
    pub late: bool,
    pub meters: Vec<MeterSums>,
}

/// The regional sums of a closed (on-time) 1-minute window, per region.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSums {
    pub region: RegionIdx,
    pub meter_count: u32,
    /// Sum over meters of their average power in the window, kW.
    pub total_kw: f64,
    pub max_kw: f64,
    pub min_kw: f64,
    /// The meters that reported, by meter id.
    pub meters: Vec<MeterIdx>,
}

/// What a reading meant to the anomaly rule: the meter's baseline before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub meter: MeterIdx,
    pub region: RegionIdx,
    pub baseline_kw: f64,
    pub sample_count: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowStats {
    pub readings: u64,
    pub late_readings: u64,
    pub meters: u32,
    pub open_windows: u32,
}

/// Parameters of the windows, from `[windows]` in pipeline.toml.
#[derive(Debug, Clone, Copy)]
pub struct WindowsParams {
    pub allowed_lateness_ms: i64,
    pub baseline_window: u32,
}

/// The open windows of one width, by start.
#[derive(Default)]
struct OpenWindows {
    by_start: BTreeMap<i64, WindowSet>,
    /// Every window ending at or before this has been closed once.
    closed_until: i64,
}

struct WindowSet {
    late: bool,
    /// `slot[meter]` is the index in `meters`, or `u32::MAX`.
    slot: Vec<u32>,
    meters: Vec<MeterSums>,
}

impl WindowSet {
    fn new(late: bool, meters_known: usize) -> WindowSet {
        WindowSet {
            late,
            slot: vec![u32::MAX; meters_known],
            meters: Vec::new(),
        }
    }

    #[inline]
    fn sums(&mut self, meter: MeterIdx, region: RegionIdx) -> &mut Sums {
        let m = meter as usize;
        if m >= self.slot.len() {
            self.slot.resize(m + 1, u32::MAX);
        }
        let mut s = self.slot[m];
        if s == u32::MAX {
            s = self.meters.len() as u32;
            self.slot[m] = s;
            self.meters.push(MeterSums {
                meter,
                region,
                sums: Sums::EMPTY,
            });
        }
        &mut self.meters[s as usize].sums
    }
}

impl OpenWindows {
    #[inline]
    fn set_for(&mut self, start: i64, width: i64, meters_known: usize) -> &mut WindowSet {
        let late = start + width <= self.closed_until;
        self.by_start
            .entry(start)
            .or_insert_with(|| WindowSet::new(late, meters_known))
    }

    fn close_through(&mut self, width: Width, until: i64, out: &mut Vec<ClosedWindow>) {
        let w = width.ms();
        while let Some(entry) = self.by_start.first_entry() {
            if *entry.key() + w > until {
                break;
            }
            let (start, set) = entry.remove_entry();
            out.push(ClosedWindow {
                width,
                start_ms: start,
                late: set.late,
                meters: set.meters,
            });
        }
        self.closed_until = self.closed_until.max(until - until.rem_euclid(w));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Baseline {
    mean: f64,
    samples: u32,
}

/// Everything [`Windows`] holds, as plain data: what the stream stage
/// checkpoints with its bus positions, so that a restart resumes with the
/// same open windows and baselines instead of losing or re-counting them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    meter_names: Vec<Box<str>>,
    region_names: Vec<Box<str>>,
    baselines: Vec<Baseline>,
    one_minute: OpenSnapshot,
    fifteen_minutes: OpenSnapshot,
    max_event_ms: i64,
    stats: WindowStats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenSnapshot {
    closed_until: i64,
    /// (start, late, meters) of every open window.
    windows: Vec<(i64, bool, Vec<MeterSums>)>,
}

/// A [`Snapshot`] borrowed from the live windows: it serializes to the same
/// bytes as the owned snapshot of the same windows (so it decodes as one;
/// the windows' tests compare the two), without copying every open window
/// first. What checkpoints encode.
#[derive(Serialize)]
pub struct SnapshotRef<'a> {
    meter_names: &'a [Box<str>],
    region_names: &'a [Box<str>],
    baselines: &'a [Baseline],
    one_minute: OpenRef<'a>,
    fifteen_minutes: OpenRef<'a>,
    max_event_ms: i64,
    stats: WindowStats,
}

/// [`OpenSnapshot`], borrowed.
#[derive(Serialize)]
struct OpenRef<'a> {
    closed_until: i64,
    windows: WindowSetsRef<'a>,
}

/// The open windows as [`OpenSnapshot::windows`] holds them: a sequence of
/// (start, late, meters).
struct WindowSetsRef<'a>(&'a BTreeMap<i64, WindowSet>);

impl Serialize for WindowSetsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.0
                .iter()
                .map(|(start, set)| (*start, set.late, &set.meters)),
        )
    }
}

/// A snapshot that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("window snapshot unreadable: {0}")]
pub struct SnapshotError(pub String);

impl Snapshot {
    /// A compact binary encoding (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("snapshots serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let s: Snapshot = postcard::from_bytes(bytes).map_err(|e| SnapshotError(e.to_string()))?;
        s.check()?;
        Ok(s)
    }

    /// Refuses a snapshot whose windows name meters or regions it lacks.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let s = self;
        let meters = s.meter_names.len();
        let regions = s.region_names.len();
        let valid = s.baselines.len() == meters
            && [&s.one_minute, &s.fifteen_minutes].iter().all(|o| {
                o.windows.iter().all(|(_, _, ms)| {
                    ms.iter()
                        .all(|m| (m.meter as usize) < meters && (m.region as usize) < regions)
                })
            });
        if !valid {
            return Err(SnapshotError(
                "a window refers to a meter or region it does not name".into(),
            ));
        }
        Ok(())
    }
}

impl OpenWindows {
    #[cfg(test)]
    fn snapshot(&self) -> OpenSnapshot {
        OpenSnapshot {
            closed_until: self.closed_until,
            windows: self
                .by_start
                .iter()
                .map(|(start, set)| (*start, set.late, set.meters.clone()))
                .collect(),
        }
    }

    fn snapshot_ref(&self) -> OpenRef<'_> {
        OpenRef {
            closed_until: self.closed_until,
            windows: WindowSetsRef(&self.by_start),
        }
    }

    fn restore(s: OpenSnapshot, meters_known: usize) -> OpenWindows {
        let mut by_start = BTreeMap::new();
        for (start, late, meters) in s.windows {
            let mut set = WindowSet::new(late, meters_known);
            for (i, m) in meters.iter().enumerate() {
                set.slot[m.meter as usize] = i as u32;
            }
            set.meters = meters;
            by_start.insert(start, set);
        }
        OpenWindows {
            by_start,
            closed_until: s.closed_until,
        }
    }
}

/// Per-meter windows and baselines for the meters of one stream worker.
pub struct Windows {
    params: WindowsParams,
    meter_ids: FxHashMap<Box<str>, MeterIdx>,
    meter_names: Vec<Box<str>>,
    baselines: Vec<Baseline>,
    region_ids: FxHashMap<Box<str>, RegionIdx>,
    region_names: Vec<Box<str>>,
    one_minute: OpenWindows,
    fifteen_minutes: OpenWindows,
    max_event_ms: i64,
    stats: WindowStats,
}

impl Windows {
    pub fn new(params: WindowsParams) -> Windows {
        Windows {
            params,
            meter_ids: FxHashMap::default(),
            meter_names: Vec::new(),
            baselines: Vec::new(),
            region_ids: FxHashMap::default(),
            region_names: Vec::new(),
            one_minute: OpenWindows::default(),
            fifteen_minutes: OpenWindows::default(),
            max_event_ms: i64::MIN,
            stats: WindowStats::default(),
        }
    }

    /// Everything held, as plain data (see [`Snapshot`]): for tests, to
    /// compare a restore with the original; checkpoints encode
    /// [`Windows::snapshot_ref`] instead.
    #[cfg(test)]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            meter_names: self.meter_names.clone(),
            region_names: self.region_names.clone(),
            baselines: self.baselines.clone(),
            one_minute: self.one_minute.snapshot(),
            fifteen_minutes: self.fifteen_minutes.snapshot(),
            max_event_ms: self.max_event_ms,
            stats: self.stats,
        }
    }

    /// Everything held, borrowed, to encode as a [`Snapshot`].
    pub fn snapshot_ref(&self) -> SnapshotRef<'_> {
        SnapshotRef {
            meter_names: &self.meter_names,
            region_names: &self.region_names,
            baselines: &self.baselines,
            one_minute: self.one_minute.snapshot_ref(),
            fifteen_minutes: self.fifteen_minutes.snapshot_ref(),
            max_event_ms: self.max_event_ms,
            stats: self.stats,
        }
    }

    /// Windows exactly as they were when `snapshot` was taken.
    pub fn restore(params: WindowsParams, snapshot: Snapshot) -> Windows {
        let meters = snapshot.meter_names.len();
        let index = |names: &[Box<str>]| -> FxHashMap<Box<str>, u32> {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i as u32))
                .collect()
        };
        Windows {
            params,
            meter_ids: index(&snapshot.meter_names),
            region_ids: index(&snapshot.region_names),
            meter_names: snapshot.meter_names,
            region_names: snapshot.region_names,
            baselines: snapshot.baselines,
            one_minute: OpenWindows::restore(snapshot.one_minute, meters),
            fifteen_minutes: OpenWindows::restore(snapshot.fifteen_minutes, meters),
            max_event_ms: snapshot.max_event_ms,
            stats: snapshot.stats,
        }
    }

    pub fn meter_name(&self, meter: MeterIdx) -> &str {
        &self.meter_names[meter as usize]
    }

    pub fn region_name(&self, region: RegionIdx) -> &str {
        &self.region_names[region as usize]
    }

    pub fn stats(&self) -> WindowStats {
        WindowStats {
            meters: self.meter_names.len() as u32,
            open_windows: (self.one_minute.by_start.len() + self.fifteen_minutes.by_start.len())
                as u32,
            ..self.stats
        }
    }

    /// Newest event time seen, if any.
    pub fn max_event_ms(&self) -> Option<i64> {
        (self.max_event_ms != i64::MIN).then_some(self.max_event_ms)
    }

    fn intern_meter(&mut self, meter_id: &str) -> MeterIdx {
        if let Some(&i) = self.meter_ids.get(meter_id) {
            return i;
        }
        let i = self.meter_names.len() as MeterIdx;
        self.meter_ids.insert(meter_id.into(), i);
        self.meter_names.push(meter_id.into());
        self.baselines.push(Baseline {
            mean: 0.0,
            samples: 0,
        });
        i
    }

    fn intern_region(&mut self, region: &str) -> RegionIdx {
        if let Some(&i) = self.region_ids.get(region) {
            return i;
        }
        let i = self.region_names.len() as RegionIdx;
        self.region_ids.insert(region.into(), i);
        self.region_names.push(region.into());
        i
    }

    /// Folds one reading into its windows and its meter's baseline. Returns
    /// the baseline as it was *before* this reading, for the anomaly rule.
    #[inline]
    pub fn add(
        &mut self,
        meter_id: &str,
        region: &str,
        event_ms: i64,
        power_kw: f64,
        energy_kwh: Option<f64>,
        voltage: Option<f64>,
    ) -> Observation {
        let meter = self.intern_meter(meter_id);
        let region = self.intern_region(region);
        let known = self.meter_names.len();
        self.stats.readings += 1;
        self.max_event_ms = self.max_event_ms.max(event_ms);

        let start_1m = crate::time::window_start(event_ms, ONE_MINUTE_MS);
        let set = self.one_minute.set_for(start_1m, ONE_MINUTE_MS, known);
        if set.late {
            self.stats.late_readings += 1;
        }
        set.sums(meter, region).add(power_kw, energy_kwh, voltage);
        let start_15m = crate::time::window_start(event_ms, FIFTEEN_MINUTES_MS);
        self.fifteen_minutes
            .set_for(start_15m, FIFTEEN_MINUTES_MS, known)
            .sums(meter, region)
            .add(power_kw, energy_kwh, voltage);

        // Baseline: the mean of the meter's readings, exponentially weighted
        // over the last `baseline_window` once it has that many.
        let b = &mut self.baselines[meter as usize];
        let before = Observation {
            meter,
            region,
            baseline_kw: b.mean,
            sample_count: b.samples,
        };
        let n = (b.samples + 1).min(self.params.baseline_window);
        b.mean += (power_kw - b.mean) / f64::from(n);
        b.samples = b.samples.saturating_add(1);
        before
    }

    /// Closes every window whose end the watermark (newest event time minus
    /// the allowed lateness) has reached. Appends them to `out` in start
    /// order, 1-minute windows first.
    pub fn advance(&mut self, out: &mut Vec<ClosedWindow>) {
        if self.max_event_ms == i64::MIN {
            return;
        }
        self.advance_to(self.max_event_ms, out);
    }

    /// Closes every window whose end `event_ms` minus the allowed lateness
    /// has reached: the caller's event time, e.g. the slowest of several
    /// partitions (a fast partition must not make a slow one's readings
    /// late).
    pub fn advance_to(&mut self, event_ms: i64, out: &mut Vec<ClosedWindow>) {
        let watermark = event_ms.saturating_sub(self.params.allowed_lateness_ms);
        self.close_through(watermark, out);
    }

    /// Closes every window, whatever the watermark (stream idle, shutdown).
    /// Each width counts as closed only up to the end of its last window,
    /// so a reading after a restart for a later window is on time.
    pub fn close_all(&mut self, out: &mut Vec<ClosedWindow>) {
        self.close_width(Width::OneMinute, out);
        self.close_width(Width::FifteenMinutes, out);
    }

    /// Closes every open window of one width (the stream has been idle for
    /// that width's flush interval).
    pub fn close_width(&mut self, width: Width, out: &mut Vec<ClosedWindow>) {
        let open = match width {
            Width::OneMinute => &mut self.one_minute,
            Width::FifteenMinutes => &mut self.fifteen_minutes,
        };
        if let Some(last) = open.by_start.keys().next_back().copied() {
            open.close_through(width, last + width.ms(), out);
        }
    }

    /// Every window of `width` ending at or before this has been closed
    /// (a later reading for one of them opens a late window).
    pub fn closed_until(&self, width: Width) -> i64 {
        match width {
            Width::OneMinute => self.one_minute.closed_until,
            Width::FifteenMinutes => self.fifteen_minutes.closed_until,
        }
    }

    /// Open windows of one width.
    pub fn open_count(&self, width: Width) -> usize {
        match width {
            Width::OneMinute => self.one_minute.by_start.len(),
            Width::FifteenMinutes => self.fifteen_minutes.by_start.len(),
        }
    }

    /// Closes every window ending at or before `until` (epoch ms), and
    /// counts both widths as closed up to it: a later reading for such a
    /// window is late. The stream stage brings all its partitions to the
    /// same point at shutdown, as one set of windows would be.
    pub fn close_through(&mut self, until: i64, out: &mut Vec<ClosedWindow>) {
        self.one_minute.close_through(Width::OneMinute, until, out);
        self.fifteen_minutes
            .close_through(Width::FifteenMinutes, until, out);
    }

    /// The regional sums of a closed on-time 1-minute window, one entry per
    /// region that reported, in region-index order. Meters are added in
    /// the order of their ids, not the order they reported in, so the
    /// floating-point totals are the same whatever order the partitions
    /// were read in (a replay, another process).
    pub fn regional(&self, window: &ClosedWindow) -> Vec<RegionSums> {
        let mut order: Vec<&MeterSums> = window.meters.iter().collect();
        order.sort_unstable_by(|a, b| self.meter_name(a.meter).cmp(self.meter_name(b.meter)));
        let mut by_region: BTreeMap<RegionIdx, RegionSums> = BTreeMap::new();
        for m in order {
            let avg = m.sums.avg_power();
            let r = by_region.entry(m.region).or_insert_with(|| RegionSums {
                region: m.region,
                meter_count: 0,
                total_kw: 0.0,
                max_kw: f64::NEG_INFINITY,
                min_kw: f64::INFINITY,
                meters: Vec::new(),
            });
            r.meter_count += 1;
            r.total_kw += avg;
            r.max_kw = r.max_kw.max(avg);
            r.min_kw = r.min_kw.min(avg);
            r.meters.push(m.meter);
        }
        by_region.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_762_929_000_000; // 2025-11-12T06:30:00Z, a 15-minute boundary

    fn windows(lateness_ms: i64) -> Windows {
        Windows::new(WindowsParams {
            allowed_lateness_ms: lateness_ms,
            baseline_window: 4,
        })
    }

    #[test]
    fn seed_example_sums() {
        let mut w = windows(0);
        w.add(
            "MTR-42",
            "Mumbai-North",
            T0 + 10_000,
            5.2,
            Some(0.04),
            Some(235.6),
        );
        w.add(
            "MTR-42",
            "Mumbai-North",
            T0 + 30_000,
            5.5,
            Some(0.05),
            Some(238.1),
        );
        w.add(
            "MTR-42",
            "Mumbai-North",
            T0 + 50_000,
            5.0,
            Some(0.041),
            Some(236.8),
        );
        let mut out = Vec::new();
        w.close_all(&mut out);
        assert_eq!(out.len(), 2);
        let one = &out[0];
        assert_eq!(
            (one.width, one.start_ms, one.late),
            (Width::OneMinute, T0, false)
        );
        let s = one.meters[0].sums;
        assert_eq!(s.count, 3);
        assert!((s.power_sum - 15.7).abs() < 1e-9);
        assert_eq!((s.max_power, s.min_power), (5.5, 5.0));
        assert!((s.energy_sum - 0.131).abs() < 1e-9);
        assert!((s.voltage_sum - 710.5).abs() < 1e-9);
        assert_eq!(s.voltage_count, 3);
        assert!((s.avg_power() - 5.233_333).abs() < 1e-6);
        assert_eq!(out[1].width, Width::FifteenMinutes);
        assert_eq!(out[1].meters[0].sums.count, 3);
    }

    #[test]
    fn windows_floor_by_event_time_and_close_on_watermark() {
        let mut w = windows(5_000);
        w.add("A", "R", T0 + 59_999, 1.0, None, None);
        w.add("A", "R", T0 + 60_000, 2.0, None, None);
        let mut out = Vec::new();
        w.advance(&mut out);
        assert!(out.is_empty(), "watermark T0+55s has not reached T0+60s");
        w.add("B", "R", T0 + 65_000, 3.0, None, None);
        w.advance(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].start_ms, T0);
        assert_eq!(out[0].meters.len(), 1);
        assert_eq!(out[0].meters[0].sums.count, 1);
    }

    #[test]
    fn a_reading_after_its_window_closed_is_still_counted() {
        let mut w = windows(0);
        w.add("A", "R", T0 + 1_000, 1.0, None, None);
        w.add("A", "R", T0 + 61_000, 1.0, None, None);
        let mut out = Vec::new();
        w.advance(&mut out);
        assert_eq!(out.len(), 1);
        // Late: belongs to the window that just closed.
        w.add("A", "R", T0 + 2_000, 4.0, None, None);
        w.add("A", "R", T0 + 121_000, 1.0, None, None);
        out.clear();
        w.advance(&mut out);
        let late: Vec<_> = out.iter().filter(|c| c.late).collect();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].start_ms, T0);
        assert_eq!(late[0].meters[0].sums.count, 1);
        assert_eq!(w.stats().late_readings, 1);
        let total: u32 = out
            .iter()
            .filter(|c| c.width == Width::OneMinute)
            .flat_map(|c| c.meters.iter().map(|m| m.sums.count))
            .sum();
        assert_eq!(total, 2, "the late reading and the T0+61s one");
    }

    #[test]
    fn a_restored_snapshot_carries_on_exactly_as_the_original() {
        let mut a = windows(5_000);
        let mut closed_a = Vec::new();
        for i in 0..200i64 {
            let meter = format!("M{}", i % 7);
            a.add(
                &meter,
                if i % 2 == 0 { "N" } else { "S" },
                i * 1_000,
                i as f64,
                Some(0.1),
                None,
            );
            if i == 90 {
                a.advance(&mut closed_a);
            }
        }
        let bytes = a.snapshot().encode();
        assert_eq!(
            postcard::to_stdvec(&a.snapshot_ref()).unwrap(),
            bytes,
            "the borrowed snapshot encodes as the owned one"
        );
        let mut b = Windows::restore(a.params, Snapshot::decode(&bytes).unwrap());
        assert_eq!(b.snapshot(), a.snapshot());
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        for w in [&mut a, &mut b] {
            let o = w.add("M3", "S", 10_000, 3.0, None, Some(230.0));
            assert_eq!(o.sample_count, 29);
            w.add("M99", "E", 400_000, 1.0, None, None);
        }
        a.advance(&mut out_a);
        b.advance(&mut out_b);
        assert!(!out_a.is_empty());
        assert_eq!(format!("{out_a:?}"), format!("{out_b:?}"));
        assert_eq!(a.stats(), b.stats());
        assert!(Snapshot::decode(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn baseline_is_the_mean_before_the_reading() {
        let mut w = windows(0);
        let o = w.add("A", "R", T0, 2.0, None, None);
        assert_eq!((o.baseline_kw, o.sample_count), (0.0, 0));
        let o = w.add("A", "R", T0 + 1, 4.0, None, None);
        assert_eq!((o.baseline_kw, o.sample_count), (2.0, 1));
        let o = w.add("A", "R", T0 + 2, 6.0, None, None);
        assert_eq!((o.baseline_kw, o.sample_count), (3.0, 2));
        w.add("A", "R", T0 + 3, 8.0, None, None);
        // Window of 4 reached: exponential weighting from here on.
        let o = w.add("A", "R", T0 + 4, 0.0, None, None);
        assert_eq!((o.baseline_kw, o.sample_count), (5.0, 4));
        let o = w.add("A", "R", T0 + 5, 0.0, None, None);
        assert_eq!((o.baseline_kw, o.sample_count), (3.75, 5));
    }

    #[test]
    fn regional_sums_fold_meter_averages() {
        let mut w = windows(0);
        w.add("A", "North", T0, 2.0, None, None);
        w.add("A", "North", T0 + 1, 4.0, None, None);
        w.add("B", "North", T0, 10.0, None, None);
        w.add("C", "South", T0, 1.0, None, None);
        let mut out = Vec::new();
        w.close_all(&mut out);
        let regional = w.regional(&out[0]);
        assert_eq!(regional.len(), 2);
        let north = &regional[0];
        assert_eq!(w.region_name(north.region), "North");
        assert_eq!(north.meter_count, 2);
        assert_eq!(north.total_kw, 13.0);
        assert_eq!((north.max_kw, north.min_kw), (10.0, 3.0));
        assert_eq!(
            north
                .meters
                .iter()
                .map(|m| w.meter_name(*m))
                .collect::<Vec<_>>(),
            ["A", "B"]
        );
    }
}
