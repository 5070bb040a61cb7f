//! The in-process bus: Kafka's semantics (keyed partitions, consumer groups,
//! committed offsets, at-least-once redelivery) without a broker, for
//! embedded mode and tests; durable when opened with
//! [`MemoryBus::open_durable`] (`bus.kind = "embedded"`), volatile when made
//! with [`MemoryBus::new`] (`bus.kind = "memory"`).
//!
//! Layout: per topic, `partitions` logs. A log is a `VecDeque<Record>` and the
//! offset of its first record, behind its own `parking_lot::Mutex`, with a
//! `tokio::sync::Notify` that wakes waiting consumers when records become
//! visible. Consumer-group state (members, generation, assignment, committed
//! offsets) sits behind one mutex; it is touched on subscribe, commit,
//! rebalance and drop, never per record.
//!
//! Lock order: the groups mutex, then partition mutexes in ascending index,
//! then the journal's queue mutex. `produce` takes only partition mutexes,
//! each once per call (and the queue mutex under them).
//!
//! Bounded memory: a partition keeps only what its slowest subscribed group
//! has not committed (records below every group's committed offset are
//! dropped on commit), and `produce` refuses with [`BusError::Full`] past
//! `max_lag_per_partition`. A topic no group has subscribed to keeps only its
//! newest `retain_unconsumed` records per partition (Kafka's
//! `retention.bytes`, counted in records). A group keeps its committed
//! offsets, and so holds back retention, after its last member leaves (as
//! Kafka keeps an empty group's offsets) until [`MemoryBus::delete_group`].
//!
//! Durability (with a journal, see [`super::journal`]): offsets are still
//! assigned under the partition lock and records appended to the in-memory
//! log at once, but each log also has a *durable end*: consumers read only
//! up to it, and it moves when the journal's writer thread has committed the
//! records. `produce` returns after that commit; `commit`,
//! `commit_positions` and a group's first subscription to a topic return
//! after the group's offsets are in the journal. So whatever was
//! acknowledged, and nothing a consumer could have seen without it being
//! acknowledgeable, is on disk; after a crash [`MemoryBus::open_durable`]
//! restores every partition from the lowest offset a group still needs and
//! every group's committed offsets (members rejoin and resume there), and
//! offsets continue where they were. Memory retention is as above; the
//! journal additionally keeps committed records for `retain_min` (see
//! [`MemoryBus::recent`]).
//!
//! Without a journal, records live in this process only: a crash loses
//! whatever was not consumed and committed downstream.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::journal::{self, Journal, JournalOptions, Op};
use super::{Bus, BusError, Consumer, Delivered, Record, Topic, partition_for};

/// Records kept per partition of a topic no consumer group has subscribed to.
pub const DEFAULT_RETAIN_UNCONSUMED: usize = 10_000;

/// The in-process bus. Cloning is cheap and shares the bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

/// One partition's position, for a status line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicStats {
    pub topic: Topic,
    pub partition: u32,
    /// Offset of the oldest record still held.
    pub start_offset: u64,
    /// Offset the next record will get.
    pub end_offset: u64,
    /// Committed offset of every group subscribed to the topic, by name.
    pub groups: Vec<(String, u64)>,
}

struct Inner {
    /// See [`Bus::log_id`]: new for every volatile bus.
    log_id: String,
    partitions: u32,
    max_lag: usize,
    retain_unconsumed: usize,
    /// `[topic.index()][partition]`. Shared with the journal's writer
    /// thread, which moves durable ends.
    topics: Arc<Vec<Vec<Partition>>>,
    groups: Mutex<HashMap<String, Group>>,
    next_member: AtomicU64,
    closed: AtomicBool,
    /// `None`: volatile (records are visible once appended).
    journal: Option<Journal>,
}

struct Partition {
    log: Mutex<Log>,
    /// Woken (all waiters) after records are appended, and on close.
    appended: Notify,
}

struct Log {
    /// Offset of `records[0]`.
    base: u64,
    records: VecDeque<Record>,
    /// Smallest committed offset among the groups subscribed to the topic;
    /// `None` while no group is. Lag is measured from here, and records
    /// below it are dropped.
    floor: Option<u64>,
    /// Records below this offset are in the journal (always `end()` when
    /// there is none); consumers read only up to here.
    durable: u64,
}

impl Log {
    fn end(&self) -> u64 {
        self.base + self.records.len() as u64
    }

    /// Drops records below `offset`.
    fn trim_to(&mut self, offset: u64) {
        let n = offset
            .saturating_sub(self.base)
            .min(self.records.len() as u64) as usize;
        if n > 0 {
            self.records.drain(..n);
            self.base += n as u64;
        }
    }

