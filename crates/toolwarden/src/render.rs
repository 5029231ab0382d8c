//! Middleware that turns a failed `tools/call` into an `isError` result a
//! model can read.
//!
//! Errors are turned into responses at the edge, as in axum: layers below
//! refuse calls with small typed errors (`CircuitOpen`, `RateLimited`,
//! `LoopDetected`, ...), and this layer, outermost, renders any error of a
//! `tools/call` with the core's [`FailureReport`] into a tool result with
//! `isError: true` ("search is failing and was not called; retry after 12 s").
//! An agent then reads what happened instead of seeing a broken transport.
//!
//! Passed through unchanged: errors of requests that are not tool calls, and
//! JSON-RPC errors the server itself returned (a [`ErrorObject`] in the error
//! chain), which keep their protocol meaning.
//!
//! The edge is also where a tool call's answer is put back under the
//! caller's request id, whatever id the service below answered under (a
//! transport that mixed answers up, a server that echoed another id): one
//! answer per call, with the caller's id, is the stack's guarantee.
//!
//! The edge is also where the sealed outcome mark
//! ([`OUTCOME_META_KEY`](toolwarden_core::classify::OUTCOME_META_KEY)) that
//! layers below put on the failures they render is removed, with the
//! `isError` results it renders itself: the mark is for the layers of this
//! process, and its seal must not reach a client (who could hand it to a
//! server to pass its failures off as our refusals).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use toolwarden::RenderErrorsLayer;
//! use toolwarden_core::{jsonrpc::{Request, Response}, BoxError, CircuitOpen, McpResponse};
//!
//! let refusing = service_fn(|_req: Request| async {
//!     Err::<Response, BoxError>(Box::new(CircuitOpen::new("search", Duration::from_secs(12))))
//! });
//! let svc = RenderErrorsLayer::new().layer(refusing);
//! let resp = svc.oneshot(Request::tool_call(1, "search", serde_json::json!({}))).await.unwrap();
//! assert!(resp.is_tool_error());
//! assert!(resp.first_text().unwrap().contains("retry after 12 s"));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use toolwarden_core::classify::OUTCOME_META_KEY;
use toolwarden_core::jsonrpc::{ErrorObject, Id};
use toolwarden_core::{BoxError, FailureReport, McpRequest, McpResponse, ToolCatalog};
use tower_layer::Layer;
use tower_service::Service;

/// Renders errors of `tools/call`s into `isError` results.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderErrorsLayer {
    _priv: (),
}

impl RenderErrorsLayer {
    /// The layer.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for RenderErrorsLayer {
    type Service = RenderErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RenderErrors::new(inner)
    }
}

/// The service of [`RenderErrorsLayer`].
#[derive(Debug, Clone)]
pub struct RenderErrors<S> {
    inner: S,
    enabled: bool,
    catalog: Option<ToolCatalog>,
}

