//! RetryBackoffLayer over a scripted upstream behind a readiness check, on a
//! paused clock.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use serde_json::json;
use tokio::time::Instant;
use toolwarden_core::classify::{
    CallTimedOut, HttpStatusError, TransportError, TransportErrorKind,
};
use toolwarden_core::jsonrpc::{ErrorObject, Id, Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    Bounds, CallKind, CircuitOpen, Classify, FailureClass, KeyBy, LoopDetected, LoopPattern,
    McpClassifier, McpResponse, OutcomeKind, RateLimited, Rejection,
};
use toolwarden_retry::{BudgetConfig, Jitter, RetryBackoffBuilder, RetryBackoffLayer};
use tower::{Layer, Service, ServiceExt};

use support::*;

/// Deterministic delays (no jitter), no budget, a trusted catalog.
fn plain() -> RetryBackoffBuilder {
    RetryBackoffLayer::builder()
        .jitter(Jitter::None)
        .base_delay(100 * MS)
        .catalog(catalog(true))
        .no_budget()
}

fn closed() -> toolwarden_core::BoxError {
    Box::new(TransportError::new(
        TransportErrorKind::Closed,
        "connection closed",
    ))
}

fn text(resp: &toolwarden_core::jsonrpc::Response) -> String {
    resp.first_text().unwrap_or_default().into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_read_only_trusted_tool_is_retried_until_it_succeeds() {
    let (events, seen) = recorder();
    let upstream = Upstream::new(MockMcp::new().script(
        "search",
        [
            Step::tool_error("Error executing tool search: boom"),
            Step::rpc_error(-32603, "internal error"),
        ],
    ));
    let layer = plain().events(events).build().unwrap();
    let mut svc = layer.layer(checked(&upstream));

    let resp = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(!resp.is_tool_error(), "{resp:?}");
    // Each attempt is a fresh call carrying its number.
    assert_eq!(upstream.attempts(), [Some(1), Some(2), Some(3)]);
    assert_eq!(upstream.gaps(), [100 * MS, 200 * MS]);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Recorded::Retry {
                tool: "search".into(),
                attempt: 2,
                delay: 100 * MS
            },
            Recorded::Retry {
                tool: "search".into(),
                attempt: 3,
                delay: 200 * MS
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_destructive_or_untrusted_tool_is_never_retried_after_a_server_side_failure() {
    // Each failure may have reached the server.
    let failures = || {
        [
            Step::tool_error("Error executing tool: boom"),
            Step::rpc_error(-32603, "internal error"),
            Step::closed(),
            Step::tool_error("upstream timed out"),
        ]
    };
    let cases = [
        ("delete_file", true), // trusted, destructive
        ("bare", true),        // trusted, no annotations: the spec's defaults
        ("search", false),     // read-only, but the catalog is not trusted
        ("bare", false),
    ];
    for (tool, trusted) in cases {
        for step in failures() {
            let upstream = Upstream::new(MockMcp::new().script(tool, [step.clone()]));
            let layer = plain().catalog(catalog(trusted)).build().unwrap();
            let mut svc = layer.layer(checked(&upstream));
            let result = call(&mut svc, tool_call(tool)).await;
            assert_eq!(
                upstream.calls(),
                1,
                "{tool} (trusted: {trusted}) after {step:?}: {result:?}"
            );
        }
    }
    // The same failures of a trusted read-only (or idempotent) tool are retried.
    for tool in ["search", "put"] {
        for step in failures() {
            let upstream = Upstream::new(MockMcp::new().script(tool, [step.clone()]));
            let mut svc = plain().build().unwrap().layer(checked(&upstream));
            let resp = call(&mut svc, tool_call(tool)).await.unwrap();
            assert!(!resp.is_tool_error());
            assert_eq!(upstream.calls(), 2, "{tool} after {step:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failure_before_the_request_left_is_retried_for_any_tool() {
    let upstream = Upstream::new(MockMcp::new().script(
        "delete_file",
        [Step::Transport(TransportErrorKind::ConnectFailed)],
    ));
    // The default layer: empty, untrusted catalog.
    let layer = RetryBackoffLayer::builder()
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let mut svc = layer.layer(checked(&upstream));
    let resp = call(&mut svc, tool_call("delete_file")).await.unwrap();
    assert!(!resp.is_tool_error());
    assert_eq!(upstream.attempts(), [Some(1), Some(2)]);
}

#[tokio::test(start_paused = true)]
async fn client_failures_are_never_retried() {
    for step in [
        Step::rpc_error(-32602, "Unknown tool: search"),
        Step::tool_error("MCP error -32602: Tool search not found"),
        Step::tool_error("validation failed: missing required field q"),
    ] {
        let upstream = Upstream::new(MockMcp::new().script("search", [step.clone()]));
        let mut svc = plain().build().unwrap().layer(checked(&upstream));
        call(&mut svc, tool_call("search")).await.unwrap();
        assert_eq!(upstream.calls(), 1, "{step:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn only_the_configured_failure_classes_are_retried() {
    let upstream = Upstream::new(
        MockMcp::new()
            .script("search", [Step::tool_error("Error executing tool: boom")])
            .script("put", [Step::tool_error("rate limit exceeded")]),
    );
    let layer = plain().retry_on([FailureClass::Transient]).build().unwrap();
    let mut svc = layer.layer(checked(&upstream));
    let server = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(server.is_tool_error());
    assert_eq!(upstream.mock.calls("search"), 1);
    let transient = call(&mut svc, tool_call("put")).await.unwrap();
    assert!(!transient.is_tool_error());
    assert_eq!(upstream.mock.calls("put"), 2);
}

#[tokio::test(start_paused = true)]
async fn by_default_only_safe_methods_and_failures_before_sending_are_retried() {
    let upstream =
        Upstream::new(MockMcp::new().script("search", [Step::tool_error("upstream timed out")]));
    let layer = RetryBackoffLayer::builder()
        .jitter(Jitter::None)
        .build()
        .unwrap();
    let mut svc = layer.layer(checked(&upstream));

    // A tool the layer knows nothing about: not repeated.
    let resp = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(resp.is_tool_error());
    assert_eq!(upstream.calls(), 1);

    // tools/list only reads: repeated after a dropped connection.
    upstream.fail_next(closed);
    call(&mut svc, Request::new(2, "tools/list", None))
        .await
        .unwrap();
    assert_eq!(upstream.calls(), 3);

    // initialize is not on the list.
    upstream.fail_next(closed);
    let err = call(&mut svc, Request::new(3, "initialize", Some(json!({}))))
        .await
        .unwrap_err();
    assert!(err.is::<TransportError>());
    assert_eq!(upstream.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn per_tool_overrides_win_over_the_catalog() {
    let upstream = Upstream::new(
        MockMcp::new()
            .script("search", [Step::tool_error("boom")])
            .script("bare", [Step::tool_error("boom")]),
    );
    let layer = plain()
        .catalog(catalog(true))
        .tool("search", |b| b.safe_to_repeat(false))
        .tool("bare", |b| b.safe_to_repeat(true))
        .build()
        .unwrap();
    let mut svc = layer.layer(checked(&upstream));
    assert!(call(&mut svc, tool_call("search"))
        .await
        .unwrap()
        .is_tool_error());
    assert!(!call(&mut svc, tool_call("bare"))
        .await
        .unwrap()
        .is_tool_error());
    assert_eq!(
        (upstream.mock.calls("search"), upstream.mock.calls("bare")),
        (1, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn the_last_attempts_tool_error_is_returned_as_an_ok_response() {
    let upstream = Upstream::new(
        MockMcp::new().default_step("search", Step::tool_error("upstream timed out (3)")),
    );
    let mut svc = plain().build().unwrap().layer(checked(&upstream));
    let resp = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(resp.is_tool_error());
    assert_eq!(text(&resp), "upstream timed out (3)");
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_single_attempt_is_never_retried() {
    let upstream = Upstream::new(MockMcp::new().default_step("search", Step::closed()));
    let mut svc = plain()
        .max_attempts(1)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    assert!(call(&mut svc, tool_call("search")).await.is_err());
    assert_eq!(upstream.attempts(), [Some(1)]);
}

#[tokio::test(start_paused = true)]
async fn delays_fall_inside_each_jitter_variants_bounds() {
    let (base, max) = (100 * MS, 1000 * MS);
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        for seed in 0..25 {
            let (events, seen) = recorder();
            let upstream =
                Upstream::new(MockMcp::new().default_step("search", Step::tool_error("boom")));
            let layer = plain()
                .jitter(jitter)
                .jitter_seed(seed)
                .base_delay(base)
                .max_delay(max)
                .max_attempts(6)
                .deadline(60 * SEC)
                .events(events)
                .build()
                .unwrap();
            let mut svc = layer.layer(checked(&upstream));
            call(&mut svc, tool_call("search")).await.unwrap();

            let delays = retry_delays(&seen);
            let gaps = upstream.gaps();
            assert_eq!((delays.len(), gaps.len()), (5, 5), "{jitter:?}");
            let mut previous = base;
            for (i, (&delay, &gap)) in delays.iter().zip(&gaps).enumerate() {
                let ceiling = (base * 2u32.pow(i as u32)).min(max);
                let (low, high) = match jitter {
                    Jitter::None => (ceiling, ceiling),
                    Jitter::Full => (Duration::ZERO, ceiling),
                    Jitter::Equal => (ceiling / 2, ceiling),
                    Jitter::Decorrelated => (base, (previous * 3).min(max)),
                };
                assert!(
                    low <= delay && delay <= high,
                    "{jitter:?} seed {seed} retry {}: {delay:?} not in [{low:?}, {high:?}]",
                    i + 1
                );
                // The wait really is the delay (tokio's timer ticks in milliseconds).
                assert!(
                    delay <= gap && gap <= delay + MS,
                    "{jitter:?}: waited {gap:?} for {delay:?}"
                );
                previous = delay;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_seed_repeats_the_same_delays() {
    let run = |seed| async move {
        let (events, seen) = recorder();
        let upstream =
            Upstream::new(MockMcp::new().default_step("search", Step::tool_error("boom")));
        let layer = plain()
            .jitter(Jitter::Full)
            .jitter_seed(seed)
            .max_attempts(5)
            .events(events)
            .build()
            .unwrap();
        call(&mut layer.layer(checked(&upstream)), tool_call("search"))
            .await
            .unwrap();
        retry_delays(&seen)
    };
    assert_eq!(run(9).await, run(9).await);
    assert_ne!(run(9).await, run(10).await);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_never_exceeded() {
    let deadline = 5 * SEC;
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        for seed in 0..10 {
            // Every attempt takes 700 ms and fails; attempts alone would allow 50.
            let upstream = Upstream::new(
                MockMcp::new().default_step("search", Step::tool_error("boom").after(700 * MS)),
            );
            let layer = plain()
                .jitter(jitter)
                .jitter_seed(seed)
                .base_delay(200 * MS)
                .max_delay(5 * SEC)
                .max_attempts(50)
                .deadline(deadline)
                .build()
                .unwrap();
            let mut svc = layer.layer(checked(&upstream));
            let started = Instant::now();
            // The last failure, or a timeout if the deadline cut an attempt.
            match call(&mut svc, tool_call("search")).await {
                Ok(resp) => assert!(resp.is_tool_error()),
                Err(err) => assert!(err.is::<CallTimedOut>(), "{err}"),
            }
            let elapsed = started.elapsed();
            // tokio's timer ticks in milliseconds.
            assert!(
                elapsed <= deadline + MS,
                "{jitter:?} seed {seed}: {elapsed:?}"
            );
            assert!(upstream.log().iter().all(|s| s.at - started < deadline));
            assert!(
                upstream.calls() >= 2,
                "{jitter:?} seed {seed}: retried at all"
            );
            assert_eq!(upstream.mock.in_flight(), 0);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_still_running_at_the_deadline_is_cut_and_the_call_times_out() {
    let upstream = Upstream::new(
        MockMcp::new().script("search", [Step::tool_error("first failure"), Step::Hang]),
    );
    let mut svc = plain()
        .deadline(2 * SEC)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    let started = Instant::now();
    let err = call(&mut svc, tool_call("search")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!((2 * SEC..=2 * SEC + MS).contains(&elapsed), "{elapsed:?}");
    // Not the first failure: the cut retry may have reached the tool.
    assert_eq!(
        err.downcast_ref::<CallTimedOut>(),
        Some(&CallTimedOut { after: 2 * SEC })
    );
    assert_eq!(upstream.calls(), 2);
    // The hung attempt was dropped, not leaked.
    assert_eq!(upstream.mock.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn retry_after_hints_are_honoured() {
    type Case = (&'static str, Box<dyn Fn(&Upstream)>, Duration);
    let cases: Vec<Case> = vec![
        // A limiter below refused a destructive tool: it never reached the tool.
        (
            "delete_file",
            Box::new(|u: &Upstream| {
                u.fail_next(|| Box::new(RateLimited::new("delete_file", 2 * SEC)));
            }),
            2 * SEC,
        ),
        (
            "delete_file",
            Box::new(|u: &Upstream| {
                u.fail_next(|| Box::new(CircuitOpen::new("delete_file", 1500 * MS)));
            }),
            1500 * MS,
        ),
        // JSON-RPC -32023 with a hint in its data.
        (
            "search",
            Box::new(|u: &Upstream| {
                let mut limited = ErrorObject::new(-32023, "rate limited");
                limited.data = Some(json!({"retryAfter": 3}));
                u.mock.push("search", [Step::RpcError(limited)]);
            }),
            3 * SEC,
        ),
        // HTTP 503 with Retry-After.
        (
            "search",
            Box::new(|u: &Upstream| {
                u.fail_next(|| {
                    Box::new(HttpStatusError {
                        status: 503,
                        retry_after: Some(4 * SEC),
                    })
                });
            }),
            4 * SEC,
        ),
        // A hint shorter than the backoff does not shorten it.
        (
            "search",
            Box::new(|u: &Upstream| {
                u.fail_next(|| Box::new(RateLimited::new("search", 10 * MS)));
            }),
            100 * MS,
        ),
    ];
    for (tool, fail, expected) in cases {
        let (events, seen) = recorder();
        let upstream = Upstream::new(MockMcp::new());
        fail(&upstream);
        let layer = plain()
            .catalog(catalog(false))
            .tool("search", |b| b.safe_to_repeat(true))
            .events(events)
            .build()
            .unwrap();
        let mut svc = layer.layer(checked(&upstream));
        let resp = call(&mut svc, tool_call(tool)).await.unwrap();
        assert!(!resp.is_tool_error());
        assert_eq!(retry_delays(&seen), [expected], "{tool}");
        let gap = upstream.gaps()[0];
        assert!(
            expected <= gap && gap <= expected + MS,
            "{tool}: waited {gap:?}, hint {expected:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_hint_past_the_deadline_returns_the_error_at_once() {
    let upstream = Upstream::new(MockMcp::new());
    upstream.fail_next(|| Box::new(CircuitOpen::new("search", 60 * SEC)));
    let mut svc = plain()
        .deadline(30 * SEC)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    let started = Instant::now();
    let err = call(&mut svc, tool_call("search")).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().retry_after(),
        Some(60 * SEC)
    );
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn rejections_without_a_hint_are_not_retried() {
    let upstream = Upstream::new(MockMcp::new());
    upstream.fail_next(|| Box::new(LoopDetected::new("search", 5, LoopPattern::RepeatedFailure)));
    let mut svc = plain().build().unwrap().layer(checked(&upstream));
    let err = call(&mut svc, tool_call("search")).await.unwrap_err();
    assert!(err.is::<LoopDetected>());
    assert_eq!(upstream.calls(), 1);
}

/// 1000 calls, all failing, 3 attempts allowed: `(attempts upstream, retry
/// events, budget-exhausted events)`.
async fn storm(builder: RetryBackoffBuilder) -> (usize, usize, usize) {
    let (events, seen) = recorder();
    let upstream = Upstream::new(
        MockMcp::new().default_step("search", Step::tool_error("service unavailable, try again")),
    );
    let layer = builder
        .catalog(catalog(true))
        .max_attempts(3)
        .events(events)
        .build()
        .unwrap();
    // Every call goes through its own clone: clones share the budget.
    let svc = layer.layer(checked(&upstream));
    let calls = (0..1000).map(|i| {
        svc.clone()
            .oneshot(Request::tool_call(i, "search", json!({})))
    });
    let results = join_all(calls).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(McpResponse::is_tool_error)));
    let seen = seen.lock().unwrap();
    let retries = seen
        .iter()
        .filter(|e| matches!(e, Recorded::Retry { .. }))
        .count();
    let exhausted = seen
        .iter()
        .filter(|e| matches!(e, Recorded::RetryBudgetExhausted { .. }))
        .count();
    (upstream.calls(), retries, exhausted)
}

#[tokio::test(start_paused = true)]
async fn a_failure_storm_is_bounded_by_the_retry_budget() {
    let budget = BudgetConfig {
        ratio: 0.2,
        min_per_sec: 10,
        ttl: 10 * SEC,
    };
    let (attempts, retries, exhausted) = storm(RetryBackoffLayer::builder().budget(budget)).await;
    // 1000 first attempts, 20 % of them retried, plus the floor: 10/s over 10 s.
    assert!((1250..=1300).contains(&attempts), "{attempts} attempts");
    assert_eq!(attempts - 1000, retries);
    assert!(exhausted > 500, "{exhausted} refusals reported");

    // Without a budget the same storm sends three times the load.
    let (attempts, _, exhausted) = storm(RetryBackoffLayer::builder().no_budget()).await;
    assert_eq!((attempts, exhausted), (3000, 0));
}

fn one_retry_per_second() -> BudgetConfig {
    BudgetConfig {
        ratio: 0.0,
        min_per_sec: 1,
        ttl: SEC,
    }
}

#[tokio::test(start_paused = true)]
async fn a_per_key_budget_keeps_tools_apart() {
    let failing = || {
        Upstream::new(
            MockMcp::new()
                .default_step("search", Step::tool_error("boom"))
                .default_step("put", Step::tool_error("boom")),
        )
    };
    // One budget per tool: each gets its one retry.
    let upstream = failing();
    let layer = plain()
        .budget(one_retry_per_second())
        .key_by(KeyBy::Tool)
        .bounds(Bounds::max_keys(10))
        .build()
        .unwrap();
    let mut svc = layer.layer(checked(&upstream));
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("put")).await.unwrap();
    assert_eq!(
        (upstream.mock.calls("search"), upstream.mock.calls("put")),
        (2, 2)
    );
    assert_eq!(layer.budget_available(&tool_call("search")), Some(0));
    assert_eq!(layer.budget_available(&tool_call("never_called")), Some(1));

    // One budget for the layer: search spends it for both.
    let upstream = failing();
    let layer = plain().budget(one_retry_per_second()).build().unwrap();
    let mut svc = layer.layer(checked(&upstream));
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("put")).await.unwrap();
    assert_eq!(
        (upstream.mock.calls("search"), upstream.mock.calls("put")),
        (2, 1)
    );

    // The budget refills after its window.
    tokio::time::advance(SEC + 200 * MS).await;
    assert_eq!(layer.budget_available(&tool_call("put")), Some(1));
}

#[tokio::test(start_paused = true)]
async fn retries_after_rejections_consume_budget_and_exhaustion_returns_the_error_unchanged() {
    let (events, seen) = recorder();
    let upstream = Upstream::new(MockMcp::new());
    upstream.fail_next(|| Box::new(RateLimited::new("delete_file", 100 * MS)));
    upstream.fail_next(|| Box::new(RateLimited::new("delete_file", 250 * MS)));
    let layer = plain()
        .budget(one_retry_per_second())
        .events(events)
        .build()
        .unwrap();
    let mut svc = layer.layer(checked(&upstream));
    let err = call(&mut svc, tool_call("delete_file")).await.unwrap_err();
    // The second refusal, as the limiter made it.
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after(),
        Some(250 * MS)
    );
    assert_eq!(upstream.calls(), 2);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Recorded::Retry {
                tool: "delete_file".into(),
                attempt: 2,
                delay: 100 * MS
            },
            Recorded::RetryBudgetExhausted {
                tool: "delete_file".into()
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn every_attempt_waits_for_readiness_and_propagates_pending() {
    let upstream = Upstream::new(MockMcp::new().script(
        "search",
        [Step::tool_error("boom"), Step::tool_error("boom")],
    ));
    let layer = plain().build().unwrap();
    let mut svc = layer.layer(ReadyChecked::new(upstream.clone()).pending_first());
    let resp = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(!resp.is_tool_error());
    assert_eq!(upstream.calls(), 3);
    // The handle is usable again (its fresh clone is polled ready anew).
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(upstream.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_for_the_inner_service_to_be_ready() {
    let upstream = Upstream::new(MockMcp::new().script("search", [Step::tool_error("boom")]));
    let gate = Gate::open();
    let layer = plain().deadline(5 * SEC).build().unwrap();
    let mut svc = layer.layer(gate.wrap(checked(&upstream)));
    let started = Instant::now();
    let future = svc.ready().await.unwrap().call(tool_call("search"));
    // The first attempt is made; the service is busy until 1 s.
    gate.set(false);
    let opener = gate.clone();
    tokio::spawn(async move {
        tokio::time::sleep(SEC).await;
        opener.set(true);
    });
    let resp = future.await.unwrap();
    assert!(!resp.is_tool_error());
    let log = upstream.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].at - started, SEC);
}

#[tokio::test(start_paused = true)]
async fn a_service_never_ready_again_gives_back_the_failure_at_the_deadline() {
    let upstream = Upstream::new(MockMcp::new().script("search", [Step::tool_error("boom")]));
    let gate = Gate::open();
    let mut svc = plain()
        .deadline(3 * SEC)
        .build()
        .unwrap()
        .layer(gate.wrap(checked(&upstream)));
    let started = Instant::now();
    let future = svc.ready().await.unwrap().call(tool_call("search"));
    gate.set(false);
    let resp = future.await.unwrap();
    assert_eq!(text(&resp), "boom");
    assert!((3 * SEC..=3 * SEC + MS).contains(&started.elapsed()));
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_layer_composes_with_service_builder() {
    let upstream = Upstream::new(MockMcp::new().script("search", [Step::closed()]));
    let mut svc = tower::ServiceBuilder::new()
        .layer(plain().build().unwrap())
        .service(checked(&upstream));
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_tool_with_one_attempt_is_never_retried_while_others_are() {
    // The override comes first: the closure still sees the final max_attempts.
    let layer = plain()
        .tool("put", |b| b.max_attempts(1))
        .max_attempts(3)
        .build()
        .unwrap();
    let upstream = Upstream::new(
        MockMcp::new()
            .default_step("put", Step::tool_error("boom"))
            .default_step("search", Step::tool_error("boom")),
    );
    let mut svc = layer.layer(checked(&upstream));
    let put = call(&mut svc, tool_call("put")).await.unwrap();
    assert!(put.is_tool_error());
    assert_eq!(upstream.attempts(), [Some(1)]);
    let search = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(search.is_tool_error());
    assert_eq!(upstream.mock.calls("put"), 1);
    assert_eq!(upstream.mock.calls("search"), 3);
    // A connection refused is safe to repeat for any tool, but not for a tool never retried.
    let refused = Upstream::new(
        MockMcp::new().default_step("put", Step::Transport(TransportErrorKind::ConnectFailed)),
    );
    assert!(call(&mut layer.layer(checked(&refused)), tool_call("put"))
        .await
        .is_err());
    assert_eq!(refused.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_tools_own_base_delay_and_deadline_apply() {
    let layer = plain()
        .tool("search", |b| {
            b.base_delay(SEC).max_attempts(10).deadline(4 * SEC)
        })
        .max_attempts(4)
        .build()
        .unwrap();
    let failing = || {
        Upstream::new(
            MockMcp::new()
                .default_step("search", Step::tool_error("boom"))
                .default_step("put", Step::tool_error("boom")),
        )
    };
    // The tool's own: 1 s, then 2 s; a 4 s wait would end past its 4 s deadline.
    let search = failing();
    let started = Instant::now();
    call(&mut layer.layer(checked(&search)), tool_call("search"))
        .await
        .unwrap();
    assert_eq!(search.gaps(), [SEC, 2 * SEC]);
    assert_eq!(started.elapsed(), 3 * SEC);
    // The layer's: 100 ms base, 4 attempts.
    let put = failing();
    call(&mut layer.layer(checked(&put)), tool_call("put"))
        .await
        .unwrap();
    assert_eq!(put.gaps(), [100 * MS, 200 * MS, 400 * MS]);

    // A retry still running at the tool's deadline is cut there.
    let hangs = Upstream::new(
        MockMcp::new().script("search", [Step::tool_error("first failure"), Step::Hang]),
    );
    let started = Instant::now();
    let err = call(&mut layer.layer(checked(&hangs)), tool_call("search"))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<CallTimedOut>(),
        Some(&CallTimedOut { after: 4 * SEC })
    );
    let elapsed = started.elapsed();
    assert!((4 * SEC..=4 * SEC + MS).contains(&elapsed), "{elapsed:?}");
    assert_eq!(hangs.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_tools_own_failure_classes_apply() {
    let layer = plain()
        .tool("search", |b| b.retry_on([FailureClass::Transient]))
        .build()
        .unwrap();
    let upstream = Upstream::new(
        MockMcp::new()
            .default_step("search", Step::tool_error("boom")) // a Server failure
            .default_step("put", Step::tool_error("boom")),
    );
    let mut svc = layer.layer(checked(&upstream));
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("put")).await.unwrap();
    assert_eq!(upstream.mock.calls("search"), 1);
    assert_eq!(upstream.mock.calls("put"), 3);
}

#[tokio::test(start_paused = true)]
async fn overrides_of_one_tool_apply_in_order() {
    let layer = plain()
        .tool("search", |b| b.max_attempts(5).base_delay(SEC))
        .tool("search", |b| b.max_attempts(2))
        .build()
        .unwrap();
    let upstream = Upstream::new(MockMcp::new().default_step("search", Step::tool_error("boom")));
    call(&mut layer.layer(checked(&upstream)), tool_call("search"))
        .await
        .unwrap();
    assert_eq!(upstream.gaps(), [SEC]);
}

/// How the stack's classifier reads an error that left the layer.
fn outcome_of(err: &toolwarden_core::BoxError) -> toolwarden_core::Outcome {
    Classify::<Response>::classify_error(&McpClassifier::new(), err.as_ref())
}

/// Issue 15: a retry made after a failure before sending, then cut at the
/// deadline while in flight, may have reached the server: the caller must
/// not be told it was never sent.
#[tokio::test(start_paused = true)]
async fn a_retry_cut_in_flight_after_a_connect_failure_is_not_reported_as_never_sent() {
    let upstream = Upstream::new(MockMcp::new().script(
        "delete_file",
        [
            Step::Transport(TransportErrorKind::ConnectFailed),
            Step::Hang,
        ],
    ));
    // The default catalog: delete_file is not safe to repeat, but a failure
    // before sending is retried for any tool.
    let mut svc = RetryBackoffLayer::builder()
        .jitter(Jitter::None)
        .deadline(2 * SEC)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    let started = Instant::now();
    let err = call(&mut svc, tool_call("delete_file")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!((2 * SEC..=2 * SEC + MS).contains(&elapsed), "{elapsed:?}");
    assert_eq!(upstream.calls(), 2);
    assert_eq!(upstream.mock.in_flight(), 0);
    let outcome = outcome_of(&err);
    assert!(!outcome.before_sent, "{err}: {outcome:?}");
    assert_eq!(outcome.kind, OutcomeKind::Timeout, "{err}");
    assert!(err.is::<CallTimedOut>(), "{err}");
}

/// Issue 15: the half-open probe after a `CircuitOpen` refusal, cut at the
/// deadline while in flight, reached the server: the caller must get a
/// timeout, not the refusal (which says the tool was never called).
#[tokio::test(start_paused = true)]
async fn a_probe_cut_in_flight_after_a_circuit_open_refusal_is_not_reported_as_never_sent() {
    let upstream = Upstream::new(MockMcp::new().script("delete_file", [Step::Hang]));
    upstream.fail_next(|| Box::new(CircuitOpen::new("delete_file", 500 * MS)));
    let mut svc = RetryBackoffLayer::builder()
        .jitter(Jitter::None)
        .deadline(2 * SEC)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    let started = Instant::now();
    let err = call(&mut svc, tool_call("delete_file")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!((2 * SEC..=2 * SEC + MS).contains(&elapsed), "{elapsed:?}");
    assert_eq!(upstream.gaps(), [500 * MS]);
    assert_eq!(upstream.mock.in_flight(), 0);
    let outcome = outcome_of(&err);
    assert!(!outcome.before_sent, "{err}: {outcome:?}");
    assert!(!outcome.is_rejection(), "{err}: {outcome:?}");
    assert_eq!(outcome.kind, OutcomeKind::Timeout, "{err}");
}

/// A retry that never started (the service below never became ready again)
/// after a connect failure: nothing reached the server, so the failure
/// before sending is the truthful answer and comes back as it was. But once
/// an earlier attempt may have reached the server, it is a timeout.
#[tokio::test(start_paused = true)]
async fn a_deadline_passed_while_readying_reports_sent_only_if_an_attempt_was_sent() {
    for (first_sent, script) in [
        (
            false,
            vec![Step::Transport(TransportErrorKind::ConnectFailed)],
        ),
        (
            true,
            vec![
                Step::tool_error("upstream timed out"),
                Step::Transport(TransportErrorKind::ConnectFailed),
            ],
        ),
    ] {
        let upstream = Upstream::new(MockMcp::new().script("search", script.clone()));
        let gate = Gate::open();
        let mut svc = plain()
            .max_attempts(5)
            .deadline(3 * SEC)
            .build()
            .unwrap()
            .layer(gate.wrap(checked(&upstream)));
        let future = svc.ready().await.unwrap().call(tool_call("search"));
        let attempts = script.len();
        let watcher = async {
            // Close the gate once every scripted attempt has been made.
            while upstream.calls() < attempts {
                tokio::time::sleep(MS).await;
            }
            gate.set(false);
        };
        let (result, ()) = tokio::join!(future, watcher);
        let err = result.unwrap_err();
        assert_eq!(upstream.calls(), attempts);
        let outcome = outcome_of(&err);
        if first_sent {
            assert!(err.is::<CallTimedOut>(), "{err}");
            assert!(!outcome.before_sent);
        } else {
            assert!(err.is::<TransportError>(), "{err}");
            assert!(outcome.before_sent);
        }
    }
}

/// Issue 15: MCP forbids reusing a request id within a session, so each
/// retry of a raw JSON-RPC request goes out under a fresh id, and the
/// caller gets its own id back.
#[tokio::test(start_paused = true)]
async fn each_attempt_carries_its_own_request_id_and_the_caller_gets_its_id_back() {
    for original in [Id::Number(7), Id::String("req-7".into())] {
        let upstream = Upstream::new(MockMcp::new().script(
            "search",
            [
                Step::tool_error("upstream timed out"),
                Step::rpc_error(-32603, "internal error"),
            ],
        ));
        let mut svc = plain().build().unwrap().layer(checked(&upstream));
        let request = Request::tool_call(original.clone(), "search", json!({"q": "x"}));
        let resp = call(&mut svc, request).await.unwrap();
        assert!(!resp.is_tool_error());
        assert_eq!(resp.id, original);
        let ids: Vec<Id> = upstream.mock.requests().into_iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[0], original);
        assert_ne!(ids[1], original);
        assert_ne!(ids[2], original);
        assert_ne!(ids[1], ids[2]);
        assert_eq!(ids[1], Id::String(format!("{original}#tw-retry-2")));
    }
    // The last failure, returned as it came, answers the caller's id too.
    let upstream = Upstream::new(
        MockMcp::new().default_step("search", Step::rpc_error(-32603, "internal error")),
    );
    let mut svc = plain()
        .max_attempts(2)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    let resp = call(&mut svc, Request::tool_call(9, "search", json!({})))
        .await
        .unwrap();
    assert!(resp.payload.is_err());
    assert_eq!(resp.id, Id::Number(9));
    assert_eq!(upstream.calls(), 2);
}

/// A classifier that reports a huge retry-after hint on every failure.
#[derive(Clone)]
struct HugeHint(Duration);

impl Classify<Response> for HugeHint {
    fn classify_response(&self, kind: CallKind, response: &Response) -> toolwarden_core::Outcome {
        let mut outcome = McpClassifier::new().classify_response(kind, response);
        if !outcome.is_success() {
            outcome.retry_after = Some(self.0);
        }
        outcome
    }

    fn classify_error(
        &self,
        error: &(dyn std::error::Error + 'static),
    ) -> toolwarden_core::Outcome {
        let mut outcome = Classify::<Response>::classify_error(&McpClassifier::new(), error);
        outcome.retry_after = Some(self.0);
        outcome
    }
}

#[tokio::test(start_paused = true)]
async fn any_retry_after_hint_is_handled_and_one_past_the_deadline_returns_at_once() {
    let deadline = 5 * SEC;
    for hint in [
        Duration::MAX,
        Duration::new(u64::MAX, 0),
        Duration::from_secs(u64::MAX / 2),
        Duration::from_secs(100_000_000_000),
        deadline,
    ] {
        let upstream = Upstream::new(
            MockMcp::new().default_step("search", Step::rpc_error(-32023, "rate limited")),
        );
        upstream.fail_next(|| {
            Box::new(TransportError::new(
                TransportErrorKind::ConnectFailed,
                "refused",
            ))
        });
        let mut svc = plain()
            .classifier(HugeHint(hint))
            .deadline(deadline)
            .build()
            .unwrap()
            .layer(checked(&upstream));
        let started = Instant::now();
        let err = call(&mut svc, tool_call("search")).await.unwrap_err();
        assert!(err.is::<TransportError>(), "{hint:?}: {err}");
        assert_eq!(started.elapsed(), Duration::ZERO, "{hint:?}");
        assert_eq!(upstream.calls(), 1, "{hint:?}");
    }
    // Rejections with huge hints, as the layers below make them.
    for make in [
        (|| Box::new(RateLimited::new("search", Duration::MAX)) as toolwarden_core::BoxError)
            as fn() -> toolwarden_core::BoxError,
        || Box::new(CircuitOpen::new("search", Duration::MAX)),
        || {
            Box::new(HttpStatusError {
                status: 503,
                retry_after: Some(Duration::MAX),
            })
        },
    ] {
        let upstream = Upstream::new(MockMcp::new());
        upstream.fail_next(make);
        let mut svc = plain().build().unwrap().layer(checked(&upstream));
        let started = Instant::now();
        assert!(call(&mut svc, tool_call("search")).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(upstream.calls(), 1);
    }
    // A hint just inside the deadline is waited for.
    let upstream = Upstream::new(MockMcp::new());
    upstream.fail_next(|| {
        Box::new(TransportError::new(
            TransportErrorKind::ConnectFailed,
            "refused",
        ))
    });
    let mut svc = plain()
        .classifier(HugeHint(deadline - MS))
        .deadline(deadline)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(upstream.gaps(), [deadline - MS]);
}

/// Found by the standard stack's property test: attempts run out on a
/// failure before sending (connection refused) after an earlier attempt
/// reached the server. The caller gets the failure of the attempt that
/// reached it, never "could not connect".
#[tokio::test(start_paused = true)]
async fn attempts_running_out_on_a_failure_before_sending_answer_the_one_that_reached() {
    let upstream = Upstream::new(MockMcp::new().script(
        "search",
        [
            Step::tool_error("service unavailable"),
            Step::Transport(TransportErrorKind::ConnectFailed),
            Step::Transport(TransportErrorKind::ConnectFailed),
        ],
    ));
    let mut svc = RetryBackoffLayer::builder()
        .catalog(catalog(true))
        .jitter(Jitter::None)
        .max_attempts(3)
        .build()
        .unwrap()
        .layer(checked(&upstream));
    let answer = call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(upstream.calls(), 3);
    assert!(answer.is_tool_error(), "the tool's own failure: {answer:?}");
    assert_eq!(answer.first_text().as_deref(), Some("service unavailable"));
}

/// Counts its clones: each is what a call would pay in the layers below
/// (their shared counts touched, on every core that calls).
#[derive(Clone)]
struct CountClones<S> {
    inner: S,
    clones: Arc<AtomicUsize>,
}

impl<S: Clone> CountClones<S> {
    fn clone_counted(&self) -> Self {
        self.clones.fetch_add(1, Ordering::Relaxed);
        self.clone()
    }
}

struct Counted<S>(CountClones<S>);

impl<S: Clone> Clone for Counted<S> {
    fn clone(&self) -> Self {
        Counted(self.0.clone_counted())
    }
}

impl<S: Service<Request>> Service<Request> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.0.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn calls_answered_at_once_clone_no_inner_service_and_a_retry_clones_one() {
    let upstream = Upstream::new(MockMcp::new().script(
        "search",
        [
            Step::ok("first"),
            Step::ok("second"),
            Step::ok("third"),
            Step::tool_error("Error executing tool search: boom"),
        ],
    ));
    let clones = Arc::new(AtomicUsize::new(0));
    let mut svc = plain().build().unwrap().layer(Counted(CountClones {
        inner: checked(&upstream),
        clones: Arc::clone(&clones),
    }));
    call(&mut svc, tool_call("search")).await.unwrap();
    // The spare the retries clone from, made once, at the first call.
    assert_eq!(clones.load(Ordering::Relaxed), 1);
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(
        clones.load(Ordering::Relaxed),
        1,
        "answered at once: no clone"
    );
    // A failure, then a retry (the script's end answers the default).
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(upstream.calls(), 5);
    assert_eq!(clones.load(Ordering::Relaxed), 2, "one clone for the retry");
}

/// A passthrough service retries nothing: the failures a normal service
/// retries past reach the caller as the tool sent them, each after one
/// attempt that carries no attempt number.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    let (events, seen) = recorder();
    let layer = plain().events(events).build().unwrap();
    let failing = || {
        let boom = Step::tool_error("Error executing tool search: boom");
        MockMcp::new().script("search", [boom, Step::rpc_error(-32603, "internal error")])
    };
    let upstream = Upstream::new(failing());
    let mut svc = layer.layer(checked(&upstream));
    assert!(!svc.is_passthrough());
    let resp = call(&mut svc, tool_call("search")).await.unwrap();
    assert!(!resp.is_tool_error(), "{resp:?}");
    assert_eq!(upstream.calls(), 3);
    assert_eq!(seen.lock().unwrap().len(), 2);

    let upstream = Upstream::new(failing());
    let mut svc = layer.layer(checked(&upstream)).passthrough();
    assert!(svc.is_passthrough());
    let first = call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(text(&first), "Error executing tool search: boom");
    let second = call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(second.payload.unwrap_err().code, -32603);
    upstream.fail_next(closed);
    let third = call(&mut svc, tool_call("search")).await.unwrap_err();
    assert!(third.is::<TransportError>(), "{third}");
    assert_eq!(upstream.attempts(), [None, None, None]);
    assert_eq!(seen.lock().unwrap().len(), 2, "no retry event");
}
