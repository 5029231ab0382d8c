//! [`LoopGuardLayer`]: the configuration, as a [`tower_layer::Layer`].

use std::sync::Arc;

use toolwarden_core::McpClassifier;
use tower_layer::Layer;

use crate::config::{LoopGuardBuilder, LoopGuardConfig};
use crate::service::LoopGuard;
use crate::sessions::Sessions;

/// Applies [`LoopGuard`] to a service: refuses tool calls that repeat the
/// same call, or a short cycle of calls, too often.
///
/// The layer holds the configuration and the session histories, created
/// when the layer is built: every service it builds, and every service
/// built by its clones, shares them. So a stack that builds one service
/// per connection still sees an agent's calls (and every session's
/// successes) as one history, and one bound on memory applies to all.
/// (This is the one departure from tower's "a layer is configuration"
/// shape: the stack's promise is that services built from it share their
/// state.) [`LoopGuard::new`] builds a service with histories of its own.
///
/// ```
/// use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
/// let layer = LoopGuardLayer::builder()
///     .exempt("wait_for_job")
///     .tool_limits("job_status", ToolLimits::polling())
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
    /// A layer with every default (see [`LoopGuardBuilder`]).
    #[must_use]
    pub fn new() -> Self {
        Self::from_config(LoopGuardConfig::default())
    }

    /// A builder, starting from every default.
    #[must_use]
    pub fn builder() -> LoopGuardBuilder {
        LoopGuardBuilder::new()
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
    pub fn config(&self) -> &LoopGuardConfig<C> {
        &self.config
    }
}

impl<S, C: Clone> Layer<S> for LoopGuardLayer<C> {
    type Service = LoopGuard<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LoopGuard::with_sessions(inner, self.config.clone(), Arc::clone(&self.sessions))
    }
}
