//! `pipeline.toml`: parsed once, at start, into typed structs.
//!
//! Every table refuses unknown keys, so a typo is an error that names the key
//! and its line rather than a silently ignored setting. Checks that serde
//! cannot express (ranges, a plugin file that must exist, …) run in
//! [`PipelineConfig::check`] and are reported all together. Environment
//! overrides from the seed (`REDIS_DEDUPE_TTL`, `FLUSH_INTERVAL_1M`,
//! `FLUSH_INTERVAL_15M`, `DATABASE_URL`, `SEGS_BUS_PATH`, `KAFKA_BROKERS`,
//! `REDIS_URL`, `SEGS_ROLE`) are applied by
//! [`PipelineConfig::apply_env`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: invalid configuration:\n{}", path.display(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
}

/// What a process runs: everything, or one side, so that ingest and
/// processing scale separately (several `ingest` processes in front of one
/// `process` process on a shared bus and store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// HTTP ingest, the stages and the read API.
    #[default]
    All,
    /// HTTP ingest and the read API; no stages, no plugins.
    Ingest,
    /// The stages and the read API; no ingest routes.
    Process,
}

impl Role {
    pub fn ingests(self) -> bool {
        self != Role::Process
    }
    pub fn processes(self) -> bool {
        self != Role::Ingest
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "all" => Ok(Role::All),
            "ingest" => Ok(Role::Ingest),
            "process" => Ok(Role::Process),
            _ => Err(format!(
                "unknown role {s:?} (expected all, ingest or process)"
            )),
        }
    }
}

/// The whole of `pipeline.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// What this process runs (env `SEGS_ROLE`, `segs run --role`).
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub dedupe: DedupeConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub windows: WindowsConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The rule plugins by name: `anomaly`, `overload`, `tariff`, `aggregate`.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Per-region capacity and base price, keyed by region name.
    #[serde(default)]
    pub regions: BTreeMap<String, RegionConfig>,
    /// Used for a region that is not listed under `[regions]`.
    #[serde(default)]
    pub region_defaults: RegionConfig,
    /// Where relative paths in this file are resolved from (its folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[http]`: what one client may hold of the server. Every connection and
/// every request is bounded in time and in number, so that stalled or slow
/// clients cannot hold file descriptors or memory for ever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Seconds a client has to send a request's head (request line and
    /// headers), counted from the connection's accept or, on a kept-alive
    /// connection, from the end of the previous response; so it is also the
    /// idle keep-alive timeout. Past it the connection is closed.
    pub header_read_timeout_s: u64,
    /// Longest pause, seconds, while a request body is read; past it the
    /// request is answered 408 and the connection closed.
    pub body_read_timeout_s: u64,
    /// Keep connections open between requests (HTTP/1.1 keep-alive).
    pub keep_alive: bool,
    /// Connections served at once; more wait in the listen backlog until one
    /// closes.
    pub max_connections: usize,
    /// Requests handled at once (`/healthz` excepted); more are answered 503
    /// with `Retry-After` (`ingest.retry_after_s`).
    pub max_in_flight_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_s: 10,
            body_read_timeout_s: 10,
            keep_alive: true,
            max_connections: 4096,
            max_in_flight_requests: 256,
        }
    }
}

/// Largest `http.*_timeout_s`.
pub const MAX_HTTP_TIMEOUT_S: u64 = 3600;
/// Largest `http.max_connections`.
pub const MAX_HTTP_CONNECTIONS: usize = 1_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest number of readings in one `POST /telemetry/batch`.
    pub max_batch: usize,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Seconds returned in `Retry-After` when the pipeline is saturated: the
    /// least ingest names (it names the backlog's drain time when longer,
    /// up to a minute), and the whole delay of other 503s.
    pub retry_after_s: u32,
    /// How long a request may wait for room on the bus, milliseconds: past
    /// 90 % of the lag bound a request is held (not refused) until the
    /// stages have committed enough, and only then, if it still does not
    /// fit, may it be refused with 503. 0: not held; past half the bound a
    /// share that grows with the backlog is refused at once.
    pub max_wait_ms: u64,
    /// A reading whose timestamp is more than this many seconds ahead of
    /// the server clock is refused (400); 0 = no bound.
    pub max_clock_skew_s: u64,
    /// A reading whose timestamp is more than this many seconds behind the
    /// server clock is refused (400); 0 = no bound. Default: 7 days, the
    /// raw retention.
    pub max_reading_age_s: u64,
}

