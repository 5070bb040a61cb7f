//! The Kafka bus: the [`Bus`] seam over a real Kafka cluster (or any
//! Kafka-protocol broker, such as Tansu in tests) through rdkafka.
//!
//! Owns: creating the eight topics at start when missing (partitions,
//! replication, retention from `[kafka]`), the idempotent producer
//! (`acks=all`), keyed partitioning identical to the in-process bus (the
//! partition is computed here with [`partition_for`], Kafka's murmur2, and
//! set on every record), consumer groups with manual commits only (offsets
//! move only when a stage commits, by the exactly-once rules of the
//! pipeline), and backpressure: a background task reads, every half second,
//! the high watermark of each `telemetry-readings` partition and the
//! committed offsets of the groups that consume it, and `produce` on that
//! topic refuses with [`BusError::Full`] past `bus.max_lag_per_partition`,
//! as the in-process bus does.
//!
//! Names: every topic and group name is prefixed with `kafka.namespace`
//! (empty in production: the seed's names), so several installations or
//! test runs can share a cluster.
//!
//! Blocking calls of librdkafka (metadata, watermarks, synchronous commits)
//! run on the blocking pool, never on the async workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{Bus, BusError, Consumer, Delivered, Record, Topic, partition_for};
use crate::config::KafkaConfig;

/// The Kafka bus. Cloning is cheap and shares the producer.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
    partitions: u32,
    max_lag: u64,
    log_id: String,
    /// Per partition of `telemetry-readings`: records its slowest consumer
    /// group has not committed, as of the last look.
    lag: Vec<AtomicU64>,
    /// One client per group whose lag readiness asked for, only to read
    /// its committed offsets.
    lag_readers: parking_lot::Mutex<HashMap<String, Arc<BaseConsumer>>>,
    closed: AtomicBool,
}

fn kafka(e: impl std::fmt::Display) -> BusError {
    BusError::Kafka(e.to_string())
}

impl KafkaBus {
    /// Connects to `config.brokers`, checks the cluster answers (failing
    /// with the address tried), creates missing topics with `partitions`
    /// partitions and checks existing ones have that many, and starts the
    /// lag monitor for `lag_groups` (the groups consuming
    /// `telemetry-readings`).
    pub async fn connect(
        config: &KafkaConfig,
        partitions: u32,
        max_lag_per_partition: usize,
        lag_groups: &[&str],
    ) -> Result<KafkaBus, BusError> {
        let timeout = Duration::from_secs(config.connect_timeout_s);
        let admin: AdminClient<DefaultClientContext> =
            client_config(config).create().map_err(kafka)?;
        // Reachability first: a clear error naming the address tried.
        let probe: BaseConsumer = client_config(config).create().map_err(kafka)?;
        let brokers = config.brokers.clone();
        let (probe, cluster) = tokio::task::spawn_blocking(move || {
            let meta = probe.fetch_metadata(None, timeout);
            let cluster = probe.client().fetch_cluster_id(timeout);
            (meta.map(|_| probe), cluster)
        })
        .await
        .map_err(kafka)?;
        let probe = probe.map_err(|e| {
            BusError::Kafka(format!(
                "cannot reach Kafka at {brokers} (kafka.brokers / KAFKA_BROKERS): {e}"
            ))
        })?;

        let names: Vec<String> = Topic::ALL
            .iter()
            .map(|t| format!("{}{}", config.namespace, t.name()))
            .collect();
        let retention = config.retention_ms.to_string();
        let new: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    partitions as i32,
                    TopicReplication::Fixed(i32::from(config.replication_factor)),
                )
                .set("retention.ms", &retention)
            })
            .collect();
        let results = admin
            .create_topics(&new, &AdminOptions::new().operation_timeout(Some(timeout)))
            .await
            .map_err(kafka)?;
        for r in results {
            match r {
                Ok(name) => tracing::info!(topic = name, partitions, "created Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(BusError::Kafka(format!(
                        "cannot create topic {name} on {}: {code}",
                        config.brokers
                    )));
                }
            }
        }
        // Every topic must have the partitions keys are spread over.
        let check_names = names.clone();
        let counts = tokio::task::spawn_blocking(move || {
            let mut counts = Vec::new();
            for n in &check_names {
                let meta = probe.fetch_metadata(Some(n), timeout)?;
                let count = meta.topics().first().map_or(0, |t| t.partitions().len());
                counts.push((n.clone(), count));
            }
            Ok::<_, KafkaError>(counts)
        })
        .await
        .map_err(kafka)?
        .map_err(kafka)?;
        for (name, count) in counts {
            if count != partitions as usize {
                return Err(BusError::Kafka(format!(
                    "topic {name} has {count} partitions, but bus.partitions is {partitions}; \
                     keys would land on other partitions than before (set bus.partitions = \
                     {count}, or use another kafka.namespace)"
                )));
            }
        }

        let producer: FutureProducer = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set(
                "message.timeout.ms",
                (config.delivery_timeout_s * 1000).to_string(),
            )
            .create()
            .map_err(kafka)?;
        let bus = KafkaBus {
            inner: Arc::new(Inner {
                config: config.clone(),
                producer,
                partitions,
                max_lag: max_lag_per_partition as u64,
                log_id: format!(
                    "kafka-{}-{}",
                    cluster.unwrap_or_else(|| config.brokers.clone()),
                    config.namespace
                ),
                lag: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
                lag_readers: Default::default(),
                closed: AtomicBool::new(false),
            }),
        };
        let groups: Vec<String> = lag_groups
            .iter()
            .map(|g| format!("{}{g}", config.namespace))
            .collect();
        tokio::spawn(watch_lag(Arc::downgrade(&bus.inner), groups));
        Ok(bus)
    }

    /// Stops producing: later calls get [`BusError::Closed`].
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    fn topic_name(&self, topic: Topic) -> String {
        format!("{}{}", self.inner.config.namespace, topic.name())
    }
}

