//! HedgeLayer over the scripted mock, on a paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use toolwarden_core::classify::TransportErrorKind;
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    Bounds, BoxError, CallKind, Classify, Event, Events, KeyBy, McpClassifier, McpRequest,
    McpResponse, ToolCatalog, ToolPolicy,
};
use toolwarden_hedge::{BudgetConfig, HedgeBuilder, HedgeLayer};
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn call(id: i64, tool: &str) -> Request {
    Request::tool_call(id, tool, json!({"q": "x"}))
}

/// A trusted catalog: `lookup` read-only and idempotent, `search` read-only
/// only, `put` idempotent only, `send` with no hints.
fn catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    catalog.fill_from_tools_list(&json!({"tools": [
        {"name": "lookup", "annotations": {"readOnlyHint": true, "idempotentHint": true}},
        {"name": "search", "annotations": {"readOnlyHint": true}},
        {"name": "put", "annotations": {"idempotentHint": true}},
        {"name": "send"},
    ]}));
    catalog.set_trusted(true);
    catalog
}

fn layer(f: impl FnOnce(HedgeBuilder) -> HedgeBuilder) -> HedgeLayer {
    f(HedgeLayer::builder().catalog(catalog()).delay(ms(50)))
        .build()
        .unwrap()
}

fn recorder() -> (Events, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let events = Events::new().with(move |e: &Event<'_>| {
        if let Event::Hedged { key, delay } = e {
            sink.lock().unwrap().push(format!("{key} {delay:?}"));
        }
    });
    (events, seen)
}

async fn one(
    layer: &HedgeLayer,
    upstream: &MockMcp,
    request: Request,
) -> Result<Response, BoxError> {
    let mut svc = layer.layer(ReadyChecked::new(upstream.clone()));
    ready_call(&mut svc, request).await
}

#[tokio::test(start_paused = true)]
async fn a_slow_safe_call_is_hedged_and_the_loser_cancelled() {
    let (events, seen) = recorder();
    let hedge = layer(|b| b.events(events));
    let upstream =
        MockMcp::new().script("lookup", [Step::ok("slow").after(Duration::from_secs(5))]);
    let answer = one(&hedge, &upstream, call(7, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("lookup ok"));
    // The caller's id, though the hedge went out under its own.
    assert_eq!(answer.id, Id::Number(7));
    let ids: Vec<Id> = upstream.requests().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, [Id::Number(7), Id::String("7#tw-hedge".into())]);
    // The slow first copy was dropped (cancelled), not left running.
    assert_eq!(upstream.in_flight(), 0);
    assert_eq!(*seen.lock().unwrap(), ["lookup 50ms"]);
}

