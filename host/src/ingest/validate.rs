//! Request validation for `POST /telemetry/batch` and `POST /telemetry`: the
//! hot path of ingest.
//!
//! Owns the reading schema of SPEC §3 (the seed's Zod schema plus
//! `energyKwh`), the wording of every validation error, and the rewrite of an
//! accepted reading into the form published on the bus (canonical
//! `timestamp`, `receivedAt` added). Readings are checked in place, in one
//! pass over the body ([`crate::json_scan`]): each reading object's known
//! fields are picked out as borrowed slices and type-checked; unknown fields
//! are checked as JSON but never decoded, and travel verbatim. A body the
//! scanner declines (an escape in a string, deep nesting, or anything that
//! is not a well-formed array of objects) goes through serde_json whole
//! instead, so every error names its place in the body as serde_json
//! reports it.
//!
//! Event time must lie within [`TimeBounds`] around the server clock
//! (`[ingest] max_clock_skew_s` ahead, `max_reading_age_s` behind): one
//! meter with a wrong clock must not move event time for everyone (see
//! ARCHITECTURE.md, "Event time and bad clocks"). The caller reads the
//! clock; this module only compares.
//!
//! Must not: do I/O, know about dedupe, the bus or HTTP status codes, or
//! accept part of a batch: one invalid reading fails the whole batch, and
//! every field error of every reading is reported (capped at
//! [`MAX_DETAILS`]).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::ops::Range;

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

/// The batch limit of SPEC §3 (`POST /telemetry/batch` takes 1..=1000).
pub const MAX_BATCH: usize = 1000;

/// At most this many field errors are listed in [`ValidationError::details`];
/// the message says how many more there were.
pub const MAX_DETAILS: usize = 100;

/// The readings of an accepted request, in request order.
#[derive(Debug)]
pub struct Validated<'a> {
    pub readings: Vec<ValidReading<'a>>,
}

/// One accepted reading, borrowing from the request body.
#[derive(Debug, Clone)]
pub struct ValidReading<'a> {
    /// The reading's original JSON object, verbatim (unknown fields included).
    pub raw: &'a str,
    /// Borrowed unless the wire form holds escapes.
    pub meter_id: Cow<'a, str>,
    /// Event time, epoch milliseconds (see [`crate::time::parse_rfc3339_ms`]).
    pub timestamp_ms: i64,
    pub power_kw: f64,
    /// Byte range of the `timestamp` value (quotes included) in `raw`.
    timestamp_span: Range<usize>,
    /// The wire timestamp already is the canonical form.
    timestamp_canonical: bool,
    /// Byte range of an incoming `receivedAt` value in `raw`, to be replaced.
    received_at_span: Option<Range<usize>>,
}

/// Why a request was refused: a summary and, for schema errors, one entry
/// per offending field (at most [`MAX_DETAILS`]).
#[derive(Debug, thiserror::Error, serde::Serialize)]
#[error("{message}")]
pub struct ValidationError {
    pub message: String,
    pub details: Vec<FieldError>,
}

/// One schema violation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    /// Position in the batch; `None` on `POST /telemetry`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The wire (camelCase) field name; empty when the error is about the
    /// reading as a whole (e.g. not a JSON object).
    pub field: String,
    pub message: String,
}

/// How far from the server clock a reading's event time may be: at most
/// `max_ahead_ms` after `now_ms` and `max_age_ms` before it, both bounds
/// inclusive; `None` is no bound on that side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    /// The server clock for this request, epoch milliseconds.
    pub now_ms: i64,
    pub max_ahead_ms: Option<i64>,
    pub max_age_ms: Option<i64>,
}

impl TimeBounds {
    /// Any event time is accepted (unit tests, tools that replay history).
    pub const UNBOUNDED: TimeBounds = TimeBounds {
        now_ms: 0,
        max_ahead_ms: None,
        max_age_ms: None,
    };

    /// The bounds of `[ingest]` (seconds; 0 = no bound) around `now_ms`.
    pub fn from_secs(now_ms: i64, max_ahead_s: u64, max_age_s: u64) -> TimeBounds {
        let ms =
            |s: u64| (s > 0).then(|| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX));
        TimeBounds {
            now_ms,
            max_ahead_ms: ms(max_ahead_s),
            max_age_ms: ms(max_age_s),
        }
    }

    /// Why `event_ms` is out of bounds, if it is.
    fn check(&self, event_ms: i64) -> Option<String> {
        let ahead = event_ms.saturating_sub(self.now_ms);
        if let Some(max) = self.max_ahead_ms {
            if ahead > max {
                return Some(format!(
                    "Timestamp {} is {} ahead of the server clock; at most {} ahead is \
                     accepted (ingest.max_clock_skew_s)",
                    crate::time::format_rfc3339_ms(event_ms),
                    distance(ahead, max),
                    bound(max),
                ));
            }
        }
        if let Some(max) = self.max_age_ms {
            let age = self.now_ms.saturating_sub(event_ms);
            if age > max {
                return Some(format!(
                    "Timestamp {} is {} older than the server clock; at most {} old is \
                     accepted (ingest.max_reading_age_s)",
                    crate::time::format_rfc3339_ms(event_ms),
                    distance(age, max),
                    bound(max),
                ));
            }
        }
        None
    }
}

/// A configured bound (whole seconds) as days or hours when it is a whole
/// number of them, else in seconds like the config key: `300 s`, `7 days`.
fn bound(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if s >= 86_400 && s % 86_400 == 0 => plural(s / 86_400, "day"),
        _ if s >= 3_600 && s % 3_600 == 0 => format!("{} h", s / 3_600),
        _ => format!("{s} s"),
    }
}

/// How far out of bounds a timestamp is: whole days when that is clearly
/// beyond `bound_ms`, else exact seconds (so a distance just past the bound
/// never reads as equal to it).
fn distance(ms: i64, bound_ms: i64) -> String {
    const DAY_MS: i64 = 86_400_000;
    if ms >= 2 * DAY_MS && ms / DAY_MS > bound_ms / DAY_MS {
        return plural(ms / DAY_MS, "day");
    }
    match ms % 1000 {
        0 => format!("{} s", ms / 1000),
        frac => format!("{}.{frac:03} s", ms / 1000),
    }
}

fn plural(n: i64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

impl ValidationError {
    fn body(message: impl Into<String>) -> Self {
        ValidationError {
            message: message.into(),
            details: Vec::new(),
        }
    }
}

/// Validates the body of `POST /telemetry/batch`: a JSON array of
/// 1..=`max_batch` reading objects, each with its event time within `time`.
pub fn validate_batch(
    body: &[u8],
    max_batch: usize,
    time: TimeBounds,
) -> Result<Validated<'_>, ValidationError> {
    if first_byte(body) != Some(b'[') {
        return Err(not_json_or(body, |b| match b {
            Some(b'{') => {
                "Request body must be a JSON array of readings \
                 (send a single reading to POST /telemetry)"
            }
            _ => "Request body must be a JSON array of readings",
        }));
    }
    if let Some(valid) = validate_scanned(body, max_batch, time) {
        return valid;
    }
    validate_parsed(body, max_batch, time)
}

