//! The standard stack: every toolwarden layer in the standard order, built
//! from one validated configuration.
//!
//! Outermost first, and why (see DESIGN.md):
//!
//! | # | layer | why here |
//! |---|---|---|
//! | 0 | [`RenderErrorsLayer`](crate::RenderErrorsLayer) | errors become readable `isError` results at the edge |
//! | 1 | observability | sees every call, including those refused below |
//! | 2 | loop guard | stops a stuck agent before anything is spent |
//! | 3 | fallback cache | catches whatever fails below it, rejections included |
//! | 3a | coalescing (optional, off by default) | identical concurrent calls share one call *and its retries*; above it, each caller is still its own call for the cache, the loop guard and observability |
//! | 4 | retry with backoff | each attempt passes through the limiter and the breaker |
//! | 4½ | hedge (optional, off by default) | see [below](#hedging) |
//! | 5 | rate limit | every attempt takes a token |
//! | 5a | bulkhead (optional, off by default) | caps the attempts in flight per tool, close to the service; a refusal (`BulkheadFull`) is a rejection the retry above honours (after its `retry_after`, within its budget) and the breaker below never sees |
//! | 6 | circuit breaker | closest to the transport, so it sees real outcomes |
//! | 7 | attempt timeout | bounds each attempt; the breaker counts it as a timeout |
//!
//! The bulkhead and coalescing are left out unless configured
//! ([`bulkhead`](StandardStackBuilder::bulkhead),
//! [`coalesce`](StandardStackBuilder::coalesce)): a cap on calls in flight
//! needs a number only the operator knows (what the server can take), and
//! sharing answers between callers changes what each one sees, so neither
//! is turned on behind a user's back. Coalescing reads the stack's catalog:
//! until tools are configured cacheable or safe to repeat (or annotations
//! trusted), it shares nothing.
//!
//! One [`ToolCatalog`] (which tools are safe to repeat or cache) and one
//! [`Events`] hook (with the observability layer's sink added) are shared by
//! every layer; the fallback cache reads the breaker's registry to skip
//! open tools when it suggests alternatives, and the loop guard to lift a
//! refusal once the tool's circuit closes again.
//!
//! Each layer is configured through its own builder, in a closure. The knobs
//! that only make sense together are set on the stack builder, which checks
//! them together when it builds and names the fields it refuses:
//!
//! | knob | default | checked against |
//! |---|---|---|
//! | [`attempt_timeout`](StandardStackBuilder::attempt_timeout) | 10 s | ≤ `retry_deadline` |
//! | [`retry_deadline`](StandardStackBuilder::retry_deadline) | 30 s (or the retry closure's `deadline`) | ≥ `attempt_timeout`; > a rate limit's `max_wait`; the same as a `deadline` set in the retry closure |
//! | [`breaker_time_window`](StandardStackBuilder::breaker_time_window) | none (count window) | ≥ 2 × `attempt_timeout` (so a window can hold whole attempts) |
//! | [`slow_call_duration`](StandardStackBuilder::slow_call_duration) | none | < `attempt_timeout` (else no call can be slow before it times out) |
//! | a bulkhead's `max_wait` (the longest of any tool) | 0 | < `retry_deadline` |
//! | an adaptive bulkhead's `latency_threshold` (the longest of any tool) | none (required when adaptive) | < `attempt_timeout` (else no call can be slow before it times out) |
//!
//! # Hedging
//!
//! The [`HedgeLayer`] is in the stack only when
//! [`hedge`](StandardStackBuilder::hedge) is called: a hedge is a second
//! copy of a call that may still succeed, extra load a server did not ask
//! for, so a stack does not send one unless told to (and then only for
//! tools the catalog says are safe to send twice, within the hedge
//! budget). It sits below the retry layer, so a retry is one attempt that
//! may be hedged (and the retry budget is not spent on hedges), and above
//! the rate limit, the breaker and the attempt timeout, so each copy takes
//! a token, is counted by the breaker and is bounded by the timeout. A
//! hedge delay at or above the attempt timeout never fires. It shares the
//! stack's catalog, classifier and events.
//!
//! The rate limit starts from a generous per-tool quota
//! ([`DEFAULT_TOOL_RATE`] calls/s, burst [`DEFAULT_TOOL_BURST`]) that a
//! `per_tool` in the rate-limit closure replaces.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use tower::{Layer, ServiceExt};
//! use toolwarden::stack::StandardStack;
//! use toolwarden_core::{jsonrpc::Request, testing::MockMcp, ToolCatalog};
//!
//! let catalog = ToolCatalog::new();
//! let stack = StandardStack::builder()
//!     .catalog(catalog.clone())
//!     .attempt_timeout(Duration::from_secs(5))
//!     .retry_deadline(Duration::from_secs(20))
//!     .circuit_breaker(|b| b.failure_threshold(5))
//!     .retry(|b| b.max_attempts(3))
//!     .build()
//!     .unwrap();
//! let svc = stack.layer(MockMcp::new());
//! let resp = svc.oneshot(Request::tool_call(1, "search", serde_json::json!({"q": "x"}))).await.unwrap();
//! assert_eq!(resp.id, toolwarden_core::jsonrpc::Id::Number(1));
//!
//! // Knobs that contradict each other are refused, naming the fields.
//! let err = StandardStack::builder()
//!     .attempt_timeout(Duration::from_secs(60))
//!     .retry_deadline(Duration::from_secs(30))
//!     .build()
//!     .unwrap_err();
//! assert_eq!(err.field(), "attempt_timeout, retry.deadline");
//! # }
//! ```
//!
//! # The stack's type
//!
//! [`StandardService`] names each layer's service once, outermost first. A
//! layer left out ([`StandardStackBuilder::without`], or an optional layer
//! not configured) is still there, built to pass every call through: each
//! layer's service has a `passthrough` form (`CircuitBreaker::passthrough`,
//! `RetryBackoff::passthrough`, ...) that forwards the call to the service
//! below and does nothing else. Only hedging is an [`Either`] of its
//! service (futures boxed: a hedged call holds two attempts and a timer)
//! and the service below.
//!
//! Before (until 2026-12-06) every layer that could be left out was an
//! `Either` of its service and the service below, and the type named the
//! service below 2⁹ times. Layered over a closure
//! (`tower::service_fn(|req| ...)`) in the function that called it, the
//! type checker's work grew about threefold per `Either` (measured: 3 s
//! with six, 30 s with eight), and the whole stack made rustc use more
//! than 24 GB. Now the same test compiles in about 5 s and 0.4 GB
//! (`every_layer_left_out_passes_calls_through_untouched_over_a_closure`
//! in `tests/stack.rs` is that test).

