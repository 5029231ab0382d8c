//! [`CircuitBreakerLayer`].

use std::collections::HashMap;

use toolwarden_core::{Events, McpClassifier};
use tower_layer::Layer;

use crate::builder::CircuitBreakerBuilder;
use crate::config::Config;
use crate::registry::CircuitRegistry;
use crate::service::CircuitBreaker;

/// Middleware that refuses calls to a key (a tool, by default) whose circuit
/// is open, failing fast with [`CircuitOpen`](toolwarden_core::CircuitOpen).
///
/// The layer holds the configuration and the [`CircuitRegistry`] of the
/// breakers; every service it makes, and every clone of it, shares them.
/// [`CircuitBreakerLayer::new`] has every default; build one with other
/// values with [`CircuitBreakerLayer::builder`] (every default is listed on
/// [`CircuitBreakerBuilder`]).
///
/// ```
/// use tower::Layer;
/// use toolwarden_core::testing::MockMcp;
/// use toolwarden_circuit_breaker::{CircuitBreaker, CircuitBreakerLayer};
///
/// let layer = CircuitBreakerLayer::new();
/// let a = layer.layer(MockMcp::new());
/// let b = CircuitBreaker::new(MockMcp::new(), &layer); // the same, spelled out
/// assert!(a.registry().is_empty() && b.registry().is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = McpClassifier> {
    registry: CircuitRegistry,
    classifier: C,
}

impl CircuitBreakerLayer<McpClassifier> {
    /// A layer with every default, the same as `builder().build()` (see
    /// [`CircuitBreakerBuilder`] for each default).
    #[must_use]
    pub fn new() -> Self {
        // The defaults are valid (`build` accepts them: tested), so there is
        // nothing to check.
        let registry = CircuitRegistry::new(Config::default(), HashMap::new(), Events::new(), None);
        CircuitBreakerLayer::from_parts(registry, McpClassifier::new())
    }

    /// A builder with every default.
    #[must_use]
    pub fn builder() -> CircuitBreakerBuilder<McpClassifier> {
        CircuitBreakerBuilder::new()
    }
}

impl Default for CircuitBreakerLayer<McpClassifier> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> CircuitBreakerLayer<C> {
    pub(crate) fn from_parts(registry: CircuitRegistry, classifier: C) -> Self {
        CircuitBreakerLayer {
            registry,
            classifier,
        }
    }

    /// The breakers: snapshots, manual control, remote transitions, and the
    /// [`CircuitView`](toolwarden_core::CircuitView) other layers read.
    #[must_use]
    pub fn registry(&self) -> &CircuitRegistry {
        &self.registry
    }

    /// The classifier that judges each call's outcome.
    #[must_use]
    pub fn classifier(&self) -> &C {
        &self.classifier
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self)
    }
}
