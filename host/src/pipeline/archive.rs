//! The archive stage (`raw-archive-group` on `telemetry-readings`): every
//! reading into `raw_readings`, in one store call per poll.
//!
//! It runs in its own consumer group so a slow database delays only the
//! archive (and, through the bus's lag bound, ingest), never the windows.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::{Context, POLL_MAX, POLL_WAIT, with_retry};
use crate::bus::Consumer;
use crate::store::RawReading;

pub struct ArchiveStage {
    ctx: Context,
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

impl ArchiveStage {
    pub fn new(ctx: Context) -> ArchiveStage {
        ArchiveStage { ctx }
    }

    pub async fn run(self, mut consumer: Box<dyn Consumer>, stop: watch::Receiver<bool>) {
        loop {
            let records = match consumer.poll(POLL_MAX, POLL_WAIT).await {
                Ok(r) => r,
                Err(e) => {
                    self.ctx
                        .metrics
                        .stage_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "archive stage: poll failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if records.is_empty() {
                if *stop.borrow() {
                    break;
                }
                continue;
            }
            let rows: Vec<RawReading> = records
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
            let store = self.ctx.store.clone();
            with_retry(&self.ctx, "insert raw readings", || {
                store.insert_raw_readings(&rows)
            })
            .await;
            self.ctx
                .metrics
                .raw_archived
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            if let Err(e) = consumer.commit().await {
                tracing::error!(error = %e, "archive stage: commit failed");
            }
        }
    }
}