/// The batch path of any body that starts as an array: serde_json scans it
/// whole into reading slices (reporting syntax errors with their line and
/// column), then each slice is checked.
fn validate_parsed(
    body: &[u8],
    max_batch: usize,
    time: TimeBounds,
) -> Result<Validated<'_>, ValidationError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let (items, count) = de
        .deserialize_seq(BatchVisitor {
            max: max_batch,
            size_guess: body.len() / 128,
        })
        .and_then(|v| de.end().map(|()| v))
        .map_err(invalid_json)?;
    if count == 0 {
        return Err(ValidationError::body(
            "Batch must contain at least one reading",
        ));
    }
    if count > max_batch {
        return Err(ValidationError::body(format!(
            "Batch size cannot exceed {max_batch} readings (got {count})"
        )));
    }
    let mut errors = Errors::default();
    let mut readings = Vec::with_capacity(items.len());
    for (i, raw) in items.into_iter().enumerate() {
        let raw = raw.get();
        let fields = match reading_fields(raw) {
            Ok(f) => f,
            Err(e) => {
                // Syntax was checked when the body was scanned; what is left
                // is e.g. an invalid escape in a key.
                errors.push(Some(i), "", format!("invalid reading: {e}"));
                continue;
            }
        };
        if let Some(r) = check_reading(raw, fields, Some(i), time, &mut errors) {
            if errors.total == 0 {
                readings.push(r);
            }
        }
    }
    errors.into_result(readings, true)
}

/// The batch path of a well-formed body: one pass of [`json_scan`] over
/// the array, each reading's fields checked as its object is scanned.
/// `None` when the body is anything else (not UTF-8, not an array of
/// 1..=`max` objects, an object the scanner declines), for the serde_json
/// path to report.
///
/// The scanner checks the full JSON grammar of each object and this loop
/// what lies between them (`[`, `,`, `]` and whitespace only), so a body
/// taken here is a JSON array of objects, as serde_json would have found it.
///
/// [`json_scan`]: crate::json_scan
fn validate_scanned(
    body: &[u8],
    max: usize,
    time: TimeBounds,
) -> Option<Result<Validated<'_>, ValidationError>> {
    use crate::json_scan::{object, ws};
    let body = crate::json_scan::utf8(body)?;
    let b = body.as_bytes();
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = ws(b, i + 1);
    let mut errors = Errors::default();
    let mut readings = Vec::with_capacity((b.len() / 256).clamp(1, max.max(1)));
    let mut index = 0;
    loop {
        if b.get(i) != Some(&b'{') || index == max {
            return None;
        }
        let mut fields = RawFields::default();
        let end = object(body, i, |key, value| {
            fields.put(Field::from_key(key), value)
        })?;
        let raw = &body[i..end];
        if let Some(r) = check_reading(raw, fields, Some(index), time, &mut errors) {
            if errors.total == 0 {
                readings.push(r);
            }
        }
        index += 1;
        i = ws(b, end);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b']') if ws(b, i + 1) == b.len() => break,
            _ => return None,
        }
    }
    Some(errors.into_result(readings, true))
}

/// Validates the body of `POST /telemetry`: one reading object, its event
/// time within `time`.
pub fn validate_one(body: &[u8], time: TimeBounds) -> Result<Validated<'_>, ValidationError> {
    if first_byte(body) != Some(b'{') {
        return Err(not_json_or(body, |b| match b {
            Some(b'[') => {
                "Request body must be a single reading object \
                 (send arrays to POST /telemetry/batch)"
            }
            _ => "Request body must be a single reading object",
        }));
    }
    if let Some((raw, fields)) = scan_one(body) {
        let mut errors = Errors::default();
        let reading = check_reading(raw, fields, None, time, &mut errors);
        return errors.into_result(reading.into_iter().collect(), false);
    }
    let raw: &RawValue = serde_json::from_slice(body).map_err(invalid_json)?;
    let raw = raw.get();
    let mut errors = Errors::default();
    let reading = match reading_fields(raw) {
        Ok(fields) => check_reading(raw, fields, None, time, &mut errors),
        Err(e) => {
            errors.push(None, "", format!("invalid reading: {e}"));
            None
        }
    };
    errors.into_result(reading.into_iter().collect(), false)
}

/// The one reading object of a body (whitespace around it allowed) and its
/// known fields, when [`crate::json_scan`] takes it.
fn scan_one(body: &[u8]) -> Option<(&str, RawFields<'_>)> {
    use crate::json_scan::{object, ws};
    let body = crate::json_scan::utf8(body)?;
    let b = body.as_bytes();
    let start = ws(b, 0);
    let mut fields = RawFields::default();
    let end = object(body, start, |key, value| {
        fields.put(Field::from_key(key), value)
    })?;
    (ws(b, end) == b.len()).then_some((&body[start..end], fields))
}

/// What [`write_published`] adds to a reading's own text when it has no
/// `receivedAt` and a canonical timestamp: a buffer's size for it, not a
/// bound (a timestamp written canonically may grow).
pub const RECEIVED_AT_BYTES: usize = ",\"receivedAt\":".len() + 2 + crate::time::RFC3339_MS_LEN;

/// Appends `r` as published on the bus to `out`: the original object with
/// `timestamp` in canonical form and `"receivedAt":"<received_at>"` (an
/// incoming `receivedAt` value is replaced in place, never duplicated).
/// `received_at` must be a canonical timestamp
/// ([`crate::time::write_rfc3339_ms`]); it is written without escaping.
pub fn write_published(r: &ValidReading<'_>, received_at: &str, out: &mut Vec<u8>) {
    debug_assert!(
        !received_at
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b < 0x20)
    );
    let src = r.raw.as_bytes();
    let ts = r.timestamp_span.clone();
    match r.received_at_span.clone() {
        Some(ra) if ra.start < ts.start => {
            out.extend_from_slice(&src[..ra.start]);
            write_quoted(out, received_at);
            out.extend_from_slice(&src[ra.end..ts.start]);
            write_timestamp(r, out);
            out.extend_from_slice(&src[ts.end..]);
        }
        Some(ra) => {
            out.extend_from_slice(&src[..ts.start]);
            write_timestamp(r, out);
            out.extend_from_slice(&src[ts.end..ra.start]);
            write_quoted(out, received_at);
            out.extend_from_slice(&src[ra.end..]);
        }
        None => {
            // The closing brace is the last byte of a raw object; a reading
            // always has members, so a comma is always right.
            let close = src.iter().rposition(|&b| b == b'}').unwrap_or(src.len());
            out.extend_from_slice(&src[..ts.start]);
            write_timestamp(r, out);
            out.extend_from_slice(&src[ts.end..close]);
            out.extend_from_slice(b",\"receivedAt\":");
            write_quoted(out, received_at);
            out.extend_from_slice(&src[close..]);
        }
    }
}

