//! The limits hold across clones driven concurrently (tower's own
//! `RateLimit` keeps one budget per clone; ours is shared).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::time::Instant;
use toolwarden_core::testing::{MockMcp, ReadyChecked};
use toolwarden_core::RateLimited;
use toolwarden_rate_limit::{Rate, RateLimitLayer};
use tower::Layer;

use support::*;

/// Eight clones, each a task calling `search` every 10 ms for 10 s of
/// paused time, 8 000 attempts in all.
#[tokio::test(start_paused = true)]
async fn eight_clones_admit_what_one_quota_allows_over_a_window() {
    const CLONES: usize = 8;
    let window = secs(10);
    // 10 per second, burst 5: at most 5 + 10 × 10 = 105 calls in the window.
    let (svc, mock) = harness(
        RateLimitLayer::builder().per_tool(Rate::per_second(10), 5),
        true,
    );
    let admitted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLONES)
        .map(|_| {
            let mut svc = svc.clone();
            let (admitted, refused) = (Arc::clone(&admitted), Arc::clone(&refused));
            tokio::spawn(async move {
                while start.elapsed() < window {
                    match call(&mut svc, tool_call("search")).await {
                        Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                        Err(err) => {
                            assert!(err.is::<RateLimited>(), "{err}");
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(ms(10)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    let refused = refused.load(Ordering::Relaxed);
    assert_eq!(admitted + refused, CLONES * 1000);
    // Calls at 0, 10, ..., 9 990 ms: the burst of 5, then one per 100 ms after 0.
    assert_eq!(
        admitted,
        5 + 99,
        "admitted {admitted} of {}",
        admitted + refused
    );
    assert_eq!(mock.calls("search"), admitted);
}

/// The same on real threads: a quota that cannot refill during the test
/// (one call per 72 s) admits exactly its burst, however the 8 clones race.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_clones_on_threads_never_exceed_the_burst() {
    let layer = RateLimitLayer::builder()
        .per_tool(Rate::per_hour(50), 50)
        .global(Rate::per_hour(80), 80)
        .build()
        .unwrap();
    let mock = MockMcp::new();
    let svc = layer.layer(ReadyChecked::new(mock.clone()));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let mut admitted = 0;
                for j in 0..60 {
                    let tool = if (i + j) % 2 == 0 { "search" } else { "fetch" };
                    if call(&mut svc, tool_call(tool)).await.is_ok() {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.unwrap();
    }
    // 480 attempts on two tools of 50 each, capped at 80 globally.
    assert_eq!(admitted, 80);
    assert_eq!(mock.total_calls(), 80);
    assert!(mock.calls("search") <= 50 && mock.calls("fetch") <= 50);
    // Tokens a tool quota gave to calls the global quota then refused were
    // given back: a tool that made fewer than 50 calls still has tokens, so
    // the global quota is what refuses it now.
    for tool in ["search", "fetch"] {
        let refused = svc.limits().check(&tool_call(tool)).unwrap_err();
        let expected = if mock.calls(tool) < 50 {
            "global"
        } else {
            tool
        };
        assert_eq!(
            refused.key(),
            expected,
            "{tool} made {} calls",
            mock.calls(tool)
        );
    }
}

/// Every service a layer builds, and every service built from a clone of the
/// layer, takes its tokens from one quota (one service per connection must
/// not multiply the quota).
#[tokio::test(start_paused = true)]
async fn services_built_from_one_layer_and_its_clones_share_one_quota() {
    let layer = RateLimitLayer::builder()
        .per_tool(Rate::per_minute(2), 2)
        .global(Rate::per_minute(10), 10)
        .build()
        .unwrap();
    let mock = MockMcp::new();
    let mut one = layer.layer(ReadyChecked::new(mock.clone()));
    let mut two = layer.layer(ReadyChecked::new(mock.clone()));
    let mut three = layer.clone().layer(ReadyChecked::new(mock.clone()));
    call(&mut one, tool_call("search")).await.unwrap();
    call(&mut two, tool_call("search")).await.unwrap();
    assert_refused(
        call(&mut three, tool_call("search")).await,
        "search",
        secs(30),
    );
    assert_refused(
        call(&mut one, tool_call("search")).await,
        "search",
        secs(30),
    );
    assert_eq!(mock.calls("search"), 2);
    // The layer's own limits are the ones its services use.
    assert!(layer.limits().check(&tool_call("search")).is_err());
    assert_eq!(one.limits().keys(), 1);
}
