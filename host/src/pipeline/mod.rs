//! The pipeline: the stages between the bus topics, wired as in the seed.
//!
//! ```text
//! telemetry-readings ─▶ stream, per partition (windows + anomaly + aggregate)
//!                    │      ─▶ alerts, aggregates_1m, aggregates_15m,
//!                    │         aggregates_1m_regional_partials
//!                    └▶ archive (raw_readings)
//! aggregates_1m_regional_partials ─▶ regional (every partition's share) ─▶ aggregates_1m_regional
//! alerts, aggregates_1m_regional ─▶ alert stage (overload, dedupe, store) ─▶ alerts_processed
//! aggregates_1m_regional ─▶ tariff stage (tariff rule, store) ─▶ tariff_updates
//! ```
//!
//! Stages talk only through the bus, each in its own consumer group, so the
//! same stage code runs on the in-process bus and on Kafka. Each stage owns
//! the plugin it calls and the state that plugin needs between calls.
//!
//! One effect per record (ARCHITECTURE.md, "Exactly once"): a stage stores
//! what a poll produced — rows, the state it advanced, the messages it will
//! publish (the outbox) — in one store transaction ([`apply`]), publishes
//! the outbox, and only then commits its bus offsets. A crash anywhere
//! replays records whose effects the store recognises (ids, dedupe keys,
//! last-applied windows, the stream stage's checkpoint), so nothing is
//! counted, stored or decided twice.

mod alerts;

pub use alerts::{processed, status_update};
mod archive;
pub mod dead_letters;
pub mod faults;
pub mod notify;
mod regional;
mod stream;
pub use stream::ORDER_GRACE;
mod tariff;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::{Bus, Consumer, Delivered, Record, Topic};
use crate::config::PipelineConfig;
use crate::dedupe::Dedupe;
use crate::messages::{KeyedMessage, RegionalWindow};
use crate::plugins::{
    AggregateRule, AnomalyRule, OverloadRule, Plugin, PluginError, Registry, Runtime, TariffRule,
    World, config_from_toml,
};
use crate::store::{Applied, Effects, OutboxBuilder, OutboxRecord, Store};

/// Consumer groups, as the seed names them.
pub const STREAM_GROUP: &str = "stream-processor-group";
pub const ALERT_GROUP: &str = "alert-group";
pub const TARIFF_GROUP: &str = "tariff-group";
pub const ARCHIVE_GROUP: &str = "raw-archive-group";
/// The group of the regional stage, which combines every partition's share
/// of the regional windows (a segs addition; see [`Topic::RegionalPartials`]).
pub const REGIONAL_GROUP: &str = "regional-group";

/// Each stage's name, consumer group and input topics (what its lag is
/// measured on).
pub const STAGE_INPUTS: [(&str, &str, &[Topic]); 5] = [
    ("stream", STREAM_GROUP, &[Topic::TelemetryReadings]),
    ("regional", REGIONAL_GROUP, &[Topic::RegionalPartials]),
    (
        "alerts",
        ALERT_GROUP,
        &[Topic::Alerts, Topic::Aggregates1mRegional],
    ),
    ("tariff", TARIFF_GROUP, &[Topic::Aggregates1mRegional]),
    ("archive", ARCHIVE_GROUP, &[Topic::TelemetryReadings]),
];

/// The input topics of the stage in consumer group `group`, from
/// [`STAGE_INPUTS`] (what it subscribes to is what its lag is measured on).
fn inputs(group: &str) -> &'static [Topic] {
    STAGE_INPUTS
        .iter()
        .find(|(_, g, _)| *g == group)
        .map(|(_, _, topics)| *topics)
        .expect("every stage's group is in STAGE_INPUTS")
}

