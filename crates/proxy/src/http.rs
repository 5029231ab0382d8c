//! The downstream side over Streamable HTTP (`--listen ADDR`): rmcp's
//! `StreamableHttpService` at `/mcp`, served by axum. Each session gets its
//! own [`ProxyServer`]; all of them share the one upstream and tool stack,
//! or each has an upstream of its own under the one stack
//! (`upstream.session_mode = "per_session"`, see [`crate::sessions`]).
//!
//! POST bodies are checked by the same [`framer`](crate::framer) code as
//! stdio lines before rmcp sees them: malformed JSON-RPC gets a JSON-RPC
//! error (`-32700`, `-32600`, `-32602`; HTTP 400) rather than rmcp's
//! plain-text 415.
//!
//! Before that, every request is checked and bounded by `guard`: `Host`
//! and `Origin` against their allow-lists (403; loopback by default, never
//! turned off), the bearer token (401), the body's read time (408), the
//! number of sessions (503) and of a session's requests in flight (429).
//! Connections are served by [`serve_bounded`] rather than axum's `serve`:
//! at most `http.max_connections` at once, headers within
//! `http.header_read_timeout`, and a shutdown that waits at most
//! `http.shutdown_timeout`. Sessions idle for 5 minutes are closed by rmcp.
//! A session whose client stops reading its notifications (see
//! [`Downstreams::broadcast`](crate::routes::Downstreams::broadcast)) has
//! the connections its requests came on dropped ([`ConnectionKill`]) and is
//! closed: rmcp's session worker, stuck writing to the stream nobody reads,
//! is freed only by the connection's end.
//!
//! Server→client requests (sampling, roots, elicitation) go to the session
//! whose call caused them, on that call's response stream, and to no other
//! (see [`crate::routes`]); one no session can be found for gets an error.
//! A request rmcp serves without
//! a session (from a client of the 2026-07-28 protocol, or any request with
//! per-request protocol metadata) goes through a one-shot transport that
//! carries its answer back and nothing more: rmcp takes no answer from such
//! a client. So the proxy does not count it among the connected clients
//! (a session's transport marks each request it reads `InSession`; see
//! `takes_requests` in [`crate::server`]): it gets neither the server's
//! requests nor the notifications broadcast to every client, only the
//! progress of its own requests. With no client that has a session, a
//! request of the server's gets an error at once (`-32000 no client is
//! connected ...`), as does one whose client's session ends before it
//! answers; one the session keeps open waits for its answer, as long as a
//! human takes over an elicitation, until the server cancels it.
//!
//! rmcp's session manager makes each session's transport; the proxy's
//! `ProxySessions` wraps rmcp's `LocalSessionManager` and each transport it
//! makes (`SessionTransport`), so the client's `notifications/progress`
//! are counted as the session reads them, as over stdio: progress on a
//! request of the server's reaches the server in order and before the
//! client's answer (see [`crate::routes`]). Each session counts into
//! progress routes of its own, which its transport hands to the session's
//! [`ProxyServer`] with every request it marks `InSession`, so that its
//! client is registered with them: rmcp numbers the progress tokens of each
//! session's peer separately (from 0), so two sessions each sent a request
//! of the server's can have it under the same token at the same time, and
//! their progress is kept apart. That holds for what the client
//! sent in order, that is each POST after the previous one was accepted;
//! POSTs sent concurrently have no order to keep. The one-shot transports
//! of requests without a session are rmcp's, unseen by the session manager;
//! but rmcp accepts neither notifications nor answers from such a client, so
//! there is no progress of its to order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt as _};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rmcp::model::{
    ClientJsonRpcMessage, ClientRequest, GetExtensions, JsonRpcMessage, ServerJsonRpcMessage,
};
use rmcp::service::{RoleClient, RoleServer, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService, Transport};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use toolwarden_core::jsonrpc::{code, ErrorObject, Id};
use tower::ServiceExt as _;

use crate::access::{AccessPolicy, AuthTokens, Refusal};
use crate::config::HttpConfig;
use crate::framer::{classify_line, error_line, Frame};
use crate::routes::{Disconnect, ProgressRoutes};
use crate::server::ProxyServer;
use crate::sessions::Cores;
use crate::upstream::ProgressTallyTransport;

