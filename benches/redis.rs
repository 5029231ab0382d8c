//! The distributed limiter against the local one, and breaker propagation
//! between two replicas, against a real `redis-server` started here
//! (`TOOLWARDEN_REDIS_SERVER`, else `redis-server` on PATH), in one run.
//!
//! Run: `cargo bench --bench redis`
//!
//! - `redis/limiter`: one admission check, local (bare governor, and
//!   toolwarden's `RateLimits`) against the Redis GCRA script, one at a
//!   time (latency) and with 8 in flight (throughput).
//! - `redis/layer`: `RateLimitLayer` end to end (poll_ready + call + await
//!   over a service that answers at once), local against the Redis backend.
//! - `redis/breaker_open_propagation`: a forced open on replica a until
//!   replica b sees it open, through Redis pub/sub; p50/p99 are printed.
//!
//! Every quota is generous (nothing is refused: a refusal would panic), so
//! what is measured is the cost of admitting a call. Criterion reports
//! calls per second as "elem/s".

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../crates/redis/tests/support/mod.rs"]
mod redis_support;
mod support;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use governor::{Quota, RateLimiter};
use redis_support::RedisServer;
use support::{runtime_2_workers, unit_service, Call, TOOLS};
use tokio::runtime::Runtime;
use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use toolwarden_core::Events;
use toolwarden_rate_limit::{Rate, RateLimitBuilder, RateLimitLayer};
use toolwarden_redis::{
    quota, Decision, Fallback, RedisBreakerSync, RedisConfig, RedisRateLimiter, RemoteOpenPolicy,
};
use tower::{Layer, Service, ServiceExt};

/// Checks in flight in the throughput benchmarks.
const IN_FLIGHT: u64 = 8;

/// A `redis-server` started by the shared test helper (killed when dropped),
/// with its URL. Needs a runtime: the helper waits for `PING` asynchronously.
fn start_redis(rt: &Runtime) -> (RedisServer, String) {
    let bin = std::env::var_os("TOOLWARDEN_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"));
    let server = rt.block_on(RedisServer::start(&bin));
    let url = server.url();
    (server, url)
}

fn config(url: &str, replica: &str) -> RedisConfig {
    RedisConfig::builder(url)
        .replica_id(replica)
        .op_timeout(Duration::from_millis(200))
        .events(Events::new())
        .build()
        .unwrap()
}

/// A limiter on `url`, connected. `Fallback::Deny`: a Redis failure shows
/// up as a refusal, which panics, instead of a fast fake admission.
fn connected_limiter(rt: &Runtime, url: &str) -> RedisRateLimiter {
    let q = quota(Duration::from_secs(1), 1).unwrap();
    rt.block_on(async {
        let l = RedisRateLimiter::new(config(url, "bench"), Fallback::Deny, q).unwrap();
        while !l.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        l
    })
}

fn call(i: u64) -> Call {
    Call {
        tool: TOOLS[(i % TOOLS.len() as u64) as usize],
    }
}

/// A burst that takes a second to refill at one call per nanosecond. The
/// window must be long: a worker thread preempted between its clock read and
/// its update (milliseconds on this loaded VM) sees the quota's state in its
/// future, and with a burst window shorter than the preemption it is refused.
const BURST: u32 = 1_000_000_000;

/// One call per nanosecond (one per µs in Redis, its resolution), burst
/// [`BURST`], per tool and global: nothing here is ever refused.
fn generous() -> RateLimitBuilder {
    let rate = Rate::new(1, Duration::from_nanos(1));
    RateLimitLayer::builder()
        .per_tool(rate, BURST)
        .global(rate, BURST)
}

/// Runs `iters` calls of `svc` split over `tasks` tasks; the wall time,
/// scaled to exactly `iters` calls.
fn drive<S>(rt: &Runtime, svc: &S, iters: u64, tasks: u64) -> Duration
where
    S: Service<Call> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    S::Response: Send,
{
    rt.block_on(async {
        let per_task = iters.div_ceil(tasks);
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let ready = svc.ready().await.unwrap();
                        black_box(ready.call(call(t + i)).await.unwrap());
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        start
            .elapsed()
            .mul_f64(iters as f64 / (per_task * tasks) as f64)
    })
}

