//! Assembling a running segs from its config: the bus, dedupe and store
//! implementations the config names, the plugin runtime and the four rules,
//! the pipeline stages, and the HTTP server.
//!
//! `segs run` and the end-to-end tests both go through [`App::start`], so the
//! tests exercise the code path operators run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::bus::kafka::KafkaBus;
use crate::bus::{Bus, BusError, JournalOptions, MemoryBus, Topic};
use crate::config::{BusKind, DedupeKind, PipelineConfig};
use crate::dedupe::{Dedupe, KeyBatch, MemoryDedupe, RedisDedupe};
use crate::ingest::IngestState;
use crate::pipeline::dead_letters::DeadLetters;
use crate::pipeline::{self, Context, Metrics, PipelineError, Plugins, Running};
use crate::plugins::share::Sharing;
use crate::plugins::{Limits, PluginVersion, Registry, Runtime};
use crate::shared::SharedRuleState;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("store {url}: {source}")]
    Store {
        url: String,
        source: crate::store::StoreError,
    },
    #[error("dedupe: {0}")]
    Dedupe(#[from] crate::dedupe::DedupeError),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("wasmtime: {0}")]
    Runtime(String),
}

/// A running segs: HTTP server plus pipeline.
pub struct App {
    /// Where the HTTP server listens (the real port when 0 was asked for).
    pub addr: SocketAddr,
    pub ctx: Context,
    /// The rule components in use at start.
    pub plugins: Vec<PluginVersion>,
    /// The plugin slots (swap, rollback, listing); `None` for an
    /// `ingest`-role process.
    pub registry: Option<Arc<Registry>>,
    /// The stages; `None` for an `ingest`-role process.
    running: Option<Running>,
    retention: Option<JoinHandle<()>>,
    /// Plugin alerts and the watched folder.
    plugin_tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<()>,
    stop_server: oneshot::Sender<()>,
}

