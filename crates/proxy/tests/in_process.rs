//! The proxy's behaviour with an in-process upstream server and a raw
//! JSON-RPC client on in-memory pipes, through the same framer, session
//! loop, `ProxyServer` and upstream supervisor as the binary: malformed
//! input, error mapping, rejections rendered as tool results, cancellation,
//! progress routing and order (both ways), upstream crashes and restarts,
//! and shutdown. Runs without any external component.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ClientNotification, ContentBlock, ErrorCode, ErrorData, InitializeRequestParams,
    JsonRpcMessage, JsonRpcNotification, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ProgressToken, ProtocolVersion, ServerCapabilities, ServerConfig,
    ServerRequest, Tool,
};
use rmcp::service::{
    Peer, PeerRequestOptions, RequestContext, RoleClient, RoleServer, RxJsonRpcMessage,
};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::{
    ServerSseMessage, SessionId, SessionManager,
};
use rmcp::transport::{
    StreamableHttpClientTransport, StreamableHttpServerConfig, StreamableHttpService,
};
use rmcp::{ServerHandler, ServiceExt as _};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use toolwarden_core::rejection::CircuitOpen;
use toolwarden_core::{BoxError, ToolCatalog};
use toolwarden_proxy::config::UpstreamConfig;
use toolwarden_proxy::stack::ToolStack;
use toolwarden_proxy::transport::{HookedTransport, OnReceive};
use toolwarden_proxy::upstream::{Upstream, UpstreamStatus};
use toolwarden_proxy::Downstreams;
use toolwarden_proxy::ProxyCore;
use toolwarden_proxy::{InProcessServer, UpstreamTarget};

const LIMIT: Duration = Duration::from_secs(20);

/// How many progress notifications the `burst` tool sends before answering.
const BURST_STEPS: usize = 10;

/// How many progress notifications the client sends on a request of the
/// server's before answering it.
const CLIENT_STEPS: usize = 10;

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    support::bounded(what, LIMIT, f).await
}

/// The upstream server: `echo`, `slow` (until cancelled), `hang` (never
/// answers, even cancelled), `reject` (JSON-RPC error), `steps` (progress),
/// `burst` (progress, then the answer at once), `ask_roots` (a
/// notification and a request to the client), `ask_roots_detached` (a
/// request to the client whatever protocol the call came with) and
/// `roots_progress` (a request to the client, answered with the client's
/// progress the server read before the client's answer).
#[derive(Clone, Default)]
struct TestServer {
    cancelled: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    /// The progress values the server's transport read, per token, in order.
    progress_read: ProgressRead,
    /// The errors `ask_roots` got for its `roots/list`, in order.
    roots_errors: Arc<Mutex<Vec<ErrorData>>>,
    /// The `tasks/get` and `tasks/cancel` requests the server was sent, by task id.
    task_requests: Arc<Mutex<Vec<String>>>,
    /// Whether `tools/list` also lists a tool `added`.
    lists_added: Arc<std::sync::atomic::AtomicBool>,
}

type ProgressRead = Arc<Mutex<HashMap<ProgressToken, Vec<f64>>>>;

/// Records each `notifications/progress` the server's transport reads (a
/// hook on a [`HookedTransport`]): what the server has read before a
/// response is exactly what the client sent before it, whatever order
/// rmcp's tasks then run in.
struct RecordProgress(ProgressRead);

impl OnReceive<RoleServer> for RecordProgress {
    fn on_receive(&self, message: &mut RxJsonRpcMessage<RoleServer>) {
        if let JsonRpcMessage::Notification(JsonRpcNotification {
            notification: ClientNotification::ProgressNotification(progress),
            ..
        }) = message
        {
            self.0
                .lock()
                .unwrap()
                .entry(progress.params.progress_token.clone())
                .or_default()
                .push(progress.params.progress);
        }
    }
}

/// The server's transport, recording the progress it reads.
type RecordingTransport<T> = HookedTransport<T, RecordProgress>;

#[allow(deprecated)] // roots/list: deprecated by SEP-2577, still forwarded by the proxy
impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        );
        info.server_info = rmcp::model::Implementation::new("in-process-test", "1.0");
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = Arc::new(json!({"type": "object"}).as_object().cloned().unwrap());
        Ok(ListToolsResult::with_all_items(
            [
                "echo",
                "slow",
                "hang",
                "reject",
                "steps",
                "burst",
                "ask_roots",
                "ask_roots_detached",
                "roots_progress",
                "task",
                "steps_then_wait",
                "added",
                "meta_keys",
            ]
            .into_iter()
            .filter(|name| *name != "added" || self.lists_added.load(Ordering::SeqCst))
            .map(|name| Tool::new(name, "test tool", schema.clone()))
            .collect(),
        ))
    }

    async fn get_task(
        &self,
        request: rmcp::model::GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::GetTaskResult, ErrorData> {
        self.task_requests
            .lock()
            .unwrap()
            .push(format!("get {}", request.task_id));
        let stamp = "2026-12-06T00:00:00Z";
        let task = rmcp::model::Task::new(
            request.task_id,
            rmcp::model::TaskStatus::Working,
            stamp,
            stamp,
        );
        Ok(rmcp::model::GetTaskResult::new(
            rmcp::model::DetailedTask::new(task, rmcp::model::TaskPayload::Working),
        ))
    }

    /// `tasks/list` (2025-11-25, which rmcp has no model for): two tasks.
    async fn on_custom_request(
        &self,
        request: rmcp::model::CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CustomResult, ErrorData> {
        match request.method.as_str() {
            "tasks/list" => Ok(rmcp::model::CustomResult::new(
                json!({"tasks": [{"taskId": "task-done"}, {"taskId": "task-nobody"}]}),
            )),
            other => Err(ErrorData::new(
                ErrorCode(-32601),
                format!("no method {other}"),
                None,
            )),
        }
    }

    async fn cancel_task(
        &self,
        request: rmcp::model::CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.task_requests
            .lock()
            .unwrap()
            .push(format!("cancel {}", request.task_id));
        Ok(())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let arg = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        match request.name.as_ref() {
            "echo" => Ok(
                CallToolResult::success(vec![ContentBlock::text(format!("Echo: {arg}"))]).into(),
            ),
            // The `_meta` keys the request reached the server with.
            "meta_keys" => {
                let mut keys: Vec<&str> = context.meta.keys().map(String::as_str).collect();
                keys.sort_unstable();
                Ok(CallToolResult::success(vec![ContentBlock::text(keys.join(","))]).into())
            }
            "slow" => {
                context.ct.cancelled().await;
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                Ok(CallToolResult::error(vec![ContentBlock::text("cancelled")]).into())
            }
            "hang" => std::future::pending().await,
            "ask_roots" => {
                // A server→client request, answered by the proxy's client.
                let _ = context.peer.notify_tool_list_changed().await;
                let roots = match context.peer.list_roots().await {
                    Ok(roots) => roots,
                    Err(e) => {
                        let error = match e {
                            rmcp::ServiceError::McpError(error) => error,
                            other => ErrorData::internal_error(other.to_string(), None),
                        };
                        self.roots_errors.lock().unwrap().push(error.clone());
                        return Err(error);
                    }
                };
                let uris: Vec<String> = roots.roots.iter().map(|r| r.uri.clone()).collect();
                Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                    "roots: {}",
                    uris.join(",")
                ))])
                .into())
            }
            "ask_roots_detached" => {
                // rmcp refuses a request to the client from the handler of a
                // call that names protocol 2026-07-28 in its `_meta` (the
                // proxy passes a sessionless client's on); from a task of its
                // own it asks anyway, as a server that does not check would.
                let peer = context.peer.clone();
                let answer = tokio::spawn(async move { peer.list_roots().await })
                    .await
                    .unwrap();
                let roots = answer.map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                let uris: Vec<String> = roots.roots.iter().map(|r| r.uri.clone()).collect();
                Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                    "roots: {}",
                    uris.join(",")
                ))])
                .into())
            }
            "roots_progress" => {
                // A server→client request; the answer lists the progress
                // values read for it before the client's answer, in order.
                let request = ServerRequest::ListRootsRequest(rmcp::model::ListRootsRequest {
                    method: Default::default(),
                    extensions: Default::default(),
                });
                let handle = context
                    .peer
                    .send_cancellable_request(request, PeerRequestOptions::no_options())
                    .await
                    .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                let token = handle.progress_token.clone();
                let answer = handle.await_response().await;
                let read = self
                    .progress_read
                    .lock()
                    .unwrap()
                    .remove(&token)
                    .unwrap_or_default();
                answer.map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                let read: Vec<String> = read.iter().map(f64::to_string).collect();
                Ok(CallToolResult::success(vec![ContentBlock::text(read.join(","))]).into())
            }
            "task" => {
                // A task (SEP-2663) for the call, whose status the server
                // reports a moment later, once the call was answered.
                let stamp = "2026-12-06T00:00:00Z";
                let task = rmcp::model::Task::new(
                    format!("task-{arg}"),
                    rmcp::model::TaskStatus::Working,
                    stamp,
                    stamp,
                );
                // `{"message": "done"}`: reported completed, its status final.
                let status = if arg == "done" {
                    let mut done = task.clone();
                    done.status = rmcp::model::TaskStatus::Completed;
                    let result = json!({"content": []}).as_object().cloned().unwrap();
                    rmcp::model::DetailedTask::new(
                        done,
                        rmcp::model::TaskPayload::Completed { result },
                    )
                } else {
                    rmcp::model::DetailedTask::new(task.clone(), rmcp::model::TaskPayload::Working)
                };
                let peer = context.peer.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let notification = rmcp::model::ServerNotification::TaskStatusNotification(
                        rmcp::model::TaskStatusNotification::new(
                            rmcp::model::TaskStatusNotificationParams::new(status),
                        ),
                    );
                    let _ = peer.send_notification(notification).await;
                });
                Ok(CallToolResponse::Task(rmcp::model::CreateTaskResult::new(
                    task,
                )))
            }
            "odd_notifications" => {
                // Three of MCP's own notifications with params that do not
                // fit (rmcp reads them as custom ones), then one that is
                // custom indeed.
                let odd = [
                    (
                        "notifications/progress",
                        json!({"progressToken": {"x": 1}, "progress": "a"}),
                    ),
                    ("notifications/tasks", json!({"taskId": 5})),
                    (
                        "notifications/tasks/status",
                        json!({"taskId": "task-odd", "status": "working"}),
                    ),
                    ("notifications/acme/tick", json!({"n": 1})),
                ];
                for (method, params) in odd {
                    let notification = rmcp::model::ServerNotification::CustomNotification(
                        rmcp::model::CustomNotification::new(method, Some(params)),
                    );
                    let _ = context.peer.send_notification(notification).await;
                }
                Ok(CallToolResult::success(vec![ContentBlock::text("odd done")]).into())
            }
            "reject" => Err(ErrorData::new(
                ErrorCode(-32602),
                "Unknown tool: reject",
                Some(json!({"hint": 1})),
            )),
            "steps" => {
                if let Some(token) = context.meta.get_progress_token() {
                    for step in 1..=3 {
                        let params = ProgressNotificationParam::new(token.clone(), f64::from(step))
                            .with_total(3.0);
                        let _ = context.peer.notify_progress(params).await;
                    }
                }
                Ok(CallToolResult::success(vec![ContentBlock::text("done")]).into())
            }
            "steps_then_wait" => {
                if let Some(token) = context.meta.get_progress_token() {
                    for step in 1..=3 {
                        let params = ProgressNotificationParam::new(token.clone(), f64::from(step));
                        let _ = context.peer.notify_progress(params).await;
                    }
                }
                context.ct.cancelled().await;
                Ok(CallToolResult::error(vec![ContentBlock::text("cancelled")]).into())
            }
            "burst" => {
                if let Some(token) = context.meta.get_progress_token() {
                    for step in 1..=BURST_STEPS {
                        let params = ProgressNotificationParam::new(token.clone(), step as f64);
                        let _ = context.peer.notify_progress(params).await;
                    }
                }
                Ok(CallToolResult::success(vec![ContentBlock::text("burst done")]).into())
            }
            other => Err(ErrorData::new(
                ErrorCode(-32602),
                format!("Unknown tool: {other}"),
                None,
            )),
        }
    }
}

