//! CoalesceLayer: identical concurrent calls share one call; ids, errors,
//! cancellation, bounds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use serde_json::json;
use toolwarden_coalesce::{CoalesceBuilder, CoalesceLayer, SharedCallPanicked, SharedFailure};
use toolwarden_core::classify::{TransportError, TransportErrorKind};
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{
    BoxError, CircuitOpen, Event, Events, McpRequest, McpResponse, SessionKey, ToolAnnotations,
    ToolCatalog, ToolInfo, ToolPolicy,
};
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn cacheable(catalog: &ToolCatalog, tool: &str) {
    catalog.configure(
        tool,
        ToolPolicy {
            cacheable: Some(true),
            ..ToolPolicy::default()
        },
    );
}

fn call(id: i64, tool: &str, args: serde_json::Value) -> Request {
    Request::tool_call(id, tool, args)
}

fn harness(
    builder: CoalesceBuilder,
) -> (
    toolwarden_coalesce::Coalesce<ReadyChecked<MockMcp>>,
    MockMcp,
    CoalesceLayer,
) {
    let mock = MockMcp::new();
    for tool in ["weather", "search", "send"] {
        mock.set_default(tool, Step::ok(&format!("{tool} answered")).after(ms(100)));
    }
    let catalog = ToolCatalog::new();
    cacheable(&catalog, "weather");
    cacheable(&catalog, "search");
    let layer = builder.catalog(catalog).build().unwrap();
    let svc = layer.layer(ReadyChecked::new(mock.clone()).pending_first());
    (svc, mock, layer)
}

async fn start<S>(svc: &mut S, req: Request) -> S::Future
where
    S: Service<Request>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req)
}

#[tokio::test(start_paused = true)]
async fn identical_calls_share_one_call_and_each_gets_its_own_id() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    let oslo = json!({"city": "Oslo", "units": "metric"});
    let a = start(&mut svc, call(1, "weather", oslo.clone())).await;
    // Key order and `_meta` do not make a call different.
    let b = start(
        &mut svc,
        call(
            2,
            "weather",
            json!({"units": "metric", "city": "Oslo", "_meta": {"progressToken": 9}}),
        ),
    )
    .await;
    let c = start(&mut svc, call(3, "weather", oslo)).await;
    assert_eq!(layer.in_flight(), 1);
    let (a, b, c) = tokio::join!(a, b, c);
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(mock.calls("weather"), 1);
    assert_eq!(
        [a.id.clone(), b.id.clone(), c.id.clone()],
        [Id::Number(1), Id::Number(2), Id::Number(3)]
    );
    for resp in [&a, &b, &c] {
        assert_eq!(resp.first_text().unwrap(), "weather answered");
    }
    assert_eq!(layer.in_flight(), 0, "a completed call leaves the map");
    // A call after the answer makes a new call: this is not a cache.
    start(
        &mut svc,
        call(4, "weather", json!({"city": "Oslo", "units": "metric"})),
    )
    .await
    .await
    .unwrap();
    assert_eq!(mock.calls("weather"), 2);
}

/// A task the server made of the shared call is the leader's (its id is
/// its creator's: the proxy refused the follower's `tasks/get` as another
/// session's task). Each follower then makes its own call, and gets a task
/// of its own.
#[tokio::test(start_paused = true)]
async fn a_task_answer_is_the_leaders_followers_make_their_own_call() {
    let (mut svc, mock, _layer) = harness(CoalesceLayer::builder());
    let task = |id: &str| {
        Step::Result(json!({"resultType": "task", "taskId": id, "status": "working"}))
            .after(ms(100))
    };
    mock.push("search", [task("task-1"), task("task-2"), task("task-3")]);
    let q = json!({"q": "tower"});
    let a = start(&mut svc, call(1, "search", q.clone())).await;
    let b = start(&mut svc, call(2, "search", q.clone())).await;
    let c = start(&mut svc, call(3, "search", q)).await;
    let (a, b, c) = tokio::join!(a, b, c);
    let ids: Vec<(Id, String)> = [a, b, c]
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            let task = r.payload.as_ref().unwrap()["taskId"]
                .as_str()
                .unwrap()
                .to_owned();
            (r.id, task)
        })
        .collect();
    assert_eq!(ids[0], (Id::Number(1), "task-1".to_owned()));
    let mut others: Vec<&str> = ids[1..].iter().map(|(_, task)| task.as_str()).collect();
    others.sort_unstable();
    assert_eq!(others, ["task-2", "task-3"], "{ids:?}");
    assert_eq!([&ids[1].0, &ids[2].0], [&Id::Number(2), &Id::Number(3)]);
    assert_eq!(
        mock.calls("search"),
        3,
        "one shared call, then one per follower"
    );

    // A result that is no task is still shared.
    let (a, b) = tokio::join!(
        start(&mut svc, call(4, "search", json!({"q": "x"}))).await,
        start(&mut svc, call(5, "search", json!({"q": "x"}))).await,
    );
    assert_eq!(a.unwrap().first_text().unwrap(), "search answered");
    assert_eq!(b.unwrap().id, Id::Number(5));
    assert_eq!(mock.calls("search"), 4);
}

