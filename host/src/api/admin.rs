//! The admin API: rule plugins swapped, listed and rolled back while segs
//! runs (`segs plugins …` is a client of it).
//!
//! | | |
//! |---|---|
//! | `GET /admin/plugins` | every slot: serving version (name, version, sha256, loaded-at, source, calls, faults, mean ns per record) and the earlier ones |
//! | `PUT /admin/plugins/{name}` | a component as the body (`application/wasm`), optional `?config=<JSON object>`; or `application/json` `{"config": {…}}`: a new config for the serving component |
//! | `POST /admin/plugins/{name}/rollback` | back to the previous version |
//! | `GET /admin/dead-letters` | how many anomaly batches are parked on `plugin_dead_letter` |
//! | `POST /admin/dead-letters/replay` | every parked batch through the serving version (see [`crate::pipeline::dead_letters`]) |
//!
//! Every route needs `Authorization: Bearer <admin.token>` (401 without it
//! or with a wrong one; the body is drained, never used); with no token configured
//! the admin API is off (404). Bodies over `admin.max_component_bytes` get
//! 413. A push is checked step by step off the async runtime; a refusal is
//! 422 naming the step, and the serving version stays.
//!
//! Must not: touch a stage; swaps go through the slots.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::config::{AdminConfig, HttpConfig};
use crate::pipeline::dead_letters::{DeadLetters, ReplayReport};
use crate::plugins::share::Sharing;
use crate::plugins::{ConfigValue, Registry, SlotControl, SwapError, config_from_json};

#[derive(Clone)]
struct AdminState {
    registry: Option<Arc<Registry>>,
    sharing: Option<Arc<Sharing>>,
    dead_letters: Option<Arc<DeadLetters>>,
    token: Arc<str>,
    max_body: usize,
}

/// The admin routes. Without a token they all answer 404 saying how to turn
/// the admin API on; without a registry (an `ingest`-role process), 404
/// saying this process runs no plugins.
pub fn router(
    registry: Option<Arc<Registry>>,
    sharing: Option<Arc<Sharing>>,
    dead_letters: Option<Arc<DeadLetters>>,
    admin: &AdminConfig,
    http: &HttpConfig,
) -> Router {
    let state = AdminState {
        registry,
        sharing,
        dead_letters,
        token: Arc::from(admin.token.as_str()),
        max_body: admin.max_component_bytes,
    };
    Router::new()
        .route("/admin/plugins", get(list))
        .route("/admin/plugins/{name}", put(push))
        .route("/admin/plugins/{name}/rollback", post(rollback))
        .route("/admin/dead-letters", get(parked_letters))
        .route("/admin/dead-letters/replay", post(replay_dead_letters))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(admin.max_component_bytes))
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(
            http.body_read_timeout_s,
        )))
        .with_state(state)
}

fn answer(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "message": message})),
    )
        .into_response()
}

/// Checks the bearer token before anything else: a refused request's body
/// is read and dropped (within the size cap and the body read timeout), not
/// kept or looked at, so that the client, still sending, gets its 401
/// instead of a broken connection.
async fn authorize(State(s): State<AdminState>, request: Request, next: Next) -> Response {
    if s.token.is_empty() {
        let _ = axum::body::to_bytes(request.into_body(), s.max_body).await;
        return answer(
            StatusCode::NOT_FOUND,
            "admin_off",
            "the admin API is off: set SEGS_ADMIN_TOKEN or admin.token".into(),
        );
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), s.token.as_bytes()));
    if !ok {
        let _ = axum::body::to_bytes(request.into_body(), s.max_body).await;
        let mut r = answer(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` is needed".into(),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    if s.registry.is_none() {
        return answer(
            StatusCode::NOT_FOUND,
            "no_plugins",
            "this process runs no plugins (role ingest)".into(),
        );
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn registry(s: &AdminState) -> &Arc<Registry> {
    s.registry
        .as_ref()
        .expect("authorize() lets requests through only with a registry")
}

#[utoipa::path(get, path = "/admin/plugins", tag = "admin",
    responses((status = 200, description = "Every plugin: serving version, earlier ones, calls, faults, mean time per record", body = Object),
        (status = 401, description = "No or wrong bearer token"), (status = 404, description = "Admin API off (no token configured)")))]
async fn list(State(s): State<AdminState>) -> Response {
    axum::Json(json!({ "plugins": registry(&s).list() })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushQuery {
    /// The plugin's config as a JSON object (URL-encoded).
    config: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    config: serde_json::Map<String, serde_json::Value>,
}

fn swap_error(e: SwapError) -> Response {
    match &e {
        SwapError::Refused { step, .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"error": "plugin_refused", "step": step, "message": e.to_string()})),
        )
            .into_response(),
        SwapError::NoPrevious { .. } => answer(StatusCode::CONFLICT, "no_previous", e.to_string()),
        SwapError::Unknown { .. } => answer(StatusCode::NOT_FOUND, "unknown_plugin", e.to_string()),
    }
}

fn bad_config(name: &str, message: String) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(json!({
            "error": "plugin_refused",
            "step": "configure",
            "message": format!("plugin `{name}`: refused at step `configure`: {message}; the running version keeps serving"),
        })),
    )
        .into_response()
}

#[utoipa::path(put, path = "/admin/plugins/{name}", tag = "admin",
    params(("name" = String, Path, description = "anomaly, overload, tariff or aggregate"),
        ("config" = Option<String>, Query, description = "The plugin's config as a JSON object")),
    request_body(content = Vec<u8>, description = "The component (.wasm), or a JSON `{\"config\": …}` alone", content_type = "application/wasm"),
    responses((status = 200, description = "Swapped in", body = Object),
        (status = 401, description = "No or wrong bearer token"), (status = 413, description = "Body over admin.max_component_bytes"),
        (status = 422, description = "Refused: the step (compile, world, instantiate, configure, sample) and why", body = Object)))]
