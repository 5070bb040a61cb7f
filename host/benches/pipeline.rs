//! `cargo xtask bench`: what segs costs, measured (never asserted).
//!
//! Each benchmark runs several rounds and prints the best and the median, so
//! a noisy neighbour on this 2-core machine shows as spread, not as a wrong
//! figure. Filter by name: `cargo xtask bench anomaly` (names: `anomaly`,
//! `hotpath`, `stream`, `http`, `sustained`, `kafka`, `store`).
//!
//! - `anomaly`: the anomaly rule, native Rust vs the Wasm component.
//! - `hotpath`: the stream stage's per-reading work on one core, no bus and
//!   no HTTP: parse the published JSON, `Windows::add`, fill the anomaly
//!   columns, one Wasm call per 1,000 readings, `Windows::advance`; each
//!   piece also alone, so the sum is visible.
//! - `stream`: the whole embedded pipeline (`App::start`) fed by producing
//!   published readings straight onto its in-process bus: readings/s through
//!   the real stream stage (which also closes windows, runs the aggregate
//!   rule and upserts into SQLite).
//! - `http`: `POST /telemetry/batch` over loopback into the embedded app,
//!   with a pre-serialized load generator in the same process, plus the same
//!   generator against a trivial endpoint as a ceiling.
//! - `sustained`: the same HTTP load on the shipped configuration (bounded
//!   lag, raw archive on), measured for several seconds after a warm-up
//!   while every stage consumes, once per bus: the volatile `memory` bus
//!   and the durable `embedded` one with fsync on and off. Readings/s
//!   accepted and the share of requests refused with 503.
//! - `kafka`: the Kafka path on the broker at `KAFKA_BROKERS` (default
//!   127.0.0.1:9092; Tansu here), skipped when none answers. segs on Kafka
//!   end to end (the shipped configuration with `bus.kind = kafka`: HTTP
//!   load for a warm-up and a measured window, then the time until every
//!   accepted reading is in `raw_readings` and `aggregates_1m`), then raw
//!   rdkafka producing and consuming the same published records on the same
//!   broker; both figures side by side, their ratio, and where the time
//!   goes (ingest latency, the stages' progress, CPU by thread group and of
//!   the broker process).
//! - `store`: rows/s written through the `Store` seam into SQLite and
//!   PostgreSQL in the same run: raw readings, and 1-minute aggregates new
//!   and merged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use segs::app::App;
use segs::bus::{Record, Topic};
use segs::config::{PipelineConfig, WindowsConfig};
use segs::ingest::validate;
use segs::plugins::{AnomalyRule, Limits, Runtime, anomaly::ReadingBatch};
use segs::reading::Reading;
use segs::simulator::{SimConfig, Simulator};
use segs::windows::{ClosedWindow, Windows, WindowsParams};

/// The allocator of the `segs` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROUNDS: usize = 9;
/// Rounds of the benchmarks whose one round is a whole pass over a data set.
const PASSES: usize = 5;
/// 2025-11-12T06:00:00Z: a fixed start so event time is repeatable.
const START_MS: i64 = 1_762_927_200_000;
/// Readings per request / per anomaly call, as pipeline.toml ships.
const BATCH: usize = 1000;
/// Records the stream stage takes per poll (`pipeline::POLL_MAX`).
const POLL_MAX: usize = 4096;

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    println!("segs benchmarks ({ROUNDS} rounds each, {PASSES} for whole-pass ones; best / median)");
    if wanted("anomaly") {
        anomaly_native_vs_wasm();
    }
    let hot = wanted("hotpath");
    let stream = wanted("stream");
    if hot || stream {
        let data = Published::generate(10_000, 60);
        if hot {
            hot_path(&data);
        }
        if stream {
            stream_stage(&data);
        }
    }
    if wanted("validate") {
        ingest_validation();
    }
    let (http, sustained) = (wanted("http"), wanted("sustained"));
    if (http || sustained) && plugin_path("anomaly").exists() {
        let pool = HttpPool::generate();
        let generator = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("loadgen")
            .enable_all()
            .build()
            .expect("tokio runtime");
        if http {
            http_ingest(&pool, &generator);
        }
        if sustained {
            sustained_ingest(&pool, &generator);
        }
    } else if http || sustained {
        println!("HTTP ingest: skipped (run `cargo xtask build-plugins`)");
    }
    if wanted("kafka") {
        kafka_path();
    }
    if wanted("store") {
        store_writes();
    }
}

/// Runs `f` (which processes `items` items) ROUNDS times for at least
/// `min_time` each; returns (best, median) ns per item.
fn measure(items: u64, min_time: Duration, mut f: impl FnMut()) -> (f64, f64) {
    let mut per_item = Vec::with_capacity(ROUNDS);
    f(); // warm-up
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut iters = 0u64;
        while start.elapsed() < min_time {
            f();
            iters += 1;
        }
        per_item.push(start.elapsed().as_nanos() as f64 / (iters * items) as f64);
    }
    per_item.sort_by(f64::total_cmp);
    (per_item[0], per_item[ROUNDS / 2])
}

