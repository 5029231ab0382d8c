//! [`LoopGuardLayer`]: the configuration and the session histories, as a
//! [`tower_layer::Layer`].

use std::sync::Arc;

use toolwarden_core::McpClassifier;
use tower_layer::Layer;

use crate::builder::{default_config, LoopGuardBuilder};
use crate::config::LoopGuardConfig;
use crate::service::LoopGuard;
use crate::sessions::Sessions;

/// Middleware that refuses tool calls that repeat the same call, or a short
/// cycle of calls, too often: applies [`LoopGuard`] to a service.
///
/// The layer holds the configuration and the session histories, created
/// when the layer is built: every service it builds, and every service
/// built by its clones, shares them. So a stack that builds one service
/// per connection still sees an agent's calls (and every session's
/// successes) as one history, and one bound on memory applies to all.
/// (This is the one departure from tower's "a layer is configuration"
/// shape: the stack's promise is that services built from it share their
/// state.) For histories of their own, build another layer.
///
/// ```
/// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
/// let layer = LoopGuardLayer::builder()
///     .tool("wait_for_job", |b| b.exempt(true))
///     .tool("job_status", |b| b.limits(ToolLimits::polling()))
///     .build()
///     .unwrap();
/// assert_eq!(layer.config().limits_for("wait_for_job"), None);
/// ```
#[derive(Debug, Clone)]
pub struct LoopGuardLayer<C = McpClassifier> {
    config: LoopGuardConfig<C>,
    sessions: Arc<Sessions>,
}

impl LoopGuardLayer {
    /// A layer with every default (see [`LoopGuardBuilder`]): the same as
    /// `LoopGuardLayer::builder().build()`.
    #[must_use]
    pub fn new() -> Self {
        Self::from_config(default_config())
    }

    /// A builder, starting from every default.
    #[must_use]
    pub fn builder() -> LoopGuardBuilder {
        LoopGuardBuilder::default()
    }
}

impl Default for LoopGuardLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> LoopGuardLayer<C> {
    pub(crate) fn from_config(config: LoopGuardConfig<C>) -> Self {
        let sessions = Arc::new(Sessions::for_config(&config));
        LoopGuardLayer { config, sessions }
    }

    /// The configuration every service built by this layer uses.
    #[must_use]
    pub fn config(&self) -> &LoopGuardConfig<C> {
        &self.config
    }

    /// The session histories every service built by this layer shares.
    pub(crate) fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }
}

impl<S, C: Clone> Layer<S> for LoopGuardLayer<C> {
    type Service = LoopGuard<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LoopGuard::new(inner, self)
    }
}
