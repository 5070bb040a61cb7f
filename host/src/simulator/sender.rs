//! The simulator's HTTP sender: posts each tick's batches to
//! `{url}/telemetry/batch`, paced by a rate and/or simulated real time, and
//! counts what the server answered. Whatever the pacing, a tick is never
//! sent before the wall clock has reached its event time: a simulation
//! that would run ahead of the clock drops to real time, because ingest
//! refuses readings dated in the future (`[ingest] max_clock_skew_s`).
//!
//! Owns retries (503/429 honour `Retry-After` and re-send the same batch;
//! transport failures back off and re-send; re-sends are safe because
//! ingest dedupes) and the [`SimStats`] counters. Other error statuses are
//! counted and reported, never fatal. Must not generate readings (that is
//! [`super::model`]) or know anything of the server's insides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{SimBatch, SimConfig, SimError, Simulator};

/// Where and how fast to send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendTarget {
    /// Base URL of a segs (or seed ingestion) server, e.g.
    /// `http://127.0.0.1:8080`; a URL that already ends in
    /// `/telemetry/batch` is used as is. Plain HTTP only.
    pub url: String,
    /// Readings per request, 1..=1000 for a segs server.
    pub batch_size: usize,
    /// Readings per second; `None`: as fast as the server answers.
    pub rate: Option<f64>,
    /// Stop after this much wall-clock time.
    pub duration: Option<Duration>,
    /// Stop after this many ticks.
    pub ticks: Option<u64>,
    /// Send tick `k` no earlier than `k × interval` after the start (live
    /// demo); otherwise ticks follow each other as fast as `rate` allows.
    /// Either way no tick is sent before the wall clock reaches its event
    /// time.
    pub realtime: bool,
}

impl Default for SendTarget {
    fn default() -> Self {
        SendTarget {
            url: "http://127.0.0.1:8080".into(),
            batch_size: 1000,
            rate: None,
            duration: None,
            ticks: None,
            realtime: false,
        }
    }
}

/// Live counters of a run, readable while it goes on (e.g. by `segs run`'s
/// status endpoint), and the run's stop switch.
#[derive(Debug)]
pub struct SimStats {
    /// Ticks generated.
    pub ticks: AtomicU64,
    /// Batches posted (each counted once, however many attempts).
    pub batches: AtomicU64,
    /// Readings posted (each counted once, however many attempts).
    pub sent: AtomicU64,
    /// Readings the server reported as accepted.
    pub accepted: AtomicU64,
    /// Readings the server reported as duplicates.
    pub duplicates: AtomicU64,
    /// Readings not accepted: answered with an error status, or given up on
    /// (retries exhausted, stop requested, deadline reached).
    pub rejected: AtomicU64,
    /// Re-sends after a 503/429 or a transport failure.
    pub retries: AtomicU64,
    /// Batches that ended in `rejected`.
    pub errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    stop: watch::Sender<bool>,
}

impl Default for SimStats {
    fn default() -> Self {
        SimStats {
            ticks: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            stop: watch::Sender::new(false),
        }
    }
}

impl SimStats {
    pub fn new() -> Arc<Self> {
        Arc::new(SimStats::default())
    }

