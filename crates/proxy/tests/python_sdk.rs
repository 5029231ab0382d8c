//! A real host's client through the proxy: the official Python MCP SDK's
//! high-level `Client` in its default mode (`tests/e2e/python_sdk_client.py`,
//! the SDK from `tests/e2e/requirements.txt`), in front of
//! server-everything, over stdio and over Streamable HTTP.
//!
//! Its default mode asks `server/discover` first. The proxy offered
//! 2026-07-28 there, so the SDK settled on it and had no session: the
//! server's sampling and elicitation requests were answered "no client is
//! connected", and no log message came (directly, the server's 2025-11-25
//! made the SDK fall back to the handshake, and all of it worked). Over
//! stdio, a `server/discover` before `initialize` also registered rmcp's
//! answer-only peer as the client, with the same effect. And the SDK
//! logged "Session termination failed: 202" on each exit over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;
use support::{bounded, component, free_port, wait_listening, Proxy, LIMIT};

fn script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/e2e/python_sdk_client.py"
    ))
}

/// Runs the client script with `args`; its one JSON report.
async fn client(python: &PathBuf, args: &[&str]) -> Value {
    let output = tokio::process::Command::new(python)
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = bounded("the Python SDK client", LIMIT * 3, output)
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

/// What the SDK must have seen: the handshake's version, the server's
/// requests answered by its callbacks, log messages, no warning.
fn assert_everything_reached_the_client(report: &Value) {
    assert_eq!(report["version"], "2025-11-25", "{report}");
    assert_eq!(report["sampling_error"], false, "{report}");
    assert!(
        report["sampling_text"]
            .as_str()
            .unwrap()
            .contains("sampled by the test"),
        "{report}"
    );
    assert_eq!(report["elicitation_error"], false, "{report}");
    assert!(report["logs"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_default_client_gets_the_servers_requests_over_stdio() {
    let (Some(python), Some(server)) = (
        component("TOOLWARDEN_PYTHON"),
        component("TOOLWARDEN_SERVER_EVERYTHING"),
    ) else {
        return;
    };
    let report = client(
        &python,
        &[
            "stdio",
            env!("CARGO_BIN_EXE_toolwarden"),
            server.to_str().unwrap(),
        ],
    )
    .await;
    assert_everything_reached_the_client(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_default_client_gets_the_servers_requests_over_http() {
    let (Some(python), Some(server)) = (
        component("TOOLWARDEN_PYTHON"),
        component("TOOLWARDEN_SERVER_EVERYTHING"),
    ) else {
        return;
    };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start(
        &["run", "--listen", &listen, "--", server.to_str().unwrap()],
        &[],
    );
    wait_listening(port, "the proxy").await;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let report = client(&python, &["http", &url]).await;
    assert_everything_reached_the_client(&report);
}