/// An in-process target whose current server task can be killed.
fn target(server: TestServer, tasks: Arc<Mutex<Vec<JoinHandle<()>>>>) -> UpstreamTarget {
    UpstreamTarget::InProcess(InProcessServer::new("test server", move || {
        let (client, server_io) = tokio::io::duplex(1 << 16);
        let server = server.clone();
        let (read, write) = tokio::io::split(server_io);
        let transport = HookedTransport::new(
            AsyncRwTransport::new_server(read, write),
            RecordProgress(Arc::clone(&server.progress_read)),
        );
        let task = tokio::spawn(async move {
            if let Ok(running) = server.serve(transport).await {
                let _ = running.waiting().await;
            }
        });
        tasks.lock().unwrap().push(task);
        client
    }))
}

struct Harness {
    input: WriteHalf<DuplexStream>,
    output: tokio::io::Lines<BufReader<ReadHalf<DuplexStream>>>,
    serving: Option<JoinHandle<std::io::Result<()>>>,
    upstream: Upstream,
    server: TestServer,
    server_tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    shutdown: CancellationToken,
    catalog: ToolCatalog,
}

fn quick_restarts() -> UpstreamConfig {
    UpstreamConfig {
        restart_backoff_min: Duration::from_millis(20),
        restart_backoff_max: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    }
}

fn harness_with(
    target_of: impl FnOnce(&Harness0) -> UpstreamTarget,
    stack: Option<ToolStack>,
) -> Harness {
    let h0 = Harness0 {
        server: TestServer::default(),
        server_tasks: Arc::default(),
    };
    let target = target_of(&h0);
    let downstreams = Downstreams::new();
    let catalog = ToolCatalog::new();
    let upstream = Upstream::new(
        target,
        quick_restarts(),
        catalog.clone(),
        downstreams.clone(),
    );
    let stack = stack.unwrap_or_else(|| ToolStack::new(upstream.service()));
    let stdio =
        support::serve_stdio_in_memory(ProxyCore::new(upstream.clone(), stack, downstreams));
    Harness {
        input: stdio.input,
        output: stdio.output,
        serving: Some(stdio.serving),
        upstream,
        server: h0.server,
        server_tasks: h0.server_tasks,
        shutdown: stdio.shutdown,
        catalog,
    }
}

struct Harness0 {
    server: TestServer,
    server_tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn harness() -> Harness {
    harness_with(
        |h| target(h.server.clone(), Arc::clone(&h.server_tasks)),
        None,
    )
}

impl Harness {
    async fn send_raw(&mut self, line: &str) {
        self.input.write_all(line.as_bytes()).await.unwrap();
        self.input.write_all(b"\n").await.unwrap();
    }

    async fn send(&mut self, message: Value) {
        self.send_raw(&message.to_string()).await;
    }

    async fn recv(&mut self) -> Value {
        let line = bounded("a line from the proxy", self.output.next_line())
            .await
            .unwrap()
            .expect("the proxy's output is open");
        serde_json::from_str(&line).unwrap()
    }

    /// The response to `id`, and the notifications before it.
    async fn response(&mut self, id: Value) -> (Value, Vec<Value>) {
        let mut notifications = Vec::new();
        loop {
            let message = self.recv().await;
            if message.get("method").is_some() {
                notifications.push(message);
            } else if message["id"] == id {
                return (message, notifications);
            }
        }
    }

    async fn request(&mut self, id: i64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        self.response(json!(id)).await.0
    }

    async fn initialize(&mut self) -> Value {
        let init = self
            .request(
                0,
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
            )
            .await;
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        init
    }

    async fn call(&mut self, id: i64, tool: &str, arguments: Value) -> Value {
        self.request(
            id,
            "tools/call",
            json!({"name": tool, "arguments": arguments}),
        )
        .await
    }

    fn kill_server(&self) {
        for task in self.server_tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    async fn finish(mut self) {
        self.input.shutdown().await.unwrap();
        drop(self.input);
        let serving = self.serving.take().unwrap();
        bounded("serve_stdio after the end of input", serving)
            .await
            .unwrap()
            .unwrap();
        self.upstream.shutdown(LIMIT).await;
        assert_eq!(self.upstream.status(), UpstreamStatus::Stopped);
        self.shutdown.cancel();
    }
}

fn text(response: &Value) -> String {
    response["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A 2026-07-28 client's first request is `server/discover`: answered with
/// the server's capabilities and name, as `initialize` is. It was answered
/// before the upstream had started, from the proxy's defaults (no
/// capabilities at all), so the client saw a server with no tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_discover_first_answers_with_the_servers_capabilities() {
    let mut h = harness();
    let envelope = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "modern", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    let discovered = h
        .request(1, "server/discover", json!({"_meta": envelope}))
        .await;
    let result = &discovered["result"];
    assert!(result["capabilities"]["tools"].is_object(), "{discovered}");
    assert!(
        discovered.to_string().contains("in-process-test"),
        "the server's name: {discovered}"
    );
    // The upstream speaks the handshake: so do the versions offered, for a
    // client that can fall back to it (the server's requests and
    // notifications reach only clients with a session).
    let versions: Vec<&str> = result["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(versions.contains(&"2025-11-25"), "{discovered}");
    assert!(!versions.contains(&"2026-07-28"), "{discovered}");
    // Its results say they are complete (2026-07-28 requires it; a server
    // of an older version sends no `resultType`, and the Python SDK's
    // client refused the list without it).
    for (id, method, params) in [
        (2, "tools/list", json!({"_meta": envelope})),
        (
            3,
            "tools/call",
            json!({"name": "echo", "arguments": {"message": "hi"}, "_meta": envelope}),
        ),
    ] {
        let answer = h.request(id, method, params).await;
        assert_eq!(answer["result"]["resultType"], "complete", "{answer}");
    }
    h.finish().await;
}

/// A client of an older version gets no `resultType` (rmcp takes the
/// proxy's off for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2025_client_gets_no_result_type() {
    let mut h = harness();
    h.initialize().await;
    let tools = h.request(1, "tools/list", json!({})).await;
    assert!(tools["result"].get("resultType").is_none(), "{tools}");
    let call = h.call(2, "echo", json!({"message": "hi"})).await;
    assert!(call["result"].get("resultType").is_none(), "{call}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_through_the_proxy() {
    let mut h = harness();
    // Malformed input before initialize is answered; the session still starts.
    h.send_raw("{oops").await;
    assert_eq!(h.recv().await["error"]["code"], -32700);
    let init = h.initialize().await;
    assert_eq!(
        init["result"]["serverInfo"]["name"], "in-process-test",
        "{init}"
    );
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");

    let tools = h.request(1, "tools/list", json!({})).await;
    assert_eq!(
        tools["result"]["tools"].as_array().unwrap().len(),
        12,
        "{tools}"
    );
    assert_eq!(
        text(&h.call(2, "echo", json!({"message": "hi"})).await),
        "Echo: hi"
    );

    // A JSON-RPC error of the server passes through unchanged.
    let rejected = h.call(3, "reject", json!({})).await;
    assert_eq!(rejected["error"]["code"], -32602, "{rejected}");
    assert_eq!(rejected["error"]["message"], "Unknown tool: reject");
    assert_eq!(rejected["error"]["data"]["hint"], 1);

    // Malformed lines in the middle: answered once each, with their ids.
    h.send_raw(r#"{"jsonrpc":"2.0","id":41,"method":"tools/call","params":{"arguments":{}}}"#)
        .await;
    let invalid = h.recv().await;
    assert_eq!(
        (invalid["error"]["code"].as_i64(), invalid["id"].as_i64()),
        (Some(-32602), Some(41))
    );
    h.send_raw(&format!(
        r#"{{"jsonrpc":"2.0","id":42,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    ))
    .await;
    let too_long = h.recv().await;
    assert_eq!(
        (too_long["error"]["code"].as_i64(), too_long["id"].as_i64()),
        (Some(-32600), Some(42))
    );
    assert_eq!(
        text(&h.call(4, "echo", json!({"message": "after"})).await),
        "Echo: after"
    );

    // Other requests pass through: ping reaches the server and comes back.
    let pong = h.request(5, "ping", json!({})).await;
    assert_eq!(pong["result"], json!({}), "{pong}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_the_client_under_its_own_token() {
    let mut h = harness();
    h.initialize().await;
    h.send(
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "steps", "arguments": {}, "_meta": {"progressToken": "mine"}}}),
    )
    .await;
    let (done, notifications) = h.response(json!(7)).await;
    assert_eq!(text(&done), "done");
    let progress: Vec<_> = notifications
        .iter()
        .filter(|n| n["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{notifications:?}");
    assert!(progress
        .iter()
        .all(|n| n["params"]["progressToken"] == "mine"));
    // Without a token of the client's, the server's progress goes nowhere.
    let (done, notifications) = {
        h.send(json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "steps", "arguments": {}}}))
            .await;
        h.response(json!(8)).await
    };
    assert_eq!(text(&done), "done");
    assert!(
        notifications
            .iter()
            .all(|n| n["method"] != "notifications/progress"),
        "{notifications:?}"
    );
    h.finish().await;
}

/// A server's notification that is one of MCP's own but whose params do not
/// fit (a progress token that is an object, a task status without a task)
/// names a request or a task nobody can route by: it reaches no client.
/// Broadcast, as custom notifications are, it showed every client what
/// belongs to one. A custom notification still reaches every client.
#[tokio::test]
async fn malformed_notifications_of_the_server_reach_no_client() {
    let mut h = harness();
    h.initialize().await;
    h.send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "odd_notifications", "arguments": {}}}))
        .await;
    let (done, mut seen) = h.response(json!(3)).await;
    assert_eq!(text(&done), "odd done");
    // Read until the custom one has come (each notification is handled on
    // its own), then one more round trip.
    while !seen
        .iter()
        .any(|n: &Value| n["method"] == "notifications/acme/tick")
    {
        seen.push(h.recv().await);
    }
    h.send(json!({"jsonrpc": "2.0", "id": 4, "method": "ping"}))
        .await;
    let (_, more) = h.response(json!(4)).await;
    seen.extend(more);
    let methods: Vec<&str> = seen.iter().filter_map(|n| n["method"].as_str()).collect();
    assert_eq!(methods, ["notifications/acme/tick"], "{seen:?}");
    h.finish().await;
}