/// One warm-up and PASSES timed passes of `run` over `items` items, each on
/// a fresh state from `setup` (not timed, nor is dropping the state);
/// returns (best, median) ns per item.
fn measure_passes<S>(
    items: usize,
    mut setup: impl FnMut() -> S,
    mut run: impl FnMut(&mut S),
) -> (f64, f64) {
    let mut per_item = Vec::with_capacity(PASSES + 1);
    for _ in 0..=PASSES {
        let mut state = setup();
        let start = Instant::now();
        run(&mut state);
        per_item.push(start.elapsed().as_nanos() as f64 / items as f64);
        drop(state);
    }
    per_item.remove(0); // warm-up
    per_item.sort_by(f64::total_cmp);
    (per_item[0], per_item[PASSES / 2])
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn plugin_path(name: &str) -> PathBuf {
    root().join(format!("target/plugins/{name}.wasm"))
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn per_s(ns_per_item: f64) -> String {
    thousands((1e9 / ns_per_item) as u64)
}

// ---------------------------------------------------------------- anomaly --

/// A batch of 1,000 readings with a realistic share of anomalies: about 1 in
/// 100 is a spike, 1 in 200 a drop, 1 in 500 an outage; every meter past its
/// minimum sample count.
fn realistic_batch() -> ReadingBatch {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut b = ReadingBatch {
        power_kw: Vec::with_capacity(1000),
        baseline_kw: Vec::with_capacity(1000),
        sample_count: Vec::with_capacity(1000),
    };
    for _ in 0..1000 {
        let baseline = 2.0 + (next() % 600) as f64 / 100.0;
        let r = next() % 1000;
        let power = match r {
            0..=9 => baseline * 2.6,
            10..=14 => baseline * 0.3,
            15..=16 => 0.05,
            _ => baseline * (0.9 + (next() % 200) as f64 / 1000.0),
        };
        b.power_kw.push(power);
        b.baseline_kw.push(baseline);
        b.sample_count.push(50);
    }
    b
}

fn load_anomaly() -> Option<AnomalyRule> {
    let rt = Runtime::new(Limits::default()).expect("wasmtime runtime");
    match AnomalyRule::load(&rt, "anomaly", &plugin_path("anomaly"), vec![]) {
        Ok(r) => Some(r),
        Err(e) => {
            println!("anomaly plugin: skipped: {e} (run `cargo xtask build-plugins`)");
            None
        }
    }
}

fn anomaly_native_vs_wasm() {
    let batch = realistic_batch();
    let config = anomaly::Config::default();
    let native_findings = anomaly::detect(
        &config,
        &batch.power_kw,
        &batch.baseline_kw,
        &batch.sample_count,
    )
    .len();
    let (nb, nm) = measure(1000, Duration::from_millis(200), || {
        black_box(anomaly::detect(
            &config,
            black_box(&batch.power_kw),
            &batch.baseline_kw,
            &batch.sample_count,
        ));
    });

    let Some(mut rule) = load_anomaly() else {
        return;
    };
    let wasm_findings = rule.detect(&batch).expect("detect").len();
    assert_eq!(native_findings, wasm_findings, "native and wasm disagree");
    let (wb, wm) = measure(1000, Duration::from_millis(200), || {
        black_box(rule.detect(black_box(&batch)).expect("detect"));
    });
    println!(
        "anomaly rule, batches of 1,000 readings ({native_findings} findings per batch):\n  \
         native      {nb:7.2} ns/reading (median {nm:.2})\n  \
         wasm        {wb:7.2} ns/reading (median {wm:.2})\n  \
         difference  {:7.2} ns/reading (median {:.2})",
        wb - nb,
        wm - nm
    );
}

// ------------------------------------------------------ published readings --

/// A simulated stream as ingest publishes it on `telemetry-readings`: each
/// record's value is `validate::write_published` output (canonical
/// timestamp, `receivedAt` added), its key the meter id.
struct Published {
    meters: u32,
    values: Bytes,
    keys: Bytes,
    /// Per record: (key span, value span).
    spans: Vec<(Range<usize>, Range<usize>)>,
    /// Per tick: the records of that tick (every meter once).
    ticks: Vec<Range<usize>>,
}

impl Published {
    fn generate(meters: u32, ticks: u64) -> Published {
        let mut sim = Simulator::new(SimConfig {
            meters,
            interval_s: 10,
            seed: 7,
            start_ms: START_MS,
            ..SimConfig::default()
        })
        .expect("simulator config");
        let mut values = Vec::new();
        let mut keys = Vec::new();
        let mut spans = Vec::new();
        let mut tick_spans = Vec::new();
        for t in 0..ticks {
            let received_at = segs::time::format_rfc3339_ms(sim.timestamp_ms(t) + 150);
            let first = spans.len();
            for b in sim.next_batches(BATCH) {
                let v = validate::validate_batch(&b.body, BATCH, validate::TimeBounds::UNBOUNDED)
                    .expect("simulator output is valid");
                for r in &v.readings {
                    let (v0, k0) = (values.len(), keys.len());
                    validate::write_published(r, &received_at, &mut values);
                    keys.extend_from_slice(r.meter_id.as_bytes());
                    spans.push((k0..keys.len(), v0..values.len()));
                }
            }
            tick_spans.push(first..spans.len());
        }
        Published {
            meters,
            values: Bytes::from(values),
            keys: Bytes::from(keys),
            spans,
            ticks: tick_spans,
        }
    }

    fn value(&self, i: usize) -> &[u8] {
        &self.values[self.spans[i].1.clone()]
    }

    fn record(&self, i: usize) -> Record {
        let (k, v) = self.spans[i].clone();
        Record::new(self.keys.slice(k), self.values.slice(v), START_MS)
    }
}

// ---------------------------------------------------------------- hot path --

fn windows_params() -> WindowsParams {
    let w = WindowsConfig::default();
    WindowsParams {
        allowed_lateness_ms: w.allowed_lateness_s as i64 * 1000,
        baseline_window: w.baseline_window,
    }
}

fn empty_batch() -> ReadingBatch {
    ReadingBatch {
        power_kw: Vec::with_capacity(BATCH),
        baseline_kw: Vec::with_capacity(BATCH),
        sample_count: Vec::with_capacity(BATCH),
    }
}

/// What the stream stage does per poll, minus the bus, the alert records
/// and the closed windows' aggregate/store/publish (closed windows are
/// dropped here).
struct HotPath {
    windows: Windows,
    batch: ReadingBatch,
    refs: Vec<(u32, u32, i64)>,
    closed: Vec<ClosedWindow>,
    calls: u64,
    findings: u64,
}

impl HotPath {
    fn new() -> HotPath {
        HotPath {
            windows: Windows::new(windows_params()),
            batch: empty_batch(),
            refs: Vec::with_capacity(BATCH),
            closed: Vec::new(),
            calls: 0,
            findings: 0,
        }
    }

    fn poll(&mut self, rule: &mut AnomalyRule, data: &Published, records: Range<usize>) {
        for i in records {
            let reading = Reading::from_json(data.value(i)).expect("a reading");
            let ts = reading.event_time_ms().expect("RFC 3339");
            let obs = self.windows.add(
                &reading.meter_id,
                &reading.region,
                ts,
                reading.power_kw,
                reading.energy_kwh,
                reading.voltage,
            );
            self.batch.power_kw.push(reading.power_kw);
            self.batch.baseline_kw.push(obs.baseline_kw);
            self.batch.sample_count.push(obs.sample_count);
            self.refs.push((obs.meter, obs.region, ts));
            if self.refs.len() >= BATCH {
                self.detect(rule);
            }
        }
        // Like the stream stage: what is left of the batch goes at the end
        // of the poll.
        self.detect(rule);
        self.windows.advance(&mut self.closed);
        self.closed.clear();
    }

    fn detect(&mut self, rule: &mut AnomalyRule) {
        if self.refs.is_empty() {
            return;
        }
        let findings = rule.detect(&self.batch).expect("detect");
        self.calls += 1;
        self.findings += findings.len() as u64;
        self.batch.power_kw.clear();
        self.batch.baseline_kw.clear();
        self.batch.sample_count.clear();
        self.refs.clear();
    }

    /// A hot path that has seen tick 0 (every meter's first reading, so the
    /// interning), for timing the later ticks.
    fn warm(rule: &mut AnomalyRule, data: &Published) -> HotPath {
        let mut h = HotPath::new();
        h.poll(rule, data, data.ticks[0].clone());
        (h.calls, h.findings) = (0, 0);
        h
    }
}

/// The fields `Windows::add` takes, owned, for timing it alone.
struct Parsed {
    meter: Box<str>,
    region: Box<str>,
    ts: i64,
    power: f64,
    energy: Option<f64>,
    voltage: Option<f64>,
}

fn hot_path(data: &Published) {
    let Some(mut rule) = load_anomaly() else {
        return;
    };
    let timed = data.ticks[1].start..data.spans.len();
    let n = timed.len();
    let polls: Vec<Range<usize>> = timed
        .clone()
        .step_by(POLL_MAX)
        .map(|s| s..(s + POLL_MAX).min(timed.end))
        .collect();
    println!(
        "in-process hot path, one core, {} meters x {} ticks every 10 s ({} readings timed, \
         tick 0 untimed; published JSON ~{} B/reading; polls of {POLL_MAX}; the pieces the \
         stream stage calls, in a loop shaped like its own, not the stage itself: see \
         `stream stage through the in-process bus` for that):",
        thousands(u64::from(data.meters)),
        data.ticks.len() - 1,
        thousands(n as u64),
        data.values.len() / data.spans.len(),
    );

    // 1. JSON parse (+ event time) alone.
    let (pb, pm) = measure_passes(
        n,
        || (),
        |_| {
            for i in timed.clone() {
                let r = Reading::from_json(data.value(i)).expect("a reading");
                black_box(r.event_time_ms());
                black_box(&r);
            }
        },
    );
    println!(
        "  JSON parse into Reading + RFC 3339  {pb:7.1} ns/reading  {:>11} readings/s  (median {pm:.1} ns)",
        per_s(pb)
    );

    let stamps: Vec<String> = timed
        .clone()
        .map(|i| {
            let r = Reading::from_json(data.value(i)).expect("a reading");
            r.timestamp.into_owned()
        })
        .collect();
    let (tb, tm) = measure_passes(
        n,
        || (),
        |_| {
            for t in &stamps {
                black_box(segs::time::parse_rfc3339_ms(black_box(t)));
            }
        },
    );
    println!(
        "    of which RFC 3339 event time      {tb:7.1} ns/reading  {:>11} readings/s  (median {tm:.1} ns)",
        per_s(tb)
    );

    // 2. Windows::add (+ advance per poll) alone, on pre-parsed fields.
    let parsed: Vec<Parsed> = (0..data.spans.len())
        .map(|i| {
            let r = Reading::from_json(data.value(i)).expect("a reading");
            Parsed {
                meter: Box::from(&*r.meter_id),
                region: Box::from(&*r.region),
                ts: r.event_time_ms().expect("RFC 3339"),
                power: r.power_kw,
                energy: r.energy_kwh,
                voltage: r.voltage,
            }
        })
        .collect();
    let warm_windows = || {
        let mut w = Windows::new(windows_params());
        for p in &parsed[data.ticks[0].clone()] {
            w.add(&p.meter, &p.region, p.ts, p.power, p.energy, p.voltage);
        }
        (w, Vec::<ClosedWindow>::new())
    };
    let (wb, wm) = measure_passes(n, warm_windows, |(w, closed)| {
        for poll in &polls {
            for p in &parsed[poll.clone()] {
                black_box(w.add(&p.meter, &p.region, p.ts, p.power, p.energy, p.voltage));
            }
            w.advance(closed);
            closed.clear();
        }
    });
    println!(
        "  Windows::add + advance per poll     {wb:7.1} ns/reading  {:>11} readings/s  (median {wm:.1} ns)",
        per_s(wb)
    );

    // 3. The anomaly rule (Wasm) alone, on the columns the stream builds.
    let batches: Vec<ReadingBatch> = {
        let (mut w, _) = warm_windows();
        let mut out = Vec::new();
        let mut b = empty_batch();
        for p in &parsed[timed.clone()] {
            let obs = w.add(&p.meter, &p.region, p.ts, p.power, p.energy, p.voltage);
            b.power_kw.push(p.power);
            b.baseline_kw.push(obs.baseline_kw);
            b.sample_count.push(obs.sample_count);
            if b.power_kw.len() == BATCH {
                out.push(std::mem::replace(&mut b, empty_batch()));
            }
        }
        if !b.power_kw.is_empty() {
            out.push(b);
        }
        out
    };
    let (ab, am) = measure_passes(
        n,
        || (),
        |_| {
            for b in &batches {
                black_box(rule.detect(b).expect("detect"));
            }
        },
    );
    println!(
        "  anomaly rule (Wasm), 1,000/call     {ab:7.1} ns/reading  {:>11} readings/s  (median {am:.1} ns)",
        per_s(ab)
    );
    let sum = pb + wb + ab;
    println!(
        "  sum of the three pieces             {sum:7.1} ns/reading  {:>11} readings/s",
        per_s(sum)
    );

    // 4. The whole per-reading path, as the stream stage runs it.
    let mut calls = 0;
    let mut findings = 0;
    let rule = RefCell::new(rule);
    let (fb, fm) = measure_passes(
        n,
        || HotPath::warm(&mut rule.borrow_mut(), data),
        |h| {
            let rule = &mut *rule.borrow_mut();
            for poll in &polls {
                h.poll(rule, data, poll.clone());
            }
            (calls, findings) = (h.calls, h.findings);
        },
    );
    println!(
        "  pieces in the stage's order         {fb:7.1} ns/reading  {:>11} readings/s per core  \
         (median {fm:.1} ns; {calls} Wasm calls, {findings} findings)",
        per_s(fb)
    );
    println!(
        "  target: 1,000,000 readings/s per core through windows + anomaly (1,000 ns/reading)"
    );
}

// ------------------------------------------------------------ stream stage --

fn app_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("segs-app")
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The shipped pipeline.toml, with its store and bus journal in `dir`.
fn pipeline_config(dir: &Path, archive: bool, max_lag: usize) -> PipelineConfig {
    let mut cfg = PipelineConfig::load(&root().join("pipeline.toml")).expect("pipeline.toml");
    cfg.store.url = format!("sqlite://{}", dir.join("segs.db").display());
    cfg.bus.path = dir.join("segs-bus.db");
    cfg.store.archive_raw_readings = archive;
    cfg.bus.max_lag_per_partition = max_lag;
    // The streams start at a fixed date (START_MS), older than the default
    // max_reading_age_s: lift that bound so HTTP ingest accepts them.
    cfg.ingest.max_reading_age_s = 0;
    cfg
}

/// Polls `done` every millisecond for up to `limit`; the time it took.
fn wait_for(limit: Duration, done: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn stream_stage(data: &Published) {
    if !plugin_path("anomaly").exists() {
        println!("stream stage: skipped (run `cargo xtask build-plugins`)");
        return;
    }
    let n = data.spans.len();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let rt = app_runtime();
        let cfg = pipeline_config(dir.path(), false, n);
        let app = rt
            .block_on(App::start(cfg, "127.0.0.1:0".parse().expect("addr")))
            .expect("App::start");
        let metrics = app.ctx.metrics.clone();
        let bus = app.ctx.bus.clone();
        let cpu0 = thread_cpu();
        let start = Instant::now();
        rt.block_on(async {
            for tick in &data.ticks {
                for chunk in tick.clone().step_by(BATCH) {
                    let records = (chunk..(chunk + BATCH).min(tick.end))
                        .map(|i| data.record(i))
                        .collect();
                    bus.produce(Topic::TelemetryReadings, records)
                        .await
                        .expect("produce");
                }
            }
        });
        let done = wait_for(Duration::from_secs(120), || {
            metrics.readings_processed.load(Ordering::Relaxed) >= n as u64
        });
        let elapsed = start.elapsed();
        let cpu = cpu_since(&cpu0);
        if done.is_none() {
            println!("stream stage: did not finish within 120 s; skipped");
            return;
        }
        runs.push((n as f64 / elapsed.as_secs_f64(), cpu.cores(elapsed)));
        rt.block_on(app.shutdown());
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    runs.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "stream stage through the in-process bus (App::start, archive off; {} readings of {} meters \
         produced 1,000 per call onto telemetry-readings; includes closing windows: aggregate rule, \
         SQLite upserts, publishing; 3 runs):\n  \
         {:>11} readings/s (median {}) | CPU: {}",
        thousands(n as u64),
        thousands(u64::from(data.meters)),
        thousands(runs[0].0 as u64),
        thousands(runs[1].0 as u64),
        runs[0].1,
    );
}

// --------------------------------------------------------------------- CPU --

/// CPU time of each thread of this process, ns, by thread id, with its
/// name (Linux `/proc`; empty elsewhere).
fn thread_cpu() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let p = e.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .or_else(|| {
                // utime + stime in clock ticks (USER_HZ, 100 on Linux).
                let stat = std::fs::read_to_string(p.join("stat")).ok()?;
                let rest = &stat[stat.rfind(')')? + 1..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 =
                    f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                Some(ticks * 10_000_000)
            });
        if let Some(ns) = ns {
            out.insert(tid, (name.trim().to_owned(), ns));
        }
    }
    out
}

/// CPU seconds used since a [`thread_cpu`] snapshot, by thread group.
struct CpuUse {
    /// Every thread of the process.
    total_s: f64,
    /// The app's tokio workers (`segs-app`): HTTP, ingest, every stage.
    app_s: f64,
    /// sqlx's SQLite worker threads (the statements themselves).
    sqlite_s: f64,
    /// The load generator's threads (`loadgen`).
    loadgen_s: f64,
    /// librdkafka's own threads (`rdk:main`, `rdk:broker…`): the Kafka
    /// clients' I/O and (de)framing.
    kafka_s: f64,
}

impl CpuUse {
    /// `app 1.21 + SQLite 0.52 + generator 0.10 + other 0.01 = 1.84 cores`
    fn cores(&self, wall: Duration) -> String {
        let w = wall.as_secs_f64();
        let other = self.total_s - self.app_s - self.sqlite_s - self.loadgen_s - self.kafka_s;
        let mut s = format!(
            "app threads {:.2} + SQLite worker {:.2}",
            self.app_s / w,
            self.sqlite_s / w
        );
        if self.loadgen_s > 0.0 {
            s += &format!(" + generator {:.2}", self.loadgen_s / w);
        }
        if self.kafka_s > 0.0 {
            s += &format!(" + librdkafka {:.2}", self.kafka_s / w);
        }
        s + &format!(" + other {:.2} = {:.2} cores", other / w, self.total_s / w)
    }
}

fn cpu_since(before: &HashMap<u32, (String, u64)>) -> CpuUse {
    let mut use_ = CpuUse {
        total_s: 0.0,
        app_s: 0.0,
        sqlite_s: 0.0,
        loadgen_s: 0.0,
        kafka_s: 0.0,
    };
    for (tid, (name, ns)) in thread_cpu() {
        let was = before.get(&tid).map_or(0, |(_, ns)| *ns);
        let s = ns.saturating_sub(was) as f64 / 1e9;
        use_.total_s += s;
        if name.starts_with("segs-app") {
            use_.app_s += s;
        } else if name.starts_with("sqlx") {
            use_.sqlite_s += s;
        } else if name.starts_with("loadgen") {
            use_.loadgen_s += s;
        } else if name.starts_with("rdk:") {
            use_.kafka_s += s;
        }
    }
    use_
}

// -------------------------------------------------------------------- HTTP --

/// Concurrent keep-alive connections of the load generator.
const CONNECTIONS: usize = 16;
/// How long each HTTP scenario sends (it also stops when the pool runs out).
const SEND_TIME: Duration = Duration::from_secs(4);

struct Load {
    /// The pool ran out before the send time was up.
    exhausted: bool,
    requests: u64,
    non_2xx: u64,
    errors: u64,
    elapsed: Duration,
    /// Request latencies, µs, sorted.
    latency_us: Vec<u32>,
    cpu: CpuUse,
}

impl Load {
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latency_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latency_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latency_us[i]) / 1000.0
    }

    fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        format!(
            "{:>6} req/s  p50 {:5.1} ms  p99 {:5.1} ms | generator {:.0} µs CPU/request; CPU: {}",
            thousands((self.requests as f64 / secs) as u64),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
            self.cpu.loadgen_s * 1e6 / self.requests.max(1) as f64,
            self.cpu.cores(self.elapsed),
        )
    }
}

