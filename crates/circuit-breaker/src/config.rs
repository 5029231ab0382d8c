//! Configuration of [`CircuitBreakerLayer`](crate::CircuitBreakerLayer): the
//! builder, its defaults and its validation.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Bounds, ConfigError, Events, KeyBy, McpClassifier};

use crate::layer::CircuitBreakerLayer;
use crate::registry::CircuitRegistry;
use crate::sync::StateSync;

/// The largest count window: outcomes are kept one byte each, and the
/// running totals of a window must fit in `u32`.
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;

/// The largest number of buckets of a [`TimeWindow`].
pub const MAX_TIME_BUCKETS: u32 = 1_000;

/// A time-based sliding window: the calls of the last `duration`, kept in
/// `buckets` buckets of `duration / buckets` each (the oldest bucket leaves
/// the window whole, so the window spans between `duration - duration/buckets`
/// and `duration`).
///
/// ```
/// use std::time::Duration;
/// use toolwarden_circuit_breaker::TimeWindow;
/// let w = TimeWindow::new(Duration::from_secs(60), 12); // 5-second buckets
/// assert_eq!(w.bucket_width(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// How far back the window reaches.
    pub duration: Duration,
    /// How many buckets it is kept in.
    pub buckets: u32,
}

impl TimeWindow {
    /// A window over the last `duration`, in `buckets` buckets.
    #[must_use]
    pub fn new(duration: Duration, buckets: u32) -> Self {
        TimeWindow { duration, buckets }
    }

    /// The width of one bucket.
    #[must_use]
    pub fn bucket_width(&self) -> Duration {
        self.duration / self.buckets.max(1)
    }
}

/// The validated configuration every breaker of one registry shares.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) failure_threshold: Option<u32>,
    pub(crate) failure_rate_threshold: Option<f64>,
    pub(crate) count_window: Option<u32>,
    pub(crate) time_window: Option<TimeWindow>,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) minimum_calls: u32,
    pub(crate) reset_timeout: Duration,
    pub(crate) reset_multiplier: f64,
    pub(crate) max_reset_timeout: Duration,
    pub(crate) jitter: f64,
    pub(crate) half_open_max_calls: u32,
    pub(crate) success_threshold: u32,
    pub(crate) probe_timeout: Duration,
    pub(crate) key_by: KeyBy,
    pub(crate) bounds: Bounds,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "circuit_breaker".into(),
            failure_threshold: Some(5),
            failure_rate_threshold: Some(0.5),
            count_window: Some(20),
            time_window: None,
            slow_call_duration: None,
            slow_call_rate_threshold: 1.0,
            minimum_calls: 5,
            reset_timeout: Duration::from_secs(30),
            reset_multiplier: 2.0,
            max_reset_timeout: Duration::from_secs(300),
            jitter: 0.1,
            half_open_max_calls: 1,
            success_threshold: 1,
            probe_timeout: Duration::from_secs(30),
            key_by: KeyBy::Tool,
            bounds: Bounds::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("failure_threshold", &self.failure_threshold)
            .field("failure_rate_threshold", &self.failure_rate_threshold)
            .field("count_window", &self.count_window)
            .field("time_window", &self.time_window)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("slow_call_rate_threshold", &self.slow_call_rate_threshold)
            .field("minimum_calls", &self.minimum_calls)
            .field("reset_timeout", &self.reset_timeout)
            .field("reset_multiplier", &self.reset_multiplier)
            .field("max_reset_timeout", &self.max_reset_timeout)
            .field("jitter", &self.jitter)
            .field("half_open_max_calls", &self.half_open_max_calls)
            .field("success_threshold", &self.success_threshold)
            .field("probe_timeout", &self.probe_timeout)
            .field("key_by", &self.key_by)
            .field("bounds", &self.bounds)
            .finish()
    }
}

fn rate_ok(rate: f64) -> bool {
    rate.is_finite() && rate > 0.0 && rate <= 1.0
}

