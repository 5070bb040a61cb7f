//! The stream stage (`stream-processor-group` on `telemetry-readings`):
//! readings into windows, the anomaly rule per batch, and closed windows
//! through the aggregate rule into the store and onto the aggregate topics.
//!
//! The per-reading work is a JSON parse and [`Windows::add`]; the anomaly
//! rule is called once per batch of up to `windows.anomaly_batch` readings,
//! the aggregate rule once per closed window (all meters at once). Storing and
//! publishing closed windows happens in a writer task fed through a short
//! bounded queue, so SQL runs beside the folding of the next readings rather
//! than in series with it; when the writer falls behind, the stage waits.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Context, Stage, json_record, plugin_failed, publish, with_retry};
use crate::bus::{Delivered, Topic};
use crate::plugins::{AggregateRule, AnomalyRule, Severity, aggregate, anomaly};
use crate::reading::Reading;
use crate::store;
use crate::windows::{ClosedWindow, MeterIdx, RegionIdx, Width, Windows, WindowsParams};

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
    /// Alert records found but not yet published.
    alerts_out: Vec<crate::bus::Record>,
    last_record: Instant,
    /// To the window writer; `None` once finished.
    writer_tx: Option<mpsc::Sender<Closed>>,
    writer: Option<JoinHandle<()>>,
}

impl Stage for StreamStage {
    const NAME: &'static str = "stream";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        self.last_record = Instant::now();
        self.fold(records);
        self.run_anomaly().await;
        self.windows.advance(&mut self.closed);
        self.handle_closed().await;
    }

    /// Closes what has waited a whole flush interval without new readings.
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
        self.handle_closed().await;
    }

    /// Shutdown: everything open is closed, stored and published.
    async fn finish(&mut self) {
        self.windows.close_all(&mut self.closed);
        self.handle_closed().await;
        self.writer_tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
    }
}

