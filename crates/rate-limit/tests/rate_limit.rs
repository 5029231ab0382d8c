//! RateLimitLayer behaviour, over a mock that enforces tower's readiness
//! contract, with a paused tokio clock.

mod support;

use std::future::Future;
use std::pin::pin;
use std::task::Context;

use futures::future::join_all;
use serde_json::json;
use tokio::time::{advance, Instant};
use toolwarden_core::jsonrpc::Request;
use toolwarden_core::testing::{MockMcp, ReadyChecked};
use toolwarden_core::{Bounds, KeyBy, McpResponse};
use toolwarden_rate_limit::{Mode, Rate, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

use support::*;

#[tokio::test(start_paused = true)]
async fn refuses_past_the_burst_with_governors_retry_after() {
    for pending_first in [false, true] {
        let (mut svc, mock) = harness(
            RateLimitLayer::builder().per_tool(Rate::per_second(1), 2),
            pending_first,
        );
        call(&mut svc, tool_call("search")).await.unwrap();
        call(&mut svc, tool_call("search")).await.unwrap();
        assert_refused(call(&mut svc, tool_call("search")).await, "search", secs(1));
        assert_eq!(
            mock.calls("search"),
            2,
            "a refused call must not reach the tool"
        );

        advance(ms(999)).await;
        assert_refused(call(&mut svc, tool_call("search")).await, "search", ms(1));
        advance(ms(1)).await;
        call(&mut svc, tool_call("search")).await.unwrap();
        assert_eq!(mock.calls("search"), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn tools_have_their_own_quotas_and_overrides_apply() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1)),
        true,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_refused(call(&mut svc, tool_call("search")).await, "search", secs(1));
    call(&mut svc, tool_call("fetch")).await.unwrap();
    call(&mut svc, tool_call("send_email")).await.unwrap();

    advance(secs(1)).await;
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_refused(
        call(&mut svc, tool_call("send_email")).await,
        "send_email",
        secs(59),
    );
    assert_eq!(mock.calls("send_email"), 1);
}

#[tokio::test(start_paused = true)]
async fn the_global_quota_spans_every_tool() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder().global(Rate::per_second(2), 2),
        false,
    );
    call(&mut svc, tool_call("a")).await.unwrap();
    call(&mut svc, tool_call("b")).await.unwrap();
    assert_refused(call(&mut svc, tool_call("c")).await, "global", ms(500));
    assert_eq!(mock.total_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_global_refusal_gives_the_tool_token_back() {
    // The tool quota is slow to refill, the global one fast: a call refused
    // by the global quota must not leave the tool quota spent.
    let (mut svc, _) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_minute(1), 2)
            .global(Rate::per_second(1), 1),
        true,
    );
    call(&mut svc, tool_call("a")).await.unwrap();
    assert_refused(call(&mut svc, tool_call("a")).await, "global", secs(1));
    advance(secs(1)).await;
    // Without the refund, the tool's second token would be gone.
    call(&mut svc, tool_call("a")).await.unwrap();
    advance(secs(1)).await;
    assert_refused(call(&mut svc, tool_call("a")).await, "a", secs(58));
}

#[tokio::test(start_paused = true)]
async fn a_tool_refusal_does_not_spend_the_global_quota() {
    let (mut svc, _) = harness(
        RateLimitLayer::builder()
            .global(Rate::per_minute(2), 2)
            .per_tool(Rate::per_minute(1), 1),
        false,
    );
    call(&mut svc, tool_call("a")).await.unwrap();
    for _ in 0..5 {
        assert_refused(call(&mut svc, tool_call("a")).await, "a", secs(60));
    }
    call(&mut svc, tool_call("b")).await.unwrap();
    assert_refused(call(&mut svc, tool_call("c")).await, "global", secs(30));
}

#[tokio::test(start_paused = true)]
async fn session_tool_keys_give_each_session_its_own_quota() {
    let (mut svc, _) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_minute(1), 1)
            .key_by(KeyBy::SessionTool),
        true,
    );
    call(&mut svc, session_call("s1", "search")).await.unwrap();
    assert_refused(
        call(&mut svc, session_call("s1", "search")).await,
        "s1/search",
        secs(60),
    );
    call(&mut svc, session_call("s2", "search")).await.unwrap();
    call(&mut svc, session_call("s1", "fetch")).await.unwrap();
    // Calls without a session share the session `-`.
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_refused(
        call(&mut svc, tool_call("search")).await,
        "-/search",
        secs(60),
    );
    assert_eq!(svc.limits().keys(), 4);
}

