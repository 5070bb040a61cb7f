//! Ingest: `POST /telemetry/batch` and `POST /telemetry`.
//!
//! Owns the request path from body bytes to records on the
//! `telemetry-readings` topic: validate the whole request (nothing of an
//! invalid request is published; event time must be within the
//! `[ingest]` clock bounds around the server clock, read here once per
//! request), drop duplicates by
//! `reading:{meterId}:{timestamp}` (SET NX EX semantics), add `receivedAt`,
//! and answer 2xx only once the bus holds every accepted reading. When the
//! bus refuses (backpressure) the dedupe marks are taken back and the client
//! gets 503 with `Retry-After`, so a retry is not mistaken for duplicates.
//!
//! Backpressure slows clients down before it refuses them, and is even, not
//! accept-then-wall. While the consumers of `telemetry-readings` have
//! committed all but 90 % of the bus's lag bound every request is taken;
//! past that, a request is held (before its body is parsed) until they have
//! committed enough, for at most `ingest.max_wait_ms`, as a Kafka producer
//! blocks on a full buffer. So a client sending faster than the stages
//! drain gets its answers later, not 503s, and no work is spent on bodies
//! that are then refused. A request still held at the end of its wait is
//! refused at random with a chance that grows with the backlog past half
//! the bound (all of them at the bound; with `max_wait_ms = 0` this
//! shedding is all there is), so the backlog settles where intake equals
//! what the stages drain and every client sees the same few 503s. A 503's
//! `Retry-After` is the backlog over the recent drain rate (at least
//! `ingest.retry_after_s`, at most a minute).
//!
//! Dedupe marks are taken in two phases ([`Dedupe::claim`], then confirm or
//! release), so a mark never outlives a publish that did not happen: a
//! retry that meets a key another request still holds gets 503; one that
//! meets a hold whose process died (`dedupe.hold_s` ran out) looks at what
//! the bus received since that hold began, and publishes only the readings
//! that are not there. A request runs to its end even if its client goes
//! away, so a hold is always confirmed or released while the process lives.
//!
//! Must not: aggregate, call plugins, or touch the store.

pub mod validate;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::api::ErrorBody;
use crate::bus::{Bus, BusError, Record, Topic};
use crate::dedupe::{Claim, Dedupe, KeyBatch};
use crate::pipeline::Metrics;
use validate::{TimeBounds, Validated, ValidationError};

/// What the ingest handlers share.
#[derive(Clone)]
pub struct IngestState {
    pub bus: Arc<dyn Bus>,
    pub dedupe: Arc<dyn Dedupe>,
    pub metrics: Arc<Metrics>,
    pub max_batch: usize,
    pub max_body_bytes: usize,
    pub reading_ttl: Duration,
    /// `dedupe.hold_s`: how long a request holds the keys it publishes.
    pub hold: Duration,
    pub retry_after_s: u32,
    /// `[ingest] max_wait_ms`: how long a request may be held for room on
    /// the bus before it is refused (zero: not held).
    pub max_wait: Duration,
    /// `[ingest] max_clock_skew_s`: how far ahead of the server clock event
    /// time may be, seconds; 0 = no bound.
    pub max_clock_skew_s: u64,
    /// `[ingest] max_reading_age_s`: how far behind the server clock event
    /// time may be, seconds; 0 = no bound.
    pub max_reading_age_s: u64,
    /// Early load shedding and the drain rate behind `Retry-After`.
    pub shed: Arc<Shedding>,
}

/// The share of the lag bound past which ingest starts refusing requests.
const SHED_FROM: f64 = 0.5;
/// The share of the lag bound up to which a request is taken when ingest
/// holds (`ingest.max_wait_ms` > 0) rather than sheds: the bound counts
/// records not yet *committed*, and the stream stage commits only with its
/// checkpoints, so at half the bound its input may be drained already;
/// holding there left the stages idle between commits (measured: a fifth
/// of a core unused, 4 % fewer readings/s than shedding).
const HOLD_FROM: f64 = 0.9;
/// The longest `Retry-After` ingest names.
const MAX_RETRY_AFTER_S: u64 = 60;

/// Ingest's load shedding: whether to take a request given the bus's
/// backlog, and how long a refused client should wait.
#[derive(Debug)]
pub struct Shedding {
    /// xorshift state for the early refusals.
    rng: std::sync::atomic::AtomicU64,
    drain: parking_lot::Mutex<DrainRate>,
}

