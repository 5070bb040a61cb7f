//! The `Dedupe` seam: one behaviour suite (`SET key 1 NX EX ttl` semantics)
//! run against the in-process implementation and against the real Redis at
//! 127.0.0.1:6379 (or `SEGS_TEST_REDIS_URL`). Without Redis the Redis tests
//! fail, saying how to start it.

use std::sync::Arc;
use std::time::Duration;

use segs::dedupe::{
    Claim, Clock, Dedupe, DedupeError, KeyBatch, ManualClock, MemoryDedupe, RedisDedupe,
};
use segs::shared::SharedRuleState;

/// The Redis the tests use; `SEGS_TEST_REDIS_URL` overrides it.
fn redis_url() -> String {
    std::env::var("SEGS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// How the suite lets a TTL run out.
enum Time {
    /// Moves an injected clock.
    Manual(Arc<ManualClock>),
    /// Waits for real (Redis keeps its own time).
    Real,
}

impl Time {
    async fn pass(&self, d: Duration) {
        match self {
            Time::Manual(clock) => clock.advance(d),
            Time::Real => tokio::time::sleep(d).await,
        }
    }
}

fn keys(prefix: &str, names: &[&str]) -> KeyBatch {
    let mut b = KeyBatch::default();
    for n in names {
        b.push_with(|s| {
            s.push_str(prefix);
            s.push_str(n);
        });
    }
    b
}

/// The behaviour every `Dedupe` must have. `prefix` keeps runs apart.
async fn check_set_nx_ex(d: &dyn Dedupe, prefix: &str, time: Time) {
    let ttl = Duration::from_secs(60);
    let mark = |names: &'static [&'static str], ttl: Duration| {
        let b = keys(prefix, names);
        async move { d.check_and_mark(&b, ttl).await.expect("check_and_mark") }
    };

    // First seen, then a duplicate.
    assert_eq!(mark(&["a", "b"], ttl).await, [true, true]);
    assert_eq!(mark(&["a", "b"], ttl).await, [false, false]);
    assert_eq!(mark(&["a", "c"], ttl).await, [false, true]);

    // A key repeated within one call is a duplicate the second time.
    assert_eq!(
        mark(&["r", "r", "s", "r"], ttl).await,
        [true, false, true, false]
    );

    // Nothing in, nothing out.
    assert_eq!(mark(&[], ttl).await, Vec::<bool>::new());

    // Unmark makes a key new again; the others stay marked.
    assert_eq!(mark(&["u1", "u2"], ttl).await, [true, true]);
    let b = keys(prefix, &["u1", "u2"]);
    d.unmark(&b, &[0, 7]).await.expect("unmark");
    d.unmark(&b, &[]).await.expect("unmark nothing");
    assert_eq!(mark(&["u1", "u2"], ttl).await, [true, false]);

    // Two racing callers: exactly one sees the key as new.
    let (x, y) = tokio::join!(mark(&["race"], ttl), mark(&["race"], ttl));
    assert_eq!(
        [x[0], y[0]].iter().filter(|&&f| f).count(),
        1,
        "{x:?} {y:?}"
    );

    // TTL expiry: a key is new again once its TTL has run out, while a key
    // marked with a longer TTL is still a duplicate.
    let short = Duration::from_secs(1);
    assert_eq!(mark(&["t"], short).await, [true]);
    assert_eq!(mark(&["t"], short).await, [false]);
    time.pass(Duration::from_millis(1500)).await;
    assert_eq!(mark(&["t", "a"], ttl).await, [true, false]);
}

/// Two-phase marks: a claim holds new keys until confirmed (seen) or
/// released (new again); another caller meanwhile finds them in flight;
/// a hold that runs out is taken over and reported orphaned, with the time
/// it was first claimed. `now_ms` is the clock the holds are on.
async fn check_two_phase(d: &dyn Dedupe, prefix: &str, time: Time, now_ms: impl Fn() -> i64) {
    use Claim::*;
    let ttl = Duration::from_secs(60);
    let hold = Duration::from_secs(30);
    let claim = |names: &'static [&'static str], hold: Duration, token: u64| {
        let b = keys(prefix, names);
        async move { d.claim(&b, ttl, hold, token).await.expect("claim") }
    };

    assert_eq!(claim(&["a", "b"], hold, 1).await, [New, New]);
    assert_eq!(claim(&["a", "c"], hold, 2).await, [InFlight, New]);
    // Confirmed: a duplicate for everyone.
    d.confirm(&keys(prefix, &["a", "b"]), &[0], ttl)
        .await
        .expect("confirm");
    assert_eq!(claim(&["a"], hold, 3).await, [Duplicate]);
    // Only the holder's release counts.
    d.release(&keys(prefix, &["b"]), &[0], 2)
        .await
        .expect("release");
    assert_eq!(claim(&["b"], hold, 3).await, [InFlight]);
    d.release(&keys(prefix, &["b"]), &[0], 1)
        .await
        .expect("release");
    assert_eq!(claim(&["b"], hold, 3).await, [New]);
    // A key repeated within one claim is a duplicate the second time.
    assert_eq!(
        claim(&["r", "r", "s"], hold, 4).await,
        [New, Duplicate, New]
    );
    // A hold that runs out (its holder died) is taken over, once.
    let before = now_ms();
    assert_eq!(claim(&["h"], Duration::from_secs(1), 5).await, [New]);
    time.pass(Duration::from_millis(1500)).await;
    let taken = claim(&["h"], hold, 6).await;
    match taken[0] {
        Orphaned { since_ms } => assert!(
            (before - 1000..=before + 1000).contains(&since_ms),
            "first claimed at {since_ms}, test clock {before}"
        ),
        other => panic!("expected the hold to be orphaned, got {other:?}"),
    }
    assert_eq!(claim(&["h"], hold, 7).await, [InFlight]);
    d.confirm(&keys(prefix, &["h"]), &[0], ttl)
        .await
        .expect("confirm");
    assert_eq!(claim(&["h"], hold, 7).await, [Duplicate]);
    // check_and_mark (rebuilding marks at start) sees held keys as present.
    assert_eq!(claim(&["m"], hold, 8).await, [New]);
    assert_eq!(
        d.check_and_mark(&keys(prefix, &["m"]), ttl).await.unwrap(),
        [false]
    );
}

