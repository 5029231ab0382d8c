//! Several `toolwarden` replicas sharing breakers and quotas through Redis
//! (`[redis]`, the redis crate's [`RedisSettings`]).
//!
//! When the section is set, [`Replicas::start`] connects (in the
//! background: a replica starts while Redis is down) and the proxy wires:
//!
//! - **Breaker sync.** The stack's circuit-breaker registry (one circuit
//!   per tool, keyed by the exposed tool name) gets a [`RedisBreakerSync`]
//!   with `policy` / `quorum` and the fleet-wide probe permit. A gateway's
//!   per-upstream breakers each get their own, keyed by the upstream's name
//!   under the prefix `{prefix}:upstream:{name}` (each registry has its own
//!   channel, so an upstream named like a tool never mixes with it). So an
//!   open circuit in one replica refuses in the others, and once its open
//!   period is over only one replica probes (`SET NX PX`).
//! - **Distributed quotas.** The rate-limit layer takes its tokens from a
//!   [`RedisRateLimiter`] (GCRA in one Lua script, on Redis' clock): the
//!   global quota and each tool's quota (`per_tool` and the tools' own) are
//!   shared by every replica. A gateway's upstreams have no quota of their
//!   own (there is no per-upstream rate limit in the configuration); their
//!   tools' quotas are the tools' (`[upstreams.NAME.tools."x".rate_limit]`).
//! - **When Redis is away**, nothing waits on it longer than `op_timeout`:
//!   quotas are decided by `fallback` (`local`: the layer's own in-process
//!   quotas, each replica up to the whole quota; `allow`; `deny`), each
//!   breaker decides locally and probes on its own, and every failed Redis
//!   operation is a `SyncFailed` event (logged). The clients reconnect in
//!   the background; on return the breaker syncs reload the persisted
//!   states and re-publish their own opens, so the replicas converge.
//! - **`/health`** has a `redis` check (important: Redis away makes the
//!   report `degraded`, still `200`, since serving goes on) and a `"redis"`
//!   object: `state` (`connected` or `fallback`), the replica id, the
//!   fallback, and the breaker syncs' counters.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{json, Value};
use toolwarden::observability::{HealthCheck, Priority};
use toolwarden::rate_limit::Rate;
use toolwarden::redis::{
    Fallback, RedisBreakerSync, RedisConfig, RedisRateLimiter, RedisSettings, Unavailable,
};
use toolwarden_core::{ConfigError, Events};

/// The Redis side of a replica: the breaker syncs and the distributed
/// limiter `[redis]` asks for, sharing one replica id. Cloning is cheap
/// (the handles are shared).
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    settings: RedisSettings,
    config: RedisConfig,
    events: Events,
    /// The stack's breaker sync (`breaker_sync`).
    breakers: Option<RedisBreakerSync>,
    /// The distributed limiter (`distributed_quotas`).
    limiter: Option<RedisRateLimiter>,
    /// A gateway's upstream breakers' syncs, by upstream name (as many as
    /// upstreams: bounded by the configuration).
    upstreams: Mutex<Vec<(String, RedisBreakerSync)>>,
    /// What the last health check found: `None` before the first one.
    last: Mutex<Option<Result<(), String>>>,
}

impl fmt::Debug for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replicas")
            .field("replica_id", &self.inner.config.replica_id())
            .field("breakers", &self.inner.breakers)
            .field("limiter", &self.inner.limiter)
            .finish_non_exhaustive()
    }
}

