//! The circuit breaker's behaviour, driven through the layer with a paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use toolwarden_circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerLayer, CircuitState, LocalTransition, ProbePermit,
    ProbeRequest, RemoteTransition, StateSync, TimeWindow,
};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{Bounds, CircuitView, KeyBy, McpResponse, Rejection, SessionKey};
use tower::{Layer, Service, ServiceExt};

use support::{call, ms, recorded_events, refusal, req, secs, Reply, Scripted, Upstream};
use toolwarden_core::testing::ready_call;

/// Only the consecutive policy, trips at `n`; no jitter.
fn consecutive(n: u32) -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .failure_threshold(n)
        .failure_rate_threshold(None)
        .count_window(None)
        .minimum_calls(1)
        .reset_timeout(secs(30))
        .jitter(0.0)
}

async fn fail_times<S>(svc: &mut S, up: &Scripted, tool: &str, reply: Reply, n: usize)
where
    S: Service<
        toolwarden_core::jsonrpc::Request,
        Response = toolwarden_core::jsonrpc::Response,
        Error = toolwarden_core::BoxError,
    >,
{
    up.set(tool, reply);
    for _ in 0..n {
        let _ = call(svc, tool).await;
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_the_circuit_and_refusals_fail_fast() {
    let layer = consecutive(3).build().unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "search", Reply::ServerError, 2).await;
    assert_eq!(layer.registry().state("search"), Some(CircuitState::Closed));
    fail_times(&mut svc, &up, "search", Reply::Transient, 1).await;
    assert_eq!(layer.registry().state("search"), Some(CircuitState::Open));

    tokio::time::advance(secs(10)).await;
    let err = call(&mut svc, "search").await.unwrap_err();
    let open = refusal(&err).expect("a CircuitOpen");
    assert_eq!(open.key(), "search");
    assert_eq!(open.retry_after(), Some(secs(20)));
    assert_eq!(up.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_success_breaks_the_streak() {
    let layer = consecutive(3).build().unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    for _ in 0..5 {
        fail_times(&mut svc, &up, "t", Reply::ServerError, 2).await;
        fail_times(&mut svc, &up, "t", Reply::Ok, 1).await;
    }
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn client_failures_and_rejections_never_trip_it() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(2)
        .minimum_calls(2)
        .count_window(4)
        .failure_rate_threshold(0.5)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "t", Reply::Client, 50).await;
    fail_times(&mut svc, &up, "t", Reply::Rejected, 50).await;
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(snap.state, CircuitState::Closed);
    assert_eq!(
        snap.count_window.unwrap().calls,
        0,
        "ignored outcomes are not in the window"
    );
    assert_eq!(snap.totals.ignored, 100);
    let kinds: Vec<_> = snap
        .recent_errors
        .iter()
        .map(|e| (e.kind, e.class, e.counted, e.count))
        .collect();
    assert_eq!(
        kinds,
        [
            ("rejected", Some("transient"), false, 50),
            ("tool_error", Some("client"), false, 50)
        ]
    );
    // Ignored outcomes do not break a streak of counted failures either.
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    fail_times(&mut svc, &up, "t", Reply::Client, 1).await;
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
}

/// The window case peers get wrong: the count window is the last N calls.
#[tokio::test(start_paused = true)]
async fn count_window_is_the_last_100_calls() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(None)
        .count_window(100)
        .failure_rate_threshold(0.5)
        .minimum_calls(100)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "t", Reply::Ok, 1000).await;
    up.set("t", Reply::ServerError);
    let mut failures = 0;
    while layer.registry().state("t") == Some(CircuitState::Closed) {
        call(&mut svc, "t").await.unwrap();
        failures += 1;
        assert!(failures <= 50, "still closed after {failures} failures");
    }
    assert_eq!(failures, 50);
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.failure_rate(), Some(0.5));
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_gate_the_rate_policy() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(None)
        .count_window(10)
        .failure_rate_threshold(0.5)
        .minimum_calls(4)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "t", Reply::ServerError, 3).await;
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(None)
        .count_window(None)
        .time_window(TimeWindow::new(secs(10), 10))
        .failure_rate_threshold(0.5)
        .minimum_calls(4)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    // 3 failures, then 11 s later 1 failure and 3 successes: the old ones left the window.
    fail_times(&mut svc, &up, "t", Reply::ServerError, 3).await;
    tokio::time::advance(secs(11)).await;
    fail_times(&mut svc, &up, "t", Reply::Ok, 3).await;
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(snap.state, CircuitState::Closed);
    let w = snap.time_window.unwrap();
    assert_eq!((w.calls, w.failures), (4, 1));
    // Two more failures within the window: 3 of 6.
    fail_times(&mut svc, &up, "t", Reply::ServerError, 2).await;
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_it() {
    let layer = CircuitBreakerLayer::builder()
        .failure_threshold(None)
        .failure_rate_threshold(None)
        .count_window(4)
        .slow_call_duration(secs(2))
        .slow_call_rate_threshold(0.75)
        .minimum_calls(4)
        .build()
        .unwrap();
    let mock = MockMcp::new().default_step("t", Step::ok("slow").after(secs(2)));
    let mut svc = layer.layer(mock.clone());
    for _ in 0..2 {
        call(&mut svc, "t").await.unwrap();
    }
    mock.set_default("t", Step::ok("fast").after(ms(1999)));
    call(&mut svc, "t").await.unwrap();
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
    mock.set_default("t", Step::ok("slow").after(secs(3)));
    call(&mut svc, "t").await.unwrap();
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.slow_call_rate(), Some(0.75));
    assert_eq!(snap.totals.slow, 3);
}

