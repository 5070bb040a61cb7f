//! Hot swap: one [`Slot`] per rule kind holds the version that serves, the
//! versions before it (for rollback) and their counters; the [`Registry`]
//! holds the four slots by name for the admin API, the CLI and the watched
//! folder.
//!
//! A new component or config becomes a version only after every check has
//! passed, in this order, each a [`Step`] named in a refusal: `compile`
//! (component bytes, compiled by wasmtime), `world` (exports the slot's
//! world with the right types, imports nothing but WASI), `instantiate`,
//! `configure` (the plugin accepts the config), `sample` (a small made-up
//! batch gives an answer that keeps the contract). Checking compiles and
//! runs guest code: callers do it off the async runtime
//! (`spawn_blocking`). A refusal changes nothing: the running version
//! keeps serving.
//!
//! Installing is a pointer swap under a lock plus a generation bump; each
//! stage's [`Plugin`] compares the generation before each call and rebuilds
//! its instance from the new version then, so every batch runs wholly on one
//! version and none is lost or run twice. Rule state lives in the stages, not
//! in the instance, so it carries over.
//!
//! Faults (a trap, a timeout, a memory blow-up, a broken contract) are
//! counted per version, logged, and sent as [`PluginEvent`]s (the app raises
//! them as `PLUGIN_FAULT` alerts). After `auto_rollback_after` faults in a
//! row of the serving version, the slot rolls back to the version before it
//! (a `PLUGIN_ROLLBACK` alert).
//!
//! Must not: know about stages, the bus or the store.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use wasmtime::component::Component;

use super::rules::{SampleError, World, outside_async, trap};
use super::{ConfigValue, Plugin, PluginError, PluginVersion, Runtime, sha256_hex};

/// How many earlier versions a slot keeps for rollback.
const HISTORY: usize = 8;

/// The checks a new version goes through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Reading the component (a file, or a request body within its limit).
    Read,
    /// Compiling the bytes as a WebAssembly component.
    Compile,
    /// Linking: the component exports the slot's world and imports only WASI.
    World,
    /// Instantiating it in the sandbox.
    Instantiate,
    /// Handing it its config, which it may refuse.
    Configure,
    /// Running it on a small sample batch.
    Sample,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Read => "read",
            Step::Compile => "compile",
            Step::World => "world",
            Step::Instantiate => "instantiate",
            Step::Configure => "configure",
            Step::Sample => "sample",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(
        "plugin `{name}`: refused at step `{step}`: {source}; the running version keeps serving"
    )]
    Refused {
        name: String,
        step: Step,
        source: PluginError,
    },
    #[error("plugin `{name}`: there is no previous version to roll back to")]
    NoPrevious { name: String },
    #[error("unknown plugin `{name}` (known: {known})")]
    Unknown { name: String, known: String },
}

impl SwapError {
    /// The step that refused, if it was a refusal.
    pub fn step(&self) -> Option<Step> {
        match self {
            SwapError::Refused { step, .. } => Some(*step),
            _ => None,
        }
    }
}

/// What a stage does with a batch whose call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFault {
    /// Skip the rule for that batch: the stage's own fallback (no anomaly
    /// alerts, plain averages, prices and overload counts unchanged); the
    /// readings are still aggregated and stored.
    #[default]
    Skip,
    /// Run the batch once on the version before the serving one (when there
    /// is one); if that fails too, skip.
    RetryPrevious,
    /// Skip, and park the batch on the `plugin_dead_letter` topic, to be
    /// run again through the serving version by `segs replay-dead-letters`
    /// (the anomaly rule only: its findings are alerts that can be raised
    /// late; the other rules' decisions chain from state that has moved on
    /// by then).
    DeadLetter,
}

/// A slot's fault handling (`[plugins.<name>]` `on_fault`,
/// `auto_rollback_after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultPolicy {
    pub on_fault: OnFault,
    /// Faults in a row of the serving version after which the slot rolls
    /// back to the version before it; 0 never does.
    pub auto_rollback_after: u32,
}

impl Default for FaultPolicy {
    fn default() -> Self {
        FaultPolicy {
            on_fault: OnFault::Skip,
            auto_rollback_after: 3,
        }
    }
}

