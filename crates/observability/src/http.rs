//! The metrics HTTP server (feature `http`): [`Endpoints`], the routes
//! `/metrics`, `/health` and `/stats` as an axum `Router`, and
//! [`MetricsServer`], which serves a router over hyper within bounds.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::RawQuery;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use toolwarden_core::ConfigError;

use crate::health::HealthRegistry;
use crate::health_history::HealthHistory;
use crate::stats::Stats;

type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics HTTP server serves: the routes of [`router`](Self::router).
///
/// | path | answer |
/// |---|---|
/// | `GET /metrics` | the text your render function returns (e.g. `PrometheusHandle::render`), `text/plain; version=0.0.4` |
/// | `GET /health` | the [`HealthReport`](crate::HealthReport) as JSON; status 200 when healthy or degraded, 503 when unhealthy; with `?history=1`, also `"history"`: the last results of each check ([`HealthHistory`](crate::HealthHistory)) |
/// | `GET /stats` | the [`StatsSnapshot`](crate::StatsSnapshot) as JSON |
///
/// `HEAD` is answered like `GET` without a body; other methods get 405
/// (`Allow: GET, HEAD`). A path that is not configured is not routed: it
/// gets 404, as does any unknown path. Every answer carries
/// `Cache-Control: no-store`.
///
/// The router is an axum [`Router`](axum::Router) on purpose, so that a
/// server can add routes of its own to it (the `toolwarden` proxy adds
/// `/health` with its upstream's state and `/circuits`); build those with
/// the same axum version, re-exported as
/// [`toolwarden_observability::axum`](crate::axum). Serve it with
/// [`MetricsServer`], or with [`serve`] for the defaults.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use toolwarden_observability::{serve, Endpoints, ObservabilityLayer};
///
/// let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
/// let layer = ObservabilityLayer::new();
/// let endpoints = Endpoints::new()
///     .metrics(move || handle.render())
///     .stats(layer.stats());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
/// serve(listener, endpoints, std::future::pending()).await
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Endpoints {
    metrics: Option<Render>,
    health: Option<HealthRegistry>,
    stats: Option<Stats>,
}

impl Endpoints {
    /// Serves nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `GET /metrics` with the text `render` returns.
    #[must_use]
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Serves `GET /health`: runs the registry's checks on each request.
    #[must_use]
    pub fn health(mut self, registry: HealthRegistry) -> Self {
        self.health = Some(registry);
        self
    }

    /// Serves `GET /stats`: a statistics snapshot.
    #[must_use]
    pub fn stats(mut self, stats: Stats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The routes configured so far, to serve ([`MetricsServer::serve`]) or
    /// to extend with routes of your own (`Router::route`, `Router::merge`;
    /// a path served here cannot be routed again).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower::ServiceExt;
    /// use toolwarden_observability::axum::{body::Body, http::Request, routing::get};
    /// use toolwarden_observability::Endpoints;
    ///
    /// let router = Endpoints::new()
    ///     .metrics(|| "toolwarden_calls_total 3\n".to_owned())
    ///     .router()
    ///     .route("/version", get(|| async { "1.0" }));
    /// let answer = router
    ///     .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
    ///     .await
    ///     .unwrap();
    /// assert_eq!(answer.status(), 200);
    /// # }
    /// ```
    pub fn router(self) -> Router {
        let mut router = Router::new();
        if let Some(render) = self.metrics {
            router = router.route(
                "/metrics",
                read_only(get(move || {
                    let body = render();
                    async move { answer(StatusCode::OK, PROMETHEUS_TEXT, body) }
                })),
            );
        }
        if let Some(registry) = self.health {
            router = router.route(
                "/health",
                read_only(get(move |RawQuery(query): RawQuery| {
                    let registry = registry.clone();
                    async move {
                        let report = registry.report().await;
                        if HealthHistory::is_requested(query.as_deref()) {
                            let mut body = report.to_json();
                            if let serde_json::Value::Object(map) = &mut body {
                                map.insert("history".to_owned(), registry.history().to_json());
                            }
                            return json(report.status.http_status(), &body);
                        }
                        json(report.status.http_status(), &report)
                    }
                })),
            );
        }
        if let Some(stats) = self.stats {
            router = router.route(
                "/stats",
                read_only(get(move || {
                    let snapshot = stats.snapshot();
                    async move { json(200, &snapshot) }
                })),
            );
        }
        router
    }
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoints")
            .field("metrics", &self.metrics.is_some())
            .field("health", &self.health)
            .field("stats", &self.stats.is_some())
            .finish()
    }
}

