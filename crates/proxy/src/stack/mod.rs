//! The tool stack: what every `tools/call` passes through between the
//! downstream client and the upstream server.
//!
//! [`build_stack`] is the one place the layers are put together. It receives
//! the validated [`Config`], the innermost service ([`UpstreamService`], which
//! sends through the current upstream connection) and the [`SharedState`] the
//! layers report into, and returns a [`ToolStack`]: a boxed, cloneable
//! `tower::Service<ClientRequest, Response = ServerResult, Error = BoxError>`.
//! The proxy clones it per call, drives it with `oneshot`, and renders any
//! error it returns as a tool result (see [`crate::downstream::server`]).

use std::fmt;
use std::sync::{Arc, OnceLock};

use rmcp::model::{ClientRequest, ServerResult};
use serde_json::Value;
use toolwarden::observability::{circuit_check, HealthRegistry};
use toolwarden::stack::{StackLayer, StandardStackLayer};
use toolwarden_core::events::Event;
use toolwarden_core::{BoxError, ConfigError, Events, ToolCatalog, ToolPolicy};
use tower::util::BoxCloneSyncService;
use tower::Layer;

use crate::config::Config;
use crate::endpoints::MetricsEndpoints;
use crate::replicas::Replicas;
use crate::tool_names::ToolNameGuardLayer;

pub use crate::upstream::UpstreamService;
pub use standard::standard_stack;

mod standard;

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
    /// Whether a tool's calls would reach its server now (a gateway's
    /// upstream up and its breaker closed): the fallback cache suggests no
    /// tool it says is not. `None`: every tool is.
    pub availability: Option<Availability>,
    /// Whether a tool's upstream is connected (a gateway's, its breaker
    /// open or not): the names of an upstream that never listed its tools
    /// are refused before the stack while it is not (see
    /// [`crate::tool_names`]). `None`: every upstream is.
    pub connected: Option<Availability>,
    /// `[redis]`: the breaker syncs and the distributed limiter the stack
    /// (and a gateway's upstream breakers) use. `None`: nothing is shared.
    /// [`Proxy::new`](crate::Proxy::new) and [`Proxy::gateway`](crate::Proxy::gateway)
    /// start it from the configuration when it is not set yet.
    pub replicas: Option<Replicas>,
    /// The stack's observability sink, once the stack is built: see
    /// [`events_outside_the_stack`](Self::events_outside_the_stack).
    observability: Arc<OnceLock<Events>>,
}

/// See [`SharedState::availability`].
pub type Availability = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedState")
            .field("catalog", &self.catalog)
            .field("events", &self.events)
            .field("endpoints", &self.endpoints)
            .field("replicas", &self.replicas)
            .finish()
    }
}

impl SharedState {
    /// A fresh catalog, the given events and providers.
    #[must_use]
    pub fn new(events: Events, endpoints: MetricsEndpoints) -> Self {
        SharedState {
            catalog: ToolCatalog::new(),
            events,
            endpoints,
            availability: None,
            connected: None,
            replicas: None,
            observability: Arc::default(),
        }
    }

