//! RateLimitLayer with a backend (the seam the Redis limiter plugs into),
//! over fake backends and a mock that enforces tower's readiness contract,
//! with a paused tokio clock.

// The fake backend's helpers panic because that is how a test fails.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::jsonrpc::Request;
use toolwarden_core::KeyBy;
use toolwarden_rate_limit::Scope;
use toolwarden_rate_limit::{
    Acquire, BackendDecision, BackendFuture, Mode, Rate, RateLimitBackend, RateLimitLayer,
};
use tower::{Service, ServiceExt};

use support::*;

/// A backend that answers from a script, then with `then`, after `delay`,
/// and records what it was asked.
#[derive(Debug, Clone)]
struct Fake {
    script: Arc<Mutex<VecDeque<BackendDecision>>>,
    then: BackendDecision,
    delay: Duration,
    asked: Arc<Mutex<Vec<(Acquire, Instant)>>>,
}

impl Fake {
    fn always(then: BackendDecision) -> Self {
        Fake {
            script: Arc::default(),
            then,
            delay: Duration::ZERO,
            asked: Arc::default(),
        }
    }

    fn first(self, answers: impl IntoIterator<Item = BackendDecision>) -> Self {
        self.script.lock().unwrap().extend(answers);
        self
    }

    fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn asked(&self) -> Vec<Acquire> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    fn asked_at(&self) -> Vec<Instant> {
        self.asked.lock().unwrap().iter().map(|(_, t)| *t).collect()
    }
}

impl RateLimitBackend for Fake {
    fn acquire(&self, acquire: &Acquire) -> BackendFuture {
        self.asked
            .lock()
            .unwrap()
            .push((acquire.clone(), Instant::now()));
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(self.then);
        let delay = self.delay;
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer
        })
    }
}

fn refuse(scope: Scope, retry_after: Duration) -> BackendDecision {
    BackendDecision::Refuse { scope, retry_after }
}

#[tokio::test(start_paused = true)]
async fn a_refusing_backend_refuses_with_its_retry_after_and_the_tool_key() {
    for pending_first in [false, true] {
        let backend = Fake::always(refuse(Scope::Key, secs(7)));
        let (events, seen) = recorded_events();
        let (mut svc, mock) = harness(
            RateLimitLayer::builder()
                .per_tool(Rate::per_second(100), 100)
                .backend(backend.clone())
                .events(events),
            pending_first,
        );
        assert_refused(call(&mut svc, tool_call("search")).await, "search", secs(7));
        // The handle is usable again: the next call is asked and refused too.
        assert_refused(call(&mut svc, tool_call("search")).await, "search", secs(7));
        assert_eq!(
            mock.calls("search"),
            0,
            "a refused call must not reach the tool"
        );
        assert_eq!(backend.asked().len(), 2);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("search".to_owned(), secs(7)),
                ("search".to_owned(), secs(7))
            ]
        );
        // The local quotas were never spent.
        assert!(svc.limits().check(&tool_call("search")).is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_global_refusal_names_the_global_key() {
    let backend = Fake::always(refuse(Scope::Global, ms(250)));
    let (mut svc, _mock) = harness(
        RateLimitLayer::builder()
            .global(Rate::per_second(4), 4)
            .backend(backend),
        false,
    );
    assert_refused(call(&mut svc, tool_call("search")).await, "global", ms(250));
}

#[tokio::test(start_paused = true)]
async fn the_backend_is_asked_for_the_same_keys_and_quotas_as_the_local_limiter() {
    let backend = Fake::always(BackendDecision::Admit);
    let layer = RateLimitLayer::builder()
        .global(Rate::per_second(50), 100)
        .per_tool(Rate::per_second(5), 10)
        .tool("send_email", |b| b.per_tool(Rate::per_minute(6), 1))
        .key_by(KeyBy::SessionTool)
        .backend(backend.clone())
        .build()
        .unwrap();
    let global = layer.global_quota();
    let per_tool = layer.tool_quota("search").unwrap();
    let send_email = layer.tool_quota("send_email").unwrap();
    assert_ne!(per_tool, send_email);
    let mock = toolwarden_core::testing::MockMcp::new();
    let mut svc = tower::Layer::layer(
        &layer,
        toolwarden_core::testing::ReadyChecked::new(mock.clone()),
    );
    call(&mut svc, session_call("s1", "search")).await.unwrap();
    call(&mut svc, session_call("s1", "send_email"))
        .await
        .unwrap();
    call(&mut svc, tool_call("search")).await.unwrap();
    // Not a tool call: not limited, the backend is not asked.
    call(&mut svc, Request::new(7, "tools/list", None))
        .await
        .unwrap();
    let asked = backend.asked();
    assert_eq!(
        asked,
        [
            Acquire::new(Some(("s1/search".into(), per_tool)), global),
            Acquire::new(Some(("s1/send_email".into(), send_email)), global),
            Acquire::new(Some(("-/search".into(), per_tool)), global),
        ]
    );
    assert_eq!(mock.calls("search"), 2);
    assert_eq!(mock.calls("send_email"), 1);
    // The in-process state was not touched.
    assert_eq!(svc.limits().keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn only_the_configured_quotas_are_asked_for() {
    // An override without a per-tool quota: other tools take only the global token.
    let backend = Fake::always(BackendDecision::Admit);
    let (mut svc, _mock) = harness(
        RateLimitLayer::builder()
            .global(Rate::per_second(10), 10)
            .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1))
            .backend(backend.clone()),
        false,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("send_email")).await.unwrap();
    let asked = backend.asked();
    assert_eq!(asked[0].key(), None);
    assert!(asked[0].global().is_some());
    assert_eq!(asked[1].key().unwrap().0, "send_email");
    // Only an override and no global quota: other tools are not limited at all.
    let backend = Fake::always(refuse(Scope::Key, secs(1)));
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .tool("send_email", |b| b.per_tool(Rate::per_minute(1), 1))
            .limit_all_methods(true)
            .backend(backend.clone()),
        false,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, Request::new(3, "tools/list", None))
        .await
        .unwrap();
    assert_refused(
        call(&mut svc, tool_call("send_email")).await,
        "send_email",
        secs(1),
    );
    assert_eq!(backend.asked().len(), 1);
    assert_eq!(mock.calls("search"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_cannot_decide_hands_the_call_to_the_local_quotas() {
    let backend = Fake::always(BackendDecision::DecideLocally);
    let (events, seen) = recorded_events();
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_minute(1), 2)
            .tool("send_email", |b| b.per_tool(Rate::per_hour(1), 1))
            .backend(backend.clone())
            .events(events),
        true,
    );
    call(&mut svc, tool_call("search")).await.unwrap();
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_refused(
        call(&mut svc, tool_call("search")).await,
        "search",
        secs(60),
    );
    call(&mut svc, tool_call("send_email")).await.unwrap();
    assert_refused(
        call(&mut svc, tool_call("send_email")).await,
        "send_email",
        secs(3600),
    );
    assert_eq!(mock.calls("search"), 2);
    assert_eq!(mock.calls("send_email"), 1);
    assert_eq!(backend.asked().len(), 5);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_sleeps_the_backends_retry_after_and_asks_again() {
    let backend = Fake::always(BackendDecision::Admit)
        .first([refuse(Scope::Key, ms(100)), refuse(Scope::Global, ms(150))]);
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: secs(1) })
            .backend(backend.clone()),
        true,
    );
    let start = Instant::now();
    call(&mut svc, tool_call("search")).await.unwrap();
    assert_eq!(start.elapsed(), ms(250));
    let asked_at: Vec<_> = backend.asked_at().iter().map(|t| *t - start).collect();
    assert_eq!(asked_at, [ms(0), ms(100), ms(250)]);
    assert_eq!(mock.calls("search"), 1);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_once_the_next_try_is_past_max_wait() {
    let backend = Fake::always(refuse(Scope::Key, secs(1)));
    let (events, seen) = recorded_events();
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: ms(2500) })
            .backend(backend.clone())
            .events(events),
        false,
    );
    let start = Instant::now();
    assert_refused(call(&mut svc, tool_call("search")).await, "search", secs(1));
    // Asked at 0, 1 and 2 s; a try at 3 s would be past 2.5 s.
    assert_eq!(start.elapsed(), secs(2));
    assert_eq!(backend.asked().len(), 3);
    assert_eq!(mock.calls("search"), 0);
    assert_eq!(seen.lock().unwrap().len(), 1, "one event per refused call");
}

