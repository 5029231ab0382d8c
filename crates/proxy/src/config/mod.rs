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

mod listener;
mod load;
mod upstream_http;
mod values;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
// Puts `skip_serializing_if = "Option::is_none"` on every `Option` field, so
// that `check-config --print` leaves unset keys out.
use serde_with::skip_serializing_none;
use toolwarden_core::ConfigError;

pub use listener::{HttpConfig, LimitsConfig};
pub(crate) use load::quote_key;
pub use load::{process_env, ConfigFileError, ENV_PREFIX, SECTIONS};
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
}

/// `[upstream]`: how the proxy keeps its connection to the MCP server.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The first wait before reconnecting (restarting the child) after the
    /// upstream went away; doubled after each failed attempt. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_min: Duration,
    /// The longest wait between reconnection attempts. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// An upstream that stayed up this long is restarted with
    /// `restart_backoff_min` again when it goes away. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub restart_reset_after: Duration,
    /// The bound on starting the child (or reaching the URL) and completing
    /// the `initialize` handshake. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// rmcp's timeout of every request sent upstream: past it the request
    /// is cancelled upstream (`notifications/cancelled`) and fails as a
    /// timeout. Default: none (put `retry.deadline` above it instead).
    #[serde(with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    /// The bound on one attempt of a `tools/call` inside the tool stack
    /// (below the retry layer, so each retry gets its own): past it the
    /// attempt is cancelled upstream, fails as a timeout and counts for the
    /// circuit breaker. At most `retry.deadline`; longer than
    /// `circuit_breaker.slow_call_duration`. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Certificates (PEM, one or more) trusted for an `https://` upstream
    /// besides the system's roots, e.g. a private CA. `--upstream-ca-file`
    /// overrides it. Default: none (the system's roots only).
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a connection to an HTTP(S) upstream is kept open, idle,
    /// for the next request (each request over a new connection costs a
    /// TCP, and for `https://` a TLS, handshake). Below the server's own
    /// keep-alive timeout (Node's is 5 s), so that the server never closes a
    /// connection as the proxy reuses it; `0s` opens a new connection for
    /// every request. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub http_keep_alive: Duration,
    /// Headers sent with every request to an HTTP(S) upstream, e.g.
    /// `{ Authorization = "Bearer ${MCP_TOKEN}" }`: `${VAR}` is read from the
    /// environment, `${file:/path}` (or a whole value `@file:/path`) from a
    /// file; the values are never logged or shown. Default: none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderTemplate>,
    /// How many upstream connections the proxy keeps: `"shared"` (one, for
    /// every client) or `"per_session"` (one per downstream session, started
    /// by its `initialize` and closed when it ends; for servers that keep
    /// state per connection). Default `"shared"`. See [`SessionMode`].
    pub session_mode: SessionMode,
}

/// `upstream.session_mode`: which downstream sessions share an upstream
/// connection.
///
/// - `Shared` (the default): one connection (one child process, one HTTP
///   session) serves every client. Cheapest, and right for servers whose
///   tools keep no state between calls, which is most of them. The server's
///   requests (sampling, elicitation, roots) still reach only the client
///   whose call caused them.
/// - `PerSession`: each downstream session (each HTTP `mcp-session-id`; the
///   one stdio client) gets its own upstream connection, started by its
///   `initialize` and closed when the session ends (`DELETE`, idle timeout,
///   the client going away). For servers that keep state per connection (a
///   browser, a shell, a database transaction, `resources/subscribe`), so
///   that one client never sees another's. The number of connections is
///   bounded by `http.max_sessions`. A request served without a session
///   (2026-07-28 clients) is refused with `-32600`: it has no connection of
///   its own. The tool stack stays one: every session's calls share the
///   circuit breakers, quotas, retry budget and cache, as they share the
///   server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// One upstream connection for every client.
    #[default]
    Shared,
    /// One upstream connection per downstream session.
    PerSession,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(10),
            restart_reset_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            call_timeout: None,
            attempt_timeout: Duration::from_secs(10),
            ca_file: None,
            http_keep_alive: Duration::from_secs(2),
            headers: BTreeMap::new(),
            session_mode: SessionMode::Shared,
        }
    }
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

