//! [`Proxy`]: the pieces of a running proxy put together — configuration,
//! catalog, upstream, tool stack — ready to serve over stdio or HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::ConfigError;

use crate::config::Config;
use crate::config::SessionMode;
use crate::downstream::{Cores, Downstreams, ProxyCore, SessionUpstreams, Upstreams};
use crate::gateway::Gateway;
use crate::replicas::Replicas;
use crate::stack::{configure_catalog, tool_stack_layer, SharedState};
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
    config: Config,
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
            config,
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
            config,
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

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
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
        shared.replicas = Some(Replicas::start(settings, &shared.events)?);
    }
    Ok(())
}