impl Config {
    /// Validates the whole configuration: the policy, the registry-wide
    /// settings, and the idle timeout against this policy's open periods.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        self.validate_policy()?;
        self.bounds.validate().map_err(|e| e.in_section("bounds"))?;
        self.check_idle_timeout("max_reset_timeout")
    }

    /// This configuration with the trip, reset and half-open knobs of
    /// `policy` (the registry-wide settings stay this one's).
    pub(crate) fn with_policy_of(&self, policy: &Config) -> Config {
        Config {
            name: Arc::clone(&self.name),
            key_by: self.key_by.clone(),
            bounds: self.bounds,
            ..policy.clone()
        }
    }

    /// Validates the trip, reset and half-open knobs.
    fn validate_policy(&self) -> Result<(), ConfigError> {
        if self.failure_threshold == Some(0) {
            return Err(ConfigError::new(
                "failure_threshold",
                "must be at least 1 (or None to disable)",
            ));
        }
        if let Some(rate) = self.failure_rate_threshold {
            if !rate_ok(rate) {
                return Err(ConfigError::new(
                    "failure_rate_threshold",
                    "must be in (0, 1]",
                ));
            }
        }
        if let Some(size) = self.count_window {
            if size == 0 || size > MAX_COUNT_WINDOW {
                return Err(ConfigError::new(
                    "count_window",
                    format!("must be between 1 and {MAX_COUNT_WINDOW} calls (or None to disable)"),
                ));
            }
        }
        if let Some(w) = self.time_window {
            if w.buckets == 0 || w.buckets > MAX_TIME_BUCKETS {
                return Err(ConfigError::new(
                    "time_window.buckets",
                    format!("must be between 1 and {MAX_TIME_BUCKETS}"),
                ));
            }
            if w.bucket_width() < Duration::from_millis(1) {
                return Err(ConfigError::new(
                    "time_window.duration",
                    "must give buckets of at least 1 ms (duration / buckets)",
                ));
            }
        }
        if self.slow_call_duration == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                "slow_call_duration",
                "must be positive (or None to disable)",
            ));
        }
        if !rate_ok(self.slow_call_rate_threshold) {
            return Err(ConfigError::new(
                "slow_call_rate_threshold",
                "must be in (0, 1]",
            ));
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        let has_window = self.count_window.is_some() || self.time_window.is_some();
        if !has_window
            && (self.failure_rate_threshold.is_some() || self.slow_call_duration.is_some())
        {
            return Err(ConfigError::new(
                "count_window, time_window",
                "a failure-rate or slow-call policy needs a count window or a time window",
            ));
        }
        if self.failure_threshold.is_none()
            && !(has_window
                && (self.failure_rate_threshold.is_some() || self.slow_call_duration.is_some()))
        {
            return Err(ConfigError::new(
                "failure_threshold, failure_rate_threshold, slow_call_duration",
                "no trip policy is enabled: the breaker could never open",
            ));
        }
        if let Some(size) = self.count_window {
            let rate_policy =
                self.failure_rate_threshold.is_some() || self.slow_call_duration.is_some();
            if rate_policy && self.minimum_calls > size && self.time_window.is_none() {
                return Err(ConfigError::new(
                    "minimum_calls, count_window",
                    "minimum_calls is larger than the count window: the rate policies could never trip",
                ));
            }
        }
        if self.reset_timeout.is_zero() {
            return Err(ConfigError::new("reset_timeout", "must be positive"));
        }
        if !(self.reset_multiplier.is_finite() && self.reset_multiplier >= 1.0) {
            return Err(ConfigError::new(
                "reset_multiplier",
                "must be a finite number >= 1",
            ));
        }
        if self.max_reset_timeout < self.reset_timeout {
            return Err(ConfigError::new(
                "max_reset_timeout",
                "must be at least reset_timeout",
            ));
        }
        if !(self.jitter.is_finite() && (0.0..1.0).contains(&self.jitter)) {
            return Err(ConfigError::new("jitter", "must be in [0, 1)"));
        }
        if self.half_open_max_calls == 0 {
            return Err(ConfigError::new(
                "half_open_max_calls",
                "must be at least 1",
            ));
        }
        if self.success_threshold == 0 {
            return Err(ConfigError::new("success_threshold", "must be at least 1"));
        }
        if self.probe_timeout.is_zero() {
            return Err(ConfigError::new("probe_timeout", "must be positive"));
        }
        Ok(())
    }

    /// An open circuit untouched for an idle period is evicted and comes
    /// back closed: the longest open period of this policy must fit inside
    /// one. `max_reset_field` names this policy's `max_reset_timeout`.
    fn check_idle_timeout(&self, max_reset_field: &str) -> Result<(), ConfigError> {
        if let Some(idle) = self.bounds.idle_timeout {
            // Saturating: `mul_f64` panics past `Duration::MAX`.
            // Saturating: `mul_f64` panics past `Duration::MAX`.
            let longest = Duration::try_from_secs_f64(
                self.max_reset_timeout.as_secs_f64() * (1.0 + self.jitter),
            )
            .unwrap_or(Duration::MAX);
            if idle <= longest {
                return Err(ConfigError::new(
                    format!("bounds.idle_timeout, {max_reset_field}"),
                    "idle_timeout must be longer than the longest open period (max_reset_timeout plus jitter), \
                     or an open circuit could be evicted and forgotten",
                ));
            }
        }
        Ok(())
    }

    /// Whether a call's start time must be taken (slow calls are tracked).
    pub(crate) fn tracks_slow_calls(&self) -> bool {
        self.slow_call_duration.is_some()
    }
}

