//! End-to-end: toolwarden's rmcp client against real MCP servers —
//! `@modelcontextprotocol/server-everything` (TypeScript SDK) over stdio and
//! Streamable HTTP, `mcp-server-time` and the flaky test server (Python SDK)
//! over stdio. They report the same failures differently (see
//! tests/e2e/README.md); the classifier must read both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{CallToolRequest, CallToolRequestParams, ClientRequest, ServerResult};
use rmcp::service::RunningService;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::{json, Value};
use support::{bounded, component, eventually, flaky_server_script, free_port};
use tokio::process::Command;
use toolwarden_core::{
    BoxError, CallKind, Classify, FailureClass, McpClassifier, McpResponse, Outcome, OutcomeKind,
    ToolCatalog,
};
use toolwarden_rmcp::RmcpClient;
use tower::ServiceExt as _;

const LIMIT: Duration = Duration::from_secs(30);

fn call(name: &str, args: Value) -> ClientRequest {
    let mut params = CallToolRequestParams::new(name.to_owned());
    params.arguments = args.as_object().cloned();
    ClientRequest::CallToolRequest(CallToolRequest::new(params))
}

fn classify(result: &Result<ServerResult, BoxError>) -> Outcome {
    let c = McpClassifier::new();
    match result {
        Ok(r) => c.classify_response(CallKind::ToolCall, r),
        Err(e) => <McpClassifier as Classify<ServerResult>>::classify_error(&c, e.as_ref()),
    }
}

async fn stdio(
    program: &std::path::Path,
    args: &[&str],
) -> (RunningService<RoleClient, ()>, Option<u32>) {
    let mut command = Command::new(program);
    command.args(args).stderr(Stdio::null());
    let transport = TokioChildProcess::new(command).expect("server starts");
    let pid = transport.id();
    let running = bounded("initialize", LIMIT, ().serve(transport))
        .await
        .expect("initialize");
    (running, pid)
}

async fn call_tool(client: &RmcpClient, name: &str, args: Value) -> Result<ServerResult, BoxError> {
    bounded(name, LIMIT, client.clone().oneshot(call(name, args))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_stdio() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let (running, _) = stdio(&bin, &["stdio"]).await;
    let catalog = ToolCatalog::new();
    let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());

    let listed = bounded("tools/list", LIMIT, client.refresh_catalog())
        .await
        .unwrap();
    assert!(
        listed >= 10,
        "server-everything lists its tools, got {listed}"
    );
    for tool in ["echo", "get-sum", "trigger-long-running-operation"] {
        assert!(
            catalog.get(tool).is_some(),
            "{tool} missing from the catalog"
        );
    }
    // Its annotations, once trusted, drive the retry and cache decisions.
    catalog.set_trusted(true);
    assert!(catalog.is_safe_to_repeat("trigger-long-running-operation"));

    let echo = call_tool(&client, "echo", json!({"message": "hello"})).await;
    assert!(classify(&echo).is_success());
    assert_eq!(echo.unwrap().first_text().as_deref(), Some("Echo: hello"));

    let sum = call_tool(&client, "get-sum", json!({"a": 2, "b": 3}))
        .await
        .unwrap();
    assert!(sum.first_text().unwrap().contains('5'));

    // server-everything answers an unknown tool with an isError result.
    let unknown = call_tool(&client, "nope", json!({})).await;
    let outcome = classify(&unknown);
    assert_eq!(
        (outcome.kind, outcome.class),
        (OutcomeKind::ToolError, Some(FailureClass::Client))
    );
    assert!(!outcome.is_counted_failure());

    // Bad arguments: an isError result too, also the caller's fault.
    let bad = call_tool(&client, "get-sum", json!({"a": "two"})).await;
    assert_eq!(classify(&bad).class, Some(FailureClass::Client));
    running.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_server_time_over_stdio() {
    let Some(bin) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
        return;
    };
    let (running, _) = stdio(&bin, &["--local-timezone", "UTC"]).await;
    let catalog = ToolCatalog::new();
    let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
    bounded("tools/list", LIMIT, client.refresh_catalog())
        .await
        .unwrap();
    assert!(catalog.get("get_current_time").is_some());
    assert!(catalog.get("convert_time").is_some());

    let now = call_tool(&client, "get_current_time", json!({"timezone": "UTC"})).await;
    assert!(classify(&now).is_success());
    assert!(now.unwrap().first_text().unwrap().contains("UTC"));

    // mcp-server-time answers an unknown tool with a JSON-RPC error.
    let unknown = call_tool(&client, "nope", json!({})).await;
    let outcome = classify(&unknown);
    assert_eq!(
        (outcome.kind, outcome.class),
        (OutcomeKind::ProtocolError, Some(FailureClass::Client))
    );

    // A bad timezone is the tool raising: an isError result, the caller's fault.
    let bad = call_tool(
        &client,
        "get_current_time",
        json!({"timezone": "Mars/Olympus"}),
    )
    .await;
    let outcome = classify(&bad);
    assert_eq!(outcome.kind, OutcomeKind::ToolError);
    assert_eq!(outcome.class, Some(FailureClass::Client), "{bad:?}");
    running.cancel().await.ok();
}

