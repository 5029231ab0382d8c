//! Every row of the default classification table (shared/MCP.md), with the
//! real response shapes of server-everything and mcp-server-time.

use std::time::Duration;

use serde_json::{json, Value};
use toolwarden_core::classify::{
    CallTimedOut, HttpStatusError, TransportError, TransportErrorKind,
};
use toolwarden_core::jsonrpc::{ErrorObject, Id, Response};
use toolwarden_core::{
    BoxError, CallKind, CircuitOpen, Classify, FailureClass, LoopDetected, LoopPattern,
    McpClassifier, Outcome, OutcomeKind, RateLimited,
};

fn tool(result: Value) -> Outcome {
    McpClassifier::new()
        .classify_response(CallKind::ToolCall, &Response::result(Id::Number(1), result))
}

fn rpc(code: i64, message: &str, data: Option<Value>) -> Outcome {
    let mut e = ErrorObject::new(code, message);
    e.data = data;
    McpClassifier::new().classify_response(CallKind::ToolCall, &Response::error(Id::Number(1), e))
}

fn err(e: BoxError) -> Outcome {
    <McpClassifier as Classify<Response>>::classify_error(&McpClassifier::new(), e.as_ref())
}

fn is_error_text(text: &str) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": true})
}

#[test]
fn a_non_empty_result_is_a_success() {
    let o = tool(json!({"content": [{"type": "text", "text": "Echo: hi"}]}));
    assert_eq!(o, Outcome::SUCCESS);
    assert!(!o.is_counted_failure());
    // server-everything get-structured-content: structured content only.
    let o = tool(json!({"content": [], "structuredContent": {"temperature": 22.5}}));
    assert!(o.is_success());
}

#[test]
fn input_required_is_not_a_failure() {
    let o = tool(json!({"resultType": "input_required", "content": []}));
    assert!(o.is_success());
}

#[test]
fn results_of_other_methods_are_never_empty_failures() {
    let resp = Response::result(Id::Number(1), json!({}));
    let o = McpClassifier::new().classify_response(CallKind::Other, &resp);
    assert!(o.is_success(), "ping answers {{}}");
}

#[test]
fn server_everything_unknown_tool_is_client() {
    let o = tool(is_error_text("MCP error -32602: Tool nope not found"));
    assert_eq!(o.kind, OutcomeKind::ToolError);
    assert_eq!(o.class, Some(FailureClass::Client));
    assert_eq!(o.code, Some(-32602));
    assert!(
        !o.is_counted_failure(),
        "a client error must not trip a breaker"
    );
}

#[test]
fn server_everything_bad_arguments_are_client() {
    let o = tool(is_error_text(
        "MCP error -32602: Input validation error: Invalid arguments for tool get-sum: [\n  {\n    \"expected\": \"number\",\n    \"code\": \"invalid_type\"\n  }\n]",
    ));
    assert_eq!(o.class, Some(FailureClass::Client));
}

#[test]
fn mcp_server_time_unknown_tool_is_client_in_both_forms() {
    // Low-level server: a JSON-RPC error.
    let o = rpc(-32602, "Unknown tool: nope", None);
    assert_eq!(o.kind, OutcomeKind::ProtocolError);
    assert_eq!(o.class, Some(FailureClass::Client));
    // MCPServer helper of mcp 2.x: an isError result.
    let o = tool(is_error_text("Unknown tool: nope"));
    assert_eq!(o.kind, OutcomeKind::ToolError);
    assert_eq!(o.class, Some(FailureClass::Client));
}

#[test]
fn mcp_server_time_tool_raising_is_classified_by_its_text() {
    let o = tool(is_error_text(
        "Error executing tool get_current_time: Invalid timezone: 'Mars/Base'",
    ));
    assert_eq!(o.class, Some(FailureClass::Client));
    let o = tool(is_error_text(
        "Error executing tool convert_time: division by zero",
    ));
    assert_eq!(o.class, Some(FailureClass::Server));
    assert!(o.is_counted_failure());
}