/// How a sender treats the pool.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// Each body once, refused or not.
    Once,
    /// Round and round.
    Cycle,
    /// Each body until it is accepted: a refused (503) body is sent again
    /// after `RETRY_PAUSE`, as a client that honours the 503 would.
    UntilAccepted,
    /// As `UntilAccepted`, round and round the pool with every timestamp
    /// moved on by `cycle_ms` per round, so every reading is new and event
    /// time keeps going forward in order (an endless meter fleet).
    Endless { cycle_ms: i64 },
}

/// Body `i` of an endless run over `pool`: the pool's body, its
/// `"timestamp":"…"` values moved on by `cycle_ms` per time round the pool.
fn endless_body(pool: &[Bytes], i: usize, cycle_ms: i64) -> Bytes {
    let base = &pool[i % pool.len()];
    let round = (i / pool.len()) as i64;
    if round == 0 {
        return base.clone();
    }
    const FIELD: &[u8] = b"\"timestamp\":\"";
    let mut body = base.to_vec();
    let mut ts = String::with_capacity(24);
    let mut last: Option<(i64, String)> = None;
    let mut at = 0;
    while let Some(quote) = body[at..].iter().position(|&b| b == b'"') {
        let q = at + quote;
        if !body[q..].starts_with(FIELD) {
            at = q + 1;
            continue;
        }
        let start = q + FIELD.len();
        let Some(len) = body[start..].iter().position(|&b| b == b'"') else {
            break;
        };
        let old = std::str::from_utf8(&body[start..start + len]).unwrap_or_default();
        let Some(ms) = segs::time::parse_rfc3339_ms(old) else {
            break;
        };
        if last.as_ref().is_none_or(|(m, _)| *m != ms) {
            ts.clear();
            segs::time::write_rfc3339_ms(&mut ts, ms + round * cycle_ms);
            last = Some((ms, ts.clone()));
        }
        let new = &last.as_ref().expect("set above").1;
        if new.len() == len {
            body[start..start + len].copy_from_slice(new.as_bytes());
        }
        at = start + len;
    }
    Bytes::from(body)
}

