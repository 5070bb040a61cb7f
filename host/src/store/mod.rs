//! Store: the persistence seam. Every SQL byte of segs lives under this
//! module — the [`Store`] trait, its row types, and the backends
//! ([`sqlite`], embedded; [`postgres`], with TimescaleDB when the server has
//! it) with their migrations in `migrations/<backend>/`, and the storage
//! rules both share (`rules`).
//!
//! What it must not do: business rules. The store does not decide when an
//! alert fires, what a tariff costs or when a window closes; it stores what
//! it is given, atomically, and answers queries. The few semantics it does
//! own are storage semantics: a window upserted twice merges (sums add up, so
//! a late reading is still counted), an alert's status only moves forward
//! (active → acknowledged → resolved) and each move is audited, and a new
//! tariff deactivates the region's previous one in the same transaction.
//!
//! Conventions shared by every backend:
//! - timestamps travel as `i64` milliseconds since the Unix epoch (`*_ms`
//!   fields) and serialize to JSON as RFC 3339 strings in the canonical form
//!   `2025-11-12T06:30:00.000Z` ([`rfc3339_ms`]);
//! - JSON keys of the row types are the seed's column names (snake_case);
//! - every write method is one transaction per call, however many rows.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::{AlertStatus, AlertType, KeyedMessage, RuleRef, Severity, TariffReason};

pub mod postgres;
mod rows;
mod rules;
pub mod sqlite;
mod sqlite_archive;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names a backend this build cannot open yet.
    #[error("unsupported store: {0}")]
    Unsupported(String),
    /// The URL is not one the store understands.
    #[error("invalid store URL: {0}")]
    InvalidUrl(String),
    /// The database refused the data (a CHECK, NOT NULL, UNIQUE or foreign
    /// key constraint): the input is bad, retrying will not help.
    #[error("rejected by the database: {0}")]
    Rejected(String),
    /// The database server could not be reached or refused the login;
    /// `target` names it (host:port, database, user — never a password).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    /// Any other database failure (I/O, lock timeout, …).
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// Applying the embedded migrations failed.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back (e.g. a timestamp typed in by
    /// hand in another format).
    #[error("unreadable value in {table}.{column}: {value:?}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
        value: String,
    },
    /// Encoding a JSON column failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A checkpoint was saved with an epoch that is no longer the group's:
    /// another writer has claimed it since. Nothing of the call was stored.
    #[error("checkpoint {group} was claimed by another writer (epoch {epoch} is stale)")]
    Fenced { group: String, epoch: i64 },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            use sqlx::error::ErrorKind as K;
            if matches!(
                db.kind(),
                K::UniqueViolation
                    | K::ForeignKeyViolation
                    | K::NotNullViolation
                    | K::CheckViolation
            ) {
                return StoreError::Rejected(db.message().to_owned());
            }
            // PostgreSQL's data exceptions (SQLSTATE class 22: a value out
            // of range, text it cannot encode, …) are bad input too.
            let data_exception = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| pg.code().starts_with("22"));
            if data_exception {
                return StoreError::Rejected(db.message().to_owned());
            }
        }
        StoreError::Database(e)
    }
}

/// Serde helper: `i64` epoch milliseconds ⇄ canonical RFC 3339 string
/// (`#[serde(with = "rfc3339_ms")]`, or `rfc3339_ms::option` for
/// `Option<i64>`, which maps `None` to `null`).
pub mod rfc3339_ms {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::time::{format_rfc3339_ms, parse_rfc3339_ms};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_rfc3339_ms(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let s = String::deserialize(d)?;
        parse_rfc3339_ms(&s)
            .ok_or_else(|| D::Error::custom(format!("invalid RFC 3339 timestamp {s:?}")))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => super::serialize(ms, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => parse_rfc3339_ms(&s)
                    .map(Some)
                    .ok_or_else(|| D::Error::custom(format!("invalid RFC 3339 timestamp {s:?}"))),
            }
        }
    }
}

// ------------------------------------------------------------------ rows

/// One reading as kept in `raw_readings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RawReading {
    pub meter_id: String,
    pub region: String,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp_ms: i64,
    pub power_kw: f64,
    #[serde(default)]
    pub voltage: Option<f64>,
    #[serde(default)]
    pub current: Option<f64>,
    #[serde(default)]
    pub frequency: Option<f64>,
    #[serde(default)]
    pub power_factor: Option<f64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub energy_kwh: Option<f64>,
}

