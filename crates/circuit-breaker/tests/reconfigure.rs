//! `CircuitRegistry::reconfigure`: new policies, the breakers' state kept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use toolwarden_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use toolwarden_core::jsonrpc::Request;
use toolwarden_core::testing::{MockMcp, ReadyChecked, Step};
use toolwarden_core::{BoxError, CircuitOpen, Rejection as _};
use tower::{Layer, Service, ServiceExt};

fn failing() -> MockMcp {
    MockMcp::new()
        .default_step(
            "search",
            Step::tool_error("Error executing tool search: boom"),
        )
        .default_step(
            "fetch",
            Step::tool_error("Error executing tool fetch: boom"),
        )
}

async fn call<S>(svc: &mut S, tool: &str) -> Result<(), BoxError>
where
    S: Service<Request, Error = BoxError>,
{
    svc.ready().await?;
    svc.call(Request::tool_call(1, tool, json!({})))
        .await
        .map(drop)
}

fn breaker(threshold: u32, reset: Duration) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .failure_threshold(threshold)
        .failure_rate_threshold(None)
        .minimum_calls(1)
        .reset_timeout(reset)
        .max_reset_timeout(Duration::from_secs(300))
        .jitter(0.0)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_stays_open_and_the_next_one_follows_the_new_policy() {
    let running = breaker(3, Duration::from_secs(60));
    let upstream = failing();
    let mut svc = running.layer(ReadyChecked::new(upstream.clone()));
    for _ in 0..3 {
        let _ = call(&mut svc, "search").await;
    }
    assert_eq!(running.registry().state("search"), Some(CircuitState::Open));
    // One failure of `fetch` recorded under the old threshold of 3.
    let _ = call(&mut svc, "fetch").await;
    assert_eq!(
        running.registry().state("fetch"),
        Some(CircuitState::Closed)
    );

    running
        .registry()
        .reconfigure(breaker(2, Duration::from_secs(5)).registry())
        .unwrap();

    // Still open, for the rest of the open period it started (60 s), not
    // the new 5 s: the reload does not close it early.
    assert_eq!(running.registry().state("search"), Some(CircuitState::Open));
    let err = call(&mut svc, "search").await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(call(&mut svc, "search")
        .await
        .unwrap_err()
        .is::<CircuitOpen>());
    assert_eq!(upstream.calls("search"), 3);
    let circuit = running.registry().circuit("search").unwrap();
    assert_eq!(circuit.totals.failed, 3, "the totals are kept");

    // `fetch` kept its count: one more failure makes two in a row, which
    // trips the new threshold of 2 (not the old 3; and a forgotten count
    // would be one), and the open period is the new reset timeout.
    let _ = call(&mut svc, "fetch").await;
    assert_eq!(running.registry().state("fetch"), Some(CircuitState::Open));
    let refused = call(&mut svc, "fetch").await.unwrap_err();
    let refused = refused.downcast_ref::<CircuitOpen>().unwrap();
    assert!(refused.retry_after().unwrap() <= Duration::from_secs(5));

    // A breaker created after the reload starts with the new policy.
    upstream.set_default("new", Step::tool_error("Error executing tool new: boom"));
    let _ = call(&mut svc, "new").await;
    assert_eq!(running.registry().state("new"), Some(CircuitState::Closed));
    let _ = call(&mut svc, "new").await;
    assert_eq!(running.registry().state("new"), Some(CircuitState::Open));
}

#[tokio::test(start_paused = true)]
async fn a_forced_state_and_tool_overrides_survive() {
    let running = CircuitBreakerLayer::builder()
        .tool("fetch", |b| b.failure_threshold(10))
        .build()
        .unwrap();
    running.registry().force_open("search");
    running.registry().disable("fetch");
    let next = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .minimum_calls(1)
        .tool("fetch", |b| b.failure_threshold(1))
        .build()
        .unwrap();
    running.registry().reconfigure(next.registry()).unwrap();
    assert_eq!(
        running.registry().state("search"),
        Some(CircuitState::ForcedOpen)
    );
    assert_eq!(
        running.registry().state("fetch"),
        Some(CircuitState::Disabled)
    );
    let mut svc = running.layer(failing());
    for _ in 0..3 {
        let _ = call(&mut svc, "fetch").await;
    }
    assert_eq!(
        running.registry().state("fetch"),
        Some(CircuitState::Disabled)
    );
}

#[test]
fn registry_wide_settings_are_refused_and_nothing_changes() {
    let running = breaker(5, Duration::from_secs(30));
    let renamed = CircuitBreakerLayer::builder()
        .name("other")
        .build()
        .unwrap();
    let err = running
        .registry()
        .reconfigure(renamed.registry())
        .unwrap_err();
    assert_eq!(err.field(), "name");
    let by_server = CircuitBreakerLayer::builder()
        .key_by(toolwarden_core::KeyBy::Server)
        .build()
        .unwrap();
    let err = running
        .registry()
        .reconfigure(by_server.registry())
        .unwrap_err();
    assert_eq!(err.field(), "key_by");
}

#[tokio::test(start_paused = true)]
async fn a_refused_reconfiguration_keeps_the_old_policy() {
    let running = breaker(3, Duration::from_secs(30));
    let bounded = CircuitBreakerLayer::builder()
        .failure_threshold(1)
        .bounds(toolwarden_core::Bounds {
            max_keys: 3,
            ..Default::default()
        })
        .build()
        .unwrap();
    assert!(running.registry().reconfigure(bounded.registry()).is_err());
    let mut svc = running.layer(failing());
    for _ in 0..2 {
        let _ = call(&mut svc, "search").await;
    }
    assert_eq!(
        running.registry().state("search"),
        Some(CircuitState::Closed)
    );
    let _ = call(&mut svc, "search").await;
    assert_eq!(running.registry().state("search"), Some(CircuitState::Open));
}