impl App {
    /// Builds everything `config` names, loads and checks the plugins, starts
    /// the stages and serves HTTP on `listen`. Any refusal (a bad component,
    /// a config a plugin rejects, an unreachable store) stops the start
    /// before anything is served.
    pub async fn start(config: PipelineConfig, listen: SocketAddr) -> Result<App, AppError> {
        let config = Arc::new(config);
        let durable = match config.bus.kind {
            BusKind::Embedded => {
                let opts = JournalOptions {
                    path: config.bus_path(),
                    fsync: config.bus.fsync,
                    // Long enough to rebuild the dedupe marks after a restart.
                    retain_min: Duration::from_secs(config.dedupe.reading_ttl_s),
                    retain_unconsumed: crate::bus::memory::DEFAULT_RETAIN_UNCONSUMED,
                };
                let (partitions, max_lag) =
                    (config.bus.partitions, config.bus.max_lag_per_partition);
                let bus = tokio::task::spawn_blocking(move || {
                    MemoryBus::open_durable(partitions, max_lag, opts)
                })
                .await
                .map_err(|e| BusError::Journal(format!("opening the journal panicked: {e}")))??;
                Some(bus)
            }
            BusKind::Memory | BusKind::Kafka => None,
        };
        let bus: Arc<dyn Bus> = match config.bus.kind {
            BusKind::Embedded => Arc::new(durable.clone().expect("opened above")),
            BusKind::Memory => Arc::new(MemoryBus::new(
                config.bus.partitions,
                config.bus.max_lag_per_partition,
            )),
            BusKind::Kafka => Arc::new(
                KafkaBus::connect(
                    &config.kafka,
                    config.bus.partitions,
                    config.bus.max_lag_per_partition,
                    &[pipeline::STREAM_GROUP, pipeline::ARCHIVE_GROUP],
                )
                .await?,
            ),
        };
        let dedupe: Arc<dyn Dedupe> = match config.dedupe.kind {
            DedupeKind::Memory => {
                let d = Arc::new(MemoryDedupe::new());
                if config.bus.kind != BusKind::Memory {
                    let ttl = Duration::from_secs(config.dedupe.reading_ttl_s);
                    let marked = remark_recent_readings(&*bus, &*d, ttl).await?;
                    if marked > 0 {
                        tracing::info!(
                            readings = marked,
                            "dedupe marks rebuilt from the bus's recent readings"
                        );
                    }
                }
                d.clone().spawn_sweeper(Duration::from_secs(10));
                d
            }
            DedupeKind::Redis => Arc::new(RedisDedupe::connect(&config.dedupe.redis_url).await?),
        };
        let store = crate::store::open(&config.store.url)
            .await
            .map_err(|source| AppError::Store {
                url: crate::store::redact_url(&config.store.url),
                source,
            })?;

        let shared = match config.dedupe.kind {
            DedupeKind::Memory => None,
            DedupeKind::Redis => Some(SharedRuleState::connect(&config.dedupe.redis_url).await?),
        };
        let metrics = Arc::new(Metrics::default());
        let ctx = Context {
            config: config.clone(),
            bus: bus.clone(),
            dedupe: dedupe.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            shared,
            live: Arc::new(crate::live::LiveFeed::new()),
        };
        let mut plugin_tasks = Vec::new();
        let mut sharing = None;
        let mut dead_letters = None;
        let (running, retention, registry) = if config.role.processes() {
            let limits = Limits {
                call_timeout: Duration::from_millis(config.sandbox.call_timeout_ms),
                max_memory_bytes: config.sandbox.max_memory_mib << 20,
                max_instances: config.sandbox.max_instances,
                max_tables: config.sandbox.max_tables,
            };
            let runtime =
                Runtime::with_compile_cache(limits, config.compile_cache_dir().as_deref())
                    .map_err(|e| AppError::Runtime(format!("{e:#}")))?;
            let plugins = Plugins::load(&config, &runtime)?;
            let registry = plugins.registry.clone();
            if let Some(events) = registry.take_events() {
                plugin_tasks.push(tokio::spawn(pipeline::faults::raise_alerts(
                    ctx.clone(),
                    events,
                )));
            }
            if config.admin.follow_interval_ms > 0 {
                let shared = Arc::new(Sharing::new(store.clone()));
                let every = Duration::from_millis(config.admin.follow_interval_ms);
                let follow = shared
                    .clone()
                    .follow(registry.clone(), every)
                    .await
                    .map_err(|source| AppError::Store {
                        url: crate::store::redact_url(&config.store.url),
                        source,
                    })?;
                plugin_tasks.push(follow);
                sharing = Some(shared);
            }
            if let Some(dir) = config.watch_dir() {
                let debounce = Duration::from_millis(config.admin.watch_debounce_ms);
                let watch =
                    crate::plugins::watch::spawn(registry.clone(), sharing.clone(), dir, debounce)
                        .map_err(|e| AppError::Runtime(e.to_string()))?;
                plugin_tasks.push(watch);
            }
            let letters = DeadLetters::new(
                ctx.clone(),
                plugins.anomaly.another().map_err(PipelineError::from)?,
            )
            .await?;
            dead_letters = Some(Arc::new(letters));
            let running = pipeline::start(ctx.clone(), plugins).await?;
            let retention = tokio::spawn(retention_job(ctx.clone()));
            (Some(running), Some(retention), Some(registry))
        } else {
            (None, None, None)
        };
        let versions = registry.as_ref().map(|r| r.serving()).unwrap_or_default();

        let ingest = IngestState {
            bus: bus.clone(),
            dedupe: dedupe.clone(),
            metrics: metrics.clone(),
            max_batch: config.ingest.max_batch,
            max_body_bytes: config.ingest.max_body_bytes,
            reading_ttl: Duration::from_secs(config.dedupe.reading_ttl_s),
            hold: Duration::from_secs(config.dedupe.hold_s),
            retry_after_s: config.ingest.retry_after_s,
            max_wait: Duration::from_millis(config.ingest.max_wait_ms),
            max_clock_skew_s: config.ingest.max_clock_skew_s,
            max_reading_age_s: config.ingest.max_reading_age_s,
            shed: Default::default(),
        };
        let api = ApiState {
            store,
            bus,
            dedupe,
            metrics,
            live: ctx.live.clone(),
            plugins: registry.clone(),
        };
        let router = api::router(
            config.role.ingests().then_some(ingest),
            api,
            &config.http,
            config.ingest.retry_after_s,
        )
        .merge(api::admin::router(
            registry.clone(),
            sharing,
            dead_letters,
            &config.admin,
            &config.http,
        ));
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| AppError::Listen {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| AppError::Listen {
            addr: listen,
            source,
        })?;
        let (stop_server, stopped) = oneshot::channel::<()>();
        let limits = config.http.clone();
        let server = tokio::spawn(async move {
            api::serve::serve(listener, router, &limits, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(App {
            addr,
            ctx,
            plugins: versions,
            registry,
            plugin_tasks,
            running,
            retention,
            server,
            stop_server,
        })
    }

    /// Stops taking requests, then lets the pipeline finish what it holds:
    /// open windows are closed, stored and published; alerts and tariffs
    /// derived from them are stored. Bounded by `shutdown.grace_s`:
    /// returns the stages that had not finished by then (empty when all
    /// did), which the log names with what they were retrying.
    pub async fn shutdown(self) -> Vec<crate::pipeline::Unfinished> {
        // Live streams end first, or the server would wait for them.
        self.ctx.live.close();
        let _ = self.stop_server.send(());
        let _ = self.server.await;
        if let Some(retention) = self.retention {
            retention.abort();
        }
        let unfinished = match self.running {
            Some(running) => running.shutdown().await,
            None => Vec::new(),
        };
        for t in self.plugin_tasks {
            t.abort();
        }
        unfinished
    }
}

/// Marks `reading:{meterId}:{timestamp}` again, exactly as ingest builds it,
/// for every `telemetry-readings` record the journal holds that was received
/// within `ttl`, for the rest of its TTL: a client retrying a request whose
/// 2xx was lost in a crash is then told "duplicates" instead of being
/// counted twice. Returns how many keys were marked.
pub async fn remark_recent_readings(
    bus: &dyn Bus,
    dedupe: &dyn Dedupe,
    ttl: Duration,
) -> Result<usize, AppError> {
    let now = crate::time::now_ms();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let since = now.saturating_sub(ttl_ms);
    let records = bus.recent_records(Topic::TelemetryReadings, since).await?;
    // Grouped by whole seconds of TTL left (rounded up): one call each.
    let mut by_ttl: std::collections::BTreeMap<u64, KeyBatch> = Default::default();
    let mut marked = 0;
    for r in &records {
        let left_ms = ttl_ms - (now - r.timestamp_ms).max(0);
        if left_ms <= 0 {
            continue;
        }
        let Ok(reading) = serde_json::from_slice::<crate::reading::Reading<'_>>(&r.value) else {
            tracing::warn!("journal record on telemetry-readings is not a reading; skipped");
            continue;
        };
        let Some(ts) = reading.event_time_ms() else {
            continue;
        };
        let left_s = (left_ms as u64).div_ceil(1000);
        by_ttl
            .entry(left_s)
            .or_default()
            .push_with(|k| crate::ingest::write_key(k, &reading.meter_id, ts));
        marked += 1;
    }
    for (left_s, keys) in by_ttl {
        dedupe
            .check_and_mark(&keys, Duration::from_secs(left_s))
            .await?;
    }
    Ok(marked)
}

/// Deletes rows past their retention (raw readings 7 days, 1-minute
/// aggregates 30, 15-minute aggregates 365) every hour, the first time an
/// hour after start: the host's stand-in for TimescaleDB's retention
/// policies.
async fn retention_job(ctx: Context) {
    let hour = Duration::from_secs(3600);
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + hour, hour);
    loop {
        every.tick().await;
        match ctx.store.apply_retention(crate::time::now_ms()).await {
            Ok(report) => tracing::info!(?report, "retention applied"),
            Err(e) => tracing::warn!(error = %e, "retention job failed; will retry in an hour"),
        }
    }
}
