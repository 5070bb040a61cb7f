//! The stream stage (`stream-processor-group` on `telemetry-readings`):
//! readings into windows, the anomaly rule per batch, and closed windows
//! through the aggregate rule into the store and onto the aggregate topics.
//!
//! Each partition of `telemetry-readings` is its own unit of work
//! ([`Partition`]): its meters' windows and baselines, its watermark, its
//! checkpoint and its share of the regional windows. So several processes
//! in the consumer group can share the partitions, and a partition moves
//! from one process to another (a rebalance, a process killed) with its
//! state: the new owner claims the partition's checkpoint (which fences the
//! old owner's writes off) and resumes from it. The regional windows are
//! the sum over all partitions: each partition reports its share of every
//! 1-minute window it closes on `aggregates_1m_regional_partials`, and the
//! regional stage ([`super::regional`]) combines the reports.
//!
//! The per-reading work is a JSON parse and [`Windows::add`]; the anomaly
//! rule is called once per batch of up to `windows.anomaly_batch` readings
//! of a partition, the aggregate rule once per closed window (all meters at
//! once).
//!
//! Exactly once: what a partition derives (closed windows, its regional
//! report, anomaly alerts) is held until its next *checkpoint* — at least
//! every [`CHECKPOINT_INTERVAL`] while records arrive, and soon after
//! windows close. A checkpoint is one store transaction holding those rows,
//! the messages to publish (outbox), the open windows and baselines
//! ([`crate::windows::Snapshot`]) and the partition's bus position. Bus
//! offsets are committed only up to the last stored checkpoint. A record
//! below a partition's position is already folded in and is skipped, so a
//! reading is folded into exactly one stored state whatever is redelivered.
//! Checkpoints are written by a writer task beside the folding, in order;
//! when it falls behind, the stage waits.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{
    CommitPoint, Context, PipelineError, STREAM_GROUP, Stage, apply_fenced, flush_outbox, keyed,
    plugin_failed, with_retry,
};
use crate::bus::{Bus, Delivered, Topic};
use crate::messages::{
    Alert, AlertMetadata, AlertType, AnomalyKind, AnomalyMetadata, DeadLetter, KeyedMessage,
    MeterWindow, ParkedReading, PartialRegion, PartialWindow, RegionalPartial, RuleRef,
};
use crate::plugins::{AggregateRule, AnomalyRule, OnFault, aggregate, anomaly};
use crate::reading::Reading;
use crate::store::{self, Applied, Checkpoint, Effects, WindowWidth};
use crate::windows::{
    ClosedWindow, MeterIdx, RegionIdx, Snapshot, SnapshotError, SnapshotRef, Width, Windows,
    WindowsParams,
};

/// The stage's name in crash points; a partition's outbox is `stream/{p}`.
const STAGE: &str = "stream";

/// The checkpoint of partition `p` (`stream-processor-group/{p}`).
fn checkpoint_group(p: u32) -> String {
    format!("{STREAM_GROUP}/{p}")
}

/// The outbox of partition `p`.
fn outbox_stage(p: u32) -> String {
    format!("{STAGE}/{p}")
}

/// What a partition's checkpoint holds besides its position: its windows,
/// its newest event time (its watermark's input) and how far it has
/// reported its regional windows closed.
#[derive(serde::Serialize, serde::Deserialize)]
struct PartitionState {
    windows: Snapshot,
    newest_event_ms: Option<i64>,
    reported_until: i64,
}

/// [`PartitionState`] as a checkpoint encodes it, borrowing the windows.
#[derive(serde::Serialize)]
struct PartitionStateRef<'a> {
    windows: SnapshotRef<'a>,
    newest_event_ms: Option<i64>,
    reported_until: i64,
}

impl PartitionState {
    fn decode(bytes: &[u8]) -> Result<PartitionState, SnapshotError> {
        let s: PartitionState =
            postcard::from_bytes(bytes).map_err(|e| SnapshotError(e.to_string()))?;
        s.windows.check()?;
        Ok(s)
    }
}

/// The longest a partition goes without a checkpoint while records arrive.
/// Bus offsets are committed only at checkpoints, so this bounds the replay
/// after a crash and, with the bus's lag bound, the rate ingest can sustain.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);

/// How long, in processing time, the watermark waits for readings older
/// than the newest one seen. Requests are taken concurrently (one client
/// over several connections, or several clients), so readings reach a
/// partition a little out of order even when every client sends in order;
/// under an accelerated replay a few milliseconds of that are minutes of
/// event time, far past `windows.allowed_lateness_s`. So the watermark
/// follows the newest event time seen at least this long ago: a reading is
/// late only if it arrives more than this after one that closed its window
/// (and still `allowed_lateness_s` of event time behind it).
pub const ORDER_GRACE: Duration = Duration::from_millis(1000);

