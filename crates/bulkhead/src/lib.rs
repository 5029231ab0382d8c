//! Middleware that caps the MCP tool calls in flight per tool (or per
//! upstream, per session and tool, or globally), so one slow tool cannot
//! take every connection, worker or token of a server from the others.
//!
//! Each `tools/call` takes a place in its key's compartment (per tool by
//! default, see [`key_by`](BulkheadBuilder::key_by)) and gives it back when
//! its response future completes **or is dropped** (a cancelled call frees
//! its place at once). A call that finds every place taken is refused with
//! [`BulkheadFull`] at once (the default, [`DEFAULT_MAX_WAIT`] is zero), or
//! waits up to [`max_wait`](BulkheadBuilder::max_wait) for a place, in the
//! order the calls came, without holding the inner service's readiness.
//! Refusals are also reported as
//! [`Event::BulkheadFull`](toolwarden_core::Event::BulkheadFull).
//!
//! A refusal carries a `retry_after` estimated from the key's recent call
//! durations: an exponentially weighted moving average `d` of the calls
//! that completed (the newest weighing 1/8), divided by the cap (with every
//! place taken by calls lasting about `d`, one ends about every
//! `d / max_concurrent`); at least 1 ms, and 100 ms before any call of the
//! key has completed. Like every toolwarden rejection, it is never counted
//! as a failure of the tool: the circuit breaker does not count it, the
//! loop guard builds no loop from it, the retry layer retries it only
//! after its `retry_after` and within its budget, and the standard stack
//! renders it as a readable `isError` result ("search is busy (10 calls
//! already in flight) and was not called; retry after 40 ms").
//!
//! Requests other than `tools/call` pass untouched. Per-key state is the
//! core's bounded [`KeyedState`](toolwarden_core::KeyedState); a key with
//! calls in flight or waiting is never evicted (see
//! [`bounds`](BulkheadBuilder::bounds)).
//!
//! An adaptive cap (AIMD on latency or errors) is not built: the cap is
//! what is configured.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), toolwarden_core::BoxError> {
//! use serde_json::json;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use toolwarden_bulkhead::BulkheadLayer;
//! use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}, BulkheadFull};
//!
//! let layer = BulkheadLayer::builder()
//!     .max_concurrent(4)
//!     .tool("render_pdf", |b| b.max_concurrent(1)) // one at a time
//!     .build()?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(MockMcp::new().default_step("render_pdf", Step::ok("done").after(Duration::from_secs(1))));
//!
//! let render = || Request::tool_call(1, "render_pdf", json!({"doc": 7}));
//! let first = svc.ready().await?.call(render()); // holds the only place
//! let err = svc.ready().await?.call(render()).await.unwrap_err();
//! let full = err.downcast_ref::<BulkheadFull>().unwrap();
//! assert_eq!(full.key(), "render_pdf");
//! first.await?;
//! svc.ready().await?.call(render()).await?; // the place is free again
//! # Ok(()) }
//! ```
//!
//! Feature `serde` (off by default): `BulkheadSettings` and
//! `BulkheadToolSettings`, the builder's knobs as serde types for
//! configuration files, applied with the builder's `settings` and
//! `tool_settings`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod adaptive;
mod builder;
mod future;
mod layer;
mod service;
#[cfg(feature = "serde")]
mod settings;
mod state;

pub use adaptive::{AdaptiveLimit, DEFAULT_DECREASE_FACTOR, DEFAULT_MIN_CONCURRENT};
pub use builder::{BulkheadBuilder, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_WAIT, MAX_MAX_CONCURRENT};
pub use future::ResponseFuture;
pub use layer::BulkheadLayer;
pub use service::Bulkhead;
#[cfg(feature = "serde")]
pub use settings::{AdaptiveSettings, BulkheadSettings, BulkheadToolSettings, KeyBySetting};
pub use toolwarden_core::BulkheadFull;
