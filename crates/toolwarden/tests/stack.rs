//! The standard stack as a whole: the layers in order, sharing one catalog,
//! one event hook and one breaker registry, over a scripted MCP server.

#![cfg(feature = "stack")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use toolwarden::stack::{StackLayer, StandardStack};
use toolwarden_circuit_breaker::{CircuitState, TimeWindow};
use toolwarden_core::jsonrpc::{ErrorObject, Id, Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{McpResponse, ToolAnnotations, ToolCatalog, ToolInfo};
use toolwarden_rate_limit::Rate;
use tower::{Layer, Service, ServiceExt};

fn catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    let read_only = ToolAnnotations {
        read_only_hint: Some(true),
        ..Default::default()
    };
    let destructive = ToolAnnotations {
        destructive_hint: Some(true),
        ..Default::default()
    };
    catalog.insert(ToolInfo::new("search_docs", "Search the documentation").annotations(read_only));
    catalog.insert(ToolInfo::new("web_search", "Search the web for pages").annotations(read_only));
    catalog.insert(ToolInfo::new("delete_record", "Delete a record").annotations(destructive));
    catalog.set_trusted(true);
    catalog
}

async fn call<S>(svc: &mut S, id: i64, tool: &str, args: serde_json::Value) -> Response
where
    S: Service<Request, Response = Response>,
    S::Error: std::fmt::Debug,
{
    svc.ready()
        .await
        .unwrap()
        .call(Request::tool_call(id, tool, args))
        .await
        .unwrap()
}

#[test]
fn contradicting_knobs_are_refused_naming_the_fields() {
    let cases = [
        (
            StandardStack::builder().attempt_timeout(Duration::ZERO),
            "attempt_timeout",
        ),
        (
            StandardStack::builder()
                .attempt_timeout(Duration::from_secs(40))
                .retry_deadline(Duration::from_secs(30)),
            "attempt_timeout, retry.deadline",
        ),
        (
            StandardStack::builder()
                .attempt_timeout(Duration::from_secs(10))
                .breaker_time_window(TimeWindow::new(Duration::from_secs(15), 10)),
            "circuit_breaker.time_window, attempt_timeout",
        ),
        (
            StandardStack::builder()
                .attempt_timeout(Duration::from_secs(2))
                .slow_call_duration(Duration::from_secs(3)),
            "circuit_breaker.slow_call_duration, attempt_timeout",
        ),
        (
            StandardStack::builder()
                .retry_deadline(Duration::from_secs(10))
                .rate_limit(|b| {
                    b.mode(toolwarden_rate_limit::Mode::Wait {
                        max_wait: Duration::from_secs(10),
                    })
                }),
            "rate_limit.mode.max_wait, retry.deadline",
        ),
    ];
    for (builder, field) in cases {
        assert_eq!(builder.build().unwrap_err().field(), field);
    }
    // A layer's own validation still names its field, in its section.
    let err = StandardStack::builder()
        .circuit_breaker(|b| b.half_open_max_calls(0))
        .build()
        .unwrap_err();
    assert!(
        err.field().contains("half_open_max_calls"),
        "{}",
        err.field()
    );
}