impl StreamStage {
    pub fn new(ctx: Context, anomaly: AnomalyRule, aggregate: AggregateRule) -> StreamStage {
        let w = &ctx.config.windows;
        let windows = Windows::new(WindowsParams {
            allowed_lateness_ms: w.allowed_lateness_s as i64 * 1000,
            baseline_window: w.baseline_window,
        });
        let cap = w.anomaly_batch;
        let (writer_tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer = tokio::spawn(write_closed(ctx.clone(), rx));
        StreamStage {
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
            alerts_out: Vec::new(),
            last_record: Instant::now(),
            writer_tx: Some(writer_tx),
            writer: Some(writer),
        }
    }

    /// Folds a poll's records into the windows and the anomaly batch.
    fn fold(&mut self, records: &[Delivered]) {
        let late_before = self.windows.stats().late_readings;
        let mut n = 0u64;
        for d in records {
            let reading: Reading<'_> = match serde_json::from_slice(&d.record.value) {
                Ok(r) => r,
                Err(e) => {
                    self.bad_record(d, &e.to_string());
                    continue;
                }
            };
            let Some(ts) = reading.event_time_ms() else {
                self.bad_record(d, "timestamp is not RFC 3339");
                continue;
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
            n += 1;
            if self.refs.len() >= self.ctx.config.windows.anomaly_batch {
                self.detect();
            }
        }
        let m = &self.ctx.metrics;
        m.readings_processed.fetch_add(n, Ordering::Relaxed);
        m.late_readings.fetch_add(
            self.windows.stats().late_readings - late_before,
            Ordering::Relaxed,
        );
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

    /// Runs the anomaly rule on the filled batch; findings become alert
    /// records, held until [`Self::run_anomaly`] publishes them.
    fn detect(&mut self) {
        if self.refs.is_empty() {
            return;
        }
        match self.anomaly.detect(&self.batch) {
            Ok(findings) => {
                let now = crate::time::now_ms();
                for f in findings {
                    let record = self.alert_record(&f, now);
                    self.alerts_out.push(record);
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

    /// Runs the rule on what is left in the batch and publishes the alerts.
    async fn run_anomaly(&mut self) {
        self.detect();
        if !self.alerts_out.is_empty() {
            let alerts = std::mem::take(&mut self.alerts_out);
            self.ctx
                .metrics
                .anomalies
                .fetch_add(alerts.len() as u64, Ordering::Relaxed);
            publish(&self.ctx, Topic::Alerts, alerts).await;
        }
    }

    /// The seed's anomaly alert: key meter_id, headers type/severity/region.
    fn alert_record(&self, f: &anomaly::Finding, now: i64) -> crate::bus::Record {
        let i = f.index as usize;
        let (meter, region, ts) = self.refs[i];
        let meter = self.windows.meter_name(meter);
        let region = self.windows.region_name(region);
        let kind = match f.kind {
            anomaly::AnomalyKind::Spike => "spike",
            anomaly::AnomalyKind::Drop => "drop",
            anomaly::AnomalyKind::Outage => "outage",
        };
        let severity = severity_name(f.severity);
        let value = json!({
            "id": uuid::Uuid::new_v4(),
            "type": "ANOMALY",
            "severity": severity,
            "meter_id": meter,
            "region": region,
            "timestamp": crate::time::format_rfc3339_ms(ts),
            "message": f.message,
            "metadata": {
                "baseline": round(self.batch.baseline_kw[i], 3),
                "current": self.batch.power_kw[i],
                "change": round(f.change * 100.0, 1),
                "type": kind,
            },
        });
        json_record(
            meter,
            &value,
            &[
                ("type", "ANOMALY"),
                ("severity", severity),
                ("region", region),
            ],
            now,
        )
    }

    /// Closed windows: the aggregate rule, the store, the aggregate topics.
    async fn handle_closed(&mut self) {
        let closed = std::mem::take(&mut self.closed);
        for window in &closed {
            self.ctx
                .metrics
                .windows_closed
                .fetch_add(1, Ordering::Relaxed);
            self.finish_meters(window).await;
            if window.width == Width::OneMinute && !window.late {
                self.finish_regions(window).await;
            }
        }
        self.closed = closed;
        self.closed.clear();
    }

    async fn finish_meters(&mut self, window: &ClosedWindow) {
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
        let publish = finished.iter().map(|f| f.publish).collect();
        self.send(Closed::Meters {
            width: window.width,
            rows,
            publish,
        })
        .await;
    }

    async fn finish_regions(&mut self, window: &ClosedWindow) {
        let sums = Windows::regional(window);
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
        let capacities = inputs.iter().map(|i| i.capacity_kw).collect();
        self.send(Closed::Regions { rows, capacities }).await;
    }

    /// Hands a closed window's rows to the writer (waits when it is behind:
    /// that is the stage's backpressure).
    async fn send(&mut self, closed: Closed) {
        let Some(tx) = &self.writer_tx else {
            return;
        };
        if tx.send(closed).await.is_err() {
            self.ctx
                .metrics
                .stage_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("stream stage: the window writer is gone");
        }
    }
}

/// A closed window's output, on its way to the store and the topics.
enum Closed {
    Meters {
        width: Width,
        rows: Vec<store::MeterAggregate>,
        /// Per row: publish it (the aggregate rule may hold some back).
        publish: Vec<bool>,
    },
    Regions {
        rows: Vec<store::RegionalAggregate>,
        capacities: Vec<f64>,
    },
}

/// Closed windows waiting for the writer, at most.
const WRITER_QUEUE: usize = 8;

/// The window writer: stores closed windows and publishes them, in the order
/// they closed, in its own task so the stream stage goes on folding readings
/// while SQL runs.
async fn write_closed(ctx: Context, mut rx: mpsc::Receiver<Closed>) {
    while let Some(closed) = rx.recv().await {
        match closed {
            Closed::Meters {
                width,
                rows,
                publish: flags,
            } => write_meters(&ctx, width, rows, flags).await,
            Closed::Regions { rows, capacities } => write_regions(&ctx, rows, capacities).await,
        }
    }
}

async fn write_meters(
    ctx: &Context,
    width: Width,
    rows: Vec<store::MeterAggregate>,
    flags: Vec<bool>,
) {
    let table = match width {
        Width::OneMinute => store::WindowWidth::OneMinute,
        Width::FifteenMinutes => store::WindowWidth::FifteenMinutes,
    };
    let store = ctx.store.clone();
    let stored = with_retry(ctx, "upsert meter aggregates", || {
        store.upsert_meter_aggregates(table, &rows)
    })
    .await;
    let (topic, kind) = match width {
        Width::OneMinute => (Topic::Aggregates1m, "1m_aggregate"),
        Width::FifteenMinutes => (Topic::Aggregates15m, "15m_aggregate"),
    };
    let now = crate::time::now_ms();
    // The store answers one row per key in input order (merged with what was
    // stored before, for a late window).
    let records = stored
        .iter()
        .zip(flags.iter().chain(std::iter::repeat(&true)))
        .filter(|(_, publish)| **publish)
        .map(|(row, _)| {
            let value = json!({
                "meterId": row.meter_id,
                "region": row.region,
                "windowStart": crate::time::format_rfc3339_ms(row.window_start_ms),
                "avgPowerKw": row.avg_power_kw,
                "maxPowerKw": row.max_power_kw,
                "minPowerKw": row.min_power_kw,
                "energyKwhSum": row.energy_kwh_sum,
                "voltageAvg": row.voltage_avg,
                "count": row.count,
            });
            json_record(
                &row.meter_id,
                &value,
                &[("type", kind), ("region", &row.region)],
                now,
            )
        })
        .collect();
    publish(ctx, topic, records).await;
}

async fn write_regions(ctx: &Context, rows: Vec<store::RegionalAggregate>, capacities: Vec<f64>) {
    let store = ctx.store.clone();
    with_retry(ctx, "upsert regional aggregates", || {
        store.upsert_regional_aggregates(&rows)
    })
    .await;
    let now = crate::time::now_ms();
    let records = rows
        .iter()
        .zip(&capacities)
        .map(|(row, capacity_kw)| {
            let value = json!({
                "region": row.region,
                "timestamp": crate::time::format_rfc3339_ms(row.window_start_ms),
                "meter_count": row.meter_count,
                "total_consumption": row.total_consumption,
                "avg_consumption": row.avg_consumption,
                "max_consumption": row.max_consumption,
                "min_consumption": row.min_consumption,
                "load_percentage": row.load_percentage,
                "capacity_kw": capacity_kw,
                "active_meters": row.active_meters,
            });
            json_record(
                &row.region,
                &value,
                &[("type", "regional_1m_aggregate"), ("region", &row.region)],
                now,
            )
        })
        .collect();
    publish(ctx, Topic::Aggregates1mRegional, records).await;
}

pub(super) fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Low => "low",
        Severity::Medium => "medium",
        Severity::High => "high",
        Severity::Critical => "critical",
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