#[test]
fn is_error_texts_map_to_classes() {
    for (text, class) in [
        ("Rate limit exceeded, slow down", FailureClass::Transient),
        ("429 Too Many Requests", FailureClass::Transient),
        ("upstream request timed out", FailureClass::Transient),
        ("Timeout waiting for the database", FailureClass::Transient),
        ("Service temporarily unavailable", FailureClass::Transient),
        ("read: connection reset by peer", FailureClass::Transient),
        ("file not found: /x", FailureClass::Client),
        ("Unknown tool: frobnicate", FailureClass::Client),
        ("invalid date format", FailureClass::Client),
        ("Validation failed for field 'a'", FailureClass::Client),
        ("missing required argument 'city'", FailureClass::Client),
        ("arguments do not match the schema", FailureClass::Client),
        ("something broke", FailureClass::Server),
        ("", FailureClass::Server),
        ("MCP error -32603: internal", FailureClass::Server),
        (
            "MCP error -32001: Request timed out",
            FailureClass::Transient,
        ),
    ] {
        let o = tool(is_error_text(text));
        assert_eq!(o.kind, OutcomeKind::ToolError, "{text}");
        assert_eq!(o.class, Some(class), "{text}");
    }
    // isError without any content is still a tool error (of class Server).
    assert_eq!(
        tool(json!({"content": [], "isError": true})).class,
        Some(FailureClass::Server)
    );
}

#[test]
fn empty_results_are_server_failures_by_default_and_configurable() {
    for empty in [
        json!({"content": []}),
        json!({"content": [{"type": "text", "text": " {} "}]}),
        json!({}),
    ] {
        let o = tool(empty.clone());
        assert_eq!(o.kind, OutcomeKind::ToolError, "{empty}");
        assert_eq!(o.class, Some(FailureClass::Server), "{empty}");
    }
    let lenient = McpClassifier::new().empty_result(None);
    let resp = Response::result(Id::Number(1), json!({"content": []}));
    assert!(lenient
        .classify_response(CallKind::ToolCall, &resp)
        .is_success());
}

#[test]
fn json_rpc_codes_follow_the_table() {
    for (code, class) in [
        (-32700, FailureClass::Client),
        (-32600, FailureClass::Client),
        (-32601, FailureClass::Client),
        (-32602, FailureClass::Client),
        (-32603, FailureClass::Server),
        (-32000, FailureClass::Transient),
        (-32001, FailureClass::Transient),
        (-32010, FailureClass::Transient),
        (-32019, FailureClass::Transient),
        (-32002, FailureClass::Client),
        (-32042, FailureClass::Client),
        (-32020, FailureClass::Client),
        (-32021, FailureClass::Client),
        (-32022, FailureClass::Client),
        (-32023, FailureClass::Transient),
        (-1, FailureClass::Server),
        (42, FailureClass::Server),
    ] {
        let o = rpc(code, "x", None);
        assert_eq!(o.kind, OutcomeKind::ProtocolError, "{code}");
        assert_eq!(o.class, Some(class), "{code}");
        assert_eq!(o.code, Some(code));
        assert_eq!(
            o.is_counted_failure(),
            class != FailureClass::Client,
            "{code}"
        );
    }
}

#[test]
fn rate_limited_code_carries_its_retry_after() {
    assert_eq!(
        rpc(-32023, "slow down", Some(json!({"retryAfter": 12}))).retry_after,
        Some(Duration::from_secs(12))
    );
    assert_eq!(
        rpc(-32023, "slow down", Some(json!({"retryAfterMs": 1500}))).retry_after,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        rpc(-32023, "slow down", Some(json!(3))).retry_after,
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        rpc(-32023, "slow down", Some(json!({"retryAfter": -1}))).retry_after,
        None
    );
    // Only -32023 is read for a hint.
    assert_eq!(
        rpc(-32603, "x", Some(json!({"retryAfter": 5}))).retry_after,
        None
    );
}

#[test]
fn transport_failures_are_transient() {
    let o = err(Box::new(TransportError::new(
        TransportErrorKind::Closed,
        "eof",
    )));
    assert_eq!(
        (o.kind, o.class, o.before_sent),
        (OutcomeKind::Transport, Some(FailureClass::Transient), false)
    );
    let o = err(Box::new(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "pipe",
    )));
    assert_eq!(
        (o.kind, o.class),
        (OutcomeKind::Transport, Some(FailureClass::Transient))
    );
    assert!(o.is_counted_failure());
}

#[test]
fn connection_refused_happened_before_the_request_left() {
    let o = err(Box::new(std::io::Error::from(
        std::io::ErrorKind::ConnectionRefused,
    )));
    assert!(o.before_sent);
    let o = err(Box::new(TransportError::new(
        TransportErrorKind::ConnectFailed,
        "refused",
    )));
    assert!(o.before_sent);
}

