//! [`ProxyServer`]: the proxy as the downstream client's MCP server.
//!
//! It implements rmcp's `ServerHandler`, whose every request method and
//! notification hook it overrides to forward: rmcp's Streamable HTTP server
//! only serves `ServerHandler`s, and rmcp's blanket `Service` impl for them
//! makes that the one implementation both transports use.
//!
//! - `initialize` starts the upstream (mirroring this client's capabilities)
//!   if it is not running, waits for it (`upstream.connect_timeout`), and
//!   answers with the upstream server's `InitializeResult`; rmcp then agrees
//!   on the client's protocol version if it knows it, else the server's.
//! - `tools/call` goes through the tool stack ([`crate::stack`]), raced
//!   against the client's `notifications/cancelled` (dropping the call sends
//!   `notifications/cancelled` upstream). A failed call is an `isError`
//!   tool result the model can read, made by the stack's own edge (see
//!   "Errors", below).
//! - Every other request goes straight to the upstream; its JSON-RPC errors
//!   pass through unchanged, a transport failure is `-32000 upstream
//!   unavailable: ...`, a timeout `-32001`.
//! - Progress the server sends for a forwarded request reaches the client
//!   before the response, a token's in the order the server sent it: the
//!   answer waits (up to 1 s) until every progress the upstream transport
//!   read before the response has been forwarded (see [`crate::progress`]).
//! - Notifications from the client: `notifications/progress` (for requests the
//!   server sent) are re-addressed to the server's token, a token's in the
//!   order the downstream transport read them (each waits up to 1 s for its
//!   turn, see [`send_in_turn`](crate::progress::send_in_turn)), and the
//!   client's answer to that request is passed to the server
//!   only after them (see [`UpstreamHandler`](crate::upstream::UpstreamHandler));
//!   `roots/list_changed` and custom ones are forwarded; `cancelled` is
//!   rmcp's (see above) and `initialized` is the proxy's own handshake
//!   business. Both downstream transports count that progress as they read
//!   it: stdio's session transport and each Streamable HTTP session's (see
//!   [`crate::downstream::stdio`], [`crate::downstream::http`]), each into its client's own routes,
//!   which the client is registered with in [`Downstreams`].
//!
//! Not forwarded: `subscriptions/listen` (2026-07-28 subscriptions) is answered
//! "method not found", as rmcp does for servers that do not implement it.
//!
//! # Errors
//!
//! A failed `tools/call` becomes an `isError` result (the answer a model
//! can read) through one path: the umbrella crate's
//! [`RenderErrors`](toolwarden::RenderErrors), which renders every error
//! of a tool call with the core's `FailureReport` and strips the layers'
//! sealed outcome mark from what reaches the client. The proxy has no
//! renderer of its own any more (it had one here, `tool_failure`, the same
//! `FailureReport` without the stripping).
//!
//! `RenderErrors` is the edge of [`ProxyCore`]'s stack: the core puts it
//! on top of whatever stack it is given, so a stack that does not render
//! (a bare upstream, a hand-built one) answers like the proxy's own.
//! [`build_stack`](crate::stack::build_stack)'s stack renders already
//! ([`StandardStack`](toolwarden::stack::StandardStack) has `RenderErrors`
//! on top): the core's then sees its results and passes them through. What
//! a stack returns as an error after that is a JSON-RPC error meant as such
//! (the server's own, which `RenderErrors` passes through; the tool-name
//! guard's `-32602`) and is answered as that error.
//!
//! Every failure that reaches this server is turned into the client's
//! answer in `answers.rs`: a JSON-RPC error ([`error_data`]: the server's
//! own error unchanged, a transport failure `-32000 upstream unavailable`,
//! a timeout `-32001`), `-32800` for a request the client cancelled.
//!
//! Files: `core.rs` ([`ProxyCore`]), `handler.rs` (the `ServerHandler`
//! methods), `answers.rs` (results and errors as the client gets them).