/// The header rmcp keeps a session's id in.
const SESSION_ID_HEADER: &str = "mcp-session-id";

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn jsonrpc_error(status: StatusCode, line: String) -> Response {
    metrics::counter!("toolwarden_proxy_malformed_messages_total").increment(1);
    (status, [(header::CONTENT_TYPE, "application/json")], line).into_response()
}

/// Marks a request read by an HTTP session's transport ([`SessionTransport`]):
/// its client has a session, so it can be sent requests and answer them.
/// It carries the session's progress routes, which the transport counts the
/// client's progress into, so the [`ProxyServer`] registers the client with
/// them (see `touch` in [`crate::server`]).
#[derive(Clone)]
pub(crate) struct InSession {
    progress: Arc<ProgressRoutes<RoleClient>>,
    disconnect: Disconnect,
}

impl fmt::Debug for InSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InSession").finish_non_exhaustive()
    }
}

impl InSession {
    /// The session's progress routes.
    pub(crate) fn progress_routes(&self) -> &Arc<ProgressRoutes<RoleClient>> {
        &self.progress
    }

    /// What closes the session and drops its connections.
    pub(crate) fn disconnect(&self) -> Disconnect {
        Arc::clone(&self.disconnect)
    }
}

/// A session's transport: the client's progress counted as it is read
/// ([`ProgressTallyTransport`]) into routes of the session's own, and each
/// request marked [`InSession`] (with those routes) on its way to the
/// [`ProxyServer`]. Everything else passes through untouched.
struct SessionTransport<T> {
    inner: ProgressTallyTransport<T, RoleClient>,
    mark: InSession,
}

impl<T> SessionTransport<T> {
    /// `inner`, with progress routes of its own: rmcp numbers the progress
    /// tokens of each session's peer separately, so two sessions can be sent
    /// requests under the same token at once. `disconnect` ends the session.
    fn new(inner: T, disconnect: Disconnect) -> Self {
        let progress = Arc::<ProgressRoutes<RoleClient>>::default();
        SessionTransport {
            inner: ProgressTallyTransport::new(inner, Arc::clone(&progress)),
            mark: InSession {
                progress,
                disconnect,
            },
        }
    }
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for SessionTransport<T> {
    type Error = T::Error;

    fn name() -> Cow<'static, str> {
        T::name()
    }

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        let mut message = self.inner.receive().await?;
        if let JsonRpcMessage::Request(request) = &mut message {
            request.request.extensions_mut().insert(self.mark.clone());
        }
        Some(message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

/// rmcp's session manager `M`, each session's transport wrapped in a
/// [`SessionTransport`] counting the client's progress into the session's
/// own routes and marking its requests; everything else is `M`'s.
struct ProxySessions<M> {
    inner: M,
    /// The connections each session's requests came on.
    connections: Arc<SessionConnections>,
    /// Itself, for the sessions' [`Disconnect`]s.
    me: Weak<ProxySessions<M>>,
}

impl<M: SessionManager> ProxySessions<M> {
    /// What ends session `id` when its client stops reading: its
    /// connections are dropped (a client that does not read holds rmcp's
    /// session worker in a write to its stream; dropping the connection
    /// ends the stream and frees it), then rmcp closes the session, so its
    /// [`ProxyServer`] goes, and with it a session's own upstream. Once.
    fn disconnect(&self, id: &SessionId) -> Disconnect {
        let sessions = Weak::clone(&self.me);
        let connections = Arc::clone(&self.connections);
        let id = id.clone();
        let done = AtomicBool::new(false);
        Arc::new(move || {
            if done.swap(true, Ordering::AcqRel) {
                return;
            }
            tracing::warn!(session = %id, "closing the session of a client that does not read");
            connections.drop_session(&id);
            let (Some(sessions), Ok(runtime)) =
                (sessions.upgrade(), tokio::runtime::Handle::try_current())
            else {
                return;
            };
            let id = id.clone();
            runtime.spawn(async move {
                let closed =
                    tokio::time::timeout(SESSION_CLOSE_TIMEOUT, sessions.inner.close_session(&id))
                        .await;
                if !matches!(closed, Ok(Ok(()))) {
                    tracing::debug!(session = %id, "rmcp did not close the session cleanly");
                }
            });
        })
    }
}

/// How long closing a stalled client's session may take.
const SESSION_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

impl<M: SessionManager> SessionManager for ProxySessions<M> {
    type Error = M::Error;
    type Transport = SessionTransport<M::Transport>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        let disconnect = self.disconnect(&id);
        Ok((id, SessionTransport::new(transport, disconnect)))
    }

    fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<ServerJsonRpcMessage, Self::Error>> + Send {
        self.inner.initialize_session(id, message)
    }

    fn has_session(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        self.inner.has_session(id)
    }

    fn close_session(
        &self,
        id: &SessionId,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close_session(id)
    }

    fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<
        Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>,
    > + Send {
        self.inner.create_stream(id, message)
    }

    fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.accept_message(id, message)
    }

    fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> impl Future<
        Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>,
    > + Send {
        self.inner.create_standalone_stream(id)
    }

    fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> impl Future<
        Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>,
    > + Send {
        self.inner.resume(id, last_event_id)
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        let disconnect = self.disconnect(&id);
        Ok(match self.inner.restore_session(id).await? {
            RestoreOutcome::Restored(transport) => {
                RestoreOutcome::Restored(SessionTransport::new(transport, disconnect))
            }
            RestoreOutcome::AlreadyPresent => RestoreOutcome::AlreadyPresent,
            // NotSupported, and any outcome a later rmcp adds: nothing restored.
            _ => RestoreOutcome::NotSupported,
        })
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

/// One HTTP connection's kill switch, put in the extensions of every
/// request read on it by [`serve_bounded`]: cancelling it drops the
/// connection at once. Cancelled too when the connection ends.
#[derive(Debug, Clone)]
pub struct ConnectionKill {
    id: u64,
    token: CancellationToken,
}

/// The connections each session's requests came on (its POSTs and its GET
/// stream), so that a session whose client stops reading can have them
/// dropped. Entries whose connections all ended are pruned whenever one is
/// recorded, so the map holds at most one entry per open connection.
#[derive(Default)]
struct SessionConnections {
    by_session: Mutex<HashMap<Arc<str>, Vec<ConnectionKill>>>,
}

impl SessionConnections {
    /// Records that a request of session `id` came on `connection`.
    /// Whether a request of session `id` was recorded on `connection`
    /// already (every request after the first on a kept-alive connection).
    fn recorded(&self, id: &str, connection: &ConnectionKill) -> bool {
        lock(&self.by_session)
            .get(id)
            .is_some_and(|known| known.iter().any(|c| c.id == connection.id))
    }

    fn record(&self, id: &str, connection: &ConnectionKill) {
        if self.recorded(id, connection) {
            return;
        }
        let mut map = lock(&self.by_session);
        map.retain(|_, connections| {
            connections.retain(|c| !c.token.is_cancelled());
            !connections.is_empty()
        });
        map.entry(Arc::from(id))
            .or_default()
            .push(connection.clone());
    }

    /// Drops every connection session `id`'s requests came on.
    fn drop_session(&self, id: &str) {
        let connections = lock(&self.by_session).remove(id).unwrap_or_default();
        for connection in connections {
            connection.token.cancel();
        }
    }
}

/// What the `/mcp` route checks before rmcp sees a request: see
/// [`guard`].
#[derive(Clone)]
struct Guard {
    access: AccessPolicy,
    sessions: Arc<ProxySessions<LocalSessionManager>>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    max_sessions: usize,
    max_requests_per_session: usize,
    /// Each open session's in-flight permits. Entries are made only for
    /// sessions rmcp knows, and pruned of closed ones whenever one is
    /// added, so the map holds at most about `max_sessions` entries.
    in_flight: Arc<Mutex<HashMap<Arc<str>, Arc<Semaphore>>>>,
}

impl Guard {
    async fn open_sessions(&self) -> usize {
        self.sessions.inner.sessions.read().await.len()
    }

    /// The in-flight permits of session `id`, if rmcp knows it.
    async fn permits_of(&self, id: &str) -> Option<Arc<Semaphore>> {
        if let Some(permits) = lock(&self.in_flight).get(id) {
            return Some(Arc::clone(permits));
        }
        let open = self.sessions.inner.sessions.read().await;
        if !open.contains_key(id) {
            return None;
        }
        let mut map = lock(&self.in_flight);
        map.retain(|known, _| open.contains_key(known.as_ref()));
        let permits = map
            .entry(Arc::from(id))
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_requests_per_session)));
        Some(Arc::clone(permits))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A refusal of the listener, counted by reason.
fn refused(reason: &'static str, response: Response) -> Response {
    metrics::counter!("toolwarden_proxy_http_refusals_total", "reason" => reason).increment(1);
    response
}

/// A JSON-RPC error answer with an HTTP status other than 200.
fn jsonrpc_refusal(
    status: StatusCode,
    reason: &'static str,
    id: &Id,
    error: ErrorObject,
) -> Response {
    refused(
        reason,
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            error_line(id, error),
        )
            .into_response(),
    )
}