fn write_quoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn write_timestamp(r: &ValidReading<'_>, out: &mut Vec<u8>) {
    if r.timestamp_canonical {
        out.extend_from_slice(&r.raw.as_bytes()[r.timestamp_span.clone()]);
        return;
    }
    thread_local! {
        static BUF: RefCell<String> = RefCell::new(String::with_capacity(32));
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        crate::time::write_rfc3339_ms(&mut buf, r.timestamp_ms);
        write_quoted(out, &buf);
    });
}

// ---------------------------------------------------------------------------
// Body level

fn first_byte(body: &[u8]) -> Option<u8> {
    body.iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

fn invalid_json(e: serde_json::Error) -> ValidationError {
    ValidationError::body(format!("Invalid JSON: {e}"))
}

/// The body does not start as expected: report a syntax error if it is not
/// JSON at all, else the shape error chosen by `shape` from its first byte.
fn not_json_or(body: &[u8], shape: impl Fn(Option<u8>) -> &'static str) -> ValidationError {
    match serde_json::from_slice::<IgnoredAny>(body) {
        Err(e) => invalid_json(e),
        Ok(_) => ValidationError::body(shape(first_byte(body))),
    }
}

/// Collects up to `max` elements of a JSON array as raw slices and counts
/// (but does not keep) the rest.
struct BatchVisitor {
    max: usize,
    size_guess: usize,
}

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = (Vec<&'de RawValue>, usize);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of readings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(self.size_guess.clamp(1, self.max.max(1)));
        while items.len() < self.max {
            match seq.next_element::<&'de RawValue>()? {
                Some(v) => items.push(v),
                None => {
                    let n = items.len();
                    return Ok((items, n));
                }
            }
        }
        let mut count = items.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok((items, count))
    }
}

// ---------------------------------------------------------------------------
// Reading level

/// The fields the schema knows, in the order their errors are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ReadingId,
    MeterId,
    Region,
    Timestamp,
    PowerKw,
    EnergyKwh,
    Voltage,
    Current,
    Frequency,
    PowerFactor,
    Temperature,
    ReceivedAt,
}

const FIELDS: [Field; 12] = [
    Field::ReadingId,
    Field::MeterId,
    Field::Region,
    Field::Timestamp,
    Field::PowerKw,
    Field::EnergyKwh,
    Field::Voltage,
    Field::Current,
    Field::Frequency,
    Field::PowerFactor,
    Field::Temperature,
    Field::ReceivedAt,
];

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::ReadingId => "readingId",
            Field::MeterId => "meterId",
            Field::Region => "region",
            Field::Timestamp => "timestamp",
            Field::PowerKw => "powerKw",
            Field::EnergyKwh => "energyKwh",
            Field::Voltage => "voltage",
            Field::Current => "current",
            Field::Frequency => "frequency",
            Field::PowerFactor => "powerFactor",
            Field::Temperature => "temperature",
            Field::ReceivedAt => "receivedAt",
        }
    }

    fn from_key(key: &str) -> Option<Field> {
        Some(match key {
            "readingId" => Field::ReadingId,
            "meterId" => Field::MeterId,
            "region" => Field::Region,
            "timestamp" => Field::Timestamp,
            "powerKw" => Field::PowerKw,
            "energyKwh" => Field::EnergyKwh,
            "voltage" => Field::Voltage,
            "current" => Field::Current,
            "frequency" => Field::Frequency,
            "powerFactor" => Field::PowerFactor,
            "temperature" => Field::Temperature,
            "receivedAt" => Field::ReceivedAt,
            _ => return None,
        })
    }
}

/// Deserializes an object key into the known field it names, if any.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<Field>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<Field>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::from_key(v))
    }
}

/// The known fields of one reading object as raw JSON slices of it.
#[derive(Default)]
struct RawFields<'a> {
    values: [Option<&'a str>; FIELDS.len()],
    duplicated: [bool; FIELDS.len()],
}

impl<'a> RawFields<'a> {
    fn get(&self, f: Field) -> Option<&'a str> {
        self.values[f as usize]
    }

    /// Keeps the first value of a known field; notes a repeat.
    fn put(&mut self, field: Option<Field>, value: &'a str) {
        let Some(f) = field else {
            return;
        };
        let slot = &mut self.values[f as usize];
        if slot.is_some() {
            self.duplicated[f as usize] = true;
        } else {
            *slot = Some(value);
        }
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = RawFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a reading object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = RawFields::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Some(f) => {
                    let v: &'de RawValue = map.next_value()?;
                    fields.put(Some(f), v.get());
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// Error collector across all readings of a request.
#[derive(Default)]
struct Errors {
    details: Vec<FieldError>,
    total: usize,
    readings: usize,
    last_index: Option<Option<usize>>,
}

impl Errors {
    fn push(&mut self, index: Option<usize>, field: &str, message: impl Into<String>) {
        if self.last_index != Some(index) {
            self.last_index = Some(index);
            self.readings += 1;
        }
        self.total += 1;
        if self.details.len() < MAX_DETAILS {
            self.details.push(FieldError {
                index,
                field: field.to_owned(),
                message: message.into(),
            });
        }
    }

    fn into_result<'a>(
        self,
        readings: Vec<ValidReading<'a>>,
        batch: bool,
    ) -> Result<Validated<'a>, ValidationError> {
        if self.total == 0 {
            return Ok(Validated { readings });
        }
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut message = format!("Validation failed: {}", plural(self.total, "error"));
        if batch {
            message.push_str(&format!(" in {}", plural(self.readings, "reading")));
        }
        if self.total > self.details.len() {
            let omitted = self.total - self.details.len();
            message.push_str(&format!(
                " (first {} listed, {omitted} more omitted)",
                self.details.len()
            ));
        }
        Err(ValidationError {
            message,
            details: self.details,
        })
    }
}

/// The JSON type of a raw value, from its first byte (raw values carry no
/// surrounding whitespace).
fn is_string(v: &str) -> bool {
    v.as_bytes().first() == Some(&b'"')
}

