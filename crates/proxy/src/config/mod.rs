//! The proxy's configuration: a TOML file with one section per layer, global
//! values and per-tool overrides, overlaid with `TOOLWARDEN_<SECTION>_<KEY>`
//! environment variables.
//!
//! Every key is optional. The layer sections (`circuit_breaker`,
//! `rate_limit`, `retry`, `loop_guard`, `fallback_cache`, `observability`,
//! and the optional `bulkhead`, `coalesce` and `hedge`, each off unless its
//! section is present and its `enabled` is not `false`),
//! a tool's layer tables and `[redis]` are the layer crates' settings types
//! ([`CircuitBreakerSettings`], [`CircuitBreakerToolSettings`], ...,
//! [`RedisSettings`]): their
//! keys are the layer builders' method names, each documented once there
//! with its default, and an unset key keeps the builder's default. The
//! proxy's own sections (`upstream`, `downstream`, `catalog`, `http`,
//! `limits`) and keys (`safe_to_repeat`, `cacheable`) have their defaults
//! written here, next to each key. `toolwarden.example.toml` (shipped next
//! to this crate's `Cargo.toml`) lists every key with a comment.
//!
//! What is checked when the configuration is loaded (so that `toolwarden
//! check-config` catches it): unknown keys (every table denies them), the
//! type of every value, the proxy's own sections, and then every layer
//! section by building the stack (see [`Config::validate`]): the layers'
//! builders are the one place their values are checked. Every error names
//! the key (`loop_guard.window_calls`, `tools."search".retry.max_attempts`),
//! and the environment variable when the value came from one.
//!
//! A running proxy re-reads its file on `SIGHUP` (and with `--watch`): the
//! same checks, then the new policies in place of the old ones, circuits
//! kept; which keys wait for a restart is listed in [`crate::reload`].
//!
//! ```
//! use toolwarden_proxy::config::Config;
//! let config = Config::from_toml_str(r#"
//!     [circuit_breaker]
//!     failure_threshold = 5
//!     reset_timeout = "30s"
//!
//!     [tools."search_docs"]
//!     safe_to_repeat = true
//!     rate_limit = { per_tool = { rate = "10/s", burst = 5 } }
//! "#, std::iter::empty()).unwrap();
//! assert_eq!(config.circuit_breaker.failure_threshold, Some(Some(5)));
//!
//! let err = Config::from_toml_str("[loop_guard]\nwindow_calls = 1\n", std::iter::empty()).unwrap_err();
//! assert_eq!(err.key(), Some("loop_guard.window_calls"));
//! ```

mod gateway;
mod layers;
mod listener;
mod load;
mod upstream;
mod upstream_http;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toolwarden_core::ConfigError;

pub(crate) use gateway::{glob_set, in_upstream_table, upstream_breaker, upstream_quota};
pub use gateway::{GatewayConfig, OpenUpstreams, UpstreamEntry};
pub use layers::ToolConfig;
pub use listener::{HttpConfig, LimitsConfig};
pub(crate) use load::quote_key;
pub use load::{process_env, ConfigFileError, ENV_PREFIX, SECTIONS};
pub use toolwarden::bulkhead::{BulkheadSettings, BulkheadToolSettings};
pub use toolwarden::circuit_breaker::{CircuitBreakerSettings, CircuitBreakerToolSettings};
pub use toolwarden::coalesce::{CoalesceSettings, CoalesceToolSettings};
pub use toolwarden::fallback_cache::FallbackCacheSettings;
pub use toolwarden::hedge::{HedgeSettings, HedgeToolSettings};
pub use toolwarden::loop_guard::{LoopGuardSettings, LoopGuardToolSettings};
pub use toolwarden::observability::ObservabilitySettings;
pub use toolwarden::rate_limit::{RateLimitSettings, RateLimitToolSettings};
pub use toolwarden::redis::RedisSettings;
pub use toolwarden::retry::{RetrySettings, RetryToolSettings};
pub use upstream::{SessionMode, UpstreamConfig};
pub use upstream_http::{resolve_headers, HeaderTemplate};