#[tokio::test(start_paused = true)]
async fn half_open_probe_closes_or_reopens_with_growing_periods() {
    let (events, seen) = recorded_events();
    let layer = consecutive(1)
        .reset_timeout(secs(10))
        .reset_multiplier(2.0)
        .max_reset_timeout(secs(35))
        .success_threshold(2)
        .events(events)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    // Failed probes: 10 s, then 20 s, 35 s (capped), 35 s.
    for period in [10, 20, 35, 35] {
        let err = call(&mut svc, "t").await.unwrap_err();
        assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(period)));
        tokio::time::advance(secs(period)).await;
        call(&mut svc, "t").await.unwrap(); // the probe, which fails
        assert_eq!(registry.state("t"), Some(CircuitState::Open));
    }
    // A clean close needs 2 successes, then the period is back to the base.
    up.set("t", Reply::Ok);
    tokio::time::advance(secs(35)).await;
    call(&mut svc, "t").await.unwrap();
    assert_eq!(registry.state("t"), Some(CircuitState::HalfOpen));
    call(&mut svc, "t").await.unwrap();
    assert_eq!(registry.state("t"), Some(CircuitState::Closed));
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(10)));

    let seen = seen.lock().unwrap();
    let opened = seen.iter().filter(|e| *e == "circuit_opened:t").count();
    let half = seen
        .iter()
        .filter(|e| *e == "circuit_half_opened:t")
        .count();
    let closed = seen.iter().filter(|e| *e == "circuit_closed:t").count();
    assert_eq!((opened, half, closed), (6, 5, 1), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_open_periods_within_bounds() {
    let layer = consecutive(1)
        .reset_timeout(secs(100))
        .max_reset_timeout(secs(105))
        .jitter(0.1)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    let mut periods = Vec::new();
    for i in 0..40 {
        let tool = format!("t{i}");
        fail_times(&mut svc, &up, &tool, Reply::ServerError, 1).await;
        let err = call(&mut svc, &tool).await.unwrap_err();
        periods.push(refusal(&err).unwrap().retry_after().unwrap());
    }
    assert!(
        periods.iter().all(|p| *p >= secs(90) && *p <= secs(105)),
        "{periods:?}"
    );
    assert!(
        periods.iter().any(|p| *p != periods[0]),
        "no spread: {periods:?}"
    );
}

/// 64 calls right after the cooldown: exactly `half_open_max_calls` reach the upstream.
#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_max_calls_of_64_concurrent() {
    let layer = consecutive(1).half_open_max_calls(3).build().unwrap();
    let up = Upstream::new();
    let svc = layer.layer(up.clone());
    let first = tokio::spawn(svc.clone().oneshot(req("t")));
    tokio::task::yield_now().await;
    up.pop().unwrap().answer(Reply::ServerError);
    first.await.unwrap().unwrap();
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
    assert_eq!(up.calls(), 1);

    tokio::time::advance(secs(30)).await;
    let calls: Vec<_> = (0..64)
        .map(|_| tokio::spawn(svc.clone().oneshot(req("t"))))
        .collect();
    // Let every task run its call; the admitted ones wait at the upstream.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(up.calls(), 1 + 3);
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(
        (snap.state, snap.half_open_in_flight),
        (CircuitState::HalfOpen, 3)
    );
    for held in up.take_held() {
        held.answer(Reply::Ok);
    }
    let results = join_all(calls).await;
    let refused = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .unwrap()
                .as_ref()
                .is_err_and(|e| refusal(e).is_some())
        })
        .count();
    assert_eq!(refused, 61);
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
}

/// The same on a multi-threaded runtime, with the calls made from 64 threads at once.
#[test]
fn half_open_admits_exactly_max_calls_across_threads() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let layer = rt.block_on(async {
        consecutive(1)
            .half_open_max_calls(5)
            .reset_timeout(ms(20))
            .max_reset_timeout(ms(20))
            .build()
            .unwrap()
    });
    let up = Upstream::new();
    let svc = layer.layer(up.clone());
    let _guard = rt.enter();
    let mut first = svc.clone();
    let pending = rt.block_on(first.ready()).unwrap().call(req("t"));
    up.pop().unwrap().answer(Reply::ServerError);
    rt.block_on(pending).unwrap();
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
    std::thread::sleep(ms(40)); // past the open period

    let barrier = Arc::new(std::sync::Barrier::new(64));
    let futures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..64 {
            let (barrier, mut svc, futures, handle) = (
                Arc::clone(&barrier),
                svc.clone(),
                &futures,
                rt.handle().clone(),
            );
            s.spawn(move || {
                let _guard = handle.enter();
                barrier.wait();
                // poll_ready is immediately ready; call decides admission.
                let waker = futures::task::noop_waker();
                let mut cx = std::task::Context::from_waker(&waker);
                assert!(svc.poll_ready(&mut cx).is_ready());
                let fut = svc.call(req("t"));
                futures.lock().unwrap().push(fut);
            });
        }
    });
    assert_eq!(up.calls(), 1 + 5);
    for held in up.take_held() {
        held.answer(Reply::Ok);
    }
    let results = rt.block_on(join_all(futures.into_inner().unwrap()));
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_place_back_and_counts_nothing() {
    let layer = consecutive(1).count_window(10).build().unwrap();
    let up = Upstream::new();
    let mut svc = layer.layer(up.clone());
    let f = svc.ready().await.unwrap().call(req("t"));
    up.pop().unwrap().answer(Reply::ServerError);
    f.await.unwrap();
    tokio::time::advance(secs(30)).await;

    let probe = svc.ready().await.unwrap().call(req("t"));
    let err = call(&mut svc, "t").await.unwrap_err();
    assert!(refusal(&err).is_some(), "only one probe at a time");
    drop(probe);
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(
        (snap.state, snap.half_open_in_flight),
        (CircuitState::HalfOpen, 0)
    );
    let probe = svc.ready().await.unwrap().call(req("t"));
    up.take_held().into_iter().for_each(|h| h.answer(Reply::Ok));
    probe.await.unwrap();
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));

    // A dropped call in the closed state counts as nothing.
    let f = svc.ready().await.unwrap().call(req("t"));
    drop(f);
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(snap.count_window.unwrap().calls, 0);
    assert_eq!(snap.totals.failed, 1, "the first failure only");
}

