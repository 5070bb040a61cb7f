//! Crash points: named places where segs can be made to die on purpose, for
//! the crash tests (`host/tests/crash.rs`). With `SEGS_CRASH_AT=<name>` (or
//! `<name>#<n>`, the n-th time that point is reached) in the environment, the
//! process sends itself SIGKILL there: no destructor runs, nothing is
//! flushed, exactly as when an operator's host pulls the plug.
//!
//! Without the variable a crash point is one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("SEGS_CRASH_AT").ok()?;
            let (name, nth) = match spec.split_once('#') {
                Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Dies here if `SEGS_CRASH_AT` names this point (see the module docs).
pub fn point(name: &str) {
    let Some(a) = armed() else {
        return;
    };
    if a.name != name || a.hits.fetch_add(1, Ordering::Relaxed) + 1 != a.nth {
        return;
    }
    eprintln!("segs: crash point {name} (hit {}): SIGKILL", a.nth);
    // SAFETY: getpid and kill have no preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this is never reached.
    std::process::abort();
}
