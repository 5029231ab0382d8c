//! Configuration of the loop guard: limits, windows, sessions, exemptions.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Circuits, ConfigError, Events, McpClassifier};

use crate::history::{CycleRule, Rules};
use crate::layer::LoopGuardLayer;

/// The largest `window_calls`: a session's memory is `window_calls` records
/// of 32 bytes.
pub const MAX_WINDOW_CALLS: usize = 1024;

/// The longest [`LoopGuardBuilder::refusal_cooldown`]: a refusal never
/// stays in force longer than this.
pub const MAX_REFUSAL_COOLDOWN: Duration = Duration::from_secs(30);

/// The default [`LoopGuardBuilder::refusal_cooldown`].
const DEFAULT_REFUSAL_COOLDOWN: Duration = MAX_REFUSAL_COOLDOWN;

/// The longest cycle that can be looked for.
pub const MAX_CYCLE_PERIOD: usize = 8;

/// How often one tool's identical calls may repeat before they are blocked.
///
/// The same limits apply to every tool unless a tool has its own
/// ([`LoopGuardBuilder::tool_limits`]). A tool's own limits replace the
/// layer's for that tool, all fields at once; start from the layer's limits
/// to change one field:
///
/// ```
/// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
/// let limits = ToolLimits { max_failing_repeats: Some(5), ..ToolLimits::new() };
/// let layer = LoopGuardLayer::builder()
///     .limits(limits)
///     // A polling tool: identical successful calls are expected.
///     .tool_limits("job_status", ToolLimits { max_repeats: None, cycles: false, ..limits })
///     .build()
///     .unwrap();
/// assert_eq!(layer.config().limits_for("job_status").unwrap().max_failing_repeats, Some(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// How many identical calls may fail in a row before the next identical
    /// call is blocked. Default `Some(3)`: the 4th is blocked. `None` turns
    /// the rule off; otherwise between 1 and `window_calls`.
    ///
    /// A failure is the tool answering badly: a tool error (`isError`,
    /// empty result) or a JSON-RPC error. Transport failures, timeouts and
    /// refusals by other toolwarden layers are neutral: they neither count
    /// nor interrupt a streak. "In a row" means with no success of the
    /// identical call, no success of any other call, and no lifted refusal
    /// in between; failures of other calls do not interrupt a streak.
    pub max_failing_repeats: Option<u32>,
    /// How many identical calls may be made in a row before the next one is
    /// blocked, whether they succeeded, failed or are still running.
    /// Default `Some(8)`: the 9th is blocked. `None` turns the rule off;
    /// otherwise between 1 and `window_calls`. Neutral calls (transport
    /// failure, timeout, refusal by another toolwarden layer) do not count:
    /// an agent polling through an upstream restart is not looping. "In a
    /// row" means with no success of another call, and no lifted refusal,
    /// in between.
    pub max_repeats: Option<u32>,
    /// Whether calls of this tool can make up a cycle that is blocked.
    /// Default `true`. A cycle that includes a call of a tool with `false`
    /// is never blocked.
    pub cycles: bool,
}

impl Default for ToolLimits {
    fn default() -> Self {
        ToolLimits {
            max_failing_repeats: Some(3),
            max_repeats: Some(8),
            cycles: true,
        }
    }
}

impl ToolLimits {
    /// The default limits: `max_failing_repeats` 3, `max_repeats` 8, cycles detected.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits for a tool that is polled on purpose: identical successful
    /// calls are never a loop (`max_repeats: None`) and its calls never make
    /// up a cycle (`cycles: false`), but identical calls that keep failing
    /// are still blocked after the default 3 failures.
    #[must_use]
    pub fn polling() -> Self {
        ToolLimits {
            max_repeats: None,
            cycles: false,
            ..Self::default()
        }
    }

    fn validate(&self, section: &str, window_calls: usize) -> Result<(), ConfigError> {
        for (field, value) in [
            ("max_failing_repeats", self.max_failing_repeats),
            ("max_repeats", self.max_repeats),
        ] {
            let Some(max) = value else { continue };
            let error = |reason: String| ConfigError::new(field, reason).in_section(section);
            if max == 0 {
                return Err(error(
                    "must be at least 1 (use None to turn the rule off)".into(),
                ));
            }
            if max as usize > window_calls {
                return Err(error(format!(
                    "must not exceed window_calls ({window_calls}): older calls are forgotten"
                )));
            }
        }
        Ok(())
    }
}

