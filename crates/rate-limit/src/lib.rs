//! Middleware that limits the rate of MCP tool calls with governor's GCRA
//! quotas: one global quota and one quota per tool (or per session and tool),
//! shared by every clone of the service.
//!
//! Each `tools/call` takes a token from its key's quota (the tool's override
//! or the `per_tool` quota) and from the global quota; both must admit it. A
//! call over quota is refused at once with [`RateLimited`] (key `global` or
//! the tool key, `retry_after` from governor's earliest admission time), or,
//! in [`Mode::Wait`], reserves its own place in the quotas' schedules (up to
//! `max_wait` ahead) and waits for it without holding the inner service's
//! readiness: waiters are admitted one per emission interval, in order. Refusals are also
//! reported as [`Event::RateLimited`](toolwarden_core::Event::RateLimited).
//! Requests other than `tools/call` pass untouched unless
//! [`limit_all_methods`](RateLimitBuilder::limit_all_methods) is set.
//!
//! Unlike tower's `RateLimit`, whose clones each keep their own budget, the
//! quota state lives in [`RateLimits`], behind an `Arc`, created once when
//! the layer is built: every service the layer builds (one per connection,
//! say), every clone of them and every service built from a clone of the
//! layer share it, so eight clones driven concurrently admit what one would.
//! Per-key state is the core's bounded
//! [`KeyedState`](toolwarden_core::KeyedState): see [`RateLimits`] for the
//! bound, the overflow quota and how the two quotas are taken together
//! without spending one when the other refuses. Time is read through
//! [`TokioClock`], so a paused tokio clock drives the quotas in tests.
//!
//! The quotas can also live outside the process, shared by every replica of
//! a service: give the builder a [`backend`](RateLimitBuilder::backend) (for
//! example `toolwarden_redis::RedisRateLimiter`). Keys, quotas and refusals
//! stay the same; the decision moves into the response future. See
//! [`RateLimitBackend`] for how it works and what happens when the backend
//! is away.
//!
//! The crate is built on governor's GCRA. Its public types are this crate's
//! own ([`Rate`], [`Quota`]); the one deliberate exception is [`TokioClock`],
//! a governor `Clock` for use with governor's own limiters.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), toolwarden_core::BoxError> {
//! use serde_json::json;
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use toolwarden_core::{jsonrpc::Request, testing::MockMcp, RateLimited};
//! use toolwarden_rate_limit::{Rate, RateLimitLayer};
//!
//! let layer = RateLimitLayer::builder()
//!     .global(Rate::per_second(100), 100)
//!     .per_tool(Rate::per_second(2), 2)               // 2 calls at once, then one every 500 ms
//!     .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1)) // a tighter quota for one tool
//!     .build()?;
//! let svc = ServiceBuilder::new().layer(layer).service(MockMcp::new());
//!
//! let search = || Request::tool_call(1, "search", json!({"q": "tower"}));
//! svc.clone().oneshot(search()).await?;
//! svc.clone().oneshot(search()).await?;
//! let err = svc.clone().oneshot(search()).await.unwrap_err();
//! let limited = err.downcast_ref::<RateLimited>().unwrap();
//! assert_eq!(limited.key(), "search");
//! assert_eq!(limited.to_string(), "rate limited on search; retry after 500 ms");
//!
//! tokio::time::advance(Duration::from_millis(500)).await;
//! svc.clone().oneshot(search()).await?; // refilled
//! # Ok(()) }
//! ```
//!
//! Feature `serde` (off by default): `RateLimitSettings` and
//! `RateLimitToolSettings`, the builder's knobs as serde types for
//! configuration files, applied with the builder's `settings` and
//! `tool_settings`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod backend;
mod builder;
mod clock;
mod future;
mod layer;
mod limits;
mod quota;
mod service;
#[cfg(feature = "serde")]
mod settings;

pub use backend::{Acquire, BackendDecision, BackendFuture, RateLimitBackend, Scope};
pub use builder::{Mode, RateLimitBuilder, DEFAULT_PER_TOOL_BURST, DEFAULT_PER_TOOL_RATE};
pub use clock::{TokioClock, TokioInstant};
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use limits::RateLimits;
pub use quota::{Quota, Rate};
pub use service::RateLimit;
#[cfg(feature = "serde")]
pub use settings::{QuotaSettings, RateLimitSettings, RateLimitToolSettings, DEFAULT_MAX_WAIT};
pub use toolwarden_core::RateLimited;