/// Pause of a [`Sending::UntilAccepted`] sender after a 503 (shorter than
/// `Retry-After`, to keep the pressure on).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Posts the bodies of `pool` as `sending` says from CONNECTIONS tasks with
/// one keep-alive connection each, for at most `send_time` or until `stop`
/// is set, on the generator's own runtime (threads named `loadgen`).
fn send_load(
    generator: &tokio::runtime::Runtime,
    url: &str,
    pool: &Arc<Vec<Bytes>>,
    sending: Sending,
    send_time: Duration,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Load {
    let cycle = matches!(sending, Sending::Cycle | Sending::Endless { .. });
    let retry_503 = matches!(sending, Sending::UntilAccepted | Sending::Endless { .. });
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (url, pool, next) = (url.to_owned(), pool.clone(), next.clone());
            let stop = stop.clone();
            generator.spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("reqwest client");
                let (mut ok, mut non_2xx, mut errors) = (0u64, 0u64, 0u64);
                let mut latency = Vec::with_capacity(4096);
                // A refused body is re-sent as it was (not made again).
                let mut retry: Option<Bytes> = None;
                while start.elapsed() < send_time && !stop.load(Ordering::Relaxed) {
                    let body = match retry.take() {
                        Some(body) => body,
                        None => {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if !cycle && i >= pool.len() {
                                break;
                            }
                            match sending {
                                Sending::Endless { cycle_ms } => endless_body(&pool, i, cycle_ms),
                                _ => pool[i % pool.len()].clone(),
                            }
                        }
                    };
                    let sent = Instant::now();
                    let resp = client
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match resp {
                        Ok(r) => {
                            let status = r.status();
                            let _ = r.bytes().await;
                            latency.push(sent.elapsed().as_micros() as u32);
                            if status.is_success() {
                                ok += 1;
                            } else {
                                non_2xx += 1;
                                if retry_503 && status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                                    retry = Some(body);
                                    tokio::time::sleep(RETRY_PAUSE).await;
                                }
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                (ok, non_2xx, errors, latency)
            })
        })
        .collect();
    let mut load = Load {
        exhausted: false,
        requests: 0,
        non_2xx: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: Vec::new(),
        cpu: CpuUse {
            total_s: 0.0,
            app_s: 0.0,
            sqlite_s: 0.0,
            loadgen_s: 0.0,
            kafka_s: 0.0,
        },
    };
    generator.block_on(async {
        for t in tasks {
            let (ok, non_2xx, errors, latency) = t.await.expect("sender task");
            load.requests += ok + non_2xx;
            load.non_2xx += non_2xx;
            load.errors += errors;
            load.latency_us.extend(latency);
        }
    });
    load.elapsed = start.elapsed();
    load.exhausted = !cycle && next.load(Ordering::Relaxed) >= pool.len();
    load.cpu = cpu_since(&cpu0);
    load.latency_us.sort_unstable();
    load
}

/// Pre-serialized request bodies of 1,000 readings each.
struct HttpPool {
    bodies: Arc<Vec<Bytes>>,
    readings: usize,
    body_kib: usize,
}

impl HttpPool {
    /// 100,000 meters x 15 ticks: 1,500 distinct bodies of 1,000 readings;
    /// every (meterId, timestamp) is new, so dedupe drops nothing.
    fn generate() -> HttpPool {
        HttpPool::simulate(100_000, 15, 11)
    }

    /// `meters` x `ticks` every 10 s from START_MS, in bodies of 1,000
    /// readings, tick after tick.
    fn simulate(meters: u32, ticks: u64, seed: u64) -> HttpPool {
        let mut sim = Simulator::new(SimConfig {
            meters,
            interval_s: 10,
            seed,
            start_ms: START_MS,
            ..SimConfig::default()
        })
        .expect("simulator config");
        let pool: Vec<Bytes> = (0..ticks)
            .flat_map(|_| sim.next_batches(BATCH))
            .map(|b| Bytes::from(b.body))
            .collect();
        let readings = pool.len() * BATCH;
        let body_kib = pool.iter().map(Bytes::len).sum::<usize>() / pool.len() / 1024;
        HttpPool {
            bodies: Arc::new(pool),
            readings,
            body_kib,
        }
    }
}

/// Ingest's validation alone (what a request costs before dedupe and the
/// bus): simulator bodies of 1,000 readings, as POST /telemetry/batch gets
/// them, checked and rewritten into the published form.
fn ingest_validation() {
    let pool = HttpPool::simulate(10_000, 10, 5);
    let n = pool.readings;
    let mut out = Vec::with_capacity(512 * BATCH);
    let (best, median) = measure_passes(
        n,
        || (),
        |_| {
            for body in pool.bodies.iter() {
                let v = validate::validate_batch(body, BATCH, validate::TimeBounds::UNBOUNDED)
                    .expect("simulator output is valid");
                out.clear();
                for r in &v.readings {
                    validate::write_published(r, "2025-11-12T06:30:00.000Z", &mut out);
                }
                black_box(&out);
            }
        },
    );
    println!(
        "ingest validation, one core ({} bodies of {BATCH} readings, ~{} KiB each): validate + \
         write the published form {best:7.1} ns/reading  {:>11} readings/s  (median {median:.1} ns)",
        pool.bodies.len(),
        pool.body_kib,
        per_s(best)
    );
}