/// Builds a [`CircuitBreakerLayer`]; every knob has a documented default,
/// and [`build`](Self::build) refuses a bad value naming its field.
///
/// The trip policies combine: the circuit opens when **any** enabled policy
/// trips, and only once `minimum_calls` calls were recorded (in the window,
/// for the rate policies; since the circuit last closed, for the consecutive
/// policy). Only failures the classifier counts
/// ([`Outcome::is_counted_failure`](toolwarden_core::Outcome::is_counted_failure):
/// `Transient` or `Server`, not a rejection by another toolwarden layer)
/// that may have reached the tool trip it; `Client` failures, rejections and
/// failures before sending (`Outcome::before_sent`: connection refused, an
/// upstream that is not connected) are recorded nowhere but in the
/// snapshot's totals and recent errors.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_circuit_breaker::{CircuitBreakerLayer, TimeWindow};
///
/// let layer = CircuitBreakerLayer::builder()
///     .failure_threshold(None)                              // no consecutive policy
///     .failure_rate_threshold(0.5)                          // 50 % of ...
///     .count_window(100)                                    // ... the last 100 calls
///     .time_window(TimeWindow::new(Duration::from_secs(60), 12)) // or of the last minute
///     .slow_call_duration(Duration::from_secs(10))          // a call of 10 s or more is slow
///     .slow_call_rate_threshold(0.8)
///     .minimum_calls(20)
///     .reset_timeout(Duration::from_secs(15))
///     .build()
///     .unwrap();
/// # let _ = layer;
///
/// let err = CircuitBreakerLayer::builder().half_open_max_calls(0).build().unwrap_err();
/// assert_eq!(err.field(), "half_open_max_calls");
/// ```
pub struct CircuitBreakerBuilder<C = McpClassifier> {
    config: Config,
    events: Events,
    sync: Option<Arc<dyn StateSync>>,
    classifier: C,
    tool_overrides: Vec<ToolOverride>,
}

/// A closure given to [`CircuitBreakerBuilder::tool`].
type Configure = Box<dyn FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder + Send>;

/// One call of [`CircuitBreakerBuilder::tool`], applied at `build`.
struct ToolOverride {
    tool: String,
    configure: Configure,
}