/// One record of `telemetry-readings` as the bus delivered it, for the raw
/// archive ([`Store::archive_records`]): the reading's JSON as ingest
/// published it, and where it was on the bus.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub partition: u32,
    pub offset: u64,
    pub value: bytes::Bytes,
}

impl RawReading {
    /// The `raw_readings` row of a record's JSON; `None` for a record that
    /// is not a reading (the archive skips it). One scan in the plain case,
    /// else serde_json, whose answer counts.
    pub fn from_record(value: &[u8]) -> Option<RawReading> {
        crate::reading::WireFields::scan(value)
            .and_then(|f| Self::from_fields(&f))
            .or_else(|| Self::from_record_by_serde(value))
    }

    fn from_record_by_serde(value: &[u8]) -> Option<RawReading> {
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
        let w: Wire<'_> = serde_json::from_slice(value).ok()?;
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
    }

    /// The row of a record [`WireFields::scan`] took, when every column has
    /// its type (else the record is left to serde_json).
    ///
    /// [`WireFields::scan`]: crate::reading::WireFields::scan
    fn from_fields(f: &crate::reading::WireFields<'_>) -> Option<RawReading> {
        use crate::reading::{number, optional_number, text};
        Some(RawReading {
            meter_id: text(f.meter_id)?.to_owned(),
            region: text(f.region)?.to_owned(),
            timestamp_ms: crate::time::parse_rfc3339_ms(text(f.timestamp)?)?,
            power_kw: number(f.power_kw)?,
            voltage: optional_number(f.voltage)?,
            current: optional_number(f.current)?,
            frequency: optional_number(f.frequency)?,
            power_factor: optional_number(f.power_factor)?,
            temperature: optional_number(f.temperature)?,
            energy_kwh: optional_number(f.energy_kwh)?,
        })
    }
}

/// Which per-meter window table: `aggregates_1m` or `aggregates_15m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowWidth {
    OneMinute,
    FifteenMinutes,
}

impl WindowWidth {
    /// The table that holds windows of this width.
    pub fn table(self) -> &'static str {
        match self {
            WindowWidth::OneMinute => "aggregates_1m",
            WindowWidth::FifteenMinutes => "aggregates_15m",
        }
    }
}

/// One meter's window, as stored in `aggregates_1m` / `aggregates_15m`:
/// the seed's columns plus the running sums (`power_sum`, `voltage_sum`,
/// `voltage_count`) that let a later upsert of the same window merge into
/// it. Writers must fill the sums; `avg_power_kw` and `voltage_avg` are
/// recomputed from them on every merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeterAggregate {
    pub meter_id: String,
    pub region: String,
    #[serde(rename = "window_start", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub window_start_ms: i64,
    pub avg_power_kw: f64,
    pub max_power_kw: f64,
    pub min_power_kw: f64,
    pub energy_kwh_sum: f64,
    pub voltage_avg: Option<f64>,
    pub count: u32,
    pub power_sum: f64,
    pub voltage_sum: f64,
    pub voltage_count: u32,
}

impl MeterAggregate {
    /// Folds `other` (a window with the same key) into `self`, exactly as
    /// the stored upsert does: counts and sums add, max/min take the
    /// extreme, averages are recomputed from the sums.
    fn merge(&mut self, other: &MeterAggregate) {
        self.count = self.count.saturating_add(other.count);
        self.power_sum += other.power_sum;
        self.voltage_sum += other.voltage_sum;
        self.voltage_count = self.voltage_count.saturating_add(other.voltage_count);
        self.energy_kwh_sum += other.energy_kwh_sum;
        self.max_power_kw = self.max_power_kw.max(other.max_power_kw);
        self.min_power_kw = self.min_power_kw.min(other.min_power_kw);
        if self.count > 0 {
            self.avg_power_kw = self.power_sum / f64::from(self.count);
        }
        self.voltage_avg =
            (self.voltage_count > 0).then(|| self.voltage_sum / f64::from(self.voltage_count));
    }
}

/// Merges entries of `aggs` that share a key (meter_id, window_start), in
/// order of first appearance, so one upsert never applies a key twice.
fn merge_duplicate_windows(aggs: &[MeterAggregate]) -> Vec<MeterAggregate> {
    let mut index: std::collections::HashMap<(&str, i64), usize> =
        std::collections::HashMap::with_capacity(aggs.len());
    let mut out: Vec<MeterAggregate> = Vec::with_capacity(aggs.len());
    for a in aggs {
        match index.entry((a.meter_id.as_str(), a.window_start_ms)) {
            std::collections::hash_map::Entry::Occupied(e) => out[*e.get()].merge(a),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(a.clone());
            }
        }
    }
    out
}

