//! The call span: its fields, the attempt, the fingerprint, and what never
//! enters it (nor the log lines, nor the metric labels).
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{Attempt, BoxError, Event, Fingerprint, McpRequest};
use toolwarden_observability::{ClockSource, ObservabilityLayer};
use tower::{Layer, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use support::{call, tool_call};

type Fields = BTreeMap<String, String>;

#[derive(Default)]
struct Visitor(Fields);

impl Visit for Visitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Records the fields of every closed span and of every event (log line).
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<(String, Fields)>>>,
    events: Arc<Mutex<Vec<Fields>>>,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut visitor = Visitor::default();
        attrs.record(&mut visitor);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(visitor.0);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(fields) = ext.get_mut::<Fields>() {
                let mut visitor = Visitor(std::mem::take(fields));
                values.record(&mut visitor);
                *fields = visitor.0;
            }
        }
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<Fields>()
                .cloned()
                .unwrap_or_default();
            self.spans
                .lock()
                .unwrap()
                .push((span.name().to_owned(), fields));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: LayerContext<'_, S>) {
        let mut visitor = Visitor::default();
        event.record(&mut visitor);
        self.events.lock().unwrap().push(visitor.0);
    }
}

impl Capture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn spans(&self) -> Vec<(String, Fields)> {
        self.spans.lock().unwrap().clone()
    }

    fn events(&self) -> Vec<Fields> {
        self.events.lock().unwrap().clone()
    }
}

#[tokio::test(start_paused = true)]
async fn each_call_has_one_span_with_its_outcome() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mock = MockMcp::new().script(
        "search",
        [
            Step::ok("hit").after(Duration::from_millis(30)),
            Step::tool_error("upstream rate limit exceeded").after(Duration::from_millis(5)),
        ],
    );
    // Durations from tokio's paused clock, so they are exact.
    let layer = ObservabilityLayer::builder()
        .clock(ClockSource::Tokio)
        .build()
        .unwrap();
    let mut svc = layer.layer(ReadyChecked::new(mock).pending_first());
    call(&mut svc, tool_call(1, "search")).await.unwrap();
    let mut second = tool_call(2, "search");
    second.insert_extension(Attempt(3)); // as the retry layer does when it sits above
    call(&mut svc, second).await.unwrap();
    call(&mut svc, Request::new(3, "tools/list", None))
        .await
        .unwrap();

    let spans = capture.spans();
    assert_eq!(spans.len(), 3, "{spans:?}");
    assert!(spans.iter().all(|(name, _)| name == "mcp.call"));
    let (_, ok) = &spans[0];
    assert_eq!(ok["otel.name"], "tools/call search");
    assert_eq!(ok["otel.kind"], "client");
    assert_eq!(ok["mcp.method.name"], "tools/call");
    assert_eq!(ok["gen_ai.tool.name"], "search");
    assert_eq!(ok["outcome"], "success");
    assert_eq!(ok["duration_ms"], "30.0");
    assert!(!ok.contains_key("failure.class") && !ok.contains_key("error.type"));
    assert!(!ok.contains_key("attempt"));
    assert_eq!(ok["gen_ai.operation.name"], "execute_tool");
    assert_eq!(ok["jsonrpc.request.id"], "1");
    assert!(!ok.contains_key("otel.status_code"));
    let fingerprint = &ok["toolwarden.fingerprint"];
    assert_eq!(fingerprint.len(), 32);
    assert!(fingerprint.chars().all(|c| c.is_ascii_hexdigit()));

    let (_, failed) = &spans[1];
    assert_eq!(failed["outcome"], "tool_error");
    assert_eq!(failed["failure.class"], "transient");
    assert_eq!(failed["error.type"], "tool_error");
    assert_eq!(failed["attempt"], "3");
    assert_eq!(failed["duration_ms"], "5.0");
    assert_eq!(failed["otel.status_code"], "ERROR");
    // Same tool and arguments: same fingerprint.
    assert_eq!(&failed["toolwarden.fingerprint"], fingerprint);

    let (_, list) = &spans[2];
    assert_eq!(list["otel.name"], "tools/list");
    assert!(!list.contains_key("gen_ai.tool.name"));
    assert!(!list.contains_key("gen_ai.operation.name"));
    assert!(!list.contains_key("toolwarden.fingerprint"));

    // Arguments never enter a span.
    for (_, fields) in &spans {
        assert!(
            fields
                .values()
                .all(|v| !v.contains("secret-argument-value")),
            "{fields:?}"
        );
    }
}

/// An inner service that reports retries through the layer's event sink,
/// as a retry layer below it would, and shows what it received.
fn retrying_upstream(
    layer: &ObservabilityLayer,
    seen: Arc<Mutex<Vec<Option<Fingerprint>>>>,
) -> impl tower::Service<Request, Response = Response, Error = BoxError, Future = impl Send> + Clone
{
    let events = layer.events();
    tower::service_fn(move |req: Request| {
        let events = events.clone();
        let seen = Arc::clone(&seen);
        async move {
            seen.lock()
                .unwrap()
                .push(req.extension::<Fingerprint>().copied());
            for attempt in 2..=3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                events.emit(&Event::Retried {
                    key: "search",
                    attempt,
                    delay: Duration::from_millis(10),
                });
            }
            MockMcp::new().oneshot(req).await
        }
    })
}