/// What the guard does with one tool's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolRule {
    /// Never blocked, never recorded.
    Exempt,
    /// Guarded with these limits.
    Limits(ToolLimits),
}

type ToolRules = HashMap<Box<str>, ToolRule, foldhash::fast::RandomState>;

/// The validated configuration of a [`LoopGuardLayer`], shared by every
/// service it builds. Cloning it is cheap.
///
/// Build it through [`LoopGuardLayer::builder`]; the defaults are
/// [`LoopGuardConfig::default`].
#[derive(Clone)]
pub struct LoopGuardConfig<C = McpClassifier> {
    pub(crate) settings: Arc<Settings>,
    pub(crate) classifier: C,
}

pub(crate) struct Settings {
    limits: ToolLimits,
    tools: ToolRules,
    cycles: CycleRule,
    window_calls: usize,
    window_time: Duration,
    window_ms: u64,
    pub(crate) max_sessions: usize,
    pub(crate) session_idle_timeout: Option<Duration>,
    refusal_cooldown: Duration,
    cooldown_ms: u64,
    pub(crate) circuits: Circuits,
    pub(crate) events: Events,
}

impl Default for LoopGuardConfig {
    /// The documented defaults (see [`LoopGuardBuilder`]); a test checks
    /// that they pass validation.
    fn default() -> Self {
        LoopGuardBuilder::new().assemble()
    }
}

impl<C> LoopGuardConfig<C> {
    /// The limits of `tool`: its own, or the layer's; `None` when it is exempt.
    pub fn limits_for(&self, tool: &str) -> Option<ToolLimits> {
        let settings = &*self.settings;
        if settings.tools.is_empty() {
            return Some(settings.limits);
        }
        match settings.tools.get(tool) {
            None => Some(settings.limits),
            Some(ToolRule::Limits(limits)) => Some(*limits),
            Some(ToolRule::Exempt) => None,
        }
    }

    /// The rules for one call of a tool with `limits`.
    #[inline]
    pub(crate) fn rules(&self, limits: ToolLimits) -> Rules {
        let settings = &*self.settings;
        Rules {
            max_failing_repeats: limits.max_failing_repeats,
            max_repeats: limits.max_repeats,
            in_cycles: limits.cycles,
            cycles: settings.cycles,
            window_ms: settings.window_ms,
            cooldown_ms: settings.cooldown_ms,
        }
    }

    /// The layer-wide limits.
    pub fn limits(&self) -> ToolLimits {
        self.settings.limits
    }

    /// How many recent calls each session remembers.
    pub fn window_calls(&self) -> usize {
        self.settings.window_calls
    }

    /// How long a call is remembered.
    pub fn window_time(&self) -> Duration {
        self.settings.window_time
    }

    /// How long a refusal stays in force at most.
    pub fn refusal_cooldown(&self) -> Duration {
        self.settings.refusal_cooldown
    }

    /// The maximum number of sessions with a history of their own.
    pub fn max_sessions(&self) -> usize {
        self.settings.max_sessions
    }

    /// The classifier that judges each call's outcome.
    pub fn classifier(&self) -> &C {
        &self.classifier
    }

    pub(crate) fn events(&self) -> &Events {
        &self.settings.events
    }
}

