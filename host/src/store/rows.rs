//! Row decoding both stores share, generic over sqlx's `Row`: the
//! provenance columns of alerts and tariffs, and invoices with their line
//! items. Only timestamps differ between the backends (RFC 3339 text in
//! SQLite, `timestamptz` in PostgreSQL), so each passes its own reader.
//!
//! Must not: hold SQL.

use std::collections::HashMap;

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::StoreError;
use crate::billing::{Invoice, InvoiceLine};
use crate::messages::RuleRef;

/// Reads a timestamp column of a row as epoch ms (the backend's way).
pub(super) type Ts<'a, R> = &'a dyn Fn(&R, &'static str) -> Result<i64, StoreError>;

/// The provenance columns (`rule_name`, `rule_version`, `rule_sha256`).
pub(super) fn rule_ref<R>(row: &R) -> Result<Option<RuleRef>, StoreError>
where
    R: Row,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    let name: Option<String> = row.try_get("rule_name")?;
    let Some(name) = name else {
        return Ok(None);
    };
    let version: Option<i64> = row.try_get("rule_version")?;
    let sha256: Option<String> = row.try_get("rule_sha256")?;
    Ok(Some(RuleRef {
        name,
        version: u64::try_from(version.unwrap_or(0)).unwrap_or(0),
        sha256: sha256.unwrap_or_default(),
    }))
}

/// Invoices from their rows (`invoice_id, meter_id, user_id,
/// billing_period_start, billing_period_end, total_kwh, total_amount,
/// status`, in the order to return) and the rows of all their line items
/// (`invoice_id, meter_id, tariff_id, period_start, period_end,
/// description, kwh, price_per_kwh, amount`, in line order).
pub(super) fn invoices<R>(
    heads: &[R],
    lines: &[R],
    ts: Ts<'_, R>,
) -> Result<Vec<Invoice>, StoreError>
where
    R: Row,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    let mut by_invoice: HashMap<String, Vec<InvoiceLine>> = HashMap::new();
    for l in lines {
        let id: String = l.try_get("invoice_id")?;
        by_invoice.entry(id).or_default().push(InvoiceLine {
            meter_id: l
                .try_get::<Option<String>, _>("meter_id")?
                .unwrap_or_default(),
            tariff_id: l.try_get("tariff_id")?,
            period_start_ms: ts(l, "period_start")?,
            period_end_ms: ts(l, "period_end")?,
            description: l
                .try_get::<Option<String>, _>("description")?
                .unwrap_or_default(),
            kwh: l.try_get("kwh")?,
            price_per_kwh: l.try_get("price_per_kwh")?,
            amount: l.try_get("amount")?,
        });
    }
    heads
        .iter()
        .map(|row| {
            let invoice_id: String = row.try_get("invoice_id")?;
            Ok(Invoice {
                meter_id: row
                    .try_get::<Option<String>, _>("meter_id")?
                    .unwrap_or_default(),
                user_id: row.try_get("user_id")?,
                period_start_ms: ts(row, "billing_period_start")?,
                period_end_ms: ts(row, "billing_period_end")?,
                total_kwh: row.try_get("total_kwh")?,
                total_amount: row.try_get("total_amount")?,
                currency: crate::billing::CURRENCY,
                status: row.try_get("status")?,
                line_items: by_invoice.remove(&invoice_id).unwrap_or_default(),
                invoice_id,
            })
        })
        .collect()
}
