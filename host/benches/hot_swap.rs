//! `cargo xtask bench swap`: how long a hot swap takes, measured (never
//! asserted).
//!
//! For each rule, a new build of its component (the shipped one with a
//! custom section appended, so a new sha256 and a real compile every time)
//! goes through everything a `PUT /admin/plugins/{name}` does after the body
//! is read — compile, world check, instantiate, configure, sample, install —
//! and then the next call on a stage's handle, which switches to it
//! (instance rebuilt from the new version). Printed: the best and the median
//! of several rounds, for the swap alone and until the new version has
//! served its first batch. HTTP, authentication and reading the body are
//! not included.
//!
//! Then the cost of swaps on throughput: the embedded app (`App::start`, the
//! shipped pipeline.toml with a temporary store) fed the simulator's stream
//! (10,000 meters) over HTTP on 4 connections as fast as it answers, a
//! refused body re-sent after 20 ms (not after `Retry-After`, which would
//! measure the client's patience), once without swaps and once with the
//! tariff and anomaly rules swapped (a new build each time) every second. Measured
//! for 20 s after a warm-up that lasts until ingest first holds or refuses (the bus's
//! lag bound reached, at most 40 s), so the figures are what the stages
//! sustain, not the backlog the bus takes in first: readings/s accepted and
//! processed by the stream stage, side by side. `SEGS_BENCH_TRACE=1` also
//! prints the counters every second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use segs::plugins::{
    AggregateRule, AnomalyRule, FaultPolicy, Limits, OverloadRule, Plugin, Registry, Runtime,
    TariffRule, World, aggregate, anomaly, overload, tariff,
};

const ROUNDS: usize = 15;