#[tokio::test]
async fn memory_holds_keys_in_two_phases() {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let d = MemoryDedupe::with_clock(clock.clone());
    let c = clock.clone();
    check_two_phase(&d, "reading:", Time::Manual(clock), move || c.now_ms()).await;
}

#[tokio::test]
async fn redis_holds_keys_in_two_phases() {
    let d = redis().await;
    check_two_phase(&d, &run_prefix("two-phase"), Time::Real, segs::time::now_ms).await;
}

#[tokio::test]
async fn memory_behaves_like_set_nx_ex() {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let d = MemoryDedupe::with_clock(clock.clone());
    check_set_nx_ex(&d, "reading:", Time::Manual(clock)).await;
}

/// A Redis connection for a test, or a failure that says how to get one.
async fn redis() -> RedisDedupe {
    let url = redis_url();
    match RedisDedupe::connect(&url).await {
        Ok(d) => d,
        Err(e) => panic!(
            "{e}\nThese tests need a real Redis at {url}: start it \
             (`cargo xtask services` prints the command) and run them again."
        ),
    }
}

/// Unique per test run, so runs (and parallel tests) never share keys.
fn run_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("segs-test:{}:{nanos}:{test}:reading:", std::process::id())
}

#[tokio::test]
async fn redis_behaves_like_set_nx_ex() {
    let d = redis().await;
    check_set_nx_ex(&d, &run_prefix("suite"), Time::Real).await;
}

