//! The archive stage (`raw-archive-group` on `telemetry-readings`): every
//! reading into `raw_readings`, in one store call per poll.
//!
//! It runs in its own consumer group so a slow database delays only the
//! archive (and, through the bus's lag bound, ingest), never the windows.
//!
//! Pipelined: while the store writes one poll's rows, the next poll is read
//! and parsed; up to [`IN_FLIGHT`] writes are under way at once. Offsets
//! are committed only through the oldest write not yet stored, so a crash
//! replays whatever was not (the key makes a replayed reading a no-op).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;

use serde::Deserialize;
use tokio::task::JoinHandle;

use super::{CommitPoint, Context, Stage, with_retry};
use crate::bus::{Delivered, Topic};
use crate::store::RawReading;

/// Store writes under way at once (the one being written, the next
/// queued behind it).
const IN_FLIGHT: usize = 2;

/// Next offsets per partition.
type Positions = Vec<(Topic, u32, u64)>;

pub struct ArchiveStage {
    ctx: Context,
    /// Writes under way, oldest first, each with the positions it covers.
    writing: VecDeque<(JoinHandle<()>, Positions)>,
    /// Next offsets stored, per partition, not yet handed to the driver.
    stored: BTreeMap<(Topic, u32), u64>,
    /// Partitions the consumer owns now.
    assignment: Vec<(Topic, u32)>,
    /// A write task failed (a panic): nothing is committed any more, so
    /// its records are archived again after a restart.
    broken: bool,
}

/// The raw_readings columns, borrowed from the record.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    #[serde(borrow)]
    meter_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    region: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    timestamp: std::borrow::Cow<'a, str>,
    power_kw: f64,
    voltage: Option<f64>,
    current: Option<f64>,
    frequency: Option<f64>,
    power_factor: Option<f64>,
    temperature: Option<f64>,
    energy_kwh: Option<f64>,
}

/// The raw_readings row of a record; `None` for a record that is not a
/// reading (skipped). One scan in the plain case, else serde_json.
fn row(value: &[u8]) -> Option<RawReading> {
    crate::reading::WireFields::scan(value)
        .and_then(|f| raw_reading(&f))
        .or_else(|| row_by_serde(value))
}

fn row_by_serde(value: &[u8]) -> Option<RawReading> {
    let w: Wire<'_> = serde_json::from_slice(value).ok()?;
    Some(RawReading {
        meter_id: w.meter_id.into_owned(),
        region: w.region.into_owned(),
        timestamp_ms: crate::time::parse_rfc3339_ms(&w.timestamp)?,
        power_kw: w.power_kw,
        voltage: w.voltage,
        current: w.current,
        frequency: w.frequency,
        power_factor: w.power_factor,
        temperature: w.temperature,
        energy_kwh: w.energy_kwh,
    })
}

/// The row of a record [`WireFields::scan`] took, when every column has
/// its type (else the record is left to serde_json and [`Wire`]).
///
/// [`WireFields::scan`]: crate::reading::WireFields::scan
fn raw_reading(f: &crate::reading::WireFields<'_>) -> Option<RawReading> {
    use crate::reading::{number, optional_number, text};
    Some(RawReading {
        meter_id: text(f.meter_id)?.to_owned(),
        region: text(f.region)?.to_owned(),
        timestamp_ms: crate::time::parse_rfc3339_ms(text(f.timestamp)?)?,
        power_kw: number(f.power_kw)?,
        voltage: optional_number(f.voltage)?,
        current: optional_number(f.current)?,
        frequency: optional_number(f.frequency)?,
        power_factor: optional_number(f.power_factor)?,
        temperature: optional_number(f.temperature)?,
        energy_kwh: optional_number(f.energy_kwh)?,
    })
}

