//! The stream stage (`stream-processor-group` on `telemetry-readings`):
//! readings into windows, the anomaly rule per batch, and closed windows
//! through the aggregate rule into the store and onto the aggregate topics.
//!
//! The per-reading work is a JSON parse and [`Windows::add`]; the anomaly
//! rule is called once per batch of up to `windows.anomaly_batch` readings,
//! the aggregate rule once per closed window (all meters at once).
//!
//! Exactly once: what the stage derives (closed windows, regional windows,
//! anomaly alerts) is held until the next *checkpoint* — at least every
//! [`CHECKPOINT_INTERVAL`], and whenever windows close. A checkpoint is one
//! store transaction holding those rows, the messages to publish (outbox),
//! the open windows and baselines ([`crate::windows::Snapshot`]) and the bus
//! positions they cover. Bus offsets are committed only up to the last
//! stored checkpoint. After a crash the stage restores the checkpoint and
//! skips the redelivered records below its positions, so a reading is
//! folded into exactly one stored state. Checkpoints are written by a writer
//! task beside the folding, in order; when it falls behind, the stage waits.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{
    CommitPoint, Context, PipelineError, STREAM_GROUP, Stage, apply, flush_outbox, keyed,
    plugin_failed,
};
use crate::bus::{Delivered, Topic};
use crate::messages::{
    Alert, AlertMetadata, AlertType, AnomalyKind, AnomalyMetadata, KeyedMessage, MeterWindow,
    RegionalWindow,
};
use crate::plugins::{AggregateRule, AnomalyRule, aggregate, anomaly};
use crate::reading::Reading;
use crate::store::{self, Applied, Checkpoint, Effects, WindowWidth};
use crate::windows::{
    ClosedWindow, MeterIdx, RegionIdx, Snapshot, SnapshotError, Width, Windows, WindowsParams,
};

/// The stage's name in the outbox and in crash points.
const STAGE: &str = "stream";

/// What a checkpoint holds of the stage: its windows and the newest event
/// time of each partition (the watermark's inputs).
#[derive(serde::Serialize, serde::Deserialize)]
struct StageState {
    windows: Snapshot,
    partition_event_ms: Vec<(String, u32, i64)>,
}

impl StageState {
    fn decode(bytes: &[u8]) -> Result<StageState, SnapshotError> {
        let s: StageState =
            postcard::from_bytes(bytes).map_err(|e| SnapshotError(e.to_string()))?;
        s.windows.check()?;
        Ok(s)
    }
}

/// The longest the stage goes without a checkpoint while records arrive.
/// Bus offsets are committed only at checkpoints, so this bounds the replay
/// after a crash and, with the bus's lag bound, the rate ingest can sustain.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);

pub struct StreamStage {
    ctx: Context,
    anomaly: AnomalyRule,
    aggregate: AggregateRule,
    windows: Windows,
    /// The anomaly batch being filled, as columns.
    batch: anomaly::ReadingBatch,
    /// Who each batch entry is: meter, region, event time.
    refs: Vec<(MeterIdx, RegionIdx, i64)>,
    closed: Vec<ClosedWindow>,
    /// Derived since the last checkpoint.
    pending: Pending,
    /// Per partition, the offset of the next record not yet folded in.
    positions: BTreeMap<(Topic, u32), u64>,
    /// Per partition, the newest event time folded in and when it last
    /// delivered. The watermark is the slowest active partition's: on Kafka
    /// one partition may be fetched ahead of the others, and its readings
    /// must not make theirs late. A partition silent for the 1-minute flush
    /// interval stops holding the watermark back.
    partition_event_ms: BTreeMap<(Topic, u32), (i64, Instant)>,
    /// Per partition, the position of the checkpoint restored at start:
    /// records below it are already in the restored state and are skipped.
    replay_until: BTreeMap<(Topic, u32), u64>,
    /// Until the first poll after a restart is folded: that poll holds what
    /// the bus redelivers (crash point `stream.replay`).
    replaying: bool,
    last_record: Instant,
    last_checkpoint: Instant,
    /// To the checkpoint writer; `None` once finished.
    writer_tx: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    /// Positions of the last checkpoint the writer stored.
    durable: watch::Receiver<Vec<(Topic, u32, u64)>>,
    /// What the bus was last told to commit.
    committed: Vec<(Topic, u32, u64)>,
}