/// Readings/s the consumers took off the bus lately (accepted minus
/// waiting, sampled at most every [`DRAIN_SAMPLE`]).
#[derive(Debug)]
struct DrainRate {
    at: std::time::Instant,
    consumed: u64,
    per_s: f64,
}

const DRAIN_SAMPLE: Duration = Duration::from_millis(250);

impl Default for Shedding {
    fn default() -> Self {
        Shedding {
            rng: std::sync::atomic::AtomicU64::new(uuid::Uuid::new_v4().as_u64_pair().0 | 1),
            drain: parking_lot::Mutex::new(DrainRate {
                at: std::time::Instant::now(),
                consumed: 0,
                per_s: 0.0,
            }),
        }
    }
}

impl Shedding {
    /// Whether a request that may add `room` records is taken without
    /// waiting: no bound, or the backlog stays at or below `up_to` of it
    /// with the request.
    fn has_room(backlog: Option<crate::bus::Backlog>, room: usize, up_to: f64) -> bool {
        backlog.is_none_or(|b| b.fill + room as f64 / b.max_lag as f64 <= up_to)
    }

    /// `None`: take the request; `Some(s)`: refuse it with `Retry-After: s`.
    /// `room`: the records the request may add; `accepted`: readings this
    /// process has put on the bus so far.
    fn refuse(
        &self,
        backlog: Option<crate::bus::Backlog>,
        room: usize,
        accepted: u64,
        min_retry_s: u32,
    ) -> Option<u32> {
        let b = backlog?;
        let per_s = self.drain_rate(accepted.saturating_sub(b.waiting));
        let fill = b.fill + room as f64 / b.max_lag as f64;
        let refuse = if fill > 1.0 {
            true
        } else if fill > SHED_FROM {
            let p = (fill - SHED_FROM) / (1.0 - SHED_FROM);
            self.uniform() < p
        } else {
            false
        };
        if !refuse {
            return None;
        }
        let min = u64::from(min_retry_s.max(1));
        let wait = if per_s >= 1.0 {
            (b.waiting as f64 / per_s).ceil() as u64
        } else {
            min
        };
        Some(wait.clamp(min, MAX_RETRY_AFTER_S.max(min)) as u32)
    }

    /// The drain rate, updated from `consumed` (a running total).
    fn drain_rate(&self, consumed: u64) -> f64 {
        let mut d = self.drain.lock();
        let dt = d.at.elapsed();
        if dt >= DRAIN_SAMPLE {
            let now = consumed.saturating_sub(d.consumed) as f64 / dt.as_secs_f64();
            d.per_s = if d.per_s == 0.0 {
                now
            } else {
                0.5 * d.per_s + 0.5 * now
            };
            d.at = std::time::Instant::now();
            d.consumed = consumed;
        }
        d.per_s
    }

    /// A number in [0, 1) (xorshift64*; quality is not the point).
    fn uniform(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl IngestState {
    /// The event-time bounds of a request arriving now.
    fn time_bounds(&self) -> TimeBounds {
        TimeBounds::from_secs(
            crate::time::now_ms(),
            self.max_clock_skew_s,
            self.max_reading_age_s,
        )
    }
}

/// The answer to a request whose readings are kept.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct IngestAnswer {
    /// New readings, now durably on the bus.
    pub accepted: usize,
    /// Readings already seen (dropped).
    pub duplicates: usize,
}

/// `POST /telemetry/batch`: a JSON array of 1..=max_batch readings.
#[utoipa::path(post, path = "/telemetry/batch", tag = "telemetry",
    request_body = Vec<crate::api::openapi::ReadingIn>,
    responses(
        (status = 200, description = "Kept: every new reading is durably on the bus", body = IngestAnswer),
        (status = 400, description = "Invalid: nothing kept; details per index and field", body = crate::api::ErrorBody),
        (status = 413, description = "Body over ingest.max_body_bytes"),
        (status = 503, description = "The pipeline is behind (Retry-After)", body = crate::api::ErrorBody)))]
pub async fn post_batch(
    State(s): State<IngestState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_rejected(&s, e),
    };
    // Behind: hold the request until the stages catch up, or refuse it,
    // before parsing a body that could not be published, so the stages
    // behind get the CPU to catch up.
    if let Some(retry) = admit(&s, body.len() / MIN_READING_BYTES).await {
        return saturated(&s, retry);
    }
    run_to_end(s, move |s| async move {
        let validated = validate::validate_batch(&body, s.max_batch, s.time_bounds());
        accept(&s, validated).await
    })
    .await
}