#[tokio::test(start_paused = true)]
async fn retries_below_the_layer_set_the_attempt_and_the_fingerprint_is_shared() {
    let capture = Capture::default();
    let _guard = capture.install();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let layer = ObservabilityLayer::new();
    let mut svc = layer.layer(retrying_upstream(&layer, Arc::clone(&seen)));
    call(&mut svc, tool_call(1, "search")).await.unwrap();

    let spans = capture.spans();
    assert_eq!(spans[0].1["attempt"], "3");
    // The fingerprint the span shows is stored for the layers below.
    let passed = seen.lock().unwrap()[0].expect("fingerprint stored in the request");
    assert_eq!(spans[0].1["toolwarden.fingerprint"], passed.to_string());
    assert_eq!(layer.stats().snapshot().events["retried"], 2);
}

#[tokio::test]
async fn when_the_span_is_filtered_out_nothing_is_hashed() {
    // (tests/no_subscriber.rs covers a process with no subscriber at all.)
    let filtered =
        tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::WARN);
    let guard = tracing::subscriber::set_default(filtered);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let layer = ObservabilityLayer::new();
    let mut svc = layer.layer(retrying_upstream(&layer, Arc::clone(&seen)));
    call(&mut svc, tool_call(1, "search")).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [None]);
    drop(guard);

    // Nor when the fingerprint is switched off.
    let capture = Capture::default();
    let _guard = capture.install();
    let layer = ObservabilityLayer::builder()
        .span_fingerprint(false)
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut svc = layer.layer(retrying_upstream(&layer, Arc::clone(&seen)));
    call(&mut svc, tool_call(2, "search")).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [None]);
    assert!(!capture.spans()[0].1.contains_key("toolwarden.fingerprint"));
}

#[tokio::test]
async fn a_dropped_call_closes_its_span_as_cancelled() {
    let capture = Capture::default();
    let _guard = capture.install();
    let layer = ObservabilityLayer::new();
    let mut svc = layer.layer(MockMcp::new().script("slow", [Step::Hang]));
    {
        let mut fut = pin!(call(&mut svc, tool_call(1, "slow")));
        assert!(fut
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending());
    }
    let spans = capture.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].1["outcome"], "cancelled");
    assert!(spans[0].1.contains_key("duration_ms"));
}

#[tokio::test(start_paused = true)]
async fn arguments_never_reach_spans_logs_or_metric_labels() {
    // Everything enabled, down to TRACE: spans, log events and metrics.
    let capture = Capture::default();
    let _guard = capture.install();
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let layer = ObservabilityLayer::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Retries below the layer: each one logs an event through the sink.
    let mut svc = layer.layer(retrying_upstream(&layer, seen));
    call(&mut svc, tool_call(1, "search")).await.unwrap();
    let events = layer.events();
    events.emit(&Event::LoopDetected {
        key: "search",
        repeats: 4,
    });
    events.emit(&Event::StaleServed {
        key: "search",
        age: Duration::from_secs(3),
    });

    let spans = capture.spans();
    let logs = capture.events();
    // Not vacuous: the span and the log lines were captured.
    assert_eq!(spans.len(), 1);
    let logged: Vec<&str> = logs
        .iter()
        .filter_map(|fields| fields.get("toolwarden.event").map(String::as_str))
        .collect();
    assert_eq!(
        logged,
        ["retried", "retried", "loop_detected", "stale_served"]
    );
    assert!(logs
        .iter()
        .all(|fields| fields["toolwarden.key"] == "search"));
    // Named for the span event they become under tracing-opentelemetry.
    assert!(logs
        .iter()
        .all(|fields| fields["message"] == format!("toolwarden.{}", fields["toolwarden.event"])));
    assert_eq!(logs[0]["toolwarden.attempt"], "2");
    assert_eq!(logs[2]["toolwarden.repeats"], "4");
    assert_eq!(logs[3]["toolwarden.age_ms"], "3000.0");
    let secret = "secret-argument-value";
    for fields in spans.iter().map(|(_, f)| f).chain(&logs) {
        assert!(fields.values().all(|v| !v.contains(secret)), "{fields:?}");
    }
    let text = prometheus.render();
    assert!(text.contains("gen_ai_tool_name=\"search\""), "{text}");
    assert!(!text.contains(secret), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_names_the_layer_that_refused() {
    let capture = Capture::default();
    let _guard = capture.install();
    let layer = ObservabilityLayer::new();
    let refusing = tower::service_fn(|_: Request| async {
        Err::<Response, BoxError>(Box::new(toolwarden_core::CircuitOpen::new(
            "search",
            Duration::from_secs(30),
        )))
    });
    let mut svc = layer.layer(refusing);
    assert!(call(&mut svc, tool_call(1, "search")).await.is_err());
    let spans = capture.spans();
    let (_, refused) = &spans[0];
    assert_eq!(refused["outcome"], "rejected");
    assert_eq!(refused["error.type"], "rejected");
    assert_eq!(refused["toolwarden.rejected_by"], "circuit_breaker");
    assert_eq!(refused["otel.status_code"], "ERROR");
}
