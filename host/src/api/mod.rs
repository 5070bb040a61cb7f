//! The HTTP API: the router with ingest's endpoints and the read API over the
//! store (alerts, tariffs, aggregates), plus `/healthz` (alive) and `/readyz`
//! (ready: dependencies and stages).
//!
//! Rows are returned as JSON with the seed's column names (snake_case).
//! Every bad query parameter or body gets a 400 with a JSON body naming the
//! field. Alert status changes are also published to `alert_status_updates`.
//!
//! Every route but `/healthz` shares one cap on requests in flight
//! (`http.max_in_flight_requests`; over it: 503 with `Retry-After`, without
//! waiting), and every request body has a read timeout
//! (`http.body_read_timeout_s`; ingest answers 408). The connection limits
//! are in [`serve`].
//!
//! Must not: compute aggregates or run rules.

pub mod admin;
mod events;
pub mod openapi;
pub mod serve;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::bus::{Bus, Topic};
use crate::config::HttpConfig;
use crate::ingest::{self, IngestState};
use crate::messages::KeyedMessage;
use crate::pipeline::{Metrics, status_update};
use crate::store::{AggregateQuery, AlertFilter, Store, Transition, WindowWidth};

/// What the read API needs.
#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub dedupe: Arc<dyn crate::dedupe::Dedupe>,
    pub metrics: Arc<Metrics>,
    pub live: Arc<crate::live::LiveFeed>,
    /// The rule plugins' slots (for their metrics); `None` without stages.
    pub plugins: Option<Arc<crate::plugins::Registry>>,
}

/// The whole HTTP surface of segs with the per-request limits of `limits`;
/// without `ingest` (a `process`-role process), no telemetry routes.
/// `retry_after_s` is the `Retry-After` of a request refused for the
/// in-flight cap.
pub fn router(
    ingest: Option<IngestState>,
    api: ApiState,
    limits: &HttpConfig,
    retry_after_s: u32,
) -> Router {
    let telemetry = match ingest {
        Some(ingest) => {
            let limit = ingest.max_body_bytes;
            Router::new()
                .route("/telemetry/batch", post(ingest::post_batch))
                .route("/telemetry", post(ingest::post_one))
                .layer(DefaultBodyLimit::max(limit))
                .with_state(ingest)
        }
        None => Router::new(),
    };
    // Outside the in-flight cap: health must answer under load, and event
    // streams are long-lived (they have their own cap).
    let health = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/events", get(events::events))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .with_state(api.clone());
    let read = Router::new()
        .route("/", get(dashboard))
        .route("/alerts", get(list_alerts))
        .route("/alerts/{id}/acknowledge", post(acknowledge))
        .route("/alerts/{id}/resolve", post(resolve))
        .route("/tariffs/current", get(current_tariffs))
        .route("/tariffs", get(tariff_history))
        .route("/aggregates/1m", get(aggregates_1m))
        .route("/aggregates/15m", get(aggregates_15m))
        .route("/aggregates/regional", get(aggregates_regional))
        .route("/invoices", get(list_invoices))
        .with_state(api);
    // One semaphore for every route (a plain `ConcurrencyLimitLayer` would
    // get one per route); load shedding answers at once instead of queueing.
    let in_flight = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(
            move |e: tower::BoxError| async move { overloaded(e, retry_after_s) },
        ))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(
            limits.max_in_flight_requests,
        ));
    telemetry
        .merge(read)
        .layer(in_flight)
        .merge(health)
        .fallback(not_found)
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(
            limits.body_read_timeout_s,
        )))
}

/// The answer to a request refused by the in-flight cap (load shedding).
fn overloaded(e: tower::BoxError, retry_after_s: u32) -> Response {
    let mut r = if e.is::<tower::load_shed::error::Overloaded>() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in progress (http.max_in_flight_requests); retry after the indicated delay"
                .into(),
            vec![],
        )
    } else {
        tracing::error!(error = %e, "HTTP: a request limit failed");
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
            vec![],
        )
    };
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint".into(),
        vec![],
    )
}