impl<C: fmt::Debug> fmt::Debug for LoopGuardConfig<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.settings;
        let mut exempt: Vec<&str> = Vec::new();
        let mut own: Vec<(&str, ToolLimits)> = Vec::new();
        for (tool, rule) in &s.tools {
            match rule {
                ToolRule::Exempt => exempt.push(tool),
                ToolRule::Limits(limits) => own.push((tool, *limits)),
            }
        }
        exempt.sort_unstable();
        own.sort_unstable_by_key(|(tool, _)| *tool);
        f.debug_struct("LoopGuardConfig")
            .field("limits", &s.limits)
            .field("exempt", &exempt)
            .field("tool_limits", &own)
            .field("max_cycle_period", &s.cycles.max_period)
            .field("max_cycle_repeats", &s.cycles.max_rounds)
            .field("window_calls", &s.window_calls)
            .field("window_time", &s.window_time)
            .field("max_sessions", &s.max_sessions)
            .field("session_idle_timeout", &s.session_idle_timeout)
            .field("refusal_cooldown", &s.refusal_cooldown)
            .field("circuits", &s.circuits)
            .field("events", &s.events)
            .field("classifier", &self.classifier)
            .finish()
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
/// | [`tool_limits`](Self::tool_limits), [`exempt`](Self::exempt) | none |
/// | [`max_cycle_period`](Self::max_cycle_period) | 3 |
/// | [`max_cycle_repeats`](Self::max_cycle_repeats) | 3 |
/// | [`window_calls`](Self::window_calls) | 16 |
/// | [`window_time`](Self::window_time) | 5 minutes |
/// | [`max_sessions`](Self::max_sessions) | 10 000 |
/// | [`session_idle_timeout`](Self::session_idle_timeout) | 10 minutes |
/// | [`refusal_cooldown`](Self::refusal_cooldown) | 30 s |
/// | [`circuits`](Self::circuits) | none: every circuit reads as closed |
/// | [`events`](Self::events) | none |
/// | [`classifier`](Self::classifier) | [`McpClassifier`] |
#[derive(Debug, Clone)]
pub struct LoopGuardBuilder<C = McpClassifier> {
    limits: ToolLimits,
    tools: Vec<(String, ToolRule)>,
    max_cycle_period: usize,
    max_cycle_repeats: u32,
    window_calls: usize,
    window_time: Duration,
    max_sessions: usize,
    session_idle_timeout: Option<Duration>,
    refusal_cooldown: Duration,
    circuits: Circuits,
    events: Events,
    classifier: C,
}

impl Default for LoopGuardBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopGuardBuilder {
    /// A builder with every default.
    #[must_use]
    pub fn new() -> Self {
        LoopGuardBuilder {
            limits: ToolLimits::default(),
            tools: Vec::new(),
            max_cycle_period: 3,
            max_cycle_repeats: 3,
            window_calls: 16,
            window_time: Duration::from_secs(300),
            max_sessions: 10_000,
            session_idle_timeout: Some(Duration::from_secs(600)),
            refusal_cooldown: DEFAULT_REFUSAL_COOLDOWN,
            circuits: Circuits::none(),
            events: Events::new(),
            classifier: McpClassifier::new(),
        }
    }
}

impl<C> LoopGuardBuilder<C> {
    /// The limits of every tool without limits of its own. Default
    /// [`ToolLimits::new()`]: the 4th identical call after 3 failures is
    /// blocked, so is the 9th identical call whatever the outcomes, and
    /// cycles are detected.
    #[must_use]
    pub fn limits(mut self, limits: ToolLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Gives `tool` limits of its own, replacing the layer's (see
    /// [`ToolLimits`]). Default: none. A tool may not be both exempt and
    /// given limits; given twice, the last limits win.
    #[must_use]
    pub fn tool_limits(mut self, tool: impl Into<String>, limits: ToolLimits) -> Self {
        self.tools.push((tool.into(), ToolRule::Limits(limits)));
        self
    }

    /// Exempts `tool`: its calls are never blocked and never recorded, so
    /// they neither count towards another call's streak nor clear it, and
    /// they never take part in a cycle. For tools that are polled on
    /// purpose (`job_status`, `wait`). Default: none.
    #[must_use]
    pub fn exempt(mut self, tool: impl Into<String>) -> Self {
        self.tools.push((tool.into(), ToolRule::Exempt));
        self
    }

    /// The longest cycle looked for: cycles of 2 to `max_period` distinct
    /// calls (A, B, A, B, ... or A, B, C, A, B, C, ...). Default 3; at most
    /// 8. Cycle detection is turned off through [`ToolLimits::cycles`].
    #[must_use]
    pub fn max_cycle_period(mut self, max_period: usize) -> Self {
        self.max_cycle_period = max_period;
        self
    }

    /// How many full rounds of a cycle are allowed; the call that starts one
    /// more round is blocked. Default 3: A, B, A, B, A, B passes (with a
    /// warning on the 6th call), the next A is blocked. At least 2, and
    /// `max_cycle_period × max_cycle_repeats` must not exceed `window_calls`.
    #[must_use]
    pub fn max_cycle_repeats(mut self, rounds: u32) -> Self {
        self.max_cycle_repeats = rounds;
        self
    }

    /// How many recent calls each session remembers. Default 16; between 2
    /// and 1024. Each session holds exactly this many 32-byte records.
    #[must_use]
    pub fn window_calls(mut self, calls: usize) -> Self {
        self.window_calls = calls;
        self
    }

    /// How long a call is remembered. Default 5 minutes; must be positive.
    #[must_use]
    pub fn window_time(mut self, window: Duration) -> Self {
        self.window_time = window;
        self
    }

    /// The maximum number of sessions with a history of their own. Default
    /// 10 000; at least 1. Past it, new sessions share one overflow
    /// history, so their calls count together (see the crate docs).
    #[must_use]
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Forget a session idle this long. Default 10 minutes; `None` keeps
    /// sessions until the bound pushes new ones into the overflow history.
    /// When set, it must be at least `window_time` (a shorter one would
    /// forget calls still inside the window).
    #[must_use]
    pub fn session_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.session_idle_timeout = idle;
        self
    }