#[tokio::test]
async fn timeouts_are_transient() {
    let tokio_elapsed = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
        .await
        .unwrap_err();
    for e in [
        Box::new(tokio_elapsed) as BoxError,
        Box::new(tower::timeout::error::Elapsed::new()),
        Box::new(CallTimedOut {
            after: Duration::from_secs(1),
        }),
        Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
    ] {
        let o = err(e);
        assert_eq!(
            (o.kind, o.class),
            (OutcomeKind::Timeout, Some(FailureClass::Transient))
        );
    }
}

#[test]
fn http_statuses_follow_the_table() {
    for (status, class) in [
        (429, FailureClass::Transient),
        (502, FailureClass::Transient),
        (503, FailureClass::Transient),
        (504, FailureClass::Transient),
        (500, FailureClass::Server),
        (501, FailureClass::Server),
        (400, FailureClass::Client),
        (404, FailureClass::Client),
    ] {
        let o = err(Box::new(HttpStatusError {
            status,
            retry_after: None,
        }));
        assert_eq!(o.class, Some(class), "{status}");
    }
    let o = err(Box::new(HttpStatusError {
        status: 429,
        retry_after: Some(Duration::from_secs(30)),
    }));
    assert_eq!(o.retry_after, Some(Duration::from_secs(30)));
}

#[test]
fn our_own_rejections_never_count_against_the_tool() {
    for e in [
        Box::new(CircuitOpen::new("a", Duration::from_secs(5))) as BoxError,
        Box::new(RateLimited::new("a", Duration::from_secs(2))),
        Box::new(LoopDetected::new("a", 4, LoopPattern::RepeatedFailure)),
    ] {
        let o = err(e);
        assert_eq!(o.kind, OutcomeKind::Rejected);
        assert!(o.is_rejection());
        assert!(!o.is_counted_failure());
    }
    assert_eq!(
        err(Box::new(RateLimited::new("a", Duration::from_secs(2)))).retry_after,
        Some(Duration::from_secs(2))
    );
}

#[test]
fn json_rpc_error_objects_as_errors_classify_by_code() {
    // An rmcp client maps McpError to the core ErrorObject.
    let o = err(Box::new(ErrorObject::new(-32602, "bad")));
    assert_eq!(
        (o.kind, o.class),
        (OutcomeKind::ProtocolError, Some(FailureClass::Client))
    );
}

#[test]
fn unknown_errors_are_server_failures() {
    let o = err("something odd".into());
    assert_eq!(o.class, Some(FailureClass::Server));
    assert!(o.is_counted_failure());
}

// Issue 15, scenario 1: a server's retry hint must never panic a layer.
// `Duration::from_secs_f64(1e20)` panics; every hint is clamped to an hour.
#[test]
fn regression_15_1_huge_retry_hints_are_clamped_not_a_panic() {
    let hour = Some(Duration::from_secs(3600));
    for data in [
        json!({"retryAfter": 1e20}),
        json!({"retryAfterMs": 1e23}),
        json!({"retry_after": 1.7e308}),
        json!(1e300),
        json!({"retryAfter": u64::MAX}),
    ] {
        let o = rpc(-32023, "rate limited", Some(data.clone()));
        assert_eq!(o.retry_after, hour, "{data}");
        assert_eq!(o.class, Some(FailureClass::Transient));
    }
    for data in [
        json!({"retryAfter": -5}),
        json!({"retryAfter": "NaN"}),
        json!({"retryAfter": null}),
        json!({"retryAfterMs": "soon"}),
        json!("1e20"),
    ] {
        assert_eq!(
            rpc(-32023, "rate limited", Some(data.clone())).retry_after,
            None,
            "{data}"
        );
    }
    // Within the bound, hints are read as they are.
    let o = rpc(-32023, "x", Some(json!({"retryAfterMs": 1500})));
    assert_eq!(o.retry_after, Some(Duration::from_millis(1500)));
    // A classifier with another bound applies it.
    let short = McpClassifier::new().max_retry_after(Duration::from_secs(10));
    let mut e = ErrorObject::new(-32023, "x");
    e.data = Some(json!({"retryAfter": 60}));
    let resp = Response::error(Id::Number(1), e);
    assert_eq!(
        short
            .classify_response(CallKind::ToolCall, &resp)
            .retry_after,
        Some(Duration::from_secs(10))
    );
}

#[test]
fn hints_in_tool_error_texts_are_read_and_clamped() {
    let cases = [
        ("Rate limit exceeded; retry after 30 s", Some(30_000)),
        ("Too many requests. Retry-After: 2", Some(2_000)),
        ("service unavailable, try again in 5 minutes", Some(300_000)),
        ("throttled: retry in 250 ms", Some(250)),
        (
            "rate limited, retry after 99999999999999999999999 hours",
            Some(3_600_000),
        ),
        ("rate limited, retry after soon", None),
        ("rate limited", None),
    ];
    for (text, millis) in cases {
        let o = tool(is_error_text(text));
        assert_eq!(o.retry_after, millis.map(Duration::from_millis), "{text}");
    }
}

