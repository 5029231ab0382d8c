//! [`ProxyCore`]: what every session of the proxy shares.

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::downstream::sessions::Lease;
use crate::downstream::Downstreams;
use rmcp::model::{ClientRequest, ServerResult};
use toolwarden::RenderErrors;
use toolwarden_core::BoxError;
use tower::ServiceExt as _;

use crate::gateway::Gateway;
use crate::stack::{ToolStack, ToolStackLayer};
use crate::upstream::{Upstream, UpstreamService};

/// What every session of the proxy shares: the upstream, the tool stack and
/// the registry of connected clients.
pub struct ProxyCore {
    pub(super) upstream: Upstream,
    pub(super) upstream_service: UpstreamService,
    /// The tool stack, its failures rendered as `isError` results at its
    /// edge (see "Errors" in the [module docs](super)). Replaced whole by a
    /// configuration reload ([`restack`](Self::restack)); each call loads
    /// it once (one `ArcSwap` load) and keeps the stack it started with.
    stack: ArcSwap<RenderErrors<ToolStack>>,
    pub(super) downstreams: Downstreams,
    /// Session numbers; shared by the cores of one [`SessionUpstreams`](crate::downstream::SessionUpstreams).
    pub(super) sessions: Arc<AtomicU64>,
    /// The bound on each request other than `tools/call` (`limits.request_timeout`).
    pub(super) request_timeout: Duration,
    /// A session's own core (`upstream.session_mode = "per_session"`): its
    /// hold on its upstream, which closes it when the core is dropped.
    lease: Option<Lease>,
    /// A gateway's core: the upstreams requests are routed to (`upstream`
    /// is then its first, for what names one).
    pub(super) gateway: Option<Arc<Gateway>>,
}

impl fmt::Debug for ProxyCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyCore")
            .field("upstream", &self.upstream)
            .field("downstreams", &self.downstreams)
            .finish_non_exhaustive()
    }
}

impl ProxyCore {
    /// The core over `upstream`, sending tool calls through `stack`, whose
    /// failures become `isError` results (`RenderErrors` on top of it: any
    /// stack will do, one that renders already too).
    /// `downstreams` must be the registry the upstream was built with.
    /// Requests other than `tools/call` are bounded by the default
    /// `limits.request_timeout` (60 s).
    #[must_use]
    pub fn new(upstream: Upstream, stack: ToolStack, downstreams: Downstreams) -> Arc<Self> {
        let limit = crate::config::LimitsConfig::default().request_timeout;
        ProxyCore::with_request_timeout(upstream, stack, downstreams, limit)
    }

    /// [`new`](Self::new), with requests other than `tools/call` bounded by
    /// `request_timeout` (past it: cancelled upstream, answered `-32001`).
    #[must_use]
    pub fn with_request_timeout(
        upstream: Upstream,
        stack: ToolStack,
        downstreams: Downstreams,
        request_timeout: Duration,
    ) -> Arc<Self> {
        Self::for_session(
            upstream,
            stack,
            downstreams,
            request_timeout,
            Arc::default(),
            None,
        )
    }

    /// A core numbering its sessions from `numbers`; with a `lease`, one
    /// session's own (see [`crate::downstream::sessions`]).
    pub(crate) fn for_session(
        upstream: Upstream,
        stack: ToolStack,
        downstreams: Downstreams,
        request_timeout: Duration,
        sessions: Arc<AtomicU64>,
        lease: Option<Lease>,
    ) -> Arc<Self> {
        Arc::new(ProxyCore {
            upstream_service: upstream.service(),
            upstream,
            stack: ArcSwap::from_pointee(RenderErrors::new(stack)),
            downstreams,
            sessions,
            request_timeout,
            lease,
            gateway: None,
        })
    }

    /// The core of a gateway: tool calls through `stack` (over the
    /// gateway's [`service`](Gateway::service)), every other request routed
    /// by `gateway` (see [`crate::gateway`]). `downstreams` must be the
    /// registry the gateway was built with.
    #[must_use]
    pub fn for_gateway(
        gateway: Arc<Gateway>,
        stack: ToolStack,
        downstreams: Downstreams,
        request_timeout: Duration,
    ) -> Arc<Self> {
        let upstream = gateway.members()[0].upstream().clone();
        Arc::new(ProxyCore {
            upstream_service: upstream.service(),
            upstream,
            stack: ArcSwap::from_pointee(RenderErrors::new(stack)),
            downstreams,
            sessions: Arc::default(),
            request_timeout,
            lease: None,
            gateway: Some(gateway),
        })
    }

    /// The gateway, for a gateway's core.
    #[must_use]
    pub fn gateway(&self) -> Option<&Arc<Gateway>> {
        self.gateway.as_ref()
    }

    /// Sends a `tools/call` through the tool stack; a failure comes back as
    /// an `isError` result (or as a JSON-RPC error meant as such).
    pub(super) fn call_tool(
        &self,
        request: ClientRequest,
    ) -> impl Future<Output = Result<ServerResult, BoxError>> + Send + 'static {
        // Named here, not in the handler's `async fn`: there the compiler
        // cannot prove the future `Send` through `RenderErrors`' bounds.
        RenderErrors::clone(&self.stack.load()).oneshot(request)
    }

    /// Puts `layer` around this core's upstream (the gateway's service for
    /// a gateway's core) for the calls from now on: a configuration
    /// reload. Calls in flight finish in the stack they started in.
    pub(crate) fn restack(&self, layer: &ToolStackLayer) {
        let stack = match &self.gateway {
            Some(gateway) => layer.stack(gateway.service()),
            None => layer.stack(self.upstream_service.clone()),
        };
        self.stack.store(Arc::new(RenderErrors::new(stack)));
    }

    /// Whether this core is one session's own (`per_session` mode).
    #[must_use]
    pub fn is_per_session(&self) -> bool {
        self.lease.is_some()
    }

    /// The upstream.
    #[must_use]
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}
