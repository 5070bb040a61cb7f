//! The bus: moves records between stages, partitioned and grouped exactly as
//! Kafka does, so the stage code above it is the same in embedded mode
//! ([`memory::MemoryBus`]) and in production (Kafka).
//!
//! Owns: topics, partitioning by key ([`partition_for`], Kafka's murmur2),
//! ordering within a partition, consumer groups (partition assignment,
//! rebalancing, committed offsets), backpressure ([`BusError::Full`]) and
//! retention.
//!
//! Must not: parse payloads, look inside keys or headers beyond hashing the
//! key, or know any business rule. Records are opaque bytes here.
//!
//! Delivery is at-least-once, like Kafka with manual commits: a record is
//! redelivered to whichever member owns its partition next unless a
//! [`Consumer::commit`] covering it succeeded first.

pub mod journal;
pub mod kafka;
pub mod memory;

use std::time::Duration;

use bytes::Bytes;

pub use journal::JournalOptions;
pub use memory::{MemoryBus, TopicStats};

/// The topics of SPEC §5, plus the one segs adds so that several processes
/// can share the stream stage (`aggregates_1m_regional_partials`: each
/// partition's share of the regional windows, combined by the regional
/// stage) and the one SPEC §4's fault policy parks batches on
/// (`plugin_dead_letter`). The set is closed: stages cannot invent topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    TelemetryReadings,
    Alerts,
    Aggregates1m,
    Aggregates15m,
    Aggregates1mRegional,
    AlertsProcessed,
    AlertStatusUpdates,
    TariffUpdates,
    RegionalPartials,
    PluginDeadLetter,
}

impl Topic {
    /// Every topic, in declaration order.
    pub const ALL: [Topic; 10] = [
        Topic::TelemetryReadings,
        Topic::Alerts,
        Topic::Aggregates1m,
        Topic::Aggregates15m,
        Topic::Aggregates1mRegional,
        Topic::AlertsProcessed,
        Topic::AlertStatusUpdates,
        Topic::TariffUpdates,
        Topic::RegionalPartials,
        Topic::PluginDeadLetter,
    ];

    /// The Kafka topic name (the seed's names, mixed `-` and `_` included).
    pub fn name(self) -> &'static str {
        match self {
            Topic::TelemetryReadings => "telemetry-readings",
            Topic::Alerts => "alerts",
            Topic::Aggregates1m => "aggregates_1m",
            Topic::Aggregates15m => "aggregates_15m",
            Topic::Aggregates1mRegional => "aggregates_1m_regional",
            Topic::AlertsProcessed => "alerts_processed",
            Topic::AlertStatusUpdates => "alert_status_updates",
            Topic::TariffUpdates => "tariff_updates",
            Topic::RegionalPartials => "aggregates_1m_regional_partials",
            Topic::PluginDeadLetter => "plugin_dead_letter",
        }
    }

    /// The topic called `name` (as [`Topic::name`] spells it), if any.
    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether only other clients read this topic: no stage of segs
    /// subscribes to it. The per-meter window topics are segs's output for
    /// the rest of the grid's systems; segs itself reads the windows from
    /// the store (aggregates_1m / aggregates_15m).
    pub fn is_output_only(self) -> bool {
        matches!(self, Topic::Aggregates1m | Topic::Aggregates15m)
    }

    /// Position in [`Topic::ALL`]; used to index per-topic arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One record as produced: Kafka's key, value, headers and timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Partitioning key (meterId, region, alertId, … per SPEC §5).
    pub key: Bytes,
    pub value: Bytes,
    pub headers: Vec<(String, String)>,
    /// Milliseconds since the Unix epoch (Kafka's CreateTime).
    pub timestamp_ms: i64,
}

impl Record {
    /// A record without headers.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>, timestamp_ms: i64) -> Record {
        Record {
            key: key.into(),
            value: value.into(),
            headers: Vec::new(),
            timestamp_ms,
        }
    }
}

