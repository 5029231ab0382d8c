//! The metrics address: `/metrics` (Prometheus text), `/health` (JSON),
//! `/circuits` (the circuit breakers' snapshot, JSON) and `/stats` (the
//! observability layer's per-tool statistics, JSON: what `toolwarden top`
//! shows).
//!
//! It is the observability crate's metrics HTTP server
//! ([`toolwarden_observability::MetricsServer`]): its `/metrics` route
//! ([`toolwarden_observability::Endpoints`]), extended with the proxy's own
//! `/health` and `/circuits` (see [`router`] and [`serve`]).
//!
//! What each route shows comes from providers in [`MetricsEndpoints`], which
//! whoever builds the stack fills: the Prometheus renderer (the proxy
//! installs `metrics-exporter-prometheus` as the process's `metrics`
//! recorder when `--metrics-addr` is given, so every layer's `metrics`
//! counters appear), a health report, a circuits snapshot.
//!
//! `/health?history=1` adds `"history"`: the last 20 results of each
//! check (`http.health_history`) of the stack's health registry, with their times, oldest first
//! ([`MetricsEndpoints::health_history`]).
//!
//! `/health` always includes the proxy's own view of the upstream under
//! `"upstream"` (`state`, `pid`, `restarts`, `target`, ...). Its status is
//! `200` unless the upstream is connecting, down or stopped, or the health
//! provider reports `"status": "unhealthy"`: then `503`. An upstream not
//! started yet (no client has connected) is not a failure. With one
//! upstream per session, `"upstream"` counts them by state, and only none
//! of them up is a failure ([`Upstreams`]).
//!
//! `"runtime"` says how many threads serve the proxy (`worker_threads`,
//! set by `toolwarden run --worker-threads`).
//!
//! The address must be a loopback address unless `--metrics-allow-remote`
//! is given: the reports name the upstream command and its tools.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use toolwarden_observability::{Endpoints, HealthHistory, MetricsServer};

use crate::access::AuthTokens;
use crate::downstream::http::ConnectionLimits;
use crate::downstream::Upstreams;

/// A boxed future of a JSON value.
pub type JsonFuture = Pin<Box<dyn Future<Output = Value> + Send>>;
type JsonProvider = Arc<dyn Fn() -> JsonFuture + Send + Sync>;
type TextProvider = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Default)]
struct Providers {
    metrics: Option<TextProvider>,
    health: Option<JsonProvider>,
    circuits: Option<JsonProvider>,
    stats: Option<JsonProvider>,
    upstream_circuits: Option<JsonProvider>,
}

/// The providers behind the metrics routes. Clones share them; they can be
/// set at any time (the routes read them per request).
///
/// ```
/// use serde_json::json;
/// use toolwarden_proxy::endpoints::MetricsEndpoints;
/// let endpoints = MetricsEndpoints::new();
/// endpoints.set_circuits(|| async { json!({"circuits": [{"key": "search", "state": "open"}]}) });
/// endpoints.set_metrics(|| "toolwarden_calls_total 3\n".to_owned());
/// assert_eq!(endpoints.render_metrics(), "toolwarden_calls_total 3\n");
/// ```
#[derive(Clone, Default)]
pub struct MetricsEndpoints {
    providers: Arc<RwLock<Providers>>,
    history: HealthHistory,
}

impl fmt::Debug for MetricsEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self
            .providers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("MetricsEndpoints")
            .field("metrics", &p.metrics.is_some())
            .field("health", &p.health.is_some())
            .field("circuits", &p.circuits.is_some())
            .finish()
    }
}

fn boxed<F, Fut>(f: F) -> JsonProvider
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Value> + Send + 'static,
{
    Arc::new(move || Box::pin(f()) as JsonFuture)
}