fn component(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/plugins/{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build-plugins`",
        path.display()
    );
    path
}

/// The component with a custom section naming round `i`.
fn build(bytes: &[u8], i: usize) -> Vec<u8> {
    let tag = format!("segs-bench-{i}");
    let mut out = bytes.to_vec();
    out.push(0);
    out.push((tag.len() + 1) as u8);
    out.push(tag.len() as u8);
    out.extend_from_slice(tag.as_bytes());
    out
}

/// Names the world type of a handle alias.
trait Handle {
    type W: World;
}
impl<W: World> Handle for Plugin<W> {
    type W = W;
}

fn report(name: &str, what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "  {name:<9} {what:<32} best {:>7.1} ms   median {:>7.1} ms",
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3
    );
}

/// Swaps `name` `ROUNDS` times; `call` runs one batch on the handle.
fn measure<W: World>(rt: &Runtime, name: &str, mut call: impl FnMut(&mut Plugin<W>)) {
    let mut registry = Registry::default();
    let path = component(name);
    let slot = registry
        .load::<W>(rt, name, &path, vec![], FaultPolicy::default())
        .unwrap();
    let mut handle = slot.instance().unwrap();
    call(&mut handle);
    let control = registry.get(name).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (mut swap, mut serving) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let new = build(&bytes, i);
        let started = Instant::now();
        control.swap(Some(&new), None, "bench".into()).unwrap();
        swap.push(started.elapsed());
        call(&mut handle);
        serving.push(started.elapsed());
        assert_eq!(handle.served_by().version, i as u64 + 2);
    }
    report(name, "swap (compile + checks)", swap);
    report(name, "until its first batch is served", serving);
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| "swap".contains(f.as_str())) {
        return;
    }
    let rt = Runtime::new(Limits::default()).unwrap();
    println!("hot swap: PUT's work after the body is read, per rule ({ROUNDS} rounds)");
    let readings = anomaly::ReadingBatch {
        power_kw: vec![5.0; 1000],
        baseline_kw: vec![5.0; 1000],
        sample_count: vec![50; 1000],
    };
    measure::<<AnomalyRule as Handle>::W>(&rt, "anomaly", |h| {
        h.detect(&readings).unwrap();
    });
    let windows = vec![
        overload::RegionWindow {
            load_percentage: 60.0,
            total_consumption: 600.0,
            capacity_kw: 1000.0,
            consecutive: 0,
        };
        4
    ];
    measure::<<OverloadRule as Handle>::W>(&rt, "overload", |h| {
        h.evaluate(&windows).unwrap();
    });
    let loads = vec![
        tariff::RegionLoad {
            load_percentage: 60.0,
            base_price: 6.5,
            last_price: 6.5,
        };
        4
    ];
    measure::<<TariffRule as Handle>::W>(&rt, "tariff", |h| {
        h.price(&loads).unwrap();
    });
    let meters = vec![
        aggregate::MeterWindow {
            count: 6,
            power_sum: 30.0,
            max_power: 6.0,
            min_power: 4.0,
            energy_sum: 0.08,
            voltage_sum: 1380.0,
            voltage_count: 6,
        };
        100
    ];
    measure::<<AggregateRule as Handle>::W>(&rt, "aggregate", |h| {
        h.finish_meters(&meters).unwrap();
    });

    println!(
        "hot swap: sustained throughput with a swap every second vs none (embedded app, shipped \
         config, HTTP; {} s after the bus's backlog filled)",
        WINDOW.as_secs()
    );
    let app_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for swapping in [false, true] {
        let (accepted, processed, swaps) = app_rt.block_on(throughput(swapping));
        println!(
            "  {:<26} {accepted:>9.0} readings/s accepted {processed:>9.0} /s processed ({swaps} swaps)",
            if swapping {
                "a swap every second"
            } else {
                "no swaps"
            }
        );
    }
}

/// The longest warm-up: sending until ingest first holds or refuses (the bus's lag
/// bound reached), so what is measured after it is what the stages sustain,
/// not the backlog the bus takes in first.
const WARMUP_MAX: Duration = Duration::from_secs(40);
/// The measured window after the warm-up.
const WINDOW: Duration = Duration::from_secs(20);
/// Connections of the load generator.
const CONNECTIONS: usize = 4;
/// The wait before a refused (503) body is sent again. A well-behaved client
/// waits `Retry-After` (the simulator does); this one keeps the pressure on,
/// so that what is accepted is what the pipeline sustains.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Posts the simulator's stream (10,000 meters, from 6 h ago, ticks as fast
/// as they are taken: never dated in the future within a run) on
/// [`CONNECTIONS`] connections until `stop`, each body re-sent after
/// [`RETRY_PAUSE`] until it is accepted.
async fn load(url: String, stop: Arc<AtomicBool>) {
    let mut sim = segs::simulator::SimConfig {
        meters: 10_000,
        phases: Vec::new(),
        ..segs::simulator::SimConfig::default()
    };
    sim.start_ms = segs::time::window_start(
        segs::time::now_ms() - 6 * 3_600_000,
        segs::windows::FIFTEEN_MINUTES_MS,
    );
    let sim = Arc::new(std::sync::Mutex::new((
        segs::simulator::Simulator::new(sim).unwrap(),
        std::collections::VecDeque::new(),
    )));
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (sim, client, url, stop) = (sim.clone(), client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let body = {
                        let mut guard = sim.lock().unwrap();
                        let (sim, queue) = &mut *guard;
                        if queue.is_empty() {
                            queue.extend(sim.next_batches(1000).into_iter().map(|b| b.body));
                        }
                        queue.pop_front().unwrap()
                    };
                    let body = bytes::Bytes::from(body);
                    while !stop.load(Ordering::Relaxed) {
                        let sent = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status().is_success() => break,
                            _ => tokio::time::sleep(RETRY_PAUSE).await,
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Readings/s accepted and processed over [`WINDOW`] after the warm-up, and
/// the swaps made in it.
async fn throughput(swapping: bool) -> (f64, f64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cfg = segs::config::PipelineConfig::load(&root.join("pipeline.toml")).unwrap();
    cfg.store.url = format!("sqlite://{}", dir.path().join("segs.db").display());
    cfg.bus.path = dir.path().join("segs-bus.db");
    let app = segs::app::App::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let registry = app.registry.clone().unwrap();
    let metrics = app.ctx.metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let sending = tokio::spawn(load(
        format!("http://{}/telemetry/batch", app.addr),
        stop.clone(),
    ));
    let builds: Vec<(&str, Vec<u8>)> = ["tariff", "anomaly"]
        .iter()
        .map(|n| (*n, std::fs::read(component(n)).unwrap()))
        .collect();
    let mut swaps = 0;
    let counts = || {
        (
            Instant::now(),
            metrics.accepted.load(Ordering::Relaxed),
            metrics.readings_processed.load(Ordering::Relaxed),
        )
    };
    let started = Instant::now();
    let mut from = None;
    let (t1, a1, p1) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if std::env::var_os("SEGS_BENCH_TRACE").is_some() {
            let (_, a, p) = counts();
            eprintln!(
                "  {:5.1} s: accepted {a}, processed {p}, refused {}, swaps {swaps}",
                started.elapsed().as_secs_f64(),
                metrics.refused_busy.load(Ordering::Relaxed)
            );
        }
        if from.is_none()
            && (metrics.refused_busy.load(Ordering::Relaxed) > 0
                || metrics.held_requests.load(Ordering::Relaxed) > 0
                || started.elapsed() >= WARMUP_MAX)
        {
            from = Some((counts(), swaps));
        }
        if let Some(((t0, _, _), _)) = from {
            if t0.elapsed() >= WINDOW {
                break counts();
            }
        }
        if swapping {
            for (name, bytes) in &builds {
                let slot = registry.get(name).unwrap().clone();
                let new = build(bytes, 1000 + swaps);
                tokio::task::spawn_blocking(move || slot.swap(Some(&new), None, "bench".into()))
                    .await
                    .unwrap()
                    .unwrap();
                swaps += 1;
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = sending.await;
    app.shutdown().await;
    let ((t0, a0, p0), swaps0) = from.expect("measured after the warm-up");
    let secs = (t1 - t0).as_secs_f64();
    (
        (a1 - a0) as f64 / secs,
        (p1 - p0) as f64 / secs,
        swaps - swaps0,
    )
}
