//! [`Proxy`]: the pieces of a running proxy put together — configuration,
//! catalog, upstream, tool stack — ready to serve over stdio or HTTP.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use toolwarden::stack::StackLayer;
use toolwarden_core::{ConfigError, ToolCatalog, ToolPolicy};

use crate::config::Config;
use crate::config::SessionMode;
use crate::config::ToolConfig;
use crate::downstream::{Cores, Downstreams, ProxyCore, SessionUpstreams, Upstreams};
use crate::gateway::Gateway;
use crate::reload::{self, ReloadReport};
use crate::replicas::Replicas;
use crate::stack::{configure_catalog, tool_stack_layer, SharedState, ToolStackLayer};
use crate::upstream::{Upstream, UpstreamTarget};

/// A proxy in front of one upstream server.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use toolwarden_proxy::{config::Config, endpoints::MetricsEndpoints, stack::SharedState};
/// use toolwarden_proxy::{Proxy, UpstreamTarget};
/// let target = UpstreamTarget::Command { program: "mcp-server-time".into(), args: vec![] };
/// let shared = SharedState::new(Default::default(), MetricsEndpoints::new());
/// let proxy = Proxy::new(Config::default(), target, shared)?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// toolwarden_proxy::serve_stdio(proxy.core(), tokio::io::stdin(), tokio::io::stdout(), 4 << 20, shutdown).await?;
/// proxy.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Proxy {
    /// The running configuration (replaced by [`reload`](Self::reload)).
    config: ArcSwap<Config>,
    /// The layers around every upstream; its lock also makes reloads one
    /// at a time.
    layer: Mutex<ToolStackLayer>,
    shared: SharedState,
    upstream: Upstream,
    core: Arc<ProxyCore>,
    /// `upstream.session_mode = "per_session"`: each session's upstream.
    per_session: Option<Arc<SessionUpstreams>>,
    /// `[upstreams.NAME]`: the gateway in front of them.
    gateway: Option<Arc<Gateway>>,
}

impl Proxy {
    /// Configures the catalog, builds the tool stack ([`build_stack`](crate::stack::build_stack))
    /// and prepares the upstream (started by the first client's
    /// `initialize`). With `upstream.session_mode = "per_session"` the stack's
    /// layers are built once and put around each session's own upstream
    /// ([`cores`](Self::cores)).
    pub fn new(
        config: Config,
        target: UpstreamTarget,
        mut shared: SharedState,
    ) -> Result<Self, ConfigError> {
        start_replicas(&config, &mut shared)?;
        configure_catalog(&config, &shared.catalog);
        let downstreams = Downstreams::with_stall_timeout(config.limits.client_stall_timeout);
        let upstream = Upstream::new(
            target.clone(),
            config.upstream.clone(),
            shared.catalog.clone(),
            downstreams.clone(),
        );
        upstream.check_http()?;
        let layer = tool_stack_layer(&config, &shared)?;
        let per_session = (config.upstream.session_mode == SessionMode::PerSession).then(|| {
            SessionUpstreams::new(
                target,
                config.upstream.clone(),
                shared.catalog.clone(),
                upstream.redactor(),
                layer.clone(),
                &config.limits,
            )
        });
        let core = ProxyCore::with_request_timeout(
            upstream.clone(),
            layer.stack(upstream.service()),
            downstreams,
            config.limits.request_timeout,
        );
        Ok(Proxy {
            config: ArcSwap::from_pointee(config),
            layer: Mutex::new(layer),
            shared,
            upstream,
            core,
            per_session,
            gateway: None,
        })
    }

    /// A gateway in front of the servers of `config.upstreams` (see
    /// [`crate::gateway`]): configures the catalog (with each
    /// `[upstreams.NAME.tools."x"]` as the exposed tool's), builds the tool
    /// stack over the gateway, and prepares the upstreams (started by the
    /// first client's `initialize`).
    pub fn gateway(config: Config, shared: SharedState) -> Result<Self, ConfigError> {
        Self::gateway_with(config, shared, BTreeMap::new())
    }

