//! The regional stage (`regional-group` on `aggregates_1m_regional_partials`):
//! combines every partition's share of a regional 1-minute window into the
//! window itself, runs the aggregate rule on it, stores it and publishes it
//! on `aggregates_1m_regional` (for the alert and tariff stages).
//!
//! Why a stage of its own: the stream stage's partitions may be spread over
//! several processes, so no one of them sees a whole region. Each partition
//! reports, per closed on-time minute, its regions' meter count, sum of
//! meter averages, max and min, and how far it has closed (`closed_until`).
//! A minute is complete when every partition of `telemetry-readings` has
//! closed it — or has been silent for `windows.flush_interval_1m_s` (a
//! partition with no meters, or one that stopped: like the stream stage's
//! idle flush, it stops holding the others back). Partitions are added in
//! partition order, so the figures are the same however many processes
//! share the stream stage. A share that arrives after its minute was
//! combined is late and is not added (as a late reading does not revise a
//! published regional minute).
//!
//! All reports are keyed alike, so they sit on one partition and one member
//! of the group combines them; another takes over from its checkpoint.
//!
//! Exactly once: the shares not yet combined, each partition's
//! `closed_until` and the last minute combined are checkpointed with the
//! bus positions in the same transaction as the regional rows and the
//! outbox. A report replayed or published twice replaces the same share,
//! and a minute combined again is recognised downstream (the alert and
//! tariff stages' last applied window per region).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    CommitPoint, Context, PipelineError, REGIONAL_GROUP, Stage, apply_fenced, flush_outbox, keyed,
    plugin_failed, with_retry,
};
use crate::bus::{Delivered, Topic};
use crate::live::LiveKind;
use crate::messages::{PartialRegion, RegionalPartial, RegionalWindow, decode};
use crate::plugins::{AggregateRule, aggregate};
use crate::store::{self, Applied, Checkpoint, Effects};
use crate::windows::{ONE_MINUTE_MS, SnapshotError};

/// The stage's name in the outbox and in crash points.
const STAGE: &str = "regional";

/// What the stage's checkpoint holds.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct CombinerState {
    /// Partitions of `telemetry-readings`, as the reports say.
    partitions: u32,
    /// Per partition, every minute before this is closed there.
    closed_until: BTreeMap<u32, i64>,
    /// Per minute not yet combined, per partition, its share.
    open: BTreeMap<i64, BTreeMap<u32, Vec<PartialRegion>>>,
    /// The last minute combined: shares of it or earlier ones are late.
    done_through: Option<i64>,
}

pub struct RegionalStage {
    ctx: Context,
    aggregate: AggregateRule,
    state: CombinerState,
    /// The epoch of this process's claim on the checkpoint; `None` while
    /// it owns no partition of the topic (another process combines).
    epoch: Option<i64>,
    /// Per (topic, partition) the next offset not yet applied.
    positions: BTreeMap<(Topic, u32), u64>,
    /// What the bus was last told to commit.
    committed: Vec<(Topic, u32, u64)>,
    /// When each partition last reported (not checkpointed: after a
    /// restart every partition starts as just heard of).
    heard: HashMap<u32, Instant>,
    started: Instant,
    /// Whether state changed since the last checkpoint.
    dirty: bool,
}

impl Stage for RegionalStage {
    const NAME: &'static str = "regional";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        if self.epoch.is_none() {
            // Records without an assignment were fetched just before a
            // rebalance took the partition away: its new owner reads them.
            return;
        }
        let now = Instant::now();
        for d in records {
            let next = self.positions.entry((d.topic, d.partition)).or_insert(0);
            if d.offset < *next {
                continue; // applied before the checkpoint this resumed from
            }
            *next = d.offset + 1;
            self.dirty = true;
            match decode::<RegionalPartial>(&d.record.value) {
                Ok(report) => {
                    self.heard.insert(report.partition, now);
                    self.take(report);
                }
                Err(e) => {
                    self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        partition = d.partition,
                        offset = d.offset,
                        error = %e,
                        "skipping a record that is not a regional report"
                    );
                }
            }
        }
        self.combine(false).await;
    }

    async fn idle(&mut self) {
        self.combine(false).await;
    }

    async fn finish(&mut self) {
        self.combine(true).await;
    }

    fn commit_point(&mut self) -> CommitPoint {
        if self.epoch.is_none() || self.dirty {
            return CommitPoint::Nothing;
        }
        let now: Vec<(Topic, u32, u64)> = self
            .positions
            .iter()
            .map(|(&(t, p), &o)| (t, p, o))
            .collect();
        if now == self.committed {
            return CommitPoint::Nothing;
        }
        self.committed = now.clone();
        CommitPoint::Positions(now)
    }

    async fn assigned(&mut self, partitions: &[(Topic, u32)]) {
        if partitions.is_empty() {
            // Another member combines now; it resumes from the checkpoint.
            self.epoch = None;
            self.state = CombinerState::default();
            self.positions.clear();
            self.committed.clear();
        } else {
            // (Re)claim and resume from the checkpoint: what this process
            // held may have moved on elsewhere meanwhile.
            self.claim().await;
        }
    }
}

