//! `upstream.http_keep_alive` (issue 17): the proxy keeps its connection to
//! an HTTP upstream open between requests, instead of a new TCP connection
//! (and, for `https://`, a TLS handshake) for every one; `0s` opens one per
//! request, as rmcp's own client does. Counted at a local Streamable HTTP
//! server that numbers the connections it accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt as _;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest,
    ContentBlock, ErrorData, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
    ServerConfig, ServerResult,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServerHandler;
use support::{bounded, LIMIT};
use tokio_util::sync::CancellationToken;
use toolwarden_core::ToolCatalog;
use toolwarden_proxy::config::UpstreamConfig;
use toolwarden_proxy::upstream::Upstream;
use toolwarden_proxy::upstream_client_config;
use toolwarden_proxy::Downstreams;
use toolwarden_proxy::UpstreamTarget;
use tower::ServiceExt as _;

#[derive(Clone)]
struct Echo;

impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(support::tool_list(&[("echo", "echoes")]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        Ok(CallToolResult::success(vec![ContentBlock::text("echo")]).into())
    }
}

/// A Streamable HTTP server on a loopback port: its URL and the number of
/// TCP connections it accepted so far.
async fn counting_server(shutdown: CancellationToken) -> (String, Arc<AtomicUsize>) {
    let service = StreamableHttpService::new(
        || Ok(Echo),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token()),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    (format!("http://127.0.0.1:{port}/mcp"), accepted)
}

/// Connects an upstream with `keep_alive`, makes `calls` tool calls one
/// after the other, and returns the TCP connections the server accepted
/// for them (the handshake's are counted before).
async fn connections_for(keep_alive: Duration, calls: usize) -> usize {
    let shutdown = CancellationToken::new();
    let (url, accepted) = counting_server(shutdown.clone()).await;
    let config = UpstreamConfig {
        http_keep_alive: keep_alive,
        ..UpstreamConfig::default()
    };
    let upstream = Upstream::new(
        UpstreamTarget::Url(url),
        config,
        ToolCatalog::new(),
        Downstreams::new(),
    );
    let client = rmcp::model::InitializeRequestParams::new(
        Default::default(),
        rmcp::model::Implementation::new("keep-alive-test", "0"),
    );
    upstream.start(upstream_client_config(&client));
    bounded(
        "the upstream connection",
        LIMIT,
        upstream.wait_connected(LIMIT),
    )
    .await
    .unwrap();
    // Let the handshake's requests (and the standalone stream) settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = accepted.load(Ordering::SeqCst);
    for n in 0..calls {
        let mut params = CallToolRequestParams::new("echo");
        params.arguments = Some(Default::default());
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        let answer = bounded("a call", LIMIT, upstream.service().oneshot(request))
            .await
            .unwrap_or_else(|e| panic!("call {n}: {e}"));
        assert!(
            matches!(answer, ServerResult::CallToolResult(_)),
            "{answer:?}"
        );
    }
    let used = accepted.load(Ordering::SeqCst) - before;
    upstream.shutdown(LIMIT).await;
    shutdown.cancel();
    used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_connection_is_kept_alive_between_calls() {
    // Kept alive: the calls share a connection or two.
    let kept = connections_for(Duration::from_secs(2), 20).await;
    assert!(kept <= 2, "20 calls opened {kept} connections");
    // 0s: a new connection for every call, as before.
    let fresh = connections_for(Duration::ZERO, 20).await;
    assert!(fresh >= 20, "20 calls opened only {fresh} connections");
}
