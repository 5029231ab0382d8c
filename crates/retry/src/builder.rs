//! [`RetryBackoffBuilder`]: the knobs of a
//! [`RetryBackoffLayer`], their defaults and their validation.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use toolwarden_core::overrides::{Overridable, ToolOverrides};
use toolwarden_core::{
    Bounds, ConfigError, Events, FailureClass, KeyBy, KeyedState, McpClassifier, ToolCatalog,
};

use crate::backoff::{Backoff, Jitter};
use crate::budget::{BudgetConfig, RetryBudget};
use crate::layer::{Budgets, RetryBackoffLayer, Shared};
use crate::policy::{CallPolicy, Classes, RetryPolicy, ToolPolicies, DEFAULT_SAFE_METHODS};

/// The longest deadline `build` accepts.
const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// The longest idle timeout given to the per-key budget map (over 500
/// million years): longer ones mean the same, never evicting.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_millis(u64::MAX);

/// Builds a [`RetryBackoffLayer`]; [`build`](Self::build) checks the
/// configuration. Every knob states its default.
pub struct RetryBackoffBuilder<C = McpClassifier> {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    deadline: Duration,
    jitter: Jitter,
    seed: Option<u64>,
    classes: Classes,
    retry_on_client: bool,
    /// Per tool only (see [`RetryBackoffBuilder::safe_to_repeat`]).
    safe_to_repeat: Option<bool>,
    catalog: ToolCatalog,
    safe_methods: Vec<String>,
    budget: Option<BudgetConfig>,
    /// `None`: one budget for the layer.
    key_by: Option<KeyBy>,
    bounds: Bounds,
    events: Events,
    classifier: C,
    tools: ToolOverrides<RetryBackoffBuilder>,
}

impl Overridable for RetryBackoffBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
    }
}

impl<C> fmt::Debug for RetryBackoffBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoffBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("base_delay", &self.base_delay)
            .field("max_delay", &self.max_delay)
            .field("deadline", &self.deadline)
            .field("jitter", &self.jitter)
            .field("classes", &self.classes)
            .field("safe_to_repeat", &self.safe_to_repeat)
            .field("catalog", &self.catalog)
            .field("budget", &self.budget)
            .field("key_by", &self.key_by)
            .field("bounds", &self.bounds)
            .field("tools", &self.tools)
            .finish_non_exhaustive()
    }
}

impl RetryBackoffBuilder {
    pub(crate) fn new() -> Self {
        RetryBackoffBuilder {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            jitter: Jitter::Full,
            seed: None,
            classes: Classes {
                transient: true,
                server: true,
            },
            retry_on_client: false,
            safe_to_repeat: None,
            catalog: ToolCatalog::new(),
            safe_methods: DEFAULT_SAFE_METHODS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
            budget: Some(BudgetConfig::default()),
            key_by: None,
            bounds: Bounds::default(),
            events: Events::new(),
            classifier: McpClassifier::new(),
            tools: ToolOverrides::new(),
        }
    }
}

impl<C> RetryBackoffBuilder<C> {
    /// Attempts in all, the first included: 1 never retries. At least 1.
    /// Default 3.
    #[must_use]
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The ceiling of the first retry's delay, doubled for each further
    /// retry (saturating: the ceiling stops at `max_delay`). Positive (else
    /// `build` names `base_delay`); any larger value, `Duration::MAX`
    /// included, is accepted, a delay that would not end before the deadline
    /// meaning no retry. Default 100 ms.
    #[must_use]
    pub fn base_delay(mut self, base_delay: Duration) -> Self {
        self.base_delay = base_delay;
        self
    }

