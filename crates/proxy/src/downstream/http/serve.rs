//! [`serve_bounded`]: a listener's connections, bounded in number, in how
//! long headers may take, and in how long shutdown waits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::evict::{self, Candidate, LastActive, MinIdle};
use super::guard::lock;

/// One HTTP connection's kill switch, put in the extensions of every
/// request read on it by [`serve_bounded`]: cancelling it drops the
/// connection at once. Cancelled too when the connection ends.
#[derive(Debug, Clone)]
pub struct ConnectionKill {
    pub(super) id: u64,
    pub(super) token: CancellationToken,
    /// The client the connection is counted for at `http.max_sessions` and
    /// `http.max_connections`: its address ([`client_of`]).
    pub(super) peer: IpAddr,
}

impl ConnectionKill {
    /// The connection's number, unique in the listener's life.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
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
    /// How long a connection must have been idle before a new one may take
    /// its place at `max_connections`, unless its client holds the most
    /// (the rules of sessions at `http.max_sessions`); the listener's is
    /// [`CONNECTION_IDLE_EVICT`](super::CONNECTION_IDLE_EVICT).
    pub evict_idle_after: Duration,
}

/// What one connection is doing, for the choice of the one a new
/// connection takes the place of at `max_connections`.
struct Activity {
    /// Requests read and not yet answered to the end of their body (a
    /// standalone GET stream is one for its whole life).
    busy: AtomicUsize,
    /// The start of its last request or the end of its last answer.
    last_active: LastActive,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Activity {
            busy: AtomicUsize::new(0),
            last_active: LastActive::new(epoch),
        }
    }
}

