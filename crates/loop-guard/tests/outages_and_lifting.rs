//! Issue 15, "the standard stack is correct as a whole": the loop guard's
//! share of it. Services built from one layer share their state; the
//! upstream being down and refusals by other layers build no loop; a
//! refusal in force lifts when the same call succeeds for anyone, when the
//! tool's circuit closes, or after a cool-down.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    BoxError, CircuitView, Circuits, FailureReport, LoopPattern, McpResponse, RateLimited,
};
use toolwarden_loop_guard::LoopGuardLayer;
use tower::{Layer, Service, ServiceExt};

use support::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn search() -> Request {
    tool_call("search", json!({"q": "tower"}))
}

/// Three identical failing calls, then the refused fourth.
async fn make_refused<S>(svc: &mut S, request: impl Fn() -> Request)
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    for _ in 0..3 {
        let forwarded = expect_forwarded(svc, request()).await;
        assert!(forwarded.is_ok_and(|response| response.is_tool_error()));
    }
    assert_eq!(
        what(&expect_blocked(svc, request()).await),
        (LoopPattern::RepeatedFailure, 4)
    );
}

// ---------------------------------------------------------------------------
// 1. State shared by every service built from one layer.

#[tokio::test(start_paused = true)]
async fn services_built_from_one_layer_and_its_clones_share_their_histories() {
    let mock = MockMcp::new().default_step("search", Step::tool_error("upstream exploded"));
    let layer = LoopGuardLayer::builder().build().unwrap();
    // A stack that builds one service per connection.
    let mut first = layer.layer(ReadyChecked::new(mock.clone()));
    let mut second = layer.layer(ReadyChecked::new(mock.clone()));
    let mut from_clone = layer.clone().layer(ReadyChecked::new(mock.clone()));
    let _ = expect_forwarded(&mut first, search()).await;
    let _ = expect_forwarded(&mut second, search()).await;
    let _ = expect_forwarded(&mut from_clone, search()).await;
    // The fourth identical failing call is the fourth, whichever service it
    // goes through.
    expect_blocked(&mut first, search()).await;
    expect_blocked(&mut second, search()).await;
    expect_blocked(&mut from_clone, search()).await;
    assert_eq!(mock.calls("search"), 3);
    let _ = expect_forwarded(&mut second, in_session("a", search())).await;
    assert_eq!(first.tracked_sessions(), 1);
}

// ---------------------------------------------------------------------------
// 2. What builds a loop.

/// An inner service failing with an I/O timeout: a `Timeout` outcome.
fn timing_out() -> ReadyChecked<impl Service<Request, Response = Response, Error = BoxError> + Clone>
{
    ReadyChecked::new(tower::service_fn(|_: Request| async {
        Err::<Response, BoxError>(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "upstream timed out",
        )))
    }))
}

#[tokio::test(start_paused = true)]
async fn an_agent_polling_through_an_upstream_restart_is_never_refused() {
    // The upstream is down for 6 s; the agent polls every 0.5 s: 12
    // transport failures of one call, more than max_repeats (8).
    let mock = MockMcp::new();
    mock.push("job_status", (0..12).map(|_| Step::closed()));
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, true);
    let poll = || tool_call("job_status", json!({"job": 7}));
    for n in 0..12 {
        let err = expect_forwarded(&mut svc, poll()).await.unwrap_err();
        assert!(!err.to_string().is_empty(), "poll {n}");
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    // It is back: the agent is served.
    let response = expect_forwarded(&mut svc, poll()).await.unwrap();
    assert!(!response.is_tool_error());
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
}

#[tokio::test(start_paused = true)]
async fn timeouts_build_no_loop() {
    let layer = LoopGuardLayer::new();
    let mut svc = layer.layer(timing_out());
    for n in 0..20 {
        let err = expect_forwarded(&mut svc, search()).await.unwrap_err();
        assert!(err.to_string().contains("timed out"), "call {n}: {err}");
    }
}

// ---------------------------------------------------------------------------
// 3. A refusal in force lifts.

#[tokio::test(start_paused = true)]
async fn a_refusal_lifts_when_the_same_call_succeeds_in_another_session() {
    let mock = MockMcp::new().default_step("search", Step::tool_error("index unavailable"));
    let layer = LoopGuardLayer::new();
    let mut svc = layer.layer(ReadyChecked::new(mock.clone()));
    let mut other_connection = layer.layer(ReadyChecked::new(mock.clone()));
    let stuck = || in_session("agent-1", search());
    make_refused(&mut svc, stuck).await;
    tokio::time::advance(secs(1)).await;
    expect_blocked(&mut svc, stuck()).await;
    // Another agent makes the identical call, and it works now.
    mock.push("search", [Step::ok("found")]);
    let found = expect_forwarded(&mut other_connection, in_session("agent-2", search()))
        .await
        .unwrap();
    assert!(!found.is_tool_error());
    // The refusal lifts: agent-1's call goes through as a fresh attempt.
    tokio::time::advance(secs(1)).await;
    mock.push("search", [Step::ok("found")]);
    assert!(!expect_forwarded(&mut svc, stuck())
        .await
        .unwrap()
        .is_tool_error());
    // Its streak restarted: three more failures before the next refusal.
    make_refused(&mut svc, stuck).await;
    expect_blocked(&mut svc, stuck()).await;
}

