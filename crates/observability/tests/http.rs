//! The HTTP endpoint over a real TCP connection on an ephemeral port.
#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use toolwarden_core::testing::{MockMcp, Step};
use toolwarden_observability::health::{HealthCheck, HealthRegistry, Priority};
use toolwarden_observability::http::{serve, Endpoints};
use toolwarden_observability::ObservabilityLayer;
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