/// The client properties every client shares: brokers, then `[kafka.client]`.
fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.client {
        c.set(k, v);
    }
    c
}

/// Refreshes [`Inner::lag`] every half second while the bus lives.
async fn watch_lag(inner: std::sync::Weak<Inner>, groups: Vec<String>) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let topic = format!(
        "{}{}",
        strong.config.namespace,
        Topic::TelemetryReadings.name()
    );
    let partitions = strong.partitions;
    // One client per group, only to read its committed offsets.
    let readers: Vec<BaseConsumer> = groups
        .iter()
        .filter_map(|g| {
            client_config(&strong.config)
                .set("group.id", g)
                .set("enable.auto.commit", "false")
                .create()
                .ok()
        })
        .collect();
    drop(strong);
    let readers = Arc::new(readers);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        let readers = readers.clone();
        let topic = topic.clone();
        let looked = tokio::task::spawn_blocking(move || {
            lag_now(&readers, &topic, partitions, Duration::from_secs(2))
        })
        .await;
        match looked {
            Ok(Ok(lags)) => {
                for (slot, lag) in strong.lag.iter().zip(lags) {
                    slot.store(lag, Ordering::Relaxed);
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "Kafka lag unknown this time"),
            Err(_) => {}
        }
    }
}

/// Per partition: high watermark minus the smallest committed offset among
/// the groups (the low watermark for a group with none yet).
fn lag_now(
    readers: &[BaseConsumer],
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<Vec<u64>, KafkaError> {
    let Some(first) = readers.first() else {
        return Ok(vec![0; partitions as usize]);
    };
    let marks = watermarks(first, topic, partitions, timeout)?;
    let mut floor: Vec<i64> = marks.iter().map(|(_, high)| *high).collect();
    for r in readers {
        let committed = committed(r, topic, partitions, timeout)?;
        for ((f, c), (low, _)) in floor.iter_mut().zip(committed).zip(&marks) {
            *f = (*f).min(c.unwrap_or(*low));
        }
    }
    Ok(marks
        .iter()
        .zip(floor)
        .map(|((_, high), f)| (high - f).max(0) as u64)
        .collect())
}

/// (low, high) watermarks of each partition of `topic`.
fn watermarks(
    client: &BaseConsumer,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<Vec<(i64, i64)>, KafkaError> {
    (0..partitions)
        .map(|p| client.fetch_watermarks(topic, p as i32, timeout))
        .collect()
}

/// The committed offset of `reader`'s group on each partition of `topic`
/// (`None` where it has none).
fn committed(
    reader: &BaseConsumer,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<Vec<Option<i64>>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p as i32);
    }
    let committed = reader.committed_offsets(tpl, timeout)?;
    Ok((0..partitions)
        .map(|p| {
            match committed
                .find_partition(topic, p as i32)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            }
        })
        .collect())
}

