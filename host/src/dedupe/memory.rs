//! In-process dedupe for embedded mode: a sharded table of each key's hash
//! and expiry time.
//!
//! Keys are not stored, only 100 bits of `xxh3_128(key, seed)` with a seed
//! drawn at start (so nobody outside the process can aim for collisions with
//! a fixed hash): 4 bits pick the shard, 96 are kept. That keeps marking
//! free of allocation per key and a confirmed key at 16 bytes ([`Seen`]):
//! every reading of the dedupe TTL is in the table (about 17 million at
//! 280,000 readings/s for 60 s), and its size is what the table costs, in
//! memory, in cache misses, and in the pages a growing table touches
//! afresh. Two different keys collide with probability 2⁻¹⁰⁰ per pair; a
//! new key meets one of `n` live keys with probability n / 2¹⁰⁰ — for
//! twenty million live keys about 2·10⁻²³ a reading, so about one false
//! duplicate in 10⁸ years at a million readings a second.
//!
//! Expired entries count as absent at once (lazily overwritten) and are
//! removed by [`MemoryDedupe::sweep`], which the owner runs periodically via
//! [`MemoryDedupe::spawn_sweeper`]. A confirmed key's expiry is kept in
//! wrapping milliseconds ([`Tick`]), right while it is less than 24 days
//! from the clock: TTLs are capped at [`MAX_TTL`] and the sweep removes an
//! entry within a sweep period of its expiry. Time comes from a [`Clock`]
//! so that tests can move it.
//!
//! Must not: do I/O, or keep anything past its TTL beyond one sweep period.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as SeenEntry;

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

/// The longest TTL a key is kept for; longer ones are cut to it. [`Tick`]
/// compares right within 24 days.
pub const MAX_TTL: Duration = Duration::from_secs(20 * 24 * 3600);

/// Milliseconds since the epoch, wrapping every 49.7 days (`ms as u32`).
/// Two ticks less than 2³¹ ms (24.8 days) apart compare right.
type Tick = u32;

fn tick(ms: i64) -> Tick {
    ms as u32
}

/// Whether `expires` is still ahead of `now`.
#[inline]
fn live(expires: Tick, now: Tick) -> bool {
    (expires.wrapping_sub(now) as i32) > 0
}

/// A confirmed key: bits 0..96 of its hash (the top four picked the shard;
/// the low 64 are its hash in the table) and when it expires.
#[derive(Clone, Copy)]
struct Seen {
    low: u64,
    high: u32,
    expires: Tick,
}

/// The confirmed keys of a shard.
#[derive(Default)]
struct SeenTable(HashTable<Seen>);

impl SeenTable {
    fn parts(h: u128) -> (u64, u32) {
        (h as u64, (h >> 64) as u32)
    }

    /// Whether `h` is here and not expired at `now`.
    #[inline]
    fn is_live(&self, h: u128, now: Tick) -> bool {
        let (low, high) = Self::parts(h);
        self.0
            .find(low, |e| e.low == low && e.high == high)
            .is_some_and(|e| live(e.expires, now))
    }

    /// Marks `h` as seen until `expires` unless it is already live at `now`;
    /// whether it was not (the key is new).
    #[inline]
    fn mark(&mut self, h: u128, expires: Tick, now: Tick) -> bool {
        let (low, high) = Self::parts(h);
        match self
            .0
            .entry(low, |e| e.low == low && e.high == high, |e| e.low)
        {
            SeenEntry::Occupied(mut e) => {
                if live(e.get().expires, now) {
                    return false;
                }
                e.get_mut().expires = expires;
                true
            }
            SeenEntry::Vacant(e) => {
                e.insert(Seen { low, high, expires });
                true
            }
        }
    }

