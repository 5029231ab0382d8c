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

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Map, Value};
use tokio::runtime::Runtime;
use toolwarden_circuit_breaker::CircuitBreakerLayer;
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::request::RpcErrorRef;
use toolwarden_core::{BoxError, McpRequest, McpResponse};
use tower::{service_fn, Layer, Service, ServiceExt};

/// A `tools/call` of one tool, nothing else.
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

/// A successful tool result, nothing else.
#[derive(Debug, Clone, Copy)]
struct Reply;

impl McpResponse for Reply {
    fn rpc_error(&self) -> Option<RpcErrorRef<'_>> {
        None
    }
    fn is_tool_error(&self) -> bool {
        false
    }
    fn is_empty_tool_result(&self) -> bool {
        false
    }
    fn is_input_required(&self) -> bool {
        false
    }
    fn first_text(&self) -> Option<Cow<'_, str>> {
        None
    }
    fn from_tool_result(_id: Option<&Id>, _result: Value) -> Self {
        Reply
    }
    fn insert_result_meta(&mut self, _key: &str, _value: Value) {}
    fn push_text(&mut self, _text: String) {}
    fn size_hint(&self) -> usize {
        0
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

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
    let rt = runtime();
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
    let rt = runtime();
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