    /// [`gateway`](Self::gateway), with the servers of some upstreams given
    /// here (by name) rather than by their `command` or `url`: in-process
    /// servers, say.
    pub fn gateway_with(
        config: Config,
        mut shared: SharedState,
        targets: BTreeMap<String, UpstreamTarget>,
    ) -> Result<Self, ConfigError> {
        let config = config.with_upstream_tools();
        start_replicas(&config, &mut shared)?;
        configure_catalog(&config, &shared.catalog);
        let downstreams = Downstreams::with_stall_timeout(config.limits.client_stall_timeout);
        let gateway = Gateway::new(&config, &shared, downstreams.clone(), targets)?;
        let available = Arc::downgrade(&gateway);
        shared.availability = Some(Arc::new(move |tool: &str| {
            available.upgrade().is_some_and(|g| g.is_available(tool))
        }));
        let connected = Arc::downgrade(&gateway);
        shared.connected = Some(Arc::new(move |tool: &str| {
            connected.upgrade().is_some_and(|g| g.is_connected(tool))
        }));
        let layer = tool_stack_layer(&config, &shared)?;
        let circuits = Arc::clone(&gateway);
        shared
            .endpoints
            .set_upstream_circuits(move || std::future::ready(circuits.circuits_json()));
        let core = ProxyCore::for_gateway(
            Arc::clone(&gateway),
            layer.stack(gateway.service()),
            downstreams,
            config.limits.request_timeout,
        );
        Ok(Proxy {
            upstream: core.upstream().clone(),
            config: ArcSwap::from_pointee(config),
            layer: Mutex::new(layer),
            shared,
            core,
            per_session: None,
            gateway: Some(gateway),
        })
    }

    /// The gateway, for a proxy made by [`gateway`](Self::gateway).
    #[must_use]
    pub fn gateway_ref(&self) -> Option<&Arc<Gateway>> {
        self.gateway.as_ref()
    }

    /// What sessions share in the default `shared` session mode; pass it to
    /// [`serve_stdio`](crate::serve_stdio) or
    /// [`serve_http`](crate::serve_http). Use [`cores`](Self::cores)
    /// to honour `upstream.session_mode`.
    #[must_use]
    pub fn core(&self) -> Arc<ProxyCore> {
        Arc::clone(&self.core)
    }

    /// Where each session's core comes from, as `upstream.session_mode`
    /// says: pass it to [`serve_http_with`](crate::serve_http_with),
    /// or its [`session_core`](Cores::session_core) to
    /// [`serve_stdio`](crate::serve_stdio).
    #[must_use]
    pub fn cores(&self) -> Cores {
        match &self.per_session {
            Some(sessions) => Cores::PerSession(Arc::clone(sessions)),
            None => Cores::Shared(self.core()),
        }
    }

    /// The upstream(s) to report in `/health`, as `upstream.session_mode` says.
    #[must_use]
    pub fn upstreams(&self) -> Upstreams {
        if let Some(gateway) = &self.gateway {
            return Upstreams::Gateway(Arc::clone(gateway));
        }
        match &self.per_session {
            Some(sessions) => Upstreams::PerSession(Arc::clone(sessions)),
            None => Upstreams::Shared(self.upstream.clone()),
        }
    }

    /// The upstream connection (in `per_session` mode, the one
    /// [`core`](Self::core) is over; sessions' own are in [`upstreams`](Self::upstreams)).
    #[must_use]
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// What the layers share (catalog, events, endpoints).
    #[must_use]
    pub fn shared(&self) -> &SharedState {
        &self.shared
    }