fn http_ingest(pool: &HttpPool, generator: &tokio::runtime::Runtime) {
    let (pool_readings, body_kib) = (pool.readings, pool.body_kib);
    let pool = &pool.bodies;
    println!(
        "HTTP ingest over loopback: POST /telemetry/batch, 1,000 readings (~{body_kib} KiB) per request, \
         {CONNECTIONS} keep-alive connections (reqwest, 1 generator thread), pre-serialized pool of {} \
         distinct readings, up to {} s per line; app (2 worker threads) and generator share this \
         process and its 2 cores:",
        thousands(pool_readings as u64),
        SEND_TIME.as_secs()
    );

    // Ceiling: the same generator against an endpoint that reads the body
    // and answers 200.
    {
        let rt = app_runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = axum::Router::new()
            .route(
                "/telemetry/batch",
                axum::routing::post(|body: Bytes| async move {
                    black_box(body.len());
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        "{\"accepted\":1000,\"duplicates\":0}",
                    )
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(4 << 20));
        rt.spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let load = send_load(
            generator,
            &format!("http://{addr}/telemetry/batch"),
            pool,
            Sending::Cycle,
            SEND_TIME,
            &Default::default(),
        );
        println!(
            "  ceiling, trivial axum endpoint (reads body, 200) {:>11} readings/s  {}",
            thousands((load.requests as f64 * BATCH as f64 / load.elapsed.as_secs_f64()) as u64),
            load.summary()
        );
        rt.shutdown_timeout(Duration::from_secs(1));
    }

    for archive in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let rt = app_runtime();
        let cfg = pipeline_config(dir.path(), archive, pool_readings);
        let app = rt
            .block_on(App::start(cfg, "127.0.0.1:0".parse().expect("addr")))
            .expect("App::start");
        let metrics = app.ctx.metrics.clone();
        let load = send_load(
            generator,
            &format!("http://{}/telemetry/batch", app.addr),
            pool,
            Sending::Once,
            SEND_TIME,
            &Default::default(),
        );
        let secs = load.elapsed.as_secs_f64();
        let accepted = metrics.accepted.load(Ordering::Relaxed);
        let processed = metrics.readings_processed.load(Ordering::Relaxed);
        let archived = metrics.raw_archived.load(Ordering::Relaxed);
        let refused = metrics.refused_busy.load(Ordering::Relaxed);
        let backlog_done = || {
            metrics.readings_processed.load(Ordering::Relaxed) >= accepted
                && (!archive || metrics.raw_archived.load(Ordering::Relaxed) >= accepted)
        };
        let caught_up = wait_for(Duration::from_secs(60), backlog_done);
        let label = if archive {
            "ingest, archive_raw_readings = true "
        } else {
            "ingest, archive_raw_readings = false"
        };
        println!(
            "  {label}           {:>11} readings/s accepted  {}",
            thousands((accepted as f64 / secs) as u64),
            load.summary()
        );
        let mut meanwhile = format!(
            "while it ran the stream stage processed {}/s",
            thousands((processed as f64 / secs) as u64)
        );
        if archive {
            meanwhile += &format!(
                " and the archive stored {}/s",
                thousands((archived as f64 / secs) as u64)
            );
        }
        let end_to_end = match caught_up {
            Some(d) => format!(
                "backlog cleared {:.1} s after the last request: {} readings/s end to end",
                d.as_secs_f64(),
                thousands((accepted as f64 / (secs + d.as_secs_f64())) as u64)
            ),
            None => "backlog NOT cleared within 60 s".to_owned(),
        };
        println!(
            "    {} readings in {:.1} s, {} refused (503), {} other non-2xx, {} transport errors; \
             {meanwhile}; {end_to_end}",
            thousands(accepted),
            secs,
            refused,
            load.non_2xx - refused.min(load.non_2xx),
            load.errors,
        );
        if caught_up.is_some() {
            rt.block_on(app.shutdown());
        } else {
            drop(app);
        }
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    println!(
        "  target: 1,000,000 readings/s over HTTP on this 2-core machine (seed's Express + Zod: ~175,000/s)"
    );
}

// --------------------------------------------------------------- sustained --

/// The longest warm-up: sending until ingest first holds or refuses (its lag bound
/// reached, so what follows is the rate the slowest stage sustains).
const SUSTAIN_WARMUP_MAX: Duration = Duration::from_secs(40);
/// The sustained measurement after the warm-up, seconds
/// (`SEGS_BENCH_SUSTAIN_S`; 60 unless set).
fn sustain_time() -> Duration {
    let s = std::env::var("SEGS_BENCH_SUSTAIN_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(s)
}
/// The longest wait for the stages to catch up after the load.
const SUSTAIN_DRAIN_MAX: Duration = Duration::from_secs(120);

/// What the app's counters say at one moment.
#[derive(Clone, Copy)]
struct Counters {
    accepted: u64,
    refused: u64,
    held: u64,
    held_ms: u64,
    processed: u64,
    archived: u64,
}

fn counters(m: &segs::pipeline::Metrics) -> Counters {
    Counters {
        accepted: m.accepted.load(Ordering::Relaxed),
        refused: m.refused_busy.load(Ordering::Relaxed),
        held: m.held_requests.load(Ordering::Relaxed),
        held_ms: m.held_ms.load(Ordering::Relaxed),
        processed: m.readings_processed.load(Ordering::Relaxed),
        archived: m.raw_archived.load(Ordering::Relaxed),
    }
}

/// CPU cores used since a [`thread_cpu`] snapshot, per thread name (digits
/// and a trailing `-` dropped, so a pool's threads add up), busiest first.
fn cores_by_thread(before: &HashMap<u32, (String, u64)>, wall: Duration) -> String {
    let mut by: HashMap<String, f64> = HashMap::new();
    for (tid, (name, ns)) in thread_cpu() {
        let was = before.get(&tid).map_or(0, |(_, ns)| *ns);
        let group = name
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .trim_end_matches(['-', '_', ':'])
            .to_owned();
        *by.entry(group).or_default() += ns.saturating_sub(was) as f64 / 1e9;
    }
    let mut v: Vec<(String, f64)> = by.into_iter().filter(|(_, s)| *s > 0.0).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = v.iter().map(|(_, s)| s).sum();
    let w = wall.as_secs_f64();
    let parts: Vec<String> = v
        .iter()
        .filter(|(_, s)| *s / w >= 0.01)
        .map(|(n, s)| format!("{n} {:.2}", s / w))
        .collect();
    format!("{} = {:.2} cores", parts.join(" + "), total / w)
}

/// Each running stage's lag (records of its inputs its group has not
/// committed, summed over the partitions), as `/readyz` reports them.
fn stage_lags(rt: &tokio::runtime::Runtime, app: &App) -> String {
    let parts: Vec<String> = segs::pipeline::STAGE_INPUTS
        .iter()
        .map(
            |(name, group, topics)| match rt.block_on(app.ctx.bus.lag(group, topics)) {
                Ok(lag) => format!(
                    "{name} {}",
                    thousands(lag.iter().map(|(_, _, n)| n).sum::<u64>())
                ),
                Err(e) => format!("{name} ? ({e})"),
            },
        )
        .collect();
    parts.join(", ")
}

fn sustained_ingest(pool: &HttpPool, generator: &tokio::runtime::Runtime) {
    use segs::config::BusKind;
    use std::sync::atomic::AtomicBool;
    let sustain = sustain_time();
    // The pool is 15 ticks of every meter, 10 s apart: each round of it is
    // 150 s of event time later than the one before.
    let cycle_ms = 150_000;
    println!(
        "sustained HTTP ingest on the shipped configuration (max_lag_per_partition 200,000, \
         every stage and rule consuming), per bus: the same generator as above ({CONNECTIONS} \
         connections), round and round its pool with the timestamps moved on each round (every \
         reading new, event time in order); each refused (503) body re-sent after {} ms. It \
         sends until ingest first holds or refuses a request (near the lag bound; at most \
         {} s: \"filling\", readings/s accepted \
         meanwhile), then {} s measured (\"sustained\"; SEGS_BENCH_SUSTAIN_S); \"drained\": from \
         the end of the load until every accepted reading is folded into the windows and in \
         raw_readings; \"shutdown\": closing the open windows into aggregates_1m/_15m:",
        RETRY_PAUSE.as_millis(),
        SUSTAIN_WARMUP_MAX.as_secs(),
        sustain.as_secs()
    );
    let shipped = PipelineConfig::load(&root().join("pipeline.toml")).expect("pipeline.toml");
    let archive = shipped.store.archive_raw_readings;
    let scenarios = [
        (
            "memory (volatile)              ",
            BusKind::Memory,
            true,
            archive,
        ),
        (
            "embedded, fsync = true         ",
            BusKind::Embedded,
            true,
            archive,
        ),
        (
            "embedded, fsync = false        ",
            BusKind::Embedded,
            false,
            archive,
        ),
        (
            "embedded, fsync = true, no raw ",
            BusKind::Embedded,
            true,
            false,
        ),
    ];
    // `SEGS_BENCH_SCENARIO=fsync` runs only the scenarios whose label
    // holds that text (to profile one of them).
    let only = std::env::var("SEGS_BENCH_SCENARIO").ok();
    for (label, kind, fsync, archive) in scenarios {
        if only.as_deref().is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let rt = app_runtime();
        let mut cfg = pipeline_config(dir.path(), archive, shipped.bus.max_lag_per_partition);
        cfg.bus.kind = kind;
        cfg.bus.fsync = fsync;
        let app = rt
            .block_on(App::start(cfg, "127.0.0.1:0".parse().expect("addr")))
            .expect("App::start");
        let metrics = app.ctx.metrics.clone();
        let url = format!("http://{}/telemetry/batch", app.addr);
        let stop = Arc::new(AtomicBool::new(false));
        let (load, window) = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let start = Instant::now();
                let filled = wait_for(SUSTAIN_WARMUP_MAX, || {
                    metrics.refused_busy.load(Ordering::Relaxed) > 0
                        || metrics.held_requests.load(Ordering::Relaxed) > 0
                });
                let fill = (start.elapsed(), counters(&metrics));
                let (t0, c0, cpu0) = (Instant::now(), counters(&metrics), thread_cpu());
                std::thread::sleep(sustain);
                let c1 = counters(&metrics);
                let wall = t0.elapsed();
                let cpu = cores_by_thread(&cpu0, wall);
                stop.store(true, Ordering::Relaxed);
                (filled.is_some(), fill, wall, c0, c1, cpu)
            });
            let load = send_load(
                generator,
                &url,
                &pool.bodies,
                Sending::Endless { cycle_ms },
                SUSTAIN_WARMUP_MAX + sustain * 2,
                &stop,
            );
            (load, watcher.join().expect("watcher"))
        });
        let (filled, (fill_time, fill_counters), wall, c0, c1, cpu) = window;
        let secs = wall.as_secs_f64();
        let accepted = c1.accepted - c0.accepted;
        let refused = c1.refused - c0.refused;
        let ok_requests = accepted / BATCH as u64;
        let refused_pct = 100.0 * refused as f64 / (refused + ok_requests).max(1) as f64;
        let held = c1.held - c0.held;
        let held_pct = 100.0 * held as f64 / (refused + ok_requests).max(1) as f64;
        let held_mean_ms = (c1.held_ms - c0.held_ms) as f64 / held.max(1) as f64;
        let per_s = |n: u64, s: f64| thousands((n as f64 / s) as u64);
        let total = counters(&metrics).accepted;
        let ended = Instant::now();
        let lags = stage_lags(&rt, &app);
        let caught_up = wait_for(SUSTAIN_DRAIN_MAX, || {
            let c = counters(&metrics);
            c.processed >= total && (!archive || c.archived >= total)
        });
        let drained = match caught_up {
            Some(_) => format!("{:.1} s", ended.elapsed().as_secs_f64()),
            None => format!("NOT within {} s", SUSTAIN_DRAIN_MAX.as_secs()),
        };
        let late = metrics.late_readings.load(Ordering::Relaxed);
        let shutdown = if caught_up.is_some() {
            let t = Instant::now();
            rt.block_on(app.shutdown());
            format!("{:.1} s", t.elapsed().as_secs_f64())
        } else {
            drop(app);
            "skipped".to_owned()
        };
        println!(
            "  {label}  filling {:>8}/s for {:4.1} s{} | sustained {:>8} readings/s accepted, \
             {:5.1} % of requests refused (503), {:.0} % held for room (mean {:.0} ms); stream \
             {}/s, archive {}/s; {} late of {} accepted; drained {drained}, shutdown {shutdown}{}",
            per_s(fill_counters.accepted, fill_time.as_secs_f64()),
            fill_time.as_secs_f64(),
            if filled { "" } else { " (never full)" },
            per_s(accepted, secs),
            refused_pct,
            held_pct,
            held_mean_ms,
            per_s(c1.processed - c0.processed, secs),
            per_s(c1.archived - c0.archived, secs),
            thousands(late),
            thousands(total),
            if load.errors > 0 {
                format!(" ({} requests failed)", load.errors)
            } else {
                String::new()
            },
        );
        println!("      CPU while sustained, by thread: {cpu}");
        println!("      stage lags as the load ended (records not committed): {lags}");
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

// ------------------------------------------------------------------- kafka --

/// Sending before the measured window of the Kafka path.
const KAFKA_WARMUP: Duration = Duration::from_secs(5);
/// The measured window of the Kafka path (sending goes on through it).
const KAFKA_MEASURE: Duration = Duration::from_secs(25);
/// The longest wait for segs's stages (or the raw consumer) to catch up.
const KAFKA_DRAIN_MAX: Duration = Duration::from_secs(240);
/// The Kafka path's pool: 2,000 meters x 750 ticks every 10 s, 1,500,000
/// readings. Few meters, so that event time runs well ahead of wall time at
/// a few thousand readings/s (what Tansu takes one record per batch): the
/// 1-minute windows close while it runs, as in a steady state, and the
/// shutdown flushes one open window per meter and width only. (With 20,000
/// meters a 30 s run saw about 3 ticks; every meter's window was still open
/// at the end, and the shutdown published one aggregate per meter and width
/// for every 3 readings.)
const KAFKA_METERS: u32 = 2_000;
const KAFKA_TICKS: u64 = 750;

