//! The gRPC edge of the tonic example: [`GuardedTools`] serves
//! `toolwarden.mcp.v1.McpTools` by driving the standard stack over a tool
//! handler, and [`status_of`] turns what the stack refused into a gRPC
//! status. Shared with `tests/tonic_service.rs`, so the test checks the code
//! the example runs.
//!
//! # Where the stack sits
//!
//! toolwarden's layers read MCP requests (tool name, arguments, session)
//! through `toolwarden_core::McpRequest`. A layer given to tonic's
//! `Server::builder().layer(..)` sees `http::Request<Body>` (HTTP/2 frames
//! of protobuf, before decoding), so it cannot tell one tool from another.
//! The stack therefore goes where a call is typed: the generated
//! `McpTools::call_tool` turns the protobuf message into a
//! `toolwarden_core::jsonrpc::Request` (`tools/call`) and drives a
//! `tower::Service` built as `StandardStack` over the tool handler (itself
//! any `tower::Service<jsonrpc::Request>`, here a `service_fn`). Everything
//! that is about HTTP/2 (timeouts, concurrency limits, TLS, tracing) stays
//! on tonic's own server builder, as usual ([`serve`] bounds each
//! request's time and each connection's concurrent requests there).
//!
//! The same stack fits the other side too: a `tower::Service<jsonrpc::Request>`
//! that calls a remote `McpTools` with the generated client can be wrapped
//! in it, as `toolwarden::rmcp::RmcpClient` is for rmcp (not shown here).
//! Guarding the server protects the tools from every client at once, which
//! is what this example shows.
//!
//! # The stack at a gRPC edge
//!
//! The stack is built with `render_errors(false)` and the fallback cache's
//! `degrade(false)`: a refusal then reaches the edge as the typed rejection
//! (`RateLimited`, `CircuitOpen`, ...) instead of an `isError` result, and
//! the edge renders it once, as a gRPC status. A rendered `isError` result
//! could not be told apart from a tool's own (a tool can write any text);
//! the typed error can. The message is the same sentence the MCP rendering
//! gives a model (`toolwarden_core::FailureReport`). What `degrade(false)`
//! gives up: the fallback cache's suggestions of other tools to try, which
//! it adds only to the `isError` results it renders. Stale results are
//! served either way.
//!
//! # Status mapping
//!
//! | what happened | gRPC answer | metadata |
//! |---|---|---|
//! | the tool answered | `OK`, `is_error = false` | |
//! | the tool answered `isError: true` (it ran and failed) | `OK`, `is_error = true`: a tool error is not a transport error | |
//! | the tool failed, a stored result was served (fallback cache) | `OK`, `stale = {age_seconds, reason}`, `_meta["toolwarden/stale"]` in `result_json` | |
//! | rate limited (`RateLimited`) | `RESOURCE_EXHAUSTED` | `retry-after-ms`, `grpc-retry-pushback-ms`, `toolwarden-layer: rate_limit` |
//! | circuit open (`CircuitOpen`) | `UNAVAILABLE` | `retry-after-ms`, `grpc-retry-pushback-ms`, `toolwarden-layer: circuit_breaker` |
//! | loop detected (`LoopDetected`) | `FAILED_PRECONDITION`: repeating the call cannot help, the caller must change approach | `toolwarden-layer: loop_guard` |
//! | retry budget spent (`RetryBudgetExhausted`) | `UNAVAILABLE` | `toolwarden-layer: retry` |
//! | attempt timed out | `DEADLINE_EXCEEDED` | |
//! | JSON-RPC error from the handler | by code: -32700, -32600, -32602 → `INVALID_ARGUMENT`; -32601 → `UNIMPLEMENTED`; -32002 → `NOT_FOUND`; -32603 → `INTERNAL`; -32023 → `RESOURCE_EXHAUSTED`; -32000..-32019 → `UNAVAILABLE`; other → `UNKNOWN` | `retry-after-ms` when the error carries a hint |
//! | other handler error | by its class: transient (I/O, connection) → `UNAVAILABLE`; client → `INVALID_ARGUMENT`; else `INTERNAL` | |
//! | `name` empty, `arguments_json` not a JSON object, `mcp-session-id` over 256 bytes | `INVALID_ARGUMENT`, before the stack | |
//!
//! `retry-after-ms` is the layer's own hint, rounded up to whole
//! milliseconds; `grpc-retry-pushback-ms` carries the same value so that a
//! gRPC client with a retry policy (gRFC A6) waits as long by itself.
//!
//! # Sessions
//!
//! The loop guard keeps its history per session: the `mcp-session-id`
//! request metadata when the client sends one (as MCP's Streamable HTTP
//! header), else the client's address (one connection, one session). Its
//! history is bounded by the loop guard's own `bounds`.