#[tokio::test(start_paused = true)]
async fn only_tool_calls_are_limited_unless_all_methods_are() {
    let list = || Request::new(1, "tools/list", None);
    let (mut svc, _) = harness(
        RateLimitLayer::builder().global(Rate::per_minute(1), 1),
        false,
    );
    for _ in 0..3 {
        call(&mut svc, list()).await.unwrap();
        call(&mut svc, Request::new(2, "ping", None)).await.unwrap();
    }
    call(&mut svc, tool_call("search")).await.unwrap();

    let (mut svc, _) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_minute(1), 1)
            .limit_all_methods(true),
        true,
    );
    call(&mut svc, list()).await.unwrap();
    assert_refused(call(&mut svc, list()).await, "tools/list", secs(60));
    call(&mut svc, Request::new(2, "ping", None)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn wait_mode_waits_for_the_token_then_calls() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: secs(2) }),
        true,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    let start = Instant::now();
    call(&mut svc, tool_call("search")).await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= secs(1) && waited <= secs(1) + ms(1),
        "waited {waited:?}"
    );
    assert_eq!(mock.calls("search"), 2);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_at_once_past_max_wait() {
    let (events, seen) = recorded_events();
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::new(1, secs(10)), 1)
            .mode(Mode::Wait { max_wait: secs(2) })
            .events(events),
        false,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    let start = Instant::now();
    assert_refused(
        call(&mut svc, tool_call("search")).await,
        "search",
        secs(10),
    );
    assert_eq!(start.elapsed(), ms(0));
    assert_eq!(mock.calls("search"), 1);
    assert_eq!(*seen.lock().unwrap(), [("search".to_owned(), secs(10))]);
}

#[tokio::test(start_paused = true)]
async fn waiting_calls_are_admitted_in_turn_until_max_wait() {
    // Three calls at once on a quota of one per second.
    async fn three_at_once(
        max_wait: std::time::Duration,
    ) -> (Vec<Option<std::time::Duration>>, usize) {
        let (svc, mock) = harness(
            RateLimitLayer::builder()
                .per_tool(Rate::per_second(1), 1)
                .mode(Mode::Wait { max_wait }),
            true,
        );
        let start = Instant::now();
        let calls = (0..3).map(|_| {
            let mut svc = svc.clone();
            async move {
                let result = call(&mut svc, tool_call("search")).await;
                result.ok().map(|_| start.elapsed())
            }
        });
        let mut done = join_all(calls).await;
        done.sort();
        (done, mock.calls("search"))
    }

    let (done, calls) = three_at_once(secs(5)).await;
    assert_eq!(done, [Some(secs(0)), Some(secs(1)), Some(secs(2))]);
    assert_eq!(calls, 3);

    // Both waiters wake at 1 s; the one that loses would need until 2 s,
    // past its 1.5 s budget, and is refused then.
    let (done, calls) = three_at_once(ms(1500)).await;
    assert_eq!(done, [None, Some(secs(0)), Some(secs(1))]);
    assert_eq!(calls, 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_leaves_the_handle_usable() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: secs(5) }),
        true,
    );
    call(&mut svc, tool_call("search")).await.unwrap();

    svc.ready().await.unwrap();
    let mut waiting = pin!(svc.call(tool_call("search")));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(waiting.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        format!("{waiting:?}"),
        "ResponseFuture { state: \"Waiting\" }"
    );

    // The handle holds a fresh clone, polled ready again before its next call.
    call(&mut svc, tool_call("fetch")).await.unwrap();
    assert_eq!(mock.calls("search"), 1);

    waiting.await.unwrap();
    assert_eq!(mock.calls("search"), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_waiting_call_spends_nothing() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: secs(5) }),
        false,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    svc.ready().await.unwrap();
    let waiting = svc.call(tool_call("search"));
    drop(waiting);
    advance(secs(1)).await;
    // The token that refilled at 1 s is still there.
    let start = Instant::now();
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(start.elapsed(), ms(0));
    assert_eq!(mock.calls("search"), 2);
}

#[tokio::test(start_paused = true)]
async fn every_refusal_is_reported_as_an_event() {
    let (events, seen) = recorded_events();
    let (mut svc, _) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .global(Rate::per_second(2), 2)
            .events(events),
        false,
    );
    call(&mut svc, tool_call("a")).await.unwrap();
    let _ = call(&mut svc, tool_call("a")).await.unwrap_err();
    call(&mut svc, tool_call("b")).await.unwrap();
    let _ = call(&mut svc, tool_call("c")).await.unwrap_err();
    assert_eq!(
        *seen.lock().unwrap(),
        [("a".to_owned(), secs(1)), ("global".to_owned(), ms(500))]
    );
}