mod answers;
mod core;
mod handler;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use futures::FutureExt as _;
use rmcp::model::{
    ClientCapabilities, ClientConfig, ClientNotification, ClientRequest, ErrorData, GetExtensions,
    GetMeta, Implementation, InitializeRequestParams, ProtocolVersion, ServerConfig, ServerResult,
};
use rmcp::service::{RequestContext, RoleClient, RoleServer};
use toolwarden_core::SessionKey;
use toolwarden_rmcp::OnRequestSent;
use tower::ServiceExt as _;

use self::answers::{unless_cancelled, RequestTimedOut};
use super::http::{ConnectionKill, InSession};
use super::{Caller, CauseGuard, DownstreamId, Downstreams};
use crate::gateway::Member;
use crate::progress::{ProgressRoutes, RouteGuard};

pub use self::answers::error_data;
pub use self::core::ProxyCore;

/// The `_meta` members of a 2026-07-28 request that describe its client to
/// the hop it is sent over (the logging level is the request's own, and
/// goes on).
const CLIENT_ENVELOPE: [&str; 3] = [
    "io.modelcontextprotocol/protocolVersion",
    "io.modelcontextprotocol/clientInfo",
    "io.modelcontextprotocol/clientCapabilities",
];

/// One downstream session: its key for the layers (loop guard per session)
/// and its registration for server→client traffic.
struct Session {
    key: SessionKey,
    /// Its number, unique in the proxy's life (the `n` of `session-n`).
    number: u64,
    /// Set by [`ProxyServer::touch`]: the client's id in [`Downstreams`] and
    /// the progress routes it was registered with, where the server's
    /// requests forwarded to it are routed and its progress is resolved.
    downstream: OnceLock<(DownstreamId, Arc<ProgressRoutes<RoleClient>>)>,
    /// The routes for a transport made alongside this server (stdio's): see
    /// [`ProxyServer::progress_routes`]. An HTTP session's transport has
    /// routes of its own, handed over with each request ([`InSession`]).
    progress: Arc<ProgressRoutes<RoleClient>>,
    downstreams: Downstreams,
    /// Whether an `initialize` of this session succeeded: a second one is
    /// refused (it was answered with the first's result, nothing
    /// renegotiated).
    initialized: std::sync::atomic::AtomicBool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((id, _)) = self.downstream.get() {
            self.downstreams.remove(*id);
        }
    }
}

/// The proxy's MCP server for one downstream session (see the
/// [module docs](self)). Create one per session with [`ProxyServer::new`].
#[derive(Clone)]
pub struct ProxyServer {
    core: Arc<ProxyCore>,
    session: Arc<Session>,
}

impl fmt::Debug for ProxyServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyServer")
            .field("session", &self.session.key.as_str())
            .finish_non_exhaustive()
    }
}

/// The upstream's client description for a downstream client: its
/// capabilities and identity, and its protocol version when rmcp can open a
/// session with it (else the newest that has an `initialize` handshake).
#[must_use]
pub fn upstream_client_config(downstream: &InitializeRequestParams) -> ClientConfig {
    let version = if downstream.protocol_version.has_initialize()
        && ProtocolVersion::KNOWN_VERSIONS.contains(&downstream.protocol_version)
    {
        downstream.protocol_version.clone()
    } else {
        ProtocolVersion::LATEST_WITH_INITIALIZE
    };
    InitializeRequestParams::new(
        downstream.capabilities.clone(),
        downstream.client_info.clone(),
    )
    .with_protocol_version(version)
}

fn default_client_config() -> ClientConfig {
    InitializeRequestParams::new(
        ClientCapabilities::default(),
        Implementation::new("toolwarden-proxy", env!("CARGO_PKG_VERSION")),
    )
    .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
}

/// The HTTP connection a request rmcp serves without a session came on.
fn sessionless_connection(context: &RequestContext<RoleServer>) -> Option<u64> {
    if takes_requests(context) {
        return None;
    }
    let parts = context.extensions.get::<axum::http::request::Parts>()?;
    parts
        .extensions
        .get::<ConnectionKill>()
        .map(ConnectionKill::id)
}