/// Largest `ingest.max_clock_skew_s`: a reading this far ahead moves the
/// watermark this far, so every reading until the clock catches up is late.
pub const MAX_CLOCK_SKEW_S: u64 = 86_400;
/// Largest `ingest.max_wait_ms`: a held request keeps its body in memory
/// and its slot of `http.max_in_flight_requests`.
pub const MAX_INGEST_WAIT_MS: u64 = 30_000;
/// Largest `ingest.max_reading_age_s` (0 turns the bound off instead).
pub const MAX_READING_AGE_S: u64 = 366 * 86_400;

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch: 1000,
            max_body_bytes: 4 << 20,
            retry_after_s: 1,
            max_wait_ms: 1000,
            max_clock_skew_s: 300,
            max_reading_age_s: 7 * 86_400,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// In-process, partitioned like Kafka, with a journal on disk: what it
    /// acknowledges survives a crash (the default).
    Embedded,
    /// In-process and volatile: a crash loses what was not yet consumed
    /// (tests, throwaway runs).
    Memory,
    /// Apache Kafka (or a Kafka-protocol broker) via rdkafka.
    Kafka,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub kind: BusKind,
    /// Partitions of every topic (Kafka dev default: 3).
    pub partitions: u32,
    /// Records a partition may hold that its slowest consumer group has not
    /// committed yet; past it, producers are refused (ingest answers 503).
    pub max_lag_per_partition: usize,
    /// The embedded bus's journal file, relative to pipeline.toml's folder
    /// (env `SEGS_BUS_PATH`).
    pub path: PathBuf,
    /// fsync every journal commit (survives power loss); off, a commit still
    /// survives a crashed process.
    pub fsync: bool,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: BusKind::Embedded,
            partitions: 3,
            max_lag_per_partition: 200_000,
            path: PathBuf::from("segs-bus.db"),
            fsync: true,
        }
    }
}

/// `[kafka]`: used when `bus.kind = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers` (env `KAFKA_BROKERS`).
    pub brokers: String,
    /// Prepended to every topic and consumer-group name (several segs
    /// installations, or test runs, on one cluster). Empty: the seed's names.
    pub namespace: String,
    /// Replication factor of the topics segs creates.
    pub replication_factor: u16,
    /// `retention.ms` of the topics segs creates.
    pub retention_ms: u64,
    /// The producer's `linger.ms` (0 sends at once; Tansu needs 0).
    pub linger_ms: u32,
    /// How long start-up waits for the cluster before failing.
    pub connect_timeout_s: u64,
    /// How long a produce may take before it fails (the producer's
    /// `message.timeout.ms`); must be below `dedupe.hold_s`, so a claim's
    /// hold never runs out under a publish that may still succeed.
    pub delivery_timeout_s: u64,
    /// Further librdkafka client properties, passed through as they are
    /// (e.g. `"security.protocol" = "SASL_SSL"`).
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            namespace: String::new(),
            replication_factor: 1,
            retention_ms: 7 * 24 * 3_600_000,
            linger_ms: 0,
            connect_timeout_s: 10,
            delivery_timeout_s: 20,
            client: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    pub kind: DedupeKind,
    /// Seconds a `reading:{meterId}:{timestamp}` key is remembered
    /// (env `REDIS_DEDUPE_TTL`).
    pub reading_ttl_s: u64,
    /// Seconds a request holds the keys it is publishing: a retry meeting
    /// a live hold is answered 503; one meeting a hold that ran out (its
    /// process died) looks on the bus for what the first attempt published.
    pub hold_s: u64,
    /// The Redis of `kind = "redis"` (env `REDIS_URL`).
    pub redis_url: String,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            kind: DedupeKind::Memory,
            reading_ttl_s: 60,
            hold_s: 30,
            redis_url: "redis://127.0.0.1:6379".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://path.db` or `postgres://…` (env `DATABASE_URL`).
    pub url: String,
    /// Keep every reading in `raw_readings` (7-day retention).
    pub archive_raw_readings: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://segs.db".into(),
            archive_raw_readings: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsConfig {
    /// How often open windows are examined and idle ones closed, seconds
    /// (env `FLUSH_INTERVAL_1M`).
    pub flush_interval_1m_s: u64,
    /// The same for 15-minute windows (env `FLUSH_INTERVAL_15M`).
    pub flush_interval_15m_s: u64,
    /// How far behind the newest event time a reading may arrive and still
    /// land in an open window, seconds.
    pub allowed_lateness_s: u64,
    /// Readings the per-meter baseline averages over (an exponentially
    /// weighted mean once it has this many).
    pub baseline_window: u32,
    /// Readings per anomaly plugin call, at most.
    pub anomaly_batch: usize,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        WindowsConfig {
            flush_interval_1m_s: 60,
            flush_interval_15m_s: 900,
            allowed_lateness_s: 5,
            baseline_window: 30,
            anomaly_batch: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Seconds an `alert:dedupe:{meterId}:{type}:{bucket}` key is kept.
    pub dedupe_ttl_s: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig { dedupe_ttl_s: 300 }
    }
}