/// The shortest time between two checkpoints of a partition when windows
/// closed (the latency of aggregates and alerts; it bounds the store's
/// transactions under an accelerated replay where windows close often).
const CHECKPOINT_SPACING: Duration = Duration::from_millis(100);

pub struct StreamStage {
    ctx: Context,
    anomaly: AnomalyRule,
    aggregate: AggregateRule,
    params: WindowsParams,
    /// The partitions this process owns, each taken over (claimed).
    parts: BTreeMap<u32, Partition>,
    /// The partitions of `telemetry-readings` the consumer has now.
    assignment: Vec<u32>,
    /// To the checkpoint writer; `None` once finished.
    writer_tx: Option<mpsc::Sender<Job>>,
    /// Checkpoints handed to the writer and not yet written.
    writer_backlog: Arc<AtomicUsize>,
    writer: Option<JoinHandle<()>>,
    /// Per partition, the (epoch, position) of the last checkpoint the
    /// writer stored.
    durable: watch::Receiver<BTreeMap<u32, (i64, u64)>>,
    /// What the bus was last told to commit.
    committed: Vec<(Topic, u32, u64)>,
}

/// One partition of `telemetry-readings`, as this process owns it.
struct Partition {
    id: u32,
    /// The epoch of this process's claim on the partition's checkpoint.
    epoch: i64,
    windows: Windows,
    /// The anomaly batch being filled, as columns.
    batch: anomaly::ReadingBatch,
    /// Who each batch entry is: meter, region, event time.
    refs: Vec<(MeterIdx, RegionIdx, i64)>,
    closed: Vec<ClosedWindow>,
    /// Derived since the last checkpoint.
    pending: Pending,
    /// The offset of the next record not yet folded in: anything below is
    /// in the windows already (redelivered after a restart or rebalance).
    next: u64,
    /// `next` as of the last checkpoint.
    checkpointed: u64,
    /// The size of the last checkpoint's encoded state.
    state_bytes: usize,
    /// Newest event time folded in.
    newest_event_ms: Option<i64>,
    /// The newest event time as of [`ORDER_GRACE`] ago: the watermark's
    /// input.
    clock: EventClock,
    /// `closed_until` of the 1-minute windows, as last reported.
    reported_until: i64,
    /// Until the first records after a restored checkpoint are folded
    /// (crash point `stream.replay`).
    replaying: bool,
    last_record: Instant,
    last_checkpoint: Instant,
}

/// What a partition derived since its last checkpoint.
#[derive(Default)]
struct Pending {
    meters_1m: Vec<store::MeterAggregate>,
    meters_15m: Vec<store::MeterAggregate>,
    /// (meter, window start) the aggregate rule held back from publishing.
    held_back: HashSet<(String, i64)>,
    /// Its share of the regional windows closed.
    regional: Vec<PartialWindow>,
    alerts: Vec<Alert>,
    /// Anomaly batches parked by `on_fault = "dead_letter"`.
    dead_letters: Vec<DeadLetter>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.meters_1m.is_empty()
            && self.meters_15m.is_empty()
            && self.regional.is_empty()
            && self.alerts.is_empty()
            && self.dead_letters.is_empty()
    }
}

