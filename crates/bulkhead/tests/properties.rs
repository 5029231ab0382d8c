//! Property: under any interleaving of calls, completions, time and
//! cancellations (futures dropped at any point: waiting, in flight, never
//! polled), a bulkhead never lets more than its cap into the tool, and every
//! place is given back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use toolwarden_bulkhead::BulkheadLayer;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{text_result, ReadyChecked};
use toolwarden_core::{BoxError, BulkheadFull, KeyRef, McpRequest};
use tower::{Layer, Service};

const TOOLS: [&str; 2] = ["a", "b"];
const CAPS: [u32; 2] = [2, 3];

/// Counts the calls of each tool in flight, and the most ever seen.
#[derive(Clone, Default)]
struct Counting {
    counts: Arc<Mutex<HashMap<String, (usize, usize)>>>,
}

struct Guard(Arc<Mutex<HashMap<String, (usize, usize)>>>, String);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.lock().unwrap().get_mut(&self.1).unwrap().0 -= 1;
    }
}

impl Service<Request> for Counting {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let tool = req.tool_name().unwrap().to_owned();
        let latency = Duration::from_millis(req.arguments().unwrap()["ms"].as_u64().unwrap());
        {
            let mut counts = self.counts.lock().unwrap();
            let entry = counts.entry(tool.clone()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
        }
        let guard = Guard(Arc::clone(&self.counts), tool);
        Box::pin(async move {
            let _guard = guard;
            tokio::time::sleep(latency).await;
            Ok(Response::result(req.id.clone(), text_result("ok")))
        })
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Start a call of tool `tool` lasting `ms`.
    Call { tool: usize, ms: u64 },
    /// Drop the live call at this index (modulo their number).
    Drop(usize),
    /// Let time pass.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TOOLS.len(), 1..300u64).prop_map(|(tool, ms)| Op::Call { tool, ms }),
        2 => any::<usize>().prop_map(Op::Drop),
        2 => (0..200u64).prop_map(Op::Advance),
    ]
}

type Pending = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

async fn poll_all(live: &mut Vec<Pending>, refused: &mut usize) {
    let mut i = 0;
    while i < live.len() {
        match futures::future::poll_fn(|cx| Poll::Ready(live[i].as_mut().poll(cx))).await {
            Poll::Ready(result) => {
                if let Err(err) = result {
                    assert!(err.is::<BulkheadFull>(), "{err}");
                    *refused += 1;
                }
                drop(live.swap_remove(i));
            }
            Poll::Pending => i += 1,
        }
    }
}

fn run(ops: Vec<Op>, max_wait_ms: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let upstream = Counting::default();
        let layer = BulkheadLayer::builder()
            .tool("a", |b| b.max_concurrent(CAPS[0]))
            .tool("b", move |b| {
                b.max_concurrent(CAPS[1])
                    .max_wait(Duration::from_millis(max_wait_ms))
            })
            .build()
            .unwrap();
        let mut svc = layer.layer(ReadyChecked::new(upstream.clone()));
        let mut live: Vec<Pending> = Vec::new();
        let mut refused = 0;
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Call { tool, ms } => {
                    let req = Request::tool_call(n as i64, TOOLS[tool], json!({ "ms": ms }));
                    futures::future::poll_fn(|cx| svc.poll_ready(cx))
                        .await
                        .unwrap();
                    live.push(Box::pin(svc.call(req)));
                }
                Op::Drop(i) if !live.is_empty() => drop(live.swap_remove(i % live.len())),
                Op::Drop(_) => {}
                Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            }
            poll_all(&mut live, &mut refused).await;
            let counts = upstream.counts.lock().unwrap().clone();
            for (i, tool) in TOOLS.iter().enumerate() {
                let (now, most) = counts.get(*tool).copied().unwrap_or_default();
                assert!(
                    most <= CAPS[i] as usize,
                    "{tool}: {most} in flight, cap {}",
                    CAPS[i]
                );
                assert!(layer.in_flight(KeyRef::Tool(tool)) as usize >= now);
            }
        }
        drop(live);
        // Every place is back.
        for tool in TOOLS {
            assert_eq!(layer.in_flight(KeyRef::Tool(tool)), 0, "{tool}");
        }
        let _ = refused;
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_cap_holds_and_every_place_comes_back(
        ops in proptest::collection::vec(op(), 1..80),
        max_wait_ms in prop_oneof![Just(0u64), 1..400u64],
    ) {
        run(ops, max_wait_ms);
    }
}

// The adaptive cap: under random outcomes, latencies and cancellations, no
// call is admitted while the calls in flight are at the cap as it stands,
// the cap stays within [min, max], and every place comes back.

const ADAPTIVE_MIN: u32 = 2;
const ADAPTIVE_MAX: u32 = 6;

/// How a call of the probe ends.
#[derive(Debug, Clone, Copy)]
enum End {
    Ok,
    /// A transport failure (the server's trouble).
    Transport,
    /// A client error (no signal).
    Client,
    /// A rejection by a layer below (no signal).
    Rejected,
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        4 => Just(End::Ok),
        2 => Just(End::Transport),
        1 => Just(End::Client),
        1 => Just(End::Rejected),
    ]
}

#[derive(Debug, Clone)]
enum AdaptiveOp {
    Call { ms: u64, end: End },
    Drop(usize),
    Advance(u64),
}

