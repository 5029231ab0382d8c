//! An MCP server on axum whose tool calls pass through toolwarden's layers.
//!
//! The tools are a plain `tower::Service<ClientRequest>` (here a
//! `service_fn` with a deliberately flaky `quote` tool); the standard stack
//! wraps it; an rmcp `ServerHandler` hands every `tools/call` to the stack;
//! rmcp's Streamable HTTP service serves it at `/mcp` on axum.
//!
//! Run: `cargo run --example axum_server -- --serve` and point an MCP client
//! at `http://127.0.0.1:8765/mcp`. Without `--serve` it starts on an
//! ephemeral port, calls itself over real HTTP with rmcp's client, prints
//! what happened and exits (that is how CI runs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest,
    ContentBlock, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
    ServerResult, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{
    StreamableHttpClientTransport, StreamableHttpServerConfig, StreamableHttpService,
};
use rmcp::{ErrorData, ServerHandler, ServiceExt as _};
use serde_json::json;
use toolwarden::stack::{StandardService, StandardStack};
use toolwarden_core::{BoxError, McpResponse, ToolCatalog};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Tools = BoxCloneSyncService<ClientRequest, ServerResult, Infallible>;

/// The tools themselves: `quote` fails every third call.
fn tools() -> Tools {
    let calls = Arc::new(AtomicU32::new(0));
    BoxCloneSyncService::new(tower::service_fn(move |req: ClientRequest| {
        let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let name = toolwarden_core::McpRequest::tool_name(&req)
                .unwrap_or_default()
                .to_owned();
            let result = match name.as_str() {
                "quote" if n.is_multiple_of(3) => CallToolResult::error(vec![ContentBlock::text(
                    "quote service temporarily unavailable",
                )]),
                "quote" => CallToolResult::success(vec![ContentBlock::text(format!(
                    "quote #{n}: ship it"
                ))]),
                other => CallToolResult::error(vec![ContentBlock::text(format!(
                    "MCP error -32602: Tool {other} not found"
                ))]),
            };
            Ok::<_, Infallible>(ServerResult::CallToolResult(result))
        }
    }))
}

/// Hands every tool call to the stack.
#[derive(Clone)]
struct Guarded {
    stack: StandardService<Tools>,
}

impl ServerHandler for Guarded {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = Arc::new(
            json!({"type": "object"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        let mut quote = Tool::new("quote", "Returns a quote (flaky)", schema);
        quote.annotations = Some(ToolAnnotations::new().read_only(true));
        Ok(ListToolsResult::with_all_items(vec![quote]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let call = ClientRequest::CallToolRequest(CallToolRequest::new(request));
        match self.stack.clone().oneshot(call).await {
            Ok(ServerResult::CallToolResult(result)) => Ok(result.into()),
            Ok(_) => Err(ErrorData::internal_error("unexpected result", None)),
            Err(e) => Err(ErrorData::internal_error(e.to_string(), None)),
        }
    }
}

fn call(name: &str) -> ClientRequest {
    let mut params = CallToolRequestParams::new(name.to_owned());
    params.arguments = json!({}).as_object().cloned();
    ClientRequest::CallToolRequest(CallToolRequest::new(params))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let serve_forever = std::env::args().any(|a| a == "--serve");

    // `quote` is read-only: retried, and its last good result served stale.
    let catalog = ToolCatalog::new();
    catalog.configure(
        "quote",
        toolwarden_core::ToolPolicy {
            safe_to_repeat: Some(true),
            cacheable: Some(true),
        },
    );
    let stack = StandardStack::builder()
        .catalog(catalog)
        .retry(|b| b.max_attempts(2).base_delay(Duration::from_millis(10)))
        .build()?;
    let guarded = Guarded {
        stack: stack.layer(tools()),
    };

    let service = StreamableHttpService::new(
        move || Ok(guarded.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let addr = if serve_forever {
        "127.0.0.1:8765"
    } else {
        "127.0.0.1:0"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let url = format!("http://{}/mcp", listener.local_addr()?);
    // TCP_NODELAY: without it, a kept-alive client waits 40 ms per call for
    // the delayed ACK of the answer's second small write.
    let listener = {
        use axum::serve::ListenerExt;
        listener.tap_io(|stream| {
            let _ = stream.set_nodelay(true);
        })
    };
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    println!("serving MCP at {url}");
    if serve_forever {
        server.await??;
        return Ok(());
    }

    // Call ourselves over real HTTP.
    let client = ().serve(StreamableHttpClientTransport::from_uri(url)).await?;
    let peer = toolwarden::rmcp::RmcpClient::new(client.peer().clone());
    for _ in 0..4 {
        let result = peer.clone().oneshot(call("quote")).await?;
        println!("quote -> {}", result.first_text().unwrap_or_default());
        assert!(
            !result.is_tool_error(),
            "every third failure is retried away"
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&stack.stats().snapshot())?
    );
    client.cancel().await?;
    server.abort();
    Ok(())
}
