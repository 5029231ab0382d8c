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
//!   counter `toolwarden.calls` by `outcome` (see [Metrics](#metrics)). The
//!   layer's [event sink](ObservabilityLayer::event_sink) turns the other
//!   layers' resilience events into `toolwarden.events` and the gauge
//!   `toolwarden.circuit.state` ([`ObservabilityEvents`]);
//! - **a span** `mcp.call` per call with the method, tool, attempt, argument
//!   fingerprint, outcome, failure class, error type and duration, named and
//!   attributed for OpenTelemetry, with the other layers' decisions as its
//!   events (see [OpenTelemetry](#opentelemetry));
//! - **statistics** per tool, readable as a JSON [`StatsSnapshot`] ([`Stats`]).
//!
//! [`HealthRegistry`] adds checks with priorities and timeouts,
//! [`circuit_check`] a check fed by the circuit breakers, and
//! [`HealthMonitor`] a periodic monitor; [`HealthHistory`] keeps the last
//! results of each check with their times. Feature `http` adds the metrics HTTP
//! server (see [HTTP](#http)).
//!
//! # Metrics
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `mcp.client.operation.duration` ([`METRIC_OPERATION_DURATION`]) | histogram, seconds | `mcp.method.name`, `gen_ai.tool.name` (tool calls only), `error.type` (failures only) |
//! | `toolwarden.calls` ([`METRIC_CALLS`]) | counter | `mcp.method.name`, `gen_ai.tool.name` (tool calls only), `outcome` |
//! | `toolwarden.events` ([`METRIC_EVENTS`]) | counter | `event`, `key` (events about a key or tool) |
//! | `toolwarden.circuit.state` ([`METRIC_CIRCUIT_STATE`]) | gauge: 0 closed, 1 half-open, 2 open | `key` |
//! | `toolwarden.calls.active` ([`METRIC_CALLS_ACTIVE`]) | gauge: calls started and not yet ended (completed or dropped) | `mcp.method.name`, `gen_ai.tool.name` (tool calls only) |
//!
//! The label names are the `LABEL_*` constants ([`LABEL_METHOD`],
//! [`LABEL_TOOL`], [`LABEL_ERROR_TYPE`], [`LABEL_OUTCOME`], [`LABEL_EVENT`],
//! [`LABEL_KEY`]). `outcome` is one of `success`, `tool_error`,
//! `protocol_error`, `transport`, `timeout`, `rejected`
//! ([`OutcomeKind::as_str`]), or `cancelled` ([`CANCELLED_OUTCOME`]) when
//! the caller dropped the call before it finished. `error.type` follows
//! OpenTelemetry: it is absent on success and otherwise the outcome
//! (`tool_error`, `protocol_error`, ...). Cancelled calls are counted but
//! not timed: the operation never ended. `event` is the name of a
//! resilience event ([`Event::name`]): `circuit_opened`,
//! `circuit_half_opened`, `circuit_closed`, `rate_limited`, `retried`,
//! `retry_budget_exhausted`, `loop_warned`, `loop_detected`,
//! `stale_served`, `degraded`, `bulkhead_full`, `bulkhead_limit_changed`,
//! `coalesced`, `hedged`, `sync_failed`.
//!
//! Prometheus renders the dots as underscores (`mcp_client_operation_duration`,
//! `toolwarden_calls`, `toolwarden_calls_active`, `gen_ai_tool_name`, ...).
//! The in-flight gauge has no OpenTelemetry MCP convention yet: in OTel
//! terms it is an UpDownCounter `toolwarden.calls.active` of unit `{call}`
//! (the shape of `http.server.active_requests`), which an OTLP exporter
//! should map it to; its count is also the snapshot's
//! [`CallStats::active`]. [`describe_metrics`] gives
//! the recorder their units and help texts.
//!
//! # Cardinality and privacy
//!
//! Label values come from requests, so they are capped: the first
//! `max_tools` distinct tool names (default 100) and `max_methods` methods
//! (default 32) are labelled by name, later ones `other`
//! ([`OTHER_LABEL_VALUE`]). Arguments never
//! appear in labels, spans or logs; the span carries their fingerprint only.
//!
//! # Clock
//!
//! Durations are read from the CPU's time-stamp counter through quanta by
//! default, which costs a third of the monotonic clock's price on a virtual
//! machine; a test that pauses tokio's clock and checks durations sets
//! [`ClockSource::Tokio`] ([`ClockSource`] explains the choice).
//!
//! # Recorders
//!
//! Metric handles are resolved on first use and re-resolved whenever the
//! current recorder changes, so the layer may be built before the recorder
//! is installed. The `metrics` macros build a key and ask the recorder to
//! register it on every use; the layer instead resolves each (series,
//! outcome) handle once per recorder and keeps it with the identity
//! (address) of the recorder it came from. Every record looks up the handle
//! of the current recorder ([`metrics::with_recorder`]), so a layer used
//! before a recorder was installed (or under
//! [`metrics::with_local_recorder`]) still reports to the right recorder.
//! Two recorders are remembered per series; beyond that (only tests switch
//! recorders that often), handles are registered on every call. Two
//! recorders that share an address (zero-sized recorders, or a local
//! recorder dropped and another created in the same place) cannot be told
//! apart; use recorders that live as long as the layer.
//!
//! # HTTP
//!
//! Feature `http` adds the metrics HTTP server, the one the `toolwarden`
//! proxy serves its metrics address with: [`Endpoints`] makes the routes
//! `/metrics` (your Prometheus renderer), `/health` (a [`HealthRegistry`]'s
//! report) and `/stats` (the [`StatsSnapshot`]) as an axum `Router`, which
//! you may extend with routes of your own; [`MetricsServer`] serves a router
//! over hyper (HTTP/1.1) within bounds: one request per connection, request
//! heads of at most 8 KiB, a header read timeout, a time limit per
//! connection, a connection cap and a shutdown deadline; [`serve`] does both
//! with every default. The `examples/metrics_server.rs` of the repository
//! serves a flaky tool's metrics this way.
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
//!
//! # OpenTelemetry
//!
//! The call span follows the OpenTelemetry MCP semantic conventions, so
//! `tracing-opentelemetry` turns it into an OpenTelemetry span as it is:
//!
//! | tracing field | OpenTelemetry |
//! |---|---|
//! | `otel.name` | the span name, `{mcp.method.name} {gen_ai.tool.name}` (`tools/call search`), or the method alone |
//! | `otel.kind` | `client` (the layer wraps calls to the server) |
//! | `otel.status_code` | `ERROR` on a failure |
//! | `mcp.method.name`, `gen_ai.tool.name`, `gen_ai.operation.name` (`execute_tool`), `jsonrpc.request.id`, `error.type` | attributes of those names |
//! | `attempt`, `outcome`, `failure.class`, `duration_ms`, `toolwarden.fingerprint` | toolwarden's own attributes |
//! | `toolwarden.rejected_by` | the layer that refused the call (`circuit_breaker`, `rate_limit`, `loop_guard`, `retry`), when its refusal reaches the layer as an error |
//!
//! Each decision of the other layers during the call (a retry, the circuit
//! opening, a rate limit, a loop blocked, a stale result served, ...)
//! becomes a **span event** `toolwarden.{event}` of the call's span, with
//! the attributes listed in [`ObservabilityEvents`], as long as the
//! layer's [event sink](ObservabilityLayer::event_sink) is in the
//! [`Events`](toolwarden_core::Events) the other layers were given. No
//! argument or result enters a span or an event. The metrics go through
//! the `metrics` facade as usual: any recorder you install (the
//! `toolwarden` proxy bridges them to an OpenTelemetry meter) sees them.
//!
//! A library user wires it like any `tracing` layer. This example keeps
//! the spans in the SDK's in-memory exporter to show what comes out; for a
//! collector, build the provider with `opentelemetry-otlp`'s exporter
//! instead:
//! `SdkTracerProvider::builder().with_batch_exporter(opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint("http://localhost:4317").build()?)`.
//! Enable `toolwarden_observability` at `DEBUG` in that layer's filter so
//! the decision events are kept.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use opentelemetry::trace::TracerProvider as _;
//! use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
//! use serde_json::json;
//! use tower::{Layer, Service, ServiceExt};
//! use toolwarden_core::{jsonrpc::Request, testing::MockMcp, Event};
//! use toolwarden_observability::ObservabilityLayer;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! let exporter = InMemorySpanExporter::default();
//! let provider = SdkTracerProvider::builder()
//!     .with_simple_exporter(exporter.clone())
//!     .build();
//! let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("my-agent"));
//! let subscriber = tracing_subscriber::registry().with(otel);
//! let _guard = tracing::subscriber::set_default(subscriber);
//!
//! let observability = ObservabilityLayer::new();
//! // Give `observability.events()` to the other layers; here one decision
//! // is emitted by hand, as a layer below would while the call runs.
//! let events = observability.events();
//! let upstream = tower::service_fn(move |request: Request| {
//!     events.emit(&Event::RateLimited { key: "search", retry_after: Duration::from_secs(1) });
//!     MockMcp::new().oneshot(request)
//! });
//! let mut svc = observability.layer(upstream);
//! let call = Request::tool_call(1, "search", json!({"q": "a secret"}));
//! svc.ready().await.unwrap().call(call).await.unwrap();
//!
//! provider.force_flush().unwrap();
//! let spans = exporter.get_finished_spans().unwrap();
//! assert_eq!(spans[0].name, "tools/call search");
//! let attribute = |key: &str| {
//!     spans[0].attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
//! };
//! assert_eq!(attribute("mcp.method.name").as_deref(), Some("tools/call"));
//! assert_eq!(attribute("gen_ai.tool.name").as_deref(), Some("search"));
//! assert_eq!(spans[0].events[0].name, "toolwarden.rate_limited");
//! assert!(!format!("{spans:?}").contains("a secret"));
//! # }
//! ```
//!
//! Feature `serde` (off by default): `ObservabilitySettings`, the builder's
//! knobs as a serde type for configuration files, applied with the builder's
//! `settings`.
//!
//! [`OutcomeKind::as_str`]: toolwarden_core::OutcomeKind::as_str
//! [`Event::name`]: toolwarden_core::Event::name
#![cfg_attr(
    not(feature = "http"),
    doc = "[`Endpoints`]: #http \"feature `http`\"\n[`MetricsServer`]: #http \"feature `http`\"\n[`serve`]: #http \"feature `http`\""
)]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod active;
mod builder;
mod clock;
mod events;
mod future;
mod health;
mod health_history;
#[cfg(feature = "http")]
mod http;
mod instruments;
mod layer;
mod registry;
mod service;
#[cfg(feature = "serde")]
mod settings;
mod stats;

