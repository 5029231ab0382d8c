//! Resilience layers for MCP (Model Context Protocol) tool calls.
//!
//! AI agents call tools on MCP servers. Those servers fail, rate-limit, hang
//! and return errors inside successful responses; agents retry blindly, loop
//! on the same failing call and pile load onto a server that is already
//! down. toolwarden fixes this where the calls flow, as `tower::Layer`s that
//! stack onto any `tower::Service` carrying MCP requests.
//!
//! This umbrella crate re-exports every layer behind a feature of its name
//! (`circuit-breaker`, `rate-limit`, `retry`, `loop-guard`, `fallback-cache`,
//! `observability`, plus `rmcp` and `redis`), `stack` for all six layers and
//! the [standard stack](stack), `full` for everything. Default features are
//! empty: the core call model and [`RenderErrorsLayer`] only.
//!
//! - [`ServiceBuilderExt`]: one `ServiceBuilder` method per layer.
//! - [`stack::StandardStack`] (feature `stack`): every layer in the standard
//!   order, from one validated configuration with cross-field checks.
//! - [`RenderErrorsLayer`]: failed tool calls become `isError` results a
//!   model can act on.

#![forbid(unsafe_code)]

mod builder_ext;
mod render;
#[cfg(feature = "stack")]
pub mod stack;

pub use builder_ext::ServiceBuilderExt;
pub use render::{RenderErrors, RenderErrorsLayer, RenderFuture};
/// The MCP call model every layer shares.
pub use toolwarden_core as core;

/// Circuit breakers per tool (feature `circuit-breaker`).
#[cfg(feature = "circuit-breaker")]
pub use toolwarden_circuit_breaker as circuit_breaker;
/// Rejections and renderings shared by every layer.
pub use toolwarden_core::{rejection, FailureReport};
/// Stale-if-error caching and degraded answers (feature `fallback-cache`).
#[cfg(feature = "fallback-cache")]
pub use toolwarden_fallback_cache as fallback_cache;
/// Loop guarding (feature `loop-guard`).
#[cfg(feature = "loop-guard")]
pub use toolwarden_loop_guard as loop_guard;
/// Metrics, tracing, statistics and health (feature `observability`).
#[cfg(feature = "observability")]
pub use toolwarden_observability as observability;
/// GCRA rate limits (feature `rate-limit`).
#[cfg(feature = "rate-limit")]
pub use toolwarden_rate_limit as rate_limit;
/// Shared state through Redis (feature `redis`).
#[cfg(feature = "redis")]
pub use toolwarden_redis as redis;
/// Retry with backoff and budgets (feature `retry`).
#[cfg(feature = "retry")]
pub use toolwarden_retry as retry;
/// rmcp adapters (feature `rmcp`).
#[cfg(feature = "rmcp")]
pub use toolwarden_rmcp as rmcp;