/// One region's 1-minute window, as published on `aggregates_1m_regional`
/// (where the window start is called `timestamp`) and stored in the table of
/// that name (column `window_start`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegionalAggregate {
    pub region: String,
    #[serde(rename = "timestamp", alias = "window_start", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub window_start_ms: i64,
    pub meter_count: u32,
    pub total_consumption: f64,
    pub avg_consumption: f64,
    pub max_consumption: f64,
    pub min_consumption: f64,
    pub load_percentage: f64,
    pub active_meters: Vec<String>,
}

/// An alert to store; it starts `active`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert {
    pub id: Uuid,
    /// Column `type`.
    pub alert_type: AlertType,
    pub severity: Severity,
    pub region: Option<String>,
    pub meter_id: Option<String>,
    pub message: String,
    pub timestamp_ms: i64,
    /// Stored as a JSON document; `null` is stored as `{}`.
    pub metadata: serde_json::Value,
    /// At most one alert per key is stored (`alert:dedupe:{subject}:{type}:{bucket}`);
    /// a second one is not an error, it is deduplicated. `None`: never
    /// deduplicated.
    pub dedupe_key: Option<String>,
    /// The rule version that raised it (columns `rule_name`,
    /// `rule_version`, `rule_sha256`).
    pub rule: Option<RuleRef>,
}

/// A row of `alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertRow {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub alert_type: AlertType,
    pub severity: Severity,
    pub region: Option<String>,
    pub meter_id: Option<String>,
    pub message: String,
    pub status: AlertStatus,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp_ms: i64,
    pub acknowledged: bool,
    pub acknowledged_by: Option<String>,
    #[serde(rename = "acknowledged_at", with = "rfc3339_ms::option", default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub acknowledged_at_ms: Option<i64>,
    #[serde(rename = "resolved_at", with = "rfc3339_ms::option", default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub resolved_at_ms: Option<i64>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    #[serde(rename = "created_at", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at_ms: i64,
    #[serde(rename = "updated_at", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at_ms: i64,
    /// The rule version that raised it.
    #[serde(default)]
    pub rule: Option<RuleRef>,
}

/// Filters for [`Store::list_alerts`]; `None` means "any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertFilter {
    pub region: Option<String>,
    pub status: Option<String>,
    pub alert_type: Option<String>,
    pub severity: Option<String>,
    pub meter_id: Option<String>,
    /// At most this many rows (0 returns none).
    pub limit: u32,
}

impl Default for AlertFilter {
    fn default() -> Self {
        AlertFilter {
            region: None,
            status: None,
            alert_type: None,
            severity: None,
            meter_id: None,
            limit: 100,
        }
    }
}

/// Outcome of an alert status change.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// The status moved from `from` to the row's new status; an audit row
    /// was written.
    Changed { from: AlertStatus, row: AlertRow },
    /// The alert was already in the requested status; nothing was written.
    Unchanged(AlertRow),
    /// No alert has that id.
    NotFound,
    /// The alert's status does not allow the move (e.g. acknowledging a
    /// resolved alert); nothing was written.
    Refused { status: AlertStatus },
}

/// A new tariff for a region; it becomes the region's only active row.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTariff {
    pub region: String,
    pub price_per_kwh: f64,
    pub effective_from_ms: i64,
    pub previous_price: Option<f64>,
    pub change_percent: Option<f64>,
    pub load_percentage: Option<f64>,
    pub reason: TariffReason,
    /// The tariff rule version that decided it.
    pub rule: Option<RuleRef>,
}

/// A row of `tariffs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TariffRow {
    /// `TRF-{REGION}-{n:06}`.
    pub tariff_id: String,
    pub region: String,
    pub time_of_day: Option<String>,
    pub price_per_kwh: f64,
    #[serde(rename = "effective_from", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub effective_from_ms: i64,
    #[serde(rename = "effective_to", with = "rfc3339_ms::option", default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub effective_to_ms: Option<i64>,
    pub is_active: bool,
    pub created_by: Option<String>,
    #[serde(rename = "created_at", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at_ms: i64,
    #[serde(rename = "updated_at", with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at_ms: i64,
    pub previous_price: Option<f64>,
    pub change_percent: Option<f64>,
    pub load_percentage: Option<f64>,
    pub reason: TariffReason,
    /// The tariff rule version that decided it.
    #[serde(default)]
    pub rule: Option<RuleRef>,
}