/// The `[kafka.client]` settings of segs's Kafka tests (host/tests/e2e.rs
/// `on_kafka`), used by both sides here: Tansu 0.6 misnumbers offsets when
/// a fetch starts inside a multi-record batch, so one record per batch.
const TANSU_CLIENT: [(&str, &str); 1] = [("batch.num.messages", "1")];

fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Whether something accepts TCP connections at the first of `brokers`.
fn broker_answers(brokers: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let Ok(addrs) = first.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// CPU time of the processes named `comm` (the local broker), ns; 0 when
/// there is none (a remote broker).
fn process_cpu_ns(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for e in dir.flatten() {
        let p = e.path();
        if !std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == comm) {
            continue;
        }
        let ns = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|stat| {
                // utime + stime in clock ticks (USER_HZ, 100 on Linux).
                let rest = &stat[stat.rfind(')')? + 1..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 =
                    f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                Some(ticks * 10_000_000)
            })
            .unwrap_or(0);
        total += ns;
    }
    total
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The broker's name in /proc (Tansu here).
const BROKER_COMM: &str = "tansu";

/// segs on Kafka, then raw rdkafka on the same broker, in one run.
fn kafka_path() {
    let brokers = kafka_brokers();
    if !broker_answers(&brokers) {
        println!(
            "Kafka path: skipped: no broker answers at {brokers} (KAFKA_BROKERS; \
             `cargo xtask services start` starts Tansu)"
        );
        return;
    }
    if !plugin_path("anomaly").exists() {
        println!("Kafka path: skipped (run `cargo xtask build-plugins`)");
        return;
    }
    let pool = HttpPool::simulate(KAFKA_METERS, KAFKA_TICKS, 13);
    let generator = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("loadgen")
        .enable_all()
        .build()
        .expect("tokio runtime");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let namespace = format!("bench{}-", &run[..12]);
    let shipped = PipelineConfig::load(&root().join("pipeline.toml")).expect("pipeline.toml");
    println!(
        "Kafka path on the broker at {brokers} (Tansu here, not Apache Kafka; fresh topics in \
         namespace {namespace}; {} partitions; client settings of segs's Kafka tests: \
         batch.num.messages = 1, linger.ms = {}, idempotent producer, acks = all; no transactions). \
         Pool: {} meters x {} ticks every 10 s = {} distinct readings, 1,000 per body (~{} KiB):",
        shipped.bus.partitions,
        shipped.kafka.linger_ms,
        thousands(u64::from(KAFKA_METERS)),
        KAFKA_TICKS,
        thousands(pool.readings as u64),
        pool.body_kib,
    );
    let Some(segs) = kafka_segs(&pool, &generator, &brokers, &namespace, &shipped) else {
        return;
    };
    generator.shutdown_timeout(Duration::from_secs(1));
    let Some(raw) = kafka_raw(
        &pool,
        segs.accepted as usize,
        &brokers,
        &namespace,
        &shipped,
    ) else {
        return;
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "  side by side, {} readings each, same broker, same run:\n    \
         segs, HTTP -> all stored   {:>9} readings/s  (first send until all in raw_readings and \
         aggregates_1m, shutdown flush included)\n    \
         raw rdkafka, produce+consume {:>7} readings/s  (first produce until all consumed)\n    \
         ratio segs / raw           {:>9.2}  (aim: >= 0.80)\n    \
         segs accepted (a burst: below the bus's lag bound, nothing refused; the end-to-end \
         line above is the figure a user gets) {:>9} readings/s  vs raw produce acked {} \
         readings/s: ratio {:.2}",
        thousands(segs.accepted),
        thousands(segs.end_to_end_per_s as u64),
        thousands(raw.end_to_end_per_s as u64),
        ratio(segs.end_to_end_per_s, raw.end_to_end_per_s),
        thousands(segs.sustained_per_s as u64),
        thousands(raw.produced_per_s as u64),
        ratio(segs.sustained_per_s, raw.produced_per_s),
    );
}

struct KafkaSegs {
    /// Readings accepted (2xx) over the whole run.
    accepted: u64,
    /// Accepted readings/s in the measured window.
    sustained_per_s: f64,
    /// Accepted readings / (first send until all stored).
    end_to_end_per_s: f64,
}

/// One row of the progress table.
fn progress_row(t: Duration, c: &Counters, prev: Option<&(Duration, Counters)>) -> String {
    let rate = |now: u64, was: u64| match prev {
        Some((t0, _)) if t > *t0 => {
            thousands(((now - was) as f64 / (t - *t0).as_secs_f64()) as u64)
        }
        _ => "-".to_owned(),
    };
    let p = prev.map_or(
        Counters {
            accepted: 0,
            refused: 0,
            held: 0,
            held_ms: 0,
            processed: 0,
            archived: 0,
        },
        |(_, c)| *c,
    );
    format!(
        "    {:5.1} s  accepted {:>9} ({:>7}/s)  stream {:>9} ({:>7}/s)  archive {:>9} ({:>7}/s)  \
         503s {}",
        t.as_secs_f64(),
        thousands(c.accepted),
        rate(c.accepted, p.accepted),
        thousands(c.processed),
        rate(c.processed, p.processed),
        thousands(c.archived),
        rate(c.archived, p.archived),
        c.refused,
    )
}

/// segs on Kafka, end to end: the shipped configuration with `bus.kind =
/// kafka` and a temporary SQLite store; HTTP load until KAFKA_WARMUP +
/// KAFKA_MEASURE, then the wait until every accepted reading is stored.
fn kafka_segs(
    pool: &HttpPool,
    generator: &tokio::runtime::Runtime,
    brokers: &str,
    namespace: &str,
    shipped: &PipelineConfig,
) -> Option<KafkaSegs> {
    use segs::config::BusKind;
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = pipeline_config(
        dir.path(),
        shipped.store.archive_raw_readings,
        shipped.bus.max_lag_per_partition,
    );
    cfg.bus.kind = BusKind::Kafka;
    cfg.kafka.brokers = brokers.to_owned();
    cfg.kafka.namespace = namespace.to_owned();
    for (k, v) in TANSU_CLIENT {
        cfg.kafka.client.insert(k.into(), v.into());
    }
    let rt = app_runtime();
    let app = match rt.block_on(App::start(cfg, "127.0.0.1:0".parse().expect("addr"))) {
        Ok(app) => app,
        Err(e) => {
            println!("  segs on Kafka: skipped: App::start failed: {e}");
            return None;
        }
    };
    let metrics = app.ctx.metrics.clone();
    let store = app.ctx.store.clone();
    let url = format!("http://{}/telemetry/batch", app.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let (load, (mut samples, window)) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut samples = vec![(Duration::ZERO, counters(&metrics))];
            let mut window = None;
            let mut from = None;
            for s in 1.. {
                let next = Duration::from_secs(s);
                std::thread::sleep(next.saturating_sub(start.elapsed()));
                let (t, c) = (start.elapsed(), counters(&metrics));
                samples.push((t, c));
                if from.is_none() && t >= KAFKA_WARMUP {
                    from = Some((t, c, thread_cpu(), process_cpu_ns(BROKER_COMM)));
                }
                if t >= KAFKA_WARMUP + KAFKA_MEASURE {
                    stop.store(true, Ordering::Relaxed);
                    let (t0, c0, cpu0, broker0) = from.take().expect("warm-up sample");
                    let broker_s = process_cpu_ns(BROKER_COMM).saturating_sub(broker0) as f64 / 1e9;
                    window = Some((t - t0, c0, c, cpu_since(&cpu0), broker_s));
                    break;
                }
            }
            (samples, window.expect("measured window"))
        });
        let load = send_load(
            generator,
            &url,
            &pool.bodies,
            Sending::UntilAccepted,
            KAFKA_WARMUP + KAFKA_MEASURE * 2,
            &stop,
        );
        (load, watcher.join().expect("watcher"))
    });
    let sent_at = start.elapsed();
    let total = metrics.accepted.load(Ordering::Relaxed);
    // Drain: until every stage consuming telemetry-readings has it all.
    let mut drained = None;
    while start.elapsed() < sent_at + KAFKA_DRAIN_MAX {
        let next = Duration::from_secs(samples.len() as u64);
        std::thread::sleep(next.saturating_sub(start.elapsed()));
        let c = counters(&metrics);
        samples.push((start.elapsed(), c));
        if c.processed >= total && c.archived >= total {
            drained = Some(start.elapsed());
            break;
        }
    }
    let (wall, c0, c1, cpu, broker_s) = window;
    let secs = wall.as_secs_f64();
    let accepted = c1.accepted - c0.accepted;
    let refused = c1.refused - c0.refused;
    let refused_pct = 100.0 * refused as f64 / (refused + accepted / BATCH as u64).max(1) as f64;
    let sustained_per_s = accepted as f64 / secs;
    let per_s = |n: u64| thousands((n as f64 / secs) as u64);
    println!(
        "  segs on Kafka, end to end (App::start on the shipped pipeline.toml, bus.kind = kafka, \
         SQLite store, raw archive on, every stage and rule; the HTTP generator above, \
         {CONNECTIONS} connections, a refused body re-sent after {} ms; {} s warm-up, {} s \
         measured):",
        RETRY_PAUSE.as_millis(),
        KAFKA_WARMUP.as_secs(),
        KAFKA_MEASURE.as_secs(),
    );
    println!(
        "    measured: {:>9} readings/s accepted (2xx), {:.1} % of requests refused (503); \
         meanwhile stream {}/s, archive {}/s{}",
        thousands(sustained_per_s as u64),
        refused_pct,
        per_s(c1.processed - c0.processed),
        per_s(c1.archived - c0.archived),
        if load.exhausted {
            " (POOL RAN OUT before the end: figures are low)"
        } else {
            ""
        },
    );
    println!("    time to ack at ingest (whole send): {}", load.summary());
    println!(
        "    CPU in the measured window: {} | broker ({BROKER_COMM}) {:.2} cores",
        cpu.cores(wall),
        broker_s / secs,
    );
    println!("    progress (counters: readings; 503s: requests refused):");
    let mut prev: Option<&(Duration, Counters)> = None;
    let last = samples.len() - 1;
    for (i, s) in samples.iter().enumerate() {
        if i == 0 || (i % 5 != 0 && i != last) {
            continue;
        }
        println!("{}", progress_row(s.0, &s.1, prev));
        prev = Some(s);
    }
    let Some(drained) = drained else {
        println!(
            "    NOT drained within {} s of the last request: end-to-end figure skipped",
            KAFKA_DRAIN_MAX.as_secs()
        );
        drop(app);
        rt.shutdown_timeout(Duration::from_secs(1));
        return None;
    };
    let in_1m_before = rt.block_on(store.count_readings_1m()).unwrap_or(0);
    let shutdown_from = Instant::now();
    rt.block_on(app.shutdown());
    let shutdown = shutdown_from.elapsed();
    let stored_at = start.elapsed();
    let in_1m = rt.block_on(store.count_readings_1m()).unwrap_or(0);
    let raw = rt.block_on(store.count_raw_readings()).unwrap_or(0);
    let late = metrics.late_readings.load(Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_secs(1));
    let end_to_end_per_s = total as f64 / stored_at.as_secs_f64();
    println!(
        "    {} readings accepted in {:.1} s of sending; stream and archive drained {:.1} s after \
         the last request ({} in aggregates_1m then: the open windows close at shutdown); \
         shutdown (closes, stores and publishes the open windows) {:.1} s; then aggregates_1m \
         counts {} and raw_readings {}{}; {late} late readings merged",
        thousands(total),
        sent_at.as_secs_f64(),
        (drained - sent_at).as_secs_f64(),
        thousands(in_1m_before),
        shutdown.as_secs_f64(),
        thousands(in_1m),
        thousands(raw),
        if in_1m == total && raw == total {
            " (all)"
        } else {
            " (NOT all accepted readings)"
        },
    );
    println!(
        "    first send until all stored: {:.1} s, {} readings/s end to end",
        stored_at.as_secs_f64(),
        thousands(end_to_end_per_s as u64),
    );
    let all = stored_at.as_secs_f64();
    let stream_rate = (c1.processed - c0.processed) as f64 / secs;
    let archive_rate = (c1.archived - c0.archived) as f64 / secs;
    let (slowest, slowest_rate) = if stream_rate <= archive_rate {
        ("stream stage", stream_rate)
    } else {
        ("raw archive", archive_rate)
    };
    println!(
        "    where the time goes: sending {:.1} s ({:.0} %), draining after the last request {:.1} s ({:.0} %), shutdown flush {:.1} s ({:.0} %); in the measured window the slowest consumer of telemetry-readings was the {slowest} ({}/s, ingest accepted {:.2}x that){}",
        sent_at.as_secs_f64(),
        100.0 * sent_at.as_secs_f64() / all,
        (drained - sent_at).as_secs_f64(),
        100.0 * (drained - sent_at).as_secs_f64() / all,
        shutdown.as_secs_f64(),
        100.0 * shutdown.as_secs_f64() / all,
        thousands(slowest_rate as u64),
        sustained_per_s / slowest_rate.max(1.0),
        if refused > 0 {
            "; 503s mean the bus's lag bound (max_lag_per_partition) was reached"
        } else {
            ""
        },
    );
    Some(KafkaSegs {
        accepted: total,
        sustained_per_s,
        end_to_end_per_s,
    })
}