/// The progress tokens of the `notifications/progress` among `messages`.
fn progress_tokens(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .map(|m| {
            m["params"]["progressToken"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

fn burst(id: i64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": "burst", "arguments": {}, "_meta": {"progressToken": format!("burst-{id}")}}})
}

/// A server that sends progress and answers at once: every progress reaches
/// the client before the answer to its call, and none comes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_always_comes_before_the_response() {
    let mut h = harness();
    h.initialize().await;
    // One call at a time: a progress coming after its answer would be seen
    // before the next answer, under a token already answered.
    for id in 1..=50 {
        h.send(burst(id)).await;
        let (done, notifications) = h.response(json!(id)).await;
        assert_eq!(text(&done), "burst done", "{done}");
        assert_eq!(
            progress_tokens(&notifications),
            vec![format!("burst-{id}"); BURST_STEPS],
            "call {id}: {notifications:?}"
        );
    }
    // Several calls at once, their progress interleaved.
    for round in 0..10 {
        let ids: Vec<i64> = (0..8).map(|k| 1000 + round * 8 + k).collect();
        for &id in &ids {
            h.send(burst(id)).await;
        }
        let mut progress = HashMap::<i64, usize>::new();
        let mut answered = HashSet::new();
        while answered.len() < ids.len() {
            let message = h.recv().await;
            if message["method"] == "notifications/progress" {
                let token = message["params"]["progressToken"].as_str().unwrap();
                let id: i64 = token.strip_prefix("burst-").unwrap().parse().unwrap();
                assert!(
                    ids.contains(&id) && !answered.contains(&id),
                    "progress after the answer to its call: {message}"
                );
                *progress.entry(id).or_default() += 1;
            } else {
                let id = message["id"].as_i64().unwrap();
                assert_eq!(text(&message), "burst done", "{message}");
                assert_eq!(
                    progress.get(&id),
                    Some(&BURST_STEPS),
                    "call {id} answered before all its progress"
                );
                answered.insert(id);
            }
        }
    }
    // Nothing late: the next answer comes with no progress before it.
    h.send(json!({"jsonrpc": "2.0", "id": 2000, "method": "ping"}))
        .await;
    let (pong, notifications) = h.response(json!(2000)).await;
    assert_eq!(pong["result"], json!({}), "{pong}");
    assert_eq!(progress_tokens(&notifications), Vec::<String>::new());
    h.finish().await;
}

/// The values of the `notifications/progress` among `messages`.
fn progress_values(messages: &[Value]) -> Vec<f64> {
    messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .map(|m| m["params"]["progress"].as_f64().unwrap())
        .collect()
}

/// 1, 2, ..., `steps`: what a token's progress must be, in that order.
fn one_to(steps: usize) -> Vec<f64> {
    (1..=steps).map(|step| step as f64).collect()
}

/// The server sends a token's progress 1, 2, 3, ...: the client gets it in
/// that order (MCP wants progress to increase), all of it, before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_values_increase_per_token() {
    let mut h = harness();
    h.initialize().await;
    for id in 1..=30 {
        h.send(burst(id)).await;
        let (done, notifications) = h.response(json!(id)).await;
        assert_eq!(text(&done), "burst done", "{done}");
        assert_eq!(
            progress_values(&notifications),
            one_to(BURST_STEPS),
            "call {id}: the progress values the client got"
        );
    }
    // Several calls at once, their progress interleaved.
    for round in 0..5 {
        let ids: Vec<i64> = (0..8).map(|k| 1000 + round * 8 + k).collect();
        for &id in &ids {
            h.send(burst(id)).await;
        }
        let mut seen = HashMap::<i64, Vec<f64>>::new();
        let mut answered = HashSet::new();
        while answered.len() < ids.len() {
            let message = h.recv().await;
            if message["method"] == "notifications/progress" {
                let token = message["params"]["progressToken"].as_str().unwrap();
                let id: i64 = token.strip_prefix("burst-").unwrap().parse().unwrap();
                let value = message["params"]["progress"].as_f64().unwrap();
                let values = seen.entry(id).or_default();
                assert!(
                    values.last().is_none_or(|&last| value > last),
                    "call {id}: progress {value} after {values:?}"
                );
                values.push(value);
            } else {
                let id = message["id"].as_i64().unwrap();
                assert_eq!(text(&message), "burst done", "{message}");
                assert_eq!(seen.get(&id), Some(&one_to(BURST_STEPS)), "call {id}");
                answered.insert(id);
            }
        }
    }
    h.finish().await;
}

/// Answers the server's `roots/list` request `request` the way a busy client
/// does: [`CLIENT_STEPS`] progress notifications under the request's token,
/// then the answer, all in one write.
async fn answer_with_progress(h: &mut Harness, request: &Value) {
    assert_eq!(request["method"], "roots/list", "{request}");
    let token = request["params"]["_meta"]["progressToken"].clone();
    assert!(!token.is_null(), "no progress token: {request}");
    let mut lines = String::new();
    for step in 1..=CLIENT_STEPS {
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": token, "progress": step, "total": CLIENT_STEPS}});
        lines.push_str(&format!("{progress}\n"));
    }
    let answer = json!({"jsonrpc": "2.0", "id": request["id"],
        "result": {"roots": [{"uri": "file:///work", "name": "work"}]}});
    lines.push_str(&answer.to_string());
    h.send_raw(&lines).await;
}

/// The client sends progress on a request of the server's, then its answer:
/// the server reads all of that progress, in order, before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_progress_reaches_the_server_before_its_answer() {
    let mut h = harness();
    let init = h
        .request(
            0,
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {"roots": {}}, "clientInfo": {"name": "t", "version": "0"}}),
        )
        .await;
    assert!(init.get("result").is_some(), "{init}");
    h.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    let expected = one_to(CLIENT_STEPS)
        .iter()
        .map(f64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let call = |id: i64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "roots_progress", "arguments": {}}})
    };
    for id in 1..=30 {
        h.send(call(id)).await;
        let request = h.recv().await;
        answer_with_progress(&mut h, &request).await;
        let (done, _) = h.response(json!(id)).await;
        assert_eq!(text(&done), expected, "call {id}: {done}");
    }
    // Several at once: the server's requests and the client's answers
    // interleaved.
    for round in 0..5 {
        let ids: Vec<i64> = (0..8).map(|k| 1000 + round * 8 + k).collect();
        for &id in &ids {
            h.send(call(id)).await;
        }
        let mut answered = HashSet::new();
        while answered.len() < ids.len() {
            let message = h.recv().await;
            if message["method"] == "roots/list" {
                answer_with_progress(&mut h, &message).await;
            } else {
                let id = message["id"].as_i64().unwrap();
                assert!(ids.contains(&id), "{message}");
                assert_eq!(text(&message), expected, "call {id}: {message}");
                answered.insert(id);
            }
        }
    }
    h.finish().await;
}

/// rmcp's session manager for a [`TestServer`] served over Streamable
/// HTTP, each session's transport wrapped in a [`RecordingTransport`] so
/// the server records the progress it reads, as over the in-memory pipe.
struct RecordingSessions {
    inner: LocalSessionManager,
    progress_read: ProgressRead,
}

impl SessionManager for RecordingSessions {
    type Error = <LocalSessionManager as SessionManager>::Error;
    type Transport = RecordingTransport<<LocalSessionManager as SessionManager>::Transport>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, inner) = self.inner.create_session().await?;
        let progress_read = Arc::clone(&self.progress_read);
        Ok((
            id,
            HookedTransport::new(inner, RecordProgress(progress_read)),
        ))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: rmcp::model::ClientJsonRpcMessage,
    ) -> Result<rmcp::model::ServerJsonRpcMessage, Self::Error> {
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: rmcp::model::ClientJsonRpcMessage,
    ) -> Result<impl futures::Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>
    {
        self.inner.create_stream(id, message).await
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: rmcp::model::ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl futures::Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>
    {
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl futures::Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>
    {
        self.inner.resume(id, last_event_id).await
    }
}

/// `server` served over Streamable HTTP on a loopback port (rmcp's own
/// server, which sends a request the server makes while handling a call on
/// that call's response stream, and one made from a task of its own on the
/// standalone stream): the upstream's URL, and the task serving it until
/// `shutdown`.
async fn http_upstream(server: TestServer, shutdown: CancellationToken) -> UpstreamTarget {
    let sessions = RecordingSessions {
        inner: LocalSessionManager::default(),
        progress_read: Arc::clone(&server.progress_read),
    };
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(sessions),
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token()),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    UpstreamTarget::Url(support::serve_on_loopback(router, shutdown).await)
}

/// How the upstream [`TestServer`] of an [`HttpHarness`] is reached.
#[derive(Debug, Clone, Copy)]
enum UpstreamKind {
    /// Over an in-memory pipe, as a child over stdio: nothing in a server's
    /// request says which call it came from.
    Pipe,
    /// Over Streamable HTTP: a request the server makes while handling a
    /// call comes on that call's response stream.
    Http,
}

/// The proxy serving Streamable HTTP (`--listen`) on a loopback port, in
/// front of a [`TestServer`].
struct HttpHarness {
    port: u16,
    serving: JoinHandle<std::io::Result<()>>,
    upstream: Upstream,
    downstreams: Downstreams,
    server: TestServer,
    shutdown: CancellationToken,
    /// Stops the upstream server when it is served over HTTP.
    upstream_server: CancellationToken,
}

impl HttpHarness {
    async fn start() -> HttpHarness {
        Self::start_with(UpstreamKind::Pipe).await
    }

    async fn start_with(kind: UpstreamKind) -> HttpHarness {
        Self::start_over(kind, |upstream| ToolStack::new(upstream.service())).await
    }