/// Whether the client that sent the request of `context` can be sent the
/// server's requests (and so is registered in [`Downstreams`]): over stdio
/// always; over Streamable HTTP only with a session.
///
/// rmcp puts the HTTP request's `http::request::Parts` in the extensions of
/// every request it serves over HTTP. Without a session (clients of the
/// 2026-07-28 protocol; any request with per-request protocol metadata) it
/// serves the request through a one-shot transport made for it alone: that
/// carries the answer back, but rmcp takes no answer from the client, so a
/// request of the server's sent there would never be answered. Requests of
/// a session come through the session's transport, which marks each one
/// [`InSession`], `initialize` included. Not the `mcp-session-id` header:
/// `initialize` has none yet, and rmcp routes a request by its protocol
/// version and metadata, not by that header (a request it serves without a
/// session may carry a stale one). The mark says which transport the
/// request really came through.
fn takes_requests(context: &RequestContext<RoleServer>) -> bool {
    context.extensions.get::<InSession>().is_some()
        || context
            .extensions
            .get::<axum::http::request::Parts>()
            .is_none()
}

/// Counts a request of the proxy's clients in
/// `toolwarden_proxy_requests_total`, by method (MCP's, else `other`):
/// every request a handler gets, first thing, whether it is then forwarded,
/// answered by the proxy or the gateway, or refused.
pub(super) fn count_request(method: &str) {
    metrics::counter!(
        "toolwarden_proxy_requests_total",
        "method" => crate::downstream::framer::method_label(method)
    )
    .increment(1);
}

impl ProxyServer {
    /// The key the stack keeps this client's per-session state under (the
    /// loop guard's history, a per-session coalescing, a breaker keyed by
    /// session and tool), and the gateway its task routes: the session's;
    /// for a request rmcp serves without a session (a client of the
    /// 2026-07-28 protocol), which gets a server of its own, its HTTP
    /// connection's (`connection-N`). So a keep-alive client's calls share
    /// one history, and one server per request does not make each call a
    /// session of its own (whose loops nobody sees, and which fill the
    /// guard's bounded map of sessions until new ones share its overflow
    /// history, and one client's calls count against another's).
    pub(crate) fn session_key(&self, context: &RequestContext<RoleServer>) -> SessionKey {
        match sessionless_connection(context) {
            Some(connection) => SessionKey::from(format!("connection-{connection}").as_str()),
            None => self.session.key.clone(),
        }
    }

