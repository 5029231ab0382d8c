//! [`LoopGuardBuilder`]: every knob of the loop guard, checked when built.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::overrides::{Overridable, ToolOverrides};
use toolwarden_core::{Bounds, Circuits, ConfigError, Events, McpClassifier};

use crate::config::{
    LoopGuardConfig, Settings, ToolLimits, ToolRule, ToolRules, DEFAULT_REFUSAL_COOLDOWN,
    MAX_CYCLE_PERIOD, MAX_REFUSAL_COOLDOWN, MAX_WINDOW_CALLS,
};
use crate::history::CycleRule;
use crate::layer::LoopGuardLayer;

/// The knobs as set so far (a tool's builder starts from the outer
/// builder's final values).
#[derive(Debug, Clone)]
struct Knobs {
    limits: ToolLimits,
    exempt: bool,
    max_cycle_period: usize,
    max_cycle_repeats: u32,
    window_calls: usize,
    window_time: Duration,
    bounds: Bounds,
    refusal_cooldown: Duration,
    circuits: Circuits,
    events: Events,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            limits: ToolLimits::default(),
            exempt: false,
            max_cycle_period: 3,
            max_cycle_repeats: 3,
            window_calls: 16,
            window_time: Duration::from_secs(300),
            bounds: Bounds::default(),
            refusal_cooldown: DEFAULT_REFUSAL_COOLDOWN,
            circuits: Circuits::none(),
            events: Events::new(),
        }
    }
}

/// Builds a [`LoopGuardLayer`]; [`build`](LoopGuardBuilder::build) checks
/// every value and names the bad field.
///
/// Every knob, with its default:
///
/// | knob | default |
/// |---|---|
/// | [`limits`](Self::limits) | [`ToolLimits::new()`]: block after 3 identical failures or 8 identical (non-neutral) calls; cycles detected |
/// | [`exempt`](Self::exempt) | `false` |
/// | [`tool`](Self::tool) | none: every tool has the layer's `limits` |
/// | [`max_cycle_period`](Self::max_cycle_period) | 3 |
/// | [`max_cycle_repeats`](Self::max_cycle_repeats) | 3 |
/// | [`window_calls`](Self::window_calls) | 16 |
/// | [`window_time`](Self::window_time) | 5 minutes |
/// | [`bounds`](Self::bounds) | 10 000 sessions, forgotten after 10 minutes idle |
/// | [`refusal_cooldown`](Self::refusal_cooldown) | 30 s |
/// | [`circuits`](Self::circuits) | none: every circuit reads as closed |
/// | [`events`](Self::events) | none |
/// | [`classifier`](Self::classifier) | [`McpClassifier`] |
#[derive(Debug)]
pub struct LoopGuardBuilder<C = McpClassifier> {
    knobs: Knobs,
    tools: ToolOverrides<LoopGuardBuilder>,
    /// In a tool's builder: whether the closure set `limits`.
    limits_set: bool,
    classifier: C,
}

impl Default for LoopGuardBuilder {
    fn default() -> Self {
        LoopGuardBuilder {
            knobs: Knobs::default(),
            tools: ToolOverrides::new(),
            limits_set: false,
            classifier: McpClassifier::new(),
        }
    }
}

impl Overridable for LoopGuardBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
    }
}

impl<C> LoopGuardBuilder<C> {
    /// The limits of every tool without limits of its own; in a
    /// [`tool`](Self::tool) closure, that tool's limits, replacing the
    /// layer's (see [`ToolLimits`]). Default [`ToolLimits::new()`]: the 4th
    /// identical call after 3 failures is blocked, so is the 9th identical
    /// call whatever the outcomes, and cycles are detected.
    #[must_use]
    pub fn limits(mut self, limits: ToolLimits) -> Self {
        self.knobs.limits = limits;
        self.limits_set = self.tools.in_tool();
        self
    }

    /// The limits as set so far (in a tool's closure: the layer's, until
    /// the closure sets its own).
    #[cfg(feature = "serde")]
    pub(crate) fn current_limits(&self) -> ToolLimits {
        self.knobs.limits
    }

