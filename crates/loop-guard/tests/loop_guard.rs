//! The loop guard's behaviour through its `tower::Service`, over a mock MCP
//! server that checks tower's readiness contract.

mod support;

use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde_json::json;
use toolwarden_core::jsonrpc::{code, Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    fingerprint, Bounds, BoxError, FailureReport, Fingerprint, LoopDetected, LoopPattern,
    McpRequest, McpResponse, RateLimited,
};
use toolwarden_loop_guard::{LoopGuard, LoopGuardLayer, ToolLimits};
use tower::{Service, ServiceExt};

use support::*;

const BOTH_READINESS_MODES: [bool; 2] = [false, true];

fn failing(tool: &str) -> MockMcp {
    MockMcp::new().default_step(
        tool,
        Step::tool_error("Error executing tool: upstream exploded"),
    )
}

#[tokio::test(start_paused = true)]
async fn the_fourth_identical_failing_call_is_blocked_after_a_warning() {
    for pending_first in BOTH_READINESS_MODES {
        let mock = failing("search");
        let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, pending_first);
        let call = || tool_call("search", json!({"q": "tower"}));
        for n in 1..=3 {
            let response = expect_forwarded(&mut svc, call()).await.unwrap();
            assert!(
                response.is_tool_error(),
                "call {n}: the tool's own failure goes through"
            );
        }
        // Only the third call warned: one more failure and the next is blocked.
        assert_eq!(*log.lock().unwrap(), [Seen::warned("search", 3)]);

        let refusal = expect_blocked(&mut svc, call()).await;
        assert_eq!(what(&refusal), (LoopPattern::RepeatedFailure, 4));
        assert_eq!(refusal.tool(), "search");
        assert_eq!(
            mock.calls("search"),
            3,
            "the blocked call never reached the server"
        );
        assert_eq!(
            *log.lock().unwrap(),
            [Seen::warned("search", 3), Seen::blocked("search", 4)]
        );

        // Asking again does not help.
        assert_eq!(
            what(&expect_blocked(&mut svc, call()).await),
            (LoopPattern::RepeatedFailure, 5)
        );
        assert_eq!(mock.calls("search"), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn client_errors_count_as_failing() {
    let steps = [
        Step::rpc_error(code::INVALID_PARAMS, "Invalid params: q must be a string"),
        Step::tool_error("MCP error -32602: Tool search not found"),
    ];
    for step in steps {
        let mock = MockMcp::new().default_step("search", step.clone());
        let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
        for _ in 0..3 {
            let _ = expect_forwarded(&mut svc, tool_call("search", json!({"q": 1}))).await;
        }
        let refusal = expect_blocked(&mut svc, tool_call("search", json!({"q": 1}))).await;
        assert_eq!(
            what(&refusal),
            (LoopPattern::RepeatedFailure, 4),
            "{step:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn transport_failures_are_the_upstream_down_not_a_loop() {
    let mock = MockMcp::new().default_step("search", Step::closed());
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, false);
    for _ in 0..20 {
        let err = expect_forwarded(&mut svc, tool_call("search", json!({"q": 1})))
            .await
            .unwrap_err();
        assert!(!err.is::<LoopDetected>());
    }
    assert!(log.lock().unwrap().is_empty());
}

/// An HTTP server refusing the request itself (422, 409: a client
/// failure) is the agent's call being wrong, as a tool error is: repeated,
/// it is a loop. It was neutral with the transport failures above, and an
/// agent repeating it reached the server every time.
#[tokio::test(start_paused = true)]
async fn an_http_client_failure_repeated_is_a_loop() {
    use toolwarden_core::classify::HttpStatusError;
    let layer = LoopGuardLayer::builder().build().unwrap();
    let refused = tower::service_fn(|_request: Request| async {
        Err::<Response, BoxError>(Box::new(HttpStatusError {
            status: 422,
            retry_after: None,
        }))
    });
    let mut svc = LoopGuard::new(refused, &layer);
    for _ in 0..3 {
        let err = expect_forwarded(&mut svc, tool_call("search", json!({"q": 1})))
            .await
            .unwrap_err();
        assert!(err.is::<HttpStatusError>(), "{err}");
    }
    let refusal = expect_blocked(&mut svc, tool_call("search", json!({"q": 1}))).await;
    assert_eq!(what(&refusal), (LoopPattern::RepeatedFailure, 4));
}

#[tokio::test(start_paused = true)]
async fn calls_that_differ_only_in_meta_or_key_order_are_identical() {
    let mock = failing("search");
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, true);
    let variants = [
        json!({"q": "tower", "limit": 5, "_meta": {"progressToken": 1}}),
        json!({"limit": 5, "q": "tower", "_meta": {"progressToken": 2}}),
        json!({"_meta": {"progressToken": "three"}, "q": "tower", "limit": 5.0}),
    ];
    for args in variants {
        let _ = expect_forwarded(&mut svc, tool_call("search", args)).await;
    }
    let fourth = tool_call(
        "search",
        json!({"q": "tower", "limit": 5, "_meta": {"progressToken": 4}}),
    );
    assert_eq!(what(&expect_blocked(&mut svc, fourth).await).1, 4);
}

#[tokio::test(start_paused = true)]
async fn calls_with_other_arguments_or_another_tool_are_not_identical() {
    let mock = failing("search").default_step("fetch", Step::tool_error("boom"));
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, false);
    for i in 0..40 {
        let _ = expect_forwarded(
            &mut svc,
            tool_call("search", json!({"q": format!("query {i}")})),
        )
        .await;
    }
    // Same arguments, another tool: its own streak.
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, tool_call("fetch", json!({"q": "query 39"}))).await;
    }
    assert_eq!(mock.calls("search"), 40);
    assert_eq!(*log.lock().unwrap(), [Seen::warned("fetch", 3)]);
}