/// Regression (found by running the binary): a request for input
/// (2026-07-28 `input_required`) answering the shared call was copied to
/// every caller, with the one `requestState` the server made for the
/// leader: the first to continue took it, and the others' continuations
/// were refused (or, with a server that replays by handle, got the first
/// caller's result). It is the leader's; each follower makes its own call.
#[tokio::test(start_paused = true)]
async fn a_request_for_input_is_the_leaders_followers_make_their_own_call() {
    let (mut svc, mock, _layer) = harness(CoalesceLayer::builder());
    let asking = |handle: &str| {
        Step::Result(json!({
            "resultType": "input_required",
            "inputRequests": {"confirm": {"method": "elicitation/create", "params": {}}},
            "requestState": handle,
        }))
        .after(ms(100))
    };
    mock.push("search", [asking("h-1"), asking("h-2")]);
    let q = json!({"q": "delete it"});
    let a = start(&mut svc, call(1, "search", q.clone())).await;
    let b = start(&mut svc, call(2, "search", q)).await;
    let (a, b) = tokio::join!(a, b);
    let state = |r: Result<Response, BoxError>| {
        let r = r.unwrap();
        assert!(r.is_input_required(), "{r:?}");
        (r.id.clone(), r.payload.unwrap()["requestState"].clone())
    };
    assert_eq!(state(a), (Id::Number(1), json!("h-1")));
    assert_eq!(state(b), (Id::Number(2), json!("h-2")));
    assert_eq!(
        mock.calls("search"),
        2,
        "one shared call, then the follower's"
    );
}

#[tokio::test(start_paused = true)]
async fn different_arguments_tools_and_unsafe_tools_are_not_shared() {
    let (mut svc, mock, _layer) = harness(CoalesceLayer::builder());
    let a = start(&mut svc, call(1, "weather", json!({"city": "Oslo"}))).await;
    let b = start(&mut svc, call(2, "weather", json!({"city": "Bergen"}))).await;
    let c = start(&mut svc, call(3, "search", json!({"city": "Oslo"}))).await;
    // `send` is not cacheable: the empty policy and untrusted catalog say nothing.
    let d = start(&mut svc, call(4, "send", json!({"to": "x"}))).await;
    let e = start(&mut svc, call(5, "send", json!({"to": "x"}))).await;
    let results = futures::future::join_all([a, b, c, d, e]).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(mock.calls("weather"), 2);
    assert_eq!(mock.calls("search"), 1);
    assert_eq!(mock.calls("send"), 2);
}

#[tokio::test(start_paused = true)]
async fn the_catalog_decides_by_trusted_annotations_and_overrides_win() {
    let catalog = ToolCatalog::new();
    catalog.insert(
        ToolInfo::new("lookup", "read only").annotations(ToolAnnotations {
            read_only_hint: Some(true),
            ..ToolAnnotations::default()
        }),
    );
    catalog.insert(
        ToolInfo::new("put", "idempotent").annotations(ToolAnnotations {
            idempotent_hint: Some(true),
            read_only_hint: Some(false),
            ..ToolAnnotations::default()
        }),
    );
    let layer = CoalesceLayer::builder()
        .catalog(catalog.clone())
        .tool("put", |b| b.coalesce(false))
        .build()
        .unwrap();
    assert!(
        !layer.coalesces("lookup"),
        "untrusted annotations are hints only"
    );
    catalog.set_trusted(true);
    assert!(layer.coalesces("lookup"));
    assert!(!layer.coalesces("put"), "the override wins");
    let all = CoalesceLayer::builder().coalesce(true).build().unwrap();
    assert!(all.coalesces("anything"));
    let trusting = CoalesceLayer::builder().catalog(catalog).build().unwrap();
    assert!(trusting.coalesces("put"), "trusted idempotent");
}

