//! [`RetryBackoff`], the service.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
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
///
/// The first attempt is a call of this service's inner service. A call's
/// future does not keep a clone of the inner service (whose clone touches
/// every shared count of the layers below, on every call): a call that is
/// retried clones one, at its first retry, from a spare made at this
/// service's first call and shared by its clones. Tower services' clones
/// are handles to the same service, so a retry sees what a clone made at
/// call time would.
pub struct RetryBackoff<S, C = McpClassifier> {
    inner: S,
    instance: Arc<Instance<S, C>>,
    /// Forwards every call untouched (see [`RetryBackoff::passthrough`]).
    passthrough: bool,
}

/// What a service and its calls' futures share: the layer's state, and the
/// spare the retries clone their inner service from.
pub(crate) struct Instance<S, C> {
    pub(crate) shared: Arc<Shared<C>>,
    spare: OnceLock<Mutex<S>>,
}

impl<S: Clone, C> Instance<S, C> {
    /// A clone of the inner service, for a retry.
    pub(crate) fn service(&self) -> Option<S> {
        let spare = self.spare.get()?;
        let spare = spare.lock().unwrap_or_else(PoisonError::into_inner);
        Some(spare.clone())
    }
}

impl<S, C> RetryBackoff<S, C> {
    /// Wraps `inner` with the configuration of `layer`, sharing its retry budget.
    pub fn new(inner: S, layer: &RetryBackoffLayer<C>) -> Self {
        RetryBackoff {
            inner,
            instance: Arc::new(Instance {
                shared: Arc::clone(layer.shared()),
                spare: OnceLock::new(),
            }),
            passthrough: false,
        }
    }

    /// This service, forwarding every call to the inner service untouched:
    /// every call is attempted once, its answer returned as it is. The standard
    /// stack builds this for the layer when it is left out, so that its type
    /// names each layer once.
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
            instance: Arc::clone(&self.instance),
            passthrough: self.passthrough,
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for RetryBackoff<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBackoff")
            .field("inner", &self.inner)
            .field("policy", &self.instance.shared.policy)
            .field("passthrough", &self.passthrough)
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
        if self.passthrough {
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        // One clock reading for this call, here and in the layers below.
        let _now = toolwarden_core::time::CallInstant::hold();
        let instance = &self.instance;
        let shared = &instance.shared;

        // The call's knobs, chosen once: its tool's override or the layer's.
        let (index, policy) = shared.policy.select(&request);
        let retry = (policy.max_attempts > 1).then(|| {
            if instance.spare.get().is_none() {
                // This service's first call that may be retried.
                let _ = instance.spare.set(Mutex::new(self.inner.clone()));
            }
            let started = toolwarden_core::time::now();
            let budget = shared.budget.deposit(&request, started);
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
        // The ready service answers the first attempt (and is polled ready
        // again before the next call: tower's readiness contract).
        let future = self.inner.call(request);
        ResponseFuture::new(future, Arc::clone(&self.instance), retry)
    }
}