#[async_trait::async_trait]
impl Bus for KafkaBus {
    async fn produce(&self, topic: Topic, records: Vec<Record>) -> Result<(), BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        if records.is_empty() {
            return Ok(());
        }
        let n = self.inner.partitions;
        let parts: Vec<u32> = records.iter().map(|r| partition_for(&r.key, n)).collect();
        if topic == Topic::TelemetryReadings {
            let mut adding = vec![0u64; n as usize];
            for p in &parts {
                adding[*p as usize] += 1;
            }
            for (p, add) in adding.iter().enumerate() {
                let lag = self.inner.lag[p].load(Ordering::Relaxed);
                if *add > 0 && lag + add > self.inner.max_lag {
                    return Err(BusError::Full {
                        topic,
                        partition: p as u32,
                        lag: lag as usize,
                    });
                }
            }
        }
        let name = self.topic_name(topic);
        let mut pending = Vec::with_capacity(records.len());
        for (r, p) in records.iter().zip(&parts) {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let record = FutureRecord::to(&name)
                .key(&r.key[..])
                .payload(&r.value[..])
                .partition(*p as i32)
                .timestamp(r.timestamp_ms)
                .headers(headers);
            match self.inner.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // What was queued before still goes out; the caller
                    // retries the whole call and the stages recognise
                    // repeats (dedupe at ingest, ids downstream).
                    return Err(BusError::Full {
                        topic,
                        partition: *p,
                        lag: 0,
                    });
                }
                Err((e, _)) => return Err(kafka(e)),
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(kafka(e)),
                Err(_) => return Err(BusError::Kafka("the producer was dropped".into())),
            }
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn Consumer>, BusError> {
        if topics.is_empty() {
            return Err(BusError::NoTopics {
                group: group.to_owned(),
            });
        }
        let ns = &self.inner.config.namespace;
        let consumer: StreamConsumer = client_config(&self.inner.config)
            .set("group.id", format!("{ns}{group}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            .create()
            .map_err(kafka)?;
        let names: Vec<String> = topics.iter().map(|t| self.topic_name(*t)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        consumer.subscribe(&refs).map_err(kafka)?;
        Ok(Box::new(KafkaConsumer {
            consumer: Arc::new(consumer),
            group: group.to_owned(),
            namespace: ns.clone(),
            positions: HashMap::new(),
            last_records: std::time::Instant::now(),
        }))
    }

    async fn check(&self) -> Result<(), BusError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            inner
                .producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
                .map_err(kafka)
        })
        .await
        .map_err(kafka)?
    }

    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    async fn lag(&self, group: &str, topics: &[Topic]) -> Result<Vec<(Topic, u32, u64)>, BusError> {
        let reader = {
            let mut readers = self.inner.lag_readers.lock();
            match readers.get(group) {
                Some(r) => r.clone(),
                None => {
                    let r: BaseConsumer = client_config(&self.inner.config)
                        .set(
                            "group.id",
                            format!("{}{group}", self.inner.config.namespace),
                        )
                        .set("enable.auto.commit", "false")
                        .create()
                        .map_err(kafka)?;
                    let r = Arc::new(r);
                    readers.insert(group.to_owned(), r.clone());
                    r
                }
            }
        };
        let names: Vec<(Topic, String)> =
            topics.iter().map(|t| (*t, self.topic_name(*t))).collect();
        let partitions = self.inner.partitions;
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(2);
            let mut behind = Vec::new();
            for (topic, name) in &names {
                let marks = watermarks(&reader, name, partitions, timeout).map_err(kafka)?;
                let committed = committed(&reader, name, partitions, timeout).map_err(kafka)?;
                for (p, ((low, high), c)) in (0..partitions).zip(marks.into_iter().zip(committed)) {
                    let from = c.map_or(low, |o| o.max(low));
                    behind.push((*topic, p, (high - from).max(0) as u64));
                }
            }
            Ok(behind)
        })
        .await
        .map_err(kafka)?
    }

    fn log_id(&self) -> &str {
        &self.inner.log_id
    }

    fn backlog(&self, topic: Topic) -> Option<super::Backlog> {
        if topic != Topic::TelemetryReadings {
            return None;
        }
        let max = self.inner.max_lag.max(1);
        let lags = self.inner.lag.iter().map(|l| l.load(Ordering::Relaxed));
        Some(super::Backlog {
            fill: lags.clone().max().unwrap_or(0) as f64 / max as f64,
            waiting: lags.sum(),
            max_lag: max,
        })
    }

    /// Reads the topic from the first offset stamped at or after `since_ms`
    /// (Kafka's offsets-for-times) to the high watermark of each partition,
    /// with a throwaway assigned consumer that commits nothing.
    async fn recent_records(&self, topic: Topic, since_ms: i64) -> Result<Vec<Record>, BusError> {
        let name = self.topic_name(topic);
        let partitions = self.inner.partitions;
        let consumer: BaseConsumer = client_config(&self.inner.config)
            .set(
                "group.id",
                format!(
                    "{}segs-recent-{}",
                    self.inner.config.namespace,
                    uuid::Uuid::new_v4()
                ),
            )
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka)?;
        let timeout = Duration::from_secs(self.inner.config.connect_timeout_s);
        let namespace = self.inner.config.namespace.clone();
        tokio::task::spawn_blocking(move || {
            let mut times = TopicPartitionList::new();
            for p in 0..partitions {
                times
                    .add_partition_offset(&name, p as i32, Offset::Offset(since_ms))
                    .map_err(kafka)?;
            }
            let starts = consumer.offsets_for_times(times, timeout).map_err(kafka)?;
            let mut assign = TopicPartitionList::new();
            let mut ends: HashMap<i32, i64> = HashMap::new();
            for e in starts.elements() {
                let (_, high) = consumer
                    .fetch_watermarks(&name, e.partition(), timeout)
                    .map_err(kafka)?;
                if let Offset::Offset(start) = e.offset() {
                    if start < high {
                        assign
                            .add_partition_offset(&name, e.partition(), Offset::Offset(start))
                            .map_err(kafka)?;
                        ends.insert(e.partition(), high);
                    }
                }
            }
            let mut out = Vec::new();
            if ends.is_empty() {
                return Ok(out);
            }
            consumer.assign(&assign).map_err(kafka)?;
            let deadline = std::time::Instant::now() + timeout * 3;
            while !ends.is_empty() && std::time::Instant::now() < deadline {
                let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let m = m.map_err(kafka)?;
                let p = m.partition();
                let Some(&end) = ends.get(&p) else {
                    continue;
                };
                if m.topic().strip_prefix(&namespace) == Some(topic.name()) {
                    out.push(Record::new(
                        bytes::Bytes::copy_from_slice(m.key().unwrap_or_default()),
                        bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                        m.timestamp().to_millis().unwrap_or(0),
                    ));
                }
                if m.offset() + 1 >= end {
                    ends.remove(&p);
                }
            }
            Ok(out)
        })
        .await
        .map_err(kafka)?
    }
}

