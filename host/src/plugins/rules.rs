//! One stage's handle on a rule ([`Plugin`]) and the typed entry points of
//! the four rule worlds on top of it.
//!
//! A `Plugin` owns one store and one instance, built from the version its
//! [`Slot`] serves. Before every call it checks whether the slot has moved to
//! another version (a swap or a rollback) and, if so, builds its instance
//! from that one: a call — one batch — runs wholly on one version, and the
//! version that produced a result is [`Plugin::served_by`]. Every call gets
//! a fresh epoch deadline; a call that traps (a bug, a timeout, a memory
//! blow-up) or breaks the contract fails on its own, is reported to the slot
//! (counted, logged, raised, perhaps rolled back), the instance is thrown
//! away and rebuilt before the next call, and the slot's fault policy says
//! whether the previous version gets to try the batch.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::bindings;
use super::slot::{Build, FaultPolicy, OnFault, Slot};
use super::{ConfigValue, GuestState, PluginError, PluginVersion, Runtime};

/// Types of the anomaly world.
pub mod anomaly {
    pub use super::bindings::anomaly::segs::rules::anomaly::{AnomalyKind, Finding, ReadingBatch};
}
/// Types of the overload world.
pub mod overload {
    pub use super::bindings::overload::segs::rules::overload::{
        OverloadAlert, OverloadDecision, RegionWindow,
    };
}
/// Types of the tariff world.
pub mod tariff {
    pub use super::bindings::tariff::segs::rules::tariff::{
        RegionLoad, TariffDecision, TariffReason,
    };
}
/// Types of the aggregate world.
pub mod aggregate {
    pub use super::bindings::aggregate::segs::rules::aggregate::{
        MeterAggregate, MeterWindow, RegionWindow, RegionalAggregate,
    };
}

/// What the runtime needs to know of a world's generated bindings.
pub trait World: Sized + Send + 'static {
    /// The WIT world name, for messages.
    const WORLD: &'static str;
    type Pre: Clone + Send + Sync + 'static;
    fn pre(linker: &Linker<GuestState>, component: &Component) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<GuestState>) -> wasmtime::Result<Self>;
    // The generated binding takes the WIT `config` alias, a `&Vec`.
    #[allow(clippy::ptr_arg)]
    fn configure(
        &self,
        store: &mut Store<GuestState>,
        config: &Vec<(String, ConfigValue)>,
    ) -> wasmtime::Result<Result<(), String>>;
    /// Runs the rule on a small made-up batch and checks the answer keeps
    /// the contract: the last check before a swap. `Err` says what is wrong.
    fn sample(&self, store: &mut Store<GuestState>) -> Result<(), SampleError>;
}

/// Why a sample call failed.
pub enum SampleError {
    /// The call trapped.
    Trap(wasmtime::Error),
    /// The answer broke the contract.
    Contract(String),
}

impl From<wasmtime::Error> for SampleError {
    fn from(e: wasmtime::Error) -> Self {
        SampleError::Trap(e)
    }
}

macro_rules! world {
    ($module:ident :: $bindings:ident, $pre:ident, $name:literal, $sample:ident) => {
        impl World for bindings::$module::$bindings {
            const WORLD: &'static str = $name;
            type Pre = bindings::$module::$pre<GuestState>;
            fn pre(
                linker: &Linker<GuestState>,
                component: &Component,
            ) -> wasmtime::Result<Self::Pre> {
                bindings::$module::$pre::new(linker.instantiate_pre(component)?)
            }
            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<GuestState>,
            ) -> wasmtime::Result<Self> {
                pre.instantiate(store)
            }
            fn configure(
                &self,
                store: &mut Store<GuestState>,
                config: &Vec<(String, ConfigValue)>,
            ) -> wasmtime::Result<Result<(), String>> {
                self.call_configure(store, config)
            }
            fn sample(&self, store: &mut Store<GuestState>) -> Result<(), SampleError> {
                $sample(self, store)
            }
        }
    };
}

world!(
    anomaly::AnomalyRule,
    AnomalyRulePre,
    "anomaly-rule",
    sample_anomaly
);
world!(
    overload::OverloadRule,
    OverloadRulePre,
    "overload-rule",
    sample_overload
);
world!(
    tariff::TariffRule,
    TariffRulePre,
    "tariff-rule",
    sample_tariff
);
world!(
    aggregate::AggregateRule,
    AggregateRulePre,
    "aggregate-rule",
    sample_aggregate
);

