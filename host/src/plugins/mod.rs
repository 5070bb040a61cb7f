//! The plugin runtime: loads rule components with wasmtime, gives them their
//! config, and calls them once per batch inside a sandbox.
//!
//! Owns the wasmtime `Engine`, the epoch ticker that bounds every call, the
//! per-instance memory cap, and the recovery after a trap (the instance is
//! rebuilt from its pre-instantiated form and configured again before the next
//! call). It does not know where batches come from or what is done with the
//! decisions: that is the pipeline's business.
//!
//! Hot swap ([`slot`]): each rule kind has one [`Slot`] holding the version
//! that serves and the ones before it; a new component or config is checked
//! step by step off the hot path and installed between two calls, and every
//! stage's [`Plugin`] picks it up before its next call.
//!
//! Sandbox: guests are linked against WASI preview 2 (the Rust standard
//! library needs it) with an empty `WasiCtx`: no preopened directories, no
//! environment, no arguments, no sockets, stdio closed.

mod bindings;
mod rules;
pub mod share;
pub mod slot;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use bindings::{ConfigValue, Severity};
pub use rules::{
    AggregateRule, AnomalyRule, OverloadRule, Plugin, TariffRule, World, aggregate, anomaly,
    overload, tariff,
};
pub use slot::{
    FaultPolicy, OnFault, PluginEvent, Registry, SlotControl, SlotListing, Step, SwapError,
    VersionListing,
};

