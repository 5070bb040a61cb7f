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

impl Stage for ArchiveStage {
    const NAME: &'static str = "archive";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        let rows: std::sync::Arc<[RawReading]> = records
            .iter()
            .filter_map(|d| {
                let w: Wire<'_> = serde_json::from_slice(&d.record.value).ok()?;
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
            })
            .collect();
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
