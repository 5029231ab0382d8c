//! Which client a request of the server's is for: the requests the proxy
//! forwards upstream, recorded while in flight ([`CauseGuard`]), and the
//! search for the client ([`Downstreams::target_of`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{ErrorCode, ErrorData, RequestId};
use rmcp::service::{Peer, RoleClient, RoleServer};

use super::{AwaitedPlace, Downstream, DownstreamId, Downstreams, MAX_AWAITED_PER_CLIENT};
use crate::progress::{lock, ProgressRoutes, UNKNOWN_TOKEN_POLL};

/// How long a server's request tied to an upstream request id nobody has
/// recorded yet waits for it (the id is known only once rmcp queued the
/// request, and the server can answer that fast).
const UNKNOWN_ID_WAIT: Duration = Duration::from_millis(200);

/// Who sent a request the proxy forwards upstream: one downstream session
/// (any `ProxyServer`, with a session or not) and, when it can be sent the
/// server's requests, its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The session, unique in the proxy's life.
    pub session: u64,
    /// Its client's id in [`Downstreams`], if registered (see
    /// [`Downstreams::register`]): a client without a session over HTTP is not.
    pub client: Option<DownstreamId>,
}

/// One forwarded request: who sent it, under which id (the client's).
#[derive(Debug, Clone)]
pub(super) struct Forwarded {
    /// Tells apart the requests recorded under one upstream id (see
    /// [`Causes::by_upstream_id`]).
    serial: u64,
    pub(super) caller: Caller,
    pub(super) request: RequestId,
}

/// The requests the proxy forwards to one upstream connection, for finding
/// which client a request of that server's is for (see
/// [`Downstreams::target_of`]); each view of [`Downstreams`] has its own
/// (see [`Downstreams::for_upstream`]).
#[derive(Default)]
pub(super) struct Causes {
    /// The upstream request id of each attempt in flight → the client's
    /// request it forwards. rmcp numbers request ids per connection, so after
    /// a reconnection an id can be in use twice for a moment: the last one
    /// recorded is the current connection's.
    pub(super) by_upstream_id: HashMap<RequestId, Vec<Forwarded>>,
    /// Per session, its requests in flight upstream that can make the server
    /// ask something (all but `ping`): their serials and the client's ids.
    pub(super) in_flight: HashMap<u64, (Caller, Vec<(u64, RequestId)>)>,
    next_serial: u64,
}

/// Where a request of the server's goes ([`Downstreams::target_of`]).
#[derive(Debug)]
pub struct Target {
    /// The client.
    pub peer: Peer<RoleServer>,
    /// Its progress routes: the request forwarded to it is routed there, as
    /// that is where its transport counts the progress it sends.
    pub progress: Arc<ProgressRoutes<RoleClient>>,
    /// The client's request the server's is for, when known: over
    /// Streamable HTTP the server's request rides that request's response
    /// stream (SEP-2260), as a client of 2026-07-28 expects.
    pub request: Option<RequestId>,
    /// The server's requests awaiting the client's answer.
    awaited: Arc<AtomicUsize>,
}

impl Target {
    /// A place among the server's requests awaiting this client's answer,
    /// while fewer than [`MAX_AWAITED_PER_CLIENT`] do; `None` past it.
    #[must_use]
    pub fn await_place(&self) -> Option<AwaitedPlace> {
        self.awaited
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_AWAITED_PER_CLIENT).then_some(n + 1)
            })
            .ok()
            .map(|_| AwaitedPlace(Arc::clone(&self.awaited)))
    }
}

/// The error a server's request gets when no client session can be found
/// for it: it is never sent to a client it may not be for.
fn no_session(why: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode(-32603),
        format!("no client session for this request: {why}"),
        None,
    )
}

impl Downstreams {
    /// Records in this view that `caller`'s request `request` is being
    /// forwarded to its upstream, until the returned guard is dropped;
    /// `asks` says whether the server may ask something while handling it
    /// (all requests but `ping`). Each attempt's upstream id is recorded
    /// with [`CauseGuard::recorder`].
    #[must_use]
    pub fn forwarding(&self, caller: Caller, request: RequestId, asks: bool) -> CauseGuard {
        let mut causes = lock(&self.causes);
        causes.next_serial += 1;
        let serial = causes.next_serial;
        if asks {
            causes
                .in_flight
                .entry(caller.session)
                .or_insert_with(|| (caller, Vec::new()))
                .1
                .push((serial, request.clone()));
        }
        CauseGuard {
            causes: Arc::clone(&self.causes),
            forwarded: Forwarded {
                serial,
                caller,
                request,
            },
            asks,
            upstream_ids: Arc::new(Mutex::new(Some(Vec::new()))),
        }
    }

    /// The client a request of the server's goes to: the one whose request
    /// the server was handling when it made it, or an error for the server
    /// when that cannot be told (never a guess). Only the requests recorded
    /// in this view count (those forwarded to this view's upstream: see
    /// [`for_upstream`](Self::for_upstream)); any connected client can be
    /// found:
    ///
    /// - `origin`, the upstream request the transport says it came with
    ///   (over Streamable HTTP, the response stream it arrived on): the
    ///   client whose request that is, waiting up to 200 ms for its id to be
    ///   recorded; none, if it is none of theirs (the proxy's own, or done);
    /// - else (stdio, or a server that sent it on the standalone stream):
    ///   the one session with requests in flight upstream (pings aside), if
    ///   only one has, and its one request if it has only one (so that the
    ///   server's request rides that request's response stream over HTTP);
    ///   with none in flight, the one connected client, if there is only
    ///   one.
    ///
    /// The session found must be a connected client that can be sent
    /// requests (not one without a session over HTTP).
    pub async fn target_of(&self, origin: Option<&RequestId>) -> Result<Target, ErrorData> {
        let deadline = tokio::time::Instant::now() + UNKNOWN_ID_WAIT;
        loop {
            match self.find_target(origin) {
                Err(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(UNKNOWN_TOKEN_POLL).await;
                }
                Err(None) => {
                    return Err(no_session(
                        "it came with a request that is no client's (the proxy's own, or one that ended)",
                    ))
                }
                Err(Some(error)) => return Err(error),
                Ok(target) => return Ok(target),
            }
        }
    }