    /// The largest delay: a computed one is capped at it, and a failure
    /// whose retry-after hint is longer is not retried (it is returned at
    /// once, with its hint). At
    /// least `base_delay` (else `build` names `max_delay`); `Duration::MAX`
    /// is accepted and means no cap but the deadline. Default 10 s.
    #[must_use]
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// How long after the first attempt started a call may still be
    /// retried: no wait ends past it, and a retry still running when it
    /// passes is dropped (cancelled) and the call fails with
    /// [`CallTimedOut`](toolwarden_core::classify::CallTimedOut), a timeout
    /// that is not `before_sent` (the retry may have reached the tool); a
    /// retry still waiting for readiness then gives back the previous
    /// failure (see the [crate docs](crate#when)). The first attempt is never
    /// cut short; put a timeout layer below this one to bound each attempt.
    /// Positive, at most 24 h (else `build` names `deadline`). Default 30 s.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How the backoff is randomised. Default [`Jitter::Full`].
    #[must_use]
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Seeds the jitter, so a test sees the same delays on every run (each
    /// call gets its own stream, in the order calls first retry). Default:
    /// unseeded (the thread's random generator).
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.tools.layer_wide("jitter_seed");
        self.seed = Some(seed);
        self
    }

    /// The failure classes retried. Only [`FailureClass::Transient`] and
    /// [`FailureClass::Server`] may be named, and at least one: a client
    /// error never succeeds by being repeated. Rejections by layers below are
    /// `Transient`. Default: both.
    #[must_use]
    pub fn retry_on(mut self, classes: impl IntoIterator<Item = FailureClass>) -> Self {
        self.classes = Classes {
            transient: false,
            server: false,
        };
        self.retry_on_client = false;
        for class in classes {
            match class {
                FailureClass::Transient => self.classes.transient = true,
                FailureClass::Server => self.classes.server = true,
                FailureClass::Client => self.retry_on_client = true,
            }
        }
        self
    }

    /// The catalog that says which tools are safe to repeat after a failure
    /// that may have reached the server (configured so, or a trusted catalog
    /// whose annotations say read-only or idempotent). Share the one the
    /// rest of the stack fills from `tools/list`. Default: an empty,
    /// untrusted catalog, **so by default no tool is retried after a failure
    /// that may have reached the server**; only failures before the request
    /// left (connection refused) and rejections with a retry-after hint are.
    #[must_use]
    pub fn catalog(mut self, catalog: ToolCatalog) -> Self {
        self.tools.layer_wide("catalog");
        self.catalog = catalog;
        self
    }

    /// Inside [`tool`](Self::tool) only: whether the tool is safe to repeat
    /// after a failure that may have reached the server, overriding the
    /// catalog for this layer only. Default: the catalog decides.
    ///
    /// The knob is per tool: on the layer's builder `build` refuses it,
    /// naming `safe_to_repeat` (a blanket "every tool is safe" would repeat
    /// destructive tools; give the catalog the tools' policies, or name
    /// each tool).
    ///
    /// ```
    /// use toolwarden_retry::RetryBackoffLayer;
    /// let layer = RetryBackoffLayer::builder()
    ///     .tool("send_email", |b| b.safe_to_repeat(false)) // whatever its annotations say
    ///     .tool("lookup", |b| b.safe_to_repeat(true))
    ///     .build();
    /// assert!(layer.is_ok());
    ///
    /// let err = RetryBackoffLayer::builder().safe_to_repeat(true).build().unwrap_err();
    /// assert_eq!(err.field(), "safe_to_repeat");
    /// ```
    #[must_use]
    pub fn safe_to_repeat(mut self, safe: bool) -> Self {
        self.safe_to_repeat = Some(safe);
        self
    }

    /// The methods other than `tools/call` that may be repeated after a
    /// failure that may have reached the server; replaces the list.
    /// Default: [`DEFAULT_SAFE_METHODS`] (`tools/list`, `prompts/list`,
    /// `prompts/get`, `resources/list`, `resources/templates/list`,
    /// `resources/read`, `ping`).
    #[must_use]
    pub fn safe_methods<I, S>(mut self, methods: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tools.layer_wide("safe_methods");
        self.safe_methods = methods.into_iter().map(Into::into).collect();
        self
    }

    /// The retry budget. Default: [`BudgetConfig::default()`] (ratio 0.2,
    /// 10 retries per second floor, 10 s window), one budget for the layer.
    #[must_use]
    pub fn budget(mut self, budget: BudgetConfig) -> Self {
        self.tools.layer_wide("budget");
        self.budget = Some(budget);
        self
    }

