//! Test support (feature `testing`): a scripted mock MCP service and an inner
//! service that enforces tower's readiness contract.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{json, Value};
use tower_service::Service;

use crate::classify::{TransportError, TransportErrorKind};
use crate::jsonrpc::{ErrorObject, Request, Response};
use crate::request::McpRequest;
use crate::BoxError;

/// What the mock does for one call.
#[derive(Debug, Clone)]
pub enum Step {
    /// Answer with this `tools/call` result object.
    Result(Value),
    /// Answer with a JSON-RPC error.
    RpcError(ErrorObject),
    /// Fail with a transport error.
    Transport(TransportErrorKind),
    /// Wait, then do the inner step.
    Latency(Duration, Box<Step>),
    /// Never answer.
    Hang,
}

impl Step {
    /// A successful text result.
    #[must_use]
    pub fn ok(text: &str) -> Self {
        Step::Result(text_result(text))
    }

    /// An `isError: true` result with `text` (server-everything reports an
    /// unknown tool as `MCP error -32602: Tool nope not found`).
    #[must_use]
    pub fn tool_error(text: &str) -> Self {
        Step::Result(json!({"content": [{"type": "text", "text": text}], "isError": true}))
    }

    /// A JSON-RPC error.
    #[must_use]
    pub fn rpc_error(code: i64, message: &str) -> Self {
        Step::RpcError(ErrorObject::new(code, message))
    }

    /// A closed connection.
    #[must_use]
    pub fn closed() -> Self {
        Step::Transport(TransportErrorKind::Closed)
    }

    /// Delays this step.
    #[must_use]
    pub fn after(self, latency: Duration) -> Self {
        Step::Latency(latency, Box::new(self))
    }
}

/// One call through `service` as tower's contract wants it: `poll_ready`
/// until ready, then `call`, with any error boxed. Every crate's tests
/// drive their services with it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use toolwarden_core::testing::{ready_call, MockMcp};
/// use toolwarden_core::jsonrpc::Request;
/// let mut mock = MockMcp::new();
/// let answer = ready_call(&mut mock, Request::tool_call(1, "search", serde_json::json!({}))).await;
/// assert!(answer.is_ok());
/// # }
/// ```
pub async fn ready_call<S, R>(service: &mut S, request: R) -> Result<S::Response, BoxError>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    service.call(request).await.map_err(Into::into)
}

/// A `tools/call` result with one text item.
#[must_use]
pub fn text_result(text: &str) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": false})
}

#[derive(Debug, Default)]
struct Script {
    steps: HashMap<String, VecDeque<Step>>,
    defaults: HashMap<String, Step>,
    calls: HashMap<String, usize>,
    log: Vec<Request>,
}

/// A scripted MCP server as a `tower::Service`. Per tool, it plays a queue of
/// [`Step`]s, then repeats the tool's default step (a success echoing the tool
/// name unless set). Requests that are not tool calls get `{}`. Clones share
/// the script and the call counts.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::ServiceExt;
/// use toolwarden_core::{jsonrpc::Request, testing::{MockMcp, Step}, McpResponse};
/// let mock = MockMcp::new().script("search", [Step::tool_error("boom")]);
/// let first = mock.clone().oneshot(Request::tool_call(1, "search", serde_json::json!({}))).await.unwrap();
/// assert!(first.is_tool_error());
/// let second = mock.clone().oneshot(Request::tool_call(2, "search", serde_json::json!({}))).await.unwrap();
/// assert!(!second.is_tool_error());
/// assert_eq!(mock.calls("search"), 2);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MockMcp {
    script: Arc<Mutex<Script>>,
    in_flight: Arc<AtomicUsize>,
}

impl MockMcp {
    /// A mock that answers every tool with success.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues steps for `tool`.
    #[must_use]
    pub fn script(self, tool: &str, steps: impl IntoIterator<Item = Step>) -> Self {
        self.push(tool, steps);
        self
    }