    /// [`target_of`](Self::target_of) once: `Err(None)` when `origin` is not
    /// (yet) recorded.
    fn find_target(&self, origin: Option<&RequestId>) -> Result<Target, Option<ErrorData>> {
        let registry = lock(&self.registry);
        let open: Vec<&Downstream> = registry
            .clients
            .iter()
            .filter(|c| !c.peer.is_transport_closed())
            .collect();
        if open.is_empty() {
            return Err(Some(ErrorData::new(
                ErrorCode(-32000),
                "no client is connected to the toolwarden proxy",
                None,
            )));
        }
        // Lock order: the registry, then this view's causes.
        let causes = lock(&self.causes);
        let (caller, request) = match origin {
            Some(id) => {
                let forwarded = causes
                    .by_upstream_id
                    .get(id)
                    .and_then(|all| all.last())
                    .ok_or(None)?;
                (forwarded.caller, Some(forwarded.request.clone()))
            }
            None => {
                let mut sessions = causes.in_flight.values().filter(|(_, r)| !r.is_empty());
                match (sessions.next(), sessions.next()) {
                    // Its one request in flight, if it has one: the
                    // server's request rides that call's response stream
                    // (a client need not open a standalone stream, and one
                    // without any would never see it); with several,
                    // nothing tells which, and it goes standalone.
                    (Some((caller, requests)), None) => (
                        *caller,
                        match requests.as_slice() {
                            [(_, only)] => Some(only.clone()),
                            _ => None,
                        },
                    ),
                    (Some(_), Some(_)) => {
                        return Err(Some(no_session(
                            "nothing ties it to a call, and calls of several sessions are in flight",
                        )))
                    }
                    (None, _) => match open.as_slice() {
                        [only] => {
                            return Ok(Target {
                                peer: only.peer.clone(),
                                progress: Arc::clone(&only.progress),
                                request: None,
                                awaited: Arc::clone(&only.awaited),
                            })
                        }
                        _ => {
                            return Err(Some(no_session(
                                "nothing ties it to a call, no call is in flight, and several clients are connected",
                            )))
                        }
                    },
                }
            }
        };
        let client = caller
            .client
            .and_then(|id| open.iter().find(|c| c.id == id))
            .ok_or_else(|| {
                Some(no_session(
                    "the client whose call it is for cannot be sent requests (no session, or gone)",
                ))
            })?;
        Ok(Target {
            peer: client.peer.clone(),
            progress: Arc::clone(&client.progress),
            request,
            awaited: Arc::clone(&client.awaited),
        })
    }

    /// How many upstream request ids and sessions with requests in flight
    /// are recorded in this view (both drop to 0 once every request ended).
    #[must_use]
    pub fn causes_tracked(&self) -> (usize, usize) {
        let causes = lock(&self.causes);
        (causes.by_upstream_id.len(), causes.in_flight.len())
    }
}

/// One request being forwarded upstream, recorded in the view of
/// [`Downstreams`] it was made by for finding whose a request of the
/// server's is; forgotten when dropped.
pub struct CauseGuard {
    /// The causes of the view it was recorded in.
    causes: Arc<Mutex<Causes>>,
    forwarded: Forwarded,
    asks: bool,
    /// The upstream ids recorded; `None` once the guard is dropped, so an
    /// attempt sent after that (it cannot be, normally) is not recorded.
    upstream_ids: Arc<Mutex<Option<Vec<RequestId>>>>,
}

impl fmt::Debug for CauseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CauseGuard")
            .field("caller", &self.forwarded.caller)
            .field("request", &self.forwarded.request)
            .finish_non_exhaustive()
    }
}

impl CauseGuard {
    /// A hook recording the upstream id of each attempt, for
    /// `toolwarden_rmcp::OnRequestSent`.
    pub fn recorder(&self) -> impl Fn(&RequestId) + Send + Sync + 'static {
        let causes = Arc::clone(&self.causes);
        let upstream_ids = Arc::clone(&self.upstream_ids);
        let forwarded = self.forwarded.clone();
        move |id| {
            // Both locks at once (the causes first, as in the guard's drop),
            // so the guard's drop sees every id recorded.
            let mut causes = lock(&causes);
            let mut upstream_ids = lock(&upstream_ids);
            let Some(upstream_ids) = upstream_ids.as_mut() else {
                return;
            };
            upstream_ids.push(id.clone());
            causes
                .by_upstream_id
                .entry(id.clone())
                .or_default()
                .push(forwarded.clone());
        }
    }
}

impl Drop for CauseGuard {
    fn drop(&mut self) {
        let mut causes = lock(&self.causes);
        let upstream_ids = lock(&self.upstream_ids).take().unwrap_or_default();
        for id in upstream_ids {
            if let Some(all) = causes.by_upstream_id.get_mut(&id) {
                all.retain(|f| f.serial != self.forwarded.serial);
                if all.is_empty() {
                    causes.by_upstream_id.remove(&id);
                }
            }
        }
        if self.asks {
            let session = self.forwarded.caller.session;
            if let Some((_, requests)) = causes.in_flight.get_mut(&session) {
                requests.retain(|(serial, _)| *serial != self.forwarded.serial);
                if requests.is_empty() {
                    causes.in_flight.remove(&session);
                }
            }
        }
    }
}