/// How often the epoch ticker advances the engine's epoch.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits every guest call runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock bound of one call (rounded up to the epoch tick).
    pub call_timeout: Duration,
    /// Largest linear memory a guest may grow to, in bytes.
    pub max_memory_bytes: usize,
    /// Most component instances one guest may create (a component built by
    /// componentize-py or jco nests several).
    pub max_instances: usize,
    /// Most tables one guest may create.
    pub max_tables: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout: Duration::from_millis(500),
            max_memory_bytes: 64 << 20,
            max_instances: 16,
            max_tables: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{name}`: cannot read {}: {source}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "plugin `{name}`: {} is not a valid {world} component: {reason}",
        path.display()
    )]
    Invalid {
        name: String,
        path: PathBuf,
        world: &'static str,
        reason: String,
    },
    #[error("plugin `{name}` refused its config: {message}")]
    Config { name: String, message: String },
    #[error("plugin `{name}`: config key `{key}`: {message}")]
    ConfigValue {
        name: String,
        key: String,
        message: String,
    },
    #[error("plugin `{name}` failed during `{call}`: {reason}")]
    Trap {
        name: String,
        call: &'static str,
        reason: String,
    },
    #[error("plugin `{name}`: `{call}` broke the contract: it {reason}")]
    Contract {
        name: String,
        call: &'static str,
        reason: String,
    },
}

/// Identity of a loaded component and config, for listings, logs and the
/// provenance of every decision it makes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginVersion {
    pub name: String,
    /// 1 for the version loaded at start, then one more per swap in this
    /// process (a rollback goes back to the earlier number).
    pub version: u64,
    /// SHA-256 of the component bytes, hex.
    pub sha256: String,
    /// When it was checked and installed, RFC 3339.
    pub loaded_at: String,
    /// Where it came from: `file:<path>` (start), `admin` (the admin API),
    /// `watch:<path>` (the watched folder), with `+config` for a config
    /// change on the same component.
    pub source: String,
}

impl PluginVersion {
    /// The name, version and sha256 that decisions record.
    pub fn provenance(&self) -> crate::messages::RuleRef {
        crate::messages::RuleRef {
            name: self.name.clone(),
            version: self.version,
            sha256: self.sha256.clone(),
        }
    }
}

/// The shared wasmtime engine and linker. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<GuestState>>,
    limits: Limits,
}

impl Runtime {
    pub fn new(limits: Limits) -> Result<Runtime, wasmtime::Error> {
        Runtime::with_compile_cache(limits, None)
    }

    /// A runtime whose compiled components are kept in `cache_dir` (keyed by
    /// the component's content and the engine's settings), so a restart or
    /// a swap back to a component compiled before is not a recompile.
    pub fn with_compile_cache(
        limits: Limits,
        cache_dir: Option<&Path>,
    ) -> Result<Runtime, wasmtime::Error> {
        let mut config = wasmtime::Config::new();
        if let Some(dir) = cache_dir {
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            config.cache(Some(wasmtime::Cache::new(cache)?));
        }
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        spawn_epoch_ticker(engine.weak());
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            limits,
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The same engine and linker with other limits (a plugin's own).
    pub fn with_limits(&self, limits: Limits) -> Runtime {
        Runtime {
            limits,
            ..self.clone()
        }
    }

    /// Compiles component bytes. Compilation is the slow part of a load
    /// (tens to hundreds of milliseconds): keep it off the async runtime.
    fn compile(
        &self,
        name: &str,
        origin: &Path,
        world: &'static str,
        bytes: &[u8],
    ) -> Result<Component, PluginError> {
        let invalid = |reason: String| PluginError::Invalid {
            name: name.to_owned(),
            path: origin.to_owned(),
            world,
            reason,
        };
        if !is_component(bytes) {
            return Err(invalid(
                "it is a core wasm module or not wasm at all; build it as a component \
                 (`cargo xtask build-plugins` targets wasm32-wasip2)"
                    .into(),
            ));
        }
        Component::new(&self.engine, bytes).map_err(|e| invalid(format!("{e:#}")))
    }

    fn new_store(&self) -> Store<GuestState> {
        let state = GuestState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.max_memory_bytes)
                .instances(self.limits.max_instances)
                .tables(self.limits.max_tables)
                .memories(self.limits.max_instances)
                .build(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(u64::MAX / 2);
        store
    }

    fn deadline_ticks(&self) -> u64 {
        let ticks = self.limits.call_timeout.as_micros() / EPOCH_TICK.as_micros();
        (ticks as u64).max(1) + 1
    }
}

/// What a store holds for its guest: a closed WASI context and the limits.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Advances the engine epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: wasmtime::EngineWeak) {
    std::thread::Builder::new()
        .name("segs-epoch".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch ticker thread");
}

/// A component binary starts with the wasm magic and a layer-1 version
/// (core modules have layer 0).
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[0..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Turns a `[plugins.<name>.config]` TOML table into the WIT config list.
/// Nested tables and arrays are refused here, naming the key.
pub fn config_from_toml(
    name: &str,
    table: &toml::Table,
) -> Result<Vec<(String, ConfigValue)>, PluginError> {
    table
        .iter()
        .map(|(key, value)| {
            let v = match value {
                toml::Value::Float(f) => ConfigValue::Float(*f),
                toml::Value::Integer(i) => ConfigValue::Integer(*i),
                toml::Value::Boolean(b) => ConfigValue::Boolean(*b),
                toml::Value::String(s) => ConfigValue::Text(s.clone()),
                other => {
                    return Err(PluginError::ConfigValue {
                        name: name.to_owned(),
                        key: key.clone(),
                        message: format!(
                            "a {} is not supported; plugin config values are numbers, booleans or strings",
                            other.type_str()
                        ),
                    });
                }
            };
            Ok((key.clone(), v))
        })
        .collect()
}

/// Turns a JSON object (the admin API's `config`) into the WIT config
/// list, with the same rules as [`config_from_toml`]: scalars only, the key
/// named in every refusal.
pub fn config_from_json(
    name: &str,
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(String, ConfigValue)>, PluginError> {
    use serde_json::Value;
    object
        .iter()
        .map(|(key, value)| {
            let v = match value {
                Value::Number(n) if n.is_i64() => ConfigValue::Integer(n.as_i64().unwrap_or(0)),
                Value::Number(n) => ConfigValue::Float(n.as_f64().unwrap_or(f64::NAN)),
                Value::Bool(b) => ConfigValue::Boolean(*b),
                Value::String(s) => ConfigValue::Text(s.clone()),
                other => {
                    let kind = match other {
                        Value::Null => "null",
                        Value::Array(_) => "array",
                        _ => "object",
                    };
                    return Err(PluginError::ConfigValue {
                        name: name.to_owned(),
                        key: key.clone(),
                        message: format!(
                            "a JSON {kind} is not supported; plugin config values are numbers, booleans or strings"
                        ),
                    });
                }
            };
            Ok((key.clone(), v))
        })
        .collect()
}

/// The WIT config list as a JSON object (what [`config_from_json`] reads).
pub fn config_to_json(config: &[(String, ConfigValue)]) -> serde_json::Value {
    use serde_json::Value;
    let object = config
        .iter()
        .map(|(k, v)| {
            let v = match v {
                ConfigValue::Float(f) => {
                    serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
                }
                ConfigValue::Integer(i) => Value::from(*i),
                ConfigValue::Boolean(b) => Value::Bool(*b),
                ConfigValue::Text(s) => Value::String(s.clone()),
            };
            (k.clone(), v)
        })
        .collect();
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_components_from_core_modules() {
        assert!(is_component(b"\0asm\x0d\0\x01\0"));
        assert!(!is_component(b"\0asm\x01\0\0\0"));
        assert!(!is_component(b"hello wo"));
        assert!(!is_component(b""));
    }

    #[test]
    fn config_refuses_nested_values_naming_the_key() {
        let table: toml::Table = toml::from_str("a = 1\nb = [1, 2]").unwrap();
        let err = config_from_toml("anomaly", &table).unwrap_err().to_string();
        assert!(err.contains("`b`"), "{err}");
        assert!(err.contains("array"), "{err}");
    }

    #[test]
    fn config_maps_scalars() {
        let table: toml::Table = toml::from_str("f = 1.5\ni = 10\nb = true\ns = 'x'").unwrap();
        let cfg = config_from_toml("anomaly", &table).unwrap();
        assert_eq!(cfg.len(), 4);
        assert!(
            cfg.iter()
                .any(|(k, v)| k == "i" && matches!(v, ConfigValue::Integer(10)))
        );
    }
}