    /// Keeps only the newest `keep` records.
    fn trim_to_newest(&mut self, keep: usize) {
        let excess = self.records.len().saturating_sub(keep);
        if excess > 0 {
            self.records.drain(..excess);
            self.base += excess as u64;
        }
    }
}

/// What a member's poll loop reads without the groups mutex.
struct GroupShared {
    generation: AtomicU64,
    /// Woken (all waiters) on every rebalance and on close.
    rebalanced: Notify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    member: u64,
    /// Generation at which `member` got the partition; unchanged while it
    /// keeps it across rebalances. A member's position is only valid, and
    /// its commit only accepted, while (member, epoch) still matches.
    epoch: u64,
}

struct Group {
    shared: Arc<GroupShared>,
    generation: u64,
    /// Member id → its topics. Ordered by id, i.e. by join order.
    members: BTreeMap<u64, Vec<Topic>>,
    /// Topics any member has ever subscribed to (their offsets are kept).
    subscribed: [bool; Topic::ALL.len()],
    committed: HashMap<(Topic, u32), u64>,
    owners: HashMap<(Topic, u32), Owner>,
}

impl Group {
    fn new() -> Group {
        Group {
            shared: Arc::new(GroupShared {
                generation: AtomicU64::new(0),
                rebalanced: Notify::new(),
            }),
            generation: 0,
            members: BTreeMap::new(),
            subscribed: [false; Topic::ALL.len()],
            committed: HashMap::new(),
            owners: HashMap::new(),
        }
    }

    /// New generation; per topic, Kafka's range assignment over the members
    /// subscribed to it (in join order). A member that keeps a partition
    /// keeps its epoch, and so its position.
    fn rebalance(&mut self, partitions: u32) {
        self.generation += 1;
        let mut owners = HashMap::with_capacity(self.owners.len());
        for topic in Topic::ALL {
            let members: Vec<u64> = self
                .members
                .iter()
                .filter(|(_, topics)| topics.contains(&topic))
                .map(|(id, _)| *id)
                .collect();
            if members.is_empty() {
                continue;
            }
            let m = members.len() as u32;
            let (per, extra) = (partitions / m, partitions % m);
            for (i, &member) in members.iter().enumerate() {
                let i = i as u32;
                let start = i * per + i.min(extra);
                let len = per + u32::from(i < extra);
                for p in start..start + len {
                    let epoch = match self.owners.get(&(topic, p)) {
                        Some(o) if o.member == member => o.epoch,
                        _ => self.generation,
                    };
                    owners.insert((topic, p), Owner { member, epoch });
                }
            }
        }
        self.owners = owners;
        self.shared
            .generation
            .store(self.generation, Ordering::Release);
        self.shared.rebalanced.notify_waiters();
    }
}

impl MemoryBus {
    /// A bus with `partitions` partitions per topic (at least 1) that refuses
    /// producers once a partition holds `max_lag_per_partition` records its
    /// slowest group has not committed.
    pub fn new(partitions: u32, max_lag_per_partition: usize) -> MemoryBus {
        MemoryBus::with_retention(partitions, max_lag_per_partition, DEFAULT_RETAIN_UNCONSUMED)
    }

    /// As [`MemoryBus::new`], keeping `retain_unconsumed` records per
    /// partition of topics no group has subscribed to.
    pub fn with_retention(
        partitions: u32,
        max_lag_per_partition: usize,
        retain_unconsumed: usize,
    ) -> MemoryBus {
        let partitions = partitions.max(1);
        MemoryBus {
            inner: Arc::new(Inner {
                log_id: format!("memory-{}", uuid::Uuid::new_v4()),
                partitions,
                max_lag: max_lag_per_partition,
                retain_unconsumed,
                topics: Arc::new(empty_topics(partitions)),
                groups: Mutex::new(HashMap::new()),
                next_member: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                journal: None,
            }),
        }
    }