fn sample_anomaly(
    rule: &bindings::anomaly::AnomalyRule,
    store: &mut Store<GuestState>,
) -> Result<(), SampleError> {
    let batch = anomaly::ReadingBatch {
        power_kw: vec![5.0, 20.0, 0.0, 5.5, 1.0, 5.0, 4.0, 30.0],
        baseline_kw: vec![5.0; 8],
        sample_count: vec![0, 50, 50, 50, 50, 50, 3, 50],
    };
    let findings = rule.call_detect(&mut *store, &batch)?;
    check_findings(&findings, batch.power_kw.len()).map_err(SampleError::Contract)
}

fn sample_overload(
    rule: &bindings::overload::OverloadRule,
    store: &mut Store<GuestState>,
) -> Result<(), SampleError> {
    let windows: Vec<overload::RegionWindow> = [(50.0, 0), (95.0, 0), (99.0, 1), (120.0, 5)]
        .into_iter()
        .map(|(load, consecutive)| overload::RegionWindow {
            load_percentage: load,
            total_consumption: load * 10.0,
            capacity_kw: 1000.0,
            consecutive,
        })
        .collect();
    let out = rule.call_evaluate(&mut *store, &windows)?;
    check_len(out.len(), windows.len()).map_err(SampleError::Contract)
}

fn sample_tariff(
    rule: &bindings::tariff::TariffRule,
    store: &mut Store<GuestState>,
) -> Result<(), SampleError> {
    let regions: Vec<tariff::RegionLoad> = [10.0, 55.0, 80.0, 95.0]
        .into_iter()
        .map(|load| tariff::RegionLoad {
            load_percentage: load,
            base_price: 6.5,
            last_price: 6.5,
        })
        .collect();
    let out = rule.call_price(&mut *store, &regions)?;
    check_prices(&out, regions.len()).map_err(SampleError::Contract)
}

fn sample_aggregate(
    rule: &bindings::aggregate::AggregateRule,
    store: &mut Store<GuestState>,
) -> Result<(), SampleError> {
    let windows: Vec<aggregate::MeterWindow> = [(6, 30.0), (1, 2.0), (3, 0.0)]
        .into_iter()
        .map(|(count, power_sum)| aggregate::MeterWindow {
            count,
            power_sum,
            max_power: power_sum,
            min_power: 0.0,
            energy_sum: power_sum / 360.0,
            voltage_sum: 230.0 * f64::from(count),
            voltage_count: count,
        })
        .collect();
    let out = rule.call_finish_meters(&mut *store, &windows)?;
    check_meters(&out, &windows).map_err(SampleError::Contract)?;
    let regions = vec![aggregate::RegionWindow {
        meter_count: 2,
        total_kw: 10.0,
        max_kw: 6.0,
        min_kw: 4.0,
        capacity_kw: 100.0,
    }];
    let out = rule.call_finish_regions(&mut *store, &regions)?;
    check_len(out.len(), regions.len()).map_err(SampleError::Contract)
}

fn check_len(got: usize, expected: usize) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("returned {got} results for {expected} inputs"))
    }
}

fn check_findings(findings: &[anomaly::Finding], n: usize) -> Result<(), String> {
    match findings.iter().find(|f| f.index as usize >= n) {
        Some(bad) => Err(format!(
            "returned a finding for index {} of a batch of {n}",
            bad.index
        )),
        None => Ok(()),
    }
}

fn check_prices(out: &[tariff::TariffDecision], n: usize) -> Result<(), String> {
    for d in out {
        if d.index as usize >= n {
            return Err(format!(
                "returned a price for index {} of {n} regions",
                d.index
            ));
        }
        if !(d.price_per_kwh.is_finite() && d.price_per_kwh > 0.0) {
            return Err(format!(
                "returned the price {} (prices are finite and positive)",
                d.price_per_kwh
            ));
        }
    }
    Ok(())
}

/// Aggregates keep their windows' counts: a rule that changed them would
/// lose or invent readings.
fn check_meters(
    out: &[aggregate::MeterAggregate],
    windows: &[aggregate::MeterWindow],
) -> Result<(), String> {
    check_len(out.len(), windows.len())?;
    match out
        .iter()
        .zip(windows)
        .position(|(a, w)| a.count != w.count)
    {
        Some(i) => Err(format!(
            "changed the count of window {i} from {} to {}",
            windows[i].count, out[i].count
        )),
        None => Ok(()),
    }
}

/// One store and instance of one version.
struct Instance<W: World> {
    store: Store<GuestState>,
    /// `None` after a failed call: rebuilt before the next one.
    instance: Option<W>,
}

impl<W: World> Instance<W> {
    fn new(runtime: &Runtime) -> Self {
        Instance {
            store: runtime.new_store(),
            instance: None,
        }
    }