    /// The running configuration (for a gateway, with each
    /// `[upstreams.NAME.tools."x"]` moved to `[tools."NAME__x"]`).
    #[must_use]
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The layers around every upstream now (replaced by each reload):
    /// the breaker registry, statistics, and a stack over any service that
    /// shares their state.
    #[must_use]
    pub fn tool_stack_layer(&self) -> ToolStackLayer {
        self.layer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies `next` (loaded and validated, as by [`Config::load`]) to the
    /// running proxy: the hot reload of [`crate::reload`], which lists what
    /// changes and what waits for a restart. New calls use the new
    /// policies; calls in flight finish under the old ones; sessions and
    /// upstream connections stay; the circuits keep their state, and the
    /// layers whose settings did not change keep theirs.
    ///
    /// On error (the key named) nothing has changed.
    pub fn reload(&self, next: Config) -> Result<ReloadReport, ConfigError> {
        let mut layer = self.layer.lock().unwrap_or_else(PoisonError::into_inner);
        let running = self.config.load_full();
        let next = if self.gateway.is_some() {
            exposed_tools(&running, next)
        } else {
            next
        };
        let (next, restart_required) = reload::effective(&running, next);
        next.validate()?;
        let kept = reload::unchanged_layers(&running, &next);
        let next_layer = layer.reloaded(&next, &self.shared, &kept)?;
        // Nothing fails from here on.
        reconfigure_catalog(&running, &next, &self.shared.catalog);
        let registry = next_layer.standard().registry();
        for (name, tool) in &running.tools {
            let was_disabled = breaker_disabled(Some(tool));
            if was_disabled && !breaker_disabled(next.tool(name)) {
                registry.force_close(name);
            }
        }
        self.core.restack(&next_layer);
        let sessions = self
            .per_session
            .as_ref()
            .map_or(0, |sessions| sessions.restack(&next_layer));
        *layer = next_layer;
        self.config.store(Arc::new(next));
        let standard = layer.standard();
        let renewed = StackLayer::ALL
            .into_iter()
            .filter(|l| {
                !kept.contains(l)
                    && !matches!(l, StackLayer::CircuitBreaker | StackLayer::Observability)
                    // Issue 21: an optional layer that is off is not renewed.
                    && (standard.includes(*l)
                        || !matches!(
                            l,
                            StackLayer::Bulkhead | StackLayer::Coalesce | StackLayer::Hedge
                        ))
            })
            .collect();
        Ok(ReloadReport {
            restart_required,
            kept,
            renewed,
            sessions,
        })
    }

    /// Closes the upstream connection(s) (a child is stopped), within 15 s.
    pub async fn shutdown(&self) {
        let limit = Duration::from_secs(15);
        if let Some(gateway) = &self.gateway {
            gateway.shutdown(limit).await;
            return;
        }
        match &self.per_session {
            Some(sessions) => {
                futures::join!(self.upstream.shutdown(limit), sessions.shutdown(limit));
            }
            None => self.upstream.shutdown(limit).await,
        }
    }
}

/// Starts `[redis]` into `shared.replicas`, unless set already (see
/// [`crate::replicas`]).
fn start_replicas(config: &Config, shared: &mut SharedState) -> Result<(), ConfigError> {
    if let (Some(settings), None) = (&config.redis, &shared.replicas) {
        shared.replicas = Some(Replicas::start(
            settings,
            &shared.events_outside_the_stack(),
        )?);
    }
    Ok(())
}

/// Whether a tool's table switches its breaker off.
fn breaker_disabled(tool: Option<&ToolConfig>) -> bool {
    tool.and_then(|t| t.circuit_breaker.as_ref())
        .is_some_and(|cb| cb.enabled == Some(false))
}

/// `[catalog]` and the tools' `safe_to_repeat` / `cacheable` of `next`,
/// applied over those of `running`: a tool that no longer sets them goes
/// back to what its annotations say.
fn reconfigure_catalog(running: &Config, next: &Config, catalog: &ToolCatalog) {
    for (name, tool) in &running.tools {
        let had_policy = tool.safe_to_repeat.is_some() || tool.cacheable.is_some();
        let has_policy = next
            .tool(name)
            .is_some_and(|t| t.safe_to_repeat.is_some() || t.cacheable.is_some());
        if had_policy && !has_policy {
            catalog.configure(name, ToolPolicy::default());
        }
    }
    configure_catalog(next, catalog);
}

/// `next` with each `[upstreams.NAME.tools."x"]` moved to the tool's name
/// as the running gateway exposes it (the upstreams and `[gateway]`, which
/// decide the prefixes, only change on a restart); the tables of an
/// upstream that is not running wait for that restart with it.
fn exposed_tools(running: &Config, mut next: Config) -> Config {
    let mut moved = Vec::new();
    for (name, entry) in &mut next.upstreams {
        let tools = std::mem::take(&mut entry.tools);
        if running.upstreams.contains_key(name) {
            let prefix = running.upstream_prefix(name);
            moved.extend(
                tools
                    .into_iter()
                    .map(|(tool, config)| (format!("{prefix}{tool}"), config)),
            );
        }
    }
    next.tools.extend(moved);
    next
}
