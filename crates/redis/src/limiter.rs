//! A distributed GCRA rate limit, evaluated atomically in Redis.
//!
//! The script below is the same GCRA governor runs in-process: a quota of
//! `burst` cells replenished one per `interval`, state one "theoretical
//! arrival time" (TAT) per key. It runs inside Redis, so every replica
//! shares one TAT per key, and it reads **Redis' clock** (`TIME`), so the
//! replicas' clocks never matter. A refusal carries the time until the next
//! cell, like the local limiter's `RateLimited { retry_after }`.
//!
//! When Redis cannot answer within `op_timeout`, the [`Fallback`] decides:
//! admit (fail open, the default), refuse (fail closed), or decide with a
//! local limiter of the same quota (each replica then admits up to the whole
//! quota by itself until Redis is back).

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use toolwarden_core::{Bounds, ConfigError, Event, KeyRef, KeyedState, RateLimited};

use crate::config::RedisConfig;
use crate::conn::{Conn, Unavailable};

/// GCRA in one atomic step. KEYS[1]: the key. ARGV[1]: the emission interval
/// in microseconds. ARGV[2]: the burst. Returns {allowed (0|1), retry_after_us}.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - interval * burst
if allow_at > now then
  return {0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"#;

/// What the limiter does when Redis does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Admit the call (fail open). The default: a rate limit protects the
    /// server; losing it for a while is better than refusing all work.
    #[default]
    Allow,
    /// Refuse the call (fail closed), with `retry_after` = the emission interval.
    Deny,
    /// Decide with a local GCRA of the same quota, per key.
    Local,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Redis admitted the call.
    Allowed,
    /// Redis refused it; a cell is free after `retry_after`.
    Limited {
        /// Time until the next cell.
        retry_after: Duration,
    },
    /// Redis did not answer; the fallback decided (`true`: admitted).
    Fallback(bool),
}

/// A rate limiter whose state lives in Redis, shared by every replica.
/// Clones share the connection.
#[derive(Clone)]
pub struct RedisRateLimiter {
    conn: Conn,
    script: Arc<redis::Script>,
    fallback: Fallback,
    local: KeyedState<DefaultDirectRateLimiter>,
    local_quota: Quota,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("conn", &self.conn)
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl RedisRateLimiter {
    /// A limiter on `config`'s Redis. Connects in the background; needs a
    /// Tokio runtime. `local_quota` is used only by [`Fallback::Local`].
    pub fn new(
        config: RedisConfig,
        fallback: Fallback,
        local_quota: Quota,
    ) -> Result<Self, ConfigError> {
        let conn = Conn::start(config).map_err(|e| ConfigError::new("redis.url", e.to_string()))?;
        Ok(RedisRateLimiter {
            conn,
            script: Arc::new(redis::Script::new(GCRA)),
            fallback,
            local: KeyedState::new(Bounds::default(), move |_| RateLimiter::direct(local_quota)),
            local_quota,
        })
    }

    /// Whether the command connection exists.
    pub fn is_connected(&self) -> bool {
        self.conn.is_connected()
    }

    /// Takes one cell of `quota` for `key` in Redis.
    pub async fn decide(&self, key: &str, quota: Quota) -> Decision {
        let interval = quota.replenish_interval().as_micros().max(1) as u64;
        let burst = quota.burst_size().get();
        let redis_key = self.conn.config.key("rl", key);
        let script = Arc::clone(&self.script);
        let answer: Result<(i64, i64), Unavailable> = self
            .conn
            .run("rate limit", |mut c| async move {
                script
                    .key(redis_key)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match answer {
            Ok((1, _)) => Decision::Allowed,
            Ok((_, wait_us)) => Decision::Limited {
                retry_after: Duration::from_micros(wait_us.max(0) as u64),
            },
            Err(_) => Decision::Fallback(match self.fallback {
                Fallback::Allow => true,
                Fallback::Deny => false,
                Fallback::Local => self.local.entry(KeyRef::Custom(key.into())).check().is_ok(),
            }),
        }
    }

    /// Takes one cell of `quota` for `key`: `Ok` to proceed, or the same
    /// [`RateLimited`] the local limiter gives (a `RateLimited` event is
    /// emitted). Never waits longer than `op_timeout` on Redis.
    pub async fn check(&self, key: &str, quota: Quota) -> Result<(), RateLimited> {
        let retry_after = match self.decide(key, quota).await {
            Decision::Allowed | Decision::Fallback(true) => return Ok(()),
            Decision::Limited { retry_after } => retry_after,
            Decision::Fallback(false) => quota.replenish_interval(),
        };
        self.conn
            .config
            .events
            .emit(&Event::RateLimited { key, retry_after });
        Err(RateLimited::new(key, retry_after))
    }

    /// The local fallback quota.
    pub fn local_quota(&self) -> Quota {
        self.local_quota
    }
}

/// A quota of `burst` cells, one more every `interval`.
pub fn quota(interval: Duration, burst: u32) -> Result<Quota, ConfigError> {
    let burst =
        NonZeroU32::new(burst).ok_or_else(|| ConfigError::new("burst", "must be at least 1"))?;
    Quota::with_period(interval)
        .map(|q| q.allow_burst(burst))
        .ok_or_else(|| ConfigError::new("interval", "must be positive"))
}
