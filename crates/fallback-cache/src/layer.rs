//! [`FallbackCacheLayer`]: the configuration and the shared cache.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::{Circuits, Events, McpClassifier, ToolCatalog};
use tower_layer::Layer;

use crate::availability::Availability;
use crate::builder::FallbackCacheBuilder;
use crate::service::{FallbackCache, Shared};

/// The configuration every service built by one layer shares (kept by the
/// builder while it is set, validated by `build`).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) catalog: ToolCatalog,
    pub(crate) circuits: Circuits,
    pub(crate) availability: Availability,
    pub(crate) events: Events,
    pub(crate) max_staleness: Duration,
    pub(crate) fresh_ttl: Option<Duration>,
    pub(crate) per_session: bool,
    pub(crate) max_entries: usize,
    pub(crate) max_bytes: usize,
    pub(crate) stale_note: bool,
    pub(crate) degrade: bool,
    pub(crate) alternatives: usize,
    pub(crate) min_relevance: f64,
    /// Alternatives are offered and the circuits are per session: a call
    /// keeps its session, to skip those whose circuit refuses it. Set by
    /// `build` (a registry's key function is fixed for its life).
    pub(crate) keep_session: bool,
}

/// Middleware that serves the last good result of a tool call, marked stale,
/// when the call fails, and otherwise turns the failure into a structured
/// `isError` result with alternatives. See the [crate docs](crate).
///
/// Holds the configuration and the cache: every service it builds, and
/// every service a clone of it builds, shares one cache (as a stack built
/// once and layered over one service per connection expects). Built with
/// [`FallbackCacheLayer::builder`], or [`FallbackCacheLayer::new`] for every
/// default.
#[derive(Debug, Clone)]
pub struct FallbackCacheLayer<C = McpClassifier> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classifier: C,
}

impl FallbackCacheLayer {
    /// A layer with every default (see [`FallbackCacheBuilder`]): the same
    /// as `FallbackCacheLayer::builder().build()`. Its catalog starts empty
    /// and untrusted, so nothing is cached until it is filled (through
    /// [`catalog`](Self::catalog)).
    #[must_use]
    // Invariant: the defaults are valid (a test builds them).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default fallback-cache configuration is valid")
    }

    /// A builder with every default.
    #[must_use]
    pub fn builder() -> FallbackCacheBuilder {
        FallbackCacheBuilder::default()
    }
}

impl Default for FallbackCacheLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> FallbackCacheLayer<C> {
    /// The catalog the layer reads (shared with the one given to
    /// [`FallbackCacheBuilder::catalog`]: filling either fills both).
    #[must_use]
    pub fn catalog(&self) -> &ToolCatalog {
        &self.shared.config.catalog
    }

    /// Whether a stored result is served only in the session that stored
    /// it ([`FallbackCacheBuilder::per_session`]).
    #[must_use]
    pub fn per_session(&self) -> bool {
        self.shared.config.per_session
    }

    /// How many results the cache shared by this layer's services holds now.
    #[must_use]
    pub fn cached_results(&self) -> usize {
        self.shared.cache.len()
    }
}

impl<S, C: Clone> Layer<S> for FallbackCacheLayer<C> {
    type Service = FallbackCache<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackCache::new(inner, self)
    }
}