/// A success is newer than a refusal when it came after the refusal began,
/// even when its call was made before: a call still in flight when another
/// session was refused, answered afterwards, lifts that refusal. (The guard
/// stamps a success with its call's admission time only when no block was
/// made since; here one was, and the answer's time counts.)
#[tokio::test(start_paused = true)]
async fn a_success_answered_after_a_refusal_began_lifts_it_though_its_call_was_made_before() {
    let inner = ReadyChecked::new(tower::service_fn(|request: Request| async move {
        let slow = toolwarden_core::McpRequest::session_key(&request) == Some("agent-2");
        if slow {
            tokio::time::sleep(secs(5)).await;
            return Ok::<_, BoxError>(Response::result(
                request.id,
                json!({"content": [{"type": "text", "text": "found"}]}),
            ));
        }
        Ok(Response::result(
            request.id,
            json!({"content": [{"type": "text", "text": "index unavailable"}], "isError": true}),
        ))
    }));
    let layer = LoopGuardLayer::new();
    let mut svc = layer.layer(inner.clone());
    let mut other = layer.layer(inner);
    // agent-2's call is admitted at 0 s (in `call`), and answered 5 s
    // after it is first polled.
    let in_flight = other
        .ready()
        .await
        .unwrap()
        .call(in_session("agent-2", search()));
    // agent-1 is refused from 1 s.
    tokio::time::advance(secs(1)).await;
    let stuck = || in_session("agent-1", search());
    make_refused(&mut svc, stuck).await;
    expect_blocked(&mut svc, stuck()).await;
    // agent-2's answer, a success, comes after the refusal began.
    let found = in_flight.await.unwrap();
    assert!(!found.is_tool_error());
    // The refusal lifts: agent-1's call goes through.
    tokio::time::advance(secs(1)).await;
    let _ = expect_forwarded(&mut svc, stuck()).await;
}

/// A circuit view whose one circuit a test opens and closes.
#[derive(Debug, Default)]
struct OneCircuit(AtomicBool);

impl CircuitView for OneCircuit {
    fn is_open(&self, key: &str) -> bool {
        key == "search" && self.0.load(Ordering::SeqCst)
    }