#[tokio::test(start_paused = true)]
async fn calls_admitted_before_the_circuit_opened_do_not_count_after() {
    let layer = consecutive(2).count_window(10).build().unwrap();
    let up = Upstream::new();
    let mut svc = layer.layer(up.clone());
    let slow_one = svc.ready().await.unwrap().call(req("t"));
    for _ in 0..2 {
        let f = svc.ready().await.unwrap().call(req("t"));
        up.pop().unwrap().answer(Reply::ServerError);
        f.await.unwrap();
    }
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
    // The call admitted while closed ends now: it must not close (or count in) the open circuit.
    up.pop().unwrap().answer(Reply::Ok);
    slow_one.await.unwrap();
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(snap.state, CircuitState::Open);
    let window = snap.count_window.unwrap();
    assert_eq!((window.calls, window.failures), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn keys_are_isolated() {
    let layer = consecutive(2).build().unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "a", Reply::ServerError, 2).await;
    assert!(refusal(&call(&mut svc, "a").await.unwrap_err()).is_some());
    for _ in 0..10 {
        call(&mut svc, "b").await.unwrap();
    }
    let registry = layer.registry();
    assert_eq!(registry.state("a"), Some(CircuitState::Open));
    assert_eq!(registry.state("b"), Some(CircuitState::Closed));
    assert!(registry.is_open("a"));
    assert!(!registry.is_open("b"));
    assert_eq!(registry.open_keys(), ["a"]);
    let circuits = registry.circuits();
    assert!(circuits.is_open("a") && !circuits.is_open("b") && !circuits.is_open("never_called"));
}

#[tokio::test(start_paused = true)]
async fn keys_are_bounded_and_share_an_overflow_breaker_past_the_bound() {
    let layer = consecutive(3)
        .bounds(Bounds::max_keys(10).idle_timeout(None))
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    for i in 0..1000 {
        call(&mut svc, &format!("tool_{i}")).await.unwrap();
    }
    let registry = layer.registry();
    assert_eq!(registry.len(), 10);
    let snap = registry.snapshot();
    assert_eq!(snap.circuits.len(), 10);
    assert_eq!(snap.overflow.as_ref().unwrap().state, CircuitState::Closed);
    // Keys past the bound share one breaker; its refusals name the caller's key.
    for tool in ["x1", "x2", "x3"] {
        fail_times(&mut svc, &up, tool, Reply::ServerError, 1).await;
    }
    let err = call(&mut svc, "x4").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().key(), "x4");
    assert!(
        registry.is_open("x9"),
        "the overflow breaker serves every key past the bound"
    );
    assert_eq!(registry.open_keys(), ["(overflow)"]);
    // Keys within the bound are unaffected.
    call(&mut svc, "tool_0").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn keys_can_be_per_session_and_tool() {
    let layer = consecutive(1).key_by(KeyBy::SessionTool).build().unwrap();
    let up = Scripted::new();
    up.set("t", Reply::ServerError);
    let mut svc = layer.layer(up.clone());
    let mut r = req("t");
    toolwarden_core::McpRequest::insert_extension(&mut r, SessionKey::from("s1"));
    let _ = svc.ready().await.unwrap().call(r).await;
    let registry = layer.registry();
    assert_eq!(registry.state("s1/t"), Some(CircuitState::Open));
    up.set("t", Reply::Ok);
    call(&mut svc, "t").await.unwrap(); // no session: key "-/t"
    assert_eq!(registry.state("-/t"), Some(CircuitState::Closed));
    assert_eq!(registry.open_keys(), ["s1/t"]);
}

/// The readiness contract over an inner service that checks it (and answers
/// `Pending` first), through trips, refusals, probes and closes.
#[tokio::test(start_paused = true)]
async fn readiness_contract_holds() {
    let layer = consecutive(2).build().unwrap();
    let mock = MockMcp::new().default_step("t", Step::tool_error("Error executing tool t: boom"));
    let mut svc = layer.layer(ReadyChecked::new(mock.clone()).pending_first());
    for _ in 0..5 {
        let _ = call(&mut svc, "t").await; // 2 failures, then 3 refusals
    }
    assert_eq!(mock.calls("t"), 2);
    mock.set_default("t", Step::ok("fine"));
    tokio::time::advance(secs(30)).await;
    for _ in 0..5 {
        call(&mut svc, "t").await.unwrap();
    }
    assert_eq!(mock.calls("t"), 7);
    // Clones keep their own readiness.
    let mut other = svc.clone();
    call(&mut other, "u").await.unwrap();
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn manual_states() {
    let (events, seen) = recorded_events();
    let layer = consecutive(1).events(events).build().unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();

    // Forced open before the first call: applies to it, and outlives eviction.
    registry.force_open("t");
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(30)));
    assert_eq!(up.calls(), 0);
    registry.force_close("t");
    call(&mut svc, "t").await.unwrap();

    // Disabled: failures pass and are not recorded.
    registry.disable("t");
    fail_times(&mut svc, &up, "t", Reply::ServerError, 5).await;
    let snap = registry.circuit("t").unwrap();
    assert_eq!(
        (snap.state, snap.totals.failed),
        (CircuitState::Disabled, 0)
    );

    // Metrics only: recorded and reported, never refuses.
    registry.metrics_only("t");
    fail_times(&mut svc, &up, "t", Reply::ServerError, 5).await;
    let snap = registry.circuit("t").unwrap();
    assert_eq!(
        (snap.state, snap.totals.failed, snap.consecutive_failures),
        (CircuitState::MetricsOnly, 5, 5)
    );
    assert_eq!(up.calls(), 11);

    // Reset all: fresh and closed, manual states forgotten.
    registry.force_open("u");
    registry.reset_all();
    let snap = registry.snapshot();
    assert!(snap
        .circuits
        .iter()
        .all(|c| c.state == CircuitState::Closed && c.totals.failed == 0));
    call(&mut svc, "u").await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "circuit_opened:t",
            "circuit_closed:t",
            "circuit_opened:u",
            "circuit_closed:u"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn forced_state_survives_idle_eviction() {
    let layer = consecutive(1)
        .max_reset_timeout(secs(30))
        .bounds(Bounds::max_keys(100).idle_timeout(Some(secs(60))))
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    layer.registry().force_open("t");
    for i in 0..4 {
        tokio::time::advance(secs(50)).await;
        call(&mut svc, &format!("other{i}")).await.unwrap(); // inserts run the idle sweep
    }
    assert_eq!(layer.registry().state("t"), None, "evicted");
    assert!(refusal(&call(&mut svc, "t").await.unwrap_err()).is_some());
}

#[tokio::test(start_paused = true)]
async fn snapshot_serialises() {
    let layer = CircuitBreakerLayer::builder()
        .name("github")
        .failure_threshold(None)
        .count_window(4)
        .time_window(TimeWindow::new(secs(60), 6))
        .minimum_calls(4)
        .jitter(0.0)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "search", Reply::Client, 1).await;
    fail_times(&mut svc, &up, "search", Reply::Ok, 2).await;
    fail_times(&mut svc, &up, "search", Reply::ServerError, 1).await;
    fail_times(&mut svc, &up, "search", Reply::Transient, 1).await; // 2 of 4: opens
    tokio::time::advance(secs(5)).await;
    assert!(refusal(&call(&mut svc, "search").await.unwrap_err()).is_some());
    let json = serde_json::to_value(layer.registry().snapshot()).unwrap();
    assert_eq!(json["name"], "github");
    assert_eq!(json["keys"], 1);
    assert_eq!(json["max_keys"], 10_000);
    let c = &json["circuits"][0];
    assert_eq!(c["key"], "search");
    assert_eq!(c["state"], "open");
    assert_eq!(c["retry_after_seconds"], 25.0);
    assert_eq!(c["count_window"]["calls"], 4);
    assert_eq!(c["count_window"]["failures"], 2);
    assert_eq!(c["count_window"]["failure_rate"], 0.5);
    assert_eq!(c["time_window"]["failure_rate"], 0.5);
    assert_eq!(c["totals"]["failed"], 2);
    assert_eq!(c["totals"]["ignored"], 1);
    assert_eq!(c["totals"]["not_permitted"], 1);
    assert_eq!(c["recent_errors"][0]["kind"], "transport");
    assert_eq!(c["recent_errors"][0]["class"], "transient");
    assert_eq!(c["recent_errors"][1]["kind"], "tool_error");
    assert_eq!(c["recent_errors"][1]["class"], "server");
    assert_eq!(c["recent_errors"][1]["counted"], true);
    assert_eq!(c["recent_errors"][2]["kind"], "tool_error");
    assert_eq!(c["recent_errors"][2]["class"], "client");
    assert_eq!(c["recent_errors"][2]["code"], -32602);
    assert_eq!(c["recent_errors"][2]["counted"], false);
    // Each with the wall time it was last seen, newest first.
    let seen: Vec<u64> = (0..3)
        .map(|i| c["recent_errors"][i]["last_seen_unix_ms"].as_u64().unwrap())
        .collect();
    assert!(seen[2] > 1_600_000_000_000, "{seen:?}");
    assert!(seen[0] >= seen[1] && seen[1] >= seen[2], "{seen:?}");
    assert!(json["overflow"].is_null());
}

