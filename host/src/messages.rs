//! Messages: one serde type per topic payload, used by every producer and
//! consumer of the bus, with the seed's field names (SPEC §5). Stages never
//! build payloads with `json!` or read them with `Value::get`: a field
//! renamed here is renamed for every stage at once, and a record that does
//! not match its topic's type is refused whole (counted as a bad record).
//!
//! The closed vocabularies — alert type, severity, alert status, tariff
//! reason — are enums here, spelled on the wire and in the store exactly as
//! the seed spells them ([`Severity::as_str`] and friends).
//!
//! `telemetry-readings` is the one exception to "owned types": its payload is
//! [`crate::reading::Reading`], borrowed from the record because it is read
//! once per reading on the hot path.
//!
//! Also here: [`KeyedMessage`], a payload with its key and headers, which is
//! what stages hand to the outbox ([`crate::store::OutboxRecord`]).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bus::{Record, Topic};
use crate::store::rfc3339_ms;

pub use crate::reading::Reading;

/// Declares a closed vocabulary: a `Copy` enum with its wire spelling, serde
/// both ways, `Display` and `FromStr` (the error names the accepted values).
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling on the wire and in the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// Compares with the wire spelling (`severity == "high"`).
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        what: stringify!($name),
                        value: s.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }
    };
}

/// A string that is not one of a vocabulary's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {what} (expected one of {})", expected.join(", "))]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

vocabulary!(
    /// What raised an alert (column `alerts.type`).
    AlertType {
        Anomaly => "ANOMALY",
        Overload => "OVERLOAD",
        PluginFault => "PLUGIN_FAULT",
        PluginRollback => "PLUGIN_ROLLBACK",
    }
);

vocabulary!(
    /// How bad an alert is (column `alerts.severity`).
    Severity {
        Low => "low",
        Medium => "medium",
        High => "high",
        Critical => "critical",
    }
);

vocabulary!(
    /// Where an alert is in its life (column `alerts.status`); it only moves
    /// forward.
    AlertStatus {
        Active => "active",
        Acknowledged => "acknowledged",
        Resolved => "resolved",
    }
);

vocabulary!(
    /// Why a tariff changed (column `tariffs.reason`).
    TariffReason {
        LowLoad => "LOW_LOAD",
        NormalLoad => "NORMAL_LOAD",
        HighLoad => "HIGH_LOAD",
        CriticalLoad => "CRITICAL_LOAD",
    }
);

vocabulary!(
    /// The kind of an anomaly (`metadata.type` of an ANOMALY alert).
    AnomalyKind {
        Spike => "spike",
        Drop => "drop",
        Outage => "outage",
    }
);

impl From<crate::plugins::Severity> for Severity {
    fn from(s: crate::plugins::Severity) -> Severity {
        use crate::plugins::Severity as S;
        match s {
            S::Low => Severity::Low,
            S::Medium => Severity::Medium,
            S::High => Severity::High,
            S::Critical => Severity::Critical,
        }
    }
}

/// A payload that knows its topic, its key and its headers (SPEC §5).
pub trait Message: Serialize {
    const TOPIC: Topic;
    /// The partitioning key.
    fn key(&self) -> String;
    /// Kafka headers, as the seed sets them.
    fn headers(&self) -> Vec<(String, String)>;
}

/// A message serialized with its key and headers, ready for the outbox or
/// the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedMessage {
    pub topic: Topic,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl KeyedMessage {
    pub fn of<M: Message>(m: &M) -> KeyedMessage {
        KeyedMessage {
            topic: M::TOPIC,
            key: m.key(),
            // Serializing plain structs of strings and numbers cannot fail.
            value: serde_json::to_vec(m).expect("messages serialize"),
            headers: m.headers(),
        }
    }

    /// The bus record, stamped `now_ms` (key and value move, uncopied).
    pub fn into_record(self, now_ms: i64) -> Record {
        let mut r = Record::new(self.key.into_bytes(), self.value, now_ms);
        r.headers = self.headers;
        r
    }
}

