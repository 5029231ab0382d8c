//! Per-call cost of the ObservabilityLayer when its span goes to
//! OpenTelemetry (`tracing-opentelemetry`, as the proxy's `otlp_endpoint`
//! sets up), side by side in one run with the same layer and no tracing
//! subscriber (the span disabled, what a proxy without `otlp_endpoint` and
//! with the default `RUST_LOG` pays).
//!
//! Run: `cargo bench --bench otlp -- --warm-up-time 2 --measurement-time 5`
//!
//! Every figure is `layered - bare`, paired (see `support::overhead_pair`):
//!
//! - `off`: no subscriber;
//! - `otel_batch`: the tracing-opentelemetry layer over an SDK tracer whose
//!   batch span processor (its own thread, a queue of 2048, spans dropped
//!   past it) hands batches to an exporter that discards them: the proxy's
//!   arrangement, but for the network;
//! - `otel_simple`: the same with the simple span processor, which exports
//!   each span as it ends (no queue to overflow, so every span is built and
//!   handed over): the upper bound of the per-call cost.
//!
//! The request is `support::Call` (a `tools/call` that costs nothing to
//! read) and the service answers at once, so the figure is the span's cost:
//! building it, its fields, the OTel span data, and the export hand-off.

mod support;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use support::{one_call, overhead_pair, Bare, Call, Reply};
use toolwarden_observability::ObservabilityLayer;
use tower::Layer;
use tracing_subscriber::layer::SubscriberExt;

/// An exporter that drops what it is given.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn overhead(c: &mut Criterion, name: &str) {
    let mut bare = Bare(Reply);
    let mut layered = ObservabilityLayer::new().layer(Bare(Reply));
    let mut pair = overhead_pair(
        || {
            black_box(one_call(&mut bare, black_box(Call { tool: "search" })));
        },
        || {
            black_box(one_call(&mut layered, black_box(Call { tool: "search" })));
        },
    );
    c.bench_function(&format!("otlp/{name}/overhead_1_tool"), |b| {
        b.iter_custom(&mut pair)
    });
}

fn with_provider(c: &mut Criterion, name: &str, provider: &SdkTracerProvider) {
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("bench"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false);
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || overhead(c, name));
}

fn benches(c: &mut Criterion) {
    overhead(c, "off");
    let batch = SdkTracerProvider::builder()
        .with_batch_exporter(Discard)
        .build();
    with_provider(c, "otel_batch", &batch);
    let simple = SdkTracerProvider::builder()
        .with_simple_exporter(Discard)
        .build();
    with_provider(c, "otel_simple", &simple);
    let _ = batch.shutdown();
    let _ = simple.shutdown();
}

criterion_group!(otlp, benches);
criterion_main!(otlp);
