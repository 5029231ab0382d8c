//! [`RetryBackoff`], the service.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use toolwarden_core::{Attempt, BoxError, Classify, McpClassifier, McpRequest, McpResponse};
use tower_service::Service;

use crate::future::{ResponseFuture, RetryState};
use crate::layer::{RetryBackoffLayer, Shared};

/// Retries failed MCP calls of the inner service with backoff, when the
/// failure class, the tool and the retry budget allow it. Made by
/// [`RetryBackoffLayer`]; see the [crate docs](crate) for the rules.
///
/// Each attempt is a fresh call of the inner service, preceded by its
/// `poll_ready`, carrying an [`Attempt`] extension (1 for the first try), so
/// the rate limiter and the circuit breaker below see and count every
/// attempt.
pub struct RetryBackoff<S, C = McpClassifier> {
    inner: S,
    shared: Arc<Shared<C>>,
}

impl<S, C> RetryBackoff<S, C> {
    /// Wraps `inner` with the configuration of `layer`, sharing its retry budget.
    pub fn new(inner: S, layer: &RetryBackoffLayer<C>) -> Self {
        RetryBackoff {
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

impl<S: Clone, C> Clone for RetryBackoff<S, C> {
    fn clone(&self) -> Self {
        RetryBackoff {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for RetryBackoff<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoff")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S, C, R> Service<R> for RetryBackoff<S, C>
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

    fn call(&mut self, mut request: R) -> Self::Future {
        // One clock reading for this call, here and in the layers below.
        let _now = toolwarden_core::time::CallInstant::hold();
        // The ready service answers this attempt; the future keeps it for the
        // retries, and this handle gets a fresh clone that must be polled
        // ready again (tower's readiness contract).
        let clone = self.inner.clone();
        let mut service = mem::replace(&mut self.inner, clone);

        // The call's knobs, chosen once: its tool's override or the layer's.
        let (index, policy) = self.shared.policy.select(&request);
        let retry = (policy.max_attempts > 1).then(|| {
            let started = toolwarden_core::time::now();
            let budget = self.shared.budget.deposit(&request, started);
            // Kept without an `Attempt`: each retry stamps its own.
            RetryState {
                request: request.clone(),
                policy: index,
                base_delay: policy.backoff.base,
                started,
                budget,
            }
        });
        request.insert_extension(Attempt(1));
        let future = service.call(request);
        ResponseFuture::new(future, service, Arc::clone(&self.shared), retry)
    }
}