/// `[notify]`: where alerts and tariff changes are delivered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// `[[notify.webhooks]]`, each delivered on its own (its own consumer
    /// group), so a failing receiver holds back only itself.
    pub webhooks: Vec<WebhookConfig>,
}

/// One `[[notify.webhooks]]`: a URL that gets each matching event once,
/// signed with HMAC-SHA256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique; names its consumer group (`notification-group/{name}`) and
    /// its rows in the delivery log.
    pub name: String,
    pub url: String,
    /// The signing key. Or `secret_env`: the environment variable holding
    /// it (read once at start), to keep it out of the file.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Which events: `alert` (`alerts_processed`), `tariff`
    /// (`tariff_updates`). Default both.
    #[serde(default = "WebhookConfig::all_events")]
    pub events: Vec<NotifyEvent>,
    /// Only these regions (default: every region).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Only these alert types (default: every type).
    #[serde(default)]
    pub alert_types: Vec<crate::messages::AlertType>,
    /// Alerts below this severity are not sent (default `low`: all).
    #[serde(default = "WebhookConfig::lowest")]
    pub min_severity: crate::messages::Severity,
    /// Longest wait between two attempts (the backoff doubles from 100 ms
    /// up to it). Attempts go on until the receiver takes the event.
    #[serde(default = "WebhookConfig::default_max_backoff")]
    pub max_backoff_s: u64,
    /// Time allowed for one attempt.
    #[serde(default = "WebhookConfig::default_timeout")]
    pub timeout_s: u64,
}

impl WebhookConfig {
    fn all_events() -> Vec<NotifyEvent> {
        vec![NotifyEvent::Alert, NotifyEvent::Tariff]
    }
    fn lowest() -> crate::messages::Severity {
        crate::messages::Severity::Low
    }
    fn default_max_backoff() -> u64 {
        60
    }
    fn default_timeout() -> u64 {
        10
    }

    /// The signing key, from `secret` or the variable `secret_env` names.
    pub fn signing_key(&self) -> Option<String> {
        self.secret.clone().or_else(|| {
            self.secret_env
                .as_deref()
                .and_then(|v| std::env::var(v).ok())
        })
    }
}

/// An event kind a webhook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyEvent {
    Alert,
    Tariff,
}

/// `[shutdown]`: how long a stop may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds the stages get, in all, to store and commit what they hold
    /// once asked to stop; a stage still busy then (e.g. retrying a store
    /// that is down) is stopped where it is, and the log says which and why.
    pub grace_s: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_s: 60 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Bound of one plugin call, milliseconds.
    pub call_timeout_ms: u64,
    /// Largest linear memory of one plugin instance, MiB.
    pub max_memory_mib: usize,
    /// Most component instances (and memories) one plugin may create.
    pub max_instances: usize,
    /// Most tables one plugin may create.
    pub max_tables: usize,
    /// Where compiled components are cached (relative to pipeline.toml's
    /// folder), keyed by content: a restart or a swap back to a component
    /// seen before is not a recompile. Empty: no cache.
    pub compile_cache_dir: PathBuf,
}

/// `[plugins.<name>.sandbox]`: this plugin's own limits, each defaulting to
/// `[sandbox]`'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxOverride {
    pub call_timeout_ms: Option<u64>,
    pub max_memory_mib: Option<usize>,
    pub max_instances: Option<usize>,
    pub max_tables: Option<usize>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            call_timeout_ms: 500,
            max_memory_mib: 64,
            max_instances: 16,
            max_tables: 64,
            compile_cache_dir: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path of the component file, relative to pipeline.toml's folder.
    pub component: PathBuf,
    /// Handed to the plugin at load time; it may refuse it.
    #[serde(default)]
    pub config: toml::Table,
    /// What a stage does with a batch whose call failed: `skip` (the rule
    /// is skipped for that batch; readings are still aggregated and stored),
    /// `retry_previous` (the version before the serving one gets the batch
    /// once) or, for the anomaly rule, `dead_letter` (skipped and parked on
    /// `plugin_dead_letter` for `segs replay-dead-letters`).
    #[serde(default)]
    pub on_fault: crate::plugins::OnFault,
    /// Faults in a row after which the plugin is rolled back to its
    /// previous version (0: never).
    #[serde(default = "default_auto_rollback_after")]
    pub auto_rollback_after: u32,
    /// Limits of this plugin that differ from `[sandbox]`.
    #[serde(default)]
    pub sandbox: SandboxOverride,
}

