//! [`ObservabilityLayer`].

use std::fmt;
use std::sync::Arc;

use toolwarden_core::{Events, McpClassifier};
use tower_layer::Layer;

use crate::builder::ObservabilityBuilder;
use crate::events::ObservabilityEvents;
use crate::registry::{Config, Shared};
use crate::service::Observability;
use crate::stats::Stats;

/// Middleware that records every MCP call as metrics, a tracing span and
/// statistics. See the [crate docs](crate).
///
/// The layer holds its configuration and the state every service it builds
/// shares (statistics, label sets, metric handles): clone it (cheap) to keep
/// [`stats`](Self::stats) and [`event_sink`](Self::event_sink) after handing
/// it to a `ServiceBuilder`. [`ObservabilityLayer::new`] has every default;
/// build one with other values with [`ObservabilityLayer::builder`] (every
/// default is listed on [`ObservabilityBuilder`]).
///
/// ```
/// use tower::Layer;
/// use toolwarden_core::testing::MockMcp;
/// use toolwarden_observability::{Observability, ObservabilityLayer};
///
/// let layer = ObservabilityLayer::new();
/// let a = layer.layer(MockMcp::new());
/// let b = Observability::new(MockMcp::new(), &layer); // the same, spelled out
/// # let _ = (a, b);
/// ```
#[derive(Clone)]
pub struct ObservabilityLayer<C = McpClassifier> {
    shared: Arc<Shared>,
    classifier: C,
}

impl ObservabilityLayer {
    /// A layer with every default, the same as `builder().build()` (see
    /// [`ObservabilityBuilder`] for each default).
    #[must_use]
    pub fn new() -> Self {
        // The defaults are valid (`build` accepts them: tested), so there is
        // nothing to check.
        ObservabilityLayer::from_parts(
            Arc::new(Shared::new(Config::default())),
            McpClassifier::new(),
        )
    }

    /// A builder with every default.
    #[must_use]
    pub fn builder() -> ObservabilityBuilder {
        ObservabilityBuilder::new()
    }
}

impl Default for ObservabilityLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> ObservabilityLayer<C> {
    pub(crate) fn from_parts(shared: Arc<Shared>, classifier: C) -> Self {
        ObservabilityLayer { shared, classifier }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The classifier that judges each call's result.
    #[must_use]
    pub fn classifier(&self) -> &C {
        &self.classifier
    }

    /// A handle to the statistics of every service built by this layer.
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The event sink to add to the [`Events`] of the other layers, so
    /// their resilience events are counted (see [`ObservabilityEvents`]).
    #[must_use]
    pub fn event_sink(&self) -> ObservabilityEvents {
        ObservabilityEvents {
            shared: Arc::clone(&self.shared),
        }
    }

    /// An [`Events`] holding only this layer's sink; merge it with yours
    /// ([`Events::merge`]) or give it to the other layers as is.
    #[must_use]
    pub fn events(&self) -> Events {
        Events::new().with(self.event_sink())
    }
}

impl<C> fmt::Debug for ObservabilityLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservabilityLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clone> Layer<S> for ObservabilityLayer<C> {
    type Service = Observability<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Observability::new(inner, self)
    }
}