/// A plugin version one process installed (`plugin_versions`), for the
/// other processes on the same store to install too.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPluginVersion {
    /// Allocated by the store, increasing; ignored when publishing.
    pub seq: i64,
    pub plugin: String,
    pub sha256: String,
    /// The component's bytes.
    pub component: Vec<u8>,
    /// The plugin's config, a JSON object of scalars.
    pub config: serde_json::Value,
    /// How it was installed: `admin`, `watch:<path>`, `rollback`.
    pub source: String,
    /// The process that installed it.
    pub origin: String,
}

/// Filters for the aggregate queries; `None` means "any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateQuery {
    /// Ignored by [`Store::regional_aggregates`].
    pub meter_id: Option<String>,
    pub region: Option<String>,
    /// Windows starting at or after this instant.
    pub from_ms: Option<i64>,
    /// Windows starting before this instant (exclusive).
    pub to_ms: Option<i64>,
    /// At most this many rows (0 returns none).
    pub limit: u32,
}

impl Default for AggregateQuery {
    fn default() -> Self {
        AggregateQuery {
            meter_id: None,
            region: None,
            from_ms: None,
            to_ms: None,
            limit: 1000,
        }
    }
}

/// How long time-series rows are kept (by their event time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_readings: Duration,
    /// Also applies to `aggregates_1m_regional`.
    pub aggregates_1m: Duration,
    pub aggregates_15m: Duration,
}

const DAY: Duration = Duration::from_secs(86_400);

impl Default for Retention {
    /// 7 / 30 / 365 days, as the seed's TimescaleDB policies.
    fn default() -> Self {
        Retention {
            raw_readings: DAY * 7,
            aggregates_1m: DAY * 30,
            aggregates_15m: DAY * 365,
        }
    }
}

/// Rows deleted by one [`Store::apply_retention`] run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    pub raw_readings: u64,
    pub aggregates_1m: u64,
    pub aggregates_15m: u64,
    pub aggregates_1m_regional: u64,
}

/// Options for [`open_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOptions {
    pub retention: Retention,
}

// ------------------------------------------------------ units of work

/// One row of `rule_state`: an integer a rule's host stage keeps per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleState {
    pub rule: String,
    pub key: String,
    pub value: i64,
}

/// Where a consumer group's stage state was taken: per (topic name,
/// partition), the offset of the next record it had not folded in, and the
/// state itself as the stage encoded it (opaque to the store).
///
/// `epoch` fences writers: a process that takes the checkpoint over claims
/// it ([`Store::claim_checkpoint`], epoch + 1), and a checkpoint saved with
/// any other epoch than the stored one is refused with
/// [`StoreError::Fenced`] (its writer lost the partition). Epoch 0 saves
/// unconditionally (a checkpoint nobody claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub group: String,
    pub epoch: i64,
    /// The bus log the positions refer to ([`crate::bus::Bus::log_id`]).
    pub bus_id: String,
    pub positions: Vec<(String, u32, u64)>,
    pub state: Vec<u8>,
}

/// Everything one step of a stage produced, stored by [`Store::apply`] in
/// one transaction: all of it, or none of it.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    /// Per-meter windows, merged as [`Store::upsert_meter_aggregates`] does.
    pub meter_windows: Vec<(WindowWidth, Vec<MeterAggregate>)>,
    /// Regional windows, replaced as [`Store::upsert_regional_aggregates`] does.
    pub regional_windows: Vec<RegionalAggregate>,
    /// New alerts; one already stored (same id or same dedupe key) is skipped.
    pub alerts: Vec<NewAlert>,
    /// New tariffs, each deactivating its region's previous one.
    pub tariffs: Vec<NewTariff>,
    pub rule_state: Vec<RuleState>,
    /// Replaces the group's checkpoint.
    pub checkpoint: Option<Checkpoint>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.meter_windows.iter().all(|(_, rows)| rows.is_empty())
            && self.regional_windows.is_empty()
            && self.alerts.is_empty()
            && self.tariffs.is_empty()
            && self.rule_state.is_empty()
            && self.checkpoint.is_none()
    }
}

/// What [`Store::apply`] stored, in the order of its [`Effects`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Per entry of `meter_windows`: the rows as stored (merged), one per
    /// distinct key, in order of first appearance.
    pub meter_windows: Vec<Vec<MeterAggregate>>,
    /// Per alert: the stored row, or `None` when it was already stored (a
    /// replay) or deduplicated.
    pub alerts: Vec<Option<AlertRow>>,
    /// Per tariff: the stored row (with its allocated id).
    pub tariffs: Vec<TariffRow>,
}