/// How much longer than the longest upstream's `attempt_timeout` a
/// gateway's stack bounds an attempt (see [`Config::stack_attempt_timeout`]).
pub const GATEWAY_STACK_MARGIN: Duration = Duration::from_millis(10);

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The upstream connection: restarts and timeouts.
    pub upstream: UpstreamConfig,
    /// The downstream side: message size limits.
    pub downstream: DownstreamConfig,
    /// The tool catalog: whether the server's annotations are trusted.
    pub catalog: CatalogConfig,
    /// The Streamable HTTP listener (`--listen`): origins, hosts, tokens, bounds.
    pub http: HttpConfig,
    /// Bounds on what any client may ask, over stdio or HTTP.
    pub limits: LimitsConfig,
    /// `CircuitBreakerLayer`.
    pub circuit_breaker: CircuitBreakerSettings,
    /// `RateLimitLayer`.
    pub rate_limit: RateLimitSettings,
    /// `RetryBackoffLayer`.
    pub retry: RetrySettings,
    /// `LoopGuardLayer`.
    pub loop_guard: LoopGuardSettings,
    /// `FallbackCacheLayer`.
    pub fallback_cache: FallbackCacheSettings,
    /// `ObservabilityLayer`.
    pub observability: ObservabilitySettings,
    /// `BulkheadLayer` (issue 21): a cap on calls in flight per tool. Off
    /// unless the section is present (and its `enabled` is not `false`):
    /// the cap is a number only the operator knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<BulkheadSettings>,
    /// `CoalesceLayer` (issue 21): identical concurrent calls of tools safe
    /// to share share one upstream call. Off unless the section is present
    /// (and its `enabled` is not `false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<CoalesceSettings>,
    /// `HedgeLayer`: a second copy of a slow call of a tool safe to send
    /// twice. Off unless the section is present (and its `enabled` is not
    /// `false`): a hedge is extra load the server did not ask for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeSettings>,
    /// Per-tool overrides, by tool name: `[tools."search_docs"]`.
    pub tools: BTreeMap<String, ToolConfig>,
    /// How the tools of several upstreams are exposed.
    pub gateway: GatewayConfig,
    /// Several upstream servers behind this proxy, by name:
    /// `[upstreams.time]`. Empty: the one upstream is given on the command
    /// line.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstreams: BTreeMap<String, UpstreamEntry>,
    /// Replicas sharing breakers and quotas through Redis
    /// ([`RedisSettings`], the redis crate's settings type: its keys and
    /// defaults are documented there). Unset (the default): nothing is
    /// shared, every replica decides alone. See [`crate::replicas`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSettings>,
}

/// `[downstream]`: limits on what clients may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamConfig {
    /// The longest line (one JSON-RPC message) accepted on stdin; a longer one
    /// is answered with `-32600` ("too large") and discarded. Default
    /// 4 194 304 (4 MiB).
    pub max_line_bytes: usize,
    /// The largest POST body accepted over Streamable HTTP (`413` past it).
    /// Default 4 194 304 (4 MiB).
    pub max_body_bytes: usize,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        DownstreamConfig {
            max_line_bytes: 4 * 1024 * 1024,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// `[catalog]`: the shared tool catalog, filled from `tools/list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// Trust the server's tool annotations (`readOnlyHint`, `idempotentHint`,
    /// `destructiveHint`) when deciding what may be retried or cached. The
    /// spec calls them untrusted hints, so the default is `false`: only tools
    /// configured with `safe_to_repeat` / `cacheable` are retried or cached
    /// (failures that happened before the request left are retried for any tool).
    pub trust_annotations: bool,
}

