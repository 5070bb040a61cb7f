//! The alert stage (`alert-group` on `alerts` and `aggregates_1m_regional`):
//! the overload rule over regional windows, alert dedupe, the `alerts`
//! table, and `alerts_processed`.
//!
//! The overload rule's state (consecutive overloaded windows per region) is
//! kept here, passed into each call and taken back from its answer, so a
//! plugin swap or restart does not reset an incident in progress.
//!
//! Exactly once: a poll's alerts, the overload state it advanced and the
//! last regional window applied per region are stored in one transaction
//! with the `alerts_processed` messages ([`super::apply`]). A redelivered
//! regional window (at or before the last one applied for its region) is
//! skipped; a redelivered alert is recognised by its id; a second alert with
//! the same dedupe key (`alert:dedupe:{subject}:{type}:{bucket}`, buckets of
//! `alerts.dedupe_ttl_s`) is recognised by the store's unique key, so the
//! dedupe holds across restarts and processes. With Redis shared between
//! processes, the keys are claimed there first ([`crate::shared`]), as the
//! seed does, and the store stays the authority.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{
    AppliedWindows, Context, PipelineError, Stage, apply, flush_outbox, keyed, plugin_failed,
    rounds_by_region, with_retry,
};
use crate::bus::{Delivered, Topic};
use crate::live::LiveKind;
use crate::messages::{
    Alert, AlertMetadata, AlertProcessed, AlertStatus, AlertStatusUpdate, AlertType,
    OverloadMetadata, RegionalWindow, Severity, decode,
};
use crate::plugins::{OverloadRule, overload};
use crate::store::{AlertRow, Applied, Effects, NewAlert, RuleState, StoreError};

/// `rule_state.rule` of the overload rule's consecutive counts.
const OVERLOAD_STATE: &str = "overload.consecutive";
/// `rule_state.rule` of the start of the last regional window applied, per
/// region.
const LAST_WINDOW: &str = "overload.last_window";
/// The stage's name in the outbox and in crash points.
const STAGE: &str = "alerts";

pub struct AlertStage {
    ctx: Context,
    overload: OverloadRule,
    consecutive: HashMap<String, u32>,
    applied: AppliedWindows,
}

impl Stage for AlertStage {
    const NAME: &'static str = "alerts";

    fn context(&self) -> &Context {
        &self.ctx
    }

    /// Regions may have moved here from another process, whose overload
    /// counts and last applied windows are in the store: reload them.
    async fn assigned(&mut self, _partitions: &[(Topic, u32)]) {
        let ctx = self.ctx.clone();
        (self.consecutive, self.applied) =
            with_retry(&ctx, Self::NAME, "reload rule state", || Self::load(&ctx)).await;
    }

    async fn process(&mut self, records: &[Delivered]) {
        let mut effects = Effects::default();
        let mut regional = Vec::new();
        for d in records {
            match d.topic {
                Topic::Alerts => match decode::<Alert>(&d.record.value) {
                    Ok(alert) => {
                        let new = self.new_alert(alert);
                        effects.alerts.push(new);
                    }
                    Err(e) => self.bad_record(d, &e),
                },
                Topic::Aggregates1mRegional => match decode::<RegionalWindow>(&d.record.value) {
                    Ok(w) => {
                        if self.applied.accept(&w, &mut effects) {
                            regional.push(w);
                        }
                    }
                    Err(e) => self.bad_record(d, &e),
                },
                _ => {}
            }
        }
        self.evaluate_overload(&regional, &mut effects);
        let shared_duplicates = claim_in_redis(&self.ctx, &mut effects).await;
        if effects.is_empty() {
            self.ctx
                .metrics
                .alerts_deduplicated
                .fetch_add(shared_duplicates, Ordering::Relaxed);
            return;
        }
        let outbox = |applied: &Applied| {
            let now = crate::time::now_ms();
            let processed: Vec<AlertProcessed> = applied
                .alerts
                .iter()
                .flatten()
                .map(|row| processed(row, now))
                .collect();
            keyed(&processed)
        };
        let applied = apply(&self.ctx, STAGE, &effects, &outbox).await;
        let now = crate::time::now_ms();
        for row in applied.alerts.iter().flatten() {
            self.ctx
                .live
                .publish(LiveKind::Alert, row.region.as_deref(), &processed(row, now));
        }
        let stored = applied.alerts.iter().flatten().count() as u64;
        let m = &self.ctx.metrics;
        m.alerts_stored.fetch_add(stored, Ordering::Relaxed);
        m.alerts_deduplicated.fetch_add(
            applied.alerts.len() as u64 - stored + shared_duplicates,
            Ordering::Relaxed,
        );
    }
}

impl AlertStage {
    /// The overload rule's state per region is loaded from the store, so an
    /// incident in progress survives a restart; what the outbox still holds
    /// is published first.
    pub async fn new(ctx: Context, overload: OverloadRule) -> Result<AlertStage, PipelineError> {
        flush_outbox(&ctx, STAGE, STAGE).await?;
        let (consecutive, applied) = Self::load(&ctx).await?;
        Ok(AlertStage {
            ctx,
            overload,
            consecutive,
            applied,
        })
    }

