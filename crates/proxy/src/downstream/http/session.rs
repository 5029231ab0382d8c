//! The session manager of the `/mcp` route ([`ProxySessions`], over rmcp's)
//! and each session's transport: the client's progress counted as it is
//! read, and each request marked [`InSession`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::stream::Peekable;
use futures::{Stream, StreamExt as _};
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::service::{RoleClient, RoleServer, RxJsonRpcMessage};
use rmcp::transport::common::http_header::HEADER_MCP_PROTOCOL_VERSION;
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};

use super::guard::lock;
use super::ConnectionKill;
use crate::downstream::Disconnect;
use crate::progress::{ProgressRoutes, ProgressTally};
use crate::transport::{HookedTransport, OnReceive};

/// Marks a request read by an HTTP session's transport ([`SessionTransport`]):
/// its client has a session, so it can be sent requests and answer them.
/// It carries the session's progress routes, which the transport counts the
/// client's progress into, so the [`ProxyServer`](crate::downstream::ProxyServer) registers the client with
/// them (see `touch` in [`crate::downstream::server`]).
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

/// Marks each request with the session's [`InSession`].
impl OnReceive<RoleServer> for InSession {
    fn on_receive(&self, message: &mut RxJsonRpcMessage<RoleServer>) {
        if let JsonRpcMessage::Request(request) = message {
            request.request.extensions_mut().insert(self.clone());
        }
    }
}

/// A session's transport: the client's progress counted as it is read
/// ([`ProgressTally`]) into routes of the session's own, and each request
/// marked [`InSession`] (with those routes) on its way to the
/// [`ProxyServer`](crate::downstream::ProxyServer). Everything else passes through untouched.
pub(super) type SessionTransport<T> = HookedTransport<T, (ProgressTally<RoleClient>, InSession)>;

/// `inner`, with progress routes of its own: rmcp numbers the progress
/// tokens of each session's peer separately, so two sessions can be sent
/// requests under the same token at once. `disconnect` ends the session.
fn session_transport<T>(inner: T, disconnect: Disconnect) -> SessionTransport<T> {
    let progress = Arc::<ProgressRoutes<RoleClient>>::default();
    let tally = ProgressTally::new(Arc::clone(&progress));
    let mark = InSession {
        progress,
        disconnect,
    };
    HookedTransport::new(inner, (tally, mark))
}

/// rmcp's session manager `M`, each session's transport wrapped in a
/// [`SessionTransport`] counting the client's progress into the session's
/// own routes and marking its requests; everything else is `M`'s.
pub(super) struct ProxySessions<M> {
    pub(super) inner: M,
    /// The connections each session's requests came on.
    pub(super) connections: Arc<SessionConnections>,
    /// Itself, for the sessions' [`Disconnect`]s.
    me: Weak<ProxySessions<M>>,
}

impl<M> ProxySessions<M> {
    /// Over `inner`; `me` is the `Arc` it is made in.
    pub(super) fn new(inner: M, me: Weak<ProxySessions<M>>) -> Self {
        ProxySessions {
            inner,
            connections: Arc::default(),
            me,
        }
    }
}