#![allow(dead_code)] // the example and the test each use a part

use std::error::Error as StdError;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use toolwarden::stack::{StandardService, StandardStack, StandardStackLayer};
use toolwarden_core::classify::classify_error_chain;
use toolwarden_core::jsonrpc::{ErrorObject, Request, Response};
use toolwarden_core::rejection::find_rejection;
use toolwarden_core::{
    BoxError, Event, Events, FailureClass, FailureReport, McpRequest, OutcomeKind, SessionKey,
    ToolCatalog,
};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::pb::mcp_tools_server::{McpTools, McpToolsServer};
use crate::pb::{
    CallToolRequest, CallToolResponse, Content, ListToolsRequest, ListToolsResponse, Stale, Tool,
};

/// Metadata: the refusing layer's hint, in whole milliseconds (rounded up).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// Metadata: the same hint for gRPC clients' own retry policies (gRFC A6).
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";
/// Metadata: the toolwarden layer that refused (`rate_limit`, ...).
pub const LAYER: &str = "toolwarden-layer";
/// Request metadata naming the caller's session (for the loop guard).
pub const SESSION: &str = "mcp-session-id";
/// The longest `mcp-session-id` accepted.
pub const MAX_SESSION_LEN: usize = 256;

/// A tool handler: any `tower::Service` answering MCP JSON-RPC requests.
pub type ToolHandler = BoxCloneSyncService<Request, Response, BoxError>;

/// `toolwarden.mcp.v1.McpTools` over the standard stack.
#[derive(Clone)]
pub struct GuardedTools {
    stack: StandardService<ToolHandler>,
    next_id: Arc<AtomicI64>,
}

impl GuardedTools {
    /// `tools` behind `stack`.
    pub fn new(stack: &StandardStackLayer, tools: ToolHandler) -> Self {
        GuardedTools {
            stack: stack.layer(tools),
            next_id: Arc::new(AtomicI64::new(1)),
        }
    }

    fn request<T>(
        &self,
        grpc: &tonic::Request<T>,
        method: &'static str,
        params: Option<Value>,
    ) -> Result<Request, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::new(id, method, params);
        let session = match grpc.metadata().get(SESSION) {
            Some(value) => {
                let session = value
                    .to_str()
                    .map_err(|_| Status::invalid_argument(format!("{SESSION} must be ASCII")))?;
                if session.len() > MAX_SESSION_LEN {
                    return Err(Status::invalid_argument(format!(
                        "{SESSION} is longer than {MAX_SESSION_LEN} bytes"
                    )));
                }
                Some(session.to_owned())
            }
            None => grpc.remote_addr().map(|addr| addr.to_string()),
        };
        if let Some(session) = session {
            request.insert_extension(SessionKey::from(session.as_str()));
        }
        Ok(request)
    }

    /// One call through the stack. A plain fn, not inline in the `async fn`s
    /// below: it proves the future `Send` where the types are concrete
    /// (inside `async_trait`'s boxed future the compiler cannot, a known
    /// limitation with higher-ranked bounds).
    fn drive(
        &self,
        call: Request,
    ) -> impl std::future::Future<Output = Result<Response, BoxError>> + Send + 'static {
        self.stack.clone().oneshot(call)
    }
}

