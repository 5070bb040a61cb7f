//! The reading: one smart-meter sample, as ingest validates it and as the
//! stream stage reads it back off the bus.
//!
//! Owns the wire names (camelCase, as the seed's payloads) and the event-time
//! representation (milliseconds since the Unix epoch, UTC). Does no I/O.

use std::borrow::Cow;

use serde::Deserialize;

/// A reading as it travels on the `telemetry-readings` topic: the fields the
/// host computes with, borrowed from the record's JSON. Fields the host does
/// not use (userId, seq, status, metadata, …) stay in the JSON untouched.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reading<'a> {
    #[serde(borrow)]
    pub reading_id: Cow<'a, str>,
    #[serde(borrow)]
    pub meter_id: Cow<'a, str>,
    #[serde(borrow)]
    pub region: Cow<'a, str>,
    /// Event time, canonical RFC 3339 with milliseconds and `Z`
    /// (ingest rewrites every accepted timestamp to this form).
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
    pub power_kw: f64,
    #[serde(default)]
    pub energy_kwh: Option<f64>,
    #[serde(default)]
    pub voltage: Option<f64>,
}

impl Reading<'_> {
    /// Event time in milliseconds since the epoch.
    pub fn event_time_ms(&self) -> Option<i64> {
        crate::time::parse_rfc3339_ms(&self.timestamp)
    }
}