    /// Served through the standard stack the proxy builds by default.
    async fn start_standard() -> HttpHarness {
        Self::start_over(UpstreamKind::Pipe, |upstream| {
            let shared = toolwarden_proxy::stack::SharedState::new(
                toolwarden_core::Events::new(),
                toolwarden_proxy::endpoints::MetricsEndpoints::new(),
            );
            toolwarden_proxy::stack::build_stack(
                &toolwarden_proxy::config::Config::default(),
                upstream.service(),
                &shared,
            )
            .unwrap()
        })
        .await
    }

    async fn start_over(
        kind: UpstreamKind,
        stack: impl FnOnce(&Upstream) -> ToolStack,
    ) -> HttpHarness {
        let server = TestServer::default();
        let shutdown = CancellationToken::new();
        let upstream_server = CancellationToken::new();
        let target = match kind {
            UpstreamKind::Pipe => target(server.clone(), Arc::default()),
            UpstreamKind::Http => http_upstream(server.clone(), upstream_server.clone()).await,
        };
        let downstreams = Downstreams::new();
        let upstream = Upstream::new(
            target,
            quick_restarts(),
            ToolCatalog::new(),
            downstreams.clone(),
        );
        let core = ProxyCore::new(upstream.clone(), stack(&upstream), downstreams.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serving = tokio::spawn(toolwarden_proxy::serve_http(
            core,
            listener,
            1 << 20,
            false,
            shutdown.clone(),
        ));
        HttpHarness {
            port,
            serving,
            upstream,
            downstreams,
            server,
            shutdown,
            upstream_server,
        }
    }

    /// A Streamable HTTP session (`initialize`, then requests under its
    /// `mcp-session-id`) of `client`.
    async fn session<C: rmcp::ClientHandler>(
        &self,
        client: C,
    ) -> rmcp::service::RunningService<RoleClient, C> {
        let url = format!("http://127.0.0.1:{}/mcp", self.port);
        bounded(
            "the HTTP session",
            client.serve(StreamableHttpClientTransport::from_uri(url)),
        )
        .await
        .unwrap()
    }

    /// A call of `tool` POSTed without a session, from a client with roots
    /// ([`support::sessionless_call`]). Returns every JSON-RPC message of the
    /// HTTP answer, in order.
    async fn call_without_session(&self, version: &str, id: i64, tool: &str) -> Vec<Value> {
        let (body, headers) =
            support::sessionless_call(version, id, tool, json!({}), json!({"roots": {}}));
        let (status, body) =
            support::http_post_with(self.port, "/mcp", &headers, &body.to_string())
                .await
                .expect("an HTTP answer");
        assert_eq!(status, 200, "{body}");
        if body.trim_start().starts_with('{') {
            return vec![serde_json::from_str(&body).unwrap()];
        }
        // An SSE stream: one message per `data:` line (the priming event's is empty).
        body.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim)
            .filter(|data| !data.is_empty())
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    }

    /// Closes each of `sessions` (their `DELETE`), then [`finish`](Self::finish)es.
    async fn finish_with<C: rmcp::ClientHandler>(
        self,
        sessions: impl IntoIterator<Item = rmcp::service::RunningService<RoleClient, C>>,
    ) {
        for session in sessions {
            bounded("closing an HTTP session", session.cancel())
                .await
                .unwrap();
        }
        self.finish().await;
    }

    async fn finish(self) {
        self.shutdown.cancel();
        bounded("serve_http after shutdown", self.serving)
            .await
            .unwrap()
            .unwrap();
        self.upstream.shutdown(LIMIT).await;
        self.upstream_server.cancel();
    }
}

/// The answers to request `id` among `messages`, and the requests the proxy
/// sent (server→client requests: they have a method and an id).
fn answers_and_requests(messages: &[Value], id: i64) -> (Vec<&Value>, Vec<&Value>) {
    let answers = messages
        .iter()
        .filter(|m| m.get("method").is_none() && m["id"] == id)
        .collect();
    let requests = messages
        .iter()
        .filter(|m| m.get("method").is_some() && m.get("id").is_some())
        .collect();
    (answers, requests)
}

/// A client without a session (rmcp serves it through a one-shot transport)
/// cannot answer a request of the server's: rmcp takes no answer without a
/// session. So the proxy never sends it one; the server's request gets an
/// error at once instead of waiting forever, and the client's call gets its
/// one answer. With 2026-07-28 metadata, and with an older version's
/// metadata (which rmcp also serves without a session, and whose peer it
/// would let be sent requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_session_is_not_sent_the_servers_requests() {
    let proxy = HttpHarness::start().await;
    for version in ["2026-07-28", "2025-06-18"] {
        let messages = bounded(
            "a sessionless call whose tool asks the client for its roots",
            proxy.call_without_session(version, 1, "ask_roots_detached"),
        )
        .await;
        let (answers, requests) = answers_and_requests(&messages, 1);
        assert!(requests.is_empty(), "{version}: {messages:?}");
        assert_eq!(answers.len(), 1, "{version}: {messages:?}");
        // The tool passes on the error its roots/list got.
        let error = answers[0]["error"]["message"].as_str().unwrap_or_default();
        assert!(
            error.contains("no client is connected to the toolwarden proxy"),
            "{version}: {messages:?}"
        );
    }
    proxy.finish().await;
}

/// Regression (found by running the binary): a request of a server
/// reached over a pipe (stdio) carries no call's id, and went to the
/// session's standalone GET stream, which a client need not open. One
/// without it never saw the request (here `roots/list`), and its call
/// timed out. The session's one call in flight is the request's cause: it
/// rides that call's response stream, as a Streamable HTTP upstream's
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipe_servers_request_rides_the_calls_stream_for_a_client_without_a_get_stream() {
    let proxy = HttpHarness::start().await;
    let mut client = support::KeepAlive::connect(proxy.port).await;
    client.open_session_with(json!({"roots": {}})).await;
    let session = client.session().unwrap();
    let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "ask_roots", "arguments": {}}});
    let (head, mut body) = client.post_for_head(&call).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    body.extend(client.read_for(Duration::from_millis(500)).await);
    let (events, _) = sse_events(&support::dechunk(&String::from_utf8_lossy(&body)));
    let asked: Value = events
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|m| m["method"] == "roots/list")
        .unwrap_or_else(|| panic!("no roots/list on the call's stream: {events:?}"));
    // Answered on another connection of the session, as a client would.
    let mut answering = support::KeepAlive::connect(proxy.port)
        .await
        .in_session(session);
    let reply = json!({"jsonrpc": "2.0", "id": asked["id"],
        "result": {"roots": [{"uri": "file:///work", "name": "work"}]}});
    assert!(answering.post(&reply).await.contains("202"));
    let rest = client.read_for(Duration::from_millis(500)).await;
    body.extend(rest);
    let (events, _) = sse_events(&support::dechunk(&String::from_utf8_lossy(&body)));
    let answer: Value = events
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|m| m["id"] == 5)
        .unwrap_or_else(|| panic!("no answer on the call's stream: {events:?}"));
    assert_eq!(text(&answer), "roots: file:///work", "{answer}");
    proxy.finish().await;
}

/// A session's standalone GET stream ends (its last chunk) when the
/// session is closed, here by its `DELETE` sent on another connection, so
/// its client learns at once that it must start a new one. The connection
/// stays open for the client's next request (a hunt took its close, at the
/// header timeout 10 s later, for the stream's end). The read waits up to
/// 5 s for each piece: the stream's end must come before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_get_stream_ends_when_the_session_is_deleted() {
    let proxy = HttpHarness::start().await;
    let mut listening = support::KeepAlive::connect(proxy.port).await;
    listening.open_session().await;
    let session = listening.session().unwrap();
    let (head, _) = listening.get_stream(Duration::from_millis(200)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut ending = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let delete = format!(
        "DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nMcp-Session-Id: {session}\r\n\
         Connection: close\r\n\r\n",
        proxy.port
    );
    ending.write_all(delete.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    bounded("the DELETE's answer", ending.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let rest = listening.read_for(Duration::from_secs(5)).await;
    assert!(
        rest.ends_with(b"0\r\n\r\n"),
        "the GET stream did not end: {}",
        String::from_utf8_lossy(&rest)
    );
    proxy.finish().await;
}

/// A request served without a session (2026-07-28) whose answer is its
/// first message is answered with JSON and a length, on the kept-alive
/// connection: answered as an SSE stream, the Python SDK closed it before
/// reading its end and dropped the connection, so each call opened a new
/// one, and the loop guard (keyed by connection for such clients) never
/// saw a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessionless_answer_is_json_on_the_kept_alive_connection() {
    let proxy = HttpHarness::start().await;
    let mut client = support::KeepAlive::connect(proxy.port).await;
    for id in 1..=3 {
        let (body, headers) =
            support::sessionless_call("2026-07-28", id, "meta_keys", json!({}), json!({}));
        let (status, answer) = client.post_with(&headers, &body).await;
        assert!(status.contains("200"), "{status}: {answer}");
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("not one JSON answer ({e}): {answer}"));
        assert_eq!(answer["id"], id, "{answer}");
        assert!(answer["result"].is_object(), "{answer}");
    }
    proxy.finish().await;
}

/// Each hop negotiates its own protocol: a 2026-07-28 client's per-request
/// envelope (its version, capabilities and identity in `_meta`) describes
/// it to the proxy, not the proxy to the server. Forwarded as it was, a
/// server initialized with the handshake (the Python SDK) refused every
/// sessionless call: "requests carrying the 2026-07-28 envelope are not
/// accepted on it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessionless_clients_envelope_is_not_forwarded_upstream() {
    let proxy = HttpHarness::start().await;
    let messages = bounded(
        "a sessionless call that reports its _meta keys",
        proxy.call_without_session("2026-07-28", 1, "meta_keys"),
    )
    .await;
    let (answers, _) = answers_and_requests(&messages, 1);
    assert_eq!(answers.len(), 1, "{messages:?}");
    let keys = answers[0]["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{messages:?}"));
    assert!(!keys.contains("io.modelcontextprotocol/"), "{keys}");
    assert!(keys.contains("progressToken"), "rmcp's own token: {keys}");
    proxy.finish().await;
}

/// A sessionless call of `echo` (the same arguments each time) on `client`'s
/// kept-alive connection: whether it was refused as a loop, and the answer.
async fn sessionless_echo(client: &mut support::KeepAlive, id: i64) -> (bool, Value) {
    let (body, headers) = support::sessionless_call(
        "2026-07-28",
        id,
        "echo",
        json!({"message": "the same"}),
        json!({}),
    );
    let (status, body) = bounded("a sessionless call", client.post_with(&headers, &body)).await;
    assert!(status.contains("200"), "{status}: {body}");
    let answer: Value = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .find(|data| !data.is_empty())
        .map_or_else(|| serde_json::from_str(&body), serde_json::from_str)
        .unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(answer["id"], json!(id), "{answer}");
    let refused =
        answer["result"]["isError"] == json!(true) && answer["result"].to_string().contains("loop");
    (refused, answer)
}