    /// Builds and configures the instance from `build`, in a fresh store:
    /// whatever the previous instance left in memory goes.
    fn instantiate(&mut self, runtime: &Runtime, build: &Build<W>) -> Result<(), PluginError> {
        self.instance = None;
        self.store = runtime.new_store();
        self.store.set_epoch_deadline(runtime.deadline_ticks());
        let store = &mut self.store;
        let instance = outside_async(|| W::instantiate(&build.pre, store))
            .map_err(|e| trap(runtime, &build.version.name, "instantiate", e))?;
        self.store.set_epoch_deadline(runtime.deadline_ticks());
        let store = &mut self.store;
        match outside_async(|| instance.configure(store, &build.config)) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(PluginError::Config {
                    name: build.version.name.clone(),
                    message,
                });
            }
            Err(e) => return Err(trap(runtime, &build.version.name, "configure", e)),
        }
        self.instance = Some(instance);
        Ok(())
    }

    /// One guest call under a fresh deadline, its answer checked. On failure
    /// the instance is dropped (rebuilt before the next call).
    fn run<R>(
        &mut self,
        runtime: &Runtime,
        build: &Build<W>,
        call: &'static str,
        f: &impl Fn(&W, &mut Store<GuestState>) -> wasmtime::Result<R>,
        check: &impl Fn(&R) -> Result<(), String>,
    ) -> Result<R, PluginError> {
        if self.instance.is_none() {
            self.instantiate(runtime, build)?;
        }
        let Some(instance) = self.instance.as_ref() else {
            unreachable!("instantiate() either sets the instance or fails")
        };
        self.store.set_epoch_deadline(runtime.deadline_ticks());
        let store = &mut self.store;
        let out = outside_async(|| f(instance, store)).map_err(|e| {
            self.instance = None;
            trap(runtime, &build.version.name, call, e)
        })?;
        if let Err(reason) = check(&out) {
            self.instance = None;
            return Err(PluginError::Contract {
                name: build.version.name.clone(),
                call,
                reason,
            });
        }
        Ok(out)
    }
}

/// Runs guest code off the async runtime's worker: a guest that writes to
/// its (closed) stdio — a Rust guest does when it panics or runs out of
/// memory — reaches WASI host code that blocks on the Tokio runtime, which
/// panics on a worker thread and would take the calling stage down with
/// it. On a multi-threaded runtime the call runs in `block_in_place`; on a
/// blocking-pool thread or outside a runtime it just runs.
pub(super) fn outside_async<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

pub(super) fn trap(
    runtime: &Runtime,
    name: &str,
    call: &'static str,
    error: wasmtime::Error,
) -> PluginError {
    let reason = match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => format!(
            "timed out (call bound {} ms)",
            runtime.limits.call_timeout.as_millis()
        ),
        _ => format!("{error:#}"),
    };
    PluginError::Trap {
        name: name.to_owned(),
        call,
        reason,
    }
}

/// One stage's handle on a rule: an instance of the version its slot
/// serves, rebuilt when the slot moves on.
pub struct Plugin<W: World> {
    slot: Arc<Slot<W>>,
    build: Arc<Build<W>>,
    /// The slot's generation `build` was taken at.
    generation: u64,
    instance: Instance<W>,
    /// The version whose answer the last successful call returned.
    served_by: Arc<PluginVersion>,
    failures: u64,
}

pub type AnomalyRule = Plugin<bindings::anomaly::AnomalyRule>;
pub type OverloadRule = Plugin<bindings::overload::OverloadRule>;
pub type TariffRule = Plugin<bindings::tariff::TariffRule>;
pub type AggregateRule = Plugin<bindings::aggregate::AggregateRule>;

