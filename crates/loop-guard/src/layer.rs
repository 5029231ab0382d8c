//! [`LoopGuardLayer`]: the configuration, as a [`tower_layer::Layer`].

use toolwarden_core::McpClassifier;
use tower_layer::Layer;

use crate::config::{LoopGuardBuilder, LoopGuardConfig};
use crate::service::LoopGuard;

/// Applies [`LoopGuard`] to a service: refuses tool calls that repeat the
/// same call, or a short cycle of calls, too often.
///
/// The layer holds only the configuration. Each service it builds keeps its
/// own session histories, shared by that service's clones.
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
}

impl LoopGuardLayer {
    /// A layer with every default (see [`LoopGuardBuilder`]).
    pub fn new() -> Self {
        Self::from_config(LoopGuardConfig::default())
    }

    /// A builder, starting from every default.
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
        LoopGuardLayer { config }
    }

    /// The configuration every service built by this layer uses.
    pub fn config(&self) -> &LoopGuardConfig<C> {
        &self.config
    }
}

impl<S, C: Clone> Layer<S> for LoopGuardLayer<C> {
    type Service = LoopGuard<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LoopGuard::new(inner, self.config.clone())
    }
}