impl MetricsEndpoints {
    /// No providers: `/metrics` is empty, `/health` shows the upstream only,
    /// `/circuits` is `{"circuits": []}`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The same, keeping `history` for `/health?history=1` (default: the
    /// last 20 results of each check; `http.health_history` sets it).
    #[must_use]
    pub fn with_health_history(history: HealthHistory) -> Self {
        MetricsEndpoints {
            providers: Arc::default(),
            history,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Providers> {
        self.providers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Providers> {
        self.providers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What `/metrics` serves: Prometheus text.
    pub fn set_metrics(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        self.write().metrics = Some(Arc::new(render));
    }

    /// The stack's health report, merged into `/health` (an object's keys
    /// are kept; its `status` of `"unhealthy"` makes the answer `503`).
    pub fn set_health<F, Fut>(&self, report: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Value> + Send + 'static,
    {
        self.write().health = Some(boxed(report));
    }

    /// What `/circuits` serves: the circuit breakers' snapshot.
    pub fn set_circuits<F, Fut>(&self, snapshot: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Value> + Send + 'static,
    {
        self.write().circuits = Some(boxed(snapshot));
    }

    /// What `/stats` serves: the observability layer's statistics
    /// snapshot (per tool: calls, calls in flight, outcomes, percentiles).
    pub fn set_stats<F, Fut>(&self, snapshot: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Value> + Send + 'static,
    {
        self.write().stats = Some(boxed(snapshot));
    }

    /// The statistics snapshot (`{"tools": [], "methods": []}` without a
    /// provider).
    pub async fn stats(&self) -> Value {
        let provider = self.read().stats.clone();
        match provider {
            Some(p) => p().await,
            None => json!({"tools": [], "methods": []}),
        }
    }

    /// What `/circuits` adds under `"upstreams"`: a gateway's breakers, one
    /// per upstream.
    pub fn set_upstream_circuits<F, Fut>(&self, snapshot: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Value> + Send + 'static,
    {
        self.write().upstream_circuits = Some(boxed(snapshot));
    }

    /// The history of the stack's health checks, served by
    /// `/health?history=1`: the last 20 results of each check by default
    /// ([`HealthHistory`]; [`with_health_history`](Self::with_health_history)),
    /// kept across configuration reloads (each reload's health registry
    /// records into this one).
    #[must_use]
    pub fn health_history(&self) -> &HealthHistory {
        &self.history
    }

    /// The Prometheus text (empty without a renderer).
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let render = self.read().metrics.clone();
        render.map(|r| r()).unwrap_or_default()
    }

    /// The health provider's report, if one is set.
    pub async fn health_report(&self) -> Option<Value> {
        let provider = self.read().health.clone();
        match provider {
            Some(p) => Some(p().await),
            None => None,
        }
    }

    /// The circuits snapshot (`{"circuits": []}` without a provider), with
    /// a gateway's upstreams under `"upstreams"`.
    pub async fn circuits(&self) -> Value {
        let (provider, upstreams) = {
            let providers = self.read();
            (
                providers.circuits.clone(),
                providers.upstream_circuits.clone(),
            )
        };
        let mut snapshot = match provider {
            Some(p) => p().await,
            None => json!({"circuits": []}),
        };
        if let (Some(upstreams), Value::Object(map)) = (upstreams, &mut snapshot) {
            map.insert("upstreams".to_owned(), upstreams().await);
        }
        snapshot
    }

    /// The `/health` answer: the status code and the report.
    pub async fn health(&self, upstream: &Upstreams) -> (StatusCode, Value) {
        let mut report = match self.health_report().await {
            Some(Value::Object(map)) => map,
            Some(other) => Map::from_iter([("stack".to_owned(), other)]),
            None => Map::new(),
        };
        let stack_unhealthy = report.get("status").and_then(Value::as_str) == Some("unhealthy");
        let upstream_failing = upstream.failing();
        let healthy = !(stack_unhealthy || upstream_failing);
        if !healthy {
            report.insert("status".into(), json!("unhealthy"));
        } else if !report.contains_key("status") {
            report.insert("status".into(), json!("healthy"));
        }
        report.insert("upstream".into(), upstream.health_json());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            report.insert(
                "runtime".into(),
                json!({"worker_threads": runtime.metrics().num_workers()}),
            );
        }
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, Value::Object(report))
    }
}

#[derive(Clone)]
struct RouteState {
    endpoints: MetricsEndpoints,
    upstream: Upstreams,
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health_route(
    State(state): State<RouteState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let (code, mut report) = state.endpoints.health(&state.upstream).await;
    if HealthHistory::is_requested(query.as_deref()) {
        if let Value::Object(map) = &mut report {
            map.insert("history".into(), state.endpoints.history.to_json());
        }
    }
    json_response(code, &report)
}

async fn circuits_route(State(state): State<RouteState>) -> Response {
    json_response(StatusCode::OK, &state.endpoints.circuits().await)
}

async fn stats_route(State(state): State<RouteState>) -> Response {
    json_response(StatusCode::OK, &state.endpoints.stats().await)
}

/// The router of the four routes: observability's `/metrics`
/// ([`Endpoints::router`], rendering [`MetricsEndpoints::render_metrics`]
/// per request), extended with the proxy's `/health`, `/circuits` and
/// `/stats`.
pub fn router(endpoints: MetricsEndpoints, upstream: impl Into<Upstreams>) -> Router {
    let metrics = endpoints.clone();
    let proxy_routes = Router::new()
        .route("/health", get(health_route))
        .route("/circuits", get(circuits_route))
        .route("/stats", get(stats_route))
        .with_state(RouteState {
            endpoints,
            upstream: upstream.into(),
        });
    Endpoints::new()
        .metrics(move || metrics.render_metrics())
        .router()
        .merge(proxy_routes)
}

/// The buckets, in seconds, of the call-duration histogram
/// (`mcp_client_operation_duration`): 1 ms to 60 s, so that
/// `histogram_quantile` gives p50/p95/p99 per tool across replicas (the
/// Grafana dashboard in `deploy/` does).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// The Prometheus recorder the proxy installs with `--metrics-addr`: the
/// call-duration histogram with [`DURATION_BUCKETS`] (other histograms keep
/// the exporter's summaries).
#[must_use]
pub fn prometheus_builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    // The exporter matches the name as it renders it (dots as underscores).
    let name = toolwarden::observability::METRIC_OPERATION_DURATION.replace('.', "_");
    // Only an empty bucket list is refused, and this one is not empty.
    builder
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(name),
            &DURATION_BUCKETS,
        )
        .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new())
}

/// Refuses a non-loopback address unless `allow_remote`; `what` names the
/// flag in the error.
pub fn check_loopback(addr: SocketAddr, allow_remote: bool, what: &str) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "{addr} is not a loopback address; pass {what} to serve on it anyway"
        ))
    }
}