fn default_auto_rollback_after() -> u32 {
    3
}

impl PluginConfig {
    /// The slot's fault handling.
    pub fn fault_policy(&self) -> crate::plugins::FaultPolicy {
        crate::plugins::FaultPolicy {
            on_fault: self.on_fault,
            auto_rollback_after: self.auto_rollback_after,
        }
    }
}

/// `[admin]`: the admin API (`/admin/plugins`) and the watched plugin
/// folder, both ways to swap rule plugins while segs runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token of the admin API (env `SEGS_ADMIN_TOKEN` overrides);
    /// empty: the admin API is off (every admin route answers 404).
    pub token: String,
    /// Largest component (or config) body the admin API accepts, bytes.
    pub max_component_bytes: usize,
    /// A folder watched for `<plugin>.wasm` files (relative to
    /// pipeline.toml's folder); a new or changed file is checked and
    /// swapped in like an admin API push. Empty: no folder is watched.
    pub watch_dir: PathBuf,
    /// How long a watched file must be quiet before it is read, ms (a copy
    /// in progress is not read half-written).
    pub watch_debounce_ms: u64,
    /// How often this process looks in the store for plugin versions other
    /// processes swapped in (and installs them), ms; 0: swaps are not
    /// shared (neither recorded nor followed).
    pub follow_interval_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: String::new(),
            max_component_bytes: 32 << 20,
            watch_dir: PathBuf::new(),
            watch_debounce_ms: 500,
            follow_interval_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionConfig {
    /// Grid capacity of the region, kW: load % = total consumption / capacity.
    pub capacity_kw: f64,
    /// Base tariff of the region, per kWh.
    pub base_price_per_kwh: f64,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            capacity_kw: 1000.0,
            base_price_per_kwh: 6.5,
        }
    }
}

/// The plugins a pipeline must have.
pub const PLUGIN_NAMES: [&str; 4] = ["anomaly", "overload", "tariff", "aggregate"];

