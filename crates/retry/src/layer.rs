//! [`RetryBackoffLayer`] and its builder.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::{
    Bounds, ConfigError, Entry, Events, FailureClass, KeyBy, KeyedState, McpClassifier, McpRequest,
    ToolCatalog,
};
use tower_layer::Layer;

use crate::backoff::{Backoff, Jitter};
use crate::budget::{BudgetConfig, RetryBudget};
use crate::policy::{CallPolicy, Classes, RetryPolicy, ToolPolicies, DEFAULT_SAFE_METHODS};
use crate::service::RetryBackoff;

/// The longest deadline `build` accepts.
const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// The longest idle timeout given to the per-key budget map (over 500
/// million years): longer ones mean the same, never evicting.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_millis(u64::MAX);

/// Applies [`RetryBackoff`] to a service: retries failed MCP calls with
/// exponential backoff and jitter, only when the failure class, the tool and
/// the retry budget allow it. See the [crate docs](crate) for the rules.
///
/// The layer holds configuration and the retry budget: every service it
/// makes, and every clone of those, draws on one budget (per key, with
/// [`RetryBackoffBuilder::budget_per_key`]).
///
/// ```
/// use std::time::Duration;
/// use toolwarden_retry::{Jitter, RetryBackoffLayer};
/// let layer = RetryBackoffLayer::builder()
///     .max_attempts(4)
///     .base_delay(Duration::from_millis(50))
///     .jitter(Jitter::Equal)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
pub struct RetryBackoffLayer<C = McpClassifier> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for RetryBackoffLayer<C> {
    fn clone(&self) -> Self {
        RetryBackoffLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> fmt::Debug for RetryBackoffLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoffLayer")
            .field("policy", &self.shared.policy)
            .field("budget", &self.shared.budget)
            .field("events", &self.shared.events)
            .finish_non_exhaustive()
    }
}

impl RetryBackoffLayer {
    /// A layer with every default (see [`RetryBackoffBuilder`]). With the
    /// default empty, untrusted catalog it retries only failures that
    /// happened before the request left, rejections carrying a retry-after
    /// hint, and the read-only methods of [`DEFAULT_SAFE_METHODS`].
    #[must_use]
    pub fn new() -> Self {
        RetryBackoffLayer {
            shared: Arc::new(Shared::from_builder(
                RetryBackoffBuilder::new(),
                ToolPolicies::default(),
            )),
        }
    }

    /// A builder, starting from the defaults.
    #[must_use]
    pub fn builder() -> RetryBackoffBuilder {
        RetryBackoffBuilder::new()
    }
}

impl Default for RetryBackoffLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryBackoffLayer<C> {
    /// The deadline of a call whose tool has no override of its own (see
    /// [`RetryBackoffBuilder::deadline`]).
    #[must_use]
    pub fn deadline(&self) -> Duration {
        self.shared.policy.call.deadline
    }

    /// Whole retries the budget allows right now for `request` (for its key,
    /// with a per-key budget); `None` without a budget.
    pub fn budget_available<R: McpRequest>(&self, request: &R) -> Option<u64> {
        match &self.shared.budget {
            Budgets::Off => None,
            Budgets::Global(budget) => Some(budget.available()),
            Budgets::Keyed { key_by, state } => {
                let key = key_by.key(request);
                // Reading must not insert a key: an unseen key has a fresh budget.
                Some(match state.get(&key) {
                    Some(budget) => budget.available(),
                    None => state.make_value(&key.to_key()).available(),
                })
            }
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared<C>> {
        &self.shared
    }
}

impl<S, C> Layer<S> for RetryBackoffLayer<C> {
    type Service = RetryBackoff<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryBackoff::new(inner, self)
    }
}

/// State shared by the layer, its services and their futures.
pub(crate) struct Shared<C> {
    pub(crate) policy: RetryPolicy,
    pub(crate) classifier: C,
    pub(crate) budget: Budgets,
    pub(crate) events: Events,
    pub(crate) seed: Option<(u64, AtomicU64)>,
}

impl<C> Shared<C> {
    /// `tools` are the validated per-tool knobs (see [`RetryBackoffBuilder::tool`]).
    fn from_builder(b: RetryBackoffBuilder<C>, tools: ToolPolicies) -> Self {
        let call = b.call_policy();
        let budget = match (b.budget, b.budget_key) {
            (None, _) => Budgets::Off,
            // `build` validated the configuration (the defaults are valid).
            (Some(config), None) => Budgets::Global(RetryBudget::from_validated(config)),
            (Some(config), Some((key_by, mut bounds))) => {
                // The keyed map counts the idle timeout in whole milliseconds
                // of a u64; a longer one is "never idle" there too.
                bounds.idle_timeout = bounds.idle_timeout.map(|idle| idle.min(MAX_IDLE_TIMEOUT));
                Budgets::Keyed {
                    key_by,
                    state: KeyedState::new(bounds, move |_| RetryBudget::from_validated(config)),
                }
            }
        };
        Shared {
            policy: RetryPolicy {
                call,
                tools,
                catalog: b.catalog,
                tool_overrides: b.tool_overrides,
                safe_methods: b.safe_methods,
            },
            classifier: b.classifier,
            budget,
            events: b.events,
            seed: b.seed.map(|s| (s, AtomicU64::new(0))),
        }
    }