    /// Keeps one budget per key (per tool with [`KeyBy::Tool`]) instead of
    /// one for the layer, in a map bounded by [`bounds`](Self::bounds).
    /// Default: one budget for the layer (no map, no key computed per call).
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.tools.layer_wide("key_by");
        self.key_by = Some(key_by);
        self
    }

    /// The bounds of the per-key budgets of [`key_by`](Self::key_by)
    /// (unused without it): past `max_keys`, new keys share one overflow
    /// budget; a key idle for `idle_timeout` is evicted. `max_keys` must be
    /// at least 1 and `idle_timeout` non-zero (else `build` names
    /// `bounds.<field>`); an idle timeout past `u64::MAX` milliseconds
    /// (`Duration::MAX`) means never evicting. Default [`Bounds::default`]
    /// (10 000 keys, 10 minutes idle).
    #[must_use]
    pub fn bounds(mut self, bounds: Bounds) -> Self {
        self.tools.layer_wide("bounds");
        self.bounds = bounds;
        self
    }

    /// No retry budget: only `max_attempts` and the deadline bound retries.
    /// Not recommended: nothing then stops a retry storm.
    #[must_use]
    pub fn no_budget(mut self) -> Self {
        self.tools.layer_wide("no_budget");
        self.budget = None;
        self
    }

    /// Where retry and budget-exhausted events go. Default: nowhere.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.events = events;
        self
    }

    /// The classifier that judges each attempt; share the stack's. Default
    /// [`McpClassifier`].
    #[must_use]
    pub fn classifier<C2>(mut self, classifier: C2) -> RetryBackoffBuilder<C2> {
        self.tools.layer_wide("classifier");
        RetryBackoffBuilder {
            max_attempts: self.max_attempts,
            base_delay: self.base_delay,
            max_delay: self.max_delay,
            deadline: self.deadline,
            jitter: self.jitter,
            seed: self.seed,
            classes: self.classes,
            retry_on_client: self.retry_on_client,
            safe_to_repeat: self.safe_to_repeat,
            catalog: self.catalog,
            safe_methods: self.safe_methods,
            budget: self.budget,
            key_by: self.key_by,
            bounds: self.bounds,
            events: self.events,
            classifier,
            tools: self.tools,
        }
    }

    /// Gives the calls of `tool` their own attempts, delays, deadline,
    /// failure classes and safety to repeat. Default: no overrides (every
    /// call follows this builder's, and the catalog says which tools are
    /// safe to repeat).
    ///
    /// At [`build`](Self::build), `configure` receives a fresh builder
    /// carrying this builder's final values of `max_attempts`, `base_delay`,
    /// `max_delay`, `deadline`, `jitter` and `retry_on` (so the order of the
    /// calls does not matter), and those six knobs of the builder it returns
    /// become the tool's, with [`safe_to_repeat`](Self::safe_to_repeat)
    /// (unset: the catalog decides). Everything else stays layer-wide and
    /// comes from this builder: the retry budget (`budget`, `key_by`,
    /// `bounds`), the catalog, the safe methods, the jitter seed, the events
    /// and the classifier are layer-wide, and `build` refuses a `configure`
    /// that sets one (`tools."<tool>".<knob>`).
    /// Calling `tool` again for the same tool applies both closures, in
    /// order (the core's
    /// [`ToolOverrides`](toolwarden_core::overrides::ToolOverrides), shared
    /// by every layer builder).
    ///
    /// `max_attempts(1)` never retries the tool (a call of it then neither
    /// deposits into nor draws on the budget). An override applies to
    /// `tools/call` requests naming `tool`; other methods follow this
    /// builder. The tool's knobs are picked once per call, by a lookup of
    /// the tool name that is skipped when no tool has an override.
    ///
    /// `build` validates each tool's values like this builder's, the error
    /// naming `tools."<tool>".<field>`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), toolwarden_core::BoxError> {
    /// use std::time::Duration;
    /// use serde_json::json;
    /// use tower::{Layer, ServiceExt};
    /// use toolwarden_core::{classify::TransportErrorKind, jsonrpc::Request, testing::{MockMcp, Step}};
    /// use toolwarden_retry::RetryBackoffLayer;
    ///
    /// let retry = RetryBackoffLayer::builder()
    ///     .max_attempts(3)
    ///     .tool("send_email", |b| b.max_attempts(1)) // never retried
    ///     .tool("search", |b| b.deadline(Duration::from_secs(5)))
    ///     .build()?;
    /// // Connection refused: safe to repeat for any tool, if its policy allows.
    /// let refused = Step::Transport(TransportErrorKind::ConnectFailed);
    /// let upstream = MockMcp::new()
    ///     .default_step("send_email", refused.clone())
    ///     .default_step("fetch", refused);
    /// for (id, tool) in [(1, "send_email"), (2, "fetch")] {
    ///     let call = Request::tool_call(id, tool, json!({}));
    ///     assert!(retry.layer(upstream.clone()).oneshot(call).await.is_err());
    /// }
    /// assert_eq!(upstream.calls("send_email"), 1);
    /// assert_eq!(upstream.calls("fetch"), 3);
    ///
    /// let err = RetryBackoffLayer::builder()
    ///     .tool("search", |b| b.max_attempts(0))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), r#"tools."search".max_attempts"#);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(RetryBackoffBuilder) -> RetryBackoffBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    /// The knobs a tool may override, as this builder has them.
    fn call_policy(&self) -> CallPolicy {
        CallPolicy {
            backoff: Backoff {
                base: self.base_delay,
                max: self.max_delay,
                jitter: self.jitter,
            },
            max_attempts: self.max_attempts,
            deadline: self.deadline,
            classes: self.classes,
            safe_to_repeat: self.safe_to_repeat,
        }
    }

    /// Checks the knobs a tool may override.
    fn validate_call_policy(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new("max_attempts", "must be at least 1"));
        }
        if self.base_delay.is_zero() {
            return Err(ConfigError::new("base_delay", "must be positive"));
        }
        if self.max_delay < self.base_delay {
            return Err(ConfigError::new("max_delay", "must be at least base_delay"));
        }
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(ConfigError::new(
                "deadline",
                "must be positive and at most 24 h",
            ));
        }
        if self.retry_on_client {
            return Err(ConfigError::new(
                "retry_on",
                "must not name Client: a client error fails the same way when repeated",
            ));
        }
        if !self.classes.transient && !self.classes.server {
            return Err(ConfigError::new(
                "retry_on",
                "must name Transient, Server or both (use max_attempts(1) to disable retries)",
            ));
        }
        Ok(())
    }

    /// Applies the overrides of [`tool`](Self::tool) to this builder's
    /// (validated) knobs and validates each tool's.
    fn tool_call_policies(&mut self) -> Result<ToolPolicies, ConfigError> {
        let overrides = std::mem::take(&mut self.tools);
        if overrides.is_empty() {
            return Ok(ToolPolicies::default());
        }
        let resolved = overrides.resolve(
            || RetryBackoffBuilder {
                max_attempts: self.max_attempts,
                base_delay: self.base_delay,
                max_delay: self.max_delay,
                deadline: self.deadline,
                jitter: self.jitter,
                classes: self.classes,
                retry_on_client: self.retry_on_client,
                ..RetryBackoffBuilder::new()
            },
            |built| {
                built.validate_call_policy()?;
                Ok(built.call_policy())
            },
        )?;
        let mut policies = ToolPolicies::default();
        for (tool, policy) in resolved {
            policies
                .insert(tool, policy)
                .ok_or_else(|| ConfigError::new("tools", "too many tools"))?;
        }
        Ok(policies)
    }

    /// Checks the configuration and builds the layer. The error names the
    /// bad field (`budget.ratio` for a field of the budget,
    /// `tools."<tool>".<field>` for a tool's override, see [`tool`](Self::tool)).
    pub fn build(mut self) -> Result<RetryBackoffLayer<C>, ConfigError> {
        self.validate_call_policy()?;
        if self.safe_to_repeat.is_some() {
            return Err(ConfigError::new(
                "safe_to_repeat",
                "is set per tool (`.tool(name, |b| b.safe_to_repeat(..))`); the catalog decides for the others",
            ));
        }
        if let Some(budget) = &self.budget {
            budget.validate().map_err(|e| e.in_section("budget"))?;
        }
        self.bounds.validate().map_err(|e| e.in_section("bounds"))?;
        let tools = self.tool_call_policies()?;
        Ok(self.into_layer(tools))
    }

    /// The layer of this builder's (valid) configuration; `tools` are the
    /// validated per-tool knobs (see [`tool`](Self::tool)).
    pub(crate) fn into_layer(self, tools: ToolPolicies) -> RetryBackoffLayer<C> {
        let call = self.call_policy();
        let budget = match (self.budget, self.key_by) {
            (None, _) => Budgets::Off,
            // `build` validated the configuration (the defaults are valid).
            (Some(config), None) => Budgets::Global(Box::new(RetryBudget::from_validated(config))),
            (Some(config), Some(key_by)) => {
                let mut bounds = self.bounds;
                // The keyed map counts the idle timeout in whole milliseconds
                // of a u64; a longer one is "never idle" there too.
                bounds.idle_timeout = bounds.idle_timeout.map(|idle| idle.min(MAX_IDLE_TIMEOUT));
                Budgets::Keyed {
                    key_by,
                    state: KeyedState::new(bounds, move |_| RetryBudget::from_validated(config)),
                }
            }
        };
        RetryBackoffLayer::from_shared(Shared {
            policy: RetryPolicy {
                call,
                tools,
                catalog: self.catalog,
                safe_methods: self.safe_methods,
            },
            classifier: self.classifier,
            budget,
            events: self.events,
            seed: self.seed.map(|s| (s, AtomicU64::new(0))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use toolwarden_core::jsonrpc::Request;

    #[test]
    fn defaults_are_documented_values() {
        let b = RetryBackoffLayer::builder();
        assert_eq!(b.max_attempts, 3);
        assert_eq!(b.base_delay, Duration::from_millis(100));
        assert_eq!(b.max_delay, Duration::from_secs(10));
        assert_eq!(b.deadline, Duration::from_secs(30));
        assert_eq!(b.jitter, Jitter::Full);
        assert_eq!(b.budget, Some(BudgetConfig::default()));
        assert!(!b.catalog.is_trusted() && b.catalog.is_empty());
        assert!(b.build().is_ok());
        assert!(RetryBudget::new(BudgetConfig::default()).is_ok());
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let field = |b: RetryBackoffBuilder| b.build().unwrap_err().field().to_owned();
        let b = RetryBackoffLayer::builder;
        assert_eq!(field(b().max_attempts(0)), "max_attempts");
        assert_eq!(field(b().base_delay(Duration::ZERO)), "base_delay");
        assert_eq!(
            field(
                b().base_delay(Duration::from_secs(2))
                    .max_delay(Duration::from_secs(1))
            ),
            "max_delay"
        );
        assert_eq!(field(b().deadline(Duration::ZERO)), "deadline");
        assert_eq!(
            field(b().deadline(Duration::from_secs(24 * 3600 + 1))),
            "deadline"
        );
        assert_eq!(
            field(b().retry_on([FailureClass::Server, FailureClass::Client])),
            "retry_on"
        );
        assert_eq!(field(b().retry_on([])), "retry_on");
        let bad_ratio = BudgetConfig {
            ratio: -1.0,
            ..BudgetConfig::default()
        };
        assert_eq!(field(b().budget(bad_ratio)), "budget.ratio");
        // A bad budget is ignored once the budget is switched off.
        assert!(b().budget(bad_ratio).no_budget().build().is_ok());
        assert_eq!(
            field(b().key_by(KeyBy::Tool).bounds(Bounds::max_keys(0))),
            "bounds.max_keys"
        );
        assert_eq!(field(b().safe_to_repeat(true)), "safe_to_repeat");
    }

    #[test]
    fn bad_tool_values_name_the_tool_and_field() {
        let field = |b: RetryBackoffBuilder| b.build().unwrap_err().field().to_owned();
        let b = RetryBackoffLayer::builder;
        assert_eq!(
            field(b().tool("search", |t| t.max_attempts(0))),
            r#"tools."search".max_attempts"#
        );
        assert_eq!(
            field(b().tool("search", |t| t.base_delay(Duration::ZERO))),
            r#"tools."search".base_delay"#
        );
        // Checked against the outer builder's final values, whatever the order.
        assert_eq!(
            field(
                b().tool("search", |t| t.base_delay(Duration::from_secs(20)))
                    .max_delay(Duration::from_secs(15))
            ),
            r#"tools."search".max_delay"#
        );
        assert_eq!(
            field(b().tool("search", |t| t.deadline(Duration::from_secs(24 * 3600 + 1)))),
            r#"tools."search".deadline"#
        );
        assert_eq!(
            field(b().tool("search", |t| t.retry_on([FailureClass::Client]))),
            r#"tools."search".retry_on"#
        );
        assert_eq!(field(b().tool("", |t| t)), "tools");
        assert_eq!(
            field(b().tool("a", |t| t.tool("b", |u| u))),
            r#"tools."a".tools"#
        );
        // The outer builder's errors come first and are not prefixed.
        assert_eq!(
            field(b().max_attempts(0).tool("search", |t| t.max_attempts(2))),
            "max_attempts"
        );
        // Layer-wide settings are refused in a tool's closure, never ignored.
        assert_eq!(
            field(b().tool("search", |t| t.budget(BudgetConfig::default()))),
            r#"tools."search".budget"#
        );
        assert_eq!(
            field(b().tool("search", |t| t.no_budget())),
            r#"tools."search".no_budget"#
        );
    }

    #[test]
    fn tools_get_the_outer_values_they_do_not_override() {
        let layer = RetryBackoffLayer::builder()
            .tool("search", |t| t.max_attempts(1))
            .tool("fetch", |t| t)
            .max_attempts(5)
            .base_delay(Duration::from_millis(10))
            .max_delay(Duration::from_millis(500))
            .deadline(Duration::from_secs(3))
            .jitter(Jitter::Equal)
            .retry_on([FailureClass::Server])
            .build()
            .unwrap();
        let policy = &layer.shared().policy;
        let of = |tool: &str| *policy.call_policy(&Request::tool_call(1, tool, json!({})));
        assert_eq!(of("fetch"), policy.call);
        assert_eq!(
            of("search"),
            CallPolicy {
                max_attempts: 1,
                ..policy.call
            }
        );
        assert_ne!(of("search"), of("fetch"));
        assert_eq!(policy.call.backoff.jitter, Jitter::Equal);
        assert!(!policy.call.classes.transient);
        // Without overrides there is nothing to look up.
        assert!(RetryBackoffLayer::new().shared().policy.tools.is_empty());
    }

    /// Issue 15: no value of any knob makes `build` or a call panic.
    mod extreme_configuration {
        use std::time::Duration;

        use proptest::prelude::*;
        use serde_json::json;
        use toolwarden_core::jsonrpc::{ErrorObject, Request};
        use toolwarden_core::testing::{MockMcp, Step};
        use toolwarden_core::{
            classify::TransportErrorKind, Bounds, FailureClass, KeyBy, Outcome, OutcomeKind,
        };
        use tower::{Layer, ServiceExt};

        use crate::policy::FailedAttempt;
        use crate::{BudgetConfig, Jitter, RetryBackoffBuilder, RetryBackoffLayer};

        fn duration() -> impl Strategy<Value = Duration> {
            prop_oneof![
                Just(Duration::ZERO),
                Just(Duration::from_nanos(1)),
                Just(Duration::MAX),
                Just(Duration::new(u64::MAX, 0)),
                Just(Duration::from_millis(u64::MAX)),
                Just(Duration::from_nanos(u64::MAX)),
                Just(Duration::from_secs(24 * 3600)),
                Just(Duration::from_secs(24 * 3600) + Duration::from_nanos(1)),
                Just(Duration::from_secs(3600)),
                Just(Duration::from_secs(1)),
                (0u64..100_000).prop_map(Duration::from_millis),
                any::<u64>().prop_map(Duration::from_nanos),
                (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            ]
        }

        /// Mostly in range, often at its edges, sometimes anything.
        fn within(low: Duration, high: Duration) -> impl Strategy<Value = Duration> {
            let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            prop_oneof![
                1 => Just(low),
                1 => Just(high),
                2 => (nanos(low)..=nanos(high)).prop_map(Duration::from_nanos),
                2 => duration(),
            ]
        }

        fn float() -> impl Strategy<Value = f64> {
            prop_oneof![
                2 => 0.0..=10.0f64,
                3 => extreme_float(),
            ]
        }

        fn extreme_float() -> impl Strategy<Value = f64> {
            prop_oneof![
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(-0.0),
                Just(-1.0),
                Just(f64::MIN),
                Just(f64::MAX),
                Just(f64::MIN_POSITIVE),
                Just(f64::EPSILON),
                Just(1e20),
                Just(0.0005),
                Just(0.001),
                Just(10.0),
                Just(10.000_000_001),
                0.0..=10.0f64,
                any::<f64>(),
            ]
        }

        fn attempts() -> impl Strategy<Value = u32> {
            prop_oneof![1 => Just(0), 1 => Just(1), 4 => 2..=20u32, 1 => Just(u32::MAX)]
        }

        fn jitter() -> impl Strategy<Value = Jitter> {
            prop_oneof![
                Just(Jitter::None),
                Just(Jitter::Full),
                Just(Jitter::Equal),
                Just(Jitter::Decorrelated),
            ]
        }

        #[derive(Debug, Clone)]
        struct Knobs {
            max_attempts: u32,
            base_delay: Duration,
            max_delay: Duration,
            deadline: Duration,
            jitter: Jitter,
            seed: u64,
        }

        fn knobs() -> impl Strategy<Value = Knobs> {
            let base = within(Duration::from_nanos(1), Duration::MAX);
            let max = prop_oneof![1 => Just(Duration::MAX), 1 => duration()];
            let deadline = within(Duration::from_nanos(1), Duration::from_secs(24 * 3600));
            (attempts(), base, max, deadline, jitter(), any::<u64>()).prop_map(
                |(max_attempts, base_delay, max_delay, deadline, jitter, seed)| Knobs {
                    max_attempts,
                    base_delay,
                    max_delay,
                    deadline,
                    jitter,
                    seed,
                },
            )
        }

        fn apply(b: RetryBackoffBuilder, k: &Knobs) -> RetryBackoffBuilder {
            b.max_attempts(k.max_attempts)
                .base_delay(k.base_delay)
                .max_delay(k.max_delay)
                .deadline(k.deadline)
                .jitter(k.jitter)
        }

        #[derive(Debug, Clone)]
        struct Config {
            layer: Knobs,
            tool: Option<Knobs>,
            budget: Option<(f64, u32, Duration)>,
            per_key: Option<(usize, Option<Duration>)>,
        }

        fn config() -> impl Strategy<Value = Config> {
            let budget = (
                float(),
                prop_oneof![
                    Just(0u32),
                    Just(10),
                    Just(1_000_000),
                    Just(1_000_001),
                    any::<u32>()
                ],
                within(Duration::from_secs(1), Duration::from_secs(3600)),
            );
            let per_key = (
                prop_oneof![1 => Just(0usize), 2 => Just(1), 2 => Just(usize::MAX)],
                proptest::option::of(duration()),
            );
            (
                knobs(),
                proptest::option::of(knobs()),
                proptest::option::of(budget),
                proptest::option::of(per_key),
            )
                .prop_map(|(layer, tool, budget, per_key)| Config {
                    layer,
                    tool,
                    budget,
                    per_key,
                })
        }

        fn builder(c: &Config) -> RetryBackoffBuilder {
            let mut b = apply(RetryBackoffLayer::builder(), &c.layer)
                .jitter_seed(c.layer.seed)
                .retry_on([FailureClass::Transient, FailureClass::Server])
                .tool("search", |t| t.safe_to_repeat(true))
                .tool("fetch", |t| t.safe_to_repeat(true));
            if let Some(tool) = c.tool.clone() {
                b = b.tool("fetch", move |t| apply(t, &tool));
            }
            b = match c.budget {
                Some((ratio, min_per_sec, ttl)) => b.budget(BudgetConfig {
                    ratio,
                    min_per_sec,
                    ttl,
                }),
                None => b.no_budget(),
            };
            if let Some((max_keys, idle_timeout)) = c.per_key {
                b = b.key_by(KeyBy::Tool).bounds(Bounds {
                    max_keys,
                    idle_timeout,
                });
            }
            b
        }

        /// The fields `build` may name.
        const FIELDS: &[&str] = &[
            "max_attempts",
            "base_delay",
            "max_delay",
            "deadline",
            "budget.ratio",
            "budget.min_per_sec",
            "budget.ttl",
            "budget.ratio, min_per_sec",
            "bounds.max_keys",
            "bounds.idle_timeout",
            r#"tools."fetch".max_attempts"#,
            r#"tools."fetch".base_delay"#,
            r#"tools."fetch".max_delay"#,
            r#"tools."fetch".deadline"#,
        ];

        /// Failures of every kind a retry decision reads, with hints of
        /// every size; the n-th call of a tool takes the n-th step, then
        /// succeeds, so every call ends.
        fn failing_steps() -> Vec<Step> {
            let limited = |hint: serde_json::Value| {
                let mut error = ErrorObject::new(-32023, "rate limited");
                error.data = Some(json!({ "retryAfter": hint }));
                Step::RpcError(error)
            };
            vec![
                Step::Transport(TransportErrorKind::ConnectFailed),
                limited(json!(1e20)),
                Step::tool_error("temporarily unavailable"),
                limited(json!(u64::MAX)),
                Step::Transport(TransportErrorKind::ConnectFailed).after(Duration::from_secs(3600)),
                limited(json!(-1)),
                Step::rpc_error(-32603, "internal error"),
                limited(json!(0.001)),
                Step::tool_error("connection reset"),
                Step::Transport(TransportErrorKind::Closed),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn any_configuration_builds_or_names_its_field_and_never_panics(c in config()) {
                let layer = match builder(&c).build() {
                    Ok(layer) => layer,
                    Err(e) => {
                        prop_assert!(FIELDS.contains(&e.field()), "{e}");
                        return Ok(());
                    }
                };
                // The backoff of every policy, for 20 retries, with any hint.
                let policy = &layer.shared().policy;
                for tool in ["search", "fetch"] {
                    let request = Request::tool_call(1, tool, json!({}));
                    let (_, call) = policy.select(&request);
                    let mut rng = fastrand::Rng::with_seed(c.layer.seed);
                    let mut previous = call.backoff.base;
                    for retry in 1..=20 {
                        let delay = call.backoff.delay(retry, previous, &mut rng);
                        prop_assert!(delay <= call.backoff.max.max(call.backoff.base));
                        previous = delay;
                        for hint in [None, Some(Duration::ZERO), Some(Duration::MAX), Some(call.deadline)] {
                            let mut outcome = Outcome::failure(OutcomeKind::Transport, FailureClass::Transient);
                            outcome.retry_after = hint;
                            for remaining in [Duration::ZERO, call.deadline, Duration::MAX] {
                                let failed = FailedAttempt { call, request: &request, outcome: &outcome, attempt: retry, previous, remaining };
                                let _ = policy.verdict(&failed, &mut rng);
                            }
                        }
                    }
                }
                // A few calls on a paused clock.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let upstream = MockMcp::new()
                        .script("search", failing_steps())
                        .script("fetch", failing_steps());
                    for (id, tool) in [(1, "search"), (2, "fetch"), (3, "search"), (4, "fetch")] {
                        let request = Request::tool_call(id, tool, json!({}));
                        let result = layer.layer(upstream.clone()).oneshot(request).await;
                        if let Ok(response) = result {
                            assert_eq!(response.id, id.into());
                        }
                    }
                    assert_eq!(upstream.in_flight(), 0);
                });
            }
        }
    }
}