/// What the stage derived since its last checkpoint.
#[derive(Default)]
struct Pending {
    meters_1m: Vec<store::MeterAggregate>,
    meters_15m: Vec<store::MeterAggregate>,
    /// (meter, window start) the aggregate rule held back from publishing.
    held_back: HashSet<(String, i64)>,
    regional: Vec<store::RegionalAggregate>,
    capacities: Vec<f64>,
    alerts: Vec<Alert>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.meters_1m.is_empty()
            && self.meters_15m.is_empty()
            && self.regional.is_empty()
            && self.alerts.is_empty()
    }
}

impl Stage for StreamStage {
    const NAME: &'static str = "stream";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        self.last_record = Instant::now();
        self.fold(records);
        self.detect();
        if let Some(event_ms) = self.watermark_event_ms() {
            self.windows.advance_to(event_ms, &mut self.closed);
        }
        self.handle_closed();
        if !self.pending.is_empty() || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            self.checkpoint().await;
        }
    }

    /// Closes what has waited a whole flush interval without new readings,
    /// and checkpoints what is pending.
    async fn idle(&mut self) {
        let idle = self.last_record.elapsed();
        let w = &self.ctx.config.windows;
        if idle >= Duration::from_secs(w.flush_interval_1m_s) {
            self.windows.close_width(Width::OneMinute, &mut self.closed);
        }
        if idle >= Duration::from_secs(w.flush_interval_15m_s) {
            self.windows
                .close_width(Width::FifteenMinutes, &mut self.closed);
        }
        self.handle_closed();
        if !self.pending.is_empty() || self.positions_moved() {
            self.checkpoint().await;
        }
    }

    /// Shutdown: everything open is closed and checkpointed (stored and
    /// published) before the stage returns.
    async fn finish(&mut self) {
        self.windows.close_all(&mut self.closed);
        self.handle_closed();
        self.checkpoint().await;
        self.writer_tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
    }

    fn commit_point(&mut self) -> CommitPoint {
        let durable = self.durable.borrow_and_update();
        if *durable == self.committed {
            return CommitPoint::Nothing;
        }
        self.committed = durable.clone();
        CommitPoint::Positions(self.committed.clone())
    }
}

impl StreamStage {
    /// Publishes what the outbox still holds, and restores the last
    /// checkpoint (open windows, baselines, positions) if there is one.
    pub async fn new(
        ctx: Context,
        anomaly: AnomalyRule,
        aggregate: AggregateRule,
    ) -> Result<StreamStage, PipelineError> {
        flush_outbox(&ctx, STAGE).await?;
        let w = &ctx.config.windows;
        let params = WindowsParams {
            allowed_lateness_ms: w.allowed_lateness_s as i64 * 1000,
            baseline_window: w.baseline_window,
        };
        let mut positions = BTreeMap::new();
        let mut partition_event_ms = BTreeMap::new();
        let windows = match ctx.store.load_checkpoint(STREAM_GROUP).await? {
            Some(cp) => {
                let state = StageState::decode(&cp.state)?;
                let snapshot = state.windows;
                for (topic, partition, ms) in state.partition_event_ms {
                    if let Some(topic) = Topic::from_name(&topic) {
                        partition_event_ms.insert((topic, partition), (ms, Instant::now()));
                    }
                }
                if cp.bus_id == ctx.bus.log_id() {
                    for (topic, partition, offset) in cp.positions {
                        if let Some(topic) = Topic::from_name(&topic) {
                            positions.insert((topic, partition), offset);
                        }
                    }
                } else {
                    // A volatile bus started over: its records are all new
                    // to the restored windows.
                    tracing::info!(
                        checkpoint_bus = cp.bus_id,
                        bus = ctx.bus.log_id(),
                        "stream stage: the bus log is new; its records are all folded in"
                    );
                }
                let windows = Windows::restore(params, snapshot);
                let stats = windows.stats();
                tracing::info!(
                    meters = stats.meters,
                    open_windows = stats.open_windows,
                    ?positions,
                    "stream stage: resuming from its checkpoint"
                );
                windows
            }
            None => Windows::new(params),
        };
        let cap = w.anomaly_batch;
        let (writer_tx, rx) = mpsc::channel(WRITER_QUEUE);
        let start: Vec<(Topic, u32, u64)> =
            positions.iter().map(|(&(t, p), &o)| (t, p, o)).collect();
        let (durable_tx, durable) = watch::channel(start.clone());
        let writer = tokio::spawn(write_checkpoints(ctx.clone(), rx, durable_tx));
        Ok(StreamStage {
            ctx,
            anomaly,
            aggregate,
            windows,
            batch: anomaly::ReadingBatch {
                power_kw: Vec::with_capacity(cap),
                baseline_kw: Vec::with_capacity(cap),
                sample_count: Vec::with_capacity(cap),
            },
            refs: Vec::with_capacity(cap),
            closed: Vec::new(),
            pending: Pending::default(),
            replaying: !positions.is_empty(),
            replay_until: positions.clone(),
            positions,
            partition_event_ms,
            last_record: Instant::now(),
            last_checkpoint: Instant::now(),
            writer_tx: Some(writer_tx),
            writer: Some(writer),
            durable,
            committed: start,
        })
    }

