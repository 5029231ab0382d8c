//! The [`Observability`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use toolwarden_core::{
    call_fingerprint, Attempt, BoxError, CallKind, Classify, Entry, McpClassifier, McpRequest,
};
use tower_service::Service;
use tracing::field::{display, Empty};
use tracing::Span;

use crate::future::{InFlight, ResponseFuture};
use crate::layer::ObservabilityLayer;
use crate::registry::{Series, Shared};
use crate::stats::Stats;

/// Records every call passing through it; built by [`ObservabilityLayer`]
/// (or [`Observability::new`] with one). It never refuses a call and adds no
/// readiness of its own: `poll_ready` is the inner service's.
#[derive(Clone)]
pub struct Observability<S, C = McpClassifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    /// The series of the previous call, to skip the map lookup when the
    /// next call is for the same tool.
    last: Option<Entry<Series>>,
    /// Forwards every call untouched (see [`Observability::passthrough`]).
    passthrough: bool,
}

impl<S, C> Observability<S, C> {
    /// Wraps `inner` with `layer`'s configuration; it records into the
    /// layer's statistics, shared with every other service the layer built.
    /// The same as `layer.layer(inner)`.
    pub fn new(inner: S, layer: &ObservabilityLayer<C>) -> Self
    where
        C: Clone,
    {
        Observability {
            inner,
            shared: Arc::clone(layer.shared()),
            classifier: layer.classifier().clone(),
            last: None,
            passthrough: false,
        }
    }

    /// This service, forwarding every call to the inner service untouched:
    /// nothing recorded, no span. The standard stack builds this for the layer
    /// when it is left out, so that its type names each layer once.
    #[must_use]
    pub fn passthrough(mut self) -> Self {
        self.passthrough = true;
        self.last = None;
        self
    }

    /// Whether calls pass through untouched ([`passthrough`](Self::passthrough)).
    #[must_use]
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// The inner service.
    #[must_use]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    #[must_use]
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// A handle to the statistics this service records into.
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Observability<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observability")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .field("passthrough", &self.passthrough)
            .finish_non_exhaustive()
    }
}

impl<S, C, R> Service<R> for Observability<S, C>
where
    R: McpRequest,
    S: Service<R>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        if self.passthrough {
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        let kind = if request.is_tool_call() {
            CallKind::ToolCall
        } else {
            CallKind::Other
        };
        let series = self.shared.series(&request, &mut self.last);
        let span = call_span(&mut request, self.shared.config.span_fingerprint);
        let start = self.shared.clock.now();
        let active = series.start_active();
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ResponseFuture::new(
            inner,
            InFlight {
                series,
                start,
                kind,
                classifier: self.classifier.clone(),
                active,
            },
            span,
        )
    }
}

/// `{method} {tool}`, the OpenTelemetry span name of an MCP call.
struct SpanName<'a>(&'a str, Option<&'a str>);

impl fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(tool) => write!(f, "{} {tool}", self.0),
            None => f.write_str(self.0),
        }
    }
}

/// The call span, named and attributed after the OpenTelemetry MCP semantic
/// conventions (`otel.name` = `{mcp.method.name} {gen_ai.tool.name}`,
/// `gen_ai.operation.name = execute_tool` on tool calls, `error.type` and
/// `otel.status_code = ERROR` on failures). Its fields are evaluated only
/// when a subscriber enables it; the arguments never enter it (only their
/// fingerprint, in hex), nor does the result.
fn call_span<R: McpRequest>(request: &mut R, fingerprint: bool) -> Span {
    let span = tracing::info_span!(
        "mcp.call",
        otel.name = %SpanName(request.method(), request.tool_name()),
        otel.kind = "client",
        mcp.method.name = request.method(),
        gen_ai.tool.name = request.tool_name(),
        gen_ai.operation.name = Empty,
        jsonrpc.request.id = Empty,
        otel.status_code = Empty,
        attempt = Empty,
        toolwarden.fingerprint = Empty,
        outcome = Empty,
        failure.class = Empty,
        error.type = Empty,
        toolwarden.rejected_by = Empty,
        duration_ms = Empty,
    );
    if !span.is_disabled() {
        if request.is_tool_call() {
            span.record("gen_ai.operation.name", "execute_tool");
        }
        if let Some(id) = request.request_id() {
            span.record("jsonrpc.request.id", display(id));
        }
        if let Some(Attempt(attempt)) = request.extension::<Attempt>() {
            span.record("attempt", attempt);
        }
        if fingerprint {
            if let Some(fp) = call_fingerprint(request) {
                span.record("toolwarden.fingerprint", display(fp));
            }
        }
    }
    span
}