    /// Whether calls pass through untouched: never blocked, never recorded,
    /// so they neither count towards another call's streak nor clear it,
    /// and they never take part in a cycle. Default `false`. Set in a
    /// [`tool`](Self::tool) closure for a tool that is polled on purpose
    /// (`job_status`, `wait`); set on the layer, every tool without
    /// settings of its own is exempt. A tool's closure may not set both
    /// `exempt(true)` and `limits`.
    #[must_use]
    pub fn exempt(mut self, exempt: bool) -> Self {
        self.knobs.exempt = exempt;
        self
    }

    /// Settings of one tool: `configure` gets a builder carrying this
    /// builder's final values and may change [`limits`](Self::limits) and
    /// [`exempt`](Self::exempt) for that tool. Every other knob is
    /// layer-wide: `build` refuses it in a closure
    /// (`tools."<tool>".<knob>`). Default: none. Several closures for one
    /// tool apply in order.
    ///
    /// ```
    /// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
    /// let layer = LoopGuardLayer::builder()
    ///     .tool("wait_for_job", |b| b.exempt(true))
    ///     .tool("job_status", |b| b.limits(ToolLimits::polling()))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.config().limits_for("wait_for_job"), None);
    /// assert_eq!(layer.config().limits_for("job_status"), Some(ToolLimits::polling()));
    ///
    /// let err = LoopGuardLayer::builder()
    ///     .tool("search", |b| b.limits(ToolLimits { max_repeats: Some(40), ..ToolLimits::new() }))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), r#"tools."search".limits.max_repeats"#);
    /// ```
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(LoopGuardBuilder) -> LoopGuardBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    /// The longest cycle looked for: cycles of 2 to `max_period` distinct
    /// calls (A, B, A, B, ... or A, B, C, A, B, C, ...). Default 3; at most
    /// 8. Cycle detection is turned off through [`ToolLimits::cycles`].
    /// Layer-wide.
    #[must_use]
    pub fn max_cycle_period(mut self, max_period: usize) -> Self {
        self.tools.layer_wide("max_cycle_period");
        self.knobs.max_cycle_period = max_period;
        self
    }

    /// How many full rounds of a cycle are allowed; the call that starts one
    /// more round is blocked. Default 3: A, B, A, B, A, B passes (with a
    /// warning on the 6th call), the next A is blocked. At least 2, and
    /// `max_cycle_period × max_cycle_repeats` must not exceed `window_calls`.
    /// Layer-wide.
    #[must_use]
    pub fn max_cycle_repeats(mut self, rounds: u32) -> Self {
        self.tools.layer_wide("max_cycle_repeats");
        self.knobs.max_cycle_repeats = rounds;
        self
    }

    /// How many recent calls each session remembers. Default 16; between 2
    /// and 1024. Each session holds exactly this many 32-byte records.
    /// Layer-wide.
    #[must_use]
    pub fn window_calls(mut self, calls: usize) -> Self {
        self.tools.layer_wide("window_calls");
        self.knobs.window_calls = calls;
        self
    }

    /// How long a call is remembered. Default 5 minutes; must be positive.
    /// Layer-wide.
    #[must_use]
    pub fn window_time(mut self, window: Duration) -> Self {
        self.tools.layer_wide("window_time");
        self.knobs.window_time = window;
        self
    }