use std::fmt;
use std::time::Duration;

// Issue 21: bulkhead and coalescing (optional layers).
use toolwarden_bulkhead::{Bulkhead, BulkheadBuilder, BulkheadLayer};
use toolwarden_coalesce::{Coalesce, CoalesceBuilder, CoalesceLayer};

use toolwarden_circuit_breaker::{
    CircuitBreaker, CircuitBreakerBuilder, CircuitBreakerLayer, CircuitRegistry, TimeWindow,
};
use toolwarden_core::{ConfigError, Events, McpClassifier, ToolCatalog};
use toolwarden_fallback_cache::{FallbackCache, FallbackCacheBuilder, FallbackCacheLayer};
use toolwarden_hedge::{Hedge, HedgeBuilder, HedgeLayer};
use toolwarden_loop_guard::{LoopGuard, LoopGuardBuilder, LoopGuardLayer};
use toolwarden_observability::{Observability, ObservabilityBuilder, ObservabilityLayer, Stats};
use toolwarden_rate_limit::{Mode, Rate, RateLimit, RateLimitBuilder, RateLimitLayer};
use toolwarden_retry::{RetryBackoff, RetryBackoffBuilder, RetryBackoffLayer};
use tower::util::Either;
use tower_layer::Layer;

pub use crate::boxed::{BoxFuturesLayer, BoxedFutures};
use crate::render::RenderErrors;
pub use crate::timeout::{AttemptTimeout, AttemptTimeoutFuture};

/// The service the standard stack builds over `S`: each layer's service
/// once, outermost first. A layer left out ([`StackLayer`]) is its service
/// built to pass every call through (`passthrough`), except hedging: an
/// [`Either`] of its service (`Left`, futures boxed) and the service below
/// (`Right`).
pub type StandardService<S> = RenderErrors<Observability<Guarded<S>>>;

type Broken<S> = CircuitBreaker<AttemptTimeout<S>>;
type Bulkheaded<S> = Bulkhead<Broken<S>>;
type Limited<S> = RateLimit<Bulkheaded<S>>;
// Hedging (optional, off by default): between retry and the rate limit. Its
// future holds two attempts and a timer; boxed (see `BoxedFutures`), it adds
// nothing to the size of every call's future when it is off.
type Hedged<S> = Either<BoxedFutures<Hedge<Limited<S>>>, Limited<S>>;
type Retried<S> = RetryBackoff<Hedged<S>>;
type Coalesced<S> = Coalesce<Retried<S>>;
type Cached<S> = FallbackCache<Coalesced<S>>;
type Guarded<S> = LoopGuard<Cached<S>>;