/// The body of every error answer: a short code, a message, and (for a
/// request that was refused for what it holds) per-field details.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    #[schema(value_type = String)]
    pub error: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub details: Option<Value>,
}

impl ErrorBody {
    pub fn new(error: &'static str, message: impl Into<String>, details: Option<Value>) -> Self {
        ErrorBody {
            error,
            message: message.into(),
            details,
        }
    }
}

/// An error answer: status, a short code, a message, field details.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Vec<Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody::new(self.code, self.message, Some(Value::Array(self.details)));
        (self.status, Json(body)).into_response()
    }
}

fn error(status: StatusCode, code: &'static str, message: String, details: Vec<Value>) -> Response {
    ApiError {
        status,
        code,
        message,
        details,
    }
    .into_response()
}

fn bad_field(field: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_request",
        message: format!("{field}: {message}"),
        details: vec![json!({ "field": field, "message": message })],
    }
}

fn bad_request(field: &str, message: impl Into<String>) -> Response {
    bad_field(field, message).into_response()
}

fn store_failed(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "read API: store call failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        e.to_string(),
        vec![],
    )
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_request",
        message: e.body_text(),
        details: vec![],
    })
}

fn limit(l: Option<u32>) -> Result<u32, ApiError> {
    match l {
        None => Ok(100),
        Some(n @ 1..=10_000) => Ok(n),
        Some(_) => Err(bad_field("limit", "must be 1..=10000")),
    }
}

fn instant(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => crate::time::parse_rfc3339_ms(s)
            .map(Some)
            .ok_or_else(|| bad_field(field, "must be an RFC 3339 timestamp with a zone")),
    }
}

/// Liveness: 200 while the process serves, with what each stage is doing
/// (running, or retrying since …) and the counters.
/// `GET /`: the operators' dashboard — regional load against capacity per
/// minute, open alerts with acknowledge / resolve, current tariffs and
/// their history — one page with its script inline (no build step, no
/// asset from elsewhere), reading this API and `/events`.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The dashboard (HTML)", content_type = "text/html")))]
async fn dashboard() -> Response {
    axum::response::Html(include_str!("dashboard.html")).into_response()
}