impl Stage for StreamStage {
    const NAME: &'static str = "stream";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        // A poll hands a partition's records over in offset order; the
        // bookkeeping is once per run of one partition, not per reading.
        for run in records.chunk_by(|a, b| (a.topic, a.partition) == (b.topic, b.partition)) {
            let p = run[0].partition;
            if !self.assignment.contains(&p) {
                // Fetched just before a rebalance took the partition away:
                // its new owner reads these records again.
                continue;
            }
            if !self.parts.contains_key(&p) {
                let part = self.open_partition(p).await;
                self.parts.insert(p, part);
            }
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            part.fold(&self.ctx, &mut self.anomaly, run);
        }
        self.tick(false).await;
    }

    /// Closes what has waited a whole flush interval without new readings,
    /// and checkpoints what is pending.
    async fn idle(&mut self) {
        self.tick(true).await;
    }

    /// Shutdown: everything open is closed and checkpointed (stored and
    /// published) before the stage returns.
    async fn finish(&mut self) {
        let mut jobs = Vec::new();
        for part in self.parts.values_mut() {
            part.detect(&self.ctx, &mut self.anomaly);
            part.windows.close_all(&mut part.closed);
        }
        // Every partition closed up to the same minute, as one set of
        // windows would be: the regional stage then has every share of the
        // last minutes (a partition without readings in them has nothing to
        // add), and a reading for them after a restart is late everywhere.
        let until = self
            .parts
            .values()
            .map(|p| p.windows.closed_until(Width::OneMinute))
            .max();
        for part in self.parts.values_mut() {
            if let Some(until) = until {
                part.windows.close_through(until, &mut part.closed);
            }
            part.handle_closed(&self.ctx, &mut self.aggregate);
            jobs.push(part.checkpoint(&self.ctx));
        }
        self.send(jobs).await;
        self.writer_tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
    }

    fn commit_point(&mut self) -> CommitPoint {
        let durable = self.durable.borrow_and_update();
        // Only positions stored under this process's current claim.
        let now: Vec<(Topic, u32, u64)> = self
            .parts
            .values()
            .filter_map(|part| {
                let &(epoch, next) = durable.get(&part.id)?;
                (epoch == part.epoch).then_some((Topic::TelemetryReadings, part.id, next))
            })
            .collect();
        if now == self.committed {
            return CommitPoint::Nothing;
        }
        self.committed = now.clone();
        CommitPoint::Positions(now)
    }

    async fn assigned(&mut self, partitions: &[(Topic, u32)]) {
        self.assignment = partitions
            .iter()
            .filter(|(t, _)| *t == Topic::TelemetryReadings)
            .map(|(_, p)| *p)
            .collect();
        let before: Vec<u32> = self.parts.keys().copied().collect();
        self.parts
            .retain(|p, _| partitions.contains(&(Topic::TelemetryReadings, *p)));
        for p in before {
            if !self.parts.contains_key(&p) {
                tracing::info!(
                    partition = p,
                    "stream stage: partition revoked; its new owner resumes from its checkpoint"
                );
            }
        }
        self.committed
            .retain(|(t, p, _)| partitions.contains(&(*t, *p)));
        // Take the new partitions over now, not at their first record: their
        // restored windows must close and report even if nothing new comes.
        for &(topic, p) in partitions {
            if topic == Topic::TelemetryReadings && !self.parts.contains_key(&p) {
                let part = self.open_partition(p).await;
                self.parts.insert(p, part);
            }
        }
    }
}

/// A stage stopped where it is (its task aborted at the end of the
/// shutdown's grace) stops its checkpoint writer too, as a crash would: what
/// that had not stored is replayed at the next start.
impl Drop for StreamStage {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}

