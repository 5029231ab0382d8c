//! What the `/mcp` route checks before rmcp sees a request ([`guard`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::SessionManager as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use toolwarden_core::jsonrpc::{code, ErrorObject, Id};

use super::evict::{self, Candidate, LastActive, MinIdle};
use super::session::{
    headers_expect_priming, version_expects_priming, without_priming, ProxySessions,
};
use super::{ConnectionKill, HttpOptions};
use crate::access::{AccessPolicy, Refusal};
use crate::downstream::framer::{check_message, error_line, trim_line, Checked, Unfit};

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
/// What the `/mcp` route checks before rmcp sees a request: see
/// [`guard`].
#[derive(Clone)]
pub(super) struct Guard {
    access: AccessPolicy,
    sessions: Arc<ProxySessions<LocalSessionManager>>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    max_sessions: usize,
    max_requests_per_session: usize,
    evict_idle_after: Duration,
    /// What the sessions' activity is timed from.
    epoch: Instant,
    /// Cancelled when the listener starts its drain: the standalone GET
    /// streams end then (calls in flight are answered first).
    draining: CancellationToken,
    /// Each open session's requests in flight. Entries are made only for
    /// sessions rmcp knows, and pruned of closed ones whenever one is
    /// added, so the map holds at most about `max_sessions` entries.
    in_flight: Arc<Mutex<HashMap<Arc<str>, Arc<SessionInFlight>>>>,
}

/// A session's requests in flight: at most `max_requests_per_session`
/// permits, and the ids they were sent under (each id at most once); and
/// its standalone GET stream, at most [`MAX_GET_STREAMS`]. With who
/// opened it and when it was last active, to choose the session a new one
/// takes the place of at `max_sessions` (see [`evict`]).
struct SessionInFlight {
    permits: Arc<Semaphore>,
    ids: Mutex<HashSet<Id>>,
    streams: Arc<Semaphore>,
    /// The address of the connection the session was first seen on (its
    /// `initialize`'s).
    client: Option<IpAddr>,
    /// The session's last request, or the end of its last request in
    /// flight.
    last_active: LastActive,
}

/// The most standalone GET streams (the one the server's messages go to)
/// one session may hold open. rmcp serves a GET that comes while that
/// stream is alive as a "shadow" sent nothing but keep-alives, and never
/// promotes it when the first ends (so a replacement opened early stayed
/// deaf), keeping up to 32 of them: one client with a few sessions held
/// every connection the proxy serves (`http.max_connections`) and locked
/// everyone else out. A second is refused `409`, as the TypeScript SDK
/// answers, until the first has ended. A GET resuming a call's stream
/// (`Last-Event-ID` naming a request's stream) is not one: it takes that
/// call's stream over.
pub(super) const MAX_GET_STREAMS: usize = 1;

/// One request in flight in a session: its permit, and its id, given back
/// when its answer's stream ends (or the client drops it).
struct InFlightRequest {
    _permit: OwnedSemaphorePermit,
    session: Arc<SessionInFlight>,
    id: Id,
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        lock(&self.session.ids).remove(&self.id);
        self.session.last_active.touch();
    }
}

/// A request's place in flight, in its HTTP parts' extensions: rmcp puts
/// those in the request's context, so the place is held until the handler
/// is done with the request, and until its answer's stream ends. Either
/// alone would not do: a client that drops its connection ends the stream
/// while its call still runs upstream (and could run any number at once),
/// and a handler may be done before its answer is sent.
#[derive(Clone)]
struct HeldByHandler {
    _place: Arc<InFlightRequest>,
}

/// Why a request of a session is not let in.
enum NotAdmitted {
    /// `max_requests_per_session` are in flight.
    Full,
    /// A request with the same id is in flight: rmcp would route the first
    /// one's answer to nobody, and it would hold its permit until the
    /// session expires.
    SameId,
}

