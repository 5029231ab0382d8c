//! The proxy's configuration: a TOML file with one section per layer, global
//! values and per-tool overrides, overlaid with `TOOLWARDEN_<SECTION>_<KEY>`
//! environment variables.
//!
//! Every key is optional. In the layer sections (`circuit_breaker`,
//! `rate_limit`, `retry`, `loop_guard`, `fallback_cache`, `observability`) an
//! unset key means "the layer's own default", which each layer crate documents
//! next to its builder method; the proxy's own sections (`upstream`,
//! `downstream`, `catalog`) have their defaults written here, next to each key.
//! `toolwarden.example.toml` (shipped next to this crate's `Cargo.toml`) lists
//! every key with a comment.
//!
//! What is checked when the configuration is loaded (so that `toolwarden
//! check-config` catches it): unknown keys (every table denies them), the type
//! of every value, durations are positive, ratios are in range, counts are
//! non-zero, and pairs that bound each other are ordered (`base_delay <=
//! max_delay`, ...). What a layer can only check once it is built (its own
//! cross-field rules) is checked when the stack is built, before the proxy
//! serves anything. Every error names the key (`circuit_breaker.failure_threshold`),
//! and the environment variable when the value came from one.
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
//!     rate_limit = { rate = "10/s", burst = 5 }
//! "#, std::iter::empty()).unwrap();
//! assert_eq!(config.circuit_breaker.failure_threshold, Some(5));
//!
//! let err = Config::from_toml_str("[retry]\nmax_attempts = 0\n", std::iter::empty()).unwrap_err();
//! assert_eq!(err.key(), Some("retry.max_attempts"));
//! ```

mod gateway;
mod layers;
mod listener;
mod load;
mod upstream;
mod upstream_http;
mod values;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toolwarden_core::ConfigError;

