//! Middleware that stops an agent repeating the same tool call, or a short
//! cycle of calls, without breaking tools that are polled on purpose.
//!
//! Agents re-issue the same failing call 20–90 times. [`LoopGuardLayer`]
//! remembers each session's recent calls and refuses the call that would
//! continue a loop with [`LoopDetected`] (inside a `BoxError`, as every
//! toolwarden rejection); the edge renders it for the model with
//! [`FailureReport`](toolwarden_core::FailureReport), as an `isError` result
//! that names the tool, what was repeated and tells the model to change
//! approach.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use serde_json::json;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use toolwarden_core::testing::{MockMcp, Step};
//! use toolwarden_core::{jsonrpc::Request, FailureReport, LoopDetected, McpResponse};
//! use toolwarden_loop_guard::LoopGuardLayer;
//!
//! // A tool that keeps failing, and a status tool the agent polls on purpose.
//! let server = MockMcp::new().default_step("search", Step::tool_error("index unavailable"));
//! let mut service = ServiceBuilder::new()
//!     .layer(LoopGuardLayer::builder().tool("job_status", |b| b.exempt(true)).build()?)
//!     .service(server);
//!
//! // Each retry carries a fresh progressToken in `_meta`: still the same call.
//! let search = |id: i64| {
//!     Request::tool_call(id, "search", json!({"q": "tower", "_meta": {"progressToken": id}}))
//! };
//! for id in 1..=3 {
//!     let response = service.ready().await?.call(search(id)).await?;
//!     assert!(response.is_tool_error()); // the tool's own failures go through
//! }
//! let err = service.ready().await?.call(search(4)).await.unwrap_err();
//! assert_eq!(err.downcast_ref::<LoopDetected>().map(LoopDetected::repeats), Some(4));
//!
//! // What the model reads:
//! let result = FailureReport::from_error("search", err.as_ref()).to_tool_result();
//! let text = result["content"][0]["text"].as_str().unwrap_or_default();
//! assert!(text.contains("search called 4 times") && text.contains("change approach"), "{text}");
//!
//! // The exempt polling tool is never blocked.
//! for id in 10..60 {
//!     let status = Request::tool_call(id, "job_status", json!({"job": 7}));
//!     service.ready().await?.call(status).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # What is a loop
//!
//! Two calls are *identical* when they have the same fingerprint
//! ([`toolwarden_core::call_fingerprint`]): the same tool and the same
//! arguments, whatever the key order and whatever the `_meta` members. The
//! fingerprint is read from the request's extensions when an earlier layer
//! computed it, and stored there otherwise.
//!
//! Each session remembers its last `window_calls` calls (default 16) made
//! within `window_time` (default 5 minutes). Against that history a call is
//! blocked, in this order, when:
//!
//! 1. **a refusal stays in force**: an identical call was blocked since the
//!    last success of another call, and the refusal has not lifted (below);
//! 2. **it keeps failing**: `max_failing_repeats` identical calls (default 3)
//!    failed in a row, so the 4th is blocked
//!    ([`LoopPattern::RepeatedFailure`]);
//! 3. **it keeps coming**: `max_repeats` identical calls (default 8) were
//!    made in a row, whether they succeeded, failed or are still running,
//!    so the 9th is blocked ([`LoopPattern::Repeated`]);
//! 4. **it continues a cycle**: the calls ending with this one repeat a
//!    cycle of 2 to `max_cycle_period` distinct calls (default 3) more than
//!    `max_cycle_repeats` full rounds (default 3): after A, B, A, B, A, B
//!    the next A is blocked ([`LoopPattern::Cycle`]).
//!
//! The call one short of rules 2–4 passes, and emits
//! [`Event::LoopWarned`](toolwarden_core::Event::LoopWarned) (the 3rd
//! failing call, the 8th repeat, the call completing the 3rd round); a
//! blocked call emits [`Event::LoopDetected`](toolwarden_core::Event::LoopDetected).
//! Both carry the repeats counting the current call, as [`LoopDetected::repeats`].
//!
//! **What fails, and what builds no loop.** A call's outcome is recorded
//! when its response future completes, judged by the classifier (default
//! [`McpClassifier`](toolwarden_core::McpClassifier)) by its
//! [`OutcomeKind`](toolwarden_core::OutcomeKind):
//!
//! - `Success`: a success;
//! - `ToolError` (`isError`, empty result) and `ProtocolError` (a JSON-RPC
//!   error), of any failure class: a failure. This is the tool answering
//!   badly, and a `Client` error repeated (wrong arguments, unknown tool)
//!   is exactly the stuck agent; so is a `Transport` outcome of class
//!   `Client` (an HTTP server refusing the request itself: 409, 422, 401
//!   without credentials);
//! - other `Transport` and `Timeout` (the upstream is down or slow) and
//!   `Rejected` (a toolwarden layer below refused the call: `RateLimited`,
//!   `CircuitOpen`, or the fallback cache's rendering of one): **neutral**.
//!   Neither success nor failure, and not a repeat either: a neutral call
//!   counts for no rule, and ends a cycle's run. It is not the agent's
//!   doing. In particular, an agent polling one call every 0.5 s through a
//!   4 s upstream restart makes 8 identical calls that all fail in
//!   transport; counting them towards `max_repeats` would refuse the agent
//!   just as the upstream returns, so they do not count.
//!
//! A call still running, or whose future was dropped, is neither success
//! nor failure, but it is a repeat (a flood of identical concurrent calls
//! is a loop).
//!
//! **What clears.** A success of another call (another tool, or the same
//! tool with other arguments) clears every streak before it: rules 1–3
//! only look at the calls since the last success of another call. A
//! success of the identical call resets its failures (rule 2) but not its
//! repeats (rule 3). Failures of other calls clear nothing. Cycles are
//! judged on the sequence of calls alone, successes included: repeating
//! A, B, A, B with good answers is still a loop. Calls also leave the
//! history after `window_time` or `window_calls` newer calls.
//!
//! **Blocked calls** never reach the inner service. They are recorded, as
//! blocked: they continue a cycle, and keep the refusal in force for the
//! identical call (rule 1). Asking again does not help (nor does it make
//! the refusal last longer); doing something else that works does.
//!
//! **A refusal lifts** (and the identical call is let through as a fresh
//! attempt, whose streak restarts: the calls before the refusal no longer
//! count for rules 2–3) as soon as one of these holds:
//!
//! - another call of the session succeeded since (see above);
//! - the identical call succeeded since the first block of the refusal,
//!   **in any session** of the guard (every service built from one layer
//!   shares this). The guard keeps, for that, the time of the last success
//!   of recently successful calls in a fixed table of 1024 entries (8 KiB
//!   per guard, no lock): calls sharing an entry overwrite each other, so
//!   a success can be forgotten, and the refusal then lifts by one of the
//!   other ways; times are compared in whole milliseconds, and a success in
//!   the very millisecond of the block does not lift it;
//! - a block of the refusal was made while the tool's circuit refused
//!   calls, and it no longer does: see
//!   [`circuits`](LoopGuardBuilder::circuits) (without it, every circuit
//!   reads as closed and this never applies). A refusal made while the
//!   circuit is closed, the normal case, does not lift this way. The view
//!   tells only whether the circuit refuses calls now, so a circuit whose
//!   open period is over and that waits for a probe reads as closed too:
//!   the lifted call may be that probe;
//! - `refusal_cooldown` (default 30 s, at most 30 s) passed since the first
//!   block of the refusal, however often the call was refused meanwhile.
//!
//! A refusal also ends when its blocks leave the history (`window_time`,
//! `window_calls`).
//!
//! # Tools polled on purpose
//!
//! [`LoopGuardBuilder::tool`] with [`exempt(true)`](LoopGuardBuilder::exempt)
//! passes a tool's calls through untouched: never blocked, never recorded
//! (so they neither count towards nor clear another call's streak). With
//! [`limits`](LoopGuardBuilder::limits) it gives a tool limits of its own
//! instead; [`ToolLimits::polling`] keeps blocking identical calls that keep
//! failing but allows any number of identical successful ones, and keeps
//! the tool out of cycles:
//!
//! ```
//! use toolwarden_loop_guard::{LoopGuardLayer, ToolLimits};
//! let layer = LoopGuardLayer::builder()
//!     .tool("wait_for_job", |b| b.exempt(true))
//!     .tool("job_status", |b| b.limits(ToolLimits::polling()))
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```
//!
//! Only `tools/call` requests are guarded; every other request goes to the
//! inner service untouched. So does a continuation of a `tools/call`
//! (2026-07-28 `inputResponses` or `requestState` in its params): it
//! carries the arguments of the call it continues, and is that call going
//! on, not the agent asking again.
//!
//! # Sessions and memory
//!
//! The session is the request's [`session_key`](toolwarden_core::McpRequest::session_key)
//! (the [`SessionKey`](toolwarden_core::SessionKey) extension); calls without
//! one share a default session. Histories live in a bounded
//! [`KeyedState`](toolwarden_core::KeyedState), bounded by
//! [`bounds`](LoopGuardBuilder::bounds):
//!
//! - at most `max_keys` sessions (default 10 000) have a history.
//!   **Past the bound, a new session has none**: its calls pass unguarded
//!   (its loops go unseen) until a place is free. They used to share one
//!   overflow history, where identical calls of different sessions added
//!   up: a client that made 10 000 keys (a new connection per sessionless
//!   request, or sessions opened and closed) then got every later
//!   session's first call refused as a loop, by repeating it itself. Size
//!   `max_keys` above the number of concurrent sessions you expect;
//! - a session idle for `idle_timeout` (default 10 minutes) is
//!   forgotten, freeing its place;
//! - each history is a fixed ring of `window_calls` records of 40 bytes
//!   (32 for the call, 8 for its outcome; 640 bytes by default),
//!   allocated once; session keys longer than 64 bytes are stored as a
//!   65-byte digest.
//!
//! So memory is bounded by about `(max_keys + 2) × (40 × window_calls +
//! key + ~150)` bytes, plus 8 KiB of recent successes, whatever the input:
//! about 9 MB with the defaults.
//!
//! A session's history is behind its own short lock (uncontended unless the
//! session makes concurrent calls), taken once per call, when it is
//! admitted; a completed call records its outcome in its own record's slot
//! with one atomic compare-and-swap, without the lock (a late answer whose
//! record was overwritten records nothing). Each decision reads
//! O(`window_calls`) records at most. The default session is shared by all
//! its callers, so its lock can be contended.
//!
//! The histories are created when the layer is built: every service the
//! layer builds (and every service its clones build) shares them, so a
//! stack that builds one service per connection still guards each session
//! as one, and the bounds above hold for the layer as a whole
//! ([`LoopGuard::new`] with a layer shares that layer's histories too).
//! Histories of their own take a layer of their own.
//!
//! Feature `serde` (off by default): `LoopGuardSettings` and
//! `LoopGuardToolSettings`, the builder's knobs as serde types for
//! configuration files, applied with the builder's `settings` and
//! `tool_settings`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod builder;
mod config;
mod future;
mod history;
mod layer;
mod service;
mod sessions;
#[cfg(feature = "serde")]
mod settings;

pub use builder::LoopGuardBuilder;
pub use config::{
    LoopGuardConfig, ToolLimits, MAX_CYCLE_PERIOD, MAX_REFUSAL_COOLDOWN, MAX_WINDOW_CALLS,
};
pub use future::ResponseFuture;
pub use layer::LoopGuardLayer;
pub use service::LoopGuard;
#[cfg(feature = "serde")]
pub use settings::{LimitsSettings, LoopGuardSettings, LoopGuardToolSettings};
pub use toolwarden_core::{LoopDetected, LoopPattern};
