//! [`CircuitBreakerBuilder`]: the knobs of a
//! [`CircuitBreakerLayer`](crate::CircuitBreakerLayer), their defaults and
//! their validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::overrides::{tool_section, Overridable, ToolOverrides};
use toolwarden_core::{Bounds, ConfigError, Events, KeyBy, McpClassifier};

use crate::config::{Config, TimeWindow};
use crate::layer::CircuitBreakerLayer;
use crate::registry::CircuitRegistry;
use crate::sync::StateSync;

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
    tools: ToolOverrides<CircuitBreakerBuilder>,
}

impl Default for CircuitBreakerBuilder<McpClassifier> {
    fn default() -> Self {
        CircuitBreakerBuilder {
            config: Config::default(),
            events: Events::new(),
            sync: None,
            classifier: McpClassifier::new(),
            tools: ToolOverrides::new(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for CircuitBreakerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("config", &self.config)
            .field("events", &self.events)
            .field("sync", &self.sync.is_some())
            .field("classifier", &self.classifier)
            .field("tools", &self.tools)
            .finish()
    }
}

impl Overridable for CircuitBreakerBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
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
        self.tools.layer_wide("name");
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
    /// (at most [`MAX_COUNT_WINDOW`](crate::MAX_COUNT_WINDOW)); `None` disables it. Default `Some(20)`.
    #[must_use]
    pub fn count_window(mut self, calls: impl Into<Option<u32>>) -> Self {
        self.config.count_window = calls.into();
        self
    }

    /// The time-based window; `None` disables it. Default `None`. `build`
    /// refuses 0 or more than [`MAX_TIME_BUCKETS`](crate::MAX_TIME_BUCKETS) buckets and buckets
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
        self.tools.layer_wide("key_by");
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
        self.tools.layer_wide("bounds");
        self.config.bounds = bounds;
        self
    }

