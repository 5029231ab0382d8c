//! The distributed limiter against the local one, and breaker propagation
//! between two replicas, against a real `redis-server` started here
//! (`TOOLWARDEN_REDIS_SERVER`, else `redis-server` on PATH).
//!
//! Run: `cargo bench --bench redis`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter};
use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use toolwarden_core::Events;
use toolwarden_redis::{
    quota, Decision, Fallback, RedisBreakerSync, RedisConfig, RedisRateLimiter, RemoteOpenPolicy,
};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> (Server, String) {
    let bin = std::env::var("TOOLWARDEN_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (set TOOLWARDEN_REDIS_SERVER or put it on PATH)");
    let server = Server(child);
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).unwrap();
    for _ in 0..200 {
        if client.get_connection().is_ok() {
            return (server, url);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server did not start");
}

fn config(url: &str, replica: &str) -> RedisConfig {
    RedisConfig::builder(url)
        .replica_id(replica)
        .op_timeout(Duration::from_millis(200))
        .events(Events::new())
        .build()
        .unwrap()
}

fn bench_limiter(c: &mut Criterion) {
    let (_server, url) = start_redis();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A quota nothing here exhausts: every check is a full admission.
    let q = quota(Duration::from_nanos(1), 1_000_000).unwrap();
    let local = RateLimiter::direct(Quota::per_second(
        std::num::NonZeroU32::new(1_000_000_000).unwrap(),
    ));
    let limiter = rt.block_on(async {
        let l = RedisRateLimiter::new(config(&url, "bench"), Fallback::Deny, q).unwrap();
        while !l.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        l
    });
    let mut group = c.benchmark_group("redis/limiter");
    group.bench_function("local_governor_check", |b| {
        b.iter(|| black_box(local.check()))
    });
    group.bench_function("distributed_check", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let d = limiter.decide(black_box("search"), q).await;
                    assert_eq!(d, Decision::Allowed);
                }
                start.elapsed()
            })
        })
    });
    // Throughput with 8 checks in flight: time per check = wall time / checks.
    group.bench_function("distributed_check_8_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                let per_task = iters.div_ceil(8);
                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        let limiter = limiter.clone();
                        tokio::spawn(async move {
                            for _ in 0..per_task {
                                black_box(limiter.decide("search", q).await);
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * 8) as f64)
            })
        })
    });
    group.finish();
}

fn bench_propagation(c: &mut Criterion) {
    let (_server, url) = start_redis();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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
            "redis/breaker_open_propagation: {} samples, p50 {:?}, p99 {:?}, max {:?}",
            samples.len(),
            at(0.5),
            at(0.99),
            samples[samples.len() - 1]
        );
    }
}

criterion_group!(benches, bench_limiter, bench_propagation);
criterion_main!(benches);