#[tokio::test(start_paused = true)]
async fn recent_errors_are_bounded() {
    let layer = consecutive(1000).build().unwrap();
    let mut svc = layer.layer(MockMcp::new());
    let mock = svc.get_ref().clone();
    for code in 0..20 {
        mock.set_default("t", Step::rpc_error(-32000 - code, "boom"));
        call(&mut svc, "t").await.unwrap();
    }
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(
        snap.recent_errors.len(),
        toolwarden_circuit_breaker::RECENT_ERRORS
    );
    assert_eq!(snap.recent_errors[0].code, Some(-32019));
}

#[derive(Default)]
struct Outbox(Mutex<Vec<String>>);

impl StateSync for Outbox {
    fn publish(&self, t: &LocalTransition<'_>) {
        self.0.lock().unwrap().push(format!(
            "{}:{}:{:?}",
            t.name,
            t.state.as_str(),
            t.retry_after
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn remote_transitions_open_and_close_local_keys_without_echo() {
    let outbox = Arc::new(Outbox::default());
    let (events, seen) = recorded_events();
    let layer = consecutive(1)
        .sync(outbox.clone())
        .events(events)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();

    // A remote open makes the local key refuse calls until its deadline.
    assert!(registry.apply_remote("t", &RemoteTransition::open(secs(12), "replica-2")));
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(12)));
    assert_eq!(
        registry.circuit("t").unwrap().remote_origin.as_deref(),
        Some("replica-2")
    );
    // An earlier deadline does not shorten it; a later one extends it.
    assert!(!registry.apply_remote("t", &RemoteTransition::open(secs(5), "replica-3")));
    assert!(registry.apply_remote("t", &RemoteTransition::open(secs(20), "replica-3")));
    assert!(registry.is_open("t"));
    // A remote close closes it.
    assert!(registry.apply_remote("t", &RemoteTransition::closed("replica-3")));
    call(&mut svc, "t").await.unwrap();
    assert!(!registry.apply_remote("t", &RemoteTransition::closed("replica-3")));
    // Remote transitions are reported as events, but never published back out.
    assert!(outbox.0.lock().unwrap().is_empty());
    assert_eq!(
        *seen.lock().unwrap(),
        ["circuit_opened:t", "circuit_closed:t"]
    );

    // Local transitions are published.
    up.set("t", Reply::ServerError);
    let _ = call(&mut svc, "t").await;
    tokio::time::advance(secs(30)).await;
    up.set("t", Reply::Ok);
    call(&mut svc, "t").await.unwrap();
    assert_eq!(
        *outbox.0.lock().unwrap(),
        ["t:open:Some(30s)", "t:half_open:None", "t:closed:None"]
    );

    // Manual states win over remote ones.
    registry.disable("t");
    assert!(!registry.apply_remote("t", &RemoteTransition::open(secs(12), "replica-2")));
    call(&mut svc, "t").await.unwrap();
}

/// Keyed per session and tool, a session whose id holds a `/` (an HTTP
/// session id may be any visible ASCII): the name a replica publishes
/// opens that session's circuit on another, and the registry's name
/// lookups find it. The name split at its first `/` made another key
/// (session `user`, tool `42/fetch7`), so the other replica's real circuit
/// stayed closed.
#[tokio::test(start_paused = true)]
async fn a_session_with_a_slash_is_one_circuit_on_every_replica() {
    let in_session = |tool: &str| {
        let mut request = req(tool);
        request.extensions.insert(SessionKey::from("user/42"));
        request
    };
    let outbox = Arc::new(Outbox::default());
    let a = consecutive(1)
        .key_by(KeyBy::SessionTool)
        .sync(outbox.clone())
        .build()
        .unwrap();
    let b = consecutive(1).key_by(KeyBy::SessionTool).build().unwrap();
    let up = Scripted::new();
    up.set("fetch7", Reply::ServerError);
    let mut on_a = a.layer(up.clone());
    let mut on_b = b.layer(up.clone());
    let _ = ready_call(&mut on_a, in_session("fetch7")).await;
    let published = outbox.0.lock().unwrap().clone();
    assert_eq!(published, ["user%2F42/fetch7:open:Some(30s)"]);
    let name = "user%2F42/fetch7";
    assert_eq!(a.registry().state(name), Some(CircuitState::Open));
    assert!(a.registry().is_open(name));

    // Replica b: its circuit of that session and tool, and no other.
    up.set("fetch7", Reply::Ok);
    ready_call(&mut on_b, in_session("fetch7")).await.unwrap();
    assert!(b
        .registry()
        .apply_remote(name, &RemoteTransition::open(secs(12), "a")));
    let refused = ready_call(&mut on_b, in_session("fetch7"))
        .await
        .unwrap_err();
    assert!(refusal(&refused).is_some(), "{refused}");
    let keys: Vec<String> = b
        .registry()
        .snapshot()
        .circuits
        .into_iter()
        .map(|c| c.key)
        .collect();
    assert_eq!(keys, [name]);
    b.registry().force_close(name);
    ready_call(&mut on_b, in_session("fetch7")).await.unwrap();
}

/// A probe-permit provider whose answer the test sets: it records the
/// requests it was asked and the transitions it heard.
struct FakePermit {
    answer: Mutex<ProbePermit>,
    asked: Mutex<Vec<(String, Duration)>>,
    heard: Mutex<Vec<String>>,
}

impl FakePermit {
    fn new(answer: ProbePermit) -> Arc<Self> {
        Arc::new(FakePermit {
            answer: Mutex::new(answer),
            asked: Mutex::new(Vec::new()),
            heard: Mutex::new(Vec::new()),
        })
    }

    fn answer(&self, answer: ProbePermit) {
        *self.answer.lock().unwrap() = answer;
    }

    fn asked(&self) -> usize {
        self.asked.lock().unwrap().len()
    }

    fn heard(&self) -> Vec<String> {
        self.heard.lock().unwrap().clone()
    }
}

impl StateSync for FakePermit {
    fn publish(&self, t: &LocalTransition<'_>) {
        self.heard
            .lock()
            .unwrap()
            .push(format!("{}:{}", t.name, t.state.as_str()));
    }

    fn probe_permit(&self, request: &ProbeRequest<'_>) -> ProbePermit {
        self.asked
            .lock()
            .unwrap()
            .push((request.name.to_owned(), request.probe_timeout));
        *self.answer.lock().unwrap()
    }
}

fn denied(retry_after: Duration) -> ProbePermit {
    ProbePermit::Denied { retry_after }
}

/// Issue 19: a replica denied the fleet-wide probe permit keeps refusing
/// as open, with the denial's `retry_after`, never calls the tool, and
/// counts nothing against it; a closed circuit never asks.
#[tokio::test(start_paused = true)]
async fn a_replica_denied_the_probe_permit_refuses_as_open_without_calling_the_tool() {
    let permit = FakePermit::new(ProbePermit::Granted);
    let layer = consecutive(1)
        .probe_timeout(secs(7))
        .sync(permit.clone())
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(ReadyChecked::new(up.clone()));
    let registry = layer.registry().clone();
    for _ in 0..3 {
        call(&mut svc, "t").await.unwrap();
    }
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(30)));
    assert_eq!(
        permit.asked(),
        0,
        "neither a closed circuit nor the open period asks"
    );