#[tokio::test(start_paused = true)]
async fn keys_past_the_bound_share_an_overflow_quota_and_overrides_keep_theirs() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_minute(2), 2)
            .tool("wire_money", |b| b.per_tool(Rate::per_hour(1), 1))
            .key_by(KeyBy::SessionTool)
            .bounds(Bounds::max_keys(2).idle_timeout(None)),
        true,
    );
    call(&mut svc, session_call("s1", "search")).await.unwrap();
    call(&mut svc, session_call("s2", "search")).await.unwrap();
    assert_eq!(svc.limits().keys(), 2);

    // s3 and s4 do not fit: they share one per_tool quota (burst 2).
    call(&mut svc, session_call("s3", "search")).await.unwrap();
    call(&mut svc, session_call("s4", "search")).await.unwrap();
    assert_refused(
        call(&mut svc, session_call("s5", "search")).await,
        "s5/search",
        secs(30),
    );

    // An overridden tool past the bound keeps its own, stricter quota.
    call(&mut svc, session_call("s6", "wire_money"))
        .await
        .unwrap();
    assert_refused(
        call(&mut svc, session_call("s7", "wire_money")).await,
        "s7/wire_money",
        secs(3600),
    );
    assert_eq!(svc.limits().keys(), 2);
    assert_eq!(mock.calls("search"), 4);
    assert_eq!(mock.calls("wire_money"), 1);
}

#[tokio::test(start_paused = true)]
async fn idle_eviction_never_forgets_a_spent_quota() {
    // An idle timeout of one minute is raised to the hour this quota takes to refill.
    let (mut svc, _) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_hour(1), 1)
            .bounds(Bounds::max_keys(100).idle_timeout(Some(secs(60)))),
        false,
    );
    call(&mut svc, tool_call("a")).await.unwrap();
    for (i, tool) in ["b", "c", "d"].into_iter().enumerate() {
        advance(secs(70)).await;
        call(&mut svc, tool_call(tool)).await.unwrap();
        assert_eq!(svc.limits().keys(), i + 2);
    }
    assert_refused(call(&mut svc, tool_call("a")).await, "a", secs(3600 - 210));

    // Keys idle for two refill periods are evicted (a, refilled by then, is admitted again).
    advance(secs(3600)).await;
    call(&mut svc, tool_call("e")).await.unwrap(); // first sweep: marks every key idle
    advance(secs(3600)).await;
    call(&mut svc, tool_call("f")).await.unwrap(); // second sweep: evicts a..d
    assert_eq!(svc.limits().keys(), 2); // e (used since the first sweep) and f
    call(&mut svc, tool_call("a")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn odd_requests_never_panic() {
    let long = "x".repeat(100_000);
    let odd = [
        Request::new(1, "tools/call", None),
        Request::new(2, "tools/call", Some(json!({"name": 42}))),
        Request::new(3, "tools/call", Some(json!("not an object"))),
        Request::tool_call(4, "", json!({})),
        Request::tool_call(5, &long, json!({})),
        Request::new(6, "", None),
    ];
    for key_by in [
        KeyBy::Tool,
        KeyBy::SessionTool,
        KeyBy::Server,
        KeyBy::custom(|r| r.target().to_owned()),
    ] {
        let (mut svc, _) = harness(
            RateLimitLayer::builder()
                .per_tool(Rate::per_second(1), 1)
                .limit_all_methods(true)
                .key_by(key_by),
            false,
        );
        for req in odd.iter().cloned() {
            // Admitted or refused, never a panic.
            let _ = call(&mut svc, req).await;
        }
    }
    // A tools/call without a tool name is keyed by its method.
    let limits = RateLimitLayer::builder()
        .per_tool(Rate::per_minute(1), 1)
        .build()
        .unwrap()
        .limits();
    assert!(limits.check(&odd[0]).is_ok());
    assert_eq!(limits.check(&odd[1]).unwrap_err().key(), "tools/call");
}

#[tokio::test]
async fn the_service_and_its_future_are_send_and_clones_share_limits() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<Svc>();
    let (mut svc, _) = harness(
        RateLimitLayer::builder().per_tool(Rate::per_minute(1), 1),
        false,
    );
    svc.ready().await.unwrap();
    assert_send(&svc.call(tool_call("b")));
    let clone = svc.clone();
    assert!(svc.limits().check(&tool_call("a")).is_ok());
    assert!(clone.limits().check(&tool_call("a")).is_err());
    // Everything from one layer shares its limits; another build does not.
    let builder = || RateLimitLayer::builder().per_tool(Rate::per_minute(1), 1);
    let layer = builder().build().unwrap();
    let (one, two) = (layer.limits(), layer.limits());
    assert!(one.check(&tool_call("a")).is_ok());
    assert!(two.check(&tool_call("a")).is_err());
    let other = builder().build().unwrap().limits();
    assert!(other.check(&tool_call("a")).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_max_wait_too_long_to_represent_waits_without_panicking() {
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait {
                max_wait: std::time::Duration::MAX,
            }),
        true,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    let start = Instant::now();
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(start.elapsed(), secs(1));
    assert_eq!(mock.calls("search"), 2);
}

/// A call waiting for its tool's token does not hold the readiness of the
/// service below (here a concurrency limit of one): a call to another tool,
/// whose quota is untouched, is answered at once.
#[tokio::test(start_paused = true)]
async fn a_waiting_call_does_not_hold_the_inner_services_readiness() {
    let mock = MockMcp::new();
    let below = tower::limit::ConcurrencyLimit::new(ReadyChecked::new(mock.clone()), 1);
    let svc = RateLimitLayer::builder()
        .per_tool(Rate::per_second(1), 1)
        .mode(Mode::Wait { max_wait: secs(5) })
        .build()
        .unwrap()
        .layer(below);
    let mut a = svc.clone();
    call(&mut a, tool_call("a")).await.unwrap();
    let start = Instant::now();
    let waiting = tokio::spawn(async move {
        call(&mut a, tool_call("a")).await.unwrap();
        start.elapsed()
    });
    // Let the second call to `a` start waiting for its token.
    tokio::task::yield_now().await;
    let mut b = svc.clone();
    call(&mut b, tool_call("b")).await.unwrap();
    assert_eq!(
        start.elapsed(),
        ms(0),
        "the call to b waited behind a's token"
    );
    assert_eq!(waiting.await.unwrap(), secs(1));
    assert_eq!(mock.calls("a"), 2);
    assert_eq!(mock.calls("b"), 1);
}

/// Waiters for one tool each reserve their own place in the quota's
/// schedule: they are admitted one per emission interval, in the order they
/// arrived, however they are polled, and none is refused while the schedule
/// fits in `max_wait`.
#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_one_per_interval_in_arrival_order() {
    let (svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: ms(3600) }),
        true,
    );
    let mut first = svc.clone();
    call(&mut first, tool_call("search")).await.unwrap(); // the burst, at 0
    let start = Instant::now();
    // Waiter i arrives at i × 100 ms; they are polled latest arrival first.
    let waiters = (1..=4u64).rev().map(|i| {
        let mut svc = svc.clone();
        async move {
            tokio::time::sleep(ms(100 * i)).await;
            let result = call(&mut svc, tool_call("search")).await;
            (
                i,
                result.map(|_| start.elapsed()).map_err(|e| e.to_string()),
            )
        }
    });
    let mut done = join_all(waiters).await;
    done.sort_by_key(|(i, _)| *i);
    let expected: Vec<_> = (1..=4u64).map(|i| (i, Ok(secs(i)))).collect();
    assert_eq!(done, expected);
    assert_eq!(mock.calls("search"), 5);
}

