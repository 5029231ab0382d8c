//! End-to-end: the built `toolwarden` binary in front of real MCP servers —
//! server-everything (TypeScript SDK) over stdio and Streamable HTTP,
//! mcp-server-time and the flaky test server (Python SDK) over stdio — with
//! clients over stdio (raw JSON-RPC lines) and Streamable HTTP (rmcp).
//!
//! The components come from `TOOLWARDEN_*` variables (see `support::component`);
//! every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResponse};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt as _;
use serde_json::{json, Value};
use support::{
    alive, bounded, component, eventually, flaky_server_script, free_port, health, http_get,
    http_post, kill, KeepAlive, Proxy, LIMIT,
};
use tokio::process::Command;

/// These tests check how a server's own answer to an unknown tool is passed
/// through, so the proxy must let the call reach it: its refusal of tools
/// not in the catalog (`limits.reject_unknown_tools`, on by default) is
/// tested in `http_hardening.rs`.
const PASS_UNKNOWN_TOOLS: &[(&str, &str)] = &[("TOOLWARDEN_LIMITS_REJECT_UNKNOWN_TOOLS", "false")];

fn text_of(response: &Value) -> String {
    response["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn tool_names(response: &Value) -> Vec<String> {
    response["result"]["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_over_stdio_through_the_proxy() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let mut proxy = Proxy::start(
        &[
            "run",
            "--metrics-addr",
            &metrics_addr,
            "--",
            bin.to_str().unwrap(),
            "stdio",
        ],
        PASS_UNKNOWN_TOOLS,
    );

    // Before any client the upstream is idle, and that is healthy.
    let (status, report) = eventually(LIMIT, || health(metrics))
        .await
        .expect("/health answers");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["upstream"]["state"], "idle");

    let init = proxy.initialize().await;
    assert_eq!(
        init["serverInfo"]["name"], "mcp-servers/everything",
        "{init}"
    );
    assert_eq!(init["protocolVersion"], "2025-06-18");

    let listed = proxy.request(1, "tools/list", json!({})).await;
    let names = tool_names(&listed);
    for tool in ["echo", "get-sum", "trigger-long-running-operation"] {
        assert!(
            names.iter().any(|n| n == tool),
            "{tool} not listed: {names:?}"
        );
    }

    let echo = proxy.call(2, "echo", json!({"message": "hello"})).await;
    assert_eq!(text_of(&echo), "Echo: hello", "{echo}");

    // server-everything answers an unknown tool with an isError result.
    let unknown = proxy.call(3, "nope", json!({})).await;
    assert_eq!(unknown["result"]["isError"], true, "{unknown}");
    assert!(text_of(&unknown).contains("nope"), "{unknown}");

    // A malformed line is answered -32700 and the session goes on.
    proxy.send_raw(b"{this is not json\n").await;
    let parse_error = proxy.recv().await;
    assert_eq!(parse_error["error"]["code"], -32700, "{parse_error}");
    assert_eq!(parse_error["id"], Value::Null);
    let after = proxy
        .call(4, "echo", json!({"message": "still here"}))
        .await;
    assert_eq!(text_of(&after), "Echo: still here");
    // An invalid request with a readable id is answered -32600 with that id.
    proxy
        .send_raw(b"{\"jsonrpc\":\"1.0\",\"id\":77,\"method\":\"ping\"}\n")
        .await;
    let invalid = proxy.recv().await;
    assert_eq!(
        (invalid["error"]["code"].as_i64(), invalid["id"].as_i64()),
        (Some(-32600), Some(77))
    );

    // Progress reaches the client under its own token.
    proxy
        .send(
            &json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
                "name": "trigger-long-running-operation",
                "arguments": {"duration": 0.6, "steps": 3},
                "_meta": {"progressToken": "p-5"},
            }}),
        )
        .await;
    let (done, notifications) = proxy.response(&json!(5)).await;
    assert!(text_of(&done).contains("completed"), "{done}");
    let progress: Vec<&Value> = notifications
        .iter()
        .filter(|n| n["method"] == "notifications/progress")
        .collect();
    assert!(
        !progress.is_empty(),
        "no progress came through: {notifications:?}"
    );
    assert!(
        progress
            .iter()
            .all(|n| n["params"]["progressToken"] == "p-5"),
        "{progress:?}"
    );

    // /metrics, /health and /circuits.
    let (status, text) = http_get(metrics, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(text.contains("toolwarden_proxy_requests_total"), "{text}");
    assert!(
        text.contains("toolwarden_proxy_malformed_messages_total"),
        "{text}"
    );
    // The stack's own metrics: the observability layer's duration histogram
    // (OpenTelemetry MCP names) for the tools called above.
    assert!(text.contains("mcp_client_operation_duration"), "{text}");
    assert!(text.contains("gen_ai_tool_name=\"echo\""), "{text}");
    let (status, report) = health(metrics).await.expect("/health answers");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["upstream"]["state"], "up");
    assert_eq!(report["checks"][0]["name"], "circuits", "{report}");
    let pid = report["upstream"]["pid"].as_u64().expect("the child's pid") as u32;
    let (status, circuits) = http_get(metrics, "/circuits")
        .await
        .expect("/circuits answers");
    assert_eq!(status, 200);
    let circuits: Value = serde_json::from_str(&circuits).unwrap();
    let echo_circuit = circuits["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "echo")
        .unwrap_or_else(|| panic!("no circuit for echo: {circuits}"));
    assert_eq!(echo_circuit["state"], "closed", "{circuits}");

    // Kill the upstream mid-call: the call is answered, the child restarted.
    proxy
        .send(
            &json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {
                "name": "trigger-long-running-operation", "arguments": {"duration": 20, "steps": 2},
            }}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(pid, "KILL");
    let (interrupted, _) = bounded(
        "the answer to the interrupted call",
        LIMIT,
        proxy.response(&json!(6)),
    )
    .await;
    assert_eq!(interrupted["result"]["isError"], true, "{interrupted}");
    assert!(
        text_of(&interrupted).contains("trigger-long-running-operation"),
        "{interrupted}"
    );
    let restarted = eventually(LIMIT, || async {
        let (_, report) = health(metrics).await?;
        let new_pid = report["upstream"]["pid"].as_u64()?;
        (report["upstream"]["state"] == "up" && new_pid as u32 != pid).then_some(report)
    })
    .await
    .expect("the upstream was restarted");
    assert!(
        restarted["upstream"]["restarts"].as_u64() >= Some(1),
        "{restarted}"
    );
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut id = 100;
    loop {
        id += 1;
        let echoed = proxy
            .call(id, "echo", json!({"message": "after restart"}))
            .await;
        if text_of(&echoed) == "Echo: after restart" {
            break;
        }
        // While the child restarts, calls are answered at once with a readable error.
        assert_eq!(echoed["result"]["isError"], true, "{echoed}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls never worked again: {echoed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive(pid), "the killed child is gone");

    // Closing stdin shuts the proxy down cleanly, child included.
    let new_pid = restarted["upstream"]["pid"].as_u64().unwrap() as u32;
    let status = proxy.close_and_wait().await;
    assert!(status.success(), "exit status {status:?}");
    let gone = eventually(LIMIT, || async move { (!alive(new_pid)).then_some(()) }).await;
    assert!(gone.is_some(), "the child outlived the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_server_time_over_stdio_through_the_proxy() {
    let Some(bin) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
        return;
    };
    let mut proxy = Proxy::start(
        &[
            "run",
            "--",
            bin.to_str().unwrap(),
            "--local-timezone",
            "UTC",
        ],
        PASS_UNKNOWN_TOOLS,
    );
    let init = proxy.initialize().await;
    assert_eq!(init["serverInfo"]["name"], "mcp-time", "{init}");

    let names = tool_names(&proxy.request(1, "tools/list", json!({})).await);
    assert!(names.contains(&"get_current_time".to_owned()), "{names:?}");
    assert!(names.contains(&"convert_time".to_owned()), "{names:?}");

    let now = proxy
        .call(2, "get_current_time", json!({"timezone": "UTC"}))
        .await;
    assert_eq!(now["result"]["isError"], false, "{now}");
    assert_eq!(now["result"]["structuredContent"]["timezone"], "UTC");

    // mcp-server-time answers an unknown tool with a JSON-RPC error; the
    // fallback cache (degrade = true by default) turns it into a result the
    // model reads: the server's error, its class, what to change.
    let unknown = proxy.call(3, "nope", json!({})).await;
    assert_eq!(unknown["result"]["isError"], true, "{unknown}");
    let facts = &unknown["result"]["structuredContent"]["toolwarden"];
    assert_eq!(facts["class"], "client", "{unknown}");
    let error = facts["error"].as_str().unwrap();
    assert!(
        error.contains("-32602") && error.contains("Unknown tool: nope"),
        "{unknown}"
    );
    // With degraded answers off, the server's JSON-RPC error passes through.
    let mut plain = Proxy::start(
        &[
            "run",
            "--",
            bin.to_str().unwrap(),
            "--local-timezone",
            "UTC",
        ],
        &[
            ("TOOLWARDEN_FALLBACK_CACHE_DEGRADE", "false"),
            // The server's own answer to an unknown tool is what is tested
            // (the proxy refuses names it knows are not listed otherwise).
            PASS_UNKNOWN_TOOLS[0],
        ],
    );
    plain.initialize().await;
    let unknown = plain.call(3, "nope", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");
    assert_eq!(unknown["error"]["message"], "Unknown tool: nope");
    assert!(plain.terminate().await.success());

    // A tool failure stays the server's isError result.
    let bad = proxy
        .call(4, "get_current_time", json!({"timezone": "Mars/Olympus"}))
        .await;
    assert_eq!(bad["result"]["isError"], true, "{bad}");

    // SIGTERM: a clean exit.
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancel_cancels_the_call_upstream() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let script = flaky_server_script();
    let mut proxy = Proxy::start(
        &[
            "run",
            "--",
            python.to_str().unwrap(),
            script.to_str().unwrap(),
        ],
        &[],
    );
    proxy.initialize().await;
    proxy
        .send(
            &json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {
                "name": "slow", "arguments": {"seconds": 30},
            }}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy
        .send(&json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 10, "reason": "test"}}))
        .await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut id = 20;
    loop {
        id += 1;
        let stats = proxy.call(id, "stats", json!({})).await;
        if stats["result"]["structuredContent"]["slow_cancelled"].as_u64() == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never saw the cancellation: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = proxy.close_and_wait().await;
    assert!(status.success());
}

/// server-everything serving Streamable HTTP; killed on drop.
struct HttpServer {
    child: tokio::process::Child,
    url: String,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn server_everything_http(bin: &std::path::Path) -> HttpServer {
    server_everything_http_on(bin, free_port()).await
}

async fn server_everything_http_on(bin: &std::path::Path, port: u16) -> HttpServer {
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
    let probe = eventually(LIMIT, || {
        let url = url.clone();
        async move { ().serve(StreamableHttpClientTransport::from_uri(url)).await.ok() }
    })
    .await
    .expect("server-everything answers over Streamable HTTP");
    let _ = probe.cancel().await;
    server
}

/// `toolwarden run --upstream-url URL --listen … --metrics-addr …` with
/// `env`, an rmcp client of it over Streamable HTTP, and its two ports
/// (clients, metrics).
async fn http_proxy_in_front_of(
    url: &str,
    env: &[(&str, &str)],
) -> (
    Proxy,
    rmcp::service::RunningService<rmcp::RoleClient, ()>,
    (u16, u16),
) {
    let listen = free_port();
    let metrics = free_port();
    let (listen_addr, metrics_addr) = (
        format!("127.0.0.1:{listen}"),
        format!("127.0.0.1:{metrics}"),
    );
    let proxy = Proxy::start(
        &[
            "run",
            "--upstream-url",
            url,
            "--listen",
            &listen_addr,
            "--metrics-addr",
            &metrics_addr,
        ],
        env,
    );
    let url = format!("http://127.0.0.1:{listen}/mcp");
    let client = eventually(LIMIT, || {
        let url = url.clone();
        async move { ().serve(StreamableHttpClientTransport::from_uri(url)).await.ok() }
    })
    .await
    .expect("the proxy answers over Streamable HTTP");
    (proxy, client, (listen, metrics))
}

/// server-everything over HTTP is killed while a call runs, and started
/// again on its port: the call in flight is answered at once with an error
/// (not its timeout), and the proxy reconnects. server-everything answers
/// a session it does not know with a 400 and an error that names no
/// request; rmcp kept the old session for good, so every later call timed
/// out and `/health` still said "up".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_restarted_on_its_port_is_reconnected_to() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let port = free_port();
    let mut upstream = server_everything_http_on(&bin, port).await;
    let (_proxy, client, (_, metrics)) = http_proxy_in_front_of(&upstream.url, &[]).await;
    let echo = |message: &str| {
        let mut params = CallToolRequestParams::new("echo");
        params.arguments = json!({ "message": message }).as_object().cloned();
        let peer = client.peer().clone();
        async move {
            match peer.call_tool_once(params).await {
                Ok(CallToolResponse::Complete(result)) => serde_json::to_value(&result).ok(),
                _ => None,
            }
        }
    };
    let first = bounded("echo", LIMIT, echo("before")).await.unwrap();
    assert_eq!(first["content"][0]["text"], "Echo: before", "{first}");

    let mut long = CallToolRequestParams::new("trigger-long-running-operation");
    long.arguments = json!({"duration": 60, "steps": 60}).as_object().cloned();
    let peer = client.peer().clone();
    let in_flight = tokio::spawn(async move { peer.call_tool_once(long).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    upstream.child.kill().await.unwrap();
    drop(upstream);
    let answer = bounded("the call in flight", LIMIT, in_flight)
        .await
        .unwrap()
        .expect("an answer");
    let CallToolResponse::Complete(answer) = answer else {
        panic!("{answer:?}")
    };
    let answer = serde_json::to_value(&answer).unwrap();
    assert_eq!(answer["isError"], true, "{answer}");
    let class = &answer["structuredContent"]["toolwarden"]["class"];
    assert_eq!(class, "transient", "{answer}");
    assert!(
        !answer.to_string().contains("timed out"),
        "answered by its timeout, not by the connection's loss: {answer}"
    );

    let _upstream = server_everything_http_on(&bin, port).await;
    let back = eventually(LIMIT, || async {
        let answer = echo("after").await?;
        (answer["content"][0]["text"] == "Echo: after").then_some(answer)
    })
    .await;
    assert!(back.is_some(), "the proxy never reconnected");
    let (_, report) = health(metrics).await.expect("/health answers");
    assert_eq!(report["upstream"]["state"], "up", "{report}");
    assert!(
        report["upstream"]["restarts"].as_u64() >= Some(1),
        "{report}"
    );
    let _ = client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_on_both_sides() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let upstream = server_everything_http(&bin).await;
    let (mut proxy, client, (listen, metrics)) =
        http_proxy_in_front_of(&upstream.url, PASS_UNKNOWN_TOOLS).await;
    let info = client.peer().peer_info().expect("initialize result");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("mcp-servers/everything")
    );

    let tools = bounded("tools/list", LIMIT, client.peer().list_all_tools())
        .await
        .unwrap();
    assert!(tools.iter().any(|t| t.name == "echo"), "{tools:?}");

    let mut params = CallToolRequestParams::new("echo");
    params.arguments = json!({"message": "over http"}).as_object().cloned();
    let echo = bounded("echo", LIMIT, client.peer().call_tool_once(params))
        .await
        .unwrap();
    let CallToolResponse::Complete(echo) = echo else {
        panic!("{echo:?}")
    };
    let echo = serde_json::to_value(&echo).unwrap();
    assert_eq!(echo["content"][0]["text"], "Echo: over http", "{echo}");

    let mut params = CallToolRequestParams::new("nope");
    params.arguments = Some(Default::default());
    let unknown = bounded("nope", LIMIT, client.peer().call_tool_once(params))
        .await
        .unwrap();
    let CallToolResponse::Complete(unknown) = unknown else {
        panic!("{unknown:?}")
    };
    assert_eq!(unknown.is_error, Some(true));

    let (status, report) = health(metrics).await.expect("/health answers");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["upstream"]["state"], "up");
    assert_eq!(report["upstream"]["target"], upstream.url.as_str());
    let (status, text) = http_get(metrics, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(text.contains("toolwarden_proxy_requests_total"), "{text}");

    // A body that is not JSON is answered -32700, and the proxy keeps serving.
    let (status, body) = http_post(listen, "/mcp", "{not json")
        .await
        .expect("POST answers");
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], -32700, "{body}");
    let mut params = CallToolRequestParams::new("echo");
    params.arguments = json!({"message": "again"}).as_object().cloned();
    assert!(bounded("echo", LIMIT, client.peer().call_tool_once(params))
        .await
        .is_ok());

    let _ = client.cancel().await;
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_client_with_an_http_upstream() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let upstream = server_everything_http(&bin).await;
    let mut proxy = Proxy::start(&["run", "--upstream-url", &upstream.url], &[]);
    proxy.initialize().await;
    let echo = proxy
        .call(1, "echo", json!({"message": "stdio to http"}))
        .await;
    assert_eq!(text_of(&echo), "Echo: stdio to http", "{echo}");
    let status = proxy.close_and_wait().await;
    assert!(status.success());
}