    /// Marks `h` as seen until `expires`, whatever it was.
    #[inline]
    fn set(&mut self, h: u128, expires: Tick) {
        let (low, high) = Self::parts(h);
        match self
            .0
            .entry(low, |e| e.low == low && e.high == high, |e| e.low)
        {
            SeenEntry::Occupied(mut e) => e.get_mut().expires = expires,
            SeenEntry::Vacant(e) => {
                e.insert(Seen { low, high, expires });
            }
        }
    }

    fn remove(&mut self, h: u128) {
        let (low, high) = Self::parts(h);
        if let Ok(e) = self.0.find_entry(low, |e| e.low == low && e.high == high) {
            e.remove();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// One shard: confirmed keys with their expiry, and keys held by a claim
/// (few: only those of requests being published).
#[derive(Default)]
struct Shard {
    seen: SeenTable,
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
            let now = tick(now_ms);
            map.seen.0.retain(|e| live(e.expires, now));
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

/// `ttl` from now, at most [`MAX_TTL`].
fn expiry_ms(now_ms: i64, ttl: Duration) -> i64 {
    now_ms.saturating_add(duration_ms(ttl.min(MAX_TTL)))
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
        let expires = expiry_ms(now, ttl);
        let mut out = vec![Claim::Duplicate; keys.len()];
        self.each_key(keys, |i, h, shard| {
            if shard.seen.is_live(h, tick(now)) {
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
        let expires = tick(expiry_ms(self.clock.now_ms(), ttl));
        self.each_of(keys, which, |_, h, shard| {
            shard.held.remove(&h);
            shard.seen.set(h, expires);
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
        let expires = tick(expiry_ms(now, ttl));
        let mut fresh = vec![false; keys.len()];
        self.each_key(keys, |i, h, shard| {
            if shard.held.get(&h).is_some_and(|held| held.expires > now) {
                return;
            }
            fresh[i] = shard.seen.mark(h, expires, tick(now));
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
            shard.seen.remove(h);
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
    async fn expiry_is_right_across_the_wrap_of_its_ticks() {
        // 300 ms before the millisecond count passes a multiple of 2^32.
        let clock = Arc::new(ManualClock::new((5 << 32) - 300));
        let d = MemoryDedupe::with_clock(clock.clone());
        let ttl = Duration::from_secs(1);
        assert_eq!(d.check_and_mark(&batch(&["w"]), ttl).await.unwrap(), [true]);
        clock.advance(Duration::from_millis(900));
        assert_eq!(
            d.check_and_mark(&batch(&["w"]), ttl).await.unwrap(),
            [false]
        );
        assert_eq!(d.sweep(d.now_ms()), 0);
        clock.advance(Duration::from_millis(100));
        assert_eq!(d.sweep(d.now_ms()), 1);
        assert_eq!(d.check_and_mark(&batch(&["w"]), ttl).await.unwrap(), [true]);
    }

    #[tokio::test]
    async fn a_ttl_past_the_cap_is_cut_to_it() {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let d = MemoryDedupe::with_clock(clock.clone());
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(
            d.check_and_mark(&batch(&["y"]), year).await.unwrap(),
            [true]
        );
        clock.advance(MAX_TTL - Duration::from_secs(1));
        assert_eq!(
            d.check_and_mark(&batch(&["y"]), year).await.unwrap(),
            [false]
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            d.check_and_mark(&batch(&["y"]), year).await.unwrap(),
            [true]
        );
    }

    #[test]
    fn keys_differing_only_past_the_low_64_bits_are_two_keys() {
        let mut seen = SeenTable::default();
        let a: u128 = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        let b = a ^ (1 << 70);
        assert!(seen.mark(a, 10, 0));
        assert!(seen.mark(b, 10, 0));
        assert!(!seen.mark(a, 10, 0));
        assert!(!seen.mark(b, 10, 0));
        seen.remove(a);
        assert!(!seen.is_live(a, 0));
        assert!(seen.is_live(b, 0));
        assert_eq!(seen.len(), 1);
        assert_eq!(std::mem::size_of::<Seen>(), 16);
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
