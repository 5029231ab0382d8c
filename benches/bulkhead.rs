//! BulkheadLayer's cost per call when a place is free (the common case),
//! side by side with tower-resilience 0.13's bulkhead, in one run.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench bulkhead -- --warm-up-time 2 --measurement-time 5`
//!
//! Both caps are 10 calls in flight and refuse at once when full; calls are
//! made one at a time, so none is refused: what is measured is taking and
//! giving back a place (ours per tool, over the same 8 tool names; theirs
//! one global semaphore: it is not keyed). `*_added` is the layered call
//! minus the bare call, measured in alternating chunks
//! (`support::overhead_pair`).

mod support;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use support::{one_call, overhead_pair, runtime_current_thread, unit_service, Call, TOOLS};
use toolwarden_bulkhead::BulkheadLayer;
use toolwarden_core::{CallKind, Classify, Outcome};
use tower::Layer;

/// The bare service answers `()`, which no MCP classifier reads: a
/// classifier of `()` for the layer's type. A fixed cap never calls it, so
/// it costs nothing measured here.
#[derive(Debug, Clone, Copy)]
struct Unit;

impl Classify<()> for Unit {
    fn classify_response(&self, _kind: CallKind, _response: &()) -> Outcome {
        Outcome::SUCCESS
    }

    fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> Outcome {
        toolwarden_core::classify::classify_error_chain(error)
    }
}

fn calls() -> impl FnMut() -> Call {
    let mut i = 0;
    move || {
        i = (i + 1) % TOOLS.len();
        Call { tool: TOOLS[i] }
    }
}

fn ours() -> BulkheadLayer<Unit> {
    match BulkheadLayer::builder()
        .max_concurrent(10)
        .classifier(Unit)
        .build()
    {
        Ok(layer) => layer,
        Err(e) => panic!("{e}"),
    }
}

fn theirs() -> tower_resilience::bulkhead::BulkheadLayer {
    match tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(10)
        .reject_when_full()
        .build()
    {
        Ok(layer) => layer,
        Err(e) => panic!("{e:?}"),
    }
}

fn bench_bulkhead(c: &mut Criterion) {
    let runtime = runtime_current_thread();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("bulkhead");

    group.bench_function("bare_service", |b| {
        let mut svc = unit_service();
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("toolwarden_layer", |b| {
        let mut svc = ours().layer(unit_service());
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("tower_resilience_layer", |b| {
        let mut svc = theirs().layer(unit_service());
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });

    let (mut bare, mut next_bare) = (unit_service(), calls());
    let (mut layered, mut next_layered) = (ours().layer(unit_service()), calls());
    let mut added = overhead_pair(
        move || {
            one_call(&mut bare, black_box(next_bare()));
        },
        move || {
            one_call(&mut layered, black_box(next_layered()));
        },
    );
    group.bench_function("toolwarden_added", |b| b.iter_custom(&mut added));
    let (mut bare, mut next_bare) = (unit_service(), calls());
    let (mut layered, mut next_layered) = (theirs().layer(unit_service()), calls());
    let mut added = overhead_pair(
        move || {
            one_call(&mut bare, black_box(next_bare()));
        },
        move || {
            one_call(&mut layered, black_box(next_layered()));
        },
    );
    group.bench_function("tower_resilience_added", |b| b.iter_custom(&mut added));
    group.finish();
}

criterion_group!(benches, bench_bulkhead);
criterion_main!(benches);
