//! toolwarden over a hand-written JSON-RPC transport.
//!
//! The "server" here is a task reading JSON-RPC lines from an in-memory pipe
//! and answering them, flaky on purpose; the client side is a small
//! `tower::Service<jsonrpc::Request>` that writes a line and waits for the
//! answer with the same id. The standard stack goes on top unchanged: the
//! layers only need the core's request and response views.
//!
//! Run: `cargo run --example custom_transport`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use toolwarden::stack::StandardStack;
use toolwarden_core::classify::{TransportError, TransportErrorKind};
use toolwarden_core::jsonrpc::{Id, Message, Request, Response};
use toolwarden_core::{BoxError, McpResponse, ToolAnnotations, ToolCatalog, ToolInfo};
use tower::{Layer, Service, ServiceExt};

type Pending = Arc<Mutex<HashMap<Id, oneshot::Sender<Response>>>>;

/// A JSON-RPC client over newline-delimited JSON.
#[derive(Clone)]
struct LineClient {
    out: mpsc::Sender<String>,
    pending: Pending,
}

impl LineClient {
    fn new(io: DuplexStream) -> Self {
        let (read, mut write) = tokio::io::split(io);
        let (out, mut lines) = mpsc::channel::<String>(64);
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            while let Some(line) = lines.recv().await {
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let answers = Arc::clone(&pending);
        tokio::spawn(async move {
            let mut reader = BufReader::new(read).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(Message::Response(resp)) = Message::parse(line.as_bytes()) {
                    if let Some(tx) = answers.lock().unwrap().remove(&resp.id) {
                        let _ = tx.send(resp);
                    }
                }
            }
            // Connection gone: every waiting call is answered with an error.
            answers.lock().unwrap().clear();
        });
        LineClient { out, pending }
    }
}

impl Service<Request> for LineClient {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(req.id.clone(), tx);
        let out = self.out.clone();
        Box::pin(async move {
            let closed = || {
                Box::new(TransportError::new(
                    TransportErrorKind::Closed,
                    "pipe closed",
                )) as BoxError
            };
            out.send(req.to_value().to_string())
                .await
                .map_err(|_| closed())?;
            rx.await.map_err(|_| closed())
        })
    }
}

/// A flaky server: `lookup` fails its first two calls, then answers.
async fn serve(io: DuplexStream) {
    let (read, mut write) = tokio::io::split(io);
    let mut lines = BufReader::new(read).lines();
    let mut lookups = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(Message::Request(req)) = Message::parse(line.as_bytes()) else {
            continue;
        };
        let result = match toolwarden_core::McpRequest::tool_name(&req) {
            Some("lookup") => {
                lookups += 1;
                if lookups <= 2 {
                    json!({"content": [{"type": "text", "text": "service temporarily unavailable"}], "isError": true})
                } else {
                    json!({"content": [{"type": "text", "text": format!("found it on call {lookups}")}]})
                }
            }
            _ => {
                json!({"content": [{"type": "text", "text": "MCP error -32602: unknown tool"}], "isError": true})
            }
        };
        let resp = Response::result(req.id, result).to_value().to_string();
        if write
            .write_all(format!("{resp}\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(server_io));

    // `lookup` is read-only: configured safe to repeat, so it is retried.
    let catalog = ToolCatalog::new();
    let read_only = ToolAnnotations {
        read_only_hint: Some(true),
        ..Default::default()
    };
    catalog.insert(ToolInfo::new("lookup", "Look something up").annotations(read_only));
    catalog.set_trusted(true);
    let stack = StandardStack::builder()
        .catalog(catalog)
        .retry(|b| b.max_attempts(3).base_delay(Duration::from_millis(20)))
        .build()
        .expect("valid configuration");
    let mut svc = stack.layer(LineClient::new(client_io));

    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(Request::tool_call(1, "lookup", json!({"key": "k"})))
        .await
        .unwrap();
    println!("lookup -> {}", resp.first_text().unwrap_or_default());
    assert!(
        !resp.is_tool_error(),
        "two transient failures were retried away"
    );

    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(Request::tool_call(2, "frobnicate", json!({})))
        .await
        .unwrap();
    println!(
        "frobnicate -> {} (a client error: not retried)",
        resp.first_text().unwrap_or_default()
    );

    let stats = serde_json::to_string_pretty(&stack.stats().snapshot()).unwrap();
    println!("stats:\n{stats}");
}
