//! What the rule stages of several `segs` processes share in Redis, beside
//! ingest's reading marks (`dedupe.kind = "redis"` turns it on): the alert
//! dedupe marks `alert:dedupe:{subject}:{type}:{bucket}` (the seed's key,
//! with its TTL, `alerts.dedupe_ttl_s`) and the tariff cache
//! `tariff:{region}:current` (a hash: `tariff_id`, `region`,
//! `price_per_kwh`, `effective_from`, `effective_from_ms`, no expiry).
//!
//! The store stays the authority: an alert is kept once by the store's
//! unique dedupe key and a price by the `tariffs` table, so neither can be
//! lost or doubled by a Redis hiccup. Redis is the shared fast answer that
//! the seed's services (and any client) read:
//! - An alert is offered with its id ([`SharedRuleState::claim_alerts`]):
//!   the first id to claim a key owns it for the TTL; the same id claiming
//!   again (a replay of the same alert) is still the owner, so a crash
//!   between the claim and the store loses nothing; another id is a
//!   duplicate and is not stored.
//! - A price is written after the store has it, and only over an older one
//!   (by `effective_from_ms`), so a process that lost a region cannot put
//!   back a stale price; at start and on every reassignment the stage
//!   writes the store's current prices again, so a crash between the store
//!   and Redis heals itself.
//!
//! Must not: decide which alert or price is right (the stages and the store
//! do); hide Redis being unreachable (callers retry and show it in health).

use redis::aio::ConnectionManager;

use crate::dedupe::DedupeError;
use crate::store::TariffRow;

/// Claims each alert key for its id: `1` when ARGV's id owns it (new, or
/// already its own), `0` when another id does. ARGV[1]: TTL ms; ARGV[i+1]:
/// the id of KEYS[i].
const CLAIM_ALERTS: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local id = ARGV[i + 1]
  if redis.call('SET', k, id, 'NX', 'PX', ARGV[1]) then
    out[i] = 1
  elseif redis.call('GET', k) == id then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// Sets each `tariff:{region}:current` hash unless it holds a later
/// `effective_from_ms`. ARGV per key, five at a time: tariff id, region,
/// price, effective from (RFC 3339), effective from (ms). Returns how many
/// were written.
const SET_TARIFFS: &str = r"
local n = 0
for i, k in ipairs(KEYS) do
  local a = (i - 1) * 5
  local current = redis.call('HGET', k, 'effective_from_ms')
  if not current or tonumber(current) <= tonumber(ARGV[a + 5]) then
    redis.call('HSET', k, 'tariff_id', ARGV[a + 1], 'region', ARGV[a + 2],
      'price_per_kwh', ARGV[a + 3], 'effective_from', ARGV[a + 4],
      'effective_from_ms', ARGV[a + 5])
    n = n + 1
  end
end
return n
";

/// The rule stages' shared state in Redis.
#[derive(Clone)]
pub struct SharedRuleState {
    conn: ConnectionManager,
    url: String,
}

impl std::fmt::Debug for SharedRuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRuleState")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The cache key of a region's current tariff, as in the seed.
pub fn tariff_key(region: &str) -> String {
    format!("tariff:{region}:current")
}

impl SharedRuleState {
    /// Connects to `url` and checks the connection (the error names it).
    pub async fn connect(url: &str) -> Result<SharedRuleState, DedupeError> {
        Ok(SharedRuleState {
            conn: crate::dedupe::redis::connect(url).await?,
            url: url.to_owned(),
        })
    }

    fn error(&self, source: redis::RedisError) -> DedupeError {
        DedupeError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// For each `(dedupe key, alert id)`: whether that id owns the key
    /// (first to claim it within `ttl_ms`, or claiming it again). One round
    /// trip for the whole list.
    pub async fn claim_alerts(
        &self,
        alerts: &[(&str, uuid::Uuid)],
        ttl_ms: u64,
    ) -> Result<Vec<bool>, DedupeError> {
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let script = redis::Script::new(CLAIM_ALERTS);
        let mut call = script.prepare_invoke();
        call.arg(ttl_ms.max(1));
        for (key, id) in alerts {
            call.key(*key).arg(id.to_string());
        }
        let mut conn = self.conn.clone();
        let owned: Vec<i64> = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        if owned.len() != alerts.len() {
            return Err(DedupeError::UnexpectedReply {
                url: self.url.clone(),
                command: "alert claim script",
                reply: format!("{} replies for {} alerts", owned.len(), alerts.len()),
            });
        }
        Ok(owned.into_iter().map(|o| o == 1).collect())
    }

    /// Writes each tariff as its region's current one, unless Redis holds
    /// a later one. Returns how many were written.
    pub async fn set_current_tariffs(&self, tariffs: &[TariffRow]) -> Result<u64, DedupeError> {
        if tariffs.is_empty() {
            return Ok(0);
        }
        let script = redis::Script::new(SET_TARIFFS);
        let mut call = script.prepare_invoke();
        for t in tariffs {
            call.key(tariff_key(&t.region))
                .arg(&t.tariff_id)
                .arg(&t.region)
                .arg(t.price_per_kwh)
                .arg(crate::time::format_rfc3339_ms(t.effective_from_ms))
                .arg(t.effective_from_ms);
        }
        let mut conn = self.conn.clone();
        call.invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(e))
    }
}
