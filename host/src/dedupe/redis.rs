//! Redis dedupe for production: one pipelined round trip of
//! `SET key 1 NX EX ttl` per batch, so several `segs` processes share one
//! notion of "seen".
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

use super::{Dedupe, DedupeError, KeyBatch, ttl_secs};

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
        Ok(RedisDedupe {
            conn,
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

#[async_trait::async_trait]
impl Dedupe for RedisDedupe {
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
}
