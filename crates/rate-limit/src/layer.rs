//! [`RateLimitLayer`]: the configuration and the shared quota state.

use std::collections::HashMap;
use std::sync::Arc;

use toolwarden_core::{Bounds, Events, KeyBy};
use tower_layer::Layer;

use crate::backend::RateLimitBackend;
use crate::builder::{Mode, RateLimitBuilder};
use crate::limits::RateLimits;
use crate::quota::Quota;
use crate::service::RateLimit;

/// The validated configuration, shared by the layer's limits and every
/// service built from it.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) global: Option<Quota>,
    pub(crate) per_tool: Option<Quota>,
    pub(crate) tools: HashMap<Arc<str>, Quota>,
    pub(crate) key_by: KeyBy,
    pub(crate) mode: Mode,
    pub(crate) bounds: Bounds,
    pub(crate) all_methods: bool,
    pub(crate) events: Events,
    pub(crate) backend: Option<Arc<dyn RateLimitBackend>>,
}

impl Config {
    /// The per-key quota of `tool`: its override, else the `per_tool` quota.
    pub(crate) fn tool_quota(&self, tool: &str) -> Option<Quota> {
        self.tools.get(tool).copied().or(self.per_tool)
    }
}

/// Middleware that applies GCRA quotas (global and per tool) to MCP calls;
/// see the [crate docs](crate).
///
/// The layer holds the configuration and one set of [`RateLimits`], created
/// by [`build`](RateLimitBuilder::build): every service it builds, every
/// clone of those services, and every service built from a clone of the
/// layer take their tokens from these same quotas (cloning the layer is one
/// reference-count increment). A server that builds one service per
/// connection from one layer therefore enforces one quota, not one per
/// connection (unlike tower's own `RateLimitLayer`, whose services each keep
/// their own budget; see tower#794). For independent quotas, build another
/// layer.
///
/// ```
/// use toolwarden_core::jsonrpc::Request;
/// use toolwarden_core::testing::MockMcp;
/// use toolwarden_rate_limit::{Rate, RateLimitLayer};
/// use tower::Layer;
///
/// let layer = RateLimitLayer::builder().per_tool(Rate::per_minute(1), 1).build().unwrap();
/// let (one, two) = (layer.layer(MockMcp::new()), layer.clone().layer(MockMcp::new()));
/// let call = Request::tool_call(1, "search", serde_json::json!({}));
/// assert!(one.limits().check(&call).is_ok());
/// assert!(two.limits().check(&call).is_err()); // the same quota
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limits: RateLimits,
}

impl RateLimitLayer {
    /// A layer with every default: each tool limited to
    /// [`DEFAULT_PER_TOOL_RATE`](crate::DEFAULT_PER_TOOL_RATE) (50 calls/s),
    /// burst [`DEFAULT_PER_TOOL_BURST`](crate::DEFAULT_PER_TOOL_BURST) (100),
    /// no global quota, refusing at once. The same as
    /// `RateLimitLayer::builder().build()`.
    #[must_use]
    // Invariant: the defaults are valid (a test builds them).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default rate-limit configuration is valid")
    }

    /// A builder with the defaults documented on each knob.
    #[must_use]
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::default()
    }

    pub(crate) fn from_limits(limits: RateLimits) -> Self {
        RateLimitLayer { limits }
    }

    /// The limits every service built from this layer (or from its clones)
    /// applies; a handle to the same shared state, for checking requests
    /// without a service.
    #[must_use]
    pub fn limits(&self) -> RateLimits {
        self.limits.clone()
    }

    fn config(&self) -> &Config {
        self.limits.config()
    }

    /// The mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.config().mode
    }

    /// The bounds of the per-key state, with `idle_timeout` as raised by
    /// [`RateLimitBuilder::bounds`].
    #[must_use]
    pub fn bounds(&self) -> Bounds {
        self.config().bounds
    }

    /// The global quota, if any.
    #[must_use]
    pub fn global_quota(&self) -> Option<Quota> {
        self.config().global
    }

    /// The per-key quota of `tool` (its override, else the `per_tool` quota), if any.
    #[must_use]
    pub fn tool_quota(&self, tool: &str) -> Option<Quota> {
        self.config().tool_quota(tool)
    }

    /// The backend that takes the tokens, if one is set.
    #[must_use]
    pub fn backend(&self) -> Option<&Arc<dyn RateLimitBackend>> {
        self.config().backend.as_ref()
    }
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self)
    }
}
