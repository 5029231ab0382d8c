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
//!   `notifications/cancelled` upstream). An error from the stack becomes an
//!   `isError` tool result the model can read (`FailureReport`), except a
//!   JSON-RPC error of the server, which is passed through unchanged.
//! - Every other request goes straight to the upstream; its JSON-RPC errors
//!   pass through unchanged, a transport failure is `-32000 upstream
//!   unavailable: ...`, a timeout `-32001`.
//! - Progress the server sends for a forwarded request reaches the client
//!   before the response, a token's in the order the server sent it: the
//!   answer waits (up to 1 s) until every progress the upstream transport
//!   read before the response has been forwarded (see [`crate::routes`]).
//! - Notifications from the client: `notifications/progress` (for requests the
//!   server sent) are re-addressed to the server's token, a token's in the
//!   order the downstream transport read them (each waits up to 1 s for its
//!   turn, see [`send_in_turn`]), and the
//!   client's answer to that request is passed to the server
//!   only after them (see [`UpstreamHandler`](crate::upstream::UpstreamHandler));
//!   `roots/list_changed` and custom ones are forwarded; `cancelled` is
//!   rmcp's (see above) and `initialized` is the proxy's own handshake
//!   business. Both downstream transports count that progress as they read
//!   it: stdio's session transport and each Streamable HTTP session's (see
//!   [`crate::stdio`], [`crate::http`]), each into its client's own routes,
//!   which the client is registered with in [`Downstreams`].
//!
//! Not forwarded: `subscriptions/listen` (2026-07-28 subscriptions) is answered
//! "method not found", as rmcp does for servers that do not implement it.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams,
    CancelTaskRequest, CancelledNotificationParam, ClientCapabilities, ClientConfig,
    ClientNotification, ClientRequest, CompleteRequest, CompleteRequestParams, CompleteResult,
    CustomNotification, CustomRequest, CustomResult, ErrorCode, ErrorData, GetExtensions, GetMeta,
    GetPromptRequest, GetPromptRequestParams, GetPromptResponse, GetSkillRequest,
    GetSkillRequestParams, GetSkillResult, GetTaskParams, GetTaskRequest, GetTaskResult,
    Implementation, InitializeRequestParams, InitializeResult, ListPromptsResult,
    ListResourceTemplatesResult, ListResourcesResult, ListSkillsResult, ListToolsResult,
    PaginatedRequestParams, PingRequest, ProgressNotificationParam, ProtocolVersion,
    ReadResourceDirectoryRequest, ReadResourceDirectoryRequestParams, ReadResourceDirectoryResult,
    ReadResourceRequest, ReadResourceRequestParams, ReadResourceResponse, RequestOptionalParam,
    RootsListChangedNotification, ServerConfig, ServerResult, SubscribeRequestParams,
    UnsubscribeRequestParams, UpdateTaskParams, UpdateTaskRequest,
};
// Logging and resources/subscribe are deprecated by newer protocol versions;
// the proxy still forwards them for clients and servers that use them.
#[allow(deprecated)]
use rmcp::model::{SetLevelRequest, SetLevelRequestParams, SubscribeRequest, UnsubscribeRequest};
use rmcp::service::{NotificationContext, RequestContext, RoleClient, RoleServer};
use rmcp::ServerHandler;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use toolwarden_core::classify::{CallTimedOut, TransportError};
use toolwarden_core::jsonrpc::ErrorObject;
use toolwarden_core::rejection::find_rejection;
use toolwarden_core::{FailureReport, McpResponse, SessionKey};
use toolwarden_rmcp::OnRequestSent;
use tower::ServiceExt as _;

use crate::http::InSession;
use crate::routes::{
    send_in_turn, Caller, CauseGuard, DownstreamId, Downstreams, ProgressReceipt, ProgressRoutes,
    Resolved, RouteGuard,
};
use crate::sessions::Lease;
use crate::stack::ToolStack;
use crate::upstream::{Upstream, UpstreamService};