#[tonic::async_trait]
impl McpTools for GuardedTools {
    async fn list_tools(
        &self,
        request: tonic::Request<ListToolsRequest>,
    ) -> Result<tonic::Response<ListToolsResponse>, Status> {
        let call = self.request(&request, "tools/list", None)?;
        let result = match self.drive(call).await {
            Ok(Response {
                payload: Ok(result),
                ..
            }) => result,
            Ok(Response {
                payload: Err(error),
                ..
            }) => return Err(status_of("tools/list", &error)),
            Err(error) => return Err(status_of("tools/list", error.as_ref())),
        };
        let tools = result
            .get("tools")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|tool| Tool {
                name: text(tool, "name"),
                description: text(tool, "description"),
                input_schema_json: tool
                    .get("inputSchema")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                annotations_json: tool
                    .get("annotations")
                    .map(Value::to_string)
                    .unwrap_or_default(),
            })
            .collect();
        Ok(tonic::Response::new(ListToolsResponse { tools }))
    }

    async fn call_tool(
        &self,
        request: tonic::Request<CallToolRequest>,
    ) -> Result<tonic::Response<CallToolResponse>, Status> {
        let CallToolRequest {
            name,
            arguments_json,
        } = request.get_ref();
        if name.is_empty() {
            return Err(Status::invalid_argument("name must name a tool"));
        }
        let arguments = if arguments_json.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            match serde_json::from_str::<Value>(arguments_json) {
                Ok(arguments @ Value::Object(_)) => arguments,
                Ok(other) => {
                    return Err(Status::invalid_argument(format!(
                        "arguments_json must be a JSON object, not {}",
                        kind_of(&other)
                    )))
                }
                Err(e) => {
                    return Err(Status::invalid_argument(format!(
                        "arguments_json is not JSON: {e}"
                    )))
                }
            }
        };
        let params = json!({"name": name, "arguments": arguments});
        let call = self.request(&request, toolwarden_core::TOOLS_CALL, Some(params))?;
        match self.drive(call).await {
            Ok(Response {
                payload: Ok(result),
                ..
            }) => Ok(tonic::Response::new(response_of(result))),
            Ok(Response {
                payload: Err(error),
                ..
            }) => Err(status_of(name, &error)),
            Err(error) => Err(status_of(name, error.as_ref())),
        }
    }
}

/// The tonic service of `tools` behind `stack`.
pub fn grpc_service(
    stack: &StandardStackLayer,
    tools: ToolHandler,
) -> McpToolsServer<GuardedTools> {
    McpToolsServer::new(GuardedTools::new(stack, tools))
}

fn text(value: &Value, field: &str) -> String {
    value
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The protobuf answer of an MCP `CallToolResult`.
pub fn response_of(result: Value) -> CallToolResponse {
    let content = result
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|block| {
            let kind = text(block, "type");
            if kind == "text" {
                Content {
                    text: text(block, "text"),
                    r#type: kind,
                    json: String::new(),
                }
            } else {
                Content {
                    r#type: kind,
                    text: String::new(),
                    json: block.to_string(),
                }
            }
        })
        .collect();
    let stale = result
        .get("_meta")
        .and_then(|meta| meta.get("toolwarden/stale"))
        .filter(|stale| stale.get("stale") == Some(&Value::Bool(true)))
        .map(|stale| Stale {
            age_seconds: stale
                .get("ageSeconds")
                .and_then(Value::as_f64)
                .unwrap_or_default(),
            reason: text(stale, "reason"),
        });
    CallToolResponse {
        is_error: result.get("isError") == Some(&Value::Bool(true)),
        content,
        stale,
        result_json: result.to_string(),
    }
}

