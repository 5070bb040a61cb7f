//! The tariff stage (`tariff-group` on `aggregates_1m_regional`): the tariff
//! rule per regional window, the `tariffs` table (new row in, previous row
//! deactivated), the `tariff:{region}:current` cache, and `tariff_updates`.
//!
//! The last published price per region is the rule's state: kept here,
//! loaded from the store at start, passed into every call.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::{Context, PipelineError, Stage, json_record, publish, rounds_by_region, with_retry};
use crate::bus::{Delivered, Topic};
use crate::plugins::{TariffRule, tariff};
use crate::store::NewTariff;

pub struct TariffStage {
    ctx: Context,
    tariff: TariffRule,
    /// `tariff:{region}:current`: the last published price per region.
    current: HashMap<String, f64>,
}

struct RegionLoad {
    region: String,
    timestamp_ms: i64,
    load_percentage: f64,
}

impl Stage for TariffStage {
    const NAME: &'static str = "tariff";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        let loads: Vec<RegionLoad> = records
            .iter()
            .filter_map(|d| {
                let v: Value = serde_json::from_slice(&d.record.value).ok()?;
                Some(RegionLoad {
                    region: v.get("region")?.as_str()?.to_owned(),
                    timestamp_ms: crate::time::parse_rfc3339_ms(v.get("timestamp")?.as_str()?)?,
                    load_percentage: v.get("load_percentage")?.as_f64()?,
                })
            })
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

    async fn price_round(&mut self, round: &[RegionLoad]) {
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
                // Policy: prices stay as they are for this round.
                self.ctx
                    .metrics
                    .plugin_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "tariff round skipped");
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
