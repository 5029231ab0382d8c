//! [`CoalesceBuilder`].

use std::collections::HashMap;
use std::sync::Arc;

use toolwarden_core::overrides::{Overridable, ToolOverrides};
use toolwarden_core::{ConfigError, Events, ToolCatalog};

use crate::layer::{CoalesceLayer, Config};

/// The default bound on calls in flight that others may join: 10 000.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

#[derive(Debug, Clone)]
struct Knobs {
    catalog: ToolCatalog,
    coalesce: Option<bool>,
    per_session: bool,
    max_in_flight: usize,
    events: Events,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            catalog: ToolCatalog::new(),
            coalesce: None,
            per_session: false,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            events: Events::new(),
        }
    }
}

/// Builds a [`CoalesceLayer`]; see each knob for its default.
///
/// ```
/// use toolwarden_coalesce::CoalesceLayer;
/// use toolwarden_core::ToolCatalog;
///
/// let layer = CoalesceLayer::builder()
///     .catalog(ToolCatalog::new())
///     .tool("get_weather", |b| b.coalesce(true))
///     .build()
///     .unwrap();
/// assert!(layer.coalesces("get_weather"));
/// assert!(!layer.coalesces("send_email")); // the empty, untrusted catalog says nothing
///
/// let err = CoalesceLayer::builder().max_in_flight(0).build().unwrap_err();
/// assert_eq!(err.field(), "max_in_flight");
/// ```
#[derive(Debug, Default)]
pub struct CoalesceBuilder {
    knobs: Knobs,
    tools: ToolOverrides<CoalesceBuilder>,
}

impl Overridable for CoalesceBuilder {
    fn overrides(&mut self) -> &mut ToolOverrides<Self> {
        &mut self.tools
    }
}

impl CoalesceBuilder {
    /// The catalog that says which tools' identical calls may share one
    /// call: those it calls cacheable or safe to repeat
    /// ([`ToolCatalog::is_cacheable`], [`ToolCatalog::is_safe_to_repeat`]:
    /// configured so, or trusted `readOnlyHint`/`idempotentHint`
    /// annotations). Default: a new, empty, untrusted catalog, in which no
    /// tool qualifies. Layer-wide.
    #[must_use]
    pub fn catalog(mut self, catalog: ToolCatalog) -> Self {
        self.tools.layer_wide("catalog");
        self.knobs.catalog = catalog;
        self
    }

    /// Whether identical calls share one call whatever the catalog says
    /// (`true`), or never (`false`); in a [`tool`](Self::tool) closure, for
    /// that tool. Default: unset, the catalog decides.
    #[must_use]
    pub fn coalesce(mut self, coalesce: bool) -> Self {
        self.knobs.coalesce = Some(coalesce);
        self
    }

    /// Settings of one tool: `configure` gets a builder carrying this
    /// builder's final values and may change [`coalesce`](Self::coalesce)
    /// for that tool. Every other knob is layer-wide (refused in a closure,
    /// naming `tools."<tool>".<knob>`). Default: no overrides.
    #[must_use]
    pub fn tool(
        mut self,
        tool: impl Into<String>,
        configure: impl FnOnce(CoalesceBuilder) -> CoalesceBuilder + Send + 'static,
    ) -> Self {
        self.tools.push(tool, configure);
        self
    }

    /// Whether only calls of one session share a call (the session is part
    /// of the key). Default `false`: identical calls share whatever their
    /// session, as the fallback cache serves one stored answer to every
    /// session. Set it when a tool's answer depends on who asks beyond its
    /// arguments. Layer-wide.
    #[must_use]
    pub fn per_session(mut self, per_session: bool) -> Self {
        self.tools.layer_wide("per_session");
        self.knobs.per_session = per_session;
        self
    }

    /// The most calls in flight that others may join (the bound of the
    /// map: its slots, calls in flight and answered slots kept for their
    /// key, which are swept first when a new key finds the map full).
    /// Default [`DEFAULT_MAX_IN_FLIGHT`] (10 000). A call past it is made on
    /// its own, not shared. At least 1. Layer-wide.
    #[must_use]
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.tools.layer_wide("max_in_flight");
        self.knobs.max_in_flight = max_in_flight;
        self
    }

    /// Where [`Event::Coalesced`](toolwarden_core::Event::Coalesced) is
    /// reported, once for each call that joined another. Default: no sinks.
    /// Layer-wide.
    #[must_use]
    pub fn events(mut self, events: Events) -> Self {
        self.tools.layer_wide("events");
        self.knobs.events = events;
        self
    }

    /// Validates the configuration; the error names the bad field.
    pub fn build(mut self) -> Result<CoalesceLayer, ConfigError> {
        let tools = std::mem::take(&mut self.tools);
        let knobs = self.knobs;
        if knobs.max_in_flight == 0 {
            return Err(ConfigError::new("max_in_flight", "must be at least 1"));
        }
        let resolved = tools.resolve(
            || CoalesceBuilder {
                knobs: knobs.clone(),
                ..CoalesceBuilder::default()
            },
            |b| Ok(b.knobs.coalesce),
        )?;
        let tools: HashMap<Arc<str>, bool> = resolved
            .into_iter()
            .filter_map(|(tool, coalesce)| Some((Arc::from(tool), coalesce?)))
            .collect();
        Ok(CoalesceLayer::from_config(Config {
            catalog: knobs.catalog,
            coalesce: knobs.coalesce,
            tools,
            per_session: knobs.per_session,
            max_in_flight: knobs.max_in_flight,
            events: knobs.events,
        }))
    }
}