/// `[circuit_breaker]`, and `[tools."name".circuit_breaker]` for one tool.
/// Unset keys keep the layer's defaults.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// `false` leaves the layer out of the stack (for one tool: never trips).
    pub enabled: Option<bool>,
    /// Consecutive counted failures that open the circuit (≥ 1).
    pub failure_threshold: Option<u32>,
    /// Share of counted failures in the window that opens the circuit, in (0, 1].
    pub failure_rate: Option<f64>,
    /// The sliding window the rates are computed over: a number of calls
    /// (`100`) or a duration (`"60s"`).
    pub window: Option<Window>,
    /// Calls the window must hold before a rate can open the circuit (≥ 1).
    pub minimum_calls: Option<u32>,
    /// A call slower than this counts as slow.
    #[serde(with = "humantime_serde")]
    pub slow_call_duration: Option<Duration>,
    /// Share of slow calls in the window that opens the circuit, in (0, 1].
    pub slow_call_rate: Option<f64>,
    /// How long the circuit stays open before the first probe.
    #[serde(with = "humantime_serde")]
    pub reset_timeout: Option<Duration>,
    /// Each reopening multiplies the open time by this (≥ 1; 1 = constant).
    pub reset_multiplier: Option<f64>,
    /// The cap on the open time (≥ `reset_timeout`).
    #[serde(with = "humantime_serde")]
    pub max_reset_timeout: Option<Duration>,
    /// Probes let through while half-open (≥ 1).
    pub half_open_max_calls: Option<u32>,
    /// Successful probes that close the circuit (≥ 1, ≤ `half_open_max_calls`).
    pub success_threshold: Option<u32>,
}

/// `[rate_limit]`: GCRA quotas, global and per tool. Unset keys keep the
/// layer's defaults (no quota at all).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `false` leaves the layer out of the stack.
    pub enabled: Option<bool>,
    /// The quota shared by every call: `"100/s"`, `"600/min"`, `"5/100ms"`,
    /// or a bare number of calls per second.
    pub global_rate: Option<Rate>,
    /// Calls allowed at once above `global_rate` (≥ 1). Needs `global_rate`.
    pub global_burst: Option<u32>,
    /// The quota of each tool without a quota of its own.
    pub per_tool_rate: Option<Rate>,
    /// The burst of `per_tool_rate` (≥ 1). Needs `per_tool_rate`.
    pub per_tool_burst: Option<u32>,
    /// `"reject"` (answer at once with a rate-limited result) or `"wait"`
    /// (delay the call up to `max_wait`).
    pub mode: Option<LimitMode>,
    /// The longest a call waits with `mode = "wait"`. Only with that mode.
    #[serde(with = "humantime_serde")]
    pub max_wait: Option<Duration>,
}

/// `[tools."name".rate_limit]`: one tool's own quota.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolRateLimit {
    /// The tool's quota, replacing `rate_limit.per_tool_rate` for it.
    pub rate: Option<Rate>,
    /// Its burst (≥ 1). Needs `rate`.
    pub burst: Option<u32>,
}

/// `[retry]`: exponential backoff with jitter and a retry budget. Unset keys
/// keep the layer's defaults.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// `false` leaves the layer out of the stack.
    pub enabled: Option<bool>,
    /// Attempts in total, the first included (≥ 1; 1 = never retry).
    pub max_attempts: Option<u32>,
    /// The backoff before the first retry.
    #[serde(with = "humantime_serde")]
    pub base_delay: Option<Duration>,
    /// The cap on one backoff (≥ `base_delay`).
    #[serde(with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    /// `"none"`, `"full"`, `"equal"` or `"decorrelated"`.
    pub jitter: Option<Jitter>,
    /// The bound on a call with all its retries and backoffs.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// The failure classes retried: any of `"transient"`, `"server"`, `"client"` (not empty).
    pub retry_on: Option<Vec<FailureClassName>>,
    /// `false` turns the retry budget off (not recommended: agents cause retry storms).
    pub budget_enabled: Option<bool>,
    /// Retries allowed per request over the budget's window, in [0, 10].
    pub budget_ratio: Option<f64>,
    /// Retries allowed per second whatever the traffic (≤ 1 000 000).
    pub budget_min_per_sec: Option<u32>,
    /// How long a request counts in the budget, in [1s, 1h].
    #[serde(with = "humantime_serde")]
    pub budget_ttl: Option<Duration>,
}

/// `[tools."name".retry]`: one tool's own backoff.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolRetry {
    /// `false`: never retry this tool.
    pub enabled: Option<bool>,
    /// Attempts in total (≥ 1).
    pub max_attempts: Option<u32>,
    /// The backoff before the first retry.
    #[serde(with = "humantime_serde")]
    pub base_delay: Option<Duration>,
    /// The cap on one backoff (≥ `base_delay`).
    #[serde(with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    /// The bound on a call with all its retries.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
}