pub use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("plugin `{0}` is not configured in pipeline.toml")]
    MissingPlugin(&'static str),
    #[error("bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("wasmtime: {0}")]
    Wasmtime(String),
    #[error("the stream stage's checkpoint: {0}")]
    Checkpoint(#[from] crate::windows::SnapshotError),
}

/// The four rule plugins, loaded and configured: each stage's handle, and
/// the registry of their slots (for swaps, rollbacks and listings).
pub struct Plugins {
    pub anomaly: AnomalyRule,
    pub overload: OverloadRule,
    pub tariff: TariffRule,
    pub aggregate: AggregateRule,
    pub registry: Arc<Registry>,
}

impl Plugins {
    /// Loads every plugin pipeline.toml names; the first refusal is returned
    /// (a component that is not valid, or a config the plugin rejects).
    pub fn load(config: &PipelineConfig, runtime: &Runtime) -> Result<Plugins, PipelineError> {
        let mut registry = Registry::default();
        fn slot<W: World>(
            registry: &mut Registry,
            config: &PipelineConfig,
            runtime: &Runtime,
            name: &'static str,
        ) -> Result<Plugin<W>, PipelineError> {
            let plugin = config
                .plugins
                .get(name)
                .ok_or(PipelineError::MissingPlugin(name))?;
            let path = config
                .component_path(name)
                .ok_or(PipelineError::MissingPlugin(name))?;
            let cfg = config_from_toml(name, &plugin.config)?;
            let runtime = runtime.with_limits(config.plugin_limits(name));
            let slot = registry.load::<W>(&runtime, name, &path, cfg, plugin.fault_policy())?;
            Ok(slot.instance()?)
        }
        let anomaly = slot(&mut registry, config, runtime, "anomaly")?;
        let overload = slot(&mut registry, config, runtime, "overload")?;
        let tariff = slot(&mut registry, config, runtime, "tariff")?;
        let aggregate = slot(&mut registry, config, runtime, "aggregate")?;
        Ok(Plugins {
            anomaly,
            overload,
            tariff,
            aggregate,
            registry: Arc::new(registry),
        })
    }
}

/// What the stages share.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<PipelineConfig>,
    pub bus: Arc<dyn Bus>,
    pub dedupe: Arc<dyn Dedupe>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Alert dedupe marks and the tariff cache in Redis, shared with other
    /// processes (`dedupe.kind = "redis"`); `None` on the embedded default,
    /// where the store alone keeps them.
    pub shared: Option<crate::shared::SharedRuleState>,
    /// What `GET /events` pushes to clients.
    pub live: Arc<crate::live::LiveFeed>,
}

