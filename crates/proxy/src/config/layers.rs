//! The layer sections (`[circuit_breaker]`, `[rate_limit]`, `[retry]`,
//! `[loop_guard]`, `[fallback_cache]`, `[observability]`) and `[tools."name"]`:
//! their keys; unset keys keep each layer's own defaults. Checked in
//! [`Config::validate`](super::Config::validate).

use std::time::Duration;

use serde::{Deserialize, Serialize};
// Puts `skip_serializing_if = "Option::is_none"` on every `Option` field, so
// that `check-config --print` leaves unset keys out.
use serde_with::skip_serializing_none;

use super::{FailureClassName, Jitter, LimitMode, Rate, Window};

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
