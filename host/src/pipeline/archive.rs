//! The archive stage (`raw-archive-group` on `telemetry-readings`): every
//! reading into `raw_readings`, in one store call per poll.
//!
//! It runs in its own consumer group so a slow database delays only the
//! archive (and, through the bus's lag bound, ingest), never the windows.
//!
//! Pipelined: while the store writes one poll's records, the next poll is
//! read; up to [`IN_FLIGHT`] writes are under way at once, each handed to
//! the store only once the one before is stored (a partition's records
//! reach the store in offset order: the embedded archive tells a replay by
//! the partition's archived offset, so a later write stored first would
//! make an earlier one look replayed). Offsets are committed only through
//! the oldest write not yet stored, so a crash replays whatever was not,
//! and the store keeps a replayed reading once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{CommitPoint, Context, Stage, with_retry};
use crate::bus::{Delivered, Topic};
use crate::store::RawRecord;

/// Store writes under way at once (the one being written, the next
/// queued behind it).
const IN_FLIGHT: usize = 2;

/// Next offsets per partition.
type Positions = Vec<(Topic, u32, u64)>;

pub struct ArchiveStage {
    ctx: Context,
    /// Writes under way, oldest first, each with the positions it covers.
    writing: VecDeque<(JoinHandle<()>, Positions)>,
    /// Next offsets stored, per partition, not yet handed to the driver.
    stored: BTreeMap<(Topic, u32), u64>,
    /// Partitions the consumer owns now.
    assignment: Vec<(Topic, u32)>,
    /// A write task failed (a panic): nothing is committed any more, so
    /// its records are archived again after a restart.
    broken: bool,
    /// Fires when the newest write under way is stored; the next one waits
    /// for it (and writes nothing if it is gone unstored).
    newest: Option<oneshot::Receiver<()>>,
}

impl Stage for ArchiveStage {
    const NAME: &'static str = "archive";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        // The records themselves (their bytes shared, not copied): the
        // store reads the readings out of them (the embedded store on its
        // archive thread, keeping each as its JSON).
        let batch: std::sync::Arc<[RawRecord]> = records
            .iter()
            .map(|d| RawRecord {
                partition: d.partition,
                offset: d.offset,
                value: d.record.value.clone(),
            })
            .collect();
        let mut positions: Positions = Vec::new();
        for d in records {
            match positions
                .iter_mut()
                .find(|(t, p, _)| (*t, *p) == (d.topic, d.partition))
            {
                Some(at) => at.2 = at.2.max(d.offset + 1),
                None => positions.push((d.topic, d.partition, d.offset + 1)),
            }
        }
        while self.writing.len() >= IN_FLIGHT {
            self.wait_oldest().await;
        }
        let ctx = self.ctx.clone();
        let (stored, next_may_go) = oneshot::channel::<()>();
        let before = self.newest.replace(next_may_go);
        let write = tokio::spawn(async move {
            if let Some(before) = before {
                if before.await.is_err() {
                    // The write before failed (a panic) and stored nothing:
                    // nothing after it is written either, or its records
                    // would look replayed when a restart archives them
                    // again (nothing is committed any more).
                    return;
                }
            }
            let store = ctx.store.clone();
            let c = &ctx;
            let archived = with_retry(c, "archive", "archive raw readings", || async {
                let started = std::time::Instant::now();
                let done = store.archive_records(c.bus.log_id(), batch.clone()).await;
                c.metrics.store_write("archive", started.elapsed());
                done
            })
            .await;
            c.metrics
                .raw_archived
                .fetch_add(archived, Ordering::Relaxed);
            let _ = stored.send(());
        });
        self.writing.push_back((write, positions));
    }

    /// Everything under way stored before the final commit.
    async fn finish(&mut self) {
        while !self.writing.is_empty() {
            self.wait_oldest().await;
        }
    }

    fn commit_point(&mut self) -> CommitPoint {
        if self.broken {
            return CommitPoint::Nothing;
        }
        while self
            .writing
            .front()
            .is_some_and(|(write, _)| write.is_finished())
        {
            if let Some((_, positions)) = self.writing.pop_front() {
                self.stored_through(positions);
            }
        }
        // A partition taken away meanwhile is its new owner's to commit.
        let now: Vec<(Topic, u32, u64)> = std::mem::take(&mut self.stored)
            .into_iter()
            .filter(|(tp, _)| self.assignment.contains(tp))
            .map(|((t, p), next)| (t, p, next))
            .collect();
        if now.is_empty() {
            CommitPoint::Nothing
        } else {
            CommitPoint::Positions(now)
        }
    }

    async fn assigned(&mut self, partitions: &[(Topic, u32)]) {
        self.assignment = partitions.to_vec();
    }
}

/// A stage stopped where it is stops its writes too, as a crash would:
/// their records are archived again at the next start.
impl Drop for ArchiveStage {
    fn drop(&mut self) {
        for (write, _) in &self.writing {
            write.abort();
        }
    }
}

impl ArchiveStage {
    pub fn new(ctx: Context) -> ArchiveStage {
        ArchiveStage {
            ctx,
            writing: VecDeque::new(),
            stored: BTreeMap::new(),
            assignment: Vec::new(),
            broken: false,
            newest: None,
        }
    }

    /// Waits for the oldest write under way to be stored.
    async fn wait_oldest(&mut self) {
        if let Some((write, positions)) = self.writing.pop_front() {
            if let Err(e) = write.await {
                // Only a panic gets here (the writes retry until they
                // succeed): commit nothing from now on, so its records are
                // archived again after a restart.
                tracing::error!(error = %e, "archive: a write task failed; the archive stops committing");
                self.ctx
                    .metrics
                    .stage_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.broken = true;
                return;
            }
            self.stored_through(positions);
        }
    }

    fn stored_through(&mut self, positions: Positions) {
        for (t, p, next) in positions {
            let at = self.stored.entry((t, p)).or_insert(next);
            *at = (*at).max(next);
        }
    }
}