struct KafkaRaw {
    /// Readings / (first produce until every delivery acknowledged).
    produced_per_s: f64,
    /// Readings / (first produce until the consumer saw them all).
    end_to_end_per_s: f64,
}

/// Raw rdkafka on the same broker: the first `n` readings of the pool as
/// ingest publishes them (the same JSON values, keyed by meter id, partition
/// by murmur2 set on each record), produced by CONNECTIONS tasks 1,000 at a
/// time with a `FutureProducer` configured as segs's, and consumed back by
/// a `StreamConsumer` in a consumer group (manual commits every POLL_MAX).
fn kafka_raw(
    pool: &HttpPool,
    n: usize,
    brokers: &str,
    namespace: &str,
    shipped: &PipelineConfig,
) -> Option<KafkaRaw> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Message, Offset, TopicPartitionList};

    if n == 0 {
        return None;
    }
    let received_at = segs::time::format_rfc3339_ms(now_ms());
    let mut records: Vec<(Bytes, Bytes)> = Vec::with_capacity(n);
    'bodies: for body in pool.bodies.iter() {
        let v = validate::validate_batch(body, BATCH, validate::TimeBounds::UNBOUNDED)
            .expect("simulator output is valid");
        for r in &v.readings {
            if records.len() >= n {
                break 'bodies;
            }
            let mut value = Vec::with_capacity(320);
            validate::write_published(r, &received_at, &mut value);
            records.push((
                Bytes::copy_from_slice(r.meter_id.as_bytes()),
                Bytes::from(value),
            ));
        }
    }
    let n = records.len();
    let value_bytes: usize = records.iter().map(|(_, v)| v.len()).sum();
    let records = Arc::new(records);
    let partitions = shipped.bus.partitions;
    let topic = format!("{namespace}raw-telemetry-readings");
    let base = || {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        for (k, v) in TANSU_CLIENT {
            c.set(k, v);
        }
        c
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("raw-kafka")
        .enable_all()
        .build()
        .expect("tokio runtime");
    let in_rt = rt.enter();
    let admin: AdminClient<DefaultClientContext> = base().create().expect("admin client");
    let retention = shipped.kafka.retention_ms.to_string();
    let created = rt.block_on(
        admin.create_topics(
            &[
                NewTopic::new(&topic, partitions as i32, TopicReplication::Fixed(1))
                    .set("retention.ms", &retention),
            ],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ),
    );
    if let Err(e) = created.map_err(|e| e.to_string()).and_then(|mut r| {
        r.pop()
            .unwrap_or(Ok(String::new()))
            .map_err(|(_, c)| c.to_string())
    }) {
        println!("  raw rdkafka: skipped: cannot create {topic}: {e}");
        return None;
    }
    let producer: FutureProducer = base()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", shipped.kafka.linger_ms.to_string())
        .create()
        .expect("producer");
    let consumer: StreamConsumer = base()
        .set("group.id", format!("{namespace}raw-group"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic.as_str()]).expect("subscribe");

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let consume = {
        let topic = topic.clone();
        rt.spawn(async move {
            // Join the group before anything is produced (segs's stages have
            // joined theirs when App::start returns).
            let joined = Instant::now();
            while consumer.assignment().map_or(0, |a| a.count()) < partitions as usize
                && joined.elapsed() < Duration::from_secs(30)
            {
                let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
            }
            let _ = ready_tx.send(());
            let mut seen = 0usize;
            let mut next: HashMap<i32, i64> = HashMap::new();
            let mut since_commit = 0;
            let mut errors = 0u64;
            let commit = |next: &HashMap<i32, i64>| {
                let mut tpl = TopicPartitionList::new();
                for (&p, &o) in next {
                    let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
                }
                let _ = consumer.commit(&tpl, CommitMode::Async);
            };
            while seen < n {
                match tokio::time::timeout(KAFKA_DRAIN_MAX, consumer.recv()).await {
                    Err(_) => break,
                    Ok(Err(_)) if errors >= 1000 => break,
                    Ok(Err(_)) => errors += 1,
                    Ok(Ok(m)) => {
                        black_box(m.payload().map(<[u8]>::len));
                        next.insert(m.partition(), m.offset() + 1);
                        seen += 1;
                        since_commit += 1;
                        if since_commit >= POLL_MAX {
                            commit(&next);
                            since_commit = 0;
                        }
                    }
                }
            }
            let done = Instant::now();
            commit(&next);
            (seen, errors, done)
        })
    };
    if rt
        .block_on(tokio::time::timeout(Duration::from_secs(40), ready_rx))
        .is_err()
    {
        println!("  raw rdkafka: skipped: the consumer did not start");
        return None;
    }
    let cpu0 = thread_cpu();
    let broker0 = process_cpu_ns(BROKER_COMM);
    let start = Instant::now();
    let ts = now_ms();
    let chunks = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (producer, records, chunks, topic) = (
                producer.clone(),
                records.clone(),
                chunks.clone(),
                topic.clone(),
            );
            rt.spawn(async move {
                let mut failed = 0u64;
                loop {
                    let first = chunks.fetch_add(1, Ordering::Relaxed) * BATCH;
                    if first >= records.len() {
                        break;
                    }
                    let chunk = &records[first..(first + BATCH).min(records.len())];
                    let mut pending = Vec::with_capacity(chunk.len());
                    for (k, v) in chunk {
                        let p = segs::bus::partition_for(k, partitions) as i32;
                        loop {
                            let record = FutureRecord::to(&topic)
                                .key(&k[..])
                                .payload(&v[..])
                                .partition(p)
                                .timestamp(ts);
                            // A full local queue is waited out (segs's
                            // produce refuses the request instead).
                            let queue_full = match producer.send_result(record) {
                                Ok(d) => {
                                    pending.push(d);
                                    false
                                }
                                Err((
                                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                    _,
                                )) => true,
                                Err((e, _)) => panic!("produce: {e}"),
                            };
                            if !queue_full {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    for d in pending {
                        if !matches!(d.await, Ok(Ok(_))) {
                            failed += 1;
                        }
                    }
                }
                failed
            })
        })
        .collect();
    let failed: u64 = rt.block_on(async {
        let mut failed = 0;
        for t in tasks {
            failed += t.await.expect("producer task");
        }
        failed
    });
    let produced = start.elapsed();
    let (seen, errors, done) = rt.block_on(consume).expect("consumer task");
    let consumed = done.saturating_duration_since(start);
    let cpu = cpu_since(&cpu0);
    let broker_s = process_cpu_ns(BROKER_COMM).saturating_sub(broker0) as f64 / 1e9;
    drop(producer);
    drop(in_rt);
    rt.shutdown_timeout(Duration::from_secs(1));
    let produced_per_s = n as f64 / produced.as_secs_f64();
    let end_to_end_per_s = seen as f64 / consumed.as_secs_f64();
    println!(
        "  raw rdkafka on the same broker (the first {} accepted-equivalent readings as ingest \
         publishes them, ~{} B each, keyed by meter id, murmur2 partition set; FutureProducer as \
         segs's, {CONNECTIONS} tasks x 1,000 records; StreamConsumer in a group, commits every \
         {POLL_MAX}):",
        thousands(n as u64),
        value_bytes / n.max(1),
    );
    println!(
        "    produced (all acked) in {:.1} s: {} readings/s; consumed {} of {} in {:.1} s from the \
         first produce: {} readings/s end to end{}{}",
        produced.as_secs_f64(),
        thousands(produced_per_s as u64),
        thousands(seen as u64),
        thousands(n as u64),
        consumed.as_secs_f64(),
        thousands(end_to_end_per_s as u64),
        if failed > 0 {
            format!("; {failed} deliveries FAILED")
        } else {
            String::new()
        },
        if errors > 0 {
            format!("; {errors} consumer errors")
        } else {
            String::new()
        },
    );
    println!(
        "    CPU: {} | broker ({BROKER_COMM}) {:.2} cores",
        cpu.cores(consumed),
        broker_s / consumed.as_secs_f64(),
    );
    Some(KafkaRaw {
        produced_per_s,
        end_to_end_per_s,
    })
}

// ------------------------------------------------------------------- store --

/// Rows per write call: what the archive and stream stages hand the store
/// per poll (`pipeline::POLL_MAX`).
const STORE_BATCH: usize = POLL_MAX;
/// Meters in the store benchmark's data set.
const STORE_METERS: usize = 10_000;

/// Rows/s written through the `Store` seam (the same calls the archive and
/// stream stages make, one transaction per call) into SQLite (a file, the
/// shipped default) and PostgreSQL (`SEGS_TEST_POSTGRES_URL`, default the
/// local server; skipped when it does not answer), in the same run: raw
/// readings (`archive_records`, the archive stage's call: new readings as
/// ingest publishes them; rows in PostgreSQL, batches in a SQLite file)
/// and 1-minute aggregates
/// (`upsert_meter_aggregates`, new windows, then the same windows again —
/// the merge path of a late reading).
fn store_writes() {
    println!(
        "\nstore writes through the Store seam, {STORE_BATCH} rows per call (one transaction), \
         {STORE_METERS} meters:"
    );
    let rt = app_runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let sqlite = segs::store::open(&sqlite_url).await.expect("SQLite store");
        let sqlite_figures = store_figures("SQLite", &*sqlite).await;
        let Some((pg_url, admin, name)) = bench_postgres_database().await else {
            println!("  PostgreSQL: skipped (no server answers; `cargo xtask services start`)");
            return;
        };
        let pg = segs::store::open(&pg_url).await.expect("PostgreSQL store");
        let pg_figures = store_figures("PostgreSQL", &*pg).await;
        drop(pg);
        drop_bench_database(&admin, &name).await;
        println!(
            "  PostgreSQL / SQLite: raw {:.2}, 1m new {:.2}, 1m merge {:.2}; \
             raw archive on PostgreSQL vs 500,000 readings/s of ingest: {:.2}",
            pg_figures.0 / sqlite_figures.0,
            pg_figures.1 / sqlite_figures.1,
            pg_figures.2 / sqlite_figures.2,
            pg_figures.0 / 500_000.0
        );
    });
}

