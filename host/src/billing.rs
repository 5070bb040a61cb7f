//! Billing: per meter and period, the energy of each stored 15-minute
//! window times the price in force in its region when the window began,
//! into the seed's `invoices` and `invoice_line_items` (`segs bill`,
//! `GET /invoices`).
//!
//! The price in force at an instant is the region's tariff with the latest
//! `effective_from` at or before it (the `tariffs` table: the tariff stage
//! writes one row per change), or the region's `base_price_per_kwh` before
//! any change. Consecutive windows priced by the same tariff make one line
//! item; a line's amount is the sum of its windows' energy × price. The
//! invoice id is derived from the meter and the period, so billing a period
//! again replaces its invoice (while still `pending`) and never adds a
//! second one.
//!
//! Must not: hold SQL (the store does) or round anything but the invoice's
//! total (to the paisa).

use std::collections::HashMap;

use serde::Serialize;

use crate::store::{
    AggregateQuery, MeterAggregate, Store, StoreError, TariffRow, WindowWidth, rfc3339_ms,
};
use crate::windows::FIFTEEN_MINUTES_MS;

/// The currency of every invoice (the seed's).
pub const CURRENCY: &str = "INR";

/// An invoice for one meter over `[period_start, period_end)`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Invoice {
    pub invoice_id: String,
    pub meter_id: String,
    /// The meter's user, from the `meters` table when it is known there.
    pub user_id: Option<String>,
    #[serde(rename = "billing_period_start", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub period_start_ms: i64,
    #[serde(rename = "billing_period_end", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub period_end_ms: i64,
    pub total_kwh: f64,
    /// Σ of the line items' amounts, rounded to the paisa.
    pub total_amount: f64,
    #[schema(value_type = String)]
    pub currency: &'static str,
    pub status: String,
    pub line_items: Vec<InvoiceLine>,
}

