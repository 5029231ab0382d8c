//! Per-call overhead of the ObservabilityLayer over a bare ready service:
//! with no metrics recorder installed, and with the Prometheus recorder;
//! no tracing subscriber in either (the span is then disabled).
//!
//! Run: `cargo bench --bench observability -- --warm-up-time 2 --measurement-time 5`
//!
//! The `light/*` benches use request and response types that cost nothing
//! to build and read, so the difference between `bare` and a layered bench
//! is the layer's own cost. The `jsonrpc/*` benches use the core's JSON-RPC
//! types, as a raw transport would: the request is cloned outside the timed
//! section, the bare service clones its response inside it (in both
//! benches), and the layered one also pays for reading the JSON (tool name,
//! classification). `reference/two_tsc_reads` is the floor of a timed
//! call with the layer's default clock (two reads of the time-stamp counter
//! and the scaled difference), `reference/two_clock_reads` the same with
//! tokio's clock (`ClockSource::Tokio`);
//! `reference/jsonrpc_tool_name_and_classify` is what reading the JSON-RPC
//! types through the core costs.
//!
//! `light/overhead_1_tool` measures `layered - bare` directly: each sample
//! alternates chunks of 32 bare and 32 layered calls (which side goes first
//! alternates too) and reports the difference of their times, so load that
//! drifts during the run hits both sides alike. A chunk pair in which
//! either chunk ran over 3 times the fastest chunk of its side was
//! interrupted (preempted) and is measured again.

mod support;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::json;
use support::{one_call, overhead_pair, Bare, Call, Reply};
use toolwarden_core::jsonrpc::{self, Id};
use toolwarden_core::{CallKind, Classify, McpClassifier, McpRequest};
use toolwarden_observability::ObservabilityLayer;
use tower::Layer;

const TOOLS: [&str; 100] = [
    "t00", "t01", "t02", "t03", "t04", "t05", "t06", "t07", "t08", "t09", "t10", "t11", "t12",
    "t13", "t14", "t15", "t16", "t17", "t18", "t19", "t20", "t21", "t22", "t23", "t24", "t25",
    "t26", "t27", "t28", "t29", "t30", "t31", "t32", "t33", "t34", "t35", "t36", "t37", "t38",
    "t39", "t40", "t41", "t42", "t43", "t44", "t45", "t46", "t47", "t48", "t49", "t50", "t51",
    "t52", "t53", "t54", "t55", "t56", "t57", "t58", "t59", "t60", "t61", "t62", "t63", "t64",
    "t65", "t66", "t67", "t68", "t69", "t70", "t71", "t72", "t73", "t74", "t75", "t76", "t77",
    "t78", "t79", "t80", "t81", "t82", "t83", "t84", "t85", "t86", "t87", "t88", "t89", "t90",
    "t91", "t92", "t93", "t94", "t95", "t96", "t97", "t98", "t99",
];

fn light_benches(c: &mut Criterion, recorder: &str) {
    let mut group = c.benchmark_group(format!("observability/{recorder}"));
    let mut bare = Bare(Reply);
    group.bench_function("light/bare", |b| {
        b.iter(|| black_box(one_call(&mut bare, black_box(Call { tool: "search" }))))
    });
    let mut layered = ObservabilityLayer::new().layer(Bare(Reply));
    group.bench_function("light/layered_1_tool", |b| {
        b.iter(|| black_box(one_call(&mut layered, black_box(Call { tool: "search" }))))
    });
    let mut bare = Bare(Reply);
    let mut layered = ObservabilityLayer::new().layer(Bare(Reply));
    let mut overhead = overhead_pair(
        || {
            black_box(one_call(&mut bare, black_box(Call { tool: "search" })));
        },
        || {
            black_box(one_call(&mut layered, black_box(Call { tool: "search" })));
        },
    );
    group.bench_function("light/overhead_1_tool", |b| b.iter_custom(&mut overhead));
    let mut layered = ObservabilityLayer::new().layer(Bare(Reply));
    let mut i = 0usize;
    group.bench_function("light/layered_100_tools", |b| {
        b.iter(|| {
            i = (i + 1) % TOOLS.len();
            black_box(one_call(&mut layered, black_box(Call { tool: TOOLS[i] })))
        })
    });

    let request = jsonrpc::Request::tool_call(1, "search", json!({"q": "tower", "limit": 5}));
    let response = jsonrpc::Response::result(
        Id::Number(1),
        json!({"content": [{"type": "text", "text": "3 results"}], "isError": false}),
    );
    let mut bare = Bare(response.clone());
    // The request clone is set up outside the timed section.
    group.bench_function("jsonrpc/bare", |b| {
        b.iter_batched(
            || request.clone(),
            |req| one_call(&mut bare, req),
            BatchSize::SmallInput,
        )
    });
    let mut layered = ObservabilityLayer::new().layer(Bare(response));
    group.bench_function("jsonrpc/layered", |b| {
        b.iter_batched(
            || request.clone(),
            |req| one_call(&mut layered, req),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn no_recorder(c: &mut Criterion) {
    light_benches(c, "no_recorder");
}

/// What two reads of the tokio clock (start and end) cost: the floor of a
/// timed call with `ClockSource::Tokio` (the layer's clock before it read
/// the time-stamp counter).
fn clock_floor(c: &mut Criterion) {
    c.bench_function("observability/reference/two_clock_reads", |b| {
        b.iter(|| {
            let start = tokio::time::Instant::now();
            black_box(tokio::time::Instant::now().saturating_duration_since(black_box(start)))
        })
    });
}

/// The same floor for the layer's default clock: two raw reads of the
/// time-stamp counter through quanta and the scaled difference.
fn tsc_floor(c: &mut Criterion) {
    let clock = quanta::Clock::new();
    c.bench_function("observability/reference/two_tsc_reads", |b| {
        b.iter(|| {
            let start = clock.raw();
            black_box(clock.delta_as_nanos(black_box(start), clock.raw()))
        })
    });
}

fn prometheus(c: &mut Criterion) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // The exporter keeps histogram samples until upkeep drains them; run it
    // every second, as an installed exporter does, so memory stays flat.
    let stop = Arc::new(AtomicBool::new(false));
    let upkeep = {
        let (handle, stop) = (handle.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                handle.run_upkeep();
            }
        })
    };
    metrics::with_local_recorder(&recorder, || light_benches(c, "prometheus"));
    stop.store(true, Ordering::Relaxed);
    upkeep.join().expect("upkeep thread");
    // The calls really reached the recorder.
    assert!(handle.render().contains("toolwarden_calls"));
}

/// What reading the JSON-RPC types costs any layer (the core's request view
/// and classifier), for comparing the `jsonrpc/*` figures.
fn json_reads(c: &mut Criterion) {
    let request = jsonrpc::Request::tool_call(1, "search", json!({"q": "tower", "limit": 5}));
    let response = jsonrpc::Response::result(
        Id::Number(1),
        json!({"content": [{"type": "text", "text": "3 results"}], "isError": false}),
    );
    let classifier = McpClassifier::new();
    c.bench_function(
        "observability/reference/jsonrpc_tool_name_and_classify",
        |b| {
            b.iter(|| {
                let req = black_box(&request);
                let kind = if req.is_tool_call() {
                    CallKind::ToolCall
                } else {
                    CallKind::Other
                };
                black_box(req.tool_name());
                black_box(classifier.classify_response(kind, black_box(&response)))
            })
        },
    );
}

criterion_group!(
    benches,
    clock_floor,
    tsc_floor,
    json_reads,
    no_recorder,
    prometheus
);
criterion_main!(benches);