fn adaptive_op() -> impl Strategy<Value = AdaptiveOp> {
    prop_oneof![
        5 => (1..250u64, end()).prop_map(|(ms, end)| AdaptiveOp::Call { ms, end }),
        1 => any::<usize>().prop_map(AdaptiveOp::Drop),
        3 => (0..150u64).prop_map(AdaptiveOp::Advance),
    ]
}

/// Checks, at each admission into the tool, the bulkhead's count of calls
/// in flight (this one included) against its cap at that moment.
#[derive(Clone)]
struct Probe {
    layer: BulkheadLayer,
    /// Admissions over the cap, as (in flight, cap).
    over: Arc<Mutex<Vec<(u32, u32)>>>,
}

impl Service<Request> for Probe {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let in_flight = self.layer.in_flight(KeyRef::Tool("a"));
        let cap = self.layer.current_limit(KeyRef::Tool("a"));
        if in_flight > cap {
            self.over.lock().unwrap().push((in_flight, cap));
        }
        let args = req.arguments().unwrap();
        let latency = Duration::from_millis(args["ms"].as_u64().unwrap());
        let end = args["end"].as_str().unwrap().to_owned();
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            match end.as_str() {
                "ok" => Ok(Response::result(req.id.clone(), text_result("ok"))),
                "transport" => Err(Box::new(toolwarden_core::classify::TransportError::new(
                    toolwarden_core::classify::TransportErrorKind::Closed,
                    "closed",
                )) as BoxError),
                "client" => Ok(Response::error(
                    req.id.clone(),
                    toolwarden_core::jsonrpc::ErrorObject::new(-32602, "invalid params"),
                )),
                _ => Err(
                    Box::new(BulkheadFull::new("below", 1, Duration::from_millis(5))) as BoxError,
                ),
            }
        })
    }
}

fn run_adaptive(ops: Vec<AdaptiveOp>, max_wait_ms: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let layer = BulkheadLayer::builder()
            .max_concurrent(ADAPTIVE_MAX)
            .max_wait(Duration::from_millis(max_wait_ms))
            .adaptive(|a| {
                a.min_concurrent(ADAPTIVE_MIN)
                    .initial_concurrent(4)
                    .latency_threshold(Duration::from_millis(100))
            })
            .build()
            .unwrap();
        let probe = Probe {
            layer: layer.clone(),
            over: Arc::default(),
        };
        let mut svc = layer.layer(ReadyChecked::new(probe.clone()));
        let mut live: Vec<Pending> = Vec::new();
        let mut refused = 0;
        let mut caps = Vec::new();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                AdaptiveOp::Call { ms, end } => {
                    let end = match end {
                        End::Ok => "ok",
                        End::Transport => "transport",
                        End::Client => "client",
                        End::Rejected => "rejected",
                    };
                    let req = Request::tool_call(n as i64, "a", json!({ "ms": ms, "end": end }));
                    futures::future::poll_fn(|cx| svc.poll_ready(cx))
                        .await
                        .unwrap();
                    live.push(Box::pin(svc.call(req)));
                }
                AdaptiveOp::Drop(i) if !live.is_empty() => drop(live.swap_remove(i % live.len())),
                AdaptiveOp::Drop(_) => {}
                AdaptiveOp::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            }
            poll_all_any(&mut live, &mut refused).await;
            let cap = layer.current_limit(KeyRef::Tool("a"));
            assert!(
                (ADAPTIVE_MIN..=ADAPTIVE_MAX).contains(&cap),
                "cap {cap} out of bounds"
            );
            caps.push(cap);
            let over = probe.over.lock().unwrap().clone();
            assert!(
                over.is_empty(),
                "admitted over the cap: {over:?}; caps {caps:?}"
            );
        }
        drop(live);
        assert_eq!(layer.in_flight(KeyRef::Tool("a")), 0);
        // Every permit is accounted for: exactly `cap` calls are admitted now.
        let cap = layer.current_limit(KeyRef::Tool("a"));
        let mut held = Vec::new();
        for n in 0..cap {
            let req = Request::tool_call(i64::from(n), "a", json!({ "ms": 10_000, "end": "ok" }));
            futures::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .unwrap();
            held.push(svc.call(req));
        }
        assert_eq!(layer.in_flight(KeyRef::Tool("a")), cap);
        // And not one more.
        let req = Request::tool_call(-1, "a", json!({ "ms": 10, "end": "ok" }));
        futures::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .unwrap();
        let mut extra = svc.call(req);
        let _ = futures::FutureExt::now_or_never(&mut extra);
        assert_eq!(layer.in_flight(KeyRef::Tool("a")), cap);
        let _ = refused;
    });
}

/// Polls every live call once, dropping those that ended (any outcome).
async fn poll_all_any(live: &mut Vec<Pending>, ended: &mut usize) {
    let mut i = 0;
    while i < live.len() {
        match futures::future::poll_fn(|cx| Poll::Ready(live[i].as_mut().poll(cx))).await {
            Poll::Ready(_) => {
                *ended += 1;
                drop(live.swap_remove(i));
            }
            Poll::Pending => i += 1,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn an_adaptive_cap_holds_at_admission_and_stays_in_bounds(
        ops in proptest::collection::vec(adaptive_op(), 1..120),
        max_wait_ms in prop_oneof![Just(0u64), 1..300u64],
    ) {
        run_adaptive(ops, max_wait_ms);
    }
}
