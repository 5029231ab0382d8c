//! BulkheadLayer's adaptive cap: growth on fast successes up to the
//! ceiling, cuts on failures and slow calls down to the floor, the
//! cool-down, a shrunk cap over calls already in flight, refusals that say
//! nothing, and the configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::future::join_all;
use futures::FutureExt;
use serde_json::json;
use toolwarden_bulkhead::{AdaptiveLimit, Bulkhead, BulkheadBuilder, BulkheadLayer};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{BoxError, BulkheadFull, KeyRef};
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn call() -> Request {
    Request::tool_call(1, "a", json!({}))
}

/// The cap of tool `a` now.
fn cap(layer: &BulkheadLayer) -> u32 {
    layer.current_limit(KeyRef::Tool("a"))
}

/// An adaptive layer: ceiling `max`, floor `min`, starting at `initial`,
/// threshold 100 ms, halving.
fn adaptive(min: u32, max: u32, initial: u32) -> BulkheadBuilder {
    BulkheadLayer::builder().max_concurrent(max).adaptive(|a| {
        a.min_concurrent(min)
            .initial_concurrent(initial)
            .latency_threshold(ms(100))
    })
}

type Svc = Bulkhead<ReadyChecked<MockMcp>>;

fn harness(builder: BulkheadBuilder, mock: &MockMcp) -> (Svc, BulkheadLayer) {
    let layer = builder.build().unwrap();
    let svc = layer.layer(ReadyChecked::new(mock.clone()).pending_first());
    (svc, layer)
}

/// `poll_ready` then `call`, the response future unpolled.
async fn start<S>(svc: &mut S, req: Request) -> S::Future
where
    S: Service<Request>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req)
}

/// Starts `n` calls of `a` at once and waits for them all.
async fn round(svc: &mut Svc, n: u32) -> Vec<Result<Response, BoxError>> {
    let mut calls = Vec::new();
    for _ in 0..n {
        calls.push(start(svc, call()).await);
    }
    join_all(calls).await
}

fn refused(result: Result<Response, BoxError>) -> BulkheadFull {
    match result {
        Ok(resp) => panic!("expected BulkheadFull, the call went through: {resp:?}"),
        Err(err) => *err.downcast::<BulkheadFull>().unwrap(),
    }
}

#[tokio::test(start_paused = true)]
async fn fast_successes_grow_a_used_cap_up_to_its_ceiling() {
    let mock = MockMcp::new().default_step("a", Step::ok("done").after(ms(10)));
    let (mut svc, layer) = harness(adaptive(1, 6, 2), &mock);
    assert_eq!(cap(&layer), 2);
    // Rounds of as many calls as the cap, ending together.
    let mut seen = vec![cap(&layer)];
    for _ in 0..40 {
        let n = cap(&layer);
        for result in round(&mut svc, n).await {
            result.unwrap();
        }
        seen.push(cap(&layer));
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[1] <= w[0] + 1), "{seen:?}");
    assert_eq!(*seen.last().unwrap(), 6, "{seen:?}");
    assert!(seen.contains(&3) && seen.contains(&5), "{seen:?}");
    // At the ceiling, more successes change nothing.
    for result in round(&mut svc, 6).await {
        result.unwrap();
    }
    assert_eq!(cap(&layer), 6);
    assert_eq!(
        mock.calls("a") as u32,
        seen.iter().take(40).sum::<u32>() + 6
    );
}

#[tokio::test(start_paused = true)]
async fn a_cap_barely_used_does_not_grow() {
    let mock = MockMcp::new().default_step("a", Step::ok("done").after(ms(10)));
    let (mut svc, layer) = harness(adaptive(1, 10, 4), &mock);
    // One call in flight at a time: a quarter of the cap.
    for _ in 0..50 {
        start(&mut svc, call()).await.await.unwrap();
    }
    assert_eq!(cap(&layer), 4);
    // Two at a time (half the cap): four successes grow it.
    for result in round(&mut svc, 2).await {
        result.unwrap();
    }
    assert_eq!(cap(&layer), 4, "the second of the pair ended alone");
    for _ in 0..3 {
        for result in round(&mut svc, 2).await {
            result.unwrap();
        }
    }
    assert_eq!(cap(&layer), 5);
}

