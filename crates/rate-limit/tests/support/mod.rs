//! Helpers shared by the rate-limit integration tests.

// Not every test file uses every helper; helpers panic because that is how a test fails.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, MockMcp, ReadyChecked};
use toolwarden_core::{BoxError, Event, Events, McpRequest, RateLimited, SessionKey};
use toolwarden_rate_limit::{RateLimit, RateLimitBuilder};
use tower::{Layer, Service};

pub type Svc = RateLimit<ReadyChecked<MockMcp>>;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The layer over a mock that panics when called without readiness; with
/// `pending_first`, each readiness is granted on the second poll only.
pub fn harness(builder: RateLimitBuilder, pending_first: bool) -> (Svc, MockMcp) {
    let mock = MockMcp::new();
    let checked = ReadyChecked::new(mock.clone());
    let checked = if pending_first {
        checked.pending_first()
    } else {
        checked
    };
    (builder.build().unwrap().layer(checked), mock)
}

pub fn tool_call(tool: &str) -> Request {
    Request::tool_call(1, tool, json!({}))
}

pub fn session_call(session: &str, tool: &str) -> Request {
    let mut req = tool_call(tool);
    req.insert_extension(SessionKey::from(session));
    req
}

/// `poll_ready`, then `call`.
pub async fn call<S>(svc: &mut S, req: Request) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    ready_call(svc, req).await
}

/// The rejection a call must have ended with.
pub fn rate_limited(result: Result<Response, BoxError>) -> RateLimited {
    match result {
        Ok(resp) => panic!("expected RateLimited, the call went through: {resp:?}"),
        Err(err) => match err.downcast::<RateLimited>() {
            Ok(limited) => *limited,
            Err(other) => panic!("expected RateLimited, got {other}"),
        },
    }
}

/// Asserts a refusal by the quota of `key`, `retry_after` later.
pub fn assert_refused(result: Result<Response, BoxError>, key: &str, retry_after: Duration) {
    let limited = rate_limited(result);
    assert_eq!(limited.key(), key, "{limited}");
    assert_eq!(
        toolwarden_core::Rejection::retry_after(&limited),
        Some(retry_after),
        "{limited}"
    );
}

/// The `RateLimited` events seen, as (key, retry_after).
pub type Seen = Arc<Mutex<Vec<(String, Duration)>>>;

/// Events that record every `RateLimited` event.
pub fn recorded_events() -> (Events, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let events = Events::new().with(move |event: &Event<'_>| {
        if let Event::RateLimited { key, retry_after } = event {
            sink.lock().unwrap().push((key.to_string(), *retry_after));
        }
    });
    (events, seen)
}