fn is_number(v: &str) -> bool {
    matches!(v.as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

/// Decodes a raw JSON string, borrowing when it holds no escapes.
fn decode_str(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('\\') {
        return s.get(1..s.len() - 1).map(Cow::Borrowed);
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

/// Parses one reading's JSON (all of `raw`) into its known fields; a value
/// that is not an object is all unknown fields (reported by
/// [`check_reading`]).
fn reading_fields(raw: &str) -> Result<RawFields<'_>, serde_json::Error> {
    if raw.as_bytes().first() != Some(&b'{') {
        return Ok(RawFields::default());
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    let fields = de.deserialize_map(FieldsVisitor)?;
    de.end()?;
    Ok(fields)
}

/// Checks one reading, its known fields picked out by [`reading_fields`];
/// returns it when this reading is valid.
fn check_reading<'a>(
    raw: &'a str,
    fields: RawFields<'a>,
    index: Option<usize>,
    time: TimeBounds,
    errors: &mut Errors,
) -> Option<ValidReading<'a>> {
    if raw.as_bytes().first() != Some(&b'{') {
        errors.push(index, "", "expected a JSON object");
        return None;
    }
    let before = errors.total;
    let mut err = |field: Field, message: &str| errors.push(index, field.name(), message);

    let _reading_id = required_str(
        &fields,
        Field::ReadingId,
        "Reading ID is required",
        &mut err,
    );
    let meter_id = required_str(&fields, Field::MeterId, "Meter ID is required", &mut err);
    let _region = required_str(&fields, Field::Region, "Region is required", &mut err);

    let mut timestamp = None;
    if let Some(ts) = required_str(&fields, Field::Timestamp, "Timestamp is required", &mut err) {
        match crate::time::parse_rfc3339_ms(&ts) {
            Some(ms) => match time.check(ms) {
                None => timestamp = Some((ms, ts)),
                Some(out_of_bounds) => err(Field::Timestamp, &out_of_bounds),
            },
            None => err(Field::Timestamp, "Invalid timestamp format"),
        }
    }

    let power_kw = match fields.get(Field::PowerKw) {
        None => {
            err(Field::PowerKw, "Power is required");
            None
        }
        Some(v) => number(v, Field::PowerKw, Bound::NonNegative, &mut err),
    };
    for f in [
        Field::EnergyKwh,
        Field::Voltage,
        Field::Current,
        Field::Frequency,
    ] {
        if let Some(v) = fields.get(f) {
            number(v, f, Bound::NonNegative, &mut err);
        }
    }
    if let Some(v) = fields.get(Field::PowerFactor) {
        number(v, Field::PowerFactor, Bound::UnitInterval, &mut err);
    }
    if let Some(v) = fields.get(Field::Temperature) {
        number(v, Field::Temperature, Bound::Any, &mut err);
    }
    for f in FIELDS {
        if fields.duplicated[f as usize] {
            err(f, "duplicate field");
        }
    }
    if errors.total != before {
        return None;
    }

    let (timestamp_ms, ts_text) = timestamp?;
    let span_of = |v: &str| {
        let start = v.as_ptr() as usize - raw.as_ptr() as usize;
        start..start + v.len()
    };
    let ts_raw = fields.get(Field::Timestamp)?;
    let b = ts_text.as_bytes();
    // Parsed fine, 24 bytes with `T`, `.` and `Z` where the canonical form
    // has them: then it is the canonical form.
    let timestamp_canonical = matches!(ts_text, Cow::Borrowed(_))
        && b.len() == 24
        && b[10] == b'T'
        && b[19] == b'.'
        && b[23] == b'Z';
    Some(ValidReading {
        raw,
        meter_id: meter_id?,
        timestamp_ms,
        power_kw: power_kw?,
        timestamp_span: span_of(ts_raw),
        timestamp_canonical,
        received_at_span: fields.get(Field::ReceivedAt).map(span_of),
    })
}

fn required_str<'a>(
    fields: &RawFields<'a>,
    field: Field,
    required: &'static str,
    err: &mut impl FnMut(Field, &str),
) -> Option<Cow<'a, str>> {
    let Some(v) = fields.get(field) else {
        err(field, required);
        return None;
    };
    if !is_string(v) {
        err(field, "expected a string");
        return None;
    }
    match decode_str(v) {
        None => {
            err(field, "invalid string");
            None
        }
        Some(s) if s.is_empty() => {
            err(field, required);
            None
        }
        Some(s) => Some(s),
    }
}

#[derive(Clone, Copy)]
enum Bound {
    Any,
    NonNegative,
    UnitInterval,
}

