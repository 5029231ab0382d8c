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
//!
//! The `overhead_*` cases measure `guarded - bare` directly: each sample
//! alternates chunks of 32 bare and 32 guarded calls on the same requests
//! and reports the difference of their times, so load on the machine that
//! drifts during a run hits both sides alike instead of skewing a
//! subtraction of two separate medians. The side that runs first
//! alternates, since the second finds the requests in cache. A chunk pair in which either chunk
//! ran over 3 times the fastest chunk seen of its side was interrupted (the
//! thread was preempted, a shared machine's usual noise) and is measured
//! again.
//!
//! The session cases spread the calls over 100 sessions, each making 4
//! distinct calls in turn (a cycle of 4, longer than the default longest
//! cycle looked for), so no call is refused there either.

mod support;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use support::{arguments_200_bytes, overhead_pair, poll_once};
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::{call_fingerprint, fingerprint, BoxError, SessionKey};
use toolwarden_loop_guard::{LoopGuard, LoopGuardLayer};
use tower::Service;

const DISTINCT_CALLS: usize = 64;
const TOOL: &str = "search_repositories";

/// Calls per session in the session cases: each session cycles through
/// this many distinct calls, more than the longest cycle looked for (3), so
/// none is refused.
const CALLS_PER_SESSION: usize = 4;

/// Without sessions: `DISTINCT_CALLS` distinct calls in the default session.
/// With `sessions`: `sessions * CALLS_PER_SESSION` requests, consecutive
/// ones in different sessions, each session's calls distinct.
fn requests(precomputed: bool, sessions: Option<usize>) -> Vec<Request> {
    let count = sessions.map_or(DISTINCT_CALLS, |n| n * CALLS_PER_SESSION);
    (0..count)
        .map(|i| {
            let limit = match sessions {
                Some(n) => i / n,
                None => i,
            };
            let mut request = Request::tool_call(i as i64, TOOL, arguments_200_bytes(limit));
            if precomputed {
                call_fingerprint(&mut request);
            }
            if let Some(n) = sessions {
                let session = format!("session-{}", i % n);
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

/// Times `service` on `requests` in turn. `refused` says whether every call
/// is expected to be refused; each result is checked (one branch), so a
/// case cannot silently measure the other path.
fn bench_case<S>(c: &mut Criterion, name: &str, mut service: S, requests: &[Request], refused: bool)
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let mut i = 0usize;
    c.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            let result = poll_once(&mut service, black_box(&requests[i]).clone());
            assert_eq!(result.is_err(), refused, "{name} measured the wrong path");
            black_box(result)
        })
    });
}

/// The guard's overhead per call: bare and guarded calls in alternating
/// chunks on the same requests (each side walks them in the same order);
/// the sample's time is the sum of the differences (see the module docs).
fn bench_overhead_pair<B, G>(
    c: &mut Criterion,
    name: &str,
    mut bare: B,
    mut guarded: G,
    requests: &[Request],
) where
    B: Service<Request, Response = Response, Error = BoxError>,
    G: Service<Request, Response = Response, Error = BoxError>,
{
    let (mut next_bare, mut next_guarded) = (0usize, 0usize);
    let mut overhead = overhead_pair(
        || call_next(&mut bare, requests, &mut next_bare, name),
        || call_next(&mut guarded, requests, &mut next_guarded, name),
    );
    c.bench_function(name, |b| b.iter_custom(&mut overhead));
}

/// Calls `service` with a clone of `requests[*next]` and moves `next` on; the
/// call must go through.
#[inline]
fn call_next<S>(service: &mut S, requests: &[Request], next: &mut usize, name: &str)
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let request = black_box(&requests[*next]).clone();
    *next = (*next + 1) % requests.len();
    assert!(
        black_box(poll_once(service, request)).is_ok(),
        "{name}: a refusal would measure the wrong path"
    );
}

fn guard<S>(inner: S) -> LoopGuard<S> {
    LoopGuard::new(inner, &LoopGuardLayer::new())
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

    bench_case(c, "loop_guard/bare", upstream(), &plain, false);
    bench_case(c, "loop_guard/guarded", guard(upstream()), &plain, false);

    bench_case(
        c,
        "loop_guard/bare_fingerprint_in_extensions",
        upstream(),
        &with_fingerprint,
        false,
    );
    bench_case(
        c,
        "loop_guard/guarded_fingerprint_in_extensions",
        guard(upstream()),
        &with_fingerprint,
        false,
    );

    bench_case(
        c,
        "loop_guard/bare_session_key",
        upstream(),
        &with_session,
        false,
    );
    bench_case(
        c,
        "loop_guard/guarded_session_key",
        guard(upstream()),
        &with_session,
        false,
    );

    bench_overhead_pair(
        c,
        "loop_guard/overhead",
        upstream(),
        guard(upstream()),
        &plain,
    );
    bench_overhead_pair(
        c,
        "loop_guard/overhead_fingerprint_in_extensions",
        upstream(),
        guard(upstream()),
        &with_fingerprint,
    );
    bench_overhead_pair(
        c,
        "loop_guard/overhead_session_key",
        upstream(),
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
        let result = poll_once(&mut service, same[0].clone());
        assert!(result.is_ok(), "the first three calls go through");
    }
    assert!(
        poll_once(&mut service, same[0].clone()).is_err(),
        "the 4th is refused"
    );
    bench_case(
        c,
        "loop_guard/bare_failing",
        failing_upstream(),
        &same,
        false,
    );
    bench_case(c, "loop_guard/refused", service, &same, true);
}

criterion_group!(benches, bench_overhead, bench_refusal);
criterion_main!(benches);