/// A layer of the standard stack that [`StandardStackBuilder::without`] can
/// leave out. The attempt timeout and the error rendering stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StackLayer {
    /// [`ObservabilityLayer`]: no metrics, spans or statistics.
    Observability,
    /// [`LoopGuardLayer`]: repeated calls are never blocked.
    LoopGuard,
    /// [`FallbackCacheLayer`]: no stale results, no degraded answers.
    FallbackCache,
    /// [`RetryBackoffLayer`]: every call is attempted once.
    Retry,
    /// [`RateLimitLayer`]: no quotas.
    RateLimit,
    /// [`CircuitBreakerLayer`]: no circuit ever opens.
    CircuitBreaker,
    /// [`BulkheadLayer`]: no cap on calls in flight. Out unless configured
    /// with [`StandardStackBuilder::bulkhead`].
    Bulkhead,
    /// [`CoalesceLayer`]: identical calls are never shared. Out unless
    /// configured with [`StandardStackBuilder::coalesce`].
    Coalesce,
    /// [`HedgeLayer`]: no call is hedged. Off unless
    /// [`StandardStackBuilder::hedge`] is called.
    Hedge,
}

impl StackLayer {
    /// Every layer that can be left out, outermost first.
    pub const ALL: [StackLayer; 9] = [
        StackLayer::Observability,
        StackLayer::LoopGuard,
        StackLayer::FallbackCache,
        StackLayer::Coalesce,
        StackLayer::Retry,
        StackLayer::Hedge,
        StackLayer::RateLimit,
        StackLayer::Bulkhead,
        StackLayer::CircuitBreaker,
    ];

    /// The layer's configuration section name (`circuit_breaker`, ...).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            StackLayer::Observability => "observability",
            StackLayer::LoopGuard => "loop_guard",
            StackLayer::FallbackCache => "fallback_cache",
            StackLayer::Retry => "retry",
            StackLayer::RateLimit => "rate_limit",
            StackLayer::CircuitBreaker => "circuit_breaker",
            StackLayer::Bulkhead => "bulkhead",
            StackLayer::Coalesce => "coalesce",
            StackLayer::Hedge => "hedge",
        }
    }

    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for StackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Configure<B> = Box<dyn FnOnce(B) -> B + Send>;

/// The stack's default per-tool rate (calls per second) when the rate-limit
/// closure sets none.
pub const DEFAULT_TOOL_RATE: u32 = 50;
/// The stack's default per-tool burst.
pub const DEFAULT_TOOL_BURST: u32 = 100;

/// Entry point of the standard stack.
#[derive(Debug, Clone, Copy)]
pub struct StandardStack;

impl StandardStack {
    /// A builder with every default.
    #[must_use]
    pub fn builder() -> StandardStackBuilder {
        StandardStackBuilder::default()
    }
}

/// Builds a [`StandardStackLayer`]; see the [module docs](self).
pub struct StandardStackBuilder {
    catalog: ToolCatalog,
    events: Events,
    attempt_timeout: Duration,
    /// `None`: the retry builder's own deadline (30 s unless its closure sets one).
    retry_deadline: Option<Duration>,
    breaker_time_window: Option<TimeWindow>,
    slow_call_duration: Option<Duration>,
    render_errors: bool,
    /// [`StackLayer::bit`]s of the layers left out.
    without: u16,
    circuit_breaker: Option<Configure<CircuitBreakerBuilder>>,
    rate_limit: Option<Configure<RateLimitBuilder>>,
    retry: Option<Configure<RetryBackoffBuilder>>,
    loop_guard: Option<Configure<LoopGuardBuilder>>,
    fallback_cache: Option<Configure<FallbackCacheBuilder>>,
    observability: Option<Configure<ObservabilityBuilder>>,
    // Issue 21: the optional layers, in only when configured.
    bulkhead: Option<Configure<BulkheadBuilder>>,
    coalesce: Option<Configure<CoalesceBuilder>>,
    hedge: Option<Configure<HedgeBuilder>>,
    /// [`reload`](StandardStackBuilder::reload): the stack replaced, and
    /// the [`StackLayer::bit`]s of its layers kept whole.
    previous: Option<(StandardStackLayer, u16)>,
}

impl Default for StandardStackBuilder {
    fn default() -> Self {
        StandardStackBuilder {
            catalog: ToolCatalog::new(),
            events: Events::new(),
            attempt_timeout: Duration::from_secs(10),
            retry_deadline: None,
            breaker_time_window: None,
            slow_call_duration: None,
            render_errors: true,
            without: 0,
            circuit_breaker: None,
            rate_limit: None,
            retry: None,
            loop_guard: None,
            fallback_cache: None,
            observability: None,
            bulkhead: None,
            coalesce: None,
            hedge: None,
            previous: None,
        }
    }
}

impl fmt::Debug for StandardStackBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandardStackBuilder")
            .field("catalog", &self.catalog)
            .field("events", &self.events)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("retry_deadline", &self.retry_deadline)
            .field("breaker_time_window", &self.breaker_time_window)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("render_errors", &self.render_errors)
            .field("without", &self.left_out())
            .field(
                "reload",
                &self.previous.as_ref().map(|(_, keep)| left_out(*keep)),
            )
            .finish_non_exhaustive()
    }
}