#[tokio::test(start_paused = true)]
async fn the_caller_that_started_the_call_may_leave_the_others_still_get_the_answer() {
    let (mut svc, mock, _layer) = harness(CoalesceLayer::builder());
    let mut leader = start(&mut svc, call(1, "weather", json!({"city": "Oslo"}))).await;
    assert!((&mut leader).now_or_never().is_none()); // the call is on its way
    let follower = start(&mut svc, call(2, "weather", json!({"city": "Oslo"}))).await;
    drop(leader);
    assert_eq!(mock.in_flight(), 1, "the shared call was not cancelled");
    let resp = follower.await.unwrap();
    assert_eq!(resp.id, Id::Number(2));
    assert_eq!(mock.calls("weather"), 1);
    // The same when the leader leaves before it was ever polled.
    let leader = start(&mut svc, call(3, "weather", json!({"city": "Oslo"}))).await;
    let follower = start(&mut svc, call(4, "weather", json!({"city": "Oslo"}))).await;
    drop(leader);
    assert_eq!(follower.await.unwrap().id, Id::Number(4));
    assert_eq!(mock.calls("weather"), 2);
}

#[tokio::test(start_paused = true)]
async fn when_the_last_caller_leaves_the_call_is_cancelled() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    let mut a = start(&mut svc, call(1, "weather", json!({"city": "Oslo"}))).await;
    let mut b = start(&mut svc, call(2, "weather", json!({"city": "Oslo"}))).await;
    assert!((&mut a).now_or_never().is_none());
    assert!((&mut b).now_or_never().is_none());
    assert_eq!(mock.in_flight(), 1);
    drop(a);
    drop(b);
    assert_eq!(mock.in_flight(), 0, "nobody waits: the call is dropped");
    assert_eq!(layer.in_flight(), 0);
    // A new identical call makes a new call, and is answered.
    start(&mut svc, call(3, "weather", json!({"city": "Oslo"})))
        .await
        .await
        .unwrap();
    assert_eq!(mock.calls("weather"), 2);
}

#[tokio::test(start_paused = true)]
async fn failures_are_shared_each_caller_gets_an_equivalent_error() {
    let (mut svc, mock, _layer) = harness(CoalesceLayer::builder());
    mock.push(
        "weather",
        [Step::Transport(TransportErrorKind::Closed).after_boxed(ms(50))],
    );
    let a = start(&mut svc, call(1, "weather", json!({}))).await;
    let b = start(&mut svc, call(2, "weather", json!({}))).await;
    let (a, b) = tokio::join!(a, b);
    for err in [a.unwrap_err(), b.unwrap_err()] {
        let transport = err.downcast_ref::<TransportError>().expect("the same type");
        assert_eq!(transport.kind, TransportErrorKind::Closed);
    }
    assert_eq!(mock.calls("weather"), 1);
    // A JSON-RPC error answer is an answer: each caller gets it with its id.
    mock.push("weather", [Step::rpc_error(-32603, "boom").after(ms(50))]);
    let a = start(&mut svc, call(3, "weather", json!({}))).await;
    let b = start(&mut svc, call(4, "weather", json!({}))).await;
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.unwrap().id, Id::Number(3));
    let b = b.unwrap();
    assert_eq!(b.id, Id::Number(4));
    assert_eq!(b.rpc_error().unwrap().code, -32603);
}

#[tokio::test(start_paused = true)]
async fn errors_of_other_types_are_shared_with_their_source() {
    #[derive(Debug)]
    struct Odd;
    impl std::fmt::Display for Odd {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("odd failure")
        }
    }
    impl std::error::Error for Odd {}
    let catalog = ToolCatalog::new();
    cacheable(&catalog, "t");
    let count = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&count);
    let inner = tower::service_fn(move |req: Request| {
        *counter.lock().unwrap() += 1;
        let tool = req.tool_name().unwrap().to_owned();
        async move {
            tokio::time::sleep(ms(10)).await;
            match tool.as_str() {
                "t" => Err::<Response, BoxError>(Box::new(Odd)),
                _ => Err(Box::new(CircuitOpen::new("u", ms(5))) as BoxError),
            }
        }
    });
    let mut svc = CoalesceLayer::builder()
        .catalog(catalog)
        .coalesce(true)
        .build()
        .unwrap()
        .layer(inner);
    let a = start(&mut svc, call(1, "t", json!({}))).await;
    let b = start(&mut svc, call(2, "t", json!({}))).await;
    let (a, b) = tokio::join!(a, b);
    for err in [a.unwrap_err(), b.unwrap_err()] {
        let shared = err.downcast_ref::<SharedFailure>().unwrap();
        assert_eq!(shared.to_string(), "odd failure");
        assert!(std::error::Error::source(shared).unwrap().is::<Odd>());
    }
    assert_eq!(*count.lock().unwrap(), 1);
    // A rejection from below stays a rejection, of its own type.
    let a = start(&mut svc, call(3, "u", json!({}))).await;
    let b = start(&mut svc, call(4, "u", json!({}))).await;
    let (a, b) = tokio::join!(a, b);
    assert!(a.unwrap_err().is::<CircuitOpen>());
    assert!(b.unwrap_err().is::<CircuitOpen>());
    assert_eq!(*count.lock().unwrap(), 2);
}