    fn open_keys(&self) -> Vec<String> {
        if self.0.load(Ordering::SeqCst) {
            vec!["search".into()]
        } else {
            Vec::new()
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_made_while_the_circuit_was_open_lifts_when_it_closes() {
    let mock = MockMcp::new().default_step("search", Step::tool_error("index unavailable"));
    let circuit = Arc::new(OneCircuit::default());
    let builder = LoopGuardLayer::builder().circuits(Circuits::new(circuit.clone()));
    let (mut svc, _) = guard(builder, &mock, false);

    // The failures opened the breaker below; the refusal is made while open.
    for _ in 0..3 {
        let _ = expect_forwarded(&mut svc, search()).await;
    }
    circuit.0.store(true, Ordering::SeqCst);
    expect_blocked(&mut svc, search()).await;
    tokio::time::advance(secs(5)).await;
    expect_blocked(&mut svc, search()).await;
    // The circuit closes: the refusal lifts, a fresh attempt goes through.
    circuit.0.store(false, Ordering::SeqCst);
    tokio::time::advance(secs(1)).await;
    let _ = expect_forwarded(&mut svc, search()).await;
    assert_eq!(mock.calls("search"), 4);

    // A refusal made while the circuit is closed (the normal case) does not
    // lift merely because the circuit is still closed.
    for _ in 0..2 {
        let _ = expect_forwarded(&mut svc, search()).await;
    }
    expect_blocked(&mut svc, search()).await;
    tokio::time::advance(secs(1)).await;
    expect_blocked(&mut svc, search()).await;
    assert_eq!(mock.calls("search"), 6);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_lifts_after_the_default_cool_down_of_30_s_however_often_it_is_asked() {
    let mock = MockMcp::new().default_step("search", Step::tool_error("index unavailable"));
    let (mut svc, _) = guard(LoopGuardLayer::builder(), &mock, false);
    make_refused(&mut svc, search).await;
    // Asking again, every 5 s, does not extend the refusal.
    for _ in 0..5 {
        tokio::time::advance(secs(5)).await;
        expect_blocked(&mut svc, search()).await;
    }
    tokio::time::advance(Duration::from_millis(4_999)).await;
    expect_blocked(&mut svc, search()).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    // 30 s after the refusal: a fresh attempt, whose streak restarts.
    let _ = expect_forwarded(&mut svc, search()).await;
    for _ in 0..2 {
        let _ = expect_forwarded(&mut svc, search()).await;
    }
    expect_blocked(&mut svc, search()).await;
    assert_eq!(mock.calls("search"), 6);
}

#[tokio::test(start_paused = true)]
async fn the_cool_down_counts_from_the_first_block_even_past_the_time_window() {
    // Calls are remembered 10 s; the agent asks every second for 40 s.
    let mock = MockMcp::new().default_step("search", Step::tool_error("index unavailable"));
    let builder = LoopGuardLayer::builder().window_time(secs(10));
    let (mut svc, _) = guard(builder, &mock, false);
    make_refused(&mut svc, search).await;
    for t in 1..30 {
        tokio::time::advance(secs(1)).await;
        let refused = send(&mut svc, search()).await;
        assert!(
            refused.is_err_and(|e| e.is::<toolwarden_core::LoopDetected>()),
            "t={t}"
        );
    }
    tokio::time::advance(secs(1)).await;
    let _ = expect_forwarded(&mut svc, search()).await;
}

#[tokio::test(start_paused = true)]
async fn the_cool_down_is_configurable() {
    let mock = MockMcp::new().default_step("search", Step::tool_error("index unavailable"));
    let builder = LoopGuardLayer::builder().refusal_cooldown(secs(2));
    let (mut svc, _) = guard(builder, &mock, false);
    make_refused(&mut svc, search).await;
    tokio::time::advance(Duration::from_millis(1_999)).await;
    expect_blocked(&mut svc, search()).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    let _ = expect_forwarded(&mut svc, search()).await;
}

// ---------------------------------------------------------------------------
// 4. The scenario of the issue.

/// The mock, behind a lower layer that refuses its first `refusals` calls
/// with `RateLimited`.
fn rate_limited_first(
    mock: &MockMcp,
    refusals: usize,
) -> ReadyChecked<impl Service<Request, Response = Response, Error = BoxError> + Clone> {
    let mock = mock.clone();
    let refused = Arc::new(AtomicUsize::new(0));
    ReadyChecked::new(tower::service_fn(move |request: Request| {
        let mut mock = mock.clone();
        let refuse = refused.fetch_add(1, Ordering::SeqCst) < refusals;
        async move {
            if refuse {
                Err(Box::new(RateLimited::new("search", secs(1))) as BoxError)
            } else {
                // MockMcp is always ready.
                mock.call(request).await
            }
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn the_issue_scenario_rejections_then_transport_failures_then_a_success() {
    let mock = MockMcp::new();
    let layer = LoopGuardLayer::new();
    let mut svc = layer.layer(rate_limited_first(&mock, 3));
    // Refused three times by the rate limiter below, and a fourth call
    // that fails: none of that is a loop.
    for n in 1..=3 {
        let err = expect_forwarded(&mut svc, search()).await.unwrap_err();
        assert!(err.is::<RateLimited>(), "call {n}: {err}");
    }
    mock.push("search", [Step::tool_error("index unavailable")]);
    assert!(expect_forwarded(&mut svc, search())
        .await
        .unwrap()
        .is_tool_error());
    // The 5th call is not refused by the loop guard.
    expect_forwarded(&mut svc, search()).await.unwrap();

    // The upstream goes away: five transport failures, then it is back.
    let fetch = || tool_call("fetch", json!({"url": "https://example.org"}));
    mock.push("fetch", (0..5).map(|_| Step::closed()));
    for n in 1..=5 {
        let err = expect_forwarded(&mut svc, fetch()).await.unwrap_err();
        assert!(err.to_string().contains("mock transport failure"), "{n}");
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    let served = expect_forwarded(&mut svc, fetch()).await.unwrap();
    assert!(!served.is_tool_error());
}

#[tokio::test(start_paused = true)]
async fn a_rejection_rendered_as_an_is_error_result_builds_no_loop() {
    // What the fallback cache answers for a rejection below it: an
    // `isError` result. The classifier (toolwarden-core) reads it as a
    // rejection, so the scenario above holds in this form too.
    let rendered =
        FailureReport::from_error("search", &RateLimited::new("search", secs(1))).to_tool_result();
    let mock = MockMcp::new();
    mock.push("search", (0..3).map(|_| Step::Result(rendered.clone())));
    mock.push("search", [Step::tool_error("index unavailable")]);
    let (mut svc, log) = guard(LoopGuardLayer::builder(), &mock, false);
    for _ in 0..4 {
        assert!(expect_forwarded(&mut svc, search())
            .await
            .unwrap()
            .is_tool_error());
    }
    assert!(!expect_forwarded(&mut svc, search())
        .await
        .unwrap()
        .is_tool_error());
    assert!(log.lock().unwrap().is_empty());
}

#[test]
fn a_layer_debugs_briefly() {
    let debug = format!("{:?}", LoopGuardLayer::new());
    assert!(debug.contains("refusal_cooldown: 30s"), "{debug}");
    assert!(debug.len() < 2_000, "{} bytes: {debug}", debug.len());
}
