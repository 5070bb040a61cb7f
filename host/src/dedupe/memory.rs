//! In-process dedupe for embedded mode: a sharded map from a 128-bit hash of
//! each key to its expiry time.
//!
//! Keys are not stored, only `xxh3_128(key, seed)` with a seed drawn at start
//! (so nobody outside the process can aim for collisions with a fixed hash),
//! which keeps marking free of allocation per key and an entry at 24 bytes.
//! Two different keys collide with probability 2⁻¹²⁸ per pair; with `n` live
//! keys the chance of any collision is about n² / 2¹²⁹ — for ten million
//! live keys about 10⁻²⁵. A collision would make one new key look like a
//! duplicate.
//!
//! Expired entries count as absent at once (lazily overwritten) and are
//! removed by [`MemoryDedupe::sweep`], which the owner runs periodically via
//! [`MemoryDedupe::spawn_sweeper`]. Time comes from a [`Clock`] so that
//! tests can move it.
//!
//! Must not: do I/O, or keep anything past its TTL beyond one sweep period.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_128_with_seed;

use super::{Claim, Dedupe, DedupeError, KeyBatch};

/// Number of shards (a power of two); a batch locks each shard at most once.
const SHARDS: usize = 16;

/// Milliseconds since the Unix epoch, injectable for tests.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // A clock before 1970: treat as the epoch rather than fail.
            Err(_) => 0,
        }
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> ManualClock {
        ManualClock {
            now_ms: AtomicI64::new(start_ms),
        }
    }

    pub fn set(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(duration_ms(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// Hashes a `u128` key that is already a good hash: its low 64 bits.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u128 keys; fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = i as u64;
    }
}

type Map<V> = HashMap<u128, V, BuildHasherDefault<PassThrough>>;

/// One shard: confirmed keys with their expiry, and keys held by a claim
/// (few: only those of requests being published).
#[derive(Default)]
struct Shard {
    seen: Map<i64>,
    held: Map<Hold>,
}

/// A key held by a claim until `until`, first claimed at `since`,
/// remembered until `expires`.
#[derive(Clone, Copy)]
struct Hold {
    until: i64,
    since: i64,
    expires: i64,
    token: u64,
}

impl Shard {
    fn len(&self) -> usize {
        self.seen.len() + self.held.len()
    }
}

/// In-process [`Dedupe`].
pub struct MemoryDedupe {
    shards: Box<[Mutex<Shard>]>,
    seed: u64,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryDedupe {
    fn default() -> Self {
        MemoryDedupe::new()
    }
}

impl MemoryDedupe {
    /// On the wall clock.
    pub fn new() -> MemoryDedupe {
        MemoryDedupe::with_clock(Arc::new(SystemClock))
    }

    /// On `clock` (tests pass a [`ManualClock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> MemoryDedupe {
        // A per-process random seed, from the std's randomly keyed hasher.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5e65_u64);
        MemoryDedupe {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            seed,
            clock,
        }
    }

    /// The time this dedupe's clock says it is.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Removes entries expired at `now_ms`; returns how many. Locks one shard
    /// at a time.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            let before = map.len();
            map.seen.retain(|_, expiry| *expiry > now_ms);
            map.held.retain(|_, hold| hold.expires > now_ms);
            removed += before - map.len();
        }
        removed
    }

    /// Sweeps every `every` on the Tokio runtime until this dedupe is
    /// dropped (the task holds only a weak reference).
    pub fn spawn_sweeper(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(d) = weak.upgrade() else { break };
                let removed = d.sweep(d.now_ms());
                if removed > 0 {
                    tracing::debug!(removed, "dedupe sweep");
                }
            }
        })
    }

    fn hash(&self, key: &str) -> u128 {
        xxh3_128_with_seed(key.as_bytes(), self.seed)
    }

    fn shard_of(h: u128) -> usize {
        // The top bits pick the shard; the map uses the low 64.
        (h >> 124) as usize & (SHARDS - 1)
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl MemoryDedupe {
    /// Calls `f(index, shard)` for every key, locking each shard once, keys
    /// in order within a shard (equal keys share a shard, so a repeat within
    /// the batch sees the first one's effect).
    fn each_key(&self, keys: &KeyBatch, f: impl FnMut(usize, u128, &mut Shard)) {
        let hashes: Vec<(usize, u128)> = keys.iter().map(|k| self.hash(k)).enumerate().collect();
        self.each_hash(&hashes, f);
    }

    /// As [`MemoryDedupe::each_key`], for `keys[i]` with `i` in `which`.
    fn each_of(&self, keys: &KeyBatch, which: &[usize], f: impl FnMut(usize, u128, &mut Shard)) {
        let hashes: Vec<(usize, u128)> = which
            .iter()
            .filter(|&&i| i < keys.len())
            .map(|&i| (i, self.hash(keys.get(i))))
            .collect();
        self.each_hash(&hashes, f);
    }

    fn each_hash(&self, hashes: &[(usize, u128)], mut f: impl FnMut(usize, u128, &mut Shard)) {
        for (s, shard) in self.shards.iter().enumerate() {
            let mut map = None;
            for &(i, h) in hashes {
                if Self::shard_of(h) != s {
                    continue;
                }
                let map = map.get_or_insert_with(|| shard.lock());
                f(i, h, map);
            }
        }
    }
}

#[async_trait::async_trait]
impl Dedupe for MemoryDedupe {
    async fn claim(
        &self,
        keys: &KeyBatch,
        ttl: Duration,
        hold: Duration,
        token: u64,
    ) -> Result<Vec<Claim>, DedupeError> {
        let now = self.clock.now_ms();
        let until = now.saturating_add(duration_ms(hold));
        let expires = now.saturating_add(duration_ms(ttl));
        let mut out = vec![Claim::Duplicate; keys.len()];
        self.each_key(keys, |i, h, shard| {
            if shard.seen.get(&h).is_some_and(|&e| e > now) {
                out[i] = Claim::Duplicate;
                return;
            }
            out[i] = match shard.held.entry(h) {
                Entry::Occupied(mut e) => {
                    let held = e.get_mut();
                    if held.expires <= now {
                        *held = Hold {
                            until,
                            since: now,
                            expires,
                            token,
                        };
                        Claim::New
                    } else if held.token == token {
                        Claim::Duplicate
                    } else if held.until > now {
                        Claim::InFlight
                    } else {
                        held.until = until;
                        held.token = token;
                        Claim::Orphaned {
                            since_ms: held.since,
                        }
                    }
                }
                Entry::Vacant(e) => {
                    e.insert(Hold {
                        until,
                        since: now,
                        expires,
                        token,
                    });
                    Claim::New
                }
            };
        });
        Ok(out)
    }

    async fn confirm(
        &self,
        keys: &KeyBatch,
        which: &[usize],
        ttl: Duration,
    ) -> Result<(), DedupeError> {
        let expiry = self.clock.now_ms().saturating_add(duration_ms(ttl));
        self.each_of(keys, which, |_, h, shard| {
            shard.held.remove(&h);
            shard.seen.insert(h, expiry);
        });
        Ok(())
    }

    async fn release(
        &self,
        keys: &KeyBatch,
        which: &[usize],
        token: u64,
    ) -> Result<(), DedupeError> {
        self.each_of(keys, which, |_, h, shard| {
            if shard.held.get(&h).is_some_and(|held| held.token == token) {
                shard.held.remove(&h);
            }
        });
        Ok(())
    }

    async fn check_and_mark(
        &self,
        keys: &KeyBatch,
        ttl: Duration,
    ) -> Result<Vec<bool>, DedupeError> {
        let now = self.clock.now_ms();
        let expiry = now.saturating_add(duration_ms(ttl));
        let mut fresh = vec![false; keys.len()];
        self.each_key(keys, |i, h, shard| {
            if shard.held.get(&h).is_some_and(|held| held.expires > now) {
                return;
            }
            fresh[i] = match shard.seen.entry(h) {
                Entry::Occupied(e) if *e.get() > now => false,
                Entry::Occupied(mut e) => {
                    *e.get_mut() = expiry;
                    true
                }
                Entry::Vacant(e) => {
                    e.insert(expiry);
                    true
                }
            };
        });
        Ok(fresh)
    }

    async fn unmark(&self, keys: &KeyBatch, which: &[usize]) -> Result<(), DedupeError> {
        for &i in which {
            if i >= keys.len() {
                continue;
            }
            let h = self.hash(keys.get(i));
            let mut shard = self.shards[Self::shard_of(h)].lock();
            shard.seen.remove(&h);
            shard.held.remove(&h);
        }
        Ok(())
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.shards.iter().map(|s| s.lock().len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(keys: &[&str]) -> KeyBatch {
        let mut b = KeyBatch::default();
        for k in keys {
            b.push(k);
        }
        b
    }

    #[tokio::test]
    async fn sweep_removes_only_expired() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let d = MemoryDedupe::with_clock(clock.clone());
        let ttl = Duration::from_secs(60);
        d.check_and_mark(&batch(&["a", "b"]), ttl)
            .await
            .expect("mark");
        clock.advance(Duration::from_secs(30));
        d.check_and_mark(&batch(&["c"]), ttl).await.expect("mark");
        clock.advance(Duration::from_secs(31));
        assert_eq!(d.len_hint(), Some(3));
        assert_eq!(d.sweep(d.now_ms()), 2);
        assert_eq!(d.len_hint(), Some(1));
        let again = d
            .check_and_mark(&batch(&["a", "c"]), ttl)
            .await
            .expect("mark");
        assert_eq!(again, [true, false]);
    }

    #[tokio::test]
    async fn many_keys_spread_over_shards() {
        let d = MemoryDedupe::new();
        let mut b = KeyBatch::default();
        for i in 0..1000 {
            b.push_with(|s| {
                use std::fmt::Write as _;
                let _ = write!(s, "reading:MTR-{i:08}:2024-01-01T00:00:00.000Z");
            });
        }
        let first = d
            .check_and_mark(&b, Duration::from_secs(60))
            .await
            .expect("mark");
        assert!(first.iter().all(|&f| f));
        let used = d.shards.iter().filter(|s| s.lock().len() > 0).count();
        assert_eq!(used, SHARDS);
        let second = d
            .check_and_mark(&b, Duration::from_secs(60))
            .await
            .expect("mark");
        assert!(second.iter().all(|&f| !f));
    }

    #[tokio::test]
    async fn sweeper_runs_and_stops_with_the_dedupe() {
        let clock = Arc::new(ManualClock::new(0));
        let d = Arc::new(MemoryDedupe::with_clock(clock.clone()));
        d.check_and_mark(&batch(&["k"]), Duration::from_secs(1))
            .await
            .expect("mark");
        let task = d.clone().spawn_sweeper(Duration::from_millis(5));
        clock.advance(Duration::from_secs(2));
        tokio::time::timeout(Duration::from_secs(30), async {
            while d.len_hint() != Some(0) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the sweeper removes the expired key");
        drop(d);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("sweeper ends once the dedupe is gone")
            .expect("sweeper task");
    }
}
