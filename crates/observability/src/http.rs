//! A minimal HTTP/1.1 endpoint (feature `http`) serving the layer's
//! metrics, health report and statistics on a listener you bind.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | the text your render function returns (e.g. `PrometheusHandle::render`), `text/plain; version=0.0.4` |
//! | `GET /health` | the [`HealthReport`](crate::health::HealthReport) as JSON; status 200 when healthy or degraded, 503 when unhealthy |
//! | `GET /stats` | the [`StatsSnapshot`](crate::StatsSnapshot) as JSON |
//!
//! `HEAD` is answered like `GET` without a body; other methods get 405,
//! unknown or unconfigured paths 404. It is built on tokio alone (no HTTP
//! framework): one request per connection (`Connection: close`), request
//! heads up to 8 KiB, 10 s to send the head and 30 s per connection, at most
//! 64 connections at once (further ones wait in the listener's backlog).
//! Bad requests get 400 or 431 and never panic the server. Meant for a
//! loopback or otherwise trusted address, like Prometheus exporters.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use toolwarden_observability::{http::{serve, Endpoints}, ObservabilityLayer};
//!
//! let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
//! let layer = ObservabilityLayer::new();
//! let endpoints = Endpoints::new()
//!     .metrics(move || handle.render())
//!     .stats(layer.stats());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! serve(listener, endpoints, std::future::pending()).await
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::health::HealthRegistry;
use crate::stats::Stats;

const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CONNECTIONS: usize = 64;

type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint serves; paths not configured answer 404.
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

/// Serves `endpoints` on `listener` until `shutdown` completes; then stops
/// accepting and aborts the connections still open. Errors accepting one
/// connection are logged and skipped; it returns `Ok(())` on shutdown.
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let endpoints = Arc::new(endpoints);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = connections.join_next() => continue,
            }
        }
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                // Small writes must not wait for a delayed ACK (Nagle).
                let _ = stream.set_nodelay(true);
                let endpoints = Arc::clone(&endpoints);
                connections.spawn(async move {
                    // A connection that stalls is dropped, closing it.
                    let _ =
                        tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &endpoints)).await;
                });
            }
            Err(error) => {
                // Typically out of file descriptors: back off briefly.
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One HTTP response.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }

    /// Serialised in declaration order (`status` first in a health report).
    fn json(status: u16, value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status,
                content_type: "application/json",
                body,
            },
            // Plain data with string keys: unreachable, but never panic.
            Err(error) => Response::text(500, &format!("could not serialise: {error}")),
        }
    }

    fn encode(&self, include_body: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        };
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\nCache-Control: no-store\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if include_body {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

enum Head {
    Request { method: String, path: String },
    Malformed,
    TooLarge,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Malformed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(parse_head(&buf[..end]));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

fn parse_head(head: &[u8]) -> Head {
    let Ok(head) = std::str::from_utf8(head) else {
        return Head::Malformed;
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_ascii_whitespace();
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None) if version.starts_with("HTTP/1.") => {
            let path = target.split(['?', '#']).next().unwrap_or("");
            Head::Request {
                method: method.to_owned(),
                path: path.to_owned(),
            }
        }
        _ => Head::Malformed,
    }
}

async fn handle(mut stream: TcpStream, endpoints: &Endpoints) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        // Timed out or the connection failed: nothing to answer.
        _ => return,
    };
    let (response, include_body) = match head {
        Head::Malformed => (Response::text(400, "bad request"), true),
        Head::TooLarge => (Response::text(431, "request head too large"), true),
        Head::Request { method, path } => match method.as_str() {
            "GET" | "HEAD" => (route(&path, endpoints).await, method == "GET"),
            _ => (Response::text(405, "only GET and HEAD are supported"), true),
        },
    };
    // The peer may have gone; there is no one left to tell.
    let _ = stream.write_all(&response.encode(include_body)).await;
    let _ = stream.shutdown().await;
}

async fn route(path: &str, endpoints: &Endpoints) -> Response {
    match path {
        "/metrics" => match &endpoints.metrics {
            Some(render) => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: render(),
            },
            None => Response::text(404, "metrics are not served here"),
        },
        "/health" => match &endpoints.health {
            Some(registry) => {
                let report = registry.report().await;
                Response::json(report.status.http_status(), &report)
            }
            None => Response::text(404, "health is not served here"),
        },
        "/stats" => match &endpoints.stats {
            Some(stats) => Response::json(200, &stats.snapshot()),
            None => Response::text(404, "stats are not served here"),
        },
        _ => Response::text(404, "not found; try /metrics, /health or /stats"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_parsed_or_refused() {
        match parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a") {
            Head::Request { method, path } => {
                assert_eq!((method.as_str(), path.as_str()), ("GET", "/metrics"))
            }
            _ => panic!("a valid request line was refused"),
        }
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET /metrics SPDY/3",
            b"GET / HTTP/1.1 extra",
            b"\xff\xfe",
        ] {
            assert!(matches!(parse_head(bad), Head::Malformed), "{bad:?}");
        }
    }
}
