//! The admission check of RateLimitLayer, side by side with a bare governor
//! keyed check and tower-resilience's rate limiter, in one run.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench rate_limit -- --warm-up-time 2 --measurement-time 5`
//!
//! Every contender gets the same generous quota (one call per nanosecond,
//! burst one million), so nothing is ever refused: what is measured is the
//! cost of admitting a call. Calls cycle over the same 8 tool names.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use serde_json::{Map, Value};
use toolwarden_core::McpRequest;
use toolwarden_rate_limit::{Rate, RateLimitLayer, TokioClock};
use tower::{service_fn, Layer, Service};
use tower_resilience::ratelimiter::RateLimiterLayer;

const TOOLS: [&str; 8] = [
    "search_docs",
    "web_search",
    "read_file",
    "write_file",
    "list_issues",
    "get_weather",
    "send_email",
    "run_query",
];

const BURST: u32 = 1_000_000;

/// A tool call reduced to what a limiter reads, so that every contender pays
/// the same (nothing) for the request itself.
#[derive(Debug, Clone, Copy)]
struct Call {
    tool: &'static str,
}

impl McpRequest for Call {
    fn method(&self) -> &str {
        "tools/call"
    }
    fn tool_name(&self) -> Option<&str> {
        Some(self.tool)
    }
    fn arguments(&self) -> Option<&Map<String, Value>> {
        None
    }
    fn is_continuation(&self) -> bool {
        false
    }
    fn session_key(&self) -> Option<&str> {
        None
    }
    fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        None
    }
    fn insert_extension<T: Clone + Send + Sync + 'static>(&mut self, _value: T) {}
}

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

type Bare = tower::util::ServiceFn<fn(Call) -> Ready<Result<(), Infallible>>>;

fn bare_service() -> Bare {
    service_fn(|_call: Call| ready(Ok::<(), Infallible>(())))
}

/// `poll_ready`, `call`, and one poll of the response future, which must all
/// be ready at once (nothing waits in this bench).
fn call_once<S>(svc: &mut S, call: Call, cx: &mut Context<'_>)
where
    S: Service<Call>,
    S::Error: std::fmt::Debug,
{
    match svc.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("not ready: {other:?}"),
    }
    match pin!(svc.call(call)).poll(cx) {
        Poll::Ready(Ok(response)) => {
            black_box(response);
        }
        Poll::Ready(Err(e)) => panic!("refused: {e:?}"),
        Poll::Pending => panic!("the call waited"),
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
    let mut cx = Context::from_waker(Waker::noop());
    group.bench_function("bare_service", |b| {
        let mut svc = bare_service();
        let mut next = calls();
        b.iter(|| call_once(&mut svc, black_box(next()), &mut cx))
    });
    group.bench_function("toolwarden_layer_per_tool", |b| {
        let mut svc = generous_layer(false).layer(bare_service());
        let mut next = calls();
        b.iter(|| call_once(&mut svc, black_box(next()), &mut cx))
    });
    group.bench_function("toolwarden_layer_per_tool_and_global", |b| {
        let mut svc = generous_layer(true).layer(bare_service());
        let mut next = calls();
        b.iter(|| call_once(&mut svc, black_box(next()), &mut cx))
    });

    // (c) tower-resilience's rate limiter (token bucket, one global budget:
    // it is not keyed), over the same service.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => panic!("{e}"),
    };
    let _guard = runtime.enter();
    group.bench_function("tower_resilience_layer", |b| {
        let layer = match RateLimiterLayer::burst(1_000_000_000, BURST as usize).build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        };
        let mut svc = layer.layer(bare_service());
        let mut next = calls();
        b.iter(|| call_once(&mut svc, black_box(next()), &mut cx))
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
