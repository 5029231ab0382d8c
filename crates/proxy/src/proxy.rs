//! [`Proxy`]: the pieces of a running proxy put together — configuration,
//! catalog, upstream, tool stack — ready to serve over stdio or HTTP.

use std::sync::Arc;
use std::time::Duration;

use toolwarden_core::ConfigError;

use crate::config::Config;
use crate::routes::Downstreams;
use crate::server::ProxyCore;
use crate::stack::{build_stack, configure_catalog, SharedState};
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
/// toolwarden_proxy::stdio::serve_stdio(proxy.core(), tokio::io::stdin(), tokio::io::stdout(), 4 << 20, shutdown).await?;
/// proxy.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    shared: SharedState,
    upstream: Upstream,
    core: Arc<ProxyCore>,
}

impl Proxy {
    /// Configures the catalog, builds the tool stack ([`build_stack`]) and
    /// prepares the upstream (started by the first client's `initialize`).
    pub fn new(
        config: Config,
        target: UpstreamTarget,
        shared: SharedState,
    ) -> Result<Self, ConfigError> {
        configure_catalog(&config, &shared.catalog);
        let downstreams = Downstreams::new();
        let upstream = Upstream::new(
            target,
            config.upstream.clone(),
            shared.catalog.clone(),
            downstreams.clone(),
        );
        upstream.check_http()?;
        let stack = build_stack(&config, upstream.service(), &shared)?;
        let core = ProxyCore::with_request_timeout(
            upstream.clone(),
            stack,
            downstreams,
            config.limits.request_timeout,
        );
        Ok(Proxy {
            config,
            shared,
            upstream,
            core,
        })
    }

    /// What sessions share; pass it to [`serve_stdio`](crate::stdio::serve_stdio)
    /// or [`serve_http`](crate::http::serve_http).
    pub fn core(&self) -> Arc<ProxyCore> {
        Arc::clone(&self.core)
    }

    /// The upstream connection.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// What the layers share (catalog, events, endpoints).
    pub fn shared(&self) -> &SharedState {
        &self.shared
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Closes the upstream connection (a child is stopped), within 15 s.
    pub async fn shutdown(&self) {
        self.upstream.shutdown(Duration::from_secs(15)).await;
    }
}