#[tokio::test(start_paused = true)]
async fn a_read_only_tool_is_retried_and_served_stale_once_its_circuit_opens() {
    let mock = MockMcp::new()
        .script("search_docs", [Step::ok("tower retry docs")])
        .default_step("search_docs", Step::rpc_error(-32603, "database down"));
    let stack = StandardStack::builder()
        .catalog(catalog())
        .retry(|b| b.max_attempts(2).base_delay(Duration::from_millis(10)))
        .circuit_breaker(|b| {
            b.failure_threshold(4)
                .minimum_calls(4)
                .reset_timeout(Duration::from_secs(60))
        })
        .build()
        .unwrap();
    let mut svc = stack.layer(ReadyChecked::new(mock.clone()).pending_first());
    let args = json!({"query": "retry"});

    // A success is cached.
    let first = call(&mut svc, 1, "search_docs", args.clone()).await;
    assert_eq!(first.first_text().as_deref(), Some("tower retry docs"));

    // Failures. Call 2 tries twice (the tool is read-only and trusted, so it
    // is retried); call 3's first attempt is the breaker's 4th recorded call:
    // 3 failures of 4 is above the default 50 % rate, so it opens and
    // refuses call 3's second attempt before it reaches the server.
    for id in 2..4 {
        let resp = call(&mut svc, id, "search_docs", args.clone()).await;
        // The fallback cache answers with the last good result, marked stale.
        assert_eq!(resp.id, Id::Number(id));
        assert!(!resp.is_tool_error(), "{resp:?}");
        let result = resp.payload.unwrap();
        assert!(result["_meta"]["toolwarden/stale"].is_object(), "{result}");
    }
    assert_eq!(mock.calls("search_docs"), 1 + 2 + 1);
    assert_eq!(
        stack.registry().state("search_docs"),
        Some(CircuitState::Open)
    );

    // Open for 60 s, longer than the 30 s retry deadline: the retry layer
    // does not wait for the probe, nothing reaches the server, and the
    // stale answer still comes.
    let resp = call(&mut svc, 9, "search_docs", args.clone()).await;
    assert!(resp.payload.unwrap()["_meta"]["toolwarden/stale"].is_object());
    assert_eq!(mock.calls("search_docs"), 4);

    let stats = stack.stats().snapshot();
    let json = serde_json::to_value(&stats).unwrap();
    assert!(json.to_string().contains("search_docs"), "{json}");
}

