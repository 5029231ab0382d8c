//! [`CircuitBreaker`], the service.

use std::task::{Context, Poll};

use toolwarden_core::{
    BoxError, CallKind, CircuitOpen, Classify, Key, KeyRef, McpClassifier, McpRequest, McpResponse,
};
use tower_service::Service;

use crate::breaker::Admission;
use crate::future::ResponseFuture;
use crate::layer::CircuitBreakerLayer;
use crate::registry::CircuitRegistry;

/// A service guarded by per-key circuit breakers; see
/// [`CircuitBreakerLayer`].
///
/// Readiness is the inner service's: the key is only known in `call`, so a
/// refused call leaves the inner service's readiness unused (tower allows
/// it; the next `poll_ready` finds it still ready).
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S, C = McpClassifier> {
    inner: S,
    registry: CircuitRegistry,
    classifier: C,
    /// Forwards every call untouched (see [`CircuitBreaker::passthrough`]).
    passthrough: bool,
}

impl<S, C> CircuitBreaker<S, C> {
    /// Guards `inner` with the breakers of `layer` (shared with every other
    /// service it made), judging outcomes with its classifier.
    pub fn new(inner: S, layer: &CircuitBreakerLayer<C>) -> Self
    where
        C: Clone,
    {
        CircuitBreaker {
            inner,
            registry: layer.registry().clone(),
            classifier: layer.classifier().clone(),
            passthrough: false,
        }
    }

    /// This service, forwarding every call to the inner service untouched: no
    /// breaker admits, refuses or records it. The standard stack builds this
    /// for the layer when it is left out, so that its type names each layer
    /// once.
    #[must_use]
    pub fn passthrough(mut self) -> Self {
        self.passthrough = true;
        self
    }

    /// Whether calls pass through untouched ([`passthrough`](Self::passthrough)).
    #[must_use]
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// The breakers.
    #[must_use]
    pub fn registry(&self) -> &CircuitRegistry {
        &self.registry
    }

    /// The inner service.
    #[must_use]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The key a refusal names: the breaker's own, or the caller's for the
/// shared overflow breaker.
fn refusal_key(breaker_key: &Key, asked: &KeyRef<'_>) -> std::sync::Arc<str> {
    match breaker_key {
        Key::Tool(name) | Key::Custom(name) => name.clone(),
        Key::Overflow => asked.to_string().into(),
        other => other.to_string().into(),
    }
}

impl<S, C, R> Service<R> for CircuitBreaker<S, C>
where
    R: McpRequest,
    S: Service<R>,
    S::Response: McpResponse,
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

    #[inline]
    fn call(&mut self, req: R) -> Self::Future {
        if self.passthrough {
            return ResponseFuture::untracked(self.inner.call(req), self.classifier.clone());
        }
        // One clock reading for this call, here and in the layers below.
        let _now = toolwarden_core::time::CallInstant::hold();
        let kind = if req.is_tool_call() {
            CallKind::ToolCall
        } else {
            CallKind::Other
        };
        let key = self.registry.key_by().key(&req);
        let breaker = self.registry.breaker(&key);
        match breaker.admit() {
            Admission::Tracked(ticket) => {
                drop(key);
                let future = self.inner.call(req);
                ResponseFuture::tracked(future, breaker, ticket, kind, self.classifier.clone())
            }
            Admission::Untracked => {
                drop(key);
                ResponseFuture::untracked(self.inner.call(req), self.classifier.clone())
            }
            Admission::Refused(retry_after) => {
                let name = refusal_key(breaker.key(), &key);
                ResponseFuture::refused(
                    CircuitOpen::new(name, retry_after),
                    self.classifier.clone(),
                )
            }
        }
    }
}