impl Default for CircuitBreakerBuilder<McpClassifier> {
    fn default() -> Self {
        CircuitBreakerBuilder {
            config: Config::default(),
            events: Events::new(),
            sync: None,
            classifier: McpClassifier::new(),
            tool_overrides: Vec::new(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for CircuitBreakerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tools: Vec<&str> = self
            .tool_overrides
            .iter()
            .map(|o| o.tool.as_str())
            .collect();
        f.debug_struct("CircuitBreakerBuilder")
            .field("config", &self.config)
            .field("events", &self.events)
            .field("sync", &self.sync.is_some())
            .field("classifier", &self.classifier)
            .field("tool_overrides", &tools)
            .finish()
    }
}

impl CircuitBreakerBuilder<McpClassifier> {
    /// A builder with every default.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<C> CircuitBreakerBuilder<C> {
    /// The registry's name, shown in snapshots (one registry per layer, so
    /// name it after the upstream when there are several). Default
    /// `"circuit_breaker"`.
    #[must_use]
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Consecutive counted failures that open the circuit; `None` disables
    /// the policy. Default `Some(5)`.
    #[must_use]
    pub fn failure_threshold(mut self, failures: impl Into<Option<u32>>) -> Self {
        self.config.failure_threshold = failures.into();
        self
    }

    /// The failure rate (0–1] at or above which the circuit opens, over each
    /// enabled window; `None` disables the policy. Default `Some(0.5)`.
    /// `build` refuses anything outside (0, 1], NaN and infinities included.
    #[must_use]
    pub fn failure_rate_threshold(mut self, rate: impl Into<Option<f64>>) -> Self {
        self.config.failure_rate_threshold = rate.into();
        self
    }

    /// The count-based window: exactly the last `calls` recorded calls
    /// (at most [`MAX_COUNT_WINDOW`]); `None` disables it. Default `Some(20)`.
    #[must_use]
    pub fn count_window(mut self, calls: impl Into<Option<u32>>) -> Self {
        self.config.count_window = calls.into();
        self
    }

    /// The time-based window; `None` disables it. Default `None`. `build`
    /// refuses 0 or more than [`MAX_TIME_BUCKETS`] buckets and buckets
    /// narrower than 1 ms; any longer duration is accepted, up to
    /// `Duration::MAX` (a window that never forgets).
    #[must_use]
    pub fn time_window(mut self, window: impl Into<Option<TimeWindow>>) -> Self {
        self.config.time_window = window.into();
        self
    }

    /// A call that takes at least this long is slow; `None` tracks no slow
    /// calls. Default `None`. A slow probe reopens a half-open circuit.
    /// Must be positive; any longer value is accepted, up to `Duration::MAX`.
    #[must_use]
    pub fn slow_call_duration(mut self, duration: impl Into<Option<Duration>>) -> Self {
        self.config.slow_call_duration = duration.into();
        self
    }

    /// The slow-call rate (0–1] at or above which the circuit opens, over
    /// each enabled window (used when `slow_call_duration` is set).
    /// Default `1.0` (every call in the window slow). `build` refuses
    /// anything outside (0, 1], NaN and infinities included.
    #[must_use]
    pub fn slow_call_rate_threshold(mut self, rate: f64) -> Self {
        self.config.slow_call_rate_threshold = rate;
        self
    }

    /// The number of recorded calls below which no policy trips. Default `5`.
    #[must_use]
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// How long the circuit stays open the first time before it lets a
    /// probe through. Default 30 s. Must be positive; any longer value is
    /// accepted, up to `Duration::MAX` (deadlines saturate: a circuit open
    /// that long stays open until closed by hand).
    #[must_use]
    pub fn reset_timeout(mut self, timeout: Duration) -> Self {
        self.config.reset_timeout = timeout;
        self
    }

    /// Each consecutive re-open (a failed probe) multiplies the open period
    /// by this; it returns to `reset_timeout` after a clean close. Default `2.0`.
    /// Must be a finite number >= 1 (`build` refuses NaN, infinities and
    /// smaller values); the growth saturates at `max_reset_timeout`, however
    /// large the multiplier.
    #[must_use]
    pub fn reset_multiplier(mut self, multiplier: f64) -> Self {
        self.config.reset_multiplier = multiplier;
        self
    }

    /// The longest open period. Default 300 s. Must be at least
    /// `reset_timeout`; any longer value is accepted, up to `Duration::MAX`
    /// (with jitter, open periods are still capped at it, and the check
    /// against `bounds.idle_timeout` saturates).
    #[must_use]
    pub fn max_reset_timeout(mut self, timeout: Duration) -> Self {
        self.config.max_reset_timeout = timeout;
        self
    }

    /// Random spread of each open period, as a fraction: the period is
    /// multiplied by a uniform factor in `[1 - jitter, 1 + jitter]` (then
    /// capped at `max_reset_timeout`), so replicas do not probe in step.
    /// In `[0, 1)`. Default `0.1`. `build` refuses anything else, NaN and
    /// infinities included.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.config.jitter = jitter;
        self
    }

    /// Probes a half-open circuit admits at once. Default `1`.
    #[must_use]
    pub fn half_open_max_calls(mut self, calls: u32) -> Self {
        self.config.half_open_max_calls = calls;
        self
    }

    /// Successful probes that close a half-open circuit (any counted failure
    /// reopens it). Default `1`.
    #[must_use]
    pub fn success_threshold(mut self, successes: u32) -> Self {
        self.config.success_threshold = successes;
        self
    }

    /// How long a half-open probe may take before it counts as a failed
    /// probe. Default 30 s; must be positive (any longer value, up to
    /// `Duration::MAX`, is accepted: effectively no timeout).
    ///
    /// A probe that hangs (nothing below the breaker times it out) would
    /// otherwise hold its half-open place forever, and the circuit with it.
    /// Once a probe has been in flight this long without an outcome, it
    /// counts as a failure (a `timeout`, in the totals and recent errors):
    /// the circuit reopens with the next open period, counted from the
    /// probe's deadline, and every probe's place is released; an outcome
    /// that comes later counts for nothing. This needs no timer and does
    /// not rely on the probe's future being polled: the expired probe is
    /// noticed by the next call to the key, or when its state is read
    /// ([`CircuitRegistry::state`](crate::CircuitRegistry::state), snapshots,
    /// [`CircuitView`](toolwarden_core::CircuitView)).
    ///
    /// The probe's own call is not cancelled: put a timeout below the
    /// breaker (`tower::timeout`) to bound the call itself.
    #[must_use]
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.config.probe_timeout = timeout;
        self
    }

