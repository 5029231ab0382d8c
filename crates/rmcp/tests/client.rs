//! RmcpClient against a real rmcp server in the same process, over an
//! in-memory pipe: requests, error mapping, catalog filling, cancellation
//! on drop, and a closed transport.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult, ClientRequest,
    ContentBlock, ErrorCode, ListToolsRequest, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, ServerResult, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer, RunningService};
use rmcp::{ErrorData, RoleClient, ServerHandler, ServiceExt};
use serde_json::json;
use tokio::sync::Notify;
use toolwarden_core::{
    CallKind, Classify, FailureClass, McpClassifier, McpResponse, OutcomeKind, ToolCatalog,
};
use toolwarden_rmcp::RmcpClient;
use tower::{Service, ServiceExt as _};

#[derive(Clone, Default)]
struct TestServer {
    cancelled: Arc<AtomicUsize>,
    slow_started: Arc<Notify>,
}

impl ServerHandler for TestServer {
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
        let mut echo = Tool::new("echo", "Echoes its message", schema.clone());
        echo.annotations = Some(ToolAnnotations::new().read_only(true));
        let slow = Tool::new("slow", "Waits until cancelled", schema);
        Ok(ListToolsResult::with_all_items(vec![echo, slow]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        match request.name.as_ref() {
            "echo" => {
                let message = request
                    .arguments
                    .as_ref()
                    .and_then(|a| a.get("message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or_default()
                    .to_owned();
                Ok(
                    CallToolResult::success(vec![ContentBlock::text(format!("Echo: {message}"))])
                        .into(),
                )
            }
            "slow" => {
                self.slow_started.notify_one();
                context.ct.cancelled().await;
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                Ok(CallToolResult::error(vec![ContentBlock::text("cancelled")]).into())
            }
            "hang" => {
                // Ignores cancellation: only the connection going away ends the call.
                self.slow_started.notify_one();
                std::future::pending().await
            }
            other => Err(ErrorData::new(
                ErrorCode(-32602),
                format!("Unknown tool: {other}"),
                None,
            )),
        }
    }
}

async fn connect(
    server: TestServer,
) -> (RunningService<RoleClient, ()>, tokio::task::JoinHandle<()>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let client = ().serve(client_io).await.expect("client connects");
    (client, server_task)
}

fn call(name: &'static str, args: serde_json::Value) -> ClientRequest {
    let mut params = CallToolRequestParams::new(name);
    params.arguments = args.as_object().cloned();
    ClientRequest::CallToolRequest(CallToolRequest::new(params))
}

fn classify_err(e: &toolwarden_core::BoxError) -> toolwarden_core::Outcome {
    <McpClassifier as Classify<ServerResult>>::classify_error(&McpClassifier::new(), e.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_tool_and_reads_the_result() {
    let (running, _server) = connect(TestServer::default()).await;
    let mut client = RmcpClient::new(running.peer().clone());
    let result = client
        .ready()
        .await
        .unwrap()
        .call(call("echo", json!({"message": "hi"})))
        .await
        .unwrap();
    assert_eq!(result.first_text().as_deref(), Some("Echo: hi"));
    assert!(McpClassifier::new()
        .classify_response(CallKind::ToolCall, &result)
        .is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_tool_is_a_client_error() {
    let (running, _server) = connect(TestServer::default()).await;
    let client = RmcpClient::new(running.peer().clone());
    let err = client.oneshot(call("nope", json!({}))).await.unwrap_err();
    let outcome = classify_err(&err);
    assert_eq!(outcome.kind, OutcomeKind::ProtocolError);
    assert_eq!(outcome.class, Some(FailureClass::Client));
    assert!(!outcome.is_counted_failure());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_list_fills_the_catalog() {
    let (running, _server) = connect(TestServer::default()).await;
    let catalog = ToolCatalog::new();
    let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
    // Through the service: a tools/list passing by is read.
    let listed = client
        .clone()
        .oneshot(ClientRequest::ListToolsRequest(ListToolsRequest::default()))
        .await
        .unwrap();
    assert!(matches!(listed, ServerResult::ListToolsResult(_)));
    assert_eq!(catalog.len(), 2);
    catalog.set_trusted(true);
    assert!(catalog.is_safe_to_repeat("echo"));
    assert!(!catalog.is_safe_to_repeat("slow"));
    // And on demand.
    let fresh = ToolCatalog::new();
    let n = RmcpClient::new(running.peer().clone())
        .with_catalog(fresh.clone())
        .refresh_catalog()
        .await
        .unwrap();
    assert_eq!((n, fresh.len()), (2, 2));
    assert_eq!(
        fresh.get("echo").unwrap().description.as_deref(),
        Some("Echoes its message")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_is_cancelled_upstream() {
    let server = TestServer::default();
    let (running, _server) = connect(server.clone()).await;
    let client = RmcpClient::new(running.peer().clone());
    let started = server.slow_started.clone();
    let pending = tokio::spawn(client.oneshot(call("slow", json!({}))));
    started.notified().await;
    pending.abort(); // drops the call's future mid-flight
                     // The server sees notifications/cancelled and ends the handler.
    for _ in 0..200 {
        if server.cancelled.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never saw the cancellation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_timeouts_cancel_upstream_and_classify_as_timeouts() {
    let server = TestServer::default();
    let (running, _server) = connect(server.clone()).await;
    let client = RmcpClient::new(running.peer().clone()).timeout(Duration::from_millis(50));
    let err = client.oneshot(call("slow", json!({}))).await.unwrap_err();
    let outcome = classify_err(&err);
    assert_eq!(
        (outcome.kind, outcome.class),
        (OutcomeKind::Timeout, Some(FailureClass::Transient))
    );
    for _ in 0..200 {
        if server.cancelled.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never saw the cancellation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_transport_fails_fast_and_transient() {
    let server = TestServer::default();
    let (running, server_task) = connect(server.clone()).await;
    let mut client = RmcpClient::new(running.peer().clone());
    let started = server.slow_started.clone();
    let in_flight = tokio::spawn(client.clone().oneshot(call("hang", json!({}))));
    started.notified().await;
    server_task.abort(); // the server goes away mid-call
    let err = in_flight.await.unwrap().unwrap_err();
    assert_eq!(classify_err(&err).kind, OutcomeKind::Transport);
    // Afterwards nothing is sent into the dead connection.
    let mut closed = false;
    for _ in 0..200 {
        if std::future::poll_fn(|cx| client.poll_ready(cx))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "poll_ready never reported the closed transport");
}