/// Runs a request's work in its own task, so that a client going away
/// mid-publish does not cancel it between a dedupe claim and its confirm
/// or release.
async fn run_to_end<F, Fut>(s: IngestState, work: F) -> Response
where
    F: FnOnce(IngestState) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    let metrics = s.metrics.clone();
    match tokio::spawn(async move { work(s).await }).await {
        Ok(r) => r,
        Err(e) => {
            metrics.rejected_requests.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "ingest request task failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ErrorBody::new(
                    "internal",
                    "the request failed; retry it",
                    None,
                )),
            )
                .into_response()
        }
    }
}

/// `POST /telemetry`: one reading object.
#[utoipa::path(post, path = "/telemetry", tag = "telemetry",
    request_body = crate::api::openapi::ReadingIn,
    responses(
        (status = 200, description = "Kept", body = IngestAnswer),
        (status = 400, description = "Invalid: nothing kept", body = crate::api::ErrorBody),
        (status = 503, description = "The pipeline is behind (Retry-After)", body = crate::api::ErrorBody)))]
pub async fn post_one(
    State(s): State<IngestState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_rejected(&s, e),
    };
    if let Some(retry) = admit(&s, 1).await {
        return saturated(&s, retry);
    }
    run_to_end(s, move |s| async move {
        let validated = validate::validate_one(&body, s.time_bounds());
        accept(&s, validated).await
    })
    .await
}

fn body_rejected(s: &IngestState, e: axum::extract::rejection::BytesRejection) -> Response {
    s.metrics.rejected_requests.fetch_add(1, Ordering::Relaxed);
    if body_timed_out(&e) {
        // The client stalled inside its body (`http.body_read_timeout_s`);
        // hyper closes the connection after this answer, as the rest of the
        // body is never read.
        return (
            StatusCode::REQUEST_TIMEOUT,
            Json(ErrorBody::new(
                "request_timeout",
                "the request body stalled (http.body_read_timeout_s)",
                Some(json!([])),
            )),
        )
            .into_response();
    }
    let status = e.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "Request body exceeds the limit of {} bytes",
            s.max_body_bytes
        )
    } else {
        e.body_text()
    };
    (
        status,
        Json(ErrorBody::new("bad_request", message, Some(json!([])))),
    )
        .into_response()
}

/// Whether reading the body failed on the body read timeout (tower-http's
/// `TimeoutError`, somewhere down the rejection's source chain).
fn body_timed_out(e: &axum::extract::rejection::BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn invalid(s: &IngestState, e: ValidationError) -> Response {
    s.metrics.rejected_requests.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::BAD_REQUEST,
        Json(ErrorBody::new(
            "validation_failed",
            e.message,
            Some(json!(e.details)),
        )),
    )
        .into_response()
}

/// The fewest bytes one reading takes in a request body (its required
/// fields): a body's length over this bounds how many readings it holds.
const MIN_READING_BYTES: usize = 80;

/// How often a held request looks at the backlog again.
const HOLD_POLL: Duration = Duration::from_millis(2);

/// Whether to take a request that may add up to `room` readings (more than
/// `max_batch` is capped): `None` to take it, at once or once the stages
/// have made room within `ingest.max_wait_ms`; else `Some(Retry-After)`.
async fn admit(s: &IngestState, room: usize) -> Option<u32> {
    let room = room.clamp(1, s.max_batch);
    let backlog = || s.bus.backlog(Topic::TelemetryReadings);
    let up_to = if s.max_wait.is_zero() {
        SHED_FROM
    } else {
        HOLD_FROM
    };
    if Shedding::has_room(backlog(), room, up_to) {
        return None;
    }
    if !s.max_wait.is_zero() {
        let held = std::time::Instant::now();
        s.metrics.held_requests.fetch_add(1, Ordering::Relaxed);
        let taken = loop {
            let left = s.max_wait.saturating_sub(held.elapsed());
            if left.is_zero() {
                break false;
            }
            tokio::time::sleep(HOLD_POLL.min(left)).await;
            if Shedding::has_room(backlog(), room, up_to) {
                break true;
            }
        };
        s.metrics
            .held_ms
            .fetch_add(held.elapsed().as_millis() as u64, Ordering::Relaxed);
        if taken {
            return None;
        }
    }
    s.shed.refuse(
        backlog(),
        room,
        s.metrics.accepted.load(Ordering::Relaxed),
        s.retry_after_s,
    )
}

