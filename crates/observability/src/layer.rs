//! [`ObservabilityLayer`] and its builder.

use std::fmt;
use std::sync::Arc;

use toolwarden_core::{ConfigError, Events, McpClassifier};
use tower_layer::Layer;

use crate::clock::ClockSource;
use crate::events::ObservabilityEvents;
use crate::registry::{Config, Shared};
use crate::service::Observability;
use crate::stats::Stats;

/// The most tool names (and event keys) a layer labels by name.
pub const MAX_TOOLS_LIMIT: usize = 10_000;
/// The most methods a layer labels by name.
pub const MAX_METHODS_LIMIT: usize = 1_000;
/// The largest recent-failure window.
pub const RECENT_WINDOW_LIMIT: usize = 10_000;

/// Builds an [`ObservabilityLayer`]; [`build`](Self::build) validates it.
///
/// ```
/// use toolwarden_observability::ObservabilityLayer;
/// let layer = ObservabilityLayer::builder().max_tools(50).recent_window(20).build().unwrap();
/// let err = ObservabilityLayer::builder().max_tools(0).build().unwrap_err();
/// assert_eq!(err.field(), "max_tools");
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct ObservabilityBuilder<C = McpClassifier> {
    config: Config,
    classifier: C,
}

impl Default for ObservabilityBuilder {
    fn default() -> Self {
        ObservabilityBuilder {
            config: Config {
                max_tools: 100,
                max_methods: 32,
                recent_window: 100,
                span_fingerprint: true,
                clock: ClockSource::Fast,
            },
            classifier: McpClassifier::new(),
        }
    }
}

impl<C> ObservabilityBuilder<C> {
    /// How many distinct tool names get their own label value, statistics
    /// entry and event series; later names are reported as `other`, so no
    /// input can grow the number of series. The first names seen are kept
    /// for the life of the layer; each costs about 3 KiB (statistics,
    /// metric handles and event series). Default 100; at most
    /// [`MAX_TOOLS_LIMIT`].
    #[must_use]
    pub fn max_tools(mut self, max_tools: usize) -> Self {
        self.config.max_tools = max_tools;
        self
    }

    /// How many distinct methods of requests that are not tool calls get
    /// their own label value; later ones are `other`. MCP defines about
    /// twenty. Default 32; at most [`MAX_METHODS_LIMIT`].
    #[must_use]
    pub fn max_methods(mut self, max_methods: usize) -> Self {
        self.config.max_methods = max_methods;
        self
    }

    /// How many of the latest completed calls of a tool the recent failure
    /// rate covers. Default 100; at most [`RECENT_WINDOW_LIMIT`].
    #[must_use]
    pub fn recent_window(mut self, calls: usize) -> Self {
        self.config.recent_window = calls;
        self
    }

    /// Whether the call span records the argument fingerprint (hex, never
    /// the arguments). It is computed only when a subscriber enables the
    /// span, and stored in the request so that layers below (loop guard,
    /// cache) do not hash the arguments again. Default `true`.
    #[must_use]
    pub fn span_fingerprint(mut self, enabled: bool) -> Self {
        self.config.span_fingerprint = enabled;
        self
    }

    /// Where call durations are read: the time-stamp counter
    /// ([`ClockSource::Fast`], the default) or tokio's clock
    /// ([`ClockSource::Tokio`], which follows a paused clock in tests). See
    /// [`crate::clock`].
    #[must_use]
    pub fn clock(mut self, source: ClockSource) -> Self {
        self.config.clock = source;
        self
    }

    /// The classifier that judges each call's result. Use the one the rest
    /// of the stack uses. Default [`McpClassifier::new()`].
    pub fn classifier<C2>(self, classifier: C2) -> ObservabilityBuilder<C2> {
        ObservabilityBuilder {
            config: self.config,
            classifier,
        }
    }

    /// Validates the configuration, naming the bad field.
    pub fn build(self) -> Result<ObservabilityLayer<C>, ConfigError> {
        let c = &self.config;
        check_range("max_tools", c.max_tools, MAX_TOOLS_LIMIT)?;
        check_range("max_methods", c.max_methods, MAX_METHODS_LIMIT)?;
        check_range("recent_window", c.recent_window, RECENT_WINDOW_LIMIT)?;
        Ok(ObservabilityLayer {
            shared: Arc::new(Shared::new(self.config)),
            classifier: self.classifier,
        })
    }
}

fn check_range(field: &str, value: usize, max: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(field, "must be at least 1"));
    }
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("must be at most {max} (got {value})"),
        ));
    }
    Ok(())
}

/// Middleware that records every MCP call as metrics, a tracing span and
/// statistics. See the [crate docs](crate).
///
/// The layer holds its configuration and a handle to the statistics every
/// service it builds shares: clone it (cheap) to keep [`stats`](Self::stats)
/// and [`event_sink`](Self::event_sink) after handing it to a
/// `ServiceBuilder`.
#[derive(Clone)]
pub struct ObservabilityLayer<C = McpClassifier> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classifier: C,
}

impl ObservabilityLayer {
    /// A layer with the default configuration (see [`ObservabilityBuilder`]).
    #[must_use]
    pub fn new() -> Self {
        let builder = ObservabilityBuilder::default();
        ObservabilityLayer {
            shared: Arc::new(Shared::new(builder.config)),
            classifier: builder.classifier,
        }
    }

    /// A builder with the default configuration.
    #[must_use]
    pub fn builder() -> ObservabilityBuilder {
        ObservabilityBuilder::default()
    }
}

impl Default for ObservabilityLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> ObservabilityLayer<C> {
    /// A handle to the statistics of every service built by this layer.
    pub fn stats(&self) -> Stats {
        Stats {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The event sink to add to the [`Events`] of the other layers, so
    /// their resilience events are counted (see [`crate::events`]).
    pub fn event_sink(&self) -> ObservabilityEvents {
        ObservabilityEvents {
            shared: Arc::clone(&self.shared),
        }
    }

    /// An [`Events`] holding only this layer's sink; merge it with yours
    /// ([`Events::merge`]) or give it to the other layers as is.
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
        Observability::from_parts(inner, Arc::clone(&self.shared), self.classifier.clone())
    }
}