fn headers<const N: usize>(pairs: [(&str, &str); N]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// -------------------------------------------------------------- provenance

/// Which rule version made a decision: recorded with every alert and tariff
/// decision, on the bus and in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuleRef {
    /// The plugin (`anomaly`, `overload`, `tariff`).
    pub name: String,
    /// Its version in the process that decided (1 at start, + 1 per swap).
    pub version: u64,
    /// SHA-256 of its component, hex.
    pub sha256: String,
}

// ------------------------------------------------------------------ alerts

/// `alerts`: an alert raised by the stream stage (ANOMALY) or the alert stage
/// (OVERLOAD); key meter_id (or region), headers type / severity / region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub alert_type: AlertType,
    pub severity: Severity,
    pub meter_id: Option<String>,
    pub region: Option<String>,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
    pub message: String,
    pub metadata: AlertMetadata,
    /// The rule version that raised it (for PLUGIN_FAULT / PLUGIN_ROLLBACK:
    /// the version that failed / was rolled back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
}

/// Namespace of alert ids (UUID v5).
const ALERT_IDS: Uuid = uuid::uuid!("5e6d2a3c-8f1b-4c0e-9a57-3b9f0d1e2c44");

impl Alert {
    /// The id of the alert of `alert_type` raised on `subject` (a meter, or
    /// a region) for event time `timestamp_ms` (the reading, or the start of
    /// the regional window): derived from them (UUID v5), so a replay raises
    /// the same alert with the same id, and an id owns its dedupe mark
    /// across replays and restarts.
    pub fn derived_id(alert_type: AlertType, subject: &str, timestamp_ms: i64) -> Uuid {
        let name = format!("{}:{subject}:{timestamp_ms}", alert_type.as_str());
        Uuid::new_v5(&ALERT_IDS, name.as_bytes())
    }
}

/// The details of an alert, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AlertMetadata {
    Anomaly(AnomalyMetadata),
    Overload(OverloadMetadata),
    Plugin(PluginMetadata),
}

/// What failed in a plugin, or where a rollback went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginMetadata {
    pub plugin: String,
    pub version: u64,
    pub sha256: String,
    /// The call that failed (`detect`, `price`, …); for a rollback, none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// Why it failed, or why it was rolled back.
    pub reason: String,
    /// For a rollback: the version it went back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyMetadata {
    pub baseline: f64,
    pub current: f64,
    /// Percent change from the baseline.
    pub change: f64,
    #[serde(rename = "type")]
    pub kind: AnomalyKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverloadMetadata {
    pub load_percentage: f64,
    pub total_consumption: f64,
    pub capacity: f64,
    pub consecutive_windows: u32,
}

impl Message for Alert {
    const TOPIC: Topic = Topic::Alerts;
    fn key(&self) -> String {
        self.meter_id
            .as_deref()
            .or(self.region.as_deref())
            .or(self.rule.as_ref().map(|r| r.name.as_str()))
            .unwrap_or("")
            .to_owned()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([
            ("type", self.alert_type.as_str()),
            ("severity", self.severity.as_str()),
            ("region", self.region.as_deref().unwrap_or("")),
        ])
    }
}

/// `alerts_processed`: an alert as stored; key alertId.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertProcessed {
    pub alert_id: Uuid,
    #[serde(rename = "type")]
    pub alert_type: AlertType,
    pub severity: Severity,
    pub meter_id: Option<String>,
    pub region: Option<String>,
    pub message: String,
    pub status: AlertStatus,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
    #[serde(rename = "processedAt", with = "rfc3339_ms")]
    pub processed_at_ms: i64,
    /// The rule version that raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
}

impl Message for AlertProcessed {
    const TOPIC: Topic = Topic::AlertsProcessed;
    fn key(&self) -> String {
        self.alert_id.hyphenated().to_string()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([
            ("type", self.alert_type.as_str()),
            ("severity", self.severity.as_str()),
        ])
    }
}