/// Consecutive windows of one meter priced by one tariff.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct InvoiceLine {
    pub meter_id: String,
    /// `None`: the region's base price (no tariff change yet).
    pub tariff_id: Option<String>,
    #[serde(rename = "period_start", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub period_start_ms: i64,
    #[serde(rename = "period_end", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub period_end_ms: i64,
    pub description: String,
    pub kwh: f64,
    pub price_per_kwh: f64,
    pub amount: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing period: `from` ({from}) must be before `to` ({to})")]
    EmptyPeriod { from: String, to: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The prices in force per region over time.
pub struct PriceSchedule {
    /// Per region, tariffs by `effective_from` ascending.
    by_region: HashMap<String, Vec<(i64, String, f64)>>,
}

impl PriceSchedule {
    pub fn new(tariffs: &[TariffRow]) -> PriceSchedule {
        let mut by_region: HashMap<String, Vec<(i64, String, f64)>> = HashMap::new();
        for t in tariffs {
            by_region.entry(t.region.clone()).or_default().push((
                t.effective_from_ms,
                t.tariff_id.clone(),
                t.price_per_kwh,
            ));
        }
        for v in by_region.values_mut() {
            v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        }
        PriceSchedule { by_region }
    }

    /// The tariff in force in `region` at `at_ms` (id and price), or `None`
    /// before the region's first change.
    pub fn at(&self, region: &str, at_ms: i64) -> Option<(&str, f64)> {
        let v = self.by_region.get(region)?;
        let i = v.partition_point(|(from, _, _)| *from <= at_ms);
        i.checked_sub(1).map(|i| (v[i].1.as_str(), v[i].2))
    }
}

/// The invoice id of `meter_id` for the period.
pub fn invoice_id(meter_id: &str, from_ms: i64, to_ms: i64) -> String {
    let day = |ms: i64| {
        crate::time::format_rfc3339_ms(ms)
            .chars()
            .filter(char::is_ascii_digit)
            .take(12)
            .collect::<String>()
    };
    format!("INV-{meter_id}-{}-{}", day(from_ms), day(to_ms))
}

/// One meter's invoice from its 15-minute windows in the period (in
/// window order).
pub fn invoice(
    meter_id: &str,
    windows: &[&MeterAggregate],
    prices: &PriceSchedule,
    base_price: impl Fn(&str) -> f64,
    from_ms: i64,
    to_ms: i64,
) -> Invoice {
    let mut lines: Vec<InvoiceLine> = Vec::new();
    for w in windows {
        let (tariff, price) = match prices.at(&w.region, w.window_start_ms) {
            Some((id, price)) => (Some(id), price),
            None => (None, base_price(&w.region)),
        };
        let end = w.window_start_ms + FIFTEEN_MINUTES_MS;
        let amount = w.energy_kwh_sum * price;
        match lines.last_mut() {
            Some(l) if l.tariff_id.as_deref() == tariff && l.price_per_kwh == price => {
                l.period_end_ms = end;
                l.kwh += w.energy_kwh_sum;
                l.amount += amount;
            }
            _ => lines.push(InvoiceLine {
                meter_id: meter_id.to_owned(),
                tariff_id: tariff.map(str::to_owned),
                period_start_ms: w.window_start_ms,
                period_end_ms: end,
                description: match tariff {
                    Some(id) => format!("{} at {price} per kWh ({id})", w.region),
                    None => format!("{} at the base price, {price} per kWh", w.region),
                },
                kwh: w.energy_kwh_sum,
                price_per_kwh: price,
                amount,
            }),
        }
    }
    let total_kwh = lines.iter().map(|l| l.kwh).sum();
    let total: f64 = lines.iter().map(|l| l.amount).sum();
    Invoice {
        invoice_id: invoice_id(meter_id, from_ms, to_ms),
        meter_id: meter_id.to_owned(),
        user_id: None,
        period_start_ms: from_ms,
        period_end_ms: to_ms,
        total_kwh,
        total_amount: (total * 100.0).round() / 100.0,
        currency: CURRENCY,
        status: "pending".into(),
        line_items: lines,
    }
}

/// Bills every meter with 15-minute windows starting in `[from_ms, to_ms)`
/// and stores the invoices (one transaction); returns the period's
/// invoices as stored.
/// `base_price` is a region's price before its first tariff change
/// (`PipelineConfig::region(r).base_price_per_kwh`).
pub async fn run(
    store: &dyn Store,
    base_price: &(dyn Fn(&str) -> f64 + Sync),
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Invoice>, BillingError> {
    if from_ms >= to_ms {
        return Err(BillingError::EmptyPeriod {
            from: crate::time::format_rfc3339_ms(from_ms),
            to: crate::time::format_rfc3339_ms(to_ms),
        });
    }
    let windows = store
        .meter_aggregates(
            WindowWidth::FifteenMinutes,
            &AggregateQuery {
                meter_id: None,
                region: None,
                from_ms: Some(from_ms),
                to_ms: Some(to_ms),
                limit: u32::MAX,
            },
        )
        .await?;
    let tariffs = store.tariff_history(None, u32::MAX).await?;
    let prices = PriceSchedule::new(&tariffs);
    let mut by_meter: std::collections::BTreeMap<&str, Vec<&MeterAggregate>> = Default::default();
    for w in &windows {
        by_meter.entry(&w.meter_id).or_default().push(w);
    }
    let invoices: Vec<Invoice> = by_meter
        .into_iter()
        .map(|(meter, mut ws)| {
            ws.sort_by_key(|w| w.window_start_ms);
            invoice(meter, &ws, &prices, base_price, from_ms, to_ms)
        })
        .collect();
    store.save_invoices(&invoices).await?;
    let stored = store
        .list_invoices(&crate::store::InvoiceFilter {
            from_ms: Some(from_ms),
            to_ms: Some(to_ms),
            limit: u32::MAX,
            ..Default::default()
        })
        .await?;
    Ok(stored
        .into_iter()
        .filter(|i| i.period_start_ms == from_ms && i.period_end_ms == to_ms)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start_ms: i64, kwh: f64) -> MeterAggregate {
        MeterAggregate {
            meter_id: "MTR-1".into(),
            region: "R".into(),
            window_start_ms: start_ms,
            avg_power_kw: 0.0,
            max_power_kw: 0.0,
            min_power_kw: 0.0,
            energy_kwh_sum: kwh,
            voltage_avg: None,
            count: 1,
            power_sum: 0.0,
            voltage_sum: 0.0,
            voltage_count: 0,
        }
    }

    fn tariff(id: &str, from_ms: i64, price: f64) -> TariffRow {
        TariffRow {
            tariff_id: id.into(),
            region: "R".into(),
            time_of_day: None,
            price_per_kwh: price,
            effective_from_ms: from_ms,
            effective_to_ms: None,
            is_active: true,
            created_by: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            previous_price: None,
            change_percent: None,
            load_percentage: None,
            reason: crate::messages::TariffReason::HighLoad,
            rule: None,
        }
    }

    #[test]
    fn each_window_is_priced_by_the_tariff_in_force_at_its_start() {
        const Q: i64 = FIFTEEN_MINUTES_MS;
        // Base 6.5 until a change to 7.15 at 2Q, then 6.5 again at 3Q + 1 ms
        // (so the window starting at 3Q is still at 7.15).
        let prices =
            PriceSchedule::new(&[tariff("T-1", 2 * Q, 7.15), tariff("T-2", 3 * Q + 1, 6.5)]);
        let ws = [
            window(0, 1.0),
            window(Q, 2.0),
            window(2 * Q, 3.0),
            window(3 * Q, 4.0),
            window(4 * Q, 5.0),
        ];
        let refs: Vec<&MeterAggregate> = ws.iter().collect();
        let inv = invoice("MTR-1", &refs, &prices, |_| 6.5, 0, 5 * Q);
        // By hand: (1 + 2) × 6.5 + (3 + 4) × 7.15 + 5 × 6.5 = 19.5 + 50.05 + 32.5.
        assert_eq!(inv.total_amount, 102.05);
        assert_eq!(inv.total_kwh, 15.0);
        let lines: Vec<(Option<&str>, f64, i64, i64)> = inv
            .line_items
            .iter()
            .map(|l| {
                (
                    l.tariff_id.as_deref(),
                    l.kwh,
                    l.period_start_ms,
                    l.period_end_ms,
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                (None, 3.0, 0, 2 * Q),
                (Some("T-1"), 7.0, 2 * Q, 4 * Q),
                (Some("T-2"), 5.0, 4 * Q, 5 * Q),
            ]
        );
        assert_eq!(inv.invoice_id, invoice_id("MTR-1", 0, 5 * Q));
        assert_eq!(inv.invoice_id, "INV-MTR-1-197001010000-197001010115");
    }
}