pub(crate) use gateway::glob_set;
pub use gateway::{GatewayConfig, OpenUpstreams, UpstreamEntry};
pub use layers::{
    CircuitBreakerConfig, FallbackCacheConfig, LoopGuardConfig, ObservabilityConfig,
    RateLimitConfig, RetryConfig, ToolConfig, ToolLoopGuard, ToolRateLimit, ToolRetry,
};
pub use listener::{HttpConfig, LimitsConfig};
pub(crate) use load::quote_key;
pub use load::{process_env, ConfigFileError, ENV_PREFIX, SECTIONS};
pub use upstream::{SessionMode, UpstreamConfig};
pub use upstream_http::{resolve_headers, HeaderTemplate};
pub use values::{FailureClassName, Jitter, LimitMode, Rate, Window};

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
    pub circuit_breaker: CircuitBreakerConfig,
    /// `RateLimitLayer`.
    pub rate_limit: RateLimitConfig,
    /// `RetryBackoffLayer`.
    pub retry: RetryConfig,
    /// `LoopGuardLayer`.
    pub loop_guard: LoopGuardConfig,
    /// `FallbackCacheLayer`.
    pub fallback_cache: FallbackCacheConfig,
    /// `ObservabilityLayer`.
    pub observability: ObservabilityConfig,
    /// Per-tool overrides, by tool name: `[tools."search_docs"]`.
    pub tools: BTreeMap<String, ToolConfig>,
    /// How the tools of several upstreams are exposed.
    pub gateway: GatewayConfig,
    /// Several upstream servers behind this proxy, by name:
    /// `[upstreams.time]`. Empty: the one upstream is given on the command
    /// line.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstreams: BTreeMap<String, UpstreamEntry>,
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
    /// Checks every value (see the [module docs](self)); the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_section("upstream", self.upstream.validate())?;
        in_section("downstream", self.downstream.validate())?;
        in_section("http", self.http.validate())?;
        in_section("limits", self.limits.validate())?;
        in_section("circuit_breaker", self.circuit_breaker.validate())?;
        in_section("rate_limit", self.rate_limit.validate())?;
        in_section("retry", self.retry.validate())?;
        in_section("loop_guard", self.loop_guard.validate())?;
        in_section("fallback_cache", self.fallback_cache.validate())?;
        in_section("observability", self.observability.validate())?;
        for (name, tool) in &self.tools {
            let section = format!("tools.{}", load::quote_key(name));
            if name.is_empty() {
                return Err(ConfigError::new(section, "a tool name must not be empty"));
            }
            in_section(&section, tool.validate())?;
        }
        in_section("gateway", self.gateway.validate())?;
        for (name, entry) in &self.upstreams {
            let section = format!("upstreams.{}", load::quote_key(name));
            if !gateway::valid_name(name) {
                return Err(ConfigError::new(
                    section,
                    "an upstream name is 1 to 64 letters, digits, `-` or `_`",
                ));
            }
            if name.contains(&self.gateway.separator) {
                return Err(ConfigError::new(
                    section,
                    format!(
                        "an upstream name must not contain gateway.separator ({:?})",
                        self.gateway.separator
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
        Ok(())
    }

    /// What the tools of upstream `name` are prefixed with: `name` and
    /// `gateway.separator` when there are several upstreams (or
    /// `gateway.prefix_single`), else nothing.
    #[must_use]
    pub fn upstream_prefix(&self, name: &str) -> String {
        if self.upstreams.len() > 1 || self.gateway.prefix_single {
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

fn at_least<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    min: T,
) -> Result<(), ConfigError> {
    match value {
        Some(v) if v < min => Err(ConfigError::new(field, format!("must be at least {min}"))),
        _ => Ok(()),
    }
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

/// A share of calls: in (0, 1].
fn ratio(field: &str, value: Option<f64>) -> Result<(), ConfigError> {
    match value {
        Some(r) if !(r.is_finite() && r > 0.0 && r <= 1.0) => Err(ConfigError::new(
            field,
            "must be a ratio greater than 0 and at most 1",
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

fn needs<T, U>(
    field: &str,
    value: &Option<T>,
    other: &str,
    other_value: &Option<U>,
) -> Result<(), ConfigError> {
    if value.is_some() && other_value.is_none() {
        return Err(ConfigError::new(field, format!("needs {other} to be set")));
    }
    Ok(())
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

impl CircuitBreakerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("failure_threshold", self.failure_threshold, 1)?;
        ratio("failure_rate", self.failure_rate)?;
        match self.window {
            Some(Window::Calls(0)) => {
                return Err(ConfigError::new("window", "must be at least 1 call"))
            }
            Some(Window::Time(d)) if d.is_zero() => {
                return Err(ConfigError::new("window", "must be a positive duration"))
            }
            _ => {}
        }
        at_least("minimum_calls", self.minimum_calls, 1)?;
        positive("slow_call_duration", self.slow_call_duration)?;
        ratio("slow_call_rate", self.slow_call_rate)?;
        positive("reset_timeout", self.reset_timeout)?;
        if let Some(m) = self.reset_multiplier {
            if !(m.is_finite() && m >= 1.0) {
                return Err(ConfigError::new(
                    "reset_multiplier",
                    "must be a finite number of at least 1",
                ));
            }
        }
        positive("max_reset_timeout", self.max_reset_timeout)?;
        ordered(
            "reset_timeout",
            self.reset_timeout,
            "max_reset_timeout",
            self.max_reset_timeout,
        )?;
        at_least("half_open_max_calls", self.half_open_max_calls, 1)?;
        at_least("success_threshold", self.success_threshold, 1)?;
        ordered(
            "success_threshold",
            self.success_threshold,
            "half_open_max_calls",
            self.half_open_max_calls,
        )
    }
}

impl RateLimitConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("global_burst", self.global_burst, 1)?;
        needs(
            "global_burst",
            &self.global_burst,
            "global_rate",
            &self.global_rate,
        )?;
        at_least("per_tool_burst", self.per_tool_burst, 1)?;
        needs(
            "per_tool_burst",
            &self.per_tool_burst,
            "per_tool_rate",
            &self.per_tool_rate,
        )?;
        positive("max_wait", self.max_wait)?;
        if self.max_wait.is_some() && self.mode != Some(LimitMode::Wait) {
            return Err(ConfigError::new(
                "max_wait",
                "only applies with mode = \"wait\"",
            ));
        }
        Ok(())
    }
}

impl ToolRateLimit {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("burst", self.burst, 1)?;
        needs("burst", &self.burst, "rate", &self.rate)
    }
}

impl RetryConfig {
    /// The keys that `[tools."name".retry]` can override too, checked alike.
    fn backoff(&self) -> ToolRetry {
        ToolRetry {
            enabled: self.enabled,
            max_attempts: self.max_attempts,
            base_delay: self.base_delay,
            max_delay: self.max_delay,
            deadline: self.deadline,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.backoff().validate()?;
        if self.retry_on.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::new(
                "retry_on",
                "must name at least one failure class (use enabled = false to never retry)",
            ));
        }
        if let Some(r) = self.budget_ratio {
            if !(r.is_finite() && (0.0..=10.0).contains(&r)) {
                return Err(ConfigError::new("budget_ratio", "must be between 0 and 10"));
            }
        }
        within("budget_min_per_sec", self.budget_min_per_sec, 0, 1_000_000)?;
        match self.budget_ttl {
            Some(ttl) if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ttl) => {
                Err(ConfigError::new("budget_ttl", "must be between 1s and 1h"))
            }
            _ => Ok(()),
        }
    }
}

impl ToolRetry {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("max_attempts", self.max_attempts, 1)?;
        positive("base_delay", self.base_delay)?;
        positive("max_delay", self.max_delay)?;
        ordered("base_delay", self.base_delay, "max_delay", self.max_delay)?;
        positive("deadline", self.deadline)
    }
}

impl LoopGuardConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        within("cycle_max_period", self.cycle_max_period, 2, 8)?;
        at_least("cycle_repeats", self.cycle_repeats, 2)?;
        within("window_calls", self.window_calls, 1, 1024)?;
        positive("window_time", self.window_time)?;
        at_least("max_sessions", self.max_sessions, 1)?;
        positive("session_idle_timeout", self.session_idle_timeout)?;
        if let Some(window) = self.window_calls {
            for (field, value) in [
                ("max_failing_repeats", self.max_failing_repeats),
                ("max_repeats", self.max_repeats),
            ] {
                if value.is_some_and(|v| v > window) {
                    return Err(ConfigError::new(
                        field,
                        format!(
                            "must not exceed window_calls ({window}): older calls are forgotten"
                        ),
                    ));
                }
            }
        }
        for (field, list) in [
            ("exempt_tools", &self.exempt_tools),
            ("polling_tools", &self.polling_tools),
        ] {
            if list.iter().flatten().any(String::is_empty) {
                return Err(ConfigError::new(field, "a tool name must not be empty"));
            }
        }
        Ok(())
    }
}

impl FallbackCacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("max_staleness", self.max_staleness)?;
        positive("fresh_ttl", self.fresh_ttl)?;
        ordered(
            "fresh_ttl",
            self.fresh_ttl,
            "max_staleness",
            self.max_staleness,
        )?;
        at_least("max_entries", self.max_entries, 1)?;
        at_least("max_bytes", self.max_bytes, 1)
    }
}

impl ObservabilityConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("max_tool_labels", self.max_tool_labels, 1)?;
        at_least("max_method_labels", self.max_method_labels, 1)?;
        at_least("recent_window", self.recent_window, 1)
    }
}

impl ToolConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(cb) = &self.circuit_breaker {
            in_section("circuit_breaker", cb.validate())?;
        }
        if let Some(rl) = &self.rate_limit {
            in_section("rate_limit", rl.validate())?;
        }
        if let Some(retry) = &self.retry {
            in_section("retry", retry.validate())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