#[tokio::test]
async fn redis_marks_a_full_batch_in_one_call() {
    let d = redis().await;
    let prefix = run_prefix("batch");
    let mut b = KeyBatch::default();
    for i in 0..1000 {
        b.push_with(|s| {
            use std::fmt::Write as _;
            let _ = write!(s, "{prefix}MTR-{i:08}:2024-01-01T00:00:00.000Z");
        });
    }
    let ttl = Duration::from_secs(30);
    let first = d.check_and_mark(&b, ttl).await.expect("first");
    assert!(first.iter().all(|&f| f));
    let second = d.check_and_mark(&b, ttl).await.expect("second");
    assert!(second.iter().all(|&f| !f));
    let all: Vec<usize> = (0..b.len()).collect();
    d.unmark(&b, &all).await.expect("clean up");
    assert_eq!(d.len_hint(), None);
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    // Nothing listens on port 1.
    let url = "redis://127.0.0.1:1";
    let err = RedisDedupe::connect(url)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, DedupeError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("cannot reach Redis at redis://127.0.0.1:1"),
        "{msg}"
    );

    let err = RedisDedupe::connect("not a url")
        .await
        .expect_err("bad URL");
    assert!(matches!(err, DedupeError::InvalidUrl { .. }), "{err:?}");
}

// ------------------------------------------------ the rule stages' state

fn tariff(region: &str, id: &str, price: f64, from_ms: i64) -> segs::store::TariffRow {
    segs::store::TariffRow {
        tariff_id: id.into(),
        region: region.into(),
        time_of_day: None,
        price_per_kwh: price,
        effective_from_ms: from_ms,
        effective_to_ms: None,
        is_active: true,
        created_by: None,
        created_at_ms: from_ms,
        updated_at_ms: from_ms,
        previous_price: None,
        change_percent: None,
        load_percentage: None,
        reason: segs::messages::TariffReason::HighLoad,
        rule: None,
    }
}

/// An alert's dedupe mark belongs to the first alert id that claims it; the
/// same id claiming it again (a replay of that alert after a crash between
/// Redis and the store) still owns it; another id never does.
#[tokio::test]
async fn redis_alert_marks_belong_to_the_first_alert_id() {
    let s = SharedRuleState::connect(&redis_url()).await.unwrap();
    let key = format!("{}alert:dedupe:MTR-1:ANOMALY:1", run_prefix("alerts"));
    let (first, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let owned = s
        .claim_alerts(&[(&key, first), (&key, other)], 60_000)
        .await
        .unwrap();
    assert_eq!(owned, vec![true, false], "first in the call wins");
    let again = s.claim_alerts(&[(&key, first)], 60_000).await.unwrap();
    assert_eq!(
        again,
        vec![true],
        "a replay of the same alert still owns it"
    );
    let later = s.claim_alerts(&[(&key, other)], 60_000).await.unwrap();
    assert_eq!(later, vec![false]);
}

/// `tariff:{region}:current` takes a price only over an earlier one: a
/// process that lost the region cannot put back a stale price.
#[tokio::test]
async fn redis_tariff_cache_never_goes_back_to_an_earlier_price() {
    let s = SharedRuleState::connect(&redis_url()).await.unwrap();
    let region = run_prefix("tariff");
    let newer = tariff(&region, "TRF-2", 7.15, 2_000);
    let older = tariff(&region, "TRF-1", 6.5, 1_000);
    assert_eq!(s.set_current_tariffs(&[newer]).await.unwrap(), 1);
    assert_eq!(s.set_current_tariffs(&[older]).await.unwrap(), 0, "older");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let current: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(segs::shared::tariff_key(&region))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(current["tariff_id"], "TRF-2");
    assert_eq!(current["price_per_kwh"].parse::<f64>().unwrap(), 7.15);
    let _: () = redis::cmd("DEL")
        .arg(segs::shared::tariff_key(&region))
        .query_async(&mut conn)
        .await
        .unwrap();
}