/// A waiter reserves its place in the global quota too: a later global
/// place postpones the call, and calls to other tools queue behind it there.
#[tokio::test(start_paused = true)]
async fn waiters_reserve_their_place_in_the_global_quota_too() {
    let (svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(10), 1)
            .global(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: secs(5) }),
        true,
    );
    let start = Instant::now();
    let calls = ["a", "b", "a"].map(|tool| {
        let mut svc = svc.clone();
        async move {
            call(&mut svc, tool_call(tool)).await.unwrap();
            start.elapsed()
        }
    });
    assert_eq!(join_all(calls).await, [secs(0), secs(1), secs(2)]);
    assert_eq!((mock.calls("a"), mock.calls("b")), (2, 1));
    // The schedule goes on after the last place: the next call waits until 3 s.
    let mut svc = svc.clone();
    call(&mut svc, tool_call("c")).await.unwrap();
    assert_eq!(start.elapsed(), secs(3));
}

/// A passthrough service asks no quota and spends none: past the burst a
/// normal service refuses, every call reaches the tool and gets its answer.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    let builder = || RateLimitLayer::builder().per_tool(Rate::per_second(1), 2);
    let (mut svc, mock) = harness(builder(), true);
    assert!(!svc.is_passthrough());
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_refused(call(&mut svc, tool_call("search")).await, "search", secs(1));
    assert_eq!(mock.calls("search"), 2);

    let (svc, mock) = harness(builder(), true);
    let mut svc = svc.passthrough();
    assert!(svc.is_passthrough());
    for _ in 0..10 {
        let response = call(&mut svc, tool_call("search")).await.unwrap();
        assert_eq!(response.first_text().unwrap(), "search ok");
    }
    assert_eq!(mock.calls("search"), 10);
    assert!(
        svc.limits().check(&tool_call("search")).is_ok(),
        "no token spent"
    );
}