    /// The events for what runs outside the tool stack (the Redis syncs'
    /// `SyncFailed`, a gateway's upstream breakers and quotas): `events`,
    /// and the stack's observability once the stack is built, so that
    /// `/stats`, `/metrics` and `top` count them too (they went to the log
    /// only). The stack itself takes `events`: it adds its observability.
    #[must_use]
    pub fn events_outside_the_stack(&self) -> Events {
        let observability = Arc::clone(&self.observability);
        self.events.clone().with(move |event: &Event<'_>| {
            if let Some(events) = observability.get() {
                events.emit(event);
            }
        })
    }

    /// Tells [`events_outside_the_stack`](Self::events_outside_the_stack)
    /// where `stack`'s observability is (once: a reload keeps it).
    pub(crate) fn observed_by(&self, stack: &StandardStackLayer) {
        let _ = self.observability.set(stack.observability_events());
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

/// Builds the tool stack over `upstream`: the umbrella crate's
/// [`StandardStack`](toolwarden::stack::StandardStack) (observability, loop guard, fallback cache, retry, rate
/// limit, circuit breaker, attempt timeout, outermost first), configured
/// from `config`, sharing `shared`'s catalog and events, and with its
/// circuits and health installed behind `/circuits` and `/health`.
///
/// Each layer section is handed to its builder (`settings`), and each
/// tool's table of it to `tool_settings`: the keys are the builders' own.
/// What is left here:
///
/// - `enabled = false` in a layer section leaves that layer out
///   ([`StandardStackBuilder::without`](toolwarden::stack::StandardStackBuilder::without)).
/// - `upstream.attempt_timeout` bounds each attempt; the breaker's
///   `time_window` and `slow_call_duration` are also given to the stack, so
///   its checks against the attempt timeout apply (as they do to the retry
///   layer's `deadline`).
/// - `[tools."name".circuit_breaker]` `enabled = false`: the tool's circuit
///   is disabled and never trips.
///
/// Errors name the key: `circuit_breaker.failure_threshold`,
/// `tools.search.retry.max_attempts`, `upstream.attempt_timeout, retry.deadline`.
pub fn build_stack(
    config: &Config,
    upstream: UpstreamService,
    shared: &SharedState,
) -> Result<ToolStack, ConfigError> {
    Ok(tool_stack_layer(config, shared)?.stack(upstream))
}

/// What [`build_stack`] puts around the upstream, built once: with
/// `upstream.session_mode = "per_session"` the proxy puts it around each
/// session's upstream ([`ToolStackLayer::stack`]), and every session's
/// calls share the layers' state (circuits, quotas, budget, cache, loop
/// history by session key). Installs the circuits and health providers in
/// `shared.endpoints`.
pub fn tool_stack_layer(
    config: &Config,
    shared: &SharedState,
) -> Result<ToolStackLayer, ConfigError> {
    tool_stack_layer_over(config, shared, None)
}

fn tool_stack_layer_over(
    config: &Config,
    shared: &SharedState,
    previous: Option<(&StandardStackLayer, &[StackLayer])>,
) -> Result<ToolStackLayer, ConfigError> {
    let standard = standard::standard_stack_over(config, shared, previous)?;
    install_endpoints(&standard, &shared.endpoints, shared.replicas.as_ref());
    // Names the proxy will not serve are refused before any layer keeps
    // state for them (see `crate::tool_names`).
    let mut names =
        ToolNameGuardLayer::new(config.limits.max_tool_name_bytes, shared.catalog.clone())
            .reject_unknown(config.limits.reject_unknown_tools);
    if !config.upstreams.is_empty() {
        names = names.with_upstreams(gateway_routes(config));
        if let Some(connected) = &shared.connected {
            names = names.with_connected(Arc::clone(connected));
        }
    }
    Ok(ToolStackLayer { names, standard })
}

/// A gateway's routing of tool names to upstreams, by prefix, as
/// [`Gateway`](crate::gateway::Gateway) routes them: `NAME{separator}tool`,
/// or the only upstream's bare names when they are not prefixed.
fn gateway_routes(config: &Config) -> crate::tool_names::UpstreamOf {
    let upstreams: std::collections::BTreeSet<Arc<str>> = config
        .upstreams
        .keys()
        .map(|name| Arc::from(name.as_str()))
        .collect();
    let prefixed = config.names_prefixed();
    let separator = config.gateway.separator.clone();
    Arc::new(move |name: &str| {
        if !prefixed {
            return upstreams.first().cloned();
        }
        let (upstream, _) = name.split_once(separator.as_str())?;
        upstreams.get(upstream).cloned()
    })
}

/// The layers of the proxy's tool stack, ready to be put around an
/// upstream ([`tool_stack_layer`]). Clones share the layers' state.
#[derive(Clone)]
pub struct ToolStackLayer {
    names: ToolNameGuardLayer,
    standard: StandardStackLayer,
}

impl fmt::Debug for ToolStackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolStackLayer")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ToolStackLayer {
    /// The layers `config` describes, replacing these (a configuration
    /// reload; see [`crate::reload`]): the breakers are these, their
    /// policies replaced in place (every circuit keeps its state and
    /// windows); observability is this one (statistics and metric series
    /// kept); each layer in `keep` is this one's, its state kept whole;
    /// the others are built anew, with fresh state. A failure changes
    /// nothing.
    pub fn reloaded(
        &self,
        config: &Config,
        shared: &SharedState,
        keep: &[StackLayer],
    ) -> Result<ToolStackLayer, ConfigError> {
        tool_stack_layer_over(config, shared, Some((&self.standard, keep)))
    }

    /// The standard stack's layers (for the breaker registry, say).
    #[must_use]
    pub fn standard(&self) -> &StandardStackLayer {
        &self.standard
    }

    /// The stack over `upstream` (an [`UpstreamService`], or a gateway's
    /// [`GatewayService`](crate::gateway::GatewayService)).
    #[must_use]
    pub fn stack<S>(&self, upstream: S) -> ToolStack
    where
        S: tower::Service<ClientRequest, Response = ServerResult, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        ToolStack::new(self.names.layer(self.standard.layer(upstream)))
    }
}

/// `/circuits` serves the breaker registry's snapshot; `/stats` the
/// observability layer's statistics; `/health` the stack's
/// health registry, whose `circuits` check (important: degraded while a
/// circuit is open) names the open tools.
///
/// With `replicas` (`[redis]`), `/health` also has the `redis` check
/// (important: degraded while Redis is away) and a `"redis"` object (see
/// [`Replicas::health_json`]).
pub fn install_endpoints(
    layer: &StandardStackLayer,
    endpoints: &MetricsEndpoints,
    replicas: Option<&Replicas>,
) {
    let registry = layer.registry().clone();
    endpoints.set_circuits(move || {
        let snapshot = registry.snapshot();
        async move {
            serde_json::to_value(snapshot)
                .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
        }
    });
    let stats = layer.stats();
    endpoints.set_stats(move || std::future::ready(stats.snapshot().to_json()));
    // One history for every registry a reload builds.
    let health = HealthRegistry::new().with_history(endpoints.health_history().clone());
    if layer.includes(StackLayer::CircuitBreaker) {
        // A fresh registry has no check of that name yet.
        let _ = health.register(circuit_check(layer.registry().circuits()));
    }
    if let Some(replicas) = replicas {
        // A fresh registry has no check of that name yet.
        let _ = health.register(replicas.health_check());
    }
    let replicas = replicas.cloned();
    endpoints.set_health(move || {
        let health = health.clone();
        let replicas = replicas.clone();
        async move {
            let mut report = health.report().await.to_json();
            if let (Some(replicas), Value::Object(map)) = (replicas, &mut report) {
                map.insert("redis".to_owned(), replicas.health_json());
            }
            report
        }
    });
}
