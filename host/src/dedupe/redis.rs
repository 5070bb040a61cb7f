//! Redis dedupe for production: one round trip per batch, so several
//! `segs` processes share one notion of "seen".
//!
//! Two-phase marks ([`Dedupe::claim`]): a new key is first *held* —
//! `p:{hold until}:{first claimed}:{token}`, with the reading TTL — and
//! becomes `1` once its readings are published (`confirm`), or is deleted
//! if the publish failed (`release`). A claim is one Lua script over the
//! whole batch (atomic, with Redis's own clock, so every process agrees on
//! when a hold has run out); a hold that ran out is taken over and reported
//! [`Claim::Orphaned`] with the time its first holder claimed it.
//!
//! Keys go to Redis exactly as the caller built them (e.g.
//! `reading:{meterId}:{timestamp}`), so the key space is the seed's.
//! The connection is a `redis::aio::ConnectionManager`: multiplexed, cheap
//! to clone, and reconnecting after a connection loss.
//!
//! Must not: add prefixes, build keys, or hide Redis being unreachable
//! (every error names the URL).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Value};

use super::{Claim, Dedupe, DedupeError, KeyBatch, ttl_secs};

/// Claims each key: 0 new, 1 duplicate (confirmed, or this token's own
/// hold: a repeat within the batch), 2 held by a live claim, otherwise the
/// first-claimed time (ms) of a hold that ran out and is now this token's.
/// ARGV: hold ms, TTL s, token.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if not v then
    redis.call('SET', k, 'p:' .. (now + hold) .. ':' .. now .. ':' .. ARGV[3], 'EX', ARGV[2])
    out[i] = 0
  elseif string.sub(v, 1, 2) ~= 'p:' then
    out[i] = 1
  else
    local till, since, token = string.match(v, '^p:(%d+):(%d+):(.*)$')
    if token == ARGV[3] then
      out[i] = 1
    elseif till and tonumber(till) > now then
      out[i] = 2
    else
      since = since or tostring(now)
      redis.call('SET', k, 'p:' .. (now + hold) .. ':' .. since .. ':' .. ARGV[3], 'KEEPTTL')
      out[i] = tonumber(since)
    end
  end
end
return out
";

/// Deletes each key still held by ARGV[1].
const RELEASE: &str = r"
local n = 0
for _, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v and string.sub(v, 1, 2) == 'p:' and string.match(v, ':([^:]*)$') == ARGV[1] then
    redis.call('DEL', k)
    n = n + 1
  end
end
return n
";

/// Time allowed for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a reply; ingest fails (and can answer 503) rather than
/// hang when Redis stalls.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts retried before giving up, on start and on reconnect.
const RETRIES: usize = 2;

/// [`Dedupe`] in Redis.
#[derive(Clone)]
pub struct RedisDedupe {
    conn: ConnectionManager,
    url: String,
}

impl std::fmt::Debug for RedisDedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDedupe")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl RedisDedupe {
    /// Connects to `url` (`redis://host:port[/db]`) and checks the
    /// connection; fails with [`DedupeError::Unreachable`] naming the URL
    /// when Redis does not answer.
    pub async fn connect(url: &str) -> Result<RedisDedupe, DedupeError> {
        Ok(RedisDedupe {
            conn: connect(url).await?,
            url: url.to_owned(),
        })
    }

    /// The URL this dedupe talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn error(&self, source: redis::RedisError) -> DedupeError {
        DedupeError::Redis {
            url: self.url.clone(),
            source,
        }
    }
}

/// A reconnecting connection to `url` (`redis://host:port[/db]`), checked
/// with a PING; fails with [`DedupeError::Unreachable`] naming the URL when
/// Redis does not answer. Shared with the rule stages' Redis state
/// ([`crate::shared`]).
pub(crate) async fn connect(url: &str) -> Result<ConnectionManager, DedupeError> {
    let client = Client::open(url).map_err(|source| DedupeError::InvalidUrl {
        url: url.to_owned(),
        source,
    })?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RETRIES);
    let unreachable = |source| DedupeError::Unreachable {
        url: url.to_owned(),
        source,
    };
    let mut conn = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(unreachable)?;
    redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .map_err(unreachable)?;
    Ok(conn)
}

#[async_trait::async_trait]
impl Dedupe for RedisDedupe {
    async fn claim(
        &self,
        keys: &KeyBatch,
        ttl: Duration,
        hold: Duration,
        token: u64,
    ) -> Result<Vec<Claim>, DedupeError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let script = redis::Script::new(CLAIM);
        let mut call = script.prepare_invoke();
        for key in keys.iter() {
            call.key(key);
        }
        call.arg(hold.as_millis() as u64)
            .arg(ttl_secs(ttl))
            .arg(token.to_string());
        let mut conn = self.conn.clone();
        let replies: Vec<i64> = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        if replies.len() != keys.len() {
            return Err(DedupeError::UnexpectedReply {
                url: self.url.clone(),
                command: "claim script",
                reply: format!("{} replies for {} keys", replies.len(), keys.len()),
            });
        }
        Ok(replies
            .into_iter()
            .map(|r| match r {
                0 => Claim::New,
                1 => Claim::Duplicate,
                2 => Claim::InFlight,
                since_ms => Claim::Orphaned { since_ms },
            })
            .collect())
    }

    async fn confirm(
        &self,
        keys: &KeyBatch,
        which: &[usize],
        ttl: Duration,
    ) -> Result<(), DedupeError> {
        let secs = ttl_secs(ttl);
        let mut pipe = redis::pipe();
        let mut any = false;
        for &i in which {
            if i < keys.len() {
                pipe.cmd("SET")
                    .arg(keys.get(i))
                    .arg(1)
                    .arg("EX")
                    .arg(secs)
                    .ignore();
                any = true;
            }
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(e))
    }

    async fn release(
        &self,
        keys: &KeyBatch,
        which: &[usize],
        token: u64,
    ) -> Result<(), DedupeError> {
        let script = redis::Script::new(RELEASE);
        let mut call = script.prepare_invoke();
        let mut any = false;
        for &i in which {
            if i < keys.len() {
                call.key(keys.get(i));
                any = true;
            }
        }
        if !any {
            return Ok(());
        }
        call.arg(token.to_string());
        let mut conn = self.conn.clone();
        call.invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    async fn check_and_mark(
        &self,
        keys: &KeyBatch,
        ttl: Duration,
    ) -> Result<Vec<bool>, DedupeError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let secs = ttl_secs(ttl);
        let mut pipe = redis::pipe();
        for key in keys.iter() {
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(secs);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        if replies.len() != keys.len() {
            return Err(DedupeError::UnexpectedReply {
                url: self.url.clone(),
                command: "SET NX EX",
                reply: format!("{} replies for {} keys", replies.len(), keys.len()),
            });
        }
        replies
            .into_iter()
            .map(|r| match r {
                Value::Okay => Ok(true),
                Value::SimpleString(s) if s == "OK" => Ok(true),
                Value::Nil => Ok(false),
                other => Err(DedupeError::UnexpectedReply {
                    url: self.url.clone(),
                    command: "SET NX EX",
                    reply: format!("{other:?}"),
                }),
            })
            .collect()
    }

    async fn unmark(&self, keys: &KeyBatch, which: &[usize]) -> Result<(), DedupeError> {
        let mut del = redis::cmd("DEL");
        let mut any = false;
        for &i in which {
            if i < keys.len() {
                del.arg(keys.get(i));
                any = true;
            }
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        del.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(e))
    }

    fn len_hint(&self) -> Option<usize> {
        None
    }

    async fn ping(&self) -> Result<(), DedupeError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(e))
    }
}