    /// Asks the run to finish: it stops before the next batch (or at once
    /// if it is waiting) and returns its summary.
    pub fn request_stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    /// The last error status or give-up reason, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// The counters now.
    pub fn summary(&self, elapsed: Duration) -> SimSummary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimSummary {
            ticks: get(&self.ticks),
            batches: get(&self.batches),
            sent: get(&self.sent),
            accepted: get(&self.accepted),
            duplicates: get(&self.duplicates),
            rejected: get(&self.rejected),
            retries: get(&self.retries),
            errors: get(&self.errors),
            elapsed,
            last_error: self.last_error(),
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn fail(&self, readings: u64, message: String) {
        warn!(readings, error = %message, "batch not accepted");
        Self::add(&self.errors, 1);
        Self::add(&self.rejected, readings);
        *self.last_error.lock() = Some(message);
    }

    /// Sleeps until `at`; false (early) if the deadline comes first or a
    /// stop is requested.
    async fn wait_until(&self, at: Instant, deadline: Option<Instant>) -> bool {
        let until = deadline.map_or(at, |d| d.min(at));
        let mut stop = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep_until(until) => until == at && !self.stop_requested(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }
}

/// What a run did (see [`SimStats`] for the meaning of each count).
#[derive(Debug, Clone, PartialEq)]
pub struct SimSummary {
    pub ticks: u64,
    pub batches: u64,
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub retries: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub last_error: Option<String>,
}

/// Transport failures in a row after which one batch makes the run fail.
const MAX_SEND_ATTEMPTS: u32 = 8;
/// 503/429 answers after which one batch is given up (counted as rejected).
const MAX_BUSY_RETRIES: u32 = 120;
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Generates the stream of `cfg` and posts it to `target` until `ticks`,
/// `duration` or [`SimStats::request_stop`] ends it (none of them: runs
/// until stopped). Counters are kept in `stats` as it goes.
///
/// Fails only on a bad config or URL, or when the server cannot be reached
/// at all; HTTP error statuses are counted and the run goes on.
pub async fn run(
    cfg: SimConfig,
    target: SendTarget,
    stats: Arc<SimStats>,
) -> Result<SimSummary, SimError> {
    let url = batch_url(&target.url)?;
    if target.batch_size == 0 {
        return Err(SimError::Config("batch size must be at least 1".into()));
    }
    if let Some(rate) = target.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(SimError::Config(format!(
                "rate must be a positive number, got {rate}"
            )));
        }
    }
    let interval_s = u64::from(cfg.interval_s);
    let mut sim = Simulator::new(cfg)?;
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(SimError::Client)?;
    let started = Instant::now();
    // A point in time too far away to represent is never reached.
    let later = |d: Option<Duration>| d.and_then(|d| started.checked_add(d));
    let deadline = later(target.duration);
    let far_future = || Instant::now() + Duration::from_secs(365 * 86_400);
    let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
    let mut readings_sent = 0u64;
    info!(
        %url,
        meters = sim.config().meters,
        interval_s,
        mode = sim.config().mode.as_str(),
        seed = sim.config().seed,
        "simulator started"
    );
    'ticks: loop {
        let k = sim.next_tick_index();
        if target.ticks.is_some_and(|n| k >= n) || stats.stop_requested() || past_deadline() {
            break;
        }
        if target.realtime && k > 0 {
            let at = later(Some(Duration::from_secs(interval_s.saturating_mul(k))))
                .unwrap_or_else(far_future);
            if !stats.wait_until(at, deadline).await {
                break;
            }
        }
        // Never stamp a reading in the future: wait for the wall clock to
        // reach this tick's event time (a start in the past never waits).
        // Re-read after each sleep: timers run on the monotonic clock.
        loop {
            let ahead_ms = sim.timestamp_ms(k).saturating_sub(crate::time::now_ms());
            if ahead_ms <= 0 {
                break;
            }
            let at = Instant::now()
                .checked_add(Duration::from_millis(ahead_ms.unsigned_abs()))
                .unwrap_or_else(far_future);
            if !stats.wait_until(at, deadline).await {
                break 'ticks;
            }
        }
        let batches = sim.next_batches(target.batch_size);
        SimStats::add(&stats.ticks, 1);
        for batch in batches {
            if let Some(rate) = target.rate {
                let at = later(Duration::try_from_secs_f64(readings_sent as f64 / rate).ok())
                    .unwrap_or_else(far_future);
                if !stats.wait_until(at, deadline).await {
                    break 'ticks;
                }
            }
            if stats.stop_requested() || past_deadline() {
                break 'ticks;
            }
            readings_sent += batch.readings as u64;
            send_batch(&client, &url, batch, &stats, deadline).await?;
        }
    }
    let summary = stats.summary(started.elapsed());
    info!(
        ticks = summary.ticks,
        sent = summary.sent,
        accepted = summary.accepted,
        duplicates = summary.duplicates,
        rejected = summary.rejected,
        retries = summary.retries,
        "simulator finished"
    );
    Ok(summary)
}

