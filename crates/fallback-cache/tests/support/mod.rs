//! Helpers shared by the fallback-cache tests: a fixture catalog of described
//! tools, a circuit-breaker stand-in, an event recorder and call helpers.

// Test helpers: a panic is how a test fails (as `allow-unwrap-in-tests` says
// for test functions); not every test file uses every helper.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{json, Value};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp};
use toolwarden_core::{
    BoxError, CircuitOpen, CircuitView, Circuits, Event, Events, McpRequest, ToolCatalog,
};
use tower::Service;

/// Eleven described tools, as a server's `tools/list` would give them, with
/// trusted annotations: reading tools are read-only, `send_email`,
/// `delete_file` and `create_issue` are not.
pub fn fixture_catalog() -> ToolCatalog {
    let read_only = json!({"readOnlyHint": true});
    let destructive = json!({"readOnlyHint": false, "destructiveHint": true});
    let tool = |name: &str, description: &str, params: &[&str], annotations: &Value| {
        let properties: serde_json::Map<String, Value> = params
            .iter()
            .map(|p| ((*p).to_owned(), json!({"type": "string"})))
            .collect();
        json!({
            "name": name,
            "description": description,
            "inputSchema": {"type": "object", "properties": properties},
            "annotations": annotations,
        })
    };
    let catalog = ToolCatalog::new();
    let n = catalog.fill_from_tools_list(&json!({"tools": [
        tool("search_docs", "Search the project documentation for pages matching a query", &["query", "limit"], &read_only),
        tool("web_search", "Search the web and return the pages that best match a query", &["query"], &read_only),
        tool("get_weather", "Get the current weather and forecast for a city", &["city"], &read_only),
        tool("send_email", "Send an email message to a recipient", &["to", "subject", "body"], &destructive),
        tool("delete_file", "Delete a file from the workspace", &["path"], &destructive),
        tool("read_file", "Read the contents of a file in the workspace", &["path"], &read_only),
        tool("list_directory", "List the files and folders in a directory of the workspace", &["path"], &read_only),
        tool("create_issue", "Create a new issue in the project tracker", &["title", "body"], &json!({"destructiveHint": false})),
        tool("query_database", "Run a read-only SQL query against the analytics database", &["sql"], &read_only),
        tool("translate_text", "Translate text from one language to another", &["text", "target_language"], &read_only),
        tool("get_stock_price", "Get the latest stock price for a ticker symbol", &["symbol"], &read_only),
    ]}));
    assert_eq!(n, 11);
    catalog.set_trusted(true);
    catalog
}

/// Which circuits are open: read by the layer (through [`Circuits`]) and
/// enforced by [`BreakerStandIn`].
#[derive(Debug, Clone, Default)]
pub struct OpenCircuits(Arc<Mutex<HashSet<String>>>);

impl OpenCircuits {
    pub fn open(&self, tool: &str) {
        self.0.lock().unwrap().insert(tool.to_owned());
    }

    pub fn close(&self, tool: &str) {
        self.0.lock().unwrap().remove(tool);
    }

    pub fn circuits(&self) -> Circuits {
        Circuits::new(Arc::new(self.clone()))
    }
}

impl CircuitView for OpenCircuits {
    fn is_open(&self, key: &str) -> bool {
        self.0.lock().unwrap().contains(key)
    }

    fn open_keys(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

/// Stands in for the circuit breaker where a test opens and closes circuits
/// by hand: refuses calls to open tools with `CircuitOpen`, and can be told
/// to fail the next call with any error. (`tests/fallback_cache.rs` also
/// runs the layer over the real `CircuitBreakerLayer`.)
#[derive(Debug, Clone)]
pub struct BreakerStandIn<S> {
    inner: S,
    open: OpenCircuits,
    next_error: Arc<Mutex<Option<BoxError>>>,
}

impl<S> BreakerStandIn<S> {
    pub fn new(inner: S, open: OpenCircuits) -> Self {
        BreakerStandIn {
            inner,
            open,
            next_error: Arc::default(),
        }
    }

    /// A handle that makes the next call fail with an error.
    pub fn injector(&self) -> ErrorInjector {
        ErrorInjector(Arc::clone(&self.next_error))
    }
}

#[derive(Debug, Clone)]
pub struct ErrorInjector(Arc<Mutex<Option<BoxError>>>);

impl ErrorInjector {
    pub fn fail_next(&self, error: impl Into<BoxError>) {
        *self.0.lock().unwrap() = Some(error.into());
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

impl<S> Service<Request> for BreakerStandIn<S>
where
    S: Service<Request, Response = Response, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> BoxFuture {
        if let Some(error) = self.next_error.lock().unwrap().take() {
            return Box::pin(async move { Err(error) });
        }
        let tool = req.tool_name().unwrap_or_default().to_owned();
        if self.open.is_open(&tool) {
            return Box::pin(async move {
                Err(Box::new(CircuitOpen::new(tool, Duration::from_secs(30))) as BoxError)
            });
        }
        Box::pin(self.inner.call(req))
    }
}

/// One recorded event: its name, its subject and, for `stale_served`, the age.
pub type Seen = (&'static str, String, Option<Duration>);

/// Records the events a layer emits.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    pub fn events(&self) -> Events {
        let seen = Arc::clone(&self.0);
        Events::new().with(move |e: &Event<'_>| {
            let age = match e {
                Event::StaleServed { age, .. } => Some(*age),
                _ => None,
            };
            seen.lock()
                .unwrap()
                .push((e.name(), e.subject().unwrap_or_default().to_owned(), age));
        })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

/// Drives one call through `poll_ready` then `call`.
pub async fn call<S>(
    svc: &mut S,
    id: i64,
    tool: &str,
    arguments: Value,
) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    ready_call(svc, Request::tool_call(id, tool, arguments)).await
}

/// The result object of a successful JSON-RPC response.
pub fn result(response: &Response) -> &Value {
    response
        .payload
        .as_ref()
        .expect("a result, not a JSON-RPC error")
}

/// The `structuredContent.toolwarden` facts of a structured error.
pub fn facts(response: &Response) -> &Value {
    &result(response)["structuredContent"]["toolwarden"]
}

/// The texts of a result's content items.
pub fn texts(response: &Response) -> Vec<String> {
    result(response)["content"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["text"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A mock server over the fixture tools, every tool succeeding.
pub fn server() -> MockMcp {
    MockMcp::new()
}
