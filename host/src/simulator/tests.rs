//! Tests of the simulator: the generated stream (determinism, ranges, the
//! seed's meter model, phases, validity against ingest's validation) and the
//! sender against a small in-test HTTP server.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::value::RawValue;

use super::*;
use crate::ingest::validate::{MAX_BATCH, TimeBounds, validate_batch};

const START: &str = "2025-11-12T06:30:00.000Z";

fn start_ms() -> i64 {
    crate::time::parse_rfc3339_ms(START).expect("start")
}

fn cfg(meters: u32) -> SimConfig {
    SimConfig {
        meters,
        seed: 7,
        start_ms: start_ms(),
        ..SimConfig::default()
    }
}

fn sim(cfg: SimConfig) -> Simulator {
    Simulator::new(cfg).expect("valid config")
}

/// The bodies of the next `ticks` ticks.
fn bodies(s: &mut Simulator, ticks: u64, max_batch: usize) -> Vec<Vec<u8>> {
    (0..ticks)
        .flat_map(|_| s.next_batches(max_batch))
        .map(|b| b.body)
        .collect()
}

/// Each reading of a body as its fields' JSON text.
fn fields(body: &[u8]) -> Vec<HashMap<String, &RawValue>> {
    serde_json::from_slice(body).expect("a JSON array of objects")
}

fn num(v: &RawValue) -> f64 {
    v.get()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {}", v.get()))
}

fn decimals(v: &RawValue) -> usize {
    v.get().split_once('.').map_or(0, |(_, d)| d.len())
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = bodies(&mut sim(cfg(25)), 4, 10);
    let b = bodies(&mut sim(cfg(25)), 4, 10);
    assert_eq!(a, b);
    assert_eq!(
        a.len(),
        12,
        "25 meters in batches of 10: 3 batches per tick"
    );
    let c = bodies(&mut sim(SimConfig { seed: 8, ..cfg(25) }), 4, 10);
    assert_ne!(a, c);
    // More meters do not change the readings of the first ones.
    let mut wide = sim(cfg(50));
    let mut narrow = sim(cfg(25));
    let (w, n) = (wide.next_tick(), narrow.next_tick());
    assert_eq!(w.readings[..25], n.readings[..]);
}

#[test]
fn the_stream_is_pinned_across_versions() {
    // A change here changes every seeded stream users may have recorded.
    let s = sim(cfg(3));
    let mut out = Vec::new();
    s.write_reading(&s.reading(1, 0).expect("meter"), &mut out);
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        r#"{"readingId":"c51a0bb0-83e1-4253-8f71-8e7ed6303cef","meterId":"MTR-00000002","userId":"USR-00000001","timestamp":"2025-11-12T06:30:00.000Z","powerKw":7.174,"energyKwh":0.0199,"voltage":223.2,"region":"Delhi-South","seq":1,"status":"OK","metadata":{"mode":"normal","baseLoad":6.9}}"#
    );
}