#[tokio::test(start_paused = true)]
async fn a_success_with_new_arguments_clears_the_streak() {
    let mock = failing("search");
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    let stuck = || tool_call("search", json!({"q": "stuck"}));
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, stuck()).await;
    }
    // Another call fails: that is no progress, the streak stands.
    mock.push("search", [Step::tool_error("still broken")]);
    let _ = expect_forwarded(&mut svc, tool_call("search", json!({"q": "other"}))).await;
    expect_blocked(&mut svc, stuck()).await;
    // The agent changes approach and it works: the streak is cleared...
    mock.push("search", [Step::ok("found it")]);
    let found = expect_forwarded(&mut svc, tool_call("search", json!({"q": "new"})))
        .await
        .unwrap();
    assert!(!found.is_tool_error());
    // ...so the old call gets three fresh tries, and the 4th is blocked again.
    for _ in 0..3 {
        let response = expect_forwarded(&mut svc, stuck()).await.unwrap();
        assert!(response.is_tool_error());
    }
    expect_blocked(&mut svc, stuck()).await;
    assert_eq!(mock.calls("search"), 3 + 1 + 1 + 3);
}

#[tokio::test(start_paused = true)]
async fn identical_successful_calls_are_blocked_at_the_general_threshold() {
    // A status tool polled without an exemption: identical successes are a
    // loop too, past `max_repeats` (8).
    let mock = MockMcp::new();
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, true);
    let poll = || tool_call("job_status", json!({"job": 7}));
    let mut blocked = Vec::new();
    for n in 1..=50 {
        match send(&mut svc, poll()).await {
            Ok(response) => assert!(!response.is_tool_error()),
            Err(err) => blocked.push((n, what(err.downcast_ref::<LoopDetected>().unwrap()))),
        }
    }
    assert_eq!(mock.calls("job_status"), 8);
    assert_eq!(blocked.len(), 42);
    assert_eq!(blocked[0], (9, (LoopPattern::Repeated, 9)));
    assert_eq!(blocked[41], (50, (LoopPattern::Repeated, 50)));
    let log = log.lock().unwrap();
    assert_eq!(
        log[..2],
        [
            Seen::warned("job_status", 8),
            Seen::blocked("job_status", 9)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_exempt_polling_tool_is_never_blocked_nor_recorded() {
    let mock = failing("search");
    let (mut svc, log) = guard(
        LoopGuardLayer::builder().tool("job_status", |b| b.exempt(true)),
        &mock,
        true,
    );
    let poll = || tool_call("job_status", json!({"job": 7}));
    for _ in 0..50 {
        expect_forwarded(&mut svc, poll()).await.unwrap();
    }
    mock.set_default("job_status", Step::tool_error("job 7 not found"));
    for _ in 0..50 {
        assert!(expect_forwarded(&mut svc, poll())
            .await
            .unwrap()
            .is_tool_error());
    }
    assert_eq!(mock.calls("job_status"), 100);
    assert!(log.lock().unwrap().is_empty());

    // Its successes are not progress: they do not clear another call's streak.
    mock.set_default("job_status", Step::ok("running"));
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, tool_call("search", json!({"q": "x"}))).await;
        expect_forwarded(&mut svc, poll()).await.unwrap();
    }
    expect_blocked(&mut svc, tool_call("search", json!({"q": "x"}))).await;
}

