//! LoopGuardLayer: per-call overhead over the bare service it wraps.
//!
//! Run: `cargo bench -p toolwarden-workspace --bench loop_guard`
//!
//! Every case clones a prepared `tools/call` request (a ~200-byte arguments
//! object), drives `poll_ready` then `call` on a ready `service_fn`, and
//! polls the ready response future once. The bare cases do exactly the same
//! without the guard, with the same requests (same extensions), so
//! `guarded - bare` is the guard's overhead. Requests cycle through 64
//! distinct argument objects that all succeed: no call repeats within the
//! window, so no call is refused, which is the guard's steady state.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::{call_fingerprint, fingerprint, BoxError, SessionKey};
use toolwarden_loop_guard::{LoopGuard, LoopGuardLayer};
use tower::Service;

const DISTINCT_CALLS: usize = 64;
const TOOL: &str = "search_repositories";

/// The core bench's ~200-byte nested arguments with a `_meta` member, with
/// `limit` varied so that each of the 64 requests has its own fingerprint.
fn arguments_200_bytes(limit: usize) -> Value {
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

fn requests(precomputed: bool, sessions: Option<usize>) -> Vec<Request> {
    (0..DISTINCT_CALLS)
        .map(|i| {
            let mut request = Request::tool_call(i as i64, TOOL, arguments_200_bytes(i));
            if precomputed {
                call_fingerprint(&mut request);
            }
            if let Some(sessions) = sessions {
                let session = format!("session-{}", i % sessions);
                request
                    .extensions
                    .insert(SessionKey::from(session.as_str()));
            }
            request
        })
        .collect()
}

/// A ready service answering every call with a small successful result.
fn upstream() -> impl Service<Request, Response = Response, Error = BoxError> + Clone {
    let ok = json!({"content": [{"type": "text", "text": "3 repositories"}], "isError": false});
    tower::service_fn(move |request: Request| {
        std::future::ready(Ok(Response::result(request.id, ok.clone())))
    })
}

/// A ready service whose every call fails, for the refusal path.
fn failing_upstream() -> impl Service<Request, Response = Response, Error = BoxError> + Clone {
    let failed =
        json!({"content": [{"type": "text", "text": "upstream exploded"}], "isError": true});
    tower::service_fn(move |request: Request| {
        std::future::ready(Ok(Response::result(request.id, failed.clone())))
    })
}

/// `poll_ready`, `call`, and one poll of the (ready) response future.
#[inline]
fn drive<S>(service: &mut S, request: Request) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("the bench services are always ready"),
    }
    match pin!(service.call(request)).poll(&mut cx) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("the bench services answer at once"),
    }
}

fn bench_case<S>(c: &mut Criterion, name: &str, mut service: S, requests: &[Request])
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let mut i = 0usize;
    c.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(drive(&mut service, black_box(&requests[i]).clone()))
        })
    });
}

fn guard<S>(inner: S) -> LoopGuard<S> {
    LoopGuard::new(inner, LoopGuardLayer::new().config().clone())
}

fn bench_overhead(c: &mut Criterion) {
    let plain = requests(false, None);
    let with_fingerprint = requests(true, None);
    let with_session = requests(true, Some(100));

    // For scale: the core fingerprint of the same arguments, alone.
    let args = arguments_200_bytes(7);
    c.bench_function("loop_guard/core_fingerprint_200B", |b| {
        b.iter(|| fingerprint(black_box(TOOL), black_box(args.as_object())))
    });

    bench_case(c, "loop_guard/bare", upstream(), &plain);
    bench_case(c, "loop_guard/guarded", guard(upstream()), &plain);

    bench_case(
        c,
        "loop_guard/bare_fingerprint_in_extensions",
        upstream(),
        &with_fingerprint,
    );
    bench_case(
        c,
        "loop_guard/guarded_fingerprint_in_extensions",
        guard(upstream()),
        &with_fingerprint,
    );

    bench_case(c, "loop_guard/bare_session_key", upstream(), &with_session);
    bench_case(
        c,
        "loop_guard/guarded_session_key",
        guard(upstream()),
        &with_session,
    );
}

fn bench_refusal(c: &mut Criterion) {
    // One identical failing call, over and over: after three failures every
    // call is refused without reaching the upstream.
    let same = vec![requests(true, None).swap_remove(0)];
    let mut service = guard(failing_upstream());
    for _ in 0..3 {
        let result = drive(&mut service, same[0].clone());
        assert!(result.is_ok(), "the first three calls go through");
    }
    assert!(
        drive(&mut service, same[0].clone()).is_err(),
        "the 4th is refused"
    );
    bench_case(c, "loop_guard/bare_failing", failing_upstream(), &same);
    bench_case(c, "loop_guard/refused", service, &same);
}

criterion_group!(benches, bench_overhead, bench_refusal);
criterion_main!(benches);