/// What every session of the proxy shares: the upstream, the tool stack and
/// the registry of connected clients.
pub struct ProxyCore {
    upstream: Upstream,
    upstream_service: UpstreamService,
    stack: ToolStack,
    downstreams: Downstreams,
    /// Session numbers; shared by the cores of one [`SessionUpstreams`](crate::sessions::SessionUpstreams).
    sessions: Arc<AtomicU64>,
    /// The bound on each request other than `tools/call` (`limits.request_timeout`).
    request_timeout: Duration,
    /// A session's own core (`upstream.session_mode = "per_session"`): its
    /// hold on its upstream, which closes it when the core is dropped.
    lease: Option<Lease>,
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
    /// The core over `upstream`, sending tool calls through `stack`.
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
        Self::build(
            upstream,
            stack,
            downstreams,
            request_timeout,
            Arc::default(),
            None,
        )
    }

    fn build(
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
            stack,
            downstreams,
            sessions,
            request_timeout,
            lease,
        })
    }

    /// One session's own core (see [`crate::sessions`]), numbering its
    /// session from `numbers`.
    pub(crate) fn for_session(
        upstream: Upstream,
        stack: ToolStack,
        downstreams: Downstreams,
        request_timeout: Duration,
        numbers: Arc<AtomicU64>,
        lease: Lease,
    ) -> Arc<Self> {
        Self::build(
            upstream,
            stack,
            downstreams,
            request_timeout,
            numbers,
            Some(lease),
        )
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

/// The JSON-RPC error a downstream client gets for a failed forwarded request.
pub fn error_data(error: &(dyn StdError + 'static)) -> ErrorData {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(obj) = e.downcast_ref::<ErrorObject>() {
            return ErrorData::new(
                ErrorCode(i32::try_from(obj.code).unwrap_or(-32603)),
                obj.message.clone(),
                obj.data.clone(),
            );
        }
        if e.is::<TransportError>() {
            return ErrorData::new(
                ErrorCode(-32000),
                format!("upstream unavailable: {e}"),
                None,
            );
        }
        if e.is::<CallTimedOut>() {
            return ErrorData::new(
                ErrorCode(-32001),
                format!("upstream request timed out: {e}"),
                None,
            );
        }
        current = e.source();
    }
    ErrorData::internal_error(format!("toolwarden proxy: {error}"), None)
}

/// The answer to a `tools/call` the stack failed: a JSON-RPC error of the
/// server passes through; anything else (a rejection by a layer, a transport
/// failure, a timeout) becomes an `isError` result saying what happened.
pub fn tool_failure(
    tool: &str,
    error: &(dyn StdError + 'static),
) -> Result<CallToolResult, ErrorData> {
    if find_rejection(error).is_none() {
        let mut current = Some(error);
        while let Some(e) = current {
            if e.is::<ErrorObject>() {
                return Err(error_data(e));
            }
            current = e.source();
        }
    }
    let report = FailureReport::from_error(tool, error).to_tool_result();
    match ServerResult::from_tool_result(None, report) {
        ServerResult::CallToolResult(result) => Ok(result),
        _ => Err(ErrorData::internal_error(
            format!("{tool} failed: {error}"),
            None,
        )),
    }
}

/// A result of another kind than expected, read as the expected kind: rmcp
/// reads results as an untagged union, so a result may have matched an
/// earlier variant and still be the same JSON.
fn reinterpret<T: DeserializeOwned>(other: &ServerResult) -> Result<T, ErrorData> {
    serde_json::to_value(other)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| {
            ErrorData::internal_error(
                "the upstream server answered with a result of another kind",
                None,
            )
        })
}

/// The `$variant` result, or the same JSON read as it.
macro_rules! expect {
    ($result:expr, $variant:ident) => {
        match $result {
            ServerResult::$variant(v) => Ok(v),
            other => reinterpret(&other),
        }
    };
}