#[tokio::test(start_paused = true)]
async fn polling_limits_allow_identical_successes_but_not_identical_failures() {
    let mock = MockMcp::new();
    let builder = LoopGuardLayer::builder()
        .window_calls(32)
        .tool("job_status", |b| {
            b.limits(ToolLimits {
                max_failing_repeats: Some(5),
                ..ToolLimits::polling()
            })
        });
    let (mut svc, _) = guard(builder, &mock, false);
    let poll = || tool_call("job_status", json!({"job": 7}));
    for _ in 0..50 {
        expect_forwarded(&mut svc, poll()).await.unwrap();
    }
    mock.set_default("job_status", Step::tool_error("job 7 not found"));
    for _ in 0..5 {
        expect_forwarded(&mut svc, poll()).await.unwrap();
    }
    assert_eq!(
        what(&expect_blocked(&mut svc, poll()).await),
        (LoopPattern::RepeatedFailure, 6)
    );
    // Other tools keep the layer's limits.
    mock.set_default("search", Step::tool_error("boom"));
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, tool_call("search", json!({}))).await;
    }
    expect_blocked(&mut svc, tool_call("search", json!({}))).await;
}

#[tokio::test(start_paused = true)]
async fn an_a_b_cycle_is_caught() {
    for pending_first in BOTH_READINESS_MODES {
        let mock = MockMcp::new();
        let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, pending_first);
        let a = || tool_call("list_files", json!({"dir": "src"}));
        let b = || tool_call("read_file", json!({"path": "src/lib.rs"}));
        for _ in 0..3 {
            expect_forwarded(&mut svc, a()).await.unwrap();
            expect_forwarded(&mut svc, b()).await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), [Seen::warned("read_file", 3)]);
        let refusal = expect_blocked(&mut svc, a()).await;
        assert_eq!(what(&refusal), (LoopPattern::Cycle { period: 2 }, 4));
        assert_eq!(refusal.tool(), "list_files");
        // Carrying on with the cycle, or asking again, is refused as well.
        expect_blocked(&mut svc, b()).await;
        expect_blocked(&mut svc, a()).await;
        assert_eq!((mock.calls("list_files"), mock.calls("read_file")), (3, 3));
        // Something else that works breaks the loop.
        expect_forwarded(
            &mut svc,
            tool_call("read_file", json!({"path": "README.md"})),
        )
        .await
        .unwrap();
        expect_forwarded(&mut svc, a()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn three_call_cycles_are_caught_unless_the_period_is_limited_to_two() {
    let calls = [
        ("a", json!({"n": 1})),
        ("b", json!({"n": 2})),
        ("c", json!({"n": 3})),
    ];
    let mock = MockMcp::new();
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    for (tool, args) in calls.iter().cycle().take(9) {
        expect_forwarded(&mut svc, tool_call(tool, args.clone()))
            .await
            .unwrap();
    }
    let refusal = expect_blocked(&mut svc, tool_call("a", json!({"n": 1}))).await;
    assert_eq!(what(&refusal), (LoopPattern::Cycle { period: 3 }, 4));

    let (mut svc, log) = guard(LoopGuardLayer::builder().max_cycle_period(2), &mock, false);
    for (tool, args) in calls.iter().cycle().take(60) {
        expect_forwarded(&mut svc, tool_call(tool, args.clone()))
            .await
            .unwrap();
    }
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_tool_out_of_cycle_detection_is_never_blocked_for_a_cycle() {
    let mock = MockMcp::new();
    let builder = LoopGuardLayer::builder().tool("job_status", |b| b.limits(ToolLimits::polling()));
    let (mut svc, log) = guard(builder, &mock, false);
    for job in 0..40 {
        // Polling two jobs in turn: A, B, A, B, ...
        expect_forwarded(&mut svc, tool_call("job_status", json!({"job": job % 2})))
            .await
            .unwrap();
    }
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn calls_leave_the_history_after_the_time_window() {
    let mock = failing("search");
    let builder = LoopGuardLayer::builder()
        .window_time(Duration::from_secs(60))
        .bounds(Bounds::default().idle_timeout(None));
    let (mut svc, _) = guard(builder, &mock, false);
    let call = || tool_call("search", json!({"q": "x"}));
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, call()).await;
    }
    tokio::time::advance(Duration::from_secs(59)).await;
    expect_blocked(&mut svc, call()).await;
    // The first three failures are now older than the window; the refusal is not.
    tokio::time::advance(Duration::from_secs(2)).await;
    expect_blocked(&mut svc, call()).await;
    tokio::time::advance(Duration::from_secs(60)).await;
    let _ = expect_forwarded(&mut svc, call()).await;
    assert_eq!(mock.calls("search"), 4);
}

#[tokio::test(start_paused = true)]
async fn calls_leave_the_history_after_window_calls_newer_calls() {
    // A window of 8 calls: three failures, then `others` other failing calls.
    for (others, blocked) in [(5, true), (6, false)] {
        let mock = failing("search");
        let builder = LoopGuardLayer::builder()
            .window_calls(8)
            .max_cycle_period(2);
        let (mut svc, _) = guard(builder, &mock, false);
        for _ in 0..3 {
            let _ = expect_forwarded(&mut svc, tool_call("search", json!({"q": "x"}))).await;
        }
        for i in 0..others {
            let _ = expect_forwarded(&mut svc, tool_call("search", json!({"q": i}))).await;
        }
        // With 6 others, the first failure was pushed out: two remain.
        let result = send(&mut svc, tool_call("search", json!({"q": "x"}))).await;
        assert_eq!(
            result.is_err_and(|e| e.is::<LoopDetected>()),
            blocked,
            "{others} others"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn sessions_are_kept_apart() {
    let mock = failing("search");
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    let call = |session: Option<&str>| {
        let request = tool_call("search", json!({"q": "x"}));
        match session {
            Some(session) => in_session(session, request),
            None => request,
        }
    };
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, call(Some("agent-1"))).await;
    }
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, call(Some("agent-2"))).await;
        let _ = expect_forwarded(&mut svc, call(None)).await;
    }
    expect_blocked(&mut svc, call(Some("agent-1"))).await;
    expect_blocked(&mut svc, call(Some("agent-2"))).await;
    expect_blocked(&mut svc, call(None)).await;
    assert_eq!(mock.calls("search"), 9);
    assert_eq!(
        svc.tracked_sessions(),
        2,
        "the default session is not a tracked session"
    );
    // Clones share the histories.
    expect_blocked(&mut svc.clone(), call(Some("agent-1"))).await;
}