    /// How long a refusal stays in force at most: this long after the
    /// first refusal of a call, the identical call is let through again as
    /// a fresh attempt (its streak restarts), however often it was refused
    /// meanwhile. Default 30 s; must be positive and at most 30 s
    /// ([`MAX_REFUSAL_COOLDOWN`]). A refusal also lifts earlier when the
    /// identical call succeeds in any session of the guard, when the tool's
    /// circuit closes (see [`circuits`](Self::circuits)), or when another
    /// call of the session succeeds.
    #[must_use]
    pub fn refusal_cooldown(mut self, cooldown: Duration) -> Self {
        self.refusal_cooldown = cooldown;
        self
    }

    /// Which circuits are open (in a stack: the circuit breaker's registry,
    /// as a [`Circuits`] view), so that a refusal made while the tool's
    /// circuit was open lifts once it no longer refuses calls. Default
    /// [`Circuits::none()`]: every circuit reads as closed, so this way of
    /// lifting never applies.
    #[must_use]
    pub fn circuits(mut self, circuits: Circuits) -> Self {
        self.circuits = circuits;
        self
    }

    /// Where warnings ([`Event::LoopWarned`](toolwarden_core::Event::LoopWarned))
    /// and blocks ([`Event::LoopDetected`](toolwarden_core::Event::LoopDetected))
    /// are reported. Default: nowhere.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The classifier that decides whether a call failed. Default
    /// [`McpClassifier`]. Share one classifier across the stack.
    pub fn classifier<C2>(self, classifier: C2) -> LoopGuardBuilder<C2> {
        LoopGuardBuilder {
            limits: self.limits,
            tools: self.tools,
            max_cycle_period: self.max_cycle_period,
            max_cycle_repeats: self.max_cycle_repeats,
            window_calls: self.window_calls,
            window_time: self.window_time,
            max_sessions: self.max_sessions,
            session_idle_timeout: self.session_idle_timeout,
            refusal_cooldown: self.refusal_cooldown,
            circuits: self.circuits,
            events: self.events,
            classifier,
        }
    }