impl<S> RenderErrors<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        RenderErrors {
            inner,
            enabled: true,
            catalog: None,
        }
    }

    /// The same service, rendering the failures of the tools `catalog`
    /// says declare an `outputSchema` with their facts in `_meta`
    /// ([`FailureReport::to_tool_result_for`]) rather than in
    /// `structuredContent`, which a client validates against the schema
    /// (the standard stack passes its catalog).
    #[must_use]
    pub fn with_catalog(mut self, catalog: ToolCatalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// The same service, rendering nothing: every result passes through
    /// (errors are still converted into `BoxError`, and a tool call's
    /// answer still goes back under the request's id).
    #[must_use]
    pub fn passthrough(mut self) -> Self {
        self.enabled = false;
        self
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What the future of a tool call keeps: the tool, to render an error
/// (when rendering is on), and the request id, to answer under.
#[derive(Debug)]
struct Target {
    tool: Option<Tool>,
    id: Option<Id>,
    /// The tool declares an `outputSchema` (read when the call is made:
    /// one relaxed load unless some tool of the catalog declares one).
    output_schema: bool,
}

/// The tool a call is for, kept until its answer: a copy of a short name
/// (most are), else the request's shared params when it has them (a
/// pointer, read only if the call fails), else a shared copy of the name.
/// A short name costs no reference count: a pointer kept costs two atomic
/// updates on every call, for a name read only when the call fails.
#[derive(Debug)]
enum Tool {
    Short { len: u8, bytes: [u8; SHORT_NAME] },
    Shared(Arc<serde_json::Value>),
    Named(Arc<str>),
}

/// The longest name [`Tool`] copies inline.
const SHORT_NAME: usize = 30;

impl Tool {
    fn of<R: McpRequest>(request: &R, name: &str) -> Self {
        if let Ok(len) = u8::try_from(name.len()) {
            if name.len() <= SHORT_NAME {
                let mut bytes = [0; SHORT_NAME];
                bytes[..name.len()].copy_from_slice(name.as_bytes());
                return Tool::Short { len, bytes };
            }
        }
        match request.shared_params() {
            Some(params) => Tool::Shared(params),
            None => Tool::Named(name.into()),
        }
    }

    fn name(&self) -> &str {
        match self {
            // The bytes of a `&str`, cut at its length: valid UTF-8.
            Tool::Short { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or("")
            }
            Tool::Shared(params) => params.get("name").and_then(|n| n.as_str()).unwrap_or(""),
            Tool::Named(name) => name,
        }
    }
}

impl<S, R> Service<R> for RenderErrors<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    S::Response: McpResponse,
    R: McpRequest,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RenderFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // A tool call's id is kept even with rendering off: the answer
        // goes back under it, whatever id the service below wrote.
        let target = request.tool_name().map(|tool| Target {
            tool: self.enabled.then(|| Tool::of(&request, tool)),
            id: request.request_id().cloned(),
            output_schema: self.enabled
                && self
                    .catalog
                    .as_ref()
                    .is_some_and(|catalog| catalog.has_output_schema(tool)),
        });
        RenderFuture {
            inner: self.inner.call(request),
            target,
        }
    }
}

pin_project! {
    /// The response future of [`RenderErrors`].
    pub struct RenderFuture<F> {
        #[pin]
        inner: F,
        target: Option<Target>,
    }
}

impl<F> std::fmt::Debug for RenderFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderFuture")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Whether the server itself answered with a JSON-RPC error.
fn is_protocol_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<ErrorObject>() {
            return true;
        }
        current = e.source();
    }
    false
}