#[tokio::test(start_paused = true)]
async fn a_destructive_tool_is_not_retried_and_its_failure_is_readable() {
    let mock = MockMcp::new().default_step("delete_record", Step::rpc_error(-32603, "disk error"));
    let stack = StandardStack::builder()
        .catalog(catalog())
        .retry(|b| b.max_attempts(3))
        .build()
        .unwrap();
    let mut svc = stack.layer(mock.clone());
    let resp = call(&mut svc, 1, "delete_record", json!({"id": 7})).await;
    assert_eq!(mock.calls("delete_record"), 1, "never retried");
    // Nothing cached to fall back on: the fallback cache degrades the
    // server's error into a structured result the model can read.
    assert!(resp.is_tool_error());
    let facts = &resp.payload.unwrap()["structuredContent"]["toolwarden"];
    assert_eq!(facts["class"], "server");
    assert!(
        facts["error"].as_str().unwrap().contains("-32603"),
        "{facts}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unknown_tool_never_trips_the_breaker() {
    let mock = MockMcp::new().default_step(
        "nope",
        Step::tool_error("MCP error -32602: Tool nope not found"),
    );
    let stack = StandardStack::builder()
        .catalog(catalog())
        .circuit_breaker(|b| b.failure_threshold(2).minimum_calls(2))
        .loop_guard(|b| b.tool("nope", |b| b.exempt(true)))
        .build()
        .unwrap();
    let mut svc = stack.layer(mock.clone());
    for id in 0..10 {
        let resp = call(&mut svc, id, "nope", json!({})).await;
        assert!(resp.is_tool_error());
    }
    assert_eq!(
        mock.calls("nope"),
        10,
        "client errors are neither retried nor refused"
    );
    assert_ne!(stack.registry().state("nope"), Some(CircuitState::Open));
}

#[tokio::test(start_paused = true)]
async fn a_looping_agent_is_stopped_with_a_readable_answer() {
    let mock = MockMcp::new().default_step("web_search", Step::tool_error("invalid query syntax"));
    let stack = StandardStack::builder().catalog(catalog()).build().unwrap();
    let mut svc = stack.layer(mock.clone());
    let args = json!({"q": "(("});
    for id in 0..3 {
        let resp = call(&mut svc, id, "web_search", args.clone()).await;
        assert!(resp.is_tool_error());
    }
    // The 4th identical failing call is blocked before it reaches the server.
    let blocked = call(&mut svc, 4, "web_search", args).await;
    assert!(blocked.is_tool_error());
    let text = blocked.first_text().unwrap().into_owned();
    assert!(text.contains("change approach"), "{text}");
    assert_eq!(mock.calls("web_search"), 3);
}

#[tokio::test(start_paused = true)]
async fn other_methods_pass_through() {
    let mock = MockMcp::new();
    let stack = StandardStack::builder().build().unwrap();
    let resp = stack
        .layer(mock.clone())
        .oneshot(Request::new(5, "tools/list", None))
        .await
        .unwrap();
    assert_eq!(resp, Response::result(Id::Number(5), json!({})));
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_attempt_times_out_and_counts_for_the_breaker() {
    let mock = MockMcp::new().default_step("web_search", Step::Hang);
    let stack = StandardStack::builder()
        .catalog(catalog())
        .attempt_timeout(Duration::from_secs(1))
        .retry_deadline(Duration::from_secs(5))
        .retry(|b| b.max_attempts(1))
        .circuit_breaker(|b| b.failure_threshold(1).minimum_calls(1))
        .fallback_cache(|b| b.degrade(true))
        .build()
        .unwrap();
    let mut svc = stack.layer(mock.clone());
    let resp = call(&mut svc, 1, "web_search", json!({"q": "x"})).await;
    assert!(resp.is_tool_error(), "a timeout becomes a readable failure");
    assert_eq!(
        stack.registry().state("web_search"),
        Some(CircuitState::Open)
    );
    assert_eq!(mock.in_flight(), 0, "the timed-out attempt was dropped");
}

#[tokio::test(start_paused = true)]
async fn layers_left_out_do_nothing_and_the_rest_still_work() {
    let mock = MockMcp::new().default_step("search_docs", Step::rpc_error(-32603, "database down"));
    let stack = StandardStack::builder()
        .catalog(catalog())
        .retry(|b| b.max_attempts(3).base_delay(Duration::from_millis(10)))
        .circuit_breaker(|b| b.failure_threshold(2).minimum_calls(2))
        .without(StackLayer::CircuitBreaker)
        .without(StackLayer::LoopGuard)
        .build()
        .unwrap();
    // The optional layers (issue 21) are out unless configured.
    assert_eq!(
        stack.left_out(),
        // Hedging, the bulkhead and coalescing are never configured here:
        // they are left out too.
        [
            StackLayer::LoopGuard,
            StackLayer::Coalesce,
            StackLayer::Hedge,
            StackLayer::Bulkhead,
            StackLayer::CircuitBreaker
        ]
    );
    let mut svc = stack.layer(ReadyChecked::new(mock.clone()).pending_first());
    // Identical failing calls: with the breaker (threshold 2) and the loop
    // guard (4th blocked) in, the server would see far fewer than 3 per call.
    for id in 0..6 {
        let resp = call(&mut svc, id, "search_docs", json!({"query": "x"})).await;
        assert!(resp.is_tool_error(), "{resp:?}");
    }
    assert_eq!(mock.calls("search_docs"), 6 * 3, "retried, never refused");
    assert!(stack.registry().is_empty(), "no breaker was ever consulted");

    // Without retry, a retryable failure is attempted once; the breaker,
    // back in, opens after its two failures.
    let mock = MockMcp::new().default_step("search_docs", Step::rpc_error(-32603, "database down"));
    let stack = StandardStack::builder()
        .catalog(catalog())
        .circuit_breaker(|b| b.failure_threshold(2).minimum_calls(2))
        .without(StackLayer::Retry)
        .build()
        .unwrap();
    let mut svc = stack.layer(mock.clone());
    for id in 0..3 {
        call(&mut svc, id, "search_docs", json!({"query": id})).await;
    }
    assert_eq!(mock.calls("search_docs"), 2, "the third call was refused");
    assert_eq!(
        stack.registry().state("search_docs"),
        Some(CircuitState::Open)
    );
}

#[test]
fn knobs_of_a_left_out_layer_are_not_cross_checked() {
    use toolwarden::stack::StackLayer;
    let built = StandardStack::builder()
        .attempt_timeout(Duration::from_secs(40))
        .retry_deadline(Duration::from_secs(30))
        .without(StackLayer::Retry)
        .build();
    assert!(built.is_ok(), "{built:?}");
    let refused = StandardStack::builder()
        .attempt_timeout(Duration::from_secs(2))
        .slow_call_duration(Duration::from_secs(3))
        .without(StackLayer::Retry)
        .build();
    assert_eq!(
        refused.unwrap_err().field(),
        "circuit_breaker.slow_call_duration, attempt_timeout"
    );
}

// Issue 15: `.retry(|b| b.deadline(..))` was silently replaced by the
// stack's `retry_deadline`. Now the closure's deadline is the stack's when
// only it is set, and two different deadlines are refused.
#[tokio::test(start_paused = true)]
async fn regression_15_the_retry_closures_deadline_is_respected_or_refused() {
    // Only the closure sets it: a 60 s attempt fits its 90 s deadline.
    let stack = StandardStack::builder()
        .attempt_timeout(Duration::from_secs(60))
        .retry(|b| b.deadline(Duration::from_secs(90)))
        .build()
        .unwrap();
    let mut svc = stack.layer(ReadyChecked::new(
        MockMcp::new().script("slow", [Step::ok("done").after(Duration::from_secs(50))]),
    ));
    let answer = call(&mut svc, 1, "slow", json!({})).await;
    assert!(!answer.is_tool_error(), "the closure's deadline applied");

    // Both, the same: fine. Both, different: refused, naming both.
    assert!(StandardStack::builder()
        .retry_deadline(Duration::from_secs(20))
        .retry(|b| b.deadline(Duration::from_secs(20)))
        .build()
        .is_ok());
    let err = StandardStack::builder()
        .retry_deadline(Duration::from_secs(20))
        .retry(|b| b.deadline(Duration::from_secs(40)))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "retry_deadline, retry.deadline");
    // The attempt timeout is checked against the closure's deadline too.
    let err = StandardStack::builder()
        .attempt_timeout(Duration::from_secs(30))
        .retry(|b| b.deadline(Duration::from_secs(20)))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "attempt_timeout, retry.deadline");
}