#[test]
fn the_seeds_meter_model() {
    let s = sim(cfg(9));
    let m = |i| s.meter(i).expect("meter");
    assert_eq!(
        (m(0).id.as_str(), m(0).user_id.as_str()),
        ("MTR-00000001", "USR-00000001")
    );
    assert_eq!(
        (m(1).id.as_str(), m(1).user_id.as_str()),
        ("MTR-00000002", "USR-00000001")
    );
    assert_eq!(
        (m(2).id.as_str(), m(2).user_id.as_str()),
        ("MTR-00000003", "USR-00000002")
    );
    assert_eq!(m(8).user_id, "USR-00000005");
    let regions: Vec<&str> = (0..5).map(|i| m(i).region).collect();
    assert_eq!(
        regions,
        [
            "Mumbai-North",
            "Delhi-South",
            "Bangalore-East",
            "Chennai-West",
            "Mumbai-North"
        ]
    );
    assert!(s.meter(9).is_none());
    for i in 0..9 {
        let b = m(i).base_load;
        assert!(
            (1.5..=8.0).contains(&b) && (b * 10.0).round() / 10.0 == b,
            "{b}"
        );
    }
    let mumbai = m(0).base_load + m(4).base_load + m(8).base_load;
    assert!((s.region_base_load("Mumbai-North") - mumbai).abs() < 1e-9);
    assert_eq!(s.region_base_load("Atlantis"), 0.0);

    // The JSON carries the same model, tick after tick.
    let mut s = sim(cfg(9));
    for k in 0..3u64 {
        let batch = s.next_batches(MAX_BATCH);
        assert_eq!(batch.len(), 1);
        let readings = fields(&batch[0].body);
        assert_eq!(readings.len(), 9);
        let mut ids = HashSet::new();
        for (i, r) in readings.iter().enumerate() {
            let n = i + 1;
            assert_eq!(r["meterId"].get(), format!("\"MTR-{n:08}\""));
            assert_eq!(r["userId"].get(), format!("\"USR-{:08}\"", n.div_ceil(2)));
            assert_eq!(r["region"].get(), format!("\"{}\"", DEFAULT_REGIONS[i % 4]));
            assert_eq!(r["seq"].get(), (k + 1).to_string());
            let ts = crate::time::format_rfc3339_ms(start_ms() + k as i64 * 10_000);
            assert_eq!(r["timestamp"].get(), format!("\"{ts}\""));
            let id: &str = serde_json::from_str(r["readingId"].get()).expect("string");
            let uuid = uuid::Uuid::parse_str(id).expect("uuid");
            assert_eq!(uuid.get_version_num(), 4);
            assert_eq!(id, uuid.hyphenated().to_string());
            assert!(ids.insert(id.to_owned()));
            assert!(matches!(r["status"].get(), "\"OK\"" | "\"ERROR\""));
            let meta: HashMap<String, &RawValue> =
                serde_json::from_str(r["metadata"].get()).expect("metadata");
            assert_eq!(meta["mode"].get(), "\"normal\"");
            assert_eq!(
                num(meta["baseLoad"]),
                s.meter(i as u32).expect("meter").base_load
            );
        }
    }
}

#[test]
fn values_stay_in_the_seeds_ranges() {
    for mode in [Mode::Normal, Mode::Peak, Mode::Outage] {
        let phases = default_phases(40, &cfg(40).regions, 10);
        let mut s = sim(SimConfig {
            mode,
            phases,
            interval_s: 30,
            ..cfg(40)
        });
        for body in bodies(&mut s, 60, 500) {
            for r in fields(&body) {
                let p = num(r["powerKw"]);
                assert!(
                    (0.0..=20.0).contains(&p) && decimals(r["powerKw"]) <= 3,
                    "{}",
                    r["powerKw"]
                );
                let v = num(r["voltage"]);
                assert!(
                    (210.0..=250.0).contains(&v) && decimals(r["voltage"]) <= 1,
                    "{}",
                    r["voltage"]
                );
                let e = num(r["energyKwh"]);
                assert!(decimals(r["energyKwh"]) <= 4);
                assert_eq!(e, (p * 30.0 / 3600.0 * 10_000.0).round() / 10_000.0);
            }
        }
    }
}

#[test]
fn modes() {
    let mean = |mode| {
        let mut s = sim(SimConfig { mode, ..cfg(400) });
        let t = s.next_tick();
        let base: f64 = (0..400).map(|i| s.meter(i).expect("meter").base_load).sum();
        let dark = t
            .readings
            .iter()
            .filter(|r| r.power_kw < OUTAGE_MAX_KW + 1e-9)
            .count();
        (
            t.readings.iter().map(|r| r.power_kw).sum::<f64>() / base,
            dark,
        )
    };
    let (normal, dark) = mean(Mode::Normal);
    assert!(
        (0.97..1.03).contains(&normal) && dark == 0,
        "{normal} {dark}"
    );
    let (peak, _) = mean(Mode::Peak);
    assert!((1.6..1.9).contains(&peak), "{peak}");
    let (outage, dark) = mean(Mode::Outage);
    assert!((60..140).contains(&dark) && outage < 0.9, "{outage} {dark}");
    // The same meters stay dark from tick to tick.
    let mut s = sim(SimConfig {
        mode: Mode::Outage,
        ..cfg(100)
    });
    let dark = |t: &Tick| -> Vec<u32> {
        t.readings
            .iter()
            .filter(|r| r.power_kw < 0.1)
            .map(|r| r.meter)
            .collect()
    };
    let first = dark(&s.next_tick());
    assert!(!first.is_empty());
    assert_eq!(first, dark(&s.next_tick()));
}

