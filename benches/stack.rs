//! The whole standard stack, as a user runs it, next to the peer's stack.
//!
//! Run: `cargo bench --bench stack`
//!
//! Every side gets the same `tools/call` requests (`jsonrpc::Request`, ~200
//! bytes of arguments, cycling over four tools) and a `service_fn` that
//! answers each with a small text result under the request's id:
//!
//! - `bare`: the service alone;
//! - `toolwarden`: [`StandardStack`] with its defaults (observability, loop
//!   guard, fallback cache, retry, rate limit, circuit breaker, attempt
//!   timeout, errors rendered), the per-tool rate set so high it never
//!   refuses;
//! - `tower_resilience`: tower-resilience 0.13's retry (3 attempts) → rate
//!   limiter → circuit breaker (count window 100) → `tower::timeout`.
//!
//! Groups:
//!
//! - `stack/one_task`: one call at a time on a current-thread runtime
//!   (`ready().await`, `call().await`), per call;
//! - `stack/two_tasks`: two tasks on a 2-worker runtime, each on its own
//!   tools, reported as calls per second (criterion's throughput) so the
//!   2-task / 1-task ratio reads directly;
//! - allocations per call on the happy path, counted by a counting global
//!   allocator and printed (not a criterion figure).
//!
//! Without `--bench` (what `cargo test --benches` passes) each side makes a
//! few calls, every answer is checked, and the allocation counts are
//! printed.

use std::alloc::System;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use toolwarden::rate_limit::Rate;
use toolwarden::stack::StandardStack;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::{BoxError, McpResponse};
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

mod support;
use support::arguments_200_bytes;

/// Counts every allocation the process makes (stats_alloc over the system
/// allocator).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TOOLS: [&str; 8] = [
    "search_docs",
    "web_search",
    "read_file",
    "list_issues",
    "get_weather",
    "run_query",
    "fetch_page",
    "translate",
];

/// The requests of one task: 64 calls over four tools (`offset` picks which
/// four), arguments varied so that no two in a row are the same call.
fn requests(offset: usize) -> Vec<Request> {
    (0..64)
        .map(|i| {
            let mut args = arguments_200_bytes(i);
            args.as_object_mut().map(|a| a.remove("_meta"));
            Request::tool_call(i as i64, TOOLS[offset + i % 4], args)
        })
        .collect()
}

type Svc = BoxCloneSyncService<Request, Response, BoxError>;

/// The upstream: a small text result under the request's id.
fn upstream() -> impl Service<
    Request,
    Response = Response,
    Error = BoxError,
    Future = Ready<Result<Response, BoxError>>,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|request: Request| {
        ready(Ok::<_, BoxError>(Response::result(
            request.id,
            json!({"content": [{"type": "text", "text": "3 results"}]}),
        )))
    })
}

fn bare() -> Svc {
    BoxCloneSyncService::new(upstream())
}

fn toolwarden_stack() -> Svc {
    let stack = StandardStack::builder()
        .rate_limit(|b| b.per_tool(Rate::per_second(1_000_000), 1_000_000))
        .build()
        .expect("the stack's configuration");
    BoxCloneSyncService::new(stack.layer(upstream()))
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(error: E) -> BoxError {
    Box::new(error)
}

fn tower_resilience_stack() -> Svc {
    let retry = tower_resilience::retry::RetryLayer::<Request, Response, BoxError>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .build();
    let limiter = tower_resilience::ratelimiter::RateLimiterLayer::burst(1_000_000_000, 1_000_000)
        .build()
        .expect("the rate limiter's configuration");
    let breaker = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .sliding_window_size(100)
        .build()
        .expect("the breaker's configuration");
    let service = ServiceBuilder::new()
        .layer(retry)
        .map_err(boxed)
        .layer(limiter)
        .map_err(boxed)
        .layer(breaker)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(10)))
        .service(upstream());
    BoxCloneSyncService::new(service)
}

/// `n` calls, one at a time, through `service`; how long they took.
async fn sequential(service: &Svc, requests: &[Request], n: u64) -> Duration {
    let mut service = service.clone();
    let start = Instant::now();
    for i in 0..n {
        let request = requests[(i % requests.len() as u64) as usize].clone();
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("an answer");
        black_box(response);
    }
    start.elapsed()
}

fn sides() -> [(&'static str, Svc); 3] {
    [
        ("bare", bare()),
        ("toolwarden", toolwarden_stack()),
        ("tower_resilience", tower_resilience_stack()),
    ]
}

fn bench_one_task(c: &mut Criterion) {
    let runtime = support::runtime_current_thread();
    let _guard = runtime.enter();
    let sides = runtime.block_on(async { sides() });
    let requests = requests(0);
    let mut group = c.benchmark_group("stack/one_task");
    for (name, service) in &sides {
        group.bench_function(*name, |b| {
            b.iter_custom(|n| runtime.block_on(sequential(service, &requests, n)))
        });
    }
    group.finish();
}

fn bench_two_tasks(c: &mut Criterion) {
    let runtime = support::runtime_2_workers();
    let _guard = runtime.enter();
    let sides = runtime.block_on(async { sides() });
    let per_task = [requests(0), requests(4)];
    let mut group = c.benchmark_group("stack/two_tasks");
    for (name, service) in &sides {
        for tasks in [1usize, 2] {
            group.throughput(Throughput::Elements(tasks as u64));
            group.bench_function(BenchmarkId::new(*name, tasks), |b| {
                b.iter_custom(|n| {
                    runtime.block_on(async {
                        let start = Instant::now();
                        let handles: Vec<_> = (0..tasks)
                            .map(|t| {
                                let service = service.clone();
                                let requests = per_task[t].clone();
                                tokio::spawn(
                                    async move { sequential(&service, &requests, n).await },
                                )
                            })
                            .collect();
                        for handle in handles {
                            handle.await.expect("a task");
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

/// Allocations per call on the happy path, after a warm-up (caches,
/// per-tool state and metric handles exist).
fn allocations_per_call(
    runtime: &tokio::runtime::Runtime,
    service: &Svc,
    requests: &[Request],
) -> f64 {
    const CALLS: u64 = 4096;
    runtime.block_on(sequential(service, requests, 512));
    let region = Region::new(GLOBAL);
    runtime.block_on(sequential(service, requests, CALLS));
    let stats = region.change();
    // The requests cloned for each call are the caller's, not the stack's:
    // every side clones them alike, so they cancel in the difference to bare.
    (stats.allocations + stats.reallocations) as f64 / CALLS as f64
}

fn report_allocations(_c: &mut Criterion) {
    let runtime = support::runtime_current_thread();
    let _guard = runtime.enter();
    let sides = runtime.block_on(async { sides() });
    let requests = requests(0);
    // Each side answers every request well, under its id.
    for (name, service) in &sides {
        for request in requests.iter().take(8) {
            let id = request.id.clone();
            let response = runtime
                .block_on(service.clone().oneshot(request.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(response.id, id, "{name}");
            assert!(!response.is_tool_error(), "{name}: {response:?}");
        }
    }
    let counts: Vec<(&str, f64)> = sides
        .iter()
        .map(|(name, service)| (*name, allocations_per_call(&runtime, service, &requests)))
        .collect();
    let bare = counts[0].1;
    println!("\nallocations per call (happy path, after warm-up):");
    for (name, count) in &counts {
        println!(
            "  {name:<17} {count:>7.2}   ({:+.2} over bare)",
            count - bare
        );
    }
}

criterion_group!(benches, report_allocations, bench_one_task, bench_two_tasks);
criterion_main!(benches);