mod extreme_configuration {
    use super::*;
    use proptest::prelude::*;

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            Just(Duration::from_nanos(1)),
            Just(Duration::from_secs(u64::MAX / 2)),
            (0u64..100_000).prop_map(Duration::from_millis),
            any::<u64>().prop_map(Duration::from_secs),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any duration for the stack's own knobs: `build()` answers Ok or
        /// a `ConfigError`, never a panic; a stack that builds answers calls.
        #[test]
        fn the_stack_builds_or_names_a_field_for_any_durations(
            attempt in duration(),
            deadline in duration(),
            window in prop::option::of(duration()),
            slow in prop::option::of(duration()),
        ) {
            let mut builder = StandardStack::builder().attempt_timeout(attempt).retry_deadline(deadline);
            if let Some(window) = window {
                builder = builder.breaker_time_window(TimeWindow::new(window, 10));
            }
            if let Some(slow) = slow {
                builder = builder.slow_call_duration(slow);
            }
            let Ok(stack) = builder.build() else {
                return Ok(());
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut svc = stack.layer(ReadyChecked::new(
                    MockMcp::new()
                        .script("t", [Step::closed(), Step::closed(), Step::closed(), Step::closed()]),
                ));
                for id in 0..6 {
                    let answer = call(&mut svc, id, "t", json!({})).await;
                    assert_eq!(answer.id, Id::Number(id));
                }
            });
        }
    }
}

/// A catalog whose `lookup` is read-only and idempotent (safe to hedge).
fn hedge_catalog() -> ToolCatalog {
    let catalog = catalog();
    let safe = ToolAnnotations {
        read_only_hint: Some(true),
        idempotent_hint: Some(true),
        ..Default::default()
    };
    catalog.insert(ToolInfo::new("lookup", "Look a record up").annotations(safe));
    catalog
}

#[tokio::test(start_paused = true)]
async fn hedging_is_off_unless_configured() {
    let mock = MockMcp::new().script("lookup", [Step::ok("slow").after(Duration::from_secs(5))]);
    let stack = StandardStack::builder()
        .catalog(hedge_catalog())
        .build()
        .unwrap();
    assert!(!stack.includes(StackLayer::Hedge));
    let mut svc = stack.layer(mock.clone());
    let resp = call(&mut svc, 1, "lookup", json!({})).await;
    assert_eq!(resp.first_text().as_deref(), Some("slow"));
    assert_eq!(mock.calls("lookup"), 1);
    // Configured, then left out: still off.
    let stack = StandardStack::builder()
        .hedge(|b| b)
        .without(StackLayer::Hedge)
        .build()
        .unwrap();
    assert!(!stack.includes(StackLayer::Hedge));
}

