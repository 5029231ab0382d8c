//! Helpers shared by the circuit breaker's integration tests.

#![allow(dead_code, unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns: a panic fails the test

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::sync::oneshot;
use toolwarden_core::classify::{TransportError, TransportErrorKind};
use toolwarden_core::events::Event;
use toolwarden_core::jsonrpc::{Request, Response};
use toolwarden_core::testing::{ready_call, text_result};
use toolwarden_core::{BoxError, CircuitOpen, Events, McpRequest, RateLimited};
use tower::Service;

/// What the upstream answers to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A successful tool result.
    Ok,
    /// An `isError` result the classifier calls a `Server` failure (counted).
    ServerError,
    /// A closed connection: a `Transient` failure (counted).
    Transient,
    /// An unknown-tool error: a `Client` failure (never counted).
    Client,
    /// Another toolwarden layer's rejection (never counted).
    Rejected,
}

impl Reply {
    pub fn is_counted_failure(self) -> bool {
        matches!(self, Reply::ServerError | Reply::Transient)
    }

    pub fn into_result(self, req: &Request) -> Result<Response, BoxError> {
        let id = req.id.clone();
        let tool = req.tool_name().unwrap_or("?").to_owned();
        match self {
            Reply::Ok => Ok(Response::result(id, text_result("ok"))),
            Reply::ServerError => Ok(Response::result(
                id,
                json!({"content": [{"type": "text", "text": format!("Error executing tool {tool}: boom")}], "isError": true}),
            )),
            Reply::Transient => Err(Box::new(TransportError::new(
                TransportErrorKind::Closed,
                "gone",
            ))),
            Reply::Client => Ok(Response::result(
                id,
                json!({"content": [{"type": "text", "text": format!("MCP error -32602: Tool {tool} not found")}], "isError": true}),
            )),
            Reply::Rejected => Err(Box::new(RateLimited::new(tool, Duration::from_secs(1)))),
        }
    }
}

/// A call waiting at the upstream for its reply.
pub struct Held {
    pub tool: String,
    reply: oneshot::Sender<Reply>,
}

impl Held {
    pub fn answer(self, reply: Reply) {
        let _ = self.reply.send(reply);
    }
}

/// An upstream whose calls wait until the test answers them. Clones share
/// the waiting calls and the call count.
#[derive(Clone, Default)]
pub struct Upstream {
    held: Arc<Mutex<Vec<Held>>>,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls that reached the upstream.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Takes every waiting call.
    pub fn take_held(&self) -> Vec<Held> {
        std::mem::take(&mut *self.held.lock().unwrap())
    }

    /// Takes the most recent waiting call.
    pub fn pop(&self) -> Option<Held> {
        self.held.lock().unwrap().pop()
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
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.held.lock().unwrap().push(Held {
            tool: req.tool_name().unwrap_or("?").to_owned(),
            reply: tx,
        });
        Box::pin(async move {
            let reply = rx
                .await
                .map_err(|_| -> BoxError { "upstream dropped".into() })?;
            reply.into_result(&req)
        })
    }
}

/// An upstream that answers every call at once with the reply scripted per tool.
#[derive(Clone, Default)]
pub struct Scripted {
    replies: Arc<Mutex<std::collections::HashMap<String, Reply>>>,
    calls: Arc<AtomicUsize>,
}

impl Scripted {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, tool: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(tool.to_owned(), reply);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request> for Scripted {
    type Response = Response;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let tool = req.tool_name().unwrap_or("?");
        let reply = self
            .replies
            .lock()
            .unwrap()
            .get(tool)
            .copied()
            .unwrap_or(Reply::Ok);
        std::future::ready(reply.into_result(&req))
    }
}

pub fn req(tool: &str) -> Request {
    Request::tool_call(1, tool, json!({"q": "x"}))
}

/// One call through `svc`: `poll_ready`, then `call`.
pub async fn call<S>(svc: &mut S, tool: &str) -> Result<Response, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    ready_call(svc, req(tool)).await
}

/// The refusal in an error, if it is one.
pub fn refusal(err: &BoxError) -> Option<&CircuitOpen> {
    err.downcast_ref::<CircuitOpen>()
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// An event hook that keeps `name:key` of every circuit event.
pub fn recorded_events() -> (Events, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let events = Events::new().with(move |e: &Event<'_>| {
        sink.lock()
            .unwrap()
            .push(format!("{}:{}", e.name(), e.subject().unwrap_or("")));
    });
    (events, seen)
}
