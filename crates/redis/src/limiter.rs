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
//!
//! The limiter is also a [`RateLimitBackend`]: given to
//! [`RateLimitBuilder::backend`](toolwarden_rate_limit::RateLimitBuilder::backend),
//! it takes a `RateLimitLayer`'s tokens (the per-key quota and the global
//! quota, both or neither, in one script run) in Redis. Keys:
//! `{prefix}:rl:{key}:{interval µs}x{burst}` for a per-key quota (the same
//! key as [`RedisRateLimiter::check`] with the layer's key: the tool name,
//! `session/tool`, ...) and `{prefix}:rl-global:{interval µs}x{burst}` for
//! the global quota. The quota is part of the key: a TAT means something
//! under its own quota only, so a quota changed (a reload) starts full, as
//! the in-process one does, instead of inheriting a debt computed under
//! the old one (a loosened quota kept refusing for the old refill time).
//! Each key expires once its quota is full again, so Redis holds at most
//! the keys used within one refill time.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, RateLimiter};
use toolwarden_core::{Bounds, ConfigError, Event, KeyRef, KeyedState, RateLimited};
use toolwarden_rate_limit::{
    Acquire, BackendDecision, BackendFuture, Quota, Rate, RateLimitBackend, Scope,
};

use crate::config::RedisConfig;
use crate::conn::{Conn, Unavailable};

/// GCRA over one or more quotas in one atomic step: a cell of each, or of
/// none. KEYS[i]: the key of quota i. ARGV[2i-1], ARGV[2i]: its emission
/// interval in microseconds and its burst. Returns {1, 0, 0} when every
/// quota admits, else {0, i, retry_after_us} for the first quota i that
/// refuses (nothing is written then). Times are Redis' clock (`TIME`), in µs
/// (exact in a Lua double until the year 2255).
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local allow_at = tat + interval - interval * burst
  if allow_at > now then
    return {0, i, allow_at - now}
  end
  tats[i] = tat + interval
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tats[i], 'PX', math.ceil((tats[i] - now) / 1000) + 1)
end
return {1, 0, 0}
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
    /// Decide with a local GCRA of the same quota, per key: standalone,
    /// the `local_quota` given to [`RedisRateLimiter::new`]; as a
    /// `RateLimitLayer` backend, the layer's own in-process quotas (same
    /// keys, quotas, overrides and key bound), through
    /// [`BackendDecision::DecideLocally`].
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
/// Clones share the connection (cloning is one reference-count increment).
///
/// Use it on its own ([`check`](Self::check), [`decide`](Self::decide)) or
/// as the [`RateLimitBackend`] of a `RateLimitLayer`:
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use toolwarden_core::testing::MockMcp;
/// use toolwarden_rate_limit::{Rate, RateLimitLayer};
/// use toolwarden_redis::{quota, Fallback, RedisConfig, RedisRateLimiter};
/// use tower::Layer;
///
/// let config = RedisConfig::builder("redis://127.0.0.1:6379").build()?;
/// // `local_quota` only serves the standalone `check` with `Fallback::Local`.
/// let limiter = RedisRateLimiter::new(config, Fallback::Local, quota(Duration::from_millis(100), 10)?)?;
/// let layer = RateLimitLayer::builder()
///     .global(Rate::per_second(100), 100)                 // shared by every replica
///     .per_tool(Rate::per_second(10), 10)
///     .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1))
///     .backend(limiter)
///     .build()?;
/// let svc = layer.layer(MockMcp::new());
/// # let _ = svc; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisRateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    script: redis::Script,
    fallback: Fallback,
    local: KeyedState<DefaultDirectRateLimiter>,
    local_quota: Quota,
    global_key: String,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("conn", &self.inner.conn)
            .field("fallback", &self.inner.fallback)
            .finish()
    }
}

/// One quota as the script takes it: key, interval in µs (at least 1), burst.
type ScriptQuota = (String, u64, u32);