async fn push(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    query: Result<Query<PushQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let slot = match registry(&s).get(&name) {
        Ok(slot) => slot.clone(),
        Err(e) => return swap_error(e),
    };
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return answer(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let parse = |text: &[u8]| -> Result<Vec<(String, ConfigValue)>, String> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(text)
            .map_err(|e| format!("config is not a JSON object: {e}"))?;
        config_from_json(&name, &object).map_err(|e| e.to_string())
    };
    let (bytes, config) = if is_json {
        let body: ConfigBody = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("a JSON body is {{\"config\": {{…}}}}: {e}"),
                );
            }
        };
        match config_from_json(&name, &body.config) {
            Ok(c) => (None, Some(c)),
            Err(e) => return bad_config(&name, e.to_string()),
        }
    } else {
        if body.is_empty() {
            return answer(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body is the component (application/wasm), or {\"config\": {…}} as application/json".into(),
            );
        }
        let config = match query.config.as_deref().map(|c| parse(c.as_bytes())) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(message)) => return bad_config(&name, message),
        };
        (Some(body), config)
    };
    let installer = slot.clone();
    let swapped = tokio::task::spawn_blocking(move || {
        installer.swap(bytes.as_deref(), config, "admin".to_owned())
    })
    .await;
    match swapped {
        Ok(Ok(version)) => {
            let shared = share(&s, &*slot, "admin").await;
            axum::Json(json!({ "plugin": version, "shared_seq": shared })).into_response()
        }
        Ok(Err(e)) => swap_error(e),
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("checking the plugin panicked: {e}"),
        ),
    }
}

#[utoipa::path(post, path = "/admin/plugins/{name}/rollback", tag = "admin",
    params(("name" = String, Path, description = "anomaly, overload, tariff or aggregate")),
    responses((status = 200, description = "Rolled back to the previous version", body = Object),
        (status = 401, description = "No or wrong bearer token"), (status = 409, description = "No previous version", body = Object)))]
async fn rollback(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    let slot = match registry(&s).get(&name) {
        Ok(slot) => slot.clone(),
        Err(e) => return swap_error(e),
    };
    match slot.rollback() {
        Ok(version) => {
            let shared = share(&s, &*slot, "rollback").await;
            axum::Json(json!({ "plugin": version, "shared_seq": shared })).into_response()
        }
        Err(e) => swap_error(e),
    }
}

/// Records the slot's new serving version for the other processes; its
/// seq, or `None` (logged) when it could not be recorded: the swap here
/// stands either way.
async fn share(s: &AdminState, slot: &dyn SlotControl, source: &str) -> Option<i64> {
    let sharing = s.sharing.as_ref()?;
    match sharing.publish(slot, source).await {
        Ok(seq) => Some(seq),
        Err(e) => {
            tracing::error!(plugin = slot.name(), error = %e, "recording the swap for the other processes failed");
            None
        }
    }
}

fn letters(s: &AdminState) -> &Arc<DeadLetters> {
    s.dead_letters
        .as_ref()
        .expect("a process with a plugin registry has a dead-letter replayer")
}

#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin",
    responses((status = 200, description = "Anomaly batches parked on plugin_dead_letter, not replayed yet: {\"parked\": n}", body = Object),
        (status = 401, description = "No or wrong bearer token"), (status = 404, description = "Admin API off (no token configured)"),
        (status = 503, description = "The bus did not answer", body = crate::api::ErrorBody)))]
async fn parked_letters(State(s): State<AdminState>) -> Response {
    match letters(&s).parked().await {
        Ok(parked) => axum::Json(json!({ "parked": parked })).into_response(),
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, "bus", e.to_string()),
    }
}

#[utoipa::path(post, path = "/admin/dead-letters/replay", tag = "admin",
    responses((status = 200, description = "Parked batches run through the serving anomaly version, their alerts published; `stopped` says why it ended early", body = ReplayReport),
        (status = 401, description = "No or wrong bearer token"), (status = 404, description = "Admin API off (no token configured)"),
        (status = 503, description = "The bus did not answer", body = crate::api::ErrorBody)))]
async fn replay_dead_letters(State(s): State<AdminState>) -> Response {
    match letters(&s).replay().await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, "bus", e.to_string()),
    }
}