impl StreamStage {
    /// Checks that every partition's checkpoint can be read back (a bad one
    /// stops the start, as any refusal does); partitions are claimed and
    /// restored when their first records arrive.
    pub async fn new(
        ctx: Context,
        anomaly: AnomalyRule,
        aggregate: AggregateRule,
    ) -> Result<StreamStage, PipelineError> {
        for p in 0..ctx.bus.partitions() {
            if let Some(cp) = ctx.store.load_checkpoint(&checkpoint_group(p)).await? {
                PartitionState::decode(&cp.state)?;
            }
        }
        let w = &ctx.config.windows;
        let params = WindowsParams {
            allowed_lateness_ms: w.allowed_lateness_s as i64 * 1000,
            baseline_window: w.baseline_window,
        };
        let (writer_tx, rx) = mpsc::channel(WRITER_QUEUE);
        let (durable_tx, durable) = watch::channel(BTreeMap::new());
        let writer_backlog = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_checkpoints(
            ctx.clone(),
            rx,
            durable_tx,
            writer_backlog.clone(),
        ));
        Ok(StreamStage {
            ctx,
            anomaly,
            aggregate,
            params,
            parts: BTreeMap::new(),
            assignment: Vec::new(),
            writer_tx: Some(writer_tx),
            writer_backlog,
            writer: Some(writer),
            durable,
            committed: Vec::new(),
        })
    }

    /// Takes partition `p` over: claims its checkpoint (fencing off any
    /// earlier owner), publishes what its outbox still holds, and restores
    /// its windows and position.
    async fn open_partition(&mut self, p: u32) -> Partition {
        let group = checkpoint_group(p);
        let store = self.ctx.store.clone();
        let (epoch, cp) = with_retry(
            &self.ctx,
            "stream",
            "claim a partition's checkpoint",
            || store.claim_checkpoint(&group),
        )
        .await;
        let outbox = outbox_stage(p);
        while let Err(e) = flush_outbox(&self.ctx, STAGE, &outbox).await {
            tracing::error!(partition = p, error = %e, "reading the outbox failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut part = Partition::new(
            p,
            epoch,
            Windows::new(self.params),
            self.ctx.config.windows.anomaly_batch,
        );
        let Some(cp) = cp else {
            return part;
        };
        let state = match PartitionState::decode(&cp.state) {
            Ok(s) => s,
            Err(e) => {
                // Checked at start; only a checkpoint written since by a
                // different build gets here. Its records are replayed from
                // the committed offsets into fresh windows.
                tracing::error!(partition = p, error = %e, "unreadable checkpoint; starting the partition afresh");
                return part;
            }
        };
        part.windows = Windows::restore(self.params, state.windows);
        part.newest_event_ms = state.newest_event_ms;
        // Seen before the checkpoint: its grace has passed.
        part.clock.settled = state.newest_event_ms;
        part.reported_until = state.reported_until;
        if cp.bus_id == self.ctx.bus.log_id() {
            let next = cp
                .positions
                .iter()
                .find(|(t, q, _)| t == Topic::TelemetryReadings.name() && *q == p)
                .map_or(0, |(_, _, o)| *o);
            part.next = next;
            part.checkpointed = next;
            part.replaying = next > 0;
        } else {
            // A volatile bus started over: its records are all new to the
            // restored windows.
            tracing::info!(
                partition = p,
                checkpoint_bus = cp.bus_id,
                bus = self.ctx.bus.log_id(),
                "stream stage: the bus log is new; its records are all folded in"
            );
        }
        let stats = part.windows.stats();
        tracing::info!(
            partition = p,
            epoch,
            meters = stats.meters,
            open_windows = stats.open_windows,
            position = part.next,
            "stream stage: partition resumed from its checkpoint"
        );
        part
    }

    /// Per partition: the anomaly rule on what is batched, windows closed by
    /// the watermark or by a flush interval without readings, closed
    /// windows finished, and a checkpoint when one is due (`idle`: the bus
    /// had nothing, so whatever moved is checkpointed now).
    async fn tick(&mut self, idle: bool) {
        let w = &self.ctx.config.windows;
        let flush_1m = Duration::from_secs(w.flush_interval_1m_s);
        let flush_15m = Duration::from_secs(w.flush_interval_15m_s);
        let mut due = Vec::new();
        for part in self.parts.values_mut() {
            part.detect(&self.ctx, &mut self.anomaly);
            if let Some(ms) = part.clock.settled(Instant::now(), ORDER_GRACE) {
                part.windows.advance_to(ms, &mut part.closed);
            }
            let quiet = part.last_record.elapsed();
            if quiet >= flush_1m {
                part.windows.close_width(Width::OneMinute, &mut part.closed);
            }
            if quiet >= flush_15m {
                part.windows
                    .close_width(Width::FifteenMinutes, &mut part.closed);
            }
            part.handle_closed(&self.ctx, &mut self.aggregate);
            let since = part.last_checkpoint.elapsed();
            let moved = part.next != part.checkpointed
                || part.windows.closed_until(Width::OneMinute) != part.reported_until;
            if (!part.pending.is_empty() && (idle || since >= CHECKPOINT_SPACING))
                || (moved && (idle || since >= CHECKPOINT_INTERVAL))
            {
                due.push((part.last_checkpoint, part.id));
            }
        }
        // A checkpoint holds every open window of its partition, so taking
        // them faster than the writer stores them only makes work that the
        // next one supersedes: while the writer has about one per partition
        // in hand, the partitions waiting longest go first and the rest
        // wait for the next tick (their records keep folding meanwhile).
        let room = if idle {
            usize::MAX
        } else {
            self.parts
                .len()
                .saturating_sub(self.writer_backlog.load(Ordering::Relaxed))
        };
        due.sort_unstable();
        let mut jobs = Vec::new();
        for (_, p) in due.into_iter().take(room) {
            if let Some(part) = self.parts.get_mut(&p) {
                jobs.push(part.checkpoint(&self.ctx));
            }
        }
        self.send(jobs).await;
    }

    /// Hands checkpoints to the writer (waits when it is behind: that is
    /// the stage's backpressure).
    async fn send(&mut self, jobs: Vec<Job>) {
        let Some(tx) = &self.writer_tx else {
            return;
        };
        for job in jobs {
            self.writer_backlog.fetch_add(1, Ordering::Relaxed);
            if tx.send(job).await.is_err() {
                self.ctx
                    .metrics
                    .stage_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!("stream stage: the checkpoint writer is gone");
                return;
            }
        }
    }
}