/// Measures one store; returns rows/s (raw, 1m new, 1m merge), medians.
async fn store_figures(label: &str, store: &dyn segs::store::Store) -> (f64, f64, f64) {
    use segs::store::{MeterAggregate, RawRecord, WindowWidth};
    let regions = [
        "Mumbai-North",
        "Delhi-South",
        "Bangalore-East",
        "Chennai-West",
    ];
    let meters: Vec<String> = (0..STORE_METERS)
        .map(|m| format!("MTR-{:08}", m + 1))
        .collect();
    // Raw readings: each round a fresh minute of 6 readings per meter, as
    // ingest publishes them, handed over as the archive stage does (a
    // poll's records of three partitions, offsets running on).
    let mut raw_rates = Vec::new();
    let mut next_offset = [0u64; 3];
    for round in 0..PASSES {
        let base = START_MS + round as i64 * 60_000;
        let records: Vec<RawRecord> = (0..6)
            .flat_map(|t| meters.iter().enumerate().map(move |(m, id)| (t, m, id)))
            .map(|(t, m, id)| {
                let ts = segs::time::format_rfc3339_ms(base + t * 10_000);
                let value = format!(
                    r#"{{"readingId":"r-{round}-{t}-{m}","meterId":"{id}","timestamp":"{ts}","powerKw":{},"voltage":230.0,"current":4.3,"frequency":50.0,"powerFactor":0.95,"temperature":28.5,"energyKwh":0.003,"region":"{}","receivedAt":"{ts}"}}"#,
                    1.0 + (m % 97) as f64 * 0.1,
                    regions[m % regions.len()],
                );
                let partition = m % 3;
                next_offset[partition] += 1;
                RawRecord {
                    partition: partition as u32,
                    offset: next_offset[partition] - 1,
                    value: value.into_bytes().into(),
                }
            })
            .collect();
        let started = Instant::now();
        for chunk in records.chunks(STORE_BATCH) {
            let stored = store
                .archive_records("bench-log", chunk.into())
                .await
                .expect("raw archive");
            assert_eq!(stored, chunk.len() as u64, "every reading archived");
        }
        raw_rates.push(records.len() as f64 / started.elapsed().as_secs_f64());
    }
    // 1-minute aggregates: each round a fresh minute per meter, then the
    // same minute again (merged into the stored rows).
    let (mut new_rates, mut merge_rates) = (Vec::new(), Vec::new());
    for round in 0..PASSES {
        let window = START_MS + (100 + round as i64) * 60_000;
        let aggs: Vec<MeterAggregate> = meters
            .iter()
            .enumerate()
            .map(|(m, id)| MeterAggregate {
                meter_id: id.clone(),
                region: regions[m % regions.len()].to_owned(),
                window_start_ms: window,
                avg_power_kw: 2.0,
                max_power_kw: 3.0,
                min_power_kw: 1.0,
                energy_kwh_sum: 0.02,
                voltage_avg: Some(230.0),
                count: 6,
                power_sum: 12.0,
                voltage_sum: 1380.0,
                voltage_count: 6,
            })
            .collect();
        for rates in [&mut new_rates, &mut merge_rates] {
            let started = Instant::now();
            for chunk in aggs.chunks(STORE_BATCH) {
                store
                    .upsert_meter_aggregates(WindowWidth::OneMinute, chunk)
                    .await
                    .expect("1m upsert");
            }
            rates.push(aggs.len() as f64 / started.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (raw, new, merge) = (
        median(&mut raw_rates),
        median(&mut new_rates),
        median(&mut merge_rates),
    );
    println!(
        "  {label:<10} raw_readings {:>9}/s (best {:>9}) | aggregates_1m new {:>9}/s (best {:>9}) \
         | merged {:>9}/s (best {:>9})",
        thousands(raw as u64),
        thousands(best(&raw_rates) as u64),
        thousands(new as u64),
        thousands(best(&new_rates) as u64),
        thousands(merge as u64),
        thousands(best(&merge_rates) as u64),
    );
    (raw, new, merge)
}

/// A fresh PostgreSQL database for the store benchmark: (URL, admin URL,
/// name), or `None` when no server answers.
async fn bench_postgres_database() -> Option<(String, String, String)> {
    use sqlx::{Connection, Executor, PgConnection};
    let admin = std::env::var("SEGS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = PgConnection::connect(&admin).await.ok()?;
    let name = format!("segs_bench_{}", std::process::id());
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .ok()?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .ok()?;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some((format!("{base}/{name}"), admin, name))
}

async fn drop_bench_database(admin: &str, name: &str) {
    use sqlx::{Connection, Executor, PgConnection};
    if let Ok(mut conn) = PgConnection::connect(admin).await {
        let _ = conn
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    }
}
