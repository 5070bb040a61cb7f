//! The reading: one smart-meter sample, as ingest validates it and as the
//! stream stage reads it back off the bus.
//!
//! Owns the wire names (camelCase, as the seed's payloads) and the event-time
//! representation (milliseconds since the Unix epoch, UTC). Does no I/O.
//!
//! [`Reading::parse`] is on the per-reading path of the stream stage: a
//! one-pass scanner picks out the fields it needs from a flat object and
//! skips the rest; anything it does not expect (an escaped string, a
//! duplicate field, a missing one) goes to `serde_json`, which gives the
//! exact answer and error. The scanner checks the fields it reads as strictly
//! as serde does but only skims the others (ingest has validated the whole
//! record before publishing it).

use std::borrow::Cow;

use serde::Deserialize;

/// A reading as it travels on the `telemetry-readings` topic: the fields the
/// host computes with, borrowed from the record's JSON. Fields the host does
/// not use (userId, seq, status, metadata, …) stay in the JSON untouched.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reading<'a> {
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
    /// Parses a record value as published on `telemetry-readings`.
    pub fn parse(json: &'a [u8]) -> Result<Reading<'a>, serde_json::Error> {
        match scan(json) {
            Some(r) => Ok(r),
            None => serde_json::from_slice(json),
        }
    }

    /// Event time in milliseconds since the epoch.
    pub fn event_time_ms(&self) -> Option<i64> {
        crate::time::parse_rfc3339_ms(&self.timestamp)
    }
}

/// The fast path of [`Reading::parse`]; `None` means "ask serde_json".
fn scan(json: &[u8]) -> Option<Reading<'_>> {
    let mut p = Scanner { b: json, i: 0 };
    p.ws();
    p.eat(b'{')?;
    let (mut meter_id, mut region, mut timestamp, mut power_kw) = (None, None, None, None);
    let (mut energy_kwh, mut voltage) = (None, None);
    p.ws();
    if p.peek()? == b'}' {
        return None;
    }
    loop {
        p.ws();
        let key = p.plain_string()?;
        p.ws();
        p.eat(b':')?;
        p.ws();
        let slot: Option<&mut Option<&str>> = match key {
            "meterId" => Some(&mut meter_id),
            "region" => Some(&mut region),
            "timestamp" => Some(&mut timestamp),
            _ => None,
        };
        if let Some(slot) = slot {
            if slot.is_some() {
                return None; // duplicate: serde's error
            }
            *slot = Some(p.plain_string()?);
        } else {
            let num: Option<&mut Option<Option<f64>>> = match key {
                "powerKw" => Some(&mut power_kw),
                "energyKwh" => Some(&mut energy_kwh),
                "voltage" => Some(&mut voltage),
                _ => None,
            };
            match num {
                Some(slot) => {
                    if slot.is_some() {
                        return None;
                    }
                    *slot = Some(p.number_or_null()?);
                }
                None => p.skip_value()?,
            }
        }
        p.ws();
        match p.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    p.ws();
    if p.i != json.len() {
        return None;
    }
    Some(Reading {
        meter_id: Cow::Borrowed(meter_id?),
        region: Cow::Borrowed(region?),
        timestamp: Cow::Borrowed(timestamp?),
        power_kw: power_kw??,
        energy_kwh: energy_kwh.flatten(),
        voltage: voltage.flatten(),
    })
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => {}
            }
        }
        std::str::from_utf8(&self.b[start..self.i - 1]).ok()
    }

    /// A JSON number (`None` inside for `null`), parsed by the standard
    /// library; anything else is left to serde.
    fn number_or_null(&mut self) -> Option<Option<f64>> {
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            return Some(None);
        }
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        // JSON forbids what Rust's parser accepts beyond it ("+1", ".5",
        // "1.", "inf"); leave those to serde.
        let first = *text.as_bytes().first()?;
        if !(first == b'-' || first.is_ascii_digit())
            || text.ends_with('.')
            || text.contains(".e")
            || text.contains(".E")
        {
            return None;
        }
        let digits = text.trim_start_matches('-');
        if digits.len() > 1
            && digits.starts_with('0')
            && !digits.starts_with("0.")
            && !digits.starts_with("0e")
            && !digits.starts_with("0E")
        {
            return None;
        }
        text.parse::<f64>().ok().filter(|v| v.is_finite()).map(Some)
    }

    /// Skips any value (strings with escapes, nested objects and arrays).
    fn skip_value(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    loop {
                        match self.next()? {
                            b'"' => break,
                            b'\\' => {
                                self.next()?;
                            }
                            _ => {}
                        }
                    }
                }
                b'{' | b'[' => {
                    depth += 1;
                    self.i += 1;
                }
                b'}' | b']' => {
                    if depth == 0 {
                        return Some(());
                    }
                    depth -= 1;
                    self.i += 1;
                }
                b',' if depth == 0 => return Some(()),
                _ => self.i += 1,
            }
            if depth == 0 && matches!(self.peek(), Some(b',' | b'}')) {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path and serde agree, field by field.
    fn same(json: &str) {
        let fast = scan(json.as_bytes());
        let slow: Result<Reading<'_>, _> = serde_json::from_str(json);
        match (fast, slow) {
            (Some(f), Ok(s)) => {
                assert_eq!(
                    (
                        f.meter_id,
                        f.region,
                        f.timestamp,
                        f.power_kw,
                        f.energy_kwh,
                        f.voltage
                    ),
                    (
                        s.meter_id,
                        s.region,
                        s.timestamp,
                        s.power_kw,
                        s.energy_kwh,
                        s.voltage
                    ),
                    "{json}"
                );
            }
            (Some(f), Err(e)) => {
                panic!("fast path accepted what serde refuses ({e}): {json} → {f:?}")
            }
            (None, _) => {} // serde decides
        }
    }

    #[test]
    fn the_fast_path_agrees_with_serde() {
        for json in [
            r#"{"readingId":"a","meterId":"MTR-1","region":"R","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"receivedAt":"x"}"#,
            r#"{"readingId":"a","meterId":"MTR-1","userId":"U","timestamp":"2025-11-12T06:30:00.000Z","powerKw":0,"energyKwh":0.0435,"voltage":235.6,"region":"Mumbai-North","seq":1523,"status":"OK","metadata":{"mode":"normal","baseLoad":4.5,"x":[1,{"y":"}"}]},"receivedAt":"2025-11-12T06:30:01.234Z"}"#,
            r#" { "meterId" : "M" , "region" : "R" , "timestamp" : "t" , "powerKw" : 1e2 , "voltage" : null } "#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":-0.5e-3,"note":"a \"quoted\" \\ value"}"#,
            r#"{"meterId":"M\u0041","region":"R","timestamp":"t","powerKw":1}"#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":1,"meterId":"N"}"#,
            r#"{"meterId":"M","region":"R","timestamp":"t"}"#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":01}"#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":1.}"#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":"1"}"#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":1} trailing"#,
            r#"{"meterId":"M","region":"R","timestamp":"t","powerKw":1,}"#,
            r#"{}"#,
            r#"[]"#,
            "",
        ] {
            same(json);
        }
    }

    #[test]
    fn parse_falls_back_to_serde_for_escapes() {
        let r =
            Reading::parse(br#"{"meterId":"M\u0041","region":"R","timestamp":"t","powerKw":1}"#)
                .unwrap();
        assert_eq!(r.meter_id, "MA");
        assert!(matches!(r.meter_id, Cow::Owned(_)), "unescaped by serde");
        assert!(Reading::parse(br#"{"meterId":"M"}"#).is_err());
    }
}