#[test]
fn errors_are_rare() {
    let mut s = sim(cfg(1000));
    let errors: usize = (0..100)
        .map(|_| {
            s.next_tick()
                .readings
                .iter()
                .filter(|r| r.status == Status::Error)
                .count()
        })
        .sum();
    assert!(
        (200..1000).contains(&errors),
        "{errors} errors in 100000 readings"
    );
}

#[test]
fn phases_apply() {
    let c = cfg(8);
    let phases = vec![
        Phase {
            from_tick: 5,
            ticks: 2,
            kind: PhaseKind::Spike { factor: 3.0 },
            target: PhaseTarget::Meters(1..2),
        },
        Phase {
            from_tick: 5,
            ticks: 3,
            kind: PhaseKind::Outage,
            target: PhaseTarget::Meters(2..3),
        },
        Phase {
            from_tick: 4,
            ticks: 4,
            kind: PhaseKind::Surge { factor: 1.7 },
            target: PhaseTarget::Region("Mumbai-North".into()),
        },
    ];
    let mut s = sim(SimConfig {
        phases,
        ..c.clone()
    });
    let plain = sim(c);
    let base = |i| s.meter(i).expect("meter").base_load;
    let (b1, b2) = (base(1), base(2));
    for k in 0..10u64 {
        let t = s.next_tick();
        let p = |i: usize| t.readings[i].power_kw;
        let spike = (5..7).contains(&k);
        let outage = (5..8).contains(&k);
        let surge = (4..8).contains(&k);
        assert_eq!(p(1) > 2.5 * b1, spike, "tick {k}: {} vs base {b1}", p(1));
        assert_eq!(p(2) < 0.1, outage, "tick {k}: {} vs base {b2}", p(2));
        for i in [0, 4] {
            let normal = plain.reading(i as u32, k).expect("meter").power_kw;
            let expect = if surge {
                (normal * 1.7).min(20.0)
            } else {
                normal
            };
            assert!(
                (p(i) - expect).abs() < 0.01 * expect.max(1.0),
                "tick {k} meter {i}"
            );
        }
        assert_eq!(t.readings[1].phase, spike.then_some("spike"));
        assert_eq!(t.readings[0].phase, surge.then_some("surge"));
        assert_eq!(t.readings[3].phase, None);
    }
}

#[test]
fn the_demo_starts_an_hour_back_on_a_quarter_hour() {
    let at = |s: &str| crate::time::parse_rfc3339_ms(s).expect(s);
    assert_eq!(
        demo_start_ms(at("2025-11-12T06:37:12.345Z")),
        at("2025-11-12T05:30:00Z")
    );
    assert_eq!(
        demo_start_ms(at("2025-11-12T06:30:00Z")),
        at("2025-11-12T05:30:00Z")
    );
}

