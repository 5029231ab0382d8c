//! Two tasks against one through the whole standard stack, in paired
//! rounds: a steadier second opinion than `stack/two_tasks` in
//! `benches/stack.rs`, whose one-task and two-task figures are measured
//! minutes apart on a machine whose speed moves between them.
//!
//! Each round makes `N` calls on one task, then `N` calls on each of two
//! tasks at once (a 2-worker runtime; the tasks call distinct tools, as in
//! `stack/two_tasks`), and takes the ratio of their calls per second. The
//! median of the rounds' ratios is printed per side, with the best time of
//! each kind. The sides are those of `benches/stack.rs`, and the
//! `toolwarden` side with each layer left out in turn
//! (`toolwarden_without_LoopGuard`, ...), which shows where calls of two
//! tasks wait for each other.
//!
//! ```text
//! cargo bench -p toolwarden-workspace --bench stack_scaling -- --rounds 21
//! cargo bench -p toolwarden-workspace --bench stack_scaling -- --rounds 21 --side toolwarden
//! ```
//!
//! `--side NAME` keeps the sides whose name contains NAME. Without
//! `--rounds` (what `cargo test --benches` runs) each side makes a few
//! calls on two tasks, and they are checked answered.

use std::time::{Duration, Instant};

mod support;
use support::stack::{requests, sequential, sides, toolwarden_defaults_without, Svc};
use toolwarden::stack::StackLayer;

/// Calls per task in a round.
const CALLS: u64 = 30_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runtime = support::runtime_2_workers();
    let _guard = runtime.enter();
    let all = runtime.block_on(async { all_sides() });
    let per_task = [requests(0), requests(4)];
    let Some(rounds) = value("--rounds").and_then(|n| n.parse::<usize>().ok()) else {
        for (_, service) in &all {
            runtime.block_on(tasks(service, &per_task, 2, 10));
        }
        println!("stack_scaling: run it with --rounds N [--side NAME] (see its docs)");
        return;
    };
    let only = value("--side");
    for (name, service) in &all {
        if only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        let mut ratios = Vec::with_capacity(rounds);
        let mut best = [f64::MAX; 2];
        for _ in 0..rounds.max(1) {
            // Nanoseconds per call: one task's calls, then two tasks' calls.
            let per_call = [1usize, 2].map(|n| {
                let took = runtime.block_on(tasks(service, &per_task, n, CALLS));
                took.as_nanos() as f64 / (CALLS as f64 * n as f64)
            });
            best[0] = best[0].min(per_call[0]);
            best[1] = best[1].min(per_call[1]);
            ratios.push(per_call[0] / per_call[1]);
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        println!(
            "{name}: two tasks make {median:.2}x the calls per second of one \
             (median of {} paired rounds; best {:.0} ns per call with one task, \
             {:.0} ns with two)",
            ratios.len(),
            best[0],
            best[1],
        );
    }
}

/// The sides of `benches/stack.rs`, then the `toolwarden` side without
/// each of its default layers.
fn all_sides() -> Vec<(String, Svc)> {
    let without = [
        StackLayer::Observability,
        StackLayer::LoopGuard,
        StackLayer::FallbackCache,
        StackLayer::Retry,
        StackLayer::RateLimit,
        StackLayer::CircuitBreaker,
    ]
    .map(|layer| {
        (
            format!("toolwarden_without_{layer:?}"),
            toolwarden_defaults_without(Some(layer)),
        )
    });
    sides()
        .into_iter()
        .map(|(name, service)| (name.to_owned(), service))
        .chain(without)
        .collect()
}

/// `calls` calls on each of `n` tasks at once (task `t` with
/// `per_task[t]`'s requests); how long until the last one was answered.
async fn tasks(
    service: &Svc,
    per_task: &[Vec<toolwarden_core::jsonrpc::Request>; 2],
    n: usize,
    calls: u64,
) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = per_task
        .iter()
        .take(n)
        .map(|requests| {
            let (service, requests) = (service.clone(), requests.clone());
            tokio::spawn(async move { sequential(&service, &requests, calls).await })
        })
        .collect();
    for handle in handles {
        handle.await.expect("a task");
    }
    start.elapsed()
}
