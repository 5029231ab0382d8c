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
//!
//! On a machine whose speed moves while criterion measures one side after
//! the other, `benches/stack_rounds.rs` gives a steadier second opinion:
//! every side in each of many short interleaved rounds, the best round per
//! side, and the 2-task / 1-task ratio of each round's two runs made moments
//! apart. Instructions per call (steadier still, but blind to what a
//! clock read or a copy costs in time) come from
//! `benches/stack_instructions.rs` under callgrind.
//!
//! Allocations per call are counted by `benches/stack_allocations.rs`, a
//! binary of its own: a counting allocator's shared counters would distort
//! the timings here (two tasks allocating at once contend on them).
//!
//! Without `--bench` (what `cargo test --benches` passes) each side makes
//! one call per benchmark, which `sequential` checks.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

mod support;
use support::stack::{requests, sequential, sides};

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

criterion_group!(benches, bench_one_task, bench_two_tasks);
criterion_main!(benches);
