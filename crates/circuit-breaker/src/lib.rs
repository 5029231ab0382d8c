//! Middleware that refuses calls to a tool whose circuit is open: per-key
//! circuit breakers with true sliding windows, half-open probes and a
//! registry.
//!
//! One breaker per key (per tool by default, see [`KeyBy`](toolwarden_core::KeyBy)),
//! held in the core's bounded [`KeyedState`](toolwarden_core::KeyedState).
//! Each breaker is a state machine:
//!
//! - **Closed**: calls pass; outcomes are recorded. The circuit opens when
//!   any enabled policy trips, once `minimum_calls` calls were recorded:
//!   `failure_threshold` consecutive counted failures; a failure rate at or
//!   above `failure_rate_threshold` over the **count window** (exactly the
//!   last N calls, O(1) per call) or the **time window** (buckets); a
//!   slow-call rate at or above `slow_call_rate_threshold` (a call is slow at
//!   `slow_call_duration` or more). Only failures the classifier counts trip
//!   it: `Client` failures and other layers' rejections never do.
//! - **Open**: calls fail fast with [`CircuitOpen`](toolwarden_core::CircuitOpen),
//!   carrying the key and `retry_after`, the time until a probe may pass.
//!   After `reset_timeout` (growing by `reset_multiplier` on each
//!   consecutive re-open, capped at `max_reset_timeout`, with jitter; back to
//!   the base after a clean close) the next call is a probe.
//! - **HalfOpen**: at most `half_open_max_calls` probes at once;
//!   `success_threshold` successes close it, any counted failure (or slow
//!   probe) reopens it. A probe dropped before it ends gives its place back.
//!   A probe with no outcome after `probe_timeout` (default 30 s) counts as
//!   a failed probe: the circuit reopens, without waiting for the probe's
//!   future to be polled (see [`CircuitBreakerBuilder::probe_timeout`]), so
//!   a hung probe cannot hold the circuit half-open forever. With a
//!   [`StateSync`], each probe first needs its permit, so that one replica
//!   of a fleet probes at a time; a replica denied it refuses as open, with
//!   a `retry_after`, and counts no failure (see [`StateSync::probe_permit`]).
//! - Manual: **Disabled** (everything passes, nothing recorded),
//!   **ForcedOpen** (everything refused), **MetricsOnly** (recorded and
//!   reported, never refuses), set through the [`CircuitRegistry`].
//!
//! Every knob is validated by [`CircuitBreakerBuilder::build`], which names
//! the bad field; durations and floats at any extreme (`Duration::MAX`,
//! NaN, infinities, negatives) are either refused there or handled with
//! saturating arithmetic, never a panic at build or call time. Each knob's
//! bounds are written next to it.
//!
//! Every breaker follows the builder's policy, unless its tool has one of
//! its own: [`CircuitBreakerBuilder::tool`] overrides the trip, reset and
//! half-open knobs per tool (with keys per tool or per session and tool),
//! validated at `build` like the rest, chosen once when a breaker is
//! created. The registry-wide settings (name, key function, bounds, events,
//! sync, classifier) are the builder's alone.
//!
//! Transitions are reported through the core's [`Events`](toolwarden_core::Events)
//! ([`Event::CircuitOpened`](toolwarden_core::Event::CircuitOpened),
//! [`Event::CircuitHalfOpened`](toolwarden_core::Event::CircuitHalfOpened),
//! [`Event::CircuitClosed`](toolwarden_core::Event::CircuitClosed), each
//! naming the breaker's `key`) and, for sharing between replicas, through a
//! [`StateSync`]; remote transitions come in through
//! [`CircuitRegistry::apply_remote`] (see [`StateSync`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! use std::time::Duration;
//! use serde_json::json;
//! use tower::{Layer, ServiceExt};
//! use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}, CircuitOpen};
//! use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
//!
//! let mock = MockMcp::new().default_step("search", Step::tool_error("Error executing tool search: boom"));
//! let layer = CircuitBreakerLayer::builder()
//!     .failure_threshold(3)
//!     .minimum_calls(3)
//!     .reset_timeout(Duration::from_secs(30))
//!     .jitter(0.0)
//!     .build()
//!     .unwrap();
//! let registry = layer.registry().clone();
//! let svc = layer.layer(mock.clone());
//!
//! for id in 0..3 {
//!     let resp = svc.clone().oneshot(Request::tool_call(id, "search", json!({}))).await.unwrap();
//!     assert!(toolwarden_core::McpResponse::is_tool_error(&resp)); // failures pass through ...
//! }
//! assert_eq!(registry.state("search"), Some(CircuitState::Open)); // ... and trip the breaker
//!
//! let err = svc.clone().oneshot(Request::tool_call(3, "search", json!({}))).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().unwrap();
//! assert_eq!(open.key(), "search");
//! assert_eq!(toolwarden_core::Rejection::retry_after(open), Some(Duration::from_secs(30)));
//! assert_eq!(mock.calls("search"), 3); // the refused call never reached the tool
//!
//! // Other tools are unaffected.
//! assert!(svc.clone().oneshot(Request::tool_call(4, "fetch", json!({}))).await.is_ok());
//! # }
//! ```
//!
//! Feature `serde` (off by default): `CircuitBreakerSettings` and
//! `CircuitBreakerToolSettings`, the builder's knobs as serde types for
//! configuration files, applied with the builder's `settings` and
//! `tool_settings`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod breaker;
mod builder;
mod config;
mod future;
mod layer;
mod registry;
mod service;
#[cfg(feature = "serde")]
mod settings;
mod sync;
mod window;

pub use breaker::{CallTotals, CircuitSnapshot, RecentError, RECENT_ERRORS};
pub use builder::CircuitBreakerBuilder;
pub use config::{TimeWindow, MAX_COUNT_WINDOW, MAX_TIME_BUCKETS};
pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;
pub use registry::{CircuitRegistry, RegistrySnapshot};
pub use service::CircuitBreaker;
#[cfg(feature = "serde")]
pub use settings::{CircuitBreakerSettings, CircuitBreakerToolSettings, DEFAULT_TIME_BUCKETS};
pub use sync::{
    LocalTransition, ProbePermit, ProbeRequest, RemoteState, RemoteTransition, StateSync,
};
pub use toolwarden_core::CircuitState;
pub use window::WindowStats;
