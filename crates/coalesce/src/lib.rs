//! Middleware that lets identical concurrent MCP tool calls share one
//! upstream call (request coalescing, or single flight), for the tools
//! where that is safe.
//!
//! Agents (and several agents behind one gateway) often ask the same thing
//! at once: the same `search` with the same arguments, the same
//! `get_weather` for the same city. For a tool whose answer does not
//! depend on how often it is called, one upstream call can answer them
//! all. Which tools qualify is the [`ToolCatalog`](toolwarden_core::ToolCatalog)'s
//! call, the same one the retry layer and the fallback cache read: a tool
//! configured cacheable or safe to repeat, or whose *trusted* annotations
//! say `readOnlyHint` or `idempotentHint`; or a per-tool override
//! ([`coalesce`](CoalesceBuilder::coalesce)). With the default (empty,
//! untrusted) catalog nothing is shared.
//!
//! - **Identical** means the same tool and the same fingerprint of its
//!   arguments ([`toolwarden_core::call_fingerprint`]: key order and every
//!   `_meta` ignored), and with [`per_session`](CoalesceBuilder::per_session)
//!   the same session. Continuations (2026-07-28 `inputResponses`) are
//!   never shared.
//! - **Each caller gets its own answer**: a copy of the shared response with
//!   its own JSON-RPC id; a failure is shared too, each caller getting an
//!   equivalent error (a copy of the same type for toolwarden's own
//!   errors and JSON-RPC errors, else a [`SharedFailure`] whose source is
//!   the failure).
//! - **A task is its creator's**, and so is a request for input: when the
//!   server answers the shared call with a task
//!   ([`McpResponse::is_task`](toolwarden_core::McpResponse::is_task)) or
//!   asks for input (2026-07-28 `resultType: "input_required"`, whose
//!   `requestState` the continuation hands back: the asking was for one
//!   caller, and a one-time handle would be taken by whoever answered
//!   first), the caller whose request went upstream gets it, and every
//!   other caller then makes its own call (its id would be no answer for them: a proxy
//!   lets only a task's creator read or cancel it). Those callers' requests
//!   are kept for this, with a clone of the inner service, so the service
//!   is `Clone` and requests and service are `Send + 'static`.
//! - **Progress is the caller's whose request went upstream**: a caller
//!   that joins gets the answer, and no progress notifications (its token
//!   was never sent). Leave a tool whose progress matters to every caller
//!   out of coalescing.
//! - **A caller that leaves does not cancel the call of the others**: the
//!   call (its inner future, boxed) is shared by every caller waiting for
//!   it, and whichever caller is polled polls it; the inner future holds the
//!   waker of the last one that did, and when that caller leaves it wakes
//!   the others to poll in its place. When the **last** caller leaves, the
//!   call is dropped (cancelled), as a call nobody waits for.
//! - **Made with no lock held**: a call is registered in the map (a short
//!   lock) before its leader calls the inner service, unlocked, and then
//!   starts it; callers that join meanwhile wait for the start. So a slow
//!   inner `call` holds up no other call, and an inner service may call
//!   through the same layer from its `call` (a composed tool). A panic of
//!   the inner `call` reaches the leader; those who joined get a
//!   [`SharedFailure`] whose source is [`SharedCallPanicked`]. A caller
//!   polling the shared call holds the call's own lock for that poll; a
//!   caller joining it meanwhile (on another thread) waits for the poll
//!   with the map unlocked, so calls of other keys never wait behind a
//!   poll (nor deadlock when the inner future itself calls through the
//!   same layer).
//! - **Cheap when nobody joins** (most calls): one lock of the map to
//!   register the call, one of the call to start it and one to poll it
//!   (a call answered at its first poll); the answer is moved
//!   to its caller, not copied. An answered call keeps its slot in the map
//!   (closed, its future and answer dropped) and carries the next call with
//!   its key in the same allocation, so nobody locks the map again to
//!   remove it, and once warm a call allocates nothing here.
//! - **Panics**: a panic of the inner call unwinds to the caller that was
//!   polling it; the call is then over, and the others waiting for it get a
//!   [`SharedFailure`] whose source is [`SharedCallPanicked`]. Nobody is
//!   left waiting.
//! - **Bounded**: the map holds at most
//!   [`max_in_flight`](CoalesceBuilder::max_in_flight) slots (default
//!   10 000), calls in flight and answered slots together. A new key at the
//!   bound first sweeps the answered slots; if the map is still full (every
//!   slot a call in flight), its call is made on its own. So at most
//!   `max_in_flight` calls in flight can be joined. Answered slots are also
//!   swept once they make the map reach `max(64, 2 ×` the calls left in
//!   flight after the last sweep`)`: a map keeps about as many answered
//!   slots as calls in flight, and at least 64. A call arriving after the
//!   answer makes a new call (this is not a cache: see the fallback cache
//!   for answers kept).
//!
//! Why a crate of its own rather than a mode of the fallback cache: the
//! cache keeps answers after the fact and serves them when a call fails;
//! coalescing keeps nothing past a call's end and changes how many calls
//! reach the server. Each works without the other, and in the standard
//! stack they sit at different places (coalescing right above retry, so
//! joined callers share the retries too; the cache above both).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), toolwarden_core::BoxError> {
//! use std::time::Duration;
//! use serde_json::json;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use toolwarden_coalesce::CoalesceLayer;
//! use toolwarden_core::{jsonrpc::{Id, Request}, testing::{MockMcp, Step}, ToolCatalog, ToolPolicy};
//!
//! let catalog = ToolCatalog::new();
//! catalog.configure("get_weather", ToolPolicy { cacheable: Some(true), ..ToolPolicy::default() });
//! let upstream = MockMcp::new().default_step("get_weather", Step::ok("sunny").after(Duration::from_millis(300)));
//! let mut svc = ServiceBuilder::new()
//!     .layer(CoalesceLayer::builder().catalog(catalog).build()?)
//!     .service(upstream.clone());
//!
//! let ask = |id: i64| Request::tool_call(id, "get_weather", json!({"city": "Oslo"}));
//! let first = svc.ready().await?.call(ask(1));
//! let second = svc.ready().await?.call(ask(2));
//! let (first, second) = tokio::join!(first, second);
//! assert_eq!(upstream.calls("get_weather"), 1); // one upstream call
//! assert_eq!(first?.id, Id::Number(1));         // each caller its own id
//! assert_eq!(second?.id, Id::Number(2));
//! # Ok(()) }
//! ```
//!
//! Feature `serde` (off by default): `CoalesceSettings` and
//! `CoalesceToolSettings`, the builder's knobs as serde types for
//! configuration files.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod builder;
mod call;
mod error;
mod future;
mod inflight;
mod layer;
mod service;
#[cfg(feature = "serde")]
mod settings;

pub use builder::{CoalesceBuilder, DEFAULT_MAX_IN_FLIGHT};
pub use error::{SharedCallPanicked, SharedFailure};
pub use future::ResponseFuture;
pub use layer::CoalesceLayer;
pub use service::Coalesce;
#[cfg(feature = "serde")]
pub use settings::{CoalesceSettings, CoalesceToolSettings};
