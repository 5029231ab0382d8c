//! The whole standard stack in interleaved rounds: a steadier second
//! opinion than `benches/stack.rs` on a machine whose speed moves by tens
//! of percent from one minute to the next (criterion measures each side
//! for seconds, one side after the other, and its medians move with it).
//!
//! Each round makes `CALLS` calls through every side in turn: on one task,
//! then on each of two tasks at once (a 2-worker runtime; the tasks call
//! distinct tools, as in `stack/two_tasks`). Load from elsewhere only ever
//! adds time, so per side it prints the **best** round's time per call
//! with one task (and the median round's), the added cost over the bare
//! service from the best rounds, and the **median** of the rounds' 2-task /
//! 1-task ratios of calls per second (each ratio from two runs made
//! moments apart). The sides are those of `benches/stack.rs`, then the
//! `toolwarden` side with each default layer left out in turn
//! (`toolwarden_without_LoopGuard`, ...), which shows what each layer
//! costs and where calls of two tasks wait for each other.
//!
//! The requests carry no session key, so the two tasks are one session
//! (one agent calling two tools at once): the loop guard's history of
//! that session, its lock and its reference count, are written by both on
//! every call. A last line measures the `toolwarden` side again with each
//! task's requests in a session of its own (two agents, as two MCP
//! sessions through the proxy are).
//!
//! ```text
//! cargo bench -p toolwarden-workspace --bench stack_rounds -- --rounds 31
//! cargo bench -p toolwarden-workspace --bench stack_rounds -- --rounds 31 --side toolwarden
//! ```
//!
//! `--side NAME` keeps `bare` and the sides whose name contains NAME.
//! Without `--rounds` (what `cargo test --benches` runs) each side makes a
//! few calls on two tasks, and they are checked answered.

use std::time::{Duration, Instant};

mod support;
use support::stack::{flag_value, requests, sequential, sides, toolwarden_defaults_without, Svc};
use toolwarden::stack::StackLayer;
use toolwarden_core::jsonrpc::Request;
use toolwarden_core::{McpRequest as _, SessionKey};

/// Calls per task in a round.
const CALLS: u64 = 20_000;

fn main() {
    let runtime = support::runtime_2_workers();
    let _guard = runtime.enter();
    let per_task = [requests(0), requests(4)];
    let per_session = [
        in_session(requests(0), "agent-a"),
        in_session(requests(4), "agent-b"),
    ];
    let mut all = runtime.block_on(async { all_sides() });
    let Some(rounds) = flag_value("--rounds").and_then(|n| n.parse::<usize>().ok()) else {
        for (_, service) in &all {
            runtime.block_on(tasks(service, &per_task, 2, 10));
        }
        println!("stack_rounds: run it with --rounds N [--side NAME] (see its docs)");
        return;
    };
    if let Some(only) = flag_value("--side") {
        all.retain(|(name, _)| name == "bare" || name.contains(&only));
    }
    // Per side: one-task times per call, and 2-task / 1-task ratios.
    let mut one = vec![Vec::with_capacity(rounds); all.len()];
    let mut ratios = vec![Vec::with_capacity(rounds); all.len()];
    let sessions_side = all.iter().position(|(name, _)| name == "toolwarden");
    let mut sessions_ratios = Vec::with_capacity(rounds);
    let ratio = |service: &Svc, requests: &[Vec<Request>; 2]| {
        let [alone, two] = [1usize, 2].map(|n| {
            let took = runtime.block_on(tasks(service, requests, n, CALLS));
            took.as_nanos() as f64 / (CALLS as f64 * n as f64)
        });
        (alone, alone / two)
    };
    for _ in 0..rounds.max(1) {
        for (s, (_, service)) in all.iter().enumerate() {
            let (alone, two_over_one) = ratio(service, &per_task);
            one[s].push(alone);
            ratios[s].push(two_over_one);
            if Some(s) == sessions_side {
                sessions_ratios.push(ratio(service, &per_session).1);
            }
        }
    }
    let best = |times: &[f64]| times.iter().copied().fold(f64::MAX, f64::min);
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let bare = best(&one[0]);
    println!(
        "{} rounds of {CALLS} calls per task and side",
        rounds.max(1)
    );
    println!("side: one task best (median) ns per call, added over bare (best), two tasks / one task (median)");
    for (s, (name, _)) in all.iter().enumerate() {
        let alone = best(&one[s]);
        println!(
            "{name}: {alone:.0} ({:.0}) ns, +{:.0} ns, {:.2}x",
            median(&mut one[s]),
            alone - bare,
            median(&mut ratios[s]),
        );
    }
    if !sessions_ratios.is_empty() {
        println!(
            "toolwarden, a session per task: two tasks / one task (median) {:.2}x",
            median(&mut sessions_ratios)
        );
    }
}

/// `requests`, each in session `session` (its loop-guard history).
fn in_session(mut requests: Vec<Request>, session: &str) -> Vec<Request> {
    for request in &mut requests {
        request.insert_extension(SessionKey::from(session));
    }
    requests
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
async fn tasks(service: &Svc, per_task: &[Vec<Request>; 2], n: usize, calls: u64) -> Duration {
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