    /// A random source for one call's jitter: from the configured seed (one
    /// stream per call, in call order), else from the thread's generator.
    pub(crate) fn rng(&self) -> fastrand::Rng {
        match &self.seed {
            Some((seed, calls)) => {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                fastrand::Rng::with_seed(seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            }
            None => fastrand::Rng::new(),
        }
    }
}

/// The budget of a layer: none, one, or one per key.
pub(crate) enum Budgets {
    Off,
    Global(RetryBudget),
    Keyed {
        key_by: KeyBy,
        state: KeyedState<RetryBudget>,
    },
}

/// The budget a call draws on, held by its future.
#[derive(Debug)]
pub(crate) enum BudgetHandle {
    /// No budget, or the call is never retried.
    None,
    /// The layer's one budget.
    Global,
    /// One key's budget.
    Keyed(Entry<RetryBudget>),
}

impl Budgets {
    /// Deposits one request and returns the handle its retries withdraw from.
    #[inline]
    pub(crate) fn deposit<R: McpRequest>(&self, request: &R, now: Instant) -> BudgetHandle {
        match self {
            Budgets::Off => BudgetHandle::None,
            Budgets::Global(budget) => {
                budget.deposit_at(now);
                BudgetHandle::Global
            }
            Budgets::Keyed { key_by, state } => {
                let entry = state.entry(key_by.key(request));
                entry.deposit_at(now);
                BudgetHandle::Keyed(entry)
            }
        }
    }

    /// The budget `handle` refers to.
    pub(crate) fn get<'a>(&'a self, handle: &'a BudgetHandle) -> Option<&'a RetryBudget> {
        match (handle, self) {
            (BudgetHandle::Global, Budgets::Global(budget)) => Some(budget),
            (BudgetHandle::Keyed(entry), _) => Some(entry),
            _ => None,
        }
    }
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budgets::Off => f.write_str("Off"),
            Budgets::Global(budget) => f.debug_tuple("Global").field(budget).finish(),
            Budgets::Keyed { key_by, state } => f
                .debug_struct("Keyed")
                .field("key_by", key_by)
                .field("state", state)
                .finish(),
        }
    }
}

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
    catalog: ToolCatalog,
    tool_overrides: HashMap<String, bool>,
    safe_methods: Vec<String>,
    budget: Option<BudgetConfig>,
    budget_key: Option<(KeyBy, Bounds)>,
    events: Events,
    classifier: C,
    tool_policies: Vec<ToolOverride>,
}

/// A closure given to [`RetryBackoffBuilder::tool`].
type Configure = Box<dyn FnOnce(RetryBackoffBuilder) -> RetryBackoffBuilder + Send>;

/// One call of [`RetryBackoffBuilder::tool`], applied at `build`.
struct ToolOverride {
    tool: String,
    configure: Configure,
}

impl<C> fmt::Debug for RetryBackoffBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tools: Vec<&str> = self.tool_policies.iter().map(|o| o.tool.as_str()).collect();
        f.debug_struct("RetryBackoffBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("base_delay", &self.base_delay)
            .field("max_delay", &self.max_delay)
            .field("deadline", &self.deadline)
            .field("jitter", &self.jitter)
            .field("classes", &self.classes)
            .field("catalog", &self.catalog)
            .field("budget", &self.budget)
            .field("tool_policies", &tools)
            .finish_non_exhaustive()
    }
}

