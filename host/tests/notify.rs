//! Webhook notifications: a local receiver gets every alert and tariff
//! change of the scripted stream once, signed, including across a segs
//! restart and while it refuses its first attempts.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use segs::app::App;
use segs::config::WebhookConfig;
use segs::pipeline::notify::signature;
use segs::simulator::Simulator;
use serde_json::Value;

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Requests so far; the first `REFUSED` are answered 503.
    requests: usize,
    /// Delivery ids it answered 2xx to, in order.
    taken: Vec<String>,
    /// Requests whose signature did not check out.
    bad_signatures: Vec<String>,
    /// Bodies taken, by delivery id.
    bodies: HashMap<String, Value>,
}

const SECRET: &str = "webhook-test-secret";
const REFUSED: usize = 3;

async fn receive(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("x-segs-delivery");
    let timestamp: i64 = header("x-segs-timestamp").parse().unwrap_or(0);
    let mut seen = seen.lock();
    seen.requests += 1;
    if header("x-segs-signature") != signature(SECRET.as_bytes(), timestamp, &body) {
        seen.bad_signatures.push(id.clone());
    }
    if seen.requests <= REFUSED {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    seen.taken.push(id.clone());
    seen.bodies
        .insert(id, serde_json::from_slice(&body).unwrap_or(Value::Null));
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_every_alert_and_tariff_once_signed_across_a_restart() {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = common::sim_config(11);
    let mut sim = Simulator::new(sim_cfg.clone()).unwrap();
    let mut cfg = common::embedded_config(dir.path(), &sim);
    let hook: WebhookConfig = toml::from_str(&format!(
        "name = \"ops\"\nurl = \"{receiver}\"\nsecret = \"{SECRET}\"\nmax_backoff_s = 1"
    ))
    .unwrap();
    cfg.notify.webhooks.push(hook);
    cfg.check().unwrap();

    // Twelve simulated minutes, with a restart after six.
    let client = reqwest::Client::new();
    let mut acked: HashSet<(String, String)> = HashSet::new();
    for half in [0..36, 36..72] {
        let app = App::start(cfg.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let url = format!("http://{}", app.addr);
        acked.extend(common::post_ticks(&client, &url, &mut sim, half).await);
        let unfinished = app.shutdown().await;
        assert!(unfinished.is_empty(), "{unfinished:?}");
    }

    // What the store decided is what the receiver got: each once.
    let store = segs::store::open(&cfg.store.url).await.unwrap();
    let alerts = common::all_alerts(&*store).await;
    let tariffs = store.tariff_history(None, 1000).await.unwrap();
    assert!(
        !alerts.is_empty() && !tariffs.is_empty(),
        "the stream raises both"
    );
    let mut expected: Vec<String> = alerts
        .iter()
        .map(|a| format!("alert:{}", a.id))
        .chain(tariffs.iter().map(|t| format!("tariff:{}", t.tariff_id)))
        .collect();
    expected.sort();
    let seen = std::mem::take(&mut *seen.lock());
    let mut taken = seen.taken.clone();
    taken.sort();
    assert_eq!(taken, expected, "every event taken once");
    assert!(seen.bad_signatures.is_empty(), "{:?}", seen.bad_signatures);
    assert!(seen.requests > REFUSED, "the refused attempts were retried");
    for a in &alerts {
        let body = &seen.bodies[&format!("alert:{}", a.id)];
        assert_eq!(body["event"], "alert");
        assert_eq!(body["data"]["alertId"], a.id.to_string(), "{body}");
    }

    // The delivery log has each delivered, the first ones after retries.
    let pool = sqlx::SqlitePool::connect(&cfg.store.url).await.unwrap();
    let (delivered, max_attempts): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), MAX(attempts) FROM notification_deliveries \
         WHERE webhook = 'ops' AND status = 'delivered'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(delivered as usize, expected.len());
    assert!(max_attempts > 1, "{max_attempts}");
}