#[tokio::test(start_paused = true)]
async fn failures_cut_the_cap_but_never_below_the_floor() {
    let mock = MockMcp::new().default_step("a", Step::closed());
    let (mut svc, layer) = harness(adaptive(2, 8, 8), &mock);
    let mut seen = Vec::new();
    for _ in 0..4 {
        assert!(start(&mut svc, call()).await.await.is_err());
        seen.push(cap(&layer));
    }
    assert_eq!(seen, [4, 2, 2, 2]);
    // Server errors and timeouts are the server's trouble too; a client
    // error is not.
    let mock = MockMcp::new().script(
        "a",
        [
            Step::rpc_error(-32602, "invalid params"),
            Step::rpc_error(-32603, "internal error"),
            Step::rpc_error(-32001, "request timed out"),
        ],
    );
    let (mut svc, layer) = harness(adaptive(1, 8, 8), &mock);
    let mut seen = Vec::new();
    for _ in 0..3 {
        start(&mut svc, call()).await.await.unwrap();
        seen.push(cap(&layer));
    }
    assert_eq!(seen, [8, 4, 2]);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_cut_the_cap_whatever_their_outcome() {
    let mock = MockMcp::new().script(
        "a",
        [
            Step::ok("done").after(ms(100)), // at the threshold: fast
            Step::ok("done").after(ms(101)),
            Step::rpc_error(-32602, "invalid params").after(ms(150)),
        ],
    );
    let (mut svc, layer) = harness(adaptive(1, 8, 8), &mock);
    let mut seen = Vec::new();
    for _ in 0..3 {
        start(&mut svc, call()).await.await.unwrap();
        seen.push(cap(&layer));
    }
    assert_eq!(seen, [8, 4, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_failures_cuts_once_then_new_calls_may_cut_again() {
    let mock = MockMcp::new().default_step("a", Step::closed().after(ms(10)));
    let (mut svc, layer) = harness(adaptive(1, 8, 8), &mock);
    // Eight calls fail together: one cut, not three down to the floor.
    let results = round(&mut svc, 8).await;
    assert!(results.iter().all(Result::is_err));
    assert_eq!(cap(&layer), 4);
    // The calls admitted after the cut see the same trouble: one more cut.
    let results = round(&mut svc, 4).await;
    assert!(results.iter().all(Result::is_err));
    assert_eq!(cap(&layer), 2);
}

#[tokio::test(start_paused = true)]
async fn calls_in_flight_above_a_shrunk_cap_finish_then_the_cap_holds() {
    let mock = MockMcp::new().script(
        "a",
        [
            Step::closed().after(ms(5)),
            // Client errors: no signal, so the cap stays where the cut left it.
            Step::rpc_error(-32602, "bad").after(ms(20)),
            Step::rpc_error(-32602, "bad").after(ms(30)),
            Step::rpc_error(-32602, "bad").after(ms(40)),
        ],
    );
    mock.set_default("a", Step::Hang);
    let (mut svc, layer) = harness(adaptive(1, 4, 4), &mock);
    let mut calls = Vec::new();
    for _ in 0..4 {
        calls.push(tokio::spawn(start(&mut svc, call()).await));
    }
    tokio::task::yield_now().await; // the calls start their clocks
    tokio::time::advance(ms(5)).await;
    tokio::task::yield_now().await;
    assert_eq!(cap(&layer), 2, "the failure cut 4 to 2");
    // Three calls still in flight, above the cap: none was cancelled.
    assert_eq!(mock.in_flight(), 3);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 3);
    let full = refused(start(&mut svc, call()).await.await);
    assert_eq!(full.max_concurrent(), 2);
    tokio::time::advance(ms(15)).await; // the 20 ms call ends: 2 in flight
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 2);
    refused(start(&mut svc, call()).await.await);
    tokio::time::advance(ms(10)).await; // the 30 ms call ends: 1 in flight
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 1);
    let admitted = start(&mut svc, call()).await; // hangs
    assert_eq!(mock.in_flight(), 2);
    refused(start(&mut svc, call()).await.await);
    tokio::time::advance(ms(10)).await; // the 40 ms call ends
    let outcomes: Vec<bool> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().is_ok())
        .collect();
    assert_eq!(outcomes, [false, true, true, true]);
    // One hanging call and the cap of 2: one more place, then refusals.
    let second = start(&mut svc, call()).await;
    refused(start(&mut svc, call()).await.await);
    assert_eq!(mock.in_flight(), 2);
    assert_eq!(cap(&layer), 2);
    drop((admitted, second));
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
}