/// A record as consumed: where it sits in the log, and the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub topic: Topic,
    pub partition: u32,
    pub offset: u64,
    pub record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Backpressure: the partition holds `lag` records its slowest consumer
    /// group has not committed, and the call would take it past the bound.
    /// Nothing of the call was appended; the caller answers 503 / retries.
    #[error(
        "bus is full: {topic} partition {partition} has {lag} uncommitted records; try again later"
    )]
    Full {
        topic: Topic,
        partition: u32,
        lag: usize,
    },
    /// The bus was shut down.
    #[error("bus is closed")]
    Closed,
    /// A commit found that partitions this member had polled records from
    /// (without committing them) now belong to another member of the group
    /// (Kafka: `CommitFailedException`). Those records will be redelivered to
    /// the new owner, so any state built from them must be discarded.
    /// Positions of partitions still owned were committed.
    #[error(
        "group {group} rebalanced: partitions {partitions:?} were reassigned before their records were committed"
    )]
    Rebalanced {
        group: String,
        partitions: Vec<(Topic, u32)>,
    },
    /// `subscribe` was called with no topics.
    #[error("consumer group {group}: subscribe needs at least one topic")]
    NoTopics { group: String },
    /// `delete_group` on a group that still has members (Kafka:
    /// `GroupNotEmptyException`).
    #[error("consumer group {group} still has {members} member(s)")]
    GroupNotEmpty { group: String, members: usize },
    /// `commit_positions` was asked to commit past what poll has returned
    /// from the partition. Nothing of the call was committed.
    #[error(
        "group {group}: cannot commit {topic} partition {partition} at offset {offset}: poll has only returned records up to {position}"
    )]
    CommitBeyondPosition {
        group: String,
        topic: Topic,
        partition: u32,
        offset: u64,
        position: u64,
    },
    /// The embedded bus's journal could not be opened, read or written.
    /// After a failed write the bus refuses every further write (the message
    /// says so); a restart recovers everything acknowledged before.
    #[error("bus journal: {0}")]
    Journal(String),
    /// An error from the Kafka client (production bus).
    #[error("kafka: {0}")]
    Kafka(String),
}

/// How far a topic's consumers are behind, as [`Bus::backlog`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backlog {
    /// The fullest partition's lag over its bound (1.0: full, produce is
    /// refused).
    pub fill: f64,
    /// Records waiting for the slowest group, summed over the partitions.
    pub waiting: u64,
    /// The lag bound of one partition.
    pub max_lag: u64,
}

/// Moves records between stages. Implemented by [`MemoryBus`] and, in
/// production, by the Kafka bus; both partition and group identically.
#[async_trait::async_trait]
pub trait Bus: Send + Sync {
    /// Appends the records; each goes to partition
    /// [`partition_for`]`(key, partitions)`, exactly as Kafka's Java default
    /// partitioner does (`toPositive(murmur2(key)) % n`), so a key lands on
    /// the same partition number in both implementations. Records of one call
    /// that share a partition are appended in call order. Returns once every
    /// record is held by the bus. All-or-nothing per call: if any target
    /// partition would go over its lag bound, nothing is appended and
    /// [`BusError::Full`] is returned (always, for a call that alone puts
    /// more than the bound on one partition of a consumed topic).
    async fn produce(&self, topic: Topic, records: Vec<Record>) -> Result<(), BusError>;

    /// Joins consumer group `group` on `topics`. Consumers of one group split
    /// the partitions between them (rebalanced when a member joins or leaves
    /// or is dropped); each group sees every record at least once (exactly
    /// once when every poll is followed by a successful commit); a new group
    /// starts from the earliest retained offset; a member joining an existing
    /// group resumes at the group's committed offsets.
    async fn subscribe(&self, group: &str, topics: &[Topic])
    -> Result<Box<dyn Consumer>, BusError>;

    /// Partitions of every topic.
    fn partitions(&self) -> u32;

    /// Whether anyone can read what is produced on `topic`, so whether a
    /// stage should produce it at all. Kafka's topics are read by other
    /// clients: every topic. The in-process bus is read only by this
    /// process: not the [output-only](Topic::is_output_only) topics.
    fn carries(&self, _topic: Topic) -> bool {
        true
    }

    /// Whether the bus can be reached now (readiness): Kafka answers a
    /// metadata request; the in-process bus is always there.
    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Records of `topics` that consumer group `group` has not committed
    /// yet, per topic and partition (end offset minus the group's committed
    /// offset; a group with nothing committed counts from the start of what
    /// the bus holds). For readiness and metrics: how far a stage is behind.
    async fn lag(&self, group: &str, topics: &[Topic]) -> Result<Vec<(Topic, u32, u64)>, BusError>;

    /// How full `topic` is under its lag bound, for callers that shed load
    /// before the bound is reached (ingest refuses early and evenly, and
    /// names a `Retry-After` from the backlog); `None` when the topic has
    /// no bound. Cheap: no I/O.
    fn backlog(&self, _topic: Topic) -> Option<Backlog> {
        None
    }

    /// Names the log the offsets belong to: the same for as long as offsets
    /// keep their meaning (a durable log reopened after a restart), a new
    /// one when they start over (a volatile bus in a new process). State
    /// checkpointed with positions applies only to the log it names.
    fn log_id(&self) -> &str;

