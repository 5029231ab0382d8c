//! [`ObservabilityBuilder`]: the knobs of an
//! [`ObservabilityLayer`](crate::ObservabilityLayer), their defaults and
//! their validation.

use std::sync::Arc;

use toolwarden_core::{ConfigError, McpClassifier};

use crate::clock::ClockSource;
use crate::layer::ObservabilityLayer;
use crate::registry::{Config, Shared};

/// The most tool names (and event keys) a layer labels by name.
pub const MAX_TOOLS_LIMIT: usize = 10_000;
/// The most methods a layer labels by name.
pub const MAX_METHODS_LIMIT: usize = 1_000;
/// The largest recent-failure window.
pub const RECENT_WINDOW_LIMIT: usize = 10_000;

/// Builds an [`ObservabilityLayer`]; every knob has a documented default,
/// and [`build`](Self::build) refuses a bad value naming its field.
///
/// The caps (`max_tools`, `max_methods`) bound the label values, and with
/// them every per-name state of the layer: statistics cells, metric handles
/// and event series. Names admitted under a cap are kept for the life of the
/// layer (never evicted, since evicting would admit new names and grow the
/// recorder's series without bound), which is why they are caps rather
/// than the `.bounds(Bounds)` of the keyed layers.
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
            config: Config::default(),
            classifier: McpClassifier::new(),
        }
    }
}

impl ObservabilityBuilder {
    /// A builder with every default (the same as
    /// [`ObservabilityLayer::builder`]).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
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
    /// [`ClockSource`].
    #[must_use]
    pub fn clock(mut self, source: ClockSource) -> Self {
        self.config.clock = source;
        self
    }

    /// The classifier that judges each call's result. Use the one the rest
    /// of the stack uses. Default [`McpClassifier::new()`].
    #[must_use]
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
        Ok(ObservabilityLayer::from_parts(
            Arc::new(Shared::new(self.config)),
            self.classifier,
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        // `ObservabilityLayer::new` skips validation because of this.
        let built = ObservabilityBuilder::new().build().unwrap();
        assert_eq!(
            format!("{built:?}"),
            format!("{:?}", ObservabilityLayer::new())
        );
    }
}