    // The open period is over, but another replica holds the permit.
    tokio::time::advance(secs(30)).await;
    up.set("t", Reply::Ok);
    permit.answer(denied(secs(2)));
    let err = call(&mut svc, "t").await.unwrap_err();
    let open = refusal(&err).expect("a CircuitOpen");
    assert_eq!(open.key(), "t");
    assert_eq!(open.retry_after(), Some(secs(2)));
    assert_eq!(up.calls(), 4, "the denied replica did not call the tool");
    assert_eq!(
        *permit.asked.lock().unwrap(),
        [("t".to_owned(), secs(7))],
        "asked with the key and its probe timeout"
    );
    assert_eq!(registry.state("t"), Some(CircuitState::Open));
    assert!(registry.is_open("t"));

    // Until then it refuses without asking again.
    tokio::time::advance(secs(1)).await;
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(1)));
    assert_eq!(permit.asked(), 1);

    // The refusals are not failures: the trip is the only one, the open
    // period did not grow, nothing was announced.
    let snap = registry.circuit("t").unwrap();
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.totals.failed, 1);
    assert_eq!(snap.totals.not_permitted, 3);
    assert_eq!(snap.reopens, 1);
    assert_eq!(snap.half_open_in_flight, 0);
    assert_eq!(
        snap.retry_after_seconds,
        Some(1.0),
        "the wait for the next ask"
    );
    assert_eq!(permit.heard(), ["t:open"]);

    // Asked again, it is denied again (a zero wait still makes a refusal
    // with a wait), then granted: the probe passes and closes the circuit.
    tokio::time::advance(secs(1)).await;
    permit.answer(denied(Duration::ZERO));
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(ms(1)));
    tokio::time::advance(ms(1)).await;
    permit.answer(ProbePermit::Granted);
    call(&mut svc, "t").await.unwrap();
    assert_eq!(up.calls(), 5);
    assert_eq!(permit.asked(), 3);
    assert_eq!(registry.state("t"), Some(CircuitState::Closed));
    assert_eq!(permit.heard(), ["t:open", "t:half_open", "t:closed"]);
    assert_eq!(registry.circuit("t").unwrap().totals.failed, 1);
}