/// Builds, from what was stored, the messages to publish; they are written
/// to the outbox in the same transaction.
pub type OutboxBuilder<'a> = dyn Fn(&Applied) -> Vec<KeyedMessage> + Send + Sync + 'a;

/// A message stored in the outbox, waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Not decreasing per store: the records of one `Store::apply` may
    /// share one (SQLite stores them as one batch), later applies get
    /// higher ones. Delete through it once published: every record with
    /// this seq or a lower one goes.
    pub seq: i64,
    pub message: KeyedMessage,
}

// ------------------------------------------------------ notifications

/// One entry of the delivery log (`notification_deliveries`): where an
/// event stands for a webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationLog {
    pub webhook: String,
    /// `alert:{alertId}` or `tariff:{tariffId}`.
    pub event_id: String,
    /// `alert` or `tariff`.
    pub event_type: &'static str,
    /// Taken by the receiver (a 2xx); otherwise still being retried.
    pub delivered: bool,
    pub attempts: u32,
    /// The receiver's last HTTP status, if it answered.
    pub response_status: Option<u16>,
    pub last_error: Option<String>,
    pub at_ms: i64,
}

/// Filters for [`Store::list_invoices`]; `None` means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoiceFilter {
    pub meter_id: Option<String>,
    pub user_id: Option<String>,
    /// Billing periods starting at or after this instant.
    pub from_ms: Option<i64>,
    /// Billing periods ending at or before this instant.
    pub to_ms: Option<i64>,
    pub limit: u32,
}

// ----------------------------------------------------------------- trait

/// [`Store::archive_records`] as rows: each reading through
/// [`Store::insert_raw_readings`].
async fn archive_as_rows<S: Store + ?Sized>(
    store: &S,
    records: &[RawRecord],
) -> Result<u64, StoreError> {
    let mut rows = Vec::with_capacity(records.len());
    rows.extend(
        records
            .iter()
            .filter_map(|r| RawReading::from_record(&r.value)),
    );
    let stored = rows.len() as u64;
    if stored > 0 {
        store.insert_raw_readings(rows.into()).await?;
    }
    Ok(stored)
}

