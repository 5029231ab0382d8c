//! Middleware that retries failed MCP calls with exponential backoff and
//! jitter, but only the failures worth repeating, only for requests safe to
//! repeat, and only as far as a shared retry budget allows.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), toolwarden_core::BoxError> {
//! use std::time::Duration;
//! use serde_json::json;
//! use tower::{Layer, ServiceExt};
//! use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}, McpResponse, ToolCatalog};
//! use toolwarden_retry::RetryBackoffLayer;
//!
//! // The stack's catalog, filled from tools/list and trusted by configuration.
//! let catalog = ToolCatalog::new();
//! catalog.fill_from_tools_list(&json!({"tools": [
//!     {"name": "search", "annotations": {"readOnlyHint": true}},
//!     {"name": "send_email"},
//! ]}));
//! catalog.set_trusted(true);
//! let retry = RetryBackoffLayer::builder()
//!     .catalog(catalog)
//!     .max_attempts(3)
//!     .base_delay(Duration::from_millis(200))
//!     .build()?;
//!
//! // A read-only tool times out, then fails, then answers: retried twice.
//! let upstream = MockMcp::new()
//!     .script("search", [Step::tool_error("upstream timed out"), Step::rpc_error(-32603, "internal error")])
//!     .script("send_email", [Step::tool_error("SMTP server said 451")]);
//! let search = retry.layer(upstream.clone()).oneshot(Request::tool_call(1, "search", json!({"q": "tower"}))).await?;
//! assert!(!search.is_tool_error());
//! assert_eq!(upstream.calls("search"), 3);
//!
//! // A tool that may have acted is not repeated: its failure comes back as it was.
//! let email = retry.layer(upstream.clone()).oneshot(Request::tool_call(2, "send_email", json!({}))).await?;
//! assert!(email.is_tool_error());
//! assert_eq!(upstream.calls("send_email"), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # What is retried
//!
//! Each attempt is judged by the stack's classifier
//! ([`toolwarden_core::Classify`], default [`McpClassifier`](toolwarden_core::McpClassifier)), so a tool
//! error (`isError: true` inside a successful response) is a failure like a
//! JSON-RPC error or a dropped connection. A failed attempt is retried when
//! all of these hold:
//!
//! 1. Its failure class is one of [`retry_on`](RetryBackoffBuilder::retry_on)
//!    (default `Transient` and `Server`; `Client` is refused: a wrong
//!    request fails the same way twice).
//! 2. Fewer than [`max_attempts`](RetryBackoffBuilder::max_attempts) attempts
//!    were made (default 3, the first included).
//! 3. Repeating it is safe:
//!    - the failure happened before the request left (the classifier's
//!      `before_sent`, e.g. connection refused): safe for any tool;
//!    - a toolwarden layer below refused it (`RateLimited`, `CircuitOpen`):
//!      it never reached the tool, but it is retried only when the refusal
//!      carries a `retry_after`, and only after it;
//!    - otherwise the server may have acted, so the request must be safe to
//!      repeat: a `tools/call` whose tool's
//!      [`safe_to_repeat`](RetryBackoffBuilder::safe_to_repeat) override
//!      (`.tool(name, |b| b.safe_to_repeat(true))`) or, without one, the
//!      [`ToolCatalog`](toolwarden_core::ToolCatalog) says so (configured
//!      policy, or trusted `readOnlyHint`/`idempotentHint` annotations), or
//!      another method in [`safe_methods`](RetryBackoffBuilder::safe_methods)
//!      (default [`DEFAULT_SAFE_METHODS`]: `tools/list`, `prompts/list`,
//!      `prompts/get`, `resources/list`, `resources/templates/list`,
//!      `resources/read`, `ping`).
//! 4. The delay fits the deadline (below).
//! 5. The retry budget allows one more retry (below).
//!
//! **The default catalog is empty and untrusted, so by default no tool call
//! is repeated after a failure that may have reached the server**: only
//! failures before the request left and hinted rejections are. Give the
//! layer the stack's catalog (and trust it, or configure tools as safe) to
//! retry tool errors.
//!
//! When an attempt is not retried, its result is returned unchanged: a tool
//! error stays an `Ok` response with `isError: true`, an error stays the
//! same error.
//!
//! # When
//!
//! The delay before retry `n` is drawn by the [`Jitter`] variant (default
//! full jitter) under a ceiling of `base_delay · 2^(n-1)` capped at
//! `max_delay` (defaults 100 ms and 10 s); see [`Jitter`] for the bounds of
//! each variant. A retry-after hint carried by the failure (a `RateLimited`
//! or `CircuitOpen` rejection, JSON-RPC -32023 `data`, an HTTP
//! `Retry-After`) replaces the computed delay when it is longer. A hint
//! longer than `max_delay` means no retry: the failure, which carries the
//! hint, is returned at once (a circuit breaker's open period or a server
//! asking for a long pause is for the caller to act on, not a wait inside
//! the call, which would hold every call to an open circuit until it
//! half-opens). So does a hint that would not end before the deadline. A
//! hint of any size is accepted (`Duration::MAX` included).
//!
//! The [`deadline`](RetryBackoffBuilder::deadline) (default 30 s) counts
//! from the start of the first attempt. A retry whose delay would not end
//! before it is not made: the failure is returned at once rather than after
//! a wait that cannot help. When the deadline passes, so a call never
//! outlives it except by its first attempt (bound that one with a timeout
//! layer):
//!
//! - a retry still running is dropped (cancelling it) and the call fails
//!   with [`CallTimedOut`](toolwarden_core::classify::CallTimedOut)
//!   (`after` = the deadline), which the classifier reads as a `Timeout`
//!   that is *not* `before_sent`. The retry may have reached the tool, so
//!   the previous failure is never returned in its place: it may say the
//!   request never left (a connect failure, the `CircuitOpen` refusal
//!   before a half-open probe), and a caller trusting that could run a
//!   destructive tool twice;
//! - a retry still waiting for the inner service's readiness was never
//!   sent: the previous failure is returned as it was, unless it says the
//!   request never left (failure before sending, or a refusal) while an
//!   earlier attempt may have reached the tool; then the call fails with
//!   `CallTimedOut` too.
//!
//! # The retry budget
//!
//! Every call deposits `ratio` of a retry (default 0.2) into a budget, every
//! retry withdraws one, and a floor of `min_per_sec` retries per second
//! (default 10) is always available; both expire after `ttl` (default 10 s).
//! See [`RetryBudget`]. Clones of a service, and every service one layer
//! made, share the budget; [`key_by`](RetryBackoffBuilder::key_by) keeps
//! one per tool (or any [`KeyBy`](toolwarden_core::KeyBy)) in a map bounded
//! by [`bounds`](RetryBackoffBuilder::bounds). When the budget refuses, the
//! failure is returned unchanged and an
//! [`Event::RetryBudgetExhausted`](toolwarden_core::Event::RetryBudgetExhausted)
//! naming the call's `key` (its tool) is emitted.
//! Retries after a rejection by a layer below consume budget like any
//! other: each one is another attempt sent down the stack.
//!
//! # Per-tool policies
//!
//! [`tool`](RetryBackoffBuilder::tool) gives one tool its own
//! `max_attempts`, `base_delay`, `max_delay`, `deadline`, `jitter` and
//! `retry_on` (`max_attempts(1)`: never retried), validated at `build` like
//! the layer's (errors name `tools."<tool>".<field>`), and its
//! `safe_to_repeat`, which overrides the catalog for that tool. The budget,
//! the catalog, the safe methods, the events and the classifier stay
//! layer-wide. Without overrides a call costs nothing more; with some, one
//! lookup of the tool name per call.
//!
//! # Attempts
//!
//! Every attempt is a fresh call of the inner service, after its
//! `poll_ready`, with an [`Attempt`](toolwarden_core::Attempt) extension
//! (1 for the first), so the rate limiter and the circuit breaker below see,
//! and count, each one. Before each retry an
//! [`Event::Retried`](toolwarden_core::Event::Retried) with the attempt number and the
//! delay is emitted; observability turns these into metrics.
//!
//! MCP forbids reusing a request id within a session, so every retry of a
//! raw JSON-RPC request ([`jsonrpc::Request`](toolwarden_core::jsonrpc::Request))
//! goes out under its own id, the string `"<original>#tw-retry-<n>"` for
//! attempt `n` (`7#tw-retry-2` for the first retry of id `7`;
//! `"req-7"#tw-retry-2` for the string id `req-7`), and its
//! [`jsonrpc::Response`](toolwarden_core::jsonrpc::Response) is re-addressed
//! to the caller's id before it leaves the layer. String ids ending in
//! `#tw-retry-<n>` are reserved: a client must not use them. rmcp's
//! `ClientRequest` carries no id (the rmcp peer numbers each request it
//! sends, every attempt included), so it is sent as it is.
//!
//! Requests must be `Clone + 'static`: the layer keeps a copy of each call's
//! request until it returns, and recognises the JSON-RPC request type to
//! give its retries their ids. Waiting uses `tokio::time`, so a call that retries needs
//! a Tokio runtime with the time driver enabled; a call that succeeds at
//! once never touches the timer.
//!
//! # Configuration limits
//!
//! [`build`](RetryBackoffBuilder::build) accepts any value of every knob
//! (`Duration::ZERO`, `Duration::MAX`, NaN, infinities, negative ratios) or
//! refuses it with a [`ConfigError`](toolwarden_core::ConfigError) naming
//! the field; it never panics, and nothing a built layer computes from its
//! knobs or from a hint panics either: delays saturate (the doubling stops
//! at `max_delay`, jitter draws are clamped to about 584 years), and no
//! wait ends past the deadline, which is at most 24 h.
//!
//! In the standard stack this layer sits below the fallback cache and above
//! the rate limiter and the circuit breaker.
//!
//! Feature `serde` (off by default): `RetrySettings` and `RetryToolSettings`,
//! the builder's knobs as serde types for configuration files, applied with
//! the builder's `settings` and `tool_settings`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod attempt_id;
mod backoff;
mod budget;
mod builder;
mod future;
mod layer;
mod policy;
mod service;
#[cfg(feature = "serde")]
mod settings;

pub use backoff::Jitter;
pub use budget::{BudgetConfig, RetryBudget};
pub use builder::RetryBackoffBuilder;
pub use future::ResponseFuture;
pub use layer::RetryBackoffLayer;
pub use policy::DEFAULT_SAFE_METHODS;
pub use service::RetryBackoff;
#[cfg(feature = "serde")]
pub use settings::{RetrySettings, RetryToolSettings};
