//! [`BulkheadLayer`]: the configuration and the shared per-key places.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Bounds, KeyRef, McpClassifier};
use tower_layer::Layer;

use crate::builder::BulkheadBuilder;
use crate::service::Bulkhead;
use crate::state::Shared;

/// Middleware that caps the MCP tool calls in flight per key; see the
/// [crate docs](crate).
///
/// The layer holds the configuration and the per-key places, created by
/// [`build`](BulkheadBuilder::build): every service it builds, every clone
/// of those, and every service built from a clone of the layer share the
/// same caps (cloning the layer is one reference-count increment, plus a
/// clone of the classifier).
#[derive(Debug, Clone)]
pub struct BulkheadLayer<C = McpClassifier> {
    shared: Arc<Shared>,
    classifier: C,
}

impl BulkheadLayer {
    /// A layer with every default: at most
    /// [`DEFAULT_MAX_CONCURRENT`](crate::DEFAULT_MAX_CONCURRENT) (10) calls
    /// per tool in flight, refusing at once past it. The same as
    /// `BulkheadLayer::builder().build()`.
    #[must_use]
    // Invariant: the defaults are valid (a test builds them).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default bulkhead configuration is valid")
    }

    /// A builder with the defaults documented on each knob.
    #[must_use]
    pub fn builder() -> BulkheadBuilder {
        BulkheadBuilder::default()
    }
}

impl<C> BulkheadLayer<C> {
    pub(crate) fn from_shared(shared: Shared, classifier: C) -> Self {
        BulkheadLayer {
            shared: Arc::new(shared),
            classifier,
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The classifier that judges the calls of adaptive keys.
    #[must_use]
    pub fn classifier(&self) -> &C {
        &self.classifier
    }

    /// The cap of `tool` (its override, else the default); with an
    /// adaptive cap, its ceiling (see [`current_limit`](Self::current_limit)).
    #[must_use]
    pub fn max_concurrent(&self, tool: &str) -> u32 {
        self.shared
            .tools
            .get(tool)
            .map_or(self.shared.default.max_concurrent, |l| l.max_concurrent)
    }

    /// The wait of `tool` for a place (its override, else the default).
    #[must_use]
    pub fn max_wait(&self, tool: &str) -> Duration {
        self.shared
            .tools
            .get(tool)
            .map_or(self.shared.default.max_wait, |l| l.max_wait)
    }

    /// The longest wait for a place of any tool (the default's or an
    /// override's): what a call may spend waiting before it is refused.
    #[must_use]
    pub fn longest_max_wait(&self) -> Duration {
        self.shared
            .tools
            .values()
            .map(|l| l.max_wait)
            .fold(self.shared.default.max_wait, Duration::max)
    }

    /// The longest `latency_threshold` of an adaptive cap (the default's or
    /// an override's); `None` when no cap is adaptive. A stack checks it
    /// against its attempt timeout: a call that times out first can never
    /// count as slow.
    ///
    /// ```
    /// use std::time::Duration;
    /// use toolwarden_bulkhead::BulkheadLayer;
    /// assert_eq!(BulkheadLayer::new().longest_latency_threshold(), None);
    /// let adaptive = BulkheadLayer::builder()
    ///     .adaptive(|a| a.latency_threshold(Duration::from_millis(300)))
    ///     .tool("slow", |t| t.adaptive(|a| a.latency_threshold(Duration::from_secs(2))))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(adaptive.longest_latency_threshold(), Some(Duration::from_secs(2)));
    /// ```
    #[must_use]
    pub fn longest_latency_threshold(&self) -> Option<Duration> {
        std::iter::once(&self.shared.default)
            .chain(self.shared.tools.values())
            .filter_map(|l| l.adaptive.map(|a| a.latency_threshold))
            .max()
    }

    /// The bounds of the per-key state.
    #[must_use]
    pub fn bounds(&self) -> Bounds {
        self.shared.bounds
    }

    /// The calls of `key` in flight now (0 for a key never seen).
    ///
    /// ```
    /// use toolwarden_bulkhead::BulkheadLayer;
    /// use toolwarden_core::KeyRef;
    /// assert_eq!(BulkheadLayer::new().in_flight(KeyRef::Tool("search")), 0);
    /// ```
    #[must_use]
    pub fn in_flight(&self, key: KeyRef<'_>) -> u32 {
        self.shared.state.with(&key, |c| c.in_flight()).unwrap_or(0)
    }

    /// Whether `tool`'s cap is adaptive (its override's setting, else the
    /// default's).
    #[must_use]
    pub fn is_adaptive(&self, tool: &str) -> bool {
        self.shared.limits_of(Some(tool)).adaptive.is_some()
    }

    /// The cap of `key` now: `max_concurrent` for a fixed cap; where an
    /// adaptive cap stands (between its `min_concurrent` and
    /// `max_concurrent`). For a key not kept (never seen, or evicted as
    /// idle), the cap it would start with.
    ///
    /// ```
    /// use toolwarden_bulkhead::BulkheadLayer;
    /// use toolwarden_core::KeyRef;
    /// assert_eq!(BulkheadLayer::new().current_limit(KeyRef::Tool("search")), 10);
    /// ```
    #[must_use]
    pub fn current_limit(&self, key: KeyRef<'_>) -> u32 {
        self.shared.current_limit(key)
    }

    /// The recent average duration of `key`'s calls (an exponentially
    /// weighted moving average, the newest call weighing 1/8), from which a
    /// refusal's `retry_after` is estimated; `None` before any call ended.
    #[must_use]
    pub fn average_duration(&self, key: KeyRef<'_>) -> Option<Duration> {
        self.shared
            .state
            .with(&key, |c| c.average_duration())
            .flatten()
    }

    /// The number of keys kept (never above the bound's `max_keys`).
    #[must_use]
    pub fn keys(&self) -> usize {
        self.shared.state.len()
    }
}

impl Default for BulkheadLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, C: Clone> Layer<S> for BulkheadLayer<C> {
    type Service = Bulkhead<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::new(inner, self)
    }
}