impl SessionInFlight {
    fn admit(self: &Arc<Self>, id: &Id) -> Result<InFlightRequest, NotAdmitted> {
        let mut ids = lock(&self.ids);
        if ids.contains(id) {
            return Err(NotAdmitted::SameId);
        }
        let permit = Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| NotAdmitted::Full)?;
        ids.insert(id.clone());
        Ok(InFlightRequest {
            _permit: permit,
            session: Arc::clone(self),
            id: id.clone(),
        })
    }
}

impl Guard {
    /// The checks `options` asks for, of sessions managed by `sessions`.
    pub(super) fn new(
        options: &HttpOptions,
        sessions: Arc<ProxySessions<LocalSessionManager>>,
        draining: CancellationToken,
    ) -> Self {
        Guard {
            access: options.access.clone(),
            sessions,
            max_body_bytes: options.max_body_bytes,
            body_read_timeout: options.body_read_timeout,
            max_sessions: options.max_sessions,
            max_requests_per_session: options.max_requests_per_session,
            evict_idle_after: options.evict_idle_after,
            epoch: Instant::now(),
            draining,
            in_flight: Arc::default(),
        }
    }

    async fn open_sessions(&self) -> usize {
        self.sessions.inner.sessions.read().await.len()
    }

    /// The requests in flight of session `id`, if rmcp knows it, marked
    /// active now; `client` is who asks (the session's client if this is
    /// the first the guard sees of it).
    async fn in_flight_of(&self, id: &str, client: Option<IpAddr>) -> Option<Arc<SessionInFlight>> {
        let known = lock(&self.in_flight).get(id).map(Arc::clone);
        let session = match known {
            Some(session) => session,
            None => {
                let open = self.sessions.inner.sessions.read().await;
                if !open.contains_key(id) {
                    return None;
                }
                let mut map = lock(&self.in_flight);
                map.retain(|known, _| open.contains_key(known.as_ref()));
                let session = map.entry(Arc::from(id)).or_insert_with(|| {
                    Arc::new(SessionInFlight {
                        permits: Arc::new(Semaphore::new(self.max_requests_per_session)),
                        ids: Mutex::default(),
                        streams: Arc::new(Semaphore::new(MAX_GET_STREAMS)),
                        client,
                        last_active: LastActive::new(self.epoch),
                    })
                });
                Arc::clone(session)
            }
        };
        session.last_active.touch();
        Some(session)
    }

    /// At `max_sessions`: closes the session a new one of `client` takes
    /// the place of (see [`evict`]), if there is one. Whether one was.
    async fn make_room(&self, client: Option<IpAddr>) -> bool {
        let open = self.sessions.inner.sessions.read().await;
        let chosen = {
            let mut map = lock(&self.in_flight);
            map.retain(|known, _| open.contains_key(known.as_ref()));
            let candidates: Vec<_> = map
                .iter()
                .map(|(key, session)| Candidate {
                    key: Arc::clone(key),
                    client: session.client,
                    idle: session.last_active.idle(),
                    busy: session.permits.available_permits() < self.max_requests_per_session,
                })
                .collect();
            let chosen = evict::choose(
                &candidates,
                client,
                MinIdle {
                    fair_share: evict::SESSION_FAIR_SHARE_IDLE.min(self.evict_idle_after),
                    any: self.evict_idle_after,
                },
            );
            if let Some((key, _)) = &chosen {
                // Chosen once: a concurrent `initialize` chooses another.
                map.remove(key);
            }
            chosen
        };
        drop(open);
        let Some((session, reason)) = chosen else {
            return false;
        };
        metrics::counter!("toolwarden_proxy_http_sessions_evicted_total", "reason" => reason.label())
            .increment(1);
        tracing::info!(
            %session,
            reason = reason.label(),
            "closing a session to make room for a new one (http.max_sessions are open)"
        );
        let sessions = Arc::clone(&self.sessions);
        // rmcp takes it off its map at once, then waits for its worker.
        tokio::spawn(async move {
            let closed = tokio::time::timeout(
                EVICTED_CLOSE_TIMEOUT,
                sessions.inner.close_session(&session),
            )
            .await;
            if !matches!(closed, Ok(Ok(()))) {
                tracing::debug!(%session, "rmcp did not close the evicted session cleanly");
            }
        });
        true
    }
}

