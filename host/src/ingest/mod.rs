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
    /// `[ingest] max_clock_skew_s`: how far ahead of the server clock event
    /// time may be, seconds; 0 = no bound.
    pub max_clock_skew_s: u64,
    /// `[ingest] max_reading_age_s`: how far behind the server clock event
    /// time may be, seconds; 0 = no bound.
    pub max_reading_age_s: u64,
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

/// `POST /telemetry/batch`: a JSON array of 1..=max_batch readings.
#[utoipa::path(post, path = "/telemetry/batch", tag = "telemetry",
    request_body = Vec<crate::api::openapi::ReadingIn>,
    responses(
        (status = 200, description = "Kept: every new reading is durably on the bus", body = crate::api::openapi::IngestAnswer),
        (status = 400, description = "Invalid: nothing kept; details per index and field", body = crate::api::openapi::ErrorBody),
        (status = 413, description = "Body over ingest.max_body_bytes"),
        (status = 503, description = "The pipeline is behind (Retry-After)", body = crate::api::openapi::ErrorBody)))]
pub async fn post_batch(
    State(s): State<IngestState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_rejected(&s, e),
    };
    // Saturated: refuse before parsing a body that could not be published,
    // so the stages behind get the CPU to catch up.
    if s.bus.saturated(Topic::TelemetryReadings, s.max_batch) {
        return saturated(&s);
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
                Json(json!({ "error": "internal", "message": "the request failed; retry it" })),
            )
                .into_response()
        }
    }
}

/// `POST /telemetry`: one reading object.
#[utoipa::path(post, path = "/telemetry", tag = "telemetry",
    request_body = crate::api::openapi::ReadingIn,
    responses(
        (status = 200, description = "Kept", body = crate::api::openapi::IngestAnswer),
        (status = 400, description = "Invalid: nothing kept", body = crate::api::openapi::ErrorBody),
        (status = 503, description = "The pipeline is behind (Retry-After)", body = crate::api::openapi::ErrorBody)))]
pub async fn post_one(
    State(s): State<IngestState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_rejected(&s, e),
    };
    if s.bus.saturated(Topic::TelemetryReadings, 1) {
        return saturated(&s);
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
            Json(json!({
                "error": "request_timeout",
                "message": "the request body stalled (http.body_read_timeout_s)",
                "details": []
            })),
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
        Json(json!({ "error": "bad_request", "message": message, "details": [] })),
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
        Json(json!({ "error": "validation_failed", "message": e.message, "details": e.details })),
    )
        .into_response()
}

fn saturated(s: &IngestState) -> Response {
    unavailable(
        s,
        "the pipeline is saturated; retry after the indicated delay".to_owned(),
    )
}

fn unavailable(s: &IngestState, message: String) -> Response {
    s.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": "unavailable", "message": message })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(s.retry_after_s));
    r
}

async fn accept(s: &IngestState, validated: Result<Validated<'_>, ValidationError>) -> Response {
    let readings = match validated {
        Ok(v) => v.readings,
        Err(e) => return invalid(s, e),
    };

    let mut keys = KeyBatch::default();
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
    let mut values = Vec::with_capacity(
        accepted.len() * (readings.first().map_or(0, |r| r.raw.get().len()) + 40),
    );
    let mut key_buf = Vec::with_capacity(accepted.len() * 16);
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
        Json(json!({ "accepted": accepted.len(), "duplicates": duplicates })),
    )
        .into_response()
}

/// How far before a dead hold's start ingest looks on the bus for what
/// that attempt published.
const ORPHAN_MARGIN_MS: i64 = 60_000;

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