    /// Records of `topic` stamped at or after `since_ms` that the bus still
    /// holds (a durable log's tail; nothing for a volatile bus). Used after
    /// a restart to rebuild state made of recent records, such as ingest's
    /// dedupe marks.
    async fn recent_records(&self, topic: Topic, since_ms: i64) -> Result<Vec<Record>, BusError>;
}

/// One member of a consumer group. Dropping it leaves the group; its
/// partitions go to the remaining members, who resume at the committed
/// offsets (uncommitted records are redelivered).
#[async_trait::async_trait]
pub trait Consumer: Send {
    /// Up to `max` records from the assigned partitions, waiting up to
    /// `timeout` when none is ready (an empty Vec then). Records of one
    /// partition come in offset order.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError>;

    /// Commits the position after everything returned by poll so far
    /// (Kafka: `commitSync()` of the positions). On the durable bus it
    /// returns once the offsets are on disk.
    async fn commit(&mut self) -> Result<(), BusError>;

    /// Commits exactly these next offsets (Kafka: `commitSync(Map)`), each
    /// for a partition this member owns and at most the position poll has
    /// reached there ([`BusError::CommitBeyondPosition`] otherwise, and
    /// nothing is committed). Partitions lost to a rebalance are reported as
    /// by [`Consumer::commit`]; the others are committed. Partitions not
    /// listed keep their committed offsets.
    async fn commit_positions(&mut self, positions: &[(Topic, u32, u64)]) -> Result<(), BusError>;

    /// As [`Consumer::commit`], but it may return once the commit is
    /// ordered, before it is durable (Kafka: `commitAsync`), so a stage
    /// goes on with its next poll meanwhile. Commits still land in order; a
    /// crash before this one is on disk replays from the one before, as a
    /// crash just before the call would; a failure is reported by a later
    /// call. By default the same as [`Consumer::commit`].
    async fn commit_soon(&mut self) -> Result<(), BusError> {
        self.commit().await
    }

    /// As [`Consumer::commit_positions`], returning as
    /// [`Consumer::commit_soon`] does.
    async fn commit_positions_soon(
        &mut self,
        positions: &[(Topic, u32, u64)],
    ) -> Result<(), BusError> {
        self.commit_positions(positions).await
    }

    /// Whether this member has read everything its partitions held when
    /// asked (a stage stopping drains its topics first). The in-process bus
    /// has nothing in flight: an empty poll means caught up, the default.
    async fn caught_up(&mut self) -> bool {
        true
    }

    /// Partitions currently assigned to this member.
    fn assignment(&self) -> Vec<(Topic, u32)>;
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), the hash
/// of the Java client's default partitioner, as the same signed 32-bit value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Java's `int length` and the wrapping arithmetic of `int`.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        if rest.len() == 3 {
            h ^= u32::from(rest[2]) << 16;
        }
        if rest.len() >= 2 {
            h ^= u32::from(rest[1]) << 8;
        }
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's Java default partitioner picks for a keyed record:
/// `toPositive(murmur2(key)) % partitions`. (librdkafka's default differs:
/// the Kafka bus must set `partitioner=murmur2_random` to agree with this.)
///
/// `partitions` must be at least 1; 0 is treated as 1.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let positive = (murmur2(key) as u32) & 0x7fff_ffff;
    positive % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's `UtilsTest.testMurmur2` vectors, plus the empty key.
    const JAVA_VECTORS: [(&[u8], i32); 7] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
        (b"", 275_646_681),
    ];

    #[test]
    fn murmur2_matches_the_java_client() {
        for (key, want) in JAVA_VECTORS {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partition_is_to_positive_modulo() {
        // toPositive(-790332482) = 1357151166.
        assert_eq!(partition_for(b"foobar", 10), 6);
        assert_eq!(partition_for(b"foobar", 50), 16);
        assert_eq!(partition_for(b"foobar", 1), 0);
        for (key, hash) in JAVA_VECTORS {
            for n in 1..=12u32 {
                assert_eq!(partition_for(key, n), ((hash as u32) & 0x7fff_ffff) % n);
            }
        }
    }

    #[test]
    fn topic_names_round_trip() {
        for t in Topic::ALL {
            assert_eq!(Topic::from_name(t.name()), Some(t));
            assert_eq!(Topic::ALL[t.index()], t);
        }
        assert_eq!(Topic::TelemetryReadings.name(), "telemetry-readings");
        assert_eq!(Topic::from_name("nope"), None);
    }
}