/// The id of a request of rmcp's, as the framer writes ids.
fn core_id(id: &rmcp::model::RequestId) -> Id {
    serde_json::to_value(id)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or(Id::Null)
}

/// Everything the `/mcp` route checks before rmcp sees a request, in order:
///
/// 1. `Host`, then `Origin` (`403`), then the bearer token (`401` with
///    `WWW-Authenticate: Bearer`), on every request ([`AccessPolicy`]).
/// 2. A POST body of JSON is read within `body_read_timeout` (`408`) and
///    `max_body_bytes` (`413`), and malformed JSON-RPC is answered the way
///    the stdio side does (`-32700`, `-32600`, `-32602` with the id when
///    readable, HTTP 400) instead of rmcp's plain-text `415`.
/// 3. An `initialize` that would open a session past `max_sessions` gets
///    `503`; a request of a session with `max_requests_per_session` already
///    in flight gets `429` (its permit is held until its answer's stream
///    ends).
///
/// Every valid message is then passed on to rmcp, and other requests (GET,
/// DELETE, other content types) too once step 1 let them through.
async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if let Err(refusal) = guard.access.check(request.uri(), request.headers()) {
        // Never the token: only which check failed.
        tracing::debug!(?refusal, "refused an HTTP request");
        return match refusal {
            Refusal::Host => refused(
                "host",
                (
                    StatusCode::FORBIDDEN,
                    "Forbidden: Host header is not allowed",
                )
                    .into_response(),
            ),
            Refusal::Origin => refused(
                "origin",
                (StatusCode::FORBIDDEN, "Forbidden: Origin is not allowed").into_response(),
            ),
            Refusal::Token => refused(
                "token",
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer realm=\"toolwarden\"")],
                    "Unauthorized: a valid bearer token is required",
                )
                    .into_response(),
            ),
        };
    }
    if let (Some(session), Some(connection)) = (
        request
            .headers()
            .get(SESSION_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
        request.extensions().get::<ConnectionKill>(),
    ) {
        // Only sessions rmcp knows: made-up ids never take room. Asked
        // once per connection and session, not on every request.
        if !guard.sessions.connections.recorded(session, connection)
            && guard
                .sessions
                .inner
                .sessions
                .read()
                .await
                .contains_key(session)
        {
            guard.sessions.connections.record(session, connection);
        }
    }
    if request.method() != Method::POST || !is_json(request.headers()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let max_body_bytes = guard.max_body_bytes;
    let bytes = match tokio::time::timeout(
        guard.body_read_timeout,
        axum::body::to_bytes(body, max_body_bytes),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return jsonrpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_line(
                    &Id::Null,
                    ErrorObject::new(
                        code::INVALID_REQUEST,
                        format!(
                            "Invalid Request: message too large (more than {max_body_bytes} bytes)"
                        ),
                    ),
                ),
            )
        }
        Err(_) => {
            return jsonrpc_refusal(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                &Id::Null,
                ErrorObject::new(
                    code::INVALID_REQUEST,
                    format!(
                        "Invalid Request: the body was not received within {:?}",
                        guard.body_read_timeout
                    ),
                ),
            )
        }
    };
    let message = match classify_line(&bytes) {
        Frame::Message(message) => message,
        Frame::Reply(line) => return jsonrpc_error(StatusCode::BAD_REQUEST, line),
        Frame::Ignore("blank line") => {
            return jsonrpc_error(
                StatusCode::BAD_REQUEST,
                error_line(
                    &Id::Null,
                    ErrorObject::new(code::PARSE_ERROR, "Parse error: empty body"),
                ),
            )
        }
        // A malformed notification or response: JSON-RPC answers nothing.
        Frame::Ignore(_) => return StatusCode::ACCEPTED.into_response(),
    };
    let mut permit = None;
    if let JsonRpcMessage::Request(request) = message.as_ref() {
        let session = parts
            .headers
            .get(SESSION_ID_HEADER)
            .and_then(|v| v.to_str().ok());
        let opens_session =
            session.is_none() && matches!(request.request, ClientRequest::InitializeRequest(_));
        // Concurrent initializes may each see room: the overshoot is
        // bounded by the connections served at once.
        if opens_session && guard.open_sessions().await >= guard.max_sessions {
            return jsonrpc_refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "sessions",
                &core_id(&request.id),
                ErrorObject::new(
                    -32000,
                    format!(
                        "too many sessions: the proxy serves at most {} at once; retry later",
                        guard.max_sessions
                    ),
                ),
            );
        }
        let permits = match session {
            Some(id) => guard.permits_of(id).await,
            None => None,
        };
        if let Some(permits) = permits {
            match permits.try_acquire_owned() {
                Ok(p) => permit = Some(p),
                Err(_) => {
                    return jsonrpc_refusal(
                        StatusCode::TOO_MANY_REQUESTS,
                        "in_flight",
                        &core_id(&request.id),
                        ErrorObject::new(
                            -32000,
                            format!(
                                "too many requests in flight for this session (at most {}); \
                                 retry once one is answered",
                                guard.max_requests_per_session
                            ),
                        ),
                    )
                }
            }
        }
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    match permit {
        None => response,
        Some(permit) => {
            // The answer may be an SSE stream: the request is in flight
            // until it ends.
            let (parts, body) = response.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                let _in_flight = &permit;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(body))
        }
    }
}

