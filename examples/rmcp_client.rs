//! An rmcp client calling a real MCP server through the standard stack.
//!
//! Run against any stdio server:
//! `cargo run --example rmcp_client -- npx -y @modelcontextprotocol/server-everything stdio`
//! (or the pinned copy: `tests/e2e/node/node_modules/.bin/mcp-server-everything stdio`).
//! With no command it starts server-everything from `TOOLWARDEN_SERVER_EVERYTHING`.
//!
//! It lists the tools into the catalog (trusting their annotations, so
//! read-only tools are retried and cached), then calls `echo` and an unknown
//! tool, and prints what came back and the per-tool statistics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rmcp::model::{CallToolRequest, CallToolRequestParams, ClientRequest};
use rmcp::transport::TokioChildProcess;
use rmcp::ServiceExt as _;
use serde_json::json;
use toolwarden::rmcp::RmcpClient;
use toolwarden::stack::StandardStack;
use toolwarden_core::{McpResponse, ToolCatalog};
use tower::{Layer, ServiceExt};

fn call(name: &str, args: serde_json::Value) -> ClientRequest {
    let mut params = CallToolRequestParams::new(name.to_owned());
    params.arguments = args.as_object().cloned();
    ClientRequest::CallToolRequest(CallToolRequest::new(params))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        let Ok(bin) = std::env::var("TOOLWARDEN_SERVER_EVERYTHING") else {
            eprintln!(
                "usage: rmcp_client -- <command> [args]   (or set TOOLWARDEN_SERVER_EVERYTHING)"
            );
            std::process::exit(2);
        };
        args = vec![bin, "stdio".into()];
    }
    let mut command = tokio::process::Command::new(&args[0]);
    command.args(&args[1..]).stderr(std::process::Stdio::null());
    let running = ().serve(TokioChildProcess::new(command)?).await?;

    let catalog = ToolCatalog::new();
    let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
    let tools = client.refresh_catalog().await?;
    catalog.set_trusted(true);
    println!("{tools} tools listed");

    let stack = StandardStack::builder().catalog(catalog).build()?;
    let svc = stack.layer(client);

    let echo = svc
        .clone()
        .oneshot(call("echo", json!({"message": "hello through toolwarden"})))
        .await?;
    println!("echo -> {}", echo.first_text().unwrap_or_default());
    let unknown = svc.clone().oneshot(call("no-such-tool", json!({}))).await;
    match unknown {
        Ok(r) => println!(
            "no-such-tool -> isError: {}",
            r.first_text().unwrap_or_default()
        ),
        Err(e) => println!("no-such-tool -> {e}"),
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&stack.stats().snapshot())?
    );
    running.cancel().await?;
    Ok(())
}
