//! BulkheadLayer: caps, refusals, waits, release on completion and on drop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use serde_json::json;
use toolwarden_bulkhead::{BulkheadBuilder, BulkheadLayer};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    classify::classify_error_chain, Bounds, BoxError, BulkheadFull, Event, Events, KeyBy, KeyRef,
    McpRequest, Rejection, SessionKey,
};
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn call(tool: &str) -> Request {
    Request::tool_call(1, tool, json!({}))
}

/// A layer over a mock whose tools answer after `latency`, checked for readiness.
fn harness(
    builder: BulkheadBuilder,
    latency: Duration,
) -> (
    toolwarden_bulkhead::Bulkhead<ReadyChecked<MockMcp>>,
    MockMcp,
    BulkheadLayer,
) {
    let mock = MockMcp::new();
    for tool in ["a", "b", "c", "d", "pdf"] {
        mock.set_default(tool, Step::ok("done").after(latency));
    }
    let layer = builder.build().unwrap();
    let svc = layer.layer(ReadyChecked::new(mock.clone()).pending_first());
    (svc, mock, layer)
}

/// `poll_ready` then `call`, returning the response future unpolled.
async fn start<S>(svc: &mut S, req: Request) -> S::Future
where
    S: Service<Request>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req)
}

fn full(result: Result<Response, BoxError>) -> BulkheadFull {
    match result {
        Ok(resp) => panic!("expected BulkheadFull, the call went through: {resp:?}"),
        Err(err) => match err.downcast::<BulkheadFull>() {
            Ok(full) => *full,
            Err(other) => panic!("expected BulkheadFull, got {other}"),
        },
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_over_the_cap_is_refused_and_other_tools_go_on() {
    let (mut svc, mock, layer) = harness(BulkheadLayer::builder().max_concurrent(2), ms(100));
    let one = tokio::spawn(start(&mut svc, call("a")).await);
    let two = tokio::spawn(start(&mut svc, call("a")).await);
    let refused = full(start(&mut svc, call("a")).await.await);
    assert_eq!(refused.key(), "a");
    assert_eq!(refused.max_concurrent(), 2);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 2);
    // Another tool has its own places.
    let b = start(&mut svc, call("b")).await.await.unwrap();
    assert_eq!(b.first_text_owned(), "done");
    one.await.unwrap().unwrap();
    two.await.unwrap().unwrap();
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
    assert_eq!(
        mock.calls("a"),
        2,
        "the refused call never reached the tool"
    );
    // Places are back once the calls ended.
    start(&mut svc, call("a")).await.await.unwrap();
}

trait Text {
    fn first_text_owned(&self) -> String;
}

impl Text for Response {
    fn first_text_owned(&self) -> String {
        use toolwarden_core::McpResponse;
        self.first_text().unwrap().into_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_gives_its_place_back_at_once() {
    let (mut svc, mock, layer) = harness(BulkheadLayer::builder().max_concurrent(1), ms(1000));
    let mut first = start(&mut svc, call("a")).await;
    assert!(
        (&mut first).now_or_never().is_none(),
        "the call is in flight"
    );
    assert_eq!(mock.in_flight(), 1);
    full(start(&mut svc, call("a")).await.await);
    drop(first); // cancelled
    assert_eq!(mock.in_flight(), 0);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
    start(&mut svc, call("a")).await.await.unwrap();
    // A call dropped before it was ever polled gives it back too.
    let unpolled = start(&mut svc, call("a")).await;
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 1);
    drop(unpolled);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
}

#[tokio::test(start_paused = true)]
async fn failed_calls_give_their_place_back() {
    let mock = MockMcp::new().script(
        "a",
        [Step::Transport(
            toolwarden_core::classify::TransportErrorKind::Closed,
        )],
    );
    let layer = BulkheadLayer::builder().max_concurrent(1).build().unwrap();
    let mut svc = layer.layer(ReadyChecked::new(mock));
    assert!(start(&mut svc, call("a")).await.await.is_err());
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
    start(&mut svc, call("a")).await.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_estimated_from_recent_call_durations() {
    let (mut svc, _mock, layer) = harness(BulkheadLayer::builder().max_concurrent(2), ms(400));
    // Before any call ended: 100 ms.
    let one = tokio::spawn(start(&mut svc, call("a")).await);
    let two = tokio::spawn(start(&mut svc, call("a")).await);
    let refused = full(start(&mut svc, call("a")).await.await);
    assert_eq!(refused.retry_after(), Some(ms(100)));
    one.await.unwrap().unwrap();
    two.await.unwrap().unwrap();
    assert_eq!(layer.average_duration(KeyRef::Tool("a")), Some(ms(400)));
    // Calls of 400 ms, two places: one comes free about every 200 ms.
    let one = tokio::spawn(start(&mut svc, call("a")).await);
    let two = tokio::spawn(start(&mut svc, call("a")).await);
    let refused = full(start(&mut svc, call("a")).await.await);
    assert_eq!(refused.retry_after(), Some(ms(200)));
    assert!(
        refused.to_string().contains("retry after 200 ms"),
        "{refused}"
    );
    one.await.unwrap().unwrap();
    two.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_a_rejection_never_a_failure_of_the_tool() {
    let err: BoxError = Box::new(BulkheadFull::new("a", 3, ms(50)));
    let outcome = classify_error_chain(err.as_ref());
    assert!(outcome.is_rejection());
    assert!(!outcome.is_counted_failure());
    assert_eq!(outcome.retry_after, Some(ms(50)));
    let report = toolwarden_core::FailureReport::from_error("a", err.as_ref()).to_tool_result();
    assert_eq!(report["isError"], true);
    assert_eq!(
        report["structuredContent"]["toolwarden"]["layer"],
        "bulkhead"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_gets_the_next_place_in_order_or_is_refused_after_max_wait() {
    let (mut svc, mock, _layer) = harness(
        BulkheadLayer::builder().max_concurrent(1).max_wait(ms(250)),
        ms(100),
    );
    let started = tokio::time::Instant::now();
    let first = tokio::spawn(start(&mut svc, call("a")).await);
    let second = tokio::spawn(start(&mut svc, call("a")).await);
    let third = tokio::spawn(start(&mut svc, call("a")).await);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(
        started.elapsed(),
        ms(200),
        "the second waited for the first"
    );
    third.await.unwrap().unwrap();
    assert_eq!(started.elapsed(), ms(300), "then the third, in order");
    assert_eq!(mock.calls("a"), 3);

    // A call that would wait past max_wait is refused at max_wait.
    mock.set_default("a", Step::ok("slow").after(ms(1000)));
    let slow = tokio::spawn(start(&mut svc, call("a")).await);
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    full(start(&mut svc, call("a")).await.await);
    assert_eq!(started.elapsed(), ms(250));
    slow.await.unwrap().unwrap();
}

/// An inner service with one slot of readiness: `poll_ready` takes the slot
/// (pending while another handle holds it), `call` or drop gives it back.
#[derive(Clone)]
struct OneSlot {
    inner: MockMcp,
    slot: Arc<Mutex<bool>>,
    holding: bool,
}

impl Service<Request> for OneSlot {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.holding {
            return Poll::Ready(Ok(()));
        }
        let mut free = self.slot.lock().unwrap();
        if *free {
            *free = false;
            self.holding = true;
            Poll::Ready(Ok(()))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        assert!(self.holding, "call without readiness");
        self.holding = false;
        *self.slot.lock().unwrap() = true;
        self.inner.call(req)
    }
}

impl Drop for OneSlot {
    fn drop(&mut self) {
        if self.holding {
            *self.slot.lock().unwrap() = true;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_holds_no_readiness_of_the_service_below() {
    let mock = MockMcp::new().default_step("a", Step::ok("a").after(ms(500)));
    let inner = OneSlot {
        inner: mock.clone(),
        slot: Arc::new(Mutex::new(true)),
        holding: false,
    };
    let layer = BulkheadLayer::builder()
        .tool("a", |b| b.max_concurrent(1).max_wait(ms(1000)))
        .build()
        .unwrap();
    let mut svc = layer.layer(inner);
    let first = tokio::spawn(start(&mut svc, call("a")).await);
    let waiting = tokio::spawn(start(&mut svc, call("a")).await);
    tokio::task::yield_now().await;
    // The waiting call gave its readiness up: a call to another tool is
    // made at once.
    let b = tokio::time::timeout(ms(1), start(&mut svc, call("b")).await)
        .await
        .expect("the slot below is free while a call waits");
    b.unwrap();
    first.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(mock.calls("a"), 2);
}

#[tokio::test(start_paused = true)]
async fn per_tool_overrides_server_key_and_sessions() {
    let (mut svc, _mock, _layer) = harness(
        BulkheadLayer::builder()
            .max_concurrent(5)
            .tool("pdf", |b| b.max_concurrent(1)),
        ms(100),
    );
    let pdf = tokio::spawn(start(&mut svc, call("pdf")).await);
    full(start(&mut svc, call("pdf")).await.await);
    pdf.await.unwrap().unwrap();

    // One cap for every tool call.
    let (mut svc, _mock, _layer) = harness(
        BulkheadLayer::builder()
            .max_concurrent(2)
            .key_by(KeyBy::Server),
        ms(100),
    );
    let a = tokio::spawn(start(&mut svc, call("a")).await);
    let b = tokio::spawn(start(&mut svc, call("b")).await);
    let refused = full(start(&mut svc, call("c")).await.await);
    assert_eq!(refused.key(), "*");
    // The advice names what is busy for a reader, not by the key's syntax.
    assert!(
        toolwarden_core::Rejection::advice(&refused).starts_with("the server is busy (2 calls"),
        "{}",
        toolwarden_core::Rejection::advice(&refused)
    );
    // Requests other than tools/call are never capped.
    let list = Request::new(2, "tools/list", None);
    start(&mut svc, list).await.await.unwrap();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    // Per session and tool: each session has its own places.
    let (mut svc, _mock, _layer) = harness(
        BulkheadLayer::builder()
            .max_concurrent(1)
            .key_by(KeyBy::SessionTool),
        ms(100),
    );
    let in_session = |s: &str| {
        let mut req = call("a");
        req.insert_extension(SessionKey::from(s));
        req
    };
    let one = tokio::spawn(start(&mut svc, in_session("s1")).await);
    let two = tokio::spawn(start(&mut svc, in_session("s2")).await);
    let refused = full(start(&mut svc, in_session("s1")).await.await);
    assert_eq!(refused.key(), "s1/a");
    // It said `s1/a is busy`: the session's key is no name for the model.
    assert!(
        toolwarden_core::Rejection::advice(&refused).starts_with("a in this session is busy"),
        "{}",
        toolwarden_core::Rejection::advice(&refused)
    );
    one.await.unwrap().unwrap();
    two.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn refusals_are_reported_as_events() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let events = Events::new().with(move |e: &Event<'_>| {
        if let Event::BulkheadFull {
            key,
            max_concurrent,
            ..
        } = e
        {
            sink.lock()
                .unwrap()
                .push((key.to_string(), *max_concurrent));
        }
    });
    let (mut svc, _mock, _layer) = harness(
        BulkheadLayer::builder().max_concurrent(1).events(events),
        ms(100),
    );
    let one = tokio::spawn(start(&mut svc, call("a")).await);
    full(start(&mut svc, call("a")).await.await);
    one.await.unwrap().unwrap();
    assert_eq!(*seen.lock().unwrap(), [("a".to_string(), 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_key_with_a_long_call_in_flight_is_never_evicted() {
    let (mut svc, mock, layer) = harness(
        BulkheadLayer::builder()
            .max_concurrent(1)
            .bounds(Bounds::max_keys(100).idle_timeout(Some(ms(1000)))),
        ms(60_000),
    );
    let long = tokio::spawn(start(&mut svc, call("a")).await);
    tokio::task::yield_now().await;
    // Many idle periods pass; new keys run the sweep on their insert path.
    for tool in ["b", "c", "d"] {
        tokio::time::advance(ms(5000)).await;
        mock.set_default(tool, Step::ok("x"));
        start(&mut svc, call(tool)).await.await.unwrap();
    }
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 1);
    full(start(&mut svc, call("a")).await.await);
    long.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn keys_past_the_bound_share_an_overflow_cap() {
    let (mut svc, _mock, layer) = harness(
        BulkheadLayer::builder()
            .max_concurrent(1)
            .bounds(Bounds::max_keys(1)),
        ms(100),
    );
    let a = tokio::spawn(start(&mut svc, call("a")).await);
    let b = tokio::spawn(start(&mut svc, call("b")).await); // overflow
    full(start(&mut svc, call("c")).await.await); // overflow too: shared place taken
    assert_eq!(layer.keys(), 1);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn every_clone_and_every_service_of_one_layer_shares_the_places() {
    let (svc, _mock, layer) = harness(BulkheadLayer::builder().max_concurrent(1), ms(100));
    let mut other = layer.layer(ReadyChecked::new(
        MockMcp::new().default_step("a", Step::ok("x").after(ms(100))),
    ));
    let mut clone = svc.clone();
    let one = tokio::spawn(start(&mut clone, call("a")).await);
    full(start(&mut other, call("a")).await.await);
    one.await.unwrap().unwrap();
    let _ = svc;
}

/// A passthrough service takes no place: while a normal service refuses
/// past its cap, every concurrent call through it reaches the tool and
/// gets the tool's answer.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    let (mut svc, mock, layer) = harness(BulkheadLayer::builder().max_concurrent(2), ms(100));
    assert!(!svc.is_passthrough());
    let mut calls = vec![
        start(&mut svc, call("a")).await,
        start(&mut svc, call("a")).await,
    ];
    full(start(&mut svc, call("a")).await.await);
    assert_eq!(
        mock.calls("a"),
        2,
        "the refused call never reached the tool"
    );

    let mut bare = layer
        .layer(ReadyChecked::new(mock.clone()).pending_first())
        .passthrough();
    assert!(bare.is_passthrough());
    for _ in 0..5 {
        calls.push(start(&mut bare, call("a")).await);
    }
    assert_eq!(mock.in_flight(), 7);
    assert_eq!(layer.in_flight(KeyRef::Tool("a")), 2, "no place taken");
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.unwrap().first_text_owned(), "done");
    }
    assert_eq!(mock.calls("a"), 7);
}
