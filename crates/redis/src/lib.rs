//! Shared toolwarden state across replicas through Redis (or Valkey).
//!
//! - [`RedisBreakerSync`]: circuit-breaker transitions persisted per key and
//!   broadcast on pub/sub; other replicas apply them through the breaker's
//!   [`StateSync`](toolwarden_circuit_breaker::StateSync) seam, following
//!   every remote open or only a quorum of replicas ([`RemoteOpenPolicy`]).
//!   A fleet-wide probe permit (`SET NX PX` in Redis) lets one replica at a
//!   time probe a key whose open period is over, so a recovering server
//!   is not probed by every replica at once; the others refuse as open
//!   until its outcome is broadcast. When Redis is away, each replica
//!   probes on its own (see [`RedisBreakerSyncBuilder::probe_permit`]).
//! - [`RedisRateLimiter`]: GCRA evaluated atomically in a Lua script on
//!   Redis' own clock, giving the same `RateLimited { retry_after }` as the
//!   local limiter, with a [`Fallback`] when Redis is away. Use it on its
//!   own, or as the backend of a `RateLimitLayer` (below).
//!
//! # The distributed limiter behind `RateLimitLayer`
//!
//! `RedisRateLimiter` implements the rate-limit crate's
//! [`RateLimitBackend`](toolwarden_rate_limit::RateLimitBackend): pass it to
//! [`RateLimitBuilder::backend`](toolwarden_rate_limit::RateLimitBuilder::backend)
//! and every replica's layer takes its tokens from the same Redis keys. The
//! layer keeps its configuration (global quota, per-tool quota, overrides,
//! `key_by`, mode) and its refusals (`RateLimited` with key `global` or the
//! request's key, and Redis' `retry_after`); only the place of the quotas
//! moves. A limited call costs one script run (per-key and global quota
//! together, both or neither), made in the response future before the inner
//! call; requests that are not limited never reach Redis. `Mode::Wait` works
//! too: a refused call sleeps `retry_after` and asks Redis again, within
//! `max_wait`.
//!
//! When Redis is down, slow or not yet connected, a call waits at most
//! `op_timeout` for it (50 ms by default), a `SyncFailed` event is emitted,
//! and the limiter's [`Fallback`] decides: `Allow` admits, `Deny` refuses
//! with `retry_after` = the quota's emission interval, `Local` lets the
//! layer's own in-process quotas decide (each replica then admits up to the
//! whole quota by itself until Redis is back). Reconnection happens in the
//! background; nothing panics and no call hangs on Redis. Keys live under
//! the config's prefix (`{prefix}:rl:{key}:{quota}`,
//! `{prefix}:rl-global:{quota}`: a changed quota starts full) and expire
//! once their quota is full again. The keys of one call are used in
//! one script, so on Redis Cluster they would have to share a hash slot:
//! only a single Redis (or a primary with replicas) is supported.
//!
//! Local state stays the fast path. Every Redis operation on the call path is
//! bounded by `op_timeout` (default 50 ms); when Redis is slow or gone, each
//! replica keeps deciding locally, reconnects in the background, resyncs when
//! Redis returns, and reports `SyncFailed` events. Nothing panics or blocks a
//! call on Redis: while Redis does not answer, one operation per
//! `reconnect_min` tries it (and may wait `op_timeout`), and the others go
//! to the fallback at once. An operation that finds its connection gone (Redis
//! restarted since the last one) runs once more on the new connection,
//! within the same `op_timeout`: the first call after a restart is Redis's
//! to decide, not the fallback's.
//!
//! # Configuration files
//!
//! Feature `serde`: `RedisSettings`, every knob above as one serde type
//! (a `[redis]` table, keys named as the builders' methods), as the
//! `toolwarden` proxy reads it.
//!
//! # Why redis-rs
//!
//! The `redis` crate is the most used Rust client, maintained by the
//! redis-rs organisation; its `ConnectionManager` reconnects by itself and
//! takes per-command response timeouts, it has async pub/sub and script
//! support (EVALSHA with EVAL fallback), and it builds with only the features
//! needed here. fred is richer (cluster, pools) but much larger for the two
//! things used here.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use toolwarden_circuit_breaker::CircuitBreakerLayer;
//! use toolwarden_redis::{quota, Fallback, RedisBreakerSync, RedisConfig, RedisRateLimiter, RemoteOpenPolicy};
//!
//! let config = RedisConfig::builder("redis://127.0.0.1:6379").replica_id("replica-a").build()?;
//! let sync = RedisBreakerSync::start(config.clone(), RemoteOpenPolicy::Quorum(2))?;
//! let breakers = CircuitBreakerLayer::builder().sync(std::sync::Arc::new(sync.clone())).build()?;
//! sync.attach(breakers.registry().clone());
//!
//! let limiter = RedisRateLimiter::new(config, Fallback::Allow, quota(Duration::from_millis(100), 10)?)?;
//! limiter.check("search", quota(Duration::from_millis(100), 10)?).await?;
//!
//! // The same limiter as the backend of a RateLimitLayer, shared by every replica.
//! use toolwarden_rate_limit::{Rate, RateLimitLayer};
//! let rate_limit = RateLimitLayer::builder()
//!     .global(Rate::per_second(100), 100)
//!     .per_tool(Rate::per_second(10), 10)
//!     .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1))
//!     .backend(limiter)
//!     .build()?;
//! # let _ = rate_limit;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod config;
mod conn;
mod limiter;
mod permit;
#[cfg(feature = "serde")]
mod settings;
mod sync;

pub use config::{RedisConfig, RedisConfigBuilder};
pub use conn::Unavailable;
pub use limiter::{quota, Decision, Fallback, RedisRateLimiter};
#[cfg(feature = "serde")]
pub use settings::{FallbackName, PolicyName, RedisSettings};
pub use sync::{
    RedisBreakerSync, RedisBreakerSyncBuilder, RemoteOpenPolicy, SyncStats,
    DEFAULT_PROBE_PERMIT_TTL,
};