impl RegionalStage {
    pub async fn new(
        ctx: Context,
        aggregate: AggregateRule,
    ) -> Result<RegionalStage, PipelineError> {
        if let Some(cp) = ctx.store.load_checkpoint(REGIONAL_GROUP).await? {
            decode_state(&cp.state)?;
        }
        Ok(RegionalStage {
            ctx,
            aggregate,
            state: CombinerState::default(),
            epoch: None,
            positions: BTreeMap::new(),
            committed: Vec::new(),
            heard: HashMap::new(),
            started: Instant::now(),
            dirty: false,
        })
    }

    /// Claims the checkpoint (fencing off an earlier owner), publishes what
    /// the outbox holds and resumes from the checkpoint.
    async fn claim(&mut self) {
        let store = self.ctx.store.clone();
        let (epoch, cp) = with_retry(
            &self.ctx,
            "regional",
            "claim the regional checkpoint",
            || store.claim_checkpoint(REGIONAL_GROUP),
        )
        .await;
        while let Err(e) = flush_outbox(&self.ctx, STAGE, STAGE).await {
            tracing::error!(error = %e, "reading the outbox failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.epoch = Some(epoch);
        self.state = CombinerState::default();
        self.positions.clear();
        self.committed.clear();
        self.heard.clear();
        self.started = Instant::now();
        self.dirty = false;
        let Some(cp) = cp else {
            return;
        };
        match decode_state(&cp.state) {
            Ok(state) => self.state = state,
            Err(e) => {
                tracing::error!(error = %e, "unreadable regional checkpoint; starting afresh");
                return;
            }
        }
        if cp.bus_id == self.ctx.bus.log_id() {
            for (topic, partition, offset) in cp.positions {
                if let Some(topic) = Topic::from_name(&topic) {
                    self.positions.insert((topic, partition), offset);
                }
            }
        }
        self.committed = self
            .positions
            .iter()
            .map(|(&(t, p), &o)| (t, p, o))
            .collect();
        tracing::info!(
            epoch,
            open_minutes = self.state.open.len(),
            "regional stage: resumed from its checkpoint"
        );
    }

    /// Takes one partition's report in: its shares (replacing any earlier
    /// copy of the same report) and how far it has closed.
    fn take(&mut self, report: RegionalPartial) {
        let s = &mut self.state;
        s.partitions = s.partitions.max(report.partitions);
        let until = s.closed_until.entry(report.partition).or_insert(i64::MIN);
        *until = (*until).max(report.closed_until);
        for w in report.windows {
            if s.done_through.is_some_and(|done| w.timestamp_ms <= done) {
                tracing::debug!(
                    partition = report.partition,
                    window = w.timestamp_ms,
                    "a regional share arrived after its minute was combined"
                );
                continue;
            }
            s.open
                .entry(w.timestamp_ms)
                .or_default()
                .insert(report.partition, w.regions);
        }
    }

    /// Whether every partition has closed the minute starting at `start`,
    /// or has been silent for the 1-minute flush interval (`ending`: the
    /// stage is stopping; a partition that never reported does not hold
    /// anything back).
    fn complete(&self, start: i64, ending: bool) -> bool {
        let quiet = Duration::from_secs(self.ctx.config.windows.flush_interval_1m_s);
        let end = start + ONE_MINUTE_MS;
        (0..self.state.partitions).all(|p| {
            if self.state.closed_until.get(&p).is_some_and(|&c| c >= end) {
                return true;
            }
            if ending && !self.state.closed_until.contains_key(&p) {
                return true;
            }
            match self.heard.get(&p) {
                Some(at) => at.elapsed() >= quiet,
                None => self.started.elapsed() >= quiet,
            }
        })
    }

    /// Combines the complete minutes, oldest first, and checkpoints.
    async fn combine(&mut self, ending: bool) {
        let Some(epoch) = self.epoch else {
            return;
        };
        let mut windows = Vec::new();
        while let Some((&start, _)) = self.state.open.first_key_value() {
            if !self.complete(start, ending) {
                break;
            }
            let shares = self.state.open.remove(&start).unwrap_or_default();
            self.state.done_through = Some(start);
            windows.push((start, shares));
        }
        if windows.is_empty() && !self.dirty {
            return;
        }
        let (rows, capacities) = self.finish_windows(&windows);
        let effects = Effects {
            regional_windows: rows,
            checkpoint: Some(Checkpoint {
                group: REGIONAL_GROUP.to_owned(),
                epoch,
                bus_id: self.ctx.bus.log_id().to_owned(),
                positions: self
                    .positions
                    .iter()
                    .map(|(&(t, p), &o)| (t.name().to_owned(), p, o))
                    .collect(),
                state: postcard::to_stdvec(&self.state).expect("combiner state serializes"),
            }),
            ..Effects::default()
        };
        let published = regional_windows(&effects.regional_windows, &capacities);
        let outbox = |_: &Applied| keyed(&published);
        if apply_fenced(&self.ctx, STAGE, STAGE, &effects, &outbox)
            .await
            .is_some()
        {
            for w in &published {
                self.ctx
                    .live
                    .publish(LiveKind::RegionalLoad, Some(&w.region), w);
            }
        } else {
            // Another process combines now; drop what was held.
            self.epoch = None;
            self.state = CombinerState::default();
            self.positions.clear();
        }
        self.dirty = false;
    }

    /// Sums each minute's shares (partitions in order) per region, and
    /// runs the aggregate rule on the regional windows.
    fn finish_windows(
        &mut self,
        windows: &[(i64, BTreeMap<u32, Vec<PartialRegion>>)],
    ) -> (Vec<store::RegionalAggregate>, Vec<f64>) {
        let mut sums: Vec<(i64, PartialRegion)> = Vec::new();
        for (start, shares) in windows {
            let mut by_region: BTreeMap<&str, PartialRegion> = BTreeMap::new();
            for share in shares.values().flatten() {
                let r = by_region
                    .entry(&share.region)
                    .or_insert_with(|| PartialRegion {
                        region: share.region.clone(),
                        meter_count: 0,
                        total_kw: 0.0,
                        max_kw: f64::NEG_INFINITY,
                        min_kw: f64::INFINITY,
                        active_meters: Vec::new(),
                    });
                r.meter_count += share.meter_count;
                r.total_kw += share.total_kw;
                r.max_kw = r.max_kw.max(share.max_kw);
                r.min_kw = r.min_kw.min(share.min_kw);
                r.active_meters.extend(share.active_meters.iter().cloned());
            }
            sums.extend(by_region.into_values().map(|r| (*start, r)));
        }
        let inputs: Vec<aggregate::RegionWindow> = sums
            .iter()
            .map(|(_, r)| aggregate::RegionWindow {
                meter_count: r.meter_count,
                total_kw: r.total_kw,
                max_kw: r.max_kw,
                min_kw: r.min_kw,
                capacity_kw: self.ctx.config.region(&r.region).capacity_kw,
            })
            .collect();
        let finished = if inputs.is_empty() {
            Vec::new()
        } else {
            match self.aggregate.finish_regions(&inputs) {
                Ok(f) => f,
                Err(e) => {
                    plugin_failed(&self.ctx, &e, "plain regional figures for this window");
                    inputs.iter().map(plain_regional_aggregate).collect()
                }
            }
        };
        let rows = sums
            .into_iter()
            .zip(&finished)
            .map(|((start, r), f)| store::RegionalAggregate {
                region: r.region,
                window_start_ms: start,
                meter_count: r.meter_count,
                total_consumption: f.total_consumption,
                avg_consumption: f.avg_consumption,
                max_consumption: f.max_consumption,
                min_consumption: f.min_consumption,
                load_percentage: f.load_percentage,
                active_meters: r.active_meters,
            })
            .collect();
        (rows, inputs.iter().map(|i| i.capacity_kw).collect())
    }
}

fn decode_state(bytes: &[u8]) -> Result<CombinerState, SnapshotError> {
    postcard::from_bytes(bytes).map_err(|e| SnapshotError(format!("regional stage: {e}")))
}

/// The regional windows as published on `aggregates_1m_regional`.
fn regional_windows(rows: &[store::RegionalAggregate], capacities: &[f64]) -> Vec<RegionalWindow> {
    rows.iter()
        .zip(capacities)
        .map(|(row, capacity_kw)| RegionalWindow {
            region: row.region.clone(),
            timestamp_ms: row.window_start_ms,
            meter_count: row.meter_count,
            total_consumption: row.total_consumption,
            avg_consumption: row.avg_consumption,
            max_consumption: row.max_consumption,
            min_consumption: row.min_consumption,
            load_percentage: row.load_percentage,
            capacity_kw: *capacity_kw,
            active_meters: row.active_meters.clone(),
        })
        .collect()
}

/// The host's fallback when the aggregate rule fails: plain figures.
fn plain_regional_aggregate(r: &aggregate::RegionWindow) -> aggregate::RegionalAggregate {
    aggregate::RegionalAggregate {
        total_consumption: r.total_kw,
        avg_consumption: if r.meter_count == 0 {
            0.0
        } else {
            r.total_kw / f64::from(r.meter_count)
        },
        max_consumption: r.max_kw,
        min_consumption: r.min_kw,
        load_percentage: if r.capacity_kw > 0.0 {
            r.total_kw / r.capacity_kw * 100.0
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combiner_state_round_trips() {
        let mut s = CombinerState {
            partitions: 3,
            ..CombinerState::default()
        };
        s.closed_until.insert(1, 120_000);
        s.open.entry(60_000).or_default().insert(
            2,
            vec![PartialRegion {
                region: "R".into(),
                meter_count: 2,
                total_kw: 3.5,
                max_kw: 2.0,
                min_kw: 1.5,
                active_meters: vec!["a".into(), "b".into()],
            }],
        );
        s.done_through = Some(0);
        let bytes = postcard::to_stdvec(&s).unwrap();
        assert_eq!(decode_state(&bytes).unwrap(), s);
    }
}