/// A granted replica probes; each further probe of the half-open circuit
/// asks again, and a denial then refuses without counting or reopening.
#[tokio::test(start_paused = true)]
async fn a_granted_replica_probes_and_each_further_probe_asks_again() {
    let permit = FakePermit::new(ProbePermit::Granted);
    let layer = consecutive(1)
        .half_open_max_calls(2)
        .success_threshold(2)
        .sync(permit.clone())
        .build()
        .unwrap();
    let up = Upstream::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();
    let trip = svc.ready().await.unwrap().call(req("t"));
    up.pop().unwrap().answer(Reply::Transient);
    trip.await.unwrap_err();
    tokio::time::advance(secs(30)).await;

    let first = svc.ready().await.unwrap().call(req("t"));
    assert_eq!(up.calls(), 2, "the granted probe reached the tool");
    assert_eq!(registry.state("t"), Some(CircuitState::HalfOpen));
    permit.answer(denied(ms(500)));
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(ms(500)));
    assert_eq!(up.calls(), 2);
    assert_eq!(registry.state("t"), Some(CircuitState::HalfOpen));
    let snap = registry.circuit("t").unwrap();
    assert_eq!((snap.totals.failed, snap.half_open_in_flight), (1, 1));

    permit.answer(ProbePermit::Granted);
    let second = svc.ready().await.unwrap().call(req("t"));
    assert_eq!(up.calls(), 3);
    for held in up.take_held() {
        held.answer(Reply::Ok);
    }
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(registry.state("t"), Some(CircuitState::Closed));
    assert_eq!(permit.asked(), 3);
    // Closed again: calls never ask.
    let ok = svc.ready().await.unwrap().call(req("t"));
    up.pop().unwrap().answer(Reply::Ok);
    ok.await.unwrap();
    assert_eq!(permit.asked(), 3);
}

/// The shared breaker of the keys past the bound probes on its own: on
/// each replica it stands for other keys.
#[tokio::test(start_paused = true)]
async fn the_overflow_breaker_never_asks_for_a_permit() {
    let permit = FakePermit::new(denied(secs(5)));
    let layer = consecutive(1)
        .bounds(Bounds::max_keys(1).idle_timeout(None))
        .sync(permit.clone())
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    call(&mut svc, "own").await.unwrap();
    fail_times(&mut svc, &up, "past", Reply::ServerError, 1).await;
    assert_eq!(layer.registry().open_keys(), ["(overflow)"]);
    tokio::time::advance(secs(30)).await;
    up.set("past", Reply::Ok);
    call(&mut svc, "past").await.unwrap();
    assert_eq!(permit.asked(), 0);
    assert!(layer.registry().open_keys().is_empty());
}

#[tokio::test(start_paused = true)]
async fn non_tool_requests_key_by_method() {
    let layer = consecutive(1).build().unwrap();
    let up = MockMcp::new();
    let mut svc = layer.layer(up);
    let list = toolwarden_core::jsonrpc::Request::new(1, "tools/list", None);
    svc.ready().await.unwrap().call(list).await.unwrap();
    assert_eq!(
        layer.registry().state("tools/list"),
        Some(CircuitState::Closed)
    );
}

#[test]
fn layer_and_service_are_debug_and_clone() {
    let layer = CircuitBreakerLayer::builder().build().unwrap();
    let svc = layer.layer(MockMcp::new());
    let copy = svc.clone();
    assert!(format!("{layer:?}").contains("CircuitRegistry"));
    assert!(format!("{:?}", copy.registry()).contains("circuit_breaker"));
    let _inner: MockMcp = copy.into_inner();
    let _ = Duration::ZERO;
}