#[tokio::test(start_paused = true)]
async fn wait_mode_never_asks_in_a_busy_loop() {
    // A backend refusing with no retry_after is asked at most once a millisecond.
    let backend = Fake::always(refuse(Scope::Key, Duration::ZERO));
    let (mut svc, _mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .mode(Mode::Wait { max_wait: ms(10) })
            .backend(backend.clone()),
        false,
    );
    let result = call(&mut svc, tool_call("search")).await;
    assert_eq!(rate_limited(result).key(), "search");
    assert_eq!(backend.asked().len(), 11);
}

#[tokio::test(start_paused = true)]
async fn while_the_backend_decides_the_handle_serves_other_calls() {
    let backend = Fake::always(BackendDecision::Admit).delay(ms(50));
    let (mut svc, mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .backend(backend.clone()),
        true,
    );
    let mut cx = Context::from_waker(Waker::noop());
    svc.ready().await.unwrap();
    let mut first = pin!(svc.call(tool_call("search")));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert_eq!(format!("{first:?}"), "ResponseFuture { state: \"Remote\" }");
    // The ready service went into the future: the handle is polled ready again.
    let second = call(&mut svc, tool_call("fetch"));
    second.await.unwrap();
    first.await.unwrap();
    assert_eq!(mock.calls("search"), 1);
    assert_eq!(mock.calls("fetch"), 1);
    // A call dropped while the backend decides never reaches the tool.
    svc.ready().await.unwrap();
    let mut dropped = Box::pin(svc.call(tool_call("dropped")));
    assert!(matches!(dropped.as_mut().poll(&mut cx), Poll::Pending));
    drop(dropped);
    tokio::time::sleep(ms(100)).await;
    assert_eq!(mock.calls("dropped"), 0);
}

#[tokio::test(start_paused = true)]
async fn the_service_and_its_future_stay_send_with_a_backend() {
    fn assert_send<T: Send>(_: &T) {}
    let (mut svc, _mock) = harness(
        RateLimitLayer::builder()
            .per_tool(Rate::per_second(1), 1)
            .backend(Fake::always(BackendDecision::Admit)),
        false,
    );
    svc.ready().await.unwrap();
    assert_send(&svc.call(tool_call("search")));
    assert!(svc.limits().backend().is_some());
    let layer = RateLimitLayer::builder()
        .per_tool(Rate::per_second(1), 1)
        .build()
        .unwrap();
    assert!(layer.backend().is_none());
}

#[test]
fn the_response_future_stays_sync_when_the_inner_one_is() {
    fn assert_sync<T: Sync>() {}
    type Inner = tower::util::ServiceFn<
        fn(Request) -> std::future::Ready<Result<(), std::convert::Infallible>>,
    >;
    assert_sync::<<toolwarden_rate_limit::RateLimit<Inner> as Service<Request>>::Future>();
}
