//! Issue 21 in the standard stack: the bulkhead (below the rate limit) and
//! coalescing (above retry), both off unless configured.

#![cfg(feature = "stack")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use toolwarden::stack::{StackLayer, StandardStack};
use toolwarden_circuit_breaker::CircuitState;
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{Event, Events, McpResponse, ToolAnnotations, ToolCatalog, ToolInfo};
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn catalog() -> ToolCatalog {
    let catalog = ToolCatalog::new();
    let read_only = ToolAnnotations {
        read_only_hint: Some(true),
        ..Default::default()
    };
    catalog.insert(ToolInfo::new("search_docs", "Search the documentation").annotations(read_only));
    catalog.set_trusted(true);
    catalog
}

async fn start<S>(svc: &mut S, id: i64, tool: &str, args: serde_json::Value) -> S::Future
where
    S: Service<Request, Response = Response>,
    S::Error: std::fmt::Debug,
{
    svc.ready()
        .await
        .unwrap()
        .call(Request::tool_call(id, tool, args))
}

#[test]
fn both_are_left_out_unless_configured() {
    let plain = StandardStack::builder().build().unwrap();
    assert!(!plain.includes(StackLayer::Bulkhead));
    assert!(!plain.includes(StackLayer::Coalesce));
    assert!(plain.left_out().contains(&StackLayer::Bulkhead));
    let both = StandardStack::builder()
        .bulkhead(|b| b.max_concurrent(2))
        .coalesce(|b| b)
        .build()
        .unwrap();
    assert!(both.includes(StackLayer::Bulkhead));
    assert!(both.includes(StackLayer::Coalesce));
    let out = StandardStack::builder()
        .bulkhead(|b| b.max_concurrent(2))
        .without(StackLayer::Bulkhead)
        .build()
        .unwrap();
    assert!(!out.includes(StackLayer::Bulkhead));
    // Their errors are named in their sections.
    let err = StandardStack::builder()
        .bulkhead(|b| b.max_concurrent(0))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "bulkhead.max_concurrent");
    let err = StandardStack::builder()
        .coalesce(|b| b.max_in_flight(0))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "coalesce.max_in_flight");
    // A wait for a place that would use up the retry deadline is refused.
    let err = StandardStack::builder()
        .retry_deadline(Duration::from_secs(30))
        .bulkhead(|b| b.tool("slow", |b| b.max_wait(Duration::from_secs(30))))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "bulkhead.max_wait, retry.deadline");
    // An adaptive cap whose slow calls would all time out first is
    // refused (a tool's override counts too); one below the timeout is
    // built.
    let err = StandardStack::builder()
        .attempt_timeout(Duration::from_secs(10))
        .bulkhead(|b| {
            b.adaptive(|a| a.latency_threshold(Duration::from_secs(1)))
                .tool("slow", |b| {
                    b.adaptive(|a| a.latency_threshold(Duration::from_secs(10)))
                })
        })
        .build()
        .unwrap_err();
    assert_eq!(
        err.field(),
        "bulkhead.adaptive.latency_threshold, attempt_timeout"
    );
    assert!(StandardStack::builder()
        .attempt_timeout(Duration::from_secs(10))
        .bulkhead(|b| b.adaptive(|a| a.latency_threshold(Duration::from_secs(9))))
        .build()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_is_no_breaker_failure_and_is_not_retried_into_a_storm() {
    let mock = MockMcp::new().default_step("search_docs", Step::ok("docs").after(ms(2000)));
    let refusals = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&refusals);
    let events = Events::new().with(move |e: &Event<'_>| {
        if let Event::BulkheadFull { .. } = e {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let stack = StandardStack::builder()
        .catalog(catalog())
        .events(events)
        .retry(|b| b.max_attempts(3).base_delay(ms(10)))
        // The most sensitive breaker: one counted failure opens it.
        .circuit_breaker(|b| b.failure_threshold(1).minimum_calls(1))
        .bulkhead(|b| b.max_concurrent(1))
        .build()
        .unwrap();
    let mut svc = stack.layer(ReadyChecked::new(mock.clone()).pending_first());
    let holder = tokio::spawn(start(&mut svc, 1, "search_docs", json!({"q": "held"})).await);
    tokio::task::yield_now().await;
    let mut others = Vec::new();
    for id in 2..7 {
        let args = json!({ "q": id });
        others.push(tokio::spawn(start(&mut svc, id, "search_docs", args).await));
    }
    for (n, other) in others.into_iter().enumerate() {
        let resp = other.await.unwrap().unwrap();
        assert_eq!(resp.id, Id::Number(n as i64 + 2));
        assert!(resp.is_tool_error(), "{resp:?}");
        let text = resp.first_text().unwrap().into_owned();
        assert!(text.contains("busy"), "{text}");
    }
    // Each refused call was tried at most max_attempts times.
    let refused = refusals.load(Ordering::SeqCst);
    assert!((5..=15).contains(&refused), "{refused} refusals");
    // No refusal reached the breaker as a failure, and none reached the tool.
    assert_ne!(
        stack.registry().state("search_docs"),
        Some(CircuitState::Open)
    );
    assert_eq!(mock.calls("search_docs"), 1);
    let held = holder.await.unwrap().unwrap();
    assert_eq!(held.first_text().unwrap(), "docs");
    // The place is back.
    let resp = start(&mut svc, 9, "search_docs", json!({"q": "after"}))
        .await
        .await
        .unwrap();
    assert!(!resp.is_tool_error());
    assert_eq!(
        stack.registry().state("search_docs"),
        Some(CircuitState::Closed)
    );
}

#[tokio::test(start_paused = true)]
async fn coalesced_calls_pass_through_the_stack_once_and_share_its_retries() {
    let mock = MockMcp::new()
        .script(
            "search_docs",
            [Step::rpc_error(-32000, "connection reset").after(ms(100))],
        )
        .default_step("search_docs", Step::ok("docs").after(ms(100)));
    let stack = StandardStack::builder()
        .catalog(catalog())
        .retry(|b| b.max_attempts(3).base_delay(ms(10)))
        .coalesce(|b| b)
        .build()
        .unwrap();
    let mut svc = stack.layer(ReadyChecked::new(mock.clone()).pending_first());
    let args = json!({"q": "tower"});
    let mut calls = Vec::new();
    for id in 1..4 {
        calls.push(tokio::spawn(
            start(&mut svc, id, "search_docs", args.clone()).await,
        ));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    for (n, answer) in answers.into_iter().enumerate() {
        let resp = answer.unwrap();
        assert_eq!(resp.id, Id::Number(n as i64 + 1));
        assert_eq!(resp.first_text().unwrap(), "docs");
    }
    // One call, retried once, for three callers.
    assert_eq!(mock.calls("search_docs"), 2);
    // Observability above still sees three calls.
    let stats = serde_json::to_value(stack.stats().snapshot()).unwrap();
    assert!(stats.to_string().contains("search_docs"), "{stats}");
    // A tool the catalog does not call safe is never shared.
    mock.set_default("write", Step::ok("written").after(ms(100)));
    let a = start(&mut svc, 10, "write", json!({})).await;
    let b = start(&mut svc, 11, "write", json!({})).await;
    let (a, b) = tokio::join!(a, b);
    a.unwrap();
    b.unwrap();
    assert_eq!(mock.calls("write"), 2);
}
