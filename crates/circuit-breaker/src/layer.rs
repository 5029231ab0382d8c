//! [`CircuitBreakerLayer`].

use toolwarden_core::McpClassifier;
use tower_layer::Layer;

use crate::config::CircuitBreakerBuilder;
use crate::registry::CircuitRegistry;
use crate::service::CircuitBreaker;

/// Middleware that refuses calls to a key (a tool, by default) whose circuit
/// is open, failing fast with [`CircuitOpen`](toolwarden_core::CircuitOpen).
///
/// The layer holds the configuration and the [`CircuitRegistry`] of the
/// breakers; every service it makes, and every clone of it, shares them.
/// Build one with [`CircuitBreakerLayer::builder`] (every default is listed
/// on [`CircuitBreakerBuilder`]).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = McpClassifier> {
    registry: CircuitRegistry,
    classifier: C,
}

impl CircuitBreakerLayer<McpClassifier> {
    /// A builder with every default.
    #[must_use]
    pub fn builder() -> CircuitBreakerBuilder<McpClassifier> {
        CircuitBreakerBuilder::new()
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
    pub fn registry(&self) -> &CircuitRegistry {
        &self.registry
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.registry.clone(), self.classifier.clone())
    }
}