/// How a Streamable HTTP listener is bounded and who may use it; see
/// `[http]` in [`crate::config::HttpConfig`] for each default.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The largest POST body (`413` past it).
    pub max_body_bytes: usize,
    /// `Origin`, `Host` and bearer tokens.
    pub access: AccessPolicy,
    /// The longest a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// The longest a client may take to send a POST body (`408`).
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Sessions open at once (`503` past it).
    pub max_sessions: usize,
    /// Requests of one session in flight at once (`429` past it).
    pub max_requests_per_session: usize,
    /// The longest the listener waits for requests in flight on shutdown.
    pub shutdown_timeout: Duration,
}

/// What bounds the connections of a listener served by [`serve_bounded`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The longest a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Connections served at once; the next waits in the kernel's backlog.
    pub max_connections: usize,
    /// The longest the listener waits for requests in flight on shutdown.
    pub shutdown_timeout: Duration,
}

impl HttpOptions {
    /// The connection bounds among these options.
    #[must_use]
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            shutdown_timeout: self.shutdown_timeout,
        }
    }

    /// The options of `[http]` (and `downstream.max_body_bytes`), with `access`.
    #[must_use]
    pub fn new(config: &HttpConfig, max_body_bytes: usize, access: AccessPolicy) -> Self {
        HttpOptions {
            max_body_bytes,
            access,
            header_read_timeout: config.header_read_timeout,
            body_read_timeout: config.body_read_timeout,
            max_connections: config.max_connections,
            max_sessions: config.max_sessions,
            max_requests_per_session: config.max_requests_per_session,
            shutdown_timeout: config.shutdown_timeout,
        }
    }
}