pub use active::METRIC_CALLS_ACTIVE;
/// The axum the metrics routes are built with ([`Endpoints::router`],
/// [`MetricsServer::serve`]), re-exported on purpose: routes you add to them
/// must come from this version.
#[cfg(feature = "http")]
pub use axum;
pub use builder::{ObservabilityBuilder, MAX_METHODS_LIMIT, MAX_TOOLS_LIMIT, RECENT_WINDOW_LIMIT};
pub use clock::ClockSource;
pub use events::ObservabilityEvents;
pub use future::ResponseFuture;
pub use health::{
    circuit_check, CheckReport, CheckStatus, HealthCheck, HealthMonitor, HealthRegistry,
    HealthReport, HealthStatus, LatestReport, Priority, DEFAULT_CHECK_TIMEOUT,
};
pub use health_history::{
    HealthHistory, HistoryEntry, DEFAULT_HEALTH_HISTORY, HEALTH_HISTORY_LIMIT,
    HEALTH_HISTORY_MAX_CHECKS,
};
#[cfg(feature = "http")]
pub use http::{serve, Endpoints, MetricsServer, MetricsServerBuilder};
pub use instruments::{
    describe_metrics, CANCELLED_OUTCOME, LABEL_ERROR_TYPE, LABEL_EVENT, LABEL_KEY, LABEL_METHOD,
    LABEL_OUTCOME, LABEL_TOOL, METRIC_CALLS, METRIC_CIRCUIT_STATE, METRIC_EVENTS,
    METRIC_OPERATION_DURATION, OTHER_LABEL_VALUE,
};
pub use layer::ObservabilityLayer;
pub use service::Observability;
#[cfg(feature = "serde")]
pub use settings::{ObservabilitySettings, OtlpProtocol};
pub use stats::{CallStats, OutcomeCounts, Stats, StatsSnapshot};
pub use toolwarden_core::CircuitState;

#[doc(no_inline)]
pub use toolwarden_core::McpClassifier;