/// `GET /openapi.json`: this API as an OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
async fn openapi_json() -> Response {
    Json(openapi::document()).into_response()
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive: each stage's state and the pipeline counters", body = Object)))]
async fn healthz(State(s): State<ApiState>) -> Response {
    Json(json!({
        "status": "ok",
        "stages": s.metrics.health.snapshot(),
        "metrics": s.metrics.snapshot(),
    }))
    .into_response()
}

/// How long one readiness check may take.
const READY_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Each running stage's lag per topic and partition (`None` when the bus
/// could not say within [`READY_CHECK`]), asked of the bus concurrently.
async fn stage_lags(s: &ApiState) -> Vec<(&'static str, &'static str, Option<LagParts>)> {
    let running = s.metrics.health.snapshot();
    let asks = crate::pipeline::STAGE_INPUTS
        .into_iter()
        .filter(|(name, _, _)| running.contains_key(name))
        .map(|(name, group, topics)| async move {
            let lag = tokio::time::timeout(READY_CHECK, s.bus.lag(group, topics))
                .await
                .ok()
                .and_then(Result::ok);
            (name, group, lag)
        });
    futures::future::join_all(asks).await
}

/// A consumer group's lag: (topic, partition, records not committed).
type LagParts = Vec<(Topic, u32, u64)>;

/// `GET /metrics`: the registry in the OpenMetrics text format (Prometheus
/// scrapes it), with each running stage's bus lag per topic and partition
/// looked up now (and the dead-letter replay group's: batches parked).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics (OpenMetrics text)", content_type = "application/openmetrics-text")))]
async fn metrics(State(s): State<ApiState>) -> Response {
    let mut lags: Vec<(&str, Option<LagParts>)> = stage_lags(&s)
        .await
        .into_iter()
        .map(|(_, group, lag)| (group, lag))
        .collect();
    if s.plugins.is_some() {
        // Parked anomaly batches: the replay group's lag.
        use crate::pipeline::dead_letters::{DEAD_LETTER_GROUP, INPUTS};
        let parked = s.bus.lag(DEAD_LETTER_GROUP, INPUTS);
        let parked = tokio::time::timeout(READY_CHECK, parked).await;
        lags.push((DEAD_LETTER_GROUP, parked.ok().and_then(Result::ok)));
    }
    for (group, lag) in lags {
        if let Some(parts) = lag {
            for (topic, partition, lag) in parts {
                s.metrics
                    .bus_lag
                    .get_or_create(&crate::metrics::LagLabels {
                        group: group.to_owned(),
                        topic: topic.name().to_owned(),
                        partition,
                    })
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
        }
    }
    if let Some(plugins) = &s.plugins {
        for slot in plugins.list() {
            let versions = std::iter::once(&slot.serving)
                .chain(&slot.previous)
                .chain(&slot.retired);
            for v in versions {
                s.metrics.plugin_version(
                    &slot.name,
                    v.version,
                    &v.sha256,
                    v.calls,
                    v.faults,
                    v.records,
                    v.mean_ns_per_record,
                );
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Readiness: the bus, the store and the dedupe store each answer within
/// [`READY_CHECK`], and no stage is retrying; otherwise 503, naming what is
/// wrong.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready: bus, store and dedupe answer; no stage retrying; each stage's lag", body = Object),
        (status = 503, description = "Not ready: what is wrong", body = Object)))]
async fn readyz(State(s): State<ApiState>) -> Response {
    async fn check<E: std::fmt::Display>(
        f: impl std::future::Future<Output = Result<(), E>>,
    ) -> Value {
        match tokio::time::timeout(READY_CHECK, f).await {
            Ok(Ok(())) => json!({ "ok": true }),
            Ok(Err(e)) => json!({ "ok": false, "error": e.to_string() }),
            Err(_) => json!({ "ok": false, "error": format!("no answer within {READY_CHECK:?}") }),
        }
    }
    let (bus, store, dedupe) = tokio::join!(
        check(s.bus.check()),
        check(s.store.ping()),
        check(s.dedupe.ping())
    );
    let health = s.metrics.health.snapshot();
    let ready = [&bus, &store, &dedupe].iter().all(|c| c["ok"] == true)
        && health.values().all(|st| st.retrying.is_none());
    // Each running stage with its lag: records of its inputs its group has
    // not committed (null when the bus could not say in time).
    let lags: std::collections::HashMap<&str, Value> = stage_lags(&s)
        .await
        .into_iter()
        .map(|(name, _, lag)| {
            let total = lag.map(|parts| parts.iter().map(|(_, _, n)| n).sum::<u64>());
            (name, json!(total))
        })
        .collect();
    let mut stages = serde_json::Map::new();
    for (name, st) in &health {
        let mut v = serde_json::to_value(st).unwrap_or_default();
        if let Some(lag) = lags.get(name) {
            v["lag"] = lag.clone();
        }
        stages.insert((*name).to_owned(), v);
    }
    let body = Json(json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": { "bus": bus, "store": store, "dedupe": dedupe },
        "stages": stages,
    }));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct InvoiceParams {
    meter_id: Option<String>,
    user_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<u32>,
}

/// `GET /invoices`: invoices with their line items (`segs bill` makes
/// them), newest period first; `from` / `to` bound the billing period.
#[utoipa::path(get, path = "/invoices", tag = "billing", params(InvoiceParams),
    responses((status = 200, body = Vec<crate::billing::Invoice>), (status = 400, body = ErrorBody)))]