/// What happened to a plugin that an operator must hear of.
#[derive(Debug, Clone)]
pub enum PluginEvent {
    /// A call failed; `version` made it.
    Fault {
        version: PluginVersion,
        call: &'static str,
        reason: String,
        at_ms: i64,
    },
    /// The slot went back from `from` to `to` after `faults` faults in a row.
    RolledBack {
        from: PluginVersion,
        to: PluginVersion,
        faults: u32,
        at_ms: i64,
    },
}

/// Counters of one version.
#[derive(Debug, Default)]
pub(super) struct Stats {
    calls: AtomicU64,
    faults: AtomicU64,
    records: AtomicU64,
    nanos: AtomicU64,
}

impl Stats {
    pub(super) fn record(&self, records: usize, took: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// One checked version: the pre-instantiated component, its config, who it
/// is and its counters. Shared by every stage's handle on the slot.
pub struct Build<W: World> {
    pub(super) pre: W::Pre,
    /// The component's bytes (shared with other processes on a swap).
    pub(super) bytes: Arc<[u8]>,
    pub(super) config: Vec<(String, ConfigValue)>,
    pub(super) version: Arc<PluginVersion>,
    pub(super) stats: Stats,
}

/// A version that passed every check, not yet installed.
struct Checked<W: World> {
    pre: W::Pre,
    bytes: Arc<[u8]>,
    config: Vec<(String, ConfigValue)>,
    sha256: String,
    source: String,
}

struct SlotState<W: World> {
    current: Arc<Build<W>>,
    /// Earlier versions, oldest first.
    history: Vec<Arc<Build<W>>>,
    /// Versions rolled back from, oldest first: listed with their
    /// counters, never served again.
    retired: Vec<Arc<Build<W>>>,
    next_version: u64,
}

/// The versions of one rule kind.
pub struct Slot<W: World> {
    pub(super) runtime: Runtime,
    name: String,
    policy: FaultPolicy,
    /// Bumped, under the state lock, on every install and rollback.
    generation: AtomicU64,
    state: Mutex<SlotState<W>>,
    /// Faults in a row of the serving version.
    consecutive: AtomicU32,
    events: Option<mpsc::UnboundedSender<PluginEvent>>,
}

impl<W: World> Slot<W> {
    /// Reads and checks the component at `path` (every [`Step`]) and makes
    /// it version 1 of a new slot.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        path: &Path,
        config: Vec<(String, ConfigValue)>,
        policy: FaultPolicy,
    ) -> Result<Arc<Slot<W>>, PluginError> {
        Self::load_with_events(runtime, name, path, config, policy, None)
    }

    fn load_with_events(
        runtime: &Runtime,
        name: &str,
        path: &Path,
        config: Vec<(String, ConfigValue)>,
        policy: FaultPolicy,
        events: Option<mpsc::UnboundedSender<PluginEvent>>,
    ) -> Result<Arc<Slot<W>>, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        let source = format!("file:{}", path.display());
        let checked =
            outside_async(|| check::<W>(runtime, name, Some(&bytes), None, config, source))
                .map_err(|(_, e)| e)?;
        let version = PluginVersion {
            name: name.to_owned(),
            version: 1,
            sha256: checked.sha256,
            loaded_at: now(),
            source: checked.source,
        };
        Ok(Arc::new(Slot {
            runtime: runtime.clone(),
            name: name.to_owned(),
            policy,
            generation: AtomicU64::new(1),
            state: Mutex::new(SlotState {
                current: Arc::new(Build {
                    pre: checked.pre,
                    bytes: checked.bytes,
                    config: checked.config,
                    version: Arc::new(version),
                    stats: Stats::default(),
                }),
                history: Vec::new(),
                retired: Vec::new(),
                next_version: 2,
            }),
            consecutive: AtomicU32::new(0),
            events,
        }))
    }

    /// A stage's handle on this slot, instantiated and configured.
    pub fn instance(self: &Arc<Self>) -> Result<Plugin<W>, PluginError> {
        Plugin::on(self.clone())
    }

