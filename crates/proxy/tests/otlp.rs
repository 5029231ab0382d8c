//! OpenTelemetry export, end to end: the `toolwarden` binary in front of
//! the flaky test server, exporting to an OTLP collector in this process
//! (the collector's gRPC `TraceService` and `MetricsService` from
//! `opentelemetry-proto`, and its HTTP/protobuf routes over axum). The
//! collector keeps what it receives; the tests poll it (with a generous
//! bound, never a timing claim) and assert the spans, their attributes and
//! span events, and the metrics.
#![cfg(feature = "otlp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use support::{component, eventually, flaky_server_script, write_temp, Proxy, LIMIT};
use tokio_util::sync::CancellationToken;

/// A secret in every call's arguments: it must appear in no span.
const SECRET: &str = "secret-argument-value-7f3a";

/// What the collector received.
#[derive(Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    /// The `x-api-key` header of each HTTP export.
    api_keys: Arc<Mutex<Vec<String>>>,
}

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.traces
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    fn service_names(&self) -> Vec<String> {
        self.traces
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|r| r.resource.as_ref())
            .filter_map(|r| attr(&r.attributes, "service.name"))
            .collect()
    }

    /// Every data point's attributes of the histogram `name`.
    fn histogram_points(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        let mut out = Vec::new();
        for request in self.metrics.lock().unwrap().iter() {
            for metric in request
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .filter(|m| m.name == name)
            {
                if let Some(metric::Data::Histogram(h)) = &metric.data {
                    for point in &h.data_points {
                        assert!(point.count > 0);
                        // The conventions' buckets, in seconds.
                        assert_eq!(point.explicit_bounds.first(), Some(&0.01), "{point:?}");
                        out.push(attrs(&point.attributes));
                    }
                }
            }
        }
        out
    }

    fn metric_names(&self) -> Vec<String> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| m.name.clone())
            .collect()
    }
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}

fn attrs(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

struct Traces(Received);

#[tonic::async_trait]
impl TraceService for Traces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct Metrics(Received);

#[tonic::async_trait]
impl MetricsService for Metrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The collector over gRPC on a loopback port; stops with `stop`.
async fn grpc_collector(received: &Received, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Traces(received.clone())))
        .add_service(MetricsServiceServer::new(Metrics(received.clone())));
    tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    addr
}

/// The collector over HTTP/protobuf (`POST /v1/traces`, `/v1/metrics`).
async fn http_collector(received: &Received, stop: CancellationToken) -> SocketAddr {
    use axum::body::Bytes;
    use axum::http::{header, StatusCode};
    use axum::routing::post;

    fn answer<M: prost::Message>(
        message: &M,
    ) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            message.encode_to_vec(),
        )
    }
    let traces = received.clone();
    let metrics = received.clone();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                move |headers: axum::http::HeaderMap, body: Bytes| async move {
                    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
                    traces
                        .api_keys
                        .lock()
                        .unwrap()
                        .push(key.unwrap_or("").to_owned());
                    let request = ExportTraceServiceRequest::decode(body).unwrap();
                    traces.traces.lock().unwrap().push(request);
                    answer(&ExportTraceServiceResponse::default())
                },
            ),
        )
        .route(
            "/v1/metrics",
            post(move |body: Bytes| async move {
                let request = ExportMetricsServiceRequest::decode(body).unwrap();
                metrics.metrics.lock().unwrap().push(request);
                answer(&ExportMetricsServiceResponse::default())
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap();
    });
    addr
}

/// The flaky server through the proxy, configured by `config`.
fn start_proxy(python: &std::path::Path, tag: &str, config: &str) -> Proxy {
    let path = write_temp(tag, "toolwarden.toml", config);
    let script = flaky_server_script();
    Proxy::start(
        &[
            "run",
            "--config",
            path.to_str().unwrap(),
            "--",
            python.to_str().unwrap(),
            script.to_str().unwrap(),
        ],
        &[("FLAKY_FAILURES", "2")],
    )
}

