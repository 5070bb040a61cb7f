//! The tariff stage (`tariff-group` on `aggregates_1m_regional`): the tariff
//! rule per regional window, the `tariffs` table (new row in, previous row
//! deactivated), the `tariff:{region}:current` cache (in memory; also in
//! Redis when shared, [`crate::shared`]), and `tariff_updates`.
//!
//! The last published price per region is the rule's state: kept here,
//! loaded from the store at start, passed into every call.
//!
//! Exactly once: a poll's tariff changes and the last regional window
//! applied per region are stored in one transaction with their
//! `tariff_updates` messages ([`super::apply`]); a redelivered window (at or
//! before the last one applied for its region) is skipped, so a replay never
//! repeats a price change.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{
    AppliedWindows, Context, PipelineError, Stage, apply, flush_outbox, keyed, plugin_failed,
    rounds_by_region, with_retry,
};
use crate::bus::Delivered;
use crate::live::LiveKind;
use crate::messages::{RegionalWindow, TariffReason, TariffUpdate, decode};
use crate::plugins::{TariffRule, tariff};
use crate::store::{Applied, Effects, NewTariff, TariffRow};

/// `rule_state.rule` of the start of the last regional window priced, per
/// region.
const LAST_WINDOW: &str = "tariff.last_window";
/// The stage's name in the outbox and in crash points.
const STAGE: &str = "tariff";

pub struct TariffStage {
    ctx: Context,
    tariff: TariffRule,
    /// `tariff:{region}:current`: the last published price per region.
    current: HashMap<String, f64>,
    applied: AppliedWindows,
}

impl Stage for TariffStage {
    const NAME: &'static str = "tariff";

    fn context(&self) -> &Context {
        &self.ctx
    }

    /// Regions may have moved here from another process, whose prices and
    /// last applied windows are in the store: reload them.
    async fn assigned(&mut self, _partitions: &[(crate::bus::Topic, u32)]) {
        let ctx = self.ctx.clone();
        let (rows, applied) =
            with_retry(&ctx, Self::NAME, "reload rule state", || Self::load(&ctx)).await;
        cache_prices(&ctx, &rows).await;
        self.current = prices(&rows);
        self.applied = applied;
    }

    async fn process(&mut self, records: &[Delivered]) {
        let mut effects = Effects::default();
        let mut loads = Vec::with_capacity(records.len());
        for d in records {
            match decode::<RegionalWindow>(&d.record.value) {
                Ok(w) => {
                    if self.applied.accept(&w, &mut effects) {
                        loads.push(w);
                    }
                }
                Err(e) => {
                    self.ctx.metrics.bad_records.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(offset = d.offset, error = %e, "skipping a record that is not a regional window");
                }
            }
        }
        // A region's last price chains from one window to the next, so a
        // call holds each region at most once.
        for round in rounds_by_region(&loads, |l| l.region.as_str()) {
            self.price_round(round, &mut effects);
        }
        if effects.is_empty() {
            return;
        }
        let outbox = |applied: &Applied| {
            let now = crate::time::now_ms();
            let updates: Vec<TariffUpdate> =
                applied.tariffs.iter().map(|row| update(row, now)).collect();
            keyed(&updates)
        };
        let applied = apply(&self.ctx, STAGE, &effects, &outbox).await;
        cache_prices(&self.ctx, &applied.tariffs).await;
        let now = crate::time::now_ms();
        for row in &applied.tariffs {
            self.ctx
                .live
                .publish(LiveKind::Tariff, Some(&row.region), &update(row, now));
        }
        self.ctx
            .metrics
            .tariffs_published
            .fetch_add(applied.tariffs.len() as u64, Ordering::Relaxed);
    }
}

/// The seed's `tariff_updates` message for a stored tariff.
fn update(row: &TariffRow, now_ms: i64) -> TariffUpdate {
    TariffUpdate {
        tariff_id: row.tariff_id.clone(),
        region: row.region.clone(),
        price_per_kwh: row.price_per_kwh,
        previous_price: row.previous_price.unwrap_or(row.price_per_kwh),
        change_percent: row.change_percent.unwrap_or(0.0),
        load_percentage: row.load_percentage.unwrap_or(0.0),
        effective_from_ms: row.effective_from_ms,
        reason: row.reason,
        timestamp_ms: now_ms,
        rule: row.rule.clone(),
    }
}

/// The price per region of stored tariffs.
fn prices(rows: &[TariffRow]) -> HashMap<String, f64> {
    rows.iter()
        .map(|t| (t.region.clone(), t.price_per_kwh))
        .collect()
}

/// With Redis shared between processes, writes stored tariffs into the
/// `tariff:{region}:current` cache ([`crate::shared`]); retries while Redis
/// is down, so the cache is never left behind the store for long.
async fn cache_prices(ctx: &Context, rows: &[TariffRow]) {
    let Some(shared) = &ctx.shared else {
        return;
    };
    if rows.is_empty() {
        return;
    }
    with_retry(ctx, TariffStage::NAME, "cache current tariffs", || {
        shared.set_current_tariffs(rows)
    })
    .await;
}

impl TariffStage {
    pub async fn new(ctx: Context, tariff: TariffRule) -> Result<TariffStage, PipelineError> {
        flush_outbox(&ctx, STAGE, STAGE).await?;
        let (rows, applied) = Self::load(&ctx).await?;
        cache_prices(&ctx, &rows).await;
        Ok(TariffStage {
            ctx,
            tariff,
            current: prices(&rows),
            applied,
        })
    }

    /// The current tariffs and last applied windows as last stored (by this
    /// process or another).
    async fn load(
        ctx: &Context,
    ) -> Result<(Vec<TariffRow>, AppliedWindows), crate::store::StoreError> {
        let current = ctx.store.current_tariffs().await?;
        let applied = AppliedWindows::load(&*ctx.store, LAST_WINDOW).await?;
        Ok((current, applied))
    }

    fn price_round(&mut self, round: &[RegionalWindow], effects: &mut Effects) {
        let inputs: Vec<tariff::RegionLoad> = round
            .iter()
            .map(|l| {
                let base = self.ctx.config.region(&l.region).base_price_per_kwh;
                tariff::RegionLoad {
                    load_percentage: l.load_percentage,
                    base_price: base,
                    last_price: self.current.get(&l.region).copied().unwrap_or(base),
                }
            })
            .collect();
        let decisions = match self.tariff.price(&inputs) {
            Ok(d) => d,
            Err(e) => {
                plugin_failed(&self.ctx, &e, "prices stay as they are for this round");
                return;
            }
        };
        let rule = self.tariff.served_by().provenance();
        for d in decisions {
            let i = d.index as usize;
            let load = &round[i];
            let reason = match d.reason {
                tariff::TariffReason::LowLoad => TariffReason::LowLoad,
                tariff::TariffReason::NormalLoad => TariffReason::NormalLoad,
                tariff::TariffReason::HighLoad => TariffReason::HighLoad,
                tariff::TariffReason::CriticalLoad => TariffReason::CriticalLoad,
            };
            effects.tariffs.push(NewTariff {
                region: load.region.clone(),
                price_per_kwh: d.price_per_kwh,
                effective_from_ms: load.timestamp_ms,
                previous_price: Some(inputs[i].last_price),
                change_percent: Some(d.change_percent),
                load_percentage: Some(load.load_percentage),
                reason,
                rule: Some(rule.clone()),
            });
            self.current.insert(load.region.clone(), d.price_per_kwh);
        }
    }
}
