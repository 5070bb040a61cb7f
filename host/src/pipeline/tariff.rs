//! The tariff stage (`tariff-group` on `aggregates_1m_regional`): the tariff
//! rule per regional window, the `tariffs` table (new row in, previous row
//! deactivated), the `tariff:{region}:current` cache, and `tariff_updates`.
//!
//! The last published price per region is the rule's state: kept here,
//! loaded from the store at start, passed into every call.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::json;

use super::{
    Context, PipelineError, RegionalWindow, Stage, json_record, plugin_failed, publish,
    rounds_by_region, with_retry,
};
use crate::bus::{Delivered, Topic};
use crate::plugins::{TariffRule, tariff};
use crate::store::NewTariff;

pub struct TariffStage {
    ctx: Context,
    tariff: TariffRule,
    /// `tariff:{region}:current`: the last published price per region.
    current: HashMap<String, f64>,
}

impl Stage for TariffStage {
    const NAME: &'static str = "tariff";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        let loads: Vec<RegionalWindow> = records
            .iter()
            .filter_map(|d| RegionalWindow::parse(&d.record.value))
            .collect();
        let bad = records.len() - loads.len();
        if bad > 0 {
            self.ctx
                .metrics
                .bad_records
                .fetch_add(bad as u64, Ordering::Relaxed);
        }
        // A region's last price chains from one window to the next, so a
        // call holds each region at most once.
        for round in rounds_by_region(&loads, |l| l.region.as_str()) {
            self.price_round(round).await;
        }
    }
}

impl TariffStage {
    pub async fn new(ctx: Context, tariff: TariffRule) -> Result<TariffStage, PipelineError> {
        let current = ctx
            .store
            .current_tariffs()
            .await?
            .into_iter()
            .map(|t| (t.region, t.price_per_kwh))
            .collect();
        Ok(TariffStage {
            ctx,
            tariff,
            current,
        })
    }

    async fn price_round(&mut self, round: &[RegionalWindow]) {
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
        for d in decisions {
            let i = d.index as usize;
            let load = &round[i];
            let previous = inputs[i].last_price;
            let reason = match d.reason {
                tariff::TariffReason::LowLoad => "LOW_LOAD",
                tariff::TariffReason::NormalLoad => "NORMAL_LOAD",
                tariff::TariffReason::HighLoad => "HIGH_LOAD",
                tariff::TariffReason::CriticalLoad => "CRITICAL_LOAD",
            };
            let new = NewTariff {
                region: load.region.clone(),
                price_per_kwh: d.price_per_kwh,
                effective_from_ms: load.timestamp_ms,
                previous_price: Some(previous),
                change_percent: Some(d.change_percent),
                load_percentage: Some(load.load_percentage),
                reason: reason.to_owned(),
            };
            let store = self.ctx.store.clone();
            let row = with_retry(&self.ctx, "insert tariff", || store.insert_tariff(&new)).await;
            self.current.insert(load.region.clone(), d.price_per_kwh);
            self.ctx
                .metrics
                .tariffs_published
                .fetch_add(1, Ordering::Relaxed);
            let now = crate::time::now_ms();
            let value = json!({
                "tariffId": row.tariff_id,
                "region": row.region,
                "pricePerKwh": row.price_per_kwh,
                "previousPrice": previous,
                "changePercent": d.change_percent,
                "loadPercentage": load.load_percentage,
                "effectiveFrom": crate::time::format_rfc3339_ms(load.timestamp_ms),
                "reason": reason,
                "timestamp": crate::time::format_rfc3339_ms(now),
            });
            let record = json_record(&row.region, &value, &[("region", &row.region)], now);
            publish(&self.ctx, Topic::TariffUpdates, vec![record]).await;
        }
    }
}