/// `route`, answering methods other than `GET` and `HEAD` with 405 and
/// `Allow: GET, HEAD` (axum's own 405 has no body and lists `GET,HEAD`).
fn read_only(route: MethodRouter) -> MethodRouter {
    route.fallback(|| async {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are supported",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        response
    })
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn text(status: StatusCode, body: &str) -> Response {
    answer(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

/// Serialised in declaration order (`status` first in a health report).
fn json(status: u16, value: &impl serde::Serialize) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match serde_json::to_string(value) {
        Ok(body) => answer(status, "application/json", body),
        // Plain data with string keys: unreachable, but never panic.
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("could not serialise: {error}"),
        ),
    }
}

/// The most bytes of a request's head (request line and headers); past it,
/// 431.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// How long an accept error (typically: out of file descriptors) backs off.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves an axum `Router` (the [`Endpoints`]' routes, perhaps extended)
/// over HTTP/1.1 on a listener you bind, with bounds fit for an address
/// that scrapers and operators reach: HTTP by hyper, routing by axum.
///
/// - One request per connection (`Connection: close`).
/// - A request's head (request line and headers) is at most 8 KiB, else
///   431; a malformed one gets 400. Neither panics the server.
/// - The head must arrive within
///   [`header_read_timeout`](MetricsServerBuilder::header_read_timeout)
///   (default 10 s; hyper's timer, so a client sending it a byte at a time
///   is cut off too), and the whole connection is dropped after
///   [`connection_timeout`](MetricsServerBuilder::connection_timeout)
///   (default 30 s), whatever it is doing (a client that does not read its
///   answer cannot hold it).
/// - At most [`max_connections`](MetricsServerBuilder::max_connections)
///   connections at once (default 64); further ones wait in the listener's
///   backlog until one closes.
/// - `TCP_NODELAY` on every connection. An accept error (typically: out of
///   file descriptors) is logged and retried after 100 ms.
/// - When the shutdown future completes, the listener is closed, each
///   connection finishes the answer it is writing, and those still open
///   after [`shutdown_timeout`](MetricsServerBuilder::shutdown_timeout)
///   (default 0: at once) are dropped.
///
/// Meant for a loopback or otherwise trusted address, like Prometheus
/// exporters: the answers name tools and checks, and there is no
/// authentication of its own (add it to the router as a layer).
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use std::time::Duration;
/// use toolwarden_observability::{Endpoints, MetricsServer, ObservabilityLayer};
///
/// let layer = ObservabilityLayer::new();
/// let router = Endpoints::new().stats(layer.stats()).router();
/// let server = MetricsServer::builder()
///     .header_read_timeout(Duration::from_secs(2))
///     .max_connections(8)
///     .build()
///     .unwrap();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
/// server.serve(listener, router, std::future::pending()).await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MetricsServer {
    limits: Limits,
}

/// The validated bounds of a [`MetricsServer`].
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_read_timeout: Duration,
    connection_timeout: Duration,
    max_connections: usize,
    shutdown_timeout: Duration,
}

impl Default for Limits {
    /// The defaults written on [`MetricsServerBuilder`]'s knobs.
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(30),
            max_connections: 64,
            shutdown_timeout: Duration::ZERO,
        }
    }
}

impl MetricsServer {
    /// A server with every default, the same as `builder().build()` (see
    /// [`MetricsServerBuilder`] for each default).
    #[must_use]
    pub fn new() -> Self {
        // The defaults are valid (`build` accepts them: tested).
        MetricsServer {
            limits: Limits::default(),
        }
    }

    /// A builder with every default.
    #[must_use]
    pub fn builder() -> MetricsServerBuilder {
        MetricsServerBuilder::new()
    }