/// `alert_status_updates`: an operator moved an alert; key alertId.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertStatusUpdate {
    pub alert_id: Uuid,
    #[serde(rename = "type")]
    pub alert_type: AlertType,
    pub region: Option<String>,
    pub meter_id: Option<String>,
    pub status: AlertStatus,
    pub previous_status: AlertStatus,
    pub by: Option<String>,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
}

impl Message for AlertStatusUpdate {
    const TOPIC: Topic = Topic::AlertStatusUpdates;
    fn key(&self) -> String {
        self.alert_id.hyphenated().to_string()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([("type", self.alert_type.as_str())])
    }
}

// -------------------------------------------------------------- aggregates

/// `aggregates_1m` / `aggregates_15m`: one meter's closed window (as stored,
/// merged with what was stored before for a late window); key meterId.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterWindow {
    pub meter_id: String,
    pub region: String,
    #[serde(rename = "windowStart", with = "rfc3339_ms")]
    pub window_start_ms: i64,
    pub avg_power_kw: f64,
    pub max_power_kw: f64,
    pub min_power_kw: f64,
    pub energy_kwh_sum: f64,
    pub voltage_avg: Option<f64>,
    pub count: u32,
}

impl MeterWindow {
    /// The 1-minute (`fifteen = false`) or 15-minute topic.
    pub fn topic(fifteen: bool) -> Topic {
        if fifteen {
            Topic::Aggregates15m
        } else {
            Topic::Aggregates1m
        }
    }

    /// For the 1-minute (`fifteen = false`) or 15-minute topic.
    pub fn keyed(&self, fifteen: bool) -> KeyedMessage {
        let kind = if fifteen {
            "15m_aggregate"
        } else {
            "1m_aggregate"
        };
        KeyedMessage {
            topic: MeterWindow::topic(fifteen),
            key: self.meter_id.clone(),
            value: serde_json::to_vec(self).expect("messages serialize"),
            headers: headers([("type", kind), ("region", &self.region)]),
        }
    }
}

/// `aggregates_1m_regional`: one region's closed 1-minute window; key region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionalWindow {
    pub region: String,
    /// The window start.
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
    pub meter_count: u32,
    pub total_consumption: f64,
    pub avg_consumption: f64,
    pub max_consumption: f64,
    pub min_consumption: f64,
    pub load_percentage: f64,
    #[serde(default)]
    pub capacity_kw: f64,
    #[serde(default)]
    pub active_meters: Vec<String>,
}

impl Message for RegionalWindow {
    const TOPIC: Topic = Topic::Aggregates1mRegional;
    fn key(&self) -> String {
        self.region.clone()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([("type", "regional_1m_aggregate"), ("region", &self.region)])
    }
}

/// `aggregates_1m_regional_partials`: what one partition of
/// `telemetry-readings` contributes to the regional 1-minute windows it
/// closed, and how far it has closed. The regional stage combines the
/// reports of every partition into [`RegionalWindow`]s, so the regional
/// figures do not depend on how many processes share the stream stage.
/// Key `regional`: one partition holds them all, in order per source
/// partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionalPartial {
    /// The `telemetry-readings` partition reporting.
    pub partition: u32,
    /// How many partitions `telemetry-readings` has (whose reports make a
    /// window complete).
    pub partitions: u32,
    /// Every on-time 1-minute window of this partition that starts before
    /// this has been closed (and reported, here or earlier).
    #[serde(with = "rfc3339_ms")]
    pub closed_until: i64,
    /// The windows closed since the last report, oldest first.
    pub windows: Vec<PartialWindow>,
}

/// One partition's share of one regional 1-minute window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialWindow {
    /// The window start.
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
    pub regions: Vec<PartialRegion>,
}