impl PipelineConfig {
    /// Reads, parses and checks `path`.
    pub fn load(path: &Path) -> Result<PipelineConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, path, base_dir)
    }

    /// Parses and checks TOML text; `path` is only used in messages.
    pub fn parse(
        text: &str,
        path: &Path,
        base_dir: PathBuf,
    ) -> Result<PipelineConfig, ConfigError> {
        let mut cfg: PipelineConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.base_dir = base_dir;
        cfg.check().map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })?;
        Ok(cfg)
    }

    /// Checks what serde cannot; returns every problem found.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                problems.push(msg);
            }
        };
        need(
            (1..=MAX_HTTP_TIMEOUT_S).contains(&self.http.header_read_timeout_s),
            format!(
                "http.header_read_timeout_s = {}: must be 1..={MAX_HTTP_TIMEOUT_S}",
                self.http.header_read_timeout_s
            ),
        );
        need(
            (1..=MAX_HTTP_TIMEOUT_S).contains(&self.http.body_read_timeout_s),
            format!(
                "http.body_read_timeout_s = {}: must be 1..={MAX_HTTP_TIMEOUT_S}",
                self.http.body_read_timeout_s
            ),
        );
        need(
            (1..=MAX_HTTP_CONNECTIONS).contains(&self.http.max_connections),
            format!(
                "http.max_connections = {}: must be 1..={MAX_HTTP_CONNECTIONS}",
                self.http.max_connections
            ),
        );
        need(
            (1..=self.http.max_connections.max(1)).contains(&self.http.max_in_flight_requests),
            format!(
                "http.max_in_flight_requests = {}: must be 1..=http.max_connections ({}); \
                 an HTTP/1.1 connection carries one request at a time",
                self.http.max_in_flight_requests, self.http.max_connections
            ),
        );
        need(
            (1..=100_000).contains(&self.ingest.max_batch),
            format!(
                "ingest.max_batch = {}: must be 1..=100000",
                self.ingest.max_batch
            ),
        );
        need(
            self.ingest.max_body_bytes >= 1024,
            "ingest.max_body_bytes: must be at least 1024".into(),
        );
        need(
            self.ingest.max_wait_ms <= MAX_INGEST_WAIT_MS,
            format!(
                "ingest.max_wait_ms = {}: must be 0 (refuse at once) ..= {MAX_INGEST_WAIT_MS} (30 s)",
                self.ingest.max_wait_ms
            ),
        );
        need(
            self.ingest.max_clock_skew_s <= MAX_CLOCK_SKEW_S,
            format!(
                "ingest.max_clock_skew_s = {}: must be 0 (no bound) ..= {MAX_CLOCK_SKEW_S} (1 day)",
                self.ingest.max_clock_skew_s
            ),
        );
        need(
            self.ingest.max_reading_age_s <= MAX_READING_AGE_S,
            format!(
                "ingest.max_reading_age_s = {}: must be 0 (no bound) ..= {MAX_READING_AGE_S} (366 days)",
                self.ingest.max_reading_age_s
            ),
        );
        for (name, plugin) in &self.plugins {
            need(
                plugin.on_fault != crate::plugins::OnFault::DeadLetter || name == "anomaly",
                format!(
                    "plugins.{name}.on_fault = \"dead_letter\": only the anomaly rule's batches \
                     can be parked and replayed (its findings are alerts that can be raised \
                     late; the {name} rule's decisions chain from state that has moved on by \
                     then); use \"skip\" or \"retry_previous\""
                ),
            );
        }
        for (i, hook) in self.notify.webhooks.iter().enumerate() {
            let at = format!("notify.webhooks[{i}] ({:?})", hook.name);
            need(
                !hook.name.is_empty()
                    && hook
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                format!("{at}.name: must be non-empty letters, digits, '-' or '_'"),
            );
            need(
                self.notify.webhooks[..i]
                    .iter()
                    .all(|h| h.name != hook.name),
                format!("{at}.name: another webhook has this name"),
            );
            need(
                hook.url.starts_with("http://") || hook.url.starts_with("https://"),
                format!(
                    "{at}.url = {:?}: must be an http:// or https:// URL",
                    hook.url
                ),
            );
            need(
                hook.signing_key().is_some_and(|k| !k.is_empty()),
                match &hook.secret_env {
                    Some(v) if hook.secret.is_none() => {
                        format!("{at}.secret_env: the environment variable {v} is not set")
                    }
                    _ => format!("{at}: needs `secret` or `secret_env` (deliveries are signed)"),
                },
            );
            need(
                hook.max_backoff_s >= 1 && hook.timeout_s >= 1,
                format!("{at}: max_backoff_s and timeout_s must be at least 1"),
            );
        }
        need(
            (1..=1024).contains(&self.bus.partitions),
            format!("bus.partitions = {}: must be 1..=1024", self.bus.partitions),
        );
        need(
            self.bus.max_lag_per_partition >= 1000,
            "bus.max_lag_per_partition: must be at least 1000".into(),
        );
        need(
            !self.bus.path.as_os_str().is_empty(),
            "bus.path: must not be empty".into(),
        );
        if self.bus.kind == BusKind::Kafka {
            need(
                !self.kafka.brokers.trim().is_empty(),
                "kafka.brokers: must name at least one broker (host:port)".into(),
            );
            need(
                self.kafka.replication_factor >= 1,
                "kafka.replication_factor: must be at least 1".into(),
            );
            need(
                self.kafka.connect_timeout_s >= 1,
                "kafka.connect_timeout_s: must be at least 1".into(),
            );
            need(
                (1..self.dedupe.hold_s).contains(&self.kafka.delivery_timeout_s),
                format!(
                    "kafka.delivery_timeout_s = {}: must be at least 1 and below dedupe.hold_s ({})",
                    self.kafka.delivery_timeout_s, self.dedupe.hold_s
                ),
            );
            for key in ["message.timeout.ms", "delivery.timeout.ms"] {
                need(
                    !self.kafka.client.contains_key(key),
                    format!("kafka.client.{key}: set kafka.delivery_timeout_s instead"),
                );
            }
        }
        need(
            self.dedupe.reading_ttl_s <= crate::dedupe::MAX_TTL.as_secs(),
            format!(
                "dedupe.reading_ttl_s = {}: at most {} (20 days)",
                self.dedupe.reading_ttl_s,
                crate::dedupe::MAX_TTL.as_secs()
            ),
        );
        need(
            (1..self.dedupe.reading_ttl_s.max(2)).contains(&self.dedupe.hold_s),
            format!(
                "dedupe.hold_s = {}: must be at least 1 and below dedupe.reading_ttl_s ({})",
                self.dedupe.hold_s, self.dedupe.reading_ttl_s
            ),
        );
        need(
            self.windows.flush_interval_1m_s >= 1,
            "windows.flush_interval_1m_s: must be at least 1".into(),
        );
        need(
            self.windows.flush_interval_15m_s >= 1,
            "windows.flush_interval_15m_s: must be at least 1".into(),
        );
        need(
            self.windows.baseline_window >= 1,
            "windows.baseline_window: must be at least 1".into(),
        );
        need(
            self.windows.anomaly_batch >= 1,
            "windows.anomaly_batch: must be at least 1".into(),
        );
        need(
            self.sandbox.call_timeout_ms >= 1,
            "sandbox.call_timeout_ms: must be at least 1".into(),
        );
        need(
            self.sandbox.max_memory_mib >= 1,
            "sandbox.max_memory_mib: must be at least 1".into(),
        );
        need(
            self.sandbox.max_instances >= 1 && self.sandbox.max_tables >= 1,
            "sandbox.max_instances, sandbox.max_tables: must be at least 1".into(),
        );
        for (name, plugin) in &self.plugins {
            let o = &plugin.sandbox;
            for (field, value) in [
                ("call_timeout_ms", o.call_timeout_ms.map(|v| v as usize)),
                ("max_memory_mib", o.max_memory_mib),
                ("max_instances", o.max_instances),
                ("max_tables", o.max_tables),
            ] {
                need(
                    value != Some(0),
                    format!("plugins.{name}.sandbox.{field}: must be at least 1"),
                );
            }
        }
        need(
            self.admin.max_component_bytes >= 1,
            "admin.max_component_bytes: must be at least 1".into(),
        );
        for name in PLUGIN_NAMES {
            need(
                self.plugins.contains_key(name),
                format!("plugins.{name}: missing (every pipeline needs the {name} plugin)"),
            );
        }
        for name in self.plugins.keys() {
            need(
                PLUGIN_NAMES.contains(&name.as_str()),
                format!(
                    "plugins.{name}: unknown plugin (known: {})",
                    PLUGIN_NAMES.join(", ")
                ),
            );
        }
        let region_ok = |key: &str, r: &RegionConfig, problems: &mut Vec<String>| {
            if !(r.capacity_kw.is_finite() && r.capacity_kw > 0.0) {
                problems.push(format!("{key}.capacity_kw: must be a positive number"));
            }
            if !(r.base_price_per_kwh.is_finite() && r.base_price_per_kwh > 0.0) {
                problems.push(format!(
                    "{key}.base_price_per_kwh: must be a positive number"
                ));
            }
        };
        region_ok("region_defaults", &self.region_defaults, &mut problems);
        for (name, r) in &self.regions {
            region_ok(&format!("regions.\"{name}\""), r, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Applies the seed's environment overrides.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        fn secs(name: &'static str) -> Result<Option<u64>, ConfigError> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(Some)
                    .ok_or(ConfigError::Env {
                        name,
                        value: v,
                        message: "expected a whole number of seconds, at least 1".into(),
                    }),
                Err(_) => Ok(None),
            }
        }
        if let Some(v) = secs("REDIS_DEDUPE_TTL")? {
            self.dedupe.reading_ttl_s = v;
        }
        if let Some(v) = secs("FLUSH_INTERVAL_1M")? {
            self.windows.flush_interval_1m_s = v;
        }
        if let Some(v) = secs("FLUSH_INTERVAL_15M")? {
            self.windows.flush_interval_15m_s = v;
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if url.trim().is_empty() {
                return Err(ConfigError::Env {
                    name: "DATABASE_URL",
                    value: url,
                    message: "must not be empty".into(),
                });
            }
            self.store.url = url;
        }
        if let Some(path) = std::env::var_os("SEGS_BUS_PATH") {
            if path.is_empty() {
                return Err(ConfigError::Env {
                    name: "SEGS_BUS_PATH",
                    value: String::new(),
                    message: "must not be empty".into(),
                });
            }
            self.bus.path = PathBuf::from(path);
        }
        if let Ok(role) = std::env::var("SEGS_ROLE") {
            self.role = role.parse().map_err(|message| ConfigError::Env {
                name: "SEGS_ROLE",
                value: role.clone(),
                message,
            })?;
        }
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            if brokers.trim().is_empty() {
                return Err(ConfigError::Env {
                    name: "KAFKA_BROKERS",
                    value: brokers,
                    message: "must not be empty".into(),
                });
            }
            self.kafka.brokers = brokers;
        }
        if let Ok(token) = std::env::var("SEGS_ADMIN_TOKEN") {
            self.admin.token = token;
        }
        if let Ok(url) = std::env::var("REDIS_URL") {
            if url.trim().is_empty() {
                return Err(ConfigError::Env {
                    name: "REDIS_URL",
                    value: url,
                    message: "must not be empty".into(),
                });
            }
            self.dedupe.redis_url = url;
        }
        Ok(())
    }

    /// The embedded bus's journal file, resolved against the config file's
    /// folder (an absolute `bus.path` is kept as is).
    pub fn bus_path(&self) -> PathBuf {
        self.base_dir.join(&self.bus.path)
    }

    /// A plugin's component path, resolved against the config file's folder.
    pub fn component_path(&self, plugin: &str) -> Option<PathBuf> {
        self.plugins
            .get(plugin)
            .map(|p| self.base_dir.join(&p.component))
    }

    /// The compiled-component cache folder, resolved against the config
    /// file's folder; `None` when none is configured.
    pub fn compile_cache_dir(&self) -> Option<PathBuf> {
        (!self.sandbox.compile_cache_dir.as_os_str().is_empty())
            .then(|| self.base_dir.join(&self.sandbox.compile_cache_dir))
    }

    /// The watched plugin folder, resolved against the config file's folder;
    /// `None` when none is configured.
    pub fn watch_dir(&self) -> Option<PathBuf> {
        (!self.admin.watch_dir.as_os_str().is_empty())
            .then(|| self.base_dir.join(&self.admin.watch_dir))
    }

    /// The sandbox limits of plugin `name`: its own where it sets them,
    /// `[sandbox]`'s otherwise.
    pub fn plugin_limits(&self, name: &str) -> crate::plugins::Limits {
        let d = &self.sandbox;
        let o = self
            .plugins
            .get(name)
            .map(|p| p.sandbox.clone())
            .unwrap_or_default();
        crate::plugins::Limits {
            call_timeout: std::time::Duration::from_millis(
                o.call_timeout_ms.unwrap_or(d.call_timeout_ms),
            ),
            max_memory_bytes: o.max_memory_mib.unwrap_or(d.max_memory_mib) << 20,
            max_instances: o.max_instances.unwrap_or(d.max_instances),
            max_tables: o.max_tables.unwrap_or(d.max_tables),
        }
    }

    /// Capacity and base price of `region` (the defaults if it is not listed).
    pub fn region(&self, region: &str) -> &RegionConfig {
        self.regions.get(region).unwrap_or(&self.region_defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[plugins.anomaly]
component = "a.wasm"
[plugins.overload]
component = "o.wasm"
[plugins.tariff]
component = "t.wasm"
[plugins.aggregate]
component = "g.wasm"
"#;

    fn parse(text: &str) -> Result<PipelineConfig, ConfigError> {
        PipelineConfig::parse(text, Path::new("pipeline.toml"), PathBuf::from("/cfg"))
    }

    #[test]
    fn the_shipped_pipeline_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline.toml");
        let cfg = PipelineConfig::load(&path).unwrap();
        assert!(cfg.regions.contains_key("Mumbai-North"));
        assert_eq!(cfg.plugins.len(), 4);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.ingest.max_batch, 1000);
        assert_eq!(cfg.http.header_read_timeout_s, 10);
        assert_eq!(cfg.http.body_read_timeout_s, 10);
        assert!(cfg.http.keep_alive);
        assert_eq!(cfg.http.max_connections, 4096);
        assert_eq!(cfg.http.max_in_flight_requests, 256);
        assert_eq!(cfg.ingest.max_clock_skew_s, 300);
        assert_eq!(cfg.ingest.max_reading_age_s, 604_800);
        assert_eq!(cfg.dedupe.reading_ttl_s, 60);
        assert_eq!(cfg.windows.flush_interval_15m_s, 900);
        assert_eq!(
            cfg.component_path("tariff").unwrap(),
            PathBuf::from("/cfg/t.wasm")
        );
        assert_eq!(cfg.region("Nowhere").base_price_per_kwh, 6.5);
        assert_eq!(cfg.bus.kind, BusKind::Embedded);
        assert!(cfg.bus.fsync);
        assert_eq!(cfg.bus_path(), PathBuf::from("/cfg/segs-bus.db"));
    }

    #[test]
    fn bus_keys_are_checked_and_named() {
        let cfg = parse(&format!(
            "{MINIMAL}\n[bus]\nkind = \"memory\"\npath = \"/var/lib/segs/bus.db\"\nfsync = false\n"
        ))
        .unwrap();
        assert_eq!(cfg.bus.kind, BusKind::Memory);
        assert!(!cfg.bus.fsync);
        assert_eq!(cfg.bus_path(), PathBuf::from("/var/lib/segs/bus.db"));
        let err = parse(&format!("{MINIMAL}\n[bus]\nfsync = \"yes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fsync"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[bus]\npaht = \"x.db\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("paht"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[bus]\nkind = \"disk\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("embedded"), "{err}");
    }

    #[test]
    fn a_dedupe_ttl_past_twenty_days_is_refused_by_name() {
        let ok = parse(&format!("{MINIMAL}\n[dedupe]\nreading_ttl_s = 1728000\n")).unwrap();
        assert_eq!(ok.dedupe.reading_ttl_s, 1_728_000);
        let ConfigError::Invalid { problems, .. } =
            parse(&format!("{MINIMAL}\n[dedupe]\nreading_ttl_s = 1728001\n")).unwrap_err()
        else {
            panic!("a TTL past the cap must be refused");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("dedupe.reading_ttl_s = 1728001: at most 1728000"),
            "{problems:?}"
        );
    }

    #[test]
    fn only_the_anomaly_rule_may_park_its_batches() {
        let text = MINIMAL.replace(
            "component = \"a.wasm\"",
            "component = \"a.wasm\"\non_fault = \"dead_letter\"",
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(
            cfg.plugins["anomaly"].on_fault,
            crate::plugins::OnFault::DeadLetter
        );
        let text = MINIMAL.replace(
            "component = \"t.wasm\"",
            "component = \"t.wasm\"\non_fault = \"dead_letter\"",
        );
        let ConfigError::Invalid { problems, .. } = parse(&text).unwrap_err() else {
            panic!("a tariff dead letter must be refused");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("plugins.tariff.on_fault = \"dead_letter\""),
            "{problems:?}"
        );
    }

    #[test]
    fn http_keys_are_read_and_checked() {
        let cfg = parse(&format!(
            "{MINIMAL}\n[http]\nheader_read_timeout_s = 2\nbody_read_timeout_s = 3\nkeep_alive = false\nmax_connections = 8\nmax_in_flight_requests = 4\n"
        ))
        .unwrap();
        assert_eq!(cfg.http.header_read_timeout_s, 2);
        assert_eq!(cfg.http.body_read_timeout_s, 3);
        assert!(!cfg.http.keep_alive);
        assert_eq!(cfg.http.max_connections, 8);
        assert_eq!(cfg.http.max_in_flight_requests, 4);
        let err = parse(&format!("{MINIMAL}\n[http]\nread_timeout_s = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("read_timeout_s"), "{err}");
        assert!(err.contains("line 12"), "{err}");
        let text = format!(
            "{MINIMAL}\n[http]\nheader_read_timeout_s = 0\nbody_read_timeout_s = 3601\nmax_connections = 4\nmax_in_flight_requests = 5\n"
        );
        let ConfigError::Invalid { problems, .. } = parse(&text).unwrap_err() else {
            panic!("expected Invalid");
        };
        let all = problems.join("\n");
        assert!(all.contains("http.header_read_timeout_s = 0"), "{all}");
        assert!(all.contains("http.body_read_timeout_s = 3601"), "{all}");
        assert!(all.contains("http.max_in_flight_requests = 5"), "{all}");
        let err = parse(&format!("{MINIMAL}\n[http]\nmax_connections = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.max_connections = 0"), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse(&format!("{MINIMAL}\n[windows]\nflush_interval_1m = 30\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("flush_interval_1m"), "{err}");
        assert!(err.contains("line 12"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse(&format!("{MINIMAL}\n[ingest]\nmax_batch = \"lots\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_batch"), "{err}");
        assert!(err.contains("line 12"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let text = format!(
            "{MINIMAL}\n[ingest]\nmax_wait_ms = 30001\nmax_clock_skew_s = 86401\nmax_reading_age_s = 31622401\n[bus]\npartitions = 0\n[regions.\"X\"]\ncapacity_kw = -1\nbase_price_per_kwh = 0\n[plugins.magic]\ncomponent = \"m.wasm\"\n"
        );
        let ConfigError::Invalid { problems, .. } = parse(&text).unwrap_err() else {
            panic!("expected Invalid");
        };
        let all = problems.join("\n");
        assert!(all.contains("bus.partitions"), "{all}");
        assert!(all.contains("ingest.max_clock_skew_s = 86401"), "{all}");
        assert!(all.contains("ingest.max_wait_ms = 30001"), "{all}");
        assert!(all.contains("ingest.max_reading_age_s = 31622401"), "{all}");
        assert!(all.contains("regions.\"X\".capacity_kw"), "{all}");
        assert!(all.contains("regions.\"X\".base_price_per_kwh"), "{all}");
        assert!(all.contains("plugins.magic"), "{all}");
    }

    #[test]
    fn missing_plugin_is_named() {
        let err = parse("[plugins.anomaly]\ncomponent = \"a.wasm\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("plugins.overload: missing"), "{err}");
    }
}