impl<W: World> Plugin<W> {
    /// Reads, compiles, checks (world, instantiate, configure, sample) and
    /// loads the component at `path` into a slot of its own, with the
    /// default fault policy. Any failure leaves nothing behind.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        path: &Path,
        config: Vec<(String, ConfigValue)>,
    ) -> Result<Self, PluginError> {
        let slot = Slot::<W>::load(runtime, name, path, config, FaultPolicy::default())?;
        slot.instance()
    }

    /// A handle on `slot`'s current version, instantiated and configured.
    pub(super) fn on(slot: Arc<Slot<W>>) -> Result<Self, PluginError> {
        let (generation, build) = slot.current();
        let mut instance = Instance::new(&slot.runtime);
        instance.instantiate(&slot.runtime, &build)?;
        Ok(Plugin {
            served_by: build.version.clone(),
            slot,
            build,
            generation,
            instance,
            failures: 0,
        })
    }

    /// The version this handle runs now (the slot's, as of the last call).
    pub fn version(&self) -> &PluginVersion {
        &self.build.version
    }

    /// The version that produced the last successful call's answer: the
    /// provenance of the decisions made from it.
    pub fn served_by(&self) -> &PluginVersion {
        &self.served_by
    }

    /// A second handle on the same slot, for another stage that calls the
    /// same rule (no recompilation).
    pub fn another(&self) -> Result<Self, PluginError> {
        Plugin::on(self.slot.clone())
    }

    /// The version the next call runs on as of the last call: after a
    /// failed call, the version that failed.
    pub fn calling(&self) -> &PluginVersion {
        &self.build.version
    }

    /// What the stage does with a batch whose call failed.
    pub fn on_fault(&self) -> OnFault {
        self.slot.policy().on_fault
    }

    /// Calls through this handle that failed (trapped, timed out, broke the
    /// contract) so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Moves to the slot's current version if it changed since the last
    /// call. Only here, between calls, does a handle change version.
    fn sync(&mut self) {
        let generation = self.slot.generation();
        if generation != self.generation {
            let (generation, build) = self.slot.current();
            self.generation = generation;
            self.build = build;
            self.instance.instance = None;
        }
    }

    /// Runs one batch call on the current version. A failure is reported to
    /// the slot; with [`OnFault::RetryPrevious`] the version before it gets
    /// the same batch once.
    fn call<R>(
        &mut self,
        call: &'static str,
        records: usize,
        f: impl Fn(&W, &mut Store<GuestState>) -> wasmtime::Result<R>,
        check: impl Fn(&R) -> Result<(), String>,
    ) -> Result<R, PluginError> {
        self.sync();
        let build = self.build.clone();
        let started = Instant::now();
        let result = self
            .instance
            .run(&self.slot.runtime, &build, call, &f, &check);
        build.stats.record(records, started.elapsed());
        match result {
            Ok(out) => {
                self.slot.succeeded();
                self.served_by = build.version.clone();
                Ok(out)
            }
            Err(error) => {
                self.failures += 1;
                self.slot.fault(&build, call, &error);
                if self.slot.policy().on_fault == OnFault::RetryPrevious
                    && let Some(previous) = self.slot.previous_of(&build)
                {
                    let mut other = Instance::new(&self.slot.runtime);
                    let started = Instant::now();
                    let retried = other.run(&self.slot.runtime, &previous, call, &f, &check);
                    previous.stats.record(records, started.elapsed());
                    match retried {
                        Ok(out) => {
                            tracing::info!(
                                plugin = %previous.version.name,
                                version = previous.version.version,
                                "the previous version handled the batch the current one failed"
                            );
                            self.served_by = previous.version.clone();
                            return Ok(out);
                        }
                        Err(e) => self.slot.fault(&previous, call, &e),
                    }
                }
                Err(error)
            }
        }
    }
}

impl AnomalyRule {
    /// Runs the anomaly rule on one batch. Findings point into the batch.
    pub fn detect(
        &mut self,
        batch: &anomaly::ReadingBatch,
    ) -> Result<Vec<anomaly::Finding>, PluginError> {
        let n = batch.power_kw.len();
        debug_assert!(batch.baseline_kw.len() == n && batch.sample_count.len() == n);
        self.call(
            "detect",
            n,
            |i, s| i.call_detect(s, batch),
            |findings: &Vec<_>| check_findings(findings, n),
        )
    }
}

impl OverloadRule {
    /// One decision per regional window, same order.
    pub fn evaluate(
        &mut self,
        windows: &[overload::RegionWindow],
    ) -> Result<Vec<overload::OverloadDecision>, PluginError> {
        let n = windows.len();
        self.call(
            "evaluate",
            n,
            |i, s| i.call_evaluate(s, windows),
            |out: &Vec<_>| check_len(out.len(), n),
        )
    }
}

impl TariffRule {
    /// The regions whose price moves enough to publish.
    pub fn price(
        &mut self,
        regions: &[tariff::RegionLoad],
    ) -> Result<Vec<tariff::TariffDecision>, PluginError> {
        let n = regions.len();
        self.call(
            "price",
            n,
            |i, s| i.call_price(s, regions),
            |out: &Vec<_>| check_prices(out, n),
        )
    }
}

impl AggregateRule {
    /// One published aggregate per closed meter window, same order.
    pub fn finish_meters(
        &mut self,
        windows: &[aggregate::MeterWindow],
    ) -> Result<Vec<aggregate::MeterAggregate>, PluginError> {
        let n = windows.len();
        self.call(
            "finish-meters",
            n,
            |i, s| i.call_finish_meters(s, windows),
            |out: &Vec<_>| check_meters(out, windows),
        )
    }

    /// One regional aggregate per closed regional window, same order.
    pub fn finish_regions(
        &mut self,
        regions: &[aggregate::RegionWindow],
    ) -> Result<Vec<aggregate::RegionalAggregate>, PluginError> {
        let n = regions.len();
        self.call(
            "finish-regions",
            n,
            |i, s| i.call_finish_regions(s, regions),
            |out: &Vec<_>| check_len(out.len(), n),
        )
    }
}