    /// Bounds of the session histories. Default [`Bounds::default`]:
    /// `max_keys` 10 000 sessions with a history (at least 1; past it, a
    /// new session has none, and its calls pass unguarded: see the crate
    /// docs), and a session idle for `idle_timeout` 10 minutes is forgotten
    /// (`None` keeps sessions, and a new one past the bound is never
    /// guarded). When set,
    /// `idle_timeout` must be at least `window_time` (a shorter one would
    /// forget calls still inside the window). Layer-wide.
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.tools.layer_wide("bounds");
        self.knobs.bounds = bounds;
        self
    }

    /// How long a refusal stays in force at most: this long after the
    /// first refusal of a call, the identical call is let through again as
    /// a fresh attempt (its streak restarts), however often it was refused
    /// meanwhile. Default 30 s; must be positive and at most 30 s
    /// ([`MAX_REFUSAL_COOLDOWN`]). A refusal also lifts earlier when the
    /// identical call succeeds in any session of the guard, when the tool's
    /// circuit closes (see [`circuits`](Self::circuits)), or when another
    /// call of the session succeeds. Layer-wide.
    #[must_use]
    pub fn refusal_cooldown(mut self, cooldown: Duration) -> Self {
        self.tools.layer_wide("refusal_cooldown");
        self.knobs.refusal_cooldown = cooldown;
        self
    }

    /// Which circuits are open (in a stack: the circuit breaker's registry,
    /// as a [`Circuits`] view), so that a refusal made while the tool's
    /// circuit was open lifts once it no longer refuses calls. Default
    /// [`Circuits::none()`]: every circuit reads as closed, so this way of
    /// lifting never applies. Layer-wide.
    #[must_use]
    pub fn circuits(mut self, circuits: Circuits) -> Self {
        self.tools.layer_wide("circuits");
        self.knobs.circuits = circuits;
        self
    }

    /// Where warnings ([`Event::LoopWarned`](toolwarden_core::Event::LoopWarned))
    /// and blocks ([`Event::LoopDetected`](toolwarden_core::Event::LoopDetected))
    /// are reported. Default: nowhere. Layer-wide.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.knobs.events = events;
        self
    }

    /// The classifier that decides whether a call failed. Default
    /// [`McpClassifier`]. Share one classifier across the stack.
    /// Layer-wide.
    #[must_use]
    pub fn classifier<C2>(mut self, classifier: C2) -> LoopGuardBuilder<C2> {
        self.tools.layer_wide("classifier");
        LoopGuardBuilder {
            knobs: self.knobs,
            tools: self.tools,
            limits_set: self.limits_set,
            classifier,
        }
    }

    /// Checks the configuration and builds the layer. The error names the
    /// bad field (`window_calls`, `bounds.idle_timeout, window_time`,
    /// `limits.max_repeats`, `tools."<tool>".limits.max_repeats`, ...).
    ///
    /// ```
    /// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
    /// let err = LoopGuardLayer::builder()
    ///     .limits(ToolLimits { max_repeats: Some(40), ..ToolLimits::new() })
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), "limits.max_repeats");
    /// ```
    pub fn build(mut self) -> Result<LoopGuardLayer<C>, ConfigError> {
        self.knobs.validate()?;
        let knobs = &self.knobs;
        let window_calls = knobs.window_calls;
        let resolved = std::mem::take(&mut self.tools).resolve(
            || LoopGuardBuilder {
                knobs: knobs.clone(),
                ..LoopGuardBuilder::default()
            },
            |b| {
                if b.knobs.exempt {
                    if b.limits_set {
                        return Err(ConfigError::new(
                            "exempt",
                            "is set with limits of its own: an exempt tool is never guarded, set one or the other",
                        ));
                    }
                    return Ok(ToolRule::Exempt);
                }
                b.knobs.limits.validate("limits", window_calls)?;
                Ok(ToolRule::Limits(b.knobs.limits))
            },
        )?;
        let mut tools = ToolRules::with_capacity_and_hasher(resolved.len(), Default::default());
        tools.extend(resolved);
        Ok(LoopGuardLayer::from_config(
            self.knobs.assemble(tools, self.classifier),
        ))
    }
}

impl Knobs {
    /// Checks the layer-wide values.
    fn validate(&self) -> Result<(), ConfigError> {
        let window_calls = self.window_calls;
        if !(2..=MAX_WINDOW_CALLS).contains(&window_calls) {
            return Err(ConfigError::new(
                "window_calls",
                format!("must be between 2 and {MAX_WINDOW_CALLS}"),
            ));
        }
        if self.window_time.is_zero() {
            return Err(ConfigError::new("window_time", "must be positive"));
        }
        self.bounds.validate().map_err(|e| e.in_section("bounds"))?;
        if self
            .bounds
            .idle_timeout
            .is_some_and(|idle| idle < self.window_time)
        {
            return Err(ConfigError::new(
                "bounds.idle_timeout, window_time",
                "bounds.idle_timeout must be at least window_time, or calls inside the window are forgotten",
            ));
        }
        if self.refusal_cooldown.is_zero() || self.refusal_cooldown > MAX_REFUSAL_COOLDOWN {
            return Err(ConfigError::new(
                "refusal_cooldown",
                format!(
                    "must be positive and at most {} s",
                    MAX_REFUSAL_COOLDOWN.as_secs()
                ),
            ));
        }
        if !(2..=MAX_CYCLE_PERIOD).contains(&self.max_cycle_period) {
            return Err(ConfigError::new(
                "max_cycle_period",
                format!("must be between 2 and {MAX_CYCLE_PERIOD}"),
            ));
        }
        if self.max_cycle_repeats < 2 {
            return Err(ConfigError::new("max_cycle_repeats", "must be at least 2"));
        }
        let cycle_calls = self
            .max_cycle_period
            .saturating_mul(self.max_cycle_repeats as usize);
        if cycle_calls > window_calls {
            return Err(ConfigError::new(
                "max_cycle_period, max_cycle_repeats, window_calls",
                format!(
                    "max_cycle_period × max_cycle_repeats ({cycle_calls}) must not exceed window_calls ({window_calls})"
                ),
            ));
        }
        self.limits.validate("limits", window_calls)
    }

