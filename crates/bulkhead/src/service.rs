//! [`Bulkhead`]: the service built by [`BulkheadLayer`].

use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use toolwarden_core::{BoxError, Classify, McpClassifier, McpRequest};
use tower_service::Service;

use crate::future::{Permit, ResponseFuture};
use crate::layer::BulkheadLayer;
use crate::state::{Compartment, Shared};

/// Caps the tool calls of an inner service in flight per key. Clones share
/// the caps (and so do all services built from one [`BulkheadLayer`]).
///
/// `poll_ready` is the inner service's readiness (which key a call takes a
/// place of is known only in `call`). `call` takes a place: a call that
/// finds one goes straight to the inner service, using the readiness
/// `poll_ready` reserved; a call that finds none is refused with
/// [`BulkheadFull`](toolwarden_core::BulkheadFull), or, when its key has a
/// `max_wait`, gives up that readiness (replacing the inner service with a
/// clone, as tower does), waits in its response future for a place, and
/// only then drives a clone of the inner service to readiness and calls
/// it. The inner service must therefore be `Clone` (put it behind a
/// `tower::buffer::Buffer` if it is not).
///
/// The place is given back when the response future completes or is
/// dropped, whichever comes first. Requests other than `tools/call` pass
/// untouched. With an adaptive cap, the classifier `C` judges each ended
/// call of an adaptive key (the response future classifies nothing for a
/// fixed cap).
#[derive(Debug, Clone)]
pub struct Bulkhead<S, C = McpClassifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    /// Forwards every call untouched (see [`Bulkhead::passthrough`]).
    passthrough: bool,
}

impl<S, C: Clone> Bulkhead<S, C> {
    /// Caps the calls of `inner` with the places of `layer`, shared with
    /// every other service built from it (the same as `layer.layer(inner)`).
    pub fn new(inner: S, layer: &BulkheadLayer<C>) -> Self {
        Bulkhead {
            inner,
            shared: Arc::clone(layer.shared()),
            classifier: layer.classifier().clone(),
            passthrough: false,
        }
    }
}

impl<S, C> Bulkhead<S, C> {
    /// This service, forwarding every call to the inner service untouched: no
    /// place is taken, no call waits or is refused. The standard stack builds
    /// this for the layer when it is left out, so that its type names each
    /// layer once.
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

    /// Consumes the service, returning the inner one.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R, C> Service<R> for Bulkhead<S, C>
where
    R: McpRequest,
    S: Service<R> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, R, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: R) -> Self::Future {
        if self.passthrough || !request.is_tool_call() {
            return ResponseFuture::called(self.inner.call(request), None, None);
        }
        let compartment = self.shared.compartment(self.shared.key_by.key(&request));
        if compartment.try_enter() {
            let classifier = self.classifier_for(&compartment);
            let permit = Permit::new(compartment);
            return ResponseFuture::called(self.inner.call(request), Some(permit), classifier);
        }
        self.call_full(request, compartment)
    }
}

impl<S, C: Clone> Bulkhead<S, C> {
    /// The classifier a call of `compartment` needs: none for a fixed cap.
    #[inline]
    fn classifier_for(&self, compartment: &Compartment) -> Option<C> {
        compartment
            .adaptive
            .is_some()
            .then(|| self.classifier.clone())
    }

    /// `call` for a call that found every place taken.
    #[inline(never)]
    fn call_full<R>(&mut self, request: R, compartment: Arc<Compartment>) -> ResponseFuture<S, R, C>
    where
        R: McpRequest,
        S: Service<R> + Clone,
    {
        let key_ref = self.shared.key_by.key(&request);
        let key: Arc<str> = key_ref.to_string().into();
        let subject = key_ref.subject();
        let max_wait = compartment.limits.max_wait;
        if max_wait.is_zero() {
            return ResponseFuture::refused(self.shared.reject(&key, subject, &compartment));
        }
        // Give up the readiness `poll_ready` reserved: the call waits
        // holding nothing of the service below.
        let unready = self.inner.clone();
        drop(mem::replace(&mut self.inner, unready));
        let service = self.inner.clone();
        let classifier = self.classifier_for(&compartment);
        ResponseFuture::waiting(
            service,
            request,
            compartment,
            (key, subject),
            Arc::clone(&self.shared),
            max_wait,
            classifier,
        )
    }
}
