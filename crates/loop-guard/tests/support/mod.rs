//! Helpers shared by the loop guard's integration tests.

// Test helpers: a panic is how a test reports failure.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use serde_json::Value;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{MockMcp, ReadyChecked};
use toolwarden_core::{BoxError, Event, Events, LoopDetected, LoopPattern, SessionKey};
use toolwarden_loop_guard::{LoopGuard, LoopGuardBuilder};
use tower::{Service, ServiceExt};

/// The guard under test, over a mock that checks tower's readiness contract.
pub type Guard = LoopGuard<ReadyChecked<MockMcp>>;

/// An event as a test sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub name: &'static str,
    pub tool: String,
    pub repeats: u32,
}

impl Seen {
    pub fn warned(tool: &str, repeats: u32) -> Self {
        Seen {
            name: "loop_warned",
            tool: tool.into(),
            repeats,
        }
    }

    pub fn blocked(tool: &str, repeats: u32) -> Self {
        Seen {
            name: "loop_detected",
            tool: tool.into(),
            repeats,
        }
    }
}

/// An event sink that records loop events.
pub fn event_log() -> (Events, Arc<Mutex<Vec<Seen>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    let events = Events::new().with(move |event: &Event<'_>| {
        let repeats = match event {
            Event::LoopWarned { repeats, .. } | Event::LoopDetected { repeats, .. } => *repeats,
            _ => return,
        };
        sink.lock().unwrap().push(Seen {
            name: event.name(),
            tool: event.subject().unwrap_or_default().to_owned(),
            repeats,
        });
    });
    (events, log)
}

/// Builds a guard over `mock`, wrapped in [`ReadyChecked`] (answering
/// `Pending` first when `pending_first`), with an event log.
pub fn guard(
    builder: LoopGuardBuilder,
    mock: &MockMcp,
    pending_first: bool,
) -> (Guard, Arc<Mutex<Vec<Seen>>>) {
    let (events, log) = event_log();
    let layer = builder.events(events).build().expect("valid configuration");
    let checked = ReadyChecked::new(mock.clone());
    let checked = if pending_first {
        checked.pending_first()
    } else {
        checked
    };
    (LoopGuard::new(checked, &layer), log)
}

/// A `tools/call` of `tool` with `arguments`.
pub fn tool_call(tool: &str, arguments: Value) -> Request {
    Request::tool_call(1, tool, arguments)
}

/// A `tools/call` in `session`.
pub fn in_session(session: &str, mut request: Request) -> Request {
    request.extensions.insert(SessionKey::from(session));
    request
}

/// Drives one call through `poll_ready` then `call`.
pub async fn send<S>(service: &mut S, request: Request) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    service.ready().await?.call(request).await
}

/// Sends `request` and expects a refusal; returns it.
pub async fn expect_blocked<S>(service: &mut S, request: Request) -> LoopDetected
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    match send(service, request).await {
        Ok(response) => panic!("expected a refusal, got {:?}", response.to_value()),
        Err(err) => match err.downcast::<LoopDetected>() {
            Ok(refusal) => *refusal,
            Err(other) => panic!("expected LoopDetected, got {other}"),
        },
    }
}

/// Sends `request` and expects it not to be refused (the inner service's
/// own errors are returned).
pub async fn expect_forwarded<S>(service: &mut S, request: Request) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let result = send(service, request).await;
    if let Err(err) = &result {
        assert!(!err.is::<LoopDetected>(), "unexpected refusal: {err}");
    }
    result
}

/// The pattern and repeats of a refusal.
pub fn what(refusal: &LoopDetected) -> (LoopPattern, u32) {
    (refusal.pattern(), refusal.repeats())
}
