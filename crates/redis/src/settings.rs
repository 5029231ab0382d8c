//! [`RedisSettings`]: the knobs of [`RedisConfigBuilder`],
//! [`RedisBreakerSyncBuilder`] and [`RedisRateLimiter`] as one serde type
//! (feature `serde`), for configuration files (a `[redis]` table).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toolwarden_core::ConfigError;

use crate::config::{RedisConfig, RedisConfigBuilder};
use crate::limiter::Fallback;
use crate::sync::{RedisBreakerSyncBuilder, RemoteOpenPolicy};

/// Everything needed to share state across replicas through Redis, as a
/// settings type. Keys are the builders' method names (the reconnect
/// backoff's two bounds are `reconnect_min` and `reconnect_max`, the names
/// its errors use); every key but `url` is optional, unset meaning the
/// default written next to it.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `url` | — (required) | `redis://[:password@]host:port[/db]` |
/// | `prefix` | `"toolwarden"` | the namespace of every key and channel |
/// | `replica_id` | `replica-<random hex>` | this replica's name in messages and permits |
/// | `op_timeout` | `"50ms"` | the bound on any Redis operation on the call path |
/// | `connect_timeout` | `"500ms"` | the bound on one (background) connection attempt |
/// | `reconnect_min` / `reconnect_max` | `"100ms"` / `"5s"` | reconnect backoff |
/// | `breaker_sync` | `true` | share circuit-breaker state ([`RedisBreakerSync`](crate::RedisBreakerSync)) |
/// | `policy` | `"follow"` | `"follow"` every remote open, or `"quorum"` |
/// | `quorum` | `2` | with `policy = "quorum"`: replicas that must report a key open |
/// | `probe_permit` | `true` | one replica probes a recovering key at a time |
/// | `probe_permit_ttl` | `"5s"` | how long a permit lasts unless released (at least the key's `probe_timeout`) |
/// | `distributed_quotas` | `true` | take rate-limit tokens in Redis ([`RedisRateLimiter`](crate::RedisRateLimiter)) |
/// | `fallback` | `"local"` | when Redis does not answer: `"local"`, `"allow"` or `"deny"` ([`Fallback`]) |
///
/// The default `fallback` here is `local`, not [`Fallback::default`]: a
/// settings file configures a `RateLimitLayer` whose own quotas are there
/// to decide when Redis is away, which keeps every replica limited (each to
/// the whole quota) rather than not limited at all.
///
/// ```
/// use toolwarden_redis::{Fallback, RedisSettings, RemoteOpenPolicy};
///
/// let settings: RedisSettings = serde_json::from_value(serde_json::json!({
///     "url": "redis://127.0.0.1:6379",
///     "policy": "quorum",
///     "quorum": 3,
///     "op_timeout": "20ms",
/// })).unwrap();
/// settings.validate().unwrap();
/// assert_eq!(settings.remote_open_policy(), RemoteOpenPolicy::Quorum(3));
/// assert_eq!(settings.fallback(), Fallback::Local);
///
/// let bad: RedisSettings =
///     serde_json::from_value(serde_json::json!({ "url": "http://x" })).unwrap();
/// assert_eq!(bad.validate().unwrap_err().field(), "redis.url");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// The server: `redis://[:password@]host:port[/db]` (`rediss://` is not
    /// built in). Required.
    pub url: String,
    /// The namespace of every key and channel. Default `"toolwarden"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// This replica's name. Default `replica-<random hex>`, new at each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// The bound on any Redis operation on the call path. Default `"50ms"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub op_timeout: Option<Duration>,
    /// The bound on one connection attempt. Default `"500ms"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect_timeout: Option<Duration>,
    /// The first reconnect backoff. Default `"100ms"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub reconnect_min: Option<Duration>,
    /// The longest reconnect backoff. Default `"5s"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub reconnect_max: Option<Duration>,
    /// Share circuit-breaker state through Redis. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_sync: Option<bool>,
    /// How a remote open applies here: `"follow"` (the default) or
    /// `"quorum"` (see [`RemoteOpenPolicy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyName>,
    /// With `policy = "quorum"`: how many replicas must report a key open.
    /// Default `2`; at least 1. Refused with `policy = "follow"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    /// One replica probes a recovering key at a time (see
    /// [`RedisBreakerSyncBuilder::probe_permit`]). Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_permit: Option<bool>,
    /// See [`RedisBreakerSyncBuilder::probe_permit_ttl`]. Default `"5s"`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub probe_permit_ttl: Option<Duration>,
    /// Take rate-limit tokens in Redis, so every replica shares one quota.
    /// Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed_quotas: Option<bool>,
    /// What the distributed quotas do when Redis does not answer within
    /// `op_timeout`. Default `"local"` (see the type's docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackName>,
}

/// `policy`: the name of a [`RemoteOpenPolicy`] (its size is `quorum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    /// [`RemoteOpenPolicy::Follow`].
    Follow,
    /// [`RemoteOpenPolicy::Quorum`] of `quorum` replicas.
    Quorum,
}

/// `fallback`: a [`Fallback`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackName {
    /// [`Fallback::Local`].
    Local,
    /// [`Fallback::Allow`].
    Allow,
    /// [`Fallback::Deny`].
    Deny,
}

/// The default `quorum`.
const DEFAULT_QUORUM: usize = 2;

