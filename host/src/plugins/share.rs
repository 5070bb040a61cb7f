//! Swaps reach every process on the same store: a version installed through
//! one process's admin API or watched folder (or a manual rollback) is
//! recorded in `plugin_versions` with its component bytes and config, and
//! every other process polls that table and installs it too, through the
//! same checks (source `shared:<seq>`), logging when it switched. A process
//! that refuses it (it cannot, with the same build of segs, but it is
//! checked anyway) keeps its version and says so in its log.
//!
//! Automatic rollbacks stay local: each process rolls back on its own
//! faults. A process started later begins with the versions its
//! pipeline.toml names and follows the swaps recorded after its start.
//!
//! Must not: block the async runtime (installing runs in `spawn_blocking`).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Registry, SlotControl, config_from_json, config_to_json};
use crate::store::{SharedPluginVersion, Store, StoreError};

/// What a process needs to share its swaps.
pub struct Sharing {
    pub store: Arc<dyn Store>,
    /// This process, as `origin` of what it records.
    pub origin: String,
}

impl Sharing {
    pub fn new(store: Arc<dyn Store>) -> Sharing {
        Sharing {
            store,
            origin: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Records `slot`'s serving version for the other processes.
    pub async fn publish(&self, slot: &dyn SlotControl, source: &str) -> Result<i64, StoreError> {
        let version = slot.serving();
        let (bytes, config) = slot.serving_artifact();
        self.store
            .publish_plugin_version(&SharedPluginVersion {
                seq: 0,
                plugin: version.name,
                sha256: version.sha256,
                component: bytes.to_vec(),
                config: config_to_json(&config),
                source: source.to_owned(),
                origin: self.origin.clone(),
            })
            .await
    }

    /// Follows what other processes record, every `every`, from what is
    /// recorded now on.
    pub async fn follow(
        self: Arc<Self>,
        registry: Arc<Registry>,
        every: Duration,
    ) -> Result<JoinHandle<()>, StoreError> {
        let mut seen = self
            .store
            .plugin_versions_after(0)
            .await?
            .last()
            .map_or(0, |v| v.seq);
        Ok(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let recorded = match self.store.plugin_versions_after(seen).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading shared plugin versions failed; retrying");
                        continue;
                    }
                };
                for v in recorded {
                    seen = v.seq;
                    if v.origin != self.origin {
                        install(registry.clone(), v).await;
                    }
                }
            }
        }))
    }
}

async fn install(registry: Arc<Registry>, v: SharedPluginVersion) {
    let Ok(slot) = registry.get(&v.plugin).cloned() else {
        tracing::warn!(plugin = %v.plugin, seq = v.seq, "shared plugin version for an unknown plugin; ignored");
        return;
    };
    let serving = slot.serving();
    let (_, config) = slot.serving_artifact();
    let same_config = config_to_json(&config) == v.config;
    if serving.sha256 == v.sha256 && same_config {
        return;
    }
    let config = match v.config.as_object().map(|o| config_from_json(&v.plugin, o)) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            tracing::error!(plugin = %v.plugin, seq = v.seq, error = %e, "shared plugin version refused");
            return;
        }
        None => {
            tracing::error!(plugin = %v.plugin, seq = v.seq, "shared plugin config is not an object");
            return;
        }
    };
    let (plugin, seq) = (v.plugin.clone(), v.seq);
    let source = format!("shared:{}:{}", v.seq, v.source);
    let swapped =
        tokio::task::spawn_blocking(move || slot.swap(Some(&v.component), Some(config), source))
            .await;
    match swapped {
        Ok(Ok(installed)) => tracing::info!(
            plugin = %plugin,
            seq,
            version = installed.version,
            sha256 = %installed.sha256,
            switched_at = %installed.loaded_at,
            "installed a plugin version another process swapped in"
        ),
        Ok(Err(e)) => {
            tracing::error!(plugin = %plugin, seq, error = %e, "shared plugin version refused here")
        }
        Err(e) => {
            tracing::error!(plugin = %plugin, seq, error = %e, "installing a shared plugin version panicked")
        }
    }
}