fn bench_limiter(c: &mut Criterion) {
    let rt = runtime_2_workers();
    let (_server, url) = start_redis(&rt);
    let q = quota(Duration::from_nanos(1), BURST).unwrap();
    let governor = RateLimiter::direct(Quota::per_second(NonZeroU32::new(BURST).unwrap()));
    let limits = generous().build().unwrap().limits();
    let limiter = connected_limiter(&rt, &url);

    let mut group = c.benchmark_group("redis/limiter");
    group.throughput(Throughput::Elements(1));
    group.bench_function("local_governor_check", |b| {
        b.iter(|| black_box(governor.check()))
    });
    group.bench_function("local_toolwarden_check", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(limits.check(&black_box(call(i))))
        })
    });
    group.bench_function("distributed_check", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let d = limiter.decide(black_box(call(i).tool), q).await;
                    assert_eq!(d, Decision::Allowed);
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("distributed_check_8_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let per_task = iters.div_ceil(IN_FLIGHT);
                let start = Instant::now();
                let tasks: Vec<_> = (0..IN_FLIGHT)
                    .map(|t| {
                        let limiter = limiter.clone();
                        tokio::spawn(async move {
                            for i in 0..per_task {
                                let d = limiter.decide(call(t + i).tool, q).await;
                                assert_eq!(d, Decision::Allowed);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * IN_FLIGHT) as f64)
            })
        })
    });
    group.finish();
}

fn bench_layer(c: &mut Criterion) {
    let rt = runtime_2_workers();
    let (_server, url) = start_redis(&rt);
    let limiter = connected_limiter(&rt, &url);
    let local = generous().build().unwrap().layer(unit_service());
    let remote = generous()
        .backend(limiter)
        .build()
        .unwrap()
        .layer(unit_service());

    let mut group = c.benchmark_group("redis/layer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("local", |b| {
        b.iter_custom(|iters| drive(&rt, &local, iters, 1))
    });
    group.bench_function("redis_backend", |b| {
        b.iter_custom(|iters| drive(&rt, &remote, iters, 1))
    });
    group.bench_function("local_8_in_flight", |b| {
        b.iter_custom(|iters| drive(&rt, &local, iters, IN_FLIGHT))
    });
    group.bench_function("redis_backend_8_in_flight", |b| {
        b.iter_custom(|iters| drive(&rt, &remote, iters, IN_FLIGHT))
    });
    group.finish();
}

fn bench_propagation(c: &mut Criterion) {
    let rt = runtime_2_workers();
    let (_server, url) = start_redis(&rt);
    let (a, b) = rt.block_on(async {
        let make = |name: &str| {
            let sync =
                RedisBreakerSync::start(config(&url, name), RemoteOpenPolicy::Follow).unwrap();
            let layer = CircuitBreakerLayer::builder()
                .sync(Arc::new(sync.clone()))
                .build()
                .unwrap();
            sync.attach(layer.registry().clone());
            (sync, layer)
        };
        let a = make("a");
        let b = make("b");
        while a.0.stats().resyncs == 0 || b.0.stats().resyncs == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (a, b)
    });
    let (ra, rb) = (a.1.registry().clone(), b.1.registry().clone());
    let mut samples = Vec::new();
    c.bench_function("redis/breaker_open_propagation", |bencher| {
        bencher.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    ra.force_open("search");
                    while rb.state("search") != Some(CircuitState::Open) {
                        tokio::task::yield_now().await;
                    }
                    let took = start.elapsed();
                    samples.push(took);
                    total += took;
                    ra.force_close("search");
                    while rb.state("search") != Some(CircuitState::Closed) {
                        tokio::task::yield_now().await;
                    }
                }
                total
            })
        })
    });
    samples.sort();
    if !samples.is_empty() {
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
        println!(
            "redis/breaker_open_propagation: {} samples (warm-up included), p50 {:?}, p99 {:?}, max {:?}",
            samples.len(),
            at(0.5),
            at(0.99),
            samples[samples.len() - 1]
        );
    }
}

criterion_group!(benches, bench_limiter, bench_layer, bench_propagation);
criterion_main!(benches);