impl Config {
    /// Checks every value (see the [module docs](self)); the error names the
    /// key. The layer sections are checked by building the tool stack they
    /// describe ([`standard_stack`](crate::stack::standard_stack)), so that
    /// each layer's builder, and the stack's cross-checks, decide alone what
    /// is valid.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_section("upstream", self.upstream.validate())?;
        in_section("downstream", self.downstream.validate())?;
        in_section("http", self.http.validate())?;
        in_section("limits", self.limits.validate())?;
        if self.tools.contains_key("") {
            return Err(ConfigError::new(
                r#"tools."""#,
                "a tool name must not be empty",
            ));
        }
        in_section("gateway", self.gateway.validate())?;
        in_section("observability", crate::otlp::check(&self.observability))?;
        if let Some(redis) = &self.redis {
            // Its errors are named `redis.<key>` already.
            redis.validate()?;
        }
        // Requests other than `tools/call` go straight upstream, past the
        // tool stack: the keys that act only on them would do nothing.
        let methods_only = [
            (
                "rate_limit.limit_all_methods",
                self.rate_limit.limit_all_methods == Some(true),
            ),
            (
                "retry.safe_methods",
                self.retry
                    .safe_methods
                    .as_ref()
                    .is_some_and(|m| !m.is_empty()),
            ),
        ];
        if let Some((key, _)) = methods_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::new(
                *key,
                "has no effect in the proxy: requests other than tools/call go straight \
                 upstream, past the tool stack (bounded by limits.request_timeout)",
            ));
        }
        if self.upstream.session_mode == SessionMode::PerSession {
            // Each session's upstream answers from state of its own: its
            // answers are not another session's.
            let shared_across = [
                (
                    "coalesce.per_session",
                    self.coalesce.as_ref().and_then(|c| c.per_session),
                ),
                (
                    "fallback_cache.per_session",
                    self.fallback_cache.per_session,
                ),
            ];
            if let Some((key, _)) = shared_across.iter().find(|(_, v)| *v == Some(false)) {
                return Err(ConfigError::new(
                    *key,
                    "must not be false with upstream.session_mode = \"per_session\": one \
                     session's upstream would answer another session's calls (unset, it is \
                     true in that mode)",
                ));
            }
        }
        if !self.upstreams.is_empty() && self.upstream.session_mode == SessionMode::PerSession {
            return Err(ConfigError::new(
                "upstream.session_mode",
                gateway::PER_SESSION_REFUSED,
            ));
        }
        for (name, entry) in &self.upstreams {
            let section = format!("upstreams.{}", load::quote_key(name));
            if !gateway::valid_name(name) {
                return Err(ConfigError::new(
                    section,
                    "an upstream name is 1 to 64 letters, digits, `-` or `_`",
                ));
            }
            // An exposed name is split at its first separator, so `NAME` and
            // the separator after it must not hold one earlier: `a_` with
            // `__` would expose `a___x`, routed to `a` as `_x`.
            let separator = &self.gateway.separator;
            if format!("{name}{separator}").find(separator.as_str()) != Some(name.len()) {
                return Err(ConfigError::new(
                    section,
                    format!(
                        "an upstream name must not contain gateway.separator ({separator:?}), \
                         nor end with its start (the name and the separator would read as \
                         a shorter name)"
                    ),
                ));
            }
            in_section(&section, entry.validate())?;
            for tool in entry.tools.keys() {
                let exposed = format!("{}{tool}", self.upstream_prefix(name));
                if self.tools.contains_key(&exposed) {
                    return Err(ConfigError::new(
                        format!("{section}.tools.{}", load::quote_key(tool)),
                        format!("also configured as tools.{}", load::quote_key(&exposed)),
                    ));
                }
            }
        }
        // The layers check their own sections, each upstream's tool tables
        // as the exposed tools' (`tools."time__now"`).
        let shared = crate::stack::SharedState::new(
            toolwarden_core::Events::new(),
            crate::endpoints::MetricsEndpoints::new(),
        );
        crate::stack::standard_stack(&self.clone().with_upstream_tools(), &shared).map(drop)
    }

    /// The stack's bound on one attempt, and the key that sets it:
    /// `upstream.attempt_timeout`, or in a gateway the longest of the
    /// upstreams' `attempt_timeout`s (each upstream's own bounds its calls
    /// below the stack, so a shorter one still holds; `[upstream]` is the
    /// command line's upstream, not theirs) plus
    /// [`GATEWAY_STACK_MARGIN`]: the upstream's own bound must end a call
    /// first, as its breaker counts that timeout and not the stack's (which
    /// drops the call, cancelled). With the two equal, whichever clock tick
    /// came first decided, and a hung upstream's breaker sometimes never
    /// opened.
    #[must_use]
    pub fn stack_attempt_timeout(&self) -> (Duration, String) {
        match self
            .upstreams
            .iter()
            .max_by_key(|(_, entry)| entry.connection.attempt_timeout)
        {
            Some((name, entry)) => (
                entry
                    .connection
                    .attempt_timeout
                    .saturating_add(GATEWAY_STACK_MARGIN),
                format!("upstreams.{}.attempt_timeout", load::quote_key(name)),
            ),
            None => (
                self.upstream.attempt_timeout,
                "upstream.attempt_timeout".to_owned(),
            ),
        }
    }

    /// Whether exposed names carry their upstream's prefix: with several
    /// upstreams, or with one when `gateway.prefix_single`.
    #[must_use]
    pub fn names_prefixed(&self) -> bool {
        self.upstreams.len() > 1 || self.gateway.prefix_single
    }

    /// What the tools of upstream `name` are prefixed with: `name` and
    /// `gateway.separator` when there are several upstreams (or
    /// `gateway.prefix_single`), else nothing.
    #[must_use]
    pub fn upstream_prefix(&self, name: &str) -> String {
        if self.names_prefixed() {
            format!("{name}{}", self.gateway.separator)
        } else {
            String::new()
        }
    }

    /// The configuration with each `[upstreams.NAME.tools."x"]` moved to
    /// `[tools."NAME__x"]`, as the layers see it.
    #[must_use]
    pub fn with_upstream_tools(mut self) -> Self {
        let mut moved = Vec::new();
        let names: Vec<String> = self.upstreams.keys().cloned().collect();
        for name in names {
            let prefix = self.upstream_prefix(&name);
            if let Some(entry) = self.upstreams.get_mut(&name) {
                moved.extend(
                    std::mem::take(&mut entry.tools)
                        .into_iter()
                        .map(|(tool, config)| (format!("{prefix}{tool}"), config)),
                );
            }
        }
        self.tools.extend(moved);
        self
    }

    /// The configuration of `tool`, if it has one.
    #[must_use]
    pub fn tool(&self, tool: &str) -> Option<&ToolConfig> {
        self.tools.get(tool)
    }
}

