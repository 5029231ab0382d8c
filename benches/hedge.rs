//! The hedge layer's common path (the first attempt answers before the
//! delay, no hedge fires), side by side with tower-resilience 0.13's hedge
//! layer, in one run.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench hedge -- --warm-up-time 2 --measurement-time 5`
//!
//! Every variant wraps the same always-ready `tower::service_fn`, driven by
//! one task on a current-thread tokio runtime (`ready`, then `call`, then
//! await, `iters` times); the time per iteration is one call. Requests are
//! the minimal `Call` of `benches/support` (a tool name), four tools, every
//! one hedgeable (`safe_to_hedge(true)`) unless said otherwise; errors are
//! `Infallible` (tower-resilience's hedge needs `Clone` errors).
//!
//! - `bare`: the service alone.
//! - `toolwarden`: `HedgeLayer` with its defaults (delay 100 ms, p95 of
//!   the tool's recent good answers, budget 10 %): per call it looks the
//!   call's policy up, reads the clock, deposits into the budget, clones
//!   the request and the service and classifies the answer; a call not
//!   answered at its first poll also looks the tool's latency record up,
//!   arms the timer, reads the clock again and records its latency.
//! - `toolwarden_fixed_delay`: the same with `percentile(None)` (no latency
//!   record).
//! - `toolwarden_by_catalog` (overhead groups only): the defaults, the
//!   tools hedgeable because a trusted catalog calls them read-only and
//!   idempotent, with no override: a tool's latency record is then looked
//!   up in the layer's bounded map (a tool with an override keeps its
//!   record beside the override, found by the override's lookup).
//! - `toolwarden_not_hedgeable`: a tool that is not safe to send twice: the
//!   call passes through (the policy lookup only).
//! - `tower_resilience`: tower-resilience 0.13's `HedgeLayer` (delay
//!   100 ms, 2 attempts; its future is boxed, its attempts in a
//!   `FuturesUnordered`).
//!
//! Group `hedge/answered_at_once`: the inner future is ready at its first
//! poll, so toolwarden never creates the hedge's timer. Group
//! `hedge/answered_after_a_yield`: the inner future is pending once (it
//! wakes itself at once), so both layers arm their timer on every call: the
//! cost of a call that goes through the runtime once, as a real upstream
//! call does.
//!
//! Groups `hedge/overhead_*` measure the added cost directly and more
//! steadily on a loaded machine: `layered - bare` per call, the two sides
//! run in alternating chunks ([`support::overhead_pair`]), each call driven
//! synchronously (`poll_ready`, `call`, polls with a no-op waker until it
//! answers, inside the runtime's context for the timers).

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use support::{overhead_pair, runtime_current_thread, Call, Reply};
use tokio::runtime::Runtime;
use toolwarden_core::{ToolAnnotations, ToolCatalog, ToolInfo};
use toolwarden_hedge::{HedgeBuilder, HedgeLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

const TOOLS: [&str; 4] = ["search", "fetch", "list_files", "get_weather"];

/// Times `iters` calls of `svc`, one after another, on one task.
fn run<S>(rt: &Runtime, svc: &S, requests: &[Call], iters: u64) -> Duration
where
    S: Service<Call> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut svc = svc.clone();
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let req = requests[i as usize % requests.len()];
            let ready = svc.ready().await.unwrap();
            black_box(ready.call(black_box(req)).await.unwrap());
        }
        start.elapsed()
    })
}

/// A future pending at its first poll (it wakes itself), ready at the next.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = Result<Reply, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.0 {
            return Poll::Ready(Ok(Reply));
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A trusted catalog that calls every bench tool read-only and idempotent:
/// the tools are hedgeable without an override, so their latency records
/// are in the layer's bounded map.
fn hedgeable_catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    for tool in TOOLS {
        catalog.insert(
            ToolInfo::new(tool, "bench tool").annotations(ToolAnnotations {
                read_only_hint: Some(true),
                idempotent_hint: Some(true),
                ..Default::default()
            }),
        );
    }
    catalog.set_trusted(true);
    catalog
}

fn hedgeable(mut b: HedgeBuilder) -> HedgeBuilder {
    for tool in TOOLS {
        b = b.tool(tool, |t| t.safe_to_hedge(true));
    }
    b
}

