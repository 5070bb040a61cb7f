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
use crate::dedupe::{Dedupe, KeyBatch};
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
    let validated = validate::validate_batch(&body, s.max_batch, s.time_bounds());
    accept(&s, validated).await
}

/// `POST /telemetry`: one reading object.
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
    let validated = validate::validate_one(&body, s.time_bounds());
    accept(&s, validated).await
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
        keys.push_with(|k| {
            k.push_str("reading:");
            k.push_str(&r.meter_id);
            k.push(':');
            crate::time::write_rfc3339_ms(k, r.timestamp_ms);
        });
    }
    let fresh = match s.dedupe.check_and_mark(&keys, s.reading_ttl).await {
        Ok(f) => f,
        Err(e) => return unavailable(s, format!("dedupe store unavailable: {e}")),
    };

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
            if let Err(undo) = s.dedupe.unmark(&keys, &accepted).await {
                tracing::error!(%undo, "could not take back dedupe marks after a refused publish");
            }
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