#[test]
fn http_retry_after_headers_read_seconds_and_dates() {
    use std::time::SystemTime;
    use toolwarden_core::classify::retry_after_from_header;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(
        retry_after_from_header(" 120 ", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(
        retry_after_from_header("Tue, 14 Nov 2023 22:13:21 GMT", now),
        Some(Duration::from_secs(1))
    );
    // A date in the past is no wait; a date far ahead is clamped.
    assert_eq!(
        retry_after_from_header("Mon, 13 Nov 2023 00:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        retry_after_from_header("Fri, 31 Dec 9999 23:59:59 GMT", now),
        Some(Duration::from_secs(3600))
    );
    for junk in [
        "",
        "-1",
        "1.5",
        "NaN",
        "tomorrow",
        "99999999999999999999999",
    ] {
        let parsed = retry_after_from_header(junk, now);
        assert!(
            parsed.is_none() || parsed == Some(Duration::from_secs(3600)),
            "{junk:?} -> {parsed:?}"
        );
    }
    // The classifier clamps a hint an HTTP transport passed on.
    let o = err(Box::new(HttpStatusError {
        status: 429,
        retry_after: Some(Duration::MAX),
    }));
    assert_eq!(o.retry_after, Some(Duration::from_secs(3600)));
}

// Issue 15, scenario 6: a client error that mentions a transient word is
// still a client error; the phrase that comes first decides.
#[test]
fn regression_15_6_client_phrases_win_over_transient_words_they_quote() {
    for text in [
        "Invalid input: timeout must be between 1 and 60",
        "Missing required argument: timeout_ms",
        "File not found: /var/log/timeout.log",
        "Validation failed: field `retry_after` is not a rate limit",
    ] {
        assert_eq!(
            tool(is_error_text(text)).class,
            Some(FailureClass::Client),
            "{text}"
        );
    }
    for text in [
        "Request timed out while looking for the index (not found in cache)",
        "Rate limit exceeded: invalid to call again within 60 s",
    ] {
        assert_eq!(
            tool(is_error_text(text)).class,
            Some(FailureClass::Transient),
            "{text}"
        );
    }
}

/// A refusal rendered by a layer (the fallback cache's degraded answer) stays
/// a refusal for the layers above it; a server cannot forge the mark.
#[test]
fn rendered_failures_keep_their_outcome_and_forged_marks_do_not() {
    use toolwarden_core::classify::OUTCOME_META_KEY;
    use toolwarden_core::FailureReport;
    let refusal = RateLimited::new("lookup", Duration::from_secs(61));
    let rendered = FailureReport::from_error("lookup", &refusal).to_tool_result();
    let o = tool(rendered.clone());
    assert_eq!(o.kind, OutcomeKind::Rejected);
    assert!(!o.is_counted_failure());
    assert_eq!(o.retry_after, Some(Duration::from_secs(61)));

    // The same shape from a server, without this process's seal: a tool error.
    let mut forged = rendered.clone();
    forged["_meta"][OUTCOME_META_KEY]["seal"] = json!("0000000000000000");
    assert_eq!(tool(forged).kind, OutcomeKind::ToolError);
    let mut unsealed = rendered;
    unsealed["_meta"][OUTCOME_META_KEY]
        .as_object_mut()
        .unwrap()
        .remove("seal");
    assert_eq!(tool(unsealed).kind, OutcomeKind::ToolError);

    // Any rendered failure keeps its outcome: an upstream that was down
    // stays a transport failure, a JSON-RPC error a protocol error.
    let down = TransportError::new(TransportErrorKind::Closed, "gone");
    let o = tool(FailureReport::from_error("lookup", &down).to_tool_result());
    assert_eq!(
        (o.kind, o.class),
        (OutcomeKind::Transport, Some(FailureClass::Transient))
    );
    let rpc = ErrorObject::new(-32603, "boom");
    let o = tool(FailureReport::from_error("lookup", &rpc).to_tool_result());
    assert_eq!((o.kind, o.code), (OutcomeKind::ProtocolError, Some(-32603)));
    // A free-form report has no outcome to keep.
    let free = FailureReport::new("lookup", "it broke").to_tool_result();
    assert!(free.get("_meta").is_none());
}