impl RetryBackoffBuilder {
    fn new() -> Self {
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
            catalog: ToolCatalog::new(),
            tool_overrides: HashMap::new(),
            safe_methods: DEFAULT_SAFE_METHODS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
            budget: Some(BudgetConfig::default()),
            budget_key: None,
            events: Events::new(),
            classifier: McpClassifier::new(),
            tool_policies: Vec::new(),
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

    /// The largest computed delay (a retry-after hint may be longer). At
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
        self.catalog = catalog;
        self
    }

    /// Says whether `tool` is safe to repeat, overriding the catalog for
    /// this layer only. Default: no overrides.
    #[must_use]
    pub fn safe_to_repeat(mut self, tool: impl Into<String>, safe: bool) -> Self {
        self.tool_overrides.insert(tool.into(), safe);
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
        self.safe_methods = methods.into_iter().map(Into::into).collect();
        self
    }

    /// The retry budget. Default: [`BudgetConfig::default()`] (ratio 0.2,
    /// 10 retries per second floor, 10 s window), one budget for the layer.
    #[must_use]
    pub fn budget(mut self, budget: BudgetConfig) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Keeps one budget per key instead of one for the layer, in a bounded
    /// map (past `bounds.max_keys`, new keys share one overflow budget).
    /// `bounds` must have `max_keys` ≥ 1 and a non-zero `idle_timeout`
    /// (else `build` names `budget_per_key.<field>`); an idle timeout past
    /// `u64::MAX` milliseconds (`Duration::MAX`) means never evicting.
    /// Default: one budget.
    #[must_use]
    pub fn budget_per_key(mut self, key_by: KeyBy, bounds: Bounds) -> Self {
        self.budget_key = Some((key_by, bounds));
        self
    }

    /// No retry budget: only `max_attempts` and the deadline bound retries.
    /// Not recommended: nothing then stops a retry storm.
    #[must_use]
    pub fn no_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Where retry and budget-exhausted events go. Default: nowhere.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The classifier that judges each attempt; share the stack's. Default
    /// [`McpClassifier`].
    pub fn classifier<C2>(self, classifier: C2) -> RetryBackoffBuilder<C2> {
        RetryBackoffBuilder {
            max_attempts: self.max_attempts,
            base_delay: self.base_delay,
            max_delay: self.max_delay,
            deadline: self.deadline,
            jitter: self.jitter,
            seed: self.seed,
            classes: self.classes,
            retry_on_client: self.retry_on_client,
            catalog: self.catalog,
            tool_overrides: self.tool_overrides,
            safe_methods: self.safe_methods,
            budget: self.budget,
            budget_key: self.budget_key,
            events: self.events,
            classifier,
            tool_policies: self.tool_policies,
        }
    }