impl Partition {
    fn new(id: u32, epoch: i64, windows: Windows, batch: usize) -> Partition {
        Partition {
            id,
            epoch,
            windows,
            batch: anomaly::ReadingBatch {
                power_kw: Vec::with_capacity(batch),
                baseline_kw: Vec::with_capacity(batch),
                sample_count: Vec::with_capacity(batch),
            },
            refs: Vec::with_capacity(batch),
            closed: Vec::new(),
            pending: Pending::default(),
            next: 0,
            checkpointed: 0,
            state_bytes: 0,
            newest_event_ms: None,
            clock: EventClock::default(),
            reported_until: 0,
            replaying: false,
            last_record: Instant::now(),
            last_checkpoint: Instant::now(),
        }
    }

    /// Folds a run of this partition's records (in offset order) into the
    /// windows and the anomaly batch, skipping those folded in already.
    fn fold(&mut self, ctx: &Context, anomaly: &mut AnomalyRule, run: &[Delivered]) {
        let late_before = self.windows.stats().late_readings;
        let skip = run.partition_point(|d| d.offset < self.next);
        let Some(last) = run.last().filter(|_| skip < run.len()) else {
            return;
        };
        self.next = last.offset + 1;
        self.last_record = Instant::now();
        let mut newest = i64::MIN;
        let mut n = 0u64;
        for d in &run[skip..] {
            if self.replaying {
                crate::crash::point("stream.replay");
            }
            if let Some(ts) = self.fold_one(ctx, anomaly, d) {
                newest = newest.max(ts);
                n += 1;
            }
        }
        self.replaying = false;
        if newest != i64::MIN {
            self.newest_event_ms = Some(self.newest_event_ms.map_or(newest, |m| m.max(newest)));
            self.clock.saw(self.last_record, newest);
        }
        let m = &ctx.metrics;
        m.readings_processed.fetch_add(n, Ordering::Relaxed);
        m.late_readings.fetch_add(
            self.windows.stats().late_readings - late_before,
            Ordering::Relaxed,
        );
    }

    /// Folds one record into the windows and the anomaly batch; its event
    /// time, or `None` for a record that is not a reading.
    fn fold_one(&mut self, ctx: &Context, anomaly: &mut AnomalyRule, d: &Delivered) -> Option<i64> {
        let reading = match Reading::from_json(&d.record.value) {
            Ok(r) => r,
            Err(e) => {
                bad_record(ctx, d, &e.to_string());
                return None;
            }
        };
        let Some(ts) = reading.event_time_ms() else {
            bad_record(ctx, d, "timestamp is not RFC 3339");
            return None;
        };
        let obs = self.windows.add(
            &reading.meter_id,
            &reading.region,
            ts,
            reading.power_kw,
            reading.energy_kwh,
            reading.voltage,
        );
        self.batch.power_kw.push(reading.power_kw);
        self.batch.baseline_kw.push(obs.baseline_kw);
        self.batch.sample_count.push(obs.sample_count);
        self.refs.push((obs.meter, obs.region, ts));
        if self.refs.len() >= ctx.config.windows.anomaly_batch {
            self.detect(ctx, anomaly);
        }
        Some(ts)
    }

    /// What is pending, the windows' state and the position they cover, as
    /// a checkpoint for the writer.
    fn checkpoint(&mut self, ctx: &Context) -> Job {
        self.last_checkpoint = Instant::now();
        self.checkpointed = self.next;
        let pending = std::mem::take(&mut self.pending);
        let closed_until = self.windows.closed_until(Width::OneMinute);
        let report =
            (!pending.regional.is_empty() || closed_until != self.reported_until).then(|| {
                RegionalPartial {
                    partition: self.id,
                    partitions: ctx.bus.partitions(),
                    closed_until,
                    windows: pending.regional,
                }
            });
        self.reported_until = closed_until;
        let mut meter_windows = Vec::new();
        if !pending.meters_1m.is_empty() {
            meter_windows.push((WindowWidth::OneMinute, pending.meters_1m));
        }
        if !pending.meters_15m.is_empty() {
            meter_windows.push((WindowWidth::FifteenMinutes, pending.meters_15m));
        }
        let state = self.encode_state();
        let effects = Effects {
            meter_windows,
            checkpoint: Some(Checkpoint {
                group: checkpoint_group(self.id),
                epoch: self.epoch,
                bus_id: ctx.bus.log_id().to_owned(),
                positions: vec![(
                    Topic::TelemetryReadings.name().to_owned(),
                    self.id,
                    self.next,
                )],
                state,
            }),
            ..Effects::default()
        };
        Job {
            partition: self.id,
            epoch: self.epoch,
            effects,
            held_back: pending.held_back,
            alerts: pending.alerts,
            dead_letters: pending.dead_letters,
            report,
            position: self.next,
        }
    }

