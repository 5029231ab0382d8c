//! Serves the ObservabilityLayer's metrics over real HTTP: `/metrics`
//! (Prometheus text), `/health` (JSON report) and `/stats` (JSON snapshot),
//! while a flaky tool is called through the layer.
//!
//! ```text
//! cargo run --example metrics_server            # serve on 127.0.0.1:9464 for 60 s
//! cargo run --example metrics_server -- --once  # serve, scrape itself once over HTTP, print, exit
//! TOOLWARDEN_METRICS_PORT=9000 cargo run --example metrics_server -- --seconds 300
//! ```
//!
//! With `--once` and no `TOOLWARDEN_METRICS_PORT`, it binds an ephemeral port
//! so it never collides with anything in CI.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use toolwarden_core::classify::{TransportError, TransportErrorKind};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::BoxError;
use toolwarden_observability::{
    describe_metrics, serve, Endpoints, HealthCheck, HealthRegistry, ObservabilityLayer, Priority,
    Stats, METRIC_OPERATION_DURATION,
};
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the flaky server does, call after call, in a cycle.
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    RateLimited,
    Dropped,
}

const CYCLE: [Answer; 7] = [
    Answer::Ok,
    Answer::Ok,
    Answer::RateLimited,
    Answer::Ok,
    Answer::Ok,
    Answer::RateLimited,
    Answer::Dropped,
];

/// A tool server that answers in the cycle above (a rate-limit tool error
/// and a dropped connection every seven calls); calls take 5–20 ms.
fn flaky_upstream(
) -> impl Service<Request, Response = Response, Error = BoxError, Future = impl Send> + Clone {
    let count = Arc::new(AtomicU64::new(0));
    tower::service_fn(move |req: Request| {
        let n = count.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(5 + (n * 7) % 16)).await;
            let text = match CYCLE[(n % CYCLE.len() as u64) as usize] {
                Answer::Dropped => {
                    let error = TransportError::new(TransportErrorKind::Closed, "peer went away");
                    return Err(Box::new(error) as BoxError);
                }
                Answer::RateLimited => {
                    return Ok(Response::result(
                        req.id.clone(),
                        json!({"content": [{"type": "text", "text": "upstream rate limit exceeded"}], "isError": true}),
                    ));
                }
                Answer::Ok => format!("result {n}"),
            };
            Ok(Response::result(
                req.id.clone(),
                json!({"content": [{"type": "text", "text": text}]}),
            ))
        }
    })
}

/// A health check fed by the layer's own statistics: degraded while more
/// than half of the recent `search` calls fail.
fn search_failure_rate(stats: Stats) -> HealthCheck {
    HealthCheck::new("search_failure_rate", Priority::Important, move || {
        let rate = stats
            .snapshot()
            .tool("search")
            .and_then(|s| s.recent_failure_rate);
        async move {
            match rate {
                Some(rate) if rate > 0.5 => Err(format!(
                    "{:.0} % of recent search calls failed",
                    rate * 100.0
                )),
                _ => Ok(()),
            }
        }
    })
    .timeout(Duration::from_secs(1))
}

async fn drive<S>(svc: &mut S, first_id: i64, calls: i64)
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    for id in first_id..first_id + calls {
        let req = Request::tool_call(id, "search", json!({"query": "tower layers", "page": id}));
        // Failures are what this example shows; they are recorded, not fatal.
        for req in [req, Request::new(id, "tools/list", None)] {
            if let Ok(ready) = svc.ready().await {
                let _ = ready.call(req).await;
            }
        }
    }
}

/// One HTTP GET over a plain TCP connection: returns the whole response.
async fn scrape(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let once = args.iter().any(|a| a == "--once");
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse::<u64>())
        .transpose()?
        .unwrap_or(60);
    let port = match std::env::var("TOOLWARDEN_METRICS_PORT") {
        Ok(port) => port.parse::<u16>()?,
        Err(_) if once => 0,
        Err(_) => 9464,
    };

    // Install the recorder first, then build the layer (either order works).
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(METRIC_OPERATION_DURATION.to_owned()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install_recorder()?;
    describe_metrics();

    let observability = ObservabilityLayer::new();
    let stats = observability.stats();
    let mut svc = ServiceBuilder::new()
        .layer(observability)
        .service(flaky_upstream());
    drive(&mut svc, 0, 30).await;

    let health = HealthRegistry::new();
    health.register(search_failure_rate(stats.clone()))?;
    let endpoints = Endpoints::new()
        .metrics(move || prometheus.render())
        .health(health)
        .stats(stats);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, endpoints, async move {
        let _ = stopped.await;
    }));
    println!("serving http://{addr}/metrics, /health and /stats");

    if once {
        let metrics = scrape(addr, "/metrics").await?;
        let health = scrape(addr, "/health").await?;
        println!("--- GET /metrics ---\n{metrics}\n--- GET /health ---\n{health}");
    } else {
        // Keep some traffic flowing so the scrapes change.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut next_id = 30;
        while tokio::time::Instant::now() < deadline {
            drive(&mut svc, next_id, 2).await;
            next_id += 2;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