    /// Checks the configuration and builds the layer.
    ///
    /// ```
    /// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
    /// let err = LoopGuardLayer::builder()
    ///     .tool_limits("search", ToolLimits { max_repeats: Some(40), ..ToolLimits::new() })
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), "tools.search.max_repeats");
    /// ```
    pub fn build(self) -> Result<LoopGuardLayer<C>, ConfigError> {
        self.validate()?;
        Ok(LoopGuardLayer::from_config(self.assemble()))
    }

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
        if self.max_sessions == 0 {
            return Err(ConfigError::new("max_sessions", "must be at least 1"));
        }
        if self
            .session_idle_timeout
            .is_some_and(|idle| idle < self.window_time)
        {
            return Err(ConfigError::new(
                "session_idle_timeout, window_time",
                "session_idle_timeout must be at least window_time, or calls inside the window are forgotten",
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
        self.limits.validate("limits", window_calls)?;
        let mut exempt = HashMap::<&str, bool>::with_capacity(self.tools.len());
        for (tool, rule) in &self.tools {
            let section = format!("tools.{tool}");
            if let ToolRule::Limits(limits) = rule {
                limits.validate(&section, window_calls)?;
            }
            let is_exempt = *rule == ToolRule::Exempt;
            if *exempt.entry(tool).or_insert(is_exempt) != is_exempt {
                return Err(ConfigError::new(
                    section,
                    "is both exempt and given limits of its own",
                ));
            }
        }
        Ok(())
    }

    /// The configuration, without checks: call [`validate`](Self::validate) first.
    fn assemble(self) -> LoopGuardConfig<C> {
        let mut tools = ToolRules::with_capacity_and_hasher(self.tools.len(), Default::default());
        // Later entries win.
        tools.extend(
            self.tools
                .into_iter()
                .map(|(tool, rule)| (tool.into_boxed_str(), rule)),
        );
        LoopGuardConfig {
            settings: Arc::new(Settings {
                limits: self.limits,
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
                max_sessions: self.max_sessions,
                session_idle_timeout: self.session_idle_timeout,
                refusal_cooldown: self.refusal_cooldown,
                cooldown_ms: u64::try_from(self.refusal_cooldown.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                circuits: self.circuits,
                events: self.events,
            }),
            classifier: self.classifier,
        }
    }
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
        assert_eq!(LoopGuardBuilder::new().validate(), Ok(()));
        let config = LoopGuardConfig::default();
        assert_eq!(config.limits(), ToolLimits::new());
        assert_eq!(config.limits().max_failing_repeats, Some(3));
        assert_eq!(config.limits().max_repeats, Some(8));
        assert!(config.limits().cycles);
        assert_eq!(config.window_calls(), 16);
        assert_eq!(config.window_time(), Duration::from_secs(300));
        assert_eq!(config.max_sessions(), 10_000);
        assert_eq!(config.refusal_cooldown(), Duration::from_secs(30));
        assert_eq!(
            config.settings.session_idle_timeout,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            config.settings.cycles,
            CycleRule {
                max_period: 3,
                max_rounds: 3
            }
        );
    }

    #[test]
    fn every_bad_value_is_refused_by_name() {
        let b = LoopGuardBuilder::new;
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
        assert_eq!(field(b().max_sessions(0).build()), "max_sessions");
        assert_eq!(
            field(
                b().session_idle_timeout(Some(Duration::from_secs(60)))
                    .build()
            ),
            "session_idle_timeout, window_time"
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
            field(b().tool_limits("poll", limits(None, Some(0))).build()),
            "tools.poll.max_repeats"
        );
        assert_eq!(
            field(
                b().exempt("poll")
                    .tool_limits("poll", ToolLimits::new())
                    .build()
            ),
            "tools.poll"
        );
        assert_eq!(
            field(
                b().tool_limits("poll", ToolLimits::new())
                    .exempt("poll")
                    .build()
            ),
            "tools.poll"
        );
        // Values at the edges are accepted.
        let edges = b()
            .window_calls(4)
            .max_cycle_period(2)
            .max_cycle_repeats(2)
            .limits(limits(Some(1), Some(4)));
        assert!(edges.build().is_ok());
        assert!(b()
            .session_idle_timeout(None)
            .limits(limits(None, None))
            .build()
            .is_ok());
        assert!(b()
            .session_idle_timeout(Some(Duration::from_secs(300)))
            .build()
            .is_ok());
    }

    #[test]
    fn tools_resolve_to_their_own_limits_or_the_layers() {
        let layer = LoopGuardBuilder::new()
            .limits(ToolLimits {
                max_failing_repeats: Some(2),
                ..ToolLimits::new()
            })
            .exempt("wait")
            .tool_limits("status", ToolLimits::polling())
            .tool_limits(
                "status",
                ToolLimits {
                    max_failing_repeats: Some(5),
                    ..ToolLimits::polling()
                },
            )
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
}