fn number(v: &str, field: Field, bound: Bound, err: &mut impl FnMut(Field, &str)) -> Option<f64> {
    if !is_number(v) {
        err(field, "expected a number");
        return None;
    }
    // JSON number syntax is a subset of what `f64::from_str` accepts; a
    // magnitude beyond f64 parses to infinity.
    let Ok(x) = v.parse::<f64>() else {
        err(field, "expected a number");
        return None;
    };
    if !x.is_finite() {
        err(field, "expected a finite number");
        return None;
    }
    let ok = match bound {
        Bound::Any => true,
        Bound::NonNegative => x >= 0.0,
        Bound::UnitInterval => (0.0..=1.0).contains(&x),
    };
    if !ok {
        err(
            field,
            match field {
                Field::PowerKw => "Power must not be negative",
                Field::EnergyKwh => "Energy must not be negative",
                Field::Voltage => "Voltage must not be negative",
                Field::Current => "Current must not be negative",
                Field::Frequency => "Frequency must not be negative",
                Field::PowerFactor => "Power factor must be between 0 and 1",
                _ => "number out of range",
            },
        );
        return None;
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Reading;

    const OK: &str = r#"{"readingId":"r1","meterId":"MTR-00000001","region":"Mumbai-North","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234}"#;

    /// Renders an error as its message and one line per detail.
    fn render(e: &ValidationError) -> String {
        let mut s = e.message.clone();
        for d in &e.details {
            let at = d.index.map(|i| format!("[{i}] ")).unwrap_or_default();
            s.push_str(&format!("\n{at}{}: {}", d.field, d.message));
        }
        s
    }

    fn batch_err(body: &str) -> String {
        match validate_batch(body.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED) {
            Ok(v) => panic!("accepted {} readings of {body}", v.readings.len()),
            Err(e) => render(&e),
        }
    }

    fn one_err(body: &str) -> String {
        match validate_one(body.as_bytes(), TimeBounds::UNBOUNDED) {
            Ok(_) => panic!("accepted {body}"),
            Err(e) => render(&e),
        }
    }

    /// A valid reading with `fields` (`"key":value` pairs) replacing or
    /// extending the defaults; a key given as `-key` is removed.
    fn reading(fields: &[&str]) -> String {
        let mut v: Vec<(String, String)> = [
            ("readingId", r#""r1""#),
            ("meterId", r#""MTR-00000001""#),
            ("region", r#""Mumbai-North""#),
            ("timestamp", r#""2025-11-12T06:30:00.000Z""#),
            ("powerKw", "5.234"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for f in fields {
            if let Some(k) = f.strip_prefix('-') {
                v.retain(|(key, _)| key != k);
                continue;
            }
            let (k, val) = f.split_once(':').expect("key:value");
            let k = k.trim_matches('"').to_string();
            match v.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = val.to_string(),
                None => v.push((k, val.to_string())),
            }
        }
        let members: Vec<String> = v.iter().map(|(k, val)| format!("\"{k}\":{val}")).collect();
        format!("{{{}}}", members.join(","))
    }

    fn one_field_err(fields: &[&str]) -> String {
        one_err(&reading(fields))
    }

    fn published(r: &ValidReading<'_>) -> String {
        let mut out = Vec::new();
        write_published(r, "2025-11-12T06:30:01.234Z", &mut out);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn accepts_a_batch_and_reads_the_hot_fields() {
        let body = format!(
            "[{OK}, {}]",
            reading(&[
                r#""meterId":"MTR-00000002""#,
                r#""timestamp":"2025-11-12T12:00:00.5+05:30""#,
                r#""powerKw":0"#,
                r#""voltage":235.6"#,
                r#""current":0"#,
                r#""frequency":50.01"#,
                r#""powerFactor":1"#,
                r#""temperature":-12.5"#,
                r#""energyKwh":0.0435"#,
            ])
        );
        let v = validate_batch(body.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(v.readings.len(), 2);
        let (a, b) = (&v.readings[0], &v.readings[1]);
        assert_eq!(a.raw, OK);
        assert_eq!(a.meter_id, "MTR-00000001");
        assert!(matches!(a.meter_id, Cow::Borrowed(_)));
        assert_eq!(a.timestamp_ms, 1_762_929_000_000);
        assert_eq!(a.power_kw, 5.234);
        assert_eq!(b.meter_id, "MTR-00000002");
        assert_eq!(b.timestamp_ms, 1_762_929_000_500);
        assert_eq!(b.power_kw, 0.0);
    }

    #[test]
    fn every_field_is_found_by_its_name() {
        for f in FIELDS {
            assert_eq!(Field::from_key(f.name()), Some(f));
        }
        assert_eq!(Field::from_key("powerkw"), None);
    }

    /// What a validation gave, to compare two paths by.
    fn outcome(v: &Result<Validated<'_>, ValidationError>) -> String {
        match v {
            Ok(v) => format!("{:?}", v.readings),
            Err(e) => render(e),
        }
    }

    /// The scanned path takes well-formed bodies and gives exactly what
    /// serde_json's whole-body path gives; whatever it declines (or gets
    /// wrong inside an object) is left to that path, so every body gets the
    /// same answer either way.
    #[test]
    fn the_scanned_path_agrees_with_serde_json() {
        let r = |extra: &[&str]| reading(extra);
        let well_formed = [
            format!("[{OK}]"),
            format!(" [ {OK} ,\n{OK} ] \n"),
            format!("[{}]", r(&[r#""note":"a } ] { [ string""#])),
            format!("[{}]", r(&[r#""metadata":{"a":[1,{"b":"}"}],"c":{}}"#])),
            format!("[{}]", r(&[r#""powerKw":-1"#, r#""region":7"#])),
            format!("[{}, {OK}]", r(&["-timestamp"])),
            format!("[{}]", r(&[r#""meterId":"MTR-1","meterId":"MTR-2""#])),
            "[{}]".to_owned(),
            format!("[{OK},{OK},{OK}]"),
        ];
        // Escapes are left to serde_json.
        let declined = [
            format!("[{}]", r(&[r#""note":"a \"quoted\" } ] { [ string""#])),
            format!("[{}]", r(&[r#""note":"ends in a backslash \\""#])),
            format!("[{}]", r(&[r#""meterId":"M\u00e9""#])),
            format!("[{}]", r(&[r#""meter\u0049d":"MTR-9""#])),
        ];
        let malformed = [
            format!("[{OK},]"),
            format!("[{OK}"),
            format!("[{OK}] x"),
            format!("[{OK} {OK}]"),
            format!("[{OK},1]"),
            format!("[1,{OK}]"),
            "[]".to_owned(),
            "[ ]".to_owned(),
            r#"[{"a":1]}]"#.to_owned(),
            r#"[{"a":[1}]"#.to_owned(),
            "[{\"a\":\"\u{1}\"}]".to_owned(),
            r#"[{"a\q":1}]"#.to_owned(),
            r#"[{"a":"unterminated}]"#.to_owned(),
            r#"[{"a":1}}]"#.to_owned(),
            r#"[{"a":tru}]"#.to_owned(),
            r#"[{"a":1,}]"#.to_owned(),
            r#"[{"a" 1}]"#.to_owned(),
            r#"[{"a":"\"#.to_owned(),
        ];
        for (max, body) in well_formed
            .iter()
            .chain(&declined)
            .chain(&malformed)
            .map(|b| (MAX_BATCH, b))
            .chain([(2, &well_formed[8])])
        {
            let parsed = validate_parsed(body.as_bytes(), max, TimeBounds::UNBOUNDED);
            if let Some(scanned) = validate_scanned(body.as_bytes(), max, TimeBounds::UNBOUNDED) {
                assert_eq!(outcome(&scanned), outcome(&parsed), "{body}");
            }
            let batch = validate_batch(body.as_bytes(), max, TimeBounds::UNBOUNDED);
            assert_eq!(outcome(&batch), outcome(&parsed), "{body}");
        }
        for body in &well_formed {
            assert!(
                validate_scanned(body.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED).is_some(),
                "the scanned path declined {body}"
            );
        }
        for body in &declined {
            assert!(
                validate_scanned(body.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED).is_none(),
                "the scanned path took {body}"
            );
        }
        // Damaged bodies: every prefix, every byte changed to one that
        // matters to JSON.
        let body = format!("[{OK},{}]", r(&[r#""metadata":{"a":[1,null]}"#]));
        for damaged in crate::json_scan::damaged(&body) {
            let parsed = validate_parsed(damaged.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED);
            let batch = validate_batch(damaged.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED);
            if damaged.starts_with('[') {
                assert_eq!(outcome(&batch), outcome(&parsed), "{damaged}");
            }
        }
        // Over the batch limit: declined, for the whole-body path to count.
        assert!(validate_scanned(well_formed[8].as_bytes(), 2, TimeBounds::UNBOUNDED).is_none());
    }

    #[test]
    fn accepts_one_reading() {
        let body = format!(" \n{OK}\n ");
        let v = validate_one(body.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(v.readings.len(), 1);
        assert_eq!(v.readings[0].raw, OK);
    }

    #[test]
    fn unknown_fields_are_kept_verbatim() {
        let r = reading(&[
            r#""userId":"USR-00000001""#,
            r#""seq":1523"#,
            r#""status":"OK""#,
            r#""metadata":{"mode":"normal","baseLoad":4.5,"nested":[1,{"a":null}]}"#,
            r#""weird":1e400"#,
        ]);
        let v = validate_one(r.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(v.readings[0].raw, r);
    }

    #[test]
    fn body_shape_errors() {
        assert_eq!(
            batch_err(OK),
            "Request body must be a JSON array of readings (send a single reading to POST /telemetry)"
        );
        assert_eq!(
            batch_err(r#""hello""#),
            "Request body must be a JSON array of readings"
        );
        assert_eq!(
            batch_err("42"),
            "Request body must be a JSON array of readings"
        );
        assert_eq!(
            batch_err(" [ ] "),
            "Batch must contain at least one reading"
        );
        assert_eq!(
            one_err(&format!("[{OK}]")),
            "Request body must be a single reading object (send arrays to POST /telemetry/batch)"
        );
        assert_eq!(
            one_err("null"),
            "Request body must be a single reading object"
        );
    }

    #[test]
    fn invalid_json_reports_line_and_column() {
        assert_eq!(
            batch_err("[\n{\"readingId\": }]"),
            "Invalid JSON: expected value at line 2 column 15"
        );
        assert_eq!(
            batch_err(""),
            "Invalid JSON: EOF while parsing a value at line 1 column 0"
        );
        assert_eq!(
            batch_err("{oops"),
            "Invalid JSON: key must be a string at line 1 column 2"
        );
        assert_eq!(
            batch_err(&format!("[{OK}] x")),
            format!(
                "Invalid JSON: trailing characters at line 1 column {}",
                OK.len() + 4
            )
        );
        assert_eq!(
            batch_err(&format!("[{OK},]")),
            format!(
                "Invalid JSON: trailing comma at line 1 column {}",
                OK.len() + 3
            )
        );
        assert_eq!(
            one_err("{\"a\":1"),
            "Invalid JSON: EOF while parsing an object at line 1 column 6"
        );
        // Invalid UTF-8 inside a reading.
        let mut body = b"[{\"readingId\":\"".to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(b"\"}]");
        let e = validate_batch(&body, MAX_BATCH, TimeBounds::UNBOUNDED).unwrap_err();
        assert!(e.message.starts_with("Invalid JSON: "), "{}", e.message);
        assert!(e.details.is_empty());
    }

    #[test]
    fn batch_size_limits() {
        let three = format!("[{OK},{OK},{OK}]");
        assert_eq!(
            validate_batch(three.as_bytes(), 3, TimeBounds::UNBOUNDED)
                .expect("valid")
                .readings
                .len(),
            3
        );
        let e = validate_batch(three.as_bytes(), 2, TimeBounds::UNBOUNDED).unwrap_err();
        assert_eq!(render(&e), "Batch size cannot exceed 2 readings (got 3)");

        let many = format!("[{}]", vec![OK; MAX_BATCH + 1].join(","));
        assert_eq!(
            batch_err(&many),
            "Batch size cannot exceed 1000 readings (got 1001)"
        );
        let max = format!("[{}]", vec![OK; MAX_BATCH].join(","));
        assert_eq!(
            validate_batch(max.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED)
                .expect("valid")
                .readings
                .len(),
            1000
        );
        // Elements past the limit still have to be JSON.
        let bad = format!("[{OK},{OK},{OK}, nope]");
        assert!(
            validate_batch(bad.as_bytes(), 2, TimeBounds::UNBOUNDED)
                .unwrap_err()
                .message
                .starts_with("Invalid JSON")
        );
    }

    #[test]
    fn elements_must_be_objects() {
        assert_eq!(
            batch_err(&format!(r#"[{OK}, 1, "x", null, [], {OK}]"#)),
            "Validation failed: 4 errors in 4 readings\n\
             [1] : expected a JSON object\n\
             [2] : expected a JSON object\n\
             [3] : expected a JSON object\n\
             [4] : expected a JSON object"
        );
    }

    #[test]
    fn required_strings() {
        assert_eq!(
            one_err("{}"),
            "Validation failed: 5 errors\n\
             readingId: Reading ID is required\n\
             meterId: Meter ID is required\n\
             region: Region is required\n\
             timestamp: Timestamp is required\n\
             powerKw: Power is required"
        );
        assert_eq!(
            one_field_err(&[
                r#""readingId":"""#,
                r#""meterId":"""#,
                r#""region":"""#,
                r#""timestamp":"""#
            ]),
            "Validation failed: 4 errors\n\
             readingId: Reading ID is required\n\
             meterId: Meter ID is required\n\
             region: Region is required\n\
             timestamp: Timestamp is required"
        );
        assert_eq!(
            one_field_err(&[
                r#""readingId":7"#,
                r#""meterId":null"#,
                r#""region":["Mumbai-North"]"#,
                r#""timestamp":1762929000000"#,
            ]),
            "Validation failed: 4 errors\n\
             readingId: expected a string\n\
             meterId: expected a string\n\
             region: expected a string\n\
             timestamp: expected a string"
        );
        // Whitespace is a non-empty string, as in the seed's schema.
        validate_one(
            reading(&[r#""region":" ""#]).as_bytes(),
            TimeBounds::UNBOUNDED,
        )
        .expect("valid");
    }

    #[test]
    fn timestamps() {
        for ts in [
            "2025-11-12",
            "2025-11-12T06:30:00",
            "2025-11-12 06:30:00Z",
            "2025-02-30T06:30:00Z",
            "2025-11-12T06:30:00+0530",
            "yesterday",
        ] {
            assert_eq!(
                one_field_err(&[&format!(r#""timestamp":"{ts}""#)]),
                "Validation failed: 1 error\ntimestamp: Invalid timestamp format",
                "{ts}"
            );
        }
        for (ts, ms) in [
            ("2025-11-12T06:30:00Z", 1_762_929_000_000),
            ("2025-11-12t06:30:00.123456z", 1_762_929_000_123),
            ("2025-11-12T01:00:00-05:30", 1_762_929_000_000),
            (r"2025-11-12T06:30:00.000\u005a", 1_762_929_000_000),
        ] {
            let body = reading(&[&format!(r#""timestamp":"{ts}""#)]);
            let v = validate_one(body.as_bytes(), TimeBounds::UNBOUNDED).expect(ts);
            assert_eq!(v.readings[0].timestamp_ms, ms, "{ts}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(
            one_field_err(&[
                r#""powerKw":-0.001"#,
                r#""energyKwh":-1"#,
                r#""voltage":-230"#,
                r#""current":-1e-9"#,
                r#""frequency":-50"#,
                r#""powerFactor":1.01"#,
            ]),
            "Validation failed: 6 errors\n\
             powerKw: Power must not be negative\n\
             energyKwh: Energy must not be negative\n\
             voltage: Voltage must not be negative\n\
             current: Current must not be negative\n\
             frequency: Frequency must not be negative\n\
             powerFactor: Power factor must be between 0 and 1"
        );
        assert_eq!(
            one_field_err(&[
                r#""powerKw":"5.2""#,
                r#""energyKwh":true"#,
                r#""voltage":null"#,
                r#""current":{}"#,
                r#""frequency":[50]"#,
                r#""powerFactor":"1""#,
                r#""temperature":null"#,
            ]),
            "Validation failed: 7 errors\n\
             powerKw: expected a number\n\
             energyKwh: expected a number\n\
             voltage: expected a number\n\
             current: expected a number\n\
             frequency: expected a number\n\
             powerFactor: expected a number\n\
             temperature: expected a number"
        );
        assert_eq!(
            one_field_err(&[r#""powerKw":1e400"#, r#""temperature":-1e999"#]),
            "Validation failed: 2 errors\n\
             powerKw: expected a finite number\n\
             temperature: expected a finite number"
        );
        assert_eq!(
            one_field_err(&["-powerKw"]),
            "Validation failed: 1 error\npowerKw: Power is required"
        );
        for ok in [
            r#""powerKw":0"#,
            r#""powerKw":-0.0"#,
            r#""powerKw":1E+2"#,
            r#""powerFactor":0"#,
            r#""powerFactor":1.0"#,
            r#""temperature":-40"#,
            r#""energyKwh":0"#,
        ] {
            validate_one(reading(&[ok]).as_bytes(), TimeBounds::UNBOUNDED).expect(ok);
        }
        let body = reading(&[r#""powerKw":1.5e1"#]);
        let v = validate_one(body.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(v.readings[0].power_kw, 15.0);
    }

    #[test]
    fn duplicate_known_fields_are_refused() {
        let body = format!(
            "{}}}",
            &reading(&[r#""receivedAt":"a""#]).trim_end_matches('}')
        )
        .replace(
            "\"powerKw\":5.234",
            "\"powerKw\":5.234,\"powerKw\":6,\"x\":1,\"x\":2",
        )
        .replace(
            r#","receivedAt":"a""#,
            r#","receivedAt":"a","receivedAt":"b""#,
        );
        assert_eq!(
            one_err(&body),
            "Validation failed: 2 errors\npowerKw: duplicate field\nreceivedAt: duplicate field"
        );
        // A key spelled with an escape is the same key.
        let body = reading(&[r#""meter\u0049d":"MTR-2""#]);
        assert_eq!(
            one_err(&body),
            "Validation failed: 1 error\nmeterId: duplicate field"
        );
    }

    #[test]
    fn collects_errors_of_every_reading() {
        let body = format!(
            "[{OK},{},{OK},{}]",
            reading(&[r#""powerKw":-1"#, r#""region":"""#]),
            reading(&["-meterId", r#""timestamp":"soon""#]),
        );
        assert_eq!(
            batch_err(&body),
            "Validation failed: 4 errors in 2 readings\n\
             [1] region: Region is required\n\
             [1] powerKw: Power must not be negative\n\
             [3] meterId: Meter ID is required\n\
             [3] timestamp: Invalid timestamp format"
        );
    }

    #[test]
    fn caps_the_details() {
        let bad = reading(&[r#""powerKw":-1"#, r#""voltage":-1"#]);
        let body = format!("[{}]", vec![bad.as_str(); 60].join(","));
        let e = validate_batch(body.as_bytes(), MAX_BATCH, TimeBounds::UNBOUNDED).unwrap_err();
        assert_eq!(e.details.len(), MAX_DETAILS);
        assert_eq!(
            e.message,
            "Validation failed: 120 errors in 60 readings (first 100 listed, 20 more omitted)"
        );
        assert_eq!(
            e.details[99],
            FieldError {
                index: Some(49),
                field: "voltage".into(),
                message: "Voltage must not be negative".into()
            }
        );
    }

    #[test]
    fn errors_serialize_for_the_api() {
        let e = validate_batch(
            format!("[{}]", reading(&[r#""powerKw":-1"#])).as_bytes(),
            1000,
            TimeBounds::UNBOUNDED,
        )
        .unwrap_err();
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"message":"Validation failed: 1 error in 1 reading","details":[{"index":0,"field":"powerKw","message":"Power must not be negative"}]}"#
        );
        let e = validate_one(
            reading(&[r#""powerKw":-1"#]).as_bytes(),
            TimeBounds::UNBOUNDED,
        )
        .unwrap_err();
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"message":"Validation failed: 1 error","details":[{"field":"powerKw","message":"Power must not be negative"}]}"#
        );
        assert_eq!(e.to_string(), "Validation failed: 1 error");
    }

    #[test]
    fn escaped_strings() {
        let body = reading(&[
            r#""meterId":"MTR-\u0030\u00301 \"quoted\" \\ é""#,
            r#""region":"Pune\nWest""#,
        ]);
        let v = validate_one(body.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
        let r = &v.readings[0];
        assert_eq!(r.meter_id, "MTR-001 \"quoted\" \\ é");
        assert!(matches!(r.meter_id, Cow::Owned(_)));
        // The raw object is untouched; the bus consumer decodes the same value.
        let p = published(r);
        let back: Reading = serde_json::from_str(&p).expect("reading");
        assert_eq!(back.meter_id, r.meter_id);
        assert_eq!(back.region, "Pune\nWest");
        assert_eq!(
            one_field_err(&[r#""meterId":"\ud800""#]),
            "Validation failed: 1 error\nmeterId: invalid string"
        );
    }

    #[test]
    fn published_form() {
        let check = |fields: &[&str]| {
            let body = reading(fields);
            let v = validate_one(body.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
            let p = published(&v.readings[0]);
            let back: Reading = serde_json::from_str(&p).unwrap_or_else(|e| panic!("{e}: {p}"));
            assert_eq!(
                back.timestamp,
                crate::time::format_rfc3339_ms(v.readings[0].timestamp_ms)
            );
            let value: serde_json::Value = serde_json::from_str(&p).expect("json");
            assert_eq!(value["receivedAt"], "2025-11-12T06:30:01.234Z", "{p}");
            p
        };
        assert_eq!(
            check(&[]),
            r#"{"readingId":"r1","meterId":"MTR-00000001","region":"Mumbai-North","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"receivedAt":"2025-11-12T06:30:01.234Z"}"#
        );
        assert_eq!(
            check(&[r#""timestamp":"2025-11-12T12:00:00+05:30""#, r#""seq":1"#]),
            r#"{"readingId":"r1","meterId":"MTR-00000001","region":"Mumbai-North","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"seq":1,"receivedAt":"2025-11-12T06:30:01.234Z"}"#
        );
        // An incoming receivedAt is replaced where it stands, before or after
        // the timestamp, whatever its type.
        assert_eq!(
            check(&[
                "-readingId",
                r#""receivedAt":{"x":[1]}"#,
                r#""readingId":"r1""#
            ]),
            r#"{"meterId":"MTR-00000001","region":"Mumbai-North","timestamp":"2025-11-12T06:30:00.000Z","powerKw":5.234,"receivedAt":"2025-11-12T06:30:01.234Z","readingId":"r1"}"#
        );
        let early = r#"{"receivedAt":"1999-01-01T00:00:00Z","readingId":"r1","meterId":"m","region":"r","timestamp":"2025-11-12t06:30:00.1z","powerKw":1}"#;
        let v = validate_one(early.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(
            published(&v.readings[0]),
            r#"{"receivedAt":"2025-11-12T06:30:01.234Z","readingId":"r1","meterId":"m","region":"r","timestamp":"2025-11-12T06:30:00.100Z","powerKw":1}"#
        );
        // Pretty-printed input keeps its layout.
        let pretty = "{\n  \"readingId\": \"r1\",\n  \"meterId\": \"m\",\n  \"region\": \"r\",\n  \"timestamp\" :\t\"2025-11-12T06:30:00Z\" ,\n  \"powerKw\": 1\n}";
        let body = format!("[ {pretty} ]");
        let v = validate_batch(body.as_bytes(), 10, TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(
            published(&v.readings[0]),
            "{\n  \"readingId\": \"r1\",\n  \"meterId\": \"m\",\n  \"region\": \"r\",\n  \"timestamp\" :\t\"2025-11-12T06:30:00.000Z\" ,\n  \"powerKw\": 1\n,\"receivedAt\":\"2025-11-12T06:30:01.234Z\"}"
        );
        // A reading with a canonical timestamp and no receivedAt grows by
        // what ingest sizes its buffer for.
        let v = validate_one(OK.as_bytes(), TimeBounds::UNBOUNDED).expect("valid");
        assert_eq!(
            published(&v.readings[0]).len(),
            OK.len() + RECEIVED_AT_BYTES
        );
        // The output buffer is appended to, not replaced.
        let mut out = b"x".to_vec();
        write_published(&v.readings[0], "2025-11-12T06:30:01.234Z", &mut out);
        assert!(out.starts_with(b"x{"));
    }

    /// 2025-11-12T06:30:00Z, the server clock of the bound tests.
    const NOW_MS: i64 = 1_762_929_000_000;

    fn bounded(ahead_s: u64, age_s: u64) -> TimeBounds {
        TimeBounds::from_secs(NOW_MS, ahead_s, age_s)
    }

    fn at(ms: i64) -> String {
        reading(&[&format!(
            r#""timestamp":"{}""#,
            crate::time::format_rfc3339_ms(ms)
        )])
    }

    fn bounded_err(body: &str, time: TimeBounds) -> String {
        match validate_one(body.as_bytes(), time) {
            Ok(_) => panic!("accepted {body}"),
            Err(e) => render(&e),
        }
    }

    #[test]
    fn the_reading_of_the_test_helper_is_at_now() {
        assert_eq!(
            crate::time::parse_rfc3339_ms("2025-11-12T06:30:00.000Z"),
            Some(NOW_MS)
        );
    }

    #[test]
    fn timestamps_ahead_of_the_clock_are_refused() {
        let time = bounded(300, 604_800);
        assert_eq!(
            bounded_err(&reading(&[r#""timestamp":"2099-01-01T00:00:00Z""#]), time),
            "Validation failed: 1 error\ntimestamp: Timestamp 2099-01-01T00:00:00.000Z is \
             26712 days ahead of the server clock; at most 300 s ahead is accepted \
             (ingest.max_clock_skew_s)"
        );
        assert_eq!(
            bounded_err(&at(NOW_MS + 300_001), time),
            "Validation failed: 1 error\ntimestamp: Timestamp 2025-11-12T06:35:00.001Z is \
             300.001 s ahead of the server clock; at most 300 s ahead is accepted \
             (ingest.max_clock_skew_s)"
        );
        assert!(
            bounded_err(&at(NOW_MS + 7_200_000), time).contains("is 7200 s ahead"),
            "exact seconds below two days"
        );
    }

    #[test]
    fn timestamps_too_old_are_refused() {
        let time = bounded(300, 604_800);
        assert_eq!(
            bounded_err(
                &reading(&[r#""timestamp":"1971-01-01T00:00:00+05:30""#]),
                time
            ),
            "Validation failed: 1 error\ntimestamp: Timestamp 1970-12-31T18:30:00.000Z is \
             20039 days older than the server clock; at most 7 days old is accepted \
             (ingest.max_reading_age_s)"
        );
        assert!(
            bounded_err(&at(NOW_MS - 604_801_000), time).contains(
                "is 604801 s older than the server clock; at most 7 days old is accepted"
            )
        );
        assert!(bounded_err(&at(NOW_MS - 8 * 86_400_000), time).contains("is 8 days older"),);
        assert!(
            bounded_err(&at(NOW_MS - 5_400_000), bounded(300, 3_600))
                .contains("at most 1 h old is accepted")
        );
    }

    #[test]
    fn timestamps_just_inside_the_bounds_are_accepted() {
        let time = bounded(300, 604_800);
        for ms in [NOW_MS, NOW_MS + 300_000, NOW_MS - 604_800_000] {
            let body = at(ms);
            let v = validate_one(body.as_bytes(), time).expect(&body);
            assert_eq!(v.readings[0].timestamp_ms, ms);
        }
    }

    #[test]
    fn zero_disables_a_bound() {
        for (time, ms) in [
            (bounded(0, 604_800), NOW_MS + 100 * 365 * 86_400_000),
            (bounded(300, 0), 0),
            (bounded(0, 0), -86_400_000),
        ] {
            let body = at(ms);
            validate_one(body.as_bytes(), time).expect(&body);
        }
        assert_eq!(
            bounded(0, 0),
            TimeBounds {
                now_ms: NOW_MS,
                ..TimeBounds::UNBOUNDED
            }
        );
    }

    #[test]
    fn a_bad_clock_fails_the_whole_batch_with_its_index() {
        let time = bounded(300, 604_800);
        let body = format!(
            "[{},{},{}]",
            at(NOW_MS - 10_000),
            reading(&[r#""timestamp":"2099-01-01T00:00:00Z""#, r#""powerKw":-1"#]),
            at(NOW_MS)
        );
        let e = validate_batch(body.as_bytes(), MAX_BATCH, time).unwrap_err();
        let fields: Vec<(Option<usize>, &str)> = e
            .details
            .iter()
            .map(|d| (d.index, d.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [(Some(1), "timestamp"), (Some(1), "powerKw")],
            "{}",
            render(&e)
        );
        assert!(e.details[0].message.contains("ahead"), "{}", render(&e));
    }
}