impl RedisSettings {
    /// Settings for `url`, every other key unset.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            prefix: None,
            replica_id: None,
            op_timeout: None,
            connect_timeout: None,
            reconnect_min: None,
            reconnect_max: None,
            breaker_sync: None,
            policy: None,
            quorum: None,
            probe_permit: None,
            probe_permit_ttl: None,
            distributed_quotas: None,
            fallback: None,
        }
    }

    /// A [`RedisConfig`] builder with the connection keys applied.
    #[must_use]
    pub fn config_builder(&self) -> RedisConfigBuilder {
        let mut b = RedisConfig::builder(self.url.as_str());
        if let Some(prefix) = &self.prefix {
            b = b.prefix(prefix);
        }
        if let Some(id) = &self.replica_id {
            b = b.replica_id(id);
        }
        if let Some(d) = self.op_timeout {
            b = b.op_timeout(d);
        }
        if let Some(d) = self.connect_timeout {
            b = b.connect_timeout(d);
        }
        if self.reconnect_min.is_some() || self.reconnect_max.is_some() {
            b = b.reconnect_backoff(
                self.reconnect_min.unwrap_or(Duration::from_millis(100)),
                self.reconnect_max.unwrap_or(Duration::from_secs(5)),
            );
        }
        b
    }

    /// The breaker sync's policy: `policy` and `quorum`.
    #[must_use]
    pub fn remote_open_policy(&self) -> RemoteOpenPolicy {
        match self.policy {
            Some(PolicyName::Quorum) => {
                RemoteOpenPolicy::Quorum(self.quorum.unwrap_or(DEFAULT_QUORUM))
            }
            _ => RemoteOpenPolicy::Follow,
        }
    }

    /// Applies the breaker-sync keys (`policy`, `quorum`, `probe_permit`,
    /// `probe_permit_ttl`) to `builder`.
    pub fn sync_builder(&self, mut builder: RedisBreakerSyncBuilder) -> RedisBreakerSyncBuilder {
        builder = builder.policy(self.remote_open_policy());
        if let Some(on) = self.probe_permit {
            builder = builder.probe_permit(on);
        }
        if let Some(ttl) = self.probe_permit_ttl {
            builder = builder.probe_permit_ttl(ttl);
        }
        builder
    }

    /// Whether circuit-breaker state is shared (`breaker_sync`).
    #[must_use]
    pub fn breaker_sync(&self) -> bool {
        self.breaker_sync.unwrap_or(true)
    }

    /// Whether the quotas are taken in Redis (`distributed_quotas`).
    #[must_use]
    pub fn distributed_quotas(&self) -> bool {
        self.distributed_quotas.unwrap_or(true)
    }

    /// The distributed quotas' fallback (default [`Fallback::Local`]).
    #[must_use]
    pub fn fallback(&self) -> Fallback {
        match self.fallback {
            None | Some(FallbackName::Local) => Fallback::Local,
            Some(FallbackName::Allow) => Fallback::Allow,
            Some(FallbackName::Deny) => Fallback::Deny,
        }
    }

    /// Checks every key without connecting (no runtime needed); the error
    /// names it (`redis.url`, `redis.quorum`, ...).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let config = self.config_builder().build()?;
        if !self.breaker_sync() && !self.distributed_quotas() {
            return Err(ConfigError::new(
                "redis.breaker_sync, redis.distributed_quotas",
                "both are off: nothing would be shared (leave the section out instead)",
            ));
        }
        if self.quorum.is_some() && self.policy != Some(PolicyName::Quorum) {
            return Err(ConfigError::new(
                "redis.quorum",
                "is only read with policy = \"quorum\"",
            ));
        }
        self.sync_builder(crate::RedisBreakerSync::builder(config))
            .check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> RedisSettings {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn keys_apply_and_bad_ones_are_named() {
        let s = parse(
            serde_json::json!({"url": "redis://127.0.0.1:1", "prefix": "fleet", "replica_id": "a"}),
        );
        s.validate().unwrap();
        let config = s.config_builder().build().unwrap();
        assert_eq!(config.key("cb", "x"), "fleet:cb:x");
        assert_eq!(config.replica_id(), "a");
        assert!(s.breaker_sync() && s.distributed_quotas());
        assert_eq!(s.remote_open_policy(), RemoteOpenPolicy::Follow);

        let quorum0 =
            parse(serde_json::json!({"url": "redis://h", "policy": "quorum", "quorum": 0}));
        assert_eq!(quorum0.validate().unwrap_err().field(), "redis.quorum");
        let stray = parse(serde_json::json!({"url": "redis://h", "quorum": 3}));
        assert_eq!(stray.validate().unwrap_err().field(), "redis.quorum");
        let ttl = parse(serde_json::json!({"url": "redis://h", "probe_permit_ttl": "0s"}));
        assert_eq!(
            ttl.validate().unwrap_err().field(),
            "redis.probe_permit_ttl"
        );
        let backoff = parse(serde_json::json!({"url": "redis://h", "reconnect_max": "10ms"}));
        assert!(backoff
            .validate()
            .unwrap_err()
            .field()
            .contains("redis.reconnect_max"));
        let nothing = parse(
            serde_json::json!({"url": "redis://h", "breaker_sync": false, "distributed_quotas": false}),
        );
        assert!(nothing
            .validate()
            .unwrap_err()
            .field()
            .starts_with("redis.breaker_sync"));
        let fallback = parse(serde_json::json!({"url": "redis://h", "fallback": "deny"}));
        assert_eq!(fallback.fallback(), Fallback::Deny);
        assert!(serde_json::from_value::<RedisSettings>(
            serde_json::json!({"url": "redis://h", "nope": 1})
        )
        .is_err());
        assert!(
            serde_json::from_value::<RedisSettings>(serde_json::json!({"prefix": "p"})).is_err()
        );
    }
}