/// The most connections the metrics address serves at once (a scraper and
/// an operator or two; the next waits in the kernel's backlog).
pub const METRICS_MAX_CONNECTIONS: usize = 16;

/// Serves the routes on `listener` until `shutdown` is cancelled, with
/// observability's metrics HTTP server ([`MetricsServer`]: one request per
/// connection, `TCP_NODELAY`, request heads of at most 8 KiB, 30 s per
/// connection) and the MCP listener's bounds from `limits`: the header read
/// timeout, at most `limits.max_connections` connections, and the shutdown
/// deadline. With `tokens` (`--metrics-auth`, `http.metrics_auth`), every
/// request must carry `Authorization: Bearer <one of them>`, else `401`.
/// Limits the server refuses (a zero timeout or connection count) are an
/// `InvalidInput` error.
pub async fn serve(
    listener: TcpListener,
    endpoints: MetricsEndpoints,
    upstream: impl Into<Upstreams>,
    tokens: Option<AuthTokens>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut routes = router(endpoints, upstream);
    if let Some(tokens) = tokens {
        routes = routes.layer(axum::middleware::from_fn_with_state(tokens, require_token));
    }
    let server = MetricsServer::builder()
        .header_read_timeout(limits.header_read_timeout)
        .max_connections(limits.max_connections)
        .shutdown_timeout(limits.shutdown_timeout)
        .build()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    server
        .serve(listener, routes, shutdown.cancelled_owned())
        .await
}

/// `401` with `WWW-Authenticate: Bearer` unless the request carries one of `tokens`.
async fn require_token(
    State(tokens): State<AuthTokens>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if tokens.accepts(request.headers()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"toolwarden\"")],
        "Unauthorized: a valid bearer token is required",
    )
        .into_response()
}