/// An rmcp client of the proxy's Streamable HTTP endpoint on `listen`, once
/// the proxy answers there.
async fn http_client(listen: u16) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    let url = format!("http://127.0.0.1:{listen}/mcp");
    eventually(LIMIT, || {
        let url = url.clone();
        async move { ().serve(StreamableHttpClientTransport::from_uri(url)).await.ok() }
    })
    .await
    .expect("the proxy answers over Streamable HTTP")
}

/// One `tools/call` over the rmcp client, bounded, as JSON.
async fn http_call(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    name: &'static str,
    arguments: Value,
) -> Value {
    let mut params = CallToolRequestParams::new(name);
    params.arguments = arguments.as_object().cloned();
    let answer = bounded(name, LIMIT, client.peer().call_tool_once(params))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let CallToolResponse::Complete(result) = answer else {
        panic!("{name}: {answer:?}")
    };
    serde_json::to_value(&result).unwrap()
}

/// `toolwarden run --listen … --metrics-addr … -- <upstream>` on free ports:
/// the proxy, its MCP port and its metrics port.
fn proxy_over_http(upstream: &[&str]) -> (Proxy, u16, u16) {
    proxy_over_http_with(&[], upstream)
}

/// [`proxy_over_http`] with `options` for `toolwarden run` too.
fn proxy_over_http_with(options: &[&str], upstream: &[&str]) -> (Proxy, u16, u16) {
    let listen = free_port();
    let metrics = free_port();
    let (listen_addr, metrics_addr) = (
        format!("127.0.0.1:{listen}"),
        format!("127.0.0.1:{metrics}"),
    );
    let mut args = vec![
        "run",
        "--listen",
        &listen_addr,
        "--metrics-addr",
        &metrics_addr,
    ];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(upstream);
    (Proxy::start(&args, PASS_UNKNOWN_TOOLS), listen, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_server_time_behind_the_proxy_over_http() {
    let Some(bin) = component("TOOLWARDEN_MCP_SERVER_TIME") else {
        return;
    };
    let (mut proxy, listen, metrics) =
        proxy_over_http(&[bin.to_str().unwrap(), "--local-timezone", "UTC"]);
    let client = http_client(listen).await;
    let info = client.peer().peer_info().expect("initialize result");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("mcp-time")
    );
    let tools = bounded("tools/list", LIMIT, client.peer().list_all_tools())
        .await
        .unwrap();
    assert!(
        tools.iter().any(|t| t.name == "get_current_time"),
        "{tools:?}"
    );

    let now = http_call(&client, "get_current_time", json!({"timezone": "UTC"})).await;
    assert_eq!(now["isError"], false, "{now}");
    assert_eq!(now["structuredContent"]["timezone"], "UTC", "{now}");

    // The server's JSON-RPC error for an unknown tool, degraded into a result.
    let unknown = http_call(&client, "nope", json!({})).await;
    assert_eq!(unknown["isError"], true, "{unknown}");
    assert_eq!(
        unknown["structuredContent"]["toolwarden"]["class"], "client",
        "{unknown}"
    );

    let (status, text) = http_get(metrics, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(
        text.contains("gen_ai_tool_name=\"get_current_time\""),
        "{text}"
    );
    let (status, report) = health(metrics).await.expect("/health answers");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["upstream"]["state"], "up", "{report}");
    assert_eq!(
        report["runtime"]["worker_threads"], 1,
        "the default: {report}"
    );

    // A body that is not JSON-RPC: -32600 with HTTP 400; the session goes on.
    let (status, body) = http_post(listen, "/mcp", r#"{"jsonrpc":"2.0","id":7}"#)
        .await
        .expect("POST answers");
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], -32600, "{body}");
    assert_eq!(body["id"], 7, "{body}");
    let again = http_call(&client, "get_current_time", json!({"timezone": "UTC"})).await;
    assert_eq!(again["isError"], false, "{again}");

    let _ = client.cancel().await;
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_the_upstream_killed_mid_call_is_restarted_with_no_hung_call() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    let (mut proxy, listen, metrics) = proxy_over_http(&[bin.to_str().unwrap()]);
    let client = http_client(listen).await;
    let echo = http_call(&client, "echo", json!({"message": "before"})).await;
    assert_eq!(echo["content"][0]["text"], "Echo: before", "{echo}");
    let (_, report) = health(metrics).await.expect("/health answers");
    let pid = report["upstream"]["pid"].as_u64().expect("the child's pid") as u32;

    // Two calls in flight when the child dies: each gets exactly one answer.
    let peer = client.peer().clone();
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let peer = peer.clone();
            tokio::spawn(async move {
                let mut params = CallToolRequestParams::new("trigger-long-running-operation");
                params.arguments = json!({"duration": 20, "steps": 2}).as_object().cloned();
                peer.call_tool_once(params).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(pid, "KILL");
    for call in in_flight {
        let answer = bounded("an interrupted call", LIMIT, call)
            .await
            .expect("the task ran");
        let answer = answer.expect("answered as a tool result, not a transport error");
        let CallToolResponse::Complete(result) = answer else {
            panic!("{answer:?}")
        };
        let result = serde_json::to_value(&result).unwrap();
        assert_eq!(result["isError"], true, "{result}");
        // The degraded answer names the call and says the upstream went away.
        let facts = &result["structuredContent"]["toolwarden"];
        assert_eq!(facts["tool"], "trigger-long-running-operation", "{result}");
        assert_eq!(facts["kind"], "transport", "{result}");
    }

    let restarted = eventually(LIMIT, || async {
        let (_, report) = health(metrics).await?;
        let new_pid = report["upstream"]["pid"].as_u64()?;
        (report["upstream"]["state"] == "up" && new_pid as u32 != pid).then_some(report)
    })
    .await
    .expect("the upstream was restarted");
    assert!(
        restarted["upstream"]["restarts"].as_u64() >= Some(1),
        "{restarted}"
    );
    // The same HTTP session works again once the child is back.
    let worked = eventually(LIMIT, || async {
        let echo = http_call(&client, "echo", json!({"message": "after"})).await;
        (echo["content"][0]["text"] == "Echo: after").then_some(())
    })
    .await;
    assert!(
        worked.is_some(),
        "calls never worked again after the restart"
    );
    assert!(!alive(pid), "the killed child is gone");

    let _ = client.cancel().await;
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}

/// Issue 15, scenario 3: an agent polling one call every 0.5 s while its
/// upstream restarts (a real child that takes 4 s to start again) was
/// refused by the loop guard, then by an open circuit, for about 30 s after
/// the upstream was back. Failures of an upstream that is down build no
/// loop, and a failure before sending opens no circuit, so the agent is
/// served again within 2 s of `/health` reporting the new child up: no
/// poll is refused by either layer, and at most three polls (1.5 s of
/// them) fail once `/health` has reported the new child up. Counted in
/// polls, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_polling_through_an_upstream_restart_is_served_again() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let flaky = flaky_server_script();
    let marker = std::env::temp_dir().join(format!("toolwarden-restart-{}", free_port()));
    let _ = std::fs::remove_file(&marker);
    // The first start is quick; every later one takes 4 s, as a real
    // server's would (loading, connecting to its own backends).
    let start = format!(
        "if [ -e '{marker}' ]; then sleep 4; fi; touch '{marker}'; exec '{python}' '{flaky}'",
        marker = marker.display(),
        python = python.display(),
        flaky = flaky.display(),
    );
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let mut proxy = Proxy::start(
        &[
            "run",
            "--metrics-addr",
            &metrics_addr,
            "--",
            "sh",
            "-c",
            &start,
        ],
        &[("FLAKY_FAILURES", "0")],
    );
    proxy.initialize().await;
    async fn poll(proxy: &mut Proxy, id: i64) -> Value {
        let call = proxy.call(id, "flaky_search", json!({"query": "job 7 status"}));
        bounded("a poll", LIMIT, call).await
    }
    let first = poll(&mut proxy, 1).await;
    assert!(
        text_of(&first).starts_with("results for 'job 7 status'"),
        "{first}"
    );

    let (_, report) = health(metrics).await.expect("/health answers");
    let pid = report["upstream"]["pid"].as_u64().expect("the child's pid") as u32;
    kill(pid, "KILL");

    // Watch /health for the new child; poll every 0.5 s meanwhile.
    let up_at = std::sync::Arc::new(std::sync::Mutex::new(None));
    let watcher = {
        let up_at = std::sync::Arc::clone(&up_at);
        tokio::spawn(async move {
            loop {
                let up = health(metrics).await.is_some_and(|(_, report)| {
                    report["upstream"]["state"] == "up"
                        && report["upstream"]["pid"]
                            .as_u64()
                            .is_some_and(|p| p as u32 != pid)
                });
                if up {
                    *up_at.lock().unwrap() = Some(tokio::time::Instant::now());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut failed_after_up = 0;
    let mut id = 10;
    loop {
        id += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answer = poll(&mut proxy, id).await;
        let text = text_of(&answer);
        if text.starts_with("results for 'job 7 status'") {
            break;
        }
        let layer = answer["result"]["structuredContent"]["toolwarden"]["layer"].clone();
        let after_up = up_at.lock().unwrap().is_some();
        seen.push(format!("{layer} (child up: {after_up}): {text}"));
        if after_up {
            failed_after_up += 1;
        }
        for refused_by in ["loop_guard", "circuit_breaker"] {
            assert_ne!(
                layer, refused_by,
                "{refused_by} refused a poll through a restart: {seen:#?}"
            );
        }
        assert!(id < 100, "never served again: {seen:#?}");
    }
    bounded("the health watcher", LIMIT, watcher).await.unwrap();
    assert!(
        up_at.lock().unwrap().is_some(),
        "the watcher saw the new child"
    );
    // The issue's bound in polls: served within four polls (2 s at the
    // agent's pace) of the upstream answering again (it was about 60: a
    // loop-guard refusal, then an open circuit).
    assert!(
        failed_after_up <= 3,
        "{failed_after_up} polls failed after the upstream was back: {seen:#?}"
    );
    assert!(!seen.is_empty(), "the restart was seen by the agent");
    let _ = std::fs::remove_file(&marker);
}

/// Issue 16: through `--listen`, every call of a client that keeps its
/// connection alive took 44 ms: the answer left in small writes on a socket
/// without `TCP_NODELAY`, and the second waited for the client's delayed
/// ACK (a fixed 40 ms on Linux; a call takes about 1 ms otherwise). The
/// cause is checked on the socket, without timing anything
/// (`accepted_connections_write_without_nagle` in
/// `downstream/http/serve.rs`); this is the whole path for such a client:
/// 20 calls on one connection, each answered on it, in order, with its own
/// echo. Its speed is measured by the peer harness (`crates/proxy/peers`),
/// never asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_client_is_answered_every_call_on_one_connection() {
    let Some(bin) = component("TOOLWARDEN_SERVER_EVERYTHING") else {
        return;
    };
    // On more than one worker, as the flag allows (one is the default).
    let (_proxy, listen, metrics) = proxy_over_http_with(
        &["--worker-threads", "3"],
        &[bin.to_str().unwrap(), "stdio"],
    );
    let mut client = KeepAlive::connect(listen).await;
    client.open_session().await;
    for id in 1..=20 {
        let (status, body) = bounded(
            "a call on the kept-alive connection",
            LIMIT,
            client.post_with(
                &[],
                &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
                    "name": "echo", "arguments": {"message": format!("call {id}")},
                }}),
            ),
        )
        .await;
        assert!(status.contains("200"), "{status}");
        assert!(body.contains(&format!("\"id\":{id}")), "call {id}: {body}");
        assert!(
            body.contains(&format!("Echo: call {id}")),
            "call {id}: {body}"
        );
    }
    let (_, report) = health(metrics).await.expect("/health answers");
    assert_eq!(report["runtime"]["worker_threads"], 3, "{report}");
}
