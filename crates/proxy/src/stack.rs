//! The tool stack: what every `tools/call` passes through between the
//! downstream client and the upstream server.
//!
//! [`build_stack`] is the one place the layers are put together. It receives
//! the validated [`Config`], the innermost service ([`UpstreamService`], which
//! sends through the current upstream connection) and the [`SharedState`] the
//! layers report into, and returns a [`ToolStack`]: a boxed, cloneable
//! `tower::Service<ClientRequest, Response = ServerResult, Error = BoxError>`.
//! The proxy clones it per call, drives it with `oneshot`, and renders any
//! error it returns as a tool result (see [`crate::server`]).

use std::fmt;

use rmcp::model::{ClientRequest, ServerResult};
use toolwarden_core::{BoxError, ConfigError, Events, ToolCatalog, ToolPolicy};
use tower::util::BoxCloneSyncService;

use crate::config::Config;
use crate::endpoints::MetricsEndpoints;

pub use crate::upstream::UpstreamService;

/// The service every `tools/call` goes through.
pub type ToolStack = BoxCloneSyncService<ClientRequest, ServerResult, BoxError>;

/// What the layers of the stack share with the proxy.
#[derive(Clone)]
pub struct SharedState {
    /// The tool catalog, filled from `tools/list` and configured from
    /// `[catalog]` and `[tools."name"]` before the stack is built.
    pub catalog: ToolCatalog,
    /// Where layers emit their events. The proxy has installed its sinks
    /// already (a log line per event; the demo's counters); a layer built
    /// with these events reports through all of them.
    pub events: Events,
    /// The `/health`, `/circuits` and `/metrics` providers; layers that have
    /// something to show install it here (see [`MetricsEndpoints`]).
    pub endpoints: MetricsEndpoints,
}

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedState")
            .field("catalog", &self.catalog)
            .field("events", &self.events)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl SharedState {
    /// A fresh catalog, the given events and providers.
    pub fn new(events: Events, endpoints: MetricsEndpoints) -> Self {
        SharedState {
            catalog: ToolCatalog::new(),
            events,
            endpoints,
        }
    }
}

/// Applies `[catalog]` and the per-tool `safe_to_repeat` / `cacheable` to
/// `catalog` (done by the proxy before [`build_stack`]).
pub fn configure_catalog(config: &Config, catalog: &ToolCatalog) {
    catalog.set_trusted(config.catalog.trust_annotations);
    for (name, tool) in &config.tools {
        if tool.safe_to_repeat.is_some() || tool.cacheable.is_some() {
            catalog.configure(
                name,
                ToolPolicy {
                    safe_to_repeat: tool.safe_to_repeat,
                    cacheable: tool.cacheable,
                },
            );
        }
    }
}

/// Builds the tool stack over `upstream`.
///
/// The standard stack is wired here by the umbrella-crate work (lead): until
/// then this is the pass-through stack — the upstream service alone — so the
/// proxy forwards every call unchanged and the layer sections of the
/// configuration are validated but not applied. The `Result` is for the
/// layer builders, whose `build()` refuses bad combinations naming the field.
pub fn build_stack(
    config: &Config,
    upstream: UpstreamService,
    shared: &SharedState,
) -> Result<ToolStack, ConfigError> {
    let _ = (config, shared);
    Ok(ToolStack::new(upstream))
}