/// A stage's name and its task.
type StageTask = (&'static str, JoinHandle<()>);

/// The running stages. Dropping it does not stop them; call
/// [`Running::shutdown`].
pub struct Running {
    /// Stage tasks in data-flow tiers: stream; regional; alerts, tariff
    /// and archive.
    tiers: Vec<(watch::Sender<bool>, Vec<StageTask>)>,
    metrics: Arc<Metrics>,
    /// How long [`Running::shutdown`] waits for the stages in all.
    grace: Duration,
    /// Whether what the bus holds outlives the process (what a stage gives
    /// up at shutdown is replayed at the next start).
    durable_bus: bool,
}

/// A stage that had not finished when the shutdown's grace ran out: what it
/// was doing, from its health.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Unfinished {
    pub stage: &'static str,
    /// What it was retrying (`apply a stage's effects`, …), if it was.
    pub retrying: Option<&'static str>,
    /// Failed attempts in a row.
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl Running {
    /// Stops the stages in data-flow order: the stream stage first (it
    /// closes, stores and publishes its open windows), then the regional
    /// stage once it has combined what that produced, then the stages that
    /// consume the regional windows, once they have drained their topics.
    ///
    /// Bounded by `shutdown.grace_s` in all: a stage still running then
    /// (typically retrying a store or Redis that is down) is stopped where
    /// it is, and it and every later stage are returned with what they were
    /// doing, and logged. Nothing it had not stored was committed, so on a
    /// durable bus it is replayed at the next start.
    pub async fn shutdown(self) -> Vec<Unfinished> {
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut unfinished = Vec::new();
        for (stop, tasks) in self.tiers {
            let _ = stop.send(true);
            for (stage, mut task) in tasks {
                let done = unfinished.is_empty()
                    && tokio::time::timeout_at(deadline, &mut task).await.is_ok();
                if done {
                    continue;
                }
                task.abort();
                // Cancelled at its next await: once this returns, its
                // future (and what it owns) is dropped.
                let _ = task.await;
                let health = self.metrics.health.snapshot();
                let h = health.get(stage);
                unfinished.push(Unfinished {
                    stage,
                    retrying: h.and_then(|h| h.retrying),
                    attempts: h.map_or(0, |h| h.attempts),
                    last_error: h.and_then(|h| h.last_error.clone()),
                });
            }
        }
        for u in &unfinished {
            tracing::error!(
                stage = u.stage,
                retrying = u.retrying.unwrap_or("-"),
                attempts = u.attempts,
                last_error = u.last_error.as_deref().unwrap_or("-"),
                grace_s = self.grace.as_secs(),
                "shutdown: stage stopped before it had stored and committed all it held; {}",
                if self.durable_bus {
                    "its uncommitted records stay on the bus and are replayed at the next start"
                } else {
                    "bus.kind = \"memory\" is volatile: what it held is lost"
                }
            );
        }
        unfinished
    }
}

/// Starts every stage. Subscriptions are made before this returns, so no
/// record produced afterwards is missed.
pub async fn start(ctx: Context, plugins: Plugins) -> Result<Running, PipelineError> {
    let (stop_stream, stream_rx) = watch::channel(false);
    let (stop_regional, regional_rx) = watch::channel(false);
    let (stop_downstream, stop_rx) = watch::channel(false);
    let Plugins {
        anomaly,
        overload,
        tariff,
        aggregate,
        registry: _,
    } = plugins;
    let mut tasks = Vec::new();

    let consumer = ctx
        .bus
        .subscribe(STREAM_GROUP, inputs(STREAM_GROUP))
        .await?;
    let regional_aggregate = aggregate.another()?;
    let stage = stream::StreamStage::new(ctx.clone(), anomaly, aggregate).await?;
    let stream = (
        stream::StreamStage::NAME,
        tokio::spawn(drive(stage, consumer, stream_rx)),
    );

    let consumer = ctx
        .bus
        .subscribe(REGIONAL_GROUP, inputs(REGIONAL_GROUP))
        .await?;
    let stage = regional::RegionalStage::new(ctx.clone(), regional_aggregate).await?;
    let regional = (
        regional::RegionalStage::NAME,
        tokio::spawn(drive(stage, consumer, regional_rx)),
    );

    let consumer = ctx.bus.subscribe(ALERT_GROUP, inputs(ALERT_GROUP)).await?;
    let stage = alerts::AlertStage::new(ctx.clone(), overload).await?;
    tasks.push((
        alerts::AlertStage::NAME,
        tokio::spawn(drive(stage, consumer, stop_rx.clone())),
    ));

    let consumer = ctx
        .bus
        .subscribe(TARIFF_GROUP, inputs(TARIFF_GROUP))
        .await?;
    let stage = tariff::TariffStage::new(ctx.clone(), tariff).await?;
    tasks.push((
        tariff::TariffStage::NAME,
        tokio::spawn(drive(stage, consumer, stop_rx.clone())),
    ));

    if ctx.config.store.archive_raw_readings {
        let consumer = ctx
            .bus
            .subscribe(ARCHIVE_GROUP, inputs(ARCHIVE_GROUP))
            .await?;
        let stage = archive::ArchiveStage::new(ctx.clone());
        tasks.push((
            archive::ArchiveStage::NAME,
            tokio::spawn(drive(stage, consumer, stop_rx.clone())),
        ));
    }
    // Notifications last: they deliver what the alert and tariff stages
    // produced on their way out.
    let (stop_notify, notify_rx) = watch::channel(false);
    let mut notifiers = Vec::new();
    for hook in &ctx.config.notify.webhooks {
        let consumer = ctx
            .bus
            .subscribe(&notify::group(&hook.name), notify::INPUTS)
            .await?;
        let stage = notify::NotifyStage::new(ctx.clone(), Arc::new(hook.clone()));
        notifiers.push((
            notify::NotifyStage::NAME,
            tokio::spawn(drive(stage, consumer, notify_rx.clone())),
        ));
    }
    Ok(Running {
        tiers: vec![
            (stop_stream, vec![stream]),
            (stop_regional, vec![regional]),
            (stop_downstream, tasks),
            (stop_notify, notifiers),
        ],
        metrics: ctx.metrics.clone(),
        grace: Duration::from_secs(ctx.config.shutdown.grace_s),
        durable_bus: ctx.config.bus.kind != crate::config::BusKind::Memory,
    })
}

/// One stage: what it does with a poll's records, when idle, and at the end.
/// [`drive`] runs the loop around it (poll, process, commit).
trait Stage: Send + 'static {
    /// For logs.
    const NAME: &'static str;
    fn context(&self) -> &Context;
    /// Handles one poll's records; the driver commits after it returns.
    fn process(&mut self, records: &[Delivered]) -> impl Future<Output = ()> + Send;
    /// Called after a poll that returned nothing.
    fn idle(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Called once the stage has been asked to stop and its topics are
    /// drained; the driver commits after it returns.
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// What the driver may commit now. By default everything polled, for a
    /// stage whose `process` has stored all it derived before returning.
    fn commit_point(&mut self) -> CommitPoint {
        CommitPoint::Polled
    }
    /// Called when the partitions assigned to the stage's consumer changed
    /// (a rebalance: another process joined or left the group), with the
    /// new assignment, before the records of the next poll are processed.
    /// A stage keeping state per partition drops what it no longer owns.
    fn assigned(&mut self, _partitions: &[(Topic, u32)]) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What a stage's consumer may commit.
pub(crate) enum CommitPoint {
    /// Everything poll has returned.
    Polled,
    /// These next-offsets (what the stage has made durable so far).
    Positions(Vec<(Topic, u32, u64)>),
    /// Nothing new.
    Nothing,
}

/// The consumer loop every stage shares. Records are processed before their
/// offsets are committed (at-least-once); a stop is honoured only once a poll
/// comes back empty, so what upstream stages flushed on their way out is
/// still handled.
async fn drive<S: Stage>(
    mut stage: S,
    mut consumer: Box<dyn Consumer>,
    stop: watch::Receiver<bool>,
) {
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut assignment: Vec<(Topic, u32)> = Vec::new();
    let health = stage.context().metrics.clone();
    health.health.started(S::NAME);
    loop {
        let polled = consumer.poll(POLL_MAX, POLL_WAIT).await;
        let now_assigned = consumer.assignment();
        if now_assigned != assignment {
            tracing::info!(stage = S::NAME, partitions = ?now_assigned, "partitions assigned");
            stage.assigned(&now_assigned).await;
            assignment = now_assigned;
        }
        let records = match polled {
            Ok(r) => {
                health.health.succeeded(S::NAME, "poll");
                r
            }
            Err(e) => {
                health.health.failed(S::NAME, "poll", &e.to_string());
                stage
                    .context()
                    .metrics
                    .stage_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(stage = S::NAME, error = %e, "poll failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if records.is_empty() {
            if *stop.borrow() {
                // Drained only once the bus has nothing in flight for us
                // (Kafka: every partition read to its high watermark), or
                // after DRAIN_LIMIT.
                let since = *stopping.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= DRAIN_LIMIT || consumer.caught_up().await {
                    break;
                }
            }
            stage.idle().await;
        } else {
            stage.process(&records).await;
            health.health.progressed(S::NAME);
        }
        commit(&mut stage, &mut consumer, true).await;
    }
    stage.finish().await;
    commit(&mut stage, &mut consumer, false).await;
}

/// Commits what the stage allows; `soon`: without waiting for the commit to
/// be durable (every commit but the last: a crash before it is on disk
/// replays from the one before, which the stages handle as any replay).
async fn commit<S: Stage>(stage: &mut S, consumer: &mut Box<dyn Consumer>, soon: bool) {
    let point = stage.commit_point();
    let committed = !matches!(point, CommitPoint::Nothing);
    let result = match (point, soon) {
        (CommitPoint::Polled, false) => consumer.commit().await,
        (CommitPoint::Polled, true) => consumer.commit_soon().await,
        (CommitPoint::Positions(p), false) => consumer.commit_positions(&p).await,
        (CommitPoint::Positions(p), true) => consumer.commit_positions_soon(&p).await,
        (CommitPoint::Nothing, _) => Ok(()),
    };
    let ctx = stage.context();
    if let Err(e) = result {
        // The records will be delivered again (at-least-once).
        ctx.metrics.stage_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(stage = S::NAME, error = %e, "commit failed");
    } else if committed {
        crate::crash::point(&format!("{}.after_commit", S::NAME));
    }
}

/// The start of the last regional window a stage applied, per region, kept
/// in `rule_state` under `rule`: a window at or before it is a replay.
struct AppliedWindows {
    rule: &'static str,
    last: std::collections::HashMap<String, i64>,
}

impl AppliedWindows {
    async fn load(
        store: &dyn Store,
        rule: &'static str,
    ) -> Result<AppliedWindows, crate::store::StoreError> {
        let last = store.load_rule_state(rule).await?.into_iter().collect();
        Ok(AppliedWindows { rule, last })
    }

    /// Whether `w` is new for its region; if so it becomes the last one,
    /// and the change joins `effects` (stored with what the stage derives).
    fn accept(&mut self, w: &RegionalWindow, effects: &mut Effects) -> bool {
        if self.last.get(&w.region) >= Some(&w.timestamp_ms) {
            return false;
        }
        self.last.insert(w.region.clone(), w.timestamp_ms);
        effects.rule_state.push(crate::store::RuleState {
            rule: self.rule.to_owned(),
            key: w.region.clone(),
            value: w.timestamp_ms,
        });
        true
    }
}

/// Counts and logs a failed plugin call; the caller applies its policy.
fn plugin_failed(ctx: &Context, error: &PluginError, policy: &str) {
    ctx.metrics.plugin_failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%error, policy, "plugin call failed");
}

/// Splits `items` into consecutive rounds in which no region appears twice,
/// so a rule whose state chains from one window of a region to the next sees
/// each region at most once per call.
fn rounds_by_region<T>(items: &[T], region: impl Fn(&T) -> &str) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let n = rest.iter().take_while(|i| seen.insert(region(i))).count();
        let (round, tail) = rest.split_at(n);
        out.push(round);
        rest = tail;
    }
    out
}

/// How long a stopping stage keeps draining its topics at most.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// How long a stage waits on an empty poll before checking its timers.
const POLL_WAIT: Duration = Duration::from_millis(200);
/// Records a stage takes per poll.
const POLL_MAX: usize = 4096;

/// Publishes `records`, retrying while the bus pushes back (a downstream
/// topic is full): a stage must not drop what it derived.
async fn publish(ctx: &Context, stage: &'static str, topic: Topic, records: Vec<Record>) {
    if records.is_empty() {
        return;
    }
    let mut full = retry_delays(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        match ctx.bus.produce(topic, records.clone()).await {
            Ok(()) => {
                ctx.metrics.health.succeeded(stage, "publish");
                return;
            }
            Err(crate::bus::BusError::Full { .. }) => {
                tokio::time::sleep(full.next().unwrap_or(Duration::from_secs(1))).await;
            }
            Err(e) => {
                ctx.metrics.stage_errors.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.health.failed(stage, "publish", &e.to_string());
                tracing::error!(topic = topic.name(), error = %e, "publish failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Stores a stage step's `effects` together with the messages `outbox`
/// builds from what was stored (one transaction, retried until it
/// succeeds), then publishes those messages and clears them from the
/// stage's outbox (named as the stage). Returns what was stored.
async fn apply(
    ctx: &Context,
    stage: &'static str,
    effects: &Effects,
    outbox: &OutboxBuilder<'_>,
) -> Applied {
    let store = ctx.store.clone();
    let (applied, records) = with_retry(ctx, stage, "apply a stage's effects", || async {
        let started = std::time::Instant::now();
        let done = store.apply(stage, effects, outbox).await;
        ctx.metrics.store_write(stage, started.elapsed());
        done
    })
    .await;
    crate::crash::point(&format!("{stage}.after_apply"));
    publish_outbox(ctx, stage, stage, records).await;
    applied
}

/// As [`apply`], for effects holding a claimed checkpoint, with the outbox
/// `outbox_key` (one per partition for the stream stage): `None` (nothing
/// stored or published) when the checkpoint has been claimed by another
/// writer since — the stage lost that partition.
async fn apply_fenced(
    ctx: &Context,
    stage: &'static str,
    outbox_key: &str,
    effects: &Effects,
    outbox: &OutboxBuilder<'_>,
) -> Option<Applied> {
    let store = ctx.store.clone();
    let stored = with_retry(ctx, stage, "store a checkpoint", || async {
        let started = std::time::Instant::now();
        let done = store.apply(outbox_key, effects, outbox).await;
        ctx.metrics.store_write(stage, started.elapsed());
        match done {
            Err(crate::store::StoreError::Fenced { group, epoch }) => Ok(Err((group, epoch))),
            other => other.map(Ok),
        }
    })
    .await;
    let (applied, records) = match stored {
        Ok(done) => done,
        Err((group, epoch)) => {
            tracing::info!(
                stage,
                group,
                epoch,
                "another process owns this checkpoint now; its state here is dropped"
            );
            return None;
        }
    };
    crate::crash::point(&format!("{stage}.after_apply"));
    publish_outbox(ctx, stage, outbox_key, records).await;
    Some(applied)
}

/// Publishes outbox records in seq order (one produce per run of records of
/// the same topic), then deletes them from the outbox `outbox_key`. A crash
/// between the two publishes them again after the restart: consumers
/// recognise them by their ids (alert id, region and window, tariff id).
async fn publish_outbox(
    ctx: &Context,
    stage: &'static str,
    outbox_key: &str,
    records: Vec<OutboxRecord>,
) {
    let Some(last) = records.last().map(|r| r.seq) else {
        return;
    };
    let now = crate::time::now_ms();
    let mut run: Vec<Record> = Vec::new();
    let mut run_topic = None;
    for r in records {
        if run_topic != Some(r.message.topic) {
            if let Some(topic) = run_topic {
                publish(ctx, stage, topic, std::mem::take(&mut run)).await;
            }
            run_topic = Some(r.message.topic);
        }
        run.push(r.message.into_record(now));
    }
    if let Some(topic) = run_topic {
        publish(ctx, stage, topic, run).await;
    }
    crate::crash::point(&format!("{stage}.after_publish"));
    let store = ctx.store.clone();
    with_retry(ctx, stage, "clear the outbox", || {
        store.delete_outbox(outbox_key, last)
    })
    .await;
}

/// Publishes what a stage left in the outbox `outbox_key` before it stopped
/// (or crashed).
async fn flush_outbox(
    ctx: &Context,
    stage: &'static str,
    outbox_key: &str,
) -> Result<(), PipelineError> {
    let pending = ctx.store.pending_outbox(outbox_key).await?;
    if !pending.is_empty() {
        tracing::info!(
            stage,
            outbox_key,
            messages = pending.len(),
            "publishing what the outbox held at start"
        );
    }
    publish_outbox(ctx, stage, outbox_key, pending).await;
    Ok(())
}

/// Keyed messages of one kind, for an outbox builder.
fn keyed<M: crate::messages::Message>(messages: &[M]) -> Vec<KeyedMessage> {
    messages.iter().map(KeyedMessage::of).collect()
}

/// Runs a store (or Redis) call, retrying failures with backoff until it
/// succeeds.
/// Derived results are never dropped because the database blinked; the
/// stage's offsets are not committed meanwhile, so the bus pushes back on
/// ingest instead (503) and nothing acknowledged is lost.
async fn with_retry<T, E, F, Fut>(
    ctx: &Context,
    stage: &'static str,
    what: &'static str,
    mut f: F,
) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delays = retry_delays(Duration::from_millis(50), Duration::from_secs(2));
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match f().await {
            Ok(v) => {
                ctx.metrics.health.succeeded(stage, what);
                return v;
            }
            Err(e) => {
                ctx.metrics.stage_errors.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.health.failed(stage, what, &e.to_string());
                tracing::error!(%e, attempt, stage, what, "failed; retrying");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
            }
        }
    }
}

/// The waits between the attempts of a retry loop: doubling from `first`
/// up to `max`, without end (backon's exponential backoff).
pub(crate) fn retry_delays(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::{STAGE_INPUTS, Topic, dead_letters, inputs, notify, rounds_by_region};

    /// The in-process bus does not carry the output-only topics
    /// (`Bus::carries`), so a stage that read one would wait for ever
    /// there: every topic a stage subscribes to is one it carries.
    #[test]
    fn no_stage_reads_an_output_only_topic() {
        let read = STAGE_INPUTS
            .iter()
            .flat_map(|(_, group, _)| inputs(group))
            .chain(notify::INPUTS)
            .chain(dead_letters::INPUTS);
        for topic in read {
            assert!(!topic.is_output_only(), "a stage reads {topic}");
        }
        assert!(Topic::ALL.iter().any(|t| t.is_output_only()));
    }

    #[test]
    fn rounds_hold_each_region_once_and_keep_order() {
        let items = ["a", "b", "a", "c", "b", "b"];
        let rounds = rounds_by_region(&items, |s| s);
        assert_eq!(
            rounds,
            vec![&["a", "b"][..], &["a", "c", "b"][..], &["b"][..]]
        );
        assert!(rounds_by_region(&[] as &[&str], |s| s).is_empty());
    }
}
