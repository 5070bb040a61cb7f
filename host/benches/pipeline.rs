//! `cargo xtask bench`: what segs costs, measured (never asserted).
//!
//! Each benchmark runs several rounds and prints the best and the median, so
//! a noisy neighbour on this 2-core machine shows as spread, not as a wrong
//! figure. Filter by name: `cargo xtask bench anomaly`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use segs::plugins::{AnomalyRule, Limits, Runtime, anomaly::ReadingBatch};

const ROUNDS: usize = 9;

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    println!("segs benchmarks ({} rounds each; best / median)", ROUNDS);
    if wanted("anomaly") {
        anomaly_native_vs_wasm();
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

fn plugin_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/plugins/{name}.wasm"))
}

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

    let rt = Runtime::new(Limits::default()).expect("wasmtime runtime");
    let path = plugin_path("anomaly");
    let mut rule = match AnomalyRule::load(&rt, "anomaly", &path, vec![]) {
        Ok(r) => r,
        Err(e) => {
            println!("anomaly: skipped: {e} (run `cargo xtask build-plugins`)");
            return;
        }
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
