//! Property: among overlapping identical calls the server sees one call per
//! key at a time, and every caller that stays gets exactly one answer, with
//! its own id and its own key's answer, whoever else leaves meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use toolwarden_coalesce::CoalesceLayer;
use toolwarden_core::jsonrpc::{Id, Request, Response};
use toolwarden_core::testing::{text_result, ReadyChecked};
use toolwarden_core::{BoxError, McpRequest, McpResponse};
use tower::{Layer, Service};

/// Counts the upstream calls of each key in flight (and the most seen), and
/// the calls made in all.
/// Per key: (in flight now, most in flight at once); and calls made in all.
type Counts = Arc<Mutex<(HashMap<u64, (usize, usize)>, usize)>>;

#[derive(Clone, Default)]
struct Upstream {
    state: Counts,
}

struct Guard(Counts, u64);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.lock().unwrap().0.get_mut(&self.1).unwrap().0 -= 1;
    }
}

impl Service<Request> for Upstream {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let key = req.arguments().unwrap()["k"].as_u64().unwrap();
        {
            let mut state = self.state.lock().unwrap();
            state.1 += 1;
            let entry = state.0.entry(key).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
        }
        let guard = Guard(Arc::clone(&self.state), key);
        Box::pin(async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Response::result(
                req.id.clone(),
                text_result(&format!("k{key}")),
            ))
        })
    }
}

#[derive(Debug, Clone)]
enum Op {
    Call(u64),
    Drop(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u64).prop_map(Op::Call),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => (0..80u64).prop_map(Op::Advance),
    ]
}

type Pending = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn one_upstream_call_per_key_at_a_time_and_one_answer_per_caller(
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let upstream = Upstream::default();
            let layer = CoalesceLayer::builder().coalesce(true).build().unwrap();
            let mut svc = layer.layer(ReadyChecked::new(upstream.clone()));
            // (id, key, future)
            let mut live: Vec<(i64, u64, Pending)> = Vec::new();
            let mut answered = 0usize;
            let mut callers = 0usize;
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Call(key) => {
                        let id = n as i64;
                        let req = Request::tool_call(id, "t", json!({ "k": key }));
                        futures::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
                        live.push((id, key, Box::pin(svc.call(req))));
                        callers += 1;
                    }
                    Op::Drop(i) if !live.is_empty() => drop(live.swap_remove(i % live.len())),
                    Op::Drop(_) => {}
                    Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                }
                // Poll everyone still waiting; a ready one is answered once
                // and leaves.
                let mut i = 0;
                while i < live.len() {
                    let (id, key, fut) = &mut live[i];
                    match futures::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
                        Poll::Ready(result) => {
                            let resp = result.unwrap();
                            assert_eq!(resp.id, Id::Number(*id));
                            assert_eq!(resp.first_text().unwrap(), format!("k{key}"));
                            answered += 1;
                            drop(live.swap_remove(i));
                        }
                        Poll::Pending => i += 1,
                    }
                }
                let state = upstream.state.lock().unwrap();
                for (key, (_, most)) in &state.0 {
                    assert!(*most <= 1, "key {key}: {most} upstream calls at once");
                }
                assert!(state.1 <= callers);
            }
            // Drive the rest to their answers.
            for (id, key, fut) in live.drain(..) {
                let resp = fut.await.unwrap();
                assert_eq!(resp.id, Id::Number(id));
                assert_eq!(resp.first_text().unwrap(), format!("k{key}"));
                answered += 1;
            }
            assert!(answered <= callers);
            assert_eq!(layer.in_flight(), 0, "nothing is left in the map");
        });
    }
}
