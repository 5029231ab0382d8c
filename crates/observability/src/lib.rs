//! Middleware that records every MCP call as metrics, a tracing span and
//! in-process statistics, plus a health registry.
//!
//! [`ObservabilityLayer`] sits outermost in a toolwarden stack, so it sees
//! every call, including those refused by the layers below. It never
//! refuses or changes a call. Each result is judged by the stack's
//! classifier ([`McpClassifier`] by default) and recorded as:
//!
//! - **metrics** through the [`metrics`] facade, following the OpenTelemetry
//!   MCP conventions: the histogram `mcp.client.operation.duration` (seconds)
//!   with `mcp.method.name`, `gen_ai.tool.name` and `error.type`, and the
//!   counter `toolwarden.calls` by `outcome` (names and labels in
//!   [`instruments`]). The layer's [event sink](ObservabilityLayer::event_sink)
//!   turns the other layers' resilience events into `toolwarden.events` and
//!   the gauge `toolwarden.circuit.state` ([`events`]);
//! - **a span** `mcp.call` per call with the method, tool, attempt, argument
//!   fingerprint, outcome, failure class, error type and duration;
//! - **statistics** per tool, readable as a JSON [`StatsSnapshot`] ([`stats`]).
//!
//! [`health`] adds checks with priorities and timeouts, a check fed by the
//! circuit breakers, and a periodic monitor; feature `http` adds a small
//! endpoint serving `/metrics`, `/health` and `/stats`.
//!
//! # Cardinality and privacy
//!
//! Label values come from requests, so they are capped: the first
//! `max_tools` distinct tool names (default 100) and `max_methods` methods
//! (default 32) are labelled by name, later ones `other`. Arguments never
//! appear in labels, spans or logs; the span carries their fingerprint only.
//!
//! # Clock
//!
//! Durations are read from the CPU's time-stamp counter through quanta by
//! default, which costs a third of the monotonic clock's price on a virtual
//! machine; a test that pauses tokio's clock and checks durations sets
//! [`ClockSource::Tokio`] ([`clock`] explains the choice).
//!
//! # Recorders
//!
//! Metric handles are resolved on first use and re-resolved whenever the
//! current recorder changes, so the layer may be built before the recorder
//! is installed ([`instruments`] explains how).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! use serde_json::json;
//! use tower::{ServiceBuilder, ServiceExt};
//! use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}};
//! use toolwarden_observability::ObservabilityLayer;
//!
//! let recorder = PrometheusBuilder::new().build_recorder();
//! let prometheus = recorder.handle();
//! let _guard = metrics::set_default_local_recorder(&recorder);
//!
//! let observability = ObservabilityLayer::new();
//! let stats = observability.stats();
//! let upstream = MockMcp::new().script("search", [Step::rpc_error(-32603, "internal error")]);
//! let svc = ServiceBuilder::new().layer(observability).service(upstream);
//!
//! for id in 0..3 {
//!     let call = Request::tool_call(id, "search", json!({"q": "tower"}));
//!     svc.clone().oneshot(call).await.unwrap();
//! }
//!
//! let text = prometheus.render();
//! assert!(text.contains(
//!     r#"toolwarden_calls{mcp_method_name="tools/call",gen_ai_tool_name="search",outcome="success"} 2"#
//! ));
//! assert!(text.contains(r#"error_type="protocol_error""#));
//! assert_eq!(stats.snapshot().tool("search").unwrap().errors, 1);
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod clock;
pub mod events;
mod future;
pub mod health;
#[cfg(feature = "http")]
pub mod http;
pub mod instruments;
mod layer;
mod registry;
mod service;
pub mod stats;

pub use clock::ClockSource;
pub use events::ObservabilityEvents;
pub use future::ResponseFuture;
pub use instruments::describe_metrics;
pub use layer::{
    ObservabilityBuilder, ObservabilityLayer, MAX_METHODS_LIMIT, MAX_TOOLS_LIMIT,
    RECENT_WINDOW_LIMIT,
};
pub use service::Observability;
pub use stats::{CallStats, OutcomeCounts, Stats, StatsSnapshot};
pub use toolwarden_core::CircuitState;

#[doc(no_inline)]
pub use toolwarden_core::McpClassifier;