/// How long a draining consumer must have fetched nothing before it counts
/// as caught up.
const QUIET: Duration = Duration::from_secs(2);

/// One member of a consumer group on Kafka.
struct KafkaConsumer {
    consumer: Arc<StreamConsumer>,
    group: String,
    namespace: String,
    /// Per partition, the offset after the last record poll returned.
    positions: HashMap<(Topic, u32), u64>,
    /// When poll last returned records.
    last_records: std::time::Instant,
}

impl KafkaConsumer {
    fn delivered(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Delivered> {
        let topic = Topic::from_name(m.topic().strip_prefix(&self.namespace)?)?;
        let partition = m.partition() as u32;
        let offset = m.offset() as u64;
        self.positions.insert((topic, partition), offset + 1);
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Delivered {
            topic,
            partition,
            offset,
            record: Record {
                key: bytes::Bytes::copy_from_slice(m.key().unwrap_or_default()),
                value: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                headers,
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
            },
        })
    }

    async fn commit_list(&mut self, tpl: TopicPartitionList) -> Result<(), BusError> {
        if tpl.count() == 0 {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let result = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(kafka)?;
        match result {
            Ok(()) => Ok(()),
            Err(KafkaError::ConsumerCommit(
                code @ (RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId),
            )) => {
                tracing::warn!(group = self.group, %code, "commit refused by a rebalance");
                Err(BusError::Rebalanced {
                    group: self.group.clone(),
                    partitions: self.positions.keys().copied().collect(),
                })
            }
            Err(e) => Err(kafka(e)),
        }
    }
}

#[async_trait::async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let consumer = self.consumer.clone();
        let first = match tokio::time::timeout(timeout, consumer.recv()).await {
            Err(_) => return Ok(out),
            Ok(Err(e)) => return Err(kafka(e)),
            Ok(Ok(m)) => self.delivered(&m),
        };
        out.extend(first);
        self.last_records = std::time::Instant::now();
        // Then what is already buffered, without waiting.
        while out.len() < max {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    if let Some(d) = self.delivered(&m) {
                        out.push(d);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(group = self.group, error = %e, "Kafka consumer error");
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        // Only partitions this member still owns: a position kept from
        // before a rebalance would move the new owner's offset back.
        let owned = self.assignment();
        self.positions.retain(|tp, _| owned.contains(tp));
        let positions: Vec<(Topic, u32, u64)> = self
            .positions
            .iter()
            .map(|(&(t, p), &o)| (t, p, o))
            .collect();
        self.commit_positions(&positions).await
    }

    async fn commit_positions(&mut self, positions: &[(Topic, u32, u64)]) -> Result<(), BusError> {
        let mut tpl = TopicPartitionList::new();
        for &(topic, partition, offset) in positions {
            let name = format!("{}{}", self.namespace, topic.name());
            tpl.add_partition_offset(&name, partition as i32, Offset::Offset(offset as i64))
                .map_err(kafka)?;
        }
        self.commit_list(tpl).await
    }

    /// Every assigned partition read up to its high watermark (a partition
    /// never read counts through the group's committed offset), and nothing
    /// fetched for [`QUIET`] (a broker's watermark can lag what it serves).
    /// Nothing assigned yet: not caught up.
    async fn caught_up(&mut self) -> bool {
        if self.last_records.elapsed() < QUIET {
            return false;
        }
        let consumer = self.consumer.clone();
        let positions: HashMap<(String, i32), i64> = self
            .positions
            .iter()
            .map(|(&(t, p), &o)| {
                (
                    (format!("{}{}", self.namespace, t.name()), p as i32),
                    o as i64,
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let Ok(assigned) = consumer.assignment() else {
                return false;
            };
            if assigned.count() == 0 {
                return false;
            }
            let committed = consumer.committed_offsets(assigned.clone(), timeout).ok();
            assigned.elements().iter().all(|e| {
                let Ok((_, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)
                else {
                    return false;
                };
                let at = positions
                    .get(&(e.topic().to_owned(), e.partition()))
                    .copied()
                    .or_else(|| {
                        committed
                            .as_ref()?
                            .find_partition(e.topic(), e.partition())
                            .and_then(|c| match c.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            })
                    })
                    .unwrap_or(0);
                at >= high
            })
        })
        .await
        .unwrap_or(false)
    }

    fn assignment(&self) -> Vec<(Topic, u32)> {
        let Ok(tpl) = self.consumer.assignment() else {
            return Vec::new();
        };
        let mut out: Vec<(Topic, u32)> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                let t = Topic::from_name(e.topic().strip_prefix(&self.namespace)?)?;
                Some((t, e.partition() as u32))
            })
            .collect();
        out.sort();
        out
    }
}