impl<F, T, E> Future for RenderFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    T: McpResponse,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx)).map_err(Into::into);
        let target = this.target.take();
        Poll::Ready(match (result, target) {
            (
                Err(error),
                Some(Target {
                    tool: Some(tool),
                    id,
                    output_schema,
                }),
            ) if !is_protocol_error(error.as_ref()) => {
                let report = FailureReport::from_error(tool.name(), error.as_ref());
                let result = report.to_tool_result_for(output_schema);
                let mut response = T::from_tool_result(id.as_ref(), result);
                response.remove_result_meta(OUTCOME_META_KEY);
                Ok(response)
            }
            (Ok(mut response), target) => {
                // One answer per call, under the caller's id: a service
                // below (a transport, a server) may have answered under
                // another.
                if let Some(id) = target.as_ref().and_then(|t| t.id.as_ref()) {
                    response.set_request_id(id);
                }
                // The outcome mark a layer below rendered (the fallback
                // cache) is for the layers of this process: its seal must
                // not reach a client, who could hand it to a server.
                // A success the standard classifier marked is no error
                // result, so it carries no such mark: not read again.
                if !response.marked_tool_call_success() && response.is_tool_error() {
                    response.remove_result_meta(OUTCOME_META_KEY);
                }
                Ok(response)
            }
            (result, _) => result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    use toolwarden_core::jsonrpc::{Request, Response};
    use toolwarden_core::testing::ReadyChecked;
    use toolwarden_core::{LoopDetected, LoopPattern, RateLimited};
    use tower::{service_fn, ServiceExt};

    /// Every name comes back whole, however it is kept: inline up to 30
    /// bytes (multi-byte characters included), then through the params or
    /// a shared copy.
    #[test]
    fn the_tool_name_is_kept_whole_whatever_its_length() {
        for name in [
            "",
            "s",
            "search_docs",
            "é".repeat(15).as_str(),
            "x".repeat(30).as_str(),
            "x".repeat(31).as_str(),
            "ツール".repeat(20).as_str(),
            "y".repeat(300).as_str(),
        ] {
            let request = Request::tool_call(1, name, json!({}));
            let kept = Tool::of(&request, name);
            assert_eq!(kept.name(), name);
            assert_eq!(
                matches!(kept, Tool::Short { .. }),
                name.len() <= 30,
                "{name}"
            );
            let mut bare = request.clone();
            bare.params = None;
            assert_eq!(Tool::of(&bare, name).name(), name);
        }
    }

    #[tokio::test]
    async fn rejections_become_readable_results_with_the_request_id() {
        let svc = RenderErrorsLayer::new().layer(
            ReadyChecked::new(service_fn(|_req: Request| async {
                Err::<Response, BoxError>(Box::new(RateLimited::new(
                    "search",
                    Duration::from_millis(500),
                )))
            }))
            .pending_first(),
        );
        let resp = svc
            .oneshot(Request::tool_call(42, "search", json!({})))
            .await
            .unwrap();
        assert_eq!(resp.id, Id::Number(42));
        assert!(resp.is_tool_error());
        let result = resp.payload.unwrap();
        assert_eq!(
            result["structuredContent"]["toolwarden"]["layer"],
            "rate_limit"
        );
        assert_eq!(
            result["structuredContent"]["toolwarden"]["retryAfterSeconds"],
            0.5
        );
    }

    /// The sealed outcome mark never leaves the process: not on the answers
    /// this layer renders, nor on those a layer below rendered.
    #[tokio::test]
    async fn the_outcome_seal_never_reaches_a_client() {
        let rendered_below = FailureReport::from_error(
            "search",
            &RateLimited::new("search", Duration::from_secs(1)),
        )
        .to_tool_result();
        assert!(
            rendered_below["_meta"][OUTCOME_META_KEY]["seal"].is_string(),
            "the layers below carry it: {rendered_below}"
        );
        let below = rendered_below.clone();
        let passing = RenderErrorsLayer::new().layer(service_fn(move |req: Request| {
            let result = below.clone();
            async move { Ok::<_, BoxError>(Response::result(req.id, result)) }
        }));
        let refusing = RenderErrorsLayer::new().layer(service_fn(|_req: Request| async {
            Err::<Response, BoxError>(Box::new(RateLimited::new("search", Duration::from_secs(1))))
        }));
        let passed = passing
            .oneshot(Request::tool_call(1, "search", json!({})))
            .await
            .unwrap();
        let rendered = refusing
            .oneshot(Request::tool_call(2, "search", json!({})))
            .await
            .unwrap();
        for answer in [passed, rendered] {
            let result = answer.payload.unwrap();
            assert!(result.get("_meta").is_none(), "{result}");
            assert!(!result
                .to_string()
                .contains(toolwarden_core::classify::outcome_seal()));
            assert_eq!(
                result["structuredContent"]["toolwarden"]["layer"],
                "rate_limit"
            );
        }
    }

    #[tokio::test]
    async fn a_loop_tells_the_model_to_change_approach() {
        let svc = RenderErrorsLayer::new().layer(service_fn(|_req: Request| async {
            Err::<Response, BoxError>(Box::new(LoopDetected::new(
                "search",
                4,
                LoopPattern::RepeatedFailure,
            )))
        }));
        let resp = svc
            .oneshot(Request::tool_call(1, "search", json!({})))
            .await
            .unwrap();
        assert!(resp.first_text().unwrap().contains("change approach"));
    }

    #[tokio::test]
    async fn protocol_errors_and_other_methods_pass_through() {
        let svc = RenderErrorsLayer::new().layer(service_fn(|_req: Request| async {
            Err::<Response, BoxError>(Box::new(ErrorObject::new(-32602, "Unknown tool: nope")))
        }));
        let err = svc
            .clone()
            .oneshot(Request::tool_call(1, "nope", json!({})))
            .await
            .unwrap_err();
        assert_eq!(err.downcast_ref::<ErrorObject>().unwrap().code, -32602);
        let svc = RenderErrorsLayer::new().layer(service_fn(|_req: Request| async {
            Err::<Response, BoxError>("transport closed".into())
        }));
        let err = svc
            .oneshot(Request::new(2, "tools/list", None))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "transport closed");
    }
}