/// The persistence seam. Write methods take whole batches and run one
/// transaction per call.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Appends readings to `raw_readings`. Shared, not borrowed: the
    /// embedded store hands them to its archive writer thread without a
    /// copy, and a retry passes the same batch again.
    async fn insert_raw_readings(&self, readings: Arc<[RawReading]>) -> Result<(), StoreError>;

    /// Archives the readings among `records` (one poll of
    /// `telemetry-readings`, in delivery order) into `raw_readings` in one
    /// transaction, and answers how many it stored. A record that is not a
    /// reading is skipped. A replayed record (one already archived, as
    /// after a crash between the write and the commit of its offset) is
    /// stored once. `log_id` is the bus's [`crate::bus::Bus::log_id`]: the
    /// records' offsets mean something only in that log.
    ///
    /// By default each record becomes a row ([`RawReading::from_record`])
    /// through [`Store::insert_raw_readings`], whose key makes a replay a
    /// no-op. The embedded store's archive file keeps each call's readings
    /// as one batch and skips a replay by the partition's archived offset
    /// in that log (see `sqlite_archive`).
    async fn archive_records(
        &self,
        log_id: &str,
        records: Arc<[RawRecord]>,
    ) -> Result<u64, StoreError> {
        // Rows are keyed by (meter, timestamp): a replay is a no-op in any
        // log.
        let _ = log_id;
        archive_as_rows(self, &records).await
    }

    /// Upserts per-meter windows on (meter_id, window_start). A window that
    /// is already stored is merged with the new one (counts and sums add,
    /// max/min take the extreme, averages are recomputed), so a reading that
    /// arrives after its window was flushed is still counted; entries of
    /// `aggs` with the same key are merged first. Returns one row per
    /// distinct key, as stored after the merge, in order of first
    /// appearance in `aggs`.
    async fn upsert_meter_aggregates(
        &self,
        width: WindowWidth,
        aggs: &[MeterAggregate],
    ) -> Result<Vec<MeterAggregate>, StoreError>;

    /// Upserts regional windows on (region, window_start); a stored window is
    /// replaced (the last entry wins if `aggs` repeats a key).
    async fn upsert_regional_aggregates(
        &self,
        aggs: &[RegionalAggregate],
    ) -> Result<(), StoreError>;

    /// Of `event_ids`, those the delivery log has as delivered to `webhook`.
    async fn delivered_notifications(
        &self,
        webhook: &str,
        event_ids: &[String],
    ) -> Result<Vec<String>, StoreError>;

    /// Writes where an event stands for a webhook (replacing the entry; a
    /// delivered entry is never turned back into a failing one).
    async fn log_notification(&self, entry: &NotificationLog) -> Result<(), StoreError>;

    /// Stores invoices with their line items, in one transaction: a new id
    /// is inserted; an id already stored and still `pending` is replaced
    /// (billing a period again); one `paid`, `overdue` or `cancelled` is
    /// left as it is. The user is the meter's in `meters`, when known.
    async fn save_invoices(&self, invoices: &[crate::billing::Invoice]) -> Result<(), StoreError>;

    /// Invoices with their line items, newest period first, then by id.
    async fn list_invoices(
        &self,
        filter: &InvoiceFilter,
    ) -> Result<Vec<crate::billing::Invoice>, StoreError>;

    /// Stores a new `active` alert and returns the row. Storing an id that
    /// already exists changes nothing and returns the stored row, so a
    /// replayed alert is harmless.
    async fn insert_alert(&self, alert: &NewAlert) -> Result<AlertRow, StoreError>;

    /// Alerts matching `filter`, newest `timestamp` first (ties: newest
    /// `created_at` first).
    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<AlertRow>, StoreError>;

    async fn get_alert(&self, id: Uuid) -> Result<Option<AlertRow>, StoreError>;

    /// active → acknowledged (sets acknowledged, acknowledged_by,
    /// acknowledged_at = `at_ms`), audited.
    async fn acknowledge_alert(
        &self,
        id: Uuid,
        by: &str,
        at_ms: i64,
    ) -> Result<Transition, StoreError>;

    /// active | acknowledged → resolved (sets resolved_at = `at_ms`),
    /// audited.
    async fn resolve_alert(&self, id: Uuid, at_ms: i64) -> Result<Transition, StoreError>;

    /// In one transaction: deactivates the region's active tariff
    /// (effective_to = the new effective_from) and inserts the new active
    /// one with id `TRF-{REGION}-{n:06}`.
    async fn insert_tariff(&self, tariff: &NewTariff) -> Result<TariffRow, StoreError>;

    /// The active tariff of every region, by region.
    async fn current_tariffs(&self) -> Result<Vec<TariffRow>, StoreError>;

    /// Tariffs, newest effective_from first.
    async fn tariff_history(
        &self,
        region: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TariffRow>, StoreError>;

    /// Stored per-meter windows, by window_start then meter_id.
    async fn meter_aggregates(
        &self,
        width: WindowWidth,
        query: &AggregateQuery,
    ) -> Result<Vec<MeterAggregate>, StoreError>;

    /// Stored regional windows, by window_start then region.
    async fn regional_aggregates(
        &self,
        query: &AggregateQuery,
    ) -> Result<Vec<RegionalAggregate>, StoreError>;

    /// Readings counted in `aggregates_1m` (the sum of `count`).
    async fn count_readings_1m(&self) -> Result<u64, StoreError>;

    /// Rows in `raw_readings`.
    async fn count_raw_readings(&self) -> Result<u64, StoreError>;

    /// A round trip to the database (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Deletes time-series rows older than the configured [`Retention`],
    /// measured back from `now_ms`.
    async fn apply_retention(&self, now_ms: i64) -> Result<RetentionReport, StoreError>;

    /// The integer state a rule's host stage keeps per key (e.g. per region).
    async fn load_rule_state(&self, rule: &str) -> Result<Vec<(String, i64)>, StoreError>;

    /// Saves (upserts) a rule's state for some keys, in one transaction.
    async fn save_rule_state(&self, rule: &str, state: &[(String, i64)]) -> Result<(), StoreError>;

    /// Stores `effects` and the messages `outbox` builds from what was
    /// stored, for `stage`, in one transaction, and returns both. This is how
    /// a stage makes its results durable exactly once: what it stores, the
    /// state it advances (rule state, checkpoint) and what it will publish
    /// commit together or not at all. The caller publishes the returned
    /// records and then [`Store::delete_outbox`]s them; after a crash,
    /// [`Store::pending_outbox`] hands back what was not deleted.
    async fn apply(
        &self,
        stage: &str,
        effects: &Effects,
        outbox: &OutboxBuilder<'_>,
    ) -> Result<(Applied, Vec<OutboxRecord>), StoreError>;

    /// The stage's outbox records not yet deleted, in seq order.
    async fn pending_outbox(&self, stage: &str) -> Result<Vec<OutboxRecord>, StoreError>;

    /// Deletes the stage's outbox records up to and including `through_seq`.
    async fn delete_outbox(&self, stage: &str, through_seq: i64) -> Result<(), StoreError>;

    /// The group's last checkpoint, if it has one.
    async fn load_checkpoint(&self, group: &str) -> Result<Option<Checkpoint>, StoreError>;

    /// Takes the group's checkpoint over: its epoch goes up by one, so a
    /// writer still holding the old epoch is fenced off. Returns the new
    /// epoch and the checkpoint as last saved (`None` if there is none yet).
    async fn claim_checkpoint(&self, group: &str) -> Result<(i64, Option<Checkpoint>), StoreError>;

    /// Records a plugin version this process installed; returns its seq.
    async fn publish_plugin_version(&self, v: &SharedPluginVersion) -> Result<i64, StoreError>;

    /// The plugin versions recorded after `seq`, in seq order.
    async fn plugin_versions_after(&self, seq: i64)
    -> Result<Vec<SharedPluginVersion>, StoreError>;
}