#[tokio::test(start_paused = true)]
async fn in_the_stack_a_slow_call_is_hedged_and_only_a_safe_tool() {
    let slow = Step::ok("slow").after(Duration::from_secs(5));
    let mock = MockMcp::new()
        .script("lookup", [slow.clone()])
        .script("search_docs", [slow]);
    let stack = StandardStack::builder()
        .catalog(hedge_catalog())
        .hedge(|b| b.delay(Duration::from_millis(50)))
        .build()
        .unwrap();
    assert!(stack.includes(StackLayer::Hedge));
    let mut svc = stack.layer(ReadyChecked::new(mock.clone()).pending_first());
    let resp = call(&mut svc, 1, "lookup", json!({})).await;
    assert_eq!(resp.id, Id::Number(1));
    assert_eq!(resp.first_text().as_deref(), Some("lookup ok"));
    assert_eq!(mock.calls("lookup"), 2);
    assert_eq!(mock.in_flight(), 0, "the slow copy was cancelled");
    // Read-only but not idempotent: retried after failures, never hedged.
    let resp = call(&mut svc, 2, "search_docs", json!({})).await;
    assert_eq!(resp.first_text().as_deref(), Some("slow"));
    assert_eq!(mock.calls("search_docs"), 1);
}

#[tokio::test(start_paused = true)]
async fn each_copy_of_a_hedged_call_is_counted_by_the_breaker_and_takes_a_token() {
    // Both copies fail slowly: the breaker, below the hedge, records two
    // failures for one call and opens (threshold 2).
    let failing = Step::rpc_error(-32603, "down").after(Duration::from_millis(100));
    let mock = MockMcp::new().default_step("lookup", failing);
    let stack = StandardStack::builder()
        .catalog(hedge_catalog())
        .hedge(|b| b.delay(Duration::from_millis(50)))
        .retry(|b| b.max_attempts(1))
        .circuit_breaker(|b| b.failure_threshold(2).minimum_calls(2))
        .build()
        .unwrap();
    let mut svc = stack.layer(mock.clone());
    let resp = call(&mut svc, 1, "lookup", json!({})).await;
    assert!(resp.is_tool_error());
    assert_eq!(mock.calls("lookup"), 2);
    assert_eq!(stack.registry().state("lookup"), Some(CircuitState::Open));

    // A quota of one call (burst 1, one per minute): the hedge is refused
    // by the rate limit below it and the first copy answers alone.
    let mock = MockMcp::new().script(
        "lookup",
        [Step::ok("slow").after(Duration::from_millis(200))],
    );
    let stack = StandardStack::builder()
        .catalog(hedge_catalog())
        .hedge(|b| b.delay(Duration::from_millis(50)))
        .rate_limit(|b| b.per_tool(toolwarden_rate_limit::Rate::per_minute(1), 1))
        .build()
        .unwrap();
    let mut svc = stack.layer(mock.clone());
    let resp = call(&mut svc, 1, "lookup", json!({})).await;
    assert_eq!(resp.first_text().as_deref(), Some("slow"));
    assert_eq!(mock.calls("lookup"), 1, "the hedge took no token: refused");
}

/// An upstream written as a closure, as most tower users write one: it
/// answers after `latency` (paused time), failing with a retryable JSON-RPC
/// error when asked to, and counts the calls it saw and the most it had in
/// flight at once.
fn closure_upstream(
    latency: Duration,
    fail: bool,
) -> (
    impl Service<Request, Response = Response, Error = toolwarden_core::BoxError, Future = impl Send>
        + Clone
        + Send
        + 'static,
    Arc<UpstreamCounts>,
) {
    let counts = Arc::new(UpstreamCounts::default());
    let seen = Arc::clone(&counts);
    let upstream = tower::service_fn(move |request: Request| {
        let counts = Arc::clone(&seen);
        async move {
            counts.calls.fetch_add(1, Ordering::SeqCst);
            let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            counts.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(latency).await;
            counts.in_flight.fetch_sub(1, Ordering::SeqCst);
            let id = request.id.clone();
            Ok(match fail {
                true => Response::error(id, ErrorObject::new(-32603, "database down")),
                false => Response::result(id, toolwarden_core::testing::text_result("found")),
            })
        }
    });
    (upstream, counts)
}

/// Three identical `search_docs` calls at once through `svc`: each caller
/// gets the upstream's answer with its own id.
async fn three_identical_calls_at_once<S>(svc: &S, query: &str)
where
    S: Service<Request, Response = Response> + Clone,
    S::Error: std::fmt::Debug,
{
    let ask = |id: i64| {
        svc.clone().oneshot(Request::tool_call(
            id,
            "search_docs",
            json!({"query": query}),
        ))
    };
    let (a, b, c) = tokio::join!(ask(0), ask(1), ask(2));
    for (id, answer) in (0..).zip([a, b, c]) {
        let resp = answer.unwrap();
        assert_eq!(resp.id, Id::Number(id));
        assert_eq!(resp.first_text().as_deref(), Some("found"));
    }
}

