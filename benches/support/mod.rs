//! The harness the criterion benches share: request and response types that
//! cost nothing to read, services that answer at once, a synchronous driver
//! for them, and the paired `layered - bare` timer.
//!
//! Each bench is its own crate and includes this module with `mod support;`.

#![allow(dead_code)] // each bench uses a different subset
#![allow(clippy::expect_used)] // setup failures abort the bench

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::runtime::Runtime;
use toolwarden_core::jsonrpc::Id;
use toolwarden_core::request::RpcErrorRef;
use toolwarden_core::{BoxError, McpRequest, McpResponse, TOOLS_CALL};
use tower::util::ServiceFn;
use tower::{service_fn, Service};

pub mod stack;

/// Eight tool names that calls cycle over.
pub const TOOLS: [&str; 8] = [
    "search_docs",
    "web_search",
    "read_file",
    "write_file",
    "list_issues",
    "get_weather",
    "send_email",
    "run_query",
];

/// A `tools/call` of one tool, nothing else: reading it costs nothing, so a
/// bench measures the layer and not the request.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub tool: &'static str,
}

impl McpRequest for Call {
    fn method(&self) -> &str {
        TOOLS_CALL
    }
    fn tool_name(&self) -> Option<&str> {
        Some(self.tool)
    }
    fn arguments(&self) -> Option<&Map<String, Value>> {
        None
    }
    fn is_continuation(&self) -> bool {
        false
    }
    fn session_key(&self) -> Option<&str> {
        None
    }
    fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        None
    }
    fn insert_extension<T: Clone + Send + Sync + 'static>(&mut self, _value: T) {}
}

/// A successful tool result, nothing else: reading it costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct Reply;

impl McpResponse for Reply {
    fn rpc_error(&self) -> Option<RpcErrorRef<'_>> {
        None
    }
    fn is_tool_error(&self) -> bool {
        false
    }
    fn is_empty_tool_result(&self) -> bool {
        false
    }
    fn is_input_required(&self) -> bool {
        false
    }
    fn first_text(&self) -> Option<Cow<'_, str>> {
        None
    }
    fn from_tool_result(_id: Option<&Id>, _result: Value) -> Self {
        Reply
    }
    fn insert_result_meta(&mut self, _key: &str, _value: Value) {}
    fn push_text(&mut self, _text: String) {}
    fn size_hint(&self) -> usize {
        0
    }
}

/// A bare service, always ready, answering every request at once with a
/// clone of its value.
#[derive(Debug, Clone)]
pub struct Bare<T>(pub T);

impl<R, T: Clone> Service<R> for Bare<T> {
    type Response = T;
    type Error = BoxError;
    type Future = Ready<Result<T, BoxError>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: R) -> Self::Future {
        ready(Ok(self.0.clone()))
    }
}

/// What [`unit_service`] returns.
pub type UnitService = ServiceFn<fn(Call) -> Ready<Result<(), Infallible>>>;

/// A `service_fn` answering every [`Call`] at once with `()`; it cannot fail.
pub fn unit_service() -> UnitService {
    service_fn(|_call: Call| ready(Ok::<(), Infallible>(())))
}

/// One call driven synchronously: `poll_ready`, `call`, and one poll of the
/// response future, with a no-op waker. The bench services are ready at once
/// and answer at once; anything else panics rather than measure a wait.
#[inline]
pub fn poll_once<S, R>(service: &mut S, request: R) -> Result<S::Response, S::Error>
where
    S: Service<R>,
    S::Error: Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("the bench services are always ready, got {other:?}"),
    }
    match pin!(service.call(request)).poll(&mut cx) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("the bench services answer at once"),
    }
}

/// [`poll_once`] for a call that must succeed: its response.
#[inline]
pub fn one_call<S, R>(service: &mut S, request: R) -> S::Response
where
    S: Service<R>,
    S::Error: Debug,
{
    match poll_once(service, request) {
        Ok(response) => response,
        Err(e) => panic!("the call failed: {e:?}"),
    }
}

/// A timer for `Bencher::iter_custom` that measures `layered - bare` per
/// call directly: each sample runs the two sides in alternating chunks of
/// 32 calls (which side goes first alternates too, since the second finds
/// its data in cache) and reports the sum of the differences, so load that
/// drifts during the run hits both sides alike. A chunk pair in which either
/// chunk ran over 3 times the fastest chunk of its side was interrupted
/// (preempted) and is measured again, up to 20 times in a row.
///
/// ```ignore
/// let mut overhead = overhead_pair(|| bare_call(), || layered_call());
/// group.bench_function("overhead", |b| b.iter_custom(&mut overhead));
/// ```
pub fn overhead_pair(
    mut bare: impl FnMut(),
    mut layered: impl FnMut(),
) -> impl FnMut(u64) -> Duration {
    const CHUNK: u64 = 32;
    /// A chunk this many times slower than the fastest of its side was interrupted.
    const SPIKE: f64 = 3.0;
    /// Give up re-measuring after this many interrupted pairs in a row.
    const MAX_RETRIES: u32 = 20;
    fn timed(side: &mut dyn FnMut(), chunk: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..chunk {
            side();
        }
        start.elapsed()
    }
    // The fastest time per call seen on each side, in nanoseconds, over
    // every sample of the benchmark.
    let (mut fastest_bare, mut fastest_layered) = (f64::INFINITY, f64::INFINITY);
    move |iters| {
        let mut difference_ns: i128 = 0;
        let (mut done, mut retries, mut flip) = (0, 0, false);
        while done < iters {
            let chunk = CHUNK.min(iters - done);
            let (bare_time, layered_time) = if flip {
                let layered_time = timed(&mut layered, chunk);
                (timed(&mut bare, chunk), layered_time)
            } else {
                let bare_time = timed(&mut bare, chunk);
                (bare_time, timed(&mut layered, chunk))
            };
            flip = !flip;
            let per_call = |t: Duration| t.as_nanos() as f64 / chunk as f64;
            let (b, l) = (per_call(bare_time), per_call(layered_time));
            fastest_bare = fastest_bare.min(b);
            fastest_layered = fastest_layered.min(l);
            if (b > SPIKE * fastest_bare || l > SPIKE * fastest_layered) && retries < MAX_RETRIES {
                retries += 1;
                continue;
            }
            retries = 0;
            difference_ns += layered_time.as_nanos() as i128 - bare_time.as_nanos() as i128;
            done += chunk;
        }
        // Criterion needs a positive time; a sample where the bare side
        // came out slower (noise) counts as 1 ns.
        Duration::from_nanos(u64::try_from(difference_ns.max(1)).unwrap_or(u64::MAX))
    }
}

/// A multi-threaded tokio runtime with 2 workers.
pub fn runtime_2_workers() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A current-thread tokio runtime with the time driver.
pub fn runtime_current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// ~200 bytes (serialised) of nested `tools/call` arguments with a `_meta`
/// member the fingerprint must skip; `limit` varies them.
pub fn arguments_200_bytes(limit: usize) -> Value {
    let args = json!({
        "query": "circuit breaker half-open probes",
        "filters": {"language": "rust", "stars": {"min": 100, "max": 5000}, "archived": false},
        "sort": ["relevance", "updated"],
        "limit": limit,
        "cursor": null,
        "_meta": {"progressToken": 42}
    });
    let len = args.to_string().len();
    assert!((180..=240).contains(&len), "{len}");
    args
}