async fn list_invoices(
    State(s): State<ApiState>,
    q: Result<Query<InvoiceParams>, QueryRejection>,
) -> Response {
    let p = match query(q) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let instant = |field: &'static str, v: &Option<String>| match v {
        None => Ok(None),
        Some(v) => crate::time::parse_rfc3339_ms(v)
            .map(Some)
            .ok_or_else(|| bad_field(field, "must be an RFC 3339 instant")),
    };
    let (from_ms, to_ms) = match (instant("from", &p.from), instant("to", &p.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return bad_request("limit", "must be 1..=1000");
    }
    let filter = crate::store::InvoiceFilter {
        meter_id: p.meter_id,
        user_id: p.user_id,
        from_ms,
        to_ms,
        limit,
    };
    match s.store.list_invoices(&filter).await {
        Ok(invoices) => Json(invoices).into_response(),
        Err(e) => store_failed(e),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AlertParams {
    region: Option<String>,
    status: Option<String>,
    #[serde(rename = "type")]
    alert_type: Option<String>,
    severity: Option<String>,
    meter_id: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/alerts", tag = "alerts", params(AlertParams),
    responses((status = 200, body = Vec<crate::store::AlertRow>), (status = 400, body = ErrorBody)))]
async fn list_alerts(
    State(s): State<ApiState>,
    q: Result<Query<AlertParams>, QueryRejection>,
) -> Response {
    let p = match query(q) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    if let Some(st) = &p.status {
        if !["active", "acknowledged", "resolved"].contains(&st.as_str()) {
            return bad_request("status", "must be active, acknowledged or resolved");
        }
    }
    if let Some(sev) = &p.severity {
        if !["low", "medium", "high", "critical"].contains(&sev.as_str()) {
            return bad_request("severity", "must be low, medium, high or critical");
        }
    }
    let limit = match limit(p.limit) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    let filter = AlertFilter {
        region: p.region,
        status: p.status,
        alert_type: p.alert_type,
        severity: p.severity,
        meter_id: p.meter_id,
        limit,
    };
    match s.store.list_alerts(&filter).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_failed(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ByBody {
    by: Option<String>,
}

fn alert_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    id.parse().map_err(|_| bad_field("id", "must be a UUID"))
}

#[utoipa::path(post, path = "/alerts/{id}/acknowledge", tag = "alerts",
    params(("id" = String, Path, description = "The alert's id (UUID)")),
    request_body(content = Object, description = "`{\"by\": \"who\"}` (required)"),
    responses((status = 200, body = crate::store::AlertRow), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn acknowledge(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<ByBody>, JsonRejection>,
) -> Response {
    let id = match alert_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let by = match body {
        Ok(Json(ByBody { by: Some(by) })) if !by.trim().is_empty() => by,
        Ok(_) => return bad_request("by", "required: who acknowledges the alert"),
        Err(e) => return bad_request("body", e.body_text()),
    };
    let now = crate::time::now_ms();
    let t = s.store.acknowledge_alert(id, &by, now).await;
    transition(&s, t, Some(&by), now).await
}

#[utoipa::path(post, path = "/alerts/{id}/resolve", tag = "alerts",
    params(("id" = String, Path, description = "The alert's id (UUID)")),
    responses((status = 200, body = crate::store::AlertRow), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn resolve(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Option<Json<ByBody>>,
) -> Response {
    let id = match alert_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let by = body.and_then(|Json(b)| b.by);
    let now = crate::time::now_ms();
    let t = s.store.resolve_alert(id, now).await;
    transition(&s, t, by.as_deref(), now).await
}

async fn transition(
    s: &ApiState,
    t: Result<Transition, crate::store::StoreError>,
    by: Option<&str>,
    now: i64,
) -> Response {
    match t {
        Ok(Transition::Changed { from, row }) => {
            let update = status_update(&row, from, by, now);
            s.live.publish(
                crate::live::LiveKind::AlertStatus,
                row.region.as_deref(),
                &update,
            );
            let record = KeyedMessage::of(&update).into_record(now);
            if let Err(e) = s.bus.produce(Topic::AlertStatusUpdates, vec![record]).await {
                tracing::error!(error = %e, "could not publish an alert status update");
            }
            Json(row).into_response()
        }
        Ok(Transition::Unchanged(row)) => Json(row).into_response(),
        Ok(Transition::NotFound) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no alert with that id".into(),
            vec![],
        ),
        Ok(Transition::Refused { status }) => error(
            StatusCode::CONFLICT,
            "conflict",
            format!("the alert is {status}; that change is not allowed"),
            vec![],
        ),
        Err(e) => store_failed(e),
    }
}

#[utoipa::path(get, path = "/tariffs/current", tag = "tariffs",
    responses((status = 200, body = Vec<crate::store::TariffRow>)))]
async fn current_tariffs(State(s): State<ApiState>) -> Response {
    match s.store.current_tariffs().await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_failed(e),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TariffParams {
    region: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/tariffs", tag = "tariffs", params(TariffParams),
    responses((status = 200, body = Vec<crate::store::TariffRow>), (status = 400, body = ErrorBody)))]
async fn tariff_history(
    State(s): State<ApiState>,
    q: Result<Query<TariffParams>, QueryRejection>,
) -> Response {
    let p = match query(q) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let limit = match limit(p.limit) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    match s.store.tariff_history(p.region.as_deref(), limit).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_failed(e),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AggregateParams {
    meter_id: Option<String>,
    region: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<u32>,
}

fn aggregate_query(p: AggregateParams) -> Result<AggregateQuery, ApiError> {
    Ok(AggregateQuery {
        from_ms: instant("from", p.from.as_deref())?,
        to_ms: instant("to", p.to.as_deref())?,
        limit: limit(p.limit)?,
        meter_id: p.meter_id,
        region: p.region,
    })
}

async fn meter_aggregates(
    s: ApiState,
    width: WindowWidth,
    q: Result<Query<AggregateParams>, QueryRejection>,
) -> Response {
    let q = match query(q).and_then(aggregate_query) {
        Ok(q) => q,
        Err(r) => return r.into_response(),
    };
    match s.store.meter_aggregates(width, &q).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_failed(e),
    }
}

#[utoipa::path(get, path = "/aggregates/1m", tag = "aggregates", params(AggregateParams),
    responses((status = 200, body = Vec<crate::store::MeterAggregate>), (status = 400, body = ErrorBody)))]