/// The gRPC status of a failed call to `tool` (see the mapping table in the
/// module docs). The message is what the MCP rendering tells a model.
pub fn status_of(tool: &str, error: &(dyn StdError + 'static)) -> Status {
    let message = FailureReport::from_error(tool, error).message();
    let (code, layer, retry_after) = match find_rejection(error) {
        Some(rejection) => {
            let code = match rejection.layer() {
                "rate_limit" => Code::ResourceExhausted,
                "loop_guard" => Code::FailedPrecondition,
                _ => Code::Unavailable,
            };
            (code, Some(rejection.layer()), rejection.retry_after())
        }
        None => {
            let outcome = classify_error_chain(error);
            let code = match (outcome.kind, outcome.code, outcome.class) {
                (OutcomeKind::Timeout, _, _) => Code::DeadlineExceeded,
                (_, Some(code), _) => code_of_rpc_error(code),
                (_, None, Some(FailureClass::Transient)) => Code::Unavailable,
                (_, None, Some(FailureClass::Client)) => Code::InvalidArgument,
                _ => Code::Internal,
            };
            (code, None, outcome.retry_after)
        }
    };
    let mut status = Status::new(code, message);
    let metadata = status.metadata_mut();
    if let Some(layer) = layer {
        metadata.insert(LAYER, MetadataValue::from_static(layer));
    }
    if let Some(retry_after) = retry_after {
        let millis = retry_after.as_nanos().div_ceil(1_000_000).max(1);
        if let Ok(value) = MetadataValue::try_from(millis.to_string()) {
            metadata.insert(RETRY_AFTER_MS, value.clone());
            metadata.insert(RETRY_PUSHBACK_MS, value);
        }
    }
    status
}

/// The gRPC code of a JSON-RPC error code (MCP.md's table).
pub fn code_of_rpc_error(code: i64) -> Code {
    match code {
        -32700 | -32600 | -32602 => Code::InvalidArgument,
        -32601 => Code::Unimplemented,
        -32002 => Code::NotFound,
        -32603 => Code::Internal,
        -32023 => Code::ResourceExhausted,
        -32019..=-32000 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

// ---------------------------------------------------------------------------
// The demo: tools that misbehave on cue, and a stack tuned to act at once.
// ---------------------------------------------------------------------------

/// The demo tools, each scripted to make one layer act:
///
/// | tool | behaviour | layer that acts |
/// |---|---|---|
/// | `quote` (read-only) | odd calls fail with "temporarily unavailable" | retry |
/// | `inventory` | always fails ("database crashed") | circuit breaker (opens after 3) |
/// | `search` | answers; quota 2 per minute | rate limit |
/// | `lookup` (read-only) | always "order not found" | loop guard (4th identical call) |
/// | `weather` (read-only) | answers once, then its connection resets | fallback cache (stale) |
pub const DEMO_TOOLS: [&str; 5] = ["quote", "inventory", "search", "lookup", "weather"];

/// How many calls reached each demo tool (what the handler saw).
#[derive(Debug, Default)]
pub struct HandlerCalls([AtomicU32; DEMO_TOOLS.len()]);

impl HandlerCalls {
    /// Calls that reached `tool` (0 for tools that are not demo tools).
    pub fn get(&self, tool: &str) -> u32 {
        DEMO_TOOLS
            .iter()
            .position(|t| *t == tool)
            .map_or(0, |i| self.0[i].load(Ordering::Relaxed))
    }

    /// Counts a call to `tool`, returning its number (1 for the first).
    fn count(&self, tool: &str) -> u32 {
        DEMO_TOOLS
            .iter()
            .position(|t| *t == tool)
            .map_or(0, |i| self.0[i].fetch_add(1, Ordering::Relaxed) + 1)
    }
}

fn tool_result(text: impl Into<String>, is_error: bool) -> Value {
    json!({"content": [{"type": "text", "text": text.into()}], "isError": is_error})
}

fn demo_tools_list() -> Value {
    let schema = |field: &str| json!({"type": "object", "properties": {field: {"type": "string"}}});
    json!({"tools": [
        {"name": "quote", "description": "A quote of the day (flaky)", "inputSchema": schema("topic"),
         "annotations": {"readOnlyHint": true}},
        {"name": "inventory", "description": "Stock of a product (its database is down)", "inputSchema": schema("sku")},
        {"name": "search", "description": "Search the catalogue (2 calls per minute)", "inputSchema": schema("q")},
        {"name": "lookup", "description": "Look up an order", "inputSchema": schema("order"),
         "annotations": {"readOnlyHint": true}},
        {"name": "weather", "description": "Weather in a city (its backend goes down)", "inputSchema": schema("city"),
         "annotations": {"readOnlyHint": true}},
    ]})
}

/// The demo tool handler, and the count of calls that reached each tool.
pub fn demo_tools() -> (ToolHandler, Arc<HandlerCalls>) {
    let calls = Arc::new(HandlerCalls::default());
    let seen = Arc::clone(&calls);
    let handler = tower::service_fn(move |request: Request| {
        let calls = Arc::clone(&seen);
        async move {
            let id = request.id.clone();
            if request.method == "tools/list" {
                return Ok(Response::result(id, demo_tools_list()));
            }
            let Some(tool) = request.tool_name().map(str::to_owned) else {
                return Ok(Response::error(
                    id,
                    ErrorObject::new(-32601, format!("Method not found: {}", request.method)),
                ));
            };
            let argument = |field: &str| {
                request
                    .params_object()
                    .and_then(|p| p.get("arguments"))
                    .and_then(|a| a.get(field))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let n = calls.count(&tool);
            let result = match tool.as_str() {
                "quote" if n % 2 == 1 => tool_result("quote service temporarily unavailable", true),
                "quote" => tool_result(
                    format!("quote #{n}: make it work, then make it fast"),
                    false,
                ),
                "inventory" => tool_result("inventory database crashed", true),
                "search" => tool_result(format!("3 products match {:?}", argument("q")), false),
                "lookup" => tool_result(format!("order {} not found", argument("order")), true),
                "weather" if n == 1 => {
                    tool_result(format!("{}: 21 °C, clear", argument("city")), false)
                }
                "weather" => {
                    return Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "weather backend reset the connection",
                    )) as BoxError)
                }
                other => {
                    return Ok(Response::error(
                        id,
                        ErrorObject::new(-32602, format!("Unknown tool: {other}")),
                    ))
                }
            };
            Ok(Response::result(id, result))
        }
    });
    (BoxCloneSyncService::new(handler), calls)
}

/// What the layers did, in order (a bounded log of events).
#[derive(Debug, Default, Clone)]
pub struct EventLog(Arc<Mutex<Vec<String>>>);

impl EventLog {
    /// The most events kept; later ones are dropped.
    pub const MAX: usize = 1024;

    /// The events so far, as `event key`.
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Takes the events so far.
    pub fn take(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|mut log| std::mem::take(&mut *log))
            .unwrap_or_default()
    }

    fn events(&self) -> Events {
        let log = self.clone();
        Events::new().with(move |event: &Event<'_>| {
            if let Ok(mut log) = log.0.lock() {
                if log.len() < Self::MAX {
                    log.push(format!(
                        "{} {}",
                        event.name(),
                        event.subject().unwrap_or("")
                    ));
                }
            }
        })
    }
}

