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

impl<'a> Reading<'a> {
    /// Event time in milliseconds since the epoch.
    pub fn event_time_ms(&self) -> Option<i64> {
        crate::time::parse_rfc3339_ms(&self.timestamp)
    }

    /// Parses a record of `telemetry-readings`: in one pass of
    /// [`crate::json_scan`] when it takes the record (the plain case),
    /// else with serde_json, whose answer is the same (and whose error
    /// names what is wrong).
    pub fn from_json(value: &'a [u8]) -> Result<Reading<'a>, serde_json::Error> {
        if let Some(r) = WireFields::scan(value).and_then(|f| f.reading()) {
            return Ok(r);
        }
        serde_json::from_slice(value)
    }
}

/// The fields of a reading the host reads, as raw JSON slices of one record,
/// from one scan: the fast path of [`Reading::from_json`] and of the
/// archive. It takes only what serde_json's derive would take the same way;
/// anything else (a repeated known field, a value of another type, a
/// number beyond f64) is left to serde_json by the callers.
#[derive(Debug, Default)]
pub struct WireFields<'a> {
    pub reading_id: Option<&'a str>,
    pub meter_id: Option<&'a str>,
    pub region: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub power_kw: Option<&'a str>,
    pub energy_kwh: Option<&'a str>,
    pub voltage: Option<&'a str>,
    pub current: Option<&'a str>,
    pub frequency: Option<&'a str>,
    pub power_factor: Option<&'a str>,
    pub temperature: Option<&'a str>,
}

impl<'a> WireFields<'a> {
    /// Scans a record's JSON; `None` when the scanner declines it or a
    /// known field comes twice.
    pub fn scan(value: &'a [u8]) -> Option<WireFields<'a>> {
        let text = crate::json_scan::utf8(value)?;
        let mut f = WireFields::default();
        let mut repeated = false;
        crate::json_scan::whole_object(text, |key, v| {
            let slot = match key {
                "readingId" => &mut f.reading_id,
                "meterId" => &mut f.meter_id,
                "region" => &mut f.region,
                "timestamp" => &mut f.timestamp,
                "powerKw" => &mut f.power_kw,
                "energyKwh" => &mut f.energy_kwh,
                "voltage" => &mut f.voltage,
                "current" => &mut f.current,
                "frequency" => &mut f.frequency,
                "powerFactor" => &mut f.power_factor,
                "temperature" => &mut f.temperature,
                _ => return,
            };
            repeated |= slot.replace(v).is_some();
        })?;
        (!repeated).then_some(f)
    }

    /// The [`Reading`] of these fields, when every one it needs is there
    /// with its type.
    fn reading(&self) -> Option<Reading<'a>> {
        Some(Reading {
            reading_id: Cow::Borrowed(text(self.reading_id)?),
            meter_id: Cow::Borrowed(text(self.meter_id)?),
            region: Cow::Borrowed(text(self.region)?),
            timestamp: Cow::Borrowed(text(self.timestamp)?),
            power_kw: number(self.power_kw)?,
            energy_kwh: optional_number(self.energy_kwh)?,
            voltage: optional_number(self.voltage)?,
        })
    }
}

/// A required string field: its text (the scanner takes no escapes).
pub fn text(v: Option<&str>) -> Option<&str> {
    crate::json_scan::plain_str(v?)
}

/// A required number field, as serde_json reads it into an f64 (a number
/// beyond f64 is an error there: declined here).
pub fn number(v: Option<&str>) -> Option<f64> {
    number_text(v)?
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
}

/// A value the scanner took that is a JSON number (not a string, literal,
/// array or object), as its text; not parsed.
pub fn number_text(v: Option<&str>) -> Option<&str> {
    let v = v?;
    matches!(v.as_bytes().first(), Some(b'-' | b'0'..=b'9')).then_some(v)
}

/// An optional number field: `Some(None)` when it is missing or `null`,
/// `None` when it is something else than a number.
pub fn optional_number(v: Option<&str>) -> Option<Option<f64>> {
    match v {
        None | Some("null") => Some(None),
        Some(_) => number(v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: &str = r#"{"readingId":"r-1","meterId":"MTR-00000001","userId":"USR-1","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"energyKwh":0.0436,"voltage":230,"region":"Mumbai-North","seq":7,"metadata":{"mode":"normal","baseLoad":4.5,"phases":[1,2]},"receivedAt":"2025-11-12T06:30:00.120Z"}"#;

    fn by_scan(v: &[u8]) -> Option<String> {
        WireFields::scan(v)
            .and_then(|f| f.reading())
            .map(|r| format!("{r:?}"))
    }

    fn by_serde(v: &[u8]) -> Option<String> {
        serde_json::from_slice::<Reading<'_>>(v)
            .ok()
            .map(|r| format!("{r:?}"))
    }

    /// The scan reads a record exactly as serde_json's derive does, or
    /// leaves it to serde_json; `from_json` gives serde_json's answer.
    #[test]
    fn the_scan_reads_what_serde_json_reads() {
        let taken = [
            READING.to_owned(),
            READING.replace(r#","energyKwh":0.0436,"voltage":230"#, ""),
            READING.replace("0.0436", "null"),
            READING.replace("5.234", "-0"),
            READING.replace("5.234", "1e3"),
            READING.replace("5.234", "12"),
        ];
        for v in &taken {
            assert!(by_scan(v.as_bytes()).is_some(), "declined {v}");
        }
        let left = [
            READING.replace("5.234", "1e400"),
            READING.replace("5.234", r#""5.2""#),
            READING.replace("MTR-00000001", r#"MTR-\u0030"#),
            READING.replace(r#""seq":7"#, r#""powerKw":1"#),
            READING.replace(r#""powerKw":5.234,"#, ""),
            READING.replace("0.0436", "true"),
        ];
        for v in &left {
            assert!(by_scan(v.as_bytes()).is_none(), "took {v}");
        }
        let mut scanned = 0;
        for v in taken
            .iter()
            .chain(&left)
            .cloned()
            .chain(crate::json_scan::damaged(READING))
        {
            let fast = by_scan(v.as_bytes());
            if fast.is_some() {
                scanned += 1;
                assert_eq!(fast, by_serde(v.as_bytes()), "{v}");
            }
            let whole = Reading::from_json(v.as_bytes())
                .ok()
                .map(|r| format!("{r:?}"));
            assert_eq!(whole, by_serde(v.as_bytes()), "{v}");
        }
        assert!(scanned > 1000, "only {scanned} records scanned");
    }
}
