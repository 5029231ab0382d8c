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