/// A request other than `tools/call` outlived `limits.request_timeout`.
struct RequestTimedOut(Duration);

fn cancelled() -> ErrorData {
    ErrorData::new(ErrorCode(-32800), "request cancelled by the client", None)
}

async fn unless_cancelled<F: Future>(ct: &CancellationToken, f: F) -> Option<F::Output> {
    tokio::select! {
        output = f => Some(output),
        () = ct.cancelled() => None,
    }
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

fn method_label(request: &ClientRequest) -> &'static str {
    match request {
        ClientRequest::CallToolRequest(_) => "tools/call",
        ClientRequest::ListToolsRequest(_) => "tools/list",
        ClientRequest::PingRequest(_) => "ping",
        ClientRequest::ListResourcesRequest(_)
        | ClientRequest::ListResourceTemplatesRequest(_)
        | ClientRequest::ReadResourceRequest(_)
        | ClientRequest::SubscribeRequest(_)
        | ClientRequest::UnsubscribeRequest(_)
        | ClientRequest::ReadResourceDirectoryRequest(_) => "resources",
        ClientRequest::ListPromptsRequest(_) | ClientRequest::GetPromptRequest(_) => "prompts",
        _ => "other",
    }
}

impl ProxyServer {
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
            }),
        }
    }

    /// The routes the transport this server is served over should count its
    /// client's progress into ([`ProgressTallyTransport`](crate::upstream::ProgressTallyTransport)),
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
        if self.core.is_per_session() && !takes_requests(context) {
            return Err(ErrorData::invalid_request(
                "this proxy opens one upstream connection per session \
                 (upstream.session_mode = \"per_session\"): send initialize to open a session, \
                 then send requests under its Mcp-Session-Id",
                None,
            ));
        }
        self.touch(context);
        if self.core.upstream.is_started() {
            return Ok(());
        }
        let mut config = default_client_config();
        if let Some(capabilities) = context.client_capabilities() {
            config.capabilities = capabilities;
        }
        if let Some(info) = context.client_info() {
            config.client_info = info;
        }
        self.core.upstream.start(config);
        let limit = self.core.upstream.config().connect_timeout;
        if let Err(e) = self.core.upstream.wait_connected(limit).await {
            tracing::warn!(error = %e, "the upstream did not start");
        }
        Ok(())
    }

    /// Puts the request's `_meta` back (rmcp moved it into the context),
    /// routes progress for it to this client, and records it as this
    /// session's, so that what the server asks while handling it is asked
    /// of this client (see [`Downstreams::target_of`]). Keep both guards
    /// until the request has ended.
    fn prepare(
        &self,
        request: &mut ClientRequest,
        context: &RequestContext<RoleServer>,
    ) -> (RouteGuard<RoleServer>, CauseGuard) {
        *request.get_meta_mut() = context.meta.clone();
        let caller = Caller {
            session: self.session.number,
            client: self.session.downstream.get().map(|(id, _)| *id),
        };
        let asks = !matches!(request, ClientRequest::PingRequest(_));
        let cause = self
            .core
            .downstreams
            .forwarding(caller, context.id.clone(), asks);
        let record = cause.recorder();
        let route = RouteGuard::new(
            Arc::clone(&self.core.upstream.shared().progress_up),
            context
                .meta
                .get_progress_token()
                .map(|token| (context.peer.clone(), token)),
        );
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
        self.touch_and_start(&context).await?;
        metrics::counter!("toolwarden_proxy_requests_total", "method" => method_label(&request))
            .increment(1);
        let (route, _cause) = self.prepare(&mut request, &context);
        let call = self.core.upstream_service.clone().oneshot(request);
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
        match outcome {
            Some(Err(RequestTimedOut(limit))) => Err(ErrorData::new(
                ErrorCode(-32001),
                format!("upstream request timed out after {limit:?} (limits.request_timeout)"),
                None,
            )),
            Some(Ok(Ok(result))) => Ok(result),
            Some(Ok(Err(e))) => Err(error_data(e.as_ref())),
            None => Err(cancelled()),
        }
    }

    async fn forward_empty(
        &self,
        request: ClientRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.forward(request, context).await.map(|_| ())
    }

    fn server_config(&self) -> ServerConfig {
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

fn optional<M: Default, P>(params: Option<P>) -> RequestOptionalParam<M, P> {
    RequestOptionalParam {
        method: M::default(),
        params,
        extensions: Default::default(),
    }
}

#[allow(deprecated)] // resources/subscribe is legacy-only in rmcp; it is still forwarded
impl ServerHandler for ProxyServer {
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        self.core.upstream.start(upstream_client_config(&request));
        self.touch(&context);
        let limit = self.core.upstream.config().connect_timeout;
        let connection = self
            .core
            .upstream
            .wait_connected(limit)
            .await
            .map_err(|e| {
                ErrorData::new(
                    ErrorCode(-32000),
                    format!("upstream unavailable: {e}"),
                    None,
                )
            })?;
        if connection.info().is_none() {
            return Err(ErrorData::internal_error(
                "the upstream server sent no initialize result",
                None,
            ));
        }
        Ok(self.server_config())
    }

    async fn ping(&self, context: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        let request = ClientRequest::PingRequest(PingRequest {
            method: Default::default(),
            extensions: Default::default(),
        });
        self.forward_empty(request, context).await
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        let request = ClientRequest::CompleteRequest(CompleteRequest::new(request));
        expect!(self.forward(request, context).await?, CompleteResult)
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let request = ClientRequest::SetLevelRequest(SetLevelRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let request = ClientRequest::GetPromptRequest(GetPromptRequest::new(request));
        match self.forward(request, context).await? {
            ServerResult::InputRequiredResult(r) => Ok(GetPromptResponse::InputRequired(r)),
            other => expect!(other, GetPromptResult).map(GetPromptResponse::Complete),
        }
    }

    async fn list_prompts(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let request = ClientRequest::ListPromptsRequest(optional(request));
        expect!(self.forward(request, context).await?, ListPromptsResult)
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let request = ClientRequest::ListResourcesRequest(optional(request));
        expect!(self.forward(request, context).await?, ListResourcesResult)
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let request = ClientRequest::ListResourceTemplatesRequest(optional(request));
        expect!(
            self.forward(request, context).await?,
            ListResourceTemplatesResult
        )
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let request = ClientRequest::ReadResourceRequest(ReadResourceRequest::new(request));
        match self.forward(request, context).await? {
            ServerResult::InputRequiredResult(r) => Ok(ReadResourceResponse::InputRequired(r)),
            other => expect!(other, ReadResourceResult).map(ReadResourceResponse::Complete),
        }
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let request = ClientRequest::SubscribeRequest(SubscribeRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let request = ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.touch_and_start(&context).await?;
        metrics::counter!("toolwarden_proxy_requests_total", "method" => "tools/call").increment(1);
        let tool = request.name.to_string();
        let mut request = ClientRequest::CallToolRequest(CallToolRequest::new(request));
        let (route, _cause) = self.prepare(&mut request, &context);
        request.extensions_mut().insert(self.session.key.clone());
        let call = self.core.stack.clone().oneshot(request);
        let outcome = unless_cancelled(&context.ct, call).await;
        if outcome.is_some() {
            unless_cancelled(&context.ct, route.progress_first()).await;
        }
        match outcome {
            Some(Ok(ServerResult::InputRequiredResult(r))) => {
                Ok(CallToolResponse::InputRequired(r))
            }
            Some(Ok(ServerResult::CreateTaskResult(r))) => {
                // Its status notifications are this client's only.
                let client = self.session.downstream.get().map(|(id, _)| *id);
                self.core.downstreams.task_created(client, &r.task.task_id);
                Ok(CallToolResponse::Task(r))
            }
            Some(Ok(other)) => expect!(other, CallToolResult).map(CallToolResponse::Complete),
            Some(Err(e)) => tool_failure(&tool, e.as_ref()).map(CallToolResponse::Complete),
            None => Err(cancelled()),
        }
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let request = ClientRequest::ListToolsRequest(optional(request));
        expect!(self.forward(request, context).await?, ListToolsResult)
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        let result = self
            .forward(ClientRequest::CustomRequest(request), context)
            .await?;
        match result {
            ServerResult::CustomResult(r) => Ok(r),
            other => serde_json::to_value(&other)
                .map(CustomResult::new)
                .map_err(|e| ErrorData::internal_error(e.to_string(), None)),
        }
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        self.check_task_owner(&request.task_id, &context)?;
        let request = ClientRequest::GetTaskRequest(GetTaskRequest::new(request));
        expect!(self.forward(request, context).await?, GetTaskResult)
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.check_task_owner(&request.task_id, &context)?;
        let request = ClientRequest::UpdateTaskRequest(UpdateTaskRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.check_task_owner(&request.task_id, &context)?;
        let request = ClientRequest::CancelTaskRequest(CancelTaskRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn list_skills(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListSkillsResult, ErrorData> {
        let request = ClientRequest::ListSkillsRequest(optional(request));
        expect!(self.forward(request, context).await?, ListSkillsResult)
    }

    async fn get_skill(
        &self,
        request: GetSkillRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetSkillResult, ErrorData> {
        let request = ClientRequest::GetSkillRequest(GetSkillRequest::new(request));
        expect!(self.forward(request, context).await?, GetSkillResult)
    }

    async fn read_resource_directory(
        &self,
        request: ReadResourceDirectoryRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceDirectoryResult, ErrorData> {
        let request =
            ClientRequest::ReadResourceDirectoryRequest(ReadResourceDirectoryRequest::new(request));
        expect!(self.forward(request, context).await?, ListResourcesResult)
    }

    async fn on_cancelled(
        &self,
        _notification: CancelledNotificationParam,
        _context: NotificationContext<RoleServer>,
    ) {
        // rmcp cancelled the request's context, which drops the upstream call,
        // which sends notifications/cancelled upstream under the upstream id.
    }

    async fn on_progress(
        &self,
        notification: ProgressNotificationParam,
        mut context: NotificationContext<RoleServer>,
    ) {
        // Progress on a request the server sent us (sampling, elicitation):
        // back to the server under its own token, in the order read. The
        // receipt was put there by the downstream transport; it is dropped
        // once the progress is forwarded (or here, if it goes nowhere), so
        // the client's answer can wait for it. The token is looked up in
        // this client's own routes, where the server's requests to it are
        // routed (another client may use the same token); a client not
        // registered was sent no request, so its progress goes nowhere.
        let receipt = context.extensions.remove::<ProgressReceipt<RoleClient>>();
        let Some((_, routes)) = self.session.downstream.get() else {
            return;
        };
        if let Resolved::To(server, token) = routes.resolve(&notification.progress_token).await {
            let mut params = notification;
            params.progress_token = token;
            send_in_turn(receipt, server.notify_progress(params)).await;
        }
    }

    async fn on_initialized(&self, _context: NotificationContext<RoleServer>) {}

    async fn on_roots_list_changed(&self, context: NotificationContext<RoleServer>) {
        let mut notification = ClientNotification::RootsListChangedNotification(
            RootsListChangedNotification::default(),
        );
        *notification.get_meta_mut() = context.meta;
        self.notify_upstream(notification).await;
    }

    async fn on_custom_notification(
        &self,
        notification: CustomNotification,
        context: NotificationContext<RoleServer>,
    ) {
        let mut notification = ClientNotification::CustomNotification(notification);
        *notification.get_meta_mut() = context.meta;
        self.notify_upstream(notification).await;
    }

    fn get_info(&self) -> ServerConfig {
        self.server_config()
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
