//! End to end: the tonic example's gRPC server (`examples/tonic_service`),
//! the standard stack behind `CallTool`, called by a real tonic client over
//! loopback TCP. Asserts the gRPC status of each refusal, its retry-after
//! metadata and message, the stale marking, and which calls reached the
//! tool handler.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/tonic_service/grpc.rs"]
mod grpc;
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
#[path = "../examples/tonic_service/toolwarden.mcp.v1.rs"]
mod pb;

use std::sync::Arc;
use std::time::Duration;

use grpc::{EventLog, HandlerCalls, Running, LAYER, RETRY_AFTER_MS, RETRY_PUSHBACK_MS, SESSION};
use pb::mcp_tools_client::McpToolsClient;
use pb::{CallToolRequest, CallToolResponse, ListToolsRequest};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

struct Harness {
    client: McpToolsClient<Channel>,
    calls: Arc<HandlerCalls>,
    log: EventLog,
    server: Running,
}

/// The example's server on an ephemeral loopback port, and a client.
async fn start() -> Harness {
    let (tools, calls) = grpc::demo_tools();
    let log = EventLog::default();
    let stack = grpc::demo_stack(&tools, &log).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = grpc::serve(listener, grpc::grpc_service(&stack, tools)).unwrap();
    // A hang guard on every call, not a timing claim.
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    Harness {
        client: McpToolsClient::new(channel),
        calls,
        log,
        server,
    }
}

fn request(tool: &str, arguments: &str) -> CallToolRequest {
    CallToolRequest {
        name: tool.to_owned(),
        arguments_json: arguments.to_owned(),
    }
}

impl Harness {
    async fn call(&mut self, tool: &str, arguments: &str) -> Result<CallToolResponse, Status> {
        self.client
            .call_tool(request(tool, arguments))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn ok(&mut self, tool: &str, arguments: &str) -> CallToolResponse {
        self.call(tool, arguments)
            .await
            .unwrap_or_else(|status| panic!("{tool} {arguments}: {status:?}"))
    }

    async fn refused(&mut self, tool: &str, arguments: &str) -> Status {
        match self.call(tool, arguments).await {
            Ok(response) => panic!("{tool} {arguments} answered: {response:?}"),
            Err(status) => status,
        }
    }

    async fn stop(self) {
        drop(self.client);
        self.server.stop().await.unwrap();
    }
}

fn text(response: &CallToolResponse) -> &str {
    response.content.first().map_or("", |c| c.text.as_str())
}

fn metadata<'a>(status: &'a Status, key: &str) -> Option<&'a str> {
    status.metadata().get(key).map(|v| v.to_str().unwrap())
}

/// The `retry-after-ms` of `status`, checked equal to its gRPC pushback.
fn retry_after_ms(status: &Status) -> u64 {
    let millis = metadata(status, RETRY_AFTER_MS)
        .unwrap_or_else(|| panic!("no {RETRY_AFTER_MS}: {status:?}"));
    assert_eq!(metadata(status, RETRY_PUSHBACK_MS), Some(millis));
    millis.parse().unwrap()
}