/// The span events of `span` by name, with their attributes.
fn events(span: &Span) -> Vec<(String, BTreeMap<String, String>)> {
    span.events
        .iter()
        .map(|e| (e.name.clone(), attrs(&e.attributes)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_carries_each_decision_as_a_span_event_and_the_duration_histogram() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let received = Received::default();
    let stop = CancellationToken::new();
    let collector = grpc_collector(&received, stop.clone()).await;
    let config = format!(
        r#"
[observability]
otlp_endpoint = "http://{collector}"
otlp_interval = "200ms"
service_name = "toolwarden-otlp-test"

[retry]
base_delay = "10ms"
max_delay = "20ms"

# Two attempts, both failing (FLAKY_FAILURES = 2): a retry, then the
# circuit opens on the second consecutive failure.
[tools."flaky_search"]
safe_to_repeat = true
retry = {{ max_attempts = 2 }}
circuit_breaker = {{ failure_threshold = 2, minimum_calls = 1, reset_timeout = "5m" }}

# One call a minute: the second is rate limited and the first one's result
# is served stale.
[tools."stats"]
cacheable = true
rate_limit = {{ per_tool = {{ rate = "1/min", burst = 1 }} }}

# The same call over and over is blocked as a loop.
[tools."slow"]
loop_guard = {{ limits = {{ max_repeats = 2 }} }}
"#
    );
    let mut proxy = start_proxy(&python, "otlp-grpc", &config);
    proxy.initialize().await;
    proxy.request(1, "tools/list", json!({})).await;

    let failed = proxy
        .call(2, "flaky_search", json!({"query": SECRET}))
        .await;
    assert_eq!(failed["result"]["isError"], true, "{failed}");
    let refused = proxy
        .call(3, "flaky_search", json!({"query": SECRET}))
        .await;
    assert!(refused.to_string().contains("circuit"), "{refused}");
    let fresh = proxy.call(4, "stats", json!({})).await;
    assert!(fresh.get("result").is_some(), "{fresh}");
    let stale = proxy.call(5, "stats", json!({})).await;
    assert!(stale.to_string().contains("toolwarden/stale"), "{stale}");
    let mut blocked = None;
    for id in 6..12 {
        let answer = proxy
            .call(id, "slow", json!({"seconds": 0, "note": SECRET}))
            .await;
        if answer.to_string().contains("loop") {
            blocked = Some(answer);
            break;
        }
    }
    assert!(blocked.is_some(), "no call of slow was blocked as a loop");

    // Every decision kind, as a span event of a `tools/call {tool}` span.
    let wanted = [
        "toolwarden.retried",
        "toolwarden.circuit_opened",
        "toolwarden.rate_limited",
        "toolwarden.loop_detected",
        "toolwarden.stale_served",
    ];
    let spans = eventually(LIMIT, || {
        let received = received.clone();
        async move {
            let spans = received.spans();
            let names: Vec<String> = spans
                .iter()
                .flat_map(|s| s.events.iter().map(|e| e.name.clone()))
                .collect();
            wanted
                .iter()
                .all(|w| names.iter().any(|n| n == w))
                .then_some(spans)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the collector never received every decision; spans: {:#?}",
            received
                .spans()
                .iter()
                .map(|s| (s.name.clone(), events(s)))
                .collect::<Vec<_>>()
        )
    });

    let span_named = |event: &str| {
        spans
            .iter()
            .find(|s| s.events.iter().any(|e| e.name == event))
            .unwrap()
    };
    let retried = span_named("toolwarden.retried");
    assert_eq!(retried.name, "tools/call flaky_search");
    let a = attrs(&retried.attributes);
    assert_eq!(a["mcp.method.name"], "tools/call");
    assert_eq!(a["gen_ai.tool.name"], "flaky_search");
    assert_eq!(a["gen_ai.operation.name"], "execute_tool");
    assert_eq!(a["error.type"], "tool_error");
    assert_eq!(a["attempt"], "2");
    let (_, retry) = events(retried)
        .into_iter()
        .find(|(n, _)| n == "toolwarden.retried")
        .unwrap();
    assert_eq!(retry["toolwarden.event"], "retried");
    assert_eq!(retry["toolwarden.key"], "flaky_search");
    assert_eq!(retry["toolwarden.attempt"], "2");
    assert!(retry.contains_key("toolwarden.delay_ms"), "{retry:?}");
    // The circuit opened during that same call (its second attempt).
    let opened = span_named("toolwarden.circuit_opened");
    assert_eq!(opened.name, "tools/call flaky_search");
    assert!(events(opened)
        .iter()
        .any(|(n, a)| n == "toolwarden.circuit_opened"
            && a.contains_key("toolwarden.retry_after_ms")));
    // The call refused by the open circuit: a span with error.type rejected.
    assert!(
        spans.iter().any(|s| s.name == "tools/call flaky_search"
            && attr(&s.attributes, "error.type").as_deref() == Some("rejected")),
        "no span of the refused call"
    );
    let limited = span_named("toolwarden.rate_limited");
    assert_eq!(limited.name, "tools/call stats");
    let names: Vec<String> = events(limited).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"toolwarden.stale_served".to_owned()),
        "{names:?}"
    );
    let looped = span_named("toolwarden.loop_detected");
    assert_eq!(looped.name, "tools/call slow");
    assert!(events(looped)
        .iter()
        .any(|(n, a)| n == "toolwarden.loop_detected"
            && a["toolwarden.repeats"].parse::<u32>().is_ok()));
    for span in &spans {
        // Client spans of the upstream calls, with the conventions' names.
        assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT: {span:?}");
        // No argument or result anywhere in a span.
        let all = format!("{span:?}");
        assert!(!all.contains(SECRET), "{all}");
        assert!(!all.contains("results for"), "{all}");
    }
    assert!(received
        .service_names()
        .iter()
        .all(|n| n == "toolwarden-otlp-test"));

    // The duration histogram, by method and tool.
    let points = eventually(LIMIT, || {
        let received = received.clone();
        async move {
            let points = received.histogram_points("mcp.client.operation.duration");
            points
                .iter()
                .any(|p| p.get("gen_ai.tool.name").map(String::as_str) == Some("flaky_search"))
                .then_some(points)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no duration histogram; metrics: {:?}",
            received.metric_names()
        )
    });
    assert!(
        points.iter().all(|p| p.get("mcp.method.name").is_some()),
        "{points:?}"
    );
    let names = received.metric_names();
    for name in ["toolwarden.calls", "toolwarden.events"] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} not exported: {names:?}"
        );
    }

    let status = proxy.close_and_wait().await;
    assert!(status.success(), "{status:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_reaches_the_collector() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    let received = Received::default();
    let stop = CancellationToken::new();
    let collector = http_collector(&received, stop.clone()).await;
    let config = format!(
        r#"
[observability]
otlp_endpoint = "http://{collector}"
otlp_protocol = "http/protobuf"
otlp_interval = "60s"
otlp_headers = {{ "x-api-key" = "test-key" }}

[retry]
base_delay = "10ms"
max_delay = "20ms"

[tools."flaky_search"]
safe_to_repeat = true
"#
    );
    let mut proxy = start_proxy(&python, "otlp-http", &config);
    proxy.initialize().await;
    proxy.request(1, "tools/list", json!({})).await;
    let answer = proxy
        .call(2, "flaky_search", json!({"query": SECRET}))
        .await;
    // Two failures, then the third attempt succeeds.
    assert_eq!(answer["result"]["isError"], false, "{answer}");

    // Nothing is due before a minute (spans every 5 s at most, metrics
    // every minute): what the collector has after the exit, the shutdown
    // flushed.
    let status = proxy.close_and_wait().await;
    assert!(status.success(), "{status:?}");
    let span = received
        .spans()
        .into_iter()
        .find(|s| s.name == "tools/call flaky_search")
        .expect("the span of the call was flushed on shutdown");
    let retries = events(&span)
        .into_iter()
        .filter(|(n, _)| n == "toolwarden.retried")
        .count();
    assert_eq!(retries, 2);
    assert!(!format!("{span:?}").contains(SECRET));
    assert_eq!(received.service_names()[0], "toolwarden");
    assert!(received
        .api_keys
        .lock()
        .unwrap()
        .iter()
        .all(|k| k == "test-key"));
    let points = received.histogram_points("mcp.client.operation.duration");
    assert!(
        points
            .iter()
            .any(|p| p.get("gen_ai.tool.name").map(String::as_str) == Some("flaky_search")),
        "the duration histogram was not flushed on shutdown: {:?}",
        received.metric_names()
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_does_not_stop_the_calls() {
    let Some(python) = component("TOOLWARDEN_PYTHON") else {
        return;
    };
    // Nothing listens there.
    let port = support::free_port();
    let config = format!(
        r#"
[observability]
otlp_endpoint = "http://127.0.0.1:{port}"
otlp_interval = "100ms"

[tools."stats"]
cacheable = false
"#
    );
    let mut proxy = start_proxy(&python, "otlp-down", &config);
    proxy.initialize().await;
    proxy.request(1, "tools/list", json!({})).await;
    for id in 2..6 {
        let answer = proxy.call(id, "stats", json!({})).await;
        assert!(answer.get("result").is_some(), "{answer}");
    }
    let warned = eventually(LIMIT, || {
        let lines = proxy.stderr_lines();
        async move {
            let failures: Vec<String> = lines
                .into_iter()
                .filter(|l| l.contains("OpenTelemetry export failed"))
                .collect();
            (!failures.is_empty()).then_some(failures)
        }
    })
    .await
    .expect("the failed export is logged");
    // Rate limited: at most one warning per signal (a minute apart).
    assert!(warned.len() <= 2, "{warned:?}");
    let status = proxy.close_and_wait().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_bad_endpoint_is_a_configuration_error_naming_the_key() {
    for (value, says) in [
        ("\"localhost:4317\"", "otlp_endpoint"),
        ("\"ftp://collector:4317\"", "scheme"),
        ("\"https://collector:4317\"", "http/protobuf"),
    ] {
        let path = write_temp(
            "otlp-bad",
            "bad.toml",
            &format!("[observability]\notlp_endpoint = {value}\n"),
        );
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .args(["check-config", path.to_str().unwrap()])
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("observability.otlp_endpoint"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}