/// A client without a session (2026-07-28) gets a server of its own for
/// each request; its calls are keyed by their HTTP connection. So the loop
/// guard sees a keep-alive client repeat itself (before: each call was a
/// session of its own, no loop was ever seen, and past the guard's bound
/// of sessions every new one shared one overflow history, where one
/// client's calls counted against another's), and a client on another
/// connection is not refused for the first one's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessionless_calls_on_one_connection_share_a_loop_history_and_no_other_client_sees_it() {
    let proxy = HttpHarness::start_standard().await;
    let mut looping = support::KeepAlive::connect(proxy.port).await;
    let mut refused_at = None;
    for id in 1..=20 {
        let (refused, answer) = sessionless_echo(&mut looping, id).await;
        if refused {
            refused_at = Some((id, answer));
            break;
        }
    }
    let (id, answer) = refused_at.expect("the repeated call was refused as a loop");
    assert_eq!(id, 9, "refused past the default max_repeats (8): {answer}");
    let mut other = support::KeepAlive::connect(proxy.port).await;
    let (refused, answer) = sessionless_echo(&mut other, 100).await;
    assert!(
        !refused,
        "another connection's client is not refused: {answer}"
    );
    proxy.finish().await;
}

/// The data of each event of an SSE answer, in order (a priming event's
/// is empty), and whether the first event is a priming one: an ID, no
/// data.
fn sse_events(body: &str) -> (Vec<String>, bool) {
    let data_of = |event: &str| {
        event
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .collect();
    let primed = events.first().is_some_and(|event| {
        event.lines().any(|line| line.starts_with("id:")) && data_of(event).is_empty()
    });
    (events.iter().map(|event| data_of(event)).collect(), primed)
}

/// A 2025-06-18 client is not sent SSE priming events, which its version
/// does not know (an event with empty data; rmcp sends one on every
/// stream, the TypeScript SDK only to 2025-11-25 clients). Its answer is
/// the stream's one event, with its ID; and a quick answer leaves with
/// the response's headers (issue 17: one write for the client, not two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2025_06_18_client_is_sent_its_answer_without_a_priming_event() {
    let proxy = HttpHarness::start().await;
    let mut client = support::KeepAlive::connect(proxy.port).await;
    client.open_session().await;
    for id in 1..=3 {
        let (status, body) = bounded(
            "a call of a 2025-06-18 client",
            client.post_with(
                &[],
                &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"message": id.to_string()}}}),
            ),
        )
        .await;
        assert!(status.contains("200"), "{status}");
        let (data, primed) = sse_events(&body);
        assert!(!primed, "{body}");
        assert_eq!(data.len(), 1, "one event, the answer: {body}");
        let answer: Value = serde_json::from_str(&data[0]).unwrap();
        assert_eq!(answer["id"], id, "{body}");
        assert_eq!(text(&answer), format!("Echo: {id}"), "{body}");
        assert!(
            body.contains("id: "),
            "the answer keeps its event ID: {body}"
        );
    }
    proxy.finish().await;
}

/// A 2025-11-25 client still gets its priming event first, as the
/// specification says a server should send it, then its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2025_11_25_client_is_sent_a_priming_event_then_its_answer() {
    let proxy = HttpHarness::start().await;
    let mut client = support::KeepAlive::connect(proxy.port)
        .await
        .with_version("2025-11-25");
    client.open_session().await;
    let (status, body) = bounded(
        "a call of a 2025-11-25 client",
        client.post_with(
            &[],
            &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"message": "primed"}}}),
        ),
    )
    .await;
    assert!(status.contains("200"), "{status}");
    let (data, primed) = sse_events(&body);
    assert!(primed, "{body}");
    assert_eq!(data.len(), 2, "the priming event, then the answer: {body}");
    let answer: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(text(&answer), "Echo: primed", "{body}");
    proxy.finish().await;
}

/// The streams rmcp builds itself, the answer to `initialize` and the GET
/// stream, start with a priming event only for a 2025-11-25 client (an
/// older one cannot read its empty data: the TypeScript SDK's client
/// fails on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initialize_answer_and_the_get_stream_are_primed_for_2025_11_25_clients_only() {
    let proxy = HttpHarness::start().await;
    for (version, primes) in [("2025-06-18", false), ("2025-11-25", true)] {
        let mut client = support::KeepAlive::connect(proxy.port)
            .await
            .with_version(version);
        let body = bounded("initialize", client.open_session()).await;
        let (data, primed) = sse_events(&body);
        assert_eq!(primed, primes, "{version}: {body}");
        let answer: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(answer["result"]["protocolVersion"], version, "{body}");
        // The GET stream carries nothing yet but what the proxy adds.
        let (head, stream) = bounded(
            "the GET stream",
            client.get_stream(Duration::from_millis(300)),
        )
        .await;
        assert!(head.starts_with("http/1.1 200"), "{version}: {head}");
        let stream = String::from_utf8_lossy(&stream);
        assert_eq!(
            stream.contains("data:"),
            primes,
            "{version}: a priming event, or nothing: {stream}"
        );
    }
    proxy.finish().await;
}

/// A session holds one standalone GET stream: rmcp served another as a
/// "shadow" sent nothing (a replacement opened early stayed deaf after the
/// first ended) and kept up to 32, so one client with a few sessions held
/// every connection the proxy serves. A second is refused `409`; once the
/// first has ended, a new one is served and gets the server's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_one_get_stream() {
    let proxy = HttpHarness::start().await;
    let mut first = support::KeepAlive::connect(proxy.port).await;
    bounded("a session", first.open_session()).await;
    let session = first.session().unwrap();
    // A GET stream of the session on a connection of its own: the
    // connection (held open), the answer's head and what came in 100 ms.
    let get = |session: String| async move {
        let mut client = support::KeepAlive::connect(proxy.port)
            .await
            .in_session(session);
        let (head, body) = client.get_stream(Duration::from_millis(100)).await;
        (client, head, body)
    };
    let (stream, head, _) = bounded("a GET stream", get(session.clone())).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (second, head, body) = bounded("a second GET stream", get(session.clone())).await;
    assert!(head.starts_with("http/1.1 409"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("GET stream is open already"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // Another session has its own.
    let mut other = support::KeepAlive::connect(proxy.port).await;
    bounded("another session", other.open_session()).await;
    let (head, _) = bounded(
        "its GET stream",
        other.get_stream(Duration::from_millis(100)),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Closed: a new one is served, once the proxy sees the first gone.
    drop(stream);
    let reopened = support::eventually(LIMIT, || {
        let opened = get(session.clone());
        async move {
            let (client, head, _) = opened.await;
            head.starts_with("http/1.1 200").then_some(client)
        }
    })
    .await;
    let mut reopened = reopened.expect("no room after the stream closed");
    // And it is the one the server's messages go to (a shadow got none):
    // a tool that notifies the tools' list changed, called in the session.
    first
        .post(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "ask_roots", "arguments": {}}}))
        .await;
    let seen =
        String::from_utf8_lossy(&reopened.read_for(Duration::from_millis(500)).await).into_owned();
    assert!(seen.contains("list_changed"), "the new stream got: {seen}");
    drop((second, other, first));
    proxy.finish().await;
}

/// A client resuming a call's stream with `Last-Event-ID` gets the events
/// after that one, not that one again (rmcp replays from it: a progress
/// value twice, where progress must increase).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_starts_after_the_last_event_the_client_has() {
    let proxy = HttpHarness::start().await;
    let mut client = support::KeepAlive::connect(proxy.port).await;
    client.open_session().await;
    let (_, mut raw) = bounded(
        "the head of a call with progress",
        client.post_for_head(&json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "steps_then_wait", "arguments": {}, "_meta": {"progressToken": "p"}}})),
    )
    .await;
    raw.extend(client.read_for(Duration::from_millis(300)).await);
    let raw = String::from_utf8_lossy(&raw);
    // Each progress event's ID and value, in order.
    let events: Vec<(String, f64)> = raw
        .split("\n\n")
        .filter_map(|event| {
            let id = event.lines().find_map(|l| l.strip_prefix("id:"))?.trim();
            let data = event.lines().find_map(|l| l.strip_prefix("data:"))?.trim();
            let message: Value = serde_json::from_str(data).ok()?;
            Some((id.to_owned(), message["params"]["progress"].as_f64()?))
        })
        .collect();
    let values: Vec<f64> = events.iter().map(|(_, v)| *v).collect();
    assert_eq!(values, [1.0, 2.0, 3.0], "{raw}");
    // The connection breaks after progress 2; the client resumes from it.
    let session = client.session().unwrap();
    drop(client);
    let mut again = support::KeepAlive::connect(proxy.port)
        .await
        .in_session(session);
    let (head, replay) = bounded(
        "the resumed stream",
        again.get_stream_with(
            &[("Last-Event-ID", &events[1].0)],
            Duration::from_millis(300),
        ),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let replay = String::from_utf8_lossy(&replay);
    let progress: Vec<f64> = replay
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .filter_map(|m| m["params"]["progress"].as_f64())
        .collect();
    assert_eq!(progress, [3.0], "the events after progress 2: {replay}");
    proxy.finish().await;
}

/// The headers of an answer that does not come wait for it only a
/// moment (100 ms): a call that hangs still gets its response's head
/// (and so its keep-alive pings), with no event in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_left_unanswered_still_gets_its_headers() {
    let proxy = HttpHarness::start().await;
    let mut client = support::KeepAlive::connect(proxy.port).await;
    client.open_session().await;
    let (head, rest) = bounded(
        "the head of an answer that never comes",
        client.post_for_head(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                    "params": {"name": "hang", "arguments": {}}})),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("data:"),
        "no event, not even a priming one: {rest}"
    );
    proxy.finish().await;
}

/// A request the server makes while handling a sessionless client's call
/// is that client's: it cannot answer it (rmcp takes no answer without a
/// session), and it is never sent to a session of another client instead.
/// The server gets an error; the session is asked nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessionless_clients_call_never_sends_the_servers_requests_to_a_session() {
    let proxy = HttpHarness::start().await;
    let recorder = RecordingClient::new("file:///session");
    let client = proxy.session(recorder.clone()).await;
    for (id, version) in [(1, "2026-07-28"), (2, "2025-06-18")] {
        let messages = bounded(
            "a sessionless call whose tool asks a client for its roots",
            proxy.call_without_session(version, id, "ask_roots_detached"),
        )
        .await;
        let (answers, requests) = answers_and_requests(&messages, id);
        assert!(requests.is_empty(), "{version}: {messages:?}");
        assert_eq!(answers.len(), 1, "{version}: {messages:?}");
        let error = answers[0]["error"]["message"].as_str().unwrap_or_default();
        assert!(
            error.contains("no client session for this request"),
            "{version}: {messages:?}"
        );
    }
    assert_eq!(
        recorder.asked(),
        0,
        "the session was sent another's request"
    );
    bounded("closing the HTTP session", client.cancel())
        .await
        .unwrap();
    proxy.finish().await;
}

