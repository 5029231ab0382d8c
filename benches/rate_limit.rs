//! The admission check of RateLimitLayer, side by side with a bare governor
//! keyed check and tower-resilience's rate limiter, in one run.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench rate_limit -- --warm-up-time 2 --measurement-time 5`
//!
//! Every contender gets the same generous quota (one call per nanosecond,
//! burst one million), so nothing is ever refused: what is measured is the
//! cost of admitting a call. Calls cycle over the same 8 tool names.

mod support;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use support::{one_call, runtime_current_thread, unit_service, Call, TOOLS};
use toolwarden_rate_limit::{Rate, RateLimitLayer, TokioClock};
use tower::Layer;
use tower_resilience::ratelimiter::RateLimiterLayer;

const BURST: u32 = 1_000_000;

fn calls() -> impl FnMut() -> Call {
    let mut i = 0;
    move || {
        i = (i + 1) % TOOLS.len();
        Call { tool: TOOLS[i] }
    }
}

fn generous_quota() -> Quota {
    match (
        Quota::with_period(Duration::from_nanos(1)),
        NonZeroU32::new(BURST),
    ) {
        (Some(quota), Some(burst)) => quota.allow_burst(burst),
        _ => unreachable!("1 ns and a nonzero burst"),
    }
}

fn generous_layer(global: bool) -> RateLimitLayer {
    let builder = RateLimitLayer::builder().per_tool(Rate::new(1, Duration::from_nanos(1)), BURST);
    let builder = if global {
        builder.global(Rate::new(1, Duration::from_nanos(1)), BURST)
    } else {
        builder
    };
    match builder.build() {
        Ok(layer) => layer,
        Err(e) => panic!("{e}"),
    }
}

fn bench_admission(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit");

    // (b) governor's own keyed limiter (DashMap store, default clock).
    let governor_keyed = RateLimiter::keyed(generous_quota());
    group.bench_function("governor_keyed_check", |b| {
        let mut next = calls();
        b.iter(|| black_box(governor_keyed.check_key(&black_box(next()).tool)))
    });

    // (a) our check alone: per-tool quota, then with the global quota too.
    let limits = generous_layer(false).limits();
    group.bench_function("toolwarden_check_per_tool", |b| {
        let mut next = calls();
        b.iter(|| black_box(limits.check(&black_box(next()))))
    });
    let limits_with_global = generous_layer(true).limits();
    group.bench_function("toolwarden_check_per_tool_and_global", |b| {
        let mut next = calls();
        b.iter(|| black_box(limits_with_global.check(&black_box(next()))))
    });

    // End to end through tower: poll_ready + call + poll, over the same bare service.
    group.bench_function("bare_service", |b| {
        let mut svc = unit_service();
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("toolwarden_layer_per_tool", |b| {
        let mut svc = generous_layer(false).layer(unit_service());
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.bench_function("toolwarden_layer_per_tool_and_global", |b| {
        let mut svc = generous_layer(true).layer(unit_service());
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });

    // (c) tower-resilience's rate limiter (token bucket, one global budget:
    // it is not keyed), over the same service.
    let runtime = runtime_current_thread();
    let _guard = runtime.enter();
    group.bench_function("tower_resilience_layer", |b| {
        let layer = match RateLimiterLayer::burst(1_000_000_000, BURST as usize).build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        };
        let mut svc = layer.layer(unit_service());
        let mut next = calls();
        b.iter(|| one_call(&mut svc, black_box(next())))
    });
    group.finish();
}

/// What reading time through tokio costs next to governor's default clock,
/// alone and inside an unkeyed governor check.
fn bench_clock(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit_clock");
    let default_clock = DefaultClock::default();
    group.bench_function("governor_default_clock_now", |b| {
        b.iter(|| black_box(default_clock.now()))
    });
    group.bench_function("tokio_clock_now", |b| {
        b.iter(|| black_box(TokioClock.now()))
    });
    let direct_default = RateLimiter::direct(generous_quota());
    group.bench_function("governor_direct_check_default_clock", |b| {
        b.iter(|| black_box(direct_default.check()))
    });
    let direct_tokio = RateLimiter::direct_with_clock(generous_quota(), TokioClock);
    group.bench_function("governor_direct_check_tokio_clock", |b| {
        b.iter(|| black_box(direct_tokio.check()))
    });
    group.finish();
}

criterion_group!(benches, bench_admission, bench_clock);
criterion_main!(benches);
