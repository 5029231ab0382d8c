//! Middleware that sends a second copy of a slow MCP tool call (a hedge)
//! and returns the first good answer, but only for tools safe to send
//! twice, and only as far as a hedge budget allows.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), toolwarden_core::BoxError> {
//! use std::time::Duration;
//! use serde_json::json;
//! use tower::{Layer, ServiceExt};
//! use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}, McpResponse, ToolCatalog};
//! use toolwarden_hedge::HedgeLayer;
//!
//! // The stack's catalog, filled from tools/list and trusted by configuration.
//! let catalog = ToolCatalog::new();
//! catalog.fill_from_tools_list(&json!({"tools": [
//!     {"name": "lookup", "annotations": {"readOnlyHint": true, "idempotentHint": true}},
//!     {"name": "send_email"},
//! ]}));
//! catalog.set_trusted(true);
//! let hedge = HedgeLayer::builder()
//!     .catalog(catalog)
//!     .delay(Duration::from_millis(50))
//!     .build()?;
//!
//! // The first copy of `lookup` hangs; the hedge, sent after 50 ms, answers.
//! let upstream = MockMcp::new()
//!     .script("lookup", [Step::ok("slow").after(Duration::from_secs(10))])
//!     .script("send_email", [Step::ok("sent").after(Duration::from_secs(10))]);
//! let answer = hedge.layer(upstream.clone()).oneshot(Request::tool_call(1, "lookup", json!({"q": "x"}))).await?;
//! assert_eq!(answer.first_text().as_deref(), Some("lookup ok"));
//! assert_eq!(upstream.calls("lookup"), 2);
//! assert_eq!(upstream.in_flight(), 0); // the slow copy was dropped: cancelled
//!
//! // A tool that may act is never sent twice, however slow.
//! let email = hedge.layer(upstream.clone()).oneshot(Request::tool_call(2, "send_email", json!({}))).await?;
//! assert_eq!(email.first_text().as_deref(), Some("sent"));
//! assert_eq!(upstream.calls("send_email"), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # What is hedged
//!
//! Only a `tools/call` whose tool is safe to send twice *at once*: its
//! [`safe_to_hedge`](HedgeBuilder::safe_to_hedge) override
//! (`.tool(name, |b| b.safe_to_hedge(true))`) or, without one, the
//! [`ToolCatalog`](toolwarden_core::ToolCatalog)'s
//! [`is_safe_to_hedge`](toolwarden_core::ToolCatalog::is_safe_to_hedge):
//! a tool configured safe to repeat (the knob the retry layer reads: the
//! operator's decision covers hedging too), or, in a *trusted* catalog, a
//! tool whose annotations say both `readOnlyHint` and `idempotentHint`.
//! This is stricter than what the retry layer repeats (read-only *or*
//! idempotent): a retry follows a failure, a hedge runs next to a call
//! that may still succeed, so both copies may act. Every other request
//! (any other method, any other tool) passes through untouched, and so
//! does a continuation of a call (2026-07-28 `inputResponses` or
//! `requestState`: it carries the answer the call acts on, often under a
//! one-time handle, and a second copy would act twice or be refused).
//!
//! **The default catalog is empty and untrusted, so by default nothing is
//! hedged.**
//!
//! # When
//!
//! The hedge is sent when the first attempt has run for the call's delay
//! without an answer: the [`percentile`](HedgeBuilder::percentile)
//! (default p95) of the latencies of the tool's latest 64 good answers,
//! once it has [`min_samples`](HedgeBuilder::min_samples) of them (default
//! 20), else the fixed [`delay`](HedgeBuilder::delay) (default 100 ms).
//! Only answers that were waited for are recorded, one in four of them
//! (round robin, so the ring covers about the last 256 waits; the others
//! save a clock reading): a call answered at its first poll
//! (synchronously) could not have been hedged and says nothing about the
//! wait of one that is not.
//! The latency records are kept per key ([`key_by`](HedgeBuilder::key_by),
//! per tool by default) in a map bounded by
//! [`bounds`](HedgeBuilder::bounds); kept per tool, a tool with its own
//! override ([`tool`](HedgeBuilder::tool)) keeps its record beside the
//! override instead, outside that map: the lookup that finds the override
//! finds it (the overrides are as many as the configuration names, so
//! they need no bound). A call answered before its delay
//! costs no timer at all when its first poll answers it, and one timer
//! otherwise.
//!
//! At most one hedge per call. It must also be paid for by the hedge
//! budget ([`budget`](HedgeBuilder::budget), the retry crate's
//! [`RetryBudget`] mechanism): every hedgeable call deposits 0.1 hedge,
//! every hedge withdraws one, with a floor of one hedge per second, over a
//! 10 s window ([`DEFAULT_BUDGET`]): a slow server gets at most about 10 %
//! more calls, not twice the load. A hedge the budget refuses is not sent;
//! the first attempt goes on alone.
//!
//! # The answer
//!
//! Each answer is judged by the classifier (`C:`
//! [`Classify`](toolwarden_core::Classify), default
//! [`McpClassifier`](toolwarden_core::McpClassifier)). The first *good*
//! answer is returned and the other attempt is dropped, which cancels it:
//! over [`toolwarden-rmcp`'s `RmcpClient`] (and so in the proxy, whose
//! upstreams are `RmcpClient`s) dropping a call's future sends
//! `notifications/cancelled` for it to the server (tested end to end
//! against a real server in the workspace's `tests/e2e_servers.rs`). Over a
//! service of your own (a raw JSON-RPC transport carrying
//! [`jsonrpc::Request`](toolwarden_core::jsonrpc::Request)s), dropping the
//! loser cancels only what that service does when its future is dropped:
//! nothing in toolwarden-core sends the notification for it.
//!
//! A failed answer waits for the other attempt; when both fail, the first
//! attempt's failure is returned (what the call would have answered
//! without a hedge). A first attempt that fails before the hedge was sent
//! is returned at once: repeating failures is the retry layer's job.
//!
//! Every call gets exactly one answer, and a call dropped by its caller
//! drops (cancels) both attempts. Waiting for the delay uses `tokio::time`:
//! a hedgeable call not answered at its first poll needs a Tokio runtime
//! with the time driver enabled.
//!
//! # Attempts and request ids
//!
//! The hedge is a fresh call of the inner service, after its `poll_ready`,
//! so the rate limiter and the circuit breaker below see and count it. It
//! carries a copy of the caller's request, with the same
//! [`Attempt`](toolwarden_core::Attempt) number (it is a second copy of
//! that attempt, not the next one, whose number belongs to the retry
//! layer above). MCP forbids two requests in flight with one id, so a raw
//! JSON-RPC request ([`jsonrpc::Request`](toolwarden_core::jsonrpc::Request))
//! hedges under its own id, `"<original>#tw-hedge"` (`7#tw-hedge`;
//! below the retry layer, `"7#tw-retry-2"#tw-hedge`), and the hedge's
//! answer is re-addressed to the caller's id. String ids ending in
//! `#tw-hedge` are reserved. rmcp's `ClientRequest` carries no id: the rmcp
//! peer numbers every request it sends, so two copies in flight never
//! share an upstream id (the proxy forwards `ClientRequest`s this way).
//!
//! # Events
//!
//! [`Event::Hedged`](toolwarden_core::Event::Hedged) (`key`: the tool;
//! `delay`: how long the first attempt had run) when a hedge is sent.
//!
//! # Per-tool policies
//!
//! [`tool`](HedgeBuilder::tool) gives one tool its own `delay`,
//! `percentile`, `min_samples` and `safe_to_hedge`. The budget, the
//! catalog, the key, the bounds, the events and the classifier are
//! layer-wide.
//!
//! In the standard stack this layer is optional and off by default; when
//! enabled it sits below the retry layer and above the rate limiter, the
//! circuit breaker and the attempt timeout, so every copy takes a token,
//! is counted by the breaker and is bounded by the attempt timeout.
//!
//! Feature `serde` (off by default): `HedgeSettings` and
//! `HedgeToolSettings`, the builder's knobs as serde types for
//! configuration files, applied with the builder's `settings` and
//! `tool_settings`.
//!
//! [`toolwarden-rmcp`'s `RmcpClient`]: https://docs.rs/toolwarden-rmcp

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod builder;
mod future;
mod latency;
mod layer;
mod service;
#[cfg(feature = "serde")]
mod settings;

pub use builder::{HedgeBuilder, DEFAULT_BUDGET};
pub use future::ResponseFuture;
pub use layer::HedgeLayer;
pub use service::Hedge;
#[cfg(feature = "serde")]
pub use settings::{HedgeBudgetSettings, HedgeSettings, HedgeToolSettings};
/// The hedge budget's configuration and mechanism: the retry crate's,
/// re-exported on purpose (one budget design for retries and hedges).
pub use toolwarden_retry::{BudgetConfig, RetryBudget};