    /// A server for a new downstream session.
    #[must_use]
    pub fn new(core: Arc<ProxyCore>) -> Self {
        let n = core.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let downstreams = core.downstreams.clone();
        ProxyServer {
            core,
            session: Arc::new(Session {
                key: SessionKey::from(format!("session-{n}").as_str()),
                number: n,
                downstream: OnceLock::new(),
                progress: Arc::default(),
                downstreams,
                initialized: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The routes the transport this server is served over should count its
    /// client's progress into (`ProgressTally`),
    /// for a transport that does not bring its own: stdio's. Each server has
    /// its own, as rmcp numbers the progress tokens of each client's peer
    /// separately.
    pub(crate) fn progress_routes(&self) -> Arc<ProgressRoutes<RoleClient>> {
        Arc::clone(&self.session.progress)
    }

    /// Registers this session's client (once), if it can be sent requests
    /// (see [`takes_requests`]). It is registered with
    /// the progress routes its transport counts into: an HTTP session's
    /// ([`InSession`]), else this server's own ([`progress_routes`](Self::progress_routes)),
    /// and, over HTTP, with what closes its session if it stops reading.
    fn touch(&self, context: &RequestContext<RoleServer>) {
        if !takes_requests(context) {
            return;
        }
        self.session.downstream.get_or_init(|| {
            let in_session = context.extensions.get::<InSession>();
            let progress = in_session.map_or_else(
                || Arc::clone(&self.session.progress),
                |session| Arc::clone(session.progress_routes()),
            );
            let disconnect = in_session.map(InSession::disconnect);
            let id = self.core.downstreams.register(
                context.peer.clone(),
                Arc::clone(&progress),
                disconnect,
            );
            (id, progress)
        });
    }

    /// [`touch`](Self::touch), and starts the upstream for a session that
    /// opened without `initialize` (2026-07-28 inline metadata), describing
    /// the client from the request's metadata and waiting for the connection
    /// (a failure is then this request's error).
    ///
    /// A session's own core (`upstream.session_mode = "per_session"`)
    /// serves its session's requests only: a request rmcp serves without a
    /// session has no upstream of its own to go to, and is refused
    /// (`-32600`) rather than given a connection for a single request.
    async fn touch_and_start(&self, context: &RequestContext<RoleServer>) -> Result<(), ErrorData> {
        self.start(context, true).await
    }

    /// [`touch_and_start`](Self::touch_and_start), registering the client
    /// only if `register`: not for `server/discover`, whose peer rmcp
    /// makes for that answer alone when it comes before a lifecycle is
    /// chosen (over stdio, before `initialize`). Registered, that peer
    /// stayed the client's for the connection's life, and every request of
    /// the server's (sampling, elicitation, roots) was answered "no client
    /// is connected".
    pub(super) async fn start(
        &self,
        context: &RequestContext<RoleServer>,
        register: bool,
    ) -> Result<(), ErrorData> {
        if self.core.is_per_session() && !takes_requests(context) {
            return Err(ErrorData::invalid_request(
                "this proxy opens one upstream connection per session \
                 (upstream.session_mode = \"per_session\"): send initialize to open a session, \
                 then send requests under its Mcp-Session-Id",
                None,
            ));
        }
        if register {
            self.touch(context);
        }
        let started = match &self.core.gateway {
            Some(gateway) => gateway.is_started(),
            None => self.core.upstream.is_started(),
        };
        if started {
            return Ok(());
        }
        let mut config = default_client_config();
        if let Some(capabilities) = context.client_capabilities() {
            config.capabilities = capabilities;
        }
        if let Some(info) = context.client_info() {
            config.client_info = info;
        }
        if let Some(gateway) = &self.core.gateway {
            gateway.start(&config);
            if let Err(e) = gateway.wait_connected().await {
                tracing::warn!(error = %e, "no upstream of the gateway started");
            }
            return Ok(());
        }
        self.core.upstream.start(config);
        let limit = self.core.upstream.config().connect_timeout;
        if let Err(e) = self.core.upstream.wait_connected(limit).await {
            tracing::warn!(error = %e, "the upstream did not start");
        }
        Ok(())
    }

    /// Puts the request's `_meta` back (rmcp moved it into the context)
    /// without the client's 2026-07-28 envelope ([`CLIENT_ENVELOPE`]),
    /// routes progress for it to this client, and records it as this
    /// session's, so that what the server asks while handling it is asked
    /// of this client (see [`Downstreams::target_of`]). Keep both guards
    /// until the request has ended.
    fn prepare(
        &self,
        request: &mut ClientRequest,
        context: &RequestContext<RoleServer>,
        member: Option<&Member>,
    ) -> (RouteGuard<RoleServer>, CauseGuard) {
        let upstream = member.map_or(&self.core.upstream, Member::upstream);
        *request.get_meta_mut() = context.meta.clone();
        // A 2026-07-28 client's envelope describes it to the proxy, not the
        // proxy to the server: each hop has its own (rmcp writes the
        // upstream hop's when that hop is a 2026-07-28 one). A server
        // initialized with the handshake refuses a request carrying one.
        for key in CLIENT_ENVELOPE {
            request.get_meta_mut().remove(key);
        }
        let caller = Caller {
            session: self.session.number,
            client: self.session.downstream.get().map(|(id, _)| *id),
        };
        let asks = !matches!(request, ClientRequest::PingRequest(_));
        let downstreams = member.map_or(&self.core.downstreams, Member::downstreams);
        let cause = downstreams.forwarding(caller, context.id.clone(), asks);
        let record = cause.recorder();
        let to = context
            .meta
            .get_progress_token()
            .map(|token| (context.peer.clone(), token));
        // Only a request that asked for progress looks its client up.
        let receiver = to
            .as_ref()
            .and(caller.client)
            .and_then(|client| downstreams.progress_receiver(client));
        let route =
            RouteGuard::to_receiver(Arc::clone(&upstream.shared().progress_up), to, receiver);
        let hook = route.hook();
        request
            .extensions_mut()
            .insert(OnRequestSent::new(move |id, token| {
                hook(token);
                record(id);
            }));
        (route, cause)
    }

    /// Sends a request (not a tool call) straight upstream.
    async fn forward(
        &self,
        mut request: ClientRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<ServerResult, ErrorData> {
        count_request(request.method());
        self.touch_and_start(&context).await?;
        let member = match &self.core.gateway {
            Some(gateway) => Some(gateway.route(&mut request)?),
            None => None,
        };
        let (route, _cause) = self.prepare(&mut request, &context, member);
        let call = match member {
            Some(member) => member.service().clone().oneshot(request).boxed(),
            None => self.core.upstream_service.clone().oneshot(request).boxed(),
        };
        // Dropping the call on timeout cancels it upstream.
        let limit = self.core.request_timeout;
        let call = async move {
            tokio::time::timeout(limit, call)
                .await
                .map_err(|_| RequestTimedOut(limit))
        };
        let outcome = unless_cancelled(&context.ct, call).await;
        if outcome.is_some() {
            unless_cancelled(&context.ct, route.progress_first()).await;
        }
        answers::forwarded(outcome)
    }

    async fn forward_empty(
        &self,
        request: ClientRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.forward(request, context).await.map(|_| ())
    }

    fn server_config(&self) -> ServerConfig {
        if let Some(gateway) = &self.core.gateway {
            return gateway.server_config();
        }
        let Some(info) = self.core.upstream.server_info() else {
            let mut config = ServerConfig::new(Default::default());
            config.protocol_version = ProtocolVersion::LATEST_WITH_INITIALIZE;
            config.server_info = Implementation::new("toolwarden-proxy", env!("CARGO_PKG_VERSION"));
            return config;
        };
        let mut config = ServerConfig::new(info.capabilities.clone());
        config.protocol_version = info.protocol_version.clone();
        config.server_info = info
            .server_info
            .clone()
            .unwrap_or_else(|| Implementation::new("toolwarden-proxy", env!("CARGO_PKG_VERSION")));
        config.instructions = info.instructions.clone();
        config.meta = info.meta.clone();
        config
    }
}

impl ProxyServer {
    /// Refuses a request about a task the server created for another
    /// session's call (`tasks/get`, `tasks/update`, `tasks/cancel`): over a
    /// shared upstream every session's tasks are the one connection's, and
    /// one session must not read or cancel another's. Answered as the
    /// server answers an unknown task (`-32602`), so a task's existence is
    /// not told either.
    fn check_task_owner(
        &self,
        task_id: &str,
        context: &RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.touch(context);
        let me = self.session.downstream.get().map(|(id, _)| *id);
        if self.core.downstreams.task_of_another(task_id, me) {
            metrics::counter!("toolwarden_proxy_foreign_task_refusals_total").increment(1);
            return Err(ErrorData::invalid_params(
                format!("unknown task: {task_id}"),
                None,
            ));
        }
        Ok(())
    }

    async fn notify_upstream(&self, notification: ClientNotification) {
        if let Some(gateway) = &self.core.gateway {
            gateway.notify_all(notification).await;
            return;
        }
        let Some(connection) = self.core.upstream.connection() else {
            tracing::debug!("dropped a client notification: the upstream is down");
            return;
        };
        if let Err(e) = connection
            .client()
            .peer()
            .send_notification(notification)
            .await
        {
            tracing::debug!(error = %e, "could not forward a notification upstream");
        }
    }
}