    /// The windows' state as a checkpoint stores it ([`PartitionState`]),
    /// encoded from the windows in place into one buffer the size of the
    /// last one: it is megabytes, and a copy first or a buffer grown by
    /// doubling would write (and zero) its pages several times over.
    fn encode_state(&mut self) -> Vec<u8> {
        let state = PartitionStateRef {
            windows: self.windows.snapshot_ref(),
            newest_event_ms: self.newest_event_ms,
            reported_until: self.reported_until,
        };
        let buf = Vec::with_capacity(self.state_bytes + self.state_bytes / 8);
        let bytes = postcard::to_extend(&state, buf).expect("partition state serializes");
        self.state_bytes = bytes.len();
        bytes
    }

    /// Runs the anomaly rule on the filled batch; findings become alerts,
    /// held until the next checkpoint stores and publishes them.
    fn detect(&mut self, ctx: &Context, anomaly: &mut AnomalyRule) {
        if self.refs.is_empty() {
            return;
        }
        match anomaly.detect(&self.batch) {
            Ok(findings) => {
                ctx.metrics
                    .anomalies
                    .fetch_add(findings.len() as u64, Ordering::Relaxed);
                // Provenance is copied only for a batch that found something.
                if !findings.is_empty() {
                    let rule = anomaly.served_by().provenance();
                    for f in findings {
                        let (meter, region, ts) = self.refs[f.index as usize];
                        let alert = anomaly_alert(
                            self.windows.meter_name(meter),
                            self.windows.region_name(region),
                            ts,
                            &self.batch,
                            &f,
                            &rule,
                        );
                        self.pending.alerts.push(alert);
                    }
                }
            }
            // The windows have the readings regardless.
            Err(e) if anomaly.on_fault() == OnFault::DeadLetter => {
                plugin_failed(
                    ctx,
                    &e,
                    "this anomaly batch is parked on plugin_dead_letter",
                );
                let letter = self.dead_letter(anomaly, &e);
                self.pending.dead_letters.push(letter);
            }
            Err(e) => plugin_failed(ctx, &e, "this anomaly batch raises no alerts"),
        }
        self.batch.power_kw.clear();
        self.batch.baseline_kw.clear();
        self.batch.sample_count.clear();
        self.refs.clear();
    }

    /// The batch the anomaly rule just failed on, as a parked letter.
    fn dead_letter(
        &self,
        anomaly: &AnomalyRule,
        error: &crate::plugins::PluginError,
    ) -> DeadLetter {
        let readings = self
            .refs
            .iter()
            .enumerate()
            .map(|(i, &(meter, region, ts))| ParkedReading {
                meter_id: self.windows.meter_name(meter).to_owned(),
                region: self.windows.region_name(region).to_owned(),
                timestamp_ms: ts,
                power_kw: self.batch.power_kw[i],
                baseline_kw: self.batch.baseline_kw[i],
                sample_count: self.batch.sample_count[i],
            })
            .collect();
        DeadLetter {
            plugin: anomaly.calling().name.clone(),
            call: "detect".to_owned(),
            failed: anomaly.calling().provenance(),
            reason: error.to_string(),
            parked_at: crate::time::now_ms(),
            readings,
        }
    }

    /// Closed windows: through the aggregate rule into what is pending, and
    /// on-time 1-minute ones into this partition's regional report.
    fn handle_closed(&mut self, ctx: &Context, aggregate: &mut AggregateRule) {
        let closed = std::mem::take(&mut self.closed);
        for window in &closed {
            ctx.metrics.windows_closed.fetch_add(1, Ordering::Relaxed);
            self.finish_meters(ctx, aggregate, window);
            if window.width == Width::OneMinute && !window.late {
                self.report_regions(window);
            }
        }
        self.closed = closed;
        self.closed.clear();
    }

