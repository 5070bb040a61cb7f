//! One loaded rule component ([`Plugin`]) and the typed entry points of the
//! four rule worlds on top of it.
//!
//! A `Plugin` owns one store and one instance. Every call gets a fresh epoch
//! deadline; a call that traps (a bug, a timeout, a memory blow-up) fails on
//! its own, is counted and logged, and the instance is thrown away and rebuilt
//! (then configured again) before the next call, so one bad batch never leaves
//! a half-broken guest behind.

use std::path::Path;

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::bindings;
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
pub trait World: Sized + Send {
    /// The WIT world name, for messages.
    const WORLD: &'static str;
    type Pre: Send;
    fn pre(linker: &Linker<GuestState>, component: &Component) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<GuestState>) -> wasmtime::Result<Self>;
    // The generated binding takes the WIT `config` alias, a `&Vec`.
    #[allow(clippy::ptr_arg)]
    fn configure(
        &self,
        store: &mut Store<GuestState>,
        config: &Vec<(String, ConfigValue)>,
    ) -> wasmtime::Result<Result<(), String>>;
}

macro_rules! world {
    ($module:ident :: $bindings:ident, $pre:ident, $name:literal) => {
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
        }
    };
}

world!(anomaly::AnomalyRule, AnomalyRulePre, "anomaly-rule");
world!(overload::OverloadRule, OverloadRulePre, "overload-rule");
world!(tariff::TariffRule, TariffRulePre, "tariff-rule");
world!(aggregate::AggregateRule, AggregateRulePre, "aggregate-rule");

/// A loaded, configured rule component of world `W`.
pub struct Plugin<W: World> {
    runtime: Runtime,
    pre: W::Pre,
    store: Store<GuestState>,
    /// `None` after a failed call: rebuilt before the next one.
    instance: Option<W>,
    config: Vec<(String, ConfigValue)>,
    version: PluginVersion,
    failures: u64,
}

pub type AnomalyRule = Plugin<bindings::anomaly::AnomalyRule>;
pub type OverloadRule = Plugin<bindings::overload::OverloadRule>;
pub type TariffRule = Plugin<bindings::tariff::TariffRule>;
pub type AggregateRule = Plugin<bindings::aggregate::AggregateRule>;

