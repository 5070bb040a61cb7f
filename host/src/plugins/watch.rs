//! The watched plugin folder (`admin.watch_dir`): a new or changed
//! `<plugin>.wasm` there (`tariff.wasm`, …) is read once it has been quiet
//! for the debounce time (so a copy in progress is not read half-written),
//! then checked and swapped in like an admin API push (source
//! `watch:<path>`). A file whose bytes are those of the serving version is
//! left alone; a refusal is logged and changes nothing.
//!
//! Must not: block the async runtime (reading and checking run in
//! `spawn_blocking`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::share::Sharing;
use super::{Registry, sha256_hex};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("admin.watch_dir {}: {reason}", path.display())]
    Watch { path: PathBuf, reason: String },
}

/// Starts watching `dir`; the task runs until aborted.
pub fn spawn(
    registry: Arc<Registry>,
    sharing: Option<Arc<Sharing>>,
    dir: PathBuf,
    debounce: Duration,
) -> Result<JoinHandle<()>, WatchError> {
    let fail = |reason: String| WatchError::Watch {
        path: dir.clone(),
        reason,
    };
    if !dir.is_dir() {
        return Err(fail("not a folder".into()));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = new_debouncer(debounce, move |result: DebounceEventResult| match result {
        Ok(events) => {
            let _ = tx.send(events.into_iter().map(|e| e.path).collect());
        }
        Err(e) => tracing::warn!(error = %e, "plugin folder watch failed"),
    })
    .map_err(|e| fail(e.to_string()))?;
    debouncer
        .watcher()
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(dir = %dir.display(), "watching the plugin folder");
    Ok(tokio::spawn(async move {
        // Dropping the debouncer stops the watch: it lives as long as the task.
        let _debouncer = debouncer;
        while let Some(paths) = rx.recv().await {
            for path in paths {
                let Some(name) = plugin_name(&path) else {
                    continue;
                };
                let in_task = registry.clone();
                let source = format!("watch:{}", path.display());
                let swapped = tokio::task::spawn_blocking(move || {
                    swap_file(&in_task, &name, &path).then_some(name)
                })
                .await;
                match swapped {
                    Ok(Some(name)) => {
                        if let (Some(sharing), Ok(slot)) = (&sharing, registry.get(&name))
                            && let Err(e) = sharing.publish(&**slot, &source).await
                        {
                            tracing::error!(plugin = name, error = %e, "recording the swap for the other processes failed");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "swapping a watched plugin panicked"),
                }
            }
        }
    }))
}

/// `tariff` for `…/tariff.wasm`.
fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    Some(path.file_stem()?.to_str()?.to_owned())
}

/// Whether a new version was swapped in.
fn swap_file(registry: &Registry, name: &str, path: &Path) -> bool {
    let Ok(slot) = registry.get(name) else {
        tracing::warn!(file = %path.display(), "watched folder: no plugin of that name; ignored");
        return false;
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        // Removed or renamed away: nothing to swap in.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) => {
            tracing::warn!(plugin = name, file = %path.display(), step = "read", error = %e, "watched plugin refused");
            return false;
        }
    };
    if sha256_hex(&bytes) == slot.serving().sha256 {
        return false;
    }
    match slot.swap(Some(&bytes), None, format!("watch:{}", path.display())) {
        Ok(v) => {
            tracing::info!(plugin = name, version = v.version, sha256 = %v.sha256, "watched plugin swapped in");
            true
        }
        Err(e) => {
            tracing::warn!(plugin = name, error = %e, "watched plugin refused");
            false
        }
    }
}