#[tokio::test(start_paused = true)]
async fn only_tool_calls_are_guarded() {
    let mock = MockMcp::new();
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, true);
    for _ in 0..50 {
        expect_forwarded(&mut svc, Request::new(1, "tools/list", None))
            .await
            .unwrap();
        expect_forwarded(&mut svc, Request::new(2, "ping", Some(json!({}))))
            .await
            .unwrap();
    }
    assert!(log.lock().unwrap().is_empty());
    // Untouched: no fingerprint was computed for them.
    assert!(mock
        .requests()
        .iter()
        .all(|r| McpRequest::extension::<Fingerprint>(r).is_none()));
}

#[tokio::test(start_paused = true)]
async fn continuations_of_a_call_are_not_repeats() {
    // A tool that asks for input several times (2026-07-28): each
    // continuation carries the same name and arguments.
    let mock = MockMcp::new();
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, false);
    for round in 0..20 {
        let params = json!({
            "name": "deploy",
            "arguments": {"env": "prod"},
            "inputResponses": {"confirm": {"action": "accept", "round": round}},
        });
        expect_forwarded(&mut svc, Request::new(round, "tools/call", Some(params)))
            .await
            .unwrap();
    }
    assert_eq!(mock.calls("deploy"), 20);
    assert!(log.lock().unwrap().is_empty());
    // The plain call is still guarded.
    for _ in 0..8 {
        expect_forwarded(&mut svc, tool_call("deploy", json!({"env": "prod"})))
            .await
            .unwrap();
    }
    expect_blocked(&mut svc, tool_call("deploy", json!({"env": "prod"}))).await;
}

