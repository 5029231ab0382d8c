//! Middleware that serves the last good result of a tool call, marked
//! stale, when the call fails, and otherwise answers with a structured
//! `isError` result that names other tools to try.
//!
//! [`FallbackCacheLayer`] sits above the retry, rate-limit and breaker
//! layers (see the standard order in the workspace design) and catches what
//! fails below it, rejections included.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use serde_json::json;
//! use tower::{Layer, Service, ServiceExt};
//! use toolwarden_core::jsonrpc::{Id, Request};
//! use toolwarden_core::testing::{MockMcp, Step};
//! use toolwarden_core::ToolCatalog;
//! use toolwarden_fallback_cache::FallbackCacheLayer;
//!
//! // What the server's tools/list said, annotations trusted: both tools are read-only.
//! let catalog = ToolCatalog::new();
//! catalog.fill_from_tools_list(&json!({"tools": [
//!     {"name": "search_docs", "description": "Search the project documentation",
//!      "annotations": {"readOnlyHint": true}},
//!     {"name": "web_search", "description": "Search the web for pages",
//!      "annotations": {"readOnlyHint": true}},
//!     {"name": "delete_page", "description": "Delete a documentation page"},
//! ]}));
//! catalog.set_trusted(true);
//!
//! // The server answers once, then its connection drops.
//! let server = MockMcp::new()
//!     .script("search_docs", [Step::ok("Timeouts: see tokio::time::timeout")])
//!     .default_step("search_docs", Step::closed());
//! let layer = FallbackCacheLayer::builder()
//!     .catalog(catalog)
//!     .max_staleness(Duration::from_secs(600))
//!     .build()
//!     .unwrap();
//! let mut svc = layer.layer(server);
//!
//! let call = |id: i64, query: &str| Request::tool_call(id, "search_docs", json!({"query": query}));
//! svc.ready().await.unwrap().call(call(1, "timeout")).await.unwrap(); // stored
//!
//! // Same call, the server fails: the stored result comes back, marked stale.
//! let stale = svc.ready().await.unwrap().call(call(2, "timeout")).await.unwrap();
//! assert_eq!(stale.id, Id::Number(2));
//! let result = stale.payload.unwrap();
//! assert_eq!(result["_meta"]["toolwarden/stale"]["stale"], true);
//! assert!(result["content"][1]["text"].as_str().unwrap().starts_with("[stale: result from"));
//!
//! // Nothing stored for other arguments: a structured error with alternatives
//! // (never delete_page: a failed read is not sent to a destructive tool).
//! let degraded = svc.ready().await.unwrap().call(call(3, "retry")).await.unwrap();
//! let result = degraded.payload.unwrap();
//! assert_eq!(result["isError"], true);
//! assert_eq!(result["structuredContent"]["toolwarden"]["alternatives"], json!(["web_search"]));
//! # }
//! ```
//!
//! # What is stored
//!
//! The last good result per call fingerprint
//! ([`call_fingerprint`](toolwarden_core::call_fingerprint): tool name and
//! arguments, `_meta` ignored), and only:
//!
//! - for tools the catalog calls cacheable
//!   ([`ToolCatalog::is_cacheable`](toolwarden_core::ToolCatalog::is_cacheable):
//!   configured so, or trusted read-only annotations; never a tool declared
//!   destructive);
//! - never for continuation calls (`inputResponses` / `requestState`),
//!   which are never served from the cache either;
//! - only results the classifier calls a success, and never one with
//!   `isError`, a JSON-RPC error or `resultType: "input_required"`, whatever
//!   the classifier says.
//!
//! The cache is bounded by entries and by bytes (both hold at every
//! instant; see [`FallbackCacheBuilder::max_bytes`]), backed by
//! [`quick_cache`]. Ages are measured with `tokio::time`, so tests run with a
//! paused clock.
//!
//! # When a call fails
//!
//! A failure is an `Err` from below or a response the classifier calls a
//! failure. In this order:
//!
//! 1. **Stale.** For a counted failure (`Transient` or `Server`: transport
//!    errors, timeouts, `isError` results, JSON-RPC server errors, retries
//!    spent) or a rejection (`CircuitOpen`, `RateLimited`,
//!    `RetryBudgetExhausted`), a stored result younger than `max_staleness`
//!    is served: re-addressed to the current request id, with
//!    `_meta["toolwarden/stale"] = {"stale": true, "ageSeconds", "reason"}`
//!    and, unless [`stale_note`](FallbackCacheBuilder::stale_note) is off, a
//!    text note the model sees. Emits [`Event::StaleServed`]. Never for a
//!    `Client` failure (bad arguments must reach the model as they are) nor
//!    for `LoopDetected` (a stale answer would hide the loop).
//! 2. **Degrade** (unless [`degrade`](FallbackCacheBuilder::degrade) is
//!    off). An `Err` or a JSON-RPC error response becomes a structured
//!    `isError` result built by
//!    [`FailureReport`](toolwarden_core::FailureReport): `tool`, `error`,
//!    `kind`, `class`, `layer`, `retryAfterSeconds`, `attempts` (known only
//!    when a [`RetryBudgetExhausted`](toolwarden_core::RetryBudgetExhausted)
//!    says so: the retry layer below counts attempts on its own copies of the
//!    request), and `alternatives`. A tool's own `isError` result is kept as
//!    it is, with the alternatives added as a text note and as
//!    `_meta["toolwarden/degraded"]`. Emits [`Event::Degraded`].
//!
//! **Alternatives** are ranked by [`AlternativeRanker`] (BM25 over the
//! catalog's tool names, titles, descriptions and parameter names) against
//! the failed tool's own text and the call's arguments, leaving out the
//! failed tool, tools whose circuit is open
//! ([`circuits`](FallbackCacheBuilder::circuits)) and, unless the failed
//! tool is destructive itself, tools the catalog treats as destructive (a
//! failed read must not send the model to `delete_file`). None are offered
//! for a `Client` failure: the arguments are wrong, not the tool.
//!
//! Requests other than `tools/call` pass through untouched.
//!
//! # Fresh mode
//!
//! With [`fresh_ttl`](FallbackCacheBuilder::fresh_ttl), a cacheable call
//! whose stored result is younger than the TTL is answered from the cache
//! without calling the service below. Readiness is still the inner
//! service's (the request is not known in `poll_ready`).
//!
//! [`Event::StaleServed`]: toolwarden_core::Event::StaleServed
//! [`Event::Degraded`]: toolwarden_core::Event::Degraded
//!
//! Feature `serde` (off by default): `FallbackCacheSettings`, the builder's
//! knobs as serde a serde type for configuration files, applied with the
//! builder's `settings`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod builder;
mod cache;
mod fallback;
mod future;
mod layer;
mod rank;
mod service;
#[cfg(feature = "serde")]
mod settings;

pub use builder::{
    FallbackCacheBuilder, DEFAULT_ALTERNATIVES, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_STALENESS, MAX_MAX_ENTRIES, MIN_MAX_BYTES,
};
pub use fallback::{DEGRADED_META_KEY, STALE_META_KEY};
pub use future::ResponseFuture;
pub use layer::FallbackCacheLayer;
pub use rank::{argument_text, tokenize, AlternativeRanker, Ranked, MAX_ARGUMENT_TEXT};
pub use service::FallbackCache;
#[cfg(feature = "serde")]
pub use settings::FallbackCacheSettings;