    /// Serves `router` on `listener` until `shutdown` completes (see the
    /// [type docs](Self) for the bounds), then returns `Ok(())` once the
    /// connections are closed. Errors accepting one connection are logged
    /// and skipped.
    pub async fn serve(
        self,
        listener: TcpListener,
        router: Router,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let limits = self.limits;
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let (closing, _) = watch::channel(false);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .keep_alive(false)
            .title_case_headers(true);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            let slot = tokio::select! {
                () = &mut shutdown => break,
                slot = Arc::clone(&slots).acquire_owned() => slot.map_err(io::Error::other)?,
            };
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "metrics server: accept failed");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        }
                    }
                },
            };
            // Small writes must not wait for a delayed ACK (Nagle).
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "metrics server: could not set TCP_NODELAY");
            }
            let connection = http.serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            );
            let mut closing = closing.subscribe();
            connections.spawn(async move {
                let _slot = slot;
                tokio::pin!(connection);
                let served = tokio::time::timeout(limits.connection_timeout, async {
                    tokio::select! {
                        served = connection.as_mut() => served,
                        () = async { drop(closing.wait_for(|closing| *closing).await) } => {
                            // Finish the answer in flight, take no other.
                            connection.as_mut().graceful_shutdown();
                            connection.as_mut().await
                        }
                    }
                })
                .await;
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "metrics server: connection ended with an error");
                    }
                    // Dropping the connection closes it.
                    Err(_) => tracing::debug!("metrics server: connection timed out"),
                }
            });
        }
        drop(listener);
        closing.send_replace(true);
        let drained = tokio::time::timeout(limits.shutdown_timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.shutdown().await;
        }
        Ok(())
    }
}

impl Default for MetricsServer {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`MetricsServer`]; every knob has a documented default, and
/// [`build`](Self::build) refuses a bad value naming its field.
///
/// ```
/// use std::time::Duration;
/// use toolwarden_observability::MetricsServer;
///
/// let server = MetricsServer::builder()
///     .header_read_timeout(Duration::from_secs(5))
///     .connection_timeout(Duration::from_secs(20))
///     .max_connections(16)
///     .shutdown_timeout(Duration::from_secs(2))
///     .build()
///     .unwrap();
/// # let _ = server;
/// let err = MetricsServer::builder().max_connections(0).build().unwrap_err();
/// assert_eq!(err.field(), "max_connections");
/// ```
#[derive(Debug, Clone, Default)]
pub struct MetricsServerBuilder {
    limits: Limits,
}

impl MetricsServerBuilder {
    /// A builder with every default (the same as [`MetricsServer::builder`]).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a client may take to send a request's head (request line
    /// and headers), counted from the connection's start; then the
    /// connection is closed. Default 10 s; must be positive.
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.limits.header_read_timeout = timeout;
        self
    }

    /// How long a connection may be served at all: reading the request,
    /// making the answer (a `/health` runs its checks, each under its own
    /// timeout) and writing it. Past it the connection is dropped, whatever
    /// it is doing. Default 30 s; must be positive.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.limits.connection_timeout = timeout;
        self
    }

    /// How many connections are served at once; the next one is accepted
    /// when one closes (until then it waits in the listener's backlog).
    /// Default 64; at least 1.
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.limits.max_connections = connections;
        self
    }

    /// How long, once shutdown is asked for, the connections still open may
    /// take to finish their answers before they are dropped. Default 0: they
    /// are dropped at once.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.limits.shutdown_timeout = timeout;
        self
    }

    /// Validates the bounds, naming the bad field.
    pub fn build(self) -> Result<MetricsServer, ConfigError> {
        let l = &self.limits;
        if l.header_read_timeout.is_zero() {
            return Err(ConfigError::new("header_read_timeout", "must be positive"));
        }
        if l.connection_timeout.is_zero() {
            return Err(ConfigError::new("connection_timeout", "must be positive"));
        }
        if l.max_connections == 0 {
            return Err(ConfigError::new("max_connections", "must be at least 1"));
        }
        if l.max_connections > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "max_connections",
                format!(
                    "must be at most {} (got {})",
                    Semaphore::MAX_PERMITS,
                    l.max_connections
                ),
            ));
        }
        Ok(MetricsServer {
            limits: self.limits,
        })
    }
}

/// Serves `endpoints` on `listener` with every default of [`MetricsServer`]
/// until `shutdown` completes; the same as
/// `MetricsServer::new().serve(listener, endpoints.router(), shutdown)`.
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    MetricsServer::new()
        .serve(listener, endpoints.router(), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_bounds_are_named() {
        // `MetricsServer::new` skips validation because of this.
        assert!(MetricsServer::builder().build().is_ok());
        type Edit = fn(MetricsServerBuilder) -> MetricsServerBuilder;
        let cases: [(Edit, &str); 4] = [
            (
                |b| b.header_read_timeout(Duration::ZERO),
                "header_read_timeout",
            ),
            (
                |b| b.connection_timeout(Duration::ZERO),
                "connection_timeout",
            ),
            (|b| b.max_connections(0), "max_connections"),
            (|b| b.max_connections(usize::MAX), "max_connections"),
        ];
        for (edit, field) in cases {
            let err = edit(MetricsServer::builder()).build().unwrap_err();
            assert_eq!(err.field(), field);
        }
    }
}
