//! Dedupe: "have we seen this key within its TTL?", with Redis's
//! `SET key 1 NX EX ttl` semantics, in-process ([`memory::MemoryDedupe`]) or
//! in Redis ([`redis::RedisDedupe`]).
//!
//! Owns: marking keys as seen for a TTL, answering first-seen / duplicate in
//! batch, and forgetting keys again.
//!
//! Must not: build keys (callers do, e.g. `reading:{meterId}:{timestamp}`),
//! parse readings, or decide what a duplicate means for the request.

pub mod memory;
pub mod redis;

use std::time::Duration;

pub use self::redis::RedisDedupe;
pub use memory::{Clock, MAX_TTL, ManualClock, MemoryDedupe, SystemClock};

/// Keys packed in one buffer: no allocation per key.
///
/// ```
/// # use segs::dedupe::KeyBatch;
/// let mut keys = KeyBatch::default();
/// keys.push_with(|s| s.push_str("reading:MTR-00000001:2024-01-01T00:00:00.000Z"));
/// keys.push("reading:MTR-00000002:2024-01-01T00:00:00.000Z");
/// assert_eq!(keys.len(), 2);
/// assert_eq!(keys.get(1), "reading:MTR-00000002:2024-01-01T00:00:00.000Z");
/// ```
#[derive(Default, Clone, Debug)]
pub struct KeyBatch {
    buf: String,
    /// End (exclusive, in bytes) of each key in `buf`.
    ends: Vec<usize>,
}

impl KeyBatch {
    /// Room for `keys` keys of about `bytes_per_key` bytes each.
    pub fn with_capacity(keys: usize, bytes_per_key: usize) -> KeyBatch {
        KeyBatch {
            buf: String::with_capacity(keys * bytes_per_key),
            ends: Vec::with_capacity(keys),
        }
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }

    /// Appends one key: `f` writes it to the end of the buffer (it must only
    /// append, e.g. with `push_str` or `write!`).
    pub fn push_with(&mut self, f: impl FnOnce(&mut String)) {
        let start = self.buf.len();
        f(&mut self.buf);
        debug_assert!(self.buf.len() >= start, "push_with must only append");
        self.ends.push(self.buf.len());
    }

    /// Appends `key`.
    pub fn push(&mut self, key: &str) {
        self.push_with(|s| s.push_str(key));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th key. Panics if `i >= len()`, like slice indexing.
    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }

    /// The keys in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.ends.len()).map(move |i| self.get(i))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    /// The Redis URL does not parse.
    #[error("invalid Redis URL {url:?}: {source}")]
    InvalidUrl {
        url: String,
        source: ::redis::RedisError,
    },
    /// No connection to Redis could be made.
    #[error("cannot reach Redis at {url}: {source}")]
    Unreachable {
        url: String,
        source: ::redis::RedisError,
    },
    /// A command failed (connection lost, timeout, server error).
    #[error("Redis at {url}: {source}")]
    Redis {
        url: String,
        source: ::redis::RedisError,
    },
    /// Redis answered something `SET … NX` never answers.
    #[error("Redis at {url}: unexpected reply to {command}: {reply}")]
    UnexpectedReply {
        url: String,
        command: &'static str,
        reply: String,
    },
}

/// What [`Dedupe::claim`] found for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not seen: now *held* by the caller (until its hold runs out), who
    /// publishes it and then [`Dedupe::confirm`]s or [`Dedupe::release`]s it.
    New,
    /// Seen and confirmed within its TTL, or repeated within the same call.
    Duplicate,
    /// Held by another caller whose hold has not run out: it may still be
    /// publishing the key. Nobody can tell yet whether it is a duplicate.
    InFlight,
    /// Held by a caller whose hold ran out without a confirm or release
    /// (its process died, or it was cut off): now held by this caller. The
    /// earlier attempt may or may not have published the key, at or after
    /// `since_ms` (the bus's record time): the caller looks there.
    Orphaned { since_ms: i64 },
}

/// "Have we seen this key within its TTL?"
///
/// Ingest marks in two phases so that a mark never outlives a publish that
/// did not happen: [`Dedupe::claim`] holds the new keys for a bounded time,
/// the caller publishes them, then [`Dedupe::confirm`]s them (seen for the
/// TTL) or, if the publish failed, [`Dedupe::release`]s them. A key whose
/// holder died is found [`Claim::Orphaned`] by the next claim once the hold
/// runs out.
#[async_trait::async_trait]
pub trait Dedupe: Send + Sync {
    /// For each key in order, what it is (see [`Claim`]); new and orphaned
    /// keys are now held by `token` for `hold`, and remembered for `ttl`.
    /// A key repeated within one call is a duplicate the second time.
    async fn claim(
        &self,
        keys: &KeyBatch,
        ttl: Duration,
        hold: Duration,
        token: u64,
    ) -> Result<Vec<Claim>, DedupeError>;

    /// Marks `keys[i]` for each `i` in `which` as seen for `ttl` (they are
    /// published). Indices out of range are ignored.
    async fn confirm(
        &self,
        keys: &KeyBatch,
        which: &[usize],
        ttl: Duration,
    ) -> Result<(), DedupeError>;

    /// Forgets `keys[i]` for each `i` in `which` if `token` still holds it
    /// (its publish failed: a retry must count them). A key another caller
    /// has taken over, or confirmed, is left alone.
    async fn release(
        &self,
        keys: &KeyBatch,
        which: &[usize],
        token: u64,
    ) -> Result<(), DedupeError>;

    /// For each key in order: true if it was not present (and is now marked
    /// for `ttl`), false if present (a duplicate). A key repeated within one
    /// call is a duplicate the second time. (Redis: `SET key 1 NX EX ttl`.)
    async fn check_and_mark(
        &self,
        keys: &KeyBatch,
        ttl: Duration,
    ) -> Result<Vec<bool>, DedupeError>;

    /// Forgets `keys[i]` for each `i` in `which` (used when publishing after
    /// marking failed, so a retried request is not wrongly counted as
    /// duplicates). Pass only keys this caller marked (`true` answers):
    /// forgetting a duplicate would forget the original's mark. Indices out
    /// of range are ignored. (Redis: `DEL`.)
    async fn unmark(&self, keys: &KeyBatch, which: &[usize]) -> Result<(), DedupeError>;

    /// Number of live keys (memory; may include expired keys not yet swept)
    /// or `None` (Redis), for status.
    fn len_hint(&self) -> Option<usize>;

    /// A round trip to the dedupe store (readiness); in-process: nothing
    /// to reach.
    async fn ping(&self) -> Result<(), DedupeError> {
        Ok(())
    }
}

/// Whole seconds for `EX`, rounded up, at least 1 (Redis refuses `EX 0`).
pub(crate) fn ttl_secs(ttl: Duration) -> u64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_batch_packs_keys() {
        let mut k = KeyBatch::default();
        assert!(k.is_empty());
        k.push("a");
        k.push("");
        k.push_with(|s| {
            use std::fmt::Write as _;
            let (meter, ts) = ("MTR-1", 42);
            let _ = write!(s, "reading:{meter}:{ts}");
        });
        assert_eq!(k.len(), 3);
        assert_eq!(k.iter().collect::<Vec<_>>(), ["a", "", "reading:MTR-1:42"]);
        assert_eq!(k.iter().len(), 3);
        k.clear();
        assert!(k.is_empty());
        k.push("b");
        assert_eq!(k.get(0), "b");
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_secs(60)), 60);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }
}
