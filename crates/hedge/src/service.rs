//! [`Hedge`], the service.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use toolwarden_core::{BoxError, Classify, McpClassifier, McpRequest, McpResponse};
use tower_service::Service;

use crate::future::{Race, ResponseFuture};
use crate::layer::{HedgeLayer, Shared};

/// Sends a second copy of a slow `tools/call` of a tool safe to send twice
/// and returns the first good answer. Made by [`HedgeLayer`]; see the
/// [crate docs](crate) for the rules.
pub struct Hedge<S, C = McpClassifier> {
    inner: S,
    shared: Arc<Shared<C>>,
}

impl<S, C> Hedge<S, C> {
    /// Wraps `inner` with the configuration of `layer`, sharing its budget
    /// and latency records.
    pub fn new(inner: S, layer: &HedgeLayer<C>) -> Self {
        Hedge {
            inner,
            shared: Arc::clone(layer.shared()),
        }
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

impl<S: Clone, C> Clone for Hedge<S, C> {
    fn clone(&self) -> Self {
        Hedge {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Hedge<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S, C, R> Service<R> for Hedge<S, C>
where
    R: McpRequest + Clone,
    S: Service<R> + Clone,
    S::Response: McpResponse,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, R, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let shared = &self.shared;
        // A continuation (2026-07-28 `inputResponses`, `requestState`)
        // carries the answer the call acts on, often under a one-time
        // handle: a second copy would act twice, or be refused.
        let policy = if request.is_continuation() {
            None
        } else {
            shared.policy.select(&request)
        };
        let Some(policy) = policy else {
            // Not a tools/call of a tool safe to send twice: passed through.
            return ResponseFuture::single(self.inner.call(request));
        };
        // The ready service answers the first attempt; the future keeps it
        // for the hedge (polled ready again first), and this handle gets a
        // fresh clone (tower's readiness contract).
        let clone = self.inner.clone();
        let mut service = mem::replace(&mut self.inner, clone);
        // The stack's held reading when there is one (one clock reading
        // per call), else the clock's.
        let started = toolwarden_core::time::now();
        shared.budget.deposit_at(started);
        let copy = request.clone();
        let future = service.call(request);
        ResponseFuture::hedged(
            future,
            Race::new(service, copy, Arc::clone(shared), started, *policy),
        )
    }
}