#[tokio::test(start_paused = true)]
async fn changes_for_keys_past_the_bound_leave_the_shared_breaker_alone() {
    let layer = consecutive(1)
        .max_reset_timeout(secs(30))
        .bounds(Bounds::max_keys(1).idle_timeout(Some(secs(100))))
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();
    call(&mut svc, "held").await.unwrap();
    call(&mut svc, "past").await.unwrap(); // served by the overflow breaker
    registry.force_open("past");
    assert!(!registry.apply_remote("other", &RemoteTransition::open(secs(10), "r2")));
    call(&mut svc, "past").await.unwrap();
    call(&mut svc, "other").await.unwrap();
    // Once "held" is evicted, "past" gets a breaker of its own, and its manual state applies.
    tokio::time::advance(secs(100)).await;
    call(&mut svc, "past").await.unwrap(); // the sweep starts an idle period for "held"
    tokio::time::advance(secs(100)).await;
    assert!(refusal(&call(&mut svc, "past").await.unwrap_err()).is_some());
    assert_eq!(registry.state("past"), Some(CircuitState::ForcedOpen));
    assert_eq!(registry.state("held"), None);
    // The overflow breaker itself can be named.
    registry.force_open("(overflow)");
    assert!(refusal(&call(&mut svc, "third").await.unwrap_err()).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_tool_override_trips_its_own_breakers_only() {
    let layer = consecutive(5)
        .tool("fragile", |b| b.failure_threshold(2))
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "fragile", Reply::ServerError, 2).await;
    fail_times(&mut svc, &up, "sturdy", Reply::ServerError, 4).await;
    let registry = layer.registry();
    assert_eq!(registry.state("fragile"), Some(CircuitState::Open));
    assert_eq!(registry.state("sturdy"), Some(CircuitState::Closed));
    assert!(refusal(&call(&mut svc, "fragile").await.unwrap_err()).is_some());
    // The default policy still trips at 5.
    fail_times(&mut svc, &up, "sturdy", Reply::ServerError, 1).await;
    assert_eq!(registry.state("sturdy"), Some(CircuitState::Open));
    assert_eq!(up.calls(), 7);
}

#[tokio::test(start_paused = true)]
async fn a_tool_override_applies_to_every_session_of_the_tool() {
    let layer = consecutive(5)
        .key_by(KeyBy::SessionTool)
        .tool("fragile", |b| b.failure_threshold(1))
        .build()
        .unwrap();
    let up = Scripted::new();
    up.set("fragile", Reply::ServerError);
    up.set("sturdy", Reply::ServerError);
    let mut svc = layer.layer(up.clone());
    for (session, tool) in [("s1", "fragile"), ("s2", "fragile"), ("s1", "sturdy")] {
        let mut r = req(tool);
        toolwarden_core::McpRequest::insert_extension(&mut r, SessionKey::from(session));
        let _ = svc.ready().await.unwrap().call(r).await;
    }
    let registry = layer.registry();
    assert_eq!(registry.state("s1/fragile"), Some(CircuitState::Open));
    assert_eq!(registry.state("s2/fragile"), Some(CircuitState::Open));
    assert_eq!(registry.state("s1/sturdy"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_tool_override_sets_its_own_open_period() {
    // The override is given before the outer policy is finished: the closure
    // sees the outer builder's final values (here failure_threshold 1).
    let layer = CircuitBreakerLayer::builder()
        .tool("slow_to_heal", |b| b.reset_timeout(secs(120)))
        .failure_threshold(1)
        .failure_rate_threshold(None)
        .count_window(None)
        .minimum_calls(1)
        .reset_timeout(secs(30))
        .jitter(0.0)
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "slow_to_heal", Reply::ServerError, 1).await;
    fail_times(&mut svc, &up, "other", Reply::ServerError, 1).await;
    let retry_after = |err: toolwarden_core::BoxError| refusal(&err).unwrap().retry_after();
    assert_eq!(
        retry_after(call(&mut svc, "slow_to_heal").await.unwrap_err()),
        Some(secs(120))
    );
    assert_eq!(
        retry_after(call(&mut svc, "other").await.unwrap_err()),
        Some(secs(30))
    );
    tokio::time::advance(secs(30)).await;
    up.set("other", Reply::Ok);
    up.set("slow_to_heal", Reply::Ok);
    call(&mut svc, "other").await.unwrap(); // its probe passes and closes it
    assert_eq!(
        retry_after(call(&mut svc, "slow_to_heal").await.unwrap_err()),
        Some(secs(90))
    );
    let snap = layer.registry().snapshot();
    assert_eq!(
        snap.circuit("slow_to_heal").unwrap().open_period_seconds,
        Some(120.0)
    );
    assert_eq!(snap.circuit("other").unwrap().state, CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn overrides_of_one_tool_apply_in_order() {
    let layer = consecutive(5)
        .tool("t", |b| b.failure_threshold(2).reset_timeout(secs(60)))
        .tool("t", |b| b.failure_threshold(3))
        .build()
        .unwrap();
    let up = Scripted::new();
    let mut svc = layer.layer(up.clone());
    fail_times(&mut svc, &up, "t", Reply::ServerError, 2).await;
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
    fail_times(&mut svc, &up, "t", Reply::ServerError, 1).await;
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(60)));
}

#[test]
fn tool_overrides_need_keys_that_name_a_tool() {
    for key_by in [KeyBy::Server, KeyBy::custom(|_| "all".to_owned())] {
        let err = consecutive(5)
            .key_by(key_by)
            .tool("t", |b| b.failure_threshold(1))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "key_by");
    }
    // Without overrides those key functions are fine.
    assert!(consecutive(5).key_by(KeyBy::Server).build().is_ok());
}

/// Opens the circuit of `t` (breaker of `consecutive(1)`, reset 30 s) with
/// one server error answered by hand, and waits out its open period: the
/// next call is a half-open probe.
async fn trip_and_wait_out_the_open_period<S>(svc: &mut S, up: &Upstream)
where
    S: Service<
        toolwarden_core::jsonrpc::Request,
        Response = toolwarden_core::jsonrpc::Response,
        Error = toolwarden_core::BoxError,
    >,
{
    let f = svc.ready().await.unwrap().call(req("t"));
    up.pop().unwrap().answer(Reply::ServerError);
    f.await.unwrap();
    tokio::time::advance(secs(30)).await;
}

/// A half-open probe that never ends (nothing below the breaker times it
/// out) counts as a failed probe once `probe_timeout` (default 30 s) has
/// passed: the circuit reopens, from the probe's deadline, with the next
/// open period, and after it a new probe is let through.
#[tokio::test(start_paused = true)]
async fn a_probe_that_never_ends_times_out_and_reopens_the_circuit() {
    let layer = consecutive(1).build().unwrap(); // reset 30 s, multiplier 2
    let up = Upstream::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();
    trip_and_wait_out_the_open_period(&mut svc, &up).await;

    // The probe reaches the upstream and hangs there; its future is never polled.
    let hung = svc.ready().await.unwrap().call(req("t"));
    assert_eq!(up.calls(), 2);
    assert_eq!(registry.state("t"), Some(CircuitState::HalfOpen));
    tokio::time::advance(secs(29)).await;
    let err = call(&mut svc, "t").await.unwrap_err();
    assert!(refusal(&err).is_some(), "the probe is still in flight");

    // 30 s after the probe started it has failed: open for the next period
    // (60 s), counted from the probe's deadline.
    tokio::time::advance(secs(11)).await;
    let err = call(&mut svc, "t").await.unwrap_err();
    assert_eq!(refusal(&err).unwrap().retry_after(), Some(secs(50)));
    assert_eq!(registry.state("t"), Some(CircuitState::Open));
    let snap = registry.circuit("t").unwrap();
    assert_eq!(snap.half_open_in_flight, 0);
    assert_eq!(
        snap.totals.failed, 2,
        "the timed-out probe counts as a failure"
    );
    assert_eq!(up.calls(), 2);

    // The late answer of the timed-out probe counts for nothing, in the
    // totals too (a late failure made the one probe two failures).
    up.pop().unwrap().answer(Reply::ServerError);
    hung.await.unwrap();
    assert_eq!(registry.state("t"), Some(CircuitState::Open));
    let snap = registry.circuit("t").unwrap();
    assert_eq!(snap.totals.failed, 2, "{:?}", snap.totals);
    assert_eq!(snap.totals.slow, 0, "{:?}", snap.totals);

    // After the open period a new probe passes and closes the circuit.
    tokio::time::advance(secs(50)).await;
    let probe = svc.ready().await.unwrap().call(req("t"));
    up.pop().unwrap().answer(Reply::Ok);
    probe.await.unwrap();
    assert_eq!(registry.state("t"), Some(CircuitState::Closed));
}

/// The view other layers ask (`CircuitView::is_open`; the loop guard asks
/// it under its session's lock) reads the circuit without changing it: an
/// expired probe reads as the circuit it reopens, and its timing out, with
/// its event, waits for a call or a read of the registry. Before, the view
/// timed the probe out itself and ran the event sinks (user code) from
/// inside the loop guard's lock.
#[tokio::test(start_paused = true)]
async fn the_view_reads_an_expired_probe_as_open_without_announcing_it() {
    let (events, seen) = recorded_events();
    let layer = consecutive(1).events(events).build().unwrap();
    let up = Upstream::new();
    let mut svc = layer.layer(up.clone());
    let registry = layer.registry().clone();
    trip_and_wait_out_the_open_period(&mut svc, &up).await;
    let _hung = svc.ready().await.unwrap().call(req("t"));
    assert!(
        CircuitView::is_open(&registry, "t"),
        "its one probe in flight: refuses"
    );
    tokio::time::advance(secs(31)).await;
    let before = seen.lock().unwrap().len();
    assert!(
        CircuitView::is_open(&registry, "t"),
        "the expired probe reopens it"
    );
    let announced = seen.lock().unwrap()[before..].to_vec();
    assert!(
        announced.is_empty(),
        "read without announcing anything: {announced:?}"
    );
    assert_eq!(registry.state("t"), Some(CircuitState::Open));
    assert!(
        seen.lock().unwrap().len() > before,
        "a read of the registry times the probe out, announced"
    );
}

/// Issue 15, scenario 3: an upstream that is not connected answers every
/// call at once with a failure before sending. Those say nothing of the
/// tool and put no load on it: counting them kept an agent out for a whole
/// open period after the upstream came back.
#[tokio::test(start_paused = true)]
async fn failures_before_sending_never_trip_it() {
    use toolwarden_core::classify::TransportErrorKind;
    let layer = consecutive(3).build().unwrap();
    let upstream =
        MockMcp::new().default_step("t", Step::Transport(TransportErrorKind::ConnectFailed));
    let mut svc = layer.layer(ReadyChecked::new(upstream.clone()));
    for _ in 0..20 {
        let err = svc.ready().await.unwrap().call(req("t")).await.unwrap_err();
        assert!(
            refusal(&err).is_none(),
            "never refused by the breaker: {err}"
        );
    }
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Closed));
    assert_eq!(upstream.calls("t"), 20);
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!((snap.totals.failed, snap.totals.ignored), (0, 20));
    // A failure after sending still counts.
    upstream.set_default("t", Step::closed());
    for _ in 0..3 {
        let _ = svc.ready().await.unwrap().call(req("t")).await;
    }
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
}

