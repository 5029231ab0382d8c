//! [`serve_bounded`]: a listener's connections, bounded in number, in how
//! long headers may take, and in how long shutdown waits.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// One HTTP connection's kill switch, put in the extensions of every
/// request read on it by [`serve_bounded`]: cancelling it drops the
/// connection at once. Cancelled too when the connection ends.
#[derive(Debug, Clone)]
pub struct ConnectionKill {
    pub(super) id: u64,
    pub(super) token: CancellationToken,
    /// The address the connection came from: the client a session is
    /// counted for when `http.max_sessions` are open.
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
        next_connection += 1;
        let kill = ConnectionKill {
            id: next_connection,
            token: CancellationToken::new(),
            peer,
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
    Ok((stream, peer.ip()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
