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
//! # Adaptive cap
//!
//! By default the cap is `max_concurrent`, fixed. With
//! [`adaptive`](BulkheadBuilder::adaptive) (or an `adaptive` table in the
//! settings), each key's cap follows the server's health by AIMD (additive
//! increase, multiplicative decrease, as TCP's congestion window), between
//! a floor and a ceiling:
//!
//! - **Bounds.** The cap stays in `[min_concurrent, max_concurrent]`
//!   (`min_concurrent` ≥ 1, default 1; the ceiling is the key's
//!   `max_concurrent`) and starts at `initial_concurrent` (default: the
//!   ceiling). `build` refuses a floor of 0 or above the ceiling, a start
//!   outside the bounds, a missing or zero `latency_threshold`, and a
//!   `decrease_factor` not strictly between 0 and 1, naming the field
//!   (`adaptive.min_concurrent`, `tools."pdf".adaptive.decrease_factor`).
//! - **Growth.** A call that succeeds within `latency_threshold` adds
//!   `1/cap` (the cap grows by one per `cap` such successes), but only
//!   while the cap is used: at least half its places taken when the call
//!   ends (counting it). A cap that light traffic never fills does not
//!   creep up to the ceiling, where a burst would find it.
//! - **Cut.** A call slower than `latency_threshold` (whatever its
//!   outcome, and a call cancelled after running that long), or one that
//!   failed by the server's fault (transport failure, timeout, overload,
//!   5xx-like JSON-RPC errors and `isError` results the classifier calls
//!   `Transient` or `Server`), multiplies the cap by `decrease_factor`
//!   (default 0.5), rounded down and never below the floor.
//! - **Cool-down.** A cut answers the calls in flight when it happened:
//!   they were admitted under the old cap, so their own failures cannot cut
//!   again. Only a call admitted after the latest cut can cut the cap
//!   further: a burst of failures cuts once per round of calls, not to the
//!   floor at once.
//! - **No signal.** A client error (the request was wrong) says nothing
//!   about load, nor does a rejection by another toolwarden layer (an open
//!   circuit below, ...), nor this bulkhead's own refusals: they never
//!   move the cap.
//! - **Shrinking.** Calls in flight are never cancelled: a cut takes the
//!   free places at once, and the calls in flight above the new cap keep
//!   theirs until they end, when their places are retired instead of given
//!   back. Until then no call is admitted: a call is admitted only while
//!   the calls in flight are below the cap as it stands.
//! - **Told.** Every move of a key's cap is an
//!   [`Event::BulkheadLimitChanged`](toolwarden_core::Event::BulkheadLimitChanged)
//!   (the key, the cap before and after), sent once the cap's lock is
//!   released; the observability layer counts it as
//!   `bulkhead_limit_changed`. [`current_limit`](BulkheadLayer::current_limit)
//!   reads where a cap stands.
//!
//! Outcomes are judged by the layer's [classifier](BulkheadBuilder::classifier)
//! (the standard stack's shared one). A key's cap lives with its state, so
//! a key evicted as idle starts again at `initial_concurrent`;
//! [`current_limit`](BulkheadLayer::current_limit) shows where a cap
//! stands. The fixed cap pays nothing for this: its calls classify nothing
//! and take no lock.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), toolwarden_core::BoxError> {
//! use serde_json::json;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use toolwarden_bulkhead::BulkheadLayer;
//! use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}, KeyRef};
//!
//! let layer = BulkheadLayer::builder()
//!     .max_concurrent(8) // the ceiling
//!     .adaptive(|a| a.min_concurrent(2).latency_threshold(Duration::from_millis(200)))
//!     .build()?;
//! let mock = MockMcp::new().default_step("search", Step::ok("hits").after(Duration::from_millis(500)));
//! let mut svc = ServiceBuilder::new().layer(layer.clone()).service(mock.clone());
//! let search = || Request::tool_call(1, "search", json!({"q": "tower"}));
//!
//! assert_eq!(layer.current_limit(KeyRef::Tool("search")), 8);
//! svc.ready().await?.call(search()).await?; // 500 ms: too slow
//! assert_eq!(layer.current_limit(KeyRef::Tool("search")), 4);
//! svc.ready().await?.call(search()).await?;
//! svc.ready().await?.call(search()).await?;
//! assert_eq!(layer.current_limit(KeyRef::Tool("search")), 2); // the floor
//!
//! // The server recovers: fast successes with the cap in use grow it.
//! mock.set_default("search", Step::ok("hits").after(Duration::from_millis(20)));
//! for _ in 0..2 {
//!     let calls = [svc.ready().await?.call(search()), svc.ready().await?.call(search())];
//!     for call in calls {
//!         call.await?;
//!     }
//! }
//! assert_eq!(layer.current_limit(KeyRef::Tool("search")), 3);
//! # Ok(()) }
//! ```
//!
//! Feature `serde` (off by default): `BulkheadSettings`,
//! `BulkheadToolSettings` and `AdaptiveSettings`, the builder's knobs as
//! serde types for configuration files, applied with the builder's
//! `settings` and `tool_settings`.

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