/// A client with a session that never answers the server's `roots/list`;
/// it says on `asked` when it got one.
#[derive(Clone)]
struct SilentClient {
    asked: tokio::sync::mpsc::UnboundedSender<()>,
}

#[allow(deprecated)] // roots/list: deprecated by SEP-2577, still forwarded by the proxy
impl rmcp::ClientHandler for SilentClient {
    fn get_info(&self) -> ClientConfig {
        InitializeRequestParams::new(
            ClientCapabilities::builder().enable_roots().build(),
            rmcp::model::Implementation::new("silent-client", "1.0"),
        )
        .with_protocol_version(ProtocolVersion::V_2025_06_18)
    }

    async fn list_roots(
        &self,
        _context: RequestContext<RoleClient>,
    ) -> Result<rmcp::model::ListRootsResult, ErrorData> {
        let _ = self.asked.send(());
        std::future::pending().await
    }
}

/// A request of the server's sent to a client whose session then ends
/// unanswered gets an error when it ends: the server is not left waiting on
/// a transport that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_request_to_a_client_that_goes_away_gets_an_error() {
    let proxy = HttpHarness::start().await;
    let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel();
    let client = proxy.session(SilentClient { asked: asked_tx }).await;
    let call = tokio::spawn(call_text(client.peer().clone(), "ask_roots"));
    bounded("the client being asked for its roots", asked.recv())
        .await
        .expect("the client is asked for its roots");
    bounded("closing the HTTP session", client.cancel())
        .await
        .unwrap();
    let errors = bounded("the server's roots/list getting an error", async {
        loop {
            let errors = proxy.server.roots_errors.lock().unwrap().clone();
            if !errors.is_empty() {
                break errors;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .message
            .contains("the client behind the toolwarden proxy did not answer"),
        "{errors:?}"
    );
    call.abort();
    proxy.finish().await;
}

/// A client over Streamable HTTP answering the server's `roots/list` the
/// way a busy client does: [`CLIENT_STEPS`] progress notifications under the
/// request's token, each sent once the previous one was accepted, then the
/// answer.
#[derive(Clone)]
struct ProgressingClient;

#[allow(deprecated)] // roots/list: deprecated by SEP-2577, still forwarded by the proxy
impl rmcp::ClientHandler for ProgressingClient {
    fn get_info(&self) -> ClientConfig {
        InitializeRequestParams::new(
            ClientCapabilities::builder().enable_roots().build(),
            rmcp::model::Implementation::new("progressing-client", "1.0"),
        )
        .with_protocol_version(ProtocolVersion::V_2025_06_18)
    }

    async fn list_roots(
        &self,
        context: RequestContext<RoleClient>,
    ) -> Result<rmcp::model::ListRootsResult, ErrorData> {
        let token = context
            .meta
            .get_progress_token()
            .ok_or_else(|| ErrorData::invalid_params("no progress token", None))?;
        for step in 1..=CLIENT_STEPS {
            let params = ProgressNotificationParam::new(token.clone(), step as f64);
            context
                .peer
                .notify_progress(params)
                .await
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        }
        Ok(rmcp::model::ListRootsResult::new(vec![
            rmcp::model::Root::new("file:///work"),
        ]))
    }
}

/// Calls `roots_progress` through `peer`: the progress values the server
/// read on its request to a client before that client's answer, in order,
/// comma-separated.
async fn roots_progress(peer: Peer<RoleClient>) -> String {
    let mut params = CallToolRequestParams::new("roots_progress");
    params.arguments = Some(Default::default());
    match bounded("roots_progress", peer.call_tool_once(params))
        .await
        .unwrap()
    {
        CallToolResponse::Complete(result) => {
            text(&json!({"result": serde_json::to_value(&result).unwrap()}))
        }
        other => panic!("{other:?}"),
    }
}

/// The same over Streamable HTTP: the proxy's HTTP sessions count the
/// client's progress as they read it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_the_clients_progress_reaches_the_server_before_its_answer() {
    let proxy = HttpHarness::start().await;
    let client = proxy.session(ProgressingClient).await;
    let expected = one_to(CLIENT_STEPS)
        .iter()
        .map(f64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let call = || roots_progress(client.peer().clone());
    for n in 1..=30 {
        assert_eq!(call().await, expected, "call {n}");
    }
    for round in 0..5 {
        let answers = futures::future::join_all((0..8).map(|_| call())).await;
        for answer in answers {
            assert_eq!(answer, expected, "round {round}");
        }
    }
    bounded("closing the HTTP session", client.cancel())
        .await
        .unwrap();
    proxy.finish().await;
}

/// A client over Streamable HTTP that, asked for its roots, reports the
/// request's progress token on `asked`, waits for `go`, then sends
/// [`CLIENT_STEPS`] progress notifications valued `base + 1`, `base + 2`,
/// ..., each once the previous one was accepted, and answers.
#[derive(Clone)]
struct HeldClient {
    base: f64,
    asked: tokio::sync::mpsc::UnboundedSender<ProgressToken>,
    go: tokio::sync::watch::Receiver<bool>,
}

#[allow(deprecated)] // roots/list: deprecated by SEP-2577, still forwarded by the proxy
impl rmcp::ClientHandler for HeldClient {
    fn get_info(&self) -> ClientConfig {
        InitializeRequestParams::new(
            ClientCapabilities::builder().enable_roots().build(),
            rmcp::model::Implementation::new("held-client", "1.0"),
        )
        .with_protocol_version(ProtocolVersion::V_2025_06_18)
    }

    async fn list_roots(
        &self,
        context: RequestContext<RoleClient>,
    ) -> Result<rmcp::model::ListRootsResult, ErrorData> {
        let token = context
            .meta
            .get_progress_token()
            .ok_or_else(|| ErrorData::invalid_params("no progress token", None))?;
        let _ = self.asked.send(token.clone());
        let _ = self.go.clone().wait_for(|go| *go).await;
        for step in 1..=CLIENT_STEPS {
            let params = ProgressNotificationParam::new(token.clone(), self.base + step as f64);
            context
                .peer
                .notify_progress(params)
                .await
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        }
        Ok(rmcp::model::ListRootsResult::new(vec![
            rmcp::model::Root::new("file:///work"),
        ]))
    }
}

/// Two HTTP sessions, each with a request of the server's in flight under
/// the same progress token (rmcp numbers the tokens of each session's peer
/// from 0), both sending progress on it at once: the server reads each
/// session's progress, all of it, on its own request and before that
/// session's answer; none of it crosses over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_sessions_using_the_same_token_keep_their_progress_apart() {
    // Over HTTP the upstream says which call each of its requests is for:
    // over a pipe, two sessions with calls in flight would make it unclear.
    let proxy = HttpHarness::start_with(UpstreamKind::Http).await;
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let (asked_tx, mut asked_a) = tokio::sync::mpsc::unbounded_channel();
    let a = proxy
        .session(HeldClient {
            base: 0.0,
            asked: asked_tx,
            go: go.clone(),
        })
        .await;
    let (asked_tx, mut asked_b) = tokio::sync::mpsc::unbounded_channel();
    let b = proxy
        .session(HeldClient {
            base: 100.0,
            asked: asked_tx,
            go,
        })
        .await;
    let values = |base: f64| {
        one_to(CLIENT_STEPS)
            .iter()
            .map(|step| (base + step).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    for round in 0..3 {
        go_tx.send_replace(false);
        // The server's request goes to the session whose call it is for:
        // a's call is asked of a; while a holds it, b's call is asked of b.
        let call_a = tokio::spawn(roots_progress(a.peer().clone()));
        let token_a = bounded("a being asked", asked_a.recv()).await.unwrap();
        let call_b = tokio::spawn(roots_progress(b.peer().clone()));
        let token_b = bounded("b being asked", asked_b.recv()).await.unwrap();
        assert_eq!(token_a, token_b, "round {round}: the tokens collide");
        go_tx.send_replace(true);
        let answer_a = bounded("a's call", call_a).await.unwrap();
        let answer_b = bounded("b's call", call_b).await.unwrap();
        assert_eq!(answer_a, values(0.0), "round {round}: a's progress");
        assert_eq!(answer_b, values(100.0), "round {round}: b's progress");
    }
    proxy.finish_with([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancel_cancels_upstream() {
    let mut h = harness();
    h.initialize().await;
    h.send(json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "slow", "arguments": {}}}))
        .await;
    let started = async {
        while h.server.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    bounded("the slow call reaching the server", started).await;
    h.send(
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9}}),
    )
    .await;
    let seen = async {
        while h.server.cancelled.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    bounded("the server seeing the cancellation", seen).await;
    // The session goes on.
    assert_eq!(
        text(&h.call(10, "echo", json!({"message": "next"})).await),
        "Echo: next"
    );
    h.finish().await;
}

/// stdin ends while a call hangs past rmcp's 5 s drain, with a cancelled
/// call and an answered one beside it: the hanging call is answered once,
/// by the proxy, and nothing else is (rmcp's drain used to end the
/// session with the call unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_at_the_end_of_input_is_answered_once() {
    let mut h = harness();
    h.initialize().await;
    for (id, tool) in [(21, "hang"), (22, "slow")] {
        h.send(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": {}}}))
            .await;
    }
    let started = async {
        while h.server.calls.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    bounded("both calls reaching the server", started).await;
    // A cancelled request is not answered (the client said so).
    h.send(
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 22}}),
    )
    .await;
    assert_eq!(
        text(&h.call(23, "echo", json!({"message": "x"})).await),
        "Echo: x"
    );
    h.input.shutdown().await.unwrap();
    let mut answers = Vec::new();
    while let Some(line) = bounded("the proxy's output", h.output.next_line())
        .await
        .unwrap()
    {
        let message: Value = serde_json::from_str(&line).unwrap();
        if message.get("id").is_some() {
            answers.push(message);
        }
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["id"], 21, "{answers:?}");
    assert_eq!(answers[0]["error"]["code"], -32000, "{answers:?}");
    let serving = h.serving.take().unwrap();
    bounded("serve_stdio after the end of input", serving)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_crash_answers_calls_in_flight_and_the_upstream_comes_back() {
    let mut h = harness();
    h.initialize().await;
    h.send(json!({"jsonrpc": "2.0", "id": 11, "method": "tools/call", "params": {"name": "hang", "arguments": {}}}))
        .await;
    let started = async {
        while h.server.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    bounded("the hanging call reaching the server", started).await;
    // The server goes away without answering (rmcp closes its end of the
    // pipe after its 2 s drain, as a dying child closes its stdout).
    h.kill_server();
    let (answer, _) = h.response(json!(11)).await;
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let message = text(&answer);
    assert!(message.contains("hang failed"), "{message}");
    assert_eq!(
        answer["result"]["structuredContent"]["toolwarden"]["class"], "transient",
        "{answer}"
    );

    // Calls while it is down fail fast (a readable result), then work again.
    let mut id = 100;
    let back = async {
        loop {
            id += 1;
            let r = h.call(id, "echo", json!({"message": "back"})).await;
            if text(&r) == "Echo: back" {
                return;
            }
            assert_eq!(r["result"]["isError"], true, "{r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    bounded("the upstream coming back", back).await;
    assert!(h.upstream.restarts() >= 1);
    assert!(
        matches!(h.upstream.status(), UpstreamStatus::Up { generation, .. } if generation >= 2)
    );
    h.finish().await;
}

/// A second `initialize` in a session is refused (-32600): it was answered
/// with the first one's result, nothing renegotiated. The session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_initialize_in_a_session_is_refused() {
    let mut h = harness();
    h.initialize().await;
    let again = h
        .request(
            99,
            "initialize",
            json!({"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
        )
        .await;
    assert_eq!(again["error"]["code"], -32600, "{again}");
    assert_eq!(
        text(&h.call(100, "echo", json!({"message": "still"})).await),
        "Echo: still"
    );
    h.finish().await;
}

/// A request with the id of one still in flight is answered -32600 at once
/// (rmcp answered only one of the two), and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_the_id_of_one_in_flight_is_refused_over_stdio() {
    let mut h = harness();
    h.initialize().await;
    h.send(json!({"jsonrpc": "2.0", "id": 41, "method": "tools/call",
        "params": {"name": "slow", "arguments": {}}}))
        .await;
    h.send(json!({"jsonrpc": "2.0", "id": 41, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "twice"}}}))
        .await;
    let (refused, _) = h.response(json!(41)).await;
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    h.send(
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41}}),
    )
    .await;
    assert_eq!(
        text(&h.call(42, "echo", json!({"message": "again"})).await),
        "Echo: again"
    );
    h.finish().await;
}