#[derive(Default)]
struct UpstreamCounts {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

// Every layer left out is its service passing calls through: nothing
// retried, refused, capped, shared, recorded. And the stack's type names
// each layer once, so the whole stack layered over a closure compiles in
// seconds; when each layer left out was an `Either` of its service and the
// one below, this test made rustc use more than 24 GB.
#[tokio::test(start_paused = true)]
async fn every_layer_left_out_passes_calls_through_untouched_over_a_closure() {
    let mut builder = StandardStack::builder()
        .catalog(catalog())
        .retry(|b| b.max_attempts(3).base_delay(Duration::from_millis(10)))
        .circuit_breaker(|b| b.failure_threshold(2).minimum_calls(2))
        .rate_limit(|b| b.per_tool(Rate::per_minute(1), 1))
        .bulkhead(|b| b.max_concurrent(1))
        .coalesce(|b| b)
        .hedge(|b| b.delay(Duration::from_millis(50)));
    for layer in StackLayer::ALL {
        builder = builder.without(layer);
    }
    let stack = builder.build().unwrap();
    assert_eq!(stack.left_out(), StackLayer::ALL);

    // Identical failing calls, one after the other: each reaches the
    // upstream once (no retry, no loop guard, no breaker opening, no quota
    // of one call a minute).
    let (upstream, counts) = closure_upstream(Duration::from_millis(10), true);
    let mut svc = stack.layer(upstream);
    for id in 0..6 {
        let resp = call(&mut svc, id, "search_docs", json!({"query": "x"})).await;
        assert_eq!(resp.id, Id::Number(id));
        // The upstream's JSON-RPC error as it sent it: no layer turned it
        // into a degraded result or a refusal.
        assert!(
            matches!(&resp.payload, Err(e) if e.code == -32603 && e.message == "database down"),
            "{resp:?}"
        );
    }
    assert_eq!(counts.calls.load(Ordering::SeqCst), 6);
    assert!(stack.registry().is_empty(), "no breaker was consulted");
    assert!(
        stack.stats().snapshot().tools.is_empty(),
        "nothing recorded"
    );

    // Identical calls at once: neither shared (coalescing) nor capped at
    // one (the bulkhead), nor hedged after 50 ms.
    let (upstream, counts) = closure_upstream(Duration::from_secs(1), false);
    let svc = stack.layer(upstream);
    three_identical_calls_at_once(&svc, "y").await;
    assert_eq!(counts.calls.load(Ordering::SeqCst), 3);
    assert_eq!(counts.max_in_flight.load(Ordering::SeqCst), 3);
}

// The same closure below the whole stack with every optional layer on:
// identical calls at once are shared (one upstream call), each caller
// answered with its own id.
#[tokio::test(start_paused = true)]
async fn the_whole_stack_over_a_closure_with_every_optional_layer_on() {
    let stack = StandardStack::builder()
        .catalog(catalog())
        .bulkhead(|b| b.max_concurrent(4))
        .coalesce(|b| b)
        .hedge(|b| b.delay(Duration::from_millis(50)))
        .build()
        .unwrap();
    assert!(stack.left_out().is_empty());
    let (upstream, counts) = closure_upstream(Duration::from_millis(20), false);
    let svc = stack.layer(upstream);
    three_identical_calls_at_once(&svc, "z").await;
    assert_eq!(counts.calls.load(Ordering::SeqCst), 1, "shared");
    let snapshot = stack.stats().snapshot();
    assert_eq!(snapshot.tool("search_docs").map(|t| t.calls), Some(3));
}

/// The loop guard's promise through the whole stack: a refusal lifts when
/// the same call succeeds for another session, and that holds for a call
/// made before the refusal began and answered after it (the guard stamps
/// a success with its call's admission time only when no block was made
/// since).
#[tokio::test(start_paused = true)]
async fn a_success_answered_after_a_refusal_began_lifts_it_through_the_stack() {
    let upstream = ReadyChecked::new(tower::service_fn(|request: Request| async move {
        if toolwarden_core::McpRequest::session_key(&request) == Some("agent-2") {
            tokio::time::sleep(Duration::from_secs(5)).await;
            return Ok::<_, toolwarden_core::BoxError>(Response::result(
                request.id,
                json!({"content": [{"type": "text", "text": "found"}]}),
            ));
        }
        Ok(Response::result(
            request.id,
            json!({"content": [{"type": "text", "text": "index unavailable"}], "isError": true}),
        ))
    }));
    let mut stack = StandardStack::builder().build().unwrap().layer(upstream);
    let in_session = |session: &str, id: i64| {
        let mut request = Request::tool_call(id, "search", json!({"q": "tower"}));
        request
            .extensions
            .insert(toolwarden_core::SessionKey::from(session));
        request
    };
    let refused_by_loop_guard = |response: &Response| {
        response.payload.as_ref().unwrap()["structuredContent"]["toolwarden"]["layer"]
            == "loop_guard"
    };
    // agent-2's call is admitted at 0 s, and answered 5 s after it is
    // first polled.
    let in_flight = stack.ready().await.unwrap().call(in_session("agent-2", 1));
    // agent-1 is refused from 1 s: three failures, then the refusal.
    tokio::time::advance(Duration::from_secs(1)).await;
    for id in 2..5 {
        let failed = stack
            .ready()
            .await
            .unwrap()
            .call(in_session("agent-1", id))
            .await
            .unwrap();
        assert!(failed.is_tool_error() && !refused_by_loop_guard(&failed));
    }
    let refused = stack
        .ready()
        .await
        .unwrap()
        .call(in_session("agent-1", 5))
        .await
        .unwrap();
    assert!(refused_by_loop_guard(&refused));
    // agent-2's success comes after the refusal began: it lifts it.
    let found = in_flight.await.unwrap();
    assert!(!found.is_tool_error());
    tokio::time::advance(Duration::from_secs(1)).await;
    let again = stack
        .ready()
        .await
        .unwrap()
        .call(in_session("agent-1", 6))
        .await
        .unwrap();
    assert!(!refused_by_loop_guard(&again), "{:?}", again.payload);
}

/// With the breaker keyed per session and tool, the loop guard's "a
/// refusal lifts when the circuit closes" asks the circuit the call goes
/// to (the session's), not one named by the tool alone (which is the
/// session `-`'s, never opened by a call in a session). The session's id
/// holds a `/` (an HTTP session id may be any visible ASCII): the
/// registry finds its circuit by the name the snapshot shows.
#[tokio::test(start_paused = true)]
async fn a_loop_refusal_lifts_when_the_sessions_circuit_closes() {
    let upstream = MockMcp::new().default_step("t", Step::tool_error("boom"));
    let stack = StandardStack::builder()
        .retry(|b| b.max_attempts(1))
        .circuit_breaker(|b| {
            b.key_by(toolwarden_core::KeyBy::SessionTool)
                .failure_threshold(3)
                .minimum_calls(3)
                .reset_timeout(Duration::from_secs(60))
        })
        .build()
        .unwrap();
    let svc = stack.layer(upstream.clone());
    let session = "user/42";
    let call = |id: i64| {
        let mut request = Request::tool_call(id, "t", json!({"q": 1}));
        request
            .extensions
            .insert(toolwarden_core::SessionKey::from(session));
        svc.clone().oneshot(request)
    };
    let layer_of = |response: &Response| {
        response.payload.as_ref().unwrap()["structuredContent"]["toolwarden"]["layer"].clone()
    };
    for id in 0..3 {
        call(id).await.unwrap();
    }
    let snapshot = stack.registry().snapshot();
    let names: Vec<&str> = snapshot.circuits.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(names, ["user%2F42/t"], "one circuit, its session escaped");
    assert_eq!(
        stack.registry().state("user%2F42/t"),
        Some(CircuitState::Open)
    );
    let refused = call(3).await.unwrap();
    assert_eq!(layer_of(&refused), "loop_guard", "{:?}", refused.payload);

    upstream.set_default("t", Step::ok("fine"));
    stack.registry().force_close("user%2F42/t");
    assert_eq!(
        stack.registry().state("user%2F42/t"),
        Some(CircuitState::Closed)
    );
    let lifted = call(4).await.unwrap();
    assert!(!lifted.is_tool_error(), "{:?}", lifted.payload);
    assert_eq!(upstream.calls("t"), 4);
}