fn group<S>(c: &mut Criterion, name: &str, bare: S)
where
    S: Service<Call, Response = Reply, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let rt = runtime_current_thread();
    let requests: Vec<Call> = TOOLS.into_iter().map(|tool| Call { tool }).collect();
    let toolwarden = hedgeable(HedgeLayer::builder())
        .build()
        .unwrap()
        .layer(bare.clone());
    let fixed = hedgeable(HedgeLayer::builder().percentile(None))
        .build()
        .unwrap()
        .layer(bare.clone());
    let not_hedgeable = HedgeLayer::new().layer(bare.clone());
    let resilience = tower_resilience::hedge::HedgeLayer::builder()
        .delay(Duration::from_millis(100))
        .max_hedged_attempts(2)
        .build()
        .layer(bare.clone());

    // The variants are what they say: the tools are hedgeable but for
    // `not_hedgeable`, and every variant answers.
    let probe = Call { tool: "search" };
    assert!(!HedgeLayer::new().is_hedged(&probe));
    assert!(hedgeable(HedgeLayer::builder())
        .build()
        .unwrap()
        .is_hedged(&probe));
    run(&rt, &toolwarden, &requests, 8);
    run(&rt, &fixed, &requests, 8);
    run(&rt, &not_hedgeable, &requests, 8);
    run(&rt, &resilience, &requests, 8);

    let mut group = c.benchmark_group(name);
    group.bench_function("bare", |b| b.iter_custom(|n| run(&rt, &bare, &requests, n)));
    group.bench_function("toolwarden", |b| {
        b.iter_custom(|n| run(&rt, &toolwarden, &requests, n))
    });
    group.bench_function("toolwarden_fixed_delay", |b| {
        b.iter_custom(|n| run(&rt, &fixed, &requests, n))
    });
    group.bench_function("toolwarden_not_hedgeable", |b| {
        b.iter_custom(|n| run(&rt, &not_hedgeable, &requests, n))
    });
    group.bench_function("tower_resilience", |b| {
        b.iter_custom(|n| run(&rt, &resilience, &requests, n))
    });
    group.finish();
}

/// One call driven synchronously: `poll_ready`, `call`, then polls until
/// the answer (the inner futures wake themselves; nothing else waits).
fn drive<S>(svc: &mut S, request: Call) -> Reply
where
    S: Service<Call, Response = Reply>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("the bench services are always ready, got {other:?}"),
    }
    let mut future = pin!(svc.call(request));
    for _ in 0..16 {
        if let Poll::Ready(result) = future.as_mut().poll(&mut cx) {
            return result.unwrap();
        }
    }
    panic!("the bench services answer by their second poll")
}

fn overhead<S>(c: &mut Criterion, name: &str, bare: S)
where
    S: Service<Call, Response = Reply, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let rt = runtime_current_thread();
    let _context = rt.enter();
    let mut toolwarden = hedgeable(HedgeLayer::builder())
        .build()
        .unwrap()
        .layer(bare.clone());
    let mut fixed = hedgeable(HedgeLayer::builder().percentile(None))
        .build()
        .unwrap()
        .layer(bare.clone());
    let mut by_catalog = HedgeLayer::builder()
        .catalog(hedgeable_catalog())
        .build()
        .unwrap()
        .layer(bare.clone());
    assert!(HedgeLayer::builder()
        .catalog(hedgeable_catalog())
        .build()
        .unwrap()
        .is_hedged(&Call { tool: "search" }));
    let mut resilience = tower_resilience::hedge::HedgeLayer::builder()
        .delay(Duration::from_millis(100))
        .max_hedged_attempts(2)
        .build()
        .layer(bare.clone());
    let (mut b1, mut b2, mut b3, mut b4) = (bare.clone(), bare.clone(), bare.clone(), bare);
    let mut i = 0usize;
    let mut next = move || {
        i = i.wrapping_add(1);
        Call {
            tool: TOOLS[i % TOOLS.len()],
        }
    };
    let mut next2 = next;
    let mut next3 = next;
    let mut next4 = next;
    let mut group = c.benchmark_group(name);
    let mut ours = overhead_pair(
        || {
            black_box(drive(&mut b1, black_box(Call { tool: "search" })));
        },
        || {
            black_box(drive(&mut toolwarden, black_box(next())));
        },
    );
    group.bench_function("toolwarden", |b| b.iter_custom(&mut ours));
    let mut ours_fixed = overhead_pair(
        || {
            black_box(drive(&mut b3, black_box(Call { tool: "search" })));
        },
        || {
            black_box(drive(&mut fixed, black_box(next3())));
        },
    );
    group.bench_function("toolwarden_fixed_delay", |b| b.iter_custom(&mut ours_fixed));
    let mut ours_catalog = overhead_pair(
        || {
            black_box(drive(&mut b4, black_box(Call { tool: "search" })));
        },
        || {
            black_box(drive(&mut by_catalog, black_box(next4())));
        },
    );
    group.bench_function("toolwarden_by_catalog", |b| {
        b.iter_custom(&mut ours_catalog)
    });
    let mut theirs = overhead_pair(
        || {
            black_box(drive(&mut b2, black_box(Call { tool: "search" })));
        },
        || {
            black_box(drive(&mut resilience, black_box(next2())));
        },
    );
    group.bench_function("tower_resilience", |b| b.iter_custom(&mut theirs));
    group.finish();
}

fn bench_overhead(c: &mut Criterion) {
    let at_once = service_fn(|_req: Call| std::future::ready(Ok::<_, Infallible>(Reply)));
    overhead(c, "hedge/overhead_answered_at_once", at_once);
    let after_a_yield = service_fn(|_req: Call| YieldOnce(false));
    overhead(c, "hedge/overhead_answered_after_a_yield", after_a_yield);
}

fn bench_at_once(c: &mut Criterion) {
    let bare = service_fn(|_req: Call| std::future::ready(Ok::<_, Infallible>(Reply)));
    group(c, "hedge/answered_at_once", bare);
}

fn bench_after_a_yield(c: &mut Criterion) {
    let bare = service_fn(|_req: Call| YieldOnce(false));
    group(c, "hedge/answered_after_a_yield", bare);
}

criterion_group!(benches, bench_at_once, bench_after_a_yield, bench_overhead);
criterion_main!(benches);