#[tokio::test(start_paused = true)]
async fn the_fingerprint_is_computed_once_and_shared_with_later_layers() {
    let mock = MockMcp::new();
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    let args = json!({"q": "tower", "_meta": {"progressToken": 9}});
    expect_forwarded(&mut svc, tool_call("search", args.clone()))
        .await
        .unwrap();
    let seen = McpRequest::extension::<Fingerprint>(&mock.requests()[0]).copied();
    assert_eq!(seen, Some(fingerprint("search", args.as_object())));

    // A fingerprint an earlier layer stored is used as it is: these calls
    // have different arguments but carry one fingerprint.
    mock.set_default("search", Step::tool_error("boom"));
    let shared = Fingerprint(42);
    for q in ["a", "b", "c", "d"] {
        let mut request = tool_call("search", json!({"q": q}));
        request.extensions.insert(shared);
        if q == "d" {
            expect_blocked(&mut svc, request).await;
        } else {
            let _ = expect_forwarded(&mut svc, request).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn refusals_by_layers_below_are_neither_success_nor_failure() {
    // A rate limiter below refuses every call: not the agent's fault, and it
    // says when to retry, so it is neither a failing streak nor a repeat.
    let inner = tower::service_fn(|_: Request| async {
        Err::<Response, BoxError>(Box::new(RateLimited::new("search", Duration::from_secs(2))))
    });
    let layer = LoopGuardLayer::new();
    let mut svc = LoopGuard::new(ReadyChecked::new(inner), &layer);
    let call = || tool_call("search", json!({"q": "x"}));
    for n in 1..=20 {
        let err = expect_forwarded(&mut svc, call()).await.unwrap_err();
        assert!(err.is::<RateLimited>(), "call {n}: {err}");
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_calls_are_neither_success_nor_failure() {
    let mock = failing("search");
    mock.push("search", [Step::Hang, Step::Hang, Step::Hang]);
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    let call = || tool_call("search", json!({"q": "x"}));
    for _ in 0..3 {
        let future = svc.ready().await.unwrap().call(call());
        drop(future); // the agent gave up
    }
    assert_eq!(mock.in_flight(), 0);
    for _ in 0..3 {
        assert!(expect_forwarded(&mut svc, call())
            .await
            .unwrap()
            .is_tool_error());
    }
    assert_eq!(
        what(&expect_blocked(&mut svc, call()).await),
        (LoopPattern::RepeatedFailure, 4)
    );
}

#[tokio::test(start_paused = true)]
async fn readiness_is_passed_through_and_kept_by_a_refusal() {
    let mock = failing("search");
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, true);
    let mut cx = Context::from_waker(Waker::noop());
    // The inner service answers Pending first: so does the guard.
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Pending));
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let _ = svc.call(tool_call("search", json!({}))).await;
    for _ in 0..2 {
        let _ = send(&mut svc, tool_call("search", json!({}))).await;
    }
    // Reserve, then get refused: the inner service was not called...
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Pending));
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let refused = svc.call(tool_call("search", json!({}))).await.unwrap_err();
    assert!(refused.is::<LoopDetected>());
    assert_eq!(mock.calls("search"), 3);
    // ...so its reservation still stands: ready at once, and the next call uses it.
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let other = svc.call(tool_call("other", json!({}))).await.unwrap();
    assert!(!other.is_tool_error());
}

