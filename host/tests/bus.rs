//! The `Bus` seam, through the in-process implementation: Kafka's
//! partitioning, ordering, consumer groups, at-least-once redelivery,
//! backpressure and retention.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use segs::bus::{Bus, BusError, Consumer, Delivered, MemoryBus, Record, Topic, partition_for};

const T: Topic = Topic::TelemetryReadings;
/// Long enough never to be hit on a loaded machine; tests never wait it out.
const PATIENCE: Duration = Duration::from_secs(30);

fn rec(key: &str, value: impl ToString) -> Record {
    Record::new(key.to_owned(), value.to_string(), 1_700_000_000_000)
}

/// Records numbered `from..to`, keyed over `meters` meters.
fn readings(from: u32, to: u32, meters: u32) -> Vec<Record> {
    (from..to)
        .map(|i| rec(&format!("MTR-{:08}", i % meters + 1), i))
        .collect()
}

/// Everything the consumer can get right now.
async fn drain(c: &mut dyn Consumer) -> Vec<Delivered> {
    let mut all = Vec::new();
    loop {
        let got = c.poll(64, Duration::ZERO).await.expect("poll");
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

fn values(ds: &[Delivered]) -> Vec<u32> {
    ds.iter()
        .map(|d| {
            std::str::from_utf8(&d.record.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .expect("test values are numbers")
        })
        .collect()
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort();
    v
}

/// A key that lands on partition `p` of `n`.
fn key_on(p: u32, n: u32) -> String {
    (0..)
        .map(|i| format!("MTR-{i:08}"))
        .find(|k| partition_for(k.as_bytes(), n) == p)
        .expect("some key hashes there")
}

fn committed(bus: &MemoryBus, group: &str, topic: Topic, partition: u32) -> Option<u64> {
    bus.stats()
        .into_iter()
        .find(|s| s.topic == topic && s.partition == partition)
        .and_then(|s| s.groups.into_iter().find(|(g, _)| g == group))
        .map(|(_, c)| c)
}

#[tokio::test]
async fn keys_land_on_kafkas_partition() {
    // toPositive(murmur2("foobar")) = 1357151166 (Kafka's UtilsTest vector).
    assert_eq!(partition_for(b"foobar", 10), 1_357_151_166 % 10);
    assert_eq!(
        partition_for(b"21", 3),
        (-973_932_308i32 as u32 & 0x7fff_ffff) % 3
    );

    let bus = MemoryBus::new(3, 10_000);
    assert_eq!(bus.partitions(), 3);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, readings(0, 90, 9)).await.expect("produce");
    let got = drain(&mut *c).await;
    assert_eq!(got.len(), 90);
    for d in &got {
        assert_eq!(d.topic, T);
        assert_eq!(d.partition, partition_for(&d.record.key, 3));
    }
}

#[tokio::test]
async fn one_key_keeps_its_order() {
    let bus = MemoryBus::new(4, 10_000);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    for chunk in 0..10 {
        bus.produce(T, readings(chunk * 10, chunk * 10 + 10, 3))
            .await
            .expect("produce");
    }
    let got = drain(&mut *c).await;
    for meter in 1..=3 {
        let key = format!("MTR-{meter:08}");
        let mine: Vec<&Delivered> = got.iter().filter(|d| d.record.key == key).collect();
        let offsets: Vec<u64> = mine.iter().map(|d| d.offset).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{key}: {offsets:?}"
        );
        let vals = values(&mine.into_iter().cloned().collect::<Vec<_>>());
        assert_eq!(vals, sorted(vals.clone()), "{key}");
        assert!(vals.iter().all(|v| v % 3 + 1 == meter));
    }
}

#[tokio::test]
async fn every_group_sees_everything() {
    let bus = MemoryBus::new(3, 10_000);
    let mut a = bus
        .subscribe("stream-processor-group", &[T])
        .await
        .expect("a");
    let mut b = bus.subscribe("audit", &[T]).await.expect("b");
    bus.produce(T, readings(0, 100, 10)).await.expect("produce");
    let all: Vec<u32> = (0..100).collect();
    assert_eq!(sorted(values(&drain(&mut *a).await)), all);
    assert_eq!(sorted(values(&drain(&mut *b).await)), all);
}

#[tokio::test]
async fn members_split_the_partitions_and_see_each_record_once() {
    let bus = MemoryBus::new(3, 10_000);
    let mut a = bus.subscribe("g", &[T]).await.expect("a");
    let mut b = bus.subscribe("g", &[T]).await.expect("b");

    let (pa, pb) = (a.assignment(), b.assignment());
    assert!(!pa.is_empty() && !pb.is_empty(), "{pa:?} {pb:?}");
    let together: BTreeSet<(Topic, u32)> = pa.iter().chain(&pb).copied().collect();
    assert_eq!(together.len(), pa.len() + pb.len(), "disjoint");
    assert_eq!(together, (0..3).map(|p| (T, p)).collect());

    bus.produce(T, readings(0, 300, 30)).await.expect("produce");
    let (ga, gb) = (drain(&mut *a).await, drain(&mut *b).await);
    assert!(ga.iter().all(|d| pa.contains(&(d.topic, d.partition))));
    assert!(gb.iter().all(|d| pb.contains(&(d.topic, d.partition))));
    let mut seen = HashSet::new();
    for v in values(&ga).into_iter().chain(values(&gb)) {
        assert!(seen.insert(v), "{v} delivered twice");
    }
    assert_eq!(seen.len(), 300);
}

#[tokio::test]
async fn a_leaving_member_hands_over_at_the_committed_offset() {
    let bus = MemoryBus::new(1, 10_000);
    let mut a = bus.subscribe("g", &[T]).await.expect("a");
    bus.produce(T, readings(0, 100, 5)).await.expect("produce");

    let first = a.poll(40, PATIENCE).await.expect("poll");
    assert_eq!(values(&first), (0..40).collect::<Vec<_>>());
    a.commit().await.expect("commit");
    let more = a.poll(20, PATIENCE).await.expect("poll");
    assert_eq!(values(&more), (40..60).collect::<Vec<_>>());
    // Not committed: 40..60 are a's in-flight work.

    let mut b = bus.subscribe("g", &[T]).await.expect("b");
    assert_eq!(a.assignment(), [(T, 0)], "the older member keeps it");
    assert!(b.assignment().is_empty());
    drop(a);
    assert_eq!(b.assignment(), [(T, 0)]);

    // At-least-once: b resumes at the committed offset, so 40..60 come again.
    let rest = drain(&mut *b).await;
    assert_eq!(rest.first().map(|d| d.offset), Some(40));
    assert_eq!(values(&rest), (40..100).collect::<Vec<_>>());
    b.commit().await.expect("commit");
    assert_eq!(committed(&bus, "g", T, 0), Some(100));

    // A member joining later resumes at the group's committed offset.
    drop(b);
    bus.produce(T, readings(100, 103, 5))
        .await
        .expect("produce");
    let mut c = bus.subscribe("g", &[T]).await.expect("c");
    assert_eq!(values(&drain(&mut *c).await), [100, 101, 102]);
}

#[tokio::test]
async fn commit_after_losing_a_partition_says_so() {
    let bus = MemoryBus::new(2, 10_000);
    let (k0, k1) = (key_on(0, 2), key_on(1, 2));
    let mut a = bus.subscribe("g", &[T]).await.expect("a");
    bus.produce(T, vec![rec(&k0, 0), rec(&k1, 1), rec(&k0, 2), rec(&k1, 3)])
        .await
        .expect("produce");
    assert_eq!(drain(&mut *a).await.len(), 4);

    // b joins before a commits: partition 1 moves to b.
    let mut b = bus.subscribe("g", &[T]).await.expect("b");
    assert_eq!(a.assignment(), [(T, 0)]);
    assert_eq!(b.assignment(), [(T, 1)]);
    match a.commit().await {
        Err(BusError::Rebalanced { group, partitions }) => {
            assert_eq!(group, "g");
            assert_eq!(partitions, [(T, 1)]);
        }
        other => panic!("expected Rebalanced, got {other:?}"),
    }
    // What a still owns was committed; what it lost is redelivered to b.
    assert_eq!(committed(&bus, "g", T, 0), Some(2));
    assert_eq!(committed(&bus, "g", T, 1), Some(0));
    assert_eq!(values(&drain(&mut *b).await), [1, 3]);
    a.commit().await.expect("nothing more to report");
}

#[tokio::test]
async fn full_partition_refuses_the_whole_call() {
    let bus = MemoryBus::new(2, 5);
    let (k0, k1) = (key_on(0, 2), key_on(1, 2));
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    bus.produce(T, (0..5).map(|i| rec(&k0, i)).collect())
        .await
        .expect("fills partition 0");

    let err = bus
        .produce(T, vec![rec(&k1, 100), rec(&k0, 101)])
        .await
        .expect_err("partition 0 is full");
    match err {
        BusError::Full {
            topic,
            partition,
            lag,
        } => assert_eq!((topic, partition, lag), (T, 0, 5)),
        other => panic!("expected Full, got {other:?}"),
    }
    // Nothing of the refused call was appended, not even to partition 1.
    let ends: Vec<u64> = bus
        .stats()
        .iter()
        .filter(|s| s.topic == T)
        .map(|s| s.end_offset)
        .collect();
    assert_eq!(ends, [5, 0]);

    // Committing makes room again.
    assert_eq!(drain(&mut *c).await.len(), 5);
    c.commit().await.expect("commit");
    bus.produce(T, vec![rec(&k1, 100), rec(&k0, 101)])
        .await
        .expect("room again");
}

#[tokio::test]
async fn committed_records_are_dropped() {
    let bus = MemoryBus::new(1, 10_000);
    let mut fast = bus.subscribe("fast", &[T]).await.expect("fast");
    let mut slow = bus.subscribe("slow", &[T]).await.expect("slow");
    bus.produce(T, readings(0, 10, 2)).await.expect("produce");
    let start = |bus: &MemoryBus| bus.stats()[T as usize * bus.partitions() as usize].start_offset;

    assert_eq!(drain(&mut *fast).await.len(), 10);
    fast.commit().await.expect("commit");
    assert_eq!(start(&bus), 0, "the slow group still needs them");

    assert_eq!(slow.poll(4, PATIENCE).await.expect("poll").len(), 4);
    slow.commit().await.expect("commit");
    assert_eq!(start(&bus), 4);
    assert_eq!(drain(&mut *slow).await.len(), 6);
    slow.commit().await.expect("commit");
    assert_eq!(start(&bus), 10);
    let s = &bus.stats()[0];
    assert_eq!((s.end_offset, s.groups.len()), (10, 2));

    // A new group starts at the earliest record still held.
    bus.produce(T, readings(10, 12, 2)).await.expect("produce");
    let mut late = bus.subscribe("late", &[T]).await.expect("late");
    assert_eq!(values(&drain(&mut *late).await), [10, 11]);
}

#[tokio::test]
async fn poll_waits_and_wakes_on_produce() {
    let bus = MemoryBus::new(3, 10_000);
    let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
    assert!(
        c.poll(10, Duration::from_millis(10))
            .await
            .expect("poll")
            .is_empty(),
        "nothing there: times out empty"
    );

    let waiting = tokio::spawn(async move { c.poll(10, PATIENCE).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    bus.produce(T, vec![rec("MTR-00000001", 7)])
        .await
        .expect("produce");
    let got = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("woken well before the poll timeout")
        .expect("task")
        .expect("poll");
    assert_eq!(values(&got), [7]);
}

#[tokio::test]
async fn a_waiting_member_wakes_when_it_gets_partitions() {
    let bus = MemoryBus::new(1, 10_000);
    let a = bus.subscribe("g", &[T]).await.expect("a");
    let mut b = bus.subscribe("g", &[T]).await.expect("b");
    bus.produce(T, vec![rec("k", 1)]).await.expect("produce");
    assert!(b.assignment().is_empty());

    let waiting = tokio::spawn(async move { b.poll(10, PATIENCE).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(a);
    let got = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("woken by the rebalance")
        .expect("task")
        .expect("poll");
    assert_eq!(values(&got), [1]);
}

#[tokio::test]
async fn one_member_can_read_several_topics() {
    let bus = MemoryBus::new(2, 10_000);
    let mut c = bus
        .subscribe("alert-group", &[Topic::Alerts, Topic::Aggregates1mRegional])
        .await
        .expect("subscribe");
    assert_eq!(c.assignment().len(), 4);
    bus.produce(Topic::Alerts, vec![rec("MTR-1", 1)])
        .await
        .expect("alerts");
    bus.produce(Topic::Aggregates1mRegional, vec![rec("Mumbai-North", 2)])
        .await
        .expect("regional");
    bus.produce(Topic::TariffUpdates, vec![rec("Mumbai-North", 3)])
        .await
        .expect("not subscribed");
    let got = drain(&mut *c).await;
    let topics: BTreeSet<Topic> = got.iter().map(|d| d.topic).collect();
    assert_eq!(
        topics,
        [Topic::Alerts, Topic::Aggregates1mRegional]
            .into_iter()
            .collect()
    );
    assert_eq!(sorted(values(&got)), [1, 2]);
}

#[tokio::test]
async fn subscribe_needs_a_topic() {
    let bus = MemoryBus::new(1, 10_000);
    assert!(matches!(
        bus.subscribe("g", &[]).await,
        Err(BusError::NoTopics { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_loses_nothing() {
    const N: u32 = 5_000;
    let bus = MemoryBus::new(3, 500);
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));

    // Members that poll and commit until told to stop; each checks that
    // a key's values come in order within one poll.
    let member = |bus: MemoryBus, stop: tokio::sync::watch::Receiver<bool>| {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
            while !*stop.borrow() {
                let got = c.poll(100, Duration::from_millis(5)).await.expect("poll");
                for w in got.windows(2) {
                    if w[0].record.key == w[1].record.key && w[0].partition == w[1].partition {
                        assert!(w[0].offset < w[1].offset);
                    }
                }
                seen.lock().extend(values(&got));
                match c.commit().await {
                    Ok(()) | Err(BusError::Rebalanced { .. }) => {}
                    Err(e) => panic!("commit: {e}"),
                }
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let a = member(bus.clone(), stop_rx.clone());
    let b = member(bus.clone(), stop_rx.clone());
    let (stop_c, stop_c_rx) = tokio::sync::watch::channel(false);
    let c = member(bus.clone(), stop_c_rx);

    // Produce with retry on backpressure.
    for start in (0..N).step_by(100) {
        let batch = readings(start, start + 100, 37);
        loop {
            match bus.produce(T, batch.clone()).await {
                Ok(()) => break,
                Err(BusError::Full { .. }) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => panic!("produce: {e}"),
            }
        }
        if start == N / 2 {
            // One member leaves half way (without a final commit).
            stop_c.send(true).expect("stop c");
        }
    }
    c.await.expect("c");

    // Wait until the group has committed everything.
    tokio::time::timeout(PATIENCE, async {
        loop {
            let done = bus
                .stats()
                .iter()
                .filter(|s| s.topic == T)
                .all(|s| s.groups.iter().all(|(_, c)| *c == s.end_offset));
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the group catches up");
    stop_tx.send(true).expect("stop");
    a.await.expect("a");
    b.await.expect("b");

    // At least once: every record seen, possibly some twice.
    let seen = seen.lock();
    let distinct: BTreeSet<u32> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), N as usize);
    assert!(seen.len() >= N as usize);
    // Everything committed was also dropped.
    assert!(bus.stats().iter().all(|s| s.start_offset == s.end_offset));
}
