//! `GET /events` (Server-Sent Events): clients see the scripted stream's
//! alerts, tariff changes and regional load as they happen, in order,
//! filtered as asked, and resume with `Last-Event-ID` without a gap.
//!
//! Needs `cargo xtask build-plugins` first (`cargo xtask test` does it).

mod common;

use std::time::Duration;

use segs::app::App;
use segs::simulator::Simulator;
use serde_json::Value;
use tokio::sync::mpsc;

/// One SSE event as a client parsed it.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

impl Sse {
    fn seq(&self) -> u64 {
        self.id.rsplit('-').next().unwrap().parse().unwrap()
    }
}

/// Streams `url`'s events into a channel until the server ends the stream
/// or the receiver is dropped.
async fn subscribe(url: String, last_event_id: Option<String>) -> mpsc::UnboundedReceiver<Sse> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut req = reqwest::Client::new().get(url);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let mut resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if event.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                if tx.send(Sse { id, event, data }).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next event, within a generous bound (a hang guard).
async fn next(rx: &mut mpsc::UnboundedReceiver<Sse>) -> Sse {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("an event within 60 s")
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_the_streams_decisions_in_order_and_resume_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = common::sim_config(13);
    let mut sim = Simulator::new(sim_cfg.clone()).unwrap();
    let cfg = common::embedded_config(dir.path(), &sim);
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", app.addr);

    // Bad filters are refused, naming the field.
    let r = reqwest::get(format!("{url}/events?types=alert,nope"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("types"));

    let mut all = subscribe(format!("{url}/events"), None).await;
    let mut decisions = subscribe(format!("{url}/events?types=alert,tariff"), None).await;
    let mut early = subscribe(format!("{url}/events"), None).await;

    // Twelve simulated minutes: the surge raises an overload alert and
    // moves the price; regional load comes every minute.
    let client = reqwest::Client::new();
    common::post_ticks(&client, &url, &mut sim, 0..72).await;

    // The early client takes three events and goes away.
    let mut resumed: Vec<Sse> = Vec::new();
    for _ in 0..3 {
        resumed.push(next(&mut early).await);
    }
    drop(early);

    // Every alert and tariff the store holds reaches the filtered client,
    // in the order they were decided.
    let store = app.ctx.store.clone();
    // (The alert and tariff stages run apart: wait for both decisions.)
    let mut found = None;
    for _ in 0..600 {
        let alerts = common::all_alerts(&*store).await;
        let tariffs = store.tariff_history(None, 1000).await.unwrap();
        // The surge's price goes up and back down: two changes.
        if alerts.iter().any(|a| a.alert_type == "OVERLOAD") && tariffs.len() >= 2 {
            found = Some((alerts, tariffs));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (alerts, tariffs) = found.expect("an overload alert and the surge's price changes");
    assert!(!tariffs.is_empty(), "the surge moves the price");
    let mut seen = Vec::new();
    while seen.len() < alerts.len() + tariffs.len() {
        seen.push(next(&mut decisions).await);
    }
    assert!(
        seen.iter()
            .all(|e| e.event == "alert" || e.event == "tariff"),
        "{seen:?}"
    );
    let mut alert_ids: Vec<String> = seen
        .iter()
        .filter(|e| e.event == "alert")
        .map(|e| e.data["alertId"].as_str().unwrap().to_owned())
        .collect();
    alert_ids.sort();
    let mut stored: Vec<String> = alerts.iter().map(|a| a.id.to_string()).collect();
    stored.sort();
    assert_eq!(alert_ids, stored);
    let prices: Vec<String> = seen
        .iter()
        .filter(|e| e.event == "tariff")
        .map(|e| e.data["tariffId"].as_str().unwrap().to_owned())
        .collect();
    let mut in_order: Vec<&_> = tariffs.iter().collect();
    in_order.sort_by_key(|t| t.effective_from_ms);
    assert_eq!(
        prices,
        in_order
            .iter()
            .map(|t| t.tariff_id.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        seen.windows(2).all(|w| w[0].seq() < w[1].seq()),
        "in feed order"
    );

    // The unfiltered client has every event, numbered without a gap, with
    // regional load among them.
    let last_decision = seen.last().unwrap().seq();
    let mut every: Vec<Sse> = Vec::new();
    while every.last().is_none_or(|e| e.seq() < last_decision) {
        every.push(next(&mut all).await);
    }
    let seqs: Vec<u64> = every.iter().map(Sse::seq).collect();
    assert_eq!(seqs, (1..=last_decision).collect::<Vec<_>>());
    assert!(every.iter().any(|e| e.event == "regional_load"));

    // The early client resumes after its third event and gets the rest,
    // without a gap.
    let mut again = subscribe(format!("{url}/events"), Some(resumed[2].id.clone())).await;
    while resumed.last().unwrap().seq() < last_decision {
        resumed.push(next(&mut again).await);
    }
    let seqs: Vec<u64> = resumed.iter().map(Sse::seq).collect();
    assert_eq!(seqs, (1..=last_decision).collect::<Vec<_>>());
    assert_eq!(
        resumed.iter().map(|e| &e.data).collect::<Vec<_>>(),
        every.iter().map(|e| &e.data).collect::<Vec<_>>()
    );

    // An id this process never gave: told so, then everything kept.
    let mut stranger = subscribe(format!("{url}/events"), Some("1-5".into())).await;
    let first = next(&mut stranger).await;
    assert_eq!(first.event, "reset", "{first:?}");
    assert_eq!(next(&mut stranger).await.seq(), 1);

    // Stopping ends every stream (and is not held up by them).
    let unfinished = app.shutdown().await;
    assert!(unfinished.is_empty(), "{unfinished:?}");
    while all.recv().await.is_some() {}
}

/// `GET /metrics` is the Prometheus registry: the counters the status line
/// shows, store write latency per stage, and bus lag per topic and
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_the_prometheus_text_format() {
    let dir = tempfile::tempdir().unwrap();
    let sim_cfg = common::sim_config(19);
    let mut sim = Simulator::new(sim_cfg.clone()).unwrap();
    let cfg = common::embedded_config(dir.path(), &sim);
    let app = App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", app.addr);
    let client = reqwest::Client::new();
    // Each reading acknowledged once (re-sent ones are duplicates).
    let accepted = common::post_ticks(&client, &url, &mut sim, 0..12)
        .await
        .len() as u64;
    // The archive stores every reading; its writes are timed.
    let store = app.ctx.store.clone();
    for _ in 0..600 {
        if store.count_raw_readings().await.unwrap() >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    let healthz: Value = serde_json::from_slice(
        &client
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(value("segs_readings_accepted_total"), accepted as f64);
    assert_eq!(
        healthz["metrics"]["accepted"].as_u64(),
        Some(accepted),
        "the same counter: {healthz}"
    );
    assert_eq!(value("segs_readings_archived_total"), accepted as f64);
    assert!(value("segs_store_write_seconds_count{stage=\"archive\"}") >= 1.0);
    for p in 0..3 {
        // Present for every partition (committed or not yet).
        value(&format!(
            "segs_bus_lag_records{{group=\"raw-archive-group\",topic=\"telemetry-readings\",partition=\"{p}\"}}"
        ));
    }
    // The anomaly rule's calls, per version.
    let anomaly_calls: f64 = text
        .lines()
        .filter(|l| l.starts_with("segs_plugin_calls_total{plugin=\"anomaly\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(anomaly_calls > 0.0, "{text}");
    assert!(text.ends_with("# EOF\n"));
    app.shutdown().await;
}