    pub fn policy(&self) -> FaultPolicy {
        self.policy
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The serving version and the generation it belongs to.
    pub(super) fn current(&self) -> (u64, Arc<Build<W>>) {
        let st = self.state.lock();
        (self.generation(), st.current.clone())
    }

    /// The version before `build`, if the slot still knows it.
    pub(super) fn previous_of(&self, build: &Arc<Build<W>>) -> Option<Arc<Build<W>>> {
        let st = self.state.lock();
        if Arc::ptr_eq(&st.current, build) {
            return st.history.last().cloned();
        }
        let i = st.history.iter().position(|b| Arc::ptr_eq(b, build))?;
        i.checked_sub(1).map(|j| st.history[j].clone())
    }

    /// Checks a new component (`bytes`) and/or config and, if every step
    /// passes, installs it as the serving version. Without `bytes` the
    /// serving component gets the new config; without `config` the new
    /// component gets the serving config. Blocking: compiles and runs guest
    /// code.
    pub fn swap(
        &self,
        bytes: Option<&[u8]>,
        config: Option<Vec<(String, ConfigValue)>>,
        source: String,
    ) -> Result<PluginVersion, SwapError> {
        let (_, current) = self.current();
        let config = config.unwrap_or_else(|| current.config.clone());
        let compiled = match bytes {
            Some(_) => None,
            None => Some((
                current.pre.clone(),
                current.version.sha256.clone(),
                current.bytes.clone(),
            )),
        };
        let checked = outside_async(|| {
            check::<W>(&self.runtime, &self.name, bytes, compiled, config, source)
        })
        .map_err(|(step, source)| SwapError::Refused {
            name: self.name.clone(),
            step,
            source,
        })?;
        let mut st = self.state.lock();
        let version = Arc::new(PluginVersion {
            name: self.name.clone(),
            version: st.next_version,
            sha256: checked.sha256,
            loaded_at: now(),
            source: checked.source,
        });
        st.next_version += 1;
        let build = Arc::new(Build {
            pre: checked.pre,
            bytes: checked.bytes,
            config: checked.config,
            version: version.clone(),
            stats: Stats::default(),
        });
        let old = std::mem::replace(&mut st.current, build);
        st.history.push(old);
        if st.history.len() > HISTORY {
            st.history.remove(0);
        }
        self.consecutive.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(st);
        tracing::info!(
            plugin = %version.name,
            version = version.version,
            sha256 = %version.sha256,
            source = %version.source,
            "plugin swapped in; stages switch before their next batch"
        );
        Ok((*version).clone())
    }

    /// Goes back to the version before the serving one (which is retired:
    /// still listed, never served again).
    pub fn rollback(&self) -> Result<PluginVersion, SwapError> {
        let mut st = self.state.lock();
        let (from, to) = self.rollback_locked(&mut st)?;
        drop(st);
        tracing::warn!(
            plugin = %self.name,
            from = from.version,
            to = to.version,
            "plugin rolled back"
        );
        Ok(to)
    }

    fn rollback_locked(
        &self,
        st: &mut SlotState<W>,
    ) -> Result<(PluginVersion, PluginVersion), SwapError> {
        let previous = st.history.pop().ok_or_else(|| SwapError::NoPrevious {
            name: self.name.clone(),
        })?;
        let from = std::mem::replace(&mut st.current, previous);
        self.consecutive.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let versions = ((*from.version).clone(), (*st.current.version).clone());
        st.retired.push(from);
        if st.retired.len() > HISTORY {
            st.retired.remove(0);
        }
        Ok(versions)
    }

    pub(super) fn succeeded(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// A failed call of `build`: counted, logged, sent as an event; after
    /// too many in a row of the serving version, a rollback.
    pub(super) fn fault(&self, build: &Arc<Build<W>>, call: &'static str, error: &PluginError) {
        build.stats.faults.fetch_add(1, Ordering::Relaxed);
        let v = &build.version;
        tracing::warn!(plugin = %v.name, version = v.version, sha256 = %v.sha256, %error, "plugin call failed");
        self.emit(PluginEvent::Fault {
            version: (**v).clone(),
            call,
            reason: error.to_string(),
            at_ms: crate::time::now_ms(),
        });
        let limit = self.policy.auto_rollback_after;
        let mut st = self.state.lock();
        if !Arc::ptr_eq(&st.current, build) {
            return;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if limit == 0 || n < limit {
            return;
        }
        match self.rollback_locked(&mut st) {
            Ok((from, to)) => {
                drop(st);
                tracing::warn!(
                    plugin = %self.name,
                    from = from.version,
                    to = to.version,
                    faults = n,
                    "plugin rolled back automatically after faults in a row"
                );
                self.emit(PluginEvent::RolledBack {
                    from,
                    to,
                    faults: n,
                    at_ms: crate::time::now_ms(),
                });
            }
            Err(_) if n == limit => {
                tracing::error!(
                    plugin = %self.name,
                    faults = n,
                    "plugin keeps failing and has no previous version to roll back to"
                );
            }
            Err(_) => {}
        }
    }

    fn emit(&self, event: PluginEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }
}

/// Every step after reading: compile and link `bytes` (or reuse `compiled`,
/// for a config change), instantiate, configure, run the sample.
fn check<W: World>(
    runtime: &Runtime,
    name: &str,
    bytes: Option<&[u8]>,
    compiled: Option<(W::Pre, String, Arc<[u8]>)>,
    config: Vec<(String, ConfigValue)>,
    source: String,
) -> Result<Checked<W>, (Step, PluginError)> {
    let origin = Path::new(&source);
    let (pre, sha256, bytes, source) = match (bytes, compiled) {
        (Some(bytes), _) => {
            let component: Component = runtime
                .compile(name, origin, W::WORLD, bytes)
                .map_err(|e| (Step::Compile, e))?;
            let pre = W::pre(&runtime.linker, &component).map_err(|e| {
                (
                    Step::World,
                    PluginError::Invalid {
                        name: name.to_owned(),
                        path: origin.to_owned(),
                        world: W::WORLD,
                        reason: format!("{e:#}"),
                    },
                )
            })?;
            (pre, sha256_hex(bytes), Arc::from(bytes), source)
        }
        (None, Some((pre, sha256, bytes))) => (pre, sha256, bytes, format!("{source}+config")),
        (None, None) => unreachable!("a swap has a component or reuses the serving one"),
    };
    let mut store = runtime.new_store();
    store.set_epoch_deadline(runtime.deadline_ticks());
    let instance = W::instantiate(&pre, &mut store)
        .map_err(|e| (Step::Instantiate, trap(runtime, name, "instantiate", e)))?;
    store.set_epoch_deadline(runtime.deadline_ticks());
    match instance.configure(&mut store, &config) {
        Ok(Ok(())) => {}
        Ok(Err(message)) => {
            return Err((
                Step::Configure,
                PluginError::Config {
                    name: name.to_owned(),
                    message,
                },
            ));
        }
        Err(e) => return Err((Step::Configure, trap(runtime, name, "configure", e))),
    }
    store.set_epoch_deadline(runtime.deadline_ticks());
    instance.sample(&mut store).map_err(|e| {
        let error = match e {
            SampleError::Trap(e) => trap(runtime, name, "sample", e),
            SampleError::Contract(reason) => PluginError::Contract {
                name: name.to_owned(),
                call: "sample",
                reason,
            },
        };
        (Step::Sample, error)
    })?;
    Ok(Checked {
        pre,
        bytes,
        config,
        sha256,
        source,
    })
}

fn now() -> String {
    crate::time::format_rfc3339_ms(crate::time::now_ms())
}

/// A version with its counters, as `GET /admin/plugins` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionListing {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub loaded_at: String,
    pub source: String,
    pub calls: u64,
    pub faults: u64,
    pub records: u64,
    /// Mean wall time per record of its calls, nanoseconds (`None` before
    /// its first record).
    pub mean_ns_per_record: Option<f64>,
}

/// A slot as `GET /admin/plugins` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotListing {
    pub name: String,
    pub world: String,
    pub serving: VersionListing,
    /// Earlier versions a rollback goes back to, newest first.
    pub previous: Vec<VersionListing>,
    /// Versions rolled back from (by hand or after faults), newest first.
    pub retired: Vec<VersionListing>,
    pub consecutive_faults: u32,
    pub on_fault: OnFault,
    pub auto_rollback_after: u32,
}

fn listing<W: World>(build: &Build<W>) -> VersionListing {
    let v = &build.version;
    let s = &build.stats;
    let records = s.records.load(Ordering::Relaxed);
    VersionListing {
        name: v.name.clone(),
        version: v.version,
        sha256: v.sha256.clone(),
        loaded_at: v.loaded_at.clone(),
        source: v.source.clone(),
        calls: s.calls.load(Ordering::Relaxed),
        faults: s.faults.load(Ordering::Relaxed),
        records,
        mean_ns_per_record: (records > 0)
            .then(|| s.nanos.load(Ordering::Relaxed) as f64 / records as f64),
    }
}

/// A slot of any world, for the admin API, the CLI and the watched folder.
pub trait SlotControl: Send + Sync {
    fn name(&self) -> &str;
    fn listing(&self) -> SlotListing;
    /// See [`Slot::swap`]. Blocking.
    fn swap(
        &self,
        bytes: Option<&[u8]>,
        config: Option<Vec<(String, ConfigValue)>>,
        source: String,
    ) -> Result<PluginVersion, SwapError>;
    fn rollback(&self) -> Result<PluginVersion, SwapError>;
    /// The serving version.
    fn serving(&self) -> PluginVersion;
    /// The serving version's component bytes and config.
    fn serving_artifact(&self) -> (Arc<[u8]>, Vec<(String, ConfigValue)>);
}

impl<W: World> SlotControl for Slot<W> {
    fn name(&self) -> &str {
        &self.name
    }