/// One region's sums over the meters of one partition in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialRegion {
    pub region: String,
    pub meter_count: u32,
    /// Sum over the meters of their average power in the window, kW.
    pub total_kw: f64,
    pub max_kw: f64,
    pub min_kw: f64,
    pub active_meters: Vec<String>,
}

/// The key every partial report goes under (so one partition, one
/// combiner, holds them all).
pub const REGIONAL_PARTIAL_KEY: &str = "regional";

impl Message for RegionalPartial {
    const TOPIC: Topic = Topic::RegionalPartials;
    fn key(&self) -> String {
        REGIONAL_PARTIAL_KEY.to_owned()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([("type", "regional_1m_partial")])
    }
}

// ------------------------------------------------------------ dead letters

/// `plugin_dead_letter`: a batch the anomaly rule failed on, parked there by
/// `on_fault = "dead_letter"` to be run again through the serving version
/// (`segs replay-dead-letters`); key the plugin's name, headers type /
/// plugin / version. It holds the rule's whole input, so a replay needs
/// nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub plugin: String,
    /// The call that failed (`detect`).
    pub call: String,
    /// The version that failed.
    pub failed: RuleRef,
    /// Why it failed.
    pub reason: String,
    #[serde(with = "rfc3339_ms")]
    pub parked_at: i64,
    pub readings: Vec<ParkedReading>,
}

/// One reading of a parked anomaly batch, as the rule was given it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParkedReading {
    pub meter_id: String,
    pub region: String,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
    pub power_kw: f64,
    /// The meter's baseline when the batch was detected.
    pub baseline_kw: f64,
    /// Readings behind that baseline.
    pub sample_count: u32,
}

impl Message for DeadLetter {
    const TOPIC: Topic = Topic::PluginDeadLetter;
    fn key(&self) -> String {
        self.plugin.clone()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([
            ("type", "plugin_dead_letter"),
            ("plugin", &self.plugin),
            ("version", &self.failed.version.to_string()),
        ])
    }
}

// ----------------------------------------------------------------- tariffs

/// `tariff_updates`: a region's price changed; key region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TariffUpdate {
    pub tariff_id: String,
    pub region: String,
    pub price_per_kwh: f64,
    pub previous_price: f64,
    pub change_percent: f64,
    pub load_percentage: f64,
    #[serde(rename = "effectiveFrom", with = "rfc3339_ms")]
    pub effective_from_ms: i64,
    pub reason: TariffReason,
    #[serde(rename = "timestamp", with = "rfc3339_ms")]
    pub timestamp_ms: i64,
    /// The tariff rule version that decided the price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
}

impl Message for TariffUpdate {
    const TOPIC: Topic = Topic::TariffUpdates;
    fn key(&self) -> String {
        self.region.clone()
    }
    fn headers(&self) -> Vec<(String, String)> {
        headers([("region", &self.region)])
    }
}

