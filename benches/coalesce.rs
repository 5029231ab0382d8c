//! CoalesceLayer's cost per call, side by side with tower-resilience 0.13's
//! coalesce, in one run.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench coalesce -- --warm-up-time 2 --measurement-time 5`
//!
//! Calls are made one at a time over 8 tool names, so each call leads its
//! own (unshared) call: what is measured is what every call that *may* be
//! shared pays (ours: fingerprint of tool and arguments, a short lock of the
//! in-flight map to register, one of the call to start it (the inner call
//! is made with no lock held) and one to poll it, the call's slot, state
//! and box reused from the last call with its key; theirs:
//! the key function, its map and broadcast channel, a boxed future).
//! `toolwarden_not_shareable` is a call of a tool the catalog does not call
//! safe to share, which passes through. Each layer is measured over a bare
//! service of the response type it needs (ours: a `Clone` MCP response;
//! theirs: a `Clone` error), and `*_added` is the layered call minus its
//! bare call, in alternating chunks (`support::overhead_pair`).

mod support;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use support::{one_call, overhead_pair, runtime_current_thread, Bare, Call, Reply, TOOLS};
use toolwarden_coalesce::CoalesceLayer;
use tower::service_fn;
use tower::util::ServiceFn;
use tower::Layer;

fn calls() -> impl FnMut() -> Call {
    let mut i = 0;
    move || {
        i = (i + 1) % TOOLS.len();
        Call { tool: TOOLS[i] }
    }
}

fn ours(coalesce: bool) -> CoalesceLayer {
    match CoalesceLayer::builder().coalesce(coalesce).build() {
        Ok(layer) => layer,
        Err(e) => panic!("{e}"),
    }
}

type CloneErrorService = ServiceFn<fn(Call) -> Ready<Result<Reply, Infallible>>>;

/// A bare service whose error type is `Clone`, as tower-resilience's
/// coalesce requires.
fn clone_error_service() -> CloneErrorService {
    service_fn(|_call: Call| ready(Ok::<Reply, Infallible>(Reply)))
}

fn bench_coalesce(c: &mut Criterion) {
    let runtime = runtime_current_thread();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("coalesce");

    group.bench_function("bare_service", |b| {
        let mut svc = Bare(Reply);
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("toolwarden_layer", |b| {
        let mut svc = ours(true).layer(Bare(Reply));
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("toolwarden_not_shareable", |b| {
        let mut svc = ours(false).layer(Bare(Reply));
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("bare_clone_error_service", |b| {
        let mut svc = clone_error_service();
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("tower_resilience_layer", |b| {
        let layer = tower_resilience::coalesce::CoalesceLayer::new(|call: &Call| call.tool);
        let mut svc = layer.layer(clone_error_service());
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });

    let (mut bare, mut next_bare) = (Bare(Reply), calls());
    let (mut layered, mut next_layered) = (ours(true).layer(Bare(Reply)), calls());
    let mut added = overhead_pair(
        move || {
            black_box(one_call(&mut bare, black_box(next_bare())));
        },
        move || {
            black_box(one_call(&mut layered, black_box(next_layered())));
        },
    );
    group.bench_function("toolwarden_added", |b| b.iter_custom(&mut added));
    let (mut bare, mut next_bare) = (clone_error_service(), calls());
    let layer = tower_resilience::coalesce::CoalesceLayer::new(|call: &Call| call.tool);
    let (mut layered, mut next_layered) = (layer.layer(clone_error_service()), calls());
    let mut added = overhead_pair(
        move || {
            black_box(one_call(&mut bare, black_box(next_bare())));
        },
        move || {
            black_box(one_call(&mut layered, black_box(next_layered())));
        },
    );
    group.bench_function("tower_resilience_added", |b| b.iter_custom(&mut added));
    group.finish();
}

criterion_group!(benches, bench_coalesce);
criterion_main!(benches);