fn saturated(s: &IngestState, retry_after_s: u32) -> Response {
    unavailable_after(
        s,
        "the pipeline is saturated; retry after the indicated delay".to_owned(),
        retry_after_s,
    )
}

fn unavailable(s: &IngestState, message: String) -> Response {
    unavailable_after(s, message, s.retry_after_s)
}

fn unavailable_after(s: &IngestState, message: String, retry_after_s: u32) -> Response {
    s.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ErrorBody::new("unavailable", message, None)),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}

async fn accept(s: &IngestState, validated: Result<Validated<'_>, ValidationError>) -> Response {
    let readings = match validated {
        Ok(v) => v.readings,
        Err(e) => return invalid(s, e),
    };

    // Sized for the keys whole: a buffer grown by doubling copies (and on
    // fresh pages, faults) several times over.
    let key_bytes: usize = readings.iter().map(|r| key_len(&r.meter_id)).sum();
    let mut keys =
        KeyBatch::with_capacity(readings.len(), key_bytes.div_ceil(readings.len().max(1)));
    for r in &readings {
        keys.push_with(|k| write_key(k, &r.meter_id, r.timestamp_ms));
    }
    let token = uuid::Uuid::new_v4().as_u64_pair().0;
    let claims = match s.dedupe.claim(&keys, s.reading_ttl, s.hold, token).await {
        Ok(c) => c,
        Err(e) => return unavailable(s, format!("dedupe store unavailable: {e}")),
    };
    // The keys this request now holds, and what it publishes of them.
    let mut held = Vec::new();
    let mut orphaned = Vec::new();
    let mut in_flight = 0;
    for (i, c) in claims.iter().enumerate() {
        match *c {
            Claim::New => held.push(i),
            Claim::Orphaned { since_ms } => {
                held.push(i);
                orphaned.push((i, since_ms));
            }
            Claim::InFlight => in_flight += 1,
            Claim::Duplicate => {}
        }
    }
    if in_flight > 0 {
        release(s, &keys, &held, token).await;
        return unavailable(
            s,
            format!(
                "{in_flight} of these readings are being ingested by another request; \
                 retry after the indicated delay"
            ),
        );
    }
    let mut fresh = vec![false; readings.len()];
    for &i in &held {
        fresh[i] = true;
    }
    if let Some(since) = orphaned.iter().map(|(_, since)| *since).min() {
        // An earlier attempt held these keys and did not finish: whatever of
        // it reached the bus is kept already.
        // Less a margin: the hold's clock (Redis's) and the record times
        // (the first attempt's process) may differ a little.
        match on_bus_since(&*s.bus, since.saturating_sub(ORPHAN_MARGIN_MS)).await {
            Ok(published) => {
                for &(i, _) in &orphaned {
                    if published.contains(keys.get(i)) {
                        fresh[i] = false;
                    }
                }
                tracing::info!(
                    orphaned = orphaned.len(),
                    already_published = orphaned.iter().filter(|(i, _)| !fresh[*i]).count(),
                    "ingest: took over readings an earlier attempt held and did not finish"
                );
            }
            Err(e) => {
                release(s, &keys, &held, token).await;
                return unavailable(s, format!("cannot read the bus back: {e}"));
            }
        }
    }

    let now = crate::time::now_ms();
    let received_at = crate::time::format_rfc3339_ms(now);
    let accepted: Vec<usize> = (0..readings.len()).filter(|&i| fresh[i]).collect();
    let duplicates = readings.len() - accepted.len();

    // All accepted readings go into one buffer; records are slices of it.
    // Both are sized for what goes in, as the keys are.
    let value_bytes: usize = accepted
        .iter()
        .map(|&i| readings[i].raw.len() + validate::RECEIVED_AT_BYTES)
        .sum();
    let mut values = Vec::with_capacity(value_bytes);
    let mut key_buf =
        Vec::with_capacity(accepted.iter().map(|&i| readings[i].meter_id.len()).sum());
    let mut spans = Vec::with_capacity(accepted.len());
    for &i in &accepted {
        let r = &readings[i];
        let (v0, k0) = (values.len(), key_buf.len());
        validate::write_published(r, &received_at, &mut values);
        key_buf.extend_from_slice(r.meter_id.as_bytes());
        spans.push((k0..key_buf.len(), v0..values.len()));
    }
    let values = Bytes::from(values);
    let key_buf = Bytes::from(key_buf);
    let records: Vec<Record> = spans
        .into_iter()
        .map(|(k, v)| Record::new(key_buf.slice(k), values.slice(v), now))
        .collect();

    if !records.is_empty() {
        if let Err(e) = s.bus.produce(Topic::TelemetryReadings, records).await {
            // Nothing was published: forget the marks so a retry counts.
            release(s, &keys, &held, token).await;
            let message = match e {
                BusError::Full { .. } => {
                    "the pipeline is saturated; retry after the indicated delay".to_owned()
                }
                other => format!("the bus refused the readings: {other}"),
            };
            return unavailable(s, message);
        }
    }
    // The readings are on the bus; the client has not been told.
    crate::crash::point("ingest.after_publish");
    if let Err(e) = s.dedupe.confirm(&keys, &held, s.reading_ttl).await {
        // Published all the same: a retry meets the hold once it runs out
        // and finds the readings on the bus.
        tracing::warn!(error = %e, "could not confirm dedupe marks after publishing");
    }
    s.metrics
        .accepted
        .fetch_add(accepted.len() as u64, Ordering::Relaxed);
    s.metrics
        .duplicates
        .fetch_add(duplicates as u64, Ordering::Relaxed);
    (
        StatusCode::OK,
        Json(IngestAnswer {
            accepted: accepted.len(),
            duplicates,
        }),
    )
        .into_response()
}

