//! The archive stage (`raw-archive-group` on `telemetry-readings`): every
//! reading into `raw_readings`, in one store call per poll.
//!
//! It runs in its own consumer group so a slow database delays only the
//! archive (and, through the bus's lag bound, ingest), never the windows.

use std::sync::atomic::Ordering;

use serde::Deserialize;

use super::{Context, Stage, with_retry};
use crate::bus::Delivered;
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
        let store = self.ctx.store.clone();
        let ctx = &self.ctx;
        with_retry(ctx, "archive", "insert raw readings", || async {
            let started = std::time::Instant::now();
            let done = store.insert_raw_readings(rows.clone()).await;
            ctx.metrics.store_write("archive", started.elapsed());
            done
        })
        .await;
        self.ctx
            .metrics
            .raw_archived
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
    }
}

impl ArchiveStage {
    pub fn new(ctx: Context) -> ArchiveStage {
        ArchiveStage { ctx }
    }
}