    fn listing(&self) -> SlotListing {
        let st = self.state.lock();
        SlotListing {
            name: self.name.clone(),
            world: W::WORLD.to_owned(),
            serving: listing(&st.current),
            previous: st.history.iter().rev().map(|b| listing(b)).collect(),
            retired: st.retired.iter().rev().map(|b| listing(b)).collect(),
            consecutive_faults: self.consecutive.load(Ordering::Relaxed),
            on_fault: self.policy.on_fault,
            auto_rollback_after: self.policy.auto_rollback_after,
        }
    }

    fn swap(
        &self,
        bytes: Option<&[u8]>,
        config: Option<Vec<(String, ConfigValue)>>,
        source: String,
    ) -> Result<PluginVersion, SwapError> {
        Slot::swap(self, bytes, config, source)
    }

    fn rollback(&self) -> Result<PluginVersion, SwapError> {
        Slot::rollback(self)
    }

    fn serving(&self) -> PluginVersion {
        (*self.current().1.version).clone()
    }

    fn serving_artifact(&self) -> (Arc<[u8]>, Vec<(String, ConfigValue)>) {
        let (_, build) = self.current();
        (build.bytes.clone(), build.config.clone())
    }
}

/// Every slot of a running segs, by name, and the stream of their events.
pub struct Registry {
    slots: BTreeMap<String, Arc<dyn SlotControl>>,
    events_tx: mpsc::UnboundedSender<PluginEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<PluginEvent>>>,
}

impl Default for Registry {
    fn default() -> Self {
        let (events_tx, rx) = mpsc::unbounded_channel();
        Registry {
            slots: BTreeMap::new(),
            events_tx,
            events_rx: Mutex::new(Some(rx)),
        }
    }
}

impl Registry {
    /// Loads the component at `path` as version 1 of slot `name` and keeps
    /// the slot (see [`Slot::load`]).
    pub fn load<W: World>(
        &mut self,
        runtime: &Runtime,
        name: &str,
        path: &Path,
        config: Vec<(String, ConfigValue)>,
        policy: FaultPolicy,
    ) -> Result<Arc<Slot<W>>, PluginError> {
        let slot = Slot::<W>::load_with_events(
            runtime,
            name,
            path,
            config,
            policy,
            Some(self.events_tx.clone()),
        )?;
        self.slots.insert(name.to_owned(), slot.clone());
        Ok(slot)
    }

    pub fn get(&self, name: &str) -> Result<&Arc<dyn SlotControl>, SwapError> {
        self.slots.get(name).ok_or_else(|| SwapError::Unknown {
            name: name.to_owned(),
            known: self.slots.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn list(&self) -> Vec<SlotListing> {
        self.slots.values().map(|s| s.listing()).collect()
    }

    /// The serving version of every slot.
    pub fn serving(&self) -> Vec<PluginVersion> {
        self.slots.values().map(|s| s.serving()).collect()
    }

    /// The faults and rollbacks of every slot; the first caller gets them.
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<PluginEvent>> {
        self.events_rx.lock().take()
    }
}