#[test]
fn the_default_script() {
    let regions = cfg(0).regions;
    let phases = default_phases(20, &regions, 10);
    let minute = 6;
    assert_eq!(
        phases,
        vec![
            Phase {
                from_tick: 2 * minute,
                ticks: 6 * minute,
                kind: PhaseKind::Surge {
                    factor: DEMO_SURGE_FACTOR
                },
                target: PhaseTarget::Region("Mumbai-North".into()),
            },
            Phase {
                from_tick: 3 * minute,
                ticks: 2,
                kind: PhaseKind::Spike {
                    factor: DEMO_SPIKE_FACTOR
                },
                target: PhaseTarget::Meters(1..2),
            },
            Phase {
                from_tick: 4 * minute,
                ticks: minute,
                kind: PhaseKind::Outage,
                target: PhaseTarget::Meters(2..3),
            },
        ]
    );
    // Small or odd set-ups still get a valid script.
    for (meters, interval) in [(1, 10), (2, 60), (3, 1), (100, 3600)] {
        let phases = default_phases(meters, &regions, interval);
        assert!(
            phases
                .iter()
                .filter(|p| p.kind != PhaseKind::Outage)
                .all(|p| p.from_tick >= 2)
        );
        let s = sim(SimConfig {
            phases,
            interval_s: interval,
            ..cfg(meters)
        });
        assert_eq!(s.config().meters, meters);
    }
    assert!(
        default_phases(1, &regions, 10)
            .iter()
            .all(|p| p.kind != PhaseKind::Outage)
    );
    assert_eq!(default_phases(5, &["Solo".to_string()], 10).len(), 3);

    // The surge takes the region well above a capacity that fits its normal
    // load at 60 %.
    let mut s = sim(SimConfig {
        phases: default_phases(20, &regions, 10),
        ..cfg(20)
    });
    let capacity = s.region_base_load("Mumbai-North") / 0.6;
    let mut loads = Vec::new();
    for _ in 0..10 * minute {
        let t = s.next_tick();
        let load: f64 = t
            .readings
            .iter()
            .filter(|r| r.meter % 4 == 0)
            .map(|r| r.power_kw)
            .sum();
        loads.push(load / capacity * 100.0);
    }
    assert!(
        loads[..2 * minute as usize]
            .iter()
            .all(|l| (50.0..70.0).contains(l)),
        "{loads:?}"
    );
    assert!(
        loads[2 * minute as usize..8 * minute as usize]
            .iter()
            .all(|l| *l > 90.0),
        "{loads:?}"
    );
    assert!(
        loads[8 * minute as usize..].iter().all(|l| *l < 75.0),
        "{loads:?}"
    );
}

#[test]
fn duplicates_are_resent_readings() {
    let mut s = sim(SimConfig {
        duplicate_ratio: 0.2,
        ..cfg(200)
    });
    let t = s.next_tick();
    let extra = &t.readings[200..];
    assert!((20..60).contains(&extra.len()), "{}", extra.len());
    for d in extra {
        assert_eq!(*d, t.readings[d.meter as usize]);
    }
    let mut s = sim(cfg(200));
    assert_eq!(s.next_tick().readings.len(), 200);
}

#[test]
fn every_reading_passes_ingest_validation() {
    for mode in [Mode::Normal, Mode::Peak, Mode::Outage] {
        let regions = vec!["Région \"Nord\"".to_string(), "South\\East".to_string()];
        let phases = default_phases(30, &regions, 10);
        let mut s = sim(SimConfig {
            mode,
            regions,
            phases,
            duplicate_ratio: 0.05,
            ..cfg(30)
        });
        for k in 0..40 {
            for batch in s.next_batches(7) {
                assert!(batch.readings <= 7);
                let v = validate_batch(&batch.body, MAX_BATCH, TimeBounds::UNBOUNDED)
                    .unwrap_or_else(|e| panic!("tick {k}: {e:?}"));
                assert_eq!(v.readings.len(), batch.readings);
                for r in &v.readings {
                    assert_eq!(r.timestamp_ms, start_ms() + k * 10_000);
                }
            }
        }
    }
}

#[test]
fn bad_configs_are_refused() {
    let err = |c: SimConfig| match Simulator::new(c) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err(cfg(0)),
        "invalid simulator config: meters must be 1..=99999999, got 0"
    );
    assert_eq!(
        err(SimConfig {
            interval_s: 0,
            ..cfg(1)
        }),
        "invalid simulator config: interval must be at least 1 s"
    );
    assert_eq!(
        err(SimConfig {
            regions: vec![],
            ..cfg(1)
        }),
        "invalid simulator config: regions must be a non-empty list of non-empty names"
    );
    assert_eq!(
        err(SimConfig {
            duplicate_ratio: 1.5,
            ..cfg(1)
        }),
        "invalid simulator config: duplicate ratio must be in 0..=1, got 1.5"
    );
    let phase = |kind, target| Phase {
        from_tick: 0,
        ticks: 1,
        kind,
        target,
    };
    assert_eq!(
        err(SimConfig {
            phases: vec![phase(PhaseKind::Outage, PhaseTarget::Region("Mars".into()))],
            ..cfg(1)
        }),
        "invalid simulator config: phase 0: unknown region \"Mars\""
    );
    assert_eq!(
        err(SimConfig {
            phases: vec![phase(PhaseKind::Outage, PhaseTarget::Meters(0..3))],
            ..cfg(2)
        }),
        "invalid simulator config: phase 0: meter range 0..3 is empty or beyond the 2 meters"
    );
    assert_eq!(
        err(SimConfig {
            phases: vec![phase(
                PhaseKind::Spike { factor: f64::NAN },
                PhaseTarget::All
            )],
            ..cfg(2)
        }),
        "invalid simulator config: phase 0: factor must be a finite number >= 0, got NaN"
    );
    assert_eq!("peak".parse::<Mode>().expect("mode"), Mode::Peak);
    assert_eq!(
        "busy".parse::<Mode>().unwrap_err().to_string(),
        "invalid simulator config: unknown mode \"busy\" (expected normal, peak or outage)"
    );
}

