//! The `[http]` limits on the real server: a client that stalls is cut off
//! while others are served, connections past `http.max_connections` wait
//! until one closes, and requests past `http.max_in_flight_requests` get 503
//! with `Retry-After`.
//!
//! Each test starts segs through `App::start` (the path `segs run` takes)
//! with the shipped pipeline.toml, its files in a temp dir and short limits.
//! It runs the `ingest` role: the whole HTTP surface (ingest and read API),
//! no stages, so no plugins are needed. Stalling clients are raw TCP
//! sockets. The only time bounds asserted are generous upper ones ("cut off
//! before 30 s"), and "not answered within 1 s" for a client that must wait.

use std::path::{Path, PathBuf};
use std::time::Duration;

use segs::app::App;
use segs::config::{HttpConfig, PipelineConfig, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a stalled client may take to be cut off before the test fails:
/// far above the configured timeouts, so a slow machine does not matter.
const GENEROUS: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn start(dir: &Path, http: HttpConfig) -> App {
    let mut cfg = PipelineConfig::load(&root().join("pipeline.toml")).unwrap();
    cfg.role = Role::Ingest;
    cfg.store.url = format!("sqlite://{}", dir.join("segs.db").display());
    cfg.bus.path = dir.join("segs-bus.db");
    cfg.http = http;
    cfg.check().unwrap();
    App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn reading_body() -> String {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    format!(
        r#"[{{"readingId":"r-1","meterId":"MTR-1","region":"Mumbai-North","timestamp":"{now}","powerKw":1.5}}]"#
    )
}

/// Reads until the peer closes the connection (or resets it); `None` if it
/// is still open after [`GENEROUS`].
async fn read_until_closed(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(GENEROUS, read_all).await.ok()?;
    Some(got)
}

/// Reads one response (head and a `Content-Length` body) off a raw
/// connection, leaving the connection open. Fails the test after
/// [`GENEROUS`].
async fn read_response(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before a whole response");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if got.len() >= head_end + 4 + len {
                    return text.into_owned();
                }
            }
        }
    };
    tokio::time::timeout(GENEROUS, read)
        .await
        .expect("no whole response within the generous bound")
}

const GET_HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: segs\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(
        dir.path(),
        HttpConfig {
            header_read_timeout_s: 1,
            body_read_timeout_s: 1,
            ..HttpConfig::default()
        },
    )
    .await;

    // Half a request head, then nothing.
    let mut half_head = TcpStream::connect(app.addr).await.unwrap();
    half_head
        .write_all(b"POST /telemetry/batch HTTP/1.1\r\nHost: segs\r\nContent-Type: appl")
        .await
        .unwrap();
    // A whole head announcing 4000 bytes, then half of them, then nothing.
    let mut half_body = TcpStream::connect(app.addr).await.unwrap();
    let body = " ".repeat(2000);
    half_body
        .write_all(
            format!(
                "POST /telemetry/batch HTTP/1.1\r\nHost: segs\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{body}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // A connection that sends nothing at all.
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    // A kept-alive connection that is served once, then idles.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(GET_HEALTHZ).await.unwrap();
    let first = read_response(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // Meanwhile a normal client is served.
    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://{}/telemetry/batch", app.addr))
        .header("content-type", "application/json")
        .body(reading_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    let r = client
        .get(format!("http://{}/healthz", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The stalled ones are cut off: the head by closing the connection ...
    let got = read_until_closed(&mut half_head)
        .await
        .expect("a half-sent head was still open after 30 s");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "half head: {got}"
    );
    let got = read_until_closed(&mut silent)
        .await
        .expect("a silent connection was still open after 30 s");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // ... the body with a 408, then closing the connection.
    let got = read_until_closed(&mut half_body)
        .await
        .expect("a half-sent body was still open after 30 s");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "half body: {got}");
    assert!(got.contains("http.body_read_timeout_s"), "{got}");
    // The idle kept-alive connection is closed too.
    let got = read_until_closed(&mut idle)
        .await
        .expect("an idle kept-alive connection was still open after 30 s");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));

    // And the server still serves (on a new connection: the client's
    // pooled one has idled past the server's keep-alive timeout meanwhile,
    // and reusing it races with the server closing it).
    let r = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .get(format!("http://{}/healthz", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(
        dir.path(),
        HttpConfig {
            // Long enough that the held connections are not cut off.
            header_read_timeout_s: 600,
            max_connections: 2,
            max_in_flight_requests: 2,
            ..HttpConfig::default()
        },
    )
    .await;

    // Two kept-alive connections, served once each, held open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(app.addr).await.unwrap();
        c.write_all(GET_HEALTHZ).await.unwrap();
        let r = read_response(&mut c).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        held.push(c);
    }

    // A third connects (the kernel's backlog takes it) but is not served
    // while the two are open.
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    third.write_all(GET_HEALTHZ).await.unwrap();
    let mut buf = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a connection past http.max_connections was answered: {early:?}"
    );

    // One closes: the third is served.
    drop(held.remove(0));
    let r = read_response(&mut third).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    drop(held);
    drop(third);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_cap_get_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(
        dir.path(),
        HttpConfig {
            // Long enough that the stalled request stays in flight.
            header_read_timeout_s: 600,
            body_read_timeout_s: 600,
            max_in_flight_requests: 1,
            ..HttpConfig::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let alerts = format!("http://{}/alerts", app.addr);

    // A request whose body stalls stays in flight, holding the one slot.
    let mut stalled = TcpStream::connect(app.addr).await.unwrap();
    stalled
        .write_all(
            b"POST /telemetry/batch HTTP/1.1\r\nHost: segs\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[",
        )
        .await
        .unwrap();

    // Once the server has taken it up, other requests are refused at once.
    let refused = tokio::time::timeout(GENEROUS, async {
        loop {
            let r = client.get(&alerts).send().await.unwrap();
            if r.status() == 503 {
                return r;
            }
            assert_eq!(r.status(), 200);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no 503 while a request held the only in-flight slot");
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "Retry-After is ingest.retry_after_s"
    );
    let body: serde_json::Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "overloaded", "{body}");
    // /healthz is not capped.
    let r = client
        .get(format!("http://{}/healthz", app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The stalled client goes away: its slot is free again.
    drop(stalled);
    tokio::time::timeout(GENEROUS, async {
        loop {
            let r = client.get(&alerts).send().await.unwrap();
            if r.status() == 200 {
                return;
            }
            assert_eq!(r.status(), 503);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the in-flight slot was not given back after its client left");
    app.shutdown().await;
}