/// Serves MCP over Streamable HTTP at `/mcp` on `listener` until `shutdown`
/// is cancelled, with every default of `[http]`: loopback origins and hosts
/// (and the listener's own address) only, no token. `allow_remote` is kept
/// for callers of earlier versions: the `Host` check is never turned off
/// any more (see [`serve_http_with`] to extend it).
pub async fn serve_http(
    core: impl Into<Cores>,
    listener: TcpListener,
    max_body_bytes: usize,
    allow_remote: bool,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = allow_remote;
    let access = AccessPolicy::new(&[], &[], listener.local_addr().ok(), AuthTokens::default())
        .map_err(std::io::Error::other)?;
    let options = HttpOptions::new(&HttpConfig::default(), max_body_bytes, access);
    serve_http_with(core, listener, options, shutdown).await
}

/// Serves MCP over Streamable HTTP at `/mcp` on `listener` until `shutdown`
/// is cancelled, checked and bounded by `options` (see `guard` and
/// [`serve_bounded`]).
pub async fn serve_http_with(
    cores: impl Into<Cores>,
    listener: TcpListener,
    options: HttpOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // rmcp checks `Host` too; give it the same list, never an empty one
    // (which would turn its check off).
    let config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown.child_token())
        .with_max_request_body_bytes(options.max_body_bytes)
        .with_allowed_hosts(options.access.rmcp_hosts());
    let sessions = Arc::new_cyclic(|me| ProxySessions {
        inner: LocalSessionManager::default(),
        connections: Arc::default(),
        me: Weak::clone(me),
    });
    let cores = cores.into();
    let service = StreamableHttpService::new(
        move || Ok(ProxyServer::new(cores.session_core())),
        Arc::clone(&sessions),
        config,
    );
    let guard = Guard {
        access: options.access.clone(),
        sessions,
        max_body_bytes: options.max_body_bytes,
        body_read_timeout: options.body_read_timeout,
        max_sessions: options.max_sessions,
        max_requests_per_session: options.max_requests_per_session,
        in_flight: Arc::default(),
    };
    let router = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(guard, self::guard));
    serve_bounded(listener, router, options.connection_limits(), shutdown).await
}

/// Serves `router` on `listener` (HTTP/1.1, `TCP_NODELAY`) until `shutdown`
/// is cancelled, with the bounds axum's own `serve` does not offer:
///
/// - at most `max_connections` connections at once (the next is accepted
///   once one closes; until then it waits in the kernel's backlog);
/// - a request's headers must arrive within `header_read_timeout`, or the
///   connection is closed (hyper's timer: a client sending its headers a
///   byte at a time cannot hold a connection);
/// - on shutdown, no new connection is accepted, each one is closed once
///   its request in flight is answered, and those still open after
///   `shutdown_timeout` are dropped.
pub async fn serve_bounded(
    listener: TcpListener,
    router: axum::Router,
    options: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let closing = CancellationToken::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut next_connection = 0u64;
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, a connection reset before accept:
                    // not fatal; do not spin.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Answers leave as several small writes (an SSE event's head, its
        // data, the chunk's end); with Nagle's algorithm on, the second one
        // on a kept-alive connection waited for the client's delayed ACK:
        // 40 ms per call on Linux.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        next_connection += 1;
        let kill = ConnectionKill {
            id: next_connection,
            token: CancellationToken::new(),
        };
        let service = TowerToHyperService::new(router.clone().map_request({
            let kill = kill.clone();
            move |request: axum::http::Request<hyper::body::Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(kill.clone());
                request
            }
        }));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout);
        let closing = closing.child_token();
        connections.spawn(async move {
            let _slot = slot;
            // However the connection ends, its entries can be pruned.
            let killed = kill.token.clone();
            let _ended = kill.token.drop_guard();
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                // Its session's client stopped reading: dropped, not drained.
                () = killed.cancelled() => return,
                () = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        served = connection => served,
                        () = killed.cancelled() => return,
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    let drained = tokio::time::timeout(options.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the shutdown timeout; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}