/// `[loop_guard]`: stops agents that repeat a call. Unset keys keep the
/// layer's defaults.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopGuardConfig {
    /// `false` leaves the layer out of the stack.
    pub enabled: Option<bool>,
    /// Identical calls that failed this many times in a row block the next
    /// one; `0` turns the rule off.
    pub max_failing_repeats: Option<u32>,
    /// Identical calls (failing or not) past this many are blocked; `0` turns
    /// the rule off.
    pub max_repeats: Option<u32>,
    /// Whether short cycles of calls (A, B, A, B, ...) are blocked.
    pub cycles: Option<bool>,
    /// The longest cycle looked for, in [2, 8].
    pub cycle_max_period: Option<u32>,
    /// Rounds of a cycle that block the next call (≥ 2).
    pub cycle_repeats: Option<u32>,
    /// Calls remembered per session, in [1, 1024].
    pub window_calls: Option<u32>,
    /// How long a call is remembered.
    #[serde(with = "humantime_serde")]
    pub window_time: Option<Duration>,
    /// Sessions tracked at once (≥ 1).
    pub max_sessions: Option<u32>,
    /// A session idle this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub session_idle_timeout: Option<Duration>,
    /// Tools never guarded (never blocked, never recorded).
    pub exempt_tools: Option<Vec<String>>,
    /// Tools polled on purpose: identical successful calls are never a loop,
    /// identical failing calls still are.
    pub polling_tools: Option<Vec<String>>,
}

/// `[tools."name".loop_guard]`: one tool's own limits.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolLoopGuard {
    /// Never guard this tool.
    pub exempt: Option<bool>,
    /// The tool is polled on purpose (see `loop_guard.polling_tools`).
    pub polling: Option<bool>,
    /// As `loop_guard.max_failing_repeats`, for this tool (`0` = off).
    pub max_failing_repeats: Option<u32>,
    /// As `loop_guard.max_repeats`, for this tool (`0` = off).
    pub max_repeats: Option<u32>,
    /// Whether this tool's calls take part in cycle detection.
    pub cycles: Option<bool>,
}

/// `[fallback_cache]`: the last good result, served stale when a tool fails.
/// Unset keys keep the layer's defaults.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackCacheConfig {
    /// `false` leaves the layer out of the stack.
    pub enabled: Option<bool>,
    /// The oldest result that may still be served on failure.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Option<Duration>,
    /// A result younger than this is served without calling the tool.
    #[serde(with = "humantime_serde")]
    pub fresh_ttl: Option<Duration>,
    /// Results kept (≥ 1).
    pub max_entries: Option<u32>,
    /// Bytes of results kept (≥ 1).
    pub max_bytes: Option<u64>,
    /// Answer a failure with nothing cached by a structured error result
    /// (what failed, when to retry, alternatives) instead of the raw error.
    pub degrade: Option<bool>,
    /// Add a note to stale results saying how old they are.
    pub stale_note: Option<bool>,
    /// Alternative tools suggested in a degraded answer (`0` = none).
    pub alternatives: Option<u32>,
}

/// `[observability]`: metrics and tracing. Unset keys keep the layer's defaults.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// `false` leaves the layer out of the stack.
    pub enabled: Option<bool>,
    /// Distinct `tool` label values before the rest share one (≥ 1).
    pub max_tool_labels: Option<u32>,
    /// Distinct `method` label values before the rest share one (≥ 1).
    pub max_method_labels: Option<u32>,
    /// Recent calls kept per tool for the stats snapshot (≥ 1).
    pub recent_window: Option<u32>,
}

/// `[tools."name"]`: everything configured for one tool.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolConfig {
    /// The tool may be called again after a failure (retried), whatever its
    /// annotations say.
    pub safe_to_repeat: Option<bool>,
    /// The tool's results may be cached and served stale.
    pub cacheable: Option<bool>,
    /// The tool's own breaker settings (every `[circuit_breaker]` key).
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// The tool's own quota.
    pub rate_limit: Option<ToolRateLimit>,
    /// The tool's own backoff.
    pub retry: Option<ToolRetry>,
    /// The tool's own loop limits.
    pub loop_guard: Option<ToolLoopGuard>,
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
        Ok(())
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