impl Replicas {
    /// Validates `settings` and starts what they ask for (connecting in
    /// the background); needs a Tokio runtime. `events` receive the
    /// `SyncFailed` events. The error names the key (`redis.url`, ...).
    pub fn start(settings: &RedisSettings, events: &Events) -> Result<Self, ConfigError> {
        settings.validate()?;
        let config = settings.config_builder().events(events.clone()).build()?;
        let breakers = settings
            .breaker_sync()
            .then(|| {
                settings
                    .sync_builder(RedisBreakerSync::builder(config.clone()))
                    .start()
            })
            .transpose()?;
        let limiter = settings
            .distributed_quotas()
            .then(|| {
                // The limiter's own local quota serves only its standalone
                // `check`; as the layer's backend, `local` falls back to the
                // layer's quotas.
                let unused = toolwarden::rate_limit::Quota::new(Rate::per_second(1), 1)?;
                RedisRateLimiter::new(config.clone(), settings.fallback(), unused)
            })
            .transpose()?;
        tracing::info!(
            replica_id = config.replica_id(),
            breaker_sync = breakers.is_some(),
            distributed_quotas = limiter.is_some(),
            "sharing state with other replicas through Redis"
        );
        Ok(Replicas {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                config,
                events: events.clone(),
                breakers,
                limiter,
                upstreams: Mutex::new(Vec::new()),
                last: Mutex::new(None),
            }),
        })
    }

    /// This replica's id.
    #[must_use]
    pub fn replica_id(&self) -> &str {
        self.inner.config.replica_id()
    }

    /// The stack's breaker sync, when `breaker_sync` is on.
    #[must_use]
    pub fn breaker_sync(&self) -> Option<&RedisBreakerSync> {
        self.inner.breakers.as_ref()
    }

    /// The distributed limiter, when `distributed_quotas` is on.
    #[must_use]
    pub fn limiter(&self) -> Option<&RedisRateLimiter> {
        self.inner.limiter.as_ref()
    }

    /// A new breaker sync for the gateway upstream `name`'s breaker (keyed
    /// by `name`, under `{prefix}:upstream:{name}`), when `breaker_sync` is
    /// on; kept for `/health`. Attach the breaker's registry to it.
    pub fn upstream_sync(&self, name: &str) -> Result<Option<RedisBreakerSync>, ConfigError> {
        if !self.inner.settings.breaker_sync() {
            return Ok(None);
        }
        let config = self
            .inner
            .settings
            .config_builder()
            .prefix(&format!("{}:upstream:{name}", self.inner.config.prefix()))
            .replica_id(self.inner.config.replica_id())
            .events(self.inner.events.clone())
            .build()?;
        let sync = self
            .inner
            .settings
            .sync_builder(RedisBreakerSync::builder(config))
            .start()?;
        self.inner
            .upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_owned(), sync.clone()));
        Ok(Some(sync))
    }

    /// `PING` on one of the connections, bounded by `op_timeout`.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        if let Some(limiter) = &self.inner.limiter {
            return limiter.ping().await;
        }
        if let Some(sync) = &self.inner.breakers {
            return sync.ping().await;
        }
        let first = self
            .inner
            .upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .map(|(_, sync)| sync.clone());
        match first {
            Some(sync) => sync.ping().await,
            None => Ok(()),
        }
    }

    /// The `redis` health check ([`Priority::Important`]): fails while Redis
    /// does not answer a `PING` within `op_timeout`; its outcome is also
    /// what [`health_json`](Self::health_json) reports.
    #[must_use]
    pub fn health_check(&self) -> HealthCheck {
        let replicas = self.clone();
        HealthCheck::new("redis", Priority::Important, move || {
            let replicas = replicas.clone();
            async move {
                let outcome = replicas.ping().await.map_err(|e| {
                    format!("{e}; serving under fallback = {}", replicas.fallback_name())
                });
                *replicas
                    .inner
                    .last
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(outcome.clone());
                outcome
            }
        })
    }

    fn fallback_name(&self) -> &'static str {
        match self.inner.settings.fallback() {
            Fallback::Local => "local",
            Fallback::Allow => "allow",
            Fallback::Deny => "deny",
        }
    }

    /// The `"redis"` part of `/health`: `state` (`connected`, `fallback`,
    /// or `unknown` before the first check), the replica id, the fallback,
    /// and each breaker sync's counters (`stack`, and `upstreams` by name).
    #[must_use]
    pub fn health_json(&self) -> Value {
        let last = self
            .inner
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (state, detail) = match last {
            None => ("unknown", None),
            Some(Ok(())) => ("connected", None),
            Some(Err(e)) => ("fallback", Some(e)),
        };
        let upstreams: serde_json::Map<String, Value> = self
            .inner
            .upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, sync)| (name.clone(), json!(sync.stats())))
            .collect();
        let mut report = json!({
            "state": state,
            "replica_id": self.replica_id(),
            "breaker_sync": self.inner.breakers.is_some(),
            "distributed_quotas": self.inner.limiter.is_some(),
            "fallback": self.fallback_name(),
        });
        if let Some(detail) = detail {
            report["detail"] = json!(detail);
        }
        if let Some(sync) = &self.inner.breakers {
            report["sync"] = json!(sync.stats());
        }
        if !upstreams.is_empty() {
            report["upstream_sync"] = Value::Object(upstreams);
        }
        report
    }
}