async fn aggregates_1m(
    State(s): State<ApiState>,
    q: Result<Query<AggregateParams>, QueryRejection>,
) -> Response {
    meter_aggregates(s, WindowWidth::OneMinute, q).await
}

#[utoipa::path(get, path = "/aggregates/15m", tag = "aggregates", params(AggregateParams),
    responses((status = 200, body = Vec<crate::store::MeterAggregate>), (status = 400, body = ErrorBody)))]
async fn aggregates_15m(
    State(s): State<ApiState>,
    q: Result<Query<AggregateParams>, QueryRejection>,
) -> Response {
    meter_aggregates(s, WindowWidth::FifteenMinutes, q).await
}

#[utoipa::path(get, path = "/aggregates/regional", tag = "aggregates", params(AggregateParams),
    responses((status = 200, body = Vec<crate::store::RegionalAggregate>), (status = 400, body = ErrorBody)))]
async fn aggregates_regional(
    State(s): State<ApiState>,
    q: Result<Query<AggregateParams>, QueryRejection>,
) -> Response {
    let q = match query(q).and_then(aggregate_query) {
        Ok(q) => q,
        Err(r) => return r.into_response(),
    };
    if q.meter_id.is_some() {
        return bad_request("meter_id", "not a filter of regional aggregates");
    }
    match s.store.regional_aggregates(&q).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_failed(e),
    }
}