/// A server restarted with other tools: the client is told to list them
/// again (`notifications/tools/list_changed`); a restart with the same
/// tools tells it nothing. (Its list came from the server before; no
/// server announces what it had before it started.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_other_tools_tells_the_client_its_list_changed() {
    let mut h = harness();
    h.initialize().await;
    let listed = async {
        while h.catalog.get("echo").is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    bounded("the first tools/list", listed).await;
    let is_change = |m: &Value| m["method"] == "notifications/tools/list_changed";
    let mut id = 300;
    for lists_added in [false, true] {
        h.server.lists_added.store(lists_added, Ordering::SeqCst);
        let version = h.catalog.version();
        h.kill_server();
        let refreshed = async {
            while h.catalog.version() == version {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        bounded("the tools/list after the restart", refreshed).await;
        assert_eq!(h.catalog.get("added").is_some(), lists_added);
        if lists_added {
            let told = async { while !is_change(&h.recv().await) {} };
            bounded("notifications/tools/list_changed", told).await;
        } else {
            // Whatever a refresh would announce is queued by now.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A call answered after the refresh: no other announcement before it.
        let notes = loop {
            id += 1;
            h.send(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"message": "up"}}}))
                .await;
            let (answer, notes) = h.response(json!(id)).await;
            if text(&answer) == "Echo: up" {
                break notes;
            }
        };
        assert!(
            !notes.iter().any(is_change),
            "restart listing added: {lists_added}: {notes:?}"
        );
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_by_the_stack_are_tool_results_a_model_can_read() {
    // A stack that refuses every call, as an open circuit breaker would.
    let stack = ToolStack::new(tower::service_fn(
        |_req: rmcp::model::ClientRequest| async {
            Err::<rmcp::model::ServerResult, BoxError>(Box::new(CircuitOpen::new(
                "echo",
                Duration::from_secs(12),
            )))
        },
    ));
    let mut h = harness_with(
        |h| target(h.server.clone(), Arc::clone(&h.server_tasks)),
        Some(stack),
    );
    h.initialize().await;
    let refused = h.call(1, "echo", json!({"message": "x"})).await;
    assert_eq!(refused["result"]["isError"], true, "{refused}");
    assert!(text(&refused).contains("retry after 12 s"), "{refused}");
    let facts = &refused["result"]["structuredContent"]["toolwarden"];
    assert_eq!(facts["layer"], "circuit_breaker");
    assert_eq!(facts["retryAfterSeconds"], 12.0);
    assert_eq!(
        h.server.calls.load(Ordering::SeqCst),
        0,
        "the refused call never reached the server"
    );
    // Other requests do not go through the stack.
    let tools = h.request(2, "tools/list", json!({})).await;
    assert!(tools["result"]["tools"].is_array(), "{tools}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_cannot_start_fails_initialize_and_the_client_can_retry() {
    let target = |_: &Harness0| UpstreamTarget::Command {
        program: "/nonexistent/mcp-server".into(),
        args: vec![],
    };
    let mut h = harness_with(target, None);
    for attempt in 0..2 {
        let init = h
            .request(
                attempt,
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
            )
            .await;
        assert_eq!(init["error"]["code"], -32000, "{init}");
        let message = init["error"]["message"].as_str().unwrap();
        assert!(message.contains("upstream unavailable"), "{message}");
        // The details (which may quote a URL or a command) are in the log only.
        assert!(message.contains("see the proxy's log"), "{message}");
        assert!(!message.contains("/nonexistent/mcp-server"), "{message}");
    }
    h.finish().await;
}

/// A client that did not declare `roots` is never sent `roots/list`: the
/// server gets -32601 at once, as the client would answer (with one
/// upstream session for every client, the server saw another client's
/// capabilities).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_request_for_a_capability_the_client_lacks_is_refused_for_it() {
    let mut h = harness();
    h.initialize().await; // capabilities: {}
    h.send(json!({"jsonrpc": "2.0", "id": 31, "method": "tools/call",
        "params": {"name": "ask_roots", "arguments": {}}}))
        .await;
    let answer = loop {
        let message = h.recv().await;
        assert_ne!(message["method"], "roots/list", "{message}");
        if message["id"] == 31 && message.get("method").is_none() {
            break message;
        }
    };
    let errors = h.server.roots_errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1, "{errors:?} {answer}");
    assert_eq!(errors[0].code, ErrorCode::METHOD_NOT_FOUND, "{errors:?}");
    assert!(errors[0].message.contains("roots"), "{errors:?}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_requests_and_notifications_reach_the_client() {
    let mut h = harness();
    let init = h
        .request(
            0,
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {"roots": {}}, "clientInfo": {"name": "t", "version": "0"}}),
        )
        .await;
    assert!(init.get("result").is_some(), "{init}");
    h.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    h.send(json!({"jsonrpc": "2.0", "id": 30, "method": "tools/call", "params": {"name": "ask_roots", "arguments": {}}}))
        .await;
    let mut saw_list_changed = false;
    let answer = loop {
        let message = h.recv().await;
        match message["method"].as_str() {
            Some("notifications/tools/list_changed") => saw_list_changed = true,
            Some("roots/list") => {
                let reply = json!({"jsonrpc": "2.0", "id": message["id"], "result": {"roots": [{"uri": "file:///work", "name": "work"}]}});
                h.send(reply).await;
            }
            Some(other) => panic!("unexpected {other}: {message}"),
            None if message["id"] == 30 => break message,
            None => panic!("unexpected {message}"),
        }
    };
    assert_eq!(text(&answer), "roots: file:///work", "{answer}");
    assert!(
        saw_list_changed,
        "the server's notification was not forwarded"
    );
    h.finish().await;
}

/// A client with a session that answers the server's `roots/list` with its
/// own root, and records what the proxy sends it: how often it was asked,
/// and every progress notification.
#[derive(Clone)]
struct RecordingClient {
    root: &'static str,
    asked: Arc<AtomicUsize>,
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
    /// The ids of the tasks it was told the status of.
    task_statuses: Arc<Mutex<Vec<String>>>,
}

impl RecordingClient {
    fn new(root: &'static str) -> Self {
        RecordingClient {
            root,
            asked: Arc::default(),
            progress: Arc::default(),
            task_statuses: Arc::default(),
        }
    }

    fn task_statuses(&self) -> Vec<String> {
        self.task_statuses.lock().unwrap().clone()
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }

    fn progress(&self) -> Vec<f64> {
        self.progress
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.progress)
            .collect()
    }
}

#[allow(deprecated)] // roots/list: deprecated by SEP-2577, still forwarded by the proxy
impl rmcp::ClientHandler for RecordingClient {
    fn get_info(&self) -> ClientConfig {
        InitializeRequestParams::new(
            ClientCapabilities::builder()
                .enable_roots()
                .enable_tasks()
                .build(),
            rmcp::model::Implementation::new("recording-client", "1.0"),
        )
        .with_protocol_version(ProtocolVersion::V_2025_06_18)
    }

    async fn list_roots(
        &self,
        _context: RequestContext<RoleClient>,
    ) -> Result<rmcp::model::ListRootsResult, ErrorData> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Ok(rmcp::model::ListRootsResult::new(vec![
            rmcp::model::Root::new(self.root),
        ]))
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }

    async fn on_task_status(
        &self,
        params: rmcp::model::TaskStatusNotificationParams,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.task_statuses
            .lock()
            .unwrap()
            .push(params.task.task.task_id);
    }
}