/// `{base}/telemetry/batch`, checked.
fn batch_url(base: &str) -> Result<String, SimError> {
    let bad = |reason: &str| SimError::Url {
        url: base.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = reqwest::Url::parse(base).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "http" => {}
        "https" => return Err(bad("https is not supported (plain HTTP only)")),
        _ => return Err(bad("expected an http:// URL")),
    }
    let base = base.trim_end_matches('/');
    if base.ends_with("/telemetry/batch") {
        Ok(base.to_owned())
    } else {
        Ok(format!("{base}/telemetry/batch"))
    }
}

/// Posts one batch until it gets a final answer.
async fn send_batch(
    client: &reqwest::Client,
    url: &str,
    batch: SimBatch,
    stats: &SimStats,
    deadline: Option<Instant>,
) -> Result<(), SimError> {
    let n = batch.readings as u64;
    let body = Bytes::from(batch.body);
    SimStats::add(&stats.batches, 1);
    SimStats::add(&stats.sent, n);
    let mut failures = 0u32;
    let mut busy = 0u32;
    loop {
        let sent = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                failures += 1;
                if failures >= MAX_SEND_ATTEMPTS {
                    stats.fail(n, format!("cannot reach {url}: {e}"));
                    return Err(SimError::Unreachable {
                        url: url.to_owned(),
                        attempts: failures,
                        source: e,
                    });
                }
                warn!(%url, attempt = failures, error = %e, "post failed, retrying");
                SimStats::add(&stats.retries, 1);
                let backoff = Duration::from_millis(100 << failures.min(4));
                if !stats.wait_until(Instant::now() + backoff, deadline).await {
                    stats.fail(n, format!("gave up retrying {url}: {e}"));
                    return Ok(());
                }
                continue;
            }
        };
        let status = resp.status();
        if status.is_success() {
            let text = resp.bytes().await.unwrap_or_default();
            let (accepted, duplicates) = counts(&text, n);
            SimStats::add(&stats.accepted, accepted);
            SimStats::add(&stats.duplicates, duplicates);
            return Ok(());
        }
        if matches!(status.as_u16(), 503 | 429) && busy < MAX_BUSY_RETRIES {
            busy += 1;
            let wait = retry_after(resp.headers())
                .unwrap_or(DEFAULT_RETRY_AFTER)
                .min(MAX_RETRY_AFTER);
            SimStats::add(&stats.retries, 1);
            if stats.wait_until(Instant::now() + wait, deadline).await {
                continue;
            }
            stats.fail(
                n,
                format!("gave up after HTTP {status} (stopped or out of time)"),
            );
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(300).collect();
        stats.fail(n, format!("HTTP {status}: {text}"));
        return Ok(());
    }
}

/// Reads `{"accepted": N, "duplicates": M}`; missing figures are inferred
/// from the batch size.
fn counts(body: &[u8], readings: u64) -> (u64, u64) {
    #[derive(serde::Deserialize)]
    struct Counts {
        accepted: Option<u64>,
        duplicates: Option<u64>,
    }
    match serde_json::from_slice::<Counts>(body) {
        Ok(c) => {
            let duplicates = c.duplicates.unwrap_or(0);
            (
                c.accepted.unwrap_or(readings.saturating_sub(duplicates)),
                duplicates,
            )
        }
        Err(_) => (readings, 0),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = at.timestamp_millis() - crate::time::now_ms();
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            batch_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/telemetry/batch"
        );
        assert_eq!(
            batch_url("http://h:1/").unwrap(),
            "http://h:1/telemetry/batch"
        );
        assert_eq!(
            batch_url("http://h/api/").unwrap(),
            "http://h/api/telemetry/batch"
        );
        assert_eq!(
            batch_url("http://h/telemetry/batch").unwrap(),
            "http://h/telemetry/batch"
        );
        assert_eq!(
            batch_url("https://h").unwrap_err().to_string(),
            r#"invalid target URL "https://h": https is not supported (plain HTTP only)"#
        );
        assert!(batch_url("127.0.0.1:8080").is_err());
        assert!(batch_url("ftp://h").is_err());
    }

    #[test]
    fn response_counts() {
        assert_eq!(counts(br#"{"accepted":7,"duplicates":3}"#, 10), (7, 3));
        assert_eq!(counts(br#"{"success":true,"duplicates":3}"#, 10), (7, 3));
        assert_eq!(counts(b"", 10), (10, 0));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