    /// Queues more steps for `tool` on a mock already in use.
    pub fn push(&self, tool: &str, steps: impl IntoIterator<Item = Step>) {
        self.lock()
            .steps
            .entry(tool.to_owned())
            .or_default()
            .extend(steps);
    }

    /// Sets the step `tool` repeats once its queue is empty.
    #[must_use]
    pub fn default_step(self, tool: &str, step: Step) -> Self {
        self.set_default(tool, step);
        self
    }

    /// Changes the default step of `tool` on a mock already in use.
    pub fn set_default(&self, tool: &str, step: Step) {
        self.lock().defaults.insert(tool.to_owned(), step);
    }

    /// Calls that reached the mock for `tool`.
    #[must_use]
    pub fn calls(&self, tool: &str) -> usize {
        self.lock().calls.get(tool).copied().unwrap_or(0)
    }

    /// Calls that reached the mock, for every tool.
    #[must_use]
    pub fn total_calls(&self) -> usize {
        self.lock().calls.values().sum()
    }

    /// Every request received, in order.
    #[must_use]
    pub fn requests(&self) -> Vec<Request> {
        self.lock().log.clone()
    }

    /// Calls started and not yet finished (a dropped call counts as finished).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn next_step(&self, req: &Request) -> Option<Step> {
        let mut script = self.lock();
        script.log.push(req.clone());
        let tool = req.tool_name()?.to_owned();
        *script.calls.entry(tool.clone()).or_default() += 1;
        let step = script.steps.get_mut(&tool).and_then(VecDeque::pop_front);
        Some(step.unwrap_or_else(|| {
            script
                .defaults
                .get(&tool)
                .cloned()
                .unwrap_or_else(|| Step::ok(&format!("{tool} ok")))
        }))
    }
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn play(step: Step, req: &Request) -> Result<Response, BoxError> {
    let mut step = step;
    loop {
        match step {
            Step::Latency(d, inner) => {
                tokio::time::sleep(d).await;
                step = *inner;
            }
            Step::Hang => std::future::pending::<()>().await,
            Step::Result(v) => return Ok(Response::result(req.id.clone(), v)),
            Step::RpcError(e) => return Ok(Response::error(req.id.clone(), e)),
            Step::Transport(kind) => {
                return Err(Box::new(TransportError::new(
                    kind,
                    "mock transport failure",
                )))
            }
        }
    }
}

impl Service<Request> for MockMcp {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let step = self.next_step(&req);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(Arc::clone(&self.in_flight));
        Box::pin(async move {
            let _guard = guard;
            match step {
                Some(step) => play(step, &req).await,
                None => Ok(Response::result(req.id.clone(), json!({}))),
            }
        })
    }
}

/// Wraps a service and panics when `call` comes without a successful
/// `poll_ready` before it (tower's readiness contract). With
/// [`ReadyChecked::pending_first`], each readiness is only granted on the
/// second poll, so a layer that forgets to propagate `Pending` is caught too.
#[derive(Debug)]
pub struct ReadyChecked<S> {
    inner: S,
    ready: bool,
    pending_first: bool,
    polled_once: bool,
}

impl<S: Clone> Clone for ReadyChecked<S> {
    /// A clone is not ready: readiness belongs to one handle.
    fn clone(&self) -> Self {
        ReadyChecked {
            inner: self.inner.clone(),
            ready: false,
            pending_first: self.pending_first,
            polled_once: false,
        }
    }
}

impl<S> ReadyChecked<S> {
    /// Checks `inner`.
    pub fn new(inner: S) -> Self {
        ReadyChecked {
            inner,
            ready: false,
            pending_first: false,
            polled_once: false,
        }
    }