trait AfterBoxed {
    fn after_boxed(self, d: Duration) -> Step;
}
impl AfterBoxed for Step {
    fn after_boxed(self, d: Duration) -> Step {
        self.after(d)
    }
}

#[tokio::test(start_paused = true)]
async fn the_map_is_bounded_calls_past_it_are_made_on_their_own() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder().max_in_flight(1));
    let a = start(&mut svc, call(1, "weather", json!({"city": "Oslo"}))).await;
    let b = start(&mut svc, call(2, "weather", json!({"city": "Bergen"}))).await; // past the bound
    let c = start(&mut svc, call(3, "weather", json!({"city": "Bergen"}))).await; // past it too
    let d = start(&mut svc, call(4, "weather", json!({"city": "Oslo"}))).await; // joins a
    assert_eq!(layer.in_flight(), 1);
    let results = futures::future::join_all([a, b, c, d]).await;
    let ids: Vec<Id> = results.into_iter().map(|r| r.unwrap().id).collect();
    assert_eq!(
        ids,
        [Id::Number(1), Id::Number(2), Id::Number(3), Id::Number(4)]
    );
    assert_eq!(mock.calls("weather"), 3);
}

#[tokio::test(start_paused = true)]
async fn answered_slots_are_swept_when_the_bound_is_reached_so_new_keys_are_still_shared() {
    // Answered calls keep their slots (closed) for the next call with their
    // key; at the bound, a new key sweeps them first instead of being made
    // on its own.
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder().max_in_flight(2));
    for (id, city) in [(1, "Oslo"), (2, "Bergen"), (3, "Tromso")] {
        start(&mut svc, call(id, "weather", json!({ "city": city })))
            .await
            .await
            .unwrap();
    }
    assert_eq!(layer.in_flight(), 0);
    let a = start(&mut svc, call(4, "weather", json!({"city": "Narvik"}))).await;
    let b = start(&mut svc, call(5, "weather", json!({"city": "Narvik"}))).await;
    assert_eq!(layer.in_flight(), 1, "Narvik is in flight, and joinable");
    let (a, b) = tokio::join!(a, b);
    assert_eq!(
        (a.unwrap().id, b.unwrap().id),
        (Id::Number(4), Id::Number(5))
    );
    assert_eq!(
        mock.calls("weather"),
        4,
        "three calls, then one shared by two"
    );
    // The bound still holds for calls in flight: two open, a third key is
    // made on its own.
    let a = start(&mut svc, call(6, "weather", json!({"city": "Alta"}))).await;
    let b = start(&mut svc, call(7, "weather", json!({"city": "Bodo"}))).await;
    let c = start(&mut svc, call(8, "weather", json!({"city": "Mo"}))).await;
    let d = start(&mut svc, call(9, "weather", json!({"city": "Mo"}))).await;
    assert_eq!(layer.in_flight(), 2);
    let all = futures::future::join_all([a, b, c, d]).await;
    assert!(all.iter().all(Result::is_ok));
    assert_eq!(mock.calls("weather"), 8, "Mo twice, on its own each time");
}

#[tokio::test(start_paused = true)]
async fn a_new_call_leads_in_an_answered_slot_while_a_caller_of_the_old_one_has_not_collected() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    let oslo = json!({"city": "Oslo"});
    let mut first = start(&mut svc, call(1, "weather", oslo.clone())).await;
    let late = start(&mut svc, call(2, "weather", oslo.clone())).await;
    // Only the first caller is polled: it gets the answer; the second
    // caller's copy waits in the answered call, which it still holds.
    let answered = tokio::time::timeout(ms(500), &mut first).await.unwrap();
    assert_eq!(answered.unwrap().id, Id::Number(1));
    assert_eq!(layer.in_flight(), 0);
    // A new identical call: the slot's call is answered, and held by the
    // late caller, so the new call gets a call of its own.
    let fresh = start(&mut svc, call(3, "weather", oslo)).await;
    assert_eq!(layer.in_flight(), 1);
    let (late, fresh) = tokio::join!(late, fresh);
    let (late, fresh) = (late.unwrap(), fresh.unwrap());
    assert_eq!(late.first_text().unwrap(), "weather answered");
    assert_eq!(fresh.first_text().unwrap(), "weather answered");
    assert_eq!((late.id, fresh.id), (Id::Number(2), Id::Number(3)));
    assert_eq!(mock.calls("weather"), 2);
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn per_session_shares_only_within_a_session_and_joins_are_events() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let events = Events::new().with(move |e: &Event<'_>| {
        if let Event::Coalesced { key } = e {
            sink.lock().unwrap().push(key.to_string());
        }
    });
    let (mut svc, mock, _layer) =
        harness(CoalesceLayer::builder().per_session(true).events(events));
    let in_session = |id: i64, s: &str| {
        let mut req = call(id, "weather", json!({"city": "Oslo"}));
        req.insert_extension(SessionKey::from(s));
        req
    };
    let a = start(&mut svc, in_session(1, "s1")).await;
    let b = start(&mut svc, in_session(2, "s1")).await;
    let c = start(&mut svc, in_session(3, "s2")).await;
    let results = futures::future::join_all([a, b, c]).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(mock.calls("weather"), 2);
    assert_eq!(*seen.lock().unwrap(), ["weather"]);
}