impl Guard {
    /// `response`, or rmcp's `404` for a session it no longer has when
    /// `response` is a `500` of a request of session `named`: a request
    /// that found the session just before it was closed (given way to a
    /// new one, ended by its client) was answered `500 Session service
    /// terminated`, which clients read as a failure, where `404` tells
    /// them to start a new session.
    async fn gone_if_closed(&self, named: Option<Arc<str>>, response: Response) -> Response {
        let Some(session) = named else {
            return response;
        };
        if response.status() != StatusCode::INTERNAL_SERVER_ERROR
            || self
                .sessions
                .inner
                .sessions
                .read()
                .await
                .contains_key(&session)
        {
            return response;
        }
        (StatusCode::NOT_FOUND, "Not Found: Session not found").into_response()
    }
}

/// How long closing a session chosen to make room may take.
const EVICTED_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `Mcp-Session-Id` a request names, if readable.
fn session_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(SESSION_ID_HEADER).and_then(|v| v.to_str().ok())
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
/// 4. A GET of a session with [`MAX_GET_STREAMS`] open gets `409` (its
///    place is held until the stream ends).
///
/// Every valid message is then passed on to rmcp, and other requests (GET,
/// DELETE, other content types) too once step 1 let them through.
pub(super) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
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
    let client = request
        .extensions()
        .get::<ConnectionKill>()
        .map(|connection| connection.peer);
    if let (Some(session), Some(connection)) = (
        session_of(request.headers()),
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
    if request.method() == Method::GET {
        let session = session_of(request.headers());
        // rmcp's event ids are `index/request` on a call's stream, `index`
        // on the standalone one.
        let resumes_a_call = request
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|id| id.contains('/'));
        let mut place = None;
        if let Some(in_flight) = match session {
            Some(id) if !resumes_a_call => guard.in_flight_of(id, client).await,
            _ => None,
        } {
            match Arc::clone(&in_flight.streams).try_acquire_owned() {
                Ok(permit) => place = Some(permit),
                Err(_) => {
                    return jsonrpc_refusal(
                        StatusCode::CONFLICT,
                        "get_streams",
                        &Id::Null,
                        ErrorObject::new(
                            code::INVALID_REQUEST,
                            "Conflict: this session's GET stream is open already; a new one \
                             is served once it has ended",
                        ),
                    )
                }
            }
        }
        let primes = headers_expect_priming(request.headers());
        let named: Option<Arc<str>> = session.map(Arc::from);
        let response = guard.gone_if_closed(named, next.run(request).await).await;
        let response = if primes {
            response
        } else {
            without_priming(response)
        };
        return held_until_its_end(ended_by(response, &guard.draining), place);
    }
    if request.method() == Method::DELETE {
        // rmcp answers a session's end `202 Accepted`; the Python SDK
        // takes only 200 or 204 as done, and logged "Session termination
        // failed: 202" on every clean exit (the TypeScript SDK's server
        // answers 200). The session is closed either way.
        let mut response = next.run(request).await;
        if response.status() == StatusCode::ACCEPTED {
            *response.status_mut() = StatusCode::OK;
        }
        return response;
    }
    if request.method() != Method::POST || !is_json(request.headers()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
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
    let checked = match check_message(&bytes) {
        Ok(checked) => checked,
        Err(Unfit::Reply(line)) => return jsonrpc_error(StatusCode::BAD_REQUEST, line),
        Err(Unfit::Ignore("blank line")) => {
            return jsonrpc_error(
                StatusCode::BAD_REQUEST,
                error_line(
                    &Id::Null,
                    ErrorObject::new(code::PARSE_ERROR, "Parse error: empty body"),
                ),
            )
        }
        // A malformed notification or response: JSON-RPC answers nothing.
        Err(Unfit::Ignore(_)) => return StatusCode::ACCEPTED.into_response(),
    };
    // As the framer read it: rmcp's reader refuses a body after a
    // byte-order mark with a bare 415.
    let bytes = bytes.slice_ref(trim_line(&bytes));
    let mut permit = None;
    let mut opens_session = false;
    if let (Checked::Other, Some(session)) = (&checked, session_of(&parts.headers)) {
        // A notification or an answer: the session is active.
        let _ = guard.in_flight_of(session, client).await;
    }
    if let Checked::Request { id, initialize } = &checked {
        let session = session_of(&parts.headers);
        opens_session = session.is_none() && *initialize;
        // Concurrent initializes may each see room: the overshoot is
        // bounded by the connections served at once.
        if opens_session
            && guard.open_sessions().await >= guard.max_sessions
            && !guard.make_room(client).await
        {
            return jsonrpc_refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "sessions",
                id,
                ErrorObject::new(
                    -32000,
                    format!(
                        "too many sessions: the proxy serves at most {} at once; retry later",
                        guard.max_sessions
                    ),
                ),
            );
        }
        let in_flight = match session {
            Some(id) => guard.in_flight_of(id, client).await,
            None => None,
        };
        if let Some(in_flight) = in_flight {
            match in_flight.admit(id) {
                Ok(p) => permit = Some(Arc::new(p)),
                Err(NotAdmitted::SameId) => {
                    return jsonrpc_refusal(
                        StatusCode::BAD_REQUEST,
                        "same_id",
                        id,
                        ErrorObject::new(
                            code::INVALID_REQUEST,
                            "Invalid Request: a request with this id is in flight in this \
                             session; use another id",
                        ),
                    )
                }
                Err(NotAdmitted::Full) => {
                    return jsonrpc_refusal(
                        StatusCode::TOO_MANY_REQUESTS,
                        "in_flight",
                        id,
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
    // rmcp starts its answer to `initialize` with a priming event, which
    // only clients of 2025-11-25 and later know.
    let primes = match checked {
        Checked::Request {
            initialize: true, ..
        } => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|m| {
                m["params"]["protocolVersion"]
                    .as_str()
                    .map(version_expects_priming)
            })
            .unwrap_or(false),
        _ => true,
    };
    if let Some(permit) = &permit {
        // rmcp hands the request's parts to the handler: the request stays
        // in flight while it runs, though its client went away.
        parts.extensions.insert(HeldByHandler {
            _place: Arc::clone(permit),
        });
    }
    let named: Option<Arc<str>> = session_of(&parts.headers).map(Arc::from);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let response = guard.gone_if_closed(named, response).await;
    if opens_session {
        // The session's client is the address that opened it.
        if let Some(session) = session_of(response.headers()) {
            let _ = guard.in_flight_of(session, client).await;
        }
    }
    let response = if primes {
        response
    } else {
        without_priming(response)
    };
    // The answer may be an SSE stream: the request is in flight until it
    // ends.
    held_until_its_end(response, permit)
}

/// `response`, its body ended when `draining` is cancelled: a standalone
/// GET stream, which never ends by itself, would hold the listener's drain
/// to its timeout. (A call's stream ends with its answer: it is left to
/// finish.)
fn ended_by(response: Response, draining: &CancellationToken) -> Response {
    let (parts, body) = response.into_parts();
    let body = body
        .into_data_stream()
        .take_until(draining.clone().cancelled_owned());
    Response::from_parts(parts, Body::from_stream(body))
}

/// `response`, holding `place` until its body (an SSE stream, maybe) ends
/// or is dropped.
fn held_until_its_end<P: Send + Sync + 'static>(response: Response, place: Option<P>) -> Response {
    match place {
        None => response,
        Some(place) => {
            let (parts, body) = response.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                let _held = &place;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(body))
        }
    }
}