/// The demo's stack: a breaker that opens after 3 failures in a row (the
/// failure-rate policy off, so each scene shows one rule), 3 attempts
/// 10 ms apart, `search` limited to 2 calls a minute, the loop guard's
/// defaults (4th identical call after 3 failures), stale results up to a
/// minute old. The catalog is filled from the tools' own `tools/list`,
/// annotations trusted (they are this process's own tools).
pub async fn demo_stack(
    tools: &ToolHandler,
    log: &EventLog,
) -> Result<StandardStackLayer, BoxError> {
    let listed = tools
        .clone()
        .oneshot(Request::new(0, "tools/list", None))
        .await?;
    let catalog = ToolCatalog::new();
    if let Ok(list) = &listed.payload {
        catalog.fill_from_tools_list(list);
    }
    catalog.set_trusted(true);
    let stack = StandardStack::builder()
        .catalog(catalog)
        .events(log.events())
        .render_errors(false)
        .attempt_timeout(Duration::from_secs(2))
        .retry_deadline(Duration::from_secs(5))
        .circuit_breaker(|b| {
            b.failure_threshold(3)
                .failure_rate_threshold(None)
                .minimum_calls(3)
                .reset_timeout(Duration::from_secs(30))
        })
        .retry(|b| {
            b.max_attempts(3)
                .base_delay(Duration::from_millis(10))
                .max_delay(Duration::from_millis(50))
        })
        .rate_limit(|b| {
            b.tool("search", |b| {
                b.per_tool(toolwarden::rate_limit::Rate::per_minute(2), 2)
            })
        })
        .fallback_cache(|b| b.degrade(false).max_staleness(Duration::from_secs(60)))
        .build()?;
    Ok(stack)
}

/// A running server.
pub struct Running {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    /// Stops the server and waits for it.
    pub async fn stop(mut self) -> Result<(), BoxError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

/// The server's bound on a whole request (HTTP/2 level, above the stack's
/// own attempt timeout and retry deadline).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent requests (HTTP/2 streams) per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Serves `service` on `listener` until [`Running::stop`], with
/// [`REQUEST_TIMEOUT`] and [`MAX_STREAMS_PER_CONNECTION`]; tonic refuses
/// request messages over 4 MiB (its default `max_decoding_message_size`).
pub fn serve(
    listener: TcpListener,
    service: McpToolsServer<GuardedTools>,
) -> Result<Running, BoxError> {
    let addr = listener.local_addr()?;
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    // TCP_NODELAY: small answers are not held back for the delayed ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
            .serve_with_incoming_shutdown(service, incoming, async {
                let _ = stopped.await;
            }),
    );
    Ok(Running {
        addr,
        shutdown: Some(shutdown),
        task,
    })
}