/// How far before a dead hold's start ingest looks on the bus for what
/// that attempt published.
const ORPHAN_MARGIN_MS: i64 = 60_000;

/// The length of [`write_key`]'s key for `meter_id` (years 0 to 9999).
fn key_len(meter_id: &str) -> usize {
    "reading:".len() + meter_id.len() + ":".len() + crate::time::RFC3339_MS_LEN
}

/// The dedupe key of a reading: `reading:{meterId}:{timestamp}`.
pub(crate) fn write_key(k: &mut String, meter_id: &str, timestamp_ms: i64) {
    k.push_str("reading:");
    k.push_str(meter_id);
    k.push(':');
    crate::time::write_rfc3339_ms(k, timestamp_ms);
}

/// Takes back the holds of a request that publishes nothing.
async fn release(s: &IngestState, keys: &KeyBatch, held: &[usize], token: u64) {
    if let Err(e) = s.dedupe.release(keys, held, token).await {
        // They run out after dedupe.hold_s; a retry then looks on the bus.
        tracing::error!(error = %e, "could not take back dedupe holds");
    }
}

/// The dedupe keys of the readings the bus received at or after `since_ms`.
async fn on_bus_since(
    bus: &dyn Bus,
    since_ms: i64,
) -> Result<std::collections::HashSet<String>, BusError> {
    let records = bus
        .recent_records(Topic::TelemetryReadings, since_ms)
        .await?;
    let mut out = std::collections::HashSet::with_capacity(records.len());
    for r in &records {
        let Ok(reading) = serde_json::from_slice::<crate::reading::Reading<'_>>(&r.value) else {
            continue;
        };
        let Some(ts) = reading.event_time_ms() else {
            continue;
        };
        let mut k = String::new();
        write_key(&mut k, &reading.meter_id, ts);
        out.insert(k);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Backlog;

    fn backlog(fill: f64, waiting: u64) -> Option<Backlog> {
        Some(Backlog {
            fill,
            waiting,
            max_lag: 1000,
        })
    }

    #[test]
    fn a_key_is_as_long_as_its_buffer_is_sized_for() {
        let mut k = String::new();
        write_key(&mut k, "MTR-00000001", 1_762_929_000_123);
        assert_eq!(k, "reading:MTR-00000001:2025-11-12T06:30:00.123Z");
        assert_eq!(k.len(), key_len("MTR-00000001"));
    }

    #[test]
    fn below_half_the_bound_every_request_is_taken() {
        let shed = Shedding::default();
        for i in 0..1000 {
            assert_eq!(shed.refuse(backlog(0.49, 490), 0, i, 1), None);
        }
        assert_eq!(shed.refuse(None, 1000, 0, 1), None, "no bound, no shedding");
    }

    #[test]
    fn past_half_a_growing_share_is_refused_and_all_at_the_bound() {
        let shed = Shedding::default();
        let refused = |fill: f64| {
            (0..10_000)
                .filter(|_| shed.refuse(backlog(fill, 0), 0, 0, 1).is_some())
                .count()
        };
        let (quarter, half, most) = (refused(0.625), refused(0.75), refused(0.95));
        assert!((2_000..3_000).contains(&quarter), "{quarter}");
        assert!((4_500..5_500).contains(&half), "{half}");
        assert!((8_500..9_500).contains(&most), "{most}");
        assert_eq!(refused(1.0001), 10_000);
        // A request that would not fit is refused however full the rest is.
        assert!(shed.refuse(backlog(0.2, 0), 900, 0, 1).is_some());
    }

    /// Ingest over a one-partition memory bus whose lag bound is 1,000
    /// records, holding requests up to `max_wait`.
    fn ingest(max_wait: Duration) -> (IngestState, crate::bus::MemoryBus) {
        let bus = crate::bus::MemoryBus::new(1, 1000);
        let state = IngestState {
            bus: Arc::new(bus.clone()),
            dedupe: Arc::new(crate::dedupe::MemoryDedupe::new()),
            metrics: Arc::new(Metrics::default()),
            max_batch: 1000,
            max_body_bytes: 1 << 20,
            reading_ttl: Duration::from_secs(60),
            hold: Duration::from_secs(30),
            retry_after_s: 1,
            max_wait,
            max_clock_skew_s: 0,
            max_reading_age_s: 0,
            shed: Default::default(),
        };
        (state, bus)
    }

    /// Ingest as [`ingest`] does, with a stage in group `g` that has not
    /// committed the `n` records waiting on the bus.
    async fn behind(max_wait: Duration, n: usize) -> (IngestState, Box<dyn crate::bus::Consumer>) {
        let (s, bus) = ingest(max_wait);
        let stage = bus
            .subscribe("g", &[Topic::TelemetryReadings])
            .await
            .unwrap();
        let records = (0..n)
            .map(|i| crate::bus::Record::new(vec![1u8], (i as u32).to_be_bytes().to_vec(), 0))
            .collect();
        bus.produce(Topic::TelemetryReadings, records)
            .await
            .unwrap();
        (s, stage)
    }

    #[tokio::test]
    async fn near_the_bound_a_request_is_held_until_the_stages_drain() {
        let (s, mut stage) = behind(Duration::from_secs(600), 850).await;
        let held = tokio::spawn({
            let s = s.clone();
            async move { admit(&s, 100).await }
        });
        // The stages do not move: the request waits (its wait is far off).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!held.is_finished(), "taken with no room");
        assert_eq!(s.metrics.held_requests.load(Ordering::Relaxed), 1);
        // They drain: it is taken, not refused.
        let got = stage.poll(1000, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.len(), 850);
        stage.commit().await.unwrap();
        assert_eq!(held.await.unwrap(), None);
        assert_eq!(s.metrics.refused_busy.load(Ordering::Relaxed), 0);
        // With room, nothing waits.
        assert_eq!(admit(&s, 100).await, None);
        assert_eq!(s.metrics.held_requests.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_request_still_held_when_its_wait_ends_is_refused_at_the_bound() {
        let (s, _stage) = behind(Duration::from_millis(20), 950).await;
        assert_eq!(admit(&s, 100).await, Some(1));
        assert_eq!(s.metrics.held_requests.load(Ordering::Relaxed), 1);
        // Not held at all when holding is off.
        let (s, _stage) = behind(Duration::ZERO, 950).await;
        assert_eq!(admit(&s, 100).await, Some(1));
        assert_eq!(s.metrics.held_requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn retry_after_is_the_backlog_over_the_drain_rate() {
        let shed = Shedding::default();
        // No drain measured yet: the configured delay.
        assert_eq!(shed.refuse(backlog(1.5, 3000), 0, 0, 2), Some(2));
        // The rate is what the consumers took off the bus per second.
        shed.drain.lock().at -= Duration::from_secs(1);
        let per_s = shed.drain_rate(4000);
        assert!((3000.0..=4000.0).contains(&per_s), "{per_s}");
        let expect = |waiting: f64| ((waiting / per_s).ceil() as u32).max(1);
        assert_eq!(
            shed.refuse(backlog(1.5, 3000), 0, 7000, 1),
            Some(expect(3000.0))
        );
        assert_eq!(
            shed.refuse(backlog(1.5, 30_000), 0, 34_000, 1),
            Some(expect(30_000.0))
        );
        // Never less than configured, never more than a minute.
        assert_eq!(shed.refuse(backlog(1.5, 10), 0, 4010, 3), Some(3));
        assert_eq!(
            shed.refuse(backlog(1.5, 10_000_000), 0, 10_004_000, 1),
            Some(60)
        );
    }
}
