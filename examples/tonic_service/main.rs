//! A gRPC service on tonic whose tool calls pass through toolwarden's
//! standard stack: MCP over gRPC (`proto/toolwarden/mcp_tools.proto`,
//! package `toolwarden.mcp.v1`, with `ListTools` and `CallTool`).
//!
//! Run: `cargo run --example tonic_service`. It starts the server on an
//! ephemeral loopback port, calls it with a tonic client over TCP, prints
//! what each layer did, and exits (a few seconds). With `--serve` it serves
//! on `127.0.0.1:50151` until interrupted.
//!
//! How it is put together, where the stack sits and why, and the table
//! that maps each refusal to a gRPC status are in the docs of `grpc.rs`
//! (next to this file). In short: the generated `McpTools::call_tool` turns
//! the protobuf request into an MCP `tools/call` and drives
//! `StandardStack` over a tool handler (a `tower::Service`); a tool's
//! `isError` stays an `OK` answer with `is_error = true`, a stale answer is
//! marked in `stale`, and a refusal is a gRPC status (`RESOURCE_EXHAUSTED`,
//! `UNAVAILABLE`, `FAILED_PRECONDITION`, ...) whose message is what the MCP
//! rendering tells a model, with `retry-after-ms` metadata when the layer
//! knows when to come back.
//!
//! The gRPC code (`toolwarden.mcp.v1.rs`) is generated and checked in; see
//! `tests/tonic_codegen.rs` to regenerate it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod grpc;
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
#[path = "toolwarden.mcp.v1.rs"]
mod pb;

use grpc::{EventLog, LAYER, RETRY_AFTER_MS};
use pb::mcp_tools_client::McpToolsClient;
use pb::{CallToolRequest, ListToolsRequest};
use tonic::transport::{Channel, Endpoint};
use toolwarden_core::BoxError;

type Client = McpToolsClient<Channel>;

/// Calls `tool` and prints the answer, or the status and its metadata.
async fn call(client: &mut Client, tool: &str, arguments: &str) -> Result<(), BoxError> {
    let request = CallToolRequest {
        name: tool.to_owned(),
        arguments_json: arguments.to_owned(),
    };
    match client.call_tool(request).await {
        Ok(response) => {
            let response = response.into_inner();
            let text = response.content.first().map_or("", |c| c.text.as_str());
            let text = text.lines().next().unwrap_or_default();
            match (&response.stale, response.is_error) {
                (Some(stale), _) => println!(
                    "  {tool} {arguments} -> OK, stale ({:.1} s old: {}): {text}",
                    stale.age_seconds, stale.reason
                ),
                (None, true) => println!("  {tool} {arguments} -> OK, is_error: {text}"),
                (None, false) => println!("  {tool} {arguments} -> OK: {text}"),
            }
        }
        Err(status) => {
            let meta = |key: &str| {
                status
                    .metadata()
                    .get(key)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| format!(" {key}={v}"))
                    .unwrap_or_default()
            };
            println!(
                "  {tool} {arguments} -> {:?}{}{}: {}",
                status.code(),
                meta(LAYER),
                meta(RETRY_AFTER_MS),
                status.message()
            );
        }
    }
    Ok(())
}

fn scene(title: &str) {
    println!("\n{title}");
}

fn report(log: &EventLog, calls: &grpc::HandlerCalls, tool: &str) {
    let events = log.take();
    println!(
        "  layers: {}; the handler saw {} call(s) to {tool}",
        if events.is_empty() {
            "nothing to report".to_owned()
        } else {
            events.join(", ")
        },
        calls.get(tool)
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let serve_forever = std::env::args().any(|a| a == "--serve");
    let (tools, calls) = grpc::demo_tools();
    let log = EventLog::default();
    let stack = grpc::demo_stack(&tools, &log).await?;
    let addr = if serve_forever {
        "127.0.0.1:50151"
    } else {
        "127.0.0.1:0"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let server = grpc::serve(listener, grpc::grpc_service(&stack, tools))?;
    println!(
        "serving toolwarden.mcp.v1.McpTools at http://{}",
        server.addr
    );
    if serve_forever {
        tokio::signal::ctrl_c().await?;
        return server.stop().await;
    }

    let channel = Endpoint::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await?;
    let mut client = McpToolsClient::new(channel);

    let tools = client.list_tools(ListToolsRequest {}).await?.into_inner();
    let names: Vec<_> = tools.tools.iter().map(|t| t.name.as_str()).collect();
    println!("tools: {}", names.join(", "));

    scene("retry: quote fails every other call; the stack retries it");
    call(&mut client, "quote", r#"{"topic":"rust"}"#).await?;
    report(&log, &calls, "quote");

    scene("circuit breaker: inventory always fails; after 3 failures its circuit opens");
    for sku in 1..=4 {
        call(&mut client, "inventory", &format!(r#"{{"sku":"{sku}"}}"#)).await?;
    }
    report(&log, &calls, "inventory");

    scene("rate limit: search allows 2 calls a minute");
    for q in ["tower", "tonic", "prost"] {
        call(&mut client, "search", &format!(r#"{{"q":"{q}"}}"#)).await?;
    }
    report(&log, &calls, "search");

    scene("loop guard: the same failing lookup, again and again");
    for _ in 0..4 {
        call(&mut client, "lookup", r#"{"order":"42"}"#).await?;
    }
    report(&log, &calls, "lookup");

    scene("fallback cache: weather answers once, then its backend goes down");
    for _ in 0..2 {
        call(&mut client, "weather", r#"{"city":"Lisbon"}"#).await?;
    }
    report(&log, &calls, "weather");

    scene("bad input is refused before the stack");
    call(&mut client, "search", "[1, 2]").await?;
    call(&mut client, "nope", "{}").await?;

    println!("\nper-tool statistics (observability):");
    let snapshot = serde_json::to_value(stack.stats().snapshot())?;
    for tool in snapshot["tools"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        println!(
            "  {:<10} calls {}  errors {}  outcomes {}",
            tool["name"].as_str().unwrap_or_default(),
            tool["calls"],
            tool["errors"],
            tool["outcomes"]
        );
    }
    server.stop().await
}