#[tokio::test(start_paused = true)]
async fn continuations_and_other_methods_pass_untouched() {
    let (mut svc, mock, _layer) = harness(CoalesceLayer::builder());
    let continuation = || {
        Request::new(
            1,
            "tools/call",
            Some(json!({"name": "weather", "arguments": {}, "inputResponses": {}})),
        )
    };
    let a = start(&mut svc, continuation()).await;
    let b = start(&mut svc, continuation()).await;
    let (a, b) = tokio::join!(a, b);
    a.unwrap();
    b.unwrap();
    assert_eq!(mock.calls("weather"), 2);
    let list = start(&mut svc, Request::new(2, "tools/list", None)).await;
    list.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn services_built_from_one_layer_share_calls() {
    let (mut one, mock, layer) = harness(CoalesceLayer::builder());
    let mut two = layer.layer(ReadyChecked::new(mock.clone()));
    let a = start(&mut one, call(1, "weather", json!({}))).await;
    let b = start(&mut two, call(2, "weather", json!({}))).await;
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.unwrap().id, Id::Number(1));
    assert_eq!(b.unwrap().id, Id::Number(2));
    assert_eq!(mock.calls("weather"), 1);
}

/// A composite tool: `digest` answers by calling `search` through `below`,
/// from its `call` (as a gateway's composed tool would).
#[derive(Clone)]
struct Composite {
    below: tower::util::BoxCloneService<Request, Response, BoxError>,
}

impl Service<Request> for Composite {
    type Response = Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let id = req.id.clone();
        let search = self.below.call(call(0, "search", json!({"q": "digest"})));
        Box::pin(async move {
            let mut found = search.await?;
            found.id = id;
            Ok(found)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_may_call_through_the_same_layer_from_its_call() {
    let catalog = ToolCatalog::new();
    cacheable(&catalog, "digest");
    cacheable(&catalog, "search");
    let layer = CoalesceLayer::builder().catalog(catalog).build().unwrap();
    let mock = MockMcp::new().default_step("search", Step::ok("found").after(ms(100)));
    // Both services' inner futures are boxed: one type, so one map of the
    // layer. Making `digest`'s call registers `search`'s in the same map.
    let below = tower::util::BoxCloneService::new(layer.layer(mock.clone()));
    let above = tower::util::BoxCloneService::new(Composite { below });
    let mut svc = layer.layer(above);
    // The call is made on a thread of its own: were the map locked while
    // the call is made, `search`'s registration would wait for it forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut svc_a = svc.clone();
    let mut svc_b = svc.clone();
    svc_a.ready().await.unwrap();
    svc_b.ready().await.unwrap();
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _runtime = runtime.enter();
        let a = svc_a.call(call(1, "digest", json!({})));
        let b = svc_b.call(call(2, "digest", json!({})));
        let _ = tx.send((a, b));
    });
    let (a, b) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the calls were made, not deadlocked on the map");
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((&a.id, &b.id), (&Id::Number(1), &Id::Number(2)));
    assert_eq!(a.first_text().unwrap(), "found");
    assert_eq!(b.first_text().unwrap(), "found");
    assert_eq!(
        mock.calls("search"),
        1,
        "the second digest joined the first"
    );
    let _ = svc.ready().await.unwrap();
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_several_threads_callers_that_leave_never_cancel_the_others_call() {
    let mock = MockMcp::new().default_step("weather", Step::ok("sunny").after(ms(50)));
    let catalog = ToolCatalog::new();
    cacheable(&catalog, "weather");
    let layer = CoalesceLayer::builder().catalog(catalog).build().unwrap();
    for round in 0..20 {
        let mut tasks = Vec::new();
        for n in 0..8i64 {
            let mut svc = layer.layer(mock.clone());
            let id = round * 100 + n;
            let fut: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<Response, BoxError>> + Send>,
            > = Box::pin(start(&mut svc, call(id, "weather", json!({"city": "Oslo"}))).await);
            tasks.push(tokio::spawn(async move {
                if n % 2 == 0 {
                    // Half the callers give up early, the leader among them.
                    let _ = tokio::time::timeout(ms(5), fut).await;
                    None
                } else {
                    Some((id, fut.await.unwrap()))
                }
            }));
        }
        for task in tasks {
            if let Some((id, resp)) = task.await.unwrap() {
                assert_eq!(resp.id, Id::Number(id));
                assert_eq!(resp.first_text().unwrap(), "sunny");
            }
        }
        assert_eq!(layer.in_flight(), 0, "round {round}");
    }
    // How many upstream calls a round made depends on how the threads were
    // scheduled (not asserted: no timing in tests); what holds whatever the
    // schedule is above: every caller that stayed got the answer, with its id.
    assert!(mock.calls("weather") >= 20);
}

/// Runs `fut` on its own task; its answer within `limit` (paused clock), or
/// a panic if it hangs: a caller nobody wakes would hang.
fn spawn_waiting<F>(fut: F) -> tokio::task::JoinHandle<Result<Response, BoxError>>
where
    F: std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::time::timeout(ms(10_000), fut)
            .await
            .expect("a waiting caller was woken")
    })
}

