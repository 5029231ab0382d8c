//! The stack bench's sides (`benches/stack.rs`, `benches/stack_allocations.rs`):
//! the same requests, upstream and stacks for both.

#![allow(clippy::expect_used)] // setup failures abort the bench

use std::future::{ready, Ready};
use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::json;
use toolwarden::rate_limit::Rate;
use toolwarden::stack::StandardStack;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::BoxError;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

use super::arguments_200_bytes;

pub const TOOLS: [&str; 8] = [
    "search_docs",
    "web_search",
    "read_file",
    "list_issues",
    "get_weather",
    "run_query",
    "fetch_page",
    "translate",
];

/// The requests of one task: 64 calls over four tools (`offset` picks which
/// four), arguments varied so that no two in a row are the same call.
pub fn requests(offset: usize) -> Vec<Request> {
    (0..64)
        .map(|i| {
            let mut args = arguments_200_bytes(i);
            args.as_object_mut().map(|a| a.remove("_meta"));
            Request::tool_call(i as i64, TOOLS[offset + i % 4], args)
        })
        .collect()
}

pub type Svc = BoxCloneSyncService<Request, Response, BoxError>;

/// The upstream: a small text result under the request's id.
fn upstream() -> impl Service<
    Request,
    Response = Response,
    Error = BoxError,
    Future = Ready<Result<Response, BoxError>>,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|request: Request| {
        ready(Ok::<_, BoxError>(Response::result(
            request.id,
            json!({"content": [{"type": "text", "text": "3 results"}]}),
        )))
    })
}

pub fn bare() -> Svc {
    BoxCloneSyncService::new(upstream())
}

pub fn toolwarden_stack() -> Svc {
    toolwarden_defaults_without(None)
}

/// The `toolwarden` side, with `left_out` left out of it.
pub fn toolwarden_defaults_without(left_out: Option<toolwarden::stack::StackLayer>) -> Svc {
    let builder =
        StandardStack::builder().rate_limit(|b| b.per_tool(Rate::per_second(1_000_000), 1_000_000));
    let builder = match left_out {
        Some(layer) => builder.without(layer),
        None => builder,
    };
    let stack = builder.build().expect("the stack's configuration");
    BoxCloneSyncService::new(stack.layer(upstream()))
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(error: E) -> BoxError {
    Box::new(error)
}

pub fn tower_resilience_stack() -> Svc {
    let retry = tower_resilience::retry::RetryLayer::<Request, Response, BoxError>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(100))
        .build();
    let limiter = tower_resilience::ratelimiter::RateLimiterLayer::burst(1_000_000_000, 1_000_000)
        .build()
        .expect("the rate limiter's configuration");
    let breaker = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .sliding_window_size(100)
        .build()
        .expect("the breaker's configuration");
    let service = ServiceBuilder::new()
        .layer(retry)
        .map_err(boxed)
        .layer(limiter)
        .map_err(boxed)
        .layer(breaker)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(10)))
        .service(upstream());
    BoxCloneSyncService::new(service)
}

/// The value after `flag` on the bench's command line (`--side NAME`).
pub fn flag_value(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// `n` calls, one at a time, through `service`; how long they took.
pub async fn sequential(service: &Svc, requests: &[Request], n: u64) -> Duration {
    let mut service = service.clone();
    let start = Instant::now();
    for i in 0..n {
        let request = requests[(i % requests.len() as u64) as usize].clone();
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("an answer");
        black_box(response);
    }
    start.elapsed()
}

/// The standard stack (as [`toolwarden_stack`]) without `left_out`; the
/// optional layers (bulkhead, coalescing, hedging) are in unless left out.
pub fn toolwarden_stack_without(left_out: &[toolwarden::stack::StackLayer]) -> Svc {
    let builder = StandardStack::builder()
        .rate_limit(|b| b.per_tool(Rate::per_second(1_000_000), 1_000_000))
        // Issue 21: configured, so that "only bulkhead", "only coalesce" and
        // "only hedge" measure them.
        .bulkhead(|b| b.max_concurrent(1 << 20))
        .coalesce(|b| b)
        .hedge(|b| b);
    let builder = left_out
        .iter()
        .fold(builder, |builder, layer| builder.without(*layer));
    BoxCloneSyncService::new(
        builder
            .build()
            .expect("the stack's configuration")
            .layer(upstream()),
    )
}

/// The three sides, named as in the bench output.
pub fn sides() -> [(&'static str, Svc); 3] {
    [
        ("bare", bare()),
        ("toolwarden", toolwarden_stack()),
        ("tower_resilience", tower_resilience_stack()),
    ]
}
