//! The retry layer's happy path (the first attempt succeeds), side by side
//! with tower's `Retry` and tower-resilience's retry, in one run.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench retry -- --warm-up-time 2 --measurement-time 5`
//!
//! Every variant wraps the same always-ready `tower::service_fn` that
//! answers at once, driven by one task on a current-thread tokio runtime
//! (`ready`, then `call`, then await, `iters` times); the time per iteration
//! is one call.
//!
//! - `bare`: the service alone.
//! - `toolwarden`: `RetryBackoffLayer::new()` (defaults: 3 attempts, full
//!   jitter, one shared budget with ratio 0.2): per call it clones the
//!   request and the service, reads the clock, deposits into the budget and
//!   classifies the response with the MCP table.
//! - `toolwarden_no_budget`: the same without a retry budget (no deposit).
//! - `toolwarden_keyed_budget`: the same with one budget per tool (a keyed
//!   lookup per call; 4 tools).
//! - `tower_retry`: tower 0.5's `Retry` with a minimal policy (retry any
//!   error twice, clone the request, no backoff, no budget).
//! - `tower_resilience`: tower-resilience 0.13's `RetryLayer` (3 attempts,
//!   exponential backoff; its future is boxed).
//!
//! Group `retry/minimal` uses minimal request and response types
//! implementing the core's `McpRequest`/`McpResponse` (a tool name; an `Ok`
//! result), so the figures are the layers' own cost. Group `retry/jsonrpc`
//! repeats the comparison with the core's JSON-RPC types (request cloned,
//! response built per call, `Attempt` stored in the request's extensions),
//! for scale. Group `retry/parts` times two pieces of the toolwarden path
//! alone: reading tokio's clock and one budget deposit (which reads it).

mod support;

use std::future::Future;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use support::{runtime_current_thread, Call, Reply};
use tokio::runtime::Runtime;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::{Bounds, BoxError, KeyBy};
use toolwarden_retry::{BudgetConfig, RetryBackoffLayer, RetryBudget};
use tower::{service_fn, Layer, Service, ServiceExt};

/// tower's `Retry` with the least policy that can retry: any error, twice.
#[derive(Debug, Clone, Copy)]
struct RetryErrors(u8);

impl<Req: Clone, Res> tower::retry::Policy<Req, Res, BoxError> for RetryErrors {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Req,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        if result.is_err() && self.0 > 0 {
            self.0 -= 1;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// Times `iters` calls of `svc`, one after another, on one task.
fn run<S, R>(rt: &Runtime, svc: &S, requests: &[R], iters: u64) -> Duration
where
    S: Service<R> + Clone,
    S::Error: std::fmt::Debug,
    R: Clone,
{
    let mut svc = svc.clone();
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let req = requests[i as usize % requests.len()].clone();
            let ready = svc.ready().await.unwrap();
            black_box(ready.call(black_box(req)).await.unwrap());
        }
        start.elapsed()
    })
}

fn bench_minimal(c: &mut Criterion) {
    let rt = runtime_current_thread();
    let requests: Vec<Call> = ["search", "fetch", "list_files", "get_weather"]
        .into_iter()
        .map(|tool| Call { tool })
        .collect();
    let bare = service_fn(|_req: Call| std::future::ready(Ok::<_, BoxError>(Reply)));
    let toolwarden = RetryBackoffLayer::new().layer(bare);
    let keyed = RetryBackoffLayer::builder()
        .key_by(KeyBy::Tool)
        .bounds(Bounds::default())
        .build()
        .unwrap()
        .layer(bare);
    let no_budget = RetryBackoffLayer::builder()
        .no_budget()
        .build()
        .unwrap()
        .layer(bare);
    let tower_retry = tower::retry::RetryLayer::new(RetryErrors(2)).layer(bare);
    let resilience = tower_resilience::retry::RetryLayer::<Call, Reply, BoxError>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .build()
        .layer(bare);

    let mut group = c.benchmark_group("retry/minimal");
    group.bench_function("bare", |b| b.iter_custom(|n| run(&rt, &bare, &requests, n)));
    group.bench_function("toolwarden", |b| {
        b.iter_custom(|n| run(&rt, &toolwarden, &requests, n))
    });
    group.bench_function("toolwarden_no_budget", |b| {
        b.iter_custom(|n| run(&rt, &no_budget, &requests, n))
    });
    group.bench_function("toolwarden_keyed_budget", |b| {
        b.iter_custom(|n| run(&rt, &keyed, &requests, n))
    });
    group.bench_function("tower_retry", |b| {
        b.iter_custom(|n| run(&rt, &tower_retry, &requests, n))
    });
    group.bench_function("tower_resilience", |b| {
        b.iter_custom(|n| run(&rt, &resilience, &requests, n))
    });
    group.finish();
}

fn bench_jsonrpc(c: &mut Criterion) {
    let rt = runtime_current_thread();
    let requests: Vec<Request> = ["search", "fetch", "list_files", "get_weather"]
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            Request::tool_call(
                i as i64,
                tool,
                json!({"query": "retry budgets", "limit": 10}),
            )
        })
        .collect();
    fn answer(req: Request) -> impl Future<Output = Result<Response, BoxError>> {
        let result = json!({"content": [{"type": "text", "text": "ok"}], "isError": false});
        std::future::ready(Ok(Response::result(req.id, result)))
    }
    let bare = service_fn(answer);
    let toolwarden = RetryBackoffLayer::new().layer(bare);
    let tower_retry = tower::retry::RetryLayer::new(RetryErrors(2)).layer(bare);
    let resilience = tower_resilience::retry::RetryLayer::<Request, Response, BoxError>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .build()
        .layer(bare);

    let mut group = c.benchmark_group("retry/jsonrpc");
    group.bench_function("bare", |b| b.iter_custom(|n| run(&rt, &bare, &requests, n)));
    group.bench_function("toolwarden", |b| {
        b.iter_custom(|n| run(&rt, &toolwarden, &requests, n))
    });
    group.bench_function("tower_retry", |b| {
        b.iter_custom(|n| run(&rt, &tower_retry, &requests, n))
    });
    group.bench_function("tower_resilience", |b| {
        b.iter_custom(|n| run(&rt, &resilience, &requests, n))
    });
    group.finish();
}

fn bench_parts(c: &mut Criterion) {
    let budget = RetryBudget::new(BudgetConfig::default()).unwrap();
    let mut group = c.benchmark_group("retry/parts");
    group.bench_function("tokio_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    group.bench_function("budget_deposit", |b| {
        b.iter(|| black_box(&budget).deposit())
    });
    group.finish();
}

criterion_group!(benches, bench_minimal, bench_jsonrpc, bench_parts);
criterion_main!(benches);