#[tokio::test(start_paused = true)]
async fn when_the_polling_leader_leaves_a_follower_takes_over_and_the_call_is_made_once() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    let mut leader = start(&mut svc, call(1, "weather", json!({"city": "Oslo"}))).await;
    let mut one = start(&mut svc, call(2, "weather", json!({"city": "Oslo"}))).await;
    let mut two = start(&mut svc, call(3, "weather", json!({"city": "Oslo"}))).await;
    // Everyone has been polled: the leader polls the call, the followers wait.
    assert!((&mut leader).now_or_never().is_none());
    assert!((&mut one).now_or_never().is_none());
    assert!((&mut two).now_or_never().is_none());
    let (one, two) = (spawn_waiting(one), spawn_waiting(two));
    tokio::time::sleep(ms(30)).await;
    drop(leader);
    assert_eq!(mock.in_flight(), 1, "handed over, not cancelled");
    let (one, two) = (one.await.unwrap().unwrap(), two.await.unwrap().unwrap());
    assert_eq!((one.id.clone(), two.id), (Id::Number(2), Id::Number(3)));
    assert_eq!(one.first_text().unwrap(), "weather answered");
    assert_eq!(mock.calls("weather"), 1, "one upstream call in all");
    assert_eq!(mock.in_flight(), 0);
    assert_eq!(
        layer.in_flight(),
        0,
        "the follower that completed it removed it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_follower_awaited_before_its_leader_drives_the_call_itself() {
    // One task awaiting its calls one after the other: the leader is not
    // polled while the follower is awaited.
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    let leader = start(&mut svc, call(1, "weather", json!({}))).await;
    let follower = start(&mut svc, call(2, "weather", json!({}))).await;
    let follower = tokio::time::timeout(ms(10_000), follower)
        .await
        .expect("the follower is not stuck behind its leader")
        .unwrap();
    assert_eq!(follower.id, Id::Number(2));
    assert_eq!(layer.in_flight(), 0);
    let leader = leader.now_or_never().expect("answered already").unwrap();
    assert_eq!(leader.id, Id::Number(1));
    assert_eq!(mock.calls("weather"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_follower_polling_the_handed_over_call_may_leave_too_another_takes_over() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    let mut leader = start(&mut svc, call(1, "weather", json!({}))).await;
    let mut one = start(&mut svc, call(2, "weather", json!({}))).await;
    let two = start(&mut svc, call(3, "weather", json!({}))).await;
    assert!((&mut leader).now_or_never().is_none());
    assert!((&mut one).now_or_never().is_none()); // waits (a no-op waker)
    let two = spawn_waiting(two);
    tokio::task::yield_now().await; // `two` waits, its task's waker registered
    drop(leader); // hands the call over, waking `one` (the first that waits)
                  // `one` polls the handed-over call (the call now holds its waker) ...
    assert!((&mut one).now_or_never().is_none());
    tokio::time::sleep(ms(20)).await;
    // ... and leaves: `two` is woken to poll it, else it would hang.
    drop(one);
    assert_eq!(mock.in_flight(), 1);
    assert_eq!(two.await.unwrap().unwrap().id, Id::Number(3));
    assert_eq!(mock.calls("weather"), 1);
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_call_is_dropped_when_its_last_caller_leaves_in_any_order() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    // Followers first, then the leader: the leader drops it.
    let mut leader = start(&mut svc, call(1, "weather", json!({}))).await;
    let mut one = start(&mut svc, call(2, "weather", json!({}))).await;
    assert!((&mut leader).now_or_never().is_none());
    assert!((&mut one).now_or_never().is_none());
    drop(one);
    assert_eq!(mock.in_flight(), 1);
    drop(leader);
    assert_eq!(mock.in_flight(), 0);
    assert_eq!(layer.in_flight(), 0);
    // The leader first (handed over), then the followers: the last drops it.
    let mut leader = start(&mut svc, call(3, "weather", json!({}))).await;
    let mut one = start(&mut svc, call(4, "weather", json!({}))).await;
    let two = start(&mut svc, call(5, "weather", json!({}))).await; // never polled
    assert!((&mut leader).now_or_never().is_none());
    drop(leader);
    assert!((&mut one).now_or_never().is_none()); // polls the handed-over call
    drop(one);
    assert_eq!(mock.in_flight(), 1, "one caller still waits");
    assert_eq!(layer.in_flight(), 1);
    drop(two);
    assert_eq!(mock.in_flight(), 0, "nobody waits: the call is dropped");
    assert_eq!(layer.in_flight(), 0);
    // A follower joining after its leader left joins the handed-over call.
    let mut leader = start(&mut svc, call(6, "weather", json!({}))).await;
    let one = start(&mut svc, call(7, "weather", json!({}))).await;
    assert!((&mut leader).now_or_never().is_none());
    drop(leader);
    let late = start(&mut svc, call(8, "weather", json!({}))).await;
    let (one, late) = tokio::join!(one, late);
    assert_eq!(
        (one.unwrap().id, late.unwrap().id),
        (Id::Number(7), Id::Number(8))
    );
    assert_eq!(mock.calls("weather"), 3);
    assert_eq!(layer.in_flight(), 0);
}

fn panicking_service(
    calls: Arc<Mutex<usize>>,
) -> impl Service<
    Request,
    Response = Response,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
> + Clone {
    tower::service_fn(move |_req: Request| {
        *calls.lock().unwrap() += 1;
        async move {
            tokio::time::sleep(ms(50)).await;
            if true {
                panic!("the inner call panicked");
            }
            Ok::<Response, BoxError>(Response::result(Id::Number(0), json!({})))
        }
    })
}

fn assert_panicked(result: Result<Response, BoxError>) {
    let err = result.unwrap_err();
    let shared = err
        .downcast_ref::<SharedFailure>()
        .expect("a shared failure");
    assert!(shared.error().is::<SharedCallPanicked>(), "{shared}");
}

#[tokio::test(start_paused = true)]
async fn a_panic_of_the_call_reaches_the_caller_that_polled_it_the_others_get_an_error() {
    let calls = Arc::new(Mutex::new(0));
    let layer = CoalesceLayer::builder().coalesce(true).build().unwrap();
    let mut svc = layer.layer(panicking_service(Arc::clone(&calls)));
    let leader = Box::pin(start(&mut svc, call(1, "t", json!({}))).await);
    let one = Box::pin(start(&mut svc, call(2, "t", json!({}))).await);
    let two = Box::pin(start(&mut svc, call(3, "t", json!({}))).await);
    let tasks = [tokio::spawn(leader), tokio::spawn(one), tokio::spawn(two)];
    let results = tokio::time::timeout(ms(10_000), futures::future::join_all(tasks))
        .await
        .expect("nobody hangs");
    let mut panics = 0;
    for result in results {
        match result {
            Err(e) => {
                assert!(e.is_panic());
                panics += 1;
            }
            Ok(answer) => assert_panicked(answer),
        }
    }
    assert_eq!(
        panics, 1,
        "the panic reaches the caller whose poll polled the call"
    );
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(
        layer.in_flight(),
        0,
        "the panicking caller, leaving, removed it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_while_a_follower_polls_reaches_it_the_others_get_an_error() {
    let calls = Arc::new(Mutex::new(0));
    let layer = CoalesceLayer::builder().coalesce(true).build().unwrap();
    let mut svc = layer.layer(panicking_service(Arc::clone(&calls)));
    let mut leader = Box::pin(start(&mut svc, call(1, "t", json!({}))).await);
    let one = Box::pin(start(&mut svc, call(2, "t", json!({}))).await);
    let mut two = Box::pin(start(&mut svc, call(3, "t", json!({}))).await);
    assert!((&mut leader).now_or_never().is_none());
    assert!((&mut two).now_or_never().is_none());
    drop(leader);
    // Whichever follower polls the handed-over call gets the panic.
    let (one, two) = (tokio::spawn(one), tokio::spawn(two));
    let (one, two) = tokio::time::timeout(ms(10_000), async { (one.await, two.await) })
        .await
        .expect("nobody hangs");
    let (panicked, answered) = match one {
        Err(e) => (e, two.unwrap()),
        Ok(answered) => (two.unwrap_err(), answered),
    };
    assert!(panicked.is_panic());
    assert_panicked(answered);
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(
        layer.in_flight(),
        0,
        "the panicking caller, leaving, removed it"
    );
    // The next identical call makes a new call.
    let again = tokio::spawn(start(&mut svc, call(4, "t", json!({}))).await);
    assert!(again.await.unwrap_err().is_panic());
    assert_eq!(*calls.lock().unwrap(), 2);
}

/// A passthrough service shares nothing: of the identical concurrent calls
/// a normal service makes once, each reaches the tool, and each answer is
/// the tool's own, under its own id.
#[tokio::test(start_paused = true)]
async fn passthrough_forwards_every_call_untouched() {
    let (mut svc, mock, layer) = harness(CoalesceLayer::builder());
    assert!(!svc.is_passthrough());
    let oslo = json!({"city": "Oslo"});
    let shared = [
        start(&mut svc, call(1, "weather", oslo.clone())).await,
        start(&mut svc, call(2, "weather", oslo.clone())).await,
    ];
    assert_eq!(layer.in_flight(), 1);
    assert!(futures::future::join_all(shared)
        .await
        .iter()
        .all(Result::is_ok));
    assert_eq!(mock.calls("weather"), 1);

    let mut svc = layer
        .layer(ReadyChecked::new(mock.clone()).pending_first())
        .passthrough();
    assert!(svc.is_passthrough());
    let mut direct = Vec::new();
    for id in 3..6 {
        direct.push(start(&mut svc, call(id, "weather", oslo.clone())).await);
    }
    assert_eq!(layer.in_flight(), 0, "nothing in the map");
    let answers = futures::future::join_all(direct).await;
    assert_eq!(mock.calls("weather"), 4);
    for (id, answer) in (3..).zip(answers) {
        let answer = answer.unwrap();
        assert_eq!(answer.id, Id::Number(id));
        assert_eq!(answer.first_text().unwrap(), "weather answered");
    }
}

/// An inner call whose every poll takes a while (a short spin) and that is
/// pending a few times before its answer: on two threads, callers often
/// join a call while another caller polls it (its lock held). Counts the
/// calls made in `made`.
fn slow_polls(
    made: Arc<std::sync::atomic::AtomicUsize>,
) -> impl Service<Request, Response = Response, Error = BoxError, Future: Send + 'static>
       + Clone
       + Send
       + 'static {
    tower::service_fn(move |request: Request| {
        made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut polls = 0;
        let text = format!("{} answered", request.tool_name().unwrap_or("?"));
        let id = request.id.clone();
        futures::future::poll_fn(move |cx| {
            let spin = std::time::Instant::now();
            while spin.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
            polls += 1;
            if polls < 4 {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            std::task::Poll::Ready(Ok::<_, BoxError>(Response::result(
                id.clone(),
                json!({"content": [{"type": "text", "text": text.clone()}]}),
            )))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_several_threads_callers_joining_calls_being_polled_each_get_their_answer() {
    let catalog = ToolCatalog::new();
    let tools = ["a", "b", "c", "d"];
    for tool in tools {
        cacheable(&catalog, tool);
    }
    let layer = CoalesceLayer::builder().catalog(catalog).build().unwrap();
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = slow_polls(Arc::clone(&made));
    let mut tasks = Vec::new();
    for task in 0..8i64 {
        let mut svc = layer.layer(inner.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..200i64 {
                let id = task * 1_000 + n;
                let tool = tools[(n % 4) as usize];
                let response = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(call(id, tool, json!({"n": n / 8})))
                    .await
                    .unwrap();
                assert_eq!(response.id, Id::Number(id));
                assert_eq!(response.first_text().unwrap(), format!("{tool} answered"));
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("no caller is left waiting")
            .unwrap();
    }
    assert_eq!(layer.in_flight(), 0);
    let made = made.load(std::sync::atomic::Ordering::Relaxed);
    // Every caller got its own answer; how many calls were shared depends on
    // the schedule (not asserted), but never more calls than callers.
    assert!(made <= 8 * 200, "{made} inner calls for 1 600 callers");
}