    /// A durable bus on the journal `opts.path` (created if missing): what
    /// it held is restored (records from the lowest offset any group still
    /// needs, every group's committed offsets, the next offset of every
    /// partition), and from now on `produce` and commits return only once
    /// they are in the journal. Refused if the journal was made with another
    /// partition count. Blocking (reads the file).
    pub fn open_durable(
        partitions: u32,
        max_lag_per_partition: usize,
        opts: JournalOptions,
    ) -> Result<MemoryBus, BusError> {
        let partitions = partitions.max(1);
        let topics = Arc::new(empty_topics(partitions));
        let on_durable = {
            let topics = topics.clone();
            Box::new(move |ends: &[(Topic, u32, u64)]| {
                for &(topic, p, end) in ends {
                    let part = &topics[topic.index()][p as usize];
                    {
                        let mut log = part.log.lock();
                        log.durable = log.durable.max(end);
                    }
                    part.appended.notify_waiters();
                }
            })
        };
        let (journal, recovered) = Journal::open(&opts, partitions, on_durable)?;
        let mut groups = HashMap::new();
        for (name, committed) in recovered.groups {
            let mut g = Group::new();
            for &(topic, _) in committed.keys() {
                g.subscribed[topic.index()] = true;
            }
            g.committed = committed;
            groups.insert(name, g);
        }
        let mut logs = recovered.logs;
        for topic in Topic::ALL {
            for p in 0..partitions {
                let (base, records) = logs.remove(&(topic, p)).unwrap_or_default();
                let mut log = topics[topic.index()][p as usize].log.lock();
                log.base = base;
                log.records = records.into();
                log.durable = log.end();
            }
        }
        let inner = Inner {
            log_id: recovered.log_id,
            partitions,
            max_lag: max_lag_per_partition,
            retain_unconsumed: opts.retain_unconsumed,
            topics,
            groups: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            journal: Some(journal),
        };
        for topic in Topic::ALL {
            for p in 0..partitions {
                inner.update_floor(&groups, topic, p);
                let mut log = inner.partition(topic, p).log.lock();
                if log.floor.is_none() {
                    log.trim_to_newest(inner.retain_unconsumed);
                }
            }
        }
        *inner.groups.lock() = groups;
        Ok(MemoryBus {
            inner: Arc::new(inner),
        })
    }

    /// Whether this bus keeps a journal ([`MemoryBus::open_durable`]).
    pub fn is_durable(&self) -> bool {
        self.inner.journal.is_some()
    }

    /// Records of `topic` with `timestamp_ms >= since_ms` still in the
    /// journal (committed ones are kept there for `retain_min`), by
    /// partition and offset; empty for a volatile bus. Blocking (reads the
    /// file). Used after a restart to rebuild state that depends on recent
    /// records, such as ingest's dedupe marks.
    pub fn recent(&self, topic: Topic, since_ms: i64) -> Result<Vec<Record>, BusError> {
        match &self.inner.journal {
            Some(j) => j.recent(topic, since_ms),
            None => Ok(Vec::new()),
        }
    }

    /// Every partition of every topic with its offsets and the committed
    /// offsets of the groups subscribed to the topic.
    pub fn stats(&self) -> Vec<TopicStats> {
        let groups = self.inner.groups.lock();
        let mut names: Vec<&String> = groups.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(Topic::ALL.len() * self.inner.partitions as usize);
        for topic in Topic::ALL {
            for p in 0..self.inner.partitions {
                let (start_offset, end_offset) = {
                    let log = self.inner.partition(topic, p).log.lock();
                    (log.base, log.end())
                };
                let group_offsets = names
                    .iter()
                    .filter_map(|name| {
                        let g = &groups[*name];
                        if !g.subscribed[topic.index()] {
                            return None;
                        }
                        let c = g.committed.get(&(topic, p)).copied().unwrap_or(0);
                        Some(((*name).clone(), c))
                    })
                    .collect();
                out.push(TopicStats {
                    topic,
                    partition: p,
                    start_offset,
                    end_offset,
                    groups: group_offsets,
                });
            }
        }
        out
    }

    /// Forgets an empty group's committed offsets so that it no longer holds
    /// back retention (Kafka: `deleteConsumerGroups`). Returns whether the
    /// group existed.
    pub fn delete_group(&self, group: &str) -> Result<bool, BusError> {
        let mut groups = self.inner.groups.lock();
        let Some(g) = groups.get(group) else {
            return Ok(false);
        };
        if !g.members.is_empty() {
            return Err(BusError::GroupNotEmpty {
                group: group.to_owned(),
                members: g.members.len(),
            });
        }
        let subscribed = g.subscribed;
        groups.remove(group);
        if let Some(j) = &self.inner.journal {
            j.enqueue_detached(Op::DeleteGroup(group.to_owned()));
        }
        for topic in Topic::ALL {
            if subscribed[topic.index()] {
                for p in 0..self.inner.partitions {
                    self.inner.update_floor(&groups, topic, p);
                }
            }
        }
        Ok(true)
    }

    /// Shuts the bus: producers get [`BusError::Closed`]; consumers get what
    /// is already there, then [`BusError::Closed`]. Waiting polls wake.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for parts in self.inner.topics.iter() {
            for part in parts {
                part.appended.notify_waiters();
            }
        }
        for g in self.inner.groups.lock().values() {
            g.shared.rebalanced.notify_waiters();
        }
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