#[tokio::test(start_paused = true)]
async fn the_bulkheads_own_refusals_never_shrink_the_cap() {
    let mock = MockMcp::new().default_step("a", Step::ok("done").after(ms(50)));
    let (mut svc, layer) = harness(adaptive(1, 2, 2), &mock);
    let busy = [start(&mut svc, call()).await, start(&mut svc, call()).await];
    for _ in 0..20 {
        refused(start(&mut svc, call()).await.await);
    }
    assert_eq!(cap(&layer), 2);
    for result in join_all(busy).await {
        result.unwrap();
    }
    assert_eq!(cap(&layer), 2);
}

#[tokio::test(start_paused = true)]
async fn a_slow_rejection_from_a_layer_below_is_not_a_signal() {
    let mock = MockMcp::new().default_step("a", Step::ok("done").after(ms(1000)));
    // Below: a fixed cap of 1 whose calls wait 300 ms for a place, then
    // are refused: slow (over the 100 ms threshold), but a rejection.
    let inner = BulkheadLayer::builder()
        .max_concurrent(1)
        .max_wait(ms(300))
        .build()
        .unwrap();
    let outer = adaptive(1, 4, 4).build().unwrap();
    let mut svc = outer.layer(inner.layer(ReadyChecked::new(mock.clone())));
    let holder = start(&mut svc, call()).await;
    let results = join_all([start(&mut svc, call()).await, start(&mut svc, call()).await]).await;
    for result in results {
        refused(result);
    }
    assert_eq!(outer.current_limit(KeyRef::Tool("a")), 4);
    // The holder ends slow (1 s): that one is a signal.
    holder.await.unwrap();
    assert_eq!(outer.current_limit(KeyRef::Tool("a")), 2);
}