/// A passthrough service neither admits, refuses nor records: with the
/// circuit a normal service opened still open, every call reaches the tool
/// and gets the tool's own answer, and the breaker counts none of them.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    let layer = consecutive(3).build().unwrap();
    let guarded = MockMcp::new().default_step("t", Step::closed());
    let mut svc = layer.layer(ReadyChecked::new(guarded.clone()));
    assert!(!svc.is_passthrough());
    for _ in 0..5 {
        let _ = svc.ready().await.unwrap().call(req("t")).await;
    }
    assert_eq!(guarded.calls("t"), 3, "refused once open");
    assert_eq!(layer.registry().state("t"), Some(CircuitState::Open));
    let failed = layer.registry().circuit("t").unwrap().totals.failed;

    let bare = MockMcp::new().default_step("t", Step::closed());
    let mut svc = layer.layer(ReadyChecked::new(bare.clone())).passthrough();
    assert!(svc.is_passthrough());
    for _ in 0..5 {
        let err = svc.ready().await.unwrap().call(req("t")).await.unwrap_err();
        assert!(refusal(&err).is_none(), "the tool's own failure: {err}");
    }
    bare.set_default("t", Step::ok("fine"));
    let ok = svc.ready().await.unwrap().call(req("t")).await.unwrap();
    assert_eq!(ok.first_text().unwrap(), "fine");
    assert_eq!(bare.calls("t"), 6);
    let snap = layer.registry().circuit("t").unwrap();
    assert_eq!(
        (snap.state, snap.totals.failed),
        (CircuitState::Open, failed)
    );
}
