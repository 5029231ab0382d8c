//! Connection settings shared by the breaker sync and the distributed limiter.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{ConfigError, Events};

/// How to reach Redis and how long anything may wait for it.
///
/// | knob | default | meaning |
/// |---|---|---|
/// | `url` | — (required) | `redis://host:port/db` |
/// | `op_timeout` | 50 ms | the bound on any Redis operation on the call path |
/// | `connect_timeout` | 500 ms | the bound on one connection attempt (background) |
/// | `reconnect_min` / `reconnect_max` | 100 ms / 5 s | reconnect backoff, doubling with jitter |
/// | `prefix` | `toolwarden` | the namespace of every key and channel |
/// | `replica_id` | random | this replica's name in messages and snapshots |
/// | `events` | none | where `SyncFailed` events go |
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub(crate) url: String,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) prefix: Arc<str>,
    pub(crate) replica_id: Arc<str>,
    pub(crate) events: Events,
}

impl RedisConfig {
    /// Settings for `url` with the defaults above.
    pub fn builder(url: impl Into<String>) -> RedisConfigBuilder {
        RedisConfigBuilder {
            config: RedisConfig {
                url: url.into(),
                op_timeout: Duration::from_millis(50),
                connect_timeout: Duration::from_millis(500),
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(5),
                prefix: "toolwarden".into(),
                replica_id: format!("replica-{:08x}", fastrand::u32(..)).into(),
                events: Events::new(),
            },
        }
    }

    /// This replica's id.
    #[must_use]
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// The namespace of every key and channel.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on any Redis operation on the call path.
    #[must_use]
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    pub(crate) fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    pub(crate) fn channel(&self) -> String {
        format!("{}:cb:events", self.prefix)
    }
}

/// Builds a [`RedisConfig`]; [`RedisConfigBuilder::build`] validates it.
#[derive(Debug, Clone)]
pub struct RedisConfigBuilder {
    config: RedisConfig,
}

impl RedisConfigBuilder {
    /// The bound on any Redis operation on the call path. Default 50 ms.
    #[must_use]
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.config.op_timeout = d;
        self
    }

    /// The bound on one connection attempt. Default 500 ms.
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }

    /// Reconnect backoff bounds. Default 100 ms to 5 s.
    #[must_use]
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.reconnect_min = min;
        self.config.reconnect_max = max;
        self
    }

    /// The namespace of keys and channels. Default `toolwarden`.
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// This replica's id. Default `replica-<random hex>`.
    #[must_use]
    pub fn replica_id(mut self, id: &str) -> Self {
        self.config.replica_id = id.into();
        self
    }

    /// Where `SyncFailed` events go.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.config.events = events;
        self
    }

    /// Validates the settings, naming the bad field.
    pub fn build(self) -> Result<RedisConfig, ConfigError> {
        let c = &self.config;
        if redis::Client::open(c.url.as_str()).is_err() {
            // Not the URL itself: it may hold a password.
            let scheme = c
                .url
                .split_once("://")
                .map(|(scheme, _)| scheme)
                .filter(|s| {
                    s.len() <= 16 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+')
                })
                .unwrap_or("none");
            return Err(ConfigError::new(
                "redis.url",
                format!(
                    "is not a Redis URL (scheme: {scheme}; the URL is not shown, it may hold a \
                     password): expected redis://[user:password@]host[:port][/db]; rediss:// \
                     (TLS) is not supported"
                ),
            ));
        }
        for (field, d) in [
            ("redis.op_timeout", c.op_timeout),
            ("redis.connect_timeout", c.connect_timeout),
            ("redis.reconnect_min", c.reconnect_min),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        if c.reconnect_max < c.reconnect_min {
            return Err(ConfigError::new(
                "redis.reconnect_max, redis.reconnect_min",
                "the maximum backoff must not be below the minimum",
            ));
        }
        if c.prefix.is_empty() || c.prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "redis.prefix",
                "must be non-empty without spaces",
            ));
        }
        if c.replica_id.is_empty() {
            return Err(ConfigError::new("redis.replica_id", "must be non-empty"));
        }
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_their_field() {
        let err = RedisConfig::builder("http://x").build().unwrap_err();
        assert_eq!(err.field(), "redis.url");
        // A refused URL is not echoed: it may hold a password.
        let err = RedisConfig::builder("rediss://:s3cr3t@127.0.0.1:6380/0")
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "redis.url");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(err.to_string().contains("scheme: rediss"), "{err}");
        let err = RedisConfig::builder("redis://127.0.0.1:1")
            .op_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "redis.op_timeout");
        let err = RedisConfig::builder("redis://127.0.0.1:1")
            .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert!(err.field().contains("reconnect_max"));
        let ok = RedisConfig::builder("redis://127.0.0.1:1")
            .replica_id("a")
            .build()
            .unwrap();
        assert_eq!(ok.key("cb", "search"), "toolwarden:cb:search");
        assert_eq!(ok.replica_id(), "a");
    }
}