#[tokio::test(start_paused = true)]
async fn a_refusal_renders_as_an_is_error_result_that_names_the_tool_and_says_to_change_approach() {
    let mock = failing("search");
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    for _ in 0..3 {
        let _ = send(&mut svc, tool_call("search", json!({"q": "x"}))).await;
    }
    let err = send(&mut svc, tool_call("search", json!({"q": "x"})))
        .await
        .unwrap_err();
    let result = FailureReport::from_error("search", err.as_ref()).to_tool_result();
    assert_eq!(result["isError"], true);
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("search called 4 times with the same arguments, failing each time"),
        "{text}"
    );
    assert!(text.contains("change approach"), "{text}");
    assert_eq!(
        result["structuredContent"]["toolwarden"]["layer"],
        "loop_guard"
    );
    assert_eq!(result["structuredContent"]["toolwarden"]["tool"], "search");

    // A cycle names the call that was refused and the cycle's length.
    let cycle = LoopDetected::new("read_file", 4, LoopPattern::Cycle { period: 2 });
    let result = FailureReport::from_error("read_file", &cycle).to_tool_result();
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("a cycle of 2 calls ending in read_file") && text.contains("change approach"),
        "{text}"
    );
    // And it converts into the response the edge answers with.
    let response = Response::from_tool_result(None, result);
    assert!(response.is_tool_error());
}

#[tokio::test(start_paused = true)]
async fn malformed_tool_calls_never_panic() {
    let mock = MockMcp::new();
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    let odd = [
        Request::new(1, "tools/call", None),
        Request::new(1, "tools/call", Some(json!([1, 2]))),
        Request::new(1, "tools/call", Some(json!({"name": 7}))),
        Request::new(
            1,
            "tools/call",
            Some(json!({"name": "search", "arguments": "not an object"})),
        ),
        Request::new(
            1,
            "tools/call",
            Some(json!({"name": "search", "arguments": null})),
        ),
        Request::new(
            1,
            "tools/call",
            Some(json!({"name": "", "arguments": {"": {"_meta": 1}}})),
        ),
        Request::new(
            1,
            "tools/call",
            Some(json!({"name": "search", "arguments": {"deep": [[[[[[[[[[{}]]]]]]]]]]}})),
        ),
    ];
    for request in odd {
        // Whatever the server answers, the guard neither panics nor refuses
        // a first call.
        let _ = expect_forwarded(&mut svc, request).await;
    }
    let long_session = "s".repeat(100_000);
    let request = in_session(&long_session, tool_call("search", json!({})));
    expect_forwarded(&mut svc, request).await.unwrap();
}

/// A passthrough service guards nothing: the identical failing call a
/// normal guard blocks the fourth time reaches the tool every time, with
/// the tool's own answer and no event.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    let call = || tool_call("search", json!({"q": "tower"}));
    let mock = failing("search");
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, false);
    assert!(!svc.is_passthrough());
    for _ in 0..3 {
        expect_forwarded(&mut svc, call()).await.unwrap();
    }
    expect_blocked(&mut svc, call()).await;
    assert_eq!(mock.calls("search"), 3);
    assert_eq!(log.lock().unwrap().len(), 2, "warned, then blocked");

    let mock = failing("search");
    let (svc, log) = guard(LoopGuardLayer::builder(), &mock, true);
    let mut svc = svc.passthrough();
    assert!(svc.is_passthrough());
    for n in 1..=10 {
        let response = send(&mut svc, call()).await.unwrap();
        assert!(response.is_tool_error(), "call {n}: the tool's own failure");
    }
    assert_eq!(mock.calls("search"), 10);
    assert!(log.lock().unwrap().is_empty(), "no warning, no refusal");
}