impl<M: SessionManager> ProxySessions<M> {
    /// What ends session `id` when its client stops reading: its
    /// connections are dropped (a client that does not read holds rmcp's
    /// session worker in a write to its stream; dropping the connection
    /// ends the stream and frees it), then rmcp closes the session, so its
    /// [`ProxyServer`](crate::downstream::ProxyServer) goes, and with it a session's own upstream. Once.
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
        Ok((id, session_transport(transport, disconnect)))
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
        let primes = client_expects_priming(&message);
        let stream = self.inner.create_stream(id, message);
        async move { Ok(first_event_with_headers(stream.await?, primes, FIRST_EVENT_WAIT).await) }
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
        // rmcp replays from the event the client names, which the client
        // has: it would get that one twice (a progress value twice, which
        // must increase). The replay starts after it.
        let seen = last_event_id.clone();
        let stream = self.inner.resume(id, last_event_id);
        async move {
            Ok(stream.await?.filter(move |event| {
                std::future::ready(event.event_id.as_deref() != Some(seen.as_str()))
            }))
        }
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        let disconnect = self.disconnect(&id);
        Ok(match self.inner.restore_session(id).await? {
            RestoreOutcome::Restored(transport) => {
                RestoreOutcome::Restored(session_transport(transport, disconnect))
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

/// How long the answer to a request waits for its first event before
/// its headers go out alone: see [`first_event_with_headers`].
const FIRST_EVENT_WAIT: Duration = Duration::from_millis(100);

/// The first protocol version whose clients expect an SSE priming event
/// (an event ID with empty data, SEP-1699) at the start of each stream.
const PRIMING_SINCE: &str = "2025-11-25";

/// Whether the client of `message` negotiated a protocol version that
/// knows priming events: its `MCP-Protocol-Version` header (which rmcp
/// hands over in the request's extensions) is 2025-11-25 or later. A
/// request without the header is from a 2025-03-26 client, as the
/// specification says to assume. Dates in the same form compare as text.
fn client_expects_priming(message: &ClientJsonRpcMessage) -> bool {
    let JsonRpcMessage::Request(request) = message else {
        return false;
    };
    request
        .request
        .extensions()
        .get::<axum::http::request::Parts>()
        .is_some_and(|parts| headers_expect_priming(&parts.headers))
}

/// Whether a request with `headers` is from a client that knows priming
/// events (see [`client_expects_priming`]).
pub(super) fn headers_expect_priming(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(HEADER_MCP_PROTOCOL_VERSION)
        .and_then(|version| version.to_str().ok())
        .is_some_and(version_expects_priming)
}

/// Whether protocol `version` knows priming events.
pub(super) fn version_expects_priming(version: &str) -> bool {
    version >= PRIMING_SINCE
}

/// `response` without the priming event rmcp puts at the start of an SSE
/// body it builds itself (the answer to `initialize`, a `GET` stream and
/// its resumption), for a client older than 2025-11-25 (the answers to
/// other requests go through [`first_event_with_headers`]). rmcp writes
/// each event as one frame of the body; the first frame loses its first
/// event when that is a priming event (an ID and a retry hint, no data).
pub(super) fn without_priming(response: axum::response::Response) -> axum::response::Response {
    let is_sse = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().scan(true, |first, chunk| {
        let chunk = match chunk {
            Ok(bytes) if std::mem::take(first) => Ok(strip_priming_event(bytes)),
            other => other,
        };
        std::future::ready(Some(chunk))
    });
    axum::response::Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// `frame` without its first SSE event if that is a priming event: fields
/// `id` and `retry` only, and `data` lines all empty.
fn strip_priming_event(frame: axum::body::Bytes) -> axum::body::Bytes {
    let Some(end) = frame.windows(2).position(|w| w == b"\n\n") else {
        return frame;
    };
    let Ok(event) = std::str::from_utf8(&frame[..end]) else {
        return frame;
    };
    let mut has_id = false;
    for line in event.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => has_id = true,
            "retry" => {}
            "data" if value.is_empty() => {}
            _ => return frame,
        }
    }
    if has_id {
        frame.slice(end + 2..)
    } else {
        frame
    }
}

/// The SSE stream that answers one request, arranged so that a quick
/// answer costs the client one write, not two.
///
/// rmcp starts every request's stream with a priming event, which hyper
/// sends at once with the response's headers; the answer follows in a
/// second write. Each write on a kept-alive connection wakes the client
/// and costs both sides system calls, and this one sits on the path
/// before the upstream is even called.
///
/// - A client older than 2025-11-25 (`primes` false) does not know
///   priming events: its stream goes without, as the TypeScript SDK's
///   server does for those clients. Its later events keep their IDs, so
///   it can still resume from them.
/// - Its answer's headers then wait for the first event, at most `wait`:
///   a call answered within it goes out in one write (headers, event and
///   end of stream); a slower one gets its headers at `wait`, and its
///   events as they come, as before.
/// - A 2025-11-25 client gets its priming event at once, as the
///   specification says a server should send it.
async fn first_event_with_headers<S>(
    stream: S,
    primes: bool,
    wait: Duration,
) -> Pin<Box<Peekable<S>>>
where
    S: Stream<Item = ServerSseMessage>,
{
    let mut stream = Box::pin(stream.peekable());
    if primes {
        return stream;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let first = tokio::time::timeout_at(deadline, stream.as_mut().peek()).await;
        match first {
            Ok(Some(event)) if is_priming(event) => {
                // Ready, as peeked: taking it never waits.
                let _ = stream.next().await;
            }
            // The first event (or the end of the stream) is ready, or
            // `wait` is over: the headers go now.
            Ok(_) | Err(_) => return stream,
        }
    }
}

/// Whether `event` is a priming event: an event ID and a retry hint, no
/// message.
fn is_priming(event: &ServerSseMessage) -> bool {
    event.message.is_none() && event.event_id.is_some()
}

/// The connections each session's requests came on (its POSTs and its GET
/// stream), so that a session whose client stops reading can have them
/// dropped. Entries whose connections all ended are pruned whenever one is
/// recorded, so the map holds at most one entry per open connection.
#[derive(Default)]
pub(super) struct SessionConnections {
    by_session: Mutex<HashMap<Arc<str>, Vec<ConnectionKill>>>,
}

impl SessionConnections {
    /// Records that a request of session `id` came on `connection`.
    /// Whether a request of session `id` was recorded on `connection`
    /// already (every request after the first on a kept-alive connection).
    pub(super) fn recorded(&self, id: &str, connection: &ConnectionKill) -> bool {
        lock(&self.by_session)
            .get(id)
            .is_some_and(|known| known.iter().any(|c| c.id == connection.id))
    }

    pub(super) fn record(&self, id: &str, connection: &ConnectionKill) {
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

#[cfg(test)]
mod tests {
    use axum::body::Bytes;

    use super::strip_priming_event;

    #[test]
    fn only_a_leading_priming_event_is_taken_out_of_a_frame() {
        let strip = |frame: &'static str| strip_priming_event(Bytes::from_static(frame.as_bytes()));
        assert_eq!(strip("data: \nid: 0\nretry: 3000\n\n"), "");
        assert_eq!(
            strip("data:\nid: 0\nretry: 3000\n\ndata: {\"id\":1}\nid: 1/0\n\n"),
            "data: {\"id\":1}\nid: 1/0\n\n"
        );
        // An event with data, a comment, or no id is not a priming one.
        for frame in [
            "data: {\"id\":1}\nid: 1/0\n\n",
            ": ping\n\n",
            "data: \nretry: 3000\n\n",
            "event: message\ndata: \nid: 0\n\n",
            "data: \nid: 0",
        ] {
            assert_eq!(strip(frame), frame);
        }
    }
}
