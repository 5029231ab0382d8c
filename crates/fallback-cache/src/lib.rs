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
//! arguments, `_meta` ignored; per session too with
//! [`per_session`](FallbackCacheBuilder::per_session), for servers that
//! answer each session from state of its own), and only:
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
//! the failed tool's own text and the call's arguments. None are offered
//! for a `Client` failure: the arguments are wrong, not the tool. Left out:
//!
//! - the failed tool;
//! - tools whose circuit is open
//!   ([`circuits`](FallbackCacheBuilder::circuits)) and tools the
//!   availability check calls unavailable
//!   ([`available`](FallbackCacheBuilder::available): an upstream that is
//!   down, ...);
//! - unless the failed tool is destructive itself, tools the catalog treats
//!   as destructive (a failed read must not send the model to
//!   `delete_file`);
//! - tools under the relevance floor
//!   ([`min_relevance`](FallbackCacheBuilder::min_relevance), default
//!   [`DEFAULT_MIN_RELEVANCE`], 0.15): nothing is suggested rather than an
//!   unrelated tool. BM25 scores are unnormalised, so the floor is on
//!   [`Ranked::relevance`], the idf-weighted overlap of the two tools'
//!   informative terms (0 to 1; generic words such as `get`, `list`,
//!   `tool` never count).
//!
//! # Several upstreams
//!
//! Behind a gateway, the catalog knows each tool's upstream
//! ([`ToolCatalog::replace_upstream`](toolwarden_core::ToolCatalog::replace_upstream)).
//! Then tools of *other* upstreams are suggested first (best first), and
//! the failed tool's own upstream's after them; when the failure is the
//! upstream's own (a transport failure: connection refused or closed, an
//! I/O error, an HTTP error status; or a timeout), none of its tools is
//! suggested: the server did not answer for this tool and will not for the
//! others. A JSON-RPC error or an `isError` result is the server answering
//! (the tool failed); a refusal by a layer below (`CircuitOpen`, ...) says
//! nothing about the upstream, which is the availability check's to say.
//! An upstream's namespace (`time__` in `time__get_current_time`) is not
//! indexed, and its name in its tools' descriptions does not make them
//! alike. With a single upstream (no upstream set), every tool is ranked by
//! relevance and score alone.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use serde_json::json;
//! use tower::{Layer, Service, ServiceExt};
//! use toolwarden_core::jsonrpc::Request;
//! use toolwarden_core::testing::{MockMcp, Step};
//! use toolwarden_core::{ToolCatalog, ToolInfo};
//! use toolwarden_fallback_cache::FallbackCacheLayer;
//!
//! let catalog = ToolCatalog::new();
//! catalog.replace_upstream("weather", [
//!     ToolInfo::new("weather__forecast", "Weather forecast for a city"),
//!     ToolInfo::new("weather__forecast_hourly", "Hourly weather forecast for a city"),
//! ]);
//! catalog.replace_upstream("meteo", [ToolInfo::new("meteo__forecast", "Forecast of the weather")]);
//! catalog.replace_upstream("mail", [ToolInfo::new("mail__send", "Send an email")]);
//! let server = MockMcp::new()
//!     .script("weather__forecast", [Step::rpc_error(-32603, "internal error"), Step::closed()]);
//! let layer = FallbackCacheLayer::builder()
//!     .catalog(catalog)
//!     .available(|tool: &str| tool != "mail__send") // the gateway's health view
//!     .build()
//!     .unwrap();
//! let mut svc = layer.layer(server);
//! let call = |id: i64| Request::tool_call(id, "weather__forecast", json!({"city": "Oslo"}));
//! let alternatives = |answer: toolwarden_core::jsonrpc::Response| {
//!     answer.payload.unwrap()["structuredContent"]["toolwarden"]["alternatives"].clone()
//! };
//!
//! // The server answered with an error: the other upstream's forecast first.
//! let answer = svc.ready().await.unwrap().call(call(1)).await.unwrap();
//! assert_eq!(alternatives(answer), json!(["meteo__forecast", "weather__forecast_hourly"]));
//! // The connection dropped: the weather upstream is down, none of its tools.
//! let answer = svc.ready().await.unwrap().call(call(2)).await.unwrap();
//! assert_eq!(alternatives(answer), json!(["meteo__forecast"]));
//! # }
//! ```
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

mod availability;
mod builder;
mod cache;
mod fallback;
mod future;
mod layer;
mod rank;
mod service;
#[cfg(feature = "serde")]
mod settings;

pub use availability::ToolAvailability;
pub use builder::{
    FallbackCacheBuilder, DEFAULT_ALTERNATIVES, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_STALENESS, MAX_MAX_ENTRIES, MIN_MAX_BYTES,
};
pub use fallback::{DEGRADED_META_KEY, STALE_META_KEY};
pub use future::ResponseFuture;
pub use layer::FallbackCacheLayer;
pub use rank::{
    argument_text, tokenize, AlternativeRanker, FailedCall, Ranked, DEFAULT_MIN_RELEVANCE,
    MAX_ARGUMENT_TEXT,
};
pub use service::FallbackCache;
#[cfg(feature = "serde")]
pub use settings::FallbackCacheSettings;
