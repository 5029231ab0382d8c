//! rmcp adapters for toolwarden.
//!
//! - [`McpRequest`](toolwarden_core::McpRequest) for rmcp's `ClientRequest` and
//!   [`McpResponse`](toolwarden_core::McpResponse) for `ServerResult` (in
//!   `toolwarden-core`'s `rmcp` feature, which this crate turns on: the orphan
//!   rule keeps trait impls for foreign types in the trait's crate), so every
//!   toolwarden layer runs over rmcp types unchanged.
//! - [`RmcpClient`]: a `tower::Service<ClientRequest>` over a
//!   `Peer<RoleClient>` that sends `notifications/cancelled` when its future is
//!   dropped (a timeout or a lost `select!` upstream cancels the call on the
//!   server too), maps rmcp's errors to the core's error types so the default
//!   classifier reads them ([`map_service_error`]), and fills a
//!   [`ToolCatalog`](toolwarden_core::ToolCatalog) from every `tools/list`
//!   result that passes through it.
//!
//! Feature `reqwest` (off by default): an HTTP 429 or 5xx answer to a POST of
//! rmcp's Streamable HTTP client over reqwest, or a 401 / 403 with a
//! `WWW-Authenticate` challenge, is mapped to the core's
//! [`HttpStatusError`](toolwarden_core::classify::HttpStatusError), its
//! `Retry-After` read, so that a 429 or 503 is transient with the server's
//! hint, a 500 is the server failing and refused credentials a client
//! failure; without it such an answer is a transport error (transient, no
//! hint), as every other send that failed.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use rmcp::{model::{CallToolRequest, CallToolRequestParams, ClientRequest}, ServiceExt};
//! use tower::ServiceExt as _;
//! use toolwarden_core::ToolCatalog;
//! use toolwarden_rmcp::RmcpClient;
//!
//! // Any rmcp transport: a child process, Streamable HTTP, an in-memory pipe.
//! # let transport: (tokio::io::DuplexStream, tokio::io::DuplexStream) = todo_transport();
//! let running = ().serve(transport).await?;
//! let catalog = ToolCatalog::new();
//! let client = RmcpClient::new(running.peer().clone()).with_catalog(catalog.clone());
//! client.refresh_catalog().await?; // tools/list → catalog
//!
//! let mut params = CallToolRequestParams::new("echo");
//! params.arguments = serde_json::json!({"message": "hi"}).as_object().cloned();
//! let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
//! let result = client.oneshot(request).await?;
//! # let _ = result; Ok(()) }
//! # fn todo_transport() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) { tokio::io::duplex(64) }
//! ```

#![forbid(unsafe_code)]

mod client;
mod error;
mod pages;

pub use client::{OnRequestSent, RmcpClient, RmcpClientFuture};
pub use error::map_service_error;
pub use pages::{
    list_prompts, list_resource_templates, list_resources, list_tools, read_pages, Listed,
    MAX_LISTED_ITEMS, MAX_LIST_PAGES,
};
