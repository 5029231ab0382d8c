//! Shared toolwarden state across replicas through Redis (or Valkey).
//!
//! - [`RedisBreakerSync`]: circuit-breaker transitions persisted per key and
//!   broadcast on pub/sub; other replicas apply them through the breaker's
//!   [`StateSync`](toolwarden_circuit_breaker::StateSync) seam, following
//!   every remote open or only a quorum of replicas ([`RemoteOpenPolicy`]).
//! - [`RedisRateLimiter`]: GCRA evaluated atomically in a Lua script on
//!   Redis' own clock, giving the same `RateLimited { retry_after }` as the
//!   local limiter, with a [`Fallback`] when Redis is away.
//!
//! Local state stays the fast path. Every Redis operation on the call path is
//! bounded by `op_timeout` (default 50 ms); when Redis is slow or gone, each
//! replica keeps deciding locally, reconnects in the background, resyncs when
//! Redis returns, and reports `SyncError` events. Nothing panics or blocks a
//! call on Redis.
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
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod config;
mod conn;
mod limiter;
mod sync;

pub use config::{RedisConfig, RedisConfigBuilder};
pub use conn::Unavailable;
pub use limiter::{quota, Decision, Fallback, RedisRateLimiter};
pub use sync::{RedisBreakerSync, RemoteOpenPolicy, SyncStats};