    /// What a breaker is kept per. Default [`KeyBy::Tool`].
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.config.key_by = key_by;
        self
    }

    /// The bounds of the keyed breakers. Default [`Bounds::default`]
    /// (10 000 keys, then one shared overflow breaker; keys idle for 10
    /// minutes evicted). The idle timeout must exceed the longest open period
    /// (`max_reset_timeout` plus jitter, saturating at `Duration::MAX`, so
    /// with a `max_reset_timeout` that long only `idle_timeout(None)` fits).
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.config.bounds = bounds;
        self
    }

    /// Where state transitions are reported. Default: nowhere.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Where local state transitions are pushed for other replicas (see
    /// [`StateSync`]). Default: nowhere.
    #[must_use]
    pub fn sync(mut self, sync: Arc<dyn StateSync>) -> Self {
        self.sync = Some(sync);
        self
    }

    /// Replaces the classifier. Default [`McpClassifier`].
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        CircuitBreakerBuilder {
            config: self.config,
            events: self.events,
            sync: self.sync,
            classifier,
            tool_overrides: self.tool_overrides,
        }
    }

    /// Gives the breakers of `tool` their own trip, reset and half-open
    /// policy. Default: no overrides (every breaker uses this builder's).
    ///
    /// At [`build`](Self::build), `configure` receives a fresh builder
    /// carrying this builder's final policy values (so the order of the
    /// calls does not matter), and the policy knobs of the builder it
    /// returns become the tool's: `failure_threshold`,
    /// `failure_rate_threshold`, `count_window`, `time_window`,
    /// `slow_call_duration`, `slow_call_rate_threshold`, `minimum_calls`,
    /// `reset_timeout`, `reset_multiplier`, `max_reset_timeout`, `jitter`,
    /// `half_open_max_calls`, `success_threshold` and `probe_timeout`. The registry-wide
    /// settings always come from this builder: `name`, `key_by`, `bounds`,
    /// `events`, `sync` and the classifier; setting them inside `configure`
    /// has no effect. Calling `tool` again for the same tool applies both
    /// closures, in order.
    ///
    /// The override applies to every key whose tool is `tool`: the key
    /// `tool` with [`KeyBy::Tool`], every `session/tool` with
    /// [`KeyBy::SessionTool`]. The policy is chosen once, when a key's
    /// breaker is created, so it costs nothing per call. Keys past the
    /// bound share the overflow breaker, which keeps this builder's policy.
    ///
    /// `build` validates each tool's policy like this builder's, the error
    /// naming `tools.<tool>.<field>`; it also checks that `bounds.idle_timeout`
    /// outlasts each tool's longest open period. With [`KeyBy::Server`] or
    /// [`KeyBy::Custom`] keys name no tool, so `build` refuses overrides,
    /// naming `key_by`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use tower::{Layer, ServiceExt};
    /// use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}};
    /// use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
    ///
    /// let layer = CircuitBreakerLayer::builder()
    ///     .failure_threshold(5)
    ///     // A tool that must stop being called quickly.
    ///     .tool("delete_repo", |b| b.failure_threshold(1).minimum_calls(1))
    ///     .build()
    ///     .unwrap();
    /// let mock = MockMcp::new()
    ///     .default_step("delete_repo", Step::tool_error("Error executing tool delete_repo: boom"))
    ///     .default_step("search", Step::tool_error("Error executing tool search: boom"));
    /// let svc = layer.layer(mock);
    /// for tool in ["delete_repo", "search"] {
    ///     let _ = svc.clone().oneshot(Request::tool_call(1, tool, json!({}))).await;
    /// }
    /// let registry = layer.registry();
    /// assert_eq!(registry.state("delete_repo"), Some(CircuitState::Open));
    /// assert_eq!(registry.state("search"), Some(CircuitState::Closed));
    ///
    /// let err = CircuitBreakerLayer::builder()
    ///     .tool("delete_repo", |b| b.reset_timeout(Duration::ZERO))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), "tools.delete_repo.reset_timeout");
    /// # }
    /// ```
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder + Send + 'static,
    ) -> Self {
        self.tool_overrides.push(ToolOverride {
            tool: tool.into(),
            configure: Box::new(configure),
        });
        self
    }

    /// Validates the configuration and builds the layer (and its registry).
    /// The error names the bad field (`tools.<tool>.<field>` for a tool's
    /// override, see [`tool`](Self::tool)).
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        self.config.validate()?;
        let tool_policies = tool_policies(&self.config, self.tool_overrides)?;
        let registry = CircuitRegistry::new(self.config, tool_policies, self.events, self.sync);
        Ok(CircuitBreakerLayer::from_parts(registry, self.classifier))
    }
}