    fn finish_meters(
        &mut self,
        ctx: &Context,
        aggregate: &mut AggregateRule,
        window: &ClosedWindow,
    ) {
        let inputs: Vec<aggregate::MeterWindow> = window
            .meters
            .iter()
            .map(|m| aggregate::MeterWindow {
                count: m.sums.count,
                power_sum: m.sums.power_sum,
                max_power: m.sums.max_power,
                min_power: m.sums.min_power,
                energy_sum: m.sums.energy_sum,
                voltage_sum: m.sums.voltage_sum,
                voltage_count: m.sums.voltage_count,
            })
            .collect();
        let finished = match aggregate.finish_meters(&inputs) {
            Ok(f) => f,
            Err(e) => {
                plugin_failed(ctx, &e, "plain averages for this window");
                inputs.iter().map(plain_meter_aggregate).collect()
            }
        };
        let rows: Vec<store::MeterAggregate> = window
            .meters
            .iter()
            .zip(&finished)
            .map(|(m, f)| store::MeterAggregate {
                meter_id: self.windows.meter_name(m.meter).to_owned(),
                region: self.windows.region_name(m.region).to_owned(),
                window_start_ms: window.start_ms,
                avg_power_kw: f.avg_power_kw,
                max_power_kw: f.max_power_kw,
                min_power_kw: f.min_power_kw,
                energy_kwh_sum: f.energy_kwh_sum,
                voltage_avg: f.voltage_avg,
                count: f.count,
                power_sum: m.sums.power_sum,
                voltage_sum: m.sums.voltage_sum,
                voltage_count: m.sums.voltage_count,
            })
            .collect();
        // Held back is rare: the common case costs no key copy.
        for (row, f) in rows.iter().zip(&finished) {
            if !f.publish {
                self.pending
                    .held_back
                    .insert((row.meter_id.clone(), row.window_start_ms));
            } else if !self.pending.held_back.is_empty() {
                self.pending
                    .held_back
                    .remove(&(row.meter_id.clone(), row.window_start_ms));
            }
        }
        match window.width {
            Width::OneMinute => self.pending.meters_1m.extend(rows),
            Width::FifteenMinutes => self.pending.meters_15m.extend(rows),
        }
    }

    /// This partition's share of the regional sums of an on-time 1-minute
    /// window (the regional stage adds up every partition's).
    fn report_regions(&mut self, window: &ClosedWindow) {
        let regions = self
            .windows
            .regional(window)
            .into_iter()
            .map(|r| PartialRegion {
                region: self.windows.region_name(r.region).to_owned(),
                meter_count: r.meter_count,
                total_kw: r.total_kw,
                max_kw: r.max_kw,
                min_kw: r.min_kw,
                active_meters: r
                    .meters
                    .iter()
                    .map(|m| self.windows.meter_name(*m).to_owned())
                    .collect(),
            })
            .collect();
        self.pending.regional.push(PartialWindow {
            timestamp_ms: window.start_ms,
            regions,
        });
    }
}

/// The newest event time a partition has seen, as of a while ago: what
/// its watermark follows (see [`ORDER_GRACE`]).
#[derive(Default)]
struct EventClock {
    /// (when, newest event time then), newest last, rising.
    recent: std::collections::VecDeque<(Instant, i64)>,
    /// The newest event time seen at least the grace ago.
    settled: Option<i64>,
}

impl EventClock {
    fn saw(&mut self, at: Instant, newest: i64) {
        let rising = self.recent.back().map_or(self.settled, |&(_, n)| Some(n));
        if rising.is_none_or(|n| newest > n) {
            self.recent.push_back((at, newest));
        }
    }

    fn settled(&mut self, now: Instant, grace: Duration) -> Option<i64> {
        while let Some(&(at, ms)) = self.recent.front() {
            if now.saturating_duration_since(at) < grace {
                break;
            }
            self.settled = Some(self.settled.map_or(ms, |s| s.max(ms)));
            self.recent.pop_front();
        }
        self.settled
    }
}

fn bad_record(ctx: &Context, d: &Delivered, why: &str) {
    // Ingest validated it, so this is a foreign producer or a bug: count,
    // log, skip (a poison record must not stop the stream).
    ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        partition = d.partition,
        offset = d.offset,
        why,
        "skipping a record that is not a reading"
    );
}

/// A partition's checkpoint on its way to the store.
struct Job {
    partition: u32,
    epoch: i64,
    effects: Effects,
    held_back: HashSet<(String, i64)>,
    alerts: Vec<Alert>,
    dead_letters: Vec<DeadLetter>,
    report: Option<RegionalPartial>,
    position: u64,
}

/// Checkpoints waiting for the writer, at most.
const WRITER_QUEUE: usize = 8;

/// The checkpoint writer: stores each checkpoint with its outbox, publishes
/// the outbox, and then makes its position committable — in the order the
/// checkpoints were taken, in its own task so the stream stage goes on
/// folding readings while SQL runs. A checkpoint fenced off (another
/// process claimed the partition since) is dropped with what it held: the
/// new owner replays those records.
async fn write_checkpoints(
    ctx: Context,
    mut rx: mpsc::Receiver<Job>,
    durable: watch::Sender<BTreeMap<u32, (i64, u64)>>,
    backlog: Arc<AtomicUsize>,
) {
    while let Some(job) = rx.recv().await {
        let _written = Written(&backlog);
        crate::crash::point("stream.before_checkpoint");
        let outbox = |applied: &Applied| messages(&job, applied, &*ctx.bus);
        let stage = outbox_stage(job.partition);
        if apply_fenced(&ctx, STAGE, &stage, &job.effects, &outbox)
            .await
            .is_some()
        {
            durable.send_modify(|d| {
                d.insert(job.partition, (job.epoch, job.position));
            });
        }
    }
}