#[tokio::test(start_paused = true)]
async fn a_fast_answer_is_never_hedged() {
    let hedge = layer(|b| b);
    let upstream = MockMcp::new().script("lookup", [Step::ok("fast").after(ms(49))]);
    let answer = one(&hedge, &upstream, call(1, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("fast"));
    assert_eq!(upstream.calls("lookup"), 1);
}

#[tokio::test(start_paused = true)]
async fn tools_not_safe_to_send_twice_and_other_methods_are_never_hedged() {
    let hedge = layer(|b| b);
    let slow = Step::ok("slow").after(Duration::from_secs(5));
    // Read-only without idempotentHint, idempotent without readOnlyHint, no hints.
    for tool in ["search", "put", "send", "unknown"] {
        let upstream = MockMcp::new().default_step(tool, slow.clone());
        let answer = one(&hedge, &upstream, call(1, tool)).await.unwrap();
        assert_eq!(answer.first_text().as_deref(), Some("slow"), "{tool}");
        assert_eq!(upstream.calls(tool), 1, "{tool}");
    }
    // An untrusted catalog: nothing from annotations.
    let untrusted = catalog();
    untrusted.set_trusted(false);
    let hedge = HedgeLayer::builder()
        .catalog(untrusted.clone())
        .delay(ms(50))
        .build()
        .unwrap();
    let upstream = MockMcp::new().default_step("lookup", slow.clone());
    one(&hedge, &upstream, call(1, "lookup")).await.unwrap();
    assert_eq!(upstream.calls("lookup"), 1);
    // Configuration does count, untrusted or not.
    untrusted.configure(
        "lookup",
        ToolPolicy {
            safe_to_repeat: Some(true),
            ..ToolPolicy::default()
        },
    );
    one(&hedge, &upstream, call(2, "lookup")).await.unwrap();
    assert_eq!(upstream.calls("lookup"), 3);
    // Other methods pass through.
    let upstream = MockMcp::new();
    let list = Request::new(1, "tools/list", None);
    one(&hedge, &upstream, list).await.unwrap();
    assert_eq!(upstream.total_calls(), 0);
    assert_eq!(upstream.requests().len(), 1);
}

/// Regression (found by running the binary): a slow continuation
/// (2026-07-28 `inputResponses` and `requestState`) of a tool safe to send
/// twice was hedged, and the confirmed action reached the server twice.
/// A continuation is never hedged; its tool's first calls still are.
#[tokio::test(start_paused = true)]
async fn a_continuation_is_never_hedged() {
    let hedge = layer(|b| b);
    let upstream =
        MockMcp::new().default_step("lookup", Step::ok("done").after(Duration::from_secs(1)));
    let continuation = Request::new(
        1,
        "tools/call",
        Some(json!({
            "name": "lookup",
            "arguments": {"q": "x"},
            "inputResponses": {"confirm": {"action": "accept"}},
            "requestState": "h-1",
        })),
    );
    assert!(continuation.is_continuation(), "{continuation:?}");
    one(&hedge, &upstream, continuation).await.unwrap();
    assert_eq!(upstream.calls("lookup"), 1);
    one(&hedge, &upstream, call(2, "lookup")).await.unwrap();
    assert_eq!(upstream.calls("lookup"), 3, "a first call is hedged");
}

#[tokio::test(start_paused = true)]
async fn per_tool_overrides_beat_the_catalog() {
    let hedge = layer(|b| {
        b.tool("send", |t| t.safe_to_hedge(true).delay(ms(10)))
            .tool("lookup", |t| t.safe_to_hedge(false))
    });
    let slow = Step::ok("slow").after(Duration::from_secs(1));
    let upstream = MockMcp::new()
        .script("send", [slow.clone()])
        .script("lookup", [slow]);
    one(&hedge, &upstream, call(1, "send")).await.unwrap();
    one(&hedge, &upstream, call(2, "lookup")).await.unwrap();
    assert_eq!(upstream.calls("send"), 2);
    assert_eq!(upstream.calls("lookup"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failure_before_the_delay_is_returned_at_once() {
    let hedge = layer(|b| b);
    let upstream = MockMcp::new().script(
        "lookup",
        [Step::tool_error("upstream timed out").after(ms(10))],
    );
    let answer = one(&hedge, &upstream, call(1, "lookup")).await.unwrap();
    assert!(answer.is_tool_error());
    assert_eq!(upstream.calls("lookup"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_answer_waits_for_the_other_attempt() {
    let hedge = layer(|b| b);
    // The first attempt fails after the hedge was sent; the hedge answers well.
    let upstream = MockMcp::new().script(
        "lookup",
        [
            Step::tool_error("temporarily unavailable").after(ms(60)),
            Step::ok("good").after(ms(100)),
        ],
    );
    let answer = one(&hedge, &upstream, call(1, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("good"));
    // The hedge fails first; the first attempt answers well later.
    let upstream = MockMcp::new().script(
        "lookup",
        [
            Step::ok("first").after(ms(300)),
            Step::rpc_error(-32603, "internal").after(ms(10)),
        ],
    );
    let answer = one(&hedge, &upstream, call(2, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("first"));
    assert_eq!(answer.id, Id::Number(2));
    // Both fail: the first attempt's failure is the answer.
    let upstream = MockMcp::new().script(
        "lookup",
        [
            Step::tool_error("first failure").after(ms(100)),
            Step::closed().after(ms(10)),
        ],
    );
    let answer = one(&hedge, &upstream, call(3, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("first failure"));
    let upstream = MockMcp::new().script(
        "lookup",
        [
            Step::closed().after(ms(100)),
            Step::tool_error("hedge failure").after(ms(100)),
        ],
    );
    let answer = one(&hedge, &upstream, call(4, "lookup")).await;
    assert!(answer.is_err(), "the first attempt's transport error");
    assert_eq!(upstream.in_flight(), 0);
}

/// Regression (found by running the composed stack): the first attempt's
/// failure was the answer even when it said the request never left and
/// the hedge had reached the server, so "never sent" was untrue of the
/// call, and the retry layer above sent a tool that is not safe to repeat
/// again (three copies at the server for one call). Whichever attempt
/// fails first, the call now answers with the hedge's sent failure then.
#[tokio::test(start_paused = true)]
async fn a_never_sent_failure_is_not_the_answer_when_the_hedge_was_sent() {
    let classify = |result: &Result<Response, BoxError>| {
        McpClassifier::new().classify(CallKind::ToolCall, result.as_ref())
    };
    let hedge = layer(|b| b);
    let unsent = || Step::Transport(TransportErrorKind::ConnectFailed);
    // The first attempt's connect fails slowly, after the hedge closed.
    let upstream = MockMcp::new().script("lookup", [unsent().after(ms(200)), Step::closed()]);
    let answer = one(&hedge, &upstream, call(1, "lookup")).await;
    assert!(!classify(&answer).before_sent, "{answer:?}");
    // The hedge closes after the first attempt's connect failed.
    let upstream = MockMcp::new().script(
        "lookup",
        [unsent().after(ms(60)), Step::closed().after(ms(100))],
    );
    let answer = one(&hedge, &upstream, call(2, "lookup")).await;
    assert!(!classify(&answer).before_sent, "{answer:?}");
    // Neither left: "never sent" is true, and the first attempt's.
    let upstream = MockMcp::new().script("lookup", [unsent().after(ms(200)), unsent()]);
    let answer = one(&hedge, &upstream, call(3, "lookup")).await;
    assert!(classify(&answer).before_sent, "{answer:?}");
    // The hedge never left: the first attempt's failure, as before.
    let upstream = MockMcp::new().script(
        "lookup",
        [Step::tool_error("first failure").after(ms(200)), unsent()],
    );
    let answer = one(&hedge, &upstream, call(4, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("first failure"));
    assert_eq!(upstream.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_hedges() {
    // No deposits, a floor of 2 hedges (1 per second over 2 s).
    let budget = BudgetConfig {
        ratio: 0.0,
        min_per_sec: 1,
        ttl: Duration::from_secs(2),
    };
    let hedge = layer(|b| b.budget(budget));
    let upstream = MockMcp::new().default_step("lookup", Step::ok("slow").after(ms(200)));
    let calls = (0..10).map(|id| one(&hedge, &upstream, call(id, "lookup")));
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(Result::is_ok));
    assert_eq!(upstream.calls("lookup"), 12, "10 calls and 2 hedges");
    assert_eq!(hedge.budget_available(), 0);
    // The window passes: the floor is back.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(hedge.budget_available(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_delay_follows_the_tools_percentile_once_it_has_enough_samples() {
    let hedge = layer(|b| b.min_samples(20).delay(Duration::from_secs(1)));
    let upstream = MockMcp::new().default_step("lookup", Step::ok("ok").after(ms(30)));
    let request = call(0, "lookup");
    // One waited-for answer in four is recorded: the 20th sample is the
    // 77th call's.
    for id in 0..76 {
        one(&hedge, &upstream, call(id, "lookup")).await.unwrap();
        assert_eq!(hedge.delay_for(&request), Some(Duration::from_secs(1)));
    }
    one(&hedge, &upstream, call(76, "lookup")).await.unwrap();
    assert_eq!(hedge.delay_for(&request), Some(ms(30)));
    // Other tools keep the fixed delay; unsafe ones have none.
    let lookup2 = layer(|b| b.tool("other", |t| t.safe_to_hedge(true)));
    assert_eq!(lookup2.delay_for(&call(0, "other")), Some(ms(50)));
    assert_eq!(hedge.delay_for(&call(0, "send")), None);
    // With the percentile, the next slow call is hedged after 30 ms.
    upstream.push("lookup", [Step::ok("slow").after(Duration::from_secs(5))]);
    let answer = one(&hedge, &upstream, call(77, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("ok"));
    // Without a percentile, always the fixed delay.
    let fixed = layer(|b| b.percentile(None));
    for id in 0..30 {
        one(&fixed, &upstream, call(id, "lookup")).await.unwrap();
    }
    assert_eq!(fixed.delay_for(&request), Some(ms(50)));
}

#[tokio::test(start_paused = true)]
async fn tools_with_an_override_keep_their_own_record_past_the_maps_bound() {
    // A map of one key: tools found only through the catalog would share
    // its overflow record; tools with an override keep theirs beside it.
    let hedge = layer(|b| {
        let b = b
            .min_samples(1)
            .delay(Duration::from_secs(1))
            .bounds(Bounds {
                max_keys: 1,
                idle_timeout: None,
            });
        ["lookup", "search", "fetch"]
            .into_iter()
            .fold(b, |b, tool| b.tool(tool, |t| t.safe_to_hedge(true)))
    });
    let latencies = [("lookup", 30), ("search", 80), ("fetch", 120)];
    let mut upstream = MockMcp::new();
    for (tool, after) in latencies {
        upstream = upstream.default_step(tool, Step::ok("ok").after(ms(after)));
    }
    for id in 0..8 {
        for (tool, _) in latencies {
            one(&hedge, &upstream, call(id, tool)).await.unwrap();
        }
    }
    for (tool, after) in latencies {
        assert_eq!(hedge.delay_for(&call(0, tool)), Some(ms(after)), "{tool}");
    }
    // Keyed otherwise (here one record for the server), the map keeps them.
    let shared = layer(|b| {
        b.min_samples(1)
            .key_by(KeyBy::Server)
            .tool("lookup", |t| t.safe_to_hedge(true))
            .tool("fetch", |t| t.safe_to_hedge(true))
    });
    for tool in ["fetch", "lookup"] {
        for id in 0..8 {
            one(&shared, &upstream, call(id, tool)).await.unwrap();
        }
    }
    // The record's first sample was fetch's (computed again at 16 samples).
    assert_eq!(shared.delay_for(&call(0, "lookup")), Some(ms(120)));
}

#[tokio::test(start_paused = true)]
async fn pending_readiness_is_propagated_and_each_copy_is_readied() {
    let hedge = layer(|b| b);
    let upstream =
        MockMcp::new().script("lookup", [Step::ok("slow").after(Duration::from_secs(5))]);
    let mut svc = hedge.layer(ReadyChecked::new(upstream.clone()).pending_first());
    let answer = ready_call(&mut svc, call(1, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("lookup ok"));
    assert_eq!(upstream.calls("lookup"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_drops_both_copies() {
    let hedge = layer(|b| b);
    let upstream = MockMcp::new().default_step("lookup", Step::Hang);
    let mut svc = hedge.layer(upstream.clone());
    let pending = async {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        svc.call(call(1, "lookup")).await
    };
    let timed = tokio::time::timeout(Duration::from_secs(1), pending).await;
    assert!(timed.is_err());
    assert_eq!(upstream.calls("lookup"), 2, "hedged after 50 ms");
    assert_eq!(upstream.in_flight(), 0);
}

/// An inner service whose clones fail readiness after the first call: the
/// hedge cannot be sent, the first attempt goes on and answers.
#[derive(Clone)]
struct FailsSecondReadiness {
    inner: MockMcp,
    calls: Arc<Mutex<u32>>,
}

impl Service<Request> for FailsSecondReadiness {
    type Response = Response;
    type Error = BoxError;
    type Future = <MockMcp as Service<Request>>::Future;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        if *self.calls.lock().unwrap() > 0 {
            return std::task::Poll::Ready(Err("overloaded".into()));
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        *self.calls.lock().unwrap() += 1;
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_whose_readiness_fails_is_not_sent() {
    let hedge = layer(|b| b);
    let upstream = MockMcp::new().script("lookup", [Step::ok("slow").after(ms(500))]);
    let svc = FailsSecondReadiness {
        inner: upstream.clone(),
        calls: Arc::default(),
    };
    let answer = hedge.layer(svc).oneshot(call(1, "lookup")).await.unwrap();
    assert_eq!(answer.first_text().as_deref(), Some("slow"));
    assert_eq!(upstream.calls("lookup"), 1);
}