    /// Folds a poll's records into the windows and the anomaly batch.
    fn fold(&mut self, records: &[Delivered]) {
        let late_before = self.windows.stats().late_readings;
        let now = Instant::now();
        let mut n = 0u64;
        // Partition bookkeeping once per run of one partition's records (a
        // poll hands them over in offset order), not once per reading.
        for run in records.chunk_by(|a, b| (a.topic, a.partition) == (b.topic, b.partition)) {
            let tp = (run[0].topic, run[0].partition);
            // Records below the restored checkpoint are already folded in.
            let skip = self
                .replay_until
                .get(&tp)
                .map_or(0, |&until| run.partition_point(|d| d.offset < until));
            let Some(last) = run.last().filter(|_| skip < run.len()) else {
                continue;
            };
            let next = self.positions.entry(tp).or_insert(0);
            *next = (*next).max(last.offset + 1);
            let mut newest = i64::MIN;
            for d in &run[skip..] {
                if self.replaying {
                    crate::crash::point("stream.replay");
                }
                if let Some(ts) = self.fold_one(d) {
                    newest = newest.max(ts);
                    n += 1;
                }
            }
            if newest != i64::MIN {
                let seen = self.partition_event_ms.entry(tp).or_insert((newest, now));
                *seen = (seen.0.max(newest), now);
            }
        }
        self.replaying = false;
        let m = &self.ctx.metrics;
        m.readings_processed.fetch_add(n, Ordering::Relaxed);
        m.late_readings.fetch_add(
            self.windows.stats().late_readings - late_before,
            Ordering::Relaxed,
        );
    }

    /// Folds one record into the windows and the anomaly batch; its event
    /// time, or `None` for a record that is not a reading.
    fn fold_one(&mut self, d: &Delivered) -> Option<i64> {
        let reading: Reading<'_> = match serde_json::from_slice(&d.record.value) {
            Ok(r) => r,
            Err(e) => {
                self.bad_record(d, &e.to_string());
                return None;
            }
        };
        let Some(ts) = reading.event_time_ms() else {
            self.bad_record(d, "timestamp is not RFC 3339");
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
        if self.refs.len() >= self.ctx.config.windows.anomaly_batch {
            self.detect();
        }
        Some(ts)
    }

    /// The event time windows may close up to: the newest event time of the
    /// slowest partition that delivered within the 1-minute flush interval.
    fn watermark_event_ms(&self) -> Option<i64> {
        let idle = Duration::from_secs(self.ctx.config.windows.flush_interval_1m_s);
        self.partition_event_ms
            .values()
            .filter(|(_, at)| at.elapsed() < idle)
            .map(|(ms, _)| *ms)
            .min()
    }

    /// Whether records were folded since the last checkpoint was sent.
    fn positions_moved(&self) -> bool {
        self.positions.len() != self.committed.len()
            || self
                .committed
                .iter()
                .any(|(t, p, o)| self.positions.get(&(*t, *p)) != Some(o))
    }