    /// Answers `Pending` (and wakes at once) on the first poll of each readiness.
    #[must_use]
    pub fn pending_first(mut self) -> Self {
        self.pending_first = true;
        self
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, R> Service<R> for ReadyChecked<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.pending_first && !self.polled_once {
            self.polled_once = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let poll = self.inner.poll_ready(cx);
        if let Poll::Ready(Ok(())) = poll {
            self.ready = true;
        }
        poll
    }

    fn call(&mut self, req: R) -> S::Future {
        assert!(
            self.ready,
            "readiness contract broken: call() without a successful poll_ready() before it"
        );
        self.ready = false;
        self.polled_once = false;
        self.inner.call(req)
    }
}

/// Runs every classification entry point of this crate on `value`, an
/// arbitrary JSON value standing for anything a server may send, and
/// panics when an invariant breaks. The classification fuzz target and
/// its CI proptest both call this, so they check the same things:
///
/// - nothing panics (the value as a result, as error `data`, as an error
///   code, as `isError` text, as a `Retry-After` header, as a whole
///   JSON-RPC message, as arguments to fingerprint);
/// - every retry-after hint is at most
///   [`DEFAULT_MAX_RETRY_AFTER`](crate::classify::DEFAULT_MAX_RETRY_AFTER);
/// - a success has no failure class and a failure has one;
/// - nothing a server sends is taken for a toolwarden refusal (it cannot
///   know the process's seal).
pub fn check_classification(value: &Value) {
    use crate::classify::{
        classify_error_text, classify_rpc_error, retry_after_from_data, retry_after_from_header,
        CallKind, Classify, McpClassifier, Outcome, OutcomeKind, DEFAULT_MAX_RETRY_AFTER,
    };
    use crate::jsonrpc::{Id, Message};
    use crate::request::{tool_result, McpResponse};

    let check = |what: &str, outcome: Outcome| {
        assert!(
            outcome
                .retry_after
                .is_none_or(|d| d <= DEFAULT_MAX_RETRY_AFTER),
            "{what}: hint {:?} past the bound",
            outcome.retry_after
        );
        assert_eq!(
            outcome.is_success(),
            outcome.class.is_none(),
            "{what}: success and class disagree: {outcome:?}"
        );
        assert_ne!(
            outcome.kind,
            OutcomeKind::Rejected,
            "{what}: a server's answer taken for our refusal"
        );
    };
    let classifier = McpClassifier::new();

    // As the result of a tools/call and of any other request.
    let response = Response::result(Id::Number(1), value.clone());
    for kind in [CallKind::ToolCall, CallKind::Other] {
        check("result", classifier.classify_response(kind, &response));
    }
    let _ = (
        response.is_tool_error(),
        response.is_empty_tool_result(),
        response.is_input_required(),
        response.first_text(),
        response.size_hint(),
        tool_result::status(value),
    );

    // As a JSON-RPC error: the value as `data`, and as the error object.
    let code = value.get("code").and_then(Value::as_i64).unwrap_or(-32023);
    let mut error = ErrorObject::new(code, "fuzz");
    error.data = Some(value.clone());
    check("rpc data", classify_rpc_error(code, Some(value)));
    check(
        "rpc response",
        classifier.classify_response(
            CallKind::ToolCall,
            &Response::error(Id::Number(1), error.clone()),
        ),
    );
    check(
        "rpc error",
        <McpClassifier as Classify<Response>>::classify_error(&classifier, &error),
    );
    assert!(retry_after_from_data(value).is_none_or(|d| d <= DEFAULT_MAX_RETRY_AFTER));

    // As text: of an `isError` result, and of a `Retry-After` header.
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    check("error text", classify_error_text(&text));
    let now = std::time::SystemTime::now();
    assert!(retry_after_from_header(&text, now).is_none_or(|d| d <= DEFAULT_MAX_RETRY_AFTER));

    // As a whole message, and as arguments.
    let _ = Message::from_value(value.clone());
    let _ = crate::fingerprint::fingerprint_value("fuzz", value);
    let _ = crate::fingerprint::fingerprint("fuzz", value.as_object());

    // Through rmcp's types, where the value deserialises into one.
    #[cfg(feature = "rmcp")]
    if let Ok(result) = serde_json::from_value::<rmcp::model::ServerResult>(value.clone()) {
        check(
            "rmcp result",
            classifier.classify_response(CallKind::ToolCall, &result),
        );
    }
}