fn empty_topics(partitions: u32) -> Vec<Vec<Partition>> {
    Topic::ALL
        .iter()
        .map(|_| {
            (0..partitions)
                .map(|_| Partition {
                    log: Mutex::new(Log {
                        base: 0,
                        records: VecDeque::new(),
                        floor: None,
                        durable: 0,
                    }),
                    appended: Notify::new(),
                })
                .collect()
        })
        .collect()
}

impl Inner {
    fn partition(&self, topic: Topic, p: u32) -> &Partition {
        &self.topics[topic.index()][p as usize]
    }

    /// Recomputes the floor of one partition from the groups subscribed to
    /// its topic, and drops what every one of them has committed.
    fn update_floor(&self, groups: &HashMap<String, Group>, topic: Topic, p: u32) {
        let floor = groups
            .values()
            .filter(|g| g.subscribed[topic.index()])
            .map(|g| g.committed.get(&(topic, p)).copied().unwrap_or(0))
            .min();
        let mut log = self.partition(topic, p).log.lock();
        log.floor = floor;
        if let Some(f) = floor {
            log.trim_to(f);
        }
    }
}

#[async_trait::async_trait]
impl Bus for MemoryBus {
    async fn produce(&self, topic: Topic, records: Vec<Record>) -> Result<(), BusError> {
        if self.is_closed() {
            return Err(BusError::Closed);
        }
        let inner = &*self.inner;
        if let Some(e) = inner.journal.as_ref().and_then(Journal::failed) {
            return Err(e);
        }
        if records.is_empty() {
            return Ok(());
        }
        let n = inner.partitions;
        let mut buckets: Vec<Vec<Record>> = (0..n).map(|_| Vec::new()).collect();
        for r in records {
            let p = partition_for(&r.key, n) as usize;
            buckets[p].push(r);
        }
        // Encoded before any lock is taken; the offset goes beside the blob.
        let mut blobs: Vec<Option<(Vec<u8>, i64)>> = match inner.journal {
            Some(_) => buckets
                .iter()
                .map(|b| {
                    (!b.is_empty()).then(|| {
                        let max_ts = b.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
                        (journal::encode(b), max_ts)
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        let parts = &inner.topics[topic.index()];
        let (touched, written) = {
            // Every target partition locked at once (ascending), so the
            // check and the append see the same logs: all or nothing.
            let mut guards: Vec<_> = parts
                .iter()
                .enumerate()
                .filter(|(p, _)| !buckets[*p].is_empty())
                .map(|(p, part)| (p, part.log.lock()))
                .collect();
            for (p, log) in &guards {
                if let Some(floor) = log.floor {
                    let lag = log.end().saturating_sub(floor) as usize;
                    if lag + buckets[*p].len() > inner.max_lag {
                        return Err(BusError::Full {
                            topic,
                            partition: *p as u32,
                            lag,
                        });
                    }
                }
            }
            let mut appends = Vec::new();
            for (p, log) in &mut guards {
                let base = log.end();
                let count = buckets[*p].len() as u64;
                log.records.extend(std::mem::take(&mut buckets[*p]));
                if let Some((blob, max_ts)) = blobs.get_mut(*p).and_then(Option::take) {
                    appends.push(journal::Append {
                        topic,
                        partition: *p as u32,
                        base,
                        count,
                        max_ts,
                        blob,
                    });
                } else {
                    log.durable = log.end();
                }
                if log.floor.is_none() {
                    log.trim_to_newest(inner.retain_unconsumed);
                }
            }
            // Queued under the partition locks: queue order is offset order.
            let written = inner
                .journal
                .as_ref()
                .map(|j| j.enqueue(Op::Append(appends)));
            (guards.iter().map(|(p, _)| *p).collect::<Vec<_>>(), written)
        };
        match written {
            // The writer thread moves the durable ends and wakes consumers.
            Some(rx) => Journal::wait(rx).await,
            None => {
                for p in touched {
                    parts[p].appended.notify_waiters();
                }
                Ok(())
            }
        }
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
        if self.is_closed() {
            return Err(BusError::Closed);
        }
        let inner = &*self.inner;
        let mut topics = topics.to_vec();
        topics.sort();
        topics.dedup();
        if let Some(e) = inner.journal.as_ref().and_then(Journal::failed) {
            return Err(e);
        }
        let member = inner.next_member.fetch_add(1, Ordering::Relaxed);
        let (shared, written) = {
            let mut groups = inner.groups.lock();
            let g = groups.entry(group.to_owned()).or_insert_with(Group::new);
            let mut start = Vec::new();
            for &topic in &topics {
                if g.subscribed[topic.index()] {
                    continue;
                }
                g.subscribed[topic.index()] = true;
                for p in 0..inner.partitions {
                    // Start at the earliest retained offset, and hold it
                    // from now on (under the same lock, so nothing is
                    // trimmed in between).
                    let mut log = inner.partition(topic, p).log.lock();
                    let base = log.base;
                    log.floor = Some(log.floor.map_or(base, |f| f.min(base)));
                    g.committed.insert((topic, p), base);
                    start.push((topic, p, base));
                }
            }
            g.members.insert(member, topics);
            g.rebalance(inner.partitions);
            // The group's starting offsets go to the journal too, so that
            // journal retention holds back for it from now on.
            let written = match &inner.journal {
                Some(j) if !start.is_empty() => Some(j.enqueue(Op::Offsets {
                    group: group.to_owned(),
                    offsets: start,
                })),
                _ => None,
            };
            (g.shared.clone(), written)
        };
        let mut consumer = MemoryConsumer {
            inner: self.inner.clone(),
            group: group.to_owned(),
            shared,
            member,
            seen_generation: 0,
            owned: Vec::new(),
            cursor: 0,
            lost: Vec::new(),
        };
        consumer.refresh();
        if let Some(rx) = written {
            // Dropping the consumer on failure leaves the group again.
            Journal::wait(rx).await?;
        }
        Ok(Box::new(consumer))
    }

    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// Not the output-only topics: nothing outside this process reads an
    /// in-process bus, and no stage reads those.
    fn carries(&self, topic: Topic) -> bool {
        !topic.is_output_only()
    }

    fn log_id(&self) -> &str {
        &self.inner.log_id
    }

    async fn lag(&self, group: &str, topics: &[Topic]) -> Result<Vec<(Topic, u32, u64)>, BusError> {
        let groups = self.inner.groups.lock();
        let g = groups.get(group);
        let mut behind = Vec::new();
        for &topic in topics {
            for p in 0..self.inner.partitions {
                let (base, end) = {
                    let log = self.inner.partition(topic, p).log.lock();
                    (log.base, log.end())
                };
                let committed = g
                    .and_then(|g| g.committed.get(&(topic, p)).copied())
                    .unwrap_or(base)
                    .max(base);
                behind.push((topic, p, end.saturating_sub(committed)));
            }
        }
        Ok(behind)
    }

    fn backlog(&self, topic: Topic) -> Option<super::Backlog> {
        let max = self.inner.max_lag.max(1) as u64;
        let mut out = super::Backlog {
            fill: 0.0,
            waiting: 0,
            max_lag: max,
        };
        let mut bounded = false;
        for part in &self.inner.topics[topic.index()] {
            let log = part.log.lock();
            if let Some(floor) = log.floor {
                bounded = true;
                let lag = log.end().saturating_sub(floor);
                out.waiting += lag;
                out.fill = out.fill.max(lag as f64 / max as f64);
            }
        }
        bounded.then_some(out)
    }

    async fn recent_records(&self, topic: Topic, since_ms: i64) -> Result<Vec<Record>, BusError> {
        let bus = self.clone();
        tokio::task::spawn_blocking(move || bus.recent(topic, since_ms))
            .await
            .map_err(|e| BusError::Journal(format!("reading the journal panicked: {e}")))?
    }
}

/// A partition this member owns, and how far it has read and committed.
#[derive(Clone, Debug)]
struct Owned {
    topic: Topic,
    partition: u32,
    epoch: u64,
    /// Offset of the next record poll returns.
    position: u64,
    /// Position as of the last commit (or of getting the partition).
    committed: u64,
}

struct MemoryConsumer {
    inner: Arc<Inner>,
    group: String,
    shared: Arc<GroupShared>,
    member: u64,
    seen_generation: u64,
    /// Sorted by (topic, partition).
    owned: Vec<Owned>,
    /// Where the next poll starts among `owned`, rotated for fairness.
    cursor: usize,
    /// Partitions lost to a rebalance with records polled but not committed;
    /// reported by the next commit.
    lost: Vec<(Topic, u32)>,
}

impl MemoryConsumer {
    /// Catches up with the group's latest assignment, if it changed.
    fn refresh(&mut self) {
        if self.shared.generation.load(Ordering::Acquire) == self.seen_generation {
            return;
        }
        let groups = self.inner.groups.lock();
        let Some(g) = groups.get(&self.group) else {
            return;
        };
        let mut next = Vec::new();
        for (&(topic, partition), owner) in &g.owners {
            if owner.member != self.member {
                continue;
            }
            let same =
                |x: &&Owned| x.topic == topic && x.partition == partition && x.epoch == owner.epoch;
            next.push(match self.owned.iter().find(same) {
                // Kept across the rebalance: carry on where we were.
                Some(kept) => kept.clone(),
                // New to us: start at the group's committed offset.
                None => {
                    let c = g.committed.get(&(topic, partition)).copied().unwrap_or(0);
                    Owned {
                        topic,
                        partition,
                        epoch: owner.epoch,
                        position: c,
                        committed: c,
                    }
                }
            });
        }
        next.sort_by_key(|o| (o.topic, o.partition));
        for old in &self.owned {
            let kept = next.iter().any(|x| {
                x.topic == old.topic && x.partition == old.partition && x.epoch == old.epoch
            });
            if !kept && old.position > old.committed {
                self.lost.push((old.topic, old.partition));
            }
        }
        self.owned = next;
        self.seen_generation = g.generation;
    }

    /// Up to `max` records available now, rotating the starting partition.
    fn take(&mut self, max: usize) -> Vec<Delivered> {
        let n = self.owned.len();
        let mut out = Vec::new();
        if n == 0 || max == 0 {
            return out;
        }
        for k in 0..n {
            let remaining = max - out.len();
            if remaining == 0 {
                break;
            }
            let i = (self.cursor + k) % n;
            let o = &mut self.owned[i];
            let log = self.inner.partition(o.topic, o.partition).log.lock();
            if o.position < log.base {
                tracing::warn!(
                    group = %self.group,
                    topic = %o.topic,
                    partition = o.partition,
                    position = o.position,
                    earliest = log.base,
                    "position below retained records; resuming at the earliest"
                );
                o.position = log.base;
            }
            let end = log.durable.min(log.end());
            if o.position >= end {
                continue;
            }
            let start = (o.position - log.base) as usize;
            let count = remaining.min((end - o.position) as usize);
            out.reserve(count);
            for (j, record) in log.records.range(start..start + count).enumerate() {
                out.push(Delivered {
                    topic: o.topic,
                    partition: o.partition,
                    offset: o.position + j as u64,
                    record: record.clone(),
                });
            }
            o.position += count as u64;
        }
        self.cursor = (self.cursor + 1) % n;
        out
    }

    fn closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The position after everything polled, per owned partition.
    fn polled_positions(&mut self) -> Vec<(Topic, u32, u64)> {
        self.refresh();
        self.owned
            .iter()
            .map(|o| (o.topic, o.partition, o.position))
            .collect()
    }

    /// Refuses positions beyond what poll has reached.
    fn check_positions(&mut self, positions: &[(Topic, u32, u64)]) -> Result<(), BusError> {
        self.refresh();
        for &(topic, partition, offset) in positions {
            if let Some(o) = self
                .owned
                .iter()
                .find(|o| o.topic == topic && o.partition == partition)
                && offset > o.position
            {
                return Err(BusError::CommitBeyondPosition {
                    group: self.group.clone(),
                    topic,
                    partition,
                    offset,
                    position: o.position,
                });
            }
        }
        Ok(())
    }

    /// Commits `offsets` (each at most the partition's position) of the
    /// partitions this member still owns; the others are reported as lost
    /// to a rebalance. In memory at once; `wait`: returns once the journal
    /// has them on disk, else once they are queued there (in order).
    async fn commit_offsets(
        &mut self,
        offsets: &[(Topic, u32, u64)],
        wait: bool,
    ) -> Result<(), BusError> {
        let inner = self.inner.clone();
        if let Some(e) = inner.journal.as_ref().and_then(Journal::failed) {
            return Err(e);
        }
        let written = {
            let groups_guard = &mut *inner.groups.lock();
            let mut changed = Vec::new();
            if let Some(g) = groups_guard.get_mut(&self.group) {
                for &(topic, partition, offset) in offsets {
                    let tp = (topic, partition);
                    let Some(o) = self
                        .owned
                        .iter_mut()
                        .find(|o| o.topic == topic && o.partition == partition)
                    else {
                        // Not ours (any more): what was polled from it is
                        // redelivered to its owner.
                        self.lost.push(tp);
                        continue;
                    };
                    if offset == o.committed {
                        continue;
                    }
                    match g.owners.get(&tp) {
                        Some(owner) if owner.member == self.member && owner.epoch == o.epoch => {
                            g.committed.insert(tp, offset);
                            changed.push((topic, partition, offset));
                        }
                        // Reassigned since our last look: the new owner starts
                        // from the committed offset, so what we polled will be
                        // redelivered there.
                        _ => self.lost.push(tp),
                    }
                    o.committed = offset;
                }
            }
            for &(topic, p, _) in &changed {
                inner.update_floor(groups_guard, topic, p);
            }
            // Queued under the groups lock: queue order is commit order.
            match &inner.journal {
                Some(j) if !changed.is_empty() => {
                    let op = Op::Offsets {
                        group: self.group.clone(),
                        offsets: changed,
                    };
                    if wait {
                        Some(j.enqueue(op))
                    } else {
                        j.enqueue_unconfirmed(op);
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(rx) = written {
            Journal::wait(rx).await?;
        }
        if self.lost.is_empty() {
            return Ok(());
        }
        let mut partitions = std::mem::take(&mut self.lost);
        partitions.sort();
        partitions.dedup();
        Err(BusError::Rebalanced {
            group: self.group.clone(),
            partitions,
        })
    }
}

#[async_trait::async_trait]
impl Consumer for MemoryConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.refresh();
            let out = self.take(max);
            if !out.is_empty() {
                return Ok(out);
            }
            if self.closed() {
                return Err(BusError::Closed);
            }
            if max == 0 || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }

            // Register for wake-ups first, then look again, so that records
            // appended (or a rebalance) between the look and the wait are
            // not missed.
            let inner = self.inner.clone();
            let shared = self.shared.clone();
            let mut rebalanced = std::pin::pin!(shared.rebalanced.notified());
            rebalanced.as_mut().enable();
            let mut appended: Vec<Pin<Box<tokio::sync::futures::Notified<'_>>>> = self
                .owned
                .iter()
                .map(|o| Box::pin(inner.partition(o.topic, o.partition).appended.notified()))
                .collect();
            for a in &mut appended {
                a.as_mut().enable();
            }
            if self.shared.generation.load(Ordering::Acquire) != self.seen_generation {
                continue;
            }
            let out = self.take(max);
            if !out.is_empty() {
                return Ok(out);
            }
            if self.closed() {
                return Err(BusError::Closed);
            }
            let any_appended = async {
                if appended.is_empty() {
                    std::future::pending::<()>().await;
                } else {
                    futures::future::select_all(appended).await;
                }
            };
            tokio::select! {
                _ = rebalanced => {}
                _ = any_appended => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        let all = self.polled_positions();
        self.commit_offsets(&all, true).await
    }

    async fn commit_soon(&mut self) -> Result<(), BusError> {
        let all = self.polled_positions();
        self.commit_offsets(&all, false).await
    }

    async fn commit_positions(&mut self, positions: &[(Topic, u32, u64)]) -> Result<(), BusError> {
        self.check_positions(positions)?;
        self.commit_offsets(positions, true).await
    }

    async fn commit_positions_soon(
        &mut self,
        positions: &[(Topic, u32, u64)],
    ) -> Result<(), BusError> {
        self.check_positions(positions)?;
        self.commit_offsets(positions, false).await
    }

    fn assignment(&self) -> Vec<(Topic, u32)> {
        let groups = self.inner.groups.lock();
        let mut out: Vec<(Topic, u32)> = groups
            .get(&self.group)
            .map(|g| {
                g.owners
                    .iter()
                    .filter(|(_, o)| o.member == self.member)
                    .map(|(tp, _)| *tp)
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for MemoryConsumer {
    /// Leaves the group without committing: the partitions go to the other
    /// members, who resume at the committed offsets.
    fn drop(&mut self) {
        let mut groups = self.inner.groups.lock();
        if let Some(g) = groups.get_mut(&self.group) {
            g.members.remove(&self.member);
            g.rebalance(self.inner.partitions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, value: &str) -> Record {
        Record::new(key.to_owned(), value.to_owned(), 0)
    }

    const T: Topic = Topic::TelemetryReadings;

    async fn drain(c: &mut dyn Consumer) -> Vec<Delivered> {
        let mut all = Vec::new();
        loop {
            let got = c.poll(1000, Duration::ZERO).await.expect("poll");
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
    }

    #[tokio::test]
    async fn backlog_says_when_a_batch_would_no_longer_fit() {
        let bus = MemoryBus::new(1, 1000);
        let _c = bus
            .subscribe("g", &[Topic::TelemetryReadings])
            .await
            .unwrap();
        // Whether `room` more records would go over the bound, as ingest
        // decides it from the backlog.
        let fits = |room: u64| {
            let b = bus.backlog(Topic::TelemetryReadings).unwrap();
            b.waiting + room <= b.max_lag
        };
        assert!(fits(100));
        let records: Vec<Record> = (0..950)
            .map(|i| Record::new(vec![1u8], vec![i as u8], 0))
            .collect();
        bus.produce(Topic::TelemetryReadings, records)
            .await
            .unwrap();
        assert!(fits(50));
        assert!(!fits(51));
        assert_eq!(bus.backlog(Topic::TelemetryReadings).unwrap().fill, 0.95);
        assert!(
            bus.backlog(Topic::Alerts).is_none(),
            "no group holds alerts back"
        );
    }

    #[tokio::test]
    async fn produce_goes_to_the_kafka_partition_in_order() {
        let bus = MemoryBus::new(3, 10_000);
        let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
        let records: Vec<Record> = (0..30)
            .map(|i| rec(&format!("MTR-{:08}", i % 7), &i.to_string()))
            .collect();
        bus.produce(T, records).await.expect("produce");
        let got = drain(&mut *c).await;
        assert_eq!(got.len(), 30);
        for d in &got {
            assert_eq!(d.partition, partition_for(&d.record.key, 3));
        }
        // Per key, values come in production order.
        for k in 0..7 {
            let key = format!("MTR-{k:08}");
            let values: Vec<u32> = got
                .iter()
                .filter(|d| d.record.key == key.as_bytes())
                .map(|d| {
                    std::str::from_utf8(&d.record.value)
                        .unwrap()
                        .parse()
                        .unwrap()
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort();
            assert_eq!(values, sorted, "{key}");
        }
    }

    #[tokio::test]
    async fn full_appends_nothing() {
        let bus = MemoryBus::new(1, 5);
        let _c = bus.subscribe("g", &[T]).await.expect("subscribe");
        bus.produce(T, (0..4).map(|i| rec("k", &i.to_string())).collect())
            .await
            .expect("first");
        let err = bus
            .produce(T, (0..2).map(|i| rec("k", &i.to_string())).collect())
            .await
            .expect_err("over the bound");
        assert!(
            matches!(
                err,
                BusError::Full {
                    topic: T,
                    partition: 0,
                    lag: 4
                }
            ),
            "{err:?}"
        );
        assert_eq!(bus.stats()[0].end_offset, 4);
    }

    #[tokio::test]
    async fn unsubscribed_topic_keeps_only_the_newest() {
        let bus = MemoryBus::with_retention(1, 10, 3);
        // No group: no backpressure, bounded retention.
        for i in 0..20 {
            bus.produce(T, vec![rec("k", &i.to_string())])
                .await
                .expect("produce");
        }
        let s = &bus.stats()[0];
        assert_eq!((s.start_offset, s.end_offset), (17, 20));
        let mut c = bus.subscribe("late", &[T]).await.expect("subscribe");
        let got = drain(&mut *c).await;
        assert_eq!(
            got.iter().map(|d| d.offset).collect::<Vec<_>>(),
            [17, 18, 19]
        );
    }

    #[tokio::test]
    async fn delete_group_releases_retention() {
        let bus = MemoryBus::with_retention(1, 1000, 2);
        let c = bus.subscribe("g", &[T]).await.expect("subscribe");
        assert!(matches!(
            bus.delete_group("g"),
            Err(BusError::GroupNotEmpty { members: 1, .. })
        ));
        drop(c);
        bus.produce(T, (0..5).map(|i| rec("k", &i.to_string())).collect())
            .await
            .expect("produce");
        assert_eq!(
            bus.stats()[0].start_offset,
            0,
            "empty group still holds its offsets"
        );
        assert!(bus.delete_group("g").expect("delete"));
        bus.produce(T, vec![rec("k", "5")]).await.expect("produce");
        assert_eq!(bus.stats()[0].start_offset, 4);
    }

    #[tokio::test]
    async fn close_drains_then_refuses() {
        let bus = MemoryBus::new(1, 100);
        let mut c = bus.subscribe("g", &[T]).await.expect("subscribe");
        bus.produce(T, vec![rec("k", "v")]).await.expect("produce");
        bus.close();
        assert_eq!(c.poll(10, Duration::ZERO).await.expect("drain").len(), 1);
        assert!(matches!(
            c.poll(10, Duration::from_secs(30)).await,
            Err(BusError::Closed)
        ));
        assert!(matches!(
            bus.produce(T, vec![rec("k", "v")]).await,
            Err(BusError::Closed)
        ));
    }

    #[test]
    fn range_assignment_covers_every_partition_once() {
        for members in 1..6u64 {
            let mut g = Group::new();
            for m in 0..members {
                g.members.insert(m, vec![T]);
            }
            g.rebalance(7);
            let mut per_member = vec![0; members as usize];
            for p in 0..7 {
                let o = g.owners[&(T, p)];
                per_member[o.member as usize] += 1;
            }
            let (min, max) = (per_member.iter().min(), per_member.iter().max());
            assert!(
                max.zip(min).is_some_and(|(a, b)| a - b <= 1),
                "{per_member:?}"
            );
            assert_eq!(g.owners.len(), 7);
        }
    }
}