// ---------------------------------------------------------------------------
// The sender, against an in-test server that validates and dedupes.

mod http {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};

    #[derive(Default)]
    struct Server {
        seen: parking_lot::Mutex<HashSet<(String, i64)>>,
        calls: AtomicU64,
        /// Answer this many requests with 503 first.
        busy: AtomicU64,
        /// Answer every request with this status instead.
        fail_with: Option<u16>,
    }

    async fn batch(
        State(s): State<Arc<Server>>,
        headers: HeaderMap,
        body: bytes::Bytes,
    ) -> Response {
        s.calls.fetch_add(1, Ordering::Relaxed);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        if let Some(code) = s.fail_with {
            let code = StatusCode::from_u16(code).expect("status");
            return (code, "no thanks").into_response();
        }
        if s.busy.load(Ordering::Relaxed) > 0 {
            s.busy.fetch_sub(1, Ordering::Relaxed);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "0")],
                "busy",
            )
                .into_response();
        }
        // Like segs, refuse readings dated ahead of this server's clock
        // (with no slack at all).
        let time = TimeBounds {
            now_ms: crate::time::now_ms(),
            max_ahead_ms: Some(0),
            max_age_ms: None,
        };
        let v = match validate_batch(&body, MAX_BATCH, time) {
            Ok(v) => v,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
        let mut seen = s.seen.lock();
        let mut accepted = 0;
        for r in &v.readings {
            if seen.insert((r.meter_id.to_string(), r.timestamp_ms)) {
                accepted += 1;
            }
        }
        let duplicates = v.readings.len() - accepted;
        axum::Json(serde_json::json!({ "accepted": accepted, "duplicates": duplicates }))
            .into_response()
    }

    async fn serve(server: Server) -> (String, Arc<Server>) {
        let server = Arc::new(server);
        let app = axum::Router::new()
            .route("/telemetry/batch", axum::routing::post(batch))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), server)
    }

    fn target(url: &str) -> SendTarget {
        SendTarget {
            url: url.to_owned(),
            batch_size: 40,
            ticks: Some(5),
            ..SendTarget::default()
        }
    }

    #[tokio::test]
    async fn sends_every_reading_and_counts_duplicates() {
        let (url, server) = serve(Server::default()).await;
        let stats = SimStats::new();
        let c = SimConfig {
            duplicate_ratio: 0.1,
            ..cfg(100)
        };
        let summary = run(c, target(&url), stats.clone()).await.expect("run");
        assert_eq!(summary.ticks, 5);
        assert_eq!(summary.accepted, 500);
        assert!(summary.duplicates > 0);
        assert_eq!(summary.sent, 500 + summary.duplicates);
        assert_eq!(
            (summary.rejected, summary.errors, summary.retries),
            (0, 0, 0)
        );
        assert_eq!(server.seen.lock().len(), 500);
        assert_eq!(summary.batches, server.calls.load(Ordering::Relaxed));
        assert_eq!(stats.summary(summary.elapsed), summary);
    }

    #[tokio::test]
    async fn honours_503_and_resends_the_same_batch() {
        let (url, server) = serve(Server {
            busy: AtomicU64::new(3),
            ..Server::default()
        })
        .await;
        let summary = run(cfg(100), target(&url), SimStats::new())
            .await
            .expect("run");
        assert_eq!(summary.retries, 3);
        assert_eq!(
            (summary.accepted, summary.sent, summary.rejected),
            (500, 500, 0)
        );
        assert_eq!(server.calls.load(Ordering::Relaxed), summary.batches + 3);
    }

    #[tokio::test]
    async fn counts_error_statuses_and_goes_on() {
        let (url, _server) = serve(Server {
            fail_with: Some(400),
            ..Server::default()
        })
        .await;
        let summary = run(cfg(100), target(&url), SimStats::new())
            .await
            .expect("run");
        assert_eq!(summary.ticks, 5);
        assert_eq!((summary.rejected, summary.accepted), (500, 0));
        assert_eq!(summary.errors, summary.batches);
        assert_eq!(
            summary.last_error.as_deref(),
            Some("HTTP 400 Bad Request: no thanks")
        );
    }

    #[tokio::test]
    async fn stops_on_request_and_at_the_deadline() {
        let (url, _server) = serve(Server::default()).await;
        // Real time with a 10 s interval: tick 0, then the deadline.
        let t = SendTarget {
            realtime: true,
            ticks: None,
            duration: Some(Duration::from_millis(200)),
            ..target(&url)
        };
        let summary = run(cfg(10), t, SimStats::new()).await.expect("run");
        assert_eq!((summary.ticks, summary.accepted), (1, 10));

        // A fresh server: the one above has seen these readings already.
        let (url, _server) = serve(Server::default()).await;
        let stats = SimStats::new();
        let t = SendTarget {
            realtime: true,
            ticks: None,
            ..target(&url)
        };
        let c = SimConfig {
            interval_s: 3600,
            ..cfg(10)
        };
        let handle = tokio::spawn(run(c, t, stats.clone()));
        let answered = async {
            while stats.accepted.load(Ordering::Relaxed) < 10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let answered = tokio::time::timeout(Duration::from_secs(30), answered).await;
        stats.request_stop();
        answered.expect("tick 0 accepted");
        let summary = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("run stops")
            .expect("join")
            .expect("run");
        assert_eq!((summary.ticks, summary.accepted), (1, 10));
    }

    #[tokio::test]
    async fn never_sends_a_tick_before_its_event_time() {
        // Ticks stamped a moment from now, sent as fast as possible: the
        // sender waits for the clock, so the server (which refuses readings
        // dated ahead of its clock) accepts every one.
        let (url, server) = serve(Server::default()).await;
        let c = SimConfig {
            interval_s: 1,
            start_ms: crate::time::now_ms() + 200,
            ..cfg(10)
        };
        let t = SendTarget {
            ticks: Some(2),
            ..target(&url)
        };
        let summary = run(c, t, SimStats::new()).await.expect("run");
        assert_eq!(
            (summary.accepted, summary.rejected),
            (20, 0),
            "{:?}",
            summary.last_error
        );
        assert_eq!(server.seen.lock().len(), 20);
    }

    #[tokio::test]
    async fn rate_limits_without_losing_readings() {
        let (url, _server) = serve(Server::default()).await;
        let t = SendTarget {
            rate: Some(100_000.0),
            batch_size: 7,
            ..target(&url)
        };
        let summary = run(cfg(20), t, SimStats::new()).await.expect("run");
        assert_eq!((summary.accepted, summary.batches), (100, 15));
    }

    #[tokio::test]
    async fn gives_up_on_an_unreachable_server_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let t = SendTarget {
            duration: Some(Duration::from_millis(300)),
            ..target(&url)
        };
        let summary = run(cfg(10), t, SimStats::new()).await.expect("run");
        assert_eq!(
            (summary.accepted, summary.rejected, summary.errors),
            (0, 10, 1)
        );
        assert!(summary.retries >= 1);
        assert!(
            summary
                .last_error
                .expect("error")
                .starts_with("gave up retrying")
        );
    }

    #[tokio::test]
    async fn refuses_bad_targets() {
        let e = run(
            cfg(1),
            SendTarget {
                batch_size: 0,
                ..target("http://h")
            },
            SimStats::new(),
        )
        .await;
        assert_eq!(
            e.unwrap_err().to_string(),
            "invalid simulator config: batch size must be at least 1"
        );
        let e = run(
            cfg(1),
            SendTarget {
                rate: Some(0.0),
                ..target("http://h")
            },
            SimStats::new(),
        )
        .await;
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("rate must be a positive number")
        );
        let e = run(cfg(1), target("localhost:8080"), SimStats::new()).await;
        assert!(matches!(e, Err(SimError::Url { .. })));
    }
}
