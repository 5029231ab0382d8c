//! The downstream side over Streamable HTTP (`--listen ADDR`): rmcp's
//! `StreamableHttpService` at `/mcp`, served by axum. Each session gets its
//! own [`ProxyServer`]; all of them share the one upstream and tool stack.
//!
//! POST bodies are checked by the same [`framer`](crate::framer) code as
//! stdio lines before rmcp sees them: malformed JSON-RPC gets a JSON-RPC
//! error (`-32700`, `-32600`, `-32602`; HTTP 400) rather than rmcp's
//! plain-text 415.
//!
//! rmcp validates the `Host` header against loopback names by default (a
//! DNS-rebinding guard); with `--listen-allow-remote` that check is turned
//! off, so put the proxy behind something that authenticates clients.
//! Sessions idle for 5 minutes are closed by rmcp.
//!
//! Server→client requests (sampling, roots, elicitation) go to the most
//! recently active client that has a session — with several clients that
//! may not be the one whose call caused them. A request rmcp serves without
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
use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::service::{RoleClient, RoleServer, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService, Transport};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use toolwarden_core::jsonrpc::{code, ErrorObject, Id};

use crate::framer::{classify_line, error_line, Frame};
use crate::routes::ProgressRoutes;
use crate::server::{ProxyCore, ProxyServer};
use crate::upstream::ProgressTallyTransport;

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
#[derive(Debug, Clone)]
pub(crate) struct InSession {
    progress: Arc<ProgressRoutes<RoleClient>>,
}

impl InSession {
    /// The session's progress routes.
    pub(crate) fn progress_routes(&self) -> &Arc<ProgressRoutes<RoleClient>> {
        &self.progress
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
    /// requests under the same token at once.
    fn new(inner: T) -> Self {
        let progress = Arc::<ProgressRoutes<RoleClient>>::default();
        SessionTransport {
            inner: ProgressTallyTransport::new(inner, Arc::clone(&progress)),
            mark: InSession { progress },
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
}

impl<M: SessionManager> SessionManager for ProxySessions<M> {
    type Error = M::Error;
    type Transport = SessionTransport<M::Transport>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        Ok((id, SessionTransport::new(transport)))
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
        Ok(match self.inner.restore_session(id).await? {
            RestoreOutcome::Restored(transport) => {
                RestoreOutcome::Restored(SessionTransport::new(transport))
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

/// Answers malformed JSON-RPC in a POST body the way the stdio side does
/// (`-32700`, `-32600`, `-32602` with the id when readable, HTTP 400; `413`
/// past the size bound) instead of rmcp's plain-text `415`; passes every
/// valid message on to rmcp. Other requests (GET, DELETE, other content
/// types) go to rmcp untouched.
async fn check_jsonrpc(
    State(max_body_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST || !is_json(request.headers()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, max_body_bytes).await else {
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
        );
    };
    match classify_line(&bytes) {
        Frame::Message(_) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Frame::Reply(line) => jsonrpc_error(StatusCode::BAD_REQUEST, line),
        Frame::Ignore("blank line") => jsonrpc_error(
            StatusCode::BAD_REQUEST,
            error_line(
                &Id::Null,
                ErrorObject::new(code::PARSE_ERROR, "Parse error: empty body"),
            ),
        ),
        // A malformed notification or response: JSON-RPC answers nothing.
        Frame::Ignore(_) => StatusCode::ACCEPTED.into_response(),
    }
}

/// `listener`, with `TCP_NODELAY` set on every connection it accepts.
///
/// Answers go out as several small writes (an SSE event's head, its data,
/// the chunk's end); with Nagle's algorithm on, the second small write of a
/// kept-alive connection waits for the client's delayed ACK, 40 ms on
/// Linux, on every call. Every socket the project accepts is set this way.
pub fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    })
}

/// Serves MCP over Streamable HTTP at `/mcp` on `listener` until `shutdown`
/// is cancelled.
pub async fn serve_http(
    core: Arc<ProxyCore>,
    listener: TcpListener,
    max_body_bytes: usize,
    allow_remote: bool,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown.child_token())
        .with_max_request_body_bytes(max_body_bytes);
    if allow_remote {
        config = config.disable_allowed_hosts();
    }
    let sessions = ProxySessions {
        inner: LocalSessionManager::default(),
    };
    let service = StreamableHttpService::new(
        move || Ok(ProxyServer::new(Arc::clone(&core))),
        Arc::new(sessions),
        config,
    );
    let router = axum::Router::new().nest_service("/mcp", service).layer(
        axum::middleware::from_fn_with_state(max_body_bytes, check_jsonrpc),
    );
    axum::serve(no_delay(listener), router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
