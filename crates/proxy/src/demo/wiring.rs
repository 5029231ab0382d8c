//! What both demo scenes need: a server in this process as an upstream,
//! and the proxy served to the agent over a pipe.

use rmcp::ServiceExt as _;
use tokio_util::sync::CancellationToken;

use crate::upstream::{InProcessServer, UpstreamTarget};
use crate::Proxy;

/// `server` as an upstream in this process: each connection is served by a
/// clone of it over an in-memory pipe.
pub(super) fn in_process<S: rmcp::ServerHandler + Clone>(name: &str, server: S) -> UpstreamTarget {
    UpstreamTarget::InProcess(InProcessServer::new(name, move || {
        let (client_side, server_side) = tokio::io::duplex(1 << 20);
        let server = server.clone();
        tokio::spawn(async move {
            if let Ok(running) = server.serve(server_side).await {
                let _ = running.waiting().await;
            }
        });
        client_side
    }))
}

/// Serves `proxy` over a pipe, as it would a client over stdio: the
/// agent's end, what stops the serving, and the serving task.
pub(super) fn serve_over_pipe(
    proxy: &Proxy,
) -> (
    tokio::io::DuplexStream,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (agent_side, proxy_side) = tokio::io::duplex(1 << 20);
    let (proxy_in, proxy_out) = tokio::io::split(proxy_side);
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(crate::serve_stdio(
        proxy.core(),
        proxy_in,
        proxy_out,
        crate::DEFAULT_MAX_LINE_BYTES,
        shutdown.clone(),
    ));
    (agent_side, shutdown, serving)
}
