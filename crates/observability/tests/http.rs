//! The HTTP endpoint over a real TCP connection on an ephemeral port.
#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use toolwarden_core::testing::{MockMcp, Step};
use toolwarden_observability::{
    serve, Endpoints, HealthCheck, HealthRegistry, MetricsServer, ObservabilityLayer, Priority,
};
use tower::Layer;

use support::{call, parse_prometheus, tool_call, value};

/// Sends raw bytes and reads the whole response: (status, headers, body).
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn metrics_health_and_stats_are_served_over_tcp() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = ObservabilityLayer::new();
    let mut svc = layer.layer(MockMcp::new().script("search", [Step::tool_error("boom")]));
    for id in 0..3 {
        call(&mut svc, tool_call(id, "search")).await.unwrap();
    }
    let health = HealthRegistry::new();
    health
        .register(HealthCheck::new("upstream", Priority::Critical, || async {
            Err("unreachable".to_owned())
        }))
        .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let endpoints = Endpoints::new()
        .metrics(move || prometheus.render())
        .health(health)
        .stats(layer.stats());
    let server = tokio::spawn(serve(listener, endpoints, async move {
        let _ = stopped.await;
    }));

    let (status, head, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let samples = parse_prometheus(&body);
    let labels = |outcome| {
        [
            ("mcp_method_name", "tools/call"),
            ("gen_ai_tool_name", "search"),
            ("outcome", outcome),
        ]
    };
    assert_eq!(
        value(&samples, "toolwarden_calls", &labels("success")),
        Some(2.0)
    );
    assert_eq!(
        value(&samples, "toolwarden_calls", &labels("tool_error")),
        Some(1.0)
    );

    let (status, _, body) = get(addr, "/health?verbose=1").await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "unhealthy");
    assert_eq!(report["checks"][0]["message"], "unreachable");
    assert!(report.get("history").is_none(), "only on request: {report}");

    // `?history=1`: the last results of each check, oldest first, timed.
    let (status, _, body) = get(addr, "/health?history=1").await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let upstream = report["history"]["upstream"].as_array().unwrap();
    assert_eq!(upstream.len(), 2, "two reports so far: {report}");
    for entry in upstream {
        assert_eq!(entry["status"], "failed");
        assert_eq!(entry["message"], "unreachable");
        assert!(entry["at_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    }
    assert_eq!(
        upstream.last().unwrap()["at_unix_ms"],
        report["checked_at_unix_ms"]
    );

    let (status, _, body) = get(addr, "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["tools"][0]["calls"], 3);

    let (status, head, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(
        body.is_empty() && !head.contains("Content-Length: 0"),
        "{head}"
    );

    assert_eq!(get(addr, "/nope").await.0, 404);
    let (status, head, _) =
        exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"));
    assert_eq!(exchange(addr, b"garbage\r\n\r\n").await.0, 400);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Fill: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(exchange(addr, huge.as_bytes()).await.0, 431);
    // A client that connects and leaves does not disturb the server.
    drop(TcpStream::connect(addr).await.unwrap());
    assert_eq!(get(addr, "/metrics").await.0, 200);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn unconfigured_paths_are_not_found() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, Endpoints::new(), std::future::pending()));
    for path in ["/metrics", "/health", "/stats"] {
        assert_eq!(get(addr, path).await.0, 404, "{path}");
    }
    server.abort();
}

/// Serves `router` with `server` on an ephemeral port until the returned
/// sender is used or dropped.
async fn start(
    server: MetricsServer,
    router: axum::Router,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, router, async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

/// Whether the server closes `stream` (EOF or reset) within `limit`: the
/// head it was sent is never finished.
async fn closed_within(mut stream: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 512];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // an error answer, then the close
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_router_extended_with_routes_of_its_own_is_served_whole() {
    let router = Endpoints::new()
        .metrics(|| "toolwarden_calls_total 3\n".to_owned())
        .router()
        .route("/circuits", axum::routing::get(|| async { "[]" }));
    let (addr, stop, server) = start(MetricsServer::new(), router).await;

    let (status, _, body) = get(addr, "/metrics").await;
    assert_eq!((status, body.as_str()), (200, "toolwarden_calls_total 3\n"));
    let (status, _, body) = get(addr, "/circuits").await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    // Not configured: not routed.
    assert_eq!(get(addr, "/health").await.0, 404);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_off() {
    let server = MetricsServer::builder()
        .header_read_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let (addr, stop, task) = start(server, Endpoints::new().router()).await;

    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(slow, Duration::from_secs(10)).await,
        "an unfinished head held the connection past the header timeout"
    );

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_connection_is_dropped_after_the_connection_timeout() {
    // The header timeout is long; the connection's own limit cuts it first.
    let server = MetricsServer::builder()
        .header_read_timeout(Duration::from_secs(60))
        .connection_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let (addr, stop, task) = start(server, Endpoints::new().router()).await;

    let slow = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(slow, Duration::from_secs(10)).await,
        "the connection outlived the connection timeout"
    );
    // The slot is free again.
    assert_eq!(get(addr, "/nope").await.0, 404);

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn with_one_slot_the_next_connection_is_served_once_the_first_ends() {
    let server = MetricsServer::builder().max_connections(1).build().unwrap();
    let router = Endpoints::new().metrics(String::new).router();
    let (addr, stop, task) = start(server, router).await;

    // The one slot is held by a connection whose head is unfinished.
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    let second = tokio::spawn(get(addr, "/metrics"));
    // Finishing the first request answers it and frees the slot.
    first.write_all(b"\r\n").await.unwrap();
    let mut raw = Vec::new();
    first.read_to_end(&mut raw).await.unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{raw:?}");
    assert_eq!(second.await.unwrap().0, 200);

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn on_shutdown_the_answer_in_flight_is_finished() {
    // A check that tells when it started, then waits to be let go.
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let health = HealthRegistry::new();
    let (on_start, on_release) = (started.clone(), release.clone());
    health
        .register(HealthCheck::new("slow", Priority::Critical, move || {
            let (on_start, on_release) = (on_start.clone(), on_release.clone());
            async move {
                on_start.notify_one();
                on_release.notified().await;
                Ok(())
            }
        }))
        .unwrap();
    let server = MetricsServer::builder()
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (addr, stop, task) = start(server, Endpoints::new().health(health).router()).await;

    let answer = tokio::spawn(get(addr, "/health"));
    started.notified().await;
    stop.send(()).unwrap();
    release.notify_one();
    let (status, _, body) = answer.await.unwrap();
    assert_eq!(status, 200, "{body}");
    task.await.unwrap().unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}