/// Takes one off the writer's backlog when dropped (a job written, or
/// abandoned).
struct Written<'a>(&'a AtomicUsize);

impl Drop for Written<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a checkpoint publishes: its anomaly alerts and parked batches, its
/// meter windows as stored (merged, for a late window) where the bus
/// [carries](Bus::carries) them (on Kafka, not on the in-process bus: no
/// one could read them there), its regional report.
fn messages(job: &Job, applied: &Applied, bus: &dyn Bus) -> Vec<KeyedMessage> {
    let mut out = keyed(&job.alerts);
    out.extend(keyed(&job.dead_letters));
    for ((width, _), rows) in job.effects.meter_windows.iter().zip(&applied.meter_windows) {
        let fifteen = *width == WindowWidth::FifteenMinutes;
        if !bus.carries(MeterWindow::topic(fifteen)) {
            continue;
        }
        out.extend(
            rows.iter()
                .filter(|r| {
                    job.held_back.is_empty()
                        || !job
                            .held_back
                            .contains(&(r.meter_id.clone(), r.window_start_ms))
                })
                .map(|r| {
                    MeterWindow {
                        meter_id: r.meter_id.clone(),
                        region: r.region.clone(),
                        window_start_ms: r.window_start_ms,
                        avg_power_kw: r.avg_power_kw,
                        max_power_kw: r.max_power_kw,
                        min_power_kw: r.min_power_kw,
                        energy_kwh_sum: r.energy_kwh_sum,
                        voltage_avg: r.voltage_avg,
                        count: r.count,
                    }
                    .keyed(fifteen)
                }),
        );
    }
    if let Some(report) = &job.report {
        out.push(KeyedMessage::of(report));
    }
    out
}

/// The seed's anomaly alert (key meter_id, headers type/severity/region) for
/// finding `f` of `batch`, on the reading of `meter_id` in `region` at `ts`.
pub(super) fn anomaly_alert(
    meter_id: &str,
    region: &str,
    ts: i64,
    batch: &anomaly::ReadingBatch,
    f: &anomaly::Finding,
    rule: &RuleRef,
) -> Alert {
    let i = f.index as usize;
    let kind = match f.kind {
        anomaly::AnomalyKind::Spike => AnomalyKind::Spike,
        anomaly::AnomalyKind::Drop => AnomalyKind::Drop,
        anomaly::AnomalyKind::Outage => AnomalyKind::Outage,
    };
    Alert {
        id: Alert::derived_id(AlertType::Anomaly, meter_id, ts),
        alert_type: AlertType::Anomaly,
        severity: f.severity.into(),
        meter_id: Some(meter_id.to_owned()),
        region: Some(region.to_owned()),
        timestamp_ms: ts,
        message: f.message.clone(),
        metadata: AlertMetadata::Anomaly(AnomalyMetadata {
            baseline: round(batch.baseline_kw[i], 3),
            current: batch.power_kw[i],
            change: round(f.change * 100.0, 1),
            kind,
        }),
        rule: Some(rule.clone()),
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// The host's fallback when the aggregate rule fails: plain averages.
fn plain_meter_aggregate(w: &aggregate::MeterWindow) -> aggregate::MeterAggregate {
    aggregate::MeterAggregate {
        avg_power_kw: if w.count == 0 {
            0.0
        } else {
            w.power_sum / f64::from(w.count)
        },
        max_power_kw: w.max_power,
        min_power_kw: w.min_power,
        energy_kwh_sum: w.energy_sum,
        voltage_avg: (w.voltage_count > 0).then(|| w.voltage_sum / f64::from(w.voltage_count)),
        count: w.count,
        publish: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_state_decodes_as_the_partition_state_it_was_encoded_from() {
        let params = WindowsParams {
            allowed_lateness_ms: 5_000,
            baseline_window: 4,
        };
        let mut part = Partition::new(0, 1, Windows::new(params), 8);
        for i in 0..50i64 {
            let meter = format!("M{}", i % 5);
            part.windows
                .add(&meter, "N", i * 7_000, i as f64, Some(0.1), None);
        }
        part.newest_event_ms = Some(49 * 7_000);
        part.reported_until = 60_000;
        let bytes = part.encode_state();
        assert_eq!(part.encode_state(), bytes, "encoding is deterministic");
        let state = PartitionState::decode(&bytes).expect("the state decodes");
        assert_eq!(state.windows, part.windows.snapshot());
        assert_eq!(state.newest_event_ms, Some(49 * 7_000));
        assert_eq!(state.reported_until, 60_000);
    }
}