/// A server-everything child serving Streamable HTTP, killed on drop.
struct HttpServer {
    child: tokio::process::Child,
    url: String,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn server_everything_http(
    bin: &std::path::Path,
) -> (HttpServer, RunningService<RoleClient, ()>) {
    let port = free_port();
    let child = Command::new(bin)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("server-everything starts");
    let server = HttpServer {
        child,
        url: format!("http://127.0.0.1:{port}/mcp"),
    };
    // It prints "listening" even when the port is taken: wait for a real answer.
    let url = server.url.clone();
    let running = eventually(LIMIT, || {
        let url = url.clone();
        async move { ().serve(StreamableHttpClientTransport::from_uri(url)).await.ok() }
    })
    .await
    .expect("server-everything answers over Streamable HTTP");
    (server, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_streamable_http() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let (_server, running) = server_everything_http(&bin).await;
    let catalog = ToolCatalog::new();
    let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
    bounded("tools/list", LIMIT, client.refresh_catalog())
        .await
        .unwrap();
    assert!(catalog.get("echo").is_some());
    let echo = call_tool(&client, "echo", json!({"message": "over http"}))
        .await
        .unwrap();
    assert_eq!(echo.first_text().as_deref(), Some("Echo: over http"));
    let unknown = call_tool(&client, "nope", json!({})).await;
    assert_eq!(classify(&unknown).class, Some(FailureClass::Client));
    running.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_is_cancelled_upstream() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let script = flaky_server_script();
    let (running, _) = stdio(&python, &[script.to_str().unwrap()]).await;
    let client = RmcpClient::new(running.peer().clone());
    // The deadline fires long before the tool would answer.
    let timed_out = tower::timeout::Timeout::new(client.clone(), Duration::from_millis(300))
        .oneshot(call("slow", json!({"seconds": 30})))
        .await;
    let outcome = classify(&timed_out);
    assert_eq!(
        (outcome.kind, outcome.class),
        (OutcomeKind::Timeout, Some(FailureClass::Transient))
    );
    // The server saw notifications/cancelled and stopped the work.
    let cancelled = eventually(LIMIT, || {
        let client = client.clone();
        async move {
            let stats = client.oneshot(call("stats", json!({}))).await.ok()?;
            let ServerResult::CallToolResult(r) = stats else {
                return None;
            };
            let n = r.structured_content?.get("slow_cancelled")?.as_u64()?;
            (n == 1).then_some(())
        }
    })
    .await;
    assert!(cancelled.is_some(), "the server never saw the cancellation");
    running.cancel().await.ok();
}

/// Issue 21: the hedge layer drops the losing copy of a call, and over
/// `RmcpClient` that drop reaches the server as `notifications/cancelled`.
/// The first copy of `slow` is stuck for 30 s; a service between the layer
/// and the client turns the hedge into a quick `slow` (a server whose first
/// copy is stuck), which answers and wins; the server then sees the stuck
/// copy cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedges_losing_copy_is_cancelled_upstream() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use toolwarden::hedge::HedgeLayer;
    use tower::Layer as _;

    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let script = flaky_server_script();
    let (running, _) = stdio(&python, &[script.to_str().unwrap()]).await;
    let client = RmcpClient::new(running.peer().clone());
    let copies = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&copies);
    let upstream = client.clone();
    let stuck_then_quick = tower::service_fn(move |request: ClientRequest| {
        let request = match counted.fetch_add(1, Ordering::SeqCst) {
            0 => request,
            _ => call("slow", json!({"seconds": 0})),
        };
        upstream.clone().oneshot(request)
    });
    let hedge = HedgeLayer::builder()
        .delay(Duration::from_millis(200))
        .tool("slow", |b| b.safe_to_hedge(true))
        .build()
        .unwrap();
    let answer = bounded(
        "hedged slow",
        LIMIT,
        hedge
            .layer(stuck_then_quick)
            .oneshot(call("slow", json!({"seconds": 30}))),
    )
    .await
    .unwrap();
    assert!(
        answer.first_text().unwrap().starts_with("slept 0"),
        "{answer:?}"
    );
    assert_eq!(copies.load(Ordering::SeqCst), 2);
    // The server saw notifications/cancelled for the stuck copy.
    let cancelled = eventually(LIMIT, || {
        let client = client.clone();
        async move {
            let stats = client.oneshot(call("stats", json!({}))).await.ok()?;
            let ServerResult::CallToolResult(r) = stats else {
                return None;
            };
            let n = r.structured_content?.get("slow_cancelled")?.as_u64()?;
            (n == 1).then_some(())
        }
    })
    .await;
    assert!(cancelled.is_some(), "the server never saw the cancellation");
    running.cancel().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_mid_call_answers_every_call() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let (running, pid) = stdio(&bin, &["stdio"]).await;
    let client = RmcpClient::new(running.peer().clone());
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(client.clone().oneshot(call(
                "trigger-long-running-operation",
                json!({"duration": 20, "steps": 2}),
            )))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = pid.expect("child pid");
    std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
    for call in in_flight {
        let result = bounded("an in-flight call", LIMIT, call).await.unwrap();
        let outcome = classify(&result);
        assert_eq!(outcome.kind, OutcomeKind::Transport, "{result:?}");
        assert_eq!(outcome.class, Some(FailureClass::Transient));
    }
    // And the next call fails fast instead of hanging.
    let after = bounded(
        "a call after the kill",
        LIMIT,
        client
            .clone()
            .oneshot(call("echo", json!({"message": "x"}))),
    )
    .await;
    assert_eq!(classify(&after).kind, OutcomeKind::Transport);
}