/// A request in progress on a connection: from its arrival to the end (or
/// the drop) of its answer's body.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        activity.last_active.touch();
        Busy(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_active.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// An answer's body, its connection busy until it ends or is dropped.
    /// Its size and end are the inner body's (a JSON answer keeps its
    /// `Content-Length`).
    struct BusyBody<B> {
        #[pin]
        inner: B,
        busy: Option<Busy>,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.busy.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One open connection, as [`Connections`] knows it.
struct Open {
    peer: IpAddr,
    activity: Arc<Activity>,
    kill: CancellationToken,
}

/// The listener's open connections, to choose the one a new connection
/// takes the place of at `max_connections`: a client holding every
/// connection (a pool of kept-alive ones, each used now and then) locked
/// every other client out until one closed.
#[derive(Default)]
struct Connections(Mutex<HashMap<u64, Open>>);

impl Connections {
    /// Closes the connection a new one from `peer` takes the place of, by
    /// the rules of sessions (see `evict`), each needing the connection
    /// idle (no request in progress) `min_idle`: one of the client holding
    /// the most, else one of a client holding at least as many as `peer`.
    /// Whether one was.
    fn make_room(&self, peer: IpAddr, min_idle: Duration) -> bool {
        let mut open = lock(&self.0);
        let candidates: Vec<_> = open
            .iter()
            .map(|(id, c)| Candidate {
                key: *id,
                client: Some(c.peer),
                idle: c.activity.last_active.idle(),
                busy: c.activity.busy.load(Ordering::Relaxed) > 0,
            })
            .collect();
        let min_idle = MinIdle {
            fair_share: min_idle,
            any: min_idle,
        };
        let Some((id, reason)) = evict::choose(&candidates, Some(peer), min_idle) else {
            return false;
        };
        if let Some(closed) = open.remove(&id) {
            closed.kill.cancel();
        }
        metrics::counter!("toolwarden_proxy_http_connections_evicted_total", "reason" => reason.label())
            .increment(1);
        tracing::debug!(
            reason = reason.label(),
            "closing an idle connection to make room for a new one (http.max_connections are open)"
        );
        true
    }
}

/// How often a connection accepted at the bound looks again for one that
/// has since sat idle long enough to give way, while it waits for a slot.
/// It looked once: silent connections (never a request) opened past the
/// bound held every slot until the header timeout closed them.
const MAKE_ROOM_AGAIN: Duration = Duration::from_millis(100);

/// Runs its closure when dropped: a connection's entry in [`Connections`]
/// is removed however its task ends.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
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
    let open = Arc::new(Connections::default());
    let epoch = Instant::now();
    let mut next_connection = 0u64;
    'accept: loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = accept(&listener) => match accepted {
                Ok(accepted) => accepted,
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
        // At the bound, an idle connection may give way; else the new one
        // waits for a slot (accepted: the next ones wait in the backlog).
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let mut made_room = false;
                loop {
                    // One place per newcomer: the closed one's slot is its.
                    made_room = made_room || open.make_room(peer, options.evict_idle_after);
                    tokio::select! {
                        slot = Arc::clone(&slots).acquire_owned() => break slot.map_err(std::io::Error::other)?,
                        () = tokio::time::sleep(MAKE_ROOM_AGAIN) => {}
                        () = shutdown.cancelled() => break 'accept,
                    }
                }
            }
        };
        next_connection += 1;
        let kill = ConnectionKill {
            id: next_connection,
            token: CancellationToken::new(),
            peer,
        };
        let activity = Arc::new(Activity::new(epoch));
        lock(&open.0).insert(
            next_connection,
            Open {
                peer,
                activity: Arc::clone(&activity),
                kill: kill.token.clone(),
            },
        );
        let service = TowerToHyperService::new(tower::service_fn({
            let kill = kill.clone();
            let router = router.clone();
            let activity = Arc::clone(&activity);
            move |request: axum::http::Request<hyper::body::Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(kill.clone());
                let busy = Busy::new(&activity);
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await?;
                    Ok::<_, Infallible>(response.map(|inner| {
                        Body::new(BusyBody {
                            inner,
                            busy: Some(busy),
                        })
                    }))
                }
            }
        }));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout);
        let closing = closing.child_token();
        let forget = {
            let open = Arc::clone(&open);
            let id = next_connection;
            OnDrop(Some(move || {
                lock(&open.0).remove(&id);
            }))
        };
        connections.spawn(async move {
            let _slot = slot;
            let _forget = forget;
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
                    // No request in progress (idle, or its head not all
                    // read): nothing to let finish. One whose head was half
                    // sent held the drain to its timeout.
                    if activity.busy.load(Ordering::Relaxed) == 0 {
                        return;
                    }
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

/// The next connection of `listener`, with `TCP_NODELAY` set.
///
/// Answers leave as several small writes (an SSE event's head, its data,
/// the chunk's end); with Nagle's algorithm on, the second one on a
/// kept-alive connection waited for the client's delayed ACK: 40 ms per
/// call on Linux (issue 16). A socket that refuses the option is served
/// anyway.
async fn accept(listener: &TcpListener) -> std::io::Result<(TcpStream, IpAddr)> {
    let (stream, peer) = listener.accept().await?;
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    Ok((stream, client_of(peer.ip())))
}

/// The client an address is counted for: an IPv4 address (an IPv4-mapped
/// IPv6 one read as IPv4); an IPv6 address's /64, which one host may hold
/// whole (with a new address per connection, each would be a client with
/// nothing, and take the place of the heaviest client's sessions and
/// connections one after the other).
fn client_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_one_its_address() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_of(v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            v6("2001:db8:1:2::")
        );
        assert_eq!(
            client_of(v6("2001:db8:1:2::1")),
            client_of(v6("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            client_of(v6("2001:db8:1:2::1")),
            client_of(v6("2001:db8:1:3::1"))
        );
        assert_eq!(client_of(v6("::ffff:192.0.2.7")), v6("192.0.2.7"));
        assert_eq!(client_of(v6("192.0.2.7")), v6("192.0.2.7"));
    }

    /// What the keep-alive clients of issue 16 need, checked on the socket
    /// itself rather than by timing calls: every connection the server
    /// accepts writes without Nagle's algorithm (a fresh socket has it on).
    #[tokio::test]
    async fn accepted_connections_write_without_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for _ in 0..2 {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            assert!(!client.nodelay().unwrap(), "a fresh socket has Nagle on");
            let (accepted, peer) = accept(&listener).await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap().ip());
            assert!(
                accepted.nodelay().unwrap(),
                "TCP_NODELAY on the accepted side"
            );
        }
    }
}