/// Reads a payload of type `M` off a record.
pub fn decode<'a, M: Deserialize<'a>>(value: &'a [u8]) -> Result<M, serde_json::Error> {
    serde_json::from_slice(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabularies_round_trip_with_the_seed_spelling() {
        for s in Severity::ALL {
            assert_eq!(s.as_str().parse::<Severity>().unwrap(), *s);
            assert_eq!(
                serde_json::to_string(s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(AlertType::Overload.as_str(), "OVERLOAD");
        assert_eq!(TariffReason::CriticalLoad.as_str(), "CRITICAL_LOAD");
        let e = "urgent".parse::<Severity>().unwrap_err();
        assert!(e.to_string().contains("low, medium, high, critical"), "{e}");
    }

    #[test]
    fn an_alert_reads_back_as_written_with_the_seed_field_names() {
        let alert = Alert {
            id: Uuid::nil(),
            alert_type: AlertType::Anomaly,
            severity: Severity::High,
            meter_id: Some("MTR-1".into()),
            region: Some("Mumbai-North".into()),
            timestamp_ms: 1_762_929_000_000,
            message: "spike".into(),
            metadata: AlertMetadata::Anomaly(AnomalyMetadata {
                baseline: 1.0,
                current: 3.5,
                change: 250.0,
                kind: AnomalyKind::Spike,
            }),
            rule: None,
        };
        let m = KeyedMessage::of(&alert);
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        assert_eq!(v["type"], "ANOMALY");
        assert_eq!(v["meter_id"], "MTR-1");
        assert_eq!(v["timestamp"], "2025-11-12T06:30:00.000Z");
        assert_eq!(v["metadata"]["type"], "spike");
        assert_eq!(m.key, "MTR-1");
        assert!(m.headers.contains(&("severity".into(), "high".into())));
        assert_eq!(decode::<Alert>(&m.value).unwrap(), alert);
    }

    #[test]
    fn a_dead_letter_reads_back_as_written_keyed_by_its_plugin() {
        let letter = DeadLetter {
            plugin: "anomaly".into(),
            call: "detect".into(),
            failed: RuleRef {
                name: "anomaly".into(),
                version: 2,
                sha256: "ab".repeat(32),
            },
            reason: "plugin `anomaly` failed during `detect`: trap".into(),
            parked_at: 1_762_929_000_000,
            readings: vec![ParkedReading {
                meter_id: "MTR-1".into(),
                region: "Mumbai-North".into(),
                timestamp_ms: 1_762_929_000_000,
                power_kw: 12.5,
                baseline_kw: 3.0,
                sample_count: 10,
            }],
        };
        let m = KeyedMessage::of(&letter);
        assert_eq!(m.topic, Topic::PluginDeadLetter);
        assert_eq!(m.key, "anomaly");
        assert!(m.headers.contains(&("version".into(), "2".into())));
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        assert_eq!(v["parkedAt"], "2025-11-12T06:30:00.000Z");
        assert_eq!(v["readings"][0]["meterId"], "MTR-1");
        assert_eq!(v["readings"][0]["baselineKw"], 3.0);
        assert_eq!(decode::<DeadLetter>(&m.value).unwrap(), letter);
    }

    #[test]
    fn overload_metadata_is_not_mistaken_for_anomaly_metadata() {
        let md = AlertMetadata::Overload(OverloadMetadata {
            load_percentage: 95.0,
            total_consumption: 380.0,
            capacity: 400.0,
            consecutive_windows: 2,
        });
        let json = serde_json::to_vec(&md).unwrap();
        assert_eq!(serde_json::from_slice::<AlertMetadata>(&json).unwrap(), md);
    }

    #[test]
    fn an_alert_id_is_derived_from_what_raised_it() {
        // A replay raises the same alert: the same id.
        let id = Alert::derived_id(AlertType::Overload, "Mumbai-North", 60_000);
        assert_eq!(
            id,
            Alert::derived_id(AlertType::Overload, "Mumbai-North", 60_000)
        );
        // Anything else differing: another alert.
        assert_ne!(
            id,
            Alert::derived_id(AlertType::Overload, "Mumbai-North", 120_000)
        );
        assert_ne!(
            id,
            Alert::derived_id(AlertType::Overload, "Delhi-South", 60_000)
        );
        assert_ne!(
            id,
            Alert::derived_id(AlertType::Anomaly, "Mumbai-North", 60_000)
        );
    }

    #[test]
    fn a_regional_window_without_capacity_still_reads() {
        let w: RegionalWindow = decode(
            br#"{"region":"R","timestamp":"2025-11-12T06:30:00.000Z","meter_count":2,
                "total_consumption":3.0,"avg_consumption":1.5,"max_consumption":2.0,
                "min_consumption":1.0,"load_percentage":50.0}"#,
        )
        .unwrap();
        assert_eq!(w.capacity_kw, 0.0);
        assert!(decode::<RegionalWindow>(br#"{"region":"R"}"#).is_err());
    }
}