impl StandardStackBuilder {
    /// The tool catalog every layer shares. Default: empty and untrusted
    /// (then only failures before the request left are retried, and nothing
    /// is cached, until tools are configured or annotations trusted).
    #[must_use]
    pub fn catalog(mut self, catalog: ToolCatalog) -> Self {
        self.catalog = catalog;
        self
    }

    /// Extra event sinks (the observability layer's is always added).
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The bound on one attempt. Default 10 s.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The bound on a call with all its retries. Default 30 s. Setting it
    /// here or with `.retry(|b| b.deadline(..))` is the same; setting both
    /// to different values is refused when the stack is built.
    #[must_use]
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = Some(deadline);
        self
    }

    /// A time-based failure-rate window for the breaker. Default: none.
    #[must_use]
    pub fn breaker_time_window(mut self, window: TimeWindow) -> Self {
        self.breaker_time_window = Some(window);
        self
    }

    /// Calls at least this long count as slow for the breaker. Default: none.
    #[must_use]
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.slow_call_duration = Some(duration);
        self
    }

    /// Whether errors of tool calls are rendered into `isError` results at
    /// the top ([`RenderErrorsLayer`](crate::RenderErrorsLayer)). Default `true`.
    #[must_use]
    pub fn render_errors(mut self, render: bool) -> Self {
        self.render_errors = render;
        self
    }

    /// Leaves `layer` out of the stack: calls go straight to the layer below
    /// it. Its closure (if any) is still applied and its builder still
    /// checked, so a configuration stays valid when the layer is put back.
    /// The stack-level knobs that belong to it are ignored while it is out
    /// (`retry_deadline` without retry, `breaker_time_window` and
    /// `slow_call_duration` without the breaker).
    ///
    /// ```
    /// use toolwarden::stack::{StackLayer, StandardStack};
    /// let stack = StandardStack::builder()
    ///     .without(StackLayer::RateLimit)
    ///     .without(StackLayer::LoopGuard)
    ///     .build()
    ///     .unwrap();
    /// assert!(!stack.includes(StackLayer::RateLimit));
    /// assert!(stack.includes(StackLayer::CircuitBreaker));
    /// ```
    #[must_use]
    pub fn without(mut self, layer: StackLayer) -> Self {
        self.without |= layer.bit();
        self
    }

    fn left_out(&self) -> Vec<StackLayer> {
        left_out(self.without)
    }

    /// Builds the stack that replaces `previous` (a hot reload), over
    /// `previous`'s state: every layer is configured and checked from this
    /// builder as usual, and then
    ///
    /// - the circuit breaker is `previous`'s, its registry
    ///   [reconfigured](toolwarden_circuit_breaker::CircuitRegistry::reconfigure)
    ///   with this builder's policies: every circuit keeps its state and
    ///   windows. The reconfiguration is the last step of
    ///   [`build`](Self::build), so a build that fails changes nothing; its
    ///   registry-wide settings (`name`, `key_by`, `bounds`) must be
    ///   `previous`'s, or `build` refuses them.
    /// - observability is `previous`'s (its settings, statistics and
    ///   metric series): the event sinks every layer reports to stay one.
    ///   Its closure is still checked, not applied.
    /// - each layer in `keep` is `previous`'s own, its policy and state (a
    ///   quota's tokens, the retry budget, the loop history, the cache
    ///   entries) kept whole: pass the layers whose configuration did not
    ///   change. Their closures are still checked, not applied.
    /// - the other layers are new, with fresh state (the rate limit's
    ///   quotas full, the retry budget full, no loop history, an empty
    ///   cache), and report to `previous`'s observability.
    ///
    /// The attempt timeout, the layers left out and the error rendering
    /// are this builder's. Services built from `previous` go on with
    /// `previous`'s layers (a call in flight finishes under the policy it
    /// started with); put the new stack around the inner service for new
    /// calls.
    ///
    /// ```
    /// use toolwarden::stack::{StackLayer, StandardStack};
    /// use toolwarden::circuit_breaker::CircuitState;
    ///
    /// let running = StandardStack::builder().circuit_breaker(|b| b.failure_threshold(5)).build().unwrap();
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    /// # rt.block_on(async {
    /// running.registry().force_open("search");
    /// let next = StandardStack::builder()
    ///     .circuit_breaker(|b| b.failure_threshold(2))
    ///     .reload(&running, [StackLayer::RateLimit, StackLayer::FallbackCache])
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(next.registry().state("search"), Some(CircuitState::ForcedOpen));
    /// # });
    /// ```
    #[must_use]
    pub fn reload(
        mut self,
        previous: &StandardStackLayer,
        keep: impl IntoIterator<Item = StackLayer>,
    ) -> Self {
        let keep = keep.into_iter().fold(0, |bits, layer| bits | layer.bit());
        self.previous = Some((previous.clone(), keep));
        self
    }

    /// Configures the circuit breaker.
    #[must_use]
    pub fn circuit_breaker(
        mut self,
        f: impl FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder + Send + 'static,
    ) -> Self {
        self.circuit_breaker = Some(Box::new(f));
        self
    }

    /// Configures the rate limit.
    #[must_use]
    pub fn rate_limit(
        mut self,
        f: impl FnOnce(RateLimitBuilder) -> RateLimitBuilder + Send + 'static,
    ) -> Self {
        self.rate_limit = Some(Box::new(f));
        self
    }

    /// Configures retry with backoff.
    #[must_use]
    pub fn retry(
        mut self,
        f: impl FnOnce(RetryBackoffBuilder) -> RetryBackoffBuilder + Send + 'static,
    ) -> Self {
        self.retry = Some(Box::new(f));
        self
    }

    /// Configures the loop guard.
    #[must_use]
    pub fn loop_guard(
        mut self,
        f: impl FnOnce(LoopGuardBuilder) -> LoopGuardBuilder + Send + 'static,
    ) -> Self {
        self.loop_guard = Some(Box::new(f));
        self
    }

    /// Configures the fallback cache.
    #[must_use]
    pub fn fallback_cache(
        mut self,
        f: impl FnOnce(FallbackCacheBuilder) -> FallbackCacheBuilder + Send + 'static,
    ) -> Self {
        self.fallback_cache = Some(Box::new(f));
        self
    }

    /// Configures observability.
    #[must_use]
    pub fn observability(
        mut self,
        f: impl FnOnce(ObservabilityBuilder) -> ObservabilityBuilder + Send + 'static,
    ) -> Self {
        self.observability = Some(Box::new(f));
        self
    }

    /// Adds the bulkhead (left out by default) and configures it: a cap on
    /// the attempts in flight per tool, placed below the rate limit and
    /// above the breaker (see the [module docs](self)). Its refusals are
    /// reported to the stack's events.
    ///
    /// ```
    /// use toolwarden::stack::{StackLayer, StandardStack};
    /// let stack = StandardStack::builder().bulkhead(|b| b.max_concurrent(4)).build().unwrap();
    /// assert!(stack.includes(StackLayer::Bulkhead));
    /// assert!(!StandardStack::builder().build().unwrap().includes(StackLayer::Bulkhead));
    /// ```
    #[must_use]
    pub fn bulkhead(
        mut self,
        f: impl FnOnce(BulkheadBuilder) -> BulkheadBuilder + Send + 'static,
    ) -> Self {
        self.bulkhead = Some(Box::new(f));
        self
    }

    /// Adds coalescing (left out by default) and configures it: identical
    /// concurrent calls of tools the stack's catalog calls cacheable or safe
    /// to repeat share one call, placed above retry (so they share its
    /// retries) and below the fallback cache (see the [module docs](self)).
    #[must_use]
    pub fn coalesce(
        mut self,
        f: impl FnOnce(CoalesceBuilder) -> CoalesceBuilder + Send + 'static,
    ) -> Self {
        self.coalesce = Some(Box::new(f));
        self
    }

    /// Puts the [`HedgeLayer`] in the stack (it is left out by default, see
    /// [Hedging](self#hedging)) and configures it. The stack gives it its
    /// catalog, classifier and events.
    ///
    /// ```
    /// use std::time::Duration;
    /// use toolwarden::stack::{StackLayer, StandardStack};
    /// let stack = StandardStack::builder()
    ///     .hedge(|b| b.delay(Duration::from_millis(200)).tool("lookup", |t| t.safe_to_hedge(true)))
    ///     .build()
    ///     .unwrap();
    /// assert!(stack.includes(StackLayer::Hedge));
    /// assert!(!StandardStack::builder().build().unwrap().includes(StackLayer::Hedge));
    /// ```
    #[must_use]
    pub fn hedge(mut self, f: impl FnOnce(HedgeBuilder) -> HedgeBuilder + Send + 'static) -> Self {
        self.hedge = Some(Box::new(f));
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.attempt_timeout.is_zero() {
            return Err(ConfigError::new("attempt_timeout", "must be positive"));
        }
        let on = |layer: StackLayer| self.without & layer.bit() == 0;
        if let Some(window) = self
            .breaker_time_window
            .filter(|_| on(StackLayer::CircuitBreaker))
        {
            if window.duration < self.attempt_timeout.saturating_mul(2) {
                return Err(ConfigError::new(
                    "circuit_breaker.time_window, attempt_timeout",
                    format!(
                        "the breaker's time window ({:?}) must be at least twice the attempt timeout ({:?}) to hold whole attempts",
                        window.duration, self.attempt_timeout
                    ),
                ));
            }
        }
        if let Some(slow) = self
            .slow_call_duration
            .filter(|_| on(StackLayer::CircuitBreaker))
        {
            if slow >= self.attempt_timeout {
                return Err(ConfigError::new(
                    "circuit_breaker.slow_call_duration, attempt_timeout",
                    format!(
                        "a call times out ({:?}) before it can count as slow ({slow:?})",
                        self.attempt_timeout
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the configuration and builds every layer.
    pub fn build(self) -> Result<StandardStackLayer, ConfigError> {
        self.check()?;
        // The layers are put together here, with nothing between them that
        // edits a response: a response is classified once, by the lowest
        // layer, and the others read its outcome (a closure that sets a
        // classifier of its own gets its own classification).
        let shared = McpClassifier::new().share_outcomes(true);
        let previous = self.previous;
        let kept = |layer: StackLayer| {
            previous
                .as_ref()
                .filter(|(_, keep)| keep & layer.bit() != 0)
                .map(|(previous, _)| previous)
        };
        let observability = apply(
            ObservabilityLayer::builder().classifier(shared),
            self.observability,
        )
        .build()
        .map_err(|e| e.in_section("observability"))?;
        // A reload reports to the running observability, so that every
        // layer, kept or new, feeds one set of statistics and series.
        let observability = match &previous {
            Some((previous, _)) => previous.observability.clone(),
            None => observability,
        };
        let events = self.events.merge(&observability.events());

        let mut breaker = apply(
            CircuitBreakerLayer::builder().classifier(shared),
            self.circuit_breaker,
        );
        if let Some(window) = self.breaker_time_window {
            breaker = breaker.time_window(window);
        }
        if let Some(slow) = self.slow_call_duration {
            breaker = breaker.slow_call_duration(slow);
        }
        let mut circuit_breaker = breaker
            .events(events.clone())
            .build()
            .map_err(|e| e.in_section("circuit_breaker"))?;
        // A reload keeps the running breakers (reconfigured at the end).
        let registry = match &previous {
            Some((previous, _)) => previous.registry().clone(),
            None => circuit_breaker.registry().clone(),
        };

        // A generous default quota, so the stack protects a server from a
        // storm without getting in the way of normal use; the closure's
        // `per_tool` replaces it.
        let rate_limit = apply(
            RateLimitLayer::builder()
                .per_tool(Rate::per_second(DEFAULT_TOOL_RATE), DEFAULT_TOOL_BURST),
            self.rate_limit,
        )
        .events(events.clone())
        .build()
        .map_err(|e| e.in_section("rate_limit"))?;
        let rate_limit = kept(StackLayer::RateLimit).map_or(rate_limit, |p| p.rate_limit.clone());
        let on = |layer: StackLayer| self.without & layer.bit() == 0;
        // The stack's deadline goes in first, so the closure sees it; a
        // closure that sets another one contradicts it.
        let mut retry = RetryBackoffLayer::builder().classifier(shared);
        if let Some(deadline) = self.retry_deadline {
            retry = retry.deadline(deadline);
        }
        let retry = apply(retry, self.retry)
            .catalog(self.catalog.clone())
            .events(events.clone())
            .build()
            .map_err(|e| e.in_section("retry"))?;
        let deadline = retry.deadline();
        let retry = kept(StackLayer::Retry).map_or(retry, |p| p.retry.clone());
        if let Some(stack_deadline) = self.retry_deadline.filter(|d| *d != deadline) {
            return Err(ConfigError::new(
                "retry_deadline, retry.deadline",
                format!(
                    "the stack's retry_deadline ({stack_deadline:?}) and the retry closure's deadline ({deadline:?}) disagree: set one"
                ),
            ));
        }
        if on(StackLayer::Retry) && self.attempt_timeout > deadline {
            return Err(ConfigError::new(
                "attempt_timeout, retry.deadline",
                format!(
                    "one attempt ({:?}) may not outlast the whole retry deadline ({deadline:?})",
                    self.attempt_timeout
                ),
            ));
        }
        if let Mode::Wait { max_wait } = rate_limit.mode() {
            if on(StackLayer::RateLimit) && on(StackLayer::Retry) && max_wait >= deadline {
                return Err(ConfigError::new(
                    "rate_limit.mode.max_wait, retry.deadline",
                    format!(
                        "waiting for a token ({max_wait:?}) would use up the whole retry deadline ({deadline:?})"
                    ),
                ));
            }
        }
        // Hedging: only when configured (off by default).
        let hedge = match self.hedge {
            Some(configure) => Some(
                configure(HedgeLayer::builder())
                    .classifier(shared)
                    .catalog(self.catalog.clone())
                    .events(events.clone())
                    .build()
                    .map_err(|e| e.in_section("hedge"))?,
            ),
            None => None,
        };
        let hedge = match kept(StackLayer::Hedge).and_then(|p| p.hedge.clone()) {
            Some(previous) if hedge.is_some() => Some(previous),
            _ => hedge,
        };

        let fallback_cache = apply(
            FallbackCacheLayer::builder()
                .catalog(self.catalog.clone())
                .classifier(shared),
            self.fallback_cache,
        )
        .circuits(registry.circuits())
        .events(events.clone())
        .build()
        .map_err(|e| e.in_section("fallback_cache"))?;
        let loop_guard = apply(
            LoopGuardLayer::builder().classifier(shared),
            self.loop_guard,
        )
        .circuits(registry.circuits())
        .events(events.clone())
        .build()
        .map_err(|e| e.in_section("loop_guard"))?;
        let fallback_cache =
            kept(StackLayer::FallbackCache).map_or(fallback_cache, |p| p.fallback_cache.clone());
        let loop_guard = kept(StackLayer::LoopGuard).map_or(loop_guard, |p| p.loop_guard.clone());
        // Issue 21: the optional layers, built only when configured.
        let bulkhead = match self.bulkhead {
            // The stack's classifier: an adaptive cap reads outcomes as the
            // breaker does.
            Some(f) => Some(
                f(BulkheadLayer::builder().classifier(shared))
                    .events(events.clone())
                    .build()
                    .map_err(|e| e.in_section("bulkhead"))?,
            ),
            None => None,
        };
        let bulkhead = kept(StackLayer::Bulkhead)
            .and_then(|p| p.bulkhead_layer().cloned())
            .filter(|_| bulkhead.is_some())
            .or(bulkhead);
        if let Some(max_wait) = bulkhead.as_ref().map(BulkheadLayer::longest_max_wait) {
            if on(StackLayer::Bulkhead) && on(StackLayer::Retry) && max_wait >= deadline {
                return Err(ConfigError::new(
                    "bulkhead.max_wait, retry.deadline",
                    format!(
                        "waiting for a place ({max_wait:?}) would use up the whole retry deadline ({deadline:?})"
                    ),
                ));
            }
        }
        if let Some(threshold) = bulkhead
            .as_ref()
            .and_then(BulkheadLayer::longest_latency_threshold)
        {
            if on(StackLayer::Bulkhead) && threshold >= self.attempt_timeout {
                return Err(ConfigError::new(
                    "bulkhead.adaptive.latency_threshold, attempt_timeout",
                    format!(
                        "a call times out ({:?}) before it can count as slow ({threshold:?})",
                        self.attempt_timeout
                    ),
                ));
            }
        }
        let coalesce = match self.coalesce {
            Some(f) => Some(
                f(CoalesceLayer::builder().catalog(self.catalog.clone()))
                    .events(events.clone())
                    .build()
                    .map_err(|e| e.in_section("coalesce"))?,
            ),
            None => None,
        };
        let coalesce = kept(StackLayer::Coalesce)
            .and_then(|p| p.coalesce_layer().cloned())
            .filter(|_| coalesce.is_some())
            .or(coalesce);
        // An optional layer not configured is built with defaults, and its
        // services pass every call through (see `StandardService`).
        let configured = bulkhead.as_ref().map_or(0, |_| StackLayer::Bulkhead.bit())
            | coalesce.as_ref().map_or(0, |_| StackLayer::Coalesce.bit());
        let bulkhead = match bulkhead {
            Some(bulkhead) => bulkhead,
            None => BulkheadLayer::builder()
                .build()
                .map_err(|e| e.in_section("bulkhead"))?,
        };
        let coalesce = match coalesce {
            Some(coalesce) => coalesce,
            None => CoalesceLayer::builder()
                .build()
                .map_err(|e| e.in_section("coalesce"))?,
        };

        if let Some((previous, _)) = &previous {
            // Last, so that a build that fails leaves the running breakers alone.
            previous
                .registry()
                .reconfigure(circuit_breaker.registry())
                .map_err(|e| e.in_section("circuit_breaker"))?;
            circuit_breaker = previous.circuit_breaker.clone();
        }

        Ok(StandardStackLayer {
            render_errors: self.render_errors,
            without: self.without,
            observability,
            loop_guard,
            fallback_cache,
            retry,
            hedge,
            rate_limit,
            circuit_breaker,
            configured,
            bulkhead,
            coalesce,
            attempt_timeout: self.attempt_timeout,
            catalog: self.catalog,
            events,
        })
    }
}

fn apply<B>(builder: B, f: Option<Configure<B>>) -> B {
    match f {
        Some(f) => f(builder),
        None => builder,
    }
}

/// Every toolwarden layer in the standard order, as one `Layer`. Cloning is
/// cheap; services built from clones share all state (breakers, limits,
/// budgets, caches, statistics).
#[derive(Debug, Clone)]
pub struct StandardStackLayer {
    render_errors: bool,
    without: u16,
    observability: ObservabilityLayer,
    loop_guard: LoopGuardLayer,
    fallback_cache: FallbackCacheLayer,
    retry: RetryBackoffLayer,
    /// `None`: not configured, left out.
    hedge: Option<HedgeLayer>,
    rate_limit: RateLimitLayer,
    circuit_breaker: CircuitBreakerLayer,
    // Issue 21: `None` when not configured.
    /// Built with defaults when not configured ([`Self::configured`] says
    /// which were): the services of a layer left out pass calls through.
    bulkhead: BulkheadLayer,
    coalesce: CoalesceLayer,
    /// The bits of the optional layers configured (bulkhead, coalescing).
    configured: u16,
    attempt_timeout: Duration,
    catalog: ToolCatalog,
    events: Events,
}

fn left_out(without: u16) -> Vec<StackLayer> {
    StackLayer::ALL
        .into_iter()
        .filter(|layer| without & layer.bit() != 0)
        .collect()
}

impl StandardStackLayer {
    /// Whether `layer` is part of the stack (see [`StandardStackBuilder::without`]).
    #[must_use]
    pub fn includes(&self, layer: StackLayer) -> bool {
        let configured = match layer {
            StackLayer::Bulkhead | StackLayer::Coalesce => self.configured & layer.bit() != 0,
            StackLayer::Hedge => self.hedge.is_some(),
            _ => true,
        };
        configured && self.without & layer.bit() == 0
    }

    /// The bulkhead, when configured.
    #[must_use]
    pub fn bulkhead_layer(&self) -> Option<&BulkheadLayer> {
        (self.configured & StackLayer::Bulkhead.bit() != 0).then_some(&self.bulkhead)
    }

    /// The coalescing layer, when configured.
    #[must_use]
    pub fn coalesce_layer(&self) -> Option<&CoalesceLayer> {
        (self.configured & StackLayer::Coalesce.bit() != 0).then_some(&self.coalesce)
    }

    /// The fallback cache, unless it was left out.
    #[must_use]
    pub fn fallback_cache_layer(&self) -> Option<&FallbackCacheLayer> {
        self.includes(StackLayer::FallbackCache)
            .then_some(&self.fallback_cache)
    }

    /// The layers left out of the stack, outermost first: those left out
    /// with [`without`](StandardStackBuilder::without), and the optional
    /// ones (bulkhead, coalescing, hedging) that were not configured.
    #[must_use]
    pub fn left_out(&self) -> Vec<StackLayer> {
        StackLayer::ALL
            .into_iter()
            .filter(|layer| !self.includes(*layer))
            .collect()
    }

    /// The breaker registry: snapshots, manual control, the Redis seam.
    #[must_use]
    pub fn registry(&self) -> &CircuitRegistry {
        self.circuit_breaker.registry()
    }

    /// The observability layer's own sink (its statistics and metric
    /// series): for what runs outside the stack to be counted with it (a
    /// Redis sync's `SyncFailed`, say). Not [`events`](Self::events), which
    /// includes yours: emitting there from inside the stack counts twice.
    #[must_use]
    pub fn observability_events(&self) -> Events {
        self.observability.events()
    }

    /// Per-tool statistics.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.observability.stats()
    }

    /// The shared tool catalog.
    #[must_use]
    pub fn catalog(&self) -> &ToolCatalog {
        &self.catalog
    }

    /// The events every layer emits into (yours plus observability's).
    #[must_use]
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The attempt timeout.
    #[must_use]
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }
}

/// `service` as it is when its layer is on, else built to pass through.
fn switch<T>(on: bool, service: T, passthrough: fn(T) -> T) -> T {
    if on {
        service
    } else {
        passthrough(service)
    }
}

impl<S> Layer<S> for StandardStackLayer {
    type Service = StandardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let on = |layer: StackLayer| self.includes(layer);
        let service = AttemptTimeout::new(inner, self.attempt_timeout);
        let service = switch(
            on(StackLayer::CircuitBreaker),
            self.circuit_breaker.layer(service),
            CircuitBreaker::passthrough,
        );
        let service = switch(
            on(StackLayer::Bulkhead),
            self.bulkhead.layer(service),
            Bulkhead::passthrough,
        );
        let service = switch(
            on(StackLayer::RateLimit),
            self.rate_limit.layer(service),
            RateLimit::passthrough,
        );
        let service = match self.hedge.as_ref().filter(|_| on(StackLayer::Hedge)) {
            Some(hedge) => Either::Left(BoxFuturesLayer::new(hedge.clone()).layer(service)),
            None => Either::Right(service),
        };
        let service = switch(
            on(StackLayer::Retry),
            self.retry.layer(service),
            RetryBackoff::passthrough,
        );
        let service = switch(
            on(StackLayer::Coalesce),
            self.coalesce.layer(service),
            Coalesce::passthrough,
        );
        let service = switch(
            on(StackLayer::FallbackCache),
            self.fallback_cache.layer(service),
            FallbackCache::passthrough,
        );
        let service = switch(
            on(StackLayer::LoopGuard),
            self.loop_guard.layer(service),
            LoopGuard::passthrough,
        );
        let service = switch(
            on(StackLayer::Observability),
            self.observability.layer(service),
            Observability::passthrough,
        );
        let render = RenderErrors::new(service).with_catalog(self.catalog.clone());
        if self.render_errors {
            render
        } else {
            render.passthrough()
        }
    }
}