    /// The per-region state as last stored (by this process or another).
    async fn load(ctx: &Context) -> Result<(HashMap<String, u32>, AppliedWindows), StoreError> {
        let consecutive = ctx
            .store
            .load_rule_state(OVERLOAD_STATE)
            .await?
            .into_iter()
            .map(|(region, n)| (region, u32::try_from(n).unwrap_or(0)))
            .collect();
        let applied = AppliedWindows::load(&*ctx.store, LAST_WINDOW).await?;
        Ok((consecutive, applied))
    }

    fn bad_record(&self, d: &Delivered, e: &serde_json::Error) {
        self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(topic = %d.topic, offset = d.offset, error = %e, "skipping a record that is not a {}", d.topic);
    }

    /// The alert to store, with its dedupe key.
    fn new_alert(&self, alert: Alert) -> NewAlert {
        let ttl_ms = (self.ctx.config.alerts.dedupe_ttl_s * 1000).max(1) as i64;
        let bucket = alert.timestamp_ms.div_euclid(ttl_ms);
        let subject = alert
            .meter_id
            .as_deref()
            .or(alert.region.as_deref())
            .or(alert.rule.as_ref().map(|r| r.name.as_str()))
            .unwrap_or("-");
        NewAlert {
            dedupe_key: Some(format!(
                "alert:dedupe:{subject}:{}:{bucket}",
                alert.alert_type
            )),
            id: alert.id,
            alert_type: alert.alert_type,
            severity: alert.severity,
            region: alert.region,
            meter_id: alert.meter_id,
            message: alert.message,
            timestamp_ms: alert.timestamp_ms,
            metadata: serde_json::to_value(&alert.metadata).unwrap_or_default(),
            rule: alert.rule,
        }
    }

    /// Runs the overload rule over regional windows in order. A region's
    /// state chains from one window to the next, so a call holds each region
    /// at most once.
    fn evaluate_overload(&mut self, windows: &[RegionalWindow], effects: &mut Effects) {
        for round in rounds_by_region(windows, |w| w.region.as_str()) {
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
            let rule = self.overload.served_by().provenance();
            for (w, d) in round.iter().zip(decisions) {
                if self.consecutive.get(&w.region) != Some(&d.consecutive) {
                    effects.rule_state.push(RuleState {
                        rule: OVERLOAD_STATE.to_owned(),
                        key: w.region.clone(),
                        value: i64::from(d.consecutive),
                    });
                }
                self.consecutive.insert(w.region.clone(), d.consecutive);
                if let Some(alert) = d.alert {
                    let alert = Alert {
                        id: Alert::derived_id(AlertType::Overload, &w.region, w.timestamp_ms),
                        alert_type: AlertType::Overload,
                        severity: Severity::from(alert.severity),
                        meter_id: None,
                        region: Some(w.region.clone()),
                        timestamp_ms: w.timestamp_ms,
                        message: alert.message,
                        metadata: AlertMetadata::Overload(OverloadMetadata {
                            load_percentage: w.load_percentage,
                            total_consumption: w.total_consumption,
                            capacity: w.capacity_kw,
                            consecutive_windows: d.consecutive,
                        }),
                        rule: Some(rule.clone()),
                    };
                    let new = self.new_alert(alert);
                    effects.alerts.push(new);
                }
            }
        }
    }
}

/// With Redis shared between processes, offers each alert's dedupe key
/// for its id ([`crate::shared`]) and drops those another alert owns;
/// waits (retrying) while Redis is down rather than store a duplicate.
/// Returns how many were dropped.
async fn claim_in_redis(ctx: &Context, effects: &mut Effects) -> u64 {
    let Some(shared) = &ctx.shared else {
        return 0;
    };
    if effects.alerts.is_empty() {
        return 0;
    }
    let ttl_ms = ctx.config.alerts.dedupe_ttl_s.saturating_mul(1000);
    let claims: Vec<(&str, uuid::Uuid)> = effects
        .alerts
        .iter()
        .filter_map(|a| Some((a.dedupe_key.as_deref()?, a.id)))
        .collect();
    let owned = with_retry(ctx, AlertStage::NAME, "claim alert dedupe marks", || {
        shared.claim_alerts(&claims, ttl_ms)
    })
    .await;
    let before = effects.alerts.len();
    let mut owned = owned.into_iter();
    // Alerts without a dedupe key (none today) are not claimed and stay.
    effects
        .alerts
        .retain(|a| a.dedupe_key.is_none() || owned.next().unwrap_or(true));
    (before - effects.alerts.len()) as u64
}

/// The seed's `alerts_processed` message for a stored alert.
pub fn processed(row: &AlertRow, now_ms: i64) -> AlertProcessed {
    AlertProcessed {
        alert_id: row.id,
        alert_type: row.alert_type,
        severity: row.severity,
        meter_id: row.meter_id.clone(),
        region: row.region.clone(),
        message: row.message.clone(),
        status: row.status,
        timestamp_ms: row.timestamp_ms,
        processed_at_ms: now_ms,
        rule: row.rule.clone(),
    }
}

/// The `alert_status_updates` message of a status change.
pub fn status_update(
    row: &AlertRow,
    previous: AlertStatus,
    by: Option<&str>,
    now_ms: i64,
) -> AlertStatusUpdate {
    AlertStatusUpdate {
        alert_id: row.id,
        alert_type: row.alert_type,
        region: row.region.clone(),
        meter_id: row.meter_id.clone(),
        status: row.status,
        previous_status: previous,
        by: by.map(str::to_owned),
        timestamp_ms: now_ms,
    }
}
