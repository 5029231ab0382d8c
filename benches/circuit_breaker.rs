//! The circuit breaker's per-call overhead, closed state, side by side with
//! tower-resilience's circuit breaker, in one run.
//!
//! Run: `cargo bench --bench circuit_breaker`
//!
//! Every variant wraps the same always-ready `tower::service_fn` that
//! answers at once, and is driven by 1 or 2 tokio tasks on a multi-threaded
//! runtime with 2 workers; each task makes `iters` calls (`ready`, then
//! `call`, then await), all tasks at once. Criterion's time per iteration is
//! the wall time of one call per task, and its throughput counts one element
//! per task, so 2-task throughput / 1-task throughput is the scaling.
//!
//! - `bare`: the service alone.
//! - `toolwarden`: `CircuitBreakerLayer` (defaults: consecutive + count
//!   window, per-tool key), each task calling 4 tools of its own (distinct
//!   keys across tasks), services cloned from one layer (one registry).
//! - `tower_resilience`: tower-resilience 0.13's `CircuitBreakerLayer`
//!   (defaults), the service cloned per task as a `ServiceBuilder` stack
//!   would be (one circuit; it is not keyed).
//! - `tower_resilience_per_task` (2 tasks only): one circuit per task, its
//!   closest analogue of distinct keys.
//!
//! Requests and responses are minimal types implementing the core's
//! `McpRequest`/`McpResponse` (a tool name; an `Ok` result), so the figures
//! are the layers' own cost and not JSON building; the `jsonrpc` group
//! repeats bare and toolwarden with the core's JSON-RPC types (request built
//! per call, classified with the MCP table) for scale.

#![allow(clippy::expect_used)] // setup failures abort the bench

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use support::{runtime_2_workers, Call, Reply};
use tokio::runtime::Runtime;
use toolwarden_circuit_breaker::CircuitBreakerLayer;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::BoxError;
use tower::{service_fn, Layer, Service, ServiceExt};

fn tool_names(task: usize) -> Vec<&'static str> {
    (0..4)
        .map(|k| &*Box::leak(format!("task{task}_tool{k}").into_boxed_str()))
        .collect()
}

/// Runs `iters` calls on each of `tasks` tasks at once; returns the wall
/// time from the moment all of them started to the end of the last.
///
/// The tasks start through a blocking barrier: each holds its worker until
/// all have arrived, so they run on distinct workers (with an async gate,
/// tokio pulls both tasks from its injection queue onto one worker and,
/// since these calls never yield, runs them one after the other).
fn run<S, Req, F>(
    rt: &Runtime,
    tasks: usize,
    iters: u64,
    services: &[S],
    make_request: F,
) -> Duration
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    Req: Send + 'static,
    F: Fn(usize, u64) -> Req + Clone + Send + 'static,
{
    rt.block_on(async {
        let start = Arc::new(std::sync::Barrier::new(tasks));
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                let mut svc = services[task].clone();
                let start = Arc::clone(&start);
                let make_request = make_request.clone();
                tokio::spawn(async move {
                    start.wait();
                    let t0 = Instant::now();
                    for i in 0..iters {
                        let req = make_request(task, i);
                        let resp = svc.ready().await.expect("ready").call(req).await;
                        black_box(resp.expect("call"));
                    }
                    (t0, Instant::now())
                })
            })
            .collect();
        let mut spans = Vec::with_capacity(tasks);
        for h in handles {
            spans.push(h.await.expect("task"));
        }
        let first = spans.iter().map(|s| s.0).min().expect("a task");
        let last = spans.iter().map(|s| s.1).max().expect("a task");
        last - first
    })
}

fn bench_closed(c: &mut Criterion) {
    let rt = runtime_2_workers();
    let names: Vec<Vec<&'static str>> = (0..2).map(tool_names).collect();
    let call = move |task: usize, i: u64| Call {
        tool: names[task][(i % 4) as usize],
    };
    let bare = service_fn(|_: Call| async { Ok::<_, BoxError>(Reply) });

    let ours_layer = rt.block_on(async { CircuitBreakerLayer::builder().build().expect("config") });
    let ours = ours_layer.layer(bare);

    let theirs_layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .expect("config");
    let theirs = theirs_layer.layer(bare);
    let theirs_per_task: Vec<_> = (0..2).map(|_| theirs_layer.layer(bare)).collect();

    let mut group = c.benchmark_group("circuit_breaker");
    for tasks in [1usize, 2] {
        group.throughput(Throughput::Elements(tasks as u64));
        group.bench_function(BenchmarkId::new("bare", tasks), |b| {
            b.iter_custom(|iters| run(&rt, tasks, iters, &[bare, bare], call.clone()))
        });
        group.bench_function(BenchmarkId::new("toolwarden", tasks), |b| {
            b.iter_custom(|iters| {
                run(
                    &rt,
                    tasks,
                    iters,
                    &[ours.clone(), ours.clone()],
                    call.clone(),
                )
            })
        });
        group.bench_function(BenchmarkId::new("tower_resilience", tasks), |b| {
            b.iter_custom(|iters| {
                run(
                    &rt,
                    tasks,
                    iters,
                    &[theirs.clone(), theirs.clone()],
                    call.clone(),
                )
            })
        });
        if tasks == 2 {
            group.bench_function(BenchmarkId::new("tower_resilience_per_task", tasks), |b| {
                b.iter_custom(|iters| run(&rt, tasks, iters, &theirs_per_task, call.clone()))
            });
        }
    }
    group.finish();
}

fn bench_jsonrpc(c: &mut Criterion) {
    let rt = runtime_2_workers();
    let names: Vec<Vec<&'static str>> = (0..2).map(tool_names).collect();
    let request = move |task: usize, i: u64| {
        Request::tool_call(
            i as i64,
            names[task][(i % 4) as usize],
            json!({"q": "circuit"}),
        )
    };
    let bare = service_fn(|req: Request| async move {
        Ok::<_, BoxError>(Response::result(
            req.id,
            json!({"content": [{"type": "text", "text": "ok"}], "isError": false}),
        ))
    });
    let ours = rt
        .block_on(async { CircuitBreakerLayer::builder().build().expect("config") })
        .layer(bare);
    let mut group = c.benchmark_group("circuit_breaker_jsonrpc");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare", |b| {
        b.iter_custom(|iters| run(&rt, 1, iters, &[bare], request.clone()))
    });
    group.bench_function("toolwarden", |b| {
        b.iter_custom(|iters| run(&rt, 1, iters, std::slice::from_ref(&ours), request.clone()))
    });
    group.finish();
}

criterion_group!(benches, bench_closed, bench_jsonrpc);
criterion_main!(benches);