    /// Gives the calls of `tool` their own attempts, delays, deadline and
    /// failure classes. Default: no overrides (every call follows this
    /// builder's).
    ///
    /// At [`build`](Self::build), `configure` receives a fresh builder
    /// carrying this builder's final values of `max_attempts`, `base_delay`,
    /// `max_delay`, `deadline`, `jitter` and `retry_on` (so the order of the
    /// calls does not matter), and those six knobs of the builder it returns
    /// become the tool's. Everything else stays layer-wide and comes from
    /// this builder: the retry budget, the catalog, the `safe_to_repeat`
    /// overrides, the safe methods, the jitter seed, the events and the
    /// classifier; setting them inside `configure` has no effect. Calling
    /// `tool` again for the same tool applies both closures, in order.
    ///
    /// `max_attempts(1)` never retries the tool (a call of it then neither
    /// deposits into nor draws on the budget). An override applies to
    /// `tools/call` requests naming `tool`; other methods follow this
    /// builder. The tool's knobs are picked once per call, by a lookup of
    /// the tool name that is skipped when no tool has an override.
    ///
    /// `build` validates each tool's values like this builder's, the error
    /// naming `tools.<tool>.<field>`.
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
    /// assert_eq!(err.field(), "tools.search.max_attempts");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(RetryBackoffBuilder) -> RetryBackoffBuilder + Send + 'static,
    ) -> Self {
        self.tool_policies.push(ToolOverride {
            tool: tool.into(),
            configure: Box::new(configure),
        });
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
        let overrides = std::mem::take(&mut self.tool_policies);
        if overrides.is_empty() {
            return Ok(ToolPolicies::default());
        }
        // Every closure of one tool, in the order given, each on the previous one's result.
        let mut builders: Vec<(String, RetryBackoffBuilder)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for ToolOverride { tool, configure } in overrides {
            let i = *index.entry(tool.clone()).or_insert_with(|| {
                let fresh = RetryBackoffBuilder {
                    max_attempts: self.max_attempts,
                    base_delay: self.base_delay,
                    max_delay: self.max_delay,
                    deadline: self.deadline,
                    jitter: self.jitter,
                    classes: self.classes,
                    retry_on_client: self.retry_on_client,
                    ..RetryBackoffBuilder::new()
                };
                builders.push((tool, fresh));
                builders.len() - 1
            });
            let slot = &mut builders[i].1;
            *slot = configure(std::mem::replace(slot, RetryBackoffBuilder::new()));
        }
        let mut policies = ToolPolicies::default();
        for (tool, built) in builders {
            if tool.is_empty() {
                return Err(ConfigError::new("tools", "a tool name must not be empty"));
            }
            let section = format!("tools.{tool}");
            if !built.tool_policies.is_empty() {
                return Err(ConfigError::new(
                    format!("{section}.tools"),
                    "per-tool overrides do not nest",
                ));
            }
            built
                .validate_call_policy()
                .map_err(|e| e.in_section(&section))?;
            policies
                .insert(tool.into_boxed_str(), built.call_policy())
                .ok_or_else(|| ConfigError::new("tools", "too many tools"))?;
        }
        Ok(policies)
    }

    /// Checks the configuration and builds the layer. The error names the
    /// bad field (`budget.ratio` for a field of the budget,
    /// `tools.<tool>.<field>` for a tool's override, see [`tool`](Self::tool)).
    pub fn build(mut self) -> Result<RetryBackoffLayer<C>, ConfigError> {
        self.validate_call_policy()?;
        if let Some(budget) = &self.budget {
            budget.validate().map_err(|e| e.in_section("budget"))?;
        }
        if let Some((_, bounds)) = &self.budget_key {
            bounds
                .validate()
                .map_err(|e| e.in_section("budget_per_key"))?;
        }
        let tools = self.tool_call_policies()?;
        Ok(RetryBackoffLayer {
            shared: Arc::new(Shared::from_builder(self, tools)),
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
            field(b().budget_per_key(KeyBy::Tool, Bounds::max_keys(0))),
            "budget_per_key.max_keys"
        );
    }

    #[test]
    fn bad_tool_values_name_the_tool_and_field() {
        let field = |b: RetryBackoffBuilder| b.build().unwrap_err().field().to_owned();
        let b = RetryBackoffLayer::builder;
        assert_eq!(
            field(b().tool("search", |t| t.max_attempts(0))),
            "tools.search.max_attempts"
        );
        assert_eq!(
            field(b().tool("search", |t| t.base_delay(Duration::ZERO))),
            "tools.search.base_delay"
        );
        // Checked against the outer builder's final values, whatever the order.
        assert_eq!(
            field(
                b().tool("search", |t| t.base_delay(Duration::from_secs(20)))
                    .max_delay(Duration::from_secs(15))
            ),
            "tools.search.max_delay"
        );
        assert_eq!(
            field(b().tool("search", |t| t.deadline(Duration::from_secs(24 * 3600 + 1)))),
            "tools.search.deadline"
        );
        assert_eq!(
            field(b().tool("search", |t| t.retry_on([FailureClass::Client]))),
            "tools.search.retry_on"
        );
        assert_eq!(field(b().tool("", |t| t)), "tools");
        assert_eq!(
            field(b().tool("a", |t| t.tool("b", |u| u))),
            "tools.a.tools"
        );
        // The outer builder's errors come first and are not prefixed.
        assert_eq!(
            field(b().max_attempts(0).tool("search", |t| t.max_attempts(2))),
            "max_attempts"
        );
        // Layer-wide settings set in the closure are not the tool's to check.
        let bad_ratio = BudgetConfig {
            ratio: -1.0,
            ..BudgetConfig::default()
        };
        assert!(b()
            .tool("search", move |t| t.budget(bad_ratio))
            .build()
            .is_ok());
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
                .safe_to_repeat("search", true)
                .safe_to_repeat("fetch", true);
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
                b = b.budget_per_key(
                    KeyBy::Tool,
                    Bounds {
                        max_keys,
                        idle_timeout,
                    },
                );
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
            "budget_per_key.max_keys",
            "budget_per_key.idle_timeout",
            "tools.fetch.max_attempts",
            "tools.fetch.base_delay",
            "tools.fetch.max_delay",
            "tools.fetch.deadline",
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
                                let _ = policy.verdict(call, &request, &outcome, retry, previous, remaining, &mut rng);
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