    /// Sends what is pending, the windows' state and the positions they
    /// cover to the writer (waits when it is behind: that is the stage's
    /// backpressure).
    async fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        let positions: Vec<(Topic, u32, u64)> = self
            .positions
            .iter()
            .map(|(&(t, p), &o)| (t, p, o))
            .collect();
        let pending = std::mem::take(&mut self.pending);
        let mut meter_windows = Vec::new();
        if !pending.meters_1m.is_empty() {
            meter_windows.push((WindowWidth::OneMinute, pending.meters_1m));
        }
        if !pending.meters_15m.is_empty() {
            meter_windows.push((WindowWidth::FifteenMinutes, pending.meters_15m));
        }
        let effects = Effects {
            meter_windows,
            regional_windows: pending.regional,
            checkpoint: Some(Checkpoint {
                group: STREAM_GROUP.to_owned(),
                bus_id: self.ctx.bus.log_id().to_owned(),
                positions: positions
                    .iter()
                    .map(|(t, p, o)| (t.name().to_owned(), *p, *o))
                    .collect(),
                state: postcard::to_stdvec(&StageState {
                    windows: self.windows.snapshot(),
                    partition_event_ms: self
                        .partition_event_ms
                        .iter()
                        .map(|(&(t, p), &(ms, _))| (t.name().to_owned(), p, ms))
                        .collect(),
                })
                .expect("stage state serializes"),
            }),
            ..Effects::default()
        };
        let job = Job {
            effects,
            held_back: pending.held_back,
            capacities: pending.capacities,
            alerts: pending.alerts,
            positions,
        };
        let Some(tx) = &self.writer_tx else {
            return;
        };
        if tx.send(job).await.is_err() {
            self.ctx
                .metrics
                .stage_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("stream stage: the checkpoint writer is gone");
        }
    }

    fn bad_record(&self, d: &Delivered, why: &str) {
        // Ingest validated it, so this is a foreign producer or a bug: count,
        // log, skip (a poison record must not stop the stream).
        self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            partition = d.partition,
            offset = d.offset,
            why,
            "skipping a record that is not a reading"
        );
    }

    /// Runs the anomaly rule on the filled batch; findings become alerts,
    /// held until the next checkpoint stores and publishes them.
    fn detect(&mut self) {
        if self.refs.is_empty() {
            return;
        }
        match self.anomaly.detect(&self.batch) {
            Ok(findings) => {
                self.ctx
                    .metrics
                    .anomalies
                    .fetch_add(findings.len() as u64, Ordering::Relaxed);
                for f in findings {
                    let alert = self.alert(&f);
                    self.pending.alerts.push(alert);
                }
            }
            Err(e) => {
                // The windows have the readings regardless.
                plugin_failed(&self.ctx, &e, "this anomaly batch raises no alerts");
            }
        }
        self.batch.power_kw.clear();
        self.batch.baseline_kw.clear();
        self.batch.sample_count.clear();
        self.refs.clear();
    }

    /// The seed's anomaly alert (key meter_id, headers type/severity/region).
    fn alert(&self, f: &anomaly::Finding) -> Alert {
        let i = f.index as usize;
        let (meter, region, ts) = self.refs[i];
        let kind = match f.kind {
            anomaly::AnomalyKind::Spike => AnomalyKind::Spike,
            anomaly::AnomalyKind::Drop => AnomalyKind::Drop,
            anomaly::AnomalyKind::Outage => AnomalyKind::Outage,
        };
        Alert {
            id: uuid::Uuid::new_v4(),
            alert_type: AlertType::Anomaly,
            severity: f.severity.into(),
            meter_id: Some(self.windows.meter_name(meter).to_owned()),
            region: Some(self.windows.region_name(region).to_owned()),
            timestamp_ms: ts,
            message: f.message.clone(),
            metadata: AlertMetadata::Anomaly(AnomalyMetadata {
                baseline: round(self.batch.baseline_kw[i], 3),
                current: self.batch.power_kw[i],
                change: round(f.change * 100.0, 1),
                kind,
            }),
        }
    }

    /// Closed windows: through the aggregate rule into what is pending.
    fn handle_closed(&mut self) {
        let closed = std::mem::take(&mut self.closed);
        for window in &closed {
            self.ctx
                .metrics
                .windows_closed
                .fetch_add(1, Ordering::Relaxed);
            self.finish_meters(window);
            if window.width == Width::OneMinute && !window.late {
                self.finish_regions(window);
            }
        }
        self.closed = closed;
        self.closed.clear();
    }

    fn finish_meters(&mut self, window: &ClosedWindow) {
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
        let finished = match self.aggregate.finish_meters(&inputs) {
            Ok(f) => f,
            Err(e) => {
                plugin_failed(&self.ctx, &e, "plain averages for this window");
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
        for (row, f) in rows.iter().zip(&finished) {
            let key = (row.meter_id.clone(), row.window_start_ms);
            if f.publish {
                self.pending.held_back.remove(&key);
            } else {
                self.pending.held_back.insert(key);
            }
        }
        match window.width {
            Width::OneMinute => self.pending.meters_1m.extend(rows),
            Width::FifteenMinutes => self.pending.meters_15m.extend(rows),
        }
    }

    fn finish_regions(&mut self, window: &ClosedWindow) {
        let sums = self.windows.regional(window);
        let inputs: Vec<aggregate::RegionWindow> = sums
            .iter()
            .map(|r| aggregate::RegionWindow {
                meter_count: r.meter_count,
                total_kw: r.total_kw,
                max_kw: r.max_kw,
                min_kw: r.min_kw,
                capacity_kw: self
                    .ctx
                    .config
                    .region(self.windows.region_name(r.region))
                    .capacity_kw,
            })
            .collect();
        let finished = match self.aggregate.finish_regions(&inputs) {
            Ok(f) => f,
            Err(e) => {
                plugin_failed(&self.ctx, &e, "plain regional figures for this window");
                inputs.iter().map(plain_regional_aggregate).collect()
            }
        };
        let rows: Vec<store::RegionalAggregate> = sums
            .iter()
            .zip(&finished)
            .map(|(r, f)| store::RegionalAggregate {
                region: self.windows.region_name(r.region).to_owned(),
                window_start_ms: window.start_ms,
                meter_count: r.meter_count,
                total_consumption: f.total_consumption,
                avg_consumption: f.avg_consumption,
                max_consumption: f.max_consumption,
                min_consumption: f.min_consumption,
                load_percentage: f.load_percentage,
                active_meters: r
                    .meters
                    .iter()
                    .map(|m| self.windows.meter_name(*m).to_owned())
                    .collect(),
            })
            .collect();
        self.pending
            .capacities
            .extend(inputs.iter().map(|i| i.capacity_kw));
        self.pending.regional.extend(rows);
    }
}

/// A checkpoint on its way to the store.
struct Job {
    effects: Effects,
    held_back: HashSet<(String, i64)>,
    /// Per regional window, its region's capacity (for the message).
    capacities: Vec<f64>,
    alerts: Vec<Alert>,
    positions: Vec<(Topic, u32, u64)>,
}

/// Checkpoints waiting for the writer, at most.
const WRITER_QUEUE: usize = 4;

/// The checkpoint writer: stores each checkpoint with its outbox, publishes
/// the outbox, and then makes its positions committable — in the order the
/// checkpoints were taken, in its own task so the stream stage goes on
/// folding readings while SQL runs.
async fn write_checkpoints(
    ctx: Context,
    mut rx: mpsc::Receiver<Job>,
    durable: watch::Sender<Vec<(Topic, u32, u64)>>,
) {
    while let Some(job) = rx.recv().await {
        crate::crash::point("stream.before_checkpoint");
        let outbox = |applied: &Applied| messages(&job, applied);
        apply(&ctx, STAGE, &job.effects, &outbox).await;
        let _ = durable.send(job.positions);
    }
}

/// What a checkpoint publishes: its anomaly alerts, its meter windows as
/// stored (merged, for a late window), its regional windows.
fn messages(job: &Job, applied: &Applied) -> Vec<KeyedMessage> {
    let mut out = keyed(&job.alerts);
    for ((width, _), rows) in job.effects.meter_windows.iter().zip(&applied.meter_windows) {
        let fifteen = *width == WindowWidth::FifteenMinutes;
        out.extend(
            rows.iter()
                .filter(|r| {
                    !job.held_back
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
    let regional: Vec<RegionalWindow> = job
        .effects
        .regional_windows
        .iter()
        .zip(&job.capacities)
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
        .collect();
    out.extend(keyed(&regional));
    out
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
