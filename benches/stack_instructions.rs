//! Instructions per call through the whole standard stack, next to the
//! bare service and tower-resilience's stack (the sides of
//! `benches/stack.rs`): a steadier second opinion than the timings, as
//! instruction counts do not depend on the machine's load.
//!
//! The binary makes 1 000 warm-up calls and then `N` calls through one
//! side, in `measured_calls`; run it under callgrind twice, counting only
//! inside that function, with `N` = 0 and `N` = 20 000, and divide the
//! difference by 20 000:
//!
//! ```text
//! cargo bench --bench stack_instructions --no-run
//! bin=$(ls -t target/release/deps/stack_instructions-* | grep -v '\.d$' | head -1)
//! for side in bare toolwarden tower_resilience; do
//!   for n in 0 20000; do
//!     valgrind --tool=callgrind --callgrind-out-file=/dev/null '--toggle-collect=*measured_calls*' \
//!       "$bin" --side "$side" --calls "$n" 2>&1 | grep Collected
//!   done
//! done
//! ```
//!
//! Counting the whole run instead adds the one-time setup, which is not
//! the same from run to run: the clock's TSC calibration (quanta) reads
//! the clock for a time, not a number of times, and moved the per-call
//! figure by up to ±120 instructions.
//!
//! Without `--side` (what `cargo test --benches` and `cargo bench` run) it
//! makes a few calls through every side and checks that they are answered.

mod support;
use support::stack::{flag_value, requests, sequential, sides};

fn main() {
    let runtime = support::runtime_current_thread();
    let _guard = runtime.enter();
    let sides = runtime.block_on(async { sides() });
    let requests = requests(0);
    let Some(side) = flag_value("--side") else {
        for (_, service) in &sides {
            runtime.block_on(sequential(service, &requests, 10));
        }
        println!(
            "stack_instructions: run it under callgrind with --side NAME --calls N (see its docs)"
        );
        return;
    };
    let calls: u64 = flag_value("--calls")
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    #[allow(clippy::expect_used)]
    let (_, service) = sides
        .iter()
        .find(|(name, _)| *name == side)
        .expect("--side is one of bare, toolwarden, tower_resilience");
    runtime.block_on(sequential(service, &requests, 1_000));
    measured_calls(&runtime, service, &requests, calls);
}

/// The calls counted: callgrind's `--toggle-collect=*measured_calls*`
/// counts only what runs in here (see the module docs).
#[inline(never)]
fn measured_calls(
    runtime: &tokio::runtime::Runtime,
    service: &support::stack::Svc,
    requests: &[toolwarden_core::jsonrpc::Request],
    calls: u64,
) {
    runtime.block_on(sequential(service, requests, calls));
}