/// The quota of `interval` and `burst` under `base` (a key without its
/// quota: see the module docs).
fn script_quota(base: &str, interval: Duration, burst: u32) -> ScriptQuota {
    let interval = u64::try_from(interval.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    (format!("{base}:{interval}x{burst}"), interval, burst)
}

impl RedisRateLimiter {
    /// A limiter on `config`'s Redis. Connects in the background; needs a
    /// Tokio runtime. `local_quota` is used only by [`Fallback::Local`].
    pub fn new(
        config: RedisConfig,
        fallback: Fallback,
        local_quota: Quota,
    ) -> Result<Self, ConfigError> {
        let global_key = format!("{}:rl-global", config.prefix);
        let conn = Conn::start(config).map_err(|e| ConfigError::new("redis.url", e.to_string()))?;
        Ok(RedisRateLimiter {
            inner: Arc::new(Inner {
                conn,
                script: redis::Script::new(GCRA),
                fallback,
                local: KeyedState::new(Bounds::default(), move |_| {
                    RateLimiter::direct(governor_quota(local_quota))
                }),
                local_quota,
                global_key,
            }),
        })
    }

    /// Whether the command connection exists.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.inner.conn.is_connected()
    }

    /// Asks Redis for a `PING`, bounded by `op_timeout`: `Err` while Redis
    /// is away (or not connected yet). For health reports.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        self.inner.conn.ping().await
    }

    /// What this limiter does when Redis does not answer in time.
    #[must_use]
    pub fn fallback(&self) -> Fallback {
        self.inner.fallback
    }

    /// Takes one cell of `quota` for `key` in Redis.
    pub async fn decide(&self, key: &str, quota: Quota) -> Decision {
        let quotas = vec![script_quota(
            &self.inner.conn.config.key("rl", key),
            quota.interval(),
            quota.burst(),
        )];
        match self.inner.run_script(quotas).await {
            Ok(None) => Decision::Allowed,
            Ok(Some((_, retry_after))) => Decision::Limited { retry_after },
            Err(_) => Decision::Fallback(match self.inner.fallback {
                Fallback::Allow => true,
                Fallback::Deny => false,
                Fallback::Local => self
                    .inner
                    .local
                    .entry(KeyRef::Custom(key.into()))
                    .check()
                    .is_ok(),
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
            Decision::Fallback(false) => quota.interval(),
        };
        self.inner
            .conn
            .config
            .events
            .emit(&Event::RateLimited { key, retry_after });
        Err(RateLimited::new(key, retry_after))
    }

    /// The local fallback quota.
    #[must_use]
    pub fn local_quota(&self) -> Quota {
        self.inner.local_quota
    }
}

impl Inner {
    /// Runs the script over `quotas`: `Ok(None)` when every quota admitted,
    /// `Ok(Some((index, retry_after)))` for the first that refused, `Err`
    /// when Redis did not answer within `op_timeout` (a `SyncFailed` event
    /// has been emitted).
    async fn run_script(
        &self,
        quotas: Vec<ScriptQuota>,
    ) -> Result<Option<(usize, Duration)>, Unavailable> {
        let mut invocation = self.script.prepare_invoke();
        for (key, _, _) in &quotas {
            invocation.key(key);
        }
        for (_, interval, burst) in &quotas {
            invocation.arg(interval).arg(burst);
        }
        let invocation = &invocation;
        let (allowed, index, wait_us): (i64, i64, i64) = self
            .conn
            .run("rate limit", |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok((allowed != 1).then(|| {
            (
                usize::try_from(index.max(1) - 1).unwrap_or(0),
                Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
            )
        }))
    }
}

/// Takes a `RateLimitLayer`'s tokens in Redis: the per-key quota and the
/// global quota in one atomic script run (both or neither), on Redis' clock,
/// bounded by `op_timeout`. When Redis does not answer in time (a
/// `SyncFailed` event is emitted), the [`Fallback`] decides:
/// [`Allow`](Fallback::Allow) admits, [`Deny`](Fallback::Deny) refuses with
/// the emission interval of the call's first quota as `retry_after`, and
/// [`Local`](Fallback::Local) hands the call to the layer's in-process
/// quotas. The layer emits the `RateLimited` events.
impl RateLimitBackend for RedisRateLimiter {
    fn acquire(&self, acquire: &Acquire) -> BackendFuture {
        let config = &self.inner.conn.config;
        let mut quotas = Vec::with_capacity(2);
        let mut scopes = [Scope::Key; 2];
        if let Some((key, quota)) = acquire.key() {
            quotas.push(script_quota(
                &config.key("rl", key),
                quota.interval(),
                quota.burst(),
            ));
        }
        if let Some(quota) = acquire.global() {
            scopes[quotas.len()] = Scope::Global;
            quotas.push(script_quota(
                &self.inner.global_key,
                quota.interval(),
                quota.burst(),
            ));
        }
        // The refusal when Redis is away and the fallback denies.
        let denied = acquire
            .key()
            .map(|(_, quota)| (Scope::Key, quota))
            .or(acquire.global().map(|quota| (Scope::Global, quota)))
            .map_or(BackendDecision::DecideLocally, |(scope, quota)| {
                BackendDecision::Refuse {
                    scope,
                    retry_after: quota.interval(),
                }
            });
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if quotas.is_empty() {
                return BackendDecision::Admit;
            }
            match inner.run_script(quotas).await {
                Ok(None) => BackendDecision::Admit,
                Ok(Some((index, retry_after))) => BackendDecision::Refuse {
                    scope: scopes.get(index).copied().unwrap_or(Scope::Key),
                    retry_after,
                },
                Err(_) => match inner.fallback {
                    Fallback::Allow => BackendDecision::Admit,
                    Fallback::Deny => denied,
                    Fallback::Local => BackendDecision::DecideLocally,
                },
            }
        })
    }
}

/// A quota of `burst` cells, one more every `interval` (the rate-limit
/// crate's [`Quota`]; [`Quota::new`] takes a [`Rate`] instead).
pub fn quota(interval: Duration, burst: u32) -> Result<Quota, ConfigError> {
    if interval.is_zero() {
        return Err(ConfigError::new("interval", "must be positive"));
    }
    Quota::new(Rate::new(1, interval), burst).map_err(|e| {
        if e.field() == "burst" {
            e
        } else {
            ConfigError::new("interval", e.reason().to_owned())
        }
    })
}

/// The governor quota of the local fallback limiter.
fn governor_quota(quota: Quota) -> governor::Quota {
    let burst = NonZeroU32::new(quota.burst()).unwrap_or(NonZeroU32::MIN);
    governor::Quota::with_period(quota.interval())
        .unwrap_or_else(|| governor::Quota::per_hour(NonZeroU32::MIN))
        .allow_burst(burst)
}