#[tokio::test]
async fn list_tools_goes_through_the_stack_to_the_handler() {
    let mut h = start().await;
    let tools = h
        .client
        .list_tools(ListToolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tools;
    let names: Vec<_> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, grpc::DEMO_TOOLS);
    let quote: Value = serde_json::from_str(&tools[0].annotations_json).unwrap();
    assert_eq!(quote["readOnlyHint"], true);
    let schema: Value = serde_json::from_str(&tools[0].input_schema_json).unwrap();
    assert_eq!(schema["type"], "object");
    assert_eq!(
        tools[1].annotations_json, "",
        "inventory has no annotations"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_flaky_tool_is_retried_and_answers() {
    let mut h = start().await;
    let response = h.ok("quote", r#"{"topic":"rust"}"#).await;
    assert!(!response.is_error);
    assert!(response.stale.is_none());
    assert!(text(&response).starts_with("quote #2"), "{response:?}");
    assert_eq!(h.calls.get("quote"), 2, "the failed attempt and the retry");
    assert_eq!(h.log.entries(), ["retried quote"]);
    h.stop().await;
}

#[tokio::test]
async fn a_tool_error_is_an_ok_answer_and_an_open_circuit_is_unavailable() {
    let mut h = start().await;
    for sku in 1..=3 {
        let response = h.ok("inventory", &format!(r#"{{"sku":"{sku}"}}"#)).await;
        assert!(
            response.is_error,
            "a tool that ran and failed is not a transport error"
        );
        assert_eq!(text(&response), "inventory database crashed");
        let result: Value = serde_json::from_str(&response.result_json).unwrap();
        assert_eq!(result["isError"], true);
    }
    let status = h.refused("inventory", r#"{"sku":"4"}"#).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(metadata(&status, LAYER), Some("circuit_breaker"));
    let millis = retry_after_ms(&status);
    assert!(millis > 0, "{millis}");
    assert!(
        status
            .message()
            .starts_with("inventory is failing and was not called; retry after"),
        "{}",
        status.message()
    );
    assert_eq!(
        h.calls.get("inventory"),
        3,
        "the open circuit kept the 4th call from the handler"
    );
    assert!(h
        .log
        .entries()
        .contains(&"circuit_opened inventory".to_owned()));
    h.stop().await;
}

#[tokio::test]
async fn a_rate_limited_call_is_resource_exhausted_with_its_retry_after() {
    let mut h = start().await;
    for q in ["tower", "tonic"] {
        let response = h.ok("search", &format!(r#"{{"q":"{q}"}}"#)).await;
        assert_eq!(text(&response), format!("3 products match {q:?}"));
    }
    let status = h.refused("search", r#"{"q":"prost"}"#).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(metadata(&status, LAYER), Some("rate_limit"));
    // 2 calls a minute, both spent: the next token is due in up to 30 s.
    let millis = retry_after_ms(&status);
    assert!((1..=30_000).contains(&millis), "{millis}");
    assert!(
        status
            .message()
            .starts_with("too many calls to search; retry after"),
        "{}",
        status.message()
    );
    assert_eq!(h.calls.get("search"), 2);
    h.stop().await;
}

#[tokio::test]
async fn a_loop_is_failed_precondition_per_session() {
    let mut h = start().await;
    for _ in 0..3 {
        assert!(h.ok("lookup", r#"{"order":"42"}"#).await.is_error);
    }
    let status = h.refused("lookup", r#"{"order":"42"}"#).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(metadata(&status, LAYER), Some("loop_guard"));
    assert_eq!(
        metadata(&status, RETRY_AFTER_MS),
        None,
        "waiting does not end a loop"
    );
    assert!(
        status.message().contains("change approach"),
        "{}",
        status.message()
    );
    assert_eq!(h.calls.get("lookup"), 3);

    // Another session (the `mcp-session-id` metadata) has no history.
    let mut other = tonic::Request::new(request("lookup", r#"{"order":"42"}"#));
    other
        .metadata_mut()
        .insert(SESSION, "agent-2".parse().unwrap());
    let response = h.client.call_tool(other).await.unwrap().into_inner();
    assert!(response.is_error);
    assert_eq!(h.calls.get("lookup"), 4);
    h.stop().await;
}

#[tokio::test]
async fn a_failing_tool_answers_with_its_last_good_result_marked_stale() {
    let mut h = start().await;
    let fresh = h.ok("weather", r#"{"city":"Lisbon"}"#).await;
    assert!(fresh.stale.is_none());
    assert_eq!(text(&fresh), "Lisbon: 21 °C, clear");

    let stale = h.ok("weather", r#"{"city":"Lisbon"}"#).await;
    assert!(!stale.is_error, "{stale:?}");
    let marking = stale.stale.clone().expect("marked stale");
    assert!(marking.age_seconds >= 0.0);
    assert!(
        marking.reason.contains("reset the connection"),
        "{marking:?}"
    );
    assert_eq!(text(&stale), text(&fresh));
    let result: Value = serde_json::from_str(&stale.result_json).unwrap();
    assert_eq!(result["_meta"]["toolwarden/stale"]["stale"], true);
    assert!(
        stale.content.iter().any(|c| c.text.starts_with("[stale:")),
        "the note a model reads: {:?}",
        stale.content
    );
    // The first call, then three failed attempts of the second.
    assert_eq!(h.calls.get("weather"), 4);
    assert!(h.log.entries().contains(&"stale_served weather".to_owned()));
    h.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_reaches_no_tool() {
    let mut h = start().await;
    for (tool, arguments, says) in [
        ("search", "[1, 2]", "must be a JSON object, not an array"),
        ("search", "{not json", "is not JSON"),
        ("", "{}", "name must name a tool"),
        ("nope", "{}", "Unknown tool: nope"),
    ] {
        let status = h.refused(tool, arguments).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
    }
    let mut long = tonic::Request::new(request("search", "{}"));
    long.metadata_mut()
        .insert(SESSION, "s".repeat(300).parse().unwrap());
    let status = h.client.call_tool(long).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(h.calls.get("search"), 0);
    // An empty arguments_json is `{}`.
    assert!(!h.ok("search", "").await.is_error);
    h.stop().await;
}

#[test]
fn the_status_mapping_table() {
    use toolwarden_core::jsonrpc::ErrorObject;
    use toolwarden_core::{LoopDetected, LoopPattern, RetryBudgetExhausted};

    let timeout = grpc::status_of("slow", &tower::timeout::error::Elapsed::new());
    assert_eq!(timeout.code(), Code::DeadlineExceeded);
    let spent = grpc::status_of("x", &RetryBudgetExhausted::new("x", 3));
    assert_eq!(spent.code(), Code::Unavailable);
    assert_eq!(metadata(&spent, LAYER), Some("retry"));
    let looped = grpc::status_of("x", &LoopDetected::new("x", 9, LoopPattern::Repeated));
    assert_eq!(looped.code(), Code::FailedPrecondition);
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    assert_eq!(grpc::status_of("x", &io).code(), Code::Unavailable);
    let mut limited = ErrorObject::new(-32023, "slow down");
    limited.data = Some(serde_json::json!({"retryAfter": 2}));
    let status = grpc::status_of("x", &limited);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(retry_after_ms(&status), 2000, "the server's own hint");
    assert_eq!(metadata(&status, LAYER), None, "not a toolwarden refusal");
    for (code, grpc_code) in [
        (-32700, Code::InvalidArgument),
        (-32600, Code::InvalidArgument),
        (-32602, Code::InvalidArgument),
        (-32601, Code::Unimplemented),
        (-32002, Code::NotFound),
        (-32603, Code::Internal),
        (-32000, Code::Unavailable),
        (-32019, Code::Unavailable),
        (-32099, Code::Unknown),
    ] {
        assert_eq!(grpc::code_of_rpc_error(code), grpc_code, "{code}");
        let status = grpc::status_of("x", &ErrorObject::new(code, "e"));
        assert_eq!(status.code(), grpc_code, "{code}");
    }
}