    /// Where state transitions are reported. Default: nowhere.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.events = events;
        self
    }

    /// Where local state transitions are pushed for other replicas (see
    /// [`StateSync`]). Default: nowhere.
    #[must_use]
    pub fn sync(mut self, sync: Arc<dyn StateSync>) -> Self {
        self.tools.layer_wide("sync");
        self.sync = Some(sync);
        self
    }

    /// Replaces the classifier. Default [`McpClassifier`].
    #[must_use]
    pub fn classifier<C2>(mut self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        self.tools.layer_wide("classifier");
        CircuitBreakerBuilder {
            config: self.config,
            events: self.events,
            sync: self.sync,
            classifier,
            tools: self.tools,
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
    /// `events`, `sync` and the classifier are layer-wide, and `build`
    /// refuses a `configure` that sets one (`tools."<tool>".<knob>`). Calling `tool` again for the same tool applies both
    /// closures, in order (the core's
    /// [`ToolOverrides`](toolwarden_core::overrides::ToolOverrides), shared
    /// by every layer builder).
    ///
    /// The override applies to every key whose tool is `tool`: the key
    /// `tool` with [`KeyBy::Tool`], every `session/tool` with
    /// [`KeyBy::SessionTool`]. The policy is chosen once, when a key's
    /// breaker is created, so it costs nothing per call. Keys past the
    /// bound share the overflow breaker, which keeps this builder's policy.
    ///
    /// `build` validates each tool's policy like this builder's, the error
    /// naming `tools."<tool>".<field>`; it also checks that `bounds.idle_timeout`
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
    /// assert_eq!(err.field(), r#"tools."delete_repo".reset_timeout"#);
    /// # }
    /// ```
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    /// Validates the configuration and builds the layer (and its registry).
    /// The error names the bad field (`tools."<tool>".<field>` for a tool's
    /// override, see [`tool`](Self::tool)).
    pub fn build(mut self) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        self.config.validate()?;
        let tools = std::mem::take(&mut self.tools);
        let tool_policies = if tools.is_empty() {
            Vec::new()
        } else {
            if !matches!(self.config.key_by, KeyBy::Tool | KeyBy::SessionTool) {
                return Err(ConfigError::new(
                    "key_by",
                    "per-tool overrides need keys that name a tool (KeyBy::Tool or KeyBy::SessionTool)",
                ));
            }
            let config = &self.config;
            let policies = tools.resolve(
                || CircuitBreakerBuilder {
                    config: config.clone(),
                    ..CircuitBreakerBuilder::default()
                },
                |built| {
                    let policy = config.with_policy_of(&built.config);
                    policy.validate_policy()?;
                    Ok(policy)
                },
            )?;
            // The bounds are the registry's: their error names them first.
            for (tool, policy) in &policies {
                let section = tool_section(tool);
                policy.check_idle_timeout(&format!("{section}.max_reset_timeout"))?;
            }
            policies
        };
        let tool_policies = tool_policies
            .into_iter()
            .map(|(tool, policy)| (tool, Arc::new(policy)))
            .collect();
        let registry = CircuitRegistry::new(self.config, tool_policies, self.events, self.sync);
        Ok(CircuitBreakerLayer::from_parts(registry, self.classifier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(b: CircuitBreakerBuilder) -> String {
        b.build().map(|_| ()).unwrap_err().field().to_owned()
    }

    #[test]
    fn defaults_are_valid() {
        let built = CircuitBreakerBuilder::new().build().unwrap();
        // `CircuitBreakerLayer::new` skips the checks these defaults pass.
        assert_eq!(
            format!("{:?}", built.registry()),
            format!("{:?}", CircuitBreakerLayer::new().registry())
        );
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
            r#"tools."search".failure_threshold"#
        );
        assert_eq!(
            field_of(b().tool("search", |t| t.jitter(2.0))),
            r#"tools."search".jitter"#
        );
        assert_eq!(
            field_of(b().tool("search", |t| t.minimum_calls(21))),
            r#"tools."search".minimum_calls, count_window"#
        );
        // The tool's values are checked against the outer builder's final ones.
        assert_eq!(
            field_of(
                b().tool("search", |t| t.max_reset_timeout(Duration::from_secs(60)))
                    .reset_timeout(Duration::from_secs(90))
                    .max_reset_timeout(Duration::from_secs(400))
            ),
            r#"tools."search".max_reset_timeout"#
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
            r#"bounds.idle_timeout, tools."search".max_reset_timeout"#
        );
        assert_eq!(field_of(b().tool("", |t| t)), "tools");
        assert_eq!(
            field_of(b().tool("a", |t| t.tool("b", |u| u))),
            r#"tools."a".tools"#
        );
        // The outer builder's errors come first and are not prefixed.
        assert_eq!(
            field_of(b().jitter(2.0).tool("search", |t| t.jitter(0.0))),
            "jitter"
        );
        // Registry-wide settings are refused in a tool's closure, never ignored.
        assert_eq!(
            field_of(b().tool("search", |t| t.name("").bounds(Bounds::max_keys(0)))),
            r#"tools."search".name"#
        );
        assert_eq!(
            field_of(b().tool("search", |t| t.events(Events::new()))),
            r#"tools."search".events"#
        );
    }

    #[test]
    fn tool_policies_keep_the_registry_wide_settings() {
        let layer = CircuitBreakerBuilder::new()
            .name("upstream")
            .key_by(KeyBy::SessionTool)
            .tool("search", |b| {
                b.failure_threshold(2)
                    .reset_timeout(Duration::from_secs(7))
                    .max_reset_timeout(Duration::from_secs(70))
            })
            .build()
            .unwrap();
        let outer = Config::default();
        let search = layer.registry().tool_policy("search").unwrap();
        assert_eq!(&*search.name, "upstream");
        assert!(matches!(search.key_by, KeyBy::SessionTool));
        assert_eq!(search.failure_threshold, Some(2));
        assert_eq!(search.reset_timeout, Duration::from_secs(7));
        assert_eq!(search.max_reset_timeout, Duration::from_secs(70));
        assert_eq!(search.minimum_calls, outer.minimum_calls);
        assert!(layer.registry().tool_policy("fetch").is_none());
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
