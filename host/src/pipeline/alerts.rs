//! The alert stage (`alert-group` on `alerts` and `aggregates_1m_regional`):
//! the overload rule over regional windows, alert dedupe, the `alerts`
//! table, and `alerts_processed`.
//!
//! The overload rule's state (consecutive overloaded windows per region) is
//! kept here, passed into each call and taken back from its answer, so a
//! plugin swap or restart does not reset an incident in progress.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::{
    Context, PipelineError, RegionalWindow, Stage, json_record, plugin_failed, publish,
    rounds_by_region, with_retry,
};
use crate::bus::{Delivered, Topic};
use crate::dedupe::KeyBatch;
use crate::plugins::{OverloadRule, overload};
use crate::store::{AlertRow, NewAlert};

/// `rule_state.rule` of the overload rule's consecutive counts.
const OVERLOAD_STATE: &str = "overload.consecutive";

pub struct AlertStage {
    ctx: Context,
    overload: OverloadRule,
    consecutive: HashMap<String, u32>,
}

impl Stage for AlertStage {
    const NAME: &'static str = "alerts";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        let mut regional = Vec::new();
        for d in records {
            match d.topic {
                Topic::Alerts => match serde_json::from_slice::<Value>(&d.record.value) {
                    Ok(value) => {
                        // Keep order: regional windows seen so far go first.
                        self.evaluate_overload(std::mem::take(&mut regional)).await;
                        self.raise(value).await;
                    }
                    Err(e) => {
                        self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(offset = d.offset, error = %e, "skipping an alert that is not JSON");
                    }
                },
                Topic::Aggregates1mRegional => match RegionalWindow::parse(&d.record.value) {
                    Some(w) => regional.push(w),
                    None => {
                        self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                    }
                },
                _ => {}
            }
        }
        self.evaluate_overload(regional).await;
    }
}

impl AlertStage {
    /// The overload rule's state per region is loaded from the store, so an
    /// incident in progress survives a restart.
    pub async fn new(ctx: Context, overload: OverloadRule) -> Result<AlertStage, PipelineError> {
        let consecutive = ctx
            .store
            .load_rule_state(OVERLOAD_STATE)
            .await?
            .into_iter()
            .map(|(region, n)| (region, u32::try_from(n).unwrap_or(0)))
            .collect();
        Ok(AlertStage {
            ctx,
            overload,
            consecutive,
        })
    }

    /// Runs the overload rule over regional windows in order. A region's
    /// state chains from one window to the next, so a call holds each region
    /// at most once.
    async fn evaluate_overload(&mut self, windows: Vec<RegionalWindow>) {
        for round in rounds_by_region(&windows, |w| w.region.as_str()) {
            let inputs: Vec<overload::RegionWindow> = round
                .iter()
                .map(|w| overload::RegionWindow {
                    load_percentage: w.load_percentage,
                    total_consumption: w.total_consumption,
                    capacity_kw: w.capacity_kw,
                    consecutive: self.consecutive.get(&w.region).copied().unwrap_or(0),
                })
                .collect();
            let decisions = match self.overload.evaluate(&inputs) {
                Ok(d) => d,
                Err(e) => {
                    plugin_failed(&self.ctx, &e, "state unchanged; this round raises nothing");
                    continue;
                }
            };
            let changed: Vec<(String, i64)> = round
                .iter()
                .zip(&decisions)
                .filter(|(w, d)| self.consecutive.get(&w.region) != Some(&d.consecutive))
                .map(|(w, d)| (w.region.clone(), i64::from(d.consecutive)))
                .collect();
            if !changed.is_empty() {
                let store = self.ctx.store.clone();
                with_retry(&self.ctx, "save overload state", || {
                    store.save_rule_state(OVERLOAD_STATE, &changed)
                })
                .await;
            }
            for (w, d) in round.iter().zip(decisions) {
                self.consecutive.insert(w.region.clone(), d.consecutive);
                if let Some(alert) = d.alert {
                    let value = json!({
                        "id": uuid::Uuid::new_v4(),
                        "type": "OVERLOAD",
                        "severity": super::stream::severity_name(alert.severity),
                        "meter_id": Value::Null,
                        "region": w.region,
                        "timestamp": crate::time::format_rfc3339_ms(w.timestamp_ms),
                        "message": alert.message,
                        "metadata": {
                            "load_percentage": w.load_percentage,
                            "total_consumption": w.total_consumption,
                            "capacity": w.capacity_kw,
                            "consecutive_windows": d.consecutive,
                        },
                    });
                    self.raise(value).await;
                }
            }
        }
    }

    /// Dedupe, store, publish one alert.
    async fn raise(&mut self, alert: Value) {
        let Some(new) = parse_alert(&alert) else {
            self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%alert, "skipping an alert without id/type/severity/timestamp");
            return;
        };
        let ttl = Duration::from_secs(self.ctx.config.alerts.dedupe_ttl_s);
        let bucket = new.timestamp_ms.div_euclid(ttl.as_millis().max(1) as i64);
        let subject = new
            .meter_id
            .as_deref()
            .or(new.region.as_deref())
            .unwrap_or("-");
        let mut keys = KeyBatch::default();
        keys.push_with(|k| {
            use std::fmt::Write as _;
            let _ = write!(k, "alert:dedupe:{subject}:{}:{bucket}", new.alert_type);
        });
        match self.ctx.dedupe.check_and_mark(&keys, ttl).await {
            Ok(fresh) if !fresh[0] => {
                self.ctx
                    .metrics
                    .alerts_deduplicated
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                // Without dedupe we would rather store a repeat than lose one.
                tracing::warn!(error = %e, "alert dedupe unavailable; storing anyway");
            }
        }
        let store = self.ctx.store.clone();
        let row = with_retry(&self.ctx, "insert alert", || store.insert_alert(&new)).await;
        self.ctx
            .metrics
            .alerts_stored
            .fetch_add(1, Ordering::Relaxed);
        let now = crate::time::now_ms();
        let value = processed_payload(&row, now);
        let key = row.id.to_string();
        let record = json_record(
            &key,
            &value,
            &[("type", &row.alert_type), ("severity", &row.severity)],
            now,
        );
        publish(&self.ctx, Topic::AlertsProcessed, vec![record]).await;
    }
}

/// The seed's `alerts_processed` payload.
pub fn processed_payload(row: &AlertRow, now_ms: i64) -> Value {
    json!({
        "alertId": row.id,
        "type": row.alert_type,
        "severity": row.severity,
        "meterId": row.meter_id,
        "region": row.region,
        "message": row.message,
        "status": row.status,
        "timestamp": crate::time::format_rfc3339_ms(row.timestamp_ms),
        "processedAt": crate::time::format_rfc3339_ms(now_ms),
    })
}

/// The `alert_status_updates` payload of a status change.
pub fn status_update_payload(
    row: &AlertRow,
    previous: &str,
    by: Option<&str>,
    now_ms: i64,
) -> Value {
    json!({
        "alertId": row.id,
        "type": row.alert_type,
        "region": row.region,
        "meterId": row.meter_id,
        "status": row.status,
        "previousStatus": previous,
        "by": by,
        "timestamp": crate::time::format_rfc3339_ms(now_ms),
    })
}

fn parse_alert(v: &Value) -> Option<NewAlert> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(NewAlert {
        id: s("id")?.parse().ok()?,
        alert_type: s("type")?,
        severity: s("severity")?,
        region: s("region"),
        meter_id: s("meter_id"),
        message: s("message").unwrap_or_default(),
        timestamp_ms: crate::time::parse_rfc3339_ms(v.get("timestamp")?.as_str()?)?,
        metadata: v.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}