/// Calls `tool` through `peer` (rmcp gives the call a progress token): the
/// text of its result, or the error.
async fn call_text(peer: Peer<RoleClient>, tool: &str) -> Result<String, String> {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = Some(Default::default());
    match peer.call_tool(params).await {
        Ok(result) => Ok(text(
            &json!({"result": serde_json::to_value(&result).unwrap()}),
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Pings through `peer` every few milliseconds until `stop`: the client
/// that does is the most recently active one nearly all the time. How many
/// pings it sent.
fn ping_constantly(peer: Peer<RoleClient>, stop: CancellationToken) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut pings = 0;
        while !stop.is_cancelled() {
            let ping = rmcp::model::ClientRequest::PingRequest(rmcp::model::PingRequest {
                method: Default::default(),
                extensions: Default::default(),
            });
            peer.send_request(ping).await.expect("a ping answered");
            pings += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        pings
    })
}

/// Waits until `pinger` has pinged a few times more.
async fn let_it_ping() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A request the server makes while handling one session's call reaches
/// that session only, even while another session pings all the time (the
/// most recently active one) — over a pipe, where it is the one session with
/// a call in flight, and over HTTP, where the other session has a call in
/// flight too and the server's request comes on the call's response stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_request_reaches_only_the_session_whose_call_caused_it() {
    for kind in [UpstreamKind::Pipe, UpstreamKind::Http] {
        let proxy = HttpHarness::start_with(kind).await;
        let a_client = RecordingClient::new("file:///a");
        let a = proxy.session(a_client.clone()).await;
        let b_client = RecordingClient::new("file:///b");
        let b = proxy.session(b_client.clone()).await;
        let stop = CancellationToken::new();
        let pinger = ping_constantly(b.peer().clone(), stop.clone());
        let b_call = matches!(kind, UpstreamKind::Http)
            .then(|| tokio::spawn(call_text(b.peer().clone(), "slow")));
        let_it_ping().await;
        for n in 0..5 {
            let answer = bounded("a's call", call_text(a.peer().clone(), "ask_roots")).await;
            assert_eq!(
                answer.as_deref(),
                Ok("roots: file:///a"),
                "{kind:?}, call {n}"
            );
        }
        stop.cancel();
        let pings = bounded("the pings", pinger).await.unwrap();
        assert!(pings > 5, "{kind:?}: only {pings} pings");
        assert_eq!(a_client.asked(), 5, "{kind:?}");
        assert_eq!(b_client.asked(), 0, "{kind:?}: b was sent a's requests");
        if let Some(call) = b_call {
            call.abort();
        }
        // Every request forwarded is forgotten once it ended.
        bounded("the requests in flight being forgotten", async {
            while proxy.downstreams.causes_tracked() != (0, 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        proxy.finish_with([a, b]).await;
    }
}

/// The server's progress on one session's call reaches that session, and
/// is not seen by another one, pinging and calling meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_progress_is_not_seen_by_another_session() {
    for kind in [UpstreamKind::Pipe, UpstreamKind::Http] {
        let proxy = HttpHarness::start_with(kind).await;
        let a_client = RecordingClient::new("file:///a");
        let a = proxy.session(a_client.clone()).await;
        let b_client = RecordingClient::new("file:///b");
        let b = proxy.session(b_client.clone()).await;
        let stop = CancellationToken::new();
        let pinger = ping_constantly(b.peer().clone(), stop.clone());
        let_it_ping().await;
        for _ in 0..3 {
            let (answer, echo) = bounded("the calls", async {
                tokio::join!(
                    call_text(a.peer().clone(), "steps"),
                    call_text(b.peer().clone(), "echo")
                )
            })
            .await;
            assert_eq!(answer.as_deref(), Ok("done"), "{kind:?}");
            assert_eq!(echo.as_deref(), Ok("Echo: "), "{kind:?}");
        }
        stop.cancel();
        bounded("the pings", pinger).await.unwrap();
        // rmcp hands each notification to the client's handler in a task
        // of its own: give the last ones a moment.
        bounded("a's progress", async {
            while a_client.progress().len() < 9 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a_client.progress().len(), 9, "{kind:?}");
        assert_eq!(
            b_client.progress(),
            Vec::<f64>::new(),
            "{kind:?}: b saw a's progress"
        );
        proxy.finish_with([a, b]).await;
    }
}

/// A request of the server's that no call can be found for — made from a
/// task of the server's own (over HTTP it comes on the standalone stream)
/// while two sessions have calls in flight — is sent to no client: the
/// server gets `-32603 no client session for this request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_request_with_no_identifiable_cause_gets_an_error() {
    for kind in [UpstreamKind::Pipe, UpstreamKind::Http] {
        let proxy = HttpHarness::start_with(kind).await;
        let a_client = RecordingClient::new("file:///a");
        let a = proxy.session(a_client.clone()).await;
        let b_client = RecordingClient::new("file:///b");
        let b = proxy.session(b_client.clone()).await;
        let b_call = tokio::spawn(call_text(b.peer().clone(), "slow"));
        bounded("b's call reaching the server", async {
            while proxy.server.calls.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let answer = bounded(
            "a's call",
            call_text(a.peer().clone(), "ask_roots_detached"),
        )
        .await;
        let error = answer.expect_err("the server's request was answered");
        assert!(
            error.contains("no client session for this request"),
            "{kind:?}: {error}"
        );
        assert_eq!(a_client.asked() + b_client.asked(), 0, "{kind:?}");
        b_call.abort();
        proxy.finish_with([a, b]).await;
    }
}

/// The status of a task the server created for one session's call reaches
/// that session only; another one, pinging meanwhile, is not told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_status_reaches_only_the_session_whose_call_created_it() {
    let proxy = HttpHarness::start().await;
    let a_client = RecordingClient::new("file:///a");
    let a = proxy.session(a_client.clone()).await;
    let b_client = RecordingClient::new("file:///b");
    let b = proxy.session(b_client.clone()).await;
    let stop = CancellationToken::new();
    let pinger = ping_constantly(b.peer().clone(), stop.clone());
    let_it_ping().await;
    let mut params = CallToolRequestParams::new("task");
    params.arguments = json!({"message": "a"}).as_object().cloned();
    let created = bounded("a's call", a.peer().call_tool_once(params))
        .await
        .unwrap();
    match created {
        CallToolResponse::Task(task) => assert_eq!(task.task.task_id, "task-a"),
        other => panic!("{other:?}"),
    }
    bounded("a being told the task's status", async {
        while a_client.task_statuses().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    bounded("the pings", pinger).await.unwrap();
    assert_eq!(a_client.task_statuses(), ["task-a"]);
    assert_eq!(
        b_client.task_statuses(),
        Vec::<String>::new(),
        "b was told a's task"
    );
    proxy.finish_with([a, b]).await;
}

/// A task stays its creator's once the server reports it ended (it was
/// forgotten then, and any session could read its result, update it and
/// cancel it), and the task methods rmcp has no model for (`tasks/result`,
/// `tasks/list`, forwarded as they are) are checked the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_stays_its_creators() {
    let proxy = HttpHarness::start().await;
    let a_client = RecordingClient::new("file:///a");
    let a = proxy.session(a_client.clone()).await;
    let b = proxy.session(RecordingClient::new("file:///b")).await;
    let mut params = CallToolRequestParams::new("task");
    params.arguments = json!({"message": "done"}).as_object().cloned();
    let created = bounded("a's call", a.peer().call_tool_once(params))
        .await
        .unwrap();
    assert!(matches!(created, CallToolResponse::Task(_)), "{created:?}");
    bounded("a being told its task completed", async {
        while a_client.task_statuses().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let refused = |result: Result<rmcp::model::ServerResult, rmcp::ServiceError>| match result {
        Err(rmcp::ServiceError::McpError(error)) => {
            assert_eq!(error.code, ErrorCode(-32602), "{error:?}");
            assert!(error.message.contains("unknown task"), "{error:?}");
        }
        other => panic!("b reached a's task: {other:?}"),
    };
    let asked_before = proxy.server.task_requests.lock().unwrap().len();
    refused(
        bounded(
            "b's tasks/get",
            b.peer()
                .send_request(rmcp::model::ClientRequest::GetTaskRequest(
                    rmcp::model::GetTaskRequest::new(rmcp::model::GetTaskParams::new("task-done")),
                )),
        )
        .await,
    );
    refused(
        bounded(
            "b's tasks/result",
            b.peer()
                .send_request(rmcp::model::ClientRequest::CustomRequest(
                    rmcp::model::CustomRequest::new(
                        "tasks/result",
                        Some(json!({"taskId": "task-done"})),
                    ),
                )),
        )
        .await,
    );
    assert_eq!(
        proxy.server.task_requests.lock().unwrap().len(),
        asked_before,
        "the server was never asked"
    );
    // tasks/list shows a session its own and nobody's.
    let list = |peer: rmcp::service::Peer<RoleClient>| async move {
        match peer
            .send_request(rmcp::model::ClientRequest::CustomRequest(
                rmcp::model::CustomRequest::new("tasks/list", Some(json!({}))),
            ))
            .await
        {
            Ok(rmcp::model::ServerResult::CustomResult(r)) => r.0["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["taskId"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        bounded("b's tasks/list", list(b.peer().clone())).await,
        ["task-nobody"]
    );
    assert_eq!(
        bounded("a's tasks/list", list(a.peer().clone())).await,
        ["task-done", "task-nobody"]
    );
    // a still reads its own.
    let own = bounded(
        "a's tasks/get",
        a.peer()
            .send_request(rmcp::model::ClientRequest::GetTaskRequest(
                rmcp::model::GetTaskRequest::new(rmcp::model::GetTaskParams::new("task-done")),
            )),
    )
    .await;
    assert!(own.is_ok(), "{own:?}");
    proxy.finish_with([a, b]).await;
}

/// Over a shared upstream every session's tasks are the one connection's:
/// a session may read and cancel the tasks created for its own calls, and
/// another session asking about them gets the answer for an unknown task,
/// without the server being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cannot_read_or_cancel_another_sessions_task() {
    let proxy = HttpHarness::start().await;
    let a = proxy.session(RecordingClient::new("file:///a")).await;
    let b = proxy.session(RecordingClient::new("file:///b")).await;
    let mut params = CallToolRequestParams::new("task");
    params.arguments = json!({"message": "a"}).as_object().cloned();
    let created = bounded("a's call", a.peer().call_tool_once(params))
        .await
        .unwrap();
    assert!(matches!(created, CallToolResponse::Task(_)), "{created:?}");

    let get = |peer: rmcp::service::Peer<RoleClient>| async move {
        peer.send_request(rmcp::model::ClientRequest::GetTaskRequest(
            rmcp::model::GetTaskRequest::new(rmcp::model::GetTaskParams::new("task-a")),
        ))
        .await
    };
    let foreign = bounded("b's tasks/get", get(b.peer().clone())).await;
    match foreign {
        Err(rmcp::ServiceError::McpError(error)) => {
            assert_eq!(error.code, ErrorCode(-32602), "{error:?}");
            assert!(error.message.contains("unknown task"), "{error:?}");
        }
        other => panic!("b read a's task: {other:?}"),
    }
    let cancel = bounded(
        "b's tasks/cancel",
        b.peer()
            .send_request(rmcp::model::ClientRequest::CancelTaskRequest(
                rmcp::model::CancelTaskRequest::new(rmcp::model::CancelTaskParams::new("task-a")),
            )),
    )
    .await;
    assert!(
        matches!(cancel, Err(rmcp::ServiceError::McpError(ref e)) if e.code == ErrorCode(-32602)),
        "b cancelled a's task: {cancel:?}"
    );
    // The owner may; and only the owner's requests reached the server.
    let own = bounded("a's tasks/get", get(a.peer().clone())).await;
    assert!(own.is_ok(), "{own:?}");
    assert_eq!(
        *proxy.server.task_requests.lock().unwrap(),
        ["get task-a"],
        "the server was asked on b's behalf"
    );
    proxy.finish_with([a, b]).await;
}