impl<W: World> Plugin<W> {
    /// Compiles the component at `path`, instantiates it and hands it its
    /// config. Any failure leaves nothing behind.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        path: &Path,
        config: Vec<(String, ConfigValue)>,
    ) -> Result<Self, PluginError> {
        let (component, version) = runtime.compile(name, path, W::WORLD)?;
        let pre = W::pre(&runtime.linker, &component).map_err(|e| PluginError::Invalid {
            name: name.to_owned(),
            path: path.to_owned(),
            world: W::WORLD,
            reason: format!("{e:#}"),
        })?;
        let mut plugin = Plugin {
            runtime: runtime.clone(),
            pre,
            store: runtime.new_store(),
            instance: None,
            config,
            version,
            failures: 0,
        };
        plugin.instantiate()?;
        Ok(plugin)
    }

    pub fn version(&self) -> &PluginVersion {
        &self.version
    }

    /// A second instance of the same compiled component and config, for
    /// another stage that calls the same rule (no recompilation).
    pub fn another(&self) -> Result<Self, PluginError>
    where
        W::Pre: Clone,
    {
        let mut plugin = Plugin {
            runtime: self.runtime.clone(),
            pre: self.pre.clone(),
            store: self.runtime.new_store(),
            instance: None,
            config: self.config.clone(),
            version: self.version.clone(),
            failures: 0,
        };
        plugin.instantiate()?;
        Ok(plugin)
    }

    /// Calls that failed (trapped, timed out, broke the contract) so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    fn name(&self) -> &str {
        &self.version.name
    }

    fn instantiate(&mut self) -> Result<(), PluginError> {
        // A fresh store: whatever the previous instance left in memory goes.
        self.store = self.runtime.new_store();
        self.store.set_epoch_deadline(self.runtime.deadline_ticks());
        let instance =
            W::instantiate(&self.pre, &mut self.store).map_err(|e| self.trap("instantiate", e))?;
        self.store.set_epoch_deadline(self.runtime.deadline_ticks());
        match instance.configure(&mut self.store, &self.config) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(PluginError::Config {
                    name: self.name().to_owned(),
                    message,
                });
            }
            Err(e) => return Err(self.trap("configure", e)),
        }
        self.instance = Some(instance);
        Ok(())
    }

    fn trap(&self, call: &'static str, error: wasmtime::Error) -> PluginError {
        let reason = match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => format!(
                "timed out (call bound {} ms)",
                self.runtime.limits.call_timeout.as_millis()
            ),
            _ => format!("{error:#}"),
        };
        PluginError::Trap {
            name: self.name().to_owned(),
            call,
            reason,
        }
    }

    /// Runs one guest call under a fresh deadline. On failure the instance is
    /// dropped (and rebuilt on the next call) and the failure is counted.
    fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&W, &mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        if self.instance.is_none() {
            self.instantiate()?;
        }
        let Some(instance) = self.instance.as_ref() else {
            unreachable!("instantiate() either sets the instance or fails")
        };
        self.store.set_epoch_deadline(self.runtime.deadline_ticks());
        match f(instance, &mut self.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.instance = None;
                self.failures += 1;
                let error = self.trap(call, e);
                tracing::warn!(plugin = %self.version.name, sha256 = %self.version.sha256, %error, "plugin call failed");
                Err(error)
            }
        }
    }

    fn contract(&mut self, call: &'static str, expected: usize, got: usize) -> PluginError {
        self.failures += 1;
        PluginError::Contract {
            name: self.name().to_owned(),
            call,
            expected,
            got,
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
        let findings = self.call("detect", |i, s| i.call_detect(s, batch))?;
        if let Some(bad) = findings.iter().find(|f| f.index as usize >= n) {
            let got = bad.index as usize + 1;
            return Err(self.contract("detect", n, got));
        }
        Ok(findings)
    }
}

impl OverloadRule {
    /// One decision per regional window, same order.
    pub fn evaluate(
        &mut self,
        windows: &[overload::RegionWindow],
    ) -> Result<Vec<overload::OverloadDecision>, PluginError> {
        let out = self.call("evaluate", |i, s| i.call_evaluate(s, windows))?;
        if out.len() != windows.len() {
            return Err(self.contract("evaluate", windows.len(), out.len()));
        }
        Ok(out)
    }
}

impl TariffRule {
    /// The regions whose price moves enough to publish.
    pub fn price(
        &mut self,
        regions: &[tariff::RegionLoad],
    ) -> Result<Vec<tariff::TariffDecision>, PluginError> {
        let out = self.call("price", |i, s| i.call_price(s, regions))?;
        if let Some(bad) = out.iter().find(|d| d.index as usize >= regions.len()) {
            let got = bad.index as usize + 1;
            return Err(self.contract("price", regions.len(), got));
        }
        Ok(out)
    }
}

impl AggregateRule {
    /// One published aggregate per closed meter window, same order.
    pub fn finish_meters(
        &mut self,
        windows: &[aggregate::MeterWindow],
    ) -> Result<Vec<aggregate::MeterAggregate>, PluginError> {
        let out = self.call("finish-meters", |i, s| i.call_finish_meters(s, windows))?;
        if out.len() != windows.len() {
            return Err(self.contract("finish-meters", windows.len(), out.len()));
        }
        Ok(out)
    }

    /// One regional aggregate per closed regional window, same order.
    pub fn finish_regions(
        &mut self,
        regions: &[aggregate::RegionWindow],
    ) -> Result<Vec<aggregate::RegionalAggregate>, PluginError> {
        let out = self.call("finish-regions", |i, s| i.call_finish_regions(s, regions))?;
        if out.len() != regions.len() {
            return Err(self.contract("finish-regions", regions.len(), out.len()));
        }
        Ok(out)
    }
}
