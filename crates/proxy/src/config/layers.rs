//! `[tools."name"]`: what the proxy configures for one tool. The layer
//! sections themselves (`[circuit_breaker]`, `[rate_limit]`, `[retry]`,
//! `[loop_guard]`, `[fallback_cache]`, `[observability]`, `[hedge]`) and a tool's layer
//! tables are the layer crates' settings types, their keys documented there.

use serde::{Deserialize, Serialize};
// Puts `skip_serializing_if = "Option::is_none"` on every `Option` field, so
// that `check-config --print` leaves unset keys out.
use serde_with::skip_serializing_none;
use toolwarden::bulkhead::BulkheadToolSettings;
use toolwarden::circuit_breaker::CircuitBreakerToolSettings;
use toolwarden::coalesce::CoalesceToolSettings;
use toolwarden::hedge::HedgeToolSettings;
use toolwarden::loop_guard::LoopGuardToolSettings;
use toolwarden::rate_limit::RateLimitToolSettings;
use toolwarden::retry::RetryToolSettings;

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
    /// The tool's own breaker policy ([`CircuitBreakerToolSettings`]).
    pub circuit_breaker: Option<CircuitBreakerToolSettings>,
    /// The tool's own quota ([`RateLimitToolSettings`]).
    pub rate_limit: Option<RateLimitToolSettings>,
    /// The tool's own backoff ([`RetryToolSettings`]).
    pub retry: Option<RetryToolSettings>,
    /// The tool's own loop limits ([`LoopGuardToolSettings`]).
    pub loop_guard: Option<LoopGuardToolSettings>,
    /// The tool's own cap on calls in flight ([`BulkheadToolSettings`]);
    /// needs the `[bulkhead]` section (the layer is off without it).
    pub bulkhead: Option<BulkheadToolSettings>,
    /// Whether the tool's identical calls share one call
    /// ([`CoalesceToolSettings`]); needs the `[coalesce]` section.
    pub coalesce: Option<CoalesceToolSettings>,
    /// The tool's own hedging ([`HedgeToolSettings`]: `safe_to_hedge`,
    /// `delay`, `percentile`, `min_samples`); needs the `[hedge]` section
    /// (the layer is off without it).
    pub hedge: Option<HedgeToolSettings>,
}
