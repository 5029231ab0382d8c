//! Core hot paths: the argument fingerprint, one keyed-state lookup and the
//! classifier judging a JSON-RPC response.
//!
//! Run: `cargo bench --bench core`

mod support;

use std::hint::black_box;
use std::sync::atomic::AtomicU64;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use support::arguments_200_bytes;
use toolwarden_core::jsonrpc::{Id, Response};
use toolwarden_core::{fingerprint, Bounds, CallKind, Classify, KeyRef, KeyedState, McpClassifier};

fn bench_fingerprint(c: &mut Criterion) {
    // ~200 bytes serialised, nested, with a _meta member the hash must skip.
    let args = arguments_200_bytes(25);
    let obj = args.as_object();
    c.bench_function("core/fingerprint_200B", |b| {
        b.iter(|| fingerprint(black_box("search_repositories"), black_box(obj)))
    });
}

fn bench_keyed_lookup(c: &mut Criterion) {
    let state: KeyedState<AtomicU64> = KeyedState::new(Bounds::default(), |_| AtomicU64::new(0));
    let names: Vec<String> = (0..100).map(|i| format!("tool_{i}")).collect();
    for n in &names {
        state.entry(KeyRef::Tool(n));
    }
    // The lookup itself: find the key's state and read it.
    c.bench_function("core/keyed_lookup_100_keys", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % names.len();
            state.with(&KeyRef::Tool(black_box(&names[i])), |v| {
                black_box(v.load(std::sync::atomic::Ordering::Relaxed))
            })
        })
    });
    // A lookup that also takes an owned handle (what a layer's future keeps).
    c.bench_function("core/keyed_entry_handle_100_keys", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % names.len();
            black_box(state.entry(KeyRef::Tool(black_box(&names[i]))))
        })
    });
}

/// The classifier judging a JSON-RPC `tools/call` response, as every layer
/// that records outcomes does once per call: a typical success (one text
/// item, `isError: false`) and a tool error (whose first text is read).
fn bench_classify(c: &mut Criterion) {
    let classifier = McpClassifier::new();
    let success = Response::result(
        Id::Number(1),
        json!({"content": [{"type": "text", "text": "3 results"}], "isError": false}),
    );
    let tool_error = Response::result(
        Id::Number(1),
        json!({"content": [{"type": "text", "text": "upstream timed out"}], "isError": true}),
    );
    c.bench_function("core/classify_success_jsonrpc", |b| {
        b.iter(|| classifier.classify_response(CallKind::ToolCall, black_box(&success)))
    });
    c.bench_function("core/classify_tool_error_jsonrpc", |b| {
        b.iter(|| classifier.classify_response(CallKind::ToolCall, black_box(&tool_error)))
    });
}

criterion_group!(
    benches,
    bench_fingerprint,
    bench_keyed_lookup,
    bench_classify
);
criterion_main!(benches);
