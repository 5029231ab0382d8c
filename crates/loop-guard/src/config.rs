//! [`LoopGuardConfig`] (the validated configuration a layer shares with its
//! services) and [`ToolLimits`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Bounds, Circuits, ConfigError, Events, McpClassifier};

use crate::history::{CycleRule, Rules};

/// The largest `window_calls`: a session's memory is `window_calls` records
/// of 40 bytes.
pub const MAX_WINDOW_CALLS: usize = 1024;

/// The longest
/// [`LoopGuardBuilder::refusal_cooldown`](crate::LoopGuardBuilder::refusal_cooldown):
/// a refusal never stays in force longer than this.
pub const MAX_REFUSAL_COOLDOWN: Duration = Duration::from_secs(30);

/// The default [`LoopGuardBuilder::refusal_cooldown`](crate::LoopGuardBuilder::refusal_cooldown).
pub(crate) const DEFAULT_REFUSAL_COOLDOWN: Duration = MAX_REFUSAL_COOLDOWN;

/// The longest cycle that can be looked for.
pub const MAX_CYCLE_PERIOD: usize = 8;

/// How often one tool's identical calls may repeat before they are blocked.
///
/// The same limits apply to every tool unless a tool has its own
/// ([`LoopGuardBuilder::tool`](crate::LoopGuardBuilder::tool)). A tool's
/// own limits replace the layer's for that tool, all fields at once; start
/// from the layer's limits to change one field:
///
/// ```
/// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
/// let limits = ToolLimits { max_failing_repeats: Some(5), ..ToolLimits::new() };
/// let layer = LoopGuardLayer::builder()
///     .limits(limits)
///     // A polling tool: identical successful calls are expected.
///     .tool("job_status", move |b| b.limits(ToolLimits { max_repeats: None, cycles: false, ..limits }))
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

    pub(crate) fn validate(&self, section: &str, window_calls: usize) -> Result<(), ConfigError> {
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
pub(crate) enum ToolRule {
    /// Never blocked, never recorded.
    Exempt,
    /// Guarded with these limits.
    Limits(ToolLimits),
}

impl ToolRule {
    /// The limits of a guarded tool; `None` when it is exempt.
    #[inline]
    fn limits(self) -> Option<ToolLimits> {
        match self {
            ToolRule::Exempt => None,
            ToolRule::Limits(limits) => Some(limits),
        }
    }
}

pub(crate) type ToolRules = HashMap<Box<str>, ToolRule, foldhash::fast::RandomState>;

/// The validated configuration of a [`LoopGuardLayer`](crate::LoopGuardLayer),
/// shared by every service it builds. Cloning it is cheap.
///
/// Read it through [`LoopGuardLayer::config`](crate::LoopGuardLayer::config)
/// or [`LoopGuard::config`](crate::LoopGuard::config); it is built by
/// [`LoopGuardBuilder::build`](crate::LoopGuardBuilder::build).
#[derive(Clone)]
pub struct LoopGuardConfig<C = McpClassifier> {
    pub(crate) settings: Arc<Settings>,
    pub(crate) classifier: C,
}

pub(crate) struct Settings {
    pub(crate) limits: ToolLimits,
    /// The rule of every tool without one of its own.
    pub(crate) default: ToolRule,
    pub(crate) tools: ToolRules,
    pub(crate) cycles: CycleRule,
    pub(crate) window_calls: usize,
    pub(crate) window_time: Duration,
    pub(crate) window_ms: u64,
    pub(crate) bounds: Bounds,
    pub(crate) refusal_cooldown: Duration,
    pub(crate) cooldown_ms: u64,
    pub(crate) circuits: Circuits,
    pub(crate) events: Events,
}

impl<C> LoopGuardConfig<C> {
    /// The limits of `tool`: its own, or the layer's; `None` when it is exempt.
    #[must_use]
    pub fn limits_for(&self, tool: &str) -> Option<ToolLimits> {
        let settings = &*self.settings;
        if settings.tools.is_empty() {
            return settings.default.limits();
        }
        settings
            .tools
            .get(tool)
            .map_or(settings.default, |rule| *rule)
            .limits()
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
    #[must_use]
    pub fn limits(&self) -> ToolLimits {
        self.settings.limits
    }

    /// Whether tools without settings of their own are exempt.
    #[must_use]
    pub fn exempt(&self) -> bool {
        self.settings.default == ToolRule::Exempt
    }

    /// How many recent calls each session remembers.
    #[must_use]
    pub fn window_calls(&self) -> usize {
        self.settings.window_calls
    }

    /// How long a call is remembered.
    #[must_use]
    pub fn window_time(&self) -> Duration {
        self.settings.window_time
    }

    /// How long a refusal stays in force at most.
    #[must_use]
    pub fn refusal_cooldown(&self) -> Duration {
        self.settings.refusal_cooldown
    }

    /// The bounds of the session histories: `max_keys` sessions with a
    /// history of their own, forgotten after `idle_timeout` idle.
    #[must_use]
    pub fn bounds(&self) -> Bounds {
        self.settings.bounds
    }

    /// The classifier that judges each call's outcome.
    #[must_use]
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
            .field("exempt_by_default", &(s.default == ToolRule::Exempt))
            .field("exempt", &exempt)
            .field("tool_limits", &own)
            .field("max_cycle_period", &s.cycles.max_period)
            .field("max_cycle_repeats", &s.cycles.max_rounds)
            .field("window_calls", &s.window_calls)
            .field("window_time", &s.window_time)
            .field("bounds", &s.bounds)
            .field("refusal_cooldown", &s.refusal_cooldown)
            .field("circuits", &s.circuits)
            .field("events", &s.events)
            .field("classifier", &self.classifier)
            .finish()
    }
}