impl Stage for ArchiveStage {
    const NAME: &'static str = "archive";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        // Sized for every record up front, then moved into the shared slice
        // in one copy (collected into it directly, the rows went through a
        // vector grown by doubling first).
        let mut parsed = Vec::with_capacity(records.len());
        parsed.extend(records.iter().filter_map(|d| row(&d.record.value)));
        let rows: std::sync::Arc<[RawReading]> = parsed.into();
        let mut positions: Positions = Vec::new();
        for d in records {
            match positions
                .iter_mut()
                .find(|(t, p, _)| (*t, *p) == (d.topic, d.partition))
            {
                Some(at) => at.2 = at.2.max(d.offset + 1),
                None => positions.push((d.topic, d.partition, d.offset + 1)),
            }
        }
        while self.writing.len() >= IN_FLIGHT {
            self.wait_oldest().await;
        }
        let ctx = self.ctx.clone();
        let write = tokio::spawn(async move {
            let store = ctx.store.clone();
            let c = &ctx;
            with_retry(c, "archive", "insert raw readings", || async {
                let started = std::time::Instant::now();
                let done = store.insert_raw_readings(rows.clone()).await;
                c.metrics.store_write("archive", started.elapsed());
                done
            })
            .await;
            c.metrics
                .raw_archived
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
        });
        self.writing.push_back((write, positions));
    }

    /// Everything under way stored before the final commit.
    async fn finish(&mut self) {
        while !self.writing.is_empty() {
            self.wait_oldest().await;
        }
    }

    fn commit_point(&mut self) -> CommitPoint {
        if self.broken {
            return CommitPoint::Nothing;
        }
        while self
            .writing
            .front()
            .is_some_and(|(write, _)| write.is_finished())
        {
            if let Some((_, positions)) = self.writing.pop_front() {
                self.stored_through(positions);
            }
        }
        // A partition taken away meanwhile is its new owner's to commit.
        let now: Vec<(Topic, u32, u64)> = std::mem::take(&mut self.stored)
            .into_iter()
            .filter(|(tp, _)| self.assignment.contains(tp))
            .map(|((t, p), next)| (t, p, next))
            .collect();
        if now.is_empty() {
            CommitPoint::Nothing
        } else {
            CommitPoint::Positions(now)
        }
    }

    async fn assigned(&mut self, partitions: &[(Topic, u32)]) {
        self.assignment = partitions.to_vec();
    }
}

/// A stage stopped where it is stops its writes too, as a crash would:
/// their records are archived again at the next start.
impl Drop for ArchiveStage {
    fn drop(&mut self) {
        for (write, _) in &self.writing {
            write.abort();
        }
    }
}

impl ArchiveStage {
    pub fn new(ctx: Context) -> ArchiveStage {
        ArchiveStage {
            ctx,
            writing: VecDeque::new(),
            stored: BTreeMap::new(),
            assignment: Vec::new(),
            broken: false,
        }
    }

    /// Waits for the oldest write under way to be stored.
    async fn wait_oldest(&mut self) {
        if let Some((write, positions)) = self.writing.pop_front() {
            if let Err(e) = write.await {
                // Only a panic gets here (the writes retry until they
                // succeed): commit nothing from now on, so its records are
                // archived again after a restart.
                tracing::error!(error = %e, "archive: a write task failed; the archive stops committing");
                self.ctx
                    .metrics
                    .stage_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.broken = true;
                return;
            }
            self.stored_through(positions);
        }
    }

    fn stored_through(&mut self, positions: Positions) {
        for (t, p, next) in positions {
            let at = self.stored.entry((t, p)).or_insert(next);
            *at = (*at).max(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: &str = r#"{"readingId":"r-1","meterId":"MTR-00000001","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"energyKwh":0.0436,"voltage":230.5,"current":null,"frequency":50,"powerFactor":0.97,"temperature":-3.5,"region":"Mumbai-North","metadata":{"mode":"normal"}}"#;

    /// The scanned row is the row serde_json and [`Wire`] give, for the
    /// record and every damaged copy of it the scan takes.
    #[test]
    fn a_scanned_row_is_the_row_serde_json_gives() {
        let scanned = |v: &[u8]| crate::reading::WireFields::scan(v).and_then(|f| raw_reading(&f));
        let r = scanned(READING.as_bytes()).expect("scanned");
        assert_eq!(r.meter_id, "MTR-00000001");
        assert_eq!(r.region, "Mumbai-North");
        assert_eq!(r.timestamp_ms, 1_762_929_000_000);
        assert_eq!(
            (r.power_kw, r.voltage, r.current),
            (5.234, Some(230.5), None)
        );
        assert_eq!((r.frequency, r.power_factor), (Some(50.0), Some(0.97)));
        assert_eq!((r.temperature, r.energy_kwh), (Some(-3.5), Some(0.0436)));
        let mut taken = 0;
        for v in crate::json_scan::damaged(READING) {
            let fast = scanned(v.as_bytes());
            if fast.is_some() {
                taken += 1;
                assert_eq!(fast, row_by_serde(v.as_bytes()), "{v}");
            }
            assert_eq!(row(v.as_bytes()), row_by_serde(v.as_bytes()), "{v}");
        }
        assert!(taken > 1000, "only {taken} records scanned");
    }
}