mod through_the_standard_stack {
    //! The same real servers behind the whole standard stack.

    use super::*;
    use toolwarden::circuit_breaker::CircuitState;
    use toolwarden::stack::StandardStack;
    use tower::Layer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_tools_are_answered_on_both_servers_and_never_trip_the_breaker() {
        let Some(everything) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
            return;
        };
        let Some(time) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
            return;
        };
        for (program, args) in [
            (everything, vec!["stdio"]),
            (time, vec!["--local-timezone", "UTC"]),
        ] {
            let (running, _) = stdio(&program, &args).await;
            let catalog = ToolCatalog::new();
            let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
            bounded("tools/list", LIMIT, client.refresh_catalog())
                .await
                .unwrap();
            let stack = StandardStack::builder()
                .catalog(catalog)
                .circuit_breaker(|b| b.failure_threshold(3).minimum_calls(3))
                .loop_guard(|b| b.tool("nope", |b| b.exempt(true)))
                .build()
                .unwrap();
            let svc = stack.layer(client);
            for _ in 0..6 {
                let result = bounded(
                    "an unknown tool",
                    LIMIT,
                    svc.clone().oneshot(call("nope", json!({}))),
                )
                .await;
                // Answered either way: an isError result (server-everything), or
                // the server's own -32602 JSON-RPC error (mcp-server-time).
                match &result {
                    Ok(r) => assert!(r.is_tool_error(), "{r:?}"),
                    Err(e) => {
                        assert_eq!(classify(&result).class, Some(FailureClass::Client), "{e}")
                    }
                }
            }
            assert_ne!(
                stack.registry().state("nope"),
                Some(CircuitState::Open),
                "{program:?}"
            );
            running.cancel().await.ok();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tools_are_called_through_the_stack() {
        let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
            return;
        };
        let (running, _) = stdio(&bin, &["stdio"]).await;
        let catalog = ToolCatalog::new();
        let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
        bounded("tools/list", LIMIT, client.refresh_catalog())
            .await
            .unwrap();
        catalog.set_trusted(true);
        let stack = StandardStack::builder().catalog(catalog).build().unwrap();
        let svc = stack.layer(client);
        let echo = bounded(
            "echo",
            LIMIT,
            svc.clone()
                .oneshot(call("echo", json!({"message": "stacked"}))),
        )
        .await
        .unwrap();
        assert_eq!(echo.first_text().as_deref(), Some("Echo: stacked"));
        let sum = bounded(
            "get-sum",
            LIMIT,
            svc.oneshot(call("get-sum", json!({"a": 40, "b": 2}))),
        )
        .await
        .unwrap();
        assert!(sum.first_text().unwrap().contains("42"));
        let stats = serde_json::to_value(stack.stats().snapshot())
            .unwrap()
            .to_string();
        assert!(
            stats.contains("echo") && stats.contains("get-sum"),
            "{stats}"
        );
        running.cancel().await.ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_operation_past_the_deadline_returns_in_time_and_is_cancelled_upstream() {
        let Some(python) = component("TOOLWARDEN_PYTHON") else {
            return;
        };
        let script = flaky_server_script();
        let (running, _) = stdio(&python, &[script.to_str().unwrap()]).await;
        let client = RmcpClient::new(running.peer().clone());
        let stack = StandardStack::builder()
            .attempt_timeout(Duration::from_millis(300))
            .retry_deadline(Duration::from_secs(1))
            .build()
            .unwrap();
        let result = bounded(
            "a call past its deadline",
            LIMIT,
            stack
                .layer(client.clone())
                .oneshot(call("slow", json!({"seconds": 30}))),
        )
        .await
        .unwrap();
        // The deadline fired (not the tool finishing): a readable timeout.
        assert!(result.is_tool_error());
        let text = result.first_text().unwrap().into_owned();
        assert!(
            text.contains("timed out") || text.contains("timeout") || text.contains("elapsed"),
            "{text}"
        );
        let cancelled = eventually(LIMIT, || {
            let client = client.clone();
            async move {
                let ServerResult::CallToolResult(r) =
                    client.oneshot(call("stats", json!({}))).await.ok()?
                else {
                    return None;
                };
                (r.structured_content?.get("slow_cancelled")?.as_u64()? >= 1).then_some(())
            }
        })
        .await;
        assert!(cancelled.is_some(), "the server never saw the cancellation");
        running.cancel().await.ok();
    }
}