/// Applies the overrides of [`CircuitBreakerBuilder::tool`] to `config` (the
/// validated configuration of the outer builder) and validates each tool's
/// policy.
fn tool_policies(
    config: &Config,
    overrides: Vec<ToolOverride>,
) -> Result<HashMap<Box<str>, Arc<Config>>, ConfigError> {
    if overrides.is_empty() {
        return Ok(HashMap::new());
    }
    if !matches!(config.key_by, KeyBy::Tool | KeyBy::SessionTool) {
        return Err(ConfigError::new(
            "key_by",
            "per-tool overrides need keys that name a tool (KeyBy::Tool or KeyBy::SessionTool)",
        ));
    }
    // Every closure of one tool, in the order given, each on the previous one's result.
    let mut builders: Vec<(String, CircuitBreakerBuilder)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for ToolOverride { tool, configure } in overrides {
        let i = *index.entry(tool.clone()).or_insert_with(|| {
            let fresh = CircuitBreakerBuilder {
                config: config.clone(),
                ..CircuitBreakerBuilder::default()
            };
            builders.push((tool, fresh));
            builders.len() - 1
        });
        let slot = &mut builders[i].1;
        *slot = configure(std::mem::take(slot));
    }
    let mut policies = HashMap::with_capacity(builders.len());
    for (tool, built) in builders {
        if tool.is_empty() {
            return Err(ConfigError::new("tools", "a tool name must not be empty"));
        }
        let section = format!("tools.{tool}");
        if !built.tool_overrides.is_empty() {
            return Err(ConfigError::new(
                format!("{section}.tools"),
                "per-tool overrides do not nest",
            ));
        }
        let policy = config.with_policy_of(&built.config);
        policy
            .validate_policy()
            .map_err(|e| e.in_section(&section))?;
        policy.check_idle_timeout(&format!("{section}.max_reset_timeout"))?;
        policies.insert(tool.into_boxed_str(), Arc::new(policy));
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(b: CircuitBreakerBuilder) -> String {
        b.build().map(|_| ()).unwrap_err().field().to_owned()
    }

    #[test]
    fn defaults_are_valid() {
        assert!(CircuitBreakerBuilder::new().build().is_ok());
    }

    #[test]
    fn bad_values_name_their_field() {
        let b = CircuitBreakerBuilder::new;
        assert_eq!(field_of(b().failure_threshold(0)), "failure_threshold");
        assert_eq!(
            field_of(b().failure_rate_threshold(1.5)),
            "failure_rate_threshold"
        );
        assert_eq!(
            field_of(b().failure_rate_threshold(f64::NAN)),
            "failure_rate_threshold"
        );
        assert_eq!(field_of(b().count_window(0)), "count_window");
        assert_eq!(
            field_of(b().time_window(TimeWindow::new(Duration::from_secs(1), 0))),
            "time_window.buckets"
        );
        assert_eq!(
            field_of(b().time_window(TimeWindow::new(Duration::from_millis(5), 10))),
            "time_window.duration"
        );
        assert_eq!(
            field_of(b().slow_call_duration(Duration::ZERO)),
            "slow_call_duration"
        );
        assert_eq!(
            field_of(b().slow_call_rate_threshold(0.0)),
            "slow_call_rate_threshold"
        );
        assert_eq!(field_of(b().minimum_calls(0)), "minimum_calls");
        assert_eq!(
            field_of(b().minimum_calls(21)),
            "minimum_calls, count_window"
        );
        assert_eq!(field_of(b().reset_timeout(Duration::ZERO)), "reset_timeout");
        assert_eq!(field_of(b().reset_multiplier(0.5)), "reset_multiplier");
        assert_eq!(
            field_of(b().max_reset_timeout(Duration::from_secs(1))),
            "max_reset_timeout"
        );
        assert_eq!(field_of(b().jitter(1.0)), "jitter");
        assert_eq!(field_of(b().half_open_max_calls(0)), "half_open_max_calls");
        assert_eq!(field_of(b().success_threshold(0)), "success_threshold");
        assert_eq!(field_of(b().probe_timeout(Duration::ZERO)), "probe_timeout");
        assert_eq!(field_of(b().name("")), "name");
        assert_eq!(field_of(b().bounds(Bounds::max_keys(0))), "bounds.max_keys");
        assert_eq!(
            field_of(b().bounds(Bounds::max_keys(10).idle_timeout(Some(Duration::from_secs(60))))),
            "bounds.idle_timeout, max_reset_timeout"
        );
        assert_eq!(
            field_of(b().count_window(None).failure_threshold(None)),
            "count_window, time_window"
        );
        assert_eq!(
            field_of(b().failure_threshold(None).failure_rate_threshold(None)),
            "failure_threshold, failure_rate_threshold, slow_call_duration"
        );
    }

    #[test]
    fn bad_tool_values_name_the_tool_and_field() {
        let b = CircuitBreakerBuilder::new;
        assert_eq!(
            field_of(b().tool("search", |t| t.failure_threshold(0))),
            "tools.search.failure_threshold"
        );
        assert_eq!(
            field_of(b().tool("search", |t| t.jitter(2.0))),
            "tools.search.jitter"
        );
        assert_eq!(
            field_of(b().tool("search", |t| t.minimum_calls(21))),
            "tools.search.minimum_calls, count_window"
        );
        // The tool's values are checked against the outer builder's final ones.
        assert_eq!(
            field_of(
                b().tool("search", |t| t.max_reset_timeout(Duration::from_secs(60)))
                    .reset_timeout(Duration::from_secs(90))
                    .max_reset_timeout(Duration::from_secs(400))
            ),
            "tools.search.max_reset_timeout"
        );
        // The idle timeout must outlast each tool's longest open period.
        let idle = Bounds::max_keys(10).idle_timeout(Some(Duration::from_secs(120)));
        assert!(b()
            .reset_timeout(Duration::from_secs(10))
            .max_reset_timeout(Duration::from_secs(60))
            .bounds(idle)
            .build()
            .is_ok());
        assert_eq!(
            field_of(
                b().reset_timeout(Duration::from_secs(10))
                    .max_reset_timeout(Duration::from_secs(60))
                    .bounds(idle)
                    .tool("search", |t| t.max_reset_timeout(Duration::from_secs(300)))
            ),
            "bounds.idle_timeout, tools.search.max_reset_timeout"
        );
        assert_eq!(field_of(b().tool("", |t| t)), "tools");
        assert_eq!(
            field_of(b().tool("a", |t| t.tool("b", |u| u))),
            "tools.a.tools"
        );
        // The outer builder's errors come first and are not prefixed.
        assert_eq!(
            field_of(b().jitter(2.0).tool("search", |t| t.jitter(0.0))),
            "jitter"
        );
        // Registry-wide settings set in the closure are not the tool's to change.
        assert!(b()
            .tool("search", |t| t.name("").bounds(Bounds::max_keys(0)))
            .build()
            .is_ok());
    }

    #[test]
    fn tool_policies_keep_the_registry_wide_settings() {
        let outer = Config {
            name: "upstream".into(),
            key_by: KeyBy::SessionTool,
            ..Config::default()
        };
        let overrides = vec![ToolOverride {
            tool: "search".into(),
            configure: Box::new(|b: CircuitBreakerBuilder| {
                b.name("other")
                    .key_by(KeyBy::Server)
                    .failure_threshold(2)
                    .reset_timeout(Duration::from_secs(7))
                    .max_reset_timeout(Duration::from_secs(70))
            }),
        }];
        let policies = tool_policies(&outer, overrides).unwrap();
        let search = &policies["search"];
        assert_eq!(&*search.name, "upstream");
        assert!(matches!(search.key_by, KeyBy::SessionTool));
        assert_eq!(search.failure_threshold, Some(2));
        assert_eq!(search.reset_timeout, Duration::from_secs(7));
        assert_eq!(search.max_reset_timeout, Duration::from_secs(70));
        assert_eq!(search.minimum_calls, outer.minimum_calls);
    }

    #[test]
    fn policies_combine() {
        let only_consecutive = CircuitBreakerBuilder::new()
            .failure_rate_threshold(None)
            .count_window(None)
            .build();
        assert!(only_consecutive.is_ok());
        let only_slow = CircuitBreakerBuilder::new()
            .failure_threshold(None)
            .failure_rate_threshold(None)
            .slow_call_duration(Duration::from_secs(2))
            .build();
        assert!(only_slow.is_ok());
        let time_only = CircuitBreakerBuilder::new()
            .count_window(None)
            .time_window(TimeWindow::new(Duration::from_secs(10), 10))
            .minimum_calls(50)
            .build();
        assert!(time_only.is_ok());
    }
}