#[tokio::test(start_paused = true)]
async fn a_call_cancelled_past_the_threshold_cuts_one_cancelled_sooner_does_not() {
    let mock = MockMcp::new().default_step("a", Step::Hang);
    let (mut svc, layer) = harness(adaptive(1, 8, 8), &mock);
    let mut quick = start(&mut svc, call()).await;
    assert!((&mut quick).now_or_never().is_none());
    tokio::time::advance(ms(50)).await;
    drop(quick);
    assert_eq!(cap(&layer), 8);
    let mut slow = start(&mut svc, call()).await;
    assert!((&mut slow).now_or_never().is_none());
    tokio::time::advance(ms(150)).await;
    drop(slow);
    assert_eq!(cap(&layer), 4);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_gets_the_place_a_grown_cap_adds() {
    let mock = MockMcp::new().default_step("a", Step::ok("done").after(ms(10)));
    let (mut svc, layer) = harness(adaptive(1, 3, 1).tool("a", |b| b.max_wait(ms(1000))), &mock);
    // Cap 1: the first call's fast success grows it to 2, and both
    // waiting calls then run, each admitted while there is room.
    let results = round(&mut svc, 3).await;
    assert!(results.iter().all(Result::is_ok));
    assert!(cap(&layer) >= 2);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
}

#[tokio::test(start_paused = true)]
async fn a_fixed_cap_never_moves() {
    let mock = MockMcp::new().default_step("a", Step::closed().after(ms(500)));
    let (mut svc, layer) = harness(BulkheadLayer::builder().max_concurrent(4), &mock);
    assert!(!layer.is_adaptive("a"));
    for _ in 0..5 {
        for result in round(&mut svc, 4).await {
            assert!(result.is_err());
        }
    }
    assert_eq!(cap(&layer), 4);
    round(&mut svc, 4).await;
    assert_eq!(mock.calls("a"), 24, "all four places still admit calls");
}

#[test]
fn bad_adaptive_settings_are_refused_naming_the_field() {
    fn field(builder: BulkheadBuilder) -> String {
        builder.build().unwrap_err().field().to_owned()
    }
    /// A ceiling of 8, a threshold of 100 ms, and `f`.
    fn with(f: impl FnOnce(AdaptiveLimit) -> AdaptiveLimit) -> BulkheadBuilder {
        BulkheadLayer::builder()
            .max_concurrent(8)
            .adaptive(move |a| f(a.latency_threshold(ms(100))))
    }
    assert_eq!(
        field(with(|a| a.min_concurrent(0))),
        "adaptive.min_concurrent"
    );
    assert_eq!(
        field(with(|a| a.min_concurrent(9))),
        "adaptive.min_concurrent"
    );
    assert_eq!(
        field(with(|a| a.min_concurrent(3).initial_concurrent(2))),
        "adaptive.initial_concurrent"
    );
    assert_eq!(
        field(with(|a| a.initial_concurrent(9))),
        "adaptive.initial_concurrent"
    );
    assert_eq!(
        field(with(|a| a.latency_threshold(Duration::ZERO))),
        "adaptive.latency_threshold"
    );
    for factor in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            field(with(move |a| a.decrease_factor(factor))),
            "adaptive.decrease_factor",
            "{factor}"
        );
    }
    assert_eq!(
        field(BulkheadLayer::builder().adaptive(|a| a)),
        "adaptive.latency_threshold"
    );
    // A tool's ceiling below the layer's floor names the tool.
    assert_eq!(
        field(with(|a| a.min_concurrent(4)).tool("pdf", |b| b.max_concurrent(3))),
        r#"tools."pdf".adaptive.min_concurrent"#
    );
    // The edges are accepted.
    let layer = with(|a| a.min_concurrent(8).decrease_factor(0.999))
        .build()
        .unwrap();
    assert_eq!(layer.current_limit(KeyRef::Tool("x")), 8);
    with(|a| {
        a.min_concurrent(1)
            .initial_concurrent(1)
            .decrease_factor(f64::MIN_POSITIVE)
    })
    .build()
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn every_move_of_the_cap_is_an_event_naming_the_key_and_a_fixed_cap_sends_none() {
    use std::sync::{Arc, Mutex};
    use toolwarden_core::{Event, Events};

    let moves = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&moves);
    let events = Events::new().with(move |e: &Event<'_>| {
        if let Event::BulkheadLimitChanged { key, from, to } = e {
            sink.lock().unwrap().push((key.to_string(), *from, *to));
        }
        assert_ne!(e.name(), "", "every event has a name");
    });
    // Failures cut 8 → 4 → 2 (the floor); then fast successes grow it.
    let mock = MockMcp::new().script("a", [Step::closed(), Step::closed(), Step::closed()]);
    let (mut svc, layer) = harness(adaptive(2, 8, 8).events(events.clone()), &mock);
    for _ in 0..3 {
        assert!(start(&mut svc, call()).await.await.is_err());
    }
    assert_eq!(
        *moves.lock().unwrap(),
        [("a".to_owned(), 8, 4), ("a".to_owned(), 4, 2)],
        "no event at the floor"
    );
    moves.lock().unwrap().clear();
    for _ in 0..2 {
        for result in round(&mut svc, cap(&layer)).await {
            result.unwrap();
        }
    }
    assert_eq!(*moves.lock().unwrap(), [("a".to_owned(), 2, 3)]);
    assert_eq!(
        Event::BulkheadLimitChanged {
            key: "a",
            from: 2,
            to: 3
        }
        .name(),
        "bulkhead_limit_changed"
    );

    // A fixed cap never moves, so never tells.
    moves.lock().unwrap().clear();
    let mock = MockMcp::new().default_step("a", Step::closed());
    let (mut svc, _layer) = harness(
        BulkheadLayer::builder().max_concurrent(4).events(events),
        &mock,
    );
    for _ in 0..3 {
        assert!(start(&mut svc, call()).await.await.is_err());
    }
    assert!(moves.lock().unwrap().is_empty());
}