/// A section's check, its error's key put under `section` (`max_attempts`
/// becomes `retry.max_attempts`).
fn in_section(section: &str, checked: Result<(), ConfigError>) -> Result<(), ConfigError> {
    checked.map_err(|e| e.in_section(section))
}

fn positive(field: &str, value: Option<Duration>) -> Result<(), ConfigError> {
    match value {
        Some(d) if d.is_zero() => Err(ConfigError::new(field, "must be a positive duration")),
        _ => Ok(()),
    }
}

/// A duration no longer than `max`: some timers add theirs to the clock
/// (hyper's header timer), which overflows past a few hundred billion years.
fn at_most(field: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}

fn within<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(ConfigError::new(
            field,
            format!("must be between {min} and {max}"),
        )),
        _ => Ok(()),
    }
}

fn ordered<T: PartialOrd>(
    low_field: &str,
    low: Option<T>,
    high_field: &str,
    high: Option<T>,
) -> Result<(), ConfigError> {
    match (low, high) {
        (Some(low), Some(high)) if low > high => Err(ConfigError::new(
            high_field,
            format!("must not be less than {low_field}"),
        )),
        _ => Ok(()),
    }
}

impl UpstreamConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("restart_backoff_min", Some(self.restart_backoff_min))?;
        positive("restart_backoff_max", Some(self.restart_backoff_max))?;
        positive("restart_reset_after", Some(self.restart_reset_after))?;
        positive("connect_timeout", Some(self.connect_timeout))?;
        positive("call_timeout", self.call_timeout)?;
        positive("attempt_timeout", Some(self.attempt_timeout))?;
        upstream_http::validate(&self.headers, self.ca_file.as_ref())?;
        if self.protocol_version.is_some() && self.pinned_protocol_version().is_none() {
            return Err(ConfigError::new(
                "protocol_version",
                "is not a protocol version with an initialize handshake: use 2024-11-05, \
                 2025-03-26, 2025-06-18 or 2025-11-25",
            ));
        }
        ordered(
            "restart_backoff_min",
            Some(self.restart_backoff_min),
            "restart_backoff_max",
            Some(self.restart_backoff_max),
        )
    }
}

impl DownstreamConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // A line must at least hold a minimal request; 1 GiB is past any sane message.
        within("max_line_bytes", Some(self.max_line_bytes), 64, 1 << 30)?;
        within("max_body_bytes", Some(self.max_body_bytes), 64, 1 << 30)
    }
}

#[cfg(test)]
mod tests;

/// Whether an optional layer's section (`[bulkhead]`, `[coalesce]`,
/// `[hedge]`) turns it on: present, with `enabled` (its value, when
/// present) not `false`.
pub(crate) fn optional_on(enabled: Option<Option<bool>>) -> bool {
    matches!(enabled, Some(enabled) if enabled != Some(false))
}