// ------------------------------------------------------------------ open

/// The password in a `scheme://user:password@host/…` URL, if any.
pub(crate) fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    let password = userinfo.split_once(':')?.1;
    Some(password.to_owned())
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url_password(url) {
        Some(p) if !p.is_empty() => {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let at = rest[..authority_end].rfind('@').map_or(0, |i| i + 1);
            let user_end = rest[..at].find(':').unwrap_or(0);
            format!("{scheme}://{}:***@{}", &rest[..user_end], &rest[at..])
        }
        _ => url.to_owned(),
    }
}

/// Opens the store named by `url` with default [`StoreOptions`].
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, &StoreOptions::default()).await
}

/// Opens the store named by `url` and brings its schema up to date:
/// - `sqlite://path.db` (created if missing) or `sqlite::memory:`;
/// - `postgres://…` / `postgresql://…` ([`postgres::PostgresStore`]);
///   errors never show the URL's password.
pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    match scheme {
        "sqlite" => Ok(Arc::new(sqlite::SqliteStore::open(url, options).await?)),
        "postgres" | "postgresql" => {
            Ok(Arc::new(postgres::PostgresStore::open(url, options).await?))
        }
        "" => Err(StoreError::InvalidUrl(
            "the URL has no scheme; expected sqlite://path.db, sqlite::memory: or postgres://…"
                .into(),
        )),
        other => Err(StoreError::InvalidUrl(format!(
            "unknown URL scheme `{other}`; expected sqlite://path.db, sqlite::memory: or postgres://…"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: &str = r#"{"readingId":"r-1","meterId":"MTR-00000001","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"energyKwh":0.0436,"voltage":230.5,"current":null,"frequency":50,"powerFactor":0.97,"temperature":-3.5,"region":"Mumbai-North","metadata":{"mode":"normal"}}"#;

    /// The scanned row is the row serde_json gives, for the
    /// record and every damaged copy of it the scan takes.
    #[test]
    fn a_scanned_row_is_the_row_serde_json_gives() {
        let scanned = |v: &[u8]| {
            crate::reading::WireFields::scan(v).and_then(|f| RawReading::from_fields(&f))
        };
        let r = scanned(READING.as_bytes()).expect("scanned");
        assert_eq!(r.meter_id, "MTR-00000001");
        assert_eq!(r.region, "Mumbai-North");
        assert_eq!(r.timestamp_ms, 1_762_929_000_000);
        assert_eq!(
            (r.power_kw, r.voltage, r.current),
            (5.234, Some(230.5), None)
        );
        assert_eq!((r.frequency, r.power_factor), (Some(50.0), Some(0.97)));
        assert_eq!((r.temperature, r.energy_kwh), (Some(-3.5), Some(0.0436)));
        let mut taken = 0;
        for v in crate::json_scan::damaged(READING) {
            let fast = scanned(v.as_bytes());
            if fast.is_some() {
                taken += 1;
                assert_eq!(fast, RawReading::from_record_by_serde(v.as_bytes()), "{v}");
            }
            assert_eq!(
                RawReading::from_record(v.as_bytes()),
                RawReading::from_record_by_serde(v.as_bytes()),
                "{v}"
            );
        }
        assert!(taken > 1000, "only {taken} records scanned");
    }

    fn agg(meter: &str, start: i64, powers: &[f64], volts: &[f64]) -> MeterAggregate {
        let power_sum: f64 = powers.iter().sum();
        let voltage_sum: f64 = volts.iter().sum();
        MeterAggregate {
            meter_id: meter.into(),
            region: "R".into(),
            window_start_ms: start,
            avg_power_kw: power_sum / powers.len() as f64,
            max_power_kw: powers.iter().copied().fold(f64::MIN, f64::max),
            min_power_kw: powers.iter().copied().fold(f64::MAX, f64::min),
            energy_kwh_sum: powers.len() as f64 * 0.01,
            voltage_avg: (!volts.is_empty()).then(|| voltage_sum / volts.len() as f64),
            count: powers.len() as u32,
            power_sum,
            voltage_sum,
            voltage_count: volts.len() as u32,
        }
    }

    #[test]
    fn duplicate_windows_merge_in_first_seen_order() {
        let merged = merge_duplicate_windows(&[
            agg("B", 0, &[1.0, 3.0], &[230.0]),
            agg("A", 0, &[5.0], &[]),
            agg("B", 0, &[8.0], &[240.0]),
            agg("B", 60_000, &[2.0], &[]),
        ]);
        let keys: Vec<_> = merged
            .iter()
            .map(|a| (a.meter_id.as_str(), a.window_start_ms))
            .collect();
        assert_eq!(keys, [("B", 0), ("A", 0), ("B", 60_000)]);
        let b = &merged[0];
        assert_eq!(b.count, 3);
        assert_eq!(b.power_sum, 12.0);
        assert_eq!(b.avg_power_kw, 4.0);
        assert_eq!(b.max_power_kw, 8.0);
        assert_eq!(b.min_power_kw, 1.0);
        assert_eq!(b.voltage_count, 2);
        assert_eq!(b.voltage_avg, Some(235.0));
        assert!((b.energy_kwh_sum - 0.03).abs() < 1e-12);
        assert_eq!(merged[1], agg("A", 0, &[5.0], &[]));
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            url_password("postgres://u:s3cret@db:5432/segs").as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            redact_url("postgres://u:s3cret@db:5432/segs?sslmode=require"),
            "postgres://u:***@db:5432/segs?sslmode=require"
        );
        assert_eq!(url_password("postgres://u@db/segs"), None);
        assert_eq!(redact_url("postgres://db/segs"), "postgres://db/segs");
        // A '@' in the password (percent-encoding forgotten) is still hidden.
        assert_eq!(
            redact_url("postgres://u:a@b@db/segs"),
            "postgres://u:***@db/segs"
        );
    }

    #[tokio::test]
    async fn open_names_the_problem() {
        let err = |r: Result<Arc<dyn Store>, StoreError>| match r {
            Ok(_) => panic!("opened"),
            Err(e) => e,
        };
        // Nothing listens on port 1: a connection error naming the server.
        let e = err(open("postgres://u:secret@127.0.0.1:1/segs").await);
        assert!(matches!(e, StoreError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        assert!(e.to_string().contains("database segs, user u"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(!format!("{e:?}").contains("secret"), "{e:?}");

        let e = err(open("postgresql://u:secret@127.0.0.1:notaport/segs").await);
        assert!(matches!(e, StoreError::InvalidUrl(_)), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");

        let e = err(open("mysql://u:secret@localhost/segs").await);
        assert!(matches!(e, StoreError::InvalidUrl(_)), "{e}");
        assert!(e.to_string().contains("`mysql`"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");

        let e = err(open("segs.db").await);
        assert!(e.to_string().contains("no scheme"), "{e}");
    }

    #[test]
    fn rfc3339_helper_round_trips_and_refuses_garbage() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct T {
            #[serde(with = "rfc3339_ms")]
            at: i64,
            #[serde(with = "rfc3339_ms::option", default)]
            maybe: Option<i64>,
        }
        let t = T {
            at: 1_762_929_000_000,
            maybe: None,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"at":"2025-11-12T06:30:00.000Z","maybe":null}"#);
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), t);
        let t2: T = serde_json::from_str(r#"{"at":"2025-11-12T12:00:00+05:30"}"#).unwrap();
        assert_eq!(t2, t);
        let t3: T =
            serde_json::from_str(r#"{"at":"2025-11-12T06:30:00Z","maybe":"2025-11-12T06:31:00Z"}"#)
                .unwrap();
        assert_eq!(t3.maybe, Some(1_762_929_060_000));
        assert!(serde_json::from_str::<T>(r#"{"at":"yesterday"}"#).is_err());
    }
}