    /// The configuration, without checks: call [`validate`](Self::validate)
    /// (and check `tools`) first.
    fn assemble<C>(self, tools: ToolRules, classifier: C) -> LoopGuardConfig<C> {
        LoopGuardConfig {
            settings: Arc::new(Settings {
                limits: self.limits,
                default: if self.exempt {
                    ToolRule::Exempt
                } else {
                    ToolRule::Limits(self.limits)
                },
                tools,
                cycles: CycleRule {
                    max_period: self.max_cycle_period,
                    max_rounds: self.max_cycle_repeats as usize,
                },
                window_calls: self.window_calls,
                window_time: self.window_time,
                window_ms: u64::try_from(self.window_time.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                bounds: self.bounds,
                refusal_cooldown: self.refusal_cooldown,
                cooldown_ms: u64::try_from(self.refusal_cooldown.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                circuits: self.circuits,
                events: self.events,
            }),
            classifier,
        }
    }
}

/// The configuration of [`LoopGuardLayer::new`]: every default (a test
/// checks that they pass validation).
pub(crate) fn default_config() -> LoopGuardConfig {
    Knobs::default().assemble(ToolRules::default(), McpClassifier::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<C>(result: Result<LoopGuardLayer<C>, ConfigError>) -> String {
        match result {
            Ok(_) => panic!("accepted"),
            Err(e) => e.field().to_owned(),
        }
    }

    #[test]
    fn the_defaults_are_valid_and_documented_values() {
        assert_eq!(Knobs::default().validate(), Ok(()));
        let config = default_config();
        assert_eq!(config.limits(), ToolLimits::new());
        assert_eq!(config.limits().max_failing_repeats, Some(3));
        assert_eq!(config.limits().max_repeats, Some(8));
        assert!(config.limits().cycles);
        assert!(!config.exempt());
        assert_eq!(config.window_calls(), 16);
        assert_eq!(config.window_time(), Duration::from_secs(300));
        assert_eq!(config.bounds().max_keys, 10_000);
        assert_eq!(config.refusal_cooldown(), Duration::from_secs(30));
        assert_eq!(
            config.settings.bounds.idle_timeout,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            config.settings.cycles,
            CycleRule {
                max_period: 3,
                max_rounds: 3
            }
        );
        assert_eq!(
            format!("{:?}", LoopGuardLayer::new().config()),
            format!("{:?}", LoopGuardLayer::builder().build().unwrap().config())
        );
    }

    #[test]
    fn every_bad_value_is_refused_by_name() {
        let b = LoopGuardLayer::builder;
        let limits = |failing: Option<u32>, repeats: Option<u32>| ToolLimits {
            max_failing_repeats: failing,
            max_repeats: repeats,
            cycles: true,
        };
        assert_eq!(field(b().window_calls(1).build()), "window_calls");
        assert_eq!(
            field(b().window_calls(MAX_WINDOW_CALLS + 1).build()),
            "window_calls"
        );
        assert_eq!(
            field(b().window_time(Duration::ZERO).build()),
            "window_time"
        );
        assert_eq!(
            field(b().bounds(Bounds::max_keys(0)).build()),
            "bounds.max_keys"
        );
        assert_eq!(
            field(
                b().bounds(Bounds::default().idle_timeout(Some(Duration::from_secs(60))))
                    .build()
            ),
            "bounds.idle_timeout, window_time"
        );
        assert_eq!(
            field(b().refusal_cooldown(Duration::ZERO).build()),
            "refusal_cooldown"
        );
        assert_eq!(
            field(b().refusal_cooldown(Duration::from_millis(30_001)).build()),
            "refusal_cooldown"
        );
        assert!(b()
            .refusal_cooldown(Duration::from_nanos(1))
            .build()
            .is_ok());
        assert!(b().refusal_cooldown(MAX_REFUSAL_COOLDOWN).build().is_ok());
        assert_eq!(field(b().max_cycle_period(1).build()), "max_cycle_period");
        assert_eq!(field(b().max_cycle_period(9).build()), "max_cycle_period");
        assert_eq!(field(b().max_cycle_repeats(1).build()), "max_cycle_repeats");
        assert_eq!(
            field(b().max_cycle_period(3).max_cycle_repeats(6).build()),
            "max_cycle_period, max_cycle_repeats, window_calls"
        );
        assert_eq!(
            field(b().limits(limits(Some(0), Some(8))).build()),
            "limits.max_failing_repeats"
        );
        assert_eq!(
            field(b().limits(limits(Some(3), Some(17))).build()),
            "limits.max_repeats"
        );
        assert_eq!(
            field(
                b().tool("poll", move |b| b.limits(limits(None, Some(0))))
                    .build()
            ),
            r#"tools."poll".limits.max_repeats"#
        );
        assert_eq!(
            field(
                b().tool("poll", |b| b.exempt(true))
                    .tool("poll", |b| b.limits(ToolLimits::new()))
                    .build()
            ),
            r#"tools."poll".exempt"#
        );
        assert_eq!(
            field(
                b().tool("poll", |b| b.limits(ToolLimits::new()).exempt(true))
                    .build()
            ),
            r#"tools."poll".exempt"#
        );
        // Layer-wide knobs cannot be set for one tool.
        assert_eq!(
            field(b().tool("poll", |b| b.window_calls(8)).build()),
            r#"tools."poll".window_calls"#
        );
        assert_eq!(field(b().tool("", |b| b).build()), "tools");
        // A tool's limits are checked against the layer's final window.
        assert_eq!(
            field(
                b().tool("poll", move |b| b.limits(limits(None, Some(6))))
                    .window_calls(4)
                    .max_cycle_repeats(2)
                    .max_cycle_period(2)
                    .limits(limits(Some(1), Some(4)))
                    .build()
            ),
            r#"tools."poll".limits.max_repeats"#
        );
        // Values at the edges are accepted.
        let edges = b()
            .window_calls(4)
            .max_cycle_period(2)
            .max_cycle_repeats(2)
            .limits(limits(Some(1), Some(4)));
        assert!(edges.build().is_ok());
        assert!(b()
            .bounds(Bounds::default().idle_timeout(None))
            .limits(limits(None, None))
            .build()
            .is_ok());
        assert!(b()
            .bounds(Bounds::default().idle_timeout(Some(Duration::from_secs(300))))
            .build()
            .is_ok());
    }

    #[test]
    fn tools_resolve_to_their_own_limits_or_the_layers() {
        let layer = LoopGuardLayer::builder()
            .limits(ToolLimits {
                max_failing_repeats: Some(2),
                ..ToolLimits::new()
            })
            .tool("wait", |b| b.exempt(true))
            .tool("status", |b| b.limits(ToolLimits::polling()))
            .tool("status", |b| {
                b.limits(ToolLimits {
                    max_failing_repeats: Some(5),
                    ..ToolLimits::polling()
                })
            })
            .build()
            .unwrap();
        let config = layer.config();
        assert_eq!(config.limits_for("wait"), None);
        assert_eq!(
            config.limits_for("status"),
            Some(ToolLimits {
                max_failing_repeats: Some(5),
                ..ToolLimits::polling()
            })
        );
        assert_eq!(
            config.limits_for("search"),
            Some(ToolLimits {
                max_failing_repeats: Some(2),
                ..ToolLimits::new()
            })
        );
        let debug = format!("{config:?}");
        assert!(debug.contains("exempt: [\"wait\"]"), "{debug}");
    }

    #[test]
    fn the_layer_may_exempt_every_tool_but_some() {
        let layer = LoopGuardLayer::builder()
            .exempt(true)
            .tool("search", |b| b.exempt(false))
            .build()
            .unwrap();
        let config = layer.config();
        assert!(config.exempt());
        assert_eq!(config.limits_for("other"), None);
        assert_eq!(config.limits_for("search"), Some(ToolLimits::new()));
    }
}
