//! Allocations per call through the whole standard stack, next to the
//! bare service and tower-resilience's stack (the sides of
//! `benches/stack.rs`), counted by a counting global allocator
//! (stats_alloc) on the happy path after a warm-up, and printed.
//!
//! Run: `cargo bench --bench stack_allocations` (counts do not depend on the
//! machine's load). Without `--bench` it counts fewer calls, and checks
//! every side's answers.

use std::alloc::System;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use toolwarden_core::McpResponse;
use tower::ServiceExt;

mod support;
use support::stack::{requests, sequential, sides, toolwarden_stack_without, Svc};
use toolwarden::stack::StackLayer;

/// Counts every allocation the process makes.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations per call on the happy path, after a warm-up (caches,
/// per-tool state and metric handles exist).
fn allocations_per_call(
    runtime: &tokio::runtime::Runtime,
    service: &Svc,
    requests: &[toolwarden_core::jsonrpc::Request],
    calls: u64,
) -> f64 {
    runtime.block_on(sequential(service, requests, 512));
    let region = Region::new(GLOBAL);
    runtime.block_on(sequential(service, requests, calls));
    let stats = region.change();
    // The requests cloned for each call are the caller's, not the stack's:
    // every side clones them alike, so they cancel in the difference to bare.
    (stats.allocations + stats.reallocations) as f64 / calls as f64
}

fn main() {
    let calls = if std::env::args().any(|a| a == "--bench") {
        4096
    } else {
        256
    };
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
        .map(|(name, service)| {
            (
                *name,
                allocations_per_call(&runtime, service, &requests, calls),
            )
        })
        .collect();
    // Each layer alone (the others left out; the attempt timeout and the
    // error rendering stay): where the stack's allocations come from.
    let layers = StackLayer::ALL;
    let alone: Vec<(String, f64)> = std::iter::once(("no layer".to_owned(), layers.to_vec()))
        .chain(layers.iter().map(|keep| {
            let others = layers.iter().copied().filter(|l| l != keep).collect();
            (format!("only {keep}"), others)
        }))
        .map(|(name, left_out): (String, Vec<StackLayer>)| {
            let service = runtime.block_on(async { toolwarden_stack_without(&left_out) });
            let count = allocations_per_call(&runtime, &service, &requests, calls);
            (name, count)
        })
        .collect();
    let bare = counts[0].1;
    println!("\nallocations per call (happy path, after warm-up):");
    for (name, count) in &counts {
        println!(
            "  {name:<22} {count:>7.2}   ({:+.2} over bare)",
            count - bare
        );
    }
    println!("the standard stack with one layer (plus its attempt timeout and error rendering):");
    for (name, count) in &alone {
        println!(
            "  {name:<22} {count:>7.2}   ({:+.2} over bare)",
            count - bare
        );
    }
}
